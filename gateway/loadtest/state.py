"""The protocol side of one simulated user, without I/O: what it sends (`session.start`, microphone
frames, typed turns), what it makes of what it receives, and the measurement of every turn. The
asyncio client (`client.py`) and the Locust user (`locustfile.py`) only move bytes and sleep.

Times are `time.monotonic()` seconds, taken by the driver when a frame was sent or arrived.

A turn's latency runs from the moment the last speech frame of the utterance was handed to the
socket (a typed turn: the `input.text`) to the arrival of the first binary audio frame of the reply.
A *gap* is the reply's audio falling behind real-time playback: a player starts at the first frame
and plays on; when a frame arrives more than `gap_threshold` seconds after the audio received so far
would have finished playing, that is one gap of that length (the player then resumes from there).
Durations of received audio are those of the decoded audio, whatever the codec: PCM16 and mu-law
from their length, Opus from each packet's TOC byte (no decoding in the load generator).

Bytes on the wire are counted both ways (`bytes_out`, `bytes_in`: audio payloads as encoded;
`text_out`, `text_in`: the JSON messages).
"""

from __future__ import annotations

import dataclasses
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import orjson

from protocol.messages import DEFAULT_CLIENT_OUTPUT_RATE, MAX_PENDING, PROTOCOL_VERSION, decode_server_message

from ..client import opus_packet_ms
from .script import FRAME_S, Plan, Speech

REPLY_DONE = ("end_turn", "interrupted")


@dataclass
class TurnRecord:
    """One finished turn. `outcome`: `answered` (the reply ended), `early` (a reply came and ended
    before the utterance was all sent: the model heard a pause in it, e.g. while this client stalled;
    no latency), `cut` (the run ended while the reply was playing), `timeout` (no complete reply within
    the plan's turn timeout), `lost` (the connection went during the turn)."""

    session: int
    index: int
    kind: str                      # speech | text
    started_at: float              # first speech frame sent (typed: input.text sent)
    eos_at: float | None = None    # last speech frame sent (typed: input.text sent)
    first_audio_at: float | None = None
    ended_at: float | None = None  # response.audio.end with end_turn / interrupted
    outcome: str = "unfinished"
    audio_bytes: int = 0           # the reply's audio frames as received (encoded)
    audio_seconds: float = 0.0     # ... and how long they play, decoded
    gaps: int = 0
    gap_total: float = 0.0
    max_gap: float = 0.0

    @property
    def latency(self) -> float | None:
        """End of speech (or the typed turn) to the first audio of the reply, seconds."""
        if self.first_audio_at is None or self.eos_at is None:
            return None
        return self.first_audio_at - self.eos_at


class Turn:
    """The live measurement of one turn."""

    def __init__(self, session: int, index: int, kind: str, now: float, *, output_rate: int,
                 gap_threshold: float):
        self.record = TurnRecord(session, index, kind, now)
        self.bytes_per_s = 2 * output_rate
        self.gap_threshold = gap_threshold
        self._play_start: float | None = None
        self.speech_sent = False  # every frame of the utterance handed to the socket

    @property
    def done(self) -> bool:
        return self.record.ended_at is not None

    def speech_ended(self, now: float) -> None:
        if self.record.eos_at is None:
            self.record.eos_at = now

    def audio(self, now: float, nbytes: int, seconds: float | None = None) -> None:
        """A frame of `nbytes` arrived, playing `seconds` (default: PCM16 at the output rate)."""
        r = self.record
        if self._play_start is None:
            r.first_audio_at = self._play_start = now
        else:
            behind = now - (self._play_start + r.audio_seconds)
            if behind > self.gap_threshold:
                r.gaps += 1
                r.gap_total += behind
                r.max_gap = max(r.max_gap, behind)
                self._play_start += behind  # the player stalled, and goes on from here
        r.audio_bytes += nbytes
        r.audio_seconds += nbytes / self.bytes_per_s if seconds is None else seconds

    def audio_end(self, reason: str, now: float) -> None:
        if reason in REPLY_DONE and self.record.ended_at is None:
            self.record.ended_at = now

    def played_out_at(self, now: float) -> float:
        """When the last audio received for the reply finishes playing."""
        if self._play_start is None:
            return now
        return self._play_start + self.record.audio_seconds

    def deadline(self, timeout: float) -> float | None:
        """Past this with no complete reply, the turn timed out (None while speech is still going out)."""
        base = self.record.eos_at
        return None if base is None else base + timeout


