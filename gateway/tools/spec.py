"""What a tool is to the gateway, whatever its source, and the names the model sees.

Nova tool names must match `[A-Za-z0-9_-]{1,64}`. A tool keeps the name its source gives it; other
characters become `_`. When two sources name a tool alike, the first (in load order: MCP servers as
listed in the config, then Python specs as listed) keeps the name and each later one becomes
`<prefix>_<name>` (prefix: the server's name, or the Python module's last component). A name still
taken after that is a start-up error: the operator must rename something."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .results import ToolResult

MAX_NAME = 64
_INVALID = re.compile(r"[^A-Za-z0-9_-]")
# keys of a JSON Schema whose values are data, not schemas: their "title" keys are left alone
_DATA_KEYS = frozenset({"default", "enum", "const", "examples"})
_NAMED_SCHEMAS = frozenset({"properties", "$defs", "definitions", "patternProperties"})


class ToolSetupError(RuntimeError):
    """A tool source cannot be used; the message names it (server, module) and says why."""


@dataclass(frozen=True, slots=True)
class ToolSpec:
    name: str  # the name the model sees
    description: str
    input_schema: dict  # JSON Schema of the arguments (an object)
    public: bool = False  # arguments and results may be shown to the client
    source: str = ""  # "python:<module>" or "mcp:<server name>"


@dataclass(frozen=True, slots=True)
class SourceTool:
    """A tool as its source offers it, before naming: `invoke` runs it with the model's arguments
    and returns a ToolResult for every failure of the tool (it raises only on cancellation)."""

    name: str  # as the source names it
    description: str
    input_schema: dict
    public: bool
    source: str
    prefix: str  # prepended on a name clash
    invoke: Callable[[dict], Awaitable[ToolResult]]


def sanitize(name: str) -> str:
    """A Nova-valid name: other characters become `_`, at most 64 characters."""
    return _INVALID.sub("_", name)[:MAX_NAME] or "tool"


def assign_names(tools: Iterable[SourceTool]) -> list[tuple[str, SourceTool]]:
    """The model-facing name of each tool, in order (see the module docstring)."""
    taken: dict[str, str] = {}
    named: list[tuple[str, SourceTool]] = []
    for tool in tools:
        name = sanitize(tool.name)
        if name in taken:
            prefixed = sanitize(f"{tool.prefix}_{tool.name}")
            if prefixed in taken:
                raise ToolSetupError(
                    f"tool {tool.name!r} of {tool.source} clashes with {taken[name]}, and {prefixed!r} is taken "
                    f"too (by {taken[prefixed]}): rename a tool or a server"
                )
            name = prefixed
        taken[name] = f"{tool.name!r} of {tool.source}"
        named.append((name, tool))
    return named


def strip_titles(schema: Any) -> Any:
    """A JSON Schema without its "title"s: pydantic titles every schema ("Doctor", "record_callArguments"),
    words in the model's prompt that tell it nothing the names do not."""
    if isinstance(schema, dict):
        out = {}
        for key, value in schema.items():
            if key == "title" and isinstance(value, str):
                continue
            if key in _NAMED_SCHEMAS and isinstance(value, dict):
                out[key] = {name: strip_titles(sub) for name, sub in value.items()}
            elif key in _DATA_KEYS:
                out[key] = value
            else:
                out[key] = strip_titles(value)
        return out
    if isinstance(schema, list):
        return [strip_titles(item) for item in schema]
    return schema
