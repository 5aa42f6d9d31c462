// The job page: status, progress with ETA, live loss / validation-loss / learning-rate charts, log
// tail, checkpoints, cancel / resume / delete (each confirmed where it cannot be undone), edit & rerun,
// download, and a peft snippet once there is an adapter.
// The charts first load the whole history (/metrics), then follow the SSE feed; points are keyed by
// step, so the replayed history, a reload, a reconnect or a resumed run never draws a step twice.
// The ETA is the mean `step_seconds` of the last ETA_WINDOW steps times the steps left.

import {
  api, authRequired, authHeaders, copyText, el, formatBytes, formatDate, formatDuration, formatNumber, notify,
  secondsBetween, setText, statusIn,
} from "./app.js";
import { lineChart, PALETTE } from "./charts.js";
import { followEvents } from "./sse.js";

const root = document.getElementById("job");
const jobId = root.dataset.jobId;
const base = `/jobs/${encodeURIComponent(jobId)}`;
const ETA_WINDOW = 20;

const points = new Map();        // step → {step, loss, validation_loss, learning_rate, tokens_per_second, gpu_memory_gb}
const stepSeconds = [];          // step_seconds of the last ETA_WINDOW steps, oldest first
let lastTimedStep = null;        // the step the newest of them belongs to
let job = null;
let following = null;            // AbortController of the SSE reader
let logTimer = null;
let renderQueued = false;

const lossChart = lineChart(document.getElementById("loss-chart"), {
  series: [
    { label: "loss", color: PALETTE[0] },
    { label: "validation loss", color: PALETTE[2], dash: [6, 4], points: true },
  ],
});
const lrChart = lineChart(document.getElementById("lr-chart"), {
  series: [{ label: "learning rate", color: PALETTE[1] }],
  height: 180,
});

// ---- metrics ----------------------------------------------------------------------------------------
function upsert(step, values) {
  const point = points.get(step) || { step };
  for (const [name, value] of Object.entries(values)) {
    if (value !== null && value !== undefined && name !== "type" && name !== "ts") point[name] = value;
  }
  points.set(step, point);
  if (!renderQueued) {
    renderQueued = true;
    requestAnimationFrame(renderMetrics);
  }
}

function renderMetrics() {
  renderQueued = false;
  const rows = [...points.values()].sort((a, b) => a.step - b.step);
  const trained = rows.filter((p) => p.loss !== undefined);
  const xs = rows.map((p) => p.step);
  lossChart.setData(xs, [rows.map((p) => p.loss ?? null), rows.map((p) => p.validation_loss ?? null)]);
  lrChart.setData(xs, [rows.map((p) => p.learning_rate ?? null)]);

  const chart = document.getElementById("loss-chart");
  chart.dataset.points = String(trained.length);
  chart.dataset.firstStep = trained.length ? String(trained[0].step) : "";
  chart.dataset.lastStep = trained.length ? String(trained[trained.length - 1].step) : "";
  chart.dataset.valPoints = String(rows.filter((p) => p.validation_loss !== undefined).length);
  setText("chart-caption", trained.length ? `${trained.length} steps` : "no steps yet");

  const last = trained[trained.length - 1] || {};
  const lastVal = [...rows].reverse().find((p) => p.validation_loss !== undefined);
  setText("m-loss", formatNumber(last.loss));
  setText("m-val", lastVal ? formatNumber(lastVal.validation_loss) : "—");
  setText("m-lr", formatNumber(last.learning_rate));
  setText("m-tps", last.tokens_per_second === undefined ? "—" : Math.round(last.tokens_per_second).toLocaleString());
  setText("m-mem", last.gpu_memory_gb ? `${last.gpu_memory_gb.toFixed(2)} GB` : (job && job.num_gpus === 0 ? "CPU" : "—"));
}

