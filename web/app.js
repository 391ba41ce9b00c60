// The page: buttons, transcript, status line, notices. Everything about the protocol lives in
// novagate-client.js and everything about audio in audio/; this file only wires them to the DOM.

import { NovagateClient, browserStorage } from "./novagate-client.js";
import { Microphone, Player } from "./audio/audio-io.js";
import { OpusEncoder, opusSupport } from "./audio/opus.js";
import { MODE_KEY, prepareStorage, readMode, storageFor, switchMode } from "./remember.js";

const $ = (id) => document.getElementById(id);
const ui = {
  status: $("status"), statusText: $("status-text"), recovery: $("recovery"), alert: $("alert"),
  alertText: $("alert-text"), alertAction: $("alert-action"), sound: $("sound"), transcript: $("transcript"),
  empty: $("empty"), conversation: $("conversation"), mic: $("mic"), micLabel: $("mic-label"), level: $("level"),
  form: $("text-form"), say: $("say"), send: $("send"), newConv: $("new"), announce: $("announce"),
  memory: $("memory"), memoryText: $("memory-text"), tabOnly: $("tab-only"), forget: $("forget"),
  debug: $("debug"), debugCodec: $("debug-codec"), debugUp: $("debug-up"), debugDown: $("debug-down"),
  debugWhy: $("debug-why"),
};

// The gateway serving this page, or another one given as ?gateway=wss://host/v1/voice.
const params = new URLSearchParams(location.search);
const wsUrl = params.get("gateway") ||
  `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/v1/voice`;
const httpBase = wsUrl.replace(/^ws/, "http").replace(/\/v1\/voice$/, "");
const ACTIVE_KEY = "novagate.active"; // sessionStorage: the session was on when the page went away

// Where the conversation is remembered: on this device (localStorage, the default) or only in this
// tab (sessionStorage). See remember.js.
const STORAGE_KEY = "novagate.conversation";
const storages = { local: browserStorage("local"), session: browserStorage("session") };
let rememberMode = readMode(storages.local);

const client = new NovagateClient({
  url: wsUrl, outputSampleRate: 24000, inputSampleRate: 16000, storageKey: STORAGE_KEY,
  storage: prepareStorage(rememberMode, storages, STORAGE_KEY),
});
const player = new Player({ sampleRate: 24000, targetMs: 80 });
const mic = new Microphone({ targetRate: 16000, frameMs: 20, onframe: (pcm) => sendMic(pcm) });
client.attachPlayer(player);

// -- audio codec -----------------------------------------------------------------------------------
// Opus through WebCodecs when this browser encodes and decodes it, PCM16 otherwise; ?codec=pcm16
// forces PCM16, ?codec=opus insists on Opus (still PCM16 when the browser cannot). session.start
// offers it, and the frames follow what session.ready confirms (client.codecs).
const codecChoice = chooseCodec(params.get("codec"));
let chosenReason = ""; // why the page offers what it offers
let codecReason = ""; // why this session has the codecs it has (the debug panel says it)
const encoder = new OpusEncoder({
  onpacket: (packet) => {
    if (client.codecs.input === "opus") client.sendAudio(packet); // (not one still on its way when it became PCM16)
  },
});

async function chooseCodec(wanted) {
  if (wanted === "pcm16") return { codec: "pcm16", inputRate: 16000, reason: "PCM16 (?codec=pcm16)" };
  const can = await opusSupport();
  if (can.input && can.output) {
    return { codec: "opus", inputRate: can.input, reason: `Opus through WebCodecs${wanted === "opus" ? " (?codec=opus)" : ""}` };
  }
  if (wanted === "opus") console.warn(`novagate: ?codec=opus, but ${can.reason}: PCM16`);
  return { codec: "pcm16", inputRate: 16000, reason: `PCM16: ${can.reason}` };
}

async function applyCodec() {
  const choice = await codecChoice;
  client.setCodecs({ input: choice.codec, output: choice.codec });
  client.options.inputSampleRate = mic.targetRate = encoder.sampleRate = choice.inputRate;
  chosenReason = choice.reason;
}

