"""The browser app (`web/`) in a real headless Chromium against a real gateway process.

Chromium is Debian's (`/usr/bin/chromium`, installed by `make browser` / scripts/install-browser),
driven by Playwright with that binary: no browser download. Its microphone is a fake device that
plays a WAV file in a loop (`--use-file-for-fake-audio-capture`): scripted speech from
`conftest.speech()` (espeak, phrases of the test grammar) padded with silence so that turns separate.
The page's capture worklet resamples the device rate (Chromium's fake device runs at 44.1 kHz) to
16 kHz; the gateway runs the deterministic local engine (sphinx + espeak).

Tool calls: one test runs the page against tests/fake_voice_server.py (a stand-in gateway on loopback
that serves web/ under the gateway's CSP; the test plays the model and sends `tool.call` itself), one
against a real gateway with Python tools (tests/tools_fixture.py) and the scripted engine calling them on a
phrase of a typed turn (NOVAGATE_ENGINE_TOOL_CALLS).

If Chromium cannot be launched these tests FAIL (they are part of CI), saying what to install.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from gateway.client import write_wav

from .conftest import HELLO, MET, ROOT, STORY, Gateway, free_port, speech

CHROMIUM = os.environ.get("NOVAGATE_CHROMIUM", "/usr/bin/chromium")
SCREENSHOTS = ROOT / "var" / "screenshots"
WAV_RATE = 48000
CHROMIUM_ARGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--autoplay-policy=no-user-gesture-required",
]

pytestmark = pytest.mark.timeout(150)


@pytest.fixture(scope="module")
def backend() -> dict:
    """Only the embedded default (local engine, SQLite): the browser is what is under test here.
    No admin port (/metrics on the serving port): two gateways (a restart, or another test run on
    this machine) would otherwise both want the default admin port."""
    return {"NOVAGATE_METRICS_PORT": "0"}


def _say(text: str) -> bytes:
    """Scripted speech at an ordinary microphone level, 12 dB under espeak's: louder, the browser's
    automatic gain control clips the first utterance it hears."""
    x = np.frombuffer(speech(text, WAV_RATE), np.int16)
    return (x.astype(np.float32) * 0.25).astype(np.int16).tobytes()


def _silence(seconds: float) -> bytes:
    return bytes(int(WAV_RATE * seconds) * 2)


def _wav(path: Path, *parts: bytes) -> str:
    write_wav(str(path), b"".join(parts), WAV_RATE)
    return str(path)


@pytest.fixture(scope="module")
def playwright():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the browser tests need Playwright: `make test` installs it (pip install -e '.[dev]')")
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        pytest.fail(f"Chromium not found at {CHROMIUM}: run `make browser` (scripts/install-browser installs "
                    "Debian's chromium package), or set NOVAGATE_CHROMIUM to a Chromium binary")
    with sync_playwright() as p:
        yield p


@pytest.fixture
def launch(playwright):
    """Start Chromium: a fake microphone playing `wav` (or none), permission prompts answered
    (`grant_mic`) or denied."""
    browsers = []

    def start(wav: str | None = None, *, grant_mic: bool = True, viewport=(1280, 800)):
        args = list(CHROMIUM_ARGS) + ["--use-fake-device-for-media-stream"]
        args.append("--use-fake-ui-for-media-stream" if grant_mic else "--deny-permission-prompts")
        if wav:
            args.append(f"--use-file-for-fake-audio-capture={wav}")
        try:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=args, headless=True)
        except Exception as e:  # noqa: BLE001 - any launch failure is a failed test, with the reason
            pytest.fail(f"Chromium ({CHROMIUM}) could not be launched: {e}\n"
                        "Install it with `make browser` (Debian package `chromium`).")
        browsers.append(browser)
        # a context of its own (not browser.new_page()): a test may open a second tab in it
        page = browser.new_context(viewport={"width": viewport[0], "height": viewport[1]}).new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        # what the gateway's Content-Security-Policy blocks counts as an error of the page
        page.on("console", lambda m: errors.append(m.text) if "Content Security Policy" in m.text else None)
        page.errors = errors
        return page

    yield start
    for b in browsers:
        b.close()


def js_wait(page, expression: str, timeout: float = 30.0, what: str = ""):
    """Wait until a JS expression is truthy in the page; on timeout, fail with the page's state.

    Polled with page.evaluate(), not page.wait_for_function(): the gateway's Content-Security-Policy
    (script-src 'self', no 'unsafe-eval') forbids the in-page eval that wait_for_function relies on,
    while evaluate() goes through the DevTools protocol. The page itself keeps running under the CSP."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = page.evaluate(expression)
        except Exception as e:  # noqa: BLE001 - a navigation under way: the page is not there yet
            if "context was destroyed" not in str(e) and "novagate is not defined" not in str(e):
                raise
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            break
        page.wait_for_timeout(50)
    state = page.evaluate("window.novagate && {stats: novagate.stats(), transcript: novagate.transcript(),"
                          " statusLog: novagate.statusLog.map(s => s.status)}")
    pytest.fail(f"timed out waiting for {what or expression}\npage state: {state}\nerrors: {page.errors}")


def transcript(page) -> list[dict]:
    return page.evaluate("novagate.transcript()")


def finals(page, role: str) -> list[dict]:
    return [t for t in transcript(page) if t["role"] == role and t["final"]]


def user_turn_done(page, after: int, timeout: float = 40.0, what: str = "a turn"):
    """Wait for a user utterance placed after the first `after` transcript entries, answered by a
    final assistant item, everything saved and played; returns the transcript."""
    js_wait(page, f"""(() => {{
        const t = novagate.transcript();
        const u = t.findIndex((x, i) => i >= {after} && x.role === 'user' && x.final);
        if (u < 0 || !t.slice(u + 1).some(x => x.role === 'assistant' && x.final)) return false;
        const s = novagate.stats();
        return s.pendingReceipts === 0 && s.player.state !== 'playing';
    }})()""", timeout, what)
    return transcript(page)


def last_user(page) -> str:
    return finals(page, "user")[-1]["text"]


