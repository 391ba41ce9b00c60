"""The OpenAI Realtime wire protocol (`/v1/realtime`) over the same `Session` as `/v1/voice`.

`RealtimeSession` wraps a `protocol.session.Session` and looks like one to the gateway: it takes the
same inputs and gives effects from `effects()`. It turns the client's Realtime events into the
session's inputs (typed client messages, `configure`, `cancel_response`, `tool_finished`) and the
session's messages and audio into Realtime server events. Every decision about the conversation
(turns, barge-in, truncation, storage, rotation, recovery, tools, limits) stays in the session: this
module only translates, and says so with an `error` when a Realtime request has no Nova equivalent.
docs/realtime-compat.md lists every event. Pure: no I/O, no clocks.

How Realtime concepts map:
- a *response* is one assistant item (Nova speaks a turn as one item; a tool call ends it), plus the
  function calls the model made for it; it is done once its items are (an assistant item when its
  last audio has been sent, or when it is cut by a barge-in or `response.cancel`);
- a client-side tool (declared in `session.update`) is called as a `function_call` item; the
  client's `function_call_output` is the session's tool result;
- `conversation.item.create` of user text is held until `response.create`, then sent as a typed turn
  (Nova answers every typed turn at once; Realtime answers only when asked): one at a time;
- `audio/pcmu` is the session's `mulaw` codec, chosen before the session starts.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import orjson

from . import codes
from . import messages as m
from . import tool_calls
from .adapter import SendText, SessionAdapter
from .limits import TokenBucket
from .session import CancelTool, RunTool, SendAudio, SendMessage, Session, Prompt

RATE = 24000                 # `audio/pcm` in the GA protocol is 24 kHz, 16-bit, mono, both ways
MULAW_RATE = 8000            # `audio/pcmu`: G.711 mu-law, 8 kHz
START_WAIT_S = 1.0           # a session.update sent at once configures the first stream (no second one);
                             # a client that waits for session.created first waits this long once
ERROR_REPLIES = (10.0, 20)   # error events: per second, burst; past it they are not sent

# OpenAI's built-in voices -> Nova 2 voices (docs/realtime-compat.md); a Nova voice name is taken as is.
VOICES = {
    "alloy": "tiffany", "ash": "matthew", "ballad": "amy", "coral": "tiffany", "echo": "matthew",
    "sage": "olivia", "shimmer": "tiffany", "verse": "matthew", "marin": "tiffany", "cedar": "matthew",
}
EAGERNESS = {"high": "HIGH", "medium": "MEDIUM", "auto": "MEDIUM", "low": "LOW"}
VAD_DEFAULTS = {"threshold": 0.5, "prefix_padding_ms": 300}  # what Nova's own detection is taken to be
_TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_ITEM_ID = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_CLIENT_ERRORS = {codes.INVALID_JSON, codes.UNKNOWN_TYPE, codes.INVALID_FIELD, codes.TEXT_TOO_LONG,
                  codes.UNSUPPORTED_SAMPLE_RATE, codes.NOT_READY, codes.BAD_RECEIPT, codes.UNSUPPORTED,
                  codes.RATE_LIMITED, codes.IDLE_TIMEOUT, codes.CONVERSATION_FULL}


class Refused(Exception):
    """A request with no Nova equivalent: answered with an `error` event naming `param`."""

    def __init__(self, param: str, message: str, code: str = "unsupported"):
        super().__init__(message)
        self.param, self.message, self.code = param, message, code


@dataclass(slots=True)
class _Response:
    id: str
    items: list[_Item] = field(default_factory=list)
    closed: bool = False        # no more items will join it
    cancelled: str | None = None  # turn_detected | client_cancelled
    usage_from: tuple[int, int] = (0, 0)


@dataclass(slots=True)
class _Item:
    id: str
    response: _Response
    kind: str = "message"       # message | function_call
    transcript: str = ""        # what was sent as deltas
    audio: bool = False
    audio_done: bool = False
    done: bool = False
    incomplete: bool = False
    call: dict | None = None    # a function call: call_id, name, arguments


@dataclass(frozen=True, slots=True)
class Settings:
    """What the gateway's configuration decides for the endpoint."""

    model: str = ""                     # told as the session's model
    client_instructions: bool = True    # session.update may replace the system prompt
    endpointing: bool = True            # the model takes an endpointing sensitivity (Nova 2)
    server_tools: frozenset[str] = frozenset()
    voices: tuple[str, ...] = ()        # the model's voices (empty: any name)


