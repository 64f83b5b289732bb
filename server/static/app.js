// TurboDiffusion web UI: plain JavaScript over the public API only (/v1/models, /v1/videos...).
// The API key lives in localStorage and goes out as "Authorization: Bearer"; that is why
// progress (SSE) is read with fetch() and media are fetched as blobs rather than by URL.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const KEY_STORE = "td.apiKey";
const PAGE = 12;
const STAGES = {
  queued: "queued", loading: "loading the model", text_encode: "encoding the prompt",
  image_encode: "encoding the image", vae_decode: "decoding frames", encode_video: "writing the MP4",
  store: "saving",
};
const RATIOS = { "16:9": 16 / 9, "9:16": 9 / 16, "1:1": 1, "4:3": 4 / 3, "3:4": 3 / 4 };

const state = {
  models: [],        // GET /v1/models cards
  tab: "t2v",
  current: null,     // the video shown in the job panel
  stream: null,      // AbortController of the events stream
  items: new Map(),  // id -> {video, el}
  after: null,       // history cursor
  media: new Map(),  // "id:variant" -> Promise<object URL>
};

// ---------------------------------------------------------------------------------------------
// API
// ---------------------------------------------------------------------------------------------
function apiKey() { return localStorage.getItem(KEY_STORE) || ""; }

async function api(path, opts = {}) {
  const headers = Object.assign({}, opts.headers);
  const key = apiKey();
  if (key) headers.Authorization = "Bearer " + key;
  const res = await fetch(path, Object.assign({}, opts, { headers }));
  if (!res.ok) throw await apiError(res);
  return res;
}

async function apiError(res) {
  let message = `${res.status} ${res.statusText}`;
  let code = null;
  try {
    const body = await res.json();
    if (body && body.error) {
      message = body.error.message;
      code = body.error.code;
    }
  } catch (_) { /* not JSON: keep the status line */ }
  const err = new Error(message);
  err.status = res.status;
  err.code = code;
  return err;
}

// Seeds go up to 2**63 - 1, past what a JS number holds exactly (2**53): they are read as strings
// and written back as bare JSON integers, so the seed shown and reused is the one used.
const parseJSON = (text) => JSON.parse(text.replace(/("seed":\s*)(\d{16,})/g, '$1"$2"'));
const toJSON = (obj) => JSON.stringify(obj).replace(/("seed":)"(\d+)"/g, "$1$2");
const getJSON = async (path, opts) => parseJSON(await (await api(path, opts)).text());
const postJSON = (path, body) => getJSON(path, {
  method: "POST", headers: { "Content-Type": "application/json" }, body: toJSON(body),
});

function showError(err) {
  const box = $("#error");
  if (!err) { box.hidden = true; box.textContent = ""; return; }
  const head = err.status ? `${err.status}${err.code ? " " + err.code : ""}: ` : "";
  let text = head + (err.message || String(err));
  if (err.status === 401) text += " (enter your API key at the top)";
  box.textContent = text;
  box.hidden = false;
}

function media(id, variant) {
  const key = `${id}:${variant}`;
  if (!state.media.has(key)) {
    const p = api(`/v1/videos/${encodeURIComponent(id)}/content?variant=${variant}`)
      .then((r) => r.blob()).then((b) => URL.createObjectURL(b));
    p.catch(() => state.media.delete(key));
    state.media.set(key, p);
  }
  return state.media.get(key);
}

function forgetMedia(id) {
  for (const variant of ["video", "thumbnail"]) {
    const p = state.media.get(`${id}:${variant}`);
    if (p) p.then((u) => URL.revokeObjectURL(u), () => {});
    state.media.delete(`${id}:${variant}`);
  }
}

// ---------------------------------------------------------------------------------------------
// the form
// ---------------------------------------------------------------------------------------------
function card(id) { return state.models.find((m) => m.id === id); }

function options(select, values, selected, labels = {}) {
  select.replaceChildren(...values.map((v) => {
    const o = document.createElement("option");
    o.value = v;
    o.textContent = labels[v] || v || "default";
    return o;
  }));
  if (selected !== undefined && values.includes(selected)) select.value = selected;
}

