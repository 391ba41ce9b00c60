"""A load test: N simulated users started over a ramp, kept talking for the duration, the gateway's
/metrics scraped beside them, a live progress line, and the `Summary` at the end.

    from gateway.loadtest import Options, run
    summary = await run(Options(url="ws://127.0.0.1:8000/v1/voice", sessions=50, ramp=10, duration=120))
    print(summary.latency_ms["speech"]["p95"])

One Python process drives about 150 real-time sessions per core comfortably (a frame every 20 ms each);
beyond that the users are spread over several generator processes (`processes`; 0: one per 150
sessions, at most one per core), which report to this one. A script that calls `run()` with more than
one process needs the usual `if __name__ == "__main__":` guard (worker processes are spawned).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import math
import multiprocessing
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import TextIO

from protocol.messages import CODEC_OUTPUT_RATES, CODECS

from ..client import codec_output_rate
from .client import SimUser
from .metrics import RSS, Scraper
from .report import Summary, build, percentiles
from .script import Plan, load_speech, normalize_url
from .state import Totals, TurnRecord, UserStats

WINDOW_S = 10.0            # rolling window of the progress line's and the timeline's latency quantiles
SESSIONS_PER_PROCESS = 150  # `processes=0`: one generator process per this many sessions
SNAPSHOT_S = 0.25


@dataclass
class Options:
    url: str = "ws://127.0.0.1:8000/v1/voice"
    sessions: int = 10
    ramp: float = 0.0                # seconds over which the sessions start, evenly
    rate: float | None = None        # or: sessions started per second (wins over ramp)
    duration: float = 60.0           # seconds from the first session's start to the end of the run
    wav: str | None = None           # 16-bit mono WAV; None: the bundled utterance
    text_every: int = 0              # every K-th turn typed (input.text); 0: none
    reconnect_every: float = 0.0     # close and resume (resume token) this often, between turns; 0: never
    think: float = 1.0               # silence after a reply has played, before the next turn
    turn_timeout: float = 30.0       # end of speech to the end of the reply, at most
    token: str | None = None         # bearer token (Authorization header)
    output_rate: int | None = None   # audio.output_sample_rate; None: 24 kHz (mu-law: 8 kHz)
    voice: str | None = None
    codec: str = "pcm16"             # audio both ways: pcm16 | opus | mulaw (docs/protocol.md#audio-codecs)
    gap_ms: float = 100.0            # received audio this far behind real-time playback is a gap
    deflate: bool = True             # offer permessage-deflate, as browsers do
    metrics_urls: list[str] = field(default_factory=list)
    metrics_interval: float = 1.0
    processes: int = 0               # generator processes; 0: one per 150 sessions, at most one per core
    seed: int | None = None
    stop_timeout: float = 10.0       # at the end, how long sessions get to close

    def check(self) -> None:
        """ValueError for a codec the protocol does not have, or an output rate it does not take."""
        if self.codec not in CODECS:
            raise ValueError(f"--codec {self.codec}: one of {', '.join(CODECS)}")
        if self.codec != "pcm16" and self.rate_out not in CODEC_OUTPUT_RATES[self.codec]:
            raise ValueError(f"{self.codec} comes at {' or '.join(map(str, CODEC_OUTPUT_RATES[self.codec]))} Hz, "
                             f"not --output-rate {self.output_rate}")

    @property
    def rate_out(self) -> int:
        """The output rate asked for: `output_rate`, or the codec's default."""
        return codec_output_rate(self.codec, self.output_rate)

    def start_offsets(self) -> list[float]:
        if self.rate and self.rate > 0:
            return [i / self.rate for i in range(self.sessions)]
        if self.ramp > 0 and self.sessions > 1:
            return [i * self.ramp / self.sessions for i in range(self.sessions)]
        return [0.0] * self.sessions

    def process_count(self) -> int:
        if self.processes > 0:
            return min(self.processes, self.sessions)
        return max(1, min(os.cpu_count() or 1, math.ceil(self.sessions / SESSIONS_PER_PROCESS)))

    def public(self) -> dict:
        """The options as recorded in the summary (never the token)."""
        d = dataclasses.asdict(self)
        d["token"] = bool(self.token)
        d["processes"] = self.process_count()
        d["output_rate"] = self.rate_out
        return d


