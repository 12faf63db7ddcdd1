//! `wshub-bench`: the load generator of wshub's benchmark (see
//! `bench/README.md` and `bench/run.py`, which runs the whole matrix).
//!
//! Every run is bounded in count and time, targets loopback addresses only,
//! and prints one JSON object with its figures on stdout.
//!
//! - `fanout`: receivers spread over the nodes, one publisher sending to
//!   everyone at a fixed rate; latency from a send timestamp in each message.
//! - `groups`: groups of members spread over the nodes, each member sending
//!   to its own group at a fixed rate.
//! - `idle`: connections opened as fast as allowed and held; connect rate,
//!   failures, and the servers' RSS per connection.
//! - `floor`: the physical floor: a trivial process writing pre-encoded
//!   frames to loopback sockets (on one or several threads), its CPU per
//!   frame while it writes (its connects are not counted), and the latency
//!   from the start of a round of writes to each frame's arrival (what a
//!   fanout to that many sockets cannot beat).
//! - `accept-server`: the connect floor: a trivial WebSocket server
//!   (tokio-tungstenite, no hub) that accepts and holds sockets, for the
//!   `idle` scenario to measure connects per second and memory per idle
//!   socket without a hub behind them.
//! - `receive` and `publish`: one fanout split over several processes (see
//!   `bench/scale.py`): receiver-only processes, each holding its share of
//!   the receivers, and one publisher. Each receiver process reports, per
//!   message, how many of its receivers got it, its duplicates, and a latency
//!   histogram of fixed log buckets, so the coordinator can merge them.
//!
//! Server CPU time comes from `/proc/<pid>/stat` of the `--server-pid`
//! processes, so efficiency is comparable even though the load generator
//! shares the machine.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::json;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

#[derive(Parser)]
#[command(about = "Load generator for wshub and its peers (loopback only, bounded runs)")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum Proto {
    /// wshub's JSON frames (also the hand-rolled Node hub's).
    Wshub,
    /// Socket.IO 4 over a raw WebSocket (Engine.IO 4).
    Socketio,
}

#[derive(clap::Args, Clone)]
struct Target {
    /// A node, `127.0.0.1:PORT` (repeat for several; clients are spread round-robin).
    #[arg(long = "node", required = true)]
    nodes: Vec<SocketAddr>,
    #[arg(long, value_enum, default_value = "wshub")]
    proto: Proto,
    /// Server processes whose CPU time and RSS are measured.
    #[arg(long = "server-pid")]
    server_pids: Vec<u32>,
    /// Source addresses for client sockets (127.0.0.x), round-robin.
    #[arg(long = "source", default_value = "127.0.0.1")]
    sources: Vec<IpAddr>,
}

