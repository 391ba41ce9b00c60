"""The conversation state machine: Nova output events and client input in, actions out.

It decides which item is speaking, what was heard, what to store and what to tell the client.
Like websockets' `Protocol`, it does no I/O: the session actor feeds it (`model_event`,
`input_text`, `playback_truncate`, `playback_flushed`, `played_out`, `truncate_timeout`) and
performs the actions it returns from `actions()`.

Item mapping. Nova speaks a turn sentence by sentence: an ASSISTANT TEXT block SPECULATIVE (the
plan), an AUDIO block, later a TEXT block FINAL (what was spoken). Each sentence is one assistant
item: `transcript final:false` from the plan, `response.audio.start/end` around its audio, and
`transcript final:true` with a receipt once the item is settled — played out, or cut by a barge-in
and trimmed to what the client heard. FINAL texts are matched to items in order (the k-th FINAL
belongs to the k-th SPECULATIVE), as the AWS session-continuation sample does.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from . import messages as m
from . import nova_events as nova
from .history import history_events, shape_history, trim_to_played
from .items import Item, new_item_id, utc_now


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
class SendToModel:
    events: tuple[dict, ...]


Action = SendToClient | StartAudioItem | AudioToClient | EndAudioItem | FlushPlayback | AwaitTruncate | ItemFinal | SendToModel


# -- model-side session setup ------------------------------------------------------------------
@dataclass(slots=True)
class StreamSetup:
    """Names and opening events of one Nova stream (new conversation, resume, rotation, recovery)."""

    prompt_name: str
    audio_content: str
    events: list[dict]

    @classmethod
    def build(
        cls,
        *,
        system_prompt: str,
        history: list[Item],
        voice: str,
        output_sample_rate: int,
        endpointing_sensitivity: str | None = None,
        drop_trailing_user: bool = False,
    ) -> StreamSetup:
        prompt = nova.new_name()
        audio = nova.new_name()
        system_chunks = shape_history([Item("system", "user", system_prompt, "")], max_bytes=40 * 1024)
        events = [
            nova.session_start(endpointing_sensitivity=endpointing_sensitivity),
            nova.prompt_start(prompt, voice_id=voice, output_sample_rate=output_sample_rate),
            *nova.text_block(prompt, "SYSTEM", system_chunks[0].chunks if system_chunks else (" ",)),
            *history_events(prompt, shape_history(history, drop_trailing_user=drop_trailing_user)),
            nova.audio_content_start(prompt, audio),
        ]
        return cls(prompt, audio, events)

    def audio(self, pcm: bytes) -> dict:
        return nova.audio_input(self.prompt_name, self.audio_content, pcm)

    def text_turn(self, text: str) -> list[dict]:
        """A typed user turn: an interactive USER text block (Nova 2 cross-modal input)."""
        chunks = shape_history([Item("t", "user", text, "")], max_bytes=10**6)[0].chunks
        return nova.text_block(self.prompt_name, "USER", chunks, interactive=True)

    def closing(self) -> list[dict]:
        """The service's shutdown order: audio contentEnd, promptEnd, sessionEnd."""
        return [
            nova.content_end(self.prompt_name, self.audio_content),
            nova.prompt_end(self.prompt_name),
            nova.session_end(),
        ]


# -- items -------------------------------------------------------------------------------------
@dataclass(slots=True)
class _Assistant:
    item_id: str
    planned: list[str] = field(default_factory=list)
    final: list[str] = field(default_factory=list)
    audio_bytes: int = 0
    has_audio: bool = False
    audio_ended: bool = False
    final_done: bool = False
    played: bool = False          # played out to the end
    cut: bool = False             # interrupted while the client was playing it
    played_ms: int | None = None  # known once the client (or the timeout) says
    unheard: bool = False


