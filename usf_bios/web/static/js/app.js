// Shared by every page: the API key, fetch helpers, htmx wiring, DOM building and number formats.
// Nothing here writes user data as HTML: text goes through textContent only.

const KEY_NAME = "usf-bios-api-key";
export const authRequired = document.body.dataset.authRequired === "true";

// ---- job statuses -----------------------------------------------------------------------------------
// Rendered by the server from usf_bios.control.lifecycle (data-job-statuses on <body>): the scripts keep
// no list of their own. {all, final, active, cancellable, resumable}, each a list of status values.
const STATUS_GROUPS = JSON.parse(document.body.dataset.jobStatuses || "{}");

/** statusIn("final", "completed") → true: whether a status belongs to one of the server's groups. */
export function statusIn(group, status) {
  return (STATUS_GROUPS[group] || []).includes(status);
}

// ---- the API key ------------------------------------------------------------------------------------
export function storedKey() {
  return sessionStorage.getItem(KEY_NAME) || localStorage.getItem(KEY_NAME);
}

function saveKey(key, remember) {
  sessionStorage.setItem(KEY_NAME, key);
  if (remember) localStorage.setItem(KEY_NAME, key);
  else localStorage.removeItem(KEY_NAME);
}

export function forgetKey() {
  sessionStorage.removeItem(KEY_NAME);
  localStorage.removeItem(KEY_NAME);
  updateForgetButton();
}

export function authHeaders() {
  const key = storedKey();
  return authRequired && key ? { Authorization: `Bearer ${key}` } : {};
}

let pendingKey = null;

/** Resolves once the user has entered a key the server accepts. Callers share one dialog. */
export function askForKey(message = "") {
  const dialog = document.getElementById("key-dialog");
  const error = document.getElementById("key-error");
  error.textContent = message;
  if (pendingKey) return pendingKey;
  pendingKey = new Promise((resolve) => {
    const form = document.getElementById("key-form");
    const input = document.getElementById("key-input");
    const submit = document.getElementById("key-submit");
    dialog.addEventListener("cancel", (event) => event.preventDefault());  // the pages need a key
    const onSubmit = async (event) => {
      event.preventDefault();
      const key = input.value.trim();
      if (!key) { error.textContent = "Enter a key."; return; }
      submit.disabled = true;
      try {
        const response = await fetch("/api/system", { headers: { Authorization: `Bearer ${key}` } });
        if (response.ok) {
          saveKey(key, document.getElementById("key-remember").checked);
          form.removeEventListener("submit", onSubmit);
          input.value = "";
          dialog.close();
          pendingKey = null;
          updateForgetButton();
          resolve(key);
          document.body.dispatchEvent(new CustomEvent("usf:auth"));
        } else {
          error.textContent = response.status === 401 ? "That key is not valid or was revoked." : `The server answered ${response.status}.`;
        }
      } catch {
        error.textContent = "The server cannot be reached.";
      } finally {
        submit.disabled = false;
      }
    };
    form.addEventListener("submit", onSubmit);
    if (!dialog.open) dialog.showModal();
    input.focus();
  });
  return pendingKey;
}

function updateForgetButton() {
  const button = document.getElementById("forget-key");
  if (button) button.hidden = !(authRequired && storedKey());
}

// ---- fetch ------------------------------------------------------------------------------------------
export class ApiError extends Error {
  constructor(status, body) {
    const detail = body && typeof body === "object" ? body.detail : body;
    super(typeof detail === "string" && detail ? detail : `request failed (${status})`);
    this.status = status;
    this.body = body && typeof body === "object" ? body : { detail };
    this.errors = Array.isArray(this.body.errors) ? this.body.errors : [];
  }
}

async function readBody(response) {
  const type = response.headers.get("content-type") || "";
  if (type.includes("application/json")) return response.json();
  return response.text();
}

/** fetch /api + path with the key; JSON in and out; throws ApiError with the server's detail. */
export async function api(path, { method = "GET", json, body, signal, retried = false } = {}) {
  if (authRequired && !storedKey()) await askForKey();
  const headers = { ...authHeaders() };
  let payload = body;
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    payload = JSON.stringify(json);
  }
  const response = await fetch(`/api${path}`, { method, headers, body: payload, signal });
  if (response.status === 401 && authRequired && !retried) {
    forgetKey();
    await askForKey("The server refused the key; enter another.");
    return api(path, { method, json, body, signal, retried: true });
  }
  if (!response.ok) throw new ApiError(response.status, await readBody(response).catch(() => null));
  if (response.status === 204) return null;
  return readBody(response);
}

