"""`novagate emulate nova`: an Amazon Nova Sonic wire emulator the unmodified AWS SDK talks to.

HTTP/2 over TLS (ALPN h2) built on `h2` + asyncio + `ssl` (reference/nova-sonic.md §8). It accepts
`POST /model/{urlencoded modelId}/invoke-with-bidirectional-stream`, keeps the request and response bodies
open together (true duplex, with HTTP/2 flow control both ways), and serves a `ModelTransport` behind the
wire: each request opens one stream on the transport; every decoded input event is checked against the
service's input-order rules (InputOrderValidator) and forwarded with `send()`, and every output event from
`receive()` goes back as an unsigned `chunk` message. The model's `toolUse` events are reported to the
stream's validator on their way out, so a TOOL result block must answer a toolUse of that stream, once
(else `validationException` "Invalid input request: … unknown toolUseId …").

Models: every id of the model catalog (protocol/models.py: `amazon.nova-2-5-sonic`, `amazon.nova-2-sonic-v1:0`,
the legacy `amazon.nova-sonic-v1:0`) or those given with `--model`, and by default the same ids behind a
cross-region inference prefix (`us.`, `eu.`, `apac.`, `global.`; unverified against the service: whether its
bidirectional stream takes them is not known; `--no-region-prefixes` refuses them with a 404). The model of
the request path selects the stream's rules: its history limits (`model_spec(model_id).history`: Nova 2
200 KB in total / 50 KB per message and textInput; the legacy model 40 KB / 1 KB), and whether the local
engine behind emits `userSpeechStart` / `userSpeechEnd` (Nova 2-class only). `history_limits` /
`--history-limits conservative` (40 KB / 40 KB / 1 KB) or `--history-max-bytes N`, `--history-message-max-bytes
N`, `--history-input-max-bytes N` make a stand-in that enforces other limits for every model (a gateway's
fallback to smaller limits can be tested against it). A history too large fails the stream with a
validationException "Invalid input request: chat history …" (protocol/event_order.py).

Behind the CLI the model is the local engine (gateway/local): `--engine local|scripted`. `--tool-calls
JSON|@path` scripts it to call a tool when the user's words contain a phrase (the engine module's docstring
has the format and the event sequences), so a client's whole tool path runs offline.

Errors the emulator produces, as the service does:

* modeled exception frames (then END_STREAM): `validationException` (order violations, a history too large;
  the 532 input-gap message after `input_gap_s` (55 s; 0: off) without an audioInput or interactive content,
  i.e. the textInput of an interactive TEXT block or a toolResult, counted from the stream's opening; the 531
  idle message after `idle_timeout_s` (175 s) without an audioInput, whatever else arrived; bad chunk
  signatures; undecodable frames),
  `modelTimeoutException` at stream age `max_stream_s`, and any kind injected with `inject()` or raised as
  `ModelError` by the backing transport (ACCESS_DENIED / CONNECTION, which have no stream member, become
  unmodeled `error` frames with codes `AccessDeniedException` / `InternalFailure`);
* HTTP-level errors: 403 `AccessDeniedException` (`reject_403`: the message Bedrock gives an account without
  access to the model; `deny`, `--deny InvokeModelWithBidirectionalStream`: the message IAM gives a caller
  whose policies do not allow the action, naming it and the model's ARN), 403 `UnrecognizedClientException` /
  `InvalidSignatureException` (with `credentials`, for an unknown key or a bad request signature),
  400 `ValidationException` (malformed model id), 404 `ResourceNotFoundException` (well-formed, unknown model id);
* transport faults: RST_STREAM or a TCP reset after N input events, corrupt bytes after N output events.

Each connection advertises `max_concurrent_streams` (SETTINGS_MAX_CONCURRENT_STREAMS, default 100): the
SDK's client then holds a stream past it unsent, as it does against Bedrock.

Fault-injection API (tests): `emu.inject(kind, message, after_events=N | after_s=T)` arms a fault for the
next stream opened; `emu.reject_403 = True`; `emu.deny = ("InvokeModel",)`; `emu.reset_after_events = N`
(+ `emu.reset_connection = True` for a TCP reset instead of RST_STREAM); `emu.invalid_bytes_after = N`
(output events). The one-shot faults (inject, reset, invalid bytes) are consumed by the next stream that
opens. Counters: `streams_opened`, `events_received`, `stream_events` (the event names each stream
received), `streams` (per-stream records).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import re
import signal
import ssl
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import orjson

from gateway import eventstream as es
from gateway.transport import (
    ACCESS_DENIED,
    CONNECTION,
    IDLE_TIMEOUT_MESSAGE,
    INTERNAL_SERVER,
    MODEL_STREAM_ERROR,
    MODEL_TIMEOUT,
    MODEL_TIMEOUT_MESSAGE,
    SERVICE_UNAVAILABLE,
    THROTTLING,
    VALIDATION,
    ModelError,
    ModelStream,
    ModelTransport,
)
from protocol.event_order import INPUT_GAP_MESSAGE, INPUT_GAP_S, EventOrderError, InputGap, InputOrderValidator
from protocol.models import CATALOG, CONSERVATIVE_HISTORY, NOVA_2_HISTORY, HistoryLimits, base_model_id, model_spec
from protocol.nova_events import IDLE_TIMEOUT_S, MAX_STREAM_AGE_S

log = logging.getLogger("novagate.emulate.nova")

DEFAULT_MODELS = tuple(CATALOG)  # every model id of the catalog (protocol/models.py)
HISTORY_PRESETS = {"conservative": CONSERVATIVE_HISTORY, "nova-2": NOVA_2_HISTORY}  # --history-limits (else: model)
DEFAULT_PORT = 8443
DUMMY_ACCESS_KEY_ID = "AKIDNOVAGATEEMULATOR"
DUMMY_SECRET_ACCESS_KEY = "novagate-emulator-secret"

MODELED_KINDS = frozenset(es.EXCEPTION_MEMBERS)  # the six stream exception members
UNMODELED_CODES = {ACCESS_DENIED: "AccessDeniedException", CONNECTION: "InternalFailure"}
ERROR_KINDS = MODELED_KINDS | frozenset(UNMODELED_CODES) | {"error"}

DEFAULT_MESSAGES = {
    VALIDATION: "Invalid input request",
    MODEL_TIMEOUT: MODEL_TIMEOUT_MESSAGE,
    THROTTLING: "Too many requests, please wait before trying again.",
    MODEL_STREAM_ERROR: "The model stream encountered an error. Try your request again.",
    INTERNAL_SERVER: "The server encountered an internal error while processing the request.",
    SERVICE_UNAVAILABLE: "The service is temporarily unavailable. Try your request again.",
    ACCESS_DENIED: "You don't have access to the model with the specified model ID.",
    CONNECTION: "An internal failure occurred.",
    "error": "An internal failure occurred.",
}
ACCESS_DENIED_403 = "You don't have access to the model with the specified model ID."
INVOKE_ACTIONS = ("InvokeModel", "InvokeModelWithBidirectionalStream")  # what `deny` may name (bedrock:...)
DENIED_PRINCIPAL = "assumed-role/novagate/novagate-emulator"
_ERRORTYPE_SUFFIX = ":http://internal.amazon.com/coral/com.amazon.bedrock/"
_PATH_RE = re.compile(r"^/model/(?P<model>[^/]+)/invoke-with-bidirectional-stream/?$")
_MODEL_ID_RE = re.compile(r"^[a-z0-9-]+(\.[a-z0-9-]+)+(:[0-9a-z:.-]+)?$")
CONN_WINDOW = 16 * 1024 * 1024  # connection-level receive window (streams keep the default 64 KiB)
RST_INTERNAL_ERROR = 2

_END = object()
_RESET = object()


@dataclass(slots=True)
class Fault:
    """An error to inject into a stream: `kind` is a ModelError kind (a stream exception member name,
    "accessDeniedException", "connectionError") or "error" (an unmodeled error frame with code `code`)."""

    kind: str
    message: str
    after_events: int | None = None  # input events received on the stream
    after_s: float | None = None  # seconds after the stream opened
    code: str | None = None  # unmodeled error code (kind "error")


@dataclass
class StreamRecord:
    """What the emulator saw on one stream (tests)."""

    stream_no: int
    model_id: str
    history: HistoryLimits | None = None  # the limits the stream's validator enforced
    events: list[str] = field(default_factory=list)
    output_events: int = 0
    error: tuple[str, str] | None = None  # (kind, message) of the error frame sent
    reset: str | None = None  # "stream" | "connection" when reset by a fault
    input_closed: bool = False  # the client sent its end frame / END_STREAM
    signatures_verified: int = 0  # chunk signatures checked (with credentials), the end frame included
    ended: bool = False  # the response stream has ended

    @property
    def error_kind(self) -> str | None:
        return self.error[0] if self.error else None


# ---------------------------------------------------------------------------------------------
# TLS helper


def _system_ca_bundle(exclude: Path | None = None) -> Path | None:
    candidates = [
        os.environ.get("SSL_CERT_FILE"),
        ssl.get_default_verify_paths().openssl_cafile,
        "/etc/ssl/certs/ca-certificates.crt",
        "/etc/pki/tls/certs/ca-bundle.crt",
        "/etc/ssl/ca-bundle.pem",
        "/etc/ssl/cert.pem",
        "/usr/lib/ssl/cert.pem",
    ]
    for c in candidates:
        if not c:
            continue
        p = Path(c)
        try:
            if exclude is not None and p.resolve().parent == exclude.resolve():
                continue
            if p.is_file() and p.stat().st_size > 0:
                return p
        except OSError:
            continue
    return None


def make_test_tls(directory: str | os.PathLike) -> tuple[str, str, str, str]:
    """A throwaway CA and a server certificate for localhost/127.0.0.1/::1 (trustme), written to `directory`.

    Returns (ca_pem_path, cert_path, key_path, bundle_path). The bundle is the system CA bundle plus the test
    CA: point SSL_CERT_FILE at it (before the SDK's CRT transport is constructed) and both the emulator and
    real AWS endpoints verify."""
    import trustme

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA(organization_name="novagate emulator test CA")
    leaf = ca.issue_cert("localhost", "127.0.0.1", "::1")
    ca_path, cert_path, key_path, bundle_path = (d / "ca.pem", d / "cert.pem", d / "key.pem", d / "bundle.pem")
    ca.cert_pem.write_to_path(str(ca_path))
    cert_path.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key_path))
    os.chmod(key_path, 0o600)
    system = _system_ca_bundle(exclude=d)
    parts = []
    if system is not None:
        data = system.read_bytes()
        parts.append(data if data.endswith(b"\n") else data + b"\n")
    else:
        log.warning("no system CA bundle found: %s trusts only the test CA", bundle_path)
    parts.append(ca.cert_pem.bytes())
    bundle_path.write_bytes(b"".join(parts))
    return str(ca_path), str(cert_path), str(key_path), str(bundle_path)


def server_ssl_context(certfile: str, keyfile: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(certfile, keyfile)
    ctx.set_alpn_protocols(["h2"])
    return ctx


# ---------------------------------------------------------------------------------------------
# The emulator


class NovaEmulator:
    """The Nova Sonic wire emulator serving `transport` (see the module docstring)."""

    def __init__(
        self,
        transport: ModelTransport,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        certfile: str,
        keyfile: str,
        credentials: tuple[str, str] | None = None,
        region: str = "us-east-1",
        idle_timeout_s: float = IDLE_TIMEOUT_S,
        input_gap_s: float = INPUT_GAP_S,
        max_stream_s: float = MAX_STREAM_AGE_S,
        models: tuple[str, ...] | list[str] = DEFAULT_MODELS,
        region_prefixes: bool = True,
        history_limits: HistoryLimits | None = None,
        history_overrides: dict[str, int] | None = None,
        reject_403: bool = False,
        deny: tuple[str, ...] | list[str] = (),
        account: str = "123456789012",
        validate_order: bool = True,
        input_end_grace_s: float = 5.0,
        max_concurrent_streams: int | None = None,
    ) -> None:
        self.transport = transport
        self.host = host
        self._port = port
        self.certfile = certfile
        self.keyfile = keyfile
        self.credentials = credentials
        self.region = region
        self.idle_timeout_s = idle_timeout_s
        if input_gap_s < 0:
            raise ValueError(f"input_gap_s={input_gap_s} must be >= 0 seconds (0: no 532)")
        self.input_gap_s = input_gap_s  # 0: off
        self.max_stream_s = max_stream_s
        self.models = tuple(models)
        self.region_prefixes = region_prefixes
        self.history_limits = history_limits  # every model's (None: each model's own)
        self.history_overrides = dict(history_overrides or {})  # HistoryLimits fields set for every model
        self.validate_order = validate_order
        self.input_end_grace_s = input_end_grace_s
        self.max_concurrent_streams = max_concurrent_streams  # SETTINGS_MAX_CONCURRENT_STREAMS (None: h2's 100)
        # fault injection
        self.reject_403 = reject_403
        self.reject_403_message = ACCESS_DENIED_403
        self.deny = denied_actions(deny)  # IAM: every request answers 403 naming the first of these actions
        self.account = account
        self.reset_after_events: int | None = None
        self.reset_connection = False
        self.reset_error_code = RST_INTERNAL_ERROR
        self.invalid_bytes_after: int | None = None
        self.persistent_faults: list[Fault] = []  # applied to every stream (CLI --inject-every-stream)
        self._faults: list[Fault] = []
        # counters / records
        self.streams_opened = 0
        self.events_received = 0
        self.connections_accepted = 0
        self.http_errors: list[tuple[int, str]] = []
        self.streams: list[StreamRecord] = []
        self._server: asyncio.Server | None = None
        self._conns: set[_Connection] = set()
        self._active: set[_Stream] = set()

    # -- lifecycle --------------------------------------------------------------------------------
    async def start(self) -> NovaEmulator:
        ctx = server_ssl_context(self.certfile, self.keyfile)
        self._server = await asyncio.start_server(
            self._on_client, self.host, self._port, ssl=ctx, ssl_handshake_timeout=10.0
        )
        self._port = self._server.sockets[0].getsockname()[1]
        log.info("nova emulator listening on https://%s:%d", self.host, self._port)
        return self

    @property
    def port(self) -> int:
        return self._port

    @property
    def endpoint(self) -> str:
        host = "localhost" if self.host in ("127.0.0.1", "0.0.0.0", "::", "::1", "localhost") else self.host
        return f"https://{host}:{self._port}"

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for s in list(self._active):
            await s.abort("emulator stopping")
        for c in list(self._conns):
            c.close()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None

    async def __aenter__(self) -> NovaEmulator:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- models -----------------------------------------------------------------------------------
    def accepts(self, model_id: str) -> bool:
        """Whether a stream of `model_id` is served (a cross-region prefix in front of an accepted id, too,
        unless `region_prefixes` is off)."""
        return model_id in self.models or (self.region_prefixes and base_model_id(model_id) != model_id
                                           and base_model_id(model_id) in self.models)

    def model_arn(self, model_id: str) -> str:
        """The resource a request for `model_id` is authorized on: the foundation model in this region, or
        the inference profile of a cross-region id (or the ARN itself)."""
        if model_id.startswith("arn:"):
            return model_id
        if base_model_id(model_id) != model_id:
            return f"arn:aws:bedrock:{self.region}:{self.account}:inference-profile/{model_id}"
        return f"arn:aws:bedrock:{self.region}::foundation-model/{model_id}"

    def denied_message(self, action: str, model_id: str) -> str:
        """IAM's refusal of `action` on the model, as AWS words it."""
        return (f"User: arn:aws:sts::{self.account}:{DENIED_PRINCIPAL} is not authorized to perform: "
                f"bedrock:{action} on resource: {self.model_arn(model_id)} because no identity-based policy "
                f"allows the bedrock:{action} action")

    def history_for(self, model_id: str) -> HistoryLimits:
        """The history limits a stream of `model_id` enforces."""
        limits = self.history_limits or model_spec(model_id).history
        return replace(limits, **self.history_overrides) if self.history_overrides else limits

    # -- fault injection --------------------------------------------------------------------------
    def inject(self, kind: str, message: str | None = None, *, after_events: int | None = None,
               after_s: float | None = None, code: str | None = None) -> Fault:
        """Arm an error for the next stream: a `kind` frame with `message` once the stream has received
        `after_events` input events or is `after_s` seconds old (immediately when neither is given)."""
        if kind not in ERROR_KINDS:
            raise ValueError(f"unknown error kind {kind!r} (choose from {sorted(ERROR_KINDS)})")
        fault = Fault(kind, message if message is not None else DEFAULT_MESSAGES[kind], after_events, after_s, code)
        self._faults.append(fault)
        return fault

    # -- faults on the streams open now (tests that fail a conversation mid-way) ----------------
    def fail_active(self, kind: str, message: str | None = None, *, code: str | None = None) -> int:
        """Send a `kind` error frame on every open stream now; returns how many."""
        if kind not in ERROR_KINDS:
            raise ValueError(f"unknown error kind {kind!r} (choose from {sorted(ERROR_KINDS)})")
        streams = list(self._active)
        for s in streams:
            s.fail(kind, message if message is not None else DEFAULT_MESSAGES[kind], code=code)
        return len(streams)

    def reset_active(self, *, connection: bool = False) -> int:
        """RST_STREAM (or reset the TCP connection) of every open stream now."""
        streams = list(self._active)
        for s in streams:
            s.reset(connection)
        return len(streams)

    def corrupt_active(self) -> int:
        """Corrupt the next output event of every open stream (a bad CRC, then the end)."""
        streams = list(self._active)
        for s in streams:
            s.invalid_after = s.n_out + 1
        return len(streams)

    def clear_faults(self) -> None:
        self._faults.clear()
        self.persistent_faults.clear()
        self.reset_after_events = None
        self.invalid_bytes_after = None
        self.reject_403 = False
        self.deny = ()

    def _take_faults(self) -> tuple[list[Fault], int | None, bool, int | None]:
        faults = [*self.persistent_faults, *self._faults]
        self._faults = []
        reset, self.reset_after_events = self.reset_after_events, None
        invalid, self.invalid_bytes_after = self.invalid_bytes_after, None
        return faults, reset, self.reset_connection, invalid

    # -- views for tests --------------------------------------------------------------------------
    @property
    def stream_events(self) -> list[list[str]]:
        """The input event names each stream received, in stream order."""
        return [r.events for r in self.streams]

    # -- connections ------------------------------------------------------------------------------
    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ssl_obj = writer.get_extra_info("ssl_object")
        alpn = ssl_obj.selected_alpn_protocol() if ssl_obj is not None else None
        if alpn != "h2":
            log.warning("client did not negotiate h2 (ALPN %r); closing", alpn)
            writer.close()
            return
        self.connections_accepted += 1
        conn = _Connection(self, reader, writer)
        self._conns.add(conn)
        try:
            await conn.run()
        finally:
            self._conns.discard(conn)


class _Connection:
    """One HTTP/2 connection (h2 state machine + socket)."""

    def __init__(self, emu: NovaEmulator, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        import h2.config
        import h2.connection

        self.emu = emu
        self.reader = reader
        self.writer = writer
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
        )
        self.streams: dict[int, _Stream] = {}
        self.closed = False
        self.terminated = False

    def flush(self) -> None:
        if self.closed:
            return
        data = self.h2.data_to_send()
        if data:
            try:
                self.writer.write(data)
            except (ConnectionError, RuntimeError):
                self.closed = True

    async def drain(self) -> None:
        if self.closed:
            return
        try:
            await self.writer.drain()
        except (ConnectionError, RuntimeError, ssl.SSLError):
            self.closed = True

    def close(self) -> None:
        if self.closed:
            return
        with contextlib.suppress(Exception):
            self.h2.close_connection()
            self.flush()
        self.closed = True
        with contextlib.suppress(Exception):
            self.writer.close()
        self._wake_all()

    def abort(self) -> None:
        """A TCP reset (fault injection)."""
        self.closed = True
        with contextlib.suppress(Exception):
            sock = self.writer.get_extra_info("socket")
            if sock is not None:
                import socket
                import struct

                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        with contextlib.suppress(Exception):
            self.writer.transport.abort()
        self._wake_all()

    def _wake_all(self) -> None:
        for s in list(self.streams.values()):
            s.window_open.set()

    async def run(self) -> None:
        import h2.events
        import h2.exceptions

        if self.emu.max_concurrent_streams is not None:
            import h2.settings

            codes = h2.settings.SettingCodes
            self.h2.local_settings = h2.settings.Settings(client=False, initial_values={
                codes.MAX_CONCURRENT_STREAMS: self.emu.max_concurrent_streams,
                codes.MAX_HEADER_LIST_SIZE: self.h2.DEFAULT_MAX_HEADER_LIST_SIZE,
            })
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(CONN_WINDOW - 65535)
        self.flush()
        try:
            while not self.closed:
                try:
                    data = await self.reader.read(65536)
                except (ConnectionError, ssl.SSLError, OSError):
                    break
                if not data:
                    break
                try:
                    events = self.h2.receive_data(data)
                except h2.exceptions.ProtocolError as exc:
                    (log.debug if self.terminated else log.warning)("HTTP/2 protocol error: %s", exc)
                    self.flush()
                    break
                for ev in events:
                    self._dispatch(ev, h2.events)
                self.flush()
                await self.drain()
        finally:
            self.closed = True
            for s in list(self.streams.values()):
                s.on_connection_lost()
            with contextlib.suppress(Exception):
                self.writer.close()

    def _dispatch(self, ev: Any, events: Any) -> None:
        if isinstance(ev, events.RequestReceived):
            stream = _Stream(self, ev.stream_id, ev.headers)
            self.streams[ev.stream_id] = stream
            stream.start()
            if ev.stream_ended:
                stream.on_input_end()
        elif isinstance(ev, events.DataReceived):
            stream = self.streams.get(ev.stream_id)
            if stream is None:
                self.ack(ev.flow_controlled_length, ev.stream_id)
            else:
                stream.on_data(ev.data, ev.flow_controlled_length)
            if ev.stream_ended and stream is not None:
                stream.on_input_end()
        elif isinstance(ev, events.StreamEnded):
            stream = self.streams.get(ev.stream_id)
            if stream is not None:
                stream.on_input_end()
        elif isinstance(ev, events.StreamReset):
            stream = self.streams.get(ev.stream_id)
            if stream is not None:
                stream.on_client_reset(ev.error_code)
        elif isinstance(ev, events.WindowUpdated):
            if ev.stream_id == 0:
                self._wake_all()
            else:
                stream = self.streams.get(ev.stream_id)
                if stream is not None:
                    stream.window_open.set()
        elif isinstance(ev, events.RemoteSettingsChanged):
            self._wake_all()
        elif isinstance(ev, events.ConnectionTerminated):
            self.terminated = True  # GOAWAY from the client (in-flight streams may still finish)

    def ack(self, size: int, stream_id: int) -> None:
        if self.closed or size <= 0:
            return
        try:
            self.h2.acknowledge_received_data(size, stream_id)
        except Exception:  # the stream is gone: still give the connection window back
            with contextlib.suppress(Exception):
                self.h2.increment_flow_control_window(size)
        self.flush()

    def forget(self, stream_id: int) -> None:
        self.streams.pop(stream_id, None)


class _Stream:
    """One `invoke-with-bidirectional-stream` request and the model stream behind it."""

    def __init__(self, conn: _Connection, stream_id: int, headers: list[tuple[str, str]]) -> None:
        self.conn = conn
        self.emu = conn.emu
        self.sid = stream_id
        self.headers = [(str(k), str(v)) for k, v in headers]
        self.hmap = {k.lower(): v for k, v in self.headers}
        self.loop = asyncio.get_running_loop()
        self.inq: asyncio.Queue = asyncio.Queue()
        self.outq: asyncio.Queue = asyncio.Queue()
        self.window_open = asyncio.Event()
        self.decoder = es.MessageDecoder()
        self.validator: InputOrderValidator | None = None  # once the model is known (its history limits)
        self.gap = InputGap()
        self.verifier: es.ChunkVerifier | None = None
        self.model: ModelStream | None = None
        self.record: StreamRecord | None = None
        self.tasks: list[asyncio.Task] = []
        self.main: asyncio.Task | None = None
        self.finished = False  # no more output may be queued (error sent / ended / reset)
        self.response_started = False
        self.response_ended = False
        self.input_ended = False
        self.reset_done = False
        self.n_in = 0
        self.n_out = 0
        self.opened_at = 0.0
        self.last_audio_at = 0.0
        self.last_input_at = 0.0  # audioInput or interactive content: the 532 clock
        self.faults: list[Fault] = []
        self.reset_after: int | None = None
        self.reset_connection = False
        self.invalid_after: int | None = None
        self.grace_task: asyncio.Task | None = None
        self.timer_wake = asyncio.Event()

    # -- h2 callbacks (synchronous, from the connection's read loop) ------------------------------
    def start(self) -> None:
        self.main = self.loop.create_task(self._run(), name=f"nova-emu-stream-{self.sid}")

    def on_data(self, data: bytes, flow_len: int) -> None:
        self.inq.put_nowait((data, flow_len))

    def on_input_end(self) -> None:
        if not self.input_ended:
            self.input_ended = True
            self.inq.put_nowait(_END)

    def on_client_reset(self, code: int | None) -> None:
        log.info("client reset stream %d (code %s)", self.sid, code)
        self.reset_done = True
        self.input_ended = True
        self.inq.put_nowait(_END)
        self._stop_output()

    def on_connection_lost(self) -> None:
        self.reset_done = True
        self.input_ended = True
        self.inq.put_nowait(_END)
        self._stop_output()

    def _stop_output(self) -> None:
        self.finished = True
        self.window_open.set()
        self.outq.put_nowait(_RESET)
        self.timer_wake.set()

    # -- main -------------------------------------------------------------------------------------
    async def _run(self) -> None:
        try:
            await self._serve()
        except Exception:
            log.exception("stream %d failed", self.sid)
        finally:
            await self._cleanup()

    async def _serve(self) -> None:
        emu = self.emu
        method = self.hmap.get(":method", "")
        raw_path = self.hmap.get(":path", "")
        split = urlsplit(raw_path)
        m = _PATH_RE.match(split.path)
        if method != "POST" or m is None:
            await self._http_error(404, "UnknownOperationException", f"No operation matches {method} {split.path}")
            return
        model_id = unquote(m.group("model"))
        if emu.credentials is not None:
            problem = self._check_request_auth(split.path, split.query)
            if problem is not None:
                await self._http_error(403, *problem)
                return
        if emu.reject_403:
            await self._http_error(403, "AccessDeniedException", emu.reject_403_message)
            return
        if emu.deny:
            await self._http_error(403, "AccessDeniedException", emu.denied_message(emu.deny[0], model_id))
            return
        if not emu.accepts(model_id):
            if _MODEL_ID_RE.match(model_id):
                await self._http_error(404, "ResourceNotFoundException", "Model not found: the requested model "
                                       f"'{model_id}' does not exist or does not support bidirectional streaming.")
            else:
                await self._http_error(400, "ValidationException", "The provided model identifier is invalid.")
            return
        self.faults, self.reset_after, self.reset_connection, self.invalid_after = emu._take_faults()
        history = emu.history_for(model_id)
        if emu.validate_order:
            self.validator = InputOrderValidator(history=history)
        open_for = getattr(emu.transport, "open_for", None)  # the local engine: the model's rules
        try:
            self.model = await (open_for(model_id, history=history) if open_for is not None else emu.transport.open())
        except ModelError as exc:
            if exc.kind == ACCESS_DENIED:
                await self._http_error(403, "AccessDeniedException", exc.message)
            elif exc.kind == THROTTLING:
                await self._http_error(429, "ThrottlingException", exc.message)
            elif exc.kind == SERVICE_UNAVAILABLE:
                await self._http_error(503, "ServiceUnavailableException", exc.message)
            else:
                await self._http_error(500, "InternalServerException", exc.message)
            return
        emu.streams_opened += 1
        self.record = StreamRecord(emu.streams_opened, model_id, history)
        emu.streams.append(self.record)
        emu._active.add(self)
        self.opened_at = self.last_audio_at = self.last_input_at = self.loop.time()
        log.info("stream %d: opened (model %s, emulator stream #%d)", self.sid, model_id, emu.streams_opened)
        if not self._send_headers([(":status", "200"), ("content-type", "application/vnd.amazon.eventstream"),
                                   ("x-amzn-requestid", str(uuid.uuid4()))]):
            return
        self.response_started = True
        self.tasks = [
            self.loop.create_task(self._input_loop(), name=f"nova-emu-in-{self.sid}"),
            self.loop.create_task(self._model_reader(), name=f"nova-emu-model-{self.sid}"),
            self.loop.create_task(self._timers(), name=f"nova-emu-timers-{self.sid}"),
        ]
        for f in self.faults:
            if f.after_events is None and f.after_s is None:
                self.fail(f.kind, f.message, code=f.code)
                break
        await self._writer_loop()

    async def _cleanup(self) -> None:
        self.finished = True
        self.timer_wake.set()
        if self.model is not None:
            model, self.model = self.model, None
            with contextlib.suppress(Exception):
                await asyncio.wait_for(model.close(), 5.0)
        # the input loop keeps acknowledging client data (verifying, noting the end frame, forwarding nothing)
        # until the request side ends; it stops by itself on END_STREAM / reset / connection loss
        input_task = None
        for t in self.tasks:
            if t.get_name().startswith("nova-emu-in-"):
                input_task = t
            else:
                t.cancel()
        if input_task is not None and (self.input_ended or self.conn.closed or self.reset_done):
            with contextlib.suppress(Exception):
                await asyncio.wait({input_task}, timeout=2.0)
            input_task.cancel()
        if self.grace_task is not None:
            self.grace_task.cancel()
        self.emu._active.discard(self)
        if self.record is not None:
            self.record.ended = True
        if self.input_ended or self.conn.closed:
            self.conn.forget(self.sid)

    async def abort(self, reason: str) -> None:
        self._stop_output()

    # -- request checks ---------------------------------------------------------------------------
    def _check_request_auth(self, path: str, query: str) -> tuple[str, str] | None:
        assert self.emu.credentials is not None
        akid, secret = self.emu.credentials
        header = self.hmap.get("authorization")
        if not header:
            return ("MissingAuthenticationTokenException", "Missing Authentication Token")
        try:
            auth = es.parse_authorization(header)
        except es.SignatureError as exc:
            return ("IncompleteSignatureException", str(exc))
        if auth.access_key_id != akid:
            return ("UnrecognizedClientException", "The security token included in the request is invalid.")
        if auth.region != self.emu.region or auth.service != es.SIGNING_SERVICE:
            return ("InvalidSignatureException", f"Credential should be scoped to a valid region and service "
                    f"('{self.emu.region}'/'{es.SIGNING_SERVICE}'), not '{auth.region}'/'{auth.service}'.")
        headers = [(k, v) for k, v in self.headers if not k.startswith(":")]
        authority = self.hmap.get(":authority")
        if authority and "host" not in self.hmap:
            headers.append(("host", authority))
        try:
            es.verify_request_signature(secret, auth, "POST", path, query, headers)
        except es.SignatureError as exc:
            return ("InvalidSignatureException", str(exc))
        self.verifier = es.ChunkVerifier(secret, auth.region, auth.signature, auth.service)
        return None

    # -- sending ----------------------------------------------------------------------------------
    def _send_headers(self, headers: list[tuple[str, str]], end_stream: bool = False) -> bool:
        if self.conn.closed or self.reset_done:
            return False
        try:
            self.conn.h2.send_headers(self.sid, headers, end_stream=end_stream)
        except Exception as exc:
            log.info("stream %d: cannot send headers: %s", self.sid, exc)
            return False
        self.conn.flush()
        return True

    async def _send_bytes(self, data: bytes) -> bool:
        h2c = self.conn.h2
        view = memoryview(data)
        while view:
            if self.conn.closed or self.reset_done:
                return False
            try:
                window = h2c.local_flow_control_window(self.sid)
            except Exception:
                return False
            size = min(window, h2c.max_outbound_frame_size, len(view))
            if size <= 0:
                self.window_open.clear()
                await self.window_open.wait()
                continue
            try:
                h2c.send_data(self.sid, view[:size].tobytes())
            except Exception as exc:
                log.info("stream %d: send failed: %s", self.sid, exc)
                return False
            self.conn.flush()
            view = view[size:]
        await self.conn.drain()
        return True

    def _end_response(self) -> None:
        if self.response_ended or self.conn.closed or self.reset_done:
            return
        self.response_ended = True
        with contextlib.suppress(Exception):
            self.conn.h2.end_stream(self.sid)
            self.conn.flush()
        if self.record is not None:
            self.record.ended = True

    async def _http_error(self, status: int, error_type: str, message: str) -> None:
        self.emu.http_errors.append((status, error_type))
        self.finished = True
        body = orjson.dumps({"message": message})
        if not self._send_headers([
            (":status", str(status)), ("content-type", "application/json"),
            ("x-amzn-errortype", error_type + _ERRORTYPE_SUFFIX), ("x-amzn-requestid", str(uuid.uuid4())),
            ("content-length", str(len(body))),
        ]):
            return
        self.response_started = True
        self.tasks = [self.loop.create_task(self._input_loop(), name=f"nova-emu-in-{self.sid}")]
        if await self._send_bytes(body):
            self._end_response()

    async def _writer_loop(self) -> None:
        while True:
            item = await self.outq.get()
            if item is _RESET or self.reset_done:
                return
            if item is _END:
                self._end_response()
                return
            if not await self._send_bytes(item):
                return

    # -- failing / resetting ----------------------------------------------------------------------
    def fail(self, kind: str, message: str, *, code: str | None = None) -> None:
        """Send an error frame for `kind` (then END_STREAM) unless the stream already finished."""
        if self.finished:
            return
        self.finished = True
        self.timer_wake.set()
        if kind in MODELED_KINDS:
            frame = es.exception_message(kind, message)
        else:
            frame = es.error_message(code or UNMODELED_CODES.get(kind, "InternalFailure"), message)
        if self.record is not None:
            self.record.error = (kind, message)
        log.info("stream %d: %s: %s", self.sid, kind, message)
        self.outq.put_nowait(frame)
        self.outq.put_nowait(_END)

    def reset(self, connection: bool) -> None:
        if self.reset_done:
            return
        if self.record is not None:
            self.record.reset = "connection" if connection else "stream"
        log.info("stream %d: fault: %s reset", self.sid, "connection" if connection else "stream")
        if connection:
            self.conn.abort()
        else:
            with contextlib.suppress(Exception):
                self.conn.h2.reset_stream(self.sid, self.emu.reset_error_code)
                self.conn.flush()
        self._stop_output()
        self.reset_done = True

    # -- input ------------------------------------------------------------------------------------
    async def _input_loop(self) -> None:
        while True:
            item = await self.inq.get()
            if item is _END:
                if self.record is not None:
                    self.record.input_closed = True
                self._on_input_closed()
                return
            data, flow_len = item
            try:
                if self.record is not None and not self.reset_done:
                    # after the response has finished, frames are still decoded (signatures checked, the end
                    # frame noted) but no event is forwarded any more
                    try:
                        messages = self.decoder.feed(data)
                    except es.EventStreamError as exc:
                        self.fail(VALIDATION, f"Invalid input request: undecodable event stream: {exc}")
                        messages = []
                    for msg in messages:
                        await self._on_message(msg)
            except es.EventStreamError:
                pass
            finally:
                self.conn.ack(flow_len, self.sid)

    def _on_input_closed(self) -> None:
        if self.response_ended or self.finished or self.model is None:
            if self.response_ended or self.reset_done:
                self.conn.forget(self.sid)
            return
        # the client closed its side: let the model finish its output, then end the response
        self.grace_task = self.loop.create_task(self._grace_close())

    async def _grace_close(self) -> None:
        await asyncio.sleep(self.emu.input_end_grace_s)
        if not self.finished and self.model is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.model.close(), 5.0)
            await asyncio.sleep(0.5)
            if not self.finished:
                self.finished = True
                self.outq.put_nowait(_END)

    async def _on_message(self, outer: es.Message) -> None:
        if self.verifier is not None:
            try:
                self.verifier.verify(outer)
            except es.SignatureError as exc:
                self.fail(VALIDATION, f"Invalid input request: {exc}")
                return
            if self.record is not None:
                self.record.signatures_verified += 1
        try:
            frame = es.decode_input_frame(outer)
        except es.EventStreamError as exc:
            self.fail(VALIDATION, f"Invalid input request: {exc}")
            return
        if frame.is_end:
            if self.record is not None:
                self.record.input_closed = True
            return
        if self.finished or self.model is None:
            return
        event = frame.event
        assert event is not None
        inner = event.get("event") if isinstance(event, dict) else None
        name = next(iter(inner)) if isinstance(inner, dict) and len(inner) == 1 else "?"
        self.n_in += 1
        self.emu.events_received += 1
        if self.record is not None:
            self.record.events.append(name)
        if self.validator is not None:
            try:
                self.validator.check(event)
            except EventOrderError as exc:
                self.fail(VALIDATION, exc.message)
                return
        if name == "audioInput":
            self.last_audio_at = self.loop.time()
        if self.gap.counts(event):
            self.last_input_at = self.loop.time()
        assert self.model is not None
        try:
            await self.model.send(event)
        except ModelError as exc:
            self.fail(exc.kind, exc.message)
            return
        except Exception as exc:
            log.exception("backing transport send failed")
            self.fail(INTERNAL_SERVER, f"internal error: {exc!r}")
            return
        for f in self.faults:
            if f.after_events is not None and self.n_in >= f.after_events:
                self.fail(f.kind, f.message, code=f.code)
                return
        if self.reset_after is not None and self.n_in >= self.reset_after:
            self.reset(self.reset_connection)

    # -- output -----------------------------------------------------------------------------------
    async def _model_reader(self) -> None:
        model = self.model
        assert model is not None
        while not self.finished:
            try:
                event = await model.receive()
            except ModelError as exc:
                self.fail(exc.kind, exc.message)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.exception("backing transport receive failed")
                self.fail(INTERNAL_SERVER, f"internal error: {exc!r}")
                return
            if self.finished:
                return
            if event is None:
                self.finished = True
                self.timer_wake.set()
                self.outq.put_nowait(_END)
                return
            if self.validator is not None:
                inner = event.get("event") if isinstance(event, dict) else None
                tool_use = inner.get("toolUse") if isinstance(inner, dict) else None
                if isinstance(tool_use, dict):  # before the client can see it: its result may answer it
                    self.validator.model_tool_use(tool_use.get("toolUseId"))
            self.outq.put_nowait(es.output_chunk(event))
            self.n_out += 1
            if self.record is not None:
                self.record.output_events += 1
            if self.invalid_after is not None and self.n_out >= self.invalid_after:
                self.finished = True
                if self.record is not None:
                    self.record.error = ("invalidBytes", "corrupt event-stream bytes")
                self.outq.put_nowait(_corrupt_frame())
                self.outq.put_nowait(_END)
                return

    async def _timers(self) -> None:
        emu = self.emu
        timed = [f for f in self.faults if f.after_s is not None]
        while not self.finished:
            now = self.loop.time()
            age_deadline = self.opened_at + emu.max_stream_s
            idle_deadline = self.last_audio_at + emu.idle_timeout_s
            if now >= age_deadline:
                self.fail(MODEL_TIMEOUT, MODEL_TIMEOUT_MESSAGE)
                return
            if now >= idle_deadline:
                self.fail(VALIDATION, IDLE_TIMEOUT_MESSAGE)
                return
            gap_deadline = self.last_input_at + emu.input_gap_s if emu.input_gap_s > 0 else float("inf")
            if now >= gap_deadline:
                log.info("stream %d: no audio or interactive content for %.1f s", self.sid, now - self.last_input_at)
                self.fail(VALIDATION, INPUT_GAP_MESSAGE)
                return
            deadline = min(age_deadline, idle_deadline, gap_deadline)
            for f in timed:
                due = self.opened_at + (f.after_s or 0.0)
                if now >= due:
                    self.fail(f.kind, f.message, code=f.code)
                    return
                deadline = min(deadline, due)
            self.timer_wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.timer_wake.wait(), max(0.0, deadline - now) + 0.001)


