// Hearth pages: what both pages share to call the API (loaded before chat.js and swarm.js).
"use strict";

// ---------------------------------------------------------------------------
// API key: kept for the tab, sent as a bearer token, asked for on a 401
// ---------------------------------------------------------------------------
const KEY_STORAGE = "hearth-api-key";
let keyWaiters = []; // resolve functions of requests waiting for a key

function storedKey() {
  try {
    return sessionStorage.getItem(KEY_STORAGE) || "";
  } catch {
    return ""; // storage may be disabled
  }
}

function withAuth(init = {}) {
  const headers = new Headers(init.headers || {});
  const key = storedKey();
  if (key) headers.set("Authorization", `Bearer ${key}`);
  return { ...init, headers };
}

// Show #key-form and resolve once the user submitted a key (reject if `signal` aborts first).
function waitForKey(signal) {
  const form = document.getElementById("key-form");
  if (form.hidden) {
    form.hidden = false;
    document.getElementById("api-key").focus();
  }
  return new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(new DOMException("Aborted", "AbortError"));
    keyWaiters.push(resolve);
    signal?.addEventListener("abort", () => {
      keyWaiters = keyWaiters.filter((w) => w !== resolve);
      reject(new DOMException("Aborted", "AbortError"));
    }, { once: true });
  });
}

function setupKeyForm() {
  const form = document.getElementById("key-form");
  const input = document.getElementById("api-key");
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    try {
      sessionStorage.setItem(KEY_STORAGE, input.value.trim());
    } catch {
      /* storage disabled: the key cannot be kept */
    }
    input.value = "";
    form.hidden = true;
    const waiters = keyWaiters;
    keyWaiters = [];
    waiters.forEach((resolve) => resolve());
  });
}

// fetch() with the stored key; on 401 calls onUnauthorized(response), asks for a key and retries.
async function apiFetch(url, init = {}, onUnauthorized) {
  for (;;) {
    const response = await fetch(url, withAuth(init));
    if (response.status !== 401) return response;
    if (onUnauthorized) await onUnauthorized(response);
    await waitForKey(init.signal);
  }
}

// The message of an OpenAI error body, or a generic one.
async function errorMessage(response) {
  const text = await response.text().catch(() => "");
  try {
    const message = JSON.parse(text)?.error?.message;
    if (typeof message === "string" && message) return message;
  } catch {
    /* not JSON */
  }
  return `HTTP ${response.status}${response.statusText ? " " + response.statusText : ""}`;
}
