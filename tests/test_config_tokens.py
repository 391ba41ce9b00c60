"""Settings from the environment and flags; resume tokens, receipts and bearer tokens."""

import os
import stat
import time

import jwt
import pytest

from gateway.cli import main
from gateway.config import ConfigError, Settings
from gateway.tokens import Authenticator, Signer, load_secret
from protocol.items import Item


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
    assert load_secret("configured", str(path)) == b"configured"


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


def test_bearer_tokens():
    key = "an-hs256-key-of-at-least-32-bytes!"
    auth = Authenticator(key)
    good = jwt.encode({"sub": "alice", "exp": int(time.time()) + 60}, key, algorithm="HS256")
    assert auth.principal(good) == "user:alice"
    assert auth.principal(jwt.encode({"sub": "alice"}, "wrong-key-wrong-key-wrong-key-wrong", algorithm="HS256")) is None
    assert auth.principal(jwt.encode({"sub": "a", "exp": 1}, key, algorithm="HS256")) is None
    assert auth.principal(jwt.encode({"name": "no sub"}, key, algorithm="HS256")) is None
    assert Authenticator("").principal(good) is None
