"""InputOrderValidator: the service's input event-order rules (reference/nova-sonic.md §2, §4), the history
limits of each model (protocol/models.py), and InputGap (what keeps a stream alive under the 532 rule)."""

from __future__ import annotations

import pytest

from protocol import nova_events as nv
from protocol.continuity import VALIDATION, Failure, classify
from protocol.event_order import INPUT_GAP_MESSAGE, EventOrderError, InputGap, InputOrderValidator
from protocol.models import (
    CONSERVATIVE_HISTORY,
    NOVA_2_5_SONIC,
    NOVA_2_HISTORY,
    NOVA_2_SONIC,
    NOVA_SONIC_V1,
    HistoryLimits,
    model_spec,
)
from protocol.nova_events import MAX_HISTORY_BYTES, MAX_TEXT_INPUT_BYTES

KB = 1024

P = "prompt-1"


def _tool_use(tool_use_id: str) -> dict:
    """Not an input event: the model emitting a toolUse with this id (what the engine reports)."""
    return {"model toolUse": tool_use_id}


def _run(events: list[dict], v: InputOrderValidator | None = None) -> InputOrderValidator:
    v = v or InputOrderValidator()
    for e in events:
        if "model toolUse" in e:
            v.model_tool_use(e["model toolUse"])
        else:
            v.check(e)
    return v


def _rejects(events: list[dict], bad: dict, *fragments: str) -> EventOrderError:
    v = _run(events)
    with pytest.raises(EventOrderError) as info:
        v.check(bad)
    msg = info.value.message
    assert msg.startswith("Invalid input request: ")
    assert str(info.value) == msg
    for f in fragments:
        assert f in msg, msg
    return info.value


def _text(role: str, name: str, text: str = "hi", *, interactive: bool = False) -> list[dict]:
    return [
        nv.text_content_start(P, name, role, interactive=interactive),
        nv.text_input(P, name, text),
        nv.content_end(P, name),
    ]


def _setup() -> list[dict]:
    return [nv.session_start(), nv.prompt_start(P), *_text("SYSTEM", "sys", "You are helpful.")]


def _with_audio() -> list[dict]:
    return [*_setup(), nv.audio_content_start(P, "mic"), nv.audio_input(P, "mic", b"\0\0" * 512)]


def test_valid_full_session_with_history_interactive_text_and_tool_result():
    events = [
        *_setup(),
        *_text("USER", "h1", "I met with Doctor Smith today at two pm."),
        *_text("ASSISTANT", "h2", "Got it."),
        nv.text_content_start(P, "h3", "USER"),
        nv.text_input(P, "h3", "a" * MAX_TEXT_INPUT_BYTES),  # split long history: each piece ≤ 1 KB
        nv.text_input(P, "h3", "b" * MAX_TEXT_INPUT_BYTES),
        nv.content_end(P, "h3"),
        nv.audio_content_start(P, "mic"),
        nv.audio_input(P, "mic", b"\0\0" * 512),
        *_text("USER", "t1", "x" * 3000, interactive=True),  # interactive text: no 1 KB limit, audio stays open
        nv.audio_input(P, "mic", b"\0\0" * 512),
        _tool_use("tooluse_1"),
        nv.tool_content_start(P, "tool1", "tooluse_1"),
        nv.tool_result(P, "tool1", '{"ok": true}'),
        nv.content_end(P, "tool1"),
        nv.audio_input(P, "mic", b"\0\0" * 512),
        nv.content_end(P, "mic"),
        nv.prompt_end(P),
        nv.session_end(),
    ]
    v = InputOrderValidator()
    assert not v.audio_started
    _run(events, v)
    assert v.audio_started and v.session_ended and v.prompt_ended
    assert v.prompt_name == P
    assert v.history_bytes == len("I met with Doctor Smith today at two pm.") + len("Got it.") + 2 * MAX_TEXT_INPUT_BYTES
    assert v.block("h1").is_history and not v.block("t1").is_history
    assert v.open_text is None and v.open_audio is None


def test_minimal_session_and_text_only_session():
    _run([*_with_audio(), nv.content_end(P, "mic"), nv.prompt_end(P), nv.session_end()])
    _run([*_setup(), *_text("USER", "t", "hello", interactive=True), nv.prompt_end(P), nv.session_end()])
    _run([nv.session_start(), nv.session_end()])  # a session without a prompt may end


