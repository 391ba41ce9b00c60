"""The dialogue (item machine), driven with Nova output events: no sockets, tasks or clocks."""

import itertools

from protocol import messages as m
from protocol import nova_events as nova
from protocol.continuity import StreamSetup
from protocol.dialogue import (
    AudioToClient,
    AwaitTruncate,
    Dialogue,
    EndAudioItem,
    FlushPlayback,
    ItemFinal,
    SendToClient,
    SendTextTurn,
    StartAudioItem,
)
from protocol.event_order import InputOrderValidator
from protocol.items import Item

_n = itertools.count()


def make_dialogue(**kw):
    """A dialogue with counting ids and a fixed clock."""
    return Dialogue(new_id=lambda: f"item_{next(_n)}", utc_now=lambda: "2026-01-01T00:00:00.000000Z", **kw)


IDS = {"sessionId": "s", "promptName": "p", "completionId": "c"}
MS = 48  # bytes per ms at 24 kHz


def feed(conv, events):
    for e in events:
        conv.model_event(nova.parse_output_event(e))
    return conv.actions()


def user_turn(text, cid="u1"):
    return [
        nova.output_content_start(IDS, cid, type="TEXT", role="USER", stage="FINAL"),
        nova.output_text(IDS, cid, "USER", text),
        nova.output_content_end(IDS, cid, type="TEXT", stop_reason="END_TURN"),
    ]


def sentence(text, n, *, last=False, audio_ms=500):
    end = "END_TURN" if last else "PARTIAL_TURN"
    return [
        nova.output_content_start(IDS, f"s{n}", type="TEXT", role="ASSISTANT", stage="SPECULATIVE"),
        nova.output_text(IDS, f"s{n}", "ASSISTANT", text),
        nova.output_content_end(IDS, f"s{n}", type="TEXT", stop_reason="PARTIAL_TURN"),
        nova.output_content_start(IDS, f"a{n}", type="AUDIO", role="ASSISTANT"),
        nova.output_audio(IDS, f"a{n}", bytes(MS * audio_ms)),
        nova.output_content_end(IDS, f"a{n}", type="AUDIO", stop_reason=end),
        nova.output_content_start(IDS, f"f{n}", type="TEXT", role="ASSISTANT", stage="FINAL"),
        nova.output_text(IDS, f"f{n}", "ASSISTANT", text),
        nova.output_content_end(IDS, f"f{n}", type="TEXT", stop_reason=end),
    ]


def of(actions, kind):
    return [a for a in actions if isinstance(a, kind)]


def test_user_transcript_becomes_a_final_item_at_once():
    conv = make_dialogue()
    acts = feed(conv, user_turn("I met with Doctor Smith"))
    (final,) = of(acts, ItemFinal)
    assert final.item.role == "user" and final.item.text == "I met with Doctor Smith"
    assert SendToClient(m.Status("thinking")) in acts


def test_assistant_sentence_plan_audio_then_final_after_playout():
    conv = make_dialogue()
    acts = feed(conv, sentence("Hello there.", 1, last=True))
    plans = [a.message for a in of(acts, SendToClient) if isinstance(a.message, m.Transcript)]
    assert plans and plans[0].final is False and plans[0].text == "Hello there."
    (start,) = of(acts, StartAudioItem)
    assert start.item_id == plans[0].item_id
    assert sum(len(a.pcm) for a in of(acts, AudioToClient)) == MS * 500
    assert of(acts, EndAudioItem) == [EndAudioItem(start.item_id, "end_turn")]
    assert of(acts, ItemFinal) == []  # not settled until the client has heard it
    conv.played_out(start.item_id)
    (final,) = of(conv.actions(), ItemFinal)
    assert final.item.item_id == start.item_id
    assert final.item.text == "Hello there." and not final.item.interrupted


