//! The control plane on Redis (see `src/bus/control.rs`): disconnect
//! orders published on the target's own channel, idempotency keys and
//! bans as keys with expiry, and the topics from Redis's own subscription
//! state.
//!
//! **Keys**, under `redis.channel_prefix` `P` (single keys: on a Redis
//! Cluster each lives on its own slot):
//!
//! | key | what | expires |
//! |---|---|---|
//! | `P:idem:<key>` | an idempotency key of `POST /api/publish`: `p:<answer>:<token>` while its publish is pending, `<answer>:<token>` once Redis ran it ([`CONFIRM`]), or `x:<token>` for a claim withdrawn because its outcome was unknown (free for any other token; see [`WITHDRAW`]) | pending: after `redis.publish_retry_ms` + `redis.reconnect_max_ms` + 3 × `redis.command_timeout_ms` + 1 s, 13 s by default (its node died before it settled: the key is free again); published: 5 minutes after its publish |
//! | `P:ban:<user>` | a ban (`POST /api/disconnect` with `ban_ms`); on a single server also published on the channel `P:bans` for the nodes' copies (`bans.rs`) | with the ban |
//!
//! **Topics** are what Redis says: `PUBSUB CHANNELS P:*` and `PUBSUB
//! NUMSUB` on a single server, `PUBSUB SHARDCHANNELS`/`SHARDNUMSUB` asked
//! of every shard on a cluster; each node holds one subscriber connection
//! (one per shard), so a channel's subscriber count is its node count.
//!
//! Every call runs on a command connection of its own (opened on first
//! use, replaced when it fails) within `redis.command_timeout_ms`; a call
//! that failed at once, on a connection that went stale while idle, is
//! made once more on a new one. That is safe for each of them: a repeated
//! `PUBLISH` of a disconnect closes nothing twice, and a claim that ran
//! already is recognised by its token.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::timeout;

use super::Shared;
use super::bans;
use super::conn::{Kept, Link, PubConn, connect_publisher, open_command_connection};
use crate::bus::BusError;
use crate::bus::control::{Claim, ControlFuture, ControlPlane, Held, Ticket};
use crate::bus::wire::{self, Control, Order};

/// `KEYS[1]` the key; `ARGV[1]` the pending value (`p:<answer>:<token>`),
/// `ARGV[2]` its expiry (ms), `ARGV[3]` the token. Returns nil when it
/// claimed the key, `x` when this very claim was withdrawn before it ran
/// ([`WITHDRAW`]), else the value already there (pending, `p:…`, or
/// published). `x:<token>` is a withdrawn claim: free for any other
/// token.
const CLAIM: &str = r"
local v = redis.call('GET', KEYS[1])
if v == 'x:' .. ARGV[3] then
  return 'x'
end
if v and string.sub(v, 1, 2) ~= 'x:' then
  return v
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false
";

/// Withdraws a claim whose outcome is unknown (it timed out): deletes it
/// when it ran, else leaves `x:<token>` so that it does nothing if it runs
/// later (a Redis busy with a slow script runs it after the node gave up;
/// it once kept the key for a message nobody published, and the retry
/// answered `duplicate`). `KEYS[1]` the key; `ARGV` the claim's value, its
/// token, the expiry (ms).
const WITHDRAW: &str = r"
local v = redis.call('GET', KEYS[1])
if v == ARGV[1] then
  redis.call('DEL', KEYS[1])
elseif not v or string.sub(v, 1, 2) == 'x:' then
  redis.call('SET', KEYS[1], 'x:' .. ARGV[2], 'PX', ARGV[3])
end
return 1
";

/// Turns a pending claim into a published one, if it is still there (a
/// claim that expired may have been taken by another request since).
/// `KEYS[1]` the key; `ARGV` the pending value, the published value, its
/// expiry (ms). Returns 1 when it did.
const CONFIRM: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
";

/// Gives a pending claim back, if it is still this one's. `KEYS[1]` the
/// key; `ARGV[1]` the pending value.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
end
return 1
";

/// How often a withdrawal that could not be made at once is tried again.
const WITHDRAW_RETRY: Duration = Duration::from_millis(250);

/// Most channels in one `PUBSUB NUMSUB`.
const NUMSUB_BATCH: usize = 500;

/// The Redis bus's control plane.
pub(super) struct RedisControl {
    shared: Arc<Shared>,
    link: Link,
    /// Replaced after the subscriber reconnects ([`Kept`]).
    conn: Kept<PubConn>,
}

