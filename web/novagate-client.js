// novagate-client.js — the reusable browser client of novagate's voice protocol (v1).
//
// No UI and no Web Audio in here: it speaks the protocol, keeps the conversation across
// disconnects and reloads, and reports what happens as events. Any front end can use it:
//
//   import { NovagateClient } from "./novagate-client.js";
//   const client = new NovagateClient({ url: "wss://example.com/v1/voice" });
//   client.addEventListener("transcript", (e) => console.log(e.detail.role, e.detail.text));
//   client.attachPlayer(player);   // optional: something that plays the assistant's audio
//   client.connect();
//   microphone.onframe = (pcm16) => client.sendAudio(pcm16);   // PCM16LE, 16 kHz, 20–32 ms
//
// Codecs (additive): with `inputCodec: "opus"` / `outputCodec: "opus"` the binary frames are raw
// Opus packets (20 ms each) instead of PCM16; what session.ready confirms is in `client.codecs`,
// and a server that refuses the codec (error `unsupported`) is asked again at once in PCM16. The
// client encodes and decodes nothing itself: you send what `client.codecs.input` says, and the
// attached player is told the output codec (`setCodec`).
//
// What it does for you:
// - session.start with the stored resume token and the receipts not yet acknowledged;
// - resume token, conversation id and unsaved receipts kept in localStorage (or the `storage` you
//   give, e.g. sessionStorage to remember only in this tab; `setStorage()` moves them) until
//   `item.saved` (receipts come with final transcripts and with ended tool calls: both are
//   conversation items); a new token from `session.updated` is stored; a token the server no longer
//   knows (`resume_failed: "not_found"`) is forgotten; `forget()` drops them all (receipts are signed
//   copies of conversation items: they hold the text, so they leave storage as soon as they can);
// - reconnects by itself: at once (with a little jitter) on close 1012 or `session.reconnect`,
//   with exponential backoff and jitter on a lost connection or 1013; never blindly on 4xxx;
// - real-time audio up: your microphone frames, or silence while you have no microphone running
//   (PCM16 zeros, or an Opus packet of silence);
// - barge-in: on `interrupted` the attached player is flushed and `playback.truncate` is sent with
//   the milliseconds of that item actually played;
// - an application-level ping that notices a dead connection.
//
// Events (CustomEvent, payload in `detail`):
//   state        {state, previous}   idle | connecting | ready | reconnecting | closed | ended
//   ready        the session.ready message (resumed, history, history_length, resume_failed, ...)
//   notfound     {previousConversationId}  the stored conversation could not be resumed
//   transcript   the transcript message ({item_id, role, text, final})
//   toolcall     the tool.call message ({call_id, name, status, duration_ms, item_id, arguments, result}):
//                status "started", then once "finished" | "failed" | "timed_out" | "cancelled"
//                (arguments and result only for the server's public tools)
//   status       {state}  the server's listening | thinking | speaking | recovering
//   speech       {speaking, source}  the user started (true) or stopped (false) speaking, as the
//                server heard it (additive input.speech_started / input.speech_stopped; source
//                "model" or "gateway"); servers without them send none: `userSpeaking` stays false
//   audiostart   {itemId}    audio   {itemId, pcm: ArrayBuffer, codec}    audioend {itemId, reason}
//                (`pcm` is the binary frame as received: an Opus packet when codec is "opus")
//   codecfallback {input, output, message}  the server refused the codecs offered: PCM16 from now on
//   interrupted  {itemId, playedMs}   (after the flush and the playback.truncate)
//   saved        {itemId}    updated {conversation_id}
//   reconnecting {attempt, delayMs, code, reason, unreachable}
//   fatal        {code, reason, message}   the server refused us (4xxx): not retried
//   servererror  the error message ({code, message, fatal})
//   ended        the conversation was ended (session.end)
//   message      every text message from the server, parsed

export const PROTOCOL_VERSION = 1;
export const SUBPROTOCOL = "novagate.v1";

export const CLOSE_REASONS = {
  1000: "the conversation ended",
  1009: "a message was too big",
  1011: "the server had an internal error",
  1012: "the server is restarting",
  1013: "the server is busy",
  4400: "the server did not understand the client (protocol error)",
  4401: "you are not signed in, or your sign-in expired",
  4402: "your usage budget for this period is spent",
  4403: "this page's origin is not allowed by the server",
  4408: "the connection was too slow to start",
  4429: "too much audio was sent too fast",
};

