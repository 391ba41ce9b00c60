// Opus through WebCodecs (AudioEncoder / AudioDecoder): whether the browser has it, an encoder for
// the microphone's frames and a decoder for the assistant's packets. No protocol and no Web Audio in
// here: audio-io.js plays what the decoder gives, app.js sends what the encoder gives.
//
// On the wire (docs/protocol.md#audio-codecs) each binary WebSocket frame is ONE raw Opus packet
// (no Ogg), mono, 20 ms. Up at 16 kHz (or 24 kHz), down at 24 kHz.

export const OPUS_FRAME_MS = 20;
export const OPUS_BITRATE = 24000; // bit/s: speech, about 60 bytes a packet
const INPUT_RATES = [16000, 24000]; // the rates the gateway takes Opus at, preferred first

function encoderConfig(sampleRate, bitrate = OPUS_BITRATE) {
  return {
    codec: "opus", sampleRate, numberOfChannels: 1, bitrate,
    opus: { frameDuration: OPUS_FRAME_MS * 1000, format: "opus" }, // raw packets, not Ogg
  };
}

function decoderConfig(sampleRate) {
  return { codec: "opus", sampleRate, numberOfChannels: 1 };
}

/**
 * What this browser can do with Opus: `{input, output, reason}`. `input` is the rate to encode the
 * microphone at (16000, else 24000; null when it cannot encode), `output` whether it decodes the
 * gateway's 24 kHz packets.
 */
export async function opusSupport({ outputRate = 24000 } = {}) {
  if (typeof AudioEncoder === "undefined" || typeof AudioDecoder === "undefined" ||
      typeof AudioData === "undefined" || typeof EncodedAudioChunk === "undefined") {
    return { input: null, output: false, reason: "this browser has no WebCodecs audio" };
  }
  let input = null;
  for (const rate of INPUT_RATES) {
    try {
      if ((await AudioEncoder.isConfigSupported(encoderConfig(rate))).supported) {
        input = rate;
        break;
      }
    } catch {}
  }
  let output = false;
  try {
    output = !!(await AudioDecoder.isConfigSupported(decoderConfig(outputRate))).supported;
  } catch {}
  const reason = input && output ? "Opus through WebCodecs"
    : `this browser's WebCodecs cannot ${input ? "decode" : "encode"} Opus`;
  return { input, output, reason };
}

/**
 * The microphone's PCM16 frames (20 ms) in, one Opus packet (ArrayBuffer) out per frame, through
 * `onpacket`. The AudioEncoder is made on the first frame, and again after an error.
 */
export class OpusEncoder {
  constructor({ sampleRate = 16000, bitrate = OPUS_BITRATE, onpacket = null } = {}) {
    this.sampleRate = sampleRate;
    this.bitrate = bitrate;
    this.onpacket = onpacket;
    this.packets = 0;
    this.bytes = 0;
    this.dropped = 0; // frames not encoded: the encoder was behind, or failed
    this.errors = 0;
    this._encoder = null;
    this._samples = 0; // for the timestamps
  }

  _open() {
    this._encoder = new AudioEncoder({
      output: (chunk) => {
        const packet = new ArrayBuffer(chunk.byteLength);
        chunk.copyTo(packet);
        this.packets++;
        this.bytes += packet.byteLength;
        if (this.onpacket) this.onpacket(packet);
      },
      error: (e) => {
        this.errors++;
        console.warn("novagate: Opus encoder:", e && e.message);
      },
    });
    this._encoder.configure(encoderConfig(this.sampleRate, this.bitrate));
  }

  /** Encode one frame of PCM16LE mono at `sampleRate` (ArrayBuffer or Int16Array). */
  encode(pcm) {
    const int16 = pcm instanceof Int16Array ? pcm : new Int16Array(pcm);
    if (!this._encoder || this._encoder.state === "closed") {
      try {
        this._open();
      } catch (e) {
        this.dropped++;
        return;
      }
    }
    if (this._encoder.encodeQueueSize > 10) { // ~200 ms behind: drop rather than fall further behind
      this.dropped++;
      return;
    }
    const samples = new Float32Array(int16.length);
    for (let i = 0; i < int16.length; i++) samples[i] = int16[i] / 32768;
    const data = new AudioData({
      format: "f32", sampleRate: this.sampleRate, numberOfChannels: 1, numberOfFrames: samples.length,
      timestamp: Math.round((this._samples * 1e6) / this.sampleRate), data: samples,
    });
    this._samples += samples.length;
    try {
      this._encoder.encode(data);
    } catch {
      this.dropped++;
    } finally {
      data.close();
    }
  }