# -- one generator: the users of one process ---------------------------------------------------------
class Generator:
    """Some of the run's users (`indices`), in this process's event loop."""

    def __init__(self, options: Options, indices: list[int], seeds: list[float], offsets: list[float]):
        url = normalize_url(options.url)
        speech = load_speech(options.wav, options.codec)
        plan = Plan(text_every=options.text_every, reconnect_every=options.reconnect_every, think=options.think,
                    turn_timeout=options.turn_timeout)
        self.options = options
        self.offsets = offsets
        self.records: list[TurnRecord] = []
        self.loop_lags: list[float] = []
        self._sent = 0  # records already handed to the parent (snapshot)
        self.users = [SimUser(i, url, speech, plan, token=options.token, output_rate=options.rate_out,
                              gap_threshold=options.gap_ms / 1000, voice=options.voice, on_turn=self.records.append,
                              rng=random.Random(seed), deflate=options.deflate, output_codec=options.codec)
                      for i, seed in zip(indices, seeds)]

    async def run(self, t0: float, stop: asyncio.Event) -> None:
        lag_stop = asyncio.Event()
        lag = asyncio.create_task(_loop_lag(lag_stop, self.loop_lags))

        async def user(u: SimUser, offset: float) -> None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, t0 + offset - time.monotonic()))
            if not stop.is_set():
                await u.run(stop)

        tasks = [asyncio.create_task(user(u, off)) for u, off in zip(self.users, self.offsets)]
        try:
            await stop.wait()
        finally:
            _, pending = await asyncio.wait(tasks, timeout=self.options.stop_timeout) if tasks else (set(), set())
            for t in pending:
                t.cancel()
            lag_stop.set()
            await asyncio.gather(*pending, lag, return_exceptions=True)

    def inflight(self) -> list[TurnRecord]:
        """Turns whose reply has started but not ended: their latency is known already."""
        return [u.state.turn.record for u in self.users
                if u.state.turn is not None and u.state.turn.record.latency is not None]

    def counts(self) -> dict:
        st = [u.stats for u in self.users]
        errors = sum(sum(u.state.errors.values()) for u in self.users)
        errors += sum(sum(s.close_codes.values()) for s in st)
        errors += sum(1 for r in self.records if r.outcome == "timeout")
        return {
            "up": sum(1 for s in st if s.status in ("up", "reconnecting")),
            "refused": sum(1 for s in st if s.outcome == "refused"),
            "failed": sum(1 for s in st if s.outcome == "failed"),
            "dropped": sum(1 for s in st if s.outcome == "dropped"),
            "turns": sum(1 for r in self.records if r.latency is not None) + len(self.inflight()),
            "errors": errors,
            "gaps": sum(r.gaps for r in self.records),
        }

    def snapshot(self) -> dict:
        new, self._sent = self.records[self._sent:], len(self.records)
        return {"counts": self.counts(), "records": new, "inflight": self.inflight()}

    def result(self) -> dict:
        return {"records": self.records[self._sent:], "stats": [u.stats for u in self.users],
                "totals": Totals.of([u.state for u in self.users]), "loop_lags": self.loop_lags}


