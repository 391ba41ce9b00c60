#!/usr/bin/env python3
"""Live protocol fuzzer for the novagate voice WebSocket (client protocol v1, PROTOCOL.md).

Sends random and mutated frames and messages to a *running* gateway over many concurrent
connections, while one healthy session (the reference VoiceClient, in its own process) keeps
talking: pings every ~200 ms (round trips measured) and typed turns that must be answered.
Every connection runs a random script derived from (seed, connection index), so any finding can be
replayed. Findings: close codes the input does not explain (PROTOCOL §6), 1011 / `internal_error`,
1006 without a close frame (unless the fuzzer dropped the TCP connection itself), hangs (no pong,
no session.ready, a stalled send), a server that stops answering /healthz or dies, ERROR lines in the
server log, and a healthy session that is closed, loses pongs or gets a turn unanswered.

    .venv/bin/python scripts/fuzz_live.py --spawn --cases 100000 --connections 50 --seed 1
    .venv/bin/python scripts/fuzz_live.py --url ws://127.0.0.1:8000/v1/voice --cases 100000 --connections 50 --seed 1
    .venv/bin/python scripts/fuzz_live.py --url ws://127.0.0.1:8000/v1/voice --seed 1 --replay 1234 -v

Exit status: 0 no findings, 1 findings, 2 the fuzzer could not run. See docs/fuzzing.md.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import json
import math
import os
import random
import re
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import orjson  # noqa: E402
import websockets  # noqa: E402
from websockets.exceptions import ConcurrencyError, ConnectionClosed, InvalidHandshake, InvalidStatus  # noqa: E402
from websockets.protocol import State  # noqa: E402

# -- facts of client protocol v1 (PROTOCOL.md §2-§6), restated here on purpose: the fuzzer's oracle
# -- is written from the contract, not imported from the server it tests.
IN_RATES = (8000, 16000, 24000, 48000)
OUT_RATES = (8000, 16000, 24000)
MAX_TEXT_BYTES = 65536
MAX_FRAME_BYTES = 32768
MAX_PENDING = 100
MAX_TEXT_CHARS = 1000
CLIENT_TYPES = ("session.start", "input.text", "playback.truncate", "session.end", "ping")
SERVER_TYPES = frozenset({"session.ready", "transcript", "response.audio.start", "response.audio.end", "interrupted",
                          "item.saved", "session.reconnect", "status", "usage", "error", "session.ended", "pong",
                          "session.updated"})
RATE_WINDOW_S, RATE_MAX_SPEED, RATE_CREDIT_S = 5.0, 2.0, 10.0   # 4429: > 2x real time sustained over 5 s
RATE_MARGIN_S = 3.0   # 4429 is "explained" once the client's own count is within this of the limit
# Server policy beyond PROTOCOL v1 (docs: security limits): pings past 5/s (bursts of 50) go unanswered;
# typed turns past 0.5/s (bursts of 5) are refused with `rate_limited`, and 10 refusals in a row close 4429.
PING_RATE, PING_BURST = 5.0, 20
TYPED_RATE, TYPED_BURST, TYPED_REFUSALS_TO_CLOSE = 0.5, 5, 10
SUBPROTOCOL = "novagate.v1"
PHRASES = ("hello there", "I met with Doctor Smith today at two pm", "what did we discuss",
           "please schedule a follow up appointment for next tuesday")
GRAMMAR = "i met with doctor smith today at two pm|what did we discuss|tell me a story|" \
          "please schedule a follow up appointment for next tuesday|hello there"

SEND_TIMEOUT_S = 20.0      # one send may wait this long for the server to read (backpressure), then: hang
READY_TIMEOUT_S = 30.0     # a valid session.start gets session.ready (or a close) within this
SCRIPT_CAP_S = 150.0       # one connection script, all waits included
CLOSE_WAIT_S = 20.0        # after the script: the close handshake completes within this
OPEN_TIMEOUT_S = 20.0
RECENT_CASES = 8
EXAMPLES = 3              # findings kept per problem (all are counted)
SUSPECT_BEFORE_S = 10.0   # a server failure: connections that ended this long before /healthz went silent are suspects
MAX_SUSPECTS = 30
TRIAGE_S = 120.0          # time for replaying suspects alone after a server failure
TRIAGE_MAX = 10           # suspects replayed per failure
CONSEQUENCES = ("abnormal_closure", "hang", "unexpected_close", "connect_failed")  # of a server that went silent
SEVERITY = ("server_crash", "server_unresponsive", "internal_error", "hang", "healthy_session", "healthy_turn",
            "healthy_ping", "abnormal_closure", "unexpected_close", "invalid_start_accepted", "server_error_status",
            "connect_failed", "malformed_server_message", "protocol", "server_log_error", "incomplete")
# Admission refusals (capacity and per-client caps), before session.ready: expected outcomes, counted.
ADMISSION = {1013: ("at capacity", "busy", "draining"),
             4429: ("too many connections", "too many sessions")}

# ---------------------------------------------------------------------------------------------------
# Values


class Raw(str):
    """JSON text emitted verbatim by `dumps` (numbers and constructs json.dumps cannot produce)."""


UNICODE = (
    "\u0000", "a\u0000b", "\u202eevil\u202c", "\u200f\u05e9\u05dc\u05d5\u05dd", "\u0627\u0644\u0633\u0644\u0627\u0645",
    "\ufeff", "\ufffe\uffff", "\U0010ffff", "\U0001f600" * 40, "e\u0301" * 200, "\u2028\u2029", "\u0085", "\r\n\t",
    "\x7f\x1b[31m", "Z\u0336\u0337\u0338" * 40, "\u00a0", "\uff53\uff45\uff53\uff53\uff49\uff4f\uff4e", "\u0130\u0131",
    "\u00df" * 100, "\\", "\"", "</script>", "%s%n%x", "${jndi:ldap://x}", "' OR 1=1 --", "..\\..\\etc/passwd",
    "\u180e", "\U000e0001", "\ud7ff\ue000", "\u034f" * 50, "\u0600\u0601", "\U0001f3f3\ufe0f\u200d\U0001f308",
)
LONE_SURROGATES = ("\\ud800", "\\udfff", "\\udbff\\udbff", "\\ud83d", "\\ude00", "\\udc00\\ud800", "\\uD800x")
BAD_UTF8 = (b"\xc0\xaf", b"\xe0\x80\xaf", b"\xf0\x80\x80\xaf", b"\xf8\x88\x80\x80\x80", b"\xfc\x84\x80\x80\x80\x80",
            b"\xed\xa0\x80", b"\xed\xbf\xbf", b"\xed\xa0\xbd\xed\xb8\x80", b"\xf4\x90\x80\x80", b"\xff", b"\xfe",
            b"\x80", b"\xc3", b"\xe2\x82", b"\xc1\xbf", b"\xc0\x80")
HUGE_NUMBERS = ("1e400", "-1e400", "1E+99999", "123456789012345678901234567890", "18446744073709551616",
                "-9223372036854775809", "18446744073709551615", "9223372036854775807", "1" * 5000, "0." + "0" * 400 + "1",
                "1e-400", "-0", "-0.0", "4.9e-324", "1.7976931348623157e309", "NaN", "Infinity", "-Infinity",
                "0x10", "01", "+1", ".5", "1.", "1e", "--1")
VOICES = ("matthew", "tiffany", "amy", "olivia", "lupe", "carlos")


def rstr(rng: random.Random, lo: int = 0, hi: int = 24) -> str:
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789 _-./:"
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))


def unicode_string(rng: random.Random) -> str:
    parts = [rng.choice(UNICODE) for _ in range(rng.randint(1, 4))]
    if rng.random() < 0.3:
        parts.append("".join(chr(rng.choice([rng.randint(0x20, 0xD7FF), rng.randint(0xE000, 0x10FFFF)]))
                             for _ in range(rng.randint(1, 40))))
    return "".join(parts)


def deep(rng: random.Random, depth: int | None = None) -> Raw:
    d = depth or rng.choice([rng.randint(2, 60), rng.randint(500, 1100), rng.randint(1100, 20000)])
    kind = rng.random()
    if kind < 0.4:
        return Raw("[" * d + "]" * d)
    if kind < 0.8:
        return Raw('{"a":' * d + "1" + "}" * d)
    return Raw('[{"a":' * (d // 2) + "[]" + "}]" * (d // 2))


def wrong_value(rng: random.Random) -> Any:
    """A value of some JSON type (often the wrong one for the field it lands in)."""
    r = rng.randrange(32)
    return [
        None, True, False, 0, 1, -1, 2, 1.0, 0.5, -0.0, 1e308, 5e-324, 2**31, 2**53 + 1, 2**63 - 1, 2**64 - 1, -2**63,
        Raw(rng.choice(HUGE_NUMBERS)), "", "1", "16000", "true", "null", unicode_string(rng), rstr(rng, 1000, 4000),
        [], [1, "x", None], {}, {"a": 1}, {"type": "ping"}, deep(rng, rng.randint(2, 40)), [rstr(rng)] * 101,
    ][r]


def dumps(obj: Any, rng: random.Random, *, ascii_: bool | None = None, ws: bool | None = None) -> str:
    """JSON text with some variation: ASCII escapes or raw UTF-8, whitespace, Raw fragments verbatim."""
    ea = rng.random() < 0.5 if ascii_ is None else ascii_
    sp = (rng.random() < 0.2) if ws is None else ws

    def sep(s: str) -> str:
        return s + rng.choice([" ", "\t", "\n", "\r\n ", ""]) if sp else s

    def enc(o: Any) -> str:
        if isinstance(o, Raw):
            return str(o)
        if isinstance(o, str):
            return json.dumps(o, ensure_ascii=ea or _has_surrogate(o))
        if isinstance(o, bool) or o is None or isinstance(o, (int, float)):
            return json.dumps(o)
        if isinstance(o, dict):
            return "{" + sep(",").join(enc(str(k)) + sep(":") + enc(v) for k, v in o.items()) + "}"
        if isinstance(o, (list, tuple)):
            return "[" + sep(",").join(enc(v) for v in o) + "]"
        return json.dumps(str(o))

    return enc(obj)


def _has_surrogate(s: str) -> bool:
    return any(0xD800 <= ord(c) <= 0xDFFF for c in s)


# ---------------------------------------------------------------------------------------------------
# The oracle: what PROTOCOL v1 says about one client text message

VALID, INVALID, UNKNOWN = "valid", "invalid", "unknown"   # UNKNOWN: the contract allows either outcome


@dataclass
class Verdict:
    verdict: str                 # valid | invalid | unknown  (for a session.start: accepted or 4400)
    type: str | None = None      # the message type, when it is a JSON object with a string `type`
    auth: bool = False           # session.start carries `auth` (a string): verification follows (4401)
    rate: int = 16000            # session.start: the input rate audio is charged at
    why: str = ""
    typed_turn: bool = False     # input.text the server takes as a turn (charged to its typed-turn limit)
    resume: bool = False         # session.start asks for an existing conversation (resume or conversation_id)


def oracle(data: str | bytes) -> Verdict:
    if isinstance(data, (bytes, bytearray)):
        try:
            data = bytes(data).decode("utf-8")
        except UnicodeDecodeError:
            return Verdict(INVALID, why="invalid UTF-8 (1007)")
    if len(data.encode("utf-8", "surrogatepass")) > MAX_TEXT_BYTES:
        return Verdict(INVALID, why="over 64 KiB (1009)")
    flags: set[str] = set()
    if data.startswith("\ufeff"):  # RFC 8259 §8.1: a parser MAY ignore a BOM
        flags.add("bom")
        data = data[1:]

    def pairs(p):
        if len({k for k, _ in p}) != len(p):
            flags.add("duplicate key")
        return dict(p)

    def pconst(c):
        raise ValueError(f"{c} is not JSON")

    def pint(s):
        try:
            v = int(s)
        except ValueError:
            flags.add("huge number")
            return 0
        if not -2**63 <= v < 2**64:
            flags.add("huge number")  # RFC 8259 §9: implementations may limit the range of numbers
        return v

    def pfloat(s):
        v = float(s)
        mant = re.split("[eE]", s)[0]
        if math.isinf(v) or (v == 0 and any(ch in "123456789" for ch in mant)):
            flags.add("huge number")
        return v

    try:
        obj = json.loads(data, object_pairs_hook=pairs, parse_constant=pconst, parse_int=pint, parse_float=pfloat)
    except RecursionError:
        return Verdict(UNKNOWN, why="nesting deeper than the oracle's parser")
    except ValueError as e:
        return Verdict(UNKNOWN if "bom" in flags else INVALID, why=f"not JSON: {str(e)[:60]}")
    _depth_or_surrogates(obj, flags)
    if not isinstance(obj, dict):
        return Verdict(INVALID, why="not an object")
    t = obj.get("type")
    if not isinstance(t, str):
        return Verdict(INVALID, why="type not a string")
    if t not in CLIENT_TYPES:
        return Verdict(INVALID, t, why="unknown type")
    v = _check(t, obj)
    if flags and v.verdict == VALID:
        v.verdict, v.why = UNKNOWN, ", ".join(sorted(flags))
    return v


def _depth_or_surrogates(obj: Any, flags: set[str]) -> bool:
    stack = [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if d > 500:
            flags.add("deep nesting")  # implementations limit nesting (RFC 8259 §9)
            return True
        if isinstance(o, str):
            if _has_surrogate(o):
                flags.add("lone surrogate")  # RFC 8259 §8.2: the behaviour is unpredictable
        elif isinstance(o, dict):
            stack.extend((k, d + 1) for k in o)
            stack.extend((x, d + 1) for x in o.values())
        elif isinstance(o, list):
            stack.extend((x, d + 1) for x in o)
    return False


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check(t: str, o: dict) -> Verdict:
    if t != "session.start":
        # other types before session.start: always 4400; after session.ready: never a close
        text = o.get("text")
        typed = t == "input.text" and isinstance(text, str) and bool(text.strip()) and len(text) <= MAX_TEXT_CHARS
        return Verdict(VALID, t, typed_turn=typed)
    worst = [VALID]
    whys: list[str] = []

    def mark(level: str, why: str) -> None:
        if level == INVALID or (level == UNKNOWN and worst[0] == VALID):
            worst[0] = level
        whys.append(why)

    def opt_str(key: str) -> None:
        if key not in o:
            return
        if o[key] is None:
            mark(UNKNOWN, f"{key} null")
        elif not isinstance(o[key], str):
            mark(INVALID, f"{key} not a string")

    if "protocol" not in o or o["protocol"] is None:
        mark(UNKNOWN, "protocol missing")
    elif isinstance(o["protocol"], float) and o["protocol"] == 1.0:
        mark(UNKNOWN, "protocol 1.0")
    elif not (_is_int(o["protocol"]) and o["protocol"] == 1):
        mark(INVALID, "protocol not 1")
    for key in ("auth", "resume", "conversation_id", "voice"):
        opt_str(key)
    if isinstance(o.get("voice"), str) and not re.fullmatch(r"[a-z]{2,20}", o["voice"]):
        mark(UNKNOWN, "voice not a plain id")
    rate = 16000
    audio = o.get("audio")
    if "audio" in o and audio is None:
        mark(UNKNOWN, "audio null")
    elif audio is not None and not isinstance(audio, dict):
        mark(INVALID, "audio not an object")
    elif isinstance(audio, dict):
        for key, allowed in (("input_sample_rate", IN_RATES), ("output_sample_rate", OUT_RATES)):
            if key not in audio:
                continue
            r = audio[key]
            if r is None:
                mark(UNKNOWN, f"{key} null")
            elif _is_int(r) and r in allowed:
                if key == "input_sample_rate":
                    rate = r
            elif isinstance(r, float) and r in allowed:
                mark(UNKNOWN, f"{key} float")
            else:
                mark(INVALID, f"{key} {r!r:.20}")
        if isinstance(audio.get("input_sample_rate"), (int, float)) and audio["input_sample_rate"] not in IN_RATES:
            rate = 8000
    pending = o.get("pending")
    if "pending" in o and pending is None:
        mark(UNKNOWN, "pending null")
    elif pending is not None and not (isinstance(pending, list) and all(isinstance(p, str) for p in pending)
                                      and len(pending) <= MAX_PENDING):
        mark(INVALID, "pending not a list of <= 100 strings")
    if worst[0] != VALID:
        rate = min(rate, 8000)  # charge audio conservatively when unsure which rate the server took
    return Verdict(worst[0], t, auth=isinstance(o.get("auth"), str), rate=rate, why=", ".join(whys),
                   resume=bool(o.get("resume") or o.get("conversation_id")))


# ---------------------------------------------------------------------------------------------------
# Scripts: what one connection sends


@dataclass
class Step:
    op: str          # text|bin|frag|raw|wsping|sleep|noread|await_ready|live|close|close_raw|abort|tcp
    data: Any = None
    label: str = ""
    arg: Any = None

    @property
    def is_case(self) -> bool:
        return self.op not in ("sleep", "noread", "await_ready")


@dataclass
class Script:
    idx: int
    mode: str
    steps: list[Step]
    subprotocols: list[str] | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)
    compression: bool = False
    raw_tcp: bool = False
    bad_origin: bool = False
    bearer: bool = False

    @property
    def n_cases(self) -> int:
        return sum(1 for s in self.steps if s.is_case)


class Pools:
    """Real values seen on earlier connections (resume tokens, receipts, item ids), bounded. Their
    contents depend on timing: a replayed script may draw different ones."""

    def __init__(self):
        self.resume = collections.deque(maxlen=64)           # (resume token, conversation id)
        self.drawn: collections.OrderedDict = collections.OrderedDict()  # conversations resumed since (bounded)
        self.receipts = collections.deque(maxlen=256)
        self.items = collections.deque(maxlen=256)
        self.conversations = collections.deque(maxlen=64)

    def pick(self, rng: random.Random, pool: collections.deque, fallback: str) -> str:
        return rng.choice(pool) if pool and rng.random() < 0.8 else fallback


def mutate_token(rng: random.Random, tok: str) -> str:
    if not tok:
        return rstr(rng, 1, 40)
    r = rng.random()
    i = rng.randrange(len(tok))
    if r < 0.25:
        return tok[:i] + chr((ord(tok[i]) ^ (1 << rng.randrange(6))) or 65) + tok[i + 1:]
    if r < 0.45:
        return tok[:i]
    if r < 0.6:
        return tok + rstr(rng, 1, 10)
    if r < 0.7:
        return tok.swapcase()
    if r < 0.8:
        return tok[::-1]
    if r < 0.9:
        return tok + "." + tok
    return unicode_string(rng)


def token_value(rng: random.Random, pool: collections.deque, pools: Pools) -> str:
    base = pools.pick(rng, pool, "v1." + secrets.token_urlsafe(rng.randint(8, 60)))
    return base if rng.random() < 0.5 else mutate_token(rng, base)


def start_message(rng: random.Random, pools: Pools, *, allow_auth: bool = False) -> dict:
    """A session.start the contract accepts (the optional parts chosen at random)."""
    msg: dict[str, Any] = {"type": "session.start", "protocol": 1}
    if rng.random() < 0.7:
        audio = {}
        if rng.random() < 0.8:
            audio["input_sample_rate"] = rng.choice(IN_RATES)
        if rng.random() < 0.8:
            audio["output_sample_rate"] = rng.choice(OUT_RATES)
        msg["audio"] = audio
    if rng.random() < 0.3:
        msg["voice"] = rng.choice(VOICES)
    if rng.random() < 0.3:
        known = dict(pools.resume)
        msg["resume"] = token_value(rng, collections.deque(known), pools)
        if msg["resume"] in known:  # a real token: that conversation is taken over (4409 there)
            pools.drawn[known[msg["resume"]]] = True
            while len(pools.drawn) > 5000:
                pools.drawn.popitem(last=False)
    if rng.random() < 0.1:
        msg["conversation_id"] = pools.pick(rng, pools.conversations, rstr(rng, 1, 40))
    if rng.random() < 0.25:
        msg["pending"] = [token_value(rng, pools.receipts, pools) for _ in range(rng.choice([0, 1, 2, 5, 30, 100]))]
    if allow_auth and rng.random() < 0.05:
        msg["auth"] = rng.choice(["", "x", "Bearer x", "eyJhbGciOiJub25lIn0.eyJzdWIiOiJhIn0.", secrets.token_hex(20)])
    if rng.random() < 0.1:
        msg[rstr(rng, 1, 12) or "x"] = wrong_value(rng)  # unknown fields are ignored
    return msg


def valid_message(rng: random.Random, pools: Pools, t: str | None = None) -> dict:
    t = t or rng.choice(CLIENT_TYPES)
    if t == "session.start":
        return start_message(rng, pools)
    if t == "input.text":
        return {"type": t, "text": rng.choice(PHRASES + ("thanks", "tell me a story", "how are you", "bye"))}
    if t == "playback.truncate":
        return {"type": t, "item_id": pools.pick(rng, pools.items, "item_" + secrets.token_hex(8)),
                "played_ms": rng.choice([0, 1, 100, 1500, 60000, 2**31])}
    if t == "session.end":
        return {"type": t}
    return {"type": "ping", "id": rng.choice([1, "a", None, True, 0.5, -7, "\u202e", 2**53])}


FIELDS = {
    "session.start": ("type", "protocol", "auth", "resume", "conversation_id", "audio", "audio.input_sample_rate",
                      "audio.output_sample_rate", "voice", "pending", "pending[]"),
    "input.text": ("type", "text"),
    "playback.truncate": ("type", "item_id", "played_ms"),
    "session.end": ("type",),
    "ping": ("type", "id"),
}


def set_path(msg: dict, path: str, value: Any, rng: random.Random) -> None:
    if path == "pending[]":
        lst = msg.get("pending")
        if not isinstance(lst, list) or not lst:
            lst = msg["pending"] = ["x"]
        lst[rng.randrange(len(lst))] = value
    elif "." in path:
        head, key = path.split(".", 1)
        if not isinstance(msg.get(head), dict):
            msg[head] = {}
        msg[head][key] = value
    else:
        msg[path] = value


def wrong_type_message(rng: random.Random, pools: Pools, t: str | None = None) -> tuple[dict, str]:
    """A valid message with one to three fields replaced by values of wrong types (or removed)."""
    t = t or rng.choice(CLIENT_TYPES)
    msg = valid_message(rng, pools, t)
    paths = []
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        path = rng.choice(FIELDS[t])
        paths.append(path)
        if rng.random() < 0.1 and "[" not in path and "." not in path:
            msg.pop(path, None)
        else:
            set_path(msg, path, wrong_value(rng), rng)
    return msg, f"wrongtype:{t}.{paths[0]}"


def broken_tail(rng: random.Random, text: str) -> str | bytes:
    r = rng.random()
    if r < 0.3:
        return text[: rng.randrange(len(text))]
    if r < 0.45:
        return text[:-1] + rng.choice([",", ",}", "}}", "]", ",\"x\":", ":", "\\", "\"", " ", "\x00", "/*x*/}"])
    if r < 0.55:
        return text + rng.choice(["}", " {}", text, "\n" + text, ",", "\x00", "//", "null"])
    if r < 0.7:
        cut = rng.randrange(len(text))
        return text[:cut] + rstr(rng, 1, 10) + text[cut:]
    if r < 0.85:
        cut = rng.randrange(len(text))
        return text[:cut] + rng.choice(["\\", "\\u", "\\ud83d", "\\x41", "\t", "\n", "\x01", "\x1f"]) + text[cut + 1:]
    cut = rng.randrange(len(text))  # bytes: a tail of random (often invalid UTF-8) bytes
    return text[:cut].encode() + bytes(rng.randrange(256) for _ in range(rng.randint(1, 12)))


def unicode_message(rng: random.Random, pools: Pools) -> tuple[str, str]:
    t = rng.choice(CLIENT_TYPES)
    msg = valid_message(rng, pools, t)
    fieldname = rng.choice([f for f in FIELDS[t] if "." not in f and "[" not in f] + ["__key__"])
    if rng.random() < 0.4:  # a lone surrogate, escaped (UTF-8 cannot carry one)
        msg[fieldname if fieldname != "__key__" else "x"] = "__SURR__"
        text = dumps(msg, rng, ascii_=True).replace('"__SURR__"', '"' + rng.choice(LONE_SURROGATES) + 'z"', 1)
        if fieldname == "type":
            text = text.replace('"type":"__SURR__"', '"type":"ping' + rng.choice(LONE_SURROGATES) + '"')
        return text, "lone_surrogate"
    value = unicode_string(rng)
    if fieldname == "__key__":
        msg[value] = 1
    elif fieldname == "type":
        msg["type"] = t + value if rng.random() < 0.5 else value + t
    else:
        msg[fieldname] = value
    return dumps(msg, rng), "unicode"


def bad_utf8_text(rng: random.Random, pools: Pools) -> bytes:
    """Bytes that are not UTF-8 (overlong forms, encoded surrogates, > U+10FFFF, truncated sequences),
    inside an otherwise valid message, for a TEXT frame."""
    msg = dumps(valid_message(rng, pools, rng.choice(CLIENT_TYPES)), rng, ascii_=True).encode()
    bad = rng.choice(BAD_UTF8)
    if rng.random() < 0.2:
        return "\ud800\udc00\ud800".encode("utf-8", "surrogatepass")  # CESU-8 / a lone surrogate as bytes
    i = msg.find(b'":"')
    i = i + 3 if i > 0 and rng.random() < 0.7 else rng.randrange(len(msg) + 1)
    return msg[:i] + bad + msg[i:]


def huge_number_message(rng: random.Random) -> str:
    t = rng.choice(CLIENT_TYPES)
    paths = [p for p in FIELDS[t] if p != "type"] or ["x"]
    msg = valid_message(rng, Pools(), t)
    set_path(msg, rng.choice(paths + ["extra"]), Raw(rng.choice(HUGE_NUMBERS)), rng)
    return dumps(msg, rng)


def deep_message(rng: random.Random) -> str:
    t = rng.choice(CLIENT_TYPES)
    msg = valid_message(rng, Pools(), t)
    set_path(msg, rng.choice(list(FIELDS[t]) + ["extra"]), deep(rng), rng)
    text = dumps(msg, rng, ws=False)
    return text if len(text) <= MAX_TEXT_BYTES or rng.random() < 0.3 else '{"type":"ping","id":' + str(deep(rng, 20)) + "}"


def big_text(rng: random.Random) -> tuple[str, str]:
    """Text messages at and around the 64 KiB limit (UTF-8 bytes, not characters)."""
    target = rng.choice([MAX_TEXT_BYTES - 1, MAX_TEXT_BYTES, MAX_TEXT_BYTES + 1, MAX_TEXT_BYTES + rng.randint(2, 5000),
                         rng.randint(1001, 60000), 1001, 1000])
    ch = rng.choice(["a", "\u00e9", "\u20ac", "\U0001f600"])
    t = rng.choice(["input.text", "ping", "session.start", "playback.truncate"])
    head = '{"type":"%s","%s":"' % (t, {"input.text": "text", "ping": "id", "session.start": "resume",
                                        "playback.truncate": "item_id"}[t])
    room = max(0, target - len(head) - 2)
    body = ch * (room // len(ch.encode()))
    text = head + body + '"}'
    if len(text) < 1005 and t == "input.text":
        text = head + "a" * (target - len(head) - 2) + '"}'
    return text, ("oversize_text" if len(text.encode()) > MAX_TEXT_BYTES else "near_limit_text")


def odd_message(rng: random.Random, pools: Pools) -> tuple[str | bytes, str]:
    """Assorted shapes: not objects, type variants, duplicates, control characters, empty."""
    r = rng.randrange(14)
    if r == 0:
        return rng.choice(["", " ", "\n", "null", "true", "1", '"session.start"', "[]", "{}", "[{}]", "{} {}"]), "not_object"
    if r == 1:
        return dumps({"type": rng.choice(["Session.Start", "session_start", "session.start ", " ping", "PING", "", "ping\n",
                                          "session", "session.", ".start", "input.text.x", "pong", "session.ready",
                                          "error", "__proto__", "constructor"])}, rng), "unknown_type"
    if r == 2:
        m = dumps(valid_message(rng, pools), rng)
        return '{"type":"ping",' + m[1:], "duplicate_key"
    if r == 3:
        return '{"type":"ping","id":"a\x00b\x01c"}', "raw_control_char"
    if r == 4:
        return "\ufeff" + dumps(valid_message(rng, pools), rng), "bom"
    if r == 5:
        return '{"type":"ping","id":' + rng.choice(["NaN", "Infinity", "-Infinity", "undefined", "'x'", "0x1F"]) + "}", "js_literal"
    if r == 6:
        return dumps({"type": rng.choice(CLIENT_TYPES), "__proto__": {"admin": True}, "constructor": {"prototype": 1}},
                     rng), "prototype_keys"
    if r == 7:
        return '{"type":"ping","id":"' + "\\u0000" * rng.randint(1, 200) + '"}', "escaped_nul"
    if r == 8:
        return dumps({"type": "ping", "id": rng.choice([{"a": 1}, [1], {}, []])}, rng), "ping_nonscalar_id"
    if r == 9:
        return dumps({"type": "ping", "id": rng.choice([2**64 - 1, -2**63, 1e308, -0.0, 5e-324, rstr(rng, 0, 500),
                                                         unicode_string(rng), True, None])}, rng), "ping_weird_id"
    if r == 10:
        return " " * rng.randint(1, 30000) + dumps(valid_message(rng, pools, "ping"), rng), "whitespace_padding"
    if r == 11:
        return dumps({"type": "input.text", "text": rng.choice(["", " ", "\n\t", "\u00a0", "\u200b", "\u3000",
                                                                  "a" * 1000, "a" * 1001, "\U0001f600" * 1000,
                                                                  "\U0001f600" * 1001, "e\u0301" * 500])}, rng), "text_edge"
    if r == 12:
        return dumps({"type": "playback.truncate", "item_id": rng.choice(["", "x" * 128, "x" * 129, unicode_string(rng)]),
                      "played_ms": rng.choice([-1, 0, 2**63, 1.0, "1"])}, rng), "truncate_edge"
    return dumps({"type": "session.start", "protocol": 1, "pending": [token_value(rng, pools.receipts, pools)
                                                                       for _ in range(rng.choice([99, 100, 101, 500]))]},
                 rng), "pending_edge"


def ends_connection(payload: str | bytes) -> bool:
    """A text message after which the server closes: not UTF-8 (1007), over 64 KiB (1009), session.end."""
    data = payload if isinstance(payload, bytes) else payload.encode("utf-8", "surrogatepass")
    if len(data) > MAX_TEXT_BYTES:
        return True
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return oracle(payload).type == "session.end"


def text_case(rng: random.Random, pools: Pools, *, fatal: bool = True) -> tuple[str | bytes, str]:
    """One text-frame payload; fatal=False: none that ends the connection (so a script goes on)."""
    for _ in range(20):
        payload, label = _text_case(rng, pools)
        if fatal or not ends_connection(payload):
            break
    return payload, label


def _text_case(rng: random.Random, pools: Pools) -> tuple[str | bytes, str]:
    """One text-frame payload: valid, mutated, broken, unicode, huge numbers, deep, big, odd."""
    r = rng.random()
    if r < 0.14:
        msg = valid_message(rng, pools)
        if msg["type"] == "session.end" and rng.random() < 0.7:
            msg = valid_message(rng, pools, "ping")
        return dumps(msg, rng), f"valid:{msg['type']}"
    if r < 0.40:
        msg, label = wrong_type_message(rng, pools)
        return dumps(msg, rng), label
    if r < 0.52:
        return broken_tail(rng, dumps(valid_message(rng, pools), rng)), "broken_tail"
    if r < 0.62:
        return unicode_message(rng, pools)
    if r < 0.66:
        return bad_utf8_text(rng, pools), "bad_utf8_text"
    if r < 0.72:
        return huge_number_message(rng), "huge_number"
    if r < 0.77:
        return deep_message(rng), "deep_nesting"
    if r < 0.80:
        return big_text(rng)
    return odd_message(rng, pools)


def audio(rng: random.Random, n: int, loud: float = 0.05) -> bytes:
    """n bytes of PCM16: silence, faint noise or (rarely) loud noise that the VAD may take for speech."""
    r = rng.random()
    if r < 0.6 or n == 0:
        return bytes(n)
    if r < 1 - loud:
        return _noise(rng, n, 3)
    return _noise(rng, n, 12000)


def _noise(rng: random.Random, n: int, amp: int) -> bytes:
    count = n // 2
    block = struct.pack(f"<{min(count, 1024)}h", *(rng.randint(-amp, amp) for _ in range(min(count, 1024))))
    out = (block * (count // max(1, len(block) // 2) + 1))[: count * 2]
    return out + (b"\x00" if n % 2 else b"")


def binary_case(rng: random.Random, rate: int, pools: Pools, *, fatal: bool = True) -> tuple[bytes, str]:
    for _ in range(20):
        data, label = _binary_case(rng, rate, pools)
        if fatal or len(data) <= MAX_FRAME_BYTES:
            break
    return data, label


def _binary_case(rng: random.Random, rate: int, pools: Pools) -> tuple[bytes, str]:
    r = rng.random()
    if r < 0.45:
        ms = rng.choice([10, 20, 20, 20, 32, 40, 64, 100])
        return audio(rng, rate * 2 * ms // 1000), "bin_audio"
    if r < 0.6:
        return audio(rng, rng.randrange(1, 4000) | 1), "bin_odd"
    if r < 0.68:
        return b"", "bin_empty"
    if r < 0.78:
        size = rng.choice([MAX_FRAME_BYTES - 1, MAX_FRAME_BYTES, MAX_FRAME_BYTES + 1, MAX_FRAME_BYTES + 2,
                           rng.randint(MAX_FRAME_BYTES, 2 * MAX_FRAME_BYTES), 2 * MAX_FRAME_BYTES + rng.randint(1, 3),
                           rng.randint(70000, 300000)])
        return audio(rng, size), "bin_oversize" if size > MAX_FRAME_BYTES else "bin_max"
    if r < 0.92:
        payload, _ = text_case(rng, pools)
        return (payload if isinstance(payload, bytes) else payload.encode("utf-8", "surrogatepass")), "text_as_binary"
    return bytes(rng.randrange(256) for _ in range(rng.randint(1, 64))), "bin_random"


# -- raw frames (what the websockets API refuses to produce) --------------------------------------

def raw_frame(opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0, mask: bool = True,
              length: int | None = None, min_len: bool = True) -> bytes:
    n = len(payload) if length is None else length
    head = bytes([(0x80 if fin else 0) | (rsv << 4) | opcode])
    mbit = 0x80 if mask else 0
    if n < 126 and min_len:
        head += bytes([mbit | n])
    elif n < 65536 and min_len:
        head += bytes([mbit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([mbit | 127]) + struct.pack("!Q", n)
    if mask:
        key = os.urandom(4)
        payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
        head += key
    return head + payload


RAW_VIOLATIONS = (
    # (label, frame builder, close codes RFC 6455 allows in reply, the text message the server may read instead)
    ("reserved_opcode", lambda rng: raw_frame(rng.choice([3, 4, 5, 6, 7, 11, 12, 13, 14, 15]), b"x"), {1002}, None),
    ("rsv_bits", lambda rng: raw_frame(1, b'{"type":"ping"}', rsv=rng.choice([1, 2, 4, 7])), {1002}, None),
    ("unmasked", lambda rng: raw_frame(1, b'{"type":"ping"}', mask=False), {1002}, None),
    ("control_too_long", lambda rng: raw_frame(9, bytes(126 + rng.randrange(200))), {1002}, None),
    ("fragmented_control", lambda rng: raw_frame(9, b"p", fin=False), {1002}, None),
    ("orphan_continuation", lambda rng: raw_frame(0, b"abc"), {1002}, None),
    ("interleaved_data", lambda rng: raw_frame(1, b'{"ty', fin=False) + raw_frame(2, b"\x00\x00"), {1002}, None),
    ("close_one_byte", lambda rng: raw_frame(8, b"\x03"), {1002}, None),
    ("close_bad_code", lambda rng: raw_frame(8, struct.pack("!H", rng.choice([0, 999, 1004, 1005, 1006, 1015, 1016,
                                                                                 2000, 2999, 5000, 65535]))),
     {1002}, None),
    ("close_bad_utf8", lambda rng: raw_frame(8, struct.pack("!H", 1000) + rng.choice(BAD_UTF8)), {1007, 1002}, None),
    ("text_bad_utf8", lambda rng: raw_frame(1, b'{"type":"ping","id":"' + rng.choice(BAD_UTF8) + b'"}'), {1007}, None),
    ("fragment_bad_utf8", lambda rng: raw_frame(1, b'{"type":"\xe2\x82', fin=False) + raw_frame(0, b'\x41"}'),
     {1007}, None),
    # RFC 6455 §5.2 asks for the minimal length encoding, but receivers commonly accept a longer one
    ("nonminimal_length", lambda rng: raw_frame(1, b'{"type":"ping","id":1}', min_len=False), {1002},
     '{"type":"ping","id":1}'),
    ("huge_declared_length", lambda rng: raw_frame(2, b"\x00" * 16, length=rng.choice([2**31, 2**40, 2**63 - 1])),
     {1009, 1002}, None),
    ("length_msb_set", lambda rng: bytes([0x82, 0xFF]) + struct.pack("!Q", 2**63 + 5) + os.urandom(4), {1002, 1009},
     None),
)


# -- script modes -----------------------------------------------------------------------------------

def fatal_case(rng: random.Random, pools: Pools, rate: int) -> tuple[str, str | bytes, str]:
    """(op, payload, label) of a frame after which the server closes the connection."""
    r = rng.random()
    if r < 0.35:
        return "text", bad_utf8_text(rng, pools), "bad_utf8_text"
    if r < 0.55:
        n = rng.choice([MAX_TEXT_BYTES + 1, rng.randint(MAX_TEXT_BYTES + 2, 3 * MAX_TEXT_BYTES)])
        return "text", '{"type":"input.text","text":"' + "a" * (n - 30) + '"}', "oversize_text"
    if r < 0.8:
        return "bin", audio(rng, rng.choice([MAX_FRAME_BYTES + 1, rng.randint(MAX_FRAME_BYTES + 2, 3 * MAX_FRAME_BYTES)])), \
            "bin_oversize"
    return "text", '{"type":"session.end"}', "valid:session.end"


def _sleep(rng: random.Random) -> Step:
    return Step("sleep", rng.choice([0.0, 0.0, 0.001, 0.005, 0.02, 0.05, 0.2]))


def _post_ready_steps(rng: random.Random, pools: Pools, rate: int, n: int) -> list[Step]:
    """The body of a live session: any mix of messages, audio, fragments, control frames."""
    steps: list[Step] = []
    for _ in range(n):
        r = rng.random()
        if r < 0.55:
            payload, label = text_case(rng, pools, fatal=False)
            steps.append(Step("text", payload, label))
        elif r < 0.78:
            payload, label = binary_case(rng, rate, pools, fatal=False)
            steps.append(Step("bin", payload, label))
        elif r < 0.83:
            msg = start_message(rng, pools) if rng.random() < 0.6 else wrong_type_message(rng, pools, "session.start")[0]
            steps.append(Step("text", dumps(msg, rng), "many_start"))
        elif r < 0.87:
            text = dumps(valid_message(rng, pools, rng.choice(["ping", "input.text", "playback.truncate"])), rng,
                         ascii_=False)
            data = text.encode()
            cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(1, 6))))
            parts = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]  # may split a UTF-8 sequence
            steps.append(Step("frag", parts, "frag_text", arg="text"))
        elif r < 0.89:
            chunk = audio(rng, rate * 2 * 20 // 1000)
            steps.append(Step("frag", [chunk[: len(chunk) // 2], chunk[len(chunk) // 2:]], "frag_bin", arg="binary"))
        elif r < 0.92:
            steps.append(Step("wsping", os.urandom(rng.choice([0, 1, 16, 125])), "wsping"))
        elif r < 0.95:
            steps.append(Step("text", dumps(valid_message(rng, pools, "input.text"), rng), "valid:input.text"))
        else:
            steps.append(_sleep(rng))
        if rng.random() < 0.3:
            steps.append(_sleep(rng))
    return steps


def _ending(rng: random.Random, *, live: bool = True) -> list[Step]:
    steps = [Step("live", None, "liveness_ping")] if live else []
    r = rng.random()
    if r < 0.55:
        steps.append(Step("close", None, "close", arg=(1000, "")))
    elif r < 0.7:
        steps.append(Step("close", None, "close", arg=(rng.choice([1001, 3000, 4000, 4999, 4400, 1011]),
                                                       rng.choice(["", "bye", "\u202e" * 10, "x" * 123]))))
    elif r < 0.85:
        steps.append(Step("abort", None, "abort"))
    else:
        steps.append(Step("text", '{"type":"session.end"}', "valid:session.end"))
        steps.append(Step("sleep", 0.5))
    return steps


def make_script(seed: int, idx: int, pools: Pools) -> Script:
    rng = random.Random(f"novagate-fuzz/{seed}/{idx}")
    modes = (("session", 34), ("mutated_start", 18), ("garbage_first", 14), ("audio", 8), ("rapid", 8),
             ("pre_ready", 5), ("after_close", 3), ("violation", 3), ("raw_tcp", 2), ("handshake_timeout", 2),
             ("headers", 2), ("no_read", 1), ("burst", 3))
    mode = rng.choices([m for m, _ in modes], [w for _, w in modes])[0]
    sc = Script(idx, mode, [], subprotocols=[SUBPROTOCOL], compression=rng.random() < 0.15)
    if rng.random() < 0.1:
        sc.subprotocols = rng.choice([None, ["other"], ["novagate.v2", SUBPROTOCOL], ["novagate.v1", "x"]])
    steps = sc.steps
    rate = 16000

    def start() -> None:
        nonlocal rate
        msg = start_message(rng, pools)
        rate = msg.get("audio", {}).get("input_sample_rate", 16000)
        steps.append(Step("text", dumps(msg, rng), "valid:session.start"))

    if mode == "session":
        start()
        steps.append(Step("await_ready", None))
        steps.extend(_post_ready_steps(rng, pools, rate, rng.randint(10, 120)))
        if rng.random() < 0.25:  # one message that ends the session, then frames after the close
            op, payload, label = fatal_case(rng, pools, rate)
            steps.append(Step(op, payload, label))
            steps.extend(_post_ready_steps(rng, pools, rate, rng.randint(0, 2)))
            steps.extend(_ending(rng, live=False))
        else:
            steps.extend(_ending(rng))
    elif mode == "mutated_start":
        msg, label = wrong_type_message(rng, pools, "session.start")
        if rng.random() < 0.3:
            text, label = unicode_message(rng, pools) if rng.random() < 0.5 else (huge_number_message(rng), "huge_number")
            if '"session.start"' not in text:
                text = dumps(msg, rng)
        else:
            text = dumps(msg, rng)
        steps.append(Step("text", text, label))
        if oracle(text).verdict == INVALID:  # closed 4400: a few frames after the close, no more
            steps.extend(_post_ready_steps(rng, pools, 8000, rng.randint(0, 3)))
            steps.extend(_ending(rng, live=False))
        else:
            steps.append(Step("await_ready", None, arg="maybe"))
            steps.extend(_post_ready_steps(rng, pools, 8000, rng.randint(0, 25)))
            steps.extend(_ending(rng))
    elif mode == "garbage_first":
        r = rng.random()
        if r < 0.15:
            payload, label = binary_case(rng, 16000, pools)
            steps.append(Step("bin", payload, "first:" + label))
        elif r < 0.3:
            steps.append(Step("text", dumps(valid_message(rng, pools, rng.choice(CLIENT_TYPES[1:])), rng),
                              "first:valid_non_start"))
        elif r < 0.45:
            steps.append(Step("text", broken_tail(rng, dumps(start_message(rng, pools), rng)), "first:broken_start"))
        else:
            payload, label = text_case(rng, pools)
            steps.append(Step("text", payload, "first:" + label))
        for _ in range(rng.randint(0, 3)):  # usually after the server's close: frames after close
            if rng.random() < 0.5:
                payload, label = text_case(rng, pools)
                steps.append(Step("text", payload, label))
            else:
                payload, label = binary_case(rng, 16000, pools)
                steps.append(Step("bin", payload, label))
        steps.append(Step("sleep", 0.1))
        steps.extend(_ending(rng, live=False))
    elif mode == "audio":
        start()
        steps.append(Step("await_ready", None))
        style = rng.choice(["trickle", "trickle", "flood", "odd", "mixed"])
        frame_ms = rng.choice([10, 20, 32, 64, 100, 250])
        for _ in range(rng.randint(10, 150)):
            if style == "trickle":
                steps.append(Step("bin", audio(rng, rate * 2 * frame_ms // 1000, loud=0.02), "bin_audio"))
                steps.append(Step("sleep", frame_ms / 1000 * rng.uniform(1.0, 1.3)))
            elif style == "flood":
                steps.append(Step("bin", audio(rng, rng.choice([rate * 2 * frame_ms // 1000, MAX_FRAME_BYTES])),
                                  "bin_audio_flood"))
            elif style == "odd":
                steps.append(Step("bin", audio(rng, rng.randrange(1, 2000) | 1), "bin_odd"))
                steps.append(Step("sleep", 0.005))
            else:
                steps.append(Step("bin", audio(rng, rate * 2 * frame_ms // 1000, loud=0.02), "bin_audio"))
                if rng.random() < 0.3:
                    payload, label = text_case(rng, pools)
                    steps.append(Step("text", payload, label))
                steps.append(Step("sleep", frame_ms / 1000 * rng.uniform(1.0, 1.3)))
        steps.extend(_ending(rng))
    elif mode == "rapid":
        r = rng.random()
        if r < 0.3:
            steps.append(Step("close", None, "connect_close", arg=(1000, "")))
        elif r < 0.55:
            steps.append(Step("abort", None, "connect_abort"))
        elif r < 0.8:
            start()
            steps.append(Step(rng.choice(["close", "abort"]), None, "start_then_drop", arg=(1000, "")))
        else:
            start()
            for _ in range(rng.randint(1, 5)):
                steps.append(Step("text", dumps(valid_message(rng, pools, "ping"), rng), "valid:ping"))
            steps.append(Step("abort", None, "abort"))
    elif mode == "pre_ready":
        start()
        for _ in range(rng.randint(1, 30)):
            r = rng.random()
            if r < 0.3:
                steps.append(Step("bin", audio(rng, rate * 2 * 20 // 1000), "bin_audio_pre_ready"))
            elif r < 0.5:
                steps.append(Step("text", dumps(start_message(rng, pools), rng), "many_start"))
            elif r < 0.7:
                steps.append(Step("text", dumps(valid_message(rng, pools, rng.choice(CLIENT_TYPES[1:4])), rng),
                                  "pre_ready_message"))
            else:
                payload, label = text_case(rng, pools)
                steps.append(Step("text", payload, label))
        steps.append(Step("await_ready", None))
        steps.extend(_ending(rng))
    elif mode == "after_close":
        start()
        steps.append(Step("await_ready", None, arg="maybe"))
        frames = []
        for _ in range(rng.randint(1, 8)):
            if rng.random() < 0.5:
                frames.append(raw_frame(1, dumps(valid_message(rng, pools), rng, ascii_=True).encode()))
            else:
                frames.append(raw_frame(2, audio(rng, 640)))
        steps.append(Step("close_raw", frames, "frames_after_close", arg=(rng.choice([1000, 1001, 4000]), "")))
    elif mode == "violation":
        if rng.random() < 0.5:
            start()
            steps.append(Step("await_ready", None, arg="maybe"))
        label, build, codes, same_as = rng.choice(RAW_VIOLATIONS)
        steps.append(Step("raw", build(rng), "raw:" + label, arg=(codes, same_as)))
        steps.append(Step("sleep", 0.2))
        sc.compression = False
    elif mode == "raw_tcp":
        sc.raw_tcp = True
        steps.append(Step("tcp", *_tcp_case(rng)))
    elif mode == "handshake_timeout":
        if rng.random() < 0.5:
            steps.append(Step("wsping", b"", "wsping"))
        steps.append(Step("noread", 0.0))
        steps.append(Step("sleep", rng.choice([0.5, 1.0, 6.0])))
        if rng.random() < 0.5:
            start()
            steps.append(Step("await_ready", None, arg="maybe"))
        steps.extend(_ending(rng, live=False))
    elif mode == "headers":
        if rng.random() < 0.5:
            printable = "".join(c for c in unicode_string(rng) if " " <= c <= "~") or "x"  # what HTTP can carry
            sc.headers.append(("Origin", rng.choice(["http://evil.example", "null", "https://127.0.0.1.evil.example",
                                                     "file://", printable])))
            sc.bad_origin = True
        else:
            sc.headers.append(("Authorization", rng.choice(["Bearer x", "Bearer " + "a" * 4000, "Basic eDp5", "bearer",
                                                            "Bearer eyJhbGciOiJub25lIn0.e30."])))
            sc.bearer = sc.headers[-1][1][:7].lower() == "bearer " and bool(sc.headers[-1][1][7:].strip())
        start()
        steps.append(Step("await_ready", None, arg="maybe"))
        steps.extend(_post_ready_steps(rng, pools, rate, rng.randint(0, 10)))
        steps.extend(_ending(rng))
    elif mode == "burst":  # big frames back to back: the server's input queue fills faster than it drains
        start()
        steps.append(Step("await_ready", None))
        kind = rng.choice(["audio", "text", "mixed"])
        for _ in range(rng.randint(8, 40)):
            if kind == "audio" or (kind == "mixed" and rng.random() < 0.5):
                steps.append(Step("bin", audio(rng, rng.choice([16384, 24000, 32768]), loud=0), "bin_burst"))
            else:
                pad = " " * rng.randint(20000, MAX_TEXT_BYTES - 100)
                steps.append(Step("text", pad + dumps(valid_message(rng, pools, "ping"), rng), "text_burst"))
        steps.extend(_ending(rng))
    elif mode == "no_read":
        start()
        steps.append(Step("await_ready", None))
        steps.append(Step("noread", rng.uniform(2.0, 8.0)))
        steps.append(Step("text", '{"type":"input.text","text":"tell me a story"}', "valid:input.text"))
        for _ in range(rng.randint(5, 40)):
            steps.append(Step("text", dumps(valid_message(rng, pools, "ping"), rng), "valid:ping"))
            steps.append(Step("bin", audio(rng, rate * 2 * 20 // 1000, loud=0), "bin_audio"))
            steps.append(Step("sleep", 0.02))
        steps.append(Step("sleep", 2.0))
        steps.extend(_ending(rng))
    return sc


def _tcp_case(rng: random.Random) -> tuple[bytes, str]:
    key = "dGhlIHNhbXBsZSBub25jZQ=="
    host = "Host: 127.0.0.1\r\n"
    up = f"GET /v1/voice HTTP/1.1\r\n{host}Upgrade: websocket\r\nConnection: Upgrade\r\n"
    cases = [
        (b"", "tcp:connect_close"),
        (b"GET /v1/voice HTTP/1.1\r\nHost: 127.", "tcp:partial_request"),
        ((up + f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 12\r\n\r\n").encode(), "tcp:bad_version"),
        ((up + "Sec-WebSocket-Version: 13\r\n\r\n").encode(), "tcp:missing_key"),
        ((up + "Sec-WebSocket-Key: not-base64!!\r\nSec-WebSocket-Version: 13\r\n\r\n").encode(), "tcp:bad_key"),
        ((f"GET /v1/voice HTTP/1.1\r\n{host}X-Big: " + "a" * rng.randint(9000, 200000) + "\r\n\r\n").encode(),
         "tcp:huge_header"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(64), "tcp:tls_hello"),
        (os.urandom(rng.randint(1, 2000)), "tcp:random_bytes"),
        ((up + f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()
         + raw_frame(1, b'{"type":"session.start"}', mask=False), "tcp:upgrade_then_unmasked"),
        ((up + f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode() + os.urandom(200),
         "tcp:upgrade_then_garbage"),
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n\x00\xff garbage\r\n\r\n",
         "tcp:pipelined"),
        (b"POST /v1/voice HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\nabc", "tcp:post_body"),
        (b"GET /v1/voice HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "tcp:bad_chunked"),
        (("GET /" + "a" * rng.randint(5000, 70000) + " HTTP/1.1\r\nHost: x\r\n\r\n").encode(), "tcp:long_path"),
    ]
    return rng.choice(cases)


# ---------------------------------------------------------------------------------------------------
# Outcomes


@dataclass
class Finding:
    kind: str
    detail: str
    conn: int | None = None
    case: str | None = None
    mode: str = ""
    recent: list = field(default_factory=list)
    session_id: str | None = None
    log: list = field(default_factory=list)
    key: str = ""                # findings with one key are one problem (listed once, with examples)


@dataclass
class Report:
    seed: int
    url: str
    cases_target: int
    connections: int
    started: float = field(default_factory=time.monotonic)
    elapsed: float = 0.0
    cases: int = 0
    cases_skipped: int = 0
    scripts: int = 0
    modes: collections.Counter = field(default_factory=collections.Counter)
    case_kinds: collections.Counter = field(default_factory=collections.Counter)
    server_closes: collections.Counter = field(default_factory=collections.Counter)      # code -> n
    close_reasons: collections.Counter = field(default_factory=collections.Counter)      # "code reason" -> n
    client_closes: collections.Counter = field(default_factory=collections.Counter)      # our code, echoed
    outcomes: collections.Counter = field(default_factory=collections.Counter)
    error_codes: collections.Counter = field(default_factory=collections.Counter)
    server_messages: collections.Counter = field(default_factory=collections.Counter)
    tcp_outcomes: collections.Counter = field(default_factory=collections.Counter)
    readies: int = 0
    audio_in_bytes: int = 0
    findings: list = field(default_factory=list)
    finding_kinds: collections.Counter = field(default_factory=collections.Counter)
    groups: collections.Counter = field(default_factory=collections.Counter)
    log: list = field(default_factory=list)    # (monotonic time, kind, key, Finding) of every finding
    fuzzer_errors: list = field(default_factory=list)
    healthy: dict = field(default_factory=dict)
    health: dict = field(default_factory=dict)
    server: dict = field(default_factory=dict)
    incomplete: str = ""
    max_findings: int = 100
    segments: int = 0
    restarts: int = 0
    outages: list = field(default_factory=list)

    def add(self, f: Finding) -> None:
        self.log.append((time.monotonic(), f.kind, f.key or f"{f.kind}: {f.detail[:70]}", f))
        self.finding_kinds[f.kind] += 1
        f.key = f.key or f"{f.kind}: {f.detail[:70]}"
        self.groups[f.key] += 1
        if self.groups[f.key] <= EXAMPLES and len(self.findings) < self.max_findings:
            self.findings.append(f)

    def retract(self, since: float, kinds: tuple[str, ...]) -> int:
        """Take back the findings of these kinds made since `since` (consequences of a server failure)."""
        keep, n = [], 0
        for entry in self.log:
            at, kind, key, f = entry
            if at >= since and kind in kinds:
                n += 1
                self.finding_kinds[kind] -= 1
                self.groups[key] -= 1
                if f in self.findings:
                    self.findings.remove(f)
            else:
                keep.append(entry)
        self.log = keep
        self.finding_kinds = +self.finding_kinds
        self.groups = +self.groups
        return n

    def to_json(self) -> dict:
        d = {k: (dict(v) if isinstance(v, collections.Counter) else v) for k, v in self.__dict__.items()
             if k not in ("findings", "started", "log")}
        d["findings"] = [asdict(f) for f in self.findings]
        d["outages"] = [{k: v for k, v in o.items() if k != "finding"} for o in self.outages]
        d["server_closes"] = {str(k): v for k, v in self.server_closes.items()}
        d["client_closes"] = {str(k): v for k, v in self.client_closes.items()}
        return d


def short(data: Any, n: int = 140) -> str:
    if isinstance(data, (bytes, bytearray)):
        return f"<{len(data)} bytes {bytes(data[:24]).hex()}{'…' if len(data) > 24 else ''}>"
    if isinstance(data, list):
        return "[" + ", ".join(short(x, 30) for x in data[:4]) + (", …" if len(data) > 4 else "") + "]"
    s = repr(data)
    return s if len(s) <= n else s[:n] + f"…({len(data) if isinstance(data, str) else '?'} chars)"


class ClientRateModel:
    """The server's audio rate limit (PROTOCOL §2: > 2x real time sustained over 5 s), counted on the
    client's clock. `over` turns true once the client is within RATE_MARGIN_S of the limit, where a
    4429 becomes a plausible reaction (the server's clock starts when it reads the first frame)."""

    def __init__(self):
        self.sent_s = 0.0
        self.t0: float | None = None
        self.over = False

    def add(self, audio_s: float, now: float) -> None:
        if self.t0 is None:
            self.t0 = now
        self.t0 = max(self.t0, now - (self.sent_s + RATE_CREDIT_S) / RATE_MAX_SPEED)
        self.sent_s += audio_s
        if self.sent_s - RATE_MAX_SPEED * (now - self.t0) > RATE_WINDOW_S - RATE_MARGIN_S:
            self.over = True


class Bucket:
    """A token bucket on the client's clock (a model of a server limit)."""

    def __init__(self, rate: float, burst: float):
        self.rate, self.burst, self.tokens, self.last = rate, burst, float(burst), None

    def level(self, now: float) -> float:
        return self.tokens if self.last is None else min(self.burst, self.tokens + (now - self.last) * self.rate)

    def take(self, now: float) -> bool:
        self.tokens, self.last = self.level(now), now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


# ---------------------------------------------------------------------------------------------------
# One connection


class Ctx:
    """What all connections share."""

    def __init__(self, cfg: FuzzConfig, report: Report):
        self.cfg = cfg
        self.report = report
        self.pools = Pools()
        self.next_idx = 0
        self.stop = False
        self.deadline = time.monotonic() + cfg.max_seconds
        self.sessions: dict[str, int] = {}     # session_id -> connection index (for log correlation)
        self.outage = False                    # the server stopped answering: connections are dropped
        self.active: set[Conn] = set()         # connections running now (suspects when the server fails)
        self.finished: collections.deque = collections.deque(maxlen=200)  # (ended at, Conn): suspects too
        self.down_since: float | None = None   # /healthz has failed since
        self.healthz_ms: list[float] = []
        u = urlsplit(cfg.url)
        self.host, self.port = "127.0.0.1", u.port or 80
        self.verbose = cfg.verbose
        self.failure = asyncio.Event()
        self.failure_kind = self.failure_reason = ""

    def new_segment(self) -> None:
        """A (re)started server: no failure yet."""
        self.outage = False
        self.failure = asyncio.Event()
        self.failure_kind = self.failure_reason = ""

    def fail(self, kind: str, reason: str) -> None:
        if not self.failure.is_set():
            self.failure_kind, self.failure_reason = kind, reason
            self.failure.set()


def raw_write(ws: Any, data: bytes) -> bool:
    """Bytes straight to the socket, past the WebSocket library (False: the socket is shut)."""
    t = ws.transport
    if t.is_closing():
        return False
    try:
        t.write(data)
    except RuntimeError:  # after write_eof (the library finished its closing handshake)
        return False
    return True


async def first_of(*events: asyncio.Event, timeout: float | None) -> bool:
    """Wait until one of the events is set (True) or the timeout passes (False)."""
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        done, _ = await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        return bool(done)
    finally:
        for w in waiters:
            w.cancel()


class Conn:
    def __init__(self, ctx: Ctx, script: Script):
        self.ctx = ctx
        self.sc = script
        self.r = ctx.report
        self.ws: Any = None
        self.allowed: dict[int, str] = {}     # close codes the input explains
        self.recent: collections.deque = collections.deque(maxlen=RECENT_CASES)
        self.t_open = 0.0
        self.first_text: Verdict | None = None
        self.first_text_at: float | None = None
        self.texts = 0
        self.rate_model = ClientRateModel()
        self.pings = Bucket(PING_RATE, PING_BURST)
        self.typed = Bucket(TYPED_RATE, TYPED_BURST)
        self.typed_refused = 0
        self.ready: dict | None = None
        self.ready_evt = asyncio.Event()
        self.closed_evt = asyncio.Event()
        self.live_evt = asyncio.Event()
        self.live_id = f"live-{script.idx}-{secrets.token_hex(3)}"
        self.read_gate = asyncio.Event()
        self.read_gate.set()
        self.aborted = False
        self.failing_frame = ""       # a frame after which the server may drop TCP at once (RFC 6455 §7.1.7)
        self.ended = False            # session.end was sent
        self.last_error: dict | None = None
        self.case_id = f"{script.idx}.-"
        self.found = False
        self.bytes_sent = 0

    def finding(self, kind: str, detail: str, key: str = "") -> None:
        self.found = True
        self.r.add(Finding(kind, detail, self.sc.idx, self.case_id, self.sc.mode, list(self.recent),
                           self.ready.get("session_id") if self.ready else None, key=key))
        if self.ctx.verbose:
            print(f"  FINDING {kind}: {detail}", flush=True)

    def allow(self, code: int, why: str) -> None:
        self.allowed.setdefault(code, why)

    # -- expectations, updated before each case is sent -------------------------------------------
    def expect_text(self, payload: str | bytes, label: str) -> None:
        data = payload if isinstance(payload, (bytes, bytearray)) else payload.encode("utf-8", "surrogatepass")
        if len(data) > MAX_TEXT_BYTES:
            self.allow(1009, "text over 64 KiB")
            self.failing_frame = "a text message over the 64 KiB limit"
        try:
            bytes(data).decode("utf-8")
        except UnicodeDecodeError:
            self.allow(1007, "invalid UTF-8 in a text frame (RFC 6455 §8.1)")
        self.texts += 1
        v = oracle(payload)
        if self.first_text is None:
            self.first_text, self.first_text_at = v, time.monotonic()
            if v.type != "session.start" or v.verdict != VALID:
                self.allow(4400, f"first message {v.verdict} ({v.why or v.type})")
            if v.auth:
                self.allow(4401, "session.start.auth is not a valid token")
            if v.resume:  # the conversation asked for may go away during the handshake (PROTOCOL additions)
                self.allow(1013, "conversation gone during the handshake")
            if self.first_text_at - self.t_open > 0.5 * self.ctx.cfg.handshake_timeout:
                self.allow(4408, "session.start sent late")
        elif v.type == "session.end":
            self.ended = True
            self.allow(1000, "session.end")
        elif v.type == "ping":
            self.pings.take(time.monotonic())
        elif v.typed_turn:
            if self.typed.take(time.monotonic()):
                self.typed_refused = 0
            else:
                self.typed_refused += 1
                if self.typed_refused >= TYPED_REFUSALS_TO_CLOSE - 4:
                    self.allow(4429, "typed turns too fast")

    def expect_binary(self, data: bytes) -> None:
        if len(data) > MAX_TEXT_BYTES:
            self.allow(1009, "frame over the server's 64 KiB message limit")
            self.failing_frame = "a binary frame over the 64 KiB message limit"
        if self.first_text is None:
            self.allow(4400, "audio before session.start")
            return
        if len(data) > MAX_FRAME_BYTES:
            self.allow(1009, "audio frame over 32 KiB")
        self.rate_model.add(len(data) / (2 * self.first_text.rate), time.monotonic())
        if self.rate_model.over:
            self.allow(4429, "audio faster than 2x real time")
        self.r.audio_in_bytes += len(data)

    # -- receiving -----------------------------------------------------------------------------------
    async def reader(self) -> None:
        ws = self.ws
        try:
            while True:
                if not self.read_gate.is_set():
                    await self.read_gate.wait()
                msg = await ws.recv()
                if isinstance(msg, bytes):
                    continue
                self.on_text(msg)
        except ConnectionClosed:
            pass
        finally:
            self.closed_evt.set()

    def on_text(self, text: str) -> None:
        try:
            msg = orjson.loads(text)
        except orjson.JSONDecodeError:
            self.finding("malformed_server_message", f"not JSON: {text[:200]!r}")
            return
        t = msg.get("type") if isinstance(msg, dict) else None
        if not isinstance(t, str):
            self.finding("malformed_server_message", f"no type: {text[:200]!r}")
            return
        self.r.server_messages[t if t in SERVER_TYPES else "other"] += 1
        if t == "pong" and msg.get("id") == self.live_id:
            self.live_evt.set()
        elif t == "session.ready":
            if self.ready is not None:
                self.finding("protocol", "a second session.ready on one connection")
            self.ready = msg
            self.r.readies += 1
            self.ready_evt.set()
            p = self.ctx.pools
            if isinstance(msg.get("resume_token"), str):
                p.resume.append((msg["resume_token"], msg.get("conversation_id")))
            if isinstance(msg.get("conversation_id"), str):
                p.conversations.append(msg["conversation_id"])
            if isinstance(msg.get("session_id"), str) and len(self.ctx.sessions) < 200_000:
                self.ctx.sessions[msg["session_id"]] = self.sc.idx
            v = self.first_text
            if v is not None and v.verdict == INVALID and v.type == "session.start":
                self.finding("invalid_start_accepted",
                             f"session.ready after a session.start the contract rejects ({v.why})")
        elif t == "transcript":
            if msg.get("receipt"):
                self.ctx.pools.receipts.append(msg["receipt"])
            if isinstance(msg.get("item_id"), str):
                self.ctx.pools.items.append(msg["item_id"])
        elif t == "error":
            code = msg.get("code")
            self.r.error_codes[str(code)] += 1
            if msg.get("fatal"):
                self.last_error = msg
            if code == "internal_error":
                self.finding("internal_error", f"error message: {text[:300]}")

    # -- running -------------------------------------------------------------------------------------
    async def run(self) -> None:
        sc = self.sc
        if sc.raw_tcp:
            return await self.run_tcp()
        if sc.bad_origin:
            self.allow(4403, "Origin not allowed")
        if sc.bearer:
            self.allow(4401, "bad bearer token")
        self.t_open = time.monotonic()
        try:
            self.ws = await websockets.connect(
                self.ctx.cfg.url, subprotocols=sc.subprotocols, additional_headers=sc.headers or None,
                compression="deflate" if sc.compression else None, max_size=2**23, open_timeout=OPEN_TIMEOUT_S,
                ping_interval=None, close_timeout=10, max_queue=16)
        except InvalidStatus as e:
            status = e.response.status_code
            self.r.outcomes[f"http {status}"] += 1
            self.finding("connect_failed", f"the upgrade was answered HTTP {status}, not 101")
            return
        except (OSError, TimeoutError, InvalidHandshake) as e:
            self.r.outcomes["connect failed"] += 1
            if not self.ctx.stop:
                self.finding("connect_failed", f"{type(e).__name__}: {e}")
            return
        reader = asyncio.create_task(self.reader())
        self.ctx.active.add(self)
        try:
            await self.play()
        finally:
            self.ctx.active.discard(self)
            await self.finish(reader)
            self.ctx.finished.append((time.monotonic(), self))

    async def play(self) -> None:
        ws, sc = self.ws, self.sc
        for n, step in enumerate(sc.steps):
            if self.ctx.stop and step.op not in ("close", "abort"):
                break
            if step.is_case:
                self.case_id = f"{sc.idx}.{n}"
                if ws.protocol.state is not State.OPEN and step.op != "close_raw":
                    # The server closed (or is closing): text and binary frames still go, straight to the
                    # socket while it is open (frames after close); anything else is skipped.
                    data = step.data if isinstance(step.data, bytes) else str(step.data).encode("utf-8", "surrogatepass")
                    if step.op in ("text", "bin") and raw_write(ws, raw_frame(1 if step.op == "text" else 2, data)):
                        self.recent.append(f"{self.case_id} {step.op} after_close {short(step.data, 100)}")
                        self.r.cases += 1
                        self.r.case_kinds["after_close:" + step.op] += 1
                    else:
                        self.r.cases_skipped += 1
                    continue
                self.recent.append(f"{self.case_id} {step.op} {step.label} {short(step.data, 100)}")
                self.r.cases += 1
                self.r.case_kinds[step.label or step.op] += 1
            if self.ctx.verbose:
                print(f"[{self.case_id}] {step.op} {step.label} {short(step.data)}", flush=True)
            try:
                async with asyncio.timeout(SEND_TIMEOUT_S):
                    await self.do(step)
            except ConnectionClosed:
                continue
            except TimeoutError:
                if step.op in ("text", "bin", "frag", "wsping"):
                    self.finding("hang", f"a {step.op} send stalled for {SEND_TIMEOUT_S:.0f} s (the server stopped "
                                         "reading this connection)")
                    self.aborted = True
                    ws.transport.abort()
                    return
                raise

    async def do(self, step: Step) -> None:
        ws, op = self.ws, step.op
        if isinstance(step.data, (str, bytes)):
            self.bytes_sent += len(step.data)
        if op == "text":
            self.expect_text(step.data, step.label)
            await ws.send(step.data, text=True)
        elif op == "bin":
            self.expect_binary(step.data)
            await ws.send(step.data)
        elif op == "frag":
            data = b"".join(step.data)
            if step.arg == "text":
                self.expect_text(data, step.label)
                await ws.send(step.data, text=True)
            else:
                self.expect_binary(data)
                await ws.send(step.data, text=False)
        elif op == "wsping":
            try:
                await ws.ping(step.data)
            except ConcurrencyError:  # a ping with this payload is still unanswered: send it anyway
                raw_write(ws, raw_frame(9, step.data))
        elif op == "raw":
            codes, same_as = step.arg
            for code in codes:
                self.allow(code, step.label)
            self.failing_frame = f"a frame that breaks RFC 6455 ({step.label})"
            if same_as is not None:
                self.expect_text(same_as, step.label)
            raw_write(ws, step.data)
        elif op == "sleep":
            if step.data:
                await asyncio.sleep(step.data)
        elif op == "noread":
            if step.data:
                self.allow(4429, "client not reading")
                self.read_gate.clear()
                asyncio.get_running_loop().call_later(step.data, self.read_gate.set)
        elif op == "await_ready":
            await self.await_ready(maybe=step.arg == "maybe")
        elif op == "live":
            await self.liveness()
        elif op == "close":
            code, reason = step.arg
            self.r.client_closes[code] += 1
            await ws.close(code, reason)
        elif op == "close_raw":  # a close frame, then data frames after it
            code, reason = step.arg
            self.r.client_closes[code] += 1
            with contextlib.suppress(Exception):
                ws.protocol.send_close(code, reason)
                ws.send_data()
            for frame in step.data:
                raw_write(ws, frame)
        elif op == "abort":
            self.aborted = True
            ws.transport.abort()

    async def await_ready(self, *, maybe: bool) -> None:
        if await first_of(self.ready_evt, self.closed_evt, timeout=READY_TIMEOUT_S):
            return
        v = self.first_text
        if v is not None and v.type == "session.start" and v.verdict != INVALID:
            self.finding("hang", f"no session.ready and no close {READY_TIMEOUT_S:.0f} s after session.start "
                                 f"(oracle: {v.verdict})")

    async def liveness(self) -> None:
        """A session that should be alive answers a ping (a hang otherwise). Pings past the server's
        rate go unanswered by design, so each one waits for the modelled bucket to refill."""
        if self.closed_evt.is_set() or self.ready is None:
            return
        deadline = time.monotonic() + self.ctx.cfg.liveness_timeout
        tries = 0
        while time.monotonic() < deadline:
            now = time.monotonic()
            if (level := self.pings.level(now)) < 3.0:
                await asyncio.sleep(min((3.0 - level) / PING_RATE, max(0.0, deadline - now)))
            self.pings.take(time.monotonic())
            tries += 1
            await self.ws.send(orjson.dumps({"type": "ping", "id": self.live_id}).decode())
            if await first_of(self.live_evt, self.closed_evt, timeout=min(5.0, max(0.1, deadline - time.monotonic()))):
                return
        self.finding("hang", f"no pong to {tries} pings over {self.ctx.cfg.liveness_timeout:.0f} s at the end of the "
                             "script")

    async def finish(self, reader: asyncio.Task) -> None:
        ws = self.ws
        if self.ctx.outage:  # the server is down or hung: nothing this connection saw is its own finding
            ws.transport.abort()
            reader.cancel()
            with contextlib.suppress(BaseException):
                await reader
            return
        if not self.closed_evt.is_set() and not self.aborted:
            if not self.read_gate.is_set():
                self.read_gate.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), CLOSE_WAIT_S)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(reader), CLOSE_WAIT_S)
        if not reader.done():
            reader.cancel()
            with contextlib.suppress(BaseException):
                await reader
            ws.transport.abort()
            self.finding("hang", f"the connection did not close within {CLOSE_WAIT_S:.0f} s of the end of the script")
            return
        self.classify()

    def classify(self) -> None:
        ws, r = self.ws, self.r
        proto = ws.protocol
        rcvd, sent = proto.close_rcvd, proto.close_sent
        if self.aborted and rcvd is None:
            r.outcomes["aborted by the fuzzer (1006)"] += 1
            return
        if rcvd is None and self.failing_frame:
            # The server fails the connection (RFC 6455 §7.1.7) with part of our frame unread: closing
            # its socket then sends a TCP reset, which can destroy its close frame before we read it.
            r.outcomes["1006 after a frame the server must fail the connection for"] += 1
            return
        if rcvd is None:
            r.outcomes["1006 abnormal"] += 1
            self.finding("abnormal_closure", "the connection ended without a close frame from the server (1006)"
                         + (f"; last fatal error: {self.last_error}" if self.last_error else ""))
            return
        code, reason = rcvd.code, rcvd.reason
        server_first = sent is None or bool(proto.close_rcvd_then_sent)
        if not server_first and sent is not None and code == sent.code:
            r.outcomes["client close echoed"] += 1
            return
        r.server_closes[code] += 1
        r.close_reasons[f"{code} {reason[:40]}"] += 1
        r.outcomes["server close"] += 1
        if code in ADMISSION and self.ready is None and any(x in reason for x in ADMISSION[code]):
            r.outcomes[f"admission refusal {code} {reason}"] += 1
        elif code == 4409 and self.ready is not None and self.ready.get("conversation_id") in self.ctx.pools.drawn:
            r.outcomes["4409: another fuzzing connection resumed this conversation"] += 1
        elif code == 1011:
            self.finding("internal_error", f"close 1011 {reason!r}" + (f"; error: {self.last_error}"
                                                                       if self.last_error else ""),
                         key=f"internal_error: close 1011 {reason[:60]!r}")
        elif code == 4408 and (self.first_text is None or self.first_text_at - self.t_open
                               > 0.5 * self.ctx.cfg.handshake_timeout):
            pass
        elif code not in self.allowed:
            v = self.first_text
            hint = ""
            if code == 4400 and v is not None and v.verdict == VALID:
                hint = " (a session.start the contract accepts was rejected)"
            elif code == 4408 and v is not None:
                hint = (f" (session.start sent in time: {self.first_text_at - self.t_open:.2f} s after the upgrade, "
                        f"handshake timeout {self.ctx.cfg.handshake_timeout:g} s)")
            key = f"unexpected_close: close {code} {reason[:60]!r}{hint.split(':')[0]}"
            self.finding("unexpected_close", key=key,
                         detail=f"close {code} {reason!r}{hint}; explained by the input: "
                         f"{sorted(self.allowed) or 'nothing'}" + (f"; fatal error: {self.last_error}"
                                                                  if self.last_error else ""))

    # -- not a WebSocket at all ---------------------------------------------------------------------
    async def run_tcp(self) -> None:
        step = self.sc.steps[0]
        self.case_id = f"{self.sc.idx}.0"
        self.recent.append(f"{self.case_id} tcp {step.label} {short(step.data, 100)}")
        self.r.cases += 1
        self.r.case_kinds[step.label] += 1
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(self.ctx.host, self.ctx.port), 10)
        except (OSError, TimeoutError) as e:
            self.r.tcp_outcomes["connect failed"] += 1
            self.finding("connect_failed", f"TCP connect: {type(e).__name__}: {e}")
            return
        status = "no response"
        try:
            if step.data:
                writer.write(step.data)
                with contextlib.suppress(OSError):
                    await asyncio.wait_for(writer.drain(), 10)
            with contextlib.suppress(TimeoutError, OSError):
                head = await asyncio.wait_for(reader.read(4096), 3)
                if head.startswith(b"HTTP/1."):
                    status = "http " + head[9:12].decode(errors="replace")
                elif head:
                    status = "other bytes"
                else:
                    status = "closed"
        finally:
            writer.transport.abort()
        self.r.tcp_outcomes[f"{step.label} -> {status}"] += 1
        if status.startswith("http 5"):
            self.finding("server_error_status", f"{step.label}: {status}")