def shot(page, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / name
    page.screenshot(path=str(path))
    return path


# ---------------------------------------------------------------------------------------------------
def test_conversation_reload_and_server_restart(make_gateway, launch, tmp_path):
    gw = make_gateway()
    # "i met with doctor smith ..." every ~13 s; the assistant's answer (~6 s) fits in the silence
    wav = _wav(tmp_path / "met.wav", _silence(1.5), _say(MET), _silence(9.0))
    page = launch(wav)
    page.goto(gw.http + "/")
    assert page.locator("#status").get_attribute("data-state") == "idle"
    page.get_by_role("button", name="Start").click()

    # 1. a spoken turn: the user's words and the assistant's reply appear; the player played audio
    t = user_turn_done(page, 0, what="the first spoken turn")
    users, assistants = finals(page, "user"), finals(page, "assistant")
    assert users[-1]["text"] == MET
    assert any("doctor smith" in a["text"].lower() for a in assistants)
    stats = page.evaluate("novagate.stats()")
    assert stats["player"]["playedMs"] >= 2000, stats["player"]
    assert stats["mic"]["deviceRate"] > 16000 and stats["mic"]["frames"] > 100
    assert stats["counters"]["framesSent"] > 100
    assert page.locator("#status").get_attribute("data-state") == "listening"
    assert page.evaluate("document.querySelector('#transcript').getAttribute('aria-live')") == "polite"
    items_before = len(t)

    # 2. reload: the page resumes the conversation by itself and shows it
    page.reload()
    recovery = page.locator("#recovery")
    recovery.wait_for(state="visible", timeout=15000)
    text = recovery.inner_text()
    m = re.fullmatch(r"Resumed — (\d+) earlier turns", text)
    assert m, text
    assert int(m.group(1)) == items_before >= 2
    history = transcript(page)
    assert [h["text"] for h in history] == [h["text"] for h in t]
    assert page.evaluate("novagate.stats().resumed") is True

    # the next turn goes on in the same conversation; screenshots while the assistant is speaking
    js_wait(page, "novagate.status === 'speaking' && novagate.transcript().some(x => x.role === 'assistant' && !x.final)",
            30, "the assistant speaking after the reload")
    page.wait_for_timeout(300)
    shot(page, "browser-mid-conversation.png")
    page.set_viewport_size({"width": 390, "height": 844})
    page.wait_for_timeout(150)
    shot(page, "browser-phone.png")
    page.set_viewport_size({"width": 1280, "height": 800})
    user_turn_done(page, len(history), what="the turn after the reload")
    assert page.evaluate("novagate.stats().historyLength") == items_before

    # 3. the server dies (SIGKILL) and comes back on the same port: the page reconnects by itself
    readies = page.evaluate("novagate.stats().counters.readies")
    n_items = len(transcript(page))
    gw.kill()
    js_wait(page, "novagate.status === 'reconnecting'", 10, "the reconnecting status")
    gw2 = Gateway(tmp_path, {"NOVAGATE_METRICS_PORT": "0"}).start(port=gw.port)  # same store, secret, address
    try:
        js_wait(page, f"novagate.stats().counters.readies > {readies} && novagate.status === 'listening'", 30,
                "the page to reconnect")
        log = [s["status"] for s in page.evaluate("novagate.statusLog")]
        tail = log[len(log) - 1 - log[::-1].index("reconnecting"):]
        # back to listening (the fake microphone may already be heard again: "user-speaking" after it)
        assert tail[0] == "reconnecting" and "listening" in tail[1:], log
        assert page.evaluate("novagate.stats().resumed") is True
        assert page.evaluate("novagate.stats().historyLength") == n_items
        assert re.fullmatch(r"Resumed — \d+ earlier turns", page.locator("#recovery").inner_text())
        # ... and the conversation goes on
        t = user_turn_done(page, n_items, what="a turn after the server restart")
        assert last_user(page) == MET and "doctor smith" in t[-1]["text"].lower()
        assert page.errors == []
    finally:
        gw2.stop()


def test_barge_in_flushes_playback(make_gateway, launch, tmp_path):
    gw = make_gateway()
    # "tell me a story" (the local engine then talks for > 10 s), and 4 s later "hello there" over it
    wav = _wav(tmp_path / "story.wav", _silence(1.5), _say(STORY), _silence(4.0), _say(HELLO), _silence(6.5))
    page = launch(wav)
    page.goto(gw.http + "/")
    page.get_by_role("button", name="Start").click()
    # (should sphinx miss the first request, the file loops and asks again)
    story_id = js_wait(page, """(() => {
        const s = novagate.transcript().find(x => x.role === 'assistant' && x.text.startsWith('Once upon a time'));
        return s && novagate.stats().player.itemPlayed > 12000 && s.itemId;  // 0.5 s of it played
    })()""", 45, "the story to start playing")
    flush = js_wait(page, f"novagate.player.flushes.find(f => f.itemId === '{story_id}')", 20, "the barge-in")
    assert flush["depthAfter"] == 0, flush  # the player's buffer was empty right after `interrupted`
    truncates = [m for m in page.evaluate("novagate.sent") if m["type"] == "playback.truncate"]
    assert [m["item_id"] for m in truncates].count(story_id) == 1, truncates
    truncate = next(m for m in truncates if m["item_id"] == story_id)
    assert truncate["played_ms"] == flush["playedMs"] > 500
    assert truncate["at"] - flush["at"] < 1000
    # the reply to the interruption follows; the story is kept as far as it was heard
    at = next(i for i, x in enumerate(transcript(page)) if x["itemId"] == story_id)
    t = user_turn_done(page, at + 1, what="the answer to the barge-in")
    story = t[at]
    assert story["final"] and story["interrupted"], story
    assert story["text"].startswith("Once upon a time") and "The end." not in story["text"]
    assert next(x for x in t[at + 1:] if x["role"] == "user")["text"] == HELLO
    cid, token = page.evaluate("[novagate.client.conversationId, novagate.client.resumeToken]")
    h = httpx.get(f"{gw.http}/v1/conversations/{cid}/history", headers={"X-Resume-Token": token}).json()
    stored = next(x for x in h["history"] if x["item_id"] == story_id)
    assert stored["interrupted"] is True and stored["text"] == story["text"]
    assert page.errors == []


def test_messages_for_denied_mic_unreachable_server_and_lost_conversation(make_gateway, launch):
    gw = make_gateway()
    page = launch(None, grant_mic=False)
    page.goto(gw.http + "/")
    # a stored conversation the server does not know
    page.evaluate("""localStorage.setItem('novagate.conversation', JSON.stringify({resume_token: 'v1.bogus.token',
                     conversation_id: '00000000-0000-4000-8000-000000000000', pending: {}}))""")
    page.reload()
    alert = page.locator("#alert")
    alert.wait_for(state="visible", timeout=10000)
    assert "previous conversation was not found" in alert.inner_text()
    assert page.evaluate("localStorage.getItem('novagate.conversation')") is None
    # the microphone is refused: the message says what to do, and typing still works
    page.get_by_role("button", name="Start").click()
    js_wait(page, "document.querySelector('#alert-text').textContent.includes('Microphone access was denied')",
            10, "the denied-microphone message")
    js_wait(page, "novagate.stats().connection === 'ready'", 10, "the session")
    assert page.locator("#status").get_attribute("data-state") == "mic-off"
    page.get_by_label("Type a message").fill("hello there")
    page.get_by_role("button", name="Send").click()
    user_turn_done(page, 0, what="a typed turn")
    assert page.evaluate("novagate.stats().counters.framesSent") > 20  # silence keeps the stream going
    # "New conversation" ends this one for good and starts afresh
    old = page.evaluate("novagate.client.conversationId")
    page.get_by_role("button", name="New conversation").click()
    js_wait(page, f"novagate.stats().connection === 'ready' && novagate.client.conversationId !== '{old}'", 10,
            "a new conversation")
    assert transcript(page) == [] and page.evaluate("novagate.sent.some(m => m.type === 'session.end')")
    page.get_by_label("Type a message").fill("what did we discuss")
    page.get_by_label("Type a message").press("Enter")
    t = user_turn_done(page, 0, what="a typed turn in the new conversation")
    assert "haven't talked about anything yet" in t[-1]["text"]
    page.get_by_role("button", name="Stop").click()
    assert page.locator("#status").get_attribute("data-state") == "paused"
    assert page.get_by_label("Type a message").is_disabled()
    # with the session off, a reload shows the stored conversation (over HTTP) and how to go on
    page.reload()
    js_wait(page, "document.querySelector('#recovery').textContent.startsWith('Your conversation — 2 earlier turns')",
            10, "the stored conversation")
    assert [x["role"] for x in transcript(page)] == ["user", "assistant"]
    assert page.evaluate("novagate.stats().connection") == "idle"
    # a server that cannot be reached
    page.goto(f"{gw.http}/?gateway=ws://127.0.0.1:{free_port()}/v1/voice")
    page.get_by_role("button", name="Start").click()
    js_wait(page, "document.querySelector('#alert-text').textContent.includes(\"Can't reach the server\")", 15,
            "the unreachable-server message")
    assert page.locator("#status").get_attribute("data-state") == "reconnecting"
    # With ?gateway= on another origin, the CSP's connect-src ('self' ws: wss:) blocks the page's
    # fetch of the stored history from that gateway. Here nothing listens there anyway; see
    # docs/browser.md ("?gateway= and the CSP").
    blocked = [e for e in page.errors if "Content Security Policy" in e and "/v1/conversations/" in e]
    assert [e for e in page.errors if e not in blocked] == []


# Every write of the stored conversation, as the page makes it: to see receipts come and go.
STORAGE_SPY = """(() => {
  const log = [];
  window.__storageLog = log;
  const set = Storage.prototype.setItem, remove = Storage.prototype.removeItem;
  const area = (s) => (s === window.localStorage ? 'local' : 'session');
  Storage.prototype.setItem = function (k, v) {
    if (k === 'novagate.conversation') log.push({area: area(this), value: JSON.parse(v)});
    return set.call(this, k, v);
  };
  Storage.prototype.removeItem = function (k) {
    if (k === 'novagate.conversation') log.push({area: area(this), value: null});
    return remove.call(this, k);
  };
})()"""

LOCAL = "Object.fromEntries(Object.keys(localStorage).map(k => [k, localStorage.getItem(k)]))"
SESSION = "Object.fromEntries(Object.keys(sessionStorage).map(k => [k, sessionStorage.getItem(k)]))"


def _type(page, text: str) -> None:
    page.get_by_label("Type a message").fill(text)
    page.get_by_role("button", name="Send").click()


def _nothing_of(texts: list[str], *stores: dict) -> None:
    """No stored value holds any of these (transcript text, token, conversation id), not even inside a
    receipt: receipts are JWTs, their payload is base64 of the item's JSON."""
    import base64
    import json
    blob = json.dumps(stores)
    for value in [v for st in stores for v in st.values()]:
        for part in re.findall(r"[A-Za-z0-9_-]{16,}", value):
            try:
                blob += base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)).decode("utf-8", "replace")
            except ValueError:
                pass
    for t in texts:
        assert t and t not in blob, (t, stores)


