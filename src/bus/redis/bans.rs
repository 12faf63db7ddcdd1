//! The ban mirror: each node's copy of the cluster's bans, so that the
//! ban check of a connect asks no one (issue 19: an `EXISTS` per connect,
//! its round trip and its wake-ups were a fifth of a connect's CPU).
//!
//! **In Redis** the bans are what they were: a key `P:ban:<user>` per ban
//! (under `redis.channel_prefix` `P`), expiring with it, the truth. On a
//! single server (or Sentinel's primary) a ban is also published on the
//! channel `P:bans` (`<ttl ms> <user>`), in the same script as its key
//! ([`BAN`]); every node subscribes that channel with its topics.
//!
//! **A copy** is loaded from the keys (`SCAN MATCH P:ban:*`, then `PTTL`;
//! [`load`], off the subscriber task) once the subscriber has subscribed
//! `P:bans` on its current connection, so every ban after the load began
//! arrives as a push; a push applied while the load runs wins over what
//! the load read. A later ban of a user replaces an earlier one, shorter or
//! longer, as `SET … PX` always did. A ban's push carries its length, so
//! on a node whose subscriber is behind it ends that much later.
//!
//! **When the copy answers.** Only while it cannot have missed a ban
//! ([`BanMirror::check`] says `None` otherwise, and the node asks Redis as
//! before):
//!
//! - a probe came back through the subscriber's connection within two
//!   probe intervals (`control.rs`): a connection that went deaf, unnoticed
//!   yet, brings no bans. A ban made in those two intervals before the
//!   connection died can still miss a connect to a topic subscribed
//!   already (documented in docs/api.md);
//! - its load finished, and nothing made it stale since: the subscriber's
//!   connection lost, a push dropped (the connection's count of dropped
//!   pushes is read at every check, so a drop counts before the subscriber
//!   has seen it) or unreadable; a stale copy is loaded again at the next
//!   probe;
//! - every live node publishes its bans (the registry's `bans` field,
//!   [`BANS_PUSHED`]), and has done so since the load began (the gate's
//!   [`bans_epoch`](crate::bus::registry::VersionGate::bans_epoch)): a node
//!   of an older build only sets the key, so while one is live every check
//!   asks Redis, and once the last has left the copy is loaded again, its
//!   bans with it. The gate sees the registry at this node's heartbeats
//!   only: an older node whose whole life falls between two goes unseen;
//! - it is not full ([`MAX_BANS`]; then it still answers "banned" for the
//!   bans it holds, and is loaded again after [`FULL_RELOAD`]).
//!
//! **A Redis restart without data** loses the keys. Each load first reads
//! Redis's `run_id`; another than the last load's means a restart (or a
//! failover), and the node sets the bans its copy still holds back where
//! their keys are missing ([`restore`], `SET NX` and the push), with what
//! is left of each, before it reads them.
//!
//! A key deleted or written by hand is seen at the next load only (the
//! subscriber's next connect, or a stale copy): to lift a ban, ban again
//! with `ban_ms` 1.
//!
//! **A socket racing a ban** is refused or closed, as with `EXISTS`: the
//! ban's push on `P:bans` and the reply to the connect's `SUBSCRIBE` come on
//! the subscriber's one connection in Redis's order, and the subscriber
//! applies every push that came before a reply before it acknowledges the
//! subscribe (`subscriber.rs`). So a ban that Redis ran before the user's
//! channel was subscribed is in the copy when the connect checks it, and
//! one it ran after sends its disconnect order to a node already subscribed.
//! A connect to a topic subscribed already asks no one: a ban is then
//! either in the copy, or its order is still on its way to the socket,
//! which is in the hub already.
//!
//! **Not on a Redis Cluster**: `P:bans` and a user's channel live on
//! different shards, with no order between them; there each connect asks
//! Redis (`EXISTS`), and nodes do not announce [`BANS_PUSHED`].

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::{Instant, timeout};

use super::conn::PubConn;

/// Most bans a copy holds. A copy that would hold more is full: it still
/// answers for the bans it holds, and asks Redis for everyone else, until
/// its next load.
pub(super) const MAX_BANS: usize = 100_000;

/// The value of the registry field `bans` (`registry.rs`) of a node that
/// publishes every ban it makes on `P:bans`: other nodes' copies may trust
/// their pushes only while every live node says so.
pub(super) const BANS_PUSHED: &str = "push";

