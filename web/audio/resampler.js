// Streaming sample-rate conversion with a windowed-sinc (Kaiser) low-pass filter, polyphase.
//
// Pure ES module: no DOM, no Web Audio. It runs inside the capture AudioWorklet (device rate, often
// 44100 or 48000 Hz, to the 16 kHz the gateway wants) and under `node --test`.
//
// For an output sample n the input position is t = n * inRate / outRate. With the rates reduced by
// their gcd (inRate = M*g, outRate = L*g), t = i + p/L with integer i and phase p in [0, L): every
// output sample is a dot product of the last K input samples with one of L precomputed filter
// phases. The filter is a sinc low-pass at the lower of the two Nyquist frequencies, tapered by a
// Kaiser window: passband to 85 % of that Nyquist, stopband from it, about 80 dB attenuation, so
// what lies above the new Nyquist is removed instead of folding back (no sample skipping, no linear
// interpolation). The filter is causal: output is delayed by K/2 input samples (about 2 ms).
//
// Streaming is exact: after T input samples in total, ceil(T * outRate / inRate) output samples have
// been produced, whatever the chunking, and the samples are identical to a one-shot conversion.

const MAX_PHASES = 4096;

/** Zeroth-order modified Bessel function of the first kind (series; fine for the betas used). */
function besselI0(x) {
  let sum = 1;
  let term = 1;
  const q = (x * x) / 4;
  for (let k = 1; k < 64; k++) {
    term *= q / (k * k);
    sum += term;
    if (term < sum * 1e-16) break;
  }
  return sum;
}

function gcd(a, b) {
  while (b) [a, b] = [b, a % b];
  return a;
}

/**
 * Kaiser-window design figures for a low-pass: number of taps and beta for `attenuationDb` of
 * stopband attenuation and a transition band of `transition` cycles per input sample.
 */
export function kaiserDesign(attenuationDb, transition) {
  const a = attenuationDb;
  const beta = a > 50 ? 0.1102 * (a - 8.7) : a >= 21 ? 0.5842 * (a - 21) ** 0.4 + 0.07886 * (a - 21) : 0;
  let taps = Math.ceil((a - 8) / (2.285 * 2 * Math.PI * transition)) + 1;
  taps += taps % 2; // even: the phase arithmetic below centres the window at K/2
  return { taps: Math.max(taps, 8), beta };
}

export class Resampler {
  /**
   * @param {number} inRate  input sample rate (Hz, integer)
   * @param {number} outRate output sample rate (Hz, integer)
   * @param {{attenuationDb?: number, passband?: number}} [options]
   *   attenuationDb: stopband attenuation (default 80); passband: end of the passband as a share of
   *   the lower Nyquist frequency (default 0.85; the stopband starts at that Nyquist).
   */
  constructor(inRate, outRate, { attenuationDb = 80, passband = 0.85 } = {}) {
    if (!Number.isInteger(inRate) || !Number.isInteger(outRate) || inRate <= 0 || outRate <= 0) {
      throw new RangeError(`sample rates must be positive integers (got ${inRate} -> ${outRate})`);
    }
    this.inRate = inRate;
    this.outRate = outRate;
    const g = gcd(inRate, outRate);
    this.M = inRate / g; // input step per output sample is M / L
    this.L = outRate / g;
    this.passthrough = inRate === outRate;

    // Cut-off in cycles per input sample: the lower Nyquist, with the transition band below it.
    const nyquist = 0.5 * Math.min(1, outRate / inRate);
    const fPass = nyquist * passband;
    const fStop = nyquist;
    const { taps, beta } = kaiserDesign(attenuationDb, fStop - fPass);
    const fc = (fPass + fStop) / 2;
    this.taps = taps;
    this.phases = Math.min(this.L, MAX_PHASES);

    // Coefficients of phase p (fraction p/phases), stored in buffer order: the coefficient for
    // buf[start + k] where start = newest - (K - 1).
    const K = taps;
    const half = K / 2;
    const i0Beta = besselI0(beta);
    this.table = new Float32Array(this.phases * K);
    for (let p = 0; p < this.phases; p++) {
      const frac = p / this.phases;
      let sum = 0;
      const row = new Float64Array(K);
      for (let k = 0; k < K; k++) {
        const t = K - 1 - k + frac - half; // distance from the output instant, in input samples
        const x = 2 * fc * t;
        const sinc = t === 0 ? 1 : Math.sin(Math.PI * x) / (Math.PI * x);
        const r = t / half;
        const w = Math.abs(r) >= 1 ? 0 : besselI0(beta * Math.sqrt(1 - r * r)) / i0Beta;
        row[k] = 2 * fc * sinc * w;
        sum += row[k];
      }
      for (let k = 0; k < K; k++) this.table[p * K + k] = row[k] / sum; // unity gain at DC, every phase
    }
    this.reset();
  }

