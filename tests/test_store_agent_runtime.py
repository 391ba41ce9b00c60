"""The Agent Runtime store against the loopback fake, through real boto3: the ConversationStore contract,
idempotent appends, what a resume costs, the fallback when the cache is cold or stale, rotation of
expired and ended sessions, and how throttling, 500s and quota errors surface."""

from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

import boto3
import pytest
from botocore.retries.standard import ExponentialBackoff

from gateway.emulate.agent_runtime import AgentRuntimeFake
from gateway.store.agent_runtime import (
    CACHE_BYTES, FETCH_CONCURRENCY, AgentRuntimeStore, _payload, invocation_id, step_id,
)
from gateway.store.base import LOAD_MAX_BYTES, ConversationGone, StoreError, StoredConversation
from protocol.items import Item

OWNER = "3f" * 32  # an owner hash


def item(n, role=None, text=None, at=None, interrupted=False):
    role = role or ("user" if n % 2 else "assistant")
    at = at or f"2026-11-24T10:{n // 60 % 60:02d}:{n % 60:02d}.{n:06d}Z"
    return Item(f"i{n:04d}", role, text or f"message {n}", at, interrupted)


@pytest.fixture(scope="module")
def boto_session():
    # one boto3 session for the module: it caches the service model, so each store's client is cheap
    return boto3.Session(aws_access_key_id="fake", aws_secret_access_key="fake", region_name="us-east-1")


@pytest.fixture
def fake():
    f = AgentRuntimeFake().start()
    yield f
    f.stop()


@pytest.fixture
async def new_store(fake, boto_session):
    """Stores on the fake; each is a separate process's view (no shared memory)."""
    stores = []

    def make() -> AgentRuntimeStore:
        s = AgentRuntimeStore(endpoint_url=fake.url, session=boto_session)
        stores.append(s)
        return s

    yield make
    for s in stores:
        await s.aclose()


@pytest.fixture
async def store(new_store):
    return new_store()


@pytest.fixture
def fast_backoff(monkeypatch):
    """botocore waits up to 1 s, 2 s, ... after a throttle; keep the retries, not the waits."""
    monkeypatch.setitem(ExponentialBackoff._DEFAULT_BACKOFF_CONFIG, "throttling_base_scale", 0.01)


def write_raw(fake, sid, items, *, connection_id="raw", workers=16):
    """Steps written straight to the service, as another writer would (the metadata cache does not change)."""
    c = fake.client(max_pool_connections=workers)
    inv = invocation_id(sid, connection_id)
    try:
        c.create_invocation(sessionIdentifier=sid, invocationId=inv)
    except c.exceptions.ConflictException:
        pass

    def put(it):
        c.put_invocation_step(sessionIdentifier=sid, invocationIdentifier=inv,
                              invocationStepId=step_id(sid, it.item_id),
                              invocationStepTime=datetime.fromisoformat(it.at), payload=_payload(it))

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(put, items))


def drop_cache(fake, sid):
    """Make the metadata cache cold: keep only the non-cache keys."""
    c = fake.client()
    meta = c.get_session(sessionIdentifier=sid)["sessionMetadata"]
    c.update_session(sessionIdentifier=sid, sessionMetadata={k: v for k, v in meta.items() if not k.startswith("h")})


# -- the contract ----------------------------------------------------------------------------------------
async def test_create_append_load_history(fake, store):
    cid = await store.create(OWNER)
    assert cid == cid.lower() and len(cid) == 36
    snap = fake.snapshot(cid)
    assert snap["sessionMetadata"]["owner"] == OWNER and snap["tags"] == {"owner": OWNER, "app": "novagate"}
    assert await store.append(cid, item(2)) == cid
    assert await store.append(cid, item(1, interrupted=True)) == cid  # an older receipt replayed later
    assert await store.append(cid, item(3, text="héllo wörld ✓")) == cid
    conv = await store.load(cid)
    assert isinstance(conv, StoredConversation)
    assert conv.conversation_id == cid and conv.owner == OWNER and not conv.ended and conv.total == 3
    assert [i.item_id for i in conv.items] == ["i0001", "i0002", "i0003"]  # by time, not arrival
    assert conv.items[0].interrupted and conv.items[2].text == "héllo wörld ✓"
    assert await store.history(cid) == conv.items
    # one session, one invocation (one connection), one step per item
    assert fake.snapshot(cid)["invocations"] == 1 and fake.snapshot(cid)["steps"] == 3
    await store.append(cid, item(4), connection_id="conn-2")
    assert fake.snapshot(cid)["invocations"] == 2