/// Keys asked for per `SCAN` of a load.
const SCAN_COUNT: usize = 1000;

/// How long a full copy is kept before it is loaded again (the bans that
/// did not fit may have expired by then).
const FULL_RELOAD: Duration = Duration::from_secs(60);

/// The pause after a failed load, doubled per failure in a row up to
/// [`RETRY_MAX`].
const RETRY_MIN: Duration = Duration::from_millis(250);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// How long a ban whose key has no expiry (written by hand) is held:
/// until the next load, in practice.
const NO_EXPIRY: Duration = Duration::from_secs(365 * 24 * 3600);

/// `KEYS[1]` the ban key; `ARGV[1]` the ban in ms, `ARGV[2]` the channel,
/// `ARGV[3]` the user. Sets the key and publishes the ban, in one step.
pub(super) const BAN: &str = r"
redis.call('SET', KEYS[1], 1, 'PX', ARGV[1])
redis.call('PUBLISH', ARGV[2], ARGV[1] .. ' ' .. ARGV[3])
return 1
";

/// A ban set again where Redis lost it ([`restore`]): only if its key is
/// missing (a ban made meanwhile wins), published as [`BAN`] does.
const RESTORE: &str = r"
if redis.call('SET', KEYS[1], 1, 'PX', ARGV[1], 'NX') then
  redis.call('PUBLISH', ARGV[2], ARGV[1] .. ' ' .. ARGV[3])
  return 1
end
return 0
";

/// The `PTTL` of each of `KEYS`, in one round trip.
const PTTLS: &str = r"
local out = {}
for i, key in ipairs(KEYS) do
  out[i] = redis.call('PTTL', key)
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

/// The bans in force, read from their keys: `(user, until when)`, each
/// timed when its `PTTL` came back, and whether that is all of them (false
/// past [`MAX_BANS`]). `prefix` is the keys' (`P:ban:`), `pattern` its glob
/// (`P:ban:*`, escaped). A key whose user is not UTF-8 is no user's (ids
/// are text) and skipped. Gives up (`Err`) when a command fails or takes
/// longer than `limit`, or when `go_on` says the load is no longer wanted.
pub(super) async fn load(
    conn: &mut PubConn,
    prefix: &str,
    pattern: &str,
    limit: Duration,
    go_on: impl Fn() -> bool,
) -> Result<(Vec<(String, Instant)>, bool), String> {
    // A map: `SCAN` may return a key twice.
    let mut bans: HashMap<String, Instant> = HashMap::new();
    let mut cursor = 0u64;
    loop {
        if !go_on() {
            return Err("no longer wanted".into());
        }
        let mut scan = redis::cmd("SCAN");
        scan.arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(SCAN_COUNT);
        let (next, keys): (u64, Vec<Vec<u8>>) = ask(conn, &scan, limit).await?;
        if !keys.is_empty() {
            let mut ttls = redis::cmd("EVAL");
            ttls.arg(PTTLS).arg(keys.len()).arg(&keys);
            let ttls: Vec<i64> = ask(conn, &ttls, limit).await?;
            let now = Instant::now();
            for (key, ms) in keys.into_iter().zip(ttls) {
                let left = match ms {
                    // Gone since the scan.
                    -2 => continue,
                    -1 => NO_EXPIRY,
                    ms => Duration::from_millis(ms.max(1).unsigned_abs()),
                };
                let Some(user) = key
                    .strip_prefix(prefix.as_bytes())
                    .and_then(|u| std::str::from_utf8(u).ok())
                else {
                    continue;
                };
                if bans.len() == MAX_BANS && !bans.contains_key(user) {
                    return Ok((bans.into_iter().collect(), false));
                }
                bans.insert(user.to_owned(), now + left);
            }
        }
        if next == 0 {
            return Ok((bans.into_iter().collect(), true));
        }
        cursor = next;
    }
}

/// The `run_id` of the Redis server `conn` is on: another one than at the
/// last load means Redis restarted (or failed over), and may have lost
/// the bans' keys.
pub(super) async fn run_id(conn: &mut PubConn, limit: Duration) -> Result<String, String> {
    let info: String = ask(conn, redis::cmd("INFO").arg("server"), limit).await?;
    info.lines()
        .find_map(|line| line.strip_prefix("run_id:"))
        .map(|id| id.trim().to_owned())
        .ok_or_else(|| "INFO server names no run_id".to_owned())
}

