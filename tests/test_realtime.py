"""The OpenAI Realtime adapter (protocol/realtime.py) over the session core, on the fake clock of
tests/session_harness.py: client events in as JSON, server events out as JSON. No sockets."""

from __future__ import annotations

import base64
import itertools
from array import array

import orjson
import pytest

from protocol import messages as m
from protocol import nova_events as nova
from protocol.items import Item
from protocol.realtime import START_WAIT_S, RealtimeSession, SendText, Settings
from protocol.session import OpenStream, SendAudio, State

from .session_harness import FRAME_S, IDS, SILENCE, FakeModel, FakeStore, Harness, speech

GATEWAY_TOOLS = (
    {"toolSpec": {"name": "lookup", "description": "look something up",
                  "inputSchema": {"json": '{"type":"object","properties":{"q":{"type":"string"}}}'}}},
)
WEATHER = {"type": "function", "name": "get_weather", "description": "the weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


class PatternModel(FakeModel):
    """A FakeModel whose answers' audio is a recognisable ramp rather than zeros."""

    def _answer(self, text: str, at: float, stop: str = "END_TURN") -> None:
        start = len(self.pending)
        super()._answer(text, at, stop)
        for i in range(start, len(self.pending)):
            t, ev = self.pending[i]
            if nova.event_name(ev) == "audioOutput":
                body = nova.event_body(ev)
                n = len(base64.b64decode(body["content"])) // 2
                pcm = array("h", [(k * 7) % 3000 - 1500 for k in range(n)]).tobytes()
                self.pending[i] = (t, nova.output_audio(IDS, body["contentId"], pcm))


def frame24(pcm16: bytes) -> bytes:
    """A harness frame (20 ms at 16 kHz) made 20 ms at 24 kHz, same sample values."""
    return pcm16 + pcm16[: len(pcm16) // 2]


class RT(Harness):
    """The harness with a `RealtimeSession` in place of the session: `self.s` is the adapter,
    `self.session` the session inside it. Server events are decoded into `events` (with the time
    each was sent in `times`); the audio the session sent the adapter is kept in `pcm`."""

    def __init__(self, settings: Settings | None = None, **config):
        config.setdefault("tools", GATEWAY_TOOLS)
        super().__init__(**config)
        self.session = self.s
        self.pcm: list[bytes] = []
        inner = self.session.effects

        def effects():
            out = inner()
            self.pcm += [e.pcm for e in out if isinstance(e, SendAudio)]
            return out

        self.session.effects = effects
        ids = itertools.count(1)
        settings = settings or Settings(server_tools=frozenset({"lookup"}))
        self.s = RealtimeSession(self.session, settings, now=0.0, new_id=lambda p: f"{p}_rt{next(ids)}")
        self.events: list[dict] = []
        self.times: list[float] = []
        self.stream_opened_at: dict[int, float] = {}

    def perform(self, e) -> None:
        if isinstance(e, SendText):
            self.events.append(orjson.loads(e.text))
            self.times.append(self.now)
            return
        super().perform(e)
        if isinstance(e, OpenStream):
            self.stream_opened_at[e.stream_id] = self.now
            self.models[e.stream_id].__class__ = PatternModel  # the harness made a FakeModel

    def send(self, **event) -> None:
        self.s.receive_text(orjson.dumps(event).decode(), self.now)
        self.pump()

    def send_audio(self, pcm: bytes) -> None:
        """The client's audio as input_audio_buffer.append."""
        self.s.receive_text(orjson.dumps({"type": "input_audio_buffer.append",
                                          "audio": base64.b64encode(frame24(pcm)).decode()}).decode(), self.now)

    # -- what was sent -----------------------------------------------------------------------------
    def types(self, since: int = 0) -> list[str]:
        return [e["type"] for e in self.events[since:]]

    def of_type(self, kind: str, since: int = 0) -> list[dict]:
        return [e for e in self.events[since:] if e["type"] == kind]

    def first(self, kind: str, since: int = 0) -> int:
        return next(i for i, e in enumerate(self.events) if i >= since and e["type"] == kind)

    def errors(self, since: int = 0) -> list[dict]:
        return [e["error"] for e in self.of_type("error", since)]

    def started(self) -> None:
        self.until(lambda: "session.created" in self.types(), 2, None)


def live(**kw) -> RT:
    h = RT(**kw)
    h.started()
    return h


def prompt_start(model: FakeModel) -> dict:
    return next(nova.event_body(e) for e in model.setup if nova.event_name(e) == "promptStart")


def system_prompt(model: FakeModel) -> str:
    """The text of the SYSTEM block a stream was opened with."""
    texts, inside = [], False
    for e in model.setup:
        name, body = nova.event_name(e), nova.event_body(e)
        if name == "contentStart":
            inside = body.get("role") == "SYSTEM"
        elif name == "textInput" and inside:
            texts.append(body["content"])
        elif name == "contentEnd":
            inside = False
    return "".join(texts)


def answering(h: RT, turn: int = 1, reply_ms: int = 3000) -> str:
    """The user speaks; the model answers with `reply_ms` of audio that starts playing. The item id."""
    h.reply_ms = h.current_model.reply_ms = reply_ms
    h.say(turn, 0.4)
    h.until(lambda: h.of_type("response.output_audio.delta"), 3, SILENCE)
    return h.of_type("response.output_item.added")[-1]["item"]["id"]


# -- 1, 2: starting ---------------------------------------------------------------------------------
def test_session_update_before_the_start_wait_configures_the_first_stream():
    h = RT(voice="tiffany", system_prompt="The gateway's prompt.")
    h.send(type="session.update", session={
        "type": "realtime", "instructions": "You are a pirate.",
        "audio": {"output": {"voice": "ash"}},
        "tools": [WEATHER], "tool_choice": "required",
    })
    h.started()
    h.run(1.0, SILENCE)
    assert len(h.models) == 1  # configured before it was opened: no second stream
    model = h.current_model
    assert system_prompt(model) == "You are a pirate."
    body = prompt_start(model)
    assert body["audioOutputConfiguration"]["voiceId"] == "matthew"  # ash -> Nova's matthew
    tools = body["toolConfiguration"]["tools"]
    assert [t["toolSpec"]["name"] for t in tools] == ["lookup", "get_weather"]
    spec = tools[1]["toolSpec"]
    assert spec["description"] == "the weather in a city"
    assert isinstance(spec["inputSchema"]["json"], str)
    assert orjson.loads(spec["inputSchema"]["json"]) == WEATHER["parameters"]
    assert body["toolConfiguration"]["toolChoice"] == {"any": {}}
    # session.created, then session.updated (the update answered once the session exists)
    assert h.types()[:2] == ["session.created", "session.updated"]
    created, updated = h.events[0]["session"], h.events[1]["session"]
    cid = h.session.conversation_id
    assert cid in h.store.convs
    assert created["novagate"]["conversation_id"] == cid
    assert created["novagate"]["resume_token"] == f"resume|{cid}|{h.session.owner}"
    assert updated["instructions"] == "You are a pirate." and updated["audio"]["output"]["voice"] == "ash"
    assert [t["name"] for t in updated["tools"]] == ["get_weather"] and updated["tool_choice"] == "required"


def test_without_a_client_event_the_session_starts_after_the_wait_with_the_gateway_defaults():
    h = RT(voice="tiffany", system_prompt="The gateway's prompt.")
    h.run(START_WAIT_S - 0.05, None)
    assert h.events == [] and h.models == {} and h.state is State.HANDSHAKE
    h.started()
    assert START_WAIT_S <= h.stream_opened_at[1] < START_WAIT_S + FRAME_S
    assert h.types() == ["session.created"]
    model = h.current_model
    assert system_prompt(model) == "The gateway's prompt."
    body = prompt_start(model)
    assert body["audioOutputConfiguration"]["voiceId"] == "tiffany"
    assert [t["toolSpec"]["name"] for t in body["toolConfiguration"]["tools"]] == ["lookup"]
    assert "toolChoice" not in body["toolConfiguration"]
    session = h.events[0]["session"]
    assert session["instructions"] == "The gateway's prompt." and session["audio"]["output"]["voice"] == "tiffany"
    assert session["tools"] == [] and session["tool_choice"] == "auto"


# -- 3: refused fields ------------------------------------------------------------------------------
@pytest.mark.parametrize("field, param", [
    ({"audio": {"input": {"turn_detection": None}}}, "session.audio.input.turn_detection"),
    ({"audio": {"input": {"turn_detection": {"type": "server_vad", "threshold": 0.7}}}},
     "session.audio.input.turn_detection.threshold"),
    ({"output_modalities": ["text"]}, "session.output_modalities"),
    ({"tool_choice": "none"}, "session.tool_choice"),
    ({"audio": {"input": {"format": {"type": "audio/pcma"}}}}, "session.audio.input.format.type"),
    ({"audio": {"output": {"format": {"type": "audio/pcm", "rate": 16000}}}}, "session.audio.output.format.rate"),
    ({"tools": [{"type": "mcp", "server_label": "x", "server_url": "https://example.com/mcp"}]}, "session.tools[0]"),
    ({"speed": 1.5}, "session.speed"),
])
def test_a_refused_field_is_one_error_and_the_rest_of_the_update_applies(field, param):
    h = live(voice="tiffany")
    n = len(h.events)
    h.send(type="session.update", event_id="evt_9", session={
        "instructions": "Still applied.", "max_output_tokens": "inf", **field})
    errors = h.errors(n)
    assert len(errors) == 1
    assert errors[0]["type"] == "invalid_request_error" and errors[0]["param"] == param
    assert errors[0]["event_id"] == "evt_9" and errors[0]["message"]
    [updated] = h.of_type("session.updated", n)
    assert updated["session"]["instructions"] == "Still applied."
    assert updated["session"]["audio"]["input"]["turn_detection"]["type"] == "server_vad"
    assert updated["session"]["audio"]["output"]["format"] == {"type": "audio/pcm", "rate": 24000}
    assert h.session.prompt.system_prompt == "Still applied."


def test_several_refused_fields_in_one_update_are_one_error_each():
    h = live()
    n = len(h.events)
    h.send(type="session.update", session={
        "instructions": "Applied.", "output_modalities": ["text"], "tool_choice": "none",
        "tools": [WEATHER], "truncation": "disabled"})
    assert sorted(e["param"] for e in h.errors(n)) == [
        "session.output_modalities", "session.tool_choice", "session.truncation"]
    [updated] = h.of_type("session.updated", n)
    assert updated["session"]["instructions"] == "Applied."
    assert [t["name"] for t in updated["session"]["tools"]] == ["get_weather"]


def test_a_refused_audio_field_keeps_the_other_audio_fields():
    h = live(voice="tiffany")
    n = len(h.events)
    h.send(type="session.update", session={"audio": {
        "input": {"format": {"type": "audio/pcma"}, "transcription": {"model": "whisper-1"}},
        "output": {"voice": "sage"}}})
    assert [e["param"] for e in h.errors(n)] == ["session.audio.input.format.type"]
    [updated] = h.of_type("session.updated", n)
    assert updated["session"]["audio"]["output"]["voice"] == "sage"
    assert updated["session"]["audio"]["input"]["transcription"] == {"model": "whisper-1"}


# -- 4: configuring a live session ------------------------------------------------------------------
def test_new_instructions_replace_the_stream_at_a_quiet_moment_not_while_answering():
    h = live(system_prompt="Old rules.")
    h.run(0.5, SILENCE)
    answering(h)
    n = len(h.events)
    h.send(type="session.update", session={"instructions": "New rules."})
    assert h.types(n) == ["session.updated"]  # at once
    assert h.events[n]["session"]["instructions"] == "New rules."
    assert h.session.prompt.system_prompt == "New rules."
    h.until(lambda: h.counts[("rotations", "configured")] == 1, 8, SILENCE)
    assert len(h.models) == 2
    done_at = h.times[h.first("response.done", n)]
    assert h.stream_opened_at[2] >= done_at  # not prepared while the model answered
    old, new = h.models[1], h.models[2]
    assert old.closed and h.current_model is new
    assert system_prompt(old) == "Old rules." and system_prompt(new) == "New rules."
    assert new.history_texts()[1:] == ["turn 1", "answer to turn 1"]  # the dialogue so far
    assert h.counts[("rotations", "quiet")] == 0 and h.counts[("rotations", "forced")] == 0
    # the next turn is heard and answered by the new stream
    h.say(2, 0.4)
    h.until(lambda: len(h.of_type("response.done")) == 2, 5, SILENCE)
    assert new.audio["client"] > 0 and h.of_type("response.output_audio_transcript.done")[-1][
        "transcript"] == "answer to turn 2"


def test_an_update_while_the_first_stream_opens_opens_it_again_with_the_new_prompt():
    h = RT(open_delay=0.3, system_prompt="Old rules.")
    h.run(START_WAIT_S + 0.05, None)
    assert len(h.models) == 1 and h.current_model is None  # still opening
    h.send(type="session.update", session={"instructions": "New rules."})
    h.started()
    assert len(h.models) == 2 and h.models[1].closed
    assert system_prompt(h.current_model) == "New rules."
    assert h.types() == ["session.created", "session.updated"]


def test_an_update_that_changes_nothing_replaces_no_stream():
    h = live(system_prompt="Rules.")
    h.send(type="session.update", session={"instructions": "Rules.", "tool_choice": "auto"})
    h.run(2.0, SILENCE)
    assert len(h.models) == 1 and h.counts[("rotations", "configured")] == 0
    assert h.types()[-1] == "session.updated"


def test_instructions_are_refused_when_the_gateway_keeps_its_own():
    h = RT(Settings(client_instructions=False, server_tools=frozenset({"lookup"})), system_prompt="Server rules.")
    h.send(type="session.update", session={"instructions": "Mine.", "audio": {"output": {"voice": "sage"}}})
    h.started()
    assert [e["param"] for e in h.errors()] == ["session.instructions"]
    assert system_prompt(h.current_model) == "Server rules."
    assert prompt_start(h.current_model)["audioOutputConfiguration"]["voiceId"] == "olivia"
    assert h.of_type("session.updated")[0]["session"]["instructions"] == "Server rules."


def test_resume_in_the_first_session_update():
    store = FakeStore()
    cid = store.create("anon:a")
    store.convs[cid].items = [Item("i0", "user", "hello", "t"), Item("i1", "assistant", "hi there", "t")]
    h = RT(store=store)
    h.send(type="session.update", session={"novagate": {"resume": f"resume|{cid}|anon:a"}})
    h.started()
    told = h.events[0]["session"]["novagate"]
    assert told["conversation_id"] == cid and told["resumed"] is True and told["history_length"] == 2
    assert h.current_model.history_texts()[1:] == ["hello", "hi there"] and len(h.models) == 1
    n = len(h.events)
    h.send(type="session.update", session={"novagate": {"resume": f"resume|{cid}|anon:a"}})
    assert [e["param"] for e in h.errors(n)] == ["session.novagate.resume"]
    # the history's ids are taken: a typed item may not reuse them
    h.send(type="conversation.item.create", item={"id": "i1", "type": "message", "role": "user",
                                                  "content": [{"type": "input_text", "text": "x"}]})
    assert [e["param"] for e in h.errors(n)] == ["session.novagate.resume", "item.id"]


# -- 5: a spoken turn --------------------------------------------------------------------------------
@pytest.mark.parametrize("transcription", [True, False])
def test_a_spoken_turn_in_order(transcription):
    h = RT()
    if transcription:
        h.send(type="session.update", session={"audio": {"input": {"transcription": {"model": "gpt-4o-transcribe"}}}})
    h.started()
    h.run(0.2, SILENCE)
    n = len(h.events)
    h.say(1, 0.6)
    h.until(lambda: h.of_type("response.created", n), 3, SILENCE)
    model = h.current_model
    h.s.model_event(model.sid, nova.usage_event(IDS, input_speech=30, input_text=5, output_speech=40,
                                                output_text=10), h.now)
    h.until(lambda: h.of_type("response.done", n), 5, SILENCE)

    started = h.of_type("input_audio_buffer.speech_started", n)[0]
    user_id = started["item_id"]
    assert user_id
    assert h.of_type("input_audio_buffer.speech_stopped", n)[0]["item_id"] == user_id
    assert h.of_type("input_audio_buffer.committed", n)[0]["item_id"] == user_id
    user_added = h.of_type("conversation.item.added", n)[0]["item"]
    assert user_added["id"] == user_id and user_added["role"] == "user"
    assert [i.item_id for i in h.session.history if i.role == "user"] == [user_id]
    item = h.of_type("response.output_item.added", n)[0]["item"]
    assert item["role"] == "assistant" and item["status"] == "in_progress"

    order = ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
             "input_audio_buffer.committed", "conversation.item.added", "conversation.item.done",
             "response.created", "response.output_item.added", "response.content_part.added",
             "response.output_audio_transcript.delta", "response.output_audio.delta",
             "response.output_audio.done", "response.output_audio_transcript.done",
             "response.output_item.done", "response.done"]
    firsts = [h.first(t, n) for t in order]
    assert firsts == sorted(firsts), list(zip(order, firsts))
    # every audio delta comes between the output item's start and its audio's end
    deltas = h.of_type("response.output_audio.delta", n)
    last_delta = max(i for i, e in enumerate(h.events) if e["type"] == "response.output_audio.delta")
    assert last_delta < h.first("response.output_audio.done", n)
    assert len(deltas) >= 3 and {d["item_id"] for d in deltas} == {item["id"]}  # 300 ms in 80 ms deltas
    audio = b"".join(base64.b64decode(d["delta"]) for d in deltas)
    assert audio == b"".join(h.pcm) and len(audio) == 48 * 300 and any(audio)
    transcript = "".join(d["delta"] for d in h.of_type("response.output_audio_transcript.delta", n))
    assert transcript == "answer to turn 1"
    assert h.of_type("response.output_audio_transcript.done", n)[0]["transcript"] == "answer to turn 1"
    done = h.of_type("response.done", n)[0]["response"]
    assert done["status"] == "completed" and done["id"] == h.of_type("response.created", n)[0]["response"]["id"]
    assert [o["id"] for o in done["output"]] == [item["id"]] and done["output"][0]["status"] == "completed"
    assert done["usage"] == {"total_tokens": 85, "input_tokens": 35, "output_tokens": 50}
    # the transcript of what the user said: only when asked for
    completed = h.of_type("conversation.item.input_audio_transcription.completed", n)
    if transcription:
        assert [(c["item_id"], c["transcript"]) for c in completed] == [(user_id, "turn 1")]
        assert user_added["content"][0]["transcript"] == "turn 1"
    else:
        assert completed == []
        assert user_added["content"][0]["transcript"] is None


# -- 6: typed turns ----------------------------------------------------------------------------------
def test_a_typed_item_waits_for_response_create():
    h = live()
    model = h.current_model
    n = len(h.events)
    h.send(type="conversation.item.create", item={
        "id": "my_item_1", "type": "message", "role": "user", "content": [{"type": "input_text", "text": "hello"}]})
    assert h.types(n) == ["conversation.item.added", "conversation.item.done"]
    assert h.events[n]["item"]["id"] == "my_item_1" and h.events[n]["item"]["content"][0]["text"] == "hello"
    h.run(1.0, SILENCE)
    assert model.typed == [] and h.session.history == [] and h.types(n)[2:] == []
    h.send(type="response.create")
    assert model.typed == ["hello"]
    h.until(lambda: h.of_type("response.done", n), 5, SILENCE)
    assert h.of_type("response.done", n)[0]["response"]["status"] == "completed"
    assert h.of_type("response.output_audio_transcript.done", n)[0]["transcript"] == "answer to typed hello"
    user = [i for i in h.session.history if i.role == "user"]
    assert [(i.item_id, i.text) for i in user] == [("my_item_1", "hello")]
    h.run(0.5, SILENCE)
    assert "my_item_1" in [i.item_id for i in h.store.convs[h.session.conversation_id].items]
    # the item told once: not again when the session makes it
    assert [e["item"]["id"] for e in h.of_type("conversation.item.added", n)].count("my_item_1") == 1


def test_response_create_with_nothing_to_answer_is_an_error():
    h = live()
    n = len(h.events)
    h.send(type="response.create", event_id="evt_rc")
    [error] = h.errors(n)
    assert error["type"] == "invalid_request_error" and error["event_id"] == "evt_rc"
    assert h.current_model.typed == [] and not h.of_type("response.created")


def test_a_reused_item_id_is_an_error():
    h = live()
    h.say(1, 0.4)
    h.until(lambda: h.of_type("response.done"), 5, SILENCE)
    spoken = h.of_type("input_audio_buffer.committed")[0]["item_id"]
    text = [{"type": "input_text", "text": "hi"}]
    h.send(type="conversation.item.create", item={"id": "mine", "type": "message", "role": "user", "content": text})
    n = len(h.events)
    for reused in ("mine", spoken):
        h.send(type="conversation.item.create", item={"id": reused, "type": "message", "role": "user",
                                                      "content": text})
    assert [e["param"] for e in h.errors(n)] == ["item.id", "item.id"]
    assert not h.of_type("conversation.item.added", n)
    h.send(type="response.create")
    assert h.current_model.typed == ["hi"]  # the refused ones were not queued


def test_a_typed_turn_over_the_answer_cancels_it_and_gets_its_own_response():
    h = live()
    item_id = answering(h)
    h.run(1.0, SILENCE)
    n = len(h.events)
    h.send(type="conversation.item.create", item={"id": "typed_1", "type": "message", "role": "user",
                                                  "content": [{"type": "input_text", "text": "stop"}]})
    assert not h.of_type("response.done", n)  # nothing happens until response.create
    h.send(type="response.create")
    h.until(lambda: len(h.of_type("response.done", n)) == 2, 5, SILENCE)
    cut, answer = h.of_type("response.done", n)
    assert cut["response"]["status"] == "cancelled" and cut["response"]["output"][0]["id"] == item_id
    assert answer["response"]["status"] == "completed" and answer["response"]["id"] != cut["response"]["id"]
    assert answer["response"]["output"][0]["content"][0]["transcript"] == "answer to typed stop"
    assert [i.item_id for i in h.session.history if i.role == "user"][-1] == "typed_1"


# -- 7: barge-in -------------------------------------------------------------------------------------
def test_barge_in_cancels_the_response_and_truncate_trims_the_stored_item():
    h = RT()
    h.speech_events = True  # the model tells the user's speech start: barge-in at once
    h.started()
    item_id = answering(h)
    h.run(2.0, SILENCE)  # two thirds of the 3 s answer played
    n = len(h.events)
    h.say(2, 0.3)
    [done] = h.of_type("response.done", n)
    assert done["response"]["status"] == "cancelled"
    assert done["response"]["status_details"] == {"type": "cancelled", "reason": "turn_detected"}
    assert [o["status"] for o in done["response"]["output"]] == ["incomplete"]
    [item_done] = h.of_type("response.output_item.done", n)
    assert item_done["item"]["id"] == item_id and item_done["item"]["status"] == "incomplete"
    assert h.first("input_audio_buffer.speech_started", n) < h.first("response.done", n)
    # the client says where it stopped playing
    n = len(h.events)
    h.send(type="conversation.item.truncate", item_id=item_id, content_index=0, audio_end_ms=2800)
    truncated = h.events[n]
    assert (truncated["type"], truncated["item_id"], truncated["content_index"], truncated["audio_end_ms"]) == (
        "conversation.item.truncated", item_id, 0, 2800)
    h.run(0.3, SILENCE)  # before the session would settle on its own estimate (about 2 s played)
    [stored] = [i for i in h.session.history if i.item_id == item_id]
    assert stored.role == "assistant" and stored.interrupted and stored.text == "answer to turn"
    h.run(0.5, SILENCE)
    stored = {i.item_id: i for i in h.store.convs[h.session.conversation_id].items}
    assert stored[item_id].interrupted and stored[item_id].text == "answer to turn"
    assert not [d for d in h.of_type("response.output_audio.delta", n) if d["item_id"] == item_id]


def test_truncate_of_an_unknown_item_is_an_error():
    h = live()
    n = len(h.events)
    h.send(type="conversation.item.truncate", item_id="nope", content_index=0, audio_end_ms=100)
    assert [e["param"] for e in h.errors(n)] == ["item_id"] and not h.of_type("conversation.item.truncated")


def test_truncate_of_a_user_item_is_an_error():
    h = live()
    h.say(1, 0.4)
    h.until(lambda: h.of_type("response.done"), 5, SILENCE)
    user_id = h.of_type("input_audio_buffer.committed")[0]["item_id"]
    n = len(h.events)
    h.send(type="conversation.item.truncate", item_id=user_id, content_index=0, audio_end_ms=100)
    assert [e["param"] for e in h.errors(n)] == ["item_id"] and not h.of_type("conversation.item.truncated", n)


# -- 8: response.cancel ------------------------------------------------------------------------------
def test_response_cancel_while_answering():
    h = live()
    item_id = answering(h)
    h.run(1.0, SILENCE)
    n = len(h.events)
    h.send(type="response.cancel")
    [done] = h.of_type("response.done", n)
    assert done["response"]["status_details"] == {"type": "cancelled", "reason": "client_cancelled"}
    assert [o["status"] for o in done["response"]["output"]] == ["incomplete"]
    assert h.of_type("response.output_audio.done", n)[0]["item_id"] == item_id
    h.run(3.0, SILENCE)
    assert not [d for d in h.of_type("response.output_audio.delta", n) if d["item_id"] == item_id]
    assert not h.errors() and not h.session.responding


def test_response_cancel_when_idle_is_an_error():
    h = live()
    n = len(h.events)
    h.send(type="response.cancel", event_id="evt_c")
    [error] = h.errors(n)
    assert error["code"] == "response_cancel_not_active" and error["event_id"] == "evt_c"
    assert not h.of_type("response.done")


# -- 9: tools ----------------------------------------------------------------------------------------
def test_a_client_tool_is_a_function_call_and_its_output_goes_to_the_model():
    h = RT()
    h.tool = "get_weather"  # the model calls it for every utterance
    h.send(type="session.update", session={"tools": [WEATHER]})
    h.started()
    model = h.current_model
    h.say(1, 0.4)
    h.until(lambda: h.of_type("response.done"), 5, SILENCE)
    assert h.tool_runs == []  # not the gateway's to run
    added = [e for e in h.of_type("response.output_item.added") if e["item"]["type"] == "function_call"]
    assert len(added) == 1
    [args] = h.of_type("response.function_call_arguments.done")
    assert args["name"] == "get_weather" and orjson.loads(args["arguments"]) == {"q": "turn 1"}
    assert isinstance(args["arguments"], str) and args["call_id"] and args["item_id"] == added[0]["item"]["id"]
    assert h.first("response.output_item.added") < h.first("response.function_call_arguments.done") < h.first(
        "response.done")
    [done] = h.of_type("response.done")
    calls = [o for o in done["response"]["output"] if o["type"] == "function_call"]
    assert [(c["call_id"], c["name"], c["arguments"]) for c in calls] == [
        (args["call_id"], "get_weather", args["arguments"])]
    assert done["response"]["status"] == "completed"
    assert model.tool_results == []
    # the client answers: plain text goes to the model as a JSON string
    n = len(h.events)
    h.send(type="conversation.item.create", item={"type": "function_call_output", "call_id": args["call_id"],
                                                  "output": "sunny"})
    assert model.tool_results == [(f"tooluse_{model.sid}_0", '"sunny"')]
    added = h.of_type("conversation.item.added", n)[0]["item"]
    assert added["type"] == "function_call_output" and added["call_id"] == args["call_id"]
    h.send(type="response.create")
    assert not h.errors()
    h.until(lambda: len(h.of_type("response.done")) == 2, 5, SILENCE)
    assert h.of_type("response.output_audio_transcript.done")[-1]["transcript"] == 'the tool said "sunny"'
    # a second output for the same call
    n = len(h.events)
    h.send(type="conversation.item.create", item={"type": "function_call_output", "call_id": args["call_id"],
                                                  "output": "rainy"})
    assert [e["param"] for e in h.errors(n)] == ["item.call_id"]
    assert len(model.tool_results) == 1
    # a JSON output is sent as it is
    h.say(2, 0.4)
    h.until(lambda: len(h.of_type("response.function_call_arguments.done")) == 2, 5, SILENCE)
    second = h.of_type("response.function_call_arguments.done")[-1]["call_id"]
    h.send(type="conversation.item.create", item={"type": "function_call_output", "call_id": second,
                                                  "output": '{"temp": 21}'})
    assert model.tool_results[-1] == (f"tooluse_{model.sid}_3", '{"temp": 21}')
    assert h.tool_runs == []


def test_the_gateways_own_tools_still_run_on_the_gateway():
    h = RT()
    h.tool = "lookup"
    h.send(type="session.update", session={"tools": [WEATHER]})
    h.started()
    model = h.current_model
    h.say(1, 0.4)
    h.until(lambda: h.tool_runs, 5, SILENCE)
    assert [(r.name, r.arguments) for r in h.tool_runs] == [("lookup", {"q": "turn 1"})]
    assert not h.of_type("response.function_call_arguments.done")
    h.finish_tool(h.tool_runs[0].call_id, '{"answer": 42}')
    assert model.tool_results == [(f"tooluse_{model.sid}_0", '{"answer": 42}')]
    h.until(lambda: h.of_type("response.output_audio_transcript.done") and 'the tool said {"answer": 42}' in
            h.of_type("response.output_audio_transcript.done")[-1]["transcript"], 5, SILENCE)


def test_a_client_tool_named_like_a_gateway_tool_is_refused():
    h = live()
    n = len(h.events)
    h.send(type="session.update", session={"tools": [{**WEATHER, "name": "lookup"}]})
    assert [e["param"] for e in h.errors(n)] == ["session.tools[0].name"]


# -- 10: misc ----------------------------------------------------------------------------------------
def test_a_binary_frame_is_an_error():
    h = live()
    n = len(h.events)
    h.audio(frame24(speech(1)))
    [error] = h.errors(n)
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_event"
    assert h.session.state is State.LIVE


def test_bad_events_are_errors():
    h = live()
    n = len(h.events)
    h.send(type="input_audio_buffer.append", audio="not base64!!")
    h.send(type="no.such.event", event_id="evt_u")
    h.send(type="input_audio_buffer.commit")
    h.send(type="input_audio_buffer.clear")
    h.s.receive_text("{not json", h.now)
    h.pump()
    errors = h.errors(n)
    assert len(errors) == 5 and all(e["type"] == "invalid_request_error" for e in errors)
    assert errors[0]["param"] == "audio"
    assert (errors[1]["code"], errors[1]["event_id"]) == ("unknown_event", "evt_u")
    assert errors[2]["message"] != errors[3]["message"]
    assert errors[4]["code"] == "invalid_json"
    assert h.session.state is State.LIVE and h.model_audio["client"] == 0


def test_errors_past_a_burst_are_not_all_sent():
    h = live()
    n = len(h.events)
    for _ in range(50):
        h.send(type="no.such.event")
    assert len(h.errors(n)) == 20
    h.run(1.0, None)
    n = len(h.events)
    for _ in range(50):
        h.send(type="no.such.event")
    assert 9 <= len(h.errors(n)) <= 10  # refilled at 10 a second


def test_the_first_event_that_is_not_session_update_starts_the_session_at_once():
    h = RT()
    h.send(type="input_audio_buffer.append", audio=base64.b64encode(frame24(SILENCE)).decode())
    assert len(h.models) == 1 and h.now < START_WAIT_S
    h.started()
    assert h.types() == ["session.created"]


# -- 11: the session underneath ---------------------------------------------------------------------
def test_cancel_response_when_idle_does_nothing():
    h = Harness()
    h.connect()
    h.run(0.5, SILENCE)
    before, state = list(h.client), h.state
    assert not h.s.responding
    h.s.cancel_response(h.now)
    h.pump()
    assert h.client == before and h.state is state
    h.say(1, 0.4)  # and the next answer is not dropped as a cancelled one
    h.until(lambda: h.finals("assistant"), 5)
    assert [t.text for t in h.finals("assistant")] == ["answer to turn 1"]
    assert not h.of(m.Interrupted)


def test_speech_started_names_the_user_item_the_utterance_becomes():
    for speech_events in (False, True):
        h = Harness()
        h.speech_events = speech_events
        h.connect()
        for turn in (1, 2):
            h.say(turn, 0.4)
            h.until(lambda: len(h.finals("assistant")) == turn, 5)
        started = [x.item_id for x in h.of(m.InputSpeechStarted)]
        users = [t.item_id for t in h.finals("user")]
        assert started == users and len(set(users)) == 2, speech_events


def test_speech_stopped_names_the_same_item_as_speech_started():
    h = Harness()  # the model transcribes 0.6 s after speech ends; the gateway's VAD ends it at 0.8 s
    h.connect()
    h.say(1, 0.4)
    h.until(lambda: h.of(m.InputSpeechStopped) and h.finals("assistant"), 5)
    assert h.of(m.InputSpeechStopped)[0].item_id == h.of(m.InputSpeechStarted)[0].item_id


# -- 12: one typed message at a time, truncating what plays, tools, voices, usage -------------------
def typed(text: str, item_id: str | None = None) -> dict:
    """A user message for conversation.item.create."""
    item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}
    return {**item, "id": item_id} if item_id else item


