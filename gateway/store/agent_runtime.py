"""The Bedrock Agent Runtime conversation store (production): history in Agent Runtime sessions.

Mapping (the team reference "agent-runtime-sessions.md", §5):

- one **session** per conversation. The session id (a lowercase UUID the service assigns) is the
  conversation id. The owner hash goes in `sessionMetadata["owner"]` and in the tags `owner` and
  `app=novagate`. The revocation epoch is `sessionMetadata["epoch"]` and the connection that holds
  the conversation `sessionMetadata["live"]` (absent: 0 and nobody).
- one **invocation** per (conversation, connection): `uuid5(NS, "<sid>:conn:<connection_id>")`,
  created lazily before that connection's first step. A ConflictException means it already exists.
- one **step** per item: `uuid5(NS, "<sid>:item:<item_id>")`, so a retried or replayed write of the
  same item lands on the same step. The payload is one text block holding
  `{"v":1,"item_id","role","text","at","interrupted"}`; `invocationStepTime` is the item's `at`.
- a rolling **history cache** in `sessionMetadata`: the newest items whose text is <= 200 KB (what a Nova 2 stream takes),
  zlib-compressed JSON, base64, in chunks `h0..h35` of <= 5000 characters, plus `h_v` (format),
  `h_n` (chunks), `h_count` (items in the whole conversation), `h_last` (time of the newest item)
  and `h_next` (text size of the newest item left out, so a load can tell that its budget ends at
  the cache's edge). Every append rewrites it with UpdateSession. UpdateSession is assumed to
  *replace* the map, so the full map is sent each time.

Resume (`load`) costs 2 calls when the cache is fresh: GetSession (status, owner, epoch, holder,
cache; another owner's conversation stops here, before any history is read) and
ListInvocationSteps(maxResults=1). The cache is fresh when that newest step is one of the cached
items with the newest time. Otherwise the fallback lists the whole session (1000 per page) and sorts
on the client (the service's order is undocumented). If the newest listed steps are exactly the
cached items, the cache was current after all (an oldest-first listing defeats the probe): 3 calls.
Otherwise it fetches, 8 at a time, only the newest steps that fit the budget and that the stale
cache does not already hold. It then rewrites the cache in the background (reading the map again
first). `take` right after a load (within TAKE_REUSE_S) writes over that read: 1 UpdateSession.

An append costs 3 calls: GetSession (the refusals of ConversationGone are decided on the session as it
is now, before anything is written, and other processes' revocations and takeovers are seen there),
PutInvocationStep, UpdateSession (the cache; the rest of the map as just read). A connection's first
append adds CreateInvocation. If the cache in the map is not the one this process last wrote (another
writer), the state is read again before writing. `revoke` always reads, then writes the map.

UpdateSession has no condition: a `take` or `revoke` from another process that lands between a
writer's GetSession and its UpdateSession (a few milliseconds) is overwritten by that writer.

`find_recent(owner, within_s)` (telephony: a caller's conversation goes on when they call back) has no
index to ask: ListSessions (1000 sessions a page, at most FIND_RECENT_PAGES pages) lists the account's
sessions, and those updated (`lastUpdatedAt`) within the window are checked newest first with GetSession
(owner, `ended_by`), FETCH_CONCURRENCY at a time, at most FIND_RECENT_CHECKS of them, until one is the
owner's; sessions this process knows to be someone else's are skipped. Its cost grows with the number of
sessions in the account and region (of every app and owner) and with those active within the window:
1 ListSessions per 1000 sessions, plus up to one GetSession per session updated within the window that
is newer than the owner's. An owner's conversation beyond those bounds is not found (a new one is
started). For many concurrent conversations, keep the window short.

Usage (budgets, docs/usage.md): `add_usage` adds to `sessionMetadata["u_<period>"]` = "<tokens>:<cost>" of
the conversation's session (GetSession, UpdateSession; the keys of this period and the one before are
kept). `spent(owner, period)` has no index either: ListSessions as `find_recent` does, then GetSession of
up to SPENT_CHECKS sessions updated since the period began, summing the owner's. `delete` first moves the
conversation's usage keys to a new ended session holding only them, so erasing history refunds nothing.

`history_page` lists every step of the conversation's sessions and fetches only the page's steps
(the ones the metadata caches hold need no fetch). Listed times may be coarser than items' times
(milliseconds on the fake): steps listed with the same time are fetched as a group and ordered by
their items' times, so pages meet exactly and, concatenated, are `history`.

Lifecycle: `end()` records `ended_by=user` and ends the session, and `load()` then reports it as
ended. A session that is EXPIRED, or ENDED without `ended_by=user`, can no longer be written. `load()`
and `append()` (and `take()`, `revoke()`) **rotate** it: a new session (metadata `prev=<old>`,
`prev_count`, same owner and epoch, held by no one; by the taker after `take`, one epoch on after
`revoke`) is seeded with the newest history and returned under the new id. The move is also
remembered in memory. A user-ended session is gone for good: append, take and revoke raise
ConversationGone("ended"). `history()`, `history_page()` and `delete()` follow the `prev` chain, so a
rotated conversation is still one conversation. (The old session's metadata cannot be written, so
another process that has not seen the move may rotate the old session again, with the old epoch.)

With a customer-managed KMS key (`kms_key_arn`, NOVAGATE_AGENT_RUNTIME_KMS_KEY_ARN) every CreateSession
carries it as `encryptionKeyArn` (docs/iam.md has the policy).

boto3 is synchronous, so it runs in a dedicated thread pool and never on the event loop. Throttling,
500s and dropped connections are retried by botocore's standard mode (`max_attempts: 4` in a Config
counts retries: up to 5 attempts). Anything that still fails, including ServiceQuotaExceeded (a 400
that botocore does not retry), raises StoreError, and the caller's write queue retries later.

The store assumes one writer per conversation, as the gateway has (`take` retires the others). Two
processes appending to the same conversation at once could leave the metadata cache missing an item;
the log of steps is always complete.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
import hashlib
import hmac
import json
import logging
import os
import re
import threading
import time
import uuid
import zlib
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import NamedTuple

from protocol.items import ROLES, Item

from ..logs import log
from .base import (
    LOAD_MAX_BYTES, LOAD_MAX_ITEMS, ConversationGone, StoredConversation, StoreError, check_connection_id, check_page_limit,
    check_writable,
)

logger = logging.getLogger("novagate.store")

NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/novagate/store/agent-runtime")
APP = "novagate"
CACHE_BYTES = LOAD_MAX_BYTES    # text bytes the metadata cache keeps: a default load's budget
CACHE_ITEMS = LOAD_MAX_ITEMS     # and at most this many items
CACHE_CHUNK = 5000               # a metadata value's maximum length
CACHE_CHUNKS = 36                # h0..h35 (metadata holds 50 entries: the other keys take 12 at most)
CACHE_FORMAT = "1"               # h_v: zlib-compressed JSON rows, base64, chunked
FETCH_CONCURRENCY = 8            # GetInvocationStep calls in flight at once
PAGE_SIZE = 1000                 # ListInvocationSteps maxResults (the maximum)
MAX_CHAIN = 32                   # prev links followed by history() and delete()
STATE_LRU = 1024                 # conversations whose state is kept in memory
TAKE_REUSE_S = 2.0               # take() writes over metadata read this recently (a load's) without reading it again
ACTIVE = "ACTIVE"
FIND_RECENT_PAGES = 10           # ListSessions pages find_recent reads at most (10,000 sessions)
SPENT_CHECKS = 500               # sessions updated within a budget period whose usage spent() reads at most
USAGE_KEY = "u_"                 # sessionMetadata "u_<period>" = "<tokens>:<cost in USD>" (add_usage)
FIND_RECENT_CHECKS = 100         # sessions updated within the window whose owner it reads at most (GetSession)

_UUID_RE = re.compile(r"^[a-f0-9]{8}-[a-f0-9]{4}-[a-f0-9]{4}-[a-f0-9]{4}-[a-f0-9]{12}$")
_TAG_RE = re.compile(r"^[a-zA-Z0-9\s._:/=+@-]{0,256}$")
_PROBE_ID = "00000000-0000-4000-8000-000000000000"
_CACHE_KEY_RE = re.compile(r"^h(\d+|_.*)$")
_MIN_TIME = datetime.min.replace(tzinfo=UTC)


def step_id(session_id: str, item_id: str) -> str:
    return str(uuid.uuid5(NAMESPACE, f"{session_id}:item:{item_id}"))


def invocation_id(session_id: str, connection_id: str) -> str:
    return str(uuid.uuid5(NAMESPACE, f"{session_id}:conn:{connection_id}"))


def _parse_at(at: str) -> datetime | None:
    try:
        t = datetime.fromisoformat(at)
    except (TypeError, ValueError):
        return None
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


def _at_key(item: Item) -> datetime:
    return _parse_at(item.at) or _MIN_TIME


def _sort_items(items) -> list[Item]:
    """Oldest first by time; ties keep their order (stable)."""
    return sorted(items, key=_at_key)


def _select(items: list[Item], max_bytes: int, max_items: int) -> tuple[list[Item], bool]:
    """The newest items within the budget (at least one), oldest first, and whether the budget (not
    the supply) stopped the selection."""
    out: list[Item] = []
    used = 0
    for it in reversed(items):
        if len(out) >= max_items or (out and used + it.size > max_bytes):
            out.reverse()
            return out, True
        used += it.size
        out.append(it)
    out.reverse()
    return out, False


def _trim(items: list[Item]) -> tuple[list[Item], int | None]:
    """The newest items the cache keeps (<= CACHE_BYTES of text, <= CACHE_ITEMS; at least one), and
    the text size of the newest item left out (None when none was)."""
    if not items:
        return [], None
    kept, _ = _select(items, CACHE_BYTES, CACHE_ITEMS)
    if len(kept) < len(items):
        return kept, items[len(items) - len(kept) - 1].size
    return kept, None


def _payload(item: Item) -> dict:
    doc = {"v": 1, "item_id": item.item_id, "role": item.role, "text": item.text, "at": item.at,
           "interrupted": item.interrupted}
    return {"contentBlocks": [{"text": json.dumps(doc, ensure_ascii=False, separators=(",", ":"))}]}


def _item_from_step(step: dict) -> Item | None:
    try:
        text = "".join(b["text"] for b in step["payload"]["contentBlocks"] if "text" in b)
        doc = json.loads(text)
        if doc.get("v") != 1 or doc.get("role") not in ROLES:
            return None
        return Item.from_dict(doc)
    except (KeyError, TypeError, ValueError):
        return None


def _encode_cache(items: list[Item]) -> tuple[list[str], int]:
    """The h0..h35 chunks holding the newest of `items` that fit, and how many they hold (text that
    does not compress may not fit 50,000 characters: the oldest are left out then)."""
    kept = len(items)
    while kept:
        rows = [[i.item_id, i.role, i.text, i.at, int(i.interrupted)] for i in items[len(items) - kept:]]
        raw = json.dumps(rows, ensure_ascii=False, separators=(",", ":")).encode()
        blob = base64.b64encode(zlib.compress(raw, 6)).decode()
        chunks = [blob[n:n + CACHE_CHUNK] for n in range(0, len(blob), CACHE_CHUNK)]
        if len(chunks) <= CACHE_CHUNKS:
            return chunks, kept
        kept -= max(1, kept // 10)
    return [], 0


def _decode_cache(meta: dict[str, str]) -> tuple[list[Item], int, int | None] | None:
    """(items oldest first, total, size of the newest item left out) from the metadata cache, or None
    when it is absent or unreadable."""
    try:
        if meta.get("h_v") != CACHE_FORMAT:
            return None
        n, total = int(meta["h_n"]), int(meta["h_count"])
        next_size = int(meta["h_next"]) if meta.get("h_next") else None
        if not 0 <= n <= CACHE_CHUNKS or total < 0:
            return None
        if n == 0:
            return [], total, next_size
        blob = "".join(meta[f"h{k}"] for k in range(n))
        rows = json.loads(zlib.decompress(base64.b64decode(blob, validate=True)))
        items = [Item(str(r[0]), r[1], str(r[2]), str(r[3]), bool(r[4])) for r in rows]
        return items, total, next_size
    except (KeyError, ValueError, TypeError, IndexError, binascii.Error, zlib.error):
        return None


def _base_metadata(meta: dict[str, str]) -> dict[str, str]:
    """The non-cache keys (owner, app, epoch, live, prev, prev_count, ended_by, ...)."""
    return {k: v for k, v in meta.items() if not _CACHE_KEY_RE.match(k)}


def _usage_of(value: str) -> tuple[int, float]:
    """(tokens, cost) of a "u_<period>" metadata value; (0, 0.0) when absent or unreadable."""
    tokens, _, cost = value.partition(":")
    try:
        return max(0, int(tokens)), max(0.0, float(cost))
    except ValueError:
        return 0, 0.0


def _period_start(period: str) -> datetime:
    """The first instant of a UTC day ("2026-11-30") or month ("2026-11")."""
    return datetime.strptime(period, "%Y-%m-%d" if len(period) == 10 else "%Y-%m").replace(tzinfo=UTC)


def _previous(period: str) -> str:
    """The period before `period`, of the same length."""
    start = _period_start(period) - timedelta(days=1)
    return start.strftime("%Y-%m-%d" if len(period) == 10 else "%Y-%m")


def _epoch_of(meta: dict[str, str]) -> int:
    try:
        return max(0, int(meta.get("epoch", "0")))
    except ValueError:
        return 0


def _with_hold(base: dict[str, str], *, epoch: int | None = None, live: str | None = None) -> dict[str, str]:
    """`base` with the epoch and/or the live holder replaced (a zero epoch and an empty holder are left out)."""
    out = dict(base)
    for key, value in (("epoch", None if epoch is None else str(epoch) if epoch else ""), ("live", live)):
        if value is None:
            continue
        if value:
            out[key] = value
        else:
            out.pop(key, None)
    return out


def _tag_value(value: str) -> str:
    """A tag value within the tag charset (an owner is a hex hash already; anything else is hashed)."""
    return value if _TAG_RE.match(value) else hashlib.sha256(value.encode()).hexdigest()


class _Entry(NamedTuple):
    """One listed step of a conversation (see AgentRuntimeStore._timeline)."""

    time: datetime       # invocationStepTime as listed (the service may round it: it only orders coarsely)
    idx: int             # its session's place in the chain, oldest first
    step: str            # invocationStepId
    sid: str
    invocation: str


def _order_key(entry: _Entry, item: Item) -> tuple:
    """History order: the item's time, then the older session, then the step id (a fixed tie-break)."""
    return (_parse_at(item.at) or entry.time, entry.idx, entry.step)