async function loadModels() {
  try {
    const list = await getJSON("/v1/models");
    state.models = list.data;
    showError(null);
  } catch (err) {
    state.models = [];
    showError(err);
  }
  setTab(state.tab);
}

function setTab(tab) {
  state.tab = tab;
  document.body.dataset.tab = tab;
  for (const b of document.querySelectorAll("[data-tab]")) b.setAttribute("aria-selected", String(b.dataset.tab === tab));
  const models = state.models.filter((m) => m.task === tab);
  const labels = Object.fromEntries(models.map((m) => [m.id, m.ready ? m.id : `${m.id} (no worker yet)`]));
  const keep = $("#model").value;
  options($("#model"), models.map((m) => m.id), keep, labels);
  $("#submit").disabled = models.length === 0;
  $("#model-note").textContent = models.length ? "" :
    `This server serves no ${tab === "i2v" ? "image" : "text"}-to-video model.`;
  applyModel();
}

function applyModel() {
  const m = card($("#model").value);
  document.body.dataset.sampler = m ? m.sampler : "";
  if (!m) return;
  options($("#resolution"), m.resolutions, m.default_resolution);
  options($("#aspect"), m.aspect_ratios, "16:9");
  const frames = $("#frames");
  frames.max = m.max_frames;
  frames.value = m.default_frames;
  const steps = $("#steps");
  steps.max = m.max_steps;
  steps.value = m.default_steps;
  options($("#attention"), m.attention_types, "auto");
  options($("#quant"), ["", ...m.quant_modes], "", { "": "worker default" });
  if (m.default_boundary != null) $("#boundary").value = m.default_boundary;
  $("#model-note").textContent = m.description || "";
  framesHint();
}

function framesHint() {
  const m = card($("#model").value);
  const n = Number($("#frames").value);
  const fps = (m && m.fps) || 16;
  $("#frames-hint").textContent = n >= 1 ? `${((n - 1) / fps).toFixed(2).replace(/\.?0+$/, "")} s at ${fps} fps` : "";
}

function collect() {
  const p = {
    prompt: $("#prompt").value.trim(),
    model: $("#model").value,
    resolution: $("#resolution").value,
    aspect_ratio: $("#aspect").value,
    num_frames: $("#frames").value === "" ? null : Number($("#frames").value),
    steps: $("#steps").value === "" ? null : Number($("#steps").value),
    seed: /^\d+$/.test($("#seed").value.trim()) ? $("#seed").value.trim().replace(/^0+(?=\d)/, "") : "0",
    attention_type: $("#attention").value || null,
    sla_topk: $("#sla-topk").value === "" ? null : Number($("#sla-topk").value),
    quant: $("#quant").value || null,
  };
  const m = card(p.model);
  if (!m || m.sampler === "rcm") p.ode = $("#sampler").value === "ode";
  if (state.tab === "i2v") {
    p.boundary = $("#boundary").value === "" ? null : Number($("#boundary").value);
    p.adaptive_resolution = $("#adaptive").checked;
  }
  return p;
}

async function submit(ev) {
  ev.preventDefault();
  showError(null);
  const params = collect();
  let body;
  const headers = {};
  if (state.tab === "i2v") {
    // multipart, as the openai SDK sends it: the image travels as the input_reference file
    body = new FormData();
    for (const [k, v] of Object.entries(params)) if (v !== null && v !== "") body.append(k, String(v));
    const file = $("#image").files[0];
    if (file) body.append("input_reference", file, file.name);
  } else {
    body = toJSON(Object.fromEntries(Object.entries(params).filter(([, v]) => v !== null)));
    headers["Content-Type"] = "application/json";
  }
  $("#submit").disabled = true;
  try {
    const video = await getJSON("/v1/videos", { method: "POST", headers, body });
    follow(video);
    loadHistory(true);
  } catch (err) {
    showError(err);
  } finally {
    $("#submit").disabled = false;
  }
}

