#!/usr/bin/env python3
"""User-space instructions a wshub node spends per delivery and per connect,
counted by `valgrind --tool=callgrind`: an A/B of builds that the machine's
load does not move. CPU time on these small shared machines varies by 10 to
25 % between runs of one build; an instruction count by 0.5 to 2.5 %,
so a change to the node's own code (not to what the kernel does for it)
shows in one run. It does not see the kernel's work (the system calls,
TCP), cache misses or wake-ups: `bench/ab.py` and `bench/pairs.py` measure
those, in CPU time.

    python3 bench/instructions.py target/release/wshub [OTHER/wshub ...]
    python3 bench/instructions.py --bench target/release/wshub-bench --only fanout BEFORE AFTER

For each build and each workload, two nodes on a fresh redis-server (free
loopback ports) run under callgrind, one worker thread each; the load
generator (native) runs the workload twice, short and long, with fresh
nodes each time, and the figure is the difference: (instructions of the
long run - of the short run) / (deliveries, or connects, of the long run -
of the short run), both nodes summed. What both runs share (the start, the
receivers' connects, the shutdown) cancels out. The workloads are small,
so that the nodes keep up under valgrind (about 50 times slower):

- fanout: 200 receivers, 20 messages a second to all (4,000 deliveries a
  second), 3 and 9 seconds;
- groups: 60 groups of 10, 0.5 messages a second per member (3,000
  deliveries a second), 3 and 9 seconds;
- connects: 400 and 1,600 sockets opened (unique users, 100 groups) and
  closed: a connect and its disconnect together.

Requires valgrind (Debian: `apt-get install valgrind`) and redis-server.
The nodes get this process's environment as well (where it sets what the
benchmark sets, the benchmark's value wins), so
`WSHUB_HISTORY__ENABLED=true python3 bench/instructions.py ...` counts
history on. Every run is bounded and targets 127.0.0.1 only; about 2
minutes per build.
"""

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import free_ports, raise_fd_limit, wait_port  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

# name: (wshub-bench arguments, the short and long values of the varied
# argument, the report's field that counts the work).
WORKLOADS = {
    "fanout": (["fanout", "--receivers", "200", "--rate", "20"], "--seconds", (3, 9), "delivered"),
    "groups": (["groups", "--groups", "60", "--size", "10", "--rate", "0.5"], "--seconds", (3, 9), "delivered"),
    "connects": (["idle", "--concurrency", "32"], "--connections", (400, 1600), "open"),
}


def totals(path):
    """The instruction total of a callgrind output file."""
    text = Path(path).read_text()
    m = re.search(r"^(?:totals|summary):\s+(\d+)", text, re.M)
    if not m:
        raise RuntimeError(f"no totals in {path}")
    return int(m.group(1))


