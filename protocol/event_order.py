"""Input event-order rules of the Nova Sonic bidirectional stream (reference/nova-sonic.md §2, §4, §9.7).

`InputOrderValidator.check(event)` accepts one input event at a time and raises `EventOrderError` whose
message reads like the service's `ValidationException` text when the event breaks a rule:

* `sessionStart` first and only once; then `promptStart` (once) with a `promptName`; every later event
  carries that `promptName`.
* `contentStart` needs a new, unique `contentName`. The first content block is TEXT, role SYSTEM,
  interactive false. Non-interactive USER/ASSISTANT TEXT blocks (history) come only before the first AUDIO
  block (and before any interactive input), and the first of them is USER. At most one TEXT/TOOL block is
  open at a time. An AUDIO block (role USER) may stay open while interactive TEXT or TOOL blocks are sent.
* `audioInput` needs the open AUDIO block and is rejected while any TEXT/TOOL block is open.
  `textInput` only inside its open TEXT block. `toolResult` only inside its open TOOL block. `contentEnd`
  closes an open block.
* History size, per model (`HistoryLimits`, protocol/models.py; Nova 2: 200 KB in total, 50 KB per message
  and per textInput; Nova Sonic v1 and the conservative fallback: 40 KB in total, 1 KB per textInput): one
  textInput of a non-interactive block (SYSTEM or history), one history message (a block's textInputs
  together) and all history blocks together. A history too large fails like Nova: "Invalid input request:
  chat history …" naming the size and the limit (HISTORY_* below; the gateway classifies on "history" and
  "exceeds"). Interactive text has no such limit.
* A TOOL block answers one `toolUse` of this stream's model: its `toolResultInputConfiguration.toolUseId` must
  be an id the model issued (the engine or emulator reports each one with `model_tool_use(id)`, since the
  validator sees input events only) and not answered yet. Like every TOOL/TEXT block it cannot start while
  another TEXT/TOOL block is open.
* `promptEnd` only when no block is open; `sessionEnd` only when no prompt is open; nothing after `sessionEnd`.

`InputGap` says which accepted input events keep a stream alive under the 532 rule (INPUT_GAP_MESSAGE): an
`audioInput`, or the content of an interactive block (`textInput` of an interactive TEXT block, `toolResult`).
The stand-ins time it (gateway/local/engine.py, gateway/emulate/nova.py).

Pure: no I/O, no clocks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from protocol.models import NOVA_2_HISTORY, HistoryLimits
from protocol.nova_events import (
    MODEL_INPUT_RATE,
    MODEL_INPUT_RATES,
    MODEL_OUTPUT_RATES,
)

INPUT_EVENTS = frozenset(
    {"sessionStart", "promptStart", "contentStart", "textInput", "audioInput", "toolResult", "contentEnd",
     "promptEnd", "sessionEnd"}
)
CONTENT_TYPES = frozenset({"TEXT", "AUDIO", "TOOL"})
TEXT_ROLES = frozenset({"SYSTEM", "USER", "ASSISTANT"})

_PREFIX = "Invalid input request: "

# Nova 2 ends a stream that gets no audio bytes and no interactive content for 55 s (client projects'
# reports; docs/aws.md "What changed since the reference"). Sent as a validationException, as the 531 is.
INPUT_GAP_S = 55.0
INPUT_GAP_MESSAGE = ("InternalErrorCode=532::Timed out waiting for audio bytes or interactive content. "
                     "Please ensure gaps between audio bytes and interactive content are less than 55 seconds.")

# What a history too large is rejected with (after "Invalid input request: "). Stable wording: the gateway
# falls back to smaller limits on a validation message with "history" and "exceeds" in it.
HISTORY_TOTAL_TOO_LARGE = "chat history exceeds {limit} bytes in total ({size} bytes with content {name})"
HISTORY_MESSAGE_TOO_LARGE = "chat history message of {size} bytes exceeds {limit} bytes (content {name})"
HISTORY_INPUT_TOO_LARGE = ("chat history textInput of {size} bytes exceeds {limit} bytes (content {name}; split a "
                           "message into several textInput events)")
SYSTEM_INPUT_TOO_LARGE = ("system prompt textInput of {size} bytes exceeds {limit} bytes (content {name}; split it "
                          "into several textInput events)")


class EventOrderError(Exception):
    """An input event that the service would reject with a ValidationException."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(slots=True)
