/**
 * webconnection-websocket.js — the browser side of wshub.
 *
 * Drop-in compatible with West Wind Web Connection's `WebConnectionWebSocket`:
 * code written against Web Connection runs unchanged. On top of the original:
 * the socket URL follows the page (ws: or wss:), or a hub the page names
 * (the `url` option, or `data-hub`: {@link hubFromDocument}), reconnects use capped
 * exponential backoff with jitter and follow the close code (see
 * {@link reconnectPolicy}), messages sent while disconnected are queued
 * (bounded) and sent on reopen, and `close()` stops reconnecting. With the
 * `resume` option the hub replays what a dropped socket missed (lossless
 * resume: {@link WebConnectionWebSocket}'s `onResumeHandler`).
 *
 * @module webconnection-websocket
 */

/** The socket path Web Connection uses (and wshub serves). */
export const SOCKET_PATH = "/__initializeWebSocket.wc";

/**
 * Connection states, in the order a connection usually goes through them.
 * @readonly
 * @enum {string}
 */
export const State = Object.freeze({
  /** Not connected, `tryConnect` not called yet. */
  IDLE: "idle",
  /** Opening the socket. */
  CONNECTING: "connecting",
  /** Open: `send` goes straight out. */
  OPEN: "open",
  /** Dropped; a reconnect is scheduled. */
  RECONNECTING: "reconnecting",
  /** Closed for good: `close()` called, dropped without `retryOnFail`, or
   *  closed with a code after which the library does not reconnect. */
  CLOSED: "closed",
});

const DEFAULTS = Object.freeze({
  url: null,
  document: null,
  token: null,
  tokenInProtocol: false,
  minReconnectDelay: 500,
  maxReconnectDelay: 30000,
  policyReconnectDelay: 10000,
  maxQueue: 100,
  presence: false,
  resume: false,
  storage: undefined,
});

/** The hub's presence actions (docs/presence.md). */
const PRESENCE_ACTIONS = new Set(["wshub.presence", "wshub.join", "wshub.leave"]);

/** How a hub with presence off answers the members request (`wshub.error`). */
const PRESENCE_OFF = "presence is off on this hub";

/**
 * `url` with `presence=1` added to its query (the socket opts in to
 * presence frames).
 * @param {string} url
 * @returns {string}
 */
export function withPresence(url) {
  return `${url}${url.includes("?") ? "&" : "?"}presence=1`;
}

/**
 * What the library does after the socket closed with a given code (with
 * `retryOnFail`; without it nothing reconnects).
 * @readonly
 * @enum {string}
 */
export const Reconnect = Object.freeze({
  /** Reconnect after the usual backoff delay. */
  BACKOFF: "backoff",
  /** Reconnect after `policyReconnectDelay` plus the usual delay. */
  LATER: "later",
  /** Stay closed: coming back would repeat the problem or undo what the server meant. */
  NEVER: "never",
});

// The README's close-code table says the same, and a unit test reads it to
// keep the two equal. 4000-4999 is the application range: wshub's own
// "reconnect" codes are listed, every other code there was chosen to end a
// session on purpose (session replaced, the server API's disconnect).
const RECONNECT_4XXX = new Set([4000, 4001]);
const NEVER = new Set([1002]);
const LATER = new Set([1008, 1013]);

/**
 * What to do after a close with `code`, as the README's close-code table
 * says: never after 1002 (the client broke the protocol) or an application
 * code other than 4000 and 4001 (4003 session replaced: two tabs of one
 * user would otherwise push each other out forever; 4005 disconnected by
 * the server); later after 1008 (rate limit) and 1013 (try again later);
 * otherwise with the usual backoff (1000 not asked for, 1001, 1006, 1009,
 * 1011, 4000, 4001, and unknown codes, where a transient failure is the
 * safe guess).
 * @param {number} code the close event's code
 * @returns {string} one of {@link Reconnect}
 */
export function reconnectPolicy(code) {
  if (NEVER.has(code)) return Reconnect.NEVER;
  if (LATER.has(code)) return Reconnect.LATER;
  if (code >= 4000 && code <= 4999 && !RECONNECT_4XXX.has(code)) return Reconnect.NEVER;
  return Reconnect.BACKOFF;
}