# ---------------------------------------------------------------------------------------------------
# The healthy session (a child process, so the fuzzer's own load does not distort its timings)

KEEP_SAMPLES = 20_000   # round trips kept for percentiles (a uniform sample past that)


def _sample_add(values: list, x: float, seen: int, rng: random.Random) -> None:
    if len(values) < KEEP_SAMPLES:
        values.append(x)
    elif (k := rng.randrange(seen)) < KEEP_SAMPLES:
        values[k] = x


async def healthy_child(args: argparse.Namespace) -> int:
    """`--healthy-child`: the reference client talking to the gateway while it is fuzzed. Reads "stop"
    (finish the turn under way, at least --min-turns in all) or "abort" (the server failed: now) on stdin;
    prints READY once connected and RESULT {json} at the end."""
    from gateway.client import VoiceClient

    out: dict[str, Any] = {"connected": False, "pings": 0, "turns": 0, "answered": 0, "failures": [], "errors": [],
                           "close_code": None, "aborted": False}
    rtts: list[float] = []
    seen = [0]
    outstanding: dict[int, float] = {}
    turn_s: list[float] = []
    sample_rng = random.Random(0)

    def on_message(msg: dict) -> None:
        if msg.get("type") == "pong":
            t = outstanding.pop(msg.get("id"), None)
            if t is not None:
                seen[0] += 1
                _sample_add(rtts, round((time.perf_counter() - t) * 1000, 2), seen[0], sample_rng)
        elif msg.get("type") == "error" and len(out["errors"]) < 20:
            out["errors"].append(msg)

    stop, abort = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()

    def watch_stdin() -> None:
        for line in sys.stdin:
            if line.strip() == "abort":
                loop.call_soon_threadsafe(abort.set)
            loop.call_soon_threadsafe(stop.set)
        loop.call_soon_threadsafe(stop.set)  # EOF: the parent is gone

    threading.Thread(target=watch_stdin, daemon=True).start()
    deadline = time.monotonic() + args.max_seconds
    client = VoiceClient(args.url, on_message=on_message, output_rate=16000)
    client.speed = 1.0
    try:
        t0 = time.perf_counter()
        ready = await asyncio.wait_for(client.connect(), 60)
        out["connected"] = True
        out["connect_ms"] = round((time.perf_counter() - t0) * 1000, 1)
        out["session_id"] = ready.get("session_id")
    except Exception as e:  # noqa: BLE001
        out["failures"].append(f"connect: {type(e).__name__}: {e}")
        print("RESULT " + json.dumps(out), flush=True)
        return 1
    print("READY " + json.dumps({"session_id": ready.get("session_id")}), flush=True)

    async def pinger() -> None:
        n = 0
        next_at = time.monotonic()
        while client.close_code is None:
            n += 1
            outstanding[n] = time.perf_counter()
            try:
                await client.send({"type": "ping", "id": n})
            except Exception:  # noqa: BLE001
                outstanding.pop(n, None)
                return
            out["pings"] = n
            next_at += args.ping_every
            now = time.monotonic()
            next_at = max(next_at, now)  # no catch-up burst after a stall (the server answers 5/s, bursts of 20)
            await asyncio.sleep(next_at - now)

    async def talker() -> None:
        k = 0
        while time.monotonic() < deadline and client.close_code is None:
            if stop.is_set() and out["turns"] >= args.min_turns:
                return
            text = PHRASES[k % len(PHRASES)]
            k += 1
            out["turns"] += 1
            t = time.perf_counter()
            try:
                res = await client.turn(text=text, timeout=args.turn_timeout)
                if res["assistant"].strip():
                    out["answered"] += 1
                    turn_s.append(round(time.perf_counter() - t, 3))
                else:
                    out["failures"].append(f"turn {k} ({text!r}): empty reply")
            except Exception as e:  # noqa: BLE001
                out["failures"].append(f"turn {k} ({text!r}): {type(e).__name__}: {e}")
            client.audio.clear()  # bounded memory over a long run
            client.audio_by_item.clear()
            if len(client.messages) > 5000:
                del client.messages[:-1000]
            await first_of(stop, timeout=args.turn_pause)

    ping_task = asyncio.create_task(pinger())
    talk_task = asyncio.create_task(talker())
    aborted = asyncio.create_task(abort.wait())
    await asyncio.wait({talk_task, aborted}, timeout=max(0.0, deadline - time.monotonic()),
                       return_when=asyncio.FIRST_COMPLETED)
    if not talk_task.done():
        talk_task.cancel()
    with contextlib.suppress(BaseException):
        await talk_task
    if not abort.is_set():
        await first_of(stop, abort, timeout=max(0.0, deadline - time.monotonic()))
    aborted.cancel()
    out["aborted"] = abort.is_set()
    ping_task.cancel()
    with contextlib.suppress(BaseException):
        await ping_task
    grace = time.monotonic() + (0 if abort.is_set() else 5)
    while outstanding and time.monotonic() < grace and client.close_code is None:
        await asyncio.sleep(0.05)
    out["close_code"] = client.close_code
    out["pongs"] = seen[0]
    out["lost"] = len(outstanding)
    now = time.perf_counter()
    out["lost_detail"] = [f"ping {k} sent {now - t:.1f} s before the end" for k, t in list(outstanding.items())[:10]]
    out["rtt_ms"] = rtts
    out["turn_s"] = turn_s
    with contextlib.suppress(Exception):
        await asyncio.wait_for(client.close(), 5)
    print("RESULT " + json.dumps(out), flush=True)
    return 0


