"""The loopback Agent Runtime fake, driven by real boto3: the §6.6 acceptance checks, the limits
botocore does not enforce, ordering and pagination, the state machine, fault injection and the admin API."""

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from botocore.exceptions import ClientError, ParamValidationError
from botocore.retries.standard import ExponentialBackoff

from gateway.emulate.agent_runtime import AgentRuntimeFake

ROOT = Path(__file__).resolve().parent.parent
T0 = datetime(2026, 11, 24, 10, 0, 0, tzinfo=UTC)
INV = "1111aaaa-2222-4333-8444-5555bbbb5555"


@pytest.fixture
def fake():
    f = AgentRuntimeFake().start()
    yield f
    f.stop()


@pytest.fixture
def client(fake):
    """No retries: every call reaches the fake once and errors surface as they are."""
    return fake.client(retries={"mode": "standard", "max_attempts": 0})


@pytest.fixture
def fast_backoff(monkeypatch):
    """botocore's standard mode waits up to 1 s, 2 s, ... after a throttle; keep the retries, not the waits."""
    monkeypatch.setitem(ExponentialBackoff._DEFAULT_BACKOFF_CONFIG, "throttling_base_scale", 0.01)


def code(exc: ClientError) -> tuple[str, int]:
    return exc.response["Error"]["Code"], exc.response["ResponseMetadata"]["HTTPStatusCode"]


def new_session(client, **kw) -> str:
    return client.create_session(**kw)["sessionId"]


def put(client, sid, text="hello", at=T0, step=None, inv=INV):
    kw = {"invocationStepId": step} if step else {}
    return client.put_invocation_step(sessionIdentifier=sid, invocationIdentifier=inv, invocationStepTime=at,
                                      payload={"contentBlocks": [{"text": text}]}, **kw)["invocationStepId"]


def admin(fake, path, body=None, method=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(fake.url + "/_fake/" + path, data=data, method=method or ("POST" if data else "GET"))
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read())


# -- §6.6 acceptance -----------------------------------------------------------------------------------
def test_acceptance_checks(fake, client):
    sid = new_session(client, sessionMetadata={"owner": "abc", "k": "v"}, tags={"owner": "abc", "app": "novagate"})
    got = client.get_session(sessionIdentifier=sid)
    assert got["sessionStatus"] == "ACTIVE" and got["sessionMetadata"] == {"owner": "abc", "k": "v"}
    arn = got["sessionArn"]
    assert arn == f"arn:aws:bedrock:us-east-1:123456789012:session/{sid}"
    assert client.list_tags_for_resource(resourceArn=arn)["tags"] == {"owner": "abc", "app": "novagate"}

    # duplicate invocation -> 409
    client.create_invocation(sessionIdentifier=sid, invocationId=INV, description="conn 1")
    with pytest.raises(ClientError) as e:
        client.create_invocation(sessionIdentifier=sid, invocationId=INV)
    assert code(e.value) == ("ConflictException", 409)

    # 25 steps, paged 10/10/5 by the boto3 paginator, newest first
    ids = [put(client, sid, f"step {n}", T0 + timedelta(seconds=n)) for n in range(25)]
    pages = list(client.get_paginator("list_invocation_steps").paginate(
        sessionIdentifier=sid, PaginationConfig={"PageSize": 10}))
    assert [len(p["invocationStepSummaries"]) for p in pages] == [10, 10, 5]
    listed = [s["invocationStepId"] for p in pages for s in p["invocationStepSummaries"]]
    assert listed == ids[::-1]
    assert "nextToken" not in pages[-1]

    # GetInvocationStep returns the stored step
    step = client.get_invocation_step(sessionIdentifier=sid, invocationIdentifier=INV,
                                      invocationStepId=ids[3])["invocationStep"]
    assert step["payload"] == {"contentBlocks": [{"text": "step 3"}]}
    assert step["invocationStepTime"] == T0 + timedelta(seconds=3) and step["invocationId"] == INV

    # metadata and tags round-trip (UpdateSession replaces the map)
    client.update_session(sessionIdentifier=sid, sessionMetadata={"only": "this"})
    assert client.get_session(sessionIdentifier=sid)["sessionMetadata"] == {"only": "this"}
    client.tag_resource(resourceArn=arn, tags={"env": "test"})
    client.untag_resource(resourceArn=arn, tagKeys=["app", "missing"])
    assert client.list_tags_for_resource(resourceArn=arn)["tags"] == {"owner": "abc", "env": "test"}

    # Delete on ACTIVE -> 409; End -> ENDED; Put after End -> 409
    with pytest.raises(ClientError) as e:
        client.delete_session(sessionIdentifier=sid)
    assert code(e.value) == ("ConflictException", 409)
    assert client.end_session(sessionIdentifier=sid)["sessionStatus"] == "ENDED"
    with pytest.raises(ClientError) as e:
        put(client, sid, "late")
    assert code(e.value) == ("ConflictException", 409)
    # an ENDED session can still be read
    assert len(client.list_invocation_steps(sessionIdentifier=sid, maxResults=1000)["invocationStepSummaries"]) == 25

    # Get after Delete -> 404
    client.delete_session(sessionIdentifier=sid)
    with pytest.raises(ClientError) as e:
        client.get_session(sessionIdentifier=sid)
    assert code(e.value) == ("ResourceNotFoundException", 404)

    # an invalid ID -> ValidationException
    with pytest.raises(ClientError) as e:
        client.get_session(sessionIdentifier="NOT-A-UUID")
    assert code(e.value) == ("ValidationException", 400)


