// The idlegrid web page: plain JavaScript, no build step, nothing loaded from elsewhere.
// The API key lives in localStorage and travels only in request headers (`apikey`, or
// `Authorization: Bearer` for the OpenAI-compatible chat), never in a URL; that is why
// event streams are read with fetch() instead of EventSource, which cannot send headers.
"use strict";

(() => {
  const KEY_STORAGE = "idlegrid.apiKey";
  // protocol/samplers.py SAMPLERS, in its order (the browser tests compare the two)
  const SAMPLERS = [
    "Euler", "Euler a", "Heun", "DPM2", "DPM2 a", "DPM++ 2M", "DPM++ 2M Karras",
    "DPM++ 2M SDE", "DPM++ 2M SDE Karras", "DPM++ SDE", "DPM++ SDE Karras", "DDIM", "PLMS",
    "LMS", "LMS Karras", "UniPC",
  ];
  const DEFAULT_SAMPLER = "Euler a";
  const GALLERY_PAGE = 20;
  const QUOTE_DELAY_MS = 350;

  const state = {
    key: null, // the API key, or null when signed out
    account: null, // GET /api/v1/accounts/me
    galleryOffset: 0,
    sessionJobs: [], // jobs made on this page: shown if the server cannot list jobs
    images: new Map(), // "job/index" -> object URL (results never change)
    job: null, // { id, abort } of the job being followed
    chat: [], // the conversation, as OpenAI messages
    chatAbort: null,
    historyBefore: null,
  };

  const $ = (id) => document.getElementById(id);
  let lastId = 0;
  /** A document-unique id (the same image may be shown twice: its label must find it). */
  const uniqueId = (prefix) => `${prefix}-${++lastId}`;

  /** A DOM element: h("a", {href: "x", class: "b"}, "text", child, ...); never parsed from HTML. */
  function h(tag, attrs, ...children) {
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

  // --- talking to the coordinator ---------------------------------------------------

  class ApiError extends Error {
    constructor(status, code, message, fields) {
      super(message);
      this.status = status;
      this.code = code;
      this.fields = fields || [];
    }
  }

  function authHeaders(key = state.key) {
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

  async function request(method, path, { body, headers, signal, key } = {}) {
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

  async function api(method, path, options) {
    return (await request(method, path, options)).json();
  }

  /** Read a server-sent event stream from a fetch() response; onEvent(name, data) per
   *  event. Returns when the stream ends; stops early if onEvent returns false. */
  async function readEvents(response, onEvent) {
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

  const finished = (job) => ["done", "failed", "cancelled"].includes(job.state);

  /** Follow a job's `status` events until it finishes; falls back to polling when the
   *  stream is refused (too many open) or ends early (a coordinator restart). */
  async function followJob(id, onStatus, signal) {
    const path = `/api/v1/jobs/${encodeURIComponent(id)}`;
    let last = null;
    for (let attempt = 0; ; attempt++) {
      if (attempt < 5) {
        try {
          const response = await request("GET", `${path}/events`, {
            signal, headers: { Accept: "text/event-stream" },
          });
          await readEvents(response, (name, data) => {
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

  // --- forms and errors ---------------------------------------------------------------

  function clearErrors(form, errorBox) {
    for (const small of form.querySelectorAll(".field-error")) small.textContent = "";
    for (const input of form.querySelectorAll("[aria-invalid]")) input.removeAttribute("aria-invalid");
    if (errorBox) errorBox.textContent = "";
  }

  /** The API's message beside the form, and each field's problem beside its input. */
  function showError(form, errorBox, error) {
    clearErrors(form, errorBox);
    const message = error instanceof ApiError ? error.message : `Something went wrong: ${error.message || error}`;
    if (error instanceof ApiError) {
      for (const { field, message: problem } of error.fields) {
        const small = form.querySelector(`.field-error[data-field="${CSS.escape(field)}"]`);
        if (!small) continue;
        small.textContent = problem;
        const input = form.elements.namedItem(field);
        if (input && input.setAttribute) input.setAttribute("aria-invalid", "true");
      }
    }
    errorBox.textContent = message;
  }

  function fieldProblem(form, field, problem) {
    const small = form.querySelector(`.field-error[data-field="${field}"]`);
    if (small) small.textContent = problem;
    form.elements.namedItem(field)?.setAttribute("aria-invalid", "true");
  }

  async function copyText(text, input) {
    try {
      await navigator.clipboard.writeText(text);
      return true;
    } catch (_) {
      // no clipboard API outside secure contexts (plain http to another host)
      if (!input) return false;
      input.focus();
      input.select();
      return document.execCommand("copy");
    }
  }

  function randomKey() {
    const bytes = crypto.getRandomValues(new Uint8Array(16));
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  function seconds(s) {
    if (s === null || s === undefined) return null;
    if (s < 90) return `${Math.max(1, Math.round(s))} s`;
    if (s < 5400) return `${Math.round(s / 60)} min`;
    return `${(s / 3600).toFixed(1)} h`;
  }

  const plural = (n, one, many) => `${n} ${n === 1 ? one : many}`;

  // --- tabs ---------------------------------------------------------------------------

  const TABS = ["images", "chat", "account", "network"];
  const tabLoaders = {};

  function selectTab(name, { focus = false } = {}) {
    for (const tab of TABS) {
      const button = $(`tab-${tab}`);
      const on = tab === name;
      button.setAttribute("aria-selected", String(on));
      button.tabIndex = on ? 0 : -1;
      $(`panel-${tab}`).hidden = !on;
      if (on && focus) button.focus();
    }
    tabLoaders[name]?.();
  }

  function setUpTabs() {
    const list = document.querySelector('[role="tablist"]');
    for (const tab of TABS) {
      $(`tab-${tab}`).addEventListener("click", () => {
        selectTab(tab);
        history.replaceState(null, "", `#${tab}`);
      });
    }
    list.addEventListener("keydown", (event) => {
      const current = TABS.findIndex((t) => $(`tab-${t}`).getAttribute("aria-selected") === "true");
      const moves = { ArrowRight: current + 1, ArrowLeft: current - 1, Home: 0, End: TABS.length - 1 };
      if (!(event.key in moves)) return;
      event.preventDefault();
      const next = TABS[(moves[event.key] + TABS.length) % TABS.length];
      selectTab(next, { focus: true });
      history.replaceState(null, "", `#${next}`);
    });
  }

  function route() {
    const hash = location.hash.slice(1);
    const job = /^job=([A-Za-z0-9_-]{1,64})$/.exec(hash);
    if (job) {
      selectTab("images");
      showSharedJob(job[1]);
    } else {
      selectTab(TABS.includes(hash) ? hash : "images");
    }
  }

  // --- account: sign in, register, sign out -------------------------------------------

  async function refreshAccount() {
    if (!state.key) return;
    try {
      state.account = await api("GET", "/api/v1/accounts/me");
    } catch (error) {
      if (error instanceof ApiError && error.status === 401) {
        signOut("The saved API key is no longer valid; sign in again.");
      }
      return;
    }
    $("who-name").textContent = state.account.name;
    $("who-kudos").textContent = state.account.kudos.toLocaleString();
    renderBalance();
  }

  function renderSignedIn() {
    const signedIn = Boolean(state.key);
    $("signin").hidden = signedIn;
    $("who").hidden = !signedIn;
    $("gallery-status").textContent = signedIn ? "" : "Sign in to keep a gallery.";
    $("account-status").textContent = signedIn ? "" : "Sign in to see your account.";
  }

  function signIn(key, account) {
    state.key = key;
    state.account = account;
    localStorage.setItem(KEY_STORAGE, key);
    renderSignedIn();
    $("who-name").textContent = account.name;
    $("who-kudos").textContent = account.kudos.toLocaleString();
    renderBalance();
    loadGallery(true);
    scheduleQuote();
    const tab = TABS.find((t) => $(`tab-${t}`).getAttribute("aria-selected") === "true");
    if (tab !== "images") tabLoaders[tab]?.();
    if (location.hash.startsWith("#job=")) route();
  }

  function signOut(message) {
    localStorage.removeItem(KEY_STORAGE);
    state.key = null;
    state.account = null;
    state.job?.abort.abort();
    state.chatAbort?.abort();
    for (const url of state.images.values()) URL.revokeObjectURL(url);
    state.images.clear();
    state.sessionJobs = [];
    $("gallery").replaceChildren();
    $("shared-job").replaceChildren();
    $("shared-job").hidden = true;
    $("results").replaceChildren();
    $("progress").hidden = true;
    $("balance").replaceChildren();
    $("history").tBodies[0].replaceChildren();
    $("history-more").hidden = true;
    $("gallery-more").hidden = true;
    $("keybox").hidden = true;
    $("keybox-key").value = "";
    renderSignedIn();
    $("signin-error").textContent = message || "";
    scheduleQuote();
  }

  function setUpAccountForms() {
    $("register-form").addEventListener("submit", async (event) => {
      event.preventDefault();
      const form = event.currentTarget;
      clearErrors(form, $("register-error"));
      const body = { name: $("register-name").value.trim() };
      const invite = $("register-invite").value.trim();
      if (invite) body.invite = invite;
      if (!body.name) {
        fieldProblem(form, "name", "Choose a name: 2-32 letters, digits, _ . -");
        $("register-name").focus();
        return;
      }
      const button = form.querySelector("button[type=submit]");
      button.disabled = true;
      try {
        const created = await api("POST", "/api/v1/accounts", { body, key: null });
        form.reset();
        signIn(created.api_key, { name: created.name, kudos: created.kudos });
        refreshAccount();
        $("keybox-key").value = created.api_key;
        $("keybox-status").textContent = "";
        $("keybox").hidden = false;
        $("keybox").focus();
      } catch (error) {
        showError(form, $("register-error"), error);
      } finally {
        button.disabled = false;
      }
    });

    $("signin-form").addEventListener("submit", async (event) => {
      event.preventDefault();
      const form = event.currentTarget;
      clearErrors(form, $("signin-error"));
      const key = $("signin-key").value.trim();
      if (!key) {
        $("signin-error").textContent = "Paste your API key.";
        $("signin-key").focus();
        return;
      }
      const button = form.querySelector("button[type=submit]");
      button.disabled = true;
      try {
        const account = await api("GET", "/api/v1/accounts/me", { key });
        form.reset();
        signIn(key, account);
      } catch (error) {
        showError(form, $("signin-error"), error);
      } finally {
        button.disabled = false;
      }
    });

    $("keybox-copy").addEventListener("click", async () => {
      const ok = await copyText($("keybox-key").value, $("keybox-key"));
      $("keybox-status").textContent = ok ? "Copied." : "Select the key and copy it.";
    });
    $("keybox-done").addEventListener("click", () => {
      $("keybox").hidden = true;
      $("keybox-key").value = "";
      $("tab-images").focus();
    });
    $("sign-out").addEventListener("click", () => {
      signOut();
      $("register-name").focus();
    });
  }

  // --- 1. generate --------------------------------------------------------------------

  const form = () => $("generate-form");

  /** The form as ImageParams; problems are marked on the fields, and null returned. */
  function readParams({ mark }) {
    const f = form();
    const params = {
      prompt: $("gen-prompt").value,
      negative_prompt: $("gen-negative").value,
      sampler: $("gen-sampler").value,
    };
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
    return ok ? params : null;
  }

  let quoteTimer = null;
  let quoteAbort = null;

  function scheduleQuote() {
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

  function describeStatus(job) {
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
  }

  function setUpGenerate() {
    const select = $("gen-sampler");
    for (const name of SAMPLERS) {
      select.append(h("option", { value: name, selected: name === DEFAULT_SAMPLER }, name));
    }
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
        const body = { ...params, signed_only: $("gen-signed-only").checked };
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
      $("results").replaceChildren();
      $("gen-cancel").hidden = false;
      showProgress({ state: "queued", queue_position: created.queue_position, eta_seconds: created.eta_seconds });
      refreshAccount();
      try {
        const done = await followJob(created.id, showProgress, abort.signal);
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

  /** Fill the generate form with a gallery image's settings. */
  function reuse(params, seed) {
    $("gen-prompt").value = params.prompt;
    $("gen-negative").value = params.negative_prompt || "";
    $("gen-width").value = params.width;
    $("gen-height").value = params.height;
    $("gen-steps").value = params.steps;
    $("gen-cfg").value = params.cfg_scale;
    $("gen-sampler").value = params.sampler;
    $("gen-seed").value = seed;
    $("gen-n").value = 1;
    const model = $("gen-model");
    if (params.model && ![...model.options].some((o) => o.value === params.model)) {
      model.append(h("option", { value: params.model }, params.model));
    }
    model.value = params.model || "";
    selectTab("images");
    history.replaceState(null, "", "#images");
    clearErrors(form(), $("generate-error"));
    $("gen-prompt").focus();
    $("generate-title").scrollIntoView({ block: "start" });
    scheduleQuote();
  }

  // --- 2. gallery ---------------------------------------------------------------------

  /** AUTOMATIC1111's "parameters" text of one image. */
  function parametersText(params, seed) {
    const lines = [params.prompt];
    if (params.negative_prompt) lines.push(`Negative prompt: ${params.negative_prompt}`);
    const parts = [
      `Steps: ${params.steps}`, `Sampler: ${params.sampler}`, `CFG scale: ${params.cfg_scale}`,
      `Seed: ${seed}`, `Size: ${params.width}x${params.height}`,
    ];
    if (params.model) parts.push(`Model: ${params.model}`);
    lines.push(parts.join(", "));
    return lines.join("\n");
  }

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
  function imageCard(job, image, { compact = false, shared = false, share = true } = {}) {
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

  async function loadGallery(fresh) {
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

  async function showSharedJob(jobId) {
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

  // --- 3. chat ------------------------------------------------------------------------

  let modelsLoaded = false;

  async function loadChatModels() {
    if (modelsLoaded) return;
    try {
      const list = await api("GET", "/v1/models");
      const select = $("chat-model");
      select.replaceChildren(...list.data.map((m) => h("option", { value: m.id }, m.id)));
      modelsLoaded = true;
    } catch (error) {
      $("chat-error").textContent = `Could not list the models: ${error.message}`;
    }
  }

  function bubble(role, text) {
    const body = h("span", { class: "text" }, text);
    const el = h("div", { class: `msg ${role}` },
      h("span", { class: "who-said" }, role === "user" ? "You" : role === "assistant" ? "Swarm" : "Error"),
      body);
    $("chat-log").append(el);
    $("chat-log").scrollTop = $("chat-log").scrollHeight;
    return body;
  }

  async function sendChat(text) {
    const model = $("chat-model").value;
    if (!model) {
      $("chat-error").textContent = "No model to chat with; is a text gateway online?";
      return;
    }
    state.chat.push({ role: "user", content: text });
    bubble("user", text);
    const out = bubble("assistant", "");
    const log = $("chat-log");
    log.setAttribute("aria-busy", "true");
    const abort = (state.chatAbort = new AbortController());
    $("chat-send").disabled = true;
    $("chat-stop").hidden = false;
    let reply = "";
    try {
      const body = { model, messages: state.chat, stream: true };
      const max = Number($("chat-max").value);
      if (Number.isInteger(max) && max > 0) body.max_tokens = max;
      const headers = state.key ? { Authorization: `Bearer ${state.key}` } : {};
      const response = await request("POST", "/v1/chat/completions", {
        body, headers, key: null, signal: abort.signal,
      });
      let failure = null;
      await readEvents(response, (_name, data) => {
        if (data === "[DONE]") return false;
        const chunk = JSON.parse(data);
        if (chunk.error) {
          failure = chunk.error.message || "the job failed";
          return false;
        }
        const delta = chunk.choices?.[0]?.delta?.content;
        if (delta) {
          reply += delta;
          out.textContent = reply;
          log.scrollTop = log.scrollHeight;
        }
        return true;
      });
      if (failure) throw new ApiError(502, "job_failed", failure, []);
      if (!reply) out.textContent = "(no text)";
    } catch (error) {
      if (error.name === "AbortError") {
        out.textContent = reply + " [stopped]";
      } else {
        out.parentElement.remove();
        state.chat.pop();
        reply = "";
        bubble("error", error.message);
        $("chat-input").value = $("chat-input").value || text;
      }
    } finally {
      if (reply) state.chat.push({ role: "assistant", content: reply });
      log.removeAttribute("aria-busy");
      state.chatAbort = null;
      $("chat-send").disabled = false;
      $("chat-stop").hidden = true;
      refreshAccount();
    }
  }

  function setUpChat() {
    $("chat-form").addEventListener("submit", (event) => {
      event.preventDefault();
      $("chat-error").textContent = "";
      const text = $("chat-input").value.trim();
      if (!text) {
        $("chat-error").textContent = "Write a message first.";
        $("chat-input").focus();
        return;
      }
      if (state.chatAbort) return;
      $("chat-input").value = "";
      sendChat(text);
    });
    $("chat-input").addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        $("chat-form").requestSubmit();
      }
    });
    $("chat-stop").addEventListener("click", () => state.chatAbort?.abort());
    $("chat-new").addEventListener("click", () => {
      state.chatAbort?.abort();
      state.chat = [];
      $("chat-log").replaceChildren();
      $("chat-input").focus();
    });
  }

  // --- 4. account ---------------------------------------------------------------------

  function renderBalance() {
    const a = state.account;
    if (!a || a.available === undefined) return;
    const items = [
      ["Balance", a.kudos], ["Available", a.available], ["Reserved", a.reserved],
      ["Earned", a.earned], ["Pending", a.pending], ["Spent", a.spent],
      ["Granted", a.granted], ["Transferable", a.transferable],
    ];
    $("balance").replaceChildren(...items.map(([label, value]) =>
      h("div", {}, h("dt", {}, label), h("dd", {}, Number(value).toLocaleString()))));
  }

  async function loadHistory(fresh) {
    if (!state.key) return;
    const before = fresh ? null : state.historyBefore;
    try {
      const page = await api("GET", `/api/v1/accounts/me/history?limit=50${before ? `&before=${before}` : ""}`);
      const rows = page.entries.map((e) => h("tr", {},
        h("td", {}, new Date(e.at * 1000).toLocaleString()),
        h("td", {}, e.reason),
        h("td", { class: `num ${e.amount < 0 ? "out" : "in"}` }, (e.amount > 0 ? "+" : "") + e.amount.toLocaleString()),
        h("td", {}, e.job_id ? h("code", { title: e.job_id }, e.job_id.slice(0, 8)) : ""),
        h("td", {}, e.counterparties.join(", "))));
      const body = $("history").tBodies[0];
      if (fresh) body.replaceChildren(...rows);
      else body.append(...rows);
      state.historyBefore = page.next_before;
      $("history-more").hidden = page.next_before === null;
    } catch (error) {
      $("account-status").textContent = `Could not load the history: ${error.message}`;
    }
  }

  function setUpAccount() {
    $("account-refresh").addEventListener("click", () => {
      refreshAccount();
      loadHistory(true);
    });
    $("history-more").addEventListener("click", () => loadHistory(false));
    $("transfer-form").addEventListener("submit", async (event) => {
      event.preventDefault();
      const f = event.currentTarget;
      clearErrors(f, $("transfer-error"));
      $("transfer-ok").textContent = "";
      if (!state.key) {
        $("transfer-error").textContent = "Sign in to give kudos.";
        return;
      }
      const to = $("transfer-to").value.trim();
      const amount = Number($("transfer-amount").value);
      if (!to) fieldProblem(f, "to", "Whom to give kudos to: an account name.");
      if (!Number.isInteger(amount) || amount < 1) fieldProblem(f, "amount", "A whole number of kudos, 1 or more.");
      if (f.querySelector("[aria-invalid=true]")) {
        f.querySelector("[aria-invalid=true]").focus();
        return;
      }
      const button = f.querySelector("button[type=submit]");
      button.disabled = true;
      try {
        // a fresh key per transfer: a retried request cannot pay twice
        const done = await api("POST", "/api/v1/transfers", {
          body: { to, amount }, headers: { "Idempotency-Key": randomKey() },
        });
        f.reset();
        $("transfer-ok").textContent = `Sent ${plural(done.amount, "kudo", "kudos")} to ${done.to}.`;
        refreshAccount();
        loadHistory(true);
      } catch (error) {
        showError(f, $("transfer-error"), error);
      } finally {
        button.disabled = false;
      }
    });
  }

  // --- 5. network ---------------------------------------------------------------------

  async function loadNetwork() {
    const status = $("network-status");
    let net;
    try {
      net = await api("GET", "/api/v1/network");
    } catch (error) {
      status.textContent = error instanceof ApiError && error.status === 404
        ? "This coordinator does not publish its network."
        : `Could not load the network: ${error.message}`;
      return null;
    }
    const online = net.workers.filter((w) => w.online).length;
    status.textContent = `${plural(online, "worker", "workers")} online of ${net.workers.length}; updated ${new Date().toLocaleTimeString()}.`;
    const empty = (cols, text) => h("tr", {}, h("td", { colspan: cols, class: "hint" }, text));
    $("queue-table").tBodies[0].replaceChildren(...(net.queue.length ? net.queue.map((q) => h("tr", {},
      h("td", {}, q.kind), h("td", { class: "num" }, q.queued), h("td", { class: "num" }, q.running)))
      : [empty(3, "Nothing queued.")]));
    $("models-table").tBodies[0].replaceChildren(...(net.models.length ? net.models.map((m) => h("tr", {},
      h("td", {}, m.name), h("td", {}, m.kind), h("td", { class: "num" }, m.workers),
      h("td", { class: "num" }, m.queued), h("td", { class: "num" }, seconds(m.eta_seconds) ?? "—")))
      : [empty(5, "No models served now.")]));
    $("workers-table").tBodies[0].replaceChildren(...(net.workers.length ? net.workers.map((w) => h("tr", {},
      h("td", {}, w.name, w.trusted ? h("span", { class: "badge", title: "passed its spot checks" }, " trusted") : null),
      h("td", {}, w.kind),
      h("td", {}, h("span", { class: `badge ${w.online ? "online" : "offline"}` }, w.online ? "online" : "offline")),
      h("td", {}, w.models.join(", ")),
      h("td", { class: "num" }, w.jobs_done.toLocaleString()),
      h("td", {}, w.protocol)))
      : [empty(6, "No workers yet.")]));
    return net;
  }

  /** The image models served now, offered in the generate form (which keeps its choice). */
  async function loadImageModels() {
    let net;
    try {
      net = await api("GET", "/api/v1/network");
    } catch (_) {
      return;
    }
    const select = $("gen-model");
    const chosen = select.value;
    const names = net.models.filter((m) => m.kind === "image").map((m) => m.name);
    if (chosen && !names.includes(chosen)) names.push(chosen);
    select.replaceChildren(h("option", { value: "" }, "Any model"),
      ...names.map((name) => h("option", { value: name }, name)));
    select.value = chosen;
  }

  // --- start --------------------------------------------------------------------------

  async function start() {
    setUpTabs();
    setUpAccountForms();
    setUpGenerate();
    setUpChat();
    setUpAccount();
    $("gallery-refresh").addEventListener("click", () => loadGallery(true));
    $("gallery-more").addEventListener("click", () => loadGallery(false));
    $("network-refresh").addEventListener("click", loadNetwork);
    tabLoaders.chat = loadChatModels;
    tabLoaders.account = () => {
      refreshAccount();
      loadHistory(true);
    };
    tabLoaders.network = loadNetwork;
    window.addEventListener("hashchange", route);

    state.key = localStorage.getItem(KEY_STORAGE);
    renderSignedIn();
    if (state.key) {
      await refreshAccount();
      if (state.key) loadGallery(true);
    }
    route();
    loadImageModels();
    scheduleQuote();
  }

  document.addEventListener("DOMContentLoaded", start);
})();
