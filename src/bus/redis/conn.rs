//! How a node reaches Redis: a single server (PUBLISH/SUBSCRIBE) or a Redis
//! Cluster with sharded pub/sub (SPUBLISH/SSUBSCRIBE), behind one interface
//! for the publisher and one for the subscriber.
//!
//! Both subscriber kinds are RESP3 connections whose pushes arrive through a
//! [`PushSender`] bounded in bytes: redis-rs hands pushes to an unbounded
//! channel (its `PubSub` type too), so a delivering task that fell behind
//! would let memory grow without limit while Redis's own pub/sub output
//! buffer limit never applied.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Bytes;
use tokio::sync::mpsc;

use redis::IntoConnectionInfo;
use tracing::warn;

use super::MIN_BACKOFF;
use super::queue::Outgoing;
use super::tls;
use crate::bus::BusError;
use crate::config::RedisConfig;

/// Bytes of received pushes waiting for the subscriber task. Beyond it a
/// push is dropped and counted ([`Incoming::Lagged`]): the task is behind,
/// and memory must not grow with it. Pub/sub is at-most-once anyway; the
/// drop is visible in `wshub_messages_dropped_total{reason="bus_lagging"}`.
pub(super) const SUBSCRIBER_BUFFER_BYTES: usize = 32 * 1024 * 1024;
/// What one queued push costs besides its payload (the `PushInfo`, its
/// `Vec<Value>`, the channel name's allocation).
const PUSH_OVERHEAD: usize = 128;
/// How often a redirected `SPUBLISH` is sent again. A MOVED/ASK reply means
/// the shard did not run the command, so sending it again cannot
/// duplicate; every other failure is never retried (see `connect_publisher`).
const REDIRECT_RETRIES: usize = 3;

/// How this node reaches Redis: a single server (PUBLISH/SUBSCRIBE), the
/// primary the sentinels name, or a Redis Cluster with sharded pub/sub
/// (SPUBLISH/SSUBSCRIBE).
#[derive(Clone)]
pub(super) enum Link {
    Single(Box<SingleLink>),
    /// Looked up on every connect (see `tls.rs`).
    Sentinel(tls::Sentinels),
    Sharded(Vec<String>),
}

#[derive(Clone)]
pub(super) struct SingleLink {
    /// The URL as configured, for the publisher and the probe.
    client: redis::Client,
    /// The same server in RESP3, for the subscriber (pushes).
    resp3: redis::Client,
}

impl Link {
    pub(super) fn new(config: &RedisConfig) -> Result<Self, BusError> {
        let bad = |e: redis::RedisError| BusError::Unavailable(format!("invalid redis.url: {e}"));
        if config.tls.insecure_skip_verify {
            warn!(
                "redis.tls_insecure_skip_verify is on: Redis's certificate is not checked, \
                 anyone on the path can read and forge the bus's traffic"
            );
        }
        if !config.sentinels.is_empty() {
            Ok(Link::Sentinel(tls::Sentinels::new(config).map_err(
                |e| BusError::Unavailable(format!("invalid redis.sentinels: {e}")),
            )?))
        } else if config.sharded {
            Ok(Link::Sharded(config.urls()))
        } else {
            let info = config.url.as_str().into_connection_info().map_err(bad)?;
            let client =
                tls::client(info.clone(), config, info.redis_settings().protocol()).map_err(bad)?;
            let resp3 = tls::client(info, config, redis::ProtocolVersion::RESP3).map_err(bad)?;
            Ok(Link::Single(Box::new(SingleLink { client, resp3 })))
        }
    }

    /// A client for the one server (single or Sentinel's primary).
    async fn server(&self, config: &RedisConfig, resp3: bool) -> redis::RedisResult<redis::Client> {
        match self {
            Link::Single(single) => Ok(if resp3 {
                single.resp3.clone()
            } else {
                single.client.clone()
            }),
            Link::Sentinel(sentinels) => {
                let info = sentinels.primary().await?;
                let protocol = if resp3 {
                    redis::ProtocolVersion::RESP3
                } else {
                    redis::ProtocolVersion::RESP2
                };
                tls::client(info, config, protocol)
            }
            Link::Sharded(_) => Err(redis::RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "a cluster has no single server",
            ))),
        }
    }
}

/// Whether the sentinels now name another primary than `current` (false
/// when they cannot be asked: a lost primary shows as a lost connection).
///
/// Sentinel demotes a primary that is still up only some seconds after a
/// failover (it waits for the old primary to report its role); until then
/// both servers accept PUBLISH, and nodes on different ones would not hear
/// each other. Asked at every probe, this bounds that split to about
/// `redis.probe_interval_ms`.
pub(super) async fn primary_moved(link: &Link, current: &redis::ConnectionAddr) -> bool {
    let Link::Sentinel(sentinels) = link else {
        return false;
    };
    sentinels
        .primary()
        .await
        .is_ok_and(|primary| primary.addr() != current)
}

