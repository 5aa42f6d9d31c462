// New job: model and dataset pickers, presets (the fields each sets are marked), the QLoRA toggle, a live
// estimate as fields change (greyed out while it no longer matches the form), and errors beside the field they
// belong to (checked here against the spec's bounds and this server's GPUs, then by the server). With
// ?from=JOB_ID (Edit & rerun) the form starts from that job's spec.

import { api, el, formatCount, formatDuration } from "./app.js";

const form = document.getElementById("job-form");  // (form.dataset is its <select name="dataset">)
const settings = document.getElementById("new-job").dataset;
const presets = JSON.parse(settings.presets);
const modelSelect = document.getElementById("f-base-model");
const datasetSelect = document.getElementById("f-dataset");
const nameInput = document.getElementById("f-name");
const qlora = document.getElementById("f-qlora");
const quantization = document.getElementById("f-hyperparameters-quantization");
const estimateBox = document.getElementById("estimate");
const numGpus = document.getElementById("f-gpu-config-num-gpus");
const hostGpus = Number(settings.hostGpus || 0);
let estimateRequest = null;      // AbortController of the newest estimate request
let debounce = null;
let nameEdited = false;

// ---- fields -----------------------------------------------------------------------------------------
const inputs = () => [...form.querySelectorAll("[name]")].filter((i) => i.name !== "preset");

function fieldBox(path) {
  return form.querySelector(`[data-path="${CSS.escape(path)}"]`);
}

function setFieldError(path, message) {
  const box = fieldBox(path);
  if (!box) return false;
  const slot = box.querySelector(".field-error");
  const input = box.querySelector("input:not([type=checkbox]), select") || box.querySelector("input");
  slot.textContent = message;
  if (input) {
    if (message) input.setAttribute("aria-invalid", "true");
    else input.removeAttribute("aria-invalid");
  }
  if (message && box.closest("details") && !box.closest("details").open) box.closest("details").open = true;
  return true;
}

/** The first fault of one input against the bounds the spec gives it ('' when fine). */
function checkInput(input) {
  const { kind } = input.dataset;
  const raw = input.value.trim();
  if (input.name === "base_model" || input.name === "dataset") return raw ? "" : "required";
  if (kind === "text") {
    if (input.required && !raw) return "required";
    if (input.dataset.pattern && raw && !new RegExp(input.dataset.pattern).test(raw)) {
      return "may hold only letters, digits, '.', '_' and '-', starting with a letter or digit";
    }
    return "";
  }
  if (kind !== "int" && kind !== "float") return "";
  if (!raw) return input.dataset.optional ? "" : "required";
  const value = Number(raw);
  if (!Number.isFinite(value)) return "must be a number";
  if (kind === "int" && !Number.isInteger(value)) return "must be a whole number";
  const { min, max, minExclusive, maxExclusive } = input.dataset;
  if (min !== undefined && (minExclusive ? value <= Number(min) : value < Number(min))) return `must be ${minExclusive ? ">" : "≥"} ${min}`;
  if (max !== undefined && (maxExclusive ? value >= Number(max) : value > Number(max))) return `must be ${maxExclusive ? "<" : "≤"} ${max}`;
  return "";
}

/** What the scheduler would refuse on this server, beyond the spec's bounds ('' when fine). The estimate
 *  still answers for such a spec (it names the device it assumes); a submit is refused. */
function hostFault(input) {
  if (input !== numGpus) return "";
  const wanted = Number(input.value);
  if (!(wanted > hostGpus)) return "";
  return hostGpus === 0 ? "this server has no GPU; set 0 to train on the CPU"
    : `this server has ${hostGpus} GPU${hostGpus > 1 ? "s" : ""}`;
}

/** Every input against its bounds (``withHost``: and against this server); false when any is at fault. */
function checkAll(withHost = false) {
  let ok = true;
  for (const input of inputs()) {
    if (input.disabled) continue;
    const message = checkInput(input) || hostFault(input);
    setFieldError(input.name, message);
    if (checkInput(input) || (withHost && message)) ok = false;
  }
  return ok;
}

function valueOf(input) {
  const { kind } = input.dataset;
  const raw = input.value.trim();
  if (kind === "bool") return input.checked;
  if (kind === "int" || kind === "float") return raw === "" ? null : Number(raw);
  if (input.name === "hyperparameters.target_modules" && raw !== "all-linear") {
    return raw.split(",").map((m) => m.trim()).filter(Boolean);
  }
  return raw;
}

