"""Twilio Media Streams (`<Connect><Stream>`, bidirectional) over the same `Session` as `/v1/voice`.

`TwilioSession` wraps a `protocol.session.Session` and looks like one to the gateway, as
`protocol.realtime.RealtimeSession` does: it takes the same inputs and gives effects from `effects()`.
It turns Twilio's JSON messages into the session's inputs and the session's audio and messages into
Twilio's. Every decision about the conversation stays in the session; this module only translates.
Pure: no I/O, no clocks (time is the `now` of each input). docs/telephony.md describes the endpoint.

The wire, per Twilio's published Media Streams messages (JSON text frames):

- in: `connected`, then `start` (`start.streamSid`, `callSid`, `accountSid`, `tracks`, `mediaFormat`
  {`encoding: audio/x-mulaw`, `sampleRate: 8000`, `channels: 1`}, `customParameters`), then `media`
  (`media.payload`: base64 G.711 mu-law at 8 kHz, `track`, `chunk`, `timestamp`), `mark` (`mark.name`,
  echoed once the audio sent before it has been played to the caller, or dropped by a `clear`), `dtmf`
  (ignored) and `stop` (the call or the stream ended);
- out: `media` {`event`, `streamSid`, `media: {payload}`}, `mark` {`event`, `streamSid`, `mark: {name}`}
  and `clear` {`event`, `streamSid`} (drop the audio Twilio has not played yet).

How it maps:

- The `connected` and `start` messages are read by the gateway before the session exists (it must
  know the caller to find their conversation: gateway/telephony.py); `parse_preamble` checks them.
  The session is then started with `session.start` for mu-law at 8 kHz both ways: the caller's bytes
  go to the session as they arrive, and the session's 20 ms mu-law frames go out as `media`.
- The caller is the conversation's owner: the principal `phone:<E.164>` (or, for a call without a
  usable caller id, `twilio-call:<CallSid>`, which nothing ever resumes). The gateway vouches for it:
  the Twilio signature of the handshake is the credential. The session asks for the principal as it
  would verify a bearer token (`Authenticate`); this adapter answers it (`authenticated`) itself.
- What the caller has heard: a `mark` goes out at the start of each assistant item, every
  `MARK_EVERY_MS` of its audio and at its end. Twilio echoes a mark once the audio before it has
  played, so the last echoed mark says how far into which item the caller is (extrapolated in real
  time since the echo, never past the audio sent).
- Barge-in: the session's `interrupted` becomes a `clear` (Twilio drops what it has not played) and
  a `playback.truncate` of that item into the session, with the played time the marks give: the same
  truncation as a `/v1/voice` client's. The marks Twilio echoes for the cleared audio are ignored.
- `stop` is the session's `client_gone`, as the socket's close is: what is final is still stored.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import orjson

from . import messages as m
from .adapter import SendText, SessionAdapter
from .session import Authenticate, Log, SendAudio, SendMessage, Session

RATE = 8000                  # mu-law, both ways
MULAW_BYTES_PER_MS = RATE // 1000
MARK_EVERY_MS = 200          # a mark this often in an item's audio (the gateway runs 200 ms ahead of playback)
MAX_MARKS = 512              # marks not yet echoed that are remembered (a peer that never echoes: the oldest go)
MAX_PREAMBLE_MESSAGES = 4    # messages before `start` (Twilio sends one: `connected`)
CALLER_PARAMETER = "caller"  # the default <Parameter> that names the caller (NOVAGATE_TWILIO_CALLER_PARAMETER)

_SID = re.compile(r"[A-Za-z0-9]{2,64}")
_E164 = re.compile(r"\+[1-9][0-9]{6,14}")
# What carriers and Twilio put in place of a withheld caller id: the keypad spellings of ANONYMOUS,
# RESTRICTED, BLOCKED, UNKNOWN and UNAVAILABLE. They are nobody's number: such calls are anonymous.
PLACEHOLDER_NUMBERS = frozenset({"+266696687", "+7378742833", "+2562533", "+8656696", "+86282452253"})


class TwilioError(Exception):
    """A Media Streams handshake that cannot be served; the message is the close reason."""


@dataclass(frozen=True, slots=True)
class Call:
    """What the `start` message says about the call."""

    stream_sid: str
    call_sid: str
    account_sid: str
    caller: str | None                 # E.164, from the caller parameter; None: not given or not a number
    parameters: dict[str, str] = field(default_factory=dict, repr=False)  # customParameters (may hold PII)

    @property
    def principal(self) -> str:
        """Who owns the conversation: the caller's number, or (no caller id) this call alone."""
        return f"phone:{self.caller}" if self.caller else f"twilio-call:{self.call_sid}"


def caller_id(value: Any) -> str | None:
    """The caller's number in E.164 (`+` and 7 to 15 digits), or None for anything else: a withheld
    number, `anonymous`, a `client:` or `sip:` identity."""
    if not isinstance(value, str):
        return None
    number = value.strip()
    if not _E164.fullmatch(number) or number in PLACEHOLDER_NUMBERS:
        return None
    return number


