#!/usr/bin/env python3
"""A/B of two wshub builds: node CPU per delivery for fanout 2,000 @ 65/s and
groups 500x10 @ 0.5/s, two nodes on one Redis (a fresh redis-server for
every run, on a free loopback port), the two builds alternated over ROUNDS
rounds; prints each run and the medians. For "did this change make the hot
path slower". The nodes get this process's environment, so
`WSHUB_HISTORY__ENABLED=true python3 bench/ab.py ...` compares history on.
Each node runs its share of the cores as worker threads, as in
bench/run.py, unless the environment sets `TOKIO_WORKER_THREADS`.
(One Redis for all runs once made history-on runs report duplicates: the
drain handoff of one run's sockets replayed the next run's identities what
was published in between, as it should.)

    python3 bench/ab.py BEFORE/wshub AFTER/wshub target/release/wshub-bench [ROUNDS]

Build each side with `cargo build --release -p wshub -p wshub-bench` in its
own checkout. Every run is bounded (8 s of load) and targets 127.0.0.1 only.
"""
import json, os, resource, shutil, socket, statistics, subprocess, sys, time, tempfile
if len(sys.argv) < 4:
    raise SystemExit(__doc__)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import workers_per_node  # noqa: E402
WORKERS = workers_per_node(2)
BIN = {"before": sys.argv[1], "after": sys.argv[2]}
BENCH = sys.argv[3]
ROUNDS = int(sys.argv[4]) if len(sys.argv) > 4 else 3
def free():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p
def lim():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE); resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
def wait(port):
    for _ in range(200):
        try: socket.create_connection(("127.0.0.1", port), 0.2).close(); return
        except OSError: time.sleep(0.05)
    raise SystemExit(f"port {port} never opened")
def start_redis():
    port, d = free(), tempfile.mkdtemp()
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", d], stdout=subprocess.DEVNULL, start_new_session=True)
    wait(port)
    return port, server, d
def stop(proc):
    # Each was started in its own session: the whole group goes.
    try: os.killpg(proc.pid, 9)
    except ProcessLookupError: pass
    proc.wait()
res = {k: {"fanout": [], "groups": []} for k in BIN}
SC = {"fanout": ["fanout", "--receivers", "2000", "--rate", "65", "--seconds", "8"],
      "groups": ["groups", "--groups", "500", "--size", "10", "--rate", "0.5", "--seconds", "8"]}
for rnd in range(ROUNDS):
    for which in (["before", "after"] if rnd % 2 == 0 else ["after", "before"]):
        for sc, args in SC.items():
            rp, redis, redis_dir = start_redis()
            nodes = []
            try:
                ports = [free(), free()]
                env = lambda p: {**os.environ, "WSHUB_LISTEN": f"127.0.0.1:{p}", "WSHUB_REDIS__URL": f"redis://127.0.0.1:{rp}",
                                 "WSHUB_LIMITS__MESSAGES_PER_SECOND": "0", "WSHUB_LOG__LEVEL": "warn",
                                 # Each node its share of the cores, as bench/run.py runs them
                                 # (unless this environment sets TOKIO_WORKER_THREADS).
                                 **({"TOKIO_WORKER_THREADS": WORKERS} if WORKERS else {})}
                nodes = [subprocess.Popen([BIN[which]], env=env(p), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=lim, start_new_session=True) for p in ports]
                for p in ports: wait(p)
                time.sleep(0.5)
                tgt = []
                for p, n in zip(ports, nodes): tgt += ["--node", f"127.0.0.1:{p}", "--server-pid", str(n.pid)]
                out = subprocess.run([BENCH, *args, *tgt], capture_output=True, text=True, timeout=300, preexec_fn=lim)
                for n in nodes: n.terminate()
                for n in nodes: n.wait(timeout=30)
            finally:
                # Nothing outlives its run, whatever failed.
                for proc in [*nodes, redis]: stop(proc)
                shutil.rmtree(redis_dir, ignore_errors=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            res[which][sc].append(r["server_cpu_us_per_delivery"])
            print(which, sc, round(r["server_cpu_us_per_delivery"], 2), "us/delivery", "p99", r["latency"]["p99_ms"], "missing", r["missing"], "dup", r["duplicated"], flush=True)
for sc in SC:
    b, a = statistics.median(res["before"][sc]), statistics.median(res["after"][sc])
    print(f"{sc}: before {b:.2f} us, after {a:.2f} us (medians of {len(res['before'][sc])}), after/before {a/b:.3f}")
