// The idlegrid web page: native ES modules (coordinator/static/page/), no build step,
// nothing loaded from elsewhere. The API key lives in localStorage and travels only in
// request headers (`apikey`, or `Authorization: Bearer` for the OpenAI-compatible chat),
// never in a URL; that is why event streams are read with fetch() instead of EventSource,
// which cannot send headers.
//
//   page/api.js       requests, errors, event streams, following a job
//   page/dom.js       building elements, small text formats
//   page/state.js     what the page holds (the key, the account, the jobs followed)
//   page/forms.js     errors beside forms and fields
//   page/tabs.js      the tabs and the address's #fragment
//   page/account.js   sign in, register, sign out; balance, history, transfers
//   page/generate.js  the image form: samplers, models, price, progress
//   page/source.js    the image form's source image, strength and painted mask
//   page/extras.js    the image form's extras (hires fix, upscaler, face fixer, ControlNet, ...)
//   page/gallery.js   the jobs list and each image's card
//   page/chat.js      the chat tab: settings, streaming, regenerate, copy
//   page/chat_store.js the conversation and chat settings kept in localStorage
//   page/network.js   the network tab
//
// Modules import each other's functions (account <-> gallery <-> generate); they call them
// only on events, after every module has loaded.

import { $ } from "./page/dom.js";
import { state, KEY_STORAGE } from "./page/state.js";
import { route, setUpTabs, tabLoaders } from "./page/tabs.js";
import { loadHistory, refreshAccount, renderSignedIn, setUpAccount, setUpAccountForms } from "./page/account.js";
import { loadImageModels, loadSamplers, scheduleQuote, setUpGenerate } from "./page/generate.js";
import { loadGallery } from "./page/gallery.js";
import { loadChatModels, setUpChat } from "./page/chat.js";
import { loadNetwork } from "./page/network.js";

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
  const samplers = loadSamplers();
  if (state.key) {
    await refreshAccount();
    if (state.key) loadGallery(true);
  }
  route();
  loadImageModels();
  await samplers;
  scheduleQuote();
}

// a module runs after the document is parsed (modules are deferred)
start();