/// The publisher's connection (also the prober's; cloning shares it).
#[derive(Clone)]
pub(super) enum PubConn {
    Single(redis::aio::MultiplexedConnection),
    Sharded(redis::cluster_async::ClusterConnection),
}

pub(super) async fn connect_publisher(
    link: &Link,
    config: &RedisConfig,
) -> redis::RedisResult<PubConn> {
    connect_command(link, config, Some(config.command_timeout)).await
}

/// A connection for one blocking command at a time (the presence control
/// list's `BLPOP`, `src/bus/redis/presence.rs`): like the publisher's, but
/// with no response timeout, since the answer comes whenever something is
/// pushed. Whoever uses it bounds the wait itself.
pub(super) async fn connect_blocking(
    link: &Link,
    config: &RedisConfig,
) -> redis::RedisResult<PubConn> {
    connect_command(link, config, None).await
}

/// A command connection whose answers are awaited for at most `answer`
/// (`None`: as long as it takes).
async fn connect_command(
    link: &Link,
    config: &RedisConfig,
    answer: Option<std::time::Duration>,
) -> redis::RedisResult<PubConn> {
    let Link::Sharded(nodes) = link else {
        let cfg = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(config.command_timeout))
            .set_response_timeout(answer);
        return Ok(PubConn::Single(
            link.server(config, false)
                .await?
                .get_multiplexed_async_connection_with_config(&cfg)
                .await?,
        ));
    };
    // The cluster client wants a response timeout: a year stands for none.
    let answer = answer.unwrap_or(std::time::Duration::from_secs(365 * 24 * 3600));
    Ok(PubConn::Sharded(
        tls::cluster_builder(nodes, config)
            .connection_timeout(config.command_timeout)
            .response_timeout(answer)
            // No automatic retries: after a timeout or a broken
            // connection the shard may already have run the SPUBLISH,
            // and a retry would deliver it twice. Redirects, which are
            // safe, are resent by `send` itself.
            .retries(0)
            .build()?
            .get_async_connection()
            .await?,
    ))
}

/// Most shards [`why_no_shard`] tries.
const SHARDS_TRIED: usize = 16;

/// Sharded: why the cluster client could connect to no shard, when its
/// own error does not say (`ClusterConnectionNotFound`, a timeout). It
/// reaches the seeds of `redis.url` but then connects to the addresses the
/// cluster announces for its shards, whose errors it keeps to itself: a
/// certificate that names the seeds' host name but not the announced
/// addresses left the node unready saying only "No connections found"
/// (review of 2026-12-03). Asks a seed for the slot map (`CLUSTER SLOTS`)
/// and connects to each shard as the cluster client does; the first
/// failure is the answer. `None` when every shard answers or no seed does.
pub(super) async fn why_no_shard(link: &Link, config: &RedisConfig) -> Option<String> {
    let Link::Sharded(seeds) = link else {
        return None;
    };
    let limit = config.command_timeout;
    let ping = async |info: redis::ConnectionInfo| -> Result<(), String> {
        let client =
            tls::client(info, config, redis::ProtocolVersion::RESP2).map_err(|e| e.to_string())?;
        let asked = async {
            let mut conn = client.get_multiplexed_async_connection().await?;
            redis::cmd("PING").query_async::<()>(&mut conn).await
        };
        match tokio::time::timeout(limit, asked).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {} ms", limit.as_millis())),
        }
    };
    for seed in seeds {
        let Ok(info) = seed.as_str().into_connection_info() else {
            continue;
        };
        let Ok(client) = tls::client(info.clone(), config, redis::ProtocolVersion::RESP2) else {
            continue;
        };
        let asked = async {
            let mut conn = client.get_multiplexed_async_connection().await?;
            redis::cmd("CLUSTER")
                .arg("SLOTS")
                .query_async::<redis::Value>(&mut conn)
                .await
        };
        let Ok(Ok(slots)) = tokio::time::timeout(limit, asked).await else {
            continue;
        };
        for (host, port) in shard_endpoints(&slots).into_iter().take(SHARDS_TRIED) {
            let addr = match info.addr() {
                redis::ConnectionAddr::TcpTls {
                    insecure,
                    tls_params,
                    ..
                } => redis::ConnectionAddr::TcpTls {
                    host: host.clone(),
                    port,
                    insecure: *insecure,
                    tls_params: tls_params.clone(),
                },
                _ => redis::ConnectionAddr::Tcp(host.clone(), port),
            };
            if let Err(e) = ping(info.clone().set_addr(addr)).await {
                let hint = if e.contains("NotValidForName") || e.contains("not valid for name") {
                    format!(
                        " (the certificate does not name {host}: the cluster announces its shards by the address its nodes give, not by the name in redis.url; have them announce a name the certificate holds, cluster-announce-hostname with cluster-preferred-endpoint-type hostname, or give them certificates for their addresses)"
                    )
                } else {
                    String::new()
                };
                return Some(format!(
                    "the cluster announces a shard at {host}:{port}, and connecting there fails: {e}{hint}"
                ));
            }
        }
        return None;
    }
    None
}

