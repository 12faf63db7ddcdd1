//! The ban mirror: each node's copy of the cluster's bans, so that the
//! ban check of a connect asks no one (issue 19: an `EXISTS` per connect,
//! its round trip and its wake-ups were a fifth of a connect's CPU).
//!
//! **In Redis**, under `redis.channel_prefix` `P`, one script per ban
//! ([`BAN`]) on a single server (or Sentinel's primary):
//!
//! | what | holds | why |
//! |---|---|---|
//! | key `P:ban:<user>` | `1`, expiring with the ban | the truth; what nodes of older builds check |
//! | key `P:bans` | sorted set: user → expiry (ms, Redis's clock); expires with its longest ban | what a node loads |
//! | channel `P:bans` | `<ttl ms> <user>` per ban | what keeps a loaded mirror current |
//!
//! A later ban of a user replaces an earlier one, shorter or longer, as
//! `SET … PX` always did.
//!
//! **When the mirror answers.** Only while it is sure to hold every ban
//! ([`BanMirror::check`] says `None` otherwise, and the node asks Redis as
//! before):
//!
//! - it was loaded on the current subscriber connection, after that
//!   connection subscribed `P:bans`, so every later ban arrives as a push;
//! - no push was dropped since (a lagging subscriber, an unreadable ban),
//!   else it is stale until reloaded (at the next probe);
//! - every live node publishes its bans: the registry's `bans` field
//!   (`push`, [`BANS_PUSHED`]); a node of an older build only sets the key, so one
//!   such node in the cluster turns every mirror off;
//! - it is not full ([`MAX_BANS`]; then it still answers "banned" for the
//!   bans it holds).
//!
//! **A socket racing a ban** is refused or closed, as with `EXISTS`: the
//! ban's push on `P:bans` and the reply to the connect's `SUBSCRIBE` come on
//! the subscriber's one connection in Redis's order, and the subscriber
//! applies every push that came before a reply before it acknowledges the
//! subscribe (`subscriber.rs`). So a ban that Redis ran before the user's
//! channel was subscribed is in the mirror when the connect checks it, and
//! one it ran after sends its disconnect order to a node already subscribed.
//! A connect to a topic subscribed already asks no one: a ban is then
//! either in the mirror, or its order is still on its way to the socket,
//! which is in the hub already.
//!
//! **Not on a Redis Cluster**: `P:bans` and a user's channel live on
//! different shards, with no order between them; there each connect asks
//! Redis (`EXISTS`), and nodes do not announce [`BANS_PUSHED`].

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Most bans a mirror holds. A mirror that would hold more is full: it
/// still answers for the bans it holds, and asks Redis for everyone else.
pub(super) const MAX_BANS: usize = 100_000;

/// The value of the registry field `bans` (`registry.rs`) of a node that
/// publishes every ban it makes on `P:bans`: other nodes' mirrors may trust
/// their pushes only while every live node says so.
pub(super) const BANS_PUSHED: &str = "push";

/// `KEYS[1]` the ban key, `KEYS[2]` the sorted set; `ARGV[1]` the user,
/// `ARGV[2]` the ban in ms, `ARGV[3]` the channel. Sets the key, records the
/// ban in the set (dropping expired ones) and publishes it, in one step.
pub(super) const BAN: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('SET', KEYS[1], 1, 'PX', ttl)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', string.format('%.0f', now))
redis.call('ZADD', KEYS[2], string.format('%.0f', now + ttl), ARGV[1])
local last = redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', KEYS[2], last[2])
redis.call('PUBLISH', ARGV[3], ARGV[2] .. ' ' .. ARGV[1])
return 1
";

