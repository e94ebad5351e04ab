// The chat tab: the text models (GET /v1/models) and a conversation streamed from the
// OpenAI-compatible /v1/chat/completions (the key as `Authorization: Bearer`).

import { $, h } from "./dom.js";
import { ApiError, api, readEvents, request } from "./api.js";
import { state } from "./state.js";
import { refreshAccount } from "./account.js";

let modelsLoaded = false;

export async function loadChatModels() {
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

export function setUpChat() {
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
