// The image form's source image: upload one (img2img, with a denoising strength), and paint
// or upload a mask over it (inpainting). Sent as the v1 job's `source_image` and
// `source_mask` (base64), `source_processing` and `denoising_strength` (README "Source
// images"). The source travels as the file's own bytes, never re-encoded (but a photo that
// its EXIF orientation turns: orientation.js); the mask is a PNG the source's size, white =
// repaint, black = keep.
//
// The mask canvas has the source's pixel size and holds the mask in its alpha channel
// (shown in a colour over the image); the painted alpha becomes the mask's grey level.

import { $ } from "./dom.js";
import { jpegOrientation } from "./orientation.js";

// the coordinator's limits (protocol/params.py MAX_SOURCE_BYTES, MAX_SOURCE_PIXELS)
export const MAX_SOURCE_BYTES = 32 * 1024 * 1024;
export const MAX_SOURCE_PIXELS = 4096 * 4096;
const TYPES = ["image/png", "image/webp", "image/jpeg"];
// the sides a job may have (protocol/params.py MIN_SIDE, MAX_SIDE)
const MIN_SIDE = 64;
const MAX_SIDE = 2048;
const PAINT = "rgb(255, 0, 170)";

const source = {
  file: null, // the File the user chose
  upload: null, // what is sent: the file, or a PNG of what is shown (a turned photo)
  width: 0,
  height: 0,
  painting: null, // { id, x, y } of the pointer drawing now
  masked: false, // something was painted or uploaded since the last clear
  onChange: () => {},
};

const maskCanvas = () => $("mask-canvas");

/** A file's problem beside its input (not a .field-error: those show the coordinator's
 *  answer and are cleared by every quote). */
function problem(field, text) {
  $(`gen-${field}-problem`).textContent = text;
  if (text) $(`gen-${field}`).setAttribute("aria-invalid", "true");
  else $(`gen-${field}`).removeAttribute("aria-invalid");
}

/** Why `file` cannot be a source image or mask (null when it may be): read before decoding. */
function fileProblem(file) {
  // (an unknown type, "", is decoded to see)
  if (file.type && !TYPES.includes(file.type)) {
    return `${file.name} is not a PNG, WebP or JPEG image; choose one of those.`;
  }
  if (file.size > MAX_SOURCE_BYTES) {
    const mb = (file.size / 1024 / 1024).toFixed(1);
    return `${file.name} is ${mb} MB, over the 32 MB an image may have; choose a smaller one.`;
  }
  return null;
}

/** The decoded `file`, or a problem naming it. */
async function decode(file) {
  const early = fileProblem(file);
  if (early) return { problem: early };
  let bitmap;
  try {
    bitmap = await createImageBitmap(file);
  } catch (_) {
    return { problem: `${file.name} could not be read as an image (damaged?); choose another.` };
  }
  if (bitmap.width * bitmap.height > MAX_SOURCE_PIXELS) {
    bitmap.close();
    return {
      problem: `${file.name} is ${bitmap.width}x${bitmap.height} pixels, over the 4096x4096 ` +
        "an image may have; choose a smaller one.",
    };
  }
  return { bitmap };
}

/** The job's width and height for a source: its own size, scaled down to fit the largest
 *  side a job may have, each side a multiple of 8 (as the CLI's `--image` without `--size`). */
export function fittedSize(width, height) {
  const scale = Math.min(1, MAX_SIDE / Math.max(width, height));
  const side = (v) => Math.min(MAX_SIDE, Math.max(MIN_SIDE, Math.floor((v * scale) / 8) * 8));
  return [side(width), side(height)];
}

