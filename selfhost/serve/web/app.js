// The selfhost chat page: conversations from the SQLite history (/ui/api), replies streamed by the
// server's ChatSession. Model output and history are untrusted: Markdown goes through DOMPurify,
// titles and user text are set as text, never as HTML.
import hljs from "./vendor/hljs/core.min.js";
import bash from "./vendor/hljs/languages/bash.min.js";
import c from "./vendor/hljs/languages/c.min.js";
import cpp from "./vendor/hljs/languages/cpp.min.js";
import diff from "./vendor/hljs/languages/diff.min.js";
import go from "./vendor/hljs/languages/go.min.js";
import java from "./vendor/hljs/languages/java.min.js";
import javascript from "./vendor/hljs/languages/javascript.min.js";
import json from "./vendor/hljs/languages/json.min.js";
import markdown from "./vendor/hljs/languages/markdown.min.js";
import python from "./vendor/hljs/languages/python.min.js";
import rust from "./vendor/hljs/languages/rust.min.js";
import shell from "./vendor/hljs/languages/shell.min.js";
import sql from "./vendor/hljs/languages/sql.min.js";
import typescript from "./vendor/hljs/languages/typescript.min.js";
import xml from "./vendor/hljs/languages/xml.min.js";
import yaml from "./vendor/hljs/languages/yaml.min.js";

const LANGS = { bash, c, cpp, diff, go, java, javascript, json, markdown, python, rust, shell, sql, typescript, xml, yaml };
for (const [name, lang] of Object.entries(LANGS)) hljs.registerLanguage(name, lang);

const $ = (id) => document.getElementById(id);
const state = {
  conv: null, // the open conversation's id (null: a new chat)
  messages: [],
  controller: null, // the reply in flight
  stats: new Map(), // message id -> usage of replies made in this page
  key: localStorage.getItem("selfhost.apiKey"),
};
window.__selfhost = { marks: {} }; // timings read by bench/web_ui.py

class ServerDown extends Error {}

// ------------------------------------------------------------------ HTTP
async function api(path, options = {}) {
  for (;;) {
    const headers = { ...(options.headers || {}) };
    if (options.body) headers["Content-Type"] = "application/json";
    if (state.key) headers.Authorization = `Bearer ${state.key}`;
    let response;
    try {
      response = await fetch(path, { ...options, headers });
    } catch (err) {
      if (err.name === "AbortError") throw err;
      throw new ServerDown("Cannot reach the selfhost server. Is `selfhost serve` still running?");
    }
    if (response.status !== 401) return response;
    const again = state.key ? "That API key was refused by the server. Try again:" : "";
    const key = await ask("This server needs an API key (selfhost serve --api-key).", {
      error: again, value: "", ok: "Use key", password: true,
    });
    if (key === null) throw new Error("No API key given: the server refuses requests without one.");
    state.key = key.trim();
    localStorage.setItem("selfhost.apiKey", state.key);
  }
}

async function errorText(response) {
  try {
    const body = await response.json();
    const err = body.error || {};
    if (err.code === "context_length_exceeded") return `Context full: ${err.message}`;
    return err.message || `HTTP ${response.status}`;
  } catch {
    return `The server answered HTTP ${response.status}.`;
  }
}

async function getJSON(path) {
  const response = await api(path);
  if (!response.ok) throw new Error(await errorText(response));
  return response.json();
}

function showError(message) {
  $("error-text").textContent = message;
  $("error").hidden = !message;
}

async function guarded(work) {
  try {
    showError("");
    return await work();
  } catch (err) {
    if (err.name !== "AbortError") showError(err.message || String(err));
  }
}

