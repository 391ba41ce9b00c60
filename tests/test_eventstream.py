"""The AWS event-stream codec and the chunk-signature chain (gateway/eventstream.py).

Cross-checked against the real SDK's own codec (smithy_aws_event_stream) and signers (aws_sdk_signers)."""

from __future__ import annotations

import datetime as dt
import io
import struct
import uuid
import zlib

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
