"""The local engine, driven directly through LocalStream (no sockets).

Most tests use the deterministic sphinx (JSGF phrase grammar) + espeak configuration and feed audio faster
than real time: endpointing runs on audio time. Barge-in needs wall-clock realism. One test runs the
whisper + hibari demo configuration.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from dataclasses import dataclass, field

import pytest

from gateway.local import LocalEngine, LocalEngineConfig, LocalStream, speech
from gateway.transport import (
    IDLE_TIMEOUT_MESSAGE,
    MODEL_TIMEOUT,
    MODEL_TIMEOUT_MESSAGE,
    VALIDATION,
    ModelError,
)
from protocol import nova_events as nv

SMITH = "i met with doctor smith today at two pm"
DISCUSS = "what did we discuss"
STORY = "tell me a story"
GRAMMAR = (SMITH, DISCUSS, STORY)
CHUNK = 1024  # 32 ms of 16 kHz PCM16, the service's typical input frame
TWO_SENTENCE_TURN = [  # (type, role, stage, stopReason) of each output block
    ("TEXT", "USER", "FINAL", "END_TURN"),
    ("TEXT", "ASSISTANT", "SPECULATIVE", "PARTIAL_TURN"),
    ("AUDIO", "ASSISTANT", None, "PARTIAL_TURN"),
    ("TEXT", "ASSISTANT", "FINAL", "PARTIAL_TURN"),
    ("TEXT", "ASSISTANT", "SPECULATIVE", "PARTIAL_TURN"),
    ("AUDIO", "ASSISTANT", None, "END_TURN"),
    ("TEXT", "ASSISTANT", "FINAL", "END_TURN"),
]


@functools.cache
def said(text: str) -> bytes:
    """The user saying `text` (espeak, 16 kHz), followed by 1 s of silence so the endpoint triggers."""
    return speech.synthesize(text, 16000, "espeak") + silence(1.0)


def silence(seconds: float) -> bytes:
    return b"\0\0" * int(16000 * seconds)


def config(**kw) -> LocalEngineConfig:
    kw.setdefault("lookahead_s", 60.0)  # emit each reply at once unless a test needs real-time pacing
    return LocalEngineConfig(asr="sphinx", tts="espeak", grammar=GRAMMAR, **kw)


@pytest.fixture
async def make_engine():
    engines: list[LocalEngine] = []

    async def make(cfg: LocalEngineConfig) -> LocalEngine:
        engine = LocalEngine(cfg)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        await engine.aclose()


@dataclass
class Session:
    stream: LocalStream
    prompt: str = field(default_factory=nv.new_name)
    audio: str = field(default_factory=nv.new_name)

    async def start(self, history: tuple[tuple[str, str], ...] = (), *, rate: int = 24000,
                    audio: bool = True) -> None:
        await self.stream.send(nv.session_start())
        await self.stream.send(nv.prompt_start(self.prompt, output_sample_rate=rate))
        for e in nv.text_block(self.prompt, "SYSTEM", ["You are a friendly assistant."]):
            await self.stream.send(e)
        for role, text in history:
            for e in nv.text_block(self.prompt, role, [text]):
                await self.stream.send(e)
        if audio:
            await self.stream.send(nv.audio_content_start(self.prompt, self.audio))

    async def say(self, pcm: bytes) -> None:
        for i in range(0, len(pcm), CHUNK):
            await self.stream.send(nv.audio_input(self.prompt, self.audio, pcm[i : i + CHUNK]))

    async def text(self, text: str) -> None:
        for e in nv.text_block(self.prompt, "USER", [text], interactive=True):
            await self.stream.send(e)

    async def finish(self) -> list:
        """contentEnd(audio) → promptEnd → sessionEnd; returns the remaining output up to its end."""
        await self.stream.send(nv.content_end(self.prompt, self.audio))
        await self.stream.send(nv.prompt_end(self.prompt))
        await self.stream.send(nv.session_end())
        return await collect(self.stream, lambda ev: False)


async def collect(stream: LocalStream, until, timeout: float = 10.0) -> list:
    """Parsed output events up to and including the first for which until(ev) holds (or the end)."""
    events = []
    async with asyncio.timeout(timeout):
        while True:
            raw = await stream.receive()
            if raw is None:
                return events
            ev = nv.parse_output_event(raw)
            events.append(ev)
            if until(ev):
                return events


def is_usage(ev) -> bool:
    return isinstance(ev, nv.UsageEvent)


def first_turn_opening(events: list) -> bool:
    """A Nova 2-class model's first spoken turn opens userSpeechStart → completionStart → userSpeechEnd →
    the USER transcript's contentStart (what a raw Nova 2 capture shows)."""
    kinds = [type(e) for e in events[:4]]
    return (kinds == [nv.UserSpeechStart, nv.CompletionStart, nv.UserSpeechEnd, nv.ContentStart]
            and events[3].role == "USER")


