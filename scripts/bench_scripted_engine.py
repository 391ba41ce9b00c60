"""CPU cost of the scripted engine (NOVAGATE_ENGINE=scripted): N streams talking in real time.

Drives ScriptedEngine directly (no sockets), like tests/test_scripted_engine.py. Each stream gets the input a
gateway gives Nova: a 32 ms audioInput event every 32 ms (16 kHz PCM16), in a cycle of `--speech-s` of a
loud burst then silence until the cycle (`--cycle-s`) ends; the engine hears the end of each utterance
after its 700 ms endpoint and answers with the canned reply (a 2 s tone at 24 kHz, paced in real time, 1.5 s
ahead). One ticker feeds every stream (their cycles staggered) and one reader per stream drains the output
without parsing it, so the driver costs little; it is measured alone too (the same input into streams that
discard it) and subtracted.

Prints process CPU seconds (user + system, every thread) per stream-minute of real-time talk.

    .venv/bin/python scripts/bench_scripted_engine.py [--streams 20] [--seconds 60]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.local import ScriptedEngine, scripted_config  # noqa: E402
from protocol import nova_events as nv  # noqa: E402

CHUNK = 1024  # 32 ms of 16 kHz PCM16, the service's typical input frame
TICK_S = CHUNK / 2 / 16000


def cycle_pcm(speech_s: float, cycle_s: float) -> list[bytes]:
    """One cycle of microphone input in 32 ms chunks: a burst (about -20 dBFS) then silence."""
    n = int(round(cycle_s / TICK_S))
    t = np.arange(int(16000 * speech_s)) / 16000
    rng = np.random.default_rng(3)
    x = (np.sin(2 * np.pi * 300 * t) + 0.3 * rng.standard_normal(t.size)) * 0.1
    loud = (x * 32767).astype("<i2").tobytes()
    pcm = loud + bytes(n * CHUNK - len(loud))
    return [pcm[i * CHUNK : (i + 1) * CHUNK] for i in range(n)]


class NullStream:
    """Takes the input and says nothing: the driver's own cost."""

    def __init__(self) -> None:
        self._done = asyncio.Event()

    async def send(self, event: dict) -> None:
        if "sessionEnd" in event["event"]:
            self._done.set()

    async def receive(self) -> dict | None:
        await self._done.wait()
        return None

    async def close(self) -> None:
        self._done.set()


async def run(open_stream, streams: int, seconds: float, chunks: list[bytes]) -> dict:
    opened = []
    for _ in range(streams):
        stream = await open_stream()
        prompt, audio = nv.new_name(), nv.new_name()
        await stream.send(nv.session_start())
        await stream.send(nv.prompt_start(prompt, output_sample_rate=24000))
        for e in nv.text_block(prompt, "SYSTEM", ["You are a friendly assistant."]):
            await stream.send(e)
        await stream.send(nv.audio_content_start(prompt, audio))
        events = [nv.audio_input(prompt, audio, c) for c in chunks]  # base64 once: the driver stays cheap
        opened.append((stream, prompt, audio, events))
    counts = {"events": 0, "audio": 0, "usage": 0, "interrupted": 0}

    async def reader(stream) -> None:
        while (raw := await stream.receive()) is not None:
            name = next(iter(raw["event"]))
            counts["events"] += 1
            if name == "audioOutput":
                counts["audio"] += 1
            elif name == "usageEvent":
                counts["usage"] += 1
            elif name == "contentEnd" and raw["event"][name].get("stopReason") == "INTERRUPTED":
                counts["interrupted"] += 1

    readers = [asyncio.create_task(reader(s)) for s, *_ in opened]
    ticks = int(seconds / TICK_S)
    n = len(chunks)
    phase = [i * n // streams for i in range(streams)]  # stagger the streams' turns
    wall, cpu = time.perf_counter(), time.process_time()
    next_at = time.monotonic()
    late = 0.0
    for tick in range(ticks):
        for (stream, _, _, events), p in zip(opened, phase):
            await stream.send(events[(tick + p) % n])
        next_at += TICK_S
        delay = next_at - time.monotonic()
        late = max(late, -delay)
        await asyncio.sleep(max(0.0, delay))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    seen = dict(counts)  # before ending the streams closes their open blocks
    for stream, prompt, audio, _ in opened:
        for e in (nv.content_end(prompt, audio), nv.prompt_end(prompt), nv.session_end()):
            await stream.send(e)
    await asyncio.wait_for(asyncio.gather(*readers), 10)
    for stream, *_ in opened:
        await stream.close()
    return {"cpu": cpu, "wall": wall, "talk_s": ticks * TICK_S, "late": late, **seen}


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=60.0, help="real-time talk per run")
    ap.add_argument("--speech-s", type=float, default=1.5, help="speech per cycle")
    ap.add_argument("--cycle-s", type=float, default=5.0, help="one turn: speech, endpoint, reply, pause")
    ap.add_argument("--reply-s", type=float, default=2.0, help="seconds of the canned reply's audio")
    args = ap.parse_args()
    chunks = cycle_pcm(args.speech_s, args.cycle_s)

    base = await run(_null, args.streams, args.seconds, chunks)
    engine = ScriptedEngine(scripted_config(reply_s=args.reply_s))
    try:
        r = await run(engine.open, args.streams, args.seconds, chunks)
    finally:
        await engine.aclose()

    minutes = args.streams * r["talk_s"] / 60
    per_min = r["cpu"] / minutes
    driver = base["cpu"] / (args.streams * base["talk_s"] / 60)
    print(f"scripted engine, {args.streams} streams x {r['talk_s']:.0f} s in real time "
          f"(a {args.speech_s:g} s utterance every {args.cycle_s:g} s, {args.reply_s:g} s replies)")
    print(f"  turns answered {r['usage']}, audioOutput chunks {r['audio']}, output events {r['events']}, "
          f"interrupted blocks {r['interrupted']}; ticker at most {r['late'] * 1000:.0f} ms late")
    print(f"  process CPU {r['cpu']:.2f} s over {r['wall']:.1f} s wall ({100 * r['cpu'] / r['wall']:.1f}% of one core)")
    print(f"  driver alone {driver:.4f} CPU s per stream-minute")
    print(f"  engine: {per_min - driver:.4f} CPU s per stream-minute ({per_min:.4f} with the driver); "
          f"one core runs ~{60 / max(per_min - driver, 1e-9):.0f} such streams")
    return 0


async def _null():
    return NullStream()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