/// The primaries' endpoints in a `CLUSTER SLOTS` reply, each once, in order.
fn shard_endpoints(slots: &redis::Value) -> Vec<(String, u16)> {
    use redis::Value;
    let text = |v: &Value| match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    };
    let mut out: Vec<(String, u16)> = Vec::new();
    let Value::Array(ranges) = slots else {
        return out;
    };
    for range in ranges {
        let Value::Array(fields) = range else {
            continue;
        };
        let Some(Value::Array(primary)) = fields.get(2) else {
            continue;
        };
        let (Some(host), Some(Value::Int(port))) = (primary.first().and_then(text), primary.get(1))
        else {
            continue;
        };
        let Ok(port) = u16::try_from(*port) else {
            continue;
        };
        // "?" (or empty): no endpoint known; the cluster client does not
        // use it either.
        if host.is_empty() || host == "?" || out.iter().any(|(h, p)| *h == host && *p == port) {
            continue;
        }
        out.push((host, port));
    }
    out
}

/// Opens a command connection within `redis.command_timeout_ms` (the
/// registry's, presence's and the control plane's); the error says why, in
/// words for a log line or a 503.
pub(super) async fn open_command_connection(
    link: &Link,
    config: &RedisConfig,
) -> Result<PubConn, String> {
    match tokio::time::timeout(config.command_timeout, connect_publisher(link, config)).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(format!("cannot connect: {e}")),
        Err(_) => Err(format!(
            "cannot connect within {} ms",
            config.command_timeout.as_millis()
        )),
    }
}

/// Either kind of connection runs commands and scripts (history's reads,
/// `history.rs`): on a cluster each is routed by its first key.
impl redis::aio::ConnectionLike for PubConn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            PubConn::Single(c) => c.req_packed_command(cmd),
            PubConn::Sharded(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            PubConn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            PubConn::Sharded(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            PubConn::Single(c) => c.get_db(),
            PubConn::Sharded(c) => c.get_db(),
        }
    }
}

impl PubConn {
    /// Runs `cmd` on either kind of connection.
    pub(super) async fn query<T: redis::FromRedisValue>(
        &mut self,
        cmd: &redis::Cmd,
    ) -> redis::RedisResult<T> {
        match self {
            PubConn::Single(c) => cmd.query_async(c).await,
            PubConn::Sharded(c) => cmd.query_async(c).await,
        }
    }

    /// Publishes each message of `batch` on each of its channels. Every
    /// command runs whatever another's answer (a pipeline, or one request
    /// per `SPUBLISH`): the answers are read one by one, and what Redis
    /// refused comes back as [`Unheard`]; an error that is not an answer
    /// on a healthy connection (see [`is_refusal`]) is the `Err`.
    pub(super) async fn send(&mut self, batch: &[Outgoing]) -> redis::RedisResult<Unheard> {
        let results: Vec<redis::RedisResult<()>> = match self {
            PubConn::Single(conn) => {
                let mut pipe = redis::pipe();
                pipe.ignore_errors();
                for m in batch {
                    for channel in &m.channels {
                        pipe.cmd("PUBLISH").arg(channel).arg(&m.payload[..]);
                    }
                }
                let replies: Vec<redis::RedisResult<redis::Value>> = pipe.query_async(conn).await?;
                replies.into_iter().map(|r| r.map(drop)).collect()
            }
            PubConn::Sharded(conn) => {
                // A cluster pipeline must stay on one slot, so each SPUBLISH
                // is its own request. They are issued in order before any is
                // awaited, so each shard connection sends them in order.
                let sends = batch.iter().flat_map(|m| {
                    m.channels.iter().map(|channel| {
                        let conn = conn.clone();
                        let payload = m.payload.clone();
                        async move { spublish(conn, channel, payload).await }
                    })
                });
                futures_util::future::join_all(sends).await
            }
        };
        let mut unheard = Unheard::default();
        let mut results = results.into_iter();
        for (i, m) in batch.iter().enumerate() {
            let mut refused = false;
            for result in results.by_ref().take(m.channels.len()) {
                match result {
                    Ok(()) => unheard.heard += 1,
                    Err(e) if is_denied(&e) => {
                        refused = true;
                        unheard.denied.get_or_insert(e);
                    }
                    Err(e) if is_refusal(&e) => {
                        refused = true;
                        unheard.refusing.get_or_insert(e);
                    }
                    Err(e) => return Err(e),
                }
            }
            if refused {
                unheard.refused.push(i);
            }
        }
        Ok(unheard)
    }
}

/// What Redis refused of a batch it answered ([`PubConn::send`]): the
/// messages with at least one refused channel (their subscribers on it
/// do not get them), the `PUBLISH`es that ran, the first refusal of this
/// user's rights ([`is_denied`]) and the first other refusal (Redis
/// refusing the command itself).
#[derive(Debug, Default)]
pub(super) struct Unheard {
    /// The positions in the batch of the messages with a refused channel.
    pub refused: Vec<usize>,
    pub heard: usize,
    pub denied: Option<redis::RedisError>,
    pub refusing: Option<redis::RedisError>,
}

