// Unit tests of static/webconnection-websocket.js, with Node's built-in test
// runner: `node --test tests/js/`. A fake WebSocket stands in for the
// browser's, and mocked timers drive the reconnect backoff.

import { test, mock } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";

import {
  WebConnectionWebSocket,
  BroadcastMessage,
  State,
  buildUrl,
  backoffDelay,
  hubFromDocument,
} from "../../static/webconnection-websocket.js";

class FakeSocket {
  static instances = [];
  constructor(url, protocols) {
    this.url = url;
    this.protocols = protocols;
    this.readyState = 0;
    this.sent = [];
    this.closedWith = null;
    FakeSocket.instances.push(this);
  }
  send(text) {
    assert.equal(this.readyState, 1, "send only on an open socket");
    this.sent.push(text);
  }
  close(code, reason) {
    // As browsers refuse them (WebSocket.close, WHATWG).
    if (code !== undefined && code !== 1000 && !(code >= 3000 && code <= 4999)) {
      throw new DOMException(`code ${code} refused`, "InvalidAccessError");
    }
    if (reason !== undefined && new TextEncoder().encode(reason).length > 123) {
      throw new DOMException("reason too long", "SyntaxError");
    }
    this.closedWith = { code, reason };
    this.readyState = 2;
  }
  // Test helpers: what the browser would do.
  open() {
    this.readyState = 1;
    this.onopen?.({ type: "open" });
  }
  receive(data) {
    this.onmessage?.({ data });
  }
  drop(code = 1006) {
    this.readyState = 3;
    this.onclose?.({ code, reason: "", wasClean: false });
  }
  // The end of a closing handshake that close() started: as in a browser,
  // the close event comes later, with the code the peer echoed.
  finishClose() {
    this.readyState = 3;
    this.onclose?.({ code: this.closedWith.code, reason: this.closedWith.reason, wasClean: true });
  }
}

const location = { protocol: "http:", host: "example.com:8080" };

function client(options = {}) {
  FakeSocket.instances = [];
  return new WebConnectionWebSocket({ WebSocket: FakeSocket, location, ...options });
}

test("URL follows the page and leaves out empty parameters", () => {
  assert.equal(buildUrl(location, null, "chat", "ann"),
    "ws://example.com:8080/__initializeWebSocket.wc?groupid=chat&userid=ann");
  assert.equal(buildUrl({ protocol: "https:", host: "h" }, null, "", null),
    "wss://h/__initializeWebSocket.wc");
  assert.equal(buildUrl(location, null, null, "a b&c"),
    "ws://example.com:8080/__initializeWebSocket.wc?userid=a%20b%26c");
  assert.equal(buildUrl(location, "https://hub.example.com/", "g", null),
    "wss://hub.example.com/__initializeWebSocket.wc?groupid=g");
  assert.equal(buildUrl(location, "ws://127.0.0.1:9000/ws", null, "u"), "ws://127.0.0.1:9000/ws?userid=u");
});

test("a token goes in the URL, or in the protocol list, fresh on every connect", (t) => {
  t.mock.timers.enable({ apis: ["setTimeout"] });
  let n = 0;
  const ws = client({ token: () => `tok${++n}` });
  ws.tryConnect(true, "g", "u");
  assert.equal(FakeSocket.instances[0].url,
    "ws://example.com:8080/__initializeWebSocket.wc?groupid=g&userid=u&token=tok1");
  FakeSocket.instances[0].drop();
  t.mock.timers.tick(60_000);
  assert.ok(FakeSocket.instances[1].url.endsWith("&token=tok2"), "a new token for the reconnect");
  const p = client({ token: "abc.def.ghi", tokenInProtocol: true });
  p.tryConnect(false, null, null);
  assert.equal(FakeSocket.instances[0].url, "ws://example.com:8080/__initializeWebSocket.wc");
  assert.deepEqual(FakeSocket.instances[0].protocols, ["wshub", "wshub.jwt.abc.def.ghi"]);
});

