#!/usr/bin/env python3
"""Scale-out scenarios of the benchmark (issue #19): workloads too big for one
load-generator process, split over several `wshub-bench` processes, each
bound to its own loopback source address (127.0.0.2, .3, ...). Writes
bench/results/scale-latest.{json,md}.

    python3 bench/scale.py                  # all four, full size (about 10 minutes)
    python3 bench/scale.py --quick          # a tenth of the receivers, short runs
    python3 bench/scale.py --only scaleout,connects
    python3 bench/scale.py --report-only    # rewrite the .md from the .json

Scenarios (wshub only, every node with its soft open-file limit raised to the
hard limit, all nodes on one Redis):

- scaleout: 3 nodes, 36,000 receivers (3 receiver processes of 12,000), one
  publisher at 3.5 msg/s (~126,000 deliveries/s);
- sizes: one node at the same delivery rate: 2,000 receivers at 63 msg/s,
  6,000 at 21, 18,000 at 7 (2 receiver processes of 9,000);
- connects: one node, 2 processes of 9,000 connects each (256 in flight
  per process), all at once;
- nodes: 12,000 receivers at 10 msg/s on 1, 2, then 3 nodes.

Each fanout reports the node CPU per delivery against the lone-write floor
measured in the same run (the median of the floors taken between the
scenarios), p50/p99 from the merged fixed-bucket histograms of all receiver
processes, missing and duplicated deliveries over all receivers (every
receiver must get every message once), and the receivers' connect rate.
It reuses run.py's helpers (Redis and node start, floor, CPU readings).
Every run is bounded in count and time, targets loopback only, and every
process it starts is stopped before it returns.
"""

import argparse
import json
import math
import os
import platform
import queue
import re
import statistics
import subprocess
import sys
import tempfile
import shutil
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import (BENCH, CONNECT_FLOOR, RESULTS, ROOT, Procs, bench, cpu_model, cpu_seconds,  # noqa: E402
                 raise_fd_limit, start_hub, start_redis)

P99_BOUND_MS = 250.0
FLOOR_FACTOR = 1.2
NODES_SPREAD = 0.10
CONNECTS_GOAL = 25_000

# Fixed log buckets of `wshub-bench receive` (8 per doubling of µs).
PER_DOUBLING = 8


class Gen:
    """One wshub-bench process: stdin for commands, stdout lines (JSON) read
    by a thread, stderr to a log file."""

    def __init__(self, args, log_path):
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.args = [str(a) for a in args]
        self.p = subprocess.Popen([str(BENCH), *self.args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=self.log, text=True, preexec_fn=raise_fd_limit)
        self.lines = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.p.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def answer(self, timeout):
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"wshub-bench {self.args[0]}: no answer within {timeout} s") from None
        if line is None:
            code = self.p.wait(timeout=10)
            err = Path(self.log_path).read_text()[-400:].strip()
            raise RuntimeError(f"wshub-bench {self.args[0]} exited with {code}: {err}")
        return json.loads(line)

    def tell(self, text):
        self.p.stdin.write(text + "\n")
        self.p.stdin.flush()

    def stop(self):
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(timeout=10)
        self.log.close()


def slug(name):
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")


def split(total, parts):
    base, extra = divmod(total, parts)
    return [base + (1 if k < extra else 0) for k in range(parts)]


def quantile_ms(counts, q):
    """Upper edge of the bucket holding the q-quantile, in ms."""
    total = sum(counts)
    if total == 0:
        return 0.0
    want = max(1, math.ceil(q * total))
    seen = 0
    for k, c in enumerate(counts):
        seen += c
        if seen >= want:
            return 2 ** ((k + 1) / PER_DOUBLING) / 1000
    return 2 ** ((len(counts) + 1) / PER_DOUBLING) / 1000


def merge_counts(lists):
    out = [0] * max((len(c) for c in lists), default=0)
    for c in lists:
        for k, v in enumerate(c):
            out[k] += v
    return out


