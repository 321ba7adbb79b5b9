// The Upgrader page: plain JavaScript against the public API (no build step, no library: the page is
// a few hundred lines and a framework would be most of its weight). Every number it shows comes from
// the API's answers: POST /upscale?tile=true for each model, POST /bicubic for the baseline, GET /models.
"use strict";

const EXAMPLES = [  // service/static/examples: the repo's 8x8 CIFAR-10 pair, and skimage.data photo crops shrunk 4x the trainer's way
  { id: "cat", label: "cat 8×8", input: "cat-8x8.png", reference: "cat-32x32.png" },
  { id: "ship", label: "ship 8×8", input: "ship-8x8.png", reference: "ship-32x32.png" },
  { id: "astronaut", label: "astronaut 64×64", input: "astronaut-64x64.png", reference: "astronaut-256x256.png" },
  { id: "chelsea", label: "cat photo 64×64", input: "chelsea-64x64.png", reference: "chelsea-256x256.png" },
];

// Plain words for the API's error codes; the API's own message follows in small print.
const PLAIN = {
  unauthorized: "The API key was not accepted.",
  wrong_size: "The image has the wrong size.",
  unsupported_image: "That file is not an image the server reads (PNG, JPEG, WebP or BMP).",
  animated_image: "Animated images are not upscaled; send a still image.",
  format_not_offered: "This server cannot write that output format.",
  not_acceptable: "This server cannot write that output format.",
  unsupported_media_type: "That file is not an image the server reads (PNG, JPEG, WebP or BMP).",
  corrupt_image: "The image file is damaged or incomplete.",
  empty_image: "The image file is empty.",
  dimensions_too_large: "The image is too large for this server.",
  too_many_pixels: "The images are too large for this server.",
  image_too_large: "The image file is too large.",
  body_too_large: "The upload is too large for this server.",
  queue_full: "The server is busy right now; try again in a moment.",
  deadline_exceeded: "The server took too long to answer.",
  model_not_found: "That model is not in the store (any more).",
  version_not_found: "That version is not in the store (any more).",
  version_unavailable: "That version cannot be served.",
  no_model_loaded: "The server has no model loaded yet.",
  shutting_down: "The server is restarting; try again in a moment.",
};

const $ = (sel) => document.querySelector(sel);
const state = { key: sessionStorage.getItem("upgrader-key") || "", models: [], job: null, keyWaiters: null, run: 0 };

class ApiProblem extends Error {
  constructor(status, error) {
    super(error?.message || `HTTP ${status}`);
    this.status = status;
    this.code = error?.code;
    this.plain = PLAIN[error?.code] || (status >= 500 ? "The server failed to answer." : `The server refused the request (HTTP ${status}).`);
  }
}

// ---- API ------------------------------------------------------------------------------------
async function api(path, init = {}) {
  for (;;) {
    const headers = new Headers(init.headers || {});
    if (state.key) headers.set("Authorization", `Bearer ${state.key}`);
    let response;
    try {
      response = await fetch(path, { ...init, headers });
    } catch (err) {
      throw new ApiProblem(0, { message: `cannot reach the server (${err.message})` });
    }
    if (response.status === 401) {
      await askForKey(state.key ? "That key was not accepted; try another." : "");
      continue;  // again, with the key just typed
    }
    if (!response.ok) {
      const body = await response.json().catch(() => null);
      throw new ApiProblem(response.status, body?.error);
    }
    return response;
  }
}

function askForKey(note) {
  // One prompt for every request that got a 401 at the same time.
  if (!state.keyWaiters) {
    state.keyWaiters = [];
    $("#key-note").textContent = note;
    $("#key-form").hidden = false;
    $("#key-input").focus();
  }
  return new Promise((resolve) => state.keyWaiters.push(resolve));
}

$("#key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  state.key = $("#key-input").value.trim();
  sessionStorage.setItem("upgrader-key", state.key);
  $("#key-form").hidden = true;
  const waiters = state.keyWaiters || [];
  state.keyWaiters = null;
  waiters.forEach((resolve) => resolve());
});

function showError(problem) {
  const box = $("#error");
  if (!problem) { box.hidden = true; box.textContent = ""; return; }
  box.innerHTML = "";
  box.append(problem.plain || String(problem));
  if (problem.message && problem.message !== problem.plain) {
    const detail = document.createElement("small");
    detail.textContent = problem.message;
    box.append(detail);
  }
  box.hidden = false;
}

