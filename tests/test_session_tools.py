"""Tool calls in the session core, on a fake clock: the round trip per Nova's rules, deadlines, calls that
outlive their stream, the client's `tool.call` messages and the tool items in the history."""

from __future__ import annotations

import orjson

from protocol import messages as m
from protocol import nova_events as nova
from protocol.items import Item
from protocol.codes import CloseCode
from protocol.session import State
from tests.session_harness import SILENCE, FakeStore, Harness

TOOLS = (
    {"toolSpec": {"name": "lookup", "description": "look something up",
                  "inputSchema": {"json": '{"type":"object","properties":{"q":{"type":"string"}}}'}}},
    {"toolSpec": {"name": "secret", "description": "", "inputSchema": {"json": '{"type":"object"}'}}},
)


def harness(**kw) -> Harness:
    kw.setdefault("tools", TOOLS)
    kw.setdefault("public_tools", frozenset({"lookup"}))
    h = Harness(**kw)
    h.tool = "lookup"
    return h


def prompt_tools(model) -> list[str]:
    body = next(nova.event_body(e) for e in model.setup if nova.event_name(e) == "promptStart")
    return [t["toolSpec"]["name"] for t in body.get("toolConfiguration", {}).get("tools", [])]


def tool_items(h: Harness) -> list[dict]:
    return [orjson.loads(i.text) for i in h.s.history if i.role == "tool"]


def test_round_trip_started_finished_and_heard():
    h = harness()
    h.connect()
    model = h.current_model
    assert prompt_tools(model) == ["lookup", "secret"]
    h.say(1)
    h.until(lambda: h.tool_runs, 3)
    run = h.tool_runs[0]
    assert (run.name, run.arguments) == ("lookup", {"q": "turn 1"})
    started = h.of(m.ToolCall)
    assert [(c.status, c.arguments) for c in started] == [("started", {"q": "turn 1"})]
    h.run(0.5, SILENCE)  # the tool takes its time; audio keeps flowing to the model
    assert model.audio["keepalive"] + model.audio["client"] > 0 and not model.tool_results
    h.finish_tool(run.call_id, '{"answer": 42}')
    assert model.tool_results == [(f"tooluse_{model.sid}_0", '{"answer": 42}')]  # the toolUseId it asked with
    h.until(lambda: len(h.finals("assistant")) == 2, 5)
    # what it said before the call is one item, what it says with the result the next
    first, answer = h.finals("assistant")
    assert first.text == "one moment" and 'the tool said {"answer": 42}' in answer.text
    assert first.item_id != answer.item_id
    done = h.of(m.ToolCall)[-1]
    assert (done.status, done.result, done.arguments) == ("finished", {"answer": 42}, {"q": "turn 1"})
    assert done.duration_ms >= 500 and done.item_id and done.receipt
    # the items: the filler, one record of the call, the answer, in the order they happened, stored
    assert [i.role for i in h.s.history] == ["user", "assistant", "tool", "assistant"]
    record = tool_items(h)[0]
    assert record["name"] == "lookup" and record["status"] == "finished" and record["result"] == {"answer": 42}
    h.until(lambda: len(h.store.convs["conv1"].items) == 4, 2)
    assert h.store.convs["conv1"].items[2].item_id == done.item_id
    assert h.counts[("tool_calls", "started")] == 1 and h.counts[("tool_calls", "finished")] == 1


def test_private_tools_show_no_arguments_or_results():
    h = harness(public_tools=frozenset())
    h.connect()
    h.say(1)
    h.until(lambda: h.tool_runs, 3)
    h.finish_tool(h.tool_runs[0].call_id, '{"pin": "1234"}')
    calls = h.of(m.ToolCall)
    assert [c.status for c in calls] == ["started", "finished"]
    assert all(c.arguments is None and c.result is None for c in calls)
    assert "1234" not in orjson.dumps([m.to_wire(c) for c in calls]).decode()


def test_an_unknown_tool_and_bad_arguments_are_answered_at_once_as_json_errors():
    h = harness()
    h.tool = "nope"
    h.connect()
    model = h.current_model
    h.say(1)
    h.until(lambda: model.tool_results, 3)
    assert not h.tool_runs
    assert orjson.loads(model.tool_results[0][1])["error"]["type"] == "unknown_tool"
    assert h.of(m.ToolCall)[-1].status == "failed"
    # arguments that are not a JSON object
    h.s.model_event(model.sid, nova.output_tool_use({"sessionId": "s", "promptName": "p", "completionId": "c"},
                                                     "tx", "tooluse_x", "lookup", "[1, 2]"), h.now)
    model.tool_uses.add("tooluse_x")
    h.pump()
    assert orjson.loads(model.tool_results[-1][1])["error"]["type"] == "invalid_arguments"