def test_a_second_typed_message_before_response_create_is_refused():
    h = live()
    model = h.current_model
    h.send(type="conversation.item.create", item=typed("one", "first"))
    n = len(h.events)
    h.send(type="conversation.item.create", event_id="evt_2", item=typed("two", "second"))
    [error] = h.errors(n)
    assert (error["param"], error["event_id"]) == ("item", "evt_2")
    assert not h.of_type("conversation.item.added", n)
    h.send(type="response.create")
    assert model.typed == ["one"]  # the first alone, not the two joined
    # once response.create took the first, another one may wait (its id was not taken by the refusal)
    n = len(h.events)
    h.send(type="conversation.item.create", item=typed("two", "second"))
    assert not h.errors(n) and [e["item"]["id"] for e in h.of_type("conversation.item.added", n)] == ["second"]
    h.until(lambda: h.of_type("response.done", n), 5, SILENCE)
    assert model.typed == ["one"]
    h.send(type="response.create")
    assert model.typed == ["one", "two"]
    h.until(lambda: len(h.of_type("response.done")) == 2, 5, SILENCE)
    assert [i.item_id for i in h.session.history if i.role == "user"] == ["first", "second"]


def test_truncate_of_the_item_being_played_cuts_it():
    h = live()
    item_id = answering(h)  # 3 s of audio, all generated: only playback is left
    h.run(2.0, SILENCE)
    assert h.session.responding and not h.of_type("response.done")
    n = len(h.events)
    h.send(type="conversation.item.truncate", item_id=item_id, content_index=0, audio_end_ms=1500)
    assert not h.errors(n)
    [done] = h.of_type("response.done", n)
    assert done["response"]["status"] == "cancelled"
    assert done["response"]["status_details"] == {"type": "cancelled", "reason": "client_cancelled"}
    assert [(o["id"], o["status"]) for o in done["response"]["output"]] == [(item_id, "incomplete")]
    [truncated] = h.of_type("conversation.item.truncated", n)
    assert (truncated["item_id"], truncated["content_index"], truncated["audio_end_ms"]) == (item_id, 0, 1500)
    assert not h.session.responding
    h.run(0.3, SILENCE)
    # 1.5 s of the 3 s "answer to turn 1" (the session's own estimate, about 2 s, would keep "answer to")
    [stored] = [i for i in h.session.history if i.item_id == item_id]
    assert stored.interrupted and stored.text == "answer"
    h.run(2.0, SILENCE)
    stored = {i.item_id: i for i in h.store.convs[h.session.conversation_id].items}[item_id]
    assert stored.interrupted and stored.text == "answer"
    assert not [d for d in h.of_type("response.output_audio.delta", n) if d["item_id"] == item_id]