#[derive(Subcommand)]
enum Command {
    /// One publisher to everyone.
    Fanout {
        #[command(flatten)]
        target: Target,
        #[arg(long, default_value_t = 2000)]
        receivers: usize,
        /// Messages per second from the publisher.
        #[arg(long, default_value_t = 65.0)]
        rate: f64,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// Every member of every group sends to its own group.
    Groups {
        #[command(flatten)]
        target: Target,
        #[arg(long, default_value_t = 500)]
        groups: usize,
        #[arg(long, default_value_t = 10)]
        size: usize,
        /// Messages per second per member.
        #[arg(long, default_value_t = 0.5)]
        rate: f64,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// Connections held open.
    Idle {
        #[command(flatten)]
        target: Target,
        #[arg(long, default_value_t = 10_000)]
        connections: usize,
        /// Connects in flight at once.
        #[arg(long, default_value_t = 256)]
        concurrency: usize,
        /// Also reads the servers' RSS this many seconds after the first
        /// reading (2 s after the last connect), sockets still open: does
        /// the allocator return the connect burst's free memory later?
        #[arg(long, default_value_t = 0)]
        hold_seconds: u64,
    },
    /// The loopback write floor, measured in a child process.
    Floor {
        #[command(flatten)]
        shape: FloorArgs,
    },
    /// The connect floor: accepts WebSocket upgrades on `--listen` and
    /// holds the sockets (reading and discarding) until killed or
    /// `--max-seconds` have passed.
    AcceptServer {
        #[arg(long)]
        listen: SocketAddr,
        /// Per-socket read buffer (wshub's default `ws.read_buffer_bytes`).
        #[arg(long, default_value_t = 256)]
        read_buffer: usize,
        #[arg(long, default_value_t = 900)]
        max_seconds: u64,
    },
    /// Receivers only (one share of a fanout split over processes): connects,
    /// prints a `ready` line, counts deliveries until `stop` on stdin (or
    /// `--max-seconds`), waits for the last deliveries, prints its counts.
    Receive {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        receivers: usize,
        /// Global index of this process's first receiver: user ids are
        /// `r<first + i>`, and nodes are chosen round-robin by that index.
        #[arg(long, default_value_t = 0)]
        first: usize,
        /// Messages the publisher sends (sequence numbers 0..messages).
        #[arg(long)]
        messages: usize,
        /// Upper bound on this process's life after it is ready.
        #[arg(long, default_value_t = 600)]
        max_seconds: u64,
        /// After `stop`, how long to wait for deliveries still in flight
        /// (less if they stop growing for 0.5 s, or all have arrived).
        #[arg(long, default_value_t = 30)]
        drain_seconds: u64,
    },
    /// The publisher only: sends `--messages` to everyone at `--rate`.
    Publish {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        messages: usize,
        /// Messages per second.
        #[arg(long)]
        rate: f64,
    },
    /// (internal) The floor's writer process.
    FloorWriter {
        #[arg(long)]
        addr: SocketAddr,
        #[command(flatten)]
        shape: FloorArgs,
    },
}

/// What a floor writes: the `floor` command's arguments, passed on as they
/// are to its writer process (`floor-writer`).
#[derive(clap::Args, Clone, Debug)]
struct FloorArgs {
    #[arg(long, default_value_t = 2000)]
    sockets: usize,
    /// Frames per second per socket.
    #[arg(long, default_value_t = 65.0)]
    rate: f64,
    /// Frames per write call.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Writer threads, each writing its share of the sockets every
    /// round (the cores a hub could deliver one message on).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Sockets written per round, in turn (default: every socket): the
    /// groups-shaped floor, where a message goes to a few idle sockets
    /// and the writer sleeps between messages. Rounds then come
    /// sockets ÷ per-round times as often, so each socket still gets
    /// `--rate` frames a second. One writer thread only.
    #[arg(long)]
    per_round: Option<usize>,
}

impl FloorArgs {
    /// The arguments as the command line takes them.
    fn to_args(&self) -> Vec<String> {
        let mut args = vec![
            "--sockets".into(),
            self.sockets.to_string(),
            "--rate".into(),
            self.rate.to_string(),
            "--batch".into(),
            self.batch.to_string(),
            "--seconds".into(),
            self.seconds.to_string(),
            "--threads".into(),
            self.threads.to_string(),
        ];
        if let Some(k) = self.per_round {
            args.extend(["--per-round".into(), k.to_string()]);
        }
        args
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let result = match args.command {
        Command::Fanout {
            target,
            receivers,
            rate,
            seconds,
        } => fanout(target, receivers, rate, seconds).await?,
        Command::Groups {
            target,
            groups,
            size,
            rate,
            seconds,
        } => groups_run(target, groups, size, rate, seconds).await?,
        Command::Idle {
            target,
            connections,
            concurrency,
            hold_seconds,
        } => idle(target, connections, concurrency, hold_seconds).await?,
        Command::Floor { shape } => floor(shape).await?,
        Command::AcceptServer {
            listen,
            read_buffer,
            max_seconds,
        } => {
            accept_server(listen, read_buffer, max_seconds).await?;
            return Ok(());
        }
        Command::Receive {
            target,
            receivers,
            first,
            messages,
            max_seconds,
            drain_seconds,
        } => {
            let bounds = (max_seconds, drain_seconds);
            receive_share(target, receivers, first, messages, bounds).await?
        }
        Command::Publish {
            target,
            messages,
            rate,
        } => publish(target, messages, rate).await?,
        Command::FloorWriter { addr, shape } => {
            let pace = Pace::new(&shape)?;
            let conns = floor_connect(addr, pace.sockets).await?;
            let cpu = floor_writer(conns, &pace)?;
            println!("{}", json!(cpu));
            return Ok(());
        }
    };
    println!("{result}");
    Ok(())
}

// ---- Process measurements ------------------------------------------------

fn clock_ticks() -> f64 {
    // Linux on x86-64 and arm64 reports CPU time in 1/100 s.
    100.0
}

/// CPU seconds (user + system) of a process so far.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("pid {pid}"))?;
    let rest = &stat[stat.rfind(')').context("stat")? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields[11].parse()?;
    let stime: f64 = fields[12].parse()?;
    Ok((utime + stime) / clock_ticks())
}

fn total_cpu(pids: &[u32]) -> Result<f64> {
    pids.iter().map(|&p| cpu_seconds(p)).sum()
}

/// Resident memory of a process, in bytes.
fn rss_bytes(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("VmRSS")?;
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .context("VmRSS value")?
        .parse()?;
    Ok(kb * 1024)
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

// ---- Connections ---------------------------------------------------------

fn client_config() -> WebSocketConfig {
    // Small client buffers: thousands of clients share this process.
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
}

/// A TCP socket of `addr`'s family.
fn tcp_socket(addr: SocketAddr) -> std::io::Result<TcpSocket> {
    if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
}

async fn connect(target: &Target, i: usize, group: &str, user: &str) -> Result<Ws> {
    let node = target.nodes[i % target.nodes.len()];
    let source = target.sources[i % target.sources.len()];
    let socket = tcp_socket(node)?;
    // Binding to (source, port 0) makes the kernel search its bind table for
    // a port, which grows with every socket (quadratic over a run): only do
    // it for a non-default source address, and then let connect() pick the
    // port (IP_BIND_ADDRESS_NO_PORT), which is cheap and lets the same port
    // serve different destinations.
    if source != IpAddr::from([127, 0, 0, 1]) {
        bind_address_no_port(&socket)?;
        socket.bind(SocketAddr::new(source, 0))?;
    }
    let stream = socket.connect(node).await?;
    stream.set_nodelay(true)?;
    let url = match target.proto {
        Proto::Wshub => format!("ws://{node}/ws?groupId={group}&userId={user}"),
        Proto::Socketio => format!(
            "ws://{node}/socket.io/?EIO=4&transport=websocket&groupId={group}&userId={user}"
        ),
    };
    let (mut ws, _) = tokio_tungstenite::client_async_with_config(
        url,
        MaybeTlsStream::Plain(stream),
        Some(client_config()),
    )
    .await?;
    if target.proto == Proto::Socketio {
        // Engine.IO open packet, then join the default namespace.
        let open = next_text(&mut ws).await?;
        if !open.starts_with('0') {
            bail!("expected an Engine.IO open packet, got {open:?}");
        }
        ws.send(Message::text("40")).await?;
        let joined = next_text(&mut ws).await?;
        if !joined.starts_with("40") {
            bail!("expected a namespace connect, got {joined:?}");
        }
    }
    Ok(ws)
}

/// Sets IP_BIND_ADDRESS_NO_PORT: a later `bind(ip, 0)` takes the address
/// only, and `connect` chooses the port by the whole 4-tuple.
fn bind_address_no_port(socket: &TcpSocket) -> Result<()> {
    use std::os::fd::AsRawFd;
    let one: libc::c_int = 1;
    // SAFETY: a valid socket descriptor, and a pointer to a c_int of the
    // length given, alive for the call.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("IP_BIND_ADDRESS_NO_PORT");
    }
    Ok(())
}

async fn next_text(ws: &mut Ws) -> Result<String> {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await? {
            Some(Ok(Message::Text(t))) => return Ok(t.to_string()),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e.into()),
            None => bail!("closed"),
        }
    }
}

/// A bench message: `message` is `"<seq>:<send time ns>"`.
fn encode(proto: Proto, seq: u64, recipients: &[(&str, &str)]) -> String {
    let recipients: Vec<_> = recipients
        .iter()
        .map(|(t, v)| json!({"type": t, "value": v}))
        .collect();
    let msg = json!({"action": "bench", "message": format!("{seq}:{}", now_ns()), "recipients": recipients});
    match proto {
        Proto::Wshub => msg.to_string(),
        Proto::Socketio => format!("42{}", json!(["message", msg])),
    }
}

/// `(seq, send time ns)` from a delivered frame, if it is a bench message.
fn decode(text: &str) -> Option<(u64, u64)> {
    let start = text.find("\"message\":\"")? + 11;
    let rest = &text[start..];
    let end = rest.find('"')?;
    let (seq, t) = rest[..end].split_once(':')?;
    Some((seq.parse().ok()?, t.parse().ok()?))
}

// ---- Delivery accounting -------------------------------------------------

struct Tally {
    /// Deliveries per message sequence number.
    per_seq: Vec<AtomicU32>,
    delivered: AtomicU64,
    latency: ShardedLatency,
}

/// Latencies in µs in HdrHistograms, sharded to keep receivers off one
/// lock.
struct ShardedLatency(Vec<Mutex<Histogram<u64>>>);

impl ShardedLatency {
    fn new() -> Self {
        Self(
            (0..32)
                .map(|_| Mutex::new(Histogram::new_with_bounds(1, 60_000_000, 3).unwrap()))
                .collect(),
        )
    }

