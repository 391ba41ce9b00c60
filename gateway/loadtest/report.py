"""A load test's results: the `Summary` (its JSON is the `--out` file), the end-of-run text, and the
HTML report (`--html`: one self-contained file, plots as inline SVG; needs matplotlib, the
`loadtest` extra — nothing else here does)."""

from __future__ import annotations

import html
import io
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import orjson

from .state import Totals, TurnRecord, UserStats

SCHEMA = 1


def percentiles(values: list[float], scale: float = 1000.0) -> dict:
    """count, min, mean, p50, p95, p99, max (linear interpolation), scaled (seconds -> ms)."""
    xs = sorted(v * scale for v in values)
    if not xs:
        return {"count": 0, "min": None, "mean": None, "p50": None, "p95": None, "p99": None, "max": None}

    def q(p: float) -> float:
        k = (len(xs) - 1) * p
        lo, hi = math.floor(k), math.ceil(k)
        return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)

    r = lambda v: round(v, 1)  # noqa: E731
    return {"count": len(xs), "min": r(xs[0]), "mean": r(sum(xs) / len(xs)), "p50": r(q(0.5)),
            "p95": r(q(0.95)), "p99": r(q(0.99)), "max": r(xs[-1])}


@dataclass
class Summary:
    """Everything a run measured. `to_dict()` is the JSON summary; `turn_log` (every turn, monotonic
    times relative to the start) stays in Python for the HTML report and for callers."""

    url: str
    started_at: str
    duration_s: float
    options: dict
    sessions: dict
    turns: dict
    latency_ms: dict
    audio: dict
    errors: dict
    reconnects: dict
    client: dict
    server: dict | None
    timeline: list[dict]
    wire: dict = field(default_factory=dict)  # bytes on the wire, per session and kbit/s (see build)
    turn_log: list[dict] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("turn_log")
        return {"schema": SCHEMA, **d}

    def write_json(self, path: str | Path) -> None:
        Path(path).write_bytes(orjson.dumps(self.to_dict(), option=orjson.OPT_INDENT_2) + b"\n")

    # convenience for scripts
    @property
    def latency_p95_ms(self) -> float | None:
        return self.latency_ms["speech"]["p95"]

    def text(self) -> str:
        return render_text(self)