// 20 ms of silence as one Opus packet (CELT, one frame): what the client sends while no microphone
// runs on an Opus session. Any Opus decoder makes 20 ms of zeros of it.
export const OPUS_SILENCE = Uint8Array.of(0xf8, 0xff, 0xfe);

const DEFAULTS = {
  storageKey: "novagate.conversation",
  inputSampleRate: 16000,
  outputSampleRate: 24000,
  inputCodec: "pcm16", // what session.start offers: pcm16 | opus | mulaw
  outputCodec: "pcm16",
  frameMs: 20,
  backoff: { initialMs: 500, maxMs: 15000, factor: 2 },
  busyInitialMs: 2000, // after 1013
  restartJitterMs: 1000, // after 1012 / session.reconnect
  connectTimeoutMs: 10000,
  readyTimeoutMs: 20000,
  pingEveryMs: 15000,
  pongTimeoutMs: 10000,
  logLimit: 200,
};

function memoryStorage() {
  const m = new Map();
  return { getItem: (k) => (m.has(k) ? m.get(k) : null), setItem: (k, v) => m.set(k, String(v)), removeItem: (k) => m.delete(k) };
}

/**
 * The browser's `localStorage` ("local": survives a browser restart) or `sessionStorage`
 * ("session": this tab only, survives reloads), or an in-memory stand-in when that one is
 * unavailable (private modes, no DOM): then the conversation lasts as long as the page.
 */
export function browserStorage(kind = "local") {
  try {
    const s = kind === "session" ? globalThis.sessionStorage : globalThis.localStorage;
    const probe = "__novagate_probe__";
    s.setItem(probe, "1");
    s.removeItem(probe);
    return s;
  } catch {
    return memoryStorage();
  }
}

export class NovagateClient extends EventTarget {
  /**
   * @param {object} options
   * @param {string} options.url  ws(s)://host/v1/voice
   * @param {string|(() => string|Promise<string>)} [options.auth]  bearer token for session.start.auth
   * @param {string} [options.voice]
   * @param {number} [options.inputSampleRate=16000]  rate of the PCM you send
   * @param {number} [options.outputSampleRate=24000] rate of the PCM you receive
   * @param {string} [options.inputCodec="pcm16"]  codec of the frames you send (pcm16 | opus | mulaw)
   * @param {string} [options.outputCodec="pcm16"] codec of the frames you want to receive
   * @param {Storage} [options.storage=localStorage]   where the token and receipts live (sessionStorage: this tab only)
   * @param {string} [options.storageKey]
   * @param {typeof WebSocket} [options.WebSocket]
   */
  constructor(options = {}) {
    super();
    if (!options.url) throw new TypeError("NovagateClient needs a url (ws://host/v1/voice)");
    this.options = { ...DEFAULTS, ...options, backoff: { ...DEFAULTS.backoff, ...(options.backoff || {}) } };
    this.url = options.url;
    this.storage = options.storage || browserStorage("local");
    this.WebSocketImpl = options.WebSocket || globalThis.WebSocket;
    this.state = "idle";
    this.serverStatus = null;
    this.userSpeaking = false; // between input.speech_started and input.speech_stopped
    this.session = null; // the last session.ready
    // the codecs of the binary frames on this connection: what session.start offered, until
    // session.ready says what the server took
    this.codecs = { input: this.options.inputCodec, output: this.options.outputCodec };
    this.player = null;
    this.sent = []; // control messages sent (secrets left out), newest last: for debugging and tests
    this.counters = { framesSent: 0, bytesSent: 0, framesDropped: 0, framesReceived: 0, bytesReceived: 0,
                      connects: 0, readies: 0, reconnects: 0 };
    this._ws = null;
    this._wanted = false;
    this._attempt = 0;
    this._retryTimer = null;
    this._timers = new Set();
    this._currentItem = null;
    this._micActive = false;
    this._filler = null;
    this._reconnectHint = null;
    this._ending = null;
    this._lastFatalError = null;
    this._codecRefused = false;
    this._everOpened = false;
    this._failuresBeforeOpen = 0;
    this.saved = this._load();
  }

