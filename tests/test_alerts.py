"""The alerting rules, the Grafana dashboard and the CloudWatch template (docs/observability.md).

- promtool (`make promtool`: Debian's `prometheus` package) checks the rule file and unit-tests it: each of
  the original guide's three alerts fires just past its threshold and stays silent just inside it and
  without traffic, with the annotations an operator reads; every other alert fires on a synthetic series.
- Every metric a rule, a dashboard query or a CloudWatch alarm names is one a real gateway process
  exposes on /metrics, with the right type (counters under rate(), histograms through _bucket), and every
  label it matches on is one the metric has, with values the code uses.
- cfn-lint validates the CloudFormation template; the rules it loads into Amazon Managed Service for
  Prometheus are the rule file, verbatim; the CloudWatch agent configuration in the docs publishes every
  metric and dimension the alarms read.

`python tests/test_alerts.py --embed` copies the rule file into the CloudFormation template again.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from .conftest import missing_tool

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "helm/novagate/files/prometheus-rules.yaml"
DASHBOARD = ROOT / "helm/novagate/files/grafana-dashboard.json"
TEMPLATE = ROOT / "helm/cloudwatch/alarms.yaml"
DOC = ROOT / "docs/observability.md"

GUIDE_ALERTS = ("NovagateHistoryLoadSlow", "NovagatePersistenceFailing", "NovagateSessionRecoveryLow")
# Labels Prometheus adds to every scraped series (target labels), not the gateway's own.
TARGET_LABELS = {"namespace", "job", "instance", "pod", "le"}
CW_DIMENSIONS = {"ClusterName", "Namespace"}  # added by the CloudWatch agent / the scrape job's relabelling
COUNTER_FUNCS = ("rate", "irate", "increase")


# -- tools -------------------------------------------------------------------------------------------------
@functools.cache
def _promtool() -> str | None:
    found = shutil.which("promtool")
    if found:
        return found
    for p in ("/usr/bin/promtool", "/usr/local/bin/promtool"):
        if Path(p).is_file():
            return p
    return None


@pytest.fixture(scope="module")
def promtool() -> str:
    path = _promtool()
    if path is None:
        missing_tool("promtool is not installed: run `make promtool` (scripts/install-promtool) once")
    return path


def run_promtool(promtool: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([promtool, *args], capture_output=True, text=True, timeout=120)


# -- what the files say ------------------------------------------------------------------------------------
def rule_file() -> dict:
    return yaml.safe_load(RULES.read_text())


def alerts() -> dict[str, dict]:
    return {r["alert"]: r for g in rule_file()["groups"] for r in g["rules"] if "alert" in r}


def rule_exprs() -> list[str]:
    return [r["expr"] for g in rule_file()["groups"] for r in g["rules"]]


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels() -> list[dict]:
    out = []
    for p in dashboard()["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))  # a collapsed row holds its panels
    return [p for p in out if p.get("type") != "row"]


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard_panels() for t in p.get("targets", [])]


def as_promql(expr: str) -> str:
    """A dashboard query with Grafana's variables replaced, so that promtool can parse it."""
    expr = expr.replace("$__rate_interval", "5m").replace("${__rate_interval}", "5m")
    return re.sub(r"\$\{?\w+\}?", ".*", expr)


def cloudformation() -> dict:
    pytest.importorskip("cfnlint", reason="cfn-lint is a dev dependency (pip install -e '.[dev]')")
    from cfnlint.decode import decode

    template, errors = decode(str(TEMPLATE))
    assert not errors, errors
    return template


def cloudwatch_metrics(template: dict) -> list[tuple[str, str, frozenset[str], dict]]:
    """(alarm, metric name, dimension names, dimensions) of every metric the template's alarms read."""
    out = []
    for name, res in template["Resources"].items():
        if res["Type"] != "AWS::CloudWatch::Alarm":
            continue
        for q in res["Properties"]["Metrics"]:
            if "MetricStat" in q:
                m = q["MetricStat"]["Metric"]
                dims = {d["Name"]: d["Value"] for d in m.get("Dimensions", [])}
                out.append((name, m["MetricName"], frozenset(dims), dims))
    return out


