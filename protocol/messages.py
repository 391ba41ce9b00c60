"""Client protocol v1 messages (PROTOCOL.md §3–§4): typed values, a strict decoder, an encoder.

Decoding is the only place where untrusted client JSON becomes typed values, so every check lives
here and fails with a `ProtocolError` carrying the wire error code. Unknown fields are ignored and an
explicit JSON `null` counts as an absent optional field, so clients may add fields or send nulls.
Size limits of whole frames (close 1009) are stated here (`MAX_TEXT_MESSAGE_BYTES`,
`MAX_FRAME_BYTES`) and enforced by the connection.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any, ClassVar

import orjson

from protocol import codes
from protocol.nova_events import MODEL_OUTPUT_RATES

# Facts of client protocol v1: the one place they are stated.
CLIENT_INPUT_RATES = (8000, 16000, 24000, 48000)  # audio.input_sample_rate; the gateway resamples to the model's
CLIENT_OUTPUT_RATES = MODEL_OUTPUT_RATES  # audio.output_sample_rate; passed to the model, not resampled
DEFAULT_CLIENT_INPUT_RATE = 16000
DEFAULT_CLIENT_OUTPUT_RATE = 24000
# Additive: audio codecs (docs/protocol.md#audio-codecs). pcm16: binary frames of PCM16LE, as in v1. opus:
# one raw Opus packet (20 ms, mono; no Ogg) per binary frame. mulaw: G.711 mu-law bytes at 8 kHz.
CODECS = ("pcm16", "opus", "mulaw")
CODEC_INPUT_RATES = {"pcm16": CLIENT_INPUT_RATES, "opus": (16000, 24000), "mulaw": (8000,)}
CODEC_OUTPUT_RATES = {"pcm16": MODEL_OUTPUT_RATES, "opus": (24000,), "mulaw": (8000,)}
MAX_OPUS_PACKET_BYTES = 1500  # a 20 ms packet is at most 1275 bytes (RFC 6716)
MAX_TEXT_CHARS = 1000
MAX_PENDING = 100
MAX_TEXT_MESSAGE_BYTES = 65536
MAX_FRAME_BYTES = 32768
MAX_ITEM_ID_CHARS = 128
MAX_PING_ID_CHARS = 128
PROTOCOL_VERSION = 1

_VOICE = re.compile(r"[a-z]{2,20}")


class ProtocolError(Exception):
    """A client message that cannot be accepted; `code` is the `error` code sent back."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


# ---------------------------------------------------------------------------------------------
# Client -> server


@dataclass(frozen=True, slots=True)
class SessionStart:
    type: ClassVar[str] = "session.start"
    protocol: int = PROTOCOL_VERSION
    auth: str | None = None
    resume: str | None = None
    conversation_id: str | None = None
    input_sample_rate: int = DEFAULT_CLIENT_INPUT_RATE
    output_sample_rate: int = DEFAULT_CLIENT_OUTPUT_RATE
    voice: str | None = None
    pending: tuple[str, ...] = ()
    input_codec: str = "pcm16"
    output_codec: str = "pcm16"


@dataclass(frozen=True, slots=True)
class InputText:
    type: ClassVar[str] = "input.text"
    text: str
    item_id: str | None = None  # the user item's id (an adapter's; the native protocol lets the server choose)


@dataclass(frozen=True, slots=True)
class PlaybackTruncate:
    type: ClassVar[str] = "playback.truncate"
    item_id: str
    played_ms: int


@dataclass(frozen=True, slots=True)
class SessionEnd:
    type: ClassVar[str] = "session.end"


@dataclass(frozen=True, slots=True)
class Ping:
    type: ClassVar[str] = "ping"
    id: str | int | float | bool | None = None


ClientMessage = SessionStart | InputText | PlaybackTruncate | SessionEnd | Ping


def _invalid(message: str) -> ProtocolError:
    return ProtocolError(codes.INVALID_FIELD, message)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # JSON true must not pass as 1


def _opt_str(obj: dict, key: str) -> str | None:
    v = obj.get(key)
    if v is not None and not isinstance(v, str):
        raise _invalid(f"'{key}' must be a string")
    return v


def _codec(audio: dict, key: str) -> str:
    v = audio.get(key)
    if v is None:
        return "pcm16"
    if not isinstance(v, str):
        raise _invalid(f"'audio.{key}' must be a string")
    if v not in CODECS:
        shown = v if len(v) <= 20 else v[:20] + "…"
        raise ProtocolError(codes.UNSUPPORTED, f"'audio.{key}' must be one of {', '.join(CODECS)}; got '{shown}'")
    return v


def _rate(audio: dict, key: str, allowed: tuple[int, ...], default: int) -> int:
    v = audio.get(key)
    if v is None:
        return default
    if not _is_int(v):
        raise _invalid(f"'audio.{key}' must be an integer")
    if v not in allowed:
        raise ProtocolError(
            codes.UNSUPPORTED_SAMPLE_RATE, f"'audio.{key}' must be one of {', '.join(map(str, allowed))}; got {v}"
        )
    return v


