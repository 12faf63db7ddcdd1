// The chat sample and the browser library in headless Chromium, against a
// real cluster: Redis, two wshub nodes, nginx with the repository's config.
// Run by scripts/test (`node --test tests/browser/`); screenshots go to
// test-artifacts/browser/.
//
// "Nobody else got it" is shown without sleeping: the same sender then
// sends a marker that does reach the page, and per-sender order means
// anything that leaked would have arrived before the marker.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import {
  startRedis, startNode, startNginx, launchBrowser, connectionsOn, artifact, stopAll, mintToken,
} from "./harness.mjs";

let redis, node1, node2, lb, browser;

before(async () => {
  redis = await startRedis();
  node1 = await startNode({ WSHUB_REDIS__URL: redis });
  node2 = await startNode({ WSHUB_REDIS__URL: redis });
  lb = await startNginx([node1, node2]);
  browser = await launchBrowser();
});

after(async () => {
  try {
    await browser?.close();
  } finally {
    await stopAll();
  }
});

/** Opens the chat page at `base` and joins as `user` in `group`. */
async function join(base, user, group) {
  const page = await browser.newPage({ viewport: { width: 720, height: 560 } });
  page.setDefaultTimeout(10_000);
  page.dialogs = [];
  page.on("dialog", (d) => { page.dialogs.push(d.message()); d.dismiss(); });
  await page.goto(`${base}/`);
  await page.fill("#user", user);
  await page.fill("#group", group);
  await page.click("#connect");
  await page.waitForSelector('#status[data-state="open"]');
  return page;
}

async function say(page, text) {
  await page.fill("#text", text);
  await page.click("#send");
}

/** Sends a raw message through the page's own socket. */
async function sendRaw(page, action, message, recipients) {
  await page.evaluate(([action, message, recipients]) => {
    const ws = window.wshubChat.socket;
    const msg = ws.createBroadcastMessage(action, message);
    for (const [value, type] of recipients) msg.addRecipient(value, type);
    ws.send(msg);
  }, [action, message, recipients]);
}

/** The texts of a page's message list, waiting until `count` are shown. */
async function messages(page, count) {
  await page.waitForFunction((n) => document.querySelectorAll("#messages li").length >= n, count);
  return page.$$eval("#messages li", (lis) => lis.map((li) => ({
    own: li.classList.contains("own"),
    text: li.querySelector(".text").textContent,
  })));
}

test("two pages on two nodes chat in a group, each sees both, its own highlighted", async () => {
  const ann = await join(node1.url, "ann", "room");
  const bob = await join(node2.url, "bob", "room");
  await say(ann, "hello from ann");
  await messages(bob, 1);
  await say(bob, "hi ann");
  const annSees = await messages(ann, 2);
  const bobSees = await messages(bob, 2);
  assert.deepEqual(annSees, [{ own: true, text: "hello from ann" }, { own: false, text: "hi ann" }]);
  assert.deepEqual(bobSees, [{ own: false, text: "hello from ann" }, { own: true, text: "hi ann" }]);
  await ann.screenshot({ path: artifact("chat-ann-node1.png") });
  await bob.screenshot({ path: artifact("chat-bob-node2.png") });
  await ann.close();
  await bob.close();
});

test("another group sees nothing; a message to one user reaches all of that user's tabs only", async () => {
  const ann = await join(node1.url, "ann", "room");
  const eve = await join(node2.url, "eve", "other");
  const carol1 = await join(node1.url, "carol", "room");
  const carol2 = await join(node2.url, "carol", "room");
  const dave = await join(node2.url, "dave", "room");
  await say(ann, "for the room only");
  await sendRaw(ann, "direct", "just for carol", [["carol", "user"]]);
  // Markers from the same sender, after the messages above.
  await sendRaw(ann, "marker", "to other", [["other", "group"]]);
  await sendRaw(ann, "marker", "to dave", [["dave", "user"]]);
  assert.deepEqual((await messages(eve, 1)).map((m) => m.text), ["[marker] to other"]);
  assert.deepEqual((await messages(dave, 2)).map((m) => m.text), ["for the room only", "[marker] to dave"]);
  for (const carol of [carol1, carol2]) {
    assert.deepEqual((await messages(carol, 2)).map((m) => m.text), ["for the room only", "[direct] just for carol"]);
  }
  for (const p of [ann, eve, carol1, carol2, dave]) await p.close();
});

