"""Every decision of protocol.session.Session, on a fake clock: no sockets, no tasks, no waiting."""

from __future__ import annotations

import pytest

from protocol import messages as m
from protocol.codes import CloseCode
from protocol.continuity import IDLE_TIMEOUT_MESSAGE, Failure, classify
from protocol.items import Item
from protocol.session import State, may_use

from .session_harness import FRAME, SILENCE, FakeStore, Harness, speech


def live(**kw) -> Harness:
    h = Harness(**kw)
    assert h.connect() is not None
    return h


# -- handshake -------------------------------------------------------------------------------------
def test_audio_before_session_start_is_a_protocol_error():
    h = Harness()
    h.audio(SILENCE)
    assert h.closed == CloseCode.PROTOCOL_ERROR and h.state is State.CLOSED


@pytest.mark.parametrize("first", ['{"type": "ping", "id": 1}', "not json", '{"type":"session.start","protocol":2}'])
def test_a_bad_first_message_closes_4400_with_an_error(first):
    h = Harness()
    h.text(first)
    assert h.closed == CloseCode.PROTOCOL_ERROR
    assert [fatal for _, fatal in h.errors()] == [True]


def test_no_session_start_in_time_closes_4408():
    h = Harness(handshake_timeout_s=1.5)
    h.run(1.4, None)
    assert h.closed is None
    h.run(0.2, None)
    assert h.closed == CloseCode.HANDSHAKE_TIMEOUT


def test_credentials_invalid_or_missing_when_required_close_4401():
    h = Harness(bearer="garbage")
    h.connect()
    assert h.closed == CloseCode.UNAUTHORIZED
    h = Harness(auth_required=True)
    h.connect()
    assert h.closed == CloseCode.UNAUTHORIZED
    h = Harness(auth_required=True)
    assert h.connect(auth="jwt:alice").conversation_id


def test_session_ready_then_listening_and_a_new_conversation():
    h = live()
    ready = h.ready
    assert ready.resumed is False and ready.resume_failed is None and ready.history == []
    assert h.statuses() == ["listening"] and h.state is State.LIVE
    assert ready.resume_token == f"resume|{ready.conversation_id}|{h.s.owner}" and h.s.owner.startswith("anon:")


# -- resume and access: one rule ---------------------------------------------------------------------
def test_the_access_rule():
    assert may_use("anon:x", None) and may_use("anon:x", "user:bob")
    assert may_use("user:bob", "user:bob")
    assert not may_use("user:bob", None) and not may_use("user:bob", "user:eve")


def _conversation(store: FakeStore, owner: str, *texts: str) -> str:
    cid = store.create(owner)
    store.convs[cid].items = [Item(f"i{n}", "user" if n % 2 == 0 else "assistant", t, "2026-01-01T00:00:00Z")
                              for n, t in enumerate(texts)]
    return cid


def test_resume_gives_the_history_to_the_model_before_any_audio():
    store = FakeStore()
    cid = _conversation(store, "anon:a", "I met Dr Smith", "Noted.")
    h = Harness(store=store)
    h.audio_before = None
    h.text({"type": "session.start", "resume": f"resume|{cid}|anon:a"})
    h.audio(speech(1))  # before session.ready: buffered, delivered after the history
    h.until(lambda: h.ready is not None, 2)
    assert h.ready.resumed and h.ready.history_length == 2 and [i["text"] for i in h.ready.history] == [
        "I met Dr Smith", "Noted."]
    model = h.current_model
    assert "I met Dr Smith" in model.history_texts() and model.audio["client"] > 0


def test_a_user_owned_conversation_needs_its_user():
    store = FakeStore()
    cid = _conversation(store, "user:bob", "secret")
    for bearer, resumed in ((None, False), ("jwt:eve", False), ("jwt:bob", True)):
        h = Harness(store=store, bearer=bearer)
        ready = h.connect(resume=f"resume|{cid}|user:bob")
        assert ready.resumed is resumed, bearer
        assert ready.resume_failed == (None if resumed else "not_found")
        assert ("secret" in [i["text"] for i in ready.history]) is resumed


