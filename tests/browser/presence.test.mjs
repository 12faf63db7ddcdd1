// The chat sample's member list (cluster presence, docs/presence.md) in
// headless Chromium, across two wshub nodes on one Redis, all started here
// (a missing redis-server, wshub binary or Chromium fails the suite). The
// screenshot of the list goes to test-artifacts/browser/.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { startRedis, startNode, stopNode, freePort, launchBrowser, artifact, stopAll } from "./harness.mjs";

let node1, node2, browser;

const PRESENCE = {
  WSHUB_PRESENCE__ENABLED: "true",
  WSHUB_PRESENCE__HEARTBEAT_MS: "200",
  WSHUB_PRESENCE__LEASE_MS: "1000",
  WSHUB_PRESENCE__LEAVE_DELAY_MS: "500",
};

before(async () => {
  const redis = await startRedis();
  node1 = await startNode({ WSHUB_REDIS__URL: redis, ...PRESENCE });
  node2 = await startNode({ WSHUB_REDIS__URL: redis, ...PRESENCE });
  browser = await launchBrowser();
});

after(async () => {
  try {
    await browser?.close();
  } finally {
    await stopAll();
  }
});

async function join(base, user, group) {
  const page = await browser.newPage({ viewport: { width: 760, height: 560 } });
  page.setDefaultTimeout(10_000);
  await page.goto(`${base}/`);
  await page.fill("#user", user);
  await page.fill("#group", group);
  await page.click("#connect");
  await page.waitForSelector('#status[data-state="open"]');
  return page;
}

/** Waits until the page lists exactly `users` (sorted), and returns them. */
async function membersAre(page, users) {
  await page.waitForFunction((want) => {
    const shown = [...document.querySelectorAll("#member-list li")].map((li) => li.dataset.user);
    return JSON.stringify(shown) === JSON.stringify(want);
  }, users);
  return page.$$eval("#member-list li", (lis) => lis.map((li) => li.dataset.user));
}

async function systemLines(page) {
  return page.$$eval("#messages li.presence", (lis) => lis.map((li) => li.textContent));
}

test("the chat sample shows the room's members live across two nodes, with join and leave lines", async () => {
  const ann = await join(node1.url, "ann", "lobby");
  assert.deepEqual(await membersAre(ann, ["ann"]), ["ann"]);
  const bob = await join(node2.url, "bob", "lobby");
  await membersAre(bob, ["ann", "bob"]);
  await membersAre(ann, ["ann", "bob"]);
  await ann.waitForFunction(() => [...document.querySelectorAll("#messages li.presence")]
    .some((li) => li.textContent === "bob joined"));
  // Someone in another room is not listed.
  const eve = await join(node1.url, "eve", "elsewhere");
  await membersAre(eve, ["eve"]);
  // A second tab of ann's, on the other node: still one member, two sockets.
  const ann2 = await join(node2.url, "ann", "lobby");
  await membersAre(ann2, ["ann", "bob"]);
  assert.equal(await ann2.textContent("#member-count"), "In the room (2)");
  await ann.screenshot({ path: artifact("presence-members-ann-node1.png") });
  await bob.screenshot({ path: artifact("presence-members-bob-node2.png") });

  // Bob leaves: after the leave delay both of ann's tabs drop him and say so.
  await bob.close();
  for (const page of [ann, ann2]) {
    await membersAre(page, ["ann"]);
    assert.ok((await systemLines(page)).includes("bob left"), (await systemLines(page)).join(" | "));
  }
  assert.equal(await ann.textContent("#member-count"), "In the room (1)");
  await ann.screenshot({ path: artifact("presence-after-bob-left.png") });
  for (const p of [ann, ann2, eve]) await p.close();
});

test("a room back at max_members_events after being over shows its members as they are", async () => {
  // Over the limit a room gets no join or leave frames; the leave that
  // brings it back sends every page the whole list (docs/presence.md).
  const redis = await startRedis();
  const env = { WSHUB_REDIS__URL: redis, ...PRESENCE, WSHUB_PRESENCE__MAX_MEMBERS_EVENTS: "2" };
  const nodeA = await startNode(env);
  const nodeB = await startNode(env);
  const ann = await join(nodeA.url, "ann", "big");
  const bob = await join(nodeB.url, "bob", "big");
  await membersAre(ann, ["ann", "bob"]);
  // Carol makes three: no join frame, so ann's list stays as it was.
  const carol = await join(nodeB.url, "carol", "big");
  await membersAre(carol, ["ann", "bob", "carol"]);
  await new Promise((r) => setTimeout(r, 1000));
  assert.deepEqual(await membersAre(ann, ["ann", "bob"]), ["ann", "bob"]);
  // Bob goes: the room is back at two, and ann's page gets the list
  // (without it, ann would still show bob and never carol).
  await bob.close();
  assert.deepEqual(await membersAre(ann, ["ann", "carol"]), ["ann", "carol"]);
  await membersAre(carol, ["ann", "carol"]);
  assert.equal(await ann.textContent("#member-count"), "In the room (2)");
  await ann.screenshot({ path: artifact("presence-back-at-max-members-events.png") });
  for (const p of [ann, carol]) await p.close();
});