  /** Forget the stream: the next sample is the first one again. */
  reset() {
    const K = this.taps;
    this.buf = new Float32Array(Math.max(4 * K, 4096));
    this.len = K - 1; // K-1 zeros stand for the samples before the stream started
    this.buf.fill(0, 0, this.len);
    this.next = K - 1; // buffer index of the input sample the next output needs (newest in its window)
    this.acc = 0; // phase accumulator: (n * M) mod L
    this.totalIn = 0;
    this.totalOut = 0;
  }

  /** Delay of the filter, in output samples. */
  get delay() {
    return this.passthrough ? 0 : (this.taps / 2) * (this.outRate / this.inRate);
  }

  /** How many samples the next process() call returns for `n` more input samples. */
  outputLength(n) {
    if (this.passthrough) return n;
    const total = this.totalIn + n;
    return Math.ceil((total * this.L) / this.M) - this.totalOut;
  }

  /**
   * Convert the next chunk of the stream.
   * @param {Float32Array|number[]} input samples at inRate
   * @returns {Float32Array} samples at outRate
   */
  process(input) {
    const n = input.length;
    if (this.passthrough) {
      this.totalIn += n;
      this.totalOut += n;
      return Float32Array.from(input);
    }
    const count = this.outputLength(n);
    const out = new Float32Array(count);
    // append
    if (this.len + n > this.buf.length) {
      const bigger = new Float32Array(Math.max(this.buf.length * 2, this.len + n));
      bigger.set(this.buf.subarray(0, this.len));
      this.buf = bigger;
    }
    this.buf.set(input, this.len);
    this.len += n;
    this.totalIn += n;

    const { buf, table, taps: K, M, L, phases } = this;
    let { next, acc } = this;
    const exact = phases === L;
    for (let o = 0; o < count; o++) {
      const p = exact ? acc : Math.floor((acc * phases) / L);
      const base = p * K;
      const start = next - (K - 1);
      let y = 0;
      for (let k = 0; k < K; k++) y += buf[start + k] * table[base + k];
      out[o] = y;
      acc += M;
      next += Math.floor(acc / L);
      acc %= L;
    }
    this.totalOut += count;
    // drop what no later output needs
    const keepFrom = Math.min(next - (K - 1), this.len);
    if (keepFrom > 0) {
      buf.copyWithin(0, keepFrom, this.len);
      this.len -= keepFrom;
      next -= keepFrom;
    }
    this.next = next;
    this.acc = acc;
    return out;
  }
}

/** One-shot conversion of a whole signal (same samples as streaming it). */
export function resample(input, inRate, outRate, options) {
  return new Resampler(inRate, outRate, options).process(input);
}

/** Float samples in [-1, 1] to PCM16 (clipped, rounded). */
export function floatToPcm16(input, out = new Int16Array(input.length)) {
  for (let i = 0; i < input.length; i++) {
    const v = Math.max(-1, Math.min(1, input[i]));
    out[i] = Math.round(v < 0 ? v * 32768 : v * 32767);
  }
  return out;
}

/** PCM16 samples to floats in [-1, 1). */
export function pcm16ToFloat(input, out = new Float32Array(input.length)) {
  for (let i = 0; i < input.length; i++) out[i] = input[i] / 32768;
  return out;
}