/// `KEYS[1]` the sorted set; `ARGV[1]` the most entries to return. Returns
/// the bans in force as a flat list: user, then the ms it has left.
pub(super) const LOAD: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%.0f', now))
local bans = redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1, 'WITHSCORES')
local out = {}
for i = 1, #bans, 2 do
  out[#out + 1] = bans[i]
  out[#out + 1] = string.format('%.0f', math.max(tonumber(bans[i + 1]) - now, 1))
end
return out
";

/// A push on `P:bans` that could not be read.
#[derive(Debug, thiserror::Error)]
#[error("unreadable ban on the bans channel")]
pub(super) struct Unreadable;

/// Reads a push on `P:bans`: `<ttl ms> <user>`.
pub(super) fn parse_push(payload: &[u8]) -> Result<(&str, Duration), Unreadable> {
    let text = std::str::from_utf8(payload).map_err(|_| Unreadable)?;
    let (ms, user) = text.split_once(' ').ok_or(Unreadable)?;
    let ms: u64 = ms.parse().map_err(|_| Unreadable)?;
    Ok((user, Duration::from_millis(ms)))
}

/// Reads [`LOAD`]'s answer: user, ms left, … Entries that do not parse
/// make the whole answer unreadable (`None`).
pub(super) fn parse_load(flat: Vec<String>) -> Option<Vec<(String, Duration)>> {
    let mut out = Vec::with_capacity(flat.len() / 2);
    let mut items = flat.into_iter();
    while let Some(user) = items.next() {
        let ms: u64 = items.next()?.parse().ok()?;
        out.push((user, Duration::from_millis(ms)));
    }
    Some(out)
}

/// This node's copy of the bans; see the module docs.
///
/// A `std::sync::Mutex`: held for a map lookup or insert, never across an
/// `.await`; a connect takes it once.
#[derive(Default)]
pub(super) struct BanMirror {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// User → until when the ban holds.
    bans: HashMap<Box<str>, Instant>,
    /// Loaded on the current connection, and nothing dropped since.
    fresh: bool,
    /// A ban did not fit: a user not in `bans` may still be banned.
    full: bool,
}

impl BanMirror {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A map of plain values: never inconsistent, ignore poisoning.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `user` is banned at `now`, or `None` when the mirror cannot
    /// say (stale, or full and without this user): ask Redis then. The
    /// registry's say (whether every node publishes its bans) is the
    /// caller's to add.
    pub(super) fn check(&self, user: &str, now: Instant) -> Option<bool> {
        let state = self.lock();
        if !state.fresh {
            return None;
        }
        match state.bans.get(user) {
            Some(until) if *until > now => Some(true),
            _ if state.full => None,
            _ => Some(false),
        }
    }

    /// A ban pushed on `P:bans`, received at `now`: it replaces what the
    /// mirror held for `user`.
    pub(super) fn apply(&self, user: &str, ttl: Duration, now: Instant) {
        let mut state = self.lock();
        let until = now + ttl;
        if let Some(held) = state.bans.get_mut(user) {
            *held = until;
            return;
        }
        if state.bans.len() >= MAX_BANS {
            state.bans.retain(|_, until| *until > now);
        }
        if state.bans.len() >= MAX_BANS {
            state.full = true;
            return;
        }
        state.bans.insert(user.into(), until);
    }

    /// The mirror may have missed a ban (the connection was lost, a push
    /// was dropped or unreadable): it answers nothing until reloaded.
    pub(super) fn stale(&self) {
        self.lock().fresh = false;
    }

    /// Whether it is to be (re)loaded.
    pub(super) fn is_stale(&self) -> bool {
        !self.lock().fresh
    }

    /// What [`LOAD`] read, at `now`: replaces the mirror, which answers
    /// from now on. `complete` is false when Redis held more than was read
    /// (the mirror is full).
    pub(super) fn load(&self, bans: Vec<(String, Duration)>, complete: bool, now: Instant) {
        let mut state = self.lock();
        state.bans = bans
            .into_iter()
            .map(|(user, ttl)| (user.into_boxed_str(), now + ttl))
            .collect();
        state.full = !complete;
        state.fresh = true;
    }

    /// How many bans it holds (expired ones included until pruned).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().bans.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Duration = Duration::from_secs(1);

    #[test]
    fn a_mirror_answers_only_once_loaded_and_until_stale() {
        let mirror = BanMirror::default();
        let now = Instant::now();
        mirror.apply("ann", SEC, now);
        assert_eq!(mirror.check("ann", now), None, "never loaded");
        mirror.load(vec![("bob".into(), SEC)], true, now);
        assert_eq!(mirror.check("bob", now), Some(true));
        assert_eq!(
            mirror.check("ann", now),
            Some(false),
            "the load replaced it"
        );
        mirror.apply("ann", SEC, now);
        assert_eq!(mirror.check("ann", now), Some(true));
        mirror.stale();
        assert!(mirror.is_stale());
        assert_eq!(mirror.check("ann", now), None);
        assert_eq!(mirror.check("cy", now), None);
    }

    #[test]
    fn bans_expire_and_a_later_ban_replaces_an_earlier_one() {
        let mirror = BanMirror::default();
        let now = Instant::now();
        mirror.load(Vec::new(), true, now);
        mirror.apply("ann", 10 * SEC, now);
        assert_eq!(mirror.check("ann", now + 9 * SEC), Some(true));
        assert_eq!(mirror.check("ann", now + 10 * SEC), Some(false));
        // Shorter, as `SET … PX` replaces the key's expiry.
        mirror.apply("ann", SEC, now);
        assert_eq!(mirror.check("ann", now + 2 * SEC), Some(false));
        assert_eq!(mirror.len(), 1);
    }

    #[test]
    fn a_full_mirror_answers_only_for_the_bans_it_holds() {
        let mirror = BanMirror::default();
        let now = Instant::now();
        let bans = (0..MAX_BANS).map(|i| (format!("u{i}"), SEC)).collect();
        mirror.load(bans, true, now);
        assert_eq!(mirror.check("other", now), Some(false));
        mirror.apply("late", SEC, now);
        assert_eq!(mirror.check("u7", now), Some(true));
        assert_eq!(mirror.check("late", now), None, "did not fit");
        assert_eq!(mirror.check("other", now), None);
        // Expired entries make room, but what did not fit may be missing
        // until the next load.
        mirror.apply("later", SEC, now + 2 * SEC);
        assert_eq!(mirror.len(), 1, "the expired ones were dropped");
        assert_eq!(mirror.check("later", now + 2 * SEC), Some(true));
        assert_eq!(mirror.check("other", now + 2 * SEC), None);
        mirror.load(vec![("late".into(), SEC)], true, now);
        assert_eq!(mirror.check("other", now), Some(false));
        // A load that could not read everything is full from the start.
        mirror.load(vec![("a".into(), SEC)], false, now);
        assert_eq!(mirror.check("a", now), Some(true));
        assert_eq!(mirror.check("b", now), None);
    }

    #[test]
    fn pushes_and_loads_are_read_strictly() {
        assert_eq!(
            parse_push(b"60000 ann lee").unwrap(),
            ("ann lee", Duration::from_millis(60000))
        );
        for bad in [&b""[..], b"60000", b"x ann", b"-1 ann", b"1 \xff"] {
            assert!(parse_push(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            parse_load(vec!["ann".into(), "5".into(), "bob".into(), "7".into()]),
            Some(vec![
                ("ann".into(), Duration::from_millis(5)),
                ("bob".into(), Duration::from_millis(7))
            ])
        );
        assert_eq!(parse_load(vec!["ann".into()]), None);
        assert_eq!(parse_load(vec!["ann".into(), "x".into()]), None);
    }
}