def test_remember_forget_and_tab_only(make_gateway, launch):
    """The page says the conversation is remembered on this device; "Forget on this device" takes it
    out of storage and off the page (and ends nothing on the server); "Only in this tab" keeps it in
    sessionStorage: nothing in localStorage, and a reload of the tab still resumes."""
    gw = make_gateway()
    page = launch(None, grant_mic=False)  # typed turns: quicker than speech
    page.add_init_script(STORAGE_SPY)
    page.goto(gw.http + "/")
    memory = page.locator("#memory")
    assert "This device remembers the conversation" in memory.inner_text()
    forget = page.get_by_role("button", name="Forget on this device")
    tab_only = page.get_by_label("Only in this tab")
    assert forget.is_disabled() and not tab_only.is_checked()

    # 1. a typed turn: token and receipts in localStorage; each receipt leaves on its item.saved
    page.get_by_role("button", name="Start").click()
    js_wait(page, "novagate.stats().connection === 'ready'", 10, "the session")
    _type(page, HELLO)
    t = user_turn_done(page, 0, what="a typed turn")
    texts = [x["text"] for x in t]
    cid, token = page.evaluate("[novagate.client.conversationId, novagate.client.resumeToken]")
    stored = page.evaluate("JSON.parse(localStorage.getItem('novagate.conversation'))")
    assert stored == {"resume_token": token, "conversation_id": cid, "pending": {}}
    log = page.evaluate("window.__storageLog")
    had = {k for e in log if e["value"] for k in e["value"]["pending"]}
    assert had == {x["itemId"] for x in t}, log  # both final items passed through as receipts ...
    assert log[-1]["value"]["pending"] == {}  # ... and left on item.saved
    assert forget.is_enabled()
    shot(page, "browser-memory.png")

    # 2. with the session off, a reload shows the stored history; Forget clears storage and page
    page.get_by_role("button", name="Stop").click()
    page.reload()
    js_wait(page, "novagate.transcript().length === 2", 10, "the stored history")
    assert page.locator("#recovery").is_visible()
    forget.click()
    assert transcript(page) == [] and page.locator("#transcript li").count() == 0
    assert page.locator("#recovery").is_hidden()
    assert "Forgotten on this device" in page.locator("#alert-text").inner_text()
    shot(page, "browser-forgotten.png")
    local, session = page.evaluate(LOCAL), page.evaluate(SESSION)
    assert "novagate.conversation" not in local and "novagate.conversation" not in session, (local, session)
    assert set(local) <= {"novagate.remember"}, local
    _nothing_of(texts + [token, cid], local, session)
    assert page.evaluate("[novagate.client.conversationId, novagate.client.resumeToken]") == [None, None]
    assert forget.is_disabled()
    # nothing comes back on a reload; the server did not end the conversation (it expires there)
    page.reload()
    page.wait_for_timeout(500)
    assert transcript(page) == [] and page.locator("#recovery").is_hidden()
    assert page.locator("#status").get_attribute("data-state") == "idle"
    assert page.evaluate(LOCAL) == {}
    r = httpx.get(f"{gw.http}/v1/conversations/{cid}/history", headers={"X-Resume-Token": token})
    assert r.status_code == 200 and r.json()["history_length"] == 2
    assert not any(m["type"] == "session.end" for m in page.evaluate("novagate.sent"))

    # 3. only in this tab: nothing in localStorage but the choice; a reload of the tab resumes
    tab_only.check()
    assert "Only this tab remembers" in memory.inner_text()
    assert page.evaluate(LOCAL) == {"novagate.remember": "tab"}
    page.get_by_role("button", name="Start").click()
    js_wait(page, "novagate.stats().connection === 'ready'", 10, "the session")
    _type(page, HELLO)
    t = user_turn_done(page, 0, what="a typed turn in tab-only mode")
    texts = [x["text"] for x in t]
    assert page.evaluate(LOCAL) == {"novagate.remember": "tab"}
    assert json_of(page.evaluate(SESSION)["novagate.conversation"])["pending"] == {}
    log = page.evaluate("window.__storageLog")
    assert [e for e in log if e["value"]] and all(e["area"] == "session" for e in log if e["value"]), log
    cid2 = page.evaluate("novagate.client.conversationId")
    assert cid2 != cid
    shot(page, "browser-memory-tab.png")
    page.set_viewport_size({"width": 390, "height": 844})
    page.wait_for_timeout(150)
    shot(page, "browser-memory-phone.png")
    page.set_viewport_size({"width": 1280, "height": 800})
    page.wait_for_timeout(150)
    page.reload()  # the session was on: the page starts again by itself and resumes from sessionStorage
    recovery = page.locator("#recovery")
    recovery.wait_for(state="visible", timeout=15000)
    assert recovery.inner_text() == "Resumed — 2 earlier turns"
    assert [x["text"] for x in transcript(page)] == texts
    assert page.evaluate("novagate.client.conversationId") == cid2
    assert tab_only.is_checked() and "Only this tab remembers" in memory.inner_text()
    assert page.evaluate(LOCAL) == {"novagate.remember": "tab"}

    # 4. switching back to "this device" moves it to localStorage; back to tab-only moves it out again
    tab_only.uncheck()
    assert json_of(page.evaluate(LOCAL)["novagate.conversation"])["conversation_id"] == cid2
    assert "novagate.conversation" not in page.evaluate(SESSION)
    assert "novagate.remember" not in page.evaluate(LOCAL)
    tab_only.check()
    assert page.evaluate(LOCAL) == {"novagate.remember": "tab"}
    assert json_of(page.evaluate(SESSION)["novagate.conversation"])["conversation_id"] == cid2

    # 5. Forget while the session runs: it stops (closed, not ended) and nothing is left anywhere
    forget.click()
    js_wait(page, "novagate.stats().connection === 'idle'", 5, "the session to stop")
    assert transcript(page) == [] and page.locator("#status").get_attribute("data-state") == "idle"
    local, session = page.evaluate(LOCAL), page.evaluate(SESSION)
    assert local == {"novagate.remember": "tab"} and "novagate.conversation" not in session
    _nothing_of(texts + [cid2], local, session)
    assert not any(m["type"] == "session.end" for m in page.evaluate("novagate.sent"))
    tab_only.uncheck()

    # 6. New conversation: the old one leaves storage before the new one starts
    page.get_by_role("button", name="Start").click()
    js_wait(page, "novagate.stats().connection === 'ready'", 10, "the session")
    _type(page, HELLO)
    user_turn_done(page, 0, what="a typed turn")
    old = page.evaluate("novagate.client.conversationId")
    page.evaluate("window.__storageLog.length = 0")
    page.get_by_role("button", name="New conversation").click()
    js_wait(page, f"novagate.stats().connection === 'ready' && novagate.client.conversationId !== '{old}'", 10,
            "a new conversation")
    log = page.evaluate("window.__storageLog")
    assert log[0] == {"area": "local", "value": None}, log  # first thing: the old conversation removed
    assert all(e["value"] is None or e["value"]["conversation_id"] != old for e in log), log
    assert transcript(page) == []

    # 7. two tabs of this browser share the device's memory: Forget in one, the other forgets it too
    other = page.context.new_page()
    other.goto(gw.http + "/")
    assert other.evaluate("novagate.client.conversationId") == page.evaluate("novagate.client.conversationId")
    other.get_by_role("button", name="Forget on this device").click()
    js_wait(page, "novagate.stats().connection === 'idle' && novagate.client.conversationId === null", 5,
            "the first tab to forget too")
    assert "forgotten or ended in another tab" in page.locator("#alert-text").inner_text()
    page.wait_for_timeout(300)
    assert page.evaluate(LOCAL) == {} and other.evaluate(LOCAL) == {}
    assert page.errors == []


