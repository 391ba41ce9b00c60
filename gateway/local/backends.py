"""The local engine's speech back ends, chosen by name in LocalEngineConfig: voice activity (`vad`),
recognition (`asr`), the reply policy (`policy`) and the voice (`tts`).

LocalStream (engine.py) owns everything Nova about a stream: input order, the output event sequence, pacing,
barge-in, the idle and age limits. The back ends only say whether each 30 ms frame is speech, turn an
utterance into text, a user turn into reply sentences and a sentence into PCM. Two families:

  * models (the `local` engine): webrtcvad; whisper or sphinx; the rule-based policy (policy.py); hibari or
    espeak. Real speech, up to seconds of CPU per turn, so recognition and synthesis run in worker threads.
  * scripted (the `scripted` engine, for load tests: the gateway is measured, not speech models): RMS energy
    per frame; canned transcripts ("utterance 3", or a list cycled); one canned reply; a precomputed tone
    whose length is proportional to the text. Microseconds per call, run inline on the event loop; no
    recognition, no synthesis, no resampling (the tone is made at the rate asked for, once).

Any combination works (say, the energy VAD in front of sphinx).

Tool calls on a phrase (both families): `tool_calls` rules (parse_tool_calls) say which tool the model calls
when the user's words contain a phrase, with what arguments and after which filler sentence; `tool_reply`
makes the sentences spoken about a tool's result, and `reply` answers a result delivered as user text
("Result of the <tool> tool call: …") the same way (policy.late_tool_result).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from gateway.local import policy, speech

if TYPE_CHECKING:
    from gateway.local.engine import LocalEngineConfig

VAD_BACKENDS = ("webrtc", "energy")
ASR_BACKENDS = (*speech.ASR_BACKENDS, "scripted")
TTS_BACKENDS = (*speech.TTS_BACKENDS, "tone")
POLICIES = ("rules", "scripted")

FRAME_BYTES = speech.VAD_FRAME_BYTES  # 30 ms at 16 kHz
FRAME_SAMPLES = FRAME_BYTES // 2
WEBRTC_AGGRESSIVENESS = 2

DEFAULT_REPLY = "Thanks, I heard you. This is a scripted reply from the load-test engine."
DEFAULT_REPLY_S = 2.0
DEFAULT_TOOL_FILLER = "One moment."  # spoken before a scripted tool call ("" for none)
TOOL_RULE_KEYS = ("phrase", "tool", "arguments", "filler")
DEFAULT_ENERGY_DB = -40.0
TONE_PEAK = 0.1  # of full scale (-20 dBFS): a quiet tone
TONE_HZ = 180.0
SYLLABLE_HZ = 3.0  # the tone swells like syllables, so it does not sound like a test signal
FADE_S = 0.01


class Vad(Protocol):
    """Voice activity of one stream (it may keep state between calls)."""

    def classify(self, frames: bytes) -> list[bool]:
        """Speech or not, for each 30 ms frame of `frames` (whole frames of PCM16LE mono at 16 kHz)."""


class Recogniser(Protocol):
    blocking: bool  # True: run in a worker thread

    def transcribe(self, pcm16k: bytes) -> str:
        """The text of one utterance (PCM16LE mono, 16 kHz); '' when nothing was recognised."""


class Synthesiser(Protocol):
    blocking: bool  # True: run in a worker thread

    def synthesize(self, text: str, rate: int, voice: str | None) -> bytes:
        """Speech for one sentence: PCM16LE mono at `rate` Hz."""


# -- voice activity ---------------------------------------------------------------------------------


class WebrtcVad:
    def __init__(self, aggressiveness: int = WEBRTC_AGGRESSIVENESS) -> None:
        self._vad = speech.make_vad(aggressiveness)

    def classify(self, frames: bytes) -> list[bool]:
        is_speech = self._vad.is_speech
        return [is_speech(frames[i : i + FRAME_BYTES], speech.ASR_SAMPLE_RATE)
                for i in range(0, len(frames), FRAME_BYTES)]


class EnergyVad:
    """A frame is speech when its RMS is above `threshold_db` dBFS (relative to 32768). One numpy
    reduction for all the frames of a call; stateless."""

    def __init__(self, threshold_db: float = DEFAULT_ENERGY_DB) -> None:
        level = 32768.0 * 10.0 ** (threshold_db / 20.0)
        self._threshold = level * level * FRAME_SAMPLES  # on the sum of squares of a frame

    def classify(self, frames: bytes) -> list[bool]:
        x = np.frombuffer(frames, "<i2").astype(np.float32)
        if x.size == FRAME_SAMPLES:  # the usual case (a 32 ms audioInput completes one frame): a dot product
            return [float(x @ x) > self._threshold]
        x = x.reshape(-1, FRAME_SAMPLES)
        return (np.einsum("ij,ij->i", x, x) > self._threshold).tolist()


# -- recognition ------------------------------------------------------------------------------------


class ModelRecogniser:
    blocking = True

    def __init__(self, backend: str, grammar: tuple[str, ...] = ()) -> None:
        self.backend = backend
        self.grammar = grammar or None

    def transcribe(self, pcm16k: bytes) -> str:
        return speech.transcribe(pcm16k, self.backend, self.grammar)


class ScriptedRecogniser:
    """Canned transcripts, one per utterance of the stream: `transcripts` cycled, or "utterance N"."""

    blocking = False

    def __init__(self, transcripts: tuple[str, ...] = ()) -> None:
        self._transcripts = tuple(t for t in (" ".join(t.split()) for t in transcripts) if t)
        self._count = 0

    def transcribe(self, pcm16k: bytes) -> str:
        self._count += 1
        if self._transcripts:
            return self._transcripts[(self._count - 1) % len(self._transcripts)]
        return f"utterance {self._count}"


# -- voice ------------------------------------------------------------------------------------------


class ModelSynthesiser:
    blocking = True

    def __init__(self, backend: str) -> None:
        self.backend = backend

    def synthesize(self, text: str, rate: int, voice: str | None) -> bytes:
        return speech.synthesize(text, rate, self.backend, voice)


class ToneSynthesiser:
    """A quiet swelling tone, `seconds_per_char` per character of the sentence; made once per (rate,
    length) and then served from a cache."""

    blocking = False

    def __init__(self, seconds_per_char: float) -> None:
        self.seconds_per_char = seconds_per_char

    def synthesize(self, text: str, rate: int, voice: str | None = None) -> bytes:
        chars = len(" ".join(text.split()))
        if not chars:
            return b""
        return tone(rate, max(1, round(chars * self.seconds_per_char * rate)))


@functools.lru_cache(maxsize=64)
def tone(rate: int, samples: int) -> bytes:
    """`samples` of the reply tone at `rate` Hz (PCM16LE mono), with 10 ms fades."""
    t = np.arange(samples, dtype=np.float64) / rate
    swell = 0.6 - 0.4 * np.cos(2 * np.pi * SYLLABLE_HZ * t)
    wave = (np.sin(2 * np.pi * TONE_HZ * t) + 0.3 * np.sin(4 * np.pi * TONE_HZ * t)) / 1.3 * swell
    fade = min(samples // 2, int(rate * FADE_S))
    if fade:
        ramp = np.linspace(0.0, 1.0, fade, endpoint=False)
        wave[:fade] *= ramp
        wave[samples - fade :] *= ramp[::-1]
    return (wave * (TONE_PEAK * 32767.0)).astype("<i2").tobytes()


# -- replies ----------------------------------------------------------------------------------------


def sentences(text: str) -> list[str]:
    """`text` split after . ! ? (each sentence is spoken as its own SPECULATIVE / AUDIO / FINAL group)."""
    return [s for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())) if s]


class ScriptedPolicy:
    """The same canned reply to every turn."""

    def __init__(self, reply: str = DEFAULT_REPLY) -> None:
        self.sentences = tuple(sentences(reply))
        if not self.sentences:
            raise ValueError("the scripted reply is empty")

    def __call__(self, text: str, history: list[tuple[str, str]]) -> list[str]:
        return list(self.sentences)


# -- tool calls on a phrase -------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolCallRule:
    """When the user's words contain `phrase`, the model calls `tool` with `arguments`, after `filler`."""

    phrase: str  # normalised (lowercase words, policy._norm)
    tool: str
    arguments: str  # the toolUse content: a JSON object, compact
    filler: tuple[str, ...] = ()  # sentences spoken before the call


