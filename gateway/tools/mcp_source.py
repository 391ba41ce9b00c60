"""MCP servers as tools: one session per server, kept open for the life of the ToolBox.

anyio cancel scopes (which the SDK's transports and sessions are made of) must be exited by the
task that entered them, so each server has an owner task that opens the session, lists the tools,
then serves calls: a caller queues a call and awaits a future; the owner runs the request in its own
task group. A caller that gives up (its deadline) cancels the future, which cancels that request's
scope the anyio way: the SDK sends `notifications/cancelled` and the session stays usable.

A connection that breaks (a stdio server that died, an HTTP session that ended) fails the calls in
flight with a server_unavailable error; the next call starts the server again."""

from __future__ import annotations

import asyncio
import collections
import importlib.metadata
import logging
import math
import os
import threading
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx2
import jsonschema
import mcp_types
from mcp import Client, MCPError, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client

from ..logs import log
from .mcp_config import STARTUP_TIMEOUT_S, ServerConfig
from .results import INVALID_ARGUMENTS, MCP_ERROR, SERVER_UNAVAILABLE, ToolResult, failure, from_mcp
from .spec import SourceTool, ToolSetupError, strip_titles

logger = logging.getLogger("novagate.tools")

CLOSE_TIMEOUT_S = 10.0  # the SDK's stdio shutdown: stdin closed, 2 s, SIGTERM, 2 s, SIGKILL
_LIST_PAGES = 100  # a paginator that never ends cannot hang the start-up
_STDERR_LINES = 20


@dataclass(eq=False)
class _Call:
    tool: str
    arguments: dict
    future: asyncio.Future
    scope: anyio.CancelScope | None = field(default=None)

    def caller_gave_up(self, future: asyncio.Future) -> None:
        if future.cancelled() and self.scope is not None:
            self.scope.cancel()