class UserState:
    """One user's conversation: resume token, receipts not yet saved, the microphone queue, the
    current turn, and counters of what the server said."""

    def __init__(self, index: int, speech: Speech, plan: Plan, *, output_rate: int = DEFAULT_CLIENT_OUTPUT_RATE,
                 gap_threshold: float = 0.1, voice: str | None = None, output_codec: str | None = None):
        self.index = index
        self.speech = speech
        self.plan = plan
        self.output_rate = output_rate
        self.input_codec = speech.codec
        self.output_codec = output_codec or speech.codec
        self.gap_threshold = gap_threshold
        self.voice = voice
        self.resume_token: str | None = None
        self.conversation_id: str | None = None
        self.pending: dict[str, str] = {}  # item_id -> receipt, until item.saved
        self.ready: dict | None = None
        self.turn: Turn | None = None
        self.turns_started = 0
        self.errors: Counter[str] = Counter()          # error messages by code
        self.notice: dict | None = None                # session.reconnect on this connection
        self.interruptions = 0
        self.bytes_in = 0       # audio frames received, as encoded
        self.bytes_out = 0      # audio frames sent, as encoded
        self.frames_out = 0     # 20 ms each
        self.seconds_in = 0.0   # the received audio's duration, decoded
        self.text_in = 0        # JSON messages, bytes
        self.text_out = 0
        self.stray_audio = 0  # bytes of audio that arrived outside any turn
        self.stray_seconds = 0.0
        self._mic: deque[tuple[bytes, bool, bool]] = deque()  # (frame, last speech frame, last frame)
        self._sending: tuple[bool, bool, int] = (False, False, 0)
        self._mic_turn: Turn | None = None

    # -- connection -------------------------------------------------------------------------------
    def session_start(self, *, auth: str | None = None) -> str:
        """`session.start` for a new connection: resume token and unsaved receipts when there are some."""
        audio: dict[str, Any] = {"input_sample_rate": self.speech.rate, "output_sample_rate": self.output_rate}
        if self.input_codec != "pcm16" or self.output_codec != "pcm16":
            audio |= {"input_codec": self.input_codec, "output_codec": self.output_codec}
        start: dict[str, Any] = {"type": "session.start", "protocol": PROTOCOL_VERSION, "audio": audio}
        if auth:
            start["auth"] = auth
        if self.voice:
            start["voice"] = self.voice
        if self.resume_token:
            start["resume"] = self.resume_token
        if self.pending:
            start["pending"] = list(self.pending.values())[:MAX_PENDING]
        self.notice = None
        self.ready = None
        text = orjson.dumps(start).decode()
        self.text_out += len(text)
        return text

    # -- receiving --------------------------------------------------------------------------------
    def on_message(self, data: str | bytes, now: float) -> dict:
        self.text_in += len(data.encode()) if isinstance(data, str) else len(data)
        msg = decode_server_message(data)
        t = msg.get("type")
        turn = self.turn
        if t == "response.audio.end":
            if turn is not None:
                turn.audio_end(msg.get("reason", ""), now)
        elif t == "transcript":
            if msg.get("final") and msg.get("receipt") and msg.get("item_id"):
                self.pending[msg["item_id"]] = msg["receipt"]
        elif t == "item.saved":
            self.pending.pop(msg.get("item_id"), None)
        elif t == "error":
            self.errors[str(msg.get("code"))] += 1
        elif t == "interrupted":
            self.interruptions += 1
        elif t == "session.ready":
            self.ready = msg
            audio = msg.get("audio") or {}
            if (audio.get("input_codec", "pcm16"), audio.get("output_codec", "pcm16")) != (
                    self.input_codec, self.output_codec):
                self.errors["codec_not_confirmed"] += 1  # the gateway ignored the codecs: its audio is not ours
            self.resume_token = msg.get("resume_token")
            self.conversation_id = msg.get("conversation_id")
        elif t == "session.updated":
            self.resume_token = msg.get("resume_token") or self.resume_token
            self.conversation_id = msg.get("conversation_id") or self.conversation_id
        elif t == "session.reconnect":
            self.notice = msg
        return msg

    def audio_seconds(self, nbytes: int, frame: bytes | None = None) -> float:
        """How long a received frame plays, decoded: PCM16 2 bytes a sample, mu-law 1, Opus from its
        TOC byte (a 20 ms packet when the frame is not given)."""
        if self.output_codec == "opus":
            return opus_packet_ms(frame) / 1000 if frame is not None else FRAME_S
        return nbytes / ((1 if self.output_codec == "mulaw" else 2) * self.output_rate)

    def on_audio(self, nbytes: int, now: float, frame: bytes | None = None) -> None:
        seconds = self.audio_seconds(nbytes, frame)
        self.bytes_in += nbytes
        self.seconds_in += seconds
        if self.turn is not None and not self.turn.done:
            self.turn.audio(now, nbytes, seconds)
        else:
            self.stray_audio += nbytes
            self.stray_seconds += seconds

    # -- turns ------------------------------------------------------------------------------------
    def begin_turn(self, now: float) -> Turn:
        """The next turn of the plan. Speech: its frames are queued for the microphone. Typed: the
        driver sends `text_message()` and calls `turn.speech_ended(now)` once it is sent."""
        self.turns_started += 1
        kind = self.plan.kind(self.turns_started)
        turn = Turn(self.index, self.turns_started, kind, now, output_rate=self.output_rate,
                    gap_threshold=self.gap_threshold)
        self.turn = turn
        if kind == "speech":
            frames = self.speech.wire_frames
            last = len(frames) - 1
            self._mic.extend((f, i == self.speech.last_speech, i == last) for i, f in enumerate(frames))
            self._mic_turn = turn
        return turn

    def text_message(self) -> str:
        text = orjson.dumps({"type": "input.text", "text": self.plan.text}).decode()
        self.text_out += len(text)
        return text

    def end_turn(self, outcome: str) -> TurnRecord:
        """Close the current turn's measurement with `outcome` (see TurnRecord)."""
        turn, self.turn = self.turn, None
        assert turn is not None
        if outcome == "stopped":  # the run ended: a reply under way still has its latency
            outcome = "cut" if turn.record.first_audio_at is not None else "unfinished"
        elif outcome == "answered" and turn.record.eos_at is None:
            outcome = "early"
        turn.record.outcome = outcome
        if self._mic_turn is turn:
            self.drop_speech()
        return turn.record

    def status(self, now: float) -> str:
        """The current turn: `waiting`, `done` (the reply ended) or `timeout`."""
        turn = self.turn
        if turn is None or turn.done:
            return "done"
        deadline = turn.deadline(self.plan.turn_timeout)
        return "timeout" if deadline is not None and now > deadline else "waiting"

    # -- microphone -------------------------------------------------------------------------------
    def mic_frame(self) -> bytes:
        """The next 20 ms frame to send: the utterance's, else silence (an open microphone)."""
        if self._mic:
            frame, last_speech, last = self._mic.popleft()
            self._sending = (last_speech, last, len(frame))
            return frame
        silence = self.speech.wire_silence
        self._sending = (False, False, len(silence))
        return silence

    def mic_sent(self, now: float) -> None:
        """The frame from `mic_frame()` was handed to the socket at `now`."""
        last_speech, last, nbytes = self._sending
        self.bytes_out += nbytes
        self.frames_out += 1
        turn = self._mic_turn
        if turn is not None:
            if last_speech:
                turn.speech_ended(now)
            if last:
                turn.speech_sent = True
                self._mic_turn = None

    def drop_speech(self) -> None:
        """The connection went (or the turn was given up): the rest of the utterance is not sent."""
        self._mic.clear()
        self._sending = (False, False, 0)
        self._mic_turn = None


