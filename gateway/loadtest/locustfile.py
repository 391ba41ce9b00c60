"""Locust users that talk to a novagate gateway like `novagate loadtest` does (docs/loadtest.md).

    locust -f $(novagate loadtest --locustfile) --host ws://127.0.0.1:8000

Each user holds one session: an open microphone streaming 20 ms frames in real time (the utterance,
then silence while the answer plays), one turn per task. The protocol state and the measurements are
`gateway.loadtest.state`, shared with `novagate loadtest`; here they run over `websockets.sync` in
the user's greenlets (a sender, a reader), which gevent makes cooperative.

Reported to Locust:
  turn / speech, turn / text   one per turn; response time = end of speech (or the typed turn) to the
                               first audio of the reply, ms; length = reply audio bytes. Failures: no
                               complete reply in time (TurnTimeout), the connection lost mid-turn (TurnLost)
  connect / session.start      socket + session.start -> session.ready, ms; failures: refused (1013, 503),
                               other close codes, HTTP errors
  reconnect / planned|server   close and resume with the resume token; failure if it did not work
  close / <code>               the server closed a live session (not asked to reconnect): a failure
  error / <code>               an `error` message from the server: a failure
  gap / audio                  the reply's audio fell behind real-time playback by more than the gap
                               threshold (response time = the turn's longest gap, ms); not a failure
  wire / up, wire / down       bytes on the wire, one per turn (from one turn's start to the next's):
                               length = the audio bytes sent / received, response time = their rate in
                               kbit/s (not milliseconds); not a failure

Options (also in the web UI; environment LOCUST_NOVAGATE_...): --novagate-wav, --novagate-text-every,
--novagate-reconnect-every, --novagate-think, --novagate-turn-timeout, --novagate-gap-ms,
--novagate-output-rate, --novagate-codec (pcm16 | opus | mulaw), --novagate-no-deflate, --novagate-token-file
(bearer token; LOCUST_NOVAGATE_TOKEN also works).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import random
import time
from pathlib import Path

import gevent
from locust import User, events, task
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from gateway.client import codec_output_rate
from gateway.loadtest.script import FrameClock, Plan, Speech, load_speech, normalize_url
from gateway.loadtest.state import UserState

OPEN_TIMEOUT = 10.0
READY_TIMEOUT = 30.0
_ids = itertools.count()


@events.init_command_line_parser.add_listener
def _options(parser) -> None:
    g = parser  # locust's own parser: include_in_web_ui and is_secret are its keywords
    g.add_argument("--novagate-wav", default="", env_var="LOCUST_NOVAGATE_WAV",
                   help="16-bit mono WAV spoken every turn (default: the bundled utterance)")
    g.add_argument("--novagate-text-every", type=int, default=0, env_var="LOCUST_NOVAGATE_TEXT_EVERY",
                   help="every K-th turn is typed (input.text); 0: none")
    g.add_argument("--novagate-reconnect-every", type=float, default=0.0, env_var="LOCUST_NOVAGATE_RECONNECT_EVERY",
                   help="close and resume with the resume token every S seconds (between turns); 0: never")
    g.add_argument("--novagate-think", type=float, default=1.0, env_var="LOCUST_NOVAGATE_THINK",
                   help="seconds of silence after a reply has played, before the next turn")
    g.add_argument("--novagate-turn-timeout", type=float, default=30.0, env_var="LOCUST_NOVAGATE_TURN_TIMEOUT",
                   help="seconds from end of speech to a complete reply")
    g.add_argument("--novagate-gap-ms", type=float, default=100.0, env_var="LOCUST_NOVAGATE_GAP_MS",
                   help="received audio this far behind real-time playback is a gap")
    g.add_argument("--novagate-output-rate", type=int, default=0, env_var="LOCUST_NOVAGATE_OUTPUT_RATE",
                   choices=[0, 8000, 16000, 24000], help="0: 24000 (mu-law: 8000)")
    g.add_argument("--novagate-codec", default="pcm16", env_var="LOCUST_NOVAGATE_CODEC",
                   choices=["pcm16", "opus", "mulaw"],
                   help="audio both ways: pcm16, opus (raw 20 ms packets, 16 kHz up, 24 kHz down) or mulaw (8 kHz)")
    g.add_argument("--novagate-no-deflate", action="store_true", default=False, env_var="LOCUST_NOVAGATE_NO_DEFLATE",
                   help="do not offer permessage-deflate (browsers do)")
    g.add_argument("--novagate-token-file", default="", env_var="LOCUST_NOVAGATE_TOKEN_FILE",
                   include_in_web_ui=False, help="file holding a bearer token for an authenticated gateway")
    g.add_argument("--novagate-token", default="", env_var="LOCUST_NOVAGATE_TOKEN", is_secret=True,
                   help="bearer token (prefer the token file or the environment: a command line is visible in ps)")


@functools.cache
def _speech(path: str, codec: str = "pcm16") -> Speech:
    return load_speech(path or None, codec)


class TurnTimeout(Exception):
    pass


class TurnLost(Exception):
    pass


class ConnectFailure(Exception):
    pass


class ServerClose(Exception):
    pass


class ServerError(Exception):
    pass


def _refusal(e: BaseException) -> tuple[str, int | None]:
    if isinstance(e, InvalidStatus):
        return f"HTTP {e.response.status_code}", None
    if isinstance(e, ConnectionClosed):
        code = e.rcvd.code if e.rcvd is not None else 1006
        return (f"refused (close {code})" if code == 1013 else f"close {code}"), code
    if isinstance(e, ConnectionRefusedError):
        return "connection refused", None
    if isinstance(e, TimeoutError):
        return "timeout", None
    return type(e).__name__, None


class VoiceUser(User):
    """One voice session per user, one turn per task; the think time is silence on the open microphone."""

    def wait_time(self) -> float:
        return 0.0  # the pause after each reply is part of the turn (the microphone keeps streaming)

    def __init__(self, environment):
        super().__init__(environment)
        o = environment.parsed_options
        self.url = normalize_url(self.host or "ws://127.0.0.1:8000")
        self.plan = Plan(text_every=getattr(o, "novagate_text_every", 0) or 0,
                         reconnect_every=getattr(o, "novagate_reconnect_every", 0.0) or 0.0,
                         think=getattr(o, "novagate_think", 1.0), turn_timeout=getattr(o, "novagate_turn_timeout", 30.0))
        token = getattr(o, "novagate_token", "") or ""
        token_file = getattr(o, "novagate_token_file", "") or ""
        if token_file:
            token = Path(token_file).read_text().strip()
        self.token = token or None
        self.deflate = not getattr(o, "novagate_no_deflate", False)
        codec = getattr(o, "novagate_codec", "pcm16") or "pcm16"
        self.state = UserState(next(_ids), _speech(getattr(o, "novagate_wav", "") or "", codec), self.plan,
                               output_rate=codec_output_rate(codec, getattr(o, "novagate_output_rate", 0) or None),
                               gap_threshold=(getattr(o, "novagate_gap_ms", 100.0) or 100.0) / 1000,
                               output_codec=codec)
        self.ws = None
        self._closed: int | None = None
        self._by_us = False
        self._lost_at = 0.0
        self._connected_at = 0.0
        self._greenlets: list = []
        self._gaps_reported = 0

    # -- reporting --------------------------------------------------------------------------------
    def _fire(self, request_type: str, name: str, ms: float, length: int = 0, exception: Exception | None = None):
        self.environment.events.request.fire(request_type=request_type, name=name, response_time=ms,
                                             response_length=length, exception=exception, context={})

    # -- connection -------------------------------------------------------------------------------
    def _open(self, request_type: str = "connect", name: str = "session.start", since: float | None = None) -> bool:
        t0 = time.monotonic()
        since = t0 if since is None else since
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        try:
            ws = connect(self.url, subprotocols=["novagate.v1"], additional_headers=headers, max_size=2**20,
                         open_timeout=OPEN_TIMEOUT, compression="deflate" if self.deflate else None, legacy=True)
            try:
                ws.send(self.state.session_start())
                deadline = t0 + READY_TIMEOUT
                while True:
                    data = ws.recv(timeout=max(0.0, deadline - time.monotonic()))
                    now = time.monotonic()
                    if isinstance(data, bytes):
                        self.state.on_audio(len(data), now, data)
                    elif self.state.on_message(data, now).get("type") == "session.ready":
                        break
            except BaseException:
                with contextlib.suppress(Exception):
                    ws.close()
                raise
        except (OSError, TimeoutError, ConnectionClosed, InvalidStatus) as e:
            reason, _ = _refusal(e)
            self._fire(request_type, name, (time.monotonic() - since) * 1000, exception=ConnectFailure(reason))
            return False
        self.ws, self._closed, self._by_us = ws, None, False
        self._connected_at = time.monotonic()
        if request_type == "reconnect":
            resumed = bool((self.state.ready or {}).get("resumed"))
            self._fire(request_type, name, (self._connected_at - since) * 1000,
                       exception=None if resumed else ConnectFailure("not resumed"))
        else:
            self._fire(request_type, name, (self._connected_at - since) * 1000)
        self._greenlets = [gevent.spawn(self._read, ws), gevent.spawn(self._mic, ws)]
        return True

    def _read(self, ws) -> None:
        state = self.state
        try:
            for data in ws:
                now = time.monotonic()
                if isinstance(data, bytes):
                    state.on_audio(len(data), now, data)
                    continue
                msg = state.on_message(data, now)
                if msg.get("type") == "error":
                    self._fire("error", str(msg.get("code")), 0, exception=ServerError(str(msg.get("code"))))
        except ConnectionClosed:
            pass
        finally:
            self._lost_at = time.monotonic()
            self._closed = int(ws.close_code or 1006)

    def _mic(self, ws) -> None:
        state = self.state
        clock = FrameClock(time.monotonic())
        try:
            while self.ws is ws and self._closed is None:
                for _ in range(clock.due(time.monotonic())):
                    ws.send(state.mic_frame())
                    state.mic_sent(time.monotonic())
                    clock.sent_one()
                gevent.sleep(max(0.0, clock.next_at() - time.monotonic()))
        except ConnectionClosed:
            pass

    def _close(self) -> None:
        self._by_us = True
        ws, self.ws = self.ws, None
        if ws is not None:
            with contextlib.suppress(Exception):
                ws.close()
        gevent.joinall(self._greenlets, timeout=5)
        gevent.killall(self._greenlets, block=False)
        self._greenlets = []

    def _recover(self) -> bool:
        """After the server closed the session: resume when it asked to (session.reconnect / 1012);
        otherwise report the close and start over (a new session, as a user would)."""
        code, notice = self._closed or 1006, self.state.notice
        lost_at = self._lost_at
        self._close()
        self.state.drop_speech()
        if notice is not None or code == 1012:
            after = (notice or {}).get("retry_after_ms")
            delay = min(max(after, 0), 5000) / 1000 if isinstance(after, (int, float)) else 0.0
            gevent.sleep(delay + random.uniform(0, 0.1))
            return self._open("reconnect", "server", since=lost_at)
        self._fire("close", str(code), 0, exception=ServerClose(f"closed {code}"))
        gevent.sleep(random.uniform(1.0, 2.0))
        return self._open()

    def on_start(self) -> None:
        gevent.sleep(random.uniform(0.0, 0.5))
        if not self._open():
            gevent.sleep(random.uniform(1.0, 3.0))  # backoff: the gateway may be at capacity

    def on_stop(self) -> None:
        self._close()

    # -- one turn ---------------------------------------------------------------------------------
    @task
    def turn(self) -> None:
        state, plan = self.state, self.plan
        if self.ws is None or self._closed is not None:
            if self.ws is None and self._closed is None:
                ok = self._open()  # the first connection failed: try again
            else:
                ok = self._recover()
            if not ok:
                gevent.sleep(random.uniform(1.0, 3.0))  # backoff: the gateway may be at capacity
                return
        if plan.reconnect_due(self._connected_at, time.monotonic()):
            since = time.monotonic()
            self._close()
            self.state.drop_speech()
            self._open("reconnect", "planned", since=since)
            return
        t0, sent0, received0 = time.monotonic(), state.bytes_out, state.bytes_in
        turn = state.begin_turn(t0)
        kind = turn.record.kind
        if kind == "text":
            with contextlib.suppress(ConnectionClosed):
                self.ws.send(state.text_message())
                turn.speech_ended(time.monotonic())
        outcome = "waiting"
        while outcome == "waiting":
            gevent.sleep(0.02)
            outcome = state.status(time.monotonic())
            if outcome == "waiting" and self._closed is not None:
                outcome = "lost"
        played = turn.played_out_at(time.monotonic())
        record = state.end_turn("answered" if outcome == "done" else outcome)
        ms = (record.latency or 0.0) * 1000
        if record.outcome == "answered":
            self._fire("turn", kind, ms, record.audio_bytes)
        elif record.outcome == "timeout":
            self._fire("turn", kind, ms, record.audio_bytes, TurnTimeout(f"no complete reply in {plan.turn_timeout:.0f} s"))
        else:
            self._fire("turn", kind, ms, record.audio_bytes, TurnLost("connection lost during the turn"))
        for _ in range(record.gaps):  # not a failure: how often, and how long at worst, the reply stalled
            self._fire("gap", "audio", record.max_gap * 1000)
        if record.outcome != "lost":
            pause = max(played, time.monotonic()) + plan.think - time.monotonic()
            end = time.monotonic() + pause
            while self._closed is None and time.monotonic() < end:
                gevent.sleep(min(0.25, max(0.0, end - time.monotonic())))
        seconds = time.monotonic() - t0
        for name, nbytes in (("up", state.bytes_out - sent0), ("down", state.bytes_in - received0)):
            self._fire("wire", name, nbytes * 8 / seconds / 1000 if seconds > 0 else 0.0, nbytes)

