"""Signed resume tokens, receipts and client bearer tokens (JWT).

A resume token names a conversation and its owner; a receipt carries one final item so a client
can hand it back after a crash. Both are signed (HS256) with the server secret, which every
instance shares. Client bearer tokens are verified by `Authenticator`: HS256 with a shared key
and/or RS256/ES256 with an identity provider's keys (JWKS). Any failure reads the same to the
caller: None.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import os
import secrets
import stat
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jwt
from jwt import PyJWK, PyJWKClient, PyJWKSet

from protocol.items import ROLES, Item

from .config import MAKE_SECRET, MIN_SECRET_BYTES, ConfigError
from .logs import log

if TYPE_CHECKING:
    from .config import Settings

logger = logging.getLogger("novagate.auth")

_ALG = "HS256"
_RESUME_AUD = "novagate:resume"
_RECEIPT_AUD = "novagate:receipt"

_JWKS_ALGS = ("RS256", "ES256")  # what an identity provider's keys may sign with; never HS*/none
_MAX_TOKEN_CHARS = 16384
_MAX_USER_CHARS = 256


# -- secrets ----------------------------------------------------------------------------------------
def check_secret(value: bytes, what: str) -> bytes:
    """`value` if it is long enough to be a key, else a ConfigError saying how to make one."""
    if len(value) < MIN_SECRET_BYTES:
        raise ConfigError(
            f"{what} is {len(value)} bytes; a secret must be at least {MIN_SECRET_BYTES} bytes. "
            f"Make one with: {MAKE_SECRET}"
        )
    return value


def read_secret_file(path: str | Path, what: str) -> bytes:
    """A secret kept in a file (surrounding whitespace stripped). Refused when empty or short; a
    warning when the file is readable by others. FileNotFoundError when there is no file."""
    p = Path(path)
    mode = stat.S_IMODE(os.stat(p).st_mode)
    if mode & 0o077:
        log(logger, logging.WARNING, "secret file is readable by other users; chmod 600 it",
            path=str(p), mode=f"{mode:04o}", setting=what)
    return check_secret(p.read_bytes().strip(), f"{what} ({p})")


def load_secret(configured: str, path: str) -> bytes:
    """The configured secret (NOVAGATE_SECRET), else the one kept at `path` (NOVAGATE_SECRET_FILE),
    else a new one written there with mode 0600. Creation is atomic: every process starting at once
    ends up with the same, complete secret. A secret under 32 bytes is a ConfigError."""
    if configured:
        return check_secret(configured.encode(), "NOVAGATE_SECRET")
    p = Path(path)
    try:
        return read_secret_file(p, "NOVAGATE_SECRET_FILE")
    except FileNotFoundError:
        pass
    p.parent.mkdir(parents=True, exist_ok=True)
    value = secrets.token_urlsafe(48).encode()
    tmp = p.with_name(f".{p.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            os.write(fd, value + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, p)  # never replaces: when another process got there first, theirs wins
        except FileExistsError:
            pass
        except OSError:  # a file system without hard links: exclusive create, then write
            _create_exclusive(p, value)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(p.parent)
    return read_secret_file(p, "NOVAGATE_SECRET_FILE")


def load_previous_secrets(configured: str = "", path: str = "") -> tuple[bytes, ...]:
    """Earlier server secrets kept during a rotation (NOVAGATE_SECRET_PREVIOUS, comma-separated, or
    NOVAGATE_SECRET_PREVIOUS_FILE, one per line): they verify what they signed, and sign nothing.
    Each must be at least 32 bytes; an unreadable file is a ConfigError."""
    if path:
        try:
            p = Path(path)
            mode = stat.S_IMODE(os.stat(p).st_mode)
            text = p.read_bytes()
        except OSError as e:
            raise ConfigError(f"NOVAGATE_SECRET_PREVIOUS_FILE: cannot read {path}: {e.strerror or e}") from None
        if mode & 0o077:
            log(logger, logging.WARNING, "secret file is readable by other users; chmod 600 it",
                path=str(p), mode=f"{mode:04o}", setting="NOVAGATE_SECRET_PREVIOUS_FILE")
        values, what = text.splitlines(), f"NOVAGATE_SECRET_PREVIOUS_FILE ({path})"
    else:
        values, what = configured.encode().split(b","), "NOVAGATE_SECRET_PREVIOUS"
    values = [v.strip() for v in values]
    if path:
        values = [v for v in values if v]  # blank lines
    elif not any(values):
        return ()
    return tuple(dict.fromkeys(check_secret(v, what) for v in values))


def _create_exclusive(p: Path, value: bytes) -> None:
    try:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    try:
        os.write(fd, value + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# -- resume tokens and receipts ---------------------------------------------------------------------
def _signing_key(secret: bytes) -> bytes:
    return hashlib.sha256(b"novagate-signing\0" + secret).digest()


@dataclass(frozen=True, slots=True)
class ResumeClaim:
    conversation_id: str
    owner: str
    epoch: int = 0                # the conversation's revocation epoch when the token was minted
    not_after: int | None = None  # the conversation's absolute lifetime: no token for it outlives this


class Signer:
    """Signs with `secret`; verifies with it and with `previous` secrets (a rotation's grace period:
    what an earlier secret signed stays valid until that secret is removed from the configuration)."""

    def __init__(self, secret: bytes, *, resume_ttl: int = 86400, previous: Iterable[bytes] = ()):
        self._key = _signing_key(secret)
        self._keys = (self._key, *dict.fromkeys(k for k in map(_signing_key, previous) if k != self._key))
        self.resume_ttl = resume_ttl

    def _decode(self, token: str, **kwargs: Any) -> dict[str, Any]:
        """The verified claims: the current key first, then each previous one. Only a signature that
        fails moves on to the next key; any other failure (expired, wrong audience) is final."""
        for key in self._keys[:-1]:
            try:
                return jwt.decode(token, key, algorithms=[_ALG], **kwargs)
            except jwt.InvalidSignatureError:
                continue
        return jwt.decode(token, self._keys[-1], algorithms=[_ALG], **kwargs)

    # resume tokens ---------------------------------------------------------------------------
    def resume_token(self, conversation_id: str, owner: str, epoch: int = 0, not_after: int | None = None) -> str:
        """A token valid for `resume_ttl`, but never past `not_after` (the conversation's absolute
        lifetime, carried from token to token), and only while the conversation's epoch is `epoch`."""
        now = int(time.time())
        exp = now + self.resume_ttl if not_after is None else min(now + self.resume_ttl, int(not_after))
        claims = {"aud": _RESUME_AUD, "cid": conversation_id, "own": owner, "iat": now, "exp": exp, "ep": int(epoch)}
        if not_after is not None:
            claims["naf"] = int(not_after)
        return jwt.encode(claims, self._key, algorithm=_ALG)

    def read_resume_token(self, token: str) -> ResumeClaim | None:
        try:
            c = self._decode(token, audience=_RESUME_AUD, options={"require": ["exp", "cid", "own"]})
        except (jwt.PyJWTError, TypeError, ValueError):
            return None
        epoch, not_after = c.get("ep", 0), c.get("naf")
        if not isinstance(epoch, int) or (not_after is not None and not isinstance(not_after, int)):
            return None
        return ResumeClaim(str(c["cid"]), str(c["own"]), epoch, not_after)

    # receipts --------------------------------------------------------------------------------
    def receipt(self, conversation_id: str, item: Item) -> str:
        claims = {"aud": _RECEIPT_AUD, "cid": conversation_id, "item": item.to_dict()}
        return jwt.encode(claims, self._key, algorithm=_ALG)

    def read_receipt(self, token: str, conversation_id: str) -> Item | None:
        """The item, if this server signed the receipt for this conversation."""
        try:
            c = self._decode(token, audience=_RECEIPT_AUD, options={"require": ["cid"]})
            if c["cid"] != conversation_id:
                return None
            item = Item.from_dict(c["item"])
        except (jwt.PyJWTError, KeyError, TypeError, ValueError):
            return None
        return item if item.role in ROLES else None


