"""The SQLite store: a real file, idempotent appends, budgeted loads, ownership data, two processes,
private files, the schema migration. (The contract shared with the other store: test_store_contract.)"""

import asyncio
import logging
import sqlite3
import stat
from pathlib import Path

import pytest

from gateway.store import ConversationGone, StoreError, StoredConversation
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


async def test_append_to_a_deleted_conversation_is_gone_not_retried(tmp_path):
    store = SQLiteStore(str(tmp_path / "s.db"))
    cid = await store.create("o")
    await store.delete(cid)
    # it used to fail on the foreign key, as a StoreError that the caller retried for ever
    with pytest.raises(ConversationGone) as e:
        await store.append(cid, item(1))
    assert e.value.reason == "missing" and not isinstance(e.value, StoreError)
    await store.aclose()


async def test_files_are_private(tmp_path, caplog):
    path = tmp_path / "var" / "db" / "s.db"
    store = SQLiteStore(str(path))
    cid = await store.create("o")
    await store.append(cid, item(1))
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    for f in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    await store.aclose()
    # an existing file that others may read is used, with a warning
    loose = tmp_path / "loose.db"
    loose.touch()
    loose.chmod(0o644)
    caplog.set_level(logging.WARNING, logger="novagate.store")
    store = SQLiteStore(str(loose))
    assert await store.ready()
    assert [r for r in caplog.records if r.getMessage().startswith("sqlite database file is accessible")]
    assert stat.S_IMODE(loose.stat().st_mode) == 0o644  # left as the operator made it
    await store.aclose()


async def test_an_old_database_is_migrated(tmp_path):
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")  # as the store has always made it
    db.executescript("""
        CREATE TABLE conversations (id TEXT PRIMARY KEY, owner TEXT NOT NULL,
            created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')), ended INTEGER NOT NULL DEFAULT 0);
        CREATE TABLE items (seq INTEGER PRIMARY KEY AUTOINCREMENT,
            conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE, item_id TEXT NOT NULL,
            role TEXT NOT NULL, text TEXT NOT NULL, at TEXT NOT NULL, interrupted INTEGER NOT NULL DEFAULT 0,
            size INTEGER NOT NULL, UNIQUE (conversation_id, item_id));
        INSERT INTO conversations (id, owner) VALUES ('old', 'o');
        INSERT INTO items (conversation_id, item_id, role, text, at, size)
            VALUES ('old', 'i0001', 'user', 'hi', '2026-11-24T10:00:01.000000Z', 2);
    """)
    db.commit()
    db.close()
    a, b = SQLiteStore(str(path)), SQLiteStore(str(path))  # two processes open it at once: one migrates
    convs = await asyncio.gather(a.load("old"), b.load("old"))
    assert all((c.epoch, c.live, c.total) == (0, "", 1) for c in convs)
    assert await a.take("old", "conn-a") == 0 and await b.revoke("old") == 1
    assert (await a.load("old")).epoch == 1
    await a.aclose()
    await b.aclose()


async def test_checks_are_atomic_across_processes(tmp_path):
    a, b = SQLiteStore(str(tmp_path / "s.db")), SQLiteStore(str(tmp_path / "s.db"))
    cid = await a.create("o")
    await a.take(cid, "conn-a")

    async def write(n):
        try:
            await a.append(cid, item(n), connection_id="conn-a", epoch=0)
            return True
        except ConversationGone:
            return False

    results = await asyncio.gather(*(write(n) for n in range(1, 21)), b.revoke(cid), *(write(n) for n in range(21, 41)))
    stored = [i.item_id for i in await b.history(cid)]
    written = [f"i{n:04d}" for n, ok in zip([*range(1, 21), *range(21, 41)], results[:20] + results[21:]) if ok]
    assert sorted(stored) == sorted(written)  # each write either passed the check and was stored, or neither
    await a.aclose()
    await b.aclose()