@dataclass
class Totals:
    """Counters of many users' `UserState`s, small enough to send between processes."""

    received_bytes: int = 0      # reply audio as received (encoded)
    received_seconds: float = 0.0  # ... its duration, decoded
    sent_bytes: int = 0          # microphone audio as sent (encoded)
    sent_seconds: float = 0.0    # ... its duration (the microphone is always on: the time connected)
    text_received_bytes: int = 0  # JSON messages
    text_sent_bytes: int = 0
    stray_bytes: int = 0         # audio outside any turn
    stray_seconds: float = 0.0
    interruptions: int = 0
    errors: Counter[str] = field(default_factory=Counter)

    @classmethod
    def of(cls, states: list[UserState]) -> Totals:
        t = cls()
        for s in states:
            t.received_bytes += s.bytes_in
            t.received_seconds += s.seconds_in
            t.sent_bytes += s.bytes_out
            t.sent_seconds += s.frames_out * FRAME_S
            t.text_received_bytes += s.text_in
            t.text_sent_bytes += s.text_out
            t.stray_bytes += s.stray_audio
            t.stray_seconds += s.stray_seconds
            t.interruptions += s.interruptions
            t.errors.update(s.errors)
        return t

    def add(self, other: Totals) -> None:
        for f in dataclasses.fields(self):
            if f.name == "errors":
                self.errors.update(other.errors)
            else:
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


@dataclass
class Reconnect:
    kind: str            # planned (--reconnect-every) | server (session.reconnect / 1012)
    ok: bool
    seconds: float       # socket closed (or the notice) to session.ready on the new one
    resumed: bool = False
    failure: str = ""


@dataclass
class UserStats:
    """What the runner reads from one user, live and at the end."""

    index: int
    status: str = "pending"     # pending | connecting | up | reconnecting | done
    outcome: str = ""           # ok | refused | failed | dropped (closed by the server, not resumed)
    failure: str = ""           # why it did not connect / was dropped ("close 1013", "HTTP 503", ...)
    connect_seconds: float | None = None
    close_codes: Counter[int] = field(default_factory=Counter)  # server closes of live sessions
    reconnects: list[Reconnect] = field(default_factory=list)
    mic_late: int = 0
    mic_skipped: int = 0
    mic_max_lag: float = 0.0
