// node --test web/test/  — the protocol client against a scripted fake WebSocket (no server).
import { afterEach, test } from "node:test";
import assert from "node:assert/strict";

import { NovagateClient } from "../novagate-client.js";

const sockets = [];
const clients = [];
afterEach(() => {
  for (const c of clients.splice(0)) c.disconnect(); // stop their timers
});

class FakeWebSocket {
  constructor(url, protocols) {
    this.url = url;
    this.protocols = protocols;
    this.readyState = 0;
    this.sent = [];
    this.closed = null;
    sockets.push(this);
  }
  // -- what the test does as the server
  open() {
    this.readyState = 1;
    this.onopen && this.onopen();
  }
  refuse() {
    this.readyState = 3;
    this.onclose && this.onclose({ code: 1006, reason: "" });
  }
  message(msg) {
    this.onmessage && this.onmessage({ data: typeof msg === "string" || msg instanceof ArrayBuffer ? msg : JSON.stringify(msg) });
  }
  serverClose(code, reason = "") {
    this.readyState = 3;
    this.onclose && this.onclose({ code, reason });
  }
  get json() {
    return this.sent.filter((x) => typeof x === "string").map((x) => JSON.parse(x));
  }
  // -- what the client calls
  send(data) {
    this.sent.push(data);
  }
  close(code, reason) {
    this.closed = { code, reason };
    this.readyState = 3;
  }
}

function memory() {
  const m = new Map();
  return { getItem: (k) => (m.has(k) ? m.get(k) : null), setItem: (k, v) => m.set(k, v), removeItem: (k) => m.delete(k), m };
}

const tick = (ms = 0) => new Promise((r) => setTimeout(r, ms));

function newClient(extra = {}) {
  sockets.length = 0;
  const storage = extra.storage || memory();
  const client = new NovagateClient({
    url: "ws://gw/v1/voice", WebSocket: FakeWebSocket, storage,
    backoff: { initialMs: 8, maxMs: 64, factor: 2 }, restartJitterMs: 4, busyInitialMs: 16, ...extra,
  });
  clients.push(client);
  const events = [];
  for (const t of ["state", "ready", "reconnecting", "fatal", "interrupted", "notfound", "transcript"]) {
    client.addEventListener(t, (e) => events.push([t, e.detail]));
  }
  return { client, storage, events };
}

const ready = (extra = {}) => ({
  type: "session.ready", protocol: 1, session_id: "s", conversation_id: "c1", resume_token: "tok1",
  resumed: false, history: [], history_length: 0, ...extra,
});

test("session.start declares the audio rates; resume token and receipts are kept until item.saved", async () => {
  const { client, storage } = newClient();
  client.connect();
  const ws = sockets[0];
  assert.deepEqual(ws.protocols, ["novagate.v1"]);
  ws.open();
  await tick();
  const start = ws.json[0];
  assert.equal(start.type, "session.start");
  assert.deepEqual(start.audio, { input_sample_rate: 16000, output_sample_rate: 24000 });
  assert.equal(start.resume, undefined);
  ws.message(ready());
  assert.equal(client.state, "ready");
  ws.message({ type: "transcript", item_id: "u1", role: "user", text: "hi", final: true, receipt: "R1" });
  ws.message({ type: "transcript", item_id: "a1", role: "assistant", text: "hello", final: true, receipt: "R2" });
  let saved = JSON.parse(storage.getItem("novagate.conversation"));
  assert.deepEqual(saved, { resume_token: "tok1", conversation_id: "c1", pending: { u1: "R1", a1: "R2" } });
  ws.message({ type: "item.saved", item_id: "u1" });
  ws.message({ type: "session.updated", conversation_id: "c2", resume_token: "tok2" });
  saved = JSON.parse(storage.getItem("novagate.conversation"));
  assert.deepEqual(saved, { resume_token: "tok2", conversation_id: "c2", pending: { a1: "R2" } });

  // a new page (a reload) with the same storage resumes with the token and the unsaved receipt
  const again = newClient({ storage });
  again.client.connect();
  sockets[0].open();
  await tick();
  const start2 = sockets[0].json[0];
  assert.equal(start2.resume, "tok2");
  assert.deepEqual(start2.pending, ["R2"]);
  assert.equal(again.client.sent[0].resume, "(token)", "the log of sent messages hides secrets");
});

