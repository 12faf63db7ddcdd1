//! Per-connection message rate limiting, the node's socket capacity, the
//! key of the per-address limit, and the smallest outbound queue.

use std::net::{IpAddr, Ipv6Addr};

use tokio::time::Instant;

use crate::config::Limits;

/// What the rate limiter says about one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    /// Over the rate: refuse this message, tell the sender.
    Limited,
    /// Over the rate persistently: close the socket with 1008.
    Abusive,
}

/// A token bucket: `rate` messages per second sustained, `burst` at once.
///
/// Every refused message adds a violation and every allowed one takes one
/// away; at `close_after` violations the sender is abusive. A client that
/// bursts now and then is only told; one that keeps flooding is closed.
#[derive(Debug)]
pub struct RateLimit {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
    violations: u32,
    close_after: u32,
}

impl RateLimit {
    /// `None` when `rate` is 0 (no limit).
    pub fn new(rate: u32, burst: u32, close_after: u32) -> Option<Self> {
        (rate > 0).then(|| Self {
            rate: f64::from(rate),
            burst: f64::from(burst.max(1)),
            tokens: f64::from(burst.max(1)),
            last: Instant::now(),
            violations: 0,
            close_after: close_after.max(1),
        })
    }

    pub fn check(&mut self, now: Instant) -> Verdict {
        let elapsed = now.saturating_duration_since(self.last);
        self.last = now;
        self.tokens = (self.tokens + elapsed.as_secs_f64() * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            self.violations = self.violations.saturating_sub(1);
            return Verdict::Allowed;
        }
        self.violations += 1;
        if self.violations >= self.close_after {
            Verdict::Abusive
        } else {
            Verdict::Limited
        }
    }
}

/// What `limits.max_connections_per_ip` counts a client address under: an
/// IPv4 address (an IPv4-mapped IPv6 address is the IPv4 address it maps),
/// or the IPv6 network of `ipv6_prefix_len` bits that contains it. One
/// IPv6 host is usually given a whole /64, so counting full addresses would
/// let it open sockets from as many addresses as it likes.
pub fn address_key(ip: IpAddr, ipv6_prefix_len: u8) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => {
            let len = u32::from(ipv6_prefix_len.min(128));
            let mask = u128::MAX.checked_shl(128 - len).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
        }
    }
}

/// The smallest acceptable `limits.outbound_queue_bytes`: room for the
/// largest frame one message can become, plus the queue's per-frame
/// overhead ([`crate::hub::FRAME_OVERHEAD`]).
pub fn min_outbound_queue_bytes(limits: &Limits) -> usize {
    let message = crate::message::MessageLimits {
        max_id_bytes: limits.max_id_bytes,
        max_recipients: limits.max_recipients,
    };
    crate::message::max_frame_bytes(limits.max_message_bytes, &message)
        .saturating_add(crate::hub::FRAME_OVERHEAD)
}

/// The soft open-file limit of this process (Linux: `/proc/self/limits`).
pub fn open_file_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// File descriptors kept for everything but sockets: listener, Redis,
/// backend connections, files.
pub const RESERVED_FDS: u64 = 64;

/// The sockets a node can hold: `configured`, or (0) what the open-file
/// limit allows. Returns the capacity and whether the limit decided it.
pub fn capacity(configured: usize, fd_limit: Option<u64>) -> (usize, bool) {
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
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn bursts_then_limits_then_closes_persistent_abuse() {
        let mut rl = RateLimit::new(2, 3, 4).unwrap();
        let now = Instant::now();
        for _ in 0..3 {
            assert_eq!(rl.check(now), Verdict::Allowed);
        }
        assert_eq!(rl.check(now), Verdict::Limited);
        // Half a second later one token has come back.
        let later = now + Duration::from_millis(500);
        assert_eq!(rl.check(later), Verdict::Allowed);
        for _ in 0..3 {
            assert_eq!(rl.check(later), Verdict::Limited);
        }
        assert_eq!(rl.check(later), Verdict::Abusive);
    }

    #[tokio::test(start_paused = true)]
    async fn an_occasional_burst_is_forgiven() {
        let mut rl = RateLimit::new(10, 1, 3).unwrap();
        let mut now = Instant::now();
        for _ in 0..100 {
            assert_eq!(rl.check(now), Verdict::Allowed);
            assert_eq!(rl.check(now), Verdict::Limited);
            now += Duration::from_millis(200);
        }
    }

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
        assert!(RateLimit::new(0, 10, 10).is_none());
        assert!(open_file_limit().is_some_and(|l| l > 0));
    }
}
