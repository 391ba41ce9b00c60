// The assistant's voice: an AudioWorklet that plays PCM at the output rate (the AudioContext is
// created at the gateway's output_sample_rate, 24 kHz, so no resampling happens here; the browser
// converts to the device) through the jitter buffer of jitter-buffer.js.
//
// Messages from the main thread:
//   {type: "push", item, pcm: ArrayBuffer (PCM16LE)}   queue audio of an assistant item
//   {type: "push", item, f32: ArrayBuffer (float32)}   the same, as floats (decoded Opus)
//   {type: "end", item}                                 no more audio for that item
//   {type: "flush", id, item}                           barge-in: drop everything now; answers
//                                                       {type: "flushed", id, item, itemPlayed (samples of
//                                                       that item played), items, dropped, depth}
// Every ~50 ms it reports {type: "stats", ...} (depth, what played, underruns) to the main thread.

import { JitterBuffer } from "./jitter-buffer.js";
import { pcm16ToFloat } from "./resampler.js";

class PlayerProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const opts = (options && options.processorOptions) || {};
    this.jb = new JitterBuffer({ sampleRate, targetMs: opts.targetMs || 80, fadeMs: opts.fadeMs || 5 });
    this.statsEvery = Math.round(sampleRate * 0.05);
    this.sinceStats = 0;
    this.port.onmessage = (e) => this.onMessage(e.data);
  }

  onMessage(msg) {
    const jb = this.jb;
    switch (msg.type) {
      case "push":
        jb.push(msg.f32 ? new Float32Array(msg.f32) : pcm16ToFloat(new Int16Array(msg.pcm)), msg.item);
        break;
      case "end":
        jb.end(msg.item);
        break;
      case "flush": {
        const r = jb.flush();
        this.port.postMessage({ type: "flushed", id: msg.id, item: msg.item, itemPlayed: jb.played(msg.item),
                                items: r.items, dropped: r.droppedSamples, depth: jb.depth });
        this.report();
        break;
      }
      default:
        break;
    }
  }

  report() {
    const jb = this.jb;
    const item = jb.currentItem ?? jb.lastItem;
    this.port.postMessage({
      type: "stats", state: jb.state, depth: jb.depth, depthMs: jb.depthMs, item,
      itemPlayed: item == null ? 0 : jb.played(item), ...jb.stats,
    });
  }

  process(_inputs, outputs) {
    const out = outputs[0];
    this.jb.pull(out[0]);
    for (let c = 1; c < out.length; c++) out[c].set(out[0]);
    this.sinceStats += out[0].length;
    if (this.sinceStats >= this.statsEvery) {
      this.sinceStats = 0;
      this.report();
    }
    return true;
  }
}

registerProcessor("novagate-player", PlayerProcessor);
