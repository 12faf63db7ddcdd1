//! Admission: whether this node takes one more socket. Its capacity
//! (`limits.max_connections`, or what the open-file limit allows, less a
//! reserve), whether it is *full*, the per-address limits (sockets held,
//! connects a second) and the address they count under.
//!
//! **Full.** A node that holds `capacity` sockets is full: `/readyz`
//! answers 503 with the reason, `wshub_connections_full` is 1, and one
//! warning is logged. It has room again (one info line) only once it is
//! down to [`Admission::room_at`], 1 % below its capacity, so a node
//! hovering at its limit does not flip its readiness (and its load
//! balancer's pool) with every socket that comes and goes. Upgrades are
//! refused (503) only at the capacity itself.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tracing::{info, warn};

use crate::metrics::Metrics;
use crate::outcome::RefusalReason;

/// Why a socket was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The node holds as many sockets as it may (`limits.max_connections`
    /// or the open-file limit).
    #[error("the node is at capacity ({0} sockets)")]
    AtCapacity(usize),
    /// This client address holds `limits.max_connections_per_ip` sockets.
    #[error("too many sockets from this address (at most {0})")]
    TooManyFromIp(usize),
    /// This client address connects faster than
    /// `limits.connects_per_second_per_ip` (beyond its burst).
    #[error(
        "too many connects from this address (at most {0} a second, after a burst of {1}); retry later"
    )]
    ConnectRate(u32, u32),
}

impl Refusal {
    /// The refusal's reason, for the answer's status and the metrics.
    pub(crate) fn reason(self) -> RefusalReason {
        match self {
            Self::AtCapacity(_) => RefusalReason::Capacity,
            Self::TooManyFromIp(_) => RefusalReason::PerIp,
            Self::ConnectRate(..) => RefusalReason::ConnectRate,
        }
    }
}

/// The per-address limits (`limits.max_connections_per_ip`,
/// `limits.connects_per_second_per_ip`, `limits.connect_burst_per_ip`),
/// each 0 when off, and the IPv6 network they count a client by.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PerAddress {
    pub(crate) max_sockets: usize,
    pub(crate) connects_per_second: u32,
    pub(crate) connect_burst: u32,
    pub(crate) ipv6_prefix_len: u8,
}

impl Default for PerAddress {
    fn default() -> Self {
        Self {
            max_sockets: 0,
            connects_per_second: 0,
            connect_burst: 1,
            ipv6_prefix_len: 64,
        }
    }
}

/// The node's socket places: how many it has, how many each client
/// address holds, and whether it is full.
///
/// `std::sync::Mutex` for the per-address map and the full state: each
/// critical section is a map operation or a comparison, and never awaits.
pub(crate) struct Admission {
    /// Sockets this node accepts.
    capacity: usize,
    /// A full node has room again at this many sockets or fewer.
    room_at: usize,
    /// Most sockets per client address; 0 = no limit.
    per_ip_max: usize,
    ipv6_prefix_len: u8,
    /// Sockets open or being opened (counted before the upgrade, so the
    /// capacity holds under a burst of connects).
    open: AtomicUsize,
    /// Sockets per client address, while the per-address limit is set.
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    /// Connects per client address, while that limit is set.
    connect_rate: Option<ConnectRate>,
    /// Whether the node is full. Changed only under `transition`, after
    /// reading `open` there, so the last change of `open` always decides
    /// the state; read without the lock by `/readyz`.
    full: AtomicBool,
    /// Serialises the full/room transitions (see [`settle`](Self::settle)).
    transition: Mutex<()>,
    metrics: Arc<Metrics>,
}

impl Admission {
    /// `capacity` sockets in all, and the per-address limits of
    /// `per_address`.
    pub(crate) fn new(
        capacity: usize,
        per_address: PerAddress,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        metrics.set_capacity(capacity);
        metrics.set_full(false);
        Arc::new(Self {
            capacity,
            room_at: room_at(capacity),
            per_ip_max: per_address.max_sockets,
            ipv6_prefix_len: per_address.ipv6_prefix_len,
            open: AtomicUsize::new(0),
            per_ip: Mutex::default(),
            connect_rate: ConnectRate::new(
                per_address.connects_per_second,
                per_address.connect_burst,
            ),
            full: AtomicBool::new(false),
            transition: Mutex::default(),
            metrics,
        })
    }

