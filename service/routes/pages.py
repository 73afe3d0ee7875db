"""Pages for people: ``/`` lists the jobs (live), ``/jobs/{id}`` shows a report when the server needs API keys.

Both pages are static: they hold no job data, so they need no authentication and reflect nothing
from the request. A small inline script fetches ``/v1/…`` with the tab's API key, if one is set,
and writes data into the page with ``textContent`` only. The key comes from a form or a
``?key=`` query (taken out of the address bar at once), lives in ``sessionStorage`` and is sent
as ``Authorization: Bearer``; it is never written into the page. A Content-Security-Policy
admits only these exact scripts (by hash) and same-origin requests; no external assets.

Without API keys a browser can open ``/v1/jobs/{id}/report`` directly (it is plain HTML). With
keys, a link cannot carry the header, so ``/jobs/{id}`` fetches that same report with the key
and shows it (its inline scripts, of which it has none, would not run).
"""

from __future__ import annotations

import base64
import hashlib
from functools import cache

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

from ..report_page import BASE_CSS

router = APIRouter(tags=["pages"], include_in_schema=False)

PAGE_CSS = """
header { display: flex; align-items: baseline; gap: 1em; flex-wrap: wrap; }
button.link { background: none; border: 0; color: #1f618d; text-decoration: underline; cursor: pointer; padding: 0;
  font: inherit; font-size: .9em; }
#keyform { border: 1px solid var(--line); border-radius: 6px; padding: .8em 1em; margin: 1em 0; max-width: 560px; }
#keyform input { font: inherit; padding: .35em .5em; width: 22em; max-width: 100%; }
#keymsg { margin-top: 0; font-weight: 600; }
table#jobs { width: 100%; } #jobs td { padding: 6px 10px; }
#jobs progress { width: 110px; vertical-align: middle; } #jobs td.progress { white-space: nowrap; }
#jobs td.progress div { white-space: normal; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: .85em; background: #eaecee; }
.badge.queued { background: #fdebd0; } .badge.running { background: #d6eaf8; } .badge.succeeded { background: #d5f5e3; }
.badge.failed { background: #fadbd8; } .badge.cancelled { background: #e5e7e9; }
.error { color: var(--bad); max-width: 28em; }
"""

KEY_FORM = """<form id="keyform" hidden autocomplete="off">
<p id="keymsg"></p>
<label>API key <input name="key" type="password" autocomplete="off" spellcheck="false" required></label>
<button class="button" type="submit">Use this key</button>
<p class="muted">Kept in this browser tab only (sessionStorage) and sent as <code>Authorization: Bearer</code>.</p>
</form>"""

#: API-key handling shared by both pages.
COMMON_JS = r"""
"use strict";
const KEY_ITEM = "certiprune.apiKey";
function storedKey() { try { return sessionStorage.getItem(KEY_ITEM) || ""; } catch (_) { return ""; } }
function storeKey(key) {
  try { if (key) sessionStorage.setItem(KEY_ITEM, key); else sessionStorage.removeItem(KEY_ITEM); } catch (_) {}
  const forget = document.getElementById("forget");
  if (forget) forget.hidden = !key;
}
function takeKeyFromUrl() {
  const url = new URL(location.href);
  if (url.searchParams.has("key")) {
    storeKey((url.searchParams.get("key") || "").trim());
    url.searchParams.delete("key");
    history.replaceState(null, "", url.pathname + url.search + url.hash);
  }
  storeKey(storedKey());
}
function authHeaders(accept) {
  const headers = {"Accept": accept};
  const key = storedKey();
  if (key) headers["Authorization"] = "Bearer " + key;
  return headers;
}
function setNote(text) { document.getElementById("note").textContent = text; }
function askForKey(message, onKey) {
  const form = document.getElementById("keyform");
  document.getElementById("keymsg").textContent = message;
  form.hidden = false;
  form.onsubmit = (event) => {
    event.preventDefault();
    storeKey(form.elements.key.value.trim());
    form.elements.key.value = "";
    form.hidden = true;
    onKey();
  };
  form.elements.key.focus();
}
async function errorMessage(response) {
  try { const body = await response.json(); return body.error.message || ("HTTP " + response.status); }
  catch (_) { return "HTTP " + response.status; }
}
document.getElementById("forget").addEventListener("click", () => { storeKey(""); location.reload(); });
takeKeyFromUrl();
"""

JOBS_JS = r"""
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
"""

