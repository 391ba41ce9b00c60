"""The Python reference client of protocol v1 (`novagate client`), also used by tests and load tools.

It behaves like a real voice client: an open microphone that sends silence between utterances,
audio in real time, a state file holding the resume token and every receipt not yet acknowledged
by `item.saved`, and a resume with both after any disconnect.

With `reconnect=True` it also survives a lost connection by itself, as the protocol asks (§5, §6):
on `session.reconnect` or close 1012 it reconnects at once (after a little jitter), on 1001, 1006,
1011, 1013 or a failed connection attempt it retries with capped exponential backoff, and each time
it resumes with the resume token and every receipt still unacknowledged. The microphone resumes on
the new connection; `finals`, `saved` and the received audio keep accumulating across
connections; every reconnect is recorded in `reconnects` (how long the client had no usable socket).
A turn whose reply was cut by a lost connection raises `TurnInterrupted` once the client is
connected again, so the caller can ask again (`turn(..., retry=n)` does it by itself).

Tool calls (the additive `tool.call` message) are collected in `tool_calls`; an ended call is a
conversation item of role `tool`, and its receipt is kept until `item.saved` like a final
transcript's. `novagate client` prints them as `[tool record_call started]`, `[tool record_call
finished 1.2 s]`, and shows the last items of a resumed conversation, tool items included. The
additive `input.speech_started` / `input.speech_stopped` messages are collected in `speech_events`.

Audio codecs (additive, docs/protocol.md#audio-codecs): `codec="opus"` or `"mulaw"` (or `input_codec` /
`output_codec` apart) negotiates them in `session.start` and checks that `session.ready.audio` confirms
them. The microphone's PCM (`say()`, at `input_rate`) is resampled to the codec's rate (Opus: 16 kHz,
or 24 kHz when that is the source's rate; mu-law: 8 kHz) and sent as one encoded 20 ms frame per binary
message; what comes back is decoded, so `audio`, `audio_by_item` and `received_ms()` are PCM16 at
`output_rate` (Opus: 24 kHz; mu-law: 8 kHz) and durations are decoded milliseconds, as
`playback.truncate` wants them (`truncate(item_id)` sends what was received of the item). `wire`
counts the bytes on the socket both ways (`WireStats`); `novagate client` prints them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import sys
import time
import wave
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import orjson
import websockets

from protocol.messages import (
    CLIENT_INPUT_RATES,
    CODEC_INPUT_RATES,
    CODEC_OUTPUT_RATES,
    CODECS,
    DEFAULT_CLIENT_INPUT_RATE,
    DEFAULT_CLIENT_OUTPUT_RATE,
)

FRAME_MS = 20

# Close codes after which a reconnecting client tries again (PROTOCOL §6): 1012 at once (the server is
# restarting or draining), the others with backoff (going away, abnormal closure, internal error, at
# capacity or draining, bad gateway). Anything else (1000 after session.end, 1009, 4xxx) is final.
RECONNECT_AT_ONCE = frozenset({1012})
RECONNECT_WITH_BACKOFF = frozenset({1001, 1006, 1011, 1013, 1014})


# -- audio codecs (docs/protocol.md#audio-codecs) -----------------------------------------------------
def codec_input_rate(codec: str, source_rate: int) -> int:
    """The sample rate of what a codec carries up: PCM16 the source's own; Opus 16 kHz (24 kHz when the
    source is at 24 kHz: no resampling); mu-law 8 kHz."""
    if codec == "pcm16":
        return source_rate
    rates = CODEC_INPUT_RATES[codec]
    if source_rate in rates:
        return source_rate
    return 16000 if 16000 in rates else rates[0]


def codec_output_rate(codec: str, requested: int | None = None) -> int:
    """The output rate to ask for: `requested`, or the codec's default (24 kHz; mu-law 8 kHz)."""
    if requested is not None:
        return requested
    rates = CODEC_OUTPUT_RATES[codec]
    return DEFAULT_CLIENT_OUTPUT_RATE if DEFAULT_CLIENT_OUTPUT_RATE in rates else rates[0]


_OPUS_SILK_MS = (10.0, 20.0, 40.0, 60.0)
_OPUS_HYBRID_MS = (10.0, 20.0)
_OPUS_CELT_MS = (2.5, 5.0, 10.0, 20.0)


def opus_packet_ms(packet: bytes) -> float:
    """The duration of one raw Opus packet, from its TOC byte (RFC 6716 §3.1), without decoding it;
    0.0 for a malformed one."""
    if not packet:
        return 0.0
    toc = packet[0]
    config, code = toc >> 3, toc & 3
    per_frame = (_OPUS_SILK_MS[config % 4] if config < 12 else _OPUS_HYBRID_MS[config % 2] if config < 16
                 else _OPUS_CELT_MS[config % 4])
    if code == 0:
        frames = 1
    elif code in (1, 2):
        frames = 2
    else:
        if len(packet) < 2:
            return 0.0
        frames = packet[1] & 0x3F
    return per_frame * frames


def ws_frame_bytes(payload: int, *, masked: bool) -> int:
    """One WebSocket frame on the wire: its header (2, 4 or 10 bytes, plus the 4-byte mask of a
    client's frame) and the payload (RFC 6455 §5.2; no extension)."""
    header = 2 if payload < 126 else 4 if payload < 65536 else 10
    return header + (4 if masked else 0) + payload