# -- identity providers' keys -------------------------------------------------------------------
class JWKSKeys:
    """An identity provider's signing keys (RS256/ES256), from a JWKS URL or file, cached by `kid`.

    Fetches run in a thread (PyJWKClient does blocking urllib I/O, with `timeout_s`), one at a
    time. A token naming an unknown `kid` triggers a refresh (key rotation), at most one per
    `min_refresh_s`, so a flood of made-up kids cannot hammer the provider. The set is re-fetched
    when older than `max_age_s` (keys removed by the provider stop working); while the provider
    cannot be reached the last keys stay in use and attempts are spaced `retry_s` apart.
    """

    def __init__(self, url: str = "", path: str = "", *, timeout_s: float = 5.0, max_age_s: float = 3600.0,
                 min_refresh_s: float = 30.0, retry_s: float = 5.0, clock: Callable[[], float] = time.monotonic):
        if bool(url) == bool(path):
            raise ValueError("JWKSKeys needs a url or a path")
        self.source = url or str(path)
        self._client = PyJWKClient(url, cache_jwk_set=False, timeout=timeout_s,
                                   headers={"User-Agent": "novagate"}) if url else None
        self._path = Path(path) if path else None
        self._max_age_s, self._min_refresh_s, self._retry_s = max_age_s, min_refresh_s, retry_s
        self._clock = clock
        self._keys: dict[str, PyJWK] | None = None
        self._loaded_at = self._attempt_at = self._refresh_at = self._limited_logged_at = -math.inf
        self._lock: asyncio.Lock | None = None
        self._task: asyncio.Future | None = None
        self.fetches = 0  # attempts, successful or not

    def _fresh(self, now: float) -> bool:
        return self._keys is not None and now - self._loaded_at < self._max_age_s

    async def get(self, kid: str) -> PyJWK | None:
        """The key `kid` names, fetching the set when needed (in a thread); None if there is none."""
        if self._fresh(self._clock()) and kid in self._keys:
            return self._keys[kid]
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            now = self._clock()
            if self._may_fetch(kid, now):
                await self._fetch(now)
            return (self._keys or {}).get(kid)

    def _may_fetch(self, kid: str, now: float) -> bool:
        if not self._fresh(now):  # never loaded, or due for the periodic refresh; failures spaced retry_s
            return now - self._attempt_at >= self._retry_s
        if kid in self._keys:
            return False  # another request refreshed the set while this one waited
        if now - self._refresh_at >= self._min_refresh_s:
            self._refresh_at = now
            log(logger, logging.INFO, "jwks: unknown kid, refreshing the key set", source=self.source, kid=kid[:64])
            return True
        if self._limited_logged_at < self._refresh_at:  # once per rate-limit window
            self._limited_logged_at = self._refresh_at
            log(logger, logging.WARNING, "jwks: unknown kid, refresh rate-limited; token refused",
                source=self.source, kid=kid[:64], retry_in_s=round(self._min_refresh_s - (now - self._refresh_at), 1))
        return False

    async def _fetch(self, now: float) -> None:
        self._attempt_at = now
        self.fetches += 1
        # A task, so a caller that gives up (client gone) does not throw the fetched set away.
        self._task = asyncio.ensure_future(self._fetch_and_keep())
        await asyncio.shield(self._task)

    async def _fetch_and_keep(self) -> None:
        try:
            keys = await asyncio.to_thread(self._load)
        except Exception as e:  # unreachable, timeout, not JSON, no usable keys: keep what we had
            log(logger, logging.WARNING, "jwks: cannot load the key set",
                source=self.source, error=f"{type(e).__name__}: {e}"[:300], cached_keys=len(self._keys or ()))
            return
        self._keys, self._loaded_at = keys, self._clock()
        log(logger, logging.INFO, "jwks: key set loaded", source=self.source, kids=sorted(keys))

    def _load(self) -> dict[str, PyJWK]:
        """Blocking: fetch or read the set; keep signing keys with a kid and an allowed algorithm."""
        if self._client is not None:
            jwk_set = self._client.get_jwk_set(refresh=True)
        else:
            jwk_set = PyJWKSet.from_json(self._path.read_text())
        return {k.key_id: k for k in jwk_set.keys
                if isinstance(k.key_id, str) and k.key_id and k.public_key_use in ("sig", None)
                and k.algorithm_name in _JWKS_ALGS}


