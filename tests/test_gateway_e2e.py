"""End to end on the embedded default: a real uvicorn process, real websockets clients, the local
engine (deterministic configuration), a real SQLite file."""

from __future__ import annotations

import asyncio
import time

import httpx
import jwt
import orjson
import pytest
import websockets

from gateway.client import ClientState, VoiceClient
from gateway.tokens import Signer

from .conftest import DISCUSS, HELLO, MET, STORY, barge_in, speech

SPEED = 1.5  # the scripted microphone runs a little faster than real time (the limit is 2x)


def client(gw, **kw) -> VoiceClient:
    c = VoiceClient(gw.ws, **kw)
    c.speed = SPEED
    return c


async def test_spoken_turn(gateway):
    async with client(gateway) as c:
        assert c.ready["protocol"] == 1 and c.ready["resumed"] is False
        assert c.ready["audio"] == {"input_sample_rate": 16000, "output_sample_rate": 24000,
                                    "input_codec": "pcm16", "output_codec": "pcm16"}
        turn = await c.turn(speech(MET))
        assert turn["user"].lower() == MET
        assert "doctor smith" in turn["assistant"].lower()
        assert len(c.audio) / (2 * 24000) >= 1.0
        # every final item was stored, and acknowledged only after that
        assert {f["item_id"] for f in c.finals} <= c.saved
        assert not c.state.pending
        kinds = [x["type"] for x in c.messages]
        assert kinds.index("response.audio.start") < kinds.index("response.audio.end")
        assert any(x["type"] == "transcript" and x["role"] == "assistant" and not x["final"] for x in c.messages)
        assert any(x["type"] == "usage" for x in c.messages)


async def test_input_sample_rate_48k_is_resampled(gateway):
    async with client(gateway, input_rate=48000, output_rate=16000) as c:
        turn = await c.turn(speech(HELLO, 48000))
        assert turn["user"].lower() == HELLO
        assert c.ready["audio"]["output_sample_rate"] == 16000
        assert len(c.audio) / (2 * 16000) >= 1.0


async def test_typed_turn(gateway):
    async with client(gateway) as c:
        turn = await c.turn(text="I met with Doctor Smith today at two pm")
        assert turn["user"] == "I met with Doctor Smith today at two pm"
        assert "doctor smith" in turn["assistant"].lower()


async def test_crash_recovery_resumes_with_history_before_audio(make_gateway, tmp_path):
    gw = make_gateway()
    state = ClientState(str(tmp_path / "client-state.json"))
    c = client(gw, state=state)
    await c.connect()
    t1 = await c.turn(speech(MET))
    t2 = await c.turn(speech(HELLO))
    assert t1["user"].lower() == MET and t2["user"].lower() == HELLO
    assert len(c.saved) >= 4
    conversation_id = c.ready["conversation_id"]
    gw.kill()  # SIGKILL: no chance to flush anything
    await c.close()

    gw2 = make_gateway()  # a new process on the same SQLite file and secret
    state = ClientState.load(state.path)
    assert state.resume_token
    c2 = client(gw2, state=state)
    ready = await c2.connect()
    try:
        assert ready["resumed"] is True and ready["conversation_id"] == conversation_id
        assert ready["history_length"] == 4
        assert [h["role"] for h in ready["history"]] == ["user", "assistant", "user", "assistant"]
        assert ready["history"][0]["text"].lower() == MET

        turn = await c2.turn(speech(DISCUSS))
        assert turn["user"].lower() == DISCUSS
        assert "doctor smith" in turn["assistant"].lower()

        # the new model stream saw the history as text blocks, before any audio
        lines = [orjson.loads(x) for x in gw2.trace.read_text().splitlines()]
        stream = [x for x in lines if x["stream"] == lines[-1]["stream"]]
        names = [x["event"] for x in stream]
        first_audio = names.index("audioInput")
        history_text = " ".join(x["content"] for x in stream[:first_audio] if x["event"] == "textInput")
        assert MET in history_text.lower()
        roles = [x["role"] for x in stream[:first_audio] if x["event"] == "contentStart"]
        assert roles[:4] == ["SYSTEM", "USER", "ASSISTANT", "USER"] and roles[-1] == "USER"  # ... then AUDIO
    finally:
        await c2.close()