class _NotFound(Exception):
    pass


class _Conflict(Exception):
    pass


_CLIENT_LOCK = threading.Lock()  # boto3 sessions are not thread-safe: create clients one at a time


def _public(fn):
    """No internal signal escapes the interface: an unexpected 404/409 reads as 'not now' (StoreError)."""
    @functools.wraps(fn)
    async def wrapper(*args, **kw):
        try:
            return await fn(*args, **kw)
        except (_NotFound, _Conflict) as e:
            raise StoreError(f"agent-runtime {fn.__name__}: unexpected {type(e).__name__.strip('_')}: {e}") from None
    return wrapper


@dataclass
class _State:
    """What this process knows about one session."""

    sid: str
    status: str
    base: dict[str, str]                 # metadata without the cache keys
    cache: list[Item]                    # the newest items (<= CACHE_BYTES), oldest first
    total: int                           # items in the conversation (prev sessions included)
    next_size: int | None = None         # text size of the newest item older than the cache, if known
    dirty: bool = False                  # the metadata cache lags the step log
    invocations: set[str] = field(default_factory=set)
    read_at: float = 0.0                 # time.monotonic() when `base` was last read from the service

    @property
    def owner(self) -> str:
        return self.base.get("owner", "")

    @property
    def epoch(self) -> int:
        return _epoch_of(self.base)

    @property
    def live(self) -> str:
        return self.base.get("live", "")

    @property
    def prev_count(self) -> int:
        try:
            return int(self.base.get("prev_count", "0"))
        except ValueError:
            return 0

    @property
    def user_ended(self) -> bool:
        return self.base.get("ended_by") == "user"

    def covers_session(self) -> bool:
        """Whether the cache holds every item of this session's own log."""
        return len(self.cache) >= self.total - self.prev_count

    def sufficient(self, max_bytes: int, max_items: int) -> bool:
        """Whether the cache answers a load with this budget exactly as the full log would."""
        _, budget_bound = _select(self.cache, max_bytes, max_items)
        if budget_bound or self.covers_session() or len(self.cache) >= max_items:
            return True
        # the whole cache fits the budget: the log would stop there too if the next older item does not fit
        return self.next_size is not None and sum(i.size for i in self.cache) + self.next_size > max_bytes

    def has(self, item_id: str) -> bool:
        return any(i.item_id == item_id for i in self.cache)

    def add(self, item: Item) -> None:
        if self.has(item.item_id):
            return
        kept, left_out = _trim(_sort_items([*self.cache, item]))
        if left_out is not None:
            self.next_size = left_out
        elif kept and kept[0] is item:
            self.next_size = None  # an old item became the oldest cached: what precedes it is unknown
        self.cache = kept

    def in_window(self, item: Item) -> bool:
        """Whether `item` is as new as the cached items (so the cache would hold it if it were stored)."""
        return self.covers_session() or (bool(self.cache) and _at_key(item) >= _at_key(self.cache[0]))

    def metadata(self) -> dict[str, str]:
        """The full sessionMetadata map: the base keys and the cache."""
        chunks, kept = _encode_cache(self.cache)
        next_size = self.next_size if kept == len(self.cache) else self.cache[len(self.cache) - kept - 1].size
        meta = {**self.base, "h_v": CACHE_FORMAT, "h_n": str(len(chunks)), "h_count": str(self.total),
                "h_last": self.cache[-1].at if self.cache else ""}
        if next_size is not None:
            meta["h_next"] = str(next_size)
        meta.update({f"h{k}": c for k, c in enumerate(chunks)})
        return meta


