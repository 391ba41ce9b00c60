"""Nova Sonic bidirectional-stream events: input builders, output builders and a typed output parser.

Every event is `{"event": {<name>: {...}}}` (reference/nova-sonic.md §2–§3). Builders return plain
dicts; transports serialise them. Audio content is base64 of PCM16LE mono on the wire.
"""

from __future__ import annotations

import base64
import binascii
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

from .usage import Tokens

# Facts of the Nova Sonic service (reference/nova-sonic.md §2, §4, §9): the one place the gateway
# states them; everything else imports them from here.
DEFAULT_MODEL_ID = "amazon.nova-2-sonic-v1:0"  # Nova 2 Sonic
NOVA_SONIC_V1_MODEL_ID = "amazon.nova-sonic-v1:0"  # legacy Nova Sonic 1: no typed text input
MODEL_INPUT_RATE = 16000  # the rate of the audio the gateway sends to the model
MODEL_INPUT_RATES = (8000, 16000, 24000)  # audioInputConfiguration.sampleRateHertz the service accepts
MODEL_OUTPUT_RATES = (8000, 16000, 24000)  # audioOutputConfiguration.sampleRateHertz the service accepts
DEFAULT_MODEL_OUTPUT_RATE = 24000  # what the builders and the local engine use when no output rate is given
MAX_HISTORY_BYTES = 40 * 1024  # history text (non-interactive USER/ASSISTANT blocks) in total
MAX_TEXT_INPUT_BYTES = 1024  # one textInput of a non-interactive block
MAX_STREAM_AGE_S = 480.0  # a stream this old ends with modelTimeoutException
IDLE_TIMEOUT_S = 175.0  # this long without audioInput ends a stream (ValidationException, InternalErrorCode=531)
INTERRUPTED_SIGNAL = '{ "interrupted" : true }'  # the textOutput content that marks a barge-in


def new_name() -> str:
    """promptName / contentName: a fresh lowercase UUID."""
    return str(uuid.uuid4())


def event_name(event: dict) -> str:
    """The single key under `event`, e.g. "audioInput"."""
    (name,) = event["event"].keys()
    return name


def event_body(event: dict) -> dict:
    (body,) = event["event"].values()
    return body


def _ev(name: str, body: dict) -> dict:
    return {"event": {name: body}}


# ---------------------------------------------------------------------------------------------
# Input events (gateway -> model)


def session_start(
    *,
    max_tokens: int = 1024,
    top_p: float = 0.9,
    temperature: float = 0.7,
    endpointing_sensitivity: str | None = None,
) -> dict:
    body: dict[str, Any] = {
        "inferenceConfiguration": {"maxTokens": max_tokens, "topP": top_p, "temperature": temperature}
    }
    if endpointing_sensitivity:  # Nova 2 only
        body["turnDetectionConfiguration"] = {"endpointingSensitivity": endpointing_sensitivity}
    return _ev("sessionStart", body)


def prompt_start(
    prompt_name: str,
    *,
    voice_id: str = "matthew",
    output_sample_rate: int = DEFAULT_MODEL_OUTPUT_RATE,
    tools: list[dict] | None = None,
    tool_choice: dict | None = None,
) -> dict:
    body: dict[str, Any] = {
        "promptName": prompt_name,
        "textOutputConfiguration": {"mediaType": "text/plain"},
        "audioOutputConfiguration": {
            "mediaType": "audio/lpcm",
            "sampleRateHertz": output_sample_rate,
            "sampleSizeBits": 16,
            "channelCount": 1,
            "voiceId": voice_id,
            "encoding": "base64",
            "audioType": "SPEECH",
        },
    }
    if tools:
        body["toolUseOutputConfiguration"] = {"mediaType": "application/json"}
        body["toolConfiguration"] = {"tools": tools}
        if tool_choice:  # {"auto": {}} | {"any": {}} | {"tool": {"name": ...}}
            body["toolConfiguration"]["toolChoice"] = tool_choice
    return _ev("promptStart", body)


def text_content_start(prompt_name: str, content_name: str, role: str, *, interactive: bool = False) -> dict:
    return _ev(
        "contentStart",
        {
            "promptName": prompt_name,
            "contentName": content_name,
            "type": "TEXT",
            "interactive": interactive,
            "role": role,
            "textInputConfiguration": {"mediaType": "text/plain"},
        },
    )


def text_input(prompt_name: str, content_name: str, content: str) -> dict:
    return _ev("textInput", {"promptName": prompt_name, "contentName": content_name, "content": content})


def audio_content_start(prompt_name: str, content_name: str, *, sample_rate: int = MODEL_INPUT_RATE) -> dict:
    return _ev(
        "contentStart",
        {
            "promptName": prompt_name,
            "contentName": content_name,
            "type": "AUDIO",
            "interactive": True,
            "role": "USER",
            "audioInputConfiguration": {
                "mediaType": "audio/lpcm",
                "sampleRateHertz": sample_rate,
                "sampleSizeBits": 16,
                "channelCount": 1,
                "audioType": "SPEECH",
                "encoding": "base64",
            },
        },
    )