async def test_history_endpoints_both_shapes(gateway):
    async with client(gateway) as c:
        await c.turn(text="hello there")
        cid, token = c.ready["conversation_id"], c.ready["resume_token"]
    async with httpx.AsyncClient(base_url=gateway.http) as h:
        guide = (await h.get(f"/conversation/{cid}/history", headers={"X-Resume-Token": token})).json()
        assert set(guide) == {"sessionId", "bedrockSessionId", "historyLength", "history"}
        assert guide["bedrockSessionId"] == cid and guide["historyLength"] == 2
        assert set(guide["history"][0]) == {"role", "text", "timestamp"}
        assert guide["history"][0] == {**guide["history"][0], "role": "user", "text": "hello there"}
        v1 = (await h.get(f"/v1/conversations/{cid}/history", headers={"X-Resume-Token": token})).json()
        assert v1["history_length"] == 2 and v1["history"][1]["role"] == "assistant"
        # without proof of ownership: 404, indistinguishable from a missing conversation
        r1 = await h.get(f"/v1/conversations/{cid}/history")
        r2 = await h.get("/v1/conversations/00000000-0000-4000-8000-000000000000/history")
        assert r1.status_code == r2.status_code == 404 and r1.json() == r2.json()
        assert (await h.delete(f"/v1/conversations/{cid}", headers={"X-Resume-Token": token})).status_code == 204
        assert (await h.get(f"/conversation/{cid}/history", headers={"X-Resume-Token": token})).status_code == 404
        assert (await h.get("/healthz")).status_code == 200
        metrics = (await h.get("/metrics")).text
        assert "novagate_sessions_total" in metrics and "novagate_history_load_seconds" in metrics


async def test_foreign_tokens_and_receipts_are_refused_without_leaking(make_gateway):
    key = "test-user-key-of-32-bytes-or-more"
    gw = make_gateway(NOVAGATE_AUTH_JWT_SECRET=key)
    alice = jwt.encode({"sub": "alice", "exp": int(time.time()) + 3600}, key, algorithm="HS256")
    bob = jwt.encode({"sub": "bob", "exp": int(time.time()) + 3600}, key, algorithm="HS256")
    c = client(gw, token=alice)
    await c.connect()
    await c.turn(text="I met with Doctor Smith today at two pm")
    alice_cid, alice_token = c.ready["conversation_id"], c.ready["resume_token"]
    receipt = c.finals[0]["receipt"]
    await c.close()

    async def ready_of(errors=0, **kw):
        x = client(gw, **kw)
        try:
            await x.connect(mic=False)
            await x.wait_for(lambda: sum(m["type"] == "error" for m in x.messages) >= errors, 5)
            await x.send({"type": "ping", "id": "last"})  # everything before the pong has arrived
            await x.wait_for(lambda: any(m["type"] == "pong" for m in x.messages), 5)
            return x.ready, x.messages
        finally:
            await x.close()

    def leaks(ready):
        return ready["conversation_id"] == alice_cid or ready["history"] or ready["history_length"]

    # Alice's resume token presented by Bob
    ready, _ = await ready_of(token=bob, state=ClientState(resume_token=alice_token))
    assert ready["resume_failed"] == "not_found" and not leaks(ready)
    # a token signed by another server's secret
    forged = Signer(b"another-secret").resume_token(alice_cid, "anon:x")
    ready, _ = await ready_of(state=ClientState(resume_token=forged))
    assert ready["resume_failed"] == "not_found" and not leaks(ready)
    # the raw conversation id, without authentication, and as the wrong user
    for kw in ({}, {"token": bob}):
        ready, _ = await ready_of(conversation_id=alice_cid, **kw)
        assert ready["resume_failed"] == "not_found" and not leaks(ready)
    # the raw id as its owner works
    ready, _ = await ready_of(token=alice, conversation_id=alice_cid)
    assert ready["resumed"] is True and ready["history_length"] == 2
    # a tampered receipt and a receipt of another conversation: bad_receipt, nothing stored
    head, body, sig = receipt.split(".")
    tampered = ".".join([head, body[:-4] + ("AAAA" if body[-4:] != "AAAA" else "BBBB"), sig])
    ready, msgs = await ready_of(errors=2, state=ClientState(pending={"x": tampered, "y": receipt}))
    assert [x["code"] for x in msgs if x["type"] == "error"] == ["bad_receipt", "bad_receipt"]
    assert ready["history_length"] == 0
    # a bad bearer token is refused outright
    bad = client(gw, token="not-a-jwt")
    with pytest.raises(ConnectionError):
        await bad.connect(mic=False)
    assert bad.close_code == 4401
    await bad.close()
    # the HTTP endpoints follow the socket's rule: a user's resume token needs that user's bearer
    async with httpx.AsyncClient(base_url=gw.http) as h:
        url = f"/v1/conversations/{alice_cid}/history"
        for headers, status in (({}, 404), ({"Authorization": f"Bearer {bob}"}, 404),
                                ({"Authorization": f"Bearer {alice}"}, 200)):
            r = await h.get(url, headers={"X-Resume-Token": alice_token, **headers})
            assert r.status_code == status, headers


