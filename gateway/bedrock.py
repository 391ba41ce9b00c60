"""BedrockTransport: the ModelTransport for Amazon Nova Sonic on Bedrock Runtime
(`InvokeModelWithBidirectionalStream`) over aws-sdk-bedrock-runtime 0.12.0 (reference/nova-sonic.md §7).

* A pool of `AsyncBedrockRuntimeClient`s, each built with
  `AsyncBedrockRuntimeConfig.resolve(region=..., endpoint_uri=..., transport=AWSCRTHTTPClient(force_http_2))`.
  Each client keeps one HTTP/2 connection, and the service caps the streams one connection carries
  (SETTINGS_MAX_CONCURRENT_STREAMS): the SDK holds a stream past the cap unsent, and its caller only sees
  a timeout. So a client carries at most `streams_per_connection` streams and the next stream gets a new
  client (a new connection); a client left without streams is closed, except the first.
  The endpoint is the explicit `endpoint_url`, else what the SDK resolves: `AWS_ENDPOINT_URL_BEDROCK_RUNTIME`,
  `AWS_ENDPOINT_URL`, the profile's `endpoint_url`, else the regional endpoint. Credentials come from
  botocore's default chain (`default_identity`), resolved off the event loop for each `open()` and fixed for
  the life of that stream. Custom CAs: set `SSL_CERT_FILE` before the first `open()` (the CRT transport reads
  it when it is constructed).
* `open()` starts the request and returns at once: it does **not** wait for the HTTP response, because the
  service may answer only once events flow. HTTP-level failures (403 AccessDenied, 404, 400 ...) therefore
  surface as ModelError from the first `receive()` — and from `send()` as soon as the stream's pump has seen
  them.
* Per stream exactly one pump task calls the SDK's `await_output()` (under a timeout, shielded) and then
  reads the output events in a loop (`EventReader`: the SDK receiver's response body, decoded here, for
  about a quarter of the SDK's CPU), feeding a bounded queue that `receive()` reads. The pump is never
  cancelled while it is blocked in the SDK or the CRT (cancelling races the CRT's native callbacks:
  `InvalidStateError`, aws-sdk-python#13).
* `send()` encodes and signs each event itself (`EventWriter`: the SDK's frames, for about half the SDK's
  CPU) onto the SDK's own request body. While that body's buffer has room the write cannot wait, so it is
  made directly; past it (a dead connection blocks the 17th send forever) it runs in a task bounded by
  `send_timeout_s`, and fails fast once the pump has failed. `close()` closes the SDK input stream (bounded), then waits (bounded) for the
  pump to drain; it never raises and is idempotent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import weakref
from dataclasses import dataclass
from typing import Any

import orjson

from gateway import eventstream as es
from gateway.transport import (
    ACCESS_DENIED,
    CONNECTION,
    INTERNAL_SERVER,
    MODEL_STREAM_ERROR,
    MODEL_TIMEOUT,
    SERVICE_UNAVAILABLE,
    THROTTLING,
    VALIDATION,
    ModelError,
)
from protocol.models import ModelSpec, model_spec
from protocol.nova_events import DEFAULT_MODEL_ID

from .logs import log

logger = logging.getLogger("novagate.bedrock")

QUEUE_SIZE = 256
STREAMS_PER_CONNECTION = 100  # what Bedrock's HTTP/2 connections carry (and h2's default, the emulator's)

_WAKE = object()


class BedrockSetupError(RuntimeError):
    """Bedrock cannot be used as configured (no region, no credentials, SDK missing)."""


@dataclass(frozen=True, slots=True)
class CredentialCheck:
    """The outcome of `check_credentials`: where the gateway will sign from (no secrets)."""

    region: str
    access_key_id: str  # masked: first 4 and last 4 characters
    temporary: bool
    expiration: Any | None  # datetime when the credentials expire (temporary credentials)


# ---------------------------------------------------------------------------------------------
# Error mapping


def _message(exc: BaseException) -> str:
    msg = getattr(exc, "message", None)
    if isinstance(msg, str) and msg:
        return msg
    return str(exc) or type(exc).__name__


def map_sdk_error(exc: BaseException) -> ModelError:
    """Map an exception from the SDK (or the CRT below it) to a ModelError, keeping the service's message."""
    if isinstance(exc, ModelError):
        return exc
    try:
        from aws_sdk_bedrock_runtime import models as m
        from smithy_aws_event_stream.exceptions import EventError, UnmodeledEventError
        from smithy_core.exceptions import CallError, SmithyIdentityError
    except ImportError:  # pragma: no cover - the SDK is a pinned dependency
        return ModelError(CONNECTION, _message(exc))

    msg = _message(exc)
    table: list[tuple[type, str]] = [
        (m.ValidationException, VALIDATION),
        (m.ModelTimeoutException, MODEL_TIMEOUT),
        (m.ThrottlingException, THROTTLING),
        (m.ServiceQuotaExceededException, THROTTLING),
        (m.ModelStreamErrorException, MODEL_STREAM_ERROR),
        (m.ModelErrorException, MODEL_STREAM_ERROR),
        (m.InternalServerException, INTERNAL_SERVER),
        (m.ServiceUnavailableException, SERVICE_UNAVAILABLE),
        (m.ModelNotReadyException, SERVICE_UNAVAILABLE),
        (m.AccessDeniedException, ACCESS_DENIED),
        (m.ResourceNotFoundException, VALIDATION),
    ]
    for cls, kind in table:
        if isinstance(exc, cls):
            if cls is m.ResourceNotFoundException:
                msg = f"ResourceNotFoundException: {msg}"
            return ModelError(kind, msg)
    if isinstance(exc, UnmodeledEventError):
        if "AccessDenied" in exc.code or "UnrecognizedClient" in exc.code:
            return ModelError(ACCESS_DENIED, f"{exc.code}: {exc.message}")
        return ModelError(CONNECTION, f"{exc.code}: {exc.message}")
    if isinstance(exc, EventError):  # ChecksumMismatch, InvalidEventBytes, ... (transient per §6.1)
        return ModelError(MODEL_STREAM_ERROR, f"Invalid event bytes: {msg}")
    if isinstance(exc, SmithyIdentityError):
        return ModelError(ACCESS_DENIED, f"no usable AWS credentials: {msg}")
    if isinstance(exc, CallError):
        meta = getattr(exc, "response_metadata", None)
        status = getattr(meta, "http_status_code", None)
        if status in (401, 403):
            return ModelError(ACCESS_DENIED, msg)
        if status == 429 or exc.is_throttling_error:
            return ModelError(THROTTLING, msg)
        if status == 408:
            return ModelError(MODEL_TIMEOUT, msg)
        if status == 503:
            return ModelError(SERVICE_UNAVAILABLE, msg)
        if status is not None and status >= 500:
            return ModelError(INTERNAL_SERVER, msg)
        if status is not None and 400 <= status < 500:
            return ModelError(VALIDATION, msg)
        return ModelError(CONNECTION, msg)
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return ModelError(CONNECTION, f"timed out: {msg}")
    return ModelError(CONNECTION, f"{type(exc).__name__}: {msg}")


