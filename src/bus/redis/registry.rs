//! The node registry on Redis: a lease per node incarnation, renewed by a
//! heartbeat task on a connection of its own.
//!
//! **Layout**, under `redis.channel_prefix` `P`, every key in the hash tag
//! `{P:registry}` (one slot on a Redis Cluster, so each script runs on one
//! shard):
//!
//! | key | type | what |
//! |---|---|---|
//! | `{P:registry}:nodes` | sorted set | one member per node incarnation (`<node_id>:<random>`), scored by its lease's expiry (ms, Redis's clock) |
//! | `{P:registry}:node:<member>` | hash | `id`, `version`, `connections`, `started`, `ready` (1/0), `reads` (payload versions, `1,2`), `bans` (`push` when the node publishes its bans for the mirrors, `bans.rs`; not on a Redis Cluster), `events` (1 when it posts presence events to a backend: presence's sweeps wait for it, `presence.rs`); expires with the lease |
//!
//! **Heartbeat**: every `presence.heartbeat_ms` one script renews the
//! member's score and its hash, removes members whose lease has passed
//! (their hashes expire by themselves; the set itself expires with its
//! longest lease, so nothing outlives the last node), and returns what
//! every live node reads and whether it publishes its bans, for the
//! version gate. Scores come from Redis's own clock (`TIME`),
//! so clock skew between hosts moves no lease. A Redis that restarted
//! empty is written again by every node's next heartbeat.
//!
//! **Reads** (`GET /api/nodes`) keep the members scored after Redis's now:
//! a node that missed its lease is gone from answers at its expiry, before
//! any cleanup.
//!
//! **Failures** never touch sockets: a heartbeat that fails is counted
//! (`wshub_registry_heartbeat_failures_total`), logged once per outage,
//! retried once at once on a new connection, and then at the next beat.
//! While the registry has no connection, reads fail with
//! [`BusError::Unavailable`] and its reason (the API answers 503).
//!
//! **Leaving**: when the bus stops (at the end of the node's shutdown) the
//! task removes the node's member and hash, so a node that was stopped
//! leaves at once; one that was killed leaves at its lease's expiry.
//!
//! The scripts go as `EVAL` (a few hundred bytes per heartbeat; Redis keeps
//! the compiled script), so a Redis that restarted needs no reload.

use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use tokio::time::{MissedTickBehavior, timeout};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::Shared;
use super::bans;
use super::conn::{Kept, Link, PubConn, open_command_connection};
use super::presence::{self, RedisPresence};
use crate::bus::BusError;
use crate::bus::presence::Store;
use crate::bus::registry::{NodeEntry, Nodes, Registry, VersionGate, Vitals};
use crate::bus::wire;
use crate::config::PresenceConfig;

