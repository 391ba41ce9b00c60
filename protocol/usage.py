"""Tokens and what they cost. Nova's `usageEvent` counts tokens by direction (input, output) and
modality (speech, text), and each of the four has its own price; a session's cost is the sum of its
tokens at those prices. Pure arithmetic: the session (protocol/session.py) counts, prices and
enforces a user's budget with it; docs/usage.md says where the figures go."""

from __future__ import annotations

from dataclasses import dataclass, fields

KINDS = ("input_speech", "input_text", "output_speech", "output_text")


@dataclass(frozen=True, slots=True)
class Tokens:
    input_speech: int = 0
    input_text: int = 0
    output_speech: int = 0
    output_text: int = 0

    @classmethod
    def from_usage_event(cls, body: dict) -> Tokens:
        """The running totals of one model stream from a `usageEvent` body: `details.total` when the
        service gives it; else its `totalInputTokens` / `totalOutputTokens` counted as speech, the
        dearer modality, so that a budget is never under-counted."""
        details = body.get("details")
        total = details.get("total") if isinstance(details, dict) else None
        if isinstance(total, dict):
            i, o = total.get("input") or {}, total.get("output") or {}
            return cls(_int(i.get("speechTokens")), _int(i.get("textTokens")),
                       _int(o.get("speechTokens")), _int(o.get("textTokens")))
        return cls(input_speech=_int(body.get("totalInputTokens")), output_speech=_int(body.get("totalOutputTokens")))

    @property
    def input(self) -> int:
        return self.input_speech + self.input_text

    @property
    def output(self) -> int:
        return self.output_speech + self.output_text

    @property
    def total(self) -> int:
        return self.input + self.output

    def counts(self) -> tuple[tuple[str, int], ...]:
        """(kind, tokens) for each of the four kinds."""
        return tuple((f.name, getattr(self, f.name)) for f in fields(self))

    def __add__(self, other: Tokens) -> Tokens:
        return Tokens(*(a + b for a, b in zip(_values(self), _values(other), strict=True)))

    def __sub__(self, other: Tokens) -> Tokens:
        """What `self` adds to `other` (never negative: a stream's totals only grow)."""
        return Tokens(*(max(0, a - b) for a, b in zip(_values(self), _values(other), strict=True)))

    def __bool__(self) -> bool:
        return self.total > 0


@dataclass(frozen=True, slots=True)
class Prices:
    """US dollars per 1,000 tokens of each kind. The defaults are Amazon Nova Sonic's on-demand list
    prices in us-east-1 when this was written: set your own (NOVAGATE_PRICE_*) from the Bedrock pricing
    page for your model and region."""

    input_speech: float = 0.0034
    input_text: float = 0.00006
    output_speech: float = 0.0136
    output_text: float = 0.00024

    def cost(self, tokens: Tokens) -> float:
        return sum(getattr(self, kind) * n for kind, n in tokens.counts()) / 1000.0


def _int(value: object) -> int:
    return value if isinstance(value, int) and value > 0 else 0


def _values(t: Tokens) -> tuple[int, int, int, int]:
    return (t.input_speech, t.input_text, t.output_speech, t.output_text)
