"""uvicorn with a graceful drain: on SIGTERM the gateway stops taking sessions, moves its clients
elsewhere, stores what they said, and only then lets uvicorn shut down. Beside it, in the same
process and loop, the admin port (/metrics; under several workers, the supervisor's:
gateway/workers.py) and the health monitor (loop lag, CPU, overload, the lag-proof WebSocket
keepalive: gateway/health.py). HTTP/1.1 connections must send a complete request within
NOVAGATE_HEADER_TIMEOUT (uvicorn itself has no header timeout)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from protocol import messages

from . import metrics
from .config import Settings
from .health import HealthMonitor, KeepaliveWatchdog, OverloadGate
from .logs import log
from .websocket import LaneProtocol

logger = logging.getLogger("novagate.server")


def build(settings: Settings, app, *, admin: bool = True) -> Server:
    """The serving port's uvicorn (limits from the settings) and, unless NOVAGATE_METRICS_PORT=0 or
    `admin` is False (a worker: the supervisor serves it), the admin port's."""
    http = header_timeout_protocol(settings.header_timeout)
    concurrency = settings.limit_concurrency or settings.max_sessions + settings.max_pending_handshakes + 100
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=http,
        # uvicorn's sans-I/O protocol with a direct lane to the session actor (gateway/websocket.py)
        ws=LaneProtocol,
        loop="uvloop",
        ws_per_message_deflate=False,  # PCM does not compress; deflating it cost ~15 % of the loop
        ws_max_size=messages.MAX_TEXT_MESSAGE_BYTES,  # PROTOCOL §2: a bigger message closes 1009
        ws_ping_interval=settings.ws_ping_interval or None,
        # uvicorn sends the pings but never times them out: a pong we are late to read (our loop lags, or the
        # session has not read its socket) would close the socket 1011. KeepaliveWatchdog (health.py) judges.
        ws_ping_timeout=None,
        limit_concurrency=concurrency,  # counts every connection, sockets too; only HTTP requests get its 503
        timeout_keep_alive=settings.keep_alive_timeout,
        proxy_headers=bool(settings.forwarded_allow_ips),  # uvicorn would trust 127.0.0.1 by default
        forwarded_allow_ips=settings.forwarded_allow_ips or None,
        server_header=False,
        log_config=None,
        lifespan="on",
        timeout_graceful_shutdown=max(1, int(settings.drain_grace_s)),
    )
    monitor = HealthMonitor(OverloadGate(settings.overload_lag_ms / 1000, settings.overload_cpu))
    ping = settings.ws_ping_interval
    watchdog = KeepaliveWatchdog(ping + settings.ws_ping_timeout if ping and settings.ws_ping_timeout else 0,
                                 monitor.clock)
    return Server(config, app, grace_s=settings.drain_grace_s,
                  admin=admin_server(settings, metrics.admin_app()) if admin and settings.metrics_port else None,
                  monitor=monitor, watchdog=watchdog)


def admin_server(settings: Settings, app) -> AdminServer:
    """The admin port (NOVAGATE_METRICS_HOST:NOVAGATE_METRICS_PORT) serving `app`."""
    return AdminServer(uvicorn.Config(
        app, host=settings.metrics_host, port=settings.metrics_port, http=header_timeout_protocol(settings.header_timeout),
        proxy_headers=False, server_header=False, access_log=False, log_config=None, lifespan="off",
        limit_concurrency=32, timeout_graceful_shutdown=1,
    ))


def header_timeout_protocol(seconds: float) -> type[H11Protocol]:
    """uvicorn's HTTP/1.1 protocol, closing a connection whose request has not fully arrived `seconds`
    after the connection opened, or after the first byte of a later request on it (slowloris; what
    nginx calls client_header_timeout). Idle kept-alive connections are uvicorn's (timeout_keep_alive);
    one upgraded to a WebSocket has left (the session's handshake timeout takes over)."""

    class Protocol(H11Protocol):
        _request_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._request_timer is None and self.conn.their_state is h11.IDLE:
                self._arm()  # a new request begins
            super().data_received(data)

        def on_response_complete(self) -> None:
            self._disarm()
            super().on_response_complete()

        def send_400_response(self, msg: str) -> None:
            # uvicorn answers a malformed request body with 400 while the app may still be answering
            # the request; its later response then fails inside h11 and a traceback is logged (one per
            # request, for anyone to trigger). The request is over: its cycle sends nothing more.
            if self.cycle is not None:
                self.cycle.disconnected = True
            super().send_400_response(msg)

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if seconds > 0:
                self._request_timer = self.loop.call_later(seconds, self._expire)

        def _disarm(self) -> None:
            if self._request_timer is not None:
                self._request_timer.cancel()
                self._request_timer = None

        def _expire(self) -> None:
            self._request_timer = None
            upgraded = self not in self.connections
            if not upgraded and self.conn.their_state is not h11.DONE and not self.transport.is_closing():
                self.transport.close()

    return Protocol


