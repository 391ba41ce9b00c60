"""The live fuzzer (scripts/fuzz_live.py), bounded for the suite: about 5,000 random and mutated frames
and messages over 16 concurrent connections against a real gateway on the local engine, while a healthy
session pings every 200 ms and takes typed turns. Asserted: no findings (no close code the input does
not explain, no 1011, no abnormal closure, no hang, no crash, no ERROR in the server log) and every
healthy turn answered. Round-trip times are reported, not asserted. The full run (100,000 cases, 50
connections) is `scripts/fuzz_live.py --spawn`; see docs/fuzzing.md."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CASES = 5000
CONNECTIONS = 16
SEED = int(os.environ.get("NOVAGATE_FUZZ_SEED", "20261129"))  # fixed: the same cases every run


def load_fuzzer():
    if "fuzz_live" in sys.modules:
        return sys.modules["fuzz_live"]
    spec = importlib.util.spec_from_file_location("fuzz_live", ROOT / "scripts" / "fuzz_live.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["fuzz_live"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def backend() -> dict:
    return {}  # the embedded default only: the fuzzer targets the gateway, not the AWS stand-ins


@pytest.mark.timeout(400)
async def test_live_fuzz_finds_nothing_and_the_healthy_session_is_answered(make_gateway):
    fz = load_fuzzer()
    gw = make_gateway(
        NOVAGATE_MAX_SESSIONS=500,
        NOVAGATE_MAX_SOCKETS_PER_IP=0,        # every fuzzing connection comes from 127.0.0.1
        NOVAGATE_MAX_PENDING_HANDSHAKES=0,
        NOVAGATE_HANDSHAKE_TIMEOUT=5,         # the default: 4408 only for scripts that never start
    )
    cfg = fz.FuzzConfig(url=gw.ws, cases=CASES, connections=CONNECTIONS, seed=SEED, handshake_timeout=5.0,
                        max_seconds=120, min_turns=2, turn_timeout=45)
    server = fz.ServerHandle(proc=gw.proc, logs=[str(gw.tmp / f"gateway-{gw.port}.log")])
    report = await fz.run_fuzz(cfg, server=server)
    text = fz.summary(report, cfg)
    print(text)

    assert not report.fuzzer_errors, text
    assert sum(report.finding_kinds.values()) == 0, text
    assert report.cases >= CASES, text
    healthy = report.healthy
    assert healthy["turns"] >= 2 and healthy["answered"] == healthy["turns"], text
    assert healthy["pongs"] > 0, text