def split_fanout(ctx, name, nodes, receivers, processes, rate, seconds):
    """One fanout: `nodes` fresh wshub nodes, `receivers` over `processes`
    receiver processes (bound to 127.0.0.2, .3, ...), one publisher."""
    messages = math.ceil(rate * seconds)
    node_procs, target = start_hub(ctx.procs, "wshub", ctx.redis_url, ctx.workdir, n=nodes)
    pids = [p.pid for p in node_procs]
    gens = []
    try:
        first = 0
        for k, n in enumerate(split(receivers, processes)):
            gens.append(Gen(["receive", *target, "--source", f"127.0.0.{2 + k}", "--receivers", n, "--first", first,
                             "--messages", messages, "--max-seconds", int(seconds * 3 + 120)],
                            ctx.workdir / f"{slug(name)}-{k}.log"))
            first += n
        ready = [g.answer(timeout=300) for g in gens]
        time.sleep(1.0)
        cpu_each0 = [cpu_seconds(p) for p in pids]
        redis0 = cpu_seconds(ctx.redis.pid)
        t0 = time.time()
        # The publisher on the first node only.
        pub = bench("publish", *target[:2], "--proto", "wshub", "--messages", messages, "--rate", rate)
        for g in gens:
            g.tell("stop")
        shares = [g.answer(timeout=60) for g in gens]
        elapsed = time.time() - t0
        cpu_each = [cpu_seconds(p) - c0 for p, c0 in zip(pids, cpu_each0)]
        redis_cpu = cpu_seconds(ctx.redis.pid) - redis0
    finally:
        for g in gens:
            g.stop()
        ctx.procs.stop(node_procs)
    sent = pub["sent"]
    per_seq = [sum(col) for col in zip(*(s["per_seq"] for s in shares))]
    missing = sum(max(0, receivers - c) for c in per_seq[:sent])
    duplicated = sum(s["duplicated"] for s in shares)
    delivered = sum(s["delivered"] for s in shares)
    counts = merge_counts([s["latency_buckets"]["counts"] for s in shares])
    node_cpu = sum(cpu_each)
    connect_s = max(r["connect_s"] for r in ready)
    loadgen = sum(s["loadgen_cpu_s"] for s in shares) + pub["loadgen_cpu_s"]
    return {
        "name": name, "kind": "fanout", "nodes": nodes, "receivers": receivers, "processes": processes,
        "rate": rate, "seconds": seconds, "sent": sent, "expected": sent * receivers,
        "delivered": delivered, "missing": missing, "duplicated": duplicated,
        "receivers_closed_before_stop": sum(s.get("closed_before_stop", 0) for s in shares),
        "send_window_s": pub["elapsed_s"], "elapsed_s": elapsed,
        "deliveries_per_s": delivered / pub["elapsed_s"],
        "node_cpu_s": node_cpu, "node_cpu_s_each": cpu_each, "node_cores": node_cpu / elapsed,
        "node_cpu_us_per_delivery": node_cpu * 1e6 / delivered if delivered else None,
        "redis_cpu_us_per_publish": redis_cpu * 1e6 / sent if sent else None,
        "loadgen_cores": loadgen / elapsed,
        "latency": {"p50_ms": quantile_ms(counts, 0.5), "p90_ms": quantile_ms(counts, 0.9),
                    "p99_ms": quantile_ms(counts, 0.99), "max_ms": max(s["max_us"] for s in shares) / 1000,
                    "buckets_per_doubling": PER_DOUBLING, "counts": counts},
        "receiver_connects_per_s": receivers / connect_s if connect_s else None,
    }