async function chooseSource(file) {
  problem("source", "");
  const { bitmap, problem: why } = await decode(file);
  if (!bitmap) {
    problem("source", why);
    $("gen-source").value = "";
    return;
  }
  source.file = file;
  source.width = bitmap.width;
  source.height = bitmap.height;
  const view = $("source-view");
  for (const canvas of [view, maskCanvas()]) {
    canvas.width = bitmap.width;
    canvas.height = bitmap.height;
  }
  view.getContext("2d").drawImage(bitmap, 0, 0);
  bitmap.close();
  source.upload = file;
  let turned = "";
  if (file.type === "image/jpeg" && jpegOrientation(await file.arrayBuffer()) !== 1) {
    source.upload = await new Promise((resolve) => view.toBlob(resolve, "image/png"));
    turned = " Its EXIF orientation turns it: it is sent as a PNG of what is shown.";
    if (!source.upload || source.upload.size > MAX_SOURCE_BYTES) {
      removeSource();
      problem("source", `${file.name} turned as its EXIF orientation says is over 32 MB as a ` +
        "PNG; turn it and save it without the orientation, or choose a smaller one.");
      return;
    }
  }
  clearMask();
  const [width, height] = fittedSize(source.width, source.height);
  $("gen-width").value = width;
  $("gen-height").value = height;
  $("source-editor").hidden = false;
  $("source-size").textContent = `${source.width}x${source.height} pixels; the image is made at ` +
    `${width}x${height} (the width and height above).${turned}`;
  showMode();
  source.onChange();
}

function removeSource() {
  source.file = null;
  source.upload = null;
  $("gen-source").value = "";
  $("gen-mask").value = "";
  problem("source", "");
  problem("mask", "");
  $("source-editor").hidden = true;
  showMode();
  source.onChange();
}

function clearMask() {
  const canvas = maskCanvas();
  canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
  source.masked = false;
  $("gen-mask").value = "";
  problem("mask", "");
  showMode();
}

/** An uploaded mask: its grey level becomes the painted alpha. */
async function chooseMask(file) {
  problem("mask", "");
  const { bitmap, problem: why } = await decode(file);
  if (!bitmap) {
    problem("mask", why);
    $("gen-mask").value = "";
    return;
  }
  if (bitmap.width !== source.width || bitmap.height !== source.height) {
    problem("mask", `${file.name} is ${bitmap.width}x${bitmap.height}; a mask must be the ` +
      `source image's size (${source.width}x${source.height}).`);
    bitmap.close();
    $("gen-mask").value = "";
    return;
  }
  const scratch = new OffscreenCanvas(bitmap.width, bitmap.height);
  const context = scratch.getContext("2d");
  context.drawImage(bitmap, 0, 0);
  bitmap.close();
  const pixels = context.getImageData(0, 0, scratch.width, scratch.height);
  const data = pixels.data;
  for (let i = 0; i < data.length; i += 4) {
    // white = repaint: the grey level (Rec. 601 luma) is how much
    const grey = Math.round(0.299 * data[i] + 0.587 * data[i + 1] + 0.114 * data[i + 2]);
    data[i] = 255;
    data[i + 1] = 0;
    data[i + 2] = 170;
    data[i + 3] = grey;
  }
  maskCanvas().getContext("2d").putImageData(pixels, 0, 0);
  source.masked = true;
  showMode();
  source.onChange();
}

// --- painting -------------------------------------------------------------------------

/** The canvas pixel under a pointer event, and how many canvas pixels a screen pixel is. */
function canvasPoint(event) {
  const canvas = maskCanvas();
  const box = canvas.getBoundingClientRect();
  const scale = canvas.width / box.width;
  return { x: (event.clientX - box.left) * scale, y: (event.clientY - box.top) * scale, scale };
}

function stroke(from, to) {
  const context = maskCanvas().getContext("2d");
  context.save();
  context.globalCompositeOperation = $("mask-erase").checked ? "destination-out" : "source-over";
  context.strokeStyle = PAINT;
  context.fillStyle = PAINT;
  context.lineCap = "round";
  context.lineJoin = "round";
  context.lineWidth = Number($("mask-brush").value) * to.scale;
  context.beginPath();
  if (from.x === to.x && from.y === to.y) {
    context.arc(to.x, to.y, context.lineWidth / 2, 0, 2 * Math.PI);
    context.fill();
  } else {
    context.moveTo(from.x, from.y);
    context.lineTo(to.x, to.y);
    context.stroke();
  }
  context.restore();
}

function setUpPainting() {
  const canvas = maskCanvas();
  canvas.addEventListener("pointerdown", (event) => {
    if (event.button !== 0 || source.painting || $("source-paint").hidden) return;
    event.preventDefault();
    canvas.setPointerCapture(event.pointerId);
    const at = canvasPoint(event);
    source.painting = { id: event.pointerId, ...at };
    stroke(at, at);
  });
  canvas.addEventListener("pointermove", (event) => {
    const last = source.painting;
    if (!last || last.id !== event.pointerId) return;
    const at = canvasPoint(event);
    stroke(last, at);
    source.painting = { id: event.pointerId, ...at };
  });
  const end = (event) => {
    if (source.painting?.id !== event.pointerId) return;
    source.painting = null;
    if (!$("mask-erase").checked) source.masked = true;
    showMode();
    source.onChange();
  };
  canvas.addEventListener("pointerup", end);
  canvas.addEventListener("pointercancel", end);
}

