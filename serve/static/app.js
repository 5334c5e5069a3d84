// The dhara playground: chat, the three decoding modes side by side, and block
// diffusion's steps, over the server's OpenAI-compatible API and its "dhara"
// streaming extension (docs/serving.md). Plain JavaScript, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const MODES = ["ar", "diffusion", "spec"];
const state = { config: null, history: [], controllers: new Set(), view: "chat", blocks: null };

// ---- requests -------------------------------------------------------------

function setting(id) {
  const value = $(id).value.trim();
  return value === "" ? undefined : Number(value);
}

function requestBody(mode, prompt) {
  const body = {
    mode,
    stream: true,
    dhara_stats: true,
    dhara_blocks: mode === "diffusion",
    temperature: setting("temperature"),
    top_p: setting("top_p"),
    repetition_penalty: setting("repetition_penalty"),
    max_tokens: setting("max_tokens"),
    seed: setting("seed"),
    block_len: setting("block_len"),
    threshold: setting("threshold"),
    k: setting("k"),
  };
  if (typeof prompt === "string") body.prompt = prompt;
  else body.messages = prompt;
  return body;
}

// Streams one request: on.text(piece) for new text, on.dhara(object) for the
// extension (stats, and a diffusion block). Rejects with the server's message,
// or with an AbortError when stopped.
async function stream(mode, prompt, on) {
  const headers = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) headers.Authorization = `Bearer ${key}`;
  const path = typeof prompt === "string" ? "/v1/completions" : "/v1/chat/completions";
  const controller = new AbortController();
  state.controllers.add(controller);
  updateButtons();
  try {
    const response = await fetch(path, {
      method: "POST",
      headers,
      body: JSON.stringify(requestBody(mode, prompt)),
      signal: controller.signal,
    });
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      const error = new Error(body.error?.message || `${response.status} ${response.statusText}`);
      error.status = response.status;
      throw error;
    }
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const data = buffer.slice(0, end).replace(/^data: /, "");
        buffer = buffer.slice(end + 2);
        if (data === "[DONE]") return;
        const event = JSON.parse(data);
        if (event.error) throw new Error(event.error.message);
        const choice = event.choices?.[0] ?? {};
        const text = choice.delta ? choice.delta.content : choice.text;
        if (text) on.text(text);
        if (event.dhara) on.dhara(event.dhara);
      }
    }
  } finally {
    state.controllers.delete(controller);
    updateButtons();
  }
}

function stop() {
  for (const controller of state.controllers) controller.abort();
}

function updateButtons() {
  const busy = state.controllers.size > 0;
  $("stop").disabled = !busy;
  $("send").disabled = busy;
  $("compare").disabled = busy;
  $("replay").disabled = busy;
}

function showError(error) {
  $("error").textContent = error ? error.message : "";
  if (error?.status === 401) {
    $("api-key-row").hidden = false;
    $("api-key").focus();
  }
}

// ---- stats ----------------------------------------------------------------

const fixed = (digits) => (value) => value.toFixed(digits);
const STATS = [
  ["tokens_per_second", "tok/s", fixed(1)],
  ["tokens_per_forward", "tok/forward", fixed(2)],
  ["accepted_per_round", "accepted/round", fixed(2), "spec"],
  ["first_token_seconds", "first token", (s) => (s == null ? "–" : `${Math.round(s * 1000)} ms`)],
  ["generated", "tokens", String],
  ["forwards", "forwards", String],
];

function showStats(list, stats) {
  const items = STATS.map(([key, label, format, only]) => {
    const item = document.createElement("div");
    const term = document.createElement("dt");
    const value = document.createElement("dd");
    term.textContent = label;
    value.textContent = only && stats.mode !== only ? "–" : format(stats[key]);
    item.append(term, value);
    return item;
  });
  list.replaceChildren(...items);
  for (const [key, value] of Object.entries(stats)) {
    if (typeof value !== "object" || value === null) list.dataset[key] = value;
  }
}

// ---- block diffusion ------------------------------------------------------