VIEWER_JS = r"""
const segment = location.pathname.split("/")[2] || "";
const reportUrl = "/v1/jobs/" + segment + "/report";

function showReport(html) {
  // Parsed, not written: scripts in parsed markup never run (and the policy admits none).
  const doc = new DOMParser().parseFromString(html, "text/html");
  document.title = doc.title;
  for (const style of doc.head.querySelectorAll("style")) document.head.appendChild(document.importNode(style, true));
  const nodes = Array.from(doc.body.childNodes, (node) => document.importNode(node, true));
  document.body.replaceChildren(...nodes);
  for (const a of document.querySelectorAll("a[data-artifact]")) a.addEventListener("click", download);
}
async function download(event) {
  if (!storedKey()) return;  // no key: the plain link works
  event.preventDefault();
  const link = event.currentTarget;
  const label = link.textContent;
  link.textContent = "Downloading…";
  try {
    const response = await fetch(link.href, {headers: authHeaders("application/octet-stream")});
    if (!response.ok) throw new Error(await errorMessage(response));
    const blob = await response.blob();
    const expected = response.headers.get("X-Checksum-SHA256") || "";
    if (expected && window.crypto && crypto.subtle) {
      const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", await blob.arrayBuffer()));
      const hex = Array.from(digest, (b) => b.toString(16).padStart(2, "0")).join("");
      if (hex !== expected) throw new Error("checksum mismatch; try again");
    }
    const url = URL.createObjectURL(blob);
    const save = document.createElement("a");
    save.href = url;
    save.download = link.getAttribute("download") || "pruned.pt";
    document.body.appendChild(save);
    save.click();
    save.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60000);
    link.textContent = label;
  } catch (error) {
    link.textContent = label + " — failed: " + error.message;
  }
}
async function load() {
  if (!/^[A-Za-z0-9_-]+$/.test(segment)) { setNote("This address does not name a job."); return; }
  let response;
  try {
    response = await fetch(reportUrl, {headers: authHeaders("text/html"), cache: "no-store"});
  } catch (_) {
    setNote("Cannot reach the server; retrying…");
    setTimeout(load, 2000);
    return;
  }
  if (response.status === 401) {
    setNote("");
    askForKey(storedKey() ? "That API key was not accepted. Enter another one."
                          : "This server requires an API key.", load);
    return;
  }
  const type = response.headers.get("Content-Type") || "";
  if (response.ok && type.startsWith("text/html")) { showReport(await response.text()); return; }
  let code = "", message = "HTTP " + response.status;
  try { const body = await response.json(); code = body.error.code; message = body.error.message; } catch (_) {}
  document.getElementById("heading").textContent = "No report yet";
  setNote(message);
  if (code === "job_not_finished") setTimeout(load, 2000);  // queued or running: show it once it succeeds
}
load();
"""


def _page(title: str, body: str, script: str) -> str:
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>{title}</title>
<style>{BASE_CSS}{PAGE_CSS}</style></head><body>
{body}
<script>{script}</script>
</body></html>"""


def _csp(script: str) -> str:
    digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode("ascii")
    return ("default-src 'none'; "
            f"script-src 'sha256-{digest}'; "
            "style-src 'unsafe-inline'; img-src 'self' data:; connect-src 'self'; "
            "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


@cache
def jobs_page() -> tuple[str, str]:
    """(html, content security policy) of the jobs list."""
    body = f"""<header><h1>certiprune jobs</h1><span id="summary" class="muted"></span>
<button id="forget" class="link" type="button" hidden>forget the API key</button></header>
{KEY_FORM}
<p id="note" class="muted" role="status"></p>
<table id="jobs"><thead><tr><th>job (report)</th><th>status</th><th>progress</th><th>submitted</th>
<th>settings</th><th>result</th></tr></thead><tbody></tbody></table>
<p id="empty" hidden>No jobs yet. Submit one with <code>certiprune submit model.pt --data cal.npz --wait</code>
or <code>POST /v1/jobs</code>.</p>
<noscript><p>This page needs JavaScript to list jobs. The same list is at <a href="/v1/jobs">/v1/jobs</a>.</p>
</noscript>"""
    script = COMMON_JS + JOBS_JS
    return _page("certiprune jobs", body, script), _csp(script)


@cache
def report_viewer_page() -> tuple[str, str]:
    """(html, content security policy) of the page that fetches a report with the tab's API key."""
    body = f"""<nav><a href="/">← all jobs</a>
<button id="forget" class="link" type="button" hidden>forget the API key</button></nav>
<h1 id="heading">Loading the report…</h1>
{KEY_FORM}
<p id="note" class="muted" role="status"></p>
<noscript><p>Without JavaScript, open <code>/v1/jobs/&lt;id&gt;/report</code> with an
<code>Authorization: Bearer</code> header.</p></noscript>"""
    script = COMMON_JS + VIEWER_JS
    return _page("certiprune report", body, script), _csp(script)


def _html(page: tuple[str, str]) -> HTMLResponse:
    html, csp = page
    return HTMLResponse(html, headers={
        "Content-Security-Policy": csp,
        "Referrer-Policy": "no-referrer",  # a ?key= never leaves in a Referer header
        "X-Content-Type-Options": "nosniff",
        "X-Frame-Options": "DENY",
        "Cache-Control": "no-store",
    })


@router.get("/", response_class=HTMLResponse)
def jobs_list_page() -> HTMLResponse:
    """The caller's 50 newest jobs, refreshed every 1.5 s while one is queued or running (else every 5 s)."""
    return _html(jobs_page())


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_report_page(job_id: str) -> HTMLResponse:
    """A job's report, fetched in the browser with the tab's API key. ``job_id`` is read by the script from
    the address, never written into the page by the server."""
    del job_id
    return _html(report_viewer_page())


__all__ = ["router"]