// ---------------------------------------------------------------- dialog
function ask(text, { value = null, error = "", ok = "OK", password = false } = {}) {
  const dialog = $("ask");
  $("ask-text").textContent = text;
  $("ask-error").textContent = error;
  const input = $("ask-input");
  input.hidden = value === null;
  input.type = password ? "password" : "text";
  input.value = value ?? "";
  $("ask-ok").textContent = ok;
  return new Promise((resolve) => {
    const finish = (result) => {
      $("ask-form").onsubmit = null;
      $("ask-cancel").onclick = null;
      dialog.onclose = null;
      if (dialog.open) dialog.close();
      resolve(result);
    };
    $("ask-form").onsubmit = (e) => { e.preventDefault(); finish(value === null ? true : input.value); };
    $("ask-cancel").onclick = () => finish(null);
    dialog.onclose = () => finish(null);
    dialog.showModal();
    (value === null ? $("ask-ok") : input).focus();
  });
}

// ------------------------------------------------------------- rendering
function splitThinking(text) {
  const m = text.match(/^\s*<think>([\s\S]*?)(?:<\/think>|$)/);
  return m ? [m[1].trim(), text.slice(m[0].length)] : ["", text];
}

function renderMarkdown(el, text) {
  const html = window.marked.parse(text, { gfm: true, breaks: true });
  el.innerHTML = window.DOMPurify.sanitize(html, { FORBID_TAGS: ["style", "form", "input"] });
  for (const a of el.querySelectorAll("a")) { a.target = "_blank"; a.rel = "noopener noreferrer"; }
  for (const code of el.querySelectorAll("pre > code")) {
    const lang = (code.className.match(/language-([\w-]+)/) || [])[1];
    if (lang && hljs.getLanguage(lang)) {
      code.innerHTML = hljs.highlight(code.textContent, { language: lang, ignoreIllegals: true }).value;
      code.classList.add("hljs");
    }
    const copy = document.createElement("button");
    copy.type = "button";
    copy.className = "copy";
    copy.textContent = "Copy";
    copy.onclick = () => copyText(code.textContent, copy);
    code.parentElement.append(copy);
  }
}

async function copyText(text, button) {
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    const area = Object.assign(document.createElement("textarea"), { value: text });
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  button.textContent = "Copied";
  setTimeout(() => { button.textContent = "Copy"; }, 1200);
}

function fillReply(node, text, reasoning) {
  const [thought, answer] = splitThinking(text);
  const thinking = [reasoning, thought].filter(Boolean).join("\n");
  node.querySelector(".thinking").hidden = !thinking;
  node.querySelector(".thinking pre").textContent = thinking;
  renderMarkdown(node.querySelector(".content"), answer);
}

function statsText(message, usage) {
  const parts = [];
  if (usage) {
    parts.push(`${usage.generated_tokens} tokens`);
    if (usage.generation_tokens_per_s) parts.push(`${usage.generation_tokens_per_s.toFixed(1)} tok/s`);
    parts.push(`first token ${usage.time_to_first_token_s.toFixed(2)} s`);
    parts.push(`prompt ${usage.prompt_tokens} tokens`);
  } else if (message.tokens) {
    parts.push(`${message.tokens} tokens`);
  }
  const why = { interrupted: "stopped", length: "max tokens reached", context: "context full" }[message.finish_reason];
  if (why) parts.push(why);
  return parts.join(" · ");
}

function messageNode(role) {
  const node = document.createElement("article");
  node.className = `msg ${role}`;
  if (role === "assistant") {
    node.innerHTML = '<details class="thinking" hidden><summary>Thinking</summary><pre></pre></details>'
      + '<div class="content"></div><div class="meta"><span class="stats"></span></div>';
  } else {
    node.innerHTML = '<div class="content"></div><div class="meta"></div>';
  }
  return node;
}

function renderMessages() {
  const box = $("messages");
  box.replaceChildren();
  const lastUser = state.messages.findLastIndex((m) => m.role === "user");
  state.messages.forEach((m, i) => {
    if (m.role === "system") return;
    const node = messageNode(m.role);
    if (m.role === "assistant") {
      fillReply(node, m.content, m.reasoning || "");
      node.querySelector(".stats").textContent = statsText(m, state.stats.get(m.id));
      if (i === state.messages.length - 1) addAction(node, "Regenerate", () => guarded(() => runTurn("regenerate")));
    } else {
      node.querySelector(".content").textContent = m.content;
      if (i === lastUser) addAction(node, "Edit", () => editLast(node, m.content));
    }
    box.append(node);
  });
  box.scrollTop = box.scrollHeight;
}