def audio_input(prompt_name: str, content_name: str, pcm: bytes) -> dict:
    # binascii directly: what base64.b64encode does, without its wrapper (this runs for every 60 ms of input)
    content = binascii.b2a_base64(pcm, newline=False).decode("ascii")
    return {"event": {"audioInput": {"promptName": prompt_name, "contentName": content_name, "content": content}}}


def tool_content_start(prompt_name: str, content_name: str, tool_use_id: str) -> dict:
    return _ev(
        "contentStart",
        {
            "promptName": prompt_name,
            "contentName": content_name,
            "interactive": False,
            "type": "TOOL",
            "role": "TOOL",
            "toolResultInputConfiguration": {
                "toolUseId": tool_use_id,
                "type": "TEXT",
                "textInputConfiguration": {"mediaType": "text/plain"},
            },
        },
    )


def tool_result(prompt_name: str, content_name: str, content: str) -> dict:
    return _ev("toolResult", {"promptName": prompt_name, "contentName": content_name, "content": content})


def content_end(prompt_name: str, content_name: str) -> dict:
    return _ev("contentEnd", {"promptName": prompt_name, "contentName": content_name})


def prompt_end(prompt_name: str) -> dict:
    return _ev("promptEnd", {"promptName": prompt_name})


def session_end() -> dict:
    return _ev("sessionEnd", {})


def text_block(prompt_name: str, role: str, chunks: list[str] | tuple[str, ...], *, interactive: bool = False) -> list[dict]:
    """contentStart + one textInput per chunk + contentEnd: one SYSTEM/USER/ASSISTANT message."""
    name = new_name()
    return [
        text_content_start(prompt_name, name, role, interactive=interactive),
        *(text_input(prompt_name, name, c) for c in chunks),
        content_end(prompt_name, name),
    ]


# ---------------------------------------------------------------------------------------------
# Output events (model -> gateway): builders used by the local engine and the wire emulator


def _out_ids(ids: dict, **body: Any) -> dict:
    return {**ids, **body}


def completion_start(ids: dict) -> dict:
    return _ev("completionStart", dict(ids))


def output_content_start(
    ids: dict, content_id: str, *, type: str, role: str, stage: str | None = None,
    sample_rate: int = DEFAULT_MODEL_OUTPUT_RATE,
) -> dict:
    body = _out_ids(ids, contentId=content_id, type=type, role=role)
    if stage:
        body["additionalModelFields"] = orjson.dumps({"generationStage": stage}).decode()
    if type == "TEXT":
        body["textOutputConfiguration"] = {"mediaType": "text/plain"}
    elif type == "AUDIO":
        body["audioOutputConfiguration"] = {
            "mediaType": "audio/lpcm",
            "sampleRateHertz": sample_rate,
            "sampleSizeBits": 16,
            "encoding": "base64",
            "channelCount": 1,
        }
    elif type == "TOOL":
        body["toolUseOutputConfiguration"] = {"mediaType": "application/json"}
    return _ev("contentStart", body)


def output_text(ids: dict, content_id: str, role: str, content: str) -> dict:
    return _ev("textOutput", _out_ids(ids, contentId=content_id, role=role, content=content))


def output_audio(ids: dict, content_id: str, pcm: bytes) -> dict:
    return _ev(
        "audioOutput",
        _out_ids(ids, contentId=content_id, role="ASSISTANT", content=base64.b64encode(pcm).decode("ascii")),
    )


def output_tool_use(ids: dict, content_id: str, tool_use_id: str, tool_name: str, content: str) -> dict:
    return _ev(
        "toolUse",
        _out_ids(ids, contentId=content_id, role="TOOL", toolUseId=tool_use_id, toolName=tool_name, content=content),
    )


def output_content_end(ids: dict, content_id: str, *, type: str, stop_reason: str) -> dict:
    return _ev("contentEnd", _out_ids(ids, contentId=content_id, type=type, stopReason=stop_reason))


def usage_event(ids: dict, *, input_speech: int, input_text: int, output_speech: int, output_text: int,
                delta: dict | None = None) -> dict:
    total_in, total_out = input_speech + input_text, output_speech + output_text
    total = {
        "input": {"speechTokens": input_speech, "textTokens": input_text},
        "output": {"speechTokens": output_speech, "textTokens": output_text},
    }
    return _ev(
        "usageEvent",
        _out_ids(
            ids,
            details={"delta": delta or total, "total": total},
            totalInputTokens=total_in,
            totalOutputTokens=total_out,
            totalTokens=total_in + total_out,
        ),
    )


def completion_end(ids: dict, stop_reason: str = "END_TURN") -> dict:
    return _ev("completionEnd", _out_ids(ids, stopReason=stop_reason))


def user_speech_start(ids: dict) -> dict:
    """Nova 2: the model hears the user start speaking (its body's fields are not documented: ids)."""
    return _ev("userSpeechStart", dict(ids))


def user_speech_end(ids: dict) -> dict:
    """Nova 2: the model hears the user stop speaking (before it transcribes the utterance)."""
    return _ev("userSpeechEnd", dict(ids))


