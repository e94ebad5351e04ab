// The chat tab's memory: the conversation and its settings, kept in localStorage across
// reloads until "New chat". Stored messages are OpenAI messages plus the text job that
// answered (`job`), which is left out when they are sent.

export const CHAT_STORAGE = "idlegrid.chat";

export const DEFAULT_SETTINGS = {
  model: "",
  system: "",
  temperature: 0.7, // TextParams' default (protocol/text.py)
  max_tokens: 256, // the OpenAI door's default
  stop: "", // one per line, \n for a line break
};

const isMessage = (m) => m && ["user", "assistant"].includes(m.role) && typeof m.content === "string";

/** {messages, settings} as stored, or empty ones if nothing (or something unreadable) is. */
export function loadChat() {
  let stored = null;
  try {
    stored = JSON.parse(localStorage.getItem(CHAT_STORAGE) || "null");
  } catch (_) {
    // another version's or a hand-edited value: start afresh
  }
  const messages = Array.isArray(stored?.messages) ? stored.messages.filter(isMessage) : [];
  const settings = { ...DEFAULT_SETTINGS };
  for (const [name, value] of Object.entries(stored?.settings || {})) {
    if (name in settings && typeof value === typeof settings[name]) settings[name] = value;
  }
  return { messages, settings };
}

/** Keep `messages` and `settings`; false when the browser's storage refused (full, or off). */
export function saveChat(messages, settings) {
  try {
    localStorage.setItem(CHAT_STORAGE, JSON.stringify({ messages, settings }));
    return true;
  } catch (_) {
    return false;
  }
}

/** The stop strings of the settings' text: one per line, `\n` and `\t` written out. */
export function stopStrings(text) {
  return text.split("\n").filter((line) => line !== "")
    .map((line) => line.replace(/\\n/g, "\n").replace(/\\t/g, "\t"));
}