@dataclass
class Block:
    type: str
    role: str
    stage: str | None
    rate: int | None
    texts: list[str] = field(default_factory=list)
    audio: bytearray = field(default_factory=bytearray)
    chunks: int = 0
    stop: str | None = None


def blocks(events: list) -> list[Block]:
    """Content blocks in order of their contentStart; asserts they never interleave."""
    out: list[Block] = []
    by_id: dict[str, Block] = {}
    open_id = None
    for ev in events:
        if isinstance(ev, nv.ContentStart):
            assert open_id is None, "a content block started while another was open"
            open_id = ev.content_id
            by_id[ev.content_id] = b = Block(ev.type, ev.role, ev.stage, ev.sample_rate)
            out.append(b)
        elif isinstance(ev, nv.TextOutput):
            assert ev.content_id == open_id
            by_id[ev.content_id].texts.append(ev.content)
        elif isinstance(ev, nv.AudioOutput):
            assert ev.content_id == open_id
            by_id[ev.content_id].audio += ev.pcm
            by_id[ev.content_id].chunks += 1
        elif isinstance(ev, nv.ContentEnd):
            assert ev.content_id == open_id
            by_id[ev.content_id].stop = ev.stop_reason
            open_id = None
    return out


def shape(bs: list[Block]) -> list[tuple]:
    return [(b.type, b.role, b.stage, b.stop) for b in bs]


def assistant_text(bs: list[Block], stage: str = "FINAL") -> str:
    return " ".join(t for b in bs if b.role == "ASSISTANT" and b.stage == stage for t in b.texts
                    if not nv.is_interrupted_signal(t))


async def test_spoken_turn_gives_transcript_and_assistant_blocks(make_engine):
    engine = await make_engine(config())
    s = Session(await engine.open())
    await s.start()
    await s.say(said(SMITH))
    events = await collect(s.stream, is_usage)

    # Nova 2's voice activity, as in a raw capture: userSpeechStart → completionStart → userSpeechEnd → USER TEXT
    assert first_turn_opening(events)
    assert isinstance(events[-1], nv.UsageEvent) and events[-1].tokens.total > 0
    bs = blocks(events)
    assert shape(bs) == TWO_SENTENCE_TURN
    assert bs[0].texts == [SMITH]
    assert bs[1].texts == bs[3].texts == ["Got it, you said: I met with Doctor Smith today at two pm."]
    assert bs[4].texts == bs[6].texts
    audio = [b for b in bs if b.type == "AUDIO"]
    assert all(b.rate == 24000 for b in audio)
    total = sum(len(b.audio) for b in audio)
    assert total / 2 / 24000 >= 1.0
    # ~80 ms chunks at 24 kHz
    assert max(len(b.audio) / b.chunks for b in audio) <= 24000 * 0.08 * 2
    assert s.stream.speaking  # the reply is (notionally) still playing

    tail = await s.finish()
    assert [type(e).__name__ for e in tail][-1] == "CompletionEnd"
    assert await s.stream.receive() is None
    await s.stream.close()