  // -- stored conversation ------------------------------------------------------------------------
  _load() {
    try {
      const raw = this.storage.getItem(this.options.storageKey);
      const d = raw ? JSON.parse(raw) : {};
      return { resume_token: d.resume_token || null, conversation_id: d.conversation_id || null,
               pending: d.pending && typeof d.pending === "object" ? d.pending : {} };
    } catch {
      return { resume_token: null, conversation_id: null, pending: {} };
    }
  }

  _save() {
    if (this._ending) return; // end() has cleared the storage: nothing of that conversation goes back in
    try {
      const s = this.saved;
      if (!s.resume_token && !Object.keys(s.pending).length) this.storage.removeItem(this.options.storageKey);
      else this.storage.setItem(this.options.storageKey, JSON.stringify(s));
    } catch {
      // storage full or unavailable: the session goes on, only reload-survival is lost
    }
  }

  _clearSaved() {
    this.saved = { resume_token: null, conversation_id: null, pending: {} };
    this.session = null; // session.ready carries the history
    this._save();
  }

  /** The stored resume token (null when none). */
  get resumeToken() {
    return this.saved.resume_token;
  }

  get conversationId() {
    return this.saved.conversation_id;
  }

  /** Receipts held until the server says `item.saved`: {item_id: receipt}. */
  get pendingReceipts() {
    return { ...this.saved.pending };
  }

  /** True when a resume token or unsaved receipts are held (in storage and in memory). */
  get remembers() {
    return !!this.saved.resume_token || Object.keys(this.saved.pending).length > 0;
  }

  /**
   * Forget the conversation on this device: the resume token, the conversation id and the unsaved
   * receipts leave memory and storage. A live connection is closed first (1000, no `session.end`),
   * since it would otherwise store the next token again. Nothing is ended on the server: the
   * conversation expires there with its token (use end() to end it). The next connect() starts a
   * new conversation.
   */
  forget() {
    if (this._wanted || this._ws || this._retryTimer) {
      this._stop("forgotten on this device");
      this._setState("idle");
    }
    this._clearSaved();
  }

  /**
   * Keep the conversation in another Storage from now on (e.g. sessionStorage: this tab only).
   * With `move` (the default) what is held now is written there; either way it is removed from the
   * old storage, so it no longer lasts where it was.
   */
  setStorage(storage, { move = true } = {}) {
    if (!storage || storage === this.storage) return;
    try {
      this.storage.removeItem(this.options.storageKey);
    } catch {}
    this.storage = storage;
    if (move) this._save();
    else this.forget();
  }

  /** The codecs the next session.start offers (the current connection keeps its own). */
  setCodecs({ input = "pcm16", output = "pcm16" } = {}) {
    this.options.inputCodec = input;
    this.options.outputCodec = output;
  }

  // -- connection ---------------------------------------------------------------------------------
  /** Open the session (resuming the stored conversation, if any) and keep it open until disconnect(). */
  connect() {
    this._wanted = true;
    if (this._ws || this._retryTimer) return;
    this._open();
  }

  /** Stop wanting a connection: no retries, no filler, close the socket (1000), reset playback. */
  _stop(reason) {
    this._wanted = false;
    this._clearRetry();
    this._stopFiller();
    const ws = this._ws;
    this._detach();
    if (ws) {
      try {
        ws.close(1000, reason);
      } catch {}
    }
    this._playerReset();
  }

  /** Close the connection; the conversation stays resumable. */
  disconnect() {
    this._stop("client stopped");
    this._setState("idle");
  }

  /**
   * End the conversation for good: `session.end`, then the stored token is forgotten. When not
   * connected, the token is just forgotten (the conversation then expires on the server).
   */
  async end({ timeoutMs = 4000 } = {}) {
    const wasWanted = this._wanted;
    const live = this.state === "ready" && this._ws;
    this._clearSaved(); // at once: nothing of this conversation stays stored, even if the page goes now
    if (live) {
      const done = new Promise((resolve) => {
        this._ending = resolve;
        this._later(resolve, timeoutMs);
      });
      this._sendJson({ type: "session.end" });
      await done;
    }
    this._ending = null;
    this._stop("conversation ended");
    this._clearSaved();
    this.session = null;
    this._setState("ended");
    this._emit("ended", {});
    return wasWanted;
  }

