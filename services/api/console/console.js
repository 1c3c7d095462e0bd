// The Longhaul web console: sign in with an API key, submit tasks, watch them live.
// Plain ES module, no build step; the live part is longhaul-client.js, usable on its own.

import { LonghaulClient, isTerminal } from "/console/longhaul-client.js";

const KEY_STORAGE = "longhaul.apiKey";
const LIST_LIMIT = 50;
const TABLE_CAP = 200; // rows kept; older ones leave the table (and their subscription)
const LOG_CAP = 500;
const REFRESH_MS = 15000;
const CONFIG_RETRY_S = 5;

const $ = (id) => document.getElementById(id);

const state = {
  apiKey: null,
  signedIn: false, // the app is shown for state.apiKey
  gatewayUrl: null,
  client: null,
  tasks: new Map(), // id -> Task (REST shape, kept current by events)
  order: [], // ids, newest first
  subs: new Map(), // id -> subscription
  logs: new Map(), // id -> events
  selected: null,
  refreshTimer: null,
  configTimer: null, // the next try at loading the configuration, while it fails
  pendingRefresh: new Set(),
  // A submission whose outcome is unknown, { body, key }: the same one again reuses its
  // Idempotency-Key, so the API stores it once whether or not it stored the first.
  unsure: null,
};

// ------------------------------------------------------------------ HTTP

class ApiError extends Error {
  constructor(status, problem, retryAfter) {
    super(problem?.detail || problem?.title || `HTTP ${status}`);
    this.status = status;
    this.problem = problem;
    this.retryAfter = retryAfter; // seconds, for 429 and 503
  }
}

// No answer at all: fetch itself failed (the network, the API down, a connection reset).
class NetworkError extends Error {}

async function api(path, { method = "GET", body, headers: extra = {} } = {}) {
  const headers = { ...extra, Authorization: `Bearer ${state.apiKey}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response, text;
  try {
    response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    text = await response.text();
  } catch (err) {
    throw new NetworkError(err.message);
  }
  let payload = null;
  try {
    payload = text ? JSON.parse(text) : null;
  } catch {
    // Not ours (a proxy's HTML error page): the status says what happened.
    if (response.ok) throw new Error(`HTTP ${response.status}: the answer is not JSON`);
  }
  if (!response.ok) {
    const retryAfter = Number(response.headers.get("Retry-After")) || null;
    const err = new ApiError(response.status, payload, retryAfter);
    const current = state.signedIn && headers.Authorization === `Bearer ${state.apiKey}`;
    if (response.status === 401 && current) {
      // The key was revoked while the console was open: signed out, the caller says no more.
      signOut(refusedKeyMessage(state.apiKey, true));
      err.signedOut = true;
    }
    throw err;
  }
  return payload;
}

function describe(err) {
  if (err instanceof ApiError) {
    const details = (err.problem?.errors || []).map((e) => `${(e.loc || []).join(".")}: ${e.msg}`);
    // A 422's detail already sums its errors up: the errors alone, each once.
    return details.length ? details.join(" — ") : err.message;
  }
  return String(err.message || err);
}

function notify(message, kind = "error") {
  const box = $("notice");
  box.textContent = message;
  box.className = `notice ${kind === "info" ? "info" : ""}`;
  box.hidden = !message;
}

// ------------------------------------------------------------------ sign-in

function keyFromFragment() {
  const match = location.hash.match(/(?:^#|&)key=([^&]+)/);
  if (!match) return null;
  // Out of the address bar (and history) at once: the key must not be bookmarked or shared.
  history.replaceState(null, "", location.pathname + location.search);
  try {
    return decodeURIComponent(match[1]);
  } catch {
    return null; // a mangled link: sign in by hand
  }
}

// The public part of a key (lh_<label>_<key id>_…), never its secret: what the header
// shows, and what a choice between two keys names.
function publicPart(key) {
  const match = /^lh_([a-z0-9]{1,16})_([a-z0-9]{12})_/.exec(key);
  return match ? `lh_${match[1]}_${match[2]}_…` : "lh_…";
}

// A #key= link signs in, but it must not silently replace the key signed in here: a
// link from someone else would put this console under their tenant without a sign.
function chooseKey(linked, stored) {
  if (!linked || linked === stored) return { key: linked || stored };
  if (!stored) return { key: linked };
  const replace = confirm(
    `This link signs in with the API key ${publicPart(linked)}, but this browser is signed ` +
    `in with ${publicPart(stored)}. Sign in with the link's key instead?`,
  );
  if (replace) return { key: linked };
  return {
    key: stored,
    notice: `The link's API key (${publicPart(linked)}) was ignored: still signed in with ` +
      `${publicPart(stored)}.`,
  };
}