def test_a_raw_conversation_id_resumes_only_for_its_authenticated_owner():
    store = FakeStore()
    cid = _conversation(store, "user:bob", "hi")
    assert not Harness(store=store).connect(conversation_id=cid).resumed
    assert Harness(store=store, bearer="jwt:bob").connect(conversation_id=cid).resumed


def test_missing_ended_and_forged_look_the_same():
    store = FakeStore()
    ended = _conversation(store, "anon:a", "x")
    store.convs[ended].ended = True
    for token in ("resume|nope|anon:a", f"resume|{ended}|anon:a", "forged"):
        ready = Harness(store=store).connect(resume=token)
        assert (ready.resumed, ready.resume_failed) == (False, "not_found")


def test_pending_receipts_are_stored_once_and_foreign_ones_refused():
    store, creds = FakeStore(), None
    h = live(store=store)
    h.text({"type": "input.text", "text": "remember this"})
    receipt = h.finals("user")[0].receipt
    cid = h.ready.conversation_id
    store.convs[cid].items.clear()  # as if the write was lost with the process
    creds = h.creds
    foreign = creds.receipt("other", Item("x", "user", "not yours", "2026-01-01T00:00:00Z"))
    h2 = Harness(store=store, creds=creds)
    ready = h2.connect(resume=h.ready.resume_token, pending=[receipt, receipt, foreign])
    h2.run(0.1)
    assert [i.text for i in store.convs[cid].items] == ["remember this"]
    assert ready.history_length == 1
    assert ("bad_receipt", False) in h2.errors()
    assert [x.item_id for x in h2.of(m.ItemSaved)] == [h.finals("user")[0].item_id]


def test_the_store_down_at_the_handshake_is_try_again_later():
    store = FakeStore()
    store.down = True
    h = Harness(store=store)
    h.connect()
    assert h.closed == CloseCode.TRY_AGAIN_LATER and h.errors() == [("store_degraded", True)]


# -- frames ------------------------------------------------------------------------------------------
def test_frame_rules():
    h = live()
    h.audio(b"\x01" * 641)  # odd: dropped, said, not fatal
    assert h.errors() == [("invalid_field", False)] and h.closed is None
    h.audio(bytes(m.MAX_FRAME_BYTES + 2))
    assert h.closed == CloseCode.MESSAGE_TOO_BIG


def test_text_messages_over_64k_close_1009_and_unknown_ones_are_an_error():
    h = live()
    h.text({"type": "what"})
    assert h.errors() == [("unknown_type", False)]
    h.text('{"type":"ping","id":"' + "x" * 70000 + '"}')
    assert h.closed == CloseCode.MESSAGE_TOO_BIG


@pytest.mark.parametrize("frame", [SILENCE * 3, b"\x00" * (3 * FRAME + 1)], ids=["even", "odd"])
def test_every_binary_frame_is_charged_to_the_rate_limit(frame):
    h = live()
    seconds = 0.0
    while h.closed is None and seconds < 20:
        h.step(frame)  # 60 ms of audio every 20 ms: 3x real time
        seconds += 0.02
    assert h.closed == CloseCode.RATE_LIMITED and 4.5 < seconds < 6.5


def test_a_loop_stall_is_not_charged_to_a_real_time_client():
    h = live()
    h.run(5, SILENCE)
    h.now += 6.0  # nothing read for 6 s; then the 6 s of frames that waited in the socket
    for _ in range(300):
        h.audio(SILENCE)
    h.run(2, SILENCE)
    assert h.closed is None