/** The job spec the form describes, as POST /api/jobs takes it. */
function buildSpec() {
  const spec = {};
  for (const input of inputs()) {
    if (input.disabled) continue;
    const parts = input.name.split(".");
    let target = spec;
    for (const part of parts.slice(0, -1)) target = target[part] ??= {};
    target[parts[parts.length - 1]] = valueOf(input);
  }
  spec.hyperparameters.quantization = qlora.checked ? quantization.value : "none";
  return spec;
}

// ---- presets ----------------------------------------------------------------------------------------
function setInput(input, value) {
  if (input.type === "checkbox") input.checked = Boolean(value);
  else input.value = value === null || value === undefined ? "" : Array.isArray(value) ? value.join(", ") : String(value);
}

/** Fill the fields the preset sets and mark them (a "preset" tag on each, named in the summary). */
function applyPreset(key) {
  const preset = presets[key];
  if (!preset) return;
  for (const box of form.querySelectorAll("[data-preset]")) delete box.dataset.preset;
  const set = [];
  for (const [path, value] of Object.entries(preset.fields)) {
    const input = form.querySelector(`[name="${CSS.escape(path)}"]`);
    if (!input) continue;
    setInput(input, value);
    const box = fieldBox(path);
    if (box) box.dataset.preset = key;
    set.push(path.split(".").pop());
  }
  document.getElementById("preset-summary").textContent =
    `${preset.label}: ${preset.summary}` + (set.length ? ` Sets ${set.join(", ")}.` : "");
}

/** Edit & rerun: every field from the job's spec (as it was submitted); no preset is applied over it. */
function applySpec(spec, job) {
  for (const input of inputs()) {
    if (input === modelSelect || input === datasetSelect) continue;
    const value = input.name.split(".").reduce((node, part) => (node == null ? undefined : node[part]), spec);
    if (value === undefined) continue;
    if (input === quantization) {
      qlora.checked = value !== "none";
      quantization.disabled = !qlora.checked;
      if (value !== "none") quantization.value = value;
      continue;
    }
    setInput(input, value);
  }
  for (const box of form.querySelectorAll("[data-preset]")) delete box.dataset.preset;
  for (const radio of form.querySelectorAll('input[name="preset"]')) radio.checked = false;
  nameEdited = true;
  document.getElementById("preset-summary").textContent = `Prefilled from job ${job.id} (${job.status}); change what you like.`;
}

// ---- estimate ---------------------------------------------------------------------------------------
function showEstimate(estimate) {
  const set = (id, text) => { document.getElementById(id).textContent = text; };
  set("est-device", estimate.device);
  set("est-warning", estimate.warning ? `${estimate.warning[0].toUpperCase()}${estimate.warning.slice(1)}.` : "");
  set("est-time", formatDuration(estimate.estimated_seconds));
  set("est-vram", estimate.peak_vram_gb === null ? "— (CPU)" : `${estimate.peak_vram_gb.toFixed(estimate.peak_vram_gb < 10 ? 2 : 1)} GB`);
  const cost = estimate.cost > 0 && estimate.cost < 0.01 ? "< $0.01" : `$${estimate.cost.toFixed(2)}`;
  set("est-cost", estimate.price_per_gpu_hour ? `${cost} at $${estimate.price_per_gpu_hour}/GPU-h` : "$0.00");
  set("est-steps", estimate.steps.toLocaleString());
  // rows per optimizer step: batch_size × gradient_accumulation_steps × ranks (GPUs, or CPU processes)
  set("est-batch", estimate.strategy === "single" ? `${estimate.global_batch} rows`
    : `${estimate.global_batch} rows (${estimate.strategy.toUpperCase()})`);
  set("est-tokens", formatCount(estimate.trained_tokens));
  set("est-lora", formatCount(estimate.lora_parameters));
  set("est-assumptions", estimate.assumptions || "");
}

/**
 * The server's 422 lists {field, message} (`errors`): each message goes beside its field. Returns what no
 * field took (an unknown field, or a plain `detail` without a list), for the caller to show.
 */
function placeServerErrors(error) {
  if (!error.errors.length) return [error.message];
  const left = [];
  for (const { field, message } of error.errors) {
    if (!setFieldError(field, message)) left.push(field ? `${field}: ${message}` : message);
  }
  return left;
}

