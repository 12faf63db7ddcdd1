// Lossless resume (issue 14; contract reference/resume.md) in headless
// Chromium against real wshub nodes with history on, on a Redis this file
// starts itself (the harness throws, failing every test here, when
// redis-server, nginx, Chromium or the binaries are missing):
//
// - the chat sample (`resume: true`) across a restart of its node: every
//   message sent while it was down arrives once, the history is not
//   appended again, and a reload resumes from sessionStorage;
// - a page written against Web Connection's library, unchanged (no resume
//   option), behind nginx, across a SIGTERM of its node: the drain handoff
//   replays what it missed, once.
//
// Exactly once is checked on what reached the page's onMessageHandler (a
// recorder wraps it), not only on the list: the chat page hides a repeated
// backend entry, so the list alone would not show a duplicate delivery.
// The messages sent through the broadcast endpoint are plain text, which the
// page shows as often as it receives it.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import {
  startRedis, startNode, stopNode, startNginx, startChatBackend, launchBrowser, connectionsOn,
  freePort, artifact, stopAll, mintToken, ROOT,
} from "./harness.mjs";
import { readFileSync } from "node:fs";
import { join } from "node:path";

const HISTORY = { WSHUB_HISTORY__ENABLED: "true" };

let redis, browser;

before(async () => {
  redis = await startRedis();
  browser = await launchBrowser();
});

after(async () => {
  try {
    await browser?.close();
  } finally {
    await stopAll();
  }
});

async function newPage() {
  const page = await browser.newPage({ viewport: { width: 720, height: 560 } });
  page.setDefaultTimeout(15_000);
  return page;
}

/** Publishes through a node's broadcast endpoint (loopback is trusted). */
async function publish(node, message, recipients = []) {
  const res = await fetch(`${node.url}/__broadcastWebSocket.wc`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ userId: "server", groupId: null, action: "broadcastchatmessage", message, recipients }),
  });
  assert.equal(res.status, 204, await res.text());
}

// ---------------------------------------------------------------------------
// (a) The chat sample across a node restart.

/** The chat page at `base`, joined as `user` in `group`, with a recorder of what reaches its handler. */
async function joinChat(page, base, user, group) {
  await page.goto(`${base}/`);
  await page.fill("#user", user);
  await page.fill("#group", group);
  await page.click("#connect");
  await page.waitForSelector('#status[data-state="open"]');
  await page.waitForFunction(() => window.wshubChat.resumes.length >= 1).catch((err) => {
    throw new Error(`no wshub.welcome reached the page: does target/debug/wshub speak resume? (${err.message})`);
  });
  // Every message the library hands to the page from now on.
  await page.evaluate(() => {
    const ws = window.wshubChat.socket;
    const handler = ws.onMessageHandler;
    window.delivered = [];
    ws.onMessageHandler = (m) => { window.delivered.push(m); handler(m); };
  });
  return page;
}

async function say(page, text) {
  await page.fill("#text", text);
  await page.click("#send");
}

/** The texts of the page's list (trimmed: rendered HTML ends in a newline) once `wanted` is among them. */
async function listShows(page, wanted) {
  await page.waitForFunction((w) => [...document.querySelectorAll("#messages li .text")]
    .some((el) => el.textContent.trim() === w), wanted);
  return page.$$eval("#messages li .text", (els) => els.map((el) => el.textContent.trim()));
}

/** The text of a delivered chat message (backend entries are JSON with a text). */
function textOf(m) {
  try {
    const e = JSON.parse(m.message);
    if (e && typeof e.text === "string") return e.text;
  } catch { /* plain text */ }
  return m.message;
}

