//! The node registry: which nodes share this bus, each as of its last
//! heartbeat, and the version gate built on it.
//!
//! Every node keeps an entry (id, version, open sockets, start time,
//! readiness, and the bus payload versions it reads) with a lease: on Redis
//! it renews the entry every `presence.heartbeat_ms`, a node that stops
//! (SIGKILL, a partition) drops out of every answer once its lease of
//! `presence.lease_ms` has passed, and a node that shuts down removes its
//! entry itself as it exits. `GET /api/nodes` shows the registry, and later
//! cluster-wide features (presence, the server API) build on it.
//!
//! There are two implementations, like the buses themselves: [`Alone`]
//! (the single-node bus: this node, from memory) and the Redis bus's
//! (`src/bus/redis/registry.rs`). A bus hands out its registry with
//! [`Bus::registry`](super::Bus::registry); the node then
//! [joins](Registry::join) it with its [`Vitals`].
//!
//! **The version gate.** A node may write a newer bus payload version only
//! while every live node reads it. Each entry lists the versions its node
//! reads (`wire::READS`); the registry feeds what every live node reads
//! into the bus's [`VersionGate`] at each heartbeat, and the publisher asks
//! it ([`VersionGate::choose`]) for the version to write. The gate also
//! says whether every live node publishes its bans
//! ([`VersionGate::bans_pushed`]): only then may a node answer ban checks
//! from its own copy (`src/bus/redis/bans.rs`).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use super::BusError;
use super::wire;

/// What a node tells the registry about itself, read at every heartbeat.
/// The node implements it; the registry holds it weakly, so it never keeps
/// a node alive.
pub trait Vitals: Send + Sync + 'static {
    /// The node's id (`node_id`).
    fn id(&self) -> &str;
    /// Its open sockets.
    fn connections(&self) -> usize;
    /// Whether it answers `/readyz` with 200.
    fn ready(&self) -> bool;
    /// Whether it posts presence events to a backend (presence and
    /// `backend.events` on): a node that does not leaves dead nodes'
    /// sweeps to one that does (`src/bus/redis/presence.rs`).
    fn posts_presence_events(&self) -> bool {
        false
    }
}

/// One live node, as `GET /api/nodes` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeEntry {
    /// Its `node_id`.
    pub id: String,
    /// Its wshub version.
    pub version: String,
    /// Its open sockets, as of its last heartbeat.
    pub connections: u64,
    /// When it started, in milliseconds since the Unix epoch.
    pub started: u64,
    /// Whether it was ready at its last heartbeat.
    pub ready: bool,
    /// The bus payload versions it reads (for the version gate; not part
    /// of the API's answer).
    #[serde(skip)]
    pub reads: Vec<u32>,
    /// Whether it posts presence events to a backend (not part of the
    /// API's answer).
    #[serde(skip)]
    pub presence_events: bool,
}

impl NodeEntry {
    /// This build's entry for the node `vitals` describes, started at
    /// `started` (ms since the Unix epoch).
    pub fn of(vitals: &dyn Vitals, started: u64) -> Self {
        Self {
            id: vitals.id().to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            connections: vitals.connections() as u64,
            started,
            ready: vitals.ready(),
            reads: wire::READS.iter().map(|v| v.number()).collect(),
            presence_events: vitals.posts_presence_events(),
        }
    }
}

/// The answer of [`Registry::nodes`].
pub type Nodes<'a> = Pin<Box<dyn Future<Output = Result<Vec<NodeEntry>, BusError>> + Send + 'a>>;

