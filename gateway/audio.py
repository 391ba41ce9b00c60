"""Input audio conversion: whatever rate the client declared, to the 16 kHz the model takes."""

from __future__ import annotations

import numpy as np
import soxr

from protocol.nova_events import MODEL_INPUT_RATE as MODEL_RATE


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
    """Voice activity (webrtcvad, 30 ms frames) over the 16 kHz input. It only says whether audio
    holds a voiced frame; the session decides what pauses and utterances are."""

    FRAME = 960  # 30 ms at 16 kHz

    def __init__(self):
        import webrtcvad

        self._vad = webrtcvad.Vad(2)
        self._rest = b""  # audio short of a frame, kept for the next feed

    def feed(self, pcm16k: bytes) -> bool:
        # webrtcvad reads only immutable buffers, so the audio is joined as bytes; a frame at the start
        # is read in place (`length`), which with 20 ms feeds is every frame: no slice, no deletion
        data = self._rest + pcm16k
        frame, voiced, i = self.FRAME, False, 0
        while len(data) - i >= frame:
            voiced = self._vad.is_speech(data if i == 0 else data[i : i + frame], MODEL_RATE, frame // 2) or voiced
            i += frame
        self._rest = data[i:] if i else data
        return voiced