async function signIn(key, notice = "") {
  state.apiKey = key;
  let types;
  try {
    types = await api("/v1/task-types");
  } catch (err) {
    state.apiKey = null;
    if (err instanceof ApiError && err.status === 401) {
      // Kept, a refused key would be tried again at every page load.
      const stored = localStorage.getItem(KEY_STORAGE) === key;
      if (stored) localStorage.removeItem(KEY_STORAGE);
      showSignIn(refusedKeyMessage(key, stored));
      return;
    }
    // Away or busy (the network, 429, 503): the key is fine; try again.
    const seconds = err instanceof ApiError && err.retryAfter ? err.retryAfter : 5;
    let why = `The API's answer cannot be used (${describe(err)}).`;
    if (err instanceof NetworkError) why = `Cannot reach the API (${err.message}).`;
    else if (err instanceof ApiError) why = `The API answered ${err.status} (${describe(err)}).`;
    $("sign-in").hidden = true;
    notify(`${why} Trying again in ${seconds} s.`);
    setTimeout(() => signIn(key, notice), seconds * 1000);
    return;
  }
  localStorage.setItem(KEY_STORAGE, key);
  notify(notice, "info");
  try {
    await start(types?.items);
  } catch (err) {
    // The console's own failure, not the API's: said as it is, and not retried (a
    // retry would start a second time over what this start left).
    console.error("longhaul console: start failed", err);
    notify(`The console failed to start: ${err.name}: ${err.message}. Reload the page.`);
  }
}

function refusedKeyMessage(key, forgotten) {
  return `The API refused the API key ${publicPart(key)}: revoked, or mistyped?` +
    `${forgotten ? " This browser no longer keeps it." : ""} Sign in with a valid key.`;
}

function showSignIn(message) {
  $("app").hidden = true;
  $("sign-out").hidden = true;
  $("signed-in").hidden = true;
  $("sign-in").hidden = false;
  if (message) notify(message);
  $("api-key").focus();
}

function signOut(message = "") {
  localStorage.removeItem(KEY_STORAGE);
  state.apiKey = null;
  state.signedIn = false;
  state.client?.close();
  state.client = null;
  // The next sign-in's first connection is no reconnect (nothing to list again), and
  // what the notice said of this one's is gone.
  wasOpen = false;
  connectionNotice = null;
  clearInterval(state.refreshTimer);
  clearTimeout(state.configTimer);
  state.tasks.clear();
  state.order = [];
  state.subs.clear();
  state.logs.clear();
  state.selected = null;
  state.unsure = null; // another key may be another tenant's, with keys of its own
  renderTable();
  setConnection("idle");
  showSignIn(message);
}

// ------------------------------------------------------------------ start

// Where the gateway is: { url }, or { problem, retryAfter } when the API does not say.
// No guess stands in for it: this page's Content-Security-Policy lets it connect to the
// configured gateway alone, so a guessed URL (this host, port 8001) would be blocked
// unless it is the configured one, and a blocked socket tells the user nothing.
async function loadConfig() {
  let response;
  try {
    response = await fetch("/console/config.json");
  } catch (err) {
    return { problem: describe(err) };
  }
  if (!response.ok) {
    const retryAfter = Number(response.headers.get("Retry-After")) || null;
    return { problem: `HTTP ${response.status}`, retryAfter };
  }
  try {
    const url = (await response.json()).gateway_url;
    if (typeof url === "string" && url) return { url };
  } catch {
    // not JSON: said below
  }
  return { problem: "the answer names no gateway_url" };
}

