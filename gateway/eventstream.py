"""AWS event-stream codec (`application/vnd.amazon.eventstream`) and the Bedrock chunk-signature chain.

The Bedrock transport encodes and signs its input events with it (gateway.bedrock.EventWriter) and splits
and decodes its output events with it (gateway.bedrock.EventReader); the Nova emulator decodes and verifies
the input and encodes the output. Pure: no I/O, no clocks (callers pass dates in). Reference: reference/nova-sonic.md §8.2–§8.4.

Message framing (all integers big-endian, CRC32 as zlib computes it):

    [total_len u32][headers_len u32][prelude_crc u32 = crc32(first 8 bytes)]
    [headers ...][payload ...]
    [message_crc u32 = crc32(every preceding byte of the message)]
    header := [name_len u8][name utf-8][type u8][value]

Header types: 0 true, 1 false (no value), 2 int8, 3 int16, 4 int32, 5 int64, 6 bytes (u16 length),
7 string (u16 length, utf-8), 8 timestamp (int64 ms since the epoch), 9 uuid (16 bytes).

Client → server, one event = two nested messages: an outer signed envelope with the headers `:date` (8) and
`:chunk-signature` (6, 32 raw bytes) whose payload is the encoded inner message (`:message-type`="event",
`:event-type`="chunk", `:content-type`="application/json", payload `{"bytes": "<base64 of the event JSON>"}`).
`close()` sends an envelope with an empty payload (the end frame).

Server → client: unsigned `chunk` event messages, modeled `exception` messages (`:exception-type` = the
union member name, payload `{"message": ...}`) and unmodeled `error` messages (`:error-code`, `:error-message`).
"""

from __future__ import annotations

import base64
import binascii
import datetime as _dt
import hashlib
import hmac
import re
import struct
import time
import uuid
import zlib
from functools import lru_cache
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, quote

import orjson

# ---------------------------------------------------------------------------------------------
# Errors


class EventStreamError(ValueError):
    """Bytes that are not a valid event-stream message (or not a valid Bedrock frame)."""


class ChecksumError(EventStreamError):
    """A prelude or message CRC32 does not match."""

    def __init__(self, what: str, expected: int, calculated: int) -> None:
        super().__init__(f"{what} checksum mismatch: expected 0x{expected:08x}, calculated 0x{calculated:08x}")
        self.what = what
        self.expected = expected
        self.calculated = calculated


class FrameError(EventStreamError):
    """Malformed framing, headers or envelope."""


class LengthError(FrameError):
    """A prelude declares headers or a payload over the format's limits (`what` is "headers" or "payload")."""

    def __init__(self, what: str, length: int, limit: int) -> None:
        super().__init__(f"{what} length {length} exceeds {limit}")
        self.what = what
        self.length = length


class TruncatedError(FrameError):
    """The byte stream ended inside a message."""


class SignatureError(EventStreamError):
    """A chunk signature (or a request signature) does not verify."""


# ---------------------------------------------------------------------------------------------
# Header types

TRUE, FALSE, INT8, INT16, INT32, INT64, BYTES, STRING, TIMESTAMP, UUID = range(10)
HEADER_TYPE_NAMES = ("true", "false", "int8", "int16", "int32", "int64", "bytes", "string", "timestamp", "uuid")

PRELUDE_LEN = 12
MESSAGE_OVERHEAD = 16  # prelude (12) + message crc (4)
MAX_HEADERS_LEN = 128 * 1024
MAX_PAYLOAD_LEN = 16 * 1024 * 1024
MAX_HEADER_VALUE_LEN = 32 * 1024 - 1

EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_dt.UTC)
_MS = _dt.timedelta(milliseconds=1)


class Int8(int):
    """Encode this int as header type 2 (int8)."""


class Int16(int):
    """Encode this int as header type 3 (int16)."""


class Int64(int):
    """Encode this int as header type 5 (int64). A plain int is encoded as int32."""


