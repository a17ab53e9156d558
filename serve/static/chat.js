// The chat page: adapters from /v1/models, answers streamed from /v1/chat/completions (server-sent events).
// The API key, when the server needs one, lives in this tab's sessionStorage only.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY = "qlora-ray-api-key";
const history = [];

function headers() {
  const key = sessionStorage.getItem(KEY);
  return { "Content-Type": "application/json", ...(key ? { Authorization: `Bearer ${key}` } : {}) };
}

function say(role, text) {
  const item = document.createElement("li");
  item.className = role;
  item.textContent = text;
  $("conversation").appendChild(item);
  item.scrollIntoView({ block: "end" });
  return item;
}

// A readable sentence for an error answer: what went wrong and what to do.
async function explain(response) {
  let message = "";
  try {
    message = (await response.json()).error.message;
  } catch (_) {
    message = response.statusText;
  }
  const wait = response.headers.get("Retry-After");
  switch (response.status) {
    case 401: return `The server needs a valid API key (${message}). Enter it above and press "Use key".`;
    case 429:
    case 503: return `The server is busy: ${message}. Try again${wait ? ` in ${wait} s` : " in a moment"}.`;
    case 504: return `The answer took too long: ${message}`;
    default: return `Error ${response.status}: ${message}`;
  }
}

async function loadAdapters() {
  const select = $("adapter");
  const response = await fetch("/v1/models", { headers: headers() });
  if (!response.ok) {
    $("status").textContent = await explain(response);
    return;
  }
  const models = (await response.json()).data;
  select.replaceChildren(...models.map((m) => {
    const option = document.createElement("option");
    option.value = m.id;
    option.textContent = m.default ? `${m.id} (default)` : m.id;
    option.selected = Boolean(m.default);
    return option;
  }));
  $("status").textContent = models.length ? "" : "No adapter is registered for this server's base model yet.";
}

// Reads server-sent events and calls onDelta with each piece of text until "data: [DONE]".
async function readStream(response, onDelta) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    const events = buffer.split("\n\n");
    buffer = events.pop();
    for (const event of events) {
      const data = event.replace(/^data: /, "");
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      const delta = chunk.choices.length ? chunk.choices[0].delta.content : "";
      if (delta) onDelta(delta);
    }
  }
}

async function ask(question) {
  say("user", question);
  history.push({ role: "user", content: question });
  $("send").disabled = true;
  $("status").textContent = "Answering…";
  const answer = say("assistant", "");
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers(),
      body: JSON.stringify({ model: $("adapter").value || undefined, messages: history, stream: true }),
    });
    if (!response.ok) {
      answer.remove();
      history.pop();
      say("error", await explain(response));
      return;
    }
    await readStream(response, (delta) => { answer.textContent += delta; });
    history.push({ role: "assistant", content: answer.textContent });
  } catch (err) {
    history.pop();
    say("error", `The answer stopped: ${err.message}`);
  } finally {
    $("send").disabled = false;
    $("status").textContent = "";
    $("question").focus();
  }
}

$("ask").addEventListener("submit", (event) => {
  event.preventDefault();
  const question = $("question").value.trim();
  if (!question) return;
  $("question").value = "";
  ask(question);
});

$("question").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("ask").requestSubmit();
  }
});

$("settings").addEventListener("submit", (event) => {
  event.preventDefault();
  const key = $("api-key").value.trim();
  if (key) sessionStorage.setItem(KEY, key); else sessionStorage.removeItem(KEY);
  $("api-key").value = "";
  $("api-key").placeholder = key ? "key set for this tab" : "only if the server asks for one";
  loadAdapters();
});

$("adapter").addEventListener("change", () => { history.length = 0; });

loadAdapters();
