"""Contract tests against real AWS: `make contract-aws`. Skipped without credentials.

They check what novagate assumes about Bedrock Agent Runtime sessions (the open questions of
reference §4) and make one real Nova Sonic turn. Findings that the code does not depend on are
printed (run with -s), assumptions it depends on are asserted. Costs: a few Agent Runtime calls and
about 20 s of Nova Sonic audio.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import time
import uuid

import boto3
import botocore.exceptions
import pytest

REGION = os.environ.get("NOVAGATE_CONTRACT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"


def _have_credentials() -> bool:
    try:
        return boto3.session.Session().get_credentials() is not None
    except Exception:
        return False


pytestmark = pytest.mark.skipif(not _have_credentials(), reason="no AWS credentials: contract tests skipped")


@pytest.fixture(scope="module")
def ar():
    return boto3.client("bedrock-agent-runtime", region_name=REGION)


@pytest.fixture
def session(ar):
    sid = ar.create_session(sessionMetadata={"app": "novagate-contract"}, tags={"app": "novagate-contract"})["sessionId"]
    yield sid
    for call in (ar.end_session, ar.delete_session):
        try:
            call(sessionIdentifier=sid)
        except botocore.exceptions.ClientError:
            pass


def _step(ar, sid, inv, text, t, step_id=None):
    kw = {"invocationStepId": step_id} if step_id else {}
    return ar.put_invocation_step(sessionIdentifier=sid, invocationIdentifier=inv, invocationStepTime=t,
                                  payload={"contentBlocks": [{"text": text}]}, **kw)["invocationStepId"]


def _code(e: botocore.exceptions.ClientError) -> tuple[str, int]:
    return e.response["Error"]["Code"], e.response["ResponseMetadata"]["HTTPStatusCode"]


def test_listing_order_and_newest_probe(ar, session):
    """Q1/Q2: order of ListInvocationSteps; the store's freshness probe needs maxResults=1 = newest."""
    inv = ar.create_invocation(sessionIdentifier=session)["invocationId"]
    base = dt.datetime.now(dt.UTC)
    ids = [_step(ar, session, inv, f"step {i}", base + dt.timedelta(seconds=i)) for i in range(3)]
    listed = [s["invocationStepId"] for s in ar.list_invocation_steps(sessionIdentifier=session)["invocationStepSummaries"]]
    print("\nListInvocationSteps order:", "newest first" if listed == ids[::-1] else
          "oldest first" if listed == ids else listed)
    newest = ar.list_invocation_steps(sessionIdentifier=session, maxResults=1)["invocationStepSummaries"][0]
    # The store does not rely on this (it falls back, 3 calls instead of 2), but it should hold:
    print("maxResults=1 returns the newest step:", newest["invocationStepId"] == ids[-1])


def test_writes_to_an_ended_session_are_refused(ar, session):
    """Q3: the store treats 409 (or a 400 about status) on writes as 'not ACTIVE' and rotates."""
    inv = ar.create_invocation(sessionIdentifier=session)["invocationId"]
    ar.end_session(sessionIdentifier=session)
    with pytest.raises(botocore.exceptions.ClientError) as e:
        _step(ar, session, inv, "late", dt.datetime.now(dt.UTC))
    code, status = _code(e.value)
    print("\nPutInvocationStep on ENDED:", code, status)
    assert status in (400, 409)
    assert ar.get_session(sessionIdentifier=session)["sessionStatus"] == "ENDED"


def test_duplicate_step_id(ar, session):
    """Q4: the store accepts overwrite or 409 for a retried step id; which one is it?"""
    inv = ar.create_invocation(sessionIdentifier=session)["invocationId"]
    sid = str(uuid.uuid4())
    t = dt.datetime.now(dt.UTC)
    _step(ar, session, inv, "first", t, sid)
    try:
        _step(ar, session, inv, "second", t, sid)
        got = ar.get_invocation_step(sessionIdentifier=session, invocationIdentifier=inv, invocationStepId=sid)
        print("\nduplicate step id: accepted; stored text =", got["invocationStep"]["payload"]["contentBlocks"][0]["text"])
    except botocore.exceptions.ClientError as e:
        print("\nduplicate step id:", _code(e))
        assert _code(e)[1] == 409