  /** Retry now instead of waiting for the backoff timer (e.g. on the `online` event). */
  retryNow() {
    if (this._wanted && this._retryTimer) {
      this._clearRetry();
      this._open();
    }
  }

  _open() {
    this._clearRetry();
    const isRetry = this.state === "reconnecting";
    this._setState(isRetry ? "reconnecting" : "connecting");
    let ws;
    try {
      ws = new this.WebSocketImpl(this.url, [SUBPROTOCOL]);
    } catch (e) {
      this._scheduleReconnect(1006, String(e && e.message || e), false);
      return;
    }
    this.counters.connects++;
    ws.binaryType = "arraybuffer";
    this._ws = ws;
    this._opened = false;
    this._connectTimer = this._later(() => {
      if (this._ws === ws && !this._opened) this._abandon(ws, 1006, "connect timeout");
    }, this.options.connectTimeoutMs);
    ws.onopen = () => this._onOpen(ws);
    ws.onmessage = (e) => this._onMessage(ws, e);
    ws.onclose = (e) => this._onClose(ws, e.code, e.reason);
    ws.onerror = () => {}; // a close event always follows
  }

  async _onOpen(ws) {
    if (this._ws !== ws) return;
    this._opened = true;
    this._everOpened = true;
    this._failuresBeforeOpen = 0;
    this._reconnectHint = null;
    this._lastFatalError = null;
    this._codecRefused = false;
    const start = {
      type: "session.start",
      protocol: PROTOCOL_VERSION,
      audio: { input_sample_rate: this.options.inputSampleRate, output_sample_rate: this.options.outputSampleRate },
    };
    // PCM16 is the default: only another codec is named, so a server without codecs sees v1 as it was
    this._setCodecs({ input: this.options.inputCodec, output: this.options.outputCodec });
    if (this.codecs.input !== "pcm16") start.audio.input_codec = this.codecs.input;
    if (this.codecs.output !== "pcm16") start.audio.output_codec = this.codecs.output;
    if (this.options.voice) start.voice = this.options.voice;
    if (this.saved.resume_token) start.resume = this.saved.resume_token;
    const pending = Object.values(this.saved.pending).slice(0, 100);
    if (pending.length) start.pending = pending;
    const auth = typeof this.options.auth === "function" ? await this.options.auth() : this.options.auth;
    if (auth) start.auth = auth;
    if (this._ws !== ws) return;
    this._sendJson(start);
    this._startFiller(); // audio sent before session.ready is held by the server, not dropped
    this._readyTimer = this._later(() => {
      if (this._ws === ws && this.state !== "ready") this._abandon(ws, 1006, "no session.ready in time");
    }, this.options.readyTimeoutMs);
  }

  _onMessage(ws, e) {
    if (this._ws !== ws) return;
    if (typeof e.data !== "string") {
      this.counters.framesReceived++;
      this.counters.bytesReceived += e.data.byteLength;
      const itemId = this._currentItem;
      if (itemId === null) return; // audio of an item that was interrupted: not to be played
      if (this.player) this.player.push(itemId, e.data);
      this._emit("audio", { itemId, pcm: e.data, codec: this.codecs.output });
      return;
    }
    let msg;
    try {
      msg = JSON.parse(e.data);
    } catch {
      return;
    }
    this._handle(msg);
    this._emit("message", msg);
  }