@pytest.mark.parametrize(
    ("events", "bad", "fragments"),
    [
        ([], nv.prompt_start(P), ["before sessionStart"]),
        ([nv.session_start()], nv.session_start(), ["sessionStart received twice"]),
        ([nv.session_start(), nv.prompt_start(P)], nv.prompt_start("other"), ["promptStart received twice"]),
        ([nv.session_start()], nv.text_content_start(P, "s", "SYSTEM"), ["before promptStart"]),
        ([nv.session_start()], {"event": {"promptStart": {"promptName": ""}}}, ["promptName"]),
        ([nv.session_start()], nv.prompt_start(P, output_sample_rate=44100), ["sampleRateHertz 44100"]),
        (_setup(), nv.text_content_start("other", "x", "USER"), ["promptName 'other'", f"'{P}'"]),
        (_setup(), nv.text_content_start(P, "sys", "USER"), ["reuses contentName 'sys'"]),
        (_setup(), {"event": {"contentStart": {"promptName": P, "type": "TEXT", "role": "USER"}}},
         ["contentName"]),
        (_setup(), {"event": {"contentStart": {"promptName": P, "contentName": "v", "type": "VIDEO",
                                                "role": "USER"}}}, ["unsupported type"]),
        (_setup(), nv.text_content_start(P, "s2", "SYSTEM"), ["SYSTEM text block is only allowed"]),
        (_setup(), nv.text_content_start(P, "r", "ROBOT"), ["unsupported role"]),
        (_setup(), nv.text_content_start(P, "h", "ASSISTANT"), ["must start with a USER message"]),
        (_with_audio(), nv.text_content_start(P, "h", "USER"), ["after audio streaming started"]),
        ([*_setup(), *_text("USER", "t", interactive=True)], nv.text_content_start(P, "h", "USER"),
         ["after interactive input"]),
        ([*_setup(), nv.text_content_start(P, "t", "USER", interactive=True)],
         nv.text_content_start(P, "t2", "USER", interactive=True), ["TEXT content 't' is open"]),
        ([*_setup(), nv.text_content_start(P, "t", "USER", interactive=True)], nv.audio_content_start(P, "mic"),
         ["TEXT content 't' is open"]),
        (_with_audio(), nv.audio_content_start(P, "mic2"), ["AUDIO content 'mic' is open"]),
        (_setup(), {"event": {"contentStart": {"promptName": P, "contentName": "a", "type": "AUDIO",
                                                "role": "ASSISTANT", "interactive": True}}}, ["role USER"]),
        (_setup(), nv.audio_content_start(P, "mic", sample_rate=44100), ["sampleRateHertz 44100"]),
        (_setup(), {"event": {"contentStart": {"promptName": P, "contentName": "t", "type": "TOOL",
                                                "role": "TOOL", "interactive": False}}}, ["toolUseId"]),
        (_setup(), nv.audio_input(P, "mic", b"\0\0"), ["no content block with that name"]),
        ([*_with_audio(), nv.text_content_start(P, "t", "USER", interactive=True)],
         nv.audio_input(P, "mic", b"\0\0"), ["audioInput received while TEXT content 't' is open",
                                             "no audio inside an open text block"]),
        ([*_with_audio(), _tool_use("tu1"), nv.tool_content_start(P, "tl", "tu1")],
         nv.audio_input(P, "mic", b"\0\0"), ["TOOL content 'tl' is open"]),
        (_with_audio(), nv.audio_input(P, "other", b"\0\0"), ["audioInput for content 'other'"]),
        ([*_with_audio(), nv.content_end(P, "mic")], nv.audio_input(P, "mic", b"\0\0"),
         ["after that content block was closed"]),
        (_with_audio(), nv.text_input(P, "mic", "hi"), ["textInput belongs inside its open TEXT block"]),
        (_setup(), nv.text_input(P, "sys", "late"), ["after that content block was closed"]),
        (_with_audio(), nv.tool_result(P, "mic", "{}"), ["toolResult belongs inside its open TOOL block"]),
        ([*_with_audio(), nv.text_content_start(P, "t", "USER", interactive=True)], nv.tool_result(P, "t", "{}"),
         ["toolResult"]),
        (_setup(), nv.content_end(P, "nope"), ["contentEnd for content 'nope'"]),
        ([*_with_audio(), nv.text_content_start(P, "t", "USER", interactive=True)], nv.content_end(P, "mic"),
         ["close it first"]),
        (_with_audio(), nv.prompt_end(P), ["promptEnd received while AUDIO content 'mic' is open"]),
        ([*_setup(), nv.text_content_start(P, "t", "USER", interactive=True)], nv.prompt_end(P),
         ["promptEnd received while TEXT content 't' is open"]),
        ([*_setup(), nv.prompt_end(P)], nv.text_content_start(P, "x", "USER", interactive=True),
         ["after promptEnd"]),
        (_setup(), nv.session_end(), ["sessionEnd received while prompt", "send promptEnd first"]),
        ([*_setup(), nv.prompt_end(P), nv.session_end()], nv.session_start(), ["after sessionEnd"]),
        ([*_setup(), nv.prompt_end(P), nv.session_end()], nv.session_end(), ["after sessionEnd"]),
        (_setup(), {"event": {"connectionEnd": {}}}, ["unknown input event 'connectionEnd'"]),
        (_setup(), {"event": {}}, ["malformed event"]),
        (_setup(), {"nope": 1}, ["malformed event"]),
        (_setup(), {"event": {"textInput": "x"}}, ["malformed textInput"]),
    ],
)
def test_rule_violations_are_rejected(events, bad, fragments):
    _rejects(events, bad, *fragments)


