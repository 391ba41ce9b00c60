"""uvicorn with a graceful drain: on SIGTERM the gateway stops taking sessions, moves its clients
elsewhere, stores what they said, and only then lets uvicorn shut down."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time

import uvicorn

from . import metrics
from .logs import log

logger = logging.getLogger("novagate.server")


class Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app, *, grace_s: float):
        super().__init__(config)
        self.app = app
        self.grace_s = grace_s
        self._drain: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

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
