// node --test web/test/  — audio/opus.js against stand-ins for WebCodecs (node has none): the order
// of samples and item ends out of the decoder, a barge-in's drop, errors; the encoder's input.
import { afterEach, test } from "node:test";
import assert from "node:assert/strict";

import { OpusDecoder, OpusEncoder, opusSupport } from "../audio/opus.js";

const tick = (ms = 0) => new Promise((r) => setTimeout(r, ms));
const made = { decoders: [], encoders: [] };

// A decoder that answers each chunk asynchronously (as browsers do) with 20 ms at 48 kHz whose
// samples hold the packet's first byte; a packet [0xee] is an error, which closes it.
class FakeAudioDecoder {
  constructor({ output, error }) {
    this.output = output;
    this.error = error;
    this.state = "unconfigured";
    made.decoders.push(this);
  }
  configure(config) {
    this.config = config;
    this.state = "configured";
  }
  decode(chunk) {
    if (this.state !== "configured") throw new Error("not configured");
    const first = chunk.data[0];
    setTimeout(() => {
      if (this.state !== "configured") return;
      if (first === 0xee) {
        this.state = "closed";
        this.error(new Error("bad packet"));
        return;
      }
      this.output({
        timestamp: chunk.timestamp, numberOfFrames: 960, sampleRate: 48000, closed: false,
        copyTo(dest, opts) {
          assert.deepEqual(opts, { planeIndex: 0, format: "f32-planar" });
          dest.fill(first / 100);
        },
        close() {
          this.closed = true;
        },
      });
    }, 1);
  }
  close() {
    this.state = "closed";
  }
  static async isConfigSupported(config) {
    return { supported: config.sampleRate === 24000 };
  }
}

class FakeEncodedAudioChunk {
  constructor({ type, timestamp, data }) {
    this.type = type;
    this.timestamp = timestamp;
    this.data = new Uint8Array(data);
  }
}

class FakeAudioEncoder {
  constructor({ output }) {
    this.output = output;
    this.state = "unconfigured";
    this.encodeQueueSize = 0;
    this.inputs = [];
    made.encoders.push(this);
  }
  configure(config) {
    this.config = config;
    this.state = "configured";
  }
  encode(data) {
    this.inputs.push({ ...data.init, closed: () => data.closed });
    const bytes = new Uint8Array([data.init.timestamp / 20000, 1, 2]);
    setTimeout(() => this.output({ byteLength: bytes.length, copyTo: (dest) => new Uint8Array(dest).set(bytes) }), 1);
  }
  close() {
    this.state = "closed";
  }
  static async isConfigSupported(config) {
    return { supported: config.sampleRate === 24000 }; // not 16000: the encoder then runs at 24 kHz
  }
}

class FakeAudioData {
  constructor(init) {
    this.init = init;
    this.closed = false;
  }
  close() {
    this.closed = true;
  }
}

Object.assign(globalThis, { AudioDecoder: FakeAudioDecoder, EncodedAudioChunk: FakeEncodedAudioChunk,
                            AudioEncoder: FakeAudioEncoder, AudioData: FakeAudioData });
afterEach(() => {
  made.decoders.length = made.encoders.length = 0;
});

function decoder() {
  const log = [];
  const dec = new OpusDecoder({
    onsamples: (item, samples, rate) => log.push(["samples", item, samples.length, rate, Math.round(samples[0] * 100)]),
    onend: (item) => log.push(["end", item]),
  });
  return { dec, log };
}

const packet = (byte) => new Uint8Array([byte, 0, 0]).buffer;

test("opusSupport: the encoder's rate is 16 kHz, else 24 kHz; the decoder is asked for 24 kHz", async () => {
  assert.deepEqual(await opusSupport(), { input: 24000, output: true, reason: "Opus through WebCodecs" });
});

test("decoder: samples in packet order, an item's end after its last samples", async () => {
  const { dec, log } = decoder();
  dec.end("a0"); // nothing under way: at once
  dec.decode("a1", packet(10));
  dec.decode("a1", packet(20));
  dec.end("a1");
  dec.decode("a2", packet(30));
  assert.deepEqual(log, [["end", "a0"]], "decoding is asynchronous");
  await tick(10);
  assert.deepEqual(log, [
    ["end", "a0"], ["samples", "a1", 960, 48000, 10], ["samples", "a1", 960, 48000, 20], ["end", "a1"],
    ["samples", "a2", 960, 48000, 30],
  ]);
  assert.equal(made.decoders.length, 1);
  assert.deepEqual(made.decoders[0].config, { codec: "opus", sampleRate: 24000, numberOfChannels: 1 });
  assert.deepEqual([dec.packets, dec.bytes, dec.dropped, dec.errors], [3, 9, 0, 0]);
});

test("decoder: drop() (a barge-in): nothing under way comes out, not even its end", async () => {
  const { dec, log } = decoder();
  dec.decode("a1", packet(10));
  dec.decode("a1", packet(20));
  dec.end("a1");
  dec.drop();
  dec.decode("a2", packet(30)); // the next item's audio plays
  dec.end("a2");
  await tick(10);
  assert.deepEqual(log, [["samples", "a2", 960, 48000, 30], ["end", "a2"]]);
  assert.equal(dec.dropped, 2);
});

test("decoder: an error closes the decoder; the ends behind it come, the next packet opens a new one", async () => {
  const { dec, log } = decoder();
  dec.decode("a1", packet(10));
  dec.decode("a1", packet(0xee));
  dec.decode("a1", packet(20));
  dec.end("a1");
  await tick(10);
  assert.deepEqual(log, [["samples", "a1", 960, 48000, 10], ["end", "a1"]]);
  assert.equal(dec.errors, 1);
  dec.decode("a2", packet(30));
  await tick(10);
  assert.equal(made.decoders.length, 2);
  assert.deepEqual(log.at(-1), ["samples", "a2", 960, 48000, 30]);
});

test("encoder: PCM16 frames in as f32 AudioData with running timestamps, one packet out each", async () => {
  const packets = [];
  const enc = new OpusEncoder({ sampleRate: 24000, onpacket: (p) => packets.push([...new Uint8Array(p)]) });
  const frame = new Int16Array(480).fill(16384);
  enc.encode(frame.buffer);
  enc.encode(frame);
  await tick(10);
  const [e] = made.encoders;
  assert.deepEqual(e.config, { codec: "opus", sampleRate: 24000, numberOfChannels: 1, bitrate: 24000,
                               opus: { frameDuration: 20000, format: "opus" } });
  assert.deepEqual(e.inputs.map((i) => [i.format, i.sampleRate, i.numberOfChannels, i.numberOfFrames, i.timestamp, i.data[0]]),
                   [["f32", 24000, 1, 480, 0, 0.5], ["f32", 24000, 1, 480, 20000, 0.5]]);
  assert.ok(e.inputs.every((i) => i.closed()), "each AudioData is closed once handed over");
  assert.deepEqual(packets, [[0, 1, 2], [1, 1, 2]]);
  assert.deepEqual([enc.packets, enc.bytes, enc.dropped], [2, 6, 0]);
});
