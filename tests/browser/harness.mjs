// What the browser tests run against, all started here and stopped by
// `stopAll()`: a redis-server on a free port, real `wshub` processes
// (target/debug/wshub, built by `cargo test` before this suite runs), nginx
// with the repository's deploy/nginx/nginx.conf (the balancer) or
// deploy/nginx/webconnection-site.conf (a page's own host), a stand-in WebSocket server
// that closes with any code, and Debian's Chromium driven by playwright-core.
// Anything missing fails the suite loudly.
//
// Every child runs in a process group of its own (`detached`), and
// `stopAll()` kills the whole group: killing only nginx's master leaves its
// workers running (issue 11 item 15; scripts/test fails on leftovers).

import { spawn, execFileSync } from "node:child_process";
import { createInterface } from "node:readline";
import { createServer, connect } from "node:net";
import { createServer as createHttpServer } from "node:http";
import { createHash, createHmac } from "node:crypto";
import { mkdtempSync, readFileSync, writeFileSync, existsSync, mkdirSync, rmSync, chmodSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, dirname, basename } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

export const ROOT = join(dirname(fileURLToPath(import.meta.url)), "..", "..");
export const ARTIFACTS = join(ROOT, "test-artifacts", "browser");
const PATIENCE_MS = 10_000;
const children = [];
const dirs = [];

function which(binary, candidates) {
  for (const c of candidates) if (existsSync(c)) return c;
  try {
    return execFileSync("sh", ["-c", `command -v ${binary}`]).toString().trim();
  } catch {
    throw new Error(`${binary} not found: the browser tests need it (scripts/test installs it)`);
  }
}

export async function freePort() {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.once("error", reject);
    srv.listen(0, "127.0.0.1", () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

async function waitFor(what, check) {
  const deadline = Date.now() + PATIENCE_MS;
  for (;;) {
    if (await check()) return;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

function portOpen(port) {
  return new Promise((resolve) => {
    const s = connect(port, "127.0.0.1");
    s.once("connect", () => { s.destroy(); resolve(true); });
    s.once("error", () => resolve(false));
  });
}

/** Stopped by `stopAll()`: a child process, or anything with a `kill()`. */
function track(child) {
  children.push(child);
  return child;
}

// Should the test file end without `stopAll()` (a failing `before` hook, an
// uncaught error), the groups are killed on the way out all the same.
process.on("exit", () => {
  for (const c of children) {
    if (typeof c.pid === "number") {
      try { process.kill(-c.pid, "SIGKILL"); } catch { /* the group is gone */ }
    }
  }
});

/** Spawns `bin` as the leader of a new process group, stopped by `stopAll()`. */
function spawnTracked(bin, args, options) {
  return track(spawn(bin, args, { ...options, detached: true }));
}

export async function startRedis() {
  const port = await freePort();
  // Under target/, not /tmp: redis-server works in its --dir, and
  // scripts/leftovers recognises this checkout's processes by their
  // working directory.
  const tmp = join(ROOT, "target", "tmp");
  mkdirSync(tmp, { recursive: true });
  const dir = mkdtempSync(join(tmp, "browser-redis-"));
  dirs.push(dir);
  const bin = which("redis-server", ["/usr/bin/redis-server"]);
  spawnTracked(bin, ["--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", dir],
    { stdio: "ignore" });
  await waitFor("redis-server", () => portOpen(port));
  return `redis://127.0.0.1:${port}`;
}

/** Starts a wshub node; resolves with { url, port, nodeId, process }. */
export async function startNode(env) {
  const bin = join(ROOT, "target", "debug", "wshub");
  if (!existsSync(bin)) throw new Error(`${bin} missing: run cargo build (scripts/test does) first`);
  const child = spawnTracked(bin, [], {
    env: { ...process.env, WSHUB_LISTEN: "127.0.0.1:0", WSHUB_LOG__FORMAT: "json", ...env },
    stdio: ["ignore", "ignore", "pipe"],
  });
  const lines = createInterface({ input: child.stderr });
  const started = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error("wshub did not start")), PATIENCE_MS);
    child.once("exit", (code) => reject(new Error(`wshub exited with ${code} before listening`)));
    lines.on("line", (line) => {
      let v;
      try { v = JSON.parse(line); } catch { return; }
      if (v.message === "wshub listening") { clearTimeout(timer); resolve(v); }
    });
  });
  const port = Number(started.addr.split(":").pop());
  const url = `http://127.0.0.1:${port}`;
  await waitFor("the node to be ready", async () => (await fetch(`${url}/readyz`).catch(() => null))?.status === 200);
  return { url, port, nodeId: started.node, process: child };
}

