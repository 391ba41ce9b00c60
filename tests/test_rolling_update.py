"""A rolling update behind a real proxy, with zero loss.

nginx (started here, on a free loopback port, with a generated configuration) balances WebSockets
over two gateway processes that share a store and a secret. Twenty scripted clients converse through
it (typed turns, and a few spoken ones). While their turns are in flight, one gateway gets SIGTERM:
its clients are told to reconnect, resume through nginx on the other instance and finish another
turn. A new process then takes the drained one's place and the second gateway is drained the same
way, so every client moves twice. Afterwards every item a client saw saved, and every item it holds
a receipt for, is read back from the store: present exactly once, with the text the client got.

Runs twice: the embedded default (local engine, one SQLite file shared by both processes) and the
AWS path (engine=bedrock against the Nova emulator, store=agent-runtime against the fake).
Reconnect times are printed, never asserted.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import httpx
import pytest

from gateway.client import VoiceClient

from . import conftest
from .conftest import HELLO, MET, Gateway, free_port, speech

CLIENTS = 20
SPOKEN = (0, 7, 14)          # these clients speak (open microphone); the others type
SECRET = "rolling-update-test-secret-0123456789abcdef"
DRAIN_GRACE_S = 10
KILL_AFTER_S = 1.2           # into a round of turns: user items final, replies playing
TURN_TIMEOUT = 90.0


def find_nginx() -> str | None:
    """nginx on PATH, or where packages put it (/usr/sbin is not on every user's PATH)."""
    places = ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx")
    return shutil.which("nginx") or next((p for p in places if os.access(p, os.X_OK)), None)


# -- processes ------------------------------------------------------------------------------------------
class PinnedGateway(Gateway):
    """A gateway that keeps its port when it is started again (a pod behind a stable address)."""

    def start(self, timeout: float = 60.0) -> Gateway:
        port = self.port
        if not port:
            return super().start(timeout)
        log = self.tmp / f"gateway-{port}.log"
        if log.exists():  # keep the previous incarnation's log
            n = len(list(self.tmp.glob(f"gateway-{port}.*.log")))
            log.rename(self.tmp / f"gateway-{port}.{n}.log")
        with mock.patch.object(conftest, "free_port", lambda: port):
            return super().start(timeout)

    def sessions(self) -> set[str]:
        """Session ids this process made ready (from its JSON log)."""
        out = set()
        for line in self.logs().splitlines():
            if '"session ready"' in line:
                try:
                    out.add(json.loads(line)["session_id"])
                except (ValueError, KeyError):
                    pass
        return out


NGINX_CONF = """\
daemon off;
master_process off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log info;
events {{ worker_connections 1024; }}
http {{
    access_log {tmp}/access.log;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;

    map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}

    upstream novagate {{
{servers}
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://novagate;
            proxy_http_version 1.1;                       # WebSocket upgrade
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_buffering off;
            proxy_connect_timeout 2s;
            proxy_read_timeout 1h;                        # a conversation is one long request
            proxy_send_timeout 1h;
            # a stopped or refusing instance is skipped (a draining one that accepts and closes 1013
            # cannot be: the client retries, and the next try goes to the other instance)
            proxy_next_upstream error timeout http_502 http_503;
            proxy_next_upstream_tries 2;
        }}
    }}
}}
"""


@dataclass
class Nginx:
    tmp: Path
    upstreams: list[int]
    port: int = 0
    proc: subprocess.Popen | None = None

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/voice"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Nginx:
        binary = find_nginx()
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        # max_fails=0: never mark an instance down. With the default (1 failure -> down for fail_timeout), a
        # replacement started on a failed instance's address got one new connection per fail_timeout: nginx
        # counts an upstream as recovered only when a request to it *ends*, and a WebSocket lasts. A dead
        # instance still costs just one refused connect per request (proxy_next_upstream error).
        servers = "\n".join(f"        server 127.0.0.1:{p} max_fails=0;" for p in self.upstreams)
        conf = self.tmp / "nginx.conf"
        conf.write_text(NGINX_CONF.format(tmp=self.tmp, servers=servers, port=self.port))
        log = open(self.tmp / "nginx.out", "wb")
        self.proc = subprocess.Popen([binary, "-p", str(self.tmp), "-c", str(conf), "-e", str(self.tmp / "error.log")],
                                     stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited {self.proc.returncode}: {self.errors()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.5).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("nginx did not start")

    def errors(self) -> str:
        files = [self.tmp / n for n in ("nginx.out", "error.log")]
        return "\n".join(f.read_text(errors="replace") for f in files if f.exists())

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


# -- the store, read back directly -------------------------------------------------------------------
def stored_items(backend: dict, tmp: Path, conversation_id: str) -> list[dict]:
    """Every item stored for a conversation, read from the store itself (not through the gateway):
    one row per stored copy, so a doubled item shows up twice."""
    if backend.get("NOVAGATE_STORE") == "agent-runtime":
        return agent_runtime_items(backend["AWS_ENDPOINT_URL_BEDROCK_AGENT_RUNTIME"], conversation_id)
    with sqlite3.connect(f"file:{tmp / 'novagate.db'}?mode=ro", uri=True, timeout=10) as db:
        rows = db.execute("SELECT item_id, role, text FROM items WHERE conversation_id = ? ORDER BY seq",
                          (conversation_id,)).fetchall()
    return [{"item_id": i, "role": r, "text": t} for i, r, t in rows]


def agent_runtime_items(endpoint: str, conversation_id: str) -> list[dict]:
    """Every invocation step of the conversation's sessions (following a rotation's `prev` chain),
    minus the copies a rotation seeds into its new session."""
    import boto3

    from gateway.store.agent_runtime import invocation_id

    client = boto3.client("bedrock-agent-runtime", region_name="us-east-1", endpoint_url=endpoint,
                          aws_access_key_id="x", aws_secret_access_key="y")
    out: list[dict] = []
    sid: str | None = conversation_id
    seen: set[str] = set()
    while sid and sid not in seen:
        seen.add(sid)
        meta = client.get_session(sessionIdentifier=sid).get("sessionMetadata") or {}
        seeded = invocation_id(sid, "rotated-from-" + meta["prev"]) if meta.get("prev") else None
        summaries, token = [], None
        while True:
            page = client.list_invocation_steps(sessionIdentifier=sid, maxResults=1000,
                                                **({"nextToken": token} if token else {}))
            summaries += page["invocationStepSummaries"]
            token = page.get("nextToken")
            if not token:
                break
        for s in summaries:
            if s["invocationId"] == seeded:
                continue
            step = client.get_invocation_step(sessionIdentifier=sid, invocationIdentifier=s["invocationId"],
                                              invocationStepId=s["invocationStepId"])["invocationStep"]
            doc = json.loads("".join(b["text"] for b in step["payload"]["contentBlocks"] if "text" in b))
            out.append({"item_id": doc["item_id"], "role": doc["role"], "text": doc["text"]})
        sid = meta.get("prev")
    return out


def check_exactly_once(c: VoiceClient, stored: list[dict], api_history: list[dict]) -> list[str]:
    """Problems with one client's conversation: an item it saw saved, or holds a receipt for, that is
    missing or stored more than once, or stored with other text than it was told."""
    problems = []
    counts = Counter(x["item_id"] for x in stored)
    api_counts = Counter(x["item_id"] for x in api_history)
    by_id = {x["item_id"]: x for x in stored}
    finals = {f["item_id"]: f for f in c.finals if f.get("receipt")}
    for item_id in sorted(set(finals) | c.saved | set(c.state.pending)):
        if counts[item_id] != 1:
            problems.append(f"{item_id}: stored {counts[item_id]} times")
        elif item_id in finals and (by_id[item_id]["text"], by_id[item_id]["role"]) != (
                finals[item_id]["text"], finals[item_id]["role"]):
            problems.append(f"{item_id}: stored {by_id[item_id]!r}, final was {finals[item_id]['text']!r}")
        if api_counts[item_id] != 1:
            problems.append(f"{item_id}: {api_counts[item_id]} times in the history endpoint")
    doubled = [i for i, n in counts.items() if n > 1]
    if doubled:
        problems.append(f"doubled in the store: {doubled}")
    return problems


# -- the scenario -----------------------------------------------------------------------------------------
def _text(i: int, n: int) -> str:
    return f"Thank you, this is client {i}, turn {n}" if (i + n) % 3 else f"Hello there, client {i} here, turn {n}"


async def one_turn(c: VoiceClient, i: int, n: int) -> dict:
    if i in SPOKEN:
        return await c.turn(speech(MET if n % 2 else HELLO), timeout=TURN_TIMEOUT, retry=3)
    return await c.turn(text=_text(i, n), timeout=TURN_TIMEOUT, retry=3)


async def round_of_turns(clients: list[VoiceClient], n: int) -> list[dict]:
    return list(await asyncio.gather(*(one_turn(c, i, n) for i, c in enumerate(clients))))


def _sigterm_and_watch(gw: Gateway, started: float) -> dict:
    """SIGTERM, then what the process does: /readyz answers seen while draining, exit code and time."""
    gw.proc.send_signal(signal.SIGTERM)
    seen: list = []
    with httpx.Client(timeout=0.5) as h:
        while gw.proc.poll() is None and time.monotonic() - started < DRAIN_GRACE_S + 15:
            try:
                status = h.get(gw.http + "/readyz").status_code
            except httpx.HTTPError as e:
                status = type(e).__name__
            if not seen or seen[-1] != status:
                seen.append(status)
            time.sleep(0.02)
    try:
        gw.proc.wait(max(0.1, DRAIN_GRACE_S + 15 - (time.monotonic() - started)))
    except subprocess.TimeoutExpired:
        pass
    return {"readyz": seen, "returncode": gw.proc.poll(), "exit_s": time.monotonic() - started}


async def roll(victim: PinnedGateway, clients: list[VoiceClient], n: int, stats: dict) -> tuple[set, dict]:
    """A round of turns; SIGTERM `victim` while they are in flight; every turn still completes
    (asked again on the other instance when the drain cut it). Returns the clients that were on it."""
    on_victim_sessions = victim.sessions()
    victims = {i for i, c in enumerate(clients) if c.ready["session_id"] in on_victim_sessions}
    interrupted_before = [c.turns_interrupted for c in clients]
    turns = asyncio.create_task(round_of_turns(clients, n))
    await asyncio.sleep(KILL_AFTER_S)
    in_flight = sum(1 for c in clients if c.finals and c.finals[-1]["role"] == "user")
    t0 = time.monotonic()
    drained = await asyncio.to_thread(_sigterm_and_watch, victim, t0)
    results = await turns
    assert all(r["user"] for r in results)
    stats.update(drained)
    stats["in_flight_at_sigterm"] = in_flight
    stats["turns_asked_again"] = sum(c.turns_interrupted - b for c, b in zip(clients, interrupted_before))
    return victims, drained


@pytest.fixture
def nginx_bin():
    if find_nginx() is None:
        pytest.fail("nginx is not installed: run `make nginx` (scripts/install-nginx)")


async def test_rolling_update_through_nginx_loses_nothing(nginx_bin, backend, tmp_path):
    aws = backend.get("NOVAGATE_STORE") == "agent-runtime"
    env = {**backend, "NOVAGATE_SECRET": SECRET, "NOVAGATE_SQLITE_PATH": str(tmp_path / "novagate.db"),
           "NOVAGATE_DRAIN_GRACE_S": str(DRAIN_GRACE_S),
           "NOVAGATE_MAX_SOCKETS_PER_IP": "0"}  # every client comes through nginx, from one address
    if not aws:
        env["NOVAGATE_ENGINE_TRACE"] = ""
    dirs = [tmp_path / name for name in ("gw-a", "gw-b", "gw-a2")]
    for d in dirs:
        d.mkdir()
    a = PinnedGateway(dirs[0], dict(env)).start()
    b = PinnedGateway(dirs[1], dict(env)).start()
    a2 = PinnedGateway(dirs[2], dict(env))
    a2.port = a.port  # the replacement takes the drained one's place behind nginx
    proxy = Nginx(tmp_path / "nginx", [a.port, b.port]).start()
    clients: list[VoiceClient] = []
    t_start = time.monotonic()
    try:
        for i in range(CLIENTS):
            c = VoiceClient(proxy.ws, reconnect=True, output_rate=16000, reconnect_timeout=45)
            c.speed = 1.0
            clients.append(c)
        await asyncio.gather(*(c.connect(mic=i in SPOKEN) for i, c in enumerate(clients)))
        await round_of_turns(clients, 1)
        on_a, on_b = a.sessions(), b.sessions()
        spread = tuple(sum(c.ready["session_id"] in on for c in clients) for on in (on_a, on_b))
        assert sum(spread) == CLIENTS and min(spread) > 0, spread
        conversations = [c.state.conversation_id for c in clients]

        # roll 1: drain A while turns are in flight; everyone on A resumes on B
        stats1: dict = {}
        victims1, drained1 = await roll(a, clients, 2, stats1)
        assert drained1["returncode"] == 0, (drained1, a.logs()[-3000:])
        await round_of_turns(clients, 3)  # ... and completes another turn there
        on_b = b.sessions()
        for i in victims1:
            c = clients[i]
            assert c.reconnects and all(r.resumed for r in c.reconnects), (i, c.reconnects)
            assert c.ready["session_id"] in on_b, f"client {i} did not resume on the other instance"
        for i in set(range(CLIENTS)) - victims1:
            assert not clients[i].reconnects, f"client {i} on the surviving instance was disturbed"

        # roll 2: a new process takes A's place; drain B; everyone resumes on the new one
        await asyncio.to_thread(a2.start)
        stats2: dict = {}
        victims2, drained2 = await roll(b, clients, 4, stats2)
        assert drained2["returncode"] == 0, (drained2, b.logs()[-3000:])
        assert victims2 == set(range(CLIENTS))
        await round_of_turns(clients, 5)
        on_a2 = a2.sessions()
        for i, c in enumerate(clients):
            assert c.ready["session_id"] in on_a2, f"client {i} did not resume on the new instance"
            assert c.ready["resumed"] and c.close_code is None
            assert all(r.resumed for r in c.reconnects), (i, c.reconnects)
            assert c.state.conversation_id == conversations[i] or aws  # (a store may move it: session.updated)
            assert not c.state.pending, f"client {i}: receipts never acknowledged: {list(c.state.pending)}"

        # zero loss: read every conversation back from the store itself, and through the history API
        async with httpx.AsyncClient(base_url=proxy.http, timeout=30) as h:
            problems = {}
            for i, c in enumerate(clients):
                cid = c.state.conversation_id
                r = await h.get(f"/v1/conversations/{cid}/history", headers={"X-Resume-Token": c.state.resume_token})
                assert r.status_code == 200, r.text
                stored = await asyncio.to_thread(stored_items, env, tmp_path, cid)
                if p := check_exactly_once(c, stored, r.json()["history"]):
                    problems[i] = p
                assert len({f["item_id"] for f in c.finals}) == len(c.finals), "a final arrived twice"
        assert not problems, problems

        # what happened, for the record (times are printed, never asserted)
        recs = [r for c in clients for r in c.reconnects]
        durations = sorted(r.duration for r in recs)
        notices = [r.since_notice for r in recs if r.since_notice is not None]
        label = "aws (bedrock + agent-runtime)" if aws else "local + sqlite"
        print(f"\n[rolling update, {label}] {CLIENTS} clients, {len(recs)} reconnects, "
              f"{sum(len(c.finals) for c in clients)} final items checked, total {time.monotonic() - t_start:.1f} s")
        for n, (st, victims) in enumerate(((stats1, victims1), (stats2, victims2)), 1):
            print(f"  roll {n}: {len(victims)} clients on the drained instance, {st['in_flight_at_sigterm']} with a "
                  f"reply in flight; exit {st['returncode']} after {st['exit_s']:.2f} s; /readyz seen {st['readyz']}; "
                  f"turns asked again: {st['turns_asked_again']}")
        print(f"  reconnect (socket lost -> session.ready): max {durations[-1] * 1000:.0f} ms, "
              f"median {statistics.median(durations) * 1000:.0f} ms; notice -> ready max "
              f"{max(notices) * 1000 if notices else float('nan'):.0f} ms")
        print(f"  reasons {dict(Counter(r.reason for r in recs))}; lost sockets closed with "
              f"{dict(Counter(r.close_code for r in recs))}; failed attempts "
              f"{dict(Counter(x for c in clients for x in c.failure_reasons))}")
    finally:
        for c in clients:
            await c.close()
        proxy.stop()
        for gw in (a, b, a2):
            gw.stop()