def _pct(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return 0.0
    k = (len(sorted_values) - 1) * p / 100
    lo, hi = math.floor(k), math.ceil(k)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


class Healthy:
    """The parent's handle on the healthy session's process."""

    def __init__(self, cfg: FuzzConfig):
        self.cfg = cfg
        self.proc: asyncio.subprocess.Process | None = None
        self.errfile = tempfile.TemporaryFile()

    async def start(self) -> str | None:
        cfg = self.cfg
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, str(Path(__file__).resolve()), "--healthy-child", "--url", cfg.url,
            "--ping-every", str(cfg.ping_every), "--turn-pause", str(cfg.turn_pause),
            "--turn-timeout", str(cfg.turn_timeout), "--min-turns", str(cfg.min_turns),
            "--max-seconds", str(cfg.max_seconds + 120),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=self.errfile, cwd=str(ROOT))
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), 90)
        except TimeoutError:
            await self._kill()
            return "the healthy session did not connect within 90 s"
        text = line.decode(errors="replace").strip()
        if text.startswith("READY"):
            return None
        await self._kill()
        return f"the healthy session did not start: {text[:500] or self._stderr()}"

    def _stderr(self) -> str:
        self.errfile.seek(0)
        return self.errfile.read()[-2000:].decode(errors="replace")

    async def _kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        await self.proc.wait()

    async def stop(self, *, abort: bool = False) -> dict:
        proc = self.proc
        with contextlib.suppress(Exception):
            proc.stdin.write(b"abort\n" if abort else b"stop\n")
            await proc.stdin.drain()
            proc.stdin.close()
        result: dict = {}
        limit = 30 if abort else self.cfg.turn_timeout * (self.cfg.min_turns + 1) + 30
        try:
            async with asyncio.timeout(limit):
                while line := await proc.stdout.readline():
                    text = line.decode(errors="replace").strip()
                    if text.startswith("RESULT "):
                        result = json.loads(text[7:])
                await proc.wait()
        except TimeoutError:
            result.setdefault("failures", []).append(f"the healthy session did not finish within {limit:.0f} s")
            await self._kill()
        if not result:
            result = {"failures": [f"no result from the healthy session (exit {proc.returncode}): {self._stderr()}"]}
        result["aborted"] = result.get("aborted", False) or abort
        return result