function sendMic(pcm) {
  if (client.codecs.input === "opus" && client.canSend) encoder.encode(pcm); // on to client.sendAudio
  else client.sendAudio(pcm);
}

client.addEventListener("codecfallback", (e) => {
  chosenReason = `PCM16: the server does not take ${e.detail.input} (${e.detail.message})`;
  console.info("novagate:", chosenReason);
});

client.addEventListener("ready", () => {
  const offered = client.options.inputCodec;
  codecReason = offered !== "pcm16" && client.codecs.input !== offered
    ? `PCM16: the server did not confirm ${offered}` : chosenReason;
});

let active = false; // the user wants the conversation running
let micOn = false;
let statusKey = "idle";
const statusLog = []; // every status the line showed, with times: for tests and debugging
let lastReconnect = null;
let interruptedItems = new Set();
const items = new Map(); // item_id -> {li, role, final}
const toolRows = new Map(); // call_id (or the item_id of a history record without one) -> {li, ...}
let shownGeneration = 0; // bumped when the page is cleared: a history fetch under way is then not shown

// -- status line ----------------------------------------------------------------------------------
const STATUS_TEXT = {
  idle: "Press Start to talk",
  paused: "Paused — press Start to continue",
  connecting: "Connecting…",
  listening: "Listening",
  "mic-off": "Connected — microphone off",
  thinking: "Thinking…",
  speaking: "Speaking",
  "user-speaking": "You're speaking",
  recovering: "Recovering…",
  reconnecting: "Reconnecting…",
  ended: "Conversation ended",
  error: "Disconnected",
};

function computeStatus() {
  switch (client.state) {
    case "connecting":
      return "connecting";
    case "reconnecting":
      return "reconnecting";
    case "closed":
      return "error";
    case "ready": {
      const s = client.serverStatus || "listening";
      if (client.userSpeaking && s !== "recovering") return "user-speaking"; // only servers that say so
      if (s === "listening") {
        if (player.stats.state === "playing" && player.stats.depth > 0) return "speaking"; // the tail is still playing
        return micOn && mic.running ? "listening" : "mic-off";
      }
      return s;
    }
    default:
      return active ? "connecting" : client.resumeToken ? "paused" : "idle";
  }
}

function renderStatus() {
  const key = computeStatus();
  let text = STATUS_TEXT[key] || key;
  if (key === "reconnecting" && lastReconnect) {
    if (lastReconnect.code === 1012) text = "Reconnecting — the server is restarting…";
    else if (lastReconnect.unreachable) text = `Reconnecting in ${Math.max(1, Math.round(lastReconnect.delayMs / 1000))} s…`;
  }
  if (key === statusKey && ui.statusText.textContent === text) return;
  if (key !== statusKey) {
    statusLog.push({ status: key, at: Date.now() });
    if (statusLog.length > 200) statusLog.shift();
  }
  statusKey = key;
  ui.status.dataset.state = key;
  ui.statusText.textContent = text;
}

function announce(text) {
  ui.announce.textContent = "";
  setTimeout(() => { ui.announce.textContent = text; }, 50);
}

// -- notices ---------------------------------------------------------------------------------------
function showAlert(text, { kind = "error", action = null, onAction = null } = {}) {
  ui.alertText.textContent = text;
  ui.alert.classList.toggle("info", kind === "info" || kind === "forgotten");
  ui.alert.dataset.kind = kind;
  ui.alert.hidden = false;
  ui.alertAction.hidden = !action;
  ui.alertAction.textContent = action || "";
  ui.alertAction.onclick = onAction;
}

function clearAlert(kind = null) {
  if (kind && ui.alert.dataset.kind !== kind) return;
  ui.alert.hidden = true;
  ui.alert.dataset.kind = "";
}

function showRecovery(text) {
  ui.recovery.textContent = text;
  ui.recovery.hidden = !text;
}