// Live updates, once the configuration is known: until then (tried again every few
// seconds) the rest of the console works, and the header and the notice say why not.
async function startLive() {
  state.configTimer = null;
  if (!state.gatewayUrl) {
    const config = await loadConfig();
    if (!state.signedIn || state.client) return; // signed out, or started, meanwhile
    if (!config.url) {
      const seconds = config.retryAfter || CONFIG_RETRY_S;
      setConnection("error", "Live updates unavailable");
      const text = "Live updates cannot start: the console's configuration " +
        `(/console/config.json) could not be loaded (${config.problem}). ` +
        `Trying again in ${seconds} s.`;
      if (text !== connectionNotice) {
        connectionNotice = text;
        notify(text);
      }
      state.configTimer = setTimeout(startLive, seconds * 1000);
      return;
    }
    state.gatewayUrl = config.url;
  }
  state.client = new LonghaulClient({
    gatewayUrl: state.gatewayUrl,
    apiBase: location.origin,
    apiKey: state.apiKey,
    onStatus: onConnectionStatus,
  });
  // What was listed or chosen before there was a client is followed now.
  for (const id of state.order) {
    if (id === state.selected) watch(id, state.logs.get(id)?.at(-1)?.seq ?? 0);
    else if (!isTerminal(state.tasks.get(id)?.state)) watch(id, state.tasks.get(id).last_seq);
  }
}

async function start(types) {
  state.signedIn = true;
  $("sign-in").hidden = true;
  $("app").hidden = false;
  $("sign-out").hidden = false;
  $("signed-in-key").textContent = publicPart(state.apiKey);
  $("signed-in").hidden = false;
  renderTypes(types);
  startLive(); // not awaited: the task list does not wait for the configuration
  await refreshList();
  // Not after a sign-out meanwhile (the key refused): its timer would outlive it.
  if (state.signedIn) state.refreshTimer = setInterval(refreshList, REFRESH_MS);
}

// ------------------------------------------------------------------ connection indicator

function setConnection(status, text) {
  $("connection").className = `conn conn-${status}`;
  $("connection-text").textContent = text || "Not connected";
  // Live updates that cannot start (the client does not retry an "error"): the way out.
  $("retry-live").hidden = status !== "error";
}

// What stops live updates from starting (the gateway URL, this page's protocol, its
// Content-Security-Policy) belongs to the page as it was loaded: a socket tried again
// from it fails the same way. A reload takes the server's current configuration and
// policy, and signs in again with the key kept here.
function retryLive() {
  location.reload();
}

let wasOpen = false;
let connectionNotice = null; // what the notice says about the connection, while it does
function onConnectionStatus(status, detail) {
  if (status === "open") {
    setConnection("open", "Live");
    if (connectionNotice !== null && $("notice").textContent === connectionNotice) notify("");
    connectionNotice = null;
    // After an outage, tasks created elsewhere meanwhile are not in our table yet.
    if (wasOpen) refreshList();
    wasOpen = true;
  } else if (status === "connecting") {
    setConnection("connecting", "Connecting…");
  } else if (status === "reconnecting") {
    const secs = detail?.delayMs ? ` in ${Math.ceil(detail.delayMs / 1000)} s` : "";
    setConnection("reconnecting", `Reconnecting${secs}…`);
  } else if (status === "refused") {
    const secs = detail?.delayMs ? ` in ${Math.ceil(detail.delayMs / 1000)} s` : "";
    setConnection("refused", `Cannot connect; retrying${secs}…`);
    // A refused handshake (403: this page's origin is not allowed) reaches the page
    // as 1006 with no reason, like a gateway that is not there.
    const why = detail?.reason
      ? `${detail.reason}${detail.code ? ` (close code ${detail.code})` : ""}`
      : "the gateway refused the connection or did not answer: is it running, and does " +
        "LONGHAUL_ALLOWED_ORIGINS allow this page's origin?";
    const text = `Live updates: connections to the gateway keep failing (${why}). Still trying.`;
    // Told again only when it says something new: the notice is an alert.
    if (text !== connectionNotice) {
      connectionNotice = text;
      notify(text);
    }
  } else if (status === "unauthorized") {
    if (detail?.status === 401 && state.signedIn) {
      // The API no longer takes the key (revoked): as any other 401 of it.
      signOut(refusedKeyMessage(state.apiKey, true));
      return;
    }
    setConnection("unauthorized", "Live updates refused");
    notify(`Live updates refused: ${detail?.message ?? "the token was refused"}.`);
  } else if (status === "error") {
    setConnection("error", "Live updates unavailable");
    notify(`Live updates cannot start: ${detail?.message ?? "unknown error"}` +
      (location.protocol === "https:" && state.gatewayUrl?.startsWith("ws:")
        ? " (this page is https, the gateway's URL is ws://: set LONGHAUL_PUBLIC_WS_URL to a wss:// one)"
        : ""));
  } else {
    setConnection("idle", "Not connected");
  }
}

