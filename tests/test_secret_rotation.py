"""Rotating the server secret with a grace period (NOVAGATE_SECRET_PREVIOUS): resume tokens and
receipts signed with an earlier secret still verify, nothing new is signed with it, and once it is
removed what it signed stops working. Unit tests of `Signer` and the settings, then real gateway
processes (the scripted engine, SQLite) handed over from one secret to the next, one of them with two
workers (the supervisor passes the settings to its workers through the environment)."""

from __future__ import annotations

import time

import httpx
import pytest

from gateway.cli import main
from gateway.client import ClientState, VoiceClient
from gateway.config import ConfigError, Settings
from gateway.tokens import Signer, load_previous_secrets
from protocol.items import Item

OLD = "the-old-server-secret-of-at-least-32-bytes"
NEW = "the-new-server-secret-of-at-least-32-bytes"
OLDER = "an-even-older-server-secret-of-32-bytes-or-more"


def test_tokens_signed_with_a_previous_secret_verify_and_new_ones_use_the_current():
    old = Signer(OLD.encode(), resume_ttl=600)
    token = old.resume_token("conv-1", "anon:abc", 2)
    receipt = old.receipt("conv-1", Item("i1", "user", "hi", "2026-01-01T00:00:00.000000Z"))
    rotated = Signer(NEW.encode(), resume_ttl=600, previous=[OLDER.encode(), OLD.encode()])
    claim = rotated.read_resume_token(token)
    assert (claim.conversation_id, claim.owner, claim.epoch) == ("conv-1", "anon:abc", 2)
    assert rotated.read_receipt(receipt, "conv-1").text == "hi"
    assert rotated.read_receipt(receipt, "conv-2") is None  # still bound to its conversation
    # what the rotated signer mints is signed with the new secret only
    fresh = rotated.resume_token("conv-1", "anon:abc")
    assert Signer(NEW.encode()).read_resume_token(fresh) is not None
    assert old.read_resume_token(fresh) is None
    fresh_receipt = rotated.receipt("conv-1", Item("i2", "assistant", "hello", "2026-01-01T00:00:01.000000Z"))
    assert old.read_receipt(fresh_receipt, "conv-1") is None
    # the grace period ends: without the previous secret, what it signed is refused
    done = Signer(NEW.encode(), resume_ttl=600)
    assert done.read_resume_token(token) is None and done.read_receipt(receipt, "conv-1") is None
    # a secret never configured is refused as before
    assert rotated.read_resume_token(Signer(b"x" * 40).resume_token("conv-1", "anon:abc")) is None


def test_a_previous_secret_does_not_extend_what_it_signed():
    expired = Signer(OLD.encode(), resume_ttl=-1).resume_token("conv-1", "anon:abc")
    rotated = Signer(NEW.encode(), previous=[OLD.encode()])
    assert rotated.read_resume_token(expired) is None  # expired is final, not "try the next key"
    resume = Signer(OLD.encode()).resume_token("conv-1", "anon:abc")
    assert rotated.read_receipt(resume, "conv-1") is None  # audiences still apply
    # the current secret listed again as a previous one changes nothing
    same = Signer(NEW.encode(), previous=[NEW.encode(), NEW.encode()])
    assert same.read_resume_token(same.resume_token("c", "o")) is not None


def test_previous_secrets_from_the_environment_or_a_file(tmp_path):
    assert load_previous_secrets("", "") == ()
    assert load_previous_secrets(f"{OLD}, {OLDER},{OLD}") == (OLD.encode(), OLDER.encode())
    path = tmp_path / "previous"
    path.write_text(f"{OLD}\n\n{OLDER}\n")
    path.chmod(0o600)
    assert load_previous_secrets("", str(path)) == (OLD.encode(), OLDER.encode())
    with pytest.raises(ConfigError, match="NOVAGATE_SECRET_PREVIOUS is 5 bytes"):
        load_previous_secrets(f"{OLD},short")
    path.write_text("short\n")
    with pytest.raises(ConfigError, match="NOVAGATE_SECRET_PREVIOUS_FILE .* is 5 bytes"):
        load_previous_secrets("", str(path))
    with pytest.raises(ConfigError, match="NOVAGATE_SECRET_PREVIOUS_FILE: cannot read"):
        load_previous_secrets("", str(tmp_path / "missing"))


