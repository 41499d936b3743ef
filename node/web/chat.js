// Hearth chat page: streams answers from /v1/chat/completions (OpenAI-compatible SSE).
// All text from the server or the user is inserted with textContent / text nodes, never innerHTML.
"use strict";

// ---------------------------------------------------------------------------
// Page state
// ---------------------------------------------------------------------------
const $ = (id) => document.getElementById(id);
const els = {
  messages: $("messages"),
  form: $("chat-form"),
  prompt: $("prompt"),
  send: $("send"),
  stop: $("stop"),
  newChat: $("new-chat"),
  temperature: $("temperature"),
  maxTokens: $("max-tokens"),
  status: $("status"),
  modelName: $("model-name"),
};

let model = null;      // model id from /v1/models
let conversation = []; // [{role, content}] in order; assistant entries grow while streaming
let controller = null; // AbortController of the generation in progress, or null

function setStatus(text, isError = false) {
  els.status.textContent = text;
  els.status.classList.toggle("error", isError);
}

const shortId = (peerId) => String(peerId).slice(-6);

// ---------------------------------------------------------------------------
// Model
// ---------------------------------------------------------------------------
async function loadModel(signal) {
  const response = await apiFetch("/v1/models", { signal }, async (r) => {
    setStatus(`API key required: ${await errorMessage(r)}`, true);
  });
  if (!response.ok) throw new Error(await errorMessage(response));
  const id = (await response.json())?.data?.[0]?.id;
  if (typeof id !== "string") throw new Error("The node lists no model.");
  model = id;
  els.modelName.textContent = id;
  return id;
}

// ---------------------------------------------------------------------------
// Transcript rendering
// ---------------------------------------------------------------------------

// Scroll the transcript to the end, unless the user scrolled up to read something.
function stickToBottom(wasAtBottom) {
  if (wasAtBottom) els.messages.scrollTop = els.messages.scrollHeight;
}
function isAtBottom() {
  const m = els.messages;
  return m.scrollHeight - m.scrollTop - m.clientHeight < 40;
}

function addMessage(role, text) {
  const atBottom = isAtBottom();
  const article = document.createElement("article");
  article.className = `message ${role}`;
  const who = document.createElement("p");
  who.className = "who";
  who.textContent = role === "user" ? "You" : "Assistant";
  const content = document.createElement("div");
  content.className = "content";
  const textNode = document.createTextNode(text);
  content.append(textNode);
  article.append(who, content);

  let meta = null;
  if (role === "assistant") {
    meta = document.createElement("div");
    meta.className = "meta";
    const copy = document.createElement("button");
    copy.className = "copy";
    copy.type = "button";
    copy.textContent = "Copy";
    copy.addEventListener("click", () => copyText(content.textContent, copy));
    article.append(meta, copy);
  }
  els.messages.append(article);
  stickToBottom(atBottom);
  return { article, content, textNode, meta };
}

function addError(article, message) {
  const p = document.createElement("p");
  p.className = "error";
  p.textContent = message;
  const meta = article.querySelector(".meta");
  if (meta) meta.before(p);
  else article.append(p);
  return p;
}

function metaLine(meta, text, className) {
  const p = document.createElement("p");
  if (className) p.className = className;
  p.textContent = text;
  meta.append(p);
}

// The route, recoveries and speed from the final chunk's "hearth" object.
function renderHearth(meta, hearth) {
  if (Array.isArray(hearth.route) && hearth.route.length) {
    const hops = hearth.route.map((hop) => `${shortId(hop.peer_id)} [${hop.start}:${hop.end}]`);
    const local = Number.isInteger(hearth.local_blocks) && hearth.local_blocks > 0
      ? [`this device [0:${hearth.local_blocks}]`] : [];  // blocks the API's client ran itself
    metaLine(meta, `Route: ${local.concat(hops).join(" → ")}`, "route");
  }
  for (const r of Array.isArray(hearth.recoveries) ? hearth.recoveries : []) {
    const blocks = Array.isArray(r.blocks) ? `[${r.blocks[0]}:${r.blocks[1]}]` : "";
    const replacements = (Array.isArray(r.replacements) ? r.replacements : []).map(shortId).join(", ") || "—";
    const seconds = Number(r.seconds ?? 0).toFixed(2);
    metaLine(meta, `Failover: ${shortId(r.failed_peer)} ${blocks} failed (${r.reason}); ` +
      `replayed ${r.tokens_replayed} tokens on ${replacements} in ${seconds} s`, "failover");
  }
  if (typeof hearth.tokens === "number" && typeof hearth.tokens_per_s === "number") {
    metaLine(meta, `${hearth.tokens} tokens · ${hearth.tokens_per_s.toFixed(1)} tok/s`, "stats");
  }
}

// Clipboard API where allowed (secure contexts), else the old textarea + execCommand way.
async function copyText(text, button) {
  let ok = false;
  try {
    await navigator.clipboard.writeText(text);
    ok = true;
  } catch {
    const area = document.createElement("textarea");
    area.value = text;
    area.setAttribute("readonly", "");
    area.setAttribute("aria-hidden", "true");
    area.tabIndex = -1;
    area.className = "offscreen";
    document.body.append(area);
    area.select();
    try {
      ok = document.execCommand("copy");
    } catch {
      ok = false;
    }
    area.remove();
    button.focus();
  }
  button.textContent = ok ? "Copied" : "Copy failed";
  setTimeout(() => { button.textContent = "Copy"; }, 1500);
}

