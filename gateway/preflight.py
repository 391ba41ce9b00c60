"""Start-up permission check: prove, before serving, that the gateway's AWS identity may do what the
configuration needs, and name the missing permission when it may not (docs/iam.md).

`novagate serve` runs it after the credentials resolve (engine bedrock or store agent-runtime; off with
NOVAGATE_PREFLIGHT=false); `novagate check` runs the same and prints one line per check.

* store agent-runtime: read-only probes on a random session id, which no session has: GetSession,
  ListInvocationSteps and GetInvocationStep. AWS authorizes a request before it looks the resource up,
  so `ResourceNotFoundException` proves the action is allowed and `AccessDeniedException` that it is not.
  ListSessions (maxResults=1) only when the configuration lists sessions (telephony resume, user
  budgets). The writes (CreateSession with its tags, UpdateSession, CreateInvocation, PutInvocationStep,
  EndSession, DeleteSession) are not probed: a probe would write. Nor is a KMS key.
* engine bedrock: one InvokeModelWithBidirectionalStream stream opened the way the gateway opens them
  (BedrockTransport), `sessionStart` and `sessionEnd` sent, closed. Nothing is spoken, nothing stored.

Outcomes: `ok`; `denied` (AccessDenied: "missing permission <action> on <resource>", the action and
resource taken from AWS's message when it names them); `failed` (the credentials are refused, the model
is not available or not enabled); `unreachable` (no answer, throttled, a 5xx: nothing proven); `skipped`.
`denied` and `failed` stop `serve` (exit 2): they do not go away by themselves. `unreachable` is a
warning and the start goes on: the service may be briefly unreachable, and pods must not crash-loop on
a blip. The whole check is bounded by NOVAGATE_PREFLIGHT_TIMEOUT_S. Its output holds no secret: the
caller's ARN as AWS prints it, the masked access key id, endpoints without user info.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

OK, DENIED, FAILED, UNREACHABLE, SKIPPED = "ok", "denied", "failed", "unreachable", "skipped"

# What the agent-runtime store calls, as IAM actions (tests/test_iam_policy.py checks these against the
# store's code and helm/iam/*.json).
STORE_PROBES = ("GetSession", "ListInvocationSteps", "GetInvocationStep")  # read-only: probed
STORE_WRITES = ("CreateSession", "TagResource", "UpdateSession", "CreateInvocation", "PutInvocationStep",
                "EndSession", "DeleteSession")                              # would write: not probed
# The store's methods that call ListSessions (not resource-scoped: its own policy file), and the setting
# that makes the gateway call each
LIST_SESSIONS_CALLERS = {
    "find_recent": "telephony resume (a Twilio endpoint and NOVAGATE_TWILIO_RESUME_WINDOW_S > 0)",
    "spent": "user budgets (NOVAGATE_USER_BUDGET_USD > 0)",
}
# The model stream: the API reference asks for bedrock:InvokeModel; policies in use name
# bedrock:InvokeModelWithBidirectionalStream. helm/iam/bedrock-engine.json grants both on the model.
INVOKE_ACTIONS = ("bedrock:InvokeModel", "bedrock:InvokeModelWithBidirectionalStream")
CREDENTIAL_ERRORS = frozenset({
    "UnrecognizedClientException", "InvalidSignatureException", "ExpiredTokenException", "ExpiredToken",
    "InvalidClientTokenId", "SignatureDoesNotMatch", "IncompleteSignature", "MissingAuthenticationToken",
    "MissingAuthenticationTokenException", "UnrecognizedClient",
})
TRANSIENT_ERRORS = frozenset({
    "ThrottlingException", "ServiceUnavailableException", "InternalServerException", "RequestTimeout",
    "RequestTimeoutException", "ServiceQuotaExceededException",
})

_DENIED_RE = re.compile(
    r"not authorized to perform:?\s+(?P<action>[A-Za-z0-9-]+:[A-Za-z0-9*]+)"
    r"(?:\s+on resource:?\s+(?P<resource>[^\s]+?))?"
    r"(?:\s+(?:because|with)\s+(?P<because>.*?))?\.?\s*$", re.S)
_CALLER_ACCOUNT_RE = re.compile(r"arn:aws[a-z-]*:(?:sts|iam)::(\d{12}):")
_USERINFO_RE = re.compile(r"(://)[^/@\s]+@")


@dataclass(frozen=True, slots=True)
class Result:
    """One check: `check` names what was checked (an IAM action, "nova-sonic", "credentials")."""

    check: str
    status: str
    detail: str

    @property
    def fatal(self) -> bool:
        """A definite problem that stays until someone fixes the role or the configuration."""
        return self.status in (DENIED, FAILED)

    def line(self) -> str:
        return f"{self.status.upper():<11} {self.check}: {self.detail}"


# ---------------------------------------------------------------------------------------------
# ARNs and messages


def model_arn(model_id: str, region: str, account: str = "ACCOUNT") -> str:
    """The resource a stream of `model_id` is authorized on: the foundation model in `region`, the
    inference profile of a cross-region id (`us.`, `eu.`, `apac.`, `global.`), or the ARN given."""
    from protocol.models import base_model_id

    if model_id.startswith("arn:"):
        return model_id
    if base_model_id(model_id) != model_id:
        return f"arn:aws:bedrock:{region}:{account}:inference-profile/{model_id}"
    return f"arn:aws:bedrock:{region}::foundation-model/{model_id}"


def session_arn(region: str, account: str = "ACCOUNT", session_id: str = "*") -> str:
    return f"arn:aws:bedrock:{region}:{account}:session/{session_id}"


def clean(text: str, limit: int = 500) -> str:
    """A service message fit for a log line: one line, no user info in URLs, bounded."""
    text = _USERINFO_RE.sub(r"\1***@", " ".join(str(text).split()))
    return text if len(text) <= limit else text[:limit - 1] + "…"


def missing_permission(message: str, *, action: str, resource: str, probe_id: str | None = None) -> str:
    """'missing permission <action> on <resource> (<why>)' from an AccessDenied message: the action,
    resource and reason AWS names, else the ones given (with the caller's account when AWS names it).
    The random id of a probe becomes `*`: the policy must allow every session, not that one."""
    m = _DENIED_RE.search(message or "")
    if m is None:
        account = _CALLER_ACCOUNT_RE.search(message or "")
        if account:
            resource = resource.replace("ACCOUNT", account.group(1))
        said = f" (AWS: {clean(message)})" if message else ""
        return f"missing permission {action} on {resource}{said}"
    action = m.group("action")
    resource = m.group("resource") or resource
    if probe_id:
        resource = resource.replace(probe_id, "*")
    because = f" ({clean(m.group('because'), 200)})" if m.group("because") else ""
    return f"missing permission {action} on {resource}{because}"


def list_sessions_reasons(settings: Any) -> list[str]:
    """Why this configuration calls ListSessions (empty: it does not)."""
    reasons = []
    telephony = bool(settings.twilio_auth_token or settings.twilio_auth_token_file or settings.twilio_insecure)
    if telephony and settings.twilio_resume_window_s > 0:
        reasons.append("telephony resume")
    if getattr(settings, "user_budget_usd", 0) > 0:
        reasons.append("user budgets")
    return reasons


# ---------------------------------------------------------------------------------------------
# Agent Runtime


def _agent_runtime_client(settings: Any, timeout_s: float):
    import boto3
    from botocore.config import Config

    config = Config(connect_timeout=min(3.0, timeout_s), read_timeout=timeout_s,
                    retries={"mode": "standard", "total_max_attempts": 1}, user_agent_extra="novagate-preflight")
    return boto3.session.Session().client("bedrock-agent-runtime", region_name=settings.aws_region,
                                          endpoint_url=settings.agent_runtime_endpoint or None, config=config)


def _action(op: str) -> str:
    """'list_invocation_steps' -> 'bedrock:ListInvocationSteps'."""
    return "bedrock:" + "".join(p.title() for p in op.split("_"))


def _store_probe(client: Any, op: str, kw: dict, *, probe_id: str, resource: str) -> Result:
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    action = _action(op)
    try:
        getattr(client, op)(**kw)
    except ClientError as e:
        err = e.response.get("Error", {})
        code, message = err.get("Code", ""), err.get("Message", "")
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code == "ResourceNotFoundException":
            return Result(action, OK, f"allowed on {resource}")
        if code in CREDENTIAL_ERRORS:
            return Result(action, FAILED, f"AWS refused the credentials: {code}: {clean(message)}")
        if code == "AccessDeniedException" or (status == 403 and code not in TRANSIENT_ERRORS):
            return Result(action, DENIED, missing_permission(message, action=action, resource=resource,
                                                              probe_id=probe_id))
        return Result(action, UNREACHABLE, f"not proven: {code or status}: {clean(message)}")
    except NoCredentialsError as e:
        return Result(action, FAILED, f"no AWS credentials: {clean(str(e))}")
    except BotoCoreError as e:
        return Result(action, UNREACHABLE, f"not proven: {clean(str(e))}")
    except Exception as e:  # noqa: BLE001 - a check reports, it never raises
        return Result(action, UNREACHABLE, f"not proven: {type(e).__name__}: {clean(str(e))}")
    return Result(action, OK, f"allowed on {resource}")


async def check_agent_runtime(settings: Any, timeout_s: float) -> list[Result]:
    """The store's read-only probes, at once, within `timeout_s`."""
    region = settings.aws_region
    probe_id = str(uuid.uuid4())  # a session nobody has: the answer is 404 or 403, nothing is read
    probes: list[tuple[str, dict, str]] = [
        ("get_session", {"sessionIdentifier": probe_id}, session_arn(region)),
        ("list_invocation_steps", {"sessionIdentifier": probe_id, "maxResults": 1}, session_arn(region)),
        ("get_invocation_step", {"sessionIdentifier": probe_id, "invocationIdentifier": str(uuid.uuid4()),
                                 "invocationStepId": str(uuid.uuid4())}, session_arn(region)),
    ]
    if list_sessions_reasons(settings):
        probes.append(("list_sessions", {"maxResults": 1}, "*"))
    loop = asyncio.get_running_loop()
    pool = ThreadPoolExecutor(max_workers=len(probes), thread_name_prefix="preflight")
    results: list[Result] = []
    try:
        made = loop.run_in_executor(pool, _agent_runtime_client, settings, timeout_s)
        try:
            client = await asyncio.wait_for(asyncio.shield(made), timeout_s)
        except TimeoutError:
            return [Result("agent-runtime", UNREACHABLE, f"no client within {timeout_s:g}s")]
        except Exception as e:  # noqa: BLE001 - an invalid endpoint URL, a broken profile, ...
            return [Result("agent-runtime", FAILED, f"cannot make the Agent Runtime client: {clean(str(e))}")]
        futures = [(op, loop.run_in_executor(pool, lambda op=op, kw=kw, res=res: _store_probe(
            client, op, kw, probe_id=probe_id, resource=res))) for op, kw, res in probes]
        await asyncio.wait([f for _, f in futures], timeout=timeout_s + 1.0)  # boto's own timeouts come first
        for op, fut in futures:
            results.append(fut.result() if fut.done() else
                           Result(_action(op), UNREACHABLE, f"no answer within {timeout_s:g}s"))
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    reasons = list_sessions_reasons(settings)
    if not reasons:
        results.append(Result("bedrock:ListSessions", SKIPPED, "not used by this configuration (telephony resume and "
                              "user budgets are off): no permission needed"))
    results.append(Result("agent-runtime writes", SKIPPED, "not probed (a probe would write): "
                          + ", ".join("bedrock:" + a for a in STORE_WRITES) + f" on {session_arn(region)}"))
    if settings.agent_runtime_kms_key_arn:
        results.append(Result("kms", SKIPPED, f"not probed: new sessions are encrypted with "
                              f"{settings.agent_runtime_kms_key_arn} (kms:GenerateDataKey, kms:Decrypt, kms:Encrypt, "
                              "kms:DescribeKey through Bedrock; docs/iam.md)"))
    return results


# ---------------------------------------------------------------------------------------------
# Nova Sonic


def _classify_model_error(err: Any, settings: Any, arn: str) -> Result:
    from gateway.transport import ACCESS_DENIED, VALIDATION

    message = err.message or ""
    model, region = settings.model_id, settings.aws_region
    if err.kind == ACCESS_DENIED:
        if _DENIED_RE.search(message):
            return Result("nova-sonic", DENIED, missing_permission(message, action=INVOKE_ACTIONS[1], resource=arn))
        if any(c in message for c in CREDENTIAL_ERRORS) or "security token" in message.lower() \
                or "credentials" in message.lower():
            return Result("nova-sonic", FAILED, f"AWS refused the credentials: {clean(message)}")
        if "access to the model" in message.lower():
            return Result("nova-sonic", FAILED, f"no access to model {model} in {region}: grant the account access "
                          f"to it (Bedrock console, Model access) or pick a model offered there (AWS: {clean(message)})")
        return Result("nova-sonic", DENIED, missing_permission(message, action=" / ".join(INVOKE_ACTIONS),
                                                                resource=arn))
    if err.kind == VALIDATION:
        return Result("nova-sonic", FAILED, f"model {model} cannot be used in {region}: {clean(message)} (check "
                      "NOVAGATE_MODEL_ID, the region and the model's access in the Bedrock console)")
    return Result("nova-sonic", UNREACHABLE, f"not proven: {err.kind}: {clean(message)}")


async def check_nova(settings: Any, timeout_s: float) -> Result:
    """Open one stream as the gateway does, send sessionStart and sessionEnd, close it."""
    from protocol import nova_events as nova

    from .bedrock import BedrockSetupError, BedrockTransport
    from .transport import ModelError

    arn = model_arn(settings.model_id, settings.aws_region)
    transport = BedrockTransport(
        model_id=settings.model_id, region=settings.aws_region, endpoint_url=settings.bedrock_endpoint or None,
        send_timeout_s=timeout_s, output_timeout_s=timeout_s, close_timeout_s=min(3.0, timeout_s),
        streams_per_connection=1,
    )
    err: Any = None
    answered = False
    try:
        stream = await transport.open()
        try:
            await stream.send(nova.session_start())
            await stream.send(nova.session_end())
        except ModelError as e:
            err = e
        if err is None:  # the HTTP response (or the failure) comes once events flow
            ready = asyncio.ensure_future(stream.output_ready.wait())
            first = asyncio.ensure_future(stream.receive())
            done, pending = await asyncio.wait({ready, first}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
            if first in done and not first.cancelled() and isinstance(first.exception(), ModelError):
                err = first.exception()
        await stream.close()  # bounded; an error frame that follows the 200 is caught here
        answered = stream.output_ready.is_set()
        err = err or stream.failed
    except ModelError as e:
        err = e
    except BedrockSetupError as e:
        return Result("nova-sonic", FAILED, clean(str(e)))
    finally:
        await transport.aclose()
    from .transport import ACCESS_DENIED

    # Refusals of the request itself (403, 404, 400) come instead of the HTTP 200. After a 200 the stream
    # is authorized: only an AccessDenied frame still counts, not what the model says of an empty session.
    if err is not None and (not answered or err.kind == ACCESS_DENIED):
        return _classify_model_error(err, settings, arn)
    if not answered:
        return Result("nova-sonic", UNREACHABLE, f"no answer from Bedrock within {timeout_s:g}s")
    then = f" (then {err.kind}: {clean(err.message, 200)})" if err is not None else ""
    return Result("nova-sonic", OK, f"a stream of {settings.model_id} opened and closed: "
                  f"{' / '.join(INVOKE_ACTIONS)} allowed on {arn}{then}")


# ---------------------------------------------------------------------------------------------
# The whole check


async def check_credentials(settings: Any, timeout_s: float) -> Result:
    from .bedrock import BedrockSetupError
    from .bedrock import check_credentials as resolve

    try:
        found = await resolve(settings.aws_region, timeout_s=timeout_s)
    except BedrockSetupError as e:
        return Result("credentials", FAILED, clean(str(e)))
    return Result("credentials", OK, f"region {found.region}, access key {found.access_key_id}"
                  + (" (temporary)" if found.temporary else ""))


async def run(settings: Any, timeout_s: float | None = None) -> list[Result]:
    """Every check this configuration needs, concurrently, bounded by `timeout_s` (default: the setting)
    plus the time to close what they opened. Never raises."""
    budget = float(timeout_s or settings.preflight_timeout_s)
    jobs: dict[asyncio.Future, str] = {}
    if settings.engine == "bedrock":
        jobs[asyncio.ensure_future(check_nova(settings, budget))] = "nova-sonic"
    if settings.store == "agent-runtime":
        jobs[asyncio.ensure_future(check_agent_runtime(settings, budget))] = "agent-runtime"
    if not jobs:
        return []
    done, pending = await asyncio.wait(jobs, timeout=budget + 8.0)  # the checks bound themselves; this is a backstop
    results: list[Result] = []
    for job, name in jobs.items():
        if job in pending:
            job.cancel()
            results.append(Result(name, UNREACHABLE, f"no answer within {budget:g}s"))
            continue
        try:
            out = job.result()
        except Exception as e:  # noqa: BLE001 - a bug in a check must not stop the gateway
            results.append(Result(name, UNREACHABLE, f"the check failed: {type(e).__name__}: {clean(str(e))}"))
            continue
        results.extend(out if isinstance(out, list) else [out])
    return results


def summary(results: list[Result]) -> str:
    fatal = [r for r in results if r.fatal]
    unproven = [r for r in results if r.status == UNREACHABLE]
    if fatal:
        return (f"{len(fatal)} problem{'s' if len(fatal) > 1 else ''}: fix the role's policy or the configuration "
                "(docs/iam.md)")
    if unproven:
        return f"{len(unproven)} check{'s' if len(unproven) > 1 else ''} could not finish: nothing proven there"
    return "every check passed"
