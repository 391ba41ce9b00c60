"""HTTP hardening on real gateway processes: credentials on the HTTP endpoints, ended conversations,
the Host allow-list (DNS rebinding) and the Origin rule, security headers and the files served, the
admin (metrics) port, slow request headers, and query strings kept out of the logs."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import httpx
import jwt
import orjson
import pytest
import websockets

from gateway.client import VoiceClient
from gateway.config import ConfigError, Settings
from gateway.web import LOOPBACK_NAMES, allowed_hosts, origin_allowed

from .conftest import ROOT, Gateway, free_port

KEY = "http-hardening-user-key-of-32-bytes-or-more"
HEADER_TIMEOUT = 3
START = orjson.dumps({"type": "session.start", "protocol": 1}).decode()
SECURITY_HEADERS = ("content-security-policy", "x-content-type-options", "x-frame-options", "referrer-policy")


def bearer(user: str, key: str = KEY) -> str:
    return "Bearer " + jwt.encode({"sub": user, "exp": int(time.time()) + 3600}, key, algorithm="HS256")


@pytest.fixture(scope="module")
def backend() -> dict:
    return {}


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    """Accounts optional; /metrics on its own port; short header timeout; a low concurrency limit."""
    g = Gateway(tmp_path_factory.mktemp("gw"), {
        "NOVAGATE_AUTH_JWT_SECRET": KEY, "NOVAGATE_METRICS_PORT": str(free_port()),
        "NOVAGATE_HEADER_TIMEOUT": str(HEADER_TIMEOUT), "NOVAGATE_LIMIT_CONCURRENCY": "100",
    }).start()
    yield g
    g.stop()


@pytest.fixture(scope="module")
def gw_required(tmp_path_factory):
    """Accounts required; no admin port (NOVAGATE_METRICS_PORT=0)."""
    g = Gateway(tmp_path_factory.mktemp("gw-required"), {
        "NOVAGATE_AUTH_JWT_SECRET": KEY, "NOVAGATE_AUTH_REQUIRED": "true", "NOVAGATE_METRICS_PORT": "0",
    }).start()
    yield g
    g.stop()


async def conversation(gw, **kw) -> tuple[str, str]:
    """A new conversation: (its id, its resume token)."""
    c = VoiceClient(gw.ws, **kw)
    await c.connect(mic=False)
    await c.close()
    return c.ready["conversation_id"], c.ready["resume_token"]


# -- credentials ----------------------------------------------------------------------------------
async def test_a_bearer_that_does_not_verify_is_401_never_ignored(gw):
    cid, token = await conversation(gw)
    paths = (f"/v1/conversations/{cid}/history", f"/conversation/{cid}/history")
    async with httpx.AsyncClient(base_url=gw.http, headers={"X-Resume-Token": token}) as h:
        for path in paths:
            assert (await h.get(path)).status_code == 200
        for auth in ("Bearer not-a-jwt", bearer("alice", key="another-key-of-32-bytes-or-more-xxxxx"),
                     "Basic dXNlcjpwYXNz", "Bearer"):
            for path in paths:
                r = await h.get(path, headers={"Authorization": auth})
                assert r.status_code == 401, (auth, path)
                assert r.headers["www-authenticate"].startswith("Bearer")
                assert r.json()["error"] == "unauthorized"
            assert (await h.delete(f"/v1/conversations/{cid}", headers={"Authorization": auth})).status_code == 401
        assert (await h.get(paths[0])).status_code == 200  # nothing was deleted
        # a valid bearer of a user: the anonymous conversation is still open to its resume token
        assert (await h.get(paths[0], headers={"Authorization": bearer("alice")})).status_code == 200


async def test_auth_required_applies_to_http(gw_required):
    alice = bearer("alice")
    cid, token = await conversation(gw_required, token=alice.split()[1])
    url = f"/v1/conversations/{cid}/history"
    async with httpx.AsyncClient(base_url=gw_required.http) as h:
        for headers in ({}, {"X-Resume-Token": token}):
            r = await h.get(url, headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", headers
        assert (await h.delete(f"/v1/conversations/{cid}", headers={"X-Resume-Token": token})).status_code == 401
        assert (await h.get(url, headers={"Authorization": alice})).status_code == 200
        assert (await h.get(url, headers={"Authorization": bearer("bob"), "X-Resume-Token": token})).status_code == 404


async def test_an_ended_conversation_is_404_but_can_still_be_deleted(gw):
    c = VoiceClient(gw.ws)
    await c.connect(mic=False)
    cid, token = c.ready["conversation_id"], c.ready["resume_token"]
    await c.end()
    await c.wait_for(lambda: c.close_code is not None, 10)
    assert c.close_code == 1000
    await c.close()
    async with httpx.AsyncClient(base_url=gw.http, headers={"X-Resume-Token": token}) as h:
        for path in (f"/v1/conversations/{cid}/history", f"/conversation/{cid}/history"):
            r = await h.get(path)
            assert r.status_code == 404 and r.json()["error"] == "not_found", path
        assert (await h.delete(f"/v1/conversations/{cid}")).status_code == 204
        assert (await h.delete(f"/v1/conversations/{cid}")).status_code == 404  # erased


# -- hosts and origins ----------------------------------------------------------------------------
async def test_dns_rebinding_is_refused(gw):
    rebound = {"Host": "evil.example", "Origin": "http://evil.example"}
    async with httpx.AsyncClient(base_url=gw.http) as h:
        for path in ("/", "/app.js", "/v1/conversations/x/history"):
            r = await h.get(path, headers=rebound)
            assert r.status_code == 400, path
            assert all(k in r.headers for k in SECURITY_HEADERS)
        assert (await h.delete("/v1/conversations/x", headers=rebound)).status_code == 400
        assert (await h.get("/healthz", headers=rebound)).status_code == 200  # probes ask by IP address
    with pytest.raises(websockets.InvalidStatus) as e:
        await websockets.connect(f"ws://evil.example:{gw.port}/v1/voice", host="127.0.0.1", port=gw.port,
                                 origin="http://evil.example", open_timeout=5)
    assert e.value.response.status_code == 400


async def test_the_same_host_origin_rule_uses_the_allowed_hosts(gw):
    async def close_code(origin: str) -> int | None:
        async with websockets.connect(gw.ws, origin=origin, open_timeout=5) as ws:
            try:
                await ws.send(START)
                reply = orjson.loads(await asyncio.wait_for(ws.recv(), 5))
            except websockets.ConnectionClosed:
                return ws.close_code
            assert reply["type"] == "session.ready"
            return None

    assert await close_code("http://evil.example") == 4403
    assert await close_code(f"http://localhost:{gw.port}") is None  # Host says 127.0.0.1: another allowed name
    assert await close_code(f"http://127.0.0.1:{gw.port}") is None
    assert await close_code("null") == 4403
    # the Host header is not what the Origin is compared with: a rebound name stays refused
    assert not origin_allowed("http://evil.example", (), LOOPBACK_NAMES, "evil.example")
    assert origin_allowed("https://app.example.com", (), ("*.example.com",), "gw.internal")
    assert origin_allowed("http://evil.example", (), ("*",), "evil.example")  # `*`: the operator gave it up


def test_allowed_hosts_default_and_a_public_address_without_them():
    assert allowed_hosts(Settings(host="127.0.0.1")) == LOOPBACK_NAMES
    assert allowed_hosts(Settings(host="127.0.0.2")) == LOOPBACK_NAMES + ("127.0.0.2",)
    assert allowed_hosts(Settings(host="::1")) == LOOPBACK_NAMES
    assert allowed_hosts(Settings(host="0.0.0.0", allowed_hosts="Voice.Example, *.example.org")) == (
        "voice.example", "*.example.org")
    for bad in (Settings(host="0.0.0.0"), Settings(host="10.1.2.3"), Settings(allowed_hosts="a*.example")):
        with pytest.raises(ConfigError, match="NOVAGATE_ALLOWED_HOSTS"):
            allowed_hosts(bad)


def test_serve_refuses_to_start_on_a_public_address_without_allowed_hosts(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("NOVAGATE_")}
    env.update(NOVAGATE_SECRET_FILE=str(tmp_path / "secret"), NOVAGATE_SQLITE_PATH=str(tmp_path / "db"),
               NOVAGATE_METRICS_PORT="0", NOVAGATE_PORT=str(free_port()))
    r = subprocess.run([sys.executable, "-m", "gateway.cli", "serve", "--host", "0.0.0.0"], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "NOVAGATE_ALLOWED_HOSTS" in r.stderr, r.stderr[-2000:]


# -- what is served -------------------------------------------------------------------------------
async def test_security_headers_and_only_the_apps_own_files(gw):
    web = ROOT / "web"
    app_files = ["", *(p.name for p in web.iterdir() if p.suffix in (".html", ".js", ".css")),
                 *(f"audio/{p.name}" for p in (web / "audio").glob("*.js"))]
    assert {"index.html", "app.js", "novagate-client.js", "style.css", "audio/player-worklet.js"} <= set(app_files)
    not_served = ["package.json", "test/", *(f"test/{p.name}" for p in (web / "test").iterdir()),
                  "node_modules/x/index.js", "audio/", "../pyproject.toml", ".gitignore"]
    async with httpx.AsyncClient(base_url=gw.http) as h:
        for path in app_files:
            r = await h.get("/" + path)
            assert r.status_code == 200 and all(k in r.headers for k in SECURITY_HEADERS), path
        for path in not_served:
            r = await h.get("/" + path)
            assert r.status_code == 404 and all(k in r.headers for k in SECURITY_HEADERS), path
        r = await h.get("/")
        csp = r.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp and "connect-src 'self' ws: wss:" in csp
        assert r.headers["x-frame-options"] == "DENY" and r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["referrer-policy"] == "no-referrer"
        for path in ("/healthz", "/readyz", "/v1/conversations/x/history"):
            r = await h.get(path)
            assert all(k in r.headers for k in SECURITY_HEADERS), path


async def test_metrics_are_on_the_admin_port_only(gw, gw_required):
    admin = f"http://127.0.0.1:{gw.env['NOVAGATE_METRICS_PORT']}"
    async with httpx.AsyncClient() as h:
        assert (await h.get(gw.http + "/metrics")).status_code == 404
        r = await h.get(admin + "/metrics")
        assert r.status_code == 200 and "novagate_sessions_total" in r.text and "novagate_handshakes_pending" in r.text
        assert (await h.get(admin + "/")).status_code == 404
        # NOVAGATE_METRICS_PORT=0: no admin port, /metrics on the serving port
        r = await h.get(gw_required.http + "/metrics")
        assert r.status_code == 200 and "novagate_sessions_total" in r.text


# -- connections ----------------------------------------------------------------------------------
async def test_slow_request_headers_are_cut_off(gw):
    slow = []
    for _ in range(200):  # open, send part of a request line, never finish it
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        slow.append((reader, writer))
    opened = time.monotonic()
    await asyncio.sleep(0.5)
    try:
        async with httpx.AsyncClient(base_url=gw.http) as h:
            # while they are open, uvicorn's limit_concurrency (100 here) sheds plain HTTP requests ...
            assert (await h.get("/readyz")).status_code == 503
            # ... but not WebSocket upgrades: a client still gets its session
            c = VoiceClient(gw.ws)
            await c.connect(mic=False)
            try:
                turn = await c.turn(text="hello there", timeout=60)
                assert turn["assistant"]
            finally:
                await c.close()
            # the header timeout closes every one of them
            ends = await asyncio.gather(*(asyncio.wait_for(r.read(), HEADER_TIMEOUT + 10) for r, _ in slow))
            assert ends == [b""] * len(slow)
            assert time.monotonic() - opened >= HEADER_TIMEOUT - 0.5
            assert (await h.get("/readyz")).status_code == 200
    finally:
        for _, w in slow:
            w.close()


async def test_a_slow_request_on_a_kept_alive_connection_is_cut_off_too(gw):
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200")
        await reader.readexactly(int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                          if line.lower().startswith(b"content-length"))))
        started = time.monotonic()
        writer.write(b"GET /healthz HTTP/1.1\r\n")  # the next request begins, and stalls
        assert await asyncio.wait_for(reader.read(), HEADER_TIMEOUT + 5) == b""
        assert HEADER_TIMEOUT - 0.5 <= time.monotonic() - started
    finally:
        writer.close()


async def test_query_strings_stay_out_of_the_logs(gw):
    async with websockets.connect(gw.ws + "?token=sekrit-in-the-url", open_timeout=5) as ws:
        await ws.send(START)
        assert orjson.loads(await ws.recv())["type"] == "session.ready"
    await asyncio.sleep(0.3)
    logs = gw.logs()
    assert '"WebSocket /v1/voice\\" [accepted]' in logs and "sekrit-in-the-url" not in logs


async def test_a_malformed_chunked_body_is_a_400_without_a_traceback(gw):
    for path in ("/healthz", "/readyz"):
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{gw.port}\r\nTransfer-Encoding: chunked\r\n\r\n"
                         "zz\r\n".encode())
            answer = await asyncio.wait_for(reader.read(), 10)
            assert answer.startswith(b"HTTP/1.1 400")
        finally:
            writer.close()
    await asyncio.sleep(0.5)
    assert "Exception in ASGI application" not in gw.logs()
