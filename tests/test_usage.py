"""Usage, cost and the per-user budget (protocol/usage.py, Session): on the fake clock, then the stores'
ledgers (SQLite file, Agent Runtime over boto3 against the emulator in test_store_contract)."""

from __future__ import annotations

import pytest

from protocol import codes
from protocol import messages as m
from protocol import nova_events as nova
from protocol.codes import CloseCode
from protocol.session import RecordUsage, State
from protocol.usage import Prices, Tokens

from .session_harness import Harness

IDS = {"sessionId": "s", "promptName": "p", "completionId": "c"}


def usage(h: Harness, **tokens) -> None:
    """The current stream reports its running totals."""
    h.s.model_event(h.current_model.sid, nova.usage_event(IDS, **tokens), h.now)
    h.pump()


# -- arithmetic ------------------------------------------------------------------------------------
def test_tokens_from_usage_event_details():
    body = nova.event_body(nova.usage_event(IDS, input_speech=150, input_text=22, output_speech=40, output_text=5))
    t = Tokens.from_usage_event(body)
    assert t == Tokens(150, 22, 40, 5) and (t.input, t.output, t.total) == (172, 45, 217)


def test_tokens_without_details_count_as_speech():
    """A body with only totals is priced as speech, the dearer modality: a budget never under-counts."""
    assert Tokens.from_usage_event({"totalInputTokens": 10, "totalOutputTokens": 4}) == Tokens(10, 0, 4, 0)
    assert Tokens.from_usage_event({"details": {"total": {"input": {"speechTokens": -3, "textTokens": "x"}}}}) == Tokens()


def test_tokens_add_and_subtract():
    a, b = Tokens(10, 1, 20, 2), Tokens(4, 1, 25, 0)
    assert a + b == Tokens(14, 2, 45, 2)
    assert a - b == Tokens(6, 0, 0, 2)  # never negative
    assert not Tokens() and Tokens(output_text=1)


def test_prices_per_thousand_tokens():
    p = Prices(input_speech=1.0, input_text=2.0, output_speech=3.0, output_text=4.0)
    assert p.cost(Tokens(1000, 500, 2000, 250)) == pytest.approx(1 + 1 + 6 + 1)
    assert Prices().cost(Tokens(input_speech=1000, output_speech=1000)) == pytest.approx(0.0034 + 0.0136)


# -- the session counts -----------------------------------------------------------------------------
def test_usage_is_counted_by_kind_across_streams_and_observed_at_the_end():
    prices = Prices(input_speech=1.0, input_text=0.0, output_speech=2.0, output_text=0.0)
    h = Harness(prices=prices)
    h.connect()
    usage(h, input_speech=100, input_text=10, output_speech=50, output_text=5)
    usage(h, input_speech=300, input_text=10, output_speech=50, output_text=5)  # running totals: +200 speech in
    assert h.counts[("tokens", "input_speech")] == 300 and h.counts[("tokens", "output_speech")] == 50
    assert h.counts[("tokens", "input_text")] == 10 and h.counts[("tokens", "output_text")] == 5
    assert h.counts[("cost_usd", "")] == pytest.approx(0.3 + 0.1)
    # a new stream's counts start again from zero: the session's totals go on adding up
    h.s.stream_failed(h.current_model.sid, "modelStreamErrorException", "boom", h.now)
    h.until(lambda: h.state is State.LIVE and h.current_model.sid != 1, 5)
    usage(h, input_speech=20, input_text=0, output_speech=0, output_text=0)
    assert h.counts[("tokens", "input_speech")] == 320
    assert h.of(m.Usage)[-1] == m.Usage(330, 55)
    h.text({"type": "session.end"})
    h.until(lambda: h.closed is not None, 5)
    assert ("session_tokens", 385) in h.observed
    assert dict(h.observed)["session_cost_usd"] == pytest.approx(0.32 + 0.1)
    assert not h.store.usage, "no budget: no ledger writes"


