"""`novagate loadtest` and the shipped locustfile, run as a user would (subprocesses) against a real
gateway; and the load tool's pure parts (microphone clock, gap measurement, Prometheus arithmetic).

Nothing here asserts how fast anything is: benchmarks show speed, these tests show that the tool
measures, counts and reports."""

from __future__ import annotations

import csv
import dataclasses
import os
import subprocess
import sys
import wave

import orjson
import pytest

from gateway.config import Settings
from gateway.loadtest.metrics import Scrape, Scraper, parse, quantile
from gateway.loadtest.script import FrameClock, Plan, load_speech, normalize_url, speech_from_pcm
from gateway.loadtest.state import UserState

from .conftest import ROOT, Gateway

_ENGINE = next(f for f in dataclasses.fields(Settings) if f.name == "engine")
# The scripted engine (canned replies, no speech models) when this gateway has it; else the local
# engine on its deterministic test configuration (the bundled utterance is in the conftest grammar).
ENGINE_ENV = ({"NOVAGATE_ENGINE": "scripted"} if "scripted" in _ENGINE.metadata.get("choices", ())
              else {"NOVAGATE_ENGINE": "local"})


def novagate(*args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    g = Gateway(tmp_path_factory.mktemp("gw"), dict(ENGINE_ENV)).start()
    yield g
    g.stop()


def test_loadtest_measures_turns_and_scrapes_the_gateway(gw, tmp_path):
    out, report = tmp_path / "summary.json", tmp_path / "report.html"
    p = novagate("loadtest", "--url", gw.ws, "-n", "3", "--ramp", "1", "--duration", "14", "--think", "0.5",
                 "--text-every", "3", "--reconnect-every", "3", "--metrics-url", gw.http + "/metrics",
                 "--metrics-interval", "1", "--out", str(out), "--html", str(report), "--seed", "1")
    assert p.returncode == 0, p.stderr[-3000:]
    s = orjson.loads(out.read_bytes())
    assert s["sessions"] == {**s["sessions"], "planned": 3, "connected": 3, "refused": 0, "failed": 0, "dropped": 0}
    assert s["turns"]["count"] > 0 and s["turns"]["timeouts"] == 0 and s["turns"]["lost"] == 0
    lat = s["latency_ms"]["speech"]
    assert lat["count"] > 0 and 0 < lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    assert s["errors"] == {"total": 0, "by_code": {}, "by_close_code": {}, "turn_timeouts": 0}
    assert s["audio"]["received_s"] > 0 and s["audio"]["gaps"] >= 0
    # every session closed and resumed its conversation once its first turn was over
    rc = s["reconnects"]
    assert rc["count"] >= 1 and rc["resumed"] == rc["count"] and rc["failed"] == 0
    # the gateway's /metrics was read: CPU, memory, and the capacity histograms
    srv = s["server"]
    assert srv["scrapes"] >= 2 and srv["scrape_errors"] == 0
    assert srv["cpu_cores"]["mean"] is not None and srv["cpu_cores"]["mean"] >= 0
    assert srv["rss_bytes"]["max"] > 0
    assert "model_to_client_delay_ms" in srv and "event_loop_lag_ms" in srv
    assert srv["timeline"] and s["timeline"]
    # the end-of-run text, and a progress line on stderr (not a terminal: plain lines)
    assert "end of speech -> first audio" in p.stdout and "errors     none" in p.stdout
    assert "sessions" in p.stderr and "turns" in p.stderr
    assert "Traceback" not in p.stderr
    # the HTML report: one file, plots inlined
    page = report.read_text()
    assert page.count("<svg") >= 4 and "<script" not in page and 'src="http' not in page and 'href="http' not in page
    assert s["options"]["token"] is False  # whether there was one, never the token


def test_a_refused_session_is_counted_not_a_crash(tmp_path):
    full = Gateway(tmp_path, {**ENGINE_ENV, "NOVAGATE_MAX_SESSIONS": "1"}).start()
    try:
        out = tmp_path / "summary.json"
        p = novagate("loadtest", "--url", full.ws, "-n", "2", "--duration", "3", "--out", str(out), "--quiet")
    finally:
        full.stop()
    assert p.returncode == 0, p.stderr[-3000:]
    s = orjson.loads(out.read_bytes())
    assert s["sessions"]["connected"] == 1 and s["sessions"]["refused"] == 1 and s["sessions"]["failed"] == 0
    assert s["sessions"]["failures"] == {"close 1013": 1}
    assert s["errors"]["by_close_code"] == {} and s["server"] is None
    assert "1 refused" in p.stdout and "Traceback" not in p.stderr


def test_locust_headless_reports_turns(gw, tmp_path):
    locustfile = novagate("loadtest", "--locustfile").stdout.strip()
    assert locustfile.endswith("locustfile.py") and os.path.exists(locustfile)
    prefix = tmp_path / "run"
    p = subprocess.run([os.path.join(os.path.dirname(sys.executable), "locust"), "-f", locustfile, "--host", gw.ws,
                        "--headless", "-u", "2", "-r", "2", "-t", "13s", "--csv", str(prefix), "--only-summary",
                        "--novagate-think", "0.5"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=90)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = list(csv.DictReader(open(f"{prefix}_stats.csv")))
    speech = next(r for r in rows if r["Type"] == "turn" and r["Name"] == "speech")
    assert int(speech["Request Count"]) > 0 and float(speech["Median Response Time"]) > 0
    total = next(r for r in rows if r["Name"] == "Aggregated")
    assert int(total["Failure Count"]) == 0, open(f"{prefix}_failures.csv").read()


# -- the pure parts ------------------------------------------------------------------------------
def test_microphone_clock_never_drifts_and_skips_after_a_stall():
    clock = FrameClock(100.0)
    sent = 0
    for step in range(1, 501):  # 10 s in irregular 20 ms-ish steps
        now = 100.0 + step * 0.02 + (0.013 if step % 3 else -0.007)
        for _ in range(clock.due(now)):
            clock.sent_one()
            sent += 1
    assert sent == clock.sent and abs(clock.sent - 501) <= 1  # one frame per 20 ms of the monotonic clock
    clock.due(100.0 + 20.0)  # a 10 s stall: no 500-frame burst
    assert clock.late == 1 and clock.skipped > 400 and clock.due(100.0 + 20.0) <= 1


def test_turn_latency_from_last_speech_frame_and_gaps_against_playback(tmp_path):
    rate = 16000
    tone = bytes(640) * 10 + (b"\x00\x40" * 320) * 50 + bytes(640) * 20  # silence, 1 s of sound, silence
    speech = speech_from_pcm(tone, rate)
    assert speech.last_speech == 59 and len(speech.frames) == 80
    st = UserState(0, speech, Plan(), output_rate=24000, gap_threshold=0.1)
    turn = st.begin_turn(0.0)
    t = 0.0
    while not turn.speech_sent:
        st.mic_frame()
        t += 0.02
        st.mic_sent(t)
    assert turn.record.eos_at == pytest.approx(60 * 0.02)
    st.on_message('{"type": "response.audio.start", "item_id": "a"}', 2.0)
    frame = 24000 * 2 * 40 // 1000  # 40 ms
    st.on_audio(frame, 2.0)      # first audio: latency 0.8 s; playback starts
    st.on_audio(frame, 2.05)     # 10 ms after the first 40 ms ran out: under the threshold
    st.on_audio(frame, 2.30)     # 220 ms after the buffer ran dry at 2.08: a gap
    st.on_audio(frame, 2.35)     # on time again from the stall
    st.on_message('{"type": "response.audio.end", "item_id": "a", "reason": "end_turn"}', 2.4)
    st.on_message('{"type": "transcript", "item_id": "a", "role": "assistant", "text": "x", "final": true, '
                  '"receipt": "r1"}', 2.4)
    assert st.status(2.4) == "done" and st.pending == {"a": "r1"}
    rec = st.end_turn("answered")
    assert rec.latency == pytest.approx(0.8) and rec.gaps == 1 and rec.gap_total == pytest.approx(0.22)
    st.on_message('{"type": "item.saved", "item_id": "a"}', 2.5)
    assert st.pending == {}
    start = orjson.loads(st.session_start())
    assert start["audio"] == {"input_sample_rate": 16000, "output_sample_rate": 24000} and "pending" not in start


def test_wav_rates_and_urls(tmp_path):
    for rate in (8000, 16000, 24000, 48000, 22050):
        path = tmp_path / f"x{rate}.wav"
        with wave.open(str(path), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(rate)
            w.writeframes(b"\x00\x10" * rate)
        s = load_speech(path)
        assert s.rate == (16000 if rate == 22050 else rate) and len(s.frames[0]) == s.rate * 2 // 50
    bundled = load_speech()
    assert bundled.rate == 16000 and 2.0 < bundled.seconds < 4.0 and bundled.last_speech < len(bundled.frames) - 5
    assert normalize_url("http://h:8000") == "ws://h:8000/v1/voice"
    assert normalize_url("wss://h/v1/voice") == "wss://h/v1/voice"


def test_metrics_are_summed_across_label_sets_and_processes():
    worker = """# TYPE process_cpu_seconds_total counter
process_cpu_seconds_total{pid="1"} 2.0
process_cpu_seconds_total{pid="2"} 3.0
# TYPE novagate_event_loop_lag_seconds histogram
novagate_event_loop_lag_seconds_bucket{le="0.01",pid="1"} 8.0
novagate_event_loop_lag_seconds_bucket{le="0.1",pid="1"} 10.0
novagate_event_loop_lag_seconds_bucket{le="+Inf",pid="1"} 10.0
novagate_event_loop_lag_seconds_bucket{le="0.01",pid="2"} 2.0
novagate_event_loop_lag_seconds_bucket{le="0.1",pid="2"} 10.0
novagate_event_loop_lag_seconds_bucket{le="+Inf",pid="2"} 10.0
novagate_event_loop_lag_seconds_count{pid="1"} 10.0
novagate_event_loop_lag_seconds_count{pid="2"} 10.0
novagate_event_loop_lag_seconds_sum{pid="1"} 0.1
novagate_event_loop_lag_seconds_sum{pid="2"} 0.3
"""
    a, b = Scrape(0.0, {}, {}), Scrape(2.0, {}, {})
    parse(worker.replace(" 2.0\n", " 1.0\n", 1), a)
    parse(worker, b)
    assert b.values["process_cpu_seconds_total"] == 5.0
    assert b.buckets["novagate_event_loop_lag_seconds"] == {0.01: 10.0, 0.1: 20.0, float("inf"): 20.0}
    assert quantile(0.5, b.buckets["novagate_event_loop_lag_seconds"]) == pytest.approx(0.01)
    assert quantile(0.75, b.buckets["novagate_event_loop_lag_seconds"]) == pytest.approx(0.055)
    sc = Scraper(["x"], scrapes=[a, b])
    summary = sc.summary(0.0)
    assert summary["cpu_cores"]["mean"] == pytest.approx(0.5)  # 1 s of CPU in 2 s


def test_json_summary_needs_no_matplotlib(tmp_path):
    code = f"""
import sys
sys.modules["matplotlib"] = None  # not installed
from gateway.loadtest.report import build
from gateway.loadtest.state import Totals, UserStats
s = build(url="ws://x/v1/voice", started_at="t", duration=1.0, options={{"output_rate": 24000}},
          users=[UserStats(0, outcome="refused", failure="close 1013")], totals=Totals(), records=[], t0=0.0,
          gap_threshold=0.1, timeline=[], client={{"loop_lag_ms": {{"p99": None, "max": None}}, "mic_late": 0}},
          server=None, peak_up=0)
s.write_json({str(tmp_path / "s.json")!r})
print(s.text())
"""
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert orjson.loads((tmp_path / "s.json").read_bytes())["sessions"]["refused"] == 1


def test_loadtest_speaks_opus_and_reports_the_wire_rate(gw, tmp_path):
    out = tmp_path / "opus.json"
    p = novagate("loadtest", "--url", gw.ws, "-n", "2", "--duration", "8", "--think", "0.5", "--codec", "opus",
                 "--out", str(out), "--quiet", "--seed", "1")
    assert p.returncode == 0, p.stderr[-3000:]
    s = orjson.loads(out.read_bytes())
    assert s["sessions"]["connected"] == 2 and s["errors"]["total"] == 0, s["errors"]
    assert s["turns"]["count"] > 0 and s["turns"]["timeouts"] == 0
    assert s["options"]["codec"] == "opus" and s["options"]["output_rate"] == 24000
    assert s["audio"]["received_s"] > 0.5  # decoded seconds (from the Opus packets' TOC), not bytes
    w = s["wire"]
    assert w["codec"] == "opus" and w["up_bytes_per_session"] > 0 and w["down_bytes_per_session"] > 0
    # per session: far under PCM16's 256 kbit/s up (16 kHz) and 384 kbit/s down (24 kHz)
    assert 1 < w["up_kbit_s"] < 256 / 5 and 5 < w["down_kbit_s_speaking"] < 384 / 5
    assert w["down_kbit_s"] <= w["down_kbit_s_speaking"]
    assert "wire       opus, per session: up" in p.stdout and "kbit/s" in p.stdout
    # mu-law comes at 8 kHz only: refused before anything starts
    bad = novagate("loadtest", "--url", gw.ws, "--codec", "mulaw", "--output-rate", "24000", "--quiet")
    assert bad.returncode == 2 and "8000" in bad.stderr and "Traceback" not in bad.stderr
