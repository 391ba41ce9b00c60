"""Pacing of assistant audio to the client.

The model produces audio faster than real time. `PlaybackPacer` releases it so the client never
holds more than `lead_ms` of unplayed audio, keeps item boundaries (start/end messages travel in
order with the audio), knows what the client has played at any instant, and drops everything
queued at once on barge-in. Time is passed in (seconds, any monotonic clock): no clocks here.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class _Item:
    item_id: str
    started: bool = False        # its start message has been released
    ended: bool = False          # the model finished its audio (end message queued)
    end_released: bool = False   # the end message has been released
    released_ms: float = 0.0
    rest: bytes = b""            # whole_frames: audio short of a frame, kept for the next push
    first_play: float | None = None   # when the client starts playing it
    play_end: float = 0.0             # when the client will have played all released audio


@dataclass(frozen=True, slots=True)
class Audio:
    item_id: str
    pcm: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class FlushResult:
    current: str | None          # the item the client was playing
    played_ms: int               # how much of it the client has played
    open_items: tuple[str, ...]  # items whose start was released but not their end
    unheard: tuple[str, ...]     # items of which the client played nothing


class PlaybackPacer:
    """Orders and paces everything that belongs to assistant audio items."""

    def __init__(self, sample_rate: int, *, lead_ms: int = 200, chunk_ms: int = 40, max_queue_ms: int = 60_000,
                 whole_frames: bool = False):
        self.bytes_per_ms = sample_rate * 2 / 1000
        self.lead = lead_ms / 1000
        self.chunk_bytes = max(2, int(self.bytes_per_ms * chunk_ms) // 2 * 2)
        # a codec's frames (Opus: 20 ms): every frame released is exactly chunk_ms, the model's events
        # joined across their boundaries and an item's last frame padded with silence
        self.whole_frames = whole_frames
        self.max_queue_ms = max_queue_ms
        self._queue: deque[tuple[str, str | None, Any]] = deque()  # (kind, item_id, payload)
        self._items: dict[str, _Item] = {}
        self._client_end = 0.0
        self.queued_ms = 0.0

    # -- input ------------------------------------------------------------------------------
    def start_item(self, item_id: str, message: Any) -> None:
        self._items[item_id] = _Item(item_id)
        self._queue.append(("start", item_id, message))

    def push_audio(self, item_id: str, pcm: bytes) -> None:
        """Queue audio, re-cut into frames of about chunk_ms (memoryview: no copy until sent)."""
        item = self._items.get(item_id)
        if item is None:
            return
        if self.whole_frames:
            pcm = item.rest + pcm
            cut = len(pcm) - len(pcm) % self.chunk_bytes
            pcm, item.rest = pcm[:cut], pcm[cut:]
        self._queue_audio(item_id, pcm)

    def _queue_audio(self, item_id: str, pcm: bytes) -> None:
        view = memoryview(pcm)
        for i in range(0, len(view), self.chunk_bytes):
            piece = view[i : i + self.chunk_bytes]
            self._queue.append(("audio", item_id, piece))
            self.queued_ms += len(piece) / self.bytes_per_ms

    def end_item(self, item_id: str, message: Any) -> None:
        item = self._items.get(item_id)
        if item is None:
            return
        item.ended = True
        if item.rest:
            self._queue_audio(item_id, item.rest.ljust(self.chunk_bytes, b"\0"))
            item.rest = b""
        self._queue.append(("end", item_id, message))

    def push_message(self, message: Any) -> None:
        """A message that must reach the client in order with the audio around it."""
        self._queue.append(("message", None, message))

    @property
    def full(self) -> bool:
        return self.queued_ms >= self.max_queue_ms

    @property
    def idle(self) -> bool:
        """Nothing queued and no item in play: poll() and played_out() have nothing, next_wakeup() is None."""
        return not self._queue and not self._items

    def playing(self, now: float) -> bool:
        """The client has assistant audio to play: queued here, or released and not yet played."""
        return bool(self._queue) or self._client_end > now

    # -- output -----------------------------------------------------------------------------
    def poll(self, now: float) -> list[Any]:
        """Everything that may be sent now: messages, and `Audio` frames while the lead allows."""
        out: list[Any] = []
        q = self._queue
        while q:
            kind, item_id, payload = q[0]
            if kind == "audio":
                if self._client_end - now >= self.lead:
                    break
                q.popleft()
                ms = len(payload) / self.bytes_per_ms
                self.queued_ms -= ms
                item = self._items[item_id]
                start = max(self._client_end, now)
                if item.first_play is None:
                    item.first_play = start
                self._client_end = start + ms / 1000
                item.released_ms += ms
                item.play_end = self._client_end
                out.append(Audio(item_id, payload.tobytes()))
                continue
            q.popleft()
            if kind == "start":
                self._items[item_id].started = True
            elif kind == "end":
                self._items[item_id].end_released = True
            out.append(payload)
        return out

    def played_out(self, now: float) -> list[str]:
        """Items whose audio the client has now played to the end (each reported once)."""
        done = [
            i.item_id for i in self._items.values() if i.end_released and (i.first_play is None or now >= i.play_end)
        ]
        for item_id in done:
            del self._items[item_id]
        return done

    def next_wakeup(self, now: float) -> float | None:
        """The next instant at which poll() or played_out() will have something new."""
        times = [i.play_end for i in self._items.values() if i.end_released and i.first_play is not None]
        if self._queue:
            kind = self._queue[0][0]
            times.append(now if kind != "audio" else max(now, self._client_end - self.lead))
        return min(times) if times else None

    def flush(self, now: float) -> FlushResult:
        """Barge-in: drop everything queued and say what the client heard."""
        self._queue.clear()
        self.queued_ms = 0.0
        current, played = None, 0
        open_items, unheard = [], []
        for item in self._items.values():
            if item.first_play is not None and item.first_play <= now < item.play_end:
                current, played = item.item_id, int((now - item.first_play) * 1000)
            elif item.first_play is None or item.first_play > now:
                unheard.append(item.item_id)
            if item.started and not item.end_released:
                open_items.append(item.item_id)
        self._items = {k: v for k, v in self._items.items() if v.first_play is not None and v.play_end <= now}
        for item in self._items.values():  # fully played: report through played_out()
            item.end_released = True
        self._client_end = now
        return FlushResult(current, played, tuple(open_items), tuple(unheard))