class Tally:
    """The run so far, across generators: what the progress line and the timeline read."""

    def __init__(self, planned: int):
        self.planned = planned
        self.records: list[TurnRecord] = []
        self.parts: dict[int, dict] = {}      # generator -> its last counts
        self.inflight: dict[int, list] = {}   # generator -> its turns under way
        self.peak_up = 0

    def update(self, gen: int, snap: dict) -> None:
        self.records.extend(snap["records"])
        self.parts[gen] = snap["counts"]
        self.inflight[gen] = snap["inflight"]
        self.peak_up = max(self.peak_up, self.counts()["up"])

    def counts(self) -> dict:
        out = {"up": 0, "refused": 0, "failed": 0, "dropped": 0, "turns": 0, "errors": 0, "gaps": 0}
        for c in self.parts.values():
            for k in out:
                out[k] += c.get(k, 0)
        return out

    def window(self, now: float, seconds: float | None = WINDOW_S) -> dict:
        turns = self.records + [r for rs in self.inflight.values() for r in rs]
        return percentiles([r.latency for r in turns if r.latency is not None and r.kind == "speech"
                            and (seconds is None or now - r.first_audio_at <= seconds)])


class Progress:
    """One updating line on a terminal; a line every few seconds otherwise (CI logs)."""

    def __init__(self, stream: TextIO | None, planned: int):
        self.stream = stream
        self.tty = bool(stream is not None and stream.isatty())
        self.interval = 0.5 if self.tty else 5.0
        self.planned = planned
        self._last = 0.0
        self._width = 0

    def show(self, elapsed: float, tally: Tally, scraper: Scraper | None, now: float, final: bool = False) -> None:
        if self.stream is None or (not final and now - self._last < self.interval):
            return
        self._last = now
        c = tally.counts()
        lat = tally.window(now, None)
        line = (f"[{elapsed:6.1f}s] sessions {c['up']}/{self.planned} up"
                + (f", {c['refused']} refused" if c["refused"] else "")
                + (f", {c['failed']} failed" if c["failed"] else "")
                + (f", {c['dropped']} dropped" if c["dropped"] else "")
                + f" | turns {c['turns']} | errors {c['errors']}"
                + (f" | eos->audio p50 {lat['p50']:.0f} ms p95 {lat['p95']:.0f} ms" if lat["count"] else ""))
        if scraper is not None and scraper.scrapes:
            cpu, rss = scraper.cpu_now(), scraper.latest(RSS)
            if cpu is not None:
                line += f" | cpu {cpu:.2f}"
            if rss is not None:
                line += f" rss {rss / 2**20:.0f} MB"
        if self.tty:
            pad = max(0, self._width - len(line))
            self._width = len(line)
            self.stream.write("\r" + line + " " * pad + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


async def _loop_lag(stop: asyncio.Event, into: list[float], period: float = 0.1) -> None:
    """How late this process's own event loop runs: a busy load generator measures itself, not the gateway."""
    while not stop.is_set():
        t = time.monotonic()
        await asyncio.sleep(period)
        into.append(max(0.0, time.monotonic() - t - period))


# -- generator processes ------------------------------------------------------------------------------
class _Local:
    """The users in this process."""

    def __init__(self, gen: Generator):
        self.gen = gen
        self.stop = asyncio.Event()
        self.task: asyncio.Task | None = None

    async def start(self, t0: float) -> None:
        self.task = asyncio.create_task(self.gen.run(t0, self.stop))

    def poll(self, tally: Tally) -> None:
        tally.update(0, self.gen.snapshot())

    async def finish(self, tally: Tally) -> list[dict]:
        tally.update(0, self.gen.snapshot())  # the peak, before the sessions close
        self.stop.set()
        if self.task is not None:
            await self.task
        return [self.gen.result()]


def _worker(options: Options, indices: list[int], seeds: list[float], offsets: list[float], conn) -> None:
    """A generator process: ready, wait for the start time, snapshots every SNAPSHOT_S, the result at the end."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it stops us

    async def main() -> None:
        gen = Generator(options, indices, seeds, offsets)
        conn.send(("ready", None))
        kind, t0 = await asyncio.to_thread(conn.recv)
        if kind != "start":
            return
        stop = asyncio.Event()
        task = asyncio.create_task(gen.run(t0, stop))
        while not stop.is_set():
            await asyncio.sleep(SNAPSHOT_S)
            while conn.poll():
                if conn.recv()[0] == "stop":
                    stop.set()
            conn.send(("tick", gen.snapshot()))
        await task
        conn.send(("done", gen.result()))

    try:
        asyncio.run(main())
    except Exception as e:  # noqa: BLE001 — reported to the parent, which goes on without us
        with contextlib.suppress(Exception):
            conn.send(("failed", f"{type(e).__name__}: {e}"))


class _Workers:
    """The users in generator processes (spawned: no inherited event loop or threads)."""

    def __init__(self, options: Options, groups: list[tuple[list[int], list[float], list[float]]]):
        ctx = multiprocessing.get_context("spawn")
        self.options = options
        self.conns, self.procs = [], []
        for indices, seeds, offsets in groups:
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker, args=(options, indices, seeds, offsets, child), daemon=True,
                            name="novagate-loadtest")
            p.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(p)
        self.results: dict[int, dict] = {}
        self.errors: list[str] = []

    async def ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        waiting = set(range(len(self.conns)))
        while waiting:
            for i in list(waiting):
                if self.conns[i].poll():
                    kind, detail = self.conns[i].recv()
                    if kind == "failed":
                        raise RuntimeError(f"load generator process {i} failed: {detail}")
                    waiting.discard(i)
                elif not self.procs[i].is_alive():
                    raise RuntimeError(f"load generator process {i} exited ({self.procs[i].exitcode})")
            if time.monotonic() > deadline:
                raise RuntimeError("load generator processes did not start")
            await asyncio.sleep(0.05)

    async def start(self, t0: float) -> None:
        for c in self.conns:
            c.send(("start", t0))

    def poll(self, tally: Tally) -> None:
        for i, c in enumerate(self.conns):
            if i in self.results:
                continue
            try:
                while c.poll():
                    kind, body = c.recv()
                    if kind == "tick":
                        tally.update(i, body)
                    elif kind == "done":
                        self.results[i] = body
                    elif kind == "failed":
                        self.errors.append(f"process {i}: {body}")
                        self.results[i] = {}
            except (EOFError, OSError):
                self.results.setdefault(i, {})

    async def finish(self, tally: Tally) -> list[dict]:
        self.poll(tally)
        for c in self.conns:
            with contextlib.suppress(OSError):
                c.send(("stop", None))
        deadline = time.monotonic() + self.options.stop_timeout + 15
        while len(self.results) < len(self.conns) and time.monotonic() < deadline:
            self.poll(tally)
            for i, p in enumerate(self.procs):
                if not p.is_alive() and not self.conns[i].poll():
                    self.results.setdefault(i, {})
            await asyncio.sleep(0.05)
        for p in self.procs:
            p.join(2)
            if p.is_alive():
                p.terminate()
        for i in range(len(self.conns)):
            if not self.results.get(i):
                self.errors.append(f"process {i} returned no result")
        return [r for r in self.results.values() if r]

    def abort(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.terminate()


# -- the run ------------------------------------------------------------------------------------------
async def run(options: Options, *, progress: TextIO | None = None, stop: asyncio.Event | None = None) -> Summary:
    """Run the load test described by `options`; `progress`: where the live line goes (None: nowhere);
    `stop`: set it to end the run early (Ctrl-C does, in the main thread). Returns the summary."""
    url = normalize_url(options.url)
    options.check()
    load_speech(options.wav, options.codec)  # a bad WAV fails here, before anything starts
    rng = random.Random(options.seed)
    seeds = [rng.random() for _ in range(options.sessions)]
    offsets = options.start_offsets()
    n = options.process_count()
    groups = [(list(range(w, options.sessions, n)), seeds[w::n], offsets[w::n]) for w in range(n)]
    stop = stop or asyncio.Event()
    gens: _Local | _Workers = _Local(Generator(options, *groups[0])) if n == 1 else _Workers(options, groups)
    try:
        if isinstance(gens, _Workers):
            await gens.ready()
    except BaseException:
        if isinstance(gens, _Workers):
            gens.abort()
        raise
    scraper = Scraper(list(options.metrics_urls), options.metrics_interval) if options.metrics_urls else None
    loop = asyncio.get_running_loop()
    sigint = False
    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        loop.add_signal_handler(signal.SIGINT, stop.set)
        sigint = True
    bg_stop = asyncio.Event()
    background: list[asyncio.Task] = []
    if scraper is not None:
        await scraper.scrape()  # the baseline: histograms count from here
    started_at = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    t0 = time.monotonic()
    await gens.start(t0)
    if scraper is not None:
        background.append(asyncio.create_task(scraper.run(bg_stop)))
    tally = Tally(options.sessions)
    show = Progress(progress, options.sessions)
    timeline: list[dict] = []
    end = t0 + options.duration
    next_sample = t0
    results: list[dict] = []
    try:
        while not stop.is_set():
            now = time.monotonic()
            if now >= end:
                break
            gens.poll(tally)
            if now >= next_sample:
                c = tally.counts()
                w = tally.window(now)
                timeline.append({"t": round(now - t0, 3), "sessions_up": c["up"], "turns": c["turns"],
                                 "errors": c["errors"], "gaps": c["gaps"],
                                 "latency_p50_ms": w["p50"], "latency_p95_ms": w["p95"]})
                next_sample += 1.0
            show.show(now - t0, tally, scraper, now)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, min(next_sample, end, now + SNAPSHOT_S) - time.monotonic()))
    finally:
        duration = time.monotonic() - t0
        bg_stop.set()
        if scraper is not None:
            await scraper.scrape_if_stale()  # the end of the measured interval
        try:
            results = await gens.finish(tally)
        finally:
            if isinstance(gens, _Workers):
                gens.abort()
            await asyncio.gather(*background, return_exceptions=True)
            if sigint:
                loop.remove_signal_handler(signal.SIGINT)
    show.show(duration, tally, scraper, time.monotonic(), final=True)
    if isinstance(gens, _Workers) and gens.errors and progress is not None:
        print("novagate loadtest: " + "; ".join(gens.errors), file=progress)
    records = tally.records + [r for res in results for r in res["records"]]
    stats: list[UserStats] = sorted((s for res in results for s in res["stats"]), key=lambda s: s.index)
    totals = Totals()
    for res in results:
        totals.add(res["totals"])
    lags = percentiles([x for res in results for x in res["loop_lags"]])
    mic_late = sum(s.mic_late for s in stats)
    client = {
        "processes": n,
        "loop_lag_ms": {k: lags[k] for k in ("p50", "p95", "p99", "max")},
        "mic_late": mic_late,
        "mic_skipped_frames": sum(s.mic_skipped for s in stats),
        "mic_max_lag_ms": round(max((s.mic_max_lag for s in stats), default=0.0) * 1000, 1),
        "overloaded": bool(mic_late or (lags["p99"] or 0) > 50),
    }
    if isinstance(gens, _Workers) and gens.errors:
        client["errors"] = gens.errors
    server = None
    if scraper is not None:
        server = scraper.summary(t0)
        server["timeline"] = scraper.timeline(t0)
    return build(url=url, started_at=started_at, duration=duration, options=options.public() | {"url": url},
                 users=stats, totals=totals, records=records, t0=t0, gap_threshold=options.gap_ms / 1000,
                 timeline=timeline, client=client, server=server, peak_up=tally.peak_up)


def run_sync(options: Options, progress: TextIO | None = sys.stderr) -> Summary:
    """`run()` from synchronous code (not inside a running event loop)."""
    return asyncio.run(run(options, progress=progress))