function addAction(node, label, onclick) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = `action ${label.toLowerCase()}`;
  b.textContent = label;
  b.onclick = () => { if (!state.controller) onclick(); };
  node.querySelector(".meta").append(b);
}

function editLast(node, text) {
  const area = Object.assign(document.createElement("textarea"), { value: text, className: "edit-box", rows: 3 });
  const content = node.querySelector(".content");
  content.replaceChildren(area);
  const meta = node.querySelector(".meta");
  meta.replaceChildren();
  addAction(node, "Cancel", renderMessages);
  addAction(node, "Send", () => { if (area.value.trim()) guarded(() => runTurn("edit", area.value)); });
  area.onkeydown = (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); meta.querySelector(".send").click(); }
  };
  area.focus();
}

// ----------------------------------------------------- settings per chat
const FIELDS = ["temperature", "top_p", "max_tokens", "seed"];
const settingsKey = (id) => `selfhost.settings.${id ?? "new"}`;

function loadSettings(id, system) {
  const saved = JSON.parse(localStorage.getItem(settingsKey(id)) || "{}");
  for (const f of FIELDS) $(f).value = saved[f] ?? "";
  $("json-mode").checked = !!saved.json;
  $("schema").value = saved.schema || '{"type": "object"}';
  $("schema-box").hidden = !saved.json;
  $("system").value = system || "";
}

function saveSettings(id) {
  const data = { json: $("json-mode").checked, schema: $("schema").value };
  for (const f of FIELDS) data[f] = $(f).value;
  localStorage.setItem(settingsKey(id), JSON.stringify(data));
}

function requestSettings() {
  const num = (id) => ($(id).value === "" ? null : Number($(id).value));
  const sampling = { temperature: num("temperature"), top_p: num("top_p"), max_tokens: num("max_tokens"), seed: num("seed") };
  let schema = null;
  if ($("json-mode").checked) {
    try {
      schema = JSON.parse($("schema").value);
    } catch (err) {
      throw new Error(`The JSON schema is not valid JSON: ${err.message}`);
    }
  }
  return { sampling, json_schema: schema, system: $("system").value };
}

// ----------------------------------------------------------------- chat
async function runTurn(action, content = null) {
  const settings = requestSettings();
  if (action === "send") state.messages.push({ role: "user", content });
  if (action === "edit") {
    if (state.messages.at(-1)?.role === "assistant") state.messages.pop();
    state.messages.at(-1).content = content;
  }
  if (action === "regenerate" && state.messages.at(-1)?.role === "assistant") state.messages.pop();
  renderMessages();
  const node = messageNode("assistant");
  node.classList.add("streaming");
  $("messages").append(node);
  const body = { conversation_id: state.conv, action, content, model: $("model").value || null, ...settings };
  state.controller = new AbortController();
  setBusy(true);
  window.__selfhost.marks = { send: performance.now() };
  let done = null;
  try {
    const response = await api("/ui/api/chat", {
      method: "POST", body: JSON.stringify(body), signal: state.controller.signal,
    });
    if (!response.ok) throw new Error(await errorText(response));
    done = await readReply(response, node);
  } catch (err) {
    if (err.name !== "AbortError") showError(err.message || String(err));
  }
  if (done) state.stats.set(done.message.id, done.usage);
  if (done) window.__selfhost.marks.usage = done.usage;
  if (done?.schema_valid === false) showError(`The reply does not match the schema: ${done.schema_error}`);
  if (done?.unsaved) showError(done.unsaved);
  if (state.conv === null) { // refused before the conversation existed: the message goes back
    if (action === "send") $("input").value = content;
    state.messages = [];
    renderMessages();
  }
  try {
    await refresh(!done); // busy until the history has the turn (a stopped reply lands a moment later)
  } finally {
    state.controller = null;
    setBusy(false);
  }
}