def test_recovery_given_up_is_counted():
    h = Harness()
    h.connect()
    h.open_failures = [("modelStreamErrorException", "boom")] * 20
    h.s.stream_failed(h.current_model.sid, "modelStreamErrorException", "boom", h.now)
    h.until(lambda: h.closed is not None, 60)
    assert h.closed == CloseCode.INTERNAL_ERROR
    assert h.counts[("recovery_failures", "modelStreamErrorException")] == 1


def backlogged() -> Harness:
    """A session with a turn waiting for a store that is down."""
    h = Harness()
    h.connect()
    h.store.down = True
    h.say(1)
    h.until(lambda: len(h.finals()) >= 2, 10)
    assert h.counts[("store_backlog", "")] >= 1
    return h


def test_store_backlog_goes_up_while_the_store_is_down_and_back_to_zero():
    h = backlogged()
    h.store.down = False
    h.until(lambda: len(h.store.writes) >= 2, 30)
    assert h.counts[("store_backlog", "")] == 0


def test_backlog_left_at_close_is_taken_off_the_gauge():
    h = backlogged()
    h.s.client_gone(h.now)
    h.pump()
    h.until(lambda: h.state is State.CLOSED, 60)
    assert h.counts[("store_backlog", "")] == 0


# -- the budget ---------------------------------------------------------------------------------------
BUDGET = {"prices": Prices(input_speech=1.0, input_text=1.0, output_speech=1.0, output_text=1.0),
          "user_budget_usd": 1.0}  # a dollar per 1,000 tokens: 1,000 tokens spend the budget


def test_spent_budget_refuses_a_new_session_4402():
    h = Harness(bearer="jwt:alice", **BUDGET)
    h.store.spent["user:alice"] = 1.0
    h.connect()
    assert h.closed == CloseCode.BUDGET_EXCEEDED == 4402
    assert (codes.BUDGET_EXCEEDED, True) in h.errors()
    assert h.counts[("budget_exceeded", "start")] == 1
    assert not h.models, "no model stream is opened for a spent budget"


def test_budget_ends_a_live_session_once_spent_and_keeps_what_was_said():
    h = Harness(bearer="jwt:alice", **BUDGET)
    h.store.spent["user:alice"] = 0.5
    assert h.connect() is not None
    h.say(1)
    h.until(lambda: len(h.store.writes) >= 2, 10)  # the turn is stored
    usage(h, input_speech=200, input_text=0, output_speech=200, output_text=0)  # 0.4 more: 0.9 spent
    assert h.closed is None
    usage(h, input_speech=300, input_text=0, output_speech=200, output_text=0)  # 1.0: spent
    h.until(lambda: h.closed is not None, 10)
    assert h.closed == CloseCode.BUDGET_EXCEEDED
    assert (codes.BUDGET_EXCEEDED, True) in h.errors()
    assert h.counts[("budget_exceeded", "live")] == 1
    recorded = [e for e in h.store.usage if isinstance(e, RecordUsage)]
    assert sum(e.tokens.total for e in recorded) == 500 and sum(e.cost_usd for e in recorded) == pytest.approx(0.5)
    assert {e.principal for e in recorded} == {"user:alice"} and recorded[0].conversation_id


def test_ledger_writes_are_spaced_and_the_rest_is_written_at_the_end():
    h = Harness(bearer="jwt:alice", prices=Prices(), user_budget_usd=100.0)
    h.connect()
    for n in range(1, 6):
        usage(h, input_speech=100 * n, input_text=0, output_speech=0, output_text=0)
        h.run(5)
    assert len(h.store.usage) == 1, "at most one ledger write per 15 s"
    h.text({"type": "session.end"})
    h.until(lambda: h.closed is not None, 5)
    assert sum(e.tokens.input_speech for e in h.store.usage) == 500


def test_anonymous_sessions_have_no_budget():
    h = Harness(**BUDGET)
    assert h.connect() is not None
    usage(h, input_speech=5000, input_text=0, output_speech=0, output_text=0)
    assert h.closed is None and not h.store.usage


def test_budget_lookup_failure_is_store_degraded_1013():
    h = Harness(bearer="jwt:alice", **BUDGET)
    h.store.down = True
    h.connect()
    assert h.closed == CloseCode.TRY_AGAIN_LATER
    assert (codes.STORE_DEGRADED, True) in h.errors()
