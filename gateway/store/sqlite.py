"""The SQLite conversation store: the default, a single file in WAL mode.

One connection per store, used from one worker thread, so the event loop never waits on disk and
writes are serialised. Several processes may share the file (busy timeout, WAL); the checks of an
append, `take` and `revoke` run inside one write transaction (BEGIN IMMEDIATE), so they are atomic
across processes too.

The database holds transcripts: its directory is created 0700 and its file 0600 (SQLite gives the
-wal and -shm files the database file's mode). An existing file that others may read is used, with
a warning. Databases from before the epoch, live and active_at columns are migrated when opened
(`active_at`, the time of a conversation's last create, take or append in seconds since the epoch, is
0 for what was written before: such a conversation is never "recent" to `find_recent`).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import sqlite3
import stat
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from protocol.items import Item

from ..logs import log
from .base import (
    LOAD_MAX_BYTES, LOAD_MAX_ITEMS, ConversationGone, StoredConversation, StoreError, check_connection_id, check_page_limit,
    check_writable,
)

logger = logging.getLogger("novagate.store")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    ended INTEGER NOT NULL DEFAULT 0,
    epoch INTEGER NOT NULL DEFAULT 0,
    live TEXT NOT NULL DEFAULT '',
    active_at REAL NOT NULL DEFAULT 0
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
CREATE TABLE IF NOT EXISTS usage (
    owner TEXT NOT NULL,
    period TEXT NOT NULL,
    conversation_id TEXT NOT NULL,
    tokens INTEGER NOT NULL DEFAULT 0,
    cost_usd REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (owner, period, conversation_id)
);
"""

# columns added since the first schema: (table, column, declaration), applied when missing
_MIGRATIONS = (
    ("conversations", "epoch", "INTEGER NOT NULL DEFAULT 0"),
    ("conversations", "live", "TEXT NOT NULL DEFAULT ''"),
    ("conversations", "active_at", "REAL NOT NULL DEFAULT 0"),
)
# indexes on migrated columns: created once the migrations have run
_INDEXES = (
    "CREATE INDEX IF NOT EXISTS conversations_by_owner ON conversations (owner, active_at)",
)