    /// Takes a place for a new socket, or says why there is none. The place
    /// is given back when the [`Slot`] is dropped.
    pub(crate) fn reserve(self: &Arc<Self>, ip: Option<IpAddr>) -> Result<Slot, Refusal> {
        if self.open.fetch_add(1, Ordering::AcqRel) >= self.capacity {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return Err(Refusal::AtCapacity(self.capacity));
        }
        let mut slot = Slot {
            admission: self.clone(),
            ip: None,
        };
        if let (Some(ip), true) = (ip, self.per_ip_max > 0) {
            // Counted per IPv6 network (`limits.ipv6_prefix_len`), not per
            // address: one IPv6 host holds a whole /64.
            let ip = address_key(ip, self.ipv6_prefix_len);
            let mut counts = self.per_ip.lock().unwrap_or_else(|e| e.into_inner());
            let n = counts.entry(ip).or_default();
            if *n >= self.per_ip_max {
                // Not settled here: the slot's drop settles, and a place
                // taken and given back at once must not log "full".
                return Err(Refusal::TooManyFromIp(self.per_ip_max));
            }
            *n += 1;
            slot.ip = Some(ip);
        }
        self.settle();
        Ok(slot)
    }

    /// Counts a connect from `ip` against `limits.connects_per_second_per_ip`
    /// (nothing when it is off or the address is not known), or says it is
    /// over. Asked for every upgrade before anything else is done for it,
    /// so refused and failing connects count too.
    pub(crate) fn connect(&self, ip: Option<IpAddr>, now: Instant) -> Result<(), Refusal> {
        match (&self.connect_rate, ip) {
            (Some(rate), Some(ip)) => rate.connect(address_key(ip, self.ipv6_prefix_len), now),
            _ => Ok(()),
        }
    }

    /// Why the node is not ready because it is full, while it is (for
    /// `/readyz`, in the format of its other reasons).
    pub(crate) fn full_reason(&self) -> Option<String> {
        if !self.full.load(Ordering::Acquire) {
            return None;
        }
        Some(format!(
            "full: {} of {} sockets (limits.max_connections, or the open-file limit less a reserve); \
             ready again at {} sockets or fewer",
            self.open.load(Ordering::Acquire).min(self.capacity),
            self.capacity,
            self.room_at
        ))
    }

    /// A full node has room again at this many sockets or fewer.
    #[cfg(test)]
    pub(crate) fn room_at(&self) -> usize {
        self.room_at
    }

    /// Brings the full state up to date with `open`, after every place
    /// taken or given back: full at the capacity, room again at
    /// `room_at`. `open` is read under the lock, so whichever change
    /// settles last decides, and two racing changes cannot leave the node
    /// marked full with room (or the reverse). Logged after the lock is
    /// released (a log write can block); each line carries the count.
    fn settle(&self) {
        let changed = {
            let _transition = self.transition.lock().unwrap_or_else(|e| e.into_inner());
            let open = self.open.load(Ordering::Acquire);
            let full = self.full.load(Ordering::Acquire);
            let now = if full {
                open > self.room_at
            } else {
                open >= self.capacity
            };
            if now != full {
                self.full.store(now, Ordering::Release);
                self.metrics.set_full(now);
                Some((now, open))
            } else {
                None
            }
        };
        match changed {
            Some((true, open)) => warn!(
                open,
                capacity = self.capacity,
                room_at = self.room_at,
                "node full: new sockets are refused with 503 and /readyz answers 503 until it has room"
            ),
            Some((false, open)) => info!(
                open,
                capacity = self.capacity,
                "node has room again: accepting sockets, /readyz ready"
            ),
            None => {}
        }
    }
}

/// Where a full node of `capacity` has room again: 1 % below it, at least
/// one socket below.
fn room_at(capacity: usize) -> usize {
    capacity.saturating_sub((capacity / 100).max(1))
}

