#!/usr/bin/env python3
"""Runs wshub's benchmark matrix side by side with its peers and writes
bench/results/latest.{json,md,png}.

    python3 bench/run.py            # the whole matrix (about 20 minutes)
    python3 bench/run.py --quick    # shorter runs, for a smoke test
    python3 bench/run.py --hubs wshub --history both --no-ramp
                                    # the cost of history (lossless resume)

It builds wshub and wshub-bench (release), starts a redis-server on a free
port, and for each hub (wshub, the same hub on uWebSockets.js, the hand-rolled
Node hub, Socket.IO with its Redis adapter) starts two nodes on loopback, runs
every scenario against them, and stops them; then it ramps the fanout rate
for every hub. The peers are vendored in bench/peers/ (each folder copied to
a temporary folder, `npm ci` run there; see bench/peers/README.md). Every run
is bounded in count and time and targets 127.0.0.1 only.
"""

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "target" / "release" / "wshub-bench"
WSHUB = ROOT / "target" / "release" / "wshub"
PEERS = ROOT / "bench" / "peers"
# The peer hubs, each a folder of PEERS started as `node server.js PORT`.
PEER_HUBS = ("uws", "nodews", "socketio")
RESULTS = ROOT / "bench" / "results"


def free_ports(n):
    """n distinct free ports (all probe sockets are held until every port is
    chosen, so the kernel cannot hand the same one out twice)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def raise_fd_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def wait_port(port, timeout=20, proc=None):
    """Waits until something accepts on 127.0.0.1:port; gives up early when
    `proc` (the process meant to listen there) has exited."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


class Procs:
    def __init__(self):
        self.procs = []

    def start(self, args, env=None, log=None):
        p = subprocess.Popen(args, env={**os.environ, **(env or {})}, stdout=log or subprocess.DEVNULL,
                             stderr=subprocess.STDOUT if log else subprocess.DEVNULL, preexec_fn=raise_fd_limit)
        self.procs.append(p)
        return p

    def stop(self, procs=None):
        """Stops `procs`, or every process when None."""
        chosen = self.procs if procs is None else procs
        for p in chosen:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in chosen:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        if procs is None:
            self.procs = []
        else:
            self.procs = [p for p in self.procs if p not in procs]


def bench(*args):
    out = subprocess.run([str(BENCH), *map(str, args)], capture_output=True, text=True, timeout=600,
                         preexec_fn=raise_fd_limit)
    if out.returncode != 0:
        raise RuntimeError(f"wshub-bench {' '.join(map(str, args))} failed: {out.stderr.strip()[-500:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def start_redis(procs, workdir):
    """A redis-server on a free loopback port, no persistence: (process, url)."""
    port = free_ports(1)[0]
    redis = procs.start(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                         "--appendonly", "no", "--dir", str(workdir)])
    wait_port(port)
    return redis, f"redis://127.0.0.1:{port}"


HISTORY_HUB = "wshub+history"
# Not a hub: `wshub-bench accept-server`, a bare WebSocket server for the
# connect and idle-memory floors (bench/scale.py).
CONNECT_FLOOR = "connect-floor"


def available_cores():
    """The cores this process may use, counted as Rust's
    `available_parallelism` (and so tokio's default) counts them: the CPU
    affinity mask, capped by the CPU quota of this process's cgroup and
    its parents (v2 `cpu.max`, or v1's `cpu.cfs_quota_us` /
    `cpu.cfs_period_us`), the smallest one found."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    for quota, period in cgroup_quotas():
        if quota > 0 and period > 0:
            cores = min(cores, max(1, quota // period))
    return cores


def cgroup_quotas():
    """(quota, period) of every CPU quota over this process: its cgroup's
    and each parent's, v2 or v1 (a quota of -1 or `max` is none)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        hierarchy, controllers, path = line.split(":", 2)
        if hierarchy == "0" and controllers == "":
            # cgroup v2: one hierarchy, `cpu.max` is "QUOTA PERIOD" or "max PERIOD".
            dirs, read = [Path("/sys/fs/cgroup")], lambda d: (d / "cpu.max").read_text().split()
        elif "cpu" in controllers.split(","):
            dirs = [Path("/sys/fs/cgroup") / name for name in (controllers, "cpu", "cpu,cpuacct")]
            read = lambda d: [(d / "cpu.cfs_quota_us").read_text().strip(),  # noqa: E731
                              (d / "cpu.cfs_period_us").read_text().strip()]
        else:
            continue
        for mount in dirs:
            if not mount.is_dir():
                continue
            parts = [p for p in path.split("/") if p]
            for depth in range(len(parts), -1, -1):
                try:
                    quota, period = read(mount.joinpath(*parts[:depth]))
                    found.append((int(quota), int(period)))
                except (OSError, ValueError):
                    continue
            break
    return found


