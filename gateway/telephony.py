"""`/v1/telephony/twilio`: phone calls through Twilio Media Streams (docs/telephony.md).

Twilio opens the WebSocket of a `<Connect><Stream>` and sends `connected`, then `start`, which names
the call and carries the TwiML's `<Parameter>`s: the caller's number among them. The caller owns the
conversation, so before the session exists the gateway must know who calls and find their recent
conversation, which is I/O. This module does that preamble, then hands the socket to the session actor
with the Twilio adapter (protocol/twilio.py) around the session, as `/v1/realtime` does:

1. the handshake's `X-Twilio-Signature` is checked (HMAC-SHA1 of the URL Twilio requested, with the
   account's Auth Token; Twilio's own `RequestValidator`); a bad or missing one refuses the upgrade
   (HTTP 403). Without an Auth Token the endpoint is not served, unless NOVAGATE_TWILIO_INSECURE;
2. `connected` and `start` are read (within NOVAGATE_HANDSHAKE_TIMEOUT) and checked;
3. the caller's newest conversation active within NOVAGATE_TWILIO_RESUME_WINDOW_S is looked up in the
   store (`find_recent`, owner hashed as everywhere), so a call back resumes it on any instance;
4. the session starts (mu-law 8 kHz both ways) with that conversation, or a new one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import urlsplit

from prometheus_client import Counter
from starlette.websockets import WebSocket
from twilio.request_validator import RequestValidator

from protocol import twilio
from protocol.codes import CloseCode

from .config import ConfigError, Settings
from .logs import log
from .store import StoreError
from .tokens import owner_hash

logger = logging.getLogger("novagate.telephony")

PATH = "/v1/telephony/twilio"
FIND_TIMEOUT_S = 5.0   # the look-up of the caller's recent conversation; past it the call gets a new one
CALLS = Counter("novagate_telephony_calls_total", "Twilio Media Streams calls by outcome: resumed, new, anonymous "
                "(no caller id), refused (bad signature), bad_handshake", ["outcome"])

Serve = Callable[..., Awaitable[None]]  # gateway/app.py `_serve(ws, subprotocol, bearer, wrap, counter)`


def auth_token(settings: Settings) -> str:
    """The Twilio Auth Token from the environment or its file ("" when neither is set)."""
    if settings.twilio_auth_token:
        return settings.twilio_auth_token
    if settings.twilio_auth_token_file:
        try:
            token = Path(settings.twilio_auth_token_file).read_text().strip()
        except OSError as e:
            raise ConfigError(f"NOVAGATE_TWILIO_AUTH_TOKEN_FILE: {e}") from None
        if not token:
            raise ConfigError("NOVAGATE_TWILIO_AUTH_TOKEN_FILE is empty")
        return token
    return ""


class TwilioEndpoint:
    """The route's handler, made once per application with the settings it needs."""

    def __init__(self, settings: Settings, token: str, serve: Serve):
        self.settings = settings
        self.validator = RequestValidator(token) if token else None
        self._serve = serve

    @classmethod
    def from_settings(cls, settings: Settings, serve: Serve) -> TwilioEndpoint | None:
        """The endpoint, or None when it is not served (no Auth Token and not insecure)."""
        token = auth_token(settings)
        if not token and not settings.twilio_insecure:
            return None
        if not token:
            log(logger, logging.WARNING, "serving /v1/telephony/twilio WITHOUT signature checks "
                "(NOVAGATE_TWILIO_INSECURE): anyone who can reach it can call as any phone number")
        return cls(settings, token, serve)

    def signed_url(self, ws: WebSocket) -> str:
        """The URL Twilio signed: NOVAGATE_TWILIO_PUBLIC_URL, else wss:// (the only scheme Twilio uses)
        with the request's Host, path and query."""
        if self.settings.twilio_public_url:
            return self.settings.twilio_public_url
        return str(ws.url.replace(scheme="wss"))

    def signature_ok(self, ws: WebSocket) -> bool:
        if self.validator is None:
            return True
        signature = ws.headers.get("x-twilio-signature")
        # a WebSocket upgrade has no POST parameters: the signature covers the URL alone, with or without
        # its default port (RequestValidator tries both for http(s) only: wss's :443 is added here)
        return bool(signature) and any(self.validator.validate(url, {}, signature)
                                       for url in _with_and_without_port(self.signed_url(ws)))

    async def serve(self, ws: WebSocket) -> None:
        services = ws.app.state.services
        settings = self.settings
        if not self.signature_ok(ws):
            CALLS.labels("refused").inc()
            log(logger, logging.WARNING, "twilio handshake refused: bad or missing X-Twilio-Signature",
                client=ws.client.host if ws.client else "unknown", signed=bool(ws.headers.get("x-twilio-signature")),
                url=self.signed_url(ws))
            await ws.close(CloseCode.FORBIDDEN_ORIGIN)  # before accept: the upgrade is refused (HTTP 403)
            return
        await ws.accept()
        try:
            async with asyncio.timeout(settings.handshake_timeout):
                call = await _preamble(ws, settings.twilio_caller_parameter)
        except TimeoutError:
            CALLS.labels("bad_handshake").inc()
            await _close(ws, CloseCode.HANDSHAKE_TIMEOUT, "no start in time")
            return
        except twilio.TwilioError as e:
            CALLS.labels("bad_handshake").inc()
            log(logger, logging.WARNING, "twilio handshake refused", reason=str(e))
            await _close(ws, CloseCode.PROTOCOL_ERROR, str(e)[:120])
            return
        except _Gone:
            return
        conversation_id = None
        if call.caller is None:
            outcome = "anonymous"
        elif services.draining or settings.twilio_resume_window_s <= 0:
            outcome = "new"
        else:
            conversation_id = await self._recent(services.store, call)
            outcome = "resumed" if conversation_id else "new"
        CALLS.labels(outcome).inc()
        log(logger, logging.INFO, "twilio call", call_sid=call.call_sid, stream_sid=call.stream_sid,
            caller_known=call.caller is not None, resume=conversation_id)  # None: a new conversation

        def wrap(session, now: float):
            return twilio.TwilioSession(session, call, now=now, conversation_id=conversation_id)

        await self._serve(ws, None, None, wrap)

    async def _recent(self, store, call: twilio.Call) -> str | None:
        """The caller's newest conversation active within the window, or None (also when the store does
        not answer in time: the call must be answered, so it gets a new conversation)."""
        try:
            async with asyncio.timeout(FIND_TIMEOUT_S):
                return await store.find_recent(owner_hash(call.principal), self.settings.twilio_resume_window_s)
        except (StoreError, TimeoutError) as e:
            log(logger, logging.WARNING, "twilio call: the caller's recent conversation could not be looked up; "
                "a new one is started", call_sid=call.call_sid, error=str(e) or type(e).__name__)
            return None


def _with_and_without_port(url: str) -> tuple[str, ...]:
    """The URL as given, and with its port 443 written out or left out."""
    parts = urlsplit(url)
    if parts.scheme != "wss" or parts.port not in (None, 443):
        return (url,)
    host = parts.netloc.rsplit(":", 1)[0] if parts.port else parts.netloc
    return (url, parts._replace(netloc=host if parts.port else host + ":443").geturl())


class _Gone(Exception):
    """Twilio closed the socket during the preamble."""


async def _preamble(ws: WebSocket, caller_parameter: str) -> twilio.Call:
    """`connected` (optional) then `start`, checked (protocol/twilio.py `parse_preamble`)."""
    for _ in range(twilio.MAX_PREAMBLE_MESSAGES):
        msg = await ws.receive()
        if msg["type"] == "websocket.disconnect":
            raise _Gone
        text = msg.get("text")
        if text is None:
            raise twilio.TwilioError("binary frame before start")
        call = twilio.parse_preamble(text, caller_parameter)
        if call is not None:
            return call
    raise twilio.TwilioError("no start")


async def _close(ws: WebSocket, code: int, reason: str) -> None:
    try:
        await ws.close(code, reason)
    except Exception:  # noqa: BLE001 - the peer went away first
        pass