def _corrupt_frame() -> bytes:
    """A message whose trailing CRC is wrong (the SDK raises ChecksumMismatch)."""
    good = bytearray(es.output_chunk({"event": {"textOutput": {"content": "corrupt"}}}))
    good[-1] ^= 0xFF
    return bytes(good)


# ---------------------------------------------------------------------------------------------
# CLI: `novagate emulate nova`


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"listen port (default {DEFAULT_PORT}; 0 = any)")
    parser.add_argument("--cert", help="server certificate chain (PEM); default: a generated throwaway CA + cert")
    parser.add_argument("--key", help="server private key (PEM), with --cert")
    parser.add_argument("--tls-dir", help="where to write the generated CA/cert/bundle "
                        "(default ~/.cache/novagate/nova-emulator-tls; reused when present)")
    parser.add_argument("--region", default="us-east-1", help="the region clients sign for (default us-east-1)")
    parser.add_argument("--verify-signatures", action="store_true",
                        help="verify the request SigV4 signature and every chunk signature")
    parser.add_argument("--access-key-id", default=DUMMY_ACCESS_KEY_ID, help="key id accepted with --verify-signatures")
    parser.add_argument("--secret-access-key", default=DUMMY_SECRET_ACCESS_KEY,
                        help="secret used to verify signatures with --verify-signatures")
    parser.add_argument("--idle-timeout-s", type=float, default=IDLE_TIMEOUT_S,
                        help="seconds without audioInput before the 531 ValidationException "
                        f"(default {IDLE_TIMEOUT_S:g})")
    parser.add_argument("--input-gap-s", type=float, default=INPUT_GAP_S,
                        help="seconds without an audioInput or interactive content (an interactive TEXT block's "
                        "textInput, a toolResult) before the 532 ValidationException; any value down to a "
                        f"fraction of a second for tests; 0: off (default {INPUT_GAP_S:g})")
    parser.add_argument("--max-stream-s", type=float, default=MAX_STREAM_AGE_S,
                        help=f"stream age that ends with ModelTimeoutException (default {MAX_STREAM_AGE_S:g})")
    parser.add_argument("--model", action="append", dest="models", metavar="MODEL_ID",
                        help=f"accepted model id (repeatable; default: the catalog's, {', '.join(DEFAULT_MODELS)})")
    parser.add_argument("--no-region-prefixes", action="store_true",
                        help="refuse a model id behind a cross-region prefix (us., eu., apac., global.); by "
                        "default they are accepted (unverified against the service)")
    parser.add_argument("--history-limits", choices=("model", *HISTORY_PRESETS), default="model",
                        help="history limits enforced: model (each model's own: Nova 2 200 KB in total, 50 KB per "
                        "message and textInput; Nova Sonic v1 40 KB / 1 KB), conservative (40 KB in total, 1 KB "
                        "per textInput, for every model: a stand-in for a service that still enforces 40 KB), "
                        "nova-2 (200 KB / 50 KB for every model) (default model)")
    parser.add_argument("--history-max-bytes", type=int, metavar="N",
                        help="history bytes in total, for every model (on top of --history-limits)")
    parser.add_argument("--history-message-max-bytes", type=int, metavar="N",
                        help="bytes of one history message, for every model")
    parser.add_argument("--history-input-max-bytes", type=int, metavar="N",
                        help="bytes of one textInput of a non-interactive block (history, system prompt), for every "
                        "model")
    parser.add_argument("--no-order-check", action="store_true", help="do not enforce the input event order")
    parser.add_argument("--max-concurrent-streams", type=int, metavar="N",
                        help="HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS per connection (default 100, as h2's and as "
                        "Bedrock's behaves): a client's stream past it waits for a free slot")
    parser.add_argument("--reject-403", action="store_true", help="answer every request with 403 AccessDeniedException "
                        "(the message of an account without access to the model)")
    parser.add_argument("--deny", default="", metavar="ACTIONS",
                        help="comma-separated IAM actions the caller lacks (InvokeModel, "
                        "InvokeModelWithBidirectionalStream): every request gets 403 AccessDeniedException naming the "
                        "first and the model's ARN, as IAM words it")
    parser.add_argument("--account", default="123456789012", help="the account in ARNs of --deny messages")
    parser.add_argument("--inject", metavar="KIND", help="error kind to inject into the first stream "
                        f"(one of {', '.join(sorted(ERROR_KINDS))})")
    parser.add_argument("--inject-message", help="message of the injected error (default: the service's text)")
    parser.add_argument("--inject-after-events", type=int, help="inject after this many input events")
    parser.add_argument("--inject-after-s", type=float, help="inject this many seconds after the stream opens")
    parser.add_argument("--inject-every-stream", action="store_true", help="inject into every stream, not just the first")
    parser.add_argument("--reset-after-events", type=int, help="RST_STREAM the first stream after N input events")
    parser.add_argument("--reset-connection", action="store_true", help="with --reset-after-events: reset the TCP connection")
    parser.add_argument("--invalid-bytes-after", type=int, help="send corrupt bytes after N output events (first stream)")
    parser.add_argument("--engine", choices=("local", "scripted"), default="local",
                        help="the model behind the wire: local (speech models) or scripted (canned transcripts and "
                        "reply, a tone for a voice, energy endpointing: for load tests) (default local)")
    parser.add_argument("--asr", choices=("sphinx", "whisper"), default="sphinx", help="local engine ASR (default sphinx)")
    parser.add_argument("--tts", choices=("espeak", "hibari"), default="espeak", help="local engine TTS (default espeak)")
    parser.add_argument("--endpoint-ms", type=int, default=700, help="local / scripted engine: silence that ends a turn")
    parser.add_argument("--scripted-reply", default="",
                        help="scripted engine: the reply to every turn (default: a built-in two-sentence reply)")
    parser.add_argument("--scripted-reply-s", type=float, default=2.0,
                        help="scripted engine: seconds of reply audio (default 2)")
    parser.add_argument("--scripted-transcripts", default="",
                        help='scripted engine: user transcripts cycled per stream, separated by "|" '
                        "(default: utterance N)")
    parser.add_argument("--scripted-energy-db", type=float, default=-40.0,
                        help="scripted engine: frame RMS (dBFS) above which input is speech (default -40)")
    parser.add_argument("--tool-calls", default="", metavar="JSON",
                        help='local / scripted engine: call a tool when the user says a phrase, a JSON list (or '
                        '@path of a JSON file) of {"phrase": "record the call", "tool": "record_call", '
                        '"arguments": {...}, "filler": "One moment."}; the tool must be declared in promptStart')
    parser.add_argument("--engine-trace", default="",
                        help="debug: JSONL file of every input event the engine receives (contains text)")
    parser.add_argument("--grammar", default="", help='sphinx phrase grammar, phrases separated by "|" (default: free-form)')
    parser.add_argument("--no-warm", action="store_true", help="do not load the speech models before listening")