def test_ping_gets_pong_with_server_time_and_messages_before_ready_are_not_ready():
    h = Harness(open_delay=1.0)
    h.text({"type": "session.start"})
    h.text({"type": "ping", "id": 7})
    h.text({"type": "input.text", "text": "hi"})
    assert h.of(m.Pong) == [m.Pong(7, 1_800_000_000.0)] and h.errors() == [("not_ready", False)]


# -- keepalive ---------------------------------------------------------------------------------------
def test_keepalive_feeds_silence_while_the_client_sends_none():
    h = live()
    h.run(10, None)  # a muted client: no frames at all
    sent = h.model_audio["keepalive"]
    assert 8.0 * 32000 <= sent <= 10.2 * 32000  # about real time, once it starts (after 1 s)


def test_keepalive_is_not_fed_when_the_loop_lags_behind_a_streaming_client():
    h = live()
    before = h.model_audio["client"]
    for _ in range(5):
        h.run(2, SILENCE)      # streaming ...
        h.now += 1.5            # ... the loop stalls: no frame read, and the tick comes late
        h.s.tick(h.now)
        h.pump()
        for _ in range(75):     # then reads what waited
            h.audio(SILENCE)
    assert h.model_audio["keepalive"] == 0
    assert h.model_audio["client"] - before == 5 * (100 + 75) * FRAME


# -- hand-overs --------------------------------------------------------------------------------------
def test_zero_loss_across_hand_overs_with_a_slow_end_of_speech():
    """The model transcribes speech 2 s after it ends; a rotation is due every 3 s. Twenty spoken
    turns give twenty user items, each answered, every audio byte at exactly one stream."""
    h = live(eos_s=2.0, rotate_after_s=3.0, rotate_force_after_s=60.0)
    sent = h.model_audio["client"]  # what the client said before session.ready
    for turn in range(1, 21):
        h.say(turn, 1.2)
        sent += 60 * FRAME
        for _ in range(250):  # the user waits for the answer (and a little more: quiet moments)
            h.step(SILENCE)
            sent += FRAME
            if len(h.finals("assistant")) == turn and h.s._dialogue.idle:
                break
        for _ in range(50):
            h.step(SILENCE)
            sent += FRAME
    users = [t.text for t in h.finals("user")]
    assert users == [f"turn {n}" for n in range(1, 21)]
    assert [t.text for t in h.finals("assistant")] == [f"answer to turn {n}" for n in range(1, 21)]
    assert h.counts[("rotations", "quiet")] >= 10 and h.counts[("rotations", "forced")] == 0
    h.run(0.1)  # the last frames held to make a model event (MODEL_HOLD_S) go out
    # every client byte went to exactly one stream, none was replayed
    assert h.model_audio["client"] == sent
    assert sum(mod.audio["client"] for mod in h.models.values()) == sent
    assert h.model_audio["replay"] == 0
    # and each new stream opened with the whole dialogue so far, last answer included
    for model in list(h.models.values())[1:]:
        texts = model.history_texts()
        answers = [t for t in texts if t.startswith("answer to")]
        asked = [t for t in texts if t.startswith("turn ")]
        assert len(answers) == len(asked)


def test_no_quiet_hand_over_while_speech_is_not_yet_transcribed():
    h = live(eos_s=2.0, rotate_after_s=0.5, rotate_force_after_s=60.0)
    h.say(1, 1.0)
    h.run(1.5, SILENCE)  # 1.5 s of silence: quiet to the VAD, not yet transcribed
    assert h.counts[("rotations", "quiet")] == 0
    h.until(lambda: h.counts[("rotations", "quiet")] == 1, 5)
    assert [t.text for t in h.finals("user")] == ["turn 1"]


def test_a_forced_hand_over_replays_the_utterance_under_way():
    h = live(eos_s=0.6, rotate_after_s=2.0, rotate_force_after_s=2.5)
    h.run(1.5, SILENCE)
    h.say(1, 2.0)  # due at 2 s while the user speaks, forced at 2.5 s: mid-utterance
    h.until(lambda: len(h.finals("user")) == 1, 5)
    assert h.counts[("rotations", "forced")] == 1
    assert [t.text for t in h.finals("user")] == ["turn 1"]  # heard once, by the new stream
    assert h.model_audio["replay"] > 0


