// The account: sign in, register (the key shown once), sign out; the account tab's
// balance, history and transfers.

import { $, copyText, h, plural, randomKey } from "./dom.js";
import { ApiError, api } from "./api.js";
import { clearErrors, fieldProblem, showError } from "./forms.js";
import { KEY_STORAGE, state } from "./state.js";
import { currentTab, route, tabLoaders } from "./tabs.js";
import { loadGallery } from "./gallery.js";
import { scheduleQuote } from "./generate.js";

/** Read the account again (its balance changes with every job). */
export async function refreshAccount() {
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

export function renderSignedIn() {
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
  const tab = currentTab();
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

export function setUpAccountForms() {
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

// --- the account tab ------------------------------------------------------------------

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

export async function loadHistory(fresh) {
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

export function setUpAccount() {
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
