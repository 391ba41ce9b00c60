"""Tool results as Nova Sonic takes them: the content of a `toolResult` must be JSON text, so every
outcome (a value, a tool's error, a dead server) becomes a JSON object here, and nowhere else."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
import pydantic_core

if TYPE_CHECKING:
    from mcp_types import CallToolResult

# error.type values the model (and the round trip) may see; docs/tools.md lists them
UNKNOWN_TOOL = "unknown_tool"
INVALID_ARGUMENTS = "invalid_arguments"
TOOL_ERROR = "tool_error"  # the tool ran and failed: an exception, or an MCP result with isError
MCP_ERROR = "mcp_error"  # the MCP server refused the request (a JSON-RPC error) or answered off-protocol
SERVER_UNAVAILABLE = "server_unavailable"  # the MCP server died or cannot be reached


@dataclass(frozen=True, slots=True)
class ToolResult:
    """What a tool call gave: `content` is always a JSON object's text, errors included
    (`{"error": {"type": ..., "message": ...}}`), ready to be a Nova `toolResult`."""

    ok: bool
    content: str

    def value(self) -> dict:
        """The content parsed back (tests, logs at DEBUG)."""
        return orjson.loads(self.content)


def failure(kind: str, message: str) -> ToolResult:
    return ToolResult(False, _dumps({"error": {"type": kind, "message": message}}))


def success(value: Any) -> ToolResult:
    return ToolResult(True, _dumps(json_object(value)))


def json_object(value: Any) -> dict:
    """A Python return value as a JSON object: a dict (after pydantic's conversion of models,
    dataclasses, dates, …) stays; a str that is JSON text counts as that JSON; anything that is not
    an object is wrapped as `{"result": value}`, so the model always reads an object."""
    if isinstance(value, str):
        found, parsed = _parse_json(value)
        if found:
            value = parsed
    data = pydantic_core.to_jsonable_python(value, fallback=str)
    return data if isinstance(data, dict) else {"result": data}


def from_mcp(result: CallToolResult) -> ToolResult:
    """An MCP CallToolResult: `structuredContent` when present; else one text block that is JSON
    text, as that JSON; else `{"content": [texts...]}` (other blocks named, not inlined). `isError`
    becomes a tool_error whose message is the result's text."""
    from mcp_types import TextContent

    texts = [_block_text(block) for block in result.content]
    if result.is_error:
        return failure(TOOL_ERROR, "\n".join(texts).strip() or "the tool reported an error")
    if result.structured_content is not None:
        return success(result.structured_content)
    if len(result.content) == 1 and isinstance(result.content[0], TextContent):
        found, parsed = _parse_json(texts[0])
        if found:
            return success(parsed)
    return ToolResult(True, _dumps({"content": texts}))


def _block_text(block: Any) -> str:
    from mcp_types import EmbeddedResource, TextContent, TextResourceContents

    if isinstance(block, TextContent):
        return block.text
    if isinstance(block, EmbeddedResource) and isinstance(block.resource, TextResourceContents):
        return block.resource.text
    # images, audio, links: a voice model cannot use the bytes; say what was there
    kind = getattr(block, "type", "content")
    detail = getattr(block, "mime_type", None) or getattr(block, "uri", None) or ""
    return f"[{kind}{' ' + str(detail) if detail else ''} omitted]"


def _parse_json(text: str) -> tuple[bool, Any]:
    try:
        return True, orjson.loads(text)
    except orjson.JSONDecodeError:
        return False, None


def _dumps(obj: Any) -> str:
    return orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS, default=str).decode()
