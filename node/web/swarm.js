// Hearth swarm page: polls /api/swarm and draws block coverage, the nodes and recent events.
// All text from the server is inserted with textContent, never innerHTML.
"use strict";

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------
const POLL_MS = 2000;
const $ = (id) => document.getElementById(id);
const els = {
  model: $("swarm-model"),
  summary: $("summary"),
  updated: $("updated"),
  coverage: $("coverage"),
  axisStart: $("axis-start"),
  axisEnd: $("axis-end"),
  peers: document.querySelector("#peers tbody"),
  events: $("events"),
};

const shortId = (peerId) => String(peerId).slice(-6);
const pad = (n) => String(n).padStart(2, "0");

// Local HH:MM:SS of a unix time in seconds.
function clock(unixSeconds) {
  const d = new Date(unixSeconds * 1000);
  return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

// Set text only when it changed, so live regions are not re-announced every poll.
function setText(el, text) {
  if (el.textContent !== text) el.textContent = text;
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text != null) node.textContent = text;
  return node;
}

// A half-open block range [a, b) as inclusive words: "block 4" or "blocks 10–19".
function blockRange([a, b]) {
  return b - a === 1 ? `block ${a}` : `blocks ${a}–${b - 1}`;
}

// ---------------------------------------------------------------------------
// Rendering
// ---------------------------------------------------------------------------
function renderSummary(data, blocks) {
  const peers = Array.isArray(data.peers) ? data.peers : [];
  const gaps = Array.isArray(data.gaps) ? data.gaps : [];
  const online = peers.filter((p) => p.online).length;
  let text = `${online} ${online === 1 ? "node" : "nodes"} online · `;
  if (gaps.length) {
    text += `${gaps.length === 1 ? "gap" : "gaps"}: ${gaps.map(blockRange).join(", ")}`;
  } else {
    text += blocks > 0 ? `blocks 0–${blocks - 1} fully covered` : "no blocks";
  }
  setText(els.summary, text);
  els.summary.dataset.online = String(online);
  els.summary.dataset.gaps = String(gaps.length);
  els.summary.classList.toggle("has-gaps", gaps.length > 0);
  els.coverage.setAttribute("aria-label", `Block coverage: ${text}`);
}

function renderCoverage(coverage, blocks) {
  // Reuse the cells while the block count stays the same (keeps hover titles stable).
  if (els.coverage.children.length !== blocks) {
    const cells = [];
    for (let i = 0; i < blocks; i++) cells.push(el("div", "block"));
    els.coverage.replaceChildren(...cells);
    els.coverage.style.setProperty("--blocks", String(Math.max(blocks, 1)));
  }
  [...els.coverage.children].forEach((cell, i) => {
    const count = Number(coverage[i] ?? 0);
    cell.dataset.count = String(count);
    cell.title = `block ${i}: served by ${count} ${count === 1 ? "node" : "nodes"}`;
    cell.classList.toggle("gap", count === 0);
    cell.classList.toggle("multi", count >= 2);
  });
  setText(els.axisStart, blocks > 0 ? "block 0" : "");
  setText(els.axisEnd, blocks > 0 ? `block ${blocks - 1}` : "");
}

function peerRow(peer, blocks) {
  const row = el("tr", peer.online ? "peer" : "peer offline");
  row.dataset.peerId = String(peer.peer_id);

  const name = el("th");
  name.scope = "row";
  const id = el("code", "peer-id", shortId(peer.peer_id));
  id.title = String(peer.peer_id);
  name.append(id);
  if (peer.self) name.append(" ", el("span", "self", "(this node)"));

  // The span along the block axis: CSS custom properties set through the CSSOM (allowed by the CSP).
  const spanCell = el("td");
  const bar = el("div", "span-bar");
  bar.setAttribute("aria-hidden", "true");
  const fill = el("div", "span-fill");
  const n = Math.max(blocks, 1);
  fill.style.setProperty("--start", String(Math.min(peer.start / n, 1)));
  fill.style.setProperty("--width", String(Math.max(Math.min((peer.end - peer.start) / n, 1), 0)));
  bar.append(fill);
  spanCell.append(bar);

  const range = el("td", "num", `${peer.start}–${peer.end}`);
  range.title = `blocks ${peer.start} to ${peer.end - 1} (end exclusive)`;

  const rtt = typeof peer.rtt_ms === "number" ? `${Math.round(peer.rtt_ms)} ms` : "—";
  const tput = Number(peer.throughput ?? 0);
  const throughput = `${tput.toFixed(tput < 10 ? 1 : 0)} tok/s`;

  row.append(
    name,
    spanCell,
    range,
    el("td", null, String(peer.quantization ?? "—")),
    el("td", "num", String(peer.sessions ?? 0)),
    el("td", "num", String(peer.free_cache_tokens ?? 0)),
    el("td", "num", rtt),
    el("td", "num", throughput),
    el("td", "state", peer.online ? "online" : "not answering"),
  );
  return row;
}