def test_truncate_of_an_item_played_to_its_end_is_an_error():
    h = live()
    h.say(1, 0.4)
    h.until(lambda: h.of_type("response.done"), 5, SILENCE)
    h.run(1.0, SILENCE)
    item_id = h.of_type("response.output_item.added")[0]["item"]["id"]
    assert not h.session.responding
    stored_before = list(h.store.convs[h.session.conversation_id].items)
    history_before = list(h.session.history)
    assert [(i.text, i.interrupted) for i in history_before if i.item_id == item_id] == [("answer to turn 1", False)]
    n = len(h.events)
    h.send(type="conversation.item.truncate", item_id=item_id, content_index=0, audio_end_ms=100)
    assert [e["param"] for e in h.errors(n)] == ["item_id"]
    assert not h.of_type("conversation.item.truncated", n) and not h.of_type("response.done", n)
    h.run(2.0, SILENCE)
    assert h.session.history == history_before
    assert h.store.convs[h.session.conversation_id].items == stored_before


def test_truncate_of_a_function_call_or_user_item_is_an_error():
    h = RT()
    h.tool = "get_weather"
    h.send(type="session.update", session={"tools": [WEATHER]})
    h.started()
    h.say(1, 0.4)
    h.until(lambda: h.of_type("response.function_call_arguments.done"), 5, SILENCE)
    call_item = h.of_type("response.function_call_arguments.done")[0]["item_id"]
    user_item = h.of_type("input_audio_buffer.committed")[0]["item_id"]
    n = len(h.events)
    for item_id in (call_item, user_item):
        h.send(type="conversation.item.truncate", item_id=item_id, content_index=0, audio_end_ms=0)
    assert [e["param"] for e in h.errors(n)] == ["item_id", "item_id"]
    assert not h.of_type("conversation.item.truncated", n) and not h.of_type("response.done", n)


