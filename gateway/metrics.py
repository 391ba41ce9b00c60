"""Prometheus metrics, including the original guide's three: recovery rate, history load time and
persistence success rate (see docs/operations.md for alarms)."""

import os

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

# Under several workers (gateway/workers.py) every process writes its own values and /metrics adds them up:
# gauges say how (livesum: the sum over the live workers; liveall: one series per live worker, label pid).
SESSIONS_ACTIVE = Gauge("novagate_sessions_active", "WebSocket sessions open now", multiprocess_mode="livesum")
HANDSHAKES = Gauge("novagate_handshakes_pending", "sockets that have not yet completed session.start and credentials",
                   multiprocess_mode="livesum")
SESSIONS = Counter("novagate_sessions_total", "WebSocket sessions accepted")
REALTIME_SESSIONS = Counter("novagate_realtime_sessions_total", "of those, sessions on /v1/realtime "
                            "(the OpenAI Realtime-compatible endpoint)")
REJECTED = Counter("novagate_sessions_rejected_total", "sockets refused (origin, draining, overload, capacity, busy, "
                   "per_address, per_user) or evicted from their handshake", ["reason"])
RESUMES = Counter("novagate_resumes_total", "resume attempts by result", ["result"])
HISTORY_LOAD = Histogram(
    "novagate_history_load_seconds", "time to find and load a conversation's history",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5),
)
ITEMS_SAVED = Counter("novagate_items_saved_total", "items durably stored")
STORE_ERRORS = Counter("novagate_store_errors_total", "failed store writes (retried)")
MODEL_ERRORS = Counter("novagate_model_errors_total", "model stream errors", ["kind"])
ROTATIONS = Counter("novagate_stream_rotations_total", "model streams handed over before their cap", ["mode"])
RECOVERIES = Counter("novagate_stream_recoveries_total", "model streams reopened after a failure", ["kind"])
MODEL_AUDIO = Counter("novagate_model_audio_bytes_total", "16 kHz audio sent to the model", ["source"])
MODEL_AUDIO_BY_SOURCE = {s: MODEL_AUDIO.labels(s) for s in ("client", "keepalive", "replay")}  # per frame: no lookup
DEAF_STREAMS = Counter("novagate_deaf_streams_total", "model streams replaced because they said nothing after user "
                       "speech")
DRAINS = Counter("novagate_drains_total", "graceful drains (SIGTERM)")
HISTORY_FALLBACKS = Counter("novagate_history_fallbacks_total", "model streams that refused a history as too large "
                            "(the session goes on with the conservative 40 KB limits)")
TOOL_CALLS = Counter("novagate_tool_calls_total", "tool calls the model made, by how they went (started, finished, "
                     "failed, timed_out, cancelled)", ["status"])
