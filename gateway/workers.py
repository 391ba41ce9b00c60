"""`novagate serve --workers N`: one supervisor process and N worker processes.

The supervisor binds the listening socket once and starts N workers (fresh interpreters, `python -c
...`, the socket passed as an inherited file descriptor); each runs the ordinary gateway
(`gateway.server.Server`, drain included) on that socket. One shared socket rather than one
SO_REUSEPORT socket per worker: the kernel hands a new connection to whichever worker calls accept
first, so a worker that is busy (its loop late) takes fewer; with SO_REUSEPORT connections are
hashed to a worker whatever its load, and those queued on a worker that dies are reset.

What the supervisor does besides:

- restarts a worker that dies (logged; a worker that dies young again and again is restarted after
  a growing delay, up to 30 s). If a worker dies before it ever served, at the first start, the
  gateway stops (exit 3): a configuration or engine problem would only repeat;
- hands every worker the same settings (every field as its NOVAGATE_* variable) and the same server
  secret, loaded or generated once here, so a resume token minted by one worker verifies on another;
- makes the admission ledger (gateway/admission.py: every cap exact across workers) and releases the
  counts of a worker that died;
- metrics: every worker writes its values into files in a private directory
  (PROMETHEUS_MULTIPROC_DIR, removed at exit); /metrics, on the admin port served here once, adds
  them up (`aggregate_registry`), with `process_*` summed over the supervisor and its workers (the
  CPU of workers that died included, from wait4);
- signals: SIGTERM drains every worker (each runs the usual drain) and exits 0 once they have all
  exited; SIGINT stops them fast; a second signal is passed on too (a worker then stops at once).
  Workers run in their own process group (a terminal's Ctrl-C or a group kill reaches only the
  supervisor, which passes it on once) and are killed by the kernel if the supervisor dies
  (PR_SET_PDEATHSIG), so they never outlive it holding the port.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .config import ConfigError, Settings
from .logs import log

logger = logging.getLogger("novagate.workers")

WORKER_ENV = "NOVAGATE_WORKER_INFO"  # internal: what a worker process needs from its supervisor (JSON)
PROCESSES_FILE = "processes.json"     # in the metrics directory: the supervisor, its live workers, dead CPU
BACKLOG = 2048                        # uvicorn's default
RESTART_MAX_DELAY_S = 30.0
YOUNG_S = 10.0                        # a worker that dies younger than this counts towards the restart delay


# -- how many -------------------------------------------------------------------------------------------
def default_workers() -> int:
    """One per CPU the process may use: its CPU affinity, and no more than its cgroup's CPU quota
    (a container limited to 2 CPUs on a 64-core node gets 2)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_cpus()
    return max(1, min(n, quota) if quota else n)


def cgroup_cpus() -> int | None:
    """The CPU quota of this process's cgroup (v2 cpu.max, or v1 cfs quota), in whole CPUs rounded up;
    None without one."""
    limits = []
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            hierarchy, controllers, path = line.split(":", 2)
            if hierarchy == "0":  # cgroup v2: this cgroup and its ancestors
                d = Path("/sys/fs/cgroup") / path.lstrip("/")
                for p in (d, *d.parents):
                    if not str(p).startswith("/sys/fs/cgroup"):
                        break
                    with contextlib.suppress(OSError, ValueError):
                        quota, period = (p / "cpu.max").read_text().split()[:2]
                        if quota != "max":
                            limits.append(int(quota) / int(period))
            elif "cpu" in controllers.split(","):  # cgroup v1
                for d in (Path("/sys/fs/cgroup/cpu") / path.lstrip("/"), Path("/sys/fs/cgroup/cpu")):
                    with contextlib.suppress(OSError, ValueError):
                        quota = int((d / "cpu.cfs_quota_us").read_text())
                        if quota > 0:
                            limits.append(quota / int((d / "cpu.cfs_period_us").read_text()))
                            break
    except (OSError, ValueError):
        return None
    return max(1, math.ceil(min(limits))) if limits else None


