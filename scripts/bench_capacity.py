"""Capacity, side by side: CPU per talking session on the Bedrock wire path, this tree against another
(an earlier commit checked out in a `git worktree`), on one Nova emulator (scripted engine), one load
(`novagate loadtest`: open-mic real-time speech, 20 ms frames, permessage-deflate offered as browsers
do) and one machine, in rounds A B A B; --scripted adds this tree with the scripted engine inside the
gateway. Optionally, overload: N sessions against this tree's gateway with its health-based
admission, and what the admitted ones measure.

    python scripts/bench_capacity.py --baseline /tmp/old --sessions 10,20 --rounds 2
    python scripts/bench_capacity.py --overload 60 --sessions 10

The baseline runs with its own virtualenv when it has one (`make venv` in the worktree): what that
commit shipped, not this tree's dependencies. Figures are % of one core per session, from the
gateway processes' /proc CPU time over the steady part of each run (after --warmup seconds).
Run it on a quiet machine; it prints ratios, never asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.loadtest.runner import Options, run  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_cpu_s(pid: int) -> float:
    """CPU seconds of a process and its children (worker processes)."""
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(entry) == pid or int(fields[1]) == pid:
            total += (int(fields[11]) + int(fields[12])) / TICK
    return total


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return 0.0


def start_emulator(streams: int) -> tuple[subprocess.Popen, str, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "emulate", "nova", "--engine", "scripted", "--port", "0",
         "--max-concurrent-streams", str(streams)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    endpoint = bundle = None
    for line in proc.stdout:
        if m := re.search(r"AWS_ENDPOINT_URL_BEDROCK_RUNTIME=(\S+)", line):
            endpoint = m.group(1)
        if m := re.search(r"SSL_CERT_FILE=(\S+)", line):
            bundle = m.group(1)
        if "AWS_REGION" in line:
            break
    if not endpoint or not bundle:
        raise SystemExit("the Nova emulator did not start")
    return proc, endpoint, bundle


class Gateway:
    def __init__(self, name: str, tree: Path, endpoint: str, bundle: str, extra: dict[str, str]):
        venv = tree / ".venv" / "bin" / "python"
        self.name = name
        self.python = str(venv) if venv.exists() else sys.executable
        self.port = free_port()
        self.url = f"ws://127.0.0.1:{self.port}/v1/voice"
        self.env = dict(
            os.environ, PYTHONPATH=str(tree), AWS_ENDPOINT_URL_BEDROCK_RUNTIME=endpoint, SSL_CERT_FILE=bundle,
            AWS_ACCESS_KEY_ID="AKIDNOVAGATEEMULATOR", AWS_SECRET_ACCESS_KEY="novagate-emulator-secret",
            AWS_REGION="us-east-1", NOVAGATE_ENGINE="bedrock", NOVAGATE_STORE="sqlite",
            NOVAGATE_SQLITE_PATH=f"/tmp/novagate-bench-capacity-{self.port}.db", NOVAGATE_PORT=str(self.port),
            NOVAGATE_METRICS_PORT="0", NOVAGATE_LOG_LEVEL="warning", NOVAGATE_MAX_SOCKETS_PER_IP="0",
            NOVAGATE_WORKERS="1", NOVAGATE_MAX_SESSIONS="10000")
        self.env.update(extra)
        self.tree = tree
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Gateway:
        self.proc = subprocess.Popen([self.python, "-m", "gateway.cli", "serve"], cwd=self.tree, env=self.env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.2)
        raise SystemExit(f"{self.name}: the gateway did not start")

    def __exit__(self, *exc) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        Path(self.env["NOVAGATE_SQLITE_PATH"]).unlink(missing_ok=True)


async def measure(gw: Gateway, sessions: int, warmup: float, window: float) -> dict:
    """Load `sessions` talking users for warmup + window seconds; CPU over the window only."""
    opts = Options(url=gw.url, sessions=sessions, ramp=min(warmup / 2, sessions * 0.1),
                   duration=warmup + window, processes=1, seed=1)
    load = asyncio.create_task(run(opts))
    await asyncio.sleep(warmup)
    c0, t0 = tree_cpu_s(gw.proc.pid), time.monotonic()
    await asyncio.sleep(window)
    c1, t1 = tree_cpu_s(gw.proc.pid), time.monotonic()
    rss = rss_mb(gw.proc.pid)
    summary = (await load).to_dict()
    cpu = (c1 - c0) / (t1 - t0) * 100
    speech = summary["latency_ms"]["speech"]
    return {
        "cpu_pct": round(cpu, 1), "cpu_pct_per_session": round(cpu / sessions, 2), "rss_mb": round(rss, 1),
        "connected": summary["sessions"].get("connected"), "refused": summary["sessions"].get("refused"),
        "turns": summary["turns"]["count"], "eos_to_audio_p50_ms": speech["p50"],
        "eos_to_audio_p99_ms": speech["p99"], "gaps": summary["audio"].get("gaps"),
        "errors": summary["errors"],
    }


def line(name: str, n: int, r: dict) -> str:
    return (f"  {name:<10} {n:>3} sessions: {r['cpu_pct']:5.1f} % of a core = {r['cpu_pct_per_session']:.2f} %/session, "
            f"rss {r['rss_mb']:.0f} MB, {r['turns']} turns, end of speech -> audio p50 {r['eos_to_audio_p50_ms']} ms "
            f"p99 {r['eos_to_audio_p99_ms']} ms, refused {r['refused']}")


async def side_by_side(args, endpoint: str, bundle: str) -> dict:
    variants = [("current", ROOT, {})]
    if args.scripted:
        variants.append(("scripted", ROOT, {"NOVAGATE_ENGINE": "scripted"}))
    if args.baseline:
        variants.insert(0, ("baseline", Path(args.baseline).resolve(), {}))
    results: dict = {}
    for n in args.sessions:
        for rnd in range(args.rounds):
            for name, tree, extra in variants:
                with Gateway(name, tree, endpoint, bundle, extra) as gw:
                    r = await measure(gw, n, args.warmup, args.window)
                results.setdefault(str(n), {}).setdefault(name, []).append(r)
                print(line(name, n, r), flush=True)
    print("\nCPU per session (mean of rounds)")
    for n, by in results.items():
        means = {k: sum(x["cpu_pct_per_session"] for x in v) / len(v) for k, v in by.items()}
        ratio = f"  current/baseline {means['current'] / means['baseline']:.2f}" if "baseline" in means else ""
        print(f"  {n:>3} sessions: " + ", ".join(f"{k} {v:.2f} %" for k, v in means.items()) + ratio)
    return results


async def overload(args, endpoint: str, bundle: str) -> dict:
    """Unloaded latency at the first --sessions figure, then --overload sessions with admission on."""
    out = {}
    with Gateway("unloaded", ROOT, endpoint, bundle, {}) as gw:
        out["unloaded"] = await measure(gw, args.sessions[0], args.warmup, args.window)
        print(line("unloaded", args.sessions[0], out["unloaded"]), flush=True)
    with Gateway("overload", ROOT, endpoint, bundle, {"NOVAGATE_MAX_SESSIONS": "1000"}) as gw:
        out["overload"] = await measure(gw, args.overload, args.warmup, args.window)
        print(line("overload", args.overload, out["overload"]), flush=True)
    u, o = out["unloaded"]["eos_to_audio_p99_ms"], out["overload"]["eos_to_audio_p99_ms"]
    if u is not None and o is not None:
        print(f"\n  admitted {out['overload']['connected']} of {args.overload}, refused {out['overload']['refused']}; "
              f"p99 {o} ms vs {u} ms unloaded ({o - u:+.0f} ms)")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", help="another checkout (git worktree) to compare with")
    p.add_argument("--sessions", default="10,20", help="session counts, comma-separated (default 10,20)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--warmup", type=float, default=12.0, help="seconds before CPU is measured")
    p.add_argument("--window", type=float, default=30.0, help="seconds CPU is measured over")
    p.add_argument("--scripted", action="store_true",
                   help="also run this tree with the scripted engine inside the gateway (no Bedrock wire path)")
    p.add_argument("--overload", type=int, default=0, help="also run this many sessions against admission")
    p.add_argument("--streams-per-connection", type=int, default=100,
                   help="the emulator's SETTINGS_MAX_CONCURRENT_STREAMS (default 100, as Bedrock)")
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--plot", help="draw CPU per session and latency to this SVG (needs matplotlib)")
    args = p.parse_args()
    args.sessions = [int(x) for x in args.sessions.split(",")]
    emu, endpoint, bundle = start_emulator(args.streams_per_connection)
    try:
        print(f"Nova emulator (scripted engine) at {endpoint}; load: novagate loadtest, {os.cpu_count()} CPUs")
        results = {"side_by_side": asyncio.run(side_by_side(args, endpoint, bundle))}
        if args.overload:
            results["overload"] = asyncio.run(overload(args, endpoint, bundle))
    finally:
        emu.send_signal(signal.SIGINT)
        emu.wait(10)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    if args.plot:
        plot(results["side_by_side"], args.plot)
    return 0


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = list(results)
    names = list(next(iter(results.values())))
    fig, (cpu_ax, lat_ax) = plt.subplots(1, 2, figsize=(9, 3.4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        xs = [j + i * width for j in range(len(counts))]
        cpu = [sum(r["cpu_pct_per_session"] for r in results[n][name]) / len(results[n][name]) for n in counts]
        p99 = [max(r["eos_to_audio_p99_ms"] or 0 for r in results[n][name]) for n in counts]
        cpu_ax.bar(xs, cpu, width, label=name)
        lat_ax.bar(xs, p99, width, label=name)
    for ax, title in ((cpu_ax, "CPU per talking session (% of one core)"),
                      (lat_ax, "end of speech -> first audio, p99 (ms)")):
        ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(counts))], [f"{n} sessions" for n in counts])
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    sys.exit(main())