async function readReply(response, node) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "", text = "", reasoning = "", pending = false, done = null;
  const paint = () => {
    pending = false;
    fillReply(node, text, reasoning);
    $("messages").scrollTop = $("messages").scrollHeight;
    if (!window.__selfhost.marks.firstToken && text) window.__selfhost.marks.firstToken = performance.now();
  };
  for (;;) {
    const { value, done: ended } = await reader.read();
    if (ended) break;
    buffer += value;
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
      if (!data) continue;
      const event = JSON.parse(data);
      if (event.type === "start") {
        if (state.conv === null) {
          localStorage.setItem(settingsKey(event.conversation_id), localStorage.getItem(settingsKey(null)) || "{}");
          localStorage.removeItem(settingsKey(null));
        }
        state.conv = event.conversation_id;
        listConversations();
      } else if (event.type === "delta" || event.type === "reasoning") {
        if (event.type === "delta") text += event.content; else reasoning += event.content;
        if (!pending) { pending = true; requestAnimationFrame(paint); }
      } else if (event.type === "done") {
        done = event;
      } else if (event.type === "error") {
        throw new Error(event.message);
      }
    }
  }
  return done;
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  document.body.classList.toggle("busy", busy);
}

function stop() {
  if (state.controller) state.controller.abort();
}

// After a turn: the history is the truth (a stopped reply is recorded a moment after the stop).
async function refresh(stopped) {
  if (state.conv === null) return;
  for (let i = 0; i < 20; i++) {
    const conv = await guarded(() => getJSON(`/ui/api/conversations/${state.conv}`));
    if (!conv) return;
    const last = conv.messages.at(-1);
    if (!stopped || last?.role === "assistant" || i === 19) { showConversation(conv); break; }
    await new Promise((r) => setTimeout(r, 150));
  }
  listConversations();
}

// ---------------------------------------------------------- conversations
function showConversation(conv) {
  state.conv = conv ? conv.id : null;
  state.messages = conv ? conv.messages : [];
  $("conv-title").textContent = conv ? conv.title || "(untitled)" : "New chat";
  for (const id of ["rename", "export", "delete"]) $(id).disabled = !conv;
  loadSettings(state.conv, conv?.system);
  renderMessages();
  for (const li of $("conversations").children) li.classList.toggle("active", Number(li.dataset.id) === state.conv);
}

async function openConversation(id) {
  if (state.controller) return;
  const conv = await guarded(() => getJSON(`/ui/api/conversations/${id}`));
  if (conv) showConversation(conv);
  closeSidebar();
}

async function listConversations() {
  const q = $("search").value.trim();
  const found = await guarded(() => getJSON(`/ui/api/conversations${q ? `?q=${encodeURIComponent(q)}` : ""}`));
  if (!found) return;
  const list = $("conversations");
  list.replaceChildren();
  for (const c of found.data) {
    const li = document.createElement("li");
    li.dataset.id = c.id;
    li.classList.toggle("active", c.id === state.conv);
    const b = document.createElement("button");
    b.type = "button";
    const title = document.createElement("span");
    title.className = "title";
    title.textContent = c.title || "(untitled)";
    const meta = document.createElement("span");
    meta.className = "sub";
    meta.textContent = c.snippet || `${c.n_messages} messages${c.model ? ` · ${c.model}` : ""}`;
    b.append(title, meta);
    b.onclick = () => openConversation(c.id);
    li.append(b);
    list.append(li);
  }
}

async function renameConversation() {
  const title = await ask("New title for this conversation:", { value: $("conv-title").textContent, ok: "Rename" });
  if (title === null || !title.trim()) return;
  await guarded(async () => {
    const r = await api(`/ui/api/conversations/${state.conv}`, { method: "PATCH", body: JSON.stringify({ title }) });
    if (!r.ok) throw new Error(await errorText(r));
    $("conv-title").textContent = title.trim();
    await listConversations();
  });
}