def test_a_forced_tool_dropped_from_the_tools_makes_the_choice_auto_again():
    h = RT()
    h.send(type="session.update", session={"tools": [WEATHER],
                                           "tool_choice": {"type": "function", "name": "get_weather"}})
    h.started()
    assert prompt_start(h.current_model)["toolConfiguration"]["toolChoice"] == {"tool": {"name": "get_weather"}}
    n = len(h.events)
    h.send(type="session.update", event_id="evt_t", session={"tools": [{**WEATHER, "name": "get_time"}]})
    [error] = h.errors(n)
    assert (error["param"], error["event_id"]) == ("session.tool_choice", "evt_t")
    [updated] = h.of_type("session.updated", n)
    assert updated["session"]["tool_choice"] == "auto"
    assert [t["name"] for t in updated["session"]["tools"]] == ["get_time"]
    h.until(lambda: h.counts[("rotations", "configured")] == 1, 5, SILENCE)
    config = prompt_start(h.current_model)["toolConfiguration"]
    assert [t["toolSpec"]["name"] for t in config["tools"]] == ["lookup", "get_time"]
    assert "toolChoice" not in config


@pytest.mark.parametrize("tools, param", [
    ([{"type": "mcp", "server_label": "x", "server_url": "https://example.com/mcp"}, WEATHER], "session.tools[0]"),
    ([WEATHER, {**WEATHER, "description": "again"}], "session.tools[1].name"),
])
def test_a_bad_tool_is_refused_and_the_good_one_is_declared(tools, param):
    h = live()
    n = len(h.events)
    h.send(type="session.update", session={"tools": tools})
    assert [e["param"] for e in h.errors(n)] == [param]
    [updated] = h.of_type("session.updated", n)
    assert [(t["name"], t["description"]) for t in updated["session"]["tools"]] == [
        ("get_weather", "the weather in a city")]
    h.until(lambda: h.counts[("rotations", "configured")] == 1, 5, SILENCE)
    tools = prompt_start(h.current_model)["toolConfiguration"]["tools"]
    assert [t["toolSpec"]["name"] for t in tools] == ["lookup", "get_weather"]


