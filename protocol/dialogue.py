"""The dialogue: Nova output events and client playback in, conversation items and actions out.

It decides which item is speaking, what was heard, what to store and what to tell the client.
`protocol.session.Session` feeds it (`model_event`, `input_text`, `barge_in`,
`playback_truncate`, `playback_flushed`, `played_out`, `truncate_timeout`) and carries out the
actions it returns from `actions()`. Ids and timestamps come from the callables it is given.

Item mapping. A user item is one recognised utterance. An assistant item is one assistant turn,
which Nova speaks sentence by sentence: per sentence an ASSISTANT TEXT block SPECULATIVE (the plan),
an AUDIO block, later a TEXT block FINAL (what was spoken). The client gets `transcript final:false`
with the plan so far after each sentence's plan, `response.audio.start` before the turn's first
audio and `response.audio.end` after its last, and `transcript final:true` with a receipt once the
item is settled: played out, or cut by a barge-in and trimmed to what the client heard. FINAL texts
are matched to sentences in order (the k-th FINAL belongs to the k-th SPECULATIVE), as the AWS
session-continuation sample does. History therefore reads as a dialogue: user, assistant, user, …

Barge-in. The model's interrupted marker (a `{"interrupted": true}` text, or a block ending
INTERRUPTED), a typed turn, Nova 2's earlier `userSpeechStart` or a cancelled response (`barge_in`) while the
assistant speaks or plays flushes playback once per response; whichever comes first cuts, the others
find it cut.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any

from . import messages as m
from . import nova_events as nova
from .history import trim_to_played
from .items import Item
from .usage import Tokens


# -- actions -----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class SendToClient:
    message: Any
    paced: bool = False  # ordered with assistant audio (through the pacer) rather than at once


@dataclass(frozen=True, slots=True)
class StartAudioItem:
    item_id: str


@dataclass(frozen=True, slots=True)
class AudioToClient:
    item_id: str
    pcm: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class EndAudioItem:
    item_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class FlushPlayback:
    """Barge-in: drop queued audio now, then call `playback_flushed` with the pacer's result."""


@dataclass(frozen=True, slots=True)
class AwaitTruncate:
    """Call `truncate_timeout(item_id)` if the client has not sent playback.truncate in time."""

    item_id: str


@dataclass(frozen=True, slots=True)
class ItemFinal:
    """An item is final: send its final transcript with a receipt, store it, then item.saved."""

    item: Item


@dataclass(frozen=True, slots=True)
class SendTextTurn:
    """Give the model a typed user turn (built for whichever stream is current when it is sent)."""

    text: str


Action = SendToClient | StartAudioItem | AudioToClient | EndAudioItem | FlushPlayback | AwaitTruncate | ItemFinal | SendTextTurn


# -- items -------------------------------------------------------------------------------------
@dataclass(slots=True)
class _Sentence:
    planned: list[str] = field(default_factory=list)
    final: list[str] = field(default_factory=list)
    audio_bytes: int = 0
    has_audio: bool = False
    has_final: bool = False

    def text(self) -> str:
        """What was spoken: the FINAL text, or the plan when no FINAL came."""
        return ("".join(self.final) if self.has_final else "".join(self.planned)).strip()


@dataclass(slots=True)
class _Turn:
    item_id: str
    sentences: list[_Sentence] = field(default_factory=list)
    audio_started: bool = False
    audio_ended: bool = False
    played: bool = False          # the client played all of it
    cut: bool = False             # interrupted while the client was playing it
    played_ms: int | None = None  # known once the client (or the timeout) says
    unheard: bool = False         # the client heard none of it
    timed_out: bool = False       # stop waiting for late FINAL texts

    def plan(self) -> str:
        return " ".join(t for s in self.sentences if (t := "".join(s.planned).strip()))


