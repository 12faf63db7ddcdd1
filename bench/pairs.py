#!/usr/bin/env python3
"""Alternated runs of one workload on several hubs or wshub builds: node CPU
per delivery and p99 of each run, then the medians. For "is A cheaper than
B" when a machine's run-to-run spread is as large as the difference (the
benchmark's single run per hub cannot say).

    python3 bench/pairs.py ROUNDS WORKLOAD HUB [HUB ...]

WORKLOAD is one of fanout (2,000 @ 65/s), fanout10k (10,000 @ 13/s),
fanout400 (2,000 @ 400/s), groups (500x10 @ 0.5/s), groups15 (500x10 @
1.5/s). HUB is a peer of bench/peers/ (uws, nodews, socketio) or
NAME=PATH: a wshub binary, or a script that sets something and execs one
(e.g. `TOKIO_WORKER_THREADS=2 exec target/release/wshub "$@"`). Each run
starts two fresh nodes on one Redis (started here, on a free loopback
port) as bench/run.py does, wshub's with their share of the cores as
worker threads unless the environment or the script sets
`TOKIO_WORKER_THREADS`; the order of the hubs is reversed every other
round. Before each round the workload's floor is measured (the groups
workloads: the groups-shaped floor of bench/run.py at their rate; the
fanouts: the lone-write floor, 2,000 sockets @ 65/s), and the medians are
also given as multiples of the floors' median. Every run is bounded (8 s
of load) and targets 127.0.0.1 only.
"""
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402

WORKLOADS = {
    "fanout": ["fanout", "--receivers", 2000, "--rate", 65, "--seconds", 8],
    "fanout10k": ["fanout", "--receivers", 10000, "--rate", 13, "--seconds", 8],
    "fanout400": ["fanout", "--receivers", 2000, "--rate", 400, "--seconds", 8],
    "groups": ["groups", "--groups", 500, "--size", 10, "--rate", 0.5, "--seconds", 8],
    "groups15": ["groups", "--groups", 500, "--size", 10, "--rate", 1.5, "--seconds", 8],
}
LONE_WRITE_FLOOR = ["floor", "--sockets", 2000, "--rate", 65, "--seconds", 6]
FLOORS = {
    "fanout": LONE_WRITE_FLOOR,
    "fanout10k": LONE_WRITE_FLOOR,
    "fanout400": LONE_WRITE_FLOOR,
    "groups": [*run.GROUPS_FLOOR, "--rate", 5, "--seconds", 6],
    "groups15": [*run.GROUPS_FLOOR, "--rate", 15, "--seconds", 6],
}


def main():
    if len(sys.argv) < 4 or sys.argv[2] not in WORKLOADS or not sys.argv[1].isdigit() or int(sys.argv[1]) < 1:
        raise SystemExit(__doc__)
    rounds, workload, hubs = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
    for hub in hubs:
        if "=" not in hub and hub not in run.PEER_HUBS:
            raise SystemExit(f"unknown hub {hub!r}: a peer ({', '.join(run.PEER_HUBS)}) or NAME=PATH")
        if "=" in hub and not os.access(hub.split("=", 1)[1], os.X_OK):
            raise SystemExit(f"{hub}: no such executable")
    workdir = Path(tempfile.mkdtemp(prefix="wshub-pairs-"))
    procs = run.Procs()
    runs = {hub: [] for hub in hubs}
    floors = []
    try:
        for peer in {h for h in hubs if "=" not in h}:
            shutil.copytree(run.PEERS / peer, workdir / peer, ignore=shutil.ignore_patterns("node_modules"))
            subprocess.run(["npm", "ci", "--silent", "--no-audit", "--no-fund"], cwd=workdir / peer, check=True)
        _, redis_url = run.start_redis(procs, workdir)
        for i in range(rounds):
            floors.append(run.bench(*FLOORS[workload])["writer_cpu_us_per_frame"])
            print(f"{'floor':24} {floors[-1]:6.2f} us/frame ({' '.join(map(str, FLOORS[workload][1:-2]))})", flush=True)
            for hub in hubs if i % 2 == 0 else hubs[::-1]:
                kind = hub
                if "=" in hub:
                    run.WSHUB, kind = Path(hub.split("=", 1)[1]).resolve(), "wshub"
                nodes, target = run.start_hub(procs, kind, redis_url, workdir)
                try:
                    r = run.bench(*WORKLOADS[workload], *target)
                finally:
                    procs.stop(nodes)
                runs[hub].append(r)
                print(f"{hub:24} {r['server_cpu_us_per_delivery']:6.2f} us/delivery, p99 {r['latency']['p99_ms']:7.1f} ms, "
                      f"missing {r['missing']}, node cores {r['server_cpu_cores']:.2f}, "
                      f"generator cores {r['loadgen_cpu_cores']:.2f}", flush=True)
    finally:
        procs.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    floor = statistics.median(floors)
    print(f"\nmedians of {rounds} ({workload}):")
    print(f"{'floor':24} {floor:6.2f} us/frame")
    for hub in hubs:
        cpu = statistics.median(r["server_cpu_us_per_delivery"] for r in runs[hub])
        p99 = statistics.median(r["latency"]["p99_ms"] for r in runs[hub])
        print(f"{hub:24} {cpu:6.2f} us/delivery = {cpu / floor:.2f}x the floor, p99 {p99:7.1f} ms")


if __name__ == "__main__":
    main()
