"""The conversation-store interface.

A conversation has an id, an owner (a hash; callers compare, stores never interpret), an ended
flag, an ordered list of items, a revocation **epoch** and the **live** holder:

- Appends are idempotent by item_id, so a retried write or a replayed receipt never doubles an item.
- `load` returns only the newest items that fit a byte budget, plus the total count: a resume never
  reads the whole history. `history_page` reads older history a page at a time, newest pages first.
- `take(cid, connection_id)` records which connection holds the conversation now (`live`). A write
  from any other connection then fails with ConversationGone("taken_over"): a resume on a new
  device retires the old one at its next write.
- `revoke(cid)` bumps the epoch and clears `live` ("log out everywhere"). Credentials minted with an
  older epoch stop working, and a live session that passes its epoch to `append` learns it there
  (ConversationGone("revoked")).

Two kinds of failure: StoreError ("not now": unreachable, throttled; the caller retries the write
later) and ConversationGone ("never": the conversation was deleted, ended, revoked or taken over;
retrying cannot help, the caller stops writing to it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from protocol.items import Item
from protocol.models import NOVA_2_HISTORY

LOAD_MAX_ITEMS = 500      # the most items `load` returns by default
LOAD_MAX_BYTES = NOVA_2_HISTORY.total_bytes  # and their text: the most history a model takes
PAGE_MAX_ITEMS = 1000     # the most items one `history_page` returns
MAX_CONNECTION_ID = 1000  # the longest connection id `take` accepts (it is stored as metadata)

GoneReason = Literal["missing", "ended", "revoked", "taken_over"]
GONE_REASONS: tuple[GoneReason, ...] = ("missing", "ended", "revoked", "taken_over")


class StoreError(Exception):
    """The store could not do it now (unreachable, throttled, ...); the write may be retried."""


class ConversationGone(Exception):
    """The conversation can no longer be written by this caller; retrying cannot help. `reason`:

    - "missing": it does not exist (never did, or was deleted);
    - "ended": it was ended (`end`) and can no longer be resumed or written;
    - "revoked": the caller's epoch is not the conversation's (it was revoked since);
    - "taken_over": another connection holds it now (`take`).

    Deliberately not a StoreError: a write queue that retries StoreErrors must drop this one.
    """

    def __init__(self, reason: GoneReason, conversation_id: str = ""):
        if reason not in GONE_REASONS:
            raise ValueError(f"unknown reason {reason!r}")
        super().__init__(f"conversation {conversation_id or '?'} is gone: {reason}")
        self.reason: GoneReason = reason
        self.conversation_id = conversation_id


def check_writable(conversation_id: str, *, exists: bool, ended: bool = False, stored_epoch: int = 0,
                   live: str = "", epoch: int | None = None, connection_id: str = "", role: str = "") -> None:
    """The append rule, in its order: raise ConversationGone if a write with this `epoch` and
    `connection_id` must be refused (missing, ended, revoked, taken_over). A tool item is the one
    exception to taken_over: a tool that ran on a connection since taken over still happened, and the
    session that took over reads it back (protocol/session.py)."""
    if not exists:
        raise ConversationGone("missing", conversation_id)
    if ended:
        raise ConversationGone("ended", conversation_id)
    if epoch is not None and epoch != stored_epoch:
        raise ConversationGone("revoked", conversation_id)
    if connection_id and live and live != connection_id and role != "tool":
        raise ConversationGone("taken_over", conversation_id)


def check_connection_id(connection_id: str) -> None:
    if not isinstance(connection_id, str) or not 1 <= len(connection_id) <= MAX_CONNECTION_ID:
        raise ValueError(f"connection_id must be 1..{MAX_CONNECTION_ID} characters")


def check_page_limit(limit: int) -> None:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= PAGE_MAX_ITEMS:
        raise ValueError(f"limit must be an integer in 1..{PAGE_MAX_ITEMS}")


@dataclass(frozen=True, slots=True)
class StoredConversation:
    """What `ConversationStore.load` returns."""

    conversation_id: str
    owner: str
    ended: bool
    items: list[Item]       # the newest items within the budget, oldest first
    total: int              # how many items the conversation has in all
    epoch: int = 0          # the revocation epoch: `revoke` bumps it
    live: str = ""          # the connection that holds it now (`take`), "" when none does


class ConversationStore(Protocol):
    name: str

    async def create(self, owner: str) -> str:
        """A new conversation (epoch 0, held by no one); returns its id."""

    async def load(self, conversation_id: str, *, max_bytes: int = LOAD_MAX_BYTES,
                   max_items: int = LOAD_MAX_ITEMS, owner: str | None = None) -> StoredConversation | None:
        """The conversation with its newest items (text bytes <= max_bytes, at least the newest one), its
        epoch and live holder, or None. With `owner`, another owner's conversation is None too, and
        loading it reads none of its history and changes nothing."""

    async def append(self, conversation_id: str, item: Item, *, connection_id: str = "",
                     epoch: int | None = None) -> str:
        """Store an item once (deduplicated by item_id), durably, before returning. Returns the id of
        the conversation it was written to: a store may move a conversation it can no longer write
        (an expired Agent Runtime session) to a new one that carries the history.

        Raises ConversationGone, and stores nothing, when the conversation is missing, ended, has an
        epoch other than `epoch` (when given: "revoked"), or is held by a connection other than
        `connection_id` (when given and someone holds it: "taken_over"). StoreError: retry later."""

    async def find_recent(self, owner: str, within_s: float) -> str | None:
        """The id of `owner`'s newest conversation that is not ended and was active (created, held or
        written) within the last `within_s` seconds, or None (always None for `within_s` <= 0). `owner`
        is what `create` was given (a hash). For callers known without a resume token, such as a phone
        number (gateway/telephony.py): a call back within the window goes on with the conversation,
        on any instance. A store may bound its search (see its docstring): what it does not find
        counts as none, and the caller starts a new conversation. StoreError: not now."""

    async def add_usage(self, owner: str, period: str, conversation_id: str, tokens: int, cost_usd: float) -> None:
        """Add to what `owner` (a hash) spent in `period` (a UTC day "2026-11-30" or month "2026-11"),
        used in `conversation_id`. Kept when the conversation is deleted. StoreError: not recorded."""

    async def spent(self, owner: str, period: str) -> float:
        """What `owner` spent in `period` (US dollars), across conversations and instances, as far as the
        store can tell (see its docstring). StoreError: not now."""

    async def take(self, conversation_id: str, connection_id: str) -> int:
        """`connection_id` holds the conversation from now on (writes from other connections are refused
        as "taken_over"). Returns the epoch. Raises ConversationGone("missing" or "ended")."""

    async def revoke(self, conversation_id: str) -> int:
        """Bump the epoch and clear the live holder; returns the new epoch. Raises
        ConversationGone("missing" or "ended")."""

    async def end(self, conversation_id: str) -> None:
        """Mark ended: it can no longer be resumed."""

    async def delete(self, conversation_id: str) -> None:
        """Erase the conversation and its items."""

    async def history(self, conversation_id: str) -> list[Item]:
        """Every item, oldest first ([] for a missing conversation)."""

    async def history_page(self, conversation_id: str, *, limit: int,
                           before: str | None = None) -> tuple[list[Item], str | None]:
        """The newest `limit` (1..PAGE_MAX_ITEMS) items older than the item whose id is `before` (of all
        items when None), oldest first, and the cursor for the next, older page: the item_id of the
        oldest item returned, or None when nothing is older. Pages follow `history`'s order, so
        concatenated they are `history`. A missing conversation is ([], None); a `before` that is not
        one of its items raises ValueError."""

    async def ready(self) -> bool:
        """Whether the store answers now (for /readyz)."""

    async def aclose(self) -> None: ...


def open_store(settings) -> ConversationStore:
    if settings.store == "sqlite":
        from .sqlite import SQLiteStore

        return SQLiteStore(settings.sqlite_path)
    if settings.store == "agent-runtime":
        from .agent_runtime import AgentRuntimeStore

        return AgentRuntimeStore(region=settings.aws_region, endpoint_url=settings.agent_runtime_endpoint or None,
                                 kms_key_arn=settings.agent_runtime_kms_key_arn or None)
    raise ValueError(f"unknown store {settings.store!r}")