def denied_actions(actions) -> tuple[str, ...]:
    """`deny` as action names ('InvokeModel', 'bedrock:InvokeModelWithBidirectionalStream', ...)."""
    out = []
    for action in actions:
        name = action.strip().removeprefix("bedrock:")
        if not name:
            continue
        if name not in INVOKE_ACTIONS:
            raise ValueError(f"unknown action {action!r} to deny (choose from {', '.join(INVOKE_ACTIONS)})")
        out.append(name)
    return tuple(out)


def history_options(args: argparse.Namespace) -> tuple[HistoryLimits | None, dict[str, int]]:
    """The emulator's `history_limits` and `history_overrides` from the --history-* flags."""
    overrides = {name: value for name, value in (("total_bytes", args.history_max_bytes),
                                                 ("message_bytes", args.history_message_max_bytes),
                                                 ("input_bytes", args.history_input_max_bytes))
                 if value is not None}
    if any(v < 1 for v in overrides.values()):
        raise SystemExit("novagate emulate nova: --history-*-max-bytes must be >= 1")
    return HISTORY_PRESETS.get(args.history_limits), overrides


def _default_tls_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "novagate" / "nova-emulator-tls"


def _tls_files(args: argparse.Namespace) -> tuple[str, str, str | None]:
    if args.cert or args.key:
        if not (args.cert and args.key):
            raise SystemExit("--cert and --key go together")
        return args.cert, args.key, None
    d = Path(args.tls_dir) if args.tls_dir else _default_tls_dir()
    names = [d / n for n in ("ca.pem", "cert.pem", "key.pem", "bundle.pem")]
    if all(p.is_file() for p in names):
        return str(names[1]), str(names[2]), str(names[3])
    _, cert, key, bundle = make_test_tls(d)
    return cert, key, bundle


