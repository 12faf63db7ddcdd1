// Moving a Web Connection application onto wshub (docs/migrating.md), in
// headless Chromium:
//
// - the unchanged-page route: the page's own host (nginx with
//   deploy/nginx/webconnection-site.conf) serves the page and its own copy of
//   the library, and hands /__initializeWebSocket.wc to wshub; the page's
//   code is Web Connection's, untouched;
// - the cross-origin route: a page on the site imports the library from the
//   hub (CORS) and, marked `data-hub`, opens its socket there.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { mkdirSync, copyFileSync, writeFileSync, chmodSync } from "node:fs";
import { join } from "node:path";
import { ROOT, startNode, startSiteNginx, launchBrowser, connectionsOn, tempDir, artifact, stopAll } from "./harness.mjs";

let node, site, browser;

// A page as a Web Connection application has it: its own script path, no
// URL, nothing wshub-specific. It shows what it receives.
const UNCHANGED_PAGE = `<!doctype html><html><head><title>Web Connection page</title></head><body>
<ul id="received"></ul>
<script type="module">
  import { WebConnectionWebSocket } from "/scripts/webconnection-websocket.js";
  var params = new URLSearchParams(location.search);
  var socket = new WebConnectionWebSocket();
  window.socket = socket;
  window.opened = 0;
  socket.onOpenHandler = function () { window.opened++; };
  socket.onMessageHandler = function (msg) {
    var li = document.createElement("li");
    li.textContent = msg.userId + ": " + msg.message;
    document.getElementById("received").appendChild(li);
  };
  socket.tryConnect(true, params.get("group"), params.get("user"));
  window.say = function (text) {
    var msg = socket.createBroadcastMessage("broadcastchatmessage", text);
    msg.addRecipient(params.get("group"), "group");
    socket.send(msg);
  };
</script></body></html>`;

before(async () => {
  node = await startNode({});
  const root = tempDir("wshub-browser-siteroot-");
  mkdirSync(join(root, "scripts"));
  chmodSync(join(root, "scripts"), 0o755);
  // The site's own copy of the library, as a Web Connection site has one.
  copyFileSync(join(ROOT, "static", "webconnection-websocket.js"), join(root, "scripts", "webconnection-websocket.js"));
  writeFileSync(join(root, "chat.html"), UNCHANGED_PAGE);
  writeFileSync(join(root, "cross.html"), crossOriginPage(node.url));
  site = await startSiteNginx(node, root);
  browser = await launchBrowser();
});

after(async () => {
  await browser?.close();
  await stopAll();
});

async function open(url) {
  const page = await browser.newPage();
  page.setDefaultTimeout(10_000);
  await page.goto(url);
  return page;
}

async function received(page, count) {
  await page.waitForFunction((n) => document.querySelectorAll("#received li").length >= n, count);
  return page.$$eval("#received li", (lis) => lis.map((li) => li.textContent));
}

test("an unchanged Web Connection page on its own host: nginx hands the socket to wshub", async () => {
  const before = await connectionsOn(node);
  const ann = await open(`${site.url}/chat.html?group=room&user=ann`);
  const bob = await open(`${site.url}/chat.html?group=room&user=bob`);
  for (const p of [ann, bob]) await p.waitForFunction(() => window.opened === 1);
  assert.equal(await connectionsOn(node), before + 2, "both sockets are on wshub");
  // The socket URL is the page's own host: nothing in the page names wshub.
  assert.equal(await ann.evaluate(() => window.socket.socket.url),
    `${site.url.replace("http", "ws")}/__initializeWebSocket.wc?groupid=room&userid=ann`);
  await ann.evaluate(() => window.say("hello through the site"));
  assert.deepEqual(await received(bob, 1), ["ann: hello through the site"]);
  await bob.evaluate(() => window.say("hi ann"));
  assert.deepEqual(await received(ann, 2), ["ann: hello through the site", "bob: hi ann"]);
  await ann.screenshot({ path: artifact("unchanged-page-behind-site-nginx.png") });
  // The site never passes the broadcast endpoint on: wshub would trust it.
  const push = await fetch(`${site.url}/app/__broadcastWebSocket.wc`, { method: "POST", body: "{}" });
  assert.equal(push.status, 403);
  await ann.close();
  await bob.close();
});

// A page that imports the library from the hub, on another origin, and
// names the hub with data-hub instead of passing a URL.
function crossOriginPage(hub) {
  return `<!doctype html><html><body><ul id="received"></ul>
<script type="module" data-hub>
  import { WebConnectionWebSocket } from "${hub}/scripts/westwind-websocket.js";
  var socket = new WebConnectionWebSocket();
  window.socket = socket;
  socket.onOpenHandler = function () {
    var msg = socket.createBroadcastMessage("broadcastchatmessage", "from another origin");
    msg.addRecipient("cross", "group");
    socket.send(msg);
  };
  socket.onMessageHandler = function (msg) {
    var li = document.createElement("li");
    li.textContent = msg.userId + ": " + msg.message;
    document.getElementById("received").appendChild(li);
  };
  socket.tryConnect(true, "cross", "carol");
</script></body></html>`;
}

test("a page on another origin imports the library from the hub and, with data-hub, connects there", async () => {
  const page = await open(`${site.url}/cross.html`);
  assert.deepEqual(await received(page, 1), ["carol: from another origin"]);
  assert.equal(await page.evaluate(() => window.socket.socket.url),
    `${node.url.replace("http", "ws")}/__initializeWebSocket.wc?groupid=cross&userid=carol`);
  await page.close();
});