# -- PromQL, read just enough to find metric names and label matchers ----------------------------------------
_NAME = re.compile(r"(?<![\w:$\"])([a-zA-Z_][a-zA-Z0-9_]*)(?![\w:\"(])")
_SELECTOR = re.compile(r"(?<![\w:])([a-zA-Z_][a-zA-Z0-9_]*)\s*\{([^}]*)\}")
_MATCHER = re.compile(r"(\w+)\s*(=~|!~|!=|=)\s*\"([^\"]*)\"")
_COUNTER_ARG = re.compile(r"\b(?:%s)\s*\(\s*([a-zA-Z_][a-zA-Z0-9_]*)" % "|".join(COUNTER_FUNCS))


def metric_names(expr: str) -> set[str]:
    """The gateway's metrics an expression reads (not recording rules: their names hold a colon)."""
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    return {n for n in _NAME.findall(expr) if n.startswith(("novagate_", "process_"))}


def counter_args(expr: str) -> set[str]:
    return set(_COUNTER_ARG.findall(expr))


def matchers(expr: str) -> list[tuple[str, str, str, str]]:
    """(metric, label, operator, value) of every label matcher on a gateway metric."""
    out = []
    for metric, body in _SELECTOR.findall(expr):
        if metric.startswith(("novagate_", "process_")):
            out.extend((metric, *m) for m in _MATCHER.findall(body))
    return out


# -- what a running gateway exposes ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def exposed(tmp_path_factory) -> dict[str, str]:
    """`# TYPE` of every metric family on a real gateway's /metrics (prometheus_client writes one for every
    registered metric, labelled ones included, before any sample)."""
    from .conftest import Gateway

    gw = Gateway(tmp_path_factory.mktemp("gw"), {"NOVAGATE_ENGINE": "scripted"}).start()
    try:
        text = httpx.get(gw.http + "/metrics", timeout=30).text
    finally:
        gw.stop()
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
    assert "novagate_sessions_active" in types, text[:2000]
    return types


@functools.cache
def label_names() -> dict[str, tuple[str, ...]]:
    """The label names of every gateway metric, by the name /metrics types it under."""
    from prometheus_client.metrics import MetricWrapperBase

    from gateway import metrics

    out = {}
    for v in vars(metrics).values():
        if isinstance(v, MetricWrapperBase):
            out[v._name + ("_total" if v._type == "counter" else "")] = tuple(v._labelnames)
    return out


@functools.cache
def source_literals() -> str:
    return "\n".join(p.read_text() for d in ("gateway", "protocol") for p in (ROOT / d).rglob("*.py"))


def family(name: str, exposed: dict[str, str]) -> tuple[str, str] | None:
    """(family, type) a sample name belongs to, or None if the gateway exposes no such thing."""
    if name in exposed:
        return name, exposed[name]
    for suffix in ("_bucket", "_sum", "_count"):
        base = name.removesuffix(suffix)
        if base != name and exposed.get(base) in (("histogram",) if suffix == "_bucket" else ("histogram", "summary")):
            return base, exposed[base]
    base = name.removesuffix("_total")  # OpenMetrics names a counter's family without _total
    if base != name and exposed.get(base) == "counter":
        return base, "counter"
    return None


