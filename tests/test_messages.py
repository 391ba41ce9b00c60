"""Client protocol v1 messages: decoding and validation of client frames, encoding of server frames."""

from __future__ import annotations

import orjson
import pytest

from protocol import codes
from protocol.messages import (
    CLIENT_INPUT_RATES,
    CLIENT_OUTPUT_RATES,
    MAX_PENDING,
    MAX_TEXT_CHARS,
    Error,
    InputText,
    Interrupted,
    ItemSaved,
    Ping,
    PlaybackTruncate,
    Pong,
    ProtocolError,
    ResponseAudioEnd,
    ResponseAudioStart,
    SessionEnd,
    SessionEnded,
    SessionReady,
    SessionReconnect,
    SessionStart,
    Status,
    Transcript,
    Usage,
    decode_client_message,
    decode_server_message,
    encode,
)


def dec(obj: object) -> object:
    return decode_client_message(orjson.dumps(obj))


def err(obj_or_raw: object) -> ProtocolError:
    raw = obj_or_raw if isinstance(obj_or_raw, (str, bytes)) else orjson.dumps(obj_or_raw)
    with pytest.raises(ProtocolError) as info:
        decode_client_message(raw)
    return info.value


# ---------------------------------------------------------------------------------------------
# Envelope


@pytest.mark.parametrize("raw", [b"", b"{", b"not json", b"{'type': 'ping'}", b"\xff\xfe", '{"type":"ping","id":"\ud800"}'])
def test_not_json_or_not_utf8_is_invalid_json(raw):
    e = err(raw)
    assert e.code == codes.INVALID_JSON
    assert "JSON" in e.message


@pytest.mark.parametrize("obj", [[], ["ping"], "ping", 1, None, True])
def test_json_that_is_not_an_object_is_invalid_field(obj):
    e = err(orjson.dumps(obj))
    assert e.code == codes.INVALID_FIELD
    assert "object" in e.message


@pytest.mark.parametrize("obj", [{}, {"type": None}, {"type": 1}, {"type": ["ping"]}, {"kind": "ping"}])
def test_missing_or_non_string_type_is_invalid_field(obj):
    e = err(obj)
    assert e.code == codes.INVALID_FIELD
    assert "'type'" in e.message


@pytest.mark.parametrize("t", ["", "session.begin", "PING", "response.create", "pong"])
def test_unknown_type(t):
    e = err({"type": t})
    assert e.code == codes.UNKNOWN_TYPE
    assert t in e.message


def test_protocol_error_is_an_exception_with_code_and_message():
    e = ProtocolError(codes.INVALID_FIELD, "'x' is bad")
    assert isinstance(e, Exception)
    assert (e.code, e.message) == ("invalid_field", "'x' is bad")
    assert "invalid_field" in str(e)


def test_accepts_str_and_bytes_and_ignores_unknown_fields():
    as_str = decode_client_message('{"type":"ping","id":7,"extra":{"deep":[1,2]}}')
    as_bytes = decode_client_message(b'{"type":"ping","id":7,"extra":{"deep":[1,2]}}')
    assert as_str == as_bytes == Ping(7)


# ---------------------------------------------------------------------------------------------
# session.start


def test_session_start_minimal_uses_defaults():
    m = dec({"type": "session.start"})
    assert m == SessionStart()
    assert (m.protocol, m.input_sample_rate, m.output_sample_rate, m.pending) == (1, 16000, 24000, ())
    assert m.auth is m.resume is m.conversation_id is m.voice is None


def test_session_start_full():
    m = dec(
        {
            "type": "session.start",
            "protocol": 1,
            "auth": "tok",
            "resume": "rt",
            "conversation_id": "conv-1",
            "audio": {"input_sample_rate": 48000, "output_sample_rate": 8000},
            "voice": "tiffany",
            "pending": ["r1", "r2"],
            "future_field": True,
        }
    )
    assert m == SessionStart(
        protocol=1,
        auth="tok",
        resume="rt",
        conversation_id="conv-1",
        input_sample_rate=48000,
        output_sample_rate=8000,
        voice="tiffany",
        pending=("r1", "r2"),
    )
    assert isinstance(m.pending, tuple)


