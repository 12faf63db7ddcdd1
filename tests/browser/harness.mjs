// What the browser tests run against, all started here and stopped by
// `stopAll()`: a redis-server on a free port, real `wshub` processes
// (target/debug/wshub, built by `cargo test` before this suite runs), nginx
// with the repository's deploy/nginx/nginx.conf, and Debian's Chromium
// driven by playwright-core. Anything missing fails the suite loudly.

import { spawn, execFileSync } from "node:child_process";
import { createInterface } from "node:readline";
import { createServer, connect } from "node:net";
import { mkdtempSync, readFileSync, writeFileSync, existsSync, mkdirSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, dirname } from "node:path";
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

function track(child) {
  children.push(child);
  return child;
}

export async function startRedis() {
  const port = await freePort();
  const dir = mkdtempSync(join(tmpdir(), "wshub-browser-redis-"));
  dirs.push(dir);
  const bin = which("redis-server", ["/usr/bin/redis-server"]);
  track(spawn(bin, ["--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", dir],
    { stdio: "ignore" }));
  await waitFor("redis-server", () => portOpen(port));
  return `redis://127.0.0.1:${port}`;
}

/** Starts a wshub node; resolves with { url, port, nodeId, process }. */
export async function startNode(env) {
  const bin = join(ROOT, "target", "debug", "wshub");
  if (!existsSync(bin)) throw new Error(`${bin} missing: run cargo build (scripts/test does) first`);
  const child = track(spawn(bin, [], {
    env: { ...process.env, WSHUB_LISTEN: "127.0.0.1:0", WSHUB_LOG__FORMAT: "json", ...env },
    stdio: ["ignore", "ignore", "pipe"],
  }));
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
  track(spawn(bin, ["-p", dir, "-c", join(dir, "nginx.conf"), "-g", `daemon off; pid ${dir}/nginx.pid;`],
    { stdio: "ignore" }));
  await waitFor("nginx", () => portOpen(port));
  return { url: `http://127.0.0.1:${port}`, port };
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

export function stopAll() {
  for (const c of children.splice(0)) {
    try { c.kill("SIGKILL"); } catch { /* already gone */ }
  }
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
}
