"""Tool calls on a phrase: the local engine (through the scripted engine: canned transcripts, no speech
models) and the wire emulator in front of it call a declared tool when the user says a phrase, wait for
the TOOL result and speak about it (gateway/local/engine.py docstring; reference/nova-sonic.md §2.7, §3).

Audio is fed faster than real time (endpointing runs on audio time) and replies are emitted at once
(lookahead 60 s), so nothing waits on the clock; every wait is bounded. No assertion is about time.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field

import pytest

from gateway.local import LocalEngine, LocalStream, ScriptedEngine, backends, policy, scripted_config
from gateway.local.engine import TOOL_RESULT_PARSE_ERROR
from gateway.transport import VALIDATION, ModelError
from protocol import nova_events as nv
from protocol.tool_calls import late_result_text

from .test_local_engine import blocks, shape
from .test_nova_emulator import drain, make_bedrock, make_emu, tls  # noqa: F401 (fixtures)
from .test_scripted_engine import played_out, utterance

TOOL = "record_call"
ARGS = {"reason": "demo", "priority": 2}
RULE = {"phrase": "Record the call", "tool": TOOL, "arguments": ARGS}
TOOLS = [{"toolSpec": {"name": TOOL, "description": "record this call",
                       "inputSchema": {"json": json.dumps({"type": "object", "properties": {}})}}},
         {"toolSpec": {"name": "other_tool", "description": "unused", "inputSchema": {"json": "{}"}}}]
RESULT = {"result": "Call recorded as number 17."}
SAID = "The record_call tool says: Call recorded as number 17."
FILLER_SHAPE = [
    ("TEXT", "ASSISTANT", "SPECULATIVE", "PARTIAL_TURN"),
    ("AUDIO", "ASSISTANT", None, "PARTIAL_TURN"),  # the turn goes on: the tool call follows
    ("TEXT", "ASSISTANT", "FINAL", "PARTIAL_TURN"),
]
TOOL_SHAPE = [("TOOL", "TOOL", None, "TOOL_USE")]
ONE_SENTENCE_REPLY = [
    ("TEXT", "ASSISTANT", "SPECULATIVE", "PARTIAL_TURN"),
    ("AUDIO", "ASSISTANT", None, "END_TURN"),
    ("TEXT", "ASSISTANT", "FINAL", "END_TURN"),
]
USER_BLOCK = [("TEXT", "USER", "FINAL", "END_TURN")]


@pytest.fixture
async def make_engine():
    engines: list[LocalEngine] = []

    async def make(**kw) -> LocalEngine:
        kw.setdefault("transcripts", ("please record the call now",))
        kw.setdefault("tool_calls", [RULE])
        kw.setdefault("reply_s", 0.6)
        kw.setdefault("lookahead_s", 60.0)
        engine = ScriptedEngine(scripted_config(**kw))
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        await engine.aclose()


@dataclass
class ToolSession:
    stream: LocalStream
    prompt: str = field(default_factory=nv.new_name)
    audio: str = field(default_factory=nv.new_name)

    async def start(self, tools: list[dict] | None = TOOLS) -> None:
        for e in [nv.session_start(), nv.prompt_start(self.prompt, tools=tools),
                  *nv.text_block(self.prompt, "SYSTEM", ["You are a friendly assistant."]),
                  nv.audio_content_start(self.prompt, self.audio)]:
            await self.stream.send(e)

    async def say(self, pcm: bytes) -> None:
        for i in range(0, len(pcm), 1024):
            await self.stream.send(nv.audio_input(self.prompt, self.audio, pcm[i : i + 1024]))

    async def text(self, text: str) -> None:
        for e in nv.text_block(self.prompt, "USER", [text], interactive=True):
            await self.stream.send(e)

    async def result(self, tool_use_id: str, content: str) -> None:
        name = nv.new_name()
        for e in [nv.tool_content_start(self.prompt, name, tool_use_id), nv.tool_result(self.prompt, name, content),
                  nv.content_end(self.prompt, name)]:
            await self.stream.send(e)

    async def turn(self, timeout: float = 10.0) -> tuple[list[dict], list]:
        """Raw and parsed output events up to and including the next usageEvent."""
        raw: list[dict] = []
        async with asyncio.timeout(timeout):
            while True:
                ev = await self.stream.receive()
                assert ev is not None, "the output ended"
                raw.append(ev)
                if nv.event_name(ev) == "usageEvent":
                    return raw, [nv.parse_output_event(e) for e in raw]

    async def finish(self) -> None:
        for e in [nv.content_end(self.prompt, self.audio), nv.prompt_end(self.prompt), nv.session_end()]:
            await self.stream.send(e)
        async with asyncio.timeout(10):
            while await self.stream.receive() is not None:
                pass


def tool_uses(events: list) -> list[nv.ToolUse]:
    return [e for e in events if isinstance(e, nv.ToolUse)]


def spoken(events: list, stage: str = "FINAL") -> str:
    return " ".join(t for b in blocks(events) if b.role == "ASSISTANT" and b.stage == stage for t in b.texts)


async def failure(stream: LocalStream) -> ModelError:
    """The error the stream's output ends with (bounded)."""
    with pytest.raises(ModelError) as info:
        async with asyncio.timeout(10):
            while True:
                assert await stream.receive() is not None, "the output ended without an error"
    return info.value