const turns = (n) => `${n} earlier turn${n === 1 ? "" : "s"}`;

// -- where the conversation is remembered ------------------------------------------------------------
const MEMORY_TEXT = {
  device: "This device remembers the conversation, even after the browser is closed, until you forget it.",
  tab: "Only this tab remembers the conversation: it survives a reload, not closing the tab.",
};

function renderMemory() {
  ui.memory.dataset.mode = rememberMode;
  ui.memoryText.textContent = MEMORY_TEXT[rememberMode];
  ui.tabOnly.checked = rememberMode === "tab";
  ui.forget.disabled = !client.remembers && shownCount() === 0 && ui.recovery.hidden;
}

// -- transcript ------------------------------------------------------------------------------------
function nearBottom() {
  const c = ui.conversation;
  return c.scrollHeight - c.scrollTop - c.clientHeight < 80;
}

function scrollDown(force = false) {
  if (force || nearBottom()) ui.conversation.scrollTop = ui.conversation.scrollHeight;
}

function clearTranscript() {
  ui.transcript.replaceChildren();
  items.clear();
  toolRows.clear();
  interruptedItems = new Set();
  ui.empty.hidden = false;
  shownGeneration++;
}

function entry(itemId, role, { history = false } = {}) {
  let it = items.get(itemId);
  if (it) return it;
  const li = document.createElement("li");
  li.className = `turn ${role}${history ? " history" : ""}`;
  li.dataset.itemId = itemId;
  li.dataset.role = role;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = role === "user" ? "You" : "Assistant";
  const bubble = document.createElement("p");
  bubble.className = "bubble";
  bubble.style.margin = "0";
  li.append(who, bubble);
  ui.transcript.append(li);
  ui.empty.hidden = true;
  it = { li, bubble, role, final: false };
  items.set(itemId, it);
  return it;
}

function setText(it, text, { final, interrupted = false }) {
  const wasBottom = nearBottom();
  const span = document.createElement("span");
  span.textContent = text;
  if (!final) {
    span.className = "planned";
    span.setAttribute("aria-hidden", "true"); // read once, when the final text replaces it
  }
  const nodes = [span];
  if (final && interrupted) {
    const mark = document.createElement("span");
    mark.className = "mark";
    mark.textContent = "— interrupted";
    nodes.push(mark);
  }
  it.bubble.replaceChildren(...nodes);
  it.final = final;
  it.li.dataset.final = String(final);
  it.li.dataset.interrupted = String(!!(final && interrupted));
  if (wasBottom) scrollDown(true);
}

// -- tool calls ------------------------------------------------------------------------------------
// A row per call the model made: name, a spinner while it runs, then how it ended and how long it
// took; arguments and result (collapsed) only when the server sends them (its public tools) or the
// history record holds them. Server data only ever goes in through textContent.
const TOOL_STATUS = {
  started: { icon: "", label: "running…" },
  finished: { icon: "✓", label: "finished" },
  failed: { icon: "✕", label: "failed" },
  timed_out: { icon: "◷", label: "timed out" },
  cancelled: { icon: "⊘", label: "cancelled" },
};

function shownCount() {
  return items.size + toolRows.size;
}

