// The tipr search page: text, photo and "more like this" searches through the JSON API.
// The address holds the search (?q=...&k=...&prefix=... or ?similar=<row>), so it can be shared.
// Nothing is fetched from elsewhere; text from the server is set as text, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
let lastHits = [];
let lastQuery = "";
let downloads = [];

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

async function api(path, options = {}) {
  const response = await fetch(path, { credentials: "same-origin", ...options });
  let body;
  try {
    body = await response.json();
  } catch (e) {
    throw new Error(`${response.status} ${response.statusText}`);
  }
  if (!response.ok) throw new Error(body.error || `${response.status} ${response.statusText}`);
  return body;
}

function options() {
  const topK = parseInt($("top-k").value, 10) || 20;
  const prefix = $("prefix").value.trim();
  return { topK, prefix };
}

function remember(params) {
  const url = new URL(window.location.href);
  url.search = "";
  for (const [key, value] of Object.entries(params)) {
    if (value !== "" && value !== null && value !== undefined) url.searchParams.set(key, value);
  }
  window.history.replaceState(null, "", url);
}

function csv(hits) {
  const quote = (value) => `"${String(value).replaceAll('"', '""')}"`;
  const lines = ["query,rank,score,path,row"];
  for (const hit of hits) lines.push([quote(lastQuery), hit.rank, hit.score, quote(hit.path), hit.row].join(","));
  return lines.join("\n") + "\n";
}

function offerDownloads(hits) {
  for (const url of downloads) URL.revokeObjectURL(url);
  const json = URL.createObjectURL(new Blob([JSON.stringify({ query: lastQuery, hits }, null, 1)], { type: "application/json" }));
  const table = URL.createObjectURL(new Blob([csv(hits)], { type: "text/csv" }));
  downloads = [json, table];
  $("download-json").href = json;
  $("download-csv").href = table;
  $("download-json").hidden = $("download-csv").hidden = hits.length === 0;
}

function show(hits, what) {
  lastHits = hits;
  const grid = $("results");
  grid.replaceChildren();
  for (const hit of hits) {
    const card = document.createElement("div");
    card.className = "hit";
    card.dataset.row = hit.row;
    const image = document.createElement("img");
    image.src = hit.thumbnail;
    image.alt = hit.path;
    image.loading = "lazy";
    image.addEventListener("click", () => enlarge(hit));
    const meta = document.createElement("div");
    meta.className = "meta";
    const rank = document.createElement("span");
    rank.className = "rank";
    rank.textContent = `#${hit.rank}`;
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = hit.score.toFixed(4);
    meta.append(rank, score);
    const path = document.createElement("div");
    path.className = "path";
    path.textContent = hit.path;
    const more = document.createElement("button");
    more.className = "more";
    more.type = "button";
    more.textContent = "more like this";
    more.addEventListener("click", () => similar(hit.row));
    card.append(image, meta, path, more);
    grid.append(card);
  }
  offerDownloads(hits);
  setStatus(`${hits.length} hits ${what}`);
}

function enlarge(hit) {
  $("viewer-image").src = hit.image;
  $("viewer-caption").textContent = `#${hit.rank}  ${hit.score.toFixed(4)}  ${hit.path}`;
  $("viewer").hidden = false;
}

async function run(what, request) {
  setStatus(`searching ${what}...`);
  try {
    show(await request(), what);
  } catch (e) {
    $("results").replaceChildren();
    offerDownloads([]);
    setStatus(e.message, true);
  }
}

async function searchText(query) {
  const { topK, prefix } = options();
  lastQuery = query;
  remember({ q: query, k: topK, prefix });
  await run(`for "${query}"`, async () => {
    const body = await api("/api/search/text", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ queries: [query], top_k: topK, prefix: prefix || null }),
    });
    return body.results[0].hits;
  });
}

async function searchPhoto(file) {
  const { topK, prefix } = options();
  lastQuery = `photo ${file.name}`;
  remember({ k: topK, prefix });
  const form = new FormData();
  form.append("file", file);
  form.append("top_k", topK);
  if (prefix) form.append("prefix", prefix);
  await run(`like ${file.name}`, async () => (await api("/api/search/image", { method: "POST", body: form })).hits);
}

async function similar(row) {
  const { topK, prefix } = options();
  lastQuery = `similar to row ${row}`;
  remember({ similar: row, k: topK, prefix });
  const params = new URLSearchParams({ top_k: topK });
  if (prefix) params.set("prefix", prefix);
  await run(`like row ${row}`, async () => (await api(`/api/search/similar/${row}?${params}`)).hits);
}

$("search-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const query = $("query").value.trim();
  if (query) searchText(query);
  else setStatus("type a description first", true);
});
$("photo").addEventListener("change", () => {
  if ($("photo").files.length) searchPhoto($("photo").files[0]);
});
$("viewer").addEventListener("click", () => { $("viewer").hidden = true; });

(async function start() {
  try {
    const health = await api("/api/health");
    $("gallery-info").textContent = `${health.images.toLocaleString()} images under ${health.root}`;
  } catch (e) {
    $("gallery-info").textContent = `the server cannot be reached: ${e.message}`;
  }
  const params = new URLSearchParams(window.location.search);
  if (params.get("k")) $("top-k").value = params.get("k");
  if (params.get("prefix")) $("prefix").value = params.get("prefix");
  if (params.get("q")) {
    $("query").value = params.get("q");
    searchText(params.get("q"));
  } else if (params.get("similar")) {
    similar(parseInt(params.get("similar"), 10));
  }
})();
