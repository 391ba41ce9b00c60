"""Shared fixtures: real gateway processes on loopback, scripted speech, clients."""

from __future__ import annotations

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

    def start(self, timeout: float = 60.0) -> Gateway:
        self.port = free_port()
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


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    """One gateway shared by a test module."""
    gw = Gateway(tmp_path_factory.mktemp("gw")).start()
    yield gw
    gw.stop()


@pytest.fixture
def make_gateway(tmp_path):
    """Gateways a test starts, kills and restarts itself (same store and secret unless told)."""
    started: list[Gateway] = []

    def make(**env) -> Gateway:
        gw = Gateway(tmp_path, {k: str(v) for k, v in env.items()})
        started.append(gw)
        return gw.start()

    yield make
    for gw in started:
        gw.stop()