// "Reuse these settings": fill the form from a video object (seed = the seed it actually used).
function reuse(v) {
  const m = card(v.model);
  if (!m) { showError(new Error(`model ${v.model} is not served here any more`)); return; }
  setTab(m.task);
  $("#model").value = v.model;
  applyModel();
  $("#prompt").value = v.prompt || "";
  const [w, h] = (v.size || "").split("x").map(Number);
  if (w && h) {
    const res = m.resolutions.includes("tiny") ? "tiny" : Math.min(w, h) >= 720 ? "720p" : "480p";
    if (m.resolutions.includes(res)) $("#resolution").value = res;
    let best = "16:9";
    for (const [name, r] of Object.entries(RATIOS)) {
      if (Math.abs(Math.log(w / h / r)) < Math.abs(Math.log(w / h / RATIOS[best]))) best = name;
    }
    $("#aspect").value = best;
    if (m.task === "i2v") $("#adaptive").checked = Math.abs(w / h - RATIOS[best]) > 0.01;
  }
  if (v.num_frames) $("#frames").value = v.num_frames;
  if (v.steps) $("#steps").value = v.steps;
  $("#seed").value = v.seed != null ? String(v.seed) : "0";
  if (v.attention_type) $("#attention").value = v.attention_type;
  $("#sla-topk").value = v.sla_topk != null ? v.sla_topk : "";
  $("#quant").value = v.quant || "";
  $("#sampler").value = v.ode ? "ode" : "sde";
  if (v.boundary != null) $("#boundary").value = v.boundary;
  framesHint();
  window.scrollTo({ top: 0, behavior: "smooth" });
  $("#prompt").focus();
}

// ---------------------------------------------------------------------------------------------
// the job panel: live progress from GET /v1/videos/{id}/events
// ---------------------------------------------------------------------------------------------
const finished = (v) => v && (v.status === "completed" || v.status === "failed");

function stageText(v) {
  if (v.status === "completed") {
    const t = v.timings && v.timings.total;
    return `completed${t ? ` in ${Number(t).toFixed(1)} s` : ""} · seed ${v.seed}`;
  }
  if (v.status === "failed") {
    if (v.cancelled) return "cancelled";
    return `failed: ${v.error ? `${v.error.code}: ${v.error.message}` : "unknown error"}`;
  }
  if (v.status === "queued") {
    return v.queue_position ? `queued · ${v.queue_position} ahead` : "queued · next";
  }
  if (v.stage === "denoise" && v.step) return `step ${v.step} of ${v.total_steps || v.steps}`;
  return STAGES[v.stage] || v.stage || v.status;
}

function paramsText(v) {
  const plural = (n, word) => `${n} ${word}${Number(n) === 1 ? "" : "s"}`;
  const bits = [v.model, v.size, plural(v.num_frames, "frame"), plural(v.steps, "step"), v.attention_type];
  if (v.quant) bits.push(v.quant);
  if (v.ode) bits.push("ODE");
  bits.push(v.seed && String(v.seed) !== "0" ? `seed ${v.seed}` : "random seed");
  if (v.remixed_from_video_id) bits.push(`remix of ${v.remixed_from_video_id}`);
  if (v.extended_from_video_id) bits.push(`extends ${v.extended_from_video_id}`);
  return bits.filter(Boolean).join(" · ");
}

function renderJob(v) {
  state.current = v;
  $("#job").hidden = false;
  $("#job").dataset.status = v.status;
  $("#job-id").textContent = v.id;
  $("#progress").value = v.progress || 0;
  $("#stage").textContent = stageText(v);
  $("#job-params").textContent = paramsText(v);
  $("#cancel").hidden = finished(v);
  $("#remix").hidden = v.status !== "completed";
  $("#extend").hidden = v.status !== "completed" || !state.models.some((m) => m.task === "i2v");
  updateItem(v);
}

// Remix (POST /v1/videos/{id}/remix) or extend (POST /v1/videos/extensions) the video in the job panel with
// the prompt written in the form; the new video is followed like a fresh one.
async function derive(kind) {
  const v = state.current;
  if (!v) return;
  showError(null);
  const prompt = $("#prompt").value.trim();
  if (!prompt) { showError(new Error("write the new prompt in the form first")); return; }
  const [path, body] = kind === "remix"
    ? [`/v1/videos/${v.id}/remix`, { prompt }]
    : ["/v1/videos/extensions", { prompt, video: { id: v.id } }];
  try {
    follow(await postJSON(path, body));
    loadHistory(true);
  } catch (err) {
    showError(err);
  }
}