def problems(exprs: list[str], exposed: dict[str, str]) -> list[str]:
    out = []
    for expr in exprs:
        rated = counter_args(expr)
        for name in sorted(metric_names(expr)):
            found = family(name, exposed)
            if found is None:
                out.append(f"{name}: not on /metrics (in {expr.strip()[:120]!r})")
                continue
            fam, kind = found
            if fam == name and kind in ("histogram", "summary"):
                out.append(f"{name}: a {kind}: read its _bucket, _sum or _count series")
            elif kind == "counter" and name not in rated:
                out.append(f"{name}: a counter read without rate()/increase()")
            elif name in rated and kind not in ("counter", "histogram", "summary"):
                out.append(f"{name}: a {kind} under rate()/increase()")
        for metric, label, op, value in matchers(expr):
            if label in TARGET_LABELS or label == "__name__":
                continue
            found = family(metric, exposed)
            known = label_names().get(found[0] if found else metric)
            if known is not None and label not in known:
                out.append(f"{metric}: no label {label!r} (it has {known})")
            if op in ("=", "=~"):
                for v in value.split("|"):
                    if f'"{v}"' not in source_literals():
                        out.append(f'{metric}{{{label}{op}"{value}"}}: the code never uses the value {v!r}')
    return out


# -- the rule file ----------------------------------------------------------------------------------------
def test_rules_pass_promtool_check(promtool):
    r = run_promtool(promtool, "check", "rules", str(RULES))
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_alert_is_complete_and_has_a_runbook():
    doc = DOC.read_text()
    anchors = {re.sub(r"[^a-z0-9 -]", "", h.strip().lower()).replace(" ", "-")
               for h in re.findall(r"^#+ (.+)$", doc, re.M)}
    names = alerts()
    assert set(GUIDE_ALERTS) <= set(names)
    for name, rule in names.items():
        assert rule.get("for"), name
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), name
        ann = rule["annotations"]
        assert ann["summary"] and ann["description"], name
        page, _, anchor = ann["runbook_url"].partition("#")
        assert page == "docs/observability.md" and anchor == name.lower(), (name, ann["runbook_url"])
        assert anchor in anchors, f"docs/observability.md has no section {name}"


def test_rule_expressions_name_what_the_gateway_exposes(exposed):
    assert problems(rule_exprs(), exposed) == []


# promtool unit tests: series the way a scrape every minute would record them (two pods where the sum
# matters), and what should fire. `namespace` and `job` as a Kubernetes scrape would set them.
POD_A, POD_B = "10.0.0.1:9090", "10.0.0.2:9090"
AGG = {"namespace": "voice", "job": "novagate"}


def s(name: str, values: str, instance: str = POD_A, **labels: str) -> dict:
    lab = {**AGG, "instance": instance, **labels}
    return {"series": name + "{" + ", ".join(f'{k}="{v}"' for k, v in lab.items()) + "}", "values": values}


def buckets(name: str, per_minute: dict[str, int], minutes: int) -> list[dict]:
    """A histogram's cumulative buckets growing by `per_minute` observations (cumulative counts by le)."""
    return [s(f"{name}_bucket", f"0+{n}x{minutes}", le=le) for le, n in per_minute.items()]


@dataclasses.dataclass
class Case:
    alert: str
    eval_time: str
    series: list[dict]
    fires: list[dict]          # extra labels of each alert expected (besides alertname and severity)
    value: str = ""            # what {{ $value ... }} renders to (the guide's alerts: annotations are checked)
    note: str = ""


