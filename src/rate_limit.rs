//! Per-connection rate limiting: token buckets that tell a client that
//! bursts, and close one that keeps flooding.
//!
//! Two budgets per socket, one violation count: messages (every frame,
//! pings and pongs included) and fan-out bytes (a published message's
//! encoded size × its targets, what it costs on Redis). The byte budget
//! exists because a message count alone let four sockets within 50 msg/s
//! put ~190 MB/s on one node's subscriber, which Redis then disconnected
//! for its pub/sub output-buffer limit, silently losing an innocent user's
//! messages (issue 11 item 3).

use tokio::time::Instant;

use crate::config::Limits;

/// What the rate limiter says about one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    Allowed,
    /// Over the rate: refuse this message, tell the sender.
    Limited,
    /// Over the rate persistently: close the socket with 1008.
    Abusive,
}

/// A token bucket: `rate` units per second sustained, `burst` at once.
#[derive(Debug)]
struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    /// `None` when `rate` is 0 (no limit).
    fn new(rate: u64, burst: u64) -> Option<Self> {
        (rate > 0).then(|| Self {
            rate: rate as f64,
            burst: burst.max(1) as f64,
            tokens: burst.max(1) as f64,
            last: Instant::now(),
        })
    }

    /// Takes `cost` tokens if there are that many.
    fn take(&mut self, now: Instant, cost: f64) -> bool {
        let elapsed = now.saturating_duration_since(self.last);
        self.last = now;
        self.tokens = (self.tokens + elapsed.as_secs_f64() * self.rate).min(self.burst);
        if self.tokens >= cost {
            self.tokens -= cost;
            true
        } else {
            false
        }
    }
}

/// One socket's limits.
///
/// Every refused message adds a violation and every allowed one takes one
/// away; at `close_after` violations the sender is abusive. A client that
/// bursts now and then is only told; one that keeps flooding is closed.
/// A message is allowed by [`check`](Self::check) (its count) and, when it
/// is published, by [`check_bytes`](Self::check_bytes) (its fan-out); one
/// refused for its bytes counts as one violation, like one refused for the
/// count, so a sender that keeps publishing too many bytes is closed too.
#[derive(Debug)]
pub(crate) struct RateLimit {
    messages: Option<Bucket>,
    bytes: Option<Bucket>,
    violations: u32,
    /// Whether the last [`check`](Self::check) took a violation away (a
    /// refusal for bytes gives it back).
    forgave: bool,
    close_after: u32,
}

impl RateLimit {
    pub(crate) fn new(limits: &Limits) -> Self {
        Self::with(
            u64::from(limits.messages_per_second),
            u64::from(limits.message_burst),
            limits.fanout_bytes_per_second,
            limits.fanout_bytes_burst,
            limits.rate_violations_before_close,
        )
    }

    fn with(rate: u64, burst: u64, byte_rate: u64, byte_burst: u64, close_after: u32) -> Self {
        Self {
            messages: Bucket::new(rate, burst),
            bytes: Bucket::new(byte_rate, byte_burst),
            violations: 0,
            forgave: false,
            close_after: close_after.max(1),
        }
    }

    /// One message (or control frame) arrived.
    pub(crate) fn check(&mut self, now: Instant) -> Verdict {
        if self.messages.as_mut().is_none_or(|b| b.take(now, 1.0)) {
            self.forgave = self.violations > 0;
            self.violations = self.violations.saturating_sub(1);
            return Verdict::Allowed;
        }
        self.forgave = false;
        self.violation()
    }

    /// The message allowed by the last [`check`](Self::check) is about to
    /// put `bytes` on the bus.
    pub(crate) fn check_bytes(&mut self, now: Instant, bytes: usize) -> Verdict {
        if self
            .bytes
            .as_mut()
            .is_none_or(|b| b.take(now, bytes as f64))
        {
            return Verdict::Allowed;
        }
        if std::mem::take(&mut self.forgave) {
            self.violations += 1;
        }
        self.violation()
    }

    fn violation(&mut self) -> Verdict {
        self.violations += 1;
        if self.violations >= self.close_after {
            Verdict::Abusive
        } else {
            Verdict::Limited
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn bursts_then_limits_then_closes_persistent_abuse() {
        let mut rl = RateLimit::with(2, 3, 0, 0, 4);
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
    async fn zero_rates_are_no_limit() {
        let mut rl = RateLimit::with(0, 10, 0, 10, 1);
        let now = Instant::now();
        for _ in 0..1000 {
            assert_eq!(rl.check(now), Verdict::Allowed);
            assert_eq!(rl.check_bytes(now, 1 << 30), Verdict::Allowed);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_occasional_burst_is_forgiven() {
        let mut rl = RateLimit::with(10, 1, 0, 0, 3);
        let mut now = Instant::now();
        for _ in 0..100 {
            assert_eq!(rl.check(now), Verdict::Allowed);
            assert_eq!(rl.check(now), Verdict::Limited);
            now += Duration::from_millis(200);
        }
    }

    /// Issue 11 item 3: within the message rate, too many bytes are
    /// refused, and persistently too many close the socket.
    #[tokio::test(start_paused = true)]
    async fn fan_out_bytes_are_limited_and_persistent_abuse_closes() {
        let mut rl = RateLimit::with(50, 100, 1000, 4000, 3);
        let mut now = Instant::now();
        for _ in 0..4 {
            assert_eq!(rl.check(now), Verdict::Allowed);
            assert_eq!(rl.check_bytes(now, 1000), Verdict::Allowed);
        }
        // The burst is spent; a message within the count is refused for
        // its bytes, and the allowed count does not forgive it.
        assert_eq!(rl.check(now), Verdict::Allowed);
        assert_eq!(rl.check_bytes(now, 1000), Verdict::Limited);
        assert_eq!(rl.check(now), Verdict::Allowed);
        assert_eq!(rl.check_bytes(now, 1000), Verdict::Limited);
        assert_eq!(rl.check(now), Verdict::Allowed);
        assert_eq!(rl.check_bytes(now, 1000), Verdict::Abusive);
        // A well-behaved sender is forgiven: one second brings 1000 back.
        let mut rl = RateLimit::with(50, 100, 1000, 1000, 3);
        for _ in 0..100 {
            assert_eq!(rl.check(now), Verdict::Allowed);
            assert_eq!(rl.check_bytes(now, 1000), Verdict::Allowed);
            assert_eq!(rl.check(now), Verdict::Allowed);
            assert_eq!(rl.check_bytes(now, 1000), Verdict::Limited);
            now += Duration::from_secs(1);
        }
    }
}