/// Whether `e` is an ACL's refusal (`NOPERM`): this user may not publish
/// on that channel (or at all). Unlike `OOM`, `BUSY` or `LOADING`, waiting
/// does not change it, and the other channels' messages go through.
pub(super) fn is_denied(e: &redis::RedisError) -> bool {
    e.code() == Some("NOPERM")
}

/// Whether `e` is Redis's answer on a connection that is fine (an ACL's
/// `NOPERM`, `OOM`, `BUSY`, `LOADING`) rather than a failed connection or
/// a server that is not the primary (`READONLY`, `MASTERDOWN`: those
/// reconnect).
pub(super) fn is_refusal(e: &redis::RedisError) -> bool {
    !(e.is_io_error() || e.is_timeout() || e.is_connection_dropped())
        && e.code()
            .is_some_and(|code| !matches!(code, "READONLY" | "MASTERDOWN"))
}

/// One `SPUBLISH`, sent again only when the shard answered with a redirect
/// (it did not run it; the cluster client refreshes its slot map on that
/// reply). A redirected message may overtake a later one of the same sender
/// on the same channel: see docs/cluster.md on order in sharded mode.
async fn spublish(
    mut conn: redis::cluster_async::ClusterConnection,
    channel: &str,
    payload: Bytes,
) -> redis::RedisResult<()> {
    let mut tries = 0;
    loop {
        let mut cmd = redis::cmd("SPUBLISH");
        cmd.arg(channel).arg(&payload[..]);
        match cmd.query_async::<()>(&mut conn).await {
            Err(e) if e.redirect_node().is_some() && tries < REDIRECT_RETRIES => {
                tries += 1;
                tokio::time::sleep(MIN_BACKOFF * tries as u32).await;
            }
            result => return result,
        }
    }
}

/// The health probe's own connection: probes never queue behind a backlog
/// of published messages, so a busy publisher never looks like a dead
/// subscriber.
pub(super) async fn connect_prober(
    link: &Link,
    config: &RedisConfig,
) -> redis::RedisResult<PubConn> {
    connect_publisher(link, config).await
}

impl PubConn {
    /// Publishes `payload` to each of `channels` (probes: tiny, one per shard).
    pub(super) async fn probe(&mut self, channels: &[String]) -> redis::RedisResult<()> {
        let batch = [Outgoing::new(
            channels.to_vec(),
            Bytes::from_static(b"probe"),
        )];
        let unheard = self.send(&batch).await?;
        match unheard.refusing.or(unheard.denied) {
            Some(refused) => Err(refused),
            None => Ok(()),
        }
    }

    /// On a single server (`redis.url` or Sentinel): why the server cannot
    /// carry the cluster's traffic, `None` when it can or will not say
    /// (`INFO` refused by an ACL). A **replica** takes `PUBLISH` but hands
    /// it only to its own subscribers, and refuses writes: the node's
    /// messages reached no other node while it looked ready, and with
    /// history on not even its own sockets. A **Redis Cluster node**
    /// answers every key of another slot with `MOVED`: the registry, bans,
    /// presence, idempotency keys and history all failed, the node ready
    /// (review of 2026-12-03). Asked at every subscriber connect and at
    /// every probe (a demoted primary keeps its clients connected).
    pub(super) async fn unfit(&mut self) -> Option<String> {
        let PubConn::Single(conn) = self else {
            return None;
        };
        let section = async |conn: &mut redis::aio::MultiplexedConnection, name: &str| {
            redis::cmd("INFO")
                .arg(name)
                .query_async::<String>(conn)
                .await
                .ok()
        };
        if let Some(info) = section(conn, "replication").await
            && let Some(role) = info_field(&info, "role")
            && role != "master"
        {
            return Some(format!(
                "the Redis server is a replica (role:{role}), not the primary: its PUBLISH reaches only its own subscribers and it refuses writes; point redis.url at the primary, or use redis.sentinels"
            ));
        }
        if let Some(info) = section(conn, "cluster").await
            && info_field(&info, "cluster_enabled") == Some("1")
        {
            return Some(
                "the Redis server is a Redis Cluster node: set redis.sharded = true (Redis 7+) and list the cluster's nodes in redis.url; a single-server client gets MOVED for most keys"
                    .to_owned(),
            );
        }
        None
    }

