"""The model-transport interface: how the session actor reaches a Nova-Sonic-speaking model.

A transport opens streams; a stream takes Nova input events (dicts) and yields Nova output events
(dicts). The local engine and the Bedrock transport both implement it, so the actor never knows
which one it talks to.
"""

from __future__ import annotations

from typing import Protocol

# Kinds of model errors, named after the service's exception union members.
VALIDATION = "validationException"
MODEL_TIMEOUT = "modelTimeoutException"
THROTTLING = "throttlingException"
MODEL_STREAM_ERROR = "modelStreamErrorException"
INTERNAL_SERVER = "internalServerException"
SERVICE_UNAVAILABLE = "serviceUnavailableException"
ACCESS_DENIED = "accessDeniedException"
CONNECTION = "connectionError"  # the stream broke below the event protocol (reset, TLS, timeout)

IDLE_TIMEOUT_MESSAGE = "InternalErrorCode=531::RST_STREAM closed stream. HTTP/2 error code: NO_ERROR"
INSTABILITY_MESSAGE = "System instability detected. Please retry your request."
MODEL_TIMEOUT_MESSAGE = "Model has timed out in processing the request. Try your request again."


class ModelError(Exception):
    """A failure of the model stream, with the service's error kind and message."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message

    @property
    def recoverable(self) -> bool:
        """Whether reopening the stream with the history is worth trying (reference §6.1)."""
        if self.kind == VALIDATION:
            return IDLE_TIMEOUT_MESSAGE in self.message or "System instability" in self.message or (
                "Tool Response parsing error" in self.message
            ) or "Invalid event bytes" in self.message
        return self.kind in (
            MODEL_TIMEOUT, THROTTLING, MODEL_STREAM_ERROR, INTERNAL_SERVER, SERVICE_UNAVAILABLE, CONNECTION
        )


class ModelStream(Protocol):
    async def send(self, event: dict) -> None:
        """Send one input event. Raises ModelError if the stream has failed."""

    async def receive(self) -> dict | None:
        """The next output event, or None when the stream has ended. Raises ModelError."""

    async def close(self) -> None:
        """Close the input side and release the stream. Never raises; bounded in time."""


class ModelTransport(Protocol):
    name: str

    async def open(self) -> ModelStream:
        """Open a new bidirectional stream. Raises ModelError (e.g. access denied)."""

    async def aclose(self) -> None:
        """Release shared resources (connection pools, models)."""