# ---------------------------------------------------------------------------------------------
# the engine


async def test_spoken_phrase_calls_the_declared_tool_and_the_result_is_spoken(make_engine):
    s = ToolSession(await (await make_engine()).open())
    await s.start()
    await s.say(utterance())
    raw, events = await s.turn()

    assert [type(e) for e in events[:3]] == [nv.UserSpeechStart, nv.CompletionStart, nv.UserSpeechEnd]
    assert shape(blocks(events)) == USER_BLOCK + FILLER_SHAPE + TOOL_SHAPE
    assert blocks(events)[0].texts == ["please record the call now"]
    assert spoken(events) == spoken(events, "SPECULATIVE") == "One moment."
    (use,) = tool_uses(events)
    assert use.tool_name == TOOL and use.tool_use_id.startswith("tooluse_") and len(use.tool_use_id) > 16
    assert isinstance(use.content, str) and json.loads(use.content) == ARGS  # a JSON string, as Nova's
    # the TOOL block: contentStart → toolUse → contentEnd, nothing between, ids and configuration as Nova's
    names = [nv.event_name(e) for e in raw]
    at = names.index("toolUse")
    assert names[at - 1 : at + 3] == ["contentStart", "toolUse", "contentEnd", "usageEvent"]
    start, use_raw, end = (nv.event_body(e) for e in raw[at - 1 : at + 2])
    assert (start["type"], start["role"]) == ("TOOL", "TOOL")
    assert start["toolUseOutputConfiguration"] == {"mediaType": "application/json"}
    assert start["contentId"] == use_raw["contentId"] == end["contentId"]
    assert (end["type"], end["stopReason"]) == ("TOOL", "TOOL_USE")
    assert all(use_raw[k] for k in ("sessionId", "promptName", "completionId"))

    await s.result(use.tool_use_id, json.dumps(RESULT))
    raw, events = await s.turn()
    assert shape(blocks(events)) == ONE_SENTENCE_REPLY  # the first output after the result is the reply
    assert spoken(events) == spoken(events, "SPECULATIVE") == SAID
    assert sum(len(b.audio) for b in blocks(events) if b.type == "AUDIO") > 0
    assert not any(isinstance(e, nv.CompletionStart) for e in events)
    assert s.stream.history[-3:] == [("USER", "please record the call now"), ("ASSISTANT", "One moment."),
                                     ("ASSISTANT", SAID)]
    await s.finish()
    assert s.stream.failed is None


async def test_typed_phrase_without_filler_and_a_result_that_is_compacted(make_engine):
    engine = await make_engine(tool_calls=json.dumps([{**RULE, "filler": ""}]))
    s = ToolSession(await engine.open())
    await s.start()
    await s.text("Could you RECORD the call, please?")  # case and punctuation do not matter
    _, events = await s.turn()
    assert shape(blocks(events)) == TOOL_SHAPE  # no USER block for typed text, no filler
    (use,) = tool_uses(events)
    # an object with no "result"/"message" and more than one field: the JSON, compacted
    await s.result(use.tool_use_id, json.dumps({"id": 17, "saved": True}, indent=2))
    _, events = await s.turn()
    assert spoken(events) == 'The record_call tool says: {"id":17,"saved":true}.'
    assert shape(blocks(events))[-1] == ("TEXT", "ASSISTANT", "FINAL", "END_TURN")
    await s.finish()


async def test_an_undeclared_tool_is_not_called(make_engine, caplog):
    s = ToolSession(await (await make_engine()).open())
    await s.start(tools=None)  # promptStart declares no tools
    with caplog.at_level("INFO", logger="novagate.local"):
        await s.say(utterance())
        _, events = await s.turn()
    assert tool_uses(events) == []
    assert shape(blocks(events))[0] == USER_BLOCK[0]
    assert spoken(events) == backends.DEFAULT_REPLY  # the usual (scripted) reply
    assert any("did not declare the tool" in r.getMessage() for r in caplog.records)
    await s.finish()


async def test_a_result_that_is_not_json_fails_the_stream_like_nova(make_engine):
    s = ToolSession(await (await make_engine()).open())
    await s.start()
    await s.say(utterance())
    _, events = await s.turn()
    (use,) = tool_uses(events)
    await s.result(use.tool_use_id, "the call was recorded")
    err = await failure(s.stream)
    assert (err.kind, err.message) == (VALIDATION, TOOL_RESULT_PARSE_ERROR)
    with pytest.raises(ModelError):
        await s.stream.send(nv.audio_input(s.prompt, s.audio, bytes(1024)))
    await s.stream.close()


