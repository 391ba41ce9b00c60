"""Stream rotation overhead: a conversation of scripted turns with streams rotated every few seconds.

Prints: rotations, how long the next stream took to set up (in the background, while the current
one kept serving), and the exact frame accounting (what the client sent vs what the engines heard).
The switch itself is one synchronous step of the session between two frames: nothing waits on it.
Run: make bench-rotation
"""

from __future__ import annotations

import asyncio
import pathlib
import re
import statistics
import sys
import tempfile
import time

import httpx
import orjson

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from gateway.client import ClientState, VoiceClient  # noqa: E402
from tests.conftest import DISCUSS, HELLO, MET, Gateway, speech  # noqa: E402

ROTATE_AFTER_S = 4
SESSION_S = 60


def metric(text: str, name: str, **labels) -> float:
    sel = ",".join(f'{k}="{v}"' for k, v in labels.items())
    m = re.search(rf"^{name}\{{{re.escape(sel)}\}} (\S+)$" if labels else rf"^{name} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


async def main() -> None:
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="novagate-bench-"))
    gw = Gateway(tmp, {"NOVAGATE_ROTATE_AFTER_S": str(ROTATE_AFTER_S), "NOVAGATE_ROTATE_FORCE_AFTER_S": "120"}).start()
    try:
        c = VoiceClient(gw.ws, state=ClientState())
        await c.connect()
        t0 = time.monotonic()
        turns = 0
        while time.monotonic() - t0 < SESSION_S:
            await c.turn(speech([MET, HELLO, DISCUSS][turns % 3]), timeout=60)
            turns += 1
            await asyncio.sleep(2)
        elapsed = time.monotonic() - t0
        await c.close()
        await asyncio.sleep(1)
        text = httpx.get(gw.http + "/metrics").text
        logs = [orjson.loads(x) for x in gw.logs().splitlines() if x.startswith("{")]
        rot = [x for x in logs if x.get("msg") == "model stream rotated"]
        trace = [orjson.loads(x) for x in gw.trace.read_text().splitlines()]
        heard = sum(x["bytes"] for x in trace if x["event"] == "audioInput")
        client = metric(text, "novagate_model_audio_bytes_total", source="client")
        keepalive = metric(text, "novagate_model_audio_bytes_total", source="keepalive")
        replay = metric(text, "novagate_model_audio_bytes_total", source="replay")
        setup = [x["setup_ms"] for x in rot]
        print(f"session: {elapsed:.1f} s, {turns} spoken turns, rotate after {ROTATE_AFTER_S} s (local engine)")
        print(f"rotations: {len(rot)} ({sum(1 for x in rot if x['forced'])} forced)")
        if rot:
            print(f"next-stream setup (background): median {statistics.median(setup):.2f} ms, max {max(setup):.2f} ms")
        print(f"audio: client sent {c.audio_sent} B, gateway forwarded {client:.0f} B from the client, "
              f"{keepalive:.0f} B keepalive, {replay:.0f} B replayed; engines heard {heard} B")
        print(f"frames lost: {c.audio_sent - client:.0f} B; sent twice: {heard - client - keepalive:.0f} B")
    finally:
        gw.stop()


if __name__ == "__main__":
    asyncio.run(main())
