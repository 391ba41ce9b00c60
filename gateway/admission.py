"""Who may hold a socket, and who may have a live session: caps over the whole gateway, every worker
process included.

- sockets per client address (NOVAGATE_MAX_SOCKETS_PER_IP, 4429), checked when a socket opens;
- sockets still in their handshake (NOVAGATE_MAX_PENDING_HANDSHAKES): when they are all taken, a
  newcomer takes the oldest handshake of the address holding the most of them, if that address holds
  more than the newcomer's would; otherwise the newcomer gets 1013 `busy`. One address (or a few)
  opening idle sockets cannot keep a client from elsewhere out; only as many addresses as there are
  slots can;
- live sessions (NOVAGATE_MAX_SESSIONS, 1013) and live sessions per user (NOVAGATE_MAX_SESSIONS_PER_USER,
  4429), checked in `admit`, after a valid session.start and credentials. Anonymous clients are
  capped per address only;
- before all of these, a worker whose event loop or CPU is overloaded (gateway/health.py) refuses new
  sockets: 1013 `overloaded`, after an `error {code: "overloaded", retry_after_ms}`.

The counts live in a `Ledger`: in one process, a private table; under `novagate serve --workers N`,
a table in a file every worker maps (made by the supervisor, gateway/workers.py) and changes under
an flock, so every cap is exact across workers, not per worker. Each worker keeps its own column of
every count, so the counts of a worker that dies are released with it (`Ledger.release_worker`).
A handshake slot another worker's newcomer took is noticed by its holder at the next `reconcile`
(every health tick, 125 ms), which then closes that socket 1013 `busy`.

Keys are the sockets' actors; `close` releases whatever a key holds. A cap of 0 is no cap.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import mmap
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

import orjson

from protocol import codes
from protocol.codes import CloseCode

from . import metrics
from .logs import log

logger = logging.getLogger("novagate.admission")

Refusal = tuple[int, str]


class Overloaded(tuple):
    """The refusal of a socket that arrives while its worker is overloaded: (1013, "overloaded"), and
    when to come back (`retry_after_ms`, sent in an `error` message before the close: `refuse`)."""

    retry_after_ms: int

    def __new__(cls, retry_after_ms: int) -> Overloaded:
        self = super().__new__(cls, (CloseCode.TRY_AGAIN_LATER, "overloaded"))
        self.retry_after_ms = retry_after_ms
        return self


async def refuse(ws, refusal: Refusal) -> None:
    """Close a refused socket. An overload refusal first says, additively, when to retry: a fatal
    `error {code: "overloaded", retry_after_ms}` (docs/protocol.md)."""
    if isinstance(refusal, Overloaded):
        with contextlib.suppress(Exception):  # the client may be gone already
            await ws.send_text(orjson.dumps({
                "type": "error", "code": codes.OVERLOADED, "fatal": True, "retry_after_ms": refusal.retry_after_ms,
                "message": f"the server is overloaded: retry in {refusal.retry_after_ms} ms",
            }).decode())
    await ws.close(*refusal)


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


# -- the ledger ---------------------------------------------------------------------------------------
_EMPTY = bytes(16)
_HEADER = struct.Struct("<4sIIIIIQ16s")  # magic, workers, capacity, slots, used, pending used, seq, salt
_HEADER_BYTES = 64
_SLOT = struct.Struct("<16siIQ")          # address key, worker, (pad), seq (0: free)
_MAGIC = b"NGL1"


class LedgerFull(Exception):
    """The table has no room for another key (it is sized for every socket the caps allow)."""


Ticket = tuple[int, int]  # (handshake slot, its seq): who holds a slot, as long as its seq is unchanged


class Ledger:
    """The counts behind admission, in one flat buffer:

    - `live[w]`: live sessions of worker w;
    - handshake slots (as many as NOVAGATE_MAX_PENDING_HANDSHAKES): address key, worker, seq (age);
    - a hash table (open addressing, linear probing, backward-shift deletion) from a key (a keyed
      BLAKE2b digest of "a:<address>" or "u:<user>") to one count per worker.

    In one process the buffer is anonymous memory; under several workers it is a file that each
    worker maps, changed only under `locked()` (an flock, which the kernel releases if its holder
    dies). Every method but `create`, `attach` and `locked` expects the lock held."""

    def __init__(self, buf: mmap.mmap, fd: int | None, worker: int):
        self._buf = buf
        self._fd = fd
        self.worker = worker
        magic, self.workers, self.capacity, self.slots, _, _, _, self._salt = _HEADER.unpack_from(buf, 0)
        if magic != _MAGIC or not 0 <= worker < self.workers:
            raise ValueError("not a novagate admission ledger")
        self._live = _HEADER_BYTES
        self._slot0 = self._live + 8 * ((4 * self.workers + 7) // 8)
        self._table = self._slot0 + _SLOT.size * self.slots
        self._rec = 16 + 4 * self.workers
        self._cols = struct.Struct(f"<{self.workers}i")
        self._mask = self.capacity - 1

    # -- making and sharing --------------------------------------------------------------------------
    @staticmethod
    def size(limits: Limits, workers: int) -> tuple[int, int]:
        """(table capacity, bytes) for these caps: room for every socket's address and every session's
        user at under half load (a key per socket at most, when the caps bound the sockets)."""
        bound = limits.max_sessions + limits.max_pending if limits.max_pending else 16384
        capacity = 1024
        while capacity < 4 * bound:
            capacity *= 2
        nbytes = (_HEADER_BYTES + 8 * ((4 * workers + 7) // 8) + _SLOT.size * limits.max_pending
                  + capacity * (16 + 4 * workers))
        return capacity, nbytes

    @classmethod
    def create(cls, limits: Limits, *, workers: int = 1, path: str | None = None) -> Ledger:
        """A new, empty ledger: private to this process (`path` None), or in a new file at `path`
        for `workers` processes to attach to."""
        capacity, nbytes = cls.size(limits, workers)
        fd = None
        if path is None:
            buf = mmap.mmap(-1, nbytes)
        else:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            os.ftruncate(fd, nbytes)
            buf = mmap.mmap(fd, nbytes)
        _HEADER.pack_into(buf, 0, _MAGIC, workers, capacity, limits.max_pending, 0, 0, 0, os.urandom(16))
        return cls(buf, fd, 0)

    @classmethod
    def attach(cls, path: str, worker: int) -> Ledger:
        """Worker `worker`'s view of the ledger file at `path`."""
        fd = os.open(path, os.O_RDWR)
        buf = mmap.mmap(fd, os.fstat(fd).st_size)
        return cls(buf, fd, worker)

    @property
    def shared(self) -> bool:
        return self._fd is not None

    @contextlib.contextmanager
    def locked(self):
        if self._fd is None:
            yield
            return
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        self._buf.close()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    # -- keyed counts -------------------------------------------------------------------------------------
    def key(self, kind: bytes, value: str) -> bytes:
        digest = hashlib.blake2b(kind + b":" + value.encode("utf-8", "surrogatepass"), key=self._salt,
                                 digest_size=16).digest()
        return digest if digest != _EMPTY else b"\x01" + digest[1:]

    def _header_field(self, index: int) -> int:
        return _HEADER.unpack_from(self._buf, 0)[index]

    def _set_header(self, index: int, value: int) -> None:
        fields = list(_HEADER.unpack_from(self._buf, 0))
        fields[index] = value
        _HEADER.pack_into(self._buf, 0, *fields)

    def _home(self, digest: bytes) -> int:
        return int.from_bytes(digest[:8], "little") & self._mask

    def _digest_at(self, i: int) -> bytes:
        off = self._table + i * self._rec
        return bytes(self._buf[off:off + 16])

    def _find(self, digest: bytes) -> tuple[int, bool]:
        """(index, found): the record of `digest`, or the empty place where it would go."""
        i = self._home(digest)
        while True:
            d = self._digest_at(i)
            if d == digest:
                return i, True
            if d == _EMPTY:
                return i, False
            i = (i + 1) & self._mask

    def count(self, digest: bytes) -> int:
        """The key's count over every worker."""
        i, found = self._find(digest)
        return sum(self._cols.unpack_from(self._buf, self._table + i * self._rec + 16)) if found else 0

    def add(self, digest: bytes, delta: int) -> None:
        """Change this worker's count of the key; a key no worker counts any more is removed.
        LedgerFull when a new key finds no room."""
        i, found = self._find(digest)
        off = self._table + i * self._rec
        if not found:
            if delta <= 0:
                return
            used = self._header_field(4)
            if used >= self.capacity * 3 // 4:
                raise LedgerFull
            self._buf[off:off + 16] = digest
            self._set_header(4, used + 1)
        col = off + 16 + 4 * self.worker
        (n,) = struct.unpack_from("<i", self._buf, col)
        struct.pack_into("<i", self._buf, col, max(0, n + delta))
        if not any(self._cols.unpack_from(self._buf, off + 16)):
            self._remove(i)

    def _remove(self, i: int) -> None:
        """Empty record i and shift later records of its probe run back (no tombstones)."""
        rec, mask, base = self._rec, self._mask, self._table
        j = i
        while True:
            j = (j + 1) & mask
            d = self._digest_at(j)
            if d == _EMPTY:
                break
            k = self._home(d)
            if (i <= j and (k <= i or k > j)) or (i > j and k <= i and k > j):
                self._buf[base + i * rec:base + (i + 1) * rec] = self._buf[base + j * rec:base + (j + 1) * rec]
                i = j
        self._buf[base + i * rec:base + (i + 1) * rec] = bytes(rec)
        self._set_header(4, self._header_field(4) - 1)

    # -- live sessions -------------------------------------------------------------------------------------
    def live(self) -> int:
        return sum(self._cols.unpack_from(self._buf, self._live))

    def add_live(self, delta: int) -> None:
        off = self._live + 4 * self.worker
        (n,) = struct.unpack_from("<i", self._buf, off)
        struct.pack_into("<i", self._buf, off, max(0, n + delta))

    # -- handshake slots -------------------------------------------------------------------------------------
    def _slot(self, s: int) -> tuple[bytes, int, int]:
        digest, worker, _, seq = _SLOT.unpack_from(self._buf, self._slot0 + s * _SLOT.size)
        return digest, worker, seq

    def _put_slot(self, s: int, digest: bytes, worker: int, seq: int) -> None:
        _SLOT.pack_into(self._buf, self._slot0 + s * _SLOT.size, digest, worker, 0, seq)

    def _next_seq(self) -> int:
        seq = self._header_field(6) + 1
        self._set_header(6, seq)
        return seq

    def pending(self) -> int:
        return self._header_field(5)

    def take_slot(self, address: bytes) -> Ticket | None:
        """A free handshake slot for a socket from `address`, or None when all are taken."""
        if self.pending() >= self.slots:
            return None
        for s in range(self.slots):
            if self._slot(s)[2] == 0:
                seq = self._next_seq()
                self._put_slot(s, address, self.worker, seq)
                self._set_header(5, self.pending() + 1)
                return s, seq
        return None

    def victim(self, address: bytes) -> int | None:
        """The slot of the oldest handshake of the address holding the most, if it holds more than
        `address` would with one more (ties: the address whose oldest handshake is oldest)."""
        held: dict[bytes, list[int]] = {}  # address -> [count, oldest seq, its slot]
        for s in range(self.slots):
            digest, _, seq = self._slot(s)
            if seq:
                entry = held.setdefault(digest, [0, seq, s])
                entry[0] += 1
                if seq < entry[1]:
                    entry[1], entry[2] = seq, s
        if not held:
            return None
        top = max(held.values(), key=lambda e: (e[0], -e[1]))
        mine = held.get(address, [0])[0]
        return top[2] if top[0] > mine + 1 else None

    def reassign(self, s: int, address: bytes) -> tuple[Ticket, int]:
        """Give slot `s` to a newcomer from `address` on this worker: (its ticket, the worker that held it)."""
        _, previous, _ = self._slot(s)
        seq = self._next_seq()
        self._put_slot(s, address, self.worker, seq)
        return (s, seq), previous

    def holds(self, ticket: Ticket) -> bool:
        s, seq = ticket
        _, worker, now = self._slot(s)
        return now == seq and worker == self.worker

    def free(self, ticket: Ticket) -> None:
        if self.holds(ticket):
            self._put_slot(ticket[0], _EMPTY, 0, 0)
            self._set_header(5, self.pending() - 1)

    # -- a worker that died ------------------------------------------------------------------------------------
    def release_worker(self, worker: int) -> None:
        """Forget everything worker `worker` held (it died: the kernel closed its sockets)."""
        struct.pack_into("<i", self._buf, self._live + 4 * worker, 0)
        for s in range(self.slots):
            _, w, seq = self._slot(s)
            if seq and w == worker:
                self._put_slot(s, _EMPTY, 0, 0)
                self._set_header(5, self.pending() - 1)
        records = []
        for i in range(self.capacity):
            off = self._table + i * self._rec
            digest = bytes(self._buf[off:off + 16])
            if digest != _EMPTY:
                cols = list(self._cols.unpack_from(self._buf, off + 16))
                cols[worker] = 0
                if any(cols):
                    records.append((digest, cols))
        self._buf[self._table:self._table + self.capacity * self._rec] = bytes(self.capacity * self._rec)
        for digest, cols in records:
            i, _ = self._find(digest)
            off = self._table + i * self._rec
            self._buf[off:off + 16] = digest
            self._cols.pack_into(self._buf, off + 16, *cols)
        self._set_header(4, len(records))