# ---------------------------------------------------------------------------------------------
# The transport


class BedrockTransport:
    """ModelTransport over Bedrock Runtime's bidirectional stream (name "bedrock")."""

    name = "bedrock"

    def __init__(
        self,
        *,
        model_id: str = DEFAULT_MODEL_ID,
        region: str | None,
        endpoint_url: str | None = None,
        send_timeout_s: float = 10.0,
        output_timeout_s: float = 30.0,
        close_timeout_s: float = 3.0,
        queue_size: int = QUEUE_SIZE,
        streams_per_connection: int = STREAMS_PER_CONNECTION,
    ) -> None:
        self.model_id = model_id
        self.region = region
        self.endpoint_url = endpoint_url
        self.send_timeout_s = send_timeout_s
        self.output_timeout_s = output_timeout_s
        self.close_timeout_s = close_timeout_s
        self.queue_size = queue_size
        self.streams_per_connection = streams_per_connection
        self._pool: list[_Pooled] = []  # oldest first
        self._config: Any = None
        self._lock = asyncio.Lock()
        self._streams: set[BedrockStream] = set()
        self._closed = False
        self._opened = 0

    @property
    def capabilities(self) -> ModelSpec:
        """What the configured model takes (protocol.models, the catalog)."""
        return model_spec(self.model_id)

    @property
    def endpoint(self) -> str | None:
        """The endpoint in use once the client exists (explicit, from the environment, or regional)."""
        if self._config is None:
            return self.endpoint_url
        return str(self._config.endpoint_uri) if self._config.endpoint_uri else None

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    @property
    def connections(self) -> int:
        """SDK clients (HTTP/2 connections) in the pool."""
        return len(self._pool)

    async def _client_with_room(self) -> _Pooled:
        """A pooled client carrying fewer than `streams_per_connection` streams, its slot taken; a new
        client when all are full."""
        for pooled in self._pool:
            if pooled.streams < self.streams_per_connection:
                pooled.streams += 1
                return pooled
        async with self._lock:  # one new connection at a time
            for pooled in self._pool:
                if pooled.streams < self.streams_per_connection:
                    pooled.streams += 1
                    return pooled
            if self._closed:
                raise ModelError(CONNECTION, "the Bedrock transport is closed")
            pooled = _Pooled(await self._new_client())
            pooled.streams = 1
            self._pool.append(pooled)
            if len(self._pool) > 1:
                log(logger, logging.INFO, "bedrock: another connection", connections=len(self._pool),
                    streams_per_connection=self.streams_per_connection)
            return pooled

    def _release_slot(self, pooled: _Pooled) -> None:
        pooled.streams -= 1
        if pooled.streams == 0 and pooled in self._pool[1:]:
            self._pool.remove(pooled)  # an idle extra connection
            task = asyncio.get_running_loop().create_task(_close_client(pooled.client, self.close_timeout_s))
            _BACKGROUND.add(task)
            task.add_done_callback(_BACKGROUND.discard)

    async def _new_client(self) -> Any:
        try:
            from aws_sdk_bedrock_runtime.client import AsyncBedrockRuntimeClient
            from aws_sdk_bedrock_runtime.config import AsyncBedrockRuntimeConfig
            from smithy_http.aio.crt import AWSCRTHTTPClient, AWSCRTHTTPClientConfig
        except ImportError as exc:  # pragma: no cover
            raise BedrockSetupError(
                f"aws-sdk-bedrock-runtime[awscrt]==0.12.0 is required for the bedrock engine: {exc}"
            ) from exc
        overrides: dict[str, Any] = {
            # the CRT client reads SSL_CERT_FILE here, when it builds its TLS context
            "transport": AWSCRTHTTPClient(client_config=AWSCRTHTTPClientConfig(force_http_2=True)),
        }
        if self.region:
            overrides["region"] = self.region
        if self.endpoint_url:  # passing None would override (disable) the env/profile resolution
            overrides["endpoint_uri"] = self.endpoint_url
        try:
            config = await AsyncBedrockRuntimeConfig.resolve(**overrides)
        except Exception as exc:
            if not self.region and "region" in str(exc).lower():
                raise ModelError(CONNECTION, "no AWS region configured (set AWS_REGION or the gateway's "
                                 "Bedrock region)") from exc
            raise ModelError(CONNECTION, f"cannot configure the Bedrock client: {_message(exc)}") from exc
        if not config.region:
            raise ModelError(CONNECTION, "no AWS region configured (set AWS_REGION or the gateway's region)")
        if self._config is None:
            self._config = config
            log(logger, logging.INFO, "bedrock client created", model_id=self.model_id, region=config.region,
                endpoint=str(config.endpoint_uri) if config.endpoint_uri else "(regional)")
        return AsyncBedrockRuntimeClient(config=config)

    async def _identity(self) -> Any:
        """Credentials for one stream, from botocore's default chain (env, profile, SSO, web identity
        as on EKS with IRSA, ECS, IMDS: more than smithy-aws-core 0.12 resolves), read off the event
        loop. A stream keeps its identity for life (reference §9.3): refreshed credentials go to
        the next stream, never into a live one."""
        try:
            return await asyncio.to_thread(default_identity)
        except BedrockSetupError as exc:
            raise ModelError(ACCESS_DENIED, str(exc)) from None

    async def open(self) -> BedrockStream:
        """Start a bidirectional stream. Does not wait for the HTTP response (see the module docstring)."""
        if self._closed:
            raise ModelError(CONNECTION, "the Bedrock transport is closed")
        pooled = await self._client_with_room()
        try:
            sdk_stream = await self._start(pooled.client)
        except BaseException:
            self._release_slot(pooled)
            raise
        self._opened += 1
        stream = BedrockStream(self, sdk_stream, f"bedrock-{self._opened}", pooled)
        self._streams.add(stream)
        return stream

    async def _start(self, client: Any) -> Any:
        from aws_sdk_bedrock_runtime.models import InvokeModelWithBidirectionalStreamOperationInput

        identity = await self._identity()
        call = asyncio.ensure_future(client.invoke_model_with_bidirectional_stream(
            InvokeModelWithBidirectionalStreamOperationInput(model_id=self.model_id),
            plugins=[_fixed_identity(identity)],
        ))
        try:
            return await asyncio.wait_for(asyncio.shield(call), self.output_timeout_s)
        except TimeoutError as exc:
            call.add_done_callback(_consume)
            raise ModelError(CONNECTION, f"could not start a Bedrock stream within {self.output_timeout_s:g}s") from exc
        except Exception as exc:
            raise map_sdk_error(exc) from exc

    async def aclose(self) -> None:
        """Close every stream and the client (its CRT connection pool). Never raises."""
        self._closed = True
        streams = list(self._streams)
        if streams:
            await asyncio.gather(*(s.close() for s in streams), return_exceptions=True)
        pool, self._pool = self._pool, []
        await asyncio.gather(*(_close_client(p.client, self.close_timeout_s) for p in pool))

    def _forget(self, stream: BedrockStream) -> None:
        if stream in self._streams:
            self._streams.discard(stream)
            self._release_slot(stream.pooled)


