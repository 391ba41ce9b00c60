"""The AWS path end to end: the gateway (engine=bedrock, store=agent-runtime) with the real SDK and
real boto3, against the project's Nova Sonic emulator and Agent Runtime fake on loopback."""

from __future__ import annotations

import subprocess
import sys
import time

import boto3
import pytest

from gateway.client import ClientState, VoiceClient

from .conftest import ROOT, _wait, free_port

MET_TEXT = "I met with Doctor Smith today at two pm"


@pytest.fixture(scope="module")
def backend(aws_stack) -> dict:
    return aws_stack.gateway_env()


def settled_calls(stack, quiet_s: float = 0.6, timeout: float = 10.0) -> dict:
    """The fake's call counts once the gateway has stopped writing (cache updates run behind)."""
    deadline = time.monotonic() + timeout
    last = stack.fake("calls")
    quiet_since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = stack.fake("calls")
        if now != last:
            last, quiet_since = now, time.monotonic()
        elif time.monotonic() - quiet_since >= quiet_s:
            return now
    return last


def boto(stack):
    return boto3.client("bedrock-agent-runtime", region_name="us-east-1", endpoint_url=stack.fake_url,
                        aws_access_key_id="x", aws_secret_access_key="y")


async def converse(gw, state: ClientState, *texts: str) -> VoiceClient:
    c = VoiceClient(gw.ws, state=state)
    await c.connect(mic=False)
    for t in texts:
        await c.turn(text=t)
    await c.close()
    return c


def total_calls(calls: dict) -> int:
    return sum(calls["calls"].values())


async def test_warm_resume_costs_at_most_three_calls(make_gateway, aws_stack):
    gw = make_gateway()
    state = ClientState()
    await converse(gw, state, MET_TEXT, "hello there")
    settled_calls(aws_stack)
    aws_stack.fake("reset_calls", {})
    c = VoiceClient(gw.ws, state=state)
    await c.connect(mic=False)
    try:
        assert c.ready["resumed"] and c.ready["history_length"] == 4
        calls = aws_stack.fake("calls")
        # GetSession + ListInvocationSteps(maxResults=1), and UpdateSession: this connection holds it now
        assert total_calls(calls) <= 3, calls
        assert set(calls["calls"]) <= {"GetSession", "ListInvocationSteps", "UpdateSession"}
    finally:
        await c.close()


async def test_fallback_with_oldest_first_listing_and_a_cold_cache(make_gateway, aws_stack):
    gw = make_gateway()
    state = ClientState()
    await converse(gw, state, MET_TEXT, "hello there")
    settled_calls(aws_stack)
    sid = state.conversation_id
    client = boto(aws_stack)
    meta = client.get_session(sessionIdentifier=sid)["sessionMetadata"]
    client.update_session(sessionIdentifier=sid,
                          sessionMetadata={k: v for k, v in meta.items() if not k.startswith("h")})  # cold cache
    aws_stack.fake("config", {"oldest_first": True})
    try:
        c = VoiceClient(gw.ws, state=state)
        await c.connect(mic=False)
        try:
            hist = c.ready["history"]
            assert c.ready["resumed"] and c.ready["history_length"] == 4
            assert [h["role"] for h in hist] == ["user", "assistant", "user", "assistant"]
            assert hist[0]["text"] == MET_TEXT and hist[2]["text"] == "hello there"
            turn = await c.turn(text="what did we discuss")
            assert "doctor smith" in turn["assistant"].lower()
        finally:
            await c.close()
    finally:
        aws_stack.fake("config", {"oldest_first": False})