def _every(n: int, chore: Callable[[], None]) -> Callable[[], None]:
    """`chore` on every n-th call."""
    calls = 0

    def tick() -> None:
        nonlocal calls
        calls += 1
        if calls % n == 0:
            chore()

    return tick


class AdminServer(uvicorn.Server):
    """The admin port: run inside the serving Server's loop, which owns the signals."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


class Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app, *, grace_s: float, admin: AdminServer | None = None,
                 monitor: HealthMonitor | None = None, watchdog: KeepaliveWatchdog | None = None):
        super().__init__(config)
        self.app = app
        self.grace_s = grace_s
        self.admin = admin
        self.monitor = monitor
        self.watchdog = watchdog
        self.on_started: Callable[[], None] | None = None  # called once serving (gateway/workers.py)
        self._admin_task: asyncio.Task | None = None
        self._monitor_task: asyncio.Task | None = None
        self._drain: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        if self.admin is not None:
            await self._start_admin()
        if self.watchdog is not None:
            self.config.ws_protocol_class = self.watchdog.protocol(self.config.ws_protocol_class)
        await super().startup(sockets)
        if self.started and self.monitor is not None:
            self._start_monitor()
        if self.started and self.on_started is not None:
            self.on_started()

    def _start_monitor(self) -> None:
        """The health monitor: overload gate for admission, chores once per tick (gateway/health.py)."""
        monitor, services = self.monitor, getattr(self.app.state, "services", None)
        if services is not None:
            services.admission.health = monitor.gate
            monitor.chores.append(services.admission.reconcile)
            monitor.chores.append(lambda: metrics.WORKER_SOCKETS.set(len(services.sessions)))
        if self.watchdog is not None:
            monitor.chores.append(_every(max(1, round(1.0 / monitor.tick_s)), self.watchdog.sweep))  # about 1/s
        self._monitor_task = asyncio.create_task(monitor.run())

    async def _start_admin(self) -> None:
        """The admin port opens first. If it cannot (uvicorn logs why), the gateway serves without
        /metrics and says so: metrics do not take the voice service down."""
        self._admin_task = asyncio.create_task(self._serve_admin())
        while not self.admin.started and not self._admin_task.done():
            await asyncio.sleep(0.02)
        if not self.admin.started:
            log(logger, logging.ERROR, "metrics port not open: no /metrics (NOVAGATE_METRICS_HOST / "
                "NOVAGATE_METRICS_PORT; 0 serves /metrics on the serving port)",
                host=self.admin.config.host, port=self.admin.config.port)

    async def _serve_admin(self) -> None:
        with contextlib.suppress(SystemExit):  # uvicorn's way to say it could not bind
            await self.admin.serve()

    async def shutdown(self, sockets=None) -> None:
        await super().shutdown(sockets)
        if self._monitor_task is not None:
            self._monitor_task.cancel()
        if self._admin_task is not None:
            self.admin.should_exit = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._admin_task, 5)

    def handle_exit(self, sig: int, frame) -> None:
        if sig == signal.SIGTERM and self._drain is None and self._loop is not None and not self.should_exit:
            self._loop.call_soon_threadsafe(self._start_drain)
            return
        super().handle_exit(sig, frame)  # SIGINT, or a second SIGTERM: uvicorn's own (faster) shutdown

    def _start_drain(self) -> None:
        if self._drain is None:
            self._drain = asyncio.get_running_loop().create_task(self.drain())

    async def drain(self) -> None:
        """/readyz turns 503 and new sockets get 1013 at once; every session gets
        `session.reconnect` and closes 1012 after storing its items; then uvicorn stops."""
        t0 = time.monotonic()
        services = getattr(self.app.state, "services", None)
        if services is not None:
            services.draining = True
            metrics.DRAINS.inc()
            sessions = list(services.sessions)
            log(logger, logging.INFO, "draining", sessions=len(sessions), grace_s=self.grace_s)
            for session in sessions:
                session.drain()
            wait_s = t0 + max(1.0, self.grace_s - 2.0) - time.monotonic()  # keep 2 s for uvicorn and the lifespan
            if services.sessions:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(services.no_sessions.wait(), wait_s)
            log(logger, logging.INFO, "drained", left=len(services.sessions),
                seconds=round(time.monotonic() - t0, 3))
        self.config.timeout_graceful_shutdown = max(1, int(self.grace_s - (time.monotonic() - t0)))
        self.should_exit = True
