//! Refused requests in the log, at most one line per (peer address, kind of
//! refusal: the caller's label) per window. Not per reason: reasons hold
//! text the client chose, and a pair per reason would let one client write
//! a line per variant.
//!
//! A refusal is logged at warn so an operator can see why a FoxPro push or a
//! browser's upgrade was turned away — a counter alone says that something
//! was refused, not who or why. A client that keeps retrying, or a flood,
//! must not turn that into a log flood: the first refusal of a pair in a
//! window is logged at once, later ones in the same window are only
//! counted, and that count goes out with the pair's next line after the
//! window ends (a pair that is never refused again never reports it; the
//! metrics count every refusal anyway).
//!
//! The map of pairs is bounded ([`RefusalLog::CAPACITY`]). When it is full,
//! pairs whose window has ended are forgotten (at most once a second, so a
//! flood from new addresses does not scan the map on every request); if it
//! is still full, refusals from pairs it does not hold share one overflow
//! entry, logged once per window in total with its count. Counts of a pair
//! forgotten to make room are not reported in the log.
//!
//! This module only decides; the caller logs, after the lock is released
//! (a log write can block on a full stderr pipe).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What to do with one refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Log it; `suppressed` refusals of the same pair went unlogged since
    /// its last line. `overflow` when the map was full and this is the
    /// shared overflow entry's line.
    Log { suppressed: u64, overflow: bool },
    /// Counted; the pair's next line reports it.
    Quiet,
}

/// One (peer, reason) pair's window.
#[derive(Debug, Clone, Copy)]
struct Window {
    started: Instant,
    suppressed: u64,
}

impl Window {
    fn new(now: Instant) -> Self {
        Self {
            started: now,
            suppressed: 0,
        }
    }

    /// Counts one refusal at `now` and says whether to log it.
    fn note(&mut self, now: Instant, length: Duration, overflow: bool) -> Verdict {
        if now.saturating_duration_since(self.started) < length {
            self.suppressed += 1;
            return Verdict::Quiet;
        }
        let suppressed = std::mem::take(&mut self.suppressed);
        self.started = now;
        Verdict::Log {
            suppressed,
            overflow,
        }
    }
}

type Key = (Option<IpAddr>, &'static str);

struct Pairs {
    map: HashMap<Key, Window>,
    /// Refusals from pairs the full map could not take.
    overflow: Option<Window>,
    /// When the map may next be scanned for ended windows.
    next_prune: Instant,
}

/// The refusal log's memory: which pairs were logged, when, and how many
/// went unlogged since.
///
/// A `std::sync::Mutex`: held for one map operation, never across an
/// `.await`, and nothing is logged while it is held.
pub(crate) struct RefusalLog {
    window: Duration,
    capacity: usize,
    pairs: Mutex<Pairs>,
}

impl RefusalLog {
    /// How many (peer, reason) pairs are remembered at most.
    pub(crate) const CAPACITY: usize = 4096;
    /// The window: one line per pair per minute.
    pub(crate) const WINDOW: Duration = Duration::from_secs(60);

    /// A log with one line per pair per `window`, remembering at most
    /// `capacity` pairs.
    pub(crate) fn new(window: Duration, capacity: usize) -> Self {
        Self {
            window,
            capacity,
            pairs: Mutex::new(Pairs {
                map: HashMap::new(),
                overflow: None,
                next_prune: Instant::now(),
            }),
        }
    }

    /// Counts a refusal of `peer` for `reason` (a stable label) at `now`.
    pub(crate) fn note(&self, peer: Option<IpAddr>, reason: &'static str, now: Instant) -> Verdict {
        let mut pairs = self.pairs.lock().unwrap_or_else(|e| e.into_inner());
        let pairs = &mut *pairs;
        let key = (peer, reason);
        if let Some(window) = pairs.map.get_mut(&key) {
            return window.note(now, self.window, false);
        }
        if pairs.map.len() >= self.capacity && now >= pairs.next_prune {
            let length = self.window;
            pairs
                .map
                .retain(|_, w| now.saturating_duration_since(w.started) < length);
            pairs.next_prune = now + Duration::from_secs(1);
        }
        if pairs.map.len() < self.capacity {
            pairs.map.insert(key, Window::new(now));
            return Verdict::Log {
                suppressed: 0,
                overflow: false,
            };
        }
        match &mut pairs.overflow {
            Some(window) => window.note(now, self.window, true),
            None => {
                pairs.overflow = Some(Window::new(now));
                Verdict::Log {
                    suppressed: 0,
                    overflow: true,
                }
            }
        }
    }

    /// How many pairs are remembered.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.pairs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map
            .len()
    }
}

impl Default for RefusalLog {
    fn default() -> Self {
        Self::new(Self::WINDOW, Self::CAPACITY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: Verdict = Verdict::Log {
        suppressed: 0,
        overflow: false,
    };

    fn ip(last: u8) -> Option<IpAddr> {
        Some(IpAddr::from([10, 0, 0, last]))
    }

    #[test]
    fn one_line_per_pair_per_window_then_the_count() {
        let log = RefusalLog::new(Duration::from_secs(60), 16);
        let t0 = Instant::now();
        assert_eq!(log.note(ip(1), "403", t0), LOG);
        for i in 1..100 {
            let at = t0 + Duration::from_millis(i);
            assert_eq!(log.note(ip(1), "403", at), Verdict::Quiet);
        }
        // Another reason or another peer is another pair.
        assert_eq!(log.note(ip(1), "401", t0), LOG);
        assert_eq!(log.note(ip(2), "403", t0), LOG);
        // After the window: logged, with the 99 that were not.
        let later = t0 + Duration::from_secs(61);
        assert_eq!(
            log.note(ip(1), "403", later),
            Verdict::Log {
                suppressed: 99,
                overflow: false
            }
        );
        assert_eq!(log.note(ip(1), "403", later), Verdict::Quiet);
        assert_eq!(
            log.note(ip(1), "403", later + Duration::from_secs(60)),
            Verdict::Log {
                suppressed: 1,
                overflow: false
            }
        );
    }

    #[test]
    fn a_full_map_forgets_ended_windows_then_shares_one_overflow_line() {
        let log = RefusalLog::new(Duration::from_secs(60), 4);
        let t0 = Instant::now();
        for i in 0..4 {
            assert_eq!(log.note(ip(i), "403", t0), LOG);
        }
        // Full, nothing ended: new pairs share the overflow entry.
        let overflow = Verdict::Log {
            suppressed: 0,
            overflow: true,
        };
        assert_eq!(log.note(ip(100), "403", t0), overflow);
        for i in 101..150 {
            assert_eq!(log.note(ip(i), "403", t0), Verdict::Quiet);
        }
        assert_eq!(log.len(), 4, "the map never grows past its capacity");
        // Pairs it holds are still logged as pairs.
        assert_eq!(log.note(ip(0), "403", t0), Verdict::Quiet);
        // Once their windows end they make room.
        let later = t0 + Duration::from_secs(61);
        assert_eq!(log.note(ip(200), "403", later), LOG);
        assert_eq!(log.len(), 1);
        // The overflow entry reports what it counted with its next line.
        for i in 1..4 {
            log.note(ip(i), "403", later);
        }
        assert_eq!(
            log.note(ip(250), "403", later + Duration::from_millis(1)),
            Verdict::Log {
                suppressed: 49,
                overflow: true
            }
        );
    }
}