# ---------------------------------------------------------------------------------------------
# Typed output events


Stage = Literal["SPECULATIVE", "FINAL"] | None


@dataclass(frozen=True, slots=True)
class CompletionStart:
    completion_id: str


@dataclass(frozen=True, slots=True)
class ContentStart:
    content_id: str
    type: str  # TEXT | AUDIO | TOOL
    role: str  # USER | ASSISTANT | TOOL
    stage: Stage = None
    sample_rate: int | None = None


@dataclass(frozen=True, slots=True)
class TextOutput:
    content_id: str
    role: str
    content: str
    interrupted: bool = False  # the content was the barge-in signal, not speech


@dataclass(frozen=True, slots=True)
class AudioOutput:
    content_id: str
    pcm: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class ToolUse:
    content_id: str
    tool_use_id: str
    tool_name: str
    content: str


@dataclass(frozen=True, slots=True)
class ContentEnd:
    content_id: str
    type: str
    stop_reason: str  # PARTIAL_TURN | END_TURN | INTERRUPTED | TOOL_USE


@dataclass(frozen=True, slots=True)
class UsageEvent:
    tokens: Tokens  # the stream's running totals, by direction and modality (protocol/usage.py)


@dataclass(frozen=True, slots=True)
class CompletionEnd:
    stop_reason: str


@dataclass(frozen=True, slots=True)
class UserSpeechStart:
    """Nova 2's voice activity: the user started speaking (an earlier barge-in signal than the
    interrupted marker). The body is not documented: it is kept as it came (ids, if any)."""

    body: dict = field(default_factory=dict, repr=False)


@dataclass(frozen=True, slots=True)
class UserSpeechEnd:
    """Nova 2's voice activity: the user stopped speaking."""

    body: dict = field(default_factory=dict, repr=False)


@dataclass(frozen=True, slots=True)
class UnknownEvent:
    name: str
    body: dict


OutputEvent = (
    CompletionStart | ContentStart | TextOutput | AudioOutput | ToolUse | ContentEnd | UsageEvent | CompletionEnd
    | UserSpeechStart | UserSpeechEnd | UnknownEvent
)


def is_interrupted_signal(text: str) -> bool:
    """Nova's barge-in marker: a textOutput whose content parses to {"interrupted": true}."""
    s = text.strip() if isinstance(text, str) else ""
    if not (s.startswith("{") and "interrupted" in s):
        return False
    try:
        value = orjson.loads(s)
    except orjson.JSONDecodeError:
        return False
    return isinstance(value, dict) and value.get("interrupted") is True


def _stage(body: dict) -> Stage:
    raw = body.get("additionalModelFields")
    if not raw:
        return None
    try:
        fields = orjson.loads(raw) if isinstance(raw, str) else raw
    except orjson.JSONDecodeError:
        return None
    stage = fields.get("generationStage") if isinstance(fields, dict) else None
    return stage if stage in ("SPECULATIVE", "FINAL") else None


class MalformedEvent(ValueError):
    """The model sent something that is not a well-formed output event."""


def parse_output_event(obj: dict | bytes | str) -> OutputEvent:
    """Turn one model output event (dict, or its JSON) into a typed event; MalformedEvent if it is not one."""
    try:
        return _parse(orjson.loads(obj) if isinstance(obj, (bytes, bytearray, memoryview, str)) else obj)
    except (KeyError, ValueError, TypeError, AttributeError, binascii.Error) as e:
        raise MalformedEvent(f"malformed output event: {e}") from None


def _parse(obj: dict) -> OutputEvent:
    name = event_name(obj)
    b = event_body(obj)
    if name == "audioOutput":
        return AudioOutput(b.get("contentId", ""), base64.b64decode(b.get("content", "")))
    if name == "textOutput":
        content = b.get("content", "")
        return TextOutput(b.get("contentId", ""), b.get("role", ""), content, is_interrupted_signal(content))
    if name == "contentStart":
        rate = (b.get("audioOutputConfiguration") or {}).get("sampleRateHertz")
        return ContentStart(b.get("contentId", ""), b.get("type", ""), b.get("role", ""), _stage(b), rate)
    if name == "contentEnd":
        return ContentEnd(b.get("contentId", ""), b.get("type", ""), b.get("stopReason", ""))
    if name == "completionStart":
        return CompletionStart(b.get("completionId", ""))
    if name == "completionEnd":
        return CompletionEnd(b.get("stopReason", ""))
    if name == "usageEvent":
        return UsageEvent(Tokens.from_usage_event(b))
    if name == "toolUse":
        return ToolUse(b.get("contentId", ""), b.get("toolUseId", ""), b.get("toolName", ""), b.get("content", ""))
    if name in ("userSpeechStart", "userSpeechEnd"):  # any body: its fields are not documented
        cls = UserSpeechStart if name == "userSpeechStart" else UserSpeechEnd
        return cls(dict(b) if isinstance(b, dict) else {})
    return UnknownEvent(name, b)
