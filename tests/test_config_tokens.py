"""Settings from the environment and flags; resume tokens, receipts and bearer tokens."""

import logging
import os
import stat
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jwt
import pytest

from gateway.cli import main
from gateway.config import ConfigError, Settings
from gateway.tokens import Authenticator, Signer, load_secret
from protocol.items import Item

ROOT = Path(__file__).resolve().parent.parent


def test_settings_from_env_and_overrides():
    s = Settings.from_env({"NOVAGATE_PORT": "9001", "NOVAGATE_AUTH_REQUIRED": "true",
                           "NOVAGATE_LOCAL_GRAMMAR": "a b | c d"}, host="0.0.0.0")
    assert (s.port, s.auth_required, s.host, s.grammar) == (9001, True, "0.0.0.0", ("a b", "c d"))


@pytest.mark.parametrize("env, needle", [
    ({"NOVAGATE_PORT": "eighty"}, "NOVAGATE_PORT"),
    ({"NOVAGATE_ENGINE": "nova"}, "NOVAGATE_ENGINE='nova' is not one of"),
    ({"NOVAGATE_AUTH_REQUIRED": "maybe"}, "NOVAGATE_AUTH_REQUIRED"),
    ({"NOVAGATE_PORT": "70000"}, "not a valid port"),
])
def test_bad_settings_say_which(env, needle):
    with pytest.raises(ConfigError, match=needle):
        Settings.from_env(env)


def test_serve_refuses_bad_configuration(capsys, monkeypatch):
    monkeypatch.setenv("NOVAGATE_STORE", "postgres")
    assert main(["serve"]) == 2
    assert "NOVAGATE_STORE" in capsys.readouterr().err


def test_generated_secret_is_kept_private_and_reused(tmp_path):
    path = tmp_path / "var" / "secret"
    a = load_secret("", str(path))
    assert load_secret("", str(path)) == a and len(a) >= 32
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert os.listdir(path.parent) == ["secret"]  # no temporary file left behind
    configured = "a-configured-secret-of-32-bytes-or-more"
    assert load_secret(configured, str(path)) == configured.encode()


def test_short_secrets_are_refused_with_a_recipe(tmp_path):
    with pytest.raises(ConfigError, match=r"NOVAGATE_SECRET is 10 bytes.*secrets.token_urlsafe\(48\)"):
        load_secret("configured", str(tmp_path / "secret"))
    with pytest.raises(ConfigError, match="NOVAGATE_SECRET is 10 bytes.*at least 32"):
        Settings.from_env({"NOVAGATE_SECRET": "configured"})
    for content in (b"", b"\n", b"short-secret\n"):
        path = tmp_path / "short"
        path.write_bytes(content)
        os.chmod(path, 0o600)
        with pytest.raises(ConfigError, match="NOVAGATE_SECRET_FILE.*at least 32 bytes"):
            load_secret("", str(path))
        assert path.read_bytes() == content  # refused, not replaced


def test_loose_secret_file_permissions_are_logged(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="novagate.auth")
    path = tmp_path / "secret"
    path.write_text("x" * 40 + "\n")
    os.chmod(path, 0o644)
    assert load_secret("", str(path)) == b"x" * 40
    [warning] = [r for r in caplog.records if "readable by other users" in r.getMessage()]
    assert warning.fields["mode"] == "0644" and warning.fields["path"] == str(path)