/// Sets `bans` (user, time left) again where their keys are missing, each
/// published on `channel`: a Redis that restarted without its data forgot
/// them, and the nodes' copies would load that (review of 2026-12-02:
/// every banned user connected again). Returns how many were missing.
pub(super) async fn restore(
    conn: &mut PubConn,
    prefix: &str,
    channel: &str,
    bans: &[(String, Duration)],
    limit: Duration,
) -> Result<usize, String> {
    let mut restored = 0;
    for (user, left) in bans {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(RESTORE)
            .arg(1)
            .arg([prefix, user].concat())
            .arg((left.as_millis() as u64).max(1))
            .arg(channel)
            .arg(user);
        restored += ask::<i64>(conn, &cmd, limit).await? as usize;
    }
    Ok(restored)
}

/// One command of a load, within `limit`.
async fn ask<T: redis::FromRedisValue>(
    conn: &mut PubConn,
    cmd: &redis::Cmd,
    limit: Duration,
) -> Result<T, String> {
    match timeout(limit, conn.query::<T>(cmd)).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {} ms", limit.as_millis())),
    }
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
    /// Bumped whenever the copy may have missed a ban.
    generation: u64,
    /// What the last finished load is good for, if it still is.
    fresh: Option<Basis>,
    /// The load running, and the bans pushed since it began (kept apart
    /// from `bans`, which may be full).
    loading: Option<(Basis, HashMap<Box<str>, Instant>)>,
    /// A ban did not fit: a user not in `bans` may still be banned.
    full: bool,
    /// When the last load finished.
    loaded_at: Option<Instant>,
    /// Loads failed in a row, and when the next may begin.
    failures: u32,
    retry_at: Option<Instant>,
    /// The subscriber connection's count of dropped pushes, and its value
    /// when the load began.
    drops: Option<(Arc<AtomicU64>, u64)>,
    /// The Redis `run_id` the last load began on.
    run_id: Option<String>,
    /// The last load could not read the `run_id` (it was said once).
    run_id_unreadable: bool,
}

/// What a load stands on: the copy's generation and the gate's bans epoch
/// when it began.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Basis {
    generation: u64,
    epoch: u64,
}

impl BanMirror {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A map of plain values: never inconsistent, ignore poisoning.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `user` is banned at `now`, or `None` when the copy cannot
    /// say: ask Redis then. `epoch` is the gate's bans epoch now, asked
    /// only while the gate says every node publishes its bans.
    pub(super) fn check(&self, user: &str, epoch: u64, now: Instant) -> Option<bool> {
        let state = self.lock();
        let fresh = state.fresh?;
        if fresh.generation != state.generation || fresh.epoch != epoch {
            return None;
        }
        if let Some((drops, seen)) = &state.drops
            && drops.load(Ordering::Acquire) != *seen
        {
            return None;
        }
        match state.bans.get(user) {
            Some(until) if *until > now => Some(true),
            _ if state.full => None,
            _ => Some(false),
        }
    }

