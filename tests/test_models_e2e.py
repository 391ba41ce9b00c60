"""History sized to the model, end to end: a gateway on the Bedrock path (the real SDK) against the Nova
emulator, resuming a long conversation kept in SQLite. On amazon.nova-2-5-sonic it arrives whole (not cut to
40 KB); against a stand-in that still enforces 40 KB the stream refuses it, the session falls back once,
and the conversation goes on. What the model received is read from the emulator's engine trace."""

from __future__ import annotations

import re
import time

import httpx
import orjson
import pytest

from gateway.client import ClientState, VoiceClient
from gateway.store.sqlite import SQLiteStore
from gateway.tokens import Signer, owner_hash
from protocol.items import Item

from .conftest import AwsStack, Gateway

SECRET = "models-e2e-secret-0123456789abcdef0123456789"
OWNER = "anon:long-talker"


def stack_with(tmp_path, *extra: str) -> AwsStack:
    return AwsStack(tmp_path / "aws", engine_args=("--engine", "scripted", "--endpoint-ms", "600", "--no-warm", *extra))


async def seed(db: str, kb: int) -> tuple[str, list[Item]]:
    """A conversation of `kb` KB of text, alternating user / assistant, as a gateway would have stored it."""
    store = SQLiteStore(db)
    cid = await store.create(owner_hash(OWNER))
    items = [Item(f"item_{k:04d}", "user" if k % 2 == 0 else "assistant", f"{k:04d} " + "lorem ipsum " * 83, "t")
             for k in range(kb * 1024 // 1000)]
    for k, item in enumerate(items):
        await store.append(cid, Item(item.item_id, item.role, item.text, f"2026-11-29T00:{k // 60:02d}:{k % 60:02d}Z"))
    await store.aclose()
    return cid, items


def history_bytes(stack: AwsStack, stream: str) -> int:
    lines = [orjson.loads(x) for x in stack.trace.read_text().splitlines()]
    return sum(len(r["content"].encode()) for r in lines if r["stream"] == stream and r["event"] == "textInput"
               and r["role"] in ("USER", "ASSISTANT") and not r["interactive"])


def streams(stack: AwsStack) -> list[str]:
    lines = [orjson.loads(x) for x in stack.trace.read_text().splitlines()]
    return list(dict.fromkeys(r["stream"] for r in lines if r["event"] == "promptStart"))


def metric(gw: Gateway, name: str) -> float:
    text = httpx.get(gw.http + "/metrics").text
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


@pytest.mark.parametrize("limits", ["model", "conservative"])
async def test_a_long_conversation_resumes_within_what_the_model_takes(tmp_path, limits):
    (tmp_path / "aws").mkdir()
    stack = stack_with(tmp_path, "--history-limits", limits).start()
    (tmp_path / "gw").mkdir()
    db = str(tmp_path / "gw" / "novagate.db")
    cid, items = await seed(db, 120)
    token = Signer(SECRET.encode()).resume_token(cid, OWNER, 0, int(time.time()) + 3600)
    env = {**stack.gateway_env(), "NOVAGATE_STORE": "sqlite", "NOVAGATE_SQLITE_PATH": db, "NOVAGATE_SECRET": SECRET,
           "NOVAGATE_MODEL_ID": "amazon.nova-2-5-sonic"}
    gw = Gateway(tmp_path / "gw", env).start()
    try:
        client = VoiceClient(gw.ws, state=ClientState(resume_token=token))
        ready = await client.connect(mic=False)
        reply = await client.turn(text="Where were we?", timeout=60)
        fallbacks = metric(gw, "novagate_history_fallbacks_total")
        await client.close()
    finally:
        gw.stop()
        stack.stop()
    assert ready["resumed"] and ready["history_length"] == len(items)
    assert reply["assistant"]  # the conversation goes on
    opened = streams(stack)
    if limits == "model":  # Nova 2.5 takes 200 KB: the whole 120 KB conversation
        assert len(opened) == 1 and history_bytes(stack, opened[0]) > 110 * 1024
        assert fallbacks == 0
    else:  # the stand-in refuses it; the next stream gets 40 KB, once
        assert len(opened) == 2 and history_bytes(stack, opened[1]) <= 40 * 1024
        assert fallbacks == 1


async def test_speech_start_reaches_the_client_before_the_assistant_audio_stops(tmp_path):
    """Over a live gateway (the scripted engine, which sends userSpeechStart/End as Nova 2 does): the user
    speaks over a long answer; the client hears `input.speech_started` before the answer's audio ends."""
    import numpy as np

    gw = Gateway(tmp_path, {"NOVAGATE_ENGINE": "scripted", "NOVAGATE_SCRIPTED_REPLY_S": "8",
                            "NOVAGATE_SCRIPTED_TRANSCRIPTS": "tell me a long story|stop there"}).start()
    tone = (np.sin(2 * np.pi * 220 * np.arange(16000) / 16000) * 8000).astype("<i2").tobytes()
    try:
        client = VoiceClient(gw.ws, state=ClientState())
        await client.connect(mic=True)
        await client.send_text("Tell me a long story.")
        await client.wait_for(lambda: any(m.get("type") == "response.audio.start" for m in client.messages), 30)
        await client.say(tone)  # talking over the answer
        await client.wait_for(lambda: any(m.get("type") == "response.audio.end" for m in client.messages), 30)
        await client.close()
    finally:
        gw.stop()
    kinds = [m["type"] for m in client.messages]
    started = kinds.index("input.speech_started", kinds.index("response.audio.start"))
    ended = kinds.index("response.audio.end")
    assert started < ended
    end = next(m for m in client.messages if m["type"] == "response.audio.end")
    assert end["reason"] == "interrupted"