// ---- models ------------------------------------------------------------------------------------
async function loadModels() {
  const listing = await (await api("/models")).json();
  state.models = listing.models;
  renderChoices(listing);
  renderModels(listing);
  $("#run").disabled = !state.job || !state.models.length;
}

function renderChoices(listing) {
  const box = $("#model-choices");
  box.innerHTML = "";
  if (!listing.models.length) { box.innerHTML = '<span class="muted">The store has no models yet.</span>'; return; }
  for (const model of listing.models) {
    const row = document.createElement("span");
    row.className = "choice";
    const check = Object.assign(document.createElement("input"), { type: "checkbox", checked: true, id: `use-${model.name}` });
    check.dataset.model = model.name;
    const label = Object.assign(document.createElement("label"), { htmlFor: check.id, textContent: model.name });
    if (model.input === "any") {  // a photo model: any size, whole images; trained on inputs made by its degradation
      const badge = Object.assign(document.createElement("span"), { className: "badge photo", textContent: "photos",
        title: `any size, upscaled whole; trained on ${model.degradation} inputs` });
      label.append(badge);
    }
    const select = document.createElement("select");
    select.dataset.model = model.name;
    select.setAttribute("aria-label", `${model.name} version`);
    const latest = model.serving_version;
    select.append(new Option(latest != null ? `latest (v${latest})` : "latest", "latest"));
    for (const [alias, version] of Object.entries(model.aliases)) {
      if (alias !== "latest") select.append(new Option(`${alias} (v${version})`, alias));
    }
    for (const v of [...model.versions].reverse()) {
      select.append(new Option(`v${v.version}${v.status === "failed" ? " (refused)" : ""}`, String(v.version)));
    }
    select.addEventListener("change", () => state.job && run());
    check.addEventListener("change", () => state.job && run());
    row.append(check, label, select);
    box.append(row);
  }
}

const fmt = (x, digits) => (typeof x === "number" ? x.toFixed(digits) : "–");

function renderModels(listing) {
  const list = $("#models-list");
  list.innerHTML = "";
  for (const model of listing.models) {
    const section = document.createElement("section");
    section.className = "model";
    section.dataset.model = model.name;
    const arch = model.architecture?.name || "?";
    const params = model.parameter_count != null ? `${model.parameter_count.toLocaleString("en")} parameters` : "";
    const aliases = Object.entries(model.aliases).map(([a, v]) => `${a} → v${v}`).join(", ");
    section.innerHTML = `<h2></h2><p class="muted"></p>`;
    section.querySelector("h2").textContent = model.name;
    if (model.is_default) section.querySelector("h2").insertAdjacentHTML("beforeend", '<span class="badge default">default</span>');
    section.querySelector("p").textContent = [`architecture ${arch}`, params, aliases && `aliases: ${aliases}`].filter(Boolean).join(" · ");
    const wrap = document.createElement("div");
    wrap.className = "table-wrap";
    const table = document.createElement("table");
    table.innerHTML = "<thead><tr><th>version</th><th>status</th><th>PSNR dB (bicubic, Δ)</th><th>SSIM (bicubic)</th>" +
      "<th>epochs</th><th>lineage</th><th>pictures</th></tr></thead><tbody></tbody>";
    for (const v of [...model.versions].reverse()) table.tBodies[0].append(versionRow(model, v));
    wrap.append(table);
    section.append(wrap);
    list.append(section);
  }
}

