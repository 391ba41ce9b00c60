"""Keeping one conversation going across many model streams: what a stream is opened with, what a
failure means, when to try again, and what the new stream must hear.

Nova Sonic closes a stream at 8 minutes and after about 3 minutes of silence, and fails now and
then. These pieces hold the facts and the arithmetic; `protocol.session.Session` makes the
decisions with them. No clocks, no I/O: every time is passed in.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from . import nova_events as nova
from .history import history_events, shape_history, split_chunks
from .items import Item
from .models import NOVA_2_HISTORY, HistoryLimits

# The service's exception kinds (the members of its error union), as transports report them.
VALIDATION = "validationException"
MODEL_TIMEOUT = "modelTimeoutException"
THROTTLING = "throttlingException"
MODEL_STREAM_ERROR = "modelStreamErrorException"
INTERNAL_SERVER = "internalServerException"
SERVICE_UNAVAILABLE = "serviceUnavailableException"
ACCESS_DENIED = "accessDeniedException"
CONNECTION = "connectionError"  # the stream broke below the event protocol (reset, TLS, timeout)
DEAF = "deafStream"             # ours: the stream heard speech and said nothing

IDLE_TIMEOUT_MESSAGE = "InternalErrorCode=531::RST_STREAM closed stream. HTTP/2 error code: NO_ERROR"
INPUT_GAP_CODE = "InternalErrorCode=532::"  # 55 s without audio bytes or interactive content
INSTABILITY_MESSAGE = "System instability detected. Please retry your request."
MODEL_TIMEOUT_MESSAGE = "Model has timed out in processing the request. Try your request again."


class Failure(enum.Enum):
    """What a model-stream failure means for the conversation: classified once, here."""

    IDLE_TIMEOUT = "idle_timeout"          # 531 (idle) or 532 (an input gap): a rotation the service forced
    HISTORY_TOO_LARGE = "history_too_large"  # the stream refused the history: once, smaller limits
    INSTABILITY = "instability"
    TOOL_RESPONSE = "tool_response"
    INVALID_EVENT_BYTES = "invalid_event_bytes"
    MODEL_TIMEOUT = "model_timeout"
    THROTTLED = "throttled"
    STREAM_ERROR = "stream_error"
    SERVER_ERROR = "server_error"
    CONNECTION = "connection"
    DEAF = "deaf"
    ACCESS_DENIED = "access_denied"
    INVALID_INPUT = "invalid_input"        # our request was wrong: a new stream would fail the same way
    UNKNOWN = "unknown"

    @property
    def recoverable(self) -> bool:
        """Whether reopening the stream with the history is worth trying (reference §6.1)."""
        return self not in (Failure.ACCESS_DENIED, Failure.INVALID_INPUT, Failure.UNKNOWN)


_BY_KIND = {
    MODEL_TIMEOUT: Failure.MODEL_TIMEOUT,
    THROTTLING: Failure.THROTTLED,
    MODEL_STREAM_ERROR: Failure.STREAM_ERROR,
    INTERNAL_SERVER: Failure.SERVER_ERROR,
    SERVICE_UNAVAILABLE: Failure.SERVER_ERROR,
    CONNECTION: Failure.CONNECTION,
    ACCESS_DENIED: Failure.ACCESS_DENIED,
    DEAF: Failure.DEAF,
}


def classify(kind: str, message: str) -> Failure:
    """The one place that reads a failure's kind and message."""
    if kind == VALIDATION:
        if IDLE_TIMEOUT_MESSAGE in message or INPUT_GAP_CODE in message:
            return Failure.IDLE_TIMEOUT
        if "history" in message.lower() and ("exceed" in message or "too large" in message.lower()):
            return Failure.HISTORY_TOO_LARGE
        if "System instability" in message:
            return Failure.INSTABILITY
        if "Tool Response parsing error" in message:
            return Failure.TOOL_RESPONSE
        if "Invalid event bytes" in message:
            return Failure.INVALID_EVENT_BYTES
        return Failure.INVALID_INPUT
    return _BY_KIND.get(kind, Failure.UNKNOWN)


def failure_message(failure: Failure) -> str:
    """What the client is told when the model cannot go on: clear, without internals (the service's
    own text, which can name the AWS account and role, goes to the server log only)."""
    if failure is Failure.ACCESS_DENIED:
        return ("the model refused access: the gateway's AWS identity needs bedrock:InvokeModel and access "
                "to the model (details in the server log)")
    if failure is Failure.THROTTLED:
        return "the model is over its quota (throttled); try again shortly"
    return "the model stream failed and could not be recovered"


# -- recovery ladder -------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Recover:
    delay_s: float