// ---- status -----------------------------------------------------------------------------------------
/** One step's duration for the ETA. A step that does not follow the last one (a resume redoing steps
 *  from its checkpoint, or the feed replayed from the start) begins the window again. */
function timeStep(step, seconds) {
  if (lastTimedStep !== null && step <= lastTimedStep) stepSeconds.length = 0;
  lastTimedStep = step;
  if (typeof seconds !== "number" || !(seconds > 0)) return;
  stepSeconds.push(seconds);
  if (stepSeconds.length > ETA_WINDOW) stepSeconds.shift();
}

function eta(state) {
  if (state.status !== "running" || !state.total_steps || !state.current_step) return "";
  const remaining = state.total_steps - state.current_step;
  if (remaining <= 0) return "";
  let perStep = null;
  if (stepSeconds.length) {
    perStep = stepSeconds.reduce((sum, s) => sum + s, 0) / stepSeconds.length;
  } else {
    // no step timed yet: the time since the start over the steps done (includes loading the model)
    const elapsed = secondsBetween(job?.started_at);
    if (elapsed !== null && elapsed > 0) perStep = elapsed / state.current_step;
  }
  return perStep === null ? "" : `about ${formatDuration(perStep * remaining)} left`;
}

function showStatus(state) {
  const badge = document.getElementById("job-status");
  badge.textContent = state.status;
  badge.className = `badge status-${state.status}`;
  const active = statusIn("active", state.status);
  setText("job-stage", active && state.stage ? state.stage.replace(/_/g, " ") : "");
  document.getElementById("job-progress").value = state.progress ?? 0;
  setText("job-step", state.total_steps ? `step ${state.current_step} / ${state.total_steps}` : "");
  const took = state.status === "completed" && job?.finished_at ? secondsBetween(job.started_at, job.finished_at) : null;
  if (took !== null) {
    setText("job-eta", `took ${formatDuration(took)}`);
  } else {
    setText("job-eta", eta(state));
  }
  const error = document.getElementById("job-error");
  error.hidden = !state.error;
  error.textContent = state.error ? `Error: ${state.error}` : "";
  document.getElementById("cancel-job").hidden = !statusIn("cancellable", state.status);
  // resuming a job that failed before training began would only fail again: Edit & rerun instead
  document.getElementById("resume-job").hidden = !statusIn("resumable", state.status) || state.resumable === false;
  document.getElementById("delete-job").hidden = !statusIn("final", state.status);
  const completed = state.status === "completed";
  document.getElementById("download-adapter").hidden = !completed;
  document.getElementById("chat-adapter").hidden = !completed;
  document.getElementById("use-adapter").hidden = !completed;
  document.getElementById("copy-snippet").hidden = !completed;
  document.getElementById("no-adapter").hidden = completed;
  setText("no-adapter", statusIn("final", state.status)
    ? `No adapter: the job ${state.status === "failed" ? "failed" : "was cancelled"} before it finished.`
    : "The adapter is written when the job completes.");
  root.dataset.status = state.status;
  showPlacement();
  if (completed) showVllm();
}

// the `vllm serve` line for the adapter, or why vLLM's LoRA loader would refuse it (asked once, when completed)
let vllmAsked = false;
async function showVllm() {
  if (vllmAsked) return;
  vllmAsked = true;
  let answer;
  try {
    answer = await api(`${base}/vllm`);
  } catch {
    vllmAsked = false;   // asked again at the next status
    return;
  }
  const box = document.getElementById("vllm");
  box.hidden = false;
  document.getElementById("copy-vllm").hidden = !answer.compatible;
  document.querySelector("#vllm-command code").textContent = answer.compatible
    ? answer.command
    : `# vLLM's LoRA loader would refuse this adapter:\n${answer.problems.map((p) => `# - ${p}`).join("\n")}`;
}