def test_session_start_nulls_mean_absent():
    m = dec({"type": "session.start", "protocol": None, "auth": None, "audio": None, "pending": None, "voice": None})
    assert m == SessionStart()


@pytest.mark.parametrize("protocol", [0, 2, "1", 1.0, True, [1]])
def test_session_start_protocol_must_be_1(protocol):
    e = err({"type": "session.start", "protocol": protocol})
    assert e.code == codes.INVALID_FIELD
    assert "'protocol'" in e.message


@pytest.mark.parametrize("rate", CLIENT_INPUT_RATES)
def test_session_start_every_input_rate_accepted(rate):
    assert dec({"type": "session.start", "audio": {"input_sample_rate": rate}}).input_sample_rate == rate


@pytest.mark.parametrize("rate", CLIENT_OUTPUT_RATES)
def test_session_start_every_output_rate_accepted(rate):
    assert dec({"type": "session.start", "audio": {"output_sample_rate": rate}}).output_sample_rate == rate


@pytest.mark.parametrize(
    "audio, field",
    [
        ({"input_sample_rate": 44100}, "input_sample_rate"),
        ({"input_sample_rate": 0}, "input_sample_rate"),
        ({"input_sample_rate": -16000}, "input_sample_rate"),
        ({"output_sample_rate": 48000}, "output_sample_rate"),
        ({"output_sample_rate": 22050}, "output_sample_rate"),
    ],
)
def test_session_start_unsupported_rate(audio, field):
    e = err({"type": "session.start", "audio": audio})
    assert e.code == codes.UNSUPPORTED_SAMPLE_RATE
    assert field in e.message


@pytest.mark.parametrize("value", [True, False, 16000.0, "16000", [16000], {}])
@pytest.mark.parametrize("field", ["input_sample_rate", "output_sample_rate"])
def test_session_start_non_int_rate_is_invalid_field(field, value):
    e = err({"type": "session.start", "audio": {field: value}})
    assert e.code == codes.INVALID_FIELD
    assert field in e.message


@pytest.mark.parametrize("audio", [16000, "16k", [16000], True])
def test_session_start_audio_must_be_object(audio):
    e = err({"type": "session.start", "audio": audio})
    assert e.code == codes.INVALID_FIELD
    assert "'audio'" in e.message


@pytest.mark.parametrize("field", ["auth", "resume", "conversation_id", "voice"])
@pytest.mark.parametrize("value", [1, True, ["x"], {"x": 1}])
def test_session_start_string_fields(field, value):
    e = err({"type": "session.start", field: value})
    assert e.code == codes.INVALID_FIELD
    assert f"'{field}'" in e.message


@pytest.mark.parametrize("voice", ["matthew", "amy", "ab", "a" * 20])
def test_session_start_valid_voices(voice):
    assert dec({"type": "session.start", "voice": voice}).voice == voice


@pytest.mark.parametrize("voice", ["", "a", "a" * 21, "Matthew", "en-US", "matt hew", "matthew\n", "tëst", "amy1"])
def test_session_start_invalid_voices(voice):
    e = err({"type": "session.start", "voice": voice})
    assert e.code == codes.INVALID_FIELD
    assert "'voice'" in e.message


def test_session_start_pending_at_limit_ok_and_over_limit_rejected():
    ok = dec({"type": "session.start", "pending": [f"r{i}" for i in range(MAX_PENDING)]})
    assert len(ok.pending) == MAX_PENDING
    e = err({"type": "session.start", "pending": [f"r{i}" for i in range(MAX_PENDING + 1)]})
    assert e.code == codes.INVALID_FIELD
    assert "'pending'" in e.message and str(MAX_PENDING) in e.message


@pytest.mark.parametrize("pending", ["r1", {"r": 1}, [1], ["r1", None], [["r1"]], 3])
def test_session_start_pending_must_be_list_of_strings(pending):
    e = err({"type": "session.start", "pending": pending})
    assert e.code == codes.INVALID_FIELD
    assert "'pending'" in e.message


