"""Rate limits on what a client sends, on its own timeline or the time passed in. No clocks here."""

from __future__ import annotations


class TokenBucket:
    """`rate` per second, bursts of `burst`. `take(now)` says whether one more is allowed."""

    def __init__(self, rate: float, burst: float):
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self._last: float | None = None

    def take(self, now: float) -> bool:
        if self._last is not None:
            tokens = self.tokens + (now - self._last) * self.rate
            self.tokens = tokens if tokens < self.burst else self.burst
        self._last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class AudioRateLimiter:
    """A client may not send audio faster than `max_speed` x real time, sustained over `window_s`.

    Measured on the client's own audio timeline: the seconds of audio it has sent, against
    `max_speed` times the seconds since its first frame, may run ahead by at most `window_s`. A frame
    the server reads late (its loop was busy) carries no more audio than it did on time, so lag is
    never charged to a real-time client. Credit for pauses is capped at `credit_s`, so a long silence
    does not bank a long burst: after one, a client may send `credit_s + window_s` at once.
    """

    def __init__(self, *, max_speed: float = 2.0, window_s: float = 5.0, credit_s: float = 10.0):
        self.max_speed = max_speed
        self.window_s = window_s
        self.credit_s = credit_s
        self.sent_s = 0.0
        self._t0: float | None = None

    def add(self, audio_s: float, now: float) -> bool:
        """Charge audio_s seconds of audio read at `now`; False when the client is over the limit."""
        t0 = now if self._t0 is None else self._t0
        floor = now - (self.sent_s + self.credit_s) / self.max_speed
        self._t0 = t0 = t0 if t0 >= floor else floor
        self.sent_s += audio_s
        return self.sent_s - self.max_speed * (now - t0) <= self.window_s
