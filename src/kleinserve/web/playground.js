// The playground page: settings -> one BFL async job per image (POST /v1/flux-2-klein-4b, seeds seed, seed+1,
// ...) -> each job followed on /v1/jobs/{id}/events (progress, step previews) -> its result from
// /v1/jobs/{id}. The BFL endpoint is used because it answers with the job id at once (the OpenAI ones answer
// when the images are done); it takes references as data URLs (input_image, input_image_2, ...),
// steps/guidance on base variants only, and the chosen LoRA adapters as `loras` (left out when none is).
// With a painted mask (mask.js) the first reference becomes `image_prompt`, the image edited, beside `mask`
// and `strength` (kleinserve's extension of the body), and the others move up to input_image, ...

import * as api from "./api.js";
import { decimal, Gallery, showFailure, showPreview, showResult } from "./gallery.js";
import { LoraPicker } from "./loras.js";
import { MaskPainter } from "./mask.js";
import { MODEL, SNIPPETS } from "./snippets.js";

const MAX_REFERENCES = 4;
const REFERENCE_FIELDS = ["input_image", "input_image_2", "input_image_3", "input_image_4"];

const ui = Object.fromEntries(
  [...document.querySelectorAll("[id]")].map((node) => [
    node.id.replace(/-(\w)/g, (_, letter) => letter.toUpperCase()),
    node,
  ]),
); // ui.refInput is #ref-input, and so on

const gallery = new Gallery(ui.gallery, ui.empty);
const loras = new LoraPicker(ui.loras, ui.loraList, ui.addLora, refreshSnippet);
const painter = new MaskPainter(ui.mask, onMaskChange);
const state = {
  references: [], // {name, dataUrl}
  variant: null, // {tunable, steps, guidance}: what GET /v1/models/{id} says of the loaded variant
  sizeChosen: false, // the user picked a size in this page load: the model's default no longer replaces it
  busy: false, // a Generate is under way (Ctrl+Enter submits even while the button is disabled)
  jobs: [], // the latest Generate's jobs: {id, card, progress, done, failed}
  snippet: null, // the kind of code shown, kept up to date as the settings change
};

// --- errors, in plain words --------------------------------------------------------------------------

function describe(error) {
  if (!(error instanceof api.ApiError)) return `Something went wrong in the page: ${error.message}`;
  const message = error.message.replace(/\.$/, "");
  if (error.status === 0) return `No answer: ${message}.`;
  if (error.status === 401 && !api.apiKey()) return "This server needs an API key: enter it at the top.";
  if (error.status === 401 || error.status === 403) {
    return `The server did not accept the API key: ${message}. Check the key at the top of the page.`;
  }
  if (error.status === 429 || error.status === 503) return `The server is busy: ${message}. Try again soon.`;
  if (error.status >= 500) return `The server failed: ${message}.`;
  return `The server refused these settings: ${message}.`;
}

function showError(message) {
  ui.error.textContent = message;
  ui.error.hidden = false;
}

function clearError() {
  ui.error.hidden = true;
  ui.error.textContent = "";
}

// --- the loaded variant ------------------------------------------------------------------------------

// An optional field's JSON Schema is {anyOf: [{type, minimum, maximum}, {type: "null"}], default}.
function range(property = {}) {
  const option = (property.anyOf ?? [property]).find((o) => ["integer", "number"].includes(o.type)) ?? {};
  return { min: option.minimum, max: option.maximum, default: property.default };
}