def test_concurrent_first_starts_share_one_secret(tmp_path):
    path = tmp_path / "var" / "secret"
    barrier = threading.Barrier(16)

    def start():
        barrier.wait()
        return load_secret("", str(path))

    with ThreadPoolExecutor(16) as pool:
        values = set(pool.map(lambda _: start(), range(16)))
    assert values == {path.read_bytes().strip()} and len(values.pop()) >= 32
    # separate processes racing on another file
    path2 = tmp_path / "var2" / "secret"
    code = "import sys; from gateway.tokens import load_secret; print(load_secret('', sys.argv[1]).decode())"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(path2)], cwd=ROOT, stdout=subprocess.PIPE)
             for _ in range(6)]
    outs = {p.communicate(timeout=60)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert outs == {path2.read_bytes().strip()}
    assert os.listdir(path2.parent) == ["secret"]


def test_secrets_are_not_flags(capsys):
    for argv in (["serve", "--secret", "x" * 40], ["serve", "--secret=" + "x" * 40], ["serve", "--secret"],
                 ["serve", "--auth-jwt-secret", "y" * 40]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "is not accepted" in err and "NOVAGATE_" in err and "-file" in err
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    help_ = capsys.readouterr().out
    assert "--secret-file" in help_ and "--auth-jwt-secret-file" in help_
    assert "--secret " not in help_ and "--auth-jwt-secret " not in help_
    assert "never flags" in help_


def test_serve_refuses_a_short_secret_file(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("gateway.logs.setup", lambda *a, **k: None)
    short = tmp_path / "secret"
    short.write_text("short")
    os.chmod(short, 0o600)
    monkeypatch.setenv("NOVAGATE_SECRET_FILE", str(short))
    assert main(["serve"]) == 2
    assert "NOVAGATE_SECRET_FILE" in capsys.readouterr().err
    monkeypatch.setenv("NOVAGATE_SECRET_FILE", str(tmp_path / "fresh"))
    monkeypatch.setenv("NOVAGATE_AUTH_JWT_SECRET_FILE", str(short))
    assert main(["serve"]) == 2
    assert "NOVAGATE_AUTH_JWT_SECRET_FILE" in capsys.readouterr().err
    monkeypatch.setenv("NOVAGATE_SECRET", "short")
    assert main(["serve"]) == 2
    assert "token_urlsafe" in capsys.readouterr().err


def test_resume_token_roundtrip_and_rejections():
    signer = Signer(b"k1", resume_ttl=60)
    token = signer.resume_token("conv-1", "anon:abc")
    claim = signer.read_resume_token(token)
    assert (claim.conversation_id, claim.owner) == ("conv-1", "anon:abc")
    assert Signer(b"k2").read_resume_token(token) is None  # another server's secret
    assert signer.read_resume_token(token[:-2] + "xx") is None
    assert signer.read_resume_token("garbage") is None
    receipt = signer.receipt("conv-1", Item("i1", "user", "hi", "t"))
    assert signer.read_resume_token(receipt) is None  # a receipt is not a resume token
    expired = Signer(b"k1", resume_ttl=-1).resume_token("conv-1", "anon:abc")
    assert signer.read_resume_token(expired) is None


def test_receipts_bind_to_their_conversation():
    signer = Signer(b"k1")
    item = Item("i1", "assistant", "hello", "2026-11-24T10:00:00.000000Z", True)
    r = signer.receipt("conv-1", item)
    assert signer.read_receipt(r, "conv-1") == item
    assert signer.read_receipt(r, "conv-2") is None
    assert Signer(b"other").read_receipt(r, "conv-1") is None
    assert signer.read_receipt(signer.resume_token("conv-1", "o"), "conv-1") is None


async def test_bearer_tokens():
    key = "an-hs256-key-of-at-least-32-bytes!"
    auth = Authenticator(key)
    exp = int(time.time()) + 60
    good = jwt.encode({"sub": "alice", "exp": exp}, key, algorithm="HS256")
    assert auth.principal(good) == "user:alice"
    assert await auth.verify(good) == "user:alice"
    wrong_key = jwt.encode({"sub": "alice", "exp": exp}, "wrong-key-wrong-key-wrong-key-wrong", algorithm="HS256")
    for bad in (
        wrong_key,
        jwt.encode({"sub": "a", "exp": 1}, key, algorithm="HS256"),  # expired
        jwt.encode({"sub": "alice"}, key, algorithm="HS256"),  # no exp
        jwt.encode({"name": "no sub", "exp": exp}, key, algorithm="HS256"),
        jwt.encode({"sub": "", "exp": exp}, key, algorithm="HS256"),
    ):
        assert auth.principal(bad) is None
        assert await auth.verify(bad) is None
    assert Authenticator("").principal(good) is None
    assert await Authenticator("").verify(good) is None
    with pytest.raises(ConfigError, match="at least 32 bytes"):
        Authenticator("short-hs256-key")


def test_resume_tokens_carry_the_epoch_and_never_outlive_the_conversation():
    import time as _time

    signer = Signer(b"k" * 32, resume_ttl=86400)
    now = int(_time.time())
    claim = signer.read_resume_token(signer.resume_token("c", "anon:x", 3, now + 60))
    assert (claim.epoch, claim.not_after) == (3, now + 60)
    token = signer.resume_token("c", "anon:x", 0, now - 1)  # past the conversation's lifetime
    assert signer.read_resume_token(token) is None
    legacy = signer.read_resume_token(signer.resume_token("c", "anon:x"))
    assert (legacy.epoch, legacy.not_after) == (0, None)