class RealtimeSession(SessionAdapter):
    """A `Session` that speaks OpenAI Realtime events. Inputs the gateway calls that are not
    defined here (store, model, tool results, drain, …) go to the session unchanged."""

    def __init__(self, session: Session, settings: Settings, *, now: float, new_id: Callable[[str], str],
                 resume: str | None = None):
        super().__init__(session, start_by=now + START_WAIT_S)
        self._cfg = settings
        self._new_id = new_id
        self._resume = resume
        self._events = 0
        self._errors = TokenBucket(*ERROR_REPLIES)
        self._refused: list[Refused] = []   # of the session.update being applied
        self._codecs = {"input": "pcm16", "output": "pcm16"}  # audio/pcm, or audio/pcmu: mulaw
        # the session as the client configured it (told back in session.created / session.updated)
        self._instructions: str | None = None
        self._voice: str | None = None      # None: the gateway's
        self._transcription: dict | None = None
        self._turn_detection: dict = {"type": "server_vad", "create_response": True, "interrupt_response": True}
        self._tools: list[dict] = []
        self._tool_choice: Any = "auto"
        self._prompt: Prompt | None = None  # what the client's configuration makes of the session's
        self._ready: m.SessionReady | None = None
        self._updated_owed = False          # a session.update answered once session.created is out
        self._create_owed = False           # a response.create that came before the session was ready
        self._owed: tuple[str, str] | None = None  # ... and the message it is for
        self._told: dict[str, Any] = {}     # the novagate extension: conversation, token, …
        # the conversation as the client sees it
        self._responses: list[_Response] = []  # not yet done
        self._items: dict[str, _Item] = {}     # assistant items and function calls, until done
        self._known: set[str] = set()          # item ids told to the client
        self._spoken: set[str] = set()         # ... of assistant items with audio (they may be truncated)
        self._cut_ids: set[str] = set()            # ... of those cut by a barge-in or response.cancel
        self._latest: str | None = None        # the latest assistant item
        self._last_item: str | None = None
        self._pending: list[tuple[str, str]] = []  # (item_id, text) waiting for response.create
        self._calls: dict[str, _Item] = {}     # client function calls waiting for their output
        self._answered = False                 # a function output was given: the model goes on by itself
        self._audio_item: _Item | None = None
        self._speech_item: str | None = None
        self._input_ms = 0.0
        self._usage = (0, 0)                   # tokens of the session so far

    # -- what the gateway drives -----------------------------------------------------------------------
    def client_gone(self, now: float) -> None:
        """Nobody is left to answer the client's function calls: the model is told so."""
        for call_id in list(self._calls):
            del self._calls[call_id]
            self._s.tool_finished(call_id, False, tool_calls.error_result(
                "client_gone", "the client that runs this tool disconnected"), now)
        self._s.client_gone(now)

    def receive_audio(self, data: bytes, now: float) -> None:
        if not self._s.accepting:
            return
        self._error("invalid_request_error", "invalid_event", "binary frames are not part of the Realtime protocol: "
                    "send audio as input_audio_buffer.append", None, now)

    def receive_text(self, text: str | bytes, now: float) -> None:
        if not self._s.accepting:
            return
        try:
            event = orjson.loads(text)
        except (orjson.JSONDecodeError, TypeError) as e:
            self._error("invalid_request_error", "invalid_json", f"the event is not valid UTF-8 JSON: {e}", None, now)
            return
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            self._error("invalid_request_error", "invalid_event", "an event is a JSON object with a 'type'", None, now)
            return
        kind, event_id = event["type"], event.get("event_id")
        handler = _HANDLERS.get(kind)
        if self._start_by is not None and kind != "session.update":
            self._start(now)
        if handler is None:
            shown = kind if len(kind) <= 64 else kind[:64] + "…"
            self._error("invalid_request_error", "unknown_event", f"unknown event type '{shown}'", event_id, now)
            return
        try:
            handler(self, event, now)
        except Refused as e:
            self._error("invalid_request_error", e.code, e.message, event_id, now, param=e.param)

    # -- client events ------------------------------------------------------------------------------------
    def _session_update(self, event: dict, now: float) -> None:
        session = event.get("session")
        if not isinstance(session, dict):
            raise Refused("session", "'session' must be an object", "invalid_value")
        if session.get("type", "realtime") != "realtime":
            raise Refused("session.type", "only 'realtime' (speech to speech) sessions are served here; "
                          "transcription sessions are not")
        self._refused = []
        for key, value in sorted(session.items(), key=lambda kv: kv[0] == "tool_choice"):  # tools first
            self._try(self._apply, key, value)
        choice = self._tool_choice
        if isinstance(choice, dict) and choice["name"] not in {t["name"] for t in self._tools} | self._cfg.server_tools:
            self._tool_choice = "auto"
            if not any(e.param == "session.tool_choice" for e in self._refused):  # one error per field
                self._refused.append(Refused("session.tool_choice", f"'{choice['name']}' is no longer a tool: the "
                                             "tool choice is 'auto' again", "invalid_value"))
        refused, self._refused = self._refused, []
        for e in refused:
            self._error("invalid_request_error", e.code, e.message, event.get("event_id"), now, param=e.param)
        if self._start_by is not None:
            self._start(now)
        else:
            self._configure(now)
        if self._ready is None:
            self._updated_owed = True
        else:
            self._emit({"type": "session.updated", "session": self._session_object()})

    def _try(self, apply: Callable[..., None], *args: Any) -> None:
        """Apply one field; a refusal is told, and the rest of the update still applies."""
        try:
            apply(*args)
        except Refused as e:
            self._refused.append(e)

    def _apply(self, key: str, value: Any) -> None:
        """One field of a session.update: applied, or Refused."""
        match key:
            case "type" | "model" | "object" | "id" | "expires_at":
                pass  # the gateway's model serves every session
            case "instructions":
                if not isinstance(value, str):
                    raise Refused("session.instructions", "'instructions' must be a string", "invalid_value")
                if not self._cfg.client_instructions:
                    raise Refused("session.instructions", "this gateway sets the instructions itself "
                                  "(NOVAGATE_REALTIME_CLIENT_INSTRUCTIONS=false); yours were not applied")
                self._instructions = value
            case "audio":
                if not isinstance(value, dict):
                    raise Refused("session.audio", "'audio' must be an object", "invalid_value")
                for part in ("input", "output"):
                    if isinstance(value.get(part), dict):
                        for k, v in value[part].items():
                            self._try(self._audio_input if part == "input" else self._audio_output, k, v)
            case "tools":
                self._set_tools(value)
            case "tool_choice":
                self._set_tool_choice(value)
            case "output_modalities":
                if value not in (None, ["audio"]):
                    raise Refused("session.output_modalities", "Nova Sonic always answers in speech (with its "
                                  "transcript): only [\"audio\"]")
            case "max_output_tokens":
                if value not in (None, "inf"):
                    raise Refused("session.max_output_tokens", "Nova Sonic takes no output token limit per response")
            case "truncation":
                if value not in (None, "auto"):
                    raise Refused("session.truncation", "the gateway keeps the history within the model's limits "
                                  "itself (newest first): only 'auto'")
            case "parallel_tool_calls":
                if value is False:
                    raise Refused("session.parallel_tool_calls", "Nova Sonic decides how many tools it calls")
            case "tracing" | "prompt" | "include" | "reasoning":
                if value:
                    raise Refused(f"session.{key}", f"'{key}' has no equivalent with Nova Sonic")
            case "novagate":
                resume = value.get("resume") if isinstance(value, dict) else None
                if resume is not None:
                    if not isinstance(resume, str):
                        raise Refused("session.novagate.resume", "'resume' must be a resume token", "invalid_value")
                    if self._start_by is None:
                        raise Refused("session.novagate.resume", "resume in the first session.update, sent as the "
                                      "socket opens, or with the 'resume' query parameter; this session has started")
                    self._resume = resume
            case _:
                raise Refused(f"session.{key}", f"unknown session field '{key}'", "unknown_parameter")

    def _format(self, value: Any, param: str, current: str) -> str:
        """The session codec of an audio format: audio/pcm (24 kHz) or audio/pcmu (G.711 mu-law, 8 kHz);
        chosen before the session starts (the first session.update), fixed after."""
        if not isinstance(value, dict):
            raise Refused(param, "'format' must be an object", "invalid_value")
        kind = value.get("type", "audio/pcm")
        if kind not in ("audio/pcm", "audio/pcmu"):
            raise Refused(f"{param}.type", f"'{str(kind)[:20]}' is not offered: audio/pcm (24 kHz) or audio/pcmu")
        if kind == "audio/pcm" and value.get("rate", RATE) != RATE:
            raise Refused(f"{param}.rate", "audio/pcm is 24000 Hz", "invalid_value")
        codec = "mulaw" if kind == "audio/pcmu" else "pcm16"
        if codec != current and self._start_by is None:
            raise Refused(param, "the audio format is chosen in the first session.update, sent as the socket opens")
        return codec

    def _audio_input(self, key: str, value: Any) -> None:
        match key:
            case "format":
                self._codecs["input"] = self._format(value, "session.audio.input.format", self._codecs["input"])
            case "transcription":
                if value is not None and not isinstance(value, dict):
                    raise Refused("session.audio.input.transcription", "'transcription' must be an object or null",
                                  "invalid_value")
                self._transcription = value  # Nova's own recognition, whatever model is named
            case "noise_reduction":
                if value is not None:
                    raise Refused("session.audio.input.noise_reduction", "no noise reduction before Nova Sonic")
            case "turn_detection":
                self._set_turn_detection(value)
            case _:
                raise Refused(f"session.audio.input.{key}", f"unknown field '{key}'", "unknown_parameter")

    def _set_turn_detection(self, td: Any) -> None:
        param = "session.audio.input.turn_detection"
        if td is None:
            raise Refused(param, "Nova Sonic always detects the end of the user's turn itself: turn detection "
                          "cannot be turned off (no manual commit)")
        if not isinstance(td, dict) or td.get("type") not in ("server_vad", "semantic_vad"):
            raise Refused(f"{param}.type", "'type' must be server_vad or semantic_vad", "invalid_value")
        for flag in ("create_response", "interrupt_response"):
            if td.get(flag) is False:
                raise Refused(f"{param}.{flag}", "Nova Sonic always answers the user's turn and always stops "
                              "when the user speaks over it")
        if td.get("idle_timeout_ms") is not None:
            raise Refused(f"{param}.idle_timeout_ms", "Nova Sonic does not prompt a silent user")
        for k, default in VAD_DEFAULTS.items():
            if td.get(k) is not None and td[k] != default:
                raise Refused(f"{param}.{k}", f"Nova Sonic's own voice detection has no '{k}' setting")
        sensitivity = _sensitivity(td)
        if sensitivity is not None and not self._cfg.endpointing:
            raise Refused(param, "this model has no endpointing setting (Nova Sonic v1)")
        self._turn_detection = {k: v for k, v in td.items() if v is not None}

    def _audio_output(self, key: str, value: Any) -> None:
        match key:
            case "format":
                self._codecs["output"] = self._format(value, "session.audio.output.format", self._codecs["output"])
            case "voice":
                if not isinstance(value, str):
                    raise Refused("session.audio.output.voice", "custom voices do not exist with Nova Sonic: "
                                  f"one of {', '.join(VOICES)} or a Nova voice name")
                nova = VOICES.get(value, value)
                if not re.fullmatch(r"[a-z]{2,20}", nova) or (self._cfg.voices and nova not in self._cfg.voices):
                    raise Refused("session.audio.output.voice", f"'{value[:40]}' is not a voice of this model: one of "
                                  f"{', '.join(VOICES)}, or a Nova voice ({', '.join(self._cfg.voices) or 'any'})",
                                  "invalid_value")
                self._voice = value
            case "speed":
                if value not in (None, 1, 1.0):
                    raise Refused("session.audio.output.speed", "Nova Sonic speaks at one speed")
            case _:
                raise Refused(f"session.audio.output.{key}", f"unknown field '{key}'", "unknown_parameter")

    def _set_tools(self, tools: Any) -> None:
        if tools is None:
            tools = []
        if not isinstance(tools, list):
            raise Refused("session.tools", "'tools' must be a list", "invalid_value")
        kept = []
        for i, tool in enumerate(tools):
            self._try(self._add_tool, kept, i, tool)
        self._tools = kept

    def _add_tool(self, kept: list[dict], i: int, tool: Any) -> None:
        param = f"session.tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise Refused(param, "only function tools: MCP servers are configured on the gateway "
                          "(NOVAGATE_MCP_CONFIG, docs/tools.md)")
        name = tool.get("name")
        if not isinstance(name, str) or not _TOOL_NAME.fullmatch(name):
            raise Refused(f"{param}.name", "a tool name is 1-64 letters, digits, '_' or '-'", "invalid_value")
        if name in self._cfg.server_tools:
            raise Refused(f"{param}.name", f"'{name}' is a tool of the gateway itself: name yours differently",
                          "invalid_value")
        params = tool.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            raise Refused(f"{param}.parameters", "'parameters' must be a JSON schema object", "invalid_value")
        if any(t["name"] == name for t in kept):
            raise Refused(f"{param}.name", f"two tools named '{name}'", "invalid_value")
        kept.append({"type": "function", "name": name, "description": str(tool.get("description") or ""),
                     "parameters": params})

    def _set_tool_choice(self, choice: Any) -> None:
        names = {t["name"] for t in self._tools} | self._cfg.server_tools
        if choice in (None, "auto", "required"):
            self._tool_choice = choice or "auto"
        elif choice == "none":
            raise Refused("session.tool_choice", "Nova Sonic has no 'none' tool choice (send tools: [] to declare "
                          "none of yours; the gateway's own tools stay available)")
        elif isinstance(choice, dict) and choice.get("type") == "function" and choice.get("name") in names:
            self._tool_choice = {"type": "function", "name": choice["name"]}
        else:
            raise Refused("session.tool_choice", "'auto', 'required' or {type: function, name} of a declared tool",
                          "invalid_value")

    def _input_audio_buffer_append(self, event: dict, now: float) -> None:
        audio = event.get("audio")
        try:
            pcm = base64.b64decode(audio, validate=True) if isinstance(audio, str) else None
        except (binascii.Error, ValueError):
            pcm = None
        if pcm is None:
            raise Refused("audio", "'audio' must be base64 of 24 kHz 16-bit mono PCM", "invalid_value")
        self._input_ms += len(pcm) / (8 if self._codecs["input"] == "mulaw" else RATE * 2 / 1000)
        for i in range(0, len(pcm), m.MAX_FRAME_BYTES):
            self._s.receive_audio(pcm[i:i + m.MAX_FRAME_BYTES], now)

    def _input_audio_buffer_commit(self, event: dict, now: float) -> None:
        raise Refused("type", "Nova Sonic ends the user's turn itself when they stop speaking: there is no "
                      "buffer to commit (input_audio_buffer.committed comes when it does)")

    def _input_audio_buffer_clear(self, event: dict, now: float) -> None:
        raise Refused("type", "audio goes to Nova Sonic as it arrives: there is no buffer to clear")

    def _output_audio_buffer_clear(self, event: dict, now: float) -> None:
        raise Refused("type", "there is no output audio buffer on a WebSocket: send response.cancel")

    def _item_create(self, event: dict, now: float) -> None:
        item = event.get("item")
        if not isinstance(item, dict):
            raise Refused("item", "'item' must be an object", "invalid_value")
        previous = event.get("previous_item_id")
        if previous is not None and previous != self._last_item:
            raise Refused("previous_item_id", "items are only appended to the end of the conversation")
        kind = item.get("type", "message")
        if kind == "function_call_output":
            self._function_output(item, now)
            return
        if kind != "message" or item.get("role") != "user":
            raise Refused("item.type", "only user messages and function_call_output items can be added: Nova "
                          "Sonic takes no other turn mid-conversation")
        content = item.get("content")
        if not isinstance(content, list) or not content:
            raise Refused("item.content", "'content' must be a list of input_text parts", "invalid_value")
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "input_text":
                raise Refused("item.content", "only input_text parts: speak audio with input_audio_buffer.append")
            if not isinstance(part.get("text"), str) or not part["text"].strip():
                raise Refused("item.content.text", "'text' must be a non-empty string", "invalid_value")
            texts.append(part["text"])
        text = " ".join(texts)
        if len(text) > m.MAX_TEXT_CHARS:
            raise Refused("item.content.text", f"a typed turn is at most {m.MAX_TEXT_CHARS} characters",
                          codes.TEXT_TOO_LONG)
        item_id = item.get("id")
        if item_id is not None and (not isinstance(item_id, str) or not _ITEM_ID.fullmatch(item_id)
                                    or item_id in self._known or any(i.item_id == item_id for i in self._s.history)):
            raise Refused("item.id", "an item id is 1-64 letters, digits or _.:- and new to this conversation",
                          "invalid_value")
        if self._pending:
            raise Refused("item", "a user message already waits for response.create: Nova Sonic answers every "
                          "typed turn, so they go one at a time")
        item_id = item_id or self._new_id("item")
        self._pending.append((item_id, text))
        told = {"id": item_id, "object": "realtime.item", "type": "message", "role": "user", "status": "completed",
                "content": [{"type": "input_text", "text": text}]}
        self._told_item(told)

    def _function_output(self, item: dict, now: float) -> None:
        call = self._calls.pop(item.get("call_id"), None) if isinstance(item.get("call_id"), str) else None
        if call is None:
            raise Refused("item.call_id", "no function call waits for this call_id (answered, timed out, or unknown)",
                          "invalid_value")
        output = item.get("output")
        if not isinstance(output, str):
            output = orjson.dumps(output).decode()
        try:
            orjson.loads(output)
        except orjson.JSONDecodeError:
            output = orjson.dumps(output).decode()  # Nova takes JSON: plain text becomes a JSON string
        told = {"id": item.get("id") if isinstance(item.get("id"), str) else self._new_id("item"),
                "object": "realtime.item", "type": "function_call_output", "call_id": call.call["call_id"],
                "output": item.get("output") if isinstance(item.get("output"), str) else output, "status": "completed"}
        self._told_item(told)
        self._answered = True
        self._s.tool_finished(call.call["call_id"], True, output, now)

    def _item_truncate(self, event: dict, now: float) -> None:
        item_id, ms = event.get("item_id"), event.get("audio_end_ms")
        if not isinstance(item_id, str) or not item_id:
            raise Refused("item_id", "'item_id' must be an item's id", "invalid_value")
        if not isinstance(ms, int) or isinstance(ms, bool) or ms < 0:
            raise Refused("audio_end_ms", "'audio_end_ms' must be an integer >= 0", "invalid_value")
        if item_id not in self._spoken:
            raise Refused("item_id", f"no assistant item '{item_id[:64]}' was spoken in this session", "invalid_value")
        if item_id not in self._cut_ids:
            if item_id != self._latest or not self._s.responding:
                raise Refused("item_id", "this item was played to its end and is stored whole; only the item "
                              "being played can be truncated")
            for r in self._responses:
                r.cancelled = r.cancelled or "client_cancelled"
            self._s.cancel_response(now)  # the client stopped playing it: a cut, as at a barge-in
        self._s.receive_message(m.PlaybackTruncate(item_id, ms), now)
        self._emit({"type": "conversation.item.truncated", "item_id": item_id, "content_index": 0,
                    "audio_end_ms": ms})

    def _item_unsupported(self, event: dict, now: float) -> None:
        raise Refused("type", f"{event['type']} is not offered: the conversation is durable history "
                      "(read it with GET /v1/conversations/{id}/history)")

    def _response_create(self, event: dict, now: float) -> None:
        params = event.get("response") or {}
        if not isinstance(params, dict):
            raise Refused("response", "'response' must be an object", "invalid_value")
        for key, value in params.items():
            if key == "metadata" or value in (None, "auto", "inf") or (key, value) == ("output_modalities", ["audio"]):
                continue
            raise Refused(f"response.{key}", "a response with its own settings (out of band, other instructions, "
                          "tools or modalities) has no Nova Sonic equivalent; change the session instead")
        if self._ready is None:  # sent as soon as the session is ready
            self._create_owed = True
            self._owed = self._pending.pop() if self._pending else None
            return
        self._send_pending(now)

    def _send_pending(self, now: float) -> None:
        if self._pending or self._owed:
            item_id, text = self._owed or self._pending.pop()
            self._owed = None
            self._s.receive_message(m.InputText(text, item_id), now)
        elif self._answered or self._s.responding or self._calls:
            pass  # the model answers (or goes on after a function output) by itself
        else:
            raise Refused("type", "nothing to respond to: Nova Sonic answers when the user stops speaking, or to a "
                          "user message added with conversation.item.create")
        self._answered = False

    def _response_cancel(self, event: dict, now: float) -> None:
        if not self._s.responding:
            raise Refused("type", "there is no response to cancel", "response_cancel_not_active")
        for r in self._responses:
            r.cancelled = r.cancelled or "client_cancelled"
        self._s.cancel_response(now)

    # -- starting and configuring the session ---------------------------------------------------------------
    def _start(self, now: float) -> None:
        self._start_by = None
        voice = VOICES.get(self._voice, self._voice) if self._voice else None
        rates = {c: MULAW_RATE if codec == "mulaw" else RATE for c, codec in self._codecs.items()}
        self._s.receive_message(m.SessionStart(resume=self._resume, input_sample_rate=rates["input"],
                                               output_sample_rate=rates["output"], input_codec=self._codecs["input"],
                                               output_codec=self._codecs["output"],
                                               voice=voice), now)
        self._configure(now)

    def _configure(self, now: float) -> None:
        base = self._s.prompt
        if base is None:
            return
        if self._prompt is None:
            self._prompt = base  # the gateway's own: system prompt, tools, endpointing
        tools = tuple(t for t in self._prompt.tools if t["toolSpec"]["name"] in self._cfg.server_tools) + tuple(
            {"toolSpec": {"name": t["name"], "description": t["description"] or t["name"],
                          "inputSchema": {"json": orjson.dumps(t["parameters"]).decode()}}} for t in self._tools)
        choice = self._tool_choice
        prompt = replace(
            self._prompt,
            system_prompt=self._instructions if self._instructions is not None else self._prompt.system_prompt,
            voice=VOICES.get(self._voice, self._voice) if self._voice else self._prompt.voice,
            endpointing_sensitivity=_sensitivity(self._turn_detection) or self._prompt.endpointing_sensitivity,
            tools=tools,
            tool_choice={"any": {}} if choice == "required" else {"tool": {"name": choice["name"]}}
            if isinstance(choice, dict) else None,
        )
        self._s.configure(prompt, now)

    @property
    def _client_tools(self) -> set[str]:
        return {t["name"] for t in self._tools}

    @property
    def _voice_name(self) -> str:
        prompt = self._s.prompt
        return self._voice or (prompt.voice if prompt is not None else "")

    def _session_object(self) -> dict:
        ready = self._ready
        out = {
            "type": "realtime", "object": "realtime.session", "id": self._s.session_id, "model": self._cfg.model,
            "output_modalities": ["audio"],
            "instructions": self._instructions if self._instructions is not None
            else (self._s.prompt.system_prompt if self._s.prompt else ""),
            "audio": {
                "input": {"format": _FORMATS[self._codecs["input"]], "transcription": self._transcription,
                          "noise_reduction": None, "turn_detection": self._turn_detection},
                "output": {"format": _FORMATS[self._codecs["output"]], "voice": self._voice_name, "speed": 1.0},
            },
            "tools": self._tools, "tool_choice": self._tool_choice, "max_output_tokens": "inf",
            "truncation": "auto", "tracing": None,
        }
        if ready is not None:
            out["novagate"] = dict(self._told)
        return out

    # -- session output -> Realtime events -------------------------------------------------------------------
    def _translate(self) -> None:
        for e in self._s.effects():
            match e:
                case SendMessage(message=msg):
                    self._message(msg)
                case SendAudio(pcm=pcm):
                    self._audio(pcm)
                case RunTool(call_id=call_id, name=name, arguments=arguments) if name in self._client_tools:
                    self._function_call(call_id, name, arguments)
                case CancelTool(call_id=call_id) if call_id in self._calls:
                    del self._calls[call_id]  # timed out: the model was answered with the timeout
                case _:
                    self._out.append(e)

    def _message(self, msg: Any) -> None:
        match msg:
            case m.SessionReady():
                self._ready = msg
                self._told = {"conversation_id": msg.conversation_id, "resume_token": msg.resume_token,
                              "resumed": msg.resumed, "history_length": msg.history_length, "history": msg.history,
                              "engine": msg.engine}
                if msg.resume_failed:
                    self._told["resume_failed"] = msg.resume_failed
                self._known.update(i["item_id"] for i in msg.history)
                if self._last_item is None and msg.history:  # items added before it follow the history
                    self._last_item = msg.history[-1]["item_id"]
                self._emit({"type": "session.created", "session": self._session_object()})
                if self._updated_owed:
                    self._updated_owed = False
                    self._emit({"type": "session.updated", "session": self._session_object()})
                if self._create_owed:
                    self._create_owed = False
                    try:
                        self._send_pending(self._s.now)
                    except Refused as e:
                        self._error("invalid_request_error", e.code, e.message, None, self._s.now, param=e.param)
            case m.SessionUpdated(conversation_id=cid, resume_token=token):
                self._told.update(conversation_id=cid, resume_token=token)
                self._emit({"type": "session.updated", "session": self._session_object()})
            case m.Transcript(role="user", item_id=item_id, text=text):
                self._user_item(item_id, text)
            case m.Transcript(role="assistant", final=False, item_id=item_id, text=text):
                if (it := self._assistant(item_id)) is not None:
                    self._transcript_delta(it, text)
            case m.Transcript(role="assistant", item_id=item_id, text=text):
                if (it := self._items.get(item_id)) is not None:  # a turn without speech: its text ends it
                    self._transcript_delta(it, text)
                    self._finish(it, text)
            case m.ResponseAudioStart(item_id=item_id):
                if (it := self._assistant(item_id)) is not None:
                    it.audio = True
                    self._audio_item = it
                    self._spoken.add(item_id)
            case m.ResponseAudioEnd(item_id=item_id, reason=reason):
                if reason == "interrupted":
                    self._cut_ids.add(item_id)
                if (it := self._items.get(item_id)) is not None:  # generated: done (it may still be playing)
                    it.response.closed = True
                    if reason == "interrupted":
                        self._cut(it)
                    else:
                        self._finish(it)
            case m.Interrupted(item_id=item_id):
                self._cut_ids.add(item_id)
                if (it := self._items.get(item_id)) is not None:
                    self._cut(it)
            case m.Usage(input_tokens=i, output_tokens=o):
                self._usage = (i, o)  # the session's, across its model streams
            case m.InputSpeechStarted(item_id=item_id):
                self._speech_item = item_id
                self._emit({"type": "input_audio_buffer.speech_started", "audio_start_ms": round(self._input_ms),
                            "item_id": item_id})
            case m.InputSpeechStopped():
                self._speech_stopped()
            case m.Error(code=code, message=message, fatal=fatal):
                kind = "invalid_request_error" if code in _CLIENT_ERRORS else "server_error"
                self._emit({"type": "error", "error": {"type": kind, "code": code, "message": message,
                                                       **({"novagate_fatal": True} if fatal else {})}})
            case _:
                pass  # status, item.saved, tool.call, session.reconnect (the close says it), pong

    def _speech_stopped(self) -> None:
        """Once per speech_started, and before its item is committed (the session may tell the end of
        an utterance after the model has recognised it)."""
        if self._speech_item is not None:
            self._emit({"type": "input_audio_buffer.speech_stopped", "audio_end_ms": round(self._input_ms),
                        "item_id": self._speech_item})
            self._speech_item = None

    def _user_item(self, item_id: str, text: str) -> None:
        if item_id in self._known:
            return  # a typed message, told when it was added
        if self._speech_item == item_id:
            self._speech_stopped()
        self._emit({"type": "input_audio_buffer.committed", "item_id": item_id, "previous_item_id": self._last_item})
        transcript = text if self._transcription is not None else None
        item = {"id": item_id, "object": "realtime.item", "type": "message", "role": "user", "status": "completed",
                "content": [{"type": "input_audio", "transcript": transcript}]}
        self._told_item(item)
        if self._transcription is not None:
            self._emit({"type": "conversation.item.input_audio_transcription.completed", "item_id": item_id,
                        "content_index": 0, "transcript": text, "usage": {"type": "duration", "seconds": 0}})

    def _told_item(self, item: dict) -> None:
        """A complete item: added and done at once."""
        self._emit({"type": "conversation.item.added", "previous_item_id": self._last_item, "item": item})
        self._emit({"type": "conversation.item.done", "previous_item_id": self._last_item, "item": item})
        self._known.add(item["id"])
        self._last_item = item["id"]

    def _response(self) -> _Response:
        """The response new output joins: the open one, or a new one."""
        if self._responses and not self._responses[-1].closed:
            return self._responses[-1]
        for it in [i for r in self._responses for i in r.items if not i.done]:
            it.incomplete = True  # never ended (its audio was dropped unheard): the model has moved on
            self._finish(it)
        self._answered = False  # the model goes on: a later response.create is a new request
        r = _Response(self._new_id("resp"), usage_from=self._usage)
        self._responses.append(r)
        self._emit({"type": "response.created", "response": self._response_object(r, "in_progress")})
        return r

    def _assistant(self, item_id: str) -> _Item | None:
        """The assistant item, told as a new output of the open response the first time (None: done)."""
        it = self._items.get(item_id)
        if it is not None or item_id in self._known:
            return it
        r = self._response()
        it = self._items[item_id] = _Item(item_id, r)
        self._latest = item_id
        r.items.append(it)
        item = {"id": item_id, "object": "realtime.item", "type": "message", "role": "assistant",
                "status": "in_progress", "content": []}
        self._emit({"type": "response.output_item.added", "response_id": r.id, "output_index": len(r.items) - 1,
                    "item": item})
        self._emit({"type": "conversation.item.added", "previous_item_id": self._last_item, "item": item})
        self._known.add(item_id)
        self._last_item = item_id
        self._emit({**self._part(it), "type": "response.content_part.added",
                    "part": {"type": "audio", "transcript": ""}})
        return it

    def _part(self, it: _Item) -> dict:
        return {"response_id": it.response.id, "item_id": it.id, "output_index": it.response.items.index(it),
                "content_index": 0}

    def _transcript_delta(self, it: _Item, text: str) -> None:
        if it.done or not text.startswith(it.transcript) or len(text) == len(it.transcript):
            return  # nothing new (a final that differs from the plan is told in full when the item is done)
        delta, it.transcript = text[len(it.transcript):], text
        self._emit({**self._part(it), "type": "response.output_audio_transcript.delta", "delta": delta})

    def _audio(self, pcm: bytes) -> None:
        it = self._audio_item
        if it is None or it.done:
            return
        self._events += 1
        # the hot path: one JSON text per audio frame, built without a dict
        self._out.append(SendText(
            '{"type":"response.output_audio.delta","event_id":"event_%d","response_id":"%s","item_id":"%s",'
            '"output_index":%d,"content_index":0,"delta":"%s"}' % (
                self._events, it.response.id, it.id, it.response.items.index(it), base64.b64encode(pcm).decode())))

    def _audio_done(self, it: _Item) -> None:
        if it.audio and not it.audio_done:
            it.audio_done = True
            self._emit({**self._part(it), "type": "response.output_audio.done"})
        if self._audio_item is it:
            self._audio_item = None

    def _cut(self, it: _Item) -> None:
        """Barge-in (or response.cancel): the item ends where the client stopped playing it."""
        it.incomplete = True
        it.response.closed = True
        it.response.cancelled = it.response.cancelled or "turn_detected"
        self._finish(it)

    def _finish(self, it: _Item, text: str | None = None) -> None:
        if it.done:
            return
        self._audio_done(it)
        it.done = True
        if text is not None:
            it.transcript = text
        part = self._part(it)
        self._emit({**part, "type": "response.output_audio_transcript.done", "transcript": it.transcript})
        self._emit({**part, "type": "response.content_part.done",
                    "part": {"type": "audio", "transcript": it.transcript}})
        item = self._item_object(it)
        self._emit({"type": "response.output_item.done", "response_id": it.response.id,
                    "output_index": part["output_index"], "item": item})
        self._emit({"type": "conversation.item.done", "item": item})
        del self._items[it.id]
        if not it.audio:
            it.response.closed = True  # a turn without speech ends with its text
        self._maybe_done()

    def _function_call(self, call_id: str, name: str, arguments: dict) -> None:
        r = self._response()
        args = orjson.dumps(arguments).decode()
        it = _Item(self._new_id("item"), r, kind="function_call", done=True,
                   call={"call_id": call_id, "name": name, "arguments": args})
        r.items.append(it)
        r.closed = True  # the client answers it before anything more is said
        self._calls[call_id] = it
        item = self._item_object(it, "in_progress")
        index = len(r.items) - 1
        self._emit({"type": "response.output_item.added", "response_id": r.id, "output_index": index, "item": item})
        self._emit({"type": "conversation.item.added", "previous_item_id": self._last_item, "item": item})
        self._known.add(it.id)
        self._last_item = it.id
        self._emit({"type": "response.function_call_arguments.delta", "response_id": r.id, "item_id": it.id,
                    "output_index": index, "call_id": call_id, "delta": args})
        self._emit({"type": "response.function_call_arguments.done", "response_id": r.id, "item_id": it.id,
                    "output_index": index, "call_id": call_id, "name": name, "arguments": args})
        item = self._item_object(it)
        self._emit({"type": "response.output_item.done", "response_id": r.id, "output_index": index, "item": item})
        self._emit({"type": "conversation.item.done", "item": item})
        self._maybe_done()

    def _item_object(self, it: _Item, status: str | None = None) -> dict:
        status = status or ("incomplete" if it.incomplete else "completed")
        if it.kind == "function_call":
            return {"id": it.id, "object": "realtime.item", "type": "function_call", "status": status, **it.call}
        return {"id": it.id, "object": "realtime.item", "type": "message", "role": "assistant", "status": status,
                "content": [{"type": "output_audio", "transcript": it.transcript}]}

    def _maybe_done(self) -> None:
        """Responses are done in order, once closed and all their items are."""
        while self._responses and self._responses[0].closed and all(i.done for i in self._responses[0].items):
            r = self._responses.pop(0)
            status = "cancelled" if r.cancelled else "completed"
            self._emit({"type": "response.done", "response": self._response_object(r, status)})

    def _response_object(self, r: _Response, status: str) -> dict:
        out: dict[str, Any] = {"id": r.id, "object": "realtime.response", "status": status,
                               "output": [self._item_object(i) for i in r.items] if status != "in_progress" else [],
                               "output_modalities": ["audio"], "conversation_id": self._told.get("conversation_id"),
                               "audio": {"output": {"format": _FORMATS[self._codecs["output"]],
                                                    "voice": self._voice_name}},
                               "max_output_tokens": "inf", "usage": None, "status_details": None}
        if status == "cancelled":
            out["status_details"] = {"type": "cancelled", "reason": r.cancelled}
        if status != "in_progress":
            i = max(0, self._usage[0] - r.usage_from[0])
            o = max(0, self._usage[1] - r.usage_from[1])
            out["usage"] = {"total_tokens": i + o, "input_tokens": i, "output_tokens": o}
        return out

    # -- output ----------------------------------------------------------------------------------------------
    def _emit(self, event: dict) -> None:
        """A server event, after whatever the session said before it."""
        self._translate()
        self._events += 1
        self._out.append(SendText(orjson.dumps({"type": event.pop("type"), "event_id": f"event_{self._events}",
                                                **event}).decode()))

    def _error(self, kind: str, code: str, message: str, event_id: Any, now: float, *, param: str | None = None):
        if not self._errors.take(now):
            return
        error = {"type": kind, "code": code, "message": message, "param": param,
                 "event_id": event_id if isinstance(event_id, str) else None}
        self._emit({"type": "error", "error": error})