// ---------------------------------------------------------------------------
// Streaming
// ---------------------------------------------------------------------------

// Split a text stream into server-sent events; calls onData(data) per event's data, stops at [DONE].
async function readEvents(body, onData) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  const handle = (block) => {
    const data = block.split("\n")
      .filter((line) => line.startsWith("data:"))
      .map((line) => line.slice(5).replace(/^ /, ""))
      .join("\n");
    if (!data) return true;
    if (data === "[DONE]") return false;
    onData(data);
    return true;
  };
  for (;;) {
    const { value, done } = await reader.read();
    buffer += decoder.decode(value ?? new Uint8Array(), { stream: !done });
    buffer = buffer.replace(/\r\n/g, "\n"); // a lone \r at the end may pair with the next read's \n
    let end;
    while ((end = buffer.indexOf("\n\n")) !== -1) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      if (!handle(block)) {
        reader.cancel().catch(() => {});
        return;
      }
    }
    if (done) {
      if (buffer.trim()) handle(buffer);
      return;
    }
  }
}

function setGenerating(on, article) {
  els.send.disabled = on;
  els.stop.disabled = !on;
  article?.classList.toggle("streaming", on);
}

async function send(text) {
  const history = conversation
    .filter((m) => m.role === "user" || m.content) // an empty (failed) answer is left out
    .map(({ role, content }) => ({ role, content }));
  const user = { role: "user", content: text };
  conversation.push(user);
  history.push({ role: user.role, content: user.content });
  addMessage("user", text);

  const answer = { role: "assistant", content: "" };
  conversation.push(answer);
  const view = addMessage("assistant", "");

  const mine = new AbortController();
  controller = mine;
  const signal = mine.signal;
  setGenerating(true, view.article);
  setStatus("Generating…");

  let tokens = null;
  let failed = false;
  let keyError = null; // the inline error shown while waiting for an API key
  try {
    const modelId = model ?? await loadModel(signal);
    const body = {
      model: modelId,
      messages: history,
      stream: true,
      temperature: Number(els.temperature.value || 0.7),
      max_tokens: parseInt(els.maxTokens.value || "256", 10),
      stream_options: { include_usage: true },
    };
    const response = await apiFetch("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
      signal,
    }, async (r) => {
      const message = await errorMessage(r);
      keyError?.remove();
      keyError = addError(view.article, message);
      setStatus(message, true);
    });
    keyError?.remove();
    if (signal.aborted) throw new DOMException("Aborted", "AbortError");
    setStatus("Generating…");
    if (!response.ok) throw new Error(await errorMessage(response));

    await readEvents(response.body, (data) => {
      let chunk;
      try {
        chunk = JSON.parse(data);
      } catch {
        return; // not JSON: ignore
      }
      if (chunk.error) {
        failed = true;
        const message = chunk.error.message || "The generation failed.";
        addError(view.article, message);
        setStatus(message, true);
        return;
      }
      const choice = chunk.choices?.[0];
      const delta = choice?.delta?.content;
      if (typeof delta === "string" && delta) {
        const atBottom = isAtBottom();
        view.textNode.appendData(delta);
        answer.content += delta;
        stickToBottom(atBottom);
      }
      if (choice?.finish_reason != null && chunk.hearth) {
        renderHearth(view.meta, chunk.hearth);
        if (typeof chunk.hearth.tokens === "number") tokens ??= chunk.hearth.tokens;
      }
      if (typeof chunk.usage?.completion_tokens === "number") tokens = chunk.usage.completion_tokens;
    });
    if (!failed) setStatus(tokens == null ? "Done" : `Done: ${tokens} tokens`);
  } catch (err) {
    if (!view.article.isConnected) {
      // "New chat" cleared the transcript while this answer was running: nothing to report
    } else if (err?.name === "AbortError") {
      view.article.classList.add("stopped");
      setStatus("Stopped");
    } else {
      const message = err?.message || String(err);
      addError(view.article, message);
      setStatus(message, true);
    }
  } finally {
    view.article.classList.remove("streaming");
    if (controller === mine) {
      controller = null;
      setGenerating(false);
    }
  }
}

// ---------------------------------------------------------------------------
// Wiring
// ---------------------------------------------------------------------------
setupKeyForm();

els.form.addEventListener("submit", (event) => {
  event.preventDefault();
  if (controller) return; // already generating
  const text = els.prompt.value;
  if (!text.trim()) {
    els.prompt.focus();
    return;
  }
  els.prompt.value = "";
  send(text);
});

// Enter sends, Shift+Enter inserts a newline (and never while an IME is composing).
els.prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    els.form.requestSubmit();
  }
});

els.stop.addEventListener("click", () => controller?.abort());

els.newChat.addEventListener("click", () => {
  // Abort a running answer; its own cleanup then sees it is no longer current and stays quiet.
  controller?.abort();
  controller = null;
  setGenerating(false);
  conversation = [];
  els.messages.replaceChildren();
  setStatus("Ready");
  els.prompt.focus();
});

loadModel().then(
  () => { if (!controller) setStatus("Ready"); },
  (err) => {
    els.modelName.textContent = "unavailable";
    setStatus(err?.message || String(err), true);
  },
);