class Dialogue:
    """One connection's items, independent of transports, sockets and clocks."""

    def __init__(self, *, new_id: Callable[[], str], utc_now: Callable[[], str], output_sample_rate: int = 24000):
        self._new_id = new_id
        self._utc_now = utc_now
        self.output_bytes_per_ms = output_sample_rate * 2 / 1000
        self._actions: list[Action] = []
        self._blocks: dict[str, tuple[str, str, str | None]] = {}  # content_id -> (type, role, stage)
        self._user_text: list[str] = []
        self._turn: _Turn | None = None                   # the assistant turn being generated
        self._turns: dict[str, _Turn] = {}                # not yet settled
        self._awaiting_final: deque[tuple[_Turn, _Sentence]] = deque()
        self._targets: dict[str, tuple[str, _Turn, _Sentence]] = {}  # content_id -> (kind, turn, sentence)
        self._barged = False
        self._speaking = False
        self._thinking: Item | None = None  # a user turn the model has not started answering
        self._next_user_id: str | None = None  # told with input.speech_started, before the item exists
        self._superseded = False  # the gateway cut the model's answer: what it still says of it is dropped
        self._ignored: set[str] = set()  # content ids of that answer
        self.usage = Tokens()         # tokens of the whole session: Nova's counts restart with each stream
        self._usage_before = Tokens()  # ... of the streams before the current one

    def actions(self) -> list[Action]:
        out, self._actions = self._actions, []
        return out

    def _emit(self, *actions: Action) -> None:
        self._actions.extend(actions)

    # -- client input ---------------------------------------------------------------------------
    def input_text(self, text: str, *, playing: bool = False, item_id: str | None = None) -> None:
        """A typed turn: the gateway knows the text, so it makes the user item itself (with `item_id`
        if the client named it). It interrupts the assistant while the model speaks or the client
        still plays what it said (`playing`)."""
        if self._speaking or playing:
            self._superseded = self._speaking  # the model is still answering: it has not heard the cut yet
            self._barge_in()
        self._user_item(text, item_id or self._new_id())  # the id told for an utterance stays the utterance's
        self._emit(SendTextTurn(text))

    def barge_in(self, *, playing: bool = False) -> None:
        """The model heard the user start speaking (Nova 2's userSpeechStart), or the client cancelled
        the response: a barge-in at once while the model speaks or the client still plays what it said
        (`playing`), without waiting for the interrupted marker. What the model still says of that
        answer, the marker included, is dropped as after a typed turn, so the cut is flushed and told
        (`interrupted`) once. Speech that interrupts nothing changes nothing here."""
        if self._speaking or playing:
            self._superseded = self._speaking
            self._barge_in()

    def playback_truncate(self, item_id: str, played_ms: int) -> None:
        t = self._turns.get(item_id)
        if t is None or not t.cut or t.played_ms is not None:
            return  # unknown, already settled, or not interrupted: nothing to trim
        t.played_ms = played_ms
        self._settle(t)

    def truncate_timeout(self, item_id: str, estimate_ms: int) -> None:
        t = self._turns.get(item_id)
        if t is not None:
            t.timed_out = True
            if t.played_ms is None:
                t.played_ms = estimate_ms
            self._settle(t)

    def playback_flushed(self, current: str | None, played_ms: int, open_items: tuple[str, ...],
                         unheard: tuple[str, ...]) -> None:
        """The pacer dropped queued audio: tell the client, and decide what each item keeps."""
        target = current or (unheard[0] if unheard else None)
        if target is not None:
            self._emit(SendToClient(m.Interrupted(target)))
        for item_id in open_items:
            self._emit(SendToClient(m.ResponseAudioEnd(item_id, "interrupted")))
        self._close_turn()
        if current is not None and (t := self._turns.get(current)):
            t.cut = True
            self._emit(AwaitTruncate(current))
        for item_id in unheard:
            if t := self._turns.get(item_id):
                t.unheard = True
                self._settle(t)
        self._speaking = False
        self._emit(SendToClient(m.Status("listening")))

    def played_out(self, item_id: str) -> None:
        t = self._turns.get(item_id)
        if t is not None and not t.cut:
            t.played = True
            self._settle(t)

    # -- model output ---------------------------------------------------------------------------
    def model_event(self, ev: nova.OutputEvent) -> None:
        if (self._superseded or self._ignored) and self._drop_superseded(ev):
            return
        match ev:
            case nova.ContentStart(content_id=cid, type=kind, role=role, stage=stage):
                self._blocks[cid] = (kind, role, stage)
                if role == "ASSISTANT" and kind == "TEXT":
                    self._assistant_text_start(cid, stage)
                elif role == "ASSISTANT" and kind == "AUDIO":
                    self._audio_start(cid)
                elif role == "USER" and kind == "TEXT":
                    self._user_text = []
            case nova.TextOutput(interrupted=True):
                self._barge_in()
            case nova.TextOutput(content_id=cid, content=text):
                target = self._targets.get(cid)
                if target is None:
                    if self._blocks.get(cid, ("", "", None))[1] == "USER":
                        self._user_text.append(text)
                elif target[0] == "plan":
                    target[2].planned.append(text)
                elif target[0] == "final":
                    target[2].final.append(text)
            case nova.AudioOutput(content_id=cid, pcm=pcm):
                target = self._targets.get(cid)
                if target is not None and not (target[1].cut or target[1].unheard):
                    target[2].audio_bytes += len(pcm)
                    self._emit(AudioToClient(target[1].item_id, pcm))
            case nova.ContentEnd(content_id=cid, stop_reason=reason):
                self._content_end(cid, reason)
            case nova.ToolUse():
                self._close_turn()  # what it says once the tool has answered is the next item
            case nova.UsageEvent(tokens=tokens):
                self.usage = self._usage_before + tokens
                self._emit(SendToClient(m.Usage(self.usage.input, self.usage.output)))
            case _:
                pass

    def _drop_superseded(self, ev: nova.OutputEvent) -> bool:
        """After a typed turn cut the answer under way, the model goes on with it until it reads the
        turn, then marks the cut (an INTERRUPTED block, or the interrupted signal). What it says of
        the old answer meanwhile, the marker included, is not part of any item. The cut is over at the
        marker, at the old answer's END_TURN, or when the model speaks of the user's turn."""
        match ev:
            case nova.ContentStart(content_id=cid, role="ASSISTANT") if self._superseded:
                self._ignored.add(cid)
                return True
            case nova.ContentStart(role="USER"):
                self._superseded = False
                return False
            case nova.TextOutput(interrupted=True) if self._superseded:
                self._superseded = False
                self._abandon_finals()
                return True
            case nova.TextOutput(content_id=cid) | nova.AudioOutput(content_id=cid) if cid in self._ignored:
                return True
            case nova.ContentEnd(content_id=cid, stop_reason=reason) if cid in self._ignored:
                self._ignored.discard(cid)
                if reason in ("INTERRUPTED", "END_TURN") and self._superseded:
                    self._superseded = False
                    self._abandon_finals()
                return True
        return False

    @property
    def idle(self) -> bool:
        """Nobody is speaking, no answer is due and every assistant item is settled (so the history a
        new stream opens with has the last answer in it): a stream can be swapped unnoticed."""
        return self._turn is None and not self._speaking and self._thinking is None and not self._turns

    @property
    def answering(self) -> bool:
        """The model is speaking, or in the middle of a turn (it may still add to it)."""
        return self._turn is not None or self._speaking

    @property
    def unanswered(self) -> Item | None:
        """The user's last turn, if the model has not finished answering it (a stream that fails
        mid-answer leaves it owed)."""
        return self._thinking

    def stream_replaced(self) -> None:
        """The model stream was replaced: nothing more will come from the old one. The turn it was
        speaking ends here (what was already sent keeps playing), and FINAL texts it still owed are
        not waited for (the plan stands in for them)."""
        self._close_turn()
        self._usage_before = self.usage
        for t in self._turns.values():
            t.timed_out = True
        self._awaiting_final.clear()
        self._blocks.clear()
        self._targets.clear()
        self._user_text = []
        self._barged = False
        self._speaking = False  # the old stream says nothing more (a turn may have paused at a tool call)
        self._superseded = False
        self._ignored.clear()
        for t in list(self._turns.values()):
            self._settle(t)

    def _open_turn(self) -> _Turn:
        if self._turn is None:
            self._turn = _Turn(self._new_id())
            self._turns[self._turn.item_id] = self._turn
            self._barged = False  # a new response: a later barge-in concerns it
        return self._turn

    def _assistant_text_start(self, cid: str, stage: str | None) -> None:
        if stage == "FINAL":  # matched to its sentence at its end, once its stop reason is known
            self._targets[cid] = ("final", None, _Sentence())
        else:
            turn, sentence = self._open_turn(), _Sentence()
            turn.sentences.append(sentence)
            self._awaiting_final.append((turn, sentence))
            self._targets[cid] = ("plan", turn, sentence)

    def _audio_start(self, cid: str) -> None:
        turn = self._open_turn()
        sentence = next((s for s in turn.sentences if not s.has_audio), None)
        if sentence is None:  # audio without a plan
            sentence = _Sentence()
            turn.sentences.append(sentence)
            self._awaiting_final.append((turn, sentence))
        sentence.has_audio = True
        self._targets[cid] = ("audio", turn, sentence)
        if not turn.audio_started:
            turn.audio_started = True
            self._emit(StartAudioItem(turn.item_id))
        if not self._speaking:
            self._speaking = True
            self._emit(SendToClient(m.Status("speaking"), paced=True))

    def _content_end(self, cid: str, reason: str) -> None:
        kind, role, _ = self._blocks.pop(cid, ("", "", None))
        target = self._targets.pop(cid, None)
        if reason == "INTERRUPTED":
            self._barge_in()
        if role == "USER" and kind == "TEXT":
            text = "".join(self._user_text).strip()
            self._user_text = []
            if text:
                self._close_turn()
                self._user_item(text)
            return
        if target is None:
            return
        what, turn, sentence = target
        if what == "plan":
            if not (turn.cut or turn.unheard):
                self._emit(SendToClient(m.Transcript(turn.item_id, "assistant", turn.plan(), False), paced=True))
        elif what == "audio":
            if reason == "END_TURN" and turn is self._turn:
                self._thinking = None
                self._close_turn(reason="end_turn")
                self._emit(SendToClient(m.Status("listening"), paced=True))
                self._speaking = False
        elif what == "final":
            if reason == "INTERRUPTED":  # the cut marker: no sentence's text, and none will follow it
                self._abandon_finals()
                return
            text = sentence.final
            if self._awaiting_final:
                turn, sentence = self._awaiting_final.popleft()
            else:  # a FINAL without a plan
                turn, sentence = self._open_turn(), _Sentence()
                turn.sentences.append(sentence)
            sentence.final = text
            sentence.has_final = True
            if reason == "END_TURN" and turn is self._turn and not turn.audio_started:
                self._thinking = None
                self._close_turn()  # a turn without audio ends with its text
            self._settle(turn)

    def _abandon_finals(self) -> None:
        """The model has cut its answer: the FINAL texts it owed for it will not come. Its items settle
        on what was planned (trimmed to what the client heard)."""
        turns = {id(t): t for t, _ in self._awaiting_final}
        self._awaiting_final.clear()
        for t in turns.values():
            t.timed_out = True
            self._settle(t)

    def _close_turn(self, reason: str = "partial_turn") -> None:
        """No more sentences for the turn being generated."""
        turn, self._turn = self._turn, None
        if turn is None or turn.audio_ended:
            return
        turn.audio_ended = True
        if turn.audio_started and not (turn.cut or turn.unheard):
            self._emit(EndAudioItem(turn.item_id, reason))
        # sentences that never got audio will never get a FINAL either
        for pair in [p for p in self._awaiting_final if p[0] is turn and not p[1].has_audio]:
            self._awaiting_final.remove(pair)
            turn.sentences.remove(pair[1])
        self._settle(turn)

    def _barge_in(self) -> None:
        if self._barged:
            return
        self._barged = True
        self._thinking = None  # the user took the floor: the answer is no longer owed
        self._emit(FlushPlayback())

    def upcoming_user_item(self) -> str:
        """The id the next user item will have: an utterance is told before it is recognised."""
        if self._next_user_id is None:
            self._next_user_id = self._new_id()
        return self._next_user_id

    def _user_item(self, text: str, item_id: str | None = None) -> None:
        if item_id is None:
            item_id, self._next_user_id = self.upcoming_user_item(), None
        item = Item(item_id, "user", text, self._utc_now())
        self._thinking = item
        self._final(item)
        self._emit(SendToClient(m.Status("thinking")))

    # -- settling ---------------------------------------------------------------------------------
    def _settle(self, t: _Turn) -> None:
        if t.item_id not in self._turns:
            return
        if t.unheard:
            self._drop(t)
            return
        if t is self._turn or not t.audio_ended:
            return  # more sentences may come
        spoken = [s for s in t.sentences if s.has_audio] if t.audio_started else t.sentences
        finals_in = all(s.has_final for s in spoken) or t.timed_out
        if t.cut:
            if t.played_ms is None or not finals_in:
                return
            text = self._heard(spoken, t.played_ms)
        else:
            if not finals_in or (t.audio_started and not t.played):
                return
            text = " ".join(x for s in spoken if (x := s.text()))
        self._drop(t)
        if text:
            self._final(Item(t.item_id, "assistant", text, self._utc_now(), t.cut))

    def _heard(self, spoken: list[_Sentence], played_ms: int) -> str:
        """The text of what played: whole sentences, then the heard share of the cut one."""
        parts, left = [], played_ms
        for s in spoken:
            ms = int(s.audio_bytes / self.output_bytes_per_ms)
            if left >= ms:
                parts.append(s.text())
                left -= ms
                continue
            parts.append(trim_to_played(s.text(), left, ms))
            break
        return " ".join(p for p in parts if p)

    def _drop(self, t: _Turn) -> None:
        self._turns.pop(t.item_id, None)
        for pair in [p for p in self._awaiting_final if p[0] is t]:
            self._awaiting_final.remove(pair)

    def _final(self, item: Item) -> None:
        self._emit(ItemFinal(item))

    def close(self) -> list[Item]:
        """The connection is gone. What the model said but the client had not heard to the end is
        kept, marked interrupted, so nothing that was said is lost."""
        out = []
        for t in list(self._turns.values()):
            spoken = [s for s in t.sentences if s.has_audio] if t.audio_started else t.sentences
            text = " ".join(x for s in spoken if (x := s.text()))
            if text and not t.unheard:
                out.append(Item(t.item_id, "assistant", text, self._utc_now(), interrupted=not t.played))
        self._turns.clear()
        self._awaiting_final.clear()
        self._turn = None
        return out
