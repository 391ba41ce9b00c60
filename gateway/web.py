"""What browsers meet over HTTP: the Host allow-list (DNS rebinding), the same-host Origin rule of the
socket, security headers on every response, and the web app's own files (nothing else in web/)."""

from __future__ import annotations

import ipaddress
import os
import re
from importlib import resources
from pathlib import Path
from urllib.parse import urlsplit

from starlette.exceptions import HTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from .config import ConfigError, Settings

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
HOST_CHECK_EXEMPT = frozenset({"/healthz", "/readyz"})  # probes and load balancers ask by IP address

# The page, its modules (audio worklets are same-origin modules: script-src) and its WebSocket. `ws: wss:`
# keep the page's ?gateway=wss://other-host/v1/voice working; 'self' covers same-origin fetches.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self' ws: wss:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
]


# -- hosts and origins ----------------------------------------------------------------------------
def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def allowed_hosts(settings: Settings) -> tuple[str, ...]:
    """NOVAGATE_ALLOWED_HOSTS; unset, the loopback names (and the bind address) when listening on
    loopback. Listening elsewhere without it is a configuration error: a name must be chosen."""
    hosts = tuple(h.strip().lower() for h in settings.allowed_hosts.split(",") if h.strip())
    for h in hosts:
        if "*" in h[1:] or (h.startswith("*") and h != "*" and not h.startswith("*.")):
            raise ConfigError(f"NOVAGATE_ALLOWED_HOSTS: {h!r} is not a host name, `*.domain` or `*`")
    if hosts:
        return hosts
    bind = settings.host.lower()
    if not _is_loopback(bind):
        raise ConfigError(
            f"NOVAGATE_ALLOWED_HOSTS is not set and the gateway listens on {settings.host}, not on loopback: set "
            "it to the host names clients use (comma-separated, e.g. voice.example.com; `*.example.com` for "
            "subdomains; `*` accepts any Host and gives up DNS-rebinding protection)"
        )
    bind = f"[{bind.strip('[]')}]" if ":" in bind else bind
    return LOOPBACK_NAMES + (() if bind in LOOPBACK_NAMES else (bind,))


def host_allowed(host: str, hosts: tuple[str, ...]) -> bool:
    """TrustedHostMiddleware's rule: an exact name, or `*.domain` for its subdomains."""
    host = host.lower()
    return any(host == p or (p.startswith("*.") and host.endswith(p[1:])) for p in hosts)


def origin_allowed(origin: str | None, origins: tuple[str, ...], hosts: tuple[str, ...], host_header: str) -> bool:
    """No Origin (not a browser), an allow-listed one, or a page of the gateway itself: an Origin whose
    host is one of the allowed hosts. (With NOVAGATE_ALLOWED_HOSTS=*, the request's own Host.)"""
    if not origin or "*" in origins or origin in origins:
        return True
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return False
    if "*" in hosts:
        return parts.netloc.lower() == host_header.lower()
    name = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return host_allowed(name, hosts)


class HostCheck:
    """Starlette's TrustedHostMiddleware (400 `Invalid host header`; a WebSocket upgrade is refused with
    400 too), except for the health probes, which are asked for by IP address."""

    def __init__(self, app: ASGIApp, hosts: tuple[str, ...]):
        self.app = app
        self.checked = TrustedHostMiddleware(app, allowed_hosts=list(hosts), www_redirect=False)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] in HOST_CHECK_EXEMPT:
            await self.app(scope, receive, send)
        else:
            await self.checked(scope, receive, send)


# -- responses ------------------------------------------------------------------------------------
class SecurityHeaders:
    """CSP, nosniff, no framing, no referrer: on every HTTP response (and refused WebSocket upgrades)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message) -> None:
            if message["type"] in ("http.response.start", "websocket.http.response.start"):
                message = {**message, "headers": [*message.get("headers", ()), *SECURITY_HEADERS]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def app_dir() -> Path:
    """Where the web app's files are: the package data of an installed wheel (gateway/webapp: web/ of the
    repository, mapped by pyproject.toml's package-dir), else web/ of the source tree this package runs from
    (an editable install, the tests). It may not exist (a zipped install): then no web app is served."""
    shipped = resources.files(__package__) / "webapp"
    if isinstance(shipped, Path) and shipped.is_dir():
        return shipped
    return Path(__file__).resolve().parent.parent / "web"


class AppFiles(StaticFiles):
    """The web app's own files: pages, scripts and styles at the top of web/ and audio/*.js. Not its
    tests, package.json, dotfiles or anything else that happens to be in the directory."""

    SERVED = re.compile(r"[A-Za-z0-9_-]+\.(?:html|js|css)|audio/[A-Za-z0-9_-]+\.js")

    async def get_response(self, path: str, scope: Scope):
        if path != "." and not self.SERVED.fullmatch(path.replace(os.sep, "/")):
            raise HTTPException(status_code=404)
        return await super().get_response(path, scope)