async def test_an_ended_session_continues_in_a_new_one_with_its_history(make_gateway, aws_stack):
    gw = make_gateway()
    state = ClientState()
    await converse(gw, state, MET_TEXT)
    settled_calls(aws_stack)
    old = state.conversation_id
    aws_stack.fake(f"end/{old}", {})  # ended by the service, not by the user
    c = VoiceClient(gw.ws, state=state)
    await c.connect(mic=False)
    try:
        assert c.ready["resumed"] is True
        assert c.ready["conversation_id"] != old and state.conversation_id == c.ready["conversation_id"]
        assert c.ready["history_length"] == 2 and c.ready["history"][0]["text"] == MET_TEXT
        turn = await c.turn(text="what did we discuss")
        assert "doctor smith" in turn["assistant"].lower()
    finally:
        await c.close()
    # the old token still leads to the conversation, under its new id
    c = VoiceClient(gw.ws, state=ClientState(resume_token=c.ready["resume_token"]))
    await c.connect(mic=False)
    assert c.ready["resumed"] and c.ready["history_length"] == 4
    await c.close()


async def test_throttling_and_server_errors_are_retried_without_loss(make_gateway, aws_stack):
    gw = make_gateway()
    aws_stack.fake("inject", {"op": "PutInvocationStep", "error": "ThrottlingException", "times": 2})
    aws_stack.fake("inject", {"op": "PutInvocationStep", "error": "InternalServerException", "times": 1})
    c = VoiceClient(gw.ws, state=ClientState())
    await c.connect(mic=False)
    try:
        await c.turn(text=MET_TEXT)
        assert {f["item_id"] for f in c.finals} <= c.saved
        assert not [m for m in c.messages if m["type"] == "error"]  # botocore's retries absorbed them
    finally:
        await c.close()
    history = [s for s in boto(aws_stack).list_invocation_steps(
        sessionIdentifier=c.ready["conversation_id"], maxResults=100)["invocationStepSummaries"]]
    assert len(history) == 2  # each item exactly once


async def test_access_denied_by_nova_is_a_clear_fatal_error(make_gateway, aws_stack, tmp_path):
    from gateway.emulate.nova import make_test_tls

    _ca, cert, key, bundle = make_test_tls(tmp_path / "tls403")
    port = free_port()
    emu = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "emulate", "nova", "--port", str(port), "--cert", cert, "--key", key,
         "--reject-403", "--no-warm"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        import socket

        _wait(lambda: socket.create_connection(("127.0.0.1", port), 1).close() or True, "emulator", emu)
        # the start-up check would stop the gateway (tests/test_preflight.py): this is the refusal met while serving
        gw = make_gateway(AWS_ENDPOINT_URL_BEDROCK_RUNTIME=f"https://localhost:{port}", SSL_CERT_FILE=bundle,
                          NOVAGATE_PREFLIGHT="false")
        c = VoiceClient(gw.ws, state=ClientState())
        try:
            await c.connect(mic=False)
            await c.wait_for(lambda: c.close_code is not None, 15)
        except ConnectionError:
            pass
        errors = [m for m in c.messages if m["type"] == "error"]
        assert errors and errors[-1]["code"] == "model_unavailable" and errors[-1]["fatal"] is True
        assert "access" in errors[-1]["message"].lower()
        assert c.close_code == 1011
        await c.close()
    finally:
        emu.terminate()
        emu.wait(10)


async def test_nova_sonic_v1_refuses_typed_text_but_keeps_the_session(make_gateway):
    gw = make_gateway(NOVAGATE_MODEL_ID="amazon.nova-sonic-v1:0", NOVAGATE_ENDPOINTING_SENSITIVITY="HIGH")
    c = VoiceClient(gw.ws, state=ClientState())
    await c.connect(mic=False)
    try:
        await c.send_text("hello there")
        await c.send({"type": "ping", "id": 1})
        await c.wait_for(lambda: any(m["type"] == "pong" for m in c.messages), 10)
        errors = [m for m in c.messages if m["type"] == "error"]
        assert [e["code"] for e in errors] == ["unsupported"] and not errors[0]["fatal"]
        assert not c.finals  # nothing was stored for the refused text
    finally:
        await c.close()
