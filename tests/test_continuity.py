"""Conversations that outlive streams, processes and faults: rotation, keepalive, the recovery
ladder, graceful drain, store outages. Real gateway processes; the model behind the Nova Sonic
emulator where faults are injected on the wire."""

from __future__ import annotations

import asyncio
import re
import signal
import time

import httpx
import orjson
import pytest
import websockets

from gateway.client import ClientState, VoiceClient
from gateway.emulate.nova import NovaEmulator, make_test_tls
from gateway.local.engine import LocalEngine, LocalEngineConfig
from gateway.transport import IDLE_TIMEOUT_MESSAGE, INSTABILITY_MESSAGE

from .conftest import DISCUSS, GRAMMAR, HELLO, MET, STORY, speech

MET_TEXT = "I met with Doctor Smith today at two pm"


@pytest.fixture(scope="module")
def backend() -> dict:
    return {}  # the embedded default unless a test says otherwise


def metric(gw, name: str, **labels) -> float:
    text = httpx.get(gw.http + "/metrics").text
    sel = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = rf"^{name}\{{{re.escape(sel)}\}} (\S+)$" if labels else rf"^{name} (\S+)$"
    found = re.search(pattern, text, re.M)
    return float(found.group(1)) if found else 0.0


def statuses(c: VoiceClient) -> list[str]:
    return [m["state"] for m in c.messages if m["type"] == "status"]


async def test_rotation_hands_over_quietly_without_losing_or_doubling_a_frame(make_gateway):
    gw = make_gateway(NOVAGATE_ROTATE_AFTER_S=2, NOVAGATE_ROTATE_FORCE_AFTER_S=60)
    c = VoiceClient(gw.ws, state=ClientState())
    c.speed = 1.5
    await c.connect()
    sent = 0
    try:
        t1 = await c.turn(speech(MET))
        await asyncio.sleep(3)  # quiet: a hand-over happens here
        t2 = await c.turn(speech(DISCUSS))
        await asyncio.sleep(3)
    finally:
        await c.close()
        sent = c.audio_sent
    await asyncio.sleep(1.0)
    assert t1["user"].lower() == MET and "doctor smith" in t2["assistant"].lower()  # history carried over
    assert metric(gw, "novagate_stream_rotations_total", mode="quiet") >= 2
    assert metric(gw, "novagate_stream_recoveries_total") == 0
    # every client frame reached exactly one stream: what the engines heard is what the client sent
    lines = [orjson.loads(x) for x in gw.trace.read_text().splitlines()]
    streams = {x["stream"] for x in lines}
    heard = sum(x["bytes"] for x in lines if x["event"] == "audioInput")
    assert len(streams) >= 3
    assert metric(gw, "novagate_model_audio_bytes_total", source="client") == sent
    assert metric(gw, "novagate_model_audio_bytes_total", source="replay") == 0
    assert heard == sent + metric(gw, "novagate_model_audio_bytes_total", source="keepalive")
    # and each stream got the history once, before its audio
    for sid in streams:
        events = [x for x in lines if x["stream"] == sid]
        met = [x for x in events if x["event"] == "textInput" and MET in (x["content"] or "").lower()
               and x["role"] == "USER"]
        assert len(met) <= 1


async def test_silence_keepalive_stops_the_idle_timeout(make_gateway):
    gw = make_gateway(NOVAGATE_LOCAL_IDLE_TIMEOUT_S=2)
    c = VoiceClient(gw.ws, state=ClientState())
    await c.connect(mic=False)  # a muted client: no audio at all
    try:
        await asyncio.sleep(5)
        turn = await c.turn(text=MET_TEXT)
        assert "doctor smith" in turn["assistant"].lower()
        assert "recovering" not in statuses(c)
        assert metric(gw, "novagate_model_audio_bytes_total", source="keepalive") > 2 * 32000
        assert metric(gw, "novagate_stream_recoveries_total") == 0
    finally:
        await c.close()


