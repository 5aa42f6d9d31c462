// One dataset: format, rows, token-length histogram under a model's tokenizer, rows truncated at a chosen
// max_seq_length, and the first rows rendered as conversations.

import { api, el, formatBytes, notify, setText } from "./app.js";

const root = document.getElementById("dataset");
const ref = root.dataset.ref;
const path = `/datasets/${encodeURIComponent(ref)}`;
const modelSelect = document.getElementById("stats-model");
const lengthInput = document.getElementById("max-seq-length");
let dataset = null;
let statsRequest = null;
let debounce = null;

function fail(message) {
  const box = document.getElementById("dataset-error");
  box.textContent = message;
  box.hidden = false;
}

function renderHistogram(buckets, maxSeqLength) {
  const box = document.getElementById("histogram");
  const highest = Math.max(...buckets.map((b) => b.count), 1);
  box.replaceChildren(...buckets.map((b) => {
    const over = b.end - 1 > maxSeqLength;
    const bar = el("div", {
      class: over ? "bar over" : "bar",
      title: `${b.start}–${b.end - 1} tokens: ${b.count} row${b.count === 1 ? "" : "s"}${over ? " (some or all truncated)" : ""}`,
      dataset: { count: String(b.count) },
    });
    bar.style.height = `${(b.count / highest) * 100}%`;
    return bar;
  }));
  setText("hist-min", buckets.length ? `${buckets[0].start} tokens` : "");
  setText("hist-max", buckets.length ? `${buckets[buckets.length - 1].end - 1} tokens` : "");
}

function renderStats(detail) {
  const stats = detail.token_stats;
  const note = document.getElementById("stats-note");
  const truncation = document.getElementById("truncation");
  if (!stats) {
    setText("stat-tokens", "—");
    truncation.textContent = "";
    document.getElementById("histogram").replaceChildren();
    note.textContent = detail.token_stats_error
      || "Register a model to see token lengths: they depend on the model's tokenizer and chat template.";
    return;
  }
  setText("stat-tokens", `${Math.round(stats.mean)} / ${stats.p95} / ${stats.max}`);
  const share = detail.rows ? ((stats.truncated / detail.rows) * 100).toFixed(1) : "0";
  truncation.replaceChildren(
    el("strong", { id: "truncated-count" }, String(stats.truncated)),
    ` of ${detail.rows} rows (${share}%) would be truncated at max_seq_length ${stats.max_seq_length}.`,
  );
  truncation.dataset.truncated = String(stats.truncated);
  renderHistogram(detail.length_histogram || [], stats.max_seq_length);
  note.textContent = detail.token_stats_model
    ? `Lengths as ${detail.token_stats_model.name}'s tokenizer and chat template count them; min ${stats.min}.` : "";
}

async function loadStats() {
  const length = Number(lengthInput.value);
  if (!Number.isInteger(length) || length < 8) {
    setText("truncation", "max_seq_length must be a whole number ≥ 8.");
    return;
  }
  statsRequest?.abort();
  statsRequest = new AbortController();
  const query = new URLSearchParams({ max_seq_length: String(length) });
  if (modelSelect.value) query.set("model", modelSelect.value);
  root.setAttribute("aria-busy", "true");
  try {
    dataset = await api(`${path}?${query}`, { signal: statsRequest.signal });
    renderStats(dataset);
    renderPreview();          // another model's template may add another system prompt
  } catch (error) {
    if (error.name !== "AbortError") document.getElementById("stats-note").textContent = error.message;
  } finally {
    root.removeAttribute("aria-busy");
  }
}

function bubble(message, added = "") {
  const known = ["user", "assistant", "system"].includes(message.role);
  return el("div", { class: `bubble ${known ? message.role : "other"}${added ? " added" : ""}` },
    el("span", { class: "role" }, added ? `${message.role} · ${added}` : message.role), message.content);
}

let previewRows = null;   // the first rows, as /preview gave them

/** The rows as conversations; a row without a system message shows the one the stats model's chat template
 *  adds to it (it is in the token counts and in training), marked as added. */
function renderPreview() {
  const box = document.getElementById("preview");
  if (!previewRows) return;
  if (!previewRows.length) {
    box.replaceChildren(el("p", { class: "muted" }, "The dataset is empty."));
    return;
  }
  const added = dataset?.template_system_prompt;
  const model = dataset?.token_stats_model?.name;
  box.replaceChildren(...previewRows.map((example) => {
    const own = example.messages.some((m) => m.role === "system");
    const extra = added && example.templated && !own
      ? [bubble({ role: "system", content: added }, `added by ${model}'s chat template, counted in the tokens`)] : [];
    return el("article", { class: "conversation", dataset: { line: String(example.line) } },
      el("div", { class: "conversation-head" }, `Row on line ${example.line}`),
      ...extra, ...example.messages.map((m) => bubble(m)));
  }));
}

async function loadPreview() {
  try {
    previewRows = await api(`${path}/preview?limit=5`);
    renderPreview();
  } catch (error) {
    document.getElementById("preview").replaceChildren(el("p", { class: "muted" }, `No preview: ${error.message}`));
  }
}

async function loadModels() {
  try {
    const models = await api("/models");
    for (const model of models.filter((m) => m.valid).reverse()) {
      modelSelect.append(el("option", { value: model.id }, model.name));
    }
  } catch {
    // the select keeps its default: the newest model
  }
}

async function start() {
  try {
    dataset = await api(path);
  } catch (error) {
    fail(error.status === 404 ? `No dataset ${ref}.` : error.message);
    return;
  }
  document.title = `${dataset.name} · USF BIOS`;
  setText("dataset-name", dataset.name);
  setText("dataset-file", `${dataset.filename} · sha256 ${dataset.sha256.slice(0, 12)}…`);
  setText("stat-format", dataset.format);
  setText("stat-rows", dataset.rows.toLocaleString());
  setText("stat-size", formatBytes(dataset.size_bytes));
  document.getElementById("train-link").href = `/jobs/new?dataset=${encodeURIComponent(dataset.id)}`;
  renderStats(dataset);
  await Promise.all([loadPreview(), loadModels()]);
}

lengthInput.addEventListener("input", () => {
  clearTimeout(debounce);
  debounce = setTimeout(loadStats, 300);
});
modelSelect.addEventListener("change", loadStats);

const deleteButton = document.getElementById("delete-dataset");
deleteButton.addEventListener("click", async () => {
  if (!deleteButton.classList.contains("confirm")) {
    deleteButton.classList.add("confirm");
    deleteButton.textContent = "Confirm delete";
    setTimeout(() => { deleteButton.classList.remove("confirm"); deleteButton.textContent = "Delete"; }, 4000);
    return;
  }
  try {
    await api(path, { method: "DELETE" });
    window.location.assign("/datasets");
  } catch (error) {
    notify(error.message, "error");
  }
});

start();
