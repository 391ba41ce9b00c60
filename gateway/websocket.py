"""The client socket's WebSocket protocol: uvicorn's sans-I/O implementation (python-websockets'
`ServerProtocol` fed from `data_received`) with a direct lane for the session actor.

Through ASGI, each client frame is a dict on a queue, an awaited `receive()` in a reader task, and a
pause and resume of reading (uvicorn's backpressure: one message at a time); each frame written is an
awaited `send()` through the middleware stack. At 50 audio frames a second per session those
hand-offs cost more CPU than the session itself. So an app that finds the `novagate.lane` extension
in its scope may `attach(sink)` once it has accepted: from then on every message goes to
`sink.message(data)` (bytes or str) as it is parsed, in order, then `sink.gone()` once; the sink
bounds what it holds and calls `pause()` / `resume()`; `write()` sends a message now, `can_write()` and
`drained()` tell when the transport's buffer is full. Accepting,
closing and refusing an upgrade stay ASGI, and an app that never attaches (the Twilio endpoint) gets
plain ASGI.

Two fixes to uvicorn's protocol, both found by the live fuzzer (scripts/fuzz_live.py):
- Closing. After the closing handshake, or failing a connection, uvicorn closed the TCP connection at
  once; with the peer's frames still unread, that resets the connection, which can destroy our close
  frame before the peer reads it (the peer sees 1006). Here the close frame is followed by the end of
  the stream (python-websockets' `b""` marker: half-close), further input is read and discarded, and
  the socket closes when the peer has closed its side, or after LINGER_S.
- A text frame that is not UTF-8 fails the connection with 1007 whatever the protocol's state (uvicorn's
  own path raised inside the transport when the socket was already closing).
"""

from __future__ import annotations

from typing import Protocol as Interface

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.protocol import State

EXTENSION = "novagate.lane"
LINGER_S = 2.0  # after our close frame and end of stream: the peer's to close its side


class Sink(Interface):
    def message(self, data: bytes | str) -> None: ...
    def gone(self) -> None: ...


class _ToSink:
    """Stands in for uvicorn's ASGI receive queue once a sink is attached: what uvicorn would queue for
    the app goes to the sink instead."""

    def __init__(self, sink: Sink):
        self.sink = sink
        self.told_gone = False

    def put_nowait(self, msg: dict) -> None:
        if msg["type"] == "websocket.receive":
            data = msg.get("bytes")
            self.sink.message(data if data is not None else msg.get("text") or "")
        elif msg["type"] == "websocket.disconnect" and not self.told_gone:
            self.told_gone = True
            self.sink.gone()

    def empty(self) -> bool:
        return True


class LaneProtocol(WebSocketsSansIOProtocol):
    def handle_connect(self, event) -> None:
        super().handle_connect(event)
        if getattr(self, "scope", None) is not None:
            self.scope["extensions"][EXTENSION] = self

    # -- the lane ----------------------------------------------------------------------------------------
    def attach(self, sink: Sink) -> None:
        """Deliver from now on to `sink`, starting with what already waits for the app."""
        queue, self.queue = self.queue, _ToSink(sink)
        while not queue.empty():
            self.queue.put_nowait(queue.get_nowait())
        self.resume()

    def pause(self) -> None:
        if not self.read_paused and not self.transport.is_closing():
            self.read_paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.read_paused and not self.transport.is_closing():
            self.read_paused = False
            self.transport.resume_reading()

    def can_write(self) -> bool:
        """Open, and the transport's buffer under its high-water mark."""
        return self.writable.is_set() and self.open()

    def open(self) -> bool:
        return not (self.close_sent or self.disconnected or self.transport.is_closing())

    async def drained(self) -> None:
        """Returns once the transport's buffer is under its low-water mark (or the socket is gone)."""
        await self.writable.wait()  # uvicorn's: pause_writing clears it, resume_writing and a lost connection set it

    def write(self, data: bytes | str) -> bool:
        """Send one message now; False (and nothing sent) once the socket is closing or gone."""
        if not self.open() or self.conn.state is not State.OPEN:
            return False
        if type(data) is str:
            self.conn.send_text(data.encode())
        else:
            self.conn.send_binary(data)
        self.transport.write(b"".join(self.conn.data_to_send()))
        return True

    # -- uvicorn's delivery, without a pause per message once attached -----------------------------------
    def send_receive_event_to_app(self) -> None:
        data = self.frames[0] if len(self.frames) == 1 else b"".join(self.frames)
        self.frames = []
        if self.close_sent:
            return  # past our close: read on (for the peer's close frame), deliver nothing
        if type(data) is not bytes:
            data = bytes(data)
        if self.curr_msg_data_type == "text":
            try:
                text = data.decode()
            except UnicodeDecodeError:
                self.fail_invalid_utf8()
                return
            self.queue.put_nowait({"type": "websocket.receive", "text": text})
        else:
            self.queue.put_nowait({"type": "websocket.receive", "bytes": data})
        if not isinstance(self.queue, _ToSink):
            self.pause()  # plain ASGI: uvicorn's one message at a time; receive() resumes

    def fail_invalid_utf8(self) -> None:
        self.queue.put_nowait({"type": "websocket.disconnect", "code": 1007, "reason": "invalid UTF-8"})
        if self.conn.state is State.OPEN:
            self.conn.fail(1007, "invalid UTF-8")
        self.close_sent = True
        self.linger()

    # -- closing without losing the close frame -------------------------------------------------------------
    def handle_close(self, event) -> None:
        """The peer's close frame: the protocol has answered it (or it answers ours)."""
        if not self.close_sent and not self.transport.is_closing():
            close = self.conn.close_rcvd
            self.queue.put_nowait({"type": "websocket.disconnect", "code": close.code, "reason": close.reason})
        self.close_sent = True  # the protocol echoed it
        self.linger()

    def handle_parser_exception(self) -> None:
        """The peer broke the protocol: the protocol has failed the connection (its close frame is queued)."""
        if self.close_timer is not None:
            return  # already closing; what follows is discarded
        close = self.conn.close_sent
        self.queue.put_nowait({"type": "websocket.disconnect", "code": close.code if close else 1006,
                               "reason": close.reason if close else ""})
        self.close_sent = True
        self.linger()

    def linger(self) -> None:
        """Send what the protocol has, half-close at its end-of-stream marker, close after LINGER_S unless
        the peer closes first (eof_received closes the transport then)."""
        self.stop_keepalive()
        for chunk in self.conn.data_to_send():
            if chunk:
                self.transport.write(chunk)
            elif self.transport.can_write_eof():
                self.transport.write_eof()
        if self.close_timer is not None:
            self.close_timer.cancel()
        self.close_timer = self.loop.call_later(LINGER_S, self.transport.close)
