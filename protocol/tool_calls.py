"""Tool calls in a conversation: the model's `toolUse`, the answer it must get, and the history item
that records both.

Nova requires every `toolUse` to be answered exactly once, with a JSON text (anything else closes the
stream with "Tool Response parsing error"), so failures are answered too, as a JSON error object. A
call is kept in the history as one item of role `tool` whose text is a JSON record of the call; the
model, whose history takes only USER and ASSISTANT text, reads it as an assistant sentence. Pure: no
I/O, no clocks.
"""

from __future__ import annotations

import orjson

from .items import Item

RESULT_MAX_BYTES = 32 * 1024  # a bigger result is answered as an error: it would not fit a history message
STATUSES = ("started", "finished", "failed", "timed_out", "cancelled")


def error_result(kind: str, message: str) -> str:
    """A failure as the JSON text a toolResult carries: {"error": {"type": ..., "message": ...}}."""
    return orjson.dumps({"error": {"type": kind, "message": message}}).decode()


def parse_arguments(content: str) -> dict:
    """The model's arguments (a JSON string in `toolUse.content`) as an object; ValueError if they are not one."""
    if not content.strip():
        return {}
    try:
        value = orjson.loads(content)
    except orjson.JSONDecodeError as e:
        raise ValueError(f"the arguments are not JSON: {e}") from None
    if not isinstance(value, dict):
        raise ValueError("the arguments are not a JSON object")
    return value


def checked_result(content: str) -> tuple[bool, str]:
    """(ok, the text to answer with): what a tool returned, if it is a JSON text of a sane size."""
    if len(content.encode("utf-8")) > RESULT_MAX_BYTES:
        return False, error_result("result_too_large", f"the tool's result is over {RESULT_MAX_BYTES} bytes")
    try:
        orjson.loads(content)
    except orjson.JSONDecodeError:
        return False, error_result("invalid_result", "the tool's result is not JSON")
    return True, content


def record(*, call_id: str, name: str, arguments: dict, status: str, result: str, duration_ms: int) -> str:
    """The text of a tool item: the call, how it ended and what it returned, as one JSON object."""
    return orjson.dumps({
        "call_id": call_id, "name": name, "arguments": arguments, "status": status,
        "duration_ms": duration_ms, "result": orjson.loads(result),
    }).decode()


def read_record(item: Item) -> dict | None:
    """A tool item's record, or None if its text is not one (an item written by something else)."""
    try:
        doc = orjson.loads(item.text)
    except orjson.JSONDecodeError:
        return None
    return doc if isinstance(doc, dict) and isinstance(doc.get("name"), str) else None


def for_model(item: Item) -> str:
    """How the model reads a tool item in its history (an assistant sentence)."""
    doc = read_record(item)
    if doc is None:
        return ""
    args = orjson.dumps(doc.get("arguments", {})).decode()
    result = orjson.dumps(doc.get("result")).decode()
    return f"(I called the {doc['name']} tool with {args}; it answered {result}.)"


def late_result_text(name: str, result: str) -> str:
    """A result whose stream is gone, given to the current stream as a user turn once the model is idle."""
    return f"Result of the {name} tool call you made earlier: {result}"
