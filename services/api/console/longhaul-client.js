/**
 * Longhaul live progress: a WebSocket client for the Longhaul gateway.
 *
 * One ES module, no dependencies, no build step. Drop it into any page:
 *
 *   import { LonghaulClient } from "http://127.0.0.1:8000/console/longhaul-client.js";
 *
 *   const client = new LonghaulClient({
 *     gatewayUrl: "ws://127.0.0.1:8001/v1/ws",   // Task.links.events
 *     // Either an API key (the page then holds a secret: fine for an operator console)...
 *     apiBase: "http://127.0.0.1:8000", apiKey: "lh_live_...",
 *     // ...or your own backend hands out short-lived ws tokens (POST /v1/ws-tokens):
 *     // getToken: async () => (await fetch("/my/ws-token")).json().then((b) => b.token),
 *     onStatus: (status, detail) => console.log(status, detail),
 *   });
 *   const sub = client.subscribe(taskId, {
 *     onEvent: (event) => console.log(event.seq, event.state, event.progress),
 *     onError: (error) => console.warn(error.code, error.message),
 *   });
 *   // later: sub.unsubscribe(); client.close();
 *
 * What it guarantees per task and handler: `onEvent` is called in strictly increasing
 * `seq`, with no gap and no duplicate, across reconnects; a handler added later (even
 * after the task ended) gets what it lacks from its own `afterSeq`. After a dropped connection (gateway restart,
 * network change) it fetches a new token, reconnects with exponential backoff and full
 * jitter, and resubscribes each task with `after_seq` = the last seq it delivered, so the
 * gateway replays what was missed. When the gateway can no longer replay (events expired),
 * the first event has `snapshot: true` and carries the task's current state.
 *
 * A handler behind the others makes the client follow the task anew on the same
 * connection, from that handler's seq: an unsubscribe, then the subscribe. Each
 * unsubscribe it sends is followed by a subscribe for an id that is no task
 * ("longhaul-client:sync:<n>"), which the gateway answers with a `not_found` error after
 * whatever it sent before; a handler added meanwhile (behind, or to a task followed again
 * after its last handler left) takes nothing until that answer, so it never takes a frame
 * of the subscription left (a snapshot among them would skip the replay that follows).
 *
 * The backoff starts over only once a connection has stayed open `stableAfterMs`; a
 * gateway that closes with 1008, 1011 or 1013 (slow consumer or a revoked API key,
 * internal error, try again later) is asked again after at least half the backoff
 * ceiling, never at once. After a revocation that next token fetch is refused (401), and
 * the status is "unauthorized".
 *
 * Status values passed to `onStatus`: "connecting", "open", "reconnecting" (with
 * `{ delayMs, attempt, code, reason }`: the close code and reason of the connection that
 * ended, when there was one, or the token fetch's error as `reason`, or a socket that
 * reported an error and did not close within `closeWaitMs`), "refused" (the
 * same detail plus `failures`: `refusedAfter` connections in a row ended before lasting,
 * or never opened, as a handshake refused with 403 for an Origin not allowed does, seen
 * by the page as code 1006; it goes on retrying at the backoff, and says "refused" until
 * a connection opens), "unauthorized" (with `{ message, status }`: the token fetch was
 * refused, with its HTTP status, 401 (an API key the API does not take) or 403, or the
 * second argument of an `AuthError` thrown by your own `getToken`; no retry), "error"
 * (with `{ message }`: the socket cannot be made at all, e.g. a malformed `gatewayUrl`,
 * a `ws://` one from an `https` page, which the browser refuses as mixed content, or one
 * the page's Content-Security-Policy does not allow; no retry), "closed" (after
 * `close()`).
 */

const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
// Not a UUID, so never a task: the gateway answers a subscribe for it with an error frame
// naming it, in its turn (it handles one connection's frames in order).
const SYNC_PREFIX = "longhaul-client:sync:";
// Close codes of a gateway that asks to be left alone a while: policy violation (a
// slow consumer, or the API key that asked for the token revoked), internal error, try
// again later (no room, a dependency down).
const TRY_LATER = new Set([1008, 1011, 1013]);

export function isTerminal(state) {
  return TERMINAL.has(state);
}

