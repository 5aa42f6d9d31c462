// Compare runs: pick jobs, overlay their loss (and validation-loss) curves, and lay their settings side
// by side with the rows that differ highlighted. The choice lives in the URL (?jobs=a&jobs=b).
// The model and dataset show by name (the form submits their ids); a job whose settings hold every field of
// a preset is shown as matching it, and the cells that preset sets carry a "preset" tag.

import { api, el, formatDuration, formatNumber, secondsBetween, statusIn } from "./app.js";
import { lineChart, PALETTE } from "./charts.js";

const root = document.getElementById("compare");
const MAX = Number(root.dataset.max);
const picker = document.getElementById("job-picker");
const chartBox = document.getElementById("compare-chart");
const table = document.getElementById("compare-table");
const showVal = document.getElementById("show-val");
const onlyDiff = document.getElementById("only-diff");
const runs = new Map();          // job id → {job, metrics}
let chosen = JSON.parse(root.dataset.chosen);
let chart = null;
let names = { models: new Map(), datasets: new Map() };   // id → name, of what this key can see
let presets = [];                                          // [{name, label, fields: {path: value}}]

const GROUP_TITLES = { job: "Job", hyperparameters: "Hyperparameters", gpu_config: "Hardware", performance: "Performance" };
const colorOf = (id) => PALETTE[chosen.indexOf(id) % PALETTE.length];

async function load(id) {
  if (!runs.has(id) || !statusIn("final", runs.get(id).job.status)) {
    const path = `/jobs/${encodeURIComponent(id)}`;
    const [job, metrics] = await Promise.all([api(path), api(`${path}/metrics`)]);
    runs.set(id, { job, metrics });
  }
  return runs.get(id);
}

// ---- picker -----------------------------------------------------------------------------------------
async function loadPicker() {
  let items = [];
  try {
    items = (await api("/jobs?limit=200")).items;
  } catch (error) {
    picker.replaceChildren(el("p", { class: "muted" }, error.message));
    return;
  }
  const missing = chosen.filter((id) => !items.some((job) => job.id === id));
  for (const id of missing) {
    try {
      items.push((await load(id)).job);
    } catch {
      chosen = chosen.filter((c) => c !== id);   // unknown or not this key's
    }
  }
  if (!items.length) {
    picker.replaceChildren(el("p", { class: "muted" }, "No jobs yet."));
    return;
  }
  picker.replaceChildren(...items.map((job) => el("label", { dataset: { jobId: job.id } },
    el("input", { type: "checkbox", value: job.id, checked: chosen.includes(job.id) }),
    el("span", { class: "swatch" }),
    el("span", {}, el("span", { class: "job-link" }, job.name), el("br"),
      el("span", { class: "muted small" }, `${job.status} · ${job.id}`)))));
  syncPicker();
}

function syncPicker() {
  for (const label of picker.querySelectorAll("label")) {
    const input = label.querySelector("input");
    const on = chosen.includes(input.value);
    input.checked = on;
    input.disabled = !on && chosen.length >= MAX;
    label.querySelector(".swatch").style.background = on ? colorOf(input.value) : "transparent";
  }
}

picker.addEventListener("change", (event) => {
  const id = event.target.value;
  chosen = event.target.checked ? [...chosen, id].slice(0, MAX) : chosen.filter((c) => c !== id);
  const query = new URLSearchParams(chosen.map((c) => ["jobs", c]));
  history.replaceState(null, "", chosen.length ? `/compare?${query}` : "/compare");
  syncPicker();
  render();
});

// ---- chart ------------------------------------------------------------------------------------------
function renderChart(loaded) {
  chart?.destroy();
  chart = null;
  chartBox.replaceChildren();
  chartBox.dataset.series = "0";
  document.getElementById("compare-empty").hidden = loaded.length > 0;
  if (!loaded.length) return;
  const series = [];
  const values = [];
  const steps = new Set();
  for (const { job, metrics } of loaded) {
    const byStep = new Map(metrics.map((p) => [p.step, p]));
    metrics.forEach((p) => steps.add(p.step));
    series.push({ label: `${job.name} loss`, color: colorOf(job.id) });
    values.push((x) => byStep.get(x)?.loss ?? null);
    if (showVal.checked && metrics.some((p) => p.validation_loss !== null)) {
      series.push({ label: `${job.name} val`, color: colorOf(job.id), dash: [6, 4], points: true, width: 1.5 });
      values.push((x) => byStep.get(x)?.validation_loss ?? null);
    }
  }
  const xs = [...steps].sort((a, b) => a - b);
  chart = lineChart(chartBox, { series, height: 320 });
  chart.setData(xs, values.map((f) => xs.map(f)));
  chartBox.dataset.series = String(loaded.length);
}

// ---- table ------------------------------------------------------------------------------------------
function flatten(value, prefix = "", out = {}) {
  for (const [key, inner] of Object.entries(value || {})) {
    const path = prefix ? `${prefix}.${key}` : key;
    if (inner && typeof inner === "object" && !Array.isArray(inner)) flatten(inner, path, out);
    else out[path] = Array.isArray(inner) ? inner.join(", ") : inner;
  }
  return out;
}

