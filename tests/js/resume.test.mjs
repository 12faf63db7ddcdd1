// Unit tests of the browser library's lossless resume (`resume: true`;
// contract: reference/resume.md, "Client protocol"), with a fake WebSocket
// and a fake sessionStorage: `node --test tests/js/`.

import { test } from "node:test";
import assert from "node:assert/strict";

import {
  WebConnectionWebSocket,
  buildUrl,
  topicKeys,
  isNewerPosition,
  resumeStorageKey,
  RESUME_STORAGE_PREFIX,
} from "../../static/webconnection-websocket.js";

class FakeSocket {
  static instances = [];
  constructor(url) {
    this.url = url;
    this.readyState = 0;
    this.sent = [];
    FakeSocket.instances.push(this);
  }
  send(text) {
    this.sent.push(text);
  }
  close(code, reason) {
    this.closedWith = { code, reason };
    this.readyState = 2;
  }
  open() {
    this.readyState = 1;
    this.onopen?.({ type: "open" });
  }
  receive(value) {
    this.onmessage?.({ data: typeof value === "string" ? value : JSON.stringify(value) });
  }
  drop(code = 1006) {
    this.readyState = 3;
    this.onclose?.({ code, reason: "", wasClean: false });
  }
}

/** sessionStorage's shape, recording every call. */
class FakeStorage {
  constructor() {
    this.items = new Map();
    this.calls = [];
  }
  getItem(key) {
    this.calls.push(["get", key]);
    return this.items.has(key) ? this.items.get(key) : null;
  }
  setItem(key, value) {
    this.calls.push(["set", key]);
    this.items.set(key, String(value));
  }
}

const location = { protocol: "http:", host: "example.com:8080" };
const ROOT = "ws://example.com:8080/__initializeWebSocket.wc";

function client(options = {}) {
  return new WebConnectionWebSocket({ WebSocket: FakeSocket, location, ...options });
}

/** The latest socket. */
function last() {
  return FakeSocket.instances.at(-1);
}

/** The `resume` parameter of a socket URL: undefined when absent, else its decoded value. */
function resumeOf(url) {
  const query = url.includes("?") ? url.slice(url.indexOf("?") + 1) : "";
  for (const pair of query.split("&")) {
    const [key, ...rest] = pair.split("=");
    if (key === "resume") return decodeURIComponent(rest.join("="));
  }
  return undefined;
}

/** The hub's welcome frame, as in the contract. */
function welcome({ userId = "ann", groupId = "chat", recovered = false, replayed = 0, positions, node = "n1" }) {
  return {
    userId, groupId, action: "wshub.welcome",
    message: JSON.stringify({ recovered, replayed, positions, node }),
    recipients: [],
  };
}

function message(text, pos) {
  return { userId: "bob", groupId: "chat", action: "broadcastchatmessage", message: text,
    recipients: [{ type: "group", value: "chat" }], pos };
}

/** A client with resume on, connected (open) with the given ids, and what reached its handlers. */
function resuming(groupId, userId, options = {}) {
  const ws = client({ resume: true, storage: new FakeStorage(), ...options });
  const seen = { messages: [], resumes: [], gaps: [] };
  ws.onMessageHandler = (m) => seen.messages.push(m);
  ws.onResumeHandler = (info) => seen.resumes.push(info);
  ws.onGapHandler = (info) => seen.gaps.push(info);
  ws.tryConnect(true, groupId, userId);
  last().open();
  return { ws, seen };
}

