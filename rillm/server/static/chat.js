// The chat page: conversations kept in this browser (localStorage, one key each), answers
// streamed from any OpenAI-compatible /v1/chat/completions and rendered as markdown by the
// vendored marked, sanitized by the vendored DOMPurify. No build step: this file is served as is.
"use strict";

const $ = (id) => document.getElementById(id);
const CONVERSATION_KEY = "rillm-chat:";   // + id: one conversation
const SETTINGS_KEY = "rillm-settings";    // everything in the settings panel but the API key
const THEME_KEY = "rillm-theme";
const API_KEY = "rillm-api-key";          // sessionStorage, this tab only: {base, key}
const NEW_TITLE = "New chat";
const SAMPLING = [                         // [input id, request field, parse]
  ["temperature", "temperature", Number], ["top-p", "top_p", Number],
  ["top-k", "top_k", (v) => parseInt(v, 10)], ["min-p", "min_p", Number],
  ["max-tokens", "max_tokens", (v) => parseInt(v, 10)], ["seed", "seed", (v) => parseInt(v, 10)],
];
const SAVED_FIELDS = ["base", "system", "extra", ...SAMPLING.map(([id]) => id)];

// Model output is untrusted: HTML it writes is shown as text (escapeHtml), and what marked makes
// of the rest is sanitized anyway: no scripts, handlers, styles, forms or media (an image URL is
// a request the model chose, a way to send a conversation elsewhere). The page's CSP forbids
// inline script too, a third wall.
const PURIFY = {
  USE_PROFILES: { html: true },
  FORBID_TAGS: ["img", "picture", "video", "audio", "source", "track", "iframe", "object", "embed",
                "style", "link", "meta", "base", "form", "input", "button", "textarea", "select"],
  FORBID_ATTR: ["style", "srcset", "action", "formaction", "background"],
};

const state = {
  conversations: new Map(),  // id -> {id, title, created, updated, messages}
  current: null,
  run: null,                 // the answer streaming now: {conv, message, view, controller}
  model: "",
  renaming: false,
  savedBase: "",             // the server saved in settings; a ?base= one is used, not saved
  baseFromUrl: false,
};

// ---- storage ---------------------------------------------------------------------------------

function newId() {
  return Date.now().toString(36) + Math.random().toString(36).slice(2, 10);
}

function isConversation(value) {
  return value && typeof value.id === "string" && typeof value.title === "string" &&
    Array.isArray(value.messages) && value.messages.every(
      (m) => m && (m.role === "user" || m.role === "assistant") && typeof m.content === "string");
}

function loadConversations() {
  for (let i = 0; i < localStorage.length; i++) {
    const key = localStorage.key(i);
    if (!key.startsWith(CONVERSATION_KEY)) continue;
    try {
      const conv = JSON.parse(localStorage.getItem(key));
      if (isConversation(conv)) state.conversations.set(conv.id, conv);
    } catch { /* a damaged entry is skipped, not fatal */ }
  }
}

function save(conv) {
  if (conv.deleted) return;  // an answer that ends after its conversation was deleted
  conv.updated = Date.now();
  state.conversations.set(conv.id, conv);
  try {
    localStorage.setItem(CONVERSATION_KEY + conv.id, JSON.stringify(conv));
  } catch (err) {
    showStatus("This conversation is not saved: the browser's storage is full (" + err.name + ").");
  }
}

function forget(conv) {
  conv.deleted = true;
  state.conversations.delete(conv.id);
  localStorage.removeItem(CONVERSATION_KEY + conv.id);
}

function byRecency() {
  return [...state.conversations.values()].sort((a, b) => b.updated - a.updated);
}

function loadSettings() {
  let saved = {};
  try { saved = JSON.parse(localStorage.getItem(SETTINGS_KEY)) || {}; } catch { /* defaults */ }
  for (const id of SAVED_FIELDS) if (typeof saved[id] === "string") $(id).value = saved[id];
  state.model = typeof saved.model === "string" ? saved.model : "";
  state.savedBase = $("base").value;
  const base = new URLSearchParams(location.search).get("base");
  if (base) {
    $("base").value = base;
    state.baseFromUrl = true;
  }
  loadKey();
  showServer();
}