// ---- htmx: the key on every fragment request ----------------------------------------------------------
document.addEventListener("htmx:configRequest", (event) => {
  if (!authRequired) return;
  const key = storedKey();
  if (!key) {
    event.preventDefault();  // no request without a key; the dialog asks for one
    askForKey();
    return;
  }
  event.detail.headers.Authorization = `Bearer ${key}`;
});
document.addEventListener("htmx:responseError", (event) => {
  if (event.detail.xhr.status === 401 && authRequired) {
    forgetKey();
    askForKey("The server refused the key; enter another.");
  }
});
document.addEventListener("htmx:afterSwap", (event) => localTimes(event.detail.target));

// ---- DOM ----------------------------------------------------------------------------------------------
/** el("td", {class: "num"}, "text", childNode): text children become text nodes, never HTML. */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") node.className = value;
    else if (name === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export function setText(id, text) {
  const node = document.getElementById(id);
  if (node) node.textContent = text;
}

let toastTimer = null;
export function notify(message, kind = "info") {
  const toast = document.getElementById("toast");
  toast.textContent = message;
  toast.className = `toast show ${kind}`;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { toast.className = "toast"; }, 3500);
}

/** <time datetime> in fragments is written in UTC; show it in the browser's time zone. */
export function localTimes(root = document) {
  for (const node of root.querySelectorAll("time[datetime]")) {
    const date = parseDate(node.getAttribute("datetime"));
    if (date) node.textContent = formatDate(date);
  }
}

export async function copyText(text, button) {
  try {
    await navigator.clipboard.writeText(text);
    if (button) {
      const label = button.textContent;
      button.textContent = "Copied";
      setTimeout(() => { button.textContent = label; }, 1500);
    }
  } catch {
    notify("Copying needs a secure page (https or localhost); select the text instead.", "error");
  }
}

// ---- formats ------------------------------------------------------------------------------------------
/**
 * A datetime from the API as a Date: an ISO string with an offset ('…+00:00', '…Z') as written; one
 * without an offset is UTC, never the browser's local time. null when missing or unreadable.
 */
export function parseDate(value) {
  if (value === null || value === undefined || value === "") return null;
  if (typeof value === "number") return new Date(value * 1000);   // unix seconds
  const text = String(value).trim();
  const dated = /^\d{4}-\d{2}-\d{2}$/.test(text) ? `${text}T00:00:00` : text.replace(" ", "T");
  const zoned = /(Z|[+-]\d{2}(:?\d{2})?)$/i.test(dated) ? dated.replace(/([+-]\d{2})(\d{2})$/, "$1:$2") : `${dated}Z`;
  const date = new Date(zoned);
  return Number.isNaN(date.getTime()) ? null : date;
}

/** Seconds from one API datetime to another (or to now); null when either is missing. */
export function secondsBetween(start, end = new Date()) {
  const from = parseDate(start);
  const to = end instanceof Date ? end : parseDate(end);
  return from && to ? (to.getTime() - from.getTime()) / 1000 : null;
}

export function formatDate(date) {
  return date.toLocaleString(undefined, { year: "numeric", month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" });
}

export function formatBytes(bytes) {
  if (bytes === null || bytes === undefined) return "—";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) { value /= 1024; unit += 1; }
  return unit === 0 ? `${value} B` : `${value.toFixed(1)} ${units[unit]}`;
}

export function formatCount(n) {
  if (n === null || n === undefined) return "—";
  for (const [limit, suffix] of [[1e12, "T"], [1e9, "B"], [1e6, "M"], [1e3, "K"]]) {
    if (n >= limit) return `${(n / limit).toFixed(1)}${suffix}`;
  }
  return String(n);
}

export function formatNumber(n, digits = 4) {
  if (n === null || n === undefined || Number.isNaN(n)) return "—";
  if (n !== 0 && (Math.abs(n) < 1e-3 || Math.abs(n) >= 1e6)) return n.toExponential(2);
  return Number(n.toFixed(digits)).toString();
}

export function formatDuration(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "—";
  if (seconds < 1) return "< 1 s";
  const s = Math.round(seconds);
  if (s < 60) return `${s} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min ${s % 60} s`;
  const h = Math.floor(m / 60);
  if (h < 48) return `${h} h ${m % 60} min`;
  return `${Math.floor(h / 24)} d ${h % 24} h`;
}

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// ---- start ----------------------------------------------------------------------------------------------
document.getElementById("forget-key")?.addEventListener("click", () => {
  forgetKey();
  location.reload();
});
updateForgetButton();
localTimes();
if (authRequired && !storedKey()) askForKey();