    fn record(&self, shard: usize, us: u64) {
        let _ = self.0[shard % self.0.len()]
            .lock()
            .unwrap()
            .record(us.max(1));
    }

    /// (values recorded, p50/p90/p99/max in ms); a percentile is at most
    /// the largest value (a histogram bin's upper end can pass it).
    fn percentiles(&self) -> (u64, serde_json::Value) {
        let mut all = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
        for h in &self.0 {
            all.add(&*h.lock().unwrap()).unwrap();
        }
        let max_ms = all.max() as f64 / 1000.0;
        let ms = |q: f64| (all.value_at_quantile(q) as f64 / 1000.0).min(max_ms);
        (
            all.len(),
            json!({"p50_ms": ms(0.5), "p90_ms": ms(0.9), "p99_ms": ms(0.99), "max_ms": max_ms}),
        )
    }
}

impl Tally {
    fn new(max_seq: usize) -> Arc<Self> {
        Arc::new(Self {
            per_seq: (0..max_seq).map(|_| AtomicU32::new(0)).collect(),
            delivered: AtomicU64::new(0),
            latency: ShardedLatency::new(),
        })
    }

    fn record(&self, shard: usize, text: &str) {
        let Some((seq, sent)) = decode(text) else {
            return;
        };
        if let Some(c) = self.per_seq.get(seq as usize) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        self.delivered.fetch_add(1, Ordering::Relaxed);
        self.latency
            .record(shard, now_ns().saturating_sub(sent) / 1000);
    }

    /// (missing, duplicated) against `expected` copies of each of `sent` messages.
    fn loss(&self, sent: usize, expected: u32) -> (u64, u64) {
        let (mut missing, mut dup) = (0u64, 0u64);
        for c in &self.per_seq[..sent] {
            let n = c.load(Ordering::Relaxed);
            missing += u64::from(expected.saturating_sub(n));
            dup += u64::from(n.saturating_sub(expected));
        }
        (missing, dup)
    }