/// A node registry; see the module docs.
pub trait Registry: Send + Sync + 'static {
    /// This node joins the registry: from now on its entry is kept, with
    /// `vitals` read at every heartbeat, until the bus shuts down (which
    /// removes it). Called once, by the node, once it is built; later calls
    /// do nothing.
    fn join(&self, vitals: Weak<dyn Vitals>);

    /// Every live node, this one included, sorted by id: each as of its
    /// last heartbeat, none whose lease has passed. Fails with
    /// [`BusError::Unavailable`] when the registry's service cannot be
    /// reached (the text says why).
    fn nodes(&self) -> Nodes<'_>;

    /// The version gate this registry keeps up to date.
    fn gate(&self) -> &VersionGate;

    /// Cluster presence and the per-user limit on these leases
    /// ([`super::presence`]); `None` for a registry that cannot hold them
    /// (a node alone, without Redis).
    fn presence(&self) -> Option<Arc<dyn super::presence::Store>> {
        None
    }
}

/// Whether every live node reads a payload version, as of the registry's
/// last look; see the module docs.
///
/// What it knows expires: a look older than the node lease is no longer
/// trusted (a node may have joined since), and the gate closes until the
/// next one. A closed gate allows no version; the publisher then writes its
/// baseline ([`choose`](Self::choose)).
///
/// Lock-free: the publisher asks on every publish. Versions 1 to 64 can be
/// gated; others are never allowed.
#[derive(Debug)]
pub struct VersionGate {
    /// Versions every live node reads: bit `n - 1` for version `n`.
    readable: AtomicU64,
    /// Whether every live node publishes its bans.
    bans: AtomicBool,
    /// Bumped by every look that does not continue an open, fresh gate
    /// for bans: a node's copy of the bans loaded before the bump may miss
    /// a ban made meanwhile by a node that does not publish its bans.
    bans_epoch: AtomicU64,
    /// Until when `readable` may be trusted: milliseconds since `base`,
    /// plus one; 0 = never (nothing known yet).
    until: AtomicU64,
    base: Instant,
}

impl Default for VersionGate {
    fn default() -> Self {
        Self::new()
    }
}

/// The bit of `version` (none for versions beyond 64).
fn bit(version: u32) -> u64 {
    match version {
        1..=64 => 1 << (version - 1),
        _ => 0,
    }
}

impl VersionGate {
    /// A gate that knows nothing yet: closed until the first
    /// [`observe`](Self::observe).
    pub fn new() -> Self {
        Self {
            readable: AtomicU64::new(0),
            bans: AtomicBool::new(false),
            bans_epoch: AtomicU64::new(0),
            until: AtomicU64::new(0),
            base: Instant::now(),
        }
    }

    /// The gate of a node that is alone: open, for good, for what this
    /// build reads.
    pub fn alone() -> Self {
        let gate = Self::new();
        let own = wire::READS.iter().map(|v| v.number()).collect::<Vec<_>>();
        gate.readable
            .store(own.iter().fold(0, |m, v| m | bit(*v)), Ordering::Release);
        gate.bans.store(true, Ordering::Release);
        gate.until.store(u64::MAX, Ordering::Release);
        gate
    }