class McpServer:
    """One configured MCP server, connected by its owner task (see the module docstring)."""

    def __init__(self, config: ServerConfig, *, startup_timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        self.config = config
        self.tools: list[mcp_types.Tool] = []
        self._startup_timeout_s = startup_timeout_s
        self._send, self._receive = anyio.create_memory_object_stream[_Call](math.inf)
        self._task: asyncio.Task | None = None
        self._scope: anyio.CancelScope | None = None  # the owner's: cancelled by aclose
        self._connection_scope: anyio.CancelScope | None = None  # cancelled when a call finds it broken
        self._stderr: _StderrTail | None = None
        self._closing = False
        self._listed = False  # the current connection got as far as listing the tools
        self._validators: dict[str, Any] = {}

    @property
    def name(self) -> str:
        return self.config.name

    async def start(self) -> None:
        """Connect and list the tools, within the start-up bound; ToolSetupError otherwise."""
        ready = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._own(ready), name=f"mcp:{self.name}")
        what = f"MCP server {self.name!r} ({self.config.transport}: {self.config.describe()})"
        try:
            async with asyncio.timeout(self._startup_timeout_s):
                self.tools = await asyncio.shield(ready)
        except TimeoutError:
            ready.cancel()
            await self.aclose()
            raise ToolSetupError(f"{what} did not list its tools within {self._startup_timeout_s:g} s"
                                 + self._stderr_note()) from None
        except asyncio.CancelledError:
            ready.cancel()
            await self.aclose()
            raise
        except Exception as e:
            await self.aclose()
            raise ToolSetupError(f"{what} failed to start: {describe_error(e)}" + self._stderr_note()) from e
        for tool in self.tools:
            try:
                cls = jsonschema.validators.validator_for(tool.input_schema)
                cls.check_schema(tool.input_schema)
                self._validators[tool.name] = cls(tool.input_schema)
            except jsonschema.SchemaError:
                log(logger, logging.WARNING, "MCP tool schema is invalid; arguments not checked", server=self.name,
                    tool=tool.name)

    def source_tools(self) -> list[SourceTool]:
        def invoker(tool: str):
            return lambda arguments: self.call(tool, arguments)

        return [
            SourceTool(
                name=t.name, description=t.description or t.title or t.name.replace("_", " "),
                input_schema=strip_titles(t.input_schema), public=self.config.is_public(t.name),
                source=f"mcp:{self.name}", prefix=self.name, invoke=invoker(t.name),
            )
            for t in self.tools
        ]

    async def call(self, tool: str, arguments: dict) -> ToolResult:
        """Run one tool; a ToolResult for every failure. Cancelling the caller cancels the request."""
        validator = self._validators.get(tool)
        if validator is not None:
            problems = [f"{'.'.join(str(p) for p in e.absolute_path) or 'arguments'}: {e.message}"
                        for e in validator.iter_errors(arguments)]
            if problems:
                return failure(INVALID_ARGUMENTS, "; ".join(problems[:5]))
        if self._closing or self._task is None or self._task.done():
            return failure(SERVER_UNAVAILABLE, f"MCP server {self.name!r} is stopped")
        call = _Call(tool, arguments, asyncio.get_running_loop().create_future())
        call.future.add_done_callback(call.caller_gave_up)
        try:
            self._send.send_nowait(call)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            return failure(SERVER_UNAVAILABLE, f"MCP server {self.name!r} is stopped")
        return await call.future

    async def aclose(self) -> None:
        self._closing = True
        self._send.close()
        task = self._task
        if task is None or task.done():
            self._fail_queued(None)
            return
        if self._scope is not None:
            self._scope.cancel()
        else:
            task.cancel()
        try:
            await asyncio.wait_for(asyncio.shield(task), CLOSE_TIMEOUT_S)
        except TimeoutError:
            log(logger, logging.WARNING, "MCP server did not stop in time", server=self.name)
            task.cancel()
        except BaseException:  # the owner's own failure was reported already; cancellation of ours goes on
            if not task.done():
                raise

    # -- the owner task

    async def _own(self, ready: asyncio.Future) -> None:
        pending: _Call | None = None
        try:
            with anyio.CancelScope() as self._scope:
                while not self._closing:
                    if ready.done():  # a broken connection: start again on the next call, not before
                        try:
                            pending = await self._receive.receive()
                        except (anyio.EndOfStream, anyio.ClosedResourceError):
                            return
                        log(logger, logging.INFO, "MCP server restarting", server=self.name)
                    self._listed = False
                    try:
                        await self._connection(ready, pending)
                    except Exception as e:
                        if not ready.done():
                            ready.set_exception(e)
                            return
                        log(logger, logging.WARNING, "MCP server connection lost" if self._listed else
                            "MCP server restart failed", server=self.name, error=describe_error(e))
                        if pending is not None and not pending.future.done():
                            pending.future.set_result(failure(
                                SERVER_UNAVAILABLE,
                                f"MCP server {self.name!r} could not be restarted: {describe_error(e)}"))
                    if not ready.done():  # cancelled before its tools were listed
                        return
                    pending = None
        finally:
            if not ready.done():
                ready.set_exception(ToolSetupError("stopped before it listed its tools"))
            self._fail_queued(pending)

    async def _connection(self, ready: asyncio.Future, pending: _Call | None) -> None:
        async with AsyncExitStack() as stack:
            client = await self._open(stack)
            tools: list[mcp_types.Tool] = []
            cursor = None
            for _ in range(_LIST_PAGES):
                page = await client.list_tools(cursor=cursor)
                tools.extend(page.tools)
                cursor = page.next_cursor
                if not cursor:
                    break
            self._listed = True
            if not ready.done():
                ready.set_result(tools)
                log(logger, logging.INFO, "MCP server ready", server=self.name, transport=self.config.transport,
                    tools=len(tools), protocol=client.protocol_version)
            elif {t.name for t in tools} != {t.name for t in self.tools}:
                log(logger, logging.WARNING, "MCP server lists other tools after its restart; the start-up list "
                    "stays", server=self.name)
            with anyio.CancelScope() as self._connection_scope:
                async with anyio.create_task_group() as tg:
                    if pending is not None:
                        tg.start_soon(self._serve, client, pending)
                    async for call in self._receive:
                        tg.start_soon(self._serve, client, call)
                    tg.cancel_scope.cancel()  # closing: the calls in flight end now

    async def _open(self, stack: AsyncExitStack) -> Client:
        info = mcp_types.Implementation(name="novagate", version=_version())
        if self.config.command:
            self._stderr = _StderrTail(self.name)
            params = StdioServerParameters(command=self.config.command, args=list(self.config.args),
                                           env=self.config.env, cwd=self.config.cwd)
            try:  # the transport spawns the server as it is entered
                return await stack.enter_async_context(
                    Client(stdio_client(params, errlog=self._stderr.file), cache=None, client_info=info))
            finally:
                self._stderr.spawned()
        http = await stack.enter_async_context(
            httpx2.AsyncClient(headers=self.config.headers, timeout=httpx2.Timeout(30.0, read=300.0)))
        transport = streamable_http_client(self.config.url, http_client=http)
        return await stack.enter_async_context(Client(transport, cache=None, client_info=info))

    async def _serve(self, client: Client, call: _Call) -> None:
        try:
            if call.future.done():  # the caller gave up while the call was queued
                return
            with anyio.CancelScope() as call.scope:
                outcome = await self._request(client, call)
                if not call.future.done():
                    call.future.set_result(outcome)
        finally:
            if not call.future.done():
                call.future.set_result(failure(
                    SERVER_UNAVAILABLE, f"MCP server {self.name!r}: the connection ended during the call"))

    async def _request(self, client: Client, call: _Call) -> ToolResult:
        log(logger, logging.DEBUG, "MCP call", server=self.name, tool=call.tool, arguments=call.arguments)
        try:
            result = await client.call_tool(call.tool, call.arguments)
        except MCPError as e:
            if e.code == mcp_types.CONNECTION_CLOSED or "session terminated" in e.message.lower():
                self._broken(e)
                return failure(SERVER_UNAVAILABLE, f"MCP server {self.name!r} closed the connection; it is "
                               "started again on the next call")
            return failure(MCP_ERROR, f"MCP server {self.name!r}: {e.message}")
        except Exception as e:  # off-protocol answers, transport failures
            if not isinstance(e, ValueError):  # pydantic's ValidationError: a bad answer, not a dead server
                self._broken(e)
            return failure(MCP_ERROR if isinstance(e, ValueError) else SERVER_UNAVAILABLE,
                           f"MCP server {self.name!r}: {describe_error(e)}")
        outcome = from_mcp(result)
        log(logger, logging.DEBUG, "MCP result", server=self.name, tool=call.tool, ok=outcome.ok,
            content=outcome.content)
        return outcome

    def _broken(self, error: BaseException) -> None:
        log(logger, logging.WARNING, "MCP server connection broken", server=self.name, error=describe_error(error))
        if self._connection_scope is not None:
            self._connection_scope.cancel()

    def _fail_queued(self, pending: _Call | None) -> None:
        """The owner is gone: calls still queued (or about to be) get an answer; the queue closes."""
        calls = [pending] if pending is not None else []
        while True:
            try:
                calls.append(self._receive.receive_nowait())
            except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                break
        self._send.close()
        self._receive.close()
        for call in calls:
            if not call.future.done():
                call.future.set_result(failure(SERVER_UNAVAILABLE, f"MCP server {self.name!r} is stopped"))

    def _stderr_note(self) -> str:
        tail = self._stderr.tail() if self._stderr else ""
        return f"; its stderr ends with:\n{tail}" if tail else ""