def _tool_result(name: str, tool_use_id: str, content: str = '{"ok": true}') -> list[dict]:
    return [nv.tool_content_start(P, name, tool_use_id), nv.tool_result(P, name, content), nv.content_end(P, name)]


def test_tool_results_answer_the_models_tool_uses_once():
    v = _run([*_with_audio(), _tool_use("tooluse_a"), _tool_use("tooluse_b")])
    assert v.pending_tool_uses == {"tooluse_a", "tooluse_b"}
    _run([*_tool_result("r1", "tooluse_b"), nv.audio_input(P, "mic", b"\0\0" * 512)], v)
    assert v.pending_tool_uses == {"tooluse_a"}
    assert v.block("r1").tool_use_id == "tooluse_b" and v.open_text is None
    # never issued
    with pytest.raises(EventOrderError, match="unknown toolUseId 'tooluse_x': the model issued no toolUse") as info:
        v.check(nv.tool_content_start(P, "r2", "tooluse_x"))
    assert info.value.message.startswith("Invalid input request: TOOL contentStart 'r2'")
    # already answered
    with pytest.raises(EventOrderError, match="unknown toolUseId 'tooluse_b': that toolUse was already answered"):
        v.check(nv.tool_content_start(P, "r2", "tooluse_b"))
    v.model_tool_use("tooluse_b")  # an id is issued once: reporting it again does not reopen it
    with pytest.raises(EventOrderError, match="already answered"):
        v.check(nv.tool_content_start(P, "r2", "tooluse_b"))
    _run(_tool_result("r2", "tooluse_a"), v)  # the rejections left the state as it was
    assert v.pending_tool_uses == frozenset()
    _run([nv.content_end(P, "mic"), nv.prompt_end(P), nv.session_end()], v)


def test_tool_blocks_and_results_keep_to_their_block():
    base = [*_with_audio(), _tool_use("tu")]
    # a TOOL block cannot start while a TEXT block is open, nor a TEXT block inside a TOOL block
    _rejects([*base, nv.text_content_start(P, "t", "USER", interactive=True)], nv.tool_content_start(P, "r", "tu"),
             "contentStart 'r' (TOOL) received while TEXT content 't' is open")
    _rejects([*base, nv.tool_content_start(P, "r", "tu")], nv.text_content_start(P, "t", "USER", interactive=True),
             "received while TOOL content 'r' is open")
    # toolResult: not inside a TEXT block, not before or after its TOOL block, not in another TOOL block
    _rejects([*base, nv.text_content_start(P, "t", "USER", interactive=True)], nv.tool_result(P, "t", "{}"),
             "toolResult for content 't' received but that block is TEXT")
    _rejects(base, nv.tool_result(P, "r", "{}"), "no content block with that name was started")
    _rejects([*base, *_tool_result("r", "tu")], nv.tool_result(P, "r", "{}"), "after that content block was closed")
    _rejects([*base, _tool_use("tu2"), *_tool_result("r", "tu"), nv.tool_content_start(P, "r2", "tu2")],
             nv.tool_result(P, "r", "{}"), "toolResult belongs inside its open TOOL block")
    _rejects([*base, nv.tool_content_start(P, "r", "tu")],
             {"event": {"toolResult": {"promptName": P, "contentName": "r", "content": {"ok": True}}}},
             "requires a string content")