/// A place in the node's capacity; dropping it gives the place back.
pub(crate) struct Slot {
    admission: Arc<Admission>,
    /// Counted against this address, when per-address limits are on.
    ip: Option<IpAddr>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let admission = &self.admission;
        admission.open.fetch_sub(1, Ordering::AcqRel);
        if let Some(ip) = self.ip {
            let mut counts = admission.per_ip.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(n) = counts.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    counts.remove(&ip);
                }
            }
        }
        admission.settle();
    }
}

/// Addresses the connect rate keeps a state for at most: 40 bytes each in
/// a table of twice as many slots, about 5 MiB in all (given back once
/// they fall idle). A burst of new addresses beyond it is let through
/// unlimited (and logged) until the next sweep frees room: the limit is one
/// address's, and one client holding this many addresses is past what a
/// per-address limit can stop; refusing new addresses instead would turn
/// such a flood into one against everybody.
const MAX_TRACKED: usize = 65_536;

/// How often the connect rate forgets the addresses it no longer needs
/// (each sweep is one pass over at most [`MAX_TRACKED`] entries).
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// `limits.connects_per_second_per_ip`: a token bucket per client address,
/// kept as the time its bucket will be full again (the generic cell rate
/// algorithm): a connect at `now` is allowed when that time is at most
/// `burst - 1` intervals ahead of `now`, and moves it one interval on. An
/// address whose time has passed is the same as one never seen, so it is
/// forgotten at the next sweep: the table holds only the addresses that
/// connected within the last `burst` intervals.
///
/// One node's count: behind a balancer that spreads connects over `n`
/// nodes an address may connect up to `n` times the rate in all. A
/// cluster-wide count would cost a Redis round trip per connect.
struct ConnectRate {
    per_second: u32,
    burst: u32,
    /// Time between two connects at the sustained rate.
    interval: Duration,
    /// How far ahead of now an address's time may be and still connect.
    tolerance: Duration,
    table: Mutex<RateTable>,
}

struct RateTable {
    /// When each address's bucket is full again.
    full_at: HashMap<IpAddr, Instant>,
    swept: Option<Instant>,
    /// Whether the table's overflow was logged since it last had room.
    overflow_logged: bool,
}

impl ConnectRate {
    /// `None` when `per_second` is 0 (no limit).
    fn new(per_second: u32, burst: u32) -> Option<Self> {
        let burst = burst.max(1);
        (per_second > 0).then(|| {
            let interval = Duration::from_secs(1) / per_second;
            Self {
                per_second,
                burst,
                interval,
                tolerance: interval * (burst - 1),
                table: Mutex::new(RateTable {
                    full_at: HashMap::new(),
                    swept: None,
                    overflow_logged: false,
                }),
            }
        })
    }

    fn connect(&self, key: IpAddr, now: Instant) -> Result<(), Refusal> {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        if table
            .swept
            .is_none_or(|swept| now.saturating_duration_since(swept) >= SWEEP_EVERY)
        {
            table.full_at.retain(|_, full_at| *full_at > now);
            if table.full_at.capacity() > 4 * table.full_at.len().max(1024) {
                // Give back what a burst of addresses grew.
                let keep = 2 * table.full_at.len();
                table.full_at.shrink_to(keep);
            }
            table.swept = Some(now);
            if table.full_at.len() < MAX_TRACKED {
                table.overflow_logged = false;
            }
        }
        let tracked = table.full_at.len();
        match table.full_at.get_mut(&key) {
            Some(full_at) => {
                let from = (*full_at).max(now);
                if from.saturating_duration_since(now) > self.tolerance {
                    return Err(Refusal::ConnectRate(self.per_second, self.burst));
                }
                *full_at = from + self.interval;
            }
            None if tracked < MAX_TRACKED => {
                table.full_at.insert(key, now + self.interval);
            }
            None => {
                if !std::mem::replace(&mut table.overflow_logged, true) {
                    drop(table);
                    warn!(
                        tracked,
                        "limits.connects_per_second_per_ip: more addresses connecting than the \
                         node keeps count of; new ones are not limited until some fall idle"
                    );
                }
            }
        }
        Ok(())
    }
}

