"""Time and ids for the sans-I/O core, which has neither: the gateway passes these in."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime

monotonic = time.monotonic
wall_time = time.time


def new_id(prefix: str) -> str:
    """`<prefix>_<32 hex>`: unique and unguessable (uuid4 is 122 random bits)."""
    return f"{prefix}_{uuid.uuid4().hex}"


def utc_now() -> str:
    """RFC 3339 UTC with microseconds, so items sort by time as strings."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def budget_period(kind: str, at: float | None = None) -> str:
    """The UTC day ("2026-11-30") or month ("2026-11") a budget counts in (NOVAGATE_USER_BUDGET_PERIOD)."""
    return datetime.fromtimestamp(wall_time() if at is None else at, UTC).strftime(
        "%Y-%m-%d" if kind == "day" else "%Y-%m")
