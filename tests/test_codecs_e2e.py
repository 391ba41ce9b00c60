"""Audio codecs end to end (docs/protocol.md#audio-codecs, docs/mobile.md): the same speech sent as PCM16,
Opus and mu-law through a real gateway process, on the embedded default (local engine, SQLite) and on
the AWS path (Bedrock SDKs against the Nova emulator and the Agent Runtime fake), with the reference
client encoding what it sends and decoding what it gets.

The local test engine's recogniser (pocketsphinx, a 16 kHz model) hears nothing in telephone-band
speech: PCM16 at 8 kHz gets no transcript either. So mu-law (8 kHz by definition) is held to what PCM16
at 8 kHz gets on the same gateway ("as good as PCM's"). Reply audio is compared by its loudness contour
(20 ms RMS): the engine's speech of one sentence is not the same to the sample from one session to the
next, even in PCM16."""

from __future__ import annotations

import asyncio
import math
import time

import httpx
import numpy as np
import orjson
import pytest
import websockets

from gateway.client import CodecNotConfirmed, VoiceClient

from .conftest import HELLO, MET, barge_in, speech
from .fake_voice_server import FakeVoiceServer

SPEED = 1.5  # the scripted microphone runs a little faster than real time (the limit is 2x)
LEAD_S = 0.2  # the gateway sends audio this far ahead of real time (playback_lead_ms)


def client(gw, **kw) -> VoiceClient:
    c = VoiceClient(gw.ws, **kw)
    c.speed = SPEED
    return c


async def _one_turn(c: VoiceClient, pcm: bytes) -> dict:
    async with c:
        turn = await c.turn(pcm, timeout=60)
    return turn


def _reply(c: VoiceClient) -> tuple[str, bytes]:
    """The (one) assistant item of a single-turn session: its id and its decoded audio."""
    (item_id,) = [f["item_id"] for f in c.finals_of("assistant")]
    return item_id, bytes(c.audio_by_item[item_id])