  _handle(msg) {
    const s = this.saved;
    switch (msg.type) {
      case "session.ready": {
        const previous = s.conversation_id;
        s.resume_token = msg.resume_token;
        s.conversation_id = msg.conversation_id;
        if (msg.resume_failed) s.pending = {}; // receipts of a conversation that is gone
        this._save();
        this.session = msg;
        // what the server took (a server without codecs confirms none: PCM16)
        const audio = msg.audio || {};
        this._setCodecs({ input: audio.input_codec || "pcm16", output: audio.output_codec || "pcm16" });
        this._attempt = 0;
        this.counters.readies++;
        this.serverStatus = "listening";
        this._setState("ready");
        this._startPing();
        if (msg.resume_failed) this._emit("notfound", { previousConversationId: previous, reason: msg.resume_failed });
        this._emit("ready", msg);
        break;
      }
      case "session.updated":
        s.resume_token = msg.resume_token;
        s.conversation_id = msg.conversation_id;
        this._save();
        this._emit("updated", msg);
        break;
      case "transcript":
        if (msg.final && msg.receipt) {
          s.pending[msg.item_id] = msg.receipt;
          this._save();
        }
        this._emit("transcript", msg);
        break;
      case "tool.call":
        // a tool call that has ended is a conversation item (role "tool"): its receipt is kept like a
        // final transcript's, until item.saved
        if (msg.status !== "started" && msg.item_id && msg.receipt) {
          s.pending[msg.item_id] = msg.receipt;
          this._save();
        }
        this._emit("toolcall", msg);
        break;
      case "item.saved":
        if (msg.item_id in s.pending) {
          delete s.pending[msg.item_id];
          this._save();
        }
        this._emit("saved", { itemId: msg.item_id });
        break;
      case "response.audio.start":
        this._currentItem = msg.item_id;
        if (this.player) this.player.startItem(msg.item_id);
        this._emit("audiostart", { itemId: msg.item_id });
        break;
      case "response.audio.end":
        if (this.player) this.player.endItem(msg.item_id);
        if (this._currentItem === msg.item_id) this._currentItem = null;
        this._emit("audioend", { itemId: msg.item_id, reason: msg.reason });
        break;
      case "interrupted":
        this._currentItem = null;
        this._onInterrupted(msg.item_id);
        break;
      case "status":
        this.serverStatus = msg.state;
        this._emit("status", { state: msg.state });
        break;
      case "input.speech_started": // additive
      case "input.speech_stopped":
        this.userSpeaking = msg.type === "input.speech_started";
        this._emit("speech", { speaking: this.userSpeaking, source: msg.source || null });
        break;
      case "session.reconnect":
        this._reconnectHint = { retryAfterMs: Number(msg.retry_after_ms) || 0, reason: msg.reason };
        // the server closes 1012 when it is ready for us to go; if it does not, go anyway
        this._later(() => {
          const ws = this._ws;
          if (ws && this._reconnectHint) this._abandon(ws, 1012, "session.reconnect");
        }, (this._reconnectHint.retryAfterMs || 0) + 2000);
        break;
      case "session.ended":
        if (this._ending) this._ending();
        break;
      case "pong":
        this._pongDue = null;
        break;
      case "error":
        if (msg.fatal) this._lastFatalError = msg;
        if (msg.fatal && msg.code === "unsupported" && this.state !== "ready" &&
            (this.codecs.input !== "pcm16" || this.codecs.output !== "pcm16")) {
          this._codecRefused = true; // the close that follows is not the end: see _onClose
        }
        this._emit("servererror", msg);
        break;
      default:
        break; // additive messages this client does not know
    }
  }

  async _onInterrupted(itemId) {
    let playedMs = 0;
    if (this.player) {
      try {
        playedMs = Math.max(0, Math.round(await this.player.flush(itemId)));
      } catch {
        playedMs = 0;
      }
      this.truncate(itemId, playedMs);
    }
    this._emit("interrupted", { itemId, playedMs });
  }

  _onClose(ws, code, reason) {
    if (this._ws !== ws) return;
    this._detach();
    if (this._ending) {
      this._ending();
      return;
    }
    const opened = this._opened;
    if (!this._wanted) {
      this._setState("idle");
      return;
    }
    if (this._codecRefused) {
      // the server does not take the codecs offered: the same session again at once, in PCM16
      this._codecRefused = false;
      const refused = { input: this.codecs.input, output: this.codecs.output };
      this.setCodecs({ input: "pcm16", output: "pcm16" });
      this._emit("codecfallback", { ...refused, message: (this._lastFatalError && this._lastFatalError.message) || reason });
      this._retryTimer = setTimeout(() => {
        this._retryTimer = null;
        if (this._wanted) this._open();
      }, 0);
      return;
    }
    if (code >= 4000 || code === 1009 || code === 1008 || code === 1003) {
      // refused: retrying the same thing would be refused again
      this._wanted = false;
      const message = (this._lastFatalError && this._lastFatalError.message) || CLOSE_REASONS[code] || reason ||
        `the server closed the connection (${code})`;
      this._setState("closed");
      this._emit("fatal", { code, reason, message });
      return;
    }
    this._scheduleReconnect(code, reason, opened);
  }

