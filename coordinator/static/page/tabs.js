// The four tabs (keyboard-operable, one panel shown) and the address's #fragment: a tab's
// name, or #job=ID for a shared image.

import { $ } from "./dom.js";
import { showSharedJob } from "./gallery.js";

export const TABS = ["images", "chat", "account", "network"];
/** name -> what to load when its tab is shown (set by the entry module). */
export const tabLoaders = {};

export function selectTab(name, { focus = false } = {}) {
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

/** The name of the tab shown now. */
export const currentTab = () => TABS.find((t) => $(`tab-${t}`).getAttribute("aria-selected") === "true");

export function setUpTabs() {
  const list = document.querySelector('[role="tablist"]');
  for (const tab of TABS) {
    $(`tab-${tab}`).addEventListener("click", () => {
      selectTab(tab);
      history.replaceState(null, "", `#${tab}`);
    });
  }
  list.addEventListener("keydown", (event) => {
    const current = TABS.indexOf(currentTab());
    const moves = { ArrowRight: current + 1, ArrowLeft: current - 1, Home: 0, End: TABS.length - 1 };
    if (!(event.key in moves)) return;
    event.preventDefault();
    const next = TABS[(moves[event.key] + TABS.length) % TABS.length];
    selectTab(next, { focus: true });
    history.replaceState(null, "", `#${next}`);
  });
}

/** Show what the address's #fragment names. */
export function route() {
  const hash = location.hash.slice(1);
  const job = /^job=([A-Za-z0-9_-]{1,64})$/.exec(hash);
  if (job) {
    selectTab("images");
    showSharedJob(job[1]);
  } else {
    selectTab(TABS.includes(hash) ? hash : "images");
  }
}
