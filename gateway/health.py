"""How a worker process is doing, and what follows from it.

- `HealthMonitor`: a timer every 125 ms that measures how late the event loop runs it
  (`novagate_event_loop_lag_seconds`) and the process's CPU (`time.process_time()` deltas), feeds
  `OverloadGate`, and runs the per-tick chores (admission's reconcile, the keepalive sweep).
- `OverloadGate`: whether the worker takes new sockets. Past NOVAGATE_OVERLOAD_LAG_MS of loop lag
  (the median of the last 8 ticks, about a second: one stall is not "sustained") or
  NOVAGATE_OVERLOAD_CPU cores (over the last 2 s) it closes: new sockets get 1013 `overloaded` with a
  retry hint, admitted sessions go on. It opens again once lag is under half its limit and CPU under
  85 % of its limit for 2 s in a row (hysteresis: no flapping). Pure: time and measurements are passed in.
- `KeepaliveWatchdog`: the WebSocket keepalive, made blind to our own lateness. uvicorn's ping
  timeout closes a socket 1011 when a pong is not *processed* in time, which is also what happens
  when this process is behind (the loop runs late, or the session has not read its socket, so the
  pong waits behind unread audio). So uvicorn still sends the pings (NOVAGATE_WS_PING_INTERVAL) but
  never times them out, and the watchdog closes a socket only when nothing at all (pong, audio,
  message) has arrived from its client for NOVAGATE_WS_PING_INTERVAL + NOVAGATE_WS_PING_TIMEOUT,
  counted on a clock that stops while the loop is late and while we are not reading that socket.
"""

from __future__ import annotations

import asyncio
import logging
import random
import statistics
import time
import weakref
from collections import deque
from collections.abc import Callable

from . import metrics
from .logs import log

logger = logging.getLogger("novagate.health")

TICK_S = 0.125


class OverloadGate:
    LAG_TICKS = 8        # the lag is the median of the last 8 ticks (about 1 s on time)
    MIN_LAG_TICKS = 4    # ... judged once there are this many
    CPU_WINDOW_S = 2.0   # CPU: used over this much wall time, most recent
    CALM_S = 2.0         # calm this long before taking sockets again
    CALM_LAG = 0.5       # calm: lag under half its limit ...
    CALM_CPU = 0.85      # ... and CPU under 85 % of its limit

    def __init__(self, lag_limit_s: float, cpu_limit: float, *, rng: Callable[[], float] = random.random):
        self.lag_limit_s = lag_limit_s  # 0: not checked
        self.cpu_limit = cpu_limit      # cores; 0: not checked
        self.rng = rng
        self.overloaded = False
        self.lag = 0.0    # the median lag now (s)
        self.cpu = 0.0    # cores used now
        self._lags: deque[float] = deque(maxlen=self.LAG_TICKS)
        self._cpu: deque[tuple[float, float]] = deque()  # (wall s, cpu s) per tick
        self._wall = 0.0
        self._calm_since: float | None = None

    def observe(self, now: float, lag_s: float, wall_s: float, cpu_s: float) -> bool:
        """One tick: the loop ran the timer `lag_s` late; `cpu_s` of CPU went in the `wall_s` since
        the last tick. True when the gate changed (opened or closed)."""
        self._lags.append(max(0.0, lag_s))
        self._cpu.append((wall_s, cpu_s))
        self._wall += wall_s
        while len(self._cpu) > 1 and self._wall - self._cpu[0][0] >= self.CPU_WINDOW_S:
            self._wall -= self._cpu.popleft()[0]
        self.lag = statistics.median(self._lags)
        self.cpu = sum(c for _, c in self._cpu) / self._wall if self._wall > 0 else 0.0
        lag_known = len(self._lags) >= self.MIN_LAG_TICKS
        cpu_known = self._wall >= self.CPU_WINDOW_S / 2
        hot = ((self.lag_limit_s > 0 and lag_known and self.lag > self.lag_limit_s)
               or (self.cpu_limit > 0 and cpu_known and self.cpu > self.cpu_limit))
        if not self.overloaded:
            if hot:
                self.overloaded, self._calm_since = True, None
                return True
            return False
        calm = ((self.lag_limit_s <= 0 or self.lag < self.lag_limit_s * self.CALM_LAG)
                and (self.cpu_limit <= 0 or self.cpu < self.cpu_limit * self.CALM_CPU))
        if not calm:
            self._calm_since = None
            return False
        if self._calm_since is None:
            self._calm_since = now
        if now - self._calm_since >= self.CALM_S:
            self.overloaded, self._calm_since = False, None
            return True
        return False

    def retry_after_ms(self) -> int:
        """The hint given with a refusal: at least the calm period, spread by up to half of it."""
        return int(self.CALM_S * 1000 * (1 + self.rng() / 2))