def _cases() -> list[Case]:
    lat = "novagate_history_load_seconds"
    return [
        # -- the guide's three, at the edge of their thresholds -------------------------------------------
        Case("NovagatePersistenceFailing", "30m", [
            s("novagate_items_saved_total", "0+500x40", POD_A), s("novagate_store_errors_total", "0x40", POD_A),
            s("novagate_items_saved_total", "0+449x40", POD_B), s("novagate_store_errors_total", "0+51x40", POD_B),
        ], [AGG], value="94.9%", note="94.9 % over two pods"),
        Case("NovagatePersistenceFailing", "30m", [
            s("novagate_items_saved_total", "0+951x40"), s("novagate_store_errors_total", "0+49x40"),
        ], [], note="95.1 %"),
        Case("NovagatePersistenceFailing", "30m", [
            s("novagate_items_saved_total", "0x40"), s("novagate_store_errors_total", "0x40"),
        ], [], note="no writes"),
        Case("NovagateSessionRecoveryLow", "40m", [
            s("novagate_resumes_total", "0+89x50", result="resumed"),
            s("novagate_resumes_total", "0+11x50", result="not_found"),
        ], [AGG], value="89%", note="89 %"),
        Case("NovagateSessionRecoveryLow", "40m", [
            s("novagate_resumes_total", "0+5x50", result="not_found"),
        ], [AGG], value="0%", note="no resume found its conversation: no result=resumed series at all"),
        Case("NovagateSessionRecoveryLow", "40m", [
            s("novagate_resumes_total", "0+91x50", result="resumed"),
            s("novagate_resumes_total", "0+9x50", result="not_found"),
        ], [], note="91 %"),
        Case("NovagateSessionRecoveryLow", "40m", [
            s("novagate_resumes_total", "0x50", result="resumed"),
        ], [], note="no resumes"),
        Case("NovagateHistoryLoadSlow", "30m",
             buckets(lat, {"1": 900, "2": 985, "5": 1000, "+Inf": 1000}, 40),
             [AGG], value="3s", note="1.5 % of loads over 2 s: p99 3 s"),
        Case("NovagateHistoryLoadSlow", "30m",
             buckets(lat, {"1": 900, "2": 995, "5": 1000, "+Inf": 1000}, 40),
             [], note="0.5 % of loads over 2 s: p99 1.95 s"),
        Case("NovagateHistoryLoadSlow", "30m",
             buckets(lat, {"1": 0, "2": 0, "5": 0, "+Inf": 0}, 40), [], note="no loads"),
        # -- the others -------------------------------------------------------------------------------------
        Case("NovagateModelAccessDenied", "5m", [
            s("novagate_model_errors_total", "0+1x10", kind="accessDeniedException")], [AGG]),
        Case("NovagateModelAccessDenied", "5m", [
            s("novagate_model_errors_total", "0+1x10", kind="throttlingException")], []),
        Case("NovagateModelErrorsHigh", "30m", [
            s("novagate_model_errors_total", "0+1x40", kind="throttlingException"),
            s("novagate_sessions_active", "5x40")], [{**AGG, "kind": "throttlingException"}]),
        Case("NovagateModelErrorsHigh", "30m", [
            s("novagate_model_errors_total", "0+1x40", kind="throttlingException"),
            s("novagate_sessions_active", "20x40")], []),
        Case("NovagateStreamRecoveriesFrequent", "30m", [
            s("novagate_stream_recoveries_total", "0+1x40", kind="modelTimeoutException"),
            s("novagate_sessions_active", "5x40")], [AGG]),
        Case("NovagateStreamRecoveriesFrequent", "30m", [
            s("novagate_stream_recoveries_total", "0+1x40", kind="modelTimeoutException"),
            s("novagate_sessions_active", "20x40")], []),
        Case("NovagateStreamRecoveryLow", "40m", [
            s("novagate_stream_recoveries_total", "0+8x50", kind="modelTimeoutException"),
            s("novagate_stream_recovery_failures_total", "0+2x50", kind="modelTimeoutException")], [AGG]),
        Case("NovagateStreamRecoveryLow", "40m", [
            s("novagate_stream_recovery_failures_total", "0+1x50", kind="throttlingException")], [AGG],
             note="every recovery given up: no recoveries series at all"),
        Case("NovagateStreamRecoveryLow", "40m", [
            s("novagate_stream_recoveries_total", "0+19x50", kind="modelTimeoutException"),
            s("novagate_stream_recovery_failures_total", "0+1x50", kind="modelTimeoutException")], []),
        Case("NovagateHistoryFallbacks", "10m", [
            s("novagate_history_fallbacks_total", "0 0 0 0 0 1 1 1 1 1 1 1 1 1 1")], [AGG]),
        Case("NovagateHistoryFallbacks", "10m", [s("novagate_history_fallbacks_total", "0x15")], []),
        Case("NovagateStoreBacklog", "15m", [s("novagate_store_backlog_items", "150x20")], [AGG]),
        Case("NovagateStoreBacklog", "15m", [s("novagate_store_backlog_items", "50x20")], []),
        Case("NovagateEventLoopLag", "20m",
             buckets("novagate_event_loop_lag_seconds", {"0.05": 90, "0.1": 95, "0.25": 100, "+Inf": 100}, 30),
             [{**AGG, "instance": POD_A}]),
        Case("NovagateEventLoopLag", "20m",
             buckets("novagate_event_loop_lag_seconds", {"0.05": 99, "0.1": 100, "0.25": 100, "+Inf": 100}, 30),
             []),
        Case("NovagateOverloaded", "8m", [s("novagate_overloaded", "1x10")], [{**AGG, "instance": POD_A}]),
        Case("NovagateOverloaded", "8m", [s("novagate_overloaded", "0x10")], []),
        Case("NovagateSessionsRejected", "25m", [
            s("novagate_sessions_total", "0+10x30"),
            s("novagate_sessions_rejected_total", "0+2x30", reason="capacity")], [AGG]),
        Case("NovagateSessionsRejected", "25m", [
            s("novagate_sessions_total", "0+10x30"),
            s("novagate_sessions_rejected_total", "0+5x30", reason="origin")], [], note="not for lack of room"),
        Case("NovagateReplyLatencyHigh", "30m",
             buckets("novagate_speech_end_to_first_audio_seconds", {"1": 50, "3": 80, "5": 100, "+Inf": 100}, 40),
             [AGG]),
        Case("NovagateReplyLatencyHigh", "30m",
             buckets("novagate_speech_end_to_first_audio_seconds", {"1": 90, "3": 99, "5": 100, "+Inf": 100}, 40),
             []),
    ]