fn unavailable(why: impl std::fmt::Display) -> BusError {
    BusError::Unavailable(format!("Redis unreachable: {why}"))
}

/// Redis answered with an error (`NOPERM`, `OOM`, `BUSY`): reachable, and
/// refusing (an ACL's refusal read "Redis unreachable": review of
/// 2026-12-03).
fn refused(error: redis::RedisError) -> BusError {
    BusError::Unavailable(format!("Redis refused the command: {error}"))
}

/// `*`, `?`, `[`, `]` and `\` escaped for a `PUBSUB CHANNELS` pattern.
pub(super) fn glob_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// A `PUBSUB NUMSUB` answer: channel/count pairs (an array in RESP2, a
/// map in RESP3).
fn counts(value: redis::Value) -> Vec<(String, u64)> {
    let text = |v: &redis::Value| match v {
        redis::Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        redis::Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    };
    let number = |v: &redis::Value| match v {
        redis::Value::Int(n) => u64::try_from(*n).ok(),
        _ => None,
    };
    match value {
        redis::Value::Array(items) => items
            .chunks_exact(2)
            .filter_map(|pair| Some((text(&pair[0])?, number(&pair[1])?)))
            .collect(),
        redis::Value::Map(pairs) => pairs
            .iter()
            .filter_map(|(k, v)| Some((text(k)?, number(v)?)))
            .collect(),
        _ => Vec::new(),
    }
}

impl RedisControl {
    pub(super) fn new(shared: Arc<Shared>, link: Link) -> Self {
        Self {
            shared,
            link,
            conn: Kept::default(),
        }
    }

    fn sharded(&self) -> bool {
        self.shared.config.sharded
    }

    async fn connection(&self) -> Result<PubConn, BusError> {
        let epoch = self.shared.epoch.current();
        if let Some(conn) = self.conn.get(epoch) {
            return Ok(conn);
        }
        let conn = open_command_connection(&self.link, &self.shared.config)
            .await
            .map_err(unavailable)?;
        self.conn.set(conn.clone(), epoch);
        Ok(conn)
    }

    /// Runs `cmd` within the command timeout, once more on a new
    /// connection when it failed at once (see the module docs).
    async fn run<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, BusError> {
        let limit = self.shared.config.command_timeout;
        let mut retried = false;
        loop {
            let mut conn = self.connection().await?;
            let started = tokio::time::Instant::now();
            let error = match timeout(limit, conn.query::<T>(cmd)).await {
                Ok(Ok(value)) => return Ok(value),
                // Redis answered with an error: the connection is fine.
                Ok(Err(e))
                    if !(e.is_io_error() || e.is_timeout() || e.is_connection_dropped())
                        && e.code().is_some() =>
                {
                    return Err(refused(e));
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no answer within {} ms", limit.as_millis()),
            };
            self.conn.clear();
            if retried || started.elapsed() > limit / 2 {
                return Err(unavailable(error));
            }
            retried = true;
        }
    }

    async fn publish(&self, order: &Order) -> Result<u64, BusError> {
        let Order::Disconnect { target, .. } = order;
        let shared = &self.shared;
        let channel = shared.channels.of(target);
        let payload = wire::encode_control(&Control {
            origin: shared.node_id.to_string(),
            order: order.clone(),
        });
        let mut cmd = redis::cmd(if self.sharded() {
            "SPUBLISH"
        } else {
            "PUBLISH"
        });
        cmd.arg(&channel).arg(&payload[..]);
        self.run::<u64>(&cmd).await
    }

    async fn list_topics(&self) -> Result<Vec<Held>, BusError> {
        let channels = &self.shared.channels;
        let (list, numsub) = if self.sharded() {
            ("SHARDCHANNELS", "SHARDNUMSUB")
        } else {
            ("CHANNELS", "NUMSUB")
        };
        let pattern = format!("{}*", glob_escape(channels.prefix()));
        let mut names: Vec<String> = self
            .run(redis::cmd("PUBSUB").arg(list).arg(&pattern))
            .await?;
        names.retain(|name| channels.topic(name).is_some());
        names.sort();
        names.dedup();
        let mut held = Vec::with_capacity(names.len());
        for chunk in names.chunks(NUMSUB_BATCH) {
            let value: redis::Value = self
                .run(redis::cmd("PUBSUB").arg(numsub).arg(chunk))
                .await?;
            for (name, nodes) in counts(value) {
                if nodes == 0 {
                    continue;
                }
                if let Some(topic) = channels.topic(&name) {
                    held.push(Held { topic, nodes });
                }
            }
        }
        held.sort_by(|a, b| a.topic.cmp(&b.topic));
        Ok(held)
    }

    /// Tries `withdraw` again until Redis runs it (or the key would have
    /// expired anyway), on connections of its own.
    fn withdraw_later(&self, withdraw: redis::Cmd, ttl: Duration) {
        let (link, shared) = (self.link.clone(), self.shared.clone());
        tokio::spawn(async move {
            let config = &shared.config;
            let deadline = tokio::time::Instant::now() + ttl;
            while tokio::time::Instant::now() < deadline {
                let attempt = async {
                    let mut conn = connect_publisher(&link, config).await?;
                    conn.query::<i64>(&withdraw).await
                };
                if let Ok(Ok(_)) = timeout(config.command_timeout, attempt).await {
                    tracing::info!("an idempotency key's unknown claim was withdrawn");
                    return;
                }
                tokio::time::sleep(WITHDRAW_RETRY).await;
            }
            tracing::warn!(
                "an idempotency key's unknown claim could not be withdrawn before it expired"
            );
        });
    }

    fn key(&self, kind: &str, name: &str) -> String {
        // Not `format!`: every connect's ban check names a key here, and
        // the formatting machinery cost more than the rest of the key
        // (issue 19).
        [self.shared.channels.prefix(), kind, ":", name].concat()
    }
}

impl ControlPlane for RedisControl {
    fn disconnect<'a>(&'a self, order: &'a Order) -> ControlFuture<'a, u64> {
        Box::pin(self.publish(order))
    }

