"""The ASGI application: the voice WebSocket, the history endpoints, health (and metrics when there is no
admin port), the web app; behind the Host allow-list and with security headers (gateway/web.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketState

from protocol.codes import CloseCode
from protocol import realtime as rt
from protocol.models import history_limits, model_spec
from protocol.session import SessionConfig, SessionEnv, may_use
from protocol.usage import Prices

from . import clock, codecs, metrics, telephony
from .actor import SessionActor
from .admission import Admission, Limits, client_address, refuse
from .audio import InputResampler, SpeechActivity
from .config import Settings
from .logs import log
from .store import ConversationStore, open_store
from .tokens import Authenticator, Signer, load_previous_secrets, load_secret, owner_hash
from .tools import ToolBox, ToolSetupError, open_toolbox
from .transport import ModelTransport
from .web import AppFiles, HostCheck, SecurityHeaders, allowed_hosts, app_dir, origin_allowed

logger = logging.getLogger("novagate.app")
WEB_DIR = app_dir()  # web/ of the repository, or its copy in an installed wheel
SUBPROTOCOL = "novagate.v1"


@dataclass
class Services:
    settings: Settings
    store: ConversationStore
    transport: ModelTransport
    signer: Signer
    authenticator: Authenticator
    session_config: SessionConfig
    session_env: SessionEnv
    admission: Admission
    toolbox: ToolBox
    hosts: tuple[str, ...]                       # the Host allow-list (gateway/web.py)
    sessions: set = field(default_factory=set)   # every socket's actor, handshake or not
    draining: bool = False
    no_sessions: asyncio.Event = field(default_factory=asyncio.Event)  # set while `sessions` is empty
    holders: dict = field(default_factory=dict)  # conversation id -> the actor that holds it here

    def hold(self, conversation_id: str, actor) -> None:
        """`actor` holds the conversation: one here before it is taken over at once (others, on other
        instances, learn it at their next write)."""
        previous = self.holders.get(conversation_id)
        self.holders[conversation_id] = actor
        if previous is not None and previous is not actor:
            previous.conversation_gone("taken_over")

    def release(self, conversation_id: str, reason: str | None = None, actor=None) -> None:
        """The conversation is no longer held here: by `actor` (it ended), or by anyone (`reason`:
        it was deleted or ended over HTTP, and its live session is told so)."""
        holder = self.holders.get(conversation_id)
        if holder is None or (actor is not None and holder is not actor):
            return
        del self.holders[conversation_id]
        if reason is not None:
            holder.conversation_gone(reason)

    def admit(self, actor, principal: str | None) -> tuple[int, str] | None:
        """Whether a client that has sent a valid session.start (and credentials) may have a live
        session: only these count against NOVAGATE_MAX_SESSIONS (and per user), not sockets still in
        their handshake (gateway/admission.py)."""
        return self.admission.admit(actor, principal)


def session_config(settings: Settings, transport: ModelTransport, toolbox: ToolBox | None = None) -> SessionConfig:
    caps = getattr(transport, "capabilities", None)  # None: the local engine takes everything
    specs = toolbox.specs if toolbox is not None else ()
    history = history_limits(caps or model_spec(settings.model_id), total_bytes=settings.history_max_bytes,
                             message_bytes=settings.history_message_max_bytes)
    return SessionConfig(
        system_prompt=settings.system_prompt,
        voice=settings.voice,
        engine=transport.name,
        text_input=caps is None or caps.text_input,
        endpointing_sensitivity=(settings.endpointing_sensitivity or None)
        if caps is None or caps.endpointing_sensitivity else None,
        auth_required=settings.auth_required,
        handshake_timeout_s=settings.handshake_timeout,
        playback_lead_ms=settings.playback_lead_ms,
        truncate_wait_ms=settings.truncate_wait_ms,
        rotate_after_s=settings.rotate_after_s,
        rotate_force_after_s=settings.rotate_force_after_s,
        drain_flush_s=max(1.0, settings.drain_grace_s - 5),
        deaf_after_s=settings.deaf_stream_s,
        conversation_ttl_s=settings.conversation_ttl,
        idle_timeout_s=settings.idle_timeout_s,
        max_items=settings.max_items_per_conversation,
        history=history,
        tools=tuple(toolbox.nova_tools()) if toolbox is not None else (),
        public_tools=frozenset(spec.name for spec in specs if spec.public),
        tool_timeout_s=settings.tool_timeout_s,
        prices=Prices(settings.price_input_speech, settings.price_input_text, settings.price_output_speech,
                      settings.price_output_text),
        user_budget_usd=settings.user_budget_usd,
    )


def session_env(signer: Signer) -> SessionEnv:
    """What the sans-I/O session core is given: keys, ids, clocks, resampling, voice activity."""
    return SessionEnv(
        credentials=signer,  # signs and reads resume tokens and receipts (protocol.session.Credentials)
        new_id=clock.new_id,
        utc_now=clock.utc_now,
        wall_time=clock.wall_time,
        resampler=lambda rate: InputResampler(rate).to_model,
        speech_detector=SpeechActivity,
        decoder=codecs.decoder,
        encoder=codecs.encoder,
    )


def open_transport(settings: Settings) -> ModelTransport:
    # what the local and the scripted engine share: the service's limits and rules, tools on a phrase, a trace
    stand_in = dict(
        endpoint_ms=settings.local_endpoint_ms,
        idle_timeout_s=settings.local_idle_timeout_s,
        max_stream_s=settings.local_max_stream_s,
        input_gap_s=settings.local_input_gap_s,
        model_id=settings.model_id,
        tool_calls=settings.engine_tool_calls,
        trace_path=settings.engine_trace or None,
    )
    if settings.engine == "local":
        from .local.engine import LocalEngine, LocalEngineConfig

        return LocalEngine(LocalEngineConfig(
            asr=settings.local_asr, tts=settings.local_tts, grammar=settings.grammar, **stand_in))
    if settings.engine == "scripted":  # the local engine with canned replies, for load tests
        from .local.engine import DEFAULT_REPLY, ScriptedEngine, scripted_config

        return ScriptedEngine(scripted_config(
            reply=settings.scripted_reply or DEFAULT_REPLY,
            reply_s=settings.scripted_reply_s,
            transcripts=tuple(t.strip() for t in settings.scripted_transcripts.split("|") if t.strip()),
            energy_threshold_db=settings.scripted_energy_db,
            **stand_in,
        ))
    if settings.engine == "bedrock":
        from .bedrock import BedrockTransport

        return BedrockTransport(model_id=settings.model_id, region=settings.aws_region,
                                endpoint_url=settings.bedrock_endpoint or None,
                                streams_per_connection=settings.bedrock_streams_per_connection)
    raise ValueError(f"unknown engine {settings.engine!r}")


def create_app(settings: Settings | None = None) -> Starlette:
    """The application; a ConfigError (e.g. NOVAGATE_ALLOWED_HOSTS unset on a public address) at once."""
    settings = settings or Settings.from_env()
    hosts = allowed_hosts(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        secret = load_secret(settings.secret, settings.secret_file)
        try:
            toolbox = await open_toolbox(mcp_config=settings.mcp_config or None, python_tools=settings.tools or None)
        except ToolSetupError as e:
            log(logger, logging.ERROR, "tools could not be loaded", error=str(e))
            raise
        for line in toolbox.summary():
            log(logger, logging.INFO, "tool", tool=line)
        transport = open_transport(settings)
        if settings.engine == "bedrock" and (warning := model_spec(settings.model_id).warning()):
            log(logger, logging.WARNING, warning, model_id=settings.model_id)
        signer = Signer(secret, resume_ttl=settings.resume_ttl,  # earlier secrets verify during a rotation
                        previous=load_previous_secrets(settings.secret_previous, settings.secret_previous_file))
        authenticator = Authenticator.from_settings(settings)
        services = Services(
            settings=settings,
            store=open_store(settings),
            transport=transport,
            signer=signer,
            authenticator=authenticator,
            session_config=session_config(settings, transport, toolbox),
            session_env=session_env(signer),
            admission=Admission(Limits.from_settings(settings)),
            hosts=hosts,
            toolbox=toolbox,
        )
        warm = getattr(services.transport, "warm", None)
        if warm is not None:
            await warm()
        app.state.services = services
        log(logger, logging.INFO, "novagate ready", engine=settings.engine, store=settings.store,
            host=settings.host, port=settings.port)
        try:
            yield
        finally:
            await services.transport.aclose()
            await services.store.aclose()
            await toolbox.aclose()

    twilio = telephony.TwilioEndpoint.from_settings(settings, _serve)  # None: not served (docs/telephony.md)
    routes = [
        WebSocketRoute("/v1/voice", voice),
        *([WebSocketRoute("/v1/realtime", realtime)] if settings.realtime else []),
        *([WebSocketRoute(telephony.PATH, twilio.serve)] if twilio is not None else []),
        Route("/v1/conversations/{conversation_id}/history", history_v1, methods=["GET"]),
        Route("/v1/conversations/{conversation_id}", delete_conversation, methods=["DELETE"]),
        Route("/conversation/{conversation_id}/history", history_guide, methods=["GET"]),
        Route("/healthz", healthz),
        Route("/readyz", readyz),
    ]
    if not settings.metrics_port:  # no admin port: /metrics here (gateway/server.py serves it otherwise)
        routes.append(Route("/metrics", metrics.endpoint))
    if WEB_DIR.is_dir():
        routes.append(Mount("/", AppFiles(directory=WEB_DIR, html=True), name="web"))
    middleware = [Middleware(SecurityHeaders), Middleware(HostCheck, hosts=hosts)]
    return Starlette(routes=routes, middleware=middleware, lifespan=lifespan,
                     exception_handlers={Unauthorized: _unauthorized})


# -- WebSocket ------------------------------------------------------------------------------------
def _bearer(headers) -> str | None:
    value = headers.get("authorization", "")
    return value[7:].strip() or None if value[:7].lower() == "bearer " else None


async def voice(ws: WebSocket) -> None:
    offered = ws.scope.get("subprotocols") or []
    await _serve(ws, SUBPROTOCOL if SUBPROTOCOL in offered else None, _bearer(ws.headers))


async def realtime(ws: WebSocket) -> None:
    """The OpenAI Realtime-compatible endpoint: the same sessions, another wire protocol
    (protocol/realtime.py, docs/realtime-compat.md). A browser sends its key as a subprotocol."""
    services: Services = ws.app.state.services
    offered = ws.scope.get("subprotocols") or []
    key = next((p[len(RT_KEY):] for p in offered if p.startswith(RT_KEY)), None)
    # OpenAI's SDKs always send their api_key as a bearer: with no identity provider it is not a credential
    bearer = (_bearer(ws.headers) or key) if services.authenticator.enabled else None
    settings = rt.Settings(
        model=services.settings.model_id,
        client_instructions=services.settings.realtime_client_instructions,
        endpointing=getattr(getattr(services.transport, "capabilities", None), "endpointing_sensitivity", True),
        server_tools=frozenset(t["toolSpec"]["name"] for t in services.session_config.tools),
        voices=(getattr(services.transport, "capabilities", None) or model_spec(services.settings.model_id)).voices,
    )
    resume = ws.query_params.get("resume") or None

    def wrap(session, now: float):
        return rt.RealtimeSession(session, settings, now=now, new_id=clock.new_id, resume=resume)

    await _serve(ws, "realtime" if "realtime" in offered else None, bearer, wrap, metrics.REALTIME_SESSIONS)


RT_KEY = "openai-insecure-api-key."


async def _serve(ws: WebSocket, subprotocol: str | None, bearer: str | None, wrap=None, counter=None) -> None:
    services: Services = ws.app.state.services
    settings = services.settings
    if ws.application_state is WebSocketState.CONNECTING:  # /v1/telephony/twilio accepts before its preamble
        await ws.accept(subprotocol=subprotocol)
    if not origin_allowed(ws.headers.get("origin"), settings.origins, services.hosts, ws.headers.get("host", "")):
        metrics.REJECTED.labels("origin").inc()
        await ws.close(CloseCode.FORBIDDEN_ORIGIN, "origin not allowed")
        return
    if services.draining:
        metrics.REJECTED.labels("draining").inc()
        await ws.close(CloseCode.TRY_AGAIN_LATER, "draining")
        return
    actor = SessionActor(ws, services, bearer, wrap)
    evicted = asyncio.Event()
    refusal = services.admission.open(actor, client_address(ws.scope), evicted.set)
    if refusal is not None:
        await refuse(ws, refusal)  # an overload refusal says when to retry first
        return
    services.sessions.add(actor)
    services.no_sessions.clear()
    metrics.SESSIONS.inc()
    if counter is not None:  # sessions of another wire protocol (/v1/realtime)
        counter.inc()
    metrics.SESSIONS_ACTIVE.inc()
    try:
        await _run(actor, ws, evicted)
    finally:
        services.sessions.discard(actor)
        services.admission.close(actor)
        for cid in [c for c, a in services.holders.items() if a is actor]:
            services.release(cid, actor=actor)
        if not services.sessions:
            services.no_sessions.set()
        metrics.SESSIONS_ACTIVE.dec()


async def _run(actor: SessionActor, ws: WebSocket, evicted: asyncio.Event) -> None:
    """The actor, until it ends or its handshake slot is taken by a fairer newcomer: then it is
    stopped (it holds nothing yet but the socket) and the client told 1013 `busy`."""
    run = asyncio.create_task(actor.run())
    evict = asyncio.create_task(evicted.wait())
    try:
        await asyncio.wait((run, evict), return_when=asyncio.FIRST_COMPLETED)
    finally:
        evict.cancel()
        if not run.done():
            run.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await run
    if not run.cancelled():
        run.result()  # what `await actor.run()` would raise
        return
    metrics.REJECTED.labels("evicted").inc()
    with contextlib.suppress(Exception):
        await ws.close(CloseCode.TRY_AGAIN_LATER, "busy")


# -- HTTP -------------------------------------------------------------------------------------------
_NOT_FOUND = {"error": "not_found", "message": "no such conversation"}


class Unauthorized(Exception):
    """401: credentials that do not verify, or none where NOVAGATE_AUTH_REQUIRED asks for them."""


async def _unauthorized(request: Request, exc: Exception) -> Response:
    message = str(exc)
    challenge = 'Bearer error="invalid_token"' if message == "invalid credentials" else "Bearer"
    return JSONResponse({"error": "unauthorized", "message": message}, status_code=401,
                        headers={"WWW-Authenticate": challenge})


async def _caller(request: Request) -> str | None:
    """The principal of the request's bearer token, or None without one. An Authorization header
    that does not carry a valid bearer token is refused, never ignored; so is none at all when the
    deployment requires authentication."""
    services: Services = request.app.state.services
    if "authorization" not in request.headers:
        if services.settings.auth_required:
            raise Unauthorized("credentials required")
        return None
    token = _bearer(request.headers)
    principal = await services.authenticator.verify(token) if token else None
    if principal is None:
        raise Unauthorized("invalid credentials")
    return principal


async def _owned(request: Request):
    """The conversation if the caller may use it (bearer token, or X-Resume-Token under the same
    rule as the socket: protocol.session.may_use), else None."""
    services: Services = request.app.state.services
    cid = request.path_params["conversation_id"]
    owners = []
    principal = await _caller(request)
    if principal is not None:
        owners.append(principal)
    token = request.headers.get("x-resume-token")
    claim = services.signer.read_resume_token(token) if token else None
    if claim is not None and claim.conversation_id == cid and may_use(claim.owner, principal):
        owners.append(claim.owner)
    for owner in dict.fromkeys(owners):
        conv = await services.store.load(cid, max_items=1, owner=owner_hash(owner))
        if conv is None:
            continue
        if owner != principal and claim is not None and claim.epoch < conv.epoch:
            continue  # a token minted before the conversation was revoked
        return conv
    return None


def _history_endpoint(shape):
    """A history endpoint: the owner's full history in `shape`, else (also once it has ended) a 404
    like a missing one."""

    async def endpoint(request: Request) -> Response:
        conv = await _owned(request)
        if conv is None or conv.ended:
            return JSONResponse(_NOT_FOUND, status_code=404)
        store = request.app.state.services.store
        limit, before = request.query_params.get("limit"), request.query_params.get("before")
        if limit is None and before is None:
            return JSONResponse(shape(conv, await store.history(conv.conversation_id), False))
        try:
            n = int(limit or HISTORY_PAGE_MAX)
            if not 1 <= n <= HISTORY_PAGE_MAX:
                raise ValueError
            items, older = await store.history_page(conv.conversation_id, limit=n, before=before)
        except ValueError:
            return JSONResponse({"error": "invalid_field", "message": f"'limit' must be 1..{HISTORY_PAGE_MAX} and "
                                 "'before' an item_id of this conversation"}, status_code=400)
        return JSONResponse(shape(conv, items, older))

    return endpoint


HISTORY_PAGE_MAX = 1000

# `?limit=N&before=<item_id>` (additive): the newest N items older than `before`, oldest first
# (`history_length` counts them), and `next_before`, the cursor of the page before them (null: none).
history_v1 = _history_endpoint(lambda conv, items, older: {
    "conversation_id": conv.conversation_id,
    "ended": conv.ended,
    "history_length": len(items),
    "history": [i.to_dict() for i in items],
    **({"next_before": older} if older is not False else {}),
})

# The original guide's shape: {sessionId, bedrockSessionId, historyLength, history:[{role,text,timestamp}]}.
history_guide = _history_endpoint(lambda conv, items, older: {
    "sessionId": conv.conversation_id,
    "bedrockSessionId": conv.conversation_id,
    "historyLength": len(items),
    "history": [{"role": i.role, "text": i.text, "timestamp": i.at} for i in items],
})


async def delete_conversation(request: Request) -> Response:
    conv = await _owned(request)
    if conv is None:
        return JSONResponse(_NOT_FOUND, status_code=404)
    services: Services = request.app.state.services
    store = services.store
    await store.end(conv.conversation_id)
    await store.delete(conv.conversation_id)
    services.release(conv.conversation_id, "missing")  # its live session here closes now
    log(logger, logging.INFO, "conversation deleted", conversation_id=conv.conversation_id)
    return Response(status_code=204)


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    services: Services = request.app.state.services
    if services.draining:
        return JSONResponse({"status": "draining"}, status_code=503)
    if not await services.store.ready():
        return JSONResponse({"status": "store unavailable"}, status_code=503)
    return JSONResponse({"status": "ready", "sessions": len(services.sessions)})

