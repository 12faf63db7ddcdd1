// The browser library's connection handling in headless Chromium, where the
// close events are the browser's own: against a real wshub node for what
// the hub does, and against a stand-in server (harness.mjs) for close codes
// this version of the hub never sends (4003, 4005).
//
// "It did not reconnect" is shown without sleeping: a control client in the
// same page, closed after the others, reconnects only after a delay ten
// times theirs, so by the time its second socket reaches the server, any
// reconnect of theirs would have reached it first.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { ROOT, startNode, startCloseServer, launchBrowser, connectionsOn, stopAll } from "./harness.mjs";

let node, closer, browser;

before(async () => {
  node = await startNode({});
  closer = await startCloseServer();
  browser = await launchBrowser();
});

after(async () => {
  try {
    await browser?.close();
  } finally {
    await stopAll();
  }
});

/**
 * A page from `origin` (a local origin, as Chromium's network checks want)
 * with the library loaded as `window.lib`. The library is the working
 * tree's file, not the copy compiled into the wshub binary, so that these
 * tests never run a stale one.
 */
async function pageWithLibrary(origin) {
  const page = await browser.newPage();
  page.setDefaultTimeout(10_000);
  await page.route("**/scripts/webconnection-websocket.js", (route) => route.fulfill({
    contentType: "text/javascript",
    body: readFileSync(join(ROOT, "static", "webconnection-websocket.js"), "utf8"),
  }));
  await page.goto(`${origin}/healthz`);
  await page.setContent(`<!doctype html><script type="module">
    import * as lib from "/scripts/webconnection-websocket.js";
    window.lib = lib;
    window.log = [];
  </script>`);
  await page.waitForFunction(() => window.lib);
  return page;
}

/** Polls `check` (no fixed sleep) until it holds or 10 s have passed; returns its last value. */
async function eventually(check) {
  const deadline = Date.now() + 10_000;
  for (;;) {
    const value = await check();
    if (value || Date.now() > deadline) return value;
    await new Promise((r) => setTimeout(r, 25));
  }
}

test("a message far over limits.max_message_bytes closes with 1009 in the browser, not 1006", async () => {
  // The hub refuses it from its header; unless it reads and discards the
  // rest until the browser closes, the connection is reset and Chromium
  // drops the close frame (reviewer: 1006 from 66 KB to 1 MB).
  const page = await pageWithLibrary(node.url);
  const codes = await page.evaluate(async (url) => {
    const out = [];
    for (const size of [70_000, 1_000_000, 4_000_000]) {
      out.push(await new Promise((resolve) => {
        const ws = new WebSocket(`${url.replace("http", "ws")}/ws?userid=big`);
        ws.onopen = () => ws.send(JSON.stringify({ action: "x", message: "y".repeat(size) }));
        ws.onclose = (ev) => resolve(`${size}: ${ev.code} ${ev.reason}`);
      }));
    }
    return out;
  }, node.url);
  assert.deepEqual(codes, [
    "70000: 1009 Message too big",
    "1000000: 1009 Message too big",
    "4000000: 1009 Message too big",
  ]);
  await page.close();
});

test("tryConnect on a connected page closes the old socket on the hub, silently", async () => {
  const page = await pageWithLibrary(node.url);
  const base = await connectionsOn(node);
  await page.evaluate(() => {
    const ws = new window.lib.WebConnectionWebSocket();
    window.ws = ws;
    ws.onOpenHandler = () => window.log.push("open");
    ws.onCloseHandler = (ev) => window.log.push(`close ${ev.code}`);
    ws.onMessageHandler = (m) => window.log.push(`message ${m.groupId} ${m.message}`);
    ws.tryConnect(true, "first", "ann");
  });
  await page.waitForFunction(() => window.log.includes("open"));
  assert.equal(await connectionsOn(node), base + 1);
  await page.evaluate(() => window.ws.tryConnect(true, "second", "ann"));
  await page.waitForFunction(() => window.log.filter((e) => e === "open").length === 2);
  assert.equal(await eventually(async () => (await connectionsOn(node)) === base + 1), true,
    `the hub still holds ${(await connectionsOn(node)) - base} sockets of this page`);
  // The new socket is in the new group, and nothing of the old one was reported.
  await page.evaluate(() => {
    const m = window.ws.createBroadcastMessage("broadcast", "in second");
    m.addRecipient("second");
    window.ws.send(m);
  });
  await page.waitForFunction(() => window.log.length === 3);
  assert.deepEqual(await page.evaluate(() => window.log), ["open", "open", "message second in second"]);
  await page.close();
});

