"""The Python reference client of protocol v1 (`novagate client`), also used by tests and load tools.

It behaves like a real voice client: an open microphone that sends silence between utterances,
audio in real time, a state file holding the resume token and every receipt not yet acknowledged
by `item.saved`, and a resume with both after any disconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
import wave
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import orjson
import websockets

FRAME_MS = 20


@dataclass
class ClientState:
    """What survives a disconnect: kept in a JSON file, written atomically after every change."""

    path: str | None = None
    resume_token: str | None = None
    conversation_id: str | None = None
    pending: dict[str, str] = field(default_factory=dict)  # item_id -> receipt

    @classmethod
    def load(cls, path: str | None) -> ClientState:
        if path and os.path.exists(path):
            d = orjson.loads(Path(path).read_bytes())
            return cls(path, d.get("resume_token"), d.get("conversation_id"), dict(d.get("pending", {})))
        return cls(path)

    def save(self) -> None:
        if not self.path:
            return
        tmp = self.path + ".tmp"
        Path(tmp).write_bytes(orjson.dumps({
            "resume_token": self.resume_token, "conversation_id": self.conversation_id, "pending": self.pending,
        }))
        os.replace(tmp, self.path)


class VoiceClient:
    def __init__(
        self,
        url: str,
        *,
        state: ClientState | None = None,
        token: str | None = None,
        auth: str | None = None,
        input_rate: int = 16000,
        output_rate: int = 24000,
        voice: str | None = None,
        conversation_id: str | None = None,
        resume: bool = True,
        on_message: Callable[[dict], None] | None = None,
    ):
        self.url = url
        self.state = state or ClientState()
        self.token = token
        self.auth = auth
        self.input_rate = input_rate
        self.output_rate = output_rate
        self.voice = voice
        self.raw_conversation_id = conversation_id
        self.resume = resume
        self.on_message = on_message
        self.ws: Any = None
        self.ready: dict = {}
        self.messages: list[dict] = []
        self.audio = bytearray()
        self.audio_by_item: dict[str, bytearray] = {}
        self.audio_end: dict[str, str] = {}
        self.finals: list[dict] = []
        self.saved: set[str] = set()
        self.close_code: int | None = None
        self._current_item: str | None = None
        self._speech: asyncio.Queue[bytes] = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []
        self._changed = asyncio.Event()
        self.speed = 1.0

    # -- connection ------------------------------------------------------------------------------
    async def connect(self, *, mic: bool = True) -> dict:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        self.ws = await websockets.connect(self.url, subprotocols=["novagate.v1"], additional_headers=headers,
                                           max_size=2**20)
        start: dict[str, Any] = {
            "type": "session.start", "protocol": 1,
            "audio": {"input_sample_rate": self.input_rate, "output_sample_rate": self.output_rate},
        }
        if self.auth:
            start["auth"] = self.auth
        if self.voice:
            start["voice"] = self.voice
        if self.resume and self.state.resume_token:
            start["resume"] = self.state.resume_token
        if self.raw_conversation_id:
            start["conversation_id"] = self.raw_conversation_id
        if self.state.pending:
            start["pending"] = list(self.state.pending.values())[:100]
        await self.ws.send(orjson.dumps(start).decode())
        self._tasks.append(asyncio.create_task(self._reader()))
        self.ready = await self.wait_for(lambda: self._first("session.ready"), timeout=30)
        self.state.resume_token = self.ready["resume_token"]
        self.state.conversation_id = self.ready["conversation_id"]
        self.state.save()
        if mic:
            self._tasks.append(asyncio.create_task(self._mic()))
        return self.ready

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(BaseException):
                await t
        self._tasks.clear()
        if self.ws is not None:
            with contextlib.suppress(Exception):
                await self.ws.close()

    async def __aenter__(self) -> VoiceClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # -- sending ---------------------------------------------------------------------------------
    async def say(self, pcm: bytes) -> None:
        """Queue speech for the microphone; returns when it has all been sent."""
        frame = self.input_rate * 2 * FRAME_MS // 1000
        for i in range(0, len(pcm), frame):
            self._speech.put_nowait(pcm[i : i + frame])
        while not self._speech.empty():
            await asyncio.sleep(FRAME_MS / 1000)

    async def _mic(self) -> None:
        """An open microphone: speech when there is some, silence otherwise, in real time."""
        frame = self.input_rate * 2 * FRAME_MS // 1000
        silence = bytes(frame)
        period = FRAME_MS / 1000 / self.speed
        next_at = time.monotonic()
        while True:
            try:
                data = self._speech.get_nowait()
            except asyncio.QueueEmpty:
                data = silence
            if len(data) < frame:
                data = data + bytes(frame - len(data))
            await self.ws.send(data)
            next_at += period
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    async def send_text(self, text: str) -> None:
        await self.send({"type": "input.text", "text": text})

    async def send(self, message: dict) -> None:
        await self.ws.send(orjson.dumps(message).decode())

    async def end(self) -> None:
        """End the conversation for good (its resume token stops working)."""
        await self.send({"type": "session.end"})
        await self.wait_for(lambda: self._first("session.ended"), timeout=10)
        self.state.resume_token = None
        self.state.pending.clear()
        self.state.save()

    # -- receiving -------------------------------------------------------------------------------
    async def _reader(self) -> None:
        try:
            async for data in self.ws:
                if isinstance(data, bytes):
                    self.audio += data
                    if self._current_item:
                        self.audio_by_item.setdefault(self._current_item, bytearray()).extend(data)
                    continue
                msg = orjson.loads(data)
                self._handle(msg)
        except websockets.ConnectionClosed:
            pass
        finally:
            self.close_code = self.ws.close_code or 1006
            self._changed.set()

    def _handle(self, msg: dict) -> None:
        self.messages.append(msg)
        t = msg.get("type")
        if t == "response.audio.start":
            self._current_item = msg["item_id"]
        elif t == "response.audio.end":
            self.audio_end[msg["item_id"]] = msg["reason"]
        elif t == "interrupted":
            self._current_item = None
        elif t == "transcript" and msg.get("final"):
            self.finals.append(msg)
            if msg.get("receipt"):
                self.state.pending[msg["item_id"]] = msg["receipt"]
                self.state.save()
        elif t == "session.updated":  # the conversation moved (additive message)
            self.state.resume_token = msg["resume_token"]
            self.state.conversation_id = msg["conversation_id"]
            self.state.save()
        elif t == "item.saved":
            self.saved.add(msg["item_id"])
            if self.state.pending.pop(msg["item_id"], None) is not None:
                self.state.save()
        if self.on_message:
            self.on_message(msg)
        self._changed.set()

    def _first(self, type_: str) -> dict | None:
        return next((x for x in self.messages if x.get("type") == type_), None)

    async def wait_for(self, predicate: Callable[[], Any], timeout: float = 30.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if self.close_code is not None:
                raise ConnectionError(f"connection closed ({self.close_code}) while waiting")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("timed out waiting for the server")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    def finals_of(self, role: str) -> list[dict]:
        return [f for f in self.finals if f["role"] == role]

    async def turn(self, pcm: bytes | None = None, *, text: str | None = None, timeout: float = 60.0) -> dict:
        """One user turn (speech or typed text); returns when the assistant's reply has finished
        playing and been saved: {"user": str, "assistant": str}."""
        n_user, n_asst = len(self.finals_of("user")), len(self.finals_of("assistant"))
        if text is not None:
            await self.send_text(text)
        else:
            await self.say(pcm)

        def done():
            asst = self.finals_of("assistant")[n_asst:]
            ended = [a for a in asst if self.audio_end.get(a["item_id"]) in ("end_turn", "interrupted")]
            return bool(ended) and all(a["item_id"] in self.saved for a in asst)

        await self.wait_for(done, timeout)
        users = self.finals_of("user")[n_user:]
        return {
            "user": " ".join(u["text"] for u in users),
            "assistant": " ".join(a["text"] for a in self.finals_of("assistant")[n_asst:]),
        }


# -- WAV helpers ------------------------------------------------------------------------------------
def read_wav(path: str) -> tuple[bytes, int]:
    with wave.open(path, "rb") as w:
        if w.getsampwidth() != 2 or w.getnchannels() != 1:
            raise ValueError(f"{path}: need 16-bit mono PCM WAV")
        return w.readframes(w.getnframes()), w.getframerate()


def write_wav(path: str, pcm: bytes, rate: int) -> None:
    with wave.open(path, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm)


async def run_cli(args) -> int:
    """`novagate client`: one turn from a WAV file or text, transcripts printed as they arrive."""
    state = ClientState.load(args.state)

    def show(msg: dict) -> None:
        t = msg.get("type")
        if t == "transcript" and (msg.get("final") or msg["role"] == "assistant"):
            tag = "" if msg.get("final") else " (planned)"
            print(f"{msg['role']:>9}{tag}: {msg['text']}", flush=True)
        elif t == "error":
            print(f"    error: {msg['code']}: {msg['message']}", file=sys.stderr, flush=True)
        elif t == "interrupted":
            print("  (interrupted)", flush=True)

    pcm, rate = (read_wav(args.wav) if args.wav else (None, 16000))
    client = VoiceClient(args.url, state=state, token=args.token, input_rate=rate, output_rate=args.output_rate,
                         voice=args.voice, resume=not args.new, on_message=show)
    client.speed = 1.0
    ready = await client.connect()
    resumed = "resumed" if ready["resumed"] else ("new (resume failed: not found)" if ready.get("resume_failed")
                                                  else "new")
    print(f"conversation {ready['conversation_id']}: {resumed}, {ready['history_length']} earlier items, "
          f"engine {ready['engine']}", flush=True)
    try:
        t0 = time.monotonic()
        if args.text or pcm:
            await client.turn(pcm, text=args.text, timeout=args.timeout)
        if args.out:
            write_wav(args.out, bytes(client.audio), args.output_rate)
        secs = len(client.audio) / (2 * args.output_rate)
        print(f"done in {time.monotonic() - t0:.1f} s: {secs:.2f} s of assistant audio"
              + (f" written to {args.out}" if args.out else "")
              + f"; {len(client.saved)} items saved, {len(state.pending)} receipts pending"
              + (f"; state in {args.state}" if args.state else ""), flush=True)
    finally:
        await client.close()
    return 0