/// What the per-address limits count a client address under: an
/// IPv4 address (an IPv4-mapped IPv6 address is the IPv4 address it maps),
/// or the IPv6 network of `ipv6_prefix_len` bits that contains it. One
/// IPv6 host is usually given a whole /64, so counting full addresses would
/// let it open sockets from as many addresses as it likes.
pub(crate) fn address_key(ip: IpAddr, ipv6_prefix_len: u8) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => {
            let len = u32::from(ipv6_prefix_len.min(128));
            let mask = u128::MAX.checked_shl(128 - len).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
        }
    }
}

/// Open HTTP connections per peer address (`limits.max_http_connections_per_ip`):
/// counted from the accept until the connection ends or becomes a socket
/// (hyper's connection future ends at the upgrade), so a request being
/// read or answered, an idle keep-alive and an upgrade not yet answered
/// all count, and the sockets themselves do not (they have
/// `limits.max_connections_per_ip`). The per-socket limits count only
/// upgrades, so one address opening TCP connections that never finish a
/// request (each held up to `http.header_read_timeout_ms`) could take
/// every descriptor the node has, `/healthz` included (review of
/// 2026-12-02). Keyed by the peer address as [`address_key`] keys it (no
/// `X-Forwarded-For`: nothing is read yet); peers in
/// `auth.trusted_proxies` are not counted, since every client behind
/// them shares their address. The table holds only addresses with an
/// open connection, so it is bounded by the open-file limit.
pub(crate) struct HttpConnections {
    limit: usize,
    ipv6_prefix_len: u8,
    trusted: Vec<ipnet::IpNet>,
    open: Mutex<HashMap<IpAddr, usize>>,
    metrics: Arc<Metrics>,
    /// When a refusal was last logged (at most one line every 10 s).
    logged: Mutex<Option<Instant>>,
}

/// One counted HTTP connection; uncounted when dropped.
pub(crate) struct HttpSlot {
    owner: Arc<HttpConnections>,
    key: IpAddr,
}

