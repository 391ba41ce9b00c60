"""The local engine's reply policy: deterministic, rule-based, pleasant enough for a live demo.

`reply(user_text, history)` returns the assistant's reply as a list of sentences (each one is spoken as
its own SPECULATIVE/AUDIO/FINAL group). `history` is the conversation so far as (role, text) pairs with
role "USER" or "ASSISTANT", oldest first, not including `user_text`. Pure: no I/O, no randomness.

Tool results (whatever the policy): `tool_reply_text(tool, content)` is what the model says about a tool's
result, "The <tool> tool says: <summary>"; `late_tool_result(text)` recognises a result the gateway
delivers as typed user text ("Result of the <tool> tool call …: <JSON>").
"""

from __future__ import annotations

import json
import re
import zlib

NOT_CAUGHT = "Sorry, I didn't catch that."
MAX_ECHO_WORDS = 30
MAX_RECALLED = 3
TOOL_SUMMARY_CHARS = 200  # a spoken tool result is cut (at a word boundary) to about this many characters

STORY = (
    "Once upon a time, in a small town by the sea, there lived a lighthouse keeper named Ada.",
    "Every evening she climbed the one hundred and twelve steps of the tower to light the great lamp.",
    "One stormy night the lamp flickered and went out, just as a fishing boat was heading for the rocks.",
    "Ada had no spare oil, so she gathered every candle in her cottage and carried them up the stairs.",
    "She arranged the candles in front of the big mirror, and their tiny flames became one bright beam.",
    "Out on the water, the fishermen saw the light and steered their boat safely into the harbour.",
    "The next morning the whole town came to thank her, each family bringing a candle of their own.",
    "From then on, the lighthouse never ran short of light, because the town kept it burning together.",
    "And Ada liked to say that even the smallest light matters, when everyone shares theirs.",
    "The end.",
)

_FOLLOW_UPS = (
    "Can you tell me a little more about that?",
    "How did that go?",
    "What happened next?",
    "How do you feel about that?",
    "What would you like to do about it?",
)

_RECALL = re.compile(
    r"\b(what (did|have|were) (we|i) (just )?(discuss|discussed|talk about|talked about|talking about|say|said|tell you|told you)"
    r"|what (we|i) (discussed|talked about|said)|remind me|recap|summari[sz]e|what was i saying)\b"
)
_GREETING = re.compile(r"^(hello|hi|hey|hiya|howdy|greetings|good (morning|afternoon|evening|day))\b")
_STORY = re.compile(r"\b(story|stories|tale)\b|(?<!how )\blong(er)?\b")
_THANKS = re.compile(r"\b(thank you|thanks|thank)\b")
_BYE = re.compile(r"\b(goodbye|good bye|bye|see you|talk to you later|good night)\b")
_HOW_ARE_YOU = re.compile(r"\bhow are (you|things)\b|\bhow's it going\b|\bhow do you do\b")
_WHO = re.compile(r"\b(who are you|what are you|what is your name|what's your name|your name)\b")
_QUESTION_START = re.compile(
    r"^(what|who|whom|whose|when|where|why|how|which|is|are|am|do|does|did|can|could|will|would|should|shall|may|have|has)\b"
)
_HONORIFIC = re.compile(r"\b(doctor|dr|mister|mr|missus|mrs|miss|ms|professor|prof|captain|aunt|uncle)(\.?) ([a-z]\w*)",
                        re.IGNORECASE)


_LATE_TOOL_RESULT = re.compile(r"^\s*result of the\s+[`'\"]?(?P<tool>[^\s`'\"]+?)[`'\"]?\s+tool call\b",
                               re.IGNORECASE)


def _norm(text: str) -> str:
    """Lowercase words for matching (apostrophes kept)."""
    return " ".join(re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split())


def _pretty(text: str, max_words: int = MAX_ECHO_WORDS, *, capitalize: bool = True) -> str:
    """A user's words, tidied for quoting: no trailing punctuation, 'I' and names capitalised, capped."""
    words = " ".join(text.split()).strip().rstrip(".!?,;:").split()
    if len(words) > max_words:
        words = [*words[:max_words], "and so on"]
    out = " ".join(words)
    out = re.sub(r"\bi\b", "I", out)
    out = re.sub(r"\bi('m|'ve|'ll|'d)\b", lambda m: "I" + m.group(1), out)
    out = _HONORIFIC.sub(lambda m: f"{m.group(1).capitalize()}{m.group(2)} {m.group(3).capitalize()}", out)
    return out[:1].upper() + out[1:] if capitalize else out


