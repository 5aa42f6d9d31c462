// API keys: create (the key is shown once), revoke with a second click to confirm.

import { api, copyText, notify } from "./app.js";

const form = document.getElementById("key-create-form");
const error = document.getElementById("new-key-error");
const refresh = () => document.body.dispatchEvent(new CustomEvent("usf:refresh"));

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  error.textContent = "";
  const name = document.getElementById("new-key-name").value.trim();
  if (!name) {
    error.textContent = "Give the key a name.";
    return;
  }
  try {
    const created = await api("/keys", { method: "POST", json: { name, is_admin: document.getElementById("new-key-admin").checked } });
    document.getElementById("new-key-value").textContent = created.key;
    document.getElementById("new-key").hidden = false;
    form.reset();
    refresh();
  } catch (err) {
    error.textContent = err.status === 403 ? "Creating keys needs an admin key." : err.message;
  }
});

document.getElementById("copy-key").addEventListener("click", (event) =>
  copyText(document.getElementById("new-key-value").textContent, event.currentTarget));

// Revoke buttons come with the htmx fragment: one delegated listener, no inline handlers.
document.getElementById("keys-table").addEventListener("click", async (event) => {
  const button = event.target.closest("button[data-revoke]");
  if (!button) return;
  if (!button.classList.contains("confirm")) {
    button.classList.add("confirm");
    button.textContent = "Confirm revoke";
    setTimeout(() => {
      button.classList.remove("confirm");
      button.textContent = "Revoke";
    }, 4000);
    return;
  }
  button.disabled = true;
  try {
    await api(`/keys/${encodeURIComponent(button.dataset.revoke)}`, { method: "DELETE" });
    notify("Key revoked; it stops working at once.");
    refresh();
  } catch (err) {
    notify(err.message, "error");
    button.disabled = false;
  }
});
