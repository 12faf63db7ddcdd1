// The admin page (GET /admin, static/admin.html) in headless Chromium
// against a real cluster: a Redis this test starts, three wshub nodes with
// an API key. The operator logs in with the key, sees the three nodes, and
// kicks a user whose socket (on another node) then closes with the code
// chosen. Screenshot: test-artifacts/browser/admin.png.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { startRedis, startNode, launchBrowser, artifact, stopAll } from "./harness.mjs";

const KEY = "admin-test-key-0123456789abcdef";
let redis, nodes, browser;

before(async () => {
  redis = await startRedis();
  nodes = [];
  for (const id of ["adm-a", "adm-b", "adm-c"]) {
    nodes.push(await startNode({
      WSHUB_REDIS__URL: redis,
      WSHUB_NODE_ID: id,
      WSHUB_BROADCAST__API_KEYS: KEY,
      WSHUB_PRESENCE__HEARTBEAT_MS: "200",
      WSHUB_HISTORY__ENABLED: "true",
    }));
  }
  browser = await launchBrowser();
});

after(async () => {
  try {
    await browser?.close();
  } finally {
    await stopAll();
  }
});

/** A page holding one socket for `user` on `node`; resolves once it is open. */
async function socketPage(node, user, group) {
  const page = await browser.newPage();
  await page.goto(`${node.url}/healthz`);
  await page.evaluate(([url]) => new Promise((resolve, reject) => {
    const ws = new WebSocket(url);
    window.wsClosed = null;
    ws.onopen = () => resolve();
    ws.onerror = () => reject(new Error("socket failed"));
    ws.onclose = (ev) => { window.wsClosed = { code: ev.code, reason: ev.reason, at: performance.now() }; };
  }), [`${node.url.replace("http", "ws")}/ws?userid=${user}&groupid=${group}`]);
  return page;
}

test("log in with a key, see 3 nodes, kick a user and see the socket closed", async () => {
  const victim = await socketPage(nodes[1], "victim", "room");
  const bystander = await socketPage(nodes[2], "bystander", "room");

  const page = await browser.newPage({ viewport: { width: 1200, height: 900 } });
  page.setDefaultTimeout(10_000);
  await page.goto(`${nodes[0].url}/admin`);
  // A key is configured: the page asks for it first.
  await page.waitForSelector("#login:not([hidden])");
  await page.fill("#key", "not-the-key");
  await page.click("#login-go");
  await page.waitForSelector("#login-error:has-text('refused')");
  await page.fill("#key", KEY);
  await page.click("#login-go");
  await page.waitForSelector("#app:not([hidden])");

  // Three nodes, each with its sockets, refreshed every 2 s.
  await page.waitForFunction(() => document.querySelectorAll("#nodes tr[data-node]").length === 3);
  const ids = await page.$$eval("#nodes tr[data-node]", (trs) => trs.map((tr) => tr.dataset.node));
  assert.deepEqual(ids, ["adm-a", "adm-b", "adm-c"]);
  await page.waitForFunction(() => {
    const row = document.querySelector('#nodes tr[data-node="adm-b"]');
    return row && row.children[2].textContent === "1";
  });
  // Topics with their node counts: the shared group on two nodes.
  await page.waitForSelector('#topics tr[data-topic="group:room"] td:nth-child(2):has-text("2")');
  // Presence may not exist on this build: said, not broken.
  await page.fill("#members-group", "room");
  await page.waitForFunction(() => document.querySelector("#members").textContent.length > 0
    && !document.querySelector("#members").textContent.startsWith("Type"));

  // Kick the victim (held by adm-b) from adm-a's page.
  await page.selectOption("#kick-kind", "userId");
  await page.fill("#kick-target", "victim");
  await page.fill("#kick-code", "4100");
  await page.fill("#kick-reason", "kicked by admin");
  const sent = Date.now();
  await page.click("#kick-go");
  await page.waitForSelector("#kick-result[data-reached='1']");
  const closed = await victim.waitForFunction(() => window.wsClosed, null, { timeout: 5_000 });
  const { code, reason } = await closed.jsonValue();
  assert.equal(code, 4100);
  assert.equal(reason, "kicked by admin");
  assert.ok(Date.now() - sent < 2_000, "closed promptly");
  assert.equal(await bystander.evaluate(() => window.wsClosed), null, "the bystander's socket stays");

  // The node list follows: adm-b holds no socket now.
  await page.waitForFunction(() => {
    const row = document.querySelector('#nodes tr[data-node="adm-b"]');
    return row && row.children[2].textContent === "0";
  });
  await page.screenshot({ path: artifact("admin.png"), fullPage: true });
});