function formatDuration(ms) {
  if (typeof ms !== "number" || !Number.isFinite(ms) || ms < 0) return "";
  return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(1)} s`;
}

function jsonText(value) {
  try {
    const text = JSON.stringify(value, null, 2);
    return text === undefined ? String(value) : text;
  } catch {
    return String(value);
  }
}

function toolRow(key, { history = false } = {}) {
  let row = toolRows.get(key);
  if (row) return row;
  const li = document.createElement("li");
  li.className = `tool${history ? " history" : ""}`;
  const line = document.createElement("div");
  line.className = "tool-line";
  const icon = document.createElement("span");
  icon.className = "tool-icon";
  icon.setAttribute("aria-hidden", "true");
  const label = document.createElement("span");
  label.className = "visually-hidden";
  label.textContent = "Tool ";
  const name = document.createElement("span");
  name.className = "tool-name";
  const status = document.createElement("span");
  status.className = "tool-status";
  const duration = document.createElement("span");
  duration.className = "tool-duration";
  line.append(icon, label, name, status, duration);
  li.append(line);
  ui.transcript.append(li);
  ui.empty.hidden = true;
  row = { li, icon, name, status, duration, details: null };
  toolRows.set(key, row);
  return row;
}

/** Show a call: `call` is a tool.call message or a history record ({call_id, name, status, ...}). */
function setTool(row, call, { itemId = null } = {}) {
  const wasBottom = nearBottom();
  const status = TOOL_STATUS[call.status] ? call.status : "unknown";
  const shown = TOOL_STATUS[status] || { icon: "?", label: String(call.status || "unknown") };
  const name = typeof call.name === "string" && call.name ? call.name : "tool";
  row.li.dataset.callId = call.call_id || "";
  row.li.dataset.name = name;
  row.li.dataset.status = status;
  if (itemId || call.item_id) row.li.dataset.itemId = itemId || call.item_id;
  row.name.textContent = name;
  row.icon.textContent = shown.icon;
  row.icon.classList.toggle("spinner", status === "started");
  row.status.textContent = shown.label;
  const duration = status === "started" ? "" : formatDuration(call.duration_ms);
  row.duration.textContent = duration;
  row.duration.hidden = !duration;
  row.li.dataset.durationMs = duration ? String(call.duration_ms) : "";
  // arguments (when not empty) and the result, as far as they are known: a later message never takes
  // away what an earlier one showed (the started message of a public tool has no result yet)
  const known = row.known || (row.known = {});
  const args = call.arguments;
  if (args && typeof args === "object" && Object.keys(args).length) known.arguments = args;
  if (Object.prototype.hasOwnProperty.call(call, "result") && status !== "started") known.result = call.result;
  renderToolDetails(row, known);
  if (wasBottom) scrollDown(true);
}

function renderToolDetails(row, known) {
  const parts = [];
  for (const [key, title] of [["arguments", "Arguments"], ["result", "Result"]]) {
    if (!Object.prototype.hasOwnProperty.call(known, key)) continue;
    const h = document.createElement("span");
    h.className = "tool-part";
    h.textContent = title;
    const pre = document.createElement("pre");
    pre.className = `tool-${key}`;
    pre.textContent = jsonText(known[key]);
    parts.push(h, pre);
  }
  if (!parts.length) {
    if (row.details) row.details.remove();
    row.details = null;
    return;
  }
  if (!row.details) {
    row.details = document.createElement("details");
    row.details.className = "tool-details";
    const summary = document.createElement("summary");
    summary.textContent = "Details";
    row.details.append(summary);
    row.li.append(row.details);
  }
  const summary = row.details.querySelector("summary");
  summary.textContent = "result" in known ? ("arguments" in known ? "Arguments and result" : "Result") : "Arguments";
  row.details.replaceChildren(summary, ...parts);
}

/** A history item of role "tool": its text is the JSON record of the call (never shown as it is). */
function historyTool(h) {
  let rec = null;
  try {
    rec = JSON.parse(h.text);
  } catch {}
  if (!rec || typeof rec !== "object" || Array.isArray(rec)) rec = { name: "tool", status: "unknown" };
  const row = toolRow(rec.call_id || h.item_id, { history: true });
  setTool(row, rec, { itemId: h.item_id });
}

function renderHistory(history, total, note) {
  clearTranscript();
  if (total > history.length) {
    const li = document.createElement("li");
    li.className = "divider";
    li.textContent = `${total - history.length} earlier turns not shown`;
    ui.transcript.append(li);
  }
  for (const h of history) {
    if (h.role === "tool") historyTool(h);
    else setText(entry(h.item_id, h.role, { history: true }), h.text, { final: true, interrupted: h.interrupted });
  }
  if (note && history.length) {
    const li = document.createElement("li");
    li.className = "divider";
    li.textContent = note;
    ui.transcript.append(li);
  }
  scrollDown(true);
}

// -- the conversation ------------------------------------------------------------------------------
client.addEventListener("state", () => {
  renderStatus();
  const ready = client.state === "ready";
  ui.say.disabled = ui.send.disabled = !ready;
  ui.say.placeholder = ready ? "Type a message" : "Press Start, then talk or type";
});

client.addEventListener("status", renderStatus);
client.addEventListener("speech", renderStatus);

client.addEventListener("ready", (e) => {
  const r = e.detail;
  clearAlert("network");
  clearAlert("info");
  if (r.resumed) {
    renderHistory(r.history || [], r.history_length || 0, lastReconnect ? "Reconnected" : "Resumed");
    showRecovery(`Resumed — ${turns(r.history_length || 0)}`);
    announce(`Resumed the conversation, ${turns(r.history_length || 0)}.`);
  } else {
    clearTranscript();
    showRecovery("");
    if (r.resume_failed) {
      showAlert("Your previous conversation was not found (it may have expired or been ended). " +
        "This is a new conversation.", { kind: "notfound" });
    } else {
      announce("Connected. Say something.");
    }
  }
  lastReconnect = null;
  renderStatus();
});

client.addEventListener("transcript", (e) => {
  const t = e.detail;
  const it = entry(t.item_id, t.role);
  if (it.final && !t.final) return; // a late plan never replaces what was said
  setText(it, t.text, { final: !!t.final, interrupted: t.final && interruptedItems.has(t.item_id) });
});

client.addEventListener("toolcall", (e) => {
  const call = e.detail;
  if (!call.call_id) return;
  const row = toolRow(call.call_id);
  if (call.status === "started" && row.li.dataset.status && row.li.dataset.status !== "started") return; // late
  setTool(row, call);
  if (call.status !== "started") {
    const shown = TOOL_STATUS[call.status];
    announce(`The ${row.name.textContent} tool ${shown ? shown.label : "ended"}.`);
  }
});

client.addEventListener("interrupted", (e) => {
  interruptedItems.add(e.detail.itemId);
  renderStatus();
});

client.addEventListener("reconnecting", (e) => {
  lastReconnect = e.detail;
  renderStatus();
  if (e.detail.unreachable) {
    showAlert(`Can't reach the server at ${new URL(httpBase).host}. Retrying in ` +
      `${Math.max(1, Math.round(e.detail.delayMs / 1000))} s…`,
      { kind: "network", action: "Retry now", onAction: () => client.retryNow() });
  } else if (e.detail.code !== 1012) {
    announce("Connection lost. Reconnecting.");
  }
});

