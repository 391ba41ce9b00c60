"""/v1/realtime end to end with the official `openai` SDK, unmodified: `AsyncOpenAI(base_url=...)`,
`client.realtime.connect(...)`. On the local engine (SQLite) and on the AWS path (the real Bedrock and
Agent Runtime SDKs against the project's emulators): a spoken turn, a typed turn, a barge-in with
truncate, a client-side function call, a resume on a second server process after kill -9, and a drain
made transparent by the SDK's own reconnect hook."""

from __future__ import annotations

import asyncio
import base64
import json
import time

import httpx
import pytest
from openai import AsyncOpenAI

from gateway.local.policy import STORY as TOLD

from .conftest import DISCUSS, FOLLOW_UP, GRAMMAR, HELLO, MET, STORY, AwsStack, Gateway, speech

RATE = 24000
CHUNK = RATE * 2 // 10  # 100 ms of 24 kHz PCM16 per append
TOOL = {"type": "function", "name": "schedule_visit", "description": "Book a follow-up visit.",
        "parameters": {"type": "object", "properties": {"when": {"type": "string"}}, "required": ["when"]}}
RULES = [{"phrase": "follow up appointment", "tool": "schedule_visit", "arguments": {"when": "next tuesday"}}]
SESSION = {"type": "realtime", "instructions": "You are a friendly assistant for a sales team.",
           "audio": {"input": {"transcription": {"model": "whisper-1"},
                               "turn_detection": {"type": "server_vad", "silence_duration_ms": 500}},
                     "output": {"voice": "marin"}},
           "tools": [TOOL]}


@pytest.fixture(scope="module", params=["local", "aws"])
def backend(request, tmp_path_factory):
    """The gateway's model and store: the local engine and SQLite, or the AWS stand-ins (the emulator's
    engine told to call `schedule_visit` when the user asks for a follow-up)."""
    if request.param == "local":
        yield {"NOVAGATE_ENGINE_TOOL_CALLS": json.dumps(RULES)}
        return
    stack = AwsStack(tmp_path_factory.mktemp("rt-aws"), engine_args=(
        *AwsStack.engine_args, "--tool-calls", json.dumps(RULES))).start()
    yield stack.gateway_env()
    stack.stop()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, backend):
    gw = Gateway(tmp_path_factory.mktemp("rt"), dict(backend)).start()
    yield gw
    gw.stop()


def openai_client(gw: Gateway) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=gw.http + "/v1", api_key="sk-not-checked-without-an-identity-provider")


class Events:
    """Every server event of a connection, with waits on them (the SDK's typed models)."""

    def __init__(self, conn):
        self.conn = conn
        self.all: list = []
        self.audio: dict[str, bytearray] = {}
        self._new = asyncio.Event()
        self._task = asyncio.create_task(self._read())

    async def _read(self):
        async for ev in self.conn:
            if ev.type == "response.output_audio.delta":
                self.audio.setdefault(ev.item_id, bytearray()).extend(base64.b64decode(ev.delta))
            self.all.append(ev)
            self._new.set()

    def of(self, kind: str) -> list:
        return [e for e in self.all if e.type == kind]

    async def wait(self, check, timeout: float = 30.0):
        deadline = time.monotonic() + timeout
        while not (found := check()):
            if self._task.done():
                self._task.result()
                raise AssertionError("the connection ended")
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out; last events: {[e.type for e in self.all[-15:]]}")
            self._new.clear()
            try:
                await asyncio.wait_for(self._new.wait(), left)
            except TimeoutError:
                pass
        return found

    async def next(self, kind: str, after: int = 0, timeout: float = 30.0, **match):
        """The first event of `kind` at index >= `after` whose fields match."""
        def find():
            return next((e for e in self.all[after:] if e.type == kind
                         and all(getattr(e, k, None) == v for k, v in match.items())), None)
        return await self.wait(find, timeout)

    def close(self):
        self._task.cancel()


async def say(conn, pcm: bytes, speed: float = 1.0) -> None:
    """Speech in 100 ms appends, at `speed` x real time, then a second of silence."""
    pcm += bytes(RATE * 2)
    for i in range(0, len(pcm), CHUNK):
        await conn.input_audio_buffer.append(audio=base64.b64encode(pcm[i:i + CHUNK]).decode())
        await asyncio.sleep(0.1 / speed)


async def typed(conn, text: str) -> None:
    await conn.conversation.item.create(item={"type": "message", "role": "user",
                                              "content": [{"type": "input_text", "text": text}]})
    await conn.response.create()