async def test_load_budget_and_at_least_one(store):
    cid = await store.create(OWNER)
    for n in range(1, 40):
        await store.append(cid, item(n, text="x" * 1000))
    conv = await store.load(cid, max_bytes=10_000)
    assert conv.total == 39 and len(conv.items) == 10 and conv.items[-1].item_id == "i0039"
    assert len((await store.load(cid, max_items=3)).items) == 3
    big = await store.create(OWNER)
    await store.append(big, item(1, text="y" * 50_000))  # larger than the cache can hold
    conv = await store.load(big, max_bytes=1000)
    assert [i.item_id for i in conv.items] == ["i0001"] and conv.total == 1


async def test_missing_and_invalid_ids(store):
    missing = "0000aaaa-0000-4000-8000-000000000000"
    for cid in (missing, "nope", "", missing.upper()):
        assert await store.load(cid) is None
        assert await store.history(cid) == []
        assert await store.history_page(cid, limit=10) == ([], None)
        await store.end(cid)
        await store.delete(cid)
        for call in (store.append(cid, item(1)), store.take(cid, "conn"), store.revoke(cid)):
            with pytest.raises(ConversationGone) as e:
                await call
            assert e.value.reason == "missing"


async def test_owner_is_returned_and_compared_by_the_caller(store, new_store):
    cid = await store.create(OWNER)
    conv = await new_store().load(cid)
    assert conv.owner == OWNER and conv.owner != "someone else"


# -- idempotency -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("duplicates", ["overwrite", "conflict"])
async def test_append_is_idempotent(fake, store, new_store, duplicates):
    fake.duplicate_steps = duplicates
    cid = await store.create(OWNER)
    for n in (1, 2, 2, 1):
        await store.append(cid, item(n))
    await new_store().append(cid, item(2))  # another process, no memory of it
    conv = await new_store().load(cid)
    assert conv.total == 2 and fake.snapshot(cid)["steps"] == 2
    assert [i.item_id for i in await store.history(cid)] == ["i0001", "i0002"]


@pytest.mark.parametrize("duplicates", ["overwrite", "conflict"])
async def test_write_retried_after_the_answer_was_lost(fake, store, new_store, duplicates):
    fake.duplicate_steps = duplicates
    cid = await store.create(OWNER)
    await store.append(cid, item(1))
    fake.drop_after_commit("PutInvocationStep")  # committed, no answer: botocore retries it
    assert await store.append(cid, item(2)) == cid
    # every attempt commits and loses its answer. With overwrites the store gives up (StoreError) and the
    # caller's queue retries later; with conflicts the first retry's 409 already says "stored".
    fake.drop_after_commit("PutInvocationStep", times=5)
    if duplicates == "overwrite":
        with pytest.raises(StoreError):
            await store.append(cid, item(3))
    assert await store.append(cid, item(3)) == cid
    fake.clear_faults()
    fake.drop_after_commit("UpdateSession")  # the cache write is retried too
    await store.append(cid, item(4))
    assert fake.snapshot(cid)["steps"] == 4
    conv = await new_store().load(cid)
    assert conv.total == 4 and [i.item_id for i in conv.items] == ["i0001", "i0002", "i0003", "i0004"]


# -- what a resume costs ---------------------------------------------------------------------------------
async def test_warm_resume_costs_three_calls(fake, store, new_store):
    cid = await store.create(OWNER)
    for n in range(1, 31):
        await store.append(cid, item(n))
    fake.reset_calls()
    reader = new_store()  # a fresh process: nothing in memory
    conv = await reader.load(cid, owner=OWNER)
    assert fake.calls == {"GetSession": 1, "ListInvocationSteps": 1}
    assert conv.total == 30 and len(conv.items) == 30 and conv.items[-1].item_id == "i0030"
    fake.reset_calls()
    assert await reader.take(cid, "conn-2") == 0  # right after the load: written over that read
    assert fake.calls == {"UpdateSession": 1}
    fake.reset_calls()
    await reader.append(cid, item(31), connection_id="conn-2", epoch=0)  # a new connection: its invocation
    assert fake.calls == {"GetSession": 1, "CreateInvocation": 1, "PutInvocationStep": 1, "UpdateSession": 1}
    fake.reset_calls()
    # a steady-state append: the session's epoch and holder, one step and one cache write
    await reader.append(cid, item(32), connection_id="conn-2", epoch=0)
    assert fake.calls == {"GetSession": 1, "PutInvocationStep": 1, "UpdateSession": 1}
    meta = fake.snapshot(cid)["sessionMetadata"]
    assert meta["live"] == "conn-2" and "epoch" not in meta and meta["h_count"] == "32"
    fake.reset_calls()
    assert (await new_store().load(cid)).total == 32 and sum(fake.calls.values()) == 2


