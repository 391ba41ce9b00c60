"""What the sans-I/O session core costs per audio frame, on a live session, against another tree.

One `protocol.session.Session` is driven on the fake clock of tests/session_harness.py, with the
gateway's own voice activity detector (gateway.audio.SpeechActivity, webrtcvad): a client that
talks for 1.5 s and is silent for 2.5 s, over and over, in 20 ms frames, and a model that answers
each utterance (Nova 2's userSpeechStart/End, text, 2 s of audio paced to the client). Each call
the gateway makes is timed alone (thread CPU time, the timer's own cost subtracted), as the gateway
makes it: receive_audio (and the effects drained after it), next_deadline after every batch of
inputs, tick when it is due (at the deadline when that falls between two frames, as the gateway
wakes for it), model_event (a JSON event, as the transport hands it over). What the fake world does
with the effects is not counted.

With --baseline, each round runs the other tree (a subprocess that imports that tree's protocol,
gateway and tests packages) and then this one, A B A B, and prints the ratios this / baseline.

    .venv/bin/python scripts/bench_session.py [--seconds 60] [--rounds 3] [--baseline /work/main]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from array import array

HERE = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
CALLS = ("receive_audio", "next_deadline", "tick", "model_event")
TALK_S, PAUSE_S = 1.5, 2.5


def utterances(n: int, frames: int) -> list[list[bytes]]:
    """`n` utterances of `frames` 20 ms frames of a vowel-like sound webrtcvad calls speech (harmonics
    of 140 Hz); each frame's first sample is 1000 + the utterance's number, which the harness's fake
    model reads as the turn it hears."""
    wave = array("h", (int(2500 * sum(math.sin(2 * math.pi * 140 * h * i / 16000) / h for h in range(1, 8)))
                       for i in range(frames * 320))).tobytes()
    return [[array("h", [1000 + turn]).tobytes() + wave[k * 640 + 2:(k + 1) * 640] for k in range(frames)]
            for turn in range(n)]


def run(seconds: float) -> dict:
    """One round in this process (the tree on sys.path): µs of CPU per call, and how many calls."""
    import orjson

    import tests.session_harness as harness
    from gateway.audio import SpeechActivity

    harness.EnergyVAD = SpeechActivity  # the Harness builds its SessionEnv with this detector
    h = harness.Harness(eos_s=0.6)
    h.reply_ms = 2000
    h.speech_events = True
    h.connect()
    s, clock = h.s, time.thread_time_ns
    silence = harness.SILENCE
    spent = dict.fromkeys(CALLS, 0)
    calls = dict.fromkeys(CALLS, 0)
    overhead = min(-clock() + clock() for _ in range(1000))
    period = round((TALK_S + PAUSE_S) / harness.FRAME_S)
    talking = round(TALK_S / harness.FRAME_S)
    talk = utterances(50, talking)
    frames = round(seconds / harness.FRAME_S)
    warmup = round(2.0 / harness.FRAME_S)

    def timed(name: str, call, *args) -> None:
        """One session input and the effects it emits, timed; then the effects carried out (untimed)."""
        t = clock()
        call(*args, h.now)
        effects = s.effects()
        spent[name] += clock() - t - overhead
        calls[name] += 1
        for e in effects:
            h.perform(e)
        h.pump()

    def tick(at: float) -> None:
        h.now = at
        timed("tick", s.tick)

    d = None
    for n in range(-warmup, frames):
        if h.closed is not None:
            raise SystemExit(f"the session closed ({h.closed}) at {h.now:.2f} s")
        counting = n >= 0
        at = round(h.now + harness.FRAME_S, 6)
        if d is not None and h.now < d < at:  # the gateway wakes at the deadline, between two frames
            tick(d)
        h.now = at
        pcm = talk[n // period % len(talk)][n % period] if n % period < talking else silence
        timed("receive_audio", s.receive_audio, pcm)
        for t_open, sid in [o for o in h.opens if o[0] <= h.now]:
            h.opens.remove((t_open, sid))
            s.stream_opened(sid, h.now)
            h.pump()
        model = h.current_model
        for ev in (model.poll(h.now) if model is not None else []):
            timed("model_event", s.model_event, model.sid, orjson.dumps(ev))
        t = clock()
        d = s.next_deadline()
        spent["next_deadline"] += clock() - t - overhead
        calls["next_deadline"] += 1
        if d is not None and d <= h.now:
            tick(h.now)
            d = s.next_deadline()
        if not counting:
            spent = dict.fromkeys(CALLS, 0)
            calls = dict.fromkeys(CALLS, 0)
    return {"us": {k: spent[k] / 1000 / max(1, calls[k]) for k in CALLS}, "calls": calls,
            "turns": len(h.finals("user")), "timer_ns": overhead}


def round_in(tree: str, seconds: float) -> dict:
    """One round in a fresh process that imports `tree`."""
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", tree, "--seconds", str(seconds)],
                         cwd=tree, check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="seconds of session time per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--baseline", help="another checkout of novagate to compare against (A B A B)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        sys.path.insert(0, args.worker)
        print(json.dumps(run(args.seconds)))
        return
    trees = {"this": HERE} if not args.baseline else {"baseline": os.path.abspath(args.baseline), "this": HERE}
    results: dict[str, list[dict]] = {name: [] for name in trees}
    for r in range(args.rounds):
        for name, tree in trees.items():
            res = round_in(tree, args.seconds)
            results[name].append(res)
            print(f"round {r + 1}/{args.rounds} {name:8s} " + "  ".join(f"{k} {res['us'][k]:6.2f}" for k in CALLS),
                  file=sys.stderr)
    first = results[next(iter(trees))][0]
    print(f"µs of CPU per call, median of {args.rounds} rounds of {args.seconds:g} s "
          f"({first['calls']['receive_audio']} frames, {first['turns']} user turns, "
          + ", ".join(f"{first['calls'][k]} {k}" for k in CALLS[1:]) + "):")
    print(f"  {'':14s}" + "".join(f"{name:>10s}" for name in trees) + ("     ratio" if args.baseline else ""))
    for k in CALLS:
        med = {name: sorted(r["us"][k] for r in rs)[len(rs) // 2] for name, rs in results.items()}
        line = f"  {k:14s}" + "".join(f"{v:10.2f}" for v in med.values())
        if args.baseline:
            line += f"{med['this'] / med['baseline']:10.2f}"
        print(line)


if __name__ == "__main__":
    main()
