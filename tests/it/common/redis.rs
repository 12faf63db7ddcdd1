//! Real `redis-server` processes for tests: on a free port (never the
//! machine's shared 6379), killed with the test (its whole process group),
//! restartable on the same port, pausable with SIGSTOP. A missing
//! `redis-server` fails the test: it never skips (`scripts/test` installs
//! it).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::free_port;
use super::process::GroupChild;

pub struct RedisServer {
    pub port: u16,
    /// A cluster node's bus port (`--cluster-port`), chosen free like the
    /// port (Redis's default, port + 10000, may be taken or past 65535).
    bus_port: Option<u16>,
    child: Option<GroupChild>,
    dir: PathBuf,
    extra: Vec<String>,
}

/// Sends one inline command and returns the first reply line.
pub fn command(port: u16, cmd: &str) -> std::io::Result<String> {
    use std::io::{BufRead, BufReader, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(format!("{cmd}\r\n").as_bytes())?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    Ok(line.trim_end().to_owned())
}

impl RedisServer {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts a server with extra `redis-server` arguments.
    pub fn start_with(extra: &[&str]) -> Self {
        // Under target/, not /tmp: redis-server works in its `--dir`, and
        // `scripts/leftovers` recognises this checkout's processes by their
        // working directory.
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "wshub-redis-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let cluster = extra.contains(&"--cluster-enabled");
        let mut server = Self {
            port: 0,
            bus_port: None,
            child: None,
            dir,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        // A free port can be taken again before redis-server binds it
        // (another test's connection), and so can a cluster node's bus
        // port: a server that exits as it starts is started again on
        // other ports.
        const ATTEMPTS: u32 = 5;
        for attempt in 1..=ATTEMPTS {
            server.port = free_port();
            server.bus_port = cluster.then(|| {
                loop {
                    let bus = free_port();
                    if bus != server.port {
                        break bus;
                    }
                }
            });
            match server.launch() {
                Ok(()) => return server,
                Err(why) if attempt < ATTEMPTS => {
                    eprintln!(
                        "redis-server on port {}: {why}; trying another port",
                        server.port
                    );
                }
                Err(why) => panic!(
                    "redis-server on port {}: {why}, {ATTEMPTS} times",
                    server.port
                ),
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    /// Starts the server on `self.port` and waits until it answers; an
    /// error if it exited first (its port was taken).
    fn launch(&mut self) -> Result<(), String> {
        let child = GroupChild::spawn(
            Command::new("redis-server")
                .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(&self.dir)
                .args(self.bus_port.iter().flat_map(|p| ["--cluster-port".to_owned(), p.to_string()]))
                .args(&self.extra)
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )
        .unwrap_or_else(|e| {
                panic!("cannot start redis-server ({e}): these tests need it; install Debian's redis-server (scripts/test does)")
            });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while command(self.port, "PING")
            .map(|r| r != "+PONG")
            .unwrap_or(true)
        {
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                self.kill();
                return Err(format!("exited as it started ({status})"));
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not answer on port {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        // The `PONG` may be another test's server on the same port (ours
        // exits when it cannot bind, but not before the `PING`): then two
        // tests would share one Redis.
        let ours = self.child.as_ref().map(|c| c.id().to_string());
        let info = cli(self.port, &["INFO", "server"]);
        let answering = info
            .lines()
            .find_map(|l| l.strip_prefix("process_id:"))
            .map(|pid| pid.trim().to_owned());
        if answering != ours {
            self.kill();
            return Err(format!(
                "another redis-server (process {answering:?}) answers on it"
            ));
        }
        Ok(())
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL, its whole process group) and waits for
    /// it to go.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill_group();
        }
    }

    /// Starts it again on the same port.
    pub fn restart(&mut self) {
        self.kill();
        if let Err(why) = self.launch() {
            panic!("redis-server did not restart on port {}: {why}", self.port);
        }
    }

    fn signal(&self, sig: &str) {
        let child = self.child.as_ref().expect("running");
        assert!(child.signal(sig), "kill {sig} {}", child.id());
    }

    /// Freezes the process: connections stay open, nothing is answered.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    pub fn resume(&self) {
        self.signal("-CONT");
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        // SIGKILL ends a paused (SIGSTOPped) server too.
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Redis Cluster of `masters` masters with no replicas, for sharded
/// pub/sub tests.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start(masters: usize) -> Self {
        Self::start_each(masters, Vec::new)
    }

    /// A cluster whose nodes each take the arguments `extra` gives (called
    /// once per node, so each may have its own ports).
    pub fn start_each(masters: usize, extra: impl Fn() -> Vec<String>) -> Self {
        // `redis-cli --cluster create` waits for ever for a node that died
        // meanwhile (a port taken under it): bounded, and tried again with
        // new servers.
        const ATTEMPTS: u32 = 3;
        let mut attempt = 1;
        let nodes = loop {
            let nodes: Vec<RedisServer> = (0..masters)
                .map(|_| {
                    let mut args =
                        vec!["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"];
                    let more = extra();
                    args.extend(more.iter().map(String::as_str));
                    RedisServer::start_with(&args)
                })
                .collect();
            match create_cluster(&nodes) {
                Ok(()) => break nodes,
                Err(why) if attempt < ATTEMPTS => {
                    eprintln!("redis cluster create: {why}; trying with new servers");
                    attempt += 1;
                }
                Err(why) => panic!("redis cluster create: {why}, {ATTEMPTS} times"),
            }
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        for node in &nodes {
            loop {
                let info = Command::new("redis-cli")
                    .args(["-p", &node.port.to_string(), "cluster", "info"])
                    .output()
                    .unwrap();
                if String::from_utf8_lossy(&info.stdout).contains("cluster_state:ok") {
                    break;
                }
                assert!(Instant::now() < deadline, "cluster did not become ok");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Self { nodes }
    }

    /// Every node's URL, comma-separated (the `redis.url` of a sharded node).
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(|n| n.url())
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// `redis-cli --cluster create` of `nodes`, within 30 s.
fn create_cluster(nodes: &[RedisServer]) -> Result<(), String> {
    let addrs: Vec<String> = nodes
        .iter()
        .map(|n| format!("127.0.0.1:{}", n.port))
        .collect();
    let mut child = Command::new("redis-cli")
        .args(["--cluster", "create"])
        .args(&addrs)
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run redis-cli ({e}): install Debian's redis-tools"));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => return Err(format!("redis-cli exited with {status}")),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err("redis-cli did not finish within 30 s".into());
            }
            Err(e) => return Err(format!("cannot wait for redis-cli: {e}")),
        }
    }
}

/// A TCP proxy in front of a Redis that can hold back the replies on the
/// connection that sends one `SUBSCRIBE` (or any marker), to make a
/// resubscribe, a start-up subscribe or a pipeline last as long as a test
/// needs: [`arm`](Self::arm) it, wait until the held command is seen
/// ([`held`](Self::held)), do what must happen meanwhile, then
/// [`release`](Self::release). Commands still reach Redis: only the
/// replies wait. [`sever`](Self::sever) closes
/// every connection through it (the node reconnects). A test that must
/// hold two connections at once (a resubscribe, then the read after it)
/// takes a second, independent [`gate`](Self::gate).
pub struct GateProxy {
    pub port: u16,
    /// The gate the proxy's own `arm*`, `held` and `release` work.
    gate: std::sync::Arc<Gate>,
    state: std::sync::Arc<GateState>,
    task: tokio::task::JoinHandle<()>,
}

struct GateState {
    /// Every gate, the proxy's own first; each holds one connection.
    gates: std::sync::Mutex<Vec<std::sync::Arc<Gate>>>,
    /// Bumped to close every connection.
    generation: tokio::sync::watch::Sender<u64>,
}

/// Holds the next connection that sends its marker, until released.
pub struct Gate {
    /// The next connection that sends `marker` is held.
    armed: std::sync::atomic::AtomicBool,
    marker: std::sync::Mutex<Vec<u8>>,
    /// Hold the commands from the marker on (they never reach Redis unless
    /// released), not the replies.
    hold_commands: std::sync::atomic::AtomicBool,
    /// Set once a connection is being held.
    seen: tokio::sync::watch::Sender<bool>,
    /// Set to let what is held through.
    open: tokio::sync::watch::Sender<bool>,
}

impl Gate {
    fn new() -> Self {
        Self {
            armed: false.into(),
            marker: std::sync::Mutex::new(b"SUBSCRIBE".to_vec()),
            hold_commands: false.into(),
            seen: tokio::sync::watch::channel(false).0,
            open: tokio::sync::watch::channel(true).0,
        }
    }

    /// Holds the commands, from the one that contains `marker` on, on the
    /// next connection that sends it: they do not reach Redis unless
    /// released (the connection is dropped with the proxy otherwise).
    pub fn arm_commands_on(&self, marker: &[u8]) {
        self.arm_with(marker, true);
    }

    fn arm_with(&self, marker: &[u8], commands: bool) {
        use std::sync::atomic::Ordering;
        self.hold_commands.store(commands, Ordering::SeqCst);
        *self.marker.lock().unwrap() = marker.to_ascii_uppercase();
        self.open.send_replace(false);
        self.seen.send_replace(false);
        self.armed.store(true, Ordering::SeqCst);
    }

    /// Waits until a connection is being held (fails after the patience).
    pub async fn held(&self) {
        let mut seen = self.seen.subscribe();
        let marker = String::from_utf8_lossy(&self.marker.lock().unwrap()).into_owned();
        tokio::time::timeout(super::PATIENCE, seen.wait_for(|s| *s))
            .await
            .unwrap_or_else(|_| panic!("no {marker} reached the proxy"))
            .unwrap();
    }

    /// Lets what is held through (the gate stays open until the next arm).
    pub fn release(&self) {
        self.open.send_replace(true);
    }

    /// Whether `chunk` (upper-cased) takes this gate: it holds its marker
    /// and the gate is armed (which it no longer is).
    fn takes(&self, upper: &[u8]) -> bool {
        let marker = self.marker.lock().unwrap().clone();
        upper.windows(marker.len()).any(|w| w == marker)
            && self.armed.swap(false, std::sync::atomic::Ordering::SeqCst)
    }
}

impl GateProxy {
    pub async fn start(upstream: u16) -> Self {
        use std::sync::Arc;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let gate = Arc::new(Gate::new());
        let state = Arc::new(GateState {
            gates: std::sync::Mutex::new(vec![gate.clone()]),
            generation: tokio::sync::watch::channel(0).0,
        });
        let shared = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                else {
                    continue;
                };
                tokio::spawn(proxy_connection(client, server, shared.clone()));
            }
        });
        Self {
            port,
            gate,
            state,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// A second gate, independent of the proxy's own: it holds another
    /// connection while the first is held, or after it is released.
    pub fn gate(&self) -> std::sync::Arc<Gate> {
        let gate = std::sync::Arc::new(Gate::new());
        self.state.gates.lock().unwrap().push(gate.clone());
        gate
    }

    /// Holds the reply to the next SUBSCRIBE until [`release`](Self::release).
    pub fn arm(&self) {
        self.arm_on(b"SUBSCRIBE");
    }

    /// Holds the replies on the next connection that sends `marker` (any
    /// case) until [`release`](Self::release).
    pub fn arm_on(&self, marker: &[u8]) {
        self.gate.arm_with(marker, false);
    }

    /// Holds the commands, from the one that contains `marker` on, on the
    /// next connection that sends it: they do not reach Redis unless
    /// released (the connection is dropped with the proxy otherwise).
    pub fn arm_commands_on(&self, marker: &[u8]) {
        self.gate.arm_commands_on(marker);
    }

    /// Waits until a connection is being held (fails after the patience).
    pub async fn held(&self) {
        self.gate.held().await;
    }

    /// Lets what is held through (the gate stays open until the next arm).
    pub fn release(&self) {
        self.gate.release();
    }

    /// Closes every connection through the proxy.
    pub fn sever(&self) {
        self.state.generation.send_modify(|g| *g += 1);
    }
}

impl Drop for GateProxy {
    fn drop(&mut self) {
        self.task.abort();
        self.sever();
    }
}

async fn proxy_connection(
    client: tokio::net::TcpStream,
    server: tokio::net::TcpStream,
    state: std::sync::Arc<GateState>,
) {
    use std::sync::atomic::Ordering;
    use std::sync::{Arc, Mutex};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut client_rd, mut client_wr) = client.into_split();
    let (mut server_rd, mut server_wr) = server.into_split();
    // The gate holding this connection, if any.
    let gated: Arc<Mutex<Option<Arc<Gate>>>> = Arc::default();
    let mut generation = state.generation.subscribe();
    generation.mark_unchanged();
    let upstream = {
        let (state, gated) = (state.clone(), gated.clone());
        async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match client_rd.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let upper = buf[..n].to_ascii_uppercase();
                let holder = {
                    let mut gated = gated.lock().unwrap();
                    if gated.is_none() {
                        let gates = state.gates.lock().unwrap();
                        if let Some(gate) = gates.iter().find(|g| g.takes(&upper)) {
                            // Gate before the command reaches Redis, so
                            // its reply is certainly held.
                            *gated = Some(gate.clone());
                            gate.seen.send_replace(true);
                        }
                    }
                    gated.clone()
                };
                if let Some(gate) = holder
                    && gate.hold_commands.load(Ordering::SeqCst)
                {
                    let _ = gate.open.subscribe().wait_for(|o| *o).await;
                }
                if server_wr.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    };
    let downstream = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match server_rd.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let holder = gated.lock().unwrap().clone();
            if let Some(gate) = holder
                && !gate.hold_commands.load(Ordering::SeqCst)
            {
                let _ = gate.open.subscribe().wait_for(|o| *o).await;
                *gated.lock().unwrap() = None;
            }
            if client_wr.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        () = upstream => {}
        () = downstream => {}
        _ = generation.changed() => {}
    }
}

/// Runs `redis-cli -p PORT ARGS...` and returns its output.
pub fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run redis-cli ({e}): install Debian's redis-tools"));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Subscribers of `channel` on the server at `port` (`PUBSUB NUMSUB`, or
/// `PUBSUB SHARDNUMSUB` for a shard channel).
pub fn numsub(port: u16, channel: &str, sharded: bool) -> i64 {
    let which = if sharded { "SHARDNUMSUB" } else { "NUMSUB" };
    let out = cli(port, &["PUBSUB", which, channel]);
    // redis-cli prints the channel, then the count.
    out.lines()
        .nth(1)
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("unexpected PUBSUB {which} reply: {out:?}"))
}

impl RedisCluster {
    /// The index of the node that owns `key`'s slot, the slot, and the node
    /// ids (from `CLUSTER NODES` as each node sees itself).
    pub fn owner_of(&self, key: &str) -> (usize, u16, Vec<String>) {
        let slot: u16 = cli(self.nodes[0].port, &["CLUSTER", "KEYSLOT", key])
            .parse()
            .expect("CLUSTER KEYSLOT");
        let ids: Vec<String> = self
            .nodes
            .iter()
            .map(|n| cli(n.port, &["CLUSTER", "MYID"]))
            .collect();
        let nodes = cli(self.nodes[0].port, &["CLUSTER", "NODES"]);
        let owner_id = nodes
            .lines()
            .find(|line| {
                line.split_whitespace().skip(8).any(|range| {
                    let mut ends = range.splitn(2, '-').map(|n| n.parse::<u16>());
                    match (ends.next(), ends.next()) {
                        (Some(Ok(a)), Some(Ok(b))) => (a..=b).contains(&slot),
                        (Some(Ok(a)), None) => a == slot,
                        _ => false,
                    }
                })
            })
            .and_then(|line| line.split_whitespace().next())
            .expect("an owner of the slot")
            .to_owned();
        let owner = ids.iter().position(|id| *id == owner_id).unwrap();
        (owner, slot, ids)
    }

    /// Moves the slot of `key` (which holds no keys) from its owner to the
    /// next master with `CLUSTER SETSLOT … IMPORTING/MIGRATING/NODE`, the
    /// way resharding does. Returns (old owner, new owner) as node indexes.
    pub fn migrate_slot_of(&self, key: &str) -> (usize, usize) {
        let (from, slot, ids) = self.owner_of(key);
        let to = (from + 1) % self.nodes.len();
        let slot = slot.to_string();
        let port = |i: usize| self.nodes[i].port;
        for (node, args) in [
            (to, ["CLUSTER", "SETSLOT", &slot, "IMPORTING", &ids[from]]),
            (from, ["CLUSTER", "SETSLOT", &slot, "MIGRATING", &ids[to]]),
        ] {
            assert_eq!(cli(port(node), &args), "OK", "{args:?}");
        }
        // The new owner first, then the old one (which then gives up its
        // subscribers), then the rest.
        let mut order = vec![to, from];
        order.extend((0..self.nodes.len()).filter(|i| *i != to && *i != from));
        for node in order {
            let args = ["CLUSTER", "SETSLOT", &slot, "NODE", &ids[to]];
            assert_eq!(cli(port(node), &args), "OK", "{args:?} on node {node}");
        }
        assert_eq!(self.owner_of(key).0, to, "the slot moved");
        (from, to)
    }
}
