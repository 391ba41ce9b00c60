"""A stand-in gateway on loopback for client tests: just enough of PROTOCOL v1, driven by the test.

It answers `session.start` with `session.ready` (resuming the one conversation it knows when the
token is one it issued, with the items stored so far as `history`), stores the items of the receipts
a client hands back in `session.start.pending` and acknowledges them with `item.saved`, and records
everything the client sends. Anything else (transcripts, `tool.call`, `item.saved`) the test sends
itself, when it wants, through `transcript()`, `tool()`, `saved()` or `send()`: the test decides
what the "model" does, so nothing depends on an engine or on timing.

Over HTTP it serves `web/` (with the gateway's own Content-Security-Policy) and
`GET /v1/conversations/{id}/history`, so the browser app can be loaded from it as from a gateway.
It runs its own event loop in a thread; every method is called from the test's thread.
"""

from __future__ import annotations

import asyncio
import json
import mimetypes
import threading
import time
from pathlib import Path
from typing import Any, Callable

from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

ROOT = Path(__file__).resolve().parents[1]
WEB = ROOT / "web"
ENDED = ("finished", "failed", "timed_out", "cancelled")
_MISSING = object()


def _csp() -> str:
    try:
        from gateway.web import CSP
        return CSP
    except ImportError:  # pragma: no cover - the gateway's module is always there in this repository
        return "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self' ws: wss:"