test("backoff grows exponentially, is capped, and is jittered", () => {
  assert.equal(backoffDelay(0, 500, 30000, () => 0), 250);
  assert.equal(backoffDelay(0, 500, 30000, () => 0.999999), 500);
  assert.equal(backoffDelay(3, 500, 30000, () => 0), 2000);
  assert.equal(backoffDelay(20, 500, 30000, () => 0), 15000);
  assert.equal(backoffDelay(1000, 500, 30000, () => 1), 30000);
  for (let attempt = 0; attempt < 12; attempt++) {
    const d = backoffDelay(attempt, 500, 30000);
    const ceiling = Math.min(30000, 500 * 2 ** attempt);
    assert.ok(d >= ceiling / 2 && d <= ceiling, `attempt ${attempt}: ${d}`);
  }
});

test("createBroadcastMessage serialises exactly the protocol fields", () => {
  const ws = client();
  ws.tryConnect(false, "chat", "ann");
  const msg = ws.createBroadcastMessage("broadcastchatmessage", "hi");
  assert.ok(msg instanceof BroadcastMessage);
  assert.equal(msg.addRecipient("chat"), msg, "chainable");
  msg.addRecipient("bob", "user");
  assert.equal(JSON.stringify(msg),
    '{"userId":"ann","groupId":"chat","action":"broadcastchatmessage","message":"hi",' +
    '"recipients":[{"type":"group","value":"chat"},{"type":"user","value":"bob"}]}');
});

test("send goes out on an open socket; messages are parsed for the handler", () => {
  const ws = client();
  const got = [];
  let opened = 0;
  ws.onMessageHandler = (m) => got.push(m);
  ws.onOpenHandler = () => opened++;
  ws.tryConnect(false, "g", "u");
  const socket = FakeSocket.instances[0];
  assert.equal(socket.url, "ws://example.com:8080/__initializeWebSocket.wc?groupid=g&userid=u");
  assert.equal(ws.state, State.CONNECTING);
  socket.open();
  assert.equal(ws.state, State.OPEN);
  assert.equal(opened, 1);
  assert.equal(ws.send({ action: "x" }), true);
  assert.equal(ws.send("raw text"), true);
  assert.deepEqual(socket.sent, ['{"action":"x"}', "raw text"]);
  socket.receive('{"action":"a","message":"m"}');
  assert.deepEqual(got, [{ action: "a", message: "m" }]);
});

test("frames that are not JSON go to onErrorHandler, not onMessageHandler", () => {
  const ws = client();
  const errors = [];
  ws.onMessageHandler = () => assert.fail("must not be called");
  ws.onErrorHandler = (data) => errors.push(data);
  ws.tryConnect(false);
  FakeSocket.instances[0].open();
  FakeSocket.instances[0].receive("not json");
  assert.deepEqual(errors, ["not json"]);
});

test("messages sent while disconnected are queued (bounded) and sent on open", () => {
  const ws = client({ maxQueue: 2 });
  ws.tryConnect(true, "g", "u");
  assert.equal(ws.send({ n: 1 }), true);
  assert.equal(ws.send({ n: 2 }), true);
  assert.equal(ws.send({ n: 3 }), false, "the queue is full");
  assert.equal(ws.queued, 2);
  FakeSocket.instances[0].open();
  assert.deepEqual(FakeSocket.instances[0].sent, ['{"n":1}', '{"n":2}']);
  assert.equal(ws.queued, 0);
});

test("tryConnect with another identity drops what was queued for the old one", () => {
  const ws = client();
  ws.tryConnect(true, "g1", "ann");
  FakeSocket.instances[0].open();
  FakeSocket.instances[0].drop();
  assert.equal(ws.send({ to: "g1" }), true);
  ws.tryConnect(true, "g1", "ann");
  assert.equal(ws.queued, 1, "the same identity keeps its queue");
  ws.tryConnect(true, "g2", "ann");
  assert.equal(ws.queued, 0, "another group does not send g1's messages");
  FakeSocket.instances.at(-1).open();
  assert.deepEqual(FakeSocket.instances.at(-1).sent, []);
});

