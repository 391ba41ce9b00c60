"""Shaping stored conversation items into history Nova Sonic accepts (reference/nova-sonic.md §4).

Nova rejects or misreads history that breaks its rules: it must start with USER, read as alternating
turns, and stay within the model's limits (protocol.models: 200 KB in total and 50 KB per message
for Nova 2-class models, 40 KB and 1 KB per textInput for the legacy one and the fallback). Shaping keeps the newest context, because
that is what the resumed conversation continues from, and never breaks a UTF-8 character.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from protocol import nova_events, tool_calls
from protocol.items import Item
from protocol.nova_events import MAX_HISTORY_BYTES, MAX_TEXT_INPUT_BYTES

_ROLES = {"user": "USER", "assistant": "ASSISTANT", "tool": "ASSISTANT"}  # a tool call reads as the assistant's


@dataclass(frozen=True, slots=True)
class HistoryTurn:
    role: str  # "USER" | "ASSISTANT"
    chunks: tuple[str, ...]  # each one textInput of the turn's content block


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8"))


def _tail(text: str, budget: int) -> str:
    """The end of `text` within `budget` bytes, starting at a character and, if the cut falls inside
    a word, at the next word when one starts soon enough (within the first quarter)."""
    raw = text.encode("utf-8")
    if len(raw) <= budget:
        return text
    if budget <= 0:
        return ""
    start = len(raw) - budget
    while start < len(raw) and raw[start] & 0xC0 == 0x80:  # skip UTF-8 continuation bytes
        start += 1
    tail = raw[start:].decode("utf-8")
    before = text[len(text) - len(tail) - 1]
    if not before.isspace() and not tail[:1].isspace():
        for i, ch in enumerate(tail[: max(1, len(tail) // 4)]):
            if ch.isspace():
                tail = tail[i + 1 :]
                break
    return tail.lstrip()


def split_chunks(text: str, limit: int = MAX_TEXT_INPUT_BYTES) -> tuple[str, ...]:
    """Chunks of at most `limit` UTF-8 bytes. A split at a space consumes that one space; a split at
    other whitespace keeps it at the end of the chunk; with no whitespace, split at a character."""
    chunks: list[str] = []
    raw = text.encode("utf-8")
    while len(raw) > limit:
        cut = limit
        while raw[cut] & 0xC0 == 0x80:  # back off to the start of a character
            cut -= 1
        head = raw[:cut].decode("utf-8")
        i = len(head)
        if text[i] != " ":  # unless the head ends exactly at a word, find its last whitespace
            i -= 1
            while i > 0 and not head[i].isspace():
                i -= 1
        if i > 0 and text[i] == " ":
            chunk, rest = head[:i], text[i + 1 :]
        elif i > 0:
            chunk, rest = head[: i + 1], text[i + 1 :]
        else:
            chunk, rest = head, text[len(head) :]
        chunks.append(chunk)
        text, raw = rest, rest.encode("utf-8")
    if text:
        chunks.append(text)
    return tuple(chunks)


def _merge(items: Sequence[Item]) -> list[tuple[str, str]]:
    """(ROLE, text) turns: empty items skipped, consecutive same-role items joined by a space."""
    turns: list[tuple[str, str]] = []
    for item in items:
        role = _ROLES.get(item.role)
        text = (tool_calls.for_model(item) if item.role == "tool" else item.text).strip()
        if role is None or not text:
            continue
        if turns and turns[-1][0] == role:
            turns[-1] = (role, turns[-1][1] + " " + text)
        else:
            turns.append((role, text))
    return turns


def shape_history(
    items: Sequence[Item],
    *,
    max_bytes: int = MAX_HISTORY_BYTES,
    max_chunk_bytes: int = MAX_TEXT_INPUT_BYTES,
    max_message_bytes: int | None = None,
    drop_trailing_user: bool = False,
) -> list[HistoryTurn]:
    """Alternating USER-first turns of the newest items, within Nova's size limits.

    Whole turns are dropped oldest first. The turn at the budget boundary keeps its tail when it is
    the newest turn (so a long last turn is not lost) or a USER turn (so the kept ASSISTANT turns
    after it are not dropped for want of a USER start). A turn over `max_message_bytes` keeps its
    newest part. `drop_trailing_user` is for when the last user turn's audio will be replayed, so
    the model does not answer it twice.
    """
    if max_chunk_bytes < 4:
        raise ValueError("max_chunk_bytes must hold one UTF-8 character (>= 4)")
    turns = _merge(items)
    if max_message_bytes is not None:
        turns = [(role, _tail(text, max_message_bytes)) for role, text in turns]
    kept: list[tuple[str, str]] = []
    budget = max_bytes
    for role, text in reversed(turns):
        size = _utf8_len(text)
        if size <= budget:
            kept.append((role, text))
            budget -= size
            continue
        if not kept or role == "USER":
            tail = _tail(text, budget)
            if tail:
                kept.append((role, tail))
        break
    kept.reverse()
    while kept and kept[0][0] != "USER":
        kept.pop(0)
    if drop_trailing_user and kept and kept[-1][0] == "USER":
        kept.pop()
    return [HistoryTurn(role, split_chunks(text, max_chunk_bytes)) for role, text in kept]


def history_events(prompt_name: str, turns: Sequence[HistoryTurn]) -> list[dict]:
    """The non-interactive text blocks that replay `turns`, to send after the system prompt and
    before the audio block."""
    events: list[dict] = []
    for turn in turns:
        events.extend(nova_events.text_block(prompt_name, turn.role, turn.chunks, interactive=False))
    return events


def trim_to_played(text: str, played_ms: int, total_ms: int) -> str:
    """What the listener heard of `text` when playback stopped at `played_ms` of `total_ms`.

    Speech time is taken as proportional to characters, and the cut moves back to the last word
    boundary so history never claims a half-heard word.
    """
    if played_ms <= 0:
        return ""
    if total_ms <= 0 or played_ms >= total_ms:
        return text
    n = len(text) * played_ms // total_ms
    if n >= len(text):
        return text
    if not text[n].isspace():  # inside or at the end of a word: back off to its start
        while n > 0 and not text[n - 1].isspace():
            n -= 1
    return text[:n].rstrip()