def render(template: str, labels: dict[str, str], value: str) -> str:
    """What Prometheus makes of the annotation templates the rule file uses (and nothing more)."""
    out = re.sub(r"\{\{ with \$labels\.(\w+) \}\}\{\{ \. \}\}(.*?)\{\{ end \}\}",
                 lambda m: labels[m[1]] + m[2] if labels.get(m[1]) else "", template)
    out = re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels.get(m[1], ""), out)
    out = re.sub(r"\{\{ \$value[^}]*\}\}", value, out)
    assert "{{" not in out, out
    return out


def promtool_tests(cases: list[Case], rules: dict[str, dict], annotations: bool) -> list[dict]:
    tests = []
    for c in cases:
        rule = rules[c.alert]
        exp = []
        for extra in c.fires:
            labels = {**extra, "severity": rule["labels"]["severity"]}
            e = {"exp_labels": labels}
            if annotations:
                e["exp_annotations"] = {k: render(v, labels, c.value) for k, v in rule["annotations"].items()}
            exp.append(e)
        tests.append({"name": f"{c.alert}: {c.note or ('fires' if exp else 'silent')}", "interval": "1m",
                      "input_series": c.series,
                      "alert_rule_test": [{"eval_time": c.eval_time, "alertname": c.alert, "exp_alerts": exp}]})
    return tests


def test_every_alert_has_promtool_cases():
    covered = {(c.alert, bool(c.fires)) for c in _cases()}
    for name in alerts():
        assert (name, True) in covered and (name, False) in covered, f"{name}: add a firing and a silent case"


def test_alerts_fire_past_their_thresholds_and_not_before(promtool, tmp_path):
    """promtool test rules: the guide's three on the rule file itself, annotations as an operator reads
    them; every alert, on a copy without annotations, firing on a synthetic series and silent on another."""
    rules = alerts()
    guide = [c for c in _cases() if c.alert in GUIDE_ALERTS]
    bare = yaml.safe_load(RULES.read_text())
    for g in bare["groups"]:
        for r in g["rules"]:
            r.pop("annotations", None)
    (tmp_path / "bare-rules.yaml").write_text(yaml.safe_dump(bare, sort_keys=False))
    files = {
        "guide-test.yaml": {"rule_files": [str(RULES)], "evaluation_interval": "1m",
                            "tests": promtool_tests(guide, rules, annotations=True)},
        "all-test.yaml": {"rule_files": ["bare-rules.yaml"], "evaluation_interval": "1m",
                          "tests": promtool_tests(_cases(), rules, annotations=False)},
    }
    for name, content in files.items():
        (tmp_path / name).write_text(yaml.safe_dump(content, sort_keys=False))
    r = run_promtool(promtool, "test", "rules", *(str(tmp_path / n) for n in files))
    assert r.returncode == 0, r.stdout + r.stderr


