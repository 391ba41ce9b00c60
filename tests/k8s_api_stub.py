"""Just enough of a Kubernetes API server, on loopback, for `helm template --dry-run=server`: helm's `lookup`
only reads a real cluster, so this is how the chart's "generated once, then kept" Secret is tested without
one (tests/test_helm_chart.py).

It serves discovery (/version, /api, /apis and one resource list per group version the chart uses), GET of the
Secrets a test puts in (`secrets[(namespace, name)]`), empty lists for collections (helm's release storage
asks for its release Secrets), and 404 for everything else. Read only: any other method gets 405. Every
request is recorded (`requests`). Not a conformant server: nothing but helm talks to it.
"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

# group/version -> (kind, plural, namespaced) of what the chart renders (and helm may look up)
RESOURCES = {
    "v1": [("Secret", "secrets", True), ("Service", "services", True), ("ServiceAccount", "serviceaccounts", True),
           ("ConfigMap", "configmaps", True), ("Namespace", "namespaces", False), ("Pod", "pods", True)],
    "apps/v1": [("Deployment", "deployments", True)],
    "policy/v1": [("PodDisruptionBudget", "poddisruptionbudgets", True)],
    "autoscaling/v2": [("HorizontalPodAutoscaler", "horizontalpodautoscalers", True)],
    "networking.k8s.io/v1": [("Ingress", "ingresses", True), ("NetworkPolicy", "networkpolicies", True),
                             ("IngressClass", "ingressclasses", False)],
    "monitoring.coreos.com/v1": [("ServiceMonitor", "servicemonitors", True),
                                 ("PrometheusRule", "prometheusrules", True)],
}
_NAMESPACED = re.compile(r"^/(?:api/v1|apis/[^/]+/[^/]+)/namespaces/([^/]+)/([^/]+)(?:/([^/]+))?$")


class KubeAPIStub:
    def __init__(self, version: str = "1.31.0"):
        self.version = version
        self.secrets: dict[tuple[str, str], dict] = {}
        self.requests: list[tuple[str, str]] = []
        self._server: ThreadingHTTPServer | None = None

    # -- lifecycle ------------------------------------------------------------------------------------
    def __enter__(self) -> KubeAPIStub:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's naming)
                stub.requests.append(("GET", self.path))
                status, body = stub.answer(urlsplit(self.path).path)
                self._send(status, body)

            def _refuse(self):
                stub.requests.append((self.command, self.path))
                self._send(405, _status(405, "MethodNotAllowed", "the stub is read only"))

            do_POST = do_PUT = do_PATCH = do_DELETE = _refuse

            def _send(self, status: int, body: dict):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):  # quiet
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def kubeconfig(self, path: Path, namespace: str = "default") -> Path:
        """A kubeconfig (JSON is YAML) pointing at the stub, with no credentials."""
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "stub",
            "clusters": [{"name": "stub", "cluster": {"server": self.url}}],
            "users": [{"name": "stub", "user": {}}],
            "contexts": [{"name": "stub", "context": {"cluster": "stub", "user": "stub", "namespace": namespace}}],
        }))
        path.chmod(0o600)
        return path

    def put_secret(self, manifest: dict) -> None:
        """A Secret as the API server would hold it: stringData folded into data, the metadata kept."""
        m = json.loads(json.dumps(manifest))
        meta = m.setdefault("metadata", {})
        namespace = meta.setdefault("namespace", "default")
        if "stringData" in m:
            import base64

            m.setdefault("data", {}).update({k: base64.b64encode(v.encode()).decode()
                                             for k, v in m.pop("stringData").items()})
        meta.setdefault("uid", f"uid-{len(self.secrets) + 1}")
        meta.setdefault("resourceVersion", "1")
        self.secrets[(namespace, meta["name"])] = m

    # -- answers ----------------------------------------------------------------------------------------
    def answer(self, path: str) -> tuple[int, dict]:
        major, minor = self.version.split(".")[:2]
        if path == "/version":
            return 200, {"major": major, "minor": minor, "gitVersion": f"v{self.version}", "platform": "linux/amd64"}
        if path == "/api":
            return 200, {"kind": "APIVersions", "versions": ["v1"],
                         "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]}
        if path == "/apis":
            groups = {}
            for gv in RESOURCES:
                if "/" in gv:
                    group, version = gv.split("/")
                    groups.setdefault(group, []).append({"groupVersion": gv, "version": version})
            return 200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
                {"name": g, "versions": vs, "preferredVersion": vs[0]} for g, vs in groups.items()]}
        gv = path[len("/api/"):] if path.startswith("/api/") else path[len("/apis/"):]
        if gv in RESOURCES:
            return 200, {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": [
                {"name": plural, "singularName": kind.lower(), "namespaced": namespaced, "kind": kind,
                 "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"]}
                for kind, plural, namespaced in RESOURCES[gv]]}
        m = _NAMESPACED.match(path)
        if m:
            namespace, plural, name = m.groups()
            if name is None:  # a collection: nothing (helm's release records included)
                kind = next((k for rs in RESOURCES.values() for k, p, _ in rs if p == plural), "Unknown")
                return 200, {"kind": f"{kind}List", "apiVersion": "v1", "metadata": {"resourceVersion": "1"},
                             "items": []}
            if plural == "secrets" and (namespace, name) in self.secrets:
                return 200, self.secrets[(namespace, name)]
            return 404, _status(404, "NotFound", f'{plural} "{name}" not found', name=name, kind=plural)
        return 404, _status(404, "NotFound", "the server could not find the requested resource")


def _status(code: int, reason: str, message: str, **details) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code, **({"details": details} if details else {})}