# -- metrics across workers --------------------------------------------------------------------------------
def aggregate_registry(path: str):
    """Every worker's metrics added up (prometheus_client's multiprocess mode), and process_* summed."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=path)
    registry.register(ProcessTotals(path))
    return registry


class ProcessTotals:
    """process_cpu_seconds_total, process_resident_memory_bytes, … of the whole gateway: the supervisor
    and its live workers (read from /proc, as prometheus_client's ProcessCollector does for one
    process), plus the CPU of workers that have died; and how many workers run and have been restarted."""

    def __init__(self, path: str):
        self.path = Path(path)

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        from prometheus_client.process_collector import ProcessCollector

        try:
            info = json.loads((self.path / PROCESSES_FILE).read_text())
        except (OSError, ValueError):
            return
        cpu, rss, vms, fds = float(info.get("dead_cpu_seconds", 0.0)), 0.0, 0.0, 0.0
        start = max_fds = None
        for pid in (info["supervisor"], *info["workers"]):
            samples = {s.name: s.value for fam in ProcessCollector(pid=lambda p=pid: p, registry=None).collect()
                       for s in fam.samples}
            cpu += samples.get("process_cpu_seconds_total", 0.0)
            rss += samples.get("process_resident_memory_bytes", 0.0)
            vms += samples.get("process_virtual_memory_bytes", 0.0)
            fds += samples.get("process_open_fds", 0.0)
            if pid == info["supervisor"]:
                start, max_fds = samples.get("process_start_time_seconds"), samples.get("process_max_fds")
        yield CounterMetricFamily("process_cpu_seconds", "Total user and system CPU time spent in seconds: the "
                                  "supervisor and every worker, those that have exited included.", value=cpu)
        yield GaugeMetricFamily("process_resident_memory_bytes", "Resident memory size in bytes: the supervisor and "
                                "its live workers.", value=rss)
        yield GaugeMetricFamily("process_virtual_memory_bytes", "Virtual memory size in bytes: the supervisor and "
                                "its live workers.", value=vms)
        yield GaugeMetricFamily("process_open_fds", "Number of open file descriptors: the supervisor and its live "
                                "workers.", value=fds)
        if start is not None:
            yield GaugeMetricFamily("process_start_time_seconds", "Start time of the supervisor since unix epoch in "
                                    "seconds.", value=start)
        if max_fds is not None:
            yield GaugeMetricFamily("process_max_fds", "Maximum number of open file descriptors (per process).",
                                    value=max_fds)
        yield GaugeMetricFamily("novagate_workers", "worker processes running", value=len(info["workers"]))
        yield CounterMetricFamily("novagate_worker_restarts", "worker processes restarted after they died",
                                  value=info.get("restarts", 0))


# -- the supervisor ------------------------------------------------------------------------------------------
@dataclass
class Worker:
    index: int
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    ready: bool = False
    served: bool = False        # has ever been ready
    young_deaths: int = 0       # deaths in a row, each younger than YOUNG_S
    restart_at: float | None = None
    ready_fd: int | None = None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None


def serve(settings: Settings, workers: int) -> int:
    """`novagate serve` with `workers` > 1 (settings and secrets already checked by the CLI)."""
    from .tokens import load_secret
    from .web import allowed_hosts

    try:
        allowed_hosts(settings)  # e.g. NOVAGATE_ALLOWED_HOSTS unset while listening beyond loopback
        secret = load_secret(settings.secret, settings.secret_file)
    except (ConfigError, OSError) as e:
        print(f"novagate: configuration error: {e}", file=sys.stderr)
        return 2
    try:
        sock = bind(settings.host, settings.port)
    except OSError as e:
        print(f"novagate: cannot listen on {settings.host}:{settings.port}: {e}", file=sys.stderr)
        return 1
    admin = f"; /metrics on http://{settings.metrics_host}:{settings.metrics_port}/" if settings.metrics_port else ""
    print(f"novagate: serving on http://{settings.host}:{settings.port}/ with {workers} workers (engine "
          f"{settings.engine}, store {settings.store}){admin}", file=sys.stderr, flush=True)
    return asyncio.run(Supervisor(settings, secret, workers, sock).run())


def remove_stale_dirs() -> None:
    """The private directories of supervisors that were killed (SIGKILL: no clean-up) and were ours."""
    for d in Path(tempfile.gettempdir()).glob("novagate-workers-*-*"):
        try:
            pid = int(d.name.split("-")[2])
            if d.stat().st_uid != os.getuid():
                continue
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except (ValueError, IndexError, OSError):
            continue


def bind(host: str, port: int) -> socket.socket:
    """The listening socket every worker accepts on (as uvicorn would bind it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


class Supervisor:
    def __init__(self, settings: Settings, secret: bytes, n: int, sock: socket.socket):
        self.settings = settings
        self.secret = secret
        self.sock = sock
        self.workers = [Worker(i) for i in range(n)]
        self.dir = ""
        self.ledger = None
        self.stopping: int | None = None  # the signal that stops us
        self.deadline = 0.0
        self.killed = False
        self.dead_cpu = 0.0
        self.restarts = 0
        self.boot_failed = False
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- lifecycle ---------------------------------------------------------------------------------------
    async def run(self) -> int:
        from .admission import Ledger, Limits

        self._loop = asyncio.get_running_loop()
        remove_stale_dirs()
        self.dir = tempfile.mkdtemp(prefix=f"novagate-workers-{os.getpid()}-")  # mode 0700
        admin_task = None
        try:
            self.ledger = Ledger.create(Limits.from_settings(self.settings), workers=len(self.workers),
                                        path=os.path.join(self.dir, "admission.ledger"))
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._loop.add_signal_handler(sig, self._signal, sig)
            self._loop.add_signal_handler(signal.SIGCHLD, self._wake.set)
            admin_task = await self._start_admin()
            for w in self.workers:
                self._spawn(w)
            self._write_processes()
            await self._watch()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
                self._loop.remove_signal_handler(sig)
            for w in self.workers:  # only after an error of our own: workers are gone otherwise
                if w.alive:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(w.proc.pid, signal.SIGKILL)
                    self._reap(block=True)
            if admin_task is not None:
                self._admin.should_exit = True
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(admin_task, 5)
            self.sock.close()
            if self.ledger is not None:
                self.ledger.close()
            shutil.rmtree(self.dir, ignore_errors=True)
        if self.boot_failed:
            return 3
        log(logger, logging.INFO, "stopped", killed=self.killed)
        return 1 if self.killed else 0

    async def _watch(self) -> None:
        while True:
            try:
                if self._step():
                    return
            except Exception:  # the supervisor goes on: its workers serve without it
                log(logger, logging.ERROR, "supervisor error", exc_info=True)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 0.5)

    def _step(self) -> bool:
        """Reap, restart, enforce the stop deadline; True when there is nothing left to watch."""
        self._reap()
        now = time.monotonic()
        if self.boot_failed or (self.stopping is not None and not any(w.alive for w in self.workers)):
            return True
        if self.stopping is None:
            for w in self.workers:
                if not w.alive and w.restart_at is not None and now >= w.restart_at:
                    try:
                        self._spawn(w)
                    except OSError as e:  # no fork now (EAGAIN, no fds): try again
                        w.restart_at = now + RESTART_MAX_DELAY_S / 6
                        log(logger, logging.ERROR, "worker could not be started", worker=w.index, error=str(e))
                    self._write_processes()
        elif now >= self.deadline and not self.killed:
            left = [w for w in self.workers if w.alive]
            log(logger, logging.ERROR, "workers did not stop in time: killed", workers=[w.proc.pid for w in left])
            self.killed = True
            for w in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w.proc.pid, signal.SIGKILL)
        return False

    def _signal(self, sig: int) -> None:
        if self.stopping is None:
            self.stopping = sig
            grace = self.settings.drain_grace_s
            self.deadline = time.monotonic() + grace + 10
            log(logger, logging.INFO, "draining every worker" if sig == signal.SIGTERM else "stopping every worker",
                signal=signal.Signals(sig).name, workers=sum(w.alive for w in self.workers), grace_s=grace)
        for w in self.workers:  # the first signal starts each worker's drain (or stop); a second one stops it now
            if w.alive:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w.proc.pid, sig)
        self._wake.set()

    # -- workers ---------------------------------------------------------------------------------------------
    def _spawn(self, w: Worker) -> None:
        r, wfd = os.pipe()
        env = self._child_env(w.index, wfd)
        try:
            w.proc = subprocess.Popen(
                [sys.executable, "-c", "from gateway.workers import worker_main; raise SystemExit(worker_main())"],
                env=env, pass_fds=(self.sock.fileno(), wfd), stdin=subprocess.DEVNULL, process_group=0,
            )
        except OSError:
            os.close(r)
            raise
        finally:
            os.close(wfd)
        w.started_at, w.ready, w.restart_at, w.ready_fd = time.monotonic(), False, None, r
        self._loop.add_reader(r, self._on_ready, w, r)
        log(logger, logging.INFO, "worker started", worker=w.index, worker_pid=w.proc.pid)

    def _on_ready(self, w: Worker, fd: int) -> None:
        try:
            data = os.read(fd, 64)
        except OSError:
            data = b""
        if data and w.ready_fd == fd:
            w.ready = w.served = True
            log(logger, logging.INFO, "worker ready", worker=w.index, worker_pid=w.proc.pid)
        if not data:  # the worker closed it (ready) or exited
            self._loop.remove_reader(fd)
            os.close(fd)
            if w.ready_fd == fd:
                w.ready_fd = None

    def _child_env(self, index: int, ready_fd: int) -> dict[str, str]:
        """The worker's environment: ours, every setting as its variable (flags included), the secret
        as loaded here, the metrics directory, and the worker's own details."""
        env = dict(os.environ)
        for f in dataclasses.fields(Settings):
            value = getattr(self.settings, f.name)
            env["NOVAGATE_" + f.name.upper()] = ("true" if value else "false") if isinstance(value, bool) else str(value)
        if not self.settings.secret:
            try:  # the secret loaded (or generated) here, once
                env["NOVAGATE_SECRET"] = self.secret.decode()
            except UnicodeDecodeError:  # not text: the workers read the same file, which exists now
                env.pop("NOVAGATE_SECRET", None)
        env["PROMETHEUS_MULTIPROC_DIR"] = self.dir
        env.pop("prometheus_multiproc_dir", None)
        env[WORKER_ENV] = json.dumps({"index": index, "fd": self.sock.fileno(), "ready_fd": ready_fd,
                                      "ledger": self.ledger_path, "parent": os.getpid()})
        return env

    @property
    def ledger_path(self) -> str:
        return os.path.join(self.dir, "admission.ledger")

    def _reap(self, block: bool = False) -> None:
        for w in self.workers:
            if not w.alive:
                continue
            pid = w.proc.pid
            try:
                got, status, usage = os.wait4(pid, 0 if block else os.WNOHANG)
            except ChildProcessError:
                got, status, usage = pid, 0, None
            if got == 0:
                continue
            w.proc.returncode = os.waitstatus_to_exitcode(status)
            self._exited(w, usage)

    def _exited(self, w: Worker, usage) -> None:
        from prometheus_client import multiprocess

        pid, code = w.proc.pid, w.proc.returncode
        if usage is not None:
            self.dead_cpu += usage.ru_utime + usage.ru_stime
        multiprocess.mark_process_dead(pid, self.dir)  # its live gauges go; its counters stay in the sums
        with self.ledger.locked():
            self.ledger.release_worker(w.index)
        w.ready = False
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit {code}"
        if self.stopping is not None:
            log(logger, logging.INFO, "worker stopped", worker=w.index, worker_pid=pid, how=how)
        elif not w.served:
            # never served at the first start: the same would happen again (its log says why)
            log(logger, logging.ERROR, "worker failed to start: stopping", worker=w.index, worker_pid=pid, how=how)
            self.boot_failed = True
            self._signal(signal.SIGINT)
        else:
            young = time.monotonic() - w.started_at < YOUNG_S
            w.young_deaths = w.young_deaths + 1 if young else 0
            delay = min(RESTART_MAX_DELAY_S, 0.5 * 2 ** (w.young_deaths - 1)) if w.young_deaths else 0.0
            w.restart_at = time.monotonic() + delay
            self.restarts += 1
            log(logger, logging.ERROR, "worker died: restarting", worker=w.index, worker_pid=pid, how=how,
                restart_in_s=delay)
        self._write_processes()

    def _write_processes(self) -> None:
        """What ProcessTotals reads (written whole, then renamed: readers never see half of it)."""
        info = {"supervisor": os.getpid(), "workers": [w.proc.pid for w in self.workers if w.alive],
                "dead_cpu_seconds": self.dead_cpu, "restarts": self.restarts}
        tmp = os.path.join(self.dir, PROCESSES_FILE + ".tmp")
        with open(tmp, "w") as f:
            json.dump(info, f)
        os.replace(tmp, os.path.join(self.dir, PROCESSES_FILE))

    # -- the admin port ---------------------------------------------------------------------------------------
    async def _start_admin(self) -> asyncio.Task | None:
        """/metrics for the whole gateway on NOVAGATE_METRICS_PORT (with port 0, each worker answers it on
        the serving port, with the same sums)."""
        if not self.settings.metrics_port:
            return None
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        from starlette.applications import Starlette
        from starlette.responses import Response
        from starlette.routing import Route

        from .server import admin_server

        async def endpoint(request) -> Response:
            return Response(generate_latest(aggregate_registry(self.dir)), media_type=CONTENT_TYPE_LATEST)

        self._admin = admin_server(self.settings, Starlette(routes=[Route("/metrics", endpoint)]))

        async def serve() -> None:
            with contextlib.suppress(SystemExit):  # uvicorn's way to say it could not bind
                await self._admin.serve()

        task = asyncio.create_task(serve())
        while not self._admin.started and not task.done():
            await asyncio.sleep(0.02)
        if not self._admin.started:
            log(logger, logging.ERROR, "metrics port not open: no /metrics (NOVAGATE_METRICS_HOST / "
                "NOVAGATE_METRICS_PORT; 0 serves /metrics on the serving port)",
                host=self.settings.metrics_host, port=self.settings.metrics_port)
        return task