test("tool.call: an ended call's receipt is kept until item.saved and handed back on resume", async () => {
  const { client, storage, events } = newClient();
  const calls = [];
  client.addEventListener("toolcall", (e) => calls.push(e.detail));
  client.connect();
  const ws = sockets[0];
  ws.open();
  await tick();
  ws.message(ready());
  ws.message({ type: "tool.call", call_id: "call_1", name: "record_call", status: "started", arguments: { who: "Ann" } });
  assert.deepEqual(client.pendingReceipts, {}, "a started call is not an item yet");
  ws.message({ type: "tool.call", call_id: "call_1", name: "record_call", status: "finished", duration_ms: 1234,
               item_id: "t1", receipt: "RT1", arguments: { who: "Ann" }, result: { ok: true } });
  ws.message({ type: "tool.call", call_id: "call_2", name: "secret_lookup", status: "timed_out", duration_ms: 8000,
               item_id: "t2", receipt: "RT2" });
  assert.deepEqual(calls.map((c) => [c.call_id, c.status]),
                   [["call_1", "started"], ["call_1", "finished"], ["call_2", "timed_out"]]);
  let saved = JSON.parse(storage.getItem("novagate.conversation"));
  assert.deepEqual(saved.pending, { t1: "RT1", t2: "RT2" });
  ws.message({ type: "item.saved", item_id: "t1" });
  saved = JSON.parse(storage.getItem("novagate.conversation"));
  assert.deepEqual(saved.pending, { t2: "RT2" });
  assert.ok(!events.some(([t]) => t === "transcript"), "a tool call is not a transcript");

  // a reload: the unsaved tool receipt goes back in session.start.pending
  const again = newClient({ storage });
  again.client.connect();
  sockets[0].open();
  await tick();
  assert.deepEqual(sockets[0].json[0].pending, ["RT2"]);
  sockets[0].message(ready({ resumed: true, history_length: 1 }));
  sockets[0].message({ type: "item.saved", item_id: "t2" });
  assert.deepEqual(JSON.parse(storage.getItem("novagate.conversation")).pending, {});
});

test("input.speech_started / stopped set userSpeaking; a lost connection clears it", async () => {
  const { client } = newClient();
  const speech = [];
  client.addEventListener("speech", (e) => speech.push(e.detail));
  client.connect();
  const ws = sockets[0];
  ws.open();
  await tick();
  ws.message(ready());
  assert.equal(client.userSpeaking, false, "a server that sends none: never speaking");
  ws.message({ type: "input.speech_started", source: "model" });
  assert.equal(client.userSpeaking, true);
  ws.message({ type: "input.speech_stopped", source: "model" });
  assert.equal(client.userSpeaking, false);
  ws.message({ type: "input.speech_started" });
  assert.deepEqual(speech, [{ speaking: true, source: "model" }, { speaking: false, source: "model" },
                            { speaking: true, source: null }]);
  ws.serverClose(1006);
  assert.equal(client.userSpeaking, false);
});

test("a lost connection is retried with exponential backoff and jitter, and resumes", async () => {
  const { client, events } = newClient();
  client.connect();
  sockets[0].open();
  await tick();
  sockets[0].message(ready());
  sockets[0].serverClose(1006);
  assert.equal(client.state, "reconnecting");
  for (let i = 1; i <= 4; i++) {
    await tick(80);
    assert.equal(sockets.length, i + 1, `attempt ${i}`);
    sockets[i].refuse();
  }
  const delays = events.filter(([t]) => t === "reconnecting").map(([, d]) => d.delayMs);
  // equal jitter: attempt n waits between d/2 and d, d = 8 ms * 2^n capped at 64
  [8, 16, 32, 64, 64].forEach((d, n) => assert.ok(delays[n] >= d / 2 - 1 && delays[n] <= d, `${n}: ${delays[n]}`));
  assert.equal(events.filter(([t]) => t === "reconnecting").at(-1)[1].unreachable, true);
  await tick(80);
  const ws = sockets.at(-1);
  ws.open();
  await tick();
  assert.equal(ws.json[0].resume, "tok1");
  ws.message(ready({ resumed: true, history_length: 2 }));
  assert.equal(client.state, "ready");
  client.disconnect();
});