test("the chat sample with resume: a restart of its node loses nothing, repeats nothing, and does not append the history again", async () => {
  // Node 2 stays up; the backend pushes through it. Node 1 is restarted on
  // the same address.
  const [port1, port2] = [await freePort(), await freePort()];
  const backend = await startChatBackend(`http://127.0.0.1:${port2}`);
  const env = {
    WSHUB_REDIS__URL: redis, ...HISTORY,
    WSHUB_BACKEND__URL: `${backend.url}/app/__websocket.wwd`, WSHUB_BACKEND__EVENTS: "true",
  };
  const node2 = await startNode({ ...env, WSHUB_LISTEN: `127.0.0.1:${port2}` });
  let node1 = await startNode({ ...env, WSHUB_LISTEN: `127.0.0.1:${port1}` });
  const ann = await joinChat(await newPage(), node1.url, "ann", "room");
  const bob = await joinChat(await newPage(), node2.url, "bob", "room");
  assert.deepEqual(await ann.evaluate(() => window.wshubChat.resumes), [{ recovered: false, replayed: 0 }],
    "a first connection has nothing to recover");
  const first = new URL(await ann.evaluate(() => window.wshubChat.socket.socket.url)).searchParams;
  assert.equal(first.get("resume"), "", "resume= (empty) at first");
  assert.equal(first.get("presence"), "1", "the sample opts in to presence as well");

  await say(bob, "hello from bob");
  await listShows(ann, "hello from bob");
  await say(ann, "hello from ann");
  await listShows(bob, "hello from ann");
  await listShows(ann, "hello from ann");
  const positions = await ann.evaluate(() => window.wshubChat.socket.positions);
  assert.deepEqual(Object.keys(positions).sort(), ["all", "group:room", "user:ann"], JSON.stringify(positions));

  // Ann's node dies; while it is down, messages for her arrive at node 2
  // from bob (through the backend) and from the server: to her group, to
  // her alone, to both (one copy), to everyone.
  await stopNode(node1, "SIGKILL");
  await ann.waitForSelector('#status[data-state="reconnecting"]');
  const away = ["while away 1", "while away 2"];
  for (const text of away) {
    await say(bob, text);
    await listShows(bob, text);
  }
  const plain = [
    ["to the room", [{ type: "group", value: "room" }]],
    ["to ann only", [{ type: "user", value: "ann" }]],
    ["to the room and ann", [{ type: "group", value: "room" }, { type: "user", value: "ann" }]],
    ["to everyone", []],
  ];
  for (const [text, recipients] of plain) await publish(node2, text, recipients);
  await listShows(bob, "to everyone");

  // The node comes back on the same address; the page reconnects to it.
  node1 = await startNode({ ...env, WSHUB_LISTEN: `127.0.0.1:${port1}` });
  await ann.waitForFunction(() => window.wshubChat.resumes.length >= 2, null, { timeout: 30_000 });
  const resumes = await ann.evaluate(() => window.wshubChat.resumes);
  assert.deepEqual(resumes[1], { recovered: true, replayed: away.length + plain.length }, JSON.stringify(resumes));
  const url = await ann.evaluate(() => window.wshubChat.socket.socket.url);
  assert.match(url, /&resume=%7B/, "the reconnect sent its positions");
  await say(bob, "after the restart");
  const list = await listShows(ann, "after the restart");

  const expected = ["hello from bob", "hello from ann", ...away, ...plain.map(([t]) => t), "after the restart"];
  const delivered = (await ann.evaluate(() => window.delivered))
    .filter((m) => m.action === "broadcastchatmessage").map(textOf);
  assert.deepEqual(delivered, expected, "every chat message reached the page once, in order");
  for (const m of await ann.evaluate(() => window.delivered)) assert.equal("pos" in m, false, "pos is removed");
  assert.deepEqual(list.filter((t) => !t.startsWith("disconnected")), expected,
    "the list shows each message once and no second copy of the history");
  assert.equal(await ann.evaluate(() => window.wshubChat.historyRequests), 1,
    "a recovered page does not ask for the history again");
  await ann.screenshot({ path: artifact("resume-chat-after-node-restart.png") });

  // A reload: sessionStorage still holds the positions. Something is sent
  // while the page is gone; the reloaded page resumes (recovered), is
  // replayed that, and shows the history once, merged.
  await ann.goto(`${node1.url}/healthz`);
  await publish(node2, "while reloading", [{ type: "group", value: "room" }]);
  await listShows(bob, "while reloading");
  await joinChat(ann, node1.url, "ann", "room");
  assert.match(await ann.evaluate(() => window.wshubChat.socket.socket.url), /&resume=%7B/,
    "the reloaded page connects with the stored positions");
  assert.deepEqual(await ann.evaluate(() => window.wshubChat.resumes), [{ recovered: true, replayed: 1 }]);
  await listShows(ann, "while reloading");
  // The backend's history holds what went through it (the server's plain
  // messages did not), shown once each, before what arrived since.
  const fromBackend = ["hello from bob", "hello from ann", ...away, "after the restart"];
  await listShows(ann, "— earlier messages above —");
  assert.deepEqual(await ann.$$eval("#messages li .text", (els) => els.map((el) => el.textContent.trim())),
    [...fromBackend, "— earlier messages above —", "while reloading"],
    "replayed once (plain text, which the page shows as often as it gets it), the history once, before it");
  assert.equal(await ann.evaluate(() => window.wshubChat.historyRequests), 1,
    "a reloaded page asks for the history it no longer shows, once");
  await ann.screenshot({ path: artifact("resume-chat-after-reload.png") });
  for (const p of [ann, bob]) await p.close();
});

