// node --test web/test/  — what the client keeps in storage, and how it lets go of it: receipts
// leave on item.saved, forget() and end() leave nothing behind, tab-only mode (sessionStorage)
// keeps nothing in localStorage. Fake WebSocket and fake Storage; no server, no DOM.
import { afterEach, test } from "node:test";
import assert from "node:assert/strict";

import { NovagateClient, browserStorage } from "../novagate-client.js";
import { MODE_KEY, prepareStorage, readMode, storageFor, switchMode, writeMode } from "../remember.js";

const KEY = "novagate.conversation";
const sockets = [];
const clients = [];
afterEach(() => {
  for (const c of clients.splice(0)) c.disconnect();
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
  open() {
    this.readyState = 1;
    this.onopen && this.onopen();
  }
  message(msg) {
    this.onmessage && this.onmessage({ data: JSON.stringify(msg) });
  }
  serverClose(code, reason = "") {
    this.readyState = 3;
    this.onclose && this.onclose({ code, reason });
  }
  get json() {
    return this.sent.filter((x) => typeof x === "string").map((x) => JSON.parse(x));
  }
  send(data) {
    this.sent.push(data);
  }
  close(code, reason) {
    this.closed = { code, reason };
    this.readyState = 3;
  }
}

/** A Storage with the Web Storage interface, and a dump of everything in it. */
class FakeStorage {
  constructor(name) {
    this.name = name;
    this.m = new Map();
    this.writes = 0;
  }
  get length() {
    return this.m.size;
  }
  key(i) {
    return [...this.m.keys()][i] ?? null;
  }
  getItem(k) {
    return this.m.has(k) ? this.m.get(k) : null;
  }
  setItem(k, v) {
    this.writes++;
    this.m.set(k, String(v));
  }
  removeItem(k) {
    this.m.delete(k);
  }
  clear() {
    this.m.clear();
  }
  /** Every key and value, as one string: to look for anything transcript-like. */
  dump() {
    return JSON.stringify([...this.m.entries()]);
  }
}

const tick = (ms = 0) => new Promise((r) => setTimeout(r, ms));

function newClient(storage) {
  sockets.length = 0;
  const client = new NovagateClient({
    url: "ws://gw/v1/voice", WebSocket: FakeWebSocket, storage, storageKey: KEY,
    backoff: { initialMs: 8, maxMs: 64, factor: 2 }, restartJitterMs: 4,
  });
  clients.push(client);
  return client;
}

async function connected(storage, readyExtra = {}) {
  const client = newClient(storage);
  client.connect();
  const ws = sockets.at(-1);
  ws.open();
  await tick();
  ws.message({
    type: "session.ready", protocol: 1, session_id: "s", conversation_id: "c1", resume_token: "TOKEN-1",
    resumed: false, history: [], history_length: 0, ...readyExtra,
  });
  return { client, ws };
}

// a receipt is a signed copy of the item: like the real ones (JWT), it carries the text
const receipt = (text) => `RECEIPT(${Buffer.from(text).toString("base64")})`;
const say = (ws, id, role, text) =>
  ws.message({ type: "transcript", item_id: id, role, text, final: true, receipt: receipt(text) });

const stored = (s) => JSON.parse(s.getItem(KEY));

test("receipts leave storage on item.saved, one by one; plans are never stored", async () => {
  const local = new FakeStorage("local");
  const { client, ws } = await connected(local);
  assert.deepEqual(stored(local), { resume_token: "TOKEN-1", conversation_id: "c1", pending: {} });
  ws.message({ type: "transcript", item_id: "a0", role: "assistant", text: "a plan, not yet said", final: false });
  assert.ok(!local.dump().includes("plan"), "a non-final transcript is not stored");
  say(ws, "u1", "user", "my secret words");
  say(ws, "a1", "assistant", "the secret answer");
  assert.deepEqual(Object.keys(stored(local).pending), ["u1", "a1"]);
  assert.deepEqual(Object.keys(client.pendingReceipts), ["u1", "a1"]);
  ws.message({ type: "item.saved", item_id: "u1" });
  assert.deepEqual(stored(local).pending, { a1: receipt("the secret answer") }, "u1 left at once");
  ws.message({ type: "item.saved", item_id: "a1" });
  assert.deepEqual(stored(local), { resume_token: "TOKEN-1", conversation_id: "c1", pending: {} });
  assert.ok(!local.dump().includes("RECEIPT"), local.dump());
  // an item.saved for something not held changes nothing and writes nothing
  const writes = local.writes;
  ws.message({ type: "item.saved", item_id: "zz" });
  assert.equal(local.writes, writes);
  assert.equal(client.remembers, true);
});

test("forget(): nothing stays in storage or memory; a live session is closed, not ended", async () => {
  const local = new FakeStorage("local");
  local.setItem("unrelated", "kept"); // someone else's key: left alone
  const { client, ws } = await connected(local);
  say(ws, "u1", "user", "my secret words");
  assert.ok(local.dump().includes(receipt("my secret words")));
  client.forget();
  assert.equal(local.getItem(KEY), null);
  assert.deepEqual([...local.m.keys()], ["unrelated"]);
  assert.ok(!/TOKEN|RECEIPT|secret|c1/.test(local.dump()), local.dump());
  assert.equal(client.resumeToken, null);
  assert.equal(client.conversationId, null);
  assert.deepEqual(client.pendingReceipts, {});
  assert.equal(client.session, null, "the session.ready with its history is dropped too");
  assert.equal(client.remembers, false);
  assert.equal(client.state, "idle");
  assert.deepEqual(ws.closed, { code: 1000, reason: "forgotten on this device" });
  assert.ok(!ws.json.some((m) => m.type === "session.end"), "nothing is ended on the server");
  // late messages of the closed socket are not stored, and nothing reconnects
  say(ws, "a1", "assistant", "late answer");
  ws.message({ type: "session.updated", conversation_id: "c1", resume_token: "TOKEN-2" });
  await tick(40);
  assert.equal(sockets.length, 1);
  assert.equal(local.getItem(KEY), null);
  // the next connect starts a new conversation: no token, no receipts
  client.connect();
  sockets.at(-1).open();
  await tick();
  const start = sockets.at(-1).json[0];
  assert.equal(start.resume, undefined);
  assert.equal(start.pending, undefined);
});

test("forget() while disconnected, or while waiting to reconnect", async () => {
  const local = new FakeStorage("local");
  local.setItem(KEY, JSON.stringify({ resume_token: "OLD", conversation_id: "c0", pending: { x: receipt("old words") } }));
  const idle = newClient(local);
  assert.equal(idle.remembers, true);
  idle.forget();
  assert.equal(local.length, 0);
  assert.equal(idle.state, "idle");

  const { client, ws } = await connected(local);
  ws.serverClose(1006);
  assert.equal(client.state, "reconnecting");
  client.forget();
  await tick(80);
  assert.equal(sockets.length, 1, "the pending retry is cancelled");
  assert.equal(local.length, 0);
});

test("end(): storage is cleared before session.end is answered; nothing comes back meanwhile", async () => {
  const local = new FakeStorage("local");
  const { client, ws } = await connected(local);
  say(ws, "u1", "user", "my secret words");
  const ending = client.end();
  assert.equal(ws.json.at(-1).type, "session.end");
  assert.equal(local.getItem(KEY), null, "cleared at once, before the server answers");
  // what the server still sends before session.ended is not stored
  say(ws, "a1", "assistant", "a last answer");
  ws.message({ type: "session.updated", conversation_id: "c1", resume_token: "TOKEN-2" });
  assert.equal(local.getItem(KEY), null);
  ws.message({ type: "session.ended" });
  ws.serverClose(1000);
  await ending;
  assert.equal(local.length, 0);
  assert.equal(client.remembers, false);
});

test("setStorage(): tab-only moves the conversation to sessionStorage and out of localStorage", async () => {
  const local = new FakeStorage("local");
  const session = new FakeStorage("session");
  const { client, ws } = await connected(local);
  say(ws, "u1", "user", "my secret words");
  const before = local.getItem(KEY);

  switchMode(client, "tab", { local, session });
  assert.equal(readMode(local), "tab");
  assert.equal(local.getItem(KEY), null);
  assert.deepEqual([...local.m.keys()], [MODE_KEY], "only the (secret-free) choice stays on the device");
  assert.equal(session.getItem(KEY), before, "moved as it was: token, id, unsaved receipt");

  // from now on every change goes to sessionStorage only
  say(ws, "a1", "assistant", "the secret answer");
  ws.message({ type: "item.saved", item_id: "u1" });
  ws.message({ type: "session.updated", conversation_id: "c2", resume_token: "TOKEN-2" });
  assert.deepEqual([...local.m.keys()], [MODE_KEY]);
  assert.ok(!/TOKEN|RECEIPT|secret/.test(local.dump()), local.dump());
  assert.deepEqual(stored(session), { resume_token: "TOKEN-2", conversation_id: "c2", pending: { a1: receipt("the secret answer") } });

  // a reload of the tab (same sessionStorage) resumes with the token and the unsaved receipt
  client.disconnect();
  const reloaded = newClient(prepareStorage(readMode(local), { local, session }, KEY));
  reloaded.connect();
  sockets.at(-1).open();
  await tick();
  assert.equal(sockets.at(-1).json[0].resume, "TOKEN-2");
  assert.deepEqual(sockets.at(-1).json[0].pending, [receipt("the secret answer")]);

  // back to "this device": moved back, sessionStorage emptied, the choice's key removed
  switchMode(reloaded, "device", { local, session });
  assert.equal(readMode(local), "device");
  assert.equal(local.getItem(MODE_KEY), null);
  assert.equal(session.getItem(KEY), null);
  assert.equal(stored(local).resume_token, "TOKEN-2");

  // forget in tab-only mode empties sessionStorage too
  switchMode(reloaded, "tab", { local, session });
  reloaded.forget();
  assert.equal(session.length, 0);
  assert.deepEqual([...local.m.keys()], [MODE_KEY]);
});

test("setStorage({move: false}) drops the conversation instead of moving it", async () => {
  const local = new FakeStorage("local");
  const session = new FakeStorage("session");
  const { client } = await connected(local);
  client.setStorage(session, { move: false });
  assert.equal(local.length, 0);
  assert.equal(session.length, 0);
  assert.equal(client.remembers, false);
  assert.equal(client.state, "idle");
});

test("prepareStorage() on page load: one storage holds the conversation, per the chosen mode", () => {
  const entry = JSON.stringify({ resume_token: "T", conversation_id: "c", pending: {} });
  // tab-only: a leftover in localStorage is removed, not adopted
  let local = new FakeStorage("local");
  let session = new FakeStorage("session");
  writeMode(local, "tab");
  local.setItem(KEY, entry);
  assert.equal(prepareStorage("tab", { local, session }, KEY), session);
  assert.equal(local.getItem(KEY), null);
  assert.equal(session.getItem(KEY), null);
  // device: this tab's conversation from tab-only mode moves to localStorage (if that holds none)
  local = new FakeStorage("local");
  session = new FakeStorage("session");
  session.setItem(KEY, entry);
  assert.equal(prepareStorage("device", { local, session }, KEY), local);
  assert.equal(local.getItem(KEY), entry);
  assert.equal(session.getItem(KEY), null);
  // ... and does not overwrite one that is there
  session.setItem(KEY, "other");
  prepareStorage("device", { local, session }, KEY);
  assert.equal(local.getItem(KEY), entry);
  assert.equal(session.getItem(KEY), null);
  // the choice: "device" unless "tab" was chosen; unreadable storage means "device"
  assert.equal(readMode(new FakeStorage("x")), "device");
  assert.equal(readMode({ getItem() { throw new Error("denied"); } }), "device");
  assert.equal(storageFor("tab", { local, session }), session);
  assert.equal(storageFor("device", { local, session }), local);
});

test("browserStorage() falls back to memory when there is no Web Storage (node, private modes)", () => {
  const s = browserStorage("session");
  s.setItem("k", "v");
  assert.equal(s.getItem("k"), "v");
  s.removeItem("k");
  assert.equal(s.getItem("k"), null);
  assert.notEqual(browserStorage("local"), s);
});