// ------------------------------------------------------------------ task types and submit

function exampleArgs(schema) {
  if (!schema || typeof schema !== "object") return {};
  if (Array.isArray(schema.examples) && schema.examples.length) return schema.examples[0];
  const out = {};
  for (const [name, prop] of Object.entries(schema.properties || {})) {
    if (Array.isArray(prop.examples) && prop.examples.length) out[name] = prop.examples[0];
    else if ("default" in prop) out[name] = prop.default;
  }
  return out;
}

function renderTypes(types) {
  const select = $("task-type");
  select.replaceChildren();
  state.types = new Map(types.map((t) => [t.name, t]));
  for (const t of types) select.append(new Option(t.name, t.name));
  if (state.types.has("demo.sleep")) select.value = "demo.sleep";
  fillArgs();
}

function fillArgs() {
  const type = state.types.get($("task-type").value);
  $("task-args").value = JSON.stringify(exampleArgs(type?.args_schema), null, 2);
  const props = Object.keys(type?.args_schema?.properties || {});
  $("args-hint").textContent = props.length ? `Fields: ${props.join(", ")}` : "No arguments.";
}

async function submitTask(event) {
  event.preventDefault();
  let args;
  try {
    args = JSON.parse($("task-args").value || "{}");
  } catch (err) {
    notify(`Arguments are not valid JSON: ${err.message}`);
    $("task-args").focus();
    return;
  }
  const body = { type: $("task-type").value, args };
  const text = JSON.stringify(body);
  const key = state.unsure?.body === text ? state.unsure.key : newIdempotencyKey();
  const button = $("submit-button");
  button.disabled = true;
  try {
    const task = await api("/v1/tasks", { method: "POST", body, headers: { "Idempotency-Key": key } });
    if (state.unsure?.key === key) state.unsure = null;
    notify("");
    upsert(task, { afterSeq: 0, front: true });
    trimTable();
    renderTable();
  } catch (err) {
    if (err.signedOut) return;
    // A 504 (outcome-unknown: the API could not learn whether it stored the task), or
    // no answer at all: the task may be stored, and may run.
    if (err instanceof NetworkError || err.status === 504) {
      state.unsure = { body: text, key };
      const why = err instanceof NetworkError
        ? `the API did not answer (${err.message})`
        : "the API could not learn whether the task was stored (its database did not answer)";
      notify(`Outcome unknown: ${why}. The task may have been accepted, and may run: the ` +
        "task list shows it if it was. Submitting it again is safe: the console sends it " +
        "with the same Idempotency-Key, and the API stores it once.");
      setTimeout(refreshList, (err.retryAfter || 5) * 1000);
      return;
    }
    notify(`Not submitted: ${describe(err)}`);
  } finally {
    button.disabled = false;
  }
}

function newIdempotencyKey() {
  // Not crypto.randomUUID(): it needs a secure context, and the console may be served
  // over plain http from another host than localhost.
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return `console-${Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("")}`;
}

// ------------------------------------------------------------------ the task list

async function refreshList() {
  if (!state.apiKey) return;
  try {
    const page = await api(`/v1/tasks?limit=${LIST_LIMIT}`);
    const ids = [];
    for (const task of page.items) {
      upsert(task, { afterSeq: task.last_seq });
      ids.push(task.id);
    }
    // Newest first as the API orders them; tasks we created that the page no longer
    // shows (older than the page) stay below.
    state.order = [...ids, ...state.order.filter((id) => !ids.includes(id))];
    trimTable();
    renderTable();
  } catch (err) {
    if (err.signedOut) return;
    notify(`Cannot list tasks: ${describe(err)}`);
  }
}

