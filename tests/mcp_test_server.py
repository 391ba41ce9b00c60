"""An MCP server for tests/test_tools.py, run as a real process: stdio by default, `--http PORT` for
streamable HTTP on loopback. Its tools cover the shapes a gateway must turn into Nova tool results:
plain text, JSON text, structured output, an error result, a slow call and a server that dies."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import anyio
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import BaseModel

mcp = MCPServer("novagate-test")


class Weather(BaseModel):
    city: str
    celsius: float


@mcp.tool(structured_output=False)
def echo(text: str) -> str:
    """Say the text back (plain text content: not JSON)."""
    return text


@mcp.tool(structured_output=False)
def json_text() -> str:
    """A text content that is a JSON object already."""
    return '{"a": 1, "b": [true, null]}'


@mcp.tool()
def weather(city: str) -> Weather:
    """Structured output (structuredContent) of a pydantic model."""
    return Weather(city=city, celsius=21.5)


@mcp.tool(structured_output=False)
async def slow(seconds: float, marker: str = "") -> str:
    """Sleep, then answer: the cancellation tests cancel it. With a marker (a file path), writes
    `<marker>.started` when it starts and `<marker>.cancelled` if the client cancels it."""
    if marker:
        Path(marker + ".started").write_text("started")
    try:
        await anyio.sleep(seconds)
    except anyio.get_cancelled_exc_class():
        if marker:
            Path(marker + ".cancelled").write_text("cancelled")
        raise
    return "done"


@mcp.tool()
def fail(reason: str) -> str:
    """An error result (isError) with the reason."""
    raise ToolError(f"failed on purpose: {reason}")


@mcp.tool(name="notes.add", structured_output=False)
def notes_add(text: str) -> str:
    """A dotted name: valid in MCP, not in Nova."""
    return json.dumps({"added": text})


@mcp.tool()
def pid() -> int:
    """The server's process id: tells a restarted server from the first one."""
    return os.getpid()


@mcp.tool()
def crash() -> str:
    """The server process dies mid-call."""
    os._exit(3)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--http", type=int, metavar="PORT", help="streamable HTTP on 127.0.0.1:PORT/mcp")
    args = parser.parse_args()
    if args.http:
        mcp.run("streamable-http", host="127.0.0.1", port=args.http)
    else:
        mcp.run()


if __name__ == "__main__":
    main()