    /// The cluster's shards as their slot ranges (sharded only; `None` on a
    /// single server).
    pub(super) async fn shard_ranges(&mut self) -> redis::RedisResult<Option<Vec<(u16, u16)>>> {
        let PubConn::Sharded(conn) = self else {
            return Ok(None);
        };
        // CLUSTER SLOTS: [[start, end, [ip, port, id], replicas...], ...]
        let slots: Vec<redis::Value> = redis::cmd("CLUSTER").arg("SLOTS").query_async(conn).await?;
        let mut ranges = Vec::new();
        for entry in slots {
            if let redis::Value::Array(fields) = entry
                && let (Some(redis::Value::Int(start)), Some(redis::Value::Int(end))) =
                    (fields.first(), fields.get(1))
            {
                ranges.push((*start as u16, *end as u16));
            }
        }
        // Each range is probed on its own: a shard with several ranges
        // costs a probe per range and proves the same.
        ranges.sort_unstable();
        Ok(Some(ranges))
    }
}

/// The hash slot of a channel, as Redis Cluster computes it for shard
/// channels: CRC16 (XMODEM) of the name, or of its `{hash tag}` when it has
/// a non-empty one, modulo 16384. redis-rs computes it too but does not
/// expose the number, which the probe needs to pick a channel per shard.
pub(super) fn slot_of(channel: &str) -> u16 {
    let key = channel.as_bytes();
    let tagged = key.iter().position(|&b| b == b'{').and_then(|open| {
        let rest = &key[open + 1..];
        let close = rest.iter().position(|&b| b == b'}')?;
        (close > 0).then(|| &rest[..close])
    });
    let mut crc: u16 = 0;
    for &byte in tagged.unwrap_or(key) {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16384
}

/// How many times the subscriber has (re)connected. A Redis the
/// subscriber lost, or left because the sentinels name another primary,
/// is one every other connection of the node is to leave too: each
/// command connection notes the epoch it was opened in and is replaced
/// when it changed ([`Kept`]), and a connection that blocks (`BLPOP`)
/// watches it. (A review saw the registry's, presence's control and
/// history's connections stay on a demoted primary for 10 s after a
/// Sentinel failover: users vanished from presence, and a resume read the
/// old primary's history and said it had recovered what it had not.)
pub(super) struct Epoch(tokio::sync::watch::Sender<u64>);

impl Default for Epoch {
    fn default() -> Self {
        Self(tokio::sync::watch::channel(0).0)
    }
}

impl Epoch {
    pub(super) fn current(&self) -> u64 {
        *self.0.borrow()
    }

    /// The subscriber connected (again).
    pub(super) fn bump(&self) {
        self.0.send_modify(|n| *n += 1);
    }

    /// For a task that blocks on a connection: `changed()` wakes it.
    pub(super) fn watch(&self) -> tokio::sync::watch::Receiver<u64> {
        self.0.subscribe()
    }
}

/// A command connection kept for reuse, with the [`Epoch`] it was opened
/// in: handed out only within that epoch. `std::sync::Mutex`: locked only
/// to clone or replace it, never across an await.
pub(super) struct Kept<C>(std::sync::Mutex<Option<(C, u64)>>);

impl<C> Default for Kept<C> {
    fn default() -> Self {
        Self(std::sync::Mutex::new(None))
    }
}

impl<C: Clone> Kept<C> {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(C, u64)>> {
        // A connection handle: never inconsistent, ignore poisoning.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The connection, if one was opened in `epoch`.
    pub(super) fn get(&self, epoch: u64) -> Option<C> {
        self.lock()
            .as_ref()
            .filter(|(_, opened)| *opened == epoch)
            .map(|(conn, _)| conn.clone())
    }

    /// Whether there is one, of any epoch.
    pub(super) fn is_some(&self) -> bool {
        self.lock().is_some()
    }

    pub(super) fn set(&self, conn: C, epoch: u64) {
        *self.lock() = Some((conn, epoch));
    }

    pub(super) fn clear(&self) {
        *self.lock() = None;
    }
}

/// Capped exponential backoff.
pub(super) struct Backoff {
    pub(super) next: Duration,
    max: Duration,
}

impl Backoff {
    pub(super) fn new(max: Duration) -> Self {
        Self {
            next: MIN_BACKOFF.min(max),
            max,
        }
    }

    pub(super) fn step(&mut self) -> Duration {
        let now = self.next;
        self.next = (self.next * 2).min(self.max);
        now
    }

    pub(super) fn reset(&mut self) {
        self.next = MIN_BACKOFF.min(self.max);
    }
}

/// The push channel's byte account, shared by the sending closure (on
/// redis-rs's reading task) and the receiver.
#[derive(Default)]
struct PushBudget {
    bytes: AtomicUsize,
    dropped: AtomicU64,
    /// Every push dropped on this connection, never reset (the ban
    /// mirror reads it at every check, `bans.rs`).
    dropped_ever: Arc<AtomicU64>,
}

/// Bytes a push holds while queued.
fn push_bytes(push: &redis::PushInfo) -> usize {
    PUSH_OVERHEAD
        + push
            .data
            .iter()
            .map(|v| match v {
                redis::Value::BulkString(b) => b.len(),
                _ => 16,
            })
            .sum::<usize>()
}

/// A sender that redis-rs calls for every push, without blocking: it
/// queues the push while the queued bytes stay within `limit`, and drops
/// (and counts) it otherwise.
fn bounded_pushes(
    limit: usize,
) -> (
    impl Fn(redis::PushInfo) -> Result<(), ()> + Send + Sync + 'static,
    PushReceiver,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let budget = Arc::new(PushBudget::default());
    let account = budget.clone();
    let send = move |push: redis::PushInfo| {
        let size = push_bytes(&push);
        // Disconnection notices carry nothing and must never be lost.
        let is_data = matches!(
            push.kind,
            redis::PushKind::Message | redis::PushKind::SMessage
        );
        if is_data && account.bytes.load(Ordering::Acquire) + size > limit {
            account.dropped.fetch_add(1, Ordering::Relaxed);
            account.dropped_ever.fetch_add(1, Ordering::AcqRel);
            return Ok(());
        }
        account.bytes.fetch_add(size, Ordering::AcqRel);
        // The receiver is gone only when the subscriber dropped the
        // connection; nothing to do then.
        tx.send(push).map_err(|_| ())
    };
    (send, PushReceiver { rx, budget })
}

/// The receiving end of [`bounded_pushes`].
pub(super) struct PushReceiver {
    rx: mpsc::UnboundedReceiver<redis::PushInfo>,
    budget: Arc<PushBudget>,
}

impl PushReceiver {
    async fn recv(&mut self) -> Option<redis::PushInfo> {
        let push = self.rx.recv().await?;
        self.budget
            .bytes
            .fetch_sub(push_bytes(&push), Ordering::AcqRel);
        Some(push)
    }

    /// How many pushes are queued.
    fn queued(&self) -> usize {
        self.rx.len()
    }

    /// A push already queued, without waiting.
    fn try_recv(&mut self) -> Option<redis::PushInfo> {
        let push = self.rx.try_recv().ok()?;
        self.budget
            .bytes
            .fetch_sub(push_bytes(&push), Ordering::AcqRel);
        Some(push)
    }

    fn take_dropped(&self) -> u64 {
        self.budget.dropped.swap(0, Ordering::Relaxed)
    }
}

/// The subscriber's connection: RESP3, its pushes on a byte-bounded
/// channel.
pub(super) struct SubConn {
    kind: SubKind,
    pushes: PushReceiver,
    /// The server it is connected to (single server or Sentinel's primary).
    pub(super) server: Option<redis::ConnectionAddr>,
}

enum SubKind {
    Single(redis::aio::MultiplexedConnection),
    Sharded(redis::cluster_async::ClusterConnection),
}

pub(super) async fn connect_subscriber(
    link: &Link,
    config: &RedisConfig,
) -> redis::RedisResult<SubConn> {
    connect_subscriber_with(link, config, SUBSCRIBER_BUFFER_BYTES).await
}

pub(super) async fn connect_subscriber_with(
    link: &Link,
    config: &RedisConfig,
    buffer_bytes: usize,
) -> redis::RedisResult<SubConn> {
    let (send, pushes) = bounded_pushes(buffer_bytes);
    let mut addr = None;
    let kind = if let Link::Sharded(nodes) = link {
        SubKind::Sharded(
            tls::cluster_builder(nodes, config)
                .use_protocol(redis::ProtocolVersion::RESP3)
                .push_sender(send)
                .connection_timeout(config.command_timeout)
                .response_timeout(config.command_timeout)
                .build()?
                .get_async_connection()
                .await?,
        )
    } else {
        let server = link.server(config, true).await?;
        addr = Some(server.get_connection_info().addr().clone());
        let cfg = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(config.command_timeout))
            .set_response_timeout(Some(config.command_timeout))
            .set_push_sender(send);
        SubKind::Single(
            server
                .get_multiplexed_async_connection_with_config(&cfg)
                .await?,
        )
    };
    Ok(SubConn {
        kind,
        pushes,
        server: addr,
    })
}

/// What the subscriber connection produced.
pub(super) enum Incoming {
    Message(String, Bytes),
    /// A shard gave up these channels (its slots moved, sharded only): they
    /// must be subscribed again, at their new owner.
    Unsubscribed(Vec<String>),
    /// Pushes were dropped because the subscriber task fell behind.
    Lagged(u64),
    Other,
    Closed,
}

/// Channels grouped into commands: one command per slot on a cluster (a
/// sharded command must stay in one slot), at most `max` channels each.
fn commands_by_slot(channels: &[String], max: usize) -> Vec<Vec<String>> {
    let mut by_slot: BTreeMap<u16, Vec<String>> = BTreeMap::new();
    for channel in channels {
        by_slot
            .entry(slot_of(channel))
            .or_default()
            .push(channel.clone());
    }
    by_slot
        .into_values()
        .flat_map(|group| {
            group
                .chunks(max.max(1))
                .map(<[String]>::to_vec)
                .collect::<Vec<_>>()
        })
        .collect()
}

impl SubConn {
    /// Subscribes `channels`. On a cluster the commands (one per slot) are
    /// all issued before any is awaited, so they travel pipelined to each
    /// shard: tens of thousands of channels cost a few round trips, not one
    /// each.
    pub(super) async fn subscribe(&mut self, channels: &[String]) -> redis::RedisResult<()> {
        match &mut self.kind {
            SubKind::Single(conn) => conn.subscribe(channels).await,
            SubKind::Sharded(conn) => {
                let sends = commands_by_slot(channels, 1000).into_iter().map(|group| {
                    let mut conn = conn.clone();
                    async move { conn.ssubscribe(group).await }
                });
                futures_util::future::join_all(sends)
                    .await
                    .into_iter()
                    .collect()
            }
        }
    }

    pub(super) async fn unsubscribe(&mut self, channels: &[String]) -> redis::RedisResult<()> {
        match &mut self.kind {
            SubKind::Single(conn) => conn.unsubscribe(channels).await,
            SubKind::Sharded(conn) => {
                let sends = commands_by_slot(channels, 1000).into_iter().map(|group| {
                    let mut conn = conn.clone();
                    async move { conn.sunsubscribe(group).await }
                });
                futures_util::future::join_all(sends)
                    .await
                    .into_iter()
                    .collect()
            }
        }
    }

    /// Sharded only: how many shard channels the primaries hold for this
    /// connection, summed (`ssub` of `CLIENT INFO` on each primary's
    /// connection); `None` on a single server, or when a primary does not
    /// say (before Redis 7.0.3) or did not answer.
    ///
    /// The cluster client repairs its connection to a shard by itself (a
    /// shard that restarted, a connection it found broken), and a
    /// subscription made on the connection it replaced is gone with it,
    /// with no push to tell: the subscriber compares this with what it
    /// subscribed (`subscriber.rs`).
    pub(super) fn shard_subscriptions(
        &self,
    ) -> Option<impl Future<Output = redis::RedisResult<Option<usize>>> + Send + 'static> {
        let SubKind::Sharded(conn) = &self.kind else {
            return None;
        };
        let mut conn = conn.clone();
        Some(async move {
            use redis::cluster_routing::{MultipleNodeRoutingInfo, RoutingInfo};
            let mut cmd = redis::cmd("CLIENT");
            cmd.arg("INFO");
            let answer = conn
                .route_command(
                    cmd,
                    RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None)),
                )
                .await?;
            Ok(sum_ssub(&answer))
        })
    }

    pub(super) async fn next(&mut self) -> Incoming {
        let dropped = self.pushes.take_dropped();
        if dropped > 0 {
            return Incoming::Lagged(dropped);
        }
        let Some(push) = self.pushes.recv().await else {
            return Incoming::Closed;
        };
        Self::read(push)
    }

    /// What came before now, without waiting: `None` once nothing more is
    /// queued. Redis-rs queues a push before it completes the reply of a
    /// command that Redis answered after it, so once a `SUBSCRIBE` has
    /// returned, every push that preceded its reply is here.
    pub(super) fn try_next(&mut self) -> Option<Incoming> {
        let dropped = self.pushes.take_dropped();
        if dropped > 0 {
            return Some(Incoming::Lagged(dropped));
        }
        self.pushes.try_recv().map(Self::read)
    }

    /// How many pushes are queued now.
    pub(super) fn queued(&self) -> usize {
        self.pushes.queued()
    }

    /// The count of every push this connection dropped.
    pub(super) fn dropped_ever(&self) -> Arc<AtomicU64> {
        self.pushes.budget.dropped_ever.clone()
    }

    fn read(push: redis::PushInfo) -> Incoming {
        match push.kind {
            redis::PushKind::Message | redis::PushKind::SMessage => {
                let mut data = push.data.into_iter();
                match (data.next(), data.next()) {
                    (
                        Some(redis::Value::BulkString(ch)),
                        Some(redis::Value::BulkString(payload)),
                    ) => Incoming::Message(
                        String::from_utf8_lossy(&ch).into_owned(),
                        // The one copy of the payload: out of the push.
                        Bytes::from(payload),
                    ),
                    _ => Incoming::Other,
                }
            }
            // A shard's own unsubscribe (slot migration) arrives as a push
            // no command of ours asked for; our own SUNSUBSCRIBEs produce
            // the same push, and the caller tells the two apart by what it
            // still wants.
            redis::PushKind::SUnsubscribe => match push.data.first() {
                Some(redis::Value::BulkString(ch)) => {
                    Incoming::Unsubscribed(vec![String::from_utf8_lossy(ch).into_owned()])
                }
                _ => Incoming::Other,
            },
            redis::PushKind::Disconnection => Incoming::Closed,
            _ => Incoming::Other,
        }
    }
}