/** The preset with the most fields whose every field the job's settings hold (null when none does). */
function matchingPreset(settings) {
  let best = null;
  for (const preset of presets) {
    const fields = Object.entries(preset.fields);
    if (!fields.length || !fields.every(([path, value]) => JSON.stringify(settings[path] ?? null)
      === JSON.stringify(Array.isArray(value) ? value.join(", ") : value))) continue;
    if (!best || fields.length > Object.keys(best.fields).length) best = preset;
  }
  return best;
}

/** The job's settings, flattened, with the model and dataset by name. */
function settingsOf(job) {
  const flat = flatten({ ...job.spec, name: undefined });
  flat.base_model = names.models.get(job.model_id) ?? flat.base_model;
  flat.dataset = names.datasets.get(job.dataset_id) ?? flat.dataset;
  return flat;
}

async function loadNames() {
  const [models, datasets, shipped] = await Promise.all([api("/models"), api("/datasets"), api("/presets")])
    .catch(() => [[], [], []]);
  names = { models: new Map(models.map((m) => [m.id, m.name])), datasets: new Map(datasets.map((d) => [d.id, d.name])) };
  presets = shipped.map((p) => ({ name: p.name, label: p.label, fields: flatten(p.fields) }));
}

function results({ job, metrics }) {
  const last = metrics[metrics.length - 1];
  const vals = metrics.map((p) => p.validation_loss).filter((v) => v !== null);
  const took = job.finished_at ? secondsBetween(job.started_at, job.finished_at) : null;
  return {
    status: job.status,
    steps: job.total_steps ? `${job.current_step} / ${job.total_steps}` : String(job.current_step),
    "final loss": last ? formatNumber(last.loss) : "—",
    "best validation loss": vals.length ? formatNumber(Math.min(...vals)) : "—",
    "tokens / s": last?.tokens_per_second ? Math.round(last.tokens_per_second).toLocaleString() : "—",
    duration: took === null ? "—" : formatDuration(took),
  };
}

function renderTable(loaded) {
  if (!loaded.length) {
    table.replaceChildren();
    return;
  }
  const head = el("thead", {}, el("tr", {}, el("th", { scope: "col" }, ""),
    ...loaded.map(({ job }) => {
      const swatch = el("span", { class: "swatch" });
      swatch.style.background = colorOf(job.id);
      return el("th", { scope: "col" }, swatch, " ", el("a", { href: `/jobs/${encodeURIComponent(job.id)}` }, job.name));
    })));
  const section = (title) => el("tr", { class: "section" }, el("th", { colspan: String(loaded.length + 1), scope: "colgroup" }, title));
  const outcome = loaded.map(results);
  const settings = loaded.map(({ job }) => settingsOf(job));
  const matched = settings.map(matchingPreset);
  const row = (key, cells, flag) => {
    const differs = flag && new Set(cells.map((c) => JSON.stringify(c ?? null))).size > 1;
    return el("tr", { class: flag ? (differs ? "differs" : "same") : "", dataset: { key } },
      el("th", { scope: "row", class: "key", title: key }, key.includes(".") ? key.slice(key.indexOf(".") + 1) : key),
      ...cells.map((c, i) => {
        const byPreset = flag && matched[i] && key in matched[i].fields;
        return el("td", byPreset ? { class: "from-preset", title: `set by the preset ${matched[i].label}` } : {},
          c === null || c === undefined ? "—" : String(c));
      }));
  };
  for (const [i, s] of settings.entries()) s.preset = matched[i] ? matched[i].label : null;
  const keys = [...new Set(settings.flatMap((s) => Object.keys(s)))].filter((k) => k !== "name");
  const groups = new Map();       // 'hyperparameters' → its keys; top-level keys go under 'job'
  for (const key of keys) {
    const group = key.includes(".") ? key.slice(0, key.indexOf(".")) : "job";
    groups.set(group, [...(groups.get(group) || []), key]);
  }
  const body = el("tbody", {},
    section("Results"),
    ...Object.keys(outcome[0]).map((key) => row(key, outcome.map((o) => o[key]), false)),
    ...[...groups].flatMap(([group, members]) => [
      section(GROUP_TITLES[group] || group.replace(/_/g, " ")),
      ...members.map((key) => row(key, settings.map((s) => s[key]), true)),
    ]));
  table.replaceChildren(head, body);
  table.classList.toggle("only-diff", onlyDiff.checked);
}

async function render() {
  const loaded = [];
  for (const id of chosen) {
    try {
      loaded.push(await load(id));
    } catch {
      // gone since it was picked
    }
  }
  renderChart(loaded);
  renderTable(loaded);
}

showVal.addEventListener("change", render);
onlyDiff.addEventListener("change", () => table.classList.toggle("only-diff", onlyDiff.checked));

await Promise.all([loadPicker(), loadNames()]);
render();
