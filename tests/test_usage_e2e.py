"""Usage metrics and the per-user budget on a real gateway process (scripted engine, SQLite ledger):
a user whose budget is spent is cut off mid-session with 4402 and refused on the next connection,
on another gateway instance too, while another user goes on; /metrics counts tokens and cost."""

from __future__ import annotations

import asyncio
import re
import time

import httpx
import jwt
import pytest

from gateway.client import VoiceClient

from .conftest import free_port

KEY = "usage-test-user-key-of-32-bytes-or-more!"


@pytest.fixture(scope="module")
def backend() -> dict:
    return {}  # the embedded default store (SQLite): what is under test is the ledger and the session


def token(user: str) -> str:
    return jwt.encode({"sub": user, "exp": int(time.time()) + 3600}, KEY, algorithm="HS256")


def metric(text: str, name: str) -> float:
    """The sum of a metric's samples in a Prometheus text page."""
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


async def test_budget_cuts_a_user_off_and_metrics_count_tokens_and_cost(make_gateway):
    env = {"NOVAGATE_ENGINE": "scripted", "NOVAGATE_AUTH_JWT_SECRET": KEY, "NOVAGATE_USER_BUDGET_USD": "0.002",
           "NOVAGATE_PRICE_INPUT_TEXT": "1.0", "NOVAGATE_PRICE_OUTPUT_TEXT": "1.0",
           "NOVAGATE_PRICE_INPUT_SPEECH": "1.0", "NOVAGATE_PRICE_OUTPUT_SPEECH": "1.0"}  # 2 tokens spend it
    gw = make_gateway(NOVAGATE_METRICS_PORT=free_port(), **env)
    alice = VoiceClient(gw.ws, token=token("alice"))
    try:
        await alice.connect(mic=False)
        with pytest.raises(ConnectionError):  # the reply's usage spends the budget: the session ends
            await alice.turn(text="hello there", timeout=30)
        await alice.wait_for(lambda: alice.close_code is not None, 15)
        assert alice.close_code == 4402
        errors = [x for x in alice.messages if x.get("type") == "error"]
        assert errors and errors[-1]["code"] == "budget_exceeded" and errors[-1]["fatal"] is True
        assert alice.finals_of("user"), "what was said before the budget ran out is kept"
    finally:
        await alice.close()

    # a second instance on the same store refuses alice at once, and serves bob
    other = make_gateway(NOVAGATE_METRICS_PORT=free_port(), **env)
    again = VoiceClient(other.ws, token=token("alice"))
    with pytest.raises(ConnectionError):
        await again.connect(mic=False)
    await again.close()
    assert again.close_code == 4402
    bob = VoiceClient(other.ws, token=token("bob"))
    try:
        await bob.connect(mic=False)
        assert bob.close_code is None
    finally:
        await bob.close()

    page = ""
    for _ in range(50):  # the first gateway's figures, once its session has been accounted
        page = httpx.get(f"http://127.0.0.1:{gw.env['NOVAGATE_METRICS_PORT']}/metrics").text
        if metric(page, "novagate_session_cost_usd_count") >= 1:
            break
        await asyncio.sleep(0.2)
    assert metric(page, "novagate_tokens_total") >= 2
    assert metric(page, "novagate_cost_usd_total") >= 0.002
    assert metric(page, "novagate_session_tokens_count") >= 1
    assert 'novagate_budget_exceeded_total{when="live"} 1.0' in page
    other_page = httpx.get(f"http://127.0.0.1:{other.env['NOVAGATE_METRICS_PORT']}/metrics").text
    assert 'novagate_budget_exceeded_total{when="start"} 1.0' in other_page