function saveSettings() {
  const values = { model: state.model };
  for (const id of SAVED_FIELDS) values[id] = $(id).value;
  if (state.baseFromUrl) values.base = state.savedBase;  // a link's server is not kept
  localStorage.setItem(SETTINGS_KEY, JSON.stringify(values));
}

// The key goes only to the server it was typed for: a link with another ?base= does not get it.
function loadKey() {
  let stored = null;
  try { stored = JSON.parse(sessionStorage.getItem(API_KEY)); } catch { /* none */ }
  $("api-key").value = stored && stored.base === baseUrl() ? stored.key : "";
}

function saveKey() {
  sessionStorage.setItem(API_KEY, JSON.stringify({ base: baseUrl(), key: $("api-key").value }));
}

function showServer() {
  const base = baseUrl();
  let label = "";
  try { label = base ? new URL(base).host : ""; } catch { label = base; }
  $("server").textContent = label;
  $("server").title = base;
}

// ---- the server ------------------------------------------------------------------------------

function baseUrl() {
  return $("base").value.trim().replace(/\/+$/, "").replace(/\/v1$/, "");
}

function apiUrl(path) {
  // Empty: this server, relative to the page (it may sit behind a proxy under a prefix).
  const base = baseUrl();
  return base ? base + "/v1/" + path : "v1/" + path;
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function errorMessage(response) {
  const body = await response.json().catch(() => null);
  const error = body && body.error;
  return (error && (error.message || error)) || response.status + " " + response.statusText;
}

async function loadModels() {
  try {
    const response = await fetch(apiUrl("models"), { headers: headers() });
    if (!response.ok) throw new Error(await errorMessage(response));
    const body = await response.json();
    const select = $("model");
    select.replaceChildren(...body.data.map((m) => new Option(m.id, m.id)));
    if (body.data.some((m) => m.id === state.model)) select.value = state.model;
    showStatus("");
  } catch (err) {
    $("model").replaceChildren();
    showStatus("models: " + err.message);
  }
}

function requestBody(history) {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  for (const m of history) {
    if (m.role === "assistant" && !m.content) continue;  // a failed or empty answer
    messages.push({ role: m.role, content: m.content });
  }
  const body = { model: $("model").value || undefined, messages, stream: true,
                 stream_options: { include_usage: true } };
  for (const [id, field, parse] of SAMPLING) {
    const value = $(id).value.trim();
    if (value !== "") body[field] = parse(value);
  }
  const extra = $("extra").value.trim();
  if (extra) {
    let fields;
    try { fields = JSON.parse(extra); } catch (err) { throw new Error("extra fields: " + err.message); }
    if (!fields || typeof fields !== "object" || Array.isArray(fields)) {
      throw new Error("extra fields: a JSON object is needed");
    }
    Object.assign(body, fields, { stream: true });
  }
  return body;
}

// Reads a text/event-stream body and calls onData with each `data:` payload, until the body
// ends or onData returns true (then the connection is let go).
async function readEvents(response, onData) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "", carry = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    let text = carry + decoder.decode(value, { stream: true });
    carry = text.endsWith("\r") ? "\r" : "";  // a CRLF may be split between two reads
    if (carry) text = text.slice(0, -1);
    buffer += text.replace(/\r\n?/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = block.split("\n").filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(line.startsWith("data: ") ? 6 : 5)).join("\n");
      if (data && onData(data)) {
        await reader.cancel();
        return;
      }
    }
  }
}

// ---- rendering -------------------------------------------------------------------------------

