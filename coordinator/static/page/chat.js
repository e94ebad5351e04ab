// The chat tab: the text models (GET /v1/models) and a conversation streamed from the
// OpenAI-compatible /v1/chat/completions (the key as `Authorization: Bearer`), with a
// system prompt, temperature, max tokens and stop strings; regenerate the last answer, copy
// an answer. The conversation and settings survive reloads (chat_store.js).

import { $, copyText, h } from "./dom.js";
import { ApiError, api, readEvents, request } from "./api.js";
import { clearErrors, fieldProblem, showError } from "./forms.js";
import { state } from "./state.js";
import { refreshAccount } from "./account.js";
import { DEFAULT_SETTINGS, loadChat, saveChat, stopStrings } from "./chat_store.js";

const MAX_STOPS = 4; // OpenAI's limit, as the coordinator's OpenAI door
const MAX_STOP_CHARS = 64;
const COPIED_MS = 2000;

let modelsLoaded = false;
const form = () => $("chat-form");

export async function loadChatModels() {
  if (modelsLoaded) return;
  try {
    const list = await api("GET", "/v1/models");
    const select = $("chat-model");
    const wanted = select.value || loadChat().settings.model;
    select.replaceChildren(...list.data.map((m) => h("option", { value: m.id }, m.id)));
    if (list.data.some((m) => m.id === wanted)) select.value = wanted;
    modelsLoaded = true;
  } catch (error) {
    $("chat-error").textContent = `Could not list the models: ${error.message}`;
  }
}

// --- settings -------------------------------------------------------------------------

function showSettings(settings) {
  $("chat-system").value = settings.system;
  $("chat-temperature").value = settings.temperature;
  $("chat-max").value = settings.max_tokens;
  $("chat-stop-strings").value = settings.stop;
}

/** The settings as typed (numbers as they parse), for keeping. */
function currentSettings() {
  const number = (id, fallback) => {
    const value = Number($(id).value);
    return $(id).value.trim() !== "" && Number.isFinite(value) ? value : fallback;
  };
  return {
    model: $("chat-model").value || loadChat().settings.model,
    system: $("chat-system").value,
    temperature: number("chat-temperature", DEFAULT_SETTINGS.temperature),
    max_tokens: number("chat-max", DEFAULT_SETTINGS.max_tokens),
    stop: $("chat-stop-strings").value,
  };
}

const save = () => saveChat(state.chat, currentSettings());

/** The request's sampling fields, or null with the problems marked on the form. */
function readRequest() {
  const f = form();
  clearErrors(f);
  let ok = true;
  const body = {};
  const temperature = Number($("chat-temperature").value);
  if ($("chat-temperature").value.trim() === "" || !(temperature >= 0 && temperature <= 2)) {
    ok = false;
    fieldProblem(f, "temperature", "Enter a number from 0 (always the likeliest word) to 2.");
  } else {
    body.temperature = temperature;
  }
  const max = Number($("chat-max").value);
  if (!Number.isInteger(max) || max < 1) {
    ok = false;
    fieldProblem(f, "max_tokens", "Enter a whole number from 1.");
  } else {
    body.max_tokens = max;
  }
  const stops = stopStrings($("chat-stop-strings").value);
  if (stops.length > MAX_STOPS) {
    ok = false;
    fieldProblem(f, "stop", `At most ${MAX_STOPS} stop strings, one per line.`);
  } else if (stops.some((s) => s.length > MAX_STOP_CHARS)) {
    ok = false;
    fieldProblem(f, "stop", `Each stop string may have at most ${MAX_STOP_CHARS} characters.`);
  } else if (stops.length) {
    body.stop = stops;
  }
  return ok ? body : null;
}

// --- the conversation -----------------------------------------------------------------

function bubble(message) {
  const { role } = message;
  const text = h("span", { class: "text" }, message.content);
  const who = role === "user" ? "You" : role === "assistant" ? "Swarm" : "Error";
  const el = h("div", { class: `msg ${role}`, "data-job": message.job || null },
    h("span", { class: "who-said" }, who), text);
  if (role === "assistant") {
    const copy = h("button", { type: "button", class: "quiet copy" }, "Copy");
    copy.addEventListener("click", async () => {
      const ok = await copyText(text.textContent);
      copy.textContent = ok ? "Copied" : "Could not copy";
      setTimeout(() => { copy.textContent = "Copy"; }, COPIED_MS);
    });
    el.append(copy);
  }
  $("chat-log").append(el);
  $("chat-log").scrollTop = $("chat-log").scrollHeight;
  return el;
}

function render() {
  $("chat-log").replaceChildren();
  for (const message of state.chat) bubble(message);
  showButtons();
}