test("editing the group field without reconnecting does not move where messages go", async () => {
  const ann = await join(node1.url, "ann", "drift");
  const bob = await join(node2.url, "bob", "drift");
  const eve = await join(node2.url, "eve", "elsewhere");
  // Ann types another group but does not press Connect: she is still in
  // "drift", and her messages must still reach "drift", not "elsewhere".
  await ann.fill("#group", "elsewhere");
  await say(ann, "still in drift");
  await sendRaw(ann, "marker", "to elsewhere", [["elsewhere", "group"]]);
  assert.deepEqual((await messages(bob, 1)).map((m) => m.text), ["still in drift"]);
  assert.deepEqual((await messages(eve, 1)).map((m) => m.text), ["[marker] to elsewhere"]);
  // The page says that the field no longer matches the connection.
  assert.match(await ann.textContent("#status"), /press Reconnect to join elsewhere/);
  for (const p of [ann, bob, eve]) await p.close();
});

test("Reconnect into another group starts with an empty list; a name of spaces is refused", async () => {
  const ann = await join(node1.url, "ann", "room-a");
  await say(ann, "said in room-a");
  await messages(ann, 1);
  await ann.fill("#group", "room-b");
  await ann.click("#connect");
  await ann.waitForFunction(() => window.wshubChat.socket.groupId === "room-b"
    && document.querySelector("#status").dataset.state === "open");
  const texts = await ann.$$eval("#messages li .text", (els) => els.map((el) => el.textContent));
  assert.ok(!texts.includes("said in room-a"), texts.join(" | "));
  const page = await browser.newPage();
  await page.goto(`${node1.url}/`);
  await page.fill("#user", "  \u200b\u200e\u3164 ");
  await page.fill("#group", "room-a");
  await page.click("#connect");
  assert.equal(await page.evaluate(() => document.querySelector("#user").validity.valid), false);
  assert.equal(await page.evaluate(() => window.wshubChat.socket ?? null), null, "no socket was opened");
  for (const p of [ann, page]) await p.close();
});

test("HTML and script in a message are shown as text, never run", async () => {
  const ann = await join(node1.url, "ann", "xss");
  const bob = await join(node2.url, "bob", "xss");
  const evil = `<img src=x onerror="window.__pwned=1;alert(1)"><script>window.__pwned=2</script><b>bold?</b>`;
  await say(ann, evil);
  // Also a forged "rendered" message, as a client could send without a backend.
  await sendRaw(ann, "broadcastchatmessage",
    JSON.stringify({ text: "x", html: `<img src=x onerror="window.__pwned=3"><a href="javascript:window.__pwned=4">a</a>` }),
    [["xss", "group"]]);
  const seen = await messages(bob, 2);
  assert.equal(seen[0].text, evil, "shown exactly as typed");
  assert.equal(await bob.$$eval("#messages img, #messages script, #messages [onerror]", (x) => x.length), 0);
  assert.equal(await bob.$$eval('#messages a[href^="javascript"]', (x) => x.length), 0);
  await bob.click("#messages a").catch(() => {});
  assert.equal(await bob.evaluate(() => window.__pwned), undefined);
  assert.deepEqual(bob.dialogs, []);
  await bob.screenshot({ path: artifact("xss-shown-as-text.png") });
  await ann.close();
  await bob.close();
});

test("code written against Web Connection's documented API runs unchanged", async () => {
  // A page as a Web Connection application would have it: classic style,
  // the vendor's module name, no wshub-specific code.
  const html = `<!doctype html><html><body><script type="module">
    import { WebConnectionWebSocket } from "/scripts/web-connection-websocket.js";
    var received = [];
    window.received = received;
    var socket = new WebConnectionWebSocket();
    socket.onMessageHandler = function (msg) { received.push(msg); };
    socket.onOpenHandler = function () {
      var msg = socket.createBroadcastMessage("broadcastchatmessage", "hello from classic code");
      msg.addRecipient("legacy", "group");
      socket.send(msg);
    };
    socket.tryConnect(true, "legacy", "classic");
  </script></body></html>`;
  const watcher = await join(node2.url, "watcher", "legacy");
  const page = await browser.newPage();
  page.setDefaultTimeout(10_000);
  // The page must come from the hub's origin, as a Web Connection page
  // does (a page Playwright made up is not a local origin, and Chromium's
  // local network checks would block its socket): open a real hub URL,
  // then replace the document.
  await page.goto(`${node1.url}/healthz`);
  await page.setContent(html);
  await page.waitForFunction(() => window.received.length >= 1);
  assert.deepEqual(await page.evaluate(() => window.received[0]), {
    userId: "classic", groupId: "legacy", action: "broadcastchatmessage", message: "hello from classic code",
    recipients: [{ type: "group", value: "legacy" }],
  });
  assert.deepEqual((await messages(watcher, 1)).map((m) => m.text), ["hello from classic code"]);
  await page.close();
  await watcher.close();
});

