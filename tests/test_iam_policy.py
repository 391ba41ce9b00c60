"""The IAM policies of helm/iam against the code that needs them (docs/iam.md).

Every Agent Runtime operation the store calls (`self._call("snake_name", ...)` / `_call_sync`, read from
its source) has its action in the store's policies, and every action there is called (least privilege);
the tags CreateSession passes are the ones the TagResource condition allows; the model stream's policy
names the chart's model; the trust policies name the chart's service account; docs/iam.md shows the
files as they are. Pure: no network."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
import yaml

from gateway import preflight
from gateway.config import KMS_KEY_ARN_RE
from protocol.models import CATALOG

from .conftest import missing_tool

ROOT = Path(__file__).resolve().parent.parent
IAM = ROOT / "helm" / "iam"
STORE_SOURCE = ROOT / "gateway" / "store" / "agent_runtime.py"
SESSION_ARN = "arn:aws:bedrock:REGION:ACCOUNT:session/*"
STORE_FILES = ("agent-runtime-store.json", "agent-runtime-list-sessions.json")
PERMISSION_FILES = ("bedrock-engine.json", *STORE_FILES, "agent-runtime-kms.json")
TRUST_FILES = ("trust-irsa.json", "trust-pod-identity.json")


def policy(name: str) -> dict:
    return json.loads((IAM / name).read_text())


def as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def actions(doc: dict) -> set[str]:
    return {a for st in doc["Statement"] for a in as_list(st["Action"])}


def values() -> dict:
    return yaml.safe_load((ROOT / "helm" / "novagate" / "values.yaml").read_text())


# ---------------------------------------------------------------------------------------------
# What the store's code calls


def camel(op: str) -> str:
    return "".join(p.title() for p in op.split("_"))


def store_calls(source: str) -> dict:
    """From the store's source: the operations it calls (IAM action names), the tag keys its CreateSession
    calls pass, and the public methods that call ListSessions (themselves or through a private helper). Every `_call`/`_call_sync` (but the one that
    forwards from `_call` to `_call_sync`) must name its operation with a string literal, else this
    cannot see it (and fails)."""
    tree = ast.parse(source)
    ops: set[str] = set()
    tag_keys: set[str] = set()
    list_callers: set[str] = set()
    calls: dict[str, set[str]] = {}  # function -> the self.<method>s it calls

    def visit(node: ast.AST, function: str | None) -> None:
        for child in ast.iter_child_nodes(node):
            fn = child.name if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef) else function
            if isinstance(child, ast.Call) and isinstance(child.func, ast.Attribute) \
                    and isinstance(child.func.value, ast.Name) and child.func.value.id == "self":
                calls.setdefault(function or "<module>", set()).add(child.func.attr)
            if isinstance(child, ast.Call) and isinstance(child.func, ast.Attribute) \
                    and child.func.attr in ("_call", "_call_sync") and function not in ("_call", "_call_sync"):
                first = child.args[0] if child.args else None
                if not (isinstance(first, ast.Constant) and isinstance(first.value, str)):
                    raise AssertionError(f"line {child.lineno}: {child.func.attr}() without a literal operation name")
                op = first.value
                ops.add(camel(op))
                if op == "list_sessions":
                    list_callers.add(function or "<module>")
                for kw in child.keywords:
                    if op == "create_session" and kw.arg == "tags":
                        ops.add("TagResource")  # tags on create are authorized as TagResource
                        if not isinstance(kw.value, ast.Dict) or not all(
                                isinstance(k, ast.Constant) for k in kw.value.keys):
                            raise AssertionError(f"line {child.lineno}: create_session tags are not a literal dict")
                        tag_keys.update(k.value for k in kw.value.keys)
            visit(child, fn)

    visit(tree, None)
    seen: set[str] = set()
    while private := {f for f in list_callers if f.startswith("_")} - seen:  # a helper: whoever calls it
        seen |= private
        list_callers = (list_callers - private) | {f for f, callees in calls.items() if callees & private}
    list_callers -= seen
    return {"ops": ops, "tag_keys": tag_keys, "list_callers": list_callers}


def compare(policy_actions: set[str], code_ops: set[str]) -> tuple[set[str], set[str]]:
    """(actions the code needs that the policy lacks, actions the policy grants that the code never uses)."""
    needed = {f"bedrock:{op}" for op in code_ops}
    return needed - policy_actions, policy_actions - needed


@pytest.fixture(scope="module")
def store() -> dict:
    return store_calls(STORE_SOURCE.read_text())


def test_every_file_is_a_policy():
    files = sorted(p.name for p in IAM.glob("*.json"))
    assert set(files) == {*PERMISSION_FILES, *TRUST_FILES}, files
    for name in files:
        doc = policy(name)
        assert doc["Version"] == "2012-10-17", name
        assert doc["Statement"] and set(doc) == {"Version", "Statement"}, name
        sids = [st.get("Sid") for st in doc["Statement"]]
        assert len(set(sids)) == len(sids), f"{name}: duplicate Sid"
        for st in doc["Statement"]:
            assert st["Effect"] == "Allow", name
            assert all(re.fullmatch(r"[a-z0-9-]+:[A-Za-z]+", a) for a in as_list(st["Action"])), name
            if name in TRUST_FILES:
                assert "Principal" in st and "Resource" not in st, name
            else:
                assert "Resource" in st and "Principal" not in st, name
                assert "*" not in as_list(st["Action"]) and not any(a.endswith("*") for a in as_list(st["Action"]))


def test_the_store_policies_grant_exactly_what_the_store_calls(store):
    granted = actions(policy(STORE_FILES[0])) | actions(policy(STORE_FILES[1]))
    missing, unused = compare(granted, store["ops"])
    assert not missing, f"the store calls these, no policy grants them: {sorted(missing)}"
    assert not unused, f"granted but never called (least privilege): {sorted(unused)}"
    # sanity: the derivation saw the calls it must see
    assert {"CreateSession", "GetSession", "UpdateSession", "PutInvocationStep", "ListInvocationSteps"} <= store["ops"]


def test_session_actions_are_scoped_to_sessions_and_list_sessions_is_apart(store):
    for st in policy("agent-runtime-store.json")["Statement"]:
        assert as_list(st["Resource"]) == [SESSION_ARN], st
        assert "bedrock:ListSessions" not in as_list(st["Action"])
    (st,) = policy("agent-runtime-list-sessions.json")["Statement"]
    assert as_list(st["Action"]) == ["bedrock:ListSessions"] and st["Resource"] == "*"  # it has no resource
    # only configurations that list sessions need it: the start-up check knows each caller's setting
    assert store["list_callers"], "nothing calls ListSessions: drop agent-runtime-list-sessions.json"
    assert store["list_callers"] <= set(preflight.LIST_SESSIONS_CALLERS), store["list_callers"]


def test_tag_resource_allows_exactly_the_tags_create_session_passes(store):
    (tag,) = [st for st in policy("agent-runtime-store.json")["Statement"]
              if "bedrock:TagResource" in as_list(st["Action"])]
    assert as_list(tag["Action"]) == ["bedrock:TagResource"]
    allowed = set(tag["Condition"]["ForAllValues:StringEquals"]["aws:TagKeys"])
    assert store["tag_keys"] and store["tag_keys"] == allowed


def test_the_start_up_check_covers_every_store_action(store):
    probed = set(preflight.STORE_PROBES)
    assert probed | set(preflight.STORE_WRITES) | {"ListSessions"} == store["ops"]
    assert not probed & set(preflight.STORE_WRITES)
    assert all(op.startswith(("Get", "List")) for op in probed)  # probes only read


def test_the_comparison_can_fail():
    source = STORE_SOURCE.read_text()
    granted = actions(policy(STORE_FILES[0])) | actions(policy(STORE_FILES[1]))
    more = store_calls(source + "\n\nasync def extra(self):\n    await self._call('list_invocations', x=1)\n")
    assert compare(granted, more["ops"]) == ({"bedrock:ListInvocations"}, set())
    fewer = store_calls(source.replace('"delete_session"', '"end_session"'))
    assert compare(granted, fewer["ops"]) == (set(), {"bedrock:DeleteSession"})
    with pytest.raises(AssertionError, match="literal operation name"):
        store_calls("async def f(self, op):\n    await self._call(op)\n")
    tags = store_calls(source.replace('"app": APP}', '"app": APP, "env": "prod"}'))
    assert "env" in tags["tag_keys"]


# ---------------------------------------------------------------------------------------------
# The model stream, KMS, trust


def test_the_engine_policy_names_the_charts_model_and_the_stream_actions():
    (st,) = policy("bedrock-engine.json")["Statement"]
    assert set(as_list(st["Action"])) == set(preflight.INVOKE_ACTIONS)
    model = values()["env"]["NOVAGATE_MODEL_ID"]
    assert model in CATALOG
    assert as_list(st["Resource"]) == [preflight.model_arn(model, "REGION")]
    assert preflight.model_arn(model, "REGION") == f"arn:aws:bedrock:REGION::foundation-model/{model}"
    # the transport calls that one operation of the SDK and nothing else
    bedrock = (ROOT / "gateway" / "bedrock.py").read_text()
    assert set(re.findall(r"client\.(\w+)\(", bedrock)) <= {"invoke_model_with_bidirectional_stream", "close"}
    assert "invoke_model_with_bidirectional_stream(" in bedrock


def test_the_kms_policy_only_works_through_bedrock_for_sessions():
    doc = policy("agent-runtime-kms.json")
    assert actions(doc) == {"kms:Encrypt", "kms:Decrypt", "kms:GenerateDataKey", "kms:DescribeKey"}
    for st in doc["Statement"]:
        assert st["Condition"]["StringEquals"]["kms:ViaService"] == "bedrock.REGION.amazonaws.com"
        key = st["Resource"].replace("REGION", "us-east-1").replace("ACCOUNT", "123456789012").replace(
            "KEY_ID", "1234abcd-12ab-34cd-56ef-1234567890ab")
        assert KMS_KEY_ARN_RE.match(key)  # the setting takes what the policy names
        if "kms:DescribeKey" not in as_list(st["Action"]):
            assert st["Condition"]["StringLike"]["kms:EncryptionContext:aws:bedrock:session:arn"] == SESSION_ARN


def test_the_trust_policies_name_the_charts_service_account():
    name = values()["serviceAccount"]["name"]
    (irsa,) = policy("trust-irsa.json")["Statement"]
    assert irsa["Action"] == "sts:AssumeRoleWithWebIdentity"
    assert re.fullmatch(r"arn:aws:iam::ACCOUNT:oidc-provider/oidc\.eks\.REGION\.amazonaws\.com/id/OIDC_ID",
                        irsa["Principal"]["Federated"])
    cond = irsa["Condition"]["StringEquals"]
    assert cond["oidc.eks.REGION.amazonaws.com/id/OIDC_ID:sub"] == f"system:serviceaccount:NAMESPACE:{name}"
    assert cond["oidc.eks.REGION.amazonaws.com/id/OIDC_ID:aud"] == "sts.amazonaws.com"
    (pod,) = policy("trust-pod-identity.json")["Statement"]
    assert pod["Principal"] == {"Service": "pods.eks.amazonaws.com"}
    assert set(pod["Action"]) == {"sts:AssumeRole", "sts:TagSession"}
    assert pod["Condition"]["StringEquals"]["aws:RequestTag/kubernetes-service-account"] == name


def test_docs_show_every_policy_as_it_is():
    text = (ROOT / "docs" / "iam.md").read_text()
    blocks = []
    for body in re.findall(r"```json\n(.*?)```", text, re.S):
        try:
            blocks.append(json.loads(body))
        except ValueError:
            pass
    for path in sorted(IAM.glob("*.json")):
        assert json.loads(path.read_text()) in blocks, f"docs/iam.md does not show {path.name} as it is"
        assert f"helm/iam/{path.name}" in text


def test_every_action_is_a_known_iam_action():
    """Against the IAM action list cfn-lint ships (when installed): a misspelt action fails here.
    bedrock:InvokeModelWithBidirectionalStream is not in that list: the API reference asks for
    bedrock:InvokeModel, policies in use name the other; the engine policy grants both (docs/iam.md)."""
    resources = pytest.importorskip("importlib.resources")
    try:
        data = json.loads(resources.files("cfnlint.data.AdditionalSpecs").joinpath("Policies.json").read_text())
    except (ModuleNotFoundError, FileNotFoundError):
        missing_tool("cfn-lint's IAM data is not installed")
    known = {f"{service}:{a}" for service, spec in data.items() if isinstance(spec, dict)
             for a in spec.get("Actions", [])}
    used = set()
    for name in (*PERMISSION_FILES, *TRUST_FILES):
        used |= actions(policy(name))
    unknown = {a for a in used if a.lower() not in known}
    assert unknown <= {"bedrock:InvokeModelWithBidirectionalStream"}, unknown
