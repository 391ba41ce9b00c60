"""Settings: every field is an environment variable `NOVAGATE_<NAME>` and a `novagate serve` flag."""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from protocol.nova_events import DEFAULT_MODEL_ID, IDLE_TIMEOUT_S, MAX_STREAM_AGE_S, NOVA_SONIC_V1_MODEL_ID

DEFAULT_SYSTEM_PROMPT = (
    "You are a friendly, concise voice assistant. Keep answers short and conversational; "
    "remember what the user told you earlier in the conversation."
)


class ConfigError(Exception):
    """A setting is missing or wrong; the message says which and how to fix it."""


@dataclass(frozen=True)
class Settings:
    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on"})
    port: int = field(default=8000, metadata={"help": "port to listen on"})
    engine: str = field(
        default="local", metadata={"help": "model engine: local (offline stand-in) | bedrock (Nova Sonic)",
                                   "choices": ("local", "bedrock")}
    )
    store: str = field(
        default="sqlite", metadata={"help": "conversation store: sqlite | agent-runtime (Bedrock Agent Runtime "
                                    "sessions)", "choices": ("sqlite", "agent-runtime")}
    )
    sqlite_path: str = field(default="var/novagate.db", metadata={"help": "SQLite file of the sqlite store"})
    model_id: str = field(
        default=DEFAULT_MODEL_ID, metadata={"help": f"Nova Sonic model id (engine bedrock); {NOVA_SONIC_V1_MODEL_ID} "
                                            "is supported without text input"}
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
    agent_runtime_endpoint: str = field(
        default="", metadata={"help": "Bedrock Agent Runtime endpoint URL (default: "
                              "AWS_ENDPOINT_URL_BEDROCK_AGENT_RUNTIME, else the region's)"}
    )
    secret: str = field(
        default="", metadata={"help": "server secret that signs resume tokens and receipts (default: generated once "
                              "and kept in var/secret); set the same value on every instance"}
    )
    secret_file: str = field(default="var/secret", metadata={"help": "where a generated secret is kept"})
    auth_jwt_secret: str = field(
        default="", metadata={"help": "HS256 key that verifies client bearer tokens (JWT, owner = `sub`); "
                              "empty: no user authentication"}
    )
    auth_required: bool = field(default=False, metadata={"help": "refuse clients without a valid bearer token (4401)"})
    allowed_origins: str = field(
        default="", metadata={"help": "comma-separated Origin allow-list; requests without Origin and same-host "
                              "origins are always allowed; `*` allows any"}
    )
    max_sessions: int = field(default=200, metadata={"help": "concurrent sessions before new sockets get 1013"})
    handshake_timeout: float = field(default=5.0, metadata={"help": "seconds to wait for session.start (4408)"})
    resume_ttl: int = field(default=86400, metadata={"help": "seconds a resume token stays valid"})
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
        default=IDLE_TIMEOUT_S, metadata={"help": "local engine: no audio this long ends a stream (as Nova's 531)"}
    )
    local_max_stream_s: float = field(
        default=MAX_STREAM_AGE_S, metadata={"help": "local engine: stream age cap (as Nova's modelTimeoutException)"}
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
    local_endpoint_ms: int = field(default=700, metadata={"help": "local engine: silence that ends a user turn"})
    engine_trace: str = field(
        default="", metadata={"help": "debug: a JSONL file recording every input event the local engine receives "
                              "(contains text)"}
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
        if (self.engine == "bedrock" or self.store == "agent-runtime") and not self.aws_region:
            raise ConfigError(
                f"NOVAGATE_ENGINE={self.engine} / NOVAGATE_STORE={self.store} need an AWS region: set "
                "NOVAGATE_REGION or AWS_REGION (Nova 2 Sonic: us-east-1, us-west-2, ap-northeast-1)"
            )

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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting; flags override the environment."""
    for f in dataclasses.fields(Settings):
        flag = "--" + f.name.replace("_", "-")
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
