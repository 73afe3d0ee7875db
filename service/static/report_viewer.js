// /jobs/{id}: fetches the report with the tab's key and shows it (parsed, never written as markup).
"use strict";
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
