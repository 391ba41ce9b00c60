"""Twilio Media Streams without sockets: the handshake parser and the adapter (protocol/twilio.py) over
the session core on the fake clock of tests/session_harness.py, with a fake Twilio that plays the
audio it is sent in real time and echoes marks once the audio before them has played; and the stores'
`find_recent` (SQLite, and the Agent Runtime store against its in-process fake)."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import itertools
import math
import sqlite3
from array import array

import boto3
import orjson
import pytest

from gateway.emulate.agent_runtime import AgentRuntimeFake
from gateway.store.agent_runtime import AgentRuntimeStore
from gateway.store.sqlite import SQLiteStore
from protocol import messages as m
from protocol.items import Item
from protocol.session import Session, SessionConfig, State
from protocol.twilio import MARK_EVERY_MS, Call, TwilioError, TwilioSession, caller_id, parse_preamble

from .session_harness import FRAME_S, Harness, FakeStore

_IDS = itertools.count(1)
CALLER = "+15551230001"
STREAM = "MZ" + "a" * 32
CALL = "CA" + "b" * 32
ACCOUNT = "AC" + "c" * 32


def start_message(**start) -> str:
    body = {"streamSid": STREAM, "accountSid": ACCOUNT, "callSid": CALL, "tracks": ["inbound"],
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            "customParameters": {"caller": CALLER}}
    body.update(start)
    return orjson.dumps({"event": "start", "sequenceNumber": "1", "start": body, "streamSid": STREAM}).decode()


# -- the handshake ----------------------------------------------------------------------------------------
def test_connected_then_start():
    assert parse_preamble('{"event": "connected", "protocol": "Call", "version": "1.0.0"}') is None
    call = parse_preamble(start_message())
    assert (call.stream_sid, call.call_sid, call.account_sid, call.caller) == (STREAM, CALL, ACCOUNT, CALLER)
    assert call.principal == f"phone:{CALLER}"


def test_the_caller_parameter_is_configurable_and_must_be_a_number():
    assert parse_preamble(start_message(customParameters={"From": CALLER}), "From").caller == CALLER
    assert parse_preamble(start_message(customParameters={"From": CALLER})).caller is None  # not `caller`
    for withheld in ("anonymous", "+266696687", "client:alice", "sip:bob@example.com", "", "12345", "+0123456789"):
        call = parse_preamble(start_message(customParameters={"caller": withheld}))
        assert call.caller is None and call.principal == f"twilio-call:{CALL}"  # this call alone
    assert caller_id(" +442071838750 ") == "+442071838750"


@pytest.mark.parametrize("text", [
    "not json",
    '{"event": "media", "media": {"payload": ""}}',
    start_message(mediaFormat={"encoding": "audio/x-l16", "sampleRate": 16000, "channels": 1}),
    start_message(tracks=["outbound"]),
    start_message(streamSid=None, callSid="CA 1"),
    start_message(customParameters=["caller"]),
])
def test_a_bad_handshake_is_refused(text):
    with pytest.raises(TwilioError):
        parse_preamble(text)


# -- the adapter on the fake clock -------------------------------------------------------------------------
def ulaw(turn: int = 0) -> bytes:
    """20 ms of the tests' 'mu-law': one byte per sample, `turn` (0: silence)."""
    return bytes([turn]) * 160


def fake_decoder(codec: str):
    """The tests' mu-law: byte t is the sample 1000 + t (0 is silence), so the fake model hears turn t."""
    return (lambda frame: array("h", [1000 + b if b else 0 for b in frame]).tobytes()), 8000


