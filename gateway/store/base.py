"""The conversation-store interface.

A conversation has an id, an owner (a hash; callers compare, stores never interpret), an ended
flag and an ordered list of items. Appends are idempotent by item_id so a retried write or a
replayed receipt never doubles an item. `load` returns only the newest items that fit a byte
budget, plus the total count: a resume never reads the whole history.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from protocol.items import Item
from protocol.nova_events import MAX_HISTORY_BYTES

LOAD_MAX_ITEMS = 500  # the most items `load` returns by default


class StoreError(Exception):
    """The store could not do it now (unreachable, throttled, ...); the write may be retried."""


@dataclass(frozen=True, slots=True)
class StoredConversation:
    """What `ConversationStore.load` returns."""

    conversation_id: str
    owner: str
    ended: bool
    items: list[Item]       # the newest items within the budget, oldest first
    total: int              # how many items the conversation has in all


class ConversationStore(Protocol):
    name: str

    async def create(self, owner: str) -> str:
        """A new conversation; returns its id."""

    async def load(self, conversation_id: str, *, max_bytes: int = MAX_HISTORY_BYTES,
                   max_items: int = LOAD_MAX_ITEMS, owner: str | None = None) -> StoredConversation | None:
        """The conversation with its newest items (text bytes <= max_bytes, at least the newest one), or
        None. With `owner`, another owner's conversation is None too, and loading it changes nothing."""

    async def append(self, conversation_id: str, item: Item, *, connection_id: str = "") -> str:
        """Store an item once (deduplicated by item_id), durably, before returning. Returns the id of
        the conversation it was written to: a store may move a conversation it can no longer write
        (an expired Agent Runtime session) to a new one that carries the history."""

    async def end(self, conversation_id: str) -> None:
        """Mark ended: it can no longer be resumed."""

    async def delete(self, conversation_id: str) -> None:
        """Erase the conversation and its items."""

    async def history(self, conversation_id: str) -> list[Item]:
        """Every item, oldest first."""

    async def ready(self) -> bool:
        """Whether the store answers now (for /readyz)."""

    async def aclose(self) -> None: ...


def open_store(settings) -> ConversationStore:
    if settings.store == "sqlite":
        from .sqlite import SQLiteStore

        return SQLiteStore(settings.sqlite_path)
    if settings.store == "agent-runtime":
        from .agent_runtime import AgentRuntimeStore

        return AgentRuntimeStore(region=settings.aws_region, endpoint_url=settings.agent_runtime_endpoint or None)
    raise ValueError(f"unknown store {settings.store!r}")