def test_client_gone_answers_the_waiting_function_call_and_closes_without_the_tool_timeout():
    h = RT(tool_timeout_s=30.0)
    h.tool = "get_weather"
    h.send(type="session.update", session={"tools": [WEATHER]})
    h.started()
    model = h.current_model
    h.say(1, 0.4)
    h.until(lambda: h.of_type("response.done"), 5, SILENCE)
    assert h.of_type("response.function_call_arguments.done") and model.tool_results == []
    h.run(1.0, SILENCE)
    assert model.tool_results == [] and h.session.state is State.LIVE  # still waiting for the client
    gone_at = h.now
    h.s.client_gone(h.now)
    h.pump()
    [(tool_use_id, content)] = model.tool_results
    assert tool_use_id == f"tooluse_{model.sid}_0"
    assert orjson.loads(content)["error"]["type"] == "client_gone"
    h.until(lambda: h.session.state is State.CLOSED, h.session.cfg.tool_timeout_s + 10, None)
    assert h.now - gone_at < 1.0 < h.session.cfg.tool_timeout_s
    [record] = [i for i in h.store.convs[h.session.conversation_id].items if i.role == "tool"]
    assert "client_gone" in record.text


def test_a_voice_the_model_does_not_have_is_refused():
    h = RT(Settings(server_tools=frozenset({"lookup"}), voices=("matthew", "tiffany")), voice="tiffany")
    h.started()
    n = len(h.events)
    h.send(type="session.update", session={"audio": {"output": {"voice": "sage"}}})  # sage -> olivia
    [error] = h.errors(n)
    assert error["param"] == "session.audio.output.voice"
    [updated] = h.of_type("session.updated", n)
    assert updated["session"]["audio"]["output"]["voice"] == "tiffany"
    h.run(1.0, SILENCE)
    assert len(h.models) == 1 and prompt_start(h.current_model)["audioOutputConfiguration"]["voiceId"] == "tiffany"
    n = len(h.events)
    h.send(type="session.update", session={"audio": {"output": {"voice": "ash"}}})  # ash -> matthew
    assert not h.errors(n)
    assert h.of_type("session.updated", n)[0]["session"]["audio"]["output"]["voice"] == "ash"
    h.until(lambda: h.counts[("rotations", "configured")] == 1, 5, SILENCE)
    assert prompt_start(h.current_model)["audioOutputConfiguration"]["voiceId"] == "matthew"


