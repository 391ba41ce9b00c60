"""Revocation, take-over and history pages over the real gateway (SQLite): tokens minted before a
revocation stop working, a second connection takes a conversation over, DELETE closes its live
session, and the history comes in pages."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import httpx
import pytest

from gateway.client import ClientState, VoiceClient


@pytest.fixture(scope="module")
def backend() -> dict:
    return {}


async def test_take_over_delete_and_pages(make_gateway):
    gw = make_gateway()
    c = VoiceClient(gw.ws, state=ClientState())
    await c.connect(mic=False)
    for n in range(3):
        await c.turn(text=f"hello there {n}")
    token, cid = c.ready["resume_token"], c.ready["conversation_id"]
    # a second connection with the same token takes the conversation over: the first is closed 4409
    d = VoiceClient(gw.ws, state=ClientState(resume_token=token))
    await d.connect(mic=False)
    assert d.ready["resumed"]
    await c.wait_for(lambda: c.close_code is not None, 10)
    assert c.close_code == 4409 and any(m.get("code") == "taken_over" for m in c.messages if m["type"] == "error")
    await c.close()
    async with httpx.AsyncClient(base_url=gw.http) as h:
        headers = {"X-Resume-Token": token}
        url = f"/v1/conversations/{cid}/history"
        page = (await h.get(url, params={"limit": 4}, headers=headers)).json()
        assert page["history_length"] == 4 and page["next_before"] == page["history"][0]["item_id"]
        older = (await h.get(url, params={"limit": 4, "before": page["next_before"]}, headers=headers)).json()
        assert older["next_before"] is None and len(older["history"]) == 2
        full = (await h.get(url, headers=headers)).json()["history"]
        assert [i["item_id"] for i in older["history"] + page["history"]] == [i["item_id"] for i in full]
        assert (await h.get(url, params={"limit": 0}, headers=headers)).status_code == 400
        # DELETE closes the live session here at once
        assert (await h.delete(f"/v1/conversations/{cid}", headers=headers)).status_code == 204
    await d.wait_for(lambda: d.close_code is not None, 10)
    assert d.close_code == 4409 and any(m.get("code") == "conversation_gone" for m in d.messages
                                        if m["type"] == "error")
    await d.close()


async def test_a_revoked_conversation_refuses_old_tokens(make_gateway, tmp_path):
    gw = make_gateway()
    c = VoiceClient(gw.ws, state=ClientState())
    await c.connect(mic=False)
    await c.turn(text="hello there")
    token, cid = c.ready["resume_token"], c.ready["conversation_id"]
    await c.close()
    await asyncio.sleep(0.5)
    out = subprocess.run([sys.executable, "-m", "gateway.cli", "revoke", cid], env=gw.env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and f"revoked {cid}: epoch 1" in out.stdout, out.stderr
    x = VoiceClient(gw.ws, state=ClientState(resume_token=token))
    await x.connect(mic=False)
    assert x.ready["resumed"] is False and x.ready["resume_failed"] == "not_found"
    await x.close()
    async with httpx.AsyncClient(base_url=gw.http) as h:
        r = await h.get(f"/v1/conversations/{cid}/history", headers={"X-Resume-Token": token})
        assert r.status_code == 404
