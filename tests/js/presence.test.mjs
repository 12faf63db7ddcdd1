// Unit tests of the browser library's presence option (docs/presence.md),
// with Node's built-in test runner: `node --test tests/js/`.

import { test } from "node:test";
import assert from "node:assert/strict";

import { WebConnectionWebSocket, withPresence } from "../../static/webconnection-websocket.js";

class FakeSocket {
  static instances = [];
  constructor(url) {
    this.url = url;
    this.readyState = 0;
    this.sent = [];
    FakeSocket.instances.push(this);
  }
  send(text) {
    assert.equal(this.readyState, 1, "send only on an open socket");
    this.sent.push(text);
  }
  close() {
    this.readyState = 2;
  }
  open() {
    this.readyState = 1;
    this.onopen?.({ type: "open" });
  }
  receive(msg) {
    this.onmessage?.({ data: JSON.stringify(msg) });
  }
  drop(code = 1006) {
    this.readyState = 3;
    this.onclose?.({ code, reason: "", wasClean: false });
  }
}

const location = { protocol: "http:", host: "example.com:8080" };

function client(options = {}) {
  FakeSocket.instances = [];
  return new WebConnectionWebSocket({ WebSocket: FakeSocket, location, ...options });
}

// The hub's frames, as src/presence.rs encodes them.
const snapshot = (group, members, v) => ({
  userId: null,
  groupId: group,
  action: "wshub.presence",
  message: JSON.stringify({ group, members, v }),
  recipients: [],
});
const frame = (action, group, userId, v) => ({
  userId: null,
  groupId: group,
  action,
  message: JSON.stringify({ userId, v }),
  recipients: [],
});

test("presence: true opts the socket in and asks for the members on every open", () => {
  assert.equal(withPresence("ws://h/ws"), "ws://h/ws?presence=1");
  assert.equal(withPresence("ws://h/ws?userid=a"), "ws://h/ws?userid=a&presence=1");
  const ws = client({ presence: true, minReconnectDelay: 0, maxReconnectDelay: 0 });
  ws.send("queued before open");
  ws.tryConnect(true, "chat", "ann");
  const socket = FakeSocket.instances[0];
  assert.equal(socket.url, "ws://example.com:8080/__initializeWebSocket.wc?groupid=chat&userid=ann&presence=1");
  socket.open();
  assert.deepEqual(socket.sent, ['{"action":"wshub.presence"}', "queued before open"]);
  assert.deepEqual(ws.members, []);
});

test("members follow the snapshot and the join/leave frames by v", () => {
  const ws = client({ presence: true });
  const seen = [];
  const messages = [];
  ws.onPresenceHandler = (ev) => seen.push(ev);
  ws.onMessageHandler = (msg) => messages.push(msg);
  ws.tryConnect(false, "chat", "ann");
  const socket = FakeSocket.instances[0];
  socket.open();
  // A join the snapshot already holds (v 12), and one it does not (v 14),
  // arrive before it: only the second is applied on top.
  socket.receive(frame("wshub.join", "chat", "bob", 12));
  socket.receive(frame("wshub.join", "chat", "cid", 14));
  assert.deepEqual(ws.members, [], "nothing before the snapshot");
  socket.receive(snapshot("chat", [{ userId: "ann", connections: 2 }, { userId: "bob", connections: 1 }], 13));
  assert.deepEqual(ws.members, [
    { userId: "ann", connections: 2 },
    { userId: "bob", connections: 1 },
    { userId: "cid", connections: 1 },
  ]);
  socket.receive(frame("wshub.leave", "chat", "bob", 15));
  socket.receive(frame("wshub.leave", "chat", "ann", 11)); // older than the snapshot: ignored
  assert.deepEqual(ws.members.map((m) => m.userId), ["ann", "cid"]);
  assert.deepEqual(seen.map((e) => [e.type, e.userId, e.v]), [
    ["snapshot", null, 13],
    ["join", "cid", 14],
    ["leave", "bob", 15],
  ]);
  assert.deepEqual(seen[2].members.map((m) => m.userId), ["ann", "cid"]);
  // Presence frames do not reach onMessageHandler; everything else does.
  socket.receive({ userId: "cid", groupId: "chat", action: "say", message: "hi", recipients: [] });
  assert.deepEqual(messages.map((m) => m.action), ["say"]);
});

