"""The AWS event-stream codec and the chunk-signature chain (gateway/eventstream.py).

Cross-checked against the real SDK's own codec (smithy_aws_event_stream) and signers (aws_sdk_signers)."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import io
import struct
import uuid
import zlib

import orjson
import pytest

from gateway import eventstream as es

EVENT = {"event": {"audioInput": {"promptName": "p", "contentName": "a", "content": "AAAA"}}}
ALL_TYPES = {
    "t": True,
    "f": False,
    "i8": es.Int8(-7),
    "i16": es.Int16(-30000),
    "i32": 2_000_000_000,
    "i64": es.Int64(-(2**62)),
    "blob": b"\x00\x01\xff",
    "str": "héllo",
    "ts": es.Timestamp(1_764_000_000_123),
    "uuid": uuid.UUID("12345678-1234-5678-1234-567812345678"),
}


def test_round_trip_all_header_types():
    data = es.encode_message(ALL_TYPES, b"payload")
    msg = es.decode_message(data)
    assert msg.payload == b"payload"
    assert [msg.types[k] for k in ALL_TYPES] == list(range(10))
    assert msg.headers["i8"] == -7 and msg.headers["i16"] == -30000 and msg.headers["i64"] == -(2**62)
    assert msg.headers["blob"] == b"\x00\x01\xff" and msg.headers["str"] == "héllo"
    assert msg.headers["ts"] == dt.datetime(2025, 11, 24, 16, 0, 0, 123000, tzinfo=dt.UTC)
    assert msg.headers["uuid"] == ALL_TYPES["uuid"]
    assert msg.encode() == data  # types survive a re-encode byte for byte
    # explicit (type, value) pairs encode the same
    assert es.encode_header("x", (es.INT16, 5)) == es.encode_header("x", es.Int16(5))


def test_matches_the_sdk_codec():
    from smithy_aws_event_stream.events import Byte, Event, EventMessage, Long, Short

    sdk_headers = {
        "t": True, "f": False, "i8": Byte(-7), "i16": Short(-30000), "i32": 2_000_000_000, "i64": Long(-(2**62)),
        "blob": b"\x00\x01\xff", "str": "héllo", "ts": dt.datetime(2025, 11, 24, 16, 0, 0, 123000, tzinfo=dt.UTC),
        "uuid": ALL_TYPES["uuid"],
    }
    ours = es.encode_message(ALL_TYPES, b"payload")
    theirs = EventMessage(headers=sdk_headers, payload=b"payload").encode()
    assert ours == theirs
    decoded = Event.decode(io.BytesIO(es.output_chunk(EVENT)))
    assert decoded.message.headers == es.CHUNK_HEADERS
    exc = Event.decode(io.BytesIO(es.exception_message("throttlingException", "slow down")))
    assert exc.message.headers[":exception-type"] == "throttlingException"
    err = Event.decode(io.BytesIO(es.error_message("InternalFailure", "boom")))
    assert err.message.headers == {":message-type": "error", ":error-code": "InternalFailure", ":error-message": "boom"}


def test_crc_errors_are_detected():
    data = bytearray(es.output_chunk(EVENT))
    bad_prelude = bytearray(data)
    bad_prelude[5] ^= 0x01
    with pytest.raises(es.ChecksumError) as e1:
        es.decode_message(bytes(bad_prelude))
    assert e1.value.what == "prelude"
    bad_body = bytearray(data)
    bad_body[20] ^= 0x01
    with pytest.raises(es.ChecksumError) as e2:
        es.decode_message(bytes(bad_body))
    assert e2.value.what == "message"
    bad_crc = bytearray(data)
    bad_crc[-1] ^= 0x01
    with pytest.raises(es.ChecksumError):
        es.decode_message(bytes(bad_crc))
    # the incremental decoder fails too, and stays failed
    dec = es.MessageDecoder()
    with pytest.raises(es.ChecksumError):
        dec.feed(bytes(bad_body))
    with pytest.raises(es.ChecksumError):
        dec.feed(es.output_chunk(EVENT))


def test_malformed_frames():
    with pytest.raises(es.FrameError):
        es.decode_message(b"\x00" * 10)
    # valid CRCs around an unknown header type
    hb = b"\x01x\x0e"
    prelude = struct.pack("!II", 16 + len(hb), len(hb))
    body = prelude + struct.pack("!I", zlib.crc32(prelude)) + hb
    with pytest.raises(es.FrameError, match="unknown header type"):
        es.decode_message(body + struct.pack("!I", zlib.crc32(body)))
    with pytest.raises(es.FrameError, match="trailing"):
        es.iter_messages(es.output_chunk(EVENT) + b"\x00\x00")


def test_incremental_decoder_byte_by_byte():
    stream = b"".join([es.output_chunk(EVENT), es.exception_message("validationException", "bad"),
                       es.error_message("X", "y"), es.encode_message({}, b"")])
    dec = es.MessageDecoder()
    msgs = []
    for i in range(len(stream)):
        msgs += dec.feed(stream[i:i + 1])
    assert dec.buffered == 0 and len(msgs) == 4
    items = [es.decode_output_message(m) for m in msgs[:3]]
    assert items[0].kind == "event" and items[0].event == EVENT
    assert (items[1].kind, items[1].name, items[1].message) == ("exception", "validationException", "bad")
    assert (items[2].kind, items[2].name, items[2].message) == ("error", "X", "y")


def test_input_frames_round_trip():
    signer = es.ChunkSigner("secret", "us-east-1", "ab" * 32)
    when = dt.datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=dt.UTC)
    frames = es.iter_messages(es.encode_input_frame(EVENT, signer=signer, date=when)
                              + es.encode_input_frame(None, signer=signer, date=when))
    first, end = (es.decode_input_frame(m) for m in frames)
    assert first.event == EVENT and not first.is_end and first.date == when and len(first.signature) == 32
    assert first.inner.headers == es.CHUNK_HEADERS
    assert end.is_end and end.event is None
    verifier = es.ChunkVerifier("secret", "us-east-1", "ab" * 32)
    verifier.verify(frames[0])
    verifier.verify(frames[1])
    assert verifier.count == 2
    with pytest.raises(es.FrameError):
        es.decode_input_frame(es.decode_message(es.encode_message(
            {":date": es.Timestamp(0), ":chunk-signature": bytes(32)}, es.exception_message("x", "y"))))


async def _sdk_chain(secret: str, region: str, initial: str, n: int):
    """Frames signed by the real SDK signer (aws_sdk_signers.AsyncEventSigner), as AWSEventPublisher does."""
    from aws_sdk_signers import AsyncEventSigner, AWSCredentialIdentity
    from smithy_aws_event_stream.events import EventHeaderEncoder, EventMessage

    signer = AsyncEventSigner(initial_signature=initial.encode(), event_encoder_cls=EventHeaderEncoder)
    identity = AWSCredentialIdentity(access_key_id="AKID", secret_access_key=secret)
    props = {"region": region, "service": "bedrock"}
    out = []
    for i in range(n):
        inner = EventMessage(headers=dict(es.CHUNK_HEADERS), payload=es.encode_event_json({"event": {"n": i}}))
        signed = await signer.sign(event=inner, identity=identity, properties=props)
        out.append(signed.encode())
    end = await signer.sign_empty(event=EventMessage(), identity=identity, properties=props)
    out.append(end.encode())
    return out


async def test_chunk_signatures_match_the_sdk_signer():
    initial = "7" * 64
    frames = await _sdk_chain("wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "us-west-2", initial, 5)
    msgs = [es.decode_message(f) for f in frames]
    verifier = es.ChunkVerifier("wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "us-west-2", initial)
    for m in msgs:
        verifier.verify(m)
    assert verifier.count == 6
    assert [es.decode_input_frame(m).event for m in msgs[:5]] == [{"event": {"n": i}} for i in range(5)]
    assert es.decode_input_frame(msgs[5]).is_end
    # our signer reproduces the SDK's signatures exactly
    signer = es.ChunkSigner("wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "us-west-2", initial)
    for m in msgs:
        assert signer.sign(m.raw_headers[":date"], m.payload, m.headers[":date"]) == m.headers[":chunk-signature"]
    # a wrong secret, a broken chain or a tampered payload is rejected
    with pytest.raises(es.SignatureError):
        es.ChunkVerifier("wrong", "us-west-2", initial).verify(msgs[0])
    with pytest.raises(es.SignatureError):
        es.ChunkVerifier("wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "us-west-2", initial).verify(msgs[1])
    tampered = es.decode_message(es.encode_message(
        {":date": msgs[0].headers[":date"], ":chunk-signature": msgs[0].headers[":chunk-signature"]},
        es.chunk_message({"event": {"n": 99}})))
    with pytest.raises(es.SignatureError):
        es.ChunkVerifier("wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "us-west-2", initial).verify(tampered)


async def test_request_signature_matches_the_sdk_signer():
    from aws_sdk_signers import URI, AsyncSigV4Signer, AWSCredentialIdentity, AWSRequest, Field, Fields

    req = AWSRequest(
        destination=URI(host="localhost", port=8443, path="/model/amazon.nova-2-sonic-v1%3A0/invoke-with-bidirectional-stream"),
        method="POST", body=None,
        fields=Fields([Field(name="content-type", values=["application/vnd.amazon.eventstream"]),
                       Field(name="X-Amz-Content-SHA256", values=[es.EVENT_STREAM_PAYLOAD_HASH])]),
    )
    identity = AWSCredentialIdentity(access_key_id="AKIDEXAMPLE", secret_access_key="s3cret")
    signed = await AsyncSigV4Signer().sign(request=req, identity=identity,
                                           properties={"region": "us-east-1", "service": "bedrock"})
    headers = [(f.name.lower(), f.as_string()) for f in signed.fields]
    auth = es.parse_authorization(dict(headers)["authorization"])
    assert (auth.access_key_id, auth.region, auth.service) == ("AKIDEXAMPLE", "us-east-1", "bedrock")
    wire = [(k, v) for k, v in headers if k != "authorization"] + [("host", "localhost:8443")]
    es.verify_request_signature("s3cret", auth, "POST", req.destination.path, "", wire)
    with pytest.raises(es.SignatureError):
        es.verify_request_signature("other", auth, "POST", req.destination.path, "", wire)


async def test_event_writer_writes_the_sdk_publishers_frames(monkeypatch):
    """gateway.bedrock.EventWriter (the transport's send path) writes byte for byte what the SDK's own
    AWSEventPublisher writes for the same events at the same instant, and the SDK's close() continues its
    signature chain with a valid end frame."""
    import types

    import orjson
    from aws_sdk_bedrock_runtime.models import BidirectionalInputPayloadPart, InvokeModelWithBidirectionalStreamInputChunk
    from aws_sdk_signers import AsyncEventSigner, AWSCredentialIdentity
    from aws_sdk_signers import signers as sdk_signers
    from smithy_aws_event_stream.aio import AWSEventPublisher, SigningConfig
    from smithy_aws_event_stream.events import EventHeaderEncoder
    from smithy_json import JSONCodec

    from gateway import bedrock

    when = dt.datetime(2026, 11, 29, 21, 0, 7, 250000, tzinfo=dt.UTC)

    class Frozen(dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return when

    monkeypatch.setattr(sdk_signers, "datetime", types.SimpleNamespace(**{**vars(dt), "datetime": Frozen}))
    monkeypatch.setattr(bedrock, "_now", lambda: when)
    identity = AWSCredentialIdentity(access_key_id="AKID", secret_access_key="wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")

    class Resolver:
        async def get_identity(self, *, properties):
            return identity

    class Body:
        def __init__(self) -> None:
            self.frames: list[bytes] = []

        async def write(self, data: bytes) -> None:
            self.frames.append(data)

    def publisher() -> tuple[AWSEventPublisher, Body]:
        body = Body()
        signer = AsyncEventSigner(initial_signature=b"3" * 64, event_encoder_cls=EventHeaderEncoder)
        cfg = SigningConfig(signer=signer, signing_properties={"region": "eu-north-1", "service": "bedrock"},
                            identity_resolver=Resolver(), identity_properties={})
        return AWSEventPublisher(payload_codec=JSONCodec(), async_writer=body, signing_config=cfg), body

    events = [EVENT, {"event": {"textInput": {"promptName": "p", "contentName": "t", "content": "héllo \"quoted\""}}},
              {"event": {"sessionEnd": {}}}]
    sdk, sdk_body = publisher()
    for ev in events:
        await sdk.send(InvokeModelWithBidirectionalStreamInputChunk(value=BidirectionalInputPayloadPart(bytes_=orjson.dumps(ev))))
    await sdk.close()
    ours, our_body = publisher()
    writer = bedrock.EventWriter(ours)
    for ev in events:
        await writer.send(ev)
    await ours.close()  # the SDK's own end frame, after our frames
    assert len(our_body.frames) == len(sdk_body.frames) == 4
    assert our_body.frames == sdk_body.frames
    verifier = es.ChunkVerifier(identity.secret_access_key, "eu-north-1", "3" * 64)
    for frame in our_body.frames:
        verifier.verify(es.decode_message(frame))
    with pytest.raises(OSError, match="closed"):
        await writer.send(EVENT)


# ---------------------------------------------------------------------------------------------
# The output side: FrameReader, chunk_event and gateway.bedrock.EventReader against the SDK's receiver


def _sdk_messages() -> list[bytes]:
    """Output-side messages as the SDK's own encoder and serializer write them."""
    from aws_sdk_bedrock_runtime.models import BidirectionalInputPayloadPart, InvokeModelWithBidirectionalStreamInputChunk
    from smithy_aws_event_stream._private.serializers import EventSerializer
    from smithy_aws_event_stream.events import Byte, EventMessage, Long, Short
    from smithy_json import JSONCodec

    serializer = EventSerializer(payload_codec=JSONCodec())
    part = BidirectionalInputPayloadPart(bytes_=b'{"event": {"textOutput": {"content": "h\\u00e9"}}}')
    InvokeModelWithBidirectionalStreamInputChunk(value=part).serialize(serializer)
    all_types = {"t": True, "f": False, "i8": Byte(-7), "i16": Short(-30000), "i32": 2_000_000_000,
                 "i64": Long(-(2**62)), "blob": b"\x00\x01\xff", "str": "héllo", "uuid": ALL_TYPES["uuid"],
                 "ts": dt.datetime(2025, 11, 24, 16, 0, 0, 123000, tzinfo=dt.UTC)}
    return [
        serializer.get_result().encode(),
        EventMessage(headers=dict(es.CHUNK_HEADERS), payload=es.encode_event_json(EVENT)).encode(),
        EventMessage(headers={":exception-type": "throttlingException", ":content-type": "application/json",
                              ":message-type": "exception"}, payload=b'{"message": "slow down"}').encode(),
        EventMessage(headers={":message-type": "error", ":error-code": "InternalFailure",
                              ":error-message": "boom"}).encode(),
        EventMessage(headers=all_types, payload=b"payload").encode(),
        EventMessage().encode(),
    ]


def _drain(reader: es.FrameReader) -> list[bytes]:
    out = []
    while (frame := reader.next()) is not None:
        out.append(frame)
    return out


def test_frame_reader_splits_the_sdks_messages_at_every_byte_boundary():
    from smithy_aws_event_stream.events import Event

    msgs = _sdk_messages()
    stream = b"".join(msgs)
    for cut in range(len(stream) + 1):
        reader = es.FrameReader()
        reader.feed(stream[:cut])
        frames = _drain(reader)
        reader.feed(stream[cut:])
        frames += _drain(reader)
        reader.end()
        assert frames == msgs and reader.buffered == 0, cut
    reader = es.FrameReader()
    frames = []
    for i in range(len(stream)):
        reader.feed(stream[i:i + 1])
        frames += _drain(reader)
    assert frames == msgs
    for frame in frames:  # and each decodes as the SDK decodes it
        sdk = Event.decode(io.BytesIO(frame)).message
        ours = es.decode_message(frame)
        assert (ours.headers, ours.payload) == (dict(sdk.headers), sdk.payload)


def _prelude(total: int, hlen: int) -> bytes:
    prelude = struct.pack("!II", total, hlen)
    return prelude + struct.pack("!I", zlib.crc32(prelude))


def test_frame_reader_errors_are_clear_and_final():
    good = es.output_chunk(EVENT)
    bad_prelude = bytearray(good)
    bad_prelude[2] ^= 0x01
    reader = es.FrameReader()
    reader.feed(bytes(bad_prelude[:12]))  # known wrong as soon as the prelude is there
    with pytest.raises(es.ChecksumError, match="prelude checksum mismatch") as e:
        reader.next()
    assert e.value.what == "prelude"
    with pytest.raises(es.ChecksumError):  # and stays failed
        reader.next()
    bad_body = bytearray(good)
    bad_body[-20] ^= 0x01
    reader = es.FrameReader()
    reader.feed(good + bytes(bad_body) + good)
    assert reader.next() == good  # the good message before it is still delivered
    with pytest.raises(es.ChecksumError, match="message checksum mismatch") as e:
        reader.next()
    assert e.value.expected == struct.unpack("!I", good[-4:])[0]
    assert e.value.calculated == zlib.crc32(bytes(bad_body[:-4]))
    with pytest.raises(es.ChecksumError):
        reader.end()
    for prelude, cls, text in [
        (_prelude(16 + es.MAX_HEADERS_LEN + 1, es.MAX_HEADERS_LEN + 1), es.LengthError, "headers length 131073 exceeds"),
        (_prelude(16 + es.MAX_PAYLOAD_LEN + 1, 0), es.LengthError, "payload length 16777217 exceeds"),
        (_prelude(0xFFFFFFFF, 0), es.LengthError, "payload length"),
        (_prelude(8, 0), es.FrameError, "invalid lengths"),
        (_prelude(20, 10), es.FrameError, "invalid lengths"),
    ]:
        reader = es.FrameReader()
        reader.feed(prelude)  # refused before any of the body is buffered
        with pytest.raises(cls, match=text):
            reader.next()
    for cut in (1, 11, 12, len(good) - 1):
        reader = es.FrameReader()
        reader.feed(good + good[:cut])
        assert _drain(reader) == [good]
        with pytest.raises(es.TruncatedError, match=f"ended {cut} bytes into a message"):
            reader.end()


def test_chunk_event_takes_chunks_in_any_header_order_and_declines_the_rest():
    from smithy_aws_event_stream.events import EventMessage

    assert es.chunk_event(es.output_chunk(EVENT)) == EVENT
    reordered = EventMessage(headers={":content-type": "application/json", ":event-type": "chunk", "x-id": 7,
                                      ":message-type": "event"}, payload=es.encode_event_json(EVENT)).encode()
    assert es.chunk_event(reordered) == EVENT
    b64 = base64.b64encode(orjson.dumps(EVENT)).decode()
    wrapped = "\n".join(b64[i:i + 76] for i in range(0, len(b64), 76))  # base64 read leniently, as the SDK reads it
    assert es.chunk_event(es.encode_message(es.CHUNK_HEADERS, orjson.dumps({"bytes": wrapped}))) == EVENT
    declined = [
        es.exception_message("validationException", "bad"),
        es.error_message("InternalFailure", "boom"),
        es.encode_message({**es.CHUNK_HEADERS, ":event-type": "other"}, es.encode_event_json(EVENT)),
        es.encode_message({**es.CHUNK_HEADERS, ":message-type": b"event"}, es.encode_event_json(EVENT)),  # not a string
        es.encode_message(es.CHUNK_HEADERS, b'{"bytes": "W10="}'),  # [] is not an event
        es.encode_message(es.CHUNK_HEADERS, b'{"other": 1}'),
        es.encode_message(es.CHUNK_HEADERS, b'{"bytes": 5}'),
        es.encode_message(es.CHUNK_HEADERS, b'{"bytes": "!!"}'),
        es.encode_message(es.CHUNK_HEADERS, b"not json"),
        es.encode_message(es.CHUNK_HEADERS, b""),
    ]
    assert [es.chunk_event(f) for f in declined] == [None] * len(declined)


async def _receiver(chunks: list[bytes], fail: Exception | None = None):
    """A receiver exactly as the SDK's protocol builds it over a response body of these chunks."""
    from aws_sdk_bedrock_runtime.config import AsyncBedrockRuntimeConfig
    from aws_sdk_bedrock_runtime.models import (
        InvokeModelWithBidirectionalStreamOutput,
        _InvokeModelWithBidirectionalStreamOutputDeserializer,
    )

    async def body():
        for c in chunks:
            yield c
        if fail is not None:
            raise fail

    class Response:
        pass

    response = Response()
    response.body = body()
    config = await AsyncBedrockRuntimeConfig.resolve(region="us-east-1", transport=None)
    return config.protocol.create_event_receiver(
        operation=None, request=None, response=response, event_type=InvokeModelWithBidirectionalStreamOutput,
        event_deserializer=_InvokeModelWithBidirectionalStreamOutputDeserializer().deserialize, context=None)


async def _sdk_pump(receiver) -> tuple[list, tuple[str, str] | None]:
    """What BedrockStream's pump reported before EventReader: the SDK's receive() and orjson."""
    from aws_sdk_bedrock_runtime.models import InvokeModelWithBidirectionalStreamOutputChunk

    from gateway.bedrock import map_sdk_error
    from gateway.transport import MODEL_STREAM_ERROR, ModelError

    out = []
    try:
        while (ev := await receiver.receive()) is not None:
            if not isinstance(ev, InvokeModelWithBidirectionalStreamOutputChunk):
                continue
            try:
                out.append(orjson.loads(ev.value.bytes_))
            except (orjson.JSONDecodeError, TypeError, AttributeError) as exc:
                raise ModelError(MODEL_STREAM_ERROR, f"Invalid event bytes: undecodable output event: {exc}")
    except Exception as exc:
        err = map_sdk_error(exc)
        return out, (err.kind, err.message)
    return out, None


async def _our_pump(receiver) -> tuple[list, tuple[str, str] | None]:
    from gateway.bedrock import EventReader, map_sdk_error

    out = []
    try:
        async for event in EventReader(receiver):
            out.append(event)
    except Exception as exc:
        err = map_sdk_error(exc)
        return out, (err.kind, err.message)
    return out, None


def _valid(headers_block: bytes, payload: bytes = b"") -> bytes:
    """A message with valid CRCs around any header block."""
    body = _prelude(16 + len(headers_block) + len(payload), len(headers_block)) + headers_block + payload
    return body + struct.pack("!I", zlib.crc32(body))


def _corrupt(frame: bytes, at: int) -> bytes:
    bad = bytearray(frame)
    bad[at] ^= 0x01
    return bytes(bad)


async def test_event_reader_reports_what_the_sdk_receiver_reports():
    from gateway.transport import ACCESS_DENIED, CONNECTION

    good = [es.output_chunk({"event": {"textOutput": {"content": f"n{i}"}}}) for i in range(3)]
    audio = es.output_chunk({"event": {"audioOutput": {"content": "A" * 5000}}})
    chunk = es.output_chunk(EVENT)
    cases: dict[str, tuple[list[bytes], Exception | None]] = {
        "clean": ([*good, audio], None),
        "the SDK's encoding": (_sdk_messages()[:2] + [_sdk_messages()[4]], None),  # chunks, then no :message-type
        "empty": ([], None),
        **{m: ([*good, es.exception_message(m, f"{m} says no")], None) for m in es.EXCEPTION_MEMBERS},
        "exception without message": ([es.encode_message({":exception-type": "throttlingException",
                                                          ":message-type": "exception"}, b"{}")], None),
        "unknown exception": ([good[0], es.exception_message("noSuchException", "x")], None),
        "error": ([good[0], es.error_message("InternalFailure", "boom")], None),
        "access denied error": ([es.error_message("AccessDeniedException", "not you")], None),
        "unknown member": ([es.encode_message({**es.CHUNK_HEADERS, ":event-type": "other"}, b"{}"), *good], None),
        "unknown message type": ([good[0], es.encode_message({":message-type": "nope"})], None),
        "not an object": ([es.encode_message(es.CHUNK_HEADERS, b'{"bytes": "W10="}'), *good], None),
        "no bytes": ([es.encode_message(es.CHUNK_HEADERS, b'{"x": 1}')], None),
        "undecodable event": ([es.encode_message(es.CHUNK_HEADERS, b'{"bytes": "bm9wZQ=="}')], None),
        "payload not json": ([es.encode_message(es.CHUNK_HEADERS, b"not json")], None),
        "message crc": ([*good, _corrupt(chunk, -1), chunk], None),
        "payload flipped": ([*good, _corrupt(chunk, -30), chunk], None),
        "prelude crc": ([good[0], _corrupt(chunk, 1)], None),
        "headers too long": ([good[0], _prelude(16 + es.MAX_HEADERS_LEN + 1, es.MAX_HEADERS_LEN + 1) + bytes(64)], None),
        "payload too long": ([good[0], _prelude(16 + es.MAX_PAYLOAD_LEN + 1, 0) + bytes(64)], None),
        "total under 16": ([good[0], _prelude(8, 0) + bytes(30)], None),
        "truncated prelude": ([good[0], chunk[:7]], None),
        "truncated body": ([good[0], chunk[:-1]], None),
        "duplicate header": ([_valid(es.encode_header("a", "x") + es.encode_header("a", "y"))], None),
        "unknown header type": ([good[0], _valid(b"\x01x\x0e")], None),
        "broken connection": (good[:2], RuntimeError("AWS_ERROR_HTTP_CONNECTION_CLOSED")),
        "broken mid-message": ([good[0], chunk[:20]], RuntimeError("AWS_ERROR_HTTP_CONNECTION_CLOSED")),
    }
    seen = set()
    for name, (frames, fail) in cases.items():
        body = b"".join(frames)
        for chunks in (frames, [body[i:i + 7] for i in range(0, len(body), 7)], [body] if body else []):
            sdk = await _sdk_pump(await _receiver(chunks, fail))
            ours = await _our_pump(await _receiver(chunks, fail))
            assert ours == sdk, name
        seen.add(sdk[1][0] if sdk[1] else None)
    assert {None, CONNECTION, ACCESS_DENIED} <= seen and len(seen) >= 8  # the cases reach every kind of ending


async def test_event_reader_decodes_alone_when_the_sdk_changes_shape():
    """A receiver without the pinned SDK's attributes: EventReader leaves the decoding to it."""
    from aws_sdk_bedrock_runtime.models import (
        BidirectionalOutputPayloadPart,
        InvokeModelWithBidirectionalStreamOutputChunk,
        InvokeModelWithBidirectionalStreamOutputUnknown,
    )

    from gateway.bedrock import EventReader

    class Receiver:
        def __init__(self) -> None:
            chunk = InvokeModelWithBidirectionalStreamOutputChunk
            self.left = [chunk(BidirectionalOutputPayloadPart(bytes_=b'{"n": 2}')),
                         InvokeModelWithBidirectionalStreamOutputUnknown("other"),  # logged and skipped
                         chunk(BidirectionalOutputPayloadPart(bytes_=b'{"n": 1}'))]

        async def receive(self):
            return self.left.pop() if self.left else None

    assert [e async for e in EventReader(Receiver())] == [{"n": 1}, {"n": 2}]


async def test_a_send_the_sdk_buffer_cannot_take_times_out_and_fails_the_stream():
    """While the SDK's body buffer (16 frames) has room a send is written directly; once nothing drains it
    (a dead connection) the next send is bounded by send_timeout_s and fails the stream."""
    import types

    from smithy_aws_event_stream.aio import AWSEventPublisher
    from smithy_core.aio.types import AsyncBytesProvider
    from smithy_json import JSONCodec

    from gateway import bedrock
    from gateway.transport import ModelError

    body = AsyncBytesProvider()  # nobody reads it
    sdk = types.SimpleNamespace(input_stream=AWSEventPublisher(payload_codec=JSONCodec(), async_writer=body),
                                await_output=lambda: asyncio.get_running_loop().create_future())  # no response yet
    transport = types.SimpleNamespace(queue_size=8, output_timeout_s=30.0, send_timeout_s=0.3, close_timeout_s=0.1,
                                      _forget=lambda s: None)
    stream = bedrock.BedrockStream(transport, sdk, "s1", pooled=None)
    assert stream._writer.ready()
    for _ in range(16):
        await asyncio.wait_for(stream.send(EVENT), 0.1)  # written directly, at once
    assert not stream._writer.ready() and len(body._data) == 16
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(ModelError, match="send timed out"):
        await stream.send(EVENT)
    assert 0.25 < loop.time() - t0 < 5
    with pytest.raises(ModelError, match="send timed out"):  # the stream stays failed
        await stream.send(EVENT)
    assert es.iter_messages(b"".join(body._data))[0].payload == es.encode_event_json(EVENT)
    stream._pump.cancel()
