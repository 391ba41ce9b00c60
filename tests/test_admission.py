"""Admission (gateway/admission.py) on real gateway processes: sockets that never finish their
handshake cannot keep a real client out, and the per-address and per-user caps hold and are released.

Every socket stays on loopback. Idle "attackers" come from other loopback source addresses
(127.0.0.2 …), so that the legitimate client (127.0.0.1) is one address among many."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time

import httpx
import jwt
import pytest
import websockets

from gateway.client import VoiceClient

from .conftest import free_port

KEY = "admission-test-user-key-of-32-bytes-or-more"
ATTACKERS = [f"127.0.0.{i}" for i in range(2, 17)]  # 15 addresses × 20 sockets (the per-address cap) = 300
SOCKETS_PER_ATTACKER = 20
PENDING_CAP = 64
HELD = 2 * PENDING_CAP  # handshakes, plus sockets turned away a moment ago and still closing


@pytest.fixture(scope="module")
def backend() -> dict:
    return {}  # the embedded default: what is under test is the gateway's admission


def gateway_env(**env) -> dict:
    return {"NOVAGATE_METRICS_PORT": free_port(), **env}


async def held(gw) -> tuple[int, int]:
    """(sockets the gateway holds, of which in their handshake)."""
    async with httpx.AsyncClient() as h:
        sockets = (await h.get(gw.http + "/readyz")).json()["sessions"]
        assert sockets <= HELD, sockets  # not the 300 opened
        text = (await h.get(f"http://127.0.0.1:{gw.env['NOVAGATE_METRICS_PORT']}/metrics")).text
    pending = next(line for line in text.splitlines() if line.startswith("novagate_handshakes_pending "))
    return sockets, int(float(pending.split()[1]))


async def idle_socket(gw, address: str, closes: list, stop: asyncio.Event) -> None:
    """An attacker's slot: a socket that never sends session.start, opened again 2 s after the
    gateway closes it, until `stop`."""
    while not stop.is_set():
        try:
            async with websockets.connect(gw.ws, local_addr=(address, 0), open_timeout=10,
                                          ping_interval=None, close_timeout=1) as ws:
                closed = asyncio.ensure_future(ws.wait_closed())
                stopping = asyncio.ensure_future(stop.wait())
                await asyncio.wait((closed, stopping), return_when=asyncio.FIRST_COMPLETED)
                stopping.cancel()
                if ws.close_code is not None:
                    closes.append((ws.close_code, ws.close_reason))
        except (OSError, TimeoutError, websockets.WebSocketException):
            closes.append((None, "failed"))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 2.0)


async def test_idle_handshakes_do_not_keep_a_client_out(make_gateway):
    gw = make_gateway(**gateway_env(NOVAGATE_HANDSHAKE_TIMEOUT=10))
    closes: list = []
    stop = asyncio.Event()
    attack = [asyncio.create_task(idle_socket(gw, a, closes, stop))
              for a in ATTACKERS for _ in range(SOCKETS_PER_ATTACKER)]
    try:
        deadline = time.monotonic() + 10  # the handshake slots fill up, the rest is turned away
        while sum(c == (1013, "busy") for c in closes) < 100 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        _, pending = await held(gw)
        assert pending <= PENDING_CAP, pending
        c = VoiceClient(gw.ws)  # not reconnecting: the first attempt has to work
        await c.connect(mic=False)
        try:
            turn = await c.turn(text="I met with Doctor Smith today at two pm", timeout=60)
            assert "doctor smith" in turn["assistant"].lower()
            sockets, pending = await held(gw)
            print(f"\n[admission] {sockets} sockets held, {pending} in their handshake, closes: "
                  f"{collections.Counter(code for code, _ in closes)}")
            assert pending <= PENDING_CAP, pending
        finally:
            await c.close()
    finally:
        stop.set()
        await asyncio.gather(*attack, return_exceptions=True)
    busy = sum(c == (1013, "busy") for c in closes)
    assert busy >= 100, closes[:20]  # turned away (or made room for a fairer newcomer) with 1013 busy
    assert not any(code == 4429 for code, _ in closes)  # 20 per address is within the per-address cap


async def _open(url: str, **kw):
    """A socket that sends nothing, and its close code if the gateway closes it within 0.5 s."""
    ws = await websockets.connect(url, open_timeout=10, ping_interval=None, close_timeout=1, **kw)
    try:
        await asyncio.wait_for(ws.recv(), 0.5)
    except TimeoutError:
        return ws, None
    except websockets.ConnectionClosed:
        return ws, ws.close_code
    raise AssertionError("the gateway said something before session.start")


async def test_sockets_per_address_are_capped_and_released(make_gateway):
    gw = make_gateway(**gateway_env(NOVAGATE_MAX_SOCKETS_PER_IP=3, NOVAGATE_HANDSHAKE_TIMEOUT=30))
    opened = []
    try:
        for _ in range(3):
            ws, code = await _open(gw.ws)
            opened.append(ws)
            assert code is None
        ws, code = await _open(gw.ws)
        assert code == 4429 and ws.close_reason == "too many connections from this address"
        # X-Forwarded-For is not trusted by default (NOVAGATE_FORWARDED_ALLOW_IPS empty)
        _, code = await _open(gw.ws, additional_headers={"X-Forwarded-For": "203.0.113.9"})
        assert code == 4429
        ws, code = await _open(gw.ws, local_addr=("127.0.0.2", 0))  # another address is not affected
        opened.append(ws)
        assert code is None
        await opened.pop(0).close()  # a socket that ends gives its place back (within the actor's 5 s
        deadline = time.monotonic() + 10  # wait for its writer once the client has gone)
        while True:
            ws, code = await _open(gw.ws)
            opened.append(ws)
            if code is None or time.monotonic() > deadline:
                break
        assert code is None
    finally:
        for ws in opened:
            await ws.close()


async def test_forwarded_for_names_the_client_behind_a_trusted_proxy(make_gateway):
    gw = make_gateway(**gateway_env(NOVAGATE_MAX_SOCKETS_PER_IP=1, NOVAGATE_HANDSHAKE_TIMEOUT=30,
                                    NOVAGATE_FORWARDED_ALLOW_IPS="127.0.0.1"))
    opened = []
    try:
        for client, expected in (("203.0.113.1", None), ("203.0.113.2", None), ("203.0.113.1", 4429)):
            ws, code = await _open(gw.ws, additional_headers={"X-Forwarded-For": client})
            opened.append(ws)
            assert code == expected, client
    finally:
        for ws in opened:
            await ws.close()


async def test_live_sessions_per_user_are_capped_and_released(make_gateway):
    gw = make_gateway(**gateway_env(NOVAGATE_AUTH_JWT_SECRET=KEY, NOVAGATE_MAX_SESSIONS_PER_USER=2))
    alice, bob = (jwt.encode({"sub": u, "exp": int(time.time()) + 3600}, KEY, algorithm="HS256") for u in ("alice", "bob"))
    live: list[VoiceClient] = []

    async def connect(**kw) -> int | None:
        """None once session.ready came (the client stays connected), else the close code."""
        c = VoiceClient(gw.ws, **kw)
        try:
            await c.connect(mic=False)
        except ConnectionError:
            await c.close()
            return c.close_code
        live.append(c)
        return None

    try:
        assert await connect(token=alice) is None
        assert await connect(token=alice) is None
        assert await connect(token=alice) == 4429
        assert await connect(token=bob) is None  # another user
        for _ in range(3):  # anonymous clients are capped per address only
            assert await connect() is None
        await live.pop(0).close()  # a session that ends gives its place back
        deadline = time.monotonic() + 10
        while (code := await connect(token=alice)) is not None and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert code is None
    finally:
        for c in live:
            await c.close()
