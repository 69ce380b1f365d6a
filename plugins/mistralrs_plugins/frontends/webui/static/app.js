// The mistralrs web chat UI: plain JavaScript, no dependencies, no build step. It talks to the
// server's own OpenAI-compatible API (/v1/models, /v1/chat/completions with stream: true) and keeps
// conversations and settings in the browser's localStorage.
"use strict";

const $ = (id) => document.getElementById(id);
const STORE = "mistralrs-ui";
const SETTINGS = ["system", "temperature", "top_p", "top_k", "max_tokens", "extra"];

const state = load();
let models = [];
let pendingImage = null; // a data: URL waiting to be sent with the next message
let controller = null; // the AbortController of the stream in flight

function load() {
  try {
    const saved = JSON.parse(localStorage.getItem(STORE) || "{}");
    return { conversations: saved.conversations || [], current: saved.current || null,
             settings: saved.settings || {}, model: saved.model || null, apiKey: saved.apiKey || "" };
  } catch (e) {
    return { conversations: [], current: null, settings: {}, model: null, apiKey: "" };
  }
}

function save() {
  localStorage.setItem(STORE, JSON.stringify(state));
}

function headers() {
  const h = { "Content-Type": "application/json" };
  if (state.apiKey) h["Authorization"] = "Bearer " + state.apiKey;
  return h;
}

function showError(message) {
  const box = $("error");
  box.textContent = message || "";
  box.hidden = !message;
}

// -- markdown: fenced code blocks, inline code, bold, italics, links; everything else is text ----
function escapeHtml(text) {
  return text.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;").replace(/"/g, "&quot;");
}

