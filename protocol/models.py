"""The model catalog: what each Nova Sonic model id takes, in one place.

The gateway shapes what it sends from this: typed text and endpointing only for models that take
them, history within the model's limits, a warning at start for a legacy model or an id it does not
know. An unknown id gets Nova 2 defaults, so a model that ships tomorrow works on the day it ships.
Cross-region inference prefixes (`us.`, `eu.`, `apac.`, `global.`) are passed through to the service
unchanged and looked up without the prefix; whether the bidirectional stream accepts them is
unverified (docs/aws.md). Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

NOVA_2_5_SONIC = "amazon.nova-2-5-sonic"
NOVA_2_SONIC = "amazon.nova-2-sonic-v1:0"
NOVA_SONIC_V1 = "amazon.nova-sonic-v1:0"
REGION_PREFIXES = ("us.", "eu.", "apac.", "global.")
LEGACY_END_OF_LIFE = "2026-09-14"  # Nova Sonic v1, per its Bedrock model card


@dataclass(frozen=True, slots=True)
class HistoryLimits:
    """How much conversation history one stream takes, in UTF-8 bytes of text."""

    total_bytes: int     # all history blocks together
    message_bytes: int   # one history message (a turn): a longer one keeps its newest part
    input_bytes: int     # one textInput event: a message is split into several


NOVA_2_HISTORY = HistoryLimits(200 * 1024, 50 * 1024, 50 * 1024)  # Nova 2 user guide, 22 June 2026
# The documented limits before that (40 KB in total, 1 KB per textInput, a message split, never cut):
# the fallback when a stream rejects a history as too large, and Nova Sonic v1's own.
CONSERVATIVE_HISTORY = HistoryLimits(40 * 1024, 40 * 1024, 1024)

NOVA_2_VOICES = ("matthew", "tiffany", "amy", "olivia", "lupe", "carlos", "ambre", "florian", "tina", "lennart",
                 "beatrice", "lorenzo", "carolina", "leo", "arjun", "kiara")
NOVA_1_VOICES = ("tiffany", "matthew", "amy", "ambre", "florian", "beatrice", "lorenzo", "greta", "lennart", "lupe",
                 "carlos")


@dataclass(frozen=True, slots=True)
class ModelSpec:
    model_id: str                     # as configured (a cross-region prefix included)
    family: str                       # nova-2 | nova-1
    known: bool                       # in this catalog (else: Nova 2 defaults)
    text_input: bool                  # interactive USER text ("cross-modal input")
    endpointing_sensitivity: bool     # sessionStart.turnDetectionConfiguration
    history: HistoryLimits
    voices: tuple[str, ...]
    input_rates: tuple[int, ...] = (16000,)
    output_rates: tuple[int, ...] = (8000, 16000, 24000)
    end_of_life: str | None = None    # a legacy model: the date the service stops serving it

    @property
    def legacy(self) -> bool:
        return self.end_of_life is not None

    def warning(self) -> str | None:
        """What to say at start-up about this model, if anything."""
        if self.legacy:
            return (f"{self.model_id} is legacy (end of life {self.end_of_life}) and takes no typed text; "
                    f"use {NOVA_2_SONIC} or {NOVA_2_5_SONIC}")
        if not self.known:
            return (f"{self.model_id} is not in the model catalog: treated as a Nova 2-class model "
                    f"(typed text, endpointing, history {self.history.total_bytes // 1024} KB)")
        return None


_NOVA_2 = ModelSpec("", "nova-2", True, True, True, NOVA_2_HISTORY, NOVA_2_VOICES)
CATALOG: dict[str, ModelSpec] = {
    NOVA_2_5_SONIC: replace(_NOVA_2, model_id=NOVA_2_5_SONIC),
    NOVA_2_SONIC: replace(_NOVA_2, model_id=NOVA_2_SONIC),
    NOVA_SONIC_V1: ModelSpec(NOVA_SONIC_V1, "nova-1", True, False, False, CONSERVATIVE_HISTORY, NOVA_1_VOICES,
                             end_of_life=LEGACY_END_OF_LIFE),
}


def base_model_id(model_id: str) -> str:
    """The id without a cross-region inference prefix."""
    for prefix in REGION_PREFIXES:
        if model_id.startswith(prefix):
            return model_id[len(prefix):]
    return model_id


def model_spec(model_id: str, *, history: HistoryLimits | None = None) -> ModelSpec:
    """The catalog's entry for `model_id` (Nova 2 defaults if unknown), with `history` overriding its limits."""
    spec = CATALOG.get(base_model_id(model_id))
    spec = replace(spec or _NOVA_2, model_id=model_id, known=spec is not None)
    return replace(spec, history=history) if history is not None else spec


def history_limits(spec: ModelSpec, *, total_bytes: int = 0, message_bytes: int = 0) -> HistoryLimits:
    """The model's limits with the operator's overrides (0: the model's own)."""
    h = spec.history
    message = message_bytes or h.message_bytes
    return HistoryLimits(total_bytes or h.total_bytes, message, min(h.input_bytes, message))
