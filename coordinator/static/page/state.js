// What the page holds between events: the API key, the account, the jobs it follows.

/** Where the API key is kept (localStorage: it travels only in request headers). */
export const KEY_STORAGE = "idlegrid.apiKey";

export const state = {
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