def build(*, url: str, started_at: str, duration: float, options: dict, users: list[UserStats],
          totals: Totals, records: list[TurnRecord], t0: float, gap_threshold: float,
          timeline: list[dict], client: dict, server: dict | None, peak_up: int) -> Summary:
    outcomes = Counter(u.outcome or "unstarted" for u in users)
    failures = Counter(u.failure for u in users if u.outcome in ("refused", "failed"))
    dropped = Counter(u.failure for u in users if u.outcome == "dropped")
    connect = [u.connect_seconds for u in users if u.connect_seconds is not None]
    sessions = {
        "planned": len(users),
        "started": sum(1 for u in users if u.outcome),
        "connected": outcomes["ok"] + outcomes["dropped"],
        "refused": outcomes["refused"],
        "failed": outcomes["failed"],
        "dropped": outcomes["dropped"],
        "peak_concurrent": peak_up,
        "failures": dict(failures),
        "drops": dict(dropped),
        "connect_ms": percentiles(connect),
    }
    by_outcome = Counter(r.outcome for r in records)
    by_kind = Counter(r.kind for r in records if r.latency is not None)
    turns = {
        "count": sum(1 for r in records if r.latency is not None),
        "speech": by_kind["speech"],
        "text": by_kind["text"],
        "answered": by_outcome["answered"],
        "early": by_outcome["early"],
        "cut_by_end": by_outcome["cut"],
        "timeouts": by_outcome["timeout"],
        "lost": by_outcome["lost"],
    }
    latency = {kind: percentiles([r.latency for r in records if r.kind == kind and r.latency is not None])
               for kind in ("speech", "text")}
    gaps = [r for r in records if r.gaps]
    audio = {
        "gap_threshold_ms": round(gap_threshold * 1000, 1),
        "gaps": sum(r.gaps for r in records),
        "gap_total_ms": round(sum(r.gap_total for r in records) * 1000, 1),
        "max_gap_ms": round(max((r.max_gap for r in records), default=0.0) * 1000, 1),
        "turns_with_gaps": len(gaps),
        "received_s": round(totals.received_seconds, 1),
        "sent_s": round(totals.sent_seconds, 1),
        "stray_audio_s": round(totals.stray_seconds, 3),
        "interruptions": totals.interruptions,
    }
    by_code = totals.errors
    by_close: Counter[int] = Counter()
    for u in users:
        by_close.update(u.close_codes)
    errors = {
        "total": sum(by_code.values()) + sum(by_close.values()) + by_outcome["timeout"],
        "by_code": dict(sorted(by_code.items())),
        "by_close_code": {str(k): v for k, v in sorted(by_close.items())},
        "turn_timeouts": by_outcome["timeout"],
    }
    recs = [r for u in users for r in u.reconnects]
    reconnects = {
        "count": len(recs),
        "planned": sum(1 for r in recs if r.kind == "planned"),
        "server": sum(1 for r in recs if r.kind == "server"),
        "resumed": sum(1 for r in recs if r.ok and r.resumed),
        "not_resumed": sum(1 for r in recs if r.ok and not r.resumed),
        "failed": sum(1 for r in recs if not r.ok),
        "ms": percentiles([r.seconds for r in recs if r.ok]),
    }
    log = [{"session": r.session, "turn": r.index, "kind": r.kind, "outcome": r.outcome,
            "t": round((r.eos_at if r.eos_at is not None else r.started_at) - t0, 3),
            "latency_ms": None if r.latency is None else round(r.latency * 1000, 1),
            "gaps": r.gaps, "gap_ms": round(r.gap_total * 1000, 1),
            "audio_s": round(r.audio_seconds, 3)} for r in records]
    return Summary(url=url, started_at=started_at, duration_s=round(duration, 3), options=options,
                   sessions=sessions, turns=turns, latency_ms=latency, audio=audio, errors=errors,
                   reconnects=reconnects, client=client, server=server, timeline=timeline,
                   wire=wire_summary(totals, options.get("codec", "pcm16"), sessions["connected"]), turn_log=log)


def _kbit_s(nbytes: float, seconds: float) -> float | None:
    return round(nbytes * 8 / seconds / 1000, 2) if seconds > 0 else None


def wire_summary(totals: Totals, codec: str, sessions: int) -> dict:
    """Bytes on the wire: audio frames' payloads as encoded (`up` the microphone's, `down` the replies')
    and JSON messages, in all and per connected session. The kbit/s are per session: `up_kbit_s` and
    `down_kbit_s` over its time connected (the microphone streams all along, so that is its time of
    audio sent), `down_kbit_s_speaking` over the reply audio's own duration (the rate while the assistant
    speaks). WebSocket framing (2–8 bytes a frame), TLS and TCP/IP come on top (docs/mobile.md)."""
    n = max(1, sessions)
    connected = totals.sent_seconds
    return {
        "codec": codec,
        "up_bytes": totals.sent_bytes,
        "down_bytes": totals.received_bytes,
        "up_bytes_per_session": round(totals.sent_bytes / n),
        "down_bytes_per_session": round(totals.received_bytes / n),
        "up_kbit_s": _kbit_s(totals.sent_bytes, connected),
        "down_kbit_s": _kbit_s(totals.received_bytes, connected),
        "down_kbit_s_speaking": _kbit_s(totals.received_bytes, totals.received_seconds),
        "messages_up_bytes": totals.text_sent_bytes,
        "messages_down_bytes": totals.text_received_bytes,
        "messages_kbit_s": _kbit_s(totals.text_sent_bytes + totals.text_received_bytes, connected),
    }


# -- text ---------------------------------------------------------------------------------------
def _fmt(v, unit: str = " ms", nd: int = 0) -> str:
    return "-" if v is None else f"{v:.{nd}f}{unit}"


def _mb(v) -> str:
    return "-" if v is None else f"{v / 2**20:.0f} MB"


