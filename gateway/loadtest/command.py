"""`novagate loadtest`: the command line of the load tool (docs/loadtest.md)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from protocol.messages import CLIENT_OUTPUT_RATES, CODECS


def locustfile_path() -> Path:
    return Path(__file__).with_name("locustfile.py")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="ws://127.0.0.1:8000/v1/voice",
                   help="the gateway's WebSocket URL (http(s) and a bare host work too: /v1/voice is added)")
    p.add_argument("-n", "--sessions", type=int, default=10, help="simulated users (default 10)")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--ramp", type=float, default=0.0, help="seconds over which the sessions start, evenly")
    start.add_argument("--rate", type=float, help="sessions started per second (instead of --ramp)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds the run lasts, ramp included (default 60)")
    p.add_argument("--wav", help="16-bit mono WAV spoken every turn (8/16/24/48 kHz sent as is, other rates "
                   "resampled); default: a bundled 2.8 s utterance")
    p.add_argument("--text-every", type=int, default=0, metavar="K", help="every K-th turn is typed (input.text)")
    p.add_argument("--reconnect-every", type=float, default=0.0, metavar="S",
                   help="each session closes and resumes with its resume token every S seconds (between turns)")
    p.add_argument("--think", type=float, default=1.0, help="seconds of silence after a reply before the next turn")
    p.add_argument("--turn-timeout", type=float, default=30.0, help="seconds from end of speech to a complete reply")
    tok = p.add_mutually_exclusive_group()
    tok.add_argument("--token", help="bearer token for an authenticated gateway (prefer --token-file: a command "
                     "line is visible in ps)")
    tok.add_argument("--token-file", help="file holding the bearer token")
    p.add_argument("--output-rate", type=int, default=None, choices=CLIENT_OUTPUT_RATES,
                   help="audio.output_sample_rate (default 24000; mu-law: 8000)")
    p.add_argument("--codec", default="pcm16", choices=CODECS,
                   help="audio both ways: pcm16 (default), opus (raw 20 ms packets: 16 kHz up, 24 kHz down) or mulaw "
                   "(G.711, 8 kHz): a mobile app's load; the summary's `wire` says the bytes per session")
    p.add_argument("--voice")
    p.add_argument("--gap-ms", type=float, default=100.0,
                   help="received audio this far behind real-time playback counts as a gap (default 100)")
    p.add_argument("--no-deflate", action="store_true",
                   help="do not offer permessage-deflate (browsers do; novagate declines it, other servers may "
                   "accept it and pay CPU on every audio frame)")
    p.add_argument("--metrics-url", action="append", default=[], metavar="URL",
                   help="the gateway's Prometheus /metrics (e.g. http://127.0.0.1:9090/metrics); repeat for "
                   "several instances: samples are summed")
    p.add_argument("--metrics-interval", type=float, default=1.0, help="seconds between scrapes (default 1)")
    p.add_argument("--processes", type=int, default=0, metavar="P",
                   help="load generator processes (one drives about 150 sessions per core); default: one per 150 "
                   "sessions, at most one per core")
    p.add_argument("--out", help="write the JSON summary here")
    p.add_argument("--html", help="write the HTML report here (needs the loadtest extra: matplotlib)")
    p.add_argument("--seed", type=int, help="seed of the jitter (start offsets, reconnect delays)")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.add_argument("--locustfile", action="store_true", help="print the path of the shipped locustfile and exit")


def main(args: argparse.Namespace) -> int:
    if args.locustfile:
        print(locustfile_path())
        return 0
    from .report import MissingMatplotlib, write_html
    from .runner import Options, run

    if args.html:
        try:
            import matplotlib  # noqa: F401 — fail before the run, not after it
        except ImportError:
            print("novagate loadtest: --html needs matplotlib: pip install 'novagate[loadtest]'", file=sys.stderr)
            return 2
    token = args.token
    if args.token_file:
        try:
            token = Path(args.token_file).read_text().strip()
        except OSError as e:
            print(f"novagate loadtest: cannot read the token file: {e.strerror}", file=sys.stderr)
            return 2
    if args.sessions < 1 or args.duration <= 0:
        print("novagate loadtest: --sessions must be at least 1 and --duration positive", file=sys.stderr)
        return 2
    options = Options(
        url=args.url, sessions=args.sessions, ramp=args.ramp, rate=args.rate, duration=args.duration, wav=args.wav,
        text_every=args.text_every, reconnect_every=args.reconnect_every, think=args.think,
        turn_timeout=args.turn_timeout, token=token or None, output_rate=args.output_rate, voice=args.voice,
        codec=args.codec,
        gap_ms=args.gap_ms, deflate=not args.no_deflate, metrics_urls=args.metrics_url,
        metrics_interval=args.metrics_interval, processes=args.processes, seed=args.seed,
    )
    try:
        summary = asyncio.run(run(options, progress=None if args.quiet else sys.stderr))
    except (OSError, ValueError, EOFError) as e:  # the WAV: missing, not 16-bit mono, empty
        print(f"novagate loadtest: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # a generator process did not start
        print(f"novagate loadtest: {e}", file=sys.stderr)
        return 1
    print(summary.text(), flush=True)
    if args.out:
        summary.write_json(args.out)
        print(f"summary: {args.out}")
    if args.html:
        try:
            write_html(summary, args.html)
            print(f"report: {args.html}")
        except MissingMatplotlib as e:
            print(f"novagate loadtest: {e}", file=sys.stderr)
            return 2
    return 0 if summary.sessions["connected"] else 1
