"""Who may hold a socket, and who may have a live session: process-wide caps.

- sockets per client address (NOVAGATE_MAX_SOCKETS_PER_IP, 4429), checked when a socket opens;
- sockets still in their handshake (NOVAGATE_MAX_PENDING_HANDSHAKES): when they are all taken, a
  newcomer takes the oldest handshake of the address holding the most of them, if that address holds
  more than the newcomer's would; otherwise the newcomer gets 1013 `busy`. One address (or a few)
  opening idle sockets cannot keep a client from elsewhere out; only as many addresses as there are
  slots can;
- live sessions (NOVAGATE_MAX_SESSIONS, 1013) and live sessions per user (NOVAGATE_MAX_SESSIONS_PER_USER,
  4429), checked in `admit`, after a valid session.start and credentials. Anonymous clients are
  capped per address only.

Keys are the sockets' actors; `close` releases whatever a key holds. A cap of 0 is no cap.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from protocol.codes import CloseCode

from . import metrics

Refusal = tuple[int, str]


@dataclass(frozen=True)
class Limits:
    max_sessions: int
    max_pending: int = 0
    per_address: int = 0
    per_user: int = 0

    @classmethod
    def from_settings(cls, settings) -> Limits:
        return cls(settings.max_sessions, settings.max_pending_handshakes, settings.max_sockets_per_ip,
                   settings.max_sessions_per_user)


def client_address(scope) -> str:
    """The peer of the connection, or the client a trusted proxy names (uvicorn's proxy_headers and
    NOVAGATE_FORWARDED_ALLOW_IPS rewrite scope["client"])."""
    client = scope.get("client")
    return client[0] if client else "unknown"


class Admission:
    def __init__(self, limits: Limits):
        self.limits = limits
        self._address: dict[object, str] = {}             # every open socket -> its client address
        self._pending: dict[object, Callable[[], None]] = {}  # in their handshake, oldest first -> evict()
        self._user: dict[object, str | None] = {}          # live sessions -> user principal (None: anonymous)
        self._per_address: Counter[str] = Counter()
        self._per_user: Counter[str] = Counter()

    @property
    def live(self) -> int:
        return len(self._user)

    @property
    def pending(self) -> int:
        return len(self._pending)

    def open(self, key, address: str, evict: Callable[[], None]) -> Refusal | None:
        """A new socket, before its handshake. `evict` is called if a fairer newcomer takes its slot."""
        lim = self.limits
        if lim.per_address and self._per_address[address] >= lim.per_address:
            return self._refuse("per_address", CloseCode.RATE_LIMITED, "too many connections from this address")
        if lim.max_pending and len(self._pending) >= lim.max_pending:
            victim = self._victim(address)
            if victim is None:
                return self._refuse("busy", CloseCode.TRY_AGAIN_LATER, "busy")
            self._pending.pop(victim)()
        self._address[key] = address
        self._per_address[address] += 1
        self._pending[key] = evict
        metrics.HANDSHAKES.set(len(self._pending))
        return None

    def _victim(self, address: str):
        """The oldest handshake of the address holding the most, if it holds more than `address` would."""
        held = Counter(self._address[k] for k in self._pending)
        top, n = held.most_common(1)[0]
        if n <= held[address] + 1:
            return None
        return next(k for k in self._pending if self._address[k] == top)

    def admit(self, key, principal: str | None) -> Refusal | None:
        """A socket past session.start and its credentials asks for a live session."""
        lim = self.limits
        if key not in self._pending:  # its handshake slot was taken meanwhile
            return CloseCode.TRY_AGAIN_LATER, "busy"
        if len(self._user) >= lim.max_sessions:
            return self._refuse("capacity", CloseCode.TRY_AGAIN_LATER, "at capacity")
        user = principal if principal is not None and principal.startswith("user:") else None
        if user is not None and lim.per_user and self._per_user[user] >= lim.per_user:
            return self._refuse("per_user", CloseCode.RATE_LIMITED, "too many sessions for this user")
        del self._pending[key]
        metrics.HANDSHAKES.set(len(self._pending))
        self._user[key] = user
        if user is not None:
            self._per_user[user] += 1
        return None

    def close(self, key) -> None:
        """The socket is gone: release its address, handshake slot and session."""
        address = self._address.pop(key, None)
        if address is not None:
            self._per_address[address] -= 1
            if not self._per_address[address]:
                del self._per_address[address]
        if self._pending.pop(key, None) is not None:
            metrics.HANDSHAKES.set(len(self._pending))
        if key in self._user and (user := self._user.pop(key)) is not None:
            self._per_user[user] -= 1
            if not self._per_user[user]:
                del self._per_user[user]

    @staticmethod
    def _refuse(reason: str, code: int, message: str) -> Refusal:
        metrics.REJECTED.labels(reason).inc()
        return code, message