// ---------------------------------------------------------------------------
// (b) An unchanged Web Connection page behind nginx through a SIGTERM.

// Code as a Web Connection application has it: the vendor's API, no resume
// option, nothing wshub-specific. It keeps every message it is handed.
const LEGACY_PAGE = `<!doctype html><html><body><script type="module">
  import { WebConnectionWebSocket } from "/scripts/webconnection-websocket.js";
  var socket = new WebConnectionWebSocket();
  window.socket = socket;
  window.received = [];
  window.opened = 0;
  window.closes = [];
  socket.onOpenHandler = function () { window.opened++; };
  socket.onCloseHandler = function (ev) { window.closes.push(ev.code); };
  socket.onMessageHandler = function (msg) { window.received.push(msg); };
  socket.tryConnect(true, "drain-room", "lena");
</script></body></html>`;

test("an unchanged Web Connection page behind nginx receives every message once through a SIGTERM of its node (drain handoff)", async () => {
  const env = { WSHUB_REDIS__URL: redis, ...HISTORY, WSHUB_SHUTDOWN__DRAIN_WINDOW_MS: "300" };
  const nodes = [await startNode(env), await startNode(env)];
  const lb = await startNginx(nodes);
  const before = await Promise.all(nodes.map(connectionsOn));
  const page = await newPage();
  // From the balancer's origin, as the page would be served.
  await page.goto(`${lb.url}/healthz`);
  await page.setContent(LEGACY_PAGE);
  await page.waitForFunction(() => window.opened === 1);
  const now = await Promise.all(nodes.map(connectionsOn));
  const at = now.findIndex((n, i) => n > before[i]);
  assert.ok(at >= 0, `the page's socket is on a node: ${before} -> ${now}`);
  assert.doesNotMatch(await page.evaluate(() => window.socket.socket.url), /resume/, "the page does not speak resume");
  const [victim, survivor] = at === 0 ? nodes : [nodes[1], nodes[0]];

  // A steady stream to the page's group, published at the node that stays;
  // the page's node is stopped while it flows.
  const total = 80;
  const sent = [];
  const sender = (async () => {
    for (let i = 0; i < total; i++) {
      const text = `m${String(i).padStart(3, "0")}`;
      await publish(survivor, text, [{ type: "group", value: "drain-room" }]);
      sent.push(text);
      await new Promise((r) => setTimeout(r, 25));
    }
  })();
  await page.waitForFunction(() => window.received.length >= 10);
  const stopped = stopNode(victim, "SIGTERM");
  await sender;
  await stopped;
  await page.waitForFunction((n) => window.received.length >= n, total, { timeout: 30_000 }).catch(async () => {
    const got = (await page.evaluate(() => window.received)).map((m) => m.message);
    const missing = sent.filter((t) => !got.includes(t));
    assert.fail(`${got.length} of ${total} arrived; missing ${missing.join(" ")}; closes ${
      await page.evaluate(() => window.closes.join(" "))}`);
  });
  // Anything repeated would come right behind: give it a moment to show.
  await new Promise((r) => setTimeout(r, 500));

  const received = await page.evaluate(() => window.received);
  assert.deepEqual(await page.evaluate(() => window.closes), [1001], "closed once, going away");
  assert.equal(await page.evaluate(() => window.opened), 2, "reconnected once, through nginx");
  assert.deepEqual(received.map((m) => m.message), sent, "every message once, in order");
  for (const m of received) {
    assert.deepEqual(Object.keys(m), ["userId", "groupId", "action", "message", "recipients"],
      "frames as Web Connection has them: no pos, no welcome");
  }
  assert.equal(await connectionsOn(survivor), 1, "the page is on the node that stayed");
  await page.close();
});

// ---------------------------------------------------------------------------
// (c) Pages whose identity the hub gives (review of 2026-12-02): a token's
// group and user, or a user id the hub assigned. Both were never recovered
// after a reload (the positions sent back lacked the group's or the user's
// topic), and a token page not even on a reconnect.