class HealthyTotals:
    """The healthy session over the whole run (one per server segment when the server is restarted)."""

    def __init__(self):
        self.segments: list[dict] = []
        self.rtts: list[float] = []
        self.turn_s: list[float] = []
        self._seen = 0
        self._rng = random.Random(0)

    def add(self, seg: dict) -> None:
        for x in seg.pop("rtt_ms", []) or []:
            self._seen += 1
            _sample_add(self.rtts, x, self._seen, self._rng)
        self.turn_s.extend(seg.pop("turn_s", []) or [])
        self.segments.append(seg)

    def summary(self) -> dict:
        segs = self.segments
        if not segs:
            return {}
        out: dict[str, Any] = {
            "sessions": len(segs),
            "connected": all(s.get("connected") for s in segs),
            "interrupted_by_server_failure": sum(1 for s in segs if s.get("aborted")),
            "close_codes": [s.get("close_code") for s in segs if s.get("close_code") is not None],
        }
        for k in ("pings", "pongs", "lost", "turns", "answered"):
            out[k] = sum(s.get(k, 0) or 0 for s in segs)
        if self.rtts:
            ms = sorted(self.rtts)
            out["rtt_ms"] = {"p50": round(_pct(ms, 50), 1), "p90": round(_pct(ms, 90), 1),
                             "p99": round(_pct(ms, 99), 1), "max": round(ms[-1], 1)}
        if self.turn_s:
            ts = sorted(self.turn_s)
            out["turn_s"] = {"p50": round(_pct(ts, 50), 2), "max": round(ts[-1], 2)}
        return out