async def test_take_without_a_recent_read(fake, store, new_store):
    cid = await store.create(OWNER)
    await store.append(cid, item(1))
    fake.reset_calls()
    assert await new_store().take(cid, "conn-a") == 0  # nothing in memory: the map is read, then written
    assert fake.calls == {"GetSession": 1, "UpdateSession": 1}
    snap = fake.snapshot(cid)["sessionMetadata"]
    assert snap["live"] == "conn-a" and snap["h_count"] == "1"  # the cache went along unchanged
    assert (await new_store().load(cid)).items == [item(1)]


async def test_owner_is_checked_before_any_history_is_read(fake, store, new_store):
    cid = await store.create(OWNER)
    for n in range(1, 6):
        await store.append(cid, item(n))
    for cold in (False, True):
        if cold:
            drop_cache(fake, cid)
        fake.reset_calls()
        assert await new_store().load(cid, owner="someone else") is None
        assert fake.calls == {"GetSession": 1}
    fake.expire(cid)
    fake.reset_calls()
    assert await new_store().load(cid, owner="someone else") is None  # and nothing is rotated for them
    assert fake.calls == {"GetSession": 1} and len(fake.session_ids()) == 1


async def test_refused_appends_write_nothing(fake, store, new_store):
    cid = await store.create(OWNER)
    await store.take(cid, "conn-a")
    await store.append(cid, item(1), connection_id="conn-a", epoch=0)
    await new_store().revoke(cid)
    fake.reset_calls()
    with pytest.raises(ConversationGone) as e:
        await store.append(cid, item(2), connection_id="conn-a", epoch=0)
    assert e.value.reason == "revoked" and fake.calls == {"GetSession": 1}
    await new_store().take(cid, "conn-b")
    fake.reset_calls()
    with pytest.raises(ConversationGone) as e:
        await store.append(cid, item(2), connection_id="conn-a")
    assert e.value.reason == "taken_over" and fake.calls == {"GetSession": 1}
    assert fake.snapshot(cid)["steps"] == 1


async def test_another_writers_cache_is_not_overwritten(fake, store, new_store):
    cid = await store.create(OWNER)
    for n in range(1, 4):
        await store.append(cid, item(n))  # the first writer keeps its state in memory
    await new_store().append(cid, item(4))  # another process writes, and rewrites the cache
    await store.append(cid, item(5))  # the first sees the cache changed under it, and reads it again
    fake.reset_calls()
    conv = await new_store().load(cid)
    assert conv.total == 5 and [i.item_id for i in conv.items] == [f"i{n:04d}" for n in range(1, 6)]
    assert fake.calls == {"GetSession": 1, "ListInvocationSteps": 1}  # the cache is complete and fresh


async def test_a_cache_rewrite_after_a_load_keeps_a_later_revocation(fake, store, new_store):
    cid = await store.create(OWNER)
    for n in range(1, 6):
        await store.append(cid, item(n))
    drop_cache(fake, cid)
    reader = new_store()
    await reader.load(cid)  # cold: the cache is rewritten in the background
    c = fake.client()  # meanwhile (the event loop is blocked here), another process revokes
    meta = c.get_session(sessionIdentifier=cid)["sessionMetadata"]
    c.update_session(sessionIdentifier=cid, sessionMetadata={**meta, "epoch": "7"})
    await reader.flush()
    meta = fake.snapshot(cid)["sessionMetadata"]
    assert meta["epoch"] == "7" and meta["h_count"] == "5"
    assert (await new_store().load(cid)).epoch == 7


