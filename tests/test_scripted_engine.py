"""The scripted engine (NOVAGATE_ENGINE=scripted): the local engine's Nova protocol with cheap back ends
(energy endpointing, canned transcripts and reply, a precomputed tone), driven directly through its
streams, then once end to end through a gateway process.

Audio is fed faster than real time (endpointing runs on audio time); only the barge-in test needs the reply
to be playing, which it is for seconds after its first chunk. No assertion is about elapsed time.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys

import numpy as np
import pytest

from gateway.client import VoiceClient
from gateway.local import LocalEngine, LocalEngineConfig, ScriptedEngine, backends, scripted_config
from gateway.transport import IDLE_TIMEOUT_MESSAGE, MODEL_TIMEOUT, VALIDATION, ModelError
from protocol import nova_events as nv
from protocol.event_order import INPUT_GAP_MESSAGE
from protocol.models import CONSERVATIVE_HISTORY, NOVA_2_5_SONIC, NOVA_2_SONIC, NOVA_SONIC_V1

from .conftest import ROOT, Gateway, _wait, free_port
from .test_local_engine import TWO_SENTENCE_TURN, Session, blocks, collect, first_turn_opening, is_usage, shape

DEFAULT_SENTENCES = backends.sentences(backends.DEFAULT_REPLY)
TURN_SHAPE = TWO_SENTENCE_TURN  # the built-in reply has two sentences


def burst(seconds: float, db: float = -20.0, rate: int = 16000) -> bytes:
    """Something loud: a 300 Hz tone plus noise, at about `db` dBFS RMS."""
    t = np.arange(int(rate * seconds)) / rate
    rng = np.random.default_rng(7)
    x = np.sin(2 * np.pi * 300 * t) + 0.3 * rng.standard_normal(t.size)
    x *= 10 ** (db / 20) / np.sqrt(np.mean(x * x))
    return (x * 32768).clip(-32768, 32767).astype("<i2").tobytes()


def silence(seconds: float, rate: int = 16000) -> bytes:
    return bytes(int(rate * seconds) * 2)


def utterance(seconds: float = 0.6) -> bytes:
    """A burst, then 1 s of silence: more than the 700 ms endpoint."""
    return burst(seconds) + silence(1.0)


async def played_out(stream) -> None:
    """Until the reply has (notionally) played: speech before that would be a barge-in."""
    while stream.speaking:
        await asyncio.sleep(0.05)


@pytest.fixture
async def make_engine():
    engines: list[LocalEngine] = []

    async def make(**kw) -> LocalEngine:
        engine = ScriptedEngine(scripted_config(**kw))
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        await engine.aclose()


async def test_spoken_turn_gives_the_nova_event_sequence(make_engine):
    engine = await make_engine()  # the defaults: 1.5 s lookahead, so the reply's tail is paced in real time
    assert engine.name == "scripted"
    s = Session(await engine.open())
    await s.start()
    await s.say(utterance())
    events = await collect(s.stream, is_usage)

    assert first_turn_opening(events)  # userSpeechStart → completionStart → userSpeechEnd → USER TEXT
    assert isinstance(events[-1], nv.UsageEvent) and events[-1].tokens.total > 0
    bs = blocks(events)
    assert shape(bs) == TURN_SHAPE
    assert bs[0].texts == ["utterance 1"]
    assert [bs[1].texts, bs[4].texts] == [[DEFAULT_SENTENCES[0]], [DEFAULT_SENTENCES[1]]]
    assert bs[3].texts == bs[1].texts and bs[6].texts == bs[4].texts
    audio = [b for b in bs if b.type == "AUDIO"]
    assert all(b.rate == 24000 for b in audio)
    seconds = sum(len(b.audio) for b in audio) / 2 / 24000
    assert abs(seconds - backends.DEFAULT_REPLY_S) < 0.01  # shared among the sentences by length
    assert len(audio[0].audio) < len(audio[1].audio)
    assert max(len(b.audio) / b.chunks for b in audio) <= 24000 * 0.08 * 2  # ~80 ms chunks
    pcm = np.frombuffer(bytes(audio[1].audio), "<i2")
    assert 1000 < np.abs(pcm).max() <= 0.1 * 32768  # a quiet tone, not silence

    # the next turn: the next canned transcript, no second completionStart
    await played_out(s.stream)
    await s.say(utterance(0.3))
    events = await collect(s.stream, is_usage)
    assert not any(isinstance(e, nv.CompletionStart) for e in events)
    assert [type(e) for e in events[:3]] == [nv.UserSpeechStart, nv.UserSpeechEnd, nv.ContentStart]
    bs = blocks(events)
    assert shape(bs) == TURN_SHAPE and bs[0].texts == ["utterance 2"]
    assert [("USER", "utterance 1"), ("ASSISTANT", backends.DEFAULT_REPLY)] == s.stream.history[:2]

    tail = await s.finish()
    assert isinstance(tail[-1], nv.CompletionEnd)
    assert await s.stream.receive() is None
    await s.stream.close()


async def test_configured_transcripts_reply_and_output_rate(make_engine):
    engine = await make_engine(transcripts=("hello there", "what did we discuss"),
                               reply="One. Two words! Three is the last?", reply_s=0.6, lookahead_s=60.0)
    s = Session(await engine.open())
    await s.start(rate=16000)
    heard = []
    for _ in range(3):
        await played_out(s.stream)
        await s.say(utterance(0.3))
        bs = blocks(await collect(s.stream, is_usage))
        heard.append(bs[0].texts[0])
        assert [b.texts[0] for b in bs if b.stage == "FINAL" and b.role == "ASSISTANT"] == [
            "One.", "Two words!", "Three is the last?"]
        audio = [b for b in bs if b.type == "AUDIO"]
        assert all(b.rate == 16000 for b in audio)
        assert abs(sum(len(b.audio) for b in audio) / 2 / 16000 - 0.6) < 0.01
    assert heard == ["hello there", "what did we discuss", "hello there"]  # cycled

    # a typed turn gets the same reply, without a USER transcript block
    await played_out(s.stream)
    await s.text("anything at all")
    bs = blocks(await collect(s.stream, is_usage))
    assert [b.role for b in bs if b.role == "USER"] == []
    assert [b.texts[0] for b in bs if b.stage == "SPECULATIVE"] == ["One.", "Two words!", "Three is the last?"]
    await s.finish()


async def test_silence_quiet_noise_and_blips_give_no_turn(make_engine):
    engine = await make_engine(lookahead_s=60.0)
    s = Session(await engine.open())
    await s.start()
    rng = np.random.default_rng(1)
    hiss = (rng.standard_normal(16000 * 2) * 32768 * 10 ** (-55 / 20)).astype("<i2").tobytes()  # -55 dBFS
    await s.say(silence(2.0) + hiss + silence(1.0))
    await s.say(burst(0.12) + silence(1.0))  # past the 90 ms onset, short of the 150 ms a turn needs
    await s.say(burst(0.06) + silence(1.0))  # not even an onset
    await s.say(utterance())
    events = await collect(s.stream, is_usage)
    bs = blocks(events)
    # the first turn the engine heard is the real one: nothing before it became an utterance
    assert [b.texts for b in bs if b.role == "USER"] == [["utterance 1"]]
    # the blip had an onset: its userSpeechStart / userSpeechEnd pair (and the prompt's completionStart), no turn
    kinds = [type(e) for e in events if not isinstance(e, (nv.TextOutput, nv.AudioOutput, nv.ContentEnd))]
    assert kinds[:6] == [nv.UserSpeechStart, nv.CompletionStart, nv.UserSpeechEnd,
                         nv.UserSpeechStart, nv.UserSpeechEnd, nv.ContentStart]
    assert sum(k is nv.UserSpeechStart for k in kinds) == sum(k is nv.UserSpeechEnd for k in kinds) == 2
    await s.finish()


async def test_barge_in_interrupts_the_reply(make_engine):
    # paced 1.5 s ahead of playback, and the first sentence lasts 5.6 s: still playing when the user speaks
    engine = await make_engine(reply_s=20.0)
    s = Session(await engine.open())
    await s.start()
    events: list = []
    changed = asyncio.Event()

    async def reader():
        while (raw := await s.stream.receive()) is not None:
            events.append(nv.parse_output_event(raw))
            changed.set()

    async def until(predicate, timeout: float = 30.0):  # a bound that only turns a hang into a failure
        async with asyncio.timeout(timeout):
            while not predicate():
                changed.clear()
                await changed.wait()

    reading = asyncio.create_task(reader())
    await s.say(utterance())
    await until(lambda: any(isinstance(e, nv.AudioOutput) for e in events))
    await s.say(utterance())  # the user talks over the assistant

    def second_reply_begun() -> bool:  # the interrupting turn was heard and its reply has started
        bs = blocks(events)
        users = [i for i, b in enumerate(bs) if b.role == "USER"]
        return len(users) == 2 and any(b.stage == "SPECULATIVE" for b in bs[users[1]:])

    await until(second_reply_begun)
    bs = blocks(events)
    second = [i for i, b in enumerate(bs) if b.role == "USER"][1]
    # the first reply: cut in its first sentence, the rest of it dropped
    assert shape(bs[:second]) == [
        ("TEXT", "USER", "FINAL", "END_TURN"),
        ("TEXT", "ASSISTANT", "SPECULATIVE", "PARTIAL_TURN"),
        ("AUDIO", "ASSISTANT", None, "INTERRUPTED"),
        ("TEXT", "ASSISTANT", "FINAL", "INTERRUPTED"),
    ]
    cut = bs[second - 1]
    assert cut.texts[-1] == nv.INTERRUPTED_SIGNAL
    assert DEFAULT_SENTENCES[0].startswith(" ".join(cut.texts[:-1]))  # what was played of it, if anything
    assert [b.texts for b in bs if b.role == "USER"] == [["utterance 1"], ["utterance 2"]]
    assert bs[second + 1].texts == [DEFAULT_SENTENCES[0]]
    first_usage = next(i for i, e in enumerate(events) if isinstance(e, nv.UsageEvent))
    assert first_usage < events.index(next(e for e in events if isinstance(e, nv.TextOutput)
                                           and e.content == "utterance 2"))  # the cut turn was accounted
    # the voice activity: the barge-in's userSpeechStart comes before the reply is cut, its userSpeechEnd
    # before its transcript
    starts = [i for i, e in enumerate(events) if isinstance(e, nv.UserSpeechStart)]
    ends = [i for i, e in enumerate(events) if isinstance(e, nv.UserSpeechEnd)]
    cut_at = next(i for i, e in enumerate(events) if isinstance(e, nv.ContentEnd) and e.stop_reason == "INTERRUPTED")
    heard_at = next(i for i, e in enumerate(events) if isinstance(e, nv.TextOutput) and e.content == "utterance 2")
    assert len(starts) == len(ends) == 2 and starts[1] < cut_at and starts[1] < ends[1] < heard_at

    for e in (nv.content_end(s.prompt, s.audio), nv.prompt_end(s.prompt), nv.session_end()):
        await s.stream.send(e)
    await asyncio.wait_for(reading, 10)
    assert isinstance(events[-1], nv.CompletionEnd)


async def test_limits_and_input_order_are_the_local_engines(make_engine):
    engine = await make_engine(idle_timeout_s=0.3)
    s = Session(await engine.open())
    await s.start()
    await s.say(silence(0.1))
    with pytest.raises(ModelError) as info:
        await asyncio.wait_for(s.stream.receive(), 10)
    assert (info.value.kind, info.value.message) == (VALIDATION, IDLE_TIMEOUT_MESSAGE)

    engine = await make_engine(max_stream_s=0.3)
    s = Session(await engine.open())
    await s.start()
    with pytest.raises(ModelError) as info:
        await asyncio.wait_for(s.stream.receive(), 10)
    assert info.value.kind == MODEL_TIMEOUT

    engine = await make_engine()
    stream = await engine.open()
    p = nv.new_name()
    await stream.send(nv.session_start())
    await stream.send(nv.prompt_start(p))
    await stream.send(nv.audio_content_start(p, "mic"))  # no system prompt first
    with pytest.raises(ModelError, match="first content block must be TEXT with role SYSTEM"):
        await asyncio.wait_for(stream.receive(), 10)


async def test_input_gap_532_and_idle_531(make_engine):
    """532: no audio and no interactive content for `input_gap_s`; 531: no audio for `idle_timeout_s`, whatever
    else arrives. Short real time: the feeding keeps well inside the gap; the bounds only catch a hang."""
    # audio keeps a stream alive; so does typed text (interactive content) without any audio
    engine = await make_engine(input_gap_s=1.0, lookahead_s=60.0)
    fed = Session(await engine.open())
    await fed.start()
    typed = Session(await engine.open())
    await typed.start(audio=False)
    for i in range(25):  # 2.5 s: more than twice the gap
        await fed.say(silence(0.032))
        if i % 3 == 0:
            await typed.text(f"still here {i}")
        await asyncio.sleep(0.1)
    assert fed.stream.failed is None and typed.stream.failed is None
    await fed.stream.close()
    await typed.stream.close()

    # nothing after the setup (system prompt and history do not count): 532, a forced rotation for the gateway
    engine = await make_engine(input_gap_s=0.5)
    s = Session(await engine.open())
    await s.start(history=(("USER", "earlier"), ("ASSISTANT", "noted")))
    with pytest.raises(ModelError) as info:
        await asyncio.wait_for(s.stream.receive(), 10)
    assert (info.value.kind, info.value.message) == (VALIDATION, INPUT_GAP_MESSAGE)
    assert info.value.message.startswith("InternalErrorCode=532::") and info.value.recoverable
    with pytest.raises(ModelError):
        await s.stream.send(nv.audio_input(s.prompt, s.audio, silence(0.03)))

    # typed text every 0.2 s and no audio: the 532 never comes, the 531 does
    engine = await make_engine(input_gap_s=0.6, idle_timeout_s=1.2, lookahead_s=60.0)
    s = Session(await engine.open())
    await s.start()

    async def typing():
        for i in range(100):
            await s.text(f"typing {i}")
            await asyncio.sleep(0.2)

    typist = asyncio.create_task(typing())
    try:
        with pytest.raises(ModelError) as info:
            while await asyncio.wait_for(s.stream.receive(), 10) is not None:
                pass
    finally:
        typist.cancel()
        with contextlib.suppress(asyncio.CancelledError, ModelError):
            await typist
    assert info.value.message == IDLE_TIMEOUT_MESSAGE

    # input_gap_s=0: no 532 (the 531 still applies)
    engine = await make_engine(input_gap_s=0, idle_timeout_s=0.5)
    s = Session(await engine.open())
    await s.start()
    with pytest.raises(ModelError) as info:
        await asyncio.wait_for(s.stream.receive(), 10)
    assert info.value.message == IDLE_TIMEOUT_MESSAGE
    with pytest.raises(ValueError, match="input_gap_s"):
        ScriptedEngine(scripted_config(input_gap_s=-1))


async def test_the_legacy_model_has_no_voice_activity_events(make_engine):
    engine = await make_engine(model_id=NOVA_SONIC_V1, lookahead_s=60.0)
    s = Session(await engine.open())
    assert s.stream.spec.legacy
    await s.start()
    await s.say(utterance())
    events = await collect(s.stream, is_usage)
    assert isinstance(events[0], nv.CompletionStart)
    assert not any(isinstance(e, (nv.UserSpeechStart, nv.UserSpeechEnd)) for e in events)
    assert shape(blocks(events)) == TURN_SHAPE
    await s.finish()
    # the model is chosen per stream (the wire emulator: the request path's): Nova 2.5 Sonic has them
    s = Session(await engine.open_for(NOVA_2_5_SONIC))
    await s.start()
    await s.say(utterance())
    assert first_turn_opening(await collect(s.stream, is_usage))
    await s.finish()


@pytest.mark.parametrize(("model_id", "history", "error"), [
    (NOVA_2_SONIC, None, None),
    (NOVA_2_5_SONIC, None, None),
    (NOVA_SONIC_V1, None, "chat history textInput of 2048 bytes exceeds 1024 bytes"),
    (NOVA_2_5_SONIC, CONSERVATIVE_HISTORY, "chat history textInput of 2048 bytes exceeds 1024 bytes"),
])
async def test_history_limits_follow_the_model(make_engine, model_id, history, error):
    engine = await make_engine(model_id=model_id, history=history, lookahead_s=60.0)
    s = Session(await engine.open())
    if error is None:
        await s.start(history=(("USER", "x" * 2048),))  # one textInput of 2 KB
        await s.say(utterance())
        assert blocks(await collect(s.stream, is_usage))[0].texts == ["utterance 1"]
        await s.finish()
        return
    with pytest.raises(ModelError) as info:  # the stream fails: the next send, or the output, says why
        await s.start(history=(("USER", "x" * 2048),))
        await asyncio.wait_for(s.stream.receive(), 10)
    assert info.value.kind == VALIDATION
    assert info.value.message.startswith("Invalid input request: " + error)


def test_energy_vad_and_tone():
    vad = backends.EnergyVad(-40.0)
    frames = silence(0.03) + burst(0.03, -60) + burst(0.03, -35) + burst(0.03, -10)
    assert vad.classify(frames) == [False, False, True, True]
    assert backends.EnergyVad(-30.0).classify(frames) == [False, False, False, True]
    tone = backends.ToneSynthesiser(0.05)
    pcm = tone.synthesize("  ten chars ", 24000)  # 9 characters once tidied
    assert len(pcm) == round(9 * 0.05 * 24000) * 2
    assert tone.synthesize("ten chars", 24000) is pcm  # made once, then cached
    assert tone.synthesize("", 24000) == b""
    with pytest.raises(ValueError, match="unknown VAD"):
        LocalEngine(LocalEngineConfig(vad="loud"))
    with pytest.raises(ValueError, match="empty"):
        ScriptedEngine(scripted_config(reply="  "))


async def test_end_to_end_through_the_gateway(tmp_path):
    gw = Gateway(tmp_path, {"NOVAGATE_ENGINE": "scripted", "NOVAGATE_SCRIPTED_TRANSCRIPTS": "first|second"})
    await asyncio.to_thread(gw.start)
    try:
        c = VoiceClient(gw.ws)
        c.speed = 1.5  # the scripted microphone runs a little faster than real time
        async with c:
            assert c.ready["engine"] == "scripted"
            for expected in ("first", "second"):
                before = len(c.audio)
                turn = await c.turn(burst(0.8))
                assert turn["user"] == expected
                assert turn["assistant"] == backends.DEFAULT_REPLY
                assert (len(c.audio) - before) / (2 * 24000) >= 1.5  # the reply's ~2 s tone
            assert {f["item_id"] for f in c.finals} <= c.saved
    finally:
        gw.stop()


async def test_behind_the_wire_emulator(tmp_path):
    """`novagate emulate nova --engine scripted`, with a gateway on engine=bedrock in front of it."""
    from gateway.emulate.nova import make_test_tls

    _ca, cert, key, bundle = make_test_tls(tmp_path / "tls")
    port = free_port()
    with open(tmp_path / "emulator.log", "wb") as log:
        emu = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "emulate", "nova", "--port", str(port), "--cert", cert,
             "--key", key, "--engine", "scripted", "--scripted-transcripts", "over the wire",
             "--scripted-reply", "A canned answer.", "--endpoint-ms", "600"],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        )
    gw = Gateway(tmp_path, {
        "NOVAGATE_ENGINE": "bedrock", "AWS_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": "AKIDNOVAGATETEST",
        "AWS_SECRET_ACCESS_KEY": "novagate-test-secret", "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_ENDPOINT_URL_BEDROCK_RUNTIME": f"https://localhost:{port}", "SSL_CERT_FILE": bundle,
    })
    try:
        await asyncio.to_thread(
            _wait, lambda: socket.create_connection(("127.0.0.1", port), 1).close() or True, "nova emulator", emu)
        await asyncio.to_thread(gw.start)
        c = VoiceClient(gw.ws)
        c.speed = 1.5
        async with c:
            turn = await c.turn(burst(0.8))
            assert (turn["user"], turn["assistant"]) == ("over the wire", "A canned answer.")
            assert len(c.audio) / (2 * 24000) >= 0.3
    finally:
        gw.stop()
        emu.terminate()
        emu.wait(10)