# ---------------------------------------------------------------------------------------------------
# Watching the server


async def http_get(host: str, port: int, path: str, timeout: float) -> int:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readline(), timeout)
        return int(head.split()[1])
    finally:
        writer.transport.abort()


class ServerHandle:
    """What the fuzzer knows of the gateway under test: its process (to notice a crash), its log, how
    to look inside it when it hangs (py-spy, when installed) and, for --spawn, how to start it again."""

    def __init__(self, *, proc: subprocess.Popen | None = None, pid: int | None = None,
                 logs: list[str] | None = None, py_spy: str | None = None):
        self.proc = proc
        self._pid = pid
        self.logs = logs or []
        self.py_spy = py_spy or shutil.which("py-spy")

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else self._pid

    @property
    def can_restart(self) -> bool:
        return False

    def dead(self) -> str | None:
        if self.proc is not None:
            return None if self.proc.poll() is None else f"the gateway process exited with status {self.proc.returncode}"
        if self._pid is not None:
            try:
                os.kill(self._pid, 0)
            except ProcessLookupError:
                return f"the gateway process {self._pid} is gone"
            except PermissionError:
                pass
        return None

    def diagnose(self) -> list[str]:
        """The server's main-thread stack (py-spy) and CPU time, and the end of its log."""
        out: list[str] = []
        pid = self.pid
        if pid is not None and self.dead() is None:
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                tick = os.sysconf("SC_CLK_TCK")
                out.append(f"process {pid}: state {stat[0]}, CPU user {int(stat[11]) / tick:.1f} s, "
                           f"system {int(stat[12]) / tick:.1f} s")
            if self.py_spy:
                try:
                    dump = subprocess.run([self.py_spy, "dump", "--pid", str(pid)], capture_output=True, text=True,
                                          timeout=30).stdout
                    main = dump.split("Thread ")[1] if "Thread " in dump else dump
                    out.extend("py-spy: " + ln.strip() for ln in ("Thread " + main).splitlines()[:14])
                except (OSError, subprocess.SubprocessError) as e:
                    out.append(f"py-spy failed: {e}")
            else:
                out.append("(install py-spy, or pass --py-spy, to see where the server is stuck)")
        if self.logs:
            with contextlib.suppress(OSError):
                tail = Path(self.logs[-1]).read_bytes()[-3000:].decode(errors="replace").splitlines()[-6:]
                out.extend("log tail: " + ln[:300] for ln in tail)
        return out

    def restart(self) -> bool:
        return False