def parse_preamble(text: str | bytes, caller_parameter: str = CALLER_PARAMETER) -> Call | None:
    """One message before the session starts: None for `connected`, the `Call` for `start`; raises
    TwilioError for anything else (media before start, bad JSON, a format other than mu-law 8 kHz mono)."""
    try:
        msg = orjson.loads(text)
    except (orjson.JSONDecodeError, TypeError):
        raise TwilioError("not a Media Streams message") from None
    if not isinstance(msg, dict):
        raise TwilioError("not a Media Streams message")
    event = msg.get("event")
    if event == "connected":
        return None
    if event != "start":
        raise TwilioError(f"expected start, got {str(event)[:20]!r}")
    start = msg.get("start")
    if not isinstance(start, dict):
        raise TwilioError("start without its 'start' object")
    sids = {k: start.get(k) for k in ("streamSid", "callSid", "accountSid")}
    if not isinstance(sids["streamSid"], str) and isinstance(msg.get("streamSid"), str):
        sids["streamSid"] = msg["streamSid"]
    for key, value in sids.items():
        if not isinstance(value, str) or not _SID.fullmatch(value):
            raise TwilioError(f"start.{key} missing or malformed")
    fmt = start.get("mediaFormat")
    if fmt is not None:
        if not isinstance(fmt, dict) or (fmt.get("encoding"), fmt.get("sampleRate"), fmt.get("channels", 1)) != (
                "audio/x-mulaw", RATE, 1):
            raise TwilioError("media format is not audio/x-mulaw, 8000 Hz, mono")
    tracks = start.get("tracks")
    if tracks is not None and (not isinstance(tracks, list) or "inbound" not in tracks):
        raise TwilioError("the stream has no inbound track")
    params = start.get("customParameters") or {}
    if not isinstance(params, dict):
        raise TwilioError("start.customParameters is not an object")
    params = {str(k): str(v) for k, v in params.items() if isinstance(v, (str, int, float))}
    return Call(sids["streamSid"], sids["callSid"], sids["accountSid"], caller_id(params.get(caller_parameter)), params)