def json_of(value: str) -> dict:
    import json
    return json.loads(value)


def test_web_unit_tests_pass_under_node():
    """The resampler and jitter-buffer unit tests (node's own runner) run with the suite."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is needed for web/test (node --test); install Node.js >= 20")
    r = subprocess.run([node, "--test", "web/test/"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


# -- tool calls ----------------------------------------------------------------------------------------
# A stand-in gateway (tests/fake_voice_server.py) serves the page and speaks just enough of the protocol;
# the test plays the model: it sends tool.call (started, then how it ended), transcripts and item.saved
# when it wants, so what the page shows is checked without an engine and without timing.

TOOL_ROWS = "novagate.toolCalls()"


def tool_rows(page) -> list[dict]:
    return page.evaluate(TOOL_ROWS)


def tool_row(page, call_id: str, status: str, what: str = "") -> dict:
    """Wait until the row of call_id shows `status`; return it."""
    return js_wait(page, f"novagate.toolCalls().find(r => r.callId === {call_id!r} && r.status === {status!r})",
                   15, what or f"the row of {call_id} to show {status}")


def pending(page) -> set[str]:
    return set(page.evaluate("Object.keys(novagate.client.pendingReceipts)"))


@pytest.fixture
def fake_gateway():
    from .fake_voice_server import FakeVoiceServer
    with FakeVoiceServer() as fake:
        yield fake


def test_tool_calls_are_shown_and_their_receipts_kept(fake_gateway, launch):
    fake = fake_gateway
    page = launch(None, grant_mic=False)  # typed turns
    page.goto(fake.http + "/")
    page.get_by_role("button", name="Start").click()
    js_wait(page, "novagate.stats().connection === 'ready'", 15, "the session")
    _type(page, "please record my call")
    fake.wait_for(lambda: fake.messages("input.text"), 15, "the typed turn")
    user = fake.transcript("user", "please record my call")

    # 1. a public tool: a spinner while it runs, with its arguments; then ✓, the duration, the result
    args = {"who": "Ann Smith", "minutes": 12}
    fake.tool("call_a", "record_call", "started", arguments=args)
    row = tool_row(page, "call_a", "started")
    assert row["name"] == "record_call" and row["spinner"] and row["label"] == "running…", row
    assert row["duration"] == "" and row["itemId"] is None and not row["history"], row
    assert row["details"] == {"open": False, "summary": "Arguments"}, row
    assert json_of(row["arguments"]) == args and row["result"] is None
    row_text = page.locator("#transcript li.tool").first.inner_text()
    assert "record_call" in row_text and "running…" in row_text and "Ann Smith" not in row_text  # collapsed
    shot(page, "browser-tool-running.png")
    result = {"saved": True, "record": 7}
    item_a = fake.tool("call_a", "record_call", "finished", duration_ms=1234, arguments=args, result=result)
    row = tool_row(page, "call_a", "finished")
    assert not row["spinner"] and row["label"] == "finished" and row["duration"] == "1.2 s", row
    assert row["itemId"] == item_a and row["details"]["summary"] == "Arguments and result", row
    assert json_of(row["result"]) == result and json_of(row["arguments"]) == args
    assert page.locator("#transcript li.tool .tool-icon").first.inner_text() == "✓"
    assert len(tool_rows(page)) == 1, tool_rows(page)  # the same row, updated
    # its receipt is held like a transcript's, and leaves storage on item.saved
    assert pending(page) == {user, item_a}
    stored = json_of(page.evaluate("localStorage.getItem('novagate.conversation')"))
    assert set(stored["pending"]) == {user, item_a}
    fake.saved(user, item_a)
    js_wait(page, "novagate.stats().pendingReceipts === 0", 10, "the receipts to leave on item.saved")
    page.locator("#transcript li.tool summary").first.click()  # the details open on a click
    assert page.locator("#transcript li.tool pre.tool-result").first.is_visible()

    # 2. a tool the server keeps private: name, status and duration only
    fake.tool("call_b", "lookup_account", "started", arguments={"account": "secret"}, public=False)
    row = tool_row(page, "call_b", "started")
    assert row["details"] is None and row["arguments"] is None, row
    item_b = fake.tool("call_b", "lookup_account", "failed", duration_ms=45, arguments={"account": "secret"},
                       result={"error": {"type": "tool_error"}}, public=False)
    row = tool_row(page, "call_b", "failed")
    assert row["label"] == "failed" and row["duration"] == "45 ms" and row["details"] is None, row

    # 3. ended without a started message first (e.g. an unknown tool), timed out, cancelled; server text
    #    is only ever text: a name full of markup stays characters
    item_c = fake.tool("call_c", "slow_tool", "timed_out", duration_ms=8000)
    item_d = fake.tool("call_d", "<img src=x onerror=\"window.__xss=1\">", "cancelled", duration_ms=300,
                       arguments={"html": "<b>bold</b>"}, result="<script>window.__xss=2</script>")
    row_c = tool_row(page, "call_c", "timed_out")
    row_d = tool_row(page, "call_d", "cancelled")
    assert (row_c["label"], row_c["duration"]) == ("timed out", "8.0 s")
    assert (row_d["label"], row_d["duration"]) == ("cancelled", "300 ms")
    assert row_d["name"] == "<img src=x onerror=\"window.__xss=1\">" and json_of(row_d["result"]) == \
        "<script>window.__xss=2</script>"
    assert page.evaluate("document.querySelectorAll('#transcript img, #transcript script, #transcript b').length") == 0
    assert page.evaluate("window.__xss === undefined")
    fake.saved(item_d)
    answer = fake.transcript("assistant", "I have recorded your call.")
    js_wait(page, "novagate.transcript().some(x => x.role === 'assistant' && x.final)", 10, "the reply")
    # tool rows are not turns: the transcript holds the user's and the assistant's words only
    assert [(x["role"], x["text"]) for x in transcript(page)] == [
        ("user", "please record my call"), ("assistant", "I have recorded your call.")]
    assert [r["callId"] for r in tool_rows(page)] == ["call_a", "call_b", "call_c", "call_d"]
    js_wait(page, "Object.keys(novagate.client.pendingReceipts).length === 3", 5, "the unsaved receipts")
    assert pending(page) == {item_b, item_c, answer}
    page.set_viewport_size({"width": 390, "height": 844})
    page.wait_for_timeout(150)
    shot(page, "browser-tool-calls-phone.png")
    page.set_viewport_size({"width": 1280, "height": 800})
    page.wait_for_timeout(150)
    shot(page, "browser-tool-calls.png")

    # 4. a reload: the unsaved tool receipts go back in session.start.pending; the resumed history shows
    #    the tool items as the same rows, from their JSON records (never a bubble of raw JSON)
    starts = len(fake.messages("session.start"))
    page.reload()
    fake.wait_for(lambda: len(fake.messages("session.start")) > starts, 15, "the resume")
    start = fake.messages("session.start")[-1]
    assert start.get("resume") and sorted(start["pending"]) == sorted(
        r for r, i in fake.receipts.items() if i in {item_b, item_c, answer})
    page.locator("#recovery").wait_for(state="visible", timeout=15000)
    js_wait(page, "novagate.toolCalls().length === 4 && novagate.stats().pendingReceipts === 0", 15,
            "the history with its tool calls")
    rows = {r["callId"]: r for r in tool_rows(page)}
    assert all(r["history"] and not r["spinner"] for r in rows.values()), rows
    assert [(r["name"], r["status"], r["label"], r["duration"]) for r in rows.values()] == [
        ("record_call", "finished", "finished", "1.2 s"), ("lookup_account", "failed", "failed", "45 ms"),
        ("slow_tool", "timed_out", "timed out", "8.0 s"),
        ("<img src=x onerror=\"window.__xss=1\">", "cancelled", "cancelled", "300 ms")]
    assert rows["call_a"]["itemId"] == item_a and json_of(rows["call_a"]["result"]) == result
    assert json_of(rows["call_a"]["arguments"]) == args
    assert rows["call_c"]["details"]["summary"] == "Result"  # no arguments; its record's result is null
    assert [(x["role"], x["text"]) for x in transcript(page)] == [
        ("user", "please record my call"), ("assistant", "I have recorded your call.")]
    texts = page.evaluate("[...document.querySelectorAll('#transcript .bubble')].map(b => b.textContent)")
    assert not any(t.lstrip().startswith("{") for t in texts), texts
    assert page.evaluate("document.querySelectorAll('#transcript img, #transcript script').length") == 0
    # the rows keep the order of the conversation: user, the four calls, the answer
    order = page.evaluate("[...document.querySelectorAll('#transcript li.turn, #transcript li.tool')]"
                          ".map(li => li.dataset.callId || li.dataset.role)")
    assert order == ["user", "call_a", "call_b", "call_c", "call_d", "assistant"], order

    # 5. a live call after the resume, then the session off: a reload shows the stored history (over
    #    HTTP) with the tool rows too
    fake.tool("call_e", "record_call", "started", arguments={"who": "Bob"})
    tool_row(page, "call_e", "started")
    item_e = fake.tool("call_e", "record_call", "finished", duration_ms=20, arguments={"who": "Bob"}, result=None)
    row = tool_row(page, "call_e", "finished")
    assert row["details"]["summary"] == "Arguments" and row["result"] is None, row  # null result: not sent
    fake.saved(item_e)
    js_wait(page, "novagate.stats().pendingReceipts === 0", 10, "the receipt of the last call")
    page.get_by_role("button", name="Stop").click()
    page.reload()
    js_wait(page, "document.querySelector('#recovery').textContent.startsWith('Your conversation')", 15,
            "the stored conversation")
    js_wait(page, "novagate.toolCalls().length === 5", 10, "the stored tool calls")
    assert [(r["callId"], r["status"]) for r in tool_rows(page)][-1] == ("call_e", "finished")
    assert page.errors == []


def test_tool_calls_end_to_end(make_gateway, launch):
    """A real gateway with Python tools (tests/tools_fixture.py) and the scripted engine calling them on a
    phrase of a typed turn: the page shows the public tool with its arguments and result, the private one
    without, both finished; their receipts leave on item.saved; a reload shows them from the history."""
    import json
    rules = [{"phrase": "look up the widget", "tool": "lookup_product", "arguments": {"name": "widget"}},
             {"phrase": "add a visit", "tool": "add_visit", "arguments": {"doctor": "Dr Smith", "minutes": 20}}]
    gw = make_gateway(NOVAGATE_ENGINE="scripted", NOVAGATE_TOOLS="tests.tools_fixture:TOOLS",
                      NOVAGATE_ENGINE_TOOL_CALLS=json.dumps(rules), NOVAGATE_SCRIPTED_REPLY_S="0.5",
                      NOVAGATE_TOOL_TIMEOUT_S="60")
    page = launch(None, grant_mic=False)  # typed turns
    page.goto(gw.http + "/")
    page.get_by_role("button", name="Start").click()
    js_wait(page, "novagate.stats().connection === 'ready'", 20, "the session")

    def turn_with_tool(text: str, tool: str) -> dict:
        """Type `text`; wait until, after that user turn, the call of `tool` has finished and a final
        assistant item is there, and every receipt is saved. Returns the tool's row. (The engine's reply
        is two items: "One moment." before the tool's row, and what the tool said after it.)"""
        _type(page, text)
        js_wait(page, f"""(() => {{
            const rows = [...document.querySelectorAll('#transcript li.turn, #transcript li.tool')];
            const u = rows.findIndex(li => li.dataset.role === 'user' && li.dataset.final === 'true'
                                           && li.textContent.includes({text!r}));
            const after = u < 0 ? [] : rows.slice(u + 1);
            const t = after.findIndex(li => li.classList.contains('tool') && li.dataset.name === {tool!r}
                                            && li.dataset.status === 'finished');
            return t >= 0 && after.slice(t + 1).some(li => li.dataset.role === 'assistant' && li.dataset.final === 'true')
                && novagate.stats().pendingReceipts === 0;
        }})()""", 60, f"the {tool} call and the reply to the turn")
        return next(r for r in tool_rows(page) if r["name"] == tool)

    row = turn_with_tool("please look up the widget", "lookup_product")
    assert row["label"] == "finished" and not row["spinner"] and re.fullmatch(r"\d+ ms|\d+\.\d s", row["duration"])
    assert row["details"]["summary"] == "Arguments and result", row  # @public in tests/tools_fixture.py
    assert json_of(row["arguments"]) == {"name": "widget"}
    assert json_of(row["result"]) == {"name": "widget", "price": 12.5}
    assert row["itemId"] and row["callId"]
    row = turn_with_tool("now add a visit", "add_visit")
    assert row["label"] == "finished" and row["details"] is None and row["arguments"] is None, row  # not public
    live = tool_rows(page)
    assert [r["name"] for r in live] == ["lookup_product", "add_visit"]
    said = [x["text"] for x in transcript(page)]
    assert not any(t.lstrip().startswith("{") for t in said), said

    # a reload resumes: the tool items come back from the history as the same rows
    page.reload()
    page.locator("#recovery").wait_for(state="visible", timeout=20000)
    js_wait(page, "novagate.toolCalls().length === 2", 15, "the tool calls in the resumed history")
    rows = tool_rows(page)
    assert [(r["callId"], r["itemId"], r["name"], r["status"], r["duration"]) for r in rows] == \
        [(r["callId"], r["itemId"], r["name"], r["status"], r["duration"]) for r in live]
    assert all(r["history"] for r in rows)
    assert json_of(rows[0]["result"]) == {"name": "widget", "price": 12.5}
    # the history record holds the private tool's arguments too: the user's own data
    assert json_of(rows[1]["arguments"]) == {"doctor": "Dr Smith", "minutes": 20}
    assert [x["text"] for x in transcript(page)] == said
    shot(page, "browser-tool-calls-e2e.png")
    assert page.errors == []