/**
 * Builds the socket URL.
 * @param {{protocol: string, host: string}} location the page's location
 * @param {string|null} base an explicit `ws(s)://host[:port]` (or `http(s)://`) to use instead
 * @param {string|null|undefined} groupId left out when empty
 * @param {string|null|undefined} userId left out when empty
 * @param {string|null} [token] a JWT for a hub in token mode, added as `token=`
 * @param {Record<string, string>|null} [resume] positions to resume from, added as
 *   `resume=<URL-encoded JSON>`, or `resume=` (empty) when there are none; without
 *   (null, the default) no `resume` parameter: the socket does not speak resume
 * @returns {string}
 */
export function buildUrl(location, base, groupId, userId, token = null, resume = null) {
  let root;
  if (base) {
    root = String(base).replace(/^http(s?):/i, "ws$1:").replace(/\/+$/, "");
    if (!/\.wc$|\/ws$/i.test(root)) root += SOCKET_PATH;
  } else {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    root = `${scheme}//${location.host}${SOCKET_PATH}`;
  }
  const params = [];
  if (groupId) params.push(`groupid=${encodeURIComponent(groupId)}`);
  if (userId) params.push(`userid=${encodeURIComponent(userId)}`);
  if (token) params.push(`token=${encodeURIComponent(token)}`);
  if (resume) {
    const keys = Object.keys(resume);
    params.push(keys.length ? `resume=${encodeURIComponent(JSON.stringify(resume))}` : "resume=");
  }
  return params.length ? `${root}?${params.join("&")}` : root;
}

/**
 * The topic keys a socket is reached through (lossless resume): `all`
 * (everyone), its group's (`group:<G>`, or `nullgroup` without a group) and
 * its user's (`user:<U>`, when the user id is known). Ids are used exactly as
 * given.
 * @param {string|null|undefined} groupId
 * @param {string|null|undefined} userId
 * @returns {string[]}
 */
export function topicKeys(groupId, userId) {
  const keys = ["all", groupId === null || groupId === undefined ? "nullgroup" : `group:${groupId}`];
  if (userId !== null && userId !== undefined && userId !== "") keys.push(`user:${userId}`);
  return keys;
}

const POSITION = /^([^:]+):(\d+)$/;

/** Whether `key` is a topic key ({@link topicKeys}). */
function isTopicKey(key) {
  return typeof key === "string"
    && (key === "all" || key === "nullgroup" || key.startsWith("group:") || key.startsWith("user:"));
}

/**
 * Whether `next` is a position to keep over `current` (both `"<epoch>:<offset>"`):
 * always when there is none yet or the epoch changed, else when its offset is
 * higher. Offsets are compared as decimal strings, so any u64 is exact.
 * @param {string} next
 * @param {string|undefined} current
 * @returns {boolean}
 */
export function isNewerPosition(next, current) {
  const n = POSITION.exec(next);
  if (!n) return false;
  const c = current === undefined ? null : POSITION.exec(current);
  if (!c || c[1] !== n[1]) return true;
  const a = n[2].replace(/^0+(?=\d)/, "");
  const b = c[2].replace(/^0+(?=\d)/, "");
  return a.length !== b.length ? a.length > b.length : a > b;
}

/**
 * Throws what a browser's `WebSocket.close` throws for a code or reason it
 * refuses (for `close()` with no socket to ask).
 * @param {number|undefined} code
 * @param {string|undefined} reason
 */
function refuseClose(code, reason) {
  if (code !== undefined) {
    // As WebIDL reads a `[Clamp] unsigned short`: a number (a string of
    // digits too), clamped to 0-65535, rounded half to even.
    let n = Number(code);
    if (Number.isNaN(n)) n = 0;
    n = Math.min(Math.max(n, 0), 65535);
    const floor = Math.floor(n);
    const rest = n - floor;
    n = rest > 0.5 || (rest === 0.5 && floor % 2 === 1) ? floor + 1 : floor;
    if (n !== 1000 && !(n >= 3000 && n <= 4999)) {
      throw new DOMException(`The close code must be 1000 or between 3000 and 4999; ${code} is neither.`, "InvalidAccessError");
    }
  }
  if (reason !== undefined && new TextEncoder().encode(String(reason)).length > 123) {
    throw new DOMException("The close reason must not be longer than 123 bytes.", "SyntaxError");
  }
}

/** What `sessionStorage` keys the library's resume positions start with. */
export const RESUME_STORAGE_PREFIX = "wshub.resume:";

