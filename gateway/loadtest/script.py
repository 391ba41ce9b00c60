"""What one simulated user says and when: the utterance cut into 20 ms frames (encoded once, when the
user speaks a codec), the microphone's clock, and the turn plan (speech or typed, reconnect or not).
Pure: no sockets, no asyncio; times are `time.monotonic()` seconds passed in, so the asyncio client
and the Locust user share it."""

from __future__ import annotations

import dataclasses
import math
import urllib.parse
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from protocol.messages import CLIENT_INPUT_RATES, CODECS

from ..client import FRAME_MS, AudioEncoder, codec_input_rate, read_wav, resample

FRAME_S = FRAME_MS / 1000
DEFAULT_TEXT = "I met with Doctor Smith today at two pm"  # typed turns: the bundled WAV's words


def normalize_url(url: str) -> str:
    """http(s) becomes ws(s); a URL without a path gets the voice endpoint, /v1/voice."""
    parts = urllib.parse.urlsplit(url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    path = parts.path if parts.path not in ("", "/") else "/v1/voice"
    return urllib.parse.urlunsplit((scheme, parts.netloc, path, parts.query, ""))


def default_wav() -> Path:
    """The bundled utterance: 16 kHz, espeak-ng, "I met with doctor Smith today at two pm"."""
    return Path(str(resources.files("gateway.loadtest") / "data" / "speech.wav"))


@dataclass(frozen=True)
class Speech:
    """One utterance as microphone frames: PCM16LE mono at `rate`, 20 ms each (the last one padded).
    With a codec (`opus`, `mulaw`), `packets` are those frames as sent (encoded once, by one encoder,
    after a little silence) and `silence_packet` the open microphone's silence in between: a load
    generator does not pay an Opus encoder per user and frame."""

    frames: tuple[bytes, ...]
    rate: int
    last_speech: int  # index of the frame holding the end of the speech (trailing silence excluded)
    source: str
    codec: str = "pcm16"
    packets: tuple[bytes, ...] = ()
    silence_packet: bytes = b""

    @property
    def wire_frames(self) -> tuple[bytes, ...]:
        """The utterance's frames as they go on the wire."""
        return self.packets if self.codec != "pcm16" else self.frames

    @property
    def wire_silence(self) -> bytes:
        return self.silence_packet if self.codec != "pcm16" else self.silence

    @property
    def seconds(self) -> float:
        return len(self.frames) * FRAME_S

    @property
    def frame_bytes(self) -> int:
        return self.rate * 2 * FRAME_MS // 1000

    @property
    def silence(self) -> bytes:
        return bytes(self.frame_bytes)


def load_speech(path: str | Path | None = None, codec: str = "pcm16") -> Speech:
    """A 16-bit mono WAV (the bundled one without `path`). PCM16: the protocol's rates (8, 16, 24, 48 kHz)
    are sent as they are; any other rate is resampled to 16 kHz first. A codec: resampled to its rate
    (Opus 16 kHz, or 24 kHz for a 24 kHz WAV; mu-law 8 kHz) and encoded."""
    if codec not in CODECS:
        raise ValueError(f"codec {codec!r}: one of {', '.join(CODECS)}")
    source = str(path or default_wav())
    pcm, rate = read_wav(source)
    to = (rate if rate in CLIENT_INPUT_RATES else 16000) if codec == "pcm16" else codec_input_rate(codec, rate)
    pcm = resample(pcm, rate, to)
    return encode_speech(speech_from_pcm(pcm, to, source), codec)


def encode_speech(speech: Speech, codec: str) -> Speech:
    """The utterance's frames in `codec` at its rate, encoded in one stream: 200 ms of silence, the
    frames, then silence until the encoder is steady, whose packet is then the microphone's silence."""
    if codec == "pcm16":
        return dataclasses.replace(speech, codec="pcm16", packets=(), silence_packet=b"")
    enc = AudioEncoder(codec, speech.rate)
    for _ in range(10):
        enc(speech.silence)
    packets = tuple(enc(f) for f in speech.frames)
    for _ in range(10):
        silence = enc(speech.silence)
    if not all(packets) or not silence:
        raise ValueError(f"the {codec} encoder did not give one packet per 20 ms frame")
    return dataclasses.replace(speech, codec=codec, packets=packets, silence_packet=silence)


def speech_from_pcm(pcm: bytes, rate: int, source: str = "pcm") -> Speech:
    n = rate * 2 * FRAME_MS // 1000
    pcm = pcm[: len(pcm) // 2 * 2]
    if not pcm:
        raise ValueError(f"{source}: no audio")
    frames = tuple(pcm[i : i + n].ljust(n, b"\0") for i in range(0, len(pcm), n))
    return Speech(frames, rate, last_speech_frame(frames), source)


def last_speech_frame(frames: tuple[bytes, ...] | list[bytes]) -> int:
    """The last frame whose energy is speech-like: above a tenth of the loudest frame's RMS (and above
    a floor, so a silent file counts as ending at its last frame)."""
    rms = [math.sqrt(float(np.mean(np.frombuffer(f, "<i2").astype(np.float64) ** 2))) for f in frames]
    threshold = max(100.0, 0.1 * max(rms))
    loud = [i for i, r in enumerate(rms) if r >= threshold]
    return loud[-1] if loud else len(frames) - 1


class FrameClock:
    """The microphone's schedule: frame k is due at start + k * period, from the monotonic clock, so
    the stream never drifts however late one send is. A sender that fell far behind (its own loop was
    stalled) skips ahead instead of bursting more than `max_backlog` frames; `late` counts those
    occasions and `skipped` the frames not sent."""

    def __init__(self, start: float, period: float = FRAME_S, max_backlog: int = 50):
        self.start = start
        self.period = period
        self.max_backlog = max_backlog
        self.sent = 0
        self.late = 0
        self.skipped = 0
        self.max_lag = 0.0  # seconds the sender ran behind the schedule, at worst

    def due(self, now: float) -> int:
        """Frames to send now (0 or more); call `sent_one()` after each."""
        behind = int((now - self.start) / self.period) + 1 - self.sent
        if behind > 1:
            self.max_lag = max(self.max_lag, (behind - 1) * self.period)
        if behind > self.max_backlog:
            self.late += 1
            self.skipped += behind - 1
            self.sent += behind - 1
            behind = 1
        return max(0, behind)

    def sent_one(self) -> None:
        self.sent += 1

    def next_at(self) -> float:
        return self.start + self.sent * self.period


@dataclass(frozen=True)
class Plan:
    """How a user's turns go: every `text_every`-th turn is typed (0: none), a reconnect with the
    resume token once `reconnect_every` seconds have passed since the last connection (0: never, taken
    between turns), `think` seconds of silence after a reply has played before the next turn."""

    text_every: int = 0
    reconnect_every: float = 0.0
    think: float = 1.0
    turn_timeout: float = 30.0
    text: str = DEFAULT_TEXT

    def kind(self, turn_index: int) -> str:
        """`speech` or `text` for the turn numbered from 1."""
        return "text" if self.text_every > 0 and turn_index % self.text_every == 0 else "speech"

    def reconnect_due(self, connected_at: float, now: float) -> bool:
        return self.reconnect_every > 0 and now - connected_at >= self.reconnect_every
