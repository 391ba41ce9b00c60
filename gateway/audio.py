"""Input audio conversion: whatever rate the client declared, to the 16 kHz the model takes."""

from __future__ import annotations

import numpy as np
import soxr

MODEL_RATE = 16000


class InputResampler:
    """Streaming, anti-aliased (soxr) conversion of PCM16LE mono to 16 kHz; a no-op at 16 kHz."""

    def __init__(self, rate: int):
        self.rate = rate
        self._stream = None if rate == MODEL_RATE else soxr.ResampleStream(rate, MODEL_RATE, 1, dtype="int16")

    def to_model(self, pcm: bytes) -> bytes:
        if self._stream is None:
            return pcm
        out = self._stream.resample_chunk(np.frombuffer(pcm, dtype="<i2"), last=False)
        return out.astype("<i2", copy=False).tobytes()


class SpeechActivity:
    """Has the user been silent lately? webrtcvad over the 16 kHz input: any voiced 30 ms frame in
    the last `hangover_ms` counts as speaking. No onset delay on purpose: a stream hand-over must not
    fall in the first frames of an utterance, which would split it between two streams."""

    FRAME = 960  # 30 ms at 16 kHz

    def __init__(self, *, hangover_ms: int = 800):
        import webrtcvad

        self._vad = webrtcvad.Vad(2)
        self._buf = bytearray()
        self._hangover = hangover_ms // 30
        self._quiet = self._hangover

    @property
    def speaking(self) -> bool:
        return self._quiet < self._hangover

    def feed(self, pcm16k: bytes) -> None:
        self._buf += pcm16k
        while len(self._buf) >= self.FRAME:
            frame = bytes(self._buf[: self.FRAME])
            del self._buf[: self.FRAME]
            self._quiet = 0 if self._vad.is_speech(frame, MODEL_RATE) else self._quiet + 1