def test_a_turn_of_several_sentences_is_one_item_with_finals_matched_in_order():
    conv = make_dialogue()
    events = sentence("One.", 1)[:6] + sentence("Two.", 2, last=True)[:6]  # plans and audio first
    acts = feed(conv, events)
    (start,) = of(acts, StartAudioItem)  # one audio item for the turn
    plans = [a.message.text for a in of(acts, SendToClient) if isinstance(a.message, m.Transcript)]
    assert plans == ["One.", "One. Two."]  # the plan so far, replacing the previous one
    assert of(acts, EndAudioItem) == [EndAudioItem(start.item_id, "end_turn")]
    conv.played_out(start.item_id)
    assert of(conv.actions(), ItemFinal) == []  # FINAL texts still to come
    acts = feed(conv, [
        nova.output_content_start(IDS, "f1", type="TEXT", role="ASSISTANT", stage="FINAL"),
        nova.output_text(IDS, "f1", "ASSISTANT", "One!"),
        nova.output_content_end(IDS, "f1", type="TEXT", stop_reason="PARTIAL_TURN"),
        nova.output_content_start(IDS, "f2", type="TEXT", role="ASSISTANT", stage="FINAL"),
        nova.output_text(IDS, "f2", "ASSISTANT", "Two!"),
        nova.output_content_end(IDS, "f2", type="TEXT", stop_reason="END_TURN"),
    ])
    (final,) = of(acts, ItemFinal)
    assert (final.item.item_id, final.item.text) == (start.item_id, "One! Two!")


def test_cut_turn_keeps_whole_sentences_then_part_of_the_cut_one():
    conv = make_dialogue()
    events = sentence("First sentence here.", 1, audio_ms=1000) + sentence("alpha beta gamma delta", 2)[:5]
    item_id = of(feed(conv, events), StartAudioItem)[0].item_id
    feed(conv, [nova.output_text(IDS, "x", "ASSISTANT", nova.INTERRUPTED_SIGNAL)])
    conv.playback_flushed(item_id, 1250, (item_id,), ())
    conv.actions()
    conv.playback_truncate(item_id, 1250)  # all of sentence 1, half of sentence 2 (500 ms)
    assert of(conv.actions(), ItemFinal) == []  # waits for sentence 2's FINAL ...
    conv.truncate_timeout(item_id, 1250)  # ... not for ever: the plan stands in for it
    (final,) = of(conv.actions(), ItemFinal)
    assert final.item.text == "First sentence here. alpha beta" and final.item.interrupted


def test_barge_in_flushes_and_trims_to_what_the_client_played():
    conv = make_dialogue()
    long_text = "one two three four five six seven eight nine ten"
    acts = feed(conv, sentence(long_text, 1, audio_ms=1000)[:5])  # audio still streaming
    item_id = of(acts, StartAudioItem)[0].item_id
    acts = feed(conv, [
        nova.output_content_end(IDS, "a1", type="AUDIO", stop_reason="INTERRUPTED"),
        nova.output_content_start(IDS, "f1", type="TEXT", role="ASSISTANT", stage="FINAL"),
        nova.output_text(IDS, "f1", "ASSISTANT", long_text),
        nova.output_text(IDS, "f1", "ASSISTANT", nova.INTERRUPTED_SIGNAL),
        nova.output_content_end(IDS, "f1", type="TEXT", stop_reason="INTERRUPTED"),
    ])
    assert len(of(acts, FlushPlayback)) == 1  # one flush for all the signals
    conv.playback_flushed(item_id, 300, (item_id,), ())
    acts = conv.actions()
    sent = [a.message for a in of(acts, SendToClient)]
    assert m.Interrupted(item_id) in sent
    assert m.ResponseAudioEnd(item_id, "interrupted") in sent
    assert AwaitTruncate(item_id) in acts
    conv.playback_truncate(item_id, 500)  # the client heard half
    (final,) = of(conv.actions(), ItemFinal)
    assert final.item.interrupted
    assert final.item.text == "one two three four five"
    assert nova.INTERRUPTED_SIGNAL not in final.item.text