def test_tool_use_ids_unchecked_for_a_caller_that_cannot_see_the_output():
    v = InputOrderValidator(check_tool_use_ids=False)
    _run([*_with_audio(), *_tool_result("r", "tooluse_anything")], v)
    _run(_tool_result("r2", "tooluse_anything"), v)


def test_first_content_block_must_be_system_text():
    start = [nv.session_start(), nv.prompt_start(P)]
    for bad in (
        nv.text_content_start(P, "u", "USER"),
        nv.audio_content_start(P, "mic"),
        nv.tool_content_start(P, "t", "tu"),
    ):
        _rejects(start, bad, "first content block must be TEXT with role SYSTEM")
    _rejects(start, nv.text_content_start(P, "s", "SYSTEM", interactive=True), "interactive false")


def test_history_total_is_limited_to_40_kb_with_the_conservative_limits():
    events = [*_setup(), nv.text_content_start(P, "h", "USER")]
    events += [nv.text_input(P, "h", "x" * 1024) for _ in range(MAX_HISTORY_BYTES // 1024)]
    v = _run(events, InputOrderValidator(history=CONSERVATIVE_HISTORY))
    assert v.history_bytes == MAX_HISTORY_BYTES
    with pytest.raises(EventOrderError, match="exceeds 40960 bytes"):
        v.check(nv.text_input(P, "h", "y"))
    # the system prompt does not count as history
    assert _run(_setup()).history_bytes == 0


def _history(limits: HistoryLimits, *messages: list[str]) -> InputOrderValidator:
    """A validator with `limits` that took the setup and these history messages (each a list of textInputs)."""
    v = _run(_setup(), InputOrderValidator(history=limits))
    for i, pieces in enumerate(messages):
        name = f"h{i}"
        _run([nv.text_content_start(P, name, "ASSISTANT" if i % 2 else "USER"),
              *(nv.text_input(P, name, piece) for piece in pieces), nv.content_end(P, name)], v)
    return v


def _history_error(limits: HistoryLimits, *messages: list[str]) -> str:
    with pytest.raises(EventOrderError) as info:
        _history(limits, *messages)
    return info.value.message


@pytest.mark.parametrize("model_id", [NOVA_2_5_SONIC, NOVA_2_SONIC, "us.amazon.nova-2-5-sonic",
                                      "global.amazon.nova-2-sonic-v1:0", "amazon.nova-3-sonic"])
def test_nova_2_class_history_limits(model_id):
    """200 KB in total, 50 KB per message and per textInput (Nova 2 user guide, 22 June 2026); an id not in
    the catalog gets the same."""
    limits = model_spec(model_id).history
    assert limits == NOVA_2_HISTORY == HistoryLimits(200 * KB, 50 * KB, 50 * KB)
    # at the limits: one 50 KB textInput, 50 KB messages up to 200 KB in all
    v = _history(limits, ["a" * 50 * KB], ["b" * 25 * KB, "c" * 25 * KB], ["d" * 50 * KB], ["e" * 50 * KB])
    assert v.history_bytes == 200 * KB
    assert _history_error(limits, ["a" * (50 * KB + 1)]) == (
        "Invalid input request: chat history textInput of 51201 bytes exceeds 51200 bytes (content 'h0'; split a "
        "message into several textInput events)")
    assert _history_error(limits, ["a" * 30 * KB, "b" * (20 * KB + 1)]) == (
        "Invalid input request: chat history message of 51201 bytes exceeds 51200 bytes (content 'h0')")
    assert _history_error(limits, *[["x" * 50 * KB]] * 4, ["y"]) == (
        "Invalid input request: chat history exceeds 204800 bytes in total (204801 bytes with content 'h4')")
    # the system prompt: per textInput only, and not as history
    v = _run([nv.session_start(), nv.prompt_start(P), *_text("SYSTEM", "sys", "s" * 50 * KB)],
             InputOrderValidator(history=limits))
    assert v.history_bytes == 0
    # interactive text has no such limit
    _run([*_setup(), *_text("USER", "t", "x" * 300 * KB, interactive=True)], InputOrderValidator(history=limits))


def test_legacy_model_keeps_40_kb_and_1_kb_per_text_input():
    limits = model_spec(NOVA_SONIC_V1).history
    assert limits == CONSERVATIVE_HISTORY == HistoryLimits(40 * KB, 40 * KB, 1 * KB)
    assert not model_spec(NOVA_SONIC_V1).text_input  # and no typed text
    v = _history(limits, ["a" * KB] * 20, ["b" * KB] * 20)  # split, never over 1 KB a piece
    assert v.history_bytes == 40 * KB
    assert _history_error(limits, ["é" * 513]) == (
        "Invalid input request: chat history textInput of 1026 bytes exceeds 1024 bytes (content 'h0'; split a "
        "message into several textInput events)")
    assert _history_error(limits, ["a" * KB] * 40, ["b"]) == (
        "Invalid input request: chat history exceeds 40960 bytes in total (40961 bytes with content 'h1')")
    assert _history_error(limits, ["a" * KB] * 41) == (  # one message over it all: the total is named
        "Invalid input request: chat history exceeds 40960 bytes in total (41984 bytes with content 'h0')")
    with pytest.raises(EventOrderError) as info:
        _run([nv.session_start(), nv.prompt_start(P), nv.text_content_start(P, "sys", "SYSTEM"),
              nv.text_input(P, "sys", "x" * 1025)], InputOrderValidator(history=limits))
    assert info.value.message == ("Invalid input request: system prompt textInput of 1025 bytes exceeds 1024 bytes "
                                  "(content 'sys'; split it into several textInput events)")


def test_history_errors_are_what_the_gateway_falls_back_on():
    """The gateway retries with the conservative limits on a validation message with "history" and "exceeds"
    (protocol.continuity.classify); the system prompt's or an order violation's is not one."""
    too_large = [
        _history_error(CONSERVATIVE_HISTORY, ["a" * 2 * KB]),
        _history_error(CONSERVATIVE_HISTORY, ["a" * KB] * 41),
        _history_error(NOVA_2_HISTORY, ["a" * 30 * KB, "b" * 30 * KB]),
    ]
    for message in too_large:
        assert "history" in message and "exceeds" in message
        assert classify(VALIDATION, message) is Failure.HISTORY_TOO_LARGE, message
    with pytest.raises(EventOrderError) as info:
        _run([nv.session_start(), nv.prompt_start(P), nv.text_content_start(P, "sys", "SYSTEM"),
              nv.text_input(P, "sys", "x" * 1025)], InputOrderValidator(history=CONSERVATIVE_HISTORY))
    assert classify(VALIDATION, info.value.message) is Failure.INVALID_INPUT
    late = _rejects(_with_audio(), nv.text_content_start(P, "h", "USER"), "chat history")
    assert classify(VALIDATION, late.message) is Failure.INVALID_INPUT
    assert classify(VALIDATION, INPUT_GAP_MESSAGE) is Failure.IDLE_TIMEOUT


def test_input_gap_counts_audio_and_interactive_content_only():
    gap = InputGap()
    events = [
        (nv.session_start(), False), (nv.prompt_start(P), False),
        *((e, False) for e in _text("SYSTEM", "sys", "You are helpful.")),
        *((e, False) for e in _text("USER", "h1", "history")),  # history: not interactive content
        (nv.audio_content_start(P, "mic"), False),
        (nv.audio_input(P, "mic", b"\0\0" * 512), True),
        (nv.text_content_start(P, "t", "USER", interactive=True), False),
        (nv.text_input(P, "t", "typed"), True),
        (nv.content_end(P, "t"), False),
        (nv.tool_content_start(P, "r", "tooluse_1"), False),
        (nv.tool_result(P, "r", "{}"), True),
        (nv.content_end(P, "r"), False),
        (nv.content_end(P, "mic"), False), (nv.prompt_end(P), False), (nv.session_end(), False),
    ]
    assert [gap.counts(e) for e, _ in events] == [want for _, want in events]
    assert not gap.counts({"nope": 1}) and not gap.counts({"event": {"textInput": "x"}})
    assert INPUT_GAP_MESSAGE == (
        "InternalErrorCode=532::Timed out waiting for audio bytes or interactive content. Please ensure gaps "
        "between audio bytes and interactive content are less than 55 seconds.")


def test_rejected_event_leaves_state_unchanged():
    v = _run(_with_audio())
    with pytest.raises(EventOrderError):
        v.check(nv.prompt_end(P))  # audio still open
    v.check(nv.content_end(P, "mic"))
    v.check(nv.prompt_end(P))
    v.check(nv.session_end())