    fn topics(&self) -> ControlFuture<'_, Vec<Held>> {
        Box::pin(self.list_topics())
    }

    fn claim<'a>(
        &'a self,
        key: &'a str,
        answer: u64,
        pending: Duration,
    ) -> ControlFuture<'a, Claim> {
        Box::pin(async move {
            let token = format!("{:016x}", rand::random::<u64>());
            let value = format!("p:{answer}:{token}");
            let ttl_ms = pending.as_millis() as u64;
            let key = self.key("idem", key);
            let mut cmd = redis::cmd("EVAL");
            cmd.arg(CLAIM)
                .arg(1)
                .arg(&key)
                .arg(&value)
                .arg(ttl_ms)
                .arg(&token);
            let limit = self.shared.config.command_timeout;
            let mut retried = false;
            let (mut conn, why) = loop {
                let mut conn = self.connection().await?;
                let started = tokio::time::Instant::now();
                let why = match timeout(limit, conn.query::<Option<String>>(&cmd)).await {
                    Ok(Ok(earlier)) => return claimed(earlier, &value, &token),
                    // Redis answered with an error: it did not run it.
                    Ok(Err(e))
                        if !(e.is_io_error() || e.is_timeout() || e.is_connection_dropped())
                            && e.code().is_some() =>
                    {
                        return Err(refused(e));
                    }
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => format!("no answer within {} ms", limit.as_millis()),
                };
                self.conn.clear();
                // Failed at once (a stale connection): once more on a new
                // one; the token recognises a claim that ran.
                if retried || started.elapsed() > limit / 2 {
                    break (conn, why);
                }
                retried = true;
            };
            // The outcome is unknown: Redis may run the claim later. The
            // withdrawal goes right behind it on the same connection, so
            // Redis runs it after the claim if it runs the claim at all.
            let mut withdraw = redis::cmd("EVAL");
            withdraw
                .arg(WITHDRAW)
                .arg(1)
                .arg(&key)
                .arg(&value)
                .arg(&token)
                .arg(ttl_ms);
            let done = matches!(
                timeout(limit, conn.query::<i64>(&withdraw)).await,
                Ok(Ok(_))
            );
            if done {
                return Err(unavailable(format!(
                    "{why}; the claim of the idempotency key was withdrawn"
                )));
            }
            self.withdraw_later(withdraw, pending);
            Err(unavailable(format!(
                "{why}; the claim of the idempotency key is being withdrawn (a retry may \
                 answer 503 until Redis answers again, never a duplicate of nothing)"
            )))
        })
    }

    fn confirm<'a>(
        &'a self,
        key: &'a str,
        ticket: &'a Ticket,
        ttl: Duration,
    ) -> ControlFuture<'a, bool> {
        Box::pin(async move {
            let published = ticket.0.strip_prefix("p:").unwrap_or(&ticket.0);
            let mut cmd = redis::cmd("EVAL");
            cmd.arg(CONFIRM)
                .arg(1)
                .arg(self.key("idem", key))
                .arg(&ticket.0)
                .arg(published)
                .arg(ttl.as_millis() as u64);
            // Safe to run twice (`run` may): the second finds it published.
            self.run::<i64>(&cmd).await.map(|done| done == 1)
        })
    }

    fn release<'a>(&'a self, key: &'a str, ticket: &'a Ticket) -> ControlFuture<'a, ()> {
        Box::pin(async move {
            let mut cmd = redis::cmd("EVAL");
            cmd.arg(RELEASE)
                .arg(1)
                .arg(self.key("idem", key))
                .arg(&ticket.0);
            self.run::<i64>(&cmd).await.map(|_| ())
        })
    }

    fn ban<'a>(&'a self, user: &'a str, ttl: Duration) -> ControlFuture<'a, ()> {
        Box::pin(async move {
            let ms = (ttl.as_millis() as u64).max(1);
            let key = self.key("ban", user);
            if self.sharded() {
                let mut cmd = redis::cmd("SET");
                cmd.arg(key).arg(1).arg("PX").arg(ms);
                return self.run::<()>(&cmd).await;
            }
            // The key and the push that keeps the nodes' copies current,
            // in one step (`bans.rs`). Safe to run twice (`run` may): the
            // second replaces the first.
            let mut cmd = redis::cmd("EVAL");
            cmd.arg(bans::BAN)
                .arg(1)
                .arg(key)
                .arg(ms)
                .arg(&self.shared.bans_channel)
                .arg(user);
            self.run::<i64>(&cmd).await.map(|_| ())
        })
    }

    fn banned_here(&self, user: &str) -> Option<bool> {
        // Only while every live node publishes its bans: one of an older
        // build only sets the key (`bans.rs`).
        let shared = &self.shared;
        let gate = &shared.gate;
        if self.sharded() || !gate.bans_pushed() {
            return None;
        }
        // A subscriber connection that went deaf, unnoticed yet, brings
        // no more bans: the copy answers only while a probe came back on
        // it within two probe intervals (the third review: a ban made
        // while the connection was silently dead let a socket in).
        if shared
            .probe_age()
            .is_none_or(|age| age > shared.config.probe_interval * 2)
        {
            return None;
        }
        self.shared
            .bans
            .check(user, gate.bans_epoch(), tokio::time::Instant::now())
    }

    fn banned<'a>(&'a self, user: &'a str) -> ControlFuture<'a, bool> {
        Box::pin(async move {
            self.run::<bool>(redis::cmd("EXISTS").arg(self.key("ban", user)))
                .await
        })
    }
}

