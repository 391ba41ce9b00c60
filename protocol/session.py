"""One connection's decisions: the sans-I/O session core.

In the manner of python-websockets' `Protocol` and h11's `Connection`, the gateway tells a
`Session` what happened (a client frame, a model event, a store result, the passing of time) and
carries out the effects it drains with `effects()`, reporting each result back as another input.
Everything that decides what a connection does lives in this file: the handshake and who may resume
what, frame rules and the rate limit, keepalive, when to hand over to a new model stream and what it
must hear, recovery, the order of store writes, what the client is told, and how the session
closes. Time is always an argument (`now`: seconds on any monotonic clock) and `next_deadline()`
says when the gateway must call `tick()`; ids, timestamps and signatures come from the `SessionEnv`
the gateway passes in. No asyncio, no sockets, no clocks.

    HANDSHAKE --session.start--> LOADING --conversation known--> OPENING --stream open--> LIVE
    LIVE --rotation due, quiet (or forced)--> HANDING_OVER --next stream open, switch--> LIVE
    LIVE | HANDING_OVER --stream failed, or deaf--> RECOVERING --stream open--> LIVE
    any --session.end | drain | disconnect | fatal--> CLOSING --writes stored or timed out--> CLOSED
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from . import codes
from . import messages as m
from . import nova_events as nova
from . import tool_calls
from .codes import CloseCode
from .continuity import (
    DEAF,
    Failure,
    GiveUp,
    RecoveryLadder,
    ReplayBuffer,
    StreamSetup,
    classify,
    failure_message,
)
from .dialogue import (
    AudioToClient,
    AwaitTruncate,
    Dialogue,
    EndAudioItem,
    FlushPlayback,
    ItemFinal,
    SendTextTurn,
    SendToClient,
    StartAudioItem,
)
from .items import Item
from .limits import AudioRateLimiter, TokenBucket
from .models import CONSERVATIVE_HISTORY, NOVA_2_HISTORY, HistoryLimits
from .playback import Audio, PlaybackPacer
from .usage import Prices, Tokens

USAGE_RECORD_EVERY_S = 15.0       # a user's ledger is written at most this often per session (and at its end)
MODEL_FRAME = 2048                # at most this many bytes of 16 kHz audio per audioInput event (64 ms)
# The model's cost (and the SDK's: serialising, signing) is per event, so the client's short frames
# (20 ms from a browser) are joined: held until 60 ms are ready, never longer than 50 ms.
MODEL_EVENT_BYTES = 1920
MODEL_HOLD_S = 0.05
MODEL_BYTES_PER_S = nova.MODEL_INPUT_RATE * 2
HISTORY_TO_CLIENT = 50            # items in session.ready
PRE_READY_AUDIO_S = 3.0           # audio kept between session.start and session.ready (PROTOCOL §3)
KEEPALIVE_AFTER_S = 1.0           # the client sent no audio this long: the model is fed silence
KEEPALIVE_EVERY_S = 0.5
LAG_TOLERANCE_S = 0.25            # a keepalive this late means the loop lagged: client audio may be unread
KEEPALIVE_DEFER_MAX_S = 5.0       # ... but the model never goes this long without audio (532 after 55 s)
REPLAY_PREROLL_S = 0.3            # replay starts this long before the first voiced frame
QUIET_AFTER_S = 0.8               # no voiced frame for this long: nobody speaks
UTTERANCE_GAP_S = 0.3             # voice after a pause this long starts a new utterance (a model's
                                  # end-of-speech wait is longer: Nova 1.5-2 s)
UNHEARD_GIVE_UP_S = 10.0          # speech the model has not transcribed this long after it ended was noise
HANDOVER_RETRY_S = 1.0            # after a prepared stream went stale, wait this long before another
STORE_QUEUE_ITEMS = 1000          # unsaved items kept while the store is down ...
STORE_QUEUE_BYTES = 4 * 1024 * 1024  # ... and their text bytes; past either the session ends (1013)
STORE_RETRY_FIRST_S = 0.2
STORE_RETRY_MAX_S = 5.0
CLOSE_FLUSH_S = 5.0               # how long a closing session waits for its store writes (and running tools)
RELOADS_AFTER_S = (2.0, CLOSE_FLUSH_S + 1.0)  # a resume of an unanswered turn reads the store again then
AUDIO_FRAMES = (200.0, 500)       # binary frames per second, burst (20 ms frames are 50 per second; a reconnect
                                  # may send 10 s of held audio at once): past it 4429, decodable or not
PINGS = (5.0, 50)                 # pings answered: per second, burst (pings queued behind a stalled loop
                                  # arrive together: 10 s of a client pinging at 5 per second); past it unanswered
ERROR_REPLIES = (10.0, 20)        # non-fatal error replies: per second, burst; past it they are not sent
TYPED_TURNS = (0.5, 5)            # input.text: per second, burst; past it `rate_limited`
TYPED_REFUSALS_TO_CLOSE = 10      # refused typed turns in a row before 4429


class State(enum.Enum):
    HANDSHAKE = "handshake"        # waiting for session.start (and its bearer token's verification)
    LOADING = "loading"            # finding the conversation in the store
    OPENING = "opening"            # the first model stream is being opened
    LIVE = "live"
    HANDING_OVER = "handing_over"  # the next stream is being prepared; the current one still serves
    RECOVERING = "recovering"      # no usable stream: one is being reopened
    CLOSING = "closing"            # storing what is left before the socket closes
    CLOSED = "closed"


# States tested on every frame, as constant tuples (building one from State's members each time costs more)
PRE_READY = (State.HANDSHAKE, State.LOADING, State.OPENING)  # before session.ready
SERVING = (State.LIVE, State.HANDING_OVER)                   # a current stream serves the conversation
READY = (State.LIVE, State.HANDING_OVER, State.RECOVERING)   # after session.ready, until closing


# -- effects ----------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class SendMessage:
    message: Any


@dataclass(frozen=True, slots=True)
class SendAudio:
    pcm: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class CloseSocket:
    code: int
    reason: str = ""
    discard: bool = False  # drop what is still queued for the client (it is not reading)


@dataclass(frozen=True, slots=True)
class OpenStream:
    """Open a model stream and send it `events`; answer stream_opened or stream_failed."""

    stream_id: int
    events: list[dict] = field(repr=False)


@dataclass(frozen=True, slots=True)
class SendToStream:
    stream_id: int
    events: list[dict] = field(repr=False)
    audio_bytes: int = 0
    source: str = ""  # client | keepalive | replay, for audio


@dataclass(frozen=True, slots=True)
class CloseStream:
    """Send `events` (the closing order; none for a failed stream), then release the stream."""

    stream_id: int
    events: list[dict] = field(repr=False, default_factory=list)


@dataclass(frozen=True, slots=True)
class Authenticate:
    """Verify a bearer token (it may need the identity provider's keys); answer `authenticated`."""

    token: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class Admit:
    """Ask the gateway whether this identified client may have a live session now (process-wide caps
    per address and per user); answer `admitted`."""

    principal: str | None


@dataclass(frozen=True, slots=True)
class LoadConversation:
    conversation_id: str
    owner: str
    max_bytes: int  # as much history as the model takes: more is never sent


@dataclass(frozen=True, slots=True)
class ReloadConversation:
    """Read the conversation again (a tool that ran on the connection this one took over may have
    stored its result since); answer `conversation_reloaded`."""

    conversation_id: str
    owner: str
    max_bytes: int


@dataclass(frozen=True, slots=True)
class CreateConversation:
    owner: str


@dataclass(frozen=True, slots=True)
class HoldConversation:
    """This connection holds the conversation from now on: writes from any other are refused (one live
    session per conversation). Answer `conversation_held` with the conversation's revocation epoch."""

    conversation_id: str


@dataclass(frozen=True, slots=True)
class StoreItem:
    conversation_id: str
    item: Item
    epoch: int | None = None  # refused if the conversation was revoked since


@dataclass(frozen=True, slots=True)
class EndConversation:
    conversation_id: str


@dataclass(frozen=True, slots=True)
class CheckBudget:
    """How much `principal` has spent in the budget's current period (store.spent); answer `budget_checked`."""

    principal: str


@dataclass(frozen=True, slots=True)
class RecordUsage:
    """Add what this connection used since its last record to the user's ledger (store.add_usage), for
    budgets that span sessions and instances. No answer: a failure is logged and counted."""

    principal: str
    conversation_id: str
    tokens: Tokens
    cost_usd: float


@dataclass(frozen=True, slots=True)
class RunTool:
    """Run a tool beside the conversation; answer `tool_finished(call_id, ok, content)` (content: JSON text)."""

    call_id: str
    name: str
    arguments: dict = field(repr=False)


@dataclass(frozen=True, slots=True)
class CancelTool:
    """Stop a tool that ran past its deadline (its answer was given); no answer is expected."""

    call_id: str


@dataclass(frozen=True, slots=True)
class Log:
    level: str  # debug | info | warning | error
    message: str
    fields: dict = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Count:
    metric: str
    label: str = ""
    amount: float = 1.0


@dataclass(frozen=True, slots=True)
class Observe:
    metric: str
    value: float


Effect = (SendMessage | SendAudio | CloseSocket | OpenStream | SendToStream | CloseStream | Authenticate | Admit | LoadConversation
          | ReloadConversation | CreateConversation | HoldConversation | StoreItem | EndConversation | CheckBudget
          | RecordUsage | RunTool | CancelTool | Log | Count | Observe)


# -- what the gateway passes in --------------------------------------------------------------------
class ResumeClaim(Protocol):
    conversation_id: str
    owner: str
    epoch: int                 # revocation epoch at minting: older than the store's means revoked
    not_after: int | None      # the conversation's absolute lifetime (seconds since the epoch)


class Credentials(Protocol):
    """Signing and verification with the gateway's keys: resume tokens and receipts."""

    def read_resume_token(self, token: str) -> ResumeClaim | None: ...
    def resume_token(self, conversation_id: str, owner: str, epoch: int, not_after: int) -> str: ...
    def receipt(self, conversation_id: str, item: Item) -> str: ...
    def read_receipt(self, token: str, conversation_id: str) -> Item | None: ...


class SpeechDetector(Protocol):
    """Voice activity over 16 kHz PCM."""

    def feed(self, pcm16k: bytes) -> bool:
        """Whether this audio (with what came before it) holds a voiced frame."""


class StoredHistory(Protocol):
    conversation_id: str
    ended: bool
    items: list[Item]
    total: int


@dataclass(frozen=True)
class SessionEnv:
    credentials: Credentials
    new_id: Callable[[str], str]                          # new_id("item") -> "item_<unguessable>"
    utc_now: Callable[[], str]                            # RFC 3339 UTC, for items
    wall_time: Callable[[], float]                        # seconds since the epoch, for pong
    resampler: Callable[[int], Callable[[bytes], bytes]]  # client rate -> converter to 16 kHz
    speech_detector: Callable[[], SpeechDetector]
    # audio codecs other than pcm16 (None: pcm16 only). decoder(codec) -> (one client frame -> PCM16, its
    # rate), raising ValueError on a bad frame; encoder(codec, rate) -> (one frame of PCM16 -> encoded)
    decoder: Callable[[str], tuple[Callable[[bytes], bytes], int]] | None = None
    encoder: Callable[[str, int], Callable[[bytes], bytes]] | None = None


@dataclass(frozen=True)
class SessionConfig:
    system_prompt: str = "You are a helpful assistant."
    voice: str = "matthew"
    engine: str = "local"
    text_input: bool = True                  # the model takes typed turns (Nova 2; not Nova Sonic v1)
    endpointing_sensitivity: str | None = None
    auth_required: bool = False
    handshake_timeout_s: float = 5.0
    playback_lead_ms: int = 200
    truncate_wait_ms: int = 1000
    rotate_after_s: float = 360.0
    rotate_force_after_s: float = 450.0
    drain_flush_s: float = 10.0
    deaf_after_s: float = 6.0
    conversation_ttl_s: float = 30 * 86400   # resume tokens of a conversation never outlive its start + this
    idle_timeout_s: float = 300.0            # no message and no speech from the client this long: 4410
    max_items: int = 10_000                  # items a conversation may hold; at the cap no more turns
    history: HistoryLimits = NOVA_2_HISTORY  # what one stream takes (protocol.models)
    tools: tuple[dict, ...] = ()             # Nova toolSpecs, told to every stream in promptStart
    public_tools: frozenset[str] = frozenset()  # their arguments and results may be shown to the client
    tool_timeout_s: float = 20.0             # a tool not done by then is answered with a timeout error
    prices: Prices = Prices()                # USD per 1,000 tokens (protocol/usage.py)
    user_budget_usd: float = 0.0             # what one user may spend per period (store ledger); 0: no budget


@dataclass(frozen=True, slots=True)
class Prompt:
    """What a model stream is opened with that a client may change mid-session (`Session.configure`,
    for the OpenAI Realtime adapter): streams opened before a change are replaced at a quiet moment."""

    system_prompt: str
    voice: str
    endpointing_sensitivity: str | None = None
    tools: tuple[dict, ...] = ()   # Nova toolSpecs: the gateway's, then the client's
    tool_choice: dict | None = None  # promptStart toolConfiguration.toolChoice (None: the model's default)


def may_use(owner: str, principal: str | None) -> bool:
    """The one access rule, for the socket and the HTTP endpoints alike: a conversation owned by a
    user is that user's alone; an anonymous one belongs to whoever holds its resume token."""
    return not owner.startswith("user:") or owner == principal


@dataclass(eq=False, slots=True)
class _Stream:
    id: int
    setup: StreamSetup
    history_len: int          # items in the history it was opened with
    owed: Item | None         # the user turn it is to be asked again (dropped from its history)
    prompt: Prompt | None = None  # what it was opened with
    prepared_at: float = 0.0
    opened_at: float = 0.0
    opened: bool = False
    current_since: float = 0.0
    heard: bool = False       # it has said something since it became current
    held: bytearray = field(default_factory=bytearray)  # client audio not yet sent (MODEL_EVENT_BYTES)
    held_since: float | None = None


@dataclass(slots=True)
class _ToolCall:
    call_id: str
    tool_use_id: str          # the model's id: it exists only on the stream that asked
    name: str
    arguments: dict
    stream_id: int
    started_at: float
    deadline: float


@dataclass(slots=True)
class _Closing:
    code: int
    reason: str
    deadline: float
    end_conversation: bool = False
    end_sent: bool = False


class Session:
    """Every decision of one client connection. Feed it inputs; drain `effects()`."""

    def __init__(self, config: SessionConfig, env: SessionEnv, *, now: float, bearer: str | None = None,
                 session_id: str | None = None):
        self.cfg = config
        self.env = env
        self.session_id = session_id or env.new_id("sess")
        self.state = State.HANDSHAKE
        self.conversation_id = ""
        self.owner = ""
        self.history: list[Item] = []
        self._bearer = bearer
        self._effects: list[Effect] = []
        self._now = now
        self._handshake_deadline = now + config.handshake_timeout_s
        self._client_open = True
        self._start: m.SessionStart | None = None
        self._principal: str | None = None
        self._admitting = False
        self._asked = False                 # the client asked to resume a conversation
        self._requested: str | None = None  # ... and this is the one it may have
        self._claim: ResumeClaim | None = None
        self._not_after = 0                 # the conversation's absolute lifetime, for its tokens
        self._resumed = False
        self._loaded_at = now
        self._aliases: set[str] = set()
        self._total = 0
        self._before_ready: list[Any] = []          # messages held until session.ready
        self._pre_ready_audio: deque[bytes] = deque()
        self._pre_ready_bytes = 0
        # audio in
        self._limiter = AudioRateLimiter()
        self._pings = TokenBucket(*PINGS)
        self._frames = TokenBucket(*AUDIO_FRAMES)
        self._error_replies = TokenBucket(*ERROR_REPLIES)
        self._typed_turns = TokenBucket(*TYPED_TURNS)
        self._typed_refused = 0
        self._last_active = now                     # the client's last message or voiced frame
        self._resample: Callable[[bytes], bytes] = bytes
        self._decode: Callable[[bytes], bytes] | None = None  # the client's codec (None: PCM16)
        self._encode: Callable[[bytes], bytes] | None = None
        self._input_rate = m.DEFAULT_CLIENT_INPUT_RATE        # of the PCM the client's frames hold
        self._vad = env.speech_detector()
        self._replay = ReplayBuffer()
        self._last_voiced = -1e9                    # when the last voiced frame arrived
        self._utterance_start = -1e9                # the first voiced frame of the latest utterance
        self._unheard_since: float | None = None    # voice no stream has transcribed yet, since
        self._typing = False
        self._last_client_audio = now
        self._last_model_audio = now
        self._keepalive_at: float | None = None
        # the user's speech as the client is told it (input.speech_started / stopped) and measured
        self._model_speech = False                  # the model sends userSpeechStart: it is the source
        self._said: str | None = None               # source of the utterance told started, not yet stopped
        self._said_at = 0.0                         # ... and when it started
        self._said_item: str | None = None          # ... and the user item it will become
        self._speech_end: float | None = None       # end of the last utterance, until its reply's first audio
        self._reply_item: str | None = None         # the reply's item, once its audio has started
        # dialogue and playback
        self._dialogue: Dialogue | None = None
        self._pacer: PlaybackPacer | None = None
        self._truncates: dict[str, tuple[float, int]] = {}  # item_id -> (deadline, estimate)
        self._flush_estimate = 0
        # model streams
        self._stream_ids = 0
        self._current: _Stream | None = None
        self._next: _Stream | None = None           # prepared for a hand-over, or reopening
        self._ladder = RecoveryLadder()
        self._reopen_at: float | None = None
        self._failure_kind = ""
        self._handover_retry_at = 0.0
        self._deaf_at: float | None = None
        self._deaf_utterance = -1.0                 # the utterance a deaf stream was replaced for
        # store
        self._writes: deque[Item] = deque()
        self._writes_bytes = 0
        self._store_op: str | None = None           # load | create | hold | write | end: one at a time
        self._epoch: int | None = None              # the conversation's revocation epoch, once held
        self._gone = False                          # the store refuses this connection's writes for good
        self._taken_over = False                    # ... but for tool items: another connection took over
        self._reloads: list[float] = []             # when to read the conversation again (tool results)
        self._store_retry_at: float | None = None
        self._store_delay = STORE_RETRY_FIRST_S
        self._store_degraded_told = False
        self._backlog = 0                           # writes waiting, as last counted (store_backlog)
        self._closing: _Closing | None = None
        # usage (protocol/usage.py): counted as Nova reports it; a user's spend recorded in the store's ledger
        self._usage_counted = Tokens()
        self._usage_unrecorded = Tokens()
        self._usage_recorded_at = now
        self._spent_before = 0.0                    # what the user had spent this period when the session began
        # tools
        self._prompt: Prompt | None = None          # set by session.start; changed by configure()
        self._tool_names = frozenset(t["toolSpec"]["name"] for t in config.tools)
        self._calls: dict[str, _ToolCall] = {}      # running, by call_id
        self._late: deque[tuple[str, str]] = deque()  # (name, result) whose stream is gone: told as a user turn
        self._tool_turn: Item | None = None         # the user turn a tool was called for (not asked again)
        self._draining: tuple[int, float, float] | None = None  # (retry_after_ms, since, send away by)
        self._history_limits = config.history  # the conservative ones once a stream refused a history

    # -- draining ------------------------------------------------------------------------------------
    def effects(self) -> list[Effect]:
        out, self._effects = self._effects, []
        return out

    def next_deadline(self) -> float | None:
        """When `tick()` is next due (None: only an input can change anything). Called after every batch
        of inputs: flat, with nothing looked at twice."""
        now, state, pacer, closing = self._now, self.state, self._pacer, self._closing
        times: list[float] = []
        add = times.append
        if state is State.HANDSHAKE:
            add(self._handshake_deadline)
        if pacer is not None and not pacer.idle and (t := pacer.next_wakeup(now)) is not None:
            add(t)
        if self._truncates:
            times.extend(d for d, _ in self._truncates.values())
        if self._store_retry_at is not None:
            add(self._store_retry_at)
        if self._reloads and closing is None:
            add(self._reloads[0])
        if closing is not None:
            add(closing.deadline)
        if self._calls:
            times.extend(c.deadline for c in self._calls.values())
        if self._draining is not None and closing is None:
            add(self._draining[2])
        if self._reopen_at is not None:
            add(self._reopen_at)
        said, last_voiced = self._said, self._last_voiced
        if said == "gateway" and (t := last_voiced + QUIET_AFTER_S) > now:
            add(t)  # the gateway's VAD ends the utterance
        if said == "model" and (t := max(last_voiced, self._said_at) + UNHEARD_GIVE_UP_S) > now:
            add(t)  # ... or one the model never ended
        if state in READY:
            add(self._last_active + self.cfg.idle_timeout_s)
        if state in SERVING:
            if self._keepalive_at is not None:
                add(self._keepalive_at)
            if self._deaf_at is not None:
                add(self._deaf_at)
            cur = self._current
            if cur.held_since is not None:
                add(cur.held_since + MODEL_HOLD_S)
            # checks that only time can make true (each also runs on every input)
            if (t := cur.current_since + self.cfg.rotate_after_s) > now:
                add(t)
            if (t := cur.current_since + self.cfg.rotate_force_after_s) > now:
                add(t)
            if (t := self._handover_retry_at) > now:
                add(t)
            if (t := last_voiced + QUIET_AFTER_S) > now:
                add(t)
            if (t := last_voiced + UNHEARD_GIVE_UP_S) > now:
                add(t)
        return min(times) if times else None

    @property
    def model_paused(self) -> bool:
        """Stop reading model events: the client's playback queue is full (it catches up in real time)."""
        return self._pacer is not None and self._pacer.full

    # -- inputs: the client --------------------------------------------------------------------------
    def receive_text(self, text: str | bytes, now: float) -> None:
        self._now = now
        if not self._accepting_client():
            return
        if len(text) > m.MAX_TEXT_MESSAGE_BYTES:
            self._fail_client(CloseCode.MESSAGE_TOO_BIG, f"text message over {m.MAX_TEXT_MESSAGE_BYTES} bytes")
            return
        self._last_active = now
        try:
            msg = m.decode_client_message(text)
        except m.ProtocolError as e:
            if self.state is State.HANDSHAKE and self._start is None:
                self._fail_client(CloseCode.PROTOCOL_ERROR, "bad session.start", m.Error(e.code, e.message, True))
            else:
                self._reply_error(e.code, e.message)
            return
        self.receive_message(msg, now)

    def receive_message(self, msg: m.ClientMessage, now: float) -> None:
        """A decoded client message (`receive_text` decodes the native protocol; other wire protocols'
        adapters build these themselves)."""
        self._now = now
        if not self._accepting_client():
            return
        self._last_active = now
        if self.state is State.HANDSHAKE and self._start is None:
            if not isinstance(msg, m.SessionStart):
                self._fail_client(CloseCode.PROTOCOL_ERROR, "first message must be session.start",
                                  m.Error(codes.INVALID_FIELD, "the first message must be session.start", True))
                return
            self._on_start(msg, now)
        else:
            self._on_message(msg, now)
        self._advance(now)

    @property
    def accepting(self) -> bool:
        """The client's frames are still read (its socket is open and the session not closed)."""
        return self._accepting_client()

    @property
    def now(self) -> float:
        """The time of the latest input."""
        return self._now

    @property
    def prompt(self) -> Prompt | None:
        """What model streams are opened with now (None before session.start)."""
        return self._prompt

    def configure(self, prompt: Prompt, now: float) -> None:
        """The client changed the system prompt, voice, turn-taking or tools: streams opened from now
        on use them, and the current one is replaced at the next quiet moment (as a rotation is)."""
        self._now = now
        if self._prompt is None or not self._accepting_client() or prompt == self._prompt:
            return
        self._last_active = now
        self._prompt = prompt
        self._tool_names = frozenset(t["toolSpec"]["name"] for t in prompt.tools)
        self._advance(now)

    @property
    def responding(self) -> bool:
        """The model is answering, or the client still plays its answer: there is a reply to cancel."""
        d = self._dialogue
        return d is not None and (d.answering or self._pacer.playing(self._now))

    def cancel_response(self, now: float) -> None:
        """The client cancels the reply under way: playback is cut as at a barge-in, the item is kept
        as far as the client heard it, and what the model still says of that answer is dropped."""
        self._now = now
        if not self.responding or self.state not in READY:
            return
        self._last_active = now
        self._dialogue.barge_in(playing=self._pacer.playing(now))
        self._run_dialogue(now)
        self._advance(now)

    def receive_audio(self, data: bytes, now: float) -> None:
        self._now = now
        state = self.state  # unchanged until _hear (every failure below returns)
        if not self._client_open or state is State.CLOSED:  # _accepting_client(), inline: 50 times a second
            return
        if state is State.HANDSHAKE and self._start is None:
            self._fail_client(CloseCode.PROTOCOL_ERROR, "audio before session.start")
            return
        if len(data) > m.MAX_FRAME_BYTES:
            self._fail_client(CloseCode.MESSAGE_TOO_BIG, f"audio frame over {m.MAX_FRAME_BYTES} bytes")
            return
        if not self._frames.take(now):  # tiny or undecodable frames cost work the audio limit does not see
            self._fail_client(CloseCode.RATE_LIMITED, f"over {AUDIO_FRAMES[0]:g} audio frames per second")
            return
        if self._decode is not None:
            try:
                data = self._decode(data)
            except ValueError as e:
                self._reply_error(codes.INVALID_FIELD, f"a {self._start.input_codec} frame that does not decode "
                                  f"({e}); frame dropped")
                return
        if not self._limiter.add(len(data) / (2 * self._input_rate), now):  # every frame is charged
            self._fail_client(CloseCode.RATE_LIMITED, "audio faster than 2x real time")
            return
        if len(data) % 2:
            self._reply_error(codes.INVALID_FIELD, "audio frames must hold whole 16-bit samples (an even number "
                              "of bytes); frame dropped")
            return
        if state is State.CLOSING:
            return
        pcm = self._resample(data)
        if not pcm:
            return
        self._last_client_audio = now
        self._hear(pcm, now)
        state = self.state
        if state in PRE_READY:
            self._pre_ready_audio.append(pcm)
            self._pre_ready_bytes += len(pcm)
            while self._pre_ready_bytes > PRE_READY_AUDIO_S * MODEL_BYTES_PER_S:
                self._pre_ready_bytes -= len(self._pre_ready_audio.popleft())
        elif self._current is not None and state is not State.RECOVERING:
            self._to_model(self._current, pcm, now, "client")
            self._keepalive_at = now + KEEPALIVE_AFTER_S
        self._advance(now)

    def client_gone(self, now: float) -> None:
        """The socket closed (or broke). What is final is still stored."""
        self._now = now
        self._client_open = False
        if self.state in (State.HANDSHAKE, State.LOADING):
            self._closed()
        elif self.state is not State.CLOSED and self._closing is None:
            self._begin_closing(now, CloseCode.NORMAL, "client gone", CLOSE_FLUSH_S)
        self._advance(now)

    def client_backlog_full(self, now: float) -> None:
        """What the session owes the client passed its byte budget: the client is not reading."""
        self._now = now
        if not self._client_open:
            return
        self._log("warning", "client not reading: closing")
        self._emit(CloseSocket(CloseCode.RATE_LIMITED, "client not reading", discard=True))
        self._client_open = False
        if self.state in (State.HANDSHAKE, State.LOADING):
            self._closed()
        elif self._closing is None:
            self._begin_closing(now, CloseCode.RATE_LIMITED, "client not reading", CLOSE_FLUSH_S)
        self._advance(now)

    def drain(self, retry_after_ms: int, now: float) -> None:
        """The server is going away (SIGTERM): send the client elsewhere, store what is final, close 1012."""
        self._now = now
        if self.state in PRE_READY:
            self._fail_client(CloseCode.SERVICE_RESTART, "server draining")
            return
        if self._closing is not None or self.state is State.CLOSED or self._draining is not None:
            return
        # A running tool's result can only reach the model here (a session resumed elsewhere never
        # hears of it): the client is sent away once the tools have answered and the model has
        # spoken, or when half the flush time is spent.
        self._draining = (retry_after_ms, now, now + (self.cfg.drain_flush_s / 2 if self._calls else 0.0))
        self._advance(now)

    def _send_away(self, now: float) -> None:
        retry_after_ms, since, until = self._draining
        if now < until and (self._calls or self._late or not self._dialogue.idle):
            return
        self._send(m.SessionReconnect("draining", retry_after_ms))
        self._begin_closing(now, CloseCode.SERVICE_RESTART, "server draining",
                            max(1.0, self.cfg.drain_flush_s - (now - since)))

    def tick(self, now: float) -> None:
        """Time has passed: do what is due."""
        self._now = now
        if self.state is State.HANDSHAKE and now >= self._handshake_deadline:  # covers verifying the token too
            self._fail_client(CloseCode.HANDSHAKE_TIMEOUT, "no session.start in time")
            return
        cur = self._current
        if cur is not None and cur.held_since is not None and now >= cur.held_since + MODEL_HOLD_S:
            self._release_held(cur)
        if (self._keepalive_at is not None and now >= self._keepalive_at
                and self.state in SERVING):
            self._keepalive(now)
        self._advance(now)

    # -- inputs: the store ----------------------------------------------------------------------------
    def conversation_loaded(self, conv: StoredHistory | None, now: float) -> None:
        self._now = now
        if self._store_op != "load":
            return
        self._store_op = None
        if self.state is not State.LOADING:
            return
        revoked = self._claim is not None and self._claim.epoch < getattr(conv, "epoch", 0)
        if conv is None or conv.ended or revoked:
            self._create(now)
            return
        self._resumed = True
        if self._claim is not None and self._claim.not_after is not None:
            self._not_after = self._claim.not_after
        self.history = list(conv.items)
        last = self.history[-1] if self.history else None
        if last is not None and (last.role == "user" or last.interrupted):
            # the last connection ended mid-turn: a tool it called may still answer there (stored late)
            self._reloads = [now + s for s in RELOADS_AFTER_S]
            if self.cfg.tools:  # and once more when the slowest tool there has ended and been stored
                self._reloads.append(now + self.cfg.tool_timeout_s + RELOADS_AFTER_S[-1])
        self._total = conv.total
        self._known(conv.conversation_id, now)

    def conversation_reloaded(self, conv: StoredHistory | None, now: float) -> None:
        """The conversation read again: tool items another connection stored since this one loaded it
        join the history, and reach the client and the model like a late result."""
        self._now = now
        if self._store_op != "reload":
            return
        self._store_op = None
        known = {i.item_id for i in self.history}
        for item in (conv.items if conv is not None else []):
            record = tool_calls.read_record(item) if item.role == "tool" and item.item_id not in known else None
            if record is None:
                continue
            self.history.append(item)
            self._total += 1
            name, public = record["name"], record["name"] in self.cfg.public_tools
            self._send(m.ToolCall(str(record.get("call_id", "")), name, str(record.get("status", "finished")),
                                  record.get("duration_ms"), item.item_id,
                                  self.env.credentials.receipt(self.conversation_id, item),
                                  record.get("arguments") if public else None, record.get("result") if public else None))
            self._send(m.ItemSaved(item.item_id))
            if self.cfg.text_input:
                self._late.append((name, orjson.dumps(record.get("result")).decode()))
            self._log("info", "tool result from the connection taken over", tool=name)
        self._advance(now)

    def conversation_created(self, conversation_id: str, now: float) -> None:
        self._now = now
        if self._store_op != "create":
            return
        self._store_op = None
        if self.state is State.LOADING:
            self._known(conversation_id, now)

    def conversation_held(self, epoch: int, now: float) -> None:
        """This connection holds the conversation (see HoldConversation)."""
        self._now = now
        if self._store_op != "hold":
            return
        self._store_op = None
        self._epoch = epoch
        if self.state is State.LOADING:
            self.state = State.OPENING
            self._prepare(now)
        self._advance(now)

    def conversation_gone(self, reason: str, now: float) -> None:
        """The store refuses this connection's writes for good: the conversation was taken over by
        another connection, revoked, ended or deleted. What is unsaved stays with the client's receipts."""
        self._now = now
        op, self._store_op = self._store_op, None
        if op in ("load", "create", "hold") and self.state is State.LOADING:
            self._fail_client(CloseCode.TRY_AGAIN_LATER, "conversation gone", m.Error(
                codes.CONVERSATION_GONE, f"the conversation is not available ({reason}); reconnect", True))
            return
        taken = reason == "taken_over"
        self._gone = True  # nothing more can be written: what is unsaved is in the client's receipts ...
        self._taken_over = taken  # ... but a tool's record: the session that took over reads it back
        self._writes = deque(i for i in self._writes if taken and i.role == "tool")
        self._writes_bytes = sum(i.size for i in self._writes)
        self._count_backlog()
        self._log("info", "conversation gone", reason=reason)
        if self._closing is None:
            self._send(m.Error(codes.TAKEN_OVER if taken else codes.CONVERSATION_GONE,
                               "another connection has taken this conversation over" if taken else
                               f"this conversation is no longer available ({reason})", True))
            self._begin_closing(now, CloseCode.CONFLICT, "taken over" if taken else "conversation gone",
                                CLOSE_FLUSH_S if taken and self._calls else 0.0)
        elif self._closing.end_conversation:
            self._closing.end_sent = True  # nothing left to end
        self._advance(now)

    def item_stored(self, conversation_id: str, now: float) -> None:
        """The head write is durable; `conversation_id` is where the store put it."""
        self._now = now
        if self._store_op != "write":
            return
        self._store_op = None
        item = self._writes.popleft()
        self._writes_bytes -= item.size
        self._count_backlog()
        self._store_delay = STORE_RETRY_FIRST_S
        self._moved(conversation_id)
        self._emit(Count("items_saved"))
        self._send(m.ItemSaved(item.item_id))
        self._advance(now)

    def conversation_ended(self, now: float) -> None:
        self._now = now
        if self._store_op != "end":
            return
        self._store_op = None
        self._log("info", "conversation ended by client", conversation_id=self.conversation_id)
        self._send(m.SessionEnded())
        self._finish()

    def store_failed(self, error: str, now: float) -> None:
        """The store operation in flight failed (it may be retried)."""
        self._now = now
        op, self._store_op = self._store_op, None
        self._emit(Count("store_errors"))
        if op in ("load", "create", "hold", "budget"):
            # Not "not_found": the conversation may well exist. The client keeps its token and retries.
            self._log("warning", "conversation lookup failed: store error", error=error)
            self._fail_client(CloseCode.TRY_AGAIN_LATER, "history store unavailable", m.Error(
                codes.STORE_DEGRADED, "the history store is unavailable; retry shortly with the same resume token",
                True))
            return
        if op is None or op == "reload":  # a reload is a second look: it is not retried
            return
        self._log("warning", "store write failed; will retry", error=error, op=op)
        if op == "write" and not self._store_degraded_told:
            self._store_degraded_told = True
            self._send(m.Error(codes.STORE_DEGRADED, "the history store is unavailable; turns are kept in memory "
                               "and stored when it is back"))
        self._store_retry_at = now + self._store_delay
        self._store_delay = min(self._store_delay * 2, STORE_RETRY_MAX_S)
        if op == "end":
            self._closing.end_sent = False
        self._advance(now)

    # -- inputs: the model ---------------------------------------------------------------------------
    def stream_opened(self, stream_id: int, now: float) -> None:
        """The stream is open and its setup (system prompt, history, audio block) sent."""
        self._now = now
        s = self._next
        if s is None or s.id != stream_id or self._closing is not None:
            return
        s.opened = True
        s.opened_at = now
        if self.state is State.OPENING and s.prompt is not self._prompt:  # configured while it opened
            self._retire(s)
            self._prepare(now)
        elif self.state is State.OPENING:
            self._next = None
            self._make_current(s, now)
            self._ready(now)
        elif self.state is State.RECOVERING:
            if not self._fresh(s):  # the conversation moved on while it opened
                self._retire(s)
                self._next = None
                self._reopen_at = now
            else:
                self._next = None
                self._make_current(s, now)
                self._hear_again(s, now)
                self.state = State.LIVE
                self._send(m.Status("listening"))
                self._emit(Count("recoveries", self._failure_kind))
                self._log("info", "model stream recovered", kind=self._failure_kind)
        self._advance(now)

    def stream_failed(self, stream_id: int, kind: str, message: str, now: float) -> None:
        """A stream failed to open, or failed while open."""
        self._now = now
        failure = self._history_refused(classify(kind, message), message)
        if self._next is not None and self._next.id == stream_id:
            s, self._next = self._next, None
            self._emit(CloseStream(s.id))
            if self.state is State.OPENING and failure is Failure.HISTORY_TOO_LARGE:
                self._prepare(now)  # the same conversation, in less history
            elif self.state is State.OPENING:
                self._emit(Count("model_errors", kind))
                self._log("error", "model stream failed to open", kind=kind, error=message)
                self._fatal_model(failure, message, now)
            elif self.state is State.HANDING_OVER:
                self._log("warning", "rotation: next stream failed to open", kind=kind, error=message)
                self.state = State.LIVE
                self._handover_retry_at = now + HANDOVER_RETRY_S
            elif self.state is State.RECOVERING:
                self._recover(failure, kind, message, now)
        elif self._current is not None and self._current.id == stream_id:
            self._recover(failure, kind, message, now)
        self._advance(now)

    def stream_ended(self, stream_id: int, now: float) -> None:
        """A stream's output ended without an error: for the current one, a failure like any other."""
        self.stream_failed(stream_id, "connectionError", "the model stream ended", now)

    def model_event(self, stream_id: int, event: dict | bytes, now: float) -> None:
        self._now = now
        cur = self._current
        if cur is None or cur.id != stream_id or self.state not in SERVING:
            return  # a retired or preparing stream: what it says is not part of the conversation
        try:
            ev = nova.parse_output_event(event)
        except nova.MalformedEvent as e:
            self.stream_failed(stream_id, "validationException", f"Invalid event bytes: {e}", now)
            return
        if not isinstance(ev, (nova.UserSpeechStart, nova.UserSpeechEnd)):  # hearing is not answering
            cur.heard = True
            self._deaf_at = None
        if isinstance(ev, nova.ToolUse):
            self._tool_use(cur, ev, now)
        elif isinstance(ev, (nova.UserSpeechStart, nova.UserSpeechEnd)):
            self._user_speech(ev, now)
        self._dialogue.model_event(ev)
        self._run_dialogue(now)
        self._advance(now)

    # -- inputs: tools ---------------------------------------------------------------------------------
    def tool_finished(self, call_id: str, ok: bool, content: str, now: float) -> None:
        """A tool ended (`content`: its result, or its error object, as a JSON text)."""
        self._now = now
        call = self._calls.get(call_id)
        if call is None:
            return  # already answered (timed out, or the session closed)
        if ok:
            ok, content = tool_calls.checked_result(content)
        self._answer(call, "finished" if ok else "failed", content, now)
        self._advance(now)

    # -- the handshake ---------------------------------------------------------------------------------
    def _on_start(self, start: m.SessionStart, now: float) -> None:
        self._start = start
        codecs = {start.input_codec, start.output_codec} - {"pcm16"}
        if codecs and (self.env.decoder is None or self.env.encoder is None):
            self._fail_client(CloseCode.PROTOCOL_ERROR, "codec not supported", m.Error(
                codes.UNSUPPORTED, f"this gateway speaks pcm16 only, not {', '.join(sorted(codecs))}", True))
            return
        self._input_rate = start.input_sample_rate
        if start.input_codec != "pcm16":
            self._decode, self._input_rate = self.env.decoder(start.input_codec)
        if start.output_codec != "pcm16":
            self._encode = self.env.encoder(start.output_codec, start.output_sample_rate)
        self._resample = self.env.resampler(self._input_rate)
        self._dialogue = Dialogue(new_id=lambda: self.env.new_id("item"), utc_now=self.env.utc_now,
                                  output_sample_rate=start.output_sample_rate)
        self._prompt = Prompt(self.cfg.system_prompt, start.voice or self.cfg.voice, self.cfg.endpointing_sensitivity,
                              self.cfg.tools)
        # a codec's audio goes out in its frames (20 ms); PCM16 in 80 ms frames, the size of the model's own
        # events (40 ms frames cost 11 % more CPU per session at 20 sessions: twice the writes and wake-ups)
        self._pacer = PlaybackPacer(start.output_sample_rate, lead_ms=self.cfg.playback_lead_ms,
                                    chunk_ms=20 if self._encode else 80, whole_frames=self._encode is not None)
        token = self._bearer or start.auth
        if token is not None:
            self._emit(Authenticate(token))
        elif self.cfg.auth_required:
            self._fail_client(CloseCode.UNAUTHORIZED, "credentials required")
        else:
            self._admit(None)

    def authenticated(self, principal: str | None, now: float) -> None:
        """The bearer token's verification: the principal (`user:<id>`), or None if it is invalid."""
        self._now = now
        if self.state is not State.HANDSHAKE or self._start is None or not self._client_open:
            return
        if principal is None:
            self._fail_client(CloseCode.UNAUTHORIZED, "invalid credentials")
        else:
            self._admit(principal)
        self._advance(now)

    def _admit(self, principal: str | None) -> None:
        self._principal = principal
        self._admitting = True
        self._emit(Admit(principal))

    def admitted(self, refusal: tuple[int, str] | None, now: float) -> None:
        """The gateway's answer to `Admit`: None, or the close code and reason that refuse it."""
        self._now = now
        if not self._admitting or self.state is not State.HANDSHAKE or not self._client_open:
            return
        self._admitting = False
        if refusal is not None:
            self._fail_client(*refusal)
        elif self._budgeted:
            self._store_op = "budget"
            self._emit(CheckBudget(self._principal))
        else:
            self._begin(self._principal, now)
        self._advance(now)

    def budget_checked(self, spent_usd: float, now: float) -> None:
        """The gateway's answer to `CheckBudget`: what the user has spent in the budget's period."""
        self._now = now
        if self._store_op != "budget" or self.state is not State.HANDSHAKE or not self._client_open:
            return
        self._store_op = None
        if spent_usd >= self.cfg.user_budget_usd:
            self._emit(Count("budget_exceeded", "start"))
            self._log("info", "session refused: budget spent", spent_usd=round(spent_usd, 6))
            self._fail_client(CloseCode.BUDGET_EXCEEDED, "budget exceeded", m.Error(
                codes.BUDGET_EXCEEDED, "this user's budget for the period is spent", True))
        else:
            self._spent_before = spent_usd
            self._begin(self._principal, now)
        self._advance(now)

    @property
    def principal(self) -> str | None:
        """The authenticated user (`user:<id>`), once known; None for an anonymous client."""
        return self._principal

    @property
    def _budgeted(self) -> bool:
        return self.cfg.user_budget_usd > 0 and self._principal is not None

    def _begin(self, principal: str | None, now: float) -> None:
        start = self._start
        self.state = State.LOADING
        self._loaded_at = now
        self._asked = bool(start.resume or start.conversation_id)
        target = self._resume_target(start, principal)
        if target is None:
            self._create(now)
            return
        self._requested, self.owner = target
        self._store_op = "load"
        self._emit(LoadConversation(self._requested, self.owner, self.cfg.history.total_bytes))

    def _resume_target(self, start: m.SessionStart, principal: str | None) -> tuple[str, str] | None:
        """(conversation id, owner) the client may try to resume, or None. A missing, ended, expired or
        foreign conversation reads the same as none at all: a new one, `resume_failed: not_found`."""
        if start.resume:
            claim = self.env.credentials.read_resume_token(start.resume)
            if claim is None or not may_use(claim.owner, principal):
                return None
            self._claim = claim
            return claim.conversation_id, claim.owner
        if start.conversation_id and principal is not None:
            return start.conversation_id, principal
        return None

    def _create(self, now: float) -> None:
        self.owner = self._principal or "anon:" + self.env.new_id("anon")
        self._store_op = "create"
        self._emit(CreateConversation(self.owner))

    def _known(self, conversation_id: str, now: float) -> None:
        """The conversation is found or made: store the client's pending receipts, open the model."""
        self.conversation_id = conversation_id
        if not self._not_after:
            self._not_after = int(self.env.wall_time() + self.cfg.conversation_ttl_s)
        self._aliases = {conversation_id, self._requested} - {None}
        stored = {i.item_id for i in self.history}
        queued: set[str] = set()
        for token in self._start.pending:
            item = next((i for cid in self._aliases if (i := self.env.credentials.read_receipt(token, cid))), None)
            if item is None:
                self._before_ready.append(m.Error(codes.BAD_RECEIPT, "a pending receipt was not signed by this "
                                                  "service for this conversation; it was ignored"))
                continue
            if item.item_id in stored:  # it made it after all: the client may forget it
                self._before_ready.append(m.ItemSaved(item.item_id))
                continue
            if item.item_id in queued:
                continue
            queued.add(item.item_id)
            self.history.append(item)
            self._total += 1
            self._queue_write(item, now)
        if self._asked:
            self._emit(Count("resumes", "resumed" if self._resumed else "not_found"))
        if self._total >= self.cfg.max_items:
            self._fail_client(CloseCode.RATE_LIMITED, "conversation full", self._full())
            return
        self._emit(Observe("history_load_seconds", now - self._loaded_at))
        self._store_op = "hold"
        self._emit(HoldConversation(conversation_id))

    def _ready(self, now: float) -> None:
        start = self._start
        self._send(m.SessionReady(
            protocol=m.PROTOCOL_VERSION,
            session_id=self.session_id,
            conversation_id=self.conversation_id,
            resume_token=self._resume_token(self.conversation_id),
            resumed=self._resumed,
            history=[i.to_dict() for i in self.history[-HISTORY_TO_CLIENT:]],
            history_length=self._total,
            input_sample_rate=start.input_sample_rate,
            output_sample_rate=start.output_sample_rate,
            voice=self._prompt.voice,
            engine=self.cfg.engine,
            input_codec=start.input_codec,
            output_codec=start.output_codec,
            resume_failed="not_found" if self._asked and not self._resumed else None,
        ))
        for msg in self._before_ready:
            self._send(msg)
        self._before_ready.clear()
        self._send(m.Status("listening"))
        self.state = State.LIVE
        self._log("info", "session ready", conversation_id=self.conversation_id, resumed=self._resumed,
                  history_items=self._total)
        while self._pre_ready_audio:  # said between session.start and session.ready
            self._to_model(self._current, self._pre_ready_audio.popleft(), now, "client")
        self._pre_ready_bytes = 0
        self._keepalive_at = now + KEEPALIVE_AFTER_S

    # -- client messages -----------------------------------------------------------------------------
    def _on_message(self, msg: m.ClientMessage, now: float) -> None:
        live = self.state in READY
        match msg:
            case m.Ping(id=ping_id):
                if self._pings.take(now):  # past the rate, pings go unanswered
                    self._send(m.Pong(ping_id, self.env.wall_time()))
            case m.SessionStart():
                self._reply_error(codes.INVALID_FIELD, "session.start was already received")
            case _ if self.state is State.CLOSING:
                pass
            case _ if not live:
                self._reply_error(codes.NOT_READY, f"'{msg.type}' before session.ready")
            case m.InputText() if not self.cfg.text_input:
                self._reply_error(codes.UNSUPPORTED, "this model does not take typed text (Nova Sonic v1); speak "
                                  f"instead, or use {nova.DEFAULT_MODEL_ID}")
            case m.InputText() if not self._typed_turns.take(now):
                self._typed_refused += 1
                if self._typed_refused >= TYPED_REFUSALS_TO_CLOSE:
                    self._fail_client(CloseCode.RATE_LIMITED, "typed turns too fast")
                else:
                    self._reply_error(codes.RATE_LIMITED, f"typed turns are limited to {TYPED_TURNS[0]:g} per second "
                                      f"(bursts of {TYPED_TURNS[1]}); this one was not sent")
            case m.InputText(text=t):
                self._typed_refused = 0
                self._speech_end = self._reply_item = None  # what comes next answers the typed turn
                self._typing = True
                self._dialogue.input_text(t, playing=self._pacer.playing(now), item_id=msg.item_id)
                self._run_dialogue(now)
                self._typing = False
            case m.PlaybackTruncate(item_id=item_id, played_ms=ms):
                self._dialogue.playback_truncate(item_id, ms)
                self._truncates.pop(item_id, None)
                self._run_dialogue(now)
            case m.SessionEnd():
                self._begin_closing(now, CloseCode.NORMAL, "session ended", CLOSE_FLUSH_S, end_conversation=True)

    # -- user audio ----------------------------------------------------------------------------------
    def _hear(self, pcm: bytes, now: float) -> None:
        """Voice activity and the replay buffer: what a new stream would have to hear again."""
        self._replay.add(now, pcm)
        if not self._vad.feed(pcm):
            return
        self._last_active = now
        if now - self._last_voiced > UTTERANCE_GAP_S:
            self._utterance_start = now - len(pcm) / MODEL_BYTES_PER_S
            if self._unheard_since is None:
                self._unheard_since = self._utterance_start
        self._last_voiced = now
        if self._said is None and not self._model_speech and self.state in READY:
            self._speech_started("gateway", now)
        cur = self._current
        if (cur is not None and not cur.heard and self._deaf_utterance != self._utterance_start
                and self.state in SERVING):
            self._deaf_at = now + self.cfg.deaf_after_s  # counted from the end of speech

    def _speaking(self, now: float) -> bool:
        return now - self._last_voiced < QUIET_AFTER_S

    # The client is told each utterance once: input.speech_started, then input.speech_stopped. Its
    # source is fixed when it starts: the model once any stream of this session has sent a
    # userSpeechStart (Nova 2; every stream of a session runs the same model), until then the
    # gateway's own VAD, which ends an utterance after QUIET_AFTER_S without a voiced frame (or when
    # the reply's audio starts after a pause). An utterance the model started that its stream can no
    # longer end (the stream was replaced) is ended by the VAD, and one it never ends (no
    # userSpeechEnd) UNHEARD_GIVE_UP_S after its last voiced frame.
    def _user_speech(self, ev: nova.UserSpeechStart | nova.UserSpeechEnd, now: float) -> None:
        """Nova 2's voice activity. Its start is also the earliest barge-in signal: while the assistant
        speaks or the client plays, playback is flushed now, not at the interrupted marker."""
        if isinstance(ev, nova.UserSpeechStart):
            self._model_speech = True
            if self._said is None:
                self._speech_started("model", now)
            self._dialogue.barge_in(playing=self._pacer.playing(now))
        elif self._said == "model":
            self._speech_stopped(now)

    def _speech_started(self, source: str, now: float) -> None:
        self._said, self._said_at = source, now
        self._speech_end = self._reply_item = None  # the user speaks again: no reply is awaited
        self._said_item = self._dialogue.upcoming_user_item()
        self._send(m.InputSpeechStarted(source, self._said_item))

    def _speech_stopped(self, end: float) -> None:
        self._send(m.InputSpeechStopped(self._said, self._said_item))
        self._said = None
        self._speech_end, self._reply_item = end, None

    def _reply_started(self, item_id: str, now: float) -> None:
        """An assistant turn's audio begins: its first frame ends the wait the latency metric measures."""
        if self._said == "gateway" and now - self._last_voiced >= UTTERANCE_GAP_S:
            self._speech_stopped(self._last_voiced)  # the model answers: the utterance is over
        if self._speech_end is not None:
            self._reply_item = item_id

    def _to_model(self, stream: _Stream, pcm: bytes, now: float, source: str) -> None:
        self._last_model_audio = now
        if source != "client":
            self._release_held(stream)
        elif stream.held or len(pcm) < MODEL_EVENT_BYTES:
            if not stream.held:
                stream.held_since = now
            stream.held += pcm
            if len(stream.held) < MODEL_EVENT_BYTES:
                return
            pcm = self._take_held(stream)
        self._send_pcm(stream, pcm, source)

    def _release_held(self, stream: _Stream | None) -> None:
        """Send the client audio a stream holds: when it has waited MODEL_HOLD_S, before anything else
        goes to the stream, and before the stream closes."""
        if stream is not None and stream.held:
            self._send_pcm(stream, self._take_held(stream), "client")

    @staticmethod
    def _take_held(stream: _Stream) -> bytes:
        pcm = bytes(stream.held)
        stream.held.clear()
        stream.held_since = None
        return pcm

    def _send_pcm(self, stream: _Stream, pcm: bytes, source: str) -> None:
        setup = stream.setup
        for i in range(0, len(pcm), MODEL_FRAME):
            piece = pcm[i : i + MODEL_FRAME]
            self._emit(SendToStream(stream.id, [setup.audio(piece)], len(piece), source))

    def _keepalive(self, now: float) -> None:
        """Silence while the client sends none, so the model's input gap (532, 55 s) and idle timeout
        (531) never fire. A keepalive handled late means the loop lagged and the client's audio may be
        waiting unread: that is not the client's silence, so it waits another moment, but never
        leaves the model without audio for longer than KEEPALIVE_DEFER_MAX_S."""
        if now - self._keepalive_at > LAG_TOLERANCE_S and now - self._last_model_audio < KEEPALIVE_DEFER_MAX_S:
            self._keepalive_at = now + LAG_TOLERANCE_S
            return
        gap = min(now - self._last_model_audio, 2 * KEEPALIVE_EVERY_S)
        silence = bytes(int(gap * MODEL_BYTES_PER_S) // 2 * 2)
        if silence:
            self._hear(silence, now)
            self._to_model(self._current, silence, now, "keepalive")
        self._keepalive_at = now + KEEPALIVE_EVERY_S

    # -- the dialogue's actions ------------------------------------------------------------------------
    def _run_dialogue(self, now: float) -> None:
        d, pacer = self._dialogue, self._pacer
        while actions := d.actions():
            for a in actions:
                match a:
                    case AudioToClient(item_id=item_id, pcm=pcm):
                        pacer.push_audio(item_id, pcm)
                    case SendToClient(message=msg, paced=True):
                        pacer.push_message(msg)
                    case SendToClient(message=m.Usage() as msg):
                        self._send(msg)
                        self._account(now)
                    case SendToClient(message=msg):
                        self._send(msg)
                    case StartAudioItem(item_id=item_id):
                        pacer.start_item(item_id, m.ResponseAudioStart(item_id))
                        self._reply_started(item_id, now)
                    case EndAudioItem(item_id=item_id, reason=reason):
                        pacer.end_item(item_id, m.ResponseAudioEnd(item_id, reason))
                    case FlushPlayback():
                        r = pacer.flush(now)
                        self._flush_estimate = r.played_ms
                        d.playback_flushed(r.current, r.played_ms, r.open_items, r.unheard)
                    case AwaitTruncate(item_id=item_id):
                        self._truncates[item_id] = (now + self.cfg.truncate_wait_ms / 1000, self._flush_estimate)
                    case ItemFinal(item=item):
                        self._item_final(item, now)
                    case SendTextTurn(text=text):
                        if self._current is not None and self.state in SERVING:
                            self._release_held(self._current)
                            self._emit(SendToStream(self._current.id, self._current.setup.text_turn(text)))
                        # else: no stream now; the one being opened is asked it again (`owed`)

    def _item_final(self, item: Item, now: float) -> None:
        receipt = self.env.credentials.receipt(self.conversation_id, item)
        self._send(m.Transcript(item.item_id, item.role, item.text, True, receipt))
        self._keep(item, now)
        if item.role == "user":
            self._ladder.turn_completed()
            if not self._typing:  # the model transcribed speech: what is unheard now is a later utterance
                voice_now = now - self._last_voiced < UTTERANCE_GAP_S
                self._unheard_since = self._utterance_start if voice_now else None

    def _keep(self, item: Item, now: float) -> None:
        """A final item joins the history and the store's queue."""
        self.history.append(item)
        self._total += 1
        self._queue_write(item, now)
        if self._total >= self.cfg.max_items and self._closing is None:
            self._send(self._full())
            self._begin_closing(now, CloseCode.RATE_LIMITED, "conversation full", CLOSE_FLUSH_S)

    def _release(self, now: float) -> None:
        """Assistant audio and the messages ordered with it, as playback allows; items played out."""
        pacer = self._pacer
        if pacer is None or pacer.idle:
            return
        for out in pacer.poll(now):
            if isinstance(out, Audio):
                if self._client_open:
                    self._emit(SendAudio(out.pcm if self._encode is None else self._encode(out.pcm)))
                if out.item_id == self._reply_item:  # the reply's first audio
                    self._emit(Observe("speech_end_to_audio_seconds", now - self._speech_end))
                    self._speech_end = self._reply_item = None
            else:
                self._send(out)
        done = pacer.played_out(now)
        if done:
            for item_id in done:
                self._dialogue.played_out(item_id)
            self._run_dialogue(now)

    # -- tools ------------------------------------------------------------------------------------------
    def _tool_use(self, stream: _Stream, ev: nova.ToolUse, now: float) -> None:
        """The model asks for a tool: run it beside the conversation (audio keeps flowing), or answer at
        once when it cannot run. Every toolUse is answered exactly once."""
        call = _ToolCall(self.env.new_id("call"), ev.tool_use_id, ev.tool_name, {}, stream.id, now,
                         now + self.cfg.tool_timeout_s)
        if self._dialogue.unanswered is not None:
            self._tool_turn = self._dialogue.unanswered  # its answer comes from the tool: never ask it again
        self._calls[call.call_id] = call
        self._emit(Count("tool_calls", "started"))
        if ev.tool_name not in self._tool_names:
            self._answer(call, "failed", tool_calls.error_result(
                "unknown_tool", f"there is no tool named {ev.tool_name!r}"), now)
            return
        try:
            call.arguments = tool_calls.parse_arguments(ev.content)
        except ValueError as e:
            self._answer(call, "failed", tool_calls.error_result("invalid_arguments", str(e)), now)
            return
        public = call.name in self.cfg.public_tools
        self._send(m.ToolCall(call.call_id, call.name, "started", arguments=call.arguments if public else None))
        self._log("info", "tool call started", call_id=call.call_id, tool=call.name)
        self._emit(RunTool(call.call_id, call.name, call.arguments))

    def _answer(self, call: _ToolCall, status: str, content: str, now: float) -> None:
        """The one answer to a call: to the stream that asked if it is still current (a TOOL block),
        else to the current one as a user turn once the model is idle; kept in the history as an item."""
        del self._calls[call.call_id]
        duration_ms = max(0, round((now - call.started_at) * 1000))
        item = Item(self.env.new_id("item"), "tool", tool_calls.record(
            call_id=call.call_id, name=call.name, arguments=call.arguments, status=status, result=content,
            duration_ms=duration_ms), self.env.utc_now())
        public = call.name in self.cfg.public_tools
        self._send(m.ToolCall(call.call_id, call.name, status, duration_ms, item.item_id,
                              self.env.credentials.receipt(self.conversation_id, item),
                              call.arguments if public else None,
                              tool_calls.read_record(item)["result"] if public else None))
        self._emit(Count("tool_calls", status))
        self._emit(Observe("tool_call_seconds", now - call.started_at))
        self._log("info" if status == "finished" else "warning", "tool call ended", call_id=call.call_id,
                  tool=call.name, status=status, duration_ms=duration_ms)
        self._keep(item, now)
        cur = self._current
        if cur is not None and cur.id == call.stream_id and self.state in SERVING:
            self._release_held(cur)
            self._emit(SendToStream(cur.id, cur.setup.tool_result(call.tool_use_id, content)))
        elif self._closing is None and self.cfg.text_input:
            self._late.append((call.name, content))  # the history of the next stream has it too

    def _tool_deadlines(self, now: float) -> None:
        for call in [c for c in self._calls.values() if now >= c.deadline]:
            self._emit(CancelTool(call.call_id))
            self._answer(call, "timed_out", tool_calls.error_result(
                "timeout", f"the tool did not answer within {self.cfg.tool_timeout_s:g} s"), now)

    def _tell_late_results(self, now: float) -> None:
        """Results whose stream was replaced reach the current one as a user turn, when nobody speaks."""
        cur = self._current
        if (not self._late or self.state is not State.LIVE or cur is None or self._dialogue.answering
                or self._speaking(now)):
            return
        self._release_held(cur)
        while self._late:
            name, content = self._late.popleft()
            self._emit(SendToStream(cur.id, cur.setup.text_turn(tool_calls.late_result_text(name, content))))

    # -- time-driven decisions -------------------------------------------------------------------------
    def _advance(self, now: float) -> None:
        """Everything that may have become due, in one place (runs after every input)."""
        if self.state is State.CLOSED:
            return
        if self._said == "model" and now >= (t := max(self._last_voiced, self._said_at)) + UNHEARD_GIVE_UP_S:
            self._said = "gateway"  # the model never ended it (no userSpeechEnd): the gateway does
            self._speech_stopped(t)
        if self._said == "gateway" and now - self._last_voiced >= QUIET_AFTER_S:
            self._speech_stopped(self._last_voiced)
        if self._dialogue is not None:
            if self._truncates:
                for item_id, (deadline, estimate) in list(self._truncates.items()):
                    if now >= deadline:
                        del self._truncates[item_id]
                        self._dialogue.truncate_timeout(item_id, estimate)
                        self._run_dialogue(now)
            self._release(now)
        if self._calls:
            self._tool_deadlines(now)
        if self._late:
            self._tell_late_results(now)
        if self._draining is not None and self._closing is None and self.state is not State.CLOSED:
            self._send_away(now)
        if self._unheard_since is not None and now - self._last_voiced >= UNHEARD_GIVE_UP_S:
            self._unheard_since = None  # never transcribed: it was not speech
        if self.state in READY and now >= self._last_active + self.cfg.idle_timeout_s:
            self._send(m.Error(codes.IDLE_TIMEOUT, f"nothing from the client for {self.cfg.idle_timeout_s:g} s; "
                               "reconnect with the resume token to go on", True))
            self._begin_closing(now, CloseCode.IDLE, "idle", CLOSE_FLUSH_S)
        if self.state in SERVING:
            if self._deaf_at is not None and now >= self._deaf_at:
                self._deaf(now)
            else:
                self._rotate(now)
        if self.state is State.RECOVERING and self._reopen_at is not None and now >= self._reopen_at:
            self._reopen_at = None
            self._prepare(now)
        if self._store_retry_at is not None and now >= self._store_retry_at:
            self._store_retry_at = None
        if self._writes or self._reloads or self._closing is not None:  # else the store has nothing to do
            self._pump_store(now)
        if self._closing is not None:
            self._check_closing(now)

    # -- model streams: open, hand over, recover ---------------------------------------------------------
    def _owed(self) -> Item | None:
        """The user turn the model owes an answer to, if a new stream can be asked it again (not if a
        tool was called for it: asked again, the model would call it again; the result is told instead)."""
        owed = self._dialogue.unanswered if self.cfg.text_input else None
        return None if owed is self._tool_turn else owed

    def _prepare(self, now: float) -> None:
        """Open a stream with the system prompt and the history as it is now."""
        owed, prompt = self._owed(), self._prompt
        self._stream_ids += 1
        setup = StreamSetup.build(
            system_prompt=prompt.system_prompt,
            history=self.history,
            voice=prompt.voice,
            output_sample_rate=self._start.output_sample_rate,
            endpointing_sensitivity=prompt.endpointing_sensitivity,
            drop_trailing_user=owed is not None,
            history_limits=self._history_limits,
            tools=prompt.tools,
            tool_choice=prompt.tool_choice,
        )
        self._next = _Stream(self._stream_ids, setup, len(self.history), owed, prompt, prepared_at=now)
        self._emit(OpenStream(self._next.id, setup.events))

    def _history_refused(self, failure: Failure, message: str) -> Failure:
        """A stream refused the history as too large: the model's limits were a wrong guess. Every
        later stream gets the conservative ones (40 KB, 1 KB per textInput) and the conversation goes
        on; if even those are refused, it is an invalid input like any other."""
        if failure is not Failure.HISTORY_TOO_LARGE:
            return failure
        if self._history_limits == CONSERVATIVE_HISTORY:
            return Failure.INVALID_INPUT
        self._log("warning", "the model refused the history as too large: conservative limits from now on",
                  error=message, total_bytes=self._history_limits.total_bytes)
        self._emit(Count("history_fallbacks"))
        self._history_limits = CONSERVATIVE_HISTORY
        return failure

    def _fresh(self, s: _Stream) -> bool:
        """The stream was opened with the history, owed turn and prompt as they are now."""
        return s.history_len == len(self.history) and s.owed is self._owed() and s.prompt is self._prompt

    def _make_current(self, s: _Stream, now: float) -> None:
        self._current = s
        s.current_since = now
        s.heard = False
        self._deaf_at = None
        if self._said == "model":
            self._said = "gateway"  # the stream that started the utterance will not end it: the VAD does

    def _quiet(self) -> bool:
        """Nobody speaks, nothing said is still untranscribed, no answer is due and every item is
        settled: a hand-over now loses nothing and needs no replay."""
        return (not self._speaking(self._now) and self._unheard_since is None and self._dialogue.idle
                and not self._calls and not self._late)

    def _rotate(self, now: float) -> None:
        """Rotation: from `rotate_after_s` of stream age, prepare the next stream at a quiet moment and
        switch to it if the moment lasted; from `rotate_force_after_s`, whatever is going on. A stream
        opened with a prompt the client has since changed is replaced the same way, at once."""
        cur = self._current
        age = now - cur.current_since
        if age < self.cfg.rotate_after_s and cur.prompt is self._prompt:
            return
        forced = age >= self.cfg.rotate_force_after_s
        nxt = self._next
        if nxt is None:
            if now >= self._handover_retry_at and (forced or self._quiet()):
                self.state = State.HANDING_OVER
                self._prepare(now)
            return
        if not nxt.opened:
            return
        if not self._fresh(nxt) or not (forced or self._quiet()):
            self._retire(nxt)  # the moment passed or the history moved on: try again later
            self._next = None
            self.state = State.LIVE
            self._handover_retry_at = now + (0.0 if forced else HANDOVER_RETRY_S)
            return
        old = cur
        self._next = None
        self._make_current(nxt, now)
        self._dialogue.stream_replaced()
        self._run_dialogue(now)
        self._hear_again(nxt, now)  # forced: the owed answer and the utterance under way
        self._retire(old)
        self.state = State.LIVE
        self._emit(Count("rotations", "forced" if forced else "configured" if old.prompt is not nxt.prompt else "quiet"))
        self._log("info", "model stream rotated", forced=forced, stream=nxt.id, history_items=nxt.history_len,
                  setup_ms=round((nxt.opened_at - nxt.prepared_at) * 1000, 2))

    def _hear_again(self, s: _Stream, now: float) -> None:
        """What a new current stream missed: the owed answer (asked again as a typed turn) and the
        user's speech that no stream has transcribed yet, from its start."""
        if s.owed is not None:
            self._emit(SendToStream(s.id, s.setup.text_turn(s.owed.text)))
        if self._unheard_since is not None:
            self._to_model(s, b"".join(self._replay.since(self._unheard_since - REPLAY_PREROLL_S)), now, "replay")
            if not self._speaking(now) and self._deaf_utterance != self._utterance_start:
                self._deaf_at = now + self.cfg.deaf_after_s  # it must answer what it was just told
        self._keepalive_at = now + KEEPALIVE_AFTER_S

    def _retire(self, s: _Stream | None) -> None:
        if s is not None:
            self._release_held(s)
            self._emit(CloseStream(s.id, s.setup.closing() if s.opened else []))

    def _deaf(self, now: float) -> None:
        """The current stream heard speech and said nothing: replace it, once per utterance."""
        self._deaf_at = None
        self._deaf_utterance = self._utterance_start
        self._emit(Count("deaf_streams"))
        self._log("warning", "model stream deaf: replacing it", stream=self._current.id)
        self._recover(Failure.DEAF, DEAF, "no event after user speech", now)

    def _recover(self, failure: Failure, kind: str, message: str, now: float) -> None:
        self._emit(Count("model_errors", kind))
        decision = self._ladder.on_failure(failure) if failure is not Failure.DEAF else None
        self._log("warning", "model stream failed", kind=kind, error=message,
                  decision=type(decision).__name__ if decision else "Replace")
        if isinstance(decision, GiveUp):
            self._emit(Count("recovery_failures", kind))
            self._fatal_model(failure, message, now)
            return
        cur, self._current = self._current, None
        if self._said == "model":
            self._said = "gateway"  # its stream is gone: the VAD ends the utterance
        if cur is not None:
            self._emit(CloseStream(cur.id, cur.setup.closing() if failure is Failure.DEAF else []))
        if self._next is not None:
            self._retire(self._next)
            self._next = None
        if self.state is not State.RECOVERING:
            self._dialogue.stream_replaced()
            self._run_dialogue(now)
            self._send(m.Status("recovering"))
        self.state = State.RECOVERING
        self._failure_kind = kind
        self._keepalive_at = None
        self._reopen_at = now + (decision.delay_s if decision else 0.0)

    def _fatal_model(self, failure: Failure, message: str, now: float) -> None:
        """The model cannot go on: say so, store what is final, close 1011."""
        self._log("error", "model unavailable", failure=failure.value, error=message)
        self._send(m.Error(codes.MODEL_UNAVAILABLE, failure_message(failure), True))
        if self.state is State.OPENING:
            self._fail_client(CloseCode.INTERNAL_ERROR, "model unavailable")
        else:
            self._begin_closing(now, CloseCode.INTERNAL_ERROR, "model unavailable", CLOSE_FLUSH_S)

    # -- usage and budget --------------------------------------------------------------------------------
    def _account(self, now: float) -> None:
        """Nova reported usage: count what it adds, and end the session once the user's budget is spent."""
        used = self._dialogue.usage
        added = used - self._usage_counted
        if not added:
            return
        self._usage_counted = used
        for kind, n in added.counts():
            if n:
                self._emit(Count("tokens", kind, n))
        self._emit(Count("cost_usd", "", self.cfg.prices.cost(added)))
        if not self._budgeted:
            return
        self._usage_unrecorded += added
        if now - self._usage_recorded_at >= USAGE_RECORD_EVERY_S:
            self._record_usage(now)
        if self._closing is None and self._spent_before + self.cfg.prices.cost(used) >= self.cfg.user_budget_usd:
            self._emit(Count("budget_exceeded", "live"))
            self._log("info", "session ended: budget spent")
            self._send(m.Error(codes.BUDGET_EXCEEDED, "this user's budget for the period is spent", True))
            self._begin_closing(now, CloseCode.BUDGET_EXCEEDED, "budget exceeded", CLOSE_FLUSH_S)

    def _record_usage(self, now: float) -> None:
        self._usage_recorded_at = now
        if self._usage_unrecorded and self._budgeted:
            self._emit(RecordUsage(self._principal, self.conversation_id or "", self._usage_unrecorded,
                                   self.cfg.prices.cost(self._usage_unrecorded)))
            self._usage_unrecorded = Tokens()

    # -- the store -------------------------------------------------------------------------------------
    def _queue_write(self, item: Item, now: float) -> None:
        """Writes wait here, in order, while the store is down. Past the bound the session ends (1013):
        the client still holds a receipt for every unsaved item and hands them back."""
        if self._gone and not (self._taken_over and item.role == "tool"):
            return
        if len(self._writes) >= STORE_QUEUE_ITEMS or self._writes_bytes + item.size > STORE_QUEUE_BYTES:
            if self._closing is None:
                self._send(m.Error(codes.STORE_DEGRADED, f"the history store has been unavailable for "
                                   f"{len(self._writes)} items; reconnect later with your resume token and receipts",
                                   True))
                self._begin_closing(now, CloseCode.TRY_AGAIN_LATER, "store backlog full", 0.0)
            return
        self._writes.append(item)
        self._writes_bytes += item.size
        self._count_backlog()

    def _count_backlog(self) -> None:
        if len(self._writes) != self._backlog and self.state is not State.CLOSED:
            self._emit(Count("store_backlog", "", len(self._writes) - self._backlog))
            self._backlog = len(self._writes)

    def _pump_store(self, now: float) -> None:
        if (self._store_op is not None or self._store_retry_at is not None or not self.conversation_id
                or self._epoch is None):  # writes wait until this connection holds the conversation
            return
        if self._writes:
            self._store_op = "write"
            self._emit(StoreItem(self.conversation_id, self._writes[0], self._epoch))
        elif self._reloads and now >= self._reloads[0] and self._closing is None:
            self._reloads.pop(0)
            self._store_op = "reload"
            self._emit(ReloadConversation(self.conversation_id, self.owner, self._history_limits.total_bytes))
        elif self._closing is not None and self._closing.end_conversation and not self._closing.end_sent:
            self._closing.end_sent = True
            self._store_op = "end"
            self._emit(EndConversation(self.conversation_id))

    def _moved(self, conversation_id: str) -> None:
        """The store continued the conversation under a new id: adopt it and tell the client."""
        if conversation_id == self.conversation_id:
            return
        self._log("info", "conversation moved by the store", old=self.conversation_id, new=conversation_id)
        self.conversation_id = conversation_id
        self._aliases.add(conversation_id)
        self._send(m.SessionUpdated(conversation_id, self._resume_token(conversation_id)))

    def _resume_token(self, conversation_id: str) -> str:
        return self.env.credentials.resume_token(conversation_id, self.owner, self._epoch or 0, self._not_after)

    # -- closing ---------------------------------------------------------------------------------------
    def _begin_closing(self, now: float, code: int, reason: str, flush_s: float, *,
                       end_conversation: bool = False) -> None:
        """Stop the model, settle every item (what was said but not heard to the end is kept, marked
        interrupted), then store what is final before the socket closes."""
        if self._closing is not None:
            return
        self._closing = _Closing(code, reason, now + flush_s, end_conversation)
        for s in (self._current, self._next):
            self._retire(s)
        self._current = self._next = None
        self._reopen_at = self._keepalive_at = self._deaf_at = None
        self._truncates.clear()
        if self._dialogue is not None:
            for item in self._dialogue.close():
                self._item_final(item, now)
        self.state = State.CLOSING

    def _check_closing(self, now: float) -> None:
        """Close once every write is stored (and, for session.end, the conversation ended: then
        `conversation_ended` closes), or when the flush deadline passes."""
        c = self._closing
        if self._calls and c.code != CloseCode.SERVICE_RESTART and not c.end_conversation:
            # the client left (or moved elsewhere): a running tool may finish, within its own deadline, and
            # its record is stored (a session resumed elsewhere reads it back)
            c.deadline = max(c.deadline, max(call.deadline for call in self._calls.values()) + CLOSE_FLUSH_S)
        busy = (bool(self._writes) or self._store_op is not None or (c.end_conversation and not c.end_sent)
                or bool(self._calls))
        if not busy:
            self._finish()
            return
        if now < c.deadline:
            return
        for call in list(self._calls.values()):
            self._emit(CancelTool(call.call_id))
            self._answer(call, "cancelled", tool_calls.error_result("cancelled", "the session closed"), now)
        if self._writes:  # the client still holds receipts for these and hands them back
            self._log("error", "store flush timed out", unsaved=len(self._writes))
        if c.end_conversation:
            self._send(m.Error(codes.STORE_DEGRADED, "the history store is unavailable: the conversation was not "
                               "ended; try again later", True))
            self._finish(CloseCode.TRY_AGAIN_LATER, "store unavailable")
        else:
            self._finish()

    def _finish(self, code: int | None = None, reason: str = "") -> None:
        c = self._closing
        if self._client_open:
            self._emit(CloseSocket(code if code is not None else c.code, reason or c.reason))
            self._client_open = False
        self._closed()

    def _closed(self) -> None:
        if self.state is not State.CLOSED:
            if self._backlog:  # what is left unsaved is the client's to hand back (receipts)
                self._emit(Count("store_backlog", "", -self._backlog))
                self._backlog = 0
            if self._usage_counted:
                self._record_usage(self._now)
                self._log("info", "session usage", conversation_id=self.conversation_id,
                          cost_usd=round(self.cfg.prices.cost(self._usage_counted), 6), **dict(self._usage_counted.counts()))
                self._emit(Observe("session_tokens", self._usage_counted.total))
                self._emit(Observe("session_cost_usd", self.cfg.prices.cost(self._usage_counted)))
        self.state = State.CLOSED
        self._store_retry_at = self._keepalive_at = self._reopen_at = self._deaf_at = None
        self._truncates.clear()

    def _fail_client(self, code: int, reason: str, message: Any = None) -> None:
        """Close at once (handshake and protocol failures): nothing is owed yet, or nothing can be."""
        if message is not None:
            self._send(message)
        if self._client_open:
            self._emit(CloseSocket(code, reason))
            self._client_open = False
        if self.state in PRE_READY:
            for s in (self._current, self._next):
                self._retire(s)
            self._current = self._next = None
            self._closed()
        elif self._closing is None:
            self._begin_closing(self._now, code, reason, CLOSE_FLUSH_S)

    # -- small helpers ----------------------------------------------------------------------------------
    def _accepting_client(self) -> bool:
        return self._client_open and self.state is not State.CLOSED

    def _send(self, message: Any) -> None:
        if self._client_open:
            self._emit(SendMessage(message))

    def _full(self) -> m.Error:
        return m.Error(codes.CONVERSATION_FULL, f"this conversation holds its maximum of {self.cfg.max_items} items; "
                       "start a new conversation", True)

    def _reply_error(self, code: str, message: str) -> None:
        """A non-fatal error in answer to the client's input; past a rate, not sent (what it owes a
        client that floods bad input stays bounded)."""
        if self._error_replies.take(self._now):
            self._send(m.Error(code, message))

    def _emit(self, effect: Effect) -> None:
        self._effects.append(effect)

    def _log(self, level: str, message: str, **fields: Any) -> None:
        self._emit(Log(level, message, {"session_id": self.session_id, **fields}))