@dataclass(frozen=True, slots=True)
class Timestamp:
    """A timestamp header value as exact milliseconds since the epoch (type 8)."""

    ms: int

    @classmethod
    def from_datetime(cls, value: _dt.datetime) -> Timestamp:
        if value.tzinfo is None:
            value = value.replace(tzinfo=_dt.UTC)
        return cls((value - EPOCH) // _MS)

    def to_datetime(self) -> _dt.datetime:
        return EPOCH + _dt.timedelta(milliseconds=self.ms)


def _typed(value: Any) -> tuple[int, Any]:
    """(type, value) for a Python header value; `(type, value)` tuples pass through."""
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], int):
        return value[0], value[1]
    if isinstance(value, bool):
        return (TRUE if value else FALSE), value
    if isinstance(value, Int8):
        return INT8, int(value)
    if isinstance(value, Int16):
        return INT16, int(value)
    if isinstance(value, Int64):
        return INT64, int(value)
    if isinstance(value, int):
        return INT32, value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return BYTES, bytes(value)
    if isinstance(value, str):
        return STRING, value
    if isinstance(value, Timestamp):
        return TIMESTAMP, value.ms
    if isinstance(value, _dt.datetime):
        return TIMESTAMP, Timestamp.from_datetime(value).ms
    if isinstance(value, uuid.UUID):
        return UUID, value
    raise FrameError(f"unsupported header value type {type(value).__name__}")


def encode_header(name: str, value: Any) -> bytes:
    """One encoded header. `value` is a Python value (see `_typed`) or an explicit `(type, value)`."""
    raw_name = name.encode("utf-8")
    if not 0 < len(raw_name) <= 255:
        raise FrameError(f"header name {name!r} must be 1..255 bytes")
    htype, v = _typed(value)
    out = bytearray(struct.pack("!B", len(raw_name)) + raw_name + struct.pack("!B", htype))
    try:
        if htype in (TRUE, FALSE):
            pass
        elif htype == INT8:
            out += struct.pack("!b", v)
        elif htype == INT16:
            out += struct.pack("!h", v)
        elif htype == INT32:
            out += struct.pack("!i", v)
        elif htype in (INT64, TIMESTAMP):
            if isinstance(v, _dt.datetime):
                v = Timestamp.from_datetime(v).ms
            elif isinstance(v, Timestamp):
                v = v.ms
            out += struct.pack("!q", v)
        elif htype in (BYTES, STRING):
            data = v.encode("utf-8") if htype == STRING else bytes(v)
            if len(data) > MAX_HEADER_VALUE_LEN:
                raise FrameError(f"header {name!r} value is {len(data)} bytes (max {MAX_HEADER_VALUE_LEN})")
            out += struct.pack("!H", len(data)) + data
        elif htype == UUID:
            out += (v if isinstance(v, uuid.UUID) else uuid.UUID(str(v))).bytes
        else:
            raise FrameError(f"unknown header type {htype}")
    except struct.error as exc:
        raise FrameError(f"header {name!r} value {v!r} does not fit type {HEADER_TYPE_NAMES[htype]}") from exc
    return bytes(out)


def encode_headers(headers: Mapping[str, Any]) -> bytes:
    return b"".join(encode_header(k, v) for k, v in headers.items())


def encode_message(headers: Mapping[str, Any], payload: bytes = b"") -> bytes:
    """One complete event-stream message with both CRCs."""
    return _frame(encode_headers(headers), payload)


def _frame(hb: bytes, payload: bytes) -> bytes:
    if len(hb) > MAX_HEADERS_LEN:
        raise FrameError(f"headers are {len(hb)} bytes (max {MAX_HEADERS_LEN})")
    if len(payload) > MAX_PAYLOAD_LEN:
        raise FrameError(f"payload is {len(payload)} bytes (max {MAX_PAYLOAD_LEN})")
    prelude = struct.pack("!II", MESSAGE_OVERHEAD + len(hb) + len(payload), len(hb))
    prelude += struct.pack("!I", zlib.crc32(prelude))
    crc = zlib.crc32(payload, zlib.crc32(hb, zlib.crc32(prelude)))  # one pass, one copy of the payload
    return b"".join((prelude, hb, payload, struct.pack("!I", crc)))