class TwilioSession(SessionAdapter):
    """A `Session` that speaks Twilio Media Streams. Inputs the gateway calls that are not defined
    here (store, model, tools, drain, …) go to the session unchanged."""

    def __init__(self, session: Session, call: Call, *, now: float, conversation_id: str | None = None,
                 voice: str | None = None, mark_every_ms: int = MARK_EVERY_MS):
        super().__init__(session, start_by=now)  # the session is started at the actor's first tick
        self.call = call
        self._cid = conversation_id        # the caller's recent conversation, to resume (None: a new one)
        self._voice = voice
        self._mark_every = mark_every_ms
        self._marker = "twilio:" + call.call_sid  # what the session is given as the credential to verify
        self._sid = call.stream_sid
        # what was sent and what was heard
        self._item: str | None = None      # the assistant item whose audio goes out now
        self._sent_ms: dict[str, float] = {}  # item -> its audio sent so far (the items of the last few turns)
        self._since_mark = 0.0
        self._marks: OrderedDict[str, tuple[str, float]] = OrderedDict()  # name -> (item, ms of it before the mark)
        self._marks_sent = 0
        self._heard: tuple[str, float, float] | None = None  # the last echoed mark: (item, ms, when)
        self._bad_messages = 0

    # -- what the gateway drives -----------------------------------------------------------------------
    def receive_audio(self, data: bytes, now: float) -> None:
        """A binary frame: not part of Media Streams (audio comes in `media` messages); ignored."""
        self._bad(now, "binary frame")

    def receive_text(self, text: str | bytes, now: float) -> None:
        if not self._s.accepting:
            return
        if self._start_by is not None:
            self._start(now)
        try:
            msg = orjson.loads(text)
        except (orjson.JSONDecodeError, TypeError):
            self._bad(now, "not JSON")
            return
        if not isinstance(msg, dict):
            self._bad(now, "not an object")
            return
        sid = msg.get("streamSid")
        if sid is not None and sid != self._sid:
            self._bad(now, "another stream's message")
            return
        match msg.get("event"):
            case "media":
                self._media_in(msg.get("media"), now)
            case "mark":
                mark = msg.get("mark")
                if isinstance(mark, dict) and isinstance(mark.get("name"), str):
                    self._echoed(mark["name"], now)
            case "stop":
                self._emit_log("info", "twilio stream stopped", call_sid=self.call.call_sid)
                self._s.client_gone(now)
            case "dtmf" | "connected" | "start":
                pass  # keypresses are not used; the handshake was read before the session started
            case _:
                pass  # Twilio may add events: what is not known is ignored

    # -- Twilio -> session ----------------------------------------------------------------------------------
    def _start(self, now: float) -> None:
        self._start_by = None
        self._s.receive_message(m.SessionStart(
            auth=self._marker, conversation_id=self._cid, input_sample_rate=RATE, output_sample_rate=RATE,
            input_codec="mulaw", output_codec="mulaw", voice=self._voice), now)

    def _media_in(self, media: Any, now: float) -> None:
        if not isinstance(media, dict) or media.get("track", "inbound") != "inbound":
            return
        payload = media.get("payload")
        try:
            data = base64.b64decode(payload, validate=True) if isinstance(payload, str) else b""
        except (binascii.Error, ValueError):
            data = b""
        if not data:
            self._bad(now, "media without a base64 payload")
            return
        self._s.receive_audio(data, now)

    def _echoed(self, name: str, now: float) -> None:
        """Twilio played the audio sent before this mark (or dropped it: a `clear`, whose marks are forgotten)."""
        mark = self._marks.get(name)
        if mark is None:
            return
        while self._marks:  # marks are echoed in order: the ones sent before this one have played too
            older, _ = self._marks.popitem(last=False)
            if older == name:
                break
        item, ms = mark
        self._heard = (item, ms, now)

    def _bad(self, now: float, what: str) -> None:
        self._bad_messages += 1
        if self._bad_messages in (1, 100, 10_000):  # a few log lines, not one per frame
            self._emit_log("warning", "twilio: message ignored", call_sid=self.call.call_sid, reason=what,
                           count=self._bad_messages)

    # -- session -> Twilio ----------------------------------------------------------------------------------
    def _translate(self) -> None:
        while effects := self._s.effects():
            for e in effects:
                match e:
                    case SendAudio(pcm=ulaw):
                        self._media_out(ulaw)
                    case SendMessage(message=msg):
                        self._message(msg)
                    case Authenticate(token=token) if token == self._marker:
                        # the gateway checked the call's signature and names the caller: nothing to verify
                        self._s.authenticated(self.call.principal, self._s.now)
                    case _:
                        self._out.append(e)

    def _message(self, msg: Any) -> None:
        match msg:
            case m.SessionReady():
                self._emit_log("info", "twilio call ready", call_sid=self.call.call_sid,
                               conversation_id=msg.conversation_id, resumed=msg.resumed,
                               history_items=msg.history_length)
            case m.ResponseAudioStart(item_id=item_id):
                self._item = item_id
                self._sent_ms[item_id] = 0.0
                while len(self._sent_ms) > 8:
                    del self._sent_ms[next(iter(self._sent_ms))]
                self._mark(item_id)
            case m.ResponseAudioEnd(item_id=item_id, reason=reason):
                if reason != "interrupted" and item_id in self._sent_ms and self._since_mark:
                    self._mark(item_id)  # its end (unless a mark was just sent there)
                if self._item == item_id:
                    self._item = None
            case m.Interrupted(item_id=item_id):
                self._interrupted(item_id)
            case m.Error(code=code, message=message, fatal=True):
                self._emit_log("warning", "twilio call: session error", call_sid=self.call.call_sid, code=code,
                               error=message)
            case _:
                pass  # transcripts, status, item.saved, tool calls, …: a phone has nowhere to show them

    def _media_out(self, ulaw: bytes) -> None:
        # the hot path: one JSON text per 20 ms frame, built without a dict
        self._out.append(SendText('{"event":"media","streamSid":"%s","media":{"payload":"%s"}}'
                                  % (self._sid, base64.b64encode(ulaw).decode())))
        item = self._item
        if item is None or item not in self._sent_ms:
            return
        ms = len(ulaw) / MULAW_BYTES_PER_MS
        self._sent_ms[item] += ms
        self._since_mark += ms
        if self._since_mark >= self._mark_every:
            self._mark(item)

    def _mark(self, item: str) -> None:
        self._marks_sent += 1
        name = f"n{self._marks_sent}"
        self._marks[name] = (item, self._sent_ms.get(item, 0.0))
        while len(self._marks) > MAX_MARKS:
            self._marks.popitem(last=False)
        self._since_mark = 0.0
        self._out.append(SendText('{"event":"mark","streamSid":"%s","mark":{"name":"%s"}}' % (self._sid, name)))

    def played_ms(self, item_id: str, now: float) -> int:
        """How much of the item the caller has heard: the last echoed mark, if it is this item's, and the
        time since Twilio echoed it (playback goes on in real time), but not past the next mark, which
        Twilio has not echoed (its playback may have stalled), nor past what was sent. No mark of the
        item echoed: its audio had not started playing."""
        heard = self._heard
        if heard is None or heard[0] != item_id:
            return 0
        _, ms, at = heard
        limit = self._sent_ms.get(item_id, ms)
        for item, pos in self._marks.values():  # the oldest mark not echoed yet
            if item == item_id:
                limit = min(limit, pos)
            break
        return int(min(ms + max(0.0, now - at) * 1000, limit))

    def _interrupted(self, item_id: str) -> None:
        """Barge-in: Twilio drops what it has not played; the session keeps of the item what was heard."""
        now = self._s.now
        played = self.played_ms(item_id, now)
        self._out.append(SendText('{"event":"clear","streamSid":"%s"}' % self._sid))
        self._marks.clear()  # Twilio echoes the cleared audio's marks at once: they say nothing of what was heard
        self._since_mark = 0.0
        self._item = None
        self._s.receive_message(m.PlaybackTruncate(item_id, played), now)

    def _emit_log(self, level: str, message: str, **fields: Any) -> None:
        self._out.append(Log(level, message, {"session_id": self._s.session_id, **fields}))
