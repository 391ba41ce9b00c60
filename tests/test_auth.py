"""Client bearer tokens: HS256 and identity providers' keys (JWKS), against a local JWKS endpoint."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import http.server
import json
import logging
import os
import socket
import threading
import time
import uuid

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from gateway.config import ConfigError, Settings
from gateway.tokens import Authenticator, JWKSKeys

HS_KEY = "hs256-test-key-0123456789abcdef-0123456789"
ISS = "https://idp.example.com/pool"
AUD = "client-123"

RSA_A = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_B = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_A = ec.generate_private_key(ec.SECP256R1())


def public_jwk(private_key, kid: str, **extra) -> dict:
    alg = RSAAlgorithm if isinstance(private_key, rsa.RSAPrivateKey) else ECAlgorithm
    d = alg.to_jwk(private_key.public_key(), as_dict=True)
    d.update({"kid": kid, "use": "sig", **extra})
    return d


def claims(**kw) -> dict:
    base = {"sub": "alice", "iss": ISS, "aud": AUD, "iat": int(time.time()), "exp": int(time.time()) + 300}
    base.update(kw)
    return {k: v for k, v in base.items() if v is not None}


def sign(private_key, kid: str | None, alg: str = "RS256", **kw) -> str:
    return jwt.encode(claims(**kw), private_key, algorithm=alg, headers={"kid": kid} if kid else None)


def _b64(b: bytes) -> bytes:
    return base64.urlsafe_b64encode(b).rstrip(b"=")


def forge(header: dict, body: dict, key: bytes | None) -> str:
    """A token assembled by hand: what an attacker would send (HS256 with any key, or alg none)."""
    signing_input = _b64(json.dumps(header).encode()) + b"." + _b64(json.dumps(body).encode())
    sig = hmac.new(key, signing_input, hashlib.sha256).digest() if key is not None else b""
    return (signing_input + b"." + _b64(sig)).decode()


class JWKSServer:
    """A tiny identity provider: GET /jwks.json serves `keys`; counts requests; can be slow or fail."""

    def __init__(self):
        self.keys: list[dict] = []
        self.requests = 0
        self.answered = 0  # responses the server got as far as sending
        self.delay = 0.0
        self.status = 200
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.requests += 1
                if outer.delay:
                    time.sleep(outer.delay)
                outer.answered += 1
                body = json.dumps({"keys": outer.keys}).encode()
                self.send_response(outer.status if self.path == "/jwks.json" else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):
                pass  # a client that gave up (timeout test)

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/jwks.json"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def idp():
    server = JWKSServer()
    server.keys = [public_jwk(RSA_A, "rsa-a"), public_jwk(EC_A, "ec-a")]
    yield server
    server.close()


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def auth_for(idp: JWKSServer, clock=None, **kw) -> Authenticator:
    keys = JWKSKeys(idp.url, clock=clock or time.monotonic, timeout_s=kw.pop("timeout_s", 5.0))
    return Authenticator(kw.pop("key", ""), jwks=keys, **{"audience": AUD, "issuer": ISS, **kw})


# -- identity providers -------------------------------------------------------------------------------
async def test_rs256_and_es256_tokens_from_a_jwks_url(idp):
    auth = Authenticator(jwks_url=idp.url, audience=AUD, issuer=ISS)
    assert await auth.verify(sign(RSA_A, "rsa-a")) == "user:alice"
    assert await auth.verify(sign(EC_A, "ec-a", "ES256", sub="bob")) == "user:bob"
    assert idp.requests == 1  # keys are cached
    assert await auth.verify(sign(RSA_A, "rsa-a", sub="carol")) == "user:carol"
    assert idp.requests == 1


async def test_key_rotation_new_kid_accepted_removed_kid_refused(idp):
    auth = auth_for(idp)
    assert await auth.verify(sign(RSA_A, "rsa-a")) == "user:alice"
    idp.keys = [public_jwk(RSA_B, "rsa-b")]  # the provider rotates: A removed, B added
    assert await auth.verify(sign(RSA_B, "rsa-b")) == "user:alice"  # unknown kid -> refresh -> found
    assert idp.requests == 2
    assert await auth.verify(sign(RSA_A, "rsa-a")) is None  # the removed key no longer verifies
    assert await auth.verify(sign(RSA_A, "rsa-b")) is None  # signed by A, claiming to be B


async def test_removed_key_stops_verifying_when_the_set_ages_out(idp):
    clock = Clock()
    auth = auth_for(idp, clock)
    assert await auth.verify(sign(RSA_A, "rsa-a")) == "user:alice"
    idp.keys = [public_jwk(RSA_B, "rsa-b")]
    clock.t += 3599
    assert await auth.verify(sign(RSA_A, "rsa-a")) == "user:alice"  # cached set still fresh
    clock.t += 2
    assert await auth.verify(sign(RSA_A, "rsa-a")) is None  # re-fetched: A is gone
    assert idp.requests == 2


async def test_unknown_kid_flood_is_rate_limited(idp, caplog):
    caplog.set_level(logging.INFO, logger="novagate.auth")
    clock = Clock()
    auth = auth_for(idp, clock)
    assert await auth.verify(sign(RSA_A, "rsa-a")) == "user:alice"
    flood = [sign(RSA_A, uuid.uuid4().hex) for _ in range(50)]
    assert await asyncio.gather(*(auth.verify(t) for t in flood)) == [None] * 50
    assert idp.requests == 2  # the initial load and ONE refresh for the whole burst
    limited = [r for r in caplog.records if "rate-limited" in r.getMessage()]
    assert len(limited) == 1  # logged once per window, not per token
    clock.t += 10
    idp.keys.append(public_jwk(RSA_B, "rsa-b"))
    assert await auth.verify(sign(RSA_B, "rsa-b")) is None  # still inside the 30 s window
    assert idp.requests == 2
    clock.t += 21
    assert await auth.verify(sign(RSA_B, "rsa-b")) == "user:alice"  # window over: one refresh
    assert idp.requests == 3
    assert await auth.verify(sign(RSA_A, "rsa-a")) == "user:alice"  # known kids never wait


async def test_unreachable_jwks_refuses_and_logs(caplog):
    caplog.set_level(logging.INFO, logger="novagate.auth")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    clock = Clock()
    auth = Authenticator(jwks=JWKSKeys(f"http://127.0.0.1:{port}/jwks.json", clock=clock))
    assert await auth.verify(sign(RSA_A, "rsa-a")) is None
    failures = [r for r in caplog.records if "cannot load the key set" in r.getMessage()]
    assert len(failures) == 1 and failures[0].levelno == logging.WARNING
    assert str(port) in failures[0].fields["source"]
    assert await auth.verify(sign(RSA_A, "rsa-a")) is None
    assert auth.jwks.fetches == 1  # the next attempt waits retry_s
    clock.t += 6
    assert await auth.verify(sign(RSA_A, "rsa-a")) is None
    assert auth.jwks.fetches == 2


async def test_provider_outage_keeps_the_cached_keys(idp):
    clock = Clock()
    auth = auth_for(idp, clock)
    assert await auth.verify(sign(RSA_A, "rsa-a")) == "user:alice"
    idp.status = 503
    clock.t += 4000  # the set is due for a refresh, which fails
    assert await auth.verify(sign(RSA_A, "rsa-a")) == "user:alice"
    assert idp.requests == 2


async def test_jwks_fetch_does_not_block_the_event_loop(idp):
    idp.delay = 0.5
    auth = auth_for(idp)
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    t = asyncio.create_task(ticker())
    try:
        assert await auth.verify(sign(RSA_A, "rsa-a")) == "user:alice"
    finally:
        t.cancel()
    assert ticks >= 10  # the loop kept running while the keys were fetched (0.5 s: ~50 ticks)


async def test_a_fetch_outlives_a_caller_that_gave_up(idp):
    idp.delay = 0.3
    auth = auth_for(idp)
    caller = asyncio.create_task(auth.verify(sign(RSA_A, "rsa-a")))
    await asyncio.sleep(0.05)
    caller.cancel()
    deadline = time.monotonic() + 10
    while auth.jwks._keys is None and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    idp.delay = 0
    assert await auth.verify(sign(RSA_A, "rsa-a")) == "user:alice"
    assert idp.requests == 1  # the first fetch's keys were kept


async def test_slow_jwks_times_out(idp, caplog):
    caplog.set_level(logging.INFO, logger="novagate.auth")
    idp.delay = 10.0
    auth = auth_for(idp, timeout_s=0.3)
    assert await auth.verify(sign(RSA_A, "rsa-a")) is None
    assert idp.requests == 1 and idp.answered == 0  # it gave up at its timeout, before the IdP answered
    assert any("cannot load the key set" in r.getMessage() for r in caplog.records)


async def test_jwks_file_and_its_rotation(tmp_path):
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [public_jwk(EC_A, "ec-a")]}))
    auth = Authenticator(jwks_file=str(path))
    assert await auth.verify(sign(EC_A, "ec-a", "ES256")) == "user:alice"
    path.write_text(json.dumps({"keys": [public_jwk(RSA_B, "rsa-b")]}))
    assert await auth.verify(sign(RSA_B, "rsa-b")) == "user:alice"
    assert await auth.verify(sign(EC_A, "ec-a", "ES256")) is None


# -- what is refused ----------------------------------------------------------------------------------
def _now():
    return int(time.time())


@pytest.mark.parametrize("name, token", [
    ("expired", lambda: sign(RSA_A, "rsa-a", exp=_now() - 120)),
    ("nbf in the future", lambda: sign(RSA_A, "rsa-a", nbf=_now() + 120)),
    ("iat in the future", lambda: sign(RSA_A, "rsa-a", iat=_now() + 120)),
    ("no exp", lambda: sign(RSA_A, "rsa-a", exp=None)),
    ("wrong aud", lambda: sign(RSA_A, "rsa-a", aud="someone-else")),
    ("no aud", lambda: sign(RSA_A, "rsa-a", aud=None)),
    ("wrong iss", lambda: sign(RSA_A, "rsa-a", iss="https://evil.example.com")),
    ("no iss", lambda: sign(RSA_A, "rsa-a", iss=None)),
    ("empty sub", lambda: sign(RSA_A, "rsa-a", sub="")),
    ("blank sub", lambda: sign(RSA_A, "rsa-a", sub="   ")),
    ("no sub", lambda: sign(RSA_A, "rsa-a", sub=None)),
    ("sub with a newline", lambda: sign(RSA_A, "rsa-a", sub="alice\nbob")),
    ("no kid", lambda: sign(RSA_A, None)),
    ("unknown kid", lambda: sign(RSA_A, "nope")),
    ("signed by another key", lambda: sign(RSA_B, "rsa-a")),
    ("alg none", lambda: forge({"alg": "none", "kid": "rsa-a"}, claims(), None)),
    ("alg None", lambda: forge({"alg": "None", "kid": "rsa-a"}, claims(), None)),
    ("HS256 with the RSA public key (PEM)", lambda: forge(
        {"alg": "HS256", "kid": "rsa-a"}, claims(),
        RSA_A.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))),
    ("HS256 with the RSA public key (JWK)", lambda: forge(
        {"alg": "HS256", "kid": "rsa-a"}, claims(), json.dumps(public_jwk(RSA_A, "rsa-a")).encode())),
    ("HS256 with the HS key, JWKS kid", lambda: forge({"alg": "HS256", "kid": "rsa-a"}, claims(), b"x" * 40)),
    ("RS256 header on the EC key", lambda: forge({"alg": "RS256", "kid": "ec-a"}, claims(), b"x")),
    ("RS512", lambda: sign(RSA_A, "rsa-a", "RS512")),
    ("ES256 token naming the RSA kid", lambda: sign(EC_A, "rsa-a", "ES256")),
    ("garbage", lambda: "not.a.jwt"),
    ("empty", lambda: ""),
    ("huge", lambda: "a" * 20000),
])
@pytest.mark.parametrize("with_hs_key", [False, True], ids=["jwks-only", "jwks+hs256"])
async def test_bad_tokens_are_refused(idp, name, token, with_hs_key):
    auth = auth_for(idp, key=HS_KEY if with_hs_key else "", leeway_s=30)
    assert await auth.verify(sign(RSA_A, "rsa-a")) == "user:alice"
    assert await auth.verify(token()) is None, name


async def test_leeway(idp):
    late = sign(RSA_A, "rsa-a", exp=_now() - 10, nbf=_now() + 10)
    assert await auth_for(idp, leeway_s=30).verify(late) == "user:alice"
    assert await auth_for(idp, leeway_s=0).verify(late) is None


async def test_audience_and_issuer_lists(idp):
    auth = auth_for(idp, audience="other, client-123", issuer=f"https://a.example.com,{ISS}")
    assert await auth.verify(sign(RSA_A, "rsa-a", aud=["x", "client-123"])) == "user:alice"
    assert await auth.verify(sign(RSA_A, "rsa-a", aud=["x", "y"])) is None
    unchecked = auth_for(idp, audience="", issuer="")
    assert await unchecked.verify(sign(RSA_A, "rsa-a", aud="anything", iss="anyone")) == "user:alice"


async def test_cognito_access_tokens_carry_client_id(idp):
    auth = auth_for(idp)
    access = sign(RSA_A, "rsa-a", aud=None, token_use="access", client_id=AUD, username="alice")
    assert await auth.verify(access) == "user:alice"
    assert await auth.verify(sign(RSA_A, "rsa-a", aud=None, token_use="access", client_id="other")) is None
    assert await auth.verify(sign(RSA_A, "rsa-a", aud=None, token_use="id", client_id=AUD)) is None


async def test_user_claim(idp):
    auth = auth_for(idp, user_claim="email")
    assert await auth.verify(sign(RSA_A, "rsa-a", email="alice@example.com")) == "user:alice@example.com"
    assert await auth.verify(sign(RSA_A, "rsa-a")) is None  # no email claim
    assert await auth.verify(sign(RSA_A, "rsa-a", email="")) is None


async def test_jwks_keys_that_may_not_sign_are_ignored(idp):
    secret = b"s" * 40
    idp.keys = [public_jwk(RSA_A, "rsa-a"),
                {"kty": "oct", "k": _b64(secret).decode(), "kid": "sym", "alg": "HS256"},
                public_jwk(RSA_B, "enc-b", **{"use": "enc"}),
                public_jwk(RSA_B, "rs512-b", alg="RS512")]
    auth = auth_for(idp)
    assert await auth.verify(sign(RSA_A, "rsa-a")) == "user:alice"
    assert await auth.verify(forge({"alg": "HS256", "kid": "sym"}, claims(), secret)) is None
    assert await auth.verify(sign(RSA_B, "enc-b")) is None
    assert await auth.verify(sign(RSA_B, "rs512-b")) is None
    assert sorted(auth.jwks._keys) == ["rsa-a"]


async def test_hs256_and_jwks_together(idp):
    auth = auth_for(idp, key=HS_KEY)
    assert await auth.verify(jwt.encode(claims(sub="hs"), HS_KEY, algorithm="HS256")) == "user:hs"
    assert await auth.verify(sign(RSA_A, "rsa-a")) == "user:alice"
    assert auth.principal(jwt.encode(claims(sub="hs"), HS_KEY, algorithm="HS256")) == "user:hs"
    assert auth.principal(sign(RSA_A, "rsa-a")) is None  # the sync check is HS256 only


async def test_hs256_only_refuses_rs256():
    auth = Authenticator(HS_KEY)
    assert await auth.verify(sign(RSA_A, "rsa-a")) is None
    assert await auth.verify(jwt.encode(claims(), HS_KEY, algorithm="HS256")) == "user:alice"
    assert await Authenticator().verify(jwt.encode(claims(), HS_KEY, algorithm="HS256")) is None
    assert not Authenticator().enabled and auth.enabled


async def test_verify_never_raises(idp):
    auth = auth_for(idp, key=HS_KEY)
    for bad in (None, "", ".", "..", "a.b.c", "eyJhbGciOiJSUzI1NiJ9..", 12345, b"bytes"):
        assert await auth.verify(bad) is None
    bad_jwks = Authenticator(jwks=JWKSKeys(idp.url))
    idp.keys = [{"kty": "RSA", "n": "!!", "e": "AQAB", "kid": "rsa-a"}]
    assert await bad_jwks.verify(sign(RSA_A, "rsa-a")) is None


# -- settings -------------------------------------------------------------------------------------
def test_short_hs256_key_is_refused():
    with pytest.raises(ConfigError, match="at least 32 bytes.*token_urlsafe"):
        Authenticator("short-key")
    with pytest.raises(ConfigError, match="NOVAGATE_AUTH_JWT_SECRET is 9 bytes"):
        Settings.from_env({"NOVAGATE_AUTH_JWT_SECRET": "short-key"})


@pytest.mark.parametrize("env, needle", [
    ({"NOVAGATE_AUTH_JWKS_URL": "http://idp.example.com/jwks.json"}, "https"),
    ({"NOVAGATE_AUTH_JWKS_URL": "file:///etc/passwd"}, "https"),
    ({"NOVAGATE_AUTH_JWKS_URL": "https://a/j", "NOVAGATE_AUTH_JWKS_FILE": "j.json"}, "not both"),
    ({"NOVAGATE_AUTH_JWT_SECRET": "k" * 32, "NOVAGATE_AUTH_JWT_SECRET_FILE": "f"}, "not both"),
    ({"NOVAGATE_AUTH_LEEWAY_S": "-1"}, "NOVAGATE_AUTH_LEEWAY_S"),
    ({"NOVAGATE_AUTH_LEEWAY_S": "3600"}, "NOVAGATE_AUTH_LEEWAY_S"),
    ({"NOVAGATE_AUTH_USER_CLAIM": " "}, "NOVAGATE_AUTH_USER_CLAIM"),
    ({"NOVAGATE_AUTH_JWKS_TIMEOUT_S": "0"}, "NOVAGATE_AUTH_JWKS_TIMEOUT_S"),
])
def test_bad_auth_settings(env, needle):
    with pytest.raises(ConfigError, match=needle):
        Settings.from_env(env)


async def test_authenticator_from_settings(idp, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="novagate.auth")
    key_file = tmp_path / "jwt-key"
    key_file.write_text(HS_KEY + "\n")
    os.chmod(key_file, 0o600)
    s = Settings.from_env({"NOVAGATE_AUTH_JWT_SECRET_FILE": str(key_file), "NOVAGATE_AUTH_JWKS_URL": idp.url,
                           "NOVAGATE_AUTH_AUDIENCE": AUD, "NOVAGATE_AUTH_ISSUER": ISS,
                           "NOVAGATE_AUTH_USER_CLAIM": "uid", "NOVAGATE_AUTH_LEEWAY_S": "0"})
    auth = Authenticator.from_settings(s)
    assert await auth.verify(jwt.encode(claims(uid="u1"), HS_KEY, algorithm="HS256")) == "user:u1"
    assert await auth.verify(sign(RSA_A, "rsa-a", uid="u2")) == "user:u2"
    assert await auth.verify(sign(RSA_A, "rsa-a", exp=_now() - 1)) is None  # leeway 0
    assert not any("readable by other" in r.getMessage() for r in caplog.records)
    os.chmod(key_file, 0o644)
    Authenticator.from_settings(s)
    assert any("readable by other" in r.getMessage() for r in caplog.records)
    key_file.write_text("too-short\n")
    with pytest.raises(ConfigError, match="NOVAGATE_AUTH_JWT_SECRET_FILE.*at least 32 bytes"):
        Authenticator.from_settings(s)
    with pytest.raises(ConfigError, match="cannot read"):
        Authenticator.from_settings(Settings.from_env({"NOVAGATE_AUTH_JWT_SECRET_FILE": str(tmp_path / "none")}))


def test_secrets_are_not_in_the_settings_repr():
    s = Settings.from_env({"NOVAGATE_SECRET": "S" * 40, "NOVAGATE_AUTH_JWT_SECRET": "J" * 40})
    assert "S" * 40 not in repr(s) and "J" * 40 not in repr(s)