async def history(gw: Gateway, novagate: dict) -> list[dict]:
    async with httpx.AsyncClient(base_url=gw.http) as h:
        r = await h.get(f"/v1/conversations/{novagate['conversation_id']}/history",
                        headers={"X-Resume-Token": novagate["resume_token"]})
    return r.json()["history"] if r.status_code == 200 else []


async def stored(gw: Gateway, novagate: dict, n: int, timeout: float = 15.0) -> list[dict]:
    """The history once it holds `n` items (stores write behind the conversation)."""
    deadline = time.monotonic() + timeout
    while len(items := await history(gw, novagate)) < n and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    return items


async def test_a_spoken_turn_audio_in_transcript_and_audio_out(gateway):
    async with openai_client(gateway).realtime.connect(model="gpt-realtime") as conn:
        ev = Events(conn)
        await conn.session.update(session=SESSION)
        created = await ev.next("session.created")
        updated = await ev.next("session.updated")
        assert updated.session.instructions == SESSION["instructions"] and updated.session.tools[0].name == TOOL["name"]
        novagate = created.session.model_extra["novagate"]
        assert novagate["conversation_id"] and novagate["resume_token"] and novagate["resumed"] is False
        await say(conn, speech(HELLO, RATE))
        done = await ev.next("response.done", timeout=40)
        started = ev.of("input_audio_buffer.speech_started")[0]
        committed = ev.of("input_audio_buffer.committed")[0]
        stopped = ev.of("input_audio_buffer.speech_stopped")[0]
        assert started.item_id == stopped.item_id == committed.item_id
        heard = ev.of("conversation.item.input_audio_transcription.completed")[0]
        assert heard.item_id == committed.item_id and heard.transcript == HELLO
        order = [e.type for e in ev.all]
        assert order.index("input_audio_buffer.committed") < order.index("response.created") < order.index("response.done")
        assert done.response.status == "completed" and done.response.usage.output_tokens > 0
        (item,) = done.response.output
        said = ev.of("response.output_audio_transcript.done")[0].transcript
        assert item.content[0].transcript == said and "hello" in said.lower()
        assert "".join(d.delta for d in ev.of("response.output_audio_transcript.delta")) == said
        assert len(ev.audio[item.id]) > RATE * 2 // 2  # more than half a second of 24 kHz speech
        ev.close()
    items = await stored(gateway, novagate, 2)
    assert [(i["role"], i["text"]) for i in items] == [("user", HELLO), ("assistant", said)]


def opened_with(gw: Gateway, instructions: str) -> list[dict]:
    """The promptStart of every model stream whose system prompt was `instructions` (engine trace)."""
    lines = [json.loads(x) for x in gw.trace.read_text().splitlines()]
    streams = {x["stream"] for x in lines if x["event"] == "textInput" and x.get("role") == "SYSTEM"
               and x.get("content") == instructions}
    return [x for x in lines if x["event"] == "promptStart" and x["stream"] in streams]


async def test_a_typed_turn(gateway):
    instructions = f"You answer typed turns. ({time.monotonic()})"
    async with openai_client(gateway).realtime.connect(model="gpt-realtime") as conn:
        ev = Events(conn)
        await conn.session.update(session={**SESSION, "instructions": instructions, "audio": {"output": {"voice": "ash"}},
                                           "tool_choice": {"type": "function", "name": "schedule_visit"}})
        await typed(conn, MET)
        added = await ev.next("conversation.item.added")
        assert added.item.role == "user" and added.item.content[0].text == MET
        done = await ev.next("response.done", timeout=40)
        assert done.response.status == "completed"
        answer = done.response.output[0].content[0].transcript
        assert answer and not ev.of("conversation.item.input_audio_transcription.completed")
        novagate = ev.of("session.created")[0].session.model_extra["novagate"]
        ev.close()
    items = await stored(gateway, novagate, 2)
    assert items[0]["item_id"] == added.item.id and items[0]["text"] == MET
    # the client's settings reached the model, in the one stream the session opened
    (prompt,) = opened_with(gateway, instructions)
    assert prompt["voice"] == "matthew" and prompt["tools"] == ["schedule_visit"]
    assert prompt["toolChoice"] == {"tool": {"name": "schedule_visit"}}