/**
 * The `sessionStorage` key of the positions of one identity on one hub: the
 * socket URL without its query, the group and the user as passed to
 * `tryConnect`. Two identities (or two hubs) in one tab keep apart.
 * @param {string} root the socket URL without query
 * @param {string|null} groupId
 * @param {string|null} userId
 * @returns {string}
 */
export function resumeStorageKey(root, groupId, userId) {
  return RESUME_STORAGE_PREFIX + JSON.stringify([root, groupId ?? null, userId ?? null]);
}

/** Where this file was loaded from (the hub, when a page imports it from there). */
const LIBRARY_URL = import.meta.url;

/**
 * The hub a page names with a `data-hub` attribute on a `<script>` element,
 * for pages that load the library from a hub on another origin:
 * `<script type="module" data-hub>` (empty) means "the origin this library
 * was loaded from" (or, on a `<script src>` element, the origin of its
 * `src`); `data-hub="wss://hub.example.com"` names the hub. Without such an
 * element there is none (`null`), and the socket goes to the page's own host,
 * as in Web Connection: copying the file to a CDN must not move the socket.
 * @param {{querySelector(sel: string): any}|null|undefined} doc the page's document
 * @param {string} [libraryUrl] where the library came from (`import.meta.url`)
 * @returns {string|null} a hub base URL for {@link buildUrl}, or null
 */
export function hubFromDocument(doc, libraryUrl = LIBRARY_URL) {
  const el = doc && typeof doc.querySelector === "function" ? doc.querySelector("script[data-hub]") : null;
  if (!el) return null;
  const named = String(el.getAttribute("data-hub") ?? "").trim();
  if (named) return named;
  try {
    const origin = new URL(el.src || libraryUrl).origin;
    return /^https?:/i.test(origin) ? origin : null;
  } catch {
    return null;
  }
}

/**
 * The delay before reconnect attempt `attempt` (0-based): exponential from
 * `min`, capped at `max`, with "equal jitter" (between half and all of it)
 * so that clients dropped together do not come back together.
 * @param {number} attempt
 * @param {number} min
 * @param {number} max
 * @param {() => number} [random] returns [0, 1)
 * @returns {number} milliseconds
 */
export function backoffDelay(attempt, min, max, random = Math.random) {
  const ceiling = Math.min(max, min * 2 ** Math.min(attempt, 30));
  return Math.round(ceiling / 2 + random() * (ceiling / 2));
}

/**
 * A message as the hub relays it. `JSON.stringify` writes exactly
 * `userId, groupId, action, message, recipients` (the method is not
 * serialised).
 */
export class BroadcastMessage {
  /**
   * @param {string} action
   * @param {string} message
   * @param {string|null} userId
   * @param {string|null} groupId
   */
  constructor(action, message, userId = null, groupId = null) {
    /** @type {string|null} */ this.userId = userId;
    /** @type {string|null} */ this.groupId = groupId;
    /** @type {string} */ this.action = action;
    /** @type {string} */ this.message = message;
    /** @type {{type: string, value: string}[]} */ this.recipients = [];
  }

  /**
   * Adds a recipient. Without any, the message goes to everyone.
   * @param {string|null} value a group id, user id or connection id (`null` or `""`:
   *   the sockets that connected without a group)
   * @param {"group"|"user"|"excludeUser"|"allButUser"|"allExceptUser"|"connection"|0|1|2} [type="group"]
   *   names in any letter case; `allButUser` and `allExceptUser` mean `excludeUser`;
   *   `connection` is one socket (docs/api.md, connection ids); 0 = excludeUser, 1 = group, 2 = user
   * @returns {BroadcastMessage} this, for chaining
   */
  addRecipient(value, type = "group") {
    this.recipients.push({ type, value });
    return this;
  }
}

/**
 * A WebSocket connection to the hub.
 *
 * ```js
 * const ws = new WebConnectionWebSocket();
 * ws.onMessageHandler = (msg) => console.log(msg.action, msg.message);
 * ws.tryConnect(true, "chat", "ann");
 * const msg = ws.createBroadcastMessage("broadcastchatmessage", "hi");
 * msg.addRecipient("chat", "group");
 * ws.send(msg);
 * ```
 */
