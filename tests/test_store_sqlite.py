"""The SQLite store: a real file, idempotent appends, budgeted loads, ownership data, two processes."""

import asyncio

from gateway.store import StoredConversation
from gateway.store.sqlite import SQLiteStore
from protocol.items import Item


def item(n, role="user", text=None, at=None):
    return Item(f"i{n:04d}", role, text or f"message {n}", at or f"2026-11-24T10:{n // 60:02d}:{n % 60:02d}.000000Z")


async def test_append_is_idempotent_and_ordered(tmp_path):
    store = SQLiteStore(str(tmp_path / "s.db"))
    cid = await store.create("owner-hash")
    assert await store.append(cid, item(2)) == cid
    assert await store.append(cid, item(1)) == cid  # an older receipt replayed later
    assert await store.append(cid, item(2)) == cid  # a duplicate: ignored
    conv = await store.load(cid)
    assert isinstance(conv, StoredConversation)
    assert conv.owner == "owner-hash" and not conv.ended and conv.total == 2
    assert [i.item_id for i in conv.items] == ["i0001", "i0002"]  # by time, not arrival
    await store.aclose()


async def test_load_keeps_newest_within_budget(tmp_path):
    store = SQLiteStore(str(tmp_path / "s.db"))
    cid = await store.create("o")
    for n in range(1, 200):
        await store.append(cid, item(n, "user" if n % 2 else "assistant", "x" * 1000))
    conv = await store.load(cid, max_bytes=10_000)
    assert conv.total == 199 and len(conv.items) == 10
    assert conv.items[-1].item_id == "i0199"
    assert len(await store.history(cid)) == 199
    big = await store.create("o")
    await store.append(big, item(1, text="y" * 50_000))
    assert len((await store.load(big, max_bytes=1000)).items) == 1  # at least the newest one
    await store.aclose()


async def test_end_delete_and_missing(tmp_path):
    store = SQLiteStore(str(tmp_path / "s.db"))
    cid = await store.create("o")
    await store.append(cid, item(1))
    await store.end(cid)
    assert (await store.load(cid)).ended
    await store.delete(cid)
    assert await store.load(cid) is None and await store.history(cid) == []
    assert await store.load("nope") is None
    assert await store.ready()
    await store.aclose()


async def test_two_stores_share_one_file(tmp_path):
    a, b = SQLiteStore(str(tmp_path / "s.db")), SQLiteStore(str(tmp_path / "s.db"))
    cid = await a.create("o")
    await asyncio.gather(*(x.append(cid, item(n)) for n in range(1, 41) for x in (a, b)))
    assert (await b.load(cid)).total == 40
    await a.aclose()
    await b.aclose()