def test_a_prepared_stream_is_dropped_if_the_user_speaks_before_the_switch():
    h = live(eos_s=0.6, rotate_after_s=1.0, rotate_force_after_s=60.0, open_delay=0.5)
    h.run(1.1, SILENCE)  # due and quiet: the next stream is being opened
    assert h.state is State.HANDING_OVER
    h.say(1, 0.6)  # ... the user speaks before it is ready
    assert h.state is State.LIVE and h.counts[("rotations", "quiet")] == 0
    h.until(lambda: len(h.finals("assistant")) == 1, 5)
    h.until(lambda: h.counts[("rotations", "quiet")] == 1, 5)
    assert h.model_audio["replay"] == 0


def test_a_stream_that_says_nothing_after_speech_is_replaced_once():
    h = live(eos_s=0.6, deaf_after_s=3.0)
    h.deaf_next = 2  # the next two streams are deaf
    h.s.stream_failed(h.current_model.sid, "modelStreamErrorException", "boom", h.now)
    h.pump()
    h.until(lambda: h.state is State.LIVE, 2)
    h.say(1, 1.0)
    h.run(4.0, SILENCE)
    assert h.counts[("deaf_streams", "")] == 1
    h.run(6.0, SILENCE)  # the replacement is deaf too: not replaced again for the same utterance
    assert h.counts[("deaf_streams", "")] == 1
    h.say(2, 1.0)  # a healthy stream comes only with a new deaf check
    h.until(lambda: h.counts[("deaf_streams", "")] == 2, 6)
    h.until(lambda: len(h.finals("user")) == 1, 5)
    assert h.finals("user")[0].text == "turn 2"


def test_a_deaf_stream_hands_the_utterance_to_its_replacement():
    h = live(eos_s=0.6, deaf_after_s=2.0)
    h.deaf_next = 1
    h.s.stream_failed(h.current_model.sid, "modelStreamErrorException", "boom", h.now)
    h.pump()
    h.until(lambda: h.state is State.LIVE, 2)
    h.say(1, 1.0)
    h.until(lambda: len(h.finals("user")) == 1, 6)
    assert h.finals("user")[0].text == "turn 1" and h.counts[("deaf_streams", "")] == 1
    assert h.model_audio["replay"] > 0


# -- recovery ----------------------------------------------------------------------------------------
def test_failures_are_classified_once():
    assert classify("validationException", IDLE_TIMEOUT_MESSAGE) is Failure.IDLE_TIMEOUT
    assert classify("validationException", "Invalid input request: bad") is Failure.INVALID_INPUT
    assert classify("throttlingException", "") is Failure.THROTTLED and Failure.THROTTLED.recoverable
    assert not Failure.ACCESS_DENIED.recoverable and not classify("whatever", "").recoverable


def test_a_failure_mid_utterance_replays_it_to_the_new_stream():
    h = live(eos_s=0.6)
    h.say(1, 0.6)
    first = h.current_model
    h.s.stream_failed(first.sid, "modelStreamErrorException", "boom", h.now)
    h.pump()
    assert h.statuses()[-1] == "recovering" and h.state is State.RECOVERING
    h.say(1, 0.4)
    h.until(lambda: len(h.finals("user")) == 1, 5)
    assert h.finals("user")[0].text == "turn 1" and h.current_model is not first
    assert h.model_audio["replay"] >= 0.6 * 32000 and h.counts[("recoveries", "modelStreamErrorException")] == 1
    assert h.statuses()[-3:].count("listening") >= 1