client.addEventListener("fatal", (e) => {
  showAlert(`The server closed the conversation: ${e.detail.message} (code ${e.detail.code}).`, { kind: "fatal" });
  stopAudio();
  setActive(false);
  renderStatus();
});

client.addEventListener("servererror", (e) => {
  const err = e.detail;
  if (err.code === "store_degraded") {
    showAlert("The history store is slow to answer: your turns are kept and will be saved.", { kind: "info" });
  } else if (err.code === "unsupported" && client.state !== "ready") {
    // a codec the server does not take: the client asks again in PCM16 (codecfallback); anything
    // else it refuses ends in `fatal`
  } else if (err.fatal) {
    showAlert(`${err.message}. Trying again…`, { kind: "network" });
  } else if (err.code !== "bad_receipt") {
    console.warn("novagate:", err.code, err.message);
  }
});

client.addEventListener("saved", () => {
  if (ui.alert.dataset.kind === "info" && !Object.keys(client.pendingReceipts).length) clearAlert("info");
});

// what is stored changes on these: the Forget button follows
for (const type of ["state", "ready", "updated", "transcript", "toolcall", "saved", "ended"]) {
  client.addEventListener(type, renderMemory);
}

player.onstats = () => {
  if (client.state === "ready") renderStatus();
};

// -- start / stop / new ----------------------------------------------------------------------------
function setActive(on) {
  active = on;
  ui.mic.setAttribute("aria-pressed", String(on));
  ui.micLabel.textContent = on ? "Stop" : "Start";
  try {
    if (on) sessionStorage.setItem(ACTIVE_KEY, "1");
    else sessionStorage.removeItem(ACTIVE_KEY);
  } catch {}
}