/**
 * Loads into `page` at `node`'s origin the working tree's library with
 * `resume: true` and `options`, `tryConnect(true, group, user)`; it
 * records welcomes and messages. (Content set on a page of the node's
 * origin, as library.test.mjs does: Chromium's local-network checks let
 * it open sockets to the node.) Loading it again in the same tab is a
 * reload: a new library object, the same sessionStorage.
 */
async function loadProbe(page, node, options, group, user) {
  await page.route("**/scripts/webconnection-websocket.js", (route) => route.fulfill({
    contentType: "text/javascript",
    body: readFileSync(join(ROOT, "static", "webconnection-websocket.js"), "utf8"),
  }));
  await page.goto(`${node.url}/healthz`);
  await page.setContent(`<!doctype html><script type="module">
    import { WebConnectionWebSocket } from "/scripts/webconnection-websocket.js";
    window.resumes = []; window.got = [];
    const ws = new WebConnectionWebSocket({ resume: true, ...${JSON.stringify(options)} });
    ws.onResumeHandler = (r) => window.resumes.push(r);
    ws.onMessageHandler = (m) => window.got.push(m.message);
    ws.tryConnect(true, ${JSON.stringify(group)}, ${JSON.stringify(user)});
    window.ws = ws;
  </script>`);
  await page.waitForFunction(() => window.resumes?.length >= 1);
}

test("a page whose identity the hub gave (a token's, an assigned user id) resumes after a reconnect and a reload", async () => {
  const secret = "resume-probe-secret-0123456789abcdef";
  const secured = await startNode({ WSHUB_REDIS__URL: redis, ...HISTORY, WSHUB_AUTH__JWT_SECRET: secret });
  const open = await startNode({ WSHUB_REDIS__URL: redis, ...HISTORY });
  const token = mintToken(secret, { sub: "tina", group: "troom", exp: Math.floor(Date.now() / 1000) + 600 });
  const cases = [
    { name: "token", node: secured, options: { token, minReconnectDelay: 200 }, group: null, user: null, room: "troom" },
    { name: "assigned user", node: open, options: { minReconnectDelay: 200 }, group: "anon", user: "", room: "anon" },
    // A page that kept passing its own user id beside the token (the
    // token's user wins): the library tracked the named user's topic,
    // not the token's, and messages to the token's user were never
    // recovered (review of 2026-12-03).
    { name: "token, another user named", node: secured, options: { token, minReconnectDelay: 200 }, group: "troom", user: "Tina T.",
      to: [{ type: "user", value: "tina" }] },
  ];
  for (const c of cases) {
    const page = await newPage();
    await loadProbe(page, c.node, c.options, c.group, c.user);
    const to = c.to ?? [{ type: "group", value: c.room }];
    await publish(c.node, `${c.name}: before`, to);
    await page.waitForFunction((t) => window.got.includes(t), `${c.name}: before`);
    // A reconnect: the socket drops; something is published meanwhile.
    await page.evaluate(() => window.ws.socket.close(3000));
    await publish(c.node, `${c.name}: while away`, to);
    await page.waitForFunction(() => window.resumes.length >= 2);
    await page.waitForFunction((t) => window.got.includes(t), `${c.name}: while away`);
    assert.deepEqual(await page.evaluate(() => window.resumes[1]), { recovered: true, replayed: 1, node: await nodeIdOf(c.node) },
      `${c.name}: the reconnect is recovered`);
    await page.unrouteAll();
    // A reload: away from the page, a message, back again (same tab, same
    // sessionStorage).
    await page.goto("about:blank");
    await publish(c.node, `${c.name}: while reloading`, to);
    await loadProbe(page, c.node, c.options, c.group, c.user);
    assert.equal(await page.evaluate(() => window.resumes[0].recovered), true, `${c.name}: the reload is recovered`);
    await page.waitForFunction((t) => window.got.includes(t), `${c.name}: while reloading`);
    await publish(c.node, `${c.name}: after`, to);
    await page.waitForFunction((t) => window.got.includes(t), `${c.name}: after`);
    assert.deepEqual(await page.evaluate(() => window.got), [`${c.name}: while reloading`, `${c.name}: after`],
      `${c.name}: once each, in order`);
    await page.close();
  }
});

/** A node's id, as its responses name it. */
async function nodeIdOf(node) {
  const res = await fetch(`${node.url}/healthz`);
  return res.headers.get("x-wshub-node-id");
}
