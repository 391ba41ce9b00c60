// node --test web/test/
import { test } from "node:test";
import assert from "node:assert/strict";

import { Resampler, resample, floatToPcm16, pcm16ToFloat } from "../audio/resampler.js";

function tone(freq, rate, seconds, amplitude = 0.5) {
  const n = Math.round(rate * seconds);
  const x = new Float32Array(n);
  for (let i = 0; i < n; i++) x[i] = amplitude * Math.sin((2 * Math.PI * freq * i) / rate);
  return x;
}

/** RMS of the steady part (the filter's start-up transient and the end left out). */
function rms(x, skip) {
  let s = 0;
  let n = 0;
  for (let i = skip; i < x.length - skip; i++) {
    s += x[i] * x[i];
    n++;
  }
  return Math.sqrt(s / n);
}

/** Amplitude of the component at `freq` (single-bin DFT over the steady part). */
function amplitudeAt(x, rate, freq, skip) {
  let re = 0;
  let im = 0;
  let n = 0;
  for (let i = skip; i < x.length - skip; i++) {
    const ph = (2 * Math.PI * freq * i) / rate;
    re += x[i] * Math.cos(ph);
    im += x[i] * Math.sin(ph);
    n++;
  }
  return (2 * Math.hypot(re, im)) / n;
}

const db = (ratio) => 20 * Math.log10(ratio);

for (const inRate of [48000, 44100]) {
  test(`a 1 kHz tone survives ${inRate} -> 16000 with its amplitude`, () => {
    const y = resample(tone(1000, inRate, 1, 0.5), inRate, 16000);
    assert.equal(y.length, 16000);
    const a = amplitudeAt(y, 16000, 1000, 400);
    assert.ok(Math.abs(a - 0.5) < 0.005, `amplitude ${a}`);
    assert.ok(Math.abs(rms(y, 400) - 0.5 / Math.SQRT2) < 0.004);
  });

  test(`a 10 kHz tone (above the new Nyquist) is removed, >= 60 dB down, ${inRate} -> 16000`, () => {
    const y = resample(tone(10000, inRate, 1, 0.9), inRate, 16000);
    const attenuation = db(rms(y, 400) / (0.9 / Math.SQRT2));
    assert.ok(attenuation <= -60, `only ${attenuation.toFixed(1)} dB`);
    // and nothing folded back to the alias frequency (16 - 10 = 6 kHz)
    assert.ok(db(amplitudeAt(y, 16000, 6000, 400) / 0.9) <= -60);
  });
}

test("sample skipping would fail the alias test (the test has teeth)", () => {
  const x = tone(10000, 48000, 1, 0.9);
  const skipped = x.filter((_, i) => i % 3 === 0);
  assert.ok(db(rms(skipped, 400) / (0.9 / Math.SQRT2)) > -3);
});

test("the passband is flat: 300 Hz to 6.5 kHz within 0.1 dB", () => {
  for (const f of [300, 2000, 4000, 6500]) {
    const y = resample(tone(f, 48000, 0.5, 0.5), 48000, 16000);
    const a = amplitudeAt(y, 16000, f, 400);
    assert.ok(Math.abs(db(a / 0.5)) < 0.1, `${f} Hz: ${db(a / 0.5).toFixed(3)} dB`);
  }
});

test("lengths are exact and samples identical when streamed in chunks of any size", () => {
  for (const [inRate, outRate] of [[48000, 16000], [44100, 16000], [16000, 24000], [24000, 16000], [22050, 16000]]) {
    const x = tone(440, inRate, 1, 0.3);
    const whole = resample(x, inRate, outRate);
    assert.equal(whole.length, outRate, `${inRate} -> ${outRate}`);
    const r = new Resampler(inRate, outRate);
    const parts = [];
    let total = 0;
    let seed = 7;
    for (let i = 0; i < x.length; ) {
      seed = (seed * 1103515245 + 12345) % 2147483648;
      const n = Math.min(x.length - i, 1 + (seed % 700)); // 1..700 samples, as a worklet would see
      const expected = r.outputLength(n);
      const y = r.process(x.subarray(i, i + n));
      assert.equal(y.length, expected);
      parts.push(y);
      total += y.length;
      // after every chunk: exactly ceil(in * out / inRate) samples so far
      i += n;
      assert.equal(total, Math.ceil((i * outRate) / inRate));
    }
    const joined = new Float32Array(total);
    let o = 0;
    for (const p of parts) {
      joined.set(p, o);
      o += p.length;
    }
    assert.deepEqual(joined, whole);
  }
});

test("render quanta of 128 samples at 48 kHz make 20 ms frames of exactly 320 samples", () => {
  const r = new Resampler(48000, 16000);
  let produced = 0;
  for (let q = 0; q < 375; q++) produced += r.process(new Float32Array(128)).length; // 1 s
  assert.equal(produced, 16000);
});

test("same rate passes through; reset restarts the stream", () => {
  const x = tone(1000, 16000, 0.1);
  assert.deepEqual(resample(x, 16000, 16000), x);
  const r = new Resampler(48000, 16000);
  const a = r.process(tone(1000, 48000, 0.1));
  r.reset();
  const b = r.process(tone(1000, 48000, 0.1));
  assert.deepEqual(a, b);
  assert.throws(() => new Resampler(0, 16000), RangeError);
});

test("PCM16 conversion clips and round-trips", () => {
  const p = floatToPcm16(Float32Array.from([0, 0.5, -0.5, 1, -1, 2, -2]));
  assert.deepEqual(Array.from(p), [0, 16384, -16384, 32767, -32768, 32767, -32768]);
  const f = pcm16ToFloat(p);
  assert.equal(f[1], 0.5);
  assert.equal(f[4], -1);
});
