// The jobs list: polls /v1/jobs with the tab's key, writes rows with textContent only.
"use strict";
const STATUSES = ["queued", "running", "succeeded", "failed", "cancelled"];
const POLL_MS = 1500;  // while a job is queued or running
const IDLE_MS = 5000;  // otherwise (and 3x slower in a background tab): each poll carries full results
let timer = null;
let lastBody = null;
let activeJobs = 0;

function pct(x, digits) {
  return (typeof x === "number" && isFinite(x)) ? (x * 100).toFixed(digits || 0) + "%" : "—";
}
function td(tr, text, className) {
  const cell = document.createElement("td");
  if (text !== undefined) cell.textContent = text;
  if (className) cell.className = className;
  tr.appendChild(cell);
  return cell;
}
function line(parent, text, className) {
  const div = document.createElement("div");
  div.textContent = text;
  div.className = className || "muted";
  parent.appendChild(div);
}
function reportHref(id) {
  // A plain link cannot carry an Authorization header: with a key, /jobs/{id} fetches the report.
  const enc = encodeURIComponent(id);
  return storedKey() ? "/jobs/" + enc : "/v1/jobs/" + enc + "/report";
}
function jobRow(job) {
  const tr = document.createElement("tr");
  tr.setAttribute("data-job-id", String(job.id));
  const idCell = td(tr);
  if (job.status === "succeeded") {
    const a = document.createElement("a");
    a.className = "report";
    a.href = reportHref(job.id);
    a.textContent = job.id;
    idCell.appendChild(a);
  } else {
    const code = document.createElement("code");
    code.textContent = job.id;
    idCell.appendChild(code);
  }
  const statusCell = td(tr, undefined, "status");
  const badge = document.createElement("span");
  badge.className = "badge " + (STATUSES.includes(job.status) ? job.status : "unknown");
  badge.textContent = job.status;
  statusCell.appendChild(badge);
  if (job.error) line(statusCell, job.error.code + ": " + job.error.message, "muted error");

  const p = job.progress || {};
  const progressCell = td(tr, undefined, "progress");
  const bar = document.createElement("progress");
  bar.max = 1;
  bar.value = (typeof p.fraction === "number" && isFinite(p.fraction)) ? p.fraction : 0;
  progressCell.appendChild(bar);
  const active = job.status === "running" || job.status === "queued";
  const stage = active && p.stage ? " · " + p.stage : "";
  progressCell.appendChild(document.createTextNode(" " + pct(p.fraction) + stage));
  if (active && p.message) line(progressCell, p.message);

  td(tr, job.created_at ? new Date(job.created_at).toLocaleString() : "");
  const cfg = job.config || {};
  const criterion = Array.isArray(cfg.criterion) ? cfg.criterion.join(" + ") : cfg.criterion;
  td(tr, [criterion, cfg.epsilon != null ? "ε " + cfg.epsilon : "", cfg.delta != null ? "δ " + cfg.delta : ""]
    .filter(Boolean).join(" · "));
  const r = job.result;
  const resultCell = td(tr, undefined, "result");
  if (r) {
    resultCell.textContent = r.certified ? pct(r.certified_sparsity) + " sparsity (" + r.criterion + ")"
                                         : "nothing certified";
    if (typeof r.dense_accuracy === "number") {
      line(resultCell, "accuracy " + pct(r.dense_accuracy, 1) + " → " + pct(r.pruned_accuracy, 1));
    }
  }
  return tr;
}
function render(page) {
  const rows = (page.data || []).map(jobRow);
  document.querySelector("#jobs tbody").replaceChildren(...rows);
  document.getElementById("empty").hidden = rows.length > 0;
  const running = (page.data || []).filter((j) => j.status === "queued" || j.status === "running").length;
  activeJobs = running;
  const more = page.count > rows.length ? ", newest " + rows.length + " shown" : "";
  document.getElementById("summary").textContent =
    page.count + " job" + (page.count === 1 ? "" : "s") + more + (running ? ", " + running + " in progress" : "");
}
function schedule() {
  clearTimeout(timer);
  timer = setTimeout(refresh, (activeJobs ? POLL_MS : IDLE_MS) * (document.hidden ? 3 : 1));
}
async function refresh() {
  clearTimeout(timer);
  let response;
  try {
    response = await fetch("/v1/jobs?limit=50", {headers: authHeaders("application/json"), cache: "no-store"});
  } catch (_) {
    setNote("Cannot reach the server; retrying…");
    return schedule();
  }
  if (response.status === 401) {
    setNote("");
    askForKey(storedKey() ? "That API key was not accepted. Enter another one."
                          : "This server requires an API key.", refresh);
    return;  // polling resumes once a key is entered
  }
  if (!response.ok) {
    setNote("The server answered: " + await errorMessage(response) + " Retrying…");
    return schedule();
  }
  const body = await response.text();
  if (body !== lastBody) {
    lastBody = body;
    render(JSON.parse(body));
  }
  setNote("Updated " + new Date().toLocaleTimeString() + ".");
  schedule();
}
document.addEventListener("visibilitychange", () => { if (!document.hidden) refresh(); });
refresh();
