"""The session actor: one per WebSocket. It carries out what `protocol.session.Session` decides and
tells it what happened; it decides nothing itself.

Readers (the socket, each model stream, the store worker) only push into one inbox, bounded in
bytes; one consumer feeds the session from it and performs the effects. It sleeps until the inbox
has something or `session.next_deadline()` is due. The socket is read without a task: its protocol
hands each message to `message()` as it is parsed (gateway/websocket.py), and stops reading while
the inbox is over budget. What goes to the client is written at once while the socket's buffer has
room, else queued for the writer task; writers (to the client, to each model stream) drain queues
that are bounded in bytes too: a client that does not read, or a stream that does not accept, is
reported to the session, which decides what follows. Every task lives in one TaskGroup.
"""

from __future__ import annotations

import asyncio
import logging
import random

from starlette.websockets import WebSocket, WebSocketState

from protocol import codes
from protocol import messages as m
from protocol import tool_calls
from protocol.codes import CloseCode
from protocol.continuity import CONNECTION
from protocol.adapter import SendText
from protocol.session import (
    Admit,
    Authenticate,
    CancelTool,
    CheckBudget,
    CloseSocket,
    CloseStream,
    Count,
    CreateConversation,
    EndConversation,
    HoldConversation,
    LoadConversation,
    Log,
    Observe,
    OpenStream,
    RecordUsage,
    ReloadConversation,
    RunTool,
    SendAudio,
    SendMessage,
    SendToStream,
    Session,
    State,
    StoreItem,
)

from . import clock, metrics
from .clock import budget_period
from .logs import log
from .store import ConversationGone, StoreError
from .queues import Queue
from .tokens import owner_hash
from .transport import ModelError
from .websocket import EXTENSION

logger = logging.getLogger("novagate.session")

INBOX_BYTES = 256 * 1024            # inputs waiting for the consumer (about 8 s of 16 kHz audio)
CLIENT_BACKLOG_BYTES = 1024 * 1024  # frames queued for a client that reads slowly; past it, it is closed
MODEL_BACKLOG_BYTES = 1024 * 1024   # events queued for a stream that accepts slowly; past it, it failed
SEND_TIMEOUT_S = 10.0
CLOSING_SEND_TIMEOUT_S = 1.0
CLOSE_TIMEOUT_S = 5.0
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


class _Link:
    """One model stream: its events to send, and the task that opens, feeds and closes it."""

    def __init__(self, stream_id: int):
        self.stream_id = stream_id
        self.out = Queue(MODEL_BACKLOG_BYTES)
        self.closing: list[dict] | None = None  # set: send these, then close
        self.backlog_told = False


