// Main-thread side of the two AudioWorklets: the microphone and the player. Reusable on their own;
// the Player implements the player interface NovagateClient.attachPlayer() expects.

import { OpusDecoder } from "./opus.js";
import { Resampler } from "./resampler.js";

/** Why the microphone could not start, in words a user can act on. */
export class MicrophoneError extends Error {
  constructor(kind, message, cause) {
    super(message);
    this.name = "MicrophoneError";
    this.kind = kind; // denied | no-device | busy | insecure | unsupported | failed
    this.cause = cause;
  }
}

function micError(e) {
  const name = e && e.name;
  if (name === "NotAllowedError" || name === "SecurityError" || name === "PermissionDeniedError") {
    return new MicrophoneError("denied", "Microphone access was denied. Allow the microphone for this site " +
      "(the icon in the address bar, or the browser's site settings), then press Start again.", e);
  }
  if (name === "NotFoundError" || name === "OverconstrainedError" || name === "DevicesNotFoundError") {
    return new MicrophoneError("no-device", "No microphone was found. Plug one in, then press Start again.", e);
  }
  if (name === "NotReadableError" || name === "AbortError" || name === "TrackStartError") {
    return new MicrophoneError("busy", "The microphone is in use by another application or could not be " +
      "opened. Close the other application, then press Start again.", e);
  }
  return new MicrophoneError("failed", `The microphone could not be started (${(e && e.message) || e}).`, e);
}

/**
 * The microphone: getUserMedia with echo cancellation, noise suppression and automatic gain, an
 * AudioWorklet at the device's rate that resamples to 16 kHz (windowed sinc) and cuts 20 ms PCM16
 * frames. `onframe(ArrayBuffer)` receives each frame; `level` is the last frame's RMS (0..1).
 */
export class Microphone {
  constructor({ targetRate = 16000, frameMs = 20, onframe = null } = {}) {
    this.targetRate = targetRate;
    this.frameMs = frameMs;
    this.onframe = onframe;
    this.level = 0;
    this.frames = 0;
    this.ctx = null;
    this.stream = null;
    this.node = null;
    this.onstatechange = null; // (state) => {}: the AudioContext started, was suspended, ...
  }

  get running() {
    return !!this.ctx && this.ctx.state === "running";
  }

  get deviceRate() {
    return this.ctx ? this.ctx.sampleRate : 0;
  }

  async start() {
    if (this.ctx) return;
    if (!globalThis.isSecureContext || !navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      throw new MicrophoneError("insecure", "The microphone needs a secure page: open this app over https " +
        "(or on localhost).");
    }
    if (typeof AudioWorkletNode === "undefined") {
      throw new MicrophoneError("unsupported", "This browser cannot process audio (no AudioWorklet). " +
        "Use a current Chrome, Edge, Firefox or Safari.");
    }
    let stream;
    try {
      stream = await navigator.mediaDevices.getUserMedia({
        audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true, channelCount: 1 },
        video: false,
      });
    } catch (e) {
      throw micError(e);
    }
    const ctx = new AudioContext({ latencyHint: "interactive" }); // the device's own rate
    try {
      await ctx.audioWorklet.addModule(new URL("./capture-worklet.js", import.meta.url));
      const source = ctx.createMediaStreamSource(stream);
      const node = new AudioWorkletNode(ctx, "novagate-capture", {
        numberOfInputs: 1, numberOfOutputs: 1, outputChannelCount: [1],
        processorOptions: { targetRate: this.targetRate, frameMs: this.frameMs },
      });
      node.port.onmessage = (e) => {
        const m = e.data;
        if (m.type !== "frame") return;
        this.frames++;
        this.level = m.level;
        if (this.onframe) this.onframe(m.pcm);
      };
      // Pulled through a silent gain to the destination, so every browser keeps it running.
      const mute = ctx.createGain();
      mute.gain.value = 0;
      source.connect(node);
      node.connect(mute);
      mute.connect(ctx.destination);
      ctx.onstatechange = () => this.onstatechange && this.onstatechange(ctx.state);
      if (ctx.state === "suspended") await ctx.resume().catch(() => {});
      this.ctx = ctx;
      this.stream = stream;
      this.node = node;
    } catch (e) {
      stream.getTracks().forEach((t) => t.stop());
      ctx.close().catch(() => {});
      throw new MicrophoneError("failed", `The audio engine could not start (${e.message || e}).`, e);
    }
  }

  /** Try again to run the context (browsers keep it suspended until the user interacts). */
  resume() {
    return this.ctx ? this.ctx.resume().catch(() => {}) : Promise.resolve();
  }

  set muted(value) {
    if (this.node) this.node.port.postMessage({ type: "mute", value: !!value });
  }

  stop() {
    if (this.stream) this.stream.getTracks().forEach((t) => t.stop());
    if (this.ctx) this.ctx.close().catch(() => {});
    this.stream = this.ctx = this.node = null;
    this.level = 0;
  }
}

/**
 * The assistant's voice: an AudioContext at the output rate (24 kHz) with the jitter-buffered
 * player worklet. Counts what it played per item, flushes at once on a barge-in.
 *
 * It takes PCM16LE frames, or Opus packets after `setCodec("opus")` (the client says which the
 * session confirmed): those go through WebCodecs (opus.js) and reach the worklet as float samples
 * at the output rate, in order, with each item's end after its last samples.
 */