@dataclass(frozen=True, slots=True)
class GiveUp:
    reason: str


class RecoveryLadder:
    """Whether, and after what backoff, a failed stream is reopened.

    A recoverable failure reopens the stream with the history after 2^(n-1)-1 s (0, 1, 3 s, capped
    at 10), at most `max_recoveries` times per user turn (LiveKit's ladder). The idle timeout (531)
    and the input gap (532) are rotations the service forced, and a history refused as too large is
    reopened with smaller limits (once: the session decides): they reopen at once and do not count.
    """

    def __init__(self, *, max_recoveries: int = 3):
        self.max_recoveries = max_recoveries
        self.failures = 0  # since the last completed user turn

    def turn_completed(self) -> None:
        self.failures = 0

    def on_failure(self, failure: Failure) -> Recover | GiveUp:
        if not failure.recoverable:
            return GiveUp(failure.value)
        if failure in (Failure.IDLE_TIMEOUT, Failure.HISTORY_TOO_LARGE):
            return Recover(0.0)
        self.failures += 1
        if self.failures > self.max_recoveries:
            return GiveUp(f"{self.max_recoveries} recoveries in one turn")
        return Recover(min(10.0, 2 ** (self.failures - 1) - 1))


# -- what a new stream must hear ---------------------------------------------------------------------
class ReplayBuffer:
    """The last `seconds` of user audio (16 kHz PCM16), each piece with the time it arrived; bounded
    in bytes. A new stream hears the utterance it missed from here, from the utterance's start."""

    def __init__(self, *, seconds: float = 10.0, rate: int = nova.MODEL_INPUT_RATE):
        self.max_bytes = int(seconds * rate) * 2
        self._chunks: deque[tuple[float, bytes]] = deque()
        self.size = 0

    def add(self, at: float, pcm: bytes) -> None:
        self._chunks.append((at, pcm))
        self.size += len(pcm)
        while self.size - len(self._chunks[0][1]) >= self.max_bytes:
            self.size -= len(self._chunks.popleft()[1])

    def since(self, at: float) -> list[bytes]:
        """Audio that arrived at `at` or later (as much of it as is kept)."""
        return [pcm for t, pcm in self._chunks if t >= at]


@dataclass(slots=True)
class StreamSetup:
    """Names and opening events of one Nova stream (new conversation, resume, rotation, recovery)."""

    prompt_name: str
    audio_content: str
    events: list[dict]

    @classmethod
    def build(
        cls,
        *,
        system_prompt: str,
        history: list[Item],
        voice: str,
        output_sample_rate: int,
        endpointing_sensitivity: str | None = None,
        drop_trailing_user: bool = False,
        history_limits: HistoryLimits = NOVA_2_HISTORY,
        tools: Sequence[dict] = (),
        tool_choice: dict | None = None,
        new_name: Callable[[], str] = nova.new_name,
    ) -> StreamSetup:
        prompt = new_name()
        audio = new_name()
        events = [
            nova.session_start(endpointing_sensitivity=endpointing_sensitivity),
            nova.prompt_start(prompt, voice_id=voice, output_sample_rate=output_sample_rate, tools=list(tools),
                              tool_choice=tool_choice),
            *nova.text_block(prompt, "SYSTEM", split_chunks(system_prompt.strip() or "You are a helpful assistant.")),
            *history_events(prompt, shape_history(
                history, max_bytes=history_limits.total_bytes, max_message_bytes=history_limits.message_bytes,
                max_chunk_bytes=history_limits.input_bytes, drop_trailing_user=drop_trailing_user)),
            nova.audio_content_start(prompt, audio),
        ]
        return cls(prompt, audio, events)

    def audio(self, pcm: bytes) -> dict:
        return nova.audio_input(self.prompt_name, self.audio_content, pcm)

    def text_turn(self, text: str) -> list[dict]:
        """A typed user turn: an interactive USER text block (Nova 2 cross-modal input)."""
        return nova.text_block(self.prompt_name, "USER", split_chunks(text), interactive=True)

    def tool_result(self, tool_use_id: str, content: str, new_name: Callable[[], str] = nova.new_name) -> list[dict]:
        """The answer to a toolUse of this stream: a TOOL block with the result (a JSON text)."""
        name = new_name()
        return [
            nova.tool_content_start(self.prompt_name, name, tool_use_id),
            nova.tool_result(self.prompt_name, name, content),
            nova.content_end(self.prompt_name, name),
        ]

    def closing(self) -> list[dict]:
        """The service's shutdown order: audio contentEnd, promptEnd, sessionEnd."""
        return [
            nova.content_end(self.prompt_name, self.audio_content),
            nova.prompt_end(self.prompt_name),
            nova.session_end(),
        ]