function versionRow(model, v) {
  const row = document.createElement("tr");
  row.className = "version";
  row.dataset.version = v.version;
  const m = v.metrics?.model || {}, b = v.metrics?.bicubic || {};
  const delta = typeof m.psnr === "number" && typeof b.psnr === "number" ? m.psnr - b.psnr : null;
  const recipe = v.recipe || {}, data = v.dataset || {};
  const lineage = [
    recipe.init_from ? `fine-tuned from ${typeof recipe.init_from === "object" ? `${recipe.init_from.name} v${recipe.init_from.version}` : recipe.init_from}` : "trained from scratch",
    data.name && `on ${data.name}${data.train_size ? ` (${data.train_size.toLocaleString("en")} images)` : ""}`,
    recipe.loss && `${recipe.loss} loss`,
    v.created_at && `created ${v.created_at.replace("T", " ").slice(0, 19)}`,
  ].filter(Boolean).join(", ");
  const cells = [
    `v${v.version}` + (v.aliases.length ? ` (${v.aliases.join(", ")})` : ""),
    v.status + (v.error ? `: ${v.error}` : ""),
    null, `${fmt(m.ssim, 3)} (${fmt(b.ssim, 3)})`, v.epochs_completed ?? "–", lineage, null,
  ];
  cells.forEach((text, i) => {
    const td = document.createElement("td");
    if (i === 2) {
      td.textContent = `${fmt(m.psnr, 2)} (${fmt(b.psnr, 2)}, `;
      const span = Object.assign(document.createElement("span"), { className: `delta ${delta >= 0 ? "up" : "down"}`, textContent: delta == null ? "–" : `${delta >= 0 ? "+" : ""}${delta.toFixed(2)}` });
      td.append(span, ")");
    } else if (i === 5) {
      td.className = "lineage";
      td.textContent = text;
    } else if (i === 6) {
      const toggle = Object.assign(document.createElement("button"), { type: "button", className: "pictures-toggle", textContent: "loss curve, samples" });
      toggle.setAttribute("aria-expanded", "false");
      toggle.addEventListener("click", () => {
        const pictures = row.nextElementSibling;
        pictures.hidden = !pictures.hidden;
        toggle.setAttribute("aria-expanded", String(!pictures.hidden));
        // Loaded when first shown (a long store is many pictures), through api(): with API keys they need one too.
        pictures.querySelectorAll("img[data-src]").forEach((img) => {
          const src = img.dataset.src;
          delete img.dataset.src;
          api(src).then((r) => r.blob()).then((blob) => { img.src = URL.createObjectURL(blob); }).catch(() => img.dispatchEvent(new Event("error")));
        });
      });
      td.append(toggle);
    } else {
      td.textContent = text;
    }
    row.append(td);
  });
  // The trainer's pictures, full width in a row of their own below the version (shown on demand).
  const pictures = document.createElement("tr");
  pictures.className = "pictures";
  pictures.dataset.version = v.version;
  pictures.hidden = true;
  const cell = Object.assign(document.createElement("td"), { colSpan: 7 });
  // photo models (trainer/photo.py) draw a learning curve over steps; 8x8 models a loss curve over epochs
  for (const picture of [model.input === "any" ? "learning_curve.png" : "loss_curve.png", "samples.png"]) {
    const img = Object.assign(document.createElement("img"), { alt: `${model.name} v${v.version} ${picture}` });
    img.dataset.src = `/models/${encodeURIComponent(model.name)}/versions/${v.version}/${picture}`;
    img.addEventListener("error", () => img.replaceWith(Object.assign(document.createElement("span"), { className: "muted", textContent: `no ${picture} ` })));
    cell.append(img);
  }
  pictures.append(cell);
  const fragment = document.createDocumentFragment();
  fragment.append(row, pictures);
  return fragment;
}

// ---- inputs ----------------------------------------------------------------------------------
function loadImage(blob) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new ApiProblem(0, { message: "the browser cannot read it" }));
    img.src = URL.createObjectURL(blob);
  });
}

function canvasBlob(canvas) {
  return new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
}

// Shrink 4x in two 2x halvings with smoothing (a 4x4 box filter, antialiased like the trainer's reduction);
// the reference is the image cropped to a multiple of 4 so the two align pixel for pixel.
async function shrink(img) {
  const w = Math.floor(img.naturalWidth / 4), h = Math.floor(img.naturalHeight / 4);
  if (w < 1 || h < 1) throw new ApiProblem(0, { message: "the image is smaller than 4×4 pixels and cannot be shrunk 4×" });
  const full = Object.assign(document.createElement("canvas"), { width: w * 4, height: h * 4 });
  full.getContext("2d").drawImage(img, 0, 0, w * 4, h * 4, 0, 0, w * 4, h * 4);
  let step = full;
  for (const factor of [2, 4]) {
    const next = Object.assign(document.createElement("canvas"), { width: (w * 4) / factor, height: (h * 4) / factor });
    const ctx = next.getContext("2d");
    ctx.imageSmoothingEnabled = true;
    ctx.imageSmoothingQuality = "high";
    ctx.drawImage(step, 0, 0, next.width, next.height);
    step = next;
  }
  return { input: await canvasBlob(step), reference: await canvasBlob(full) };
}