    fn percentiles(&self) -> serde_json::Value {
        self.latency.percentiles().1
    }
}

/// Reads a client's frames into the tally; answers Engine.IO pings.
async fn receive(
    mut stream: SplitStream<Ws>,
    sink: Arc<tokio::sync::Mutex<SplitSink<Ws, Message>>>,
    tally: Arc<Tally>,
    shard: usize,
    count: bool,
) {
    while let Some(Ok(msg)) = stream.next().await {
        if let Message::Text(t) = msg {
            if t.as_str() == "2" {
                let _ = sink.lock().await.send(Message::text("3")).await;
            } else if count {
                tally.record(shard, &t);
            }
        }
    }
}

type Sink = Arc<tokio::sync::Mutex<SplitSink<Ws, Message>>>;

fn start(ws: Ws, tally: &Arc<Tally>, shard: usize, count: bool) -> Sink {
    let (sink, stream) = ws.split();
    let sink = Arc::new(tokio::sync::Mutex::new(sink));
    tokio::spawn(receive(stream, sink.clone(), tally.clone(), shard, count));
    sink
}

/// Connects `who` (group, user), 200 at a time; client `j` of `who` has the
/// global index `first + j` (its node and source address, round-robin).
async fn connect_all(target: &Target, who: &[(String, String)], first: usize) -> Result<Vec<Ws>> {
    let mut out = Vec::with_capacity(who.len());
    for chunk in who.chunks(200).enumerate() {
        let (base, chunk) = (first + chunk.0 * 200, chunk.1);
        let conns = futures_util::future::join_all(
            chunk
                .iter()
                .enumerate()
                .map(|(j, (g, u))| connect(target, base + j, g, u)),
        )
        .await;
        for c in conns {
            out.push(c?);
        }
    }
    Ok(out)
}

/// Waits, after the last send, until every expected delivery has arrived,
/// or deliveries stopped growing for `stall`, or `bound` has passed.
async fn drain(delivered: &AtomicU64, expected_total: u64, bound: Duration, stall: Duration) {
    let deadline = Instant::now() + bound;
    let (mut last, mut since) = (u64::MAX, Instant::now());
    while Instant::now() < deadline {
        let now = delivered.load(Ordering::Relaxed);
        if now >= expected_total {
            return;
        }
        if now != last {
            (last, since) = (now, Instant::now());
        } else if since.elapsed() >= stall {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What one fanout or groups run measured.
struct Measured {
    sent: usize,
    /// Copies of each message that should arrive.
    expected_per: u32,
    elapsed: f64,
    /// Server CPU seconds during the run.
    cpu: f64,
}

fn summary(
    kind: &str,
    target: &Target,
    tally: &Tally,
    m: Measured,
    extra: serde_json::Value,
) -> serde_json::Value {
    let Measured {
        sent,
        expected_per,
        elapsed,
        cpu,
    } = m;
    let delivered = tally.delivered.load(Ordering::Relaxed);
    let (missing, duplicated) = tally.loss(sent, expected_per);
    let mut out = json!({
        "scenario": kind,
        "proto": format!("{:?}", target.proto).to_lowercase(),
        "nodes": target.nodes.len(),
        "sent": sent,
        "delivered": delivered,
        "missing": missing,
        "duplicated": duplicated,
        "missing_ratio": missing as f64 / (sent as f64 * f64::from(expected_per)).max(1.0),
        "deliveries_per_s": delivered as f64 / elapsed,
        "server_cpu_s": cpu,
        "server_cpu_cores": cpu / elapsed,
        "server_cpu_us_per_delivery": if delivered > 0 { cpu * 1e6 / delivered as f64 } else { 0.0 },
        "latency": tally.percentiles(),
    });
    if let (Some(o), Some(e)) = (out.as_object_mut(), extra.as_object()) {
        o.extend(e.clone());
    }
    out
}

// ---- Scenarios -----------------------------------------------------------

async fn fanout(
    target: Target,
    receivers: usize,
    rate: f64,
    seconds: u64,
) -> Result<serde_json::Value> {
    let total = (rate * seconds as f64).ceil() as usize;
    let tally = Tally::new(total + 1);
    let who: Vec<_> = (0..receivers)
        .map(|i| (format!("g{}", i % 100), format!("r{i}")))
        .collect();
    let clients = connect_all(&target, &who, 0).await?;
    let _sinks: Vec<Sink> = clients
        .into_iter()
        .enumerate()
        .map(|(i, ws)| start(ws, &tally, i, true))
        .collect();
    let publisher = connect(&target, receivers, "pub", "publisher").await?;
    let publisher = start(publisher, &tally, 0, false);
    tokio::time::sleep(Duration::from_millis(500)).await;

    let cpu0 = total_cpu(&target.server_pids)?;
    let own0 = own_cpu()?;
    let t0 = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    for seq in 0..total {
        tick.tick().await;
        publisher
            .lock()
            .await
            .send(Message::text(encode(target.proto, seq as u64, &[])))
            .await?;
    }
    drain(
        &tally.delivered,
        (total * receivers) as u64,
        Duration::from_secs(10),
        Duration::from_millis(500),
    )
    .await;
    let elapsed = t0.elapsed().as_secs_f64();
    let cpu = total_cpu(&target.server_pids)? - cpu0;
    let own = (own_cpu()? - own0) / elapsed;
    Ok(summary(
        "fanout",
        &target,
        &tally,
        Measured {
            sent: total,
            expected_per: receivers as u32,
            elapsed,
            cpu,
        },
        json!({"receivers": receivers, "rate": rate, "seconds": seconds, "loadgen_cpu_cores": own}),
    ))
}

async fn groups_run(
    target: Target,
    groups: usize,
    size: usize,
    rate: f64,
    seconds: u64,
) -> Result<serde_json::Value> {
    let members = groups * size;
    let total = (members as f64 * rate * seconds as f64).ceil() as usize;
    let tally = Tally::new(total + members);
    // Member j of group g; consecutive clients go to different nodes.
    let who: Vec<_> = (0..members)
        .map(|i| (format!("grp{}", i % groups), format!("m{i}")))
        .collect();
    let clients = connect_all(&target, &who, 0).await?;
    let sinks: Vec<Sink> = clients
        .into_iter()
        .enumerate()
        .map(|(i, ws)| start(ws, &tally, i, true))
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;

    let cpu0 = total_cpu(&target.server_pids)?;
    let own0 = own_cpu()?;
    let t0 = Instant::now();
    // Sends are spread evenly: one every 1 / (members × rate) seconds, in
    // member order, each member to its own group.
    let every = Duration::from_secs_f64(1.0 / (members as f64 * rate));
    let mut tick = tokio::time::interval(every.max(Duration::from_micros(50)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let per_tick =
        ((Duration::from_micros(50).as_secs_f64() / every.as_secs_f64()).ceil() as usize).max(1);
    let mut seq = 0usize;
    while seq < total {
        tick.tick().await;
        for _ in 0..per_tick.min(total - seq) {
            let m = seq % members;
            let group = &who[m].0;
            let frame = encode(target.proto, seq as u64, &[("group", group)]);
            sinks[m].lock().await.send(Message::text(frame)).await?;
            seq += 1;
        }
    }
    drain(
        &tally.delivered,
        (total * size) as u64,
        Duration::from_secs(10),
        Duration::from_millis(500),
    )
    .await;
    let elapsed = t0.elapsed().as_secs_f64();
    let cpu = total_cpu(&target.server_pids)? - cpu0;
    let own = (own_cpu()? - own0) / elapsed;
    Ok(summary(
        "groups",
        &target,
        &tally,
        Measured {
            sent: total,
            expected_per: size as u32,
            elapsed,
            cpu,
        },
        json!({"groups": groups, "size": size, "rate_per_member": rate, "messages_per_s": members as f64 * rate,
               "seconds": seconds, "loadgen_cpu_cores": own}),
    ))
}

// ---- A fanout split over processes ---------------------------------------

/// Buckets per doubling of the latency histogram that `receive` reports:
/// bucket `k` holds latencies in [2^(k/8), 2^((k+1)/8)) µs (9 % wide), the
/// same in every process, so counts add up and percentiles of the sum are
/// those of the whole run to within one bucket.
const BUCKETS_PER_DOUBLING: f64 = 8.0;
/// 2^(256/8) µs is over an hour: every latency fits.
const BUCKETS: usize = 256;

fn bucket(us: u64) -> usize {
    ((us.max(1) as f64).log2() * BUCKETS_PER_DOUBLING).floor() as usize
}

/// The upper edge of bucket `k`, in µs.
fn bucket_upper_us(k: usize) -> f64 {
    2f64.powf((k + 1) as f64 / BUCKETS_PER_DOUBLING)
}

/// One receiver process's share of a split fanout.
struct Share {
    /// Receivers of this process that got each message (at least once).
    per_seq: Vec<AtomicU32>,
    /// Copies beyond the first of a message to one receiver.
    duplicated: AtomicU64,
    delivered: AtomicU64,
    latency: LogBuckets,
    /// Receivers whose socket ended (closed by the node, or an error).
    closed: AtomicU64,
}

impl Share {
    fn new(messages: usize) -> Arc<Self> {
        Arc::new(Self {
            per_seq: (0..messages).map(|_| AtomicU32::new(0)).collect(),
            duplicated: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            latency: LogBuckets::new(),
            closed: AtomicU64::new(0),
        })
    }

    /// Counts a frame to one receiver, whose messages so far are `seen`.
    fn record(&self, seen: &mut [u64], text: &str) {
        let Some((seq, sent)) = decode(text) else {
            return;
        };
        self.delivered.fetch_add(1, Ordering::Relaxed);
        self.latency.record(now_ns().saturating_sub(sent) / 1000);
        let seq = seq as usize;
        if seq >= self.per_seq.len() {
            return;
        }
        let (word, bit) = (seq / 64, 1u64 << (seq % 64));
        if seen[word] & bit != 0 {
            self.duplicated.fetch_add(1, Ordering::Relaxed);
        } else {
            seen[word] |= bit;
            self.per_seq[seq].fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Latencies in µs in the fixed log buckets ([`bucket`]), and the largest.
struct LogBuckets {
    counts: Vec<AtomicU64>,
    max_us: AtomicU64,
}

impl LogBuckets {
    fn new() -> Self {
        Self {
            counts: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            max_us: AtomicU64::new(0),
        }
    }

    fn record(&self, us: u64) {
        self.counts[bucket(us).min(BUCKETS - 1)].fetch_add(1, Ordering::Relaxed);
        self.max_us.fetch_max(us, Ordering::Relaxed);
    }

    /// The counts, without the trailing empty buckets.
    fn counts(&self) -> Vec<u64> {
        let mut counts: Vec<u64> = self
            .counts
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        while counts.last() == Some(&0) {
            counts.pop();
        }
        counts
    }

    fn max_us(&self) -> u64 {
        self.max_us.load(Ordering::Relaxed)
    }
}

/// p-quantile (upper bucket edge, in ms) of fixed-bucket counts.
fn bucket_quantile_ms(counts: &[u64], q: f64) -> f64 {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return 0.0;
    }
    let want = (q * total as f64).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (k, c) in counts.iter().enumerate() {
        seen += c;
        if seen >= want {
            return bucket_upper_us(k) / 1000.0;
        }
    }
    bucket_upper_us(counts.len()) / 1000.0
}

/// Reads one receiver's frames into its process's share.
async fn receive_counted(mut ws: Ws, share: Arc<Share>) {
    let mut seen = vec![0u64; share.per_seq.len().div_ceil(64)];
    while let Some(Ok(msg)) = ws.next().await {
        if let Message::Text(t) = msg {
            share.record(&mut seen, &t);
        }
    }
    share.closed.fetch_add(1, Ordering::Relaxed);
}

async fn receive_share(
    target: Target,
    receivers: usize,
    first: usize,
    messages: usize,
    (max_seconds, drain_seconds): (u64, u64),
) -> Result<serde_json::Value> {
    use std::io::Write;
    use tokio::io::AsyncBufReadExt;
    let share = Share::new(messages);
    let who: Vec<_> = (first..first + receivers)
        .map(|i| (format!("g{}", i % 100), format!("r{i}")))
        .collect();
    let t0 = Instant::now();
    let clients = connect_all(&target, &who, first).await?;
    let connect_s = t0.elapsed().as_secs_f64();
    let open = clients.len();
    for ws in clients {
        tokio::spawn(receive_counted(ws, share.clone()));
    }
    {
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "{}",
            json!({"ready": true, "open": open, "connect_s": connect_s})
        )?;
        out.flush()?;
    }
    let own0 = own_cpu()?;
    let t1 = Instant::now();
    // Until `stop` (or end of input) on stdin, or the bound.
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let told = tokio::time::timeout(Duration::from_secs(max_seconds), async {
        while let Ok(Some(line)) = lines.next_line().await {
            if line.trim() == "stop" {
                return true;
            }
        }
        false
    })
    .await
    .unwrap_or(false);
    drain(
        &share.delivered,
        (messages * receivers) as u64,
        Duration::from_secs(drain_seconds),
        // A generous stall: on a busy machine this process may not run for
        // a while, and nothing counted then is not the same as nothing sent.
        Duration::from_secs(3),
    )
    .await;
    let elapsed = t1.elapsed().as_secs_f64();
    let counts = share.latency.counts();
    let per_seq: Vec<u32> = share
        .per_seq
        .iter()
        .map(|c| c.load(Ordering::Relaxed))
        .collect();
    let missing: u64 = per_seq
        .iter()
        .map(|&n| (receivers as u64).saturating_sub(u64::from(n)))
        .sum();
    Ok(json!({
        "scenario": "receive",
        "stopped_by": if told { "stop" } else { "bound" },
        "nodes": target.nodes.len(),
        "receivers": receivers,
        "first": first,
        "open": open,
        "connect_s": connect_s,
        "messages": messages,
        "delivered": share.delivered.load(Ordering::Relaxed),
        "missing": missing,
        "duplicated": share.duplicated.load(Ordering::Relaxed),
        "closed_before_stop": share.closed.load(Ordering::Relaxed),
        "per_seq": per_seq,
        "latency_buckets": {"per_doubling": BUCKETS_PER_DOUBLING, "unit": "us", "counts": counts},
        "max_us": share.latency.max_us(),
        "latency": {
            "p50_ms": bucket_quantile_ms(&counts, 0.5),
            "p99_ms": bucket_quantile_ms(&counts, 0.99),
        },
        "elapsed_s": elapsed,
        "loadgen_cpu_s": own_cpu()? - own0,
    }))
}

async fn publish(target: Target, messages: usize, rate: f64) -> Result<serde_json::Value> {
    let (mut sink, mut stream) = connect(&target, 0, "pub", "publisher").await?.split();
    // Its own copies (if any) are read and dropped, until the node closes.
    let reader = tokio::spawn(async move { while let Some(Ok(_)) = stream.next().await {} });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let own0 = own_cpu()?;
    let t0 = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    for seq in 0..messages {
        tick.tick().await;
        sink.send(Message::text(encode(target.proto, seq as u64, &[])))
            .await?;
    }
    let elapsed = t0.elapsed().as_secs_f64();
    // A close handshake before exiting: a socket closed with unread data in
    // it is reset, and a reset makes the node drop whatever of the last
    // messages it has not read yet (a busy node may be seconds behind).
    sink.send(Message::Close(None)).await?;
    let closed = tokio::time::timeout(Duration::from_secs(120), reader)
        .await
        .is_ok();
    Ok(json!({
        "scenario": "publish",
        "sent": messages,
        "rate": rate,
        "elapsed_s": elapsed,
        "closed_cleanly": closed,
        "loadgen_cpu_s": own_cpu()? - own0,
    }))
}

async fn idle(
    target: Target,
    connections: usize,
    concurrency: usize,
    hold_seconds: u64,
) -> Result<serde_json::Value> {
    let rss0: u64 = target
        .server_pids
        .iter()
        .map(|&p| rss_bytes(p))
        .sum::<Result<u64>>()?;
    let tally = Tally::new(1);
    let sem = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let cpu0 = total_cpu(&target.server_pids)?;
    let own0 = own_cpu()?;
    let t0 = Instant::now();
    let mut tasks = Vec::with_capacity(connections);
    for i in 0..connections {
        let permit = sem.clone().acquire_owned().await?;
        let target = target.clone();
        tasks.push(tokio::spawn(async move {
            let r = connect(&target, i, &format!("g{}", i % 1000), &format!("idle{i}")).await;
            drop(permit);
            r
        }));
    }
    let mut held = Vec::with_capacity(connections);
    let mut failures = 0;
    let mut first_error = None;
    for t in tasks {
        match t.await? {
            Ok(ws) => held.push(start(ws, &tally, 0, false)),
            Err(e) => {
                failures += 1;
                first_error.get_or_insert(e.to_string());
            }
        }
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let server_cpu = total_cpu(&target.server_pids)? - cpu0;
    let loadgen_cpu = own_cpu()? - own0;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss1: u64 = target
        .server_pids
        .iter()
        .map(|&p| rss_bytes(p))
        .sum::<Result<u64>>()?;
    let open = held.len();
    let mut report = json!({
        "scenario": "idle",
        "proto": format!("{:?}", target.proto).to_lowercase(),
        "nodes": target.nodes.len(),
        "connections": connections,
        "open": open,
        "failures": failures,
        "first_error": first_error,
        "connects_per_s": open as f64 / elapsed,
        "connect_s": elapsed,
        "server_cpu_s": server_cpu,
        "loadgen_cpu_s": loadgen_cpu,
        "server_rss_bytes_before": rss0,
        "server_rss_bytes_after": rss1,
        "rss_bytes_per_connection": (rss1.saturating_sub(rss0)) as f64 / open.max(1) as f64,
    });
    if hold_seconds > 0 {
        tokio::time::sleep(Duration::from_secs(hold_seconds)).await;
        let rss2: u64 = target
            .server_pids
            .iter()
            .map(|&p| rss_bytes(p))
            .sum::<Result<u64>>()?;
        report["hold_seconds"] = json!(hold_seconds);
        report["server_rss_bytes_held"] = json!(rss2);
        report["rss_bytes_per_connection_held"] =
            json!((rss2.saturating_sub(rss0)) as f64 / open.max(1) as f64);
    }
    Ok(report)
}

/// How a floor writes: how many sockets, how often, how many frames per
/// write, on how many threads, and how many sockets per round. The writer
/// process and the parent that counts its frames compute the same rounds
/// from it.
#[derive(Debug)]
struct Pace {
    sockets: usize,
    rate: f64,
    batch: usize,
    seconds: u64,
    threads: usize,
    /// Sockets written per round (every socket unless `--per-round`).
    per_round: usize,
}

impl Pace {
    /// Checks the arguments: a rate above zero (rounds are `batch / rate`
    /// apart), at least one frame per write, and a per-round count between
    /// 1 and the sockets, with one writer thread.
    fn new(shape: &FloorArgs) -> Result<Self> {
        let FloorArgs {
            sockets,
            rate,
            batch,
            seconds,
            threads,
            per_round,
        } = *shape;
        if !(rate.is_finite() && rate > 0.0) {
            bail!("--rate must be a number of frames per second above 0, not {rate}");
        }
        if batch == 0 {
            bail!("--batch must be at least 1 frame per write");
        }
        if sockets == 0 {
            bail!("--sockets must be at least 1");
        }
        let threads = threads.clamp(1, sockets);
        let per_round = match per_round {
            // Every socket each round: the default, on any number of
            // threads.
            None => sockets,
            Some(k) if k == sockets => k,
            Some(k) if (1..=sockets).contains(&k) && threads == 1 => k,
            Some(_) if threads > 1 => bail!("--per-round takes one writer thread (--threads 1)"),
            Some(k) => bail!("--per-round must be from 1 to --sockets ({sockets}), not {k}"),
        };
        Ok(Self {
            sockets,
            rate,
            batch,
            seconds,
            threads,
            per_round,
        })
    }

    /// Rounds a second: each socket gets `rate` frames a second, `batch`
    /// to a write, `per_round` sockets a round.
    fn rounds_per_second(&self) -> f64 {
        self.rate / self.batch as f64 * self.sockets as f64 / self.per_round as f64
    }

    fn rounds(&self) -> u64 {
        (self.rounds_per_second() * self.seconds as f64).floor() as u64
    }

    /// Frames written in all: every round writes `batch` frames to each of
    /// `per_round` sockets (all of them, over all threads, by default).
    fn frames(&self) -> f64 {
        self.rounds() as f64 * self.batch as f64 * self.per_round as f64
    }
}

/// The floor: a child process writes pre-encoded frames to `sockets`
/// loopback sockets on `threads` threads; this process reads them. Returns
/// the child's CPU per frame and the latency of the frames (from the start
/// of the round that wrote them to their arrival here).
async fn floor(shape: FloorArgs) -> Result<serde_json::Value> {
    let pace = Pace::new(&shape)?;
    let Pace {
        sockets,
        rate,
        batch,
        threads,
        per_round,
        ..
    } = pace;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let exe = std::env::current_exe()?;
    let mut child = tokio::process::Command::new(exe)
        .args(["floor-writer", "--addr", &addr.to_string()])
        .args(shape.to_args())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let received = Arc::new(AtomicU64::new(0));
    let latency = Arc::new(FloorLatency {
        hdr: ShardedLatency::new(),
        buckets: LogBuckets::new(),
    });
    let mut readers = Vec::new();
    for shard in 0..sockets {
        // A writer that dies before it connected every socket ends the
        // floor with its status, not an accept that waits forever.
        let s = tokio::select! {
            accepted = listener.accept() => accepted?.0,
            status = child.wait() => bail!("the floor writer exited while connecting: {}", status?),
        };
        readers.push(tokio::spawn(floor_reader(
            s,
            shard,
            received.clone(),
            latency.clone(),
        )));
    }
    let t0 = Instant::now();
    let output = child.wait_with_output().await?;
    // The writer has exited and been waited for: its CPU time is ours as
    // a parent's (it is our only child). What it spent writing it reports
    // itself (its connects are no part of a delivery's cost).
    let cpu = children_cpu()?;
    if !output.status.success() {
        bail!("floor writer failed");
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let writer: WriterCpu = serde_json::from_slice(
        output
            .stdout
            .split(|&b| b == b'\n')
            .rfind(|l| !l.is_empty())
            .context("the floor writer reported nothing")?,
    )
    .context("the floor writer's report")?;
    // The writer's sockets are closed: every reader sees the end soon.
    for r in readers {
        tokio::time::timeout(Duration::from_secs(30), r)
            .await
            .context("a floor reader did not see the end of its socket")??;
    }
    let frames = pace.frames();
    let (timed, hdr, edges) = latency.report();
    Ok(json!({
        "scenario": "floor",
        "sockets": sockets,
        "rate": rate,
        "frames_per_write": batch,
        "threads": threads,
        "sockets_per_round": per_round,
        "frames": frames,
        "frames_timed": timed,
        "bytes_received": received.load(Ordering::Relaxed),
        "writer_cpu_s": writer.writing_s,
        "writer_connect_cpu_s": writer.connecting_s,
        "writer_process_cpu_s": cpu,
        "writer_cpu_us_per_frame": writer.writing_s * 1e6 / frames,
        "elapsed_s": elapsed,
        "latency": hdr,
        "latency_buckets": edges,
    }))
}

/// A small text frame, as a hub would send it (server frames are unmasked),
/// whose `message` ends in a 19-digit send time in ns since the epoch, at
/// [`FLOOR_STAMP_AT`].
const FLOOR_PAYLOAD: &[u8] = br#"{"userId":null,"groupId":null,"action":"bench","message":"123456:1764331200000000000","recipients":[]}"#;
/// Where the send time starts in a floor frame (2 header bytes + offset).
const FLOOR_STAMP_AT: usize = 2 + 65;
const FLOOR_STAMP_LEN: usize = 19;
const FLOOR_FRAME_LEN: usize = 2 + FLOOR_PAYLOAD.len();

/// The latencies of every floor frame, two ways, one set for all sockets
/// (a histogram per socket took 136 KiB each, 2.4 GB and long stalls of
/// page faults at 18,000): as `run.py`'s hubs are read ([`Tally`]'s
/// HdrHistograms), and as `scale.py`'s receivers are (`receive`'s fixed
/// log buckets, whose percentiles are upper bucket edges, up to 9 % above
/// the other).
struct FloorLatency {
    hdr: ShardedLatency,
    buckets: LogBuckets,
}

impl FloorLatency {
    fn record(&self, shard: usize, us: u64) {
        self.hdr.record(shard, us);
        self.buckets.record(us);
    }

    /// (frames timed, HdrHistogram percentiles, bucket percentiles), each
    /// at most the largest latency seen.
    fn report(&self) -> (u64, serde_json::Value, serde_json::Value) {
        let (timed, hdr) = self.hdr.percentiles();
        let counts = self.buckets.counts();
        let max_ms = self.buckets.max_us() as f64 / 1000.0;
        let edge = |q: f64| bucket_quantile_ms(&counts, q).min(max_ms);
        let edges = json!({"p50_ms": edge(0.5), "p90_ms": edge(0.9), "p99_ms": edge(0.99), "max_ms": max_ms});
        (timed, hdr, edges)
    }
}

/// Reads one floor socket to its end: counts bytes, and records each
/// frame's latency from the send time written in it.
async fn floor_reader(
    mut s: TcpStream,
    shard: usize,
    received: Arc<AtomicU64>,
    latency: Arc<FloorLatency>,
) {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 4096];
    let mut carry: Vec<u8> = Vec::with_capacity(FLOOR_FRAME_LEN);
    while let Ok(n) = s.read(&mut buf).await {
        if n == 0 {
            break;
        }
        received.fetch_add(n as u64, Ordering::Relaxed);
        let now = now_ns();
        carry.extend_from_slice(&buf[..n]);
        let whole = carry.len() - carry.len() % FLOOR_FRAME_LEN;
        for frame in carry[..whole].chunks_exact(FLOOR_FRAME_LEN) {
            let stamp = &frame[FLOOR_STAMP_AT..FLOOR_STAMP_AT + FLOOR_STAMP_LEN];
            if let Some(sent) = std::str::from_utf8(stamp)
                .ok()
                .and_then(|t| t.parse::<u64>().ok())
            {
                latency.record(shard, now.saturating_sub(sent) / 1000);
            }
        }
        carry.drain(..whole);
    }
}

/// CPU seconds this process has used so far (the load generator's own cost).
fn own_cpu() -> Result<f64> {
    cpu_seconds(std::process::id())
}

/// CPU seconds of this process's waited-for children (from /proc/self/stat:
/// cutime + cstime).
fn children_cpu() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    let rest = &stat[stat.rfind(')').context("stat")? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let cutime: f64 = fields[13].parse()?;
    let cstime: f64 = fields[14].parse()?;
    Ok((cutime + cstime) / clock_ticks())
}

/// The floor writer's CPU seconds: opening its sockets, and writing.
#[derive(serde::Serialize, serde::Deserialize)]
struct WriterCpu {
    connecting_s: f64,
    writing_s: f64,
}

/// Opens the floor writer's `sockets` blocking sockets to `addr`. On
/// loopback they come from four source addresses (127.0.0.2 to .5), the
/// port picked at connect (`IP_BIND_ADDRESS_NO_PORT`): from one address,
/// connect's search for a free port grows with every socket, and opening
/// 18,000 took 3 s of CPU here (0.5 s from four).
async fn floor_connect(addr: SocketAddr, sockets: usize) -> Result<Vec<std::net::TcpStream>> {
    let mut conns = Vec::with_capacity(sockets);
    for i in 0..sockets {
        let socket = tcp_socket(addr)?;
        if addr.ip() == IpAddr::from([127, 0, 0, 1]) {
            bind_address_no_port(&socket)?;
            socket.bind(SocketAddr::from(([127, 0, 0, 2 + (i % 4) as u8], 0)))?;
        }
        let stream = socket.connect(addr).await?;
        stream.set_nodelay(true)?;
        let stream = stream.into_std()?;
        stream.set_nonblocking(false)?;
        conns.push(stream);
    }
    Ok(conns)
}

fn floor_writer(conns: Vec<std::net::TcpStream>, pace: &Pace) -> Result<WriterCpu> {
    use std::io::Write;
    assert_eq!(
        &FLOOR_PAYLOAD[FLOOR_STAMP_AT - 2..FLOOR_STAMP_AT - 2 + FLOOR_STAMP_LEN],
        b"1764331200000000000"
    );
    let (sockets, batch, threads, per_round) =
        (conns.len(), pace.batch, pace.threads, pace.per_round);
    if sockets != pace.sockets {
        bail!(
            "the floor writer opened {sockets} sockets of {}",
            pace.sockets
        );
    }
    let mut frame = vec![0x81, FLOOR_PAYLOAD.len() as u8];
    frame.extend_from_slice(FLOOR_PAYLOAD);
    let connected = own_cpu()?;
    let rounds = pace.rounds();
    let every = Duration::from_secs_f64(1.0 / pace.rounds_per_second());
    let start = Instant::now();
    let share = sockets.div_ceil(threads);
    let mut conns = conns.into_iter();
    let written = std::thread::scope(|scope| {
        let mut handles = Vec::new();
        for _ in 0..threads {
            let mut mine: Vec<std::net::TcpStream> = conns.by_ref().take(share).collect();
            let frame = frame.clone();
            // Each thread hands its sockets back, so that closing them is
            // not counted as writing.
            handles.push(scope.spawn(move || -> Result<Vec<std::net::TcpStream>> {
                let mut out = Vec::with_capacity(frame.len() * batch);
                for _ in 0..batch {
                    out.extend_from_slice(&frame);
                }
                // Where the next round starts, when a round writes only
                // some of the sockets (in turn).
                let mut next = 0;
                for round in 0..rounds {
                    let due = start + every.mul_f64(round as f64);
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    // Every frame of the round carries the round's start.
                    let stamp = format!("{:019}", now_ns());
                    for k in 0..batch {
                        let at = k * frame.len() + FLOOR_STAMP_AT;
                        out[at..at + FLOOR_STAMP_LEN].copy_from_slice(stamp.as_bytes());
                    }
                    if per_round >= mine.len() {
                        for c in mine.iter_mut() {
                            c.write_all(&out)?;
                        }
                    } else {
                        for _ in 0..per_round {
                            mine[next].write_all(&out)?;
                            next = (next + 1) % mine.len();
                        }
                    }
                }
                Ok(mine)
            }));
        }
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| anyhow::anyhow!("a floor writer thread panicked"))?
            })
            .collect::<Result<Vec<_>>>()
    })?;
    let cpu = WriterCpu {
        connecting_s: connected,
        writing_s: own_cpu()? - connected,
    };
    drop(written);
    Ok(cpu)
}

/// The connect floor's server: accepts WebSocket upgrades with
/// tokio-tungstenite (no routing, no bus; wshub's backlog and read buffer)
/// and holds each socket, reading
/// and discarding, until the client closes it or `max_seconds` pass.
async fn accept_server(listen: SocketAddr, read_buffer: usize, max_seconds: u64) -> Result<()> {
    // wshub's default `listen_backlog` (tokio's `bind` listens with 128).
    let socket = tcp_socket(listen)?;
    socket.set_reuseaddr(true)?;
    socket.bind(listen)?;
    let listener = socket.listen(4096)?;
    let config = WebSocketConfig::default()
        .read_buffer_size(read_buffer)
        .write_buffer_size(16 * 1024);
    let serve = async {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                // Out of descriptors or a reset before accept: go on.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            tokio::spawn(async move {
                let _ = stream.set_nodelay(true);
                if let Ok(mut ws) =
                    tokio_tungstenite::accept_async_with_config(stream, Some(config)).await
                {
                    while let Some(Ok(_)) = ws.next().await {}
                }
            });
        }
    };
    tokio::select! {
        () = serve => {}
        () = tokio::time::sleep(Duration::from_secs(max_seconds)) => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{FloorArgs, Pace};

    /// `Pace::new` of these arguments.
    fn pace(
        sockets: usize,
        rate: f64,
        batch: usize,
        seconds: u64,
        threads: usize,
        per_round: Option<usize>,
    ) -> anyhow::Result<Pace> {
        Pace::new(&FloorArgs {
            sockets,
            rate,
            batch,
            seconds,
            threads,
            per_round,
        })
    }

    #[test]
    fn the_writer_is_passed_the_floors_arguments_as_given() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            shape: FloorArgs,
        }
        for given in [
            FloorArgs {
                sockets: 2000,
                rate: 65.0,
                batch: 4,
                seconds: 6,
                threads: 2,
                per_round: None,
            },
            FloorArgs {
                sockets: 2500,
                rate: 0.5,
                batch: 1,
                seconds: 6,
                threads: 1,
                per_round: Some(5),
            },
        ] {
            let args = std::iter::once("w".to_owned()).chain(given.to_args());
            let read = Cli::parse_from(args).shape;
            assert_eq!(format!("{read:?}"), format!("{given:?}"));
        }
    }

    #[test]
    fn a_floor_writes_every_socket_each_round_unless_told_otherwise() {
        // 2,000 sockets at 65 frames a second each: 65 rounds a second of
        // 2,000 frames, 5 s.
        let dense = pace(2000, 65.0, 1, 5, 1, None).unwrap();
        assert_eq!(dense.per_round, 2000);
        assert_eq!(dense.rounds(), 325);
        assert_eq!(dense.frames(), 650_000.0);
        // Four frames a write: a quarter of the rounds, the same frames.
        let batched = pace(2000, 65.0, 4, 5, 2, None).unwrap();
        assert_eq!(batched.rounds(), 81);
        assert_eq!(batched.frames(), 81.0 * 4.0 * 2000.0);
        // What the parent passes its writer for the default: every socket
        // a round, on several threads (a review found it refused, which
        // broke every floor with --threads).
        let passed_on = pace(2000, 65.0, 1, 5, 2, Some(2000)).unwrap();
        assert_eq!(passed_on.rounds(), dense.rounds());
    }

    #[test]
    fn a_groups_shaped_floor_keeps_each_sockets_rate() {
        // 2,500 sockets at 5 frames a second each, 5 a round: 2,500
        // rounds a second, and every socket still gets 5 a second.
        let paced = pace(2500, 5.0, 1, 6, 1, Some(5)).unwrap();
        assert_eq!(paced.rounds_per_second(), 2500.0);
        assert_eq!(paced.rounds(), 15_000);
        assert_eq!(paced.frames(), 2500.0 * 5.0 * 6.0);
    }

    #[test]
    fn bad_floor_arguments_are_refused_with_a_reason() {
        let refused = |r: anyhow::Result<Pace>| r.unwrap_err().to_string();
        assert!(refused(pace(10, 0.0, 1, 1, 1, None)).contains("--rate"));
        assert!(refused(pace(10, f64::NAN, 1, 1, 1, None)).contains("--rate"));
        assert!(refused(pace(10, 5.0, 0, 1, 1, None)).contains("--batch"));
        assert!(refused(pace(0, 5.0, 1, 1, 1, None)).contains("--sockets"));
        assert!(refused(pace(10, 5.0, 1, 1, 1, Some(0))).contains("--per-round"));
        assert!(refused(pace(10, 5.0, 1, 1, 1, Some(11))).contains("--per-round"));
        assert!(refused(pace(10, 5.0, 1, 1, 2, Some(5))).contains("--threads 1"));
    }
}
