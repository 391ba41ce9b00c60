"""No input gap the model would end a stream for (issue 12): Nova 2 ends a stream that gets no audio bytes
and no interactive content for 55 s (validationException `InternalErrorCode=532::…`). A real gateway on the
AWS path (engine=bedrock, store=agent-runtime) talks to the Nova emulator with that rule shortened to GAP
seconds (`novagate emulate nova --input-gap-s`), and in each state the gateway can be in for several times
GAP, no stream may end with 532:

* the user muted, or the app's tab in the background: the client sends no audio at all (`mic=False`);
* a tool running longer than the gap;
* the assistant speaking an answer longer than the gap;
* right after a resume;
* right after rotations (stream age limits of a few seconds).

Every state runs with the microphone off, the hardest case: whatever reaches the model is the gateway's own.
What counts is the emulator's log (each 532 it sends is logged with its message) and the gateway's metrics
(no model error, no recovery). The first test proves that the rule is on: a stream that gets no input ends
with 532 after GAP seconds. No other timing is asserted.
"""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import pytest

from gateway.client import ClientState, VoiceClient
from protocol.event_order import INPUT_GAP_MESSAGE

from .conftest import ROOT, AwsStack, Gateway

GAP = 3.0  # the emulator's input gap (Nova's 55 s)
LONG_REPLY_S = 2 * GAP  # the scripted answer lasts longer than the gap
TOOL_S = 2 * GAP  # and so does the slow tool
RULES = [{"phrase": "check slowly", "tool": "slow", "arguments": {"seconds": TOOL_S}}]
GAP_CODE = "InternalErrorCode=532"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = AwsStack(tmp_path_factory.mktemp("input-gap-aws"), engine_args=(
        "--engine", "scripted", "--endpoint-ms", "600", "--scripted-reply-s", str(LONG_REPLY_S),
        "--tool-calls", json.dumps(RULES), "--input-gap-s", str(GAP), "--no-warm")).start()
    yield s
    s.stop()


def gateway_env(stack: AwsStack, tmp_path, **extra) -> dict:
    config = {"mcpServers": {"checks": {"command": "python", "args": [str(ROOT / "tests/mcp_test_server.py")]}}}
    (tmp_path / "mcp.json").write_text(json.dumps(config))
    return {**stack.gateway_env(), "NOVAGATE_MCP_CONFIG": str(tmp_path / "mcp.json"),
            "NOVAGATE_SECRET": "input-gap-secret-0123456789abcdef0123456789abcdef",
            **{k: str(v) for k, v in extra.items()}}


@pytest.fixture(scope="module")
def gateway(stack, tmp_path_factory):
    """One gateway for the states without rotation (its streams live far longer than the test)."""
    tmp = tmp_path_factory.mktemp("input-gap-gw")
    gw = Gateway(tmp, gateway_env(stack, tmp)).start()
    yield gw
    gw.stop()


def emulator_log(stack: AwsStack) -> str:
    return (stack.tmp / "aws-stack.log").read_text(errors="replace")


def gaps(stack: AwsStack) -> list[str]:
    """The emulator's log lines about 532s it sent (and the gaps that caused them)."""
    return [line for line in emulator_log(stack).splitlines()
            if GAP_CODE in line or "no audio or interactive content for" in line]


def metric_sum(gw: Gateway, name: str) -> float:
    """A counter's total over all its labels."""
    text = httpx.get(gw.http + "/metrics", timeout=5).text
    return sum(float(v) for v in re.findall(rf"^{name}(?:\{{[^}}]*\}})? (\S+)$", text, re.M))


class Watch:
    """What the emulator and the gateway say about a state: no 532, no model error, no recovery."""

    def __init__(self, stack: AwsStack, gw: Gateway) -> None:
        self.stack, self.gw = stack, gw
        self.gaps = len(gaps(stack))
        self.errors = metric_sum(gw, "novagate_model_errors_total")
        self.recoveries = metric_sum(gw, "novagate_stream_recoveries_total")

    def check(self, state: str) -> None:
        new = gaps(self.stack)[self.gaps:]
        assert not new, f"{state}: the emulator ended a stream for an input gap:\n" + "\n".join(new)
        errors = metric_sum(self.gw, "novagate_model_errors_total") - self.errors
        recoveries = metric_sum(self.gw, "novagate_stream_recoveries_total") - self.recoveries
        assert (errors, recoveries) == (0, 0), f"{state}: {errors} model errors, {recoveries} recoveries"