def test_session_arn_identifiers(fake, client):
    sid = new_session(client)
    arn = client.get_session(sessionIdentifier=sid)["sessionArn"]
    assert client.get_session(sessionIdentifier=arn)["sessionId"] == sid  # percent-encoded in the path
    client.create_invocation(sessionIdentifier=arn, invocationId=INV)
    put(client, arn)
    assert len(client.list_invocation_steps(sessionIdentifier=arn)["invocationStepSummaries"]) == 1
    for bad, expected in [
        (sid.upper(), "ValidationException"),                                      # lowercase only
        (arn.replace("123456789012", "999999999999"), "ResourceNotFoundException"),  # another account
        (arn + "x", "ValidationException"),                                        # strictly anchored
        ("x" + sid, "ValidationException"),
    ]:
        with pytest.raises(ClientError) as e:
            client.get_session(sessionIdentifier=bad)
        assert code(e.value)[0] == expected, bad


# -- limits botocore does not enforce --------------------------------------------------------------------
@pytest.mark.parametrize("metadata", [
    {f"k{n}": "v" for n in range(51)},   # > 50 entries
    {"k" * 101: "v"},                    # key > 100
    {"k": "v" * 5001},                   # value > 5000
])
def test_metadata_limits(client, metadata):
    with pytest.raises(ClientError) as e:
        client.create_session(sessionMetadata=metadata)
    assert code(e.value) == ("ValidationException", 400)
    sid = new_session(client, sessionMetadata={f"k{n}": "v" * 5000 for n in range(50)})  # the maximum is fine
    with pytest.raises(ClientError):
        client.update_session(sessionIdentifier=sid, sessionMetadata=metadata)


@pytest.mark.parametrize("tags", [
    {"bad*key": "v"}, {"k": "bad#value"}, {"k" * 129: "v"}, {"k": "v" * 257}, {f"k{n}": "v" for n in range(201)},
])
def test_tag_limits(client, tags):
    with pytest.raises(ClientError) as e:
        client.create_session(tags=tags)
    assert code(e.value) == ("ValidationException", 400)