# -- client bearer tokens ---------------------------------------------------------------------
def _names(value: str | Iterable[str]) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else value
    return tuple(v.strip() for v in items if v and v.strip())


class Authenticator:
    """Verifies client bearer tokens (JWT); the principal is `user:<claim>` (the claim: `sub` unless
    configured). HS256 with `key` (at least 32 bytes) and/or RS256/ES256 with an identity provider's
    JWKS; a token's algorithm picks the key, so an HS256 token is never checked against a public
    key and `none` is never accepted. `exp` is required; `aud` and `iss` are checked when set."""

    def __init__(self, key: str | bytes = "", *, jwks: JWKSKeys | None = None, jwks_url: str = "",
                 jwks_file: str = "", jwks_timeout_s: float = 5.0, audience: str | Iterable[str] = "",
                 issuer: str | Iterable[str] = "", leeway_s: float = 30.0, user_claim: str = "sub"):
        hs_key = key.encode() if isinstance(key, str) else bytes(key)
        self._hs_key = check_secret(hs_key, "NOVAGATE_AUTH_JWT_SECRET") if hs_key else b""
        if jwks is None and (jwks_url or jwks_file):
            jwks = JWKSKeys(jwks_url, jwks_file, timeout_s=jwks_timeout_s)
        self.jwks = jwks
        self._audiences = _names(audience)
        issuers = _names(issuer)
        self._issuer: str | tuple[str, ...] | None = (issuers[0] if len(issuers) == 1 else issuers) or None
        self._leeway = float(leeway_s)
        if not user_claim.strip():
            raise ValueError("user_claim must name a claim")
        self._user_claim = user_claim.strip()

    @classmethod
    def from_settings(cls, settings: Settings) -> Authenticator:
        """From NOVAGATE_AUTH_*; a short or unreadable key file is a ConfigError."""
        key = settings.auth_jwt_secret.encode()
        if settings.auth_jwt_secret_file:
            try:
                key = read_secret_file(settings.auth_jwt_secret_file, "NOVAGATE_AUTH_JWT_SECRET_FILE")
            except OSError as e:
                raise ConfigError(f"NOVAGATE_AUTH_JWT_SECRET_FILE: cannot read {settings.auth_jwt_secret_file}: "
                                  f"{e.strerror or e}") from None
        return cls(key, jwks_url=settings.auth_jwks_url, jwks_file=settings.auth_jwks_file,
                   jwks_timeout_s=settings.auth_jwks_timeout_s, audience=settings.auth_audience,
                   issuer=settings.auth_issuer, leeway_s=settings.auth_leeway_s, user_claim=settings.auth_user_claim)

    @property
    def enabled(self) -> bool:
        """Whether any kind of token can verify."""
        return bool(self._hs_key) or self.jwks is not None

    async def verify(self, token: str | None) -> str | None:
        """The principal of a bearer token, or None when it is not valid. Never raises; fetching an
        identity provider's keys happens in a thread."""
        try:
            alg, header = self._alg(token)
            if alg is None:
                return None
            if alg == _ALG:
                return self._principal(token, self._hs_key, alg)
            kid = header.get("kid")
            if not isinstance(kid, str) or not kid:
                return None
            jwk = await self.jwks.get(kid)
            if jwk is None or jwk.algorithm_name != alg:
                return None
            return self._principal(token, jwk, alg)
        except Exception:
            log(logger, logging.WARNING, "bearer token verification failed unexpectedly", exc_info=True)
            return None

    def principal(self, token: str | None) -> str | None:
        """Synchronous check of HS256 tokens only (JWKS tokens need `verify`). Same rules."""
        try:
            return self._principal(token, self._hs_key, _ALG) if self._alg(token)[0] == _ALG else None
        except Exception:
            log(logger, logging.WARNING, "bearer token verification failed unexpectedly", exc_info=True)
            return None

    def _alg(self, token: str | None) -> tuple[str | None, dict[str, Any]]:
        """The token's algorithm, if a configured key could verify it, and its (unverified) header."""
        if not token or not isinstance(token, str) or len(token) > _MAX_TOKEN_CHARS:
            return None, {}
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            return None, {}
        alg = header.get("alg")
        if (alg == _ALG and self._hs_key) or (alg in _JWKS_ALGS and self.jwks is not None):
            return alg, header
        return None, header

    def _principal(self, token: str, key: Any, alg: str) -> str | None:
        try:
            claims = jwt.decode(token, key, algorithms=[alg], issuer=self._issuer, leeway=self._leeway,
                                options={"require": ["exp"], "verify_aud": False,
                                         "enforce_minimum_key_length": True})
        except jwt.PyJWTError:
            return None
        if self._audiences and not self._audience_ok(claims):
            return None
        user = claims.get(self._user_claim)
        if isinstance(user, bool) or not isinstance(user, (str, int)):
            return None
        user = str(user).strip()
        if not user or len(user) > _MAX_USER_CHARS or not user.isprintable():
            return None
        return "user:" + user

    def _audience_ok(self, claims: dict[str, Any]) -> bool:
        aud = claims.get("aud")
        if aud is None and claims.get("token_use") == "access":
            aud = claims.get("client_id")  # Cognito access tokens name the app client here, not in aud
        auds = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
        return any(isinstance(a, str) and a in self._audiences for a in auds)


def owner_hash(owner: str) -> str:
    """What stores keep: a hash, so an owner's identity is not spread across systems."""
    return hashlib.sha256(owner.encode()).hexdigest()