async function loadVariant() {
  try {
    const card = await api.request(`/v1/models/${MODEL}`);
    const properties = card.parameters?.properties ?? {};
    // Distilled variants mark guidance readOnly (fixed); they are trained for a fixed number of steps too,
    // and the BFL endpoint ignores both for them: both controls show only for variants without the mark.
    const tunable = Boolean(properties.guidance_scale) && !properties.guidance_scale.readOnly;
    const steps = range(properties.num_inference_steps);
    const guidance = range(properties.guidance_scale);
    state.variant = { tunable, steps, guidance };
    ui.sampling.hidden = !tunable;
    // The model's default size (256x256 for the toy model, which draws garbage at 1024x1024) replaces the
    // page's 1024x1024 when it is one of the presets and the user has not picked a size yet.
    const defaultSize = properties.size?.default;
    if (!state.sizeChosen && [...ui.size.options].some((option) => option.value === defaultSize)) {
      ui.size.value = defaultSize;
      onSizeChange();
    }
    if (tunable) {
      // A base variant's default (50) lies above the OpenAI schema's maximum (12); the BFL endpoint takes it.
      Object.assign(ui.steps, { min: steps.min ?? 1, max: Math.max(steps.max ?? 50, steps.default ?? 0) });
      Object.assign(ui.guidance, { min: guidance.min ?? 0, max: guidance.max ?? 10 });
      ui.steps.value ||= steps.default ?? "";
      ui.guidance.value ||= guidance.default ?? "";
    }
    const fixed = `distilled: ${steps.default} steps and guidance ${decimal(guidance.default)}, fixed`;
    ui.model.textContent = `Model: ${card.variant ?? card.id}${tunable ? "" : ` (${fixed})`}`;
  } catch (error) {
    state.variant = null;
    ui.sampling.hidden = true;
    ui.model.textContent = "Model: unknown";
    showError(describe(error));
  }
  refreshSnippet();
}

// --- settings ----------------------------------------------------------------------------------------

function chosenSize() {
  if (painter.mask()) return null; // a masked edit has the size of the image it edits
  if (ui.size.value === "auto") return null; // the first reference's size, else the model's default
  if (ui.size.value === "custom") return { width: Number(ui.width.value), height: Number(ui.height.value) };
  const [width, height] = ui.size.value.split("x").map(Number);
  return { width, height };
}

// null for the variant's default, so that snippets leave the field out.
function unlessDefault(input, fallback) {
  return input.value === "" || Number(input.value) === fallback ? null : Number(input.value);
}

// The settings as the snippets and the submission use them; `seed` is null while it is not locked.
function settings() {
  const size = chosenSize();
  const variant = state.variant;
  return {
    prompt: ui.prompt.value,
    size: size && `${size.width}x${size.height}`,
    count: Number(ui.count.value),
    seed: ui.seedLock.checked && ui.seed.value !== "" ? Number(ui.seed.value) : null,
    steps: variant?.tunable ? unlessDefault(ui.steps, variant.steps.default) : null,
    guidance: variant?.tunable ? unlessDefault(ui.guidance, variant.guidance.default) : null,
    references: state.references.map((ref) => ref.name),
    loras: loras.chosen(),
    mask: painter.mask(),
    hasKey: api.apiKey() !== "",
  };
}

// What the page alone can judge, in plain words; sizes and ranges are the server's to refuse.
function problem(current) {
  if (!current.prompt.trim()) return "Write a prompt first.";
  const size = chosenSize();
  if (size && !(Number.isInteger(size.width) && Number.isInteger(size.height))) {
    return "Width and height must be whole numbers of pixels.";
  }
  if (current.seed !== null && !(Number.isSafeInteger(current.seed) && current.seed >= 0)) {
    return "The seed must be a whole number, 0 or more.";
  }
  return null;
}

// A mask fixes the size (the edited image's): the size controls are disabled while one is painted.
function onMaskChange() {
  const masked = painter.mask() !== null;
  for (const input of [ui.size, ui.width, ui.height]) input.disabled = masked;
  refreshSnippet();
}

function onSizeChange() {
  if (ui.size.value !== "custom" && ui.size.value !== "auto") {
    [ui.width.value, ui.height.value] = ui.size.value.split("x"); // Custom starts from the last preset
  }
  ui.customSize.hidden = ui.size.value !== "custom";
}

// --- reference images --------------------------------------------------------------------------------

function readAsDataUrl(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}