async def monitor(ctx: Ctx, server: ServerHandle | None, done: asyncio.Event) -> None:
    """Probe /healthz every healthz_every s; a dead process or a /healthz that stays silent for
    healthz_outage s is a server failure: ctx.failure is set (the run stops or restarts the server)."""
    cfg, h = ctx.cfg, ctx.report.health
    for k, v in (("probes", 0), ("failures", 0), ("max_ms", 0.0)):
        h.setdefault(k, v)
    down_since: float | None = None
    while not done.is_set():
        dead = server.dead() if server is not None else None
        if dead:
            ctx.fail("server_crash", dead)
            return
        t = time.perf_counter()
        t0_probe = time.monotonic()
        ok = False
        with contextlib.suppress(Exception):
            ok = await http_get(ctx.host, ctx.port, "/healthz", 5.0) == 200
        h["probes"] += 1
        if ok:
            ms = (time.perf_counter() - t) * 1000
            ctx.healthz_ms.append(ms)
            h["max_ms"] = round(max(h["max_ms"], ms), 1)
            down_since = ctx.down_since = None
        else:
            h["failures"] += 1
            down_since = down_since or t0_probe
            ctx.down_since = down_since
            if time.monotonic() - down_since >= cfg.healthz_outage:
                ctx.fail("server_unresponsive", f"/healthz has not answered for {cfg.healthz_outage:.0f} s"
                         + (" (the process is alive)" if server is not None and server.pid else ""))
                return
        await first_of(done, timeout=cfg.healthz_every)