class AgentRuntimeStore:
    name = "agent-runtime"

    def __init__(self, *, region: str | None = None, endpoint_url: str | None = None, session=None,
                 kms_key_arn: str | None = None):
        self._region = region
        self._endpoint_url = endpoint_url or None
        self._kms_key_arn = kms_key_arn or None  # a customer-managed key for every session created (docs/iam.md)
        self._boto_session = session
        self._client = None
        self._probe_client = None
        self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="agent-runtime")
        self._states: OrderedDict[str, _State] = OrderedDict()
        self._moved: OrderedDict[str, str] = OrderedDict()        # rotated session -> its successor
        self._user_ended: set[str] = set()
        self._locks: dict[str, list] = {}                         # sid -> [asyncio.Lock, users]
        self._background: set[asyncio.Task] = set()
        self._closed = False

    # -- boto3, in the worker threads ------------------------------------------------------------
    def _get_client(self, probe: bool = False):
        """The boto3 client (created once, in a worker thread). The probe client for ready() does not retry."""
        client = self._probe_client if probe else self._client
        if client is not None:
            return client
        import boto3
        from botocore.config import Config

        with _CLIENT_LOCK:
            if self._boto_session is None:
                self._boto_session = boto3.session.Session()
            region = self._region or self._boto_session.region_name or os.environ.get("AWS_REGION") or "us-east-1"
            config = Config(connect_timeout=1, read_timeout=3,
                            # note: in Config, "max_attempts" counts retries (4 = 5 attempts in all)
                            retries={"mode": "standard", "total_max_attempts": 1} if probe
                            else {"mode": "standard", "max_attempts": 4},
                            max_pool_connections=32, user_agent_extra="novagate")
            client = self._probe_client if probe else self._client
            if client is None:
                client = self._boto_session.client("bedrock-agent-runtime", region_name=region,
                                                   endpoint_url=self._endpoint_url, config=config)
                if probe:
                    self._probe_client = client
                else:
                    self._client = client
            return client

    def _call_sync(self, op: str, probe: bool = False, **kw) -> dict:
        from botocore.exceptions import BotoCoreError, ClientError

        if op == "create_session" and self._kms_key_arn:  # every session this store creates, whatever the caller
            kw.setdefault("encryptionKeyArn", self._kms_key_arn)
        try:
            return getattr(self._get_client(probe), op)(**kw)
        except ClientError as e:
            err = e.response.get("Error", {})
            code, message = err.get("Code", ""), err.get("Message", "")
            if code == "ResourceNotFoundException":
                raise _NotFound(message) from None
            if code == "ConflictException":
                raise _Conflict(message) from None
            raise StoreError(f"agent-runtime {op}: {code or 'error'}: {message}") from e
        except BotoCoreError as e:
            raise StoreError(f"agent-runtime {op}: {e}") from e

    async def _call(self, op: str, **kw) -> dict:
        if self._closed:
            raise StoreError("agent-runtime store is closed")
        return await asyncio.get_running_loop().run_in_executor(self._pool, lambda: self._call_sync(op, **kw))

    async def _gather_limited(self, fns: list[Callable]) -> list:
        sem = asyncio.Semaphore(FETCH_CONCURRENCY)

        async def one(fn):
            async with sem:
                return await fn()

        return await asyncio.gather(*(one(fn) for fn in fns))

    # -- in-memory bookkeeping -------------------------------------------------------------------
    def _resolve(self, cid: str) -> str:
        for _ in range(MAX_CHAIN):
            nxt = self._moved.get(cid)
            if nxt is None:
                return cid
            cid = nxt
        return cid

    def _remember(self, st: _State) -> _State:
        self._states[st.sid] = st
        self._states.move_to_end(st.sid)
        while len(self._states) > STATE_LRU:
            self._states.popitem(last=False)
        return st

    def _forget(self, sid: str) -> None:
        self._states.pop(sid, None)
        self._user_ended.discard(sid)
        for old in [k for k, v in self._moved.items() if v == sid or k == sid]:
            self._moved.pop(old, None)

    @asynccontextmanager
    async def _conversation(self, cid: str):
        """Serialise work on one conversation; yields the session it lives in now (after rotations)."""
        while True:
            sid = self._resolve(cid)
            entry = self._locks.setdefault(sid, [asyncio.Lock(), 0])
            entry[1] += 1
            try:
                async with entry[0]:
                    if self._resolve(cid) == sid:
                        yield sid
                        return
            finally:
                entry[1] -= 1
                if entry[1] == 0 and self._locks.get(sid) is entry:
                    del self._locks[sid]

    # -- reading a session -----------------------------------------------------------------------
    async def _get_session(self, sid: str) -> dict | None:
        try:
            s = await self._call("get_session", sessionIdentifier=sid)
        except _NotFound:
            return None
        s.setdefault("sessionId", sid)
        return s

    async def _list_all(self, sid: str) -> list[dict]:
        summaries: list[dict] = []
        token = None
        while True:
            kw = {"sessionIdentifier": sid, "maxResults": PAGE_SIZE}
            if token:
                kw["nextToken"] = token
            page = await self._call("list_invocation_steps", **kw)
            summaries.extend(page.get("invocationStepSummaries", []))
            token = page.get("nextToken")
            if not token:
                return summaries

    async def _fetch(self, sid: str, summaries: list[dict]) -> list[Item | None]:
        async def get(s: dict):
            try:
                r = await self._call("get_invocation_step", sessionIdentifier=sid,
                                     invocationIdentifier=s["invocationId"], invocationStepId=s["invocationStepId"])
            except _NotFound:
                return None
            return _item_from_step(r["invocationStep"])

        return await self._gather_limited([lambda s=s: get(s) for s in summaries])

    async def _tail(self, sid: str, summaries: list[dict], max_bytes: int, max_items: int,
                    known: dict[str, Item]) -> tuple[list[Item], bool]:
        """Fallback read: the newest items of the session's log within the budget (oldest first), and
        whether the whole log was read. It reads until the budget is crossed, so the newest item left
        out is known too. Steps whose item the (stale) cache holds (`known`, by step id) are not fetched;
        the others are fetched FETCH_CONCURRENCY at a time, planned with their estimated size so that
        few are read past the budget."""
        order = sorted(summaries, key=lambda x: x["invocationStepTime"], reverse=True)
        fetched: list[Item] = []
        seen: set[str] = set()
        got: dict[str, Item | None] = {}
        used = pos = 0

        def more(u: int, n: int) -> bool:
            return n <= max_items and u <= max_bytes

        while pos < len(order) and more(used, len(fetched)):
            # plan: walk ahead, counting known sizes and an estimate for the rest, to pick what to fetch
            if fetched:
                estimate = max(1, used // len(fetched))
            else:
                estimate = max(1, sum(i.size for i in known.values()) // len(known)) if known else 256
            batch: list[dict] = []
            sim_used, sim_n, p = used, len(fetched), pos
            while p < len(order) and len(batch) < FETCH_CONCURRENCY and more(sim_used, sim_n):
                sid_ = order[p]["invocationStepId"]
                if sid_ in known:
                    sim_used += known[sid_].size
                elif sid_ not in got:
                    batch.append(order[p])
                    sim_used += estimate
                sim_n += 1
                p += 1
            if batch:
                for summary, item in zip(batch, await self._fetch(sid, batch), strict=True):
                    got[summary["invocationStepId"]] = item
            # take, in order, every item now at hand, until the budget is crossed or a fetch is needed
            while pos < len(order) and more(used, len(fetched)):
                sid_ = order[pos]["invocationStepId"]
                if sid_ in known:
                    item = known[sid_]
                elif sid_ in got:
                    item = got[sid_]
                else:
                    break
                pos += 1
                if item is not None and item.item_id not in seen:
                    seen.add(item.item_id)
                    fetched.append(item)
                    used += item.size
        return _sort_items(fetched), pos >= len(order)

    def _fresh(self, sid: str, cache: list[Item], own_items: int, newest: list[dict]) -> bool:
        """Whether the cache is current: the newest step listed is one of the newest cached items."""
        if not newest:
            return not cache and own_items <= 0
        if not cache:
            return False
        top = max(_at_key(i) for i in cache)
        return newest[0]["invocationStepId"] in {step_id(sid, i.item_id) for i in cache if _at_key(i) == top}

    def _base_of(self, s: dict) -> dict[str, str]:
        """A GetSession answer's non-cache metadata (with what this process knows that it could not write)."""
        base = _base_metadata(s.get("sessionMetadata") or {})
        if s["sessionId"] in self._user_ended:
            base["ended_by"] = "user"
        return base

    def _refresh(self, s: dict) -> _State | None:
        """The state in memory brought up to a fresh GetSession answer `s` (status, owner, epoch, live, ...),
        or None when there is none or another writer has changed the cache since (read it again then)."""
        st = self._states.get(s["sessionId"])
        if st is None:
            return None
        meta = s.get("sessionMetadata") or {}
        if not st.dirty and (meta.get("h_count") != str(st.total)
                             or meta.get("h_last", "") != (st.cache[-1].at if st.cache else "")):
            return None
        st.base, st.status, st.read_at = self._base_of(s), s.get("sessionStatus", ACTIVE), time.monotonic()
        return st

    async def _read_state(self, s: dict, *, max_bytes: int = CACHE_BYTES,
                          max_items: int = CACHE_ITEMS) -> tuple[_State, list[Item]]:
        """From a GetSession answer `s` (read by the caller, who checked the owner first): the cache if it
        is fresh and sufficient for the budget, else the fallback. Returns the state and the newest items
        read (oldest first) to select the budget from."""
        sid = s["sessionId"]
        read_at = time.monotonic()
        meta = s.get("sessionMetadata") or {}
        base = self._base_of(s)
        status = s.get("sessionStatus", ACTIVE)
        old = self._states.get(sid)
        invocations = old.invocations if old is not None else set()
        decoded = _decode_cache(meta)
        known: dict[str, Item] = {}
        if decoded is not None:
            cache, total, next_size = decoded
            st = _State(sid, status, base, cache, total, next_size, invocations=invocations, read_at=read_at)
            probe = await self._call("list_invocation_steps", sessionIdentifier=sid, maxResults=1)
            if (self._fresh(sid, cache, total - st.prev_count, probe.get("invocationStepSummaries", []))
                    and st.sufficient(max_bytes, max_items)):
                return self._remember(st), st.cache
            known = {step_id(sid, i.item_id): i for i in cache}
        summaries = await self._list_all(sid)
        if decoded is not None and len(summaries) == st.total - st.prev_count and st.sufficient(max_bytes, max_items):
            # the probe could not tell (an oldest-first listing?), but the whole listing can: if its newest
            # steps are exactly the cached items, the cache is current and nothing needs fetching
            newest = sorted(summaries, key=lambda x: x["invocationStepTime"], reverse=True)[:len(cache)]
            if {x["invocationStepId"] for x in newest} == set(known):
                return self._remember(st), st.cache
        # fallback: the log itself. Read enough to refill the cache when it can be written.
        want_bytes, want_items = max_bytes, max_items
        if status == ACTIVE or base.get("ended_by") != "user":  # it will be cached, or seed a rotation
            want_bytes, want_items = max(max_bytes, CACHE_BYTES), max(max_items, CACHE_ITEMS)
        items, _ = await self._tail(sid, summaries, want_bytes, want_items, known)
        steps = len(summaries)
        kept, left_out = _trim(items)
        prev_count = int(base.get("prev_count", "0") or 0)
        st = _State(sid, status, base, kept, prev_count + steps, left_out, invocations=invocations, read_at=read_at)
        # rewrite the cache only if the log said something it did not (an oldest-first listing can
        # defeat the one-step probe while the cache is current)
        st.dirty = decoded is None or (decoded[0], decoded[1], decoded[2]) != (kept, st.total, left_out)
        if st.dirty:
            log(logger, logging.INFO, "agent-runtime history cache was cold or stale: rebuilt",
                conversation_id=sid, items=len(items), steps=steps)
        return self._remember(st), items

    # -- writing ---------------------------------------------------------------------------------
    async def _write_cache(self, st: _State) -> None:
        meta = st.metadata()
        await self._call("update_session", sessionIdentifier=st.sid, sessionMetadata=meta)
        st.dirty = False

    def _schedule_cache_write(self, sid: str) -> None:
        async def flush():
            try:
                async with self._conversation(sid) as now:
                    st = self._states.get(now)
                    if now != sid or st is None or not st.dirty or st.status != ACTIVE:
                        return
                    # the map is replaced as a whole: read it again, so that an epoch or a holder written
                    # since the load survives the rewrite
                    s = await self._get_session(sid)
                    if s is None:
                        self._forget(sid)
                        return
                    st.base, st.status, st.read_at = self._base_of(s), s.get("sessionStatus", ACTIVE), time.monotonic()
                    if st.dirty and st.status == ACTIVE:
                        await self._write_cache(st)
            except (StoreError, _Conflict, _NotFound) as e:
                log(logger, logging.WARNING, "agent-runtime history cache not rewritten", conversation_id=sid,
                    error=str(e))

        task = asyncio.get_running_loop().create_task(flush())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def flush(self) -> None:
        """Wait for background cache rewrites (tests, shutdown)."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    async def _ensure_invocation(self, st: _State, connection_id: str) -> str:
        inv = invocation_id(st.sid, connection_id)
        if inv not in st.invocations:
            desc = f"novagate connection {connection_id or '-'}"[:200]
            try:
                await self._call("create_invocation", sessionIdentifier=st.sid, invocationId=inv, description=desc)
            except _Conflict:
                pass  # it exists (or the session is no longer ACTIVE: the step write will tell)
            st.invocations.add(inv)
        return inv

    async def _put_step(self, sid: str, inv: str, item: Item) -> bool:
        """Write one item's step; True if written now, False if that step id already existed.
        Raises _Conflict when the session cannot be written, _NotFound when it (or the invocation) is gone."""
        at = _parse_at(item.at) or datetime.now(UTC)
        try:
            await self._call("put_invocation_step", sessionIdentifier=sid, invocationIdentifier=inv,
                             invocationStepId=step_id(sid, item.item_id), invocationStepTime=at,
                             payload=_payload(item))
            return True
        except _Conflict:
            # "not ACTIVE" or "step exists": the service's answer is the same code, so ask
            s = await self._get_session(sid)
            if s is None:
                raise _NotFound(sid) from None
            if s.get("sessionStatus") != ACTIVE:
                raise
            return False

    async def _rotate(self, old: _State, *, epoch: int | None = None, live: str = "") -> _State:
        """A new session that continues `old` (which can no longer be written), seeded with its newest
        history. It keeps the epoch (or takes `epoch`) and is held by `live` (by no one by default)."""
        seed = old.cache  # already the newest <= CACHE_BYTES
        base = {"owner": old.owner, "app": APP, "prev": old.sid, "prev_count": str(max(0, old.total - len(seed)))}
        base = _with_hold(base, epoch=old.epoch if epoch is None else epoch, live=live)
        st = _State("", ACTIVE, base, seed, old.total, read_at=time.monotonic())
        created = await self._call("create_session", sessionMetadata=st.metadata(),
                                   tags={"owner": _tag_value(old.owner), "app": APP})
        st.sid = created["sessionId"]
        if seed:
            inv = await self._ensure_invocation(st, "rotated-from-" + old.sid)
            await self._gather_limited([lambda i=i: self._put_step(st.sid, inv, i) for i in seed])
        self._moved[old.sid] = st.sid
        self._moved.move_to_end(old.sid)
        while len(self._moved) > STATE_LRU * 4:
            self._moved.popitem(last=False)
        self._states.pop(old.sid, None)
        log(logger, logging.INFO, "agent-runtime session rotated", conversation_id=old.sid, status=old.status,
            new_conversation_id=st.sid, items=len(seed))
        return self._remember(st)

    async def _session_or_gone(self, sid: str) -> tuple[dict, dict[str, str]]:
        """GetSession and its base metadata; ConversationGone("missing") when there is no such session."""
        s = await self._get_session(sid)
        if s is None:
            self._forget(sid)
            raise ConversationGone("missing", sid)
        return s, self._base_of(s)

    # -- the ConversationStore interface ---------------------------------------------------------
    @_public
    async def create(self, owner: str) -> str:
        st = _State("", ACTIVE, {"owner": owner, "app": APP}, [], 0, read_at=time.monotonic())
        created = await self._call("create_session", sessionMetadata=st.metadata(),
                                   tags={"owner": _tag_value(owner), "app": APP})
        st.sid = created["sessionId"]
        self._remember(st)
        return st.sid

    @_public
    async def load(self, conversation_id: str, *, max_bytes: int = LOAD_MAX_BYTES,
                   max_items: int = LOAD_MAX_ITEMS, owner: str | None = None) -> StoredConversation | None:
        if not _UUID_RE.match(conversation_id or ""):
            return None
        async with self._conversation(conversation_id) as sid:
            s = await self._get_session(sid)
            if s is None:
                self._forget(sid)
                return None
            if owner is not None and not hmac.compare_digest((s.get("sessionMetadata") or {}).get("owner", ""), owner):
                return None  # someone else's: looks missing; none of its history is read, nothing is rotated
            st, view = await self._read_state(s, max_bytes=max_bytes, max_items=max_items)
            ended = st.user_ended
            if not ended and st.status != ACTIVE:
                st = await self._rotate(st)
                view = st.cache
            elif st.dirty and st.status == ACTIVE:
                self._schedule_cache_write(st.sid)
            items = _select(view, max_bytes, max_items)[0] if view else []
            return StoredConversation(st.sid, st.owner, ended, items, st.total, st.epoch, st.live)

    @_public
    async def append(self, conversation_id: str, item: Item, *, connection_id: str = "",
                     epoch: int | None = None) -> str:
        if not _UUID_RE.match(conversation_id or ""):
            raise ConversationGone("missing", conversation_id)
        for _ in range(5):
            async with self._conversation(conversation_id) as sid:
                # the session as it is now, before anything is written: status, ended_by, epoch and holder
                s, base = await self._session_or_gone(sid)
                check_writable(sid, exists=True, ended=base.get("ended_by") == "user", stored_epoch=_epoch_of(base),
                               live=base.get("live", ""), epoch=epoch, connection_id=connection_id, role=item.role)
                st = self._refresh(s) or (await self._read_state(s))[0]
                if st.status != ACTIVE:
                    await self._rotate(st)
                    continue  # write under the new session's lock
                if st.has(item.item_id):
                    if st.dirty:
                        try:
                            await self._write_cache(st)
                        except _Conflict:
                            self._states.pop(sid, None)
                            continue
                    return sid
                try:
                    inv = await self._ensure_invocation(st, connection_id)
                    written = await self._put_step(sid, inv, item)
                except _Conflict:
                    self._states.pop(sid, None)  # no longer writable: re-read status, owner and ended_by
                    continue
                except _NotFound:
                    # the invocation or the session is gone: the next round's GetSession tells which
                    st.invocations.discard(invocation_id(sid, connection_id))
                    continue
                # A step that already existed is new to the conversation when it is as new as the cached
                # items: it is our own write whose answer was lost (the cache holds every older duplicate).
                if written or st.in_window(item):
                    st.total += 1
                st.add(item)
                st.dirty = True
                try:
                    await self._write_cache(st)
                except _Conflict:
                    # stored, but the session stopped being writable just now: re-read it and rotate
                    self._states.pop(sid, None)
                    continue
                return sid
        raise StoreError(f"agent-runtime: could not append {item.item_id} to {conversation_id}")

    async def _updated_since(self, since: datetime, owner: str) -> list[tuple[datetime, str]]:
        """(lastUpdatedAt, id) of the sessions ListSessions shows updated since `since` (at most
        FIND_RECENT_PAGES pages), but for those this process knows to be another owner's."""
        found: list[tuple[datetime, str]] = []
        token = None
        for _ in range(FIND_RECENT_PAGES):
            page = await self._call("list_sessions", maxResults=PAGE_SIZE, **({"nextToken": token} if token else {}))
            for summary in page.get("sessionSummaries", []):
                sid, at = summary.get("sessionId", ""), summary.get("lastUpdatedAt")
                at = at if isinstance(at, datetime) else _parse_at(str(at)) if at else None
                if at is None or not _UUID_RE.match(sid):
                    continue
                at = at.replace(tzinfo=UTC) if at.tzinfo is None else at
                known = self._states.get(sid)
                if at >= since and (known is None or hmac.compare_digest(known.owner, owner)):
                    found.append((at, sid))
            token = page.get("nextToken")
            if not token:
                break
        return found

    @_public
    async def find_recent(self, owner: str, within_s: float) -> str | None:
        if within_s <= 0:
            return None
        recent = await self._updated_since(datetime.now(UTC) - timedelta(seconds=within_s), owner)
        recent.sort(reverse=True)
        candidates = [sid for _, sid in recent[:FIND_RECENT_CHECKS]]

        async def owners(sid: str) -> str | None:
            s = await self._get_session(sid)
            if s is None:
                return None
            base = self._base_of(s)
            mine = hmac.compare_digest(base.get("owner", ""), owner) and base.get("ended_by") != "user"
            return sid if mine else None

        for n in range(0, len(candidates), FETCH_CONCURRENCY):  # newest first, a batch at a time
            batch = candidates[n:n + FETCH_CONCURRENCY]
            found = [sid for sid in await self._gather_limited([lambda s=s: owners(s) for s in batch]) if sid]
            if found:
                return self._resolve(found[0])
        return None

    @_public
    async def take(self, conversation_id: str, connection_id: str) -> int:
        check_connection_id(connection_id)
        if not _UUID_RE.match(conversation_id or ""):
            raise ConversationGone("missing", conversation_id)
        for _ in range(5):
            async with self._conversation(conversation_id) as sid:
                st = self._states.get(sid)
                if st is not None and time.monotonic() - st.read_at <= TAKE_REUSE_S:
                    # read moments ago (a resume loads, then takes): write over that read, 1 call in all
                    check_writable(sid, exists=True, ended=st.user_ended)
                else:
                    s, base = await self._session_or_gone(sid)
                    check_writable(sid, exists=True, ended=base.get("ended_by") == "user")
                    st = self._refresh(s)
                    if st is None and s.get("sessionStatus") == ACTIVE:
                        # nothing in memory: set the holder in the map as it is (cache included)
                        meta = _with_hold(s.get("sessionMetadata") or {}, live=connection_id)
                        try:
                            await self._call("update_session", sessionIdentifier=sid, sessionMetadata=meta)
                        except _Conflict:
                            continue  # no longer ACTIVE: read it again
                        return _epoch_of(base)
                    if st is None:
                        st = (await self._read_state(s))[0]
                if st.status != ACTIVE:
                    return (await self._rotate(st, live=connection_id)).epoch
                previous = st.base
                st.base = _with_hold(st.base, live=connection_id)
                try:
                    await self._write_cache(st)
                except _Conflict:
                    self._states.pop(sid, None)  # no longer ACTIVE: read it again
                    continue
                except BaseException:
                    st.base = previous
                    raise
                return st.epoch
        raise StoreError(f"agent-runtime: could not take {conversation_id}")

    @_public
    async def add_usage(self, owner: str, period: str, conversation_id: str, tokens: int, cost_usd: float) -> None:
        if not _UUID_RE.match(conversation_id or ""):
            return
        async with self._conversation(conversation_id) as sid:
            s, base = await self._session_or_gone(sid)
            if s.get("sessionStatus") != ACTIVE:
                raise StoreError(f"agent-runtime: usage not recorded: session {sid} is {s.get('sessionStatus')}")
            key = USAGE_KEY + period
            had_tokens, had_cost = _usage_of(base.get(key, ""))
            meta = {k: v for k, v in (s.get("sessionMetadata") or {}).items()
                    if not k.startswith(USAGE_KEY) or k >= USAGE_KEY + _previous(period)}  # this period and the last
            meta[key] = f"{had_tokens + tokens}:{had_cost + cost_usd!r}"
            try:
                await self._call("update_session", sessionIdentifier=sid, sessionMetadata=meta)
            except _Conflict as e:
                raise StoreError(f"agent-runtime: usage not recorded: session {sid} changed state") from e
            st = self._states.get(sid)
            if st is not None:
                st.base = _base_metadata(meta)

    @_public
    async def spent(self, owner: str, period: str) -> float:
        candidates = [sid for _, sid in await self._updated_since(_period_start(period), owner)]

        async def cost(sid: str) -> float:
            s = await self._get_session(sid)
            base = self._base_of(s) if s is not None else {}
            return _usage_of(base.get(USAGE_KEY + period, ""))[1] if hmac.compare_digest(
                base.get("owner", ""), owner) else 0.0

        return sum(await self._gather_limited([lambda s=s: cost(s) for s in candidates[:SPENT_CHECKS]]))

    @_public
    async def revoke(self, conversation_id: str) -> int:
        if not _UUID_RE.match(conversation_id or ""):
            raise ConversationGone("missing", conversation_id)
        for _ in range(5):
            async with self._conversation(conversation_id) as sid:
                s, base = await self._session_or_gone(sid)  # always read: never revoke over stale metadata
                check_writable(sid, exists=True, ended=base.get("ended_by") == "user")
                new_epoch = _epoch_of(base) + 1
                if s.get("sessionStatus") != ACTIVE:
                    # its metadata can no longer be written: continue it in a new session, under the new epoch
                    st = self._refresh(s) or (await self._read_state(s))[0]
                    return (await self._rotate(st, epoch=new_epoch)).epoch
                meta = _with_hold(s.get("sessionMetadata") or {}, epoch=new_epoch, live="")
                try:
                    await self._call("update_session", sessionIdentifier=sid, sessionMetadata=meta)
                except _Conflict:
                    self._states.pop(sid, None)  # no longer ACTIVE: read it again
                    continue
                st = self._states.get(sid)
                if st is not None:
                    st.base = _with_hold(base, epoch=new_epoch, live="")
                return new_epoch
        raise StoreError(f"agent-runtime: could not revoke {conversation_id}")

    @_public
    async def end(self, conversation_id: str) -> None:
        if not _UUID_RE.match(conversation_id or ""):
            return
        async with self._conversation(conversation_id) as sid:
            s = await self._get_session(sid)
            if s is None:
                self._forget(sid)
                return
            recorded = False
            if s.get("sessionStatus") == ACTIVE:
                meta = {**(s.get("sessionMetadata") or {}), "ended_by": "user"}
                try:
                    await self._call("update_session", sessionIdentifier=sid, sessionMetadata=meta)
                    recorded = True
                except _Conflict:
                    pass  # ended meanwhile
                try:
                    await self._call("end_session", sessionIdentifier=sid)
                except _Conflict:
                    pass
            if not recorded:
                # an ENDED or EXPIRED session's metadata cannot be written: this process remembers
                self._user_ended.add(sid)
            st = self._states.get(sid)
            if st is not None:
                st.status = "ENDED"
                st.base["ended_by"] = "user"

    async def _chain(self, head: str) -> list[dict]:
        """The head session and its predecessors (same owner), newest first."""
        chain: list[dict] = []
        owner = None
        sid: str | None = head
        seen: set[str] = set()
        while sid and _UUID_RE.match(sid) and sid not in seen and len(chain) < MAX_CHAIN:
            seen.add(sid)
            s = await self._get_session(sid)
            if s is None:
                break
            meta = s.get("sessionMetadata") or {}
            if owner is None:
                owner = meta.get("owner", "")
            elif meta.get("owner", "") != owner:
                break
            chain.append(s)
            sid = meta.get("prev")
        return chain

    @_public
    async def delete(self, conversation_id: str) -> None:
        if not _UUID_RE.match(conversation_id or ""):
            return
        async with self._conversation(conversation_id) as sid:
            chain = await self._chain(sid)
            ids = [s["sessionId"] for s in reversed(chain)]  # oldest first: a retry still finds the rest
            if conversation_id != sid and conversation_id not in ids:
                ids.insert(0, conversation_id)
            await self._keep_usage(chain)
            for victim in ids:
                try:
                    await self._call("end_session", sessionIdentifier=victim)
                except (_Conflict, _NotFound):
                    pass
                try:
                    await self._call("delete_session", sessionIdentifier=victim)
                except _NotFound:
                    pass
                except _Conflict as e:
                    raise StoreError(f"agent-runtime: session {victim} could not be deleted: {e}") from None
                self._forget(victim)

    async def _keep_usage(self, chain: list[dict]) -> None:
        """Erasing a conversation must not refund its user's budget: what its sessions spent in their
        periods moves to a new, ended session that holds nothing else (owner, app, `u_<period>` keys)."""
        kept: dict[str, tuple[int, float]] = {}
        owner = ""
        for s in chain:
            base = _base_metadata(s.get("sessionMetadata") or {})
            owner = owner or base.get("owner", "")
            for k, v in base.items():
                if k.startswith(USAGE_KEY):
                    t, c = _usage_of(v)
                    kept[k] = (kept.get(k, (0, 0.0))[0] + t, kept.get(k, (0, 0.0))[1] + c)
        if not kept or not owner:
            return
        meta = {"owner": owner, "app": APP, "ended_by": "user", **{k: f"{t}:{c!r}" for k, (t, c) in kept.items()}}
        created = await self._call("create_session", sessionMetadata=meta, tags={"owner": _tag_value(owner), "app": APP})
        with contextlib.suppress(_Conflict, _NotFound):
            await self._call("end_session", sessionIdentifier=created["sessionId"])

    # -- reading the whole history ---------------------------------------------------------------
    async def _timeline(self, conversation_id: str) -> tuple[list[str], list[_Entry], dict[str, Item]]:
        """A conversation's sessions (oldest first), every step of them in history order as far as the
        listed times tell (the copies a rotation seeded are left out when the session they came from is
        in the chain), and the items the sessions' caches hold, by step id (those need no fetch)."""
        chain = list(reversed(await self._chain(self._resolve(conversation_id))))
        entries: list[_Entry] = []
        known: dict[str, Item] = {}
        for idx, s in enumerate(chain):
            sid, meta = s["sessionId"], s.get("sessionMetadata") or {}
            decoded = _decode_cache(meta)
            if decoded is not None:
                known.update((step_id(sid, i.item_id), i) for i in decoded[0])
            seeded = (invocation_id(sid, "rotated-from-" + meta["prev"])
                      if idx and meta.get("prev") == chain[idx - 1]["sessionId"] else None)
            entries.extend(_Entry(x["invocationStepTime"], idx, x["invocationStepId"], sid, x["invocationId"])
                           for x in await self._list_all(sid) if x["invocationId"] != seeded)
        entries.sort(key=lambda e: (e.time, e.idx, e.step))
        return [s["sessionId"] for s in chain], entries, known

    async def _items(self, entries: list[_Entry], known: dict[str, Item]) -> list[Item | None]:
        """The items of these steps (None for one that is gone or unreadable), FETCH_CONCURRENCY at a time."""
        async def get(e: _Entry) -> Item | None:
            if e.step in known:
                return known[e.step]
            try:
                r = await self._call("get_invocation_step", sessionIdentifier=e.sid, invocationIdentifier=e.invocation,
                                     invocationStepId=e.step)
            except _NotFound:
                return None
            return _item_from_step(r["invocationStep"])

        return await self._gather_limited([lambda e=e: get(e) for e in entries])

    @staticmethod
    def _ordered(pairs: list[tuple[_Entry, Item]]) -> list[Item]:
        """Items in history order (time, then older session, then step id), each item once (the oldest copy)."""
        out: list[Item] = []
        seen: set[str] = set()
        for _, item in sorted(pairs, key=lambda p: _order_key(*p)):
            if item.item_id not in seen:
                seen.add(item.item_id)
                out.append(item)
        return out

    @_public
    async def history(self, conversation_id: str) -> list[Item]:
        if not _UUID_RE.match(conversation_id or ""):
            return []
        _, entries, known = await self._timeline(conversation_id)
        items = await self._items(entries, known)
        return self._ordered([(e, i) for e, i in zip(entries, items, strict=True) if i is not None])

    @_public
    async def history_page(self, conversation_id: str, *, limit: int,
                           before: str | None = None) -> tuple[list[Item], str | None]:
        """Lists every step (1000 a call), then fetches only the page's steps that no cache holds. Steps
        listed with the same time are fetched together, so the page's edges follow the items' own times."""
        check_page_limit(limit)
        if not _UUID_RE.match(conversation_id or ""):
            return [], None
        sids, entries, known = await self._timeline(conversation_id)
        if not sids:
            return [], None
        got: dict[int, Item | None] = {}
        hi, cursor = len(entries), None
        if before is not None:
            ids = {step_id(sid, before) for sid in sids}
            pos = next((n for n, e in enumerate(entries) if e.step in ids), None)
            mark = (await self._items([entries[pos]], known))[0] if pos is not None else None
            if mark is None or mark.item_id != before:
                raise ValueError(f"{before!r} is not an item of conversation {conversation_id}")
            got[pos], cursor = mark, _order_key(entries[pos], mark)
            while hi > pos + 1 and entries[hi - 1].time != entries[pos].time:
                hi -= 1  # the cursor's time group ends the candidates: any of it may precede the cursor
        lo = hi
        while True:
            pairs = [(entries[n], got[n]) for n in range(lo, hi) if got.get(n) is not None]
            older = self._ordered([p for p in pairs if cursor is None or _order_key(*p) < cursor])
            if len(older) > limit or lo == 0:
                break
            new_lo = max(0, lo - (limit + 1 - len(older)))
            while new_lo > 0 and entries[new_lo - 1].time == entries[new_lo].time:
                new_lo -= 1  # whole time groups only: their order is known once their items are
            todo = [n for n in range(new_lo, lo) if n not in got]
            got.update(zip(todo, await self._items([entries[n] for n in todo], known), strict=True))
            lo = new_lo
        page = older[-limit:]
        return page, (page[0].item_id if len(older) > limit else None)

    async def ready(self) -> bool:
        try:
            await asyncio.get_running_loop().run_in_executor(
                self._pool, lambda: self._call_sync("get_session", probe=True, sessionIdentifier=_PROBE_ID))
            return True
        except _NotFound:
            return True
        except (StoreError, _Conflict):
            return False

    async def aclose(self) -> None:
        try:
            await asyncio.wait_for(self.flush(), timeout=5)
        except TimeoutError:
            log(logger, logging.WARNING, "agent-runtime background cache writes still running at close",
                pending=len(self._background))
        self._closed = True
        await asyncio.to_thread(self._pool.shutdown, wait=True, cancel_futures=True)