// Each block is a row of slots: "?" while MASK, then the token, coloured by the
// step (counted within its block) that committed it.
class BlockView {
  constructor(root, keep = 4) {
    this.root = root;
    this.keep = keep;
    this.reset();
  }

  reset() {
    this.root.replaceChildren();
    this.strips = new Map();
    this.steps = [];
    this.replaying = null; // ends a replay
    return this;
  }

  update(block, record = true) {
    if (record) this.steps.push(block);
    const strip = this.strips.get(block.start) ?? this.addStrip(block.start);
    const first = Math.min(...block.committed.filter((step) => step != null));
    strip.slots.replaceChildren(
      ...block.tokens.map((token, i) => slot(token, block.committed[i], first)),
    );
    const steps = block.step - first + 1;
    strip.element.dataset.steps = steps;
    strip.label.textContent = `tokens ${block.start}–${block.start + block.tokens.length - 1}, step ${steps}`;
  }

  addStrip(start) {
    const element = document.createElement("div");
    const label = document.createElement("div");
    const slots = document.createElement("div");
    element.className = "strip";
    element.dataset.start = start;
    label.className = "strip-label";
    slots.className = "slots";
    element.append(label, slots);
    this.root.append(element);
    const strip = { element, label, slots };
    this.strips.set(start, strip);
    while (this.root.children.length > this.keep) this.root.firstElementChild.remove();
    return strip;
  }

  async replay(delay = 180) {
    const steps = this.steps;
    this.reset();
    const run = (this.replaying = {});
    for (const block of steps) {
      if (this.replaying !== run) return;
      this.update(block);
      await new Promise((resolve) => setTimeout(resolve, delay));
    }
  }
}

function slot(token, committed, first) {
  const element = document.createElement("span");
  element.className = "slot";
  if (token == null) {
    element.classList.add("masked");
    element.textContent = "?";
    element.title = "MASK";
    return element;
  }
  element.textContent = token.replace(/\n/g, "⏎").replace(/\t/g, "⇥").replace(/ /g, "·") || "∅";
  if (committed != null) {
    const step = committed - first + 1;
    element.dataset.step = step;
    element.style.setProperty("--hue", (200 + (step - 1) * 47) % 360);
    element.title = `step ${step}: ${JSON.stringify(token)}`;
  }
  return element;
}

// ---- chat -----------------------------------------------------------------

function addMessage(role, text, mode) {
  const element = document.createElement("div");
  element.className = `message ${role}`;
  element.dataset.role = role;
  const body = document.createElement("pre");
  body.className = "body";
  body.textContent = text;
  element.append(body);
  const message = { element, body };
  if (role === "assistant") {
    const head = document.createElement("div");
    head.className = "message-mode";
    head.textContent = mode;
    message.stats = document.createElement("dl");
    message.stats.className = "stats";
    message.blocks = document.createElement("div");
    message.blocks.className = "blocks";
    element.prepend(head);
    element.append(message.stats, message.blocks);
  }
  $("history").append(element);
  return message;
}

async function send() {
  const text = $("prompt").value;
  if (!text.trim() || state.controllers.size) return;
  showView("chat");
  showError(null);
  const mode = $("mode").value;
  const user = { role: "user", content: text };
  const chat = $("chat-template").checked;
  const prompt = chat ? [...state.history, user] : text;
  const question = addMessage("user", text);
  const reply = addMessage("assistant", "", mode);
  const blocks = mode === "diffusion" ? new BlockView(reply.blocks, 2) : null;
  $("prompt").value = "";
  let content = "";
  reply.element.dataset.state = "running";
  try {
    await stream(mode, prompt, {
      text(piece) {
        content += piece;
        reply.body.textContent = content;
        $("view-chat").scrollTop = $("view-chat").scrollHeight;
      },
      dhara(extension) {
        showStats(reply.stats, extension);
        if (extension.block) blocks.update(extension.block);
      },
    });
    reply.element.dataset.state = "done";
  } catch (error) {
    if (error.name !== "AbortError") {
      question.element.remove();
      reply.element.remove();
      $("prompt").value = text; // to send again, e.g. with the API key
      showError(error);
      return;
    }
    reply.element.dataset.state = "stopped";
  }
  if (chat) state.history.push(user, { role: "assistant", content });
}