async def start_emulator(tmp_path, *, endpoint_ms: int) -> NovaEmulator:
    """The Nova Sonic emulator in this process (so a test can fail its streams on cue), the local
    engine behind it with the given end-of-speech wait, and the gateway env that points
    engine=bedrock at it."""
    _ca, cert, key, bundle = make_test_tls(tmp_path / "tls")
    trace = tmp_path / "emu-trace.jsonl"
    engine = LocalEngine(LocalEngineConfig(asr="sphinx", tts="espeak", grammar=tuple(GRAMMAR.split("|")),
                                           endpoint_ms=endpoint_ms, trace_path=str(trace)))
    await engine.warm()
    emu = NovaEmulator(engine, certfile=cert, keyfile=key)
    await emu.start()
    emu.engine, emu.trace = engine, trace
    emu.gateway_env = {
        "NOVAGATE_ENGINE": "bedrock", "AWS_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": "AKIDTEST",
        "AWS_SECRET_ACCESS_KEY": "secret", "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_ENDPOINT_URL_BEDROCK_RUNTIME": emu.endpoint, "SSL_CERT_FILE": bundle,
        "NOVAGATE_ENGINE_TRACE": str(trace),
        # this process's event loop serves the emulator and waits while a gateway starts: the start-up
        # check's stream could not be answered (and the tests count streams)
        "NOVAGATE_PREFLIGHT": "false",
    }
    return emu


@pytest.fixture
async def emulator(tmp_path):
    emu = await start_emulator(tmp_path, endpoint_ms=600)
    yield emu
    await emu.stop()
    await emu.engine.aclose()


async def wait_recovered(c: VoiceClient, before: int, timeout: float = 20) -> None:
    await c.wait_for(lambda: "recovering" in statuses(c)[before:], timeout)
    await c.wait_for(lambda: "listening" in statuses(c)[before:][statuses(c)[before:].index("recovering"):],
                     timeout)


async def test_each_stream_fault_is_recovered_with_the_history_intact(make_gateway, emulator):
    gw = make_gateway(**emulator.gateway_env)
    c = VoiceClient(gw.ws, state=ClientState())
    c.speed = 1.5
    await c.connect()
    try:
        first = await c.turn(speech(MET))
        assert first["user"].lower() == MET
        faults = {
            "idle timeout (531)": lambda: emulator.fail_active("validationException", IDLE_TIMEOUT_MESSAGE),
            "model timeout": lambda: emulator.fail_active("modelTimeoutException"),
            "system instability": lambda: emulator.fail_active("validationException", INSTABILITY_MESSAGE),
            "connection reset": lambda: emulator.reset_active(connection=True),
        }
        for name, inject in faults.items():
            before = len(statuses(c))
            assert inject() == 1, name
            await wait_recovered(c, before)
            turn = await c.turn(text="what did we discuss")
            assert "doctor smith" in turn["assistant"].lower(), name
        # invalid event bytes show up while the model answers: the recovered stream answers again
        before = len(statuses(c))
        emulator.corrupt_active()
        turn = await c.turn(text="what did we discuss", timeout=60)
        assert "recovering" in statuses(c)[before:]
        assert "doctor smith" in turn["assistant"].lower()
        assert not [m for m in c.messages if m["type"] == "error"]  # recovered, never surfaced as errors
        assert {f["item_id"] for f in c.finals} <= c.saved
    finally:
        await c.close()
    assert metric(gw, "novagate_stream_recoveries_total", kind="validationException") >= 2


async def test_after_three_failed_recoveries_the_model_is_unavailable(make_gateway, emulator):
    from gateway.emulate.nova import Fault

    gw = make_gateway(**emulator.gateway_env)
    c = VoiceClient(gw.ws, state=ClientState())
    await c.connect(mic=False)
    try:
        emulator.persistent_faults.append(Fault("serviceUnavailableException", "down for maintenance"))
        emulator.fail_active("serviceUnavailableException")
        await c.wait_for(lambda: c.close_code is not None, 30)
    except ConnectionError:
        pass
    finally:
        await c.close()
    errors = [m for m in c.messages if m["type"] == "error"]
    assert [(e["code"], e["fatal"]) for e in errors] == [("model_unavailable", True)]
    assert "recovering" in statuses(c) and c.close_code == 1011
    assert emulator.streams_opened == 1 + 3  # the first stream and three recovery attempts


async def test_sigterm_drains_every_session_and_exits(make_gateway, aws_stack):
    gw = make_gateway(**aws_stack.gateway_env(), NOVAGATE_DRAIN_GRACE_S=20)
    c = VoiceClient(gw.ws, state=ClientState())
    await c.connect(mic=False)
    await c.turn(text=MET_TEXT)
    aws_stack.fake("config", {"latency": 0.5})  # store writes in flight now take a while
    try:
        await c.send_text("hello there")
        await c.wait_for(lambda: any(f["role"] == "user" and f["text"] == "hello there" for f in c.finals), 10)
        t0 = time.monotonic()
        gw.proc.send_signal(signal.SIGTERM)
        await c.wait_for(lambda: any(m["type"] == "session.reconnect" for m in c.messages), 10)
        assert httpx.get(gw.http + "/readyz").status_code == 503
        late = VoiceClient(gw.ws, state=ClientState())
        with pytest.raises((ConnectionError, websockets.ConnectionClosed)):
            await late.connect(mic=False)
        assert late.ws.close_code == 1013  # new sockets: try again later (elsewhere)
        await late.close()
        await c.wait_for(lambda: c.close_code is not None, 20)
        assert gw.proc.wait(25) is not None and time.monotonic() - t0 < 25
    finally:
        aws_stack.fake("config", {"latency": 0})
        await c.close()
    reconnect = next(m for m in c.messages if m["type"] == "session.reconnect")
    assert reconnect["reason"] == "draining" and c.close_code == 1012
    assert {f["item_id"] for f in c.finals} <= c.saved  # flushed before the socket closed
    assert not c.state.pending


