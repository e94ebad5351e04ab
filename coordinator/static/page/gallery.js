// The jobs list: the gallery of the account's jobs (paged), a shared job (#job=ID), and
// each image's card with its parameters, download, rating, sharing, dispute and reuse.

import { $, copyText, h, plural, seconds, uniqueId } from "./dom.js";
import { ApiError, api, request } from "./api.js";
import { state } from "./state.js";
import { refreshAccount } from "./account.js";
import { reuse } from "./generate.js";
import { extrasText } from "./extras.js";

const GALLERY_PAGE = 20;

/** A job's state in a sentence. */
export function describeStatus(job) {
  switch (job.state) {
    case "queued": {
      const where = job.queue_position === 0 ? "next in line"
        : job.queue_position === null ? "waiting"
        : `${job.queue_position} ahead`;
      const eta = seconds(job.eta_seconds);
      return `Queued: ${where}${eta ? `, ready in about ${eta}` : ""}.`;
    }
    case "leased":
      return job.steps
        ? `Generating image ${job.image + 1} of ${job.n}: step ${job.step} of ${job.steps}.`
        : "A worker took the job; starting…";
    case "done":
      return `Done: ${plural(job.images.length, "image", "images")} for ${plural(job.kudos_cost, "kudo", "kudos")}.`;
    case "cancelled":
      return "Cancelled; the kudos were refunded.";
    default:
      return `Failed: ${job.error || "no reason given"}. The kudos were refunded.`;
  }
}

/** AUTOMATIC1111's "parameters" text of one image. */
function parametersText(params, seed) {
  const lines = [params.prompt];
  if (params.negative_prompt) lines.push(`Negative prompt: ${params.negative_prompt}`);
  const parts = [
    `Steps: ${params.steps}`, `Sampler: ${params.sampler}`, `CFG scale: ${params.cfg_scale}`,
    `Seed: ${seed}`, `Size: ${params.width}x${params.height}`,
  ];
  if (params.model) parts.push(`Model: ${params.model}`);
  if (params.source_processing && params.source_processing !== "txt2img" && !params.control_type) {
    parts.push(`Denoising strength: ${params.denoising_strength ?? 0.75}`,
      `Source processing: ${params.source_processing}`);
  }
  parts.push(...extrasText(params));
  lines.push(parts.join(", "));
  return lines.join("\n");
}

/** An object URL of a result image, fetched with the key in a header (once per image). */
async function imageUrl(jobId, index) {
  const cached = state.images.get(`${jobId}/${index}`);
  if (cached) return cached;
  const path = `/api/v1/jobs/${encodeURIComponent(jobId)}/images/${index}`;
  const blob = await (await request("GET", path, { headers: { Accept: "image/png" } })).blob();
  const url = URL.createObjectURL(blob);
  state.images.set(`${jobId}/${index}`, url);
  return url;
}

const shareLink = (jobId) => `${location.origin}${location.pathname}#job=${encodeURIComponent(jobId)}`;

function ratingText(image) {
  return image.ratings
    ? `Rated ${image.rating.toFixed(1)} (${plural(image.ratings, "rating", "ratings")})`
    : "Not rated yet";
}

