// The page: buttons, transcript, status line, notices. Everything about the protocol lives in
// novagate-client.js and everything about audio in audio/; this file only wires them to the DOM.

import { NovagateClient, browserStorage } from "./novagate-client.js";
import { Microphone, Player } from "./audio/audio-io.js";
import { MODE_KEY, prepareStorage, readMode, storageFor, switchMode } from "./remember.js";

const $ = (id) => document.getElementById(id);
const ui = {
  status: $("status"), statusText: $("status-text"), recovery: $("recovery"), alert: $("alert"),
  alertText: $("alert-text"), alertAction: $("alert-action"), sound: $("sound"), transcript: $("transcript"),
  empty: $("empty"), conversation: $("conversation"), mic: $("mic"), micLabel: $("mic-label"), level: $("level"),
  form: $("text-form"), say: $("say"), send: $("send"), newConv: $("new"), announce: $("announce"),
  memory: $("memory"), memoryText: $("memory-text"), tabOnly: $("tab-only"), forget: $("forget"),
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
const mic = new Microphone({ targetRate: 16000, frameMs: 20, onframe: (pcm) => client.sendAudio(pcm) });
client.attachPlayer(player);

let active = false; // the user wants the conversation running
let micOn = false;
let statusKey = "idle";
const statusLog = []; // every status the line showed, with times: for tests and debugging
let lastReconnect = null;
let interruptedItems = new Set();
const items = new Map(); // item_id -> {li, role, final}
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
  ui.forget.disabled = !client.remembers && items.size === 0 && ui.recovery.hidden;
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

function renderHistory(history, total, note) {
  clearTranscript();
  if (total > history.length) {
    const li = document.createElement("li");
    li.className = "divider";
    li.textContent = `${total - history.length} earlier turns not shown`;
    ui.transcript.append(li);
  }
  for (const h of history) {
    setText(entry(h.item_id, h.role, { history: true }), h.text, { final: true, interrupted: h.interrupted });
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
for (const type of ["state", "ready", "updated", "transcript", "saved", "ended"]) {
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
      (client.remembers || items.size)) {
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
    };
  },
};