def test_a_failure_mid_answer_asks_the_new_stream_again():
    h = live(eos_s=0.6)
    h.say(1, 0.6)
    h.until(lambda: len(h.finals("user")) == 1, 3)
    h.s.stream_failed(h.current_model.sid, "internalServerException", "oops", h.now)  # before it answers
    h.pump()
    h.until(lambda: len(h.finals("assistant")) == 1, 5)
    new = h.current_model
    assert new.typed == ["turn 1"] and "turn 1" not in new.history_texts()  # asked, not told twice
    assert h.finals("assistant")[0].text == "answer to typed turn 1"


def test_the_recovery_ladder_and_then_model_unavailable():
    h = live()
    delays = []
    for n in range(3):
        t0 = h.now
        h.s.stream_failed(h.current_model.sid, "serviceUnavailableException", "down", h.now)
        h.pump()
        h.until(lambda: h.state is State.LIVE, 5)
        delays.append(round(h.now - t0, 1))
    assert delays == [0.1, 1.1, 3.1]  # 0, 1, 3 s, plus the 0.05 s open, in 20 ms steps
    h.s.stream_failed(h.current_model.sid, "serviceUnavailableException", "down", h.now)
    h.pump()
    h.run(0.1)
    assert h.errors() == [("model_unavailable", True)] and h.closed == CloseCode.INTERNAL_ERROR


def test_the_idle_timeout_reopens_at_once_and_does_not_count():
    h = live()
    for _ in range(5):
        h.s.stream_failed(h.current_model.sid, "validationException", IDLE_TIMEOUT_MESSAGE, h.now)
        h.pump()
        h.until(lambda: h.state is State.LIVE, 1)
    assert h.closed is None and len(h.models) == 6


def test_a_failed_first_open_is_fatal_with_a_clear_message():
    h = Harness()
    h.open_failures.append(("accessDeniedException", "no access"))
    h.connect()
    assert h.closed == CloseCode.INTERNAL_ERROR
    [err] = h.of(m.Error)
    assert err.code == "model_unavailable" and "bedrock:InvokeModel" in err.message


def test_reopen_failures_climb_the_ladder():
    h = live()
    h.open_failures += [("throttlingException", "slow down")] * 2
    h.s.stream_failed(h.current_model.sid, "throttlingException", "slow down", h.now)
    h.pump()
    h.until(lambda: h.state is State.LIVE, 8)
    assert len(h.models) == 4 and h.closed is None


def test_an_unparseable_event_is_a_recoverable_failure():
    h = live()
    h.s.model_event(h.current_model.sid, b"{not json", h.now)
    h.pump()
    assert h.state is State.RECOVERING
    h.until(lambda: h.state is State.LIVE, 2)


# -- the store ---------------------------------------------------------------------------------------
def test_a_store_outage_keeps_writes_in_order_and_says_so_once():
    h = live()
    h.store.down = True
    for n in range(3):
        h.text({"type": "input.text", "text": f"typed {n}"})
        h.until(lambda: len(h.finals("assistant")) == n + 1, 5)
    assert h.errors() == [("store_degraded", False)] and not h.of(m.ItemSaved)
    h.store.down = False
    h.run(6)
    finals = [t.item_id for t in h.finals()]
    assert [x.item_id for x in h.of(m.ItemSaved)] == finals == h.store.writes


def test_a_full_store_backlog_ends_the_session_1013():
    import protocol.session as session_module

    h = live()
    h.store.down = True
    session_module.STORE_QUEUE_ITEMS, old = 4, session_module.STORE_QUEUE_ITEMS
    try:
        for n in range(3):
            h.text({"type": "input.text", "text": f"typed {n}"})
            h.run(1)
    finally:
        session_module.STORE_QUEUE_ITEMS = old
    assert h.closed == CloseCode.TRY_AGAIN_LATER and ("store_degraded", True) in h.errors()