async def test_pending_receipts_are_stored_exactly_once(gateway):
    async with client(gateway) as c:
        await c.turn(text="hello there")
        receipts = {f["item_id"]: f["receipt"] for f in c.finals}
        token = c.ready["resume_token"]
    for _ in range(2):  # replaying the same receipts twice changes nothing
        x = client(gateway, state=ClientState(resume_token=token, pending=dict(receipts)))
        await x.connect(mic=False)
        assert x.ready["resumed"] and x.ready["history_length"] == 2
        await x.wait_for(lambda: set(receipts) <= x.saved, 10)
        await x.close()


async def raw(gw, *frames, wait=3.0, subprotocols=("novagate.v1",), headers=None):
    """Send frames on a bare socket; return (messages received, close code)."""
    got = []
    # no subprotocol offered: no header (an empty Sec-WebSocket-Protocol header is malformed, and refused 400)
    ws = await websockets.connect(gw.ws, subprotocols=list(subprotocols) or None, additional_headers=headers)
    try:
        for f in frames:
            await ws.send(f)
        async with asyncio.timeout(wait):
            async for data in ws:
                got.append(orjson.loads(data) if isinstance(data, str) else data)
    except TimeoutError:
        await ws.close()
        return got, None
    except websockets.ConnectionClosed:
        pass
    return got, ws.close_code


START = orjson.dumps({"type": "session.start", "protocol": 1}).decode()


async def test_protocol_errors_leave_other_sessions_alone(gateway):
    healthy = client(gateway)
    await healthy.connect()
    talk = asyncio.create_task(healthy.turn(speech(MET)))
    try:
        _, code = await raw(gateway, b"\x00\x00" * 160)
        assert code == 4400  # audio before session.start
        _, code = await raw(gateway, wait=5)
        assert code == 4408  # no session.start in time
        _, code = await raw(gateway, '{"type": "ping"}')
        assert code == 4400  # first message is not session.start
        got, code = await raw(gateway, START, '{"type": "nope"}', "{not json", '{"type": "ping", "id": 7}', wait=2)
        errors = [x["code"] for x in got if isinstance(x, dict) and x["type"] == "error"]
        assert errors == ["unknown_type", "invalid_json"] and code is None  # non-fatal: the session goes on
        assert any(isinstance(x, dict) and x["type"] == "pong" and x["id"] == 7 for x in got)
        got, code = await raw(gateway, START, "x" * 70000)
        assert code == 1009  # text message over 64 KiB
        got, code = await raw(gateway, START, bytes(40000))
        assert code == 1009  # audio frame over max_frame_bytes
        got, code = await raw(gateway, START, bytes(641), wait=2)
        assert [x["code"] for x in got if isinstance(x, dict) and x["type"] == "error"] == ["invalid_field"]
        _, code = await raw(gateway, START, headers={"Origin": "https://evil.example"})
        assert code == 4403
        got, code = await raw(gateway, START, subprotocols=())
        assert got[0]["type"] == "session.ready" and code is None  # no subprotocol offered is fine
        turn = await talk
        assert turn["user"].lower() == MET and "doctor smith" in turn["assistant"].lower()
    finally:
        talk.cancel()
        await healthy.close()


