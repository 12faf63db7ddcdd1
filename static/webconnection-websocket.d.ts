// Type declarations for webconnection-websocket.js (wshub's browser library).

export declare const SOCKET_PATH: "/__initializeWebSocket.wc";

export declare const State: Readonly<{
  IDLE: "idle";
  CONNECTING: "connecting";
  OPEN: "open";
  RECONNECTING: "reconnecting";
  CLOSED: "closed";
}>;
export type ConnectionState = (typeof State)[keyof typeof State];

/**
 * The recipient type names the hub accepts (src/message.rs), in any letter
 * case; `allButUser` and `allExceptUser` (named in Web Connection's docs)
 * mean `excludeUser`; `connection` names one socket by its connection id
 * (docs/api.md, "Connection ids").
 */
export type RecipientTypeName = "group" | "user" | "excludeUser" | "allButUser" | "allExceptUser" | "connection";

/** The integer types: 0 = excludeUser, 1 = group, 2 = user. */
export type RecipientTypeNumber = 0 | 1 | 2;

/** Every recipient type the hub accepts, in the spellings an editor can check. */
export type RecipientType =
  | RecipientTypeName
  | Lowercase<RecipientTypeName>
  | Uppercase<RecipientTypeName>
  | Capitalize<RecipientTypeName>
  | RecipientTypeNumber;

export interface Recipient {
  /** As sent; the hub writes the canonical name (`group`, `user`, `excludeUser`) in what it relays. A missing or null type is `group`. */
  type?: RecipientType | null;
  /** `null` and `""` both mean "no group" for a group recipient. */
  value: string | null;
}

/** A message as the hub delivers it to `onMessageHandler`. */
export interface HubMessage {
  userId: string | null;
  groupId: string | null;
  action: string | null;
  message: string | null;
  recipients: Recipient[];
}

export declare class BroadcastMessage implements HubMessage {
  constructor(action: string, message: string, userId?: string | null, groupId?: string | null);
  userId: string | null;
  groupId: string | null;
  action: string;
  message: string;
  recipients: Recipient[];
  /** Adds a recipient (type defaults to "group"). Without any, everyone receives it. */
  addRecipient(value: string | null, type?: RecipientType): this;
}

/**
 * A topic key of lossless resume: `all` (everyone), `nullgroup` (sockets
 * without a group), `group:<G>`, `user:<U>` (ids exactly as given).
 */
export type TopicKey = "all" | "nullgroup" | `group:${string}` | `user:${string}`;

/** A position in a topic's history: `"<epoch>:<offset>"`. */
export type Position = `${string}:${number}`;

/** What `onResumeHandler` is told once per connection, before any message. */
export interface ResumeInfo {
  /** True: every message missed since the last connection follows, once, in order. False:
   *  nothing is replayed, and messages sent while disconnected may be missing. */
  recovered: boolean;
  /** How many messages are replayed (0 when not recovered). */
  replayed: number;
  /** The hub node the socket is on, when it said. */
  node: string | null;
}

/** What `onGapHandler` is told: this open socket missed messages the hub cannot replay. */
export interface GapInfo {
  /** The topic keys with missing messages. */
  topics: string[];
  /**
   * Where each of those topics goes on from, after what was lost (absent
   * when the hub cannot say). The library has already taken them as the
   * topics' positions, so the next resume asks only for what follows.
   */
  positions?: { [topicKey: string]: string };
}

/** Where `resume` keeps positions across reloads (`sessionStorage` has this shape). */
export interface PositionStorage {
  getItem(key: string): string | null;
  setItem(key: string, value: string): void;
}

export interface WebConnectionWebSocketOptions {
  /**
   * Lossless resume (default false): keep the positions the hub sends, in memory
   * and in `storage` (so a reload resumes too), and connect with them (`resume=`),
   * so that the hub replays what a dropped socket missed. `pos` is removed from
   * messages before `onMessageHandler` sees them; the hub's `wshub.welcome` and
   * `wshub.gap` frames go to `onResumeHandler` and `onGapHandler` instead.
   */
  resume?: boolean;
  /** Where `resume` keeps positions (default `sessionStorage`; null: memory only). */
  storage?: PositionStorage | null;
  /** Hub base URL (`wss://hub.example.com`); default: what a `<script data-hub>`
   *  says (see `hubFromDocument`), else the page's own host. */
  url?: string | null;
  /** Upper bound of the first reconnect delay, ms (default 500). */
  minReconnectDelay?: number;
  /** Cap on the reconnect delay, ms (default 30000). */
  maxReconnectDelay?: number;
  /** Added to the reconnect delay after close code 1008 (rate limit) or 1013 (try again later), ms (default 10000). */
  policyReconnectDelay?: number;
  /** Messages kept while disconnected (default 100). */
  maxQueue?: number;
  /** A JWT for a hub in token mode, or a function returning a fresh one (called on every (re)connect). */
  token?: string | (() => string) | null;
  /** Send the token in Sec-WebSocket-Protocol instead of the URL (keeps it out of access logs). */
  tokenInProtocol?: boolean;
  /** WebSocket implementation (tests, Node.js). */
  WebSocket?: typeof WebSocket;
  /** Page location (tests, Node.js). */
  location?: { protocol: string; host: string };
  /** Page document, read for `data-hub` (tests, Node.js). */
  document?: { querySelector(selector: string): unknown } | null;
  /** Cluster presence (docs/presence.md): opt in with `presence=1`, ask for the group's members on
   *  every open, keep `members` up to date; presence frames go to `onPresenceHandler` only. */
  presence?: boolean;
}