def test_other_limits(fake, client):
    sid = new_session(client)
    with pytest.raises(ClientError) as e:
        client.create_invocation(sessionIdentifier=sid, description="d" * 201)
    assert code(e.value)[0] == "ValidationException"
    with pytest.raises(ClientError) as e:
        client.create_invocation(sessionIdentifier=sid, invocationId=INV.upper())
    assert code(e.value)[0] == "ValidationException"
    client.create_invocation(sessionIdentifier=sid, invocationId=INV, description="d" * 200)
    for bad in (1001, 5000):
        with pytest.raises(ClientError) as e:
            client.list_invocation_steps(sessionIdentifier=sid, maxResults=bad)
        assert code(e.value)[0] == "ValidationException"
    with pytest.raises(ParamValidationError):  # botocore checks the minimum itself
        client.list_invocation_steps(sessionIdentifier=sid, maxResults=0)
    with pytest.raises(ClientError) as e:
        client.list_invocation_steps(sessionIdentifier=sid, nextToken="not-a-token")
    assert code(e.value)[0] == "ValidationException"
    with pytest.raises(ClientError) as e:
        client.list_tags_for_resource(resourceArn="arn:aws:bedrock:us-east-1:123456789012:agent/" + sid)
    assert code(e.value)[0] == "ValidationException"
    with pytest.raises(ClientError) as e:  # an unknown invocation
        put(client, sid, inv="99999999-2222-4333-8444-555555555555")
    assert code(e.value) == ("ResourceNotFoundException", 404)
    with pytest.raises(ClientError) as e:
        client.get_invocation_step(sessionIdentifier=sid, invocationIdentifier=INV,
                                   invocationStepId="99999999-2222-4333-8444-555555555555")
    assert code(e.value)[0] == "ResourceNotFoundException"


def test_text_size_cap_is_configurable(fake, client):
    fake.max_text_bytes = 1000
    sid = new_session(client)
    client.create_invocation(sessionIdentifier=sid, invocationId=INV)
    put(client, sid, "é" * 500)  # 1000 bytes: at the cap
    with pytest.raises(ClientError) as e:
        put(client, sid, "é" * 501)
    assert code(e.value)[0] == "ValidationException"
    fake.max_text_bytes = 0  # no cap
    put(client, sid, "x" * 300_000)


def test_images_are_validated(client):
    sid = new_session(client)
    client.create_invocation(sessionIdentifier=sid, invocationId=INV)
    ok = {"image": {"format": "png", "source": {"bytes": b"\x89PNG"}}}
    client.put_invocation_step(sessionIdentifier=sid, invocationIdentifier=INV, invocationStepTime=T0,
                               payload={"contentBlocks": [{"text": "see"}, ok]})
    with pytest.raises(ClientError):
        client.put_invocation_step(sessionIdentifier=sid, invocationIdentifier=INV, invocationStepTime=T0,
                                   payload={"contentBlocks": [ok] * 21})
    with pytest.raises(ClientError):
        client.put_invocation_step(
            sessionIdentifier=sid, invocationIdentifier=INV, invocationStepTime=T0,
            payload={"contentBlocks": [{"image": {"format": "png", "source": {"s3Location": {"uri": "http://x/y"}}}}]})


# -- ordering and pagination -----------------------------------------------------------------------------
def test_order_uses_parsed_time_then_insertion(fake, client):
    sid = new_session(client)
    client.create_invocation(sessionIdentifier=sid, invocationId=INV)
    # botocore sends "...:00Z" for a whole second and "...:00.500000Z" otherwise: as strings, ".5Z" < "Z"
    whole = put(client, sid, "whole", T0)
    half = put(client, sid, "half", T0 + timedelta(milliseconds=500))
    tie_a = put(client, sid, "tie a", T0 - timedelta(seconds=1))
    tie_b = put(client, sid, "tie b", T0 - timedelta(seconds=1))

    def listed():
        page = client.list_invocation_steps(sessionIdentifier=sid)
        return [s["invocationStepId"] for s in page["invocationStepSummaries"]]

    assert listed() == [half, whole, tie_b, tie_a]
    fake.oldest_first = True
    assert listed() == [tie_a, tie_b, whole, half]
    first = client.list_invocation_steps(sessionIdentifier=sid, maxResults=1)["invocationStepSummaries"]
    assert first[0]["invocationStepId"] == tie_a


