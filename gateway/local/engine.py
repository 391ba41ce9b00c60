"""LocalEngine / LocalStream: the offline Nova Sonic stand-in behind the ModelTransport interface.

Per stream there is one engine task (reads input events, runs VAD endpointing, schedules turns, enforces the
idle and stream-age limits) and one responder task that answers turns in order (ASR → policy → TTS →
output events), so input keeps being read while a reply is spoken and barge-in can be detected.

The speech back ends (VAD, ASR, reply policy, TTS) are pluggable (backends.py); this module is the Nova
protocol around them, whichever they are. ScriptedEngine is LocalEngine with the cheap scripted back ends
(energy VAD, canned transcripts and reply, a precomputed tone): a load-test model, same events.

Output of one user turn (reference/nova-sonic.md §3.1):
    completionStart (first turn of the prompt only)
    USER TEXT FINAL block with the transcript (spoken turns only)
    per reply sentence: ASSISTANT TEXT SPECULATIVE → ASSISTANT AUDIO (≈80 ms audioOutput chunks) → ASSISTANT TEXT FINAL
    usageEvent
and `completionEnd` when promptEnd arrives.

Voice activity (Nova 2-class models only, not the legacy Nova Sonic v1; its order as in a raw Nova 2 capture:
`userSpeechStart` → `completionStart` → `userSpeechEnd` → USER TEXT …): when the VAD hears an onset the engine
emits `userSpeechStart` {sessionId, promptName, completionId} (then `completionStart` if this is the prompt's
first turn), and when the utterance ends (the endpoint, the AUDIO block's contentEnd, or the 20 s cap)
`userSpeechEnd`, before the utterance is transcribed. The two always come in pairs; a blip too short to be a
turn gets its pair and no USER TEXT. Over a reply, `userSpeechStart` comes with the barge-in.

The model (`LocalEngineConfig.model_id`; behind the wire emulator, the model of the request path: `open_for`)
selects the rules: history limits (`model_spec(model_id).history`, or `LocalEngineConfig.history` for every
model), and the voice-activity events above.

Limits, as the service's (validationException unless said otherwise):
* 532 (`input_gap_s`, default 55 s; 0: off): no `audioInput` and no interactive content (the textInput of an
  interactive TEXT block, a toolResult) for that long; the clock starts when the stream opens, and setup
  (system prompt, history) does not count. INPUT_GAP_MESSAGE (protocol/event_order.py).
* 531 (`idle_timeout_s`, default 175 s): no `audioInput` for that long, whatever else arrives (so with the
  defaults only a stream fed interactive text and no audio meets it). IDLE_TIMEOUT_MESSAGE.
* `modelTimeoutException` at stream age `max_stream_s` (480 s).

Timing model: every emitted audio chunk is assumed to play in real time from the moment it is emitted
(`speaking_until = max(speaking_until, now) + chunk duration`). The responder never lets more than
`lookahead_s` of audio be unplayed: it waits before each audio chunk, before a sentence's FINAL text and
before synthesising the next sentence. Speech onset (VAD) while audio is still playing is a barge-in: the open AUDIO block ends INTERRUPTED,
a FINAL block carries the part of the current sentence actually played, then `{ "interrupted" : true }`, and
contentEnd INTERRUPTED; the rest of the reply is dropped and the new utterance becomes the next turn.
Endpointing runs on audio time (frames received), so tests may feed audio faster than real time.

Tool calls on a phrase (demos and tests: the whole tool path runs offline). `LocalEngineConfig.tool_calls`
holds rules, a JSON list (`NOVAGATE_ENGINE_TOOL_CALLS`, `novagate emulate nova --tool-calls JSON|@path`):
    [{"phrase": "record the call", "tool": "record_call", "arguments": {"reason": "demo"},
      "filler": "One moment."}]
(`arguments` default {}, `filler` default "One moment.", "" for none). When a user turn's words (a spoken
turn's transcript or an interactive USER text) contain a rule's phrase (case and punctuation ignored; the
first rule that matches) and promptStart declared that tool (`toolConfiguration.tools[].toolSpec.name`;
otherwise the rule is logged and the turn answered as usual), the model's turn is (reference §3):
    completionStart (first turn of the prompt only), USER TEXT FINAL (spoken turns)
    the filler, if any: ASSISTANT TEXT SPECULATIVE → AUDIO → ASSISTANT TEXT FINAL, ending PARTIAL_TURN
    contentStart TOOL role TOOL (toolUseOutputConfiguration application/json)
    toolUse {toolName, toolUseId "tooluse_…", content: the arguments as a JSON string}
    contentEnd TOOL stopReason TOOL_USE
    usageEvent
and the model waits for the result: contentStart TOOL (toolResultInputConfiguration.toolUseId) → toolResult
(a JSON string) → contentEnd. Then it speaks "The <tool> tool says: <summary>" (policy.tool_reply_text) as
any reply: sentences SPECULATIVE → AUDIO → FINAL, the last ending END_TURN, then usageEvent. A result that is
not JSON fails the stream as Nova does: validationException "Tool Response parsing error". A TOOL block for
an id the model did not issue, or answered already, is an order violation (protocol/event_order.py). If the
filler is cut by a barge-in, the call is not made (the turn was interrupted).
While a result is awaited, the stream goes on as usual: audio is read, barge-in works as ever, and speech
or typed text starts a new turn that is answered at once; the result, whenever it comes, is answered
after whatever is being said. No result: nothing happens (the 532 input gap and the 531 idle timeout
still apply: the client must keep sending audio meanwhile).
A tool result the gateway delivers as interactive USER text, "Result of the <tool> tool call …: <JSON>",
gets the same "The <tool> tool says: …" reply (backends.answering_late_tool_results).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import math
import uuid
from collections import deque
import secrets
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import soxr

from gateway.local import backends, policy, speech
from gateway.local.backends import DEFAULT_REPLY
from gateway.logs import log
from gateway.transport import (
    CONNECTION,
    IDLE_TIMEOUT_MESSAGE,
    MODEL_STREAM_ERROR,
    MODEL_TIMEOUT,
    MODEL_TIMEOUT_MESSAGE,
    VALIDATION,
    ModelError,
)
from protocol import nova_events as nova
from protocol.event_order import INPUT_GAP_MESSAGE, INPUT_GAP_S, EventOrderError, InputGap, InputOrderValidator
from protocol.models import HistoryLimits, ModelSpec, model_spec

logger = logging.getLogger("novagate.local")

FRAME_MS = speech.VAD_FRAME_MS  # 30 ms VAD frames at 16 kHz
FRAME_BYTES = backends.FRAME_BYTES
ONSET_FRAMES = 3  # ~90 ms of speech starts an utterance (and a barge-in)
PREROLL_FRAMES = 10  # ~300 ms kept before the onset
TRAIL_FRAMES = 10  # ~300 ms of the closing silence kept for the recogniser
MIN_SPEECH_FRAMES = 5  # shorter blips are noise, not a turn
MAX_UTTERANCE_S = 20.0
CHUNK_MS = 80  # audioOutput chunk length
IN_QUEUE_SIZE = 512
OUT_QUEUE_SIZE = 256
CLOSE_TIMEOUT_S = 2.0
SPEECH_TOKENS_PER_S = 25  # rough usage figures
TEXT_TOKENS_PER_WORD = 1.3

_WAKE = object()  # wakes a blocked receive()
_END = object()  # end of output
_INTERRUPT = object()  # wakes an idle responder for a barge-in
_SPEECH_START = object()  # the VAD heard an onset: userSpeechStart
_SPEECH_END = object()  # the utterance ended: userSpeechEnd
TOOL_RESULT_PARSE_ERROR = "Tool Response parsing error"  # Nova's ValidationException for a result that is not JSON


@dataclass
class LocalEngineConfig:
    asr: str = "whisper"  # "whisper" | "sphinx" | "scripted"
    tts: str = "hibari"  # "hibari" | "espeak" | "tone"
    vad: str = "webrtc"  # "webrtc" | "energy"
    policy: str = "rules"  # "rules" (policy.py) | "scripted" (the canned `reply`)
    grammar: tuple[str, ...] = ()  # sphinx phrase grammar; () = free-form language model
    transcripts: tuple[str, ...] = ()  # scripted ASR: transcripts cycled per stream; () = "utterance N"
    reply: str = DEFAULT_REPLY  # scripted policy: the reply to every turn
    reply_s: float = backends.DEFAULT_REPLY_S  # tone TTS: seconds the scripted reply lasts (by length otherwise)
    energy_threshold_db: float = backends.DEFAULT_ENERGY_DB  # energy VAD: frame RMS (dBFS) above which is speech
    endpoint_ms: int = 700  # silence that ends an utterance
    idle_timeout_s: float = nova.IDLE_TIMEOUT_S  # no audioInput for this long -> ValidationException 531
    # no audioInput and no interactive content for this long -> ValidationException 532 (0: off)
    input_gap_s: float = INPUT_GAP_S
    max_stream_s: float = nova.MAX_STREAM_AGE_S  # stream age cap -> ModelTimeoutException
    lookahead_s: float = 1.5  # max unplayed audio before the next sentence is produced
    trace_path: str | None = None  # JSON lines of every input event received
    # tool calls on a phrase: a JSON string (or "@path"), or a list of {"phrase", "tool", "arguments",
    # "filler"} objects (backends.parse_tool_calls); () = none
    tool_calls: Any = ()
    tool_filler: str = backends.DEFAULT_TOOL_FILLER  # spoken before a tool call unless a rule says otherwise
    model_id: str = nova.DEFAULT_MODEL_ID  # the model it stands in for (its rules: protocol/models.py)
    history: HistoryLimits | None = None  # history limits for every model (None: each model's own)


@dataclass(slots=True)
class _Turn:
    text: str | None = None  # interactive text turn (or the result of `tool`)
    pcm: bytes | None = None  # spoken turn: PCM16LE mono 16 kHz
    tool: str | None = None  # a tool result turn: `text` is the result of this tool


@dataclass(slots=True)
class _Sentence:
    """The sentence whose audio was emitted last and whose FINAL text is not out yet."""

    text: str
    duration: float  # seconds of audio for the whole sentence
    start: float | None = None  # loop time at which its first chunk starts playing
    emitted: float = 0.0  # seconds of its audio emitted so far


@dataclass(slots=True)
class _InBlock:
    type: str
    role: str
    interactive: bool
    chunks: list[str]
    tool_use_id: str | None = None  # TOOL blocks


class _Trace:
    """Appends one JSON line per received input event (tests assert what the model saw)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._f = None

    def write(self, record: dict) -> None:
        try:
            if self._f is None:
                self._f = open(self.path, "ab")  # noqa: SIM115 (kept open for the engine's life)
            self._f.write(orjson.dumps(record) + b"\n")
            self._f.flush()
        except OSError as exc:  # tracing must never break the stream
            log(logger, logging.WARNING, "local engine trace write failed", path=self.path, error=str(exc))

    def close(self) -> None:
        if self._f is not None:
            with contextlib.suppress(OSError):
                self._f.close()
            self._f = None


