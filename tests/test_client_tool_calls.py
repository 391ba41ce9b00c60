"""The Python reference client (gateway/client.py) and `tool.call`: an ended call's receipt is kept like a
final transcript's until `item.saved` and handed back on resume; `novagate client` prints tool lines
live and for the tool items of a resumed history. Against tests/fake_voice_server.py, where the test
plays the model."""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
from pathlib import Path

import orjson
import pytest

from gateway.client import ClientState, VoiceClient, format_duration, history_line, run_cli, tool_line

from .fake_voice_server import FakeVoiceServer

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def fake():
    with FakeVoiceServer() as server:
        yield server


def test_lines():
    assert tool_line({"name": "record_call", "status": "started", "arguments": {"x": 1}}) == "[tool record_call started]"
    assert tool_line({"name": "record_call", "status": "finished", "duration_ms": 1234}) == \
        "[tool record_call finished 1.2 s]"
    assert tool_line({"name": "slow", "status": "timed_out", "duration_ms": 340}) == "[tool slow timed out 340 ms]"
    assert tool_line({"name": "x", "status": "cancelled"}) == "[tool x cancelled]"
    assert format_duration(None) == "" and format_duration(True) == "" and format_duration(999) == "999 ms"
    record = {"call_id": "call_1", "name": "record_call", "arguments": {"who": "Ann"}, "status": "failed",
              "duration_ms": 45, "result": {"error": {"type": "tool_error"}}}
    assert history_line({"item_id": "i", "role": "tool", "text": json.dumps(record)}).strip() == \
        "[tool record_call failed 45 ms]"
    assert history_line({"item_id": "i", "role": "tool", "text": "not a record"}).strip() == "[tool ?]"
    assert history_line({"item_id": "i", "role": "user", "text": "hello"}) == "     user: hello"
    assert history_line({"item_id": "i", "role": "assistant", "text": "Once", "interrupted": True}) == \
        "assistant: Once — interrupted"


async def test_tool_receipts_kept_until_saved_and_handed_back(fake, tmp_path):
    path = str(tmp_path / "state.json")
    client = VoiceClient(fake.url, state=ClientState.load(path))
    await client.connect(mic=False)
    try:
        await asyncio.to_thread(fake.tool, "call_1", "record_call", "started", arguments={"who": "Ann"})
        item_1 = await asyncio.to_thread(fake.tool, "call_1", "record_call", "finished", duration_ms=1200,
                                         arguments={"who": "Ann"}, result={"ok": True})
        item_2 = await asyncio.to_thread(fake.tool, "call_2", "lookup", "timed_out", duration_ms=8000, public=False)
        await client.wait_for(lambda: len(client.tool_calls) == 3, 10)
        assert [(c["call_id"], c["status"]) for c in client.tool_calls] == [
            ("call_1", "started"), ("call_1", "finished"), ("call_2", "timed_out")]
        assert client.finals == []  # a tool call is not a transcript
        stored = orjson.loads(Path(path).read_bytes())
        assert set(stored["pending"]) == {item_1, item_2}
        await asyncio.to_thread(fake.saved, item_1)
        await client.wait_for(lambda: item_1 in client.saved, 10)
        assert set(orjson.loads(Path(path).read_bytes())["pending"]) == {item_2}
    finally:
        await client.close()

    # a new process with the same state file: the unsaved tool receipt goes back in session.start
    again = VoiceClient(fake.url, state=ClientState.load(path))
    ready = await again.connect(mic=False)
    try:
        start = fake.messages("session.start")[-1]
        assert start["pending"] == [r for r, i in fake.receipts.items() if i == item_2]
        assert ready["resumed"] and [h["item_id"] for h in ready["history"]] == [item_1, item_2]
        await again.wait_for(lambda: item_2 in again.saved, 10)
        assert orjson.loads(Path(path).read_bytes())["pending"] == {}
    finally:
        await again.close()


def _args(url: str, state: str, text: str | None) -> argparse.Namespace:
    return argparse.Namespace(url=url, state=state, wav=None, text=text, out=None, new=False, token=None, voice=None,
                              output_rate=24000, timeout=30.0)


def _play_the_model(fake: FakeVoiceServer, errors: list) -> None:
    """A typed turn answered with a tool call, then a spoken reply (its audio ends, everything saved)."""
    try:
        fake.wait_for(lambda: fake.messages("input.text"), 15, "the typed turn")
        user = fake.transcript("user", "record my call")
        fake.tool("call_9", "record_call", "started", arguments={"who": "Bob"})
        tool = fake.tool("call_9", "record_call", "finished", duration_ms=1234, arguments={"who": "Bob"},
                         result={"saved": True})
        answer = fake.transcript("assistant", "Done.")
        fake.send({"type": "response.audio.start", "item_id": answer})
        fake.send({"type": "response.audio.end", "item_id": answer, "reason": "end_turn"})
        fake.saved(user, tool, answer)
    except Exception as e:  # noqa: BLE001 - reported by the test
        errors.append(e)


async def test_cli_prints_tool_lines_live_and_in_the_history(fake, tmp_path, capsys):
    state = str(tmp_path / "state.json")
    errors: list = []
    model = threading.Thread(target=_play_the_model, args=(fake, errors), daemon=True)
    model.start()
    assert await run_cli(_args(fake.url, state, "record my call")) == 0
    await asyncio.to_thread(model.join, 10)
    assert errors == []
    out = capsys.readouterr().out.splitlines()
    assert "           [tool record_call started]" in out
    assert "             arguments: {\"who\":\"Bob\"}" in out
    assert "           [tool record_call finished 1.2 s]" in out
    assert "             result: {\"saved\":true}" in out
    assert out.index("           [tool record_call finished 1.2 s]") < out.index("assistant: Done.")

    # resumed: the history is shown, its tool item as a tool line (not its JSON record)
    assert await run_cli(_args(fake.url, state, None)) == 0
    out = capsys.readouterr().out.splitlines()
    assert "resumed, 3 earlier items" in out[0], out
    assert out[1:4] == ["     user: record my call", "           [tool record_call finished 1.2 s]",
                        "assistant: Done."], out
    assert not any("{" in line for line in out), out