function upsert(task, { afterSeq, front = false }) {
  const known = state.tasks.get(task.id);
  // An event may already have brought us further than this REST answer.
  if (!known || task.last_seq >= known.last_seq) state.tasks.set(task.id, task);
  if (!state.order.includes(task.id)) {
    if (front) state.order.unshift(task.id);
    else state.order.push(task.id);
  }
  // Only what can still change is followed: a connection's subscriptions are capped.
  if (!state.subs.has(task.id) && !isTerminal(task.state)) watch(task.id, afterSeq);
}

function trimTable() {
  for (const id of state.order.splice(TABLE_CAP)) {
    unwatch(id);
    state.tasks.delete(id);
    state.logs.delete(id);
  }
}

function unwatch(taskId) {
  state.subs.get(taskId)?.unsubscribe();
  state.subs.delete(taskId);
}

function watch(taskId, afterSeq) {
  if (!state.client) return; // startLive follows it once there is one
  // The new handler first, then the old one away: a handler behind the old one makes
  // the client follow the task anew from its seq, in one step, with the replay it lacks
  // (the old one going first would make it leave the task, then follow it again).
  const previous = state.subs.get(taskId);
  state.subs.set(taskId, state.client.subscribe(taskId, {
    afterSeq,
    onEvent: (ev) => onEvent(taskId, ev),
    onError: (err) => notify(`Task ${shortId(taskId)}: ${err.message}`),
  }));
  previous?.unsubscribe();
}

function onEvent(taskId, ev) {
  const log = state.logs.get(taskId) || [];
  log.push(ev);
  if (log.length > LOG_CAP) log.splice(0, log.length - LOG_CAP);
  state.logs.set(taskId, log);
  if (state.selected === taskId) appendLog(ev);

  const task = state.tasks.get(taskId);
  if (!task) return;
  if (ev.snapshot || ev.seq >= task.last_seq) {
    const stateChanged = task.state !== ev.state;
    Object.assign(task, {
      state: ev.state, progress: ev.progress, message: ev.message, last_seq: ev.seq,
      attempts: Math.max(task.attempts, ev.attempt || 0),
    });
    renderRow(taskId);
    // Result, error and attempts live on the Task: fetch it when the state moves.
    if (stateChanged || isTerminal(ev.state)) refreshTask(taskId);
  }
  // Ended: nothing more will come (a retry follows it again), unless its log is open.
  if (isTerminal(ev.state) && state.selected !== taskId) unwatch(taskId);
}

async function refreshTask(taskId) {
  if (state.pendingRefresh.has(taskId)) return;
  state.pendingRefresh.add(taskId);
  try {
    const fresh = await api(`/v1/tasks/${taskId}`);
    const task = state.tasks.get(taskId);
    if (task && fresh.last_seq >= task.last_seq) state.tasks.set(taskId, fresh);
    renderRow(taskId);
  } catch {
    // the next event or list refresh will try again
  } finally {
    state.pendingRefresh.delete(taskId);
  }
}

async function act(taskId, action) {
  try {
    const task = await api(`/v1/tasks/${taskId}/${action}`, { method: "POST" });
    notify(`${action === "cancel" ? "Cancel" : "Retry"} requested for ${shortId(taskId)}.`, "info");
    const known = state.tasks.get(taskId);
    const seen = known?.last_seq ?? 0;
    if (!known || task.last_seq >= known.last_seq) state.tasks.set(taskId, task);
    // Retried, it runs again: follow it from the events we have.
    if (!isTerminal(task.state) && !state.subs.has(taskId)) watch(taskId, seen);
    renderRow(taskId);
  } catch (err) {
    if (err.signedOut) return;
    notify(`Cannot ${action}: ${describe(err)}`);
  }
}

// ------------------------------------------------------------------ rendering

function outcome(task) {
  if (task.error) return `${task.error.type}: ${task.error.message}`;
  if (task.result !== null && task.result !== undefined) return JSON.stringify(task.result);
  return task.message || "";
}