async function showResult(v) {
  const player = $("#player");
  const link = $("#download");
  if (v.status !== "completed") { player.hidden = true; link.hidden = true; return; }
  try {
    const url = await media(v.id, "video");
    if (state.current && state.current.id !== v.id) return;  // another video was picked meanwhile
    player.src = url;
    player.hidden = false;
    link.href = url;
    link.download = `${v.id}.mp4`;
    link.hidden = false;
    player.play().catch(() => {});  // muted, so autoplay is allowed
  } catch (err) {
    showError(err);
  }
}

function stopFollowing() {
  if (state.stream) state.stream.abort();
  state.stream = null;
}

async function follow(video) {
  stopFollowing();
  const player = $("#player");
  player.hidden = true;
  player.removeAttribute("src");
  $("#download").hidden = true;
  renderJob(video);
  if (finished(video)) { showResult(video); return; }
  const ctrl = new AbortController();
  state.stream = ctrl;
  try {
    const res = await api(`/v1/videos/${encodeURIComponent(video.id)}/events`,
      { signal: ctrl.signal, headers: { Accept: "text/event-stream" } });
    const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += value.replace(/\r\n?/g, "\n");
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        onEvent(buf.slice(0, cut));
        buf = buf.slice(cut + 2);
      }
    }
  } catch (err) {
    if (err.name === "AbortError") return;
    if (err.status) showError(err);
  }
  if (state.stream !== ctrl) return;
  state.stream = null;
  // the stream ended early (proxy, network): poll the video until it finishes
  while (state.current && state.current.id === video.id && !finished(state.current)) {
    await new Promise((r) => setTimeout(r, 1000));
    try { renderJob(await getJSON(`/v1/videos/${encodeURIComponent(video.id)}`)); } catch (err) { showError(err); break; }
  }
  if (state.current && state.current.id === video.id) done(state.current);
}

function onEvent(frame) {
  let event = "message";
  const data = [];
  for (const line of frame.split("\n")) {
    if (line.startsWith("event:")) event = line.slice(6).trim();
    else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
  }
  if (!data.length) return;
  const payload = parseJSON(data.join("\n"));
  if (event === "video") {
    renderJob(payload);
    if (finished(payload)) done(payload);
  } else if (event === "error") {
    showError(Object.assign(new Error(payload.message), { code: payload.code }));
  }
}

function done(v) {
  if (state.doneId === v.id) return;
  state.doneId = v.id;
  showResult(v);
  loadHistory(true);
}

async function cancel() {
  const v = state.current;
  if (!v) return;
  try {
    renderJob(await postJSON(`/v1/videos/${encodeURIComponent(v.id)}/cancel`, {}));
  } catch (err) {
    showError(err);
  }
}

// ---------------------------------------------------------------------------------------------
// history: GET /v1/videos, ratings and notes via POST /v1/videos/{id}/feedback
// ---------------------------------------------------------------------------------------------
async function loadHistory(reset) {
  const list = $("#history-list");
  let url = `/v1/videos?limit=${PAGE}`;
  if (!reset && state.after) url += `&after=${encodeURIComponent(state.after)}`;
  let page;
  try {
    page = await getJSON(url);
  } catch (err) {
    showError(err);
    return;
  }
  if (reset) {
    list.replaceChildren();
    state.items.clear();
  }
  for (const v of page.data) {
    if (state.items.has(v.id)) { updateItem(v); continue; }
    const el = buildItem(v);
    state.items.set(v.id, { video: v, el });
    list.append(el);
  }
  state.after = page.last_id;
  $("#more").hidden = !page.has_more;
  return page;
}

function buildItem(v) {
  const el = $("#item-tpl").content.firstElementChild.cloneNode(true);
  el.dataset.id = v.id;
  el.querySelector(".prompt").textContent = v.prompt || "";
  el.querySelector(".play").addEventListener("click", () => follow(state.items.get(v.id).video));
  el.querySelector(".reuse").addEventListener("click", () => reuse(state.items.get(v.id).video));
  el.querySelector(".delete").addEventListener("click", () => remove(v.id));
  for (const b of el.querySelectorAll("[data-rating]")) {
    b.addEventListener("click", () => {
      const n = Number(b.dataset.rating);
      const current = state.items.get(v.id).video.rating;
      feedback(v.id, { rating: current === n ? null : n });  // clicking the same star clears it
    });
  }
  const note = el.querySelector(".note");
  note.addEventListener("change", () => feedback(v.id, { note: note.value.trim() || null }));
  fillItem(el, v);
  return el;
}

