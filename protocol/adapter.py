"""What every other wire protocol's adapter over a `Session` shares (protocol/realtime.py,
protocol/twilio.py): it looks like a `Session` to the gateway's actor — the same inputs, effects from
`effects()` — and starts the session itself, by `_start_by` at the latest."""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any

from .session import Session


@dataclass(frozen=True, slots=True)
class SendText:
    """An effect: a text frame for the client, already encoded in the adapter's wire format."""

    text: str = field(repr=False)


class SessionAdapter(abc.ABC):
    """Inputs not defined by a subclass go to the session unchanged; `effects()` are the subclass's
    translation (`_translate`) of the session's, in order with what it emitted itself (`_out`)."""

    def __init__(self, session: Session, *, start_by: float | None):
        self._s = session
        self._out: list[Any] = []
        self._start_by = start_by  # None once the session has been started

    def __getattr__(self, name: str):
        return getattr(self._s, name)

    def effects(self) -> list:
        self._translate()
        out, self._out = self._out, []
        return out

    def next_deadline(self) -> float | None:
        deadline = self._s.next_deadline()
        if self._start_by is not None:
            return self._start_by if deadline is None else min(deadline, self._start_by)
        return deadline

    def tick(self, now: float) -> None:
        if self._start_by is not None and now >= self._start_by:
            self._start(now)
        self._s.tick(now)

    @abc.abstractmethod
    def _start(self, now: float) -> None:
        """Give the session its session.start (and clear `_start_by`)."""

    @abc.abstractmethod
    def _translate(self) -> None:
        """Drain the session's effects into `_out`, translated."""