def workers_per_node(n):
    """`TOKIO_WORKER_THREADS` for each of `n` wshub nodes on this machine, or
    None to leave it alone: when the environment sets it (the nodes inherit
    it), and for a node alone (tokio's default, one worker per available
    core). Otherwise each node's share of the available cores, at least one:
    two nodes on two cores run one worker each, as nodes given one core's
    CPU limit would (and as the peers, one Node.js thread per node, do).
    docs/deploying.md, "Worker threads", has the measurements behind it."""
    if "TOKIO_WORKER_THREADS" in os.environ or n == 1:
        return None
    return str(max(1, available_cores() // n))


def start_hub(procs, hub, redis_url, workdir, n=2):
    ports = free_ports(n)
    nodes = []
    for port in ports:
        if hub == CONNECT_FLOOR:
            # The connect floor: a bare tokio-tungstenite server, no hub.
            nodes.append(procs.start([str(BENCH), "accept-server", "--listen", f"127.0.0.1:{port}"]))
        elif hub in ("wshub", HISTORY_HUB):
            env = {"WSHUB_LISTEN": f"127.0.0.1:{port}", "WSHUB_REDIS__URL": redis_url,
                   # One publisher socket sends far above the default per-socket rate.
                   "WSHUB_LIMITS__MESSAGES_PER_SECOND": "0", "WSHUB_LOG__LEVEL": "warn",
                   "WSHUB_HISTORY__ENABLED": "true" if hub == HISTORY_HUB else "false"}
            if workers_per_node(n):
                env["TOKIO_WORKER_THREADS"] = workers_per_node(n)
            nodes.append(procs.start([str(WSHUB)], env))
        else:
            env = {"REDIS_URL": redis_url}
            # A peer's output (its start line, or why it refuses to start,
            # e.g. uws without a native binary) goes to a log in the workdir.
            with open(workdir / f"{hub}-{port}.log", "w") as log:
                nodes.append(procs.start(["node", str(workdir / hub / "server.js"), str(port)], env, log))

    def failed(why):
        procs.stop(nodes)
        logs = [workdir / f"{hub}-{port}.log" for port in ports]
        said = " | ".join(f.read_text().strip()[-300:] for f in logs if f.exists() and f.read_text().strip())
        return RuntimeError(f"{hub} node {why}" + (f": {said}" if said else ""))

    for port, p in zip(ports, nodes):
        try:
            wait_port(port, proc=p)
        except RuntimeError as e:
            raise failed(str(e)) from None
    time.sleep(0.5)
    for p in nodes:
        if p.poll() is not None:
            raise failed(f"exited with {p.returncode}")
    target = []
    for port, p in zip(ports, nodes):
        target += ["--node", f"127.0.0.1:{port}", "--server-pid", p.pid]
    target += ["--proto", "socketio" if hub == "socketio" else "wshub"]
    return nodes, target


def scenarios(quick):
    s = 4 if quick else 8
    return [
        ("fanout 2,000 @ 65/s", ["fanout", "--receivers", 2000, "--rate", 65, "--seconds", s]),
        ("groups 500x10 @ 0.5/s", ["groups", "--groups", 500, "--size", 10, "--rate", 0.5, "--seconds", s]),
        ("groups 500x10 @ 1.5/s", ["groups", "--groups", 500, "--size", 10, "--rate", 1.5, "--seconds", s]),
        ("fanout 10,000 @ 13/s", ["fanout", "--receivers", 10000, "--rate", 13, "--seconds", s]),
        ("idle 10,000", ["idle", "--connections", 10000]),
    ]


# The ramp's steps: offered fanout messages per second to 2,000 receivers.
RAMP_RATES = (65, 100, 150, 200, 300, 400, 600, 800)


def ramp(procs, hub, redis_url, workdir, quick, p99_bound_ms=250.0):
    """Highest fanout rate (2,000 receivers) with < 0.1 % missing and p99 under
    the bound, confirmed twice."""
    rates = RAMP_RATES
    best, points = None, []
    for rate in rates:
        ok = 0
        for _ in range(2):
            nodes = []
            try:
                nodes, target = start_hub(procs, hub, redis_url, workdir)
                r = bench("fanout", "--receivers", 2000, "--rate", rate, "--seconds", 3 if quick else 5, *target)
            except RuntimeError as e:
                r = {"error": str(e), "rate": rate}
            procs.stop(nodes)
            points.append(r)
            if "error" in r:
                break
            if r.get("missing_ratio", 1) < 0.001 and r["latency"]["p99_ms"] < p99_bound_ms:
                ok += 1
            else:
                break
        if ok == 2:
            best = rate
        else:
            break
    return best, points


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--hubs", default="wshub,uws,nodews,socketio",
                    help=f"comma-separated, from wshub and the peers in bench/peers/ ({', '.join(PEER_HUBS)})")
    ap.add_argument("--no-ramp", action="store_true")
    ap.add_argument("--history", choices=("off", "on", "both"), default="off",
                    help="wshub with history.enabled off (today's default), on, or both side by side "
                         "(as the hubs 'wshub' and 'wshub+history'); Redis CPU per publish is reported for every run")
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite latest.md and latest.png from latest.json, run nothing")
    args = ap.parse_args()
    if args.report_only:
        results = json.loads((RESULTS / "latest.json").read_text())
        (RESULTS / "latest.md").write_text(markdown(results))
        chart(results, RESULTS / "latest.png")
        print((RESULTS / "latest.md").read_text())
        return
    hubs = args.hubs.split(",")
    unknown = [h for h in hubs if h not in ("wshub", HISTORY_HUB, *PEER_HUBS)]
    if unknown:
        ap.error(f"unknown hub(s) {', '.join(unknown)}: choose from wshub, {', '.join(PEER_HUBS)}")
    if "wshub" in hubs and args.history != "off":
        at = hubs.index("wshub")
        hubs[at:at + 1] = [HISTORY_HUB] if args.history == "on" else ["wshub", HISTORY_HUB]

    subprocess.run(["cargo", "build", "--release", "-p", "wshub", "-p", "wshub-bench"], cwd=ROOT, check=True)
    workdir = Path(tempfile.mkdtemp(prefix="wshub-bench-"))
    for peer in PEER_HUBS:
        if peer in hubs:
            # Only the vendored files: a node_modules left by a manual `npm ci`
            # in bench/peers/ is not copied, `npm ci` installs afresh.
            shutil.copytree(PEERS / peer, workdir / peer, ignore=shutil.ignore_patterns("node_modules"))
            for p in (workdir / peer).rglob("*"):
                p.chmod(p.stat().st_mode | 0o200)
            subprocess.run(["npm", "ci", "--silent", "--no-audit", "--no-fund"], cwd=workdir / peer, check=True)

    procs = Procs()
    redis, redis_url = start_redis(procs, workdir)

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    results = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                           "cpu": cpu_model(), "date": time.strftime("%Y-%m-%d")},
               # What wshub was built from, and each of its two nodes' worker threads.
               "wshub": {"commit": commit or "unknown",
                         "workers_per_node": os.environ.get("TOKIO_WORKER_THREADS") or workers_per_node(2) or "default"},
               "floor": [], "latency_floor": [], "groups_floor": [], "runs": [], "ramp": {}}
    def measure_floor():
        # The floor drifts with the machine's state: measure it between the
        # hubs and use the median of each kind.
        for batch in (1, 4):
            results["floor"].append(bench("floor", "--sockets", 2000, "--rate", 65, "--batch", batch,
                                          "--seconds", 4 if args.quick else 6))
        # The latency floor of the two fanouts: the same trivial writer on
        # as many threads as cores, one round of writes per message.
        for sockets, rate in ((2000, 65), (10000, 13)):
            results["latency_floor"].append(bench("floor", "--sockets", sockets, "--rate", rate,
                                                  "--threads", os.cpu_count(), "--seconds", 4 if args.quick else 6))
        # The groups-shaped floor: one node's share of the groups scenarios.
        for rate in (5, 15):
            results["groups_floor"].append(bench(*GROUPS_FLOOR, "--rate", rate, "--seconds", 4 if args.quick else 6))

    try:
        measure_floor()
        for hub in hubs:
            for name, cmd in scenarios(args.quick):
                nodes = []
                try:
                    nodes, target = start_hub(procs, hub, redis_url, workdir)
                    redis0 = cpu_seconds(redis.pid)
                    r = bench(*cmd, *target)
                    r["redis_cpu_s"] = cpu_seconds(redis.pid) - redis0
                except RuntimeError as e:
                    r = {"error": str(e)}
                procs.stop(nodes)
                r.update({"hub": hub, "name": name})
                results["runs"].append(r)
                print(f"{hub:9} {name:24} {summary(r)}", flush=True)
            measure_floor()
        if not args.no_ramp:
            for hub in hubs:
                best, points = ramp(procs, hub, redis_url, workdir, args.quick)
                results["ramp"][hub] = {"best_rate": best, "points": points}
                print(f"{hub:9} ramp: highest fanout rate sustained = {best} msg/s", flush=True)
    finally:
        procs.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "latest.md").write_text(markdown(results))
    chart(results, RESULTS / "latest.png")
    print((RESULTS / "latest.md").read_text())


