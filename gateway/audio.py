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
    """Is the user speaking now? webrtcvad over the 16 kHz input, with a hangover so the pauses
    inside a sentence do not count as silence. Used to pick a quiet moment for a stream hand-over."""

    FRAME = 960  # 30 ms at 16 kHz

    def __init__(self, *, hangover_ms: int = 800, onset_frames: int = 3):
        import webrtcvad

        self._vad = webrtcvad.Vad(2)
        self._buf = bytearray()
        self._run = 0
        self._onset = onset_frames
        self._hangover = hangover_ms // 30
        self._quiet = self._hangover
        self.speaking = False

    def feed(self, pcm16k: bytes) -> None:
        self._buf += pcm16k
        while len(self._buf) >= self.FRAME:
            frame = bytes(self._buf[: self.FRAME])
            del self._buf[: self.FRAME]
            if self._vad.is_speech(frame, MODEL_RATE):
                self._run += 1
                self._quiet = 0
                if self._run >= self._onset:
                    self.speaking = True
            else:
                self._run = 0
                self._quiet += 1
                if self._quiet >= self._hangover:
                    self.speaking = False
