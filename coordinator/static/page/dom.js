// Rendering helpers: element lookup and creation (never parsed from HTML), and the small
// text formats every panel uses.

/** The element with id `id`. */
export const $ = (id) => document.getElementById(id);

let lastId = 0;
/** A document-unique id (the same image may be shown twice: its label must find it). */
export const uniqueId = (prefix) => `${prefix}-${++lastId}`;

/** A DOM element: h("a", {href: "x", class: "b"}, "text", child, ...); never parsed from HTML. */
export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === false || value === null || value === undefined) continue;
    if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else if (name === "class") el.className = value;
    else if (name in el && typeof value !== "string") el[name] = value;
    else el.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

/** A duration for people: "40 s", "12 min", "2.5 h" (null for none). */
export function seconds(s) {
  if (s === null || s === undefined) return null;
  if (s < 90) return `${Math.max(1, Math.round(s))} s`;
  if (s < 5400) return `${Math.round(s / 60)} min`;
  return `${(s / 3600).toFixed(1)} h`;
}

export const plural = (n, one, many) => `${n} ${n === 1 ? one : many}`;

/** 32 random hex digits (an idempotency key). */
export function randomKey() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

/** Copy `text`; without the clipboard API (plain http to another host), select `input`
 *  and copy that. Whether it worked. */
export async function copyText(text, input) {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch (_) {
    if (!input) return false;
    input.focus();
    input.select();
    return document.execCommand("copy");
  }
}