@contextmanager
def _write(db: sqlite3.Connection) -> Iterator[None]:
    """One write transaction, taken up front (BEGIN IMMEDIATE): what it reads cannot change under it."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _create_schema(db: sqlite3.Connection) -> None:
    """Tables, index and migrations in one write transaction: processes opening the file at once take
    turns (a read that turns into a write could fail at once with "database is locked" instead)."""
    with _write(db):
        for statement in filter(str.strip, _SCHEMA.split(";")):
            db.execute(statement)
        for table, column, decl in _MIGRATIONS:
            have = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
            if column not in have:
                db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")
                log(logger, logging.INFO, "sqlite schema migrated", table=table, column=column)
        for statement in _INDEXES:
            db.execute(statement)


def _prepare_file(path: str) -> None:
    """Create the directory (0700) and the database file (0600) if missing; warn about loose ones."""
    if path == ":memory:" or path.startswith("file:") or not path:
        return
    db = Path(path)
    if not db.parent.exists():
        db.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        os.close(os.open(db, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
        return  # new: -wal and -shm will get the same mode
    except FileExistsError:
        pass
    for f in (db, Path(path + "-wal"), Path(path + "-shm")):
        try:
            mode = stat.S_IMODE(f.stat().st_mode)
        except FileNotFoundError:
            continue
        if mode & 0o077:
            log(logger, logging.WARNING, "sqlite database file is accessible to other users; chmod 600 it",
                path=str(f), mode=oct(mode))


class SQLiteStore:
    name = "sqlite"

    def __init__(self, path: str):
        self.path = path
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite")
        self._db: sqlite3.Connection | None = None

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            _prepare_file(self.path)
            db = sqlite3.connect(self.path, timeout=10, isolation_level=None, check_same_thread=False)
            try:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=FULL")
                db.execute("PRAGMA foreign_keys=ON")
                db.execute("PRAGMA busy_timeout=10000")
                _create_schema(db)
            except BaseException:
                db.close()
                raise
            self._db = db
        return self._db

    async def _run(self, fn, *args):
        def call():
            try:
                return fn(self._conn(), *args)
            except sqlite3.Error as e:
                raise StoreError(f"sqlite: {e}") from e

        return await asyncio.get_running_loop().run_in_executor(self._pool, call)

    @staticmethod
    def _head(db: sqlite3.Connection, conversation_id: str):
        """(ended, epoch, live) of the conversation, or None."""
        return db.execute("SELECT ended, epoch, live FROM conversations WHERE id = ?", (conversation_id,)).fetchone()

    async def create(self, owner: str) -> str:
        cid = str(uuid.uuid4())
        await self._run(lambda db: db.execute("INSERT INTO conversations (id, owner, active_at) VALUES (?, ?, ?)",
                                              (cid, owner, time.time())))
        return cid

    async def find_recent(self, owner: str, within_s: float) -> str | None:
        if within_s <= 0:
            return None

        def q(db: sqlite3.Connection):
            row = db.execute("SELECT id FROM conversations WHERE owner = ? AND ended = 0 AND active_at >= ? "
                             "ORDER BY active_at DESC LIMIT 1", (owner, time.time() - within_s)).fetchone()
            return row[0] if row else None

        return await self._run(q)

    async def load(self, conversation_id: str, *, max_bytes: int = LOAD_MAX_BYTES,
                   max_items: int = LOAD_MAX_ITEMS, owner: str | None = None) -> StoredConversation | None:
        def q(db: sqlite3.Connection):
            row = db.execute("SELECT owner, ended, epoch, live FROM conversations WHERE id = ?",
                             (conversation_id,)).fetchone()
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
            return StoredConversation(conversation_id, row[0], bool(row[1]), items, total, row[2], row[3])

        return await self._run(q)

    async def append(self, conversation_id: str, item: Item, *, connection_id: str = "",
                     epoch: int | None = None) -> str:
        def q(db: sqlite3.Connection):
            with _write(db):
                head = self._head(db, conversation_id)
                ended, stored_epoch, live = head if head is not None else (0, 0, "")
                check_writable(conversation_id, exists=head is not None, ended=bool(ended), stored_epoch=stored_epoch,
                               live=live, epoch=epoch, connection_id=connection_id, role=item.role)
                db.execute(
                    "INSERT OR IGNORE INTO items (conversation_id, item_id, role, text, at, interrupted, size) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (conversation_id, item.item_id, item.role, item.text, item.at, int(item.interrupted), item.size),
                )
                db.execute("UPDATE conversations SET active_at = ? WHERE id = ?", (time.time(), conversation_id))

        await self._run(q)
        return conversation_id

    async def take(self, conversation_id: str, connection_id: str) -> int:
        check_connection_id(connection_id)

        def q(db: sqlite3.Connection) -> int:
            with _write(db):
                head = self._head(db, conversation_id)
                check_writable(conversation_id, exists=head is not None, ended=bool(head and head[0]))
                db.execute("UPDATE conversations SET live = ?, active_at = ? WHERE id = ?",
                           (connection_id, time.time(), conversation_id))
                return head[1]

        return await self._run(q)

    async def revoke(self, conversation_id: str) -> int:
        def q(db: sqlite3.Connection) -> int:
            with _write(db):
                head = self._head(db, conversation_id)
                check_writable(conversation_id, exists=head is not None, ended=bool(head and head[0]))
                db.execute("UPDATE conversations SET epoch = epoch + 1, live = '' WHERE id = ?", (conversation_id,))
                return head[1] + 1

        return await self._run(q)

    async def end(self, conversation_id: str) -> None:
        await self._run(lambda db: db.execute("UPDATE conversations SET ended = 1 WHERE id = ?", (conversation_id,)))

    async def add_usage(self, owner: str, period: str, conversation_id: str, tokens: int, cost_usd: float) -> None:
        await self._run(lambda db: db.execute(
            "INSERT INTO usage (owner, period, conversation_id, tokens, cost_usd) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (owner, period, conversation_id) DO UPDATE SET tokens = tokens + excluded.tokens, "
            "cost_usd = cost_usd + excluded.cost_usd", (owner, period, conversation_id, tokens, cost_usd)))

    async def spent(self, owner: str, period: str) -> float:
        row = await self._run(lambda db: db.execute(
            "SELECT coalesce(sum(cost_usd), 0) FROM usage WHERE owner = ? AND period = ?", (owner, period)).fetchone())
        return float(row[0])

    async def delete(self, conversation_id: str) -> None:
        # items go with it (ON DELETE CASCADE), in one statement; its usage stays (the user spent it)
        await self._run(lambda db: db.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,)))

    async def history(self, conversation_id: str) -> list[Item]:
        def q(db: sqlite3.Connection):
            cur = db.execute(
                "SELECT item_id, role, text, at, interrupted FROM items WHERE conversation_id = ? ORDER BY at, seq",
                (conversation_id,),
            )
            return [Item(i, r, t, a, bool(x)) for i, r, t, a, x in cur]

        return await self._run(q)

    async def history_page(self, conversation_id: str, *, limit: int,
                           before: str | None = None) -> tuple[list[Item], str | None]:
        check_page_limit(limit)

        def q(db: sqlite3.Connection):
            where, args = "conversation_id = ?", [conversation_id]
            if before is not None:
                cursor = db.execute("SELECT at, seq FROM items WHERE conversation_id = ? AND item_id = ?",
                                    (conversation_id, before)).fetchone()
                if cursor is None:
                    if self._head(db, conversation_id) is None:
                        return [], None
                    raise ValueError(f"{before!r} is not an item of conversation {conversation_id}")
                where += " AND (at < ? OR (at = ? AND seq < ?))"
                args += [cursor[0], cursor[0], cursor[1]]
            rows = db.execute(
                f"SELECT item_id, role, text, at, interrupted FROM items WHERE {where} "
                "ORDER BY at DESC, seq DESC LIMIT ?",
                (*args, limit + 1),
            ).fetchall()
            items = [Item(i, r, t, a, bool(x)) for i, r, t, a, x in reversed(rows[:limit])]
            return items, (items[0].item_id if len(rows) > limit else None)

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