async def test_history_blocks_are_seen_by_the_policy_and_traced(make_engine, tmp_path):
    trace = tmp_path / "trace.jsonl"
    engine = await make_engine(config(trace_path=str(trace)))
    s = Session(await engine.open())
    await s.start(history=(("USER", "I met with Doctor Smith today at two pm."), ("ASSISTANT", "Noted.")))
    await s.say(said(DISCUSS))
    bs = blocks(await collect(s.stream, is_usage))
    assert bs[0].texts == [DISCUSS]
    reply = assistant_text(bs)
    assert "doctor smith" in reply.lower(), reply
    assert reply == assistant_text(bs, "SPECULATIVE")
    await s.finish()
    await s.stream.close()
    await engine.aclose()

    lines = [json.loads(line) for line in trace.read_text().splitlines()]
    assert {line["stream"] for line in lines} == {s.stream.stream_id}
    names = [line["event"] for line in lines]
    assert names[:2] == ["sessionStart", "promptStart"]
    audio_start = next(i for i, line in enumerate(lines) if line["event"] == "contentStart" and line["type"] == "AUDIO")
    history = [line for line in lines[:audio_start] if line["event"] == "textInput" and line["role"] in ("USER", "ASSISTANT")]
    assert [(h["role"], h["interactive"], h["content"]) for h in history] == [
        ("USER", False, "I met with Doctor Smith today at two pm."),
        ("ASSISTANT", False, "Noted."),
    ]
    audio_lines = [line for line in lines if line["event"] == "audioInput"]
    assert audio_lines and all(line["role"] == "USER" and line["type"] == "AUDIO" for line in audio_lines)
    assert sum(line["bytes"] for line in audio_lines) == len(said(DISCUSS))
    assert names[-3:] == ["contentEnd", "promptEnd", "sessionEnd"]


async def test_interactive_text_turn_and_memory_within_the_stream(make_engine):
    engine = await make_engine(config())
    s = Session(await engine.open())
    await s.start(rate=16000)
    # cross-modal text input is a user turn: a reply, but no USER transcript block
    await s.text("I met with Doctor Smith today at two pm.")
    bs = blocks(await collect(s.stream, is_usage))
    assert [b.role for b in bs if b.type == "TEXT" and b.role == "USER"] == []
    assert "Doctor Smith" in assistant_text(bs)
    audio = [b for b in bs if b.type == "AUDIO"]
    assert audio and all(b.rate == 16000 for b in audio)
    assert max(len(b.audio) / b.chunks for b in audio) <= 16000 * 0.08 * 2

    # the next spoken turn sees the earlier turn (it may also barge in on the reply's tail)
    await s.say(said(DISCUSS))
    events = await collect(s.stream, is_usage)
    bs = blocks(events)
    user = [b for b in bs if b.role == "USER"]
    assert [b.texts for b in user] == [[DISCUSS]]
    assert "doctor smith" in assistant_text(bs).lower()
    assert sum(isinstance(e, nv.CompletionStart) for e in events) == 0  # only on the first turn
    assert ("USER", DISCUSS) in s.stream.history
    await s.finish()