async def test_barge_in_then_truncate_keeps_what_was_heard(gateway):
    async with openai_client(gateway).realtime.connect(model="gpt-realtime") as conn:
        ev = Events(conn)
        await conn.session.update(session=SESSION)
        await typed(conn, STORY)
        part = await ev.next("response.content_part.added", timeout=40)
        story = part.item_id
        await ev.wait(lambda: len(ev.audio.get(story, b"")) >= 2 * 2 * RATE, 30)  # 2 s of the story reached us
        mark = len(ev.all)
        await say(conn, speech(HELLO, RATE))
        await ev.next("input_audio_buffer.speech_started", after=mark, timeout=20)
        cancelled = await ev.next("response.done", after=mark, timeout=20)
        assert cancelled.response.status == "cancelled"
        assert cancelled.response.status_details.reason == "turn_detected"
        assert cancelled.response.output[0].id == story and cancelled.response.output[0].status == "incomplete"
        played_ms = len(ev.audio[story]) * 1000 // (2 * RATE)  # all that arrived "played"
        await conn.conversation.item.truncate(item_id=story, content_index=0, audio_end_ms=played_ms)
        truncated = await ev.next("conversation.item.truncated", after=mark)
        assert truncated.item_id == story and truncated.audio_end_ms == played_ms
        # the user's barge-in is a turn of its own, answered
        await ev.next("conversation.item.input_audio_transcription.completed", after=mark, timeout=30,
                      transcript=HELLO)
        novagate = ev.of("session.created")[0].session.model_extra["novagate"]
        full = ev.of("response.output_audio_transcript.done")[0].transcript
        ev.close()
    deadline = time.monotonic() + 15
    while not (kept := [i for i in await history(gateway, novagate) if i["item_id"] == story]):
        assert time.monotonic() < deadline, "the cut story was not stored"
        await asyncio.sleep(0.2)
    (item,) = kept
    told = " ".join(TOLD)
    assert item["interrupted"] is True and item["text"] and told.startswith(item["text"])
    assert len(item["text"]) < len(told) / 2 and full.startswith(item["text"])  # kept: what was heard


async def test_a_client_side_function_call_round_trip(gateway):
    async with openai_client(gateway).realtime.connect(model="gpt-realtime") as conn:
        ev = Events(conn)
        await conn.session.update(session=SESSION)
        await say(conn, speech(FOLLOW_UP, RATE))
        call = await ev.next("response.function_call_arguments.done", timeout=40)
        assert call.name == "schedule_visit" and json.loads(call.arguments) == {"when": "next tuesday"}
        first = await ev.next("response.done", timeout=20)
        assert [o.type for o in first.response.output][-1] == "function_call"
        mark = len(ev.all)
        await conn.conversation.item.create(item={"type": "function_call_output", "call_id": call.call_id,
                                                  "output": json.dumps({"booked": "Tuesday 10:00"})})
        await conn.response.create()
        answer = await ev.next("response.done", after=mark, timeout=40)
        said = answer.response.output[0].content[0].transcript
        assert answer.response.status == "completed" and "Tuesday 10:00" in said
        # the same call answered twice: an error, the conversation goes on
        await conn.conversation.item.create(item={"type": "function_call_output", "call_id": call.call_id,
                                                  "output": "again"})
        err = await ev.next("error", after=mark)
        assert err.error.param == "item.call_id"
        novagate = ev.of("session.created")[0].session.model_extra["novagate"]
        ev.close()
    items = await stored(gateway, novagate, 4)  # user, "one moment", the tool call, the answer
    tool = next(i for i in items if i["role"] == "tool")
    assert json.loads(tool["text"])["result"] == {"booked": "Tuesday 10:00"}


async def test_resume_on_a_second_process_after_kill_9(tmp_path, backend):
    """The history reaches the new process's model stream before any new audio, and the model uses it."""
    first = Gateway(tmp_path, dict(backend)).start()
    try:
        async with openai_client(first).realtime.connect(model="gpt-realtime") as conn:
            ev = Events(conn)
            await conn.session.update(session=SESSION)
            await typed(conn, MET)
            await ev.next("response.done", timeout=40)
            novagate = ev.of("session.created")[0].session.model_extra["novagate"]
            assert len(await stored(first, novagate, 2)) == 2  # both items stored before the process dies
            first.kill()  # SIGKILL: no drain, no goodbye
            ev.close()
    finally:
        first.kill()
    second = Gateway(tmp_path, dict(backend)).start()
    try:
        client = openai_client(second)
        async with client.realtime.connect(model="gpt-realtime", extra_query={"resume": novagate["resume_token"]}) as conn:
            ev = Events(conn)
            await conn.session.update(session=SESSION)
            created = await ev.next("session.created")
            again = created.session.model_extra["novagate"]
            assert again["resumed"] is True and again["conversation_id"] == novagate["conversation_id"]
            assert [i["text"] for i in again["history"]][:1] == [MET]
            await typed(conn, DISCUSS)
            done = await ev.next("response.done", timeout=40)
            recap = done.response.output[0].content[0].transcript.lower()
            assert "smith" in recap  # the model was told the history before this turn
            ev.close()
        # the other way to resume: the token in the first session.update, as the socket opens
        async with client.realtime.connect(model="gpt-realtime") as conn:
            ev = Events(conn)
            await conn.session.update(session={**SESSION, "novagate": {"resume": novagate["resume_token"]}})
            created = await ev.next("session.created")
            assert created.session.model_extra["novagate"]["resumed"] is True
            assert created.session.model_extra["novagate"]["history_length"] == 4
            ev.close()
    finally:
        second.stop()