async def test_history_pages_cost(fake, store, new_store):
    cid = await store.create(OWNER)
    for n in range(1, 31):
        await store.append(cid, item(n, text=f"{n:03d} " + "p" * 2996))  # 3 KB each: the cache keeps 13
    fake.reset_calls()
    reader = new_store()
    page, cursor = await reader.history_page(cid, limit=10)
    assert [i.item_id for i in page] == [f"i{n:04d}" for n in range(21, 31)] and cursor == "i0021"
    assert fake.calls == {"GetSession": 1, "ListInvocationSteps": 1}  # the newest page comes from the cache
    fake.reset_calls()
    page, cursor = await reader.history_page(cid, limit=10, before=cursor)
    assert [i.item_id for i in page] == [f"i{n:04d}" for n in range(11, 21)] and cursor == "i0011"
    assert fake.calls["GetInvocationStep"] <= 10 - 3 + 1  # only what the cache lacks (and the group at the edge)


async def test_cold_cache_with_oldest_first_listing(fake, store, new_store):
    cid = await store.create(OWNER)
    for n in range(1, 61):
        await store.append(cid, item(n, text=f"{n:03d} " + "z" * 996))  # 1000 bytes each
    drop_cache(fake, cid)
    fake.oldest_first = True  # the client must sort for itself
    reader = new_store()
    fake.reset_calls()
    conv = await reader.load(cid, max_bytes=10_000)
    assert conv.total == 60
    assert [i.item_id for i in conv.items] == [f"i{n:04d}" for n in range(51, 61)]  # the newest, oldest first
    # only the newest steps are fetched: enough to refill the 40 KB cache, plus at most one batch
    assert fake.calls["GetInvocationStep"] <= CACHE_BYTES // 1000 + 1 + FETCH_CONCURRENCY
    await reader.flush()  # the cache is rewritten in the background
    assert fake.calls["UpdateSession"] == 1
    fake.oldest_first = False
    fake.reset_calls()
    again = await new_store().load(cid, max_bytes=10_000)
    assert again.items == conv.items and fake.calls == {"GetSession": 1, "ListInvocationSteps": 1}


async def test_stale_cache_is_detected(fake, store, new_store):
    cid = await store.create(OWNER)
    for n in range(1, 11):
        await store.append(cid, item(n))
    for n, oldest_first in ((13, True), (16, False)):
        write_raw(fake, cid, [item(k) for k in range(n - 2, n + 1)])  # another writer: the cache lags the log
        fake.oldest_first = oldest_first
        fake.reset_calls()
        reader = new_store()
        conv = await reader.load(cid)
        assert conv.total == n and [i.item_id for i in conv.items] == [f"i{k:04d}" for k in range(1, n + 1)]
        assert fake.calls["GetInvocationStep"] == 3  # only the steps the cache lacks
        await reader.flush()  # and the cache is current again
        fake.reset_calls()
        assert (await new_store().load(cid)).total == n
        # newest first: the 2-call path; oldest first, the probe cannot tell, so the log is listed (no Gets)
        expected = {"GetSession": 1, "ListInvocationSteps": 2} if oldest_first else {"GetSession": 1,
                                                                                    "ListInvocationSteps": 1}
        assert fake.calls == expected


async def test_500_item_conversation_loads_only_what_a_model_takes(fake, store, new_store):
    cid = await store.create(OWNER)
    items = [item(n, text=f"{n:03d} " + "w" * (300 + (n * 37) % 400)) for n in range(1, 501)]
    write_raw(fake, cid, items)  # ~250 KB of text; the cache knows nothing of it (cold)
    reader = new_store()
    fake.reset_calls()
    conv = await reader.load(cid)
    assert conv.total == 500
    assert 150 * 1024 < sum(i.size for i in conv.items) <= LOAD_MAX_BYTES  # 200 KB: a Nova 2 stream's history
    assert conv.items[-1].item_id == "i0500" and conv.items == items[-len(conv.items):]
    assert fake.calls["ListInvocationSteps"] == 2  # the freshness probe, then 500 summaries in one page
    assert fake.calls["GetInvocationStep"] <= len(conv.items) + FETCH_CONCURRENCY  # never all 500
    await reader.flush()
    fake.reset_calls()
    warm = await new_store().load(cid)
    assert warm.items == conv.items and warm.total == 500
    assert sum(fake.calls.values()) == 2
    assert len(await store.history(cid)) == 500


