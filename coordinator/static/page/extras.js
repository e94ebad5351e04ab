// The image form's extras (README "Image extras"): hires fix, an upscaler and the GFPGAN
// face fixer (`post_processing`), ControlNet on the source image, clip skip, tiling and
// Karras sigmas, sent as the v1 job's fields. Upscalers, the face fixer and ControlNet types
// are offered only when some online image worker serves them (GET /api/v1/network); a
// ControlNet type whose map no online worker makes is offered only with "image is the
// control map". The rest every image worker serves.

import { $, h } from "./dom.js";
import { fieldProblem } from "./forms.js";

// protocol/postprocess.py UPSCALERS, FACE_FIXERS and the defaults; protocol/control.py
// CONTROL_TYPES; protocol/params.py MAX_CLIP_SKIP
const UPSCALERS = [
  "RealESRGAN_x2plus", "RealESRGAN_x4plus", "RealESRGAN_x4plus_anime_6B", "NMKD_Siax", "4x_AnimeSharp",
];
const FACE_FIXER = "GFPGAN";
const DEFAULT_HIRES_STRENGTH = 0.65;
const DEFAULT_FACEFIXER_STRENGTH = 0.75;
const CONTROL_TYPES = [
  "canny", "hed", "depth", "normal", "openpose", "seg", "scribble", "fakescribbles", "hough",
];
const MAX_CLIP_SKIP = 12;
const NOT_ONLINE = " (no online worker now)";

// the ControlNet types some online worker serves, and those whose map one makes (the
// others: ready maps only)
let served = new Set();
let annotated = new Set();

/** `select`'s options: "None", then `names` (in that order), then its current choice if
 *  not among them (a reused image's: kept, marked). */
function offer(select, names, label = (name) => name) {
  const chosen = select.value;
  const options = names.map((name) => h("option", { value: name }, label(name)));
  if (chosen && !names.includes(chosen)) {
    options.push(h("option", { value: chosen }, chosen + NOT_ONLINE));
  }
  select.replaceChildren(h("option", { value: "" }, "None"), ...options);
  select.value = chosen;
  select.disabled = options.length === 0;
}

/** Offer what the online image workers serve (`post_processors`, `controlnets`,
 *  `control_annotators` on each; `post_processors` overall). */
export function offerExtras(net) {
  const workers = (net?.workers || []).filter((w) => w.online && w.kind === "image");
  const held = new Set(net?.post_processors || workers.flatMap((w) => w.post_processors || []));
  served = new Set(workers.flatMap((w) => w.controlnets || []));
  annotated = new Set(workers.flatMap((w) => (w.control_annotators || [])
    .filter((type) => (w.controlnets || []).includes(type))));

  const upscalers = UPSCALERS.filter((name) => held.has(name));
  offer($("gen-upscaler"), upscalers);
  $("gen-upscaler-hint").textContent = upscalers.length ? "" : "No online worker holds an upscaler now.";

  const face = $("gen-face-fix");
  face.disabled = !held.has(FACE_FIXER) && !face.checked;
  $("gen-face-fix-hint").textContent = held.has(FACE_FIXER) ? "" : `No online worker holds ${FACE_FIXER} now.`;

  const types = CONTROL_TYPES.filter((type) => served.has(type));
  offer($("gen-control"), types,
    (type) => (annotated.has(type) ? type : `${type} (ready control map only)`));
  $("extras-offer").textContent = types.length ? ""
    : "No online worker has a ControlNet model now.";
  showControl();
}

/** Enable what goes with the choices made. */
function showControl() {
  $("gen-hires-strength").disabled = !$("gen-hires").checked;
  $("gen-face-strength").disabled = !$("gen-face-fix").checked;
  const type = $("gen-control").value;
  const isMap = $("gen-image-is-control");
  const returnMap = $("gen-return-control");
  // sampled from noise: the source's strength does not apply
  $("gen-strength").disabled = Boolean(type);
  if (!type) {
    isMap.checked = returnMap.checked = false;
    isMap.disabled = returnMap.disabled = true;
    return;
  }
  if (served.has(type) && !annotated.has(type)) {
    // no online worker makes this map: the source must be one (a reused type no online
    // worker serves keeps its setting)
    isMap.checked = true;
    isMap.disabled = true;
  } else {
    isMap.disabled = false;
  }
  // a ready map is not made again
  if (isMap.checked) returnMap.checked = false;
  returnMap.disabled = isMap.checked;
}

/** A number input's value, or null (its field marked when `mark`). */
function number(id, field, { whole = false, mark }) {
  const text = $(id).value.trim();
  const value = Number(text);
  if (text === "" || !Number.isFinite(value) || (whole && !Number.isInteger(value))) {
    if (mark) fieldProblem($("generate-form"), field, whole ? "Enter a whole number." : "Enter a number.");
    return null;
  }
  return value;
}