def render_text(s: Summary) -> str:
    se, tu, la, au, er, rc = s.sessions, s.turns, s.latency_ms, s.audio, s.errors, s.reconnects
    lines = [f"novagate loadtest: {se['planned']} sessions against {s.url} for {s.duration_s:.1f} s"]
    fails = ", ".join(f"{k} x{v}" for k, v in {**se["failures"], **se["drops"]}.items())
    lines.append(f"  sessions   {se['connected']} connected, {se['refused']} refused, {se['failed']} failed, "
                 f"{se['dropped']} dropped; peak {se['peak_concurrent']} at once; connect p50 "
                 f"{_fmt(se['connect_ms']['p50'])}" + (f" ({fails})" if fails else ""))
    lines.append(f"  turns      {tu['count']} measured ({tu['speech']} spoken, {tu['text']} typed): "
                 f"{tu['answered']} answered, {tu['cut_by_end']} cut by the end, {tu['timeouts']} timed out, "
                 f"{tu['lost']} lost" + (f", {tu['early']} answered before the end of speech" if tu["early"] else ""))
    if any(k.startswith("close 4429") for k in se["failures"]):
        lines.append("             hint: 4429 at connect is the gateway's cap of sockets per client address "
                     "(NOVAGATE_MAX_SOCKETS_PER_IP, default 20): set it to 0 on a gateway under load test")
    sp = la["speech"]
    lines.append(f"  latency    end of speech -> first audio: p50 {_fmt(sp['p50'])}  p95 {_fmt(sp['p95'])}  "
                 f"p99 {_fmt(sp['p99'])}  max {_fmt(sp['max'])}  (n={sp['count']})")
    tx = la["text"]
    if tx["count"]:
        lines.append(f"             typed turn -> first audio:   p50 {_fmt(tx['p50'])}  p95 {_fmt(tx['p95'])}  "
                     f"p99 {_fmt(tx['p99'])}  (n={tx['count']})")
    lines.append(f"  audio      {au['gaps']} gaps > {au['gap_threshold_ms']:.0f} ms ({au['gap_total_ms']:.0f} ms in "
                 f"all, longest {au['max_gap_ms']:.0f} ms) in {au['received_s']:.1f} s received; "
                 f"{au['sent_s']:.1f} s sent")
    w = s.wire
    if w:
        lines.append(f"  wire       {w['codec']}, per session: up {_fmt(w['up_kbit_s'], ' kbit/s', 1)}, down "
                     f"{_fmt(w['down_kbit_s'], ' kbit/s', 1)} ({_fmt(w['down_kbit_s_speaking'], ' kbit/s', 1)} while "
                     f"the assistant speaks); {w['up_bytes_per_session'] / 1000:.1f} kB up, "
                     f"{w['down_bytes_per_session'] / 1000:.1f} kB down; messages "
                     f"{_fmt(w['messages_kbit_s'], ' kbit/s', 1)}")
    if er["total"]:
        parts = [f"{k} x{v}" for k, v in er["by_code"].items()]
        parts += [f"close {k} x{v}" for k, v in er["by_close_code"].items()]
        if er["turn_timeouts"]:
            parts.append(f"turn timeout x{er['turn_timeouts']}")
        lines.append(f"  errors     {er['total']}: " + ", ".join(parts))
    else:
        lines.append("  errors     none")
    if rc["count"]:
        lines.append(f"  reconnects {rc['count']} ({rc['planned']} planned, {rc['server']} asked by the server): "
                     f"{rc['resumed']} resumed, {rc['not_resumed']} not resumed, {rc['failed']} failed; "
                     f"p50 {_fmt(rc['ms']['p50'])} p95 {_fmt(rc['ms']['p95'])}")
    sv = s.server
    if sv is not None:
        if not sv.get("scrapes"):
            lines.append(f"  server     no /metrics scrape worked ({sv.get('last_scrape_error', '')})")
        else:
            cpu, rss = sv.get("cpu_cores") or {}, sv.get("rss_bytes") or {}
            m2c, lag = sv.get("model_to_client_delay_ms") or {}, sv.get("event_loop_lag_ms") or {}
            lines.append(f"  server     cpu {_fmt(cpu.get('mean'), ' cores', 2)} mean, {_fmt(cpu.get('max'), '', 2)} max; "
                         f"rss {_mb(rss.get('start'))} -> {_mb(rss.get('end'))} (max {_mb(rss.get('max'))}); "
                         f"{sv['scrapes']} scrapes")
            lines.append(f"             model->client delay p50 {_fmt(m2c.get('p50'), ' ms', 2)} p95 "
                         f"{_fmt(m2c.get('p95'), ' ms', 2)} p99 {_fmt(m2c.get('p99'), ' ms', 2)}; event-loop lag p50 "
                         f"{_fmt(lag.get('p50'), ' ms', 1)} p95 {_fmt(lag.get('p95'), ' ms', 1)} p99 "
                         f"{_fmt(lag.get('p99'), ' ms', 1)}")
    c = s.client
    lines.append(f"  client     event-loop lag p99 {_fmt(c['loop_lag_ms']['p99'], ' ms', 1)} (max "
                 f"{_fmt(c['loop_lag_ms']['max'], ' ms', 1)}); microphone fell behind {c['mic_late']} times"
                 + ("  << the load generator itself is overloaded: its numbers are not the gateway's"
                    if c.get("overloaded") else ""))
    return "\n".join(lines)