def run_once(wshub, bench, args, workdir):
    """One run of `args` against two fresh nodes under callgrind: (the
    generator's report, the nodes' instructions summed, their callgrind
    files)."""
    [rport, p1, p2] = free_ports(3)
    procs = []
    try:
        redis = subprocess.Popen(["redis-server", "--port", str(rport), "--bind", "127.0.0.1", "--save", "",
                                  "--appendonly", "no", "--dir", str(workdir)],
                                 stdout=subprocess.DEVNULL, start_new_session=True)
        procs.append(redis)
        wait_port(rport, proc=redis)
        outs = []
        for port in (p1, p2):
            out = workdir / f"callgrind.{port}.out"
            outs.append(out)
            env = {**os.environ,
                   "WSHUB_LISTEN": f"127.0.0.1:{port}", "WSHUB_REDIS__URL": f"redis://127.0.0.1:{rport}",
                   "WSHUB_LIMITS__MESSAGES_PER_SECOND": "0", "WSHUB_LOG__LEVEL": "warn",
                   "WSHUB_SHUTDOWN__DRAIN_WINDOW_MS": "0", "WSHUB_SHUTDOWN__GRACE_PERIOD_MS": "2000",
                   "TOKIO_WORKER_THREADS": "1"}
            with open(workdir / f"node.{port}.log", "w") as log:
                procs.append(subprocess.Popen(
                    ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--dump-instr=no", str(wshub)],
                    env=env, stdout=subprocess.DEVNULL, stderr=log, preexec_fn=raise_fd_limit,
                    start_new_session=True))
        for port, p in zip((p1, p2), procs[1:]):
            wait_port(port, timeout=120, proc=p)
        time.sleep(2)
        gen = subprocess.run([str(bench), *args, "--node", f"127.0.0.1:{p1}", "--node", f"127.0.0.1:{p2}"],
                             capture_output=True, text=True, timeout=300, preexec_fn=raise_fd_limit)
        if gen.returncode != 0:
            raise RuntimeError(f"wshub-bench {' '.join(args)} failed: {gen.stderr.strip()[-500:]}")
        report = json.loads(gen.stdout.strip().splitlines()[-1])
        # A node writes its counts when it exits.
        for p in procs[1:]:
            p.send_signal(signal.SIGTERM)
        for port, p in zip((p1, p2), procs[1:]):
            if p.wait(timeout=120) != 0:
                said = (workdir / f"node.{port}.log").read_text().strip()[-500:]
                raise RuntimeError(f"a node under callgrind exited with {p.returncode}: {said}")
        return report, sum(totals(o) for o in outs), outs
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()


def measure(wshub, bench, name, keep=None):
    """Instructions per unit of workload `name` for build `wshub`; with
    `keep`, the long run's callgrind files are copied there."""
    base, arg, (short, long_), field = WORKLOADS[name]
    workdir = Path(tempfile.mkdtemp(prefix="wshub-instr-"))
    try:
        (r1, i1, _), (r2, i2, outs) = (run_once(wshub, bench, [*base, arg, str(v)], workdir)
                                       for v in (short, long_))
        if keep:
            for k, out in enumerate(outs, 1):
                shutil.copy(out, Path(keep) / f"{Path(wshub).name}.{name}.node{k}.out")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    for r in (r1, r2):
        if r.get("missing") or r.get("failures"):
            raise RuntimeError(f"{name}: the nodes did not keep up under callgrind: {r}")
    units = r2[field] - r1[field]
    if units <= 0:
        raise RuntimeError(f"{name}: the long run did no more work than the short one ({r1[field]}, {r2[field]})")
    return (i2 - i1) / units, units


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("builds", nargs="+", help="wshub binaries to count")
    ap.add_argument("--bench", default=str(ROOT / "target" / "release" / "wshub-bench"),
                    help="the load generator (default: this checkout's release build)")
    ap.add_argument("--only", default=",".join(WORKLOADS), help="workloads, comma-separated: " + ", ".join(WORKLOADS))
    ap.add_argument("--keep", metavar="DIR",
                    help="keep each long run's callgrind files in DIR (for callgrind_annotate)")
    a = ap.parse_args()
    if a.keep:
        Path(a.keep).mkdir(parents=True, exist_ok=True)
    if not shutil.which("valgrind"):
        raise SystemExit("valgrind is required (Debian: apt-get install valgrind)")
    names = [n for n in a.only.split(",") if n]
    for n in names:
        if n not in WORKLOADS:
            raise SystemExit(f"unknown workload {n!r}: one of {', '.join(WORKLOADS)}")
    rows = {}
    for k, build in enumerate(a.builds):
        for n in names:
            per, units = measure(build, a.bench, n, a.keep)
            rows[(k, n)] = per
            unit = "connect and disconnect" if n == "connects" else "delivery"
            print(f"{build}  {n}: {per:,.0f} instructions per {unit} ({units:,} counted)", flush=True)
    if len(a.builds) > 1:
        print()
        for k, build in enumerate(a.builds[1:], 1):
            print(f"{build} against {a.builds[0]}: " + ", ".join(
                f"{n} {rows[(k, n)] / rows[(0, n)]:.3f}" for n in names))


if __name__ == "__main__":
    main()