test("with presence off the sample shows no member list and no error", async () => {
  const plain = await startNode({ WSHUB_REDIS__URL: (await startRedis()) });
  const page = await join(plain.url, "solo", "quiet");
  // The request was refused; a message round trip later the list is hidden.
  await page.fill("#text", "ping");
  await page.click("#send");
  await page.waitForFunction(() => document.querySelectorAll("#messages li").length >= 1);
  assert.equal(await page.$eval("#members", (el) => el.hidden), true);
  assert.deepEqual(await page.$$eval("#messages li.error", (lis) => lis.length), 0);
  await page.close();
  // The library itself (the node's copy): the hub's answer to its members
  // request reaches onPresenceOffHandler, and onMessageHandler gets
  // nothing of it (it got "reserved for the hub" before).
  const lib = await browser.newPage();
  lib.setDefaultTimeout(10_000);
  await lib.goto(`${plain.url}/healthz`);
  const seen = await lib.evaluate(async () => {
    const { WebConnectionWebSocket } = await import("/scripts/webconnection-websocket.js");
    const ws = new WebConnectionWebSocket({ presence: true });
    const events = [];
    const messages = [];
    ws.onPresenceHandler = (ev) => events.push(ev);
    ws.onPresenceOffHandler = (text) => events.push(text);
    ws.onMessageHandler = (msg) => messages.push(msg);
    ws.tryConnect(true, "room", "ann");
    const deadline = Date.now() + 5000;
    while (events.length === 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 25));
    // A round trip later nothing else has come.
    ws.send(JSON.stringify({ action: "echo", message: "after" }));
    while (messages.length === 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 25));
    ws.close();
    return { events, messages };
  });
  assert.deepEqual(seen.events, [
    "presence is off on this hub (presence.enabled = false): `wshub.presence` is not answered",
  ]);
  assert.deepEqual(seen.messages.map((m) => m.action), ["echo"]);
  await lib.close();
});

test("with history on too, a page whose node restarts resumes what it missed and gets its member list back", async () => {
  // The sample opts in to both: lossless resume (issue 14) and presence.
  const redis = await startRedis();
  const port = await freePort();
  const env = { WSHUB_REDIS__URL: redis, ...PRESENCE, WSHUB_HISTORY__ENABLED: "true" };
  let nodeA = await startNode({ ...env, WSHUB_LISTEN: `127.0.0.1:${port}` });
  const nodeB = await startNode(env);
  const ann = await join(nodeA.url, "ann", "both");
  const bob = await join(nodeB.url, "bob", "both");
  await membersAre(ann, ["ann", "bob"]);
  await membersAre(bob, ["ann", "bob"]);
  await ann.waitForFunction(() => window.wshubChat.resumes.length >= 1);

  // Ann's node dies: her presence goes with its lease; bob speaks meanwhile.
  await stopNode(nodeA, "SIGKILL");
  await ann.waitForSelector('#status[data-state="reconnecting"]');
  await membersAre(bob, ["bob"]);
  await bob.fill("#text", "while ann is away");
  await bob.click("#send");
  await bob.waitForFunction(() => [...document.querySelectorAll("#messages li .text")]
    .some((el) => el.textContent.trim() === "while ann is away"));

  // Back on the same address: recovered, the message once, the list again.
  nodeA = await startNode({ ...env, WSHUB_LISTEN: `127.0.0.1:${port}` });
  await ann.waitForFunction(() => window.wshubChat.resumes.length >= 2, null, { timeout: 30_000 });
  const resumes = await ann.evaluate(() => window.wshubChat.resumes);
  assert.equal(resumes[1].recovered, true, JSON.stringify(resumes));
  await ann.waitForFunction(() => [...document.querySelectorAll("#messages li .text")]
    .some((el) => el.textContent.trim() === "while ann is away"));
  const texts = await ann.$$eval("#messages li .text", (els) => els.map((el) => el.textContent.trim()));
  assert.equal(texts.filter((t) => t === "while ann is away").length, 1, texts.join(" | "));
  await membersAre(ann, ["ann", "bob"]);
  await membersAre(bob, ["ann", "bob"]);
  await ann.screenshot({ path: artifact("presence-and-resume-after-node-restart.png") });
  for (const p of [ann, bob]) await p.close();
});