// --- what the job asks for --------------------------------------------------------------

/** The mask canvas as a PNG (grey = the painted alpha), or null when nothing is painted. */
async function maskPng() {
  const canvas = maskCanvas();
  const painted = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height);
  const out = new ImageData(canvas.width, canvas.height);
  let any = false;
  for (let i = 0; i < painted.data.length; i += 4) {
    const alpha = painted.data[i + 3];
    if (alpha) any = true;
    out.data[i] = out.data[i + 1] = out.data[i + 2] = alpha;
    out.data[i + 3] = 255;
  }
  if (!any) return null;
  const scratch = new OffscreenCanvas(canvas.width, canvas.height);
  scratch.getContext("2d").putImageData(out, 0, 0);
  return scratch.convertToBlob({ type: "image/png" });
}

function base64(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).split(",", 2)[1]);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}

const mode = () => (source.masked ? "inpainting" : "img2img");

function showMode() {
  $("source-mode").textContent = !source.file ? ""
    : source.masked ? "Inpainting: only the painted area is repainted."
    : "img2img: the whole image is repainted. Paint over it to repaint only a part.";
  $("gen-strength-value").textContent = Number($("gen-strength").value).toFixed(2);
}

/** The fields a quote needs (no image data): {} without a source image. */
export function sourceParams() {
  if (!source.file) return {};
  return { source_processing: mode(), denoising_strength: Number($("gen-strength").value) };
}

/** Everything the job sends about its source: the images as base64; {} without one. */
export async function sourceFields() {
  if (!source.file) return {};
  const mask = await maskPng();
  const fields = {
    source_processing: mask ? "inpainting" : "img2img",
    denoising_strength: Number($("gen-strength").value),
    source_image: await base64(source.upload),
  };
  if (mask) fields.source_mask = await base64(mask);
  return fields;
}

/** Offer source images only if some online image worker takes them, when the network
 *  says what its workers take (`img2img`, `inpainting` on each worker); when it does not,
 *  the form stays open and the coordinator's answer says what is wrong. */
export function offerSources(net) {
  const workers = (net?.workers || []).filter((w) => w.online && w.kind === "image");
  const told = workers.filter((w) => typeof w.img2img === "boolean");
  const input = $("gen-source");
  const offer = $("source-offer");
  if (!told.length) {
    input.disabled = false;
    offer.textContent = "";
    return;
  }
  const img2img = told.some((w) => w.img2img);
  const inpainting = told.some((w) => w.inpainting);
  input.disabled = !img2img && !inpainting;
  $("source-paint").hidden = !inpainting;
  offer.textContent = input.disabled
    ? "No online worker takes source images now: a job with one would wait until one does."
    : inpainting ? "" : "No online worker paints masks now: img2img only.";
}

/** A gallery image's source settings, for "Reuse settings": the strength; the page never
 *  had the source image itself (the coordinator keeps it for workers), so it asks for it. */
export function reuseSource(params) {
  const processing = params.source_processing || "txt2img";
  if (processing === "txt2img") {
    if (source.file) removeSource();
    return;
  }
  $("gen-strength").value = params.denoising_strength ?? 0.75;
  showMode();
  if (!source.file) {
    problem("source", `That image was made from a source image (${processing}): choose it ` +
      "again (and paint its mask) to make it again.");
  }
}

/** `onChange` runs whenever what the job would ask for changes (the price may). */
export function setUpSource(onChange) {
  source.onChange = onChange;
  $("gen-source").addEventListener("change", () => {
    const file = $("gen-source").files[0];
    if (file) chooseSource(file);
    else removeSource();
  });
  $("gen-mask").addEventListener("change", () => {
    const file = $("gen-mask").files[0];
    if (file) chooseMask(file);
  });
  $("gen-strength").addEventListener("input", showMode);
  $("mask-clear").addEventListener("click", () => {
    clearMask();
    source.onChange();
  });
  $("source-remove").addEventListener("click", removeSource);
  setUpPainting();
}