async def test_the_emulator_ends_a_stream_without_input_after_the_gap(stack, monkeypatch):
    """The rule is on: a stream given its setup and nothing else ends with 532 (and the log shows it)."""
    from gateway.bedrock import BedrockTransport
    from gateway.transport import VALIDATION, ModelError
    from protocol import nova_events as nova

    for key, value in stack.gateway_env().items():
        if key.startswith(("AWS_", "SSL_")):
            monkeypatch.setenv(key, value)  # before the CRT transport is built
    before = len(gaps(stack))
    transport = BedrockTransport(region="us-east-1", endpoint_url=f"https://localhost:{stack.nova_port}",
                                 send_timeout_s=5.0, output_timeout_s=30.0, close_timeout_s=1.0)
    try:
        stream = await transport.open()
        for ev in [nova.session_start(), nova.prompt_start("p"), *nova.text_block("p", "SYSTEM", ["Be terse."]),
                   nova.audio_content_start("p", "a")]:
            await stream.send(ev)
        with pytest.raises(ModelError) as info:
            async with asyncio.timeout(GAP + 20):
                while await stream.receive() is not None:
                    pass
        await stream.close()
    finally:
        await transport.aclose()
    assert (info.value.kind, info.value.message) == (VALIDATION, INPUT_GAP_MESSAGE)
    for _ in range(50):  # the log line is written as the frame goes out
        if len(gaps(stack)) > before:
            break
        await asyncio.sleep(0.1)
    assert len(gaps(stack)) > before


async def test_a_muted_user_or_a_background_tab(stack, gateway):
    """No audio from the client at all for three times the gap."""
    watch = Watch(stack, gateway)
    client = VoiceClient(gateway.ws, state=ClientState())
    await client.connect(mic=False)
    try:
        await asyncio.sleep(3 * GAP)
        assert client.close_code is None
    finally:
        await client.close()
    watch.check("muted user")


async def test_a_tool_running_longer_than_the_gap(stack, gateway):
    watch = Watch(stack, gateway)
    client = VoiceClient(gateway.ws, state=ClientState())
    await client.connect(mic=False)
    try:
        await client.send_text("Could you check slowly for me?")
        await client.wait_for(lambda: client.tool_calls, 30)
        await client.wait_for(lambda: any(c["status"] != "started" for c in client.tool_calls), TOOL_S + 30)
        await client.wait_for(lambda: any("slow tool says" in f["text"] for f in client.finals_of("assistant")), 30)
    finally:
        await client.close()
    ended = client.tool_calls[-1]
    assert (ended["name"], ended["status"]) == ("slow", "finished")
    watch.check("a tool running")


async def test_the_assistant_speaking_a_long_answer(stack, gateway):
    watch = Watch(stack, gateway)
    client = VoiceClient(gateway.ws, state=ClientState())
    await client.connect(mic=False)
    try:
        turn = await client.turn(text="Tell me all about it.", timeout=LONG_REPLY_S + 40)
    finally:
        await client.close()
    assert turn["assistant"]
    assert len(client.audio) / (2 * client.output_rate) > 1.5 * GAP  # the answer outlasted the gap (2 x GAP)
    watch.check("the assistant speaking")


async def test_right_after_a_resume(stack, gateway):
    watch = Watch(stack, gateway)
    state = ClientState()
    first = VoiceClient(gateway.ws, state=state)
    await first.connect(mic=False)
    try:
        await first.send_text("Remember this, please.")
        await first.wait_for(lambda: any(f["item_id"] in first.saved for f in first.finals_of("user")), 30)
    finally:
        await first.close()
    again = VoiceClient(gateway.ws, state=state)
    ready = await again.connect(mic=False)
    try:
        assert ready["resumed"]
        await asyncio.sleep(2 * GAP)
        assert again.close_code is None
    finally:
        await again.close()
    watch.check("after a resume")


async def test_right_after_rotations(stack, tmp_path):
    """Streams are replaced when GAP + 1 s old (forced at GAP + 3 s): the stream the first rotation made
    lives longer than the gap before the second replaces it."""
    gw = Gateway(tmp_path, gateway_env(stack, tmp_path, NOVAGATE_ROTATE_AFTER_S=GAP + 1,
                                       NOVAGATE_ROTATE_FORCE_AFTER_S=GAP + 3)).start()
    try:
        watch = Watch(stack, gw)
        client = VoiceClient(gw.ws, state=ClientState())
        await client.connect(mic=False)
        try:
            async with asyncio.timeout(12 * GAP):  # a bound that only turns a hang into a failure
                while metric_sum(gw, "novagate_stream_rotations_total") < 2 and client.close_code is None:
                    await asyncio.sleep(0.5)
            assert client.close_code is None
        finally:
            await client.close()
        assert metric_sum(gw, "novagate_stream_rotations_total") >= 2
        watch.check("after rotations")
    finally:
        gw.stop()
