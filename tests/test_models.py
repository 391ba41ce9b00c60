"""The model catalog (protocol/models.py) and history sized to the model: Nova 2-class models get their
200 KB, a stream that refuses that gets the conservative 40 KB once, and the conversation goes on."""

from __future__ import annotations

from protocol import models
from protocol.history import shape_history
from protocol.items import Item
from protocol.models import CONSERVATIVE_HISTORY, NOVA_2_HISTORY, history_limits, model_spec
from protocol.session import State
from tests.session_harness import FakeStore, Harness

TOO_LARGE = "Invalid input request: chat history exceeds 40960 bytes in total"


def test_the_catalog():
    for mid in ("amazon.nova-2-5-sonic", "amazon.nova-2-sonic-v1:0"):
        spec = model_spec(mid)
        assert spec.known and spec.family == "nova-2" and spec.text_input and spec.endpointing_sensitivity
        assert spec.history == NOVA_2_HISTORY and "olivia" in spec.voices and spec.warning() is None
    legacy = model_spec("amazon.nova-sonic-v1:0")
    assert legacy.legacy and not legacy.text_input and legacy.history == CONSERVATIVE_HISTORY
    assert "2026-09-14" in legacy.warning()
    # a cross-region id passes through and is looked up without its prefix
    spec = model_spec("us.amazon.nova-2-sonic-v1:0")
    assert spec.model_id == "us.amazon.nova-2-sonic-v1:0" and spec.known and spec.text_input
    assert model_spec("global.amazon.nova-sonic-v1:0").legacy
    # an id nobody knows yet works with Nova 2 defaults, and says so
    new = model_spec("amazon.nova-3-sonic")
    assert not new.known and new.text_input and new.history == NOVA_2_HISTORY and "not in the model catalog" in new.warning()


def test_history_limits_with_overrides():
    spec = model_spec(models.NOVA_2_SONIC)
    assert history_limits(spec) == NOVA_2_HISTORY
    assert history_limits(spec, total_bytes=100_000) == models.HistoryLimits(100_000, 50 * 1024, 50 * 1024)
    assert history_limits(spec, message_bytes=8192) == models.HistoryLimits(200 * 1024, 8192, 8192)
    assert history_limits(model_spec(models.NOVA_SONIC_V1), message_bytes=8192).input_bytes == 1024


def test_a_long_message_keeps_its_newest_part_and_fits_one_text_input():
    items = [Item("u", "user", "hello " + "x" * 80_000 + " the end", "t"), Item("a", "assistant", "fine", "t")]
    turns = shape_history(items, max_bytes=NOVA_2_HISTORY.total_bytes, max_message_bytes=NOVA_2_HISTORY.message_bytes,
                          max_chunk_bytes=NOVA_2_HISTORY.input_bytes)
    assert len(turns[0].chunks) == 1 and turns[0].chunks[0].endswith("the end")
    assert len(turns[0].chunks[0].encode()) <= 50 * 1024


def long_conversation(store: FakeStore, kb: int) -> str:
    cid = store.create("anon:x")
    n = kb * 1024 // 1000
    store.convs[cid].items = [Item(f"i{k}", "user" if k % 2 == 0 else "assistant", f"{k:04d} " + "w" * 994, "t")
                              for k in range(n)]
    return cid


def history_bytes(model) -> int:
    return sum(len(t.encode()) for t in model.history_texts()[1:])  # after the system prompt


def test_a_long_conversation_resumes_whole_on_a_nova_2_model():
    store = FakeStore()
    cid = long_conversation(store, 120)
    h = Harness(store=store)
    assert h.connect(resume=f"resume|{cid}|anon:x").resumed
    assert history_bytes(h.current_model) > 110 * 1024  # not cut to 40 KB
    assert h.counts[("history_fallbacks", "")] == 0


def test_a_stream_that_refuses_the_history_gets_the_conservative_limits_once():
    store = FakeStore()
    cid = long_conversation(store, 120)
    h = Harness(store=store)
    h.open_failures = [("validationException", TOO_LARGE)]
    ready = h.connect(resume=f"resume|{cid}|anon:x")
    assert ready is not None and ready.resumed and h.state is State.LIVE  # the conversation goes on
    first, second = sorted(h.models.values(), key=lambda m: m.sid)
    assert history_bytes(first) > 110 * 1024 and history_bytes(second) <= 40 * 1024
    assert h.counts[("history_fallbacks", "")] == 1
    assert any(log.message.startswith("the model refused the history as too large") for log in h.logs)
    # and every later stream keeps the smaller limits (a rotation, a recovery)
    h.s.stream_failed(second.sid, "internalServerException", "boom", h.now)
    h.pump()
    h.until(lambda: h.state is State.LIVE and h.current_model is not second, 5)
    assert history_bytes(h.current_model) <= 40 * 1024


def test_a_history_refused_even_at_40_kb_is_an_invalid_input():
    store = FakeStore()
    cid = long_conversation(store, 120)
    h = Harness(store=store)
    h.open_failures = [("validationException", TOO_LARGE), ("validationException", TOO_LARGE)]
    h.connect(resume=f"resume|{cid}|anon:x")
    assert h.closed is not None and h.errors() == [("model_unavailable", True)]
    assert h.counts[("history_fallbacks", "")] == 1