class ContentBlock:
    """One input content block, as declared by its contentStart."""

    name: str
    type: str  # TEXT | AUDIO | TOOL
    role: str  # SYSTEM | USER | ASSISTANT | TOOL
    interactive: bool
    open: bool = True
    text_bytes: int = 0
    tool_use_id: str | None = None
    sample_rate: int | None = None  # AUDIO blocks

    @property
    def is_history(self) -> bool:
        return self.type == "TEXT" and not self.interactive and self.role in ("USER", "ASSISTANT")


@dataclass(slots=True)
class _State:
    session_started: bool = False
    session_ended: bool = False
    prompt_name: str | None = None
    prompt_ended: bool = False
    blocks: dict[str, ContentBlock] = field(default_factory=dict)
    open_text: ContentBlock | None = None  # the open TEXT or TOOL block
    open_audio: ContentBlock | None = None
    audio_started: bool = False
    interactive_started: bool = False
    history_blocks: int = 0
    history_bytes: int = 0
    tool_uses_pending: set[str] = field(default_factory=set)  # toolUseIds the model issued, not answered yet
    tool_uses_answered: set[str] = field(default_factory=set)


def _fail(message: str) -> EventOrderError:
    return EventOrderError(_PREFIX + message)


def _q(name: object) -> str:
    return f"'{name}'"