async function useFile(file, reference = null, name = file.name) {
  showError(null);
  try {
    const img = await loadImage(file);
    const big = img.naturalWidth >= 32 && img.naturalHeight >= 32;
    if (reference === null && !$("#downscale").dataset.touched) $("#downscale").checked = big;
    let input = file;
    if (reference === null && $("#downscale").checked) ({ input, reference } = await shrink(img));
    state.job = { input, reference, name: name.replace(/\.[^.]+$/, "") };
    $("#file-name").textContent = `${name}, ${img.naturalWidth}×${img.naturalHeight}` + (input !== file ? ", shrunk 4×" : "");
    $("#run").disabled = !state.models.length;
    await run();
  } catch (err) {
    showError(err instanceof ApiProblem ? Object.assign(err, { plain: "That file cannot be used as an image." }) : err);
  }
}

async function useExample(example) {
  const [input, reference] = await Promise.all([example.input, example.reference].map(async (file) => (await fetch(`/static/examples/${file}`)).blob()));
  state.job = { input, reference, name: example.id };
  $("#file-name").textContent = `example: ${example.label}`;
  showError(null);
  $("#run").disabled = !state.models.length;
  await run();
}

// ---- upscaling --------------------------------------------------------------------------------------
function selected() {
  return [...document.querySelectorAll("#model-choices input[type=checkbox]:checked")].map((check) => ({
    name: check.dataset.model,
    version: document.querySelector(`#model-choices select[data-model="${CSS.escape(check.dataset.model)}"]`).value,
  }));
}

function card(kind, title) {
  const node = document.createElement("article");
  node.className = "card pending";
  node.dataset.kind = kind;
  node.innerHTML = '<h3></h3><div class="frame"></div><div class="stats"></div>';
  node.querySelector("h3").textContent = title;
  $("#results").append(node);
  return node;
}

function b64ToBlob(b64, type = "image/png") {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  return new Blob([bytes], { type });
}

// The output format chosen: "png", "webp" (lossless) or "name:quality" -> the query of POST /upscale.
function formatQuery() {
  const [name, quality] = $("#format").value.split(":");
  return `&format=${name}` + (quality ? `&quality=${quality}` : "");
}

const EXTENSIONS = { "image/png": "png", "image/webp": "webp", "image/jpeg": "jpg", "image/avif": "avif" };

// Before/after on a model's card: the input, stretched to the output's size, over the output's left part; a slider
// moves the edge between them.
function addCompare(node, inputBlob) {
  const frame = node.querySelector(".frame");
  frame.classList.add("compare");
  const before = Object.assign(document.createElement("img"), { className: "before", alt: "input (before)", src: URL.createObjectURL(inputBlob) });
  before.style.maxWidth = frame.querySelector("img.after").style.maxWidth;  // exactly over the output
  frame.append(before);
  const slider = Object.assign(document.createElement("input"), { type: "range", min: 0, max: 100, value: 50, className: "slider" });
  slider.setAttribute("aria-label", "before / after");
  slider.addEventListener("input", () => { before.style.clipPath = `inset(0 ${100 - slider.value}% 0 0)`; });
  frame.after(slider);
}

async function showImage(node, blob, width) {
  const img = Object.assign(document.createElement("img"), { className: "after" });  // the output ("before" is the input)
  img.src = URL.createObjectURL(blob);
  await img.decode().catch(() => {});
  // Every picture is drawn at the same width, so input pixels and output pixels line up by eye.
  if (width) img.style.maxWidth = `${Math.max(width, img.naturalWidth)}px`;
  node.querySelector(".frame").append(img);
  node.classList.remove("pending");
  return img;
}

async function run() {
  const job = state.job;
  if (!job) return;
  const runId = ++state.run;
  showError(null);
  const results = $("#results");
  results.innerHTML = "";
  const input = await loadImage(job.input);
  const shown = Math.min(512, Math.max(256, input.naturalWidth * 4));  // display width of every picture
  await showImage(card("input", `input ${input.naturalWidth}×${input.naturalHeight}`), job.input, shown);
  if (job.reference) {
    const ref = await loadImage(job.reference);
    await showImage(card("reference", `reference ${ref.naturalWidth}×${ref.naturalHeight}`), job.reference, shown);
  }
  const ensemble = Number($("#ensemble").value);
  const targets = [{ name: "bicubic", version: null }, ...selected()];
  $("#summary").textContent = `${targets.length - 1} model(s) and bicubic on ${job.name}` + (ensemble > 1 ? `, ${ensemble}-view ensemble` : "") +
    (job.reference ? "; PSNR/SSIM against the reference" : "; no reference, so no PSNR/SSIM");
  await Promise.all(targets.map((target) => upscaleOne(target, job, ensemble, shown, runId)));
}