async def test_a_drain_is_transparent_with_the_sdks_reconnect_hook(tmp_path, backend):
    """SIGTERM: the session is closed 1012; the SDK reconnects (here to the restarted server on the same
    address) with the resume token its hook returns, and the conversation goes on where it was."""
    first = Gateway(tmp_path, dict(backend)).start()
    second = None
    token: list[str] = []
    hooked: list[int] = []

    def on_reconnecting(event):
        hooked.append(event.close_code)
        return {"extra_query": {"resume": token[-1]}}

    try:
        client = openai_client(first)
        async with client.realtime.connect(model="gpt-realtime", on_reconnecting=on_reconnecting) as conn:
            ev = Events(conn)
            await conn.session.update(session=SESSION)
            created = await ev.next("session.created")
            token.append(created.session.model_extra["novagate"]["resume_token"])
            await typed(conn, MET)
            await ev.next("response.done", timeout=40)
            mark = len(ev.all)
            first.stop()  # SIGTERM: drain, close 1012, exit
            second = Gateway(tmp_path, dict(backend)).start(port=first.port)
            again = await ev.next("session.created", after=mark, timeout=60)
            assert hooked and hooked[0] == 1012
            resumed = again.session.model_extra["novagate"]
            assert resumed["resumed"] is True and resumed["conversation_id"] == created.session.model_extra[
                "novagate"]["conversation_id"]
            await conn.session.update(session=SESSION)  # a new connection: the client's settings again
            await typed(conn, DISCUSS)
            done = await ev.next("response.done", after=mark, timeout=40)
            assert "smith" in done.response.output[0].content[0].transcript.lower()
            ev.close()
    finally:
        first.kill()
        if second is not None:
            second.stop()


async def test_the_api_key_is_the_bearer_token_when_an_identity_provider_is_configured(tmp_path):
    """Without an identity provider the SDK's api_key is no credential (every test above); with one, it
    must be a valid token: the session belongs to that user, and a wrong key is refused 4401."""
    import jwt
    from websockets.exceptions import ConnectionClosedError

    key = "realtime-auth-test-key-0123456789abcdef"
    gw = Gateway(tmp_path, {"NOVAGATE_AUTH_JWT_SECRET": key, "NOVAGATE_AUTH_REQUIRED": "true"}).start()
    try:
        alice = jwt.encode({"sub": "alice", "exp": int(time.time()) + 600}, key, algorithm="HS256")
        client = AsyncOpenAI(base_url=gw.http + "/v1", api_key=alice)
        async with client.realtime.connect(model="gpt-realtime") as conn:
            ev = Events(conn)
            await typed(conn, HELLO)
            assert (await ev.next("response.done", timeout=40)).response.status == "completed"
            novagate = ev.of("session.created")[0].session.model_extra["novagate"]
            ev.close()
        async with httpx.AsyncClient(base_url=gw.http) as h:  # alice's conversation, with alice's token
            r = await h.get(f"/v1/conversations/{novagate['conversation_id']}/history",
                            headers={"Authorization": f"Bearer {alice}"})
        assert r.status_code == 200 and r.json()["history"][0]["text"] == HELLO
        with pytest.raises(ConnectionClosedError) as refused:
            async with AsyncOpenAI(base_url=gw.http + "/v1", api_key="sk-not-a-token").realtime.connect(
                    model="gpt-realtime") as conn:
                async for _ in conn:
                    pass
        assert refused.value.rcvd.code == 4401
    finally:
        gw.stop()


