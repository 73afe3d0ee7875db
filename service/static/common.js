// API-key handling shared by the jobs page and the report viewer (loaded first).
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