/** One image: the picture, its parameters, download, rating, sharing and reuse. */
export function imageCard(job, image, { compact = false, shared = false, share = true } = {}) {
  const params = job.params;
  const id = uniqueId("image");
  const text = params ? parametersText(params, image.seed) : `Seed: ${image.seed}`;
  const picture = h("div", { class: "placeholder" }, "Loading…");
  const download = h("a", {
    class: "button quiet", download: `idlegrid-${job.id.slice(0, 8)}-${image.index}.png`,
    hidden: true,
  }, "Download");
  imageUrl(job.id, image.index).then((url) => {
    const img = h("img", {
      src: url, alt: params ? `Generated image: ${params.prompt.slice(0, 200)}` : "Generated image",
      width: params ? params.width : null, height: params ? params.height : null,
    });
    picture.replaceWith(img);
    download.href = url;
    download.hidden = false;
  }).catch((error) => {
    picture.textContent = `Could not load the image: ${error.message}`;
  });

  const meta = h("p", { class: "meta", "aria-live": "polite" }, ratingText(image));
  const score = h("select", { id: `${id}-score` },
    h("option", { value: "" }, "—"),
    ...Array.from({ length: 10 }, (_, i) => h("option", { value: String(10 - i) }, String(10 - i))));
  const rate = h("button", { type: "button", class: "quiet" }, "Rate");
  rate.addEventListener("click", async () => {
    if (!score.value) {
      meta.textContent = "Choose a score from 1 to 10 first.";
      score.focus();
      return;
    }
    rate.disabled = true;
    try {
      const rated = await api("POST",
        `/api/v1/jobs/${encodeURIComponent(job.id)}/images/${image.index}/rating`,
        { body: { score: Number(score.value) } });
      meta.textContent = `You rated it ${rated.score}. ${ratingText(rated)}`
        + (rated.kudos_earned ? `; you earned ${plural(rated.kudos_earned, "kudo", "kudos")}.` : ".");
      refreshAccount();
    } catch (error) {
      meta.textContent = error.message;
      rate.disabled = false;
    }
  });

  const children = [
    picture,
    h("pre", { "aria-label": "Generation parameters", tabindex: "0" }, text),
    h("div", { class: "row" },
      download,
      params && h("button", { type: "button", class: "quiet", onclick: () => reuse(params, image.seed) },
        "Reuse settings")),
  ];
  if (state.key) {
    children.push(h("div", { class: "row" },
      h("label", { for: `${id}-score` }, "Rate"), score, rate), meta);
    // sharing is per job: its first image carries the switch (and the dispute button)
    if (!compact && !shared && share) children.push(shareControls(job));
    if (!compact && !shared && share && job.signed === false) children.push(disputeControls(job));
  }
  return h(compact ? "div" : "li", { class: "image-card", "data-job": job.id }, ...children);
}

function shareControls(job) {
  const box = h("div", { class: "share" });
  const id = uniqueId("share");
  const toggle = h("input", { type: "checkbox", id, role: "switch", checked: Boolean(job.shared) });
  const what = job.n > 1 ? `Shared (all ${job.n} images)` : "Shared";
  const link = h("input", {
    class: "share-link", readonly: true, value: shareLink(job.id), id: `${id}-link`,
    "aria-label": "Link to the shared image",
  });
  const copy = h("button", { type: "button", class: "quiet" }, "Copy link");
  const said = h("span", { class: "hint", "aria-live": "polite" });
  const linkRow = h("div", { class: "row", hidden: !job.shared }, link, copy);
  toggle.addEventListener("change", async () => {
    const wanted = toggle.checked;
    toggle.disabled = true;
    try {
      const done = await api("POST", `/api/v1/jobs/${encodeURIComponent(job.id)}/share`, { body: { shared: wanted } });
      job.shared = done.shared;
      // every card of this job shows the same state
      for (const card of document.querySelectorAll(`.image-card[data-job="${CSS.escape(job.id)}"]`)) {
        const other = card.querySelector('input[role="switch"]');
        if (other) other.checked = done.shared;
        const row = card.querySelector(".share-link")?.parentElement;
        if (row) row.hidden = !done.shared;
      }
      said.textContent = done.shared ? "Shared: signed-in users with the link can see it." : "Private.";
    } catch (error) {
      toggle.checked = !wanted;
      said.textContent = error.message;
    } finally {
      toggle.disabled = false;
    }
  });
  copy.addEventListener("click", async () => {
    said.textContent = (await copyText(link.value, link)) ? "Link copied." : "Select the link and copy it.";
  });
  box.append(h("div", { class: "row" },
    h("label", { class: "switch", for: id }, toggle, what), said), linkRow);
  return box;
}

