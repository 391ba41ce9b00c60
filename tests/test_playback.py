"""The pacer and the audio rate limiter, on a fake clock."""

from protocol.limits import AudioRateLimiter, TokenBucket
from protocol.playback import Audio, PlaybackPacer

RATE = 24000
MS = RATE * 2 // 1000  # bytes per ms


def audio_ms(out):
    return sum(len(o.pcm) for o in out if isinstance(o, Audio)) / MS


def test_releases_only_the_lead_then_real_time():
    p = PlaybackPacer(RATE, lead_ms=200, chunk_ms=40)
    p.start_item("a", "start-a")
    p.push_audio("a", bytes(MS * 1000))  # 1 s
    p.end_item("a", "end-a")
    out = p.poll(0.0)
    assert out[0] == "start-a"
    assert 200 <= audio_ms(out) <= 240  # the lead, in 40 ms frames
    assert p.poll(0.0) == []  # nothing more until time passes
    assert abs(p.next_wakeup(0.0) - (audio_ms(out) / 1000 - 0.2)) < 1e-9
    total = audio_ms(out)
    t = 0.0
    while total < 1000:
        t += 0.04
        out = p.poll(t)
        total += audio_ms(out)
    assert total == 1000
    assert 0.75 <= t <= 0.85  # 1 s of audio needs about 0.8 s of wall time with a 200 ms lead
    assert out[-1] == "end-a"  # the end follows the last frame at once


def test_played_out_is_reported_once_after_the_client_played_everything():
    p = PlaybackPacer(RATE, lead_ms=200)
    p.start_item("a", "s")
    p.push_audio("a", bytes(MS * 100))
    p.end_item("a", "e")
    p.poll(0.0)
    assert p.played_out(0.05) == []
    assert p.played_out(0.11) == ["a"]
    assert p.played_out(0.2) == []


def test_messages_keep_their_place_among_audio():
    p = PlaybackPacer(RATE, lead_ms=100, chunk_ms=50)
    p.start_item("a", "start-a")
    p.push_audio("a", bytes(MS * 300))
    p.end_item("a", "end-a")
    p.push_message("after-a")
    seen = []
    t = 0.0
    while "after-a" not in seen:
        seen += [o if not isinstance(o, Audio) else "audio" for o in p.poll(t)]
        t += 0.01
    assert seen[0] == "start-a"
    assert seen[-2:] == ["end-a", "after-a"]
    assert seen.count("audio") == 6


def test_flush_drops_queue_and_reports_what_was_heard():
    p = PlaybackPacer(RATE, lead_ms=200, chunk_ms=40)
    p.start_item("a", "sa")
    p.push_audio("a", bytes(MS * 1000))
    p.end_item("a", "ea")
    p.start_item("b", "sb")
    p.push_audio("b", bytes(MS * 500))
    p.end_item("b", "eb")
    t = 0.0
    while t < 0.5:
        p.poll(t)
        t += 0.02
    r = p.flush(0.5)
    assert r.current == "a"
    assert r.played_ms == 500
    assert r.open_items == ("a",)
    assert r.unheard == ("b",)
    assert p.poll(0.6) == [] and p.queued_ms == 0
    assert p.next_wakeup(0.6) is None


def test_full_bounds_the_queue():
    p = PlaybackPacer(RATE, lead_ms=200, max_queue_ms=1000)
    p.start_item("a", "s")
    p.push_audio("a", bytes(MS * 999))
    assert not p.full
    p.push_audio("a", bytes(MS * 10))
    assert p.full


def test_rate_limiter_allows_bursts_and_real_time_but_not_3x():
    lim = AudioRateLimiter(max_speed=2.0, window_s=5.0)
    assert lim.add(3.0, 0.0)  # 3 s buffered audio after a reconnect
    t = 0.0
    for _ in range(1000):  # then real time for 20 s
        t += 0.02
        assert lim.add(0.02, t)
    lim = AudioRateLimiter(max_speed=2.0, window_s=5.0)
    t, ok = 0.0, True
    while ok and t < 20:
        t += 0.02
        ok = lim.add(0.06, t)  # 3x real time
    assert not ok and 4.5 < t < 6.0


def test_rate_limiter_does_not_charge_a_real_time_client_for_server_lag():
    lim = AudioRateLimiter(max_speed=2.0, window_s=5.0)
    t = 0.0
    for _ in range(500):  # 10 s of real time
        t += 0.02
        assert lim.add(0.02, t)
    t += 8.0  # the server was stalled for 8 s; now it reads 8 s of frames at once
    for _ in range(400):
        assert lim.add(0.02, t)


def test_rate_limiter_caps_the_credit_of_a_pause():
    lim = AudioRateLimiter(max_speed=2.0, window_s=5.0, credit_s=10.0)
    assert lim.add(0.02, 0.0)
    sent, ok = 0.0, True
    while ok:  # after an hour of silence, a burst
        sent += 0.5
        ok = lim.add(0.5, 3600.0)
    assert 14.0 <= sent <= 15.5


def test_token_bucket():
    b = TokenBucket(rate=2.0, burst=3)
    assert [b.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert b.take(0.5) and not b.take(0.5)
    assert all(b.take(100.0) for _ in range(3)) and not b.take(100.0)


def test_idle_until_queued_and_again_once_played_out():
    p = PlaybackPacer(RATE, lead_ms=200, chunk_ms=40)
    assert p.idle and p.poll(0.0) == [] and p.played_out(0.0) == [] and p.next_wakeup(0.0) is None
    p.start_item("a", "start-a")
    assert not p.idle
    p.push_audio("a", bytes(MS * 100))
    p.end_item("a", "end-a")
    p.poll(0.0)
    assert not p.idle  # released, not yet played
    assert p.played_out(0.1) == ["a"]
    assert p.idle and p.next_wakeup(0.1) is None
