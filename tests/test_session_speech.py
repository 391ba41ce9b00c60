"""Speech start and end (issue 12): Nova 2's userSpeechStart / userSpeechEnd, the gateway's own voice
activity detection when the model sends none, barge-in at the model's speech start, and the
"end of speech -> first assistant audio" metric. On the fake clock of tests/session_harness.py."""

from __future__ import annotations

from protocol import messages as m
from protocol import nova_events as nova

from .session_harness import IDS, SILENCE, Harness, speech

METRIC = "speech_end_to_audio_seconds"


def live(speech_events: bool = False, **kw) -> Harness:
    h = Harness(**kw)
    h.speech_events = speech_events
    assert h.connect() is not None
    return h


def speech_messages(h: Harness) -> list[tuple[str, str]]:
    return [(x.type, x.source) for x in h.client if isinstance(x, (m.InputSpeechStarted, m.InputSpeechStopped))]


def assert_bounded(h: Harness) -> None:
    """One started per utterance, each stopped after its started: they alternate."""
    kinds = [t for t, _ in speech_messages(h)]
    assert kinds == ["input.speech_started", "input.speech_stopped"] * (len(kinds) // 2) + (
        ["input.speech_started"] if len(kinds) % 2 else [])


def turn(h: Harness, n: int, seconds: float = 0.6) -> None:
    """The user says something; the model transcribes and answers it, and the answer plays out."""
    finals = len(h.finals("assistant"))
    h.say(n, seconds)
    h.until(lambda: len(h.finals("assistant")) > finals, 5)


def inject(h: Harness, *events: dict) -> None:
    for e in events:
        h.s.model_event(h.current_model.sid, e, h.now)
    h.pump()


# -- the events --------------------------------------------------------------------------------------
def test_user_speech_events_parse_with_any_body():
    assert nova.parse_output_event(nova.user_speech_start(IDS)) == nova.UserSpeechStart(dict(IDS))
    assert nova.parse_output_event(nova.user_speech_end(IDS)) == nova.UserSpeechEnd(dict(IDS))
    assert nova.parse_output_event({"event": {"userSpeechStart": {}}}) == nova.UserSpeechStart({})
    assert nova.parse_output_event(b'{"event": {"userSpeechEnd": null}}') == nova.UserSpeechEnd({})
    extra = {"event": {"userSpeechStart": {**IDS, "somethingNew": [1, 2]}}}
    assert nova.parse_output_event(extra).body["somethingNew"] == [1, 2]


def test_the_messages_are_additive_and_carry_their_source():
    assert m.to_wire(m.InputSpeechStarted("model")) == {"type": "input.speech_started", "source": "model"}
    assert m.to_wire(m.InputSpeechStopped("gateway")) == {"type": "input.speech_stopped", "source": "gateway"}


# -- who tells the client ----------------------------------------------------------------------------
def test_the_gateway_vad_tells_the_client_when_the_model_sends_no_speech_events():
    h = live()
    turn(h, 1)
    turn(h, 2)
    assert speech_messages(h) == [("input.speech_started", "gateway"), ("input.speech_stopped", "gateway")] * 2
    # the stop comes before the reply's audio, and it ended where the voice ended
    started = h.client.index(h.of(m.InputSpeechStarted)[0])
    stopped = h.client.index(h.of(m.InputSpeechStopped)[0])
    assert started < stopped < h.client.index(h.of(m.ResponseAudioStart)[0])


def test_once_the_model_sends_speech_events_it_is_the_source():
    h = live(speech_events=True)
    turn(h, 1)  # the gateway's VAD heard it first: the model's events for it tell the client nothing more
    assert speech_messages(h) == [("input.speech_started", "gateway"), ("input.speech_stopped", "gateway")]
    turn(h, 2)
    turn(h, 3)
    assert speech_messages(h)[2:] == [("input.speech_started", "model"), ("input.speech_stopped", "model")] * 2
    assert_bounded(h)


def test_silence_and_keepalives_tell_nothing():
    h = live()
    h.run(3.0, SILENCE)
    h.run(3.0, None)  # keepalives
    assert speech_messages(h) == []