async def test_store_outage_queues_writes_in_order_and_loses_nothing(make_gateway, aws_stack):
    gw = make_gateway(**aws_stack.gateway_env())
    c = VoiceClient(gw.ws, state=ClientState())
    await c.connect(mic=False)
    try:
        aws_stack.fake("inject", {"op": "PutInvocationStep", "error": "ServiceQuotaExceededException", "times": 5})
        await c.turn(text=MET_TEXT, timeout=90)
        await c.turn(text="what did we discuss", timeout=90)  # the conversation goes on meanwhile
        errors = [m for m in c.messages if m["type"] == "error"]
        assert [(e["code"], e["fatal"]) for e in errors] == [("store_degraded", False)]  # once
        assert {f["item_id"] for f in c.finals} <= c.saved and not c.state.pending
        saved_order = [m["item_id"] for m in c.messages if m["type"] == "item.saved"]
        assert saved_order == [f["item_id"] for f in c.finals]  # stored in order
    finally:
        await c.close()
    async with httpx.AsyncClient(base_url=gw.http) as h:
        hist = (await h.get(f"/v1/conversations/{c.ready['conversation_id']}/history",
                            headers={"X-Resume-Token": c.ready["resume_token"]})).json()["history"]
    assert [h["item_id"] for h in hist] == [f["item_id"] for f in c.finals]  # each exactly once


@pytest.fixture
async def slow_emulator(tmp_path):
    """An end-of-speech wait, 2 s, far longer than the gateway's quiet window: a user turn is
    transcribed only 2 s after the speech ends."""
    emu = await start_emulator(tmp_path, endpoint_ms=2000)
    yield emu
    await emu.stop()
    await emu.engine.aclose()


async def test_frequent_hand_overs_with_a_slow_end_of_speech_lose_no_turn_and_no_byte(make_gateway, aws_stack,
                                                                                        slow_emulator):
    """The AWS path (real SDKs, Nova emulator, Agent Runtime fake), a rotation due every 3 s and a
    model that transcribes 2 s after speech ends: every spoken turn is heard and answered, and every
    client audio byte reaches exactly one stream."""
    gw = make_gateway(**{**aws_stack.gateway_env(), **slow_emulator.gateway_env},
                      NOVAGATE_ROTATE_AFTER_S=3, NOVAGATE_ROTATE_FORCE_AFTER_S=120)
    c = VoiceClient(gw.ws, state=ClientState())
    await c.connect()
    said = [MET, DISCUSS, HELLO, STORY, DISCUSS, HELLO]
    try:
        turns = []
        for phrase in said:
            turns.append(await c.turn(speech(phrase), timeout=90))
            await asyncio.sleep(2)  # a quiet moment: a hand-over may happen here
    finally:
        await c.close()
        sent = c.audio_sent
    await asyncio.sleep(1.0)
    assert [t["user"].lower() for t in turns] == said
    assert all(t["assistant"] for t in turns)
    assert "doctor smith" in turns[1]["assistant"].lower()  # the history survived the hand-overs
    assert metric(gw, "novagate_stream_rotations_total", mode="quiet") >= 4
    assert metric(gw, "novagate_stream_rotations_total", mode="forced") == 0
    assert metric(gw, "novagate_stream_recoveries_total") == 0
    lines = [orjson.loads(x) for x in slow_emulator.trace.read_text().splitlines()]
    heard = sum(x["bytes"] for x in lines if x["event"] == "audioInput")
    assert len({x["stream"] for x in lines}) >= 5
    assert metric(gw, "novagate_model_audio_bytes_total", source="client") == sent
    assert metric(gw, "novagate_model_audio_bytes_total", source="replay") == 0
    assert heard == sent + metric(gw, "novagate_model_audio_bytes_total", source="keepalive")
