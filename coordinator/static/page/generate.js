// The image form: its samplers (GET /api/v1/samplers) and models, the live price quote,
// submitting a job and following its progress, and refilling it from a gallery image.

import { $, h, plural, seconds } from "./dom.js";
import { ApiError, api, followJob } from "./api.js";
import { clearErrors, fieldProblem, showError } from "./forms.js";
import { state } from "./state.js";
import { selectTab } from "./tabs.js";
import { refreshAccount } from "./account.js";
import { describeStatus, imageCard, loadGallery } from "./gallery.js";
import { offerSources, reuseSource, setUpSource, sourceFields, sourceParams } from "./source.js";
import { extrasParams, offerExtras, reuseExtras, setUpExtras } from "./extras.js";

const QUOTE_DELAY_MS = 350;

const form = () => $("generate-form");

/** The form as ImageParams; problems are marked on the fields, and null returned. */
function readParams({ mark }) {
  const f = form();
  const params = {
    prompt: $("gen-prompt").value,
    negative_prompt: $("gen-negative").value,
  };
  // empty until the sampler list has loaded: the coordinator's default then
  if ($("gen-sampler").value) params.sampler = $("gen-sampler").value;
  let ok = params.prompt.trim() !== "";
  if (!ok && mark) fieldProblem(f, "prompt", "Write what the image should show.");
  const numbers = [
    ["width", "gen-width", true], ["height", "gen-height", true], ["steps", "gen-steps", true],
    ["cfg_scale", "gen-cfg", false], ["n", "gen-n", true],
  ];
  for (const [field, id, whole] of numbers) {
    const value = Number($(id).value);
    if ($(id).value.trim() === "" || !Number.isFinite(value) || (whole && !Number.isInteger(value))) {
      ok = false;
      if (mark) fieldProblem(f, field, whole ? "Enter a whole number." : "Enter a number.");
    } else {
      params[field] = value;
    }
  }
  const seed = $("gen-seed").value.trim();
  if (seed !== "") {
    const value = Number(seed);
    if (!Number.isInteger(value) || value < 0) {
      ok = false;
      if (mark) fieldProblem(f, "seed", "Enter a whole number from 0, or leave empty for a random seed.");
    } else {
      params.seed = value;
    }
  }
  if ($("gen-model").value) params.model = $("gen-model").value;
  Object.assign(params, sourceParams());
  // CivitAI LoRAs and textual inversions: "name[:model[:clip]], ..." and "name[:strength], ..."
  const loras = adapterList($("gen-loras").value, ["model", "clip"]);
  if (loras.length) params.loras = loras;
  const tis = adapterList($("gen-tis").value, ["strength"]);
  if (tis.length) params.tis = tis;
  const extras = extrasParams({ mark });
  if (!extras) ok = false;
  withoutStrength(Object.assign(params, extras));
  return ok ? params : null;
}

/** With ControlNet the image is sampled from noise: the source's strength is not sent. */
function withoutStrength(params) {
  if (params.control_type) delete params.denoising_strength;
  return params;
}

/** "a:0.8, 123:1:0.5" -> [{name: "a", model: 0.8}, ...]: trailing numbers are `keys` in order
 * (as `idlegrid generate --lora`); the coordinator checks the rest. */
function adapterList(text, keys) {
  const specs = [];
  for (const entry of text.split(",").map((e) => e.trim()).filter(Boolean)) {
    const parts = entry.split(":");
    const numbers = [];
    while (parts.length > 1 && numbers.length < keys.length && parts.at(-1).trim() !== "" &&
           Number.isFinite(Number(parts.at(-1)))) {
      numbers.unshift(Number(parts.pop()));
    }
    const spec = { name: parts.join(":").trim() };
    numbers.forEach((value, i) => { spec[keys[i]] = value; });
    specs.push(spec);
  }
  return specs;
}

