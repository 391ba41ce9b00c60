// The microphone AudioWorklet: device-rate float audio in, PCM16LE frames at 16 kHz out.
//
// Runs at the AudioContext's rate (the device's: 44100, 48000, ...). Each render quantum is mixed
// down to mono, resampled to 16 kHz with the windowed-sinc filter of resampler.js (no sample
// skipping), converted to PCM16 and cut into frames of `frameMs` (20 ms = 320 samples = 640 bytes).
// Each frame goes to the main thread as a transferred ArrayBuffer, with its level for a meter.
// When the track delivers nothing (muted, ended) or the node is muted, frames of silence keep
// flowing, so the gateway always sees real-time audio.

import { Resampler, floatToPcm16 } from "./resampler.js";

class CaptureProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const opts = (options && options.processorOptions) || {};
    this.outRate = opts.targetRate || 16000;
    this.frameSamples = Math.round((this.outRate * (opts.frameMs || 20)) / 1000);
    this.resampler = new Resampler(sampleRate, this.outRate);
    this.frame = new Float32Array(this.frameSamples);
    this.fill = 0;
    this.muted = false;
    this.mono = new Float32Array(128);
    this.frames = 0;
    this.port.onmessage = (e) => {
      if (e.data && e.data.type === "mute") this.muted = !!e.data.value;
    };
  }

  process(inputs) {
    const input = inputs[0];
    const n = input && input.length ? input[0].length : 128;
    if (this.mono.length !== n) this.mono = new Float32Array(n);
    const mono = this.mono;
    mono.fill(0);
    if (input && input.length && !this.muted) {
      for (const ch of input) for (let i = 0; i < n; i++) mono[i] += ch[i];
      if (input.length > 1) for (let i = 0; i < n; i++) mono[i] /= input.length;
    }
    const out = this.resampler.process(mono);
    let o = 0;
    while (o < out.length) {
      const take = Math.min(out.length - o, this.frameSamples - this.fill);
      this.frame.set(out.subarray(o, o + take), this.fill);
      this.fill += take;
      o += take;
      if (this.fill === this.frameSamples) {
        let sum = 0;
        for (let i = 0; i < this.frameSamples; i++) sum += this.frame[i] * this.frame[i];
        const pcm = floatToPcm16(this.frame);
        this.port.postMessage({ type: "frame", pcm: pcm.buffer, level: Math.sqrt(sum / this.frameSamples),
                                seq: this.frames++ }, [pcm.buffer]);
        this.fill = 0;
      }
    }
    return true;
  }
}

registerProcessor("novagate-capture", CaptureProcessor);