test("the history of a group whose name holds a / or the broadcast marker is shown", async () => {
  // The page encoded the whole topic, `/` as %2F, which the API refuses
  // (400) like any encoded `/` in a path, and left `__broadcastWebSocket.wc`
  // whole, which makes any path the broadcast endpoint (405) (reviews of
  // 2026-12-02).
  const groups = { "a/b": "slash-history", "x__broadcastWebSocket.wc": "marker-history" };
  const published = await fetch(`${nodes[1].url}/api/publish`, {
    method: "POST",
    headers: { "content-type": "application/json", authorization: `Bearer ${KEY}` },
    body: JSON.stringify({
      messages: Object.entries(groups).map(([group, text]) =>
        ({ action: "note", message: text, recipients: [{ type: "group", value: group }] })),
    }),
  });
  assert.equal(published.status, 200, await published.text());
  const page = await browser.newPage();
  page.setDefaultTimeout(10_000);
  await page.goto(`${nodes[0].url}/admin`);
  await page.fill("#key", KEY);
  await page.click("#login-go");
  await page.waitForSelector("#app:not([hidden])");
  for (const [group, text] of Object.entries(groups)) {
    await page.fill("#history-topic", `group:${group}`);
    await page.waitForSelector(`#history pre:has-text('${text}')`);
    assert.equal(await page.$eval("#history", (el) => el.className), "", group);
  }
});

test("a group or topic named with a . or .. segment is refused, never shown as another", async () => {
  // Chromium resolves dot segments before the request leaves: group `.`
  // showed the members of group "", `group:dot/./x` the history of
  // `group:dot/x`, and `..` said the feature was off (review of 2026-12-03).
  const page = await browser.newPage();
  page.setDefaultTimeout(10_000);
  const asked = [];
  page.on("request", (r) => { if (r.url().includes("/api/")) asked.push(new URL(r.url()).pathname); });
  await page.goto(`${nodes[0].url}/admin`);
  await page.fill("#key", KEY);
  await page.click("#login-go");
  await page.waitForSelector("#app:not([hidden])");
  const refused = "cannot be asked for through the API";
  for (const group of [".", "..", "team/./red", "team/.."]) {
    await page.fill("#members-group", group);
    await page.waitForFunction((t) => document.querySelector("#members").textContent.includes(t), refused);
  }
  for (const topic of ["group:dot/./x", "group:dot/..", "group:../y"]) {
    await page.fill("#history-topic", topic);
    await page.waitForFunction((t) => document.querySelector("#history").textContent.includes(t), refused);
  }
  assert.deepEqual(asked.filter((p) => p.startsWith("/api/presence/groups") || p.startsWith("/api/history")), [],
    "nothing was asked for them");
  // A group holding `/` is asked for with its slashes, each segment
  // encoded (its `%2F` would be refused).
  await page.fill("#members-group", "team/red_1");
  await page.waitForFunction(() => document.querySelector("#members").textContent.length > 0
    && !document.querySelector("#members").textContent.includes("cannot be asked for"));
  // (The page refreshes every 2 s: the same path, perhaps more than once.)
  assert.deepEqual([...new Set(asked.filter((p) => p.startsWith("/api/presence/groups")))],
    ["/api/presence/groups/team/red%5F1"]);
});
