"""The Nova Sonic wire emulator (gateway/emulate/nova.py) driven by the real SDK 0.12.0 on loopback, and
BedrockTransport (gateway/bedrock.py) on top of it.

TLS: a throwaway CA (trustme) and SSL_CERT_FILE = system CAs + that CA, set before any CRT transport is
constructed (a wrong trust setup only fails after 10-20 s, in the TLS negotiation)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import time
import uuid
from pathlib import Path

import pytest

from gateway.bedrock import BedrockSetupError, BedrockTransport, check_credentials
from protocol.models import model_spec
from gateway.emulate.nova import NovaEmulator, make_test_tls
from gateway.transport import (
    ACCESS_DENIED,
    CONNECTION,
    IDLE_TIMEOUT_MESSAGE,
    INTERNAL_SERVER,
    MODEL_STREAM_ERROR,
    MODEL_TIMEOUT,
    SERVICE_UNAVAILABLE,
    THROTTLING,
    VALIDATION,
    ModelError,
)
from protocol import nova_events as nova
from protocol.event_order import INPUT_GAP_MESSAGE
from protocol.models import (
    CONSERVATIVE_HISTORY,
    NOVA_2_5_SONIC,
    NOVA_2_HISTORY,
    NOVA_2_SONIC,
    NOVA_SONIC_V1,
    HistoryLimits,
)

AKID, SECRET, REGION = "AKIDNOVAGATETEST", "novagate-test-secret", "us-east-1"
PCM = b"\x01\x00" * 512  # 32 ms at 16 kHz


# ---------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    """(cert, key, bundle); SSL_CERT_FILE and static env credentials for the SDK's default chain.

    Set before any CRT transport of this module is built. The CRT reads SSL_CERT_FILE whenever an
    AWSCRTHTTPClient is constructed (verified), so module scope suffices, and the environment is restored
    afterwards so the dummy keys do not leak into other modules' gateway subprocesses."""
    _, cert, key, bundle = make_test_tls(tmp_path_factory.mktemp("tls"))
    saved = {k: os.environ.get(k) for k in ("SSL_CERT_FILE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                            "AWS_SESSION_TOKEN", "AWS_PROFILE")}
    os.environ["SSL_CERT_FILE"] = bundle
    os.environ["AWS_ACCESS_KEY_ID"] = AKID
    os.environ["AWS_SECRET_ACCESS_KEY"] = SECRET
    os.environ.pop("AWS_SESSION_TOKEN", None)
    os.environ.pop("AWS_PROFILE", None)
    yield cert, key, bundle
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


class FakeStream:
    """Echoes a canned reply once the audio block ends; ends its output on sessionEnd."""

    def __init__(self, owner: FakeTransport) -> None:
        self.owner = owner
        self.q: asyncio.Queue = asyncio.Queue()
        self.received: list[dict] = []
        self.ids = {"sessionId": str(uuid.uuid4()), "promptName": "", "completionId": str(uuid.uuid4())}
        self.audio_block: str | None = None
        self.closed = False

    async def send(self, event: dict) -> None:
        self.received.append(event)
        name, body = nova.event_name(event), nova.event_body(event)
        if name == "promptStart":
            self.ids["promptName"] = body["promptName"]
        elif name == "contentStart" and body.get("type") == "AUDIO":
            self.audio_block = body["contentName"]
        elif name == "contentEnd" and body.get("contentName") == self.audio_block:
            await self._reply()
        elif name == "sessionEnd" and self.owner.end_on_session_end:
            await self.q.put(None)

    async def _reply(self) -> None:
        ids = self.ids
        await self.q.put(nova.completion_start(ids))
        await self.q.put(nova.output_content_start(ids, "u1", type="TEXT", role="USER", stage="FINAL"))
        await self.q.put(nova.output_text(ids, "u1", "USER", "hello there"))
        await self.q.put(nova.output_content_end(ids, "u1", type="TEXT", stop_reason="PARTIAL_TURN"))
        await self.q.put(nova.output_content_start(ids, "a1", type="AUDIO", role="ASSISTANT"))
        for _ in range(self.owner.audio_chunks):
            await self.q.put(nova.output_audio(ids, "a1", self.owner.audio_pcm))
        await self.q.put(nova.output_content_end(ids, "a1", type="AUDIO", stop_reason="END_TURN"))
        if self.owner.fail_after_reply is not None:
            await self.q.put(self.owner.fail_after_reply)

    async def receive(self) -> dict | None:
        item = await self.q.get()
        if isinstance(item, ModelError):
            raise item
        return item

    async def close(self) -> None:
        self.closed = True
        await self.q.put(None)


class FakeTransport:
    name = "fake"

    def __init__(self) -> None:
        self.streams: list[FakeStream] = []
        self.audio_pcm = b"\x02\x00" * 1920  # 80 ms at 24 kHz
        self.audio_chunks = 3
        self.fail_after_reply: ModelError | None = None
        self.end_on_session_end = True  # else the output ends when the emulator closes the stream

    async def open(self) -> FakeStream:
        s = FakeStream(self)
        self.streams.append(s)
        return s

    async def aclose(self) -> None:
        pass


@pytest.fixture
async def make_emu(tls):
    cert, key, _ = tls
    emus: list[NovaEmulator] = []

    async def make(transport=None, **kw) -> NovaEmulator:
        emu = NovaEmulator(transport or FakeTransport(), certfile=cert, keyfile=key, **kw)
        await emu.start()
        emus.append(emu)
        return emu

    yield make
    for emu in emus:
        await emu.stop()


@pytest.fixture
async def make_bedrock():
    made: list[BedrockTransport] = []

    def make(emu: NovaEmulator | None = None, **kw) -> BedrockTransport:
        kw.setdefault("region", REGION)
        kw.setdefault("send_timeout_s", 5.0)
        kw.setdefault("output_timeout_s", 10.0)
        kw.setdefault("close_timeout_s", 1.0)
        if emu is not None:
            kw.setdefault("endpoint_url", emu.endpoint)
        t = BedrockTransport(**kw)
        made.append(t)
        return t

    yield make
    for t in made:
        await t.aclose()


def setup_events(prompt: str, *, history: bool = False) -> list[dict]:
    evs = [nova.session_start(), nova.prompt_start(prompt), *nova.text_block(prompt, "SYSTEM", ["You are terse."])]
    if history:
        evs += nova.text_block(prompt, "USER", ["earlier question"])
    return evs


def full_session(prompt: str, audio: str, frames: int = 5) -> list[dict]:
    return [*setup_events(prompt), nova.audio_content_start(prompt, audio),
            *(nova.audio_input(prompt, audio, PCM) for _ in range(frames)),
            nova.content_end(prompt, audio), nova.prompt_end(prompt), nova.session_end()]


async def until(cond, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def drain(stream, timeout: float = 5.0) -> tuple[list[dict], ModelError | None]:
    out: list[dict] = []
    while True:
        try:
            ev = await asyncio.wait_for(stream.receive(), timeout)
        except ModelError as e:
            return out, e
        if ev is None:
            return out, None
        out.append(ev)


async def sdk_client(endpoint: str, resolver=None):
    """A raw SDK 0.12.0 client as the reference builds it (§7.2)."""
    from aws_sdk_bedrock_runtime.client import AsyncBedrockRuntimeClient
    from aws_sdk_bedrock_runtime.config import AsyncBedrockRuntimeConfig
    from smithy_http.aio.crt import AWSCRTHTTPClient, AWSCRTHTTPClientConfig

    kw = {"aws_credentials_identity_resolver": resolver} if resolver is not None else {}
    config = await AsyncBedrockRuntimeConfig.resolve(
        region=REGION, endpoint_uri=endpoint,
        transport=AWSCRTHTTPClient(client_config=AWSCRTHTTPClientConfig(force_http_2=True)), **kw)
    return AsyncBedrockRuntimeClient(config=config)


async def sdk_open(client, model_id: str = "amazon.nova-2-sonic-v1:0"):
    from aws_sdk_bedrock_runtime.models import InvokeModelWithBidirectionalStreamOperationInput

    return await client.invoke_model_with_bidirectional_stream(
        InvokeModelWithBidirectionalStreamOperationInput(model_id=model_id))


async def sdk_finish(client, stream=None) -> None:
    """Close a raw SDK stream's input (bounded) and the client; quiet the CRT writer task (see gateway.bedrock)."""
    from gateway.bedrock import _adopt_crt_writers

    if stream is not None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(stream.input_stream.close(), 2)
    _adopt_crt_writers()
    await client.close()
    await asyncio.sleep(0)


async def sdk_send(stream, event: dict) -> None:
    import orjson
    from aws_sdk_bedrock_runtime.models import BidirectionalInputPayloadPart, InvokeModelWithBidirectionalStreamInputChunk

    await asyncio.wait_for(stream.input_stream.send(InvokeModelWithBidirectionalStreamInputChunk(
        value=BidirectionalInputPayloadPart(bytes_=orjson.dumps(event)))), 5)


# ---------------------------------------------------------------------------------------------
# the real SDK against the emulator


async def test_sdk_round_trip_through_the_emulator(make_emu):
    from aws_sdk_bedrock_runtime.models import InvokeModelWithBidirectionalStreamOutputChunk

    import orjson

    fake = FakeTransport()
    fake.end_on_session_end = False  # the output ends after the client's END_STREAM (input_end_grace_s)
    emu = await make_emu(fake, credentials=(AKID, SECRET), input_end_grace_s=0.1)
    client = await sdk_client(emu.endpoint)
    stream = None
    try:
        stream = await sdk_open(client)
        events = full_session("p1", "a1")
        for ev in events:
            await sdk_send(stream, ev)
        # the signed empty end frame + END_STREAM (NB: once the server has ended its response, the CRT drops them)
        await asyncio.wait_for(stream.input_stream.close(), 5)
        _, receiver = await asyncio.wait_for(stream.await_output(), 5)
        got = []
        while (ev := await asyncio.wait_for(receiver.receive(), 5)) is not None:
            assert isinstance(ev, InvokeModelWithBidirectionalStreamOutputChunk)
            got.append(orjson.loads(ev.value.bytes_))
    finally:
        await sdk_finish(client, stream)
    names = [nova.event_name(e) for e in got]
    assert names[:2] == ["completionStart", "contentStart"] and names.count("audioOutput") == 3
    assert got[2]["event"]["textOutput"]["content"] == "hello there"
    assert fake.streams[0].received == events  # every input event reached the backing transport intact
    assert emu.streams_opened == 1 and emu.events_received == len(events)
    assert emu.stream_events == [[nova.event_name(e) for e in events]]
    rec = emu.streams[0]
    await until(lambda: rec.input_closed)
    assert rec.signatures_verified == len(events) + 1  # every chunk plus the signed end frame
    assert rec.input_closed and rec.error is None


async def test_bedrock_transport_round_trip_and_flow_control(make_emu, make_bedrock):
    """Big output (> the 64 KiB stream window) and many input frames (> the window) both flow."""
    fake = FakeTransport()
    fake.audio_pcm = b"\x03\x00" * 24000  # 1 s at 24 kHz per chunk (64 KiB of base64)
    fake.audio_chunks = 6
    emu = await make_emu(fake)
    bt = make_bedrock(emu)
    assert bt.capabilities.text_input and bt.capabilities.endpointing_sensitivity
    stream = await bt.open()
    events = full_session("p", "a", frames=400)  # ~560 KiB of input
    t0 = time.monotonic()
    for ev in events:
        await stream.send(ev)
    out, err = await drain(stream)
    await stream.close()
    assert err is None
    audio = b"".join(base64.b64decode(e["event"]["audioOutput"]["content"]) for e in out if "audioOutput" in e["event"])
    assert len(audio) == 6 * 48000
    assert len(fake.streams[0].received) == len(events)
    assert time.monotonic() - t0 < 10
    assert bt.open_streams == 0


async def test_more_streams_than_one_connection_carries(make_emu, make_bedrock):
    """The emulator's connections carry two streams each (SETTINGS_MAX_CONCURRENT_STREAMS), as Bedrock's
    carry a hundred. The SDK holds a stream past that unsent, so the transport opens a connection for
    every two streams, and five streams open at once all complete a session."""
    fake = FakeTransport()
    emu = await make_emu(fake, max_concurrent_streams=2)
    bt = make_bedrock(emu, streams_per_connection=2)
    streams = [await bt.open() for _ in range(5)]
    assert bt.connections == 3

    async def talk(i: int, stream) -> tuple[list[dict], ModelError | None]:
        for ev in full_session(f"p{i}", f"a{i}"):
            await stream.send(ev)
        return await drain(stream, timeout=20.0)

    results = await asyncio.gather(*(talk(i, s) for i, s in enumerate(streams)))
    for out, err in results:
        assert err is None and any("audioOutput" in e["event"] for e in out)
    # at least one connection per client; the CRT may open one more of its own (before it has the server's
    # SETTINGS it does not know a connection's limit), so not exactly three
    assert emu.streams_opened == 5 and emu.connections_accepted >= 3
    for s in streams:
        await s.close()
    assert bt.open_streams == 0 and bt.connections == 1  # the idle extra connections are closed
    again = await bt.open()  # and the first one still carries new streams
    assert bt.connections == 1
    await again.close()


@pytest.mark.parametrize(
    ("kind", "sdk_name", "message"),
    [
        (VALIDATION, "ValidationException", "System instability detected. Please retry your request."),
        (MODEL_TIMEOUT, "ModelTimeoutException", "Model has timed out in processing the request."),
        (THROTTLING, "ThrottlingException", "Too many requests"),
        (MODEL_STREAM_ERROR, "ModelStreamErrorException", "model stream failed"),
        (INTERNAL_SERVER, "InternalServerException", "internal boom"),
        (SERVICE_UNAVAILABLE, "ServiceUnavailableException", "try later"),
    ],
)
async def test_modeled_error_frames(make_emu, make_bedrock, kind, sdk_name, message):
    from aws_sdk_bedrock_runtime import models

    emu = await make_emu()
    # 1. the raw SDK raises the modeled exception from receive()
    emu.inject(kind, message, after_events=3)
    client = await sdk_client(emu.endpoint)
    stream = None
    try:
        stream = await sdk_open(client)
        for ev in setup_events("p"):
            await sdk_send(stream, ev)
        _, receiver = await asyncio.wait_for(stream.await_output(), 5)
        with pytest.raises(getattr(models, sdk_name)) as info:
            await asyncio.wait_for(receiver.receive(), 5)
        assert info.value.message == message
        assert await asyncio.wait_for(receiver.receive(), 5) is None
    finally:
        await sdk_finish(client, stream)
    # 2. BedrockTransport turns it into the matching ModelError kind, keeping the message
    emu.inject(kind, message, after_events=3)
    stream = await make_bedrock(emu).open()
    for ev in setup_events("p"):
        await stream.send(ev)
    _, err = await drain(stream)
    assert err is not None and (err.kind, err.message) == (kind, message)
    with pytest.raises(ModelError):
        await stream.send(nova.session_end())
    await stream.close()
    assert [r.error_kind for r in emu.streams] == [kind, kind]


async def test_backing_transport_errors_become_frames(make_emu, make_bedrock):
    fake = FakeTransport()
    emu = await make_emu(fake)
    bt = make_bedrock(emu)
    for raised, want_kind in [(ModelError(THROTTLING, "engine busy"), THROTTLING),
                              (ModelError(VALIDATION, IDLE_TIMEOUT_MESSAGE), VALIDATION),
                              (ModelError(CONNECTION, "engine crashed"), CONNECTION),
                              (ModelError(ACCESS_DENIED, "not allowed"), ACCESS_DENIED)]:
        fake.fail_after_reply = raised
        stream = await bt.open()
        for ev in full_session("p", "a")[:-2]:
            await stream.send(ev)
        out, err = await drain(stream)
        await stream.close()
        assert sum("audioOutput" in e["event"] for e in out) == 3  # the reply came first
        assert err is not None and err.kind == want_kind and raised.message in err.message
    assert ModelError(VALIDATION, IDLE_TIMEOUT_MESSAGE).recoverable


async def test_inject_after_seconds_and_unmodeled_errors(make_emu, make_bedrock):
    emu = await make_emu()
    bt = make_bedrock(emu)
    emu.inject(SERVICE_UNAVAILABLE, "come back later", after_s=0.3)
    stream = await bt.open()
    t0 = time.monotonic()
    for ev in setup_events("p"):
        await stream.send(ev)
    _, err = await drain(stream)
    assert (err.kind, err.message) == (SERVICE_UNAVAILABLE, "come back later") and 0.2 < time.monotonic() - t0 < 10
    await stream.close()
    emu.inject("error", "weird failure", code="InternalFailure", after_events=1)  # unmodeled → UnmodeledEventError
    stream = await bt.open()
    sent_err = None
    for ev in setup_events("p"):
        try:
            await stream.send(ev)
        except ModelError as e:  # the failure can reach the sender before the setup is all sent
            sent_err = e
            break
    _, err = await drain(stream)
    err = err or sent_err  # one of the two delivered it (once)
    assert err.kind == CONNECTION and err.message == "InternalFailure: weird failure" and err.recoverable
    await stream.close()
    assert emu.streams_opened == 2 and [len(e) for e in emu.stream_events][1] >= 1


async def test_http_403_access_denied(make_emu, make_bedrock):
    from aws_sdk_bedrock_runtime.models import AccessDeniedException

    emu = await make_emu(reject_403=True)
    client = await sdk_client(emu.endpoint)
    stream = None
    try:
        stream = await sdk_open(client)
        with pytest.raises(AccessDeniedException, match="have access"):
            await asyncio.wait_for(stream.await_output(), 5)
    finally:
        await sdk_finish(client, stream)
    stream = await make_bedrock(emu).open()  # open() does not wait for the HTTP response
    t0 = time.monotonic()
    _, err = await drain(stream)
    assert err.kind == ACCESS_DENIED and "access to the model" in err.message and not err.recoverable
    assert time.monotonic() - t0 < 10
    with pytest.raises(ModelError) as info:  # later sends fail fast with the same error
        await stream.send(nova.session_start())
    assert info.value is err
    await stream.close()
    assert emu.streams_opened == 0 and emu.http_errors == [(403, "AccessDeniedException")] * 2


async def test_unknown_model_ids(make_emu, make_bedrock):
    emu = await make_emu()
    s1 = await make_bedrock(emu, model_id="amazon.nova-9-sonic-v1:0").open()
    _, err = await drain(s1)
    assert err.kind == VALIDATION and "ResourceNotFoundException" in err.message
    s2 = await make_bedrock(emu, model_id="not a model").open()
    _, err = await drain(s2)
    assert err.kind == VALIDATION and "model identifier is invalid" in err.message
    assert not model_spec("amazon.nova-sonic-v1:0").text_input
    assert emu.http_errors == [(404, "ResourceNotFoundException"), (400, "ValidationException")]


async def test_idle_timeout_531_and_silence_keeps_alive(make_emu, make_bedrock):
    emu = await make_emu(idle_timeout_s=0.6)
    bt = make_bedrock(emu)
    # audio every 0.2 s keeps the stream alive past the idle timeout
    alive = await bt.open()
    for ev in [*setup_events("p"), nova.audio_content_start("p", "a")]:
        await alive.send(ev)
    for _ in range(6):
        await alive.send(nova.audio_input("p", "a", PCM))
        await asyncio.sleep(0.2)
    assert emu.streams[0].error is None
    # no audio: ValidationException 531 → recoverable VALIDATION
    idle = await bt.open()
    for ev in setup_events("q"):
        await idle.send(ev)
    t0 = time.monotonic()
    _, err = await drain(idle)
    assert err.kind == VALIDATION and err.message == IDLE_TIMEOUT_MESSAGE and err.recoverable
    assert 0.3 < time.monotonic() - t0 < 10
    await idle.close()
    await alive.close()


async def test_every_catalog_model_and_cross_region_prefixes(make_emu, make_bedrock):
    """The catalog's ids (Nova 2.5 Sonic has no -v1:0) are served, and by default also behind a cross-region
    prefix (unverified against the service); each stream enforces its model's history limits."""
    emu = await make_emu()
    cases = [(NOVA_2_5_SONIC, NOVA_2_HISTORY), (NOVA_2_SONIC, NOVA_2_HISTORY), (NOVA_SONIC_V1, CONSERVATIVE_HISTORY),
             ("us.amazon.nova-2-5-sonic", NOVA_2_HISTORY), ("global.amazon.nova-2-sonic-v1:0", NOVA_2_HISTORY)]
    for model_id, _ in cases:
        stream = await make_bedrock(emu, model_id=model_id).open()
        for ev in full_session("p", "a"):
            await stream.send(ev)
        out, err = await drain(stream)
        await stream.close()
        assert err is None and out, model_id
    assert [(r.model_id, r.history) for r in emu.streams] == cases
    # without prefixes, or an id outside the catalog: 404 as Bedrock's
    strict = await make_emu(region_prefixes=False)
    for model_id in ("us.amazon.nova-2-5-sonic", "amazon.nova-2-5-sonic-v1:0"):
        _, err = await drain(await make_bedrock(strict, model_id=model_id).open())
        assert err.kind == VALIDATION and "ResourceNotFoundException" in err.message
    assert strict.http_errors == [(404, "ResourceNotFoundException")] * 2


async def test_history_limits_per_model_and_a_conservative_stand_in(make_emu, make_bedrock):
    """Nova 2: 50 KB per textInput and message, 200 KB in total; the legacy model 1 KB / 40 KB; a stand-in
    told `history_limits=CONSERVATIVE_HISTORY` (`--history-limits conservative`) enforces 40 KB / 1 KB for
    every model, and `history_overrides` (`--history-*-max-bytes`) set single limits."""
    def history(*pieces: str) -> list[dict]:
        return [*setup_events("p"), nova.text_content_start("p", "h1", "USER"),
                *(nova.text_input("p", "h1", x) for x in pieces), nova.content_end("p", "h1"),
                nova.audio_content_start("p", "a"), nova.audio_input("p", "a", PCM)]

    async def outcome(emu, model_id: str, events: list[dict]) -> str | None:
        stream = await make_bedrock(emu, model_id=model_id).open()
        sent_err = None
        for ev in events:
            try:
                await stream.send(ev)
            except ModelError as e:
                sent_err = e
                break
        if sent_err is None:
            try:
                for ev in [nova.content_end("p", "a"), nova.prompt_end("p"), nova.session_end()]:
                    await stream.send(ev)
            except ModelError as e:  # the refusal may arrive while these are sent
                sent_err = e
        _, err = await drain(stream)
        await stream.close()
        err = err or sent_err
        assert err is None or err.kind == VALIDATION
        return err.message if err else None

    two_kb = "x" * 2048
    emu = await make_emu()
    assert await outcome(emu, NOVA_2_5_SONIC, history(two_kb, "y" * 48 * 1024)) is None
    assert await outcome(emu, NOVA_2_SONIC, history("x" * (50 * 1024 + 1))) == (
        "Invalid input request: chat history textInput of 51201 bytes exceeds 51200 bytes (content 'h1'; split a "
        "message into several textInput events)")
    legacy = ("Invalid input request: chat history textInput of 2048 bytes exceeds 1024 bytes (content 'h1'; split a "
              "message into several textInput events)")
    assert await outcome(emu, NOVA_SONIC_V1, history(two_kb)) == legacy
    conservative = await make_emu(history_limits=CONSERVATIVE_HISTORY)
    assert await outcome(conservative, NOVA_2_5_SONIC, history(two_kb)) == legacy
    assert await outcome(conservative, NOVA_2_5_SONIC, history(*["z" * 1024] * 41)) == (
        "Invalid input request: chat history exceeds 40960 bytes in total (41984 bytes with content 'h1')")
    assert await outcome(conservative, NOVA_2_5_SONIC, history(*["z" * 1024] * 40)) is None
    small = await make_emu(history_overrides={"total_bytes": 4096})
    assert await outcome(small, NOVA_2_SONIC, history(two_kb, two_kb, "!")) == (
        "Invalid input request: chat history exceeds 4096 bytes in total (4097 bytes with content 'h1')")
    assert small.streams[0].history == HistoryLimits(4096, 50 * 1024, 50 * 1024)


def test_history_flags():
    import argparse

    from gateway.emulate.nova import add_arguments, history_options

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert history_options(parser.parse_args([])) == (None, {})  # each model's own
    assert history_options(parser.parse_args(["--history-limits", "conservative"])) == (CONSERVATIVE_HISTORY, {})
    args = parser.parse_args(["--history-limits", "nova-2", "--history-max-bytes", "40960",
                              "--history-input-max-bytes", "1024", "--input-gap-s", "3"])
    assert history_options(args) == (NOVA_2_HISTORY, {"total_bytes": 40960, "input_bytes": 1024})
    assert args.input_gap_s == 3.0 and not args.no_region_prefixes
    with pytest.raises(SystemExit):
        history_options(parser.parse_args(["--history-message-max-bytes", "0"]))


async def test_input_gap_532(make_emu, make_bedrock):
    """No audioInput and no interactive content for `input_gap_s`: validationException 532. Typed text keeps a
    stream alive without audio (until the 531, which counts audio only)."""
    emu = await make_emu(input_gap_s=1.0, idle_timeout_s=60.0)
    bt = make_bedrock(emu)
    # typed text every 0.2 s, no audio: alive for more than twice the gap
    typed = await bt.open()
    for ev in setup_events("t"):
        await typed.send(ev)
    for i in range(12):
        for ev in nova.text_block("t", "USER", [f"typed {i}"], interactive=True):
            await typed.send(ev)
        await asyncio.sleep(0.2)
    assert emu.streams[0].error is None
    await typed.close()
    # the setup only (a system prompt, history, an AUDIO block opened and no audio): 532
    silent = await bt.open()
    for ev in [*setup_events("q", history=True), nova.audio_content_start("q", "a")]:
        await silent.send(ev)
    t0 = time.monotonic()
    _, err = await drain(silent)
    assert (err.kind, err.message) == (VALIDATION, INPUT_GAP_MESSAGE) and err.recoverable
    assert time.monotonic() - t0 > 0.5  # not before the gap (how much later depends on the machine's load)
    await silent.close()
    assert emu.streams[1].error == (VALIDATION, INPUT_GAP_MESSAGE)
    # the 531 still comes after idle_timeout_s without audio, whatever else arrives
    emu = await make_emu(input_gap_s=0.6, idle_timeout_s=1.5)
    stream = await make_bedrock(emu).open()
    for ev in setup_events("p"):
        await stream.send(ev)

    async def typing():
        with contextlib.suppress(ModelError):
            for i in range(100):
                for ev in nova.text_block("p", "USER", [f"typed {i}"], interactive=True):
                    await stream.send(ev)
                await asyncio.sleep(0.2)

    typist = asyncio.create_task(typing())
    _, err = await drain(stream)
    typist.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await typist
    await stream.close()
    assert (err.kind, err.message) == (VALIDATION, IDLE_TIMEOUT_MESSAGE)
    with pytest.raises(ValueError, match="input_gap_s"):
        await make_emu(input_gap_s=-1)


async def test_model_timeout_at_max_stream_age(make_emu, make_bedrock):
    emu = await make_emu(max_stream_s=0.8)
    stream = await make_bedrock(emu).open()
    for ev in [*setup_events("p"), nova.audio_content_start("p", "a")]:
        await stream.send(ev)

    async def feed():
        with pytest.raises(ModelError):
            while True:
                await stream.send(nova.audio_input("p", "a", PCM))
                await asyncio.sleep(0.05)

    feeder = asyncio.create_task(feed())
    _, err = await drain(stream)
    await asyncio.wait_for(feeder, 5)
    assert err.kind == MODEL_TIMEOUT and "timed out" in err.message and err.recoverable
    await stream.close()


async def test_event_order_violations_are_validation_errors(make_emu, make_bedrock):
    emu = await make_emu()
    bt = make_bedrock(emu)
    cases = [
        [nova.prompt_start("p")],  # promptStart before sessionStart
        [*setup_events("p"), nova.audio_content_start("p", "a"), *nova.text_block("p", "USER", ["late history"])],
        [*setup_events("p"), nova.audio_input("p", "nope", PCM)],
    ]
    for events in cases:
        stream = await bt.open()
        for ev in events:
            await stream.send(ev)
        _, err = await drain(stream)
        assert err.kind == VALIDATION and err.message.startswith("Invalid input request")
        await stream.close()
    assert [r.error_kind for r in emu.streams] == [VALIDATION] * 3
    assert emu.stream_events[0] == ["promptStart"]
    assert emu.stream_events[2][-1] == "audioInput"


async def test_chunk_signatures_verified(make_emu, make_bedrock, monkeypatch):
    from aws_sdk_bedrock_runtime.models import ValidationException
    from smithy_aws_core.identity import AWSCredentialsIdentity

    emu = await make_emu(credentials=(AKID, SECRET))
    # good keys (default chain from the environment): every frame verifies
    stream = await make_bedrock(emu).open()
    for ev in full_session("p", "a"):
        await stream.send(ev)
    out, err = await drain(stream)
    await stream.close()
    assert err is None and out and emu.streams[0].signatures_verified >= len(full_session("p", "a"))

    # the request is signed with the right secret, later chunks with another: a validationException frame
    class SwitchingResolver:
        def __init__(self) -> None:
            self.calls = 0

        async def get_identity(self, *, properties):
            self.calls += 1
            secret = SECRET if self.calls <= 3 else "a-different-secret"
            return AWSCredentialsIdentity(access_key_id=AKID, secret_access_key=secret)

        async def invalidate(self) -> None:
            pass

    client = await sdk_client(emu.endpoint, SwitchingResolver())
    raw = None
    try:
        raw = await sdk_open(client)
        for ev in setup_events("p"):
            await sdk_send(raw, ev)
        _, receiver = await asyncio.wait_for(raw.await_output(), 5)
        with pytest.raises(ValidationException, match="signature"):
            await asyncio.wait_for(receiver.receive(), 5)
    finally:
        await sdk_finish(client, raw)

    # a wrong secret from the start: the request signature fails → 403 → ACCESS_DENIED
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    stream = await make_bedrock(emu).open()
    _, err = await drain(stream)
    assert err.kind == ACCESS_DENIED and "signature" in err.message.lower()
    assert emu.http_errors == [(403, "InvalidSignatureException")]


async def test_resets_and_corrupt_bytes(make_emu, make_bedrock):
    emu = await make_emu()
    bt = make_bedrock(emu)
    # RST_STREAM after 4 input events: the SDK ends the output without an exception
    emu.reset_after_events = 4
    s1 = await bt.open()
    for ev in setup_events("p"):
        await s1.send(ev)
    out, err = await drain(s1)
    assert (out, err) == ([], None) and emu.streams[0].reset == "stream"
    t0 = time.monotonic()
    await s1.close()
    assert time.monotonic() - t0 < 10  # bounded even if the SDK's close hangs after a reset
    # a TCP reset of the whole connection; the next stream reconnects on its own
    emu.reset_after_events = 2
    emu.reset_connection = True
    s2 = await bt.open()
    for ev in setup_events("p")[:2]:
        await s2.send(ev)
    out, err = await drain(s2)
    assert out == [] and (err is None or err.kind == CONNECTION)
    await s2.close()
    assert emu.streams[1].reset == "connection"
    # corrupt bytes after 2 output events → "Invalid event bytes" (MODEL_STREAM_ERROR, recoverable)
    emu.invalid_bytes_after = 2
    s3 = await bt.open()
    for ev in full_session("p", "a")[:-2]:
        await s3.send(ev)
    out, err = await drain(s3)
    assert len(out) == 2 and err.kind == MODEL_STREAM_ERROR and "Invalid event bytes" in err.message
    assert err.recoverable
    await s3.close()
    # and a clean stream afterwards
    s4 = await bt.open()
    for ev in full_session("p", "a"):
        await s4.send(ev)
    out, err = await drain(s4)
    assert err is None and len(out) > 5
    await s4.close()
    assert emu.connections_accepted == 2


async def test_endpoint_from_environment(make_emu, make_bedrock, monkeypatch):
    emu = await make_emu()
    monkeypatch.setenv("AWS_ENDPOINT_URL_BEDROCK_RUNTIME", emu.endpoint)
    bt = make_bedrock(None)
    stream = await bt.open()
    assert bt.endpoint == emu.endpoint
    for ev in full_session("p", "a"):
        await stream.send(ev)
    out, err = await drain(stream)
    await stream.close()
    assert err is None and out and emu.streams_opened == 1


async def test_check_credentials(tls, monkeypatch, tmp_path: Path):
    ok = await check_credentials(REGION)
    assert ok.region == REGION and ok.access_key_id.startswith("AKID") and SECRET not in repr(ok)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none-credentials"))
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    with pytest.raises(BedrockSetupError, match="no AWS region"):
        await check_credentials(None)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(BedrockSetupError, match="no AWS credentials"):
        await check_credentials(REGION)


# ---------------------------------------------------------------------------------------------
# end to end: BedrockTransport → emulator → the real LocalEngine (sphinx + espeak)

PHRASE = "hello there"
GRAMMAR = ("i met with doctor smith today at two pm", "what did we discuss", "tell me a story", PHRASE)


async def test_end_to_end_with_the_local_engine(make_emu, make_bedrock):
    from gateway.local.engine import LocalEngine, LocalEngineConfig
    from gateway.local.speech import synthesize

    engine = LocalEngine(LocalEngineConfig(asr="sphinx", tts="espeak", grammar=GRAMMAR, endpoint_ms=600))
    await engine.warm()
    try:
        emu = await make_emu(engine)
        stream = await make_bedrock(emu).open()
        speech = bytes(6400) + synthesize(PHRASE, 16000, backend="espeak") + bytes(32000)  # + 1 s silence
        for ev in [*setup_events("p"), nova.audio_content_start("p", "a")]:
            await stream.send(ev)
        for i in range(0, len(speech), 1024):
            await stream.send(nova.audio_input("p", "a", speech[i:i + 1024]))
        user_text, audio, rate, done = "", bytearray(), None, False
        roles: dict[str, str] = {}
        deadline = time.monotonic() + 30
        while not done and time.monotonic() < deadline:
            ev = await asyncio.wait_for(stream.receive(), 30)
            assert ev is not None
            name, body = nova.event_name(ev), nova.event_body(ev)
            if name == "contentStart":
                roles[body["contentId"]] = body["role"]
                if body["type"] == "AUDIO":
                    rate = body["audioOutputConfiguration"]["sampleRateHertz"]
            elif name == "textOutput" and roles.get(body["contentId"]) == "USER":
                user_text += body["content"]
            elif name == "audioOutput":
                audio += base64.b64decode(body["content"])
            elif name == "contentEnd" and body.get("type") == "AUDIO" and body["stopReason"] == "END_TURN":
                done = True
        for ev in [nova.content_end("p", "a"), nova.prompt_end("p"), nova.session_end()]:
            await stream.send(ev)
        await stream.close()
    finally:
        await engine.aclose()
    assert user_text.strip().lower() == PHRASE
    assert rate == 24000 and len(audio) >= 48000  # ≥ 1 s of 24 kHz PCM16
    assert emu.streams[0].error is None


async def test_voice_activity_events_follow_the_model_of_the_request(make_emu, make_bedrock):
    """The scripted engine behind the emulator: a Nova 2.5 Sonic stream hears userSpeechStart → completionStart
    → userSpeechEnd before the USER transcript; a legacy stream none of them."""
    from gateway.local.engine import ScriptedEngine, scripted_config

    from .test_scripted_engine import utterance

    engine = ScriptedEngine(scripted_config(lookahead_s=60.0))
    try:
        emu = await make_emu(engine)
        heard = {}
        for model_id in (NOVA_2_5_SONIC, NOVA_SONIC_V1):
            stream = await make_bedrock(emu, model_id=model_id).open()
            for ev in [*setup_events("p"), nova.audio_content_start("p", "a")]:
                await stream.send(ev)
            pcm = utterance()
            for i in range(0, len(pcm), 2048):
                await stream.send(nova.audio_input("p", "a", pcm[i:i + 2048]))
            names: list[str] = []
            while "usageEvent" not in names:
                ev = await asyncio.wait_for(stream.receive(), 10)
                assert ev is not None
                names.append(nova.event_name(ev))
            for ev in [nova.content_end("p", "a"), nova.prompt_end("p"), nova.session_end()]:
                await stream.send(ev)
            await stream.close()
            heard[model_id] = names
    finally:
        await engine.aclose()
    assert heard[NOVA_2_5_SONIC][:4] == ["userSpeechStart", "completionStart", "userSpeechEnd", "contentStart"]
    assert heard[NOVA_SONIC_V1][:2] == ["completionStart", "contentStart"]
    assert not {"userSpeechStart", "userSpeechEnd"} & set(heard[NOVA_SONIC_V1])
