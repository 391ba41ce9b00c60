"""The start-up permission check (gateway/preflight.py, docs/iam.md): `novagate check` and `novagate serve`
run as a user runs them, the real SDKs (boto3 for Agent Runtime, aws-sdk-bedrock-runtime for Nova Sonic)
against the project's emulators told to deny actions as IAM would; and the KMS key setting through boto3.

No timed assertions: every wait is a generous upper bound."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import boto3
import httpx
import pytest

from gateway import preflight
from gateway.config import ConfigError, Settings
from gateway.emulate.agent_runtime import AgentRuntimeFake
from gateway.store import open_store
from gateway.store.agent_runtime import AgentRuntimeStore
from protocol.items import Item

from .conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
SECRET = "novagate-preflight-test-secret-value"
MODEL_ARN = "arn:aws:bedrock:us-east-1::foundation-model/amazon.nova-2-sonic-v1:0"
KMS_ARN = "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"
READS = {"GetSession", "ListInvocationSteps", "GetInvocationStep", "ListSessions"}


def _wait_port(port: int, proc: subprocess.Popen, what: str) -> None:
    import socket

    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{what} did not start")


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    from gateway.emulate.nova import make_test_tls

    _ca, cert, key, bundle = make_test_tls(tmp_path_factory.mktemp("tls"))
    return cert, key, bundle


@pytest.fixture(scope="module")
def novas(tls, tmp_path_factory):
    """Nova Sonic emulators (the scripted engine, no speech models): one allows every stream; one answers
    as IAM does to a caller without bedrock:InvokeModelWithBidirectionalStream; one as Bedrock does to an
    account without access to the model; one fails every stream it accepted (a validationException frame)."""
    cert, key, _ = tls
    log = open(tmp_path_factory.mktemp("nova") / "nova.log", "wb")
    ports, procs = {}, []
    for name, extra in (("ok", []), ("denied", ["--deny", "InvokeModelWithBidirectionalStream"]),
                        ("no-access", ["--reject-403"]),
                        ("invalid", ["--inject", "validationException", "--inject-every-stream"])):
        ports[name] = free_port()
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "emulate", "nova", "--port", str(ports[name]), "--cert", cert,
             "--key", key, "--engine", "scripted", "--no-warm", *extra],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT))
    try:
        for name, proc in zip(ports, procs, strict=True):
            _wait_port(ports[name], proc, f"nova emulator ({name})")
        yield ports
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture
def fake():
    f = AgentRuntimeFake().start()
    yield f
    f.stop()


def aws_env(tls, nova_port: int, fake_url: str, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NOVAGATE_", "AWS_"))}
    env.update({
        "AWS_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": "AKIDNOVAGATETEST", "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE":
        "/nonexistent", "AWS_ENDPOINT_URL_BEDROCK_RUNTIME": f"https://localhost:{nova_port}",
        "AWS_ENDPOINT_URL_BEDROCK_AGENT_RUNTIME": fake_url, "SSL_CERT_FILE": tls[2],
        "NOVAGATE_ENGINE": "bedrock", "NOVAGATE_STORE": "agent-runtime", "NOVAGATE_PREFLIGHT_TIMEOUT_S": "30",
    })
    env.update({k: str(v) for k, v in extra.items()})
    return env


def check(env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "gateway.cli", "check"], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=180)
    assert SECRET not in proc.stdout + proc.stderr  # nothing secret in its output
    return proc


def lines(proc: subprocess.CompletedProcess) -> dict[str, str]:
    """check -> its line, from `novagate check`'s output."""
    out = {}
    for line in proc.stdout.splitlines():
        status, _, rest = line.partition(" ")
        name, _, detail = rest.strip().partition(": ")
        if status.isupper():
            out[name] = f"{status} {detail}"
    return out


def dead_port() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there


# ---------------------------------------------------------------------------------------------
# novagate check


def test_everything_allowed_passes_without_writing(tls, novas, fake):
    proc = check(aws_env(tls, novas["ok"], fake.url))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = lines(proc)
    for name in ("credentials", "nova-sonic", "bedrock:GetSession", "bedrock:ListInvocationSteps",
                 "bedrock:GetInvocationStep"):
        assert got[name].startswith("OK "), (name, proc.stdout)
    assert MODEL_ARN in got["nova-sonic"]
    assert got["bedrock:ListSessions"].startswith("SKIPPED ")  # this configuration does not list sessions
    assert "every check passed" in proc.stdout
    # read-only: GetSession and friends on an id nobody has, nothing created
    assert set(fake.calls) == {"GetSession", "ListInvocationSteps", "GetInvocationStep"}
    assert fake.session_ids() == []


