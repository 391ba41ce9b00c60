"""Conversation items: the unit of history that is shown, stored and replayed to the model."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

Role = Literal["user", "assistant", "tool"]
ROLES = ("user", "assistant", "tool")  # a tool item's text is a JSON record of the call (protocol.tool_calls)


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