test("an id that cannot be put in a URL is reported once, not retried", (t) => {
  t.mock.timers.enable({ apis: ["setTimeout"] });
  const ws = client();
  const closes = [];
  ws.onCloseHandler = (ev) => closes.push(`${ev.code} ${ev.reason}`);
  ws.tryConnect(true, "g", "bad\ud800");
  t.mock.timers.tick(60_000);
  assert.equal(closes.length, 1, closes.join(" | "));
  assert.match(closes[0], /^1006 URIError/);
  assert.equal(ws.state, State.CLOSED);
  assert.equal(FakeSocket.instances.length, 0);
});

test("reconnects with backoff after a drop, and resets the backoff on open", (t) => {
  t.mock.timers.enable({ apis: ["setTimeout"] });
  const random = mock.method(Math, "random", () => 0.999999);
  try {
    const ws = client({ minReconnectDelay: 100, maxReconnectDelay: 1000 });
    const closes = [];
    const statesSeen = [];
    ws.onCloseHandler = (ev) => { closes.push(ev.code); statesSeen.push(ws.state); };
    ws.tryConnect(true, "g", "u");
    FakeSocket.instances[0].open();
    FakeSocket.instances[0].drop(1001);
    assert.deepEqual(closes, [1001]);
    assert.deepEqual(statesSeen, [State.RECONNECTING], "the close handler sees the new state");
    assert.equal(ws.state, State.RECONNECTING);
    ws.send({ while: "down" });
    t.mock.timers.tick(99);
    assert.equal(FakeSocket.instances.length, 1, "not before the delay");
    t.mock.timers.tick(1);
    assert.equal(FakeSocket.instances.length, 2, "first retry after ~100 ms");
    FakeSocket.instances[1].drop();
    t.mock.timers.tick(199);
    assert.equal(FakeSocket.instances.length, 2);
    t.mock.timers.tick(1);
    assert.equal(FakeSocket.instances.length, 3, "second retry after ~200 ms");
    FakeSocket.instances[2].open();
    assert.deepEqual(FakeSocket.instances[2].sent, ['{"while":"down"}'], "queued message sent on reopen");
    FakeSocket.instances[2].drop();
    t.mock.timers.tick(100);
    assert.equal(FakeSocket.instances.length, 4, "backoff reset after a successful open");
  } finally {
    random.mock.restore();
  }
});

test("without retryOnFail a drop is final", () => {
  const ws = client();
  let seen = null;
  ws.onCloseHandler = () => { seen = ws.state; };
  ws.tryConnect(false);
  FakeSocket.instances[0].open();
  FakeSocket.instances[0].drop();
  assert.equal(seen, State.CLOSED, "the close handler sees the new state");
  assert.equal(ws.state, State.CLOSED);
  assert.equal(ws.send({ a: 1 }), false);
});

test("close() closes with 1000 and stops reconnecting", (t) => {
  t.mock.timers.enable({ apis: ["setTimeout"] });
  const ws = client();
  ws.tryConnect(true);
  const socket = FakeSocket.instances[0];
  socket.open();
  ws.close();
  assert.deepEqual(socket.closedWith, { code: 1000, reason: "Socket closed" });
  socket.drop(1000);
  t.mock.timers.tick(60000);
  assert.equal(FakeSocket.instances.length, 1, "no reconnect after close()");
  assert.equal(ws.state, State.CLOSED);
});

