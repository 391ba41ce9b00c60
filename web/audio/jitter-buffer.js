// The playback jitter buffer: the logic of the player AudioWorklet, kept pure so it can be tested
// under node (no Web Audio here).
//
// - A ring buffer of float samples at the output rate, fed with the assistant's audio as it arrives
//   and drained one render quantum at a time by pull().
// - Playback starts (and restarts after an underrun) once `targetMs` of audio is queued (60–100 ms
//   is plenty: the gateway paces audio at real time plus a small lead), or at once when the item
//   has ended and nothing more will come, so a short tail is never held back.
// - An underrun never clicks: the output ramps from the last sample played down to zero over
//   `fadeMs`, and playback resumes with a fade-in of the same length.
// - flush() (barge-in) empties the buffer at once, with the same short ramp to silence, and says how
//   much of each item was actually played.
// - Every sample written to the output is counted for the item it belongs to, so the client can send
//   `playback.truncate {item_id, played_ms}` with what the listener really heard.

const MAX_TRACKED_ITEMS = 64;

export class JitterBuffer {
  /**
   * @param {{sampleRate: number, targetMs?: number, capacityMs?: number, fadeMs?: number}} options
   */
  constructor({ sampleRate, targetMs = 80, capacityMs = 5000, fadeMs = 5 }) {
    if (!(sampleRate > 0)) throw new RangeError("sampleRate is required");
    this.sampleRate = sampleRate;
    this.target = Math.round((sampleRate * targetMs) / 1000);
    this.capacity = Math.max(Math.round((sampleRate * capacityMs) / 1000), this.target * 2);
    this.fadeLen = Math.max(1, Math.round((sampleRate * fadeMs) / 1000));
    this.ring = new Float32Array(this.capacity);
    this.read = 0; // ring index of the oldest queued sample
    this.size = 0; // queued samples
    this.segments = []; // [{item, n}] in queue order: which item each queued sample belongs to
    this.ended = new Set(); // items that will get no more audio
    this.state = "idle"; // idle (nothing queued) | buffering (waiting for target) | playing
    this.fadeIn = 0; // samples of fade-in left (after a start, an underrun or a flush)
    this.tail = 0; // samples of the ramp to silence left
    this.tailFrom = 0; // the value the ramp starts from
    this.last = 0; // the last value written to the output
    this.lastItem = null; // the item of the last sample played
    this.playedByItem = new Map(); // item -> samples written to the output
    this.stats = { played: 0, underruns: 0, flushes: 0, dropped: 0, starts: 0 };
  }

  /** Queued samples. */
  get depth() {
    return this.size;
  }

  get depthMs() {
    return (this.size * 1000) / this.sampleRate;
  }

  /** The item the next queued sample belongs to (null when empty). */
  get currentItem() {
    return this.segments.length ? this.segments[0].item : null;
  }

  /** Queue audio of an item (floats in [-1, 1]). Beyond capacity the oldest samples are dropped. */
  push(samples, item = null) {
    let src = samples;
    if (src.length > this.capacity) {
      this._drop(src.length - this.capacity, true);
      src = src.subarray(src.length - this.capacity);
    }
    const overflow = this.size + src.length - this.capacity;
    if (overflow > 0) this._drop(overflow, false);
    const n = src.length;
    if (n === 0) return;
    const first = Math.min(n, this.capacity - ((this.read + this.size) % this.capacity));
    const w = (this.read + this.size) % this.capacity;
    this.ring.set(src.subarray(0, first), w);
    if (first < n) this.ring.set(src.subarray(first), 0);
    this.size += n;
    const lastSeg = this.segments[this.segments.length - 1];
    if (lastSeg && lastSeg.item === item) lastSeg.n += n;
    else this.segments.push({ item, n });
    if (this.state === "idle") this.state = "buffering";
  }