# -- a worker ----------------------------------------------------------------------------------------------
class _WorkerFields(logging.Filter):
    """Every log line of a worker says which one it is."""

    def __init__(self, index: int):
        super().__init__()
        self.fields = {"worker": index, "pid": os.getpid()}

    def filter(self, record: logging.LogRecord) -> bool:
        fields = getattr(record, "fields", None)
        record.fields = {**self.fields, **fields} if fields else dict(self.fields)
        return True


def _die_with_parent(parent: int) -> None:
    """Be killed by the kernel when the supervisor dies (Linux), so no worker outlives it holding the port."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before we asked
        os._exit(1)


def worker_main() -> int:
    """A worker process (started by the supervisor): the gateway on the inherited socket."""
    info = json.loads(os.environ.pop(WORKER_ENV))
    _die_with_parent(info["parent"])
    from . import admission, logs, server
    from .app import create_app

    settings = Settings.from_env()
    logs.setup(settings.log_level, show_text=settings.log_transcripts)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_WorkerFields(info["index"]))
    admission.install(admission.Ledger.attach(info["ledger"], info["index"]))
    sock = socket.socket(fileno=info["fd"])
    ready_fd = info["ready_fd"]

    def ready() -> None:
        os.write(ready_fd, b"ready\n")
        os.close(ready_fd)

    srv = server.build(settings, create_app(settings), admin=False)
    srv.on_started = ready
    try:
        srv.run(sockets=[sock])
    except KeyboardInterrupt:  # SIGINT: uvicorn stopped, then raised it again
        return 130
    return 0
