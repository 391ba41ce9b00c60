"""Error codes and WebSocket close codes of client protocol v1 (PROTOCOL.md §6)."""

from enum import IntEnum

# Error codes carried by the `error` server message.
INVALID_JSON = "invalid_json"
UNKNOWN_TYPE = "unknown_type"
INVALID_FIELD = "invalid_field"
TEXT_TOO_LONG = "text_too_long"
UNSUPPORTED_SAMPLE_RATE = "unsupported_sample_rate"
NOT_READY = "not_ready"
BAD_RECEIPT = "bad_receipt"
STORE_DEGRADED = "store_degraded"
MODEL_UNAVAILABLE = "model_unavailable"
# Additive (not in PROTOCOL.md v1): a fatal error that is not the model's fault, and a request the
# configured model cannot serve (typed text on Nova Sonic v1).
INTERNAL_ERROR = "internal_error"
UNSUPPORTED = "unsupported"
# Additive: limits (docs/security.md). A typed turn over its rate is refused; a client silent for too
# long is closed (its conversation stays resumable); a conversation at its size cap takes no more turns.
RATE_LIMITED = "rate_limited"
IDLE_TIMEOUT = "idle_timeout"
CONVERSATION_FULL = "conversation_full"
# Additive: one live session per conversation. The session that held it is closed 4409 when another
# connection takes it over (`taken_over`) or when it is revoked, ended or deleted (`conversation_gone`).
TAKEN_OVER = "taken_over"
CONVERSATION_GONE = "conversation_gone"
# Additive: a new socket refused because the server is overloaded (its event loop runs late, or its CPU is
# spent): fatal, just before close 1013, with `retry_after_ms` (when to try again; docs/protocol.md).
OVERLOADED = "overloaded"
# Additive: the authenticated user's budget for the period (NOVAGATE_USER_BUDGET_USD) is spent: a new session
# is refused, a live one ends (after storing what is final). Fatal, then close 4402; docs/usage.md.
BUDGET_EXCEEDED = "budget_exceeded"


class CloseCode(IntEnum):
    NORMAL = 1000
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012
    TRY_AGAIN_LATER = 1013
    PROTOCOL_ERROR = 4400
    UNAUTHORIZED = 4401
    BUDGET_EXCEEDED = 4402  # additive: the user's budget is spent (like HTTP 402); try again next period
    FORBIDDEN_ORIGIN = 4403
    HANDSHAKE_TIMEOUT = 4408
    CONFLICT = 4409      # additive: this connection no longer holds the conversation
    IDLE = 4410          # additive: the client sent nothing (no message, no speech) for too long
    RATE_LIMITED = 4429
