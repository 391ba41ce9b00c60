"""The session actor: one per WebSocket, it pumps bytes and time around the conversation state machine.

Four loops share one connection's state, all on the event loop and never blocking it:
client reader (socket -> model queue / state machine), model sender (queue -> stream), model
reader (stream -> state machine) and writer (outbox + pacer -> socket). A store writer commits
final items in order and answers `item.saved` only after each commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import time
import uuid
from collections import deque
from dataclasses import dataclass

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from protocol import codes
from protocol import messages as m
from protocol import nova_events as nova
from protocol.codes import CloseCode
from protocol.continuity import GiveUp, ReplayBuffer, StreamPolicy
from protocol.conversation import (
    AudioToClient,
    AwaitTruncate,
    Conversation,
    EndAudioItem,
    FlushPlayback,
    ItemFinal,
    SendTextTurn,
    SendToClient,
    StartAudioItem,
    StreamSetup,
)
from protocol.items import Item
from protocol.playback import Audio, AudioRateLimiter, PlaybackPacer

from . import metrics
from .audio import InputResampler, SpeechActivity
from .logs import log
from .store import StoreError
from .tokens import owner_hash
from .transport import ACCESS_DENIED, CONNECTION, IDLE_TIMEOUT_MESSAGE, MODEL_STREAM_ERROR, THROTTLING, ModelError

logger = logging.getLogger("novagate.session")

MODEL_QUEUE_FRAMES = 256      # about 8 s of 32 ms frames; a full queue slows the client reader
STORE_QUEUE_ITEMS = 1000
HISTORY_TO_CLIENT = 50
SEND_TIMEOUT_S = 10.0
TICK_S = 0.1                  # the model loop's longest sleep: keepalive and hand-over checks
KEEPALIVE_AFTER_S = 0.5       # client audio silent this long: the gateway feeds silence
MODEL_FRAME = 2048            # bytes of 16 kHz audio per audioInput event (64 ms)


@dataclass(eq=False)
class _Link:
    """One model stream and the setup it was opened with."""

    stream: object
    setup: StreamSetup
    history_len: int
    setup_ms: float = 0.0
    recv: asyncio.Task | None = None


def _model_failure(e: Exception) -> str:
    """What the client is told when the model cannot go on: clear, without internals."""
    if isinstance(e, ModelError) and e.kind == ACCESS_DENIED:
        return f"the model refused access ({e.message}); the gateway's AWS identity needs bedrock:InvokeModel " \
               "and access to the model"
    if isinstance(e, ModelError) and e.kind == THROTTLING:
        return "the model is over its quota (throttled); try again shortly"
    return "the model stream failed and could not be recovered"


class Closed(Exception):
    """Ends the session: close the socket with `code` (after an optional last message)."""

    def __init__(self, code: int, reason: str = "", message: object | None = None):
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.message = message


@dataclass
class Started:
    conversation_id: str
    requested_id: str | None
    owner: str
    resumed: bool
    resume_failed: str | None
    items: list[Item]
    total: int
    saved_receipts: list[str]


class SessionActor:
    def __init__(self, ws: WebSocket, services, bearer: str | None):
        self.ws = ws
        self.s = services
        self.cfg = services.settings
        self.bearer = bearer
        self.session_id = "sess_" + uuid.uuid4().hex[:16]
        self.conversation_id = ""
        self.setup: StreamSetup | None = None
        self.conv: Conversation | None = None
        self.pacer: PlaybackPacer | None = None
        self.limiter = AudioRateLimiter()
        self.resampler: InputResampler | None = None
        self._outbox: deque = deque()
        self._wake = asyncio.Event()
        self._model_q: asyncio.Queue = asyncio.Queue(MODEL_QUEUE_FRAMES)
        self._writes: deque[Item] = deque()  # in order; an item leaves only once committed
        self._writes_ready = asyncio.Event()
        self._send_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task] = []
        self._flush_estimate = 0
        self._store_degraded_sent = False
        self._ended = False
        self.link: _Link | None = None
        self._retiring: set[_Link] = set()
        self._next: asyncio.Task | None = None  # a stream being prepared for a hand-over
        self._failure: ModelError | None = None
        self.policy = StreamPolicy(rotate_after_s=self.cfg.rotate_after_s, force_after_s=self.cfg.rotate_force_after_s)
        self.replay = ReplayBuffer(seconds=3.0)
        self.activity = SpeechActivity()
        self.history: list[Item] = []
        self._last_user_at = 0.0
        self._last_client_audio = time.monotonic()
        self._last_model_audio = time.monotonic()
        self._stop: asyncio.Future = asyncio.get_running_loop().create_future()
        self.owner = ""
        self._aliases: set[str] = set()

    @property
    def capabilities(self):
        """What the model accepts (None: everything, as the local engine)."""
        return getattr(self.s.transport, "capabilities", None)

    # -- entry -----------------------------------------------------------------------------------
    async def run(self) -> None:
        try:
            start = await self._handshake()
            started = await self._open_conversation(start)
            await self._start_model(started, start)
            await self._serve(started, start)
        except Closed as c:
            if c.code == CloseCode.SERVICE_RESTART:
                await self._wind_down()
            await self._close(c.code, c.reason, c.message)
        except WebSocketDisconnect:
            pass
        except ModelError as e:
            metrics.MODEL_ERRORS.labels(e.kind).inc()
            log(logger, logging.ERROR, "model stream failed", session_id=self.session_id, kind=e.kind,
                error=e.message)
            await self._close(CloseCode.INTERNAL_ERROR, "model unavailable",
                              m.Error(codes.MODEL_UNAVAILABLE, _model_failure(e), fatal=True))
        except Exception:
            logger.exception("session failed", extra={"fields": {"session_id": self.session_id}})
            await self._close(CloseCode.INTERNAL_ERROR, "internal error",
                              m.Error(codes.INTERNAL_ERROR, "internal error", fatal=True))
        finally:
            await self._shutdown()

    # -- handshake -------------------------------------------------------------------------------
    async def _handshake(self) -> m.SessionStart:
        try:
            first = await asyncio.wait_for(self.ws.receive(), self.cfg.handshake_timeout)
        except TimeoutError:
            raise Closed(CloseCode.HANDSHAKE_TIMEOUT, "no session.start in time") from None
        if first["type"] == "websocket.disconnect":
            raise WebSocketDisconnect(first.get("code", 1000))
        if first.get("text") is None:
            raise Closed(CloseCode.PROTOCOL_ERROR, "audio before session.start")
        try:
            msg = m.decode_client_message(first["text"])
        except m.ProtocolError as e:
            raise Closed(CloseCode.PROTOCOL_ERROR, "bad session.start", m.Error(e.code, e.message, fatal=True)) from None
        if not isinstance(msg, m.SessionStart):
            raise Closed(CloseCode.PROTOCOL_ERROR, "first message must be session.start",
                         m.Error(codes.INVALID_FIELD, "the first message must be session.start", fatal=True))
        return msg

    def _principal(self, start: m.SessionStart) -> str | None:
        token = self.bearer or start.auth
        auth = self.s.authenticator
        if token is not None:
            principal = auth.principal(token)
            if principal is None:
                raise Closed(CloseCode.UNAUTHORIZED, "invalid credentials")
            return principal
        if self.cfg.auth_required:
            raise Closed(CloseCode.UNAUTHORIZED, "credentials required")
        return None

    async def _find(self, start: m.SessionStart, principal: str | None):
        """The conversation to resume, or None: missing, ended, expired and foreign look alike."""
        store = self.s.store
        if start.resume:
            claim = self.s.signer.read_resume_token(start.resume)
            if claim is None:
                return None
            if claim.owner.startswith("user:") and claim.owner != principal:
                return None
            conv = await store.load(claim.conversation_id, owner=owner_hash(claim.owner))
            if conv is None or conv.ended:
                return None
            return conv, claim.owner, claim.conversation_id
        if start.conversation_id:
            if principal is None:
                return None
            conv = await store.load(start.conversation_id, owner=owner_hash(principal))
            if conv is None or conv.ended:
                return None
            return conv, principal, start.conversation_id
        return None

    async def _open_conversation(self, start: m.SessionStart) -> Started:
        principal = self._principal(start)
        t0 = time.perf_counter()
        asked = bool(start.resume or start.conversation_id)
        try:
            found = await self._find(start, principal)
        except StoreError as e:
            # Not "not_found": the conversation may well exist. The client keeps its token and retries.
            log(logger, logging.WARNING, "resume failed: store error", session_id=self.session_id, error=str(e))
            raise Closed(CloseCode.TRY_AGAIN_LATER, "history store unavailable",
                         m.Error(codes.STORE_DEGRADED, "the history store is unavailable; retry shortly with the "
                                 "same resume token", fatal=True)) from None
        requested = None
        conv = None
        if found is None:
            owner = principal or "anon:" + secrets.token_urlsafe(12)
            cid = await self.s.store.create(owner_hash(owner))
            resumed = False
        else:
            conv, owner, requested = found
            cid = conv.conversation_id  # the store may have continued it under a new id
            resumed = True
        self.conversation_id = cid
        self.owner = owner
        self._aliases = {cid, requested} - {None}
        saved = await self._store_receipts(start.pending)
        if saved:  # the history now holds them: read it again (rare: only after a lost connection)
            conv = await self.s.store.load(self.conversation_id)
        metrics.HISTORY_LOAD.observe(time.perf_counter() - t0)
        if asked:
            metrics.RESUMES.labels("resumed" if resumed else "not_found").inc()
        return Started(self.conversation_id, requested, owner, resumed, None if resumed or not asked else "not_found",
                       conv.items if conv else [], conv.total if conv else 0, saved)

    async def _store_receipts(self, pending: tuple[str, ...]) -> list[str]:
        """Receipts of this conversation (under any id it had) are stored, once; others refused."""
        saved = []
        for token in pending:
            item = next((i for cid in self._aliases if (i := self.s.signer.read_receipt(token, cid))), None)
            if item is None:
                self._outbox.append(m.Error(codes.BAD_RECEIPT, "a pending receipt was not signed by this service "
                                            "for this conversation; it was ignored"))
                continue
            try:
                self._moved(await self.s.store.append(self.conversation_id, item, connection_id=self.session_id))
                saved.append(item.item_id)
            except StoreError:
                self._queue_write(item)  # kept and retried by the store writer
        return saved

    async def _start_model(self, started: Started, start: m.SessionStart) -> None:
        self.conv = Conversation(output_sample_rate=start.output_sample_rate)
        self.pacer = PlaybackPacer(start.output_sample_rate, lead_ms=self.cfg.playback_lead_ms)
        self.resampler = InputResampler(start.input_sample_rate)
        self.history = list(started.items)
        self.voice = start.voice or self.cfg.voice
        self.output_rate = start.output_sample_rate
        try:
            self._activate(await self._open_link())
        except (ModelError, TimeoutError) as e:
            metrics.MODEL_ERRORS.labels(getattr(e, "kind", "timeout")).inc()
            log(logger, logging.ERROR, "model stream failed to open", session_id=self.session_id, error=str(e))
            raise Closed(CloseCode.INTERNAL_ERROR, "model unavailable",
                         m.Error(codes.MODEL_UNAVAILABLE, _model_failure(e), fatal=True)) from None

    # -- model streams: open, hand over, recover ----------------------------------------------------
    async def _open_link(self, *, drop_trailing_user: bool = False) -> _Link:
        """A new stream that has the system prompt and the history, its audio block open."""
        caps = self.capabilities
        setup = StreamSetup.build(
            system_prompt=self.cfg.system_prompt,
            history=self.history,
            voice=self.voice,
            output_sample_rate=self.output_rate,
            endpointing_sensitivity=(self.cfg.endpointing_sensitivity or None)
            if caps is None or caps.endpointing_sensitivity else None,
            drop_trailing_user=drop_trailing_user,
        )
        t0 = time.monotonic()
        stream = await self.s.transport.open()
        try:
            for event in setup.events:
                await asyncio.wait_for(stream.send(event), SEND_TIMEOUT_S)
        except TimeoutError:
            await stream.close()
            raise ModelError(CONNECTION, "sending the stream setup timed out") from None
        except ModelError:
            await stream.close()
            raise
        return _Link(stream, setup, len(self.history), round((time.monotonic() - t0) * 1000, 2))

    def _activate(self, link: _Link) -> None:
        self.link = link
        self.setup = link.setup
        self.policy.stream_opened(time.monotonic())
        link.recv = asyncio.create_task(self._model_recv_loop(link))

    def _retire(self, link: _Link | None) -> None:
        """Close a stream that is no longer current, in the service's order, in the background."""
        if link is None:
            return
        self._retiring.add(link)

        async def close() -> None:
            try:
                for event in link.setup.closing():
                    await asyncio.wait_for(link.stream.send(event), 1.0)
            except Exception:  # already failed or gone: close() below still releases it
                pass
            await link.stream.close()
            self._retiring.discard(link)

        asyncio.get_running_loop().create_task(close())

    async def _model_recv_loop(self, link: _Link) -> None:
        """One receive loop per stream, bound to it; events of a stream that is no longer current are
        dropped. Never cancelled while it waits (transports make receive() safe to abandon)."""
        try:
            while True:
                raw = await link.stream.receive()
                if link is not self.link:
                    if raw is None:
                        return
                    continue
                if raw is None:
                    raise ModelError(CONNECTION, "the model stream ended")
                try:
                    event = nova.parse_output_event(raw)
                except nova.MalformedEvent as e:
                    raise ModelError(MODEL_STREAM_ERROR, f"Invalid event bytes: {e}") from None
                self.conv.model_event(event)
                await self._run_actions()
                while self.pacer.full:
                    await asyncio.sleep(0.05)
        except ModelError as e:
            if link is self.link and self._failure is None:
                self._failure = e

    async def _model_loop(self) -> None:
        """The only sender to the model: client audio and typed turns in order, silence while the
        client sends none, hand-overs at quiet moments, and recovery from stream failures."""
        while True:
            try:
                entry = await asyncio.wait_for(self._model_q.get(), TICK_S)
            except TimeoutError:
                entry = None
            if self._failure is not None:
                await self._recover()
            now = time.monotonic()
            try:
                if isinstance(entry, (bytes, bytearray)):
                    self.replay.add(now, entry)
                    await self._to_model(self.link.setup.audio(entry), audio=len(entry), source="client")
                elif isinstance(entry, SendTextTurn):
                    for event in self.link.setup.text_turn(entry.text):
                        await self._to_model(event)
                elif now - self._last_client_audio >= KEEPALIVE_AFTER_S and now - self._last_model_audio >= TICK_S:
                    silence = bytes(min(MODEL_FRAME * 4, int((now - self._last_model_audio) * 16000) * 2))
                    await self._to_model(self.link.setup.audio(silence), audio=len(silence), source="keepalive")
                await self._maybe_hand_over(now)
            except ModelError as e:
                if self._failure is None:
                    self._failure = e

    async def _to_model(self, event: dict, *, audio: int = 0, source: str = "") -> None:
        try:
            await asyncio.wait_for(self.link.stream.send(event), SEND_TIMEOUT_S)
        except TimeoutError:
            raise ModelError(CONNECTION, "send timed out") from None
        if audio:
            self._last_model_audio = time.monotonic()
            metrics.MODEL_AUDIO_BY_SOURCE[source].inc(audio)

    async def _maybe_hand_over(self, now: float) -> None:
        """Rotation: prepare the next stream at a quiet moment once the current one is old enough,
        and switch between two frames, so every frame goes to exactly one stream."""
        if not self.policy.due(now):
            return
        forced = self.policy.forced(now)
        quiet = self.conv.idle and not self.activity.speaking
        if self._next is None:
            if quiet or forced:
                self._next = asyncio.create_task(self._open_link())
            return
        if not self._next.done():
            return
        task, self._next = self._next, None
        try:
            link = task.result()
        except ModelError as e:
            log(logger, logging.WARNING, "rotation: next stream failed to open", session_id=self.session_id,
                kind=e.kind, error=e.message)
            return
        if not forced and (not quiet or link.history_len != len(self.history)):
            self._retire(link)  # the moment passed, or the history moved on: try again later
            return
        old, t0 = self.link, time.monotonic()
        self._activate(link)
        self.conv.stream_replaced()
        await self._run_actions()
        if forced:  # an utterance may be under way: the new stream hears it from its start
            for pcm in self.replay.since(self._last_user_at):
                await self._to_model(link.setup.audio(pcm), audio=len(pcm), source="replay")
        self._retire(old)
        metrics.ROTATIONS.labels("forced" if forced else "quiet").inc()
        log(logger, logging.INFO, "model stream rotated", session_id=self.session_id, forced=forced,
            switch_ms=round((time.monotonic() - t0) * 1000, 2), setup_ms=link.setup_ms,
            history_items=link.history_len)

    async def _recover(self) -> None:
        """Reopen the stream with the history after a failure (the ladder in StreamPolicy)."""
        while (err := self._failure) is not None:
            idle = err.kind == "validationException" and IDLE_TIMEOUT_MESSAGE in err.message
            decision = self.policy.on_error(err.recoverable, idle_timeout=idle)
            metrics.MODEL_ERRORS.labels(err.kind).inc()
            log(logger, logging.WARNING, "model stream failed", session_id=self.session_id, kind=err.kind,
                error=err.message, decision=type(decision).__name__)
            if isinstance(decision, GiveUp):
                raise err
            old, self.link = self.link, None
            self._retire(old)
            if self._next is not None:
                self._next.add_done_callback(lambda t: t.cancelled() or t.exception() or self._retire(t.result()))
                self._next = None
            self.conv.stream_replaced()
            self._notify(m.Status("recovering"))
            await self._run_actions()
            await asyncio.sleep(decision.delay_s)
            caps = self.capabilities
            unanswered = self.conv.unanswered if caps is None or caps.text_input else None
            try:
                link = await self._open_link(drop_trailing_user=unanswered is not None)
            except ModelError as e:
                self._failure = e
                continue
            self._failure = None
            self._activate(link)
            try:
                if unanswered is not None:  # the model owes an answer: ask it again, as a typed turn
                    for event in link.setup.text_turn(unanswered.text):
                        await self._to_model(event)
                for pcm in self.replay.since(self._last_user_at):  # what the user said since, again
                    await self._to_model(link.setup.audio(pcm), audio=len(pcm), source="replay")
            except ModelError as e:
                self._failure = e
                continue
            metrics.RECOVERIES.labels(err.kind).inc()
            self._notify(m.Status("listening"))
            log(logger, logging.INFO, "model stream recovered", session_id=self.session_id, kind=err.kind)

    # -- steady state ------------------------------------------------------------------------------
    async def _serve(self, started: Started, start: m.SessionStart) -> None:
        token = self.s.signer.resume_token(started.conversation_id, started.owner)
        ready = m.SessionReady(
            protocol=1,
            session_id=self.session_id,
            conversation_id=started.conversation_id,
            resume_token=token,
            resumed=started.resumed,
            history=[i.to_dict() for i in started.items[-HISTORY_TO_CLIENT:]],
            history_length=started.total,
            input_sample_rate=start.input_sample_rate,
            output_sample_rate=start.output_sample_rate,
            voice=start.voice or self.cfg.voice,
            engine=self.s.transport.name,
            resume_failed=started.resume_failed,
        )
        await self._send(ready)
        for item_id in started.saved_receipts:
            self._outbox.append(m.ItemSaved(item_id))
        self._outbox.append(m.Status("listening"))
        self._wake.set()
        log(logger, logging.INFO, "session ready", session_id=self.session_id,
            conversation_id=started.conversation_id, resumed=started.resumed, history_items=started.total)
        loops = [self._client_loop(), self._model_loop(), self._writer_loop(), self._store_loop()]
        self._tasks = [asyncio.create_task(c) for c in loops]
        done, _ = await asyncio.wait([*self._tasks, self._stop], return_when=asyncio.FIRST_COMPLETED)
        for t in done:
            if (exc := t.exception()) is not None:
                raise exc

    async def _client_loop(self) -> None:
        max_frame = m.MAX_FRAME_BYTES
        while True:
            msg = await self.ws.receive()
            if msg["type"] == "websocket.disconnect":
                raise WebSocketDisconnect(msg.get("code", 1000))
            data = msg.get("bytes")
            if data is not None:
                if len(data) > max_frame:
                    raise Closed(CloseCode.MESSAGE_TOO_BIG, f"audio frame over {max_frame} bytes")
                if len(data) % 2:
                    self._notify(m.Error(codes.INVALID_FIELD, "audio frames must hold whole 16-bit samples "
                                         "(an even number of bytes); frame dropped"))
                    continue
                rate = self.resampler.rate
                if not self.limiter.add(len(data) / (2 * rate), time.monotonic()):
                    raise Closed(CloseCode.RATE_LIMITED, "audio faster than 2x real time")
                pcm = self.resampler.to_model(data)
                self._last_client_audio = time.monotonic()
                self.activity.feed(pcm)
                for i in range(0, len(pcm), MODEL_FRAME):  # <= 64 ms per audioInput event
                    await self._model_q.put(pcm[i : i + MODEL_FRAME])
                continue
            await self._client_message(msg.get("text") or "")

    async def _client_message(self, text: str) -> None:
        try:
            msg = m.decode_client_message(text)
        except m.ProtocolError as e:
            self._notify(m.Error(e.code, e.message))
            return
        conv = self.conv
        match msg:
            case m.InputText() if self.capabilities is not None and not self.capabilities.text_input:
                self._notify(m.Error(codes.UNSUPPORTED, "this model does not take typed text (Nova Sonic v1); "
                                     "speak instead, or use amazon.nova-2-sonic-v1:0"))
            case m.InputText(text=t):
                conv.input_text(t)
            case m.PlaybackTruncate(item_id=item_id, played_ms=ms):
                conv.playback_truncate(item_id, ms)
            case m.Ping(id=ping_id):
                self._notify(m.Pong(ping_id, time.time()))
            case m.SessionEnd():
                await self._end_session()
            case m.SessionStart():
                self._notify(m.Error(codes.INVALID_FIELD, "session.start was already received"))
        await self._run_actions()

    async def _end_session(self) -> None:
        self._ended = True
        await self._flush_store(timeout=5.0)
        await self.s.store.end(self.conversation_id)
        await self._send(m.SessionEnded())
        log(logger, logging.INFO, "conversation ended by client", session_id=self.session_id,
            conversation_id=self.conversation_id)
        raise Closed(CloseCode.NORMAL, "session ended")

    async def _writer_loop(self) -> None:
        pacer, conv = self.pacer, self.conv
        while True:
            now = time.monotonic()
            while self._outbox:
                await self._send(self._outbox.popleft())
            for out in pacer.poll(now):
                if isinstance(out, Audio):
                    await self._send_bytes(out.pcm)
                else:
                    await self._send(out)
            for item_id in pacer.played_out(time.monotonic()):
                conv.played_out(item_id)
            await self._run_actions()
            if self._outbox:
                continue
            wake = pacer.next_wakeup(time.monotonic())
            self._wake.clear()
            timeout = None if wake is None else max(0.0, wake - time.monotonic())
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                pass

    async def _store_loop(self) -> None:
        while True:
            if not self._writes:
                self._writes_ready.clear()
                await self._writes_ready.wait()
                continue
            await self._commit(self._writes[0])  # cancelled mid-way, the item stays queued
            self._writes.popleft()

    async def _commit(self, item: Item) -> None:
        delay = 0.2
        while True:
            try:
                self._moved(await self.s.store.append(self.conversation_id, item, connection_id=self.session_id))
                metrics.ITEMS_SAVED.inc()
                self._notify(m.ItemSaved(item.item_id))
                return
            except StoreError as e:
                metrics.STORE_ERRORS.inc()
                log(logger, logging.WARNING, "store write failed; will retry", session_id=self.session_id,
                    error=str(e))
                if not self._store_degraded_sent:
                    self._store_degraded_sent = True
                    self._notify(m.Error(codes.STORE_DEGRADED, "the history store is unavailable; turns are kept "
                                         "in memory and stored when it is back"))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _moved(self, cid: str) -> None:
        """The store continued the conversation under a new id: adopt it and tell the client."""
        if cid == self.conversation_id:
            return
        log(logger, logging.INFO, "conversation moved by the store", session_id=self.session_id,
            old=self.conversation_id, new=cid)
        self.conversation_id = cid
        self._aliases.add(cid)
        if self.conv is not None:  # after the handshake; before it, session.ready carries the new id
            self._notify(m.SessionUpdated(cid, self.s.signer.resume_token(cid, self.owner)))

    # -- actions -----------------------------------------------------------------------------------
    async def _run_actions(self) -> None:
        conv, pacer = self.conv, self.pacer
        while actions := conv.actions():
            for a in actions:
                match a:
                    case SendToClient(message=msg, paced=True):
                        pacer.push_message(msg)
                    case SendToClient(message=msg):
                        self._outbox.append(msg)
                    case StartAudioItem(item_id=item_id):
                        pacer.start_item(item_id, m.ResponseAudioStart(item_id))
                    case AudioToClient(item_id=item_id, pcm=pcm):
                        pacer.push_audio(item_id, pcm)
                    case EndAudioItem(item_id=item_id, reason=reason):
                        pacer.end_item(item_id, m.ResponseAudioEnd(item_id, reason))
                    case FlushPlayback():
                        r = pacer.flush(time.monotonic())
                        self._flush_estimate = r.played_ms
                        conv.playback_flushed(r.current, r.played_ms, r.open_items, r.unheard)
                    case AwaitTruncate(item_id=item_id):
                        asyncio.get_running_loop().call_later(
                            self.cfg.truncate_wait_ms / 1000, self._truncate_timeout, item_id, self._flush_estimate
                        )
                    case ItemFinal(item=item):
                        receipt = self.s.signer.receipt(self.conversation_id, item)
                        self._outbox.append(m.Transcript(item.item_id, item.role, item.text, True, receipt))
                        self.history.append(item)
                        if item.role == "user":
                            self._last_user_at = time.monotonic()
                            self.policy.turn_completed()
                        self._queue_write(item)
                    case SendTextTurn():
                        await self._model_q.put(a)
        self._wake.set()

    def _queue_write(self, item: Item) -> None:
        """Writes wait here, in order, while the store is down. Past the bound the session ends
        (1013): the client still holds a receipt for every unsaved item and hands them back."""
        if len(self._writes) < STORE_QUEUE_ITEMS:
            self._writes.append(item)
            self._writes_ready.set()
        else:
            self._stop_with(Closed(CloseCode.TRY_AGAIN_LATER, "store backlog full", m.Error(
                codes.STORE_DEGRADED, f"the history store has been unavailable for {STORE_QUEUE_ITEMS} items; "
                "reconnect later with your resume token and receipts", fatal=True)))

    def _stop_with(self, closed: Closed) -> None:
        if not self._stop.done():
            self._stop.set_exception(closed)

    async def drain(self) -> None:
        """SIGTERM: tell the client to reconnect elsewhere, then wind down (see run())."""
        if self.conv is None or self._stop.done():
            return
        with contextlib.suppress(Exception):
            await self._send(m.SessionReconnect("draining", random.randint(0, 1000)))
        self._stop_with(Closed(CloseCode.SERVICE_RESTART, "server draining"))

    def _truncate_timeout(self, item_id: str, estimate: int) -> None:
        if self.conv is None:
            return
        self.conv.truncate_timeout(item_id, estimate)
        asyncio.get_running_loop().create_task(self._run_actions())

    def _notify(self, message) -> None:
        self._outbox.append(message)
        self._wake.set()

    # -- socket ------------------------------------------------------------------------------------
    async def _send(self, message) -> None:
        async with self._send_lock:
            await self.ws.send_text(m.encode(message).decode())

    async def _send_bytes(self, data: bytes) -> None:
        async with self._send_lock:
            await self.ws.send_bytes(data)

    async def _close(self, code: int, reason: str, message=None) -> None:
        if self.ws.application_state == WebSocketState.CONNECTING:
            await self.ws.accept()
        if self.ws.application_state != WebSocketState.CONNECTED or self.ws.client_state != WebSocketState.CONNECTED:
            return
        try:
            if message is not None:
                await self._send(message)
            await self.ws.close(code, reason)
        except Exception:  # the peer went away first: nothing left to tell it
            pass

    # -- teardown ----------------------------------------------------------------------------------
    async def _flush_store(self, timeout: float) -> None:
        """Commit every queued item before the session goes (bounded in time)."""
        deadline = time.monotonic() + timeout
        while self._writes and time.monotonic() < deadline:
            try:
                await asyncio.wait_for(self._commit(self._writes[0]), max(0.1, deadline - time.monotonic()))
            except TimeoutError:
                break
            self._writes.popleft()
        if self._writes:  # the client still holds receipts for these and hands them back
            log(logger, logging.ERROR, "store flush timed out", session_id=self.session_id,
                unsaved=len(self._writes))

    async def _wind_down(self) -> None:
        """Before closing 1012: stop the loops, store what is final, and tell the client it is saved."""
        await self._cancel_loops()
        if self.conv is not None:
            for item in self.conv.close():
                receipt = self.s.signer.receipt(self.conversation_id, item)
                self._outbox.append(m.Transcript(item.item_id, item.role, item.text, True, receipt))
                self._queue_write(item)
        await self._flush_store(timeout=max(1.0, self.cfg.drain_grace_s - 5))
        with contextlib.suppress(Exception):
            while self._outbox:
                message = self._outbox.popleft()
                if isinstance(message, (m.ItemSaved, m.Transcript, m.SessionUpdated)):
                    await self._send(message)

    async def _cancel_loops(self) -> None:
        tasks, self._tasks = self._tasks, []
        if self._next is not None:
            tasks.append(self._next)
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(BaseException):
                await t

    async def _shutdown(self) -> None:
        await self._cancel_loops()
        if self.conv is not None:
            for item in self.conv.close():
                self._queue_write(item)
        if self.conversation_id:
            await self._flush_store(timeout=5.0)
        if self._next is not None and self._next.done() and not self._next.cancelled() and not self._next.exception():
            self._retire(self._next.result())
        link, self.link = self.link, None
        self._retire(link)
        deadline = time.monotonic() + 5.0
        while self._retiring and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