function stopAudio() {
  mic.stop();
  micOn = false;
  client.setMicActive(false);
}

function checkSound() {
  const suspended = (player.ctx && player.ctx.state !== "running") || (mic.ctx && mic.ctx.state !== "running");
  ui.sound.hidden = !(active && suspended);
  // the microphone's frames only flow while its context runs; until then the client sends silence
  client.setMicActive(micOn && mic.running);
  renderStatus();
}
mic.onstatechange = checkSound;
player.onstatechange = checkSound;

async function start() {
  if (active) return;
  setActive(true);
  clearAlert();
  renderStatus();
  try {
    await player.start();
  } catch (e) {
    showAlert(`The audio output could not start (${e.message || e}).`);
  }
  await applyCodec();
  client.connect();
  try {
    await mic.start();
    if (!active) {
      mic.stop();
      return;
    }
    micOn = true;
  } catch (e) {
    micOn = false;
    client.setMicActive(false);
    showAlert(`${e.message} You can still type.`, { kind: "mic" });
  }
  checkSound();
  renderStatus();
}

function stop() {
  if (!active) return;
  setActive(false);
  stopAudio();
  client.disconnect();
  player.reset();
  lastReconnect = null;
  renderStatus();
  announce("Stopped. The conversation is kept; press Start to continue.");
}

async function newConversation() {
  const wasActive = active;
  ui.newConv.disabled = true;
  // the old conversation leaves the page and the storage first (client.end() clears the token and
  // the receipts before it sends session.end), then the new one starts
  clearTranscript();
  showRecovery("");
  clearAlert();
  try {
    await client.end();
  } finally {
    ui.newConv.disabled = false;
  }
  clearTranscript(); // anything that arrived while the server was ending it
  if (wasActive) client.connect();
  renderStatus();
  renderMemory();
  announce("Started a new conversation.");
}

/**
 * Forget on this device: the resume token, the receipts and the conversation id leave storage, the
 * history leaves the page. A running session is stopped (closed, not ended: nothing is ended on
 * the server, where the conversation expires with its token). The next Start begins a new one.
 */
function forgetHere({ elsewhere = false } = {}) {
  if (active) {
    setActive(false);
    stopAudio();
  }
  client.forget();
  player.reset();
  lastReconnect = null;
  clearTranscript();
  showRecovery("");
  showAlert(elsewhere
    ? "This conversation was forgotten or ended in another tab, so it is no longer kept here either."
    : "Forgotten on this device: this browser no longer keeps the conversation. " +
      "It was not ended on the server, where it expires by itself.", { kind: "forgotten" });
  renderStatus();
  renderMemory();
  announce("The conversation is forgotten on this device.");
}

function setRememberMode(mode) {
  if (mode === rememberMode) return;
  rememberMode = switchMode(client, mode, storages);
  renderMemory();
  announce(mode === "tab" ? "The conversation is now remembered only in this tab."
    : "The conversation is now remembered on this device.");
}

ui.mic.addEventListener("click", () => (active ? stop() : start()));
ui.newConv.addEventListener("click", newConversation);
ui.forget.addEventListener("click", () => forgetHere());
ui.tabOnly.addEventListener("change", () => setRememberMode(ui.tabOnly.checked ? "tab" : "device"));