def test_a_model_that_repeats_itself_is_told_once():
    h = live(speech_events=True)
    turn(h, 1)
    h.current_model.speech_events = False  # from here on, only what is injected
    h.step(speech(2))
    inject(h, nova.user_speech_start(IDS), nova.user_speech_start(IDS))
    inject(h, nova.user_speech_end(IDS), nova.user_speech_end(IDS))
    h.run(2.0, SILENCE)
    assert speech_messages(h)[2:] == [("input.speech_started", "model"), ("input.speech_stopped", "model")]
    assert_bounded(h)


def test_an_utterance_whose_stream_failed_is_ended_by_the_gateway():
    h = live(speech_events=True)
    turn(h, 1)
    h.say(2, 0.3)
    h.step(speech(2))  # the model's userSpeechStart is in
    assert speech_messages(h)[-1] == ("input.speech_started", "model")
    h.s.stream_failed(h.current_model.sid, "modelStreamErrorException", "boom", h.now)
    h.pump()
    h.say(2, 0.3)
    h.until(lambda: len(h.finals("user")) == 2, 5)
    h.run(1.0, SILENCE)
    assert speech_messages(h)[2:] == [("input.speech_started", "model"), ("input.speech_stopped", "gateway")]
    assert_bounded(h)


def test_an_utterance_the_model_never_ends_is_ended_by_the_gateway():
    h = live(speech_events=True)
    turn(h, 1)
    h.current_model.speech_events = False  # from here on, only what is injected: a start, never an end
    h.say(2, 0.3)
    inject(h, nova.user_speech_start(IDS))
    h.run(5.0, SILENCE)
    assert speech_messages(h)[2:] == [("input.speech_started", "model")]  # the model's end may still come
    h.run(6.0, SILENCE)
    assert speech_messages(h)[2:] == [("input.speech_started", "model"), ("input.speech_stopped", "gateway")]
    inject(h, nova.user_speech_start(IDS))  # the next utterance is the model's again
    assert speech_messages(h)[-1] == ("input.speech_started", "model")
    assert_bounded(h)


# -- barge-in at the model's speech start --------------------------------------------------------------
def _mid_answer(h: Harness) -> str:
    """The model is in the middle of a 3 s answer (its audio block still open), 0.6 s of it played."""
    turn(h, 1)
    inject(h,
           nova.output_content_start(IDS, "x1", type="TEXT", role="ASSISTANT", stage="SPECULATIVE"),
           nova.output_text(IDS, "x1", "ASSISTANT", "Here is a long answer that goes on"),
           nova.output_content_end(IDS, "x1", type="TEXT", stop_reason="PARTIAL_TURN"),
           nova.output_content_start(IDS, "y1", type="AUDIO", role="ASSISTANT"),
           nova.output_audio(IDS, "y1", bytes(48 * 3000)))
    h.run(0.6, SILENCE)
    return h.of(m.ResponseAudioStart)[-1].item_id