/// `KEYS[1]` the set, `KEYS[2]` this node's hash, `KEYS[3]` presence's
/// leases, `KEYS[4]` presence's epoch; `ARGV[1]` the member, `ARGV[2]`
/// the lease (ms), `ARGV[3]` the hash key prefix, `ARGV[4]` an epoch in
/// case there is none, then the hash's fields and values. Returns each
/// live member's `reads` ("" when its hash is gone), how many members are
/// due for a presence sweep, the epoch, 1 when this member was added
/// anew (it had missed its lease, or Redis is new), and each live member's
/// `bans` ("" when it has none).
///
/// Presence's leases (`src/bus/redis/presence.rs`) repeat each member's
/// lease in a set that never expires: a member stays there, due, until a
/// node swept what it held, even if every node died at once and the set
/// of members expired with them.
const HEARTBEAT: &str = r"
local t = redis.call('TIME')
local now = string.format('%.0f', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
local lease = tonumber(ARGV[2])
local expiry = string.format('%.0f', now + lease)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local added = redis.call('ZADD', KEYS[1], expiry, ARGV[1])
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', KEYS[1], last[2])
redis.call('ZADD', KEYS[3], expiry, ARGV[1])
redis.call('HSET', KEYS[2], unpack(ARGV, 5))
redis.call('PEXPIRE', KEYS[2], lease)
local live = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf')
local reads = {}
local bans = {}
for i, member in ipairs(live) do
  reads[i] = redis.call('HGET', ARGV[3] .. member, 'reads') or ''
  bans[i] = redis.call('HGET', ARGV[3] .. member, 'bans') or ''
end
local epoch = redis.call('GET', KEYS[4])
if not epoch then
  epoch = ARGV[4]
  redis.call('SET', KEYS[4], epoch)
end
return {reads, redis.call('ZCOUNT', KEYS[3], '-inf', now), epoch, added, bans}
";

/// A heartbeat's answer: every live member's `reads`, the dead members
/// due for a sweep, the presence epoch, 1 when this member was added
/// anew, and every live member's `bans`.
type Beat = (Vec<String>, i64, String, i64, Vec<String>);

/// `KEYS[1]` the set; `ARGV[1]` the hash key prefix. Returns every live
/// member's hash as a flat field/value list (empty when it is gone).
const READ: &str = r"
local t = redis.call('TIME')
local now = string.format('%.0f', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
local live = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf')
local out = {}
for i, member in ipairs(live) do
  out[i] = redis.call('HGETALL', ARGV[1] .. member)
end
return out
";

/// `KEYS[1]` the set, `KEYS[2]` this node's hash, `KEYS[3]` presence's
/// leases; `ARGV[1]` the member, `ARGV[2]` `presence.leave_delay_ms`:
/// what the node held is swept that much later (users who reconnect to
/// another node meanwhile cause no leave).
const LEAVE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2])
redis.call('ZADD', KEYS[3], string.format('%.0f', now + tonumber(ARGV[2])), ARGV[1])
return 1
";

/// The registry's key names.
#[derive(Debug, Clone)]
struct Keys {
    nodes: String,
    /// The prefix of every node's hash; the member follows.
    node_prefix: String,
    /// The prefix of presence's keys (`src/bus/redis/presence.rs`), in the
    /// same slot: its scripts read the live set.
    presence_prefix: String,
    /// Presence's leases: members that may hold presence, scored by when
    /// they may be swept.
    dead: String,
    /// Presence's epoch.
    epoch: String,
}

impl Keys {
    fn new(prefix: &str) -> Self {
        // The prefix has no braces (validated), so this is the first tag.
        let tag = format!("{{{prefix}:registry}}");
        Self {
            nodes: format!("{tag}:nodes"),
            node_prefix: format!("{tag}:node:"),
            presence_prefix: format!("{tag}:"),
            dead: format!("{tag}:pleases"),
            epoch: format!("{tag}:pepoch"),
        }
    }
}

/// The Redis bus's node registry; see the module docs.
pub(super) struct RedisRegistry {
    inner: Arc<Inner>,
    joined: OnceLock<()>,
}

struct Inner {
    shared: Arc<Shared>,
    link: Link,
    keys: Keys,
    /// This incarnation's member of the set.
    member: String,
    /// When this node started (ms since the Unix epoch).
    started: u64,
    lease: Duration,
    heartbeat: Duration,
    /// The registry's connection: the heartbeat task (re)connects it, reads
    /// use a clone. `std::sync::Mutex`: locked only to clone or replace it,
    /// never across an await.
    conn: Kept<PubConn>,
    /// Why the last heartbeat failed; `None` while it succeeds.
    down_because: Mutex<Option<String>>,
    stop: CancellationToken,
    tasks: TaskTracker,
    /// Cluster presence and the per-user limit, on these leases.
    presence: Arc<RedisPresence>,
    /// `presence.leave_delay_ms`: how long after a graceful leave its
    /// holdings are swept.
    leave_delay: Duration,
}