test("1012 reconnects at once; session.reconnect waits retry_after_ms; 4xxx is not retried", async () => {
  const { client, events } = newClient({ restartJitterMs: 1000 });
  client.connect();
  sockets[0].open();
  await tick();
  sockets[0].message(ready());
  sockets[0].serverClose(1012);
  const d = events.filter(([t]) => t === "reconnecting").at(-1)[1];
  assert.ok(d.delayMs <= 1000 && d.code === 1012);
  client.retryNow();
  sockets[1].open();
  await tick();
  sockets[1].message(ready({ resumed: true }));
  sockets[1].message({ type: "session.reconnect", reason: "draining", retry_after_ms: 300 });
  sockets[1].serverClose(1012);
  const d2 = events.filter(([t]) => t === "reconnecting").at(-1)[1];
  assert.ok(d2.delayMs >= 300 && d2.delayMs <= 550, `${d2.delayMs}`);
  client.retryNow();
  sockets[2].open();
  await tick();
  sockets[2].message({ type: "error", code: "x", message: "origin not allowed here", fatal: true });
  sockets[2].serverClose(4403);
  assert.equal(client.state, "closed");
  const fatal = events.find(([t]) => t === "fatal")[1];
  assert.equal(fatal.code, 4403);
  assert.equal(fatal.message, "origin not allowed here");
  await tick(30);
  assert.equal(sockets.length, 3, "no retry after 4xxx");
});

test("resume_failed: not_found forgets the old receipts and says so", async () => {
  const storage = memory();
  storage.setItem("novagate.conversation", JSON.stringify({ resume_token: "old", conversation_id: "c0", pending: { x: "R" } }));
  const { client, events } = newClient({ storage });
  client.connect();
  sockets[0].open();
  await tick();
  assert.equal(sockets[0].json[0].resume, "old");
  sockets[0].message(ready({ resume_failed: "not_found" }));
  assert.deepEqual(client.pendingReceipts, {});
  assert.equal(client.resumeToken, "tok1");
  assert.equal(events.find(([t]) => t === "notfound")[1].previousConversationId, "c0");
});

test("interrupted: the player is flushed and playback.truncate says what was played", async () => {
  const { client } = newClient();
  const log = [];
  client.attachPlayer({
    startItem: (id) => log.push(["start", id]),
    push: (id, pcm) => log.push(["push", id, pcm.byteLength]),
    endItem: (id) => log.push(["end", id]),
    flush: async (id) => {
      log.push(["flush", id]);
      return 1234.4;
    },
    reset: () => log.push(["reset"]),
  });
  client.connect();
  const ws = sockets[0];
  ws.open();
  await tick();
  ws.message(ready());
  ws.message({ type: "response.audio.start", item_id: "a1" });
  ws.message(new ArrayBuffer(1920));
  ws.message({ type: "interrupted", item_id: "a1" });
  ws.message(new ArrayBuffer(1920)); // a late frame of the interrupted item: not played
  await tick();
  assert.deepEqual(log, [["start", "a1"], ["push", "a1", 1920], ["flush", "a1"]]);
  assert.deepEqual(ws.json.at(-1), { type: "playback.truncate", item_id: "a1", played_ms: 1234 });
});

test("without a microphone the client keeps real-time silence flowing", async () => {
  const { client } = newClient();
  client.connect();
  const ws = sockets[0];
  ws.open();
  await tick(210);
  const frames = ws.sent.filter((x) => x instanceof ArrayBuffer);
  assert.ok(frames.length >= 7 && frames.length <= 12, `${frames.length} frames in 210 ms`);
  assert.equal(frames[0].byteLength, 640); // 20 ms at 16 kHz, PCM16
  client.setMicActive(true);
  const n = ws.sent.length;
  await tick(60);
  assert.equal(ws.sent.length, n, "the microphone's frames replace the silence");
  assert.equal(client.sendAudio(new Int16Array(320)), true);
  client.disconnect();
  assert.equal(client.sendAudio(new Int16Array(320)), false);
});

