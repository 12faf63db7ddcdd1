"""Memory a node holds for connections whose request head never ends.

A slowloris client opens connections and sends most of a request head,
never its end: each is held until `http.header_read_timeout_ms` with the
head in its read buffer. This starts one node (no Redis), measures its
resident memory, opens N such connections with heads of each size, and
prints the memory per connection; then closes them and stops the node.

    python3 bench/misc/head-memory.py target/release/wshub [--connections 500] [--port 18790]

Loopback only; every connection is closed at the end, the node stopped.
The figures in docs/security.md ("request head") come from it.
"""

import argparse
import os
import socket
import subprocess
import time


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def measure(binary, port, connections, size):
    env = dict(os.environ, WSHUB_LISTEN=f"127.0.0.1:{port}", WSHUB_LOG__LEVEL="warn")
    node = subprocess.Popen([binary], env=env, stderr=subprocess.DEVNULL)
    socks = []
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        else:
            raise RuntimeError("the node did not start")
        time.sleep(0.5)
        before = rss_kib(node.pid)
        head = b"GET / HTTP/1.1\r\nHost: x\r\nX-Filler: " + b"a" * max(0, size - 36)
        for _ in range(connections):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(head)
            socks.append(s)
        time.sleep(2)
        after = rss_kib(node.pid)
        return (after - before) / connections
    finally:
        for s in socks:
            s.close()
        node.kill()
        node.wait()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("binary")
    ap.add_argument("--connections", type=int, default=500)
    ap.add_argument("--port", type=int, default=18790)
    args = ap.parse_args()
    for i, size in enumerate([100, 16_000, 40_000, 65_400]):
        per = measure(args.binary, args.port + i, args.connections, size)
        print(f"head of {size:>6} bytes, unfinished: {per:6.1f} KiB a connection ({args.connections} connections)")


if __name__ == "__main__":
    main()
