"""/v1/telephony/twilio end to end, with a scripted Twilio written from Twilio's published Media Streams
messages: `connected`, `start` (the caller as a custom parameter, the handshake signed with the Auth
Token), the caller's mu-law in 20 ms `media` messages in real time, marks echoed once the audio before
them has "played" (in real time, from when it arrived) and at once after a `clear`. On the local engine
(SQLite) and on the AWS path (the real Bedrock and Agent Runtime SDKs against the project's emulators):
a call, a barge-in, a hang-up and a call back that resumes the conversation; another caller's call;
refused signatures."""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import time

import httpx
import numpy as np
import orjson
import pytest
import soxr
import websockets
from twilio.request_validator import RequestValidator

from gateway import codecs
from gateway.local.policy import STORY as TOLD
from gateway.local.policy import _norm
from gateway.tokens import Signer, load_secret

from .conftest import DISCUSS, HELLO, MET, STORY, AwsStack, Gateway, speech

TOKEN = secrets.token_hex(16)  # the account's Auth Token, as Twilio's are: 32 hex digits
PUBLIC_URL = "wss://voice.example.test/v1/telephony/twilio"  # what the TwiML says; the gateway sits behind a proxy
FRAME = 160  # 20 ms of mu-law at 8 kHz
SILENCE = b"\xff" * FRAME  # mu-law's zero


# The phone is narrowband (8 kHz): the local engine hears it with whisper (pocketsphinx's 16 kHz model
# recognises nothing in telephone-band audio), so what the caller said is matched loosely ("Dr. Smith").
ASR = ("--asr", "whisper", "--tts", "espeak", "--endpoint-ms", "600")


def phone(text: str) -> bytes:
    """The caller's voice as a phone line carries it: scripted speech band-limited to 8 kHz PCM16."""
    return soxr.resample(np.frombuffer(speech(text, 16000), np.int16), 16000, 8000).astype(np.int16).tobytes()


@pytest.fixture(scope="module", params=["local", "aws"])
def backend(request, tmp_path_factory):
    if request.param == "local":
        yield {"NOVAGATE_LOCAL_ASR": "whisper", "NOVAGATE_LOCAL_GRAMMAR": ""}
        return
    stack = AwsStack(tmp_path_factory.mktemp("tw-aws"), engine_args=ASR).start()
    yield stack.gateway_env()
    stack.stop()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, backend):
    gw = Gateway(tmp_path_factory.mktemp("tw"), {**backend, "NOVAGATE_TWILIO_AUTH_TOKEN": TOKEN,
                                                 "NOVAGATE_TWILIO_PUBLIC_URL": PUBLIC_URL}).start()
    yield gw
    gw.stop()


def sign(url: str = PUBLIC_URL, token: str = TOKEN) -> str:
    return RequestValidator(token).compute_signature(url, {})


def new_number() -> str:
    return "+1555" + "".join(secrets.choice("0123456789") for _ in range(7))


def ulaw(pcm16: bytes) -> list[bytes]:
    """PCM16 at 8 kHz as 20 ms mu-law frames, as a phone line carries it."""
    encode = codecs.encoder("mulaw", 8000)
    pcm16 += bytes(-len(pcm16) % (2 * FRAME))
    return [encode(pcm16[i:i + 2 * FRAME]) for i in range(0, len(pcm16), 2 * FRAME)]


