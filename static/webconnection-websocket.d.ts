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
 * mean `excludeUser`.
 */
export type RecipientTypeName = "group" | "user" | "excludeUser" | "allButUser" | "allExceptUser";

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

export interface WebConnectionWebSocketOptions {
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
  /** With `presence`: the group's members, sorted by user id (empty until the first snapshot). */
  readonly members: PresenceMember[];
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
  close(code?: number, reason?: string): void;
}

export declare function buildUrl(
  location: { protocol: string; host: string },
  base: string | null | undefined,
  groupId?: string | null,
  userId?: string | null,
  token?: string | null,
): string;

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