/** Sends `signal` to a node started by `startNode` and waits until it has exited. */
export async function stopNode(node, signal = "SIGTERM") {
  const child = node.process;
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise((resolve) => child.once("exit", resolve));
  child.kill(signal);
  await exited;
}

/**
 * The chat sample's backend (target/debug/wshub-chat-backend, built with the
 * workspace) pushing through `hub`; resolves with { url, port }: point a
 * node's backend.url at `${url}/app/__websocket.wwd`.
 */
export async function startChatBackend(hub) {
  const bin = join(ROOT, "target", "debug", "wshub-chat-backend");
  if (!existsSync(bin)) throw new Error(`${bin} missing: run cargo build --workspace (scripts/test does) first`);
  const port = await freePort();
  spawnTracked(bin, ["--listen", `127.0.0.1:${port}`, "--hub", hub], { stdio: "ignore" });
  await waitFor("the chat backend", () => portOpen(port));
  return { url: `http://127.0.0.1:${port}`, port };
}

/** The value of wshub_connections on a node. */
export async function connectionsOn(node) {
  const text = await (await fetch(`${node.url}/metrics`)).text();
  const line = text.split("\n").find((l) => l.startsWith("wshub_connections "));
  return Number(line.split(" ")[1]);
}

/** nginx with deploy/nginx/nginx.conf (listen line substituted) in front of `nodes`. */
export async function startNginx(nodes) {
  const bin = which("nginx", ["/usr/sbin/nginx"]);
  const port = await freePort();
  const dir = mkdtempSync(join(tmpdir(), "wshub-browser-nginx-"));
  dirs.push(dir);
  const conf = readFileSync(join(ROOT, "deploy", "nginx", "nginx.conf"), "utf8");
  if (conf.split("listen 8080;").length !== 2) throw new Error("nginx.conf must have one 'listen 8080;' line");
  writeFileSync(join(dir, "nginx.conf"), conf.replace("listen 8080;", `listen 127.0.0.1:${port};`));
  const servers = nodes.map((n) => `    server 127.0.0.1:${n.port};\n`).join("");
  // nginx.conf proxies to http://$wshub_upstream: name this upstream block.
  writeFileSync(join(dir, "upstream.conf"),
    `upstream wshub {\n    zone wshub 64k;\n    least_conn;\n${servers}}\nmap $host $wshub_upstream {\n    default wshub;\n}\n`);
  spawnTracked(bin, ["-p", dir, "-c", join(dir, "nginx.conf"), "-g", `daemon off; pid ${dir}/nginx.pid;`],
    { stdio: "ignore" });
  await waitFor("nginx", () => portOpen(port));
  return { url: `http://127.0.0.1:${port}`, port };
}

/**
 * The page's own host: nginx with deploy/nginx/webconnection-site.conf,
 * serving the files in `root` and handing /__initializeWebSocket.wc to
 * `node`. Three of the four lines the file marks EDIT are substituted;
 * `server_name` is left as shipped: this nginx has no other server, so its
 * only server takes every Host (tests/it/deploy.rs puts the file next to
 * a Debian-like default server).
 */
export async function startSiteNginx(node, root) {
  const bin = which("nginx", ["/usr/sbin/nginx"]);
  const port = await freePort();
  const dir = mkdtempSync(join(tmpdir(), "wshub-browser-site-"));
  dirs.push(dir);
  let site = readFileSync(join(ROOT, "deploy", "nginx", "webconnection-site.conf"), "utf8");
  for (const [from, to] of [
    ["server 127.0.0.1:8080;", `server 127.0.0.1:${node.port};`],
    ["listen 80;", `listen 127.0.0.1:${port};`],
    ["root /var/www/app;", `root ${root};`],
  ]) {
    if (site.split(from).length !== 2) throw new Error(`webconnection-site.conf must have one '${from}' line`);
    site = site.replace(from, to);
  }
  writeFileSync(join(dir, "site.conf"), site);
  writeFileSync(join(dir, "nginx.conf"), `error_log stderr warn;\nevents {}\n`
    + `http {\n    access_log off;\n    types { text/html html; text/javascript js; }\n    include site.conf;\n}\n`);
  spawnTracked(bin, ["-p", dir, "-c", join(dir, "nginx.conf"), "-g", `daemon off; pid ${dir}/nginx.pid;`],
    { stdio: "ignore" });
  await waitFor("the site's nginx", () => portOpen(port));
  return { url: `http://127.0.0.1:${port}`, port };
}