# ---------------------------------------------------------------------------------------------
# Decoding


@dataclass(slots=True)
class Message:
    """A decoded message. `headers` holds Python values (timestamps as UTC datetimes, exact to the ms);
    `types` the wire type of each header; `raw_headers` each header's exact encoded bytes."""

    headers: dict[str, Any]
    payload: bytes
    types: dict[str, int] = field(default_factory=dict)
    raw_headers: dict[str, bytes] = field(default_factory=dict)

    def get(self, name: str, default: Any = None) -> Any:
        return self.headers.get(name, default)

    def encode(self) -> bytes:
        """Re-encode with the same header types."""
        return encode_message({k: (self.types.get(k, _typed(v)[0]), v) for k, v in self.headers.items()}, self.payload)


def decode_headers(data: bytes) -> tuple[dict[str, Any], dict[str, int], dict[str, bytes]]:
    headers: dict[str, Any] = {}
    types: dict[str, int] = {}
    raw: dict[str, bytes] = {}
    view = memoryview(data)
    pos, end = 0, len(data)

    def need(n: int) -> None:
        if pos + n > end:
            raise FrameError("truncated header block")

    while pos < end:
        start = pos
        need(1)
        nlen = view[pos]
        pos += 1
        if nlen == 0:
            raise FrameError("empty header name")
        need(nlen)
        try:
            name = bytes(view[pos:pos + nlen]).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise FrameError("header name is not utf-8") from exc
        pos += nlen
        need(1)
        htype = view[pos]
        pos += 1
        value: Any
        if htype == TRUE:
            value = True
        elif htype == FALSE:
            value = False
        elif htype == INT8:
            need(1)
            (value,) = struct.unpack_from("!b", view, pos)
            pos += 1
        elif htype == INT16:
            need(2)
            (value,) = struct.unpack_from("!h", view, pos)
            pos += 2
        elif htype == INT32:
            need(4)
            (value,) = struct.unpack_from("!i", view, pos)
            pos += 4
        elif htype in (INT64, TIMESTAMP):
            need(8)
            (value,) = struct.unpack_from("!q", view, pos)
            pos += 8
            if htype == TIMESTAMP:
                try:
                    value = Timestamp(value).to_datetime()
                except OverflowError as exc:
                    raise FrameError(f"timestamp header {name!r} out of range") from exc
        elif htype in (BYTES, STRING):
            need(2)
            (vlen,) = struct.unpack_from("!H", view, pos)
            pos += 2
            need(vlen)
            value = bytes(view[pos:pos + vlen])
            pos += vlen
            if htype == STRING:
                try:
                    value = value.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise FrameError(f"string header {name!r} is not utf-8") from exc
        elif htype == UUID:
            need(16)
            value = uuid.UUID(bytes=bytes(view[pos:pos + 16]))
            pos += 16
        else:
            raise FrameError(f"unknown header type {htype} for header {name!r}")
        if name in headers:
            raise FrameError(f"duplicate header {name!r}")
        headers[name] = value
        types[name] = htype
        raw[name] = bytes(view[start:pos])
    return headers, types, raw


def _check_prelude(buf: bytes | bytearray | memoryview, pos: int = 0) -> tuple[int, int]:
    """(total, headers length) of the message at `pos`; checks in the SDK's order (CRC, then limits)."""
    total, hlen, pcrc = struct.unpack_from("!III", buf, pos)
    calc = zlib.crc32(memoryview(buf)[pos:pos + 8])
    if calc != pcrc:
        raise ChecksumError("prelude", pcrc, calc)
    if hlen > MAX_HEADERS_LEN:
        raise LengthError("headers", hlen, MAX_HEADERS_LEN)
    if total - MESSAGE_OVERHEAD - hlen > MAX_PAYLOAD_LEN:
        raise LengthError("payload", total - MESSAGE_OVERHEAD - hlen, MAX_PAYLOAD_LEN)
    if total < MESSAGE_OVERHEAD or hlen > total - MESSAGE_OVERHEAD:
        raise FrameError(f"invalid lengths: total {total}, headers {hlen}")
    return total, hlen