export class WebConnectionWebSocket {
  /**
   * @param {object} [options]
   * @param {boolean} [options.resume=false] lossless resume: keep the positions the hub
   *   sends (in memory and in `sessionStorage`, so a reload resumes too) and connect
   *   with them, so that the hub replays what a dropped socket missed; see
   *   `onResumeHandler`, `onGapHandler` and `positions`. Off: nothing changes.
   * @param {{getItem(key: string): string|null, setItem(key: string, value: string): void}|null} [options.storage]
   *   where `resume` keeps positions across reloads (default `sessionStorage`;
   *   `null`: in memory only)
   * @param {string|null} [options.url] hub base URL (`wss://hub.example.com`); default: what a
   *   `data-hub` attribute says (see {@link hubFromDocument}), else the page's own host
   * @param {number} [options.minReconnectDelay=500] ms before the first reconnect attempt (at most)
   * @param {number} [options.maxReconnectDelay=30000] cap on the reconnect delay, ms
   * @param {number} [options.policyReconnectDelay=10000] added to the delay after 1008
   *   (rate limit) and 1013 (try again later), ms
   * @param {number} [options.maxQueue=100] messages kept while disconnected; `send` returns false beyond
   * @param {string|(() => string)|null} [options.token] a JWT for a hub in token mode, or a function
   *   returning a fresh one (called on every connect and reconnect)
   * @param {boolean} [options.tokenInProtocol=false] send the token in `Sec-WebSocket-Protocol`
   *   instead of the URL (keeps it out of access logs)
   * @param {typeof WebSocket} [options.WebSocket] WebSocket implementation (for tests and Node.js)
   * @param {{protocol: string, host: string}} [options.location] page location (for tests and Node.js)
   * @param {{querySelector(sel: string): any}} [options.document] page document, read for `data-hub`
   *   (for tests and Node.js)
   * @param {boolean} [options.presence=false] cluster presence (docs/presence.md): opt the socket in
   *   (`presence=1`), ask for the group's members on every open, and keep {@link members} up to
   *   date from that snapshot and the `wshub.join`/`wshub.leave` frames (ordered by `v`); presence
   *   frames go to `onPresenceHandler`, not `onMessageHandler`
   */
  constructor(options = {}) {
    this.options = { ...DEFAULTS, ...options };
    /** Called with each parsed message object. @type {(msg: object) => void} */
    this.onMessageHandler = null;
    /** Called when the socket opens (also after each reconnect). @type {(ev: Event) => void} */
    this.onOpenHandler = null;
    /** Called when the socket closes, also after `close()`; `ev.code` says why and
     *  `state` what happens next. @type {(ev: CloseEvent) => void} */
    this.onCloseHandler = null;
    /** Called when a frame is not JSON. @type {(data: string, err: Error) => void} */
    this.onErrorHandler = null;
    /** With `presence`: called after each change of {@link members}, with
     *  `{type: "snapshot"|"join"|"leave", userId, v, members}` (`userId` null for a snapshot).
     *  @type {(ev: object) => void} */
    this.onPresenceHandler = null;
    /** With `presence`: called, with the hub's text, when the hub has presence off (on each
     *  open); the hub's `wshub.error` then does not reach `onMessageHandler`. Unset, it does.
     *  Either way {@link members} is then empty.
     *  @type {(message: string) => void} */
    this.onPresenceOffHandler = null;
    /** Presence: the members by user id, the snapshot's `v` (null until it
     *  arrived), the last `v` applied, and events that came before it. */
    this._presence = { members: new Map(), v: null, last: null, early: [] };
    /** With `resume`: called once per connection, before any message, with
     *  `{recovered, replayed, node}`. `recovered` true: every message missed
     *  since the last connection follows (`replayed` of them), once, in order;
     *  false: nothing is replayed and messages sent meanwhile may be missing.
     *  @type {(info: {recovered: boolean, replayed: number, node: string|null}) => void} */
    this.onResumeHandler = null;
    /** With `resume`: called when the hub found that this open socket missed
     *  messages it cannot replay; `info.topics` names the topic keys.
     *  @type {(info: {topics: string[]}) => void} */
    this.onGapHandler = null;
    /** The underlying socket, when there is one. @type {WebSocket|null} */
    this.socket = null;
    /** @type {string} one of {@link State} */
    this.state = State.IDLE;
    this.groupId = null;
    this.userId = null;
    this._retry = false;
    this._attempt = 0;
    this._timer = null;
    this._queue = [];
    /** The socket `close()` closed, until its close event is reported. */
    this._closing = null;
    /** With `resume`: the last position seen per topic key, for `_scope`. */
    this._positions = {};
    /** The storage key `_positions` belong to (null: none loaded yet). */
    this._scope = null;
    /** The topic keys of this connection's identity (positions of others are not kept). */
    this._tracked = new Set();
    /** The user id the hub assigned (welcome) when `tryConnect` named none. */
    this._assignedUserId = null;
  }