def test_a_tool_past_its_deadline_is_answered_with_a_timeout_and_cancelled():
    h = harness(tool_timeout_s=2.0)
    h.connect()
    model = h.current_model
    h.say(1)
    h.until(lambda: h.tool_runs, 3)
    call_id = h.tool_runs[0].call_id
    h.until(lambda: model.tool_results, 3)
    assert h.cancelled == [call_id]
    assert orjson.loads(model.tool_results[0][1])["error"]["type"] == "timeout"
    assert h.of(m.ToolCall)[-1].status == "timed_out"
    h.finish_tool(call_id, '{"late": true}')  # too late: answered once only
    assert len(model.tool_results) == 1 and len(tool_items(h)) == 1
    h.until(lambda: h.finals("assistant"), 5)


def test_a_non_json_result_is_answered_as_an_error_never_passed_on():
    h = harness()
    h.connect()
    model = h.current_model
    h.say(1)
    h.until(lambda: h.tool_runs, 3)
    h.finish_tool(h.tool_runs[0].call_id, "not json")
    assert orjson.loads(model.tool_results[0][1])["error"]["type"] == "invalid_result"
    assert h.of(m.ToolCall)[-1].status == "failed"


def test_a_result_after_the_stream_was_replaced_is_told_to_the_next_one():
    h = harness()
    h.connect()
    first = h.current_model
    h.say(1)
    h.until(lambda: h.tool_runs, 3)
    h.s.stream_failed(first.sid, "internalServerException", "boom", h.now)  # recovery while the tool runs
    h.pump()
    h.until(lambda: h.state is State.LIVE and h.current_model is not first, 5)
    second = h.current_model
    assert prompt_tools(second) == ["lookup", "secret"]
    assert second.typed == []  # the user's turn is not asked again: the model would call the tool twice
    h.run(0.5, SILENCE)
    h.finish_tool(h.tool_runs[0].call_id, '{"answer": 7}')
    assert first.tool_results == [] and second.tool_results == []  # that toolUseId does not exist any more
    h.until(lambda: second.typed, 3)
    assert second.typed[0].startswith('Result of the lookup tool call you made earlier: {"answer": 7}')
    h.until(lambda: len(h.finals("assistant")) == 2, 5)
    # the filler the first stream spoke (settled when it was replaced), the call, the answer to its result
    assert [i.role for i in h.s.history] == ["user", "assistant", "tool", "assistant"]
    assert h.finals("assistant")[0].text == "one moment"
    assert h.finals("assistant")[1].text.startswith("answer to typed Result of the lookup tool call")


def test_quiet_rotation_waits_for_a_running_tool_and_the_next_stream_reads_it_in_its_history():
    h = harness(rotate_after_s=2.0, rotate_force_after_s=30.0)
    h.connect()
    first = h.current_model
    h.say(1)
    h.until(lambda: h.tool_runs, 3)
    h.run(4, SILENCE)
    assert h.current_model is first  # past rotate_after_s, but a tool is running: not quiet
    h.finish_tool(h.tool_runs[0].call_id, '{"answer": 9}')
    h.until(lambda: h.current_model is not first, 10)
    history = " ".join(h.current_model.history_texts())
    assert '(I called the lookup tool with {"q":"turn 1"}; it answered {"answer":9}.)' in history


def test_resume_gives_the_model_the_tool_result_in_its_history():
    store = FakeStore()
    cid = store.create("anon:x")
    record = '{"call_id":"call_1","name":"lookup","arguments":{"q":"x"},"status":"finished","duration_ms":5,' \
             '"result":{"answer":1}}'
    store.convs[cid].items = [Item("i1", "user", "look it up", "t"), Item("i2", "tool", record, "t"),
                              Item("i3", "assistant", "It is one.", "t")]
    h = harness(store=store)
    ready = h.connect(resume=f"resume|{cid}|anon:x")
    assert ready.resumed and [i["role"] for i in ready.history] == ["user", "tool", "assistant"]
    texts = h.current_model.history_texts()
    assert texts[-1] == '(I called the lookup tool with {"q":"x"}; it answered {"answer":1}.) It is one.'


