// The page: a form that submits over REST, and one card per job that follows
// the job's events over the WebSocket (see connection.js).
import { Connection } from "./connection.js";

const TERMINAL = new Set(["completed", "failed", "canceled"]);
const form = document.querySelector("#submit");
const formError = document.querySelector("#form-error");
const list = document.querySelector("#jobs");
const empty = document.querySelector("#empty");
const status = document.querySelector("#connection");
const template = document.querySelector("#job-card");
const cards = new Map(); // job id -> card state
const modelStatus = document.querySelector("#model-status");
const MODELS_REFRESH_MS = 10000;
let models = new Map(); // name -> GET /v1/models entry
let limits = null; // the chosen model's


const connection = new Connection({
  onEvent: (event) => {
    const card = cards.get(event.job_id);
    if (card) apply(card, event);
  },
  onStatus: ({ up, text }) => {
    status.textContent = text;
    status.classList.toggle("down", !up);
  },
});

// ---- the models ---------------------------------------------------------------

/** An option of the selector: the model, its workers, and its queue and ETA when it has them. */
function describeModel(model) {
  const family = model.family ? ` (${model.family})` : "";
  const workers = model.workers.length;
  const waiting = model.queue.pending ? ` · ${model.queue.pending} waiting` : "";
  const eta = model.eta_s === null ? "" : ` · ~${seconds(model.eta_s)}`;
  return `${model.name}${family} — ${workers ? `${workers} worker${workers > 1 ? "s" : ""}` : "no worker now"}${waiting}${eta}`;
}

/** Beside the selector: the chosen model's queue and when a job sent now should be done. */
function showModelStatus() {
  const model = models.get(form.elements.model.value);
  if (!model) return;
  const waiting = model.queue.pending;
  const line = waiting ? `${waiting} waiting` : "nobody waiting";
  if (!model.workers.length) {
    modelStatus.textContent = `No worker of ${model.name} runs now: a job waits until one starts. ${line}.`;
  } else {
    const eta = model.eta_s === null ? "" : ` · done in about ${seconds(model.eta_s)}`;
    modelStatus.textContent = `${line}${eta}`;
  }
}

async function loadModels({ first = false } = {}) {
  const response = await fetch("/v1/models");
  if (!response.ok) throw new Error(`GET /v1/models: ${response.status}`);
  const answer = await response.json();
  models = new Map(answer.models.map((model) => [model.name, model]));
  const select = form.elements.model;
  const chosen = first ? answer.default : select.value;
  select.replaceChildren(...answer.models.map((model) => {
    const option = document.createElement("option");
    option.value = model.name;
    option.textContent = describeModel(model);
    return option;
  }));
  select.value = models.has(chosen) ? chosen : answer.default;
  if (first || chosen !== select.value) chooseModel();
  showModelStatus();
}

function chooseModel() {
  limits = models.get(form.elements.model.value).limits;
  setUpForm();
  showModelStatus();
}

form.elements.model.addEventListener("change", chooseModel);

// ---- the form ---------------------------------------------------------------

function setUpForm() {
  const fields = {
    steps: limits.steps, width: limits.size_px, height: limits.size_px,
    guidance_scale: limits.guidance_scale, num_images: { ...limits.num_images, default: 1 },
    seed: { ...limits.seed, default: "" },
  };
  for (const [name, range] of Object.entries(fields)) {
    const input = form.elements[name];
    input.min = range.min;
    input.max = range.max;
    input.value = range.default;
  }
  form.elements.width.step = form.elements.height.step = limits.size_px.multiple_of;
  form.elements.prompt.maxLength = limits.max_prompt_chars;
}

