"""The SQLite conversation store: the default, a single file in WAL mode.

One connection per store, used from one worker thread, so the event loop never waits on disk and
writes are serialised. Several processes may share the file (busy timeout, WAL).
"""

from __future__ import annotations

import asyncio
import hmac
import sqlite3
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from protocol.items import Item
from protocol.nova_events import MAX_HISTORY_BYTES

from .base import LOAD_MAX_ITEMS, StoredConversation, StoreError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    ended INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS items (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    item_id TEXT NOT NULL,
    role TEXT NOT NULL,
    text TEXT NOT NULL,
    at TEXT NOT NULL,
    interrupted INTEGER NOT NULL DEFAULT 0,
    size INTEGER NOT NULL,
    UNIQUE (conversation_id, item_id)
);
CREATE INDEX IF NOT EXISTS items_by_time ON items (conversation_id, at, seq);
"""


class SQLiteStore:
    name = "sqlite"

    def __init__(self, path: str):
        self.path = path
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite")
        self._db: sqlite3.Connection | None = None

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            if self.path != ":memory:":
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, timeout=10, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=ON")
            db.execute("PRAGMA busy_timeout=10000")
            db.executescript(_SCHEMA)
            self._db = db
        return self._db

    async def _run(self, fn, *args):
        def call():
            try:
                return fn(self._conn(), *args)
            except sqlite3.Error as e:
                raise StoreError(f"sqlite: {e}") from e

        return await asyncio.get_running_loop().run_in_executor(self._pool, call)

    async def create(self, owner: str) -> str:
        cid = str(uuid.uuid4())
        await self._run(lambda db: db.execute("INSERT INTO conversations (id, owner) VALUES (?, ?)", (cid, owner)))
        return cid

    async def load(self, conversation_id: str, *, max_bytes: int = MAX_HISTORY_BYTES,
                   max_items: int = LOAD_MAX_ITEMS, owner: str | None = None) -> StoredConversation | None:
        def q(db: sqlite3.Connection):
            row = db.execute("SELECT owner, ended FROM conversations WHERE id = ?", (conversation_id,)).fetchone()
            if row is None or (owner is not None and not hmac.compare_digest(row[0], owner)):
                return None
            total = db.execute("SELECT count(*) FROM items WHERE conversation_id = ?", (conversation_id,)).fetchone()[0]
            items: list[Item] = []
            used = 0
            cur = db.execute(
                "SELECT item_id, role, text, at, interrupted, size FROM items WHERE conversation_id = ? "
                "ORDER BY at DESC, seq DESC LIMIT ?",
                (conversation_id, max_items),
            )
            for item_id, role, text, at, interrupted, size in cur:
                if items and used + size > max_bytes:
                    break
                used += size
                items.append(Item(item_id, role, text, at, bool(interrupted)))
            items.reverse()
            return StoredConversation(conversation_id, row[0], bool(row[1]), items, total)

        return await self._run(q)

    async def append(self, conversation_id: str, item: Item, *, connection_id: str = "") -> str:
        await self._run(lambda db: db.execute(
            "INSERT OR IGNORE INTO items (conversation_id, item_id, role, text, at, interrupted, size) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (conversation_id, item.item_id, item.role, item.text, item.at, int(item.interrupted), item.size),
        ))
        return conversation_id

    async def end(self, conversation_id: str) -> None:
        await self._run(lambda db: db.execute("UPDATE conversations SET ended = 1 WHERE id = ?", (conversation_id,)))

    async def delete(self, conversation_id: str) -> None:
        # items go with it (ON DELETE CASCADE), in one statement
        await self._run(lambda db: db.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,)))

    async def history(self, conversation_id: str) -> list[Item]:
        def q(db: sqlite3.Connection):
            cur = db.execute(
                "SELECT item_id, role, text, at, interrupted FROM items WHERE conversation_id = ? ORDER BY at, seq",
                (conversation_id,),
            )
            return [Item(i, r, t, a, bool(x)) for i, r, t, a, x in cur]

        return await self._run(q)

    async def ready(self) -> bool:
        try:
            await self._run(lambda db: db.execute("SELECT 1").fetchone())
            return True
        except StoreError:
            return False

    async def aclose(self) -> None:
        def close(_db):
            if self._db is not None:
                self._db.close()
                self._db = None

        await asyncio.get_running_loop().run_in_executor(self._pool, lambda: close(None))
        self._pool.shutdown(wait=True)