class _Pooled:
    """One SDK client (one HTTP/2 connection) and the streams it carries now."""

    __slots__ = ("client", "streams")

    def __init__(self, client: Any):
        self.client = client
        self.streams = 0


_BACKGROUND: set[asyncio.Task] = set()


async def _close_client(client: Any, timeout_s: float) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(client.close(), timeout_s)


class BedrockStream:
    """One Nova Sonic stream over the SDK (implements gateway.transport.ModelStream)."""

    def __init__(self, transport: BedrockTransport, sdk_stream: Any, stream_id: str, pooled: _Pooled) -> None:
        self._t = transport
        self.pooled = pooled
        self._sdk = sdk_stream
        self.stream_id = stream_id
        self._queue: asyncio.Queue = asyncio.Queue(transport.queue_size)
        self._error: ModelError | None = None
        self._error_delivered = False
        self._pump_done = False
        self._closing = False
        self._closed = False
        self._send_lock = asyncio.Lock()
        self._writer = EventWriter(sdk_stream.input_stream)
        self.output_ready = asyncio.Event()  # the HTTP response (200) has arrived
        loop = asyncio.get_running_loop()
        self._failed = loop.create_future()  # resolves when the pump ends
        self._pump = loop.create_task(self._run_pump(), name=f"bedrock-pump-{stream_id}")

    # -- pump -------------------------------------------------------------------------------------
    async def _run_pump(self) -> None:
        try:
            out_fut = asyncio.ensure_future(self._sdk.await_output())
            try:
                _, receiver = await asyncio.wait_for(asyncio.shield(out_fut), self._t.output_timeout_s)
            except TimeoutError:
                out_fut.add_done_callback(_consume)
                raise ModelError(
                    CONNECTION, f"no response from Bedrock within {self._t.output_timeout_s:g}s "
                    "(check the endpoint, the network and the TLS trust store)"
                ) from None
            finally:
                _adopt_crt_writers()
            self.output_ready.set()
            async for event in EventReader(receiver, self.stream_id):  # never cancelled: see the module docstring
                if self._closing:
                    continue  # nobody reads any more: drain the stream to its end
                await self._queue.put(event)
        except asyncio.CancelledError:
            self._error = self._error or ModelError(CONNECTION, "the stream was cancelled")
            raise
        except Exception as exc:  # noqa: BLE001 - every failure becomes the stream's ModelError
            self._error = map_sdk_error(exc)
            if not self._closing:
                log(logger, logging.INFO, "bedrock stream failed", stream_id=self.stream_id, kind=self._error.kind,
                    error=self._error.message)
        finally:
            self._pump_done = True
            if not self._failed.done():
                self._failed.set_result(None)
            with contextlib.suppress(asyncio.QueueFull):
                self._queue.put_nowait(_WAKE)

    # -- ModelStream ------------------------------------------------------------------------------
    async def send(self, event: dict) -> None:
        if self._error is not None:
            raise self._error
        if self._closed:
            raise ModelError(CONNECTION, "the Bedrock stream is closed")
        if self._pump_done:
            raise ModelError(CONNECTION, "the Bedrock stream has ended")
        if not self._send_lock.locked() and self._writer.ready():  # cannot wait on the network: no task, no timer
            try:
                await self._writer.send(event)
            except Exception as exc:
                raise self._write_failed(exc) from exc
            return
        async with self._send_lock:
            task = asyncio.ensure_future(self._writer.send(event))
            done, _ = await asyncio.wait({task, self._failed}, timeout=self._t.send_timeout_s,
                                         return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                exc = task.exception()
                if exc is not None:
                    raise self._write_failed(exc) from exc
                return
            task.cancel()
            task.add_done_callback(_consume)
            if self._error is not None:
                raise self._error
            if self._pump_done:
                raise ModelError(CONNECTION, "the Bedrock stream has ended")
            self._error = ModelError(CONNECTION, f"send timed out after {self._t.send_timeout_s:g}s")
            raise self._error

    def _write_failed(self, exc: BaseException) -> ModelError:
        """The stream's error after a failed write: the first one seen stays."""
        self._error = self._error or map_sdk_error(exc)
        return self._error

    async def receive(self) -> dict | None:
        while True:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                if self._pump_done:
                    if self._error is not None and not self._error_delivered:
                        self._error_delivered = True
                        raise self._error
                    return None
                item = await self._queue.get()
            if item is _WAKE:
                continue
            return item

    async def close(self) -> None:
        """Close the input side (signed end frame + END_STREAM), then let the pump drain. Never raises."""
        if self._closed:
            return
        self._closed = True
        self._closing = True
        self._drain_queue()
        timeout = self._t.close_timeout_s
        try:
            closer = asyncio.ensure_future(self._sdk.input_stream.close())
            closer.add_done_callback(_consume)
            await asyncio.wait({closer}, timeout=timeout)
            if not closer.done():
                log(logger, logging.INFO, "bedrock stream: closing the input timed out", stream_id=self.stream_id,
                    timeout_s=timeout)
            if not self._pump.done():
                self._drain_queue()
                await asyncio.wait({self._pump}, timeout=timeout)
            if not self._pump.done():
                # never cancel a pump blocked in the SDK's receive(); closing the client releases it
                log(logger, logging.INFO, "bedrock stream: output did not end after close", stream_id=self.stream_id,
                    timeout_s=timeout)
        except Exception as exc:  # noqa: BLE001
            log(logger, logging.INFO, "bedrock stream: close failed", stream_id=self.stream_id, error=repr(exc))
        finally:
            self._drain_queue()
            _adopt_crt_writers()
            self._t._forget(self)

    # -- helpers ----------------------------------------------------------------------------------
    def _drain_queue(self) -> None:
        while True:
            try:
                self._queue.get_nowait()
            except asyncio.QueueEmpty:
                return

    @property
    def failed(self) -> ModelError | None:
        return self._error


def _now() -> int:
    """Milliseconds since the epoch: an input event's :date."""
    return time.time_ns() // 1_000_000


class EventWriter:
    """Writes input events onto the SDK's request body exactly as the SDK's `AWSEventPublisher.send` would.

    The SDK (0.12) spends about 0.14 ms of CPU per event before the bytes reach the CRT: a shape serializer,
    a fresh copy of the signing properties, four HMACs to derive the day's SigV4 key, header encoding
    through generic codecs. This writes the same frame (the chunk message inside a signed `:date` /
    `:chunk-signature` envelope, gateway.eventstream) with the key kept per day, and carries the SDK
    signer's chain forward so that the SDK's own `close()` signs the end frame that follows. It reads three
    private attributes of the pinned SDK (the publisher's writer and signing config, the signer's prior
    signature); tests check its frames against the SDK's byte for byte, and the emulator verifies every
    signature.
    """

    def __init__(self, publisher: Any) -> None:
        self._publisher = publisher
        self._signing = publisher._signing_config
        self._signer: es.ChunkSigner | None = None
        self._room = getattr(publisher._writer, "_can_write", None)  # the body buffer's own test

    def ready(self) -> bool:
        """A send now completes without waiting: the signing chain is set up and the SDK's body buffer
        (16 frames) has room. False when unsure (another SDK shape)."""
        return (self._room is not None and (self._signer is not None or self._signing is None)
                and self._room())

    async def send(self, event: dict) -> None:
        publisher = self._publisher
        if publisher.closed:
            raise OSError("Attempted to write to closed stream.")
        if self._signing is None:  # an unsigned stream (not Bedrock's): the SDK sends the bare message
            frame = es.chunk_message(event)
        else:
            chain = await self._chain()
            chain.prior = self._signing.signer._prior_signature.decode()
            frame = es.encode_input_frame(event, signer=chain, date=_now())
            self._signing.signer._prior_signature = chain.prior.encode()
        try:
            await publisher._writer.write(frame)
        except Exception as exc:
            await publisher.close()
            raise OSError("Failed to write to stream.") from exc

    async def _chain(self) -> es.ChunkSigner:
        if self._signer is None:
            cfg = self._signing
            identity = await cfg.identity_resolver.get_identity(properties=cfg.identity_properties)
            props = cfg.signing_properties
            self._signer = es.ChunkSigner(identity.secret_access_key, props["region"], "", props["service"])
        return self._signer


class EventReader:
    """Reads output events (dicts) off the SDK's response body, as `AWSEventReceiver.receive` followed by
    `orjson.loads(chunk.value.bytes_)` would; ends at the end of the stream.

    The SDK (0.12) spends about 0.2 ms of CPU per audio event before our code sees it: event-stream parsing
    in pure Python (reads that re-join the body's bytes), ijson over the `{"bytes": base64}` payload, model
    objects. This splits the body into messages itself (gateway.eventstream.FrameReader: both CRCs, the
    format's limits) and decodes `chunk` events with orjson (`es.chunk_event`). Every other message (modeled
    exceptions, unmodeled errors, other members, a payload the fast path declines) goes to a receiver of the
    SDK's own over that one message, and framing errors become the SDK's exceptions, so what the stream
    reports stays the SDK's. It reads private attributes of the pinned SDK (the receiver's payload codec,
    deserializer and byte source, and the response body under that source) and leaves a receiver of another
    shape to decode alone; tests check it against the SDK's receiver event for event and error for error.
    """

    def __init__(self, receiver: Any, stream_id: str = "") -> None:
        self._receiver = receiver
        self._stream_id = stream_id
        self._body = _response_body(receiver)
        self._frames = es.FrameReader()

    def __aiter__(self) -> EventReader:
        return self

    async def __anext__(self) -> Any:
        while True:
            if self._body is None:
                ev = await self._receiver.receive()
            else:
                frame = await self._next_frame()
                if frame is None:
                    raise StopAsyncIteration
                event = es.chunk_event(frame)
                if event is not None:
                    return event
                ev = await self._sdk_decode(frame)
            if ev is None:
                raise StopAsyncIteration
            from aws_sdk_bedrock_runtime.models import InvokeModelWithBidirectionalStreamOutputChunk

            if not isinstance(ev, InvokeModelWithBidirectionalStreamOutputChunk):
                log(logger, logging.WARNING, "bedrock stream: unknown output member ignored",
                    stream_id=self._stream_id, member=type(ev).__name__)
                continue
            try:
                return orjson.loads(ev.value.bytes_)
            except (orjson.JSONDecodeError, TypeError, AttributeError) as exc:
                raise ModelError(MODEL_STREAM_ERROR, f"Invalid event bytes: undecodable output event: {exc}")

    async def _next_frame(self) -> bytes | None:
        """The next whole message off the body; None at its end. Fails as the SDK's receiver does."""
        frames = self._frames
        while True:
            try:
                frame = frames.next()
                if frame is not None:
                    return frame
            except es.EventStreamError as exc:
                await self._receiver.close()
                raise _sdk_event_error(exc) from exc
            try:
                chunk = await anext(self._body, b"")
            except Exception as exc:
                await self._receiver.close()
                raise OSError("Failed to read from stream.") from exc
            if not chunk:
                try:
                    frames.end()
                except es.EventStreamError as exc:
                    await self._receiver.close()
                    raise _sdk_event_error(exc) from exc
                return None
            frames.feed(chunk)

    async def _sdk_decode(self, frame: bytes) -> Any:
        """One message decoded by the SDK's own receiver code (rare: not a chunk event)."""
        from smithy_aws_event_stream.aio import AWSEventReceiver
        from smithy_core.aio.types import AsyncBytesReader

        r = self._receiver
        one = AWSEventReceiver(payload_codec=r._payload_codec, source=AsyncBytesReader(frame),
                               deserializer=r._deserializer)
        try:
            return await one.receive()
        except Exception:
            if one.closed:  # it failed to decode the bytes: the SDK's receiver would close there too
                await r.close()
            raise


def _response_body(receiver: Any) -> Any:
    """The HTTP response body's chunk iterator under an `AWSEventReceiver` (its `AsyncBytesReader`'s source:
    the CRT response's `chunks()`), or None when the receiver is not of the pinned SDK's shape."""
    source = getattr(receiver, "_source", None)
    body = getattr(source, "_data", None)
    if (getattr(source, "_remainder", None) != b"" or not hasattr(body, "__anext__")
            or not hasattr(receiver, "_payload_codec") or not hasattr(receiver, "_deserializer")):
        return None
    return body


def _sdk_event_error(exc: es.EventStreamError) -> Exception:
    """The exception `Event.decode_async` raises for the same bytes (map_sdk_error gives the same ModelError)."""
    from smithy_aws_event_stream import exceptions as sdk

    if isinstance(exc, es.ChecksumError):
        return sdk.ChecksumMismatch(exc.expected, exc.calculated)
    if isinstance(exc, es.LengthError):
        return sdk.InvalidHeadersLength(exc.length) if exc.what == "headers" else sdk.InvalidPayloadLength(exc.length)
    return sdk.InvalidEventBytes()


def _consume(fut: asyncio.Future) -> None:
    if not fut.cancelled():
        fut.exception()


# The CRT completes an HTTP/2 stream as soon as the server ends its response, so the CRT's internal request-body
# writer task (awscrt.aio.http.AIOHttp2ClientStream._set_request_body_generator) then fails with
# AWS_ERROR_HTTP_STREAM_HAS_COMPLETED when the SDK closes the input (or at loop shutdown), and asyncio logs
# "Task exception was never retrieved" for every such stream. Adopt those tasks: retrieve that expected error
# quietly and log anything else.
_CRT_WRITER = "AIOHttp2ClientStream._set_request_body_generator"
_adopted: weakref.WeakSet[asyncio.Task] = weakref.WeakSet()


def _crt_writer_done(task: asyncio.Task) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if exc is None:
        return
    if "HTTP_STREAM_HAS_COMPLETED" in str(exc) or "HTTP_STREAM_HAS_COMPLETED" in str(getattr(exc, "name", "")):
        log(logger, logging.DEBUG, "CRT request writer ended after the response", error=str(exc))
    else:
        log(logger, logging.WARNING, "CRT request writer failed", error=repr(exc))


def _adopt_crt_writers() -> None:
    try:
        tasks = asyncio.all_tasks()
    except RuntimeError:
        return
    for task in tasks:
        if task in _adopted:
            continue
        coro = task.get_coro()
        if getattr(coro, "__qualname__", "") == _CRT_WRITER:
            _adopted.add(task)
            task.add_done_callback(_crt_writer_done)


# ---------------------------------------------------------------------------------------------
# Start-up check


def _mask(key: str) -> str:
    return key if len(key) <= 8 else f"{key[:4]}…{key[-4:]}"


def default_identity() -> Any:
    """Frozen credentials from botocore's default chain, as an SDK identity (blocking: may refresh)."""
    import botocore.session
    from smithy_aws_core.identity import AWSCredentialsIdentity

    try:
        creds = botocore.session.get_session().get_credentials()
        frozen = creds.get_frozen_credentials() if creds is not None else None
    except Exception as exc:  # botocore raises many kinds here (SSO expired, IMDS down, ...)
        raise BedrockSetupError(f"resolving AWS credentials failed: {_message(exc)}") from exc
    if frozen is None or not frozen.access_key:
        profile = os.environ.get("AWS_PROFILE")
        raise BedrockSetupError(
            "no AWS credentials found" + (f" (AWS_PROFILE={profile})" if profile else "")
            + ": set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN), AWS_PROFILE, "
            "~/.aws/credentials, or run with a role (EKS IRSA / Pod Identity, ECS task role, EC2 instance profile)"
        )
    expiry = getattr(creds, "_expiry_time", None)
    return AWSCredentialsIdentity(access_key_id=frozen.access_key, secret_access_key=frozen.secret_key,
                                  session_token=frozen.token, expiration=expiry)


def _fixed_identity(identity: Any):
    """An operation plugin: sign this stream with exactly this identity."""
    from smithy_aws_core.identity import StaticCredentialsResolver

    def plugin(config: Any) -> None:
        config.aws_credentials_identity_resolver = StaticCredentialsResolver(identity)

    return plugin


async def check_credentials(region: str | None = None, *, timeout_s: float = 10.0) -> CredentialCheck:
    """Resolve the region and the default credential chain once, so the gateway can fail fast at start.

    Raises BedrockSetupError with a message that says what to set."""
    try:
        from aws_sdk_bedrock_runtime.config import AsyncBedrockRuntimeConfig
    except ImportError as exc:  # pragma: no cover
        raise BedrockSetupError(f"aws-sdk-bedrock-runtime[awscrt]==0.12.0 is required: {exc}") from exc
    overrides: dict[str, Any] = {"transport": None}
    if region:
        overrides["region"] = region
    no_region = BedrockSetupError(
        "no AWS region: set AWS_REGION (or AWS_DEFAULT_REGION, a profile region, or the gateway's Bedrock "
        "region setting); Nova 2 Sonic is in us-east-1, us-west-2 and ap-northeast-1"
    )
    try:
        config = await AsyncBedrockRuntimeConfig.resolve(**overrides)
    except Exception as exc:
        if not region and "region" in str(exc).lower():
            raise no_region from exc
        raise BedrockSetupError(f"invalid AWS configuration: {_message(exc)}") from exc
    if not config.region:
        raise no_region
    try:
        identity = await asyncio.wait_for(asyncio.to_thread(default_identity), timeout_s)
    except TimeoutError as exc:
        raise BedrockSetupError(f"resolving AWS credentials timed out after {timeout_s:g}s") from exc
    return CredentialCheck(
        region=config.region,
        access_key_id=_mask(identity.access_key_id),
        temporary=bool(getattr(identity, "session_token", None)),
        expiration=getattr(identity, "expiration", None),
    )