/** The params, or a list of problems in words (the model's limits, checked before submit). */
function readForm() {
  const problems = [];
  const number = (name, label, { integer = true, optional = false, multipleOf = null } = {}) => {
    const input = form.elements[name];
    input.removeAttribute("aria-invalid");
    if (input.value.trim() === "" && optional) return undefined;
    const value = Number(input.value);
    const min = Number(input.min), max = Number(input.max);
    let problem = null;
    if (input.value.trim() === "" || Number.isNaN(value)) problem = `${label} must be a number.`;
    else if (integer && !Number.isInteger(value)) problem = `${label} must be a whole number.`;
    else if (value < min || value > max) problem = `${label} must be between ${min} and ${max}.`;
    else if (multipleOf && value % multipleOf !== 0) problem = `${label} must be a multiple of ${multipleOf}.`;
    if (problem) {
      problems.push(problem);
      input.setAttribute("aria-invalid", "true");
    }
    return value;
  };
  const prompt = form.elements.prompt.value.trim();
  form.elements.prompt.removeAttribute("aria-invalid");
  if (!prompt) {
    problems.push("Write a prompt first.");
    form.elements.prompt.setAttribute("aria-invalid", "true");
  }
  const params = {
    prompt,
    model: form.elements.model.value,
    steps: number("steps", "Steps"),
    width: number("width", "Width", { multipleOf: limits.size_px.multiple_of }),
    height: number("height", "Height", { multipleOf: limits.size_px.multiple_of }),
    guidance_scale: number("guidance_scale", "Guidance", { integer: false }),
    num_images: number("num_images", "Images"),
  };
  const seed = number("seed", "Seed", { optional: true });
  if (seed !== undefined) params.seed = seed;
  const negative = form.elements.negative_prompt.value.trim();
  if (negative) params.negative_prompt = negative;
  if (form.elements.previews.checked) params.preview = { every: 1, max_px: 128 };
  return { params, problems };
}

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  formError.textContent = "";
  const { params, problems } = readForm();
  if (problems.length) {
    formError.textContent = problems.join(" ");
    return;
  }
  let response;
  try {
    response = await fetch("/v1/jobs", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify(params),
    });
  } catch {
    formError.textContent = "The server is unreachable. Check your connection and try again.";
    return;
  }
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const details = (body.errors || []).map((e) => e.message).join("; ");
    formError.textContent = `The server refused this job: ${details || body.detail || response.statusText}.`;
    return;
  }
  const card = addCard(body, { prepend: true });
  connection.watch(body.id, 0); // every event of the job, from the first
  card.root.querySelector(".cancel").focus({ preventScroll: true });
});

// ---- job cards --------------------------------------------------------------

function addCard(job, { prepend }) {
  const root = template.content.firstElementChild.cloneNode(true);
  const card = {
    root, job, startedAt: null, timer: null,
    state: root.querySelector(".state"), bar: root.querySelector(".bar"),
    fill: root.querySelector(".fill"), timing: root.querySelector(".timing"),
    error: root.querySelector(".error"), pictures: root.querySelector(".pictures"),
    cancel: root.querySelector(".cancel"),
  };
  root.dataset.jobId = job.id;
  root.querySelector(".prompt").textContent = job.params.prompt;
  card.bar.setAttribute("aria-label", `Progress of “${job.params.prompt.slice(0, 60)}”`);
  card.cancel.addEventListener("click", () => cancel(card));
  renderParams(card);
  cards.set(job.id, card);
  if (prepend) list.prepend(root); else list.append(root);
  empty.hidden = true;
  apply(card, { type: "snapshot", job_id: job.id, job });
  return card;
}

function renderParams(card) {
  const p = card.job.params;
  const shown = [["Seed", p.seed], ["Steps", p.steps], ["Size", `${p.width}×${p.height}`],
    ["Guidance", p.guidance_scale], ["Scheduler", p.scheduler || "model default"], ["Model", p.model]];
  if (p.negative_prompt) shown.push(["Negative", p.negative_prompt]);
  card.root.querySelector(".params").replaceChildren(...shown.map(([name, value]) => {
    const row = document.createElement("div");
    const dt = document.createElement("dt");
    const dd = document.createElement("dd");
    dt.textContent = name;
    dd.textContent = String(value);
    row.append(dt, dd);
    return row;
  }));
}

async function cancel(card) {
  card.cancel.disabled = true;
  try {
    const response = await fetch(`/v1/jobs/${card.job.id}/cancel`, { method: "POST" });
    if (!response.ok && response.status !== 409) {
      const body = await response.json().catch(() => ({}));
      card.error.textContent = `Could not cancel: ${body.detail || response.statusText}.`;
      card.cancel.disabled = false;
      return;
    }
    const job = await response.json();
    if (job.status) apply(card, { type: "snapshot", job_id: job.id, job });
  } catch {
    card.error.textContent = "Could not cancel: the server is unreachable.";
    card.cancel.disabled = false;
  }
}

function setProgress(card, step, total) {
  card.bar.setAttribute("aria-valuemax", String(total));
  card.bar.setAttribute("aria-valuenow", String(step));
  const percent = total ? Math.round((100 * step) / total) : 0;
  card.bar.setAttribute("aria-valuetext", `step ${step} of ${total} (${percent}%)`);
  card.fill.style.width = `${percent}%`;
}

function seconds(value) {
  return value === null || value === undefined ? "…" : `${Number(value).toFixed(1)} s`;
}

// A wire timestamp as the reader's wall-clock time (an estimated start).
function clockTime(iso) {
  return new Date(iso).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
}

function tick(card) {
  if (card.startedAt === null) return;
  const elapsed = (Date.now() - card.startedAt) / 1000;
  const eta = card.eta === undefined ? "" : ` · about ${seconds(card.eta)} left`;
  card.timing.textContent = `step ${card.step}/${card.total} · ${elapsed.toFixed(1)} s elapsed${eta}`;
}

