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