async def test_audio_faster_than_twice_real_time_is_closed_4429(gateway):
    frame = bytes(640)  # 20 ms at 16 kHz
    async with websockets.connect(gateway.ws) as ws:
        await ws.send(START)
        await ws.recv()
        with pytest.raises(websockets.ConnectionClosed) as e:
            t0, sent = time.monotonic(), 0
            while time.monotonic() - t0 < 30:  # 4x real time, however slow this loop runs
                due = int((time.monotonic() - t0) * 4 / 0.02) + 1
                for _ in range(due - sent):
                    await ws.send(frame)
                sent = max(sent, due)
                await asyncio.sleep(0.02)
            await ws.recv()
        assert e.value.rcvd.code == 4429


async def test_session_end_ends_the_conversation(gateway):
    c = client(gateway)
    await c.connect()
    await c.turn(text="hello there")
    token = c.ready["resume_token"]
    await c.end()
    await c.wait_for(lambda: c.close_code is not None, 5)
    assert c.close_code == 1000
    await c.close()
    x = client(gateway, state=ClientState(resume_token=token))
    await x.connect(mic=False)
    assert x.ready["resumed"] is False and x.ready["resume_failed"] == "not_found"
    await x.close()


async def test_barge_in_flushes_and_history_keeps_what_was_heard(gateway):
    async with client(gateway) as c:
        item_id = await barge_in(c)
        played = len(c.audio_by_item.get(item_id, b"")) * 1000 // (2 * 24000)
        await c.send({"type": "playback.truncate", "item_id": item_id, "played_ms": played})
        assert c.audio_end.get(item_id) == "interrupted"
        await c.wait_for(lambda: any(f["role"] == "user" and f["text"] == HELLO for f in c.finals), 20)
        stored = await c.wait_for(lambda: next((f for f in c.finals if f["item_id"] == item_id), None), 10)
        full = next(x["text"] for x in c.messages if x["type"] == "transcript" and x["item_id"] == item_id)
        assert len(stored["text"]) < len(full)  # trimmed to what was heard
        async with httpx.AsyncClient(base_url=gateway.http) as h:
            hist = (await h.get(f"/v1/conversations/{c.ready['conversation_id']}/history",
                                headers={"X-Resume-Token": c.ready["resume_token"]})).json()["history"]
        (item,) = [h for h in hist if h["item_id"] == item_id]
        assert item["interrupted"] is True and item["text"] == stored["text"]


async def test_typing_over_the_assistant_interrupts_it(gateway):
    from gateway.local.policy import STORY as TOLD

    async with client(gateway) as c:
        await c.send_text("tell me a story")
        start = await c.wait_for(lambda: next((x for x in c.messages if x["type"] == "response.audio.start"), None), 30)
        story_id = start["item_id"]
        # type once 2 s of the story (≈40 s long) has reached the client: it is playing, not over
        await c.wait_for(lambda: len(c.audio_by_item.get(story_id, b"")) >= 2 * 2 * 24000, 30)
        turn = await c.turn(text="hello there", timeout=40)
        intr = next(x for x in c.messages if x["type"] == "interrupted")
        assert intr["item_id"] == story_id and c.audio_end.get(story_id) == "interrupted"
        # the reply to the typed turn is its own item, not the rest of the story
        assert turn["user"] == "hello there"
        assert turn["assistant"] and "once upon a time" not in turn["assistant"].lower()
        # the story is stored cut where the typing came in (settled once the truncate wait is over)
        story = await c.wait_for(lambda: next((f for f in c.finals if f["item_id"] == story_id), None), 15)
        assert story["role"] == "assistant" and story["text"]
        assert " ".join(TOLD).startswith(story["text"]) and len(story["text"]) < len(" ".join(TOLD)) / 2
