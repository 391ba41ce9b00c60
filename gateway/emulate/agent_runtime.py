"""A loopback stand-in for the Bedrock Agent Runtime session APIs (`novagate emulate agent-runtime`).

The 14 REST-JSON operations of the "sessions" feature of `bedrock-agent-runtime`, served by a stdlib
`ThreadingHTTPServer` on 127.0.0.1 that real boto3 talks to through `endpoint_url`. SigV4 is never
checked. It enforces what botocore does not (max lengths, counts, UUID/ARN patterns), keeps the
session state machine (ACTIVE, ENDED, EXPIRED), pages lists with an opaque token, and orders lists
newest first by *parsed* time with insertion order breaking ties (a switch turns it oldest first so a
client can prove it sorts for itself).

For resilience tests it injects faults: per-operation queues of forced errors, added latency, and
"drop the response after committing" (the connection closes without an answer, so the client retries
a write that already happened). For permission tests it denies operations as IAM would (`deny`,
`--deny GetSession,ListSessions`): 403 `AccessDeniedException` with a message shaped like AWS's, naming
the action and the resource ("User: arn:aws:sts::ACCOUNT:assumed-role/... is not authorized to perform:
bedrock:GetSession on resource: arn:aws:bedrock:REGION:ACCOUNT:session/ID because no identity-based
policy allows the bedrock:GetSession action"; no resource for ListSessions, which has none). It counts
calls per operation so a test can assert what a resume costs. It is driven from Python (in-process
tests) or over a small admin API under `/_fake/` (subprocess tests); see `AgentRuntimeFake` and
`_Handler._admin`.

Behaviour the real service does not document is chosen conservatively here and listed in
`ASSUMPTIONS`. Standard library only: it starts fast and needs no AWS package.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import re
import signal
import socket
import sys
import threading
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["AgentRuntimeFake", "OPERATIONS", "ERRORS", "add_arguments", "run", "main"]

OPERATIONS = (
    "CreateSession", "GetSession", "UpdateSession", "EndSession", "DeleteSession", "ListSessions",
    "CreateInvocation", "ListInvocations", "PutInvocationStep", "GetInvocationStep", "ListInvocationSteps",
    "TagResource", "UntagResource", "ListTagsForResource",
)
_OP_BY_KEY = {op.lower(): op for op in OPERATIONS}

# error code -> HTTP status (the service model's; ServiceUnavailable is not modelled but botocore retries 503)
ERRORS = {
    "ValidationException": 400,
    "ServiceQuotaExceededException": 400,
    "AccessDeniedException": 403,
    "ResourceNotFoundException": 404,
    "ConflictException": 409,
    "ThrottlingException": 429,
    "InternalServerException": 500,
    "ServiceUnavailableException": 503,
}
_ERROR_BY_KEY = {code.lower(): code for code in ERRORS} | {
    code.lower().removesuffix("exception"): code for code in ERRORS
}
DROP = "Drop"  # an injectable fault: close the connection without answering and without committing

ASSUMPTIONS = {
    "order": "lists are newest first by parsed time, insertion order breaking ties (real order undocumented)",
    "default_page_size": "100 when maxResults is omitted (real default undocumented)",
    "writes_on_inactive": "CreateInvocation, PutInvocationStep and UpdateSession on ENDED/EXPIRED -> 409",
    "end_inactive": "EndSession is idempotent: 200 on an ENDED or EXPIRED session, status unchanged",
    "duplicate_step": "PutInvocationStep with an existing step id overwrites (or 409, configurable)",
    "step_id_scope": "step ids are unique per session, across invocations",
    "unknown_invocation": "PutInvocationStep on an unknown invocation -> 404",
    "update_metadata": "UpdateSession replaces the whole sessionMetadata map",
    "text_cap": "the sum of a step's text blocks is capped (default 256 KiB, configurable; real cap undocumented)",
    "time_precision": "timestamps are returned with millisecond precision",
}

_UUID = r"[a-f0-9]{8}-[a-f0-9]{4}-[a-f0-9]{4}-[a-f0-9]{4}-[a-f0-9]{12}"
_UUID_RE = re.compile(rf"^{_UUID}$")
_SESSION_ARN_RE = re.compile(rf"^arn:aws(-[^:]+)?:bedrock:([a-z0-9-]+):([0-9]{{12}}):session/({_UUID})$")
_TAGGABLE_ARN_RE = re.compile(rf"^arn:aws(-[^:]+)?:bedrock:([a-zA-Z0-9-]+):([0-9]{{12}}):(session)/({_UUID})$")
_KMS_ARN_RE = re.compile(r"^arn:aws(|-cn|-us-gov):kms:[a-zA-Z0-9-]*:[0-9]{12}:key/[a-zA-Z0-9-]{36}$")
_TAG_RE = re.compile(r"^[a-zA-Z0-9\s._:/=+@-]*$")
_S3_URI_RE = re.compile(r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]/.{1,1024}$")
_IMAGE_FORMATS = {"png", "jpeg", "gif", "webp"}
_MAX_IMAGE_BYTES = int(3.75 * 1024 * 1024)
_ACTIVE, _ENDED, _EXPIRED = "ACTIVE", "ENDED", "EXPIRED"

_ROUTES: list[tuple[re.Pattern, dict[str, str]]] = [
    (re.compile(r"^/sessions/$"), {"PUT": "CreateSession", "POST": "ListSessions"}),
    (re.compile(r"^/sessions/([^/]+)/$"), {"GET": "GetSession", "PUT": "UpdateSession", "DELETE": "DeleteSession"}),
    (re.compile(r"^/sessions/([^/]+)$"), {"PATCH": "EndSession"}),
    (re.compile(r"^/sessions/([^/]+)/invocations/$"), {"PUT": "CreateInvocation", "POST": "ListInvocations"}),
    (re.compile(r"^/sessions/([^/]+)/invocationSteps/$"), {"PUT": "PutInvocationStep", "POST": "ListInvocationSteps"}),
    (re.compile(r"^/sessions/([^/]+)/invocationSteps/([^/]+)$"), {"POST": "GetInvocationStep"}),
    (re.compile(r"^/tags/([^/]+)$"), {"POST": "TagResource", "GET": "ListTagsForResource", "DELETE": "UntagResource"}),
]


def canonical_op(op: str) -> str:
    """'PutInvocationStep', 'put_invocation_step', 'bedrock:PutInvocationStep' or '*' (every operation)."""
    op = op.strip()
    if op == "*":
        return op
    try:
        return _OP_BY_KEY[op.removeprefix("bedrock:").replace("_", "").replace("-", "").lower()]
    except KeyError:
        raise ValueError(f"unknown operation {op!r}") from None


def canonical_error(error: str) -> str:
    """'ThrottlingException', 'Throttling', 'throttling', ... or 'Drop'."""
    if error.lower() == DROP.lower():
        return DROP
    try:
        return _ERROR_BY_KEY[error.lower()]
    except KeyError:
        raise ValueError(f"unknown error {error!r}; one of {sorted(ERRORS)} or {DROP!r}") from None


class ApiError(Exception):
    def __init__(self, code: str, message: str, status: int | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status or ERRORS.get(code, 400)


def _validation(message: str) -> ApiError:
    return ApiError("ValidationException", message)


def _now() -> datetime:
    return datetime.now(UTC)


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def _parse_time(value, name: str) -> datetime:
    """ISO 8601 (with or without a fraction) or epoch seconds, as an aware UTC datetime."""
    if isinstance(value, bool):
        raise _validation(f"{name} is not a timestamp")
    if isinstance(value, (int, float)):
        try:
            return datetime.fromtimestamp(value, UTC)
        except (OverflowError, OSError, ValueError):
            raise _validation(f"{name} is out of range") from None
    if isinstance(value, str):
        try:
            t = datetime.fromisoformat(value)
        except ValueError:
            raise _validation(f"{name} is not an ISO 8601 timestamp") from None
        return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)
    raise _validation(f"{name} is not a timestamp")


def _sort_key(t: datetime, seq: int) -> tuple[int, int]:
    return (int(t.timestamp()) * 1_000_000 + t.microsecond, seq)


@dataclass
class _Invocation:
    id: str
    created_at: datetime
    description: str | None
    seq: int


@dataclass
class _Step:
    id: str
    invocation_id: str
    time: datetime
    payload: dict
    seq: int


@dataclass
class _Session:
    id: str
    arn: str
    created_at: datetime
    updated_at: datetime
    seq: int
    status: str = _ACTIVE
    metadata: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    encryption_key_arn: str | None = None
    invocations: dict[str, _Invocation] = field(default_factory=dict)
    steps: dict[str, _Step] = field(default_factory=dict)

    def summary(self) -> dict:
        return {
            "sessionId": self.id, "sessionArn": self.arn, "sessionStatus": self.status,
            "createdAt": _iso(self.created_at), "lastUpdatedAt": _iso(self.updated_at),
        }


@dataclass
class _Response:
    status: int
    body: dict
    drop: bool = False  # close the connection instead of answering


class AgentRuntimeFake:
    """The fake service. `start()` serves it in a daemon thread; everything is guarded by one RLock.

    Knobs (plain attributes, safe to set while serving): `latency` (seconds added to every call),
    `op_latency` ({op: seconds}, added on top), `oldest_first`, `max_text_bytes` (0 = no cap),
    `duplicate_steps` ("overwrite" or "conflict"), `default_page_size`, `deny` (operations answered
    with 403 AccessDeniedException as IAM would, "*" = all; set it with `configure(deny=[...])`).
    """

    principal = "assumed-role/novagate/novagate-emulator"  # who the denial messages say is calling

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, region: str = "us-east-1",
                 account: str = "123456789012", latency: float = 0.0, oldest_first: bool = False,
                 max_text_bytes: int = 256 * 1024, duplicate_steps: str = "overwrite",
                 default_page_size: int = 100, deny=()):
        self.host, self.port = host, port
        self.deny: frozenset[str] = frozenset(canonical_op(op) for op in deny)
        self.region, self.account = region, account
        self.latency = latency
        self.op_latency: dict[str, float] = {}
        self.oldest_first = oldest_first
        self.max_text_bytes = max_text_bytes
        self.duplicate_steps = duplicate_steps
        self.default_page_size = default_page_size
        self._validate_config()
        self.lock = threading.RLock()
        self._sessions: dict[str, _Session] = {}
        self._seq = 0
        self._calls: Counter = Counter()
        self._faults: dict[str, deque] = {}
        self._drops: Counter = Counter()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> AgentRuntimeFake:
        if self._server is not None:
            return self
        handler = type("Handler", (_Handler,), {"fake": self})
        server = ThreadingHTTPServer((self.host, self.port), handler)
        server.daemon_threads = True
        self._server = server
        self.port = server.server_address[1]
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="agent-runtime-fake", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and close every open connection (keep-alive ones too): the service is gone."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        with self.lock:
            connections, self._connections = list(self._connections), set()
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def __enter__(self) -> AgentRuntimeFake:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        host = self.host if ":" not in self.host else f"[{self.host}]"
        return f"http://{host}:{self.port}"

    def client(self, **config):
        """A real boto3 client pointed at this fake (dummy credentials). Keyword args go to botocore Config."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "bedrock-agent-runtime", region_name=self.region, endpoint_url=self.url,
            aws_access_key_id="fake", aws_secret_access_key="fake", config=Config(**config) if config else None,
        )

    # -- test controls -----------------------------------------------------------------------------
    @property
    def calls(self) -> Counter:
        """Calls received per operation (a snapshot; retries count as calls)."""
        with self.lock:
            return Counter(self._calls)

    def reset_calls(self) -> None:
        with self.lock:
            self._calls.clear()

    def inject(self, op: str, error: str = "ThrottlingException", times: int = 1, *,
               message: str | None = None) -> None:
        """Answer the next `times` calls of `op` ("*" = any) with `error` instead of serving them."""
        op, error = canonical_op(op), canonical_error(error)
        with self.lock:
            q = self._faults.setdefault(op, deque())
            q.extend([(error, message)] * int(times))

    def drop_after_commit(self, op: str, times: int = 1) -> None:
        """For the next `times` successful calls of `op`: commit, then close without answering."""
        op = canonical_op(op)
        with self.lock:
            self._drops[op] += int(times)

    def set_latency(self, op: str, seconds: float) -> None:
        with self.lock:
            if op == "*":
                self.latency = float(seconds)
            else:
                self.op_latency[canonical_op(op)] = float(seconds)

    def clear_faults(self) -> None:
        with self.lock:
            self._faults.clear()
            self._drops.clear()
            self.op_latency.clear()
            self.latency = 0.0

    def pending_faults(self) -> dict:
        with self.lock:
            return {
                "errors": {op: [e for e, _ in q] for op, q in self._faults.items() if q},
                "drops": {op: n for op, n in self._drops.items() if n},
            }

    def expire(self, session_id: str) -> None:
        """Force a session to EXPIRED (what does that on the real service is undocumented)."""
        self._force_status(session_id, _EXPIRED)

    def end(self, session_id: str) -> None:
        """End a session behind the client's back (as an operator or a sweeper would)."""
        self._force_status(session_id, _ENDED)

    def _force_status(self, session_id: str, status: str) -> None:
        with self.lock:
            s = self._sessions.get(session_id)
            if s is None:
                raise KeyError(session_id)
            s.status = status
            s.updated_at = _now()

    def reset(self) -> None:
        """Forget every session, fault and count."""
        with self.lock:
            self._sessions.clear()
            self._calls.clear()
            self._faults.clear()
            self._drops.clear()
            self.op_latency.clear()

    def snapshot(self, session_id: str) -> dict | None:
        """The stored state of one session, for assertions."""
        with self.lock:
            s = self._sessions.get(session_id)
            if s is None:
                return None
            return {
                **s.summary(), "sessionMetadata": dict(s.metadata), "tags": dict(s.tags),
                "invocations": len(s.invocations), "steps": len(s.steps),
            }

    def session_ids(self) -> list[str]:
        with self.lock:
            return list(self._sessions)

    def config(self) -> dict:
        with self.lock:
            return {
                "latency": self.latency, "op_latency": dict(self.op_latency), "oldest_first": self.oldest_first,
                "max_text_bytes": self.max_text_bytes, "duplicate_steps": self.duplicate_steps,
                "default_page_size": self.default_page_size, "region": self.region, "account": self.account,
                "deny": sorted(self.deny),
            }

    def configure(self, **kw) -> dict:
        """Set knobs by name (what POST /_fake/config does). `latency_ms` is accepted too."""
        with self.lock:
            for key, value in kw.items():
                if key == "latency":
                    self.latency = float(value)
                elif key == "latency_ms":
                    self.latency = float(value) / 1000
                elif key == "op_latency":
                    self.op_latency = {canonical_op(k): float(v) for k, v in dict(value).items()}
                elif key == "oldest_first":
                    self.oldest_first = bool(value)
                elif key == "max_text_bytes":
                    self.max_text_bytes = int(value)
                elif key == "duplicate_steps":
                    self.duplicate_steps = str(value)
                elif key == "default_page_size":
                    self.default_page_size = int(value)
                elif key == "deny":
                    ops = value.split(",") if isinstance(value, str) else list(value)
                    self.deny = frozenset(canonical_op(op) for op in ops if op.strip())
                else:
                    raise ValueError(f"unknown setting {key!r}")
            self._validate_config()
            return self.config()

    def _validate_config(self) -> None:
        if self.duplicate_steps not in ("overwrite", "conflict"):
            raise ValueError("duplicate_steps must be 'overwrite' or 'conflict'")
        if not 1 <= self.default_page_size <= 1000:
            raise ValueError("default_page_size must be 1..1000")
        if self.latency < 0 or self.max_text_bytes < 0:
            raise ValueError("latency and max_text_bytes must be >= 0")

    # -- request pipeline --------------------------------------------------------------------------
    def _before(self, op: str) -> tuple[str, str | None] | None:
        """Count the call, add latency, and pop a forced error if one is queued."""
        with self.lock:
            self._calls[op] += 1
            delay = self.latency + self.op_latency.get(op, 0.0)
        if delay > 0:
            time.sleep(delay)
        with self.lock:
            for key in (op, "*"):
                q = self._faults.get(key)
                if q:
                    return q.popleft()
        return None

    def _should_drop(self, op: str) -> bool:
        with self.lock:
            if self._drops[op] > 0:
                self._drops[op] -= 1
                return True
            if self._drops["*"] > 0:
                self._drops["*"] -= 1
                return True
        return False

    def handle(self, op: str, groups: tuple[str, ...], query: dict[str, list[str]], body: dict) -> _Response:
        forced = self._before(op)
        if forced is not None:
            error, message = forced
            if error == DROP:
                return _Response(0, {}, drop=True)
            raise ApiError(error, message or f"injected {error} for {op}")
        if op in self.deny or "*" in self.deny:
            raise ApiError("AccessDeniedException", self.denied_message(op, groups))
        with self.lock:
            status, out = getattr(self, "_op_" + op)(groups, query, body)
        if self._should_drop(op):
            return _Response(status, out, drop=True)
        return _Response(status, out)

    def denied_message(self, op: str, groups: tuple[str, ...] = ()) -> str:
        """What IAM answers when the caller's policies do not allow `op`: the action and, for the
        resource-scoped actions, the resource the request named (ListSessions has none)."""
        action = f"bedrock:{op}"
        caller = f"User: arn:aws:sts::{self.account}:{self.principal} is not authorized to perform: {action}"
        because = f"because no identity-based policy allows the {action} action"
        if op == "ListSessions":
            return f"{caller} {because}"
        if op == "CreateSession" or not groups:
            resource = f"arn:aws:bedrock:{self.region}:{self.account}:session/*"
        elif groups[0].startswith("arn:"):
            resource = groups[0]
        else:
            resource = f"arn:aws:bedrock:{self.region}:{self.account}:session/{groups[0]}"
        return f"{caller} on resource: {resource} {because}"

    # -- helpers -----------------------------------------------------------------------------------
    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _session(self, identifier: str) -> _Session:
        if _UUID_RE.match(identifier):
            sid = identifier
        else:
            m = _SESSION_ARN_RE.match(identifier)
            if m is None:
                raise _validation(f"sessionIdentifier {identifier!r} is not a session ID or ARN")
            if m.group(2) != self.region or m.group(3) != self.account:
                raise ApiError("ResourceNotFoundException", f"session {identifier} not found")
            sid = m.group(4)
        s = self._sessions.get(sid)
        if s is None:
            raise ApiError("ResourceNotFoundException", f"session {identifier} not found")
        return s

    def _session_by_arn(self, arn: str) -> _Session:
        if not 20 <= len(arn) <= 1011 or not _TAGGABLE_ARN_RE.match(arn):
            raise _validation(f"resourceArn {arn!r} is not a taggable session ARN")
        return self._session(arn)

    @staticmethod
    def _require_active(s: _Session) -> None:
        if s.status != _ACTIVE:
            raise ApiError("ConflictException", f"session {s.id} is {s.status}, not ACTIVE")

    @staticmethod
    def _uuid_param(value, name: str) -> str:
        if not isinstance(value, str) or not _UUID_RE.match(value):
            raise _validation(f"{name} must match {_UUID_RE.pattern}")
        return value

    @staticmethod
    def _metadata(value) -> dict[str, str]:
        if not isinstance(value, dict):
            raise _validation("sessionMetadata must be a map")
        if len(value) > 50:
            raise _validation("sessionMetadata must have at most 50 entries")
        for k, v in value.items():
            if not isinstance(k, str) or not 1 <= len(k) <= 100:
                raise _validation("sessionMetadata keys must be 1..100 characters")
            if not isinstance(v, str) or len(v) > 5000:
                raise _validation(f"sessionMetadata[{k!r}] must be a string of at most 5000 characters")
        return dict(value)

    @staticmethod
    def _tags(value) -> dict[str, str]:
        if not isinstance(value, dict) or not 1 <= len(value) <= 200:
            raise _validation("tags must be a map of 1..200 entries")
        for k, v in value.items():
            if not isinstance(k, str) or not 1 <= len(k) <= 128 or not _TAG_RE.match(k):
                raise _validation(f"tag key {k!r} must be 1..128 characters of [a-zA-Z0-9 ._:/=+@-]")
            if not isinstance(v, str) or len(v) > 256 or not _TAG_RE.match(v):
                raise _validation(f"tag value for {k!r} must be 0..256 characters of [a-zA-Z0-9 ._:/=+@-]")
        return dict(value)

    def _payload(self, value) -> dict:
        if not isinstance(value, dict) or set(value) != {"contentBlocks"}:
            raise _validation("payload must be {contentBlocks: [...]}")
        blocks = value["contentBlocks"]
        if not isinstance(blocks, list) or not blocks:
            raise _validation("payload.contentBlocks must be a non-empty list")
        text_bytes = images = 0
        for block in blocks:
            if not isinstance(block, dict) or len(block) != 1:
                raise _validation("each content block must set exactly one of text or image")
            if "text" in block:
                text = block["text"]
                if not isinstance(text, str) or not text:
                    raise _validation("content block text must be a non-empty string")
                text_bytes += len(text.encode("utf-8"))
            elif "image" in block:
                images += 1
                self._image(block["image"])
            else:
                raise _validation("each content block must set exactly one of text or image")
        if images > 20:
            raise _validation("a step may hold at most 20 images")
        if self.max_text_bytes and text_bytes > self.max_text_bytes:
            raise _validation(f"text content is {text_bytes} bytes; the limit is {self.max_text_bytes}")
        return json.loads(json.dumps(value))

    @staticmethod
    def _image(image) -> None:
        if not isinstance(image, dict) or image.get("format") not in _IMAGE_FORMATS:
            raise _validation(f"image.format must be one of {sorted(_IMAGE_FORMATS)}")
        source = image.get("source")
        if not isinstance(source, dict) or len(source) != 1:
            raise _validation("image.source must set exactly one of bytes or s3Location")
        if "bytes" in source:
            try:
                raw = base64.b64decode(source["bytes"], validate=True)
            except (binascii.Error, TypeError, ValueError):
                raise _validation("image.source.bytes is not base64") from None
            if not raw or len(raw) > _MAX_IMAGE_BYTES:
                raise _validation("an image must be 1 byte .. 3.75 MB")
        elif "s3Location" in source:
            uri = (source["s3Location"] or {}).get("uri") if isinstance(source["s3Location"], dict) else None
            if not isinstance(uri, str) or not 1 <= len(uri) <= 1024 or not _S3_URI_RE.match(uri):
                raise _validation("image.source.s3Location.uri is not an s3:// URI")
        else:
            raise _validation("image.source must set exactly one of bytes or s3Location")

    def _page(self, rows: list, key, query: dict[str, list[str]], scope: str) -> tuple[list, str | None]:
        """One page of `rows` in list order, and the token for the next (None when no more remain)."""
        raw_max = query.get("maxResults", [None])[-1]
        if raw_max is None:
            limit = self.default_page_size
        else:
            try:
                limit = int(raw_max)
            except ValueError:
                raise _validation("maxResults must be an integer") from None
            if not 1 <= limit <= 1000:
                raise _validation("maxResults must be between 1 and 1000")
        desc = not self.oldest_first
        rows = sorted(rows, key=key, reverse=desc)
        token = query.get("nextToken", [None])[-1]
        if token is not None:
            if not 1 <= len(token) <= 2048 or re.search(r"\s", token):
                raise _validation("nextToken is invalid")
            try:
                t = json.loads(base64.urlsafe_b64decode(token.encode() + b"=" * (-len(token) % 4)))
                after, direction, token_scope = (int(t["k"][0]), int(t["k"][1])), t["d"], t["s"]
            except (ValueError, KeyError, TypeError, IndexError, binascii.Error):
                raise _validation("nextToken is invalid") from None
            if token_scope != scope or direction != ("desc" if desc else "asc"):
                raise _validation("nextToken does not belong to this listing")
            rows = [r for r in rows if (key(r) < after if desc else key(r) > after)]
        page, more = rows[:limit], len(rows) > limit
        if not more:
            return page, None
        k = key(page[-1])
        doc = json.dumps({"k": [k[0], k[1]], "d": "desc" if desc else "asc", "s": scope}, separators=(",", ":"))
        return page, base64.urlsafe_b64encode(doc.encode()).decode().rstrip("=")

    # -- operations (called with the lock held) ----------------------------------------------------
    def _op_CreateSession(self, groups, query, body):
        metadata = self._metadata(body["sessionMetadata"]) if "sessionMetadata" in body else {}
        tags = self._tags(body["tags"]) if "tags" in body else {}
        kms = body.get("encryptionKeyArn")
        if kms is not None and (not isinstance(kms, str) or not 1 <= len(kms) <= 2048 or not _KMS_ARN_RE.match(kms)):
            raise _validation("encryptionKeyArn must be a KMS key ARN")
        sid = str(uuid.uuid4())
        now = _now()
        s = _Session(sid, f"arn:aws:bedrock:{self.region}:{self.account}:session/{sid}", now, now,
                     self._next_seq(), metadata=metadata, tags=tags, encryption_key_arn=kms)
        self._sessions[sid] = s
        return 201, {"sessionId": sid, "sessionArn": s.arn, "sessionStatus": s.status, "createdAt": _iso(now)}

    def _op_GetSession(self, groups, query, body):
        s = self._session(groups[0])
        out = {**s.summary(), "sessionMetadata": dict(s.metadata)}
        if s.encryption_key_arn:
            out["encryptionKeyArn"] = s.encryption_key_arn
        return 200, out

    def _op_UpdateSession(self, groups, query, body):
        s = self._session(groups[0])
        metadata = self._metadata(body["sessionMetadata"]) if "sessionMetadata" in body else None
        self._require_active(s)
        if metadata is not None:
            s.metadata = metadata  # replaced, not merged (assumed)
        s.updated_at = _now()
        out = s.summary()
        return 200, out

    def _op_EndSession(self, groups, query, body):
        s = self._session(groups[0])
        if s.status == _ACTIVE:
            s.status = _ENDED
            s.updated_at = _now()
        return 200, {"sessionId": s.id, "sessionArn": s.arn, "sessionStatus": s.status}

    def _op_DeleteSession(self, groups, query, body):
        s = self._session(groups[0])
        if s.status == _ACTIVE:
            raise ApiError("ConflictException", f"session {s.id} is ACTIVE; end it before deleting it")
        del self._sessions[s.id]
        return 200, {}

    def _op_ListSessions(self, groups, query, body):
        rows, token = self._page(list(self._sessions.values()), lambda s: _sort_key(s.created_at, s.seq),
                                 query, "sessions")
        out = {"sessionSummaries": [s.summary() for s in rows]}
        if token:
            out["nextToken"] = token
        return 200, out

    def _op_CreateInvocation(self, groups, query, body):
        s = self._session(groups[0])
        inv_id = self._uuid_param(body["invocationId"], "invocationId") if "invocationId" in body else None
        description = body.get("description")
        if description is not None and (not isinstance(description, str) or not 1 <= len(description) <= 200):
            raise _validation("description must be 1..200 characters")
        self._require_active(s)
        inv_id = inv_id or str(uuid.uuid4())
        if inv_id in s.invocations:
            raise ApiError("ConflictException", f"invocation {inv_id} already exists")
        now = _now()
        s.invocations[inv_id] = _Invocation(inv_id, now, description, self._next_seq())
        s.updated_at = now
        return 201, {"invocationId": inv_id, "sessionId": s.id, "createdAt": _iso(now)}

    def _op_ListInvocations(self, groups, query, body):
        s = self._session(groups[0])
        rows, token = self._page(list(s.invocations.values()), lambda i: _sort_key(i.created_at, i.seq),
                                 query, "inv:" + s.id)
        out = {"invocationSummaries": [
            {"sessionId": s.id, "invocationId": i.id, "createdAt": _iso(i.created_at)} for i in rows]}
        if token:
            out["nextToken"] = token
        return 200, out

    def _op_PutInvocationStep(self, groups, query, body):
        s = self._session(groups[0])
        for name in ("invocationIdentifier", "invocationStepTime", "payload"):
            if name not in body:
                raise _validation(f"{name} is required")
        inv_id = self._uuid_param(body["invocationIdentifier"], "invocationIdentifier")
        step_id = self._uuid_param(body["invocationStepId"], "invocationStepId") if "invocationStepId" in body else None
        at = _parse_time(body["invocationStepTime"], "invocationStepTime")
        payload = self._payload(body["payload"])
        self._require_active(s)
        if inv_id not in s.invocations:
            raise ApiError("ResourceNotFoundException", f"invocation {inv_id} not found")
        step_id = step_id or str(uuid.uuid4())
        old = s.steps.get(step_id)
        if old is not None:
            if self.duplicate_steps == "conflict":
                raise ApiError("ConflictException", f"invocation step {step_id} already exists")
            old.invocation_id, old.time, old.payload = inv_id, at, payload
        else:
            s.steps[step_id] = _Step(step_id, inv_id, at, payload, self._next_seq())
        s.updated_at = _now()
        return 201, {"invocationStepId": step_id}

    def _op_GetInvocationStep(self, groups, query, body):
        s = self._session(groups[0])
        step_id = self._uuid_param(groups[1], "invocationStepId")
        if "invocationIdentifier" not in body:
            raise _validation("invocationIdentifier is required")
        inv_id = self._uuid_param(body["invocationIdentifier"], "invocationIdentifier")
        step = s.steps.get(step_id)
        if step is None or step.invocation_id != inv_id:
            raise ApiError("ResourceNotFoundException", f"invocation step {step_id} not found")
        return 200, {"invocationStep": {
            "sessionId": s.id, "invocationId": step.invocation_id, "invocationStepId": step.id,
            "invocationStepTime": _iso(step.time), "payload": step.payload,
        }}

    def _op_ListInvocationSteps(self, groups, query, body):
        s = self._session(groups[0])
        inv_id = body.get("invocationIdentifier")
        steps = list(s.steps.values())
        if inv_id is not None:
            self._uuid_param(inv_id, "invocationIdentifier")
            if inv_id not in s.invocations:
                raise ApiError("ResourceNotFoundException", f"invocation {inv_id} not found")
            steps = [st for st in steps if st.invocation_id == inv_id]
        rows, token = self._page(steps, lambda st: _sort_key(st.time, st.seq), query,
                                 f"steps:{s.id}:{inv_id or '*'}")
        out = {"invocationStepSummaries": [
            {"sessionId": s.id, "invocationId": st.invocation_id, "invocationStepId": st.id,
             "invocationStepTime": _iso(st.time)} for st in rows]}
        if token:
            out["nextToken"] = token
        return 200, out

    def _op_TagResource(self, groups, query, body):
        s = self._session_by_arn(groups[0])
        tags = self._tags(body.get("tags"))
        merged = {**s.tags, **tags}
        if len(merged) > 200:
            raise ApiError("ServiceQuotaExceededException", "a session may have at most 200 tags")
        s.tags = merged
        return 200, {}

    def _op_UntagResource(self, groups, query, body):
        s = self._session_by_arn(groups[0])
        keys = query.get("tagKeys", [])
        if not 1 <= len(keys) <= 200:
            raise _validation("tagKeys must list 1..200 keys")
        for k in keys:
            s.tags.pop(k, None)
        return 200, {}

    def _op_ListTagsForResource(self, groups, query, body):
        s = self._session_by_arn(groups[0])
        return 200, {"tags": dict(s.tags)}


