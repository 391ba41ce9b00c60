"""`novagate serve --workers 2` (gateway/workers.py) as a real process tree: a supervisor and two
workers on one listening socket.

- sessions land on both workers (each worker's log lines carry its pid, and /metrics has
  `novagate_worker_sockets{pid}`);
- the per-address cap holds across workers, exactly: three sockets split over the two workers, and
  a fourth from the same address is refused wherever it lands;
- a worker that dies is restarted, and what it held is released;
- a resume token minted by one worker resumes the conversation on the other (one secret);
- /metrics (the supervisor's admin port) adds the workers up, process CPU and memory included;
- SIGTERM to the supervisor drains both workers (session.reconnect, 1012) and it exits 0.

Loopback source addresses (127.0.x.y) stand for distinct clients."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections import Counter

import httpx
import orjson
import pytest
import websockets
from prometheus_client.parser import text_string_to_metric_families

from .conftest import Gateway, free_port
from .test_admission import _open

PER_ADDRESS = 3


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    g = Gateway(tmp_path_factory.mktemp("workers"), {
        "NOVAGATE_WORKERS": "2",
        "NOVAGATE_METRICS_PORT": str(free_port()),
        "NOVAGATE_MAX_SOCKETS_PER_IP": str(PER_ADDRESS),
        "NOVAGATE_HANDSHAKE_TIMEOUT": "60",
        "NOVAGATE_DRAIN_GRACE_S": "10",
    }).start()
    try:
        wait_for(lambda: len(worker_sockets(g)) == 2, "two workers serving")
        yield g
    finally:
        g.stop()


def wait_for(check, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            if result := check():
                return result
        except (httpx.HTTPError, OSError):
            pass
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def scrape(g: Gateway) -> dict:
    """The admin port's /metrics: {(name, labels as a tuple): value}."""
    text = httpx.get(f"http://127.0.0.1:{g.env['NOVAGATE_METRICS_PORT']}/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def worker_sockets(g: Gateway) -> dict[int, int]:
    """pid -> sockets that worker holds."""
    return {int(dict(labels)["pid"]): int(v) for (name, labels), v in scrape(g).items()
            if name == "novagate_worker_sockets"}


def session_worker(g: Gateway, session_id: str) -> int:
    """The pid of the worker that made `session_id` ready (from its log line)."""

    def find():
        for line in g.logs().splitlines():
            if '"session ready"' in line and session_id in line:
                return json.loads(line)["pid"]
        return None

    return wait_for(find, f"the log line of {session_id}")


async def start_session(g: Gateway, address: str, resume: str | None = None):
    """A socket from `address` that has sent session.start and got session.ready: (socket, ready)."""
    ws = await websockets.connect(g.ws, subprotocols=["novagate.v1"], local_addr=(address, 0), open_timeout=10)
    start = {"type": "session.start", "protocol": 1, **({"resume": resume} if resume else {})}
    await ws.send(orjson.dumps(start).decode())
    while (msg := orjson.loads(await asyncio.wait_for(ws.recv(), 30)))["type"] != "session.ready":
        pass
    return ws, msg


async def open_idle(g: Gateway, address: str) -> tuple[websockets.ClientConnection, int | None]:
    """A socket from `address` that sends nothing; its close code if the gateway closes it at once."""
    return await _open(g.ws, local_addr=(address, 0))


async def settled_sockets(g: Gateway, total: int) -> dict[int, int]:
    """Sockets per worker once they add up to `total` (and stay so for a few health ticks: each worker
    updates its figure every 125 ms)."""

    def settled():
        first = worker_sockets(g)
        if sum(first.values()) != total:
            return None
        time.sleep(0.4)
        return first if worker_sockets(g) == first else None

    return await asyncio.to_thread(wait_for, settled, f"{total} sockets held")


async def test_per_address_cap_is_exact_across_workers_and_a_dead_workers_share_is_released(gw):
    held: list = []
    try:
        # three sockets from one address, on both workers (a new address until they are split)
        for n in range(1, 11):
            address = f"127.0.2.{n}"
            before = await settled_sockets(gw, len(held))
            mine = []
            for _ in range(PER_ADDRESS):
                ws, code = await open_idle(gw, address)
                assert code is None
                mine.append(ws)
            held += mine
            after = await settled_sockets(gw, len(held))
            split = {pid: after.get(pid, 0) - before.get(pid, 0) for pid in after}
            if all(split.values()):
                break
        else:
            pytest.fail("ten times, three sockets landed on one worker")
        # the fourth and later ones are refused wherever they land (a per-worker cap would take them on
        # either worker: each holds fewer than three)
        for _ in range(8):
            ws, code = await open_idle(gw, address)
            assert (code, ws.close_reason) == (4429, "too many connections from this address")
        assert sum(after.values()) == len(held)

        # a worker holding some of them dies: it is restarted, and its share of the address is free again
        victim = next(pid for pid, k in split.items() if k)
        os.kill(victim, signal.SIGKILL)
        await asyncio.to_thread(wait_for, lambda: victim not in (s := worker_sockets(gw)) and len(s) == 2,
                                "the dead worker replaced")
        assert '"worker died: restarting"' in gw.logs()
        freed = 0
        for _ in range(PER_ADDRESS + 3):
            ws, code = await open_idle(gw, address)
            held.append(ws)
            if code is None:
                freed += 1
            else:
                assert code == 4429
        assert freed == split[victim]
        m = scrape(gw)
        assert m[("novagate_worker_restarts_total", ())] == 1 and m[("novagate_workers", ())] == 2
    finally:
        for ws in held:
            await ws.close()


async def test_sessions_spread_over_workers_and_resume_on_another(gw):
    """Both workers serve sessions, and a resume token minted by one is honoured by the other.

    Whichever worker accepts first takes a connection, and an idle one drains the whole accept queue:
    at low load one worker may take every session (under load, the busy one takes fewer). So the
    test makes the choice: it stops the first worker (SIGSTOP) while the next connection arrives."""
    sessions = []
    try:
        ws, first = await start_session(gw, "127.0.3.1")
        minted_on = session_worker(gw, first["session_id"])
        sessions.append((ws, first, minted_on))
        os.kill(minted_on, signal.SIGSTOP)
        try:
            ws, ready = await start_session(gw, "127.0.3.2")
        finally:
            os.kill(minted_on, signal.SIGCONT)
        other = session_worker(gw, ready["session_id"])
        sessions.append((ws, ready, other))
        assert other != minted_on
        pids = Counter(pid for *_, pid in sessions)
        await asyncio.to_thread(wait_for, lambda: worker_sockets(gw) == dict(pids), f"sockets per worker {pids}")
        for ws, *_ in sessions:
            await ws.close()
        sessions.clear()

        os.kill(minted_on, signal.SIGSTOP)  # the token minted on one worker, presented to the other
        try:
            ws, again = await start_session(gw, "127.0.4.1", resume=first["resume_token"])
        finally:
            os.kill(minted_on, signal.SIGCONT)
        await ws.close()
        assert session_worker(gw, again["session_id"]) == other
        assert again["resumed"] and again["conversation_id"] == first["conversation_id"], again
    finally:
        for ws, *_ in sessions:
            await ws.close()


def cpu_and_rss(pids) -> tuple[float, float]:
    ticks, page = os.sysconf("SC_CLK_TCK"), os.sysconf("SC_PAGE_SIZE")
    cpu = rss = 0.0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            parts = f.read().rsplit(")", 1)[1].split()
        cpu += (int(parts[11]) + int(parts[12])) / ticks
        rss += int(parts[21]) * page
    return cpu, rss


async def test_metrics_add_the_workers_up(gw):
    sessions = []
    try:
        for n in range(1, 5):
            sessions.append(await start_session(gw, f"127.0.5.{n}"))
        await settled_sockets(gw, len(sessions))
        pids = [gw.proc.pid, *worker_sockets(gw)]

        def consistent():  # every worker's figures caught up (each updates its own every 125 ms)
            m = scrape(gw)
            per_worker = [v for (name, _), v in m.items() if name == "novagate_worker_sockets"]
            return m if m[("novagate_sessions_active", ())] == sum(per_worker) == len(sessions) else None

        await asyncio.to_thread(wait_for, consistent, "sessions_active, the sum of the workers' sockets")
        cpu_before, rss_before = cpu_and_rss(pids)
        m = scrape(gw)
        cpu_after, rss_after = cpu_and_rss(pids)
        assert m[("novagate_sessions_total", ())] >= len(sessions)  # every worker's, the dead one's included
        assert ("novagate_event_loop_lag_seconds_count", ()) in m
        # process_*: the supervisor and both workers (plus the CPU of the worker killed above)
        assert m[("process_cpu_seconds_total", ())] >= cpu_before - 0.05
        assert m[("process_resident_memory_bytes", ())] >= 0.8 * min(rss_before, rss_after)
        assert m[("process_resident_memory_bytes", ())] > 1.5 * max(cpu_and_rss([p])[1] for p in pids)
    finally:
        for ws, _ in sessions:
            await ws.close()


async def test_sigterm_drains_every_worker_then_exits_0(gw):
    sessions = []
    for n in range(1, 31):
        ws, ready = await start_session(gw, f"127.0.6.{n}")
        sessions.append((ws, session_worker(gw, ready["session_id"])))
        if len({pid for _, pid in sessions}) == 2:
            break
    workers = {pid for _, pid in sessions}
    assert len(workers) == 2
    gw.proc.send_signal(signal.SIGTERM)

    async def told(ws) -> tuple[str | None, int | None]:
        notice = None
        try:
            while True:
                msg = orjson.loads(await asyncio.wait_for(ws.recv(), 30))
                if msg["type"] == "session.reconnect":
                    notice = msg["reason"]
        except websockets.ConnectionClosed:
            return notice, ws.close_code

    results = await asyncio.gather(*(told(ws) for ws, _ in sessions))
    assert all(r == ("draining", 1012) for r in results), results
    assert await asyncio.to_thread(gw.proc.wait, 60) == 0
    logs = gw.logs()
    drained = {json.loads(line)["pid"] for line in logs.splitlines() if '"msg":"drained"' in line}
    assert workers <= drained
    for pid in workers:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