def decode_message(data: bytes) -> Message:
    """Decode exactly one message (both CRCs checked)."""
    if len(data) < MESSAGE_OVERHEAD:
        raise FrameError(f"{len(data)} bytes is shorter than the {MESSAGE_OVERHEAD}-byte minimum message")
    total, hlen = _check_prelude(data)
    if total != len(data):
        raise FrameError(f"message declares {total} bytes but {len(data)} were given")
    (mcrc,) = struct.unpack_from("!I", data, total - 4)
    calc = zlib.crc32(data[: total - 4])
    if calc != mcrc:
        raise ChecksumError("message", mcrc, calc)
    headers, types, raw = decode_headers(data[PRELUDE_LEN:PRELUDE_LEN + hlen])
    return Message(headers, bytes(data[PRELUDE_LEN + hlen: total - 4]), types, raw)


class MessageDecoder:
    """Incremental decoder: feed bytes as they arrive, get complete messages back.

    A corrupt prelude or message raises (the stream cannot be resynchronised afterwards)."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._failed: EventStreamError | None = None

    @property
    def buffered(self) -> int:
        """Bytes held that do not yet form a complete message."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Message]:
        if self._failed is not None:
            raise self._failed
        self._buf += data
        out: list[Message] = []
        try:
            while len(self._buf) >= PRELUDE_LEN:
                total, _ = _check_prelude(self._buf)
                if len(self._buf) < total:
                    break
                chunk = bytes(self._buf[:total])
                del self._buf[:total]
                out.append(decode_message(chunk))
        except EventStreamError as exc:
            self._failed = exc
            raise
        return out


def iter_messages(data: bytes) -> list[Message]:
    """All messages in `data`, which must end on a message boundary."""
    dec = MessageDecoder()
    msgs = dec.feed(data)
    if dec.buffered:
        raise FrameError(f"{dec.buffered} trailing bytes do not form a complete message")
    return msgs


class FrameReader:
    """Splits a byte stream into complete messages, sans I/O: `feed()` bytes as they arrive, then call
    `next()` until it returns None; `end()` when the stream ends.

    `next()` returns each message's exact bytes with both CRCs and the lengths checked, and decodes no
    header: the output hot path (gateway.bedrock.EventReader) looks at the header block itself. Bytes are
    joined only once a whole prelude or message is there, so a large message arriving in many small
    pieces costs no more than one copy. The first error raises, and again on every later call (the stream
    cannot be resynchronised)."""

    __slots__ = ("_buf", "_pos", "_more", "_size", "_failed")

    def __init__(self) -> None:
        self._buf = b""  # joined bytes; the unread part starts at _pos
        self._pos = 0
        self._more: list[bytes] = []  # pieces fed since the last join
        self._size = 0  # unread bytes in _buf and _more together
        self._failed: EventStreamError | None = None

    @property
    def buffered(self) -> int:
        """Bytes held that do not yet form a complete message."""
        return self._size

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if data:
            self._more.append(bytes(data))
            self._size += len(data)

    def next(self) -> bytes | None:
        """The next complete message, or None until more bytes are fed."""
        if self._failed is not None:
            raise self._failed
        if self._size < PRELUDE_LEN:
            return None
        try:
            buf = self._window(PRELUDE_LEN)
            pos = self._pos
            total, _ = _check_prelude(buf, pos)
            if self._size < total:
                return None
            buf = self._window(total)
            pos = self._pos
            end = pos + total
            (mcrc,) = struct.unpack_from("!I", buf, end - 4)
            calc = zlib.crc32(memoryview(buf)[pos:end - 4])
            if calc != mcrc:
                raise ChecksumError("message", mcrc, calc)
        except EventStreamError as exc:
            self._failed = exc
            raise
        self._pos = end
        self._size -= total
        return buf if total == len(buf) else buf[pos:end]

    def end(self) -> None:
        """The stream has ended: raises TruncatedError if it ended inside a message."""
        if self._failed is not None:
            raise self._failed
        if self._size:
            self._failed = TruncatedError(f"the stream ended {self._size} bytes into a message")
            raise self._failed

    def _window(self, n: int) -> bytes:
        """`_buf`, holding at least n unread bytes from `_pos` (the caller checked `_size`)."""
        if len(self._buf) - self._pos < n:
            parts = self._more
            if self._pos < len(self._buf):
                parts.insert(0, self._buf[self._pos:])
            self._buf = parts[0] if len(parts) == 1 else b"".join(parts)
            self._pos = 0
            self._more = []
        return self._buf