async function deleteConversation() {
  const title = $("conv-title").textContent;
  if (!(await ask(`Delete “${title}” from the history? This cannot be undone.`, { ok: "Delete" }))) return;
  await guarded(async () => {
    const r = await api(`/ui/api/conversations/${state.conv}`, { method: "DELETE" });
    if (!r.ok) throw new Error(await errorText(r));
    localStorage.removeItem(settingsKey(state.conv));
    showConversation(null);
    await listConversations();
  });
}

async function exportConversation() {
  await guarded(async () => {
    const r = await api(`/ui/api/conversations/${state.conv}/export`);
    if (!r.ok) throw new Error(await errorText(r));
    const url = URL.createObjectURL(await r.blob());
    const a = Object.assign(document.createElement("a"), { href: url, download: `conversation-${state.conv}.md` });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 1000);
  });
}

async function loadModels() {
  const found = await guarded(() => getJSON("/v1/models"));
  if (!found) return;
  const select = $("model");
  select.replaceChildren();
  const wanted = localStorage.getItem("selfhost.model");
  for (const m of found.data.filter((m) => m.kind !== "embedding")) {
    const option = new Option(m.loaded ? m.id : `${m.id} (loads on first use)`, m.id);
    option.selected = m.id === wanted;
    select.append(option);
  }
}

// ----------------------------------------------------------------- wiring
function closeSidebar() {
  document.body.classList.remove("sidebar-open");
  $("scrim").hidden = true;
}

function wire() {
  $("composer").onsubmit = (e) => {
    e.preventDefault();
    const text = $("input").value;
    if (!text.trim() || state.controller) return;
    $("input").value = "";
    autosize();
    guarded(() => runTurn("send", text));
  };
  $("input").onkeydown = (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); $("composer").requestSubmit(); }
  };
  $("input").oninput = autosize;
  document.addEventListener("keydown", (e) => { if (e.key === "Escape" && state.controller) { e.preventDefault(); stop(); } });
  $("stop").onclick = stop;
  $("new-chat").onclick = () => { if (!state.controller) { showConversation(null); closeSidebar(); $("input").focus(); } };
  let timer;
  $("search").oninput = () => { clearTimeout(timer); timer = setTimeout(listConversations, 200); };
  $("rename").onclick = renameConversation;
  $("delete").onclick = deleteConversation;
  $("export").onclick = exportConversation;
  $("error-close").onclick = () => showError("");
  $("settings-toggle").onclick = () => {
    const box = $("settings");
    box.hidden = !box.hidden;
    $("settings-toggle").setAttribute("aria-expanded", String(!box.hidden));
  };
  $("settings").onsubmit = (e) => e.preventDefault();
  $("settings").oninput = () => { $("schema-box").hidden = !$("json-mode").checked; saveSettings(state.conv); };
  $("system").onchange = () => {
    if (state.conv === null) return;
    guarded(async () => {
      const body = JSON.stringify({ system: $("system").value });
      const r = await api(`/ui/api/conversations/${state.conv}`, { method: "PATCH", body });
      if (!r.ok) throw new Error(await errorText(r));
    });
  };
  $("model").onchange = () => localStorage.setItem("selfhost.model", $("model").value);
  $("toggle-sidebar").onclick = () => {
    document.body.classList.add("sidebar-open");
    $("scrim").hidden = false;
  };
  $("scrim").onclick = closeSidebar;
}

function autosize() {
  const input = $("input");
  input.style.height = "auto";
  input.style.height = `${Math.min(input.scrollHeight, 200)}px`;
}

wire();
showConversation(null);
await loadModels();
await listConversations();
const wanted = new URLSearchParams(location.hash.slice(1)).get("c");
if (wanted) await openConversation(Number(wanted));
document.body.classList.add("ready");
window.__selfhost.marks.ready = performance.now();
$("input").focus();
