"""gateway/websocket.py: the client socket's direct lane and its closing, on a real uvicorn on loopback
with a python-websockets client."""

from __future__ import annotations

import asyncio
import contextlib
import os
import types

import pytest
import uvicorn
import websockets
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from websockets.frames import Close, Frame, Opcode

from gateway.websocket import EXTENSION, LaneProtocol
from tests.conftest import free_port


class Sink:
    """What a session actor does with the lane, recorded."""

    def __init__(self, lane, *, budget: int | None = None):
        self.lane = lane
        self.budget = budget
        self.got: list[bytes | str] = []
        self.held = 0
        self.gone_count = 0
        self.changed = asyncio.Event()

    def message(self, data):
        self.got.append(data)
        self.held += len(data)
        if self.budget is not None and self.held > self.budget:
            self.lane.pause()
        self.changed.set()

    def gone(self):
        self.gone_count += 1
        self.changed.set()

    async def until(self, check, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while not check():
                self.changed.clear()
                await self.changed.wait()


@contextlib.asynccontextmanager
async def server(handler):
    """uvicorn with the lane protocol serving `handler(ws)` at /ws; yields the URL."""
    port = free_port()
    app = Starlette(routes=[WebSocketRoute("/ws", handler)])
    config = uvicorn.Config(app, host="127.0.0.1", port=port, ws=LaneProtocol, ws_per_message_deflate=False,
                            log_config=None, lifespan="off", ws_max_size=1 << 20)
    srv = uvicorn.Server(config)
    task = asyncio.create_task(srv.serve())
    while not srv.started:
        await asyncio.sleep(0.01)
    try:
        yield f"ws://127.0.0.1:{port}/ws"
    finally:
        srv.should_exit = True
        await asyncio.wait_for(task, 10)


def lane_app(state: dict, *, attach_after: asyncio.Event | None = None, budget: int | None = None, flood: int = 0):
    async def handler(ws):
        await ws.accept()
        lane = ws.scope["extensions"][EXTENSION]
        if attach_after is not None:
            await attach_after.wait()
        sink = state["sink"] = Sink(lane, budget=budget)
        lane.attach(sink)
        for _ in range(flood):  # audio the client has not read yet
            lane.write(bytes(64 * 1024))
        state["ready"].set()
        await state["done"].wait()

    return handler


def new_state() -> dict:
    return {"ready": asyncio.Event(), "done": asyncio.Event()}


async def test_messages_reach_the_sink_in_order_including_those_sent_before_it_attached():
    state, attach = new_state(), asyncio.Event()
    async with server(lane_app(state, attach_after=attach)) as url:
        async with websockets.connect(url) as c:
            await c.send(b"\x01\x02")
            await c.send("early text")
            await asyncio.sleep(0.2)  # both wait in uvicorn's ASGI queue, reading paused after the first
            attach.set()
            await state["ready"].wait()
            sink = state["sink"]
            for i in range(50):
                await c.send(bytes([i]) * 640)
            await c.send("é late")
            await sink.until(lambda: len(sink.got) == 53)
            assert sink.got[:2] == [b"\x01\x02", "early text"]
            assert sink.got[2:52] == [bytes([i]) * 640 for i in range(50)]
            assert sink.got[52] == "é late"
            assert all(type(m) in (bytes, str) for m in sink.got)
            assert sink.lane.transport.is_reading()  # no pause per message once attached

            assert sink.lane.write(b"\x00" * 960) and sink.lane.write("hello")
            assert await c.recv() == b"\x00" * 960 and await c.recv() == "hello"
            await c.close()
            await sink.until(lambda: sink.gone_count)
            assert not sink.lane.write(b"late")  # nothing is written to a closed socket
        state["done"].set()
    assert sink.gone_count == 1


async def test_a_sink_over_its_budget_stops_reading_until_it_resumes():
    state = new_state()
    async with server(lane_app(state, budget=64 * 1024)) as url:
        async with websockets.connect(url, max_queue=None) as c:
            await state["ready"].wait()
            sink = state["sink"]
            payloads = [os.urandom(32 * 1024) for _ in range(256)]

            async def send_all():
                for p in payloads:
                    await c.send(p)

            sender = asyncio.create_task(send_all())
            await sink.until(lambda: sink.held > 64 * 1024)
            await asyncio.sleep(0.3)
            assert not sink.lane.transport.is_reading()
            # what it holds is bounded by its budget plus what one read already held, not by what was sent
            assert sink.held < 64 * 1024 + 512 * 1024 < sum(map(len, payloads))
            async with asyncio.timeout(30):
                while len(sink.got) < len(payloads):  # the session's consumer empties its inbox and reads on
                    sink.held = 0
                    sink.lane.resume()
                    await asyncio.sleep(0.01)
            await sender
            assert sink.got == payloads  # all of it, in order
        state["done"].set()


async def test_a_text_frame_that_is_not_utf8_closes_1007():
    state = new_state()
    async with server(lane_app(state)) as url:
        async with websockets.connect(url) as c:
            await state["ready"].wait()
            c.protocol.send_frame(Frame(Opcode.TEXT, b"ok \xff\xfe"))
            c.send_data()  # bypasses the client's own UTF-8 encoding
            with contextlib.suppress(websockets.ConnectionClosed):
                await asyncio.wait_for(c.recv(), 5)
            assert c.protocol.close_rcvd is not None and c.protocol.close_rcvd.code == 1007
        await state["sink"].until(lambda: state["sink"].gone_count)
        state["done"].set()


async def test_the_close_frame_survives_input_the_server_has_not_read():
    """A client that reads slowly closes and keeps sending. Closing our socket with its input unread
    would reset the connection, and a reset throws away what the kernel has not sent yet: the audio
    before the close frame and the close frame (the client sees 1006; the live fuzzer's
    `frames_after_close`). The server half-closes and reads on instead."""
    state = new_state()
    async with server(lane_app(state, flood=64)) as url:  # 4 MiB the client is slow to read
        async with websockets.connect(url, max_queue=None, max_size=None) as c:
            c.transport.pause_reading()
            await state["ready"].wait()
            raw = [Frame(Opcode.CLOSE, Close(1000, "bye").serialize())]
            raw += [Frame(Opcode.BINARY, os.urandom(256 * 1024)) for _ in range(8)]
            c.transport.write(b"".join(f.serialize(mask=True, extensions=[]) for f in raw))
            await asyncio.sleep(0.5)
            c.transport.resume_reading()
            received = 0
            with contextlib.suppress(websockets.ConnectionClosed):
                async with asyncio.timeout(10):
                    while True:
                        received += len(await c.recv())
            assert received == 64 * 64 * 1024
            assert c.protocol.close_rcvd is not None and c.protocol.close_rcvd.code == 1000
        state["done"].set()


def test_a_socket_without_the_lane_is_refused_with_how_to_run_the_gateway():
    from gateway.actor import SessionActor

    ws = types.SimpleNamespace(scope={"type": "websocket", "extensions": {"websocket.http.response": {}}})
    with pytest.raises(RuntimeError, match="novagate serve"):
        SessionActor(ws, services=None, bearer=None)
