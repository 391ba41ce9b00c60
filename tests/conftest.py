"""Shared fixtures: real gateway processes on loopback, scripted speech, clients."""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent

# Phrases the deterministic test engine recognises (pocketsphinx JSGF) and speaks (espeak).
MET = "i met with doctor smith today at two pm"
DISCUSS = "what did we discuss"
STORY = "tell me a story"
FOLLOW_UP = "please schedule a follow up appointment for next tuesday"
HELLO = "hello there"
GRAMMAR = "|".join([MET, DISCUSS, STORY, FOLLOW_UP, HELLO])


@functools.cache
def speech(text: str, rate: int = 16000) -> bytes:
    """Scripted user speech (PCM16LE mono), with a little silence before it."""
    from gateway.local.speech import synthesize

    return bytes(rate // 5 * 2) + synthesize(text, rate, backend="espeak")


def missing_tool(reason: str) -> None:
    """A tool a test needs is not installed: a skip on a developer's machine, a failure under `make test`
    (NOVAGATE_REQUIRE_TOOLS=1), which installs every tool first, so that CI never passes by skipping."""
    if os.environ.get("NOVAGATE_REQUIRE_TOOLS"):
        pytest.fail(f"required under make test: {reason}")
    pytest.skip(reason)


async def barge_in(c) -> str:
    """A connected VoiceClient asks for a story, lets it play 2.5 s and talks over it (in real time:
    barge-in is about wall-clock timing); returns the interrupted item's id."""
    c.speed = 1.0
    await c.say(speech(STORY))
    await c.wait_for(lambda: any(x["type"] == "response.audio.start" for x in c.messages), 30)
    await asyncio.sleep(2.5)  # the story is playing
    await c.say(speech(HELLO))
    intr = await c.wait_for(lambda: next((x for x in c.messages if x["type"] == "interrupted"), None), 15)
    return intr["item_id"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Gateway:
    """A `novagate serve` process on loopback."""

    tmp: Path
    env: dict = field(default_factory=dict)
    port: int = 0
    proc: subprocess.Popen | None = None

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/voice"

    @property
    def trace(self) -> Path:
        return Path(self.env["NOVAGATE_ENGINE_TRACE"])

    def start(self, timeout: float = 60.0, port: int | None = None) -> Gateway:
        self.port = port or free_port()  # a given port: a restart on the same address
        env = {
            **os.environ,
            "NOVAGATE_HOST": "127.0.0.1",
            "NOVAGATE_PORT": str(self.port),
            "NOVAGATE_ENGINE": "local",
            "NOVAGATE_STORE": "sqlite",
            "NOVAGATE_SQLITE_PATH": str(self.tmp / "novagate.db"),
            "NOVAGATE_SECRET_FILE": str(self.tmp / "secret"),
            "NOVAGATE_LOCAL_ASR": "sphinx",
            "NOVAGATE_LOCAL_TTS": "espeak",
            "NOVAGATE_LOCAL_GRAMMAR": GRAMMAR,
            "NOVAGATE_LOCAL_ENDPOINT_MS": "600",
            "NOVAGATE_ENGINE_TRACE": str(self.tmp / "engine-trace.jsonl"),
            "NOVAGATE_HANDSHAKE_TIMEOUT": "1.5",
            "NOVAGATE_METRICS_PORT": "0",  # /metrics on the serving port: many gateways run at once
            "NOVAGATE_WORKERS": "1",  # one process unless a test asks for workers (tests/test_workers.py)
            # no overload refusals unless a test asks (tests/test_overload.py): the suite runs many processes per
            # core, so a gateway's loop runs late because of its neighbours, not its own load
            "NOVAGATE_OVERLOAD_LAG_MS": "0",
            "NOVAGATE_OVERLOAD_CPU": "0",
            **self.env,
        }
        self.env = env
        log = open(self.tmp / f"gateway-{self.port}.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve"], env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited {self.proc.returncode}: {self.logs()[-2000:]}")
            try:
                if httpx.get(self.http + "/readyz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("gateway did not become ready")

    def logs(self) -> str:
        return (self.tmp / f"gateway-{self.port}.log").read_text(errors="replace")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()


def _wait(check, what: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            if check():
                return
        except (OSError, httpx.HTTPError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not start")


@dataclass
class AwsStack:
    """The project's wire-level stand-ins for AWS, as separate processes: the Nova Sonic emulator
    (HTTP/2 + TLS + event stream, the local engine behind it) and the Agent Runtime fake."""

    tmp: Path
    # how the emulator's engine hears and speaks (default: the deterministic local engine)
    engine_args: tuple = ("--asr", "sphinx", "--tts", "espeak", "--grammar", GRAMMAR, "--endpoint-ms", "600")
    procs: list = field(default_factory=list)
    nova_port: int = 0
    fake_port: int = 0
    bundle: str = ""

    def start(self) -> AwsStack:
        from gateway.emulate.nova import make_test_tls

        _ca, cert, key, self.bundle = make_test_tls(self.tmp / "tls")
        self.nova_port, self.fake_port = free_port(), free_port()
        log = open(self.tmp / "aws-stack.log", "wb")
        nova = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "emulate", "nova", "--port", str(self.nova_port),
             "--cert", cert, "--key", key, *self.engine_args, "--engine-trace", str(self.trace)],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        )
        fake = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "emulate", "agent-runtime", "--port", str(self.fake_port)],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        )
        self.procs = [nova, fake]
        _wait(lambda: socket.create_connection(("127.0.0.1", self.nova_port), 1).close() or True, "nova emulator", nova)
        _wait(lambda: httpx.get(self.fake_url + "/_fake/calls", timeout=1).status_code == 200, "agent runtime fake", fake)
        return self

    @property
    def trace(self) -> Path:
        return self.tmp / "engine-trace.jsonl"

    @property
    def fake_url(self) -> str:
        return f"http://127.0.0.1:{self.fake_port}"

    def fake(self, path: str, body: dict | None = None):
        """The fake's admin API (call counts, fault injection, forced expiry)."""
        url = f"{self.fake_url}/_fake/{path}"
        r = httpx.post(url, json=body or {}) if body is not None else httpx.get(url)
        r.raise_for_status()
        return r.json() if r.content else None

    def gateway_env(self) -> dict:
        return {
            "NOVAGATE_ENGINE": "bedrock",
            "NOVAGATE_STORE": "agent-runtime",
            "NOVAGATE_ENGINE_TRACE": str(self.trace),  # written by the emulator's engine
            "AWS_REGION": "us-east-1",
            "AWS_ACCESS_KEY_ID": "AKIDNOVAGATETEST",
            "AWS_SECRET_ACCESS_KEY": "novagate-test-secret",
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_ENDPOINT_URL_BEDROCK_RUNTIME": f"https://localhost:{self.nova_port}",
            "AWS_ENDPOINT_URL_BEDROCK_AGENT_RUNTIME": self.fake_url,
            "SSL_CERT_FILE": self.bundle,
        }

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.fixture(scope="session")
def aws_stack(tmp_path_factory):
    stack = AwsStack(tmp_path_factory.mktemp("aws")).start()
    yield stack
    stack.stop()


@pytest.fixture(scope="module", params=["local", "aws"])
def backend(request) -> dict:
    """Where the gateway's model and history live: the embedded default (local engine, SQLite), or
    Bedrock over the real SDKs against the project's AWS stand-ins (engine=bedrock, store=agent-runtime)."""
    if request.param == "aws":
        return request.getfixturevalue("aws_stack").gateway_env()
    return {}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, backend):
    """One gateway shared by a test module."""
    gw = Gateway(tmp_path_factory.mktemp("gw"), dict(backend)).start()
    yield gw
    gw.stop()


@pytest.fixture
def make_gateway(tmp_path, backend):
    """Gateways a test starts, kills and restarts itself (same store and secret unless told)."""
    started: list[Gateway] = []

    def make(**env) -> Gateway:
        gw = Gateway(tmp_path, {**backend, **{k: str(v) for k, v in env.items()}})
        started.append(gw)
        return gw.start()

    yield make
    for gw in started:
        gw.stop()
