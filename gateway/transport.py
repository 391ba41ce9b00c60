"""The model-transport interface: how the session actor reaches a Nova-Sonic-speaking model.

A transport opens streams; a stream takes Nova input events (dicts) and yields Nova output events
(dicts). The local engine and the Bedrock transport both implement it, so the actor never knows
which one it talks to.
"""

from __future__ import annotations

from typing import Protocol

# The service's error kinds and messages, defined once in the core (which classifies them).
from protocol.continuity import (  # noqa: E402,F401  (re-exported for transports and emulators)
    ACCESS_DENIED,
    CONNECTION,
    IDLE_TIMEOUT_MESSAGE,
    INSTABILITY_MESSAGE,
    INTERNAL_SERVER,
    MODEL_STREAM_ERROR,
    MODEL_TIMEOUT,
    MODEL_TIMEOUT_MESSAGE,
    SERVICE_UNAVAILABLE,
    THROTTLING,
    VALIDATION,
    classify,
)


class ModelError(Exception):
    """A failure of the model stream, with the service's error kind and message."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message

    @property
    def recoverable(self) -> bool:
        """Whether reopening the stream with the history is worth trying (protocol.continuity.classify)."""
        return classify(self.kind, self.message).recoverable


class ModelStream(Protocol):
    async def send(self, event: dict) -> None:
        """Send one input event. Raises ModelError if the stream has failed. Bounded in time: a stream
        that stops accepting input fails (ModelError) rather than blocking the caller."""

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
