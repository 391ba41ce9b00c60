"""The reference client honours the server's retry hint: refused as overloaded (an `error` with
`retry_after_ms`, then close 1013), it does not try again before the hint, then gets in."""

from __future__ import annotations

import asyncio
import time

import orjson
import websockets

from gateway.client import ClientState, VoiceClient


async def test_an_overloaded_refusal_is_retried_after_its_hint_not_before():
    attempts: list[float] = []

    async def handler(ws):
        attempts.append(time.monotonic())
        await ws.recv()  # session.start
        if len(attempts) == 1:
            await ws.send(orjson.dumps({"type": "error", "code": "overloaded", "message": "the server is overloaded",
                                        "fatal": True, "retry_after_ms": 800}).decode())
            await ws.close(1013, "overloaded")
            return
        await ws.send(orjson.dumps({
            "type": "session.ready", "protocol": 1, "session_id": "s", "conversation_id": "c", "resume_token": "t",
            "resumed": False, "history": [], "history_length": 0,
            "audio": {"input_sample_rate": 16000, "output_sample_rate": 24000}, "voice": "matthew", "engine": "x",
        }).decode())
        await ws.wait_closed()

    async with websockets.serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        client = VoiceClient(f"ws://127.0.0.1:{port}/v1/voice", state=ClientState(), reconnect=True,
                             backoff_initial=0.01, backoff_max=0.02)
        ready = await asyncio.wait_for(client.connect(mic=False), 30)
        await client.close()
    assert ready["session_id"] == "s" and client.failed_attempts == [1013]
    assert attempts[1] - attempts[0] >= 0.8  # its own backoff alone would have tried again within 20 ms