async def test_barge_in_interrupts_the_reply(make_engine):
    engine = await make_engine(config(lookahead_s=1.5))
    s = Session(await engine.open())
    await s.start()
    events: list = []
    first_audio = asyncio.Event()

    async def reader():
        while (raw := await s.stream.receive()) is not None:
            ev = nv.parse_output_event(raw)
            events.append(ev)
            if isinstance(ev, nv.AudioOutput):
                first_audio.set()

    reading = asyncio.create_task(reader())
    await s.say(said(STORY))
    await asyncio.wait_for(first_audio.wait(), 5)
    await asyncio.sleep(1.2)  # let the story play for a while
    assert s.stream.speaking
    t0 = time.monotonic()
    await s.say(said(SMITH))  # the user talks over the assistant
    async with asyncio.timeout(5):
        while not any(isinstance(e, nv.TextOutput) and e.interrupted for e in events):
            await asyncio.sleep(0.01)
    assert time.monotonic() - t0 < 5.0  # barge-in reaction time (about 0.1 s unloaded)
    async with asyncio.timeout(5):  # the interrupting utterance is answered
        while not any(isinstance(e, nv.TextOutput) and e.content.startswith("Got it") for e in events):
            await asyncio.sleep(0.01)

    bs = blocks(events)
    stops = [(b.type, b.stage, b.stop) for b in bs]
    assert ("AUDIO", None, "INTERRUPTED") in stops
    final_int = next(b for b in bs if b.stage == "FINAL" and b.stop == "INTERRUPTED")
    assert final_int.role == "ASSISTANT" and final_int.type == "TEXT"
    assert final_int.texts[-1] == nv.INTERRUPTED_SIGNAL == '{ "interrupted" : true }'
    signal = next(e for e in events if isinstance(e, nv.TextOutput) and e.interrupted)
    assert signal.content == nv.INTERRUPTED_SIGNAL
    # the played part is a proper prefix of the story's first sentence (about 1.2 s of ~4.7 s)
    played = final_int.texts[0]
    assert played != nv.INTERRUPTED_SIGNAL
    assert "Once upon a time, in a small town by the sea".startswith(played), played
    # the rest of the story was dropped
    story_specs = [b for b in bs if b.stage == "SPECULATIVE" and b.texts[0] != "Got it, you said: I met with Doctor Smith today at two pm."]
    assert len(story_specs) < 3
    # the interrupting utterance became the next turn
    users = [b.texts for b in bs if b.role == "USER"]
    assert users == [[STORY], [SMITH]]
    idx = bs.index(final_int)
    assert bs[idx + 1].role == "USER"
    for e in (nv.content_end(s.prompt, s.audio), nv.prompt_end(s.prompt), nv.session_end()):
        await s.stream.send(e)
    await asyncio.wait_for(reading, 2)
    assert isinstance(events[-1], nv.CompletionEnd)


async def test_order_violation_fails_the_stream(make_engine):
    engine = await make_engine(config())
    stream = await engine.open()
    p = nv.new_name()
    await stream.send(nv.session_start())
    await stream.send(nv.prompt_start(p))
    await stream.send(nv.audio_content_start(p, "mic"))  # no system prompt first
    with pytest.raises(ModelError) as info:
        await asyncio.wait_for(stream.receive(), 2)
    assert info.value.kind == VALIDATION
    assert "first content block must be TEXT with role SYSTEM" in info.value.message
    assert not info.value.recoverable
    with pytest.raises(ModelError):
        await stream.send(nv.audio_input(p, "mic", silence(0.03)))
    assert await stream.receive() is None
    await stream.close()

    # audio inside an open text block
    s = Session(await engine.open())
    await s.start()
    await s.stream.send(nv.text_content_start(s.prompt, "t", "USER", interactive=True))
    await s.stream.send(nv.audio_input(s.prompt, s.audio, silence(0.03)))
    with pytest.raises(ModelError, match="no audio inside an open text block") as info:
        await asyncio.wait_for(s.stream.receive(), 2)
    assert info.value.kind == VALIDATION


async def test_idle_timeout(make_engine):
    engine = await make_engine(config(idle_timeout_s=0.3))
    s = Session(await engine.open())
    await s.start()
    await s.say(silence(0.1))
    t0 = time.monotonic()
    with pytest.raises(ModelError) as info:
        await asyncio.wait_for(s.stream.receive(), 3)
    assert 0.1 < time.monotonic() - t0 < 10
    assert info.value.kind == VALIDATION
    assert info.value.message == IDLE_TIMEOUT_MESSAGE
    assert "InternalErrorCode=531" in info.value.message
    assert info.value.recoverable
    with pytest.raises(ModelError):
        await s.stream.send(nv.audio_input(s.prompt, s.audio, silence(0.03)))


