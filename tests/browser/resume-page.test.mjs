// The chat sample's side of lossless resume (issue 14) in headless Chromium,
// against a stand-in hub (harness.mjs) that this test drives frame by
// frame: what the page and the library do with the welcome, `pos`, gap
// notices and histories, whatever a hub's timing. resume.test.mjs runs the
// same page against real nodes.
//
// "The page did not ask" is shown without sleeping: the page then sends a
// chat message, and the stand-in's next frame from it must be that message.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { startStandInHub, launchBrowser, artifact, stopAll } from "./harness.mjs";

let hub, browser;

before(async () => {
  hub = await startStandInHub();
  browser = await launchBrowser();
});

after(async () => {
  try {
    await browser?.close();
  } finally {
    await stopAll();
  }
});

const T0 = Date.UTC(2025, 0, 1, 12, 0, 0);

/** A chat entry as the sample backend sends it (`message` is JSON text with a time). */
function entry(user, text, minute) {
  const time = T0 + minute * 60_000;
  return { userId: user, text, html: `<p>${text}</p>`, time };
}

function chat(e, pos) {
  return { userId: e.userId, groupId: "room", action: "broadcastchatmessage", message: JSON.stringify(e),
    recipients: [{ type: "group", value: "room" }], pos };
}

function history(group, entries, pos) {
  return { userId: null, groupId: group, action: "initialmessages", message: JSON.stringify(entries),
    recipients: [{ type: "user", value: "ann" }], pos };
}

function welcome(recovered, replayed, positions) {
  return { userId: "ann", groupId: "room", action: "wshub.welcome",
    message: JSON.stringify({ recovered, replayed, positions, node: "stand-in" }), recipients: [] };
}

async function join(page) {
  await page.goto(`${hub.url}/`);
  await page.fill("#user", "ann");
  await page.fill("#group", "room");
  await page.click("#connect");
}

async function texts(page) {
  return page.$$eval("#messages li .text", (els) => els.map((el) => el.textContent));
}

async function shows(page, text) {
  await page.waitForFunction((t) => [...document.querySelectorAll("#messages li .text")]
    .some((el) => el.textContent === t), text);
  return texts(page);
}

/** The page's next frame other than the library's request for the group's
 *  members, which the sample (`presence: true`) sends on every open; this
 *  stand-in does not answer it, so the member list stays empty. */
async function nextFrame(socket) {
  for (;;) {
    const frame = await socket.nextFrame();
    if (frame.action !== "wshub.presence") return frame;
  }
}

/** The page's next frame is the chat message it is told to send now: it sent nothing else before. */
async function sendsNothingBut(page, socket, text) {
  await page.fill("#text", text);
  await page.click("#send");
  const frame = await nextFrame(socket);
  assert.deepEqual([frame.action, frame.message], ["broadcastchatmessage", text], JSON.stringify(frame));
}