# ---------------------------------------------------------------------------------------------
# input.text


@pytest.mark.parametrize("text", ["hi", " padded ", "x" * MAX_TEXT_CHARS, "😀" * MAX_TEXT_CHARS, "line\nbreak"])
def test_input_text_valid_kept_verbatim(text):
    assert dec({"type": "input.text", "text": text}) == InputText(text)


@pytest.mark.parametrize("text", ["", " ", "\n\t  ", "\u3000"])
def test_input_text_empty_or_whitespace_is_invalid_field(text):
    e = err({"type": "input.text", "text": text})
    assert e.code == codes.INVALID_FIELD
    assert "'text'" in e.message


@pytest.mark.parametrize("text", [None, 1, ["hi"], {"t": "hi"}, True])
def test_input_text_must_be_string(text):
    e = err({"type": "input.text", "text": text} if text is not None else {"type": "input.text"})
    assert e.code == codes.INVALID_FIELD
    assert "'text'" in e.message


@pytest.mark.parametrize("text", ["x" * (MAX_TEXT_CHARS + 1), "é" * 5000])
def test_input_text_too_long(text):
    e = err({"type": "input.text", "text": text})
    assert e.code == codes.TEXT_TOO_LONG
    assert "'text'" in e.message and str(MAX_TEXT_CHARS) in e.message


def test_input_text_limit_counts_characters_not_bytes():
    text = "😀" * MAX_TEXT_CHARS  # 4000 UTF-8 bytes, 1000 characters
    assert len(text.encode()) > MAX_TEXT_CHARS
    assert dec({"type": "input.text", "text": text}).text == text


# ---------------------------------------------------------------------------------------------
# playback.truncate


def test_playback_truncate_valid():
    assert dec({"type": "playback.truncate", "item_id": "item_1", "played_ms": 0}) == PlaybackTruncate("item_1", 0)
    assert dec({"type": "playback.truncate", "item_id": "i" * 128, "played_ms": 1500}).played_ms == 1500


@pytest.mark.parametrize("item_id", [None, "", "i" * 129, 5, ["a"]])
def test_playback_truncate_bad_item_id(item_id):
    obj = {"type": "playback.truncate", "played_ms": 10}
    if item_id is not None:
        obj["item_id"] = item_id
    e = err(obj)
    assert e.code == codes.INVALID_FIELD
    assert "'item_id'" in e.message


@pytest.mark.parametrize("played_ms", [None, -1, 1.5, 100.0, "100", True, False])
def test_playback_truncate_bad_played_ms(played_ms):
    obj = {"type": "playback.truncate", "item_id": "item_1"}
    if played_ms is not None:
        obj["played_ms"] = played_ms
    e = err(obj)
    assert e.code == codes.INVALID_FIELD
    assert "'played_ms'" in e.message


# ---------------------------------------------------------------------------------------------
# ping / session.end


@pytest.mark.parametrize("id_", ["abc", 0, -3, 1.25, True, False, None])
def test_ping_scalar_ids(id_):
    m = dec({"type": "ping", "id": id_})
    assert m == Ping(id_)
    assert type(m.id) is type(id_)


def test_ping_without_id():
    assert dec({"type": "ping"}) == Ping(None)


@pytest.mark.parametrize("id_", [{}, {"a": 1}, [], [1]])
def test_ping_id_must_be_scalar(id_):
    e = err({"type": "ping", "id": id_})
    assert e.code == codes.INVALID_FIELD
    assert "'id'" in e.message


def test_session_end_ignores_fields():
    assert dec({"type": "session.end"}) == SessionEnd()
    assert dec({"type": "session.end", "reason": "bye"}) == SessionEnd()


def test_client_types_match_protocol():
    assert [c.type for c in (SessionStart, InputText, PlaybackTruncate, SessionEnd, Ping)] == [
        "session.start",
        "input.text",
        "playback.truncate",
        "session.end",
        "ping",
    ]


# ---------------------------------------------------------------------------------------------
# Server -> client