// HTML the model writes is shown as text, as it wrote it (marked would pass it through).
function escapeHtml(text) {
  const entities = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
  return text.replace(/[&<>"']/g, (c) => entities[c]);
}

function renderMarkdown(element, text) {
  if (!window.marked || !window.DOMPurify) {  // the vendored scripts did not load: plain text
    element.textContent = text;
    return;
  }
  element.innerHTML = DOMPurify.sanitize(marked.parse(text, { gfm: true, async: false }), PURIFY);
  for (const pre of element.querySelectorAll("pre")) {
    const code = pre.querySelector("code");
    const language = code && [...code.classList].find((c) => c.startsWith("language-"));
    const box = document.createElement("div");
    box.className = "code";
    const bar = document.createElement("div");
    bar.className = "code-bar";
    const label = document.createElement("span");
    label.textContent = language ? language.slice("language-".length) : "";
    const copy = button("Copy", "copy-code", () => copyText((code || pre).textContent, copy));
    bar.append(label, copy);
    pre.replaceWith(box);
    box.append(bar, pre);
  }
}

function button(text, className, onClick, label) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = className;
  b.textContent = text;
  if (label) b.setAttribute("aria-label", label);
  b.addEventListener("click", onClick);
  return b;
}

async function copyText(text, source) {
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    // No async clipboard (plain http on a LAN address is not a secure context).
    const area = document.createElement("textarea");
    area.value = text;
    document.body.appendChild(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  const before = source.textContent;
  source.textContent = "Copied";
  setTimeout(() => { source.textContent = before; }, 1200);
}

function formatStats(stats) {
  if (!stats) return "";
  const parts = [];
  if (stats.stopped) parts.push("stopped");
  if (stats.ttft !== undefined) parts.push(`first token ${stats.ttft.toFixed(2)} s`);
  const about = stats.estimated ? "≈" : "";  // counted in stream chunks: no usage came
  if (stats.rate) parts.push(`${about}${stats.rate.toFixed(1)} tok/s`);
  if (stats.tokens !== undefined) parts.push(`${about}${stats.tokens} tokens`);
  if (stats.finish) parts.push(stats.finish);
  return parts.join(" · ");
}

function messageView(message, index) {
  const view = document.createElement("div");
  view.className = "msg " + message.role;
  view.dataset.index = index;
  const content = document.createElement("div");
  content.className = "content";
  const actions = document.createElement("div");
  actions.className = "actions";
  const copy = button("Copy", "copy", () => copyText(message.content, copy), "Copy message");
  if (message.role === "user") {
    view.append(content, actions);
    actions.append(copy, button("Edit", "edit", () => editMessage(view, message), "Edit and resend"));
  } else {
    const reasoning = document.createElement("details");
    reasoning.className = "reasoning";
    const summary = document.createElement("summary");
    summary.textContent = "Reasoning";
    const thought = document.createElement("div");
    thought.className = "thought";
    reasoning.append(summary, thought);
    const stats = document.createElement("div");
    stats.className = "stats";
    const error = document.createElement("div");
    error.className = "error";
    view.append(reasoning, content, error, stats, actions);
    actions.append(copy, button("Regenerate", "regenerate", regenerate, "Regenerate this answer"));
  }
  fillView(view, message);
  return view;
}

function fillView(view, message) {
  const content = view.querySelector(".content");
  if (message.role === "user") {
    content.textContent = message.content;
    return;
  }
  renderMarkdown(content, message.content);
  const reasoning = view.querySelector(".reasoning");
  reasoning.hidden = !message.reasoning;
  reasoning.querySelector(".thought").textContent = message.reasoning || "";
  view.querySelector(".error").textContent = message.error ? "error: " + message.error : "";
  view.querySelector(".stats").textContent = formatStats(message.stats);
}

function scheduleFill(view, message) {
  if (view.pendingFrame) return;
  view.pendingFrame = requestAnimationFrame(() => {
    view.pendingFrame = 0;
    const messages = $("messages");
    const atBottom = messages.scrollHeight - messages.scrollTop - messages.clientHeight < 80;
    fillView(view, message);
    if (atBottom) messages.scrollTop = messages.scrollHeight;
  });
}

function renderConversation() {
  const conv = state.current;
  const messages = $("messages");
  messages.replaceChildren();
  $("title").textContent = conv ? conv.title : NEW_TITLE;
  document.title = (conv && conv.messages.length ? conv.title + " · " : "") + "rillm chat";
  if (!conv || !conv.messages.length) {
    const empty = document.createElement("p");
    empty.className = "empty";
    empty.textContent = "Ask anything.";
    messages.append(empty);
  } else {
    // The answer streaming now keeps its view: the stream goes on writing into it.
    conv.messages.forEach((m, i) => messages.append(
      state.run && state.run.message === m ? state.run.view : messageView(m, i)));
  }
  messages.scrollTop = messages.scrollHeight;
  updateControls();
}

function renderList() {
  const list = $("conversations");
  if (state.renaming) return;  // a name is being typed; the list is drawn when it is done
  list.replaceChildren();
  for (const conv of byRecency()) {
    const item = document.createElement("li");
    item.className = "conversation" + (conv === state.current ? " current" : "");
    item.dataset.id = conv.id;
    const open = button(conv.title, "open", () => switchTo(conv));
    open.title = conv.title;
    item.append(open,
      button("✎", "rename icon", () => rename(item, conv), "Rename"),
      button("✕", "delete icon", () => remove(conv), "Delete"));
    list.append(item);
  }
}

function updateControls() {
  const busy = state.run !== null;
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  $("messages").setAttribute("aria-busy", String(busy));
  // Regenerate belongs to the last answer only; nothing is edited under a running answer.
  const views = $("messages").querySelectorAll(".msg");
  views.forEach((view, i) => {
    const regenerate = view.querySelector(".regenerate");
    if (regenerate) regenerate.hidden = busy || i !== views.length - 1;
    const edit = view.querySelector(".edit");
    if (edit) edit.hidden = busy;
  });
}

function showStatus(text) {
  $("status").textContent = text;
}

// ---- conversations ---------------------------------------------------------------------------

function switchTo(conv) {
  if (conv && conv === state.current) {  // e.g. a tap to close the drawer on a phone
    closeDrawers();
    return;
  }
  stop();
  state.current = conv;
  closeDrawers();
  renderConversation();
  renderList();
}

function newConversation() {
  switchTo(null);
  $("input").focus();
}

function rename(item, conv) {
  const input = document.createElement("input");
  input.value = conv.title;
  input.setAttribute("aria-label", "Conversation name");
  item.replaceChildren(input);
  input.focus();
  input.select();
  state.renaming = true;
  let done = false;
  const finish = (keep) => {
    if (done) return;
    done = true;
    state.renaming = false;
    const title = input.value.trim();
    if (keep && title) {
      conv.title = title.slice(0, 200);
      conv.named = true;  // kept when the first question is edited
      save(conv);
    }
    renderList();
    if (conv === state.current) renderConversation();
  };
  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter") finish(true);
    if (event.key === "Escape") {
      event.stopPropagation();  // not a Stop
      finish(false);
    }
  });
  input.addEventListener("blur", () => finish(true));
}