test("a page that passes numbers as ids to tryConnect sends and receives (as with the original hub)", async () => {
  // The library copies the ids into each message as given: {"userId":42,
  // "groupId":7,...,"recipients":[{"type":"group","value":7}]}. The
  // original hub reads them with Json.NET, which takes numbers for its
  // string fields; wshub refused every such message (review of 2026-12-03).
  const page = await pageWithLibrary(node.url);
  await page.evaluate(() => {
    const ws = new window.lib.WebConnectionWebSocket();
    window.ws = ws;
    ws.onOpenHandler = () => window.log.push("open");
    ws.onMessageHandler = (m) => window.log.push(`${m.action} ${m.userId} ${m.groupId} ${m.message}`);
    ws.tryConnect(true, 7, 42);
  });
  await page.waitForFunction(() => window.log.includes("open"));
  await page.evaluate(() => {
    const m = window.ws.createBroadcastMessage("broadcast", "to group 7");
    m.addRecipient(7);
    window.ws.send(m);
    const u = window.ws.createBroadcastMessage("broadcast", "to user 42");
    u.addRecipient(42, "user");
    window.ws.send(u);
  });
  await page.waitForFunction(() => window.log.length === 3);
  assert.deepEqual(await page.evaluate(() => window.log), [
    "open",
    "broadcast 42 7 to group 7",
    "broadcast 42 7 to user 42",
  ]);
  await page.close();
});

test("close() fires onCloseHandler with the hub's close event", async () => {
  const page = await pageWithLibrary(node.url);
  await page.evaluate(() => {
    const ws = new window.lib.WebConnectionWebSocket();
    ws.onOpenHandler = () => ws.close();
    ws.onCloseHandler = (ev) => window.log.push([ev.code, ev.reason, ev.wasClean, ws.state]);
    ws.tryConnect(true, "g", "closer");
  });
  await page.waitForFunction(() => window.log.length > 0);
  assert.deepEqual(await page.evaluate(() => window.log), [[1000, "Socket closed", true, "closed"]]);
  await page.close();
});

test("close() with a code or reason Chromium refuses throws, and leaves no socket behind", async () => {
  // Review of 2026-12-03: the library marked itself closed before the
  // browser refused the close, which left an open socket nobody held on
  // the hub (and a second one after the next tryConnect).
  const page = await pageWithLibrary(node.url);
  const base = await connectionsOn(node);
  await page.evaluate(() => {
    const ws = new window.lib.WebConnectionWebSocket();
    window.ws = ws;
    ws.onOpenHandler = () => window.log.push("open");
    ws.onCloseHandler = (ev) => window.log.push(`close ${ev.code}`);
    ws.tryConnect(true, "g", "refused-close");
  });
  await page.waitForFunction(() => window.log.includes("open"));
  const thrown = await page.evaluate(() => {
    const out = [];
    for (const args of [[1001], [1000, "x".repeat(200)]]) {
      try {
        window.ws.close(...args);
        out.push("closed");
      } catch (e) {
        out.push(`${e.name} ${window.ws.state} ${window.ws.socket?.readyState}`);
      }
    }
    return out;
  });
  assert.deepEqual(thrown, ["InvalidAccessError open 1", "SyntaxError open 1"]);
  assert.equal(await connectionsOn(node), base + 1);
  // Then an accepted close, and a new connect: one socket on the hub.
  await page.evaluate(() => window.ws.close());
  await page.waitForFunction(() => window.log.includes("close 1000"));
  await page.evaluate(() => window.ws.tryConnect(true, "g", "refused-close"));
  await page.waitForFunction(() => window.log.filter((e) => e === "open").length === 2);
  assert.equal(await eventually(async () => (await connectionsOn(node)) === base + 1), true,
    `the hub holds ${(await connectionsOn(node)) - base} sockets of this page`);
  await page.close();
});

test("no reconnect after 1002, 4003 (session replaced) or 4005 (disconnected), a reconnect after 4000", async () => {
  const page = await pageWithLibrary(closer.url);
  const subjects = [1002, 4003, 4005];
  await page.evaluate(([base, subjects]) => {
    window.client = (code, delay) => {
      const ws = new window.lib.WebConnectionWebSocket({ url: base, minReconnectDelay: delay, maxReconnectDelay: delay });
      ws.onOpenHandler = () => window.log.push(`${code} open`);
      ws.onCloseHandler = (ev) => window.log.push(`${code} closed with ${ev.code}, ${ws.state}`);
      ws.tryConnect(true, String(code), `user${code}`);
    };
    // Reconnect delays of 10-20 ms, if they were to reconnect.
    for (const code of subjects) window.client(code, 20);
  }, [closer.url.replace("http", "ws"), subjects]);
  await page.waitForFunction((n) => window.log.filter((e) => e.includes("closed with")).length === n, subjects.length);
  // The control: closed with 4000 after the others, back after 100-200 ms.
  await page.evaluate(() => window.client(4000, 200));
  await page.waitForFunction(() => window.log.filter((e) => e === "4000 open").length === 2);
  const log = await page.evaluate(() => window.log);
  assert.deepEqual(
    subjects.map((code) => [code, closer.connections(code), log.filter((e) => e.startsWith(`${code} `))]),
    subjects.map((code) => [code, 1, [`${code} open`, `${code} closed with ${code}, closed`]]),
  );
  assert.equal(closer.connections(4000), 2);
  assert.deepEqual(log.filter((e) => e.startsWith("4000 ")), ["4000 open", "4000 closed with 4000, reconnecting", "4000 open"]);
  await page.close();
});
