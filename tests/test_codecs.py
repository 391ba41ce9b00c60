"""Audio codecs (additive to PROTOCOL v1): what session.start may ask for, the session's use of the
codec it was given (frames decoded before any rule counts them, output in whole 20 ms frames), and
gateway/codecs.py's PyAV codecs themselves."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from gateway import codecs
from protocol import codes
from protocol import messages as m
from protocol.codes import CloseCode
from protocol.playback import Audio, PlaybackPacer
from protocol.session import Session

from .session_harness import SILENCE, Harness, speech


# -- session.start ------------------------------------------------------------------------------------
def start(**audio) -> m.SessionStart:
    return m.decode_client_message(m.orjson.dumps({"type": "session.start", "audio": audio}))


def test_codecs_default_to_pcm16_and_take_their_own_rates():
    assert (start().input_codec, start().output_codec) == ("pcm16", "pcm16")
    s = start(input_codec="mulaw", output_codec="mulaw")
    assert (s.input_sample_rate, s.output_sample_rate) == (8000, 8000)  # mu-law is 8 kHz: the default
    s = start(input_codec="opus", output_codec="opus")
    assert (s.input_sample_rate, s.output_sample_rate) == (16000, 24000)
    assert start(input_codec="opus", input_sample_rate=24000).input_sample_rate == 24000


@pytest.mark.parametrize("audio, code", [
    ({"input_codec": "aac"}, codes.UNSUPPORTED),
    ({"output_codec": "OPUS"}, codes.UNSUPPORTED),
    ({"input_codec": 7}, codes.INVALID_FIELD),
    ({"input_codec": "mulaw", "input_sample_rate": 16000}, codes.UNSUPPORTED_SAMPLE_RATE),
    ({"output_codec": "opus", "output_sample_rate": 16000}, codes.UNSUPPORTED_SAMPLE_RATE),
    ({"input_codec": "opus", "input_sample_rate": 48000}, codes.UNSUPPORTED_SAMPLE_RATE),
])
def test_a_codec_the_gateway_does_not_speak_is_refused_not_replaced(audio, code):
    with pytest.raises(m.ProtocolError) as e:
        start(**audio)
    assert e.value.code == code


def test_session_ready_confirms_the_codecs():
    ready = m.SessionReady(1, "s", "c", "t", False, [], 0, 8000, 24000, "matthew", "local", None, "mulaw", "opus")
    assert m.to_wire(ready)["audio"] == {"input_sample_rate": 8000, "output_sample_rate": 24000,
                                         "input_codec": "mulaw", "output_codec": "opus"}


# -- the pacer in a codec's frames ----------------------------------------------------------------------
def test_whole_frames_join_model_events_and_pad_the_last_frame():
    pacer = PlaybackPacer(24000, lead_ms=10_000, chunk_ms=20, whole_frames=True)
    pacer.start_item("a", "start")
    for size in (700, 1500, 100):  # the model's events are any size: 2300 bytes = 2 frames + 380
        pacer.push_audio("a", bytes(size))
    pacer.end_item("a", "end")
    audio = [o.pcm for o in pacer.poll(0.0) if isinstance(o, Audio)]
    assert [len(a) for a in audio] == [960, 960, 960]  # 20 ms at 24 kHz each, the rest padded with silence


# -- the session with a codec -----------------------------------------------------------------------
class CodecHarness(Harness):
    """The harness with a stand-in codec: a client frame 'decodes' to the PCM it carries after a one-byte
    header; an encoded frame says how many PCM bytes it was made of."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.decoded: list[int] = []
        self.frames: list[bytes] = []

        def decode(frame: bytes) -> bytes:
            if frame[:1] != b"O":
                raise ValueError("not a packet")
            self.decoded.append(len(frame) - 1)
            return frame[1:]

        env = dataclasses.replace(self.s.env, decoder=lambda codec: (decode, 16000),
                                  encoder=lambda codec, rate: lambda pcm: b"E%d" % len(pcm))
        self.s = Session(self.s.cfg, env, now=0.0, session_id=self.s.session_id)

    def perform(self, e) -> None:
        from protocol.session import SendAudio

        if isinstance(e, SendAudio):
            self.frames.append(e.pcm)
        super().perform(e)

    def send_audio(self, pcm: bytes) -> None:
        self.s.receive_audio(b"O" + pcm, self.now)