def parse_tool_calls(value: Any, default_filler: str = DEFAULT_TOOL_FILLER) -> tuple[ToolCallRule, ...]:
    """Tool-call rules from a JSON string (or "@path" of a JSON file), a list of objects
    `{"phrase": "record the call", "tool": "record_call", "arguments": {...}, "filler": "One moment."}`
    (`arguments` default {}, `filler` default `default_filler`; "" for none) or one such object.
    ValueError for anything else."""
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return ()
        if text.startswith("@"):
            try:
                text = Path(text[1:]).expanduser().read_text("utf-8")
            except OSError as exc:
                raise ValueError(f"tool calls: cannot read {text[1:]}: {exc}") from None
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"tool calls are not valid JSON: {exc}") from None
    if value is None:
        return ()
    if isinstance(value, (dict, ToolCallRule)):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ValueError('tool calls must be a JSON list of {"phrase", "tool", "arguments"} objects')
    rules = []
    for i, item in enumerate(value):
        if isinstance(item, ToolCallRule):
            rules.append(item)
            continue
        where = f"tool call rule {i + 1}"
        if not isinstance(item, dict):
            raise ValueError(f'{where} is not an object {{"phrase", "tool", "arguments"}}')
        unknown = sorted(set(item) - set(TOOL_RULE_KEYS))
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(TOOL_RULE_KEYS)})")
        phrase, tool = item.get("phrase"), item.get("tool")
        if not isinstance(phrase, str) or not policy._norm(phrase):
            raise ValueError(f'{where}: "phrase" must be a non-empty string of words')
        if not isinstance(tool, str) or not tool.strip() or len(tool.split()) != 1:
            raise ValueError(f'{where}: "tool" must be a tool name (a non-empty string without spaces)')
        arguments = item.get("arguments", {})
        if not isinstance(arguments, dict):
            raise ValueError(f'{where}: "arguments" must be a JSON object')
        filler = item.get("filler", default_filler)
        if not isinstance(filler, str):
            raise ValueError(f'{where}: "filler" must be a string ("" for none)')
        rules.append(ToolCallRule(policy._norm(phrase), tool.strip(),
                                  json.dumps(arguments, ensure_ascii=False, separators=(",", ":")),
                                  tuple(sentences(filler))))
    return tuple(rules)