async def test_unknown_or_answered_tool_use_ids_are_rejected(make_engine):
    engine = await make_engine()
    s = ToolSession(await engine.open())
    await s.start()
    await s.stream.send(nv.tool_content_start(s.prompt, "r1", "tooluse_madeup"))
    err = await failure(s.stream)
    assert err.kind == VALIDATION
    assert err.message.startswith("Invalid input request") and "unknown toolUseId 'tooluse_madeup'" in err.message

    s = ToolSession(await engine.open())
    await s.start()
    await s.say(utterance())
    _, events = await s.turn()
    (use,) = tool_uses(events)
    await s.result(use.tool_use_id, json.dumps(RESULT))
    await s.turn()
    await s.stream.send(nv.tool_content_start(s.prompt, "again", use.tool_use_id))  # a second result
    err = await failure(s.stream)
    assert err.kind == VALIDATION and "already answered" in err.message


async def test_a_late_result_as_user_text_is_spoken(make_engine):
    s = ToolSession(await (await make_engine()).open())
    await s.start(tools=None)  # works whatever the stream declares: it is text
    late = ("Result of the record_call tool call tooluse_from_an_old_stream (record the call): "
            '{"message": "Saved for later."}')
    await s.text(late)
    _, events = await s.turn()
    assert tool_uses(events) == []  # a result is not a request, though it contains the phrase
    assert shape(blocks(events)) == ONE_SENTENCE_REPLY
    assert spoken(events) == "The record_call tool says: Saved for later."
    # the text the session core sends (protocol/tool_calls.py) is recognised
    await played_out(s.stream)
    await s.text(late_result_text("get_weather", json.dumps({"result": "sunny"})))
    _, events = await s.turn()
    assert spoken(events) == "The get_weather tool says: sunny."
    await s.finish()


async def test_speech_while_a_result_is_awaited_is_a_new_turn(make_engine):
    """The choice documented in the engine: the stream goes on while a result is awaited; the result is
    answered when it comes."""
    engine = await make_engine(transcripts=("record the call", "what else"))
    s = ToolSession(await engine.open())
    await s.start()
    await s.say(utterance())
    _, events = await s.turn()
    (use,) = tool_uses(events)
    await played_out(s.stream)  # the filler has played: speaking now is not a barge-in
    await s.say(utterance(0.3))
    _, events = await s.turn()
    assert blocks(events)[0].texts == ["what else"] and spoken(events) == backends.DEFAULT_REPLY
    assert tool_uses(events) == []
    await s.result(use.tool_use_id, json.dumps({"status": "recorded"}))
    _, events = await s.turn()
    assert spoken(events) == "The record_call tool says: recorded."
    await s.finish()


# ---------------------------------------------------------------------------------------------
# the rules and the reply text (pure)


def test_tool_call_rules_are_parsed_and_checked(tmp_path):
    (rule,) = backends.parse_tool_calls(json.dumps(RULE))  # one object is a list of one
    assert rule == backends.ToolCallRule("record the call", TOOL, '{"reason":"demo","priority":2}', ("One moment.",))
    path = tmp_path / "rules.json"
    path.write_text(json.dumps([{"phrase": "Weather?", "tool": "get_weather", "filler": "Let me look. Hmm."}]))
    (rule,) = backends.parse_tool_calls(f"@{path}")
    assert (rule.phrase, rule.arguments, rule.filler) == ("weather", "{}", ("Let me look.", "Hmm."))
    assert backends.parse_tool_calls("") == backends.parse_tool_calls("  ") == ()
    for bad, fragment in [
        ("[{", "not valid JSON"), ("3", "JSON list"), ("[1]", "is not an object"),
        ('[{"tool": "t"}]', '"phrase"'), ('[{"phrase": "?!", "tool": "t"}]', '"phrase"'),
        ('[{"phrase": "p"}]', '"tool"'), ('[{"phrase": "p", "tool": "two words"}]', '"tool"'),
        ('[{"phrase": "p", "tool": "t", "arguments": [1]}]', '"arguments"'),
        ('[{"phrase": "p", "tool": "t", "filler": null}]', '"filler"'),
        ('[{"phrase": "p", "tool": "t", "argument": {}}]', "unknown key(s) argument"),
        (f"@{tmp_path / 'missing.json'}", "cannot read"),
    ]:
        with pytest.raises(ValueError) as info:
            backends.parse_tool_calls(bad)
        assert fragment in str(info.value), (bad, str(info.value))
    with pytest.raises(ValueError, match="not valid JSON"):
        ScriptedEngine(scripted_config(tool_calls="{nope"))
    rules = backends.parse_tool_calls([RULE, {"phrase": "call", "tool": "other"}])
    assert backends.tool_call_for(rules, "Please, record the CALL.").tool == TOOL  # the first that matches
    assert backends.tool_call_for(rules, "call me").tool == "other"
    assert backends.tool_call_for(rules, "hello") is None