/** The extras as ImageParams fields, only those not at their defaults; null when a number
 *  is not one (marked when `mark`). */
export function extrasParams({ mark }) {
  const params = {};
  let ok = true;
  if ($("gen-hires").checked) {
    params.hires_fix = true;
    const strength = number("gen-hires-strength", "hires_fix_denoising_strength", { mark });
    if (strength === null) ok = false;
    else if (strength !== DEFAULT_HIRES_STRENGTH) params.hires_fix_denoising_strength = strength;
  }
  const post = [];
  if ($("gen-face-fix").checked) {
    post.push(FACE_FIXER);
    const strength = number("gen-face-strength", "facefixer_strength", { mark });
    if (strength === null) ok = false;
    else if (strength !== DEFAULT_FACEFIXER_STRENGTH) params.facefixer_strength = strength;
  }
  if ($("gen-upscaler").value) post.push($("gen-upscaler").value);
  if (post.length) params.post_processing = post;
  const type = $("gen-control").value;
  if (type) {
    params.control_type = type;
    if ($("gen-image-is-control").checked) params.image_is_control = true;
    if ($("gen-return-control").checked) params.return_control_map = true;
  }
  const clipSkip = number("gen-clip-skip", "clip_skip", { whole: true, mark });
  if (clipSkip === null) ok = false;
  else if (clipSkip !== 1) params.clip_skip = clipSkip;
  if ($("gen-tiling").checked) params.tiling = true;
  if ($("gen-karras").checked) params.karras = true;
  return ok ? params : null;
}

/** Parts of the A1111 `parameters` text for a job's extras (protocol/infotext.py's keys). */
export function extrasText(params) {
  const parts = [];
  if (params.karras) parts.push("Schedule type: Karras");
  if (params.hires_fix) {
    parts.push(`Hires fix: ${params.hires_fix_denoising_strength ?? DEFAULT_HIRES_STRENGTH} strength`);
  }
  if (params.control_type) {
    const module = params.image_is_control ? "none" : params.control_type;
    parts.push(`ControlNet: ${params.control_type} (module ${module})`);
    if (params.return_control_map) parts.push("Returns the control map");
  }
  const post = params.post_processing || [];
  if (post.length) {
    // face fixers run first
    const ordered = [...post.filter((n) => n === FACE_FIXER), ...post.filter((n) => n !== FACE_FIXER)];
    parts.push(`Postprocessing: ${ordered.join(", ")}`);
    if (post.includes(FACE_FIXER)) {
      parts.push(`Face restoration strength: ${params.facefixer_strength ?? DEFAULT_FACEFIXER_STRENGTH}`);
    }
  }
  if (params.clip_skip && params.clip_skip !== 1) parts.push(`Clip skip: ${params.clip_skip}`);
  if (params.tiling) parts.push("Tiling: True");
  return parts;
}

/** Ensure `select` has `value` as an option (marked: not offered now) and choose it. */
function choose(select, value) {
  if (value && ![...select.options].some((o) => o.value === value)) {
    select.append(h("option", { value }, value + NOT_ONLINE));
    select.disabled = false;
  }
  select.value = value || "";
}

/** A gallery image's extras, for "Reuse settings". */
export function reuseExtras(params) {
  $("gen-hires").checked = Boolean(params.hires_fix);
  $("gen-hires-strength").value = params.hires_fix_denoising_strength ?? DEFAULT_HIRES_STRENGTH;
  const post = params.post_processing || [];
  const face = $("gen-face-fix");
  face.checked = post.includes(FACE_FIXER);
  if (face.checked) face.disabled = false;
  $("gen-face-strength").value = params.facefixer_strength ?? DEFAULT_FACEFIXER_STRENGTH;
  choose($("gen-upscaler"), post.find((name) => name !== FACE_FIXER));
  choose($("gen-control"), params.control_type);
  $("gen-image-is-control").checked = Boolean(params.image_is_control);
  $("gen-return-control").checked = Boolean(params.return_control_map);
  $("gen-clip-skip").value = params.clip_skip ?? 1;
  $("gen-tiling").checked = Boolean(params.tiling);
  $("gen-karras").checked = Boolean(params.karras);
  showControl();
}

/** What goes with each choice follows it (the form's own listener asks for the price). */
export function setUpExtras() {
  $("gen-clip-skip").max = String(MAX_CLIP_SKIP);
  for (const id of ["gen-hires", "gen-face-fix", "gen-control", "gen-image-is-control"]) {
    $(id).addEventListener("change", showControl);
  }
}