def scan_log(path: str, offset: int, ctx: Ctx, end: int | None = None) -> dict:
    """ERROR-level lines (and tracebacks) the server logged during the run."""
    info = {"path": path, "lines": 0, "levels": collections.Counter(), "errors": collections.Counter()}
    by_session: dict[str, list[str]] = collections.defaultdict(list)
    wanted = {f.session_id for f in ctx.report.findings if f.session_id}  # the server's account of those only
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            pos = offset
            for raw in f:
                if end is not None and pos >= end:  # what the triage's replays logged is not the run's
                    break
                pos += len(raw)
                info["lines"] += 1
                line = raw.decode(errors="replace").rstrip()
                try:
                    entry = orjson.loads(line)
                except orjson.JSONDecodeError:
                    entry = None
                if isinstance(entry, dict):
                    level = str(entry.get("level", "?"))
                    info["levels"][level] += 1
                    sid = entry.get("session_id")
                    if isinstance(sid, str) and sid in wanted and len(by_session[sid]) < 12:
                        by_session[sid].append(line[:600])
                    if level in ("error", "critical"):
                        key = str(entry.get("msg")).strip()[:80]
                        info["errors"][key] += 1
                        if info["errors"][key] == 1:
                            conn = ctx.sessions.get(sid) if isinstance(sid, str) else None
                            ctx.report.add(Finding("server_log_error", f"{key!r} logged at level {level}", conn,
                                                   session_id=sid if isinstance(sid, str) else None,
                                                   log=[line[:3000]]))
                elif "Traceback" in line or "Error" in line and "Deprecat" not in line and "warnings.warn" not in line:
                    key = "non-JSON: " + line[:80]
                    info["errors"][key] += 1
                    if info["errors"][key] == 1:
                        ctx.report.add(Finding("server_log_error", line[:300]))
    except OSError as e:
        info["error"] = str(e)
    for f in ctx.report.findings:  # the server's own account of each finding's session
        if f.session_id and not f.log:
            f.log = by_session.get(f.session_id, [])
    info["levels"], info["errors"] = dict(info["levels"]), dict(info["errors"])
    return info



# ---------------------------------------------------------------------------------------------------
# The run


@dataclass
class FuzzConfig:
    url: str = ""
    cases: int = 100_000
    connections: int = 50
    seed: int = 1
    handshake_timeout: float = 5.0
    max_seconds: float = 1800.0
    ping_every: float = 0.2
    turn_pause: float = 1.0
    turn_timeout: float = 60.0
    min_turns: int = 3
    liveness_timeout: float = 20.0
    healthz_every: float = 1.0
    healthz_outage: float = 10.0
    healthy: bool = True
    server_log: str | None = None
    server_pid: int | None = None
    replay: list[int] | None = None
    verbose: bool = False
    max_findings: int = 100
    progress_every: float = 0.0
    restart: bool = True          # --spawn: after a crash or hang, start the gateway again and go on
    triage: bool = True           # --spawn: then replay the suspects alone to name the culprit


def check_url(url: str) -> None:
    u = urlsplit(url)
    if u.scheme != "ws" or u.hostname not in ("127.0.0.1", "localhost"):
        raise SystemExit(f"fuzz_live: only ws://127.0.0.1 targets are allowed (got {url!r})")


async def run_fuzz(cfg: FuzzConfig, *, server: ServerHandle | None = None) -> Report:
    """Fuzz the running gateway at cfg.url; returns the report (findings in report.findings).

    `server` (optional) lets the fuzzer notice a crash (its process), read its log, look inside it when
    it hangs and, for a spawned gateway, restart it and go on (each restart begins a new segment)."""
    check_url(cfg.url)
    report = Report(cfg.seed, cfg.url, cfg.cases, cfg.connections, max_findings=cfg.max_findings)
    ctx = Ctx(cfg, report)
    if server is None and (cfg.server_log or cfg.server_pid):
        server = ServerHandle(pid=cfg.server_pid, logs=[cfg.server_log] if cfg.server_log else [])
    offsets = {p: (os.path.getsize(p) if os.path.exists(p) else 0) for p in (server.logs if server else [])}
    totals = HealthyTotals()
    t0 = time.monotonic()
    replay = list(cfg.replay or [])

    async def worker() -> None:
        while not ctx.stop:
            if cfg.replay is not None:
                if not replay:
                    return
                idx = replay.pop(0)
            else:
                if report.cases >= cfg.cases:
                    return
                idx = ctx.next_idx
                ctx.next_idx += 1
            if time.monotonic() > ctx.deadline:
                report.incomplete = f"time limit of {cfg.max_seconds:.0f} s reached"
                ctx.stop = True
                return
            script = make_script(cfg.seed, idx, ctx.pools)
            report.scripts += 1
            report.modes[script.mode] += 1
            if cfg.verbose:
                print(f"== connection {idx}: mode {script.mode}, {script.n_cases} cases, subprotocols "
                      f"{script.subprotocols}, headers {script.headers}, compression {script.compression}", flush=True)
            conn = Conn(ctx, script)
            try:
                async with asyncio.timeout(SCRIPT_CAP_S):
                    await conn.run()
            except TimeoutError:
                if not ctx.outage:
                    conn.finding("hang", f"the script did not finish in {SCRIPT_CAP_S:.0f} s")
                if conn.ws is not None:
                    conn.ws.transport.abort()
            except Exception as e:  # noqa: BLE001  (a bug of the fuzzer itself)
                report.fuzzer_errors.append(f"connection {idx} ({script.mode}): {type(e).__name__}: {e}\n"
                                            + traceback.format_exc(limit=6))
                if conn.ws is not None:
                    conn.ws.transport.abort()
            if cfg.verbose:
                print(f"== connection {idx}: close {conn.ws and conn.ws.close_code} "
                      f"{conn.ws and conn.ws.close_reason!r}; the input explains {conn.allowed}", flush=True)

    async def progress() -> None:
        while True:
            await asyncio.sleep(cfg.progress_every)
            print(f"fuzz_live: {time.monotonic() - t0:.0f} s: {report.cases} cases, {report.scripts} connections, "
                  f"{sum(report.finding_kinds.values())} findings", file=sys.stderr, flush=True)

    prog = asyncio.create_task(progress()) if cfg.progress_every else None
    log_ends: dict[str, int] = {}
    try:
        while True:
            report.segments += 1
            ctx.new_segment()
            healthy: Healthy | None = None
            if cfg.healthy and cfg.replay is None:
                healthy = Healthy(cfg)
                if err := await healthy.start():
                    report.add(Finding("healthy_session", err))
                    healthy = None
            done = asyncio.Event()
            mon = asyncio.create_task(monitor(ctx, server, done))
            n = 1 if cfg.replay is not None and len(cfg.replay) == 1 else cfg.connections
            workers = asyncio.ensure_future(asyncio.gather(*(worker() for _ in range(n))))
            await first_of(ctx.failure, _done_event(workers), timeout=None)
            if ctx.failure.is_set():
                ctx.outage = True
                since = (ctx.down_since or time.monotonic()) - SUSPECT_BEFORE_S
                suspect_conns = sorted({*ctx.active, *(c for t, c in ctx.finished if t >= since)},
                                       key=lambda c: -c.bytes_sent)[:MAX_SUSPECTS]  # the biggest senders first
                suspects = [f"connection {c.sc.idx} ({c.sc.mode}, {c.bytes_sent / 1024:.0f} KiB sent"
                            f"{', running' if c in ctx.active else ''}): "
                            + " | ".join(list(c.recent)[-2:]) for c in suspect_conns]
                dropped = report.retract(since, CONSEQUENCES)
                diag = await asyncio.to_thread(server.diagnose) if server is not None else []
                finding = Finding(ctx.failure_kind, f"{ctx.failure_reason}; after {report.cases} cases; "
                                  f"{len(suspects)} suspect connections (running, or ended just before: replay "
                                  f"them with --replay N,M,...)"
                                  + (f"; {dropped} connection findings since then are its consequences, "
                                     f"not counted" if dropped else ""),
                                  recent=suspects, log=diag, key=f"{ctx.failure_kind}: {ctx.failure_reason}")
                report.add(finding)
                report.outages.append({"segment": report.segments, "kind": ctx.failure_kind, "cases": report.cases,
                                       "suspects": [c.sc.idx for c in suspect_conns], "finding": finding})
                workers.cancel()
            with contextlib.suppress(BaseException):
                await workers
            done.set()
            with contextlib.suppress(BaseException):
                await mon
            if healthy is not None:
                totals.add(await healthy.stop(abort=ctx.outage))
            if not ctx.outage or ctx.stop or report.cases >= cfg.cases or cfg.replay is not None:
                break
            if not (cfg.restart and server is not None and server.can_restart):
                report.incomplete = "the server failed"
                break
            print(f"fuzz_live: {ctx.failure_kind}: restarting the gateway and going on", file=sys.stderr, flush=True)
            if not await asyncio.to_thread(server.restart):
                report.incomplete = "the server failed and did not start again"
                break
            report.restarts += 1
        log_ends = {p: os.path.getsize(p) for p in (server.logs if server else []) if os.path.exists(p)}
        if report.outages and cfg.triage and server is not None and server.can_restart and cfg.replay is None:
            await triage(cfg, server, report)
    finally:
        if prog is not None:
            prog.cancel()
        report.elapsed = round(time.monotonic() - t0, 1)
    if ctx.healthz_ms:
        ms = sorted(ctx.healthz_ms)
        report.health.update(p50_ms=round(_pct(ms, 50), 1), p99_ms=round(_pct(ms, 99), 1))
    if cfg.replay is None and report.cases < cfg.cases and not report.incomplete:
        report.incomplete = "stopped early"
    if report.incomplete.startswith("time limit"):
        report.add(Finding("incomplete", f"{report.cases} of {cfg.cases} cases sent: {report.incomplete}"))
    report.healthy = totals.summary()
    _judge_healthy(report, totals)
    if server is not None:
        report.server = {"logs": []}
        for path in server.logs:
            if path not in log_ends:  # started by the triage
                continue
            info = scan_log(path, offsets.get(path, 0), ctx, end=log_ends[path])
            report.server["logs"].append(info)
    return report


async def triage(cfg: FuzzConfig, server: ServerHandle, report: Report) -> None:
    """After a server failure: replay each suspect alone (a fresh server after each failure) to name
    the scripts that bring the server down by themselves; if none does, replay them all at once."""
    tcfg = dataclasses.replace(cfg, healthz_outage=5.0, healthy=False, verbose=False, liveness_timeout=5.0)
    tried: dict[int, bool] = {}
    deadline = time.monotonic() + TRIAGE_S
    for outage in report.outages[:3]:
        culprits = []
        suspects = outage["suspects"][:TRIAGE_MAX]  # the biggest senders first
        for idx in suspects:
            if time.monotonic() > deadline:
                break
            if idx not in tried:
                tried[idx] = await _reproduces(tcfg, server, [idx])
            if tried[idx]:
                culprits.append(idx)
        f = outage.pop("finding")
        outage["reproduced_alone_by"] = culprits
        if culprits:
            f.detail += (f"; replayed alone, connection(s) {', '.join(map(str, culprits))} bring(s) the server down "
                         f"again (replay: --replay {culprits[0]} -v)")
            f.conn, f.mode = culprits[0], "triage"
            continue
        together = time.monotonic() < deadline and await _reproduces(tcfg, server, suspects)
        outage["reproduced_together"] = together
        ids = ",".join(map(str, suspects))
        f.detail += ("; no suspect brings the server down alone, " + (
            f"but replayed together they do (--replay {ids})" if together else
            f"nor do they replayed together (--replay {ids}): a timing-dependent failure"))
    print(f"fuzz_live: triage: {[{k: v for k, v in o.items() if k != 'suspects'} for o in report.outages]}",
          file=sys.stderr, flush=True)


async def _reproduces(cfg: FuzzConfig, server: ServerHandle, ids: list[int]) -> bool:
    """Replay these scripts at once against the server: does it fail (then it is restarted)?"""
    ctx = Ctx(cfg, Report(cfg.seed, cfg.url, 0, len(ids)))
    conns = [Conn(ctx, make_script(cfg.seed, idx, ctx.pools)) for idx in ids]
    done = asyncio.Event()
    mon = asyncio.create_task(monitor(ctx, server, done))
    runs = asyncio.ensure_future(asyncio.gather(*(c.run() for c in conns), return_exceptions=True))
    await first_of(ctx.failure, _done_event(runs), timeout=60.0)
    if not ctx.failure.is_set():  # the scripts are over: is the server still there?
        await first_of(ctx.failure, timeout=2.0)
        ok = False
        with contextlib.suppress(Exception):
            ok = await http_get(ctx.host, ctx.port, "/healthz", 5.0) == 200
        if not ok:
            ctx.fail("server_unresponsive", "no /healthz after the scripts")
    failed = ctx.failure.is_set()
    ctx.outage = True  # drop the connections at once, whatever their state
    runs.cancel()
    with contextlib.suppress(BaseException):
        await runs
    done.set()
    with contextlib.suppress(BaseException):
        await mon
    if failed:
        await asyncio.to_thread(server.restart)
    return failed


def _done_event(fut: asyncio.Future) -> asyncio.Event:
    ev = asyncio.Event()
    fut.add_done_callback(lambda _: ev.set())
    return ev


