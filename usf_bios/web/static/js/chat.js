// Chat playground: one prompt to several models (adapters and their base), answers streamed side by side.
// Each column keeps its own conversation; text is written with textContent only.

import { authHeaders, authRequired, askForKey, el, storedKey } from "./app.js";

const modelsBox = document.getElementById("chat-models");
const columns = document.getElementById("chat-columns");
const form = document.getElementById("chat-form");
const prompt = document.getElementById("chat-prompt");
const error = document.getElementById("chat-error");
const conversations = new Map();   // model id → [{role, content}]

async function v1(path, options = {}) {
  if (authRequired && !storedKey()) await askForKey();
  return fetch(`/v1${path}`, { ...options, headers: { ...authHeaders(), ...(options.headers || {}) } });
}

function chosen() {
  return [...modelsBox.querySelectorAll("input[type=checkbox]:checked")].map((box) => box.value);
}

function settings() {
  const number = (id) => Number(document.getElementById(id).value);
  return { temperature: number("chat-temperature"), top_p: number("chat-top-p"), max_tokens: number("chat-max-tokens") };
}

function column(model) {
  let node = columns.querySelector(`[data-model="${CSS.escape(model)}"]`);
  if (!node) {
    node = el("div", { class: "chat-column", dataset: { model } }, el("h3", {}, model), el("div", { class: "chat-log" }));
    columns.append(node);
  }
  return node;
}

function layout() {
  const models = chosen();
  for (const node of [...columns.children]) if (!models.includes(node.dataset.model)) node.remove();
  for (const model of models) column(model);
  snippets(models[0], prompt.value || "Hello!");
}

function snippets(model, text) {
  const body = { model: model || "MODEL", messages: messagesFor(model, text), stream: true, ...settings() };
  const key = authRequired ? ' -H "Authorization: Bearer $USF_KEY"' : "";
  document.getElementById("chat-curl").textContent =
    `curl -N ${location.origin}/v1/chat/completions${key} -H 'content-type: application/json' \\\n  -d '${JSON.stringify(body)}'`;
  document.getElementById("chat-python").textContent = [
    "from openai import OpenAI",
    `client = OpenAI(base_url="${location.origin}/v1", api_key=${authRequired ? '"usf_…"' : '"none"'})`,
    `stream = client.chat.completions.create(model=${JSON.stringify(body.model)}, stream=True,`,
    `    messages=${JSON.stringify(body.messages)},`,
    `    temperature=${body.temperature}, top_p=${body.top_p}, max_tokens=${body.max_tokens})`,
    'print("".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices))',
  ].join("\n");
}

function messagesFor(model, text) {
  const system = document.getElementById("chat-system").value.trim();
  return [...(system ? [{ role: "system", content: system }] : []), ...(conversations.get(model) || []),
          { role: "user", content: text }];
}

async function ask(model, text) {
  const log = column(model).querySelector(".chat-log");
  log.append(el("p", { class: "chat-user" }, text));
  const answer = el("p", { class: "chat-assistant", dataset: { state: "streaming" } });
  log.append(answer);
  const messages = messagesFor(model, text);
  try {
    const response = await v1("/chat/completions", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ model, messages, stream: true, ...settings() }),
    });
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      throw new Error((body.error && body.error.message) || `the server answered ${response.status}`);
    }
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const line = buffer.slice(0, end).trim();
        buffer = buffer.slice(end + 2);
        if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
        const chunk = JSON.parse(line.slice(6));
        if (chunk.error) throw new Error(chunk.error.message);
        for (const choice of chunk.choices || []) answer.textContent += (choice.delta && choice.delta.content) || "";
      }
    }
    conversations.set(model, [...messages.filter((m) => m.role !== "system"), { role: "assistant", content: answer.textContent }]);
    answer.dataset.state = "done";
  } catch (exc) {
    answer.dataset.state = "error";
    answer.textContent = `error: ${exc.message}`;
  }
}

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  const text = prompt.value.trim();
  const models = chosen();
  error.hidden = true;
  if (!text || !models.length) {
    error.textContent = models.length ? "Write a message first." : "Choose at least one model.";
    error.hidden = false;
    return;
  }
  snippets(models[0], text);
  prompt.value = "";
  document.getElementById("chat-send").disabled = true;
  await Promise.all(models.map((model) => ask(model, text)));
  document.getElementById("chat-send").disabled = false;
});

document.getElementById("chat-clear").addEventListener("click", () => {
  conversations.clear();
  for (const log of columns.querySelectorAll(".chat-log")) log.replaceChildren();
});

async function loadModels() {
  const response = await v1("/models");
  const data = response.ok ? (await response.json()).data : [];
  // a job id (the job page's Chat button) stands for its adapter; an adapter's base is ticked beside it
  const asked = (modelsBox.dataset.chosen || "").split(",").filter(Boolean);
  const adapters = data.filter((m) => asked.some((w) => m.id === w || m.id.split(":").pop() === w)).map((m) => m.id);
  const wanted = [...asked, ...adapters, ...adapters.filter((id) => id.startsWith("ft:")).map((id) => id.split(":")[1])];
  modelsBox.replaceChildren(...(data.length ? data.map((model) => el("label", { class: "chat-model" },
    el("input", { type: "checkbox", value: model.id, checked: wanted.includes(model.id) }),
    ` ${model.id} `, el("span", { class: "badge" }, model.kind))) : [el("p", { class: "muted" }, "No models yet.")]));
  layout();
}

modelsBox.addEventListener("change", layout);
document.body.addEventListener("usf:auth", loadModels);
loadModels();