def test_a_denied_get_session_is_named_with_its_resource(tls, novas, fake):
    fake.configure(deny=["GetSession"])
    proc = check(aws_env(tls, novas["ok"], fake.url))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    got = lines(proc)
    assert got["bedrock:GetSession"] == (
        "DENIED missing permission bedrock:GetSession on arn:aws:bedrock:us-east-1:123456789012:session/* "
        "(no identity-based policy allows the bedrock:GetSession action)")
    assert got["bedrock:ListInvocationSteps"].startswith("OK ") and got["nova-sonic"].startswith("OK ")
    assert "1 problem" in proc.stdout


def test_a_denied_model_stream_names_the_action_and_the_model(tls, novas, fake):
    proc = check(aws_env(tls, novas["denied"], fake.url, NOVAGATE_STORE="sqlite"))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    got = lines(proc)
    assert got["nova-sonic"].startswith(
        f"DENIED missing permission bedrock:InvokeModelWithBidirectionalStream on {MODEL_ARN}"), proc.stdout
    assert not any(name.startswith("bedrock:") for name in got)  # store sqlite: no Agent Runtime check


def test_no_model_access_and_a_failing_stream(tls, novas, fake):
    env = aws_env(tls, novas["no-access"], fake.url, NOVAGATE_STORE="sqlite")
    proc = check(env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert lines(proc)["nova-sonic"].startswith("FAILED no access to model amazon.nova-2-sonic-v1:0 in us-east-1")
    # after the HTTP 200 the stream is authorized: what the model then says of an empty session is no refusal
    proc = check({**env, "AWS_ENDPOINT_URL_BEDROCK_RUNTIME": f"https://localhost:{novas['invalid']}"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert lines(proc)["nova-sonic"].startswith("OK ") and "then validationException" in lines(proc)["nova-sonic"]
    proc = check({**env, "AWS_ENDPOINT_URL_BEDROCK_RUNTIME": f"https://localhost:{novas['ok']}",
                  "NOVAGATE_MODEL_ID": "amazon.nova-9-sonic-v1:0"})  # not offered: 404
    assert proc.returncode == 2 and lines(proc)["nova-sonic"].startswith(
        "FAILED model amazon.nova-9-sonic-v1:0 cannot be used in us-east-1: ResourceNotFoundException")


def test_list_sessions_is_checked_when_telephony_resumes_calls(tls, novas, fake):
    env = aws_env(tls, novas["ok"], fake.url, NOVAGATE_TWILIO_INSECURE="true", NOVAGATE_ENGINE="local")
    proc = check(env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert lines(proc)["bedrock:ListSessions"].startswith("OK ") and fake.calls["ListSessions"] == 1
    assert "nova-sonic" not in lines(proc)  # engine local: no stream
    fake.configure(deny=["ListSessions"])
    proc = check(env)
    assert proc.returncode == 2
    assert lines(proc)["bedrock:ListSessions"] == (
        "DENIED missing permission bedrock:ListSessions on * "
        "(no identity-based policy allows the bedrock:ListSessions action)")
    proc = check({**env, "NOVAGATE_TWILIO_RESUME_WINDOW_S": "0"})  # no resume: not needed, not asked
    assert proc.returncode == 0 and lines(proc)["bedrock:ListSessions"].startswith("SKIPPED ")


def test_unreachable_services_are_reported_not_failed(tls, novas):
    proc = check(aws_env(tls, free_port(), dead_port(), NOVAGATE_PREFLIGHT_TIMEOUT_S="5"))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    got = lines(proc)
    assert got["nova-sonic"].startswith("UNREACHABLE ") and got["bedrock:GetSession"].startswith("UNREACHABLE ")
    assert "could not finish" in proc.stdout


def test_a_bad_kms_key_setting_is_a_configuration_error(tls, novas, fake):
    proc = check(aws_env(tls, novas["ok"], fake.url, NOVAGATE_AGENT_RUNTIME_KMS_KEY_ARN="alias/novagate"))
    assert proc.returncode == 2 and "NOVAGATE_AGENT_RUNTIME_KMS_KEY_ARN" in proc.stderr
    proc = check(aws_env(tls, novas["ok"], fake.url, NOVAGATE_AGENT_RUNTIME_KMS_KEY_ARN=KMS_ARN))
    assert proc.returncode == 0 and lines(proc)["kms"].startswith("SKIPPED ") and KMS_ARN in lines(proc)["kms"]


def test_nothing_to_check_without_aws():
    env = {k: v for k, v in os.environ.items() if not k.startswith("NOVAGATE_")}
    proc = subprocess.run([sys.executable, "-m", "gateway.cli", "check", "--engine", "local", "--store", "sqlite"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "nothing to check" in proc.stdout


# ---------------------------------------------------------------------------------------------
# novagate serve


def serve(env: dict, tmp_path: Path) -> tuple[subprocess.Popen, int, Path]:
    port = free_port()
    env = {**env, "NOVAGATE_HOST": "127.0.0.1", "NOVAGATE_PORT": str(port), "NOVAGATE_WORKERS": "1",
           "NOVAGATE_METRICS_PORT": "0", "NOVAGATE_SECRET_FILE": str(tmp_path / "secret"),
           "NOVAGATE_SQLITE_PATH": str(tmp_path / "novagate.db"), "NOVAGATE_OVERLOAD_LAG_MS": "0",
           "NOVAGATE_OVERLOAD_CPU": "0"}
    log = tmp_path / f"serve-{port}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve"], env=env, cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT)
    return proc, port, log


def serving(proc: subprocess.Popen, port: int) -> bool:
    """Whether the gateway answers /healthz (False when it exited first)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError("the gateway neither served nor exited")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def refused_start(env: dict, tmp_path) -> str:
    """`novagate serve` that the check stops: it exits 2; returns what it logged."""
    proc, _port, log = serve(env, tmp_path)
    try:
        assert proc.wait(180) == 2
    finally:
        stop(proc)
    return log.read_text()


def test_serve_stops_with_the_missing_permission(tls, novas, fake, tmp_path):
    fake.configure(deny=["GetSession"])
    text = refused_start(aws_env(tls, novas["ok"], fake.url), tmp_path)
    assert "cannot start: bedrock:GetSession: missing permission bedrock:GetSession on " \
           "arn:aws:bedrock:us-east-1:123456789012:session/*" in text, text[-3000:]
    assert SECRET not in text


def test_serve_stops_when_the_model_stream_is_denied(tls, novas, fake, tmp_path):
    text = refused_start(aws_env(tls, novas["denied"], fake.url), tmp_path)
    assert f"missing permission bedrock:InvokeModelWithBidirectionalStream on {MODEL_ARN}" in text, text[-3000:]


def test_serve_starts_with_a_warning_when_aws_is_unreachable(tls, tmp_path):
    env = aws_env(tls, free_port(), dead_port(), NOVAGATE_STORE="sqlite", NOVAGATE_PREFLIGHT_TIMEOUT_S="5")
    proc, port, log = serve(env, tmp_path)
    try:
        assert serving(proc, port), log.read_text()[-3000:]
    finally:
        stop(proc)
    text = log.read_text()
    assert "preflight: UNREACHABLE nova-sonic" in text and "could not finish" in text and "starting anyway" in text


def test_preflight_false_starts_without_the_check(tls, novas, fake, tmp_path):
    fake.configure(deny=["*"])
    proc, port, log = serve(aws_env(tls, novas["denied"], fake.url, NOVAGATE_PREFLIGHT="false"), tmp_path)
    try:
        assert serving(proc, port), log.read_text()[-3000:]
    finally:
        stop(proc)
    assert "preflight" not in log.read_text()


# ---------------------------------------------------------------------------------------------
# The KMS key: CreateSession's encryptionKeyArn, through boto3 against the emulator


def boto_session() -> boto3.session.Session:
    return boto3.session.Session(aws_access_key_id="x", aws_secret_access_key="y", region_name="us-east-1")


async def test_sessions_are_created_with_the_configured_key(fake):
    settings = Settings.from_env({}, store="agent-runtime", region="us-east-1", agent_runtime_endpoint=fake.url,
                                 agent_runtime_kms_key_arn=KMS_ARN)
    store = open_store(settings)
    assert isinstance(store, AgentRuntimeStore)
    store._boto_session = boto_session()
    client = fake.client()
    try:
        cid = await store.create("owner-hash")
        assert client.get_session(sessionIdentifier=cid)["encryptionKeyArn"] == KMS_ARN
        await store.append(cid, Item("i1", "user", "hello", "2026-11-30T00:00:00Z"), connection_id="c1")
        fake.end(cid)  # ended by the service: the next write continues in a new session, with the same key
        moved = await store.append(cid, Item("i2", "user", "again", "2026-11-30T00:00:01Z"), connection_id="c1")
        assert moved != cid
        assert client.get_session(sessionIdentifier=moved)["encryptionKeyArn"] == KMS_ARN
    finally:
        await store.aclose()


async def test_without_a_key_sessions_get_none(fake):
    store = AgentRuntimeStore(region="us-east-1", endpoint_url=fake.url, session=boto_session())
    try:
        cid = await store.create("owner-hash")
        assert "encryptionKeyArn" not in fake.client().get_session(sessionIdentifier=cid)
    finally:
        await store.aclose()


@pytest.mark.parametrize("arn, needle", [
    ("alias/novagate", "not a KMS key ARN"),
    ("arn:aws:kms:us-east-1:123456789012:alias/novagate", "not a KMS key ARN"),
    ("arn:aws:kms:us-west-2:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab", "us-west-2"),
])
def test_the_key_setting_is_validated(arn, needle):
    with pytest.raises(ConfigError, match=needle):
        Settings.from_env({}, store="agent-runtime", region="us-east-1", agent_runtime_kms_key_arn=arn)
    assert Settings.from_env({}, store="agent-runtime", region="us-east-1",
                             agent_runtime_kms_key_arn=KMS_ARN.replace("1234abcd-12ab-34cd-56ef-1234567890ab",
                                                                       "mrk-1234abcd12ab34cd56ef1234567890ab"))


# ---------------------------------------------------------------------------------------------
# Messages


@pytest.mark.parametrize("message, expected", [
    ("User: arn:aws:sts::111122223333:assumed-role/novagate/i-0abc is not authorized to perform: bedrock:GetSession "
     "on resource: arn:aws:bedrock:eu-west-1:111122223333:session/PROBE with an explicit deny in a service control "
     "policy",
     "missing permission bedrock:GetSession on arn:aws:bedrock:eu-west-1:111122223333:session/* "
     "(an explicit deny in a service control policy)"),
    ("User: arn:aws:sts::111122223333:assumed-role/r/s is not authorized to perform: bedrock:InvokeModel on resource: "
     "arn:aws:bedrock:us-east-1::foundation-model/amazon.nova-2-sonic-v1:0 because no identity-based policy allows "
     "the bedrock:InvokeModel action",
     "missing permission bedrock:InvokeModel on arn:aws:bedrock:us-east-1::foundation-model/amazon.nova-2-sonic-v1:0 "
     "(no identity-based policy allows the bedrock:InvokeModel action)"),
    ("Access denied by arn:aws:sts::111122223333:assumed-role/r/s",
     "missing permission bedrock:GetSession on arn:aws:bedrock:eu-west-1:111122223333:session/* "
     "(AWS: Access denied by arn:aws:sts::111122223333:assumed-role/r/s)"),
])
def test_missing_permission_takes_what_aws_names(message, expected):
    assert preflight.missing_permission(message, action="bedrock:GetSession",
                                        resource="arn:aws:bedrock:eu-west-1:ACCOUNT:session/*",
                                        probe_id="PROBE") == expected


def test_output_is_cleaned():
    assert preflight.clean("Could not connect to https://user:pw@proxy:3128/x\n now") == \
        "Could not connect to https://***@proxy:3128/x now"
    assert len(preflight.clean("x" * 5000)) == 500
    assert preflight.model_arn("us.amazon.nova-2-sonic-v1:0", "us-east-1") == \
        "arn:aws:bedrock:us-east-1:ACCOUNT:inference-profile/us.amazon.nova-2-sonic-v1:0"