// Other tabs of this browser: follow a change of the choice; when the conversation this tab holds
// is forgotten (or ended) there on this device, forget it here too, or this tab would store it again.
window.addEventListener("storage", (e) => {
  if (e.storageArea !== storages.local) return;
  if (e.key === MODE_KEY) {
    const mode = readMode(storages.local);
    if (mode !== rememberMode) {
      rememberMode = mode;
      client.setStorage(storageFor(mode, storages));
      renderMemory();
    }
  }
  if ((e.key === STORAGE_KEY || e.key === null) && e.newValue === null && rememberMode === "device" &&
      (client.remembers || shownCount())) {
    let cid = null;
    try {
      cid = JSON.parse(e.oldValue).conversation_id;
    } catch {}
    if (!cid || !client.conversationId || cid === client.conversationId) forgetHere({ elsewhere: true });
  }
});
ui.form.addEventListener("submit", (e) => {
  e.preventDefault();
  if (client.sendText(ui.say.value)) ui.say.value = "";
});

// Browsers keep audio suspended until the user interacts (e.g. after a reload): resume on the first one.
function resumeAudio() {
  Promise.all([player.resume(), mic.resume()]).then(checkSound);
}
ui.sound.addEventListener("click", resumeAudio);
document.addEventListener("pointerdown", resumeAudio, { capture: true });
document.addEventListener("keydown", resumeAudio, { capture: true });
window.addEventListener("online", () => client.retryNow());

setInterval(() => {
  ui.level.style.width = `${Math.min(100, Math.round(Math.sqrt(mic.level) * 140))}%`;
}, 100);

// -- debug panel: the codecs and the data rate -------------------------------------------------------
// The rate is the WebSocket's binary (audio) payload, up and down, over the last ~3 s: PCM16 at
// 16 kHz is 256 kbit/s up, Opus about 24.
const RATE_WINDOW_MS = 3000;
const rateSamples = []; // {at, up, down}: the client's byte counters every 500 ms
let rates = { up: 0, down: 0 };

function measureRates() {
  const now = performance.now();
  rateSamples.push({ at: now, up: client.counters.bytesSent, down: client.counters.bytesReceived });
  while (rateSamples.length > 2 && now - rateSamples[1].at >= RATE_WINDOW_MS) rateSamples.shift();
  const first = rateSamples[0];
  const seconds = (now - first.at) / 1000;
  const kbps = (bytes) => (seconds > 0 ? (bytes * 8) / seconds / 1000 : 0);
  rates = { up: kbps(client.counters.bytesSent - first.up), down: kbps(client.counters.bytesReceived - first.down) };
  renderDebug();
}
setInterval(measureRates, 500);

const CODEC_NAMES = { pcm16: "PCM16", opus: "Opus", mulaw: "G.711 µ-law" };

function codecText(codec, rate) {
  return `${CODEC_NAMES[codec] || codec}${rate ? ` ${rate / 1000} kHz` : ""}`;
}

function byteText(n) {
  return n < 1e6 ? `${(n / 1e3).toFixed(1)} kB` : `${(n / 1e6).toFixed(2)} MB`;
}

function renderDebug() {
  if (client.state === "ready" && client.session) {
    const audio = client.session.audio || {};
    const up = codecText(client.codecs.input, audio.input_sample_rate || client.options.inputSampleRate);
    const down = codecText(client.codecs.output, audio.output_sample_rate || client.options.outputSampleRate);
    ui.debugCodec.textContent = `${up} up · ${down} down`;
  } else {
    ui.debugCodec.textContent = "— (not connected)";
  }
  ui.debugUp.textContent = `${rates.up.toFixed(1)} kbit/s · ${byteText(client.counters.bytesSent)} sent`;
  ui.debugDown.textContent = `${rates.down.toFixed(1)} kbit/s · ${byteText(client.counters.bytesReceived)} received`;
  ui.debugWhy.textContent = codecReason;
}
if (params.has("debug")) ui.debug.open = true;