impl HttpConnections {
    pub(crate) fn new(
        limit: usize,
        ipv6_prefix_len: u8,
        trusted: Vec<ipnet::IpNet>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(Self {
            limit,
            ipv6_prefix_len,
            trusted,
            open: Mutex::new(HashMap::new()),
            metrics,
            logged: Mutex::new(None),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
        // Counts only: never inconsistent, ignore poisoning.
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a new connection from `peer`: `Ok(None)` when uncounted (no
    /// limit, or a trusted proxy), `Err` when the address holds the limit
    /// already (counted in `wshub_connections_refused_total{reason="http_per_ip"}`,
    /// logged at most every 10 s).
    pub(crate) fn admit(self: &Arc<Self>, peer: IpAddr) -> Result<Option<HttpSlot>, ()> {
        // An IPv4 client of a `[::]` listener arrives as `::ffff:a.b.c.d`:
        // matched against the proxies' networks as the IPv4 address it is
        // (a review saw a trusted IPv4 proxy counted on a dual-stack
        // listener, and refused).
        if self.limit == 0 {
            return Ok(None);
        }
        let peer = peer.to_canonical();
        if self.trusted.iter().any(|net| net.contains(&peer)) {
            return Ok(None);
        }
        let key = address_key(peer, self.ipv6_prefix_len);
        {
            let mut open = self.lock();
            let n = open.entry(key).or_insert(0);
            if *n < self.limit {
                *n += 1;
                return Ok(Some(HttpSlot {
                    owner: self.clone(),
                    key,
                }));
            }
        }
        self.metrics.refused(RefusalReason::HttpPerIp);
        let mut logged = self.logged.lock().unwrap_or_else(|e| e.into_inner());
        if logged.is_none_or(|at| at.elapsed() > Duration::from_secs(10)) {
            *logged = Some(Instant::now());
            warn!(address = %key, limit = self.limit,
                "an address holds limits.max_http_connections_per_ip HTTP connections: its new ones are closed at once with a 429 (logged at most every 10 s; see wshub_connections_refused_total{{reason=\"http_per_ip\"}})");
        }
        Err(())
    }
}

impl Drop for HttpSlot {
    fn drop(&mut self) {
        let mut open = self.owner.lock();
        if let Some(n) = open.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

/// This process's open-file limits (`RLIMIT_NOFILE`); `None` is
/// unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FileLimits {
    /// The soft limit: what the process may open now.
    pub(crate) soft: Option<u64>,
    /// The hard limit: what the soft limit may be raised to.
    pub(crate) hard: Option<u64>,
}

/// The open-file limits of this process (`None` where there are none to
/// read: not Unix).
pub(crate) fn file_limits() -> Option<FileLimits> {
    #[cfg(unix)]
    {
        use rustix::process::{Resource, getrlimit};
        let limit = getrlimit(Resource::Nofile);
        Some(FileLimits {
            soft: limit.current,
            hard: limit.maximum,
        })
    }
    #[cfg(not(unix))]
    None
}

/// The soft open-file limit of this process, when it has one.
pub(crate) fn open_file_limit() -> Option<u64> {
    file_limits().and_then(|l| l.soft)
}

/// Raises the soft open-file limit to the hard one, as Go's runtime and
/// many servers do at start: each socket is a file, and a soft limit of
/// 1,024 (common) would cap the node far below what the system allows.
/// `limits.max_connections` is the way to hold fewer. Returns the limits
/// before and after (equal when there was nothing to raise).
///
/// An unlimited hard limit is not copied to the soft one (Linux refuses
/// it for open files above `fs.nr_open`): the soft limit is raised to
/// 1,048,576 (Linux's default `nr_open`) then.
pub(crate) fn raise_open_file_limit() -> std::io::Result<(FileLimits, FileLimits)> {
    #[cfg(unix)]
    {
        use rustix::process::{Resource, Rlimit, setrlimit};
        let Some(before) = file_limits() else {
            return Err(std::io::Error::other("no open-file limit to read"));
        };
        let target = before.hard.unwrap_or(1 << 20);
        if before.soft.is_some_and(|soft| soft < target) {
            setrlimit(
                Resource::Nofile,
                Rlimit {
                    current: Some(target),
                    maximum: before.hard,
                },
            )?;
        }
        let after = file_limits().unwrap_or(before);
        Ok((before, after))
    }
    #[cfg(not(unix))]
    Err(std::io::Error::other("no open-file limit on this platform"))
}

/// File descriptors kept for everything but sockets when the capacity
/// comes from the open-file limit: the listener, the runtime's own,
/// Redis connections (three per node, more on a Redis Cluster: a few per
/// shard), HTTP requests that are not sockets (`/readyz`, `/metrics`,
/// refused upgrades, pushes) and files. The backend's connections
/// (`backend.concurrency`) are reserved on top.
pub(crate) const RESERVED_FDS: u64 = 128;

/// The sockets a node can hold: `configured`, or (0) what the open-file
/// limit allows after `reserved` descriptors for everything else. Returns
/// the capacity and whether the limit decided it.
pub(crate) fn capacity(configured: usize, fd_limit: Option<u64>, reserved: u64) -> (usize, bool) {
    let by_fds = fd_limit.map(|l| l.saturating_sub(reserved).max(16) as usize);
    match (configured, by_fds) {
        (0, Some(f)) => (f, true),
        (0, None) => (usize::MAX, false),
        (c, Some(f)) if f < c => (f, true),
        (c, _) => (c, false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_keys() {
        let key = |ip: &str, len| address_key(ip.parse().unwrap(), len).to_string();
        assert_eq!(key("2001:db8:1:2:3:4:5:6", 64), "2001:db8:1:2::");
        assert_eq!(key("2001:db8:1:2:3:4:5:6", 48), "2001:db8:1::");
        assert_eq!(key("2001:db8:1:2:3:4:5:6", 128), "2001:db8:1:2:3:4:5:6");
        assert_eq!(key("::ffff:192.0.2.7", 64), "192.0.2.7");
        assert_eq!(key("192.0.2.7", 64), "192.0.2.7");
        assert_eq!(key("::1", 64), "::");
    }

    #[test]
    fn http_connections_are_counted_per_address_and_trusted_proxies_are_not() {
        let metrics = Arc::new(Metrics::new());
        let trusted = vec!["10.0.0.0/24".parse().unwrap()];
        let table = HttpConnections::new(2, 64, trusted, metrics);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let a = [
            table.admit(ip("192.0.2.1")).unwrap(),
            table.admit(ip("::ffff:192.0.2.1")).unwrap(),
        ];
        assert!(a.iter().all(Option::is_some));
        assert!(
            table.admit(ip("192.0.2.1")).is_err(),
            "the same address, mapped or not"
        );
        // The same /64 is one client; another is not.
        let _b = [
            table.admit(ip("2001:db8::1")).unwrap(),
            table.admit(ip("2001:db8::2")).unwrap(),
        ];
        assert!(table.admit(ip("2001:db8::3")).is_err());
        let other = table.admit(ip("2001:db8:1::1")).unwrap();
        assert!(other.is_some());
        // A trusted proxy, also as seen by a dual-stack listener.
        for _ in 0..5 {
            assert!(table.admit(ip("10.0.0.7")).unwrap().is_none());
            assert!(table.admit(ip("::ffff:10.0.0.7")).unwrap().is_none());
        }
        // A closed connection frees its place; the table forgets idle
        // addresses.
        drop(a);
        let again = table.admit(ip("192.0.2.1")).unwrap();
        assert!(again.is_some());
        drop(other);
        let open = table.lock().clone();
        assert_eq!(open.len(), 2, "{open:?}");
    }

    #[test]
    fn capacity_from_the_fd_limit() {
        assert_eq!(capacity(0, Some(20_000), 128), (19_872, true));
        assert_eq!(capacity(0, Some(20_000), 192), (19_808, true));
        assert_eq!(capacity(5_000, Some(20_000), 128), (5_000, false));
        assert_eq!(capacity(50_000, Some(20_000), 128), (19_872, true));
        assert_eq!(capacity(0, None, 128), (usize::MAX, false));
        assert_eq!(capacity(0, Some(100), 128), (16, true));
        assert!(open_file_limit().is_some_and(|l| l > 0));
    }

    /// Full at the capacity, room again only 1 % below it (at least one
    /// socket below), whatever order places are taken and given back in.
    #[test]
    fn full_at_capacity_with_room_again_below_it() {
        assert_eq!(room_at(1), 0);
        assert_eq!(room_at(3), 2);
        assert_eq!(room_at(19_872), 19_674);
        let metrics = Arc::new(Metrics::new());
        let admission = Admission::new(200, PerAddress::default(), metrics.clone());
        assert_eq!(admission.room_at(), 198);
        let mut slots: Vec<Slot> = (0..199).map(|_| admission.reserve(None).unwrap()).collect();
        assert!(admission.full_reason().is_none(), "199 of 200");
        slots.push(admission.reserve(None).unwrap());
        let why = admission.full_reason().expect("200 of 200 is full");
        assert!(why.starts_with("full: 200 of 200 sockets"), "{why}");
        assert!(matches!(
            admission.reserve(None),
            Err(Refusal::AtCapacity(200))
        ));
        assert!(metrics.render().contains("wshub_connections_full 1"));
        slots.pop();
        assert!(admission.full_reason().is_some(), "199: still full");
        slots.pop();
        assert!(admission.full_reason().is_none(), "198: room again");
        assert!(metrics.render().contains("wshub_connections_full 0"));
        slots.push(admission.reserve(None).unwrap());
        assert!(admission.full_reason().is_none(), "199: not full again");
    }

    /// The connect rate: a burst, then one connect per interval; each
    /// address (an IPv6 client by its network) on its own; a refused
    /// connect does not use up the budget; an idle address is forgotten.
    #[test]
    fn connects_per_address_are_limited_to_the_rate_after_a_burst() {
        let per_address = PerAddress {
            connects_per_second: 4,
            connect_burst: 3,
            ..PerAddress::default()
        };
        let admission = Admission::new(100, per_address, Arc::new(Metrics::new()));
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2::a".parse().unwrap();
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(admission.connect(Some(a), t0), Ok(()));
        }
        for _ in 0..5 {
            assert_eq!(
                admission.connect(Some(a), t0),
                Err(Refusal::ConnectRate(4, 3))
            );
        }
        // Another address, and connects of unknown origin, are not limited.
        assert_eq!(admission.connect(Some(b), t0), Ok(()));
        assert_eq!(admission.connect(None, t0), Ok(()));
        // The same /64 is the same client.
        let b2: IpAddr = "2001:db8:1:2:ffff::1".parse().unwrap();
        assert_eq!(admission.connect(Some(b2), t0), Ok(()));
        assert_eq!(admission.connect(Some(b2), t0), Ok(()));
        assert!(admission.connect(Some(b), t0).is_err());
        // One interval (250 ms) later: exactly one more, refusals or not.
        let t1 = t0 + Duration::from_millis(250);
        assert_eq!(admission.connect(Some(a), t1), Ok(()));
        assert!(admission.connect(Some(a), t1).is_err());
        // Idle for a burst's worth of intervals: a whole burst again, and
        // the sweep has forgotten both addresses.
        let t2 = t1 + Duration::from_secs(2);
        assert_eq!(admission.connect(Some(a), t2), Ok(()));
        let table = admission
            .connect_rate
            .as_ref()
            .unwrap()
            .table
            .lock()
            .unwrap();
        assert_eq!(table.full_at.len(), 1, "only the address just seen");
    }

    /// Off (0), the limit refuses nothing; a burst of 0 is one connect.
    #[test]
    fn a_connect_rate_of_zero_is_off_and_a_burst_of_zero_is_one() {
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let now = Instant::now();
        let off = Admission::new(100, PerAddress::default(), Arc::new(Metrics::new()));
        assert!((0..1_000).all(|_| off.connect(Some(ip), now).is_ok()));
        let one = Admission::new(
            100,
            PerAddress {
                connects_per_second: 1,
                connect_burst: 0,
                ..PerAddress::default()
            },
            Arc::new(Metrics::new()),
        );
        assert_eq!(one.connect(Some(ip), now), Ok(()));
        assert_eq!(one.connect(Some(ip), now), Err(Refusal::ConnectRate(1, 1)));
    }

    /// The table is bounded: past `MAX_TRACKED` addresses new ones are let
    /// through without a state, the known ones stay limited, and once the
    /// sweep frees room new addresses are counted again.
    #[test]
    fn the_connect_rate_table_is_bounded() {
        let per_address = PerAddress {
            connects_per_second: 1,
            connect_burst: 1,
            ..PerAddress::default()
        };
        let admission = Admission::new(100, per_address, Arc::new(Metrics::new()));
        let ip = |n: u32| IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + n));
        let t0 = Instant::now();
        for n in 0..MAX_TRACKED as u32 {
            assert_eq!(admission.connect(Some(ip(n)), t0), Ok(()));
        }
        let len = || {
            admission
                .connect_rate
                .as_ref()
                .unwrap()
                .table
                .lock()
                .unwrap()
                .full_at
                .len()
        };
        assert_eq!(len(), MAX_TRACKED);
        let new = ip(MAX_TRACKED as u32);
        assert_eq!(admission.connect(Some(new), t0), Ok(()));
        assert_eq!(
            admission.connect(Some(new), t0),
            Ok(()),
            "not tracked: not limited"
        );
        assert_eq!(len(), MAX_TRACKED);
        assert!(
            admission.connect(Some(ip(7)), t0).is_err(),
            "a known one still is"
        );
        // A second later every bucket is full again: the sweep empties the
        // table, and the new address is counted.
        let t1 = t0 + SWEEP_EVERY;
        assert_eq!(admission.connect(Some(new), t1), Ok(()));
        assert!(admission.connect(Some(new), t1).is_err());
        assert_eq!(len(), 1);
        let rate = admission.connect_rate.as_ref().unwrap();
        let capacity = rate.table.lock().unwrap().full_at.capacity();
        assert!(capacity < 1024, "the burst's table given back: {capacity}");
    }

    /// Places taken and given back from many threads at once leave the
    /// state the final count says.
    #[test]
    fn racing_places_settle_on_the_final_count() {
        let admission = Admission::new(4, PerAddress::default(), Arc::new(Metrics::new()));
        for _ in 0..50 {
            std::thread::scope(|s| {
                for _ in 0..4 {
                    s.spawn(|| {
                        for _ in 0..200 {
                            drop(admission.reserve(None));
                        }
                    });
                }
            });
            assert!(admission.full_reason().is_none(), "all given back");
        }
        let held: Vec<_> = (0..4).map(|_| admission.reserve(None).unwrap()).collect();
        assert!(admission.full_reason().is_some());
        drop(held);
        assert!(admission.full_reason().is_none());
    }
}