/** One member of the socket's group. */
export interface PresenceMember {
  userId: string;
  /** Open sockets in the group across the cluster, as of the last snapshot (1 for a user who joined since). */
  connections: number;
}

/** What `onPresenceHandler` receives after each change of `members`. */
export interface PresenceEvent {
  type: "snapshot" | "join" | "leave";
  /** The user who joined or left; null for a snapshot. */
  userId: string | null;
  /** The group's version: grows with every change. */
  v: number;
  members: PresenceMember[];
}

export declare class WebConnectionWebSocket {
  constructor(options?: WebConnectionWebSocketOptions);
  onMessageHandler: ((msg: HubMessage) => void) | null;
  onOpenHandler: ((ev: Event) => void) | null;
  /** Runs on every close, also after `close()`; `state` already says what happens next. */
  onCloseHandler: ((ev: CloseEvent) => void) | null;
  onErrorHandler: ((data: string, err: Error) => void) | null;
  /** With `presence`: called after each change of `members`. */
  onPresenceHandler: ((ev: PresenceEvent) => void) | null;
  /** With `presence`: called with the hub's text when the hub has presence off (on each open);
   *  that `wshub.error` then does not reach `onMessageHandler` (it does while this is unset).
   *  Either way `members` is then empty. */
  onPresenceOffHandler: ((message: string) => void) | null;
  /** With `presence`: the group's members, sorted by user id (empty until the first snapshot). */
  readonly members: PresenceMember[];
  /** With `resume`: once per connection, before any message. */
  onResumeHandler: ((info: ResumeInfo) => void) | null;
  /** With `resume`: the open socket missed messages that cannot be replayed. */
  onGapHandler: ((info: GapInfo) => void) | null;
  /** With `resume`: the last position seen per topic key of this identity (a copy; empty without). */
  readonly positions: Readonly<Partial<Record<TopicKey, Position>>>;
  readonly socket: WebSocket | null;
  readonly state: ConnectionState;
  readonly groupId: string | null;
  readonly userId: string | null;
  readonly url: string;
  readonly queued: number;
  /** Opens the connection; an existing socket is closed first, silently. */
  tryConnect(retryOnFail: boolean, groupId?: string | null, userId?: string | null): void;
  createBroadcastMessage(action: string, message: string): BroadcastMessage;
  /** Returns false when the message could not be sent or queued. */
  send(msg: object | string): boolean;
  /**
   * Closes (1000 unless told; 3000-4999 allowed, a reason of at most 123
   * bytes) and stops reconnecting. A code or reason the browser refuses
   * throws its error (InvalidAccessError, SyntaxError) and changes nothing.
   */
  close(code?: number, reason?: string): void;
}

export declare function buildUrl(
  location: { protocol: string; host: string },
  base: string | null | undefined,
  groupId?: string | null,
  userId?: string | null,
  token?: string | null,
  /** Positions to resume from (`{}` sends `resume=`); null or absent: no `resume` parameter. */
  resume?: Readonly<Partial<Record<TopicKey, string>>> | null,
): string;

/** The topic keys of an identity: `all`, its group's (or `nullgroup`), its user's when known. */
export declare function topicKeys(groupId: string | null | undefined, userId: string | null | undefined): TopicKey[];

/** Whether `next` supersedes `current` (a new epoch, or a higher offset in the same one). */
export declare function isNewerPosition(next: string, current: string | undefined): boolean;

/** The prefix of the `sessionStorage` keys `resume` writes. */
export declare const RESUME_STORAGE_PREFIX: "wshub.resume:";

/** The `sessionStorage` key of one identity's positions on one hub. */
export declare function resumeStorageKey(root: string, groupId: string | null, userId: string | null): string;

/**
 * The hub named by a `<script data-hub>` element: its value, or when empty the
 * origin the library (or that element's `src`) was loaded from; null without one.
 */
/** `url` with `presence=1` added to its query. */
export declare function withPresence(url: string): string;

export declare function hubFromDocument(
  doc: { querySelector(selector: string): unknown } | null | undefined,
  libraryUrl?: string,
): string | null;

export declare const Reconnect: Readonly<{
  BACKOFF: "backoff";
  LATER: "later";
  NEVER: "never";
}>;
export type ReconnectAction = (typeof Reconnect)[keyof typeof Reconnect];

/** What the library does after a close with `code` when `retryOnFail` is on (the README's close-code table). */
export declare function reconnectPolicy(code: number): ReconnectAction;

export declare function backoffDelay(attempt: number, min: number, max: number, random?: () => number): number;

export default WebConnectionWebSocket;