test("buildUrl: resume= empty without positions, else the URL-encoded JSON; absent without the option", () => {
  assert.equal(buildUrl(location, null, "chat", "ann"), `${ROOT}?groupid=chat&userid=ann`);
  assert.equal(buildUrl(location, null, "chat", "ann", null, null), `${ROOT}?groupid=chat&userid=ann`);
  assert.equal(buildUrl(location, null, "chat", "ann", null, {}), `${ROOT}?groupid=chat&userid=ann&resume=`);
  assert.equal(buildUrl(location, null, null, null, null, {}), `${ROOT}?resume=`);
  const positions = { all: "k3:41", "group:a&b c": "p7:17", "user:zoë/1": "q2:5" };
  const url = buildUrl(location, null, "a&b c", "zoë/1", "tok", positions);
  assert.equal(url, `${ROOT}?groupid=a%26b%20c&userid=zo%C3%AB%2F1&token=tok&resume=`
    + encodeURIComponent(JSON.stringify(positions)));
  // Nothing in the value can end it or start another parameter.
  assert.doesNotMatch(url.slice(url.indexOf("resume=")), /[{}"&#+ ]/);
  assert.deepEqual(JSON.parse(resumeOf(url)), positions);
});

test("topicKeys and isNewerPosition", () => {
  assert.deepEqual(topicKeys("chat", "ann"), ["all", "group:chat", "user:ann"]);
  assert.deepEqual(topicKeys(null, "ann"), ["all", "nullgroup", "user:ann"]);
  assert.deepEqual(topicKeys("", null), ["all", "group:"], "the empty group is a group; no user key without a user");
  assert.deepEqual(topicKeys("g:x", "u:y"), ["all", "group:g:x", "user:u:y"], "ids exactly as given");
  assert.equal(isNewerPosition("e:2", undefined), true);
  assert.equal(isNewerPosition("e:10", "e:9"), true, "numerically, not as text");
  assert.equal(isNewerPosition("e:9", "e:10"), false);
  assert.equal(isNewerPosition("e:9", "e:9"), false);
  assert.equal(isNewerPosition("f:1", "e:9"), true, "a new epoch always wins");
  assert.equal(isNewerPosition("e:18446744073709551615", "e:18446744073709551614"), true, "u64 exact");
  assert.equal(isNewerPosition("nonsense", "e:1"), false);
  assert.equal(isNewerPosition("e:x", undefined), false);
});

test("without the option nothing changes: no parameter, no storage, every frame as it came", () => {
  FakeSocket.instances = [];
  const storage = new FakeStorage();
  const ws = client({ storage });
  const got = [];
  const resumes = [];
  ws.onMessageHandler = (m) => got.push(m);
  ws.onResumeHandler = (i) => resumes.push(i);
  ws.onGapHandler = (i) => resumes.push(i);
  ws.tryConnect(true, "chat", "ann");
  assert.equal(last().url, `${ROOT}?groupid=chat&userid=ann`);
  last().open();
  const w = welcome({ positions: { all: "k:1" } });
  const gap = { userId: null, groupId: null, action: "wshub.gap", message: '{"topics":["all"]}', recipients: [] };
  const m = message("hi", { all: "k:2" });
  for (const frame of [w, gap, m]) last().receive(frame);
  assert.deepEqual(got, [w, gap, m], "delivered untouched, pos included");
  assert.deepEqual(resumes, []);
  assert.deepEqual(ws.positions, {});
  assert.deepEqual(storage.calls, [], "storage is not touched");
  last().drop(1001);
  ws.tryConnect(true, "chat", "ann");
  assert.equal(last().url, `${ROOT}?groupid=chat&userid=ann`);
});

test("first connect sends resume= (empty); the welcome sets the positions and calls onResumeHandler", () => {
  FakeSocket.instances = [];
  const { ws, seen } = resuming("chat", "ann");
  assert.equal(FakeSocket.instances[0].url, `${ROOT}?groupid=chat&userid=ann&resume=`);
  const positions = { all: "k3:41", "group:chat": "p7:17", "user:ann": "q2:5" };
  last().receive(welcome({ recovered: false, replayed: 0, positions: { ...positions, "group:other": "z:9" } }));
  assert.deepEqual(seen.resumes, [{ recovered: false, replayed: 0, node: "n1" }]);
  assert.deepEqual(ws.positions, positions, "only this socket's own topic keys are kept");
  assert.deepEqual(seen.messages, [], "the welcome does not reach onMessageHandler");
  // A reconnect sends them back.
  last().drop(1001);
  ws.tryConnect(true, "chat", "ann");
  assert.equal(resumeOf(last().url), JSON.stringify(positions));
  last().open();
  last().receive(welcome({ recovered: true, replayed: 12, positions, node: "n2" }));
  assert.deepEqual(seen.resumes.at(-1), { recovered: true, replayed: 12, node: "n2" });
});

test("pos advances the tracked positions and is removed before onMessageHandler", () => {
  FakeSocket.instances = [];
  const { ws, seen } = resuming("chat", "ann");
  last().receive(welcome({ positions: { all: "k:40", "group:chat": "p:16", "user:ann": "q:5" } }));
  last().receive(message("one", { all: "k:41", "group:chat": "p:17" }));
  // Another group's and another user's keys (a message addressed to several
  // topics carries them all) are not this socket's: not kept.
  last().receive(message("two", { "group:chat": "p:18", "user:bob": "u:3", "group:x": "x:1" }));
  // An older position of the same epoch never moves a topic back.
  last().receive(message("three", { all: "k:39", "user:ann": "q:6" }));
  assert.deepEqual(ws.positions, { all: "k:41", "group:chat": "p:18", "user:ann": "q:6" });
  assert.deepEqual(seen.messages.map((m) => m.message), ["one", "two", "three"]);
  for (const m of seen.messages) {
    assert.equal("pos" in m, false, "pos removed");
    assert.deepEqual(Object.keys(m), ["userId", "groupId", "action", "message", "recipients"]);
  }
  // A new epoch (the topic's history started afresh) replaces the position.
  last().receive(message("four", { all: "fresh:1" }));
  assert.equal(ws.positions.all, "fresh:1");
  // Sent back on reconnect, URL-encoded.
  last().drop(1006);
  ws.tryConnect(true, "chat", "ann");
  assert.deepEqual(JSON.parse(resumeOf(last().url)), { all: "fresh:1", "group:chat": "p:18", "user:ann": "q:6" });
  assert.ok(last().url.endsWith(`&resume=${encodeURIComponent(JSON.stringify(ws.positions))}`));
  // `positions` is a copy.
  ws.positions.all = "tampered:1";
  assert.equal(ws.positions.all, "fresh:1");
});

test("not recovered: the positions become the hub's current tops", () => {
  FakeSocket.instances = [];
  const { ws, seen } = resuming(null, "ann");
  last().receive(welcome({ groupId: null, positions: { all: "k:1", nullgroup: "n:1", "user:ann": "q:1" } }));
  last().receive(message("m", { all: "k:2", nullgroup: "n:2" }));
  last().drop(1001);
  ws.tryConnect(true, null, "ann");
  assert.deepEqual(JSON.parse(resumeOf(last().url)), { all: "k:2", nullgroup: "n:2", "user:ann": "q:1" });
  last().open();
  last().receive(welcome({ groupId: null, recovered: false, replayed: 0,
    positions: { all: "k2:7", nullgroup: "n2:3", "user:ann": "q:1" } }));
  assert.deepEqual(seen.resumes.at(-1), { recovered: false, replayed: 0, node: "n1" });
  assert.deepEqual(ws.positions, { all: "k2:7", nullgroup: "n2:3", "user:ann": "q:1" });
});

test("a reconnect after a drop (retryOnFail) resumes from the positions seen", (t) => {
  t.mock.timers.enable({ apis: ["setTimeout"] });
  FakeSocket.instances = [];
  const { ws } = resuming("chat", "ann", { minReconnectDelay: 100 });
  last().receive(welcome({ positions: { all: "k:1", "group:chat": "p:1", "user:ann": "q:1" } }));
  last().receive(message("m", { all: "k:2", "group:chat": "p:2" }));
  last().drop(1001);
  t.mock.timers.tick(100);
  assert.equal(FakeSocket.instances.length, 2);
  assert.deepEqual(JSON.parse(resumeOf(last().url)), ws.positions);
  assert.deepEqual(ws.positions, { all: "k:2", "group:chat": "p:2", "user:ann": "q:1" });
});

test("the positions are kept in sessionStorage: a reload resumes; other identities and hubs do not mix", () => {
  FakeSocket.instances = [];
  const storage = new FakeStorage();
  const first = resuming("chat", "ann", { storage }).ws;
  last().receive(welcome({ positions: { all: "k:1", "group:chat": "p:1", "user:ann": "q:1" } }));
  last().receive(message("m", { all: "k:2", "group:chat": "p:2", "user:ann": "q:2" }));
  const key = resumeStorageKey(ROOT, "chat", "ann");
  assert.ok(key.startsWith(RESUME_STORAGE_PREFIX));
  assert.deepEqual(JSON.parse(storage.items.get(key)).positions, first.positions);

  // A reload: a new client object, the same storage.
  const reloaded = client({ resume: true, storage });
  assert.deepEqual(reloaded.positions, {}, "nothing before tryConnect");
  reloaded.tryConnect(true, "chat", "ann");
  assert.deepEqual(JSON.parse(resumeOf(last().url)), { all: "k:2", "group:chat": "p:2", "user:ann": "q:2" });
  assert.deepEqual(reloaded.positions, first.positions);

  // Another user, another group, another hub in the same tab: their own (none).
  for (const [ws, group, user] of [
    [client({ resume: true, storage }), "chat", "bob"],
    [client({ resume: true, storage }), "other", "ann"],
    [client({ resume: true, storage }), null, "ann"],
    [client({ resume: true, storage, url: "wss://elsewhere.example.com" }), "chat", "ann"],
  ]) {
    ws.tryConnect(true, group, user);
    assert.equal(resumeOf(last().url), "", `${ws.url}: fresh`);
  }
  // bob's positions go under bob's key; ann's stay.
  const bob = resuming("chat", "bob", { storage }).ws;
  last().receive(welcome({ userId: "bob", positions: { all: "k:9", "group:chat": "p:9", "user:bob": "b:1" } }));
  assert.deepEqual(JSON.parse(storage.items.get(key)).positions, first.positions);
  assert.equal(JSON.parse(storage.items.get(resumeStorageKey(ROOT, "chat", "bob"))).positions["user:bob"], "b:1");
  assert.equal(bob.positions["user:bob"], "b:1");

  // One client switching identity with tryConnect switches positions too.
  const switching = client({ resume: true, storage });
  switching.tryConnect(true, "chat", "bob");
  assert.equal(JSON.parse(resumeOf(last().url))["user:bob"], "b:1");
  switching.tryConnect(true, "chat", "ann");
  assert.deepEqual(JSON.parse(resumeOf(last().url)), first.positions);
});

test("sessionStorage is the default store; unreadable or failing storage leaves memory only", () => {
  FakeSocket.instances = [];
  const storage = new FakeStorage();
  globalThis.sessionStorage = storage;
  try {
    const ws = client({ resume: true });
    ws.tryConnect(true, "chat", "ann");
    last().open();
    last().receive(welcome({ positions: { all: "k:3" } }));
    assert.deepEqual(JSON.parse(storage.items.get(resumeStorageKey(ROOT, "chat", "ann"))).positions, { all: "k:3" });
  } finally {
    delete globalThis.sessionStorage;
  }
  // Garbage stored under the key is ignored.
  const garbage = new FakeStorage();
  garbage.items.set(resumeStorageKey(ROOT, "chat", "ann"), "{not json");
  const g = client({ resume: true, storage: garbage });
  g.tryConnect(true, "chat", "ann");
  assert.equal(resumeOf(last().url), "");
  garbage.items.set(resumeStorageKey(ROOT, "chat", "ann"), '{"positions":{"all":"k:1","group:chat":7,"user:ann":"bad"}}');
  const h = client({ resume: true, storage: garbage });
  h.tryConnect(true, "chat", "ann");
  assert.deepEqual(JSON.parse(resumeOf(last().url)), { all: "k:1" }, "only readable positions");
  // A storage that throws (disabled, full): positions are kept in memory.
  const broken = { getItem() { throw new Error("SecurityError"); }, setItem() { throw new Error("QuotaExceeded"); } };
  const { ws } = resuming("chat", "ann", { storage: broken });
  last().receive(welcome({ positions: { all: "k:5" } }));
  last().receive(message("m", { all: "k:6" }));
  assert.deepEqual(ws.positions, { all: "k:6" });
  ws.tryConnect(true, "chat", "ann");
  assert.deepEqual(JSON.parse(resumeOf(last().url)), { all: "k:6" });
  // storage: null keeps nothing outside memory.
  const mem = client({ resume: true, storage: null });
  mem.tryConnect(true, "chat", "ann");
  assert.equal(resumeOf(last().url), "");
});

test("wshub.gap's positions are kept like a message's pos: newer ones of tracked topics only", () => {
  FakeSocket.instances = [];
  const { ws, seen } = resuming("chat", "ann");
  last().receive(welcome({ positions: { all: "k:1", "group:chat": "p:4", "user:ann": "q:1" } }));
  const gap = (info) => last().receive({ userId: null, groupId: null, action: "wshub.gap",
    message: JSON.stringify(info), recipients: [] });
  // Redis lost its history: the group goes on from a new epoch's start.
  gap({ topics: ["group:chat"], positions: { "group:chat": "r:0" } });
  assert.deepEqual(ws.positions, { all: "k:1", "group:chat": "r:0", "user:ann": "q:1" });
  assert.deepEqual(seen.gaps, [{ topics: ["group:chat"], positions: { "group:chat": "r:0" } }]);
  // Older than what it holds (a replay got further), or not its topic: ignored.
  last().receive(message("m", { "group:chat": "r:2" }));
  gap({ topics: ["group:chat"], positions: { "group:chat": "r:1", "user:bob": "z:9" } });
  gap({ topics: ["all"], positions: "k:9" });
  assert.deepEqual(ws.positions, { all: "k:1", "group:chat": "r:2", "user:ann": "q:1" });
  // The next connect resumes from there.
  last().close(1006);
  ws.tryConnect(true, "chat", "ann");
  assert.deepEqual(JSON.parse(resumeOf(last().url)), { all: "k:1", "group:chat": "r:2", "user:ann": "q:1" });
  assert.equal(seen.messages.length, 1);
});

test("wshub.gap calls onGapHandler with the topics and never reaches onMessageHandler", () => {
  FakeSocket.instances = [];
  const { ws, seen } = resuming("chat", "ann");
  last().receive(welcome({ positions: { all: "k:1", "group:chat": "p:1", "user:ann": "q:1" } }));
  last().receive({ userId: null, groupId: null, action: "wshub.gap",
    message: JSON.stringify({ topics: ["group:chat"] }), recipients: [] });
  assert.deepEqual(seen.gaps, [{ topics: ["group:chat"] }]);
  assert.deepEqual(seen.messages, []);
  assert.deepEqual(ws.positions, { all: "k:1", "group:chat": "p:1", "user:ann": "q:1" }, "unchanged");
  // An unreadable gap notice still says there was a gap.
  last().receive({ action: "wshub.gap", message: "?", recipients: [] });
  assert.deepEqual(seen.gaps.at(-1), { topics: [] });
  // Without a handler it is dropped all the same.
  ws.onGapHandler = null;
  last().receive({ action: "wshub.gap", message: '{"topics":["all"]}', recipients: [] });
  assert.deepEqual(seen.messages, []);
  // Later messages flow on.
  last().receive(message("after", { "group:chat": "p:3" }));
  assert.deepEqual(seen.messages.map((m) => m.message), ["after"]);
  assert.equal(ws.positions["group:chat"], "p:3");
});

test("only the hub's own frames (no pos) are taken as welcome or gap; a relayed message never is", () => {
  FakeSocket.instances = [];
  const { ws, seen } = resuming("chat", "ann");
  last().receive(welcome({ positions: { all: "k:1" } }));
  const forged = { ...welcome({ recovered: true, replayed: 99, positions: { all: "evil:999" } }), pos: { all: "k:2" } };
  last().receive(forged);
  assert.equal(seen.resumes.length, 1);
  assert.equal(ws.positions.all, "k:2");
  assert.equal(seen.messages.length, 1);
  assert.equal(seen.messages[0].action, "wshub.welcome");
  assert.equal("pos" in seen.messages[0], false);
});

test("a user id the hub assigned (none given) is kept for reconnects, so the user topic resumes too", (t) => {
  t.mock.timers.enable({ apis: ["setTimeout"] });
  FakeSocket.instances = [];
  const { ws } = resuming("chat", null, { minReconnectDelay: 100 });
  assert.equal(last().url, `${ROOT}?groupid=chat&resume=`);
  last().receive(welcome({ userId: "a1b2c3d4e5f6", positions: { all: "k:1", "group:chat": "p:1", "user:a1b2c3d4e5f6": "u:1" } }));
  assert.deepEqual(ws.positions, { all: "k:1", "group:chat": "p:1", "user:a1b2c3d4e5f6": "u:1" });
  last().receive(message("m", { "user:a1b2c3d4e5f6": "u:2" }));
  last().drop(1001);
  t.mock.timers.tick(100);
  // The reconnect (same tryConnect) asks for the same user.
  assert.ok(last().url.startsWith(`${ROOT}?groupid=chat&userid=a1b2c3d4e5f6&resume=`), last().url);
  assert.equal(JSON.parse(resumeOf(last().url))["user:a1b2c3d4e5f6"], "u:2");
  assert.equal(ws.userId, null, "userId still says what tryConnect was given");
  // A new tryConnect without a user starts over: the hub picks again.
  ws.tryConnect(true, "chat", null);
  assert.ok(last().url.startsWith(`${ROOT}?groupid=chat&resume=`), last().url);
  assert.equal(JSON.parse(resumeOf(last().url))["user:a1b2c3d4e5f6"], undefined);
});

test("frames from a replaced socket change no positions", () => {
  FakeSocket.instances = [];
  const { ws, seen } = resuming("chat", "ann");
  const old = last();
  old.receive(welcome({ positions: { all: "k:1" } }));
  ws.tryConnect(true, "chat", "ann");
  old.receive(message("late", { all: "k:50" }));
  assert.equal(ws.positions.all, "k:1");
  assert.deepEqual(seen.messages, []);
});

// Review of 2026-12-02: the identity the hub gave the socket, not only the
// one tryConnect named, decides which positions go back.
test("with a token, the group the welcome names is resumed on reconnect and after a reload", (t) => {
  t.mock.timers.enable({ apis: ["setTimeout"] });
  FakeSocket.instances = [];
  const storage = new FakeStorage();
  const { ws } = resuming(undefined, undefined, { token: "jwt", storage, minReconnectDelay: 100 });
  last().receive(welcome({ userId: "tok-ann", groupId: "troom",
    positions: { all: "k:1", "group:troom": "g:3", "user:tok-ann": "u:0" } }));
  last().receive(message("t1", { "group:troom": "g:4" }));
  last().drop(1006);
  t.mock.timers.tick(100);
  assert.deepEqual(JSON.parse(resumeOf(last().url)), { all: "k:1", "group:troom": "g:4", "user:tok-ann": "u:0" },
    last().url);
  // A reload: a new client object, the same storage, tryConnect naming nobody.
  const reloaded = client({ resume: true, storage, token: "jwt" });
  reloaded.tryConnect(true);
  assert.deepEqual(JSON.parse(resumeOf(last().url)), { all: "k:1", "group:troom": "g:4", "user:tok-ann": "u:0" },
    last().url);
});

test("a reload keeps the user id the hub assigned, so its user topic resumes too", () => {
  FakeSocket.instances = [];
  const storage = new FakeStorage();
  resuming("anon", null, { storage });
  last().receive(welcome({ userId: "e044f066527c", groupId: "anon",
    positions: { all: "k:1", "group:anon": "p:2", "user:e044f066527c": "u:1" } }));
  const reloaded = client({ resume: true, storage });
  reloaded.tryConnect(true, "anon", "");
  assert.ok(last().url.startsWith(`${ROOT}?groupid=anon&userid=e044f066527c&resume=`), last().url);
  assert.deepEqual(JSON.parse(resumeOf(last().url)), { all: "k:1", "group:anon": "p:2", "user:e044f066527c": "u:1" });
  assert.equal(reloaded.userId, null, "userId still says what tryConnect was given");
  // Stored keys that are not topic keys are not taken back.
  const key = resumeStorageKey(ROOT, "anon", null);
  const stored = JSON.parse(storage.items.get(key));
  storage.items.set(key, JSON.stringify({ ...stored, tracked: ["all", "nullgroup", "evil", 7] }));
  const odd = client({ resume: true, storage });
  odd.tryConnect(true, "anon", "");
  assert.deepEqual(Object.keys(JSON.parse(resumeOf(last().url))).sort(), ["all"]);
});

test("with a token the welcome's user is the socket's: its topic is tracked whatever tryConnect named", () => {
  FakeSocket.instances = [];
  const { ws } = resuming("chat", "Ann A.", { token: "t" });
  // The token says bob: the hub's welcome names him and his topic.
  last().receive(welcome({ userId: "bob", positions: { all: "k:1", "group:chat": "p:1", "user:bob": "b:1" } }));
  assert.deepEqual(ws.positions, { all: "k:1", "group:chat": "p:1", "user:bob": "b:1" });
  last().receive(message("m", { all: "k:2", "user:bob": "b:2" }));
  last().drop(1001);
  ws.tryConnect(true, "chat", "Ann A.");
  assert.deepEqual(JSON.parse(resumeOf(last().url)), { all: "k:2", "group:chat": "p:1", "user:bob": "b:2" });
});