# ---------------------------------------------------------------------------------------------
# Bedrock payloads

CHUNK_HEADERS = {":message-type": "event", ":event-type": "chunk", ":content-type": "application/json"}  # the SDK's order
_CHUNK_HEADER_BYTES = encode_headers(CHUNK_HEADERS)

# union members of InvokeModelWithBidirectionalStreamOutput that are exceptions (and their HTTP codes)
EXCEPTION_MEMBERS = {
    "internalServerException": 500,
    "modelStreamErrorException": 424,
    "validationException": 400,
    "throttlingException": 429,
    "modelTimeoutException": 408,
    "serviceUnavailableException": 503,
}


def encode_event_json(event: dict) -> bytes:
    """`{"bytes": "<base64 of the event JSON>"}` (the chunk payload), as orjson writes it: base64 needs no
    JSON escaping, so it is spliced in as bytes."""
    return b'{"bytes":"' + binascii.b2a_base64(orjson.dumps(event), newline=False) + b'"}'


def decode_chunk_payload(payload: bytes) -> dict:
    """The event dict inside a chunk payload `{"bytes": b64}`."""
    try:
        outer = orjson.loads(payload)
        b64 = outer["bytes"]
        if not isinstance(b64, str):
            raise TypeError("bytes is not a string")
        event = orjson.loads(base64.b64decode(b64, validate=True))
    except (orjson.JSONDecodeError, KeyError, TypeError, binascii.Error, ValueError) as exc:
        raise FrameError(f"invalid chunk payload: {exc}") from exc
    if not isinstance(event, dict):
        raise FrameError("the chunk payload does not hold a JSON object")
    return event


_CHUNK_BLOCKS: dict[bytes, bool] = {_CHUNK_HEADER_BYTES: True}  # header block → is it a chunk event
_CHUNK_BLOCKS_MAX = 64


def _is_chunk_block(hb: bytes) -> bool:
    """Whether a header block says `:message-type` event, `:event-type` chunk (any order, other headers
    allowed). Remembered per distinct block: a stream repeats the same one for every event."""
    known = _CHUNK_BLOCKS.get(hb)
    if known is None:
        try:
            headers = decode_headers(hb)[0]
            known = headers.get(":message-type") == "event" and headers.get(":event-type") == "chunk"
        except FrameError:
            known = False
        if len(_CHUNK_BLOCKS) < _CHUNK_BLOCKS_MAX:
            _CHUNK_BLOCKS[hb] = known
    return known


def chunk_event(frame: bytes) -> dict | None:
    """The event dict in a `chunk` event message (a FrameReader frame), or None for anything else: another
    message type or member, or a payload that is not `{"bytes": "<base64 of a JSON object>"}`.

    The output hot path: exactly what the SDK's JSON codec (lenient base64, like `base64.b64decode`) and an
    `orjson.loads` of the blob give for such a frame; callers decode every None the general way."""
    (hlen,) = struct.unpack_from("!I", frame, 4)
    if not _is_chunk_block(frame[PRELUDE_LEN:PRELUDE_LEN + hlen]):
        return None
    try:
        b64 = orjson.loads(memoryview(frame)[PRELUDE_LEN + hlen:-4])["bytes"]
        event = orjson.loads(base64.b64decode(b64)) if type(b64) is str else None
    except (orjson.JSONDecodeError, KeyError, TypeError, binascii.Error, ValueError):
        return None
    return event if type(event) is dict else None


def chunk_message(event: dict) -> bytes:
    """An encoded inner/unsigned `chunk` event message carrying `event`."""
    return _frame(_CHUNK_HEADER_BYTES, encode_event_json(event))


