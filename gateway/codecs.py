"""Audio codecs of client frames (docs/protocol.md#audio-codecs), with PyAV (FFmpeg's libopus and G.711).

The session core (protocol/session.py) is given `decoder` and `encoder` through its `SessionEnv`:
decoding turns one client frame into PCM16 (which the session resamples to the model's 16 kHz),
encoding turns one frame of the model's PCM16 into what the client gets. Each call is one frame, so
an encoder or decoder is one codec context per connection: they keep state between frames.
"""

from __future__ import annotations

from collections.abc import Callable

import av
import numpy as np

from protocol.messages import MAX_OPUS_PACKET_BYTES

OPUS_DECODED_RATE = 48000   # FFmpeg's Opus decoders give 48 kHz whatever the encoder's rate
OPUS_BITRATE = 24000        # bit/s: speech at 24 kHz, about 60 bytes per 20 ms packet
OPUS_COMPLEXITY = "5"       # 0-10: 5 costs about 30 % less CPU than 10 for speech a listener cannot tell apart
MULAW_RATE = 8000


class _Decoder:
    def __init__(self, codec: str, rate: int, max_bytes: int):
        self._ctx = av.CodecContext.create(codec, "r")
        self._ctx.sample_rate = rate
        self._ctx.layout = "mono"
        self._max_bytes = max_bytes

    def __call__(self, frame: bytes) -> bytes:
        if not frame or len(frame) > self._max_bytes:
            raise ValueError(f"a frame is 1 to {self._max_bytes} bytes")
        try:
            frames = self._ctx.decode(av.Packet(frame))
        except av.FFmpegError as e:
            raise ValueError(str(e)) from None
        return b"".join(_s16(f) for f in frames)


class _Encoder:
    def __init__(self, codec: str, rate: int, **options):
        ctx = av.CodecContext.create(codec, "w")
        ctx.sample_rate = rate
        ctx.layout = "mono"
        ctx.format = "s16"
        if "bit_rate" in options:
            ctx.bit_rate = options.pop("bit_rate")
        ctx.options = options
        ctx.open()
        self._ctx = ctx
        self._rate = rate

    def __call__(self, pcm: bytes) -> bytes:
        frame = av.AudioFrame.from_ndarray(np.frombuffer(pcm, "<i2").reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = self._rate
        return b"".join(bytes(p) for p in self._ctx.encode(frame))


def _s16(frame: av.AudioFrame) -> bytes:
    samples = frame.to_ndarray()
    if samples.dtype != np.int16:  # a float decoder (FFmpeg's native Opus): scale to 16 bit
        samples = np.clip(samples * 32768.0, -32768, 32767).astype(np.int16)
    return samples.reshape(-1).astype("<i2", copy=False).tobytes()


def decoder(codec: str) -> tuple[Callable[[bytes], bytes], int]:
    """One connection's decoder of client frames: (frame -> PCM16, the PCM's rate)."""
    if codec == "opus":
        return _Decoder("libopus", OPUS_DECODED_RATE, MAX_OPUS_PACKET_BYTES), OPUS_DECODED_RATE
    if codec == "mulaw":
        return _Decoder("pcm_mulaw", MULAW_RATE, 32768), MULAW_RATE
    raise ValueError(f"no decoder for {codec!r}")


def encoder(codec: str, rate: int) -> Callable[[bytes], bytes]:
    """One connection's encoder: a frame of PCM16 at `rate` (20 ms for Opus) -> what the client gets."""
    if codec == "opus":
        return _Encoder("libopus", rate, bit_rate=OPUS_BITRATE, application="voip",
                        compression_level=OPUS_COMPLEXITY, frame_duration="20")
    if codec == "mulaw":
        return _Encoder("pcm_mulaw", rate)
    raise ValueError(f"no encoder for {codec!r}")