class Conversation:
    """One connection's conversation logic, independent of transports and sockets."""

    def __init__(self, *, output_sample_rate: int = 24000, log_items: list[Item] | None = None):
        self.output_bytes_per_ms = output_sample_rate * 2 / 1000
        self._actions: list[Action] = []
        self._blocks: dict[str, tuple[str, str, str | None]] = {}  # content_id -> (type, role, stage)
        self._user_text: list[str] = []
        self._items: dict[str, _Assistant] = {}
        self._awaiting_final: deque[_Assistant] = deque()
        self._final_target: dict[str, _Assistant] = {}  # FINAL content_id -> item
        self._spec_target: dict[str, _Assistant] = {}
        self._audio_target: dict[str, _Assistant] = {}
        self._latest: _Assistant | None = None
        self._barged = False
        self._speaking = False
        self.items: list[Item] = list(log_items or [])  # everything final in this conversation
        self.usage = (0, 0)

    def actions(self) -> list[Action]:
        out, self._actions = self._actions, []
        return out

    def _emit(self, *actions: Action) -> None:
        self._actions.extend(actions)

    # -- client input ---------------------------------------------------------------------------
    def input_text(self, text: str, setup: StreamSetup) -> None:
        """A typed turn: the gateway knows the text, so it makes the user item itself."""
        if self._speaking:
            self._barge_in()
        item = Item(new_item_id(), "user", text, utc_now())
        self._final(item)
        self._emit(SendToModel(tuple(setup.text_turn(text))), SendToClient(m.Status("thinking")))

    def playback_truncate(self, item_id: str, played_ms: int) -> None:
        a = self._items.get(item_id)
        if a is None or not a.cut or a.played_ms is not None:
            return  # unknown, already settled, or not interrupted: nothing to trim
        a.played_ms = played_ms
        self._settle(a)

    def truncate_timeout(self, item_id: str, estimate_ms: int) -> None:
        a = self._items.get(item_id)
        if a is not None and a.cut and a.played_ms is None:
            a.played_ms = estimate_ms
            self._settle(a)

    def playback_flushed(self, current: str | None, played_ms: int, open_items: tuple[str, ...],
                         unheard: tuple[str, ...]) -> None:
        """The pacer dropped queued audio: tell the client, and decide what each item keeps."""
        target = current or (unheard[0] if unheard else None)
        if target is not None:
            self._emit(SendToClient(m.Interrupted(target)))
        for item_id in open_items:
            self._emit(SendToClient(m.ResponseAudioEnd(item_id, "interrupted")))
        if current is not None and (a := self._items.get(current)):
            a.cut = True
            self._emit(AwaitTruncate(current))
        for item_id in unheard:
            if a := self._items.get(item_id):
                a.unheard = True
                self._settle(a)
        self._speaking = False
        self._emit(SendToClient(m.Status("listening")))

    def played_out(self, item_id: str) -> None:
        a = self._items.get(item_id)
        if a is not None and not a.cut:
            a.played = True
            self._settle(a)

    # -- model output ---------------------------------------------------------------------------
    def model_event(self, ev: nova.OutputEvent) -> None:
        match ev:
            case nova.ContentStart(content_id=cid, type=t, role=role, stage=stage):
                self._blocks[cid] = (t, role, stage)
                if t == "TEXT" and role == "ASSISTANT":
                    self._assistant_text_start(cid, stage)
                elif t == "AUDIO" and role == "ASSISTANT":
                    self._audio_start(cid)
                elif t == "TEXT" and role == "USER":
                    self._user_text = []
            case nova.TextOutput(content_id=cid, content=text, interrupted=True):
                self._barge_in()
            case nova.TextOutput(content_id=cid, content=text):
                t, role, stage = self._blocks.get(cid, ("TEXT", "", None))
                if role == "USER":
                    self._user_text.append(text)
                elif (a := self._spec_target.get(cid)) is not None:
                    a.planned.append(text)
                elif (a := self._final_target.get(cid)) is not None:
                    a.final.append(text)
            case nova.AudioOutput(content_id=cid, pcm=pcm):
                if (a := self._audio_target.get(cid)) is not None and not a.unheard and not a.cut:
                    a.audio_bytes += len(pcm)
                    self._emit(AudioToClient(a.item_id, pcm))
            case nova.ContentEnd(content_id=cid, stop_reason=reason):
                self._content_end(cid, reason)
            case nova.UsageEvent(input_tokens=i, output_tokens=o):
                self.usage = (i, o)
                self._emit(SendToClient(m.Usage(i, o)))
            case _:
                pass

    def _assistant_text_start(self, cid: str, stage: str | None) -> None:
        if stage == "FINAL":
            a = self._awaiting_final.popleft() if self._awaiting_final else self._new_assistant()
            self._final_target[cid] = a
        else:
            self._barged = False  # a new plan: a later barge-in concerns it
            a = self._new_assistant()
            self._awaiting_final.append(a)
            self._spec_target[cid] = a

    def _new_assistant(self) -> _Assistant:
        a = _Assistant(new_item_id())
        self._items[a.item_id] = a
        self._latest = a
        return a

    def _audio_start(self, cid: str) -> None:
        a = self._latest
        if a is None or a.has_audio or a.final_done:
            a = self._new_assistant()
            self._awaiting_final.append(a)
        a.has_audio = True
        self._audio_target[cid] = a
        self._barged = False
        self._emit(StartAudioItem(a.item_id))
        if not self._speaking:
            self._speaking = True
            self._emit(SendToClient(m.Status("speaking"), paced=True))

    def _content_end(self, cid: str, reason: str) -> None:
        t, role, stage = self._blocks.pop(cid, ("", "", None))
        if reason == "INTERRUPTED":
            self._barge_in()
        if t == "TEXT" and role == "USER":
            text = "".join(self._user_text).strip()
            self._user_text = []
            for stale in [x for x in self._awaiting_final if x.unheard]:
                self._drop(stale)  # never spoken: no FINAL will come for it
            if text:
                self._final(Item(new_item_id(), "user", text, utc_now()))
                self._emit(SendToClient(m.Status("thinking")))
        elif (a := self._spec_target.pop(cid, None)) is not None:
            if not a.unheard:
                plan = "".join(a.planned).strip()
                self._emit(SendToClient(m.Transcript(a.item_id, "assistant", plan, False), paced=True))
        elif (a := self._audio_target.pop(cid, None)) is not None:
            a.audio_ended = True
            if not a.unheard and not a.cut:
                self._emit(EndAudioItem(a.item_id, reason.lower() if reason else "end_turn"))
            if reason == "END_TURN" and not self._barged:
                self._emit(SendToClient(m.Status("listening"), paced=True))
                self._speaking = False
        elif (a := self._final_target.pop(cid, None)) is not None:
            a.final_done = True
            self._settle(a)

    def _barge_in(self) -> None:
        if self._barged:
            return
        self._barged = True
        self._emit(FlushPlayback())

    # -- settling ---------------------------------------------------------------------------------
    def _settle(self, a: _Assistant) -> None:
        if a.item_id not in self._items:
            return
        if a.unheard:
            if a.final_done or not a.has_audio or a not in self._awaiting_final:
                self._drop(a)
            return
        if not a.final_done:
            return
        text = "".join(a.final).strip() or "".join(a.planned).strip()
        interrupted = False
        if a.cut:
            if a.played_ms is None:
                return
            total_ms = int(a.audio_bytes / self.output_bytes_per_ms)
            text = trim_to_played(text, a.played_ms, total_ms)
            interrupted = True
        elif a.has_audio and not a.played:
            return
        self._drop(a)
        if text:
            self._final(Item(a.item_id, "assistant", text, utc_now(), interrupted))

    def _drop(self, a: _Assistant) -> None:
        self._items.pop(a.item_id, None)
        try:
            self._awaiting_final.remove(a)
        except ValueError:
            pass

    def _final(self, item: Item) -> None:
        self.items.append(item)
        self._emit(ItemFinal(item))

    def close(self) -> list[Item]:
        """The connection is gone. Items the model finished speaking but the client had not heard to
        the end are kept, marked interrupted, so nothing that was said is lost."""
        out = []
        for a in list(self._items.values()):
            text = "".join(a.final).strip()
            if a.final_done and text and not a.unheard:
                out.append(Item(a.item_id, "assistant", text, utc_now(), interrupted=not a.played))
        self._items.clear()
        self._awaiting_final.clear()
        self.items.extend(out)
        return out