TOOL_CALL_TIME = Histogram(
    "novagate_tool_call_seconds", "from the model's toolUse to the tool's answer",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 60),
)
SPEECH_END_TO_AUDIO = Histogram(
    "novagate_speech_end_to_first_audio_seconds", "end of the user's speech (the model's userSpeechEnd, else the "
    "gateway's voice activity detection) until the first audio of the reply is sent to the client",
    buckets=(0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10),
)
# Capacity (docs/capacity.md): what the gateway itself adds, and how far behind its event loop runs.
MODEL_TO_CLIENT = Histogram(
    "novagate_model_to_client_delay_seconds", "model audio received (or released by the playback pacer) until "
    "its bytes are written to the client's socket: what the gateway adds",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1),
)
LOOP_LAG = Histogram(
    "novagate_event_loop_lag_seconds", "how late the event loop ran a timer it was asked to run",
    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
# The guide's history-load alarm for CloudWatch, whose agent drops Prometheus histograms: the same loads as
# counters (docs/observability.md).
HISTORY_LOADS = Counter("novagate_history_loads_total", "conversation history loads (as "
                        "novagate_history_load_seconds_count)")
HISTORY_LOADS_SLOW = Counter("novagate_history_loads_slow_total", "history loads that took longer than 2 s")


class _HistoryLoad:
    """`novagate_history_load_seconds`, and the two counters a CloudWatch alarm can read."""

    def observe(self, seconds: float) -> None:
        HISTORY_LOAD.observe(seconds)
        HISTORY_LOADS.inc()
        if seconds > 2:
            HISTORY_LOADS_SLOW.inc()


# Recovery and the store, for the alerts (docs/observability.md).
RECOVERY_FAILURES = Counter("novagate_stream_recovery_failures_total", "model stream recoveries given up (the session "
                            "ended 1011 model_unavailable)", ["kind"])
STORE_BACKLOG = Gauge("novagate_store_backlog_items", "items waiting to be stored, over all sessions (the store is "
                      "slow or down while this grows)", multiprocess_mode="livesum")
# Usage and cost (protocol/usage.py, docs/usage.md), from Nova's usageEvents.
TOKENS = Counter("novagate_tokens_total", "model tokens, by direction and modality", ["direction", "modality"])
COST = Counter("novagate_cost_usd_total", "what the model tokens cost at the configured prices (USD)")
SESSION_TOKENS = Histogram("novagate_session_tokens", "model tokens of one session, at its end",
                           buckets=(100, 1_000, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000))
SESSION_COST = Histogram("novagate_session_cost_usd", "what one session's tokens cost, at its end (USD)",
                         buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
BUDGET_EXCEEDED = Counter("novagate_budget_exceeded_total", "sessions refused (when=start) or ended (when=live) "
                          "because the user's budget was spent", ["when"])
USER_TOKENS = Counter("novagate_user_tokens_total", "model tokens per user (owner hash; only with "
                      "NOVAGATE_USAGE_METRICS_BY_USER)", ["user"])
USAGE_RECORD_ERRORS = Counter("novagate_usage_record_errors_total", "a user's usage that could not be added to "
                              "the store's ledger (a budget may then under-count)")
# Overload (gateway/health.py) and workers.
OVERLOADED = Gauge("novagate_overloaded", "worker processes refusing new sockets because their event loop lags or "
                   "their CPU is spent (0 or 1 with one process)", multiprocess_mode="livesum")
WORKER_SOCKETS = Gauge("novagate_worker_sockets", "sockets (sessions and handshakes) each worker process holds "
                       "(label pid under several workers)", multiprocess_mode="liveall")



class _TokensByKind:
    """`novagate_tokens_total` children by the session's kind names ("input_speech", ...)."""

    children = {f"{d}_{mo}": TOKENS.labels(d, mo) for d in ("input", "output") for mo in ("speech", "text")}

    def labels(self, kind: str):
        return self.children[kind]


# What protocol.session.Session counts (its Count / Observe effects name these; store_backlog is a gauge
# the session moves up and down).
SESSION_COUNTERS = {
    "recovery_failures": RECOVERY_FAILURES,
    "store_backlog": STORE_BACKLOG,
    "tokens": _TokensByKind(),
    "cost_usd": COST,
    "budget_exceeded": BUDGET_EXCEEDED,
    "resumes": RESUMES,
    "items_saved": ITEMS_SAVED,
    "store_errors": STORE_ERRORS,
    "model_errors": MODEL_ERRORS,
    "rotations": ROTATIONS,
    "recoveries": RECOVERIES,
    "deaf_streams": DEAF_STREAMS,
    "tool_calls": TOOL_CALLS,
    "history_fallbacks": HISTORY_FALLBACKS,
}
SESSION_HISTOGRAMS = {"history_load_seconds": _HistoryLoad(), "tool_call_seconds": TOOL_CALL_TIME,
                      "speech_end_to_audio_seconds": SPEECH_END_TO_AUDIO, "session_tokens": SESSION_TOKENS,
                      "session_cost_usd": SESSION_COST}


async def endpoint(request: Request) -> Response:
    """GET /metrics: the Prometheus text format; under several workers, of all of them (gateway/workers.py)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from .workers import aggregate_registry

        return Response(generate_latest(aggregate_registry(os.environ["PROMETHEUS_MULTIPROC_DIR"])),
                        media_type=CONTENT_TYPE_LATEST)
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


def admin_app() -> Starlette:
    """The admin port's application: /metrics and nothing else (NOVAGATE_METRICS_PORT)."""
    return Starlette(routes=[Route("/metrics", endpoint)])