def test_pagination_is_stable_and_scoped(fake, client):
    sid = new_session(client)
    other = "22222222-2222-4333-8444-555555555555"
    client.create_invocation(sessionIdentifier=sid, invocationId=INV)
    client.create_invocation(sessionIdentifier=sid, invocationId=other)
    for n in range(6):
        put(client, sid, f"a{n}", T0 + timedelta(seconds=n))
        put(client, sid, f"b{n}", T0 + timedelta(seconds=n, milliseconds=1), inv=other)
    page = client.list_invocation_steps(sessionIdentifier=sid, maxResults=5)
    put(client, sid, "newest", T0 + timedelta(hours=1))  # inserted mid-listing: no duplicates, no gaps
    rest = client.list_invocation_steps(sessionIdentifier=sid, maxResults=1000, nextToken=page["nextToken"])
    assert len(page["invocationStepSummaries"]) + len(rest["invocationStepSummaries"]) == 12
    assert "nextToken" not in rest
    only_other = client.list_invocation_steps(sessionIdentifier=sid, invocationIdentifier=other)
    assert {s["invocationId"] for s in only_other["invocationStepSummaries"]} == {other}
    assert len(only_other["invocationStepSummaries"]) == 6
    # a token from one listing is refused by another
    with pytest.raises(ClientError):
        client.list_invocation_steps(sessionIdentifier=sid, invocationIdentifier=other, nextToken=page["nextToken"])
    invs = client.list_invocations(sessionIdentifier=sid, maxResults=1)
    assert invs["invocationSummaries"][0]["invocationId"] == other and "nextToken" in invs
    for _ in range(3):
        new_session(client)
    sessions = [s for p in client.get_paginator("list_sessions").paginate(PaginationConfig={"PageSize": 2})
                for s in p["sessionSummaries"]]
    assert len(sessions) == 4 and sessions[-1]["sessionId"] == sid
    assert set(sessions[0]) == {"sessionId", "sessionArn", "sessionStatus", "createdAt", "lastUpdatedAt"}


def test_default_page_size(fake, client):
    fake.default_page_size = 3
    sid = new_session(client)
    client.create_invocation(sessionIdentifier=sid, invocationId=INV)
    for n in range(4):
        put(client, sid, str(n), T0 + timedelta(seconds=n))
    page = client.list_invocation_steps(sessionIdentifier=sid)
    assert len(page["invocationStepSummaries"]) == 3 and page["nextToken"]


# -- state machine ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["overwrite", "conflict"])
def test_duplicate_step_ids(fake, client, mode):
    fake.duplicate_steps = mode
    sid = new_session(client)
    client.create_invocation(sessionIdentifier=sid, invocationId=INV)
    step = "33333333-2222-4333-8444-555555555555"
    put(client, sid, "first", step=step)
    if mode == "conflict":
        with pytest.raises(ClientError) as e:
            put(client, sid, "second", step=step)
        assert code(e.value)[0] == "ConflictException"
    else:
        put(client, sid, "second", step=step)
    got = client.get_invocation_step(sessionIdentifier=sid, invocationIdentifier=INV, invocationStepId=step)
    assert got["invocationStep"]["payload"]["contentBlocks"][0]["text"] == ("first" if mode == "conflict" else "second")
    assert fake.snapshot(sid)["steps"] == 1


def test_expired_and_ended_sessions(fake, client):
    sid = new_session(client, sessionMetadata={"a": "1"})
    client.create_invocation(sessionIdentifier=sid, invocationId=INV)
    before = client.get_session(sessionIdentifier=sid)["lastUpdatedAt"]
    time.sleep(0.002)
    put(client, sid)
    assert client.get_session(sessionIdentifier=sid)["lastUpdatedAt"] > before  # a step bumps lastUpdatedAt
    fake.expire(sid)
    assert client.get_session(sessionIdentifier=sid)["sessionStatus"] == "EXPIRED"
    for call in (lambda: put(client, sid),
                 lambda: client.create_invocation(sessionIdentifier=sid),
                 lambda: client.update_session(sessionIdentifier=sid, sessionMetadata={})):
        with pytest.raises(ClientError) as e:
            call()
        assert code(e.value) == ("ConflictException", 409)
    assert client.end_session(sessionIdentifier=sid)["sessionStatus"] == "EXPIRED"  # idempotent, unchanged
    client.delete_session(sessionIdentifier=sid)  # not ACTIVE: may be deleted
    assert fake.snapshot(sid) is None
    other = new_session(client)
    client.end_session(sessionIdentifier=other)
    assert client.end_session(sessionIdentifier=other)["sessionStatus"] == "ENDED"
    with pytest.raises(KeyError):
        fake.expire("44444444-2222-4333-8444-555555555555")