impl RedisRegistry {
    /// A registry on the bus's Redis, with the bus's stop signal and task
    /// tracker (so the bus's shutdown waits for it to leave). Starts
    /// nothing until the node joins.
    pub(super) fn new(
        shared: Arc<Shared>,
        link: Link,
        presence: &PresenceConfig,
        stop: CancellationToken,
        tasks: TaskTracker,
    ) -> Self {
        let keys = Keys::new(&shared.config.channel_prefix);
        let member = format!("{}:{:016x}", shared.node_id, rand::random::<u64>());
        let presence_store = Arc::new(RedisPresence::new(
            shared.clone(),
            link.clone(),
            keys.presence_prefix.clone(),
            member.clone(),
            presence.clone(),
            stop.clone(),
            tasks.clone(),
        ));
        Self {
            inner: Arc::new(Inner {
                shared,
                link,
                keys,
                member,
                presence: presence_store,
                leave_delay: presence.leave_delay,
                started: wire::now_ms(),
                lease: presence.lease,
                heartbeat: presence.heartbeat,
                conn: Kept::default(),
                down_because: Mutex::new(None),
                stop,
                tasks,
            }),
            joined: OnceLock::new(),
        }
    }
}

impl Registry for RedisRegistry {
    fn join(&self, vitals: Weak<dyn Vitals>) {
        if self.joined.set(()).is_err() {
            return;
        }
        let inner = self.inner.clone();
        self.inner.tasks.spawn(inner.run(vitals));
    }

    fn nodes(&self) -> Nodes<'_> {
        Box::pin(self.inner.read())
    }

    fn gate(&self) -> &VersionGate {
        &self.inner.shared.gate
    }

    fn presence(&self) -> Option<Arc<dyn Store>> {
        Some(Arc::new(presence::Handle(self.inner.presence.clone())))
    }
}

/// Parses a `reads` field (`1,2`); `None` when it is missing or malformed.
fn parse_reads(text: &str) -> Option<Vec<u32>> {
    if text.is_empty() {
        return None;
    }
    text.split(',').map(|v| v.trim().parse().ok()).collect()
}

/// An entry from a hash's field/value list; `None` when fields are missing
/// (the hash expired between the two reads of the script, or someone else
/// wrote it).
fn parse_entry(fields: &[String]) -> Option<NodeEntry> {
    let get = |name: &str| {
        fields
            .chunks_exact(2)
            .find(|pair| pair[0] == name)
            .map(|pair| pair[1].as_str())
    };
    Some(NodeEntry {
        id: get("id")?.to_owned(),
        version: get("version")?.to_owned(),
        connections: get("connections")?.parse().ok()?,
        started: get("started")?.parse().ok()?,
        ready: get("ready")? == "1",
        reads: get("reads").and_then(parse_reads).unwrap_or_default(),
        presence_events: get("events") == Some("1"),
    })
}