test("end(): session.end, then the stored conversation is forgotten", async () => {
  const { client, storage } = newClient();
  client.connect();
  const ws = sockets[0];
  ws.open();
  await tick();
  ws.message(ready());
  const ending = client.end();
  assert.equal(ws.json.at(-1).type, "session.end");
  ws.message({ type: "session.ended" });
  ws.serverClose(1000);
  await ending;
  assert.equal(client.state, "ended");
  assert.equal(storage.getItem("novagate.conversation"), null);
  await tick(30);
  assert.equal(sockets.length, 1, "no reconnect after the end");
});

test("codecs: session.start offers Opus, session.ready decides; the player and the silence follow", async () => {
  const { client } = newClient({ inputCodec: "opus", outputCodec: "opus" });
  const told = [];
  client.attachPlayer({ startItem() {}, push() {}, endItem() {}, flush: async () => 0, setCodec: (c) => told.push(c) });
  client.connect();
  let ws = sockets[0];
  ws.open();
  await tick(70);
  assert.deepEqual(ws.json[0].audio, { input_sample_rate: 16000, output_sample_rate: 24000,
                                       input_codec: "opus", output_codec: "opus" });
  let frames = ws.sent.filter((x) => x instanceof ArrayBuffer);
  assert.ok(frames.length >= 2, "silence flows before session.ready too, in the codec offered");
  assert.deepEqual([...new Uint8Array(frames[0])], [0xf8, 0xff, 0xfe]); // 20 ms of Opus silence
  ws.message(ready({ audio: { input_sample_rate: 16000, output_sample_rate: 24000, input_codec: "opus", output_codec: "opus" } }));
  assert.deepEqual(client.codecs, { input: "opus", output: "opus" });
  assert.equal(told.at(-1), "opus");

  // a server without codecs confirms none: PCM16 it is, whatever was offered
  ws.serverClose(1012);
  await tick(20);
  ws = sockets[1];
  ws.open();
  await tick();
  assert.equal(ws.json[0].audio.input_codec, "opus");
  ws.message(ready({ audio: { input_sample_rate: 16000, output_sample_rate: 24000 } }));
  assert.deepEqual(client.codecs, { input: "pcm16", output: "pcm16" });
  assert.equal(told.at(-1), "pcm16");
  const n = ws.sent.length;
  await tick(70);
  frames = ws.sent.slice(n).filter((x) => x instanceof ArrayBuffer);
  assert.ok(frames.length >= 2 && frames.every((f) => f.byteLength === 640), "PCM16 silence from then on");
});

test("codecs: a server that refuses them (unsupported, 4400) is asked again at once in PCM16", async () => {
  const { client, events } = newClient({ inputCodec: "opus", outputCodec: "opus" });
  const fallbacks = [];
  client.addEventListener("codecfallback", (e) => fallbacks.push(e.detail));
  client.connect();
  sockets[0].open();
  await tick();
  sockets[0].message({ type: "error", code: "unsupported", message: "this gateway speaks pcm16 only, not opus", fatal: true });
  sockets[0].serverClose(4400, "codec not supported");
  await tick(5);
  assert.equal(events.filter(([t]) => t === "fatal").length, 0, "not the end of the session");
  assert.deepEqual(fallbacks, [{ input: "opus", output: "opus", message: "this gateway speaks pcm16 only, not opus" }]);
  assert.equal(sockets.length, 2);
  sockets[1].open();
  await tick();
  assert.deepEqual(sockets[1].json[0].audio, { input_sample_rate: 16000, output_sample_rate: 24000 });
  sockets[1].message(ready());
  assert.equal(client.state, "ready");
  assert.deepEqual(client.codecs, { input: "pcm16", output: "pcm16" });
  // refused again (now for something else): that is fatal as before
  sockets[1].message({ type: "error", code: "unsupported", message: "no", fatal: true });
  sockets[1].serverClose(4400);
  await tick(5);
  assert.equal(events.filter(([t]) => t === "fatal").length, 1);
  assert.equal(sockets.length, 2);
});