def test_encryption_key_is_echoed(client):
    key = "arn:aws:kms:us-east-1:123456789012:key/12345678-1234-1234-1234-123456789012"
    sid = new_session(client, encryptionKeyArn=key)
    assert client.get_session(sessionIdentifier=sid)["encryptionKeyArn"] == key
    assert "encryptionKeyArn" not in client.get_session(sessionIdentifier=new_session(client))
    with pytest.raises(ClientError):
        client.create_session(encryptionKeyArn="alias/mine")


# -- wire format -----------------------------------------------------------------------------------------
def test_error_wire_format(fake):
    with urllib.request.urlopen(urllib.request.Request(fake.url + "/sessions/", method="PUT"), timeout=5) as r:
        assert r.status == 201 and r.headers["x-amzn-RequestId"]
        assert r.headers["Content-Type"] == "application/json"
    req = urllib.request.Request(fake.url + "/sessions/00000000-0000-4000-8000-000000000000/", method="GET")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=5)
    assert e.value.code == 404
    assert e.value.headers["x-amzn-ErrorType"] == "ResourceNotFoundException"
    assert e.value.headers["x-amzn-RequestId"]
    assert set(json.loads(e.value.read())) == {"message"}
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(urllib.request.Request(fake.url + "/nowhere", method="GET"), timeout=5)
    assert e.value.code == 400 and e.value.headers["x-amzn-ErrorType"] == "ValidationException"


# -- fault injection -------------------------------------------------------------------------------------
def test_injected_errors_and_botocore_retries(fake, fast_backoff):
    retrying = fake.client(retries={"mode": "standard", "max_attempts": 4})
    sid = new_session(retrying)
    fake.reset_calls()
    fake.inject("GetSession", "ThrottlingException", times=2)
    fake.inject("get_session", "InternalServer")  # snake_case and short names are accepted
    r = retrying.get_session(sessionIdentifier=sid)
    assert r["ResponseMetadata"]["RetryAttempts"] == 3 and fake.calls["GetSession"] == 4

    fake.reset_calls()
    fake.inject("CreateInvocation", "ServiceQuotaExceededException")
    with pytest.raises(ClientError) as e:
        retrying.create_invocation(sessionIdentifier=sid)
    assert code(e.value) == ("ServiceQuotaExceededException", 400)
    assert fake.calls["CreateInvocation"] == 1  # a 400: not retried

    fake.inject("*", "Conflict", times=1)
    with pytest.raises(ClientError) as e:
        retrying.list_sessions()
    assert code(e.value) == ("ConflictException", 409)

    fake.inject("GetSession", "Throttling", times=5)  # more than the attempts (1 + 4 retries)
    with pytest.raises(ClientError) as e:
        retrying.get_session(sessionIdentifier=sid)
    assert code(e.value) == ("ThrottlingException", 429)
    assert fake.pending_faults() == {"errors": {}, "drops": {}}
    with pytest.raises(ValueError):
        fake.inject("NoSuchOperation", "Throttling")
    with pytest.raises(ValueError):
        fake.inject("GetSession", "NoSuchError")


def test_drop_after_commit_makes_the_client_retry_a_committed_write(fake):
    retrying = fake.client(retries={"mode": "standard", "max_attempts": 3})
    sid = new_session(retrying)
    fake.drop_after_commit("CreateInvocation")
    with pytest.raises(ClientError) as e:  # the retry finds what the dropped attempt committed
        retrying.create_invocation(sessionIdentifier=sid, invocationId=INV)
    assert code(e.value)[0] == "ConflictException"
    assert fake.calls["CreateInvocation"] == 2 and fake.snapshot(sid)["invocations"] == 1

    fake.drop_after_commit("CreateSession")  # no idempotency token: the retry makes a second session
    retrying.create_session()
    assert len(fake.session_ids()) == 3

    fake.inject("GetSession", "Drop")  # dropped before committing, then retried
    assert retrying.get_session(sessionIdentifier=sid)["ResponseMetadata"]["RetryAttempts"] == 1


