"""The gateway's side of a load test: its Prometheus `/metrics`, scraped every second or two.

Samples of the same name are summed across label sets and across the URLs given (the gateway may run
several worker processes or instances), except a histogram's buckets, which are summed per `le`. From
the scrapes come the server's CPU (the rate of `process_cpu_seconds_total`, in cores), its memory
(`process_resident_memory_bytes`), its own sessions gauge, and the quantiles of two histograms over the
run and over each interval: `novagate_model_to_client_delay_seconds` and `novagate_event_loop_lag_seconds`.
"""

from __future__ import annotations

import asyncio
import math
import time
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

CPU = "process_cpu_seconds_total"
RSS = "process_resident_memory_bytes"
SESSIONS = "novagate_sessions_active"
HISTOGRAMS = {"model_to_client_delay": "novagate_model_to_client_delay_seconds",
              "event_loop_lag": "novagate_event_loop_lag_seconds"}


@dataclass
class Scrape:
    t: float                                  # monotonic
    values: dict[str, float]                  # sample name -> sum over label sets and URLs
    buckets: dict[str, dict[float, float]]    # histogram name -> {le: cumulative count}


def parse(text: str, into: Scrape) -> None:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.endswith("_created"):
                continue
            if s.name.endswith("_bucket") and "le" in s.labels:
                name = s.name[: -len("_bucket")]
                le = float(s.labels["le"])
                b = into.buckets.setdefault(name, defaultdict(float))
                b[le] += s.value
            else:
                into.values[s.name] = into.values.get(s.name, 0.0) + s.value


def fetch(url: str, timeout: float = 2.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 — a URL the user gave
        return r.read().decode("utf-8", "replace")


def quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus' histogram_quantile over cumulative buckets: linear within the bucket, the lower
    bound of +Inf's bucket when the quantile falls there. None without observations."""
    bounds = sorted(buckets)
    if not bounds:
        return None
    total = buckets[bounds[-1]]
    if total <= 0:
        return None
    rank = q * total
    prev_bound, prev_count = 0.0, 0.0
    for b in bounds:
        count = buckets[b]
        if count >= rank:
            if math.isinf(b):
                return prev_bound
            if count == prev_count:
                return b
            return prev_bound + (b - prev_bound) * (rank - prev_count) / (count - prev_count)
        prev_bound, prev_count = b, count
    return prev_bound


def diff(a: dict[float, float] | None, b: dict[float, float] | None) -> dict[float, float]:
    """Observations between two scrapes (b later); a restarted process (counts went down) counts from 0."""
    if not b:
        return {}
    a = a or {}
    if any(b.get(le, 0.0) < v for le, v in a.items()):
        return dict(b)
    return {le: v - a.get(le, 0.0) for le, v in b.items()}


@dataclass
class Scraper:
    urls: list[str]
    interval: float = 1.0
    scrapes: list[Scrape] = field(default_factory=list)
    errors: int = 0
    last_error: str = ""

    async def scrape(self) -> Scrape | None:
        s = Scrape(time.monotonic(), {}, {})
        try:
            texts = await asyncio.gather(*(asyncio.to_thread(fetch, u) for u in self.urls))
            for text in texts:
                parse(text, s)
        except Exception as e:  # noqa: BLE001 — an unreachable /metrics is reported, not fatal
            self.errors += 1
            self.last_error = f"{type(e).__name__}: {e}"[:200]
            return None
        self.scrapes.append(s)
        return s

    async def scrape_if_stale(self) -> None:
        """The end of a run: one more scrape unless the last one is fresh."""
        if not self.scrapes or time.monotonic() - self.scrapes[-1].t > self.interval / 2:
            await self.scrape()

    async def run(self, stop: asyncio.Event) -> None:
        next_at = time.monotonic()
        while not stop.is_set():
            await self.scrape()
            next_at += self.interval
            with_timeout = max(0.0, next_at - time.monotonic())
            try:
                await asyncio.wait_for(stop.wait(), with_timeout)
            except TimeoutError:
                pass

    # -- what the scrapes say ---------------------------------------------------------------------
    def latest(self, name: str) -> float | None:
        return self.scrapes[-1].values.get(name) if self.scrapes else None

    def cpu_now(self) -> float | None:
        """CPU cores used between the last two scrapes."""
        if len(self.scrapes) < 2:
            return None
        return _cpu(self.scrapes[-2], self.scrapes[-1])

    def timeline(self, t0: float) -> list[dict]:
        out = []
        for prev, s in zip([None, *self.scrapes], self.scrapes):
            point = {"t": round(s.t - t0, 3),
                     "cpu_cores": _cpu(prev, s) if prev else None,
                     "rss_bytes": s.values.get(RSS),
                     "sessions_active": s.values.get(SESSIONS)}
            for key, name in HISTOGRAMS.items():
                d = diff(prev.buckets.get(name) if prev else None, s.buckets.get(name)) if prev else {}
                p95 = quantile(0.95, d)
                point[f"{key}_p95_ms"] = None if p95 is None else round(p95 * 1000, 3)
            out.append(point)
        return out

    def summary(self, t0: float) -> dict:
        ok = self.scrapes
        result: dict = {"urls": self.urls, "scrapes": len(ok), "scrape_errors": self.errors}
        if self.errors:
            result["last_scrape_error"] = self.last_error
        if not ok:
            return result
        cpus = [c for c in (_cpu(a, b) for a, b in zip(ok, ok[1:])) if c is not None]
        if len(ok) >= 2 and ok[0].values.get(CPU) is not None and ok[-1].values.get(CPU) is not None:
            span = ok[-1].t - ok[0].t
            used = ok[-1].values[CPU] - ok[0].values[CPU]
            mean = used / span if span > 0 and used >= 0 else None
        else:
            mean = None
        result["cpu_cores"] = {"mean": _r(mean), "max": _r(max(cpus)) if cpus else None}
        rss = [s.values[RSS] for s in ok if RSS in s.values]
        result["rss_bytes"] = ({"start": rss[0], "end": rss[-1], "max": max(rss)} if rss else None)
        sess = [s.values[SESSIONS] for s in ok if SESSIONS in s.values]
        result["sessions_active_max"] = max(sess) if sess else None
        for key, name in HISTOGRAMS.items():
            first, last = ok[0].buckets.get(name), ok[-1].buckets.get(name)
            d = diff(first, last)
            count_key = name + "_count"
            sum_key = name + "_sum"
            n = (ok[-1].values.get(count_key, 0.0) - ok[0].values.get(count_key, 0.0)) if last else 0.0
            total = (ok[-1].values.get(sum_key, 0.0) - ok[0].values.get(sum_key, 0.0)) if last else 0.0
            if last is None:
                result[f"{key}_ms"] = None
                continue
            result[f"{key}_ms"] = {
                "count": int(n) if n >= 0 else None,
                "mean": _r(total / n * 1000) if n > 0 else None,
                **{f"p{int(q * 100)}": _r(_ms(quantile(q, d))) for q in (0.5, 0.95, 0.99)},
            }
        return result


def _cpu(a: Scrape | None, b: Scrape) -> float | None:
    """Cores used between two scrapes (None over less than 0.2 s: the counter ticks in 10 ms steps)."""
    if a is None or CPU not in a.values or CPU not in b.values or b.t - a.t < 0.2:
        return None
    used = b.values[CPU] - a.values[CPU]
    return None if used < 0 else used / (b.t - a.t)


def _ms(v: float | None) -> float | None:
    return None if v is None else v * 1000


def _r(v: float | None, nd: int = 3) -> float | None:
    return None if v is None else round(v, nd)