def spoken_turn_with_usage(h: RT, turn: int, totals: tuple[int, int]) -> dict:
    """A spoken turn whose response hears Nova's usage totals (input, output) of the current stream."""
    n = len(h.events)
    h.say(turn, 0.4)
    h.until(lambda: h.of_type("response.created", n), 3, SILENCE)
    model = h.current_model
    h.s.model_event(model.sid, nova.usage_event(IDS, input_speech=totals[0], input_text=0,
                                                output_speech=totals[1], output_text=0), h.now)
    h.until(lambda: h.of_type("response.done", n), 5, SILENCE)
    return h.of_type("response.done", n)[0]["response"]["usage"]


def rotate(h: RT, instructions: str) -> None:
    h.send(type="session.update", session={"instructions": instructions})
    k = h.counts[("rotations", "configured")]
    h.until(lambda: h.counts[("rotations", "configured")] == k + 1, 5, SILENCE)


def test_usage_of_a_response_on_a_new_stream_counts_only_its_own_tokens():
    h = live()
    assert spoken_turn_with_usage(h, 1, (100, 200)) == {"total_tokens": 300, "input_tokens": 100,
                                                        "output_tokens": 200}
    assert spoken_turn_with_usage(h, 2, (150, 260)) == {"total_tokens": 110, "input_tokens": 50,
                                                        "output_tokens": 60}
    rotate(h, "New rules.")
    assert h.current_model.sid == 2
    # the new stream counts from zero
    assert spoken_turn_with_usage(h, 3, (30, 40)) == {"total_tokens": 70, "input_tokens": 30, "output_tokens": 40}
    assert spoken_turn_with_usage(h, 4, (70, 100)) == {"total_tokens": 100, "input_tokens": 40,
                                                       "output_tokens": 60}


