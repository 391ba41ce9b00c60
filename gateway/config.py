"""Settings: every field is an environment variable `NOVAGATE_<NAME>` and, except secrets, a `novagate serve` flag."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from protocol.nova_events import DEFAULT_MODEL_ID, IDLE_TIMEOUT_S, MAX_STREAM_AGE_S, NOVA_SONIC_V1_MODEL_ID
from protocol.usage import Prices

_PRICES = Prices()  # the defaults of NOVAGATE_PRICE_*

DEFAULT_SYSTEM_PROMPT = (
    "You are a friendly, concise voice assistant. Keep answers short and conversational; "
    "remember what the user told you earlier in the conversation."
)


MIN_SECRET_BYTES = 32
# CreateSession's encryptionKeyArn (the service model's pattern), the region captured
KMS_KEY_ARN_RE = re.compile(r"^arn:aws(|-cn|-us-gov):kms:(?P<region>[a-zA-Z0-9-]*):[0-9]{12}:key/[a-zA-Z0-9-]{36}$")
MAKE_SECRET = "python -c 'import secrets; print(secrets.token_urlsafe(48))'"


class ConfigError(Exception):
    """A setting is missing or wrong; the message says which and how to fix it."""


@dataclass(frozen=True)
class Settings:
    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on"})
    port: int = field(default=8000, metadata={"help": "port to listen on"})
    engine: str = field(
        default="local", metadata={"help": "model engine: local (offline stand-in) | scripted (the local engine with "
                                   "canned replies and no speech models, for load tests) | bedrock (Nova Sonic)",
                                   "choices": ("local", "scripted", "bedrock")}
    )
    store: str = field(
        default="sqlite", metadata={"help": "conversation store: sqlite | agent-runtime (Bedrock Agent Runtime "
                                    "sessions)", "choices": ("sqlite", "agent-runtime")}
    )
    sqlite_path: str = field(default="var/novagate.db", metadata={"help": "SQLite file of the sqlite store"})
    model_id: str = field(
        default=DEFAULT_MODEL_ID, metadata={"help": f"Nova Sonic model id (engine bedrock): amazon.nova-2-5-sonic, "
                                            f"{DEFAULT_MODEL_ID}, or the legacy {NOVA_SONIC_V1_MODEL_ID} (no text "
                                            "input); an id not in the catalog gets Nova 2 defaults (docs/aws.md)"}
    )
    history_max_bytes: int = field(
        default=0, metadata={"help": "history text one model stream is given, in bytes; 0: the model's limit "
                             "(200 KB for Nova 2-class models, 40 KB for the legacy one)"}
    )
    history_message_max_bytes: int = field(
        default=0, metadata={"help": "one history message, in bytes (a longer one keeps its newest part); 0: the "
                             "model's limit (50 KB for Nova 2-class models)"}
    )
    endpointing_sensitivity: str = field(
        default="", metadata={"help": "Nova 2 turn-taking: HIGH (1.5 s pause) | MEDIUM | LOW (2 s); empty: the "
                              "model's default", "choices": ("", "HIGH", "MEDIUM", "LOW")}
    )
    region: str = field(
        default="", metadata={"help": "AWS region (default: AWS_REGION / AWS_DEFAULT_REGION)"}
    )
    bedrock_endpoint: str = field(
        default="", metadata={"help": "Bedrock Runtime endpoint URL (default: AWS_ENDPOINT_URL_BEDROCK_RUNTIME, "
                              "else the region's)"}
    )
    bedrock_streams_per_connection: int = field(
        default=100, metadata={"help": "model streams one HTTP/2 connection to Bedrock carries (the service's "
                               "SETTINGS_MAX_CONCURRENT_STREAMS); the next stream opens another connection"}
    )
    agent_runtime_endpoint: str = field(
        default="", metadata={"help": "Bedrock Agent Runtime endpoint URL (default: "
                              "AWS_ENDPOINT_URL_BEDROCK_AGENT_RUNTIME, else the region's)"}
    )
    agent_runtime_kms_key_arn: str = field(
        default="", metadata={"help": "customer-managed KMS key (its ARN, in the gateway's region) that encrypts the "
                              "Agent Runtime sessions the gateway creates (CreateSession encryptionKeyArn); the role "
                              "needs the KMS statement of docs/iam.md; empty: an AWS-managed key"}
    )
    preflight: bool = field(
        default=True, metadata={"help": "at start (engine bedrock, store agent-runtime): prove the AWS permissions "
                                "with read-only probes and one Nova Sonic stream (docs/iam.md); a missing permission "
                                "stops the start (exit 2), an unreachable service is a warning"}
    )
    preflight_timeout_s: float = field(
        default=10.0, metadata={"help": "seconds the start-up permission check may take in all; a check still "
                                "unanswered then is a warning"}
    )
    # Secrets are never flags (a command line is visible in `ps`): environment or files only.
    secret: str = field(
        default="", repr=False,
        metadata={"secret": True, "help": "server secret (at least 32 bytes) that signs resume tokens and "
                  "receipts (default: generated once and kept in the secret file); set the same value on "
                  "every instance"}
    )
    secret_file: str = field(
        default="var/secret", metadata={"help": "file of the server secret when NOVAGATE_SECRET is unset; "
                                        "created (mode 0600) if missing"}
    )
    secret_previous: str = field(
        default="", repr=False,
        metadata={"secret": True, "help": "comma-separated earlier server secrets, during a rotation: resume tokens "
                  "and receipts signed with them still verify, nothing new is signed with them; keep them at least "
                  "NOVAGATE_RESUME_TTL after the new secret is everywhere, then remove them"}
    )
    secret_previous_file: str = field(
        default="", metadata={"help": "file of earlier server secrets, one per line, instead of "
                              "NOVAGATE_SECRET_PREVIOUS"}
    )
    auth_jwt_secret: str = field(
        default="", repr=False,
        metadata={"secret": True, "help": "HS256 key (at least 32 bytes) that verifies client bearer tokens "
                  "(JWT); empty with no JWKS: no user authentication"}
    )
    auth_jwt_secret_file: str = field(
        default="", metadata={"help": "file holding the HS256 key, instead of NOVAGATE_AUTH_JWT_SECRET"}
    )
    auth_jwks_url: str = field(
        default="", metadata={"help": "identity provider's JWKS URL: RS256/ES256 bearer tokens (Cognito, "
                              "Auth0, Okta, Keycloak); https (http only on loopback)"}
    )
    auth_jwks_file: str = field(
        default="", metadata={"help": "a JWKS file instead of a URL (RS256/ES256 bearer tokens)"}
    )
    auth_jwks_timeout_s: float = field(default=5.0, metadata={"help": "timeout of one JWKS fetch"})
    auth_audience: str = field(
        default="", metadata={"help": "comma-separated accepted `aud` values (e.g. the app client id); "
                              "empty: not checked"}
    )
    auth_issuer: str = field(
        default="", metadata={"help": "comma-separated accepted `iss` values; empty: not checked"}
    )
    auth_user_claim: str = field(
        default="sub", metadata={"help": "claim that identifies the user (principal `user:<value>`)"}
    )
    auth_leeway_s: float = field(
        default=30.0, metadata={"help": "clock skew allowed on exp / nbf / iat"}
    )
    auth_required: bool = field(default=False, metadata={"help": "refuse clients without a valid bearer token (4401)"})
    allowed_origins: str = field(
        default="", metadata={"help": "comma-separated Origin allow-list; requests without Origin and same-host "
                              "origins are always allowed; `*` allows any"}
    )
    max_sessions: int = field(default=200, metadata={"help": "concurrent sessions before new sockets get 1013"})
    # -- admission, HTTP limits, hosts, metrics (gateway/admission.py, gateway/web.py, gateway/server.py)
    max_pending_handshakes: int = field(
        default=64, metadata={"help": "sockets still in their handshake (no session.start and credentials yet); "
                              "past it a new one gets 1013 `busy` unless an address holding more handshakes "
                              "gives up its oldest; 0: no cap"}
    )
    max_sockets_per_ip: int = field(
        default=20, metadata={"help": "sockets per client address (4429); behind a proxy set "
                              "NOVAGATE_FORWARDED_ALLOW_IPS or every client shares the proxy's address; 0: no cap"}
    )
    max_sessions_per_user: int = field(
        default=5, metadata={"help": "live sessions per authenticated user (4429); anonymous clients are capped "
                             "per address only; 0: no cap"}
    )
    # -- workers and overload (gateway/workers.py, gateway/health.py; docs/operations.md)
    workers: int = field(
        default=0, metadata={"help": "worker processes sharing the listening socket (a supervisor binds it, serves "
                             "the admin port and restarts workers that die); 0: one per CPU the process may use; "
                             "1: one process, no supervisor"}
    )
    overload_lag_ms: float = field(
        default=50.0, metadata={"help": "event-loop lag (median over about 1 s) past which a worker refuses new "
                                "sockets (1013, error overloaded with retry_after_ms); 0: not checked"}
    )
    overload_cpu: float = field(
        default=0.7, metadata={"help": "CPU of a worker process in cores (over 2 s) past which it refuses new "
                                "sockets (1013 overloaded); 0: not checked"}
    )
    forwarded_allow_ips: str = field(
        default="", metadata={"help": "comma-separated proxy addresses or networks (10.0.0.0/8; `*`: any) whose "
                              "X-Forwarded-For / X-Forwarded-Proto name the client; empty: none trusted"}
    )
    allowed_hosts: str = field(
        default="", metadata={"help": "comma-separated Host names the gateway answers to (`*.example.com` for "
                              "subdomains; `*`: any, no DNS-rebinding protection); empty: localhost, 127.0.0.1 "
                              "and [::1] when listening on loopback, else required"}
    )
    limit_concurrency: int = field(
        default=0, metadata={"help": "open connections (sockets included) past which HTTP requests get 503; "
                             "0: max_sessions + max_pending_handshakes + 100"}
    )
    keep_alive_timeout: int = field(default=5, metadata={"help": "seconds an idle HTTP keep-alive connection stays "
                                                         "open"})
    header_timeout: float = field(
        default=10.0, metadata={"help": "seconds a connection has to send a complete request after it opens or "
                                "after its previous response (slow clients are closed); 0: no limit"}
    )
    ws_ping_interval: float = field(default=20.0, metadata={"help": "seconds between WebSocket pings; 0: none"})
    ws_ping_timeout: float = field(
        default=20.0, metadata={"help": "seconds to wait for a pong before closing a dead socket; 0: no limit"}
    )
    metrics_host: str = field(default="127.0.0.1", metadata={"help": "address of the /metrics (admin) port"})
    metrics_port: int = field(
        default=9090, metadata={"help": "port serving /metrics only, apart from the clients' port; 0: no admin "
                                "port, /metrics on the serving port instead"}
    )
    handshake_timeout: float = field(default=5.0, metadata={"help": "seconds to wait for session.start (4408)"})
    resume_ttl: int = field(default=86400, metadata={"help": "seconds a resume token stays valid"})
    conversation_ttl: int = field(
        default=30 * 86400, metadata={"help": "seconds after a conversation starts when no resume token for it is "
                                      "valid any more, however often it was resumed (absolute lifetime)"}
    )
    playback_lead_ms: int = field(default=200, metadata={"help": "audio sent ahead of real time to the client"})
    truncate_wait_ms: int = field(
        default=1000, metadata={"help": "how long to wait for playback.truncate after a barge-in"}
    )
    rotate_after_s: float = field(
        default=360.0, metadata={"help": f"rotate a model stream from this age (Nova's cap is {MAX_STREAM_AGE_S:g} s), "
                                 "at a quiet moment"}
    )
    rotate_force_after_s: float = field(
        default=450.0, metadata={"help": "stream age at which the hand-over no longer waits for a quiet moment"}
    )
    idle_timeout_s: float = field(
        default=300.0, metadata={"help": "a ready session whose client sends no message and no speech this long is "
                                 "closed (4410, error idle_timeout); the conversation stays resumable"}
    )
    max_items_per_conversation: int = field(
        default=10_000, metadata={"help": "items a conversation may hold; at the cap the session closes 4429 with "
                                  "a fatal conversation_full"}
    )
    deaf_stream_s: float = field(
        default=6.0, metadata={"help": "a new model stream that says nothing this long after user speech is "
                               "replaced (and the speech replayed to the next one)"}
    )
    drain_grace_s: float = field(
        default=25.0, metadata={"help": "on SIGTERM: seconds to drain sessions before the process exits"}
    )
    local_idle_timeout_s: float = field(
        default=IDLE_TIMEOUT_S, metadata={"help": "local / scripted engine: no audio this long ends a stream (as "
                                          "Nova's 531)"}
    )
    local_input_gap_s: float = field(
        default=55.0, metadata={"help": "local / scripted engine: no audio and no interactive content (typed text, "
                                "a tool result) this long ends a stream (as Nova's 532); 0: off"}
    )
    local_max_stream_s: float = field(
        default=MAX_STREAM_AGE_S, metadata={"help": "local / scripted engine: stream age cap (as Nova's "
                                            "modelTimeoutException)"}
    )
    system_prompt: str = field(default=DEFAULT_SYSTEM_PROMPT, metadata={"help": "system prompt given to the model"})
    voice: str = field(default="matthew", metadata={"help": "default voice"})
    local_asr: str = field(
        default="whisper", metadata={"help": "local engine speech recognition: whisper | sphinx",
                                     "choices": ("whisper", "sphinx")}
    )
    local_tts: str = field(
        default="hibari", metadata={"help": "local engine speech synthesis: hibari | espeak",
                                    "choices": ("hibari", "espeak")}
    )
    local_grammar: str = field(
        default="", metadata={"help": "sphinx only: `|`-separated phrases to recognise (deterministic tests)"}
    )
    local_endpoint_ms: int = field(
        default=700, metadata={"help": "local / scripted engine: silence that ends a user turn"}
    )
    scripted_reply: str = field(
        default="", metadata={"help": "scripted engine: the reply to every turn, spoken sentence by sentence; empty: "
                              "a built-in two-sentence reply"}
    )
    scripted_reply_s: float = field(
        default=2.0, metadata={"help": "scripted engine: seconds of reply audio (a quiet tone, shared among the "
                               "reply's sentences by length)"}
    )
    scripted_transcripts: str = field(
        default="", metadata={"help": "scripted engine: `|`-separated user transcripts, cycled per stream; empty: "
                              "`utterance N`"}
    )
    scripted_energy_db: float = field(
        default=-40.0, metadata={"help": "scripted engine: a 30 ms input frame whose RMS is above this (dBFS) is "
                                 "speech"}
    )
    engine_tool_calls: str = field(
        default="", metadata={"help": "local / scripted engine: call a tool when the user says a phrase: a JSON list "
                              '(or @path of a JSON file) of {"phrase", "tool", "arguments", "filler"} objects; '
                              "the tool must be declared by the stream (docs/local-engine.md)"}
    )
    engine_trace: str = field(
        default="", metadata={"help": "debug: a JSONL file recording every input event the local (or scripted) "
                              "engine receives (contains text)"}
    )
    # -- tools the model may call (gateway/tools; docs/tools.md)
    mcp_config: str = field(
        default="", metadata={"help": 'JSON file of MCP servers whose tools the model may call ({"mcpServers": '
                              '{name: {"command", "args", "env"} | {"url", "headers"}}}, docs/tools.md)'}
    )
    tools: str = field(
        default="", metadata={"help": "Python tools: comma-separated package.module:attribute (a function or a "
                              "list of functions; docs/tools.md)"}
    )
    tool_timeout_s: float = field(
        default=20.0, metadata={"help": "seconds one tool call may take; past it the model is told it timed out"}
    )
    realtime: bool = field(
        default=True, metadata={"help": "serve the OpenAI Realtime-compatible endpoint /v1/realtime "
                                "(docs/realtime-compat.md)"}
    )
    realtime_client_instructions: bool = field(
        default=True, metadata={"help": "/v1/realtime: a client's session.update may replace the system prompt "
                                "(instructions); false: the server's prompt stays and they are refused with an error"}
    )
    # -- usage and cost (protocol/usage.py, docs/usage.md): USD per 1,000 tokens, and a per-user budget
    price_input_speech: float = field(
        default=_PRICES.input_speech, metadata={"help": "USD per 1,000 speech input tokens (the cost metrics and budget)"})
    price_input_text: float = field(
        default=_PRICES.input_text, metadata={"help": "USD per 1,000 text input tokens"})
    price_output_speech: float = field(
        default=_PRICES.output_speech, metadata={"help": "USD per 1,000 speech output tokens"})
    price_output_text: float = field(
        default=_PRICES.output_text, metadata={"help": "USD per 1,000 text output tokens"})
    user_budget_usd: float = field(
        default=0.0, metadata={"help": "what one authenticated user may spend per budget period, in USD (0: no "
                               "budget); past it new sessions are refused and live ones end (4402 budget_exceeded)"})
    user_budget_period: str = field(
        default="day", metadata={"help": "the budget's period: day or month (UTC)", "choices": ("day", "month")})
    usage_metrics_by_user: bool = field(
        default=False, metadata={"help": "also count tokens per user (novagate_user_tokens_total{user=<owner hash>}): "
                                 "one series per user, so only for a bounded number of users"})
    # -- telephony: Twilio Media Streams, /v1/telephony/twilio (gateway/telephony.py, docs/telephony.md)
    twilio_auth_token: str = field(
        default="", repr=False,
        metadata={"secret": True, "help": "the Twilio account's Auth Token: /v1/telephony/twilio is served and every "
                  "handshake's X-Twilio-Signature is checked with it (403 otherwise); empty: the endpoint is not "
                  "served, unless NOVAGATE_TWILIO_INSECURE"}
    )
    twilio_auth_token_file: str = field(
        default="", metadata={"help": "file holding the Twilio Auth Token, instead of NOVAGATE_TWILIO_AUTH_TOKEN"}
    )
    twilio_public_url: str = field(
        default="", metadata={"help": "the stream URL exactly as in the TwiML (wss://voice.example.com/v1/telephony/"
                              "twilio): the URL Twilio signs, for when a proxy changes the host or the path; empty: "
                              "wss:// with the request's Host and path"}
    )
    twilio_caller_parameter: str = field(
        default="caller", metadata={"help": "the <Parameter> of the TwiML <Stream> that names the caller "
                                    "(value=\"{{From}}\"): their E.164 number owns the conversation"}
    )
    twilio_resume_window_s: float = field(
        default=1800.0, metadata={"help": "a call from the same number within this many seconds of its conversation's "
                                  "last activity resumes it; later, or 0, a new conversation"}
    )
    twilio_insecure: bool = field(
        default=False, metadata={"help": "development only: serve /v1/telephony/twilio without an Auth Token, with no "
                                 "signature check (anyone reaching it can call as any number and hear that number's "
                                 "recent conversation)"}
    )
    log_level: str = field(default="info", metadata={"help": "debug | info | warning | error"})
    log_transcripts: bool = field(
        default=False, metadata={"help": "debug: put transcripts in logs (off: redacted)"}
    )

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: Any) -> Settings:
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = env.get("NOVAGATE_" + f.name.upper())
            if raw is not None:
                values[f.name] = _convert(f, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ConfigError(
                    f"NOVAGATE_{f.name.upper()}={getattr(self, f.name)!r} is not one of {', '.join(choices)}"
                )
        if not 0 < self.port < 65536:
            raise ConfigError(f"NOVAGATE_PORT={self.port} is not a valid port")
        if not 0 <= self.workers <= 256:
            raise ConfigError(f"NOVAGATE_WORKERS={self.workers} must be between 0 (one per CPU) and 256")
        if self.overload_lag_ms < 0 or self.overload_cpu < 0:
            raise ConfigError("NOVAGATE_OVERLOAD_LAG_MS and NOVAGATE_OVERLOAD_CPU must be >= 0 (0: not checked)")
        if self.bedrock_streams_per_connection < 1:
            raise ConfigError(f"NOVAGATE_BEDROCK_STREAMS_PER_CONNECTION={self.bedrock_streams_per_connection} must be >= 1")
        for name in ("history_max_bytes", "history_message_max_bytes"):
            if getattr(self, name) and not 1024 <= getattr(self, name) <= 10 * 1024 * 1024:
                raise ConfigError(f"NOVAGATE_{name.upper()}={getattr(self, name)} must be 0 (the model's) or "
                                  "between 1024 and 10485760 bytes")
        for name in ("price_input_speech", "price_input_text", "price_output_speech", "price_output_text",
                     "user_budget_usd"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"NOVAGATE_{name.upper()}={getattr(self, name)} must be >= 0")
        if self.user_budget_period not in ("day", "month"):
            raise ConfigError(f"NOVAGATE_USER_BUDGET_PERIOD={self.user_budget_period!r}: day or month")
        if not self.tool_timeout_s > 0:
            raise ConfigError(f"NOVAGATE_TOOL_TIMEOUT_S={self.tool_timeout_s} must be > 0 seconds")
        if self.local_input_gap_s < 0:
            raise ConfigError(f"NOVAGATE_LOCAL_INPUT_GAP_S={self.local_input_gap_s} must be >= 0 seconds (0: off)")
        self._validate_auth()
        self._validate_scripted()
        self._validate_twilio()
        if (self.engine == "bedrock" or self.store == "agent-runtime") and not self.aws_region:
            raise ConfigError(
                f"NOVAGATE_ENGINE={self.engine} / NOVAGATE_STORE={self.store} need an AWS region: set "
                "NOVAGATE_REGION or AWS_REGION (Nova 2 Sonic: us-east-1, us-west-2, ap-northeast-1)"
            )
        if not 0 < self.preflight_timeout_s <= 120:
            raise ConfigError(f"NOVAGATE_PREFLIGHT_TIMEOUT_S={self.preflight_timeout_s} must be in (0, 120] seconds")
        if self.agent_runtime_kms_key_arn:
            m = KMS_KEY_ARN_RE.match(self.agent_runtime_kms_key_arn)
            if m is None:
                raise ConfigError(
                    f"NOVAGATE_AGENT_RUNTIME_KMS_KEY_ARN={self.agent_runtime_kms_key_arn!r} is not a KMS key ARN "
                    "(arn:aws:kms:REGION:ACCOUNT:key/KEY_ID, the key's id or an mrk- multi-Region id; not an alias)"
                )
            if self.aws_region and m.group("region") != self.aws_region:
                raise ConfigError(
                    f"NOVAGATE_AGENT_RUNTIME_KMS_KEY_ARN is a key in {m.group('region') or 'no region'}; the sessions "
                    f"are in {self.aws_region}: use a key (or a multi-Region replica) in {self.aws_region}"
                )

    def _validate_scripted(self) -> None:
        if not 0 < self.scripted_reply_s <= 600:
            raise ConfigError(f"NOVAGATE_SCRIPTED_REPLY_S={self.scripted_reply_s} must be in (0, 600] seconds")
        if not -100 < self.scripted_energy_db < 0:
            raise ConfigError(f"NOVAGATE_SCRIPTED_ENERGY_DB={self.scripted_energy_db} must be between -100 and 0 dBFS")
        if self.scripted_reply and not self.scripted_reply.strip():
            raise ConfigError("NOVAGATE_SCRIPTED_REPLY is blank; leave it unset for the built-in reply")
        if self.engine_tool_calls:
            from .local.backends import parse_tool_calls

            try:
                parse_tool_calls(self.engine_tool_calls)
            except (ValueError, OSError) as e:
                raise ConfigError(f"NOVAGATE_ENGINE_TOOL_CALLS: {e}") from None

    def _validate_twilio(self) -> None:
        if self.twilio_auth_token and self.twilio_auth_token_file:
            raise ConfigError("set NOVAGATE_TWILIO_AUTH_TOKEN or NOVAGATE_TWILIO_AUTH_TOKEN_FILE, not both")
        if self.twilio_public_url:
            url = urlsplit(self.twilio_public_url)
            if url.scheme != "wss" or not url.hostname or url.query or url.fragment:
                raise ConfigError(f"NOVAGATE_TWILIO_PUBLIC_URL={self.twilio_public_url!r} must be the wss:// URL of the "
                                  "TwiML <Stream> (no query string: Twilio allows none), e.g. "
                                  "wss://voice.example.com/v1/telephony/twilio")
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", self.twilio_caller_parameter):
            raise ConfigError(f"NOVAGATE_TWILIO_CALLER_PARAMETER={self.twilio_caller_parameter!r} must be 1-64 letters, "
                              "digits, '_', '.' or '-'")
        if not 0 <= self.twilio_resume_window_s <= self.conversation_ttl:
            raise ConfigError(f"NOVAGATE_TWILIO_RESUME_WINDOW_S={self.twilio_resume_window_s} must be between 0 (never "
                              f"resume) and NOVAGATE_CONVERSATION_TTL ({self.conversation_ttl}) seconds")

    def _validate_auth(self) -> None:
        for name in ("secret", "auth_jwt_secret"):
            value = getattr(self, name).encode()
            if value and len(value) < MIN_SECRET_BYTES:
                raise ConfigError(
                    f"NOVAGATE_{name.upper()} is {len(value)} bytes; a secret must be at least {MIN_SECRET_BYTES} "
                    f"bytes. Make one with: {MAKE_SECRET}"
                )
        for i, value in enumerate(self.secret_previous.split(",") if self.secret_previous.strip() else ()):
            if len(value.strip().encode()) < MIN_SECRET_BYTES:
                raise ConfigError(f"NOVAGATE_SECRET_PREVIOUS: secret {i + 1} is {len(value.strip().encode())} bytes; "
                                  f"each must be at least {MIN_SECRET_BYTES} bytes (comma-separated, no empty entry)")
        if self.secret_previous and self.secret_previous_file:
            raise ConfigError("set NOVAGATE_SECRET_PREVIOUS or NOVAGATE_SECRET_PREVIOUS_FILE, not both")
        if self.auth_jwt_secret and self.auth_jwt_secret_file:
            raise ConfigError("set NOVAGATE_AUTH_JWT_SECRET or NOVAGATE_AUTH_JWT_SECRET_FILE, not both")
        if self.auth_jwks_url and self.auth_jwks_file:
            raise ConfigError("set NOVAGATE_AUTH_JWKS_URL or NOVAGATE_AUTH_JWKS_FILE, not both")
        if self.auth_jwks_url:
            url = urlsplit(self.auth_jwks_url)
            loopback = url.hostname in ("localhost", "127.0.0.1", "::1")
            if not url.hostname or not (url.scheme == "https" or (url.scheme == "http" and loopback)):
                raise ConfigError(
                    f"NOVAGATE_AUTH_JWKS_URL={self.auth_jwks_url!r} must be an https:// URL (http only on loopback)"
                )
        if not self.auth_user_claim.strip():
            raise ConfigError("NOVAGATE_AUTH_USER_CLAIM must name a claim (default: sub)")
        if not 0 <= self.auth_leeway_s <= 300:
            raise ConfigError(f"NOVAGATE_AUTH_LEEWAY_S={self.auth_leeway_s} must be between 0 and 300 seconds")
        if not 0 < self.auth_jwks_timeout_s <= 60:
            raise ConfigError(f"NOVAGATE_AUTH_JWKS_TIMEOUT_S={self.auth_jwks_timeout_s} must be in (0, 60] seconds")

    @property
    def aws_region(self) -> str:
        return self.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or ""

    @property
    def origins(self) -> tuple[str, ...]:
        return tuple(o.strip() for o in self.allowed_origins.split(",") if o.strip())

    @property
    def grammar(self) -> tuple[str, ...]:
        return tuple(p.strip() for p in self.local_grammar.split("|") if p.strip())


def _convert(f: dataclasses.Field, raw: str) -> Any:
    kind = f.type if isinstance(f.type, str) else f.type.__name__
    try:
        if kind == "bool":
            if raw.strip().lower() in ("1", "true", "yes", "on"):
                return True
            if raw.strip().lower() in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(raw)
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
    except ValueError:
        raise ConfigError(f"NOVAGATE_{f.name.upper()}={raw!r} is not a valid {kind}") from None
    return raw


class _RefuseSecretFlag(argparse.Action):
    """A secret given as a flag: refused with a pointer to the environment or the file. The flag
    exists so argparse does not read `--secret X` as an abbreviation of `--secret-file X`."""

    def __call__(self, parser, namespace, values, option_string=None):
        name = self.dest
        parser.error(f"{option_string} is not accepted: a command line is visible to every user (ps). "
                     f"Set NOVAGATE_{name.upper()} in the environment, or use --{name.replace('_', '-')}-file")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting, except secrets (environment or files only); flags override the environment."""
    for f in dataclasses.fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        if f.metadata.get("secret"):
            parser.add_argument(flag, dest=f.name, nargs="?", action=_RefuseSecretFlag, default=None,
                                help=argparse.SUPPRESS)
            continue
        kind = f.type if isinstance(f.type, str) else f.type.__name__
        help_ = f"{f.metadata.get('help', '')} (env NOVAGATE_{f.name.upper()}, default {f.default!r})"
        if kind == "bool":
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_)
        else:
            conv = {"int": int, "float": float}.get(kind, str)
            parser.add_argument(flag, dest=f.name, type=conv, default=None, help=help_,
                                choices=f.metadata.get("choices"))


def settings_from_args(args: argparse.Namespace) -> Settings:
    return Settings.from_env(**{f.name: getattr(args, f.name, None) for f in dataclasses.fields(Settings)})
