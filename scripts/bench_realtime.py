"""What the OpenAI Realtime wire format costs the gateway per second of audio, against /v1/voice.

/v1/voice carries PCM in binary frames, which the gateway passes on as they are. /v1/realtime carries
it as base64 inside JSON events: every input event is parsed and decoded, every output frame encoded
into an event. This measures that translation alone (protocol/realtime.py's hot paths, on this
machine, one core), A B A B against the native path's per-frame work, and prints microseconds of CPU
per second of audio each way. The rest of a session's cost (the model transport, the store) is the
same on both endpoints: docs/capacity.md.

    python scripts/bench_realtime.py [--seconds 20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import base64
import os
import sys
import time

import orjson

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from protocol import messages as m  # noqa: E402
from protocol.realtime import RealtimeSession, _Item, _Response  # noqa: E402

RATE = 24000
IN_FRAME = RATE * 2 // 10    # a client's 100 ms append
OUT_FRAME = RATE * 2 // 25   # a 40 ms frame of the model's audio, as the pacer sends it


def native_in(frames: list[bytes]) -> None:
    for f in frames:  # the socket hands the session the bytes it read
        len(f)


def realtime_in(events: list[str]) -> None:
    for text in events:  # RealtimeSession.receive_text + _input_audio_buffer_append, without the session
        event = orjson.loads(text)
        pcm = base64.b64decode(event["audio"], validate=True)
        for i in range(0, len(pcm), m.MAX_FRAME_BYTES):
            pcm[i:i + m.MAX_FRAME_BYTES]


def native_out(frames: list[bytes], sent: list) -> None:
    for f in frames:
        sent.append(f)


def realtime_out(adapter: RealtimeSession, frames: list[bytes]) -> None:
    for f in frames:
        adapter._audio(f)
    adapter._out.clear()


def cpu(fn, *args) -> float:
    t = time.process_time()
    fn(*args)
    return time.process_time() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=20.0, help="seconds of audio each way per round")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    pcm_in = os.urandom(int(args.seconds * RATE * 2))
    frames_in = [pcm_in[i:i + IN_FRAME] for i in range(0, len(pcm_in), IN_FRAME)]
    events_in = [orjson.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(f).decode()}).decode()
                 for f in frames_in]
    frames_out = [pcm_in[i:i + OUT_FRAME] for i in range(0, len(pcm_in), OUT_FRAME)]
    adapter = RealtimeSession.__new__(RealtimeSession)  # only the audio path: no session behind it
    adapter._out, adapter._events = [], 0
    adapter._audio_item = _Item("item_" + "0" * 32, _Response("resp_" + "0" * 32))
    adapter._audio_item.response.items.append(adapter._audio_item)
    totals = {"voice in": 0.0, "realtime in": 0.0, "voice out": 0.0, "realtime out": 0.0}
    for r in range(args.rounds):  # A B A B
        totals["voice in"] += cpu(native_in, frames_in)
        totals["realtime in"] += cpu(realtime_in, events_in)
        totals["voice out"] += cpu(native_out, frames_out, [])
        totals["realtime out"] += cpu(realtime_out, adapter, frames_out)
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    audio_s = args.seconds * args.rounds
    print(f"CPU per second of 24 kHz audio ({args.rounds} rounds of {args.seconds:g} s, A B A B):")
    for name, seconds in totals.items():
        print(f"  {name:13s} {seconds / audio_s * 1e6:8.1f} µs")
    wire_in = sum(len(e) for e in events_in) / len(pcm_in)
    print(f"  bytes on the wire, realtime / voice: {wire_in:.2f}x (base64 in JSON)")


if __name__ == "__main__":
    main()
