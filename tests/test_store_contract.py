"""One contract, every store: the same tests against SQLite (a file) and the Agent Runtime store (the
loopback fake, run as its own process and reached through real boto3). Epoch and holder (`take`,
`revoke`), why an append is refused (ConversationGone), and paged history."""

import subprocess
import sys
from pathlib import Path

import boto3
import pytest

from gateway.store import ConversationGone, StoredConversation, StoreError
from gateway.store.agent_runtime import AgentRuntimeStore
from gateway.store.sqlite import SQLiteStore
from protocol.items import Item

ROOT = Path(__file__).resolve().parent.parent
OWNER = "5a" * 32
MISSING = "0000aaaa-0000-4000-8000-000000000000"


def item(n, at=None):
    return Item(f"i{n:04d}", "user" if n % 2 else "assistant", f"message {n}",
                at or f"2026-11-24T10:{n // 60 % 60:02d}:{n % 60:02d}.{n:06d}Z")


@pytest.fixture(scope="module")
def fake_url():
    """`python -m gateway.emulate.agent_runtime --port 0` as a process; it prints its URL first."""
    proc = subprocess.Popen([sys.executable, "-m", "gateway.emulate.agent_runtime", "--port", "0"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), f"the fake did not start: {url!r}"
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module")
def boto_session():
    return boto3.Session(aws_access_key_id="fake", aws_secret_access_key="fake", region_name="us-east-1")


@pytest.fixture(params=["sqlite", "agent-runtime"])
async def new_store(request, tmp_path):
    """Stores of one kind sharing one backend; each is a separate process's view (no shared memory)."""
    stores = []

    def make():
        if request.param == "sqlite":
            s = SQLiteStore(str(tmp_path / "contract.db"))
        else:
            s = AgentRuntimeStore(endpoint_url=request.getfixturevalue("fake_url"),
                                  session=request.getfixturevalue("boto_session"))
        stores.append(s)
        return s

    yield make
    for s in stores:
        await s.aclose()


@pytest.fixture
async def store(new_store):
    return new_store()


async def gone(reason, awaitable):
    with pytest.raises(ConversationGone) as e:
        await awaitable
    assert e.value.reason == reason and not isinstance(e.value, StoreError)
    return e.value


def ids(items):
    return [i.item_id for i in items]


# -- the conversation and its holder -----------------------------------------------------------------------
async def test_a_new_conversation_has_epoch_zero_and_no_holder(store):
    cid = await store.create(OWNER)
    conv = await store.load(cid)
    assert isinstance(conv, StoredConversation)
    assert (conv.epoch, conv.live, conv.total, conv.ended) == (0, "", 0, False)
    assert StoredConversation("c", "o", False, [], 0).epoch == 0  # the new fields have defaults


async def test_take_sets_the_holder_and_retires_the_previous_one(store, new_store):
    cid = await store.create(OWNER)
    assert await store.take(cid, "conn-a") == 0
    assert (await new_store().load(cid)).live == "conn-a"
    assert await store.append(cid, item(1), connection_id="conn-a", epoch=0) == cid
    other = new_store()  # the resume on another device, in another process
    assert (await other.load(cid, owner=OWNER)).live == "conn-a"
    assert await other.take(cid, "conn-b") == 0
    # the old connection learns it at its next write, and nothing of that write is stored
    await gone("taken_over", store.append(cid, item(2), connection_id="conn-a"))
    assert await other.append(cid, item(3), connection_id="conn-b") == cid
    assert await store.append(cid, item(4)) == cid  # no connection given: no holder check
    conv = await new_store().load(cid)
    assert conv.live == "conn-b" and ids(conv.items) == ["i0001", "i0003", "i0004"] and conv.total == 3
    assert await store.take(cid, "conn-a") == 0  # taking back is allowed
    assert (await new_store().load(cid)).live == "conn-a"
    with pytest.raises(ValueError):
        await store.take(cid, "")


async def test_revoke_bumps_the_epoch_and_clears_the_holder(store, new_store):
    cid = await store.create(OWNER)
    live = new_store()  # a live session in another process, with the conversation in memory
    assert await live.take(cid, "conn-a") == 0
    await live.append(cid, item(1), connection_id="conn-a", epoch=0)
    assert await store.revoke(cid) == 1
    conv = await new_store().load(cid)
    assert (conv.epoch, conv.live, conv.total) == (1, "", 1)
    # the live session learns it at its next append; the item is not stored
    await gone("revoked", live.append(cid, item(2), connection_id="conn-a", epoch=0))
    assert (await new_store().load(cid)).total == 1
    # a session that authenticated with the new epoch writes on
    assert await new_store().take(cid, "conn-b") == 1
    assert await live.append(cid, item(3), connection_id="conn-b", epoch=1) == cid
    assert await store.revoke(cid) == 2 and await store.revoke(cid) == 3
    await gone("revoked", live.append(cid, item(4), epoch=2))
    assert ids(await store.history(cid)) == ["i0001", "i0003"]


async def test_idempotent_appends_under_the_checks(store, new_store):
    cid = await store.create(OWNER)
    epoch = await store.take(cid, "conn-a")
    for n in (2, 1, 2, 1):
        assert await store.append(cid, item(n), connection_id="conn-a", epoch=epoch) == cid
    await new_store().append(cid, item(2), connection_id="conn-a", epoch=epoch)  # another process replays
    conv = await new_store().load(cid)
    assert conv.total == 2 and ids(conv.items) == ["i0001", "i0002"]


async def test_missing_conversation(store, new_store):
    for cid in (MISSING, "not-a-conversation-id"):
        await gone("missing", store.append(cid, item(1)))
        await gone("missing", store.take(cid, "conn-a"))
        await gone("missing", store.revoke(cid))
        assert await store.history_page(cid, limit=10) == ([], None)
    # deleted while a session held it: its queued writes stop (they are not retried as StoreErrors)
    cid = await store.create(OWNER)
    holder = new_store()
    await holder.take(cid, "conn-a")
    await holder.append(cid, item(1), connection_id="conn-a", epoch=0)
    await store.end(cid)
    await store.delete(cid)
    err = await gone("missing", holder.append(cid, item(2), connection_id="conn-a", epoch=0))
    assert err.conversation_id == cid and "missing" in str(err)
    await gone("missing", holder.take(cid, "conn-a"))
    assert await holder.load(cid) is None
    assert await holder.history_page(cid, limit=5, before="i0001") == ([], None)


async def test_ended_conversation(store, new_store):
    cid = await store.create(OWNER)
    holder = new_store()
    await holder.take(cid, "conn-a")
    await holder.append(cid, item(1), connection_id="conn-a", epoch=0)
    await store.end(cid)
    await gone("ended", holder.append(cid, item(2), connection_id="conn-a", epoch=0))
    await gone("ended", holder.append(cid, item(1)))  # even a replay: the conversation is closed
    await gone("ended", store.take(cid, "conn-b"))
    await gone("ended", store.revoke(cid))
    conv = await new_store().load(cid)
    assert conv.ended and conv.total == 1


async def test_refusals_in_their_order(store):
    cid = await store.create(OWNER)
    await store.take(cid, "conn-b")
    await store.revoke(cid)
    await store.take(cid, "conn-b")
    # revoked (a stale epoch) is reported before taken_over (another holder)
    await gone("revoked", store.append(cid, item(1), connection_id="conn-a", epoch=0))
    await gone("taken_over", store.append(cid, item(1), connection_id="conn-a", epoch=1))
    await store.end(cid)
    await gone("ended", store.append(cid, item(1), connection_id="conn-a", epoch=0))


def test_conversation_gone_reasons():
    assert ConversationGone("taken_over", "c").reason == "taken_over"
    with pytest.raises(ValueError):
        ConversationGone("expired")


# -- paged history -----------------------------------------------------------------------------------------
async def test_history_pages_newest_first(store):
    cid = await store.create(OWNER)
    for n in [*range(25, 0, -1)]:  # arrival order is not history order
        await store.append(cid, item(n))
    page, cursor = await store.history_page(cid, limit=10)
    assert ids(page) == [f"i{n:04d}" for n in range(16, 26)] and cursor == "i0016"
    page, cursor = await store.history_page(cid, limit=10, before=cursor)
    assert ids(page) == [f"i{n:04d}" for n in range(6, 16)] and cursor == "i0006"
    page, cursor = await store.history_page(cid, limit=10, before=cursor)
    assert ids(page) == [f"i{n:04d}" for n in range(1, 6)] and cursor is None
    assert await store.history_page(cid, limit=10, before="i0001") == ([], None)
    assert ids((await store.history_page(cid, limit=1000))[0]) == ids(await store.history(cid))
    # exactly a page's worth left: no cursor
    page, cursor = await store.history_page(cid, limit=5, before="i0006")
    assert ids(page) == [f"i{n:04d}" for n in range(1, 6)] and cursor is None
    page, cursor = await store.history_page(cid, limit=1, before="i0002")
    assert ids(page) == ["i0001"] and cursor is None


async def test_history_pages_concatenate_to_history(store):
    cid = await store.create(OWNER)
    # 30 items, several in one millisecond (the Agent Runtime lists times in milliseconds)
    for n in range(1, 31):
        await store.append(cid, item(n, at=f"2026-11-24T10:00:{n // 12:02d}.{(n % 12) * 83:06d}Z"))
    whole = await store.history(cid)
    for limit in (1, 4, 7, 30):
        pages, cursor = [], None
        while True:
            page, cursor = await store.history_page(cid, limit=limit, before=cursor)
            assert 1 <= len(page) <= limit
            pages[:0] = page
            if cursor is None:
                break
            assert cursor == page[0].item_id
        assert pages == whole, limit


async def test_history_page_arguments(store):
    cid = await store.create(OWNER)
    await store.append(cid, item(1))
    for limit in (0, 1001, -1, True, 2.0):
        with pytest.raises(ValueError):
            await store.history_page(cid, limit=limit)
    with pytest.raises(ValueError):
        await store.history_page(cid, limit=10, before="no-such-item")
    assert await store.history_page(cid, limit=1000) == ([item(1)], None)
    empty = await store.create(OWNER)
    assert await store.history_page(empty, limit=10) == ([], None)


async def test_a_tool_item_from_a_taken_over_connection_is_still_stored(store, new_store):
    """A tool that ran on the old connection happened: its record is stored after the take-over (the new
    session reads it back), but not after a revocation or the end of the conversation."""
    cid = await store.create(OWNER)
    await store.take(cid, "conn-a")
    await store.append(cid, item(1), connection_id="conn-a", epoch=0)
    await new_store().take(cid, "conn-b")
    tool = Item("t0002", "tool", '{"name":"lookup","status":"finished","result":{"answer":1}}', "2026-11-24T10:00:02Z")
    await gone("taken_over", store.append(cid, item(3), connection_id="conn-a", epoch=0))
    assert await store.append(cid, tool, connection_id="conn-a", epoch=0) == cid
    assert ids((await new_store().load(cid)).items) == ["i0001", "t0002"]
    epoch = await new_store().revoke(cid)
    late = Item("t0004", "tool", tool.text, "2026-11-24T10:00:04Z")
    await gone("revoked", store.append(cid, late, connection_id="conn-a", epoch=epoch - 1))


async def test_usage_ledger_adds_up_per_owner_and_period_across_instances(store, new_store):
    """A user's spend (the budget, docs/usage.md) adds up over conversations and connections, as another
    instance of the store sees it; other owners, other periods and deleted conversations keep theirs."""
    alice, bob = "a1" * 32, "b2" * 32
    c1, c2, c3 = await store.create(alice), await store.create(alice), await store.create(bob)
    await store.add_usage(alice, "2026-11-30", c1, 1000, 0.25)
    await store.add_usage(alice, "2026-11-30", c1, 500, 0.125)   # the same conversation again: added
    await store.add_usage(alice, "2026-11-30", c2, 100, 0.5)
    await store.add_usage(alice, "2026-11-29", c2, 100, 7.0)     # another period
    await store.add_usage(bob, "2026-11-30", c3, 100, 3.0)
    other = new_store()
    assert await other.spent(alice, "2026-11-30") == pytest.approx(0.875)
    assert await other.spent(bob, "2026-11-30") == pytest.approx(3.0)
    assert await other.spent("c3" * 32, "2026-11-30") == 0.0
    await store.delete(c1)  # erasing a conversation does not refund what it spent
    assert await other.spent(alice, "2026-11-30") == pytest.approx(0.875)
    assert await other.spent(alice, "2026-11-29") == pytest.approx(7.0)