# -- barge-in ----------------------------------------------------------------------------------------
def _answering(h: Harness) -> str:
    """The user speaks; the model answers with 3 s of audio, two thirds of which the client plays."""
    h.reply_ms = h.current_model.reply_ms = 3000
    h.say(1, 0.4)
    h.until(lambda: h.of(m.ResponseAudioStart), 3)
    h.run(2.0, SILENCE)  # two thirds of the 3 s answer played
    return h.of(m.ResponseAudioStart)[0].item_id


def _barge_in(h: Harness) -> None:
    model = h.current_model
    ev = __import__("protocol.nova_events", fromlist=["x"])
    ids = {"sessionId": "s", "promptName": "p", "completionId": "c"}
    for e in (ev.output_content_start(ids, "b", type="TEXT", role="ASSISTANT", stage="SPECULATIVE"),
              ev.output_text(ids, "b", "ASSISTANT", ev.INTERRUPTED_SIGNAL)):
        h.s.model_event(model.sid, e, h.now)
    h.pump()


def test_barge_in_flushes_and_keeps_what_the_client_heard():
    h = Harness(eos_s=0.2)
    h.connect()
    item_id = _answering(h)
    _barge_in(h)
    assert h.of(m.Interrupted) == [m.Interrupted(item_id)]
    h.text({"type": "playback.truncate", "item_id": item_id, "played_ms": 2000})
    h.run(0.5)
    [final] = h.finals("assistant")
    assert final.item_id == item_id and final.text and "answer to turn 1".startswith(final.text)
    assert final.text != "answer to turn 1"
    assert h.store.convs[h.ready.conversation_id].items[-1].interrupted


def test_without_playback_truncate_the_server_estimate_is_used():
    h = Harness(eos_s=0.2, truncate_wait_ms=500)
    h.connect()
    item_id = _answering(h)
    _barge_in(h)
    h.run(0.4)
    assert not h.finals("assistant")
    h.run(0.2)
    assert h.finals("assistant")[0].item_id == item_id


def test_typing_over_the_assistant_interrupts_it():
    h = Harness(eos_s=0.2)
    h.connect()
    item_id = _answering(h)
    h.text({"type": "input.text", "text": "stop"})
    assert h.of(m.Interrupted) == [m.Interrupted(item_id)]
    h.until(lambda: len(h.finals("assistant")) == 2, 5)
    texts = {t.item_id: t.text for t in h.finals("assistant")}
    assert texts[item_id] == "answer to" and "answer to typed stop" in texts.values()


def test_playback_full_pauses_model_events():
    h = live()
    assert not h.s.model_paused
    h.s._pacer.push_audio("x", b"")  # unknown item: ignored
    h.s._pacer.start_item("x", m.ResponseAudioStart("x"))
    h.s._pacer.push_audio("x", bytes(48 * 61_000))
    assert h.s.model_paused


# -- closing -----------------------------------------------------------------------------------------
def test_session_end_stores_ends_and_closes_1000():
    h = live()
    h.text({"type": "input.text", "text": "hello"})
    h.text({"type": "session.end"})
    h.run(0.1)
    assert isinstance(h.client[-1], m.SessionEnded) and h.closed == CloseCode.NORMAL
    assert h.store.convs[h.ready.conversation_id].ended and h.state is State.CLOSED
    assert h.store.writes == [t.item_id for t in h.finals()]


def test_session_end_racing_a_disconnect_still_ends_and_stores():
    h = live()
    h.text({"type": "input.text", "text": "hello"})
    h.slow_store = True
    h.text({"type": "session.end"})
    h.s.client_gone(h.now)  # the client went away before session.ended
    h.pump()
    h.slow_store = False
    h.release_store()
    h.run(0.2)
    conv = h.store.convs[h.ready.conversation_id]
    assert conv.ended and [i.text for i in conv.items][0] == "hello"
    assert h.closed is None and h.state is State.CLOSED  # nothing sent to a gone client