def test_latency_global_and_per_operation(fake, client):
    sid = new_session(client)
    fake.latency = 0.05
    t = time.perf_counter()
    client.get_session(sessionIdentifier=sid)
    assert time.perf_counter() - t >= 0.05
    fake.latency = 0
    fake.set_latency("ListSessions", 0.1)
    t = time.perf_counter()
    client.get_session(sessionIdentifier=sid)
    fast = time.perf_counter() - t
    t = time.perf_counter()
    client.list_sessions()
    assert fast < 0.1 <= time.perf_counter() - t


def test_concurrent_clients(fake):
    from concurrent.futures import ThreadPoolExecutor

    c = fake.client(max_pool_connections=16)
    sid = new_session(c)
    c.create_invocation(sessionIdentifier=sid, invocationId=INV)
    fake.latency = 0.25
    t = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda n: put(c, sid, str(n), T0 + timedelta(seconds=n)), range(16)))
    # one at a time would take 16 x 0.25 = 4 s; half of that is a wide margin for a loaded machine
    assert time.perf_counter() - t < 2.0
    assert fake.snapshot(sid)["steps"] == 16 and fake.calls["PutInvocationStep"] == 16


# -- admin API -------------------------------------------------------------------------------------------
def test_admin_api(fake, client):
    sid = new_session(client)
    assert admin(fake, "calls") == {"calls": {"CreateSession": 1}, "total": 1}
    admin(fake, "reset_calls", {})
    assert admin(fake, "calls")["total"] == 0
    admin(fake, "inject", {"op": "GetSession", "error": "ThrottlingException", "times": 1})
    with pytest.raises(ClientError) as e:
        client.get_session(sessionIdentifier=sid)
    assert code(e.value) == ("ThrottlingException", 429)
    cfg = admin(fake, "config", {"latency_ms": 5, "oldest_first": True, "duplicate_steps": "conflict",
                                 "max_text_bytes": 10})
    assert cfg["latency"] == 0.005 and cfg["oldest_first"] and fake.duplicate_steps == "conflict"
    assert admin(fake, "config")["max_text_bytes"] == 10
    assert admin(fake, "expire/" + sid, {})["sessionStatus"] == "EXPIRED"
    assert client.get_session(sessionIdentifier=sid)["sessionStatus"] == "EXPIRED"
    assert admin(fake, "sessions/" + sid)["steps"] == 0
    admin(fake, "drop_after_commit", {"op": "ListSessions", "times": 2})
    assert admin(fake, "faults")["drops"] == {"ListSessions": 2}
    admin(fake, "clear_faults", {})
    assert admin(fake, "faults") == {"errors": {}, "drops": {}}
    for path, body in [("inject", {"op": "Nope"}), ("config", {"nope": 1}), ("expire/" + INV, {}), ("what", {})]:
        with pytest.raises(urllib.error.HTTPError) as e:
            admin(fake, path, body)
        assert e.value.code in (400, 404)
    admin(fake, "reset", {})
    assert fake.session_ids() == []


def test_runs_as_a_subprocess():
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.emulate.agent_runtime", "--port", "0", "--latency-ms", "1", "--oldest-first"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        f = AgentRuntimeFake()
        f.host, f.port = "127.0.0.1", int(url.rsplit(":", 1)[1])  # a handle for its client() and url only
        c = f.client(retries={"mode": "standard", "max_attempts": 0})
        sid = new_session(c)
        assert admin(f, "config")["oldest_first"] is True
        assert admin(f, "calls")["calls"] == {"CreateSession": 1}
        admin(f, "expire/" + sid, {})
        assert c.get_session(sessionIdentifier=sid)["sessionStatus"] == "EXPIRED"
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