def test_the_status_line_shows_the_user_speaking_when_the_server_says_so(fake_gateway, launch):
    """Additive input.speech_started / input.speech_stopped drive "You're speaking"; without them (the
    stand-in sends none until told) the line is as before."""
    fake = fake_gateway
    page = launch(None, grant_mic=False)
    page.goto(fake.http + "/")
    page.get_by_role("button", name="Start").click()
    js_wait(page, "novagate.stats().connection === 'ready' && novagate.status === 'mic-off'", 15, "the session")
    fake.send({"type": "input.speech_started", "source": "model"})
    js_wait(page, "novagate.status === 'user-speaking'", 10, "You're speaking")
    assert page.locator("#status-text").inner_text() == "You're speaking"
    fake.send({"type": "status", "state": "speaking"})  # a barge-in under way: the user still has the floor
    fake.send({"type": "input.speech_stopped", "source": "model"})
    js_wait(page, "novagate.status === 'speaking'", 10, "the assistant's status once the user stopped")
    fake.send({"type": "status", "state": "listening"})
    js_wait(page, "novagate.status === 'mic-off'", 10, "back to the idle line")
    log = [s["status"] for s in page.evaluate("novagate.statusLog")]
    assert "user-speaking" in log and page.errors == []


# -- audio codecs ------------------------------------------------------------------------------------
# Chromium has WebCodecs Opus: the page offers Opus both ways and sends/plays what session.ready
# confirms; ?codec=pcm16 keeps PCM16. The data rates are what the page's debug panel measures (binary
# WebSocket payload over the last ~3 s) and what its byte counters add up to.

