"""The Bedrock Agent Runtime conversation store (production): history in Agent Runtime sessions.

Mapping (the team reference "agent-runtime-sessions.md", §5):

- one **session** per conversation. The session id (a lowercase UUID the service assigns) is the
  conversation id. The owner hash goes in `sessionMetadata["owner"]` and in the tags `owner` and
  `app=novagate`.
- one **invocation** per (conversation, connection): `uuid5(NS, "<sid>:conn:<connection_id>")`,
  created lazily before that connection's first step. A ConflictException means it already exists.
- one **step** per item: `uuid5(NS, "<sid>:item:<item_id>")`, so a retried or replayed write of the
  same item lands on the same step. The payload is one text block holding
  `{"v":1,"item_id","role","text","at","interrupted"}`; `invocationStepTime` is the item's `at`.
- a rolling **history cache** in `sessionMetadata`: the newest items whose text is <= 40 KB,
  zlib-compressed JSON, base64, in chunks `h0..h9` of <= 5000 characters, plus `h_v` (format),
  `h_n` (chunks), `h_count` (items in the whole conversation), `h_last` (time of the newest item)
  and `h_next` (text size of the newest item left out, so a load can tell that its budget ends at
  the cache's edge). Every append rewrites it with UpdateSession. UpdateSession is assumed to
  *replace* the map, so the full map is sent each time.

Resume (`load`) costs 2 calls when the cache is fresh: GetSession (status, owner, cache) and
ListInvocationSteps(maxResults=1). The cache is fresh when that newest step is one of the cached
items with the newest time. Otherwise the fallback lists the whole session (1000 per page) and sorts
on the client (the service's order is undocumented). If the newest listed steps are exactly the
cached items, the cache was current after all (an oldest-first listing defeats the probe): 3 calls.
Otherwise it fetches, 8 at a time, only the newest steps that fit the budget and that the stale
cache does not already hold. It then rewrites the cache in the background.

Lifecycle: `end()` records `ended_by=user` and ends the session, and `load()` then reports it as
ended. A session that is EXPIRED, or ENDED without `ended_by=user`, can no longer be written. `load()`
and `append()` **rotate** it: a new session (metadata `prev=<old>`, `prev_count`, same owner) is
seeded with the newest history and returned under the new id. The move is also remembered in memory.
`history()` and `delete()` follow the `prev` chain, so a rotated conversation is still one
conversation.

boto3 is synchronous, so it runs in a dedicated thread pool and never on the event loop. Throttling,
500s and dropped connections are retried by botocore's standard mode (`max_attempts: 4` in a Config
counts retries: up to 5 attempts). Anything that still fails, including ServiceQuotaExceeded (a 400
that botocore does not retry), raises StoreError, and the caller's write queue retries later.

The store assumes one writer per conversation, as the gateway has. Two processes appending to the
same conversation at once could leave the metadata cache missing an item; the log of steps is
always complete.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import hashlib
import hmac
import json
import logging
import os
import re
import threading
import uuid
import zlib
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime

from protocol.items import Item
from protocol.nova_events import MAX_HISTORY_BYTES

from ..logs import log
from .base import LOAD_MAX_ITEMS, StoredConversation, StoreError

logger = logging.getLogger("novagate.store")

NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/novagate/store/agent-runtime")
APP = "novagate"
CACHE_BYTES = MAX_HISTORY_BYTES  # text bytes the metadata cache keeps: a default load's budget
CACHE_ITEMS = LOAD_MAX_ITEMS     # and at most this many items
CACHE_CHUNK = 5000               # a metadata value's maximum length
CACHE_CHUNKS = 10                # h0..h9
CACHE_FORMAT = "1"               # h_v: zlib-compressed JSON rows, base64, chunked
FETCH_CONCURRENCY = 8            # GetInvocationStep calls in flight at once
PAGE_SIZE = 1000                 # ListInvocationSteps maxResults (the maximum)
MAX_CHAIN = 32                   # prev links followed by history() and delete()
STATE_LRU = 1024                 # conversations whose state is kept in memory
ACTIVE = "ACTIVE"

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
        if doc.get("v") != 1 or doc.get("role") not in ("user", "assistant"):
            return None
        return Item.from_dict(doc)
    except (KeyError, TypeError, ValueError):
        return None


def _encode_cache(items: list[Item]) -> tuple[list[str], int]:
    """The h0..h9 chunks holding the newest of `items` that fit, and how many they hold (text that
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
    """The non-cache keys (owner, app, prev, prev_count, ended_by, ...)."""
    return {k: v for k, v in meta.items() if not _CACHE_KEY_RE.match(k)}


def _tag_value(value: str) -> str:
    """A tag value within the tag charset (an owner is a hex hash already; anything else is hashed)."""
    return value if _TAG_RE.match(value) else hashlib.sha256(value.encode()).hexdigest()


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

    @property
    def owner(self) -> str:
        return self.base.get("owner", "")

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

    def __init__(self, *, region: str | None = None, endpoint_url: str | None = None, session=None):
        self._region = region
        self._endpoint_url = endpoint_url or None
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
            return await self._call("get_session", sessionIdentifier=sid)
        except _NotFound:
            return None

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

    async def _read_state(self, sid: str, *, max_bytes: int = CACHE_BYTES,
                          max_items: int = CACHE_ITEMS) -> tuple[_State, list[Item]] | None:
        """GetSession, then the cache if it is fresh and sufficient for the budget, else the fallback.
        Returns the state and the newest items read (oldest first) to select the budget from."""
        s = await self._get_session(sid)
        if s is None:
            return None
        meta = s.get("sessionMetadata") or {}
        base = _base_metadata(meta)
        if sid in self._user_ended:
            base["ended_by"] = "user"
        status = s.get("sessionStatus", ACTIVE)
        old = self._states.get(sid)
        invocations = old.invocations if old is not None else set()
        decoded = _decode_cache(meta)
        known: dict[str, Item] = {}
        if decoded is not None:
            cache, total, next_size = decoded
            st = _State(sid, status, base, cache, total, next_size, invocations=invocations)
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
        st = _State(sid, status, base, kept, prev_count + steps, left_out, invocations=invocations)
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
                    if now == sid and st is not None and st.dirty and st.status == ACTIVE:
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

    async def _rotate(self, old: _State) -> _State:
        """A new session that continues `old` (which can no longer be written), seeded with its newest history."""
        seed = old.cache  # already the newest <= CACHE_BYTES
        base = {"owner": old.owner, "app": APP, "prev": old.sid, "prev_count": str(max(0, old.total - len(seed)))}
        st = _State("", ACTIVE, base, seed, old.total)
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

    # -- the ConversationStore interface ---------------------------------------------------------
    @_public
    async def create(self, owner: str) -> str:
        st = _State("", ACTIVE, {"owner": owner, "app": APP}, [], 0)
        created = await self._call("create_session", sessionMetadata=st.metadata(),
                                   tags={"owner": _tag_value(owner), "app": APP})
        st.sid = created["sessionId"]
        self._remember(st)
        return st.sid

    @_public
    async def load(self, conversation_id: str, *, max_bytes: int = MAX_HISTORY_BYTES,
                   max_items: int = LOAD_MAX_ITEMS, owner: str | None = None) -> StoredConversation | None:
        if not _UUID_RE.match(conversation_id or ""):
            return None
        async with self._conversation(conversation_id) as sid:
            read = await self._read_state(sid, max_bytes=max_bytes, max_items=max_items)
            if read is None:
                self._forget(sid)
                return None
            st, view = read
            if owner is not None and not hmac.compare_digest(st.owner, owner):
                return None  # someone else's: looks missing, and nothing is rotated on their behalf
            ended = st.user_ended
            if not ended and st.status != ACTIVE:
                st = await self._rotate(st)
                view = st.cache
            elif st.dirty and st.status == ACTIVE:
                self._schedule_cache_write(st.sid)
            items = _select(view, max_bytes, max_items)[0] if view else []
            return StoredConversation(st.sid, st.owner, ended, items, st.total)

    @_public
    async def append(self, conversation_id: str, item: Item, *, connection_id: str = "") -> str:
        if not _UUID_RE.match(conversation_id or ""):
            raise ValueError(f"not an agent-runtime conversation id: {conversation_id!r}")
        for _ in range(5):
            async with self._conversation(conversation_id) as sid:
                st = self._states.get(sid)
                if st is None:
                    read = await self._read_state(sid)
                    st = read[0] if read else None
                    if st is None:
                        self._forget(sid)
                        log(logger, logging.WARNING, "agent-runtime append dropped: session missing",
                            conversation_id=sid, item_id=item.item_id)
                        return sid
                if st.user_ended:
                    # the user ended it: never resurrect it (a late write after session.end)
                    log(logger, logging.WARNING, "agent-runtime append dropped: ended by the user",
                        conversation_id=sid, item_id=item.item_id)
                    return sid
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
                    st.invocations.discard(invocation_id(sid, connection_id))
                    if await self._get_session(sid) is None:
                        self._forget(sid)
                        log(logger, logging.WARNING, "agent-runtime append dropped: session deleted",
                            conversation_id=sid, item_id=item.item_id)
                        return sid
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

    @_public
    async def history(self, conversation_id: str) -> list[Item]:
        if not _UUID_RE.match(conversation_id or ""):
            return []
        chain = await self._chain(self._resolve(conversation_id))
        merged: dict[str, Item] = {}
        for s in reversed(chain):  # oldest session first; a seeded copy never replaces the original
            sid = s["sessionId"]
            summaries = sorted(await self._list_all(sid), key=lambda x: x["invocationStepTime"])
            for item in await self._fetch(sid, summaries):
                if item is not None:
                    merged.setdefault(item.item_id, item)
        return _sort_items(merged.values())

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