def _envelope(pcm: bytes, rate: int) -> np.ndarray:
    """Loudness contour: RMS of each 20 ms."""
    n = rate // 50
    x = np.frombuffer(pcm, "<i2").astype(np.float64)
    return np.sqrt((x[: len(x) // n * n].reshape(-1, n) ** 2).mean(axis=1))


def _alike(ref: bytes, other: bytes, rate: int, max_lag: int = 5) -> float:
    """Correlation of two replies' loudness contours, at the lag (0..max_lag frames, `other` late) that fits
    best: 1.0 is the same speech, equally loud."""
    a, b = _envelope(ref, rate), _envelope(other, rate)
    best = -1.0
    for lag in range(max_lag + 1):
        n = min(len(a), len(b) - lag)
        best = max(best, float(np.corrcoef(a[:n], b[lag : lag + n])[0, 1]))
    return best


def _db(ref: bytes, other: bytes, rate: int) -> float:
    """How much louder `other` is than `ref` on average, dB."""
    return 20 * math.log10(_envelope(other, rate).mean() / _envelope(ref, rate).mean())


async def test_pcm16_opus_and_mulaw_hear_and_speak_alike(gateway):
    # four users at once on one gateway: PCM16 and Opus (16 kHz up, 24 kHz down) say MET; PCM16 at 8 kHz and
    # mu-law say HELLO at 8 kHz (the same 16 kHz speech, resampled by the client)
    users = {
        "pcm16": client(gateway),
        "opus": client(gateway, codec="opus"),
        "pcm8k": client(gateway, wire_input_rate=8000, output_rate=8000),
        "mulaw": client(gateway, codec="mulaw"),
    }
    said = {"pcm16": MET, "opus": MET, "pcm8k": HELLO, "mulaw": HELLO}
    turns = dict(zip(users, await asyncio.gather(*(_one_turn(c, speech(said[k])) for k, c in users.items()))))
    pcm, opus, pcm8k, mulaw = users.values()

    # negotiated: session.ready.audio confirms the codecs and their rates
    assert opus.ready["audio"] == {"input_sample_rate": 16000, "output_sample_rate": 24000,
                                   "input_codec": "opus", "output_codec": "opus"}
    assert mulaw.ready["audio"] == {"input_sample_rate": 8000, "output_sample_rate": 8000,
                                    "input_codec": "mulaw", "output_codec": "mulaw"}
    assert pcm.ready["audio"]["input_codec"] == pcm.ready["audio"]["output_codec"] == "pcm16"

    # heard alike: Opus's transcript is PCM16's; mu-law's whatever PCM16 at the same 8 kHz gets
    assert turns["pcm16"]["user"].lower() == MET
    assert turns["opus"]["user"].lower() == turns["pcm16"]["user"].lower()
    assert "doctor smith" in turns["opus"]["assistant"].lower()
    assert turns["opus"]["assistant"] == turns["pcm16"]["assistant"]
    assert turns["mulaw"]["user"] == turns["pcm8k"]["user"]
    assert turns["mulaw"]["assistant"] == turns["pcm8k"]["assistant"] and turns["mulaw"]["assistant"]
    for c in users.values():  # every final item was stored
        assert {f["item_id"] for f in c.finals} <= c.saved and not c.state.pending
        assert c.wire.bad_frames_down == 0

    # spoken back in the negotiated codec: 20 ms frames that decode, a reply of more than half a second
    for c in (opus, mulaw):
        item_id, audio = _reply(c)
        assert len(audio) / (2 * c.output_rate) > 0.5
        assert set(c.frame_ms_down) == {20.0}, c.frame_ms_down
        assert c.received_ms(item_id) % 20 == 0
    assert max(pcm.frame_ms_down) == 80.0  # PCM16 comes in 80 ms frames
    # ... paced, not sent at once: a reply's frames arrive over most of its duration less the 200 ms lead
    # (the exact pacing is tests/test_playback.py's, on a fake clock: on a busy machine a stalled event loop
    # releases the frames that fell due together, which shortens the span by the stall)
    for c in users.values():
        item_id, audio = _reply(c)
        first, last = c.audio_span[item_id]
        assert last - first >= 0.5 * (c.received_ms(item_id) / 1000 - LEAD_S), (c.output_codec, last - first)
    # ... the same speech: as long as PCM16's (to a 20 ms frame), as loud, the same loudness contour
    for ref, got in ((pcm, opus), (pcm8k, mulaw)):
        (_, a), (_, b), rate = _reply(ref), _reply(got), got.output_rate
        assert abs(len(b) - len(a)) / (2 * rate) < 0.03, (got.output_codec, len(a), len(b))
        assert abs(_db(a, b, rate)) < 1.5
        assert _alike(a, b, rate) > (0.9 if got is opus else 0.98), got.output_codec

    # bytes on the wire, for the same speech: Opus up under a fifth of PCM16's; mu-law half of PCM16 at 8 kHz
    assert opus.wire.speech_frames_up == pcm.wire.speech_frames_up > 0
    assert opus.wire.speech_up < pcm.wire.speech_up / 5
    assert mulaw.wire.speech_frames_up == pcm8k.wire.speech_frames_up > 0
    assert mulaw.wire.speech_up * 2 == pcm8k.wire.speech_up == pcm8k.wire.speech_frames_up * 320
    # ... and down, per second of reply: Opus under a fifth of PCM16 at 24 kHz (384 kbit/s); mu-law 64 kbit/s,
    # half of PCM16 at 8 kHz
    assert pcm.wire.down_kbit_s == pytest.approx(384.0)
    assert opus.wire.down_kbit_s < pcm.wire.down_kbit_s / 5
    assert mulaw.wire.down_kbit_s == pytest.approx(64.0) and pcm8k.wire.down_kbit_s == pytest.approx(128.0)
    assert mulaw.wire.up_kbit_s == pytest.approx(64.0) and pcm8k.wire.up_kbit_s == pytest.approx(128.0)


async def test_an_unsupported_codec_is_refused(gateway):
    async def refusal(audio: dict) -> tuple[dict, int]:
        async with websockets.connect(gateway.ws, subprotocols=["novagate.v1"]) as ws:
            await ws.send(orjson.dumps({"type": "session.start", "protocol": 1, "audio": audio}).decode())
            msg = orjson.loads(await asyncio.wait_for(ws.recv(), 10))
            with pytest.raises(websockets.ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 10)
            return msg, ws.close_code

    msg, code = await refusal({"input_codec": "aac"})
    assert msg["type"] == "error" and msg["code"] == "unsupported" and msg["fatal"] is True and code == 4400
    msg, code = await refusal({"output_codec": "opus/48000"})
    assert msg["code"] == "unsupported" and msg["fatal"] is True and code == 4400
    # a codec at a rate it does not take
    msg, code = await refusal({"input_codec": "mulaw", "input_sample_rate": 16000})
    assert msg["code"] == "unsupported_sample_rate" and code == 4400
    msg, code = await refusal({"output_codec": "opus", "output_sample_rate": 8000})
    assert msg["code"] == "unsupported_sample_rate" and code == 4400
    # the client does not even ask
    with pytest.raises(ValueError):
        VoiceClient(gateway.ws, codec="aac")
    with pytest.raises(ValueError):
        VoiceClient(gateway.ws, codec="mulaw", output_rate=24000)


async def test_barge_in_with_opus_truncates_in_decoded_milliseconds(gateway):
    async with client(gateway, codec="opus") as c:
        since = time.monotonic()
        item_id = await barge_in(c)
        played = await c.truncate(item_id)
        # decoded milliseconds (whole 20 ms packets) of what had arrived: at least the 2.5 s it played, and
        # paced (never more than real time since the user began the request, which the reply followed)
        assert played % 20 == 0 and 2000 < played < (time.monotonic() - since) * 1000
        assert c.audio_end.get(item_id) == "interrupted"
        await c.wait_for(lambda: any(f["role"] == "user" and f["text"] == HELLO for f in c.finals), 20)
        stored = await c.wait_for(lambda: next((f for f in c.finals if f["item_id"] == item_id), None), 10)
        full = next(x["text"] for x in c.messages if x["type"] == "transcript" and x["item_id"] == item_id)
        assert 0 < len(stored["text"]) < len(full)  # trimmed to what was heard
        async with httpx.AsyncClient(base_url=gateway.http) as h:
            hist = (await h.get(f"/v1/conversations/{c.ready['conversation_id']}/history",
                                headers={"X-Resume-Token": c.ready["resume_token"]})).json()["history"]
        (item,) = [h for h in hist if h["item_id"] == item_id]
        assert item["interrupted"] is True and item["text"] == stored["text"]
        assert set(c.frame_ms_down) == {20.0}


async def test_a_gateway_that_does_not_confirm_the_codec_is_left():
    with FakeVoiceServer() as fake:  # a v1 server: it ignores audio.*_codec and would send PCM16
        c = VoiceClient(fake.url, codec="opus")
        with pytest.raises(CodecNotConfirmed):
            await c.connect(mic=False)
        await c.close()
        ok = VoiceClient(fake.url)  # PCM16 needs no confirmation
        await ok.connect(mic=False)
        await ok.close()
