"""What the gateway's codecs (gateway/codecs.py, PyAV) cost per 20 ms frame, and their bit rates.

A session with `opus` or `mulaw` decodes every client frame and encodes every frame it sends (50 a
second each way while audio flows). This measures both on this machine, one core, in rounds that
alternate the codecs (A B A B), on speech-like audio (a tone with noise), and prints microseconds of
CPU per frame, the share of a core for one talking session, and kbit/s on the wire.

    python scripts/bench_codecs.py [--seconds 10] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from gateway import codecs  # noqa: E402

CASES = {  # codec: (rate the client encodes at, rate the gateway encodes at)
    "opus": (16000, 24000),
    "mulaw": (8000, 8000),
}


def audio(rate: int, seconds: float) -> bytes:
    t = np.arange(int(rate * seconds)) / rate
    rng = np.random.default_rng(1)
    x = np.sin(2 * np.pi * 220 * t) * 6000 * (1 + np.sin(2 * np.pi * 3 * t)) / 2 + rng.normal(0, 300, len(t))
    return x.astype("<i2").tobytes()


def frames(pcm: bytes, rate: int) -> list[bytes]:
    n = rate // 50 * 2
    return [pcm[i:i + n] for i in range(0, len(pcm) - n + 1, n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    totals = {c: {"decode": 0.0, "encode": 0.0, "frames": 0, "bytes_in": 0, "bytes_out": 0} for c in CASES}
    for r in range(args.rounds):
        for codec, (client_rate, out_rate) in CASES.items():
            t = totals[codec]
            # what the client sends, encoded by the client (not timed), then decoded by the gateway (timed)
            client = codecs.encoder(codec, client_rate)
            packets = [client(f) for f in frames(audio(client_rate, args.seconds), client_rate)]
            decode, _ = codecs.decoder(codec)
            c0 = time.process_time()
            for p in packets:
                decode(p)
            t["decode"] += time.process_time() - c0
            # what the gateway sends: the model's PCM encoded (timed)
            encode = codecs.encoder(codec, out_rate)
            pcm_frames = frames(audio(out_rate, args.seconds), out_rate)
            c0 = time.process_time()
            out = [encode(f) for f in pcm_frames]
            t["encode"] += time.process_time() - c0
            t["frames"] += len(packets)
            t["bytes_in"] += sum(map(len, packets))
            t["bytes_out"] += sum(map(len, out))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    seconds = args.seconds * args.rounds
    print(f"per 20 ms frame, CPU of one core ({args.rounds} rounds of {args.seconds:g} s, codecs alternating):")
    print(f"  {'codec':6s} {'decode µs':>10s} {'encode µs':>10s} {'core %/session':>15s} {'kbit/s in':>10s} "
          f"{'kbit/s out':>11s}")
    for codec, t in totals.items():
        dec, enc = t["decode"] / t["frames"] * 1e6, t["encode"] / t["frames"] * 1e6
        share = (t["decode"] + t["encode"]) / seconds * 100  # both ways flowing at once: the upper bound
        print(f"  {codec:6s} {dec:10.1f} {enc:10.1f} {share:15.2f} {t['bytes_in'] * 8 / seconds / 1000:10.1f} "
              f"{t['bytes_out'] * 8 / seconds / 1000:11.1f}")
    print("  pcm16  (no codec: the frames are passed on as they are; 256 kbit/s in at 16 kHz, 384 out at 24 kHz)")


if __name__ == "__main__":
    main()