class FakeVoiceServer:
    def __init__(self, *, conversation_id: str = "conv-fake-1", engine: str = "fake"):
        self.conversation_id = conversation_id
        self.engine = engine
        self.tokens: set[str] = set()         # resume tokens issued
        self.items: list[dict] = []           # every item made, in order: {item_id, role, text, at, interrupted}
        self.stored: set[str] = set()         # the item_ids "in the store"
        self.receipts: dict[str, str] = {}    # receipt -> item_id
        self.received: list[dict] = []        # every JSON message from clients, in order (with "_conn": n)
        self.binary_frames = 0
        self.connections = 0
        self.ws: ServerConnection | None = None
        self._n = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fake-voice-server", daemon=True)
        self._server = None
        self.port = 0

    # -- lifecycle -----------------------------------------------------------------------------------
    def start(self) -> FakeVoiceServer:
        self._thread.start()
        async def listen():
            return await serve(self._handler, "127.0.0.1", 0, process_request=self._http,
                               subprotocols=["novagate.v1"], max_size=2**20)

        self._server = self._call(listen())
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._call(self._server.wait_closed(), timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> FakeVoiceServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/voice"

    def _call(self, coro, timeout: float = 10.0):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _id(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}_{self._n:04d}"

    # -- what the test does as the server ---------------------------------------------------------------
    def send(self, msg: dict) -> None:
        """Send one message to the connected client (waits until it is written)."""
        ws = self.ws
        if ws is None:
            raise RuntimeError("no client connected")
        self._call(ws.send(json.dumps(msg)))

    def transcript(self, role: str, text: str) -> str:
        """A final transcript item (not stored until saved()); its item_id."""
        item = self._item(role, text)
        self.send({"type": "transcript", "item_id": item["item_id"], "role": role, "text": text, "final": True,
                   "receipt": self._receipt(item)})
        return item["item_id"]

    def tool(self, call_id: str, name: str, status: str, *, duration_ms: int | None = None,
             arguments: dict | None = None, result: Any = _MISSING, public: bool = True) -> str | None:
        """A tool.call message, as the gateway sends it: `started`, or an ended status, which makes the
        call an item of role "tool" (its JSON record as text) with a receipt; returns that item_id.
        `arguments` and `result` go on the wire only when `public`; the item's record always has them."""
        msg: dict[str, Any] = {"type": "tool.call", "call_id": call_id, "name": name, "status": status}
        item_id = None
        if status in ENDED:
            duration_ms = 0 if duration_ms is None else duration_ms
            record = {"call_id": call_id, "name": name, "arguments": arguments or {}, "status": status,
                      "duration_ms": duration_ms, "result": None if result is _MISSING else result}
            item = self._item("tool", json.dumps(record))
            item_id = item["item_id"]
            msg.update(duration_ms=duration_ms, item_id=item_id, receipt=self._receipt(item))
        if public and arguments is not None:
            msg["arguments"] = arguments
        if public and status in ENDED and result is not _MISSING and result is not None:
            msg["result"] = result  # null is left out on the wire, as the gateway does
        self.send(msg)
        return item_id

    def saved(self, *item_ids: str) -> None:
        """The store has these items: item.saved for each."""
        for item_id in item_ids:
            self.stored.add(item_id)
            self.send({"type": "item.saved", "item_id": item_id})

    def close_client(self, code: int = 1012, reason: str = "restarting") -> None:
        ws = self.ws
        if ws is not None:
            self._call(ws.close(code, reason))

    def history(self) -> list[dict]:
        return [dict(i) for i in self.items if i["item_id"] in self.stored]

    def messages(self, type_: str) -> list[dict]:
        return [m for m in self.received if m.get("type") == type_]

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 30.0, what: str = "") -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"fake server: timed out waiting for {what or predicate}; "
                                     f"received {[m.get('type') for m in self.received]}")
            time.sleep(0.02)

    # -- internals ------------------------------------------------------------------------------------------
    def _item(self, role: str, text: str) -> dict:
        item = {"item_id": self._id("item"), "role": role, "text": text,
                "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "interrupted": False}
        self.items.append(item)
        return item

    def _receipt(self, item: dict) -> str:
        receipt = f"fake-receipt.{item['item_id']}.{self._n}"
        self.receipts[receipt] = item["item_id"]
        return receipt

    async def _handler(self, ws: ServerConnection) -> None:
        self.connections += 1
        conn = self.connections
        first = await ws.recv()
        start = json.loads(first)
        start["_conn"] = conn
        self.received.append(start)
        resumed = start.get("resume") in self.tokens
        token = self._id("tok")
        self.tokens.add(token)
        saved = []  # the items of the receipts handed back: stored exactly once, before the history is read
        for receipt in start.get("pending") or []:
            item_id = self.receipts.get(receipt)
            if item_id is not None and resumed and item_id not in saved:
                self.stored.add(item_id)
                saved.append(item_id)
        history = self.history() if resumed else []
        if not resumed:
            self.items.clear()
            self.stored.clear()
        ready = {
            "type": "session.ready", "protocol": 1, "session_id": self._id("sess"),
            "conversation_id": self.conversation_id, "resume_token": token, "resumed": resumed,
            "history": history[-50:], "history_length": len(history),
            "input_sample_rate": 16000, "output_sample_rate": 24000, "voice": "matthew", "engine": self.engine,
        }
        if start.get("resume") and not resumed:
            ready["resume_failed"] = "not_found"
        self.ws = ws
        await ws.send(json.dumps(ready))
        for item_id in saved:
            await ws.send(json.dumps({"type": "item.saved", "item_id": item_id}))
        try:
            async for data in ws:
                if isinstance(data, bytes):
                    self.binary_frames += 1
                    continue
                msg = json.loads(data)
                msg["_conn"] = conn
                self.received.append(msg)
                if msg.get("type") == "ping":
                    await ws.send(json.dumps({"type": "pong", "id": msg.get("id"), "server_time": time.time()}))
                elif msg.get("type") == "session.end":
                    self.tokens.clear()
                    await ws.send(json.dumps({"type": "session.ended", "conversation_id": self.conversation_id}))
                    await ws.close(1000, "conversation ended")
        except Exception:  # noqa: BLE001 - a client that goes away: the connection ends, nothing else
            pass
        finally:
            if self.ws is ws:
                self.ws = None

    def _http(self, connection: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        if path == "/v1/voice" and "websocket" in request.headers.get("Upgrade", "").lower():
            return None
        headers = Headers({"Content-Security-Policy": _csp(), "X-Content-Type-Options": "nosniff",
                           "Cache-Control": "no-store"})
        if path == f"/v1/conversations/{self.conversation_id}/history":
            if request.headers.get("X-Resume-Token") not in self.tokens:
                return self._respond(404, "Not Found", headers, b'{"error": "not_found"}', "application/json")
            h = self.history()
            body = json.dumps({"conversation_id": self.conversation_id, "ended": False,
                               "history_length": len(h), "history": h}).encode()
            return self._respond(200, "OK", headers, body, "application/json")
        rel = "index.html" if path == "/" else path.lstrip("/")
        file = (WEB / rel).resolve()
        if not file.is_file() or WEB.resolve() not in file.parents:
            return self._respond(404, "Not Found", headers, b"not found", "text/plain")
        ctype = {".js": "text/javascript", ".mjs": "text/javascript", ".css": "text/css",
                 ".html": "text/html; charset=utf-8"}.get(file.suffix) or mimetypes.guess_type(file.name)[0]
        return self._respond(200, "OK", headers, file.read_bytes(), ctype or "application/octet-stream")

    @staticmethod
    def _respond(status: int, reason: str, headers: Headers, body: bytes, ctype: str) -> Response:
        headers = Headers(headers)
        headers["Content-Type"] = ctype
        headers["Content-Length"] = str(len(body))
        return Response(status, reason, headers, body)