def test_previous_secrets_are_checked_with_the_settings_and_are_never_flags(capsys):
    s = Settings.from_env({"NOVAGATE_SECRET_PREVIOUS": f"{OLD},{OLDER}"})
    assert OLD not in repr(s)  # kept out of logs, like the secret itself
    with pytest.raises(ConfigError, match="NOVAGATE_SECRET_PREVIOUS: secret 2 is 5 bytes"):
        Settings.from_env({"NOVAGATE_SECRET_PREVIOUS": f"{OLD},short"})
    with pytest.raises(ConfigError, match="NOVAGATE_SECRET_PREVIOUS: secret 2 is 0 bytes"):
        Settings.from_env({"NOVAGATE_SECRET_PREVIOUS": f"{OLD},"})
    with pytest.raises(ConfigError, match="not both"):
        Settings.from_env({"NOVAGATE_SECRET_PREVIOUS": OLD, "NOVAGATE_SECRET_PREVIOUS_FILE": "/x"})
    with pytest.raises(SystemExit):
        main(["serve", "--secret-previous", OLD])
    assert "NOVAGATE_SECRET_PREVIOUS" in capsys.readouterr().err


# -- real gateways handed over from one secret to the next ------------------------------------------
@pytest.fixture(scope="module")
def backend() -> dict:
    return {"NOVAGATE_ENGINE": "scripted"}  # no speech models: this is about tokens


async def _history(gw, cid: str, token: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=gw.http, timeout=10) as h:
        return await h.get(f"/v1/conversations/{cid}/history", headers={"X-Resume-Token": token})


async def test_a_rotated_gateway_honours_the_previous_secret_until_it_is_removed(make_gateway, tmp_path):
    gw = make_gateway(NOVAGATE_SECRET=OLD)
    c = VoiceClient(gw.ws, state=ClientState())
    await c.connect(mic=False)
    await c.turn(text="hello there")
    token, cid = c.ready["resume_token"], c.ready["conversation_id"]
    await c.close()
    gw.stop()

    # a receipt for an item the old gateway signed but never stored (as after a crash)
    lost = Item("item-signed-by-the-old-secret", "user", "remember the blue door",
                time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime()))
    receipt = Signer(OLD.encode()).receipt(cid, lost)

    # rotated: the new secret signs, the old one (from a file, two workers) still verifies
    previous = tmp_path / "previous-secrets"
    previous.write_text(OLD + "\n")
    previous.chmod(0o600)
    gw = make_gateway(NOVAGATE_SECRET=NEW, NOVAGATE_SECRET_PREVIOUS_FILE=previous, NOVAGATE_WORKERS=2)
    r = VoiceClient(gw.ws, state=ClientState(resume_token=token, pending={lost.item_id: receipt}))
    await r.connect(mic=False)
    assert r.ready["resumed"] is True and r.ready["conversation_id"] == cid
    await r.wait_for(lambda: not r.state.pending, 15)  # the receipt was accepted: item.saved
    new_token = r.ready["resume_token"]
    await r.close()
    assert Signer(NEW.encode()).read_resume_token(new_token) is not None  # minted with the new secret
    assert Signer(OLD.encode()).read_resume_token(new_token) is None
    for _ in range(4):  # whichever worker answers
        assert (await _history(gw, cid, token)).status_code == 200
    texts = [i["text"] for i in (await _history(gw, cid, new_token)).json()["history"]]
    assert "remember the blue door" in texts
    gw.stop()

    # the grace period is over: the old secret is removed, what it signed stops working
    gw = make_gateway(NOVAGATE_SECRET=NEW)
    assert (await _history(gw, cid, token)).status_code == 404
    assert (await _history(gw, cid, new_token)).status_code == 200
    x = VoiceClient(gw.ws, state=ClientState(resume_token=token))
    await x.connect(mic=False)
    assert x.ready["resumed"] is False and x.ready["resume_failed"] == "not_found"
    await x.close()
