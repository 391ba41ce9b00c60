"""The browser app (`web/`) in a real headless Chromium against a real gateway process.

Chromium is Debian's (`/usr/bin/chromium`, installed by `make browser` / scripts/install-browser),
driven by Playwright with that binary: no browser download. Its microphone is a fake device that
plays a WAV file in a loop (`--use-file-for-fake-audio-capture`): scripted speech from
`conftest.speech()` (espeak, phrases of the test grammar) padded with silence so that turns separate.
The page's capture worklet resamples the device rate (Chromium's fake device runs at 44.1 kHz) to
16 kHz; the gateway runs the deterministic local engine (sphinx + espeak).

If Chromium cannot be launched these tests FAIL (they are part of CI), saying what to install.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
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
    """Only the embedded default (local engine, SQLite): the browser is what is under test here."""
    return {}


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
        page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.errors = errors
        return page

    yield start
    for b in browsers:
        b.close()


def js_wait(page, expression: str, timeout: float = 30.0, what: str = ""):
    """Wait until a JS expression is truthy in the page; on timeout, fail with the page's state."""
    try:
        return page.wait_for_function(expression, timeout=timeout * 1000, polling=50).json_value()
    except Exception:
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
    gw2 = Gateway(tmp_path, {}).start(port=gw.port)  # same store, same secret, same address
    try:
        js_wait(page, f"novagate.stats().counters.readies > {readies} && novagate.status === 'listening'", 30,
                "the page to reconnect")
        log = [s["status"] for s in page.evaluate("novagate.statusLog")]
        tail = log[len(log) - 1 - log[::-1].index("reconnecting"):]
        assert tail[0] == "reconnecting" and tail[-1] == "listening", log
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
    assert page.errors == []


def test_web_unit_tests_pass_under_node():
    """The resampler and jitter-buffer unit tests (node's own runner) run with the suite."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is needed for web/test (node --test); install Node.js >= 20")
    r = subprocess.run([node, "--test", "web/test/"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