def cpu_seconds(pid):
    """User + system CPU seconds of a process, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def redis_us_per_publish(r):
    """Redis CPU per message published, in µs (None when unknown)."""
    sent = r.get("sent")
    if not sent or r.get("redis_cpu_s") is None:
        return None
    return r["redis_cpu_s"] * 1e6 / sent


def cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def summary(r):
    if "error" in r:
        return "ERROR " + r["error"][:120]
    if r.get("scenario") == "idle":
        return f"{r['open']} open, {r['failures']} failed, {r['connects_per_s']:.0f} connects/s, " \
               f"{r['rss_bytes_per_connection'] / 1024:.1f} KiB/conn"
    return f"{r['deliveries_per_s']:.0f} deliveries/s, p99 {r['latency']['p99_ms']:.1f} ms, " \
           f"{r['server_cpu_us_per_delivery']:.2f} us/delivery, missing {r['missing']}, dup {r['duplicated']}"


def floor_median(res, batch):
    values = sorted(f["writer_cpu_us_per_frame"] for f in res["floor"] if f["frames_per_write"] == batch)
    return statistics.median(values), values


def latency_floor(res, sockets):
    """Median (p50, p99) in ms of the latency floors to `sockets`, and how
    many were measured."""
    runs = [f for f in res.get("latency_floor", []) if f["sockets"] == sockets]
    if not runs:
        return None
    return (statistics.median(f["latency"]["p50_ms"] for f in runs),
            statistics.median(f["latency"]["p99_ms"] for f in runs), len(runs))


# The groups-shaped floor: the trivial writer as one node of the groups
# scenarios sees them (2,500 of the 5,000 members; each message to the 5 of
# its 10 members on that node; at 0.5 messages a second per member, 5
# frames a second per socket, --rate 5; at 1.5, --rate 15), 5 sockets a
# round, 2,500 (or 7,500) rounds a second, sleeping between: every frame a
# lone write to an idle socket, the writer woken for each message.
GROUPS_FLOOR = ("floor", "--sockets", 2500, "--per-round", 5)


def groups_floor(res, rate):
    """Median CPU per frame of the groups-shaped floors at `rate` frames a
    second per socket, and the values."""
    values = sorted(f["writer_cpu_us_per_frame"] for f in res.get("groups_floor", []) if f["rate"] == rate)
    return (statistics.median(values), values) if values else (None, [])


def groups_floor_line(res):
    parts = []
    for rate, name in ((5, "0.5"), (15, "1.5")):
        median, values = groups_floor(res, rate)
        if median is not None:
            parts.append(f"groups @ {name}/s **{median:.2f} µs** per frame (median of {len(values)}: "
                         f"{', '.join(f'{v:.2f}' for v in values)})")
    if not parts:
        return None
    return ("Groups-shaped floor (the same trivial writer as one node of the groups scenarios sees them: 2,500 "
            "sockets, 5 written per round, one round per message, sleeping between rounds, so every frame is a "
            "lone write to an idle socket and the writer is woken for each message): " + "; ".join(parts) + ".")


def latency_floor_line(res):
    parts = []
    for sockets, rate in ((2000, 65), (10000, 13)):
        got = latency_floor(res, sockets)
        if got:
            parts.append(f"{sockets:,} sockets @ {rate}/s: **{got[0]:.1f} / {got[1]:.1f} ms** (median of {got[2]})")
    if not parts:
        return None
    threads = res["latency_floor"][0].get("threads", 1)
    return ("Latency floor (the same trivial writer on " + f"{threads} thread{'s' if threads > 1 else ''}"
            + ", one round of writes to every socket per message, read by the load generator; p50 / p99 from "
            "the start of a round to each frame's arrival): " + "; ".join(parts) + ".")


def markdown(res):
    floor1, all1 = floor_median(res, 1)
    floor4, _ = floor_median(res, 4)
    m = res["machine"]
    lines = [f"Measured {m['date']} on {m['cpus']} CPUs ({m['cpu']}), 2 nodes + Redis + load generator on the same machine.",
             ""]
    if "wshub" in res:
        w = res["wshub"]
        lines += [f"wshub at commit {w['commit']}, each node with {w['workers_per_node']} worker thread(s) "
                  "(`TOKIO_WORKER_THREADS`; run.py's `workers_per_node`).", ""]
    lines += [
             f"Floor (a trivial process writing pre-encoded frames to 2,000 loopback sockets), median of "
             f"{len(all1)} measurements taken between the hubs ({', '.join(f'{v:.2f}' for v in all1)}): "
             f"**{floor1:.2f} µs** per frame with one frame per write, {floor4:.2f} µs with four per write.",
             ""]
    lat_floor = latency_floor_line(res)
    if lat_floor:
        lines += [lat_floor, ""]
    g_floor = groups_floor_line(res)
    if g_floor:
        lines += [g_floor, ""]
    lines += [
             "| workload | hub | deliveries/s | p50 / p99 ms | missing / dup | server CPU µs per delivery | × floor | server cores | load generator cores | Redis CPU µs per publish |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["runs"]:
        if r.get("scenario") in ("fanout", "groups"):
            lat = r["latency"]
            redis_us = redis_us_per_publish(r)
            lines.append(f"| {r['name']} | {r['hub']} | {r['deliveries_per_s']:,.0f} | {lat['p50_ms']:.1f} / {lat['p99_ms']:.1f} "
                         f"| {r['missing']} / {r['duplicated']} | {r['server_cpu_us_per_delivery']:.2f} "
                         f"| {r['server_cpu_us_per_delivery'] / floor1:.2f} | {r['server_cpu_cores']:.2f} | {r.get('loadgen_cpu_cores', 0):.2f} "
                         f"| {'' if redis_us is None else f'{redis_us:.1f}'} |")
        elif "error" in r:
            lines.append(f"| {r['name']} | {r['hub']} | error: {r['error'][:80]} | | | | | | | |")
    lines += ["", "| idle connections | hub | open | failures | connects/s | server RSS per connection |", "|---|---|---:|---:|---:|---:|"]
    for r in res["runs"]:
        if r.get("scenario") == "idle":
            lines.append(f"| {r['name']} | {r['hub']} | {r['open']:,} | {r['failures']} | {r['connects_per_s']:,.0f} "
                         f"| {r['rss_bytes_per_connection'] / 1024:.1f} KiB |")
    if res["ramp"]:
        lines += ["", "Highest fanout rate to 2,000 receivers with < 0.1 % missing and p99 < 250 ms, each step confirmed twice:", ""]
        for hub, r in res["ramp"].items():
            if r["best_rate"] is None:
                first = next((p for p in r["points"] if "latency" in p), None)
                why = f" (p99 {first['latency']['p99_ms']:.0f} ms)" if first else ""
                if not first and r["points"] and "error" in r["points"][0]:
                    why = f" (error: {r['points'][0]['error'][:80]})"
                lines.append(f"- {hub}: none; the first step, 65 msg/s, already failed{why}")
            else:
                best = [p for p in r["points"] if p.get("rate") == r["best_rate"] and "latency" in p]
                measured = min(p["deliveries_per_s"] for p in best)
                top = " (the ramp's last step: it may sustain more)" if r["best_rate"] == RAMP_RATES[-1] else ""
                lines.append(f"- {hub}: {r['best_rate']} msg/s ({measured:,.0f} deliveries/s measured){top}")
    return "\n".join(lines) + "\n"


def chart(res, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        print("matplotlib not installed: no chart (pip install matplotlib)", file=sys.stderr)
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    # One colour per hub, the same in every run's chart.
    colours = {"wshub": "C0", HISTORY_HUB: "C4", "uws": "C2", "nodews": "C1", "socketio": "C3"}
    top = max((p["rate"] for r in res["ramp"].values() for p in r["points"] if "rate" in p), default=0)
    if top:
        # What the receivers would get if every message reached every one of them.
        offered = [x for x in RAMP_RATES if x <= top]
        a.plot(offered, [x * 2000 / 1000 for x in offered], ":x", color="grey", label="offered × 2,000")
        b.axhline(250, ls=":", color="grey", label="p99 bound (250 ms)")
    for i, (hub, r) in enumerate(res["ramp"].items()):
        pts = [p for p in r["points"] if "deliveries_per_s" in p]
        colour = colours.get(hub, f"C{5 + i}")
        # Every measurement as a point (each step runs twice), a line through each step's mean.
        rates = sorted({p["rate"] for p in pts})
        mean = lambda key, rate: statistics.mean(key(p) for p in pts if p["rate"] == rate)
        through = lambda p: p["deliveries_per_s"] / 1000
        p99 = lambda p: p["latency"]["p99_ms"]
        label = hub if pts else f"{hub} (no measurement)"
        a.plot(rates, [mean(through, x) for x in rates], "-", color=colour, label=label)
        a.plot([p["rate"] for p in pts], [through(p) for p in pts], "o", color=colour, ms=4)
        b.plot(rates, [mean(p99, x) for x in rates], "-", color=colour, label=label)
        b.plot([p["rate"] for p in pts], [p99(p) for p in pts], "o", color=colour, ms=4)
    a.set(title="Fanout to 2,000 receivers: throughput", xlabel="offered msg/s", ylabel="deliveries/s (thousands)")
    b.set(title="Fanout to 2,000 receivers: p99 latency", xlabel="offered msg/s", ylabel="p99 ms", yscale="log")
    b.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    # Plain numbers on the minor ticks too, thinned when p99 spans several decades.
    b.yaxis.set_minor_formatter(matplotlib.ticker.LogFormatter(labelOnlyBase=False))
    for ax in (a, b):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # nothing to label with --no-ramp
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