  /** Give up on a socket that is not answering: do not wait for its close handshake. */
  _abandon(ws, code, reason) {
    if (this._ws !== ws) return;
    const opened = this._opened;
    this._detach();
    try {
      ws.close(1000, reason);
    } catch {}
    if (this._wanted) this._scheduleReconnect(code, reason, opened);
  }

  _detach() {
    const ws = this._ws;
    if (ws) {
      ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
    }
    this._ws = null;
    this._opened = false;
    for (const t of this._timers) clearTimeout(t);
    this._timers.clear();
    this._stopPing();
    this._stopFiller();
    if (this._currentItem !== null && this.player) this.player.endItem(this._currentItem); // let the tail play
    this._currentItem = null;
  }

  _scheduleReconnect(code, reason, opened) {
    if (!opened) this._failuresBeforeOpen++;
    let delay;
    if (this._reconnectHint) {
      // a drain: the server said when (it spreads its clients itself); a little more jitter of ours
      delay = this._reconnectHint.retryAfterMs + Math.random() * 250;
      this._reconnectHint = null;
      this._attempt = 1;
    } else if (code === 1012) {
      // a restart: go now, spread a little so every client does not come at once
      delay = Math.random() * this.options.restartJitterMs;
      this._attempt = 1; // if that fails, back off from there
    } else {
      const b = this.options.backoff;
      const initial = code === 1013 ? this.options.busyInitialMs : b.initialMs;
      const ceiling = Math.min(b.maxMs, initial * b.factor ** this._attempt);
      delay = ceiling / 2 + Math.random() * (ceiling / 2); // exponential backoff, "equal jitter"
      this._attempt++;
    }
    this.counters.reconnects++;
    this._setState("reconnecting");
    this._emit("reconnecting", {
      attempt: this._attempt, delayMs: Math.round(delay), code, reason,
      unreachable: !opened && this._failuresBeforeOpen >= 2,
    });
    this._retryTimer = setTimeout(() => {
      this._retryTimer = null;
      if (this._wanted) this._open();
    }, delay);
  }

  _clearRetry() {
    if (this._retryTimer) clearTimeout(this._retryTimer);
    this._retryTimer = null;
  }

  _later(fn, ms) {
    const t = setTimeout(() => {
      this._timers.delete(t);
      fn();
    }, ms);
    this._timers.add(t);
    return t;
  }

  /** The codecs of this connection's frames; the player is told the output codec. */
  _setCodecs(codecs) {
    this.codecs = codecs;
    if (this.player && this.player.setCodec) this.player.setCodec(codecs.output);
  }

  _setState(state) {
    if (state === this.state) return;
    const previous = this.state;
    this.state = state;
    if (state !== "ready") {
      this.serverStatus = null;
      this.userSpeaking = false; // a new connection tells its own
    }
    this._emit("state", { state, previous });
  }

  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  // -- keepalive ----------------------------------------------------------------------------------
  _startPing() {
    this._stopPing();
    let n = 0;
    this._pingTimer = setInterval(() => {
      const ws = this._ws;
      if (!ws || this.state !== "ready") return;
      if (this._pongDue && Date.now() > this._pongDue) {
        this._abandon(ws, 1006, "no pong");
        return;
      }
      if (!this._pongDue) {
        this._pongDue = Date.now() + this.options.pongTimeoutMs;
        this._sendJson({ type: "ping", id: ++n }, { log: false });
      }
    }, Math.min(this.options.pingEveryMs, this.options.pongTimeoutMs));
  }

  _stopPing() {
    if (this._pingTimer) clearInterval(this._pingTimer);
    this._pingTimer = null;
    this._pongDue = null;
  }

  // -- sending ------------------------------------------------------------------------------------
  get canSend() {
    return !!this._ws && this._opened && this._ws.readyState === 1;
  }