def test_usage_of_a_response_on_a_new_stream_whose_totals_pass_the_old_ones():
    h = live()
    assert spoken_turn_with_usage(h, 1, (10, 20))["total_tokens"] == 30
    rotate(h, "New rules.")
    # the new stream read the history again: its first totals are above the old stream's
    assert spoken_turn_with_usage(h, 2, (40, 60)) == {"total_tokens": 100, "input_tokens": 40,
                                                      "output_tokens": 60}


def test_response_create_with_audio_output_modalities_sends_the_typed_turn():
    h = live()
    model = h.current_model
    h.send(type="conversation.item.create", item=typed("hello"))
    n = len(h.events)
    h.send(type="response.create", event_id="evt_i", response={"instructions": "x"})
    [error] = h.errors(n)
    assert (error["param"], error["event_id"]) == ("response.instructions", "evt_i")
    assert model.typed == []  # still waiting
    h.send(type="response.create", response={"output_modalities": ["audio"]})
    assert not h.errors(n)[1:] and model.typed == ["hello"]
    h.until(lambda: h.of_type("response.done", n), 5, SILENCE)
    assert h.of_type("response.done", n)[0]["response"]["status"] == "completed"


def test_speech_stopped_names_the_utterance_the_model_recognised_before_the_gateway_ended_it():
    h = Harness(eos_s=0.3)  # the model transcribes 0.3 s after the speech; the gateway's VAD ends it later
    h.connect()
    for turn in (1, 2):
        h.say(turn, 0.4)
        h.until(lambda: len(h.finals("assistant")) == turn and len(h.of(m.InputSpeechStopped)) == turn, 5)
    users = [t.item_id for t in h.finals("user")]
    started = [x.item_id for x in h.of(m.InputSpeechStarted)]
    stopped = [x.item_id for x in h.of(m.InputSpeechStopped)]
    assert stopped == started == users and len(set(users)) == 2
    for item_id in users:  # the model's transcript came first: the user item existed when speech stopped
        recognised = next(i for i, x in enumerate(h.client) if isinstance(x, m.Transcript) and x.final
                          and x.item_id == item_id)
        ended = next(i for i, x in enumerate(h.client) if isinstance(x, m.InputSpeechStopped)
                     and x.item_id == item_id)
        assert recognised < ended


