// The network tab: workers, the models they serve and the queues (GET /api/v1/network).

import { $, h, plural, seconds } from "./dom.js";
import { ApiError, api } from "./api.js";

export async function loadNetwork() {
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
