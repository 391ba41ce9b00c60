"""Keeping one conversation going across many model streams: when to rotate, how to recover.

Nova Sonic closes a stream at 8 minutes and after about 3 minutes of silence, and fails now and
then. `StreamPolicy` decides, from times and states passed in, when to open the next stream, when
to hand over to it, and whether an error is worth a new stream (and after what backoff).
`ReplayBuffer` keeps the last seconds of user audio so that an utterance cut by a failure or a
forced hand-over reaches the new stream from its start. No clocks, no I/O.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Recover:
    delay_s: float


@dataclass(frozen=True, slots=True)
class GiveUp:
    reason: str


class StreamPolicy:
    """Rotation and recovery decisions for one session's model streams.

    Rotation: from `rotate_after_s` of stream age, the next stream is prepared when the conversation
    is idle (nobody speaking, the assistant not answering) and handed over at once if it still is
    and the history has not changed meanwhile. From `force_after_s` the hand-over happens whatever
    is going on (the utterance in progress is replayed to the new stream).

    Recovery (LiveKit's ladder): a recoverable error reopens the stream with the history after
    2^(n-1)-1 s (0, 1, 3 s, capped at 10), at most `max_recoveries` times per user turn; the idle
    timeout (531) is a rotation, not a failure, and does not count.
    """

    def __init__(self, *, rotate_after_s: float = 360.0, force_after_s: float = 450.0, max_recoveries: int = 3):
        self.rotate_after_s = rotate_after_s
        self.force_after_s = max(force_after_s, rotate_after_s)
        self.max_recoveries = max_recoveries
        self.opened_at = 0.0
        self.failures = 0  # since the last completed user turn

    def stream_opened(self, now: float) -> None:
        self.opened_at = now

    def age(self, now: float) -> float:
        return now - self.opened_at

    def due(self, now: float) -> bool:
        """Time to rotate (at an idle moment)."""
        return self.age(now) >= self.rotate_after_s

    def forced(self, now: float) -> bool:
        """Past waiting for an idle moment: hand over now."""
        return self.age(now) >= self.force_after_s

    def turn_completed(self) -> None:
        self.failures = 0

    def on_error(self, recoverable: bool, *, idle_timeout: bool = False) -> Recover | GiveUp:
        if not recoverable:
            return GiveUp("not recoverable")
        if idle_timeout:
            return Recover(0.0)
        self.failures += 1
        if self.failures > self.max_recoveries:
            return GiveUp(f"{self.max_recoveries} recoveries in one turn")
        return Recover(min(10.0, 2 ** (self.failures - 1) - 1))


class ReplayBuffer:
    """The last `seconds` of user audio (16 kHz PCM16) with the time each piece was sent."""

    def __init__(self, *, seconds: float = 3.0, rate: int = 16000):
        self.max_bytes = int(seconds * rate) * 2
        self._chunks: deque[tuple[float, bytes]] = deque()
        self._size = 0

    def add(self, at: float, pcm: bytes) -> None:
        self._chunks.append((at, pcm))
        self._size += len(pcm)
        while self._size - len(self._chunks[0][1]) >= self.max_bytes:
            self._size -= len(self._chunks.popleft()[1])

    def since(self, at: float) -> list[bytes]:
        """Audio sent after `at` (at most `seconds` of it): what a new stream has not heard yet."""
        return [pcm for t, pcm in self._chunks if t > at]

    def clear(self) -> None:
        self._chunks.clear()
        self._size = 0