# -- 13: what these found ---------------------------------------------------------------------------
def test_a_typed_message_after_a_response_create_sent_before_the_session_is_ready_is_accepted():
    h = RT()
    h.send(type="conversation.item.create", item=typed("one", "first"))  # starts the session
    h.send(type="response.create")
    n = len(h.events)
    h.send(type="conversation.item.create", item=typed("two", "second"))
    assert not h.errors(n)
    h.started()
    assert h.current_model.typed == ["one"]


def test_a_tool_choice_of_a_dropped_tool_in_the_same_update_is_one_error():
    h = RT()
    choice = {"type": "function", "name": "get_weather"}
    h.send(type="session.update", session={"tools": [WEATHER], "tool_choice": choice})
    h.started()
    n = len(h.events)
    h.send(type="session.update", session={"tools": [{**WEATHER, "name": "get_time"}], "tool_choice": choice})
    assert h.of_type("session.updated", n)[0]["session"]["tool_choice"] == "auto"
    assert [e["param"] for e in h.errors(n)] == ["session.tool_choice"]


def test_a_typed_turn_during_an_utterance_does_not_take_its_item_id():
    h = Harness()
    h.connect()
    h.run(0.2, speech(1))
    h.text({"type": "input.text", "text": "typed"})
    h.run(0.2, speech(1))
    h.until(lambda: h.of(m.InputSpeechStopped) and len(h.finals("assistant")) == 2, 6)
    [started], [stopped] = h.of(m.InputSpeechStarted), h.of(m.InputSpeechStopped)
    [spoken] = [t for t in h.finals("user") if t.text == "turn 1"]
    assert started.item_id == stopped.item_id == spoken.item_id


def test_the_audio_format_is_chosen_before_the_session_starts():
    """audio/pcmu asks for the session's mu-law codec: the session has none here (the harness's env),
    so the start itself is refused; once started, a format change is refused and nothing changes."""
    h = live()
    n = len(h.events)
    h.send(type="session.update", session={"type": "realtime", "audio": {"input": {"format": {"type": "audio/pcmu"}}}})
    assert [e["param"] for e in h.errors(n)] == ["session.audio.input.format"]
    assert h.of_type("session.updated", n)[-1]["session"]["audio"]["input"]["format"] == {"type": "audio/pcm",
                                                                                           "rate": 24000}
    h = RT()
    h.send(type="session.update", session={"type": "realtime", "audio": {"output": {"format": {"type": "audio/pcmu"}}}})
    h.until(lambda: h.closed is not None, 2, None)
    assert h.errors()[-1]["code"] == "unsupported"  # this gateway (the harness) has no codecs