impl Inner {
    fn why_down(&self) -> Option<String> {
        self.down_because
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set_down(&self, why: Option<String>) {
        *self.down_because.lock().unwrap_or_else(|e| e.into_inner()) = why;
    }

    /// The heartbeat task: beats until the bus stops, then leaves.
    async fn run(self: Arc<Self>, vitals: Weak<dyn Vitals>) {
        let mut ticks = tokio::time::interval(self.heartbeat);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut outage = false;
        loop {
            tokio::select! {
                biased;
                () = self.stop.cancelled() => break,
                _ = ticks.tick() => {}
            }
            // The node is gone only when it is being dropped, and then the
            // bus's stop signal follows.
            let Some(node) = vitals.upgrade() else {
                continue;
            };
            let entry = NodeEntry::of(&*node, self.started);
            drop(node);
            tokio::select! {
                biased;
                () = self.stop.cancelled() => break,
                () = self.heartbeat(&entry, &mut outage) => {}
            }
        }
        self.leave().await;
    }

    /// One heartbeat, retried once on a new connection when the one it had
    /// failed (after a Redis restart the old connection fails at once, and
    /// the entry must be back within the heartbeat).
    async fn heartbeat(&self, entry: &NodeEntry, outage: &mut bool) {
        let had_connection = self.conn.is_some();
        let mut result = self.beat(entry).await;
        if result.is_err() && had_connection {
            result = self.beat(entry).await;
        }
        let metrics = &self.shared.metrics;
        match result {
            Ok((reads, due, epoch, added, bans)) => {
                if *outage {
                    self.presence.redis_back();
                }
                self.presence
                    .after_beat(epoch, added == 1, due.max(0) as u64);
                let parsed: Vec<Option<Vec<u32>>> = reads.iter().map(|r| parse_reads(r)).collect();
                let bans_pushed = !bans.is_empty() && bans.iter().all(|b| b == bans::BANS_PUSHED);
                self.shared.gate.observe(
                    parsed.iter().map(Option::as_deref),
                    bans_pushed,
                    self.lease,
                );
                metrics.registry_nodes(parsed.len());
                self.set_down(None);
                if std::mem::take(outage) {
                    info!(
                        nodes = parsed.len(),
                        "node registry heartbeat to Redis works again"
                    );
                }
            }
            Err(error) => {
                metrics.registry_heartbeat_failure();
                if !std::mem::replace(outage, true) {
                    warn!(
                        %error,
                        lease_ms = self.lease.as_millis() as u64,
                        "node registry heartbeat failed: other nodes drop this one from GET /api/nodes \
                         once its lease passes; sockets are not affected (logged once per outage, \
                         counted in wshub_registry_heartbeat_failures_total)"
                    );
                }
                self.set_down(Some(error));
            }
        }
    }

    /// Connects if needed and runs the heartbeat script; on failure the
    /// connection is dropped (the next attempt opens a new one).
    async fn beat(&self, entry: &NodeEntry) -> Result<Beat, String> {
        let mut conn = self.connection().await?;
        let hash = format!("{}{}", self.keys.node_prefix, self.member);
        let reads = entry
            .reads
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(HEARTBEAT)
            .arg(4)
            .arg(&self.keys.nodes)
            .arg(&hash)
            .arg(&self.keys.dead)
            .arg(&self.keys.epoch)
            .arg(&self.member)
            .arg(self.lease.as_millis() as u64)
            .arg(&self.keys.node_prefix)
            .arg(format!("{:016x}", rand::random::<u64>()))
            .arg("id")
            .arg(&entry.id)
            .arg("version")
            .arg(&entry.version)
            .arg("connections")
            .arg(entry.connections)
            .arg("started")
            .arg(entry.started)
            .arg("ready")
            .arg(if entry.ready { "1" } else { "0" })
            .arg("reads")
            .arg(reads)
            .arg("events")
            .arg(if entry.presence_events { "1" } else { "0" });
        if !self.shared.config.sharded {
            // This node publishes every ban it makes (`bans.rs`).
            cmd.arg("bans").arg(bans::BANS_PUSHED);
        }
        let command_timeout = self.shared.config.command_timeout;
        let failed = match timeout(command_timeout, conn.query::<Beat>(&cmd)).await {
            Ok(Ok(reads)) => return Ok(reads),
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {} ms", command_timeout.as_millis()),
        };
        self.conn.clear();
        Err(failed)
    }

    /// The registry's connection, opened when there is none of the
    /// subscriber's current epoch ([`Kept`]).
    async fn connection(&self) -> Result<PubConn, String> {
        let epoch = self.shared.epoch.current();
        if let Some(conn) = self.conn.get(epoch) {
            return Ok(conn);
        }
        let conn = open_command_connection(&self.link, &self.shared.config).await?;
        self.conn.set(conn.clone(), epoch);
        Ok(conn)
    }

    /// Every live node, from Redis.
    async fn read(&self) -> Result<Vec<NodeEntry>, BusError> {
        let unavailable = |why: String| BusError::Unavailable(format!("Redis unreachable: {why}"));
        // Without a connection (the heartbeat makes it) the reason is
        // said; with one of an older epoch, a new one is made.
        if !self.conn.is_some() {
            let why = self
                .why_down()
                .unwrap_or_else(|| "not connected to Redis yet".into());
            return Err(unavailable(why));
        }
        let mut conn = self.connection().await.map_err(unavailable)?;
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(READ)
            .arg(1)
            .arg(&self.keys.nodes)
            .arg(&self.keys.node_prefix);
        let command_timeout = self.shared.config.command_timeout;
        let hashes = match timeout(command_timeout, conn.query::<Vec<Vec<String>>>(&cmd)).await {
            Ok(Ok(hashes)) => hashes,
            Ok(Err(e)) => return Err(unavailable(e.to_string())),
            Err(_) => {
                return Err(unavailable(format!(
                    "no answer within {} ms",
                    command_timeout.as_millis()
                )));
            }
        };
        let mut nodes: Vec<NodeEntry> = hashes.iter().filter_map(|h| parse_entry(h)).collect();
        nodes.sort_by(|a, b| (&a.id, a.started).cmp(&(&b.id, b.started)));
        Ok(nodes)
    }

    /// Removes this node's entry (the bus is stopping), within the command
    /// timeout; if that fails, the entry expires with its lease.
    async fn leave(&self) {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(LEAVE)
            .arg(3)
            .arg(&self.keys.nodes)
            .arg(format!("{}{}", self.keys.node_prefix, self.member))
            .arg(&self.keys.dead)
            .arg(&self.member)
            .arg(self.leave_delay.as_millis() as u64);
        let command_timeout = self.shared.config.command_timeout;
        let left = timeout(command_timeout, async {
            let mut conn = self.connection().await?;
            conn.query::<i64>(&cmd).await.map_err(|e| e.to_string())
        })
        .await;
        match left {
            Ok(Ok(_)) => debug!("left the node registry"),
            Ok(Err(error)) => {
                warn!(%error, "could not remove this node from the node registry; it drops out when its lease passes");
            }
            Err(_) => {
                warn!(
                    "could not remove this node from the node registry in time; it drops out when its lease passes"
                );
            }
        }
        self.conn.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_shares_one_cluster_slot() {
        let keys = Keys::new("wshub");
        assert_eq!(keys.nodes, "{wshub:registry}:nodes");
        let slot = super::super::conn::slot_of(&keys.nodes);
        for member in ["n1:00ff", "a{b}c:1", "}{:2"] {
            let hash = format!("{}{member}", keys.node_prefix);
            assert_eq!(super::super::conn::slot_of(&hash), slot, "{hash}");
        }
    }

    #[test]
    fn entries_parse_and_incomplete_ones_do_not() {
        let fields = |pairs: &[(&str, &str)]| -> Vec<String> {
            pairs
                .iter()
                .flat_map(|(k, v)| [k.to_string(), v.to_string()])
                .collect()
        };
        let full = [
            ("id", "n1"),
            ("version", "0.1.0"),
            ("connections", "7"),
            ("started", "1764331200000"),
            ("ready", "1"),
            ("reads", "1,2"),
        ];
        let entry = parse_entry(&fields(&full)).unwrap();
        assert_eq!(entry.id, "n1");
        assert_eq!(entry.connections, 7);
        assert!(entry.ready);
        assert_eq!(entry.reads, [1, 2]);
        assert_eq!(parse_entry(&fields(&full[1..])), None, "no id");
        assert_eq!(parse_entry(&[]), None, "an expired hash");
        assert_eq!(parse_reads(""), None);
        assert_eq!(parse_reads("1,x"), None);
        assert_eq!(parse_reads("1"), Some(vec![1]));
    }
}