test("a reconnect asks again and the new snapshot replaces the list", () => {
  const ws = client({ presence: true, minReconnectDelay: 0, maxReconnectDelay: 0 });
  ws.tryConnect(true, "chat", "ann");
  let socket = FakeSocket.instances[0];
  socket.open();
  socket.receive(snapshot("chat", [{ userId: "ann", connections: 1 }, { userId: "bob", connections: 1 }], 100));
  socket.drop(1006);
  return new Promise((resolve) => setTimeout(resolve, 5)).then(() => {
    socket = FakeSocket.instances[1];
    socket.open();
    assert.deepEqual(socket.sent, ['{"action":"wshub.presence"}']);
    // Until the answer, the last list is kept; events wait for it.
    assert.deepEqual(ws.members.map((m) => m.userId), ["ann", "bob"]);
    socket.receive(frame("wshub.join", "chat", "dan", 205));
    socket.receive(snapshot("chat", [{ userId: "ann", connections: 1 }], 200));
    assert.deepEqual(ws.members.map((m) => m.userId), ["ann", "dan"]);
    ws.close();
  });
});

test("a list the hub sends unasked replaces the members, unless it is older than them", () => {
  const ws = client({ presence: true });
  const seen = [];
  ws.onPresenceHandler = (ev) => seen.push([ev.type, ev.v]);
  ws.tryConnect(false, "big", "ann");
  const socket = FakeSocket.instances[0];
  socket.open();
  socket.receive(snapshot("big", [{ userId: "ann", connections: 1 }, { userId: "bob", connections: 1 }], 10));
  // The group grew over max_members_events: no frames for cid, dan, or
  // bob's leave; back at the limit, the hub sends the list.
  socket.receive(snapshot("big", [{ userId: "ann", connections: 1 }, { userId: "dan", connections: 1 }], 20));
  assert.deepEqual(ws.members.map((m) => m.userId), ["ann", "dan"]);
  socket.receive(frame("wshub.leave", "big", "dan", 21));
  // A list older than what the members show changes nothing.
  socket.receive(snapshot("big", [{ userId: "ann", connections: 1 }, { userId: "dan", connections: 1 }], 20));
  assert.deepEqual(ws.members.map((m) => m.userId), ["ann"]);
  assert.deepEqual(seen, [["snapshot", 10], ["snapshot", 20], ["leave", 21]]);
});

test("without presence nothing changes: no parameter, no request, frames reach onMessageHandler", () => {
  const ws = client();
  const messages = [];
  ws.onMessageHandler = (msg) => messages.push(msg.action);
  ws.tryConnect(false, "chat", "ann");
  const socket = FakeSocket.instances[0];
  assert.ok(!socket.url.includes("presence"));
  socket.open();
  assert.deepEqual(socket.sent, []);
  socket.receive(frame("wshub.join", "chat", "bob", 1));
  assert.deepEqual(messages, ["wshub.join"]);
  assert.deepEqual(ws.members, []);
});