  /**
   * Opens the connection. On a client that is already connected (or
   * connecting) the old socket is closed first, with 1000; nothing it still
   * delivers reaches the handlers, and its close is not reported.
   * @param {boolean} retryOnFail reconnect (with backoff) when the socket drops,
   *   as the close code allows (see {@link reconnectPolicy})
   * @param {string} [groupId] the group to join; left out when empty
   * @param {string} [userId] the user id; the hub assigns one when empty
   */
  tryConnect(retryOnFail, groupId, userId) {
    this._discard();
    // Messages queued for another identity are not sent as this one: their
    // recipients were chosen for the old group or user (a review saw a
    // message queued in one room reach it from a page that had moved on).
    // (Before the first tryConnect there is no old identity.)
    const moved = this.groupId !== (groupId || null) || this.userId !== (userId || null);
    if (moved && this.state !== State.IDLE) this._queue = [];
    this._retry = !!retryOnFail;
    this.groupId = groupId || null;
    this.userId = userId || null;
    this._attempt = 0;
    clearTimeout(this._timer);
    if (this.options.resume) this._loadPositions();
    this._open();
  }

  /**
   * With `resume`: the last position seen per topic key of this connection's
   * identity (`all`, `group:<G>` or `nullgroup`, `user:<U>`), as sent back to
   * the hub on reconnect. A copy; empty without `resume` or before any.
   * @returns {Record<string, string>}
   */
  get positions() {
    return { ...this._positions };
  }

  _storage() {
    if (this.options.storage !== undefined) return this.options.storage;
    // Reading sessionStorage throws where storage is disabled (sandboxed
    // frames, some privacy settings): keep positions in memory only there.
    try {
      return globalThis.sessionStorage ?? null;
    } catch {
      return null;
    }
  }

  /** The socket URL without query: what positions are kept per, with the ids. */
  _root() {
    return buildUrl(this.options.location || globalThis.location,
      this.options.url || hubFromDocument(this.options.document || globalThis.document), null, null);
  }

  /**
   * Switches to the positions of the identity `tryConnect` was given
   * (memory, else storage). A page loaded again (a reload) also takes back
   * the identity the hub gave its last socket: the user id it assigned,
   * and with a token the token's group and user, which `tryConnect` does
   * not name (without them the reloaded page sent no `user:` position, or
   * no group position, and was never recovered: review of 2026-12-02).
   */
  _loadPositions() {
    const scope = resumeStorageKey(this._root(), this.groupId, this.userId);
    if (scope === this._scope) {
      // The same `tryConnect` again on this page. Without a token, one that
      // names no user asks the hub for a new one; with a token, the token
      // says who the socket is, as before.
      if (!this.options.token) {
        this._assignedUserId = null;
        this._tracked = new Set(topicKeys(this.groupId, this.userId));
      }
      return;
    }
    this._scope = scope;
    this._positions = {};
    this._assignedUserId = null;
    this._tracked = new Set(topicKeys(this.groupId, this.userId));
    let stored = null;
    try {
      stored = JSON.parse(this._storage()?.getItem(scope) ?? "null");
    } catch {
      stored = null;
    }
    if (!stored || typeof stored !== "object") return;
    const saved = stored.positions;
    if (!saved || typeof saved !== "object") return;
    for (const [key, value] of Object.entries(saved)) {
      if (typeof value === "string" && POSITION.test(value)) this._positions[key] = value;
    }
    if (!this.userId && typeof stored.assigned === "string" && stored.assigned) {
      this._assignedUserId = stored.assigned;
    }
    const tracked = Array.isArray(stored.tracked) ? stored.tracked.filter(isTopicKey) : [];
    if (tracked.includes("all")) this._tracked = new Set(tracked);
  }