function fillItem(el, v) {
  el.dataset.status = v.status;
  el.dataset.rated = v.rating ? "yes" : "no";
  el.querySelector(".params").textContent = paramsText(v);
  el.querySelector(".badge").textContent = v.status === "completed" ? (v.seconds ? `${v.seconds} s` : "") :
    (v.cancelled ? "cancelled" : v.status.replace("_", " "));
  el.querySelector(".play").disabled = v.status !== "completed";
  for (const b of el.querySelectorAll("[data-rating]")) {
    b.classList.toggle("on", v.rating != null && Number(b.dataset.rating) <= v.rating);
  }
  const note = el.querySelector(".note");
  if (document.activeElement !== note) note.value = v.note || "";
  const img = el.querySelector(".thumb img");
  if (v.status === "completed" && img.hidden && !img.dataset.loading) {
    img.dataset.loading = "1";
    media(v.id, "thumbnail").then((u) => { img.src = u; img.hidden = false; }, () => { delete img.dataset.loading; });
  }
}

function updateItem(v) {
  const item = state.items.get(v.id);
  if (!item) return;
  item.video = v;
  fillItem(item.el, v);
}

async function feedback(id, fields) {
  const item = state.items.get(id);
  const saved = item && item.el.querySelector(".saved");
  try {
    const v = await postJSON(`/v1/videos/${encodeURIComponent(id)}/feedback`, fields);
    updateItem(v);
    if (state.current && state.current.id === id) state.current = v;
    if (saved) { saved.textContent = "saved"; setTimeout(() => { saved.textContent = ""; }, 1500); }
  } catch (err) {
    showError(err);
  }
}

async function remove(id) {
  try {
    await api(`/v1/videos/${encodeURIComponent(id)}`, { method: "DELETE" });
  } catch (err) {
    if (err.status !== 404) { showError(err); return; }
  }
  const item = state.items.get(id);
  if (item) item.el.remove();
  state.items.delete(id);
  forgetMedia(id);
  if (state.current && state.current.id === id) { stopFollowing(); state.current = null; $("#job").hidden = true; }
}

// ---------------------------------------------------------------------------------------------
// start
// ---------------------------------------------------------------------------------------------
function keyState() {
  $("#key-state").textContent = apiKey() ? "key saved in this browser" : "no key (fine if the server is open)";
}

async function start() {
  $("#api-key").value = apiKey();
  keyState();
  $("#key-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const key = $("#api-key").value.trim();
    if (key) localStorage.setItem(KEY_STORE, key); else localStorage.removeItem(KEY_STORE);
    keyState();
    for (const id of [...state.media.keys()]) forgetMedia(id.split(":")[0]);
    loadModels();
    loadHistory(true);
  });
  for (const b of document.querySelectorAll("[data-tab]")) b.addEventListener("click", () => setTab(b.dataset.tab));
  $("#model").addEventListener("change", applyModel);
  $("#frames").addEventListener("input", framesHint);
  $("#form").addEventListener("submit", submit);
  $("#cancel").addEventListener("click", cancel);
  $("#remix").addEventListener("click", () => derive("remix"));
  $("#extend").addEventListener("click", () => derive("extend"));
  $("#refresh").addEventListener("click", () => loadHistory(true));
  $("#more").addEventListener("click", () => loadHistory(false));
  $("#only-rated").addEventListener("change", (ev) => { document.body.dataset.onlyRated = String(ev.target.checked); });
  $("#image").addEventListener("change", () => {
    const file = $("#image").files[0];
    const img = $("#image-preview");
    if (img.src) URL.revokeObjectURL(img.src);
    img.hidden = !file;
    if (file) img.src = URL.createObjectURL(file); else img.removeAttribute("src");
  });
  await loadModels();
  const page = await loadHistory(true);
  // pick up a video still running from before a reload
  const latest = page && page.data[0];
  if (latest && !finished(latest)) follow(latest);
}

document.addEventListener("DOMContentLoaded", start);