async function addReferences(files) {
  clearError();
  const images = [...files].filter((file) => file.type.startsWith("image/"));
  if (images.length < files.length) showError("Only images can be references; other files were left out.");
  const room = MAX_REFERENCES - state.references.length;
  if (images.length > room) {
    showError(`At most ${MAX_REFERENCES} reference images: ${images.length - room} left out.`);
  }
  for (const file of images.slice(0, Math.max(room, 0))) {
    state.references.push({ name: file.name || "reference.png", dataUrl: await readAsDataUrl(file) });
  }
  renderReferences();
}

function renderReferences() {
  const items = state.references.map((ref, index) => {
    const item = document.createElement("li");
    const thumbnail = Object.assign(document.createElement("img"), { src: ref.dataUrl, alt: ref.name });
    thumbnail.title = ref.name;
    const remove = Object.assign(document.createElement("button"), { type: "button", textContent: "×" });
    remove.setAttribute("aria-label", `Remove reference ${ref.name}`);
    remove.addEventListener("click", () => {
      state.references.splice(index, 1);
      renderReferences();
    });
    item.append(thumbnail, remove);
    return item;
  });
  ui.refs.replaceChildren(...items);
  painter.setImage(state.references[0] ?? null); // a new first image clears the mask painted on the old one
  refreshSnippet();
}

// --- generating --------------------------------------------------------------------------------------

function bflBody(current, seed) {
  const body = { prompt: current.prompt, seed, output_format: "png", ...chosenSize() };
  if (current.steps !== null) body.steps = current.steps;
  if (current.guidance !== null) body.guidance = current.guidance;
  if (current.loras.length) body.loras = current.loras;
  let references = state.references;
  if (current.mask) {
    [body.image_prompt, body.mask] = [references[0].dataUrl, current.mask.white];
    if (current.mask.strength !== null) body.strength = current.mask.strength;
    references = references.slice(1);
  }
  references.forEach((ref, index) => (body[REFERENCE_FIELDS[index]] = ref.dataUrl));
  return body;
}

function setBusy(busy) {
  state.busy = busy;
  ui.generate.disabled = busy;
  ui.generate.textContent = busy ? "Generating…" : "Generate";
  ui.cancel.hidden = !busy;
  ui.progress.hidden = !busy && !state.jobs.length;
}

function updateProgress(text) {
  const total = state.jobs.length || 1;
  ui.progressBar.value = state.jobs.reduce((sum, job) => sum + job.progress, 0) / total;
  if (text) ui.progressText.textContent = text;
}

async function generate(event) {
  event.preventDefault();
  if (state.busy) return;
  clearError();
  const current = settings();
  const invalid = problem(current);
  if (invalid) return showError(invalid);
  // Drawn here rather than by the server, so that each image's seed (seed + i) is known before it is made.
  const seed = current.seed ?? Math.floor(Math.random() * 2 ** 32);
  if (current.seed === null) ui.seed.value = seed;
  const size = chosenSize();
  const aspect = size ? size.width / size.height : ((current.mask && painter.aspect()) ?? 1);
  state.jobs = [];
  gallery.startBatch();
  setBusy(true);
  updateProgress("Submitting…");
  try {
    // One job per image, all submitted before any is followed, so that the server can batch them.
    for (let index = 0; index < current.count; index++) {
      const body = bflBody(current, seed + index);
      const answer = await api.request(`/v1/${MODEL}`, { method: "POST", json: body });
      const card = gallery.add(current.prompt, aspect);
      state.jobs.push({ id: answer.id, card, progress: 0, done: false });
    }
  } catch (error) {
    showError(describe(error));
  }
  await Promise.all(state.jobs.map((job) => follow(job, current)));
  const made = state.jobs.filter((job) => !job.failed).length;
  updateProgress(made === state.jobs.length ? "Done" : `${made} of ${state.jobs.length} made`);
  setBusy(false);
}