// where the job runs (local process, worker, RunPod) and what a remote side last said
let placementAsked = 0;
async function showPlacement() {
  if (Date.now() - placementAsked < 2000) return;
  placementAsked = Date.now();
  try {
    const place = await api(`${base}/placement`);
    const remote = place.remote_status ? ` · remote status: ${place.remote_status}` +
      (place.remote_stage ? ` (${place.remote_stage.replace(/_/g, " ")})` : "") : "";
    setText("job-where", `Runs on ${place.where}${remote}`);
  } catch (error) {
    setText("job-where", "");
  }
}

// ---- side panels ------------------------------------------------------------------------------------
async function loadLogs() {
  try {
    const text = await api(`${base}/logs?tail=100`);
    const log = document.getElementById("log");
    const atBottom = log.scrollTop + log.clientHeight >= log.scrollHeight - 8;
    log.textContent = text || "(nothing logged yet)";
    if (atBottom) log.scrollTop = log.scrollHeight;
  } catch (error) {
    setText("log", `The log cannot be read: ${error.message}`);
  }
}

async function loadCheckpoints() {
  const box = document.getElementById("checkpoints");
  let rows;
  try {
    rows = await api(`${base}/checkpoints`);
  } catch (error) {
    box.replaceChildren(el("p", { class: "muted" }, `Checkpoints cannot be listed: ${error.message}`));
    return;
  }
  if (!rows.length) {
    box.replaceChildren(el("p", { class: "muted" }, "None yet. One is written every save_steps steps."));
    return;
  }
  const body = rows.map((c) => el("tr", {},
    el("td", { class: "num" }, c.step), el("td", { class: "mono" }, c.name),
    el("td", { class: "num" }, formatBytes(c.size_bytes)), el("td", {}, formatDate(new Date(c.created_at * 1000)))));
  box.replaceChildren(el("div", { class: "table-wrap" }, el("table", { class: "table", id: "checkpoint-table" },
    el("thead", {}, el("tr", {}, el("th", { class: "num" }, "Step"), el("th", {}, "Folder"), el("th", { class: "num" }, "Size"),
      el("th", {}, "Written"))),
    el("tbody", {}, body))));
}

async function showSnippet() {
  let modelRef = job.spec?.base_model ?? "BASE_MODEL";
  if (job.model_id) {
    try {
      const model = await api(`/models/${encodeURIComponent(job.model_id)}`);
      modelRef = model.source === "local" ? model.path : (model.repo_id || model.path);
    } catch {
      // the model was deleted from the registry: keep the name the job was started with
    }
  }
  const folder = JSON.stringify(job.id);
  const snippet = [
    `# tar xf ${job.id}.tar   (the downloaded adapter)`,
    "from peft import PeftModel",
    "from transformers import AutoModelForCausalLM, AutoTokenizer",
    "",
    `base = AutoModelForCausalLM.from_pretrained(${JSON.stringify(modelRef)})`,
    `tokenizer = AutoTokenizer.from_pretrained(${folder})`,
    `model = PeftModel.from_pretrained(base, ${folder})`,
  ].join("\n");
  document.querySelector("#snippet code").textContent = snippet;
}

// ---- following --------------------------------------------------------------------------------------
function onEvent({ id, event, data }) {
  if (id !== null) root.dataset.lastEventId = id;   // what a reconnect sends as Last-Event-ID
  if (event === "metric") {
    upsert(data.step, data);
    timeStep(data.step, data.step_seconds);
    root.dataset.metricEvents = String(Number(root.dataset.metricEvents || 0) + 1);  // a reconnect repeats none
  } else if (event === "eval") {
    upsert(data.step, { validation_loss: data.validation_loss });
  } else if (event === "stage" && job) {
    setText("job-stage", String(data.stage || "").replace(/_/g, " "));
  } else if (event === "checkpoint") {
    loadCheckpoints();
  } else if (event === "status") {
    job = { ...job, ...data };
    showStatus(job);
  }
}