def test_truncate_timeout_uses_the_gateway_estimate():
    conv = make_dialogue()
    acts = feed(conv, sentence("alpha beta gamma delta", 1, audio_ms=1000))
    item_id = of(acts, StartAudioItem)[0].item_id
    feed(conv, [nova.output_text(IDS, "x", "ASSISTANT", nova.INTERRUPTED_SIGNAL)])
    conv.playback_flushed(item_id, 500, (), ())
    conv.actions()
    conv.truncate_timeout(item_id, 500)
    (final,) = of(conv.actions(), ItemFinal)
    assert final.item.text == "alpha beta" and final.item.interrupted


def test_a_turn_the_client_never_heard_is_never_stored():
    conv = make_dialogue()
    acts = feed(conv, sentence("First.", 1) + sentence("Second.", 2, last=True))
    (item_id,) = (a.item_id for a in of(acts, StartAudioItem))
    feed(conv, [nova.output_text(IDS, "x", "ASSISTANT", nova.INTERRUPTED_SIGNAL)])
    conv.playback_flushed(None, 0, (item_id,), (item_id,))
    acts = conv.actions()
    assert m.Interrupted(item_id) in [a.message for a in of(acts, SendToClient)]
    assert of(acts, ItemFinal) == []
    conv.played_out(item_id)
    assert of(conv.actions(), ItemFinal) == []


def test_typed_text_is_a_user_item_and_an_interactive_block():
    setup = StreamSetup.build(system_prompt="Be brief.", history=[], voice="matthew", output_sample_rate=24000)
    conv = make_dialogue()
    conv.input_text("hello there")
    acts = conv.actions()
    assert of(acts, ItemFinal)[0].item.text == "hello there"
    (turn,) = of(acts, SendTextTurn)
    events = setup.text_turn(turn.text)
    names = [nova.event_name(e) for e in events]
    assert names == ["contentStart", "textInput", "contentEnd"]
    assert nova.event_body(events[0])["interactive"] is True
    v = InputOrderValidator()  # the whole sequence obeys the service's rules
    for e in setup.events + events + [setup.audio(bytes(640))] + setup.closing():
        v.check(e)


def test_stream_setup_sends_history_before_audio():
    history = [Item("1", "assistant", "hi", "t"), Item("2", "user", "I met Dr Smith", "t"),
               Item("3", "assistant", "Noted.", "t")]
    setup = StreamSetup.build(system_prompt="S", history=history, voice="tiffany", output_sample_rate=16000)
    names = [(nova.event_name(e), nova.event_body(e).get("role")) for e in setup.events]
    assert names[0] == ("sessionStart", None) and names[1] == ("promptStart", None)
    roles = [r for n, r in names if n == "contentStart"]
    assert roles == ["SYSTEM", "USER", "ASSISTANT", "USER"]  # leading assistant dropped; audio last
    assert nova.event_body(setup.events[1])["audioOutputConfiguration"]["sampleRateHertz"] == 16000


def test_close_keeps_spoken_but_unsettled_items():
    conv = make_dialogue()
    feed(conv, sentence("Said but not played out.", 1, last=True))
    kept = conv.close()
    assert [i.text for i in kept] == ["Said but not played out."] and kept[0].interrupted


def test_usage_is_forwarded():
    conv = make_dialogue()
    acts = feed(conv, [nova.usage_event(IDS, input_speech=10, input_text=5, output_speech=7, output_text=3)])
    assert SendToClient(m.Usage(15, 10)) in acts


def _flush(conv, acts, current):
    """What the session does with a FlushPlayback: the pacer says `current` was playing, 200 ms in."""
    if of(acts, FlushPlayback):
        conv.playback_flushed(current, 200, (current,), ())
    return acts + conv.actions()