def tool_call_for(rules: tuple[ToolCallRule, ...], text: str) -> ToolCallRule | None:
    """The first rule whose phrase is in `text` (case and punctuation ignored), if any."""
    if not rules:
        return None
    norm = policy._norm(text)
    return next((r for r in rules if r.phrase in norm), None)


def reply_to_tool_result(tool: str, content: str) -> list[str]:
    """The sentences spoken about `tool`'s result `content`."""
    return sentences(policy.tool_reply_text(tool, content))


def answering_late_tool_results(reply: Callable[[str, list[tuple[str, str]]], list[str]]
                                ) -> Callable[[str, list[tuple[str, str]]], list[str]]:
    """`reply`, except that a tool result delivered as user text gets the tool reply."""

    def answer(text: str, history: list[tuple[str, str]]) -> list[str]:
        late = policy.late_tool_result(text)
        return reply_to_tool_result(*late) if late is not None else reply(text, history)

    return answer


# -- one engine's set -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Backends:
    new_vad: Callable[[], Vad]  # one per stream
    new_recogniser: Callable[[], Recogniser]  # one per stream
    synthesiser: Synthesiser
    reply: Callable[[str, list[tuple[str, str]]], list[str]]  # (user text, history) -> sentences
    warm: Callable[[], None]  # load the models (blocking); nothing to do for the scripted back ends
    tool_calls: tuple[ToolCallRule, ...] = ()  # tool calls on a phrase
    tool_reply: Callable[[str, str], list[str]] = reply_to_tool_result  # (tool, result content) -> sentences


def build(cfg: LocalEngineConfig) -> Backends:
    """The back ends `cfg` names; ValueError for an unknown name or an unusable scripted setting,
    speech.SpeechPackagesMissing (a ConfigError) when the speech packages they need are not installed."""
    for kind, name, known in (("VAD", cfg.vad, VAD_BACKENDS), ("ASR", cfg.asr, ASR_BACKENDS),
                              ("TTS", cfg.tts, TTS_BACKENDS), ("policy", cfg.policy, POLICIES)):
        if name not in known:
            raise ValueError(f"unknown {kind} backend {name!r} (choose from {known})")
    if cfg.vad == "energy":
        if not -100.0 < cfg.energy_threshold_db < 0.0:
            raise ValueError(f"energy threshold {cfg.energy_threshold_db} dBFS is not in (-100, 0)")
        threshold = cfg.energy_threshold_db
        new_vad: Callable[[], Vad] = lambda: EnergyVad(threshold)  # noqa: E731
    else:
        new_vad = WebrtcVad
    if cfg.asr == "scripted":
        transcripts = tuple(cfg.transcripts)
        new_recogniser: Callable[[], Recogniser] = lambda: ScriptedRecogniser(transcripts)  # noqa: E731
    else:
        shared = ModelRecogniser(cfg.asr, tuple(cfg.grammar))
        new_recogniser = lambda: shared  # noqa: E731
    synthesiser: Synthesiser
    if cfg.tts == "tone":
        if not cfg.reply_s > 0:
            raise ValueError(f"reply_s={cfg.reply_s} must be positive")
        chars = sum(len(s) for s in sentences(cfg.reply)) or len(DEFAULT_REPLY)
        synthesiser = ToneSynthesiser(cfg.reply_s / chars)  # the canned reply lasts reply_s
    else:
        synthesiser = ModelSynthesiser(cfg.tts)
    reply = answering_late_tool_results(ScriptedPolicy(cfg.reply) if cfg.policy == "scripted" else policy.reply)
    tool_calls = parse_tool_calls(cfg.tool_calls, cfg.tool_filler)
    asr = cfg.asr if cfg.asr in speech.ASR_BACKENDS else ""
    tts = cfg.tts if cfg.tts in speech.TTS_BACKENDS else ""
    speech.check_installed(asr, tts)  # the `local` extra: a clear error now, not an ImportError at a turn
    grammar = tuple(cfg.grammar) or None
    return Backends(new_vad, new_recogniser, synthesiser, reply, lambda: speech.warm(asr, tts, grammar), tool_calls)
