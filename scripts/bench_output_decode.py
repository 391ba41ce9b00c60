#!/usr/bin/env python3
"""CPU per model output event (Nova → gateway) on the Bedrock wire path: the SDK's receiver
(`AWSEventReceiver.receive` + `orjson.loads(chunk.value.bytes_)`, what the gateway did before) against
gateway.bedrock.EventReader (our own event-stream decoder over the same response body).

Both read the same recorded-like stream: `--events` audioOutput chunks of 80 ms of 24 kHz PCM16 (as the
Nova emulator and Bedrock send them), a response body whose chunks are one message each (`--chunk 0`) or
`--chunk N` bytes. Receivers are built by the SDK's own protocol (`create_event_receiver`), as the client
builds them. Figures are `time.process_time` per event, the best of `--repeat` runs; printed, never asserted.

--wire adds the whole receive path on loopback: this process opens `--streams` BedrockTransport streams to
a Nova emulator subprocess (scripted engine, as scripts/bench_capacity.py runs it), speaks `--turns`
turns in real time on each and reads the replies, A B A B: the SDK's receiver (EventReader told the
receiver is of an unknown shape, so the SDK decodes: the code before) against EventReader. Figures are
this process's CPU (every thread: the CRT's too) per output event; the input side is the same in both.

    .venv/bin/python scripts/bench_output_decode.py [--events 1000] [--repeat 7] [--chunk 0]
    .venv/bin/python scripts/bench_output_decode.py --wire [--streams 10] [--turns 3] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway import bedrock  # noqa: E402
from gateway import eventstream as es  # noqa: E402
from protocol import nova_events as nova  # noqa: E402


def audio_frames(n: int) -> list[bytes]:
    ids = {"sessionId": str(uuid.uuid4()), "promptName": str(uuid.uuid4()), "completionId": str(uuid.uuid4())}
    content_id = str(uuid.uuid4())
    pcm = os.urandom(24000 * 2 * 80 // 1000)  # 80 ms, 24 kHz, 16-bit mono: 3,840 bytes
    return [es.output_chunk(nova.output_audio(ids, content_id, pcm)) for _ in range(n)]


class Response:
    """What the SDK's protocol reads of an HTTP response: its body (an async iterator of byte chunks)."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.body = self._chunks(chunks)

    @staticmethod
    async def _chunks(chunks: list[bytes]):
        for c in chunks:
            yield c


async def make_receiver(chunks: list[bytes]):
    from aws_sdk_bedrock_runtime.config import AsyncBedrockRuntimeConfig
    from aws_sdk_bedrock_runtime.models import (
        InvokeModelWithBidirectionalStreamOutput,
        _InvokeModelWithBidirectionalStreamOutputDeserializer,
    )

    config = await AsyncBedrockRuntimeConfig.resolve(region="us-east-1", transport=None)
    return config.protocol.create_event_receiver(
        operation=None, request=None, response=Response(chunks), event_type=InvokeModelWithBidirectionalStreamOutput,
        event_deserializer=_InvokeModelWithBidirectionalStreamOutputDeserializer().deserialize, context=None)


async def sdk_path(receiver) -> list:
    import orjson

    out = []
    while (ev := await receiver.receive()) is not None:
        out.append(orjson.loads(ev.value.bytes_))
    return out


async def our_path(receiver) -> list:
    return [event async for event in bedrock.EventReader(receiver)]


def split(frames: list[bytes], size: int) -> list[bytes]:
    if size <= 0:
        return frames
    body = b"".join(frames)
    return [body[i:i + size] for i in range(0, len(body), size)]