# -- lifecycle -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["expire", "end"])
async def test_expired_or_ended_session_rotates_with_its_history(fake, store, new_store, how):
    cid = await store.create(OWNER)
    for n in range(1, 21):
        await store.append(cid, item(n))
    getattr(fake, how)(cid)  # EXPIRED, or ENDED by someone other than the user
    reader = new_store()
    conv = await reader.load(cid)
    new = conv.conversation_id
    assert new != cid and not conv.ended and conv.owner == OWNER and conv.total == 20
    assert [i.item_id for i in conv.items] == [f"i{n:04d}" for n in range(1, 21)]
    snap = fake.snapshot(new)
    assert snap["sessionStatus"] == "ACTIVE" and snap["sessionMetadata"]["prev"] == cid
    assert snap["tags"]["owner"] == OWNER and snap["steps"] == 20
    # a later write for the old id goes to the new session
    assert await reader.append(cid, item(21)) == new
    assert (await reader.load(cid)).conversation_id == new  # and the old id keeps pointing there
    assert len(fake.session_ids()) == 2
    history = await reader.history(new)
    assert [i.item_id for i in history] == [f"i{n:04d}" for n in range(1, 22)]
    fake.reset_calls()
    assert (await new_store().load(new)).total == 21 and sum(fake.calls.values()) == 2


async def test_append_on_an_expired_session_rotates(fake, store, new_store):
    cid = await store.create(OWNER)
    for n in range(1, 6):
        await store.append(cid, item(n))
    fake.expire(cid)  # mid-conversation, with the writer's state in memory
    new = await store.append(cid, item(6))
    assert new != cid and fake.snapshot(cid)["sessionStatus"] == "EXPIRED"
    assert await store.append(cid, item(7)) == new  # remembered: no second rotation
    conv = await new_store().load(new)
    assert conv.total == 7 and [i.item_id for i in conv.items] == [f"i{n:04d}" for n in range(1, 8)]
    # another process with no memory of the rotation rotates on its own (a new token is issued)
    fake.expire(new)
    other = await new_store().append(new, item(8))
    assert other not in (cid, new)
    assert [i.item_id for i in await store.history(other)] == [f"i{n:04d}" for n in range(1, 9)]


async def test_rotation_carries_the_epoch_and_clears_the_holder(fake, store, new_store):
    cid = await store.create(OWNER)
    await store.append(cid, item(1))
    assert await store.revoke(cid) == 1 and await store.revoke(cid) == 2
    assert await store.take(cid, "conn-a") == 2
    fake.expire(cid)
    conv = await new_store().load(cid)
    new = conv.conversation_id
    assert new != cid and (conv.epoch, conv.live) == (2, "")
    meta = fake.snapshot(new)["sessionMetadata"]
    assert meta["epoch"] == "2" and "live" not in meta and meta["prev"] == cid
    # take and revoke on a session that can no longer be written rotate it too
    fake.expire(new)
    taker = new_store()
    assert await taker.take(new, "conn-b") == 2
    held = (await taker.load(new)).conversation_id
    assert held not in (cid, new) and fake.snapshot(held)["sessionMetadata"]["live"] == "conn-b"
    assert await taker.append(new, item(2), connection_id="conn-b", epoch=2) == held
    fake.end(held)  # ended by someone other than the user
    assert await taker.revoke(held) == 3
    last = (await taker.load(held)).conversation_id
    assert last != held and (await new_store().load(last)).epoch == 3
    assert [i.item_id for i in await taker.history(last)] == ["i0001", "i0002"]
    page, cursor = await new_store().history_page(last, limit=1)
    assert [i.item_id for i in page] == ["i0002"] and cursor == "i0002"
    page, cursor = await new_store().history_page(last, limit=1, before=cursor)
    assert [i.item_id for i in page] == ["i0001"] and cursor is None