test("the chat page asks for the history only when not recovered or when it shows none, and shows each entry once", async () => {
  const page = await browser.newPage({ viewport: { width: 720, height: 560 } });
  page.setDefaultTimeout(10_000);
  await join(page);

  // First connection: resume= (empty); not recovered; the page asks, to itself.
  const s1 = await hub.next();
  assert.equal(s1.query.get("resume"), "");
  assert.equal(s1.query.get("presence"), "1", "the sample opts in to presence as well");
  s1.send(welcome(false, 0, { all: "a:0", "group:room": "g:0", "user:ann": "u:0" }));
  const ask = await nextFrame(s1);
  assert.equal(ask.action, "getinitialmessages");
  assert.deepEqual(ask.recipients, [{ type: "user", value: "ann" }], "addressed to its own user");
  const e1 = entry("bob", "one", 1);
  const e2 = entry("bob", "two", 2);
  const missed = entry("bob", "sent while away", 3);
  const e3 = entry("carol", "three", 4);
  // Another tab of ann's, in another group, asked too: not this page's history.
  s1.send(history("elsewhere", [entry("eve", "not for this group", 0)], { all: "a:1", "user:ann": "u:1" }));
  s1.send(history("room", [e1], { all: "a:2", "user:ann": "u:2" }));
  await shows(page, "one");
  s1.send(chat(e2, { all: "a:3", "group:room": "g:1" }));
  // Another tab of ann's in this group asked: its history overlaps, nothing repeats.
  s1.send(history("room", [e1, e2], { all: "a:4", "user:ann": "u:3" }));
  await sendsNothingBut(page, s1, "hello from ann");
  s1.send(chat(entry("ann", "hello from ann", 2.5), { all: "a:5", "group:room": "g:2" }));
  assert.deepEqual(await shows(page, "hello from ann"), ["one", "— earlier messages above —", "two", "hello from ann"]);
  const positions = await page.evaluate(() => window.wshubChat.socket.positions);
  assert.deepEqual(positions, { all: "a:5", "group:room": "g:2", "user:ann": "u:3" });

  // The socket drops (a deploy); the page resumes from its positions and is
  // recovered: it does not ask again.
  s1.close(1001);
  const s2 = await hub.next();
  assert.deepEqual(JSON.parse(s2.query.get("resume")), positions);
  s2.send(welcome(true, 1, positions));
  s2.send(chat(missed, { all: "a:6", "group:room": "g:3" }));
  await shows(page, "sent while away");
  await sendsNothingBut(page, s2, "recovered, no history asked");

  // Dropped again, and this time not recovered: the page says so, asks, and
  // the history's entries it lacks go where their time puts them.
  s2.close(1001);
  const s3 = await hub.next();
  assert.deepEqual(JSON.parse(s3.query.get("resume")), { all: "a:6", "group:room": "g:3", "user:ann": "u:3" });
  s3.send(welcome(false, 0, { all: "b:0", "group:room": "h:0", "user:ann": "v:0" }));
  assert.equal((await nextFrame(s3)).action, "getinitialmessages");
  const late = entry("dave", "between two and away", 2.7);
  s3.send(history("room", [e1, e2, late, missed, e3], { all: "b:1", "user:ann": "v:1" }));
  await shows(page, "three");
  s3.send({ userId: null, groupId: null, action: "wshub.gap", message: '{"topics":["group:room"]}', recipients: [] });
  await shows(page, "— some messages could not be delivered —");
  assert.deepEqual((await texts(page)).filter((t) => !t.startsWith("disconnected")), [
    "one", "— earlier messages above —", "two", "hello from ann", "between two and away", "sent while away",
    "— reconnected; messages sent meanwhile may be missing —", "three",
    "— some messages could not be delivered —",
  ]);
  assert.deepEqual(await page.evaluate(() => [window.wshubChat.historyRequests, window.wshubChat.resumes,
    window.wshubChat.gaps]), [2, [{ recovered: false, replayed: 0 }, { recovered: true, replayed: 1 },
    { recovered: false, replayed: 0 }], [["group:room"]]]);
  assert.equal(await page.$$eval("#messages li", (lis) => lis.filter((li) => li.textContent.includes("wshub.")).length), 0,
    "no welcome or gap frame is shown as a message");
  await page.screenshot({ path: artifact("resume-page-stand-in.png") });

  // A reload: the positions come from sessionStorage; recovered, but the
  // reloaded page shows nothing yet, so it asks.
  await page.reload();
  await join(page);
  const s4 = await hub.next();
  assert.deepEqual(JSON.parse(s4.query.get("resume")), { all: "b:1", "group:room": "h:0", "user:ann": "v:1" });
  s4.send(welcome(true, 0, { all: "b:1", "group:room": "h:0", "user:ann": "v:1" }));
  assert.equal((await nextFrame(s4)).action, "getinitialmessages");
  s4.send(history("room", [e1, e2, e3], { all: "b:2", "user:ann": "v:2" }));
  assert.deepEqual(await shows(page, "three"), ["one", "two", "three", "— earlier messages above —"]);
  await page.close();
});

test("two identities in one tab keep their own positions", async () => {
  const page = await browser.newPage();
  page.setDefaultTimeout(10_000);
  await page.goto(`${hub.url}/`);
  const as = async (user) => {
    await page.fill("#user", user);
    await page.fill("#group", "lobby");
    await page.click("#connect");
    return hub.next();
  };
  const zoe = await as("zoe");
  assert.equal(zoe.query.get("resume"), "");
  const zoeAt = { all: "a:7", "group:lobby": "l:3", "user:zoe": "z:2" };
  zoe.send({ ...welcome(false, 0, zoeAt), userId: "zoe", groupId: "lobby" });
  await page.waitForFunction(() => window.wshubChat.resumes.length === 1);
  // Reconnect as yan in the same tab: nothing of zoe's is sent.
  const yan = await as("yan");
  assert.equal(yan.query.get("userid"), "yan");
  assert.equal(yan.query.get("resume"), "", "yan has no positions of his own");
  yan.send({ ...welcome(false, 0, { all: "a:9", "group:lobby": "l:4", "user:yan": "y:1" }), userId: "yan", groupId: "lobby" });
  await page.waitForFunction(() => window.wshubChat.resumes.length === 2);
  // Back to zoe: hers.
  const zoeAgain = await as("zoe");
  assert.deepEqual(JSON.parse(zoeAgain.query.get("resume")), zoeAt);
  await page.close();
});