  /** No more audio will come for this item: its tail may play without waiting for the target. */
  end(item = null) {
    this.ended.add(item);
    if (this.ended.size > MAX_TRACKED_ITEMS) this.ended.delete(this.ended.values().next().value);
  }

  /** Samples of `item` written to the output so far. */
  played(item) {
    return this.playedByItem.get(item) || 0;
  }

  playedMs(item) {
    return Math.round((this.played(item) * 1000) / this.sampleRate);
  }

  /**
   * Drop everything queued now (barge-in). The output ramps to silence from the last sample, so the
   * cut does not click. Returns how much of each affected item was played, in samples and ms.
   */
  flush() {
    const items = new Set(this.segments.map((s) => s.item));
    const report = {};
    for (const item of items) report[item] = { samples: this.played(item), ms: this.playedMs(item) };
    const dropped = this.size;
    this.read = 0;
    this.size = 0;
    this.segments = [];
    this.state = "idle";
    this.fadeIn = 0;
    this._startTail();
    this.stats.flushes++;
    return { items: report, droppedSamples: dropped };
  }

  /**
   * Fill `out` (one render quantum) with what should be heard now. Returns the number of queued
   * samples consumed.
   */
  pull(out) {
    const n = out.length;
    let i = 0;
    // (a ramp to silence still running finishes first: at most fadeMs)
    if (this.state === "buffering" && this.tail === 0 && (this.size >= this.target || this._tailOnly())) {
      this.state = "playing";
      this.fadeIn = this.fadeLen;
      this.stats.starts++;
    }
    if (this.state === "playing") {
      while (i < n && this.size > 0) {
        const seg = this.segments[0];
        const take = Math.min(n - i, seg.n);
        for (let k = 0; k < take; k++) {
          let v = this.ring[this.read];
          this.read = this.read + 1 === this.capacity ? 0 : this.read + 1;
          if (this.fadeIn > 0) {
            v *= 1 - this.fadeIn / (this.fadeLen + 1);
            this.fadeIn--;
          }
          out[i++] = v;
        }
        this.size -= take;
        seg.n -= take;
        this.playedByItem.set(seg.item, this.played(seg.item) + take);
        this.stats.played += take;
        this.lastItem = seg.item;
        if (seg.n === 0) this.segments.shift();
      }
      if (i > 0) this.last = out[i - 1];
      if (this.size === 0) {
        // Out of audio: either the reply is over, or the network is late (an underrun).
        if (!this.ended.has(this.lastItem)) this.stats.underruns++;
        this.state = "idle";
        this._startTail();
      }
    }
    // ramp to silence after an underrun or a flush, then silence
    while (i < n) {
      if (this.tail > 0) {
        this.last = this.tailFrom * (this.tail - 1) / this.fadeLen;
        this.tail--;
      } else {
        this.last = 0;
      }
      out[i++] = this.last;
    }
    this._trimTracked();
    return n;
  }

  // -- internals -----------------------------------------------------------------------------------
  /** Everything queued belongs to items that have ended: play it out, however short. */
  _tailOnly() {
    return this.size > 0 && this.segments.every((s) => this.ended.has(s.item));
  }

  _startTail() {
    this.tailFrom = this.last;
    this.tail = this.last === 0 ? 0 : this.fadeLen;
  }

  _drop(count, incoming) {
    if (incoming) {
      this.stats.dropped += count;
      return;
    }
    let left = Math.min(count, this.size);
    this.stats.dropped += left;
    this.read = (this.read + left) % this.capacity;
    this.size -= left;
    while (left > 0 && this.segments.length) {
      const seg = this.segments[0];
      const d = Math.min(left, seg.n);
      seg.n -= d;
      left -= d;
      if (seg.n === 0) this.segments.shift();
    }
  }

  _trimTracked() {
    if (this.playedByItem.size > MAX_TRACKED_ITEMS) {
      const oldest = this.playedByItem.keys().next().value;
      this.playedByItem.delete(oldest);
    }
  }
}
