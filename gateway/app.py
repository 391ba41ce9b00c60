"""The ASGI application: the voice WebSocket, the history endpoints, health and metrics, the web app."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket

from protocol.codes import CloseCode
from protocol.session import SessionConfig, SessionEnv, may_use

from . import clock, metrics
from .actor import SessionActor
from .audio import InputResampler, SpeechActivity
from .config import Settings
from .logs import log
from .store import ConversationStore, open_store
from .tokens import Authenticator, Credentials, Signer, load_secret, owner_hash
from .transport import ModelTransport

logger = logging.getLogger("novagate.app")
WEB_DIR = Path(__file__).resolve().parent.parent / "web"
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
    sessions: set = field(default_factory=set)   # every socket's actor, handshake or not
    admitted: set = field(default_factory=set)   # actors past session.start and auth: live sessions
    draining: bool = False
    no_sessions: asyncio.Event = field(default_factory=asyncio.Event)  # set while `sessions` is empty

    def admit(self, actor, principal: str | None) -> tuple[int, str] | None:
        """Whether a client that has sent a valid session.start (and credentials) may have a live
        session: only these count against NOVAGATE_MAX_SESSIONS, not sockets still in their handshake."""
        if len(self.admitted) >= self.settings.max_sessions:
            metrics.REJECTED.labels("capacity").inc()
            return CloseCode.TRY_AGAIN_LATER, "at capacity"
        self.admitted.add(actor)
        return None


def session_config(settings: Settings, transport: ModelTransport) -> SessionConfig:
    caps = getattr(transport, "capabilities", None)  # None: the local engine takes everything
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
        idle_timeout_s=settings.idle_timeout_s,
        max_items=settings.max_items_per_conversation,
    )


def session_env(signer: Signer) -> SessionEnv:
    """What the sans-I/O session core is given: keys, ids, clocks, resampling, voice activity."""
    return SessionEnv(
        credentials=Credentials(signer),
        new_id=clock.new_id,
        utc_now=clock.utc_now,
        wall_time=clock.wall_time,
        resampler=lambda rate: InputResampler(rate).to_model,
        speech_detector=SpeechActivity,
    )


def open_transport(settings: Settings) -> ModelTransport:
    if settings.engine == "local":
        from .local.engine import LocalEngine, LocalEngineConfig

        return LocalEngine(LocalEngineConfig(
            asr=settings.local_asr,
            tts=settings.local_tts,
            grammar=settings.grammar,
            endpoint_ms=settings.local_endpoint_ms,
            idle_timeout_s=settings.local_idle_timeout_s,
            max_stream_s=settings.local_max_stream_s,
            trace_path=settings.engine_trace or None,
        ))
    if settings.engine == "bedrock":
        from .bedrock import BedrockTransport

        return BedrockTransport(model_id=settings.model_id, region=settings.aws_region,
                                endpoint_url=settings.bedrock_endpoint or None)
    raise ValueError(f"unknown engine {settings.engine!r}")


def create_app(settings: Settings | None = None) -> Starlette:
    settings = settings or Settings.from_env()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        secret = load_secret(settings.secret, settings.secret_file)
        transport = open_transport(settings)
        signer = Signer(secret, resume_ttl=settings.resume_ttl)
        authenticator = Authenticator(settings.auth_jwt_secret)
        services = Services(
            settings=settings,
            store=open_store(settings),
            transport=transport,
            signer=signer,
            authenticator=authenticator,
            session_config=session_config(settings, transport),
            session_env=session_env(signer),
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

    routes = [
        WebSocketRoute("/v1/voice", voice),
        Route("/v1/conversations/{conversation_id}/history", history_v1, methods=["GET"]),
        Route("/v1/conversations/{conversation_id}", delete_conversation, methods=["DELETE"]),
        Route("/conversation/{conversation_id}/history", history_guide, methods=["GET"]),
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics_endpoint),
    ]
    if WEB_DIR.is_dir():
        routes.append(Mount("/", StaticFiles(directory=WEB_DIR, html=True), name="web"))
    return Starlette(routes=routes, lifespan=lifespan)


# -- WebSocket ------------------------------------------------------------------------------------
def _origin_allowed(ws: WebSocket, allowed: tuple[str, ...]) -> bool:
    origin = ws.headers.get("origin")
    if not origin or "*" in allowed or origin in allowed:
        return True
    return urlsplit(origin).netloc == ws.headers.get("host", "")


def _bearer(headers) -> str | None:
    value = headers.get("authorization", "")
    return value[7:].strip() or None if value[:7].lower() == "bearer " else None


async def voice(ws: WebSocket) -> None:
    services: Services = ws.app.state.services
    settings = services.settings
    offered = ws.scope.get("subprotocols") or []
    await ws.accept(subprotocol=SUBPROTOCOL if SUBPROTOCOL in offered else None)
    if not _origin_allowed(ws, settings.origins):
        metrics.REJECTED.labels("origin").inc()
        await ws.close(CloseCode.FORBIDDEN_ORIGIN, "origin not allowed")
        return
    if services.draining:
        metrics.REJECTED.labels("draining").inc()
        await ws.close(CloseCode.TRY_AGAIN_LATER, "draining")
        return
    actor = SessionActor(ws, services, _bearer(ws.headers))
    services.sessions.add(actor)
    services.no_sessions.clear()
    metrics.SESSIONS.inc()
    metrics.SESSIONS_ACTIVE.inc()
    try:
        await actor.run()
    finally:
        services.sessions.discard(actor)
        services.admitted.discard(actor)
        if not services.sessions:
            services.no_sessions.set()
        metrics.SESSIONS_ACTIVE.dec()


# -- HTTP -------------------------------------------------------------------------------------------
_NOT_FOUND = {"error": "not_found", "message": "no such conversation"}


async def _owned(request: Request):
    """The conversation if the caller may use it (bearer token, or X-Resume-Token under the same
    rule as the socket: protocol.session.may_use), else None."""
    services: Services = request.app.state.services
    cid = request.path_params["conversation_id"]
    owners = []
    principal = services.authenticator.principal(_bearer(request.headers))
    if principal is not None:
        owners.append(principal)
    token = request.headers.get("x-resume-token")
    claim = services.signer.read_resume_token(token) if token else None
    if claim is not None and claim.conversation_id == cid and may_use(claim.owner, principal):
        owners.append(claim.owner)
    for owner in dict.fromkeys(owners):
        conv = await services.store.load(cid, max_items=1, owner=owner_hash(owner))
        if conv is not None:
            return conv
    return None


def _history_endpoint(shape):
    """A history endpoint: the owner's full history in `shape`, else a 404 like a missing one."""

    async def endpoint(request: Request) -> Response:
        conv = await _owned(request)
        if conv is None:
            return JSONResponse(_NOT_FOUND, status_code=404)
        items = await request.app.state.services.store.history(conv.conversation_id)
        return JSONResponse(shape(conv, items))

    return endpoint


history_v1 = _history_endpoint(lambda conv, items: {
    "conversation_id": conv.conversation_id,
    "ended": conv.ended,
    "history_length": len(items),
    "history": [i.to_dict() for i in items],
})

# The original guide's shape: {sessionId, bedrockSessionId, historyLength, history:[{role,text,timestamp}]}.
history_guide = _history_endpoint(lambda conv, items: {
    "sessionId": conv.conversation_id,
    "bedrockSessionId": conv.conversation_id,
    "historyLength": len(items),
    "history": [{"role": i.role, "text": i.text, "timestamp": i.at} for i in items],
})


async def delete_conversation(request: Request) -> Response:
    conv = await _owned(request)
    if conv is None:
        return JSONResponse(_NOT_FOUND, status_code=404)
    store = request.app.state.services.store
    await store.end(conv.conversation_id)
    await store.delete(conv.conversation_id)
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


async def metrics_endpoint(request: Request) -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