/** Thrown by token fetchers for answers that retrying cannot fix (401/403). */
export class AuthError extends Error {
  constructor(message, status) {
    super(message);
    this.name = "AuthError";
    this.status = status;
  }
}

export class LonghaulClient {
  /**
   * @param {object} options
   * @param {string} options.gatewayUrl  ws(s)://host:port/v1/ws
   * @param {string} [options.apiBase]   base URL of the REST API (default: this page's origin)
   * @param {string} [options.apiKey]    API key used to fetch ws tokens
   * @param {() => Promise<string>} [options.getToken]  custom token fetcher (instead of apiKey)
   * @param {(status: string, detail?: object) => void} [options.onStatus]
   * @param {number} [options.baseDelayMs=500]  first reconnect backoff ceiling
   * @param {number} [options.maxDelayMs=15000] backoff cap
   * @param {number} [options.stableAfterMs=10000] how long a connection stays open
   *   before the backoff starts over (a gateway that accepts and then closes at once
   *   is backed off from like one that does not answer)
   * @param {number} [options.refusedAfter=5] connections in a row that fail before the
   *   status is "refused" instead of "reconnecting"
   * @param {number} [options.closeWaitMs=3000] how long a socket that reported an error
   *   may take to close before it is given up as a failed connection
   */
  constructor(options) {
    if (!options || !options.gatewayUrl) throw new TypeError("gatewayUrl is required");
    if (!options.getToken && !options.apiKey) throw new TypeError("apiKey or getToken is required");
    this.gatewayUrl = options.gatewayUrl;
    this.apiBase = (options.apiBase ?? globalThis.location?.origin ?? "").replace(/\/$/, "");
    this.apiKey = options.apiKey;
    this.getToken = options.getToken ?? (() => this.#fetchToken());
    this.onStatus = options.onStatus ?? (() => {});
    this.baseDelayMs = options.baseDelayMs ?? 500;
    this.maxDelayMs = options.maxDelayMs ?? 15000;
    this.stableAfterMs = options.stableAfterMs ?? 10000;
    this.refusedAfter = options.refusedAfter ?? 5;
    this.closeWaitMs = options.closeWaitMs ?? 3000;
    /** task id (lower case) -> { lastSeq, handlers: Set<{onEvent, onError, lastSeq, after}> }:
     * a handler's `after` is the sync id it waits for (null: none), see #settle. */
    this.subscriptions = new Map();
    // On the current socket: sync id -> task id, for the syncs not answered yet; and per
    // task, the latest of them: until its answer, the task's frames may still be those of
    // a subscription the client has left.
    this.syncs = new Map();
    this.unsettled = new Map();
    this.syncCount = 0;
    this.status = "idle";
    this.socket = null;
    this.attempt = 0;
    // Connections in a row that ended (or never opened) before lasting stableAfterMs.
    this.failures = 0;
    this.closed = false;
    this.timer = null;
    this.stableTimer = null;
    // Each connect() takes a number; one that a newer one (or close()) overtook while
    // it waited for its token gives up, so there is never more than one socket.
    this.generation = 0;
    this.#onOnline = () => {
      // The network came back: do not sit out the rest of a backoff (a connect in
      // flight has no timer and goes on by itself).
      if (this.timer !== null) this.#connectSoon(0);
    };
    globalThis.addEventListener?.("online", this.#onOnline);
    this.#onViolation = (event) => {
      // A socket this page's Content-Security-Policy does not allow: Chromium fires its
      // "error" but never its "close", so the status would stay "connecting" for ever.
      // No retry can fix it on this page. A report-only policy blocks nothing.
      if (event.disposition !== "enforce") return;
      const blocked = originOf(event.blockedURI);
      if (this.socket && blocked !== null && blocked === originOf(this.socket.url)) {
        const why = `this page's Content-Security-Policy (${event.effectiveDirective}) ` +
          `does not allow ${blocked}`;
        this.#fail(new DOMException(why, "SecurityError"));
      }
    };
    globalThis.document?.addEventListener?.("securitypolicyviolation", this.#onViolation);
    this.#connectNow();
  }

  #onOnline;
  #onViolation;

  /**
   * Follow a task. `afterSeq` is the last seq you already have (0: everything retained).
   * Returns `{ unsubscribe() }`. Several handlers may follow the same task.
   */
  subscribe(taskId, { onEvent = () => {}, onError = () => {}, afterSeq = 0 } = {}) {
    // The gateway answers with the canonical form of the id.
    taskId = canonicalId(taskId);
    // Whatever the task's frames still carry from a subscription left (or being left,
    // below) is not this handler's: it waits for the sync that ends them, if any.
    const after = this.unsettled.get(taskId) ?? null;
    const handler = { onEvent, onError, lastSeq: afterSeq, after };
    let sub = this.subscriptions.get(taskId);
    if (!sub) {
      sub = { lastSeq: afterSeq, handlers: new Set([handler]) };
      this.subscriptions.set(taskId, sub);
      this.#send({ op: "subscribe", task_id: taskId, after_seq: afterSeq });
    } else {
      const behind = afterSeq < lowestSeq(sub);
      sub.handlers.add(handler);
      // It lacks events the others have had: following the task anew restarts its
      // stream from this seq (the others skip what they have, see #receive).
      if (behind && this.#open()) {
        handler.after = this.#settle(taskId);
        this.#send({ op: "subscribe", task_id: taskId, after_seq: afterSeq });
      }
    }
    return {
      unsubscribe: () => {
        sub.handlers.delete(handler);
        if (sub.handlers.size === 0 && this.subscriptions.get(taskId) === sub) {
          this.subscriptions.delete(taskId);
          if (this.#open()) this.#settle(taskId);
        }
      },
    };
  }

  /** The last seq delivered for a task (0 when none). */
  lastSeq(taskId) {
    return this.subscriptions.get(canonicalId(taskId))?.lastSeq ?? 0;
  }

  /** Stop for good: close the socket and cancel any pending reconnect. */
  close() {
    this.#stop("client closed");
    this.#setStatus("closed");
  }

  /** What close() and #fail() share: no socket, no timer, no reconnect from now on. */
  #stop(why) {
    this.closed = true;
    this.generation += 1;
    clearTimeout(this.timer);
    this.timer = null;
    this.#stopStableTimer();
    globalThis.removeEventListener?.("online", this.#onOnline);
    globalThis.document?.removeEventListener?.("securitypolicyviolation", this.#onViolation);
    if (this.socket) this.socket.close(1000, why);
    this.socket = null;
  }

  async #fetchToken() {
    const response = await fetch(`${this.apiBase}/v1/ws-tokens`, {
      method: "POST",
      headers: { Authorization: `Bearer ${this.apiKey}` },
    });
    if (response.status === 401 || response.status === 403) {
      throw new AuthError(`token refused (${response.status})`, response.status);
    }
    if (!response.ok) throw new Error(`token request failed (${response.status})`);
    return (await response.json()).token;
  }

  #setStatus(status, detail) {
    this.status = status;
    try {
      this.onStatus(status, detail);
    } catch (err) {
      console.error("longhaul: onStatus failed", err);
    }
  }

  async #connect() {
    if (this.closed) return;
    const generation = ++this.generation;
    // "refused" stays up while it retries: the page keeps telling what is wrong.
    if (this.status !== "refused") {
      this.#setStatus(this.attempt === 0 ? "connecting" : "reconnecting", { attempt: this.attempt });
    }
    let token;
    try {
      token = await this.getToken();
    } catch (err) {
      if (generation !== this.generation) return;
      if (err instanceof AuthError) {
        this.#setStatus("unauthorized", { message: err.message, status: err.status });
        return;
      }
      this.#scheduleReconnect({ reason: err.message });
      return;
    }
    if (this.closed || generation !== this.generation) return;
    let socket;
    try {
      const url = new URL(this.gatewayUrl);
      url.searchParams.set("token", token);
      socket = new WebSocket(url);
    } catch (err) {
      // A malformed gatewayUrl, or a ws:// one from an https page (mixed content, a
      // SecurityError): no retry can fix it.
      this.#fail(err);
      return;
    }
    if (this.socket) this.socket.close(1000, "replaced");
    this.socket = socket;
    socket.onopen = () => {
      if (this.socket !== socket) return;
      // Opening proves little (a gateway with no room accepts, then closes 1013): the
      // backoff starts over once the connection has lasted.
      this.stableTimer = setTimeout(() => {
        this.stableTimer = null;
        this.attempt = 0;
        this.failures = 0;
      }, this.stableAfterMs);
      this.#setStatus("open");
      // A new connection has no earlier subscription: nothing to wait for.
      this.syncs.clear();
      this.unsettled.clear();
      // Resume every task from the lowest seq a handler has: the gateway replays the rest.
      for (const [taskId, sub] of this.subscriptions) {
        for (const h of sub.handlers) h.after = null;
        this.#send({ op: "subscribe", task_id: taskId, after_seq: lowestSeq(sub) });
      }
    };
    socket.onmessage = (message) => {
      if (this.socket === socket) this.#receive(message.data);
    };
    let closeWait = null;
    socket.onerror = () => {
      // A browser follows an error with a close, but not always (a socket the page's
      // policy blocks, see #onViolation, and who knows what else): one that never
      // closes would leave the status "connecting" for ever. Waited for a while, it
      // counts as a failed connection.
      if (this.socket !== socket || closeWait !== null) return;
      closeWait = setTimeout(() => {
        socket.close();
        this.#ended(socket, { reason: "the socket failed and did not close" });
      }, this.closeWaitMs);
    };
    socket.onclose = (event) => {
      clearTimeout(closeWait);
      // A browser says only 1006 for a handshake refused (an Origin not allowed: 403)
      // or a gateway not there; a gateway that accepted says why it closed.
      this.#ended(socket, { code: event.code, reason: event.reason });
    };
  }