def test_typing_over_an_answer_drops_what_the_model_still_says_of_it():
    conv = make_dialogue()
    acts = feed(conv, user_turn("tell me a story") + sentence("Once upon a time.", 1))  # the story goes on
    (story,) = of(acts, StartAudioItem)
    conv.input_text("hello there", playing=True)
    acts = _flush(conv, conv.actions(), story.item_id)
    assert SendToClient(m.Interrupted(story.item_id)) in acts
    # the model had not read the typed turn yet: one more sentence of the story, then its cut marker
    late = sentence("Every evening.", 2)[:6] + [
        nova.output_content_start(IDS, "x", type="TEXT", role="ASSISTANT", stage="FINAL"),
        nova.output_text(IDS, "x", "ASSISTANT", "Once upon"),
        nova.output_text(IDS, "x", "ASSISTANT", nova.INTERRUPTED_SIGNAL),
        nova.output_content_end(IDS, "x", type="TEXT", stop_reason="INTERRUPTED"),
    ]
    acts = feed(conv, late)
    assert not of(acts, StartAudioItem) and not of(acts, AudioToClient) and not of(acts, FlushPlayback)
    # then the answer to the typed turn is an item of its own
    acts = feed(conv, sentence("Hi!", 3, last=True))
    (reply,) = of(acts, StartAudioItem)
    conv.played_out(reply.item_id)
    texts = {a.item.item_id: a.item.text for a in of(conv.actions(), ItemFinal)}
    assert texts[reply.item_id] == "Hi!"
    conv.truncate_timeout(story.item_id, 200)
    story_final = [a.item for a in of(conv.actions(), ItemFinal) if a.item.item_id == story.item_id]
    assert story_final and "Every evening" not in story_final[0].text


def test_typing_after_the_model_finished_its_answer_drops_nothing():
    conv = make_dialogue()
    acts = feed(conv, user_turn("tell me a story") + sentence("Once upon a time.", 1, last=True))
    (story,) = of(acts, StartAudioItem)
    conv.input_text("hello there", playing=True)  # the client still plays it; the model is done
    _flush(conv, conv.actions(), story.item_id)
    acts = feed(conv, sentence("Hi!", 2, last=True))
    assert of(acts, StartAudioItem)  # the answer is not taken for the old one


def test_the_cut_marker_ends_the_finals_owed_for_the_cut_answer():
    """The model spoke a sentence but had not sent its FINAL text when it was cut: the FINAL of the
    next answer must not be taken for it."""
    conv = make_dialogue()
    acts = feed(conv, user_turn("tell me a story") + sentence("Once upon a time.", 1)[:6])  # no FINAL yet
    (story,) = of(acts, StartAudioItem)
    conv.input_text("hello there", playing=True)
    _flush(conv, conv.actions(), story.item_id)
    feed(conv, [
        nova.output_content_start(IDS, "x", type="TEXT", role="ASSISTANT", stage="FINAL"),
        nova.output_text(IDS, "x", "ASSISTANT", nova.INTERRUPTED_SIGNAL),
        nova.output_content_end(IDS, "x", type="TEXT", stop_reason="INTERRUPTED"),
    ])
    acts = feed(conv, sentence("Hi!", 2, last=True))
    (reply,) = of(acts, StartAudioItem)
    conv.played_out(reply.item_id)
    conv.playback_truncate(story.item_id, 400)
    texts = {a.item.item_id: a.item.text for a in of(conv.actions(), ItemFinal)}
    assert texts[reply.item_id] == "Hi!"
    assert texts[story.item_id] and "Hi" not in texts[story.item_id]


def test_a_spoken_barge_in_marker_does_not_shift_the_next_answers_finals():
    conv = make_dialogue()
    acts = feed(conv, user_turn("tell me a story") + sentence("Once upon a time.", 1)[:6])
    (story,) = of(acts, StartAudioItem)
    acts = feed(conv, [
        nova.output_content_start(IDS, "x", type="TEXT", role="ASSISTANT", stage="FINAL"),
        nova.output_text(IDS, "x", "ASSISTANT", "Once upon"),
        nova.output_content_end(IDS, "x", type="TEXT", stop_reason="INTERRUPTED"),
    ])
    _flush(conv, acts, story.item_id)
    acts = feed(conv, user_turn("hello there", cid="u2") + sentence("Hi!", 2, last=True))
    (reply,) = of(acts, StartAudioItem)
    conv.played_out(reply.item_id)
    texts = {a.item.item_id: a.item.text for a in of(conv.actions(), ItemFinal)}
    assert texts[reply.item_id] == "Hi!"