def ready(**kw) -> SessionReady:
    base = dict(
        protocol=1,
        session_id="s1",
        conversation_id="c1",
        resume_token="rt",
        resumed=False,
        history=[{"item_id": "i1", "role": "user", "text": "hi", "at": "2026-01-01T00:00:00.000000Z", "interrupted": False}],
        history_length=1,
        input_sample_rate=16000,
        output_sample_rate=24000,
        voice="matthew",
        engine="local",
    )
    return SessionReady(**{**base, **kw})


def test_session_ready_shape_nests_audio_and_omits_resume_failed():
    out = decode_server_message(encode(ready()))
    assert out == {
        "type": "session.ready",
        "protocol": 1,
        "session_id": "s1",
        "conversation_id": "c1",
        "resume_token": "rt",
        "resumed": False,
        "history": [
            {"item_id": "i1", "role": "user", "text": "hi", "at": "2026-01-01T00:00:00.000000Z", "interrupted": False}
        ],
        "history_length": 1,
        "audio": {"input_sample_rate": 16000, "output_sample_rate": 24000, "input_codec": "pcm16",
                  "output_codec": "pcm16"},
        "voice": "matthew",
        "engine": "local",
    }


def test_session_ready_with_resume_failed():
    out = decode_server_message(encode(ready(resume_failed="not_found")))
    assert out["resume_failed"] == "not_found"
    assert out["resumed"] is False


def test_transcript_receipt_only_when_set():
    partial = decode_server_message(encode(Transcript("a1", "assistant", "Hello", final=False)))
    assert partial == {"type": "transcript", "item_id": "a1", "role": "assistant", "text": "Hello", "final": False}
    final = decode_server_message(encode(Transcript("a1", "assistant", "Hello", final=True, receipt="rc")))
    assert final == {
        "type": "transcript",
        "item_id": "a1",
        "role": "assistant",
        "text": "Hello",
        "final": True,
        "receipt": "rc",
    }


@pytest.mark.parametrize(
    "msg, expected",
    [
        (ResponseAudioStart("a1"), {"type": "response.audio.start", "item_id": "a1"}),
        (ResponseAudioEnd("a1", "interrupted"), {"type": "response.audio.end", "item_id": "a1", "reason": "interrupted"}),
        (Interrupted("a1"), {"type": "interrupted", "item_id": "a1"}),
        (ItemSaved("u1"), {"type": "item.saved", "item_id": "u1"}),
        (SessionReconnect("draining", 250), {"type": "session.reconnect", "reason": "draining", "retry_after_ms": 250}),
        (Status("listening"), {"type": "status", "state": "listening"}),
        (Usage(10, 20), {"type": "usage", "input_tokens": 10, "output_tokens": 20}),
        (Error("invalid_json", "bad"), {"type": "error", "code": "invalid_json", "message": "bad", "fatal": False}),
        (
            Error("model_unavailable", "gone", fatal=True),
            {"type": "error", "code": "model_unavailable", "message": "gone", "fatal": True},
        ),
        (SessionEnded(), {"type": "session.ended"}),
        (Pong("p1", 1700000000.5), {"type": "pong", "id": "p1", "server_time": 1700000000.5}),
        (Pong(3, 1.0), {"type": "pong", "id": 3, "server_time": 1.0}),
    ],
)
def test_server_message_shapes(msg, expected):
    data = encode(msg)
    assert isinstance(data, bytes)
    assert decode_server_message(data) == expected


def test_pong_echoes_null_id():
    """pong.id is a required field: a null ping id comes back as null, not omitted."""
    assert decode_server_message(encode(Pong(None, 2.0))) == {"type": "pong", "id": None, "server_time": 2.0}


def test_server_messages_are_frozen():
    msg = Status("speaking")
    with pytest.raises(AttributeError):
        msg.state = "listening"  # type: ignore[misc]


def test_encode_is_compact_utf8_json():
    data = encode(Transcript("u1", "user", "héllo 😀", final=True, receipt="r"))
    assert data == (
        '{"type":"transcript","item_id":"u1","role":"user","text":"héllo 😀","final":true,"receipt":"r"}'.encode()
    )
