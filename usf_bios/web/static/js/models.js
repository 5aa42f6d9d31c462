// Models: register a folder or a cache entry, scan the model folders.

import { api, el, formatCount, notify } from "./app.js";

const form = document.getElementById("register-form");
const source = document.getElementById("model-source");
const formError = document.getElementById("register-error");
const refresh = () => document.body.dispatchEvent(new CustomEvent("usf:refresh"));

const inputs = { name: "model-name", path: "model-path", repo_id: "model-repo" };

function clearErrors() {
  formError.hidden = true;
  for (const id of Object.values(inputs)) {
    document.getElementById(id).removeAttribute("aria-invalid");
    document.getElementById(`${id}-error`).textContent = "";
  }
}

function showErrors(error) {
  let placed = false;
  for (const { field, message } of error.errors) {
    const id = inputs[field];
    if (id) {
      document.getElementById(id).setAttribute("aria-invalid", "true");
      document.getElementById(`${id}-error`).textContent = message;
      placed = true;
    }
  }
  if (!placed) {
    formError.textContent = error.message;
    formError.hidden = false;
  }
}

source.addEventListener("change", () => {
  const local = source.value === "local";
  document.getElementById("path-field").hidden = !local;
  document.getElementById("repo-field").hidden = local;
});

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  clearErrors();
  const body = { name: document.getElementById("model-name").value.trim(), source: source.value };
  if (source.value === "local") body.path = document.getElementById("model-path").value.trim();
  else body.repo_id = document.getElementById("model-repo").value.trim();
  const missing = [["name", body.name], ...(source.value === "local" ? [["path", body.path]] : [["repo_id", body.repo_id]])]
    .filter(([, value]) => !value).map(([field]) => ({ field, message: "required" }));
  if (missing.length) {
    showErrors({ errors: missing, message: "" });
    return;
  }
  const button = document.getElementById("register-submit");
  button.disabled = true;
  try {
    const model = await api("/models", { method: "POST", json: body });
    notify(`Registered ${model.name}: ${formatCount(model.parameters)} parameters.`);
    form.reset();
    source.dispatchEvent(new Event("change"));
    refresh();
  } catch (error) {
    showErrors(error);
  } finally {
    button.disabled = false;
  }
});

document.getElementById("scan-models").addEventListener("click", async (event) => {
  const button = event.currentTarget;
  const box = document.getElementById("scan-result");
  button.disabled = true;
  try {
    const result = await api("/models/scan", { method: "POST" });
    const found = result.registered.length
      ? `Registered ${result.registered.map((m) => m.name).join(", ")}.`
      : "No new model found.";
    box.replaceChildren(el("p", {}, found));
    if (result.skipped.length) {
      box.append(el("details", {}, el("summary", {}, `${result.skipped.length} folder(s) skipped`),
        el("ul", { class: "small" }, result.skipped.map((s) => el("li", {}, el("code", {}, s.path), ` — ${s.reason}`)))));
    }
    box.hidden = false;
    refresh();
  } catch (error) {
    notify(error.message, "error");
  } finally {
    button.disabled = false;
  }
});

// Download from the Hugging Face Hub or ModelScope: start a pull, then show its bytes until the model is registered.
const pullForm = document.getElementById("pull-form");
const megabytes = (n) => `${(n / 1e6).toFixed(1)} MB`;

async function followPull(pull) {
  const bar = document.getElementById("pull-bar");
  const text = document.getElementById("pull-text");
  document.getElementById("pull-progress").hidden = false;
  for (;;) {
    bar.max = pull.total_bytes || 1;
    bar.value = Math.min(pull.bytes_done, bar.max);
    text.textContent = pull.total_bytes === null
      ? `Asking the hub about ${pull.repo_id}…`
      : `${pull.repo_id}: ${megabytes(pull.bytes_done)} of ${megabytes(pull.total_bytes)} (${pull.files} files)`;
    if (pull.status !== "running") return pull;
    await new Promise((resolve) => setTimeout(resolve, 500));
    pull = await api(`/models/pulls/${encodeURIComponent(pull.id)}`);
  }
}

if (pullForm) {
  const source = document.getElementById("pull-source");
  source.addEventListener("change", () => {
    document.getElementById("pull-revision").placeholder = source.selectedOptions[0].dataset.revision;
  });
  pullForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    const repo = document.getElementById("pull-repo");
    const error = document.getElementById("pull-error");
    const button = document.getElementById("pull-submit");
    error.hidden = true;
    for (const id of ["pull-repo", "pull-revision"]) {
      document.getElementById(id).removeAttribute("aria-invalid");
      document.getElementById(`${id}-error`).textContent = "";
    }
    const body = { repo_id: repo.value.trim(), source: source.value };
    const revision = document.getElementById("pull-revision").value.trim();
    if (revision) body.revision = revision;
    if (!body.repo_id) {
      repo.setAttribute("aria-invalid", "true");
      document.getElementById("pull-repo-error").textContent = "required";
      return;
    }
    button.disabled = true;
    try {
      const pull = await followPull(await api("/models/pull", { method: "POST", json: body }));
      if (pull.status === "completed") {
        notify(`Downloaded and registered ${pull.model.name}: ${formatCount(pull.model.parameters)} parameters.`);
        refresh();
      } else {
        error.textContent = pull.error;
        error.hidden = false;
      }
    } catch (failure) {
      const placed = (failure.errors || []).filter(({ field }) => ["repo_id", "revision"].includes(field));
      for (const { field, message } of placed) {
        const id = field === "repo_id" ? "pull-repo" : "pull-revision";
        document.getElementById(id).setAttribute("aria-invalid", "true");
        document.getElementById(`${id}-error`).textContent = message;
      }
      if (!placed.length) {
        error.textContent = failure.message;
        error.hidden = false;
      }
    } finally {
      button.disabled = false;
    }
  });
}