  _savePositions() {
    try {
      const saved = { positions: this._positions, tracked: [...this._tracked], assigned: this._assignedUserId };
      this._storage()?.setItem(this._scope, JSON.stringify(saved));
    } catch {
      // Full or disabled storage: the positions are still kept in memory.
    }
  }

  /**
   * What to send as `resume=`: the positions of this identity's topics, as
   * the last welcome named them (a token's group, a user the hub assigned).
   */
  _resumeParam() {
    const out = {};
    for (const key of this._tracked) {
      if (this._positions[key] !== undefined) out[key] = this._positions[key];
    }
    return out;
  }

  /** `wshub.welcome`: the hub's word on this connection's resume, and its positions. */
  _welcome(msg) {
    let info = null;
    try {
      info = JSON.parse(msg.message);
    } catch {
      info = null;
    }
    if (!info || typeof info !== "object") info = {};
    // The identity the hub gave the socket: its user id when tryConnect
    // named none (reconnects then keep it, so its user topic resumes too).
    // The topics are those of the welcome's group and user: with a token
    // they are the token's, whatever tryConnect named (a page that still
    // passed its own user id tracked that user's topic, not the token's,
    // and no resume was ever recovered).
    const group = "groupId" in msg ? msg.groupId : this.groupId;
    const given = typeof msg.userId === "string" && msg.userId ? msg.userId : null;
    if (!this.userId && given) this._assignedUserId = given;
    this._tracked = new Set(topicKeys(group, given || this.userId || this._assignedUserId));
    const tops = info.positions && typeof info.positions === "object" ? info.positions : {};
    this._positions = {};
    for (const key of this._tracked) {
      const value = tops[key];
      if (typeof value === "string" && POSITION.test(value)) this._positions[key] = value;
    }
    this._savePositions();
    const replayed = Number(info.replayed);
    const result = {
      recovered: info.recovered === true,
      replayed: Number.isFinite(replayed) && replayed > 0 ? replayed : 0,
      node: typeof info.node === "string" ? info.node : null,
    };
    if (this.onResumeHandler) this.onResumeHandler(result);
  }

  /**
   * `wshub.gap`: messages this open socket missed and cannot be replayed.
   * Its `positions` (where each topic goes on from, after the loss) are
   * kept like a message's `pos`: the next resume asks only for what
   * follows, and is recovered when nothing more was missed.
   */
  _gap(msg) {
    let info = null;
    try {
      info = JSON.parse(msg.message);
    } catch {
      info = null;
    }
    if (!info || typeof info !== "object" || Array.isArray(info)) info = {};
    const topics = Array.isArray(info.topics) ? info.topics.filter((t) => typeof t === "string") : [];
    this._advance(info.positions);
    if (this.onGapHandler) this.onGapHandler({ ...info, topics });
  }

  /** A message's `pos`: keeps the positions of the topics this socket tracks. */
  _advance(pos) {
    if (!pos || typeof pos !== "object") return;
    let changed = false;
    for (const [key, value] of Object.entries(pos)) {
      if (!this._tracked.has(key) || typeof value !== "string") continue;
      if (!isNewerPosition(value, this._positions[key])) continue;
      this._positions[key] = value;
      changed = true;
    }
    if (changed) this._savePositions();
  }

  /** The URL `tryConnect` connects to (with the token, unless it goes in the protocol). @returns {string} */
  get url() {
    return this._url(this.options.tokenInProtocol ? null : this._token());
  }

  _url(token) {
    const location = this.options.location || globalThis.location;
    const base = this.options.url || hubFromDocument(this.options.document || globalThis.document);
    const url = this.options.resume
      ? buildUrl(location, base, this.groupId, this.userId || this._assignedUserId, token, this._resumeParam())
      : buildUrl(location, base, this.groupId, this.userId, token);
    return this.options.presence ? withPresence(url) : url;
  }

  _token() {
    const { token } = this.options;
    return typeof token === "function" ? token() : token;
  }