function remove(conv) {
  if (!confirm(`Delete “${conv.title}”?`)) return;
  if (state.run && state.run.conv === conv) stop();
  forget(conv);
  if (conv === state.current) state.current = byRecency()[0] || null;
  renderConversation();
  renderList();
}

function titleFrom(text) {
  const line = text.replace(/\s+/g, " ").trim();
  return line.length > 48 ? line.slice(0, 47) + "…" : line;
}

function send(text) {
  if (!state.current) state.current = { id: newId(), title: NEW_TITLE, created: Date.now(),
                                        updated: Date.now(), messages: [] };
  const conv = state.current;
  if (!conv.messages.length) conv.title = titleFrom(text);
  conv.messages.push({ role: "user", content: text });
  save(conv);
  renderConversation();
  renderList();
  generate(conv);
}

function regenerate() {
  const conv = state.current;
  if (!conv || state.run) return;
  if (conv.messages.length && conv.messages[conv.messages.length - 1].role === "assistant") {
    conv.messages.pop();
  }
  if (!conv.messages.length) return;
  save(conv);
  renderConversation();
  generate(conv);
}

function editMessage(view, message) {
  if (state.run) return;
  const conv = state.current;
  const index = conv.messages.indexOf(message);
  const box = document.createElement("textarea");
  box.className = "edit-box";
  box.value = message.content;
  const actions = document.createElement("div");
  actions.className = "actions";
  actions.append(
    button("Cancel", "edit-cancel", () => renderConversation()),
    button("Send", "edit-send", () => {
      const text = box.value.trim();
      if (!text || state.run) return;
      conv.messages.splice(index);  // the edited question and everything after it
      if (index === 0 && !conv.named) conv.title = titleFrom(text);
      conv.messages.push({ role: "user", content: text });
      save(conv);
      renderConversation();
      renderList();
      generate(conv);
    }));
  view.replaceChildren(box, actions);
  box.focus();
}