PCM16_UP_KBPS = 16000 * 16 / 1000     # 256 kbit/s: PCM16 mono at 16 kHz
PCM16_DOWN_KBPS = 24000 * 16 / 1000   # 384 kbit/s: PCM16 mono at 24 kHz
# the highest rates the page's panel shows (a 3 s window), polled while the page lives: while the user
# speaks (up) and while the assistant does (down)
PEAK_RECORDER = """(() => {
  window.__peak = {up: 0, down: 0};
  setInterval(() => {
    if (!window.novagate) return;  // the page's module is not there yet
    const s = novagate.stats();
    __peak.up = Math.max(__peak.up, s.kbpsUp);
    __peak.down = Math.max(__peak.down, s.kbpsDown);
  }, 250);
})()"""


def _codec_figures(page) -> dict:
    """The page's figures once the mic has run ≥ 3 s: the measured rates (now, and the peaks) and
    what the counters say per second of audio (up: frames are 20 ms; down: per millisecond played)."""
    js_wait(page, "novagate.stats().kbpsUp > 0", 10, "a measured up-rate")
    s = page.evaluate("novagate.stats()")
    c = s["counters"]
    peak = page.evaluate("window.__peak")
    return {
        "stats": s, "kbpsUp": s["kbpsUp"], "kbpsDown": s["kbpsDown"], "peakUp": peak["up"], "peakDown": peak["down"],
        # the whole session's average: every frame up is 20 ms of audio (Opus packets and PCM frames alike)
        "avgUp": s["bytesUp"] * 8 / (c["framesSent"] * 20),
        # bits per ms = kbit/s of the assistant's audio
        "avgDown": s["bytesDown"] * 8 / max(1, s["player"]["playedMs"]),
    }