  _sendJson(msg, { log = true } = {}) {
    if (!this.canSend) return false;
    this._ws.send(JSON.stringify(msg));
    if (log) {
      const entry = { ...msg, at: Date.now() };
      if (entry.auth) entry.auth = "(hidden)";
      if (entry.resume) entry.resume = "(token)";
      if (entry.pending) entry.pending = entry.pending.length;
      this.sent.push(entry);
      if (this.sent.length > this.options.logLimit) this.sent.shift();
    }
    return true;
  }

  /**
   * Send microphone audio: PCM16LE mono at inputSampleRate (Int16Array or ArrayBuffer), 20–32 ms;
   * or, when `codecs.input` is "opus", one Opus packet (20 ms). Dropped (and counted) while not
   * connected: nobody would hear it.
   */
  sendAudio(pcm) {
    const buf = pcm instanceof ArrayBuffer ? pcm : pcm.buffer.slice(pcm.byteOffset, pcm.byteOffset + pcm.byteLength);
    if (!this.canSend) {
      this.counters.framesDropped++;
      return false;
    }
    this._ws.send(buf);
    this.counters.framesSent++;
    this.counters.bytesSent += buf.byteLength;
    return true;
  }

  /**
   * Tell the client whether your microphone is running. While it is not, the client itself sends
   * silence in real time, so the server always has a live audio stream.
   */
  setMicActive(active) {
    this._micActive = !!active;
    if (this._micActive) this._stopFiller();
    else if (this.canSend) this._startFiller();
  }

  _startFiller() {
    if (this._micActive || this._filler) return;
    const frameMs = this.options.frameMs;
    const t0 = performance.now();
    let sent = 0;
    this._filler = setInterval(() => {
      if (!this.canSend) return;
      const due = Math.floor((performance.now() - t0) / frameMs) - sent;
      const n = Math.min(due, 50); // after a throttled timer, at most 1 s at once
      const silence = this._silence(frameMs); // the codec may change with session.ready
      for (let i = 0; i < n; i++) this.sendAudio(silence);
      sent += due; // what could not be sent is skipped, not owed
    }, frameMs);
  }

  /** A frame of silence in the input codec (Opus: always 20 ms, the filler's frameMs). */
  _silence(frameMs) {
    const codec = this.codecs.input;
    if (this._silenceFrame && this._silenceFrame.codec === codec) return this._silenceFrame.data;
    const samples = Math.round((this.options.inputSampleRate * frameMs) / 1000);
    const data = codec === "opus" ? OPUS_SILENCE.buffer.slice(0)
      : codec === "mulaw" ? new Uint8Array(Math.round((8000 * frameMs) / 1000)).fill(0xff).buffer
        : new ArrayBuffer(samples * 2);
    this._silenceFrame = { codec, data };
    return data;
  }

  _stopFiller() {
    if (this._filler) clearInterval(this._filler);
    this._filler = null;
  }

  /** A typed user turn (1–1000 characters). */
  sendText(text) {
    const t = String(text).trim();
    if (!t) return false;
    return this._sendJson({ type: "input.text", text: t.slice(0, 1000) });
  }

  /** Tell the server how much of an interrupted assistant item was actually played. */
  truncate(itemId, playedMs) {
    return this._sendJson({ type: "playback.truncate", item_id: itemId, played_ms: Math.max(0, Math.round(playedMs)) });
  }

  // -- player -------------------------------------------------------------------------------------
  /**
   * Attach the thing that plays the assistant's audio. It needs:
   *   startItem(itemId), push(itemId, ArrayBuffer PCM16LE), endItem(itemId),
   *   flush(itemId) -> Promise<number>  (drop all queued audio now; resolve with the ms of
   *                                      itemId that were actually played),
   *   reset()                            (optional: drop everything, no report)
   *   setCodec(codec)                    (optional: the output codec of the frames pushed from now
   *                                      on, "pcm16" or "opus"; needed to receive anything but PCM16)
   */
  attachPlayer(player) {
    this.player = player;
    if (player && player.setCodec) player.setCodec(this.codecs.output);
  }

  _playerReset() {
    this._currentItem = null;
    if (this.player && this.player.reset) this.player.reset();
  }
}
