// remember.js — where the page keeps the conversation (resume token, conversation id, unsaved
// receipts): "device" = localStorage (survives closing the browser; the default, as before) or
// "tab" = sessionStorage (this tab only: survives reloads, gone when the tab closes).
// The choice itself holds no secret and lives in localStorage. No DOM in here: node tests it.

export const MODE_KEY = "novagate.remember";

/** The chosen mode: "device" (default) or "tab". */
export function readMode(prefs) {
  try {
    return prefs.getItem(MODE_KEY) === "tab" ? "tab" : "device";
  } catch {
    return "device";
  }
}

/** Persist the choice ("device" is the default: its key is removed, so nothing is left behind). */
export function writeMode(prefs, mode) {
  try {
    if (mode === "tab") prefs.setItem(MODE_KEY, "tab");
    else prefs.removeItem(MODE_KEY);
  } catch {}
}

export function storageFor(mode, { local, session }) {
  return mode === "tab" ? session : local;
}

/**
 * On page load, before the client reads its storage: make the storage of `mode` the only one
 * holding the conversation under `key`, and return it.
 * - tab: anything in localStorage goes (the user chose to keep nothing on the device; it can only
 *   be a leftover, not this tab's conversation).
 * - device: this tab's conversation in sessionStorage (kept while the tab was in tab-only mode) is
 *   moved to localStorage if that holds none, and removed from sessionStorage.
 */
export function prepareStorage(mode, { local, session }, key) {
  const get = (s) => {
    try {
      return s.getItem(key);
    } catch {
      return null;
    }
  };
  const remove = (s) => {
    try {
      s.removeItem(key);
    } catch {}
  };
  if (mode === "tab") {
    remove(local);
    return session;
  }
  const tabs = get(session);
  if (tabs !== null) {
    if (get(local) === null) {
      try {
        local.setItem(key, tabs);
      } catch {}
    }
    remove(session);
  }
  return local;
}

/**
 * Switch a running client to `mode`: persist the choice, then move what the client holds to the
 * new storage and remove it from the old one (tab-only: nothing stays in localStorage).
 * The choice is written first, so that other tabs see it before the conversation entry changes.
 */
export function switchMode(client, mode, storages) {
  writeMode(storages.local, mode);
  client.setStorage(storageFor(mode, storages), { move: true });
  return mode;
}
