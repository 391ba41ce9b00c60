"""One simulated user over asyncio and the `websockets` client: an open microphone streaming 20 ms
frames (PCM16, or the utterance's Opus / mu-law packets) in real time (the utterance, then silence
while the answer plays, then the next turn), typed turns and reconnects when the plan says so, and
a resume after the server asks for one (`session.reconnect`, close 1012). Everything it learns goes
to `UserState` (measurements) and `UserStats` (connection outcomes); finished turns go to `on_turn`."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable

import websockets

from protocol.codes import CloseCode

from .script import FrameClock, Plan, Speech
from .state import Reconnect, TurnRecord, UserState, UserStats

OPEN_TIMEOUT = 10.0
READY_TIMEOUT = 30.0


class ConnectFailed(Exception):
    def __init__(self, reason: str, close_code: int | None = None):
        super().__init__(reason)
        self.reason = reason
        self.close_code = close_code

    @property
    def refused(self) -> bool:
        """At capacity, busy or draining: the gateway said "retry later" (1013, or HTTP 503)."""
        return self.close_code == CloseCode.TRY_AGAIN_LATER or self.reason == "HTTP 503"


def describe(e: BaseException) -> ConnectFailed:
    if isinstance(e, ConnectFailed):
        return e
    if isinstance(e, websockets.InvalidStatus):
        return ConnectFailed(f"HTTP {e.response.status_code}")
    if isinstance(e, websockets.ConnectionClosed):
        code = e.rcvd.code if e.rcvd is not None else 1006
        return ConnectFailed(f"close {code}", code)
    if isinstance(e, ConnectionRefusedError):
        return ConnectFailed("connection refused")
    if isinstance(e, TimeoutError):
        return ConnectFailed("timeout")
    return ConnectFailed(type(e).__name__)


def server_asks_reconnect(notice: dict | None, code: int) -> bool:
    return notice is not None or code == CloseCode.SERVICE_RESTART


def reconnect_delay(notice: dict | None, rng: random.Random) -> float:
    """After `session.reconnect`: its retry_after_ms (capped at 5 s) plus a little jitter; after a bare
    1012, up to 100 ms (PROTOCOL §6: reconnect now, with jitter)."""
    after = notice.get("retry_after_ms") if notice else None
    if isinstance(after, (int, float)) and not isinstance(after, bool):
        return min(max(after, 0), 5000) / 1000 + rng.uniform(0, 0.05)
    return rng.uniform(0, 0.1)


class SimUser:
    def __init__(self, index: int, url: str, speech: Speech, plan: Plan, *, token: str | None = None,
                 output_rate: int = 24000, gap_threshold: float = 0.1, voice: str | None = None,
                 on_turn: Callable[[TurnRecord], None] | None = None, rng: random.Random | None = None,
                 deflate: bool = True, output_codec: str | None = None):
        self.url = url
        self.deflate = deflate  # offer permessage-deflate, as browsers do (the server decides)
        self.token = token
        self.plan = plan
        self.state = UserState(index, speech, plan, output_rate=output_rate, gap_threshold=gap_threshold,
                               voice=voice, output_codec=output_codec)
        self.stats = UserStats(index)
        self.on_turn = on_turn or (lambda r: None)
        self.rng = rng or random.Random()
        self.ws = None
        self._reader: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self._up = asyncio.Event()     # a connection that reached session.ready and is not closing
        self._closed_code: int | None = None
        self._by_us = False
        self._lost_at = 0.0
        self._connected_at = 0.0
        self._last_played_out = 0.0  # when the last turn's reply finished playing

    # -- the user's life --------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> UserStats:
        st = self.stats
        st.status = "connecting"
        t0 = time.monotonic()
        try:
            await self._open()
        except Exception as e:  # noqa: BLE001 — every failure to connect is a result, not a crash
            f = describe(e)
            st.outcome, st.failure, st.status = ("refused" if f.refused else "failed"), f.reason, "done"
            return st
        st.connect_seconds = time.monotonic() - t0
        st.outcome, st.status = "ok", "up"
        mic = asyncio.create_task(self._mic())
        try:
            await asyncio.sleep(self.rng.uniform(0.2, 1.0))  # users do not all start talking in step
            while not stop.is_set():
                if self._closed_code is not None and not await self._after_close(stop):
                    break
                now = time.monotonic()
                if self.plan.reconnect_due(self._connected_at, now):
                    if not await self._reconnect("planned", now):
                        break
                    continue
                outcome = await self._turn(stop)
                if outcome == "stopped":
                    break
                if outcome in ("answered", "timeout"):
                    played = self._last_played_out
                    await self._pause_until(max(played, time.monotonic()) + self.plan.think, stop)
        finally:
            mic.cancel()
            with contextlib.suppress(BaseException):
                await mic
            await self._close()
            st.status = "done"
        return st

    async def _turn(self, stop: asyncio.Event) -> str:
        state = self.state
        turn = state.begin_turn(time.monotonic())
        if turn.record.kind == "text":
            try:
                await self.ws.send(state.text_message())
                turn.speech_ended(time.monotonic())
            except websockets.ConnectionClosed:
                pass
        outcome = "stopped"
        while not stop.is_set():
            now = time.monotonic()
            status = state.status(now)
            if status == "done":
                outcome = "answered"
                break
            if status == "timeout":
                outcome = "timeout"
                break
            if self._closed_code is not None:
                outcome = "lost"
                break
            deadline = turn.deadline(self.plan.turn_timeout)
            await self._sleep_or_wake(0.5 if deadline is None else min(0.5, max(0.0, deadline - now) + 0.01), stop)
        self._last_played_out = turn.played_out_at(time.monotonic())
        record = state.end_turn(outcome)
        if record.outcome != "unfinished":
            self.on_turn(record)
        return outcome

    async def _pause_until(self, until: float, stop: asyncio.Event) -> None:
        """Silence (the microphone goes on) until `until`, the run's end or a lost connection."""
        while not stop.is_set() and self._closed_code is None:
            left = until - time.monotonic()
            if left <= 0:
                return
            await self._sleep_or_wake(left, stop)

    async def _sleep_or_wake(self, seconds: float, stop: asyncio.Event) -> None:
        self._wake.clear()
        waits = [asyncio.ensure_future(self._wake.wait()), asyncio.ensure_future(stop.wait())]
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    # -- connections ------------------------------------------------------------------------------
    async def _open(self) -> dict:
        """Upgrade, session.start (resume token, unsaved receipts), wait for session.ready."""
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        ws = await websockets.connect(self.url, subprotocols=["novagate.v1"], additional_headers=headers,
                                      max_size=2**20, open_timeout=OPEN_TIMEOUT,
                                      compression="deflate" if self.deflate else None)
        try:
            await ws.send(self.state.session_start())
            async with asyncio.timeout(READY_TIMEOUT):
                while True:
                    data = await ws.recv()
                    now = time.monotonic()
                    if isinstance(data, bytes):
                        self.state.on_audio(len(data), now, data)
                        continue
                    if self.state.on_message(data, now).get("type") == "session.ready":
                        break
        except BaseException:
            with contextlib.suppress(Exception):
                await ws.close()
            raise
        self.ws = ws
        self._closed_code = None
        self._by_us = False
        self._connected_at = time.monotonic()
        self._reader = asyncio.create_task(self._read(ws))
        self._up.set()
        return self.state.ready or {}

    async def _read(self, ws) -> None:
        state, wake = self.state, self._wake
        try:
            async for data in ws:
                now = time.monotonic()
                if isinstance(data, bytes):
                    state.on_audio(len(data), now, data)
                elif state.on_message(data, now).get("type") in ("response.audio.end", "session.reconnect"):
                    wake.set()
        except websockets.ConnectionClosed:
            pass
        finally:
            self._up.clear()
            self._lost_at = time.monotonic()
            self._closed_code = int(ws.close_code or 1006)
            wake.set()

    async def _close(self) -> None:
        """Close our side (the run ended, or a planned reconnect): not counted as a server close."""
        self._by_us = True
        self._up.clear()
        ws, reader = self.ws, self._reader
        if ws is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), 5)
        if reader is not None:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(reader, 5)

    async def _after_close(self, stop: asyncio.Event) -> bool:
        """The server closed the socket: resume when it asked for it (session.reconnect, 1012), else the
        session is over (its close code is counted). True if the user goes on."""
        code, notice = self._closed_code or 1006, self.state.notice
        if not server_asks_reconnect(notice, code):
            self.stats.close_codes[code] += 1
            self.stats.outcome, self.stats.failure = "dropped", f"close {code}"
            return False
        lost_at = self._lost_at
        await self._sleep_or_wake(reconnect_delay(notice, self.rng), stop)
        if stop.is_set():
            return False
        return await self._reconnect("server", lost_at)

    async def _reconnect(self, kind: str, since: float) -> bool:
        st = self.stats
        st.status = "reconnecting"
        self.state.drop_speech()
        if kind == "planned":
            await self._close()
        try:
            ready = await self._open()
        except Exception as e:  # noqa: BLE001
            f = describe(e)
            st.reconnects.append(Reconnect(kind, False, time.monotonic() - since, failure=f.reason))
            st.outcome, st.failure = "dropped", f"reconnect: {f.reason}"
            return False
        st.reconnects.append(Reconnect(kind, True, time.monotonic() - since, bool(ready.get("resumed"))))
        st.status = "up"
        return True

    # -- microphone -------------------------------------------------------------------------------
    async def _mic(self) -> None:
        """20 ms frames on the monotonic clock's schedule, whatever happens to the turns; paused while
        there is no connection (a new schedule starts on the next one)."""
        state, st = self.state, self.stats
        while True:
            await self._up.wait()
            ws = self.ws
            clock = FrameClock(time.monotonic())
            try:
                while self._up.is_set() and self.ws is ws:
                    for _ in range(clock.due(time.monotonic())):
                        await ws.send(state.mic_frame())
                        state.mic_sent(time.monotonic())
                        clock.sent_one()
                    await asyncio.sleep(max(0.0, clock.next_at() - time.monotonic()))
            except websockets.ConnectionClosed:
                await asyncio.sleep(0)  # the reader records the close
            finally:
                st.mic_late += clock.late
                st.mic_skipped += clock.skipped
                st.mic_max_lag = max(st.mic_max_lag, clock.max_lag)
            if self._up.is_set() and self.ws is ws:
                await asyncio.sleep(0.01)