test("token mode: the token travels in the protocol list and decides the identity", async () => {
  const secret = "browser-test-secret-0123456789abcdef";
  const secured = await startNode({ WSHUB_REDIS__URL: redis, WSHUB_AUTH__JWT_SECRET: secret });
  const token = mintToken(secret, { sub: "tina", group: "vip", exp: Math.floor(Date.now() / 1000) + 600 });
  const page = await browser.newPage();
  page.setDefaultTimeout(10_000);
  await page.goto(`${secured.url}/healthz`);
  await page.setContent(`<!doctype html><script type="module">
    import { WebConnectionWebSocket } from "/scripts/webconnection-websocket.js";
    window.received = [];
    const ws = new WebConnectionWebSocket({ token: ${JSON.stringify(token)}, tokenInProtocol: true });
    ws.onMessageHandler = (m) => window.received.push(m);
    ws.onOpenHandler = () => {
      window.protocol = ws.socket.protocol;
      // Claims to be someone else: the hub stamps the token's identity.
      const m = ws.createBroadcastMessage("hello", "from tina");
      m.userId = "mallory";
      ws.send(m);
    };
    ws.tryConnect(false, "ignored-group", "ignored-user");
  </script>`);
  await page.waitForFunction(() => window.received.length >= 1);
  assert.equal(await page.evaluate(() => window.protocol), "wshub");
  const got = await page.evaluate(() => window.received[0]);
  assert.deepEqual([got.userId, got.groupId, got.message], ["tina", "vip", "from tina"]);
  // Without a token the same page is refused.
  const refused = await page.evaluate((url) => new Promise((resolve) => {
    const s = new WebSocket(url);
    s.onopen = () => resolve("open");
    s.onclose = (e) => resolve(`closed ${e.code}`);
  }), `${secured.url.replace("http", "ws")}/ws?userid=x`);
  assert.equal(refused, "closed 1006");
  await page.close();
  secured.process.kill("SIGTERM");
});

// Last: it kills a node.
test("when its node dies the page reconnects through the balancer, and what was typed meanwhile is sent", async () => {
  const observerOn2 = await join(node2.url, "olga", "room");
  const observerOn1 = await join(node1.url, "otto", "room");
  const before = [await connectionsOn(node1), await connectionsOn(node2)];
  // Loaded through nginx: its socket goes through nginx too.
  const paul = await join(lb.url, "paul", "room");
  const after = [await connectionsOn(node1), await connectionsOn(node2)];
  const onNode = after[0] > before[0] ? node1 : node2;
  assert.equal(after[0] + after[1], before[0] + before[1] + 1, "paul has one socket");
  const [victim, observer] = onNode === node1 ? [node1, observerOn2] : [node2, observerOn1];

  await say(paul, "before the crash");
  await messages(observer, 1);
  victim.process.kill("SIGKILL");
  await paul.waitForSelector('#status[data-state="reconnecting"]');
  await say(paul, "typed while disconnected");
  await paul.waitForSelector('#status[data-state="open"]', { timeout: 15_000 });
  const seen = (await messages(observer, 2)).map((m) => m.text);
  assert.deepEqual(seen, ["before the crash", "typed while disconnected"]);
  await say(paul, "after the reconnect");
  assert.deepEqual((await messages(observer, 3)).map((m) => m.text).at(-1), "after the reconnect");
  const paulSees = (await messages(paul, 3)).map((m) => m.text);
  assert.ok(paulSees.includes("typed while disconnected") && paulSees.includes("after the reconnect"), paulSees.join(" | "));
  await paul.screenshot({ path: artifact("reconnected-through-nginx.png") });
  await observer.screenshot({ path: artifact("observer-after-node-death.png") });
});