function showButtons() {
  const busy = state.chatAbort !== null;
  $("chat-send").disabled = busy;
  $("chat-stop").hidden = !busy;
  $("chat-regenerate").disabled = busy || state.chat.length === 0;
}

/** Stream an answer to the conversation as it stands (it ends with the user's message):
 *  "answered", "stopped" (what came is kept) or "failed" (the error beside the form). */
async function answer(body) {
  const model = $("chat-model").value;
  const el = bubble({ role: "assistant", content: "" });
  const out = el.querySelector(".text");
  const log = $("chat-log");
  log.setAttribute("aria-busy", "true");
  const abort = (state.chatAbort = new AbortController());
  showButtons();
  let reply = "";
  let job = null;
  let outcome = "answered";
  // "New chat" while this streams starts another conversation: the answer stays out of it
  const conversation = state.chat;
  try {
    const messages = state.chat.map(({ role, content }) => ({ role, content }));
    const system = $("chat-system").value.trim();
    if (system) messages.unshift({ role: "system", content: system });
    const sent = { model, messages, stream: true, ...body };
    const headers = state.key ? { Authorization: `Bearer ${state.key}` } : {};
    const response = await request("POST", "/v1/chat/completions", {
      body: sent, headers, key: null, signal: abort.signal,
    });
    let failure = null;
    await readEvents(response, (_name, data) => {
      if (data === "[DONE]") return false;
      const chunk = JSON.parse(data);
      if (chunk.error) {
        failure = chunk.error.message || "the job failed";
        return false;
      }
      if (!job && typeof chunk.id === "string") {
        job = chunk.id.replace(/^chatcmpl-/, "");
        el.dataset.job = job;
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
      outcome = "stopped";
      out.textContent = reply + " [stopped]";
    } else {
      outcome = "failed";
      el.remove();
      reply = "";
      showError(form(), $("chat-error"), error);
    }
  } finally {
    if (reply && state.chat === conversation) {
      conversation.push({ role: "assistant", content: reply, job });
      save();
    }
    log.removeAttribute("aria-busy");
    state.chatAbort = null;
    showButtons();
    refreshAccount();
  }
  return outcome;
}

async function send(text) {
  if (!$("chat-model").value) {
    $("chat-error").textContent = "No model to chat with; is a text gateway online?";
    return;
  }
  const body = readRequest();
  if (!body) {
    $("chat-error").textContent = "Fix the marked settings.";
    return;
  }
  $("chat-input").value = "";
  const conversation = state.chat;
  conversation.push({ role: "user", content: text });
  bubble(conversation.at(-1));
  save();
  if (await answer(body) === "failed" && state.chat === conversation) {
    // the message goes back to the input, to send again
    state.chat.pop();
    save();
    $("chat-input").value = $("chat-input").value || text;
    render();
    bubble({ role: "error", content: $("chat-error").textContent });
  }
}

/** Answer the last message again: the last answer (if any) is replaced by a new one, or
 *  kept if the new one fails. */
async function regenerate() {
  const body = readRequest();
  if (!body) {
    $("chat-error").textContent = "Fix the marked settings.";
    return;
  }
  const conversation = state.chat;
  const last = conversation.at(-1)?.role === "assistant" ? conversation.pop() : null;
  render();
  const outcome = await answer(body);
  if (state.chat !== conversation) return;
  const replaced = conversation.at(-1)?.role === "assistant";
  if (!replaced && last) {
    // failed, or stopped before a word came
    conversation.push(last);
    save();
    render();
  }
  if (outcome === "failed") {
    const kept = last ? " The last answer is kept." : "";
    render();
    bubble({ role: "error", content: `${$("chat-error").textContent}${kept}` });
  }
}

export function setUpChat() {
  const { messages, settings } = loadChat();
  state.chat = messages;
  showSettings(settings);
  render();
  form().addEventListener("submit", (event) => {
    event.preventDefault();
    $("chat-error").textContent = "";
    const text = $("chat-input").value.trim();
    if (!text) {
      $("chat-error").textContent = "Write a message first.";
      $("chat-input").focus();
      return;
    }
    if (state.chatAbort) return;
    send(text);
  });
  $("chat-input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      form().requestSubmit();
    }
  });
  for (const id of ["chat-model", "chat-system", "chat-temperature", "chat-max", "chat-stop-strings"]) {
    $(id).addEventListener("change", save);
  }
  $("chat-stop").addEventListener("click", () => state.chatAbort?.abort());
  $("chat-regenerate").addEventListener("click", () => {
    $("chat-error").textContent = "";
    if (!state.chatAbort && state.chat.length) regenerate();
  });
  $("chat-new").addEventListener("click", () => {
    state.chatAbort?.abort();
    state.chat = [];
    save();
    render();
    $("chat-input").focus();
  });
}
