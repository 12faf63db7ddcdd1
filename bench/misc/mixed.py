"""Messages to a connection alternating with messages to its group, history on.

A regression check, not a target: with history on, a message to a
connection (no history) and a recorded one must keep their order, and the
publisher must still batch them. One node on a Redis started here, a
backend that tells the socket's connection id, one socket (user ann, group
g), and 20,000 messages published through `/api/publish` in requests of
500, alternating `[connection X]` and `[group g]`; prints the seconds until
the socket received them all, three rounds, and fails if any arrived out
of order.

    python3 bench/misc/mixed.py target/release/wshub [--port 18770]

Needs `redis-server` and the Python `websockets` package.
"""

import argparse
import asyncio
import http.server
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request

import websockets


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("binary")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    port = args.port or free_port()
    rport = free_port()
    rdir = tempfile.mkdtemp(prefix="wshub-mixed-")
    redis = subprocess.Popen(
        ["redis-server", "--port", str(rport), "--save", "", "--dir", rdir],
        stdout=subprocess.DEVNULL,
    )
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", rport), timeout=1).close()
            break
        except OSError:
            time.sleep(0.05)
    ids = []

    class Backend(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            ids.append(self.headers.get("X-Wshub-Connection-Id"))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *_):
            pass

    backend = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Backend)
    threading.Thread(target=backend.serve_forever, daemon=True).start()
    env = dict(
        os.environ,
        WSHUB_LISTEN=f"127.0.0.1:{port}",
        WSHUB_REDIS__URL=f"redis://127.0.0.1:{rport}",
        WSHUB_HISTORY__ENABLED="true",
        WSHUB_LOG__LEVEL="warn",
        WSHUB_LIMITS__MESSAGES_PER_SECOND="0",
        WSHUB_LIMITS__OUTBOUND_QUEUE_BYTES="67108864",
        WSHUB_BACKEND__URL=f"http://127.0.0.1:{backend.server_address[1]}/x",
    )
    node = subprocess.Popen([args.binary], env=env)
    try:
        asyncio.run(run(port, ids))
    finally:
        node.terminate()
        node.wait()
        redis.terminate()
        redis.wait()
        backend.shutdown()
        shutil.rmtree(rdir, ignore_errors=True)


def post(port, body):
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/publish",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request) as response:
        response.read()


async def run(port, ids):
    for _ in range(100):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz")
            break
        except OSError:
            await asyncio.sleep(0.1)
    total, per = 20000, 500
    url = f"ws://127.0.0.1:{port}/ws?userid=ann&groupid=g"
    async with websockets.connect(url, max_queue=None) as ws:
        await ws.send(json.dumps({"action": "hello"}))
        for _ in range(100):
            if ids:
                break
            await asyncio.sleep(0.05)
        cid = ids[0]
        times = []
        for _ in range(3):
            started = time.perf_counter()
            for _ in range(total // per):
                post(port, {"messages": [
                    {"action": "m", "message": str(i), "recipients": [
                        {"type": "connection", "value": cid} if i % 2 == 0
                        else {"type": "group", "value": "g"}]}
                    for i in range(per)
                ]})
            for n in range(total):
                frame = json.loads(await asyncio.wait_for(ws.recv(), 30))
                if frame["message"] != str(n % per):
                    raise SystemExit(f"out of order: message {n} is {frame['message']}")
            times.append(time.perf_counter() - started)
    print(f"seconds per {total} messages, three rounds: {[round(t, 3) for t in times]}")


if __name__ == "__main__":
    main()
