//! Cluster presence on Redis: the [`Store`] of `src/bus/presence.rs`, on
//! the node registry's leases.
//!
//! **Layout**, every key in the registry's hash tag `T` = `{P:registry}`
//! (one slot on a Redis Cluster: each script reads the live node set):
//!
//! | key | type | what |
//! |---|---|---|
//! | `T:pg-` / `T:pg+<G>` | hash | the null group / group `G`: user → JSON `{"<member>":<sockets>}` per node incarnation holding it |
//! | `T:pm-` / `T:pm+<G>` | hash | the group's `v`, and member → how many users it holds there (whom to send join/leave frames) |
//! | `T:pp-` / `T:pp+<G>` | string | while the group is over `max_members_events`: its users before the join that took it over (JSON, sorted), to tell at its return whether the lists kept from events need the whole list; deleted when a socket reads the list meanwhile (then the whole list is sent) |
//! | `T:pu:<U>` | hash | member → the user's sockets on that node (online/offline, `/api/presence/users`) |
//! | `T:ps:<U>` | sorted set | the per-user limit: `<member>#<socket id>` scored by when it opened |
//! | `T:ph:<member>` | set | what a node holds, so a survivor can sweep it when it dies |
//! | `T:pc:<member>` | list | control items for a node (join/leave frames, sockets to replace), popped by its `BLPOP` |
//! | `T:pleases` | sorted set | every node incarnation that may hold something, scored by when it may be swept (its lease's expiry, renewed by its heartbeat) |
//! | `T:psweep:<member>` | string | a sweep's claim (`SET NX PX`) |
//! | `T:pepoch` | string | a random value set when missing: changes when Redis restarts empty |
//!
//! One Lua script does everything ([`SCRIPT`], sent as `EVALSHA`, reloaded
//! by the `redis` crate after a restart): a write decides atomically
//! whether it was a cluster-wide join, leave, online or offline, so exactly
//! one node learns of each; `v` is `max(v + 1, Redis's clock in µs)`, so
//! it grows even across a Redis restart or a group that emptied.
//!
//! **Dead nodes.** The registry's heartbeat renews the member's score in
//! `T:pleases` with its lease (a node that stops gracefully scores itself
//! `leave_delay_ms` ahead, so users who reconnect elsewhere meanwhile
//! cause no events) and says how many members are due; a node that sees
//! some claims each with `SET NX PX` and sweeps it in batches, reporting
//! the leaves and offlines. A member that heartbeats again before its
//! sweep is not swept. Reads keep only holdings of live members, so a
//! dead node's users vanish from answers at its lease's expiry, before the
//! sweep.
//!
//! **Restarts.** `T:pepoch` tells a Redis that restarted empty from one
//! that did not: a write with an old epoch is refused (`Emptied`) and the
//! heartbeat notices it too; the node then writes everything it holds
//! again, silently. A node that missed its lease and came back (same
//! epoch) writes everything again *with* events, since the sweep may have
//! announced its users' leaves.
//!
//! **Control items** are pushed by the script (in `v` order, per group)
//! onto each receiving node's list and popped by one `BLPOP` (timeout 0) on
//! a connection of their own: nothing is sent while nothing happens.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::Shared;
use super::conn::{Backoff, Kept, Link, PubConn, connect_blocking, open_command_connection};
use crate::bus::BusError;
use crate::bus::presence::{
    Answer, Change, Control, GroupView, Holding, Member, Op, Sink, Store, UserView, Written,
};
use crate::config::PresenceConfig;

/// Control items popped per `LPOP` after a `BLPOP` returned one.
const CONTROL_BATCH: usize = 256;
/// Holdings removed per sweep call.
const SWEEP_BATCH: usize = 200;
/// Dead members claimed per look.
const SWEEP_CLAIMS: usize = 16;

/// The presence script. `ARGV`: 1 the key prefix `T:`, 2 the mode, 3 this
/// node's member, 4 the epoch the node knows ("" = any), 5 a new epoch in
/// case there is none, 6 `max_members_events`, 7 how long a control list
/// lives (ms), 8 silent ("1"), then the mode's arguments. Answers
/// `{epoch, status, payload}`.
const SCRIPT: &str = r#"
local P = ARGV[1]
local mode = ARGV[2]
local me = ARGV[3]
local maxev = tonumber(ARGV[6])
local ctl_ttl = tonumber(ARGV[7])
local silent = ARGV[8] == '1'
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local function fmt(n) return string.format('%.0f', n) end

local epoch = redis.call('GET', P .. 'pepoch')
if not epoch then
  epoch = ARGV[5]
  redis.call('SET', P .. 'pepoch', epoch)
end
if mode == 'write' and ARGV[4] ~= '' and ARGV[4] ~= epoch then
  return {epoch, 'emptied', {}}