  /** The socket is done with: the current one's end reconnects, a replaced one's is expected. */
  #ended(socket, detail) {
    if (this.socket !== socket) return;
    this.socket = null;
    this.#stopStableTimer();
    if (!this.closed) this.#scheduleReconnect(detail);
  }

  /** Stop for good on an error no retry can fix; the page is told why. */
  #fail(err) {
    this.#stop("client failed");
    this.#setStatus("error", { message: `${err?.name ?? "Error"}: ${err?.message ?? err}` });
  }

  /** #connect is not awaited (constructor, timers): what it throws must not vanish. */
  #connectNow() {
    this.#connect().catch((err) => this.#fail(err));
  }

  #stopStableTimer() {
    clearTimeout(this.stableTimer);
    this.stableTimer = null;
  }

  #scheduleReconnect({ code, reason } = {}) {
    this.attempt += 1;
    this.failures += 1;
    const ceiling = Math.min(this.maxDelayMs, this.baseDelayMs * 2 ** (this.attempt - 1));
    // Full jitter spreads the reconnects of many browsers after a gateway restart; a
    // gateway that said "try later" (overloaded, a dependency down, this client too
    // slow to read) is not asked again at once.
    const floor = TRY_LATER.has(code) ? ceiling / 2 : 0;
    const delayMs = Math.round(floor + Math.random() * (ceiling - floor));
    const detail = { delayMs, attempt: this.attempt, code, reason: reason || undefined };
    // Still retrying (a gateway being restarted comes back), but no longer quietly.
    if (this.failures >= this.refusedAfter) {
      this.#setStatus("refused", { ...detail, failures: this.failures });
    } else {
      this.#setStatus("reconnecting", detail);
    }
    this.#connectSoon(delayMs);
  }

  #connectSoon(delayMs) {
    clearTimeout(this.timer);
    this.timer = setTimeout(() => {
      this.timer = null;
      this.#connectNow();
    }, delayMs);
  }

  #open() {
    return this.socket !== null && this.socket.readyState === WebSocket.OPEN;
  }

  #send(frame) {
    // Not open yet: onopen subscribes everything in this.subscriptions anyway.
    if (this.#open()) this.socket.send(JSON.stringify(frame));
  }

  /**
   * Leave the task's subscription on this connection, and learn when the last of its
   * frames has arrived. A subscribe again is answered by a new stream from its seq, but
   * the frames do not say which subscribe they answer, and those the gateway sent before
   * it read the subscribe come first: one of them taken by the handler the subscribe is
   * for (a snapshot: it is news to any handler) would skip the replay that follows. So:
   * an unsubscribe, after which the gateway sends the task nothing, then a sync (a
   * subscribe for an id that is no task), answered in its turn with an error naming it.
   * The task's frames before that answer are the old subscription's, those after it the
   * next subscribe's. Returns the sync's id.
   */
  #settle(taskId) {
    const id = `${SYNC_PREFIX}${++this.syncCount}`;
    this.#send({ op: "unsubscribe", task_id: taskId });
    this.#send({ op: "subscribe", task_id: id, after_seq: 0 });
    this.syncs.set(id, taskId);
    this.unsettled.set(taskId, id);
    return id;
  }

  #settled(id) {
    const taskId = this.syncs.get(id);
    this.syncs.delete(id);
    if (this.unsettled.get(taskId) === id) this.unsettled.delete(taskId);
    for (const h of this.subscriptions.get(taskId)?.handlers ?? []) {
      if (h.after === id) h.after = null;
    }
  }

  #receive(data) {
    let frame;
    try {
      frame = JSON.parse(data);
    } catch {
      return;
    }
    if (frame.type === "error" && this.syncs.has(frame.task_id)) {
      this.#settled(frame.task_id);
      return;
    }
    const sub = this.subscriptions.get(frame.task_id);
    if (!sub) return;
    if (frame.type === "event") {
      // Each handler takes only the seq that follows its own. The gateway sends a
      // subscription's events with no gap, but a subscribe again (for a handler that
      // came later, or the same task followed anew) restarts the stream: live events
      // sent before the gateway read it arrive first, and then the replay. Taking one
      // of those early ones because it is "newer" would skip the replay before it as
      // old. A snapshot stands for events no longer retained and carries the current
      // state: taken by any handler not at its seq already (one below a handler's seq
      // resets it: it was ahead of the database). A handler whose subscribe is not
      // answered yet takes nothing: the frame may be the old subscription's (#settle).
      for (const h of [...sub.handlers]) {
        if (h.after !== null) continue;
        if (frame.seq === h.lastSeq + 1 || (frame.snapshot && frame.seq !== h.lastSeq)) {
          h.lastSeq = frame.seq;
          safeCall(h.onEvent, frame);
        }
      }
      if (sub.handlers.size > 0) sub.lastSeq = Math.max(...[...sub.handlers].map((h) => h.lastSeq));
    } else if (frame.type === "error") {
      // Before the task's sync is answered, an error answers a subscribe sent before
      // the client left the task: the gateway keeps (or refuses) the task as the
      // subscribe sent after that says, whose answer is still to come.
      if (this.unsettled.has(frame.task_id)) return;
      // Not followed on the gateway (no such task, too many subscriptions, a bad
      // frame): forgotten here too, not resubscribed at the next reconnect.
      this.subscriptions.delete(frame.task_id);
      for (const h of sub.handlers) safeCall(h.onError, frame);
    }
  }
}

// The id as the gateway writes it in its frames: it reads any form Python's UUID() does
// (any case, braces, a "urn:uuid:" prefix, hyphens anywhere or none) and answers with
// the lower-case, hyphenated one. Not a UUID: as given, as the gateway's not_found
// names it.
function canonicalId(taskId) {
  const text = String(taskId);
  const hex = text.replace(/urn:/g, "").replace(/uuid:/g, "").replace(/^[{}]+|[{}]+$/g, "")
    .replace(/-/g, "").toLowerCase();
  if (!/^[0-9a-f]{32}$/.test(hex)) return text;
  return [hex.slice(0, 8), hex.slice(8, 12), hex.slice(12, 16), hex.slice(16, 20),
          hex.slice(20)].join("-");
}

function originOf(url) {
  try {
    const { origin } = new URL(url);
    return origin === "null" ? null : origin; // opaque: matches nothing
  } catch {
    return null; // "inline", "eval", or nothing
  }
}

function lowestSeq(sub) {
  return Math.min(...[...sub.handlers].map((h) => h.lastSeq));
}

function safeCall(fn, arg) {
  try {
    fn(arg);
  } catch (err) {
    console.error("longhaul: handler failed", err);
  }
}