def fake_encoder(codec: str, rate: int):
    return lambda pcm: bytes(len(pcm) // 2)  # one byte per sample


def to_16k(rate: int):
    assert rate == 8000
    return lambda pcm: array("h", [s for s in array("h", pcm) for _ in (0, 1)]).tobytes()


class TW(Harness):
    """The harness with a `TwilioSession` in place of the session, and a fake Twilio: it keeps what the
    gateway sent (`sent`, decoded JSON, with the time), plays the media in real time (`play_end`) and
    echoes each mark when the audio before it has played, or at once after a `clear`."""

    def __init__(self, conversation_id: str | None = None, call: Call | None = None, store: FakeStore | None = None,
                 reply_ms: int = 300, **config):
        config.setdefault("playback_lead_ms", 200)
        super().__init__(store=store, **config)
        self.reply_ms = reply_ms
        env = dataclasses.replace(self.s.env, decoder=fake_decoder, encoder=fake_encoder, resampler=to_16k)
        self.session = Session(SessionConfig(**config), env, now=0.0, session_id=f"sess_tw{next(_IDS)}")
        self.truncates: list[tuple[str, int]] = []
        receive = self.session.receive_message

        def spy(msg, now):
            if isinstance(msg, m.PlaybackTruncate):
                self.truncates.append((msg.item_id, msg.played_ms))
            receive(msg, now)

        self.session.receive_message = spy
        self.call = call or parse_preamble(start_message())
        self.s = TwilioSession(self.session, self.call, now=0.0, conversation_id=conversation_id)
        self.sent: list[tuple[float, dict]] = []
        self.play_end = 0.0
        self.echoes: list[tuple[float, str]] = []  # (when Twilio echoes it, mark name)
        self.heard_ms = 0.0                          # media played to the caller so far
        self.cleared_at: list[float] = []
        self.leads: list[float] = []                 # at each media: the audio Twilio has queued, in seconds
        self.stalled = False                         # True: Twilio's playback stopped (no mark is echoed)

    def perform(self, e) -> None:
        text = getattr(e, "text", None)
        if text is None:
            return super().perform(e)
        msg = orjson.loads(text)
        assert msg["streamSid"] == STREAM
        self.sent.append((self.now, msg))
        match msg["event"]:
            case "media":
                self.play_end = max(self.play_end, self.now) + len(base64.b64decode(msg["media"]["payload"])) / 8000
                self.leads.append(self.play_end - self.now)
            case "mark":
                self.echoes.append((max(self.play_end, self.now), msg["mark"]["name"]))
            case "clear":
                self.cleared_at.append(self.now)
                self.play_end = self.now
                self.echoes = [(self.now, name) for _, name in self.echoes]

    def twilio(self, **msg) -> None:
        self.s.receive_text(orjson.dumps({**msg, "streamSid": STREAM}).decode(), self.now)
        self.pump()

    def before_audio(self) -> None:
        """Twilio echoes the marks whose audio has played."""
        due = [name for t, name in self.echoes if t <= self.now and not self.stalled]
        self.echoes = [(t, name) for t, name in self.echoes if t > self.now]
        for name in due:
            self.twilio(event="mark", mark={"name": name})

    def send_audio(self, pcm: bytes) -> None:
        if self.s.accepting:
            self.twilio(event="media", media={"track": "inbound", "chunk": "1", "timestamp": "0",
                                              "payload": base64.b64encode(pcm).decode()})

    def events(self, kind: str) -> list[tuple[float, dict]]:
        return [(t, msg) for t, msg in self.sent if msg["event"] == kind]

    def live(self) -> None:
        self.until(lambda: self.session.state is State.LIVE, 2, ulaw())

    def say(self, turn: int, seconds: float = 1.0) -> None:
        self.run(seconds, ulaw(turn))


def test_a_call_is_a_mulaw_session_owned_by_the_caller():
    h = TW()
    h.live()
    start = h.session._start
    assert (start.input_codec, start.output_codec, start.input_sample_rate, start.output_sample_rate) == (
        "mulaw", "mulaw", 8000, 8000)
    (conv,) = h.store.convs.values()
    assert conv.owner == f"phone:{CALLER}" and h.session.owner == f"phone:{CALLER}"
    assert not h.session._asked  # nothing to resume: a new conversation
    logged = [x for x in h.logs if x.message == "twilio call ready"]
    assert logged and logged[0].fields["resumed"] is False and logged[0].fields["call_sid"] == CALL
    assert CALLER not in str([x.fields for x in h.logs])  # the number is never logged


def test_a_call_back_resumes_the_callers_conversation_and_no_one_elses():
    store = FakeStore()
    mine = store.create(f"phone:{CALLER}")
    store.convs[mine].items.append(Item("i1", "user", "earlier", "2026-11-29T00:00:00Z"))
    theirs = store.create("phone:+15559990000")
    h = TW(conversation_id=mine, store=store)
    h.live()
    assert h.session.conversation_id == mine and h.session._resumed and [i.text for i in h.session.history] == ["earlier"]
    # a conversation id that is not the caller's reads as none: a new conversation
    h2 = TW(conversation_id=theirs, store=store)
    h2.live()
    assert h2.session.conversation_id not in (mine, theirs) and not h2.session._resumed


def test_speech_in_audio_out_in_20ms_frames_with_marks():
    h = TW(reply_ms=1000)
    h.live()
    h.say(1, 0.6)
    h.until(lambda: any(i.role == "assistant" for c in h.store.convs.values() for i in c.items), 10, ulaw())
    (conv,) = h.store.convs.values()
    assert [i.role for i in conv.items] == ["user", "assistant"] and conv.items[0].text == "turn 1"
    media = h.events("media")
    assert media and all(len(msg["media"]["payload"]) == 216 for _, msg in media)  # 160 bytes: 20 ms of mu-law
    audio_s = len(media) * 0.02
    assert audio_s >= 2.9  # 1000 ms of the model's 24 kHz bytes are 3 s at 8 kHz
    marks = h.events("mark")
    # one at the item's start, one every MARK_EVERY_MS of its audio, one at its end
    assert len(marks) == 1 + math.ceil(round(audio_s * 1000) / MARK_EVERY_MS)
    first_media = h.sent.index(media[0])
    assert h.sent.index(marks[0]) < first_media
    # the gateway stays about playback_lead_ms ahead of what Twilio has played
    assert max(h.leads) <= 0.2 + 0.021
    assert not h.echoes or all(t > h.now for t, _ in h.echoes)


def test_barge_in_clears_twilio_and_keeps_what_the_caller_heard():
    h = TW(reply_ms=3000)  # 9 s of audio at 8 kHz
    h.speech_events = True  # Nova 2: userSpeechStart is the barge-in
    h.live()
    h.say(1, 0.6)
    h.until(lambda: h.events("media"), 5, ulaw())
    first_media = h.events("media")[0][0]
    h.run(4.5, ulaw())
    heard_before = h.now - first_media
    h.say(2, 0.3)
    h.until(lambda: h.cleared_at, 2, ulaw(2))
    (cleared,) = h.cleared_at
    ((item_id, played_ms),) = h.truncates
    heard = (cleared - first_media) * 1000  # what the fake Twilio played of the item when it was cleared
    # the last echoed mark (they are 200 ms apart), extrapolated in real time: at most an echo's delay short
    assert heard_before * 1000 - 2 * FRAME_S * 1000 <= played_ms <= heard + 1 and heard - played_ms < 100
    h.until(lambda: any(i.item_id == item_id for c in h.store.convs.values() for i in c.items), 5, ulaw())
    stored = next(i for c in h.store.convs.values() for i in c.items if i.item_id == item_id)
    assert stored.interrupted and stored.text and "answer to turn 1".startswith(stored.text)  # what was heard of it
    # the answer to the barge-in goes out after the clear, as a new item with its own marks
    h.run(2, ulaw())
    clear = next(i for i, (_, msg) in enumerate(h.sent) if msg["event"] == "clear")
    after = [msg["event"] for _, msg in h.sent[clear + 1:]]
    assert "media" in after and after.index("mark") < after.index("media")


def test_marks_echoed_for_cleared_audio_say_nothing_of_what_was_heard():
    h = TW(reply_ms=3000)
    h.s._mark_every = 60  # a mark every 60 ms: some are always waiting to be played
    h.speech_events = True
    h.live()
    h.say(1, 0.6)
    h.until(lambda: h.events("media"), 5, ulaw())
    h.run(1.0, ulaw())
    h.until(lambda: h.cleared_at, 2, ulaw(2))
    heard = h.s._heard
    assert h.echoes and not h.s._marks  # Twilio owes the cleared audio's marks; the adapter forgot them
    h.step(ulaw(2))  # ... and echoes them at once
    assert not h.echoes and h.s._heard == heard


def test_a_stalled_playback_is_not_counted_as_heard():
    h = TW(reply_ms=3000)
    h.speech_events = True
    h.live()
    h.say(1, 0.6)
    h.until(lambda: h.events("media"), 5, ulaw())
    h.run(1.0, ulaw())
    h.stalled = True  # from now on Twilio plays nothing (and echoes no mark)
    _, heard_ms, _ = h.s._heard
    h.run(1.0, ulaw())
    h.until(lambda: h.cleared_at, 2, ulaw(2))
    ((_, played_ms),) = h.truncates
    # the last echoed mark, and at most up to the next one: not the second the caller did not hear
    assert heard_ms <= played_ms <= heard_ms + MARK_EVERY_MS


def test_stop_ends_the_call_and_stores_what_is_final():
    h = TW(reply_ms=300)
    h.live()
    h.say(1, 0.6)
    h.until(lambda: h.events("media"), 5, ulaw())
    h.twilio(event="stop", stop={"accountSid": ACCOUNT, "callSid": CALL})
    assert not h.s.accepting
    h.until(lambda: h.session.state is State.CLOSED, 8, None)
    (conv,) = h.store.convs.values()
    assert [i.role for i in conv.items] == ["user", "assistant"]  # the answer cut by the hang-up is kept
    assert not conv.ended  # a hang-up does not end the conversation: the caller may call back


def test_what_is_not_caller_audio_is_ignored():
    h = TW()
    h.live()
    h.twilio(event="dtmf", dtmf={"track": "inbound_track", "digit": "1"})
    h.twilio(event="media", media={"track": "inbound", "payload": "not base64!"})
    h.twilio(event="media", media={"track": "outbound", "payload": "AAAA"})
    h.s.receive_text("not json", h.now)
    h.s.receive_audio(b"\x00" * 160, h.now)
    h.s.receive_text(orjson.dumps({"event": "media", "streamSid": "MZother", "media": {"payload": "AAAA"}}), h.now)
    h.pump()
    assert h.session.state is State.LIVE and h.closed is None
    assert len([x for x in h.logs if x.message == "twilio: message ignored"]) == 1  # logged once, not per frame


def test_an_anonymous_call_is_a_conversation_of_its_own():
    call = parse_preamble(start_message(customParameters={"caller": "anonymous"}))
    h = TW(call=call)
    h.live()
    (conv,) = h.store.convs.values()
    assert conv.owner == f"twilio-call:{CALL}"


# -- find_recent ---------------------------------------------------------------------------------------------
OWNER, OTHER = "ab" * 32, "cd" * 32


def item(n: int) -> Item:
    return Item(f"i{n}", "user", f"message {n}", f"2026-11-29T00:00:{n:02d}.000000Z")


async def test_sqlite_find_recent(tmp_path):
    store = SQLiteStore(str(tmp_path / "db"))
    try:
        assert await store.find_recent(OWNER, 1800) is None
        old = await store.create(OWNER)
        await store.append(old, item(1))
        newer = await store.create(OWNER)
        await store.create(OTHER)
        assert await store.find_recent(OWNER, 1800) == newer
        await store.append(old, item(2))  # written since: the newest activity
        assert await store.find_recent(OWNER, 1800) == old
        await store.take(newer, "conn")
        assert await store.find_recent(OWNER, 1800) == newer
        await store.end(newer)
        assert await store.find_recent(OWNER, 1800) == old  # an ended conversation is never resumed
        assert await store.find_recent(OWNER, 0) is None
        await asyncio.sleep(1.1)
        assert await store.find_recent(OWNER, 1.0) is None  # older than the window
    finally:
        await store.aclose()


async def test_sqlite_find_recent_on_a_database_from_before_the_column(tmp_path):
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE conversations (id TEXT PRIMARY KEY, owner TEXT NOT NULL, created_at TEXT NOT NULL DEFAULT '',
                                    ended INTEGER NOT NULL DEFAULT 0);
        CREATE TABLE items (seq INTEGER PRIMARY KEY AUTOINCREMENT, conversation_id TEXT NOT NULL, item_id TEXT NOT NULL,
                            role TEXT NOT NULL, text TEXT NOT NULL, at TEXT NOT NULL, interrupted INTEGER NOT NULL DEFAULT 0,
                            size INTEGER NOT NULL, UNIQUE (conversation_id, item_id));
        INSERT INTO conversations (id, owner) VALUES ('before', '%s');
    """ % OWNER)
    db.close()
    store = SQLiteStore(str(path))
    try:
        assert await store.find_recent(OWNER, 1800) is None  # written before: never recent
        await store.append("before", item(1))
        assert await store.find_recent(OWNER, 1800) == "before"
    finally:
        await store.aclose()


@pytest.fixture
def fake():
    f = AgentRuntimeFake().start()
    yield f
    f.stop()


async def test_agent_runtime_find_recent(fake):
    session = boto3.Session(aws_access_key_id="fake", aws_secret_access_key="fake", region_name="us-east-1")
    one, two = (AgentRuntimeStore(endpoint_url=fake.url, session=session) for _ in range(2))  # two instances
    try:
        assert await two.find_recent(OWNER, 1800) is None
        old = await one.create(OWNER)
        await one.append(old, item(1))
        for _ in range(3):
            await one.create(OTHER)  # other callers' conversations, newer
        assert await two.find_recent(OWNER, 1800) == old
        newer = await one.create(OWNER)
        assert await two.find_recent(OWNER, 1800) == newer
        await one.end(newer)
        assert await two.find_recent(OWNER, 1800) == old  # an ended conversation is never resumed
        fake.reset_calls()
        assert await one.find_recent(OWNER, 1800) == old
        calls = fake.calls
        assert calls["ListSessions"] == 1 and calls["GetSession"] <= 2  # the others' are known here: not read
        await asyncio.sleep(1.2)
        assert await two.find_recent(OWNER, 1.0) is None
        assert await two.find_recent(OWNER, 0) is None
    finally:
        await one.aclose()
        await two.aclose()


def test_the_agent_runtime_fake_pages_list_sessions():
    with AgentRuntimeFake() as fake:
        client = fake.client()
        for _ in range(5):
            client.create_session()
        page = client.list_sessions(maxResults=2)
        assert len(page["sessionSummaries"]) == 2 and page["nextToken"]
        assert {"sessionId", "lastUpdatedAt", "sessionStatus"} <= set(page["sessionSummaries"][0])
        rest = client.list_sessions(maxResults=10, nextToken=page["nextToken"])
        assert len(rest["sessionSummaries"]) == 3 and "nextToken" not in rest


def test_the_adapter_is_sans_io():
    # no clock, no sockets, no tasks: what it extrapolates comes from the `now` of its inputs
    import protocol.twilio as tw
    assert not {"time", "asyncio", "socket", "datetime"} & set(vars(tw))


# -- the handshake's signature (gateway/telephony.py) --------------------------------------------------------
class Upgrade:
    """What the endpoint reads of a WebSocket upgrade request."""

    def __init__(self, url: str, signature: str | None):
        from starlette.datastructures import URL

        self.url = URL(url)
        self.headers = {"x-twilio-signature": signature} if signature is not None else {}


def endpoint(**env):
    from gateway.config import Settings
    from gateway.telephony import TwilioEndpoint

    return TwilioEndpoint.from_settings(Settings.from_env({f"NOVAGATE_{k.upper()}": v for k, v in env.items()}),
                                        serve=None)


def test_the_endpoint_is_served_only_with_an_auth_token_or_when_insecure(tmp_path):
    assert endpoint() is None
    assert endpoint(twilio_insecure="true").signature_ok(Upgrade("ws://h/v1/telephony/twilio", None))
    (tmp_path / "token").write_text("f" * 32 + "\n")
    assert endpoint(twilio_auth_token_file=str(tmp_path / "token")).validator is not None


def test_the_signature_covers_the_url_twilio_requested():
    from twilio.request_validator import RequestValidator

    token = "0123456789abcdef" * 2
    sign = RequestValidator(token).compute_signature
    # no public URL: wss:// (all Twilio uses) with the request's Host and path; a port or none, as Twilio signs either
    ep = endpoint(twilio_auth_token=token)
    seen = "ws://voice.example.com/v1/telephony/twilio"
    assert ep.signed_url(Upgrade(seen, None)) == "wss://voice.example.com/v1/telephony/twilio"
    assert ep.signature_ok(Upgrade(seen, sign("wss://voice.example.com/v1/telephony/twilio", {})))
    assert ep.signature_ok(Upgrade(seen, sign("wss://voice.example.com:443/v1/telephony/twilio", {})))
    for bad in (None, "", "x", sign("wss://voice.example.com/v1/voice", {}), sign("ws://voice.example.com/v1/telephony/twilio", {}),
                RequestValidator("f" * 32).compute_signature("wss://voice.example.com/v1/telephony/twilio", {})):
        assert not ep.signature_ok(Upgrade(seen, bad))
    # behind a proxy that changes the host and the path: the URL of the TwiML
    public = "wss://calls.example.com/novagate/v1/telephony/twilio"
    ep = endpoint(twilio_auth_token=token, twilio_public_url=public)
    assert ep.signature_ok(Upgrade("ws://10.0.0.7:8000/v1/telephony/twilio", sign(public, {})))
    assert not ep.signature_ok(Upgrade("ws://10.0.0.7:8000/v1/telephony/twilio", sign(seen.replace("ws:", "wss:"), {})))
