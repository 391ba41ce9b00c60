"""Conversation items: the unit of history that is shown, stored and replayed to the model."""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Literal

Role = Literal["user", "assistant"]


def new_item_id() -> str:
    return "item_" + uuid.uuid4().hex


def utc_now() -> str:
    """RFC 3339 UTC with microseconds, so items sort by time as strings."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True, slots=True)
class Item:
    item_id: str
    role: Role
    text: str
    at: str
    interrupted: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Item:
        return cls(
            item_id=str(d["item_id"]),
            role=d["role"],
            text=str(d["text"]),
            at=str(d["at"]),
            interrupted=bool(d.get("interrupted", False)),
        )

    @property
    def size(self) -> int:
        """Bytes this item's text takes in a Nova history block."""
        return len(self.text.encode("utf-8"))