class AudioEncoder:
    """PCM16 frames (20 ms at `rate`) to what the codec sends: one binary message per frame. PCM16 is
    passed through; Opus and mu-law use the gateway's own PyAV codecs (gateway/codecs.py). One encoder
    per connection: Opus keeps state between frames."""

    def __init__(self, codec: str, rate: int):
        self.codec = codec
        self.rate = rate
        self._encode: Callable[[bytes], bytes] | None = None
        if codec != "pcm16":
            from . import codecs

            self._encode = codecs.encoder(codec, rate)

    def __call__(self, pcm: bytes) -> bytes:
        return pcm if self._encode is None else self._encode(pcm)


class AudioDecoder:
    """What the gateway sends, one binary message at a time, to PCM16 at `rate`. Opus decodes at 48 kHz
    (FFmpeg's decoders always do) and is brought to `rate` by keeping every (48000 / rate)-th sample:
    an Opus stream encoded at `rate` holds nothing above rate / 2, so nothing aliases and every packet
    stays exactly its own duration (no resampler delay smearing item boundaries). Raises ValueError on
    a frame that does not decode."""

    def __init__(self, codec: str, rate: int):
        self.codec = codec
        self.rate = rate
        self._decode: Callable[[bytes], bytes] | None = None
        self._step = 1
        if codec != "pcm16":
            from . import codecs

            self._decode, decoded_rate = codecs.decoder(codec)
            if decoded_rate % rate:
                raise ValueError(f"cannot bring {codec} decoded at {decoded_rate} Hz to {rate} Hz")
            self._step = decoded_rate // rate

    def __call__(self, frame: bytes) -> bytes:
        if self._decode is None:
            return frame
        pcm = self._decode(frame)
        if self._step > 1:
            import numpy as np

            pcm = np.frombuffer(pcm, "<i2")[:: self._step].tobytes()
        return pcm