class KeepaliveWatchdog:
    """Closes sockets whose client has sent nothing (not even a pong) for `limit_s` of our on-time clock."""

    # uvicorn implementations that send keepalive pings (wsproto sends none: then nothing is watched)
    PINGING = ("uvicorn.protocols.websockets.websockets_impl", "uvicorn.protocols.websockets.websockets_sansio_impl")

    def __init__(self, limit_s: float, clock: Callable[[], float]):
        self.limit_s = limit_s
        self.clock = clock
        self.conns: weakref.WeakSet = weakref.WeakSet()
        self.closed = 0

    def protocol(self, base: type | None) -> type | None:
        """`base` (the uvicorn WebSocket protocol class in use), watched; itself when there is nothing to watch."""
        if base is None or self.limit_s <= 0:
            return base
        if not any(c.__module__ in self.PINGING for c in base.__mro__):
            log(logger, logging.WARNING, "this WebSocket implementation sends no keepalive pings: dead clients are "
                "found by the session's idle timeout only", implementation=f"{base.__module__}.{base.__name__}")
            return base
        dog = self

        class Watched(base):
            def connection_made(self, transport) -> None:
                self._novagate_heard = dog.clock()
                dog.conns.add(self)
                super().connection_made(transport)

            def data_received(self, data) -> None:
                self._novagate_heard = dog.clock()
                super().data_received(data)

            def connection_lost(self, exc) -> None:
                dog.conns.discard(self)
                super().connection_lost(exc)

        Watched.__name__ = Watched.__qualname__ = f"Watched{base.__name__}"
        return Watched

    def sweep(self) -> None:
        now = self.clock()
        for p in list(self.conns):
            transport = getattr(p, "transport", None)
            if transport is None or transport.is_closing():
                continue
            if not transport.is_reading():  # we are not reading it (the session is behind): not the client's silence
                p._novagate_heard = now
            elif now - p._novagate_heard > self.limit_s:
                self.closed += 1
                self.conns.discard(p)
                expire(p)


def expire(protocol) -> None:
    """Close a socket whose client stopped answering, as uvicorn's own ping timeout would (1011)."""
    if hasattr(protocol, "keepalive_timeout"):  # websockets-sansio
        protocol.keepalive_timeout()
    elif hasattr(protocol, "fail_connection"):  # websockets (legacy)
        protocol.fail_connection(1011, "keepalive ping timeout")
    else:
        protocol.transport.close()


class HealthMonitor:
    """The per-process timer: loop lag, CPU, the overload gate, and chores run once per tick."""

    def __init__(self, gate: OverloadGate, *, tick_s: float = TICK_S):
        self.gate = gate
        self.tick_s = tick_s
        self.clock_s = 0.0  # on-time clock: advances at most 2 ticks per tick, so it stops while the loop is late
        self.chores: list[Callable[[], None]] = []
        # Tests: replaces what was measured, (lag s, cpu cores) -> (lag s, cpu cores).
        self.source: Callable[[float, float], tuple[float, float]] | None = None
        self._failed: set[Callable] = set()

    def clock(self) -> float:
        return self.clock_s

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        prev, prev_cpu = loop.time(), time.process_time()
        while True:
            expected = loop.time() + self.tick_s
            await asyncio.sleep(self.tick_s)
            now, cpu_now = loop.time(), time.process_time()
            lag, wall, cpu = max(0.0, now - expected), now - prev, cpu_now - prev_cpu
            prev, prev_cpu = now, cpu_now
            metrics.LOOP_LAG.observe(lag)
            self.clock_s += min(wall, 2 * self.tick_s)
            if self.source is not None:
                lag, cores = self.source(lag, cpu / wall if wall > 0 else 0.0)
                cpu = cores * wall
            if self.gate.observe(now, lag, wall, cpu):
                self._changed()
            for chore in self.chores:
                try:
                    chore()
                except Exception:
                    if chore not in self._failed:  # log once per chore, keep ticking
                        self._failed.add(chore)
                        log(logger, logging.ERROR, "health chore failed", exc_info=True, chore=repr(chore))

    def _changed(self) -> None:
        g = self.gate
        metrics.OVERLOADED.set(1 if g.overloaded else 0)
        if g.overloaded:
            log(logger, logging.WARNING, "overloaded: new sockets are refused (1013 overloaded) until the load drops",
                lag_ms=round(g.lag * 1000, 1), cpu=round(g.cpu, 2), lag_limit_ms=round(g.lag_limit_s * 1000, 1),
                cpu_limit=g.cpu_limit)
        else:
            log(logger, logging.INFO, "overload over: new sockets are taken again",
                lag_ms=round(g.lag * 1000, 1), cpu=round(g.cpu, 2))