def test_closing_waits_for_a_running_tool_and_keeps_its_result():
    h = harness()
    h.connect()
    h.say(1)
    h.until(lambda: h.tool_runs, 3)
    h.s.client_gone(h.now)
    h.pump()
    assert h.state is State.CLOSING
    h.run(1, None)
    assert h.state is State.CLOSING  # the tool may still answer within the close flush
    h.finish_tool(h.tool_runs[0].call_id, '{"answer": 3}')
    h.until(lambda: h.state is State.CLOSED, 3, None)
    assert [orjson.loads(i.text)["status"] for i in h.store.convs["conv1"].items if i.role == "tool"] == ["finished"]


def test_closing_waits_for_a_slow_tool_until_its_deadline_then_cancels_it():
    h = harness(tool_timeout_s=8.0)
    h.connect()
    h.say(1)
    h.until(lambda: h.tool_runs, 3)
    h.s.client_gone(h.now)
    h.pump()
    h.run(6, None)
    assert h.state is State.CLOSING and not h.cancelled  # past the 5 s flush: the tool still may answer
    h.until(lambda: h.state is State.CLOSED, 10, None)
    assert h.cancelled == [h.tool_runs[0].call_id]
    assert tool_items(h)[0]["status"] == "timed_out"
    assert [orjson.loads(i.text)["status"] for i in h.store.convs["conv1"].items if i.role == "tool"] == ["timed_out"]


def test_a_drain_waits_for_running_tools_and_the_answer_before_sending_the_client_away():
    """A rolling update while a tool runs: a session resumed on another instance would never hear the
    result, so the model is told here first and the client is sent away once it has answered."""
    h = harness(drain_flush_s=20.0)
    h.connect()
    model = h.current_model
    h.say(1)
    h.until(lambda: h.tool_runs, 3)
    h.s.drain(300, h.now)
    h.pump()
    h.run(2, SILENCE)
    assert not h.of(m.SessionReconnect) and h.state is State.LIVE  # the tool is still running
    h.finish_tool(h.tool_runs[0].call_id, '{"answer": 5}')
    assert model.tool_results  # told on this stream
    h.until(lambda: h.of(m.SessionReconnect), 5)
    assert h.finals("assistant") and 'the tool said {"answer": 5}' in h.finals("assistant")[-1].text
    h.until(lambda: h.closed is not None, 12, None)
    assert h.closed == CloseCode.SERVICE_RESTART
    stored = [i.role for i in h.store.convs["conv1"].items]
    assert stored == ["user", "assistant", "tool", "assistant"]


def test_a_drain_does_not_wait_past_half_its_flush_for_a_stuck_tool():
    h = harness(drain_flush_s=4.0, tool_timeout_s=60.0)
    h.connect()
    h.say(1)
    h.until(lambda: h.tool_runs, 3)
    h.s.drain(300, h.now)
    h.pump()
    h.run(1.9, SILENCE)
    assert not h.of(m.SessionReconnect)
    h.run(0.2, SILENCE)
    assert h.of(m.SessionReconnect) == [m.SessionReconnect("draining", 300)]
    h.until(lambda: h.closed is not None, 5, None)
    assert h.closed == CloseCode.SERVICE_RESTART and h.cancelled == [h.tool_runs[0].call_id]


def test_a_result_on_the_connection_taken_over_reaches_the_session_that_took_over():
    """The client moves to another instance by itself while a tool runs on the first: the old session
    still stores the tool's record, and the new one reads it back and tells the model and the client."""
    store = FakeStore()
    a = harness(store=store)
    ready = a.connect()
    a.say(1)
    a.until(lambda: a.tool_runs, 3)
    a.s.client_gone(a.now)  # the network changed: the client reconnects elsewhere
    a.pump()
    b = harness(store=store)
    b.now = a.now
    assert b.connect(resume=ready.resume_token).resumed  # b holds the conversation now
    assert [(i.role, i.interrupted) for i in b.s.history] == [("user", False), ("assistant", True)]  # cut mid-turn
    a.finish_tool(a.tool_runs[0].call_id, '{"answer": 11}')  # on the old instance, taken over
    a.until(lambda: a.state is State.CLOSED, 3, None)
    assert [i.role for i in store.convs["conv1"].items] == ["user", "assistant", "tool"]  # stored all the same
    b.until(lambda: b.current_model.typed, 10)
    assert b.current_model.typed[0] == 'Result of the lookup tool call you made earlier: {"answer":11}'
    told = b.of(m.ToolCall)[-1]
    assert (told.name, told.status, told.result) == ("lookup", "finished", {"answer": 11})
    assert told.item_id in {x.item_id for x in b.of(m.ItemSaved)}
    assert [i.role for i in b.s.history] == ["user", "assistant", "tool"]
    b.until(lambda: b.finals("assistant"), 5)
