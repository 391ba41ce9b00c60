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
# Overload (gateway/health.py) and workers.
OVERLOADED = Gauge("novagate_overloaded", "worker processes refusing new sockets because their event loop lags or "
                   "their CPU is spent (0 or 1 with one process)", multiprocess_mode="livesum")
WORKER_SOCKETS = Gauge("novagate_worker_sockets", "sockets (sessions and handshakes) each worker process holds "
                       "(label pid under several workers)", multiprocess_mode="liveall")

# What protocol.session.Session counts (its Count / Observe effects name these).
SESSION_COUNTERS = {
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
SESSION_HISTOGRAMS = {"history_load_seconds": HISTORY_LOAD, "tool_call_seconds": TOOL_CALL_TIME,
                      "speech_end_to_audio_seconds": SPEECH_END_TO_AUDIO}


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
