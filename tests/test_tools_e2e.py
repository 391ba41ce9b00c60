"""Tools end to end on the AWS path: a gateway (engine=bedrock, store=agent-runtime) against the Nova
emulator (scripted engine, told to call a declared tool when the user asks for it) and the Agent Runtime
stand-in, with real MCP servers over stdio (the shipped sales-calls example and a server written for the
tests). What the model received is read from the emulator's engine trace."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import orjson
import pytest

from gateway.client import ClientState, VoiceClient

from .conftest import GRAMMAR, ROOT, AwsStack, Gateway

RULES = [
    {"phrase": "record the call", "tool": "record_call",
     "arguments": {"doctor": "Dr. Okafor", "product": "Cardiolex", "when": "this morning", "notes": "wants samples"}},
    {"phrase": "check slowly", "tool": "slow", "arguments": {"seconds": 8}},
]


def trace_lines(stack: AwsStack) -> list[dict]:
    """Every input event the emulator's engine received, in order."""
    return [orjson.loads(x) for x in stack.trace.read_text().splitlines()] if stack.trace.exists() else []


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    # the emulator on the scripted engine, told to call a declared tool when the user asks for it
    s = AwsStack(tmp_path_factory.mktemp("tools-aws"), engine_args=(
        "--engine", "scripted", "--endpoint-ms", "600", "--scripted-transcripts", "I am still here",
        "--tool-calls", json.dumps(RULES), "--no-warm")).start()
    yield s
    s.stop()


@pytest.fixture
def env(tmp_path, stack) -> dict:
    """A gateway's settings: the AWS path and the MCP servers (stdio, in the mcpServers format)."""
    config = {"mcpServers": {
        "sales_calls": {"command": "python", "args": [str(ROOT / "examples/sales_calls/server.py")],
                        "env": {"SALES_CALLS_DB": str(tmp_path / "calls.sqlite3")}, "public": ["record_call"]},
        "checks": {"command": "python", "args": [str(ROOT / "tests/mcp_test_server.py")]},
    }}
    (tmp_path / "mcp.json").write_text(json.dumps(config))
    return {**stack.gateway_env(), "NOVAGATE_MCP_CONFIG": str(tmp_path / "mcp.json"),
            "NOVAGATE_SECRET": "tools-e2e-secret-0123456789abcdef0123456789",
            "NOVAGATE_LOCAL_GRAMMAR": GRAMMAR}


def tone(seconds: float, rate: int = 16000) -> bytes:
    import numpy as np

    t = np.arange(int(seconds * rate)) / rate
    return (np.sin(2 * np.pi * 220 * t) * 8000).astype("<i2").tobytes()


def calls_in(db: Path) -> list[tuple]:
    with sqlite3.connect(db) as c:
        return c.execute("SELECT doctor, product, happened, notes FROM calls").fetchall()


async def test_the_model_calls_an_mcp_tool_and_speaks_its_result(env, stack, tmp_path):
    gw = Gateway(tmp_path / "gw", env)
    (tmp_path / "gw").mkdir()
    gw.start()
    try:
        client = VoiceClient(gw.ws, state=ClientState())
        await client.connect(mic=False)
        result = await client.turn(text="Please record the call with Dr. Okafor.", timeout=60)
        await client.wait_for(lambda: len(client.tool_calls) == 2 and client.tool_calls[1]["item_id"] in client.saved)
        await client.close()
    finally:
        gw.stop()
    started, ended = client.tool_calls
    assert (started["name"], started["status"]) == ("record_call", "started")
    assert started["arguments"] == RULES[0]["arguments"]  # public: the client sees what the model asked
    assert ended["status"] == "finished" and ended["duration_ms"] >= 0 and ended["receipt"]
    assert "The record_call tool says" in result["assistant"]
    # the tool really ran, with the model's arguments
    assert calls_in(tmp_path / "calls.sqlite3") == [("Dr. Okafor", "Cardiolex", "this morning", "wants samples")]
    # what the model received: every tool in promptStart, then one valid TOOL block for its toolUseId
    trace = trace_lines(stack)
    prompt = [r for r in trace if r["event"] == "promptStart"][-1]
    assert {"record_call", "list_calls", "slow", "weather"} <= set(prompt["tools"])
    stream = prompt["stream"]
    tool_block = [r for r in trace if r["stream"] == stream and r["type"] == "TOOL"]
    assert [r["event"] for r in tool_block] == ["contentStart", "toolResult", "contentEnd"]
    assert tool_block[0]["toolUseId"].startswith("tooluse_")
    assert json.loads(tool_block[1]["content"])["doctor"] == "Dr. Okafor"


