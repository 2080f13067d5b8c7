// The chat page: EventSource for the room (the browser reconnects and sends
// Last-Event-ID itself; the server resumes right after it, so nothing here
// de-duplicates), fetch for sends, typing and "load earlier". Message text is
// only ever set with textContent: never parsed as HTML.
"use strict";

const params = new URLSearchParams(location.search);
const room = params.get("room") || "lobby";
const me = params.get("name") || "anon";
const base = "/rooms/" + encodeURIComponent(room);

const list = document.getElementById("messages");
const earlier = document.getElementById("earlier");
const statusEl = document.getElementById("status");
const typingEl = document.getElementById("typing");
const scroll = document.getElementById("scroll");
document.getElementById("room").textContent = room;
document.getElementById("me").textContent = me;

let oldest = null; // lowest message id shown
const typers = new Map(); // name -> timer

function setStatus(state, label) {
  statusEl.dataset.state = state;
  statusEl.textContent = label;
  document.body.dataset.state = state;
}

function render(msg) {
  const el = document.createElement("div");
  el.className = "msg";
  el.dataset.id = String(msg.id);
  const id = document.createElement("span");
  id.className = "id";
  id.textContent = "#" + msg.id;
  const name = document.createElement("span");
  name.className = "name";
  const text = document.createElement("span");
  text.className = "text";
  if (msg.body && typeof msg.body === "object") {
    name.textContent = String(msg.body.name ?? "");
    text.textContent = String(msg.body.text ?? "");
  } else {
    text.textContent = msg.redacted ? "(removed)" : JSON.stringify(msg.body);
  }
  el.append(id, name, text);
  return el;
}

function setOldest(id) {
  oldest = id;
  earlier.hidden = !(oldest > 1);
}

function append(msg) {
  const atBottom = scroll.scrollTop + scroll.clientHeight >= scroll.scrollHeight - 40;
  list.append(render(msg));
  if (oldest === null) setOldest(msg.id);
  if (atBottom) scroll.scrollTop = scroll.scrollHeight;
  const timer = typers.get(msg.body && msg.body.name);
  if (timer !== undefined) stopTyping(msg.body.name);
}

function showTypers() {
  const names = [...typers.keys()].filter((n) => n !== me);
  typingEl.textContent = names.length
    ? names.join(", ") + (names.length === 1 ? " is typing…" : " are typing…")
    : "";
}

function stopTyping(name) {
  clearTimeout(typers.get(name));
  typers.delete(name);
  showTypers();
}

function onEvent(ev) {
  const key = ev.key || "";
  if (key.startsWith("typing:")) {
    const name = key.slice("typing:".length);
    const age = (Date.now() - Date.parse(ev.created_at)) / 1000;
    const left = Math.max(0, (ev.ttl ?? 5) - Math.max(0, age));
    if (left <= 0) return;
    clearTimeout(typers.get(name));
    typers.set(name, setTimeout(() => stopTyping(name), left * 1000));
    showTypers();
  }
}

// Why a stream ended, for the eye; each tells the reader to reload.
const ENDED = {
  history_reset: "history was reset: reload",
  stream_deleted: "room was deleted: reload",
  cursor_ahead: "history was reset: reload",
  history_truncated: "history was trimmed: reload",
};

const source = new EventSource(base + "/events?last=50");
source.addEventListener("open", () => setStatus("live", "live"));
source.addEventListener("error", () => {
  if (source.readyState !== EventSource.CLOSED) {
    setStatus("reconnecting", "reconnecting…");
    return;
  }
  // The server refused the stream (a 4xx, e.g. a bad room name): EventSource does
  // not say why, the history route does (same room checks, JSON {"error"}).
  setStatus("ended", "stream refused");
  fetch(base + "/messages?limit=1")
    .then(async (r) => {
      const why = r.ok ? "HTTP error" : (await r.json().catch(() => ({}))).error;
      setStatus("ended", "stream refused: " + (why || "HTTP " + r.status));
    })
    .catch(() => {});
});
source.addEventListener("message", (e) => append(JSON.parse(e.data)));
source.addEventListener("event", (e) => onEvent(JSON.parse(e.data)));
source.addEventListener("status", (e) => {
  const s = JSON.parse(e.data);
  if (s.state === "ok") setStatus("live", "live");
  else setStatus("reconnecting", "store unreachable, reconnecting…");
});
source.addEventListener("end", (e) => {
  const end = JSON.parse(e.data);
  if (end.reason === "bus_closed") return; // the server is going away: let it reconnect
  source.close();
  setStatus("ended", ENDED[end.reason] || "stream ended: " + end.reason.replace(/_/g, " "));
});

earlier.addEventListener("click", async () => {
  if (!(oldest > 1)) return;
  earlier.disabled = true;
  try {
    const r = await fetch(base + "/messages?before=" + oldest + "&limit=50");
    if (!r.ok) throw new Error("HTTP " + r.status);
    const page = (await r.json()).messages;
    const frag = document.createDocumentFragment();
    for (const m of page) if (m.id < oldest) frag.append(render(m));
    list.prepend(frag);
    if (page.length) setOldest(Math.min(oldest, page[0].id));
    else setOldest(1);
  } catch (err) {
    console.error("load earlier failed", err);
  } finally {
    earlier.disabled = false;
  }
});

function newKey() {
  if (crypto.randomUUID) return crypto.randomUUID();
  return Date.now().toString(36) + Math.random().toString(36).slice(2);
}

let lastTyping = 0; // when this page last said it is typing (ms)

// Send with a per-message idempotency key; retry the same key on network errors
// and 5xx (a bounded number of times), so a retried send never doubles. Returns the
// last response, or throws the last network error.
async function send(text) {
  const body = JSON.stringify({ text, key: newKey(), name: me });
  for (let attempt = 0; ; attempt++) {
    try {
      const r = await fetch(base + "/messages", {
        method: "POST", headers: { "content-type": "application/json" }, body,
      });
      if (r.status < 500 || attempt >= 20) return r;
    } catch (err) {
      if (attempt >= 20) throw err;
    }
    await new Promise((ok) => setTimeout(ok, Math.min(2000, 100 * 2 ** attempt)));
  }
}
window.chatSend = send; // for tests and the console

document.getElementById("send").addEventListener("submit", async (e) => {
  e.preventDefault();
  const input = document.getElementById("text");
  const text = input.value;
  if (!text.trim()) return;
  input.value = "";
  lastTyping = 0; // the next keystroke says "typing" again
  let reason = null;
  try {
    const r = await send(text);
    if (!r.ok) reason = (await r.json().catch(() => ({}))).error || "HTTP " + r.status;
  } catch (err) {
    reason = "network error";
  }
  if (reason !== null) {
    alert("not sent: " + reason);
    if (!input.value) input.value = text; // keep what was typed, to send again
  }
});

document.getElementById("text").addEventListener("input", () => {
  const now = Date.now();
  if (now - lastTyping < 1500) return;
  lastTyping = now;
  fetch(base + "/typing", {
    method: "POST", headers: { "content-type": "application/json" },
    body: JSON.stringify({ name: me }),
  }).catch(() => {});
});