function disputeControls(job) {
  // An AI Horde worker made it: unsigned, never checked; its pay is held for a while.
  const said = h("p", { class: "hint", "aria-live": "polite" },
    job.disputable
      ? "Made by an AI Horde worker: unsigned and never checked. If the images are wrong, "
        + "dispute them while its pay is held and get your kudos back."
      : "Made by an AI Horde worker: unsigned and never checked.");
  const box = h("div", { class: "dispute" }, said);
  if (!job.disputable) return box;
  const reason = h("input", {
    type: "text", maxlength: "500", "aria-label": "What is wrong with the images",
    placeholder: "What is wrong (optional)",
  });
  const button = h("button", { type: "button", class: "quiet" }, "Dispute");
  button.addEventListener("click", async () => {
    button.disabled = true;
    try {
      const done = await api("POST", `/api/v1/jobs/${encodeURIComponent(job.id)}/dispute`,
        { body: { reason: reason.value } });
      job.disputable = false;
      said.textContent = `Disputed: ${plural(done.refunded, "kudo", "kudos")} back to you.`;
      reason.remove();
      button.remove();
      refreshAccount();
    } catch (error) {
      said.textContent = error.message;
      button.disabled = false;
    }
  });
  box.append(h("div", { class: "row" }, reason, button));
  return box;
}

function jobCards(job) {
  if (job.state === "done") return job.images.map((image, i) => imageCard(job, image, { share: i === 0 }));
  if (job.state === "cancelled") return [];
  const text = job.state === "failed" ? `Failed: ${job.error || "no reason given"}` : describeStatus(job);
  return [h("li", { class: "image-card", "data-job": job.id },
    h("div", { class: "placeholder" }, text),
    job.params && h("pre", {}, job.params.prompt))];
}

let galleryLoading = null;

/** The gallery's first page (`fresh`) or its next one. */
export async function loadGallery(fresh) {
  if (!state.key) return;
  if (fresh) state.galleryOffset = 0;
  const offset = state.galleryOffset;
  const mine = (galleryLoading = new AbortController());
  const status = $("gallery-status");
  try {
    const page = await api("GET", `/api/v1/jobs?limit=${GALLERY_PAGE}&offset=${offset}`, { signal: mine.signal });
    if (mine !== galleryLoading) return;
    const cards = page.jobs.flatMap(jobCards);
    if (fresh) $("gallery").replaceChildren(...cards);
    else $("gallery").append(...cards);
    state.galleryOffset = page.next_offset ?? offset + page.jobs.length;
    $("gallery-more").hidden = page.next_offset === null || page.next_offset === undefined;
    status.textContent = $("gallery").children.length ? "" : "No images yet: generate one.";
  } catch (error) {
    if (error.name === "AbortError" || mine !== galleryLoading) return;
    if (error instanceof ApiError && (error.status === 404 || error.status === 405)) {
      // a coordinator without the job list: show what was made on this page
      $("gallery").replaceChildren(...state.sessionJobs.filter((j) => j.state).flatMap(jobCards));
      status.textContent = "This coordinator does not list past jobs; images made here are shown.";
    } else {
      status.textContent = `Could not load the gallery: ${error.message}`;
    }
  }
}

/** A job shared by a link (#job=ID). */
export async function showSharedJob(jobId) {
  const box = $("shared-job");
  box.hidden = false;
  if (!state.key) {
    box.replaceChildren(h("p", { class: "hint" }, "Sign in to see the shared image."));
    return;
  }
  try {
    const job = await api("GET", `/api/v1/jobs/${encodeURIComponent(jobId)}`);
    box.replaceChildren(
      h("h3", {}, "Shared with you"),
      h("ul", { class: "gallery" }, ...(job.state === "done"
        ? job.images.map((image) => imageCard(job, image, { shared: true }))
        : jobCards(job))));
  } catch (error) {
    box.replaceChildren(h("p", { class: "form-error" }, `Cannot show job ${jobId}: ${error.message}`));
  }
}