function renderPeers(peers, blocks) {
  if (!peers.length) {
    const cell = el("td", "empty", "No nodes known");
    cell.colSpan = 9;
    const row = el("tr");
    row.append(cell);
    els.peers.replaceChildren(row);
    return;
  }
  // Sorted along the block axis, then by id, so rows do not jump between polls.
  const sorted = [...peers].sort((a, b) => a.start - b.start || a.end - b.end ||
    String(a.peer_id).localeCompare(String(b.peer_id)));
  els.peers.replaceChildren(...sorted.map((p) => peerRow(p, blocks)));
}

function renderEvents(events) {
  if (!events.length) {
    els.events.replaceChildren(el("li", "empty", "No events yet"));
    return;
  }
  els.events.replaceChildren(...events.map((event) => {
    const item = el("li", `event ${String(event.kind ?? "")}`);
    const known = Number.isFinite(event.time);
    const time = el("time", null, known ? clock(event.time) : "--:--:--");
    if (known) time.dateTime = new Date(event.time * 1000).toISOString();
    item.append(time, " ", el("span", "kind", String(event.kind ?? "")), " ", el("span", "text", String(event.text ?? "")));
    return item;
  }));
}

function render(data) {
  const blocks = Math.max(0, Number(data.model?.blocks ?? data.coverage?.length ?? 0));
  setText(els.model, String(data.model?.id ?? "unknown"));
  renderSummary(data, blocks);
  renderCoverage(Array.isArray(data.coverage) ? data.coverage : [], blocks);
  renderPeers(Array.isArray(data.peers) ? data.peers : [], blocks);
  renderEvents(Array.isArray(data.events) ? data.events : []);
  const updated = typeof data.updated === "number" ? data.updated : Date.now() / 1000;
  setText(els.updated, `updated ${clock(updated)}`);
  els.updated.classList.remove("error");
}

// ---------------------------------------------------------------------------
// Polling: the next poll is scheduled when the previous one finished; none while the tab is hidden.
// ---------------------------------------------------------------------------
let timer = null;
let polling = false;
let lastGood = null; // time (unix seconds) of the last data shown

async function poll() {
  timer = null;
  polling = true;
  try {
    const response = await apiFetch("/api/swarm", { cache: "no-store" }, async (r) => {
      showError(`API key required: ${await errorMessage(r)}`);
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    const data = await response.json();
    render(data);
    lastGood = typeof data.updated === "number" ? data.updated : Date.now() / 1000;
  } catch (err) {
    showError(`update failed: ${err?.message || String(err)}`);
  } finally {
    polling = false;
    schedule();
  }
}

// The error goes into #updated; the last data stays on screen.
function showError(message) {
  setText(els.updated, lastGood == null ? message : `${message} (showing data from ${clock(lastGood)})`);
  els.updated.classList.add("error");
}

function schedule() {
  if (timer === null && !polling && !document.hidden) timer = setTimeout(poll, POLL_MS);
}

document.addEventListener("visibilitychange", () => {
  if (document.hidden) {
    clearTimeout(timer);
    timer = null;
  } else if (timer === null && !polling) {
    poll(); // back in view: refresh at once
  }
});

setupKeyForm();
poll();