  _open() {
    const Impl = this.options.WebSocket || globalThis.WebSocket;
    this.state = State.CONNECTING;
    let socket;
    try {
      const token = this._token();
      socket = this.options.tokenInProtocol && token
        ? new Impl(this._url(null), ["wshub", `wshub.jwt.${token}`])
        : new Impl(this._url(token));
    } catch (err) {
      // A URL that cannot be made (an id with a lone UTF-16 surrogate:
      // URIError) or that the browser refuses (SyntaxError, SecurityError)
      // would fail the same way on every retry: reported, not retried.
      if (["URIError", "SyntaxError", "SecurityError"].includes(err?.name)) this._retry = false;
      this._dropped({ code: 1006, reason: String(err), wasClean: false });
      return;
    }
    this.socket = socket;
    socket.onopen = (ev) => {
      if (this.socket !== socket) return;
      this.state = State.OPEN;
      this._attempt = 0;
      if (this.options.presence) this._presenceOpened(socket);
      const queued = this._queue.splice(0);
      for (const text of queued) socket.send(text);
      if (this.onOpenHandler) this.onOpenHandler(ev);
    };
    socket.onmessage = (ev) => {
      if (this.socket !== socket) return;
      let msg;
      try {
        msg = JSON.parse(ev.data);
      } catch (err) {
        if (this.onErrorHandler) this.onErrorHandler(ev.data, err);
        return;
      }
      if (this.options.resume && msg && typeof msg === "object") {
        // The hub's own frames carry no `pos`; every relayed message does
        // (an empty one to a connection), whatever its action: a backend
        // may send wshub.* actions, and they are messages.
        if (!("pos" in msg)) {
          if (msg.action === "wshub.welcome") return this._welcome(msg);
          if (msg.action === "wshub.gap") return this._gap(msg);
        } else {
          this._advance(msg.pos);
          delete msg.pos;
        }
      }
      if (this.options.presence && msg && PRESENCE_ACTIONS.has(msg.action)) {
        this._presenceFrame(msg);
        return;
      }
      if (
        this.options.presence &&
        msg &&
        msg.action === "wshub.error" &&
        typeof msg.message === "string" &&
        msg.message.startsWith(PRESENCE_OFF)
      ) {
        // The answer to the library's own request. No members are known
        // on such a hub (a list from a hub it replaced would stay frozen);
        // the text goes to the page's handler for it when it has one (a
        // new handler, so that pages written before it still get it in
        // onMessageHandler, as they did).
        this._presence = { members: new Map(), v: null, last: null, early: [] };
        if (this.onPresenceOffHandler) {
          this.onPresenceOffHandler(msg.message);
          return;
        }
      }
      if (this.onMessageHandler) this.onMessageHandler(msg);
    };
    socket.onclose = (ev) => {
      if (this.socket !== socket) return;
      this.socket = null;
      this._dropped(ev);
    };
  }