test("tryConnect on a connected client closes the old socket, and its close reaches nobody", (t) => {
  t.mock.timers.enable({ apis: ["setTimeout"] });
  const ws = client();
  const events = [];
  ws.onOpenHandler = () => events.push("open");
  ws.onCloseHandler = (ev) => events.push(`close ${ev.code}`);
  ws.onMessageHandler = (m) => events.push(`message ${m.message}`);
  ws.tryConnect(true, "a", "ann");
  const old = FakeSocket.instances[0];
  old.open();
  ws.tryConnect(true, "b", "ann");
  assert.deepEqual(old.closedWith, { code: 1000, reason: "Socket closed" }, "the old socket is closed first");
  const fresh = FakeSocket.instances[1];
  assert.equal(ws.socket, fresh);
  assert.ok(fresh.url.includes("groupid=b"), fresh.url);
  // What the old socket still delivers, and its close event, go nowhere:
  // no handler runs and no reconnect is scheduled.
  old.receive('{"message":"late"}');
  old.finishClose();
  t.mock.timers.tick(600_000);
  assert.equal(FakeSocket.instances.length, 2, "the old socket's close schedules no reconnect");
  assert.equal(ws.state, State.CONNECTING);
  fresh.open();
  assert.deepEqual(events, ["open", "open"]);
  // A socket still connecting is closed too.
  ws.tryConnect(true, "c", "ann");
  ws.tryConnect(true, "d", "ann");
  assert.equal(FakeSocket.instances.length, 4);
  assert.deepEqual(fresh.closedWith, { code: 1000, reason: "Socket closed" });
  assert.deepEqual(FakeSocket.instances[2].closedWith, { code: 1000, reason: "Socket closed" });
  FakeSocket.instances[2].drop(1006);
  assert.deepEqual(events, ["open", "open"]);
});

test("close() with a code or reason the browser refuses throws and changes nothing", () => {
  const ws = client();
  const seen = [];
  ws.onCloseHandler = (ev) => seen.push(ev);
  ws.tryConnect(true, "chat", "ann");
  const socket = FakeSocket.instances[0];
  socket.open();
  assert.throws(() => ws.close(1001), { name: "InvalidAccessError" });
  assert.throws(() => ws.close(1000, "x".repeat(200)), { name: "SyntaxError" });
  assert.equal(socket.closedWith, null, "the socket is still open");
  assert.equal(ws.socket, socket, "and still the library's");
  assert.notEqual(ws.state, "closed");
  assert.equal(ws.send("hi"), true, "it still sends");
  // A close it accepts then closes it, once.
  ws.close(4100, "bye");
  assert.deepEqual(socket.closedWith, { code: 4100, reason: "bye" });
  assert.equal(ws.state, "closed");
  socket.finishClose();
  assert.equal(seen.length, 1);
  ws.tryConnect(true, "chat", "ann");
  assert.equal(FakeSocket.instances.length, 2, "one socket at a time: the first is closed");
  // With a reconnect pending (no socket) the same rules.
  FakeSocket.instances[1].drop(1006);
  assert.equal(ws.socket, null);
  assert.throws(() => ws.close(1001), { name: "InvalidAccessError" });
  assert.throws(() => ws.close(1000, "é".repeat(62)), { name: "SyntaxError" });
  assert.throws(() => ws.close(2999.4), { name: "InvalidAccessError" });
  assert.throws(() => ws.close("x"), { name: "InvalidAccessError" });
  assert.notEqual(ws.state, "closed", "a refused close changes nothing");
  // What a browser accepts, after its conversion (WebIDL [Clamp]
  // unsigned short: 3000.5 -> 3000, "4000" -> 4000): closes.
  for (const code of [3000.5, "4000", 4999.4]) {
    const other = client();
    other.tryConnect(true, "chat", "ann");
    FakeSocket.instances[0].open();
    FakeSocket.instances[0].drop(1006);
    other.close(code);
    assert.equal(other.state, "closed", `close(${JSON.stringify(code)})`);
  }
  ws.close();
  assert.equal(ws.state, "closed");
});

test("close() fires onCloseHandler once, with the close event, after the socket has closed", () => {
  const ws = client();
  const seen = [];
  ws.onCloseHandler = (ev) => seen.push([ev.code, ev.wasClean, ws.state]);
  ws.tryConnect(true, "g", "u");
  const socket = FakeSocket.instances[0];
  socket.open();
  ws.close();
  assert.equal(ws.state, State.CLOSED, "closed at once");
  assert.deepEqual(seen, [], "not before the socket has closed");
  socket.finishClose();
  assert.deepEqual(seen, [[1000, true, State.CLOSED]]);
  ws.close();
  assert.equal(seen.length, 1, "a second close() has nothing to report");
  // close() then tryConnect() at once: the first socket's late close event
  // would describe a connection that is gone, and is not reported.
  ws.tryConnect(true, "g", "u");
  const second = FakeSocket.instances[1];
  second.open();
  ws.close();
  ws.tryConnect(true, "g", "u");
  second.finishClose();
  assert.equal(seen.length, 1);
  assert.equal(ws.state, State.CONNECTING);
});