function inline(text) {
  return escapeHtml(text)
    .replace(/`([^`\n]+)`/g, "<code>$1</code>")
    .replace(/\*\*([^*\n]+)\*\*/g, "<strong>$1</strong>")
    .replace(/(^|[^*])\*([^*\n]+)\*/g, "$1<em>$2</em>")
    .replace(/\[([^\]\n]+)\]\((https?:\/\/[^\s)]+)\)/g, '<a href="$2" target="_blank" rel="noopener">$1</a>');
}

function renderMarkdown(text) {
  const out = [];
  const fence = /```([\w+-]*)[^\n]*\n([\s\S]*?)(?:```|$)/g;
  let last = 0;
  let m;
  while ((m = fence.exec(text)) !== null) {
    out.push(paragraphs(text.slice(last, m.index)));
    const lang = m[1] ? ` class="language-${escapeHtml(m[1])}"` : "";
    out.push(`<pre><code${lang}>${escapeHtml(m[2])}</code></pre>`);
    last = fence.lastIndex;
  }
  out.push(paragraphs(text.slice(last)));
  return out.join("");
}

function paragraphs(text) {
  return text.split(/\n{2,}/).filter((p) => p.trim()).map((p) => `<p>${inline(p.trim())}</p>`).join("");
}

// -- conversations -------------------------------------------------------------------------------
function current() {
  let conv = state.conversations.find((c) => c.id === state.current);
  if (!conv) {
    conv = { id: String(Date.now()) + Math.random().toString(16).slice(2, 6), title: "New chat", messages: [] };
    state.conversations.unshift(conv);
    state.current = conv.id;
  }
  return conv;
}

function renderConversations() {
  const list = $("conversations");
  list.innerHTML = "";
  for (const conv of state.conversations) {
    const li = document.createElement("li");
    li.className = conv.id === state.current ? "active" : "";
    const title = document.createElement("span");
    title.textContent = conv.title;
    const del = document.createElement("button");
    del.type = "button";
    del.textContent = "×";
    del.title = "Delete this chat";
    del.onclick = (e) => {
      e.stopPropagation();
      state.conversations = state.conversations.filter((c) => c.id !== conv.id);
      if (state.current === conv.id) state.current = state.conversations[0] ? state.conversations[0].id : null;
      save();
      renderAll();
    };
    li.onclick = () => { state.current = conv.id; save(); renderAll(); };
    li.append(title, del);
    list.append(li);
  }
}

function messageElement(msg) {
  const div = document.createElement("div");
  div.className = "msg " + msg.role;
  const role = document.createElement("div");
  role.className = "role";
  role.textContent = msg.role;
  div.append(role);
  if (msg.reasoning) {
    const details = document.createElement("details"); // reasoning: collapsed
    const summary = document.createElement("summary");
    summary.textContent = "Reasoning";
    const body = document.createElement("div");
    body.className = "reasoning";
    body.textContent = msg.reasoning;
    details.append(summary, body);
    div.append(details);
  }
  if (msg.image) {
    const img = document.createElement("img");
    img.src = msg.image;
    img.alt = "attached image";
    div.append(img);
  }
  const content = document.createElement("div");
  content.className = "content";
  content.innerHTML = renderMarkdown(msg.content || "");
  div.append(content);
  return div;
}

function renderMessages() {
  const box = $("messages");
  box.innerHTML = "";
  const conv = state.conversations.find((c) => c.id === state.current);
  for (const msg of conv ? conv.messages : []) box.append(messageElement(msg));
  box.scrollTop = box.scrollHeight;
}

function renderAll() {
  renderConversations();
  renderMessages();
}

// -- models and the API key ----------------------------------------------------------------------
async function loadModels() {
  let res;
  try {
    res = await fetch("../v1/models", { headers: headers() });
  } catch (e) {
    showError("cannot reach the server: " + e);
    return;
  }
  if (res.status === 401) {
    $("key-needed").hidden = false;
    return;
  }
  $("key-needed").hidden = true;
  const body = await res.json().catch(() => ({}));
  if (!res.ok) {
    showError((body.error && body.error.message) || "could not list the models");
    return;
  }
  models = (body.data || []).filter((m) => m.id !== "default");
  const select = $("model");
  select.innerHTML = "";
  for (const m of models) {
    const option = document.createElement("option");
    option.value = m.id;
    option.textContent = m.id;
    select.append(option);
  }
  if (state.model && models.some((m) => m.id === state.model)) select.value = state.model;
  onModelChange();
  if (models.some((m) => m.status === "loading")) setTimeout(loadModels, 1000);
}

function selectedModel() {
  return models.find((m) => m.id === $("model").value) || null;
}

function onModelChange() {
  const model = selectedModel();
  state.model = model ? model.id : null;
  save();
  $("model-status").textContent = model ? (model.status || "") : "";
  const vision = !!model && (model.vision === true ||
                             (Array.isArray(model.input_modalities) && model.input_modalities.includes("image")));
  $("image-label").hidden = !vision;
  if (!vision) clearImage();
}

function setKey(key) {
  state.apiKey = key.trim();
  $("api-key").value = state.apiKey;
  save();
  loadModels();
}

// -- settings ------------------------------------------------------------------------------------
function restoreSettings() {
  for (const name of SETTINGS) $(name).value = state.settings[name] || "";
  $("api-key").value = state.apiKey;
}

function requestBody(conv) {
  const s = state.settings;
  const messages = [];
  if (s.system && s.system.trim()) messages.push({ role: "system", content: s.system });
  for (const m of conv.messages) {
    if (m.image) {
      messages.push({ role: m.role, content: [{ type: "text", text: m.content },
                                              { type: "image_url", image_url: { url: m.image } }] });
    } else {
      messages.push({ role: m.role, content: m.content });
    }
  }
  const body = { model: state.model || "default", messages, stream: true };
  for (const [name, parse] of [["temperature", parseFloat], ["top_p", parseFloat], ["top_k", parseInt],
                               ["max_tokens", parseInt]]) {
    if (s[name] !== undefined && String(s[name]).trim() !== "") body[name] = parse(s[name]);
  }
  if (s.extra && s.extra.trim()) Object.assign(body, JSON.parse(s.extra));
  return body;
}

// -- sending and streaming -----------------------------------------------------------------------
function clearImage() {
  pendingImage = null;
  $("image").value = "";
  $("attachments").innerHTML = "";
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

async function send(text) {
  showError("");
  const conv = current();
  conv.messages.push({ role: "user", content: text, image: pendingImage || undefined });
  if (conv.title === "New chat") conv.title = text.slice(0, 40) || "New chat";
  clearImage();
  let body;
  try {
    body = requestBody(conv);
  } catch (e) {
    conv.messages.pop();
    showError("Extra request fields: " + e.message);
    return;
  }
  const reply = { role: "assistant", content: "", reasoning: "" };
  conv.messages.push(reply);
  save();
  renderAll();
  const box = $("messages");
  let el = box.lastElementChild;
  let scheduled = false;
  const update = () => { // at most one re-render per frame, however fast tokens arrive
    if (!scheduled) {
      scheduled = true;
      requestAnimationFrame(() => { scheduled = false; render(); });
    }
  };
  const render = () => {
    const fresh = messageElement(reply);
    const open = el.querySelector("details");
    if (open && open.open && fresh.querySelector("details")) fresh.querySelector("details").open = true;
    box.replaceChild(fresh, el);
    el = fresh;
    box.scrollTop = box.scrollHeight;
  };
  controller = new AbortController();
  setBusy(true);
  try {
    const res = await fetch("../v1/chat/completions", { method: "POST", headers: headers(),
                                                        body: JSON.stringify(body), signal: controller.signal });
    if (!res.ok) {
      const err = await res.json().catch(() => ({}));
      if (res.status === 401) $("key-needed").hidden = false;
      throw new Error((err.error && err.error.message) || `HTTP ${res.status}`);
    }
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const frame = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of frame.split("\n")) {
          if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
          const chunk = JSON.parse(line.slice(6));
          if (chunk.error) throw new Error(chunk.error.message);
          for (const choice of chunk.choices || []) {
            const delta = choice.delta || {};
            if (delta.reasoning_content) reply.reasoning += delta.reasoning_content;
            if (delta.content) reply.content += delta.content;
            if (delta.tool_calls) {
              for (const call of delta.tool_calls) {
                reply.content += `\n\n\`${call.function.name}(${call.function.arguments})\``;
              }
            }
          }
        }
        update();
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") showError(e.message);
  } finally {
    controller = null;
    setBusy(false);
    save();
    render();
  }
}