def test_the_session_decodes_each_frame_and_sends_whole_encoded_frames():
    h = CodecHarness()
    ready = h.connect(audio={"input_codec": "opus", "output_codec": "opus"})
    assert (ready.input_codec, ready.output_codec) == ("opus", "opus")
    h.say(1)
    h.until(lambda: h.finals("assistant"), 5, SILENCE)
    assert h.decoded and all(n == len(SILENCE) for n in h.decoded)
    assert h.frames and set(h.frames) == {b"E960"}  # every frame: 20 ms at 24 kHz, encoded


def test_a_frame_that_does_not_decode_is_dropped_with_an_error():
    h = CodecHarness()
    h.connect(audio={"input_codec": "opus", "output_codec": "opus"})
    h.s.receive_audio(b"Xgarbage", h.now)
    h.pump()
    (err,) = h.of(m.Error)
    assert err.code == codes.INVALID_FIELD and "does not decode" in err.message and not err.fatal
    assert h.closed is None


def test_a_gateway_without_codecs_refuses_them_at_the_start():
    h = Harness()  # its SessionEnv has no decoder or encoder
    h.s.receive_text(m.orjson.dumps({"type": "session.start", "audio": {"input_codec": "opus"}}), h.now)
    h.pump()
    (err,) = h.of(m.Error)
    assert err.code == codes.UNSUPPORTED and err.fatal and h.closed == CloseCode.PROTOCOL_ERROR


# -- gateway/codecs.py (PyAV) -------------------------------------------------------------------------
def tone(rate: int, seconds: float = 1.0) -> bytes:
    t = np.arange(int(rate * seconds)) / rate
    return (np.sin(2 * np.pi * 440 * t) * 8000).astype("<i2").tobytes()


def test_opus_round_trip_in_20_ms_packets():
    encode = codecs.encoder("opus", 24000)
    decode, rate = codecs.decoder("opus")
    pcm = tone(24000)
    packets = [encode(pcm[i:i + 960]) for i in range(0, len(pcm), 960)]
    assert len(packets) == 50 and all(packets)
    assert sum(map(len, packets)) < len(pcm) / 10  # about 24 kbit/s against 384 kbit/s of PCM
    back = b"".join(decode(p) for p in packets)
    assert rate == 48000 and len(back) == len(pcm) * 2  # 48 kHz out, whatever the encoder's rate
    level = np.abs(np.frombuffer(back, "<i2")[4800:]).mean()
    assert 3000 < level < 7000  # the tone's level (mean |sin| x 8000 is about 5100)


def test_mulaw_round_trip_is_one_byte_per_sample():
    encode = codecs.encoder("mulaw", 8000)
    decode, rate = codecs.decoder("mulaw")
    pcm = tone(8000, 0.02)
    encoded = encode(pcm)
    assert rate == 8000 and len(encoded) == len(pcm) // 2
    back = np.frombuffer(decode(encoded), "<i2").astype(int)
    assert np.abs(back - np.frombuffer(pcm, "<i2")).max() < 300  # G.711's quantisation


def test_a_bad_opus_frame_is_a_value_error():
    decode, _ = codecs.decoder("opus")
    for frame in (b"", bytes(2000)):
        with pytest.raises(ValueError):
            decode(frame)


def test_a_flood_of_frames_is_closed_whether_they_decode_or_not():
    """Tiny or undecodable frames cost the gateway work that the audio rate (in seconds of audio) does not
    see: past 200 frames a second (bursts of 500) the client is closed 4429."""
    h = CodecHarness()
    h.connect(audio={"input_codec": "opus", "output_codec": "opus"})
    for i in range(2000):
        if h.closed is not None:
            break
        h.s.receive_audio(b"X", h.now + i / 10_000)  # 10,000 undecodable frames a second
        h.pump()
    assert h.closed == CloseCode.RATE_LIMITED and i < 600