def test_a_disconnect_keeps_what_was_said_and_not_heard():
    h = Harness(eos_s=0.2)
    h.connect()
    item_id = _answering(h)
    h.s.client_gone(h.now)
    h.pump()
    h.run(0.1)
    items = h.store.convs[h.ready.conversation_id].items
    assert items[-1].item_id == item_id and items[-1].interrupted and h.state is State.CLOSED


def test_drain_sends_reconnect_stores_and_closes_1012():
    h = live()
    h.slow_store = True
    h.text({"type": "input.text", "text": "hello"})
    h.s.drain(250, h.now)
    h.pump()
    assert h.of(m.SessionReconnect) == [m.SessionReconnect("draining", 250)] and h.closed is None
    h.slow_store = False
    h.release_store()
    h.run(0.1)
    assert h.closed == CloseCode.SERVICE_RESTART
    saved = {x.item_id for x in h.of(m.ItemSaved)}
    assert {t.item_id for t in h.finals()} <= saved  # told before the close


def test_a_stuck_store_does_not_hold_the_close_forever():
    h = live(drain_flush_s=2.0)
    h.slow_store = True
    h.text({"type": "input.text", "text": "hello"})
    h.s.drain(0, h.now)
    h.pump()
    h.run(1.9)
    assert h.closed is None
    h.run(0.2)
    assert h.closed == CloseCode.SERVICE_RESTART


def test_a_client_that_does_not_read_is_closed():
    h = live()
    h.s.client_backlog_full(h.now)
    h.pump()
    assert h.closed == CloseCode.RATE_LIMITED and h.state in (State.CLOSING, State.CLOSED)
    h.run(0.1)
    assert h.state is State.CLOSED


def test_typed_text_on_a_model_without_text_input_is_unsupported():
    h = live(text_input=False)
    h.text({"type": "input.text", "text": "hi"})
    assert h.errors() == [("unsupported", False)] and not h.finals()


def test_streams_are_closed_in_the_service_order_at_the_end():
    h = live()
    model = h.current_model
    h.text({"type": "session.end"})
    assert model.closed


def test_the_gateway_may_refuse_an_identified_client_before_anything_is_loaded():
    h = Harness(bearer="jwt:bob")
    h.refuse = lambda principal: (CloseCode.TRY_AGAIN_LATER, "at capacity") if principal == "user:bob" else None
    h.connect()
    assert h.closed == CloseCode.TRY_AGAIN_LATER and h.ready is None and not h.store.convs


def test_audio_while_the_token_is_verified_is_kept_for_the_model():
    h = Harness(bearer="jwt:bob")
    h.text({"type": "session.start"})
    h.until(lambda: h.ready is not None, 2, pcm=speech(1))
    assert h.current_model.audio["client"] > 0


# -- limits ------------------------------------------------------------------------------------------
def test_pings_and_error_replies_are_rate_limited_and_ping_ids_capped():
    h = live()
    for n in range(100):
        h.text({"type": "ping", "id": n})
        h.text({"type": "nonsense"})
    assert 50 <= len(h.of(m.Pong)) <= 52 and 20 <= len(h.of(m.Error)) <= 22  # the bursts (PINGS, ERROR_REPLIES)
    h.run(2.0)
    h.text({"type": "ping", "id": "x" * 129})
    assert h.errors()[-1] == ("invalid_field", False) and h.closed is None


def test_typed_turns_are_rate_limited_then_closed_4429():
    h = live()
    for n in range(5):
        h.text({"type": "input.text", "text": f"t{n}"})
    assert len(h.finals("user")) == 5
    h.text({"type": "input.text", "text": "one too many"})
    assert h.errors() == [("rate_limited", False)] and len(h.finals("user")) == 5
    h.run(2.1)
    h.text({"type": "input.text", "text": "after a pause"})
    assert len(h.finals("user")) == 6
    for n in range(10):
        h.text({"type": "input.text", "text": f"flood {n}"})
    assert h.closed == CloseCode.RATE_LIMITED