function setStatus(card, statusName, text) {
  card.root.dataset.status = statusName;
  card.state.textContent = text;
  const done = TERMINAL.has(statusName);
  card.cancel.disabled = done;
  card.cancel.hidden = done;
  if (done) {
    clearInterval(card.timer);
    card.timer = null;
    connection.forget(card.job.id);
  } else if (statusName === "processing" && card.timer === null) {
    card.timer = setInterval(() => tick(card), 200);
  }
}

function showImages(card, images) {
  card.pictures.replaceChildren(...images.map((image, index) => {
    const figure = document.createElement("figure");
    const img = document.createElement("img");
    img.src = image.url;
    img.width = image.width;
    img.height = image.height;
    img.alt = `${card.job.params.prompt} — image ${index + 1}, seed ${image.seed}`;
    const caption = document.createElement("figcaption");
    const link = document.createElement("a");
    link.href = image.url;
    link.download = `stepcast-${image.seed}.png`;
    link.textContent = `Download (seed ${image.seed})`;
    caption.append(link);
    figure.append(img, caption);
    return figure;
  }));
}

function showPreview(card, dataUrl) {
  let img = card.pictures.querySelector("img.preview");
  if (!img) {
    img = document.createElement("img");
    img.className = "preview";
    img.alt = "preview of the image being made";
    card.pictures.replaceChildren(img);
  }
  img.src = dataUrl;
}

function apply(card, event) {
  switch (event.type) {
    case "snapshot": {
      const job = event.job;
      card.job = { ...card.job, ...job };
      card.step = job.progress.step;
      card.total = job.progress.total;
      setProgress(card, card.step, card.total);
      if (job.status === "pending") {
        const starts = job.estimated_start_at ? ` (starts at about ${clockTime(job.estimated_start_at)})` : "";
        setStatus(card, "pending", job.queue_position ? `Waiting — number ${job.queue_position} in the queue${starts}` : "Waiting in the queue");
      } else if (job.status === "processing") {
        card.startedAt = card.startedAt ?? (job.started_at ? Date.parse(job.started_at) : Date.now());
        setStatus(card, "processing", "Painting…");
        tick(card);
      } else {
        finish(card, job.status, job);
      }
      break;
    }
    case "queued":
      if (card.root.dataset.status === "pending" && event.reason === "no_worker") {
        const model = card.job.params.model;
        setStatus(card, "pending", `Waiting for a worker of ${model} to start — number ${event.position} in its queue`);
      } else if (card.root.dataset.status === "pending") {
        const starts = event.estimated_start_at ? `, starts at about ${clockTime(event.estimated_start_at)}` : "";
        const eta = event.eta_s === null ? "" : ` (done in about ${seconds(event.eta_s)}${starts})`;
        setStatus(card, "pending", `Waiting — number ${event.position} in the queue${eta}`);
      }
      break;
    case "started":
      card.startedAt = Date.now();
      setStatus(card, "processing", event.attempt > 1 ? `Painting (attempt ${event.attempt})…` : "Painting…");
      break;
    case "requeued":
      setStatus(card, "pending", `Back in the queue (${event.reason}); it will start again.`);
      break;
    case "progress":
      card.step = event.step;
      card.total = event.total;
      card.eta = event.eta_s;
      setProgress(card, event.step, event.total);
      if (card.root.dataset.status !== "processing") setStatus(card, "processing", "Painting…");
      if (event.preview) showPreview(card, event.preview);
      tick(card);
      break;
    case "completed":
      finish(card, "completed", { result: { images: event.images }, timings: event.timings });
      break;
    case "failed":
      finish(card, "failed", { error: event.error });
      break;
    case "canceled":
      finish(card, "canceled", {});
      break;
  }
}

function finish(card, statusName, job) {
  if (statusName === "completed") {
    setProgress(card, card.total, card.total);
    const run = job.timings ? ` in ${seconds(job.timings.run_s)}` : "";
    setStatus(card, "completed", `Done${run}`);
    card.timing.textContent = "";
    showImages(card, job.result.images);
  } else if (statusName === "failed") {
    setStatus(card, "failed", "Failed");
    card.error.textContent = `This job failed: ${job.error.message} (${job.error.code}).`;
  } else {
    setStatus(card, "canceled", "Canceled");
    card.timing.textContent = "";
    card.pictures.replaceChildren();
  }
}

// ---- start --------------------------------------------------------------------

async function start() {
  try {
    await loadModels({ first: true });
    setInterval(() => loadModels().catch(() => {}), MODELS_REFRESH_MS);
    const history = await (await fetch("/v1/jobs?limit=20")).json();
    for (const job of history.items) {
      addCard(job, { prepend: false });
      // Unfinished jobs: reattach from where the stored state ends.
      if (!TERMINAL.has(job.status)) connection.watch(job.id, job.last_seq);
    }
  } catch {
    formError.textContent = "The server is unreachable. Reload the page once it is back.";
  }
  connection.connect();
}

start();