def _session_start(obj: dict) -> SessionStart:
    protocol = obj.get("protocol")
    if protocol is not None and not (_is_int(protocol) and protocol == PROTOCOL_VERSION):
        raise _invalid(f"'protocol' must be {PROTOCOL_VERSION}")
    audio = obj.get("audio")
    if audio is None:
        audio = {}
    elif not isinstance(audio, dict):
        raise _invalid("'audio' must be an object")
    pending = obj.get("pending")
    if pending is None:
        pending = []
    elif not isinstance(pending, list) or not all(isinstance(p, str) for p in pending):
        raise _invalid("'pending' must be a list of strings")
    if len(pending) > MAX_PENDING:
        raise _invalid(f"'pending' may hold at most {MAX_PENDING} receipts; got {len(pending)}")
    voice = _opt_str(obj, "voice")
    if voice is not None and not _VOICE.fullmatch(voice):
        raise _invalid("'voice' must be 2-20 lowercase letters a-z")
    input_codec, output_codec = _codec(audio, "input_codec"), _codec(audio, "output_codec")
    inputs, outputs = CODEC_INPUT_RATES[input_codec], CODEC_OUTPUT_RATES[output_codec]
    return SessionStart(
        protocol=PROTOCOL_VERSION,
        auth=_opt_str(obj, "auth"),
        resume=_opt_str(obj, "resume"),
        conversation_id=_opt_str(obj, "conversation_id"),
        input_sample_rate=_rate(audio, "input_sample_rate", inputs, DEFAULT_CLIENT_INPUT_RATE
                                if DEFAULT_CLIENT_INPUT_RATE in inputs else inputs[0]),
        output_sample_rate=_rate(audio, "output_sample_rate", outputs, DEFAULT_CLIENT_OUTPUT_RATE
                                 if DEFAULT_CLIENT_OUTPUT_RATE in outputs else outputs[0]),
        voice=voice,
        pending=tuple(pending),
        input_codec=input_codec,
        output_codec=output_codec,
    )


def _input_text(obj: dict) -> InputText:
    text = obj.get("text")
    if not isinstance(text, str):
        raise _invalid("'text' must be a string")
    if not text.strip():
        raise _invalid("'text' must not be empty or only whitespace")
    if len(text) > MAX_TEXT_CHARS:
        raise ProtocolError(codes.TEXT_TOO_LONG, f"'text' may be at most {MAX_TEXT_CHARS} characters; got {len(text)}")
    return InputText(text)


def _playback_truncate(obj: dict) -> PlaybackTruncate:
    item_id = obj.get("item_id")
    if not isinstance(item_id, str) or not item_id or len(item_id) > MAX_ITEM_ID_CHARS:
        raise _invalid(f"'item_id' must be a non-empty string of at most {MAX_ITEM_ID_CHARS} characters")
    played_ms = obj.get("played_ms")
    if not _is_int(played_ms) or played_ms < 0:
        raise _invalid("'played_ms' must be an integer >= 0")
    return PlaybackTruncate(item_id, played_ms)


def _ping(obj: dict) -> Ping:
    id_ = obj.get("id")
    if isinstance(id_, (dict, list)):
        raise _invalid("'id' must be a JSON scalar (string, number, boolean or null)")
    if isinstance(id_, str) and len(id_) > MAX_PING_ID_CHARS:
        raise _invalid(f"'id' must be at most {MAX_PING_ID_CHARS} characters")
    return Ping(id_)


_DECODERS: dict[str, Callable[[dict], ClientMessage]] = {
    SessionStart.type: _session_start,
    InputText.type: _input_text,
    PlaybackTruncate.type: _playback_truncate,
    SessionEnd.type: lambda obj: SessionEnd(),
    Ping.type: _ping,
}