function buildRow(taskId) {
  const tr = document.createElement("tr");
  tr.dataset.taskId = taskId;
  tr.innerHTML = `
    <td class="id"><code></code></td><td class="type"></td>
    <td class="state"></td>
    <td class="progress-cell"><progress max="1" value="0"></progress> <span class="pct"></span></td>
    <td class="attempts"></td><td class="outcome"></td>
    <td class="actions">
      <button type="button" class="secondary" data-action="events">Events</button>
      <button type="button" class="secondary" data-action="cancel">Cancel</button>
      <button type="button" class="secondary" data-action="retry">Retry</button>
    </td>`;
  tr.querySelector("code").textContent = shortId(taskId);
  tr.querySelector("code").title = taskId;
  tr.querySelector("progress").setAttribute("aria-label", `Progress of task ${shortId(taskId)}`);
  for (const button of tr.querySelectorAll("button")) {
    button.setAttribute("aria-label", `${button.textContent} task ${shortId(taskId)}`);
  }
  return tr;
}

function fillRow(tr, task) {
  tr.querySelector(".type").textContent = task.type;
  const stateCell = tr.querySelector(".state");
  stateCell.textContent = task.state;
  stateCell.className = `state state-${task.state}`;
  const bar = tr.querySelector("progress");
  bar.value = task.progress;
  const pct = `${Math.round(task.progress * 100)}%`;
  tr.querySelector(".pct").textContent = pct;
  bar.setAttribute("aria-valuetext", `${pct}${task.message ? `, ${task.message}` : ""}`);
  tr.querySelector(".attempts").textContent = `${task.attempts}/${task.max_attempts}`;
  tr.querySelector(".outcome").textContent = outcome(task);
  tr.querySelector('[data-action="cancel"]').disabled = isTerminal(task.state);
  tr.querySelector('[data-action="retry"]').disabled = !["failed", "cancelled"].includes(task.state);
  tr.classList.toggle("selected", state.selected === task.id);
}

function renderRow(taskId) {
  const tr = document.querySelector(`tr[data-task-id="${taskId}"]`);
  const task = state.tasks.get(taskId);
  if (tr && task) fillRow(tr, task);
}

function renderTable() {
  const body = $("task-rows");
  const existing = new Map([...body.children].map((tr) => [tr.dataset.taskId, tr]));
  const rows = state.order.map((id) => {
    const tr = existing.get(id) || buildRow(id);
    fillRow(tr, state.tasks.get(id));
    return tr;
  });
  body.replaceChildren(...rows);
  $("no-tasks").hidden = rows.length > 0;
}

function select(taskId) {
  const previous = state.selected;
  state.selected = taskId;
  if (previous && previous !== taskId && isTerminal(state.tasks.get(previous)?.state)) {
    unwatch(previous);
  }
  for (const tr of $("task-rows").children) tr.classList.toggle("selected", tr.dataset.taskId === taskId);
  $("log-task").textContent = `— ${taskId}`;
  $("log-empty").hidden = true;
  $("event-log").replaceChildren();
  state.logs.set(taskId, []);
  // Replay the task's whole retained story into the log (the row only moves forward).
  watch(taskId, 0);
}

function appendLog(ev) {
  const li = document.createElement("li");
  const pct = `${Math.round(ev.progress * 100)}%`;
  li.textContent = `#${ev.seq} ${ev.ts} ${ev.state} ${pct}${ev.message ? ` — ${ev.message}` : ""}` +
    `${ev.snapshot ? " (snapshot: earlier events no longer retained)" : ""}`;
  if (ev.snapshot) li.className = "snapshot";
  $("event-log").append(li);
  li.scrollIntoView({ block: "nearest" });
}

// ------------------------------------------------------------------ wiring

function main() {
  $("sign-in-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("api-key").value.trim();
    $("api-key").value = "";
    if (key) signIn(key);
  });
  $("sign-out").addEventListener("click", () => signOut());
  $("retry-live").addEventListener("click", retryLive);
  $("task-type").addEventListener("change", fillArgs);
  $("submit-form").addEventListener("submit", submitTask);
  $("task-rows").addEventListener("click", (event) => {
    const button = event.target.closest("button[data-action]");
    if (!button) return;
    const taskId = button.closest("tr").dataset.taskId;
    if (button.dataset.action === "events") select(taskId);
    else act(taskId, button.dataset.action);
  });
  const { key, notice } = chooseKey(keyFromFragment(), localStorage.getItem(KEY_STORAGE));
  if (key) signIn(key, notice);
  else showSignIn("");
}

main();

// UUIDv7 ids begin with the creation time, so their head is the same for tasks made
// together; the tail is random and tells them apart.
function shortId(taskId) {
  return taskId.slice(-8);
}