async function upscaleOne(target, job, ensemble, shown, runId) {
  const node = card(target.name === "bicubic" ? "bicubic" : "model", target.name === "bicubic" ? "Pillow bicubic" : `${target.name} ${target.version}`);
  node.dataset.model = target.name;
  const form = new FormData();
  form.append("images", job.input, "input.png");
  if (job.reference) form.append("references", job.reference, "reference.png");
  const url = target.name === "bicubic" ? "/bicubic?tile=true"
    : `/upscale?tile=true&model=${encodeURIComponent(target.name)}&version=${encodeURIComponent(target.version)}&ensemble=${ensemble}` + formatQuery();
  const started = performance.now();
  try {
    const answer = await (await api(url, { method: "POST", body: form })).json();
    if (runId !== state.run) return;  // a newer run replaced these cards
    const image = answer.images[0], m = answer.metrics;
    const title = target.name === "bicubic" ? "Pillow bicubic" : `${answer.model.name} v${answer.model.version}`;
    node.querySelector("h3").textContent = title;
    Object.assign(node.dataset, { version: answer.model.version, batch: m.batch_size, ms: m.total_ms });
    if (image.psnr != null) Object.assign(node.dataset, { psnr: image.psnr, ssim: image.ssim });
    const type = image.media_type || "image/png";
    node.dataset.format = type;
    const blob = image.png != null ? b64ToBlob(image.png) : b64ToBlob(image.data, type);
    await showImage(node, blob, shown);
    if (target.name !== "bicubic") addCompare(node, job.input);
    const stats = node.querySelector(".stats");
    if (image.psnr != null) {
      const score = Object.assign(document.createElement("div"), { className: "score", textContent: `PSNR ${image.psnr.toFixed(2)} dB · SSIM ${image.ssim.toFixed(3)}` });
      stats.append(score);
    }
    const timing = `${image.width}×${image.height} · ${m.total_ms.toFixed(1)} ms on the server (${Math.round(performance.now() - started)} ms here)` +
      (target.name === "bicubic" ? "" : ` · batch of ${m.batch_size}` + (m.tiles > 1 ? ` · ${m.tiles} tiles` : ""));
    stats.append(Object.assign(document.createElement("div"), { className: "timing", textContent: timing }));
    const extension = EXTENSIONS[type] || "png";
    const link = Object.assign(document.createElement("a"), { href: URL.createObjectURL(blob), textContent: `Download ${extension.toUpperCase()}`,
      download: `${job.name}_${answer.model.name}${target.name === "bicubic" ? "" : `-v${answer.model.version}`}.${extension}` });
    node.append(link);
    node.classList.add("done");
  } catch (err) {
    if (runId !== state.run) return;
    node.classList.remove("pending");
    node.classList.add("failed");
    node.querySelector(".stats").textContent = err.plain || String(err);
    showError(err);
  }
}

// ---- wiring -----------------------------------------------------------------------------------------
function showView(name) {
  $("#try-view").hidden = name !== "try";
  $("#models-view").hidden = name !== "models";
  $("#tab-try").setAttribute("aria-selected", String(name === "try"));
  $("#tab-models").setAttribute("aria-selected", String(name === "models"));
  history.replaceState(null, "", name === "models" ? "#models" : "#");
}

$("#tab-try").addEventListener("click", () => showView("try"));
$("#tab-models").addEventListener("click", () => showView("models"));
$("#run").addEventListener("click", () => run());
$("#ensemble").addEventListener("change", () => state.job && run());
$("#format").addEventListener("change", () => state.job && run());
$("#downscale").addEventListener("change", () => { $("#downscale").dataset.touched = "1"; });
$("#file").addEventListener("change", (event) => event.target.files[0] && useFile(event.target.files[0]));
$("#reference-file").addEventListener("change", (event) => {
  const file = event.target.files[0];
  if (file && state.job) { state.job.reference = file; run(); }
});
const drop = $("#drop");
drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  const file = event.dataTransfer.files[0];
  if (file) useFile(file);
});
for (const example of EXAMPLES) {
  const button = Object.assign(document.createElement("button"), { type: "button", textContent: example.label });
  button.dataset.example = example.id;
  button.addEventListener("click", () => useExample(example).catch(showError));
  $("#examples").append(button);
}
showView(location.hash === "#models" ? "models" : "try");
loadModels().catch(showError);