    /// A ban pushed on `P:bans`, received at `now`: it replaces what the
    /// copy held for `user`.
    pub(super) fn apply(&self, user: &str, ttl: Duration, now: Instant) {
        let mut state = self.lock();
        let until = now + ttl;
        if let Some((_, pushed)) = &mut state.loading {
            pushed.insert(user.into(), until);
        }
        if let Some(held) = state.bans.get_mut(user) {
            *held = until;
            return;
        }
        if state.full {
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

    /// The copy may have missed a ban (the connection was lost, a push was
    /// dropped or unreadable): it answers nothing until loaded again, and a
    /// load running now does not count.
    pub(super) fn stale(&self) {
        let mut state = self.lock();
        state.generation += 1;
        state.fresh = None;
        state.loading = None;
    }

    /// Begins a load at the gate's bans `epoch`, on a connection whose
    /// dropped pushes are counted by `drops`, at `now`, unless the copy is
    /// good for it already (and not full for [`FULL_RELOAD`]), a load is
    /// running, or the last failed a moment ago. Call it only once
    /// `P:bans` is subscribed on that connection.
    pub(super) fn begin_load(
        &self,
        epoch: u64,
        drops: Arc<AtomicU64>,
        now: Instant,
    ) -> Option<Basis> {
        let mut state = self.lock();
        let basis = Basis {
            generation: state.generation,
            epoch,
        };
        let full_for_long = state.full
            && state
                .loaded_at
                .is_some_and(|at| now.saturating_duration_since(at) >= FULL_RELOAD);
        if (state.fresh == Some(basis) && !full_for_long)
            || state.loading.is_some()
            || state.retry_at.is_some_and(|at| now < at)
        {
            return None;
        }
        let seen = drops.load(Ordering::Acquire);
        state.drops = Some((drops, seen));
        state.loading = Some((basis, HashMap::new()));
        Some(basis)
    }

    /// Records the Redis `run_id` a load begins on; the bans to set again
    /// when it is another than the last load's (Redis restarted): those
    /// of the copy still running, with what is left of each. Bans without
    /// an expiry (keys written by hand) are not set again.
    pub(super) fn on_run(&self, run_id: String, now: Instant) -> Vec<(String, Duration)> {
        let mut state = self.lock();
        state.run_id_unreadable = false;
        let before = state.run_id.replace(run_id);
        if before.is_none() || before == state.run_id {
            return Vec::new();
        }
        state
            .bans
            .iter()
            .filter_map(|(user, until)| {
                let left = until.checked_duration_since(now)?;
                (!left.is_zero() && left < NO_EXPIRY / 2).then(|| (user.to_string(), left))
            })
            .collect()
    }

    /// Records that a load could not read the `run_id`: true the first
    /// time since one could (a user without `+info` warned at every
    /// load, every few seconds: review of 2026-12-03).
    pub(super) fn run_id_unreadable(&self) -> bool {
        !std::mem::replace(&mut self.lock().run_id_unreadable, true)
    }

    /// Whether the load begun on `basis` is still wanted.
    pub(super) fn loading(&self, basis: Basis) -> bool {
        self.lock()
            .loading
            .as_ref()
            .is_some_and(|(b, _)| *b == basis)
    }

    /// The load begun on `basis` read `bans` (`complete`: all of them),
    /// finishing at `now`: the copy is what it read, but for the users
    /// pushed since it began, whose pushes are newer. Ignored when
    /// something that made the copy stale came since.
    pub(super) fn finish_load(
        &self,
        basis: Basis,
        bans: Vec<(String, Instant)>,
        complete: bool,
        now: Instant,
    ) {
        let mut state = self.lock();
        let Some((_, pushed)) = state.loading.take_if(|(b, _)| *b == basis) else {
            return;
        };
        let mut full = !complete;
        let mut fresh: HashMap<Box<str>, Instant> = bans
            .into_iter()
            .map(|(user, until)| (user.into_boxed_str(), until))
            .collect();
        for (user, until) in pushed {
            if fresh.len() >= MAX_BANS && !fresh.contains_key(&user) {
                full = true;
                continue;
            }
            fresh.insert(user, until);
        }
        state.bans = fresh;
        state.full = full;
        state.fresh = Some(basis);
        state.loaded_at = Some(now);
        state.failures = 0;
        state.retry_at = None;
    }

    /// The load begun on `basis` failed at `now`: the next may begin
    /// after a pause that doubles with each failure in a row (from
    /// [`RETRY_MIN`] up to [`RETRY_MAX`]: each load scans the whole
    /// keyspace). Returns how many failed in a row.
    pub(super) fn fail_load(&self, basis: Basis, now: Instant) -> u32 {
        let mut state = self.lock();
        if state.loading.as_ref().is_some_and(|(b, _)| *b == basis) {
            state.loading = None;
        }
        state.failures = state.failures.saturating_add(1);
        let pause = RETRY_MIN
            .saturating_mul(1 << state.failures.min(16))
            .min(RETRY_MAX);
        state.retry_at = Some(now + pause);
        state.failures
    }

    /// How many bans it holds (expired ones included until dropped).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().bans.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Duration = Duration::from_secs(1);

    fn drops() -> Arc<AtomicU64> {
        Arc::new(AtomicU64::new(0))
    }

    /// `(user, until now + ttl)`.
    fn ban(user: &str, now: Instant, ttl: Duration) -> (String, Instant) {
        (user.into(), now + ttl)
    }

    /// Loads `mirror` with `bans` at gate epoch 1.
    fn load_with(mirror: &BanMirror, bans: Vec<(String, Instant)>, now: Instant) {
        let basis = mirror.begin_load(1, drops(), now).unwrap();
        mirror.finish_load(basis, bans, true, now);
    }

    #[test]
    fn a_copy_answers_only_once_loaded_and_until_stale() {
        let mirror = BanMirror::default();
        let now = Instant::now();
        mirror.apply("ann", SEC, now);
        assert_eq!(mirror.check("ann", 1, now), None, "never loaded");
        let basis = mirror.begin_load(1, drops(), now).unwrap();
        assert!(
            mirror.begin_load(1, drops(), now).is_none(),
            "one at a time"
        );
        assert_eq!(mirror.check("ann", 1, now), None, "still loading");
        mirror.finish_load(basis, vec![ban("bob", now, SEC)], true, now);
        assert_eq!(mirror.check("bob", 1, now), Some(true));
        assert_eq!(
            mirror.check("ann", 1, now),
            Some(false),
            "the load replaced it"
        );
        assert!(mirror.begin_load(1, drops(), now).is_none(), "good already");
        mirror.apply("ann", SEC, now);
        assert_eq!(mirror.check("ann", 1, now), Some(true));
        assert_eq!(mirror.check("ann", 2, now), None, "the gate closed since");
        mirror.stale();
        assert_eq!(mirror.check("ann", 1, now), None);
        assert_eq!(mirror.check("cy", 1, now), None);
        assert!(mirror.begin_load(1, drops(), now).is_some(), "loaded again");
    }

    #[test]
    fn a_push_during_a_load_wins_and_a_stale_copy_drops_the_load() {
        let mirror = BanMirror::default();
        let now = Instant::now();
        let basis = mirror.begin_load(1, drops(), now).unwrap();
        // Pushed while the load runs: a new ban, and a shortened one that
        // the load read before it was shortened.
        mirror.apply("ann", 10 * SEC, now);
        mirror.apply("bob", SEC, now);
        assert!(mirror.loading(basis));
        mirror.finish_load(
            basis,
            vec![ban("bob", now, 100 * SEC), ban("cy", now, 10 * SEC)],
            true,
            now,
        );
        assert_eq!(mirror.check("ann", 1, now), Some(true));
        assert_eq!(
            mirror.check("bob", 1, now + 2 * SEC),
            Some(false),
            "the push won"
        );
        assert_eq!(mirror.check("cy", 1, now), Some(true));
        // Stale while a load runs: that load no longer counts.
        mirror.stale();
        let basis = mirror.begin_load(1, drops(), now).unwrap();
        mirror.stale();
        assert!(!mirror.loading(basis));
        mirror.finish_load(basis, Vec::new(), true, now);
        assert_eq!(mirror.check("cy", 1, now), None);
    }

    /// Another Redis run than the last load's hands back the bans still
    /// running, with what is left of each; the first run, the same run
    /// again, an expired ban and one without an expiry hand back nothing.
    #[test]
    fn a_new_redis_run_hands_back_the_bans_still_running() {
        let mirror = BanMirror::default();
        let now = Instant::now();
        assert!(mirror.on_run("r1".into(), now).is_empty(), "the first run");
        let basis = mirror.begin_load(1, drops(), now).unwrap();
        let hand_set = ("hand".to_owned(), now + NO_EXPIRY);
        mirror.finish_load(
            basis,
            vec![ban("ann", now, 10 * SEC), ban("bob", now, SEC), hand_set],
            true,
            now,
        );
        assert!(mirror.on_run("r1".into(), now).is_empty(), "the same run");
        let later = now + 2 * SEC;
        let back = mirror.on_run("r2".into(), later);
        assert_eq!(back, [("ann".to_owned(), 8 * SEC)]);
        assert!(mirror.on_run("r2".into(), later).is_empty());
    }

    #[test]
    fn failed_loads_are_retried_later_and_later() {
        let mirror = BanMirror::default();
        let now = Instant::now();
        let basis = mirror.begin_load(1, drops(), now).unwrap();
        assert_eq!(mirror.fail_load(basis, now), 1);
        assert!(
            mirror.begin_load(1, drops(), now).is_none(),
            "a pause first"
        );
        let later = now + RETRY_MIN * 2;
        let basis = mirror.begin_load(1, drops(), later).unwrap();
        assert_eq!(mirror.fail_load(basis, later), 2);
        assert!(
            mirror
                .begin_load(1, drops(), later + RETRY_MIN * 2)
                .is_none()
        );
        let much_later = later + RETRY_MAX;
        let basis = mirror.begin_load(1, drops(), much_later).unwrap();
        mirror.finish_load(basis, Vec::new(), true, much_later);
        assert_eq!(mirror.check("ann", 1, much_later), Some(false));
        // A success ends the run of failures.
        mirror.stale();
        let basis = mirror.begin_load(1, drops(), much_later).unwrap();
        assert_eq!(mirror.fail_load(basis, much_later), 1);
    }

    #[test]
    fn a_dropped_push_silences_the_copy_at_once() {
        let mirror = BanMirror::default();
        let now = Instant::now();
        let dropped = drops();
        let basis = mirror.begin_load(1, dropped.clone(), now).unwrap();
        mirror.finish_load(basis, Vec::new(), true, now);
        assert_eq!(mirror.check("ann", 1, now), Some(false));
        dropped.fetch_add(1, Ordering::AcqRel);
        assert_eq!(mirror.check("ann", 1, now), None);
    }

    #[test]
    fn bans_expire_and_a_later_ban_replaces_an_earlier_one() {
        let now = Instant::now();
        let mirror = BanMirror::default();
        load_with(&mirror, Vec::new(), now);
        mirror.apply("ann", 10 * SEC, now);
        assert_eq!(mirror.check("ann", 1, now + 9 * SEC), Some(true));
        assert_eq!(mirror.check("ann", 1, now + 10 * SEC), Some(false));
        // Shorter, as `SET … PX` replaces the key's expiry.
        mirror.apply("ann", SEC, now);
        assert_eq!(mirror.check("ann", 1, now + 2 * SEC), Some(false));
        assert_eq!(mirror.len(), 1);
    }

    #[test]
    fn a_full_copy_answers_only_for_the_bans_it_holds_until_loaded_again() {
        let now = Instant::now();
        let bans = (0..MAX_BANS)
            .map(|i| ban(&format!("u{i}"), now, SEC))
            .collect();
        let mirror = BanMirror::default();
        load_with(&mirror, bans, now);
        assert_eq!(mirror.check("other", 1, now), Some(false));
        mirror.apply("late", SEC, now);
        assert_eq!(mirror.check("u7", 1, now), Some(true));
        assert_eq!(mirror.check("late", 1, now), None, "did not fit");
        assert_eq!(mirror.check("other", 1, now), None);
        // Loaded again once full for a while; a ban pushed during that
        // load is kept although the copy was full (the review of 3d76479:
        // it was lost).
        let soon = now + FULL_RELOAD / 2;
        assert!(mirror.begin_load(1, drops(), soon).is_none(), "not yet");
        let later = now + FULL_RELOAD;
        let basis = mirror.begin_load(1, drops(), later).unwrap();
        mirror.apply("victim", 600 * SEC, later);
        mirror.finish_load(basis, vec![ban("late", later, SEC)], true, later);
        assert_eq!(mirror.check("victim", 1, later), Some(true));
        assert_eq!(mirror.check("late", 1, later), Some(true));
        assert_eq!(
            mirror.check("other", 1, later),
            Some(false),
            "no longer full"
        );
        // A load that could not read everything is full from the start.
        mirror.stale();
        let basis = mirror.begin_load(1, drops(), later).unwrap();
        mirror.finish_load(basis, vec![ban("a", later, SEC)], false, later);
        assert_eq!(mirror.check("a", 1, later), Some(true));
        assert_eq!(mirror.check("b", 1, later), None);
    }

    #[test]
    fn pushes_are_read_strictly() {
        assert_eq!(
            parse_push(b"60000 ann lee").unwrap(),
            ("ann lee", Duration::from_millis(60000))
        );
        for bad in [&b""[..], b"60000", b"x ann", b"-1 ann", b"1 \xff"] {
            assert!(parse_push(bad).is_err(), "{bad:?}");
        }
    }
}