def _b64_len(content: str) -> int:
    n = len(content)
    return n * 3 // 4 - (content.endswith("=") + content.endswith("=="))


def _played_prefix(text: str, fraction: float) -> str:
    words = text.split()
    n = int(math.floor(len(words) * max(0.0, min(1.0, fraction)) + 1e-9))
    return " ".join(words[:n])


def _text_tokens(text: str) -> int:
    return int(round(len(text.split()) * TEXT_TOKENS_PER_WORD))


def _declared_tools(prompt_start: dict) -> frozenset[str]:
    """The tool names a promptStart declares (toolConfiguration.tools[].toolSpec.name)."""
    config = prompt_start.get("toolConfiguration")
    tools = config.get("tools") if isinstance(config, dict) else None
    names = set()
    for tool in tools if isinstance(tools, list) else ():
        spec = tool.get("toolSpec") if isinstance(tool, dict) else None
        name = spec.get("name") if isinstance(spec, dict) else None
        if isinstance(name, str) and name:
            names.add(name)
    return frozenset(names)


class LocalStream:
    """One bidirectional stream of the local engine (implements gateway.transport.ModelStream)."""

    def __init__(self, engine: LocalEngine, stream_id: str, spec: ModelSpec) -> None:
        self._engine = engine
        self._cfg = engine.config
        self.stream_id = stream_id
        self.spec = spec
        self.session_id = str(uuid.uuid4())
        self._loop = asyncio.get_running_loop()
        self._validator = InputOrderValidator(history=spec.history)
        self._gap = InputGap()
        self._voice_activity = spec.family != "nova-1"  # userSpeechStart / userSpeechEnd (Nova 2-class models)
        self._send_lock = asyncio.Lock()
        self._in: asyncio.Queue = asyncio.Queue(IN_QUEUE_SIZE)
        self._out: asyncio.Queue = asyncio.Queue(OUT_QUEUE_SIZE)
        self._turns: asyncio.Queue = asyncio.Queue()
        self._error: ModelError | None = None
        self._error_delivered = False
        self._output_done = False
        self._closed = False
        self._opened_at = self._loop.time()
        self._last_audio_at = self._opened_at
        self._last_input_at = self._opened_at  # audioInput or interactive content (the 532 clock)
        # session, set by promptStart
        self._ids: dict[str, str] | None = None
        self._out_rate = nova.DEFAULT_MODEL_OUTPUT_RATE
        self._voice: str | None = None
        self._blocks: dict[str, _InBlock] = {}
        self._trace_blocks: dict[str, tuple[Any, Any, Any]] = {}
        self._system_text = ""
        self._history: list[tuple[str, str]] = []
        self._declared_tools: frozenset[str] = frozenset()  # promptStart toolConfiguration
        self._tool_uses: dict[str, str] = {}  # toolUseId -> tool name, awaiting a result
        # audio input / endpointing
        self._vad = engine.backends.new_vad()
        self._recogniser = engine.backends.new_recogniser()
        self._resampler: soxr.ResampleStream | None = None
        self._raw = bytearray()
        self._pcm = bytearray()
        self._speech_run = 0
        self._preroll: deque[bytes] = deque(maxlen=PREROLL_FRAMES)
        self._utt: list[bytes] | None = None
        self._utt_speech = 0
        self._utt_silence = 0
        self._vad_out: list[Any] = []  # from the VAD, in order: speech events to emit, turns to queue
        # output state (owned by whoever emits: the responder, or the engine task after stopping it)
        self._completion_started = False
        self._open_out: tuple[str, str] | None = None  # (type, contentId)
        self._speaking_until = 0.0
        self._pending: _Sentence | None = None
        self._interrupt = asyncio.Event()
        self._responder_idle = True
        # usage
        self._usage = {"input_speech": 0, "input_text": 0, "output_speech": 0, "output_text": 0}
        self._context_counted = False
        self._task = self._loop.create_task(self._run(), name=f"local-engine-{stream_id}")
        self._responder: asyncio.Task | None = self._loop.create_task(
            self._respond(), name=f"local-responder-{stream_id}"
        )

    # -----------------------------------------------------------------------------------------
    # ModelStream

    async def send(self, event: dict) -> None:
        async with self._send_lock:  # concurrent senders: the engine sees events in validation order
            await self._send(event)

    async def _send(self, event: dict) -> None:
        if self._error is not None:
            raise self._error
        if self._closed:
            raise ModelError(CONNECTION, "the local model stream is closed")
        self._trace(event)
        try:
            self._validator.check(event)
        except EventOrderError as exc:
            self._fail(ModelError(VALIDATION, exc.message))
            return
        name = nova.event_name(event)
        if name == "audioInput":
            self._last_audio_at = self._loop.time()
        if self._gap.counts(event):
            self._last_input_at = self._loop.time()
        try:
            self._in.put_nowait(event)
            return
        except asyncio.QueueFull:
            pass
        putter = asyncio.ensure_future(self._in.put(event))
        try:
            await asyncio.wait({putter, self._task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not putter.done():
                putter.cancel()
        if not putter.done() or putter.cancelled():
            raise self._error or ModelError(CONNECTION, "the local model stream is closed")

    async def receive(self) -> dict | None:
        while True:
            if self._output_done:
                return None
            if self._error is not None:
                if self._error_delivered:
                    return None
                self._error_delivered = True
                raise self._error
            item = await self._out.get()
            if item is _WAKE or self._error is not None:
                continue
            if self._output_done:
                return None
            if item is _END:
                self._output_done = True
                return None
            return item

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._output_done = True
        self._wake()
        tasks = [t for t in (self._task, self._responder) if t is not None and not t.done()]
        for t in tasks:
            t.cancel()
        if tasks:
            with contextlib.suppress(Exception):
                await asyncio.wait(tasks, timeout=CLOSE_TIMEOUT_S)
        self._engine._forget(self)

    # -----------------------------------------------------------------------------------------
    # introspection (tests, metrics)

    @property
    def failed(self) -> ModelError | None:
        return self._error

    @property
    def speaking(self) -> bool:
        """Whether emitted assistant audio is still (notionally) playing."""
        return self._loop.time() < self._speaking_until

    @property
    def history(self) -> list[tuple[str, str]]:
        """What the reply policy sees: history blocks plus this stream's turns so far."""
        return list(self._history)

    # -----------------------------------------------------------------------------------------
    # failure, tracing

    def _wake(self) -> None:
        with contextlib.suppress(asyncio.QueueFull):
            self._out.put_nowait(_WAKE)

    def _fail(self, error: ModelError) -> None:
        if self._error is not None or self._closed:
            return
        log(logger, logging.INFO, "local stream failed", stream_id=self.stream_id, kind=error.kind,
            error=error.message)
        self._error = error
        self._wake()
        current = asyncio.current_task()
        for t in (self._responder, self._task):
            if t is not None and t is not current and not t.done():
                t.cancel()

    def _trace(self, event: dict) -> None:
        trace = self._engine._trace
        if trace is None:
            return
        try:
            name = nova.event_name(event)
            body = nova.event_body(event)
        except (KeyError, TypeError, ValueError, AttributeError):
            trace.write({"stream": self.stream_id, "event": None, "malformed": True})
            return
        if not isinstance(body, dict):
            body = {}
        cname = body.get("contentName")
        role = typ = interactive = None
        if name == "contentStart":
            role, typ, interactive = body.get("role"), body.get("type"), body.get("interactive", False)
            if isinstance(cname, str):
                self._trace_blocks[cname] = (role, typ, interactive)
        elif isinstance(cname, str) and cname in self._trace_blocks:
            role, typ, interactive = self._trace_blocks[cname]
        record: dict[str, Any] = {
            "stream": self.stream_id, "event": name, "role": role, "type": typ, "interactive": interactive,
        }
        if cname is not None:
            record["contentName"] = cname
        if name in ("textInput", "toolResult"):
            record["content"] = body.get("content")
        elif name == "promptStart":
            config = body.get("toolConfiguration") or {}
            record["tools"] = [t.get("toolSpec", {}).get("name") for t in config.get("tools") or [] if isinstance(t, dict)]
            if "toolChoice" in config:
                record["toolChoice"] = config["toolChoice"]
            record["voice"] = (body.get("audioOutputConfiguration") or {}).get("voiceId")
        elif name == "contentStart" and typ == "TOOL":
            record["toolUseId"] = (body.get("toolResultInputConfiguration") or {}).get("toolUseId")
        elif name == "audioInput":
            content = body.get("content")
            record["bytes"] = _b64_len(content) if isinstance(content, str) else 0
        trace.write(record)

    # -----------------------------------------------------------------------------------------
    # engine task: input events, VAD, limits

    async def _run(self) -> None:
        cfg = self._cfg
        try:
            while True:
                now = self._loop.time()
                if now >= self._opened_at + cfg.max_stream_s:
                    self._fail(ModelError(MODEL_TIMEOUT, MODEL_TIMEOUT_MESSAGE))
                    return
                if now >= self._last_audio_at + cfg.idle_timeout_s:
                    self._fail(ModelError(VALIDATION, IDLE_TIMEOUT_MESSAGE))
                    return
                gap_deadline = self._last_input_at + cfg.input_gap_s if cfg.input_gap_s > 0 else math.inf
                if now >= gap_deadline:
                    log(logger, logging.INFO, "local stream: input gap", stream_id=self.stream_id,
                        gap_s=round(now - self._last_input_at, 2))
                    self._fail(ModelError(VALIDATION, INPUT_GAP_MESSAGE))
                    return
                deadline = min(self._opened_at + cfg.max_stream_s, self._last_audio_at + cfg.idle_timeout_s,
                               gap_deadline)
                try:
                    event = await asyncio.wait_for(self._in.get(), max(0.0, deadline - now) + 0.001)
                except TimeoutError:
                    continue
                if not await self._handle(event) or self._error is not None:
                    return
                if self._vad_out:
                    await self._flush_vad()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug or a speech-library failure: fail like the service would
            log(logger, logging.ERROR, "local engine task failed", exc_info=True, stream_id=self.stream_id)
            self._fail(ModelError(MODEL_STREAM_ERROR, f"local engine failure: {exc!r}"))

    async def _handle(self, event: dict) -> bool:
        """Apply one (already validated) input event; False when the stream's output has ended."""
        name = nova.event_name(event)
        body = nova.event_body(event)
        if name == "promptStart":
            cfg = body.get("audioOutputConfiguration") or {}
            self._out_rate = int(cfg.get("sampleRateHertz") or nova.DEFAULT_MODEL_OUTPUT_RATE)
            self._voice = cfg.get("voiceId")
            self._ids = {
                "sessionId": self.session_id, "promptName": body["promptName"], "completionId": str(uuid.uuid4())
            }
            self._declared_tools = _declared_tools(body)
        elif name == "contentStart":
            block = _InBlock(body.get("type", ""), body.get("role", ""), bool(body.get("interactive", False)), [])
            self._blocks[body["contentName"]] = block
            if block.type == "TOOL":
                block.tool_use_id = (body.get("toolResultInputConfiguration") or {}).get("toolUseId")
            if block.type == "AUDIO":
                rate = int((body.get("audioInputConfiguration") or {}).get("sampleRateHertz") or nova.MODEL_INPUT_RATE)
                self._resampler = (
                    soxr.ResampleStream(rate, speech.ASR_SAMPLE_RATE, 1, dtype="int16")
                    if rate != speech.ASR_SAMPLE_RATE else None
                )
                self._reset_vad()
        elif name in ("textInput", "toolResult"):
            block = self._blocks.get(body["contentName"])
            if block is not None:
                block.chunks.append(body.get("content", ""))
        elif name == "audioInput":
            self._on_audio(body)
        elif name == "contentEnd":
            self._on_content_end(body["contentName"])
        elif name == "promptEnd":
            await self._stop_responder()
            await self._close_open_block("INTERRUPTED")
            if self._completion_started and self._ids is not None:
                await self._emit(nova.completion_end(self._ids, "END_TURN"))
        elif name == "sessionEnd":
            await self._stop_responder()
            await self._out.put(_END)
            return False
        return True

    def _on_content_end(self, cname: str) -> None:
        block = self._blocks.pop(cname, None)
        if block is None:
            return
        if block.type == "AUDIO":
            self._end_utterance(final=True)
            self._reset_vad()
            return
        if block.type == "TOOL":
            self._on_tool_result(block)
            return
        if block.type != "TEXT":
            return
        text = "".join(block.chunks)
        if block.role == "SYSTEM":
            self._system_text = text
        elif not block.interactive and block.role in ("USER", "ASSISTANT"):
            if text.strip():
                self._history.append((block.role, text))
        elif block.interactive and block.role == "USER":
            if not self._interrupt.is_set() and (self._loop.time() < self._speaking_until
                                                 or not self._responder_idle):
                self._request_interrupt()  # typing over the reply interrupts it, as speaking does
            self._turns.put_nowait(_Turn(text=text))

    def _on_tool_result(self, block: _InBlock) -> None:
        content = "".join(block.chunks)
        try:
            orjson.loads(content)
        except orjson.JSONDecodeError:
            self._fail(ModelError(VALIDATION, TOOL_RESULT_PARSE_ERROR))
            return
        tool = self._tool_uses.pop(block.tool_use_id or "", None)
        if tool is None:  # the validator admits only ids this stream issued; nothing to answer otherwise
            return
        self._turns.put_nowait(_Turn(text=content, tool=tool))  # answered after what is being said

    def _on_audio(self, body: dict) -> None:
        try:
            pcm = base64.b64decode(body.get("content", ""), validate=True)
        except (binascii.Error, ValueError):
            self._fail(ModelError(VALIDATION, "Invalid input request: audioInput content is not valid base64"))
            return
        if self._resampler is not None:
            self._raw += pcm
            usable = len(self._raw) // 2 * 2
            if not usable:
                return
            chunk = np.frombuffer(bytes(self._raw[:usable]), np.int16)
            del self._raw[:usable]
            pcm = self._resampler.resample_chunk(chunk, last=False).astype(np.int16).tobytes()
        self._pcm += pcm
        size = len(self._pcm) // FRAME_BYTES * FRAME_BYTES
        if not size:
            return
        frames = bytes(self._pcm[:size])
        del self._pcm[:size]
        for i, is_speech in enumerate(self._vad.classify(frames)):  # one VAD call for every whole frame
            self._on_frame(frames[i * FRAME_BYTES : (i + 1) * FRAME_BYTES], is_speech)

    def _reset_vad(self) -> None:
        self._raw.clear()
        self._pcm.clear()
        self._speech_run = 0
        self._preroll.clear()
        self._utt = None
        self._utt_speech = self._utt_silence = 0

    def _on_frame(self, frame: bytes, is_speech: bool) -> None:
        self._speech_run = self._speech_run + 1 if is_speech else 0
        if (
            self._speech_run >= ONSET_FRAMES
            and not self._interrupt.is_set()
            and self._loop.time() < self._speaking_until
        ):
            self._request_interrupt()
        if self._utt is None:
            self._preroll.append(frame)
            if self._speech_run >= ONSET_FRAMES:
                self._utt = list(self._preroll)
                self._preroll.clear()
                self._utt_speech = self._speech_run
                self._utt_silence = 0
                if self._voice_activity:
                    self._vad_out.append(_SPEECH_START)
            return
        self._utt.append(frame)
        if is_speech:
            self._utt_speech += 1
            self._utt_silence = 0
        else:
            self._utt_silence += 1
        if self._utt_silence * FRAME_MS >= self._cfg.endpoint_ms:
            self._end_utterance()
        elif len(self._utt) * FRAME_MS >= MAX_UTTERANCE_S * 1000:
            self._end_utterance()

    def _end_utterance(self, final: bool = False) -> None:
        frames, speech_frames, silence = self._utt, self._utt_speech, self._utt_silence
        self._utt = None
        self._utt_speech = self._utt_silence = 0
        self._preroll.clear()
        if frames is not None and self._voice_activity:
            self._vad_out.append(_SPEECH_END)
        if frames is None or speech_frames < MIN_SPEECH_FRAMES:
            return
        if silence > TRAIL_FRAMES:
            frames = frames[: len(frames) - silence + TRAIL_FRAMES]
        self._vad_out.append(_Turn(pcm=b"".join(frames)))

    async def _flush_vad(self) -> None:
        """What the VAD produced while the last input event was handled, in order: userSpeechStart (and
        completionStart on the prompt's first turn), userSpeechEnd, then the utterance as a turn (so its
        USER TEXT comes after its userSpeechEnd)."""
        items, self._vad_out = self._vad_out, []
        for item in items:
            if self._error is not None:
                return
            if item is _SPEECH_START and self._ids is not None:
                await self._emit(nova.user_speech_start(self._ids))
                await self._ensure_completion()
            elif item is _SPEECH_END and self._ids is not None:
                await self._emit(nova.user_speech_end(self._ids))
            elif isinstance(item, _Turn):
                self._turns.put_nowait(item)

    def _request_interrupt(self) -> None:
        self._interrupt.set()
        if self._responder_idle:
            self._turns.put_nowait(_INTERRUPT)

    async def _stop_responder(self) -> None:
        task, self._responder = self._responder, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # -----------------------------------------------------------------------------------------
    # output helpers

    async def _emit(self, event: dict) -> None:
        await self._out.put(event)

    async def _start_block(self, type: str, role: str, stage: str | None = None) -> str:
        assert self._ids is not None
        cid = str(uuid.uuid4())
        await self._emit(
            nova.output_content_start(self._ids, cid, type=type, role=role, stage=stage, sample_rate=self._out_rate)
        )
        self._open_out = (type, cid)
        return cid

    async def _end_block(self, stop_reason: str) -> None:
        assert self._ids is not None and self._open_out is not None
        typ, cid = self._open_out
        await self._emit(nova.output_content_end(self._ids, cid, type=typ, stop_reason=stop_reason))
        self._open_out = None

    async def _close_open_block(self, stop_reason: str) -> None:
        if self._open_out is not None:
            await self._end_block(stop_reason)

    async def _text_block(self, role: str, stage: str, text: str, stop_reason: str) -> None:
        assert self._ids is not None
        cid = await self._start_block("TEXT", role, stage)
        await self._emit(nova.output_text(self._ids, cid, role, text))
        await self._end_block(stop_reason)

    async def _ensure_completion(self) -> None:
        if not self._completion_started:  # the engine task (speech onset) or the responder (a turn)
            assert self._ids is not None
            self._completion_started = True
            await self._emit(nova.completion_start(self._ids))

    # -----------------------------------------------------------------------------------------
    # responder task: turns -> output

    async def _respond(self) -> None:
        try:
            while True:
                if self._interrupt.is_set():
                    await self._emit_interruption()
                self._responder_idle = True
                try:
                    turn = await self._turns.get()
                finally:
                    self._responder_idle = False
                if turn is _INTERRUPT:
                    continue
                await self._run_turn(turn)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log(logger, logging.ERROR, "local responder failed", exc_info=True, stream_id=self.stream_id)
            self._fail(ModelError(MODEL_STREAM_ERROR, f"local engine failure: {exc!r}"))

    async def _wait_unplayed(self) -> bool:
        """Wait until at most lookahead_s of emitted audio is unplayed; True if a barge-in came first."""
        while True:
            if self._interrupt.is_set():
                return True
            excess = self._speaking_until - self._loop.time() - self._cfg.lookahead_s
            if excess <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._interrupt.wait(), excess)

    async def _emit_interruption(self) -> str:
        """Barge-in: end the open AUDIO block, FINAL text of what was played + the interrupted signal."""
        now = self._loop.time()
        self._interrupt.clear()
        self._speaking_until = min(self._speaking_until, now)  # the client flushes its playback
        pending, self._pending = self._pending, None
        if self._ids is None or not self._completion_started:
            return ""
        if self._open_out is not None:
            await self._end_block("INTERRUPTED" if self._open_out[0] == "AUDIO" else "PARTIAL_TURN")
        played = ""
        if pending is not None and pending.start is not None and pending.duration > 0:
            elapsed = min(max(0.0, now - pending.start), pending.emitted)
            played = _played_prefix(pending.text, elapsed / pending.duration)
        cid = await self._start_block("TEXT", "ASSISTANT", "FINAL")
        if played:
            await self._emit(nova.output_text(self._ids, cid, "ASSISTANT", played))
        await self._emit(nova.output_text(self._ids, cid, "ASSISTANT", nova.INTERRUPTED_SIGNAL))
        await self._end_block("INTERRUPTED")
        return played

    async def _run_turn(self, turn: _Turn) -> None:
        assert self._ids is not None
        delta = {"input_speech": 0, "input_text": 0, "output_speech": 0, "output_text": 0}
        if not self._context_counted:
            self._context_counted = True
            delta["input_text"] += _text_tokens(self._system_text) + sum(_text_tokens(t) for _, t in self._history)
        if turn.pcm is not None:
            delta["input_speech"] += int(len(turn.pcm) / 2 / speech.ASR_SAMPLE_RATE * SPEECH_TOKENS_PER_S)
            rec = self._recogniser
            text = await asyncio.to_thread(rec.transcribe, turn.pcm) if rec.blocking else rec.transcribe(turn.pcm)
            text = " ".join(text.split())
        elif turn.tool is not None:
            text = turn.text or ""
            delta["input_text"] += _text_tokens(text)
        else:
            text = " ".join((turn.text or "").split())
            delta["input_text"] += _text_tokens(text)
        if self._interrupt.is_set():  # barge-in on the tail of the previous reply
            await self._emit_interruption()
        await self._ensure_completion()
        if turn.tool is not None:  # a tool's result: the model speaks about it
            spoken, _ = await self._speak(self._engine.backends.tool_reply(turn.tool, text), delta)
        else:
            if turn.pcm is not None and text:
                await self._text_block("USER", "FINAL", text, "END_TURN")
            history = list(self._history)
            if text:
                self._history.append(("USER", text))
            rule = self._tool_call_for(text)
            if rule is not None:
                spoken, complete = await self._speak(list(rule.filler), delta, end_turn=False)
                if complete:
                    await self._call_tool(rule, delta)
                else:
                    log(logger, logging.INFO, "local engine: filler interrupted, tool not called",
                        stream_id=self.stream_id, tool=rule.tool)
            else:
                spoken, _ = await self._speak(self._engine.backends.reply(text, history), delta)
        said = " ".join(s for s in spoken if s)
        if said:
            self._history.append(("ASSISTANT", said))
        delta["output_text"] += _text_tokens(said)
        await self._emit_usage(delta)

    async def _speak(self, sentences: list[str], delta: dict[str, int], *,
                     end_turn: bool = True) -> tuple[list[str], bool]:
        """Each sentence: ASSISTANT TEXT SPECULATIVE → AUDIO → TEXT FINAL, paced; the last one ends END_TURN
        (PARTIAL_TURN when `end_turn` is false: more of the turn follows). Returns what was spoken and
        whether every sentence was (False: a barge-in cut the reply)."""
        assert self._ids is not None
        spoken: list[str] = []
        rate = self._out_rate
        chunk_bytes = rate * CHUNK_MS // 1000 * 2
        for i, sentence in enumerate(sentences):
            last = end_turn and i == len(sentences) - 1
            if i == 0:
                while await self._wait_unplayed():  # previous reply still playing beyond the lookahead
                    await self._emit_interruption()
            tts = self._engine.backends.synthesiser
            pcm = (await asyncio.to_thread(tts.synthesize, sentence, rate, self._voice) if tts.blocking
                   else tts.synthesize(sentence, rate, self._voice))
            if self._interrupt.is_set():
                await self._emit_interruption()
                if i > 0:  # this reply was playing: drop the rest of it
                    return spoken, False
                # i == 0: the barge-in hit the previous reply's tail; this reply has not started yet
            duration = len(pcm) / 2 / rate
            self._pending = _Sentence(sentence, duration)
            await self._text_block("ASSISTANT", "SPECULATIVE", sentence, "PARTIAL_TURN")
            cid = await self._start_block("AUDIO", "ASSISTANT")
            for off in range(0, len(pcm), chunk_bytes):
                if await self._wait_unplayed():  # pace: at most lookahead_s of audio ahead of playback
                    break
                chunk = pcm[off : off + chunk_bytes]
                await self._emit(nova.output_audio(self._ids, cid, chunk))
                seconds = len(chunk) / 2 / rate
                start = max(self._speaking_until, self._loop.time())
                if self._pending.start is None:
                    self._pending.start = start
                self._pending.emitted += seconds
                self._speaking_until = start + seconds
            delta["output_speech"] += int(self._pending.emitted * SPEECH_TOKENS_PER_S)
            if self._interrupt.is_set():
                spoken.append(await self._emit_interruption())
                return spoken, False
            await self._end_block("END_TURN" if last else "PARTIAL_TURN")
            if await self._wait_unplayed():
                spoken.append(await self._emit_interruption())
                return spoken, False
            self._pending = None
            await self._text_block("ASSISTANT", "FINAL", sentence, "END_TURN" if last else "PARTIAL_TURN")
            spoken.append(sentence)
        return spoken, True

    def _tool_call_for(self, text: str) -> backends.ToolCallRule | None:
        rule = backends.tool_call_for(self._engine.backends.tool_calls, text) if text else None
        if rule is None or policy.late_tool_result(text) is not None:  # a result is not a request
            return None
        if rule.tool not in self._declared_tools:
            log(logger, logging.INFO, "local engine: tool call phrase heard, but promptStart did not declare the "
                "tool; answering as usual", stream_id=self.stream_id, tool=rule.tool)
            return None
        return rule

    async def _call_tool(self, rule: backends.ToolCallRule, delta: dict[str, int]) -> None:
        """TOOL block: contentStart (TOOL, TOOL) → toolUse → contentEnd TOOL_USE; then the result is awaited."""
        assert self._ids is not None
        tool_use_id = "tooluse_" + secrets.token_urlsafe(16)
        self._tool_uses[tool_use_id] = rule.tool
        self._validator.model_tool_use(tool_use_id)  # before the client can see it (and answer)
        log(logger, logging.INFO, "local engine: calling a tool", stream_id=self.stream_id, tool=rule.tool,
            tool_use_id=tool_use_id)
        cid = await self._start_block("TOOL", "TOOL")
        await self._emit(nova.output_tool_use(self._ids, cid, tool_use_id, rule.tool, rule.arguments))
        await self._end_block("TOOL_USE")
        delta["output_text"] += _text_tokens(rule.arguments)

    async def _emit_usage(self, delta: dict[str, int]) -> None:
        assert self._ids is not None
        for k, v in delta.items():
            self._usage[k] += v
        u = self._usage
        await self._emit(
            nova.usage_event(
                self._ids,
                input_speech=u["input_speech"], input_text=u["input_text"],
                output_speech=u["output_speech"], output_text=u["output_text"],
                delta={
                    "input": {"speechTokens": delta["input_speech"], "textTokens": delta["input_text"]},
                    "output": {"speechTokens": delta["output_speech"], "textTokens": delta["output_text"]},
                },
            )
        )


class LocalEngine:
    """The offline Nova Sonic stand-in (implements gateway.transport.ModelTransport)."""

    name = "local"

    def __init__(self, config: LocalEngineConfig | None = None) -> None:
        self.config = config or LocalEngineConfig()
        if self.config.input_gap_s < 0:
            raise ValueError(f"input_gap_s={self.config.input_gap_s} must be >= 0 seconds (0: no 532)")
        self.backends = backends.build(self.config)  # ValueError: an unknown back end
        self._trace = _Trace(self.config.trace_path) if self.config.trace_path else None
        self._streams: set[LocalStream] = set()
        self._count = 0
        self._closed = False

    async def warm(self) -> None:
        """Load the configured ASR/TTS models now instead of on the first turn."""
        await asyncio.to_thread(self.backends.warm)

    async def open(self) -> LocalStream:
        """A stream of the configured model (`model_id`, `history`)."""
        return await self.open_for(self.config.model_id)

    async def open_for(self, model_id: str, *, history: HistoryLimits | None = None) -> LocalStream:
        """A stream of `model_id` with its rules (the wire emulator: the model of the request path);
        `history` (else the config's, else the model's own) sets its history limits."""
        if self._closed:
            raise ModelError(CONNECTION, "the local engine is closed")
        self._count += 1
        spec = model_spec(model_id, history=history or self.config.history)
        stream = LocalStream(self, f"{self.name}-{self._count}-{uuid.uuid4().hex[:8]}", spec)
        self._streams.add(stream)
        return stream

    async def aclose(self) -> None:
        self._closed = True
        streams = list(self._streams)
        if streams:
            await asyncio.gather(*(s.close() for s in streams), return_exceptions=True)
        if self._trace is not None:
            self._trace.close()

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    def _forget(self, stream: LocalStream) -> None:
        self._streams.discard(stream)


def scripted_config(**overrides: Any) -> LocalEngineConfig:
    """A LocalEngineConfig with the scripted back ends (energy VAD, canned transcripts and reply, tone)."""
    return LocalEngineConfig(**{"vad": "energy", "asr": "scripted", "policy": "scripted", "tts": "tone", **overrides})


class ScriptedEngine(LocalEngine):
    """The load-test model: LocalEngine (the same Nova events, pacing, barge-in and limits) with the
    scripted back ends, so a stream costs the gateway's work and almost nothing of its own."""

    name = "scripted"

    def __init__(self, config: LocalEngineConfig | None = None) -> None:
        super().__init__(config or scripted_config())