end

local live_set = nil
local function live()
  if not live_set then
    live_set = {}
    for _, m in ipairs(redis.call('ZRANGEBYSCORE', P .. 'nodes', '(' .. fmt(now_ms), '+inf')) do
      live_set[m] = true
    end
  end
  return live_set
end

local function push(m, item)
  local k = P .. 'pc:' .. m
  redis.call('RPUSH', k, item)
  redis.call('PEXPIRE', k, ctl_ttl)
end

local out = {}

-- A group's members as the snapshot lists them: user, connections on live
-- nodes, flattened; and whether it left out a holding of a dead node (one
-- not swept yet).
local function members_of(g)
  local l = live()
  local res = {}
  local dead = false
  local all = redis.call('HGETALL', P .. 'pg' .. g)
  for i = 1, #all, 2 do
    local n, held = 0, false
    for m, c in pairs(cjson.decode(all[i + 1])) do
      if l[m] then held = true; n = n + c else dead = true end
    end
    if held then res[#res + 1] = all[i]; res[#res + 1] = fmt(n) end
  end
  return res, dead
end

-- The users of the group hash `gk` but `but`, sorted, as one string.
local function names_of(gk, but)
  local names = {}
  for _, name in ipairs(redis.call('HKEYS', gk)) do
    if name ~= but then names[#names + 1] = name end
  end
  table.sort(names)
  return cjson.encode(names)
end

local function set_group(m, g, u, count)
  local gk = P .. 'pg' .. g
  local mk = P .. 'pm' .. g
  local hk = P .. 'ph:' .. m
  local token = 'g' .. #g .. ':' .. g .. u
  local raw = redis.call('HGET', gk, u)
  local cur = {}
  if raw then cur = cjson.decode(raw) end
  local existed = raw ~= false
  local had = cur[m]
  if count < 0 then
    if had == nil then return end
    cur[m] = nil
    if redis.call('HINCRBY', mk, m, -1) <= 0 then redis.call('HDEL', mk, m) end
    redis.call('SREM', hk, token)
  else
    if had == count then return end
    -- No sockets left, kept through the leave delay: only a holding that
    -- is there is kept. One that is not was swept while this node was
    -- stalled (its leave announced) or never written: writing it would
    -- announce a join, then a leave after the delay (review of 2026-12-03).
    -- Except silently, after Redis restarted empty: kept there, a user
    -- who comes back within the delay causes no join, as before.
    if had == nil and count == 0 and not silent then return end
    cur[m] = count
    if had == nil then
      redis.call('HINCRBY', mk, m, 1)
      redis.call('SADD', hk, token)
    end
  end
  local exists = next(cur) ~= nil
  if exists then redis.call('HSET', gk, u, cjson.encode(cur)) else redis.call('HDEL', gk, u) end
  local v = tonumber(redis.call('HGET', mk, 'v') or '0')
  v = math.max(v + 1, now_us)
  redis.call('HSET', mk, 'v', fmt(v))
  local kind = false
  if exists and not existed then kind = 'join' elseif existed and not exists then kind = 'leave' end
  if kind and not silent then
    out[#out + 1] = {kind, g, u, fmt(v)}
    -- Over maxev members a group gets no frames; the leave that brings it
    -- back to maxev sends the whole list instead, so that lists kept from
    -- events are right again (they missed the changes made meanwhile),
    -- unless the members are those the lists hold: the ones before the
    -- join that took the group over, kept at that join (a user joining and
    -- leaving at the limit would otherwise send the list every time).
    local size = redis.call('HLEN', gk)
    local pk = P .. 'pp' .. g
    local item = nil
    if size < maxev or (size == maxev and kind == 'join') then
      item = cjson.encode({kind, g, u, fmt(v)})
    elseif size == maxev + 1 and kind == 'join' then
      redis.call('SET', pk, names_of(gk, u))
    elseif size == maxev then
      if redis.call('GET', pk) ~= names_of(gk, nil) then
        item = cjson.encode({'snap', g, fmt(v), (members_of(g))})
      end
      redis.call('DEL', pk)
    end
    if item then
      local l = live()
      for _, n in ipairs(redis.call('HKEYS', mk)) do
        if n ~= 'v' and l[n] then push(n, item) end
      end
    end
  end
  if redis.call('HLEN', gk) == 0 then redis.call('DEL', mk, P .. 'pp' .. g) end
end

local function set_user(m, u, count)
  local uk = P .. 'pu:' .. u
  local hk = P .. 'ph:' .. m
  local had = redis.call('HGET', uk, m)
  local existed = redis.call('EXISTS', uk) == 1
  if count < 0 then
    if not had then return end
    redis.call('HDEL', uk, m)
    redis.call('SREM', hk, 'u' .. u)
  else
    if had and tonumber(had) == count then return end
    if not had and count == 0 and not silent then return end
    redis.call('HSET', uk, m, count)
    if not had then redis.call('SADD', hk, 'u' .. u) end
  end
  local exists = redis.call('EXISTS', uk) == 1
  if not silent then
    if exists and not existed then out[#out + 1] = {'online', u}
    elseif existed and not exists then out[#out + 1] = {'offline', u} end
  end
end

local function socket_held(m, u, id, since)
  redis.call('ZADD', P .. 'ps:' .. u, since, m .. '#' .. id)
  redis.call('SADD', P .. 'ph:' .. m, 's' .. id .. ':' .. u)
end

-- The user's sockets on live nodes (this one included), oldest first.
local function alive_sockets(u)
  local l = live()
  local alive = {}
  for _, e in ipairs(redis.call('ZRANGE', P .. 'ps:' .. u, 0, -1)) do
    local node = string.match(e, '^(.*)#%d+$')
    if node and (l[node] or node == me) then alive[#alive + 1] = e end
  end
  return alive
end

-- Replaces the first n of `alive` (the oldest): each node closes its own.
local function replace_first(u, alive, n)
  for i = 1, n do
    local e = alive[i]
    local node, id = string.match(e, '^(.*)#(%d+)$')
    redis.call('ZREM', P .. 'ps:' .. u, e)
    redis.call('SREM', P .. 'ph:' .. node, 's' .. id .. ':' .. u)
    push(node, cjson.encode({'replace', id}))
  end
end

local function socket_gone(m, u, id)
  redis.call('ZREM', P .. 'ps:' .. u, m .. '#' .. id)
  redis.call('SREM', P .. 'ph:' .. m, 's' .. id .. ':' .. u)
end

if mode == 'write' then
  local i = 9
  while i <= #ARGV do
    local op = ARGV[i]
    if op == 'g' then
      set_group(me, ARGV[i + 1], ARGV[i + 2], tonumber(ARGV[i + 3])); i = i + 4
    elseif op == 'u' then
      set_user(me, ARGV[i + 1], tonumber(ARGV[i + 2])); i = i + 3
    elseif op == 'h' then
      local u, max = ARGV[i + 1], tonumber(ARGV[i + 4])
      socket_held(me, u, ARGV[i + 2], ARGV[i + 3])
      -- A node back after missing its lease brings back sockets the
      -- cluster took for dead: past the limit, the oldest are replaced.
      if max > 0 then
        local alive = alive_sockets(u)
        if #alive > max then replace_first(u, alive, #alive - max) end
      end
      i = i + 5
    elseif op == 'x' then
      socket_gone(me, ARGV[i + 1], ARGV[i + 2]); i = i + 3
    else
      return redis.error_reply('unknown presence op')
    end
  end
  return {epoch, 'ok', out}
end

if mode == 'admit' then
  local u = ARGV[9]
  local alive = alive_sockets(u)
  local max = tonumber(ARGV[11])
  if #alive >= max then
    if ARGV[12] == '1' then return {epoch, 'refused', {}} end
    replace_first(u, alive, #alive - max + 1)
  end
  socket_held(me, u, ARGV[10], fmt(now_ms))
  return {epoch, 'ok', {}}
end

if mode == 'group' then
  local g = ARGV[9]
  -- A list a socket reads while the group is over maxev holds users the
  -- lists kept from events do not: at its return the group sends its list
  -- whatever its users are then (a socket that took its list meanwhile
  -- kept the users who left after). The API's reads keep no list.
  if ARGV[10] == '1' then
    redis.call('DEL', P .. 'pp' .. g)
  end
  local members, dead = members_of(g)
  local mk = P .. 'pm' .. g
  local v = redis.call('HGET', mk, 'v') or '0'
  if dead then
    -- The list differs from the one `v` was given for (a dead node's
    -- users are left out before its sweep): a new `v`, kept, so that
    -- every change, and the sweep's leaves after it, count higher.
    v = fmt(math.max(tonumber(v) + 1, now_us))
    redis.call('HSET', mk, 'v', v)
  end
  return {epoch, v, members}
end

if mode == 'users' then
  local l = live()
  local res = {}
  for i = 9, #ARGV do
    local all = redis.call('HGETALL', P .. 'pu:' .. ARGV[i])
    local n, held = 0, '0'
    for j = 1, #all, 2 do
      if l[all[j]] then held = '1'; n = n + tonumber(all[j + 1]) end
    end
    res[#res + 1] = held
    res[#res + 1] = fmt(n)
  end
  return {epoch, 'ok', res}
end

if mode == 'claim' then
  local grace = tonumber(ARGV[11])
  -- A node that reports but posts no backend events waits only while a
  -- live node that posts them is there to sweep instead.
  if ARGV[12] == 'if-events' then
    local wait = false
    for m, _ in pairs(live()) do
      if redis.call('HGET', P .. 'node:' .. m, 'events') == '1' then
        wait = true
        break
      end
    end
    if not wait then grace = 0 end
  end
  local due = redis.call('ZRANGEBYSCORE', P .. 'pleases', '-inf', fmt(now_ms - grace), 'LIMIT', 0, tonumber(ARGV[9]))
  local mine = {}
  for _, m in ipairs(due) do
    if redis.call('SET', P .. 'psweep:' .. m, me, 'NX', 'PX', tonumber(ARGV[10])) then
      mine[#mine + 1] = m
    end
  end
  return {epoch, 'ok', mine}
end

if mode == 'sweep' then
  local dm = ARGV[9]
  local sc = redis.call('ZSCORE', P .. 'pleases', dm)
  if not sc or tonumber(sc) > now_ms then
    redis.call('DEL', P .. 'psweep:' .. dm)
    return {epoch, 'done', out}
  end
  for _, it in ipairs(redis.call('SPOP', P .. 'ph:' .. dm, tonumber(ARGV[10]))) do
    local k = string.sub(it, 1, 1)
    if k == 'g' then
      local colon = string.find(it, ':', 2, true)
      local len = tonumber(string.sub(it, 2, colon - 1))
      set_group(dm, string.sub(it, colon + 1, colon + len), string.sub(it, colon + len + 1), -1)
    elseif k == 'u' then
      set_user(dm, string.sub(it, 2), -1)
    elseif k == 's' then
      local colon = string.find(it, ':', 2, true)
      redis.call('ZREM', P .. 'ps:' .. string.sub(it, colon + 1), dm .. '#' .. string.sub(it, 2, colon - 1))
    end
  end
  if redis.call('SCARD', P .. 'ph:' .. dm) == 0 then
    redis.call('ZREM', P .. 'pleases', dm)
    redis.call('DEL', P .. 'pc:' .. dm, P .. 'psweep:' .. dm)
    return {epoch, 'done', out}
  end
  return {epoch, 'more', out}
end

return redis.error_reply('unknown presence mode')
"#;

/// The group token of the script: `-` for the null group, `+<G>` for `G`
/// (so no group name can be mistaken for the null group).
fn group_token(group: Option<&str>) -> String {
    match group {
        None => "-".into(),
        Some(g) => format!("+{g}"),
    }
}

fn parse_group_token(token: &str) -> Option<Option<Arc<str>>> {
    match token.split_at_checked(1)? {
        ("-", "") => Some(None),
        ("+", g) => Some(Some(g.into())),
        _ => None,
    }
}

/// One transition from the script's `{kind, g, u, v}` / `{kind, u}`.
fn parse_change(item: &[String]) -> Option<Change> {
    match item {
        [kind, g, u, v] if kind == "join" || kind == "leave" => {
            let (group, user, v) = (parse_group_token(g)?, u.as_str().into(), v.parse().ok()?);
            Some(if kind == "join" {
                Change::Join { group, user, v }
            } else {
                Change::Leave { group, user, v }
            })
        }
        [kind, u] if kind == "online" => Some(Change::Online(u.as_str().into())),
        [kind, u] if kind == "offline" => Some(Change::Offline(u.as_str().into())),
        _ => None,
    }
}

/// One control item from a node's list.
fn parse_control(text: &str) -> Option<Control> {
    use serde_json::Value;
    let item: Vec<Value> = serde_json::from_str(text).ok()?;
    let text = |i: usize| item.get(i).and_then(Value::as_str);
    match (text(0)?, item.len()) {
        (kind @ ("join" | "leave"), 4) => Some(Control::Member {
            joined: kind == "join",
            group: parse_group_token(text(1)?)?,
            user: text(2)?.into(),
            v: text(3)?.parse().ok()?,
        }),
        ("replace", 2) => Some(Control::Replace(text(1)?.parse().ok()?)),
        ("snap", 4) => {
            let group = parse_group_token(text(1)?)?;
            // The script's flat list; Lua's cjson writes an empty one as {}.
            let flat: Vec<&str> = match &item[3] {
                Value::Array(flat) => flat.iter().map(Value::as_str).collect::<Option<_>>()?,
                Value::Object(empty) if empty.is_empty() => Vec::new(),
                _ => return None,
            };
            Some(Control::Snapshot(group_view(
                group.as_deref(),
                text(2)?.parse().ok()?,
                &flat,
            )?))
        }
        _ => None,
    }
}

/// A group's view from the script's flat `[user, connections, …]`,
/// sorted by user id; `None` for an odd list.
fn group_view(group: Option<&str>, v: u64, flat: &[impl AsRef<str>]) -> Option<GroupView> {
    if !flat.len().is_multiple_of(2) {
        return None;
    }
    let mut members: Vec<Member> = flat
        .chunks_exact(2)
        .map(|pair| Member {
            user_id: pair[0].as_ref().to_owned(),
            connections: pair[1].as_ref().parse().unwrap_or(0),
        })
        .collect();
    members.sort_by(|a, b| a.user_id.cmp(&b.user_id));
    Some(GroupView {
        group: group.map(str::to_owned),
        members,
        v,
    })
}

/// The Redis presence store; see the module docs. Built by the registry,
/// which feeds it what each heartbeat saw ([`after_beat`](Self::after_beat)).
pub(super) struct RedisPresence {
    shared: Arc<Shared>,
    link: Link,
    /// `T:`, the prefix of every key.
    prefix: String,
    /// This node incarnation's member (the registry's).
    member: String,
    config: PresenceConfig,
    /// The script's SHA1 as `SCRIPT LOAD` answered; loaded again when
    /// Redis forgot it (`NOSCRIPT`, after a restart).
    sha: Mutex<Option<String>>,
    /// The command connection, replaced after the subscriber reconnects.
    conn: Kept<PubConn>,
    /// The epoch this node last saw (see the module docs).
    epoch: Mutex<Option<String>>,
    sink: OnceLock<Weak<dyn Sink>>,
    /// A sweep task is running.
    sweeping: AtomicBool,
    /// Tells the control loop to open a new connection (its `BLPOP` may be
    /// waiting on one that died without an error).
    reconnect: Notify,
    stop: CancellationToken,
    tasks: TaskTracker,
}

impl RedisPresence {
    pub(super) fn new(
        shared: Arc<Shared>,
        link: Link,
        prefix: String,
        member: String,
        config: PresenceConfig,
        stop: CancellationToken,
        tasks: TaskTracker,
    ) -> Self {
        Self {
            shared,
            link,
            prefix,
            member,
            config,
            sha: Mutex::new(None),
            conn: Kept::default(),
            epoch: Mutex::new(None),
            sink: OnceLock::new(),
            sweeping: AtomicBool::new(false),
            reconnect: Notify::new(),
            stop,
            tasks,
        }
    }

    fn lock_epoch(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.epoch.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn sink(&self) -> Option<Arc<dyn Sink>> {
        self.sink.get().and_then(Weak::upgrade)
    }

    /// The command connection, opened when there is none or the one there
    /// is was opened before the subscriber last reconnected: a Redis that
    /// restarted closed it, and a node that wrote nothing since (no sockets
    /// to write back) would otherwise find out only by failing a call
    /// (a review saw each idle node's first presence answer after a Redis
    /// restart be a 503, and a socket refused for it, Redis long back).
    async fn connection(&self) -> Result<PubConn, String> {
        let epoch = self.shared.epoch.current();
        if let Some(conn) = self.conn.get(epoch) {
            return Ok(conn);
        }
        let conn = open_command_connection(&self.link, &self.shared.config).await?;
        self.conn.set(conn.clone(), epoch);
        Ok(conn)
    }

    /// Runs the script in `mode` with the mode's arguments; answers the
    /// status and the payload, and records the epoch.
    async fn call<T: redis::FromRedisValue>(
        &self,
        mode: &str,
        silent: bool,
        args: &[String],
    ) -> Result<(String, T), BusError> {
        let unavailable = |why: String| BusError::Unavailable(format!("Redis unreachable: {why}"));
        let mut conn = self.connection().await.map_err(unavailable)?;
        let known = self.lock_epoch().clone().unwrap_or_default();
        let mut argv = Vec::with_capacity(8 + args.len());
        argv.extend([
            self.prefix.clone(),
            mode.to_owned(),
            self.member.clone(),
            known,
            format!("{:016x}", rand::random::<u64>()),
            self.config.max_members_events.to_string(),
            self.ctl_ttl_ms().to_string(),
            if silent { "1" } else { "0" }.to_owned(),
        ]);
        argv.extend_from_slice(args);
        let command_timeout = self.shared.config.command_timeout;
        let answer = timeout(command_timeout, self.evalsha(&mut conn, &argv)).await;
        let (epoch, status, payload): (String, String, T) = match answer {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) => {
                self.conn.clear();
                return Err(unavailable(e.to_string()));
            }
            Err(_) => {
                self.conn.clear();
                return Err(unavailable(format!(
                    "no answer within {} ms",
                    command_timeout.as_millis()
                )));
            }
        };
        if status != "emptied" {
            let mut known = self.lock_epoch();
            if known.is_none() {
                *known = Some(epoch);
            }
        } else {
            *self.lock_epoch() = Some(epoch);
        }
        Ok((status, payload))
    }

    /// Runs the script with `argv`, loading it first when Redis does not
    /// know it. Its one key is the epoch's, so that a Redis Cluster routes
    /// it to the slot of every presence key.
    async fn evalsha<T: redis::FromRedisValue>(
        &self,
        conn: &mut PubConn,
        argv: &[String],
    ) -> redis::RedisResult<T> {
        let mut loaded_now = false;
        loop {
            let sha = self.sha.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let sha = match sha {
                Some(sha) => sha,
                None => {
                    let mut load = redis::cmd("SCRIPT");
                    // On a cluster the crate sends it to every primary.
                    load.arg("LOAD").arg(SCRIPT);
                    let sha: String = conn.query(&load).await?;
                    *self.sha.lock().unwrap_or_else(|e| e.into_inner()) = Some(sha.clone());
                    loaded_now = true;
                    sha
                }
            };
            let mut cmd = redis::cmd("EVALSHA");
            cmd.arg(&sha)
                .arg(1)
                .arg(format!("{}pepoch", self.prefix))
                .arg(argv);
            match conn.query(&cmd).await {
                Err(e)
                    if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript)
                        && !loaded_now =>
                {
                    *self.sha.lock().unwrap_or_else(|e| e.into_inner()) = None;
                }
                other => return other,
            }
        }
    }

    /// How long after a dead member fell due a node that does not report
    /// sweeps waits for one that does: two leases (every live node
    /// heartbeats several times within one).
    fn quiet_grace(&self) -> Duration {
        self.config.lease.saturating_mul(2)
    }

    /// A control list outlives a dead node by a few leases at most.
    fn ctl_ttl_ms(&self) -> u64 {
        (self.config.lease.as_millis() as u64)
            .saturating_mul(3)
            .max(1000)
    }

    /// What a heartbeat saw: the epoch, whether this node's member was
    /// added anew (it had missed its lease, or Redis is new), and how many
    /// dead members are due for a sweep.
    pub(super) fn after_beat(self: &Arc<Self>, epoch: String, added: bool, due: u64) {
        let previous = self.lock_epoch().replace(epoch.clone());
        match previous {
            Some(before) if before != epoch => {
                info!("Redis was emptied (restarted): writing this node's presence again");
                self.reconnect.notify_one();
                if let Some(sink) = self.sink() {
                    sink.restore(true);
                }
            }
            Some(_) if added => {
                warn!(
                    "this node missed its lease (it or Redis stalled longer than presence.lease_ms): writing its presence again; if another node swept it meanwhile, its users' leaves were announced, and their joins are announced again now"
                );
                if let Some(sink) = self.sink() {
                    sink.restore(false);
                }
            }
            _ => {}
        }
        if due > 0 && !self.sweeping.swap(true, Ordering::AcqRel) {
            let me = self.clone();
            self.tasks.spawn(async move {
                me.sweep().await;
                me.sweeping.store(false, Ordering::Release);
            });
        }
    }

    /// The heartbeat works again after failing: the control loop's
    /// connection may have died silently.
    pub(super) fn redis_back(&self) {
        self.reconnect.notify_one();
    }

    /// Claims the dead members that are due and sweeps each. A node that
    /// does not report what it sweeps ([`Sink::reports`]: presence off
    /// here) claims a member only [`quiet_grace`](Self::quiet_grace) after
    /// it fell due, leaving it to a node that does (review of 2026-12-02:
    /// a presence-off node won the sweeps of a mixed cluster, and the
    /// backend never heard of the dead node's users leaving); one that
    /// reports but posts no backend events ([`Sink::posts_events`]) waits
    /// as long while a live node that posts them is registered (its
    /// `events` field), and not at all when none is.
    async fn sweep(&self) {
        let claim_for = self.config.lease.max(Duration::from_secs(5));
        let sink = self.sink();
        let (grace, when) = match sink.as_ref().map(|s| (s.reports(), s.posts_events())) {
            Some((true, true)) => (Duration::ZERO, "always"),
            // Reports to sockets, posts nothing to a backend: waits if a
            // live node posts events (review of 2026-12-03: a node
            // without `backend.events` won a sweep and the backend never
            // heard of 60 users going offline), else sweeps at once.
            Some((true, false)) => (self.quiet_grace(), "if-events"),
            _ => (self.quiet_grace(), "always"),
        };
        let args = [
            SWEEP_CLAIMS.to_string(),
            (claim_for.as_millis() as u64).to_string(),
            (grace.as_millis() as u64).to_string(),
            when.to_string(),
        ];
        let claimed = match self.call::<Vec<String>>("claim", false, &args).await {
            Ok((_, claimed)) => claimed,
            Err(error) => {
                debug!(%error, "could not claim dead nodes to sweep; the next heartbeat tries again");
                return;
            }
        };
        for dead in claimed {
            let mut changes = Vec::new();
            let mut rounds = 0u32;
            loop {
                if self.stop.is_cancelled() {
                    return;
                }
                let args = [dead.clone(), SWEEP_BATCH.to_string()];
                match self.call::<Vec<Vec<String>>>("sweep", false, &args).await {
                    Ok((status, out)) => {
                        changes.extend(out.iter().filter_map(|c| parse_change(c)));
                        rounds += 1;
                        if status != "more" {
                            break;
                        }
                    }
                    Err(error) => {
                        warn!(%error, node = %dead, "sweeping a dead node's presence failed; its claim expires and a node sweeps it again");
                        break;
                    }
                }
            }
            self.shared.metrics.presence_sweep();
            info!(
                node = %dead,
                rounds,
                transitions = changes.len(),
                "swept a dead node's presence"
            );
            if let Some(sink) = self.sink() {
                sink.swept(changes);
            }
        }
    }

    /// Hands one control item to the node.
    fn deliver(&self, item: &str) {
        match parse_control(item) {
            Some(control) => {
                if let Some(sink) = self.sink() {
                    sink.control(control);
                }
            }
            None => debug!("ignoring an unreadable presence control item"),
        }
    }

    /// Pops this node's control list until the bus stops.
    async fn control_loop(self: Arc<Self>) {
        let key = format!("{}pc:{}", self.prefix, self.member);
        let mut backoff = Backoff::new(self.shared.config.reconnect_max);
        let config = self.shared.config.clone();
        // A new connection when the subscriber reconnects: the Redis this
        // one is on may be gone, or no longer the primary ([`Epoch`]).
        let mut epoch = self.shared.epoch.watch();
        'connect: loop {
            epoch.borrow_and_update();
            let connected = tokio::select! {
                biased;
                () = self.stop.cancelled() => return,
                c = timeout(config.command_timeout, connect_blocking(&self.link, &config)) => c,
            };
            let mut conn = match connected {
                Ok(Ok(conn)) => conn,
                failed => {
                    let why = match failed {
                        Ok(Err(e)) => e.to_string(),
                        _ => "timed out".into(),
                    };
                    debug!(error = %why, "presence control connection failed; retrying");
                    tokio::select! {
                        () = self.stop.cancelled() => return,
                        () = tokio::time::sleep(backoff.step()) => continue 'connect,
                    }
                }
            };
            loop {
                let mut cmd = redis::cmd("BLPOP");
                cmd.arg(&key).arg(0);
                let popped = tokio::select! {
                    biased;
                    () = self.stop.cancelled() => return,
                    () = self.reconnect.notified() => continue 'connect,
                    _ = epoch.changed() => continue 'connect,
                    popped = async {
                        match &mut conn {
                            PubConn::Single(c) => cmd.query_async::<Option<(String, String)>>(c).await,
                            PubConn::Sharded(c) => cmd.query_async::<Option<(String, String)>>(c).await,
                        }
                    } => popped,
                };
                match popped {
                    Ok(Some((_, item))) => {
                        backoff.reset();
                        self.deliver(&item);
                        // What else is waiting, in batches: one round trip
                        // per item cannot keep up with a busy group.
                        let mut more = redis::cmd("LPOP");
                        more.arg(&key).arg(CONTROL_BATCH);
                        loop {
                            let batch = tokio::select! {
                                biased;
                                () = self.stop.cancelled() => return,
                                batch = conn.query::<Option<Vec<String>>>(&more) => batch,
                            };
                            match batch {
                                Ok(Some(items)) => {
                                    for item in &items {
                                        self.deliver(item);
                                    }
                                    if items.len() < CONTROL_BATCH {
                                        break;
                                    }
                                }
                                Ok(None) => break,
                                Err(error) => {
                                    debug!(%error, "presence control connection lost; reconnecting");
                                    continue 'connect;
                                }
                            }
                        }
                    }
                    Ok(None) => {}
                    Err(error) => {
                        debug!(%error, "presence control connection lost; reconnecting");
                        tokio::select! {
                            () = self.stop.cancelled() => return,
                            () = tokio::time::sleep(backoff.step()) => continue 'connect,
                        }
                    }
                }
            }
        }
    }
}

/// The store as the node sees it (the registry hands out an `Arc`).
pub(super) struct Handle(pub(super) Arc<RedisPresence>);

impl Store for Handle {
    fn start(&self, sink: Weak<dyn Sink>) {
        if self.0.sink.set(sink).is_ok() {
            self.0.tasks.spawn(self.0.clone().control_loop());
        }
    }

    fn write<'a>(&'a self, ops: &'a [Op], silent: bool) -> Answer<'a, Written> {
        Box::pin(async move {
            let mut args = Vec::with_capacity(ops.len() * 4);
            for op in ops {
                match op {
                    Op::Set(Holding::Group { group, user }, count) => {
                        args.push("g".into());
                        args.push(group_token(group.as_deref()));
                        args.push(user.to_string());
                        args.push(count.map_or(-1, i64::from).to_string());
                    }
                    Op::Set(Holding::User(user), count) => {
                        args.push("u".into());
                        args.push(user.to_string());
                        args.push(count.map_or(-1, i64::from).to_string());
                    }
                    Op::SocketHeld {
                        user,
                        id,
                        since_ms,
                        max,
                    } => {
                        args.push("h".into());
                        args.push(user.to_string());
                        args.push(id.to_string());
                        args.push(since_ms.to_string());
                        args.push(max.to_string());
                    }
                    Op::SocketGone { user, id } => {
                        args.push("x".into());
                        args.push(user.to_string());
                        args.push(id.to_string());
                    }
                }
            }
            let (status, out) = self
                .0
                .call::<Vec<Vec<String>>>("write", silent, &args)
                .await?;
            self.0.shared.metrics.presence_write();
            if status == "emptied" {
                return Ok(Written::Emptied);
            }
            Ok(Written::Applied(
                out.iter().filter_map(|c| parse_change(c)).collect(),
            ))
        })
    }

    fn admit<'a>(&'a self, user: &'a str, id: u64, max: usize, refuse: bool) -> Answer<'a, bool> {
        Box::pin(async move {
            let args = [
                user.to_owned(),
                id.to_string(),
                max.to_string(),
                if refuse { "1" } else { "0" }.to_owned(),
            ];
            let (status, _) = self.0.call::<Vec<String>>("admit", false, &args).await?;
            self.0.shared.metrics.presence_write();
            Ok(status == "ok")
        })
    }

    fn group<'a>(&'a self, group: Option<&'a str>, for_socket: bool) -> Answer<'a, GroupView> {
        Box::pin(async move {
            let args = [
                group_token(group),
                if for_socket { "1" } else { "0" }.to_owned(),
            ];
            let (v, flat) = self.0.call::<Vec<String>>("group", false, &args).await?;
            group_view(group, v.parse().unwrap_or(0), &flat)
                .ok_or_else(|| BusError::Unavailable("Redis answered an odd members list".into()))
        })
    }

    fn users<'a>(&'a self, ids: &'a [String]) -> Answer<'a, Vec<UserView>> {
        Box::pin(async move {
            let (_, flat) = self.0.call::<Vec<String>>("users", false, ids).await?;
            Ok(flat
                .chunks_exact(2)
                .map(|pair| UserView {
                    online: pair[0] == "1",
                    connections: pair[1].parse().unwrap_or(0),
                })
                .collect())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_tokens_tell_the_null_group_from_every_name() {
        for group in [None, Some(""), Some("-"), Some("+x"), Some("chat")] {
            let token = group_token(group);
            assert_eq!(
                parse_group_token(&token),
                Some(group.map(Arc::from)),
                "{token}"
            );
        }
        assert_eq!(parse_group_token(""), None);
        assert_eq!(parse_group_token("-x"), None);
    }

    #[test]
    fn control_items_and_changes_parse() {
        assert_eq!(
            parse_control(r#"["join","+chat","ann","13"]"#),
            Some(Control::Member {
                joined: true,
                group: Some("chat".into()),
                user: "ann".into(),
                v: 13
            })
        );
        assert_eq!(
            parse_control(r#"["replace","7"]"#),
            Some(Control::Replace(7))
        );
        assert_eq!(parse_control(r#"["replace","x"]"#), None);
        assert_eq!(parse_control("nonsense"), None);
        let member = |user: &str, connections| Member {
            user_id: user.into(),
            connections,
        };
        assert_eq!(
            parse_control(r#"["snap","+big","20",["dan","1","ann","2"]]"#),
            Some(Control::Snapshot(GroupView {
                group: Some("big".into()),
                members: vec![member("ann", 2), member("dan", 1)],
                v: 20
            }))
        );
        // Lua's cjson writes an empty list as an object.
        assert_eq!(
            parse_control(r#"["snap","-","21",{}]"#),
            Some(Control::Snapshot(GroupView {
                group: None,
                members: vec![],
                v: 21
            }))
        );
        assert_eq!(parse_control(r#"["snap","+big","20",["dan"]]"#), None);
        assert_eq!(parse_control(r#"["snap","+big","20",[1, 2]]"#), None);
        let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            parse_change(&s(&["leave", "-", "bob", "9"])),
            Some(Change::Leave {
                group: None,
                user: "bob".into(),
                v: 9
            })
        );
        assert_eq!(
            parse_change(&s(&["offline", "bob"])),
            Some(Change::Offline("bob".into()))
        );
        assert_eq!(parse_change(&s(&["what", "bob"])), None);
    }
}