def test_update_session_replaces_or_merges(ar, session):
    """Q5: the store always sends the full map, so either is safe; record which."""
    ar.update_session(sessionIdentifier=session, sessionMetadata={"a": "1"})
    ar.update_session(sessionIdentifier=session, sessionMetadata={"b": "2"})
    meta = ar.get_session(sessionIdentifier=session).get("sessionMetadata", {})
    print("\nUpdateSession:", "merges" if "a" in meta else "replaces", meta)
    assert meta.get("b") == "2"


def test_text_block_size(ar, session):
    """Q6: how large a text block may be (the store writes one item per step, a few KB at most)."""
    inv = ar.create_invocation(sessionIdentifier=session)["invocationId"]
    for size in (16_384, 65_536, 262_144):
        try:
            _step(ar, session, inv, "x" * size, dt.datetime.now(dt.UTC))
            print(f"\ntext block of {size} bytes: accepted")
        except botocore.exceptions.ClientError as e:
            print(f"\ntext block of {size} bytes:", _code(e))
            assert size > 16_384, "a 16 KB step must be accepted"
            break


async def test_store_round_trip_and_warm_resume():
    from gateway.store.agent_runtime import AgentRuntimeStore
    from gateway.clock import new_id, utc_now
    from protocol.items import Item

    store = AgentRuntimeStore(region=REGION)
    cid = await store.create("contract-owner")
    try:
        for role, text in (("user", "I met with Doctor Smith"), ("assistant", "Noted.")):
            await store.append(cid, Item(new_id("item"), role, text, utc_now()), connection_id="contract")
        await store.flush()
        conv = await store.load(cid, owner="contract-owner")
        assert [i.text for i in conv.items] == ["I met with Doctor Smith", "Noted."] and conv.total == 2
        await store.end(cid)
        assert (await store.load(cid)).ended
    finally:
        await store.delete(cid)
        await store.aclose()


async def test_one_nova_sonic_turn():
    """A real Nova Sonic turn through the gateway's Bedrock transport: speech in, transcript and audio out."""
    from gateway.bedrock import BedrockTransport
    from gateway.local.speech import synthesize
    from protocol import nova_events as nova
    from protocol.continuity import StreamSetup

    model = os.environ.get("NOVAGATE_MODEL_ID", nova.DEFAULT_MODEL_ID)
    transport = BedrockTransport(model_id=model, region=REGION)
    stream = await transport.open()
    setup = StreamSetup.build(system_prompt="Answer in one short sentence.", history=[], voice="matthew",
                              output_sample_rate=24000)
    got = {"user": "", "audio": 0}

    async def pump():
        while (ev := await stream.receive()) is not None:
            e = nova.parse_output_event(ev)
            if isinstance(e, nova.TextOutput) and e.role == "USER":
                got["user"] += e.content
            elif isinstance(e, nova.AudioOutput):
                got["audio"] += len(e.pcm)
            if got["audio"] > 48_000 and got["user"]:
                return

    reader = asyncio.create_task(pump())
    try:
        for e in setup.events:
            await stream.send(e)
        speech = bytes(16000) + synthesize("What is the capital of France?", 16000) + bytes(32000 * 3)
        t0 = time.monotonic()
        for i in range(0, len(speech), 1024):  # 32 ms frames in real time
            await stream.send(setup.audio(speech[i : i + 1024]))
            await asyncio.sleep(max(0.0, t0 + (i + 1024) / 32000 - time.monotonic()))
            if reader.done():
                break
        await asyncio.wait_for(reader, 30)
        assert "france" in got["user"].lower()
        assert got["audio"] > 48_000  # at least a second of 24 kHz audio
    finally:
        for e in setup.closing():
            try:
                await stream.send(e)
            except Exception:
                break
        await stream.close()
        await transport.aclose()
