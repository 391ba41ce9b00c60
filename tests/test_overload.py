"""Graceful overload (gateway/health.py, gateway/admission.py).

The overload decision is unit-tested with injected lag and CPU figures (no real timing). End to end,
a gateway runs in this process (in a thread of its own) so that its health monitor can be given
figures: forced into overload, it refuses a new socket with 1013 and a retry hint while the session
it had admitted keeps talking. And its WebSocket keepalive survives the gateway's own lateness (its
loop blocked for longer than ping interval + timeout), while a client that stops answering is still
closed 1011."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from dataclasses import dataclass

import orjson
import pytest
import websockets

from gateway import metrics
from gateway.admission import Admission, Limits, Overloaded
from gateway.client import VoiceClient
from gateway.config import Settings
from gateway.health import KeepaliveWatchdog, OverloadGate
from protocol.codes import CloseCode

from .conftest import GRAMMAR, free_port

TICK = 0.125


def feed(gate: OverloadGate, t: float, ticks: int, *, lag: float = 0.0, cpu: float = 0.0) -> tuple[float, list[bool]]:
    """`ticks` ticks of `lag` seconds late and `cpu` cores; (the time after them, the gate after each)."""
    states = []
    for _ in range(ticks):
        t += TICK + lag
        gate.observe(t, lag, TICK + lag, cpu * (TICK + lag))
        states.append(gate.overloaded)
    return t, states


# -- the decision ----------------------------------------------------------------------------------------
def test_the_gate_stays_open_below_its_limits():
    gate = OverloadGate(0.075, 0.85)
    _, states = feed(gate, 0.0, 200, lag=0.02, cpu=0.6)
    assert not any(states)


def test_one_stall_is_not_sustained_lag():
    gate = OverloadGate(0.075, 0.85)
    t, _ = feed(gate, 0.0, 20, lag=0.001, cpu=0.1)
    t, states = feed(gate, t, 1, lag=3.0, cpu=0.1)  # one 3 s stall (a GC pause, a slow disk)
    _, after = feed(gate, t, 20, lag=0.001, cpu=0.1)
    assert not any(states + after)


def test_sustained_lag_closes_the_gate():
    gate = OverloadGate(0.075, 0.85)
    t, _ = feed(gate, 0.0, 20, lag=0.001)
    _, states = feed(gate, t, 8, lag=0.12)
    assert states[-1] and not states[0]  # a few ticks in a row, not the first late one
    assert gate.lag == pytest.approx(0.12)


def test_cpu_closes_the_gate():
    gate = OverloadGate(0.075, 0.85)
    t, _ = feed(gate, 0.0, 20, cpu=0.3)
    _, states = feed(gate, t, 40, cpu=0.95)
    assert states[-1]
    assert gate.cpu == pytest.approx(0.95)


def test_hysteresis_no_flapping_then_calm_reopens():
    gate = OverloadGate(0.075, 0.85)
    t, _ = feed(gate, 0.0, 10, lag=0.1)
    assert gate.overloaded
    # hovering around the limit (between half of it and above it): the gate stays closed, it does not flap
    changes = 0
    for i in range(200):
        before = gate.overloaded
        t, _ = feed(gate, t, 1, lag=0.07 if i % 2 else 0.08, cpu=0.8)
        changes += gate.overloaded != before
    assert gate.overloaded and changes == 0
    # calm (lag under half the limit, CPU under 85 % of its limit): the gate opens after CALM_S of it
    calm_from = None
    while gate.overloaded:
        t, _ = feed(gate, t, 1, lag=0.01, cpu=0.3)
        if calm_from is None and gate.lag < 0.075 / 2 and gate.cpu < 0.85 * 0.85:
            calm_from = t
        assert calm_from is None or t - calm_from <= OverloadGate.CALM_S + TICK, "it did not open"
    assert t - calm_from >= OverloadGate.CALM_S
    # once open it takes sustained load again to close it
    _, states = feed(gate, t, 2, lag=0.2)
    assert not any(states)


def test_a_calm_moment_that_does_not_last_keeps_the_gate_closed():
    gate = OverloadGate(0.075, 0.0)
    t, _ = feed(gate, 0.0, 10, lag=0.1)
    for _ in range(10):  # calm for 1 s, then busy again: never the 2 s it takes
        t, _ = feed(gate, t, 8, lag=0.005)
        t, _ = feed(gate, t, 8, lag=0.1)
        assert gate.overloaded


def test_zero_limits_are_off():
    gate = OverloadGate(0.0, 0.0)
    _, states = feed(gate, 0.0, 100, lag=5.0, cpu=4.0)
    assert not any(states)


def test_retry_hint_is_at_least_the_calm_period_and_spread():
    hints = {OverloadGate(0.075, 0.85, rng=lambda v=v: v).retry_after_ms() for v in (0.0, 0.5, 0.999)}
    calm_ms = OverloadGate.CALM_S * 1000
    assert min(hints) == calm_ms and max(hints) < 1.5 * calm_ms and len(hints) == 3


def test_admission_refuses_new_sockets_while_overloaded_and_keeps_admitting_handshakes():
    adm = Admission(Limits(max_sessions=10, max_pending=10, per_address=10))
    gate = adm.health = OverloadGate(0.075, 0.85, rng=lambda: 0.0)
    before, overloaded = object(), object()
    assert adm.open(before, "10.0.0.1", lambda: None) is None
    feed(gate, 0.0, 10, lag=0.2)
    counted = metrics.REJECTED.labels("overload")._value.get()
    refusal = adm.open(overloaded, "10.0.0.1", lambda: None)
    assert isinstance(refusal, Overloaded) and tuple(refusal) == (CloseCode.TRY_AGAIN_LATER, "overloaded")
    assert refusal.retry_after_ms == 2000
    assert metrics.REJECTED.labels("overload")._value.get() == counted + 1
    assert adm.admit(before, None) is None  # a socket taken before the overload finishes its handshake
    adm.close(before)
    adm.close(overloaded)  # never opened: nothing to release
    assert (adm.ledger.live(), adm.ledger.pending()) == (0, 0)


# -- the keepalive watchdog -------------------------------------------------------------------------------
@dataclass
class FakeTransport:
    reading: bool = True
    closing: bool = False

    def is_reading(self) -> bool:
        return self.reading

    def is_closing(self) -> bool:
        return self.closing


class FakeProtocol:
    def __init__(self, heard: float):
        self.transport = FakeTransport()
        self._novagate_heard = heard
        self.expired = False

    def keepalive_timeout(self) -> None:
        self.expired = True


def test_watchdog_charges_only_the_clients_silence():
    now = [0.0]
    dog = KeepaliveWatchdog(40.0, lambda: now[0])
    quiet, unread, talking = FakeProtocol(0.0), FakeProtocol(0.0), FakeProtocol(0.0)
    for p in (quiet, unread, talking):
        dog.conns.add(p)
    unread.transport.reading = False  # we are not reading it: the session is behind, its pongs wait unread
    for t in range(1, 60):
        now[0] = float(t)
        talking._novagate_heard = now[0]
        dog.sweep()
    assert quiet.expired and not unread.expired and not talking.expired
    assert dog.closed == 1


def test_watchdog_wraps_only_pinging_implementations():
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
    from uvicorn.protocols.websockets.wsproto_impl import WSProtocol

    dog = KeepaliveWatchdog(40.0, lambda: 0.0)
    assert issubclass(dog.protocol(WebSocketsSansIOProtocol), WebSocketsSansIOProtocol)
    assert dog.protocol(WebSocketsSansIOProtocol) is not WebSocketsSansIOProtocol
    assert dog.protocol(WSProtocol) is WSProtocol  # it sends no pings: nothing to judge by
    assert KeepaliveWatchdog(0.0, lambda: 0.0).protocol(WebSocketsSansIOProtocol) is WebSocketsSansIOProtocol


# -- end to end: a gateway in this process -----------------------------------------------------------------
class InProcessGateway:
    """`novagate serve` (one process) in a thread of its own, so a test can reach its health monitor."""

    def __init__(self, tmp, **overrides):
        from gateway.app import create_app
        from gateway.server import build

        self.port = free_port()
        settings = Settings.from_env({}, **{
            "host": "127.0.0.1", "port": self.port, "engine": "local", "store": "sqlite",
            "sqlite_path": str(tmp / "novagate.db"), "secret_file": str(tmp / "secret"),
            "local_asr": "sphinx", "local_tts": "espeak", "local_grammar": GRAMMAR, "local_endpoint_ms": 600,
            "metrics_port": 0, "drain_grace_s": 2.0, "workers": 1, **overrides,
        })
        self.server = build(settings, create_app(settings))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/voice"

    @property
    def services(self):
        return self.server.app.state.services

    def start(self) -> InProcessGateway:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not (self.server.started and self.server._monitor_task is not None):
            assert time.monotonic() < deadline and self.thread.is_alive(), "the gateway did not start"
            time.sleep(0.05)
        return self

    def call(self, fn, *args) -> None:
        """Run fn(*args) in the gateway's loop (for instance time.sleep: the gateway falls behind)."""
        self.server._loop.call_soon_threadsafe(fn, *args)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture
def in_process(tmp_path):
    started = []

    def make(**overrides) -> InProcessGateway:
        gw = InProcessGateway(tmp_path, **overrides).start()
        started.append(gw)
        return gw

    yield make
    for gw in started:
        gw.stop()


async def wait_until(check, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


async def test_overloaded_gateway_refuses_new_sockets_with_a_hint_while_sessions_go_on(in_process):
    gw = in_process()
    health = {"lag": 0.0, "cpu": 0.0}
    gw.server.monitor.source = lambda lag, cpu: (health["lag"], health["cpu"])
    admitted = VoiceClient(gw.ws)
    await admitted.connect(mic=False)
    try:
        health["lag"] = 0.5  # what the monitor now measures: its loop half a second late, tick after tick
        await wait_until(lambda: gw.server.monitor.gate.overloaded, "the gateway did not see the overload")

        async with websockets.connect(gw.ws, subprotocols=["novagate.v1"], open_timeout=10) as ws:
            error = orjson.loads(await asyncio.wait_for(ws.recv(), 10))  # at once, before any session.start
            with pytest.raises(websockets.ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 10)
        assert (ws.close_code, ws.close_reason) == (1013, "overloaded")
        assert error["type"] == "error" and error["code"] == "overloaded" and error["fatal"] is True
        assert 2000 <= error["retry_after_ms"] <= 3000

        turn = await admitted.turn(text="I met with Doctor Smith today at two pm", timeout=60)  # goes on
        assert "doctor smith" in turn["assistant"].lower()
        assert admitted.close_code is None

        health["lag"] = 0.0  # calm again: after the calm period, new sockets are taken
        await wait_until(lambda: not gw.server.monitor.gate.overloaded, "the overload did not end")
        again = VoiceClient(gw.ws)
        await again.connect(mic=False)
        await again.close()
    finally:
        await admitted.close()


async def test_keepalive_outlives_the_gateways_own_lateness(in_process):
    """With uvicorn's own ping timeout, the stalled read below closed the session 1011 `keepalive ping
    timeout`: the client's pongs waited behind audio the session had not read yet."""
    gw = in_process(ws_ping_interval=0.5, ws_ping_timeout=0.5, overload_lag_ms=0, overload_cpu=0)
    c = VoiceClient(gw.ws)
    await c.connect(mic=True)  # an open microphone: 20 ms of audio every 20 ms
    try:
        for _ in range(2):  # the gateway's loop stops for 3 s, three times its ping interval + timeout
            gw.call(time.sleep, 3.0)
            await asyncio.sleep(3.5)
        (actor,) = gw.services.sessions  # the session stops reading its socket for 5 s (it is behind)
        stalled, receive = threading.Event(), actor.ws.receive

        async def late_receive():
            while stalled.is_set():
                await asyncio.sleep(0.05)
            return await receive()

        stalled.set()
        actor.ws.receive = late_receive
        await asyncio.sleep(5)
        stalled.clear()
        turn = await c.turn(text="hello there", timeout=60)
        assert turn["assistant"] and c.close_code is None
        assert gw.server.watchdog.closed == 0
    finally:
        await c.close()


async def test_keepalive_still_closes_a_client_that_stopped_answering(in_process):
    gw = in_process(ws_ping_interval=0.3, ws_ping_timeout=0.3, overload_lag_ms=0, overload_cpu=0)
    async with websockets.connect(gw.ws, subprotocols=["novagate.v1"], open_timeout=10, ping_interval=None) as ws:
        await ws.send(orjson.dumps({"type": "session.start", "protocol": 1}).decode())
        while orjson.loads(await asyncio.wait_for(ws.recv(), 30)).get("type") != "session.ready":
            pass
        ws.transport.pause_reading()  # a client gone quiet: its pongs stop
        await wait_until(lambda: gw.server.watchdog.closed == 1, "the silent client was not closed")
        ws.transport.resume_reading()
        with contextlib.suppress(websockets.ConnectionClosed):
            while True:
                await asyncio.wait_for(ws.recv(), 10)
    assert ws.close_code in (1011, 1006)
    await wait_until(lambda: not gw.services.sessions, "the session did not end")