_FORMATS = {"pcm16": {"type": "audio/pcm", "rate": RATE}, "mulaw": {"type": "audio/pcmu"}}


def _sensitivity(td: dict) -> str | None:
    """Nova 2's endpointing sensitivity for a Realtime turn detection setting (None: the default)."""
    if td.get("type") == "semantic_vad" and td.get("eagerness"):
        return EAGERNESS.get(td["eagerness"])
    ms = td.get("silence_duration_ms")
    if td.get("type") == "server_vad" and isinstance(ms, (int, float)):
        return "HIGH" if ms <= 1500 else "MEDIUM" if ms <= 1750 else "LOW"
    return None


_HANDLERS: dict[str, Callable[[RealtimeSession, dict, float], None]] = {
    "session.update": RealtimeSession._session_update,
    "input_audio_buffer.append": RealtimeSession._input_audio_buffer_append,
    "input_audio_buffer.commit": RealtimeSession._input_audio_buffer_commit,
    "input_audio_buffer.clear": RealtimeSession._input_audio_buffer_clear,
    "output_audio_buffer.clear": RealtimeSession._output_audio_buffer_clear,
    "conversation.item.create": RealtimeSession._item_create,
    "conversation.item.truncate": RealtimeSession._item_truncate,
    "conversation.item.retrieve": RealtimeSession._item_unsupported,
    "conversation.item.delete": RealtimeSession._item_unsupported,
    "response.create": RealtimeSession._response_create,
    "response.cancel": RealtimeSession._response_cancel,
}
