#!/usr/bin/env python3
"""Sessions per machine with 1 and with 2 worker processes (`novagate serve --workers N`).

A gateway on the scripted engine (NOVAGATE_ENGINE=scripted: the engine costs next to nothing, so what
is measured is the gateway itself) is driven by `novagate loadtest` (gateway/loadtest: real-time
scripted voice users speaking protocol v1, deflate on as browsers do), once per worker count:

- **ramp** (how many sessions it sustains): `--rate` new sessions per second, up to `--sessions`.
  The gateway's overload gate (gateway/health.py, default limits) decides how many it takes: once a
  worker's event loop runs late or its CPU is spent it refuses new sockets (1013 `overloaded`)
  while the admitted ones keep talking. Reported: sessions admitted and talking at once, what they
  got (end-of-speech -> first-audio latency, audio gaps, errors), what the gateway used; and how
  many were up when the clients' experience last held (`--quality-p95-ms` latency p95 over the last
  10 s, and at most one audio gap in any 10 s).
- **fixed** (CPU headroom at a fixed load): `--fixed-sessions` talking sessions, the overload gate off;
  the gateway's CPU (summed over the supervisor and its workers, from /metrics), its event-loop lag
  and what the clients got, so the headroom left (worker cores minus cores used) can be compared.

The load generator runs on the same machine (about one core per 150 sessions): on a small machine it
takes CPU from the gateway, so each result says whether the generator itself fell behind (its
latencies are then partly its own). Figures are printed, never asserted.

    .venv/bin/python scripts/bench_workers.py [--mode both|ramp|fixed] [--workers 1,2]
        [--sessions 240 --rate 2 --duration 150] [--fixed-sessions 40 --fixed-duration 60]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.loadtest import Options, run  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metrics(url: str) -> dict[str, float]:
    """name{labels} -> value (text format, no parser needed for these)."""
    out = {}
    for line in httpx.get(url, timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


class Gateway:
    def __init__(self, workers: int, tmp: Path, extra_env: dict[str, str]):
        self.port, self.admin = free_port(), free_port()
        self.workers = workers
        self.log = tmp / f"gateway-{workers}w.log"
        self.env = {
            **os.environ,
            "NOVAGATE_HOST": "127.0.0.1", "NOVAGATE_PORT": str(self.port), "NOVAGATE_METRICS_PORT": str(self.admin),
            "NOVAGATE_ENGINE": "scripted", "NOVAGATE_STORE": "sqlite",
            "NOVAGATE_SQLITE_PATH": str(tmp / f"novagate-{workers}w.db"), "NOVAGATE_SECRET_FILE": str(tmp / "secret"),
            "NOVAGATE_WORKERS": str(workers),
            "NOVAGATE_MAX_SOCKETS_PER_IP": "0",       # every simulated user comes from 127.0.0.1
            "NOVAGATE_MAX_SESSIONS": "10000",         # the overload gate is what limits, not the cap
            "NOVAGATE_MAX_PENDING_HANDSHAKES": "0",
            "NOVAGATE_LOG_LEVEL": "warning",
            **extra_env,
        }
        self.proc: subprocess.Popen | None = None

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.admin}/metrics"

    def start(self) -> Gateway:
        self.proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve"], env=self.env, cwd=ROOT,
                                     stdout=open(self.log, "wb"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                m = metrics(self.metrics_url)
                if sum(1 for k in m if k.startswith("novagate_worker_sockets")) >= self.workers:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("gateway did not start")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def bench(workers: int, args, tmp: Path, *, fixed: bool) -> dict:
    env = dict(kv.split("=", 1) for kv in args.env)
    if fixed:  # every session admitted: the load is the same for every worker count
        env = {"NOVAGATE_OVERLOAD_LAG_MS": "0", "NOVAGATE_OVERLOAD_CPU": "0", **env}
    gw = Gateway(workers, tmp, env).start()
    try:
        common = dict(url=f"ws://127.0.0.1:{gw.port}/v1/voice", think=args.think, metrics_urls=[gw.metrics_url],
                      processes=args.processes, seed=1)
        if fixed:
            options = Options(sessions=args.fixed_sessions, ramp=min(10.0, args.fixed_duration / 3),
                              duration=args.fixed_duration, **common)
        else:
            options = Options(sessions=args.sessions, rate=args.rate, duration=args.duration, **common)
        summary = await run(options)
        m = metrics(gw.metrics_url)
    except Exception:
        print(f"bench_workers: the run failed; the gateway's log ends:\n{gw.log.read_text()[-4000:]}", file=sys.stderr)
        raise
    finally:
        gw.stop()
    d = summary.to_dict()
    server = d["server"] or {}
    return {
        "mode": "fixed" if fixed else "ramp",
        "workers": workers,
        "quality_held": quality_held(d["timeline"], args.quality_p95_ms),
        "offered": d["sessions"]["started"],
        "admitted": d["sessions"]["connected"],
        "peak": d["sessions"]["peak_concurrent"],
        "refused": d["sessions"]["refused"],
        "failed": d["sessions"]["failed"],
        "dropped": d["sessions"]["dropped"],
        "overload_refusals": m.get('novagate_sessions_rejected_total{reason="overload"}', 0.0),
        "turns": d["turns"]["count"],
        "latency_ms": d["latency_ms"]["speech"],
        "gaps": d["audio"]["gaps"],
        "turns_with_gaps": d["audio"]["turns_with_gaps"],
        "errors": d["errors"]["total"],
        "errors_by": {**d["errors"]["by_code"], **{f"close {k}": v for k, v in d["errors"]["by_close_code"].items()},
                      **({"turn timeouts": d["errors"]["turn_timeouts"]} if d["errors"]["turn_timeouts"] else {})},
        "cpu_cores": (server.get("cpu_cores") or {}),
        "rss_mb": round((server.get("rss_bytes") or {}).get("max", 0) / 2**20),
        "loop_lag_ms": server.get("event_loop_lag_ms") or {},
        "client_overloaded": d["client"].get("overloaded"),
        "client_loop_lag_p99_ms": (d["client"].get("loop_lag_ms") or {}).get("p99"),
    }


def quality_held(timeline: list[dict], p95_limit_ms: float) -> int:
    """The most sessions up while, over every 10 s so far, the latency p95 stayed under the limit and
    at most one audio gap came."""
    best, gaps_at = 0, []
    for p in timeline:
        gaps_at = [(t, g) for t, g in gaps_at if t > p["t"] - 10.0] + [(p["t"], p["gaps"])]
        p95 = p.get("latency_p95_ms")
        if gaps_at[-1][1] - gaps_at[0][1] > 1 or (p95 is not None and p95 > p95_limit_ms):
            break
        best = max(best, p["sessions_up"])
    return best


def show(r: dict) -> str:
    lat, lag, cpu = r["latency_ms"], r["loop_lag_ms"], r["cpu_cores"]
    head = (f"{r['peak']:4d} sessions at once ({r['admitted']} admitted of {r['offered']} offered; {r['refused']} "
            f"refused, {r['overload_refusals']:.0f} of them for overload; {r['dropped']} dropped, {r['failed']} failed); "
            f"clients' experience held up to {r['quality_held']}"
            if r["mode"] == "ramp" else
            f"{r['peak']:4d} sessions at once; headroom {r['workers'] - (cpu.get('mean') or 0):.2f} of {r['workers']} "
            f"worker cores ({r['dropped']} dropped, {r['failed']} failed)")
    errors = ", ".join(f"{k}: {v}" for k, v in r["errors_by"].items()) or "none"
    return (f"  {r['mode']:5s} {r['workers']} worker{'s' if r['workers'] > 1 else ' '}: {head}\n"
            f"        clients  latency p50 {lat.get('p50')} ms p95 {lat.get('p95')} ms over {r['turns']} turns; "
            f"{r['gaps']} audio gaps > 100 ms in {r['turns_with_gaps']} turns; errors: {errors}\n"
            f"        gateway  cpu {cpu.get('mean')} cores mean, {cpu.get('max')} max; rss {r['rss_mb']} MB; "
            f"event-loop lag p95 {lag.get('p95')} ms p99 {lag.get('p99')} ms\n"
            f"        load generator  loop lag p99 {r['client_loop_lag_p99_ms']} ms"
            f"{' (it fell behind: latencies and gaps are partly its own)' if r['client_overloaded'] else ''}")


async def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=("both", "ramp", "fixed"), default="both")
    p.add_argument("--workers", default="1,2", help="worker counts to compare (default 1,2)")
    p.add_argument("--fixed-sessions", type=int, default=40, help="fixed mode: talking sessions (default 40)")
    p.add_argument("--fixed-duration", type=float, default=60.0, help="fixed mode: seconds per run (default 60)")
    p.add_argument("--sessions", type=int, default=240, help="sessions offered at most (default 240)")
    p.add_argument("--rate", type=float, default=2.0, help="new sessions per second (default 2)")
    p.add_argument("--duration", type=float, default=150.0, help="seconds per run (default 150)")
    p.add_argument("--quality-p95-ms", type=float, default=1200.0,
                   help="ramp: latency p95 (last 10 s) the clients' experience must stay under (default 1200; the "
                   "scripted engine's endpointing alone is about 770)")
    p.add_argument("--think", type=float, default=1.0, help="silence between a reply and the next turn")
    p.add_argument("--processes", type=int, default=1, help="load generator processes (default 1)")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="extra gateway setting, e.g. NOVAGATE_OVERLOAD_CPU=0.9 (repeatable)")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args()
    counts = [int(n) for n in args.workers.split(",")]
    print(f"bench_workers: {os.cpu_count()} CPUs, scripted engine. ramp: {args.rate:g} new sessions/s up to "
          f"{args.sessions} for {args.duration:g} s, overload gate at its defaults; fixed: {args.fixed_sessions} "
          f"sessions for {args.fixed_duration:g} s, gate off", flush=True)
    results = []
    modes = {"both": (False, True), "ramp": (False,), "fixed": (True,)}[args.mode]
    with tempfile.TemporaryDirectory(prefix="novagate-bench-workers-") as tmp:
        for fixed in modes:
            for n in counts:
                r = await bench(n, args, Path(tmp), fixed=fixed)
                results.append(r)
                print(show(r), flush=True)
    ramps = [r for r in results if r["mode"] == "ramp"]
    if len(ramps) > 1 and ramps[0]["peak"] and ramps[0]["quality_held"]:
        for r in ramps[1:]:
            print(f"  ramp: {r['workers']} workers admitted {r['peak'] / ramps[0]['peak']:.2f}x the sessions of "
                  f"{ramps[0]['workers']}, with the clients' experience intact "
                  f"{r['quality_held'] / ramps[0]['quality_held']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