class InputOrderValidator:
    """Checks the order and shape of Nova Sonic input events, one event at a time.

    A rejected event leaves the state unchanged (the stream is dead anyway, as with the service).

    `check_tool_use_ids=False` accepts any toolUseId in a TOOL block (for a caller that cannot see the
    model's output, so cannot report its toolUse events). `history`: the stream's model's limits
    (`model_spec(model_id).history`; default Nova 2's)."""

    def __init__(self, *, check_tool_use_ids: bool = True, history: HistoryLimits = NOVA_2_HISTORY) -> None:
        self._s = _State()
        self._check_tool_use_ids = check_tool_use_ids
        self.history_limits = history

    # -- what the model emitted -------------------------------------------------------------------
    def model_tool_use(self, tool_use_id: object) -> None:
        """The model emitted a `toolUse` with this id: one TOOL result block may now answer it. Call it
        before the toolUse reaches the client (its result cannot come earlier)."""
        s = self._s
        if isinstance(tool_use_id, str) and tool_use_id and tool_use_id not in s.tool_uses_answered:
            s.tool_uses_pending.add(tool_use_id)

    # -- properties useful to an engine -----------------------------------------------------------
    @property
    def session_started(self) -> bool:
        return self._s.session_started

    @property
    def session_ended(self) -> bool:
        return self._s.session_ended

    @property
    def prompt_name(self) -> str | None:
        return self._s.prompt_name

    @property
    def prompt_ended(self) -> bool:
        return self._s.prompt_ended

    @property
    def audio_started(self) -> bool:
        """An AUDIO contentStart has been accepted (history is closed from then on)."""
        return self._s.audio_started

    @property
    def open_audio(self) -> ContentBlock | None:
        return self._s.open_audio

    @property
    def open_text(self) -> ContentBlock | None:
        """The open TEXT or TOOL block, if any."""
        return self._s.open_text

    @property
    def history_bytes(self) -> int:
        return self._s.history_bytes

    @property
    def pending_tool_uses(self) -> frozenset[str]:
        """toolUseIds the model issued that no TOOL block has answered yet."""
        return frozenset(self._s.tool_uses_pending)

    def block(self, content_name: str) -> ContentBlock | None:
        """The block declared with this contentName (open or closed)."""
        return self._s.blocks.get(content_name)

    # -- the check --------------------------------------------------------------------------------
    def check(self, event: dict) -> None:
        """Accept `event` or raise EventOrderError (state unchanged on error)."""
        name, body = self._split(event)
        s = self._s
        if s.session_ended:
            raise _fail(f"{name} received after sessionEnd; the session is over")
        if name == "sessionStart":
            if s.session_started:
                raise _fail("sessionStart received twice; a stream carries exactly one session")
            s.session_started = True
            return
        if not s.session_started:
            raise _fail(f"{name} received before sessionStart; sessionStart must be the first event")
        if name == "sessionEnd":
            self._session_end()
            return
        if name == "promptStart":
            self._prompt_start(body)
            return
        if s.prompt_name is None:
            raise _fail(f"{name} received before promptStart; send promptStart after sessionStart")
        prompt = body.get("promptName")
        if prompt != s.prompt_name:
            raise _fail(
                f"{name} has promptName {_q(prompt)} but the active prompt is {_q(s.prompt_name)}"
            )
        if s.prompt_ended:
            raise _fail(f"{name} received after promptEnd for prompt {_q(s.prompt_name)}")
        if name == "contentStart":
            self._content_start(body)
        elif name == "textInput":
            self._text_input(body)
        elif name == "audioInput":
            self._audio_input(body)
        elif name == "toolResult":
            self._tool_result(body)
        elif name == "contentEnd":
            self._content_end(body)
        elif name == "promptEnd":
            self._prompt_end()

    # -- rules ------------------------------------------------------------------------------------
    @staticmethod
    def _split(event: object) -> tuple[str, dict]:
        if not isinstance(event, dict) or not isinstance(event.get("event"), dict):
            raise _fail("malformed event: expected an object of the form {\"event\": {<eventName>: {...}}}")
        inner = event["event"]
        if len(inner) != 1:
            raise _fail(f"malformed event: expected exactly one event name, got {len(inner)}")
        ((name, body),) = inner.items()
        if name not in INPUT_EVENTS:
            raise _fail(f"unknown input event {_q(name)}")
        if not isinstance(body, dict):
            raise _fail(f"malformed {name}: the event body must be an object")
        return name, body

    def _prompt_start(self, body: dict) -> None:
        s = self._s
        if s.prompt_name is not None:
            raise _fail("promptStart received twice; a session carries exactly one prompt")
        prompt = body.get("promptName")
        if not isinstance(prompt, str) or not prompt:
            raise _fail("promptStart requires a non-empty promptName")
        audio_cfg = body.get("audioOutputConfiguration")
        if audio_cfg is not None:
            if not isinstance(audio_cfg, dict):
                raise _fail("promptStart audioOutputConfiguration must be an object")
            rate = audio_cfg.get("sampleRateHertz")
            if rate is not None and rate not in MODEL_OUTPUT_RATES:
                raise _fail(
                    f"promptStart audioOutputConfiguration.sampleRateHertz {rate} is not supported "
                    f"(use one of {sorted(MODEL_OUTPUT_RATES)})"
                )
        s.prompt_name = prompt

    def _content_start(self, body: dict) -> None:
        s = self._s
        cname = body.get("contentName")
        if not isinstance(cname, str) or not cname:
            raise _fail("contentStart requires a non-empty contentName")
        if cname in s.blocks:
            raise _fail(f"contentStart reuses contentName {_q(cname)}; every content block needs a new contentName")
        ctype = body.get("type")
        if ctype not in CONTENT_TYPES:
            raise _fail(f"contentStart {_q(cname)} has unsupported type {_q(ctype)} (TEXT, AUDIO or TOOL)")
        role = body.get("role")
        interactive = body.get("interactive", False)
        if not isinstance(interactive, bool):
            raise _fail(f"contentStart {_q(cname)} interactive must be a boolean")
        if s.open_text is not None:
            raise _fail(
                f"contentStart {_q(cname)} ({ctype}) received while {s.open_text.type} content "
                f"{_q(s.open_text.name)} is open; send its contentEnd first"
            )
        first = not s.blocks
        if first and not (ctype == "TEXT" and role == "SYSTEM"):
            raise _fail(
                f"the first content block must be TEXT with role SYSTEM (the system prompt), got {ctype} role {role}"
            )
        block = ContentBlock(cname, ctype, str(role), interactive)
        if ctype == "TEXT":
            if role not in TEXT_ROLES:
                raise _fail(f"TEXT contentStart {_q(cname)} has unsupported role {_q(role)}")
            if role == "SYSTEM":
                if not first:
                    raise _fail("a SYSTEM text block is only allowed as the first content block")
                if interactive:
                    raise _fail("the SYSTEM text block must be sent with interactive false")
            elif not interactive:  # chat history
                if s.audio_started:
                    raise _fail(
                        f"chat history (non-interactive {role} text) received after audio streaming started; "
                        "history must be sent once, after the system prompt and before the AUDIO contentStart"
                    )
                if s.interactive_started:
                    raise _fail(
                        f"chat history (non-interactive {role} text) received after interactive input; "
                        "history must be complete before any new user input begins"
                    )
                if s.history_blocks == 0 and role != "USER":
                    raise _fail("chat history must start with a USER message, got ASSISTANT first")
        elif ctype == "AUDIO":
            if role != "USER":
                raise _fail(f"AUDIO contentStart {_q(cname)} must have role USER, got {_q(role)}")
            if s.open_audio is not None:
                raise _fail(
                    f"AUDIO contentStart {_q(cname)} received while AUDIO content {_q(s.open_audio.name)} is open"
                )
            cfg = body.get("audioInputConfiguration")
            if cfg is not None and not isinstance(cfg, dict):
                raise _fail(f"AUDIO contentStart {_q(cname)} audioInputConfiguration must be an object")
            rate = (cfg or {}).get("sampleRateHertz", MODEL_INPUT_RATE)
            if rate not in MODEL_INPUT_RATES:
                raise _fail(
                    f"AUDIO contentStart {_q(cname)} sampleRateHertz {rate} is not supported "
                    f"(use one of {sorted(MODEL_INPUT_RATES)})"
                )
            block.sample_rate = int(rate)
        else:  # TOOL
            if role != "TOOL":
                raise _fail(f"TOOL contentStart {_q(cname)} must have role TOOL, got {_q(role)}")
            cfg = body.get("toolResultInputConfiguration")
            tool_use_id = cfg.get("toolUseId") if isinstance(cfg, dict) else None
            if not isinstance(tool_use_id, str) or not tool_use_id:
                raise _fail(
                    f"TOOL contentStart {_q(cname)} requires toolResultInputConfiguration.toolUseId"
                )
            if self._check_tool_use_ids:
                if tool_use_id in s.tool_uses_answered:
                    raise _fail(
                        f"TOOL contentStart {_q(cname)} has unknown toolUseId {_q(tool_use_id)}: that toolUse "
                        "was already answered (send one result per toolUse)"
                    )
                if tool_use_id not in s.tool_uses_pending:
                    raise _fail(
                        f"TOOL contentStart {_q(cname)} has unknown toolUseId {_q(tool_use_id)}: the model "
                        "issued no toolUse with that id"
                    )
            block.tool_use_id = tool_use_id
        # accepted: commit
        s.blocks[cname] = block
        if ctype == "AUDIO":
            s.open_audio = block
            s.audio_started = True
        else:
            s.open_text = block
            if block.tool_use_id is not None:
                s.tool_uses_pending.discard(block.tool_use_id)
                s.tool_uses_answered.add(block.tool_use_id)
            if block.is_history:
                s.history_blocks += 1
            elif interactive or ctype == "TOOL":
                s.interactive_started = True

    def _text_input(self, body: dict) -> None:
        s = self._s
        cname = body.get("contentName")
        content = body.get("content")
        open_text = s.open_text
        if open_text is None or open_text.type != "TEXT" or open_text.name != cname:
            where = self._where(cname)
            raise _fail(f"textInput for content {_q(cname)} received {where}; textInput belongs inside its open TEXT block")
        if not isinstance(content, str):
            raise _fail(f"textInput for content {_q(cname)} requires a string content")
        size = len(content.encode("utf-8"))
        limits = self.history_limits
        if not open_text.interactive and size > limits.input_bytes:
            template = HISTORY_INPUT_TOO_LARGE if open_text.is_history else SYSTEM_INPUT_TOO_LARGE
            raise _fail(template.format(size=size, limit=limits.input_bytes, name=_q(cname)))
        if open_text.is_history:
            if s.history_bytes + size > limits.total_bytes:
                raise _fail(HISTORY_TOTAL_TOO_LARGE.format(
                    size=s.history_bytes + size, limit=limits.total_bytes, name=_q(cname)))
            if open_text.text_bytes + size > limits.message_bytes:
                raise _fail(HISTORY_MESSAGE_TOO_LARGE.format(
                    size=open_text.text_bytes + size, limit=limits.message_bytes, name=_q(cname)))
        open_text.text_bytes += size
        if open_text.is_history:
            s.history_bytes += size

    def _audio_input(self, body: dict) -> None:
        s = self._s
        cname = body.get("contentName")
        if s.open_text is not None:
            raise _fail(
                f"audioInput received while {s.open_text.type} content {_q(s.open_text.name)} is open; "
                "no audio inside an open text block (send its contentEnd first)"
            )
        if s.open_audio is None or s.open_audio.name != cname:
            where = self._where(cname)
            raise _fail(f"audioInput for content {_q(cname)} received {where}; audioInput needs its open AUDIO block")
        if not isinstance(body.get("content"), str):
            raise _fail(f"audioInput for content {_q(cname)} requires base64 string content")

    def _tool_result(self, body: dict) -> None:
        s = self._s
        cname = body.get("contentName")
        open_text = s.open_text
        if open_text is None or open_text.type != "TOOL" or open_text.name != cname:
            where = self._where(cname)
            raise _fail(f"toolResult for content {_q(cname)} received {where}; toolResult belongs inside its open TOOL block")
        if not isinstance(body.get("content"), str):
            raise _fail(f"toolResult for content {_q(cname)} requires a string content")

    def _content_end(self, body: dict) -> None:
        s = self._s
        cname = body.get("contentName")
        if s.open_text is not None and s.open_text.name == cname:
            s.open_text.open = False
            s.open_text = None
            return
        if s.open_audio is not None and s.open_audio.name == cname:
            if s.open_text is not None:
                raise _fail(
                    f"contentEnd for AUDIO content {_q(cname)} received while {s.open_text.type} content "
                    f"{_q(s.open_text.name)} is open; close it first"
                )
            s.open_audio.open = False
            s.open_audio = None
            return
        raise _fail(f"contentEnd for content {_q(cname)} received {self._where(cname)}")

    def _prompt_end(self) -> None:
        s = self._s
        for block in (s.open_text, s.open_audio):
            if block is not None:
                raise _fail(
                    f"promptEnd received while {block.type} content {_q(block.name)} is open; "
                    "send its contentEnd first"
                )
        s.prompt_ended = True

    def _session_end(self) -> None:
        s = self._s
        if s.prompt_name is not None and not s.prompt_ended:
            raise _fail(f"sessionEnd received while prompt {_q(s.prompt_name)} is open; send promptEnd first")
        s.session_ended = True

    def _where(self, cname: object) -> str:
        block = self._s.blocks.get(cname) if isinstance(cname, str) else None
        if block is None:
            return "but no content block with that name was started"
        if not block.open:
            return "after that content block was closed"
        return f"but that block is {block.type}"


class InputGap:
    """Which input events count under the 532 rule: an `audioInput`, or interactive content (a `textInput`
    of an interactive TEXT block, a `toolResult`). Setup (sessionStart, promptStart, the system prompt,
    history), contentStart/contentEnd and the end events do not. Feed it every accepted event, in order."""

    def __init__(self) -> None:
        self._interactive: set[str] = set()  # contentNames of interactive TEXT blocks and of TOOL blocks

    def counts(self, event: dict) -> bool:
        """Whether `event` (already accepted) restarts the stream's input-gap clock."""
        inner = event.get("event") if isinstance(event, dict) else None
        if not isinstance(inner, dict) or len(inner) != 1:
            return False
        ((name, body),) = inner.items()
        if not isinstance(body, dict):
            return False
        if name == "audioInput":
            return True
        cname = body.get("contentName")
        if name == "contentStart":
            if body.get("type") == "TOOL" or (body.get("type") == "TEXT" and body.get("interactive") is True):
                if isinstance(cname, str):
                    self._interactive.add(cname)
            return False
        if name in ("textInput", "toolResult"):
            return cname in self._interactive
        if name == "contentEnd" and isinstance(cname, str):
            self._interactive.discard(cname)
        return False