output_chunk = chunk_message  # server → client output events are unsigned chunk messages


def exception_message(member: str, message: str, **extra: Any) -> bytes:
    """A modeled `exception` message, e.g. member="validationException"."""
    body = {"message": message, **extra}
    return encode_message(
        {":exception-type": member, ":content-type": "application/json", ":message-type": "exception"},
        orjson.dumps(body),
    )


def error_message(code: str, message: str) -> bytes:
    """An unmodeled `error` message (the SDK raises UnmodeledEventError(code, message))."""
    return encode_message({":message-type": "error", ":error-code": code, ":error-message": message})


@dataclass(slots=True)
class OutputItem:
    """A decoded server → client message: kind is "event", "exception" or "error"."""

    kind: str
    event: dict | None = None
    name: str | None = None  # exception member or error code
    message: str | None = None
    body: dict | None = None


def decode_output_message(msg: Message) -> OutputItem:
    mtype = msg.get(":message-type")
    if mtype == "event":
        if msg.get(":event-type") != "chunk":
            raise FrameError(f"unexpected :event-type {msg.get(':event-type')!r}")
        return OutputItem("event", event=decode_chunk_payload(msg.payload))
    if mtype == "exception":
        try:
            body = orjson.loads(msg.payload) if msg.payload else {}
        except orjson.JSONDecodeError as exc:
            raise FrameError(f"exception payload is not JSON: {exc}") from exc
        return OutputItem("exception", name=msg.get(":exception-type"), message=body.get("message"), body=body)
    if mtype == "error":
        return OutputItem("error", name=msg.get(":error-code"), message=msg.get(":error-message"))
    raise FrameError(f"unknown :message-type {mtype!r}")


# ---------------------------------------------------------------------------------------------
# Client input frames (outer signed envelope → inner chunk → event)


@dataclass(slots=True)
class InputFrame:
    """One decoded client frame. `event` is None for the end frame (empty payload)."""

    date: _dt.datetime | None
    signature: bytes | None
    event: dict | None
    outer: Message
    inner: Message | None = None

    @property
    def is_end(self) -> bool:
        return self.inner is None


def decode_input_frame(outer: Message) -> InputFrame:
    """Unwrap a client envelope. Raises FrameError on anything that is not a chunk event or the end frame."""
    date = outer.get(":date")
    sig = outer.get(":chunk-signature")
    if date is not None and not isinstance(date, _dt.datetime):
        raise FrameError(":date header is not a timestamp")
    if sig is not None and not isinstance(sig, bytes):
        raise FrameError(":chunk-signature header is not bytes")
    if not outer.payload:
        return InputFrame(date, sig, None, outer, None)
    if ":message-type" in outer.headers and sig is None:
        inner = outer  # an unsigned, unwrapped chunk (tolerated)
    else:
        inner = decode_message(outer.payload)
    if inner.get(":message-type") != "event" or inner.get(":event-type") != "chunk":
        raise FrameError(
            f"unexpected input message (:message-type={inner.get(':message-type')!r}, "
            f":event-type={inner.get(':event-type')!r})"
        )
    return InputFrame(date, sig, decode_chunk_payload(inner.payload), outer, inner)


def encode_input_frame(
    event: dict | None, *, signer: ChunkSigner | None = None, date: _dt.datetime | int | None = None
) -> bytes:
    """A client frame as the SDK sends it: `event` (or the end frame when None) in a signed envelope dated
    `date` (a datetime or milliseconds since the epoch; default now).

    Without a signer the signature is 32 zero bytes (an emulator without keys does not check it)."""
    payload = chunk_message(event) if event is not None else b""
    if date is None:
        ms = time.time_ns() // 1_000_000
    else:
        ms = date if isinstance(date, int) else Timestamp.from_datetime(date).ms
    date_header = _DATE_HEADER + struct.pack("!q", ms)
    sig = signer.sign(date_header, payload, ms) if signer is not None else bytes(32)
    return _frame(date_header + _SIGNATURE_HEADER + sig, payload)


