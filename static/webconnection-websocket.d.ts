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

export type RecipientType = "group" | "user" | "excludeUser";

export interface Recipient {
  type: RecipientType | string | number;
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
  addRecipient(value: string, type?: RecipientType): this;
}

export interface WebConnectionWebSocketOptions {
  /** Hub base URL (`wss://hub.example.com`); default: the page's own host. */
  url?: string | null;
  /** Upper bound of the first reconnect delay, ms (default 500). */
  minReconnectDelay?: number;
  /** Cap on the reconnect delay, ms (default 30000). */
  maxReconnectDelay?: number;
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
}

export declare class WebConnectionWebSocket {
  constructor(options?: WebConnectionWebSocketOptions);
  onMessageHandler: ((msg: HubMessage) => void) | null;
  onOpenHandler: ((ev: Event) => void) | null;
  onCloseHandler: ((ev: CloseEvent) => void) | null;
  onErrorHandler: ((data: string, err: Error) => void) | null;
  readonly socket: WebSocket | null;
  readonly state: ConnectionState;
  readonly groupId: string | null;
  readonly userId: string | null;
  readonly url: string;
  readonly queued: number;
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

export declare function backoffDelay(attempt: number, min: number, max: number, random?: () => number): number;

export default WebConnectionWebSocket;