/** The form text of a job's LoRAs or TIs (the inverse of adapterList). */
function adapterText(specs, keys) {
  return (specs || []).map((spec) => {
    const numbers = keys.map((key) => spec[key] ?? 1);
    while (numbers.length && numbers.at(-1) === 1) numbers.pop();
    return [spec.name, ...numbers].join(":");
  }).join(", ");
}

let quoteTimer = null;
let quoteAbort = null;

/** Ask for the price again once the form has been still for a moment. */
export function scheduleQuote() {
  clearTimeout(quoteTimer);
  quoteTimer = setTimeout(updateQuote, QUOTE_DELAY_MS);
}

async function updateQuote() {
  quoteAbort?.abort();
  const box = $("quote");
  const params = readParams({ mark: false });
  box.classList.remove("unaffordable");
  if (!params) {
    box.textContent = $("gen-prompt").value.trim()
      ? "Fix the fields to see the price."
      : "Write a prompt to see the price.";
    return;
  }
  quoteAbort = new AbortController();
  try {
    const quote = await api("POST", "/api/v1/quotes/image", { body: params, signal: quoteAbort.signal });
    clearErrors(form());
    const parts = [`Costs ${plural(quote.kudos_cost, "kudo", "kudos")}`];
    parts.push(quote.anonymous
      ? `the free pool has ${quote.available.toLocaleString()}`
      : `you can spend ${quote.available.toLocaleString()}`);
    parts.push(quote.queue_position === 0 ? "next in line" : `${quote.queue_position} ahead in the queue`);
    const eta = seconds(quote.eta_seconds);
    if (eta) parts.push(`ready in about ${eta}`);
    box.textContent = parts.join(" · ") + (quote.affordable ? "" : ". Not enough kudos for this.");
    box.classList.toggle("unaffordable", !quote.affordable);
  } catch (error) {
    if (error.name === "AbortError") return;
    if (error instanceof ApiError && error.fields.length) {
      showError(form(), $("generate-error"), error);
      $("generate-error").textContent = "";
      box.textContent = "Fix the marked fields to see the price.";
    } else {
      box.textContent = `No price: ${error.message}`;
    }
  }
}

function showProgress(job) {
  const bar = $("progress-bar");
  if (job.state === "leased" && job.steps) {
    bar.max = job.n * job.steps;
    bar.value = job.image * job.steps + job.step;
  } else if (job.state === "done") {
    bar.max = 1;
    bar.value = 1;
  } else if (job.state === "queued" || job.state === "leased") {
    bar.removeAttribute("value"); // indeterminate
  } else {
    bar.max = 1;
    bar.value = 0;
  }
  $("progress-text").textContent = describeStatus(job);
  if (job.state !== "leased") $("progress-preview").hidden = true;
}

/** A live preview (a small JPEG of the image being sampled) in place of the last one. */
function showPreview(preview) {
  const image = $("progress-preview");
  // (the coordinator checked the type and the base64 of the picture)
  image.src = `data:${preview.content_type};base64,${preview.data}`;
  image.alt = `Preview of image ${preview.image + 1}, step ${preview.step} of ${preview.steps}`;
  image.hidden = false;
}

/** The sampler choice, from the coordinator (protocol/samplers.py), its default selected;
 *  a choice made before (a reused image's) is kept. */
export async function loadSamplers() {
  const select = $("gen-sampler");
  let list;
  try {
    list = await api("GET", "/api/v1/samplers");
  } catch (error) {
    $("gen-sampler-error").textContent = `Could not list the samplers (${error.message}); the default is used.`;
    return;
  }
  const chosen = select.value || list.default;
  select.replaceChildren(...list.samplers.map(({ name, evaluations_per_step: cost }) => h("option", {
    value: name, title: cost > 1 ? `costs ${cost} times as much per step` : null,
  }, name)));
  select.value = chosen;
}