    /// Records what the live nodes read, as of now: `live` holds one item
    /// per live node, `None` for a node whose versions are not known (which
    /// closes the gate: nothing is known to be readable by it). Trusted for
    /// `fresh_for` (the node lease).
    /// `bans_pushed`: whether every one of them publishes its bans.
    pub fn observe<'a>(
        &self,
        live: impl IntoIterator<Item = Option<&'a [u32]>>,
        bans_pushed: bool,
        fresh_for: Duration,
    ) {
        let mut readable = u64::MAX;
        for reads in live {
            readable &= reads.map_or(0, |r| r.iter().fold(0, |m, v| m | bit(*v)));
        }
        if !(bans_pushed && self.bans_pushed()) {
            self.bans_epoch.fetch_add(1, Ordering::AcqRel);
        }
        let until = Instant::now().saturating_duration_since(self.base) + fresh_for;
        // `readable` first: a reader that sees the new `until` (Acquire)
        // sees this `readable` too. One that sees the old `until` with the
        // new `readable` only has fresher news.
        self.readable.store(readable, Ordering::Release);
        self.bans.store(bans_pushed, Ordering::Release);
        self.until.store(
            u64::try_from(until.as_millis()).unwrap_or(u64::MAX - 1) + 1,
            Ordering::Release,
        );
    }

    /// Whether every live node reads payload version `version` (false when
    /// the gate knows nothing, or nothing recent).
    pub fn may_write(&self, version: u32) -> bool {
        self.fresh() && self.readable.load(Ordering::Acquire) & bit(version) != 0
    }

    /// Whether every live node publishes every ban it makes (false when
    /// the gate knows nothing, or nothing recent).
    pub fn bans_pushed(&self) -> bool {
        self.fresh() && self.bans.load(Ordering::Acquire)
    }

    /// Counts the looks that did not continue an open, fresh gate for
    /// bans ([`bans_pushed`](Self::bans_pushed)): while it stays the same
    /// and the gate open, every live node has published its bans all along.
    pub fn bans_epoch(&self) -> u64 {
        self.bans_epoch.load(Ordering::Acquire)
    }

    /// Whether the last look is recent enough to trust.
    fn fresh(&self) -> bool {
        let until = self.until.load(Ordering::Acquire);
        if until == 0 {
            return false;
        }
        let now = Instant::now()
            .saturating_duration_since(self.base)
            .as_millis();
        u128::from(until - 1) >= now
    }

    /// The version to write: the first of `writes` (newest first) that
    /// every live node reads, or else the last one, the baseline.
    ///
    /// # Panics
    ///
    /// When `writes` is empty (a build writes at least its baseline).
    pub fn choose<V: Copy>(&self, writes: &[V], number: impl Fn(V) -> u32) -> V {
        let (&baseline, newer) = writes.split_last().expect("at least a baseline version");
        newer
            .iter()
            .copied()
            .find(|v| self.may_write(number(*v)))
            .unwrap_or(baseline)
    }
}

/// The registry of a node that is alone (the single-node bus): the node
/// itself, read from memory at each call. Nothing is stored anywhere.
pub struct Alone {
    me: OnceLock<Weak<dyn Vitals>>,
    started: u64,
    gate: VersionGate,
}

impl Default for Alone {
    fn default() -> Self {
        Self::new()
    }
}

impl Alone {
    /// A registry for a node that starts now.
    pub fn new() -> Self {
        Self {
            me: OnceLock::new(),
            started: wire::now_ms(),
            gate: VersionGate::alone(),
        }
    }
}

impl Registry for Alone {
    fn join(&self, vitals: Weak<dyn Vitals>) {
        let _ = self.me.set(vitals);
    }