def _pick(options: tuple[str, ...], key: str) -> str:
    return options[zlib.crc32(key.encode("utf-8")) % len(options)]


def _earlier_user_turns(history: list[tuple[str, str]]) -> list[str]:
    turns = []
    for role, text in history:
        if role != "USER" or not _norm(text):
            continue
        if _RECALL.search(_norm(text)):  # earlier "what did we discuss?" questions are not topics
            continue
        turns.append(text)
    return turns


def _recall(history: list[tuple[str, str]]) -> list[str]:
    turns = _earlier_user_turns(history)
    if not turns:
        return ["We haven't talked about anything yet.", "What would you like to talk about?"]
    recent = [_pretty(t, capitalize=False) for t in turns[-MAX_RECALLED:]]
    if len(recent) == 1:
        return [f"We talked about this: you said {recent[0]}.", "Would you like to go on from there?"]
    out = [f"We talked about a few things: first, you said {recent[0]}."]
    for text in recent[1:-1]:
        out.append(f"Then you said {text}.")
    out.append(f"And most recently, you said {recent[-1]}.")
    return out


def reply(user_text: str, history: list[tuple[str, str]]) -> list[str]:
    """The assistant's reply to `user_text`, one sentence per list item (never empty)."""
    norm = _norm(user_text)
    if not norm:
        return [NOT_CAUGHT]
    if _RECALL.search(norm):
        return _recall(history)
    if _STORY.search(norm):
        return list(STORY)
    if _BYE.search(norm):
        return ["Goodbye! It was really nice talking with you.", "Come back any time."]
    if _THANKS.search(norm):
        return ["You're very welcome!", "Is there anything else on your mind?"]
    if _GREETING.search(norm):
        again = bool(_earlier_user_turns(history))
        m = re.match(r"good (morning|afternoon|evening|day)", norm)
        hello = f"Good {m.group(1)} to you too!" if m else ("Hello again!" if again else "Hello there!")
        return [f"{hello} It's nice to hear from you.", "What would you like to talk about today?"]
    if _HOW_ARE_YOU.search(norm):
        return ["I'm doing well, thank you for asking.", "How are you today?"]
    if _WHO.search(norm):
        return [
            "I'm the novagate local assistant, a small offline stand-in for Nova Sonic.",
            "I can chat, remember what you told me, and tell you a story.",
        ]
    said = _pretty(user_text)
    if user_text.strip().endswith("?") or _QUESTION_START.match(norm):
        return [
            f"That's a good question: {said}?",
            "I'm only a local stand-in, so I can't look that up, but I'm happy to keep talking.",
        ]
    return [f"Got it, you said: {said}.", _pick(_FOLLOW_UPS, norm)]


# -- tool results -----------------------------------------------------------------------------------


def _truncate(text: str, limit: int = TOOL_SUMMARY_CHARS) -> str:
    if len(text) <= limit:
        return text
    cut = text[:limit]
    space = cut.rfind(" ")
    if space > limit // 2:  # at a word boundary, unless the text has no spaces to speak of (compact JSON)
        cut = cut[:space]
    return cut.rstrip(" ,;:") + "…"


def tool_result_summary(content: str) -> str:
    """A tool result (a JSON string), short enough to speak: the string of a JSON string, of an object's
    "result" or "message" string field or of its only field if that is a string; else the JSON compacted.
    Text that is not JSON is used as it is. Cut to about TOOL_SUMMARY_CHARS characters."""
    try:
        value = json.loads(content)
    except ValueError:
        value = content
    if isinstance(value, dict):
        picked = next((value[k] for k in ("result", "message") if isinstance(value.get(k), str)), None)
        if picked is None and len(value) == 1 and isinstance(next(iter(value.values())), str):
            picked = next(iter(value.values()))
        value = picked if picked is not None else value
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return _truncate(" ".join(text.split()))


def tool_reply_text(tool: str, content: str) -> str:
    """What the model says about `tool`'s result `content`: "The <tool> tool says: <summary>"."""
    summary = tool_result_summary(content) or "nothing"
    return f"The {tool} tool says: {summary}" + ("" if summary[-1] in ".!?…" else ".")


def late_tool_result(text: str) -> tuple[str, str] | None:
    """(tool, result) when `text` is a tool result delivered as user text, "Result of the <tool> tool
    call …: <result>" (the result is what follows the first ": "); None otherwise."""
    m = _LATE_TOOL_RESULT.match(text)
    if m is None:
        return None
    rest = text[m.end():]
    _, colon, after = rest.partition(": ")
    return m.group("tool"), (after.strip() if colon else rest.strip(" \t\n:.-"))