# -- HTML ---------------------------------------------------------------------------------------
class MissingMatplotlib(RuntimeError):
    pass


def _svg(fig) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    text = buf.getvalue()
    return text[text.find("<svg"):]


def _plots(s: Summary) -> list[tuple[str, str]]:
    try:
        import matplotlib
    except ImportError as e:
        raise MissingMatplotlib("the HTML report needs matplotlib: pip install 'novagate[loadtest]'") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matplotlib.rcParams.update({"svg.fonttype": "none", "font.size": 9, "figure.dpi": 96})
    out: list[tuple[str, str]] = []

    def figure(title: str):
        fig, ax = plt.subplots(figsize=(8.5, 2.8))
        ax.set_title(title, loc="left", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.set_xlabel("seconds since start")
        return fig, ax

    def done(fig, caption: str) -> None:
        out.append((caption, _svg(fig)))
        plt.close(fig)

    tl = s.timeline
    xs = [p["t"] for p in tl]
    # latency
    fig, ax = figure("End of speech -> first audio (ms)")
    for kind, color in (("speech", "tab:blue"), ("text", "tab:purple")):
        pts = [(r["t"], r["latency_ms"]) for r in s.turn_log if r["kind"] == kind and r["latency_ms"] is not None]
        if pts:
            ax.scatter(*zip(*pts), s=8, alpha=0.45, color=color, label=f"{kind} turns")
    for key, style, label in (("latency_p50_ms", "-", "p50 (10 s window)"), ("latency_p95_ms", "--", "p95 (10 s window)")):
        pts = [(p["t"], p[key]) for p in tl if p.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), style, color="tab:orange", label=label)
    ax.set_ylim(bottom=0)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", fontsize=8)
    done(fig, "Latency per turn, from the last speech frame sent to the first audio frame received")
    # sessions
    fig, ax = figure("Sessions")
    ax.plot(xs, [p["sessions_up"] for p in tl], label="client: sessions up")
    srv = (s.server or {}).get("timeline") or []
    if any(p.get("sessions_active") is not None for p in srv):
        ax.plot([p["t"] for p in srv], [p.get("sessions_active") for p in srv], "--", label="server: sessions active")
    ax.set_ylim(bottom=0)
    ax.legend(loc="upper left", fontsize=8)
    done(fig, "Sessions over time: connected on the client's side, and the gateway's novagate_sessions_active")
    fig, ax = figure("Turns and errors (cumulative)")
    ax.plot(xs, [p["turns"] for p in tl], color="tab:green", label="turns measured")
    ax.plot(xs, [p["errors"] for p in tl], color="tab:red", label="errors")
    ax.plot(xs, [p["gaps"] for p in tl], color="tab:gray", linestyle=":", label="audio gaps")
    ax.set_ylim(bottom=0)
    ax.legend(loc="upper left", fontsize=8)
    done(fig, "Turns whose reply started, errors (error messages, server closes, turn timeouts) and audio gaps")
    if srv:
        fig, ax = figure("Server CPU (cores)")
        pts = [(p["t"], p["cpu_cores"]) for p in srv if p.get("cpu_cores") is not None]
        if pts:
            ax.plot(*zip(*pts), color="tab:red")
        ax.set_ylim(bottom=0)
        done(fig, "Server CPU: the rate of process_cpu_seconds_total")
        fig, ax = figure("Server memory (RSS, MB)")
        pts = [(p["t"], p["rss_bytes"] / 2**20) for p in srv if p.get("rss_bytes") is not None]
        if pts:
            ax.plot(*zip(*pts), color="tab:brown")
        ax.set_ylim(bottom=0)
        done(fig, "Server memory: process_resident_memory_bytes")
        delays = {key: [(p["t"], p[key]) for p in srv if p.get(key) is not None]
                  for key in ("event_loop_lag_p95_ms", "model_to_client_delay_p95_ms")}
        if any(delays.values()):
            fig, ax = figure("Server delays, p95 per scrape interval (ms)")
            for key, label in (("event_loop_lag_p95_ms", "event-loop lag"),
                               ("model_to_client_delay_p95_ms", "model -> client delay")):
                if delays[key]:
                    ax.plot(*zip(*delays[key]), label=label)
            ax.set_ylim(bottom=0)
            ax.legend(loc="upper left", fontsize=8)
            done(fig, "novagate_event_loop_lag_seconds and novagate_model_to_client_delay_seconds")
    return out