def connects(ctx, name, processes, each, concurrency=256, hub="wshub"):
    """`processes` idle generators at once, each bound to its own address,
    `each` connects to one node (`hub`: wshub, or the connect floor)."""
    node_procs, target = start_hub(ctx.procs, hub, ctx.redis_url, ctx.workdir, n=1)
    gens = []
    cpu0 = cpu_seconds(node_procs[0].pid)
    redis0 = cpu_seconds(ctx.redis.pid)
    try:
        for k in range(processes):
            gens.append(Gen(["idle", *target, "--source", f"127.0.0.{2 + k}", "--connections", each,
                             "--concurrency", concurrency], ctx.workdir / f"{slug(name)}-{k}.log"))
        results = [g.answer(timeout=300) for g in gens]
        # From before the first connect to after the last one (the node is
        # idle otherwise).
        node_cpu = cpu_seconds(node_procs[0].pid) - cpu0
        redis_cpu = cpu_seconds(ctx.redis.pid) - redis0
    finally:
        for g in gens:
            g.stop()
        ctx.procs.stop(node_procs)
    opened = sum(r["open"] for r in results)
    # Each process's own connect time; they ran at once, so the whole took
    # the longest of them.
    spans = [r["open"] / r["connects_per_s"] for r in results if r["connects_per_s"]]
    return {"name": name, "kind": "connects", "hub": hub, "nodes": 1, "processes": processes, "connections": processes * each,
            "concurrency_per_process": concurrency, "open": opened,
            "failures": sum(r["failures"] for r in results),
            "first_error": next((r["first_error"] for r in results if r["first_error"]), None),
            "connects_per_s": opened / max(spans) if spans else 0.0,
            "connects_per_s_each": [r["connects_per_s"] for r in results],
            "node_cpu_us_per_connect": node_cpu * 1e6 / max(opened, 1),
            "loadgen_cpu_us_per_connect": sum(r["loadgen_cpu_s"] for r in results) * 1e6 / max(opened, 1),
            "redis_cpu_us_per_connect": redis_cpu * 1e6 / max(opened, 1),
            # Cores busy with this scenario while it connected (server,
            # Redis, generators): near the machine's cores means CPU-bound.
            "cores_busy": (node_cpu + redis_cpu + sum(r["loadgen_cpu_s"] for r in results))
            / max(max(spans) if spans else 1.0, 1e-9),
            "rss_bytes_per_connection": (max(r["server_rss_bytes_after"] for r in results)
                                         - min(r["server_rss_bytes_before"] for r in results)) / max(opened, 1)}


class Ctx:
    pass


def measure_floor(ctx, quick):
    f = bench("floor", "--sockets", 2000, "--rate", 65, "--batch", 1, "--seconds", 4 if quick else 6)
    ctx.floors.append(f["writer_cpu_us_per_frame"])
    print(f"floor: {f['writer_cpu_us_per_frame']:.2f} us/frame", flush=True)