# the two envelope headers' name, type and (for the signature) length: only the values change
_DATE_HEADER = encode_header(":date", Timestamp(0))[:-8]
_SIGNATURE_HEADER = encode_header(":chunk-signature", bytes(32))[:-32]


# ---------------------------------------------------------------------------------------------
# SigV4 and the chunk-signature chain

SIGV4_ALGORITHM = "AWS4-HMAC-SHA256"
CHUNK_ALGORITHM = "AWS4-HMAC-SHA256-PAYLOAD"
EVENT_STREAM_PAYLOAD_HASH = "STREAMING-AWS4-HMAC-SHA256-EVENTS"
SIGNING_SERVICE = "bedrock"
_TS_FORMAT = "%Y%m%dT%H%M%SZ"


def sigv4_timestamp(date: _dt.datetime | int) -> str:
    """YYYYMMDDTHHMMSSZ of a datetime, or of milliseconds since the epoch."""
    if isinstance(date, int):
        return _second_timestamp(date // 1000)
    if date.tzinfo is None:
        date = date.replace(tzinfo=_dt.UTC)
    return date.astimezone(_dt.UTC).strftime(_TS_FORMAT)


@lru_cache(maxsize=4)
def _second_timestamp(second: int) -> str:
    return time.strftime(_TS_FORMAT, time.gmtime(second))  # every event of a second signs the same string


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.digest(key, msg, "sha256")


def signing_key(secret: str, date8: str, region: str, service: str = SIGNING_SERVICE) -> bytes:
    """The SigV4 signing key for a day (YYYYMMDD), region and service."""
    k = _hmac(b"AWS4" + secret.encode("utf-8"), date8.encode("utf-8"))
    k = _hmac(k, region.encode("utf-8"))
    k = _hmac(k, service.encode("utf-8"))
    return _hmac(k, b"aws4_request")


def chunk_string_to_sign(timestamp: str, scope: str, prior_signature_hex: str, date_header: bytes, payload: bytes) -> str:
    return (
        f"{CHUNK_ALGORITHM}\n{timestamp}\n{scope}\n{prior_signature_hex}\n"
        f"{hashlib.sha256(date_header).hexdigest()}\n{hashlib.sha256(payload).hexdigest()}"
    )


class _ChunkChain:
    def __init__(self, secret: str, region: str, prior_signature_hex: str, service: str = SIGNING_SERVICE) -> None:
        self.secret = secret
        self.region = region
        self.service = service
        self.prior = prior_signature_hex
        self.count = 0
        self._keys: dict[str, tuple[bytes, str]] = {}

    def _key(self, date8: str) -> tuple[bytes, str]:
        """The day's signing key and credential scope."""
        key = self._keys.get(date8)
        if key is None:
            key = self._keys[date8] = (signing_key(self.secret, date8, self.region, self.service),
                                       f"{date8}/{self.region}/{self.service}/aws4_request")
        return key

    def expected(self, date_header: bytes, payload: bytes, date: _dt.datetime | int) -> bytes:
        """The signature of one envelope; `date` is its :date (a datetime, or milliseconds since the epoch)."""
        ts = sigv4_timestamp(date)
        key, scope = self._key(ts[:8])
        return _hmac(key, chunk_string_to_sign(ts, scope, self.prior, date_header, payload).encode("utf-8"))


class ChunkSigner(_ChunkChain):
    """Produces the chain of chunk signatures the SDK sends (client side; used in tests and tools)."""

    def sign(self, date_header: bytes, payload: bytes, date: _dt.datetime | int) -> bytes:
        sig = self.expected(date_header, payload, date)
        self.prior = sig.hex()
        self.count += 1
        return sig


class ChunkVerifier(_ChunkChain):
    """Verifies the client's chain of chunk signatures (§8.3), starting from the request's Signature."""

    def verify(self, outer: Message) -> None:
        """Check one outer envelope and advance the chain; raises SignatureError."""
        date = outer.get(":date")
        sig = outer.get(":chunk-signature")
        if not isinstance(date, _dt.datetime) or not isinstance(sig, bytes):
            raise SignatureError("the event is missing its :date / :chunk-signature headers")
        date_header = outer.raw_headers.get(":date") or encode_header(":date", Timestamp.from_datetime(date))
        want = self.expected(date_header, outer.payload, date)
        if not hmac.compare_digest(want, sig):
            raise SignatureError(
                f"chunk signature {self.count + 1} does not match: the signature we calculated does not match "
                "the signature you provided"
            )
        self.prior = sig.hex()
        self.count += 1


# -- the request's own SigV4 signature ---------------------------------------------------------

_AUTH_RE = re.compile(
    r"^AWS4-HMAC-SHA256\s+Credential=(?P<cred>[^,\s]+),\s*SignedHeaders=(?P<signed>[^,\s]+),\s*"
    r"Signature=(?P<sig>[0-9a-fA-F]{64})\s*$"
)


@dataclass(frozen=True, slots=True)
class Authorization:
    access_key_id: str
    date8: str
    region: str
    service: str
    signed_headers: tuple[str, ...]
    signature: str


def parse_authorization(value: str) -> Authorization:
    m = _AUTH_RE.match(value.strip())
    if not m:
        raise SignatureError("the Authorization header is not a SigV4 AWS4-HMAC-SHA256 header")
    parts = m.group("cred").split("/")
    if len(parts) != 5 or parts[4] != "aws4_request":
        raise SignatureError("the Authorization credential scope is malformed")
    return Authorization(
        access_key_id=parts[0], date8=parts[1], region=parts[2], service=parts[3],
        signed_headers=tuple(m.group("signed").split(";")), signature=m.group("sig").lower(),
    )


def canonical_request(method: str, path: str, query: str, headers: Iterable[tuple[str, str]],
                      signed_headers: Iterable[str], payload_hash: str) -> str:
    """The SigV4 canonical request as aws_sdk_signers builds it (path URI-encoded once more)."""
    values: dict[str, list[str]] = {}
    for k, v in headers:
        values.setdefault(k.lower(), []).append(v)
    signed = list(signed_headers)
    lines = []
    for name in signed:
        vals = values.get(name)
        if vals is None:
            raise SignatureError(f"signed header {name!r} is missing from the request")
        lines.append(f"{name}:{' '.join(', '.join(vals).split())}\n")
    pairs = sorted((quote(k, safe=""), quote(v, safe="")) for k, v in parse_qsl(query, keep_blank_values=True))
    cquery = "&".join(f"{k}={v}" for k, v in pairs)
    return f"{method.upper()}\n{quote(path or '/', safe='/')}\n{cquery}\n{''.join(lines)}\n{';'.join(signed)}\n{payload_hash}"


def request_signature(secret: str, auth: Authorization, amz_date: str, creq: str) -> str:
    scope = f"{auth.date8}/{auth.region}/{auth.service}/aws4_request"
    sts = f"{SIGV4_ALGORITHM}\n{amz_date}\n{scope}\n{hashlib.sha256(creq.encode('utf-8')).hexdigest()}"
    return _hmac(signing_key(secret, auth.date8, auth.region, auth.service), sts.encode("utf-8")).hex()


def verify_request_signature(secret: str, auth: Authorization, method: str, path: str, query: str,
                             headers: Iterable[tuple[str, str]]) -> None:
    """Recompute the request's SigV4 signature from its headers; raises SignatureError on mismatch."""
    headers = list(headers)
    hmap = {k.lower(): v for k, v in headers}
    amz_date = hmap.get("x-amz-date")
    if not amz_date:
        raise SignatureError("the request has no x-amz-date header")
    payload_hash = hmap.get("x-amz-content-sha256", EVENT_STREAM_PAYLOAD_HASH)
    creq = canonical_request(method, path, query, headers, auth.signed_headers, payload_hash)
    if not hmac.compare_digest(request_signature(secret, auth, amz_date, creq), auth.signature):
        raise SignatureError(
            "The request signature we calculated does not match the signature you provided. "
            "Check your AWS Secret Access Key and signing method."
        )