# -- the dashboard --------------------------------------------------------------------------------------
def test_dashboard_is_a_grafana_dashboard_on_a_datasource_variable():
    d = dashboard()
    assert d["schemaVersion"] >= 36 and d["uid"] and d["title"]
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    panels = dashboard_panels()
    ids = [p["id"] for p in d["panels"]] + [p["id"] for p in panels if p not in d["panels"]]
    assert len(ids) == len(set(ids))
    for p in panels:
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}" and t["expr"], p["title"]
    for v in variables.values():
        if v["type"] == "query":
            assert v["datasource"]["uid"] == "${datasource}"
    wanted = {"novagate_sessions_active", "novagate_sessions_total", "novagate_sessions_rejected_total",
              "novagate_resumes_total", "novagate_history_load_seconds_bucket", "novagate_items_saved_total",
              "novagate_store_errors_total", "novagate_model_errors_total", "novagate_stream_recoveries_total",
              "novagate_stream_recovery_failures_total", "novagate_store_backlog_items",
              "novagate_event_loop_lag_seconds_bucket", "novagate_speech_end_to_first_audio_seconds_bucket",
              "novagate_model_to_client_delay_seconds_bucket", "novagate_tool_calls_total", "novagate_tokens_total",
              "novagate_cost_usd_total", "process_cpu_seconds_total", "process_resident_memory_bytes"}
    shown = set().union(*(metric_names(e) for e in dashboard_exprs()))
    assert wanted <= shown, wanted - shown


def test_dashboard_queries_parse(promtool, tmp_path):
    """Every query (Grafana's variables filled in) parsed by promtool, as recording rules."""
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query{i}", "expr": as_promql(e)} for i, e in enumerate(dashboard_exprs())]}]}
    (tmp_path / "dashboard-rules.yaml").write_text(yaml.safe_dump(rules))
    r = run_promtool(promtool, "check", "rules", str(tmp_path / "dashboard-rules.yaml"))
    assert r.returncode == 0, r.stdout + r.stderr


def test_dashboard_queries_name_what_the_gateway_exposes(exposed):
    queries = dashboard_exprs() + [v["definition"] for v in dashboard()["templating"]["list"] if v["type"] == "query"]
    variables = [v for v in dashboard()["templating"]["list"] if v["type"] == "query"]
    for v in variables:  # label_values(metric, label): the metric must exist (any type)
        for name in metric_names(v["definition"]):
            assert family(name, exposed), f"variable {v['name']}: {name} is not on /metrics"
    assert problems(dashboard_exprs(), exposed) == []
    assert queries