  /**
   * With `presence`: the group's members as last known, sorted by user id
   * (`connections` as of the last snapshot; a user who joined since counts 1).
   * Empty until the first snapshot arrived.
   * @returns {{userId: string, connections: number}[]}
   */
  get members() {
    return [...this._presence.members.entries()]
      .sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))
      .map(([userId, connections]) => ({ userId, connections }));
  }

  /** A new socket opened: ask for the group's members (events until the
   *  answer are kept and applied on top of it, by `v`). */
  _presenceOpened(socket) {
    this._presence = { members: this._presence.members, v: null, last: null, early: [] };
    socket.send(JSON.stringify({ action: "wshub.presence" }));
  }

  _presenceFrame(msg) {
    let body;
    try {
      body = JSON.parse(msg.message);
    } catch (err) {
      if (this.onErrorHandler) this.onErrorHandler(msg.message, err);
      return;
    }
    const p = this._presence;
    if (msg.action === "wshub.presence") {
      // The hub also sends the list unasked, when a group that was too big
      // for join/leave frames is back at `max_members_events` members: a
      // list no newer than what `members` shows is ignored.
      if (p.v !== null && !(body.v > p.last)) return;
      p.members = new Map((body.members || []).map((m) => [m.userId, m.connections]));
      p.v = p.last = body.v;
      const early = p.early.splice(0);
      this._presenceChanged({ type: "snapshot", userId: null, v: body.v });
      for (const ev of early) this._presenceEvent(ev.joined, ev.userId, ev.v);
      return;
    }
    const joined = msg.action === "wshub.join";
    if (p.v === null) {
      p.early.push({ joined, userId: body.userId, v: body.v });
      return;
    }
    this._presenceEvent(joined, body.userId, body.v);
  }

  /** Applies a join or leave newer than what `members` already shows. */
  _presenceEvent(joined, userId, v) {
    const p = this._presence;
    if (!(v > p.last)) return;
    p.last = v;
    if (joined) {
      if (!p.members.has(userId)) p.members.set(userId, 1);
    } else {
      p.members.delete(userId);
    }
    this._presenceChanged({ type: joined ? "join" : "leave", userId, v });
  }

  _presenceChanged(ev) {
    if (this.onPresenceHandler) this.onPresenceHandler({ ...ev, members: this.members });
  }

  /** Closes the current socket (if any) without a trace: its events go nowhere. */
  _discard() {
    const socket = this.socket;
    this.socket = null;
    this._closing = null;
    if (!socket) return;
    socket.onopen = socket.onmessage = socket.onclose = null;
    socket.close(1000, "Socket closed");
  }

  _dropped(ev) {
    const policy = this._retry ? reconnectPolicy(ev.code) : Reconnect.NEVER;
    // The state changes before the handler runs, so that the handler sees
    // what happens next (reconnecting or closed).
    this.state = policy === Reconnect.NEVER ? State.CLOSED : State.RECONNECTING;
    if (this.onCloseHandler) this.onCloseHandler(ev);
    // The handler may have called tryConnect() or close().
    if (this.state !== State.RECONNECTING || this.socket) return;
    const { minReconnectDelay, maxReconnectDelay, policyReconnectDelay } = this.options;
    const delay = backoffDelay(this._attempt++, minReconnectDelay, maxReconnectDelay)
      + (policy === Reconnect.LATER ? policyReconnectDelay : 0);
    this._timer = setTimeout(() => {
      if (this.state === State.RECONNECTING) this._open();
    }, delay);
  }

  /**
   * Creates a message to send; add recipients with `addRecipient`.
   * @param {string} action `broadcast` is relayed by the hub; other actions
   *   go to the application's backend when the hub has one
   * @param {string} message the payload (structured data as JSON text)
   * @returns {BroadcastMessage}
   */
  createBroadcastMessage(action, message) {
    return new BroadcastMessage(action, message, this.userId, this.groupId);
  }

  /**
   * Sends a message object (as `JSON.stringify(msg)`) or a string as is.
   * While the socket is not open the message is queued and sent on (re)open.
   * @param {object|string} msg
   * @returns {boolean} false when the queue is full (the message is not sent)
   */
  send(msg) {
    const text = typeof msg === "string" ? msg : JSON.stringify(msg);
    const OPEN = 1;
    if (this.socket && this.socket.readyState === OPEN) {
      this.socket.send(text);
      return true;
    }
    if (this.state === State.CLOSED || this._queue.length >= this.options.maxQueue) return false;
    this._queue.push(text);
    return true;
  }

  /** Messages waiting for the socket to open. @returns {number} */
  get queued() {
    return this._queue.length;
  }

  /**
   * Closes the socket and stops reconnecting; queued messages are dropped.
   * `state` is `closed` at once; `onCloseHandler` runs once the socket has
   * closed, with the browser's close event, unless `tryConnect` was called
   * in between. With no socket (a reconnect was pending) there is nothing
   * new to report: the handler already ran for the drop.
   * A code or reason the browser refuses throws its error, and nothing
   * changes: the socket stays open and connected as before.
   * @param {number} [code=1000] 1000 or 3000-4999, as browsers allow
   * @param {string} [reason] at most 123 bytes of UTF-8, as browsers allow
   */
  close(code = 1000, reason = "Socket closed") {
    const socket = this.socket;
    // First: a browser throws (InvalidAccessError, SyntaxError) for a code
    // or reason it refuses, before it closes anything. Called last, it left
    // an open socket nobody held any more behind a `closed` state, still
    // receiving the user's messages (review of 2026-12-03). Without a
    // socket (a reconnect pending) the same rules, checked here.
    if (socket) socket.close(code, reason);
    else refuseClose(code, reason);
    this._retry = false;
    this._queue = [];
    clearTimeout(this._timer);
    this.socket = null;
    this.state = State.CLOSED;
    if (!socket) return;
    this._closing = socket;
    // The close event comes later, in a task of its own: set in time.
    socket.onopen = socket.onmessage = null;
    socket.onclose = (ev) => {
      if (this._closing !== socket) return;
      this._closing = null;
      if (this.onCloseHandler) this.onCloseHandler(ev);
    };
  }
}

export default WebConnectionWebSocket;