def decode_client_message(data: str | bytes) -> ClientMessage:
    """Parse and validate one client text frame. Raises ProtocolError; never anything else."""
    try:
        obj = orjson.loads(data)
    except (orjson.JSONDecodeError, TypeError) as exc:  # bad UTF-8 is a JSONDecodeError too
        raise ProtocolError(codes.INVALID_JSON, f"message is not valid UTF-8 JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise _invalid("message must be a JSON object")
    type_ = obj.get("type")
    if not isinstance(type_, str):
        raise _invalid("'type' must be a string")
    decoder = _DECODERS.get(type_)
    if decoder is None:
        shown = type_ if len(type_) <= 64 else type_[:64] + "…"
        raise ProtocolError(codes.UNKNOWN_TYPE, f"unknown message type '{shown}'")
    return decoder(obj)


# ---------------------------------------------------------------------------------------------
# Server -> client


@dataclass(frozen=True, slots=True)
class SessionReady:
    type: ClassVar[str] = "session.ready"
    protocol: int
    session_id: str
    conversation_id: str
    resume_token: str
    resumed: bool
    history: list[dict]
    history_length: int
    input_sample_rate: int
    output_sample_rate: int
    voice: str
    engine: str
    resume_failed: str | None = None
    input_codec: str = "pcm16"
    output_codec: str = "pcm16"


@dataclass(frozen=True, slots=True)
class Transcript:
    type: ClassVar[str] = "transcript"
    item_id: str
    role: str
    text: str
    final: bool
    receipt: str | None = None


@dataclass(frozen=True, slots=True)
class ResponseAudioStart:
    type: ClassVar[str] = "response.audio.start"
    item_id: str


@dataclass(frozen=True, slots=True)
class ResponseAudioEnd:
    type: ClassVar[str] = "response.audio.end"
    item_id: str
    reason: str  # end_turn | partial_turn | interrupted


@dataclass(frozen=True, slots=True)
class Interrupted:
    type: ClassVar[str] = "interrupted"
    item_id: str


@dataclass(frozen=True, slots=True)
class ItemSaved:
    type: ClassVar[str] = "item.saved"
    item_id: str


@dataclass(frozen=True, slots=True)
class SessionReconnect:
    type: ClassVar[str] = "session.reconnect"
    reason: str
    retry_after_ms: int


@dataclass(frozen=True, slots=True)
class Status:
    type: ClassVar[str] = "status"
    state: str  # listening | thinking | speaking | recovering


@dataclass(frozen=True, slots=True)
class Usage:
    type: ClassVar[str] = "usage"
    input_tokens: int
    output_tokens: int


@dataclass(frozen=True, slots=True)
class Error:
    type: ClassVar[str] = "error"
    code: str
    message: str
    fatal: bool = False


@dataclass(frozen=True, slots=True)
class SessionEnded:
    type: ClassVar[str] = "session.ended"


@dataclass(frozen=True, slots=True)
class SessionUpdated:
    """Additive (not in PROTOCOL v1): the store moved the conversation (e.g. an expired Agent Runtime
    session was continued in a new one). Keep the new resume token; the old one still resumes it."""

    type: ClassVar[str] = "session.updated"
    conversation_id: str
    resume_token: str


@dataclass(frozen=True, slots=True)
class ToolCall:
    """Additive (not in PROTOCOL v1): a tool the model called, when it starts and when it ends, so an
    app can show a spinner or play a filler sound. `arguments` and `result` only for public tools;
    once it has ended, `item_id` and `receipt` are those of the tool item kept in the history."""

    type: ClassVar[str] = "tool.call"
    call_id: str
    name: str
    status: str  # started | finished | failed | timed_out | cancelled
    duration_ms: int | None = None
    item_id: str | None = None
    receipt: str | None = None
    arguments: dict | None = None
    result: Any = None


@dataclass(frozen=True, slots=True)
class InputSpeechStarted:
    """Additive (not in PROTOCOL v1): the user started speaking, once per utterance. `source` says
    who heard it: `model` (Nova 2's userSpeechStart) or `gateway` (its own voice activity detection,
    when the model sends no such events). For an app's state display; barge-in is still `interrupted`."""

    type: ClassVar[str] = "input.speech_started"
    source: str  # model | gateway
    item_id: str | None = None  # the user item this utterance will become, if it is recognised


@dataclass(frozen=True, slots=True)
class InputSpeechStopped:
    """Additive (not in PROTOCOL v1): the utterance of the last `input.speech_started` ended."""

    type: ClassVar[str] = "input.speech_stopped"
    source: str  # model | gateway
    item_id: str | None = None


@dataclass(frozen=True, slots=True)
class Pong:
    type: ClassVar[str] = "pong"
    id: str | int | float | bool | None
    server_time: float


ServerMessage = (
    SessionReady | Transcript | ResponseAudioStart | ResponseAudioEnd | Interrupted | ItemSaved | SessionReconnect
    | Status | Usage | Error | SessionEnded | SessionUpdated | ToolCall | InputSpeechStarted | InputSpeechStopped
    | Pong
)


@cache
def _layout(cls: type) -> tuple[tuple[str, bool], ...]:
    """(field name, omit when None) per field: only optional fields (default None) are omitted, so a
    required field such as pong.id is sent even when it is null."""
    return tuple((f.name, f.default is None) for f in dataclasses.fields(cls))


def to_wire(msg: ServerMessage) -> dict:
    """The JSON object for a server message, before serialisation."""
    out: dict[str, Any] = {"type": msg.type}
    for name, optional in _layout(type(msg)):
        value = getattr(msg, name)
        if value is None and optional:
            continue
        out[name] = value
    if isinstance(msg, SessionReady):  # PROTOCOL §4 nests the rates
        out["audio"] = {
            "input_sample_rate": out.pop("input_sample_rate"),
            "output_sample_rate": out.pop("output_sample_rate"),
            "input_codec": out.pop("input_codec"),
            "output_codec": out.pop("output_codec"),
        }
    return out


def encode(msg: ServerMessage) -> bytes:
    """Serialise a server message for a text frame."""
    return orjson.dumps(to_wire(msg))


def decode_server_message(data: str | bytes) -> dict:
    """Parse a server text frame (for clients and tests); no validation."""
    return orjson.loads(data)
