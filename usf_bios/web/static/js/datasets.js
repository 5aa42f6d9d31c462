// The datasets page: upload with a progress bar (XMLHttpRequest reports upload progress, fetch does not);
// a refused file shows its line and reason; an accepted one opens its page.

import { authHeaders, authRequired, askForKey, storedKey } from "./app.js";

const form = document.getElementById("upload-form");
const fileInput = document.getElementById("upload-file");
const progress = document.getElementById("upload-progress");
const bar = document.getElementById("upload-bar");
const percent = document.getElementById("upload-percent");
const errorBox = document.getElementById("upload-error");
const submit = document.getElementById("upload-submit");

function showError(title, line, reason) {
  document.getElementById("upload-error-title").textContent = title;
  document.getElementById("upload-error-line").textContent = line;
  document.getElementById("upload-error-reason").textContent = reason;
  document.getElementById("upload-error-line").hidden = !line;
  errorBox.hidden = false;
}

function setProgress(fraction) {
  const value = Math.round(fraction * 100);
  bar.value = value;
  percent.textContent = `${value}%`;
}

function describe(status, body) {
  if (status === 422 && body && body.line !== undefined) {
    const where = body.line ? `${body.unit || "line"} ${body.line}` : "";
    const line = where ? `${body.file}, ${where}` : body.file;
    return ["The file was not accepted", line, body.reason];
  }
  const detail = body && typeof body.detail === "string" ? body.detail : `The server answered ${status}.`;
  const titles = { 409: "That name is taken", 413: "The file is too large", 415: "Not a dataset file" };
  return [titles[status] || "The upload failed", "", detail];
}

function upload(data) {
  return new Promise((resolve) => {
    const request = new XMLHttpRequest();
    request.open("POST", "/api/datasets");
    for (const [name, value] of Object.entries(authHeaders())) request.setRequestHeader(name, value);
    request.responseType = "json";
    request.upload.addEventListener("progress", (event) => {
      if (event.lengthComputable) setProgress(event.loaded / event.total);
    });
    request.addEventListener("load", () => resolve({ status: request.status, body: request.response }));
    request.addEventListener("error", () => resolve({ status: 0, body: null }));
    request.send(data);
  });
}

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  errorBox.hidden = true;
  if (!fileInput.files.length) {
    showError("Choose a file first", "", "A .jsonl, .json or .csv file.");
    fileInput.focus();
    return;
  }
  if (authRequired && !storedKey()) await askForKey();
  submit.disabled = true;
  progress.hidden = false;
  setProgress(0);
  const data = new FormData();
  data.append("name", document.getElementById("upload-name").value.trim());
  data.append("format", document.getElementById("upload-format").value);
  data.append("file", fileInput.files[0]);
  const { status, body } = await upload(data);
  submit.disabled = false;
  if (status === 201) {
    setProgress(1);
    window.location.assign(`/datasets/${encodeURIComponent(body.id)}`);
    return;
  }
  progress.hidden = true;
  if (status === 0) showError("The upload failed", "", "The server cannot be reached.");
  else showError(...describe(status, body));
  errorBox.focus();
});