// ---- compare --------------------------------------------------------------

async function compare() {
  const text = $("prompt").value;
  if (!text.trim() || state.controllers.size) return;
  showView("compare");
  showError(null);
  const prompt = $("chat-template").checked ? [{ role: "user", content: text }] : text;
  await Promise.all(MODES.map((mode) => runPane(mode, prompt)));
}

async function runPane(mode, prompt) {
  const pane = document.querySelector(`.pane[data-mode="${mode}"]`);
  const output = pane.querySelector(".output");
  const stats = pane.querySelector(".stats");
  output.textContent = "";
  stats.replaceChildren();
  if (mode === "diffusion") state.blocks.reset();
  if (!state.config.modes.includes(mode)) {
    output.textContent = "This model has no MASK token: it decodes in AR mode only.";
    pane.dataset.state = "unavailable";
    return;
  }
  pane.dataset.state = "running";
  try {
    await stream(mode, prompt, {
      text: (piece) => output.append(piece),
      dhara(extension) {
        showStats(stats, extension);
        if (extension.block) state.blocks.update(extension.block);
      },
    });
    pane.dataset.state = "done";
  } catch (error) {
    pane.dataset.state = error.name === "AbortError" ? "stopped" : "error";
    if (error.name !== "AbortError") showError(error);
  }
}

// ---- page -----------------------------------------------------------------

function showView(view) {
  state.view = view;
  for (const tab of document.querySelectorAll("[role=tab]")) {
    tab.setAttribute("aria-selected", String(tab.dataset.view === view));
  }
  $("view-chat").hidden = view !== "chat";
  $("view-compare").hidden = view !== "compare";
}

function toggleTheme() {
  const root = document.documentElement;
  const dark = root.dataset.theme
    ? root.dataset.theme === "dark"
    : matchMedia("(prefers-color-scheme: dark)").matches;
  root.dataset.theme = dark ? "light" : "dark";
  localStorage.setItem("dhara-theme", root.dataset.theme);
}

async function loadConfig() {
  const response = await fetch("/playground.json");
  const config = await response.json();
  state.config = config;
  $("model").textContent = config.model;
  $("api-key-row").hidden = !config.api_key_required;
  for (const option of $("mode").options) option.disabled = !config.modes.includes(option.value);
  $("mode").value = config.mode;
  $("max_tokens").value = config.max_tokens;
  $("max_tokens").max = config.max_context;
  document.body.dataset.ready = "true";
}

function init() {
  const theme = localStorage.getItem("dhara-theme");
  if (theme) document.documentElement.dataset.theme = theme;
  $("api-key").value = sessionStorage.getItem("dhara-api-key") ?? ""; // this tab only
  $("api-key").addEventListener("change", () => {
    sessionStorage.setItem("dhara-api-key", $("api-key").value.trim());
  });
  state.blocks = new BlockView(document.querySelector("[data-testid=diffusion-block]"));
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });
  $("compare").addEventListener("click", compare);
  $("stop").addEventListener("click", stop);
  $("replay").addEventListener("click", () => state.blocks.replay());
  $("theme").addEventListener("click", toggleTheme);
  $("clear").addEventListener("click", () => {
    state.history = [];
    $("history").replaceChildren();
  });
  for (const tab of document.querySelectorAll("[role=tab]")) {
    tab.addEventListener("click", () => showView(tab.dataset.view));
  }
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key !== "Enter" || event.isComposing) return;
    if (event.shiftKey && !(event.ctrlKey || event.metaKey)) return; // a new line
    event.preventDefault();
    if (state.view === "compare") compare();
    else send();
  });
  updateButtons();
  loadConfig().catch(showError);
}

init();