class _Handler(BaseHTTPRequestHandler):
    fake: AgentRuntimeFake
    protocol_version = "HTTP/1.1"
    server_version = "novagate-agent-runtime-fake"

    def setup(self):
        super().setup()
        # one write per response and no Nagle: otherwise delayed ACKs add ~40 ms to every call
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.fake.lock:
            self.fake._connections.add(self.connection)

    def finish(self):
        with self.fake.lock:
            self.fake._connections.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def log_message(self, format, *args):  # noqa: A002 - silence the default stderr log
        pass

    def do_GET(self):
        self._dispatch()

    do_PUT = do_POST = do_PATCH = do_DELETE = do_GET

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _dispatch(self) -> None:
        raw = self._read_body()
        parts = urlsplit(self.path)
        query = parse_qs(parts.query, keep_blank_values=True)
        try:
            if parts.path.startswith("/_fake/"):
                status, out = self._admin(parts.path, raw)
                return self._send(status, out)
            op, groups = self._route(parts.path)
            try:
                body = json.loads(raw) if raw.strip() else {}
            except ValueError:
                raise _validation("the request body is not JSON") from None
            if not isinstance(body, dict):
                raise _validation("the request body must be a JSON object")
            resp = self.fake.handle(op, groups, query, body)
        except ApiError as e:
            return self._send(e.status, {"message": e.message}, error=e.code)
        except Exception as e:  # a bug in the fake: answer like the service would
            return self._send(500, {"message": f"fake internal error: {e!r}"}, error="InternalServerException")
        if resp.drop:
            self.close_connection = True
            return
        self._send(resp.status, resp.body)

    def _route(self, path: str) -> tuple[str, tuple[str, ...]]:
        for pattern, methods in _ROUTES:
            m = pattern.match(path)
            if m and self.command in methods:
                return methods[self.command], tuple(unquote(g) for g in m.groups())
        raise _validation(f"unsupported route: {self.command} {path}")

    def _send(self, status: int, body: dict, *, error: str | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("x-amzn-RequestId", str(uuid.uuid4()))
        if error:
            self.send_header("x-amzn-ErrorType", error)
        self._headers_buffer.append(b"\r\n")
        self._headers_buffer.append(data)
        self.flush_headers()

    # -- admin API ---------------------------------------------------------------------------------
    def _admin(self, path: str, raw: bytes) -> tuple[int, dict]:
        """GET  /_fake/calls                   -> {"calls": {op: n}, "total": n}
        POST /_fake/reset_calls
        POST /_fake/inject {op, error, times=1, message?}
        POST /_fake/drop_after_commit {op, times=1}
        GET|POST /_fake/config {latency | latency_ms, op_latency, oldest_first, max_text_bytes,
                                duplicate_steps, default_page_size, deny}
        POST /_fake/expire/{sid}   POST /_fake/end/{sid}
        GET  /_fake/sessions/{sid} -> the stored state      GET /_fake/faults
        POST /_fake/clear_faults   POST /_fake/reset (everything)
        """
        fake = self.fake
        try:
            body = json.loads(raw) if raw.strip() else {}
            if not isinstance(body, dict):
                raise ValueError("the body must be a JSON object")
            name = path.removeprefix("/_fake/")
            method = self.command
            if method == "GET" and name == "calls":
                calls = fake.calls
                return 200, {"calls": dict(calls), "total": sum(calls.values())}
            if method == "POST" and name == "reset_calls":
                fake.reset_calls()
                return 200, {"ok": True}
            if method == "POST" and name == "inject":
                fake.inject(body["op"], body.get("error", "ThrottlingException"), int(body.get("times", 1)),
                            message=body.get("message"))
                return 200, {"ok": True, **fake.pending_faults()}
            if method == "POST" and name == "drop_after_commit":
                fake.drop_after_commit(body["op"], int(body.get("times", 1)))
                return 200, {"ok": True, **fake.pending_faults()}
            if name == "config" and method in ("GET", "POST"):
                return 200, fake.configure(**body) if method == "POST" else fake.config()
            if method == "GET" and name == "faults":
                return 200, fake.pending_faults()
            if method == "POST" and name == "clear_faults":
                fake.clear_faults()
                return 200, {"ok": True}
            if method == "POST" and name == "reset":
                fake.reset()
                return 200, {"ok": True}
            for verb, action in (("expire/", fake.expire), ("end/", fake.end)):
                if method == "POST" and name.startswith(verb):
                    sid = unquote(name.removeprefix(verb))
                    try:
                        action(sid)
                    except KeyError:
                        raise ApiError("ResourceNotFoundException", f"session {sid} not found") from None
                    return 200, fake.snapshot(sid)
            if method == "GET" and name.startswith("sessions/"):
                snap = fake.snapshot(unquote(name.removeprefix("sessions/")))
                if snap is None:
                    raise ApiError("ResourceNotFoundException", "session not found")
                return 200, snap
            if method == "GET" and name == "sessions":
                return 200, {"sessionIds": fake.session_ids()}
        except (KeyError, TypeError, ValueError) as e:
            raise _validation(f"admin: {e}") from None
        raise _validation(f"unsupported admin route: {self.command} {path}")


# -- command line ----------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8790, help="port (default 8790; 0 = any free port)")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="latency added to every call")
    parser.add_argument("--oldest-first", action="store_true", help="list oldest first (clients must sort)")
    parser.add_argument("--max-text-bytes", type=int, default=256 * 1024,
                        help="cap on a step's text content in bytes (0 = none; the real cap is undocumented)")
    parser.add_argument("--duplicate-steps", choices=("overwrite", "conflict"), default="overwrite",
                        help="what PutInvocationStep does with an existing step id")
    parser.add_argument("--page-size", type=int, default=100, help="page size when maxResults is omitted")
    parser.add_argument("--region", default="us-east-1", help="region in session ARNs")
    parser.add_argument("--account", default="123456789012", help="account in session ARNs")
    parser.add_argument("--deny", default="", metavar="OPS",
                        help="comma-separated operations to refuse as IAM would, 403 AccessDeniedException naming "
                        "the action and resource (e.g. GetSession,ListSessions; '*': all)")


def run(args) -> int:
    """Serve in the foreground until Ctrl-C (or SIGTERM)."""
    try:
        fake = AgentRuntimeFake(
            args.host, args.port, region=args.region, account=args.account, latency=args.latency_ms / 1000,
            oldest_first=args.oldest_first, max_text_bytes=args.max_text_bytes, duplicate_steps=args.duplicate_steps,
            default_page_size=args.page_size, deny=[op for op in args.deny.split(",") if op.strip()],
        )
    except ValueError as e:
        print(f"agent-runtime fake: {e}", file=sys.stderr)
        return 2
    try:
        fake.start()
    except OSError as e:
        print(f"agent-runtime fake: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 1
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(fake.url, flush=True)
    print(f"Bedrock Agent Runtime sessions fake listening on {fake.url} (admin API under {fake.url}/_fake/)\n"
          f"  export AWS_ENDPOINT_URL_BEDROCK_AGENT_RUNTIME={fake.url}\n"
          f"  export NOVAGATE_AGENT_RUNTIME_ENDPOINT={fake.url}\n"
          "Ctrl-C to stop.", file=sys.stderr, flush=True)
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        fake.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="novagate emulate agent-runtime",
                                     description="Loopback fake of the Bedrock Agent Runtime session APIs.")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