async def test_rotation_carries_only_the_newest_history(fake, store, new_store):
    cid = await store.create(OWNER)
    write_raw(fake, cid, [item(n, text="q" * 1000) for n in range(1, 101)])  # 100 KB, cold cache
    fake.expire(cid)
    conv = await new_store().load(cid)
    seeded = fake.snapshot(conv.conversation_id)["steps"]
    assert conv.total == 100 and seeded == len(conv.items) and sum(i.size for i in conv.items) <= CACHE_BYTES
    assert fake.snapshot(conv.conversation_id)["sessionMetadata"]["prev_count"] == str(100 - seeded)
    assert len(await store.history(conv.conversation_id)) == 100


async def test_user_end(fake, store, new_store):
    cid = await store.create(OWNER)
    await store.append(cid, item(1))
    await store.end(cid)
    snap = fake.snapshot(cid)
    assert snap["sessionStatus"] == "ENDED" and snap["sessionMetadata"]["ended_by"] == "user"
    conv = await new_store().load(cid)
    assert conv.ended and conv.conversation_id == cid and conv.owner == OWNER
    assert [i.item_id for i in conv.items] == ["i0001"]
    for writer in (store, new_store()):  # a late write is refused, never resurrected
        with pytest.raises(ConversationGone) as e:
            await writer.append(cid, item(2))
        assert e.value.reason == "ended"
    assert len(fake.session_ids()) == 1 and fake.snapshot(cid)["steps"] == 1
    await store.end(cid)  # idempotent


async def test_delete(fake, store, new_store):
    cid = await store.create(OWNER)
    await store.append(cid, item(1))
    await store.delete(cid)
    assert fake.session_ids() == [] and await store.load(cid) is None and await store.history(cid) == []
    # a rotated conversation is deleted with the sessions it came from
    cid = await store.create(OWNER)
    await store.append(cid, item(1))
    fake.expire(cid)
    new = (await new_store().load(cid)).conversation_id
    unrelated = await store.create("another owner")
    await new_store().delete(new)
    assert fake.session_ids() == [unrelated]


# -- failures --------------------------------------------------------------------------------------------
async def test_throttling_and_500s_are_retried_transparently(fake, store, new_store, fast_backoff):
    cid = await store.create(OWNER)
    fake.inject("PutInvocationStep", "ThrottlingException", times=2)
    fake.inject("UpdateSession", "InternalServerException", times=2)
    fake.inject("CreateInvocation", "ServiceUnavailable")
    await store.append(cid, item(1))
    assert fake.calls["PutInvocationStep"] == 3 and fake.calls["UpdateSession"] == 3
    fake.inject("GetSession", "Throttling")
    fake.inject("ListInvocationSteps", "InternalServer")
    fake.reset_calls()
    conv = await new_store().load(cid)
    assert conv.total == 1 and fake.calls == {"GetSession": 2, "ListInvocationSteps": 2}


async def test_one_throttle_with_botocore_default_backoff(fake, store):
    cid = await store.create(OWNER)
    fake.inject("GetSession", "ThrottlingException")
    assert (await store.load(cid)).total == 0 and fake.calls["GetSession"] == 2


async def test_quota_exhausted_retries_and_connection_errors_raise_store_error(fake, store, fast_backoff):
    cid = await store.create(OWNER)
    fake.inject("PutInvocationStep", "ServiceQuotaExceededException")
    with pytest.raises(StoreError, match="ServiceQuotaExceeded"):
        await store.append(cid, item(1))
    assert fake.calls["PutInvocationStep"] == 1  # a 400: botocore does not retry it
    await store.append(cid, item(1))  # the caller's queue retries later: fine now
    fake.inject("GetSession", "ThrottlingException", times=5)  # 1 attempt + 4 retries
    with pytest.raises(StoreError, match="Throttling"):
        await store.load(cid)
    fake.inject("CreateSession", "AccessDeniedException")
    with pytest.raises(StoreError):
        await store.create(OWNER)
    assert await store.ready()
    fake.stop()
    with pytest.raises(StoreError):
        await store.append(cid, item(2))
    with pytest.raises(StoreError):
        await store.load(cid)
    assert not await store.ready()


async def test_endpoint_from_the_environment(fake, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_BEDROCK_AGENT_RUNTIME", fake.url)
    session = boto3.Session(aws_access_key_id="fake", aws_secret_access_key="fake", region_name="us-east-1")
    store = AgentRuntimeStore(session=session)
    try:
        cid = await store.create(OWNER)
        assert fake.snapshot(cid) is not None and store.name == "agent-runtime"
    finally:
        await store.aclose()