class SessionActor:
    """`wrap` puts another wire protocol's adapter around the session (protocol/realtime.py)."""

    def __init__(self, ws: WebSocket, services, bearer: str | None, wrap=None):
        self.ws = ws
        self.lane = ws.scope.get("extensions", {}).get(EXTENSION)  # the socket's protocol (gateway/websocket.py)
        if self.lane is None:
            raise RuntimeError("this socket is not served by gateway.websocket.LaneProtocol: run the gateway "
                               "with `novagate serve` (its uvicorn configuration), not another ASGI server")
        self._reading_paused = False
        self._closing_socket = False  # a CloseSocket is queued: nothing more is written directly
        self.s = services
        now = clock.monotonic()
        self.session = Session(services.session_config, services.session_env, now=now, bearer=bearer)
        if wrap is not None:
            self.session = wrap(self.session, now)
        self.inbox = Queue(INBOX_BYTES)
        self.outbox = Queue(CLIENT_BACKLOG_BYTES)
        self.store_ops = Queue(1 << 30)  # the session has at most one operation in flight
        self.links: dict[int, _Link] = {}
        self.model_gate = asyncio.Event()  # clear: model events wait (the client's playback is full)
        self.model_gate.set()
        self._tg: asyncio.TaskGroup | None = None
        self._stream_tasks: set[asyncio.Task] = set()
        self._tools: dict[str, asyncio.Task] = {}  # running tool calls, by call_id
        self._usage_tasks: set[asyncio.Task] = set()  # ledger writes (RecordUsage): awaited at close
        self._audio_since: float | None = None

    def conversation_gone(self, reason: str) -> None:
        """Another connection took the conversation over, or it was deleted (gateway/app.py Services)."""
        self.inbox.put_nowait(("conversation_gone", reason))

    def drain(self) -> None:
        """SIGTERM: the session sends the client elsewhere, stores what is final and closes 1012."""
        self.inbox.put_nowait(("drain", random.randint(0, 1000)))

    # -- the consumer ----------------------------------------------------------------------------------
    async def run(self) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                workers = [tg.create_task(self._store_worker())]
                writer = tg.create_task(self._write_client())
                self.lane.attach(self)
                await self._consume()
                self.outbox.put_nowait(None)  # the writer ends once what is queued is sent
                for t in self._tools.values():  # the session has answered or given up on them
                    t.cancel()
                await asyncio.wait({writer, *self._stream_tasks, *self._usage_tasks}, timeout=CLOSE_TIMEOUT_S)
                for t in (*workers, writer, *self._stream_tasks, *self._usage_tasks):
                    t.cancel()
        except* Exception:
            logger.exception("session failed", extra={"fields": {"session_id": self.session.session_id}})
            await self._close_now(CloseCode.INTERNAL_ERROR, "internal error",
                                  m.Error(codes.INTERNAL_ERROR, "internal error", fatal=True))

    async def _consume(self) -> None:
        session = self.session
        while session.state is not State.CLOSED:
            deadline = session.next_deadline()
            msg = await self.inbox.get(deadline)  # clock.monotonic() is the event loop's clock
            now = clock.monotonic()
            while msg is not None:  # all that waits, then the effects: fewer wake-ups under load
                self._dispatch(msg, now)
                msg = self.inbox.get_nowait() if session.state is not State.CLOSED else None
            if self._reading_paused:  # the inbox is empty again
                self._reading_paused = False
                self.lane.resume()
            if deadline is not None and now >= deadline:
                session.tick(now)
            self._perform(now)
            if session.model_paused:
                self.model_gate.clear()
            else:
                self.model_gate.set()

    def _dispatch(self, msg: tuple, now: float) -> None:
        """An inbox entry names the session input and its arguments: ("receive_audio", data). A model
        event also carries when it arrived: the delay of its audio to the client counts from there."""
        name, *args = msg
        if name == "model_event":
            self._audio_since = args.pop()
        getattr(self.session, name)(*args, now)

    def _perform(self, now: float) -> None:
        while effects := self.session.effects():
            for e in effects:
                match e:
                    case SendAudio(pcm=pcm):
                        self._to_client((pcm, self._audio_since or now), len(pcm), now)
                    case SendToStream(stream_id=sid, events=events, audio_bytes=n, source=source):
                        if n:
                            metrics.MODEL_AUDIO_BY_SOURCE[source].inc(n)
                        self._to_stream(sid, events, n, now)
                    case SendMessage(message=msg):
                        text = m.encode(msg).decode()
                        self._to_client(text, len(text), now)
                    case SendText(text=text):
                        self._to_client(text, len(text), now)
                    case OpenStream(stream_id=sid, events=events):
                        link = self.links[sid] = _Link(sid)
                        task = self._tg.create_task(self._run_stream(link, events))
                        self._stream_tasks.add(task)
                        task.add_done_callback(self._stream_tasks.discard)
                    case CloseStream(stream_id=sid, events=events):
                        if (link := self.links.pop(sid, None)) is not None:
                            link.closing = events
                            link.out.put_nowait(None)  # its sender sends what is queued, then these
                    case CloseSocket(code=code, reason=reason, discard=discard):
                        if discard:
                            self.outbox.clear()
                        self._to_client(CloseSocket(code, reason), 0, now)
                    case RunTool(call_id=call_id, name=name, arguments=arguments):
                        self._tools[call_id] = self._tg.create_task(self._run_tool(call_id, name, arguments))
                    case CancelTool(call_id=call_id):
                        if (task := self._tools.pop(call_id, None)) is not None:
                            task.cancel()
                    case Authenticate(token=token):
                        self._tg.create_task(self._authenticate(token))
                    case Admit(principal=principal):
                        self.inbox.put_nowait(("admitted", self.s.admit(self, principal)))
                    case (LoadConversation() | ReloadConversation() | CreateConversation() | HoldConversation()
                          | StoreItem() | EndConversation() | CheckBudget()):
                        self.store_ops.put_nowait(e)
                    case RecordUsage():
                        task = self._tg.create_task(self._record_usage(e))
                        self._usage_tasks.add(task)
                        task.add_done_callback(self._usage_tasks.discard)
                    case Log(level=level, message=message, fields=fields):
                        log(logger, LEVELS[level], message, **fields)
                    case Count(metric=name, label=label, amount=amount):
                        counter = metrics.SESSION_COUNTERS[name]
                        (counter.labels(label) if label else counter).inc(amount)
                        if name == "tokens" and self.s.settings.usage_metrics_by_user and self.session.principal:
                            metrics.USER_TOKENS.labels(owner_hash(self.session.principal)[:16]).inc(amount)
                    case Observe(metric=name, value=value):
                        metrics.SESSION_HISTOGRAMS[name].observe(value)
        self._audio_since = None  # audio the pacer releases later counts from its release

    def _to_client(self, frame: tuple | str | CloseSocket, size: int, now: float) -> None:
        """Written now while nothing waits before it and the socket's buffer has room; else queued."""
        if isinstance(frame, CloseSocket):
            self._closing_socket = True
        elif not self.outbox and not self._closing_socket and self.lane.can_write():
            self._write(frame)
            return
        if not self.outbox.put_nowait(frame, size):
            self.session.client_backlog_full(now)

    def _write(self, frame: tuple | str) -> None:
        """One message to the client. A socket that is closing or gone takes nothing: its protocol has
        told, or will tell, `gone()`."""
        if isinstance(frame, tuple):
            pcm, since = frame
            if self.lane.write(pcm):
                metrics.MODEL_TO_CLIENT.observe(clock.monotonic() - since)
        else:
            self.lane.write(frame)

    def _to_stream(self, sid: int, events: list[dict], audio_bytes: int, now: float) -> None:
        link = self.links.get(sid)
        if link is None:
            return
        size = audio_bytes * 4 // 3 + 256 * len(events)  # base64 audio plus the envelope
        if not link.out.put_nowait(events, size) and not link.backlog_told:
            link.backlog_told = True
            self.inbox.put_nowait(("stream_failed", sid, CONNECTION, "the model stream is not accepting input"))

    # -- the client socket ------------------------------------------------------------------------------
    def message(self, data: bytes | str) -> None:
        """A client message, handed over by the socket's protocol as it is parsed (no task, no await)."""
        if type(data) is bytes:
            fits = self.inbox.put_nowait(("receive_audio", data), len(data))
        else:
            fits = self.inbox.put_nowait(("receive_text", data), len(data))
        if not fits and not self._reading_paused:  # read on once the consumer has emptied the inbox
            self._reading_paused = True
            self.lane.pause()

    def gone(self) -> None:
        """The socket closed or broke (told once)."""
        self.inbox.put_nowait(("client_gone",))

    async def _write_client(self) -> None:
        """What could not be written at once, in order, as the socket's buffer drains; then the close."""
        lane, outbox = self.lane, self.outbox
        while True:
            await outbox.ready()
            await lane.drained()
            if not outbox:
                continue  # discarded meanwhile
            frame = outbox.get_nowait()
            if frame is None:
                return
            if not isinstance(frame, CloseSocket):
                self._write(frame)
                continue
            try:
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await self.ws.close(frame.code, frame.reason)
            except Exception:  # the peer went away first: its protocol tells gone()
                pass
            return

    async def _close_now(self, code: int, reason: str, message) -> None:
        """After a failure of the actor itself: say so if the socket is still open."""
        ws = self.ws
        if ws.application_state != WebSocketState.CONNECTED or ws.client_state != WebSocketState.CONNECTED:
            return
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await ws.send_text(m.encode(message).decode())
                await ws.close(code, reason)
        except Exception:  # the peer went away first
            pass

    # -- model streams ----------------------------------------------------------------------------------
    async def _run_stream(self, link: _Link, setup: list[dict]) -> None:
        """Open the stream and send its setup, then feed it in order; receive beside it; close it in the
        service's order when the session retires it."""
        sid = link.stream_id
        try:
            stream = await self.s.transport.open()
        except ModelError as e:
            self.inbox.put_nowait(("stream_failed", sid, e.kind, e.message))
            return
        receiver = None
        try:
            if link.closing is None:
                try:
                    for event in setup:
                        async with asyncio.timeout(SEND_TIMEOUT_S):
                            await stream.send(event)
                except TimeoutError:
                    raise ModelError(CONNECTION, "sending the stream setup timed out") from None
                self.inbox.put_nowait(("stream_opened", sid))
                receiver = self._tg.create_task(self._receive(link, stream))
            while (events := await link.out.get()) is not None:  # None: retired, after all queued before it
                for event in events:
                    await stream.send(event)  # bounded by the transport (a timer per event here cost more)
            for event in link.closing:
                async with asyncio.timeout(CLOSING_SEND_TIMEOUT_S):
                    await stream.send(event)
        except (ModelError, TimeoutError) as e:
            if link.closing is None:
                err = e if isinstance(e, ModelError) else ModelError(CONNECTION, "send timed out")
                self.inbox.put_nowait(("stream_failed", sid, err.kind, err.message))
        finally:
            if receiver is not None:
                receiver.cancel()
            await asyncio.shield(stream.close())  # bounded in time by the transport

    async def _receive(self, link: _Link, stream) -> None:
        sid = link.stream_id
        try:
            while True:
                await self.model_gate.wait()
                raw = await stream.receive()
                if link.closing is not None:
                    return
                if raw is None:
                    self.inbox.put_nowait(("stream_ended", sid))
                    return
                body = raw.get("event", {}) if isinstance(raw, dict) else {}
                size = len(body["audioOutput"].get("content", "")) + 256 if "audioOutput" in body else 256
                await self.inbox.put(("model_event", sid, raw, clock.monotonic()), size)
        except ModelError as e:
            if link.closing is None:
                self.inbox.put_nowait(("stream_failed", sid, e.kind, e.message))

    async def _run_tool(self, call_id: str, name: str, arguments: dict) -> None:
        try:
            result = await self.s.toolbox.call(name, arguments)
            answer = (result.ok, result.content)
        except Exception as e:  # noqa: BLE001 - a tool's failure is the model's answer, never the session's
            logger.warning("tool call raised", exc_info=True, extra={"fields": {"tool": name}})
            answer = (False, tool_calls.error_result("tool_error", f"{type(e).__name__}: the tool failed"))
        finally:
            self._tools.pop(call_id, None)
        await self.inbox.put(("tool_finished", call_id, *answer), len(answer[1]))

    async def _record_usage(self, e: RecordUsage) -> None:
        """Add to the user's ledger. Not retried: a failure means a budget counts a little less."""
        try:
            await self.s.store.add_usage(owner_hash(e.principal), budget_period(self.s.settings.user_budget_period),
                                         e.conversation_id, e.tokens.total, e.cost_usd)
        except (StoreError, ConversationGone) as err:
            metrics.USAGE_RECORD_ERRORS.inc()
            log(logger, logging.WARNING, "usage not recorded", error=str(err), tokens=e.tokens.total)

    async def _authenticate(self, token: str) -> None:
        self.inbox.put_nowait(("authenticated", await self.s.authenticator.verify(token)))

    # -- the store --------------------------------------------------------------------------------------
    async def _store_worker(self) -> None:
        store, session_id = self.s.store, self.session.session_id
        while True:
            op = await self.store_ops.get()
            try:
                match op:
                    case LoadConversation(conversation_id=cid, owner=owner, max_bytes=max_bytes):
                        conv = await store.load(cid, owner=owner_hash(owner), max_bytes=max_bytes)
                        self.inbox.put_nowait(("conversation_loaded", conv))
                    case ReloadConversation(conversation_id=cid, owner=owner, max_bytes=max_bytes):
                        conv = await store.load(cid, owner=owner_hash(owner), max_bytes=max_bytes)
                        self.inbox.put_nowait(("conversation_reloaded", conv))
                    case CreateConversation(owner=owner):
                        self.inbox.put_nowait(("conversation_created", await store.create(owner_hash(owner))))
                    case HoldConversation(conversation_id=cid):
                        epoch = await store.take(cid, session_id)
                        self.s.hold(cid, self)
                        self.inbox.put_nowait(("conversation_held", epoch))
                    case StoreItem(conversation_id=cid, item=item, epoch=epoch):
                        stored_in = await store.append(cid, item, connection_id=session_id, epoch=epoch)
                        self.inbox.put_nowait(("item_stored", stored_in))
                    case EndConversation(conversation_id=cid):
                        await store.end(cid)
                        self.inbox.put_nowait(("conversation_ended",))
                    case CheckBudget(principal=principal):
                        spent = await store.spent(owner_hash(principal), budget_period(self.s.settings.user_budget_period))
                        self.inbox.put_nowait(("budget_checked", spent))
            except StoreError as e:
                self.inbox.put_nowait(("store_failed", str(e)))
            except ConversationGone as e:
                self.inbox.put_nowait(("conversation_gone", e.reason))