_CSS = """body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:62em;color:#222;padding:0 1em}
h1{font-size:1.4em}h2{font-size:1.1em;margin-top:1.6em}table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ddd;padding:.25em .6em;text-align:left;vertical-align:top}th{background:#f5f5f5}
figure{margin:1em 0}figcaption{color:#555;font-size:.9em}svg{max-width:100%;height:auto}
pre{background:#f7f7f7;padding:.8em;overflow-x:auto;font-size:12px}"""


def render_html(s: Summary) -> str:
    plots = _plots(s)
    e = html.escape

    def table(rows: list[tuple[str, object]]) -> str:
        return "<table>" + "".join(f"<tr><th>{e(k)}</th><td>{e(str(v))}</td></tr>" for k, v in rows) + "</table>"

    sp = s.latency_ms["speech"]
    head = table([
        ("gateway", s.url), ("started", s.started_at), ("duration", f"{s.duration_s:.1f} s"),
        ("sessions", f"{s.sessions['connected']} connected / {s.sessions['planned']} planned; "
                     f"{s.sessions['refused']} refused, {s.sessions['failed']} failed, {s.sessions['dropped']} dropped"),
        ("turns", s.turns["count"]),
        ("end of speech -> first audio", f"p50 {_fmt(sp['p50'])}, p95 {_fmt(sp['p95'])}, p99 {_fmt(sp['p99'])}"),
        ("audio gaps", f"{s.audio['gaps']} ({s.audio['gap_total_ms']:.0f} ms)"),
        ("wire per session", f"{s.wire.get('codec', '-')}: up {_fmt(s.wire.get('up_kbit_s'), ' kbit/s', 1)}, down "
                             f"{_fmt(s.wire.get('down_kbit_s'), ' kbit/s', 1)}"),
        ("errors", s.errors["total"]),
    ])
    figures = "".join(f"<figure>{svg}<figcaption>{e(cap)}</figcaption></figure>" for cap, svg in plots)
    body = orjson.dumps(s.to_dict() | {"timeline": f"{len(s.timeline)} points"}, option=orjson.OPT_INDENT_2).decode()
    return (f"<!doctype html><html lang=en><meta charset=utf-8><title>novagate loadtest {e(s.started_at)}</title>"
            f"<style>{_CSS}</style><h1>novagate loadtest</h1>{head}<h2>Plots</h2>{figures}"
            f"<h2>Summary</h2><pre>{e(render_text(s))}</pre><h2>JSON</h2><pre>{e(body)}</pre></html>\n")


def write_html(s: Summary, path: str | Path) -> None:
    Path(path).write_text(render_html(s), encoding="utf-8")