    fn nodes(&self) -> Nodes<'_> {
        let me = self.me.get().and_then(Weak::upgrade);
        let nodes = me
            .map(|me| vec![NodeEntry::of(&*me, self.started)])
            .unwrap_or_default();
        Box::pin(std::future::ready(Ok(nodes)))
    }

    fn gate(&self) -> &VersionGate {
        &self.gate
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum V {
        Three,
        Two,
        One,
    }

    fn number(v: V) -> u32 {
        match v {
            V::Three => 3,
            V::Two => 2,
            V::One => 1,
        }
    }

    const WRITES: &[V] = &[V::Three, V::Two, V::One];
    const LEASE: Duration = Duration::from_secs(10);

    #[tokio::test(start_paused = true)]
    async fn the_gate_allows_only_what_every_live_node_reads() {
        let gate = VersionGate::new();
        // Nothing known yet: closed, and the baseline is written.
        assert!(!gate.may_write(1));
        assert_eq!(gate.choose(WRITES, number), V::One);

        let (old, new, newest): (&[u32], &[u32], &[u32]) = (&[1], &[1, 2], &[1, 2, 3]);
        gate.observe([Some(new), Some(newest), Some(old)], false, LEASE);
        assert!(gate.may_write(1));
        assert!(!gate.may_write(2), "the old node cannot read 2");
        assert_eq!(gate.choose(WRITES, number), V::One);

        // The old node left: 2 is open, 3 is not (one node lacks it).
        gate.observe([Some(new), Some(newest)], false, LEASE);
        assert!(gate.may_write(2) && !gate.may_write(3));
        assert_eq!(gate.choose(WRITES, number), V::Two);

        gate.observe([Some(newest), Some(newest)], false, LEASE);
        assert_eq!(gate.choose(WRITES, number), V::Three);

        // A live node whose versions are unknown closes the gate.
        gate.observe([Some(newest), None], false, LEASE);
        assert!(!gate.may_write(1));
        assert_eq!(gate.choose(WRITES, number), V::One);

        // A node that dropped version 1 closes it for everyone.
        gate.observe([Some(newest), Some(&[2, 3])], false, LEASE);
        assert!(!gate.may_write(1) && gate.may_write(2));
        assert!(!gate.may_write(0) && !gate.may_write(65), "out of range");
    }

    #[tokio::test(start_paused = true)]
    async fn what_the_gate_knows_expires_with_the_lease() {
        let gate = VersionGate::new();
        let both: &[u32] = &[1, 2];
        assert!(!gate.bans_pushed(), "nothing known yet");
        gate.observe([Some(both)], true, LEASE);
        let epoch = gate.bans_epoch();
        tokio::time::advance(LEASE - Duration::from_millis(1)).await;
        assert!(gate.may_write(2) && gate.bans_pushed());
        gate.observe([Some(both)], true, LEASE);
        assert_eq!(gate.bans_epoch(), epoch, "open all along");
        tokio::time::advance(LEASE + Duration::from_millis(1)).await;
        assert!(
            !gate.may_write(2) && !gate.bans_pushed(),
            "a look older than the lease is not trusted"
        );
        assert_eq!(gate.choose(WRITES, number), V::One);
        gate.observe([Some(both)], true, LEASE);
        assert!(gate.may_write(2), "the next look opens it again");
        assert!(gate.bans_epoch() > epoch, "open again after a lapse");
        let epoch = gate.bans_epoch();
        gate.observe([Some(both)], false, LEASE);
        assert!(!gate.bans_pushed(), "a node that does not push its bans");
        gate.observe([Some(both)], true, LEASE);
        assert!(gate.bans_pushed() && gate.bans_epoch() > epoch);
    }

    #[test]
    fn this_build_reads_what_it_writes() {
        for v in wire::WRITES {
            assert!(wire::READS.contains(v), "{v:?} is written but not read");
        }
        assert!(!wire::WRITES.is_empty(), "a baseline is written");
        let baseline = wire::WRITES[wire::WRITES.len() - 1];
        assert_eq!(
            wire::VERSION_LINE,
            format!("wshub/{}\n", baseline.number()).as_bytes()
        );
        // Today: only version 1, whatever the gate says.
        let closed = VersionGate::new();
        assert_eq!(closed.choose(wire::WRITES, wire::Version::number), baseline);
    }

    struct Fake;
    impl Vitals for Fake {
        fn id(&self) -> &str {
            "solo"
        }
        fn connections(&self) -> usize {
            3
        }
        fn ready(&self) -> bool {
            true
        }
    }

    #[tokio::test]
    async fn alone_is_this_node_from_memory() {
        let registry = Alone::new();
        assert_eq!(registry.nodes().await.unwrap(), []);
        let me: Arc<dyn Vitals> = Arc::new(Fake);
        registry.join(Arc::downgrade(&me));
        let nodes = registry.nodes().await.unwrap();
        assert_eq!(nodes.len(), 1);
        assert_eq!((&*nodes[0].id, nodes[0].connections), ("solo", 3));
        assert!(nodes[0].ready);
        assert_eq!(nodes[0].version, env!("CARGO_PKG_VERSION"));
        let json = serde_json::to_value(&nodes[0]).unwrap();
        let keys: Vec<&String> = json.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["connections", "id", "ready", "started", "version"]);
        assert!(
            registry.gate().may_write(1),
            "alone, it reads what it writes"
        );
    }
}