async def measure(path, chunks: list[bytes], repeat: int, n: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        receiver = await make_receiver(chunks)  # set-up, not timed
        t0 = time.process_time()
        events = await path(receiver)
        best = min(best, time.process_time() - t0)
        assert len(events) == n
    return best / n * 1e6


async def wire_run(endpoint: str, sdk: bool, streams: int, turns: int) -> tuple[float, int]:
    """(CPU seconds, output events) of `streams` talking streams, read by the SDK or by EventReader."""
    import numpy as np

    real = bedrock._response_body
    if sdk:
        bedrock._response_body = lambda receiver: None
    t = np.arange(960) / 16000  # 60 ms at 16 kHz
    speech = (np.sin(2 * np.pi * 220 * t) * 12000).astype("<i2").tobytes()
    silence = bytes(len(speech))
    transport = bedrock.BedrockTransport(region="us-east-1", endpoint_url=endpoint)
    counts = []

    async def talk(i: int) -> None:
        stream = await transport.open()
        p, a = f"p{i}", f"a{i}"
        received = 0

        async def read() -> None:
            nonlocal received
            while await stream.receive() is not None:
                received += 1

        reader = asyncio.create_task(read())
        for ev in [nova.session_start(), nova.prompt_start(p), *nova.text_block(p, "SYSTEM", ["Be terse."]),
                   nova.audio_content_start(p, a)]:
            await stream.send(ev)
        for _ in range(turns):  # 1.2 s of tone, then 4.8 s of silence while the reply plays
            for k in range(100):
                await stream.send(nova.audio_input(p, a, speech if k < 20 else silence))
                await asyncio.sleep(0.06)
        for ev in (nova.content_end(p, a), nova.prompt_end(p), nova.session_end()):
            await stream.send(ev)
        await asyncio.wait_for(reader, 30)
        await stream.close()
        counts.append(received)

    try:
        t0 = time.process_time()
        await asyncio.gather(*(talk(i) for i in range(streams)))
        cpu = time.process_time() - t0
    finally:
        bedrock._response_body = real
        await transport.aclose()
    return cpu, sum(counts)


async def wire(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_capacity import start_emulator

    emu, endpoint, bundle = start_emulator(100)
    os.environ.update(SSL_CERT_FILE=bundle, AWS_ACCESS_KEY_ID="AKIDNOVAGATEEMULATOR",
                      AWS_SECRET_ACCESS_KEY="novagate-emulator-secret", AWS_REGION="us-east-1")
    try:
        print(f"\n--wire: {args.streams} streams x {args.turns} turns against the Nova emulator at {endpoint} "
              "(CPU of this process, every thread)")
        await wire_run(endpoint, False, 2, 1)  # warm up: imports, TLS
        for _ in range(args.rounds):
            figures = {}
            for name, sdk in (("SDK receiver", True), ("EventReader", False)):
                cpu, events = await wire_run(endpoint, sdk, args.streams, args.turns)
                figures[name] = cpu / events * 1e6
                print(f"  {name:<12}: {cpu:6.2f} s CPU for {events} output events = {figures[name]:6.1f} µs/event")
            sdk_us, ours_us = figures["SDK receiver"], figures["EventReader"]
            print(f"  ratio {ours_us / sdk_us:.3f} ({sdk_us - ours_us:+.1f} µs less per event)")
    finally:
        emu.send_signal(signal.SIGINT)
        emu.wait(10)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--chunk", type=int, default=0, help="body chunk size in bytes (0: one message per chunk)")
    ap.add_argument("--wire", action="store_true", help="also the whole receive path against the emulator")
    ap.add_argument("--streams", type=int, default=10)
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    frames = audio_frames(args.events)
    chunks = split(frames, args.chunk)
    assert await sdk_path(await make_receiver(chunks)) == await our_path(await make_receiver(chunks))  # the same events
    print(f"{args.events} audioOutput events of {len(frames[0])} bytes, body in {len(chunks)} chunks, "
          f"best of {args.repeat} (time.process_time)")
    for _ in range(2):  # interleaved, twice: the machine may be busy
        sdk = await measure(sdk_path, chunks, args.repeat, args.events)
        ours = await measure(our_path, chunks, args.repeat, args.events)
        print(f"  SDK receiver + orjson: {sdk:7.1f} µs/event   EventReader: {ours:6.1f} µs/event   "
              f"ratio {ours / sdk:.3f} ({sdk / ours:.1f}x less CPU)")
    if args.wire:
        await wire(args)


if __name__ == "__main__":
    asyncio.run(main())
