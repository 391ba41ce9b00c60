"""A fake world for `protocol.session.Session`: a fake clock, a store, credentials, a voice-activity
detector and model streams that answer speech after an end-of-speech wait. No sockets, no tasks:
every effect is carried out here, synchronously, and every result fed back as an input."""

from __future__ import annotations

import base64
import itertools
from array import array
from collections import Counter
from dataclasses import dataclass, field

import orjson

from protocol import messages as m
from protocol import nova_events as nova
from protocol.items import Item
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
    SessionConfig,
    SessionEnv,
    State,
    StoreItem,
)

_SESSIONS = itertools.count(1)
FRAME_S = 0.02
FRAME = 640  # 20 ms of 16 kHz PCM16
SILENCE = bytes(FRAME)
IDS = {"sessionId": "s", "promptName": "p", "completionId": "c"}
REPLY_MS = 300  # each answer's audio
OUT_BYTES_PER_MS = 48  # 24 kHz PCM16


def speech(turn: int) -> bytes:
    """One 20 ms frame of 'speech' that says which turn it belongs to (its sample value)."""
    return array("h", [1000 + turn] * (FRAME // 2)).tobytes()


@dataclass
class Claim:
    conversation_id: str
    owner: str
    epoch: int = 0
    not_after: int | None = None


class FakeCredentials:
    """Readable tokens: `jwt:<sub>` bearers, `resume|<cid>|<owner>` resume tokens, numbered receipts."""

    def __init__(self):
        self.receipts: dict[str, tuple[str, Item]] = {}

    def principal(self, token):
        return "user:" + token[4:] if token.startswith("jwt:") else None

    def read_resume_token(self, token):
        parts = token.split("|")
        if len(parts) == 3:
            parts.append("0")
        return Claim(parts[1], parts[2], int(parts[3])) if len(parts) == 4 and parts[0] == "resume" else None

    def resume_token(self, cid, owner, epoch=0, not_after=None):
        return f"resume|{cid}|{owner}" + (f"|{epoch}" if epoch else "")

    def receipt(self, cid, item):
        token = f"receipt-{len(self.receipts)}"
        self.receipts[token] = (cid, item)
        return token

    def read_receipt(self, token, cid):
        found = self.receipts.get(token)
        return found[1] if found is not None and found[0] == cid else None


class EnergyVAD:
    """A frame is voiced when any sample is louder than 100."""

    def feed(self, pcm: bytes) -> bool:
        samples = array("h", pcm)
        return bool(samples) and max(map(abs, samples)) > 100


@dataclass
class Stored:
    conversation_id: str
    owner: str
    items: list = field(default_factory=list)
    ended: bool = False
    live: str = ""
    epoch: int = 0

    @property
    def total(self):
        return len(self.items)


class FakeStore:
    def __init__(self):
        self.convs: dict[str, Stored] = {}
        self.down = False
        self.ids = itertools.count(1)
        self.writes: list[str] = []  # item ids, in the order they were stored
        self.spent: dict[str, float] = {}  # principal -> USD spent this period (CheckBudget)
        self.usage: list = []              # RecordUsage effects, in order

    def create(self, owner):
        cid = f"conv{next(self.ids)}"
        self.convs[cid] = Stored(cid, owner)
        return cid

    def load(self, cid, owner):
        c = self.convs.get(cid)
        return c if c is not None and c.owner == owner else None


class FakeModel:
    """One model stream. It hears 'speech' frames, and `eos_s` after the last one it transcribes the
    utterance ("turn N") and answers it: a plan, `REPLY_MS` of audio, the FINAL text. A typed turn is
    answered at once. A deaf model says nothing."""

    def __init__(self, sid: int, setup: list[dict], *, eos_s: float, deaf: bool = False, reply_ms: int = REPLY_MS,
                 tool: str | None = None, speech_events: bool = False):
        self.sid = sid
        self.speech_events = speech_events  # Nova 2: userSpeechStart at an utterance's first frame, userSpeechEnd at its end
        self.tool = tool            # call this tool for every utterance, and answer with its result
        self.tool_uses: set[str] = set()  # toolUseIds asked and not yet answered
        self.tool_results: list[tuple[str, str]] = []  # (toolUseId, content) received
        self._tool_block: str | None = None
        self.reply_ms = reply_ms
        self.setup = setup
        self.eos_s = eos_s
        self.deaf = deaf
        self.closed = False
        self.failed = False
        self.audio = Counter()  # source -> bytes
        self.frames: list[bytes] = []
        self.heard: list[int] = []  # turn numbers in the utterance under way
        self.last_voiced = 0.0
        self.pending: list[tuple[float, dict]] = []  # (when, event)
        self.n = itertools.count()
        self.typed: list[str] = []

    def history_texts(self) -> list[str]:
        return [nova.event_body(e)["content"] for e in self.setup if nova.event_name(e) == "textInput"]

    def receive(self, event: dict, now: float, source: str) -> None:
        name = nova.event_name(event)
        body = nova.event_body(event)
        if name == "audioInput":
            pcm = base64.b64decode(body["content"])
            self.audio[source] += len(pcm)
            self.frames.append(pcm)
            loud = [s for s in array("h", pcm) if abs(s) > 100]
            if loud:
                self.last_voiced = now
                turn = loud[0] - 1000
                if not self.heard and self.speech_events:
                    self.pending.append((now, nova.user_speech_start(IDS)))
                if not self.heard or self.heard[-1] != turn:
                    self.heard.append(turn)
        elif name == "textInput" and body.get("content") and self._interactive:
            self.typed.append(body["content"])
            self._answer(f"answer to typed {body['content']}", now)
        elif name == "contentStart":
            self._interactive = body.get("interactive", False)
            if body.get("type") == "TOOL":  # Nova's rule: only a toolUseId this stream asked, once
                tool_use_id = body["toolResultInputConfiguration"]["toolUseId"]
                assert tool_use_id in self.tool_uses, f"unknown toolUseId {tool_use_id}"
                self.tool_uses.discard(tool_use_id)
                self._tool_block = tool_use_id
        elif name == "toolResult":
            assert self._tool_block is not None, "toolResult outside its TOOL block"
            self.tool_results.append((self._tool_block, body["content"]))
            orjson.loads(body["content"])  # "Tool Response parsing error" otherwise
        elif name == "contentEnd" and self._tool_block is not None:
            self._tool_block = None
            self._answer(f"the tool said {self.tool_results[-1][1]}", now)

    _interactive = False

    def poll(self, now: float) -> list[dict]:
        if self.deaf or self.closed:
            return []
        if self.heard and now - self.last_voiced >= self.eos_s:
            turns, self.heard = self.heard, []
            text = " ".join(f"turn {t}" for t in turns)
            k = next(self.n)
            if self.speech_events:
                self.pending.append((now, nova.user_speech_end(IDS)))
            self.pending += [(now, e) for e in (
                nova.output_content_start(IDS, f"u{k}", type="TEXT", role="USER", stage="FINAL"),
                nova.output_text(IDS, f"u{k}", "USER", text),
                nova.output_content_end(IDS, f"u{k}", type="TEXT", stop_reason="END_TURN"),
            )]
            if self.tool is not None:  # a filler sentence that pauses the turn, then the call
                self._answer("one moment", now + 0.1, stop="PARTIAL_TURN")
                self.tool_uses.add(f"tooluse_{self.sid}_{k}")
                self.pending += [(now + 0.2, e) for e in (
                    nova.output_content_start(IDS, f"t{k}", type="TOOL", role="TOOL"),
                    nova.output_tool_use(IDS, f"t{k}", f"tooluse_{self.sid}_{k}", self.tool, orjson.dumps({"q": text}).decode()),
                    nova.output_content_end(IDS, f"t{k}", type="TOOL", stop_reason="TOOL_USE"),
                )]
            else:
                self._answer(f"answer to {text}", now + 0.2)
        due = [e for t, e in self.pending if t <= now]
        self.pending = [(t, e) for t, e in self.pending if t > now]
        return due

    def _answer(self, text: str, at: float, stop: str = "END_TURN") -> None:
        k = next(self.n)
        self.pending += [(at, e) for e in (
            nova.output_content_start(IDS, f"s{k}", type="TEXT", role="ASSISTANT", stage="SPECULATIVE"),
            nova.output_text(IDS, f"s{k}", "ASSISTANT", text),
            nova.output_content_end(IDS, f"s{k}", type="TEXT", stop_reason="PARTIAL_TURN"),
            nova.output_content_start(IDS, f"a{k}", type="AUDIO", role="ASSISTANT"),
            nova.output_audio(IDS, f"a{k}", bytes(OUT_BYTES_PER_MS * self.reply_ms)),
            nova.output_content_end(IDS, f"a{k}", type="AUDIO", stop_reason=stop),
            nova.output_content_start(IDS, f"f{k}", type="TEXT", role="ASSISTANT", stage="FINAL"),
            nova.output_text(IDS, f"f{k}", "ASSISTANT", text),
            nova.output_content_end(IDS, f"f{k}", type="TEXT", stop_reason=stop),
        )]


class Harness:
    """Drives one Session on a fake clock, in 20 ms steps, and carries out its effects."""

    def __init__(self, *, eos_s: float = 0.6, open_delay: float = 0.05, bearer: str | None = None,
                 store: FakeStore | None = None, creds: FakeCredentials | None = None, **config):
        self.now = 0.0
        self.eos_s = eos_s
        self.open_delay = open_delay
        self.creds = creds or FakeCredentials()
        self.store = store or FakeStore()
        ids = itertools.count(1)
        env = SessionEnv(
            credentials=self.creds,
            new_id=lambda prefix: f"{prefix}_{next(ids)}",
            utc_now=lambda: "2026-11-29T00:00:00.000000Z",
            wall_time=lambda: 1_800_000_000.0,
            resampler=lambda rate: (lambda pcm: pcm) if rate == 16000 else (lambda pcm: pcm[: len(pcm) // 3 // 2 * 2]),
            speech_detector=EnergyVAD,
        )
        self.s = Session(SessionConfig(**config), env, now=0.0, bearer=bearer, session_id=f"sess_{next(_SESSIONS)}")
        self.client: list = []           # server messages, in order
        self.client_audio = 0
        self.closed: int | None = None
        self.models: dict[int, FakeModel] = {}
        self.opens: list[tuple[float, int]] = []
        self.open_failures: list[tuple[str, str]] = []  # the next opens fail with these
        self.deaf_next = 0                # so many next streams are deaf
        self.counts = Counter()
        self.logs: list[Log] = []
        self.model_audio = Counter()      # source -> bytes sent to any stream
        self.store_delay_ops: list = []   # ops held while the store is "slow"
        self.slow_store = False
        self.reply_ms = REPLY_MS              # the length of each answer's audio
        self.refuse = None                # principal -> (code, reason) or None: the gateway's caps
        self.tool = None                  # the next streams call this tool for every utterance
        self.speech_events = False        # the next streams send userSpeechStart / userSpeechEnd (Nova 2)
        self.observed: list[tuple[str, float]] = []  # Observe effects: (metric, value)
        self.tool_runs: list[RunTool] = []
        self.cancelled: list[str] = []

    # -- inputs ----------------------------------------------------------------------------------
    def text(self, obj) -> None:
        self.s.receive_text(obj if isinstance(obj, str) else orjson.dumps(obj).decode(), self.now)
        self.pump()

    def audio(self, pcm: bytes) -> None:
        self.s.receive_audio(pcm, self.now)
        self.pump()

    def connect(self, **start) -> dict:
        self.text({"type": "session.start", **start})
        self.until(lambda: self.ready is not None or self.closed is not None, 5)
        return self.ready

    def step(self, pcm: bytes | None = None, dt: float = FRAME_S) -> None:
        self.now = round(self.now + dt, 6)
        self.before_audio()
        if pcm is not None and self.closed is None:
            self.send_audio(pcm)
        for t, sid in [o for o in self.opens if o[0] <= self.now]:
            self.opens.remove((t, sid))
            self.s.stream_opened(sid, self.now)
        for model in list(self.models.values()):
            if model is self.current_model:
                for ev in model.poll(self.now):
                    self.s.model_event(model.sid, ev, self.now)
        d = self.s.next_deadline()
        if d is not None and d <= self.now:
            self.s.tick(self.now)
        self.pump()

    def before_audio(self) -> None:
        """What a harness of another wire protocol does at each step before the client's audio."""

    def send_audio(self, pcm: bytes) -> None:
        """One frame of the client's audio (16 kHz PCM16), as the client's protocol carries it."""
        self.s.receive_audio(pcm, self.now)

    def run(self, seconds: float, pcm: bytes | None = None) -> None:
        for _ in range(round(seconds / FRAME_S)):
            self.step(pcm)

    def until(self, check, seconds: float, pcm: bytes | None = SILENCE) -> None:
        for _ in range(round(seconds / FRAME_S)):
            if check():
                return
            self.step(pcm)
        assert check(), "condition not met in time"

    def say(self, turn: int, seconds: float = 1.0) -> None:
        self.run(seconds, speech(turn))

    # -- effects ---------------------------------------------------------------------------------
    def pump(self) -> None:
        while effects := self.s.effects():
            for e in effects:
                self.perform(e)

    def perform(self, e) -> None:
        s, now = self.s, self.now
        match e:
            case SendMessage(message=msg):
                assert self.closed is None, f"sent after close: {msg}"
                self.client.append(msg)
            case SendAudio(pcm=pcm):
                self.client_audio += len(pcm)
            case CloseSocket(code=code):
                assert self.closed is None
                self.closed = code
            case OpenStream(stream_id=sid, events=events):
                model = FakeModel(sid, events, eos_s=self.eos_s, deaf=self.deaf_next > 0, reply_ms=self.reply_ms,
                                  tool=self.tool, speech_events=self.speech_events)
                self.deaf_next = max(0, self.deaf_next - 1)
                self.models[sid] = model
                if self.open_failures:
                    kind, message = self.open_failures.pop(0)
                    model.failed = True
                    s.stream_failed(sid, kind, message, now)
                else:
                    self.opens.append((round(now + self.open_delay, 6), sid))
            case SendToStream(stream_id=sid, events=events, audio_bytes=n, source=source):
                model = self.models[sid]
                assert not model.closed and not model.failed, "sent to a closed stream"
                self.model_audio[source] += n
                for ev in events:
                    model.receive(ev, now, source)
            case CloseStream(stream_id=sid):
                self.models[sid].closed = True
                self.opens = [o for o in self.opens if o[1] != sid]
            case Authenticate(token=token):
                s.authenticated(self.creds.principal(token), now)
            case Admit(principal=principal):
                s.admitted(self.refuse(principal) if self.refuse else None, now)
            case CheckBudget(principal=principal):
                if self.store.down:
                    s.store_failed("store down", now)
                else:
                    s.budget_checked(self.store.spent.get(principal, 0.0), now)
            case RecordUsage():
                self.store.usage.append(e)
            case LoadConversation() | ReloadConversation() | CreateConversation() | HoldConversation() | StoreItem() \
                    | EndConversation() if self.slow_store:
                self.store_delay_ops.append(e)
            case LoadConversation() | ReloadConversation() | CreateConversation() | HoldConversation() | StoreItem() \
                    | EndConversation():
                self.store_op(e)
            case RunTool():
                self.tool_runs.append(e)
            case CancelTool(call_id=call_id):
                self.cancelled.append(call_id)
            case Log():
                self.logs.append(e)
            case Count(metric=name, label=label, amount=amount):
                self.counts[(name, label)] += amount
            case Observe(metric=name, value=value):
                self.observed.append((name, value))

    def store_op(self, e) -> None:
        s, now, store = self.s, self.now, self.store
        if store.down:
            s.store_failed("store down", now)
            return
        match e:
            case LoadConversation(conversation_id=cid, owner=owner):
                s.conversation_loaded(store.load(cid, owner), now)
            case ReloadConversation(conversation_id=cid, owner=owner):
                s.conversation_reloaded(store.load(cid, owner), now)
            case CreateConversation(owner=owner):
                s.conversation_created(store.create(owner), now)
            case HoldConversation(conversation_id=cid):
                store.convs[cid].live = s.session_id
                s.conversation_held(store.convs[cid].epoch, now)
            case StoreItem(conversation_id=cid, item=item, epoch=epoch):
                conv = store.convs[cid]
                if (conv.live != s.session_id and item.role != "tool") or epoch != conv.epoch:  # gateway/store/base.py
                    s.conversation_gone("taken_over" if conv.live else "revoked", now)
                    return
                if item.item_id not in {i.item_id for i in conv.items}:
                    conv.items.append(item)
                store.writes.append(item.item_id)
                s.item_stored(cid, now)
            case EndConversation(conversation_id=cid):
                store.convs[cid].ended = True
                s.conversation_ended(now)

    def finish_tool(self, call_id: str, content: str, ok: bool = True) -> None:
        self.s.tool_finished(call_id, ok, content, self.now)
        self.pump()

    def release_store(self) -> None:
        ops, self.store_delay_ops = self.store_delay_ops, []
        for op in ops:
            self.store_op(op)
        self.pump()

    # -- what happened ---------------------------------------------------------------------------
    @property
    def current_model(self) -> FakeModel | None:
        cur = self.s._current
        return self.models.get(cur.id) if cur is not None else None

    @property
    def ready(self) -> m.SessionReady | None:
        return next((x for x in self.client if isinstance(x, m.SessionReady)), None)

    def of(self, kind) -> list:
        return [x for x in self.client if isinstance(x, kind)]

    def finals(self, role: str | None = None) -> list[m.Transcript]:
        return [t for t in self.of(m.Transcript) if t.final and (role is None or t.role == role)]

    def errors(self) -> list[tuple[str, bool]]:
        return [(e.code, e.fatal) for e in self.of(m.Error)]

    def statuses(self) -> list[str]:
        return [x.state for x in self.of(m.Status)]

    @property
    def state(self) -> State:
        return self.s.state
