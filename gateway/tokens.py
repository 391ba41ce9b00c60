"""Signed resume tokens, receipts and client bearer tokens (JWT, HMAC-SHA256).

A resume token names a conversation and its owner; a receipt carries one final item so a client
can hand it back after a crash. Both are signed with the server secret, which every instance
shares. Any failure reads the same to the caller: None.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import jwt

from protocol.items import Item

_ALG = "HS256"
_RESUME_AUD = "novagate:resume"
_RECEIPT_AUD = "novagate:receipt"


def load_secret(configured: str, path: str) -> bytes:
    """The configured secret, else one generated once and kept (mode 0600) at `path`."""
    if configured:
        return configured.encode()
    p = Path(path)
    if p.exists():
        return p.read_bytes().strip()
    p.parent.mkdir(parents=True, exist_ok=True)
    value = secrets.token_urlsafe(48).encode()
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, value)
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    return value


@dataclass(frozen=True, slots=True)
class ResumeClaim:
    conversation_id: str
    owner: str


class Signer:
    def __init__(self, secret: bytes, *, resume_ttl: int = 86400):
        self._key = hashlib.sha256(b"novagate-signing\0" + secret).digest()
        self.resume_ttl = resume_ttl

    # resume tokens ---------------------------------------------------------------------------
    def resume_token(self, conversation_id: str, owner: str) -> str:
        now = int(time.time())
        claims = {"aud": _RESUME_AUD, "cid": conversation_id, "own": owner, "iat": now, "exp": now + self.resume_ttl}
        return jwt.encode(claims, self._key, algorithm=_ALG)

    def read_resume_token(self, token: str) -> ResumeClaim | None:
        try:
            c = jwt.decode(token, self._key, algorithms=[_ALG], audience=_RESUME_AUD,
                           options={"require": ["exp", "cid", "own"]})
        except (jwt.PyJWTError, TypeError, ValueError):
            return None
        return ResumeClaim(str(c["cid"]), str(c["own"]))

    # receipts --------------------------------------------------------------------------------
    def receipt(self, conversation_id: str, item: Item) -> str:
        claims = {"aud": _RECEIPT_AUD, "cid": conversation_id, "item": item.to_dict()}
        return jwt.encode(claims, self._key, algorithm=_ALG)

    def read_receipt(self, token: str, conversation_id: str) -> Item | None:
        """The item, if this server signed the receipt for this conversation."""
        try:
            c = jwt.decode(token, self._key, algorithms=[_ALG], audience=_RECEIPT_AUD, options={"require": ["cid"]})
            if c["cid"] != conversation_id:
                return None
            item = Item.from_dict(c["item"])
        except (jwt.PyJWTError, KeyError, TypeError, ValueError):
            return None
        return item if item.role in ("user", "assistant") else None


class Authenticator:
    """Verifies client bearer tokens (HS256 JWT); the principal is `user:<sub>`."""

    def __init__(self, key: str):
        self._key = key

    def principal(self, token: str | None) -> str | None:
        if not token or not self._key:
            return None
        try:
            claims = jwt.decode(token, self._key, algorithms=[_ALG], options={"require": ["sub"], "verify_aud": False})
        except jwt.PyJWTError:
            return None
        return "user:" + str(claims["sub"])

    async def verify(self, token: str) -> str | None:
        """The principal of a bearer token, or None when it is not valid."""
        return self.principal(token)


class Credentials:
    """What the session core may ask of the server's keys (protocol.session.Credentials)."""

    def __init__(self, signer: Signer):
        self.read_resume_token = signer.read_resume_token
        self.resume_token = signer.resume_token
        self.receipt = signer.receipt
        self.read_receipt = signer.read_receipt


def owner_hash(owner: str) -> str:
    """What stores keep: a hash, so an owner's identity is not spread across systems."""
    return hashlib.sha256(owner.encode()).hexdigest()