def test_tool_reply_text_and_late_results():
    say = policy.tool_reply_text
    assert say("t", '{"result": "Done."}') == "The t tool says: Done."
    assert say("t", '{"message": "sent", "code": 3}') == "The t tool says: sent."
    assert say("t", '{"only": "field"}') == "The t tool says: field."
    assert say("t", '"a string"') == "The t tool says: a string."
    assert say("t", "[1, 2]") == "The t tool says: [1,2]."
    long = say("t", json.dumps({"result": "word " * 100}))
    assert len(long) < 240 and long.endswith("word…")
    assert policy.late_tool_result('Result of the get_weather tool call: {"result": "sunny"}') == (
        "get_weather", '{"result": "sunny"}')
    assert policy.late_tool_result("result of the `t` tool call") == ("t", "")
    assert policy.late_tool_result("The result of the t tool call: 1") is None
    assert backends.answering_late_tool_results(lambda t, h: ["usual"])("Result of the t tool call: 5", []) == [
        "The t tool says: 5."]


# ---------------------------------------------------------------------------------------------
# through the wire: the real SDK (BedrockTransport) against the emulator with the scripted engine


async def _until_tool_use(stream) -> dict:
    async with asyncio.timeout(15):
        while True:
            ev = await stream.receive()
            assert ev is not None, "the output ended before the toolUse"
            if nv.event_name(ev) == "toolUse":
                return nv.event_body(ev)


async def test_tool_round_trip_through_the_emulator_and_the_sdk(make_emu, make_bedrock):
    engine = ScriptedEngine(scripted_config(transcripts=("x",), tool_calls=[RULE], reply_s=0.6, lookahead_s=60.0))
    try:
        emu = await make_emu(engine)
        bt = make_bedrock(emu)
        p, a = "p", "a"
        setup = [nv.session_start(), nv.prompt_start(p, tools=TOOLS), *nv.text_block(p, "SYSTEM", ["Be brief."]),
                 nv.audio_content_start(p, a), nv.audio_input(p, a, bytes(1024)),
                 *nv.text_block(p, "USER", ["record the call"], interactive=True)]

        stream = await bt.open()
        for ev in setup:
            await stream.send(ev)
        use = await _until_tool_use(stream)
        assert use["toolName"] == TOOL and json.loads(use["content"]) == ARGS
        for ev in [nv.tool_content_start(p, "r", use["toolUseId"]), nv.tool_result(p, "r", json.dumps(RESULT)),
                   nv.content_end(p, "r"), nv.audio_input(p, a, bytes(1024))]:
            await stream.send(ev)
        text, roles = "", {}
        async with asyncio.timeout(15):
            while True:
                ev = await stream.receive()
                assert ev is not None
                name, body = nv.event_name(ev), nv.event_body(ev)
                if name == "contentStart":
                    roles[body["contentId"]] = body.get("additionalModelFields", "")
                elif name == "textOutput" and "FINAL" in roles.get(body["contentId"], ""):
                    text += body["content"]
                elif name == "contentEnd" and body["type"] == "TEXT" and body["stopReason"] == "END_TURN":
                    break
        assert text == SAID
        for ev in [nv.content_end(p, a), nv.prompt_end(p), nv.session_end()]:
            await stream.send(ev)
        out, err = await drain(stream)
        await stream.close()
        assert err is None and nv.event_name(out[-1]) == "completionEnd"

        # a result that is not JSON: Nova's validationException, through the wire
        stream = await bt.open()
        for ev in setup:
            await stream.send(ev)
        use = await _until_tool_use(stream)
        for ev in [nv.tool_content_start(p, "r", use["toolUseId"]), nv.tool_result(p, "r", "recorded!"),
                   nv.content_end(p, "r")]:
            await stream.send(ev)
        _, err = await drain(stream)
        await stream.close()
        assert (err.kind, err.message) == (VALIDATION, TOOL_RESULT_PARSE_ERROR)

        # a result for a toolUse the model never issued: the emulator's order check
        stream = await bt.open()
        for ev in [*setup[:5], nv.tool_content_start(p, "r", "tooluse_never")]:
            await stream.send(ev)
        _, err = await drain(stream)
        await stream.close()
        assert err.kind == VALIDATION and "unknown toolUseId 'tooluse_never'" in err.message
        assert [r.error_kind for r in emu.streams] == [None, VALIDATION, VALIDATION]
    finally:
        await engine.aclose()
