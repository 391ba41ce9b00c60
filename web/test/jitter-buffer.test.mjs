// node --test web/test/
import { test } from "node:test";
import assert from "node:assert/strict";

import { JitterBuffer } from "../audio/jitter-buffer.js";

const RATE = 24000;
const Q = 128; // one render quantum

function sine(n, { freq = 440, amplitude = 0.8, offset = 0 } = {}) {
  const x = new Float32Array(n);
  for (let i = 0; i < n; i++) x[i] = amplitude * Math.sin((2 * Math.PI * freq * (offset + i)) / RATE);
  return x;
}

/** Pull `quanta` render quanta; returns all output samples. */
function render(jb, quanta) {
  const out = new Float32Array(quanta * Q);
  for (let q = 0; q < quanta; q++) jb.pull(out.subarray(q * Q, (q + 1) * Q));
  return out;
}

function maxJump(x, from = 0) {
  let m = 0;
  for (let i = Math.max(1, from); i < x.length; i++) m = Math.max(m, Math.abs(x[i] - x[i - 1]));
  return m;
}

// A 440 Hz sine at 0.8 moves at most 2*pi*440/24000*0.8 = 0.092 per sample: a bigger step is a click.
const CLICK = 0.1;

test("playback waits for the target depth (60–100 ms), then starts", () => {
  const jb = new JitterBuffer({ sampleRate: RATE, targetMs: 80 });
  assert.equal(jb.target, 1920);
  jb.push(sine(960), "a"); // 40 ms: below target
  let out = render(jb, 4);
  assert.ok(out.every((v) => v === 0), "silent while buffering");
  assert.equal(jb.state, "buffering");
  assert.equal(jb.depth, 960);
  jb.push(sine(960, { offset: 960 }), "a"); // now 80 ms
  out = render(jb, 1);
  assert.equal(jb.state, "playing");
  assert.ok(out.some((v) => v !== 0));
  assert.equal(jb.depth, 1920 - Q);
  assert.ok(jb.depthMs > 70 && jb.depthMs < 80);
});

test("a short item that has ended plays at once, without waiting for the target", () => {
  const jb = new JitterBuffer({ sampleRate: RATE, targetMs: 80 });
  jb.push(sine(480), "short");
  jb.end("short");
  const out = render(jb, 5);
  assert.equal(jb.played("short"), 480);
  assert.equal(jb.stats.underruns, 0, "an item that ended is not an underrun");
  assert.ok(maxJump(out) < CLICK);
});

test("an underrun fades out and back in: no sample-to-sample jump above the threshold", () => {
  const jb = new JitterBuffer({ sampleRate: RATE, targetMs: 80 });
  // 102 ms (ending mid-wave), then the network is late, then 200 ms more of the same tone
  jb.push(sine(2450), "a");
  const out1 = render(jb, 28); // plays it all and runs dry
  assert.equal(jb.stats.underruns, 1);
  assert.equal(jb.state, "idle");
  jb.push(sine(4800, { offset: 2450 }), "a");
  const out2 = render(jb, 40);
  const all = new Float32Array(out1.length + out2.length);
  all.set(out1);
  all.set(out2, out1.length);
  assert.ok(maxJump(all) < CLICK, `jump ${maxJump(all)}`);
  // the same signal without the fades would click
  const naive = new Float32Array(all.length);
  naive.set(sine(2450));
  naive.set(sine(4800, { offset: 2450 }), 28 * Q);
  assert.ok(maxJump(naive) > 0.3);
  assert.equal(jb.played("a"), 7250);
});

test("flush empties the buffer at once, reports what was played, and ramps without a click", () => {
  const jb = new JitterBuffer({ sampleRate: RATE, targetMs: 80 });
  jb.push(sine(24000, { amplitude: 0.8, freq: 200 }), "story");
  const before = render(jb, 50); // 6400 samples played
  assert.equal(jb.played("story"), 6400);
  const report = jb.flush();
  assert.equal(jb.depth, 0);
  assert.equal(jb.state, "idle");
  assert.deepEqual(report.items.story, { samples: 6400, ms: 267 });
  assert.equal(report.droppedSamples, 24000 - 6400);
  const after = render(jb, 4);
  const all = new Float32Array(before.length + after.length);
  all.set(before);
  all.set(after, before.length);
  assert.ok(maxJump(all) < CLICK, `jump ${maxJump(all)}`);
  assert.equal(after[after.length - 1], 0, "silent after the ramp");
  assert.equal(jb.played("story"), 6400, "nothing more counted after the flush");
  assert.equal(jb.stats.flushes, 1);
});

test("played samples are counted per item, across item boundaries inside one quantum", () => {
  const jb = new JitterBuffer({ sampleRate: RATE, targetMs: 60 });
  jb.push(sine(1000), "a");
  jb.end("a");
  jb.push(sine(2000, { offset: 1000 }), "b");
  render(jb, 10); // 1280 samples: all of a, 280 of b
  assert.equal(jb.played("a"), 1000);
  assert.equal(jb.played("b"), 280);
  assert.equal(jb.currentItem, "b");
  assert.equal(jb.playedMs("a"), 42);
  const report = jb.flush();
  assert.deepEqual(Object.keys(report.items), ["b"]);
  assert.equal(report.items.b.samples, 280);
  assert.equal(jb.played("unknown"), 0);
});

test("after a flush the next item buffers to the target again and starts with a fade-in", () => {
  const jb = new JitterBuffer({ sampleRate: RATE, targetMs: 80 });
  jb.push(sine(4800), "a");
  render(jb, 10);
  jb.flush();
  render(jb, 2);
  jb.push(sine(2400, { amplitude: 0.8, offset: 77 }), "b");
  const out = render(jb, 4);
  assert.ok(Math.abs(out[0]) < 0.01, "fade-in starts near zero");
  assert.ok(maxJump(out) < CLICK);
  assert.equal(jb.played("b"), 4 * Q);
});

test("the buffer is bounded: beyond capacity the oldest audio is dropped", () => {
  const jb = new JitterBuffer({ sampleRate: RATE, targetMs: 80, capacityMs: 500 });
  jb.push(sine(12000), "a"); // 500 ms
  jb.push(sine(2400), "b"); // 100 ms more: 100 ms of "a" dropped
  assert.equal(jb.depth, 12000);
  assert.equal(jb.stats.dropped, 2400);
  render(jb, 100);
  assert.equal(jb.played("a"), 9600);
  assert.equal(jb.played("b"), 2400);
});

test("wrap-around of the ring keeps the samples in order", () => {
  const jb = new JitterBuffer({ sampleRate: 1000, targetMs: 1, capacityMs: 100, fadeMs: 1 });
  let v = 1;
  const chunk = () => new Float32Array(37).map(() => v++ / 10000);
  jb.push(chunk(), "x");
  const got = [];
  for (let round = 0; round < 20; round++) {
    jb.push(chunk(), "x"); // 37..74 samples queued in a ring of 100: it wraps
    const out = new Float32Array(37);
    jb.pull(out);
    got.push(...out);
  }
  assert.equal(jb.stats.underruns, 0);
  // after the first (faded-in) sample, values go up by 1/10000 each
  for (let i = 2; i < got.length; i++) assert.ok(Math.abs(got[i] - got[i - 1] - 0.0001) < 1e-6, `at ${i}`);
});