def run(args: argparse.Namespace) -> int:
    """Run the emulator in the foreground until SIGINT/SIGTERM. Returns the exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return asyncio.run(_serve_cli(args))
    except KeyboardInterrupt:
        return 0


async def _serve_cli(args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)

    from gateway.local.engine import DEFAULT_REPLY, LocalEngine, LocalEngineConfig, ScriptedEngine, scripted_config

    if args.input_gap_s < 0:
        raise SystemExit("novagate emulate nova: --input-gap-s must be >= 0 (0: off)")
    preset, overrides = history_options(args)
    try:
        denied = denied_actions(args.deny.split(","))
    except ValueError as exc:
        raise SystemExit(f"novagate emulate nova: --deny: {exc}") from None
    certfile, keyfile, bundle = _tls_files(args)
    # the engine's own limits a little later than the emulator's: the emulator's frame is what the client sees
    limits = {"endpoint_ms": args.endpoint_ms, "idle_timeout_s": args.idle_timeout_s + 1.0,
              "input_gap_s": args.input_gap_s + 1.0 if args.input_gap_s > 0 else 0.0,
              "max_stream_s": args.max_stream_s + 1.0, "trace_path": args.engine_trace or None,
              "tool_calls": args.tool_calls}
    if args.engine == "scripted":
        try:
            engine: LocalEngine = ScriptedEngine(scripted_config(
                reply=args.scripted_reply or DEFAULT_REPLY, reply_s=args.scripted_reply_s,
                transcripts=tuple(t.strip() for t in args.scripted_transcripts.split("|") if t.strip()),
                energy_threshold_db=args.scripted_energy_db, **limits,
            ))
        except ValueError as exc:
            raise SystemExit(f"novagate emulate nova: {exc}") from None
    else:
        grammar = tuple(p.strip() for p in (args.grammar or "").split("|") if p.strip())
        try:
            engine = LocalEngine(LocalEngineConfig(asr=args.asr, tts=args.tts, grammar=grammar, **limits))
        except ValueError as exc:
            raise SystemExit(f"novagate emulate nova: {exc}") from None
    if not args.no_warm:
        await engine.warm()
    creds = (args.access_key_id, args.secret_access_key) if args.verify_signatures else None
    emu = NovaEmulator(
        engine, host=args.host, port=args.port, certfile=certfile, keyfile=keyfile, credentials=creds,
        region=args.region, idle_timeout_s=args.idle_timeout_s, input_gap_s=args.input_gap_s,
        max_stream_s=args.max_stream_s, models=tuple(args.models) if args.models else DEFAULT_MODELS,
        region_prefixes=not args.no_region_prefixes, history_limits=preset, history_overrides=overrides, reject_403=args.reject_403,
        deny=denied, account=args.account,
        validate_order=not args.no_order_check, max_concurrent_streams=args.max_concurrent_streams,
    )
    if args.inject:
        if args.inject not in ERROR_KINDS:
            raise SystemExit(f"--inject: unknown kind {args.inject!r} (choose from {sorted(ERROR_KINDS)})")
        fault = Fault(args.inject, args.inject_message or DEFAULT_MESSAGES[args.inject],
                      args.inject_after_events, args.inject_after_s)
        if args.inject_every_stream:
            emu.persistent_faults.append(fault)
        else:
            emu._faults.append(fault)
    emu.reset_after_events = args.reset_after_events
    emu.reset_connection = bool(args.reset_connection)
    emu.invalid_bytes_after = args.invalid_bytes_after
    await emu.start()
    lines = [f"novagate nova emulator listening on https://{args.host}:{emu.port} (HTTP/2, TLS)"]
    history = "each model's own" if emu.history_limits is None else args.history_limits
    if overrides:
        history += ", " + ", ".join(f"{k}={v}" for k, v in overrides.items())
    gap = f"{args.input_gap_s:g} s" if args.input_gap_s > 0 else "off"
    lines.append(f"models: {', '.join(emu.models)}{' (+ cross-region prefixes)' if emu.region_prefixes else ''}; "
                 f"input gap (532): {gap}; idle (531): {args.idle_timeout_s:g} s; history limits: {history}")
    lines.append("point an unmodified client at it with:")
    lines.append(f"  export AWS_ENDPOINT_URL_BEDROCK_RUNTIME={emu.endpoint}")
    if bundle:
        lines.append(f"  export SSL_CERT_FILE={bundle}")
    else:
        lines.append("  export SSL_CERT_FILE=<a bundle that trusts the CA of --cert>")
    lines.append(f"  export AWS_ACCESS_KEY_ID={args.access_key_id if args.verify_signatures else DUMMY_ACCESS_KEY_ID}")
    lines.append(f"  export AWS_SECRET_ACCESS_KEY={args.secret_access_key if args.verify_signatures else DUMMY_SECRET_ACCESS_KEY}")
    lines.append(f"  export AWS_REGION={args.region}")
    print("\n".join(lines), flush=True)
    try:
        await stop.wait()
    finally:
        await emu.stop()
        await engine.aclose()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="novagate emulate nova", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