async function follow(job, { prompt, mask }) {
  const onEvent = (event) => {
    if (event.type === "queued") updateProgress(`Queued (position ${event.position})`);
    if (event.type === "running") {
      job.progress = event.progress ?? job.progress; // set when the job was polled (a broken stream)
      updateProgress("Running…");
    }
    if (event.type === "step") {
      job.progress = event.step / event.total_steps;
      updateProgress(`Step ${event.step} of ${event.total_steps}`);
      if (event.preview) showPreview(job.card, `data:image/png;base64,${event.preview}`);
    }
  };
  try {
    const final = await api.followJob(job.id, onEvent);
    if (final.type === "cancelled") {
      job.failed = true;
      showFailure(job.card, "Cancelled.");
      return;
    }
    if (final.type !== "succeeded") throw new Error(final.error || final.type);
    const body = await api.request(`/v1/jobs/${encodeURIComponent(job.id)}`);
    const blob = await api.fetchImage(body.result.images[0].url);
    await showResult(job.card, blob, body, { prompt, mask }, (file) => addReferences([file]));
  } catch (error) {
    job.failed = true;
    const message = error instanceof api.ApiError ? describe(error) : `Generation failed: ${error.message}.`;
    showError(message);
    showFailure(job.card, message);
  } finally {
    job.progress = 1;
    job.done = true;
    updateProgress();
  }
}

async function cancel() {
  for (const job of state.jobs.filter((job) => !job.done)) {
    try {
      await api.request(`/v1/jobs/${encodeURIComponent(job.id)}/cancel`, { method: "POST" });
    } catch (error) {
      showError(describe(error));
    }
  }
}

// --- code snippets -----------------------------------------------------------------------------------

function refreshSnippet() {
  if (!state.snippet) return;
  ui.code.querySelector("code").textContent = SNIPPETS[state.snippet](settings(), window.location.origin);
}

async function copySnippet(kind) {
  state.snippet = kind;
  refreshSnippet();
  ui.code.hidden = false;
  try {
    await navigator.clipboard.writeText(ui.code.textContent);
    ui.codeNote.textContent = "Copied to the clipboard.";
  } catch {
    // No clipboard permission (or not a secure origin): the code is on the page to copy by hand.
    ui.codeNote.textContent = "Select the code below and copy it.";
  }
}

// --- wiring ------------------------------------------------------------------------------------------

function useKey(event) {
  event?.preventDefault(); // Enter in the key field submits its form: no page reload
  api.setApiKey(ui.apiKey.value.trim());
  clearError();
  loadVariant();
  loras.load();
}

function start() {
  ui.apiKey.value = api.apiKey();
  ui.apiKey.addEventListener("change", useKey);
  ui.keyForm.addEventListener("submit", useKey);
  ui.size.addEventListener("change", () => {
    state.sizeChosen = true;
    onSizeChange();
  });
  ui.seed.addEventListener("input", () => (ui.seedLock.checked = ui.seed.value !== ""));
  ui.controls.addEventListener("submit", generate);
  ui.controls.addEventListener("input", refreshSnippet);
  ui.controls.addEventListener("change", refreshSnippet);
  ui.prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) ui.controls.requestSubmit();
  });
  ui.cancel.addEventListener("click", cancel);
  ui.refInput.addEventListener("change", async () => {
    await addReferences(ui.refInput.files);
    ui.refInput.value = ""; // so that picking the same file again is a change again
  });
  ui.drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    ui.drop.classList.add("over");
  });
  ui.drop.addEventListener("dragleave", () => ui.drop.classList.remove("over"));
  ui.drop.addEventListener("drop", (event) => {
    event.preventDefault();
    ui.drop.classList.remove("over");
    addReferences(event.dataTransfer.files);
  });
  for (const button of document.querySelectorAll("[data-snippet]")) {
    button.addEventListener("click", () => copySnippet(button.dataset.snippet));
  }
  onSizeChange();
  loadVariant();
  loras.load();
}

start();