def test_opus_through_webcodecs_by_default_and_pcm16_on_request(make_gateway, launch, tmp_path):
    gw = make_gateway()
    wav = _wav(tmp_path / "met.wav", _silence(1.5), _say(MET), _silence(9.0))
    page = launch(wav)

    # 1. by default: Opus both ways, offered in session.start and confirmed by session.ready
    page.goto(gw.http + "/?debug")
    page.evaluate(PEAK_RECORDER)
    page.get_by_role("button", name="Start").click()
    user_turn_done(page, 0, what="a spoken turn over Opus")
    assert last_user(page) == MET
    assert any("doctor smith" in a["text"].lower() for a in finals(page, "assistant"))
    start = next(m for m in page.evaluate("novagate.sent") if m["type"] == "session.start")
    assert start["audio"] == {"input_sample_rate": 16000, "output_sample_rate": 24000,
                              "input_codec": "opus", "output_codec": "opus"}, start
    opus = _codec_figures(page)
    s = opus["stats"]
    assert s["codec"]["input"] == s["codec"]["output"] == "opus", s["codec"]
    assert s["codec"]["confirmed"] == {"input_sample_rate": 16000, "output_sample_rate": 24000,
                                       "input_codec": "opus", "output_codec": "opus"}, s["codec"]
    assert s["codec"]["reason"] == "Opus through WebCodecs"
    assert s["player"]["playedMs"] >= 2000, s["player"]
    assert s["opus"]["encoder"]["packets"] > 100 and s["opus"]["encoder"]["errors"] == 0, s["opus"]
    decoded = s["opus"]["decoder"]
    assert decoded["packets"] >= s["player"]["playedMs"] / 20 - 5 and decoded["errors"] == 0, (decoded, s["player"])
    assert s["counters"]["framesSent"] > 100 and s["counters"]["framesDropped"] == 0, s["counters"]
    # far below PCM16: Opus at ~24 kbit/s against 256 up and 384 down
    assert 2 < opus["kbpsUp"] < 64 and opus["avgUp"] < 64 and 8 < opus["peakUp"] < 64, opus
    assert opus["avgDown"] < 64 and 8 < opus["peakDown"] < 64, opus
    panel = page.locator("#debug")
    assert panel.get_attribute("open") is not None
    assert page.locator("#debug-codec").inner_text() == "Opus 16 kHz up · Opus 24 kHz down"
    assert re.fullmatch(r"\d+\.\d kbit/s · [\d.]+ [kM]B sent", page.locator("#debug-up").inner_text())
    assert page.locator("#debug-why").inner_text() == "Opus through WebCodecs"
    shot(page, "browser-opus-debug.png")

    # 2. ?codec=pcm16 (the session is on: the page starts again by itself and resumes): PCM16 both ways
    n = len(transcript(page))
    page.goto(gw.http + "/?codec=pcm16&debug")
    js_wait(page, "novagate.stats().connection === 'ready'", 20, "the session in PCM16")
    page.evaluate(PEAK_RECORDER)
    start = next(m for m in page.evaluate("novagate.sent") if m["type"] == "session.start")
    assert "input_codec" not in start["audio"] and "output_codec" not in start["audio"], start
    user_turn_done(page, n, what="a spoken turn in PCM16")
    assert last_user(page) == MET
    pcm = _codec_figures(page)
    s = pcm["stats"]
    assert s["codec"]["input"] == s["codec"]["output"] == "pcm16", s["codec"]
    assert s["codec"]["confirmed"]["input_codec"] == s["codec"]["confirmed"]["output_codec"] == "pcm16"
    assert s["codec"]["reason"] == "PCM16 (?codec=pcm16)" and s["opus"]["encoder"]["packets"] == 0
    assert s["bytesUp"] == 640 * s["counters"]["framesSent"]  # 20 ms of PCM16 at 16 kHz each
    assert abs(pcm["kbpsUp"] - PCM16_UP_KBPS) < 0.05 * PCM16_UP_KBPS, pcm
    assert abs(pcm["avgDown"] - PCM16_DOWN_KBPS) < 0.1 * PCM16_DOWN_KBPS, pcm
    assert abs(pcm["peakDown"] - PCM16_DOWN_KBPS) < 0.15 * PCM16_DOWN_KBPS, pcm  # (+ the pacer's 200 ms lead)
    assert page.locator("#debug-codec").inner_text() == "PCM16 16 kHz up · PCM16 24 kHz down"
    assert opus["peakUp"] < pcm["kbpsUp"] / 4 and opus["peakDown"] < pcm["peakDown"] / 4
    shot(page, "browser-pcm16-debug.png")
    for name, f in (("Opus", opus), ("PCM16", pcm)):
        print(f"\n{name}: up {f['peakUp']:.1f} kbit/s at most, {f['kbpsUp']:.1f} in the last 3 s, "
              f"{f['avgUp']:.1f} on average; down {f['peakDown']:.1f} at most, {f['avgDown']:.1f} per second played")
    assert page.errors == []