// ---- streaming an answer ---------------------------------------------------------------------

async function generate(conv) {
  const message = { role: "assistant", content: "", reasoning: "" };
  const history = conv.messages.slice();
  conv.messages.push(message);
  const view = messageView(message, conv.messages.length - 1);
  view.classList.add("streaming");
  const empty = $("messages").querySelector(".empty");
  if (empty) empty.remove();
  $("messages").append(view);
  $("messages").scrollTop = $("messages").scrollHeight;
  const run = { conv, message, view, controller: new AbortController() };
  state.run = run;
  updateControls();

  const started = performance.now();
  let firstAt = null, usage = null, finish = null, pieces = 0, savedAt = started;
  const stats = () => {
    const now = performance.now();
    const ttft = firstAt === null ? undefined : (firstAt - started) / 1000;
    const tokens = usage ? usage.completion_tokens : pieces;
    const seconds = firstAt === null ? 0 : (now - firstAt) / 1000;
    const rate = seconds > 0 && tokens > 1 ? (tokens - 1) / seconds : 0;
    return { ttft, rate, tokens, finish: finish || undefined, estimated: !usage || undefined };
  };
  try {
    const response = await fetch(apiUrl("chat/completions"), {
      method: "POST", headers: headers(), signal: run.controller.signal,
      body: JSON.stringify(requestBody(history)),
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    await readEvents(response, (data) => {
      if (data === "[DONE]") return true;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message || String(chunk.error));
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        const delta = choice.delta || {};
        const thought = delta.reasoning || delta.reasoning_content;
        if (thought) message.reasoning += thought;
        if (delta.content) message.content += delta.content;
        const calls = delta.tool_calls || [];
        for (const call of calls) {
          const fn = call.function || {};
          message.content += (fn.name ? `\n\n\`${fn.name}\` ` : "") + (fn.arguments || "");
        }
        if (thought || delta.content || calls.length) {
          pieces += 1;
          if (firstAt === null) firstAt = performance.now();
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
      message.stats = stats();
      scheduleFill(run.view, message);
      if (performance.now() - savedAt > 2000) {  // a reload mid-answer keeps most of it
        savedAt = performance.now();
        save(conv);
      }
    });
    message.stats = stats();
  } catch (err) {
    if (err.name === "AbortError") {
      message.stats = { stopped: true, ...stats() };
    } else {
      run.controller.abort();  // a bad event: let the server know the answer is not wanted
      message.error = err.message;
      message.stats = undefined;
    }
  } finally {
    if (state.run === run) state.run = null;
    save(conv);
    const view = run.view;
    if (view.pendingFrame) cancelAnimationFrame(view.pendingFrame);
    view.pendingFrame = 0;
    view.classList.remove("streaming");
    try {
      fillView(view, message);
    } finally {
      renderList();
      updateControls();
    }
  }
}

function stop() {
  // Aborting the fetch closes the connection; the server aborts the request and frees its KV
  // blocks. The partial answer stays in the conversation.
  if (state.run) state.run.controller.abort();
}

// ---- chrome: theme, drawers, settings ---------------------------------------------------------

function applyTheme() {
  const chosen = localStorage.getItem(THEME_KEY);
  const dark = chosen ? chosen === "dark" : matchMedia("(prefers-color-scheme: dark)").matches;
  document.documentElement.dataset.theme = dark ? "dark" : "light";
}

function closeDrawers() {
  document.body.classList.remove("show-sidebar");
  $("menu").setAttribute("aria-expanded", "false");
  $("scrim").hidden = !narrow() || $("settings").hidden;
}

function narrow() {
  return matchMedia("(max-width: 720px)").matches;
}

function toggleSettings(open) {
  $("settings").hidden = !open;
  $("settings-toggle").setAttribute("aria-expanded", String(open));
}

// Another tab changed or deleted a conversation.
function onStorage(event) {
  if (!event.key || !event.key.startsWith(CONVERSATION_KEY)) return;
  const id = event.key.slice(CONVERSATION_KEY.length);
  const mine = state.conversations.get(id);
  if (event.newValue === null) {
    if (!mine) return;
    if (state.run && state.run.conv === mine) stop();
    mine.deleted = true;
    state.conversations.delete(id);
    if (state.current === mine) state.current = byRecency()[0] || null;
  } else {
    let conv = null;
    try { conv = JSON.parse(event.newValue); } catch { return; }
    if (!isConversation(conv) || (state.run && state.run.conv === mine)) return;
    state.conversations.set(id, conv);
    if (state.current === mine) state.current = conv;
  }
  if (!state.run || state.run.conv !== state.current) renderConversation();
  renderList();
}

function start() {
  if (window.marked) marked.use({ renderer: { html: (token) => escapeHtml(token.text) } });
  if (window.DOMPurify) DOMPurify.addHook("afterSanitizeAttributes", (node) => {
    if (node.tagName === "A") {
      node.setAttribute("target", "_blank");
      node.setAttribute("rel", "noopener noreferrer nofollow");
    }
  });
  applyTheme();
  matchMedia("(prefers-color-scheme: dark)").addEventListener("change", applyTheme);
  loadSettings();
  loadConversations();
  state.current = byRecency()[0] || null;
  renderConversation();
  renderList();

  $("form").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("input").value.trim();
    if (!text || state.run) return;
    $("input").value = "";
    send(text);
  });
  $("input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("form").requestSubmit();
    }
  });
  document.addEventListener("keydown", (event) => {
    const target = event.target;
    const typing = target !== $("input") && target.matches("input, textarea, select");
    if (event.key === "Escape" && !event.isComposing && !typing) stop();
  });
  window.addEventListener("storage", onStorage);
  window.addEventListener("pagehide", () => { if (state.run) save(state.run.conv); });
  $("stop").addEventListener("click", stop);
  $("new-chat").addEventListener("click", newConversation);
  $("theme").addEventListener("click", () => {
    localStorage.setItem(THEME_KEY, document.documentElement.dataset.theme === "dark" ? "light" : "dark");
    applyTheme();
  });
  $("menu").addEventListener("click", () => {
    document.body.classList.add("show-sidebar");
    $("menu").setAttribute("aria-expanded", "true");
    $("scrim").hidden = false;
  });
  $("scrim").addEventListener("click", () => { toggleSettings(false); closeDrawers(); });
  $("settings-toggle").addEventListener("click", () => {
    toggleSettings($("settings").hidden);
    $("scrim").hidden = !narrow() || $("settings").hidden;
  });
  $("settings").addEventListener("submit", (event) => event.preventDefault());
  $("settings-close").addEventListener("click", () => { toggleSettings(false); closeDrawers(); });
  $("model").addEventListener("change", () => { state.model = $("model").value; saveSettings(); });
  for (const id of SAVED_FIELDS) if (id !== "base") $(id).addEventListener("change", saveSettings);
  $("base").addEventListener("change", () => {
    state.baseFromUrl = false;  // typed by the user: kept
    saveSettings();
    loadKey();
    showServer();
    loadModels();
  });
  $("api-key").addEventListener("change", () => {
    saveKey();
    loadModels();
  });
  loadModels();
}

start();