/** A temporary directory, removed by `stopAll()`. */
export function tempDir(prefix) {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  dirs.push(dir);
  // nginx's workers may run as another user than the test: let them read it.
  chmodSync(dir, 0o755);
  return dir;
}

/**
 * A stand-in for a hub, for the close codes wshub does not send (yet): it
 * serves static/ under /scripts/ and an empty page at /, and completes the
 * WebSocket handshake at any path. The first socket with `groupid=N` is
 * closed at once with code N; later ones with the same groupid stay open.
 * Resolves with { url, connections(N) }: how many sockets asked for N.
 */
export async function startCloseServer() {
  const counts = new Map();
  const sockets = new Set();
  const server = createHttpServer((req, res) => {
    const { pathname } = new URL(req.url, "http://localhost");
    if (pathname.startsWith("/scripts/")) {
      const file = join(ROOT, "static", basename(pathname));
      if (!existsSync(file)) return res.writeHead(404).end();
      return res.writeHead(200, { "content-type": "text/javascript" }).end(readFileSync(file));
    }
    res.writeHead(200, { "content-type": "text/html" }).end("<!doctype html><title>close codes</title>");
  });
  server.on("upgrade", (req, socket) => {
    sockets.add(socket);
    socket.on("close", () => sockets.delete(socket));
    socket.on("error", () => {});
    const code = Number(new URL(req.url, "http://localhost").searchParams.get("groupid"));
    const n = (counts.get(code) ?? 0) + 1;
    counts.set(code, n);
    // RFC 6455 section 4.2.2: the accept key is SHA-1 of the client's key and this GUID.
    const accept = createHash("sha1")
      .update(`${req.headers["sec-websocket-key"]}258EAFA5-E914-47DA-95CA-C5AB0DC85B11`).digest("base64");
    socket.write(`HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n`
      + `Sec-WebSocket-Accept: ${accept}\r\n\r\n`);
    if (n > 1) return;
    // An unmasked close frame (FIN + opcode 8) carrying the code and a reason.
    const payload = Buffer.concat([Buffer.from([code >> 8, code & 0xff]), Buffer.from(`closing with ${code}`)]);
    socket.write(Buffer.concat([Buffer.from([0x88, payload.length]), payload]));
    socket.once("data", () => socket.end()); // the client's close reply
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  track({ kill: () => { for (const s of sockets) s.destroy(); server.close(); } });
  return { url: `http://127.0.0.1:${server.address().port}`, connections: (code) => counts.get(code) ?? 0 };
}

/**
 * A stand-in hub driven by the test, for what a page does with frames a
 * hub sends (lossless resume's welcome, pos, gap): it serves static/ (the
 * working tree's files: `/` is the chat sample, `/scripts/<file>`) and
 * completes every WebSocket handshake. Resolves with { url, sockets,
 * next() }: `next()` waits for the next socket, which has `query` (the
 * URLSearchParams it connected with), `send(object)`, `close(code)`,
 * `received` (the client's frames, parsed) and `nextFrame()`.
 */
export async function startStandInHub() {
  const sockets = [];
  const waiting = [];
  const server = createHttpServer((req, res) => {
    const { pathname } = new URL(req.url, "http://localhost");
    const file = pathname === "/" ? join(ROOT, "static", "index.html")
      : pathname.startsWith("/scripts/") ? join(ROOT, "static", basename(pathname)) : null;
    if (!file || !existsSync(file)) return res.writeHead(404).end();
    const type = file.endsWith(".html") ? "text/html" : "text/javascript";
    return res.writeHead(200, { "content-type": type }).end(readFileSync(file));
  });
  const raws = new Set();
  server.on("upgrade", (req, raw) => {
    raw.on("error", () => {});
    raws.add(raw);
    raw.on("close", () => raws.delete(raw));
    const accept = createHash("sha1")
      .update(`${req.headers["sec-websocket-key"]}258EAFA5-E914-47DA-95CA-C5AB0DC85B11`).digest("base64");
    raw.write(`HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n`
      + `Sec-WebSocket-Accept: ${accept}\r\n\r\n`);
    const frameWaiters = [];
    const socket = {
      query: new URL(req.url, "http://localhost").searchParams,
      received: [],
      closed: false,
      /** Sends one unmasked text frame with JSON.stringify(value). */
      send(value) {
        const payload = Buffer.from(JSON.stringify(value));
        const n = payload.length;
        const head = n < 126 ? Buffer.from([0x81, n])
          : n < 65536 ? Buffer.from([0x81, 126, n >> 8, n & 0xff])
            : Buffer.concat([Buffer.from([0x81, 127]), (() => { const b = Buffer.alloc(8); b.writeBigUInt64BE(BigInt(n)); return b; })()]);
        raw.write(Buffer.concat([head, payload]));
      },
      close(code = 1001) {
        raw.write(Buffer.from([0x88, 2, code >> 8, code & 0xff]));
        raw.end();
        socket.closed = true;
      },
      /** The client's next frame (parsed JSON). */
      nextFrame() {
        if (socket.received.length > socket.taken) return Promise.resolve(socket.received[socket.taken++]);
        return new Promise((resolve) => frameWaiters.push(resolve));
      },
      taken: 0,
    };
    let buffer = Buffer.alloc(0);
    raw.on("data", (chunk) => {
      buffer = Buffer.concat([buffer, chunk]);
      for (;;) {
        if (buffer.length < 2) return;
        const opcode = buffer[0] & 0x0f;
        let len = buffer[1] & 0x7f;
        let at = 2;
        if (len === 126) { if (buffer.length < 4) return; len = buffer.readUInt16BE(2); at = 4; }
        else if (len === 127) { if (buffer.length < 10) return; len = Number(buffer.readBigUInt64BE(2)); at = 10; }
        if (buffer.length < at + 4 + len) return;
        const mask = buffer.subarray(at, at + 4);
        const data = Buffer.from(buffer.subarray(at + 4, at + 4 + len).map((b, i) => b ^ mask[i % 4]));
        buffer = buffer.subarray(at + 4 + len);
        if (opcode === 8) {
          if (!socket.closed) { socket.closed = true; raw.end(Buffer.from([0x88, 0])); }
          return;
        }
        if (opcode !== 1) continue;
        socket.received.push(JSON.parse(data.toString("utf8")));
        while (frameWaiters.length && socket.received.length > socket.taken) {
          frameWaiters.shift()(socket.received[socket.taken++]);
        }
      }
    });
    raw.on("close", () => { socket.closed = true; });
    sockets.push(socket);
    if (waiting.length) waiting.shift()(socket);
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  let handed = 0;
  track({ kill: () => { for (const r of raws) r.destroy(); server.closeAllConnections(); server.close(); } });
  return {
    url: `http://127.0.0.1:${server.address().port}`,
    sockets,
    /** The next socket not handed out yet. */
    next() {
      if (sockets.length > handed) return Promise.resolve(sockets[handed++]);
      return new Promise((resolve) => waiting.push((s) => { handed++; resolve(s); }));
    },
  };
}

/** Debian's Chromium, headless. Throws (fails the suite) if it cannot start. */
export async function launchBrowser() {
  const executablePath = which("chromium", ["/usr/bin/chromium"]);
  return chromium.launch({
    executablePath,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
}

export function artifact(name) {
  mkdirSync(ARTIFACTS, { recursive: true });
  return join(ARTIFACTS, name);
}

/**
 * Kills every child's whole process group (also when the leader is gone
 * already: nginx's workers outlive a killed master) and waits for the
 * leaders to exit. Call it after `browser.close()`: playwright stops
 * Chromium's own process group.
 */
export async function stopAll() {
  const exits = [];
  for (const c of children.splice(0)) {
    if (typeof c.pid !== "number") {
      c.kill();
      continue;
    }
    if (c.exitCode === null && c.signalCode === null) {
      exits.push(new Promise((resolve) => c.once("exit", resolve)));
    }
    try { process.kill(-c.pid, "SIGKILL"); } catch { /* the group is gone */ }
  }
  await Promise.race([Promise.all(exits), new Promise((r) => setTimeout(r, PATIENCE_MS).unref())]);
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
}

/** An HS256 JWT, as an application backend would mint it. */
export function mintToken(secret, claims) {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
  const body = `${b64({ alg: "HS256", typ: "JWT" })}.${b64(claims)}`;
  const sig = createHmac("sha256", secret).update(body).digest("base64url");
  return `${body}.${sig}`;
}