def test_a_server_that_confirms_no_codec_gets_pcm16(fake_gateway, launch):
    """The page offers Opus; a server without codecs (the stand-in confirms none in session.ready)
    gets PCM16: the page follows what session.ready says, not what it asked for."""
    fake = fake_gateway
    page = launch(None, grant_mic=False)  # the client's own silence, in the codec of the session
    page.goto(fake.http + "/")
    page.get_by_role("button", name="Start").click()
    js_wait(page, "novagate.stats().connection === 'ready'", 15, "the session")
    start = fake.messages("session.start")[-1]
    assert start["audio"]["input_codec"] == start["audio"]["output_codec"] == "opus", start
    s = page.evaluate("novagate.stats()")
    assert (s["codec"]["input"], s["codec"]["output"]) == ("pcm16", "pcm16"), s["codec"]
    assert (s["codec"]["offered"]["input"], s["codec"]["offered"]["output"]) == ("opus", "opus"), s["codec"]
    assert s["codec"]["reason"] == "PCM16: the server did not confirm opus", s["codec"]
    js_wait(page, "document.querySelector('#debug-codec').textContent === 'PCM16 16 kHz up · PCM16 24 kHz down'",
            5, "the debug panel's codecs (closed: ?debug not given)")
    before = s["bytesUp"], s["counters"]["framesSent"]
    page.wait_for_timeout(1000)
    s = page.evaluate("novagate.stats()")
    frames = s["counters"]["framesSent"] - before[1]
    assert frames > 30 and s["bytesUp"] - before[0] == 640 * frames, s["counters"]  # PCM16 silence
    assert page.errors == []