# -- CloudFormation: CloudWatch alarms and the AMP rule groups ---------------------------------------------
def test_cloudformation_template_passes_cfn_lint():
    pytest.importorskip("cfnlint", reason="cfn-lint is a dev dependency (pip install -e '.[dev]')")
    exe = Path(sys.executable).with_name("cfn-lint")
    cmd = [str(exe)] if exe.exists() else [shutil.which("cfn-lint") or "cfn-lint"]
    r = subprocess.run([*cmd, str(TEMPLATE)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr


def test_amp_rules_are_the_rule_file_verbatim():
    res = [r for r in cloudformation()["Resources"].values() if r["Type"] == "AWS::APS::RuleGroupsNamespace"]
    assert len(res) == 1
    assert res[0]["Properties"]["Data"] == RULES.read_text(), (
        "helm/cloudwatch/alarms.yaml carries an old copy of the rules: run `python tests/test_alerts.py --embed`")


def test_cloudwatch_alarms_read_counters_the_gateway_exposes(exposed):
    missing = []
    for alarm, name, dims, values in cloudwatch_metrics(cloudformation()):
        found = family(name, exposed)
        if found is None:
            missing.append(f"{alarm}: {name} is not on /metrics")
            continue
        # Only counters and gauges reach CloudWatch: the agent drops Prometheus histograms.
        assert found[1] == "counter", (alarm, name, found)
        for label in dims - CW_DIMENSIONS:
            assert label in label_names()[found[0]], (alarm, name, label)
            assert f'"{values[label]}"' in source_literals(), (alarm, name, label, values[label])
    assert not missing, ("the CloudWatch alarms read counters the gateway does not expose (the history load "
                         "alarm needs novagate_history_loads_total and novagate_history_loads_slow_total, "
                         "docs/observability.md#cloudwatch): " + "; ".join(missing))


def agent_config() -> dict:
    """The CloudWatch agent configuration docs/observability.md gives (its ```json block)."""
    blocks = re.findall(r"```json\n(.*?)```", DOC.read_text(), re.S)
    config = [json.loads(b) for b in blocks if "metric_declaration" in b]
    assert len(config) == 1
    return config[0]


def test_documented_agent_config_publishes_what_the_alarms_read():
    declarations = agent_config()["logs"]["metrics_collected"]["prometheus"]["emf_processor"]["metric_declaration"]
    for alarm, name, dims, _ in cloudwatch_metrics(cloudformation()):
        assert any(any(re.search(sel, name) for sel in d["metric_selectors"])
                   and dims in {frozenset(ds) for ds in d["dimensions"]} for d in declarations), (alarm, name, dims)


def test_documented_scrape_job_is_the_one_the_declarations_select(promtool, tmp_path):
    doc = DOC.read_text()
    blocks = [b for b in re.findall(r"```yaml\n(.*?)```", doc, re.S) if "scrape_configs" in b]
    assert len(blocks) == 1
    scrape = [yaml.safe_load(blocks[0])]
    # promtool checks the rest (relabelling included); Debian builds it without Kubernetes discovery, so the
    # job's kubernetes_sd_configs is swapped for a static target in the copy it checks.
    checked = yaml.safe_load(blocks[0])
    for job in checked["scrape_configs"]:
        assert job.pop("kubernetes_sd_configs") == [{"role": "pod"}]
        job["static_configs"] = [{"targets": ["127.0.0.1:9090"]}]
    (tmp_path / "prometheus.yaml").write_text(yaml.safe_dump(checked))
    r = run_promtool(promtool, "check", "config", "--syntax-only", str(tmp_path / "prometheus.yaml"))
    assert r.returncode == 0, r.stdout + r.stderr
    jobs = {j["job_name"] for j in scrape[0]["scrape_configs"]}
    for d in agent_config()["logs"]["metrics_collected"]["prometheus"]["emf_processor"]["metric_declaration"]:
        assert d["source_labels"] == ["job"] and any(re.fullmatch(d["label_matcher"], j) for j in jobs), d


def embed() -> None:
    """Copy the rule file into the template's AWS::APS::RuleGroupsNamespace Data (a literal block)."""
    lines = TEMPLATE.read_text().splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.rstrip() == "      Data: |") + 1
    end = start
    while end < len(lines) and (lines[end].startswith("        ") or not lines[end].strip()):
        end += 1
    body = ["        " + line if line.strip() else "\n" for line in RULES.read_text().splitlines(keepends=True)]
    TEMPLATE.write_text("".join(lines[:start] + body + lines[end:]))


if __name__ == "__main__":
    if sys.argv[1:] == ["--embed"]:
        embed()
    else:
        sys.exit("usage: python tests/test_alerts.py --embed")