export function setUpGenerate() {
  setUpSource(scheduleQuote);
  setUpExtras();
  form().addEventListener("input", scheduleQuote);
  form().addEventListener("change", scheduleQuote);
  form().addEventListener("submit", async (event) => {
    event.preventDefault();
    clearErrors(form(), $("generate-error"));
    const params = readParams({ mark: true });
    if (!params) {
      $("generate-error").textContent = "Fix the marked fields.";
      form().querySelector("[aria-invalid=true]")?.focus();
      return;
    }
    const button = $("gen-submit");
    button.disabled = true;
    let created;
    try {
      const body = withoutStrength({
        ...params, ...(await sourceFields()), signed_only: $("gen-signed-only").checked,
      });
      created = await api("POST", "/api/v1/jobs/image", { body });
    } catch (error) {
      showError(form(), $("generate-error"), error);
      button.disabled = false;
      return;
    }
    state.job?.abort.abort();
    const abort = new AbortController();
    state.job = { id: created.id, abort };
    const job = { id: created.id, params: { ...params, seed: created.seed }, created_at: Date.now() / 1000 };
    state.sessionJobs.unshift(job);
    $("progress").hidden = false;
    $("progress-preview").hidden = true;
    $("results").replaceChildren();
    $("gen-cancel").hidden = false;
    showProgress({ state: "queued", queue_position: created.queue_position, eta_seconds: created.eta_seconds });
    refreshAccount();
    try {
      const done = await followJob(created.id, showProgress, abort.signal, showPreview);
      Object.assign(job, done, { params: done.params || job.params });
      if (done.state === "done" && !state.key) {
        // signed in, the gallery shows them
        $("results").replaceChildren(...done.images.map((image) => imageCard(job, image, { compact: true })));
      }
      loadGallery(true);
      refreshAccount();
    } catch (error) {
      if (error.name !== "AbortError") $("progress-text").textContent = `Lost the job's progress: ${error.message}`;
    } finally {
      if (state.job?.id === created.id) state.job = null;
      $("gen-cancel").hidden = true;
      button.disabled = false;
      scheduleQuote();
    }
  });
  $("gen-cancel").addEventListener("click", async () => {
    if (!state.job) return;
    try {
      await api("POST", `/api/v1/jobs/${encodeURIComponent(state.job.id)}/cancel`);
    } catch (error) {
      $("generate-error").textContent = error.message;
    }
  });
}

/** Fill the form with a gallery image's settings. */
export function reuse(params, seed) {
  $("gen-prompt").value = params.prompt;
  $("gen-negative").value = params.negative_prompt || "";
  $("gen-width").value = params.width;
  $("gen-height").value = params.height;
  $("gen-steps").value = params.steps;
  $("gen-cfg").value = params.cfg_scale;
  const sampler = $("gen-sampler");
  if (![...sampler.options].some((o) => o.value === params.sampler)) {
    sampler.append(h("option", { value: params.sampler }, params.sampler));
  }
  sampler.value = params.sampler;
  $("gen-seed").value = seed;
  $("gen-n").value = 1;
  const model = $("gen-model");
  if (params.model && ![...model.options].some((o) => o.value === params.model)) {
    model.append(h("option", { value: params.model }, params.model));
  }
  model.value = params.model || "";
  reuseSource(params);
  $("gen-loras").value = adapterText(params.loras, ["model", "clip"]);
  $("gen-tis").value = adapterText(params.tis, ["strength"]);
  reuseExtras(params);
  selectTab("images");
  history.replaceState(null, "", "#images");
  clearErrors(form(), $("generate-error"));
  $("gen-prompt").focus();
  $("generate-title").scrollIntoView({ block: "start" });
  scheduleQuote();
}

/** The image models served now, offered in the form (which keeps its choice). */
export async function loadImageModels() {
  let net;
  try {
    net = await api("GET", "/api/v1/network");
  } catch (_) {
    return;
  }
  offerSources(net);
  offerExtras(net);
  const select = $("gen-model");
  const chosen = select.value;
  const names = net.models.filter((m) => m.kind === "image").map((m) => m.name);
  if (chosen && !names.includes(chosen)) names.push(chosen);
  select.replaceChildren(h("option", { value: "" }, "Any model"),
    ...names.map((name) => h("option", { value: name }, name)));
  select.value = chosen;
}