function stop() {
  if (controller) controller.abort();
}

// -- wiring --------------------------------------------------------------------------------------
function init() {
  restoreSettings();
  for (const name of SETTINGS) {
    $(name).addEventListener("input", () => { state.settings[name] = $(name).value; save(); });
  }
  $("api-key").addEventListener("change", () => setKey($("api-key").value));
  $("key-save").onclick = () => setKey($("key-prompt").value);
  $("settings-toggle").onclick = () => {
    const panel = $("settings");
    panel.hidden = !panel.hidden;
    $("settings-toggle").setAttribute("aria-expanded", String(!panel.hidden));
  };
  $("model").addEventListener("change", onModelChange);
  $("new-chat").onclick = () => { state.current = null; current(); save(); renderAll(); };
  $("stop").onclick = stop;
  $("image").addEventListener("change", () => {
    const file = $("image").files[0];
    if (!file) return;
    const reader = new FileReader();
    reader.onload = () => {
      pendingImage = reader.result;
      $("attachments").innerHTML = "";
      const img = document.createElement("img");
      img.src = pendingImage;
      img.alt = "image to send";
      $("attachments").append(img);
    };
    reader.readAsDataURL(file);
  });
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("input").value.trim();
    if (!text || controller) return;
    $("input").value = "";
    send(text);
  });
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) {
      e.preventDefault();
      $("composer").requestSubmit();
    }
  });
  renderAll();
  loadModels();
}

init();