async function follow() {
  if (following) return;
  following = new AbortController();
  logTimer = setInterval(loadLogs, 3000);
  const live = document.getElementById("live");
  await followEvents(`${base}/events`, {
    onEvent,
    onConnection: (up) => { live.hidden = !up; },
    signal: following.signal,
  });
  live.hidden = true;
  clearInterval(logTimer);
  following = null;
  await refresh();
}

async function refresh() {
  job = await api(base);
  showStatus(job);
  await Promise.all([loadLogs(), loadCheckpoints()]);
}

// ---- actions ----------------------------------------------------------------------------------------
/** The first click arms the button ("Confirm cancel"), a second within 4 s does it (as on the dataset page). */
function confirmed(button, label) {
  if (button.classList.contains("confirm")) {
    button.classList.remove("confirm");
    button.textContent = button.dataset.label;
    return true;
  }
  button.dataset.label = button.textContent;
  button.classList.add("confirm");
  button.textContent = label;
  setTimeout(() => {
    if (!button.classList.contains("confirm")) return;
    button.classList.remove("confirm");
    button.textContent = button.dataset.label;
  }, 4000);
  return false;
}

async function change(action, button) {
  if (action === "cancel" && !confirmed(button, "Confirm cancel")) return;
  button.disabled = true;
  try {
    job = await api(`${base}/${action}`, { method: "POST" });
    showStatus(job);
    notify(action === "cancel" ? "Cancelling: a checkpoint is saved first." : "Queued again; it continues from the newest checkpoint.");
    if (!statusIn("final", job.status)) follow();
  } catch (error) {
    notify(error.message, "error");
  } finally {
    button.disabled = false;
  }
}

async function remove(button) {
  if (!confirmed(button, "Confirm delete: adapter, checkpoints and log")) return;
  button.disabled = true;
  try {
    await api(base, { method: "DELETE" });
    following?.abort();
    window.location.assign("/jobs");
  } catch (error) {
    notify(error.message, "error");
    button.disabled = false;
  }
}

document.getElementById("cancel-job").addEventListener("click", (e) => change("cancel", e.currentTarget));
document.getElementById("delete-job").addEventListener("click", (e) => remove(e.currentTarget));
document.getElementById("resume-job").addEventListener("click", (e) => change("resume", e.currentTarget));
document.getElementById("copy-snippet").addEventListener("click", (e) =>
  copyText(document.querySelector("#snippet code").textContent, e.currentTarget));
document.getElementById("copy-vllm").addEventListener("click", (e) =>
  copyText(document.querySelector("#vllm-command code").textContent, e.currentTarget));

// A link downloads as it streams; with a key the request needs its header, so fetch it instead.
document.getElementById("download-adapter").addEventListener("click", async (event) => {
  if (!authRequired) return;
  event.preventDefault();
  try {
    const response = await fetch(`/api${base}/download`, { headers: authHeaders() });
    if (!response.ok) throw new Error(`the server answered ${response.status}`);
    const url = URL.createObjectURL(await response.blob());
    const link = el("a", { href: url, download: `${jobId}.tar` });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60_000);
  } catch (error) {
    notify(`Download failed: ${error.message}`, "error");
  }
});

// ---- start ------------------------------------------------------------------------------------------
async function start() {
  try {
    job = await api(base);
  } catch (error) {
    const box = document.getElementById("job-error");
    box.hidden = false;
    box.textContent = error.status === 404 ? `No job ${jobId}.` : `The job cannot be loaded: ${error.message}`;
    return;
  }
  document.title = `${job.name} · USF BIOS`;
  setText("job-name", job.name);
  setText("spec", JSON.stringify(job.spec, null, 2));
  showStatus(job);
  const history = await api(`${base}/metrics`);
  for (const point of history) {
    upsert(point.step, point);
    timeStep(point.step, point.step_seconds);
  }
  renderMetrics();
  await Promise.all([loadLogs(), loadCheckpoints(), showSnippet()]);
  if (!statusIn("final", job.status)) follow();
}

start();