  close() {
    if (this._encoder && this._encoder.state !== "closed") this._encoder.close();
    this._encoder = null;
  }
}

/**
 * The assistant's Opus packets in, float samples out, in order and per item:
 * `onsamples(itemId, Float32Array, sampleRate)` for each packet, `onend(itemId)` once everything
 * decoded before `end(itemId)` has come out. `drop()` (a barge-in) forgets everything not yet
 * out: nothing of it is played. Chromium decodes Opus at 48 kHz whatever it is configured for:
 * the caller resamples.
 */
export class OpusDecoder {
  constructor({ sampleRate = 24000, onsamples = null, onend = null } = {}) {
    this.sampleRate = sampleRate;
    this.onsamples = onsamples;
    this.onend = onend;
    this.packets = 0;
    this.bytes = 0;
    this.dropped = 0; // packets not played: under way at a drop(), or lost to an error
    this.errors = 0;
    this._decoder = null;
    this._seq = 0;
    // What is under way, in order: {ts, itemId} per packet, {end: itemId} per end(). Outputs are
    // matched by their timestamp; an output whose packet is no longer here was dropped.
    this._queue = [];
  }

  _open() {
    this._decoder = new AudioDecoder({
      output: (data) => this._output(data),
      error: (e) => {
        this.errors++;
        console.warn("novagate: Opus decoder:", e && e.message);
        // the decoder is closed now: what it held is lost, the ends queued behind it are due
        const queue = this._queue;
        this._queue = [];
        for (const entry of queue) {
          if ("end" in entry) this._ended(entry.end);
          else this.dropped++;
        }
      },
    });
    this._decoder.configure(decoderConfig(this.sampleRate));
  }

  decode(itemId, packet) {
    if (!this._decoder || this._decoder.state === "closed") {
      try {
        this._open();
      } catch {
        this.dropped++;
        return;
      }
    }
    const ts = this._seq++ * OPUS_FRAME_MS * 1000; // µs; unique, so that outputs find their packet
    this._queue.push({ ts, itemId });
    this.packets++;
    this.bytes += packet.byteLength;
    try {
      this._decoder.decode(new EncodedAudioChunk({ type: "key", timestamp: ts, data: packet }));
    } catch {
      this._queue.pop();
      this.dropped++;
    }
  }

  /** No more packets for this item: `onend` follows its last samples. */
  end(itemId) {
    if (this._queue.length) this._queue.push({ end: itemId });
    else this._ended(itemId);
  }

  /** Forget every packet not decoded yet (and the ends behind them): nothing of them will come out. */
  drop() {
    this.dropped += this._queue.filter((e) => !("end" in e)).length;
    this._queue = [];
  }

  _output(data) {
    try {
      const i = this._queue.findIndex((e) => e.ts === data.timestamp);
      if (i < 0) return; // dropped (counted then)
      const done = this._queue.splice(0, i + 1);
      const entry = done.pop();
      for (const e of done) if ("end" in e) this._ended(e.end); // (packets before it gave no output)
      const samples = new Float32Array(data.numberOfFrames);
      data.copyTo(samples, { planeIndex: 0, format: "f32-planar" });
      if (this.onsamples) this.onsamples(entry.itemId, samples, data.sampleRate);
      while (this._queue.length && "end" in this._queue[0]) this._ended(this._queue.shift().end);
    } finally {
      data.close();
    }
  }

  _ended(itemId) {
    if (this.onend) this.onend(itemId);
  }

  close() {
    this.drop();
    if (this._decoder && this._decoder.state !== "closed") this._decoder.close();
    this._decoder = null;
  }
}