// The close-code table in the README is the contract; these tests read it,
// so the library, the README and the hub cannot drift apart.
const README = readFileSync(new URL("../../README.md", import.meta.url), "utf8");
const OUTCOME_RS = readFileSync(new URL("../../src/outcome.rs", import.meta.url), "utf8");

/** Rows of the README's close-code table: { codes: [..] | "other" | "other4xxx", action }. */
function closeCodeTable() {
  const start = README.indexOf("## Close codes");
  assert.ok(start >= 0, "README has a '## Close codes' section");
  const section = README.slice(start, README.indexOf("\n## ", start + 1));
  const rows = [];
  for (const line of section.split("\n")) {
    const cells = line.split("|").slice(1, -1).map((c) => c.trim());
    if (cells.length < 3 || !/^(\d{4}|any other)/.test(cells[0])) continue;
    const codes = cells[0].startsWith("any other 4000")
      ? "other4xxx"
      : cells[0].startsWith("any other") ? "other" : cells[0].split(/,\s*/).map(Number);
    rows.push({ codes, action: cells.at(-1) });
  }
  return rows;
}

/** What a client with retryOnFail does after `code`: "reconnects", "reconnects later" or "stays closed". */
function observe(t, code) {
  const ws = client({ minReconnectDelay: 100, maxReconnectDelay: 1000 });
  ws.tryConnect(true, "g", "u");
  FakeSocket.instances[0].open();
  FakeSocket.instances[0].drop(code);
  const reconnecting = ws.state === State.RECONNECTING;
  t.mock.timers.tick(1000);
  if (FakeSocket.instances.length === 2) return reconnecting ? "reconnects" : "reconnected in the wrong state";
  t.mock.timers.tick(9_000);
  if (FakeSocket.instances.length === 2) return "reconnects sooner than 10 s after 1000 ms";
  t.mock.timers.tick(60_000);
  if (FakeSocket.instances.length === 2) return reconnecting ? "reconnects later" : "reconnected in the wrong state";
  return ws.state === State.CLOSED ? "stays closed" : `state ${ws.state} without a reconnect`;
}

test("after each close code the library does what the README's table says", (t) => {
  t.mock.timers.enable({ apis: ["setTimeout"] });
  const random = mock.method(Math, "random", () => 0.999999);
  try {
    const rows = closeCodeTable();
    assert.ok(rows.length >= 10, `found ${rows.length} rows`);
    const expected = (action) => {
      if (action === "reconnects") return "reconnects";
      if (action.startsWith("reconnects after a longer wait")) return "reconnects later";
      if (action === "stays closed") return "stays closed";
      return assert.fail(`unknown action in the README: ${action}`);
    };
    const samples = { other: [1012, 1014, 1015, 3000, 3999], other4xxx: [4002, 4004, 4100, 4500, 4999] };
    const want = [];
    const got = [];
    for (const { codes, action } of rows) {
      for (const code of Array.isArray(codes) ? codes : samples[codes]) {
        want.push(`${code}: ${expected(action)}`);
        got.push(`${code}: ${observe(t, code)}`);
      }
    }
    assert.deepEqual(got, want);
  } finally {
    random.mock.restore();
  }
});

test("the README's close-code table lists every code the hub sends (src/outcome.rs)", () => {
  const body = OUTCOME_RS.slice(OUTCOME_RS.indexOf("pub fn code(self)"));
  const sent = [...body.slice(0, body.indexOf("\n    }\n")).matchAll(/=> (\d{4}),/g)].map((m) => Number(m[1]));
  assert.ok(sent.length >= 9, `found ${sent.length} codes in outcome.rs`);
  const listed = closeCodeTable().flatMap((r) => (Array.isArray(r.codes) ? r.codes : []));
  for (const code of [...sent, 4003, 4005]) assert.ok(listed.includes(code), `${code} is in the README's table`);
});