def _judge_healthy(report: Report, totals: HealthyTotals) -> None:
    """Findings about the healthy session, from the segments the server did not fail in (a server
    failure is its own finding, and everything the healthy session saw after it follows from it)."""
    for seg in totals.segments:
        if seg.get("aborted"):
            continue
        sid = seg.get("session_id")
        if not seg.get("connected"):
            report.add(Finding("healthy_session", "the healthy session did not connect: "
                               + "; ".join(seg.get("failures", []))))
            continue
        if seg.get("close_code") is not None:
            report.add(Finding("healthy_session", f"the healthy session was closed by the server ({seg['close_code']})",
                               session_id=sid))
        for f in seg.get("failures", []):
            report.add(Finding("healthy_turn", f, session_id=sid))
        if seg.get("turns", 0) == 0:
            report.add(Finding("healthy_turn", "the healthy session completed no turn", session_id=sid))
        if seg.get("lost"):
            report.add(Finding("healthy_ping", f"{seg['lost']} of {seg.get('pings')} pings were never answered: "
                               f"{'; '.join(seg.get('lost_detail', []))}", session_id=sid))
        for e in seg.get("errors", []):
            report.add(Finding("healthy_session", f"the healthy session got an error: {e}", session_id=sid))


# ---------------------------------------------------------------------------------------------------
# Printing


def summary(report: Report, cfg: FuzzConfig, spawned: str | None = None) -> str:
    r = report
    out: list[str] = []
    w = out.append

    def counts(c: Any, limit: int = 40) -> str:
        items = sorted(dict(c).items(), key=lambda kv: (-kv[1], str(kv[0])))
        s = ", ".join(f"{k} ×{v}" for k, v in items[:limit])
        return (s + (f", … ({len(items) - limit} more)" if len(items) > limit else "")) if items else "none"

    w(f"novagate live fuzz — seed {r.seed}: {r.cases} cases sent over {r.scripts} connections "
      f"({cfg.connections if cfg.replay is None else len(cfg.replay)} concurrent) in {r.elapsed} s; {r.cases_skipped} cases not sent (the connection was "
      f"already closed); {r.url}" + (f" (spawned, {spawned})" if spawned else ""))
    if r.segments > 1 or r.outages:
        w(f"  server failures: {len(r.outages)}; restarts: {r.restarts}; segments: {r.segments}")
    w(f"  scripts by mode: {counts(r.modes)}")
    kinds: collections.Counter = collections.Counter()
    for k, v in r.case_kinds.items():
        kinds[k.split(":")[0] if k.startswith(("wrongtype", "first", "raw", "tcp")) else k] += v
    w(f"  cases by kind: {counts(kinds, 70)}")
    w(f"  server close codes: {counts({str(k): v for k, v in r.server_closes.items()})}")
    w(f"  server close reasons: {counts(r.close_reasons, 30)}")
    w(f"  connection endings: {counts(r.outcomes)}")
    w(f"  client close codes sent: {counts({str(k): v for k, v in r.client_closes.items()})}")
    w(f"  raw TCP (no WebSocket): {counts(r.tcp_outcomes, 20)}")
    w(f"  session.ready: {r.readies}; audio sent: {r.audio_in_bytes / 1e6:.1f} MB; server messages: "
      f"{counts(r.server_messages)}")
    w(f"  error codes received: {counts(r.error_codes)}")
    h = r.healthy
    if h:
        rtt = h.get("rtt_ms", {})
        ts = h.get("turn_s", {})
        w(f"  healthy session: {h['sessions']} session(s), connected: {h['connected']}, closed by the server: "
          f"{h['close_codes'] or 'never'}" + (f", {h['interrupted_by_server_failure']} cut short by a server failure"
                                              if h["interrupted_by_server_failure"] else ""))
        w(f"    pings {h['pings']}, pongs {h['pongs']}, lost {h['lost']}; round trip p50 {rtt.get('p50', '-')} ms, "
          f"p90 {rtt.get('p90', '-')} ms, p99 {rtt.get('p99', '-')} ms, max {rtt.get('max', '-')} ms")
        w(f"    typed turns answered {h['answered']}/{h['turns']}; turn time p50 {ts.get('p50', '-')} s, "
          f"max {ts.get('max', '-')} s")
    hl = r.health
    w(f"  server health: /healthz {hl.get('probes', 0)} probes, {hl.get('failures', 0)} failed; p50 "
      f"{hl.get('p50_ms', '-')} ms, p99 {hl.get('p99_ms', '-')} ms, max {hl.get('max_ms', '-')} ms")
    logs = (r.server or {}).get("logs", [])
    if logs:
        levels: collections.Counter = collections.Counter()
        errors: collections.Counter = collections.Counter()
        for info in logs:
            levels.update(info.get("levels") or {})
            errors.update(info.get("errors") or {})
        where = logs[0]["path"] if len(logs) == 1 else f"{len(logs)} files in {os.path.dirname(logs[0]['path'])}"
        w(f"  server log ({where}): {sum(i.get('lines', 0) for i in logs)} lines; levels {counts(levels)}; "
          f"errors: {counts(errors)}")
    if r.fuzzer_errors:
        w(f"  FUZZER ERRORS ({len(r.fuzzer_errors)}; bugs of the fuzzer, not of the server):")
        for e in r.fuzzer_errors[:5]:
            w("    " + e.replace("\n", "\n    "))
    total = sum(r.finding_kinds.values())
    w(f"findings: {total}" + (f" ({counts(r.finding_kinds)}); {len(r.groups)} distinct" if total else ""))
    rank = {k: i for i, k in enumerate(SEVERITY)}
    keys = sorted(r.groups, key=lambda k: (rank.get(k.split(":")[0], 99), -r.groups[k], k))
    for key in keys:
        examples = [f for f in r.findings if f.key == key]
        w(f"  * {key} (×{r.groups[key]})")
        for f in examples:
            where = f"connection {f.conn}, case {f.case}, mode {f.mode}: " if f.conn is not None else ""
            w(f"    - {where}{f.detail}")
            if f.conn is not None:
                w(f"      replay: .venv/bin/python scripts/fuzz_live.py --url {r.url} --seed {r.seed} "
                  f"--replay {f.conn} -v")
            suspects = f.kind.startswith("server_")
            for c in f.recent[-(40 if suspects else 4):]:
                w(f"      {'suspect' if suspects else 'sent'} {c[:300]}")
            for line in f.log[:20]:
                w(f"      {line[:400]}")
    if len(r.findings) >= r.max_findings:
        w(f"  (examples capped at --max-findings {r.max_findings})")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------
# --spawn: a gateway of our own (the embedded default, deterministic engine)


class Spawned(ServerHandle):
    def __init__(self, connections: int, handshake_timeout: float | None, keep: bool, py_spy: str | None = None):
        super().__init__(py_spy=py_spy)
        self.tmp = Path(tempfile.mkdtemp(prefix="novagate-fuzz-"))
        self.keep = keep
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.env = {
            **os.environ,
            "NOVAGATE_HOST": "127.0.0.1",
            "NOVAGATE_PORT": str(self.port),
            "NOVAGATE_ENGINE": "local",
            "NOVAGATE_STORE": "sqlite",
            "NOVAGATE_SQLITE_PATH": str(self.tmp / "novagate.db"),
            "NOVAGATE_SECRET_FILE": str(self.tmp / "secret"),
            "NOVAGATE_SECRET": secrets.token_urlsafe(48)[:48],
            "NOVAGATE_LOCAL_ASR": "sphinx",
            "NOVAGATE_LOCAL_TTS": "espeak",
            "NOVAGATE_LOCAL_GRAMMAR": GRAMMAR,
            "NOVAGATE_LOCAL_ENDPOINT_MS": "600",
            "NOVAGATE_MAX_SESSIONS": str(max(500, connections * 10)),
            # every fuzzing connection comes from 127.0.0.1: no per-address or handshake caps here
            "NOVAGATE_MAX_SOCKETS_PER_IP": "0",
            "NOVAGATE_MAX_PENDING_HANDSHAKES": "0",
            "NOVAGATE_METRICS_PORT": "0",     # no separate admin port (it would clash with other gateways)
            "NOVAGATE_DRAIN_GRACE_S": "5",
            "NOVAGATE_WORKERS": "1",          # one process (py-spy profiles it)
            "NOVAGATE_OVERLOAD_LAG_MS": "0",  # no overload refusals: the fuzzer itself loads the machine
            "NOVAGATE_OVERLOAD_CPU": "0",
        }
        if handshake_timeout is not None:
            self.env["NOVAGATE_HANDSHAKE_TIMEOUT"] = str(handshake_timeout)
        self.url = f"ws://127.0.0.1:{self.port}/v1/voice"
        self._logf = None
        self._start()

    @property
    def can_restart(self) -> bool:
        return True

    def _start(self) -> None:
        log = self.tmp / f"gateway-{len(self.logs) + 1}.log"
        self.logs.append(str(log))
        self._logf = open(log, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve"], env=self.env, cwd=ROOT,
                                     stdout=self._logf, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the gateway exited {self.proc.returncode}: {log.read_text()[-2000:]}")
            try:
                if asyncio.run(http_get("127.0.0.1", self.port, "/readyz", 1.0)) == 200:
                    return
            except (OSError, TimeoutError, ValueError, IndexError):
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("the gateway did not become ready in 120 s")

    def restart(self) -> bool:
        if self.proc.poll() is None:  # hung: SIGTERM would wait on the stuck loop
            self.proc.kill()
            self.proc.wait(30)
        self._logf.close()
        try:
            self._start()
            return True
        except RuntimeError as e:
            print(f"fuzz_live: {e}", file=sys.stderr)
            return False

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self._logf is not None:
            self._logf.close()
        return self.proc.returncode

    def cleanup(self) -> None:
        if not self.keep:
            shutil.rmtree(self.tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Live fuzzer for the novagate voice WebSocket (see docs/fuzzing.md)")
    where = ap.add_mutually_exclusive_group()
    where.add_argument("--url", help="a running gateway, ws://127.0.0.1:PORT/v1/voice (loopback only)")
    where.add_argument("--spawn", action="store_true", help="start a gateway of our own (local engine) and stop it")
    ap.add_argument("--cases", type=int, default=100_000, help="frames and messages to send (default 100000)")
    ap.add_argument("--connections", type=int, default=50, help="concurrent fuzzing connections (default 50)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--handshake-timeout", type=float, default=None,
                    help="the server's handshake timeout in s, for 4408 expectations (default 5)")
    ap.add_argument("--max-seconds", type=float, default=1800.0, help="hard bound of the run (default 1800)")
    ap.add_argument("--ping-every", type=float, default=0.2, help="healthy session: seconds between pings")
    ap.add_argument("--turn-pause", type=float, default=1.0, help="healthy session: pause between typed turns")
    ap.add_argument("--turn-timeout", type=float, default=60.0, help="healthy session: a turn is unanswered after this")
    ap.add_argument("--min-turns", type=int, default=3, help="healthy session: turns it completes at least")
    ap.add_argument("--liveness-timeout", type=float, default=20.0, help="a live session answers a ping within this")
    ap.add_argument("--no-healthy", action="store_true", help="no healthy session")
    ap.add_argument("--server-log", help="the gateway's log file, scanned for ERROR lines (--spawn: its own)")
    ap.add_argument("--server-pid", type=int, help="the gateway's pid: its death is a finding, py-spy looks into a hang")
    ap.add_argument("--no-restart", action="store_true", help="--spawn: stop at the first server failure")
    ap.add_argument("--py-spy", metavar="PATH", help="py-spy executable, to dump a hung server's stack (default: on PATH)")
    ap.add_argument("--replay", metavar="N[,M...]", help="run only these connection scripts of --seed")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every case (use with --replay)")
    ap.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    ap.add_argument("--keep", action="store_true", help="--spawn: keep the gateway's directory (logs, db)")
    ap.add_argument("--max-findings", type=int, default=100, help="findings listed in full (all are counted)")
    ap.add_argument("--progress", type=float, default=15.0, metavar="S", help="progress line on stderr every S s (0: none)")
    ap.add_argument("--healthy-child", action="store_true", help=argparse.SUPPRESS)  # the healthy session's process
    args = ap.parse_args(argv)
    if not args.healthy_child and not args.spawn and not args.url:
        ap.error("give --url ws://127.0.0.1:PORT/v1/voice or --spawn")
    if args.replay is not None:
        try:
            args.replay = [int(x) for x in args.replay.split(",") if x.strip()]
        except ValueError:
            ap.error("--replay takes connection numbers: 12 or 12,57,103")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.healthy_child:
        return asyncio.run(healthy_child(args))
    spawned: Spawned | None = None
    server: ServerHandle | None = None
    try:
        if args.spawn:
            print("fuzz_live: starting a gateway (local engine, sphinx + espeak) …", file=sys.stderr, flush=True)
            spawned = server = Spawned(args.connections, args.handshake_timeout, args.keep, args.py_spy)
            args.url = spawned.url
        else:
            check_url(args.url)
            if args.server_log or args.server_pid:
                server = ServerHandle(pid=args.server_pid, logs=[args.server_log] if args.server_log else [],
                                      py_spy=args.py_spy)
        cfg = FuzzConfig(url=args.url, cases=args.cases, connections=args.connections, seed=args.seed,
                         handshake_timeout=args.handshake_timeout or 5.0, max_seconds=args.max_seconds,
                         ping_every=args.ping_every, turn_pause=args.turn_pause, turn_timeout=args.turn_timeout,
                         min_turns=args.min_turns, liveness_timeout=args.liveness_timeout,
                         healthy=not args.no_healthy, replay=args.replay, verbose=args.verbose,
                         max_findings=args.max_findings, progress_every=args.progress, restart=not args.no_restart)
        what = (f"replaying connection(s) {', '.join(map(str, cfg.replay))}" if cfg.replay is not None
                else f"{cfg.cases} cases, {cfg.connections} connections")
        print(f"fuzz_live: {what}, seed {cfg.seed}, against {cfg.url}", file=sys.stderr, flush=True)
        report = asyncio.run(run_fuzz(cfg, server=server))
    except RuntimeError as e:
        print(f"fuzz_live: {e}", file=sys.stderr)
        return 2
    finally:
        if spawned is not None:
            code = spawned.stop()
            if code not in (0, None, -signal.SIGTERM):
                print(f"fuzz_live: the gateway exited with status {code} on SIGTERM", file=sys.stderr)
    print(summary(report, cfg, spawned=str(spawned.tmp) if spawned else None), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_json(), indent=1, default=str))
    findings = sum(report.finding_kinds.values())
    if spawned is not None:
        if findings or report.fuzzer_errors:
            spawned.keep = True
            print(f"fuzz_live: the gateway's logs are kept in {spawned.tmp}", file=sys.stderr)
        spawned.cleanup()
    if findings:
        return 1
    return 2 if report.fuzzer_errors else 0


if __name__ == "__main__":
    sys.exit(main())