_installed: Ledger | None = None


def install(ledger: Ledger | None) -> None:
    """Make `ledger` (this worker's view of the supervisor's) the one every `Admission` of this
    process counts in (gateway/workers.py); None: each Admission keeps its own."""
    global _installed
    _installed = ledger


# -- admission ---------------------------------------------------------------------------------------------
_ABSENT = object()


class Admission:
    def __init__(self, limits: Limits, ledger: Ledger | None = None):
        self.limits = limits
        self.ledger = ledger or _installed or Ledger.create(limits)
        self.health = None  # gateway/health.OverloadGate, once the health monitor runs: .overloaded, .retry_after_ms()
        self._address: dict[object, bytes | None] = {}  # every open socket -> its address key (None: not counted)
        self._pending: dict[object, tuple[Ticket | None, Callable[[], None]]] = {}  # oldest first -> slot, evict()
        self._user: dict[object, bytes | None] = {}     # live sessions -> user key (None: anonymous)
        self._full_logged = False

    @property
    def live(self) -> int:
        """Live sessions of this process."""
        return len(self._user)

    @property
    def pending(self) -> int:
        """Sockets of this process in their handshake."""
        return len(self._pending)

    def open(self, key, address: str, evict: Callable[[], None]) -> Refusal | None:
        """A new socket, before its handshake. `evict` is called if a fairer newcomer takes its slot."""
        if self.health is not None and self.health.overloaded:
            metrics.REJECTED.labels("overload").inc()
            return Overloaded(self.health.retry_after_ms())
        lim, ledger = self.limits, self.ledger
        addr = ledger.key(b"a", address)
        counted = addr if lim.per_address else None
        ticket, previous = None, None
        with ledger.locked():
            if counted is not None and ledger.count(counted) >= lim.per_address:
                return self._refuse("per_address", CloseCode.RATE_LIMITED, "too many connections from this address")
            if lim.max_pending:
                ticket = ledger.take_slot(addr)
                if ticket is None:
                    slot = ledger.victim(addr)
                    if slot is None:
                        return self._refuse("busy", CloseCode.TRY_AGAIN_LATER, "busy")
                    ticket, previous = ledger.reassign(slot, addr)
            if counted is not None:
                try:
                    ledger.add(counted, 1)
                except LedgerFull:
                    if ticket is not None:
                        ledger.free(ticket)
                    return self._full()
        if previous == ledger.worker:  # the slot was one of ours: its socket goes now (another worker's, at its reconcile)
            self._evict_lost()
        self._address[key] = counted
        self._pending[key] = (ticket, evict)
        metrics.HANDSHAKES.set(len(self._pending))
        return None

    def admit(self, key, principal: str | None) -> Refusal | None:
        """A socket past session.start and its credentials asks for a live session."""
        lim, ledger = self.limits, self.ledger
        entry = self._pending.get(key)
        if entry is None:  # its handshake slot was taken meanwhile
            return CloseCode.TRY_AGAIN_LATER, "busy"
        ticket, _ = entry
        user = principal if principal is not None and principal.startswith("user:") else None
        ukey = ledger.key(b"u", user) if user is not None and lim.per_user else None
        with ledger.locked():
            if ticket is not None and not ledger.holds(ticket):  # taken by a newcomer on another worker
                lost = True
            else:
                lost = False
                if ledger.live() >= lim.max_sessions:
                    return self._refuse("capacity", CloseCode.TRY_AGAIN_LATER, "at capacity")
                if ukey is not None and ledger.count(ukey) >= lim.per_user:
                    return self._refuse("per_user", CloseCode.RATE_LIMITED, "too many sessions for this user")
                if ukey is not None:
                    try:
                        ledger.add(ukey, 1)
                    except LedgerFull:
                        return self._full()
                if ticket is not None:
                    ledger.free(ticket)
                ledger.add_live(1)
        if lost:
            self._evict_lost()
            return CloseCode.TRY_AGAIN_LATER, "busy"
        del self._pending[key]
        metrics.HANDSHAKES.set(len(self._pending))
        self._user[key] = ukey
        return None

    def close(self, key) -> None:
        """The socket is gone: release its address, handshake slot and session."""
        addr = self._address.pop(key, _ABSENT)
        entry = self._pending.pop(key, None)
        user = self._user.pop(key, _ABSENT)
        if addr is _ABSENT and entry is None and user is _ABSENT:
            return
        ledger = self.ledger
        with ledger.locked():
            if addr is not _ABSENT and addr is not None:
                ledger.add(addr, -1)
            if entry is not None and entry[0] is not None:
                ledger.free(entry[0])
            if user is not _ABSENT:
                ledger.add_live(-1)
                if user is not None:
                    ledger.add(user, -1)
        if entry is not None:
            metrics.HANDSHAKES.set(len(self._pending))

    def reconcile(self) -> None:
        """Close the handshakes whose slots newcomers on other workers took (called every health tick)."""
        if self.ledger.shared and self._pending:
            self._evict_lost()

    def _evict_lost(self) -> None:
        ledger = self.ledger
        with ledger.locked():
            lost = [k for k, (t, _) in self._pending.items() if t is not None and not ledger.holds(t)]
        for k in lost:
            _, evict = self._pending.pop(k)
            evict()
        if lost:
            metrics.HANDSHAKES.set(len(self._pending))

    def _full(self) -> Refusal:
        if not self._full_logged:
            self._full_logged = True
            log(logger, logging.WARNING, "admission ledger full: new sockets get 1013 busy until some close",
                capacity=self.ledger.capacity)
        return self._refuse("busy", CloseCode.TRY_AGAIN_LATER, "busy")

    @staticmethod
    def _refuse(reason: str, code: int, message: str) -> Refusal:
        metrics.REJECTED.labels(reason).inc()
        return code, message