// -- on load: carry on where the page left off ---------------------------------------------------
async function showStoredConversation() {
  const cid = client.conversationId;
  const token = client.resumeToken;
  if (!cid || !token) return;
  const generation = shownGeneration;
  try {
    const r = await fetch(`${httpBase}/v1/conversations/${encodeURIComponent(cid)}/history`,
      { headers: { "X-Resume-Token": token } });
    // the live session answers instead; or the page was cleared (Forget, New conversation) meanwhile
    if (active || generation !== shownGeneration || client.conversationId !== cid) return;
    if (r.status === 404) {
      client.forget();
      showAlert("Your previous conversation was not found (it may have expired or been ended). " +
        "Press Start for a new one.", { kind: "notfound" });
      renderStatus();
      return;
    }
    if (!r.ok) return;
    const h = await r.json();
    if (active || generation !== shownGeneration || client.conversationId !== cid) return;
    const history = (h.history || []).slice(-50);
    renderHistory(history, h.history_length || history.length, null);
    showRecovery(`Your conversation — ${turns(h.history_length || history.length)}. Press Start to continue.`);
    renderMemory();
  } catch {
    // the server may be down: Start will say so
  }
}

let wasActive = false;
try {
  wasActive = sessionStorage.getItem(ACTIVE_KEY) === "1";
} catch {}
if (wasActive) start();
else showStoredConversation();
renderStatus();
renderMemory();

// -- for tests and debugging -----------------------------------------------------------------------
window.novagate = {
  client, mic, player,
  start, stop, newConversation, forget: forgetHere, setRememberMode,
  get rememberMode() { return rememberMode; },
  get status() { return statusKey; },
  statusLog,
  get sent() { return client.sent; },
  transcript() {
    return [...ui.transcript.querySelectorAll("li.turn")].map((li) => ({
      itemId: li.dataset.itemId, role: li.dataset.role, text: li.querySelector(".bubble span").textContent,
      final: li.dataset.final === "true", interrupted: li.dataset.interrupted === "true",
    }));
  },
  toolCalls() {
    return [...ui.transcript.querySelectorAll("li.tool")].map((li) => {
      const details = li.querySelector("details");
      const pre = (k) => li.querySelector(`pre.tool-${k}`);
      return {
        callId: li.dataset.callId || null, itemId: li.dataset.itemId || null, name: li.dataset.name,
        status: li.dataset.status, label: li.querySelector(".tool-status").textContent,
        duration: li.querySelector(".tool-duration").textContent,
        spinner: !!li.querySelector(".tool-icon.spinner"), history: li.classList.contains("history"),
        details: details ? { open: details.open, summary: details.querySelector("summary").textContent } : null,
        arguments: pre("arguments") ? pre("arguments").textContent : null,
        result: pre("result") ? pre("result").textContent : null,
      };
    });
  },
  stats() {
    return {
      status: statusKey, connection: client.state, serverStatus: client.serverStatus, active, micOn,
      conversationId: client.conversationId, pendingReceipts: Object.keys(client.pendingReceipts).length,
      resumed: client.session ? client.session.resumed : null,
      historyLength: client.session ? client.session.history_length : null,
      counters: { ...client.counters },
      mic: { frames: mic.frames, level: mic.level, deviceRate: mic.deviceRate, running: mic.running },
      player: { ...player.stats, playedMs: player.playedMs, running: player.running, lastFlush: player.lastFlush,
                flushes: player.flushes.slice() },
      codec: { ...client.codecs, offered: { input: client.options.inputCodec, output: client.options.outputCodec },
               confirmed: client.session && client.session.audio ? { ...client.session.audio } : null,
               reason: codecReason },
      bytesUp: client.counters.bytesSent, bytesDown: client.counters.bytesReceived,
      kbpsUp: rates.up, kbpsDown: rates.down,
      opus: {
        encoder: { packets: encoder.packets, bytes: encoder.bytes, dropped: encoder.dropped, errors: encoder.errors },
        decoder: player.decoder ? { packets: player.decoder.packets, bytes: player.decoder.bytes,
                                    dropped: player.decoder.dropped, errors: player.decoder.errors } : null,
      },
    };
  },
};
