"""The tools a session may offer the model, from every configured source, under their final names;
the one place a call is dispatched, so every failure becomes a JSON error result the model can read."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import orjson

from ..logs import log
from .mcp_config import STARTUP_TIMEOUT_S, load_config
from .python_source import load_python_tools
from .results import INVALID_ARGUMENTS, TOOL_ERROR, UNKNOWN_TOOL, ToolResult, failure
from .spec import SourceTool, ToolSetupError, ToolSpec, assign_names

logger = logging.getLogger("novagate.tools")


class ToolBox:
    """Tools by name. `ToolBox()` has none (EMPTY); `open_toolbox` builds the configured one."""

    def __init__(self, tools: Iterable[SourceTool] = (),
                 closers: Sequence[Callable[[], Awaitable[None]]] = ()) -> None:
        named = assign_names(tools)
        self._tools: dict[str, SourceTool] = {name: tool for name, tool in named}
        self.specs: tuple[ToolSpec, ...] = tuple(
            ToolSpec(name=name, description=tool.description, input_schema=tool.input_schema, public=tool.public,
                     source=tool.source)
            for name, tool in named
        )
        self._by_name = {spec.name: spec for spec in self.specs}
        self._nova = [
            {"toolSpec": {"name": s.name, "description": s.description,
                          "inputSchema": {"json": orjson.dumps(s.input_schema).decode()}}}
            for s in self.specs
        ]
        self._closers = list(closers)

    def __len__(self) -> int:  # so `if toolbox:` reads "are there tools to offer"
        return len(self.specs)

    def get(self, name: str) -> ToolSpec | None:
        return self._by_name.get(name)

    def nova_tools(self) -> list[dict]:
        """promptStart.toolConfiguration.tools (the schema as a JSON string, as Nova wants it)."""
        return [{"toolSpec": {**t["toolSpec"], "inputSchema": dict(t["toolSpec"]["inputSchema"])}} for t in self._nova]

    async def call(self, name: str, arguments: dict | str | None) -> ToolResult:
        """Run a tool. Every failure is a result (ok=False, a JSON error object), never an exception;
        cancelling the caller cancels the call (an MCP request is cancelled on the server too)."""
        tool = self._tools.get(name)
        if tool is None:
            known = ", ".join(s.name for s in self.specs) or "none"
            return failure(UNKNOWN_TOOL, f"no tool named {name!r} (tools: {known})")
        if arguments is None:
            arguments = {}
        elif isinstance(arguments, (str, bytes)):  # Nova's toolUse content is the arguments' JSON text
            try:
                arguments = orjson.loads(arguments) if arguments.strip() else {}
            except orjson.JSONDecodeError as e:
                return failure(INVALID_ARGUMENTS, f"the arguments are not valid JSON: {e}")
        if not isinstance(arguments, dict):
            return failure(INVALID_ARGUMENTS, "the arguments must be a JSON object")
        try:
            return await tool.invoke(arguments)
        except Exception as e:  # a source's own bug: still an answer the model can read
            log(logger, logging.ERROR, "tool call failed unexpectedly", tool=name, source=tool.source,
                error=type(e).__name__, exc_info=True)
            return failure(TOOL_ERROR, f"{type(e).__name__}: {e}")

    async def aclose(self) -> None:
        """Stop MCP servers and sessions (idempotent)."""
        closers, self._closers = self._closers, []
        for close in reversed(closers):
            try:
                await close()
            except Exception:
                log(logger, logging.WARNING, "closing a tool source failed", exc_info=True)

    def summary(self) -> list[str]:
        """One line per tool: `name(param, optional?)  source  public|private`."""
        if not self.specs:
            return []
        heads = [f"{s.name}({', '.join(_parameters(s.input_schema))})" for s in self.specs]
        width = max(len(h) for h in heads)
        src_width = max(len(s.source) for s in self.specs)
        return [f"{head:<{width}}  {s.source:<{src_width}}  {'public' if s.public else 'private'}"
                for head, s in zip(heads, self.specs)]


def _parameters(schema: dict[str, Any]) -> list[str]:
    properties = schema.get("properties") or {}
    required = set(schema.get("required") or ())
    return [p if p in required else f"{p}?" for p in properties]


EMPTY = ToolBox()


async def open_toolbox(*, mcp_config: str | None, python_tools: str | None,
                       startup_timeout_s: float = STARTUP_TIMEOUT_S) -> ToolBox:
    """The tools of both sources (either may be empty). MCP servers start together and each must list
    its tools within `startup_timeout_s`; any failure stops the others and raises ToolSetupError."""
    python = load_python_tools(python_tools) if python_tools else []  # before any server starts: cheap errors first
    servers = []
    if mcp_config:
        from .mcp_source import McpServer  # the MCP SDK (a second of imports) loads only for servers

        servers = [McpServer(c, startup_timeout_s=startup_timeout_s) for c in load_config(mcp_config)]
    try:
        outcomes = await asyncio.gather(*(s.start() for s in servers), return_exceptions=True)
        errors = [o for o in outcomes if isinstance(o, BaseException)]
        for e in errors:
            if not isinstance(e, Exception):
                raise e  # cancelled: the servers that did start are closed below
        if errors:
            raise ToolSetupError("\n".join(str(e) for e in errors)) from errors[0]
        box = ToolBox([t for s in servers for t in s.source_tools()] + python, closers=[s.aclose for s in servers])
    except BaseException:
        await asyncio.gather(*(s.aclose() for s in servers), return_exceptions=True)
        raise
    if box:
        log(logger, logging.INFO, "tools ready", tools=len(box), mcp_servers=len(servers),
            public=sum(s.public for s in box.specs))
    return box