test("presence and resume together: one URL with both, each frame to its handler", () => {
  const store = new Map();
  const storage = {
    getItem: (k) => (store.has(k) ? store.get(k) : null),
    setItem: (k, v) => store.set(k, String(v)),
    removeItem: (k) => store.delete(k),
  };
  const ws = client({ presence: true, resume: true, storage, minReconnectDelay: 0, maxReconnectDelay: 0 });
  const seen = { presence: [], messages: [], resumes: [] };
  ws.onPresenceHandler = (ev) => seen.presence.push(ev.type);
  ws.onMessageHandler = (msg) => seen.messages.push(msg);
  ws.onResumeHandler = (info) => seen.resumes.push(info.recovered);
  ws.tryConnect(true, "chat", "ann");
  const socket = FakeSocket.instances[0];
  assert.equal(socket.url, "ws://example.com:8080/__initializeWebSocket.wc?groupid=chat&userid=ann&resume=&presence=1");
  socket.open();
  assert.deepEqual(socket.sent, ['{"action":"wshub.presence"}']);
  socket.receive({
    userId: "ann", groupId: "chat", action: "wshub.welcome",
    message: JSON.stringify({ recovered: false, replayed: 0, positions: { all: "k:1" }, node: "n1" }),
    recipients: [],
  });
  // Presence frames carry no `pos` (they are not in the history).
  socket.receive(snapshot("chat", [{ userId: "ann", connections: 1 }], 5));
  socket.receive(frame("wshub.join", "chat", "bob", 6));
  socket.receive({ userId: "bob", groupId: "chat", action: "broadcastchatmessage", message: "hi",
    recipients: [], pos: { all: "k:2" } });
  assert.deepEqual(seen.resumes, [false]);
  assert.deepEqual(seen.presence, ["snapshot", "join"]);
  assert.deepEqual(ws.members.map((m) => m.userId), ["ann", "bob"]);
  assert.deepEqual(seen.messages.map((m) => m.message), ["hi"]);
  assert.equal(ws.positions.all, "k:2");
  // Connecting again resumes from there and asks for the members again.
  socket.drop(1001);
  ws.tryConnect(true, "chat", "ann");
  const again = FakeSocket.instances.at(-1);
  assert.notEqual(again, socket);
  assert.match(again.url, /resume=%7B%22all%22%3A%22k%3A2%22%7D&presence=1$/);
  again.open();
  assert.deepEqual(again.sent, ['{"action":"wshub.presence"}']);
});

test("a hub with presence off is told to onPresenceOffHandler when the page has one, else to onMessageHandler", () => {
  const off = {
    userId: null,
    groupId: null,
    action: "wshub.error",
    message: "presence is off on this hub (presence.enabled = false): `wshub.presence` is not answered",
    recipients: [],
  };
  const other = { ...off, message: "rate limit: slow down" };
  const run = (options, withOffHandler) => {
    const ws = client(options);
    const seen = { presence: [], off: [], messages: [] };
    ws.onPresenceHandler = (ev) => seen.presence.push(ev);
    if (withOffHandler) ws.onPresenceOffHandler = (text) => seen.off.push(text);
    ws.onMessageHandler = (msg) => seen.messages.push(msg);
    ws.tryConnect(false, "chat", "ann");
    FakeSocket.instances[0].open();
    // Members known from a hub with presence on (before a redeploy).
    FakeSocket.instances[0].receive(snapshot("chat", [{ userId: "bob", connections: 1 }], 3));
    seen.presence.length = 0;
    seen.messages.length = 0;
    FakeSocket.instances[0].receive(off);
    FakeSocket.instances[0].receive(other);
    seen.members = ws.members;
    return seen;
  };
  // A page with the handler: the hub's text goes there only; other
  // errors still reach onMessageHandler; onPresenceHandler hears nothing.
  let seen = run({ presence: true }, true);
  assert.deepEqual(seen.off, [off.message]);
  assert.deepEqual(seen.messages, [other]);
  assert.deepEqual(seen.presence, []);
  assert.deepEqual(seen.members, [], "no members are known on such a hub");
  // A page written before the handler: as it was, both in onMessageHandler.
  seen = run({ presence: true }, false);
  assert.deepEqual(seen.messages, [off, other]);
  assert.deepEqual(seen.presence, []);
  assert.deepEqual(seen.members, []);
  // Without the presence option the frame is the page's to read.
  seen = run({}, true);
  assert.deepEqual(seen.off, []);
  assert.deepEqual(seen.messages, [off, other]);
});