export class Player {
  constructor({ sampleRate = 24000, targetMs = 80 } = {}) {
    this.sampleRate = sampleRate;
    this.targetMs = targetMs;
    this.ctx = null;
    this.node = null;
    this.stats = { state: "idle", depth: 0, depthMs: 0, played: 0, underruns: 0, flushes: 0, dropped: 0, starts: 0 };
    this.lastFlush = null;
    this.flushes = [];
    this._waiting = new Map();
    this._seq = 0;
    this.codec = "pcm16";
    this.decoder = null; // the OpusDecoder, once Opus was asked for
    this._resamplers = new Map(); // itemId -> Resampler: the decoder's rate (48 kHz) to ours
    this.onstats = null;
    this.onstatechange = null;
  }

  /** What the frames pushed from now on are: "pcm16" (PCM16LE at the output rate) or "opus". */
  setCodec(codec) {
    this.codec = codec === "opus" ? "opus" : "pcm16";
    if (this.codec === "opus" && !this.decoder) {
      this.decoder = new OpusDecoder({
        sampleRate: this.sampleRate,
        onsamples: (itemId, samples, rate) => this._pushSamples(itemId, samples, rate),
        onend: (itemId) => this._postEnd(itemId),
      });
    }
  }

  get running() {
    return !!this.ctx && this.ctx.state === "running";
  }

  /** Milliseconds of assistant audio played since start(). */
  get playedMs() {
    return Math.round((this.stats.played * 1000) / this.sampleRate);
  }

  async start() {
    if (this.ctx) return;
    const ctx = new AudioContext({ sampleRate: this.sampleRate, latencyHint: "interactive" });
    await ctx.audioWorklet.addModule(new URL("./player-worklet.js", import.meta.url));
    const node = new AudioWorkletNode(ctx, "novagate-player", {
      numberOfInputs: 0, numberOfOutputs: 1, outputChannelCount: [1],
      processorOptions: { targetMs: this.targetMs },
    });
    node.port.onmessage = (e) => this._onMessage(e.data);
    node.connect(ctx.destination);
    ctx.onstatechange = () => this.onstatechange && this.onstatechange(ctx.state);
    this.ctx = ctx;
    this.node = node;
    if (ctx.state === "suspended") await ctx.resume().catch(() => {});
  }

  resume() {
    return this.ctx ? this.ctx.resume().catch(() => {}) : Promise.resolve();
  }

  _onMessage(m) {
    if (m.type === "stats") {
      this.stats = m;
      if (this.onstats) this.onstats(m);
    } else if (m.type === "flushed") {
      const resolve = this._waiting.get(m.id);
      this._waiting.delete(m.id);
      if (resolve) resolve(m);
    }
  }

  startItem(_itemId) {}

  push(itemId, pcm) {
    // While the browser keeps the context suspended nothing plays: queueing would only make the
    // audio late when it resumes, so it is dropped (the transcript still shows what was said).
    if (!this.node || this.ctx.state !== "running") return;
    if (this.codec === "opus") {
      this.decoder.decode(itemId, pcm); // on to _pushSamples once decoded
      return;
    }
    const copy = pcm.slice(0); // the socket's buffer stays usable for other listeners
    this.node.port.postMessage({ type: "push", item: itemId, pcm: copy }, [copy]);
  }

  /** Decoded float samples: resampled to the output rate if need be (one resampler per item). */
  _pushSamples(itemId, samples, rate) {
    if (!this.node || this.ctx.state !== "running") return;
    let out = samples;
    if (rate !== this.sampleRate) {
      let r = this._resamplers.get(itemId);
      if (!r || r.inRate !== rate) {
        r = new Resampler(rate, this.sampleRate);
        this._resamplers.set(itemId, r);
        if (this._resamplers.size > 8) this._resamplers.delete(this._resamplers.keys().next().value);
      }
      out = r.process(samples);
    }
    this.node.port.postMessage({ type: "push", item: itemId, f32: out.buffer }, [out.buffer]);
  }

  endItem(itemId) {
    if (this.decoder) this.decoder.end(itemId); // after the packets still being decoded
    else this._postEnd(itemId);
  }

  _postEnd(itemId) {
    this._resamplers.delete(itemId);
    if (this.node) this.node.port.postMessage({ type: "end", item: itemId });
  }

  /** Drop all queued audio now; resolves with the ms of `itemId` that were played. */
  flush(itemId = null) {
    this._dropDecoded();
    if (!this.node) return Promise.resolve(0);
    const id = ++this._seq;
    const before = this.stats;
    const reply = new Promise((resolve) => {
      this._waiting.set(id, resolve);
      // a suspended context does not answer: what the last report said is the best estimate
      setTimeout(() => {
        if (this._waiting.delete(id)) resolve(null);
      }, 300);
    });
    this.node.port.postMessage({ type: "flush", id, item: itemId });
    return reply.then((m) => {
      const samples = m ? m.itemPlayed : before.item === itemId ? before.itemPlayed : 0;
      const ms = Math.round((samples * 1000) / this.sampleRate);
      this.lastFlush = { itemId, playedMs: ms, depthAfter: m ? m.depth : null, droppedMs: m ?
        Math.round((m.dropped * 1000) / this.sampleRate) : null, at: Date.now() };
      this.flushes.push(this.lastFlush);
      if (this.flushes.length > 20) this.flushes.shift();
      return ms;
    });
  }

  reset() {
    this._dropDecoded();
    if (this.node) this.node.port.postMessage({ type: "flush", id: 0, item: null });
  }

  /** Packets still being decoded are not played either. */
  _dropDecoded() {
    if (this.decoder) this.decoder.drop();
    this._resamplers.clear();
  }

  stop() {
    if (this.decoder) this.decoder.close();
    this.decoder = null;
    if (this.ctx) this.ctx.close().catch(() => {});
    this.ctx = this.node = null;
  }
}