def test_a_client_that_sends_nothing_is_closed_4410_and_can_resume():
    h = live(idle_timeout_s=30)
    h.run(29, SILENCE)  # silence is not activity
    assert h.closed is None
    h.text({"type": "ping", "id": 1})
    h.run(29.9, None)
    assert h.closed is None
    h.run(0.2, None)
    assert h.closed == CloseCode.IDLE and h.errors() == [("idle_timeout", True)]
    again = Harness(store=h.store, creds=h.creds)
    assert again.connect(resume=h.ready.resume_token).resumed


def test_speech_keeps_a_session_alive():
    h = live(idle_timeout_s=5, eos_s=0.3)
    for turn in range(4):
        h.say(turn + 1, 0.5)
        h.run(3, SILENCE)
    assert h.closed is None


def test_a_conversation_at_its_cap_takes_no_more_turns():
    h = live(max_items=4)
    h.text({"type": "input.text", "text": "one"})
    h.until(lambda: len(h.finals()) == 2, 3)
    h.text({"type": "input.text", "text": "two"})
    h.until(lambda: h.closed is not None, 3)
    assert h.closed == CloseCode.RATE_LIMITED and ("conversation_full", True) in h.errors()
    assert len(h.store.convs[h.ready.conversation_id].items) == 4  # what was said is kept
    again = Harness(store=h.store, creds=h.creds, max_items=4)
    again.connect(resume=h.ready.resume_token)
    assert again.closed == CloseCode.RATE_LIMITED and again.errors() == [("conversation_full", True)]


# -- one live session per conversation ---------------------------------------------------------------
def test_a_second_connection_takes_the_conversation_over():
    first = live()
    first.text({"type": "input.text", "text": "hello"})
    second = Harness(store=first.store, creds=first.creds)
    assert second.connect(resume=first.ready.resume_token).resumed
    first.text({"type": "input.text", "text": "still there?"})  # its write is refused
    first.run(0.5)
    assert first.closed == CloseCode.CONFLICT and ("taken_over", True) in first.errors()
    second.text({"type": "input.text", "text": "it is mine now"})
    second.run(0.5)
    assert second.closed is None and "it is mine now" in [i.text for i in second.store.convs[
        second.ready.conversation_id].items]


def test_a_revoked_conversation_closes_the_session_at_its_next_write():
    h = live()
    conv = h.store.convs[h.ready.conversation_id]
    conv.epoch, conv.live = conv.epoch + 1, ""  # "log out everywhere"
    h.text({"type": "input.text", "text": "hello"})
    h.run(0.5)
    assert h.closed == CloseCode.CONFLICT and ("conversation_gone", True) in h.errors()


def test_a_token_minted_before_a_revocation_does_not_resume():
    h = live()
    token = h.ready.resume_token
    h.store.convs[h.ready.conversation_id].epoch += 1
    ready = Harness(store=h.store, creds=h.creds).connect(resume=token)
    assert (ready.resumed, ready.resume_failed) == (False, "not_found")


def test_the_services_access_denied_text_stays_in_the_log():
    h = Harness()
    h.open_failures.append(("accessDeniedException", "User: arn:aws:sts::123456789012:assumed-role/x is not "
                            "authorized to perform: bedrock:InvokeModel"))
    h.connect()
    [err] = h.of(m.Error)
    assert "123456789012" not in err.message and "bedrock:InvokeModel" in err.message
    assert any("123456789012" in str(x.fields) for x in h.logs)


def test_a_session_taken_over_mid_answer_closes_without_trying_to_store():
    h = Harness(eos_s=0.2)
    h.connect()
    _answering(h)  # an answer the client has not heard to the end
    h.s.conversation_gone("taken_over", h.now)
    h.pump()
    h.run(0.1)
    assert h.closed == CloseCode.CONFLICT and h.state is State.CLOSED
    assert not [x for x in h.logs if x.level == "error"]