/// What the claim script's answer means for the claim of `value`.
fn claimed(earlier: Option<String>, value: &str, token: &str) -> Result<Claim, BusError> {
    let ours = || Claim::Ours(Ticket(value.to_owned()));
    let Some(earlier) = earlier else {
        return Ok(ours());
    };
    // Our own claim, made by a first try whose answer was lost.
    if earlier == value {
        return Ok(ours());
    }
    if earlier == "x" {
        return Err(unavailable(format!(
            "the claim {token} was withdrawn before it ran"
        )));
    }
    if earlier.starts_with("p:") {
        return Ok(Claim::Pending);
    }
    let answer = earlier
        .split_once(':')
        .and_then(|(n, _)| n.parse().ok())
        .unwrap_or(0);
    Ok(Claim::Done(answer))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_are_escaped() {
        assert_eq!(glob_escape("wshub:"), "wshub:");
        assert_eq!(glob_escape("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\");
    }

    #[test]
    fn numsub_answers_of_both_protocols_are_read() {
        use redis::Value::{Array, BulkString, Int, Map};
        let resp2 = Array(vec![
            BulkString(b"wshub:all".to_vec()),
            Int(3),
            BulkString(b"wshub:g:x".to_vec()),
            Int(0),
        ]);
        assert_eq!(
            counts(resp2),
            [("wshub:all".to_owned(), 3), ("wshub:g:x".to_owned(), 0)]
        );
        let resp3 = Map(vec![(BulkString(b"wshub:n".to_vec()), Int(2))]);
        assert_eq!(counts(resp3), [("wshub:n".to_owned(), 2)]);
    }
}