test("the .d.ts accepts every recipient type the hub accepts (src/message.rs)", () => {
  const dts = readFileSync(new URL("../../static/webconnection-websocket.d.ts", import.meta.url), "utf8");
  const rust = readFileSync(new URL("../../src/message.rs", import.meta.url), "utf8");
  const names = [...rust.slice(rust.indexOf("fn from_name"), rust.indexOf("fn from_int"))
    .matchAll(/\("(\w+)", RecipientKind::/g)].map((m) => m[1]);
  const ints = [...rust.slice(rust.indexOf("fn from_int")).slice(0, 400).matchAll(/(\d+) => Some/g)].map((m) => m[1]);
  assert.ok(names.length >= 5 && ints.length === 3, `${names} ${ints}`);
  // Every declaration of a RecipientType alias, taken together.
  const decls = [...dts.matchAll(/export type RecipientType\w* =([^;]+);/g)].map((m) => m[1]).join(" ");
  const strings = [...decls.matchAll(/"(\w+)"/g)].map((m) => m[1].toLowerCase());
  const numbers = [...decls.replace(/"\w+"/g, "").matchAll(/\b(\d+)\b/g)].map((m) => m[1]);
  for (const name of names) assert.ok(strings.includes(name), `the .d.ts accepts "${name}"`);
  for (const n of ints) assert.ok(numbers.includes(n), `the .d.ts accepts ${n}`);
  assert.match(dts, /addRecipient\(value: string \| null, type\?: RecipientType\b/);
});

// A page on one origin that loads the library from the hub on another: the
// hub is named by a `data-hub` attribute on a <script> element (its value,
// or, when empty, the origin the library itself came from), and the `url`
// option wins over both. Without either, the page's own host, as in Web
// Connection.
function fakeDocument(attrs) {
  const el = attrs && {
    getAttribute: (name) => (name === "data-hub" ? attrs.hub : null),
    src: attrs.src ?? "",
  };
  return { querySelector: (sel) => (sel === "script[data-hub]" ? el : null) };
}

test("hubFromDocument: data-hub names the hub, or points at where the library came from", () => {
  const lib = "https://hub.example.com:8443/scripts/webconnection-websocket.js";
  assert.equal(hubFromDocument(fakeDocument(null), lib), null);
  assert.equal(hubFromDocument(undefined, lib), null);
  assert.equal(hubFromDocument(fakeDocument({ hub: "wss://other.example.com" }), lib), "wss://other.example.com");
  // Empty: the origin of the library (an inline module importing it).
  assert.equal(hubFromDocument(fakeDocument({ hub: "" }), lib), "https://hub.example.com:8443");
  // Empty on a <script src> element: the origin of that script.
  assert.equal(hubFromDocument(fakeDocument({ hub: " ", src: "http://127.0.0.1:9000/scripts/app.js" }), lib),
    "http://127.0.0.1:9000");
  // A library with no web origin (a file: URL under Node) gives nothing.
  assert.equal(hubFromDocument(fakeDocument({ hub: "" }), "file:///x/webconnection-websocket.js"), null);
});

test("the socket URL: the url option, else data-hub, else the page's host", () => {
  const document = fakeDocument({ hub: "", src: "https://hub.example.com/scripts/webconnection-websocket.js" });
  let ws = client({ document });
  ws.tryConnect(false, "g", "u");
  assert.equal(FakeSocket.instances[0].url, "wss://hub.example.com/__initializeWebSocket.wc?groupid=g&userid=u");
  ws = client({ document, url: "ws://explicit:9000" });
  ws.tryConnect(false, "g", "u");
  assert.equal(FakeSocket.instances[0].url, "ws://explicit:9000/__initializeWebSocket.wc?groupid=g&userid=u");
  ws = client({ document: fakeDocument(null) });
  ws.tryConnect(false, "g", "u");
  assert.equal(FakeSocket.instances[0].url, "ws://example.com:8080/__initializeWebSocket.wc?groupid=g&userid=u");
});
