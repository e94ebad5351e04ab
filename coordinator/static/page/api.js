// Talking to the coordinator: JSON requests with the API key in a header, its errors as
// ApiError, server-sent event streams read with fetch() (EventSource cannot send headers),
// and following a job until it finishes.

import { state } from "./state.js";

export class ApiError extends Error {
  constructor(status, code, message, fields) {
    super(message);
    this.status = status;
    this.code = code;
    this.fields = fields || [];
  }
}

function authHeaders(key) {
  return key ? { apikey: key } : {};
}

async function errorOf(response) {
  let detail = null;
  try {
    detail = (await response.json()).error;
  } catch (_) {
    // not our JSON error body (a proxy's page, say)
  }
  if (detail && typeof detail.message === "string") {
    return new ApiError(response.status, detail.code, detail.message, detail.fields);
  }
  return new ApiError(
    response.status, `http_${response.status}`,
    `the coordinator answered ${response.status} ${response.statusText}`.trim(), [],
  );
}

/** fetch() `path`; `key` (default the signed-in one, null for none) goes in a header. */
export async function request(method, path, { body, headers, signal, key } = {}) {
  const sent = { ...authHeaders(key === undefined ? state.key : key), ...(headers || {}) };
  if (body !== undefined) sent["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(path, {
      method, headers: sent, signal, cache: "no-store",
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, "unreachable", "cannot reach the coordinator; check the connection and retry", []);
  }
  if (!response.ok) throw await errorOf(response);
  return response;
}

/** The JSON answer of a request. */
export async function api(method, path, options) {
  return (await request(method, path, options)).json();
}

/** Read a server-sent event stream from a fetch() response; onEvent(name, data) per
 *  event. Returns when the stream ends; stops early if onEvent returns false. */
export async function readEvents(response, onEvent) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let name = "message";
  let data = [];
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      let newline;
      while ((newline = buffer.indexOf("\n")) >= 0) {
        let line = buffer.slice(0, newline);
        buffer = buffer.slice(newline + 1);
        if (line.endsWith("\r")) line = line.slice(0, -1);
        if (line === "") {
          if (data.length && onEvent(name, data.join("\n")) === false) return;
          name = "message";
          data = [];
        } else if (!line.startsWith(":")) {
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          let text = colon < 0 ? "" : line.slice(colon + 1);
          if (text.startsWith(" ")) text = text.slice(1);
          if (field === "event") name = text;
          else if (field === "data") data.push(text);
        }
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

function sleep(ms, signal) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(resolve, ms);
    signal?.addEventListener("abort", () => {
      clearTimeout(timer);
      reject(new DOMException("aborted", "AbortError"));
    }, { once: true });
  });
}

export const finished = (job) => ["done", "failed", "cancelled"].includes(job.state);

/** Follow a job's `status` events until it finishes; falls back to polling when the
 *  stream is refused (too many open) or ends early (a coordinator restart). With
 *  `onPreview`, the stream asks for live previews (`preview` events) and hands each on. */
export async function followJob(id, onStatus, signal, onPreview = null) {
  const path = `/api/v1/jobs/${encodeURIComponent(id)}`;
  const events = onPreview ? `${path}/events?previews=true` : `${path}/events`;
  let last = null;
  for (let attempt = 0; ; attempt++) {
    if (attempt < 5) {
      try {
        const response = await request("GET", events, {
          signal, headers: { Accept: "text/event-stream" },
        });
        await readEvents(response, (name, data) => {
          if (name === "preview" && onPreview) onPreview(JSON.parse(data));
          if (name !== "status") return true;
          last = JSON.parse(data);
          onStatus(last);
          return !finished(last);
        });
        if (last && finished(last)) return last;
      } catch (error) {
        if (error.name === "AbortError") throw error;
        if (error instanceof ApiError && error.status >= 400 && error.status < 500
            && error.status !== 429) throw error;
      }
    }
    await sleep(Math.min(1000 * (attempt + 1), 3000), signal);
    last = await api("GET", path, { signal });
    onStatus(last);
    if (finished(last)) return last;
  }
}