def resample(pcm: bytes, rate: int, to: int) -> bytes:
    """PCM16LE mono from `rate` to `to` (soxr, anti-aliased); as is when the rates are equal."""
    if rate == to or not pcm:
        return pcm
    import numpy as np
    import soxr

    x = np.frombuffer(pcm[: len(pcm) // 2 * 2], "<i2")
    return soxr.resample(x, rate, to).astype("<i2").tobytes()


@dataclass
class WireStats:
    """What crossed the socket, over every connection. `audio_*`: the payloads of binary (audio) frames,
    as encoded; `text_*`: the JSON messages; `ws_*`: every frame with its WebSocket header (a client's
    frames also carry a 4-byte mask). TCP/IP and TLS add about 60–90 bytes per packet on top
    (docs/mobile.md#data-rates). `ms_*`: the decoded duration of the audio each way."""

    audio_up: int = 0
    audio_down: int = 0
    frames_up: int = 0
    frames_down: int = 0
    speech_up: int = 0          # the part of audio_up that carried say()'s speech (the rest: the open mic's silence)
    speech_frames_up: int = 0
    text_up: int = 0
    text_down: int = 0
    ws_up: int = 0
    ws_down: int = 0
    ms_up: float = 0.0
    ms_down: float = 0.0
    bad_frames_down: int = 0    # received audio that did not decode (dropped)

    @staticmethod
    def kbit_s(nbytes: int, ms: float) -> float | None:
        """kbit/s of `nbytes` spread over `ms` milliseconds (bits per millisecond)."""
        return nbytes * 8 / ms if ms > 0 else None

    @property
    def up_kbit_s(self) -> float | None:
        """Audio up, per second of audio sent (the microphone is always on: per second connected)."""
        return self.kbit_s(self.audio_up, self.ms_up)

    @property
    def down_kbit_s(self) -> float | None:
        """Audio down, per second of audio received (while the assistant speaks)."""
        return self.kbit_s(self.audio_down, self.ms_down)

    def summary(self, input_codec: str, input_rate: int, output_codec: str, output_rate: int) -> str:
        """One line for `novagate client`."""
        def side(nbytes: int, ms: float, codec: str, rate: int) -> str:
            rate_s = self.kbit_s(nbytes, ms)
            return (f"{nbytes / 1000:.1f} kB for {ms / 1000:.1f} s of {codec} {rate / 1000:g} kHz"
                    + (f" = {rate_s:.1f} kbit/s" if rate_s is not None else ""))

        return (f"wire: up {side(self.audio_up, self.ms_up, input_codec, input_rate)}; down "
                f"{side(self.audio_down, self.ms_down, output_codec, output_rate)}; messages "
                f"{self.text_up / 1000:.1f} kB up, {self.text_down / 1000:.1f} kB down; with WebSocket framing "
                f"{self.ws_up / 1000:.1f} kB up, {self.ws_down / 1000:.1f} kB down")


class CodecNotConfirmed(ConnectionError):
    """session.ready did not confirm the codecs or rates asked for (a gateway without codec support
    ignores the fields and would send PCM16): the connection is closed, and this is final."""


@dataclass
class Reconnect:
    """One recovered connection loss (monotonic clock, seconds)."""

    reason: str                  # "draining" (a session.reconnect notice) or "close <code>"
    close_code: int              # how the lost socket closed (1006: no close frame)
    lost_at: float               # the socket was gone (closed by the server, the network or us)
    ready_at: float              # session.ready on the new connection
    attempts: int                # connection attempts it took (1: the first one worked)
    resumed: bool                # session.ready.resumed on the new connection
    notice_at: float | None = None      # when session.reconnect arrived, if it did
    failed_codes: list = field(default_factory=list)  # why the attempts before the last one failed

    @property
    def duration(self) -> float:
        """From losing the socket to the next session.ready."""
        return self.ready_at - self.lost_at

    @property
    def since_notice(self) -> float | None:
        """From the session.reconnect notice to the next session.ready."""
        return None if self.notice_at is None else self.ready_at - self.notice_at


class TurnInterrupted(ConnectionError):
    """The connection was lost before the reply to a turn had finished; raised once the client is
    connected again (a new conversation stream, with the history so far), so the turn can be asked
    again. `user_heard`: a final user transcript arrived for it, so the user's words are in the
    history (stored, or held as a receipt that the resume stores). `assistant`: the reply's final
    items that did arrive (each one stored or held as a receipt too)."""

    def __init__(self, user: list[dict], assistant: list[dict], close_code: int | None):
        self.user = user
        self.assistant = assistant
        self.close_code = close_code
        super().__init__(f"connection lost during the turn (close {close_code}); "
                         f"{'the user turn was heard' if user else 'the user turn was not heard'}, "
                         f"{len(assistant)} reply item(s) arrived")

    @property
    def user_heard(self) -> bool:
        return bool(self.user)


def _describe(e: BaseException) -> str:
    if isinstance(e, _AttemptFailed):
        return f"close {e.code}"
    if isinstance(e, websockets.InvalidStatus):
        return f"HTTP {e.response.status_code}"
    if isinstance(e, ConnectionRefusedError):
        return "refused"
    return type(e).__name__


class _AttemptFailed(Exception):
    def __init__(self, code: int, detail: str = "", retry_after_ms: float | None = None):
        super().__init__(f"{code} {detail}".strip())
        self.code = code
        self.retry_after_ms = retry_after_ms  # the server's hint (an overloaded refusal), if it gave one


@dataclass
class ClientState:
    """What survives a disconnect: kept in a JSON file, written atomically after every change."""

    path: str | None = None
    resume_token: str | None = None
    conversation_id: str | None = None
    pending: dict[str, str] = field(default_factory=dict)  # item_id -> receipt

    @classmethod
    def load(cls, path: str | None) -> ClientState:
        if path and os.path.exists(path):
            d = orjson.loads(Path(path).read_bytes())
            return cls(path, d.get("resume_token"), d.get("conversation_id"), dict(d.get("pending", {})))
        return cls(path)

    def save(self) -> None:
        if not self.path:
            return
        tmp = self.path + ".tmp"
        Path(tmp).write_bytes(orjson.dumps({
            "resume_token": self.resume_token, "conversation_id": self.conversation_id, "pending": self.pending,
        }))
        os.replace(tmp, self.path)


class VoiceClient:
    def __init__(
        self,
        url: str,
        *,
        state: ClientState | None = None,
        token: str | None = None,
        auth: str | None = None,
        input_rate: int = DEFAULT_CLIENT_INPUT_RATE,
        output_rate: int | None = None,
        voice: str | None = None,
        codec: str = "pcm16",
        input_codec: str | None = None,
        output_codec: str | None = None,
        wire_input_rate: int | None = None,
        conversation_id: str | None = None,
        resume: bool = True,
        on_message: Callable[[dict], None] | None = None,
        reconnect: bool = False,
        reconnect_timeout: float = 60.0,
        backoff_initial: float = 0.1,
        backoff_max: float = 2.0,
        drain_wait: float = 1.0,
        rng: random.Random | None = None,
    ):
        self.url = url
        self.state = state or ClientState()
        self.token = token
        self.auth = auth
        # codecs: `input_rate` is the rate of the PCM given to say() (the microphone's, the WAV's);
        # `wire_input_rate` the rate declared and sent (the codec's); `output_rate` that of what comes back
        self.input_codec = input_codec or codec
        self.output_codec = output_codec or codec
        for c in (self.input_codec, self.output_codec):
            if c not in CODECS:
                raise ValueError(f"codec {c!r}: one of {', '.join(CODECS)}")
        self.input_rate = input_rate
        self.wire_input_rate = wire_input_rate or codec_input_rate(self.input_codec, input_rate)
        self.output_rate = codec_output_rate(self.output_codec, output_rate)
        if self.input_codec != "pcm16" and self.wire_input_rate not in CODEC_INPUT_RATES[self.input_codec]:
            rates = " or ".join(map(str, CODEC_INPUT_RATES[self.input_codec]))
            raise ValueError(f"{self.input_codec} is sent at {rates} Hz, not {self.wire_input_rate}")
        if self.output_codec != "pcm16" and self.output_rate not in CODEC_OUTPUT_RATES[self.output_codec]:
            rates = " or ".join(map(str, CODEC_OUTPUT_RATES[self.output_codec]))
            raise ValueError(f"{self.output_codec} comes at {rates} Hz, not {self.output_rate}")
        self.wire = WireStats()
        self.frame_ms_down: Counter[float] = Counter()  # decoded duration of each binary frame received, ms
        self._encoder = AudioEncoder(self.input_codec, self.wire_input_rate)
        self._decoder = AudioDecoder(self.output_codec, self.output_rate)
        self.voice = voice
        self.raw_conversation_id = conversation_id
        self.resume = resume
        self.on_message = on_message
        self.ws: Any = None
        self.ready: dict = {}
        self.messages: list[dict] = []
        self.audio = bytearray()  # every reply's audio, decoded: PCM16 at output_rate
        self.audio_sent = 0  # bytes of microphone audio handed to the socket (every connection), as encoded
        self.audio_by_item: dict[str, bytearray] = {}  # decoded too
        self.audio_span: dict[str, list[float]] = {}  # item -> [first, last] arrival of its frames (monotonic)
        self.audio_end: dict[str, str] = {}
        self.finals: list[dict] = []
        self.tool_calls: list[dict] = []  # every tool.call message (started, then how it ended), in order
        self.speech_events: list[dict] = []  # every input.speech_started / input.speech_stopped, in order
        self.saved: set[str] = set()
        self.close_code: int | None = None  # set when the client is closed for good
        self._current_item: str | None = None
        self._speech: asyncio.Queue[bytes] = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []
        self._changed = asyncio.Event()
        self.speed = 1.0
        # -- reconnecting mode
        self.reconnect = reconnect
        self.reconnect_timeout = reconnect_timeout  # give up after this long without a connection
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.drain_wait = drain_wait  # after session.reconnect: how long to let the server close first
        self.rng = rng or random.Random()
        self.readies: list[dict] = []          # every session.ready, one per connection
        self.reconnects: list[Reconnect] = []  # every recovered connection loss
        self.closes: list[int] = []            # close code of every connection that ended
        self.failed_attempts: list[int] = []   # why connection attempts failed (1006: refused/reset/HTTP error)
        self.failure_reasons: list[str] = []   # the same, in words ("close 1013", "HTTP 502", "refused")
        self.turns_interrupted = 0
        self.generation = 0                    # connections that reached session.ready
        self._connected = asyncio.Event()
        self._notice: dict | None = None       # session.reconnect on the current connection
        self._notice_at: float | None = None
        self._notice_event = asyncio.Event()
        self._reader_task: asyncio.Task | None = None
        self._mic_on = False
        self._ending = False
        self._closing = False
        self._lost_at = 0.0
        self._attempts = 0
        self._failed_now: list[int] = []

    # -- connection ------------------------------------------------------------------------------
    async def connect(self, *, mic: bool = True) -> dict:
        self.close_code = None
        self._closing = False
        if self.reconnect:
            ready = await self._connect_with_retries(first=True)
            self._tasks.append(asyncio.create_task(self._supervise()))
        else:
            ready = await self._open()
        if mic and not self._mic_on:
            self._mic_on = True
            self._tasks.append(asyncio.create_task(self._mic()))
        return ready

    async def _open(self) -> dict:
        """One connection: upgrade, session.start (resume token + unsaved receipts), session.ready."""
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        ws = await websockets.connect(self.url, subprotocols=["novagate.v1"], additional_headers=headers,
                                      max_size=2**20, open_timeout=10)
        self.ws = ws
        self._notice, self._notice_at = None, None
        self._notice_event.clear()
        self._current_item = None
        self._encoder = AudioEncoder(self.input_codec, self.wire_input_rate)  # codec state: per connection
        self._decoder = AudioDecoder(self.output_codec, self.output_rate)
        audio: dict[str, Any] = {"input_sample_rate": self.wire_input_rate, "output_sample_rate": self.output_rate}
        if self.input_codec != "pcm16" or self.output_codec != "pcm16":
            audio |= {"input_codec": self.input_codec, "output_codec": self.output_codec}
        start: dict[str, Any] = {"type": "session.start", "protocol": 1, "audio": audio}
        if self.auth:
            start["auth"] = self.auth
        if self.voice:
            start["voice"] = self.voice
        if self.resume and self.state.resume_token:
            start["resume"] = self.state.resume_token
        if self.raw_conversation_id and not (self.resume and self.state.resume_token):
            start["conversation_id"] = self.raw_conversation_id
        if self.state.pending:
            start["pending"] = list(self.state.pending.values())[:100]
        first = len(self.messages)

        def ready() -> dict | None:
            return next((x for x in self.messages[first:] if x.get("type") == "session.ready"), None)

        reader = asyncio.create_task(self._reader(ws))
        self._reader_task = reader
        self._tasks.append(reader)
        try:
            await self._send_text(ws, orjson.dumps(start).decode())
            if self.reconnect:
                deadline = time.monotonic() + 30
                while not ready():
                    if reader.done():
                        hint = next((x.get("retry_after_ms") for x in reversed(self.messages[first:])
                                     if x.get("type") == "error" and "retry_after_ms" in x), None)
                        raise _AttemptFailed(int(ws.close_code or 1006), "closed before session.ready", hint)
                    if time.monotonic() > deadline:
                        raise _AttemptFailed(1006, "no session.ready in 30 s")
                    self._changed.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._changed.wait(), deadline - time.monotonic())
                msg = ready()
            else:
                msg = await self.wait_for(ready, timeout=30)
            self._check_audio(msg)
        except BaseException:
            with contextlib.suppress(Exception):
                await ws.close()
            raise
        self.ready = msg
        self.readies.append(msg)
        self.generation += 1
        self.state.resume_token = msg["resume_token"]
        self.state.conversation_id = msg["conversation_id"]
        self.state.save()
        self._connected.set()
        self._changed.set()
        return msg

    def _check_audio(self, ready: dict) -> None:
        """session.ready.audio must confirm what was asked: the rates, and the codecs (a gateway that
        does not know them leaves them out, and would send PCM16 whatever we said)."""
        audio = ready.get("audio") or {}
        want = {"input_sample_rate": self.wire_input_rate, "output_sample_rate": self.output_rate,
                "input_codec": self.input_codec, "output_codec": self.output_codec}
        got = {k: audio.get(k, "pcm16" if k.endswith("codec") else None) for k in want}
        if self.input_codec == "pcm16" and self.output_codec == "pcm16":  # v1: the rates only
            want = {k: v for k, v in want.items() if k in audio}
            got = {k: v for k, v in got.items() if k in audio}
        if got != want:
            raise CodecNotConfirmed(f"session.ready.audio is {audio}, not {want}")

    def _backoff(self, attempt: int) -> float:
        """Capped exponential backoff with jitter (half fixed, half random)."""
        cap = min(self.backoff_max, self.backoff_initial * 2 ** attempt)
        return cap / 2 + self.rng.uniform(0, cap / 2)

    def _jitter(self, notice: dict | None) -> float:
        """Reconnect "at once": after the notice's retry_after_ms (the server spreads its clients;
        capped at 5 s) plus up to 50 ms, or within 100 ms when there was no notice (a bare 1012)."""
        after = notice.get("retry_after_ms") if notice else None
        if isinstance(after, (int, float)) and not isinstance(after, bool):
            return min(max(after, 0), 5000) / 1000 + self.rng.uniform(0, 0.05)
        return self.rng.uniform(0, 0.1)

    async def _connect_with_retries(self, *, first: bool, delay: float = 0.0) -> dict:
        """Connect (first time or again) until it works, the failure is final, or reconnect_timeout."""
        deadline = time.monotonic() + self.reconnect_timeout
        attempt = 0
        failed: list[int] = []
        while True:
            if delay:
                await asyncio.sleep(delay)
            try:
                ready = await self._open()
                self._attempts, self._failed_now = attempt + 1, failed
                return ready
            except (_AttemptFailed, OSError, TimeoutError, websockets.InvalidHandshake,
                    websockets.ConnectionClosed) as e:
                code = e.code if isinstance(e, _AttemptFailed) else 1006
                failed.append(code)
                self.failed_attempts.append(code)
                self.failure_reasons.append(_describe(e))
                if code not in RECONNECT_AT_ONCE | RECONNECT_WITH_BACKOFF:
                    raise ConnectionError(f"connection refused for good ({code})") from e
                delay = self._backoff(attempt)
                hint = getattr(e, "retry_after_ms", None)
                if isinstance(hint, (int, float)) and not isinstance(hint, bool) and hint > 0:
                    delay = max(delay, min(hint, 60_000) / 1000 + self.rng.uniform(0, delay))  # not before it
                if time.monotonic() + delay > deadline:
                    raise ConnectionError(f"could not {'connect' if first else 'reconnect'} within "
                                          f"{self.reconnect_timeout:.0f} s (last: {e!r})") from e
                attempt += 1

    async def _supervise(self) -> None:
        """Reconnecting mode: watch the connection; when it goes, resume on a new one."""
        while True:
            reader, ws = self._reader_task, self.ws
            notice_wait = asyncio.create_task(self._notice_event.wait())
            try:
                await asyncio.wait({reader, notice_wait}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                notice_wait.cancel()
            if not reader.done():  # session.reconnect: let the server close (it flushes first), briefly
                self._changed.set()
                done, _ = await asyncio.wait({reader}, timeout=self.drain_wait)
                if not done:
                    with contextlib.suppress(Exception):
                        await ws.close(1001, "reconnecting")
                    await asyncio.wait({reader}, timeout=2)
            code = int(ws.close_code or 1006)
            lost_at = self._lost_at or time.monotonic()
            notice, notice_at = self._notice, self._notice_at
            self._connected.clear()
            self._current_item = None
            self._drop_speech()  # an utterance cut by the network is not continued on the next stream
            self.closes.append(code)
            if self._closing:
                return
            final = (code not in RECONNECT_AT_ONCE | RECONNECT_WITH_BACKOFF and notice is None) or self._ending
            if final:
                self.close_code = code
                self._changed.set()
                return
            self._changed.set()
            at_once = notice is not None or code in RECONNECT_AT_ONCE
            delay = self._jitter(notice) if at_once else self._backoff(0)
            try:
                ready = await self._connect_with_retries(first=False, delay=delay)
            except ConnectionError:
                self.close_code = code
                self._changed.set()
                return
            self.reconnects.append(Reconnect(
                reason="draining" if notice is not None and notice.get("reason") == "draining"
                else (f"notice {notice.get('reason')}" if notice is not None else f"close {code}"),
                close_code=code, lost_at=lost_at, ready_at=time.monotonic(), attempts=self._attempts,
                resumed=bool(ready.get("resumed")), notice_at=notice_at, failed_codes=self._failed_now))

    async def wait_connected(self, timeout: float = 60.0) -> None:
        """Until a connection is up and not being drained (reconnecting mode)."""
        await self.wait_for(lambda: self._connected.is_set() and self._notice is None, timeout)

    @property
    def connected(self) -> bool:
        return self._connected.is_set() and self._notice is None

    def _drop_speech(self) -> None:
        while not self._speech.empty():
            self._speech.get_nowait()

    async def close(self) -> None:
        self._closing = True
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(BaseException):
                await t
        self._tasks.clear()
        self._mic_on = False
        self._connected.clear()
        if self.ws is not None:
            with contextlib.suppress(Exception):
                await self.ws.close()

    async def __aenter__(self) -> VoiceClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # -- sending ---------------------------------------------------------------------------------
    async def say(self, pcm: bytes) -> None:
        """Queue speech (PCM16 at `input_rate`) for the microphone; returns when it has all been sent
        (or, reconnecting, when the connection was lost: the rest of the utterance is dropped, not
        continued). It goes out at `wire_input_rate`, resampled if need be, in the input codec."""
        pcm = resample(pcm, self.input_rate, self.wire_input_rate)
        frame = self.wire_input_rate * 2 * FRAME_MS // 1000
        for i in range(0, len(pcm), frame):
            self._speech.put_nowait(pcm[i : i + frame])
        while not self._speech.empty():
            await asyncio.sleep(FRAME_MS / 1000)

    async def _mic(self) -> None:
        """An open microphone: speech when there is some, silence otherwise, in real time. When
        reconnecting it pauses while there is no usable connection and starts again on the new one.
        Each 20 ms frame is one binary message, encoded in the input codec."""
        frame = self.wire_input_rate * 2 * FRAME_MS // 1000
        silence = bytes(frame)
        period = FRAME_MS / 1000 / self.speed
        next_at = time.monotonic()
        while True:
            if self.reconnect and not self.connected:
                await self.wait_for(lambda: self.connected or self.close_code is not None, timeout=3600)
                next_at = time.monotonic()  # no catch-up burst after a gap
            try:
                data = self._speech.get_nowait()
                spoken = True
            except asyncio.QueueEmpty:
                data, spoken = silence, False
            if len(data) < frame:
                data = data + bytes(frame - len(data))
            payload = self._encoder(data)
            try:
                if payload:
                    await self.ws.send(payload)
                    self._count_up(payload, spoken)
            except websockets.ConnectionClosed:
                if not self.reconnect:
                    raise
            next_at += period
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    def _count_up(self, payload: bytes, spoken: bool) -> None:
        w = self.wire
        self.audio_sent += len(payload)
        w.audio_up += len(payload)
        w.frames_up += 1
        w.ms_up += FRAME_MS
        w.ws_up += ws_frame_bytes(len(payload), masked=True)
        if spoken:
            w.speech_up += len(payload)
            w.speech_frames_up += 1

    async def _send_text(self, ws, text: str) -> None:
        await ws.send(text)
        n = len(text.encode())
        self.wire.text_up += n
        self.wire.ws_up += ws_frame_bytes(n, masked=True)

    async def send_text(self, text: str) -> None:
        await self.send({"type": "input.text", "text": text})

    async def send(self, message: dict) -> None:
        if self.reconnect and not self.connected:
            await self.wait_connected()
        await self._send_text(self.ws, orjson.dumps(message).decode())

    async def truncate(self, item_id: str, played_ms: int | None = None) -> int:
        """`playback.truncate` for an interrupted item: `played_ms` (default: all of its audio received so
        far, in decoded milliseconds — this client plays what it receives). Returns the value sent."""
        played = self.received_ms(item_id) if played_ms is None else played_ms
        await self.send({"type": "playback.truncate", "item_id": item_id, "played_ms": played})
        return played

    def received_ms(self, item_id: str) -> int:
        """Milliseconds of an item's audio received so far, decoded (whatever the output codec)."""
        return len(self.audio_by_item.get(item_id, b"")) * 1000 // (2 * self.output_rate)

    async def end(self) -> None:
        """End the conversation for good (its resume token stops working)."""
        self._ending = True
        await self.send({"type": "session.end"})
        await self.wait_for(lambda: self._first("session.ended"), timeout=10)
        self.state.resume_token = None
        self.state.pending.clear()
        self.state.save()

    # -- receiving -------------------------------------------------------------------------------
    async def _reader(self, ws) -> None:
        try:
            async for data in ws:
                if isinstance(data, bytes):
                    w = self.wire
                    w.audio_down += len(data)
                    w.frames_down += 1
                    w.ws_down += ws_frame_bytes(len(data), masked=False)
                    try:
                        pcm = self._decoder(data)
                    except ValueError:
                        w.bad_frames_down += 1
                        continue
                    ms = len(pcm) * 1000 / (2 * self.output_rate)
                    w.ms_down += ms
                    self.frame_ms_down[round(ms, 3)] += 1
                    self.audio += pcm
                    if self._current_item:
                        self.audio_by_item.setdefault(self._current_item, bytearray()).extend(pcm)
                        self.audio_span.setdefault(self._current_item, [time.monotonic(), 0.0])[1] = time.monotonic()
                    self._changed.set()  # wait_for() predicates may be about the audio received
                    continue
                n = len(data.encode()) if isinstance(data, str) else len(data)
                self.wire.text_down += n
                self.wire.ws_down += ws_frame_bytes(n, masked=False)
                msg = orjson.loads(data)
                self._handle(msg)
        except websockets.ConnectionClosed:
            pass
        finally:
            self._lost_at = time.monotonic()
            if not self.reconnect:
                self.close_code = ws.close_code or 1006
            self._changed.set()

    def _handle(self, msg: dict) -> None:
        self.messages.append(msg)
        t = msg.get("type")
        if t == "response.audio.start":
            self._current_item = msg["item_id"]
        elif t == "response.audio.end":
            self.audio_end[msg["item_id"]] = msg["reason"]
        elif t == "interrupted":
            self._current_item = None
        elif t == "transcript" and msg.get("final"):
            self.finals.append(msg)
            if msg.get("receipt"):
                self.state.pending[msg["item_id"]] = msg["receipt"]
                self.state.save()
        elif t == "tool.call":  # additive: a tool the model called; once ended, an item of role "tool"
            self.tool_calls.append(msg)
            if msg.get("status") != "started" and msg.get("item_id") and msg.get("receipt"):
                self.state.pending[msg["item_id"]] = msg["receipt"]
                self.state.save()
        elif t in ("input.speech_started", "input.speech_stopped"):  # additive: who heard the user speak
            self.speech_events.append(msg)
        elif t == "session.updated":  # the conversation moved (additive message)
            self.state.resume_token = msg["resume_token"]
            self.state.conversation_id = msg["conversation_id"]
            self.state.save()
        elif t == "item.saved":
            self.saved.add(msg["item_id"])
            if self.state.pending.pop(msg["item_id"], None) is not None:
                self.state.save()
        elif t == "session.reconnect":
            self._notice, self._notice_at = msg, time.monotonic()
            self._notice_event.set()
        if self.on_message:
            self.on_message(msg)
        self._changed.set()

    def _first(self, type_: str) -> dict | None:
        return next((x for x in self.messages if x.get("type") == type_), None)

    async def wait_for(self, predicate: Callable[[], Any], timeout: float = 30.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if self.close_code is not None:
                raise ConnectionError(f"connection closed ({self.close_code}) while waiting")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("timed out waiting for the server")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    def finals_of(self, role: str) -> list[dict]:
        return [f for f in self.finals if f["role"] == role]

    async def turn(self, pcm: bytes | None = None, *, text: str | None = None, timeout: float = 60.0,
                   retry: int = 0) -> dict:
        """One user turn (speech or typed text); returns when the assistant's reply has finished
        playing and been saved: {"user": str, "assistant": str, "attempts": int, "reconnects": int}.

        The reply is made of the assistant items the client first hears of after the turn is sent:
        a turn spoken or typed over an earlier reply interrupts it, and that reply's final (cut)
        transcript, which arrives later, belongs to the earlier turn, not to this one.

        Reconnecting mode: a reply that finished before the connection went is still waited for
        (its items are saved through the receipts the resume hands back). A reply cut by a lost
        connection raises `TurnInterrupted` once connected again, unless `retry` allows asking again
        (the turn is then sent again on the new connection: a new user item)."""
        attempts = 0
        reconnects_before = len(self.reconnects)
        while True:
            attempts += 1
            try:
                result = await self._turn_once(pcm, text, timeout)
            except TurnInterrupted:
                self.turns_interrupted += 1
                if attempts > retry:
                    raise
                continue
            result["attempts"] = attempts
            result["reconnects"] = len(self.reconnects) - reconnects_before
            return result

    async def _turn_once(self, pcm: bytes | None, text: str | None, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        if self.reconnect:
            await self.wait_connected(timeout)
        generation = self.generation
        n_user, n_asst = len(self.finals_of("user")), len(self.finals_of("assistant"))
        earlier = self._assistant_items()  # replies already under way: not this turn's
        try:
            if text is not None:
                await self.send_text(text)
            else:
                await self.say(pcm)
        except websockets.ConnectionClosed:
            if not self.reconnect:
                raise

        def reply() -> list[dict]:
            return [a for a in self.finals_of("assistant")[n_asst:] if a["item_id"] not in earlier]

        def ended() -> list[dict]:
            return [a for a in reply() if self.audio_end.get(a["item_id"]) in ("end_turn", "interrupted")]

        def done():
            asst = reply()
            if ended() and all(a["item_id"] in self.saved for a in asst):
                return True
            # Connected again after a loss: a reply that had finished is saved from its receipts (wait
            # on); one that had not is lost, and so is everything when the conversation did not resume.
            if (self.reconnect and self.generation != generation and self.connected
                    and (not ended() or not self.ready.get("resumed"))):
                raise TurnInterrupted(self.finals_of("user")[n_user:], asst, self.closes[-1] if self.closes else None)
            return False

        await self.wait_for(done, max(0.0, deadline - time.monotonic()))
        users = self.finals_of("user")[n_user:]
        return {
            "user": " ".join(u["text"] for u in users),
            "assistant": " ".join(a["text"] for a in reply()),
        }

    def _assistant_items(self) -> set[str]:
        """Every assistant item the server has mentioned so far (planned, playing or final)."""
        return {x["item_id"] for x in self.messages
                if (x.get("type") == "transcript" and x.get("role") == "assistant")
                or x.get("type") == "response.audio.start"}


# -- showing a conversation -------------------------------------------------------------------------
TOOL_STATUS_WORDS = {"timed_out": "timed out"}
HISTORY_SHOWN = 10  # `novagate client` shows the last few items of a resumed conversation


def format_duration(ms: Any) -> str:
    """`340 ms`, `1.2 s`; empty when unknown."""
    if isinstance(ms, bool) or not isinstance(ms, (int, float)) or ms < 0:
        return ""
    return f"{ms:.0f} ms" if ms < 1000 else f"{ms / 1000:.1f} s"


def _json_short(value: Any, limit: int = 200) -> str:
    text = orjson.dumps(value).decode()
    return text if len(text) <= limit else text[: limit - 1] + "…"


def tool_line(call: dict) -> str:
    """One line for a tool call (a tool.call message or the record of a history item of role tool):
    `[tool record_call started]`, `[tool record_call finished 1.2 s]`."""
    name = call.get("name") if isinstance(call.get("name"), str) and call.get("name") else "?"
    status = call.get("status")
    words = TOOL_STATUS_WORDS.get(status, status) if isinstance(status, str) and status else "?"
    duration = "" if status == "started" else format_duration(call.get("duration_ms"))
    return f"[tool {name} {words}{' ' + duration if duration else ''}]"


def tool_record(item: dict) -> dict | None:
    """The JSON record a history item of role `tool` holds as its text ({call_id, name, arguments, status,
    duration_ms, result}), or None when its text is not one."""
    try:
        record = orjson.loads(item.get("text") or "")
    except orjson.JSONDecodeError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("name"), str) else None


def history_line(item: dict) -> str:
    """One line for an item of session.ready.history: `     user: text`, `[tool name finished 1.2 s]`."""
    if item.get("role") == "tool":
        record = tool_record(item)
        return f"{'':>11}" + (tool_line(record) if record is not None else "[tool ?]")
    mark = " — interrupted" if item.get("interrupted") else ""
    return f"{item.get('role', '?'):>9}: {item.get('text', '')}{mark}"


# -- WAV helpers ------------------------------------------------------------------------------------
def read_wav(path: str) -> tuple[bytes, int]:
    with wave.open(path, "rb") as w:
        if w.getsampwidth() != 2 or w.getnchannels() != 1:
            raise ValueError(f"{path}: need 16-bit mono PCM WAV")
        return w.readframes(w.getnframes()), w.getframerate()


def write_wav(path: str, pcm: bytes, rate: int) -> None:
    with wave.open(path, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm)


async def run_cli(args) -> int:
    """`novagate client`: one turn from a WAV file or text, transcripts printed as they arrive."""
    state = ClientState.load(args.state)

    def show(msg: dict) -> None:
        t = msg.get("type")
        if t == "transcript" and (msg.get("final") or msg["role"] == "assistant"):
            tag = "" if msg.get("final") else " (planned)"
            print(f"{msg['role']:>9}{tag}: {msg['text']}", flush=True)
        elif t == "error":
            print(f"    error: {msg['code']}: {msg['message']}", file=sys.stderr, flush=True)
        elif t == "interrupted":
            print("  (interrupted)", flush=True)
        elif t == "tool.call":
            print(f"{'':>11}{tool_line(msg)}", flush=True)
            if "arguments" in msg and msg.get("status") == "started":  # only the server's public tools have them
                print(f"{'':>13}arguments: {_json_short(msg['arguments'])}", flush=True)
            if "result" in msg and msg.get("status") != "started":
                print(f"{'':>13}result: {_json_short(msg['result'])}", flush=True)

    pcm, rate = (read_wav(args.wav) if args.wav else (None, DEFAULT_CLIENT_INPUT_RATE))
    codec = getattr(args, "codec", None) or "pcm16"
    # PCM16 goes at the WAV's own rate when the protocol has it (else resampled to 16 kHz); a codec at its own
    wire_rate = None if codec != "pcm16" or rate in CLIENT_INPUT_RATES else DEFAULT_CLIENT_INPUT_RATE
    try:
        client = VoiceClient(args.url, state=state, token=args.token, input_rate=rate, wire_input_rate=wire_rate,
                             output_rate=args.output_rate, codec=codec, voice=args.voice, resume=not args.new,
                             on_message=show)
    except ValueError as e:  # e.g. --codec mulaw --output-rate 24000
        print(f"novagate client: {e}", file=sys.stderr)
        return 2
    client.speed = 1.0
    ready = await client.connect()
    resumed = "resumed" if ready["resumed"] else ("new (resume failed: not found)" if ready.get("resume_failed")
                                                  else "new")
    audio = "" if client.input_codec == client.output_codec == "pcm16" else (
        f", audio {client.input_codec} {client.wire_input_rate / 1000:g} kHz up, {client.output_codec} "
        f"{client.output_rate / 1000:g} kHz down")
    print(f"conversation {ready['conversation_id']}: {resumed}, {ready['history_length']} earlier items, "
          f"engine {ready['engine']}{audio}", flush=True)
    history = ready.get("history") or []
    if ready["resumed"] and history:
        shown = history[-HISTORY_SHOWN:]
        if ready["history_length"] > len(shown):
            print(f"  ({ready['history_length'] - len(shown)} earlier items not shown)", flush=True)
        for item in shown:
            print(history_line(item), flush=True)
        print("  ---", flush=True)
    try:
        t0 = time.monotonic()
        if args.text or pcm:
            await client.turn(pcm, text=args.text, timeout=args.timeout)
        if args.out:
            write_wav(args.out, bytes(client.audio), client.output_rate)
        secs = len(client.audio) / (2 * client.output_rate)
        print(f"done in {time.monotonic() - t0:.1f} s: {secs:.2f} s of assistant audio"
              + (f" written to {args.out} ({client.output_rate} Hz)" if args.out else "")
              + f"; {len(client.saved)} items saved, {len(state.pending)} receipts pending"
              + (f"; state in {args.state}" if args.state else ""), flush=True)
        print(client.wire.summary(client.input_codec, client.wire_input_rate, client.output_codec,
                                  client.output_rate), flush=True)
    finally:
        await client.close()
    return 0