async def test_the_gateways_own_tools_work_beside_the_clients(tmp_path):
    """A server tool (NOVAGATE_TOOLS) runs in the gateway, unseen by the realtime client; a client tool
    of the same session is still the client's to answer; a client tool may not take a server tool's name."""
    rules = [*RULES, {"phrase": "doctor smith", "tool": "add_visit", "arguments": {"doctor": "Dr. Smith"}}]
    gw = Gateway(tmp_path, {"NOVAGATE_ENGINE_TOOL_CALLS": json.dumps(rules),
                            "NOVAGATE_TOOLS": "tests.tools_fixture:TOOLS"}).start()
    try:
        async with openai_client(gw).realtime.connect(model="gpt-realtime") as conn:
            ev = Events(conn)
            await conn.session.update(session={**SESSION, "tools": [TOOL, {**TOOL, "name": "echo"}]})
            err = await ev.next("error")
            assert err.error.param == "session.tools[1].name"  # echo is the gateway's; schedule_visit is kept
            updated = await ev.next("session.updated")
            assert [t.name for t in updated.session.tools] == ["schedule_visit"]
            await typed(conn, MET)
            answer = await ev.wait(lambda: next((e for e in ev.of("response.done")
                                                 if "add_visit" in e.response.output[0].content[0].transcript), None), 40)
            assert answer.response.status == "completed"
            assert not ev.of("response.function_call_arguments.done")  # the gateway answered it
            mark = len(ev.all)
            await typed(conn, FOLLOW_UP)
            call = await ev.next("response.function_call_arguments.done", after=mark, timeout=40)
            assert call.name == "schedule_visit"
            await conn.conversation.item.create(item={"type": "function_call_output", "call_id": call.call_id,
                                                      "output": "booked for Tuesday"})  # plain text
            done = await ev.wait(lambda: next((e for e in ev.all[mark:] if e.type == "response.done"
                                               and "booked for Tuesday" in e.response.output[0].content[0].transcript),
                                              None), 40)
            assert done.response.status == "completed"
            novagate = ev.of("session.created")[0].session.model_extra["novagate"]
            ev.close()
        tools = [json.loads(i["text"]) for i in await stored(gw, novagate, 8) if i["role"] == "tool"]
        assert [(t["name"], t["status"]) for t in tools] == [("add_visit", "finished"), ("schedule_visit", "finished")]
        assert tools[1]["result"] == "booked for Tuesday"  # plain text, kept as a JSON string
    finally:
        gw.stop()


async def test_g711_mu_law_both_ways(gateway):
    """audio/pcmu, chosen in the first session.update: the caller's mu-law reaches the model as 16 kHz
    PCM of the same length, and the answer comes back as mu-law at 8 kHz, one byte per sample. (The test
    engine's recogniser does not know 8 kHz speech: tests/test_codecs_e2e.py checks transcripts with
    one that does.)"""
    from gateway import codecs

    instructions = f"You answer on the telephone. ({time.monotonic()})"
    ulaw = codecs.encoder("mulaw", 8000)(speech(HELLO, 8000))
    async with openai_client(gateway).realtime.connect(model="gpt-realtime") as conn:
        ev = Events(conn)
        await conn.session.update(session={**SESSION, "instructions": instructions, "audio": {
            "input": {"format": {"type": "audio/pcmu"}}, "output": {"format": {"type": "audio/pcmu"}}}})
        updated = await ev.next("session.updated")
        assert updated.session.audio.input.format.type == updated.session.audio.output.format.type == "audio/pcmu"
        for i in range(0, len(ulaw), 800):  # 100 ms appends, in real time
            await conn.input_audio_buffer.append(audio=base64.b64encode(ulaw[i:i + 800]).decode())
            await asyncio.sleep(0.1)
        await typed(conn, MET)
        done = await ev.wait(lambda: next((e for e in ev.of("response.done") if e.response.status == "completed"),
                                          None), 40)
        reply = bytes(ev.audio[done.response.output[0].id])
        decode, rate = codecs.decoder("mulaw")
        assert rate == 8000 and len(decode(reply)) == 2 * len(reply)  # one byte per sample
        assert len(reply) > 8000 // 2  # more than half a second
        ev.close()
    (prompt,) = opened_with(gateway, instructions)
    lines = [json.loads(x) for x in gateway.trace.read_text().splitlines()]
    heard = sum(x.get("bytes", 0) for x in lines if x["stream"] == prompt["stream"] and x["event"] == "audioInput")
    assert heard >= 2 * len(ulaw) * 0.9  # the caller's audio, as 16 kHz PCM16 (plus the keepalive's silence)
