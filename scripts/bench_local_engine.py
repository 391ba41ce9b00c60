"""Local engine latency on the demo configuration (whisper ASR + hibari TTS, the defaults).

Drives LocalEngine directly (no sockets), like tests/test_local_engine.py: loads the models
(`warm()`, first time in this process), then runs spoken turns. The user's speech (espeak, 16 kHz,
then 1 s of silence so the endpoint triggers) is fed faster than real time and the reply is
produced at once (lookahead 60 s), so the figures are the engine's own work: ASR + policy + TTS.
Per turn, from the last input frame sent: the USER transcript, the first reply audio chunk, the
end of the reply (usageEvent); plus the reply's audio length and the real-time factor.

    .venv/bin/python scripts/bench_local_engine.py [--turns 5] [--asr whisper] [--tts hibari]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.local import LocalEngine, LocalEngineConfig, speech  # noqa: E402
from protocol import nova_events as nv  # noqa: E402

SAID = "i met with doctor smith today at two pm"
CHUNK = 1024  # 32 ms of 16 kHz PCM16
RATE = 24000


async def turn(engine: LocalEngine, pcm: bytes) -> dict:
    """One spoken turn on a fresh stream; times are seconds from the last audioInput sent."""
    stream = await engine.open()
    prompt, audio = nv.new_name(), nv.new_name()
    try:
        await stream.send(nv.session_start())
        await stream.send(nv.prompt_start(prompt, output_sample_rate=RATE))
        for e in nv.text_block(prompt, "SYSTEM", ["You are a friendly assistant."]):
            await stream.send(e)
        await stream.send(nv.audio_content_start(prompt, audio))
        for i in range(0, len(pcm), CHUNK):
            await stream.send(nv.audio_input(prompt, audio, pcm[i : i + CHUNK]))
        t0 = time.monotonic()
        out: dict = {"transcript": None, "first_audio": None, "audio_s": 0.0, "user": ""}
        blocks: dict[str, tuple[str, str]] = {}
        async with asyncio.timeout(120):
            while (raw := await stream.receive()) is not None:
                ev = nv.parse_output_event(raw)
                now = time.monotonic() - t0
                if isinstance(ev, nv.ContentStart):
                    blocks[ev.content_id] = (ev.type, ev.role)
                elif isinstance(ev, nv.TextOutput) and blocks.get(ev.content_id) == ("TEXT", "USER"):
                    out["transcript"], out["user"] = now, ev.content
                elif isinstance(ev, nv.AudioOutput):
                    if out["first_audio"] is None:
                        out["first_audio"] = now
                    out["audio_s"] += len(ev.pcm) / 2 / RATE
                elif isinstance(ev, nv.UsageEvent):
                    out["done"] = now
                    break
        return out
    finally:
        await stream.close()


def median(xs: list[float]) -> str:
    xs = [x for x in xs if x is not None]
    return f"{statistics.median(xs):.2f}" if xs else "-"


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--asr", default="whisper", choices=speech.ASR_BACKENDS)
    ap.add_argument("--tts", default="hibari", choices=speech.TTS_BACKENDS)
    args = ap.parse_args()

    pcm = speech.synthesize(SAID, 16000, "espeak") + b"\0\0" * 16000
    grammar = (SAID,) if args.asr == "sphinx" else ()
    engine = LocalEngine(LocalEngineConfig(asr=args.asr, tts=args.tts, grammar=grammar, lookahead_s=60.0))
    try:
        t = time.perf_counter()
        await engine.warm()
        warm_s = time.perf_counter() - t
        runs = [await turn(engine, pcm) for _ in range(args.turns)]
    finally:
        await engine.aclose()

    print(f"local engine, asr={args.asr} tts={args.tts}: warm() {warm_s:.2f} s (model load, first in this process)")
    print(f"{'turn':>4}  {'transcript':>10}  {'1st audio':>9}  {'reply done':>10}  {'audio':>6}  {'RTF':>5}  heard")
    for i, r in enumerate(runs, 1):
        rtf = r["done"] / r["audio_s"] if r["audio_s"] else float("nan")
        print(f"{i:>4}  {r['transcript'] or float('nan'):>10.2f}  {r['first_audio'] or float('nan'):>9.2f}  "
              f"{r['done']:>10.2f}  {r['audio_s']:>6.2f}  {rtf:>5.2f}  {r['user']!r}")
    print(f"median (s from the end of the input): transcript {median([r['transcript'] for r in runs])}, "
          f"first audio {median([r['first_audio'] for r in runs])}, reply done {median([r['done'] for r in runs])}; "
          f"warm + first turn {warm_s + runs[0]['done']:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