async def test_stream_age_limit(make_engine):
    engine = await make_engine(config(max_stream_s=0.4))
    s = Session(await engine.open())
    await s.start()

    async def keep_alive():
        with pytest.raises(ModelError):
            while True:
                await s.stream.send(nv.audio_input(s.prompt, s.audio, silence(0.032)))
                await asyncio.sleep(0.03)

    feeding = asyncio.create_task(keep_alive())
    with pytest.raises(ModelError) as info:
        await asyncio.wait_for(s.stream.receive(), 3)
    assert info.value.kind == MODEL_TIMEOUT and info.value.message == MODEL_TIMEOUT_MESSAGE
    await asyncio.wait_for(feeding, 1)


async def test_close_is_idempotent_and_ends_output(make_engine):
    engine = await make_engine(config())
    s = Session(await engine.open())
    await s.start()
    await s.say(said(SMITH))
    pending = asyncio.create_task(collect(s.stream, lambda ev: False, timeout=5))
    await asyncio.sleep(0.05)
    t0 = time.monotonic()
    await s.stream.close()
    await s.stream.close()
    assert time.monotonic() - t0 < 5.0
    await asyncio.wait_for(pending, 2)
    assert await s.stream.receive() is None
    with pytest.raises(ModelError):
        await s.stream.send(nv.audio_input(s.prompt, s.audio, silence(0.03)))
    assert engine.open_streams == 0
    await engine.aclose()
    with pytest.raises(ModelError):
        await engine.open()


async def test_whisper_and_hibari_demo_path(make_engine):
    """The demo configuration (the defaults: whisper ASR, hibari TTS) hears a spoken turn and answers
    it aloud. How fast is a benchmark, not a test: scripts/bench_local_engine.py (make bench-local)."""
    engine = await make_engine(LocalEngineConfig(lookahead_s=60.0))
    assert (engine.config.asr, engine.config.tts, engine.name) == ("whisper", "hibari", "local")
    await engine.warm()
    s = Session(await engine.open())
    await s.start()
    await s.say(said(SMITH))
    # a generous bound: it only turns a hang into a failure (the turn takes seconds)
    events = await collect(s.stream, is_usage, timeout=60)
    assert first_turn_opening(events) and isinstance(events[-1], nv.UsageEvent)
    bs = blocks(events)
    user = [b for b in bs if b.role == "USER"]
    assert len(user) == 1 and "smith" in user[0].texts[0].lower(), user[0].texts
    reply = assistant_text(bs)
    assert "Smith" in reply
    assert reply == assistant_text(bs, "SPECULATIVE")  # every planned sentence was spoken
    audio = [b for b in bs if b.type == "AUDIO"]
    assert audio and all(b.rate == 24000 and b.chunks for b in audio)
    assert audio[-1].stop == "END_TURN"
    seconds = sum(len(b.audio) for b in audio) / 2 / 24000
    assert seconds >= 1.0
    assert any(max(abs(x) for x in memoryview(bytes(b.audio)).cast("h")) > 1000 for b in audio)  # not silence
    tail = await s.finish()
    assert [type(e).__name__ for e in tail][-1] == "CompletionEnd"
    assert await s.stream.receive() is None


async def test_audio_input_at_24k_is_resampled(make_engine):
    engine = await make_engine(config())
    s = Session(await engine.open())
    await s.stream.send(nv.session_start())
    await s.stream.send(nv.prompt_start(s.prompt))
    for e in nv.text_block(s.prompt, "SYSTEM", ["You are a friendly assistant."]):
        await s.stream.send(e)
    await s.stream.send(nv.audio_content_start(s.prompt, s.audio, sample_rate=24000))
    await s.say(speech.synthesize(DISCUSS, 24000, "espeak") + b"\0\0" * 24000)
    bs = blocks(await collect(s.stream, is_usage))
    assert bs[0].role == "USER" and bs[0].texts == [DISCUSS]