async def test_a_slow_tool_outlives_a_rotation_while_the_user_talks(env, stack, tmp_path):
    """The tool takes 8 s; the stream is rotated by force at 3 s while the user keeps talking. The result
    reaches the new stream as a user turn and the user hears the answer."""
    gw = Gateway(tmp_path / "gw", {**env, "NOVAGATE_ROTATE_AFTER_S": "1", "NOVAGATE_ROTATE_FORCE_AFTER_S": "3"})
    (tmp_path / "gw").mkdir()
    gw.start()
    try:
        client = VoiceClient(gw.ws, state=ClientState())
        await client.connect(mic=True)  # an open microphone: silence, and speech when it says something
        await client.send_text("Could you check slowly for me?")
        await client.wait_for(lambda: client.tool_calls, 30)
        for _ in range(4):  # the user keeps talking while the tool runs (and the stream is replaced)
            await client.say(tone(1.0))
            await client.say(bytes(32000))
        await client.wait_for(lambda: any(c["status"] != "started" for c in client.tool_calls), 30)
        await client.wait_for(lambda: any("slow tool says" in f["text"] for f in client.finals_of("assistant")), 30)
        await client.close()
    finally:
        gw.stop()
    ended = client.tool_calls[-1]
    assert ended["name"] == "slow" and ended["status"] == "finished" and ended["duration_ms"] >= 7000
    assert "arguments" not in ended  # not public
    trace = trace_lines(stack)
    asked = next(r["stream"] for r in trace if r["event"] == "textInput" and r["interactive"]
                 and "check slowly" in (r.get("content") or ""))
    told = [r for r in trace if r["event"] == "textInput" and r["interactive"]
            and (r.get("content") or "").startswith("Result of the slow tool call")]
    assert told and told[0]["stream"] != asked  # the stream that asked was gone: the next one was told
    assert told[0]["content"].endswith('{"content":["done"]}')
    heard = [r for r in trace if r["event"] == "textInput" and "I am still here" in (r.get("content") or "")]
    assert heard  # what the user said while the tool ran was heard (and is in later streams' history)


async def test_a_tool_result_survives_kill_9_and_reaches_the_model_after_resume(env, stack, tmp_path):
    (tmp_path / "gw").mkdir()
    gw = Gateway(tmp_path / "gw", env).start()
    state = ClientState()
    try:
        client = VoiceClient(gw.ws, state=state)
        await client.connect(mic=False)
        await client.turn(text="Record the call, please.", timeout=60)
        ended = await client.wait_for(lambda: next((c for c in client.tool_calls if c["status"] == "finished"
                                                    and c["item_id"] in client.saved), None))
    finally:
        gw.kill()  # SIGKILL: no drain, no flush
    port = gw.port
    gw2 = Gateway(tmp_path / "gw", env).start(port=port)
    try:
        again = VoiceClient(gw2.ws, state=state)
        ready = await again.connect(mic=False)
        await again.turn(text="What did the tool say?", timeout=60)
        await again.close()
    finally:
        gw2.stop()
    assert ready["resumed"]
    tools = [i for i in ready["history"] if i["role"] == "tool"]
    assert [i["item_id"] for i in tools] == [ended["item_id"]]
    assert json.loads(tools[0]["text"])["result"]["doctor"] == "Dr. Okafor"
    trace = trace_lines(stack)
    last = [r["stream"] for r in trace if r["event"] == "promptStart"][-1]  # the newest (ids do not sort: "-9-" > "-10-")
    history = " ".join(r["content"] for r in trace if r["stream"] == last and r["event"] == "textInput"
                       and not r["interactive"])
    assert "(I called the record_call tool with" in history and "Dr. Okafor" in history