def test_user_speech_start_flushes_playback_before_the_interrupted_marker():
    h = live(speech_events=True)
    item_id = _mid_answer(h)
    interrupted_before = len(h.of(m.Interrupted))
    inject(h, nova.user_speech_start(IDS))
    assert h.of(m.Interrupted)[interrupted_before:] == [m.Interrupted(item_id)]
    assert m.ResponseAudioEnd(item_id, "interrupted") in h.client
    # the client learns of the speech before the assistant's audio stops
    assert h.client.index(h.of(m.InputSpeechStarted)[-1]) < h.client.index(m.Interrupted(item_id))
    audio = h.client_audio
    # what the model still says of the old answer, then its marker: no second flush, nothing played
    inject(h,
           nova.output_content_start(IDS, "x2", type="TEXT", role="ASSISTANT", stage="SPECULATIVE"),
           nova.output_text(IDS, "x2", "ASSISTANT", "and on"),
           nova.output_content_end(IDS, "x2", type="TEXT", stop_reason="PARTIAL_TURN"),
           nova.output_content_start(IDS, "y2", type="AUDIO", role="ASSISTANT"),
           nova.output_audio(IDS, "y2", bytes(48 * 1000)),
           nova.output_content_end(IDS, "y1", type="AUDIO", stop_reason="INTERRUPTED"),
           nova.output_content_start(IDS, "f1", type="TEXT", role="ASSISTANT", stage="FINAL"),
           nova.output_text(IDS, "f1", "ASSISTANT", nova.INTERRUPTED_SIGNAL),
           nova.output_content_end(IDS, "f1", type="TEXT", stop_reason="INTERRUPTED"),
           nova.output_content_end(IDS, "y2", type="AUDIO", stop_reason="INTERRUPTED"))
    h.text({"type": "playback.truncate", "item_id": item_id, "played_ms": 600})
    h.run(1.0, speech(2))
    assert h.of(m.Interrupted)[interrupted_before:] == [m.Interrupted(item_id)]
    assert [x for x in h.of(m.ResponseAudioEnd) if x.reason == "interrupted"] == [
        m.ResponseAudioEnd(item_id, "interrupted")]
    assert h.client_audio == audio
    final = next(t for t in h.finals("assistant") if t.item_id == item_id)
    assert final.text and "Here is a long answer that goes on".startswith(final.text)
    assert h.store.convs[h.ready.conversation_id].items[-1].interrupted
    # the user's turn is answered as usual
    h.until(lambda: h.finals("user")[-1].text == "turn 2", 5)
    h.until(lambda: h.finals("assistant")[-1].text == "answer to turn 2", 5)


def test_user_speech_start_while_the_client_still_plays_flushes_it():
    """The model has said all of its answer; the client is still playing it."""
    h = live(speech_events=True)
    turn(h, 1)
    h.reply_ms = h.current_model.reply_ms = 3000
    h.say(2, 0.4)
    h.until(lambda: len(h.of(m.ResponseAudioStart)) == 2, 3)
    item_id = h.of(m.ResponseAudioStart)[-1].item_id
    h.run(1.0, SILENCE)
    h.until(lambda: h.of(m.Interrupted), 0.5, speech(3))  # the model hears it at once
    assert h.of(m.Interrupted) == [m.Interrupted(item_id)]
    assert h.client.index(h.of(m.InputSpeechStarted)[-1]) < h.client.index(m.Interrupted(item_id))
    inject(h, nova.output_content_start(IDS, "z", type="TEXT", role="ASSISTANT", stage="SPECULATIVE"),
           nova.output_text(IDS, "z", "ASSISTANT", nova.INTERRUPTED_SIGNAL))  # the marker, late
    assert h.of(m.Interrupted) == [m.Interrupted(item_id)]
    h.run(1.5, SILENCE)
    assert h.of(m.Interrupted) == [m.Interrupted(item_id)]


def test_user_speech_start_over_nothing_interrupts_nothing():
    h = live(speech_events=True)
    turn(h, 1)
    turn(h, 2)
    assert h.of(m.Interrupted) == []
    assert [t.interrupted for t in h.store.convs[h.ready.conversation_id].items] == [False] * 4


# -- the metric ---------------------------------------------------------------------------------------
def test_end_of_speech_to_first_audio_from_the_models_speech_end():
    h = live(speech_events=True)
    turn(h, 1)
    turn(h, 2)
    turn(h, 3)
    values = [v for name, v in h.observed if name == METRIC]
    assert len(values) == 3
    # the model answers 0.2 s after its userSpeechEnd (the fake clock's steps are 20 ms)
    assert all(abs(v - 0.2) < 0.05 for v in values[1:])


def test_end_of_speech_to_first_audio_from_the_gateway_vad():
    h = live()
    turn(h, 1)
    turn(h, 2)
    values = [v for name, v in h.observed if name == METRIC]
    # the fake model waits 0.6 s of silence, then answers 0.2 s later: 0.8 s after the last voiced frame
    assert len(values) == 2 and all(abs(v - 0.8) < 0.05 for v in values)


def test_no_metric_for_a_typed_turn():
    h = live()
    h.text({"type": "input.text", "text": "hello"})
    h.until(lambda: h.finals("assistant"), 5)
    assert [v for name, v in h.observed if name == METRIC] == []
