//! Per-connection message rate limiting: a token bucket that tells a
//! client that bursts, and closes one that keeps flooding.

use tokio::time::Instant;

/// What the rate limiter says about one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
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
pub(crate) struct RateLimit {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
    violations: u32,
    close_after: u32,
}

impl RateLimit {
    /// `None` when `rate` is 0 (no limit).
    pub(crate) fn new(rate: u32, burst: u32, close_after: u32) -> Option<Self> {
        (rate > 0).then(|| Self {
            rate: f64::from(rate),
            burst: f64::from(burst.max(1)),
            tokens: f64::from(burst.max(1)),
            last: Instant::now(),
            violations: 0,
            close_after: close_after.max(1),
        })
    }

    pub(crate) fn check(&mut self, now: Instant) -> Verdict {
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

    #[test]
    fn a_zero_rate_is_no_limit() {
        assert!(RateLimit::new(0, 10, 10).is_none());
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
}
