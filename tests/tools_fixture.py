"""Python tools for tests/test_tools.py (NOVAGATE_TOOLS=tests.tools_fixture:TOOLS)."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel

from gateway.tools import public


@dataclass
class Visit:
    doctor: str
    minutes: int
    tags: list[str]


class Product(BaseModel):
    name: str
    price: float


def add_visit(doctor: str, minutes: int = 15, tags: list[str] | None = None,
              kind: Literal["in person", "phone"] = "in person") -> Visit:
    """Record a visit to a doctor.

    This second paragraph is for readers of the code, not for the model.

    Args:
        doctor: The doctor's full name.
        minutes: How long the visit took,
            in minutes.
        tags (list[str]): Free labels.
        kind: How the visit happened.

    Returns:
        The visit as recorded.
    """
    return Visit(doctor=doctor, minutes=minutes, tags=tags or [])


@public
async def lookup_product(name: str) -> Product:
    """Look up a product's price."""
    await asyncio.sleep(0)
    return Product(name=name, price=12.5)


def echo(text: str) -> str:
    """Say the text back: a plain string becomes {"result": ...}."""
    return text


def json_string() -> str:
    """A string that is a JSON object already."""
    return '{"already": "json"}'


def which_thread() -> str:
    """The thread a plain function runs on (never the event loop's)."""
    return threading.current_thread().name


def broken(x: int) -> None:
    """Always raises."""
    raise ValueError(f"no luck with {x}")


TOOLS = [add_visit, lookup_product, echo, json_string, which_thread, broken]