/// The sum of `ssub=<n>` over the answers of a `CLIENT INFO` sent to every
/// primary (a map of address to answer); `None` if one has none.
fn sum_ssub(answer: &redis::Value) -> Option<usize> {
    let redis::Value::Map(answers) = answer else {
        return None;
    };
    let mut sum = 0;
    for (_, info) in answers {
        let text = match info {
            redis::Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
            redis::Value::VerbatimString { text, .. } => text.clone(),
            redis::Value::SimpleString(s) => s.clone(),
            _ => return None,
        };
        let n = text
            .split_ascii_whitespace()
            .find_map(|field| field.strip_prefix("ssub="))?
            .parse::<usize>()
            .ok()?;
        sum += n;
    }
    Some(sum)
}

/// The value of `name` in an `INFO` answer (`name:value` lines).
fn info_field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines().find_map(|line| {
        line.strip_prefix(name)
            .and_then(|rest| rest.strip_prefix(':'))
            .map(str::trim)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_endpoints_are_the_primaries_each_once() {
        use redis::Value;
        let text = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let range = |start: i64, end: i64, host: &str, port: i64| {
            Value::Array(vec![
                Value::Int(start),
                Value::Int(end),
                Value::Array(vec![text(host), Value::Int(port), text("id")]),
                // A replica: not a shard's primary.
                Value::Array(vec![text("10.0.0.9"), Value::Int(7000), text("id2")]),
            ])
        };
        let slots = Value::Array(vec![
            range(0, 99, "10.0.0.1", 6379),
            range(100, 199, "10.0.0.2", 6379),
            range(200, 299, "10.0.0.1", 6379),
            range(300, 399, "?", 6379),
            range(400, 16383, "redis-2.example", 6380),
            Value::Int(3),
        ]);
        assert_eq!(
            shard_endpoints(&slots),
            [
                ("10.0.0.1".to_owned(), 6379),
                ("10.0.0.2".to_owned(), 6379),
                ("redis-2.example".to_owned(), 6380)
            ]
        );
        assert!(shard_endpoints(&Value::Nil).is_empty());
    }

    #[test]
    fn shard_subscriptions_are_summed_over_the_primaries() {
        let info = |s: &str| redis::Value::BulkString(s.as_bytes().to_vec());
        let answer = redis::Value::Map(vec![
            (
                info("a:1"),
                info("id=3 addr=x fd=8 sub=0 psub=0 ssub=2 multi=-1"),
            ),
            (
                info("b:2"),
                redis::Value::VerbatimString {
                    format: redis::VerbatimFormat::Text,
                    text: "id=4 ssub=3 multi=-1\n".into(),
                },
            ),
        ]);
        assert_eq!(sum_ssub(&answer), Some(5));
        let old = redis::Value::Map(vec![(info("a:1"), info("id=3 sub=0 psub=0"))]);
        assert_eq!(sum_ssub(&old), None, "a Redis that does not say");
        // A primary that answered no text (an error): unknown.
        let failed = redis::Value::Map(vec![(info("a:1"), redis::Value::Nil)]);
        assert_eq!(sum_ssub(&failed), None);
    }

    #[test]
    fn slots_match_redis() {
        use redis::cluster_routing::Slot;
        for key in [
            "wshub:all",
            "wshub:g:chat",
            "a{tag}b",
            "{}x",
            "x{}{y}",
            "wshub:probe:n1:7",
        ] {
            assert_eq!(Slot::new(slot_of(key)), Some(Slot::for_key(key)), "{key}");
        }
        // The example from the Redis Cluster specification.
        assert_eq!(slot_of("123456789"), 12739);
    }

    #[test]
    fn sharded_commands_stay_in_one_slot() {
        let channels: Vec<String> = (0..200).map(|i| format!("wshub:g:{i}")).collect();
        let commands = commands_by_slot(&channels, 1000);
        assert_eq!(commands.iter().map(Vec::len).sum::<usize>(), 200);
        for command in &commands {
            assert!(command.iter().all(|c| slot_of(c) == slot_of(&command[0])));
        }
        let same: Vec<String> = (0..5).map(|_| "wshub:all".to_owned()).collect();
        assert_eq!(commands_by_slot(&same, 2).len(), 3);
    }

    #[tokio::test]
    async fn the_push_channel_is_bounded_in_bytes() {
        let (send, mut rx) = bounded_pushes(1000);
        let push = |n: usize| redis::PushInfo {
            kind: redis::PushKind::Message,
            data: vec![
                redis::Value::BulkString(b"ch".to_vec()),
                redis::Value::BulkString(vec![0; n]),
            ],
        };
        for _ in 0..3 {
            send(push(300)).unwrap();
        }
        // 3 × (300 + 2 + overhead) is over 1000: the third was dropped.
        assert_eq!(rx.take_dropped(), 1);
        assert!(rx.recv().await.is_some());
        // Room again after the receiver took one.
        send(push(300)).unwrap();
        assert_eq!(rx.take_dropped(), 0);
        send(redis::PushInfo {
            kind: redis::PushKind::Disconnection,
            data: vec![],
        })
        .unwrap();
        assert!(rx.recv().await.is_some());
        assert!(rx.recv().await.is_some());
        assert_eq!(
            rx.recv().await.unwrap().kind,
            redis::PushKind::Disconnection
        );
    }
}