async function estimate() {
  const state = document.getElementById("estimate-state");
  estimateRequest?.abort();      // whatever it answers no longer matches the form
  estimateRequest = null;
  estimateBox.classList.remove("busy");
  if (!modelSelect.value || !datasetSelect.value) {
    state.textContent = "Choose a model and a dataset.";
    markStale(true);
    return;
  }
  if (!checkAll()) {
    state.textContent = "Fix the highlighted fields to see an estimate.";
    markStale(true);
    return;
  }
  const request = new AbortController();
  estimateRequest = request;
  estimateBox.classList.add("busy");
  state.textContent = "Estimating…";
  try {
    const answer = await api("/jobs/estimate", { method: "POST", json: buildSpec(), signal: request.signal });
    if (request.signal.aborted) return;
    showEstimate(answer);
    markStale(false);
    state.textContent = "Updates as you change the fields.";
    estimateBox.dataset.ready = "true";
  } catch (error) {
    if (request.signal.aborted) return;
    markStale(true);
    const left = placeServerErrors(error);
    state.textContent = left.length ? `No estimate: ${left.join("; ")}` : "Fix the highlighted fields to see an estimate.";
  } finally {
    // only the newest request owns the busy state: a superseded one must not clear its successor's
    if (estimateRequest === request) {
      estimateBox.classList.remove("busy");
      estimateRequest = null;
    }
  }
}

/** An estimate shown for other values than the form's now is greyed out (until a new one comes). */
function markStale(stale) {
  estimateBox.classList.toggle("stale", stale && estimateBox.dataset.ready === "true");
}

function scheduleEstimate() {
  clearTimeout(debounce);
  debounce = setTimeout(estimate, 400);
}

// ---- pickers ----------------------------------------------------------------------------------------
function fill(select, rows, chosen, label) {
  select.replaceChildren(el("option", { value: "" }, rows.length ? `Choose a ${label}` : `No ${label} yet`),
    ...rows.map((row) => el("option", { value: row.id, dataset: { name: row.name } }, row.name)));
  const pick = rows.find((r) => r.id === chosen || r.name === chosen) || (rows.length === 1 ? rows[0] : null);
  if (pick) select.value = pick.id;
}

function suggestName() {
  if (nameEdited || !datasetSelect.value) return;
  const dataset = datasetSelect.selectedOptions[0].dataset.name || "job";
  const stem = dataset.replace(/[^A-Za-z0-9._-]+/g, "-").replace(/^[^A-Za-z0-9]+/, "").slice(0, 80) || "job";
  nameInput.value = `${stem}-lora`;
  setFieldError("name", "");
}

async function loadChoices() {
  try {
    const [models, datasets, from] = await Promise.all([api("/models"), api("/datasets"),
      settings.fromJob ? api(`/jobs/${encodeURIComponent(settings.fromJob)}`) : null]);
    if (from) applySpec(from.spec, from);
    fill(modelSelect, models.filter((m) => m.valid), from ? from.spec.base_model : settings.chosenModel, "model");
    fill(datasetSelect, datasets, from ? from.spec.dataset : settings.chosenDataset, "dataset");
    suggestName();
    scheduleEstimate();
  } catch (error) {
    const box = document.getElementById("form-error");
    box.textContent = settings.fromJob && error.status === 404 ? `No job ${settings.fromJob} to start from.`
      : `Models and datasets cannot be listed: ${error.message}`;
    box.hidden = false;
  }
}

// ---- events -----------------------------------------------------------------------------------------
form.addEventListener("input", (event) => {
  const input = event.target;
  if (input.name === "preset") return;
  if (input === nameInput) nameEdited = true;
  if (input.name) setFieldError(input.name, checkInput(input) || hostFault(input));
  const box = input.name ? fieldBox(input.name) : null;
  if (box) delete box.dataset.preset;        // the user's value now, not the preset's
  if (input.name && checkInput(input)) markStale(true);
  scheduleEstimate();
});
form.addEventListener("change", (event) => {
  const input = event.target;
  if (input.name === "preset") applyPreset(input.value);
  if (input === datasetSelect) suggestName();
  if (input === qlora) quantization.disabled = !qlora.checked;
  scheduleEstimate();
});

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  const formError = document.getElementById("form-error");
  formError.hidden = true;
  if (!checkAll(true)) {
    form.querySelector("[aria-invalid=true]")?.focus();
    return;
  }
  const button = document.getElementById("start-job");
  button.disabled = true;
  try {
    const job = await api("/jobs", { method: "POST", json: buildSpec() });
    window.location.assign(`/jobs/${encodeURIComponent(job.id)}`);
  } catch (error) {
    const left = placeServerErrors(error);
    if (left.length) {
      formError.textContent = left.join("; ");
      formError.hidden = false;
    }
    form.querySelector("[aria-invalid=true]")?.focus();
    button.disabled = false;
  }
});

if (hostGpus === 0 && numGpus.value !== "0") numGpus.value = "0";   // a host without a GPU trains on the CPU
if (!settings.fromJob) applyPreset(form.querySelector('input[name="preset"]:checked')?.value || settings.defaultPreset);
loadChoices();