class _StderrTail:
    """The stdio server's stderr, drained by a thread: the last lines kept for a start-up error,
    every line logged at DEBUG (servers log whatever they like there, personal data included)."""

    def __init__(self, server: str) -> None:
        self._server = server
        self._lines: collections.deque[str] = collections.deque(maxlen=_STDERR_LINES)
        read_fd, write_fd = os.pipe()
        self.file = os.fdopen(write_fd, "w")  # given to the child as its stderr
        self._thread = threading.Thread(target=self._drain, args=(read_fd,), name=f"mcp-stderr:{server}",
                                        daemon=True)
        self._thread.start()

    def spawned(self) -> None:
        """The child holds its copy now: closing ours lets the thread see EOF when the child exits."""
        if not self.file.closed:
            self.file.close()

    def _drain(self, fd: int) -> None:
        with os.fdopen(fd, "rb") as f:
            for raw in f:
                line = raw.decode("utf-8", "replace").rstrip()
                if line:
                    self._lines.append(line[:500])
                    log(logger, logging.DEBUG, "MCP server stderr", server=self._server, line=line)

    def tail(self) -> str:
        self._thread.join(timeout=0.5)  # a server that just died: let its last words arrive
        return "\n".join(f"  {line}" for line in self._lines)


def _version() -> str:
    try:
        return importlib.metadata.version("novagate")
    except importlib.metadata.PackageNotFoundError:
        return "0"


def describe_error(e: BaseException) -> str:
    """One line for a start-up or connection error; an ExceptionGroup says what is inside it."""
    while isinstance(e, BaseExceptionGroup) and e.exceptions:
        e = e.exceptions[0]
    if isinstance(e, MCPError):
        return e.message
    if isinstance(e, FileNotFoundError) and e.filename:
        return f"no such command or file: {e.filename}"
    text = str(e).strip()
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
