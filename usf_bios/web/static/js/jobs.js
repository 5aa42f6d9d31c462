// The jobs list: "Compare selected" is enabled once two or more jobs are ticked.

const form = document.getElementById("compare-form");
const button = document.getElementById("compare-selected");

function update() {
  const ticked = form.querySelectorAll('input[name="jobs"]:checked').length;
  button.disabled = ticked < 2;
  button.textContent = ticked >= 2 ? `Compare ${ticked} jobs` : "Compare selected";
}

form.addEventListener("change", update);
document.body.addEventListener("htmx:afterSwap", update);
form.addEventListener("submit", () => {
  // only the ticked jobs go into the URL, not the status filter
  document.getElementById("status-filter").disabled = true;
  setTimeout(() => { document.getElementById("status-filter").disabled = false; }, 0);
});
