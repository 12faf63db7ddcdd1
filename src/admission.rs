//! Admission: whether this node takes one more socket. Its capacity
//! (`limits.max_connections`, or what the open-file limit allows), and the
//! per-address limit and the address it counts under.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

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
}

/// The node's socket places: how many it has, and how many each client
/// address holds.
///
/// `std::sync::Mutex` for the per-address map: each critical section is one
/// map operation and never awaits.
#[derive(Debug)]
pub(crate) struct Admission {
    /// Sockets this node accepts.
    capacity: usize,
    /// Most sockets per client address; 0 = no limit.
    per_ip_max: usize,
    ipv6_prefix_len: u8,
    /// Sockets open or being opened (counted before the upgrade, so the
    /// capacity holds under a burst of connects).
    open: AtomicUsize,
    /// Sockets per client address, while the per-address limit is set.
    per_ip: Mutex<HashMap<IpAddr, usize>>,
}

impl Admission {
    /// `capacity` sockets in all, at most `per_ip_max` per client address
    /// (0: no limit), IPv6 addresses counted per `ipv6_prefix_len` network.
    pub(crate) fn new(capacity: usize, per_ip_max: usize, ipv6_prefix_len: u8) -> Arc<Self> {
        Arc::new(Self {
            capacity,
            per_ip_max,
            ipv6_prefix_len,
            open: AtomicUsize::new(0),
            per_ip: Mutex::default(),
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
                return Err(Refusal::TooManyFromIp(self.per_ip_max));
            }
            *n += 1;
            slot.ip = Some(ip);
        }
        Ok(slot)
    }
}

/// A place in the node's capacity; dropping it gives the place back.
#[derive(Debug)]
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
    }
}

/// What `limits.max_connections_per_ip` counts a client address under: an
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

/// The soft open-file limit of this process (Linux: `/proc/self/limits`).
pub(crate) fn open_file_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// File descriptors kept for everything but sockets: listener, Redis,
/// backend connections, files.
pub(crate) const RESERVED_FDS: u64 = 64;

/// The sockets a node can hold: `configured`, or (0) what the open-file
/// limit allows. Returns the capacity and whether the limit decided it.
pub(crate) fn capacity(configured: usize, fd_limit: Option<u64>) -> (usize, bool) {
    let by_fds = fd_limit.map(|l| l.saturating_sub(RESERVED_FDS).max(16) as usize);
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
    fn capacity_from_the_fd_limit() {
        assert_eq!(capacity(0, Some(20_000)), (19_936, true));
        assert_eq!(capacity(5_000, Some(20_000)), (5_000, false));
        assert_eq!(capacity(50_000, Some(20_000)), (19_936, true));
        assert_eq!(capacity(0, None), (usize::MAX, false));
        assert!(open_file_limit().is_some_and(|l| l > 0));
    }
}