def latency_floor(receivers, rate, quick):
    """The latency floor of a fanout: the trivial writer delivering one
    round of frames per message to `receivers` loopback sockets at `rate`,
    on every core. One writer process holds at most 18,000 sockets (its
    reader, this machine's file limit of 20,000 per process), so a bigger
    fanout runs as several writers at once, each with its share on one
    thread (one core each); the floor's p99 is then the highest of theirs."""
    cores = os.cpu_count() or 1
    parts = max(1, math.ceil(receivers / 18000))
    args = ["--rate", rate, "--seconds", 4 if quick else 8]
    if parts == 1:
        runs = [bench("floor", "--sockets", receivers, "--threads", cores, *args)]
    else:
        procs = [subprocess.Popen([str(BENCH), "floor", "--sockets", str(n), "--threads", "1", *map(str, args)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  preexec_fn=raise_fd_limit) for n in split(receivers, parts)]
        runs = []
        for p in procs:
            out, err = p.communicate(timeout=600)
            if p.returncode != 0:
                raise RuntimeError(f"wshub-bench floor failed: {err.strip()[-400:]}")
            runs.append(json.loads(out.strip().splitlines()[-1]))
    # Read as this script's receivers are: upper edges of the fixed log
    # buckets (`latency_buckets`; `latency` is an HdrHistogram's reading,
    # as run.py's hubs are read).
    per_frame = [r["writer_cpu_us_per_frame"] for r in runs if r.get("writer_cpu_us_per_frame")]
    return {"writers": len(runs), "threads": runs[0]["threads"],
            "p50_ms": max(r["latency_buckets"]["p50_ms"] for r in runs),
            "p99_ms": max(r["latency_buckets"]["p99_ms"] for r in runs),
            "writer_cpu_us_per_frame": statistics.median(per_frame) if per_frame else None}


def plan(quick):
    div = 10 if quick else 1
    s = 4 if quick else 15
    return {
        "scaleout": [("scale-out: 3 nodes, 36,000 receivers @ 3.5/s", dict(nodes=3, receivers=36000 // div, processes=3,
                                                                             rate=3.5, seconds=20 if not quick else s))],
        "sizes": [("one node: 2,000 receivers @ 63/s", dict(nodes=1, receivers=2000 // div, processes=1, rate=63, seconds=s)),
                  ("one node: 6,000 receivers @ 21/s", dict(nodes=1, receivers=6000 // div, processes=1, rate=21, seconds=s)),
                  ("one node: 18,000 receivers @ 7/s", dict(nodes=1, receivers=18000 // div, processes=2, rate=7, seconds=s))],
        "connects": [("connects: one node, 2 x 9,000", dict(processes=2, each=9000 // div)),
                     ("connect floor: bare tokio-tungstenite server, 2 x 9,000",
                      dict(processes=2, each=9000 // div, hub=CONNECT_FLOOR))],
        "nodes": [(f"nodes: {n} node{'s' if n > 1 else ''}, 12,000 receivers @ 10/s",
                   dict(nodes=n, receivers=12000 // div, processes=2, rate=10, seconds=s)) for n in (1, 2, 3)],
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="scaleout,sizes,connects,nodes")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--note", help="conditions of the run, printed under the first line of the .md")
    ap.add_argument("--no-build", action="store_true", help="use the release binaries as they are")
    args = ap.parse_args()
    if args.report_only:
        res = json.loads((RESULTS / "scale-latest.json").read_text())
        (RESULTS / "scale-latest.md").write_text(markdown(res))
        print((RESULTS / "scale-latest.md").read_text())
        return
    if not args.no_build:
        subprocess.run(["cargo", "build", "--release", "-p", "wshub", "-p", "wshub-bench"], cwd=ROOT, check=True)
    ctx = Ctx()
    ctx.procs = Procs()
    ctx.workdir = Path(tempfile.mkdtemp(prefix="wshub-scale-"))
    ctx.floors = []
    res = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "cpu": cpu_model(),
                       "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "quick": args.quick},
           "floors": ctx.floors, "runs": {}, "note": args.note}
    started = time.time()
    try:
        ctx.redis, ctx.redis_url = start_redis(ctx.procs, ctx.workdir)
        measure_floor(ctx, args.quick)
        for group, runs in plan(args.quick).items():
            if group not in args.only.split(","):
                continue
            res["runs"][group] = []
            for name, kw in runs:
                try:
                    r = connects(ctx, name, **kw) if group == "connects" else split_fanout(ctx, name, **kw)
                except RuntimeError as e:
                    r = {"name": name, "error": str(e)}
                r["floor_before_us"] = ctx.floors[-1]
                if group in ("sizes", "scaleout") and "error" not in r:
                    try:
                        r["latency_floor"] = latency_floor(kw["receivers"], kw["rate"], args.quick)
                    except (RuntimeError, subprocess.TimeoutExpired) as e:
                        r["latency_floor"] = {"error": str(e)}
                res["runs"][group].append(r)
                print(f"{name:48} {line(r)}", flush=True)
            measure_floor(ctx, args.quick)
    finally:
        ctx.procs.stop()
        shutil.rmtree(ctx.workdir, ignore_errors=True)
    res["duration_s"] = time.time() - started
    res["floor_us"] = statistics.median(ctx.floors)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "scale-latest.json").write_text(json.dumps(res, indent=2) + "\n")
    (RESULTS / "scale-latest.md").write_text(markdown(res))
    print((RESULTS / "scale-latest.md").read_text())


def line(r):
    if "error" in r:
        return "ERROR " + r["error"][:200]
    if r["kind"] == "connects":
        return f"{r['open']} open, {r['failures']} failed, {r['connects_per_s']:,.0f} connects/s"
    return (f"{r['deliveries_per_s']:,.0f} deliveries/s, p50 {r['latency']['p50_ms']:.1f} p99 {r['latency']['p99_ms']:.1f} ms, "
            f"{r['node_cpu_us_per_delivery']:.2f} us/delivery, missing {r['missing']}, dup {r['duplicated']}")


def floor_cell(r):
    lf = r.get("latency_floor")
    if not lf:
        return ""
    if "error" in lf:
        return "error: " + lf["error"][:60]
    return f"{lf['p50_ms']:.1f} / {lf['p99_ms']:.1f}"


def same_size(r):
    """The node CPU per delivery over the trivial writer's CPU per frame at
    the same size and rate (its latency-floor run), or None."""
    lf = r.get("latency_floor")
    if "error" in r or not lf or "error" in lf or not lf.get("writer_cpu_us_per_frame"):
        return None
    return r["node_cpu_us_per_delivery"] / lf["writer_cpu_us_per_frame"]


def same_size_cells(r):
    x = same_size(r)
    if x is None:
        return " | |"
    return f" {r['latency_floor']['writer_cpu_us_per_frame']:.2f} | {x:.2f} |"


def verdict(ok):
    return "yes" if ok else "**no**"


def markdown(res):
    floor = res["floor_us"]
    cores = res["machine"]["cpus"]
    m = res["machine"]
    out = [f"Measured {m['date']} on {cores} CPUs ({m['cpu']}){' (--quick)' if m.get('quick') else ''}: "
           "wshub nodes, Redis and every load-generator process on the same machine.",
           ""]
    if res.get("note"):
        out += [f"**Conditions:** {res['note']}", ""]
    out += [
           f"Lone-write floor of this run (a trivial process writing one pre-encoded frame per write to 2,000 "
           f"loopback sockets), median of {len(res['floors'])} measurements taken between the scenarios "
           f"({', '.join(f'{v:.2f}' for v in res['floors'])}): **{floor:.2f} µs** per frame.",
           "",
           "Latency percentiles are upper edges of fixed log buckets (8 per doubling, ≤ 9 % wide) merged over "
           "all receiver processes; missing and duplicated are counted per receiver and message over all of them.",
           ""]
    fan_head = ["| run | nodes | receivers (processes) | deliveries/s | p50 / p99 ms | missing / dup "
                "| node CPU µs per delivery | × floor | node cores | load generator cores | receiver connects/s |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def fan_row(r):
        if "error" in r:
            return f"| {r['name']} | error: {r['error'][:100]} | | | | | | | | | |"
        lat = r["latency"]
        return (f"| {r['name']} | {r['nodes']} | {r['receivers']:,} ({r['processes']}) | {r['deliveries_per_s']:,.0f} "
                f"| {lat['p50_ms']:.1f} / {lat['p99_ms']:.1f} | {r['missing']} / {r['duplicated']} "
                f"| {r['node_cpu_us_per_delivery']:.2f} | {r['node_cpu_us_per_delivery'] / floor:.2f} "
                f"| {r['node_cores']:.2f} | {r['loadgen_cores']:.2f} | {r['receiver_connects_per_s']:,.0f} |")

    runs = res["runs"]
    if "scaleout" in runs:
        out += ["## Scale-out: 3 nodes, 36,000 receivers", "",
                f"Goal: sustained fanout with nothing missing, p99 < {P99_BOUND_MS:.0f} ms, node CPU per delivery "
                f"≤ {FLOOR_FACTOR} × the floor.", ""] + fan_head
        out += [fan_row(r) for r in runs["scaleout"]]
        for r in runs["scaleout"]:
            if "error" not in r:
                x = r["node_cpu_us_per_delivery"] / floor
                if "receivers_closed_before_stop" in r:
                    out += ["", f"Receivers whose socket the node closed before the end: "
                                f"{r['receivers_closed_before_stop']}. Missing counts what had not arrived when the "
                                "receivers stopped waiting (30 s after the last send at most, or 3 s without any delivery)."]
                lf = r.get("latency_floor")
                if lf and "error" not in lf:
                    how = (f"{lf['writers']} trivial writers at once, one core each" if lf["writers"] > 1
                           else f"the trivial writer on {lf['threads']} threads")
                    cost = (f"; the writers' CPU per frame while writing {lf['writer_cpu_us_per_frame']:.2f} µs, "
                            f"so the nodes paid {same_size(r):.2f} × the trivial writer at this size"
                            if same_size(r) is not None else "")
                    out += ["", f"Latency floor at the same size and rate ({how}, read by the load generator): "
                                f"p50 / p99 {floor_cell(r)} ms{cost}."]
                out += ["", f"Met: nothing missing or duplicated {verdict(r['missing'] == 0 and r['duplicated'] == 0)}; "
                            f"p99 < {P99_BOUND_MS:.0f} ms {verdict(r['latency']['p99_ms'] < P99_BOUND_MS)}; "
                            f"≤ {FLOOR_FACTOR} × floor {verdict(x <= FLOOR_FACTOR)} ({x:.2f}). Node cores each: "
                            + ", ".join(f"{c / r['elapsed_s']:.2f}" for c in r["node_cpu_s_each"]) + "."]
        out.append("")
    if "sizes" in runs:
        out += ["## One node, the same delivery rate at every size", "",
                f"Goal: ≤ {FLOOR_FACTOR} × the floor at every size; the p99 of a big fanout close to "
                "receivers × floor ÷ cores (the time the node's cores need to write one message to everyone).", ""]
        out += [fan_head[0] + " model p99 ms (receivers × floor ÷ cores) | latency floor p50 / p99 ms (measured) "
                "| same-size floor µs per frame | × same-size floor |",
                fan_head[1] + "---:|---:|---:|---:|"]
        for r in runs["sizes"]:
            model = f"{r['receivers'] * floor / cores / 1000:.1f}" if "error" not in r else ""
            out.append(fan_row(r) + f" {model} | {floor_cell(r)} |" + same_size_cells(r))
        out += ["", "The latency floor is the trivial writer delivering one round of frames per message to as many "
                    "loopback sockets at the same rate, on every core, read by the load generator: what the model "
                    "leaves out (the readers and Redis share the cores, and a round waits for the one before it) "
                    "is in it. Its CPU per frame while writing is the same-size floor: what one write costs the "
                    "kernel with that many sockets open and read."]
        ok = [r for r in runs["sizes"] if "error" not in r]
        if ok:
            xs = [same_size(r) for r in ok]
            out += ["", f"Met: ≤ {FLOOR_FACTOR} × floor at every size "
                        f"{verdict(all(r['node_cpu_us_per_delivery'] / floor <= FLOOR_FACTOR for r in ok))}"
                        + (f"; ≤ {FLOOR_FACTOR} × the same-size floor {verdict(all(x <= FLOOR_FACTOR for x in xs))}"
                           if all(x is not None for x in xs) else "") + "."]
        out.append("")
    if "connects" in runs:
        out += ["## Connects per second, one node", "", f"Goal: ≥ {CONNECTS_GOAL:,}/s. The connect floor is the same "
                "load against a bare tokio-tungstenite server (`wshub-bench accept-server`: accept, upgrade, hold; "
                "no routing, no Redis), with wshub's read buffer.", "",
                "| run | processes (in flight each) | open | failures | connects/s (all) | per process "
                "| server CPU µs per connect | Redis | load generator | cores busy | server RSS per connection |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in runs["connects"]:
            if "error" in r:
                out.append(f"| {r['name']} | error: {r['error'][:100]} | | | | | | | | | |")
                continue
            out.append(f"| {r['name']} | {r['processes']} ({r['concurrency_per_process']}) | {r['open']:,} | {r['failures']} "
                       f"| {r['connects_per_s']:,.0f} | {', '.join(f'{c:,.0f}' for c in r['connects_per_s_each'])} "
                       f"| {r['node_cpu_us_per_connect']:.1f} | {r['redis_cpu_us_per_connect']:.1f} "
                       f"| {r['loadgen_cpu_us_per_connect']:.1f} | {r['cores_busy']:.2f} "
                       f"| {r['rss_bytes_per_connection'] / 1024:.1f} KiB |")
        hubs = [r for r in runs["connects"] if "error" not in r and r.get("hub", "wshub") == "wshub"]
        floors = [r for r in runs["connects"] if "error" not in r and r.get("hub") == CONNECT_FLOOR]
        for r in hubs:
            vs = (f" ({r['connects_per_s'] / floors[0]['connects_per_s']:.2f} × the connect floor)" if floors else "")
            out += ["", f"Met: {verdict(r['connects_per_s'] >= CONNECTS_GOAL and r['failures'] == 0)}{vs}. "
                        "connects/s (all) = connections opened by all processes ÷ the longest process's connect time "
                        "(the processes start together)."]
        out.append("")
    if "nodes" in runs:
        out += ["## Cost per delivery as nodes are added", "",
                f"Goal: node CPU per delivery flat within {NODES_SPREAD:.0%} from 1 to 3 nodes (same receivers, same load).", ""]
        out += fan_head + [fan_row(r) for r in runs["nodes"]]
        ok = [r["node_cpu_us_per_delivery"] for r in runs["nodes"] if "error" not in r]
        if len(ok) > 1:
            spread = max(ok) / min(ok) - 1
            out += ["", f"Spread (highest ÷ lowest − 1): {spread:.1%}; met: {verdict(spread <= NODES_SPREAD)}."]
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    main()