class Twilio:
    """One call as Twilio places it over a bidirectional Media Stream."""

    def __init__(self, gw: Gateway, caller: str | None, *, signature: str | None = None):
        self.gw = gw
        self.caller = caller
        self.signature = sign() if signature is None else signature
        self.stream_sid = "MZ" + secrets.token_hex(16)
        self.call_sid = "CA" + secrets.token_hex(16)
        self.to_say: list[bytes] = []  # mu-law frames waiting to be sent
        self.received: list[tuple[float, bytes]] = []  # (when it arrived, mu-law) of the gateway's media
        self.play_end = 0.0            # when what has arrived will have been played
        self.owed: list[tuple[float, str]] = []  # marks to echo: (when, name)
        self.marks_sent = self.marks_echoed = 0
        self.clears: list[float] = []
        self.played_at_clear: list[float] = []  # seconds of audio played when each clear came
        self.closed = asyncio.Event()
        self._changed = asyncio.Event()

    async def __aenter__(self) -> Twilio:
        self.ws = await websockets.connect(f"ws://127.0.0.1:{self.gw.port}/v1/telephony/twilio",
                                           additional_headers={"X-Twilio-Signature": self.signature})
        await self.send({"event": "connected", "protocol": "Call", "version": "1.0.0"})
        params = {"caller": self.caller} if self.caller else {}
        await self.send({"event": "start", "sequenceNumber": "1", "streamSid": self.stream_sid, "start": {
            "streamSid": self.stream_sid, "accountSid": "AC" + "0" * 32, "callSid": self.call_sid,
            "tracks": ["inbound"], "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            "customParameters": params}})
        self.tasks = [asyncio.create_task(t()) for t in (self._talk, self._listen, self._echo)]
        return self

    async def __aexit__(self, *exc) -> None:
        for t in self.tasks:
            t.cancel()
        await self.ws.close()

    async def send(self, msg: dict) -> None:
        await self.ws.send(orjson.dumps(msg).decode())

    async def _talk(self) -> None:
        """The caller's line: a 20 ms frame every 20 ms, speech when there is some, else silence."""
        chunk, t0 = 0, time.monotonic()
        while True:
            chunk += 1
            frame = self.to_say.pop(0) if self.to_say else SILENCE
            await self.send({"event": "media", "sequenceNumber": str(chunk + 1), "streamSid": self.stream_sid,
                             "media": {"track": "inbound", "chunk": str(chunk), "timestamp": str(chunk * 20),
                                       "payload": base64.b64encode(frame).decode()}})
            await asyncio.sleep(max(0.0, t0 + chunk * 0.02 - time.monotonic()))

    async def _listen(self) -> None:
        try:
            async for text in self.ws:
                msg, now = json.loads(text), time.monotonic()
                assert msg["streamSid"] == self.stream_sid, msg
                match msg["event"]:
                    case "media":
                        audio = base64.b64decode(msg["media"]["payload"])
                        self.received.append((now, audio))
                        self.play_end = max(self.play_end, now) + len(audio) / 8000
                    case "mark":
                        self.marks_sent += 1
                        self.owed.append((max(self.play_end, now), msg["mark"]["name"]))
                    case "clear":  # the unplayed audio is dropped; its marks come back at once
                        self.clears.append(now)
                        self.played_at_clear.append(self.played(now))
                        self.play_end = now
                        self.owed = [(now, name) for _, name in self.owed]
                    case other:
                        raise AssertionError(f"Twilio takes only media, mark and clear: got {other}")
                self._changed.set()
        except websockets.ConnectionClosed:
            pass
        finally:
            self.closed.set()
            self._changed.set()

    async def _echo(self) -> None:
        while True:
            now = time.monotonic()
            while self.owed and self.owed[0][0] <= now:
                _, name = self.owed.pop(0)
                self.marks_echoed += 1
                await self.send({"event": "mark", "sequenceNumber": "0", "streamSid": self.stream_sid,
                                 "mark": {"name": name}})
            await asyncio.sleep(0.01)

    def played(self, now: float) -> float:
        """Seconds of the gateway's audio the caller has heard by `now`."""
        total = sum(len(a) for _, a in self.received) / 8000
        return total - max(0.0, self.play_end - now)

    @property
    def audio_s(self) -> float:
        return sum(len(a) for _, a in self.received) / 8000

    def audio_since(self, t: float) -> bytes:
        return b"".join(a for at, a in self.received if at >= t)

    async def say(self, pcm16_8k: bytes) -> None:
        """Speak (in real time, then a second of silence) and return once it is said."""
        frames = ulaw(pcm16_8k) + [SILENCE] * 50
        self.to_say += frames
        while self.to_say:
            await asyncio.sleep(0.02)

    async def wait(self, check, timeout: float = 30.0):
        deadline = time.monotonic() + timeout
        while not (found := check()):
            left = deadline - time.monotonic()
            assert left > 0, f"timed out: {self.audio_s:.1f} s of audio, {len(self.clears)} clears"
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), min(left, 0.1))
            except TimeoutError:
                pass
        return found

    async def answered(self, since: float, seconds: float = 0.5, timeout: float = 40.0) -> bytes:
        """The assistant's answer: audio after `since` of more than `seconds`, once it has stopped (1 s quiet)."""
        await self.wait(lambda: len(self.audio_since(since)) > seconds * 8000, timeout)
        await self.wait(lambda: time.monotonic() - self.received[-1][0] > 1.0, timeout)
        return self.audio_since(since)

    async def hang_up(self) -> None:
        await self.send({"event": "stop", "sequenceNumber": "9", "streamSid": self.stream_sid,
                         "stop": {"accountSid": "AC" + "0" * 32, "callSid": self.call_sid}})
        await self.ws.close()


def ready_line(gw: Gateway, call_sid: str) -> dict:
    """The gateway's log line of this call's session: conversation_id, resumed."""
    for line in gw.logs().splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if entry.get("msg") == "twilio call ready" and entry.get("call_sid") == call_sid:
                return entry
    return {}


async def call_ready(gw: Gateway, call: Twilio) -> dict:
    return await call.wait(lambda: ready_line(gw, call.call_sid), 20)


async def history(gw: Gateway, conversation_id: str, caller: str) -> list[dict]:
    """The HTTP history API, with a resume token for the caller's conversation (minted with the server's
    secret: a phone has nowhere to keep one)."""
    signer = Signer(load_secret("", str(gw.tmp / "secret")))
    token = signer.resume_token(conversation_id, f"phone:{caller}")
    async with httpx.AsyncClient(base_url=gw.http) as h:
        r = await h.get(f"/v1/conversations/{conversation_id}/history", headers={"X-Resume-Token": token})
    return r.json()["history"] if r.status_code == 200 else []


async def stored(gw: Gateway, conversation_id: str, caller: str, check, timeout: float = 15.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while not check(items := await history(gw, conversation_id, caller)):
        assert time.monotonic() < deadline, f"not stored: {[(i['role'], i['text'][:40]) for i in items]}"
        await asyncio.sleep(0.2)
    return items


async def test_a_call_a_barge_in_a_hang_up_and_a_call_back(gateway):
    caller = new_number()
    async with Twilio(gateway, caller) as call:
        first = await call_ready(gateway, call)
        assert first["resumed"] is False
        cid = first["conversation_id"]
        t = time.monotonic()
        await call.say(phone(MET))
        answer = await call.answered(t)
        assert len(answer) > 8000 // 2  # more than half a second of mu-law: one byte per sample
        await call.wait(lambda: call.marks_echoed == call.marks_sent, 5)  # every mark came back, once played
        assert call.marks_sent >= 2
        items = await stored(gateway, cid, caller, lambda xs: len(xs) >= 2)
        assert items[0]["role"] == "user" and items[0]["text"] and items[1]["role"] == "assistant"
        said = items[0]["text"]  # what the model heard ("I met with Dr. Smith today at 2pm.")

        # barge-in: the caller speaks over a long answer
        t = time.monotonic()
        await call.say(phone(STORY))
        await call.wait(lambda: len(call.audio_since(t)) >= 3 * 8000, 40)  # 3 s of the story reached the phone
        before = sum(len(a) for at, a in call.received if at < t) / 8000  # played out before the story
        await call.say(phone(HELLO))
        await call.wait(lambda: call.clears, 20)
        assert call.played_at_clear[0] - before > 2.0  # the caller had heard more than 2 s of the story
        n = len(items)
        items = await stored(gateway, cid, caller, lambda xs: any(i["interrupted"] for i in xs[n:]))
        story = next(i for i in items[n:] if i["role"] == "assistant" and i["interrupted"])
        told = " ".join(TOLD)
        assert story["text"] and told.startswith(story["text"]) and len(story["text"]) < len(told) / 2
        # the caller's barge-in is a turn of its own
        await stored(gateway, cid, caller, lambda xs: any(i["role"] == "user" and "hello" in i["text"].lower()
                                                          for i in xs[n:]))
        await call.hang_up()

    # the same caller calls back: the conversation goes on, with what was said in the first call
    async with Twilio(gateway, caller) as again:
        second = await call_ready(gateway, again)
        assert second["resumed"] is True and second["conversation_id"] == cid
        n = len(await history(gateway, cid, caller))
        t = time.monotonic()
        await again.say(phone(DISCUSS))
        await again.answered(t)
        items = await stored(gateway, cid, caller, lambda xs: len(xs) >= n + 2 and xs[-1]["role"] == "assistant")
        recap = _norm(items[-1]["text"])  # the local engine recalls the caller's last three turns
        assert "discuss" in items[-2]["text"].lower() and _norm(said) in recap and "story" in recap
        await again.hang_up()


async def test_another_caller_gets_a_conversation_of_their_own(gateway):
    one, two = new_number(), new_number()
    async with Twilio(gateway, one) as call:
        cid = (await call_ready(gateway, call))["conversation_id"]
        t = time.monotonic()
        await call.say(phone(MET))
        await call.answered(t)
        await stored(gateway, cid, one, lambda xs: len(xs) >= 2)
        await call.hang_up()
    async with Twilio(gateway, two) as other:
        line = await call_ready(gateway, other)
        assert line["resumed"] is False and line["conversation_id"] != cid
        t = time.monotonic()
        await other.say(phone(DISCUSS))
        await other.answered(t)
        items = await stored(gateway, line["conversation_id"], two, lambda xs: len(xs) >= 2)
        assert "discuss" in items[0]["text"].lower() and "smith" not in items[1]["text"].lower()
        await other.hang_up()
    # a call without a caller id is nobody's: never resumed
    async with Twilio(gateway, None) as anonymous:
        line = await call_ready(gateway, anonymous)
        assert line["resumed"] is False and line["conversation_id"] not in (cid, "")


@pytest.mark.parametrize("signature", ["", "bad", sign("wss://127.0.0.1/v1/telephony/twilio"), sign(token="0" * 32)],
                         ids=["missing", "garbage", "another-url", "another-token"])
async def test_a_handshake_without_twilios_signature_is_refused(gateway, signature):
    with pytest.raises(websockets.InvalidStatus) as refused:
        async with Twilio(gateway, new_number(), signature=signature):
            pass
    assert refused.value.response.status_code == 403
    assert "twilio handshake refused: bad or missing X-Twilio-Signature" in gateway.logs()


async def test_without_an_auth_token_the_endpoint_is_not_served(tmp_path):
    gw = Gateway(tmp_path, {}).start()
    try:
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with Twilio(gw, new_number()):
                pass
        assert refused.value.response.status_code == 403
    finally:
        gw.stop()


@pytest.mark.parametrize("first, code", [
    ({"event": "media", "media": {"payload": "/w=="}}, 4400),  # audio before start
    ({"event": "start", "start": {"streamSid": "MZ1", "callSid": "CA1", "accountSid": "AC1",
                                  "mediaFormat": {"encoding": "audio/x-l16", "sampleRate": 16000, "channels": 1}}}, 4400),
    (None, 4408),  # nothing: the handshake times out (NOVAGATE_HANDSHAKE_TIMEOUT, 1.5 s in the tests)
])
async def test_a_signed_stream_that_does_not_start_properly_is_closed(gateway, first, code):
    url = f"ws://127.0.0.1:{gateway.port}/v1/telephony/twilio"
    async with websockets.connect(url, additional_headers={"X-Twilio-Signature": sign()}) as ws:
        await ws.send(orjson.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}).decode())
        if first is not None:
            await ws.send(orjson.dumps(first).decode())
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 5)
    assert ws.close_code == code


async def test_mu_law_is_heard_as_well_as_pcm_on_the_native_socket(gateway):
    """The same sentence through /v1/voice, as full-band PCM16 at 16 kHz and as a phone line's G.711
    mu-law at 8 kHz (the `mulaw` codec): the model hears it about as well (whisper, which knows
    telephone-band speech; words compared loosely, it may spell "Dr. Smith" either way)."""
    import re

    from gateway.client import VoiceClient

    def words(text: str) -> set[str]:
        return set(re.findall(r"[a-z0-9]+", text.lower()))

    heard = {}
    for name, kw, pcm in (("pcm16", {}, speech(MET, 16000)),
                          ("mulaw", {"codec": "mulaw", "input_rate": 8000}, phone(MET))):
        async with VoiceClient(gateway.ws, **kw) as c:
            turn = await c.turn(pcm, timeout=60)
            assert c.ready["audio"]["input_codec"] == kw.get("codec", "pcm16")
        heard[name] = words(turn["user"])
    assert len(heard["pcm16"]) >= 4 and {"met", "today"} <= heard["pcm16"]
    assert len(heard["mulaw"] & heard["pcm16"]) >= 0.6 * len(heard["pcm16"]), heard
