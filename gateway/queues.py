"""Queues bounded in bytes, for the session actor's inbox and its writers."""

from __future__ import annotations

import asyncio
from collections import deque


class Queue:
    """A FIFO bounded in bytes. `put` waits while it is full (backpressure on the reader);
    `put_nowait` never waits and says whether the queue is now over its budget."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: deque = deque()
        self._readable = asyncio.Event()
        self._drained = asyncio.Event()  # set by get(): a waiting put() looks again
        self._timer: asyncio.TimerHandle | None = None  # wakes a get() at its deadline
        self._timer_at: float | None = None

    def put_nowait(self, item, size: int = 0) -> bool:
        self._items.append((item, size))
        self.bytes += size
        self._readable.set()
        return self.bytes <= self.max_bytes

    async def put(self, item, size: int = 0) -> None:
        """Wait until the item fits (an item larger than the whole budget waits for an empty queue)."""
        while self.bytes and self.bytes + size > self.max_bytes:
            self._drained.clear()
            await self._drained.wait()
        self.put_nowait(item, size)

    async def get(self, deadline: float | None = None):
        """The next item, or None once the monotonic clock (the event loop's) reaches `deadline` first.
        This runs for every frame: the timer is a plain one, kept across calls while the deadline stays."""
        if not self._items:
            self._readable.clear()
            if deadline != self._timer_at:
                if self._timer is not None:
                    self._timer.cancel()
                self._timer_at = deadline
                self._timer = None if deadline is None else asyncio.get_running_loop().call_at(deadline, self._due)
            await self._readable.wait()
        return self.get_nowait()

    def _due(self) -> None:
        self._timer = self._timer_at = None
        self._readable.set()

    async def ready(self) -> None:
        """Wait until something is queued (without taking it)."""
        if not self._items:
            self._readable.clear()
            await self._readable.wait()

    def __len__(self) -> int:
        return len(self._items)

    def get_nowait(self):
        """The next item, or None when the queue is empty."""
        if not self._items:
            return None
        item, size = self._items.popleft()
        self.bytes -= size
        self._drained.set()
        return item

    def clear(self) -> None:
        self._items.clear()
        self.bytes = 0
        self._drained.set()
