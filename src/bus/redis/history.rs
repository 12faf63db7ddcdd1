//! History in Redis: the publish script that stamps and records every
//! message, and the [`History`] the node reads from (`history.enabled`).
//!
//! # Why a script, and one per batch
//!
//! A message's position (its topic's epoch and offset) must be in the copy
//! that subscribers receive, so that a node can notice a gap and a client
//! can say where it stopped. The offsets only exist once Redis has counted
//! the message, so the counting, the append to the topic's history and the
//! `PUBLISH` of the stamped payload must happen in one step inside Redis:
//! a Lua script. One script call carries a whole publish batch (the
//! publisher's pipeline of up to [`MAX_BATCH`](super::MAX_BATCH) messages):
//! per call a script costs far more than a `PUBLISH`, per message in a
//! batch much less (about 58k/s at 16 messages per call against 26–30k/s at
//! one, on one Redis 7 core).
//!
//! # Redis layout
//!
//! Under the channel prefix `P` (`redis.channel_prefix`); `K` is the topic's
//! wire key (`all`, `n`, `g:<G>`, `u:<U>`, as in `wire.rs`), inside a
//! `{hash tag}` (on a Redis Cluster the keys are named after the topic's
//! channel's slot instead, and there is no `P:seq` nor `P:pub:…`: see
//! `history/sharded.rs`, which holds everything that differs there):
//!
//! | key | type | holds | kept |
//! |---|---|---|---|
//! | `P:h:{K}:m` | hash | `e` the epoch, `o` the top offset, `r` the Redis `run_id` the epoch was made under, `a` set once the topic is adopted | adopted: `max(10 × ttl, 24 h)`, renewed by every publish, read, `tops` and `peek`; not adopted: `ttl`, renewed by every publish |
//! | `P:h:{K}:s` | stream | one entry per message, id `<offset>-1`, field `d` = the stamped payload (route, frame, stamp, `ts`), field `s` = its `seq` (for the catch-up's bound, without decoding the payload) | `XADD MAXLEN ~ size_*`; `PEXPIRE ttl` on every publish |
//! | `P:h:{K}:x` | hash | excluded runs: per user, `<epoch>` and `<first> <last>` of each of the newest four runs of consecutive offsets whose messages all excluded that user | `ttl`, renewed by every message that excludes someone; emptied when it holds `4 × size_*` users |
//! | `P:seq` | string | the publish sequence (`s` in every stamp) | always |
//! | `P:pub:<instance>` | string | the highest message number of one bus instance the script has run | `max(10 × ttl, 24 h)`, renewed by every batch |
//! | `P:ho:<JSON [user, group or null]>` | list | drain handoffs: JSON `[position or null ×3]` | `ttl`; at most [`HANDOFFS_KEPT`] |
//!
//! **Epochs.** A topic's epoch is made by a script from Redis's `TIME`
//! (base 36, no `:`) when the topic has none, *or when its `r` is not the
//! `run_id` of the Redis the node is connected to* (read with `INFO server`
//! on every connection). So a Redis restart, with or without persistence,
//! and a restore from an older snapshot all start every topic's history
//! afresh, and a position from before names an epoch that no longer exists:
//! a resume across it says `recovered: false`, never a replay of the wrong
//! messages under reused offsets. The price: a Sentinel failover (another
//! server, another `run_id`) also starts every topic afresh.
//!
//! **Adoption.** A topic's meta outlives its history so that a client at
//! the top of a quiet topic (nothing missed, its stream long expired) is
//! still recovered: its epoch must not be made afresh. That matters only
//! for topics someone holds positions in, so a meta is kept long only
//! once the topic is *adopted*: read by a socket (`tops`, a resume's read,
//! a legacy socket's `peek`), published to while some node is subscribed
//! to it (`PUBLISH` answers how many are), or caught up by a node that
//! tracks it (its first message may have reached the node only that way). Until then it lives
//! as long as the topic's history (`ttl`). A client writing to ever new
//! user ids that nobody is connected as (review of 2026-12-01) so leaves
//! keys for `ttl`, like the messages themselves, not for a day each.
//!
//! **Resending is safe.** With history on, a batch whose outcome is unknown
//! (a timeout, a broken connection) is sent again after the reconnect
//! (`publisher.rs`). Each message carries its bus instance's number for it
//! (given in queue order by the one publisher task); the script first
//! raises the instance's high-water mark `P:pub:<instance>` to the batch's
//! highest number, then runs only the messages above the mark it found. A
//! batch that ran is therefore skipped whole when it comes again, however
//! late (even when a paused Redis runs both copies after it resumes).
//!
//! **Excluded runs.** A client's position in a topic moves only with the
//! messages it receives, so messages that exclude it (`excludeUser`: a
//! typing notice to a group, skipping its sender) leave its position
//! behind; after more than `size_*` of them its position has left the
//! stream, and a resume after even a short drop could not be told that
//! nothing it should have had is missing. So the publish script keeps, per
//! topic and per excluded user, the newest four runs of consecutive
//! offsets whose messages all excluded that user (`P:h:{K}:x`; a message
//! that does not exclude the user ends a run, since the next exclusion no
//! longer follows it), and the resume's read ([`READ_MANY_LUA`]) starts
//! after a run's end when the client's position is inside the run or just
//! before it (four, not one: a client away while one message it missed
//! and then more exclusions came needs the run before that message): what it passes over is, by the run, nothing the user's
//! sockets would have been given. A message that excludes more than
//! [`RUN_USERS`] users keeps no runs (the users' runs then end there: a
//! resume passes over less, never more). Losing the hash (expiry, the
//! `4 × size_*` bound, a Redis restart) only makes resumes as they were
//! without it.
//!
//! # Rejected alternatives
//!
//! - **A dedupe key per message** (`SET P:id:<id> NX PX ttl`, the first
//!   design): one key per message for `ttl` (about 10 MB per 120,000
//!   messages), and one that expires lets a resend that waited out a pause
//!   run twice. The mark costs one key per node instance. It relies on one
//!   thing, checked in `publisher.rs`: the numbers are given when the
//!   publisher takes a message from its queue, never in `publish`, where
//!   two tasks could push in the opposite order of their numbers.
//! - **`MULTI`/`EXEC` instead of a script**: a transaction cannot use the
//!   offset `HINCRBY` returns inside the payload it then publishes.
//! - **Reading the streams instead of pub/sub** (`XREAD` per topic): a node
//!   holds thousands of user topics; one blocking read per topic does not
//!   scale, and pub/sub already delivers to exactly the subscribed ones.
//! - **`math.random` for epochs**: Redis seeds it identically on every
//!   script call; `TIME` differs.
//! - **redis-rs's `Script`**: it needs the crate's `script` feature and a
//!   SHA-1 dependency; `SCRIPT LOAD` answers with the hash anyway, and it is
//!   run on every connection.
//!
//! # Reads: one snapshot each
//!
//! Every read of several topics starts with one script, so it is one
//! snapshot: the resume's read of a socket's three topics
//! ([`READ_MANY_LUA`]; see `src/resume/decision.rs` for why a snapshot)
//! and the subscriber's catch-up of every topic it tracks
//! ([`CATCH_UP_LUA`]; see `gaps.rs`). One script is also one round trip
//! however many topics it reads (on one Redis, where every key is; on a
//! Cluster each topic is read by its own call, in its slot: a snapshot per
//! topic, `history/sharded.rs`).
//!
//! The resume's script reads the tops and about [`READ_STEP_BYTES`] of
//! entries; a socket that missed more is read on in further steps of that
//! size, up to the tops the first one found
//! ([`RedisHistory::read_stepped`]). The positions a client sends decide
//! how far back a resume reads, so one script reading everything (up to
//! every entry of three topics, 90 MB at the defaults) let any client hold
//! Redis for a quarter of a second per connect. A node has at most
//! [`READS_AT_ONCE`] steps in flight; `history.max_replay_bytes`, when
//! set, bounds the whole read.
//!
//! Redis must never evict these keys: `maxmemory-policy` `noeviction`.
//! Losing a meta hash or a stream only makes a resume or a repair say it
//! could not, but a lost mark would let a resent batch run twice, and the
//! marks have a TTL, so a `volatile-*` policy may evict them as
//! `allkeys-*` would. See docs/cluster.md ("Managed Redis services").

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::body::Bytes;
use redis::aio::{ConnectionLike, MultiplexedConnection};
use tokio::time::timeout;

use super::conn::{Epoch, Link, PubConn, connect_publisher};
use super::queue::{Outgoing, Recorded};
use crate::bus::wire::{self, Channels};
use crate::config::{HistoryConfig, RedisConfig};
use crate::envelope::Envelope;
use crate::history::{History, HistoryError, HistoryFuture, Position, Positions, Read, Recent};
use crate::message::Frame;
use crate::route::{Identity, Route, Topic};

/// Most handoffs kept per identity (the oldest go first): a socket per
/// tab, not an unbounded list when a client reconnects in a loop.
pub(crate) const HANDOFFS_KEPT: usize = 32;

/// The most users a message may exclude for the publish script to keep
/// their runs ("Excluded runs" in the module docs): each costs the script
/// a read and a write per topic.
pub(super) const RUN_USERS: usize = 8;

/// The excluded runs (see the module docs), shared by both publish
/// scripts: `exclude(meta, epoch, offset, users, size, ttl)` records that
/// the message at `offset` of the topic whose meta hash is `meta` excluded
/// each of `users`: it extends the user's newest run when that ends just
/// before, else starts a run, keeping the newest 4 (a client that was away
/// while a message it missed broke its run needs the run before). The
/// runs hash is the meta's name with `x` for its last letter (same hash
/// tag, same slot on a Cluster). Best effort: run it with `pcall`, a
/// failure only loses runs.
macro_rules! runs_lua {
    () => {
        r#"
local function exclude(meta, e, o, users, size, ttl)
  local runs = string.sub(meta, 1, -2) .. 'x'
  if redis.call('HLEN', runs) >= 4 * tonumber(size) then
    redis.call('DEL', runs)
  end
  local n = tonumber(o)
  for _, user in ipairs(users) do
    -- `<epoch> <first> <last>`, newest run first, at most 4 runs.
    local kept, value = {}, redis.call('HGET', runs, user)
    if value then
      local re, rest = string.match(value, '^(%S+)(.*)$')
      if re == e then
        for first, last in string.gmatch(rest, ' (%d+) (%d+)') do
          kept[#kept + 1] = {first, last}
        end
      end
    end
    if kept[1] and tonumber(kept[1][2]) + 1 == n then
      kept[1][2] = o
    else
      table.insert(kept, 1, {o, o})
      kept[5] = nil
    end
    local out = {e}
    for _, run in ipairs(kept) do
      out[#out + 1] = run[1] .. ' ' .. run[2]
    end
    redis.call('HSET', runs, user, table.concat(out, ' '))
  end
  redis.call('PEXPIRE', runs, ttl)
end
"#
    };
}

/// The epoch function every script shares (see the module docs).
macro_rules! epoch_lua {
    () => {
        r#"
local function b36(n)
  local digits = '0123456789abcdefghijklmnopqrstuvwxyz'
  local out = ''
  repeat
    local d = n % 36
    out = string.sub(digits, d + 1, d + 1) .. out
    n = (n - d) / 36
  until n == 0
  return out
end

-- The epoch of the topic whose meta hash is `meta`, made afresh (its
-- stream deleted, its offset back to 0) when it has none or was made under
-- another Redis run than `run`; and whether the topic is adopted (`a`: a
-- socket holds positions in it, so its meta is kept `max(10 x ttl, 24 h)`,
-- not `ttl`).
local function epoch_of(meta, stream, run)
  local m = redis.call('HMGET', meta, 'e', 'r', 'a')
  if m[1] and m[2] == run then
    return m[1], m[3]
  end
  local t = redis.call('TIME')
  local e = b36(tonumber(t[1])) .. string.sub('000' .. b36(tonumber(t[2])), -4)
  if e == m[1] then
    e = e .. 'z'
  end
  redis.call('DEL', stream)
  redis.call('HSET', meta, 'e', e, 'o', 0, 'r', run)
  return e, m[3]
end
"#
    };
}

/// The run id of the server a script runs on, when the caller does not
/// know it (`ARGV[1]` empty: on a Cluster, where the node does not know
/// which shard holds a slot; see `history/sharded.rs`). On one Redis the
/// node passes it (read once per connection), and this does nothing.
macro_rules! run_lua {
    () => {
        r#"
if ARGV[1] == '' then
  ARGV[1] = string.match(redis.call('INFO', 'server'), 'run_id:(%w+)')
end
"#
    };
}

/// The outcome of a publish script, shared by both scripts.
///
/// `heard(reply)`: whether a `PUBLISH` (or `SPUBLISH`) run with `pcall`
/// reached a subscriber; a refused one (an ACL without the channel, say)
/// reached none, and its error is kept. Why not `redis.call`: an error
/// stops a script where it is, after the batch's high-water mark was
/// raised and with the messages after the refused one never recorded. The
/// publisher sends the batch again on an error reply, the mark makes that
/// a no-op, and those messages were lost without a trace (offsets stay
/// contiguous: no subscriber sees a gap). With `pcall` every message is
/// recorded (and stamped), a subscriber finds the ones it did not hear at
/// its next copy's jump and reads them from history, and the error still
/// reaches the publisher, which counts and logs it
/// (`wshub_bus_publish_failures_total`).
///
/// `went(number, ok, err)`: whether a message's stamping on one topic
/// (its `INCR`, epoch and offset, run with Lua's `pcall`) went through, or
/// the `PUBLISH` of a message relayed as it is (to connections: no history
/// to read a refused one from); when not, the message is published without
/// that topic (or not at all, when it has no other), its number is noted
/// as lost and the first error kept. The same reasoning: a key of another
/// type in wshub's namespace, or an ACL without a command the stamping
/// calls, once stopped the script at that message, and every message after
/// it in the batch (other topics', other clients') was lost with it.
///
/// `published(sent)`: the script's answer, `sent`, or once the whole
/// batch has run an error reply: [`LOST`] with the lost numbers and
/// the first error (`LOST 3,4 WRONGTYPE …`), else
/// [`UNHEARD`] with the first refusal (`UNHEARD NOPERM …`). Either tells
/// the publisher the batch ran whole: nothing to send again, no pause.
macro_rules! heard_lua {
    () => {
        r#"
local refused, failed, lost = nil, nil, {}
local function heard(reply)
  if type(reply) == 'table' and reply.err then
    refused = refused or reply.err
    return false
  end
  return reply > 0
end
local function went(number, ok, err)
  if ok then
    return true
  end
  if type(err) == 'table' then
    err = err.err
  end
  failed = failed or tostring(err)
  if lost[#lost] ~= number then
    lost[#lost + 1] = number
  end
  return false
end
local function published(sent)
  if failed then
    return redis.error_reply('LOST ' .. table.concat(lost, ',') .. ' ' .. failed)
  end
  if refused then
    return redis.error_reply('UNHEARD ' .. refused)
  end
  return sent
end
"#
    };
}

mod reply;
mod sharded;

/// The error code of a publish script whose batch ran whole but some of
/// whose `PUBLISH`es Redis refused ([`heard_lua`]).
pub(super) const UNHEARD: &str = "UNHEARD";

/// The error code of a publish script whose batch ran whole but some of
/// whose messages could not be stamped on some of their topics, or
/// relayed ([`heard_lua`]): `LOST <numbers> <first error>`.
const LOST: &str = "LOST";

/// A publish that ran whole but could not stamp some of its messages on
/// some of their topics (a key of another type in wshub's namespace, an
/// ACL without a command the stamping calls), or could not relay some
/// (an ACL without a connection's channel): those were published without
/// those topics, or not at all; the rest of the batch was.
#[derive(Debug)]
pub(super) struct Lost {
    /// The numbers of the messages that missed at least one of their
    /// topics (`Recorded::number`), ascending.
    pub(super) numbers: Vec<u64>,
    /// The first error Redis gave.
    pub(super) error: String,
}

/// The numbers and the first error of a `LOST` answer
/// ([`heard_lua`]); `None` for any other error.
fn lost_of(e: &redis::RedisError) -> Option<(Vec<u64>, String)> {
    if e.code() != Some(LOST) {
        return None;
    }
    let (numbers, error) = e.detail()?.split_once(' ')?;
    let numbers = numbers
        .split(',')
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    Some((numbers, error.to_owned()))
}

use reply::{ReadReply, bad, caught, contiguous, entries, number, read_reply, text};

/// Stamps, records and publishes one batch.
///
/// KEYS: `[1]` the sequence, `[2]` this instance's high-water mark, then per
/// message per topic its meta and stream keys.
/// ARGV: `[1]` run id, `[2]` stream ttl ms, `[3]` meta ttl ms, `[4]` the id
/// prefix (a JSON string without its closing quote), `[5]` the batch's
/// highest number, `[6]` message count; then per message its number, header
/// prefix, frame and topic count, the count of users whose runs it extends
/// and their names, and per topic its JSON key, channel and size (a topic
/// count of 0, without the users: a message relayed as it is, its whole payload
/// in place of the header prefix and an empty frame, then its channel
/// count and channels). Returns how many messages ran (the others had run before), or,
/// when a message could not be stamped on a topic or a `PUBLISH` was
/// refused, an error once every message has run ([`heard_lua`]).
const PUBLISH_LUA: &str = concat!(
    epoch_lua!(),
    heard_lua!(),
    runs_lua!(),
    r#"
local run, ttl, mttl, idp = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local hw = tonumber(redis.call('GET', KEYS[2]) or '0')
if tonumber(ARGV[5]) > hw then
  redis.call('SET', KEYS[2], ARGV[5], 'PX', mttl)
end
-- A message's stamp on one topic: its epoch, whether it is adopted, and
-- its offset (run with `pcall`: `went` in `heard_lua`).
local function stamp(meta, stream)
  local e, was_adopted = epoch_of(meta, stream, run)
  return e, was_adopted, string.format('%d', redis.call('HINCRBY', meta, 'o', 1))
end
local a, k, sent, excluded = 7, 3, 0, {}
for _ = 1, tonumber(ARGV[6]) do
  local number, prefix, frame, nt = ARGV[a], ARGV[a + 1], ARGV[a + 2], tonumber(ARGV[a + 3])
  a = a + 4
  local ok, seq = false, nil
  if nt == 0 then
    -- Relayed as it is, in its place among the others (a message to
    -- connections: no history): `prefix` is the whole payload, then the
    -- channel count and the channels.
    local c = tonumber(ARGV[a])
    if tonumber(number) > hw then
      for j = 1, c do
        local reply = redis.pcall('PUBLISH', ARGV[a + j], prefix)
        if type(reply) == 'table' and reply.err then
          went(number, false, reply.err)
        end
      end
      sent = sent + 1
    end
    a = a + 1 + c
  else
    -- The users it excludes (for their runs), then the topics.
    local nx = tonumber(ARGV[a])
    for j = 1, nx do
      excluded[j] = ARGV[a + j]
    end
    for j = nx + 1, #excluded do
      excluded[j] = nil
    end
    a = a + 1 + nx
    if tonumber(number) > hw then
      ok, seq = pcall(redis.call, 'INCR', KEYS[1])
      ok = went(number, ok, seq)
    end
  end
  if ok then
    -- The topics stamped (`live`, by index) and their parts of the stamp.
    local parts, live, offsets, adopted, epochs = {}, {}, {}, {}, {}
    for t = 0, nt - 1 do
      local ok, e, was_adopted, o = pcall(stamp, KEYS[k + 2 * t], KEYS[k + 2 * t + 1])
      if went(number, ok, e) then
        live[#live + 1] = t
        adopted[t + 1] = was_adopted and true or false
        offsets[t + 1] = o
        epochs[t + 1] = e
        parts[#parts + 1] = ARGV[a + 3 * t] .. ':"' .. e .. ':' .. o .. '"'
      end
    end
    local payload = prefix .. ',"i":' .. idp .. '-' .. number .. '","s":' .. string.format('%d', seq)
      .. ',"p":{' .. table.concat(parts, ',') .. '}}\n' .. frame
    for _, t in ipairs(live) do
      local stream = KEYS[k + 2 * t + 1]
      -- pcall: an entry that cannot be added (a stream someone else wrote
      -- to) leaves a hole that readers see, never half a batch.
      redis.pcall('XADD', stream, 'MAXLEN', '~', ARGV[a + 3 * t + 2], offsets[t + 1] .. '-1',
        'd', payload, 's', string.format('%d', seq))
      redis.call('PEXPIRE', stream, ttl)
      if #excluded > 0 then
        pcall(exclude, KEYS[k + 2 * t], epochs[t + 1], offsets[t + 1], excluded, ARGV[a + 3 * t + 2], ttl)
      end
    end
    for _, t in ipairs(live) do
      -- A topic some node is subscribed to (or one a socket read) is
      -- adopted: its meta is kept long. One nobody listens to (a client
      -- writing to ever new user ids) is kept as long as its history.
      local meta = KEYS[k + 2 * t]
      if heard(redis.pcall('PUBLISH', ARGV[a + 3 * t + 1], payload)) and not adopted[t + 1] then
        redis.call('HSET', meta, 'a', '1')
        adopted[t + 1] = true
      end
      if adopted[t + 1] then
        redis.call('PEXPIRE', meta, mttl)
      else
        redis.call('PEXPIRE', meta, ttl)
      end
    end
    sent = sent + 1
  end
  k = k + 2 * nt
  a = a + 3 * nt
end
return published(sent)
"#
);

/// The tops of some topics, making an epoch where there is none.
/// KEYS: meta, stream per topic. ARGV: run id, meta ttl ms.
/// Returns `[epoch, offset]` per topic, flattened.
const TOPS_LUA: &str = concat!(
    run_lua!(),
    epoch_lua!(),
    r#"
local out = {}
for i = 1, #KEYS, 2 do
  local e, adopted = epoch_of(KEYS[i], KEYS[i + 1], ARGV[1])
  out[#out + 1] = e
  if not adopted then
    redis.call('HSET', KEYS[i], 'a', '1')
  end
  redis.call('PEXPIRE', KEYS[i], ARGV[2])
  out[#out + 1] = redis.call('HGET', KEYS[i], 'o')
end
return out
"#
);

/// The tops of some topics without making an epoch, adopting each that has
/// one (its meta is then kept long: a legacy socket's drain handoff may
/// name its epoch; see "Adoption" in the module docs).
/// KEYS: meta, stream per topic. ARGV: run id, meta ttl ms.
/// Returns `[epoch, offset]` per topic, flattened; `''` and `'0'` for a
/// topic without an epoch of this Redis run.
const PEEK_LUA: &str = concat!(
    run_lua!(),
    r#"
local out = {}
for i = 1, #KEYS, 2 do
  local m = redis.call('HMGET', KEYS[i], 'e', 'o', 'r', 'a')
  if m[1] and m[2] and m[3] == ARGV[1] then
    if not m[4] then
      redis.call('HSET', KEYS[i], 'a', '1')
    end
    redis.call('PEXPIRE', KEYS[i], ARGV[2])
    out[#out + 1] = m[1]
    out[#out + 1] = m[2]
  else
    out[#out + 1] = ''
    out[#out + 1] = '0'
  end
end
return out
"#
);

/// Some topics' entries after a position each, with their tops, in one
/// atomic step (the resume's snapshot, `src/resume/decision.rs`), reading
/// at most about a byte budget of entries.
///
/// KEYS: meta, stream per topic. ARGV: `[1]` run id, `[2]` meta ttl ms,
/// `[3]` the most entries per topic, `[4]` the byte budget, `[5]` the
/// reader's user (`''`: none); then per topic
/// the epoch asked for, the offset after which to read and the last offset
/// to read (`0`: the top). Returns `[epoch, top offset, entries, after]` per
/// topic, where `after` is the offset read after: the one given, or the
/// end of the reader's excluded run when the offset given is inside it or
/// just before it ("Excluded runs" in the module docs). The entries are
/// those from the one after `after` on, in order, up to
/// the last offset or until the budget is spent (counting every field of
/// every entry), whichever comes first; once it is spent, later topics get
/// their tops only. No entries when the epoch differs, nothing follows the
/// offset, or more than the most do. The epoch `''`
/// ([`Position::unborn`]) asks for the current epoch from its start, and
/// makes none: `['', '0', []]` when the topic has none.
///
/// The entries are read a few at a time (`XRANGE … COUNT`, at most 8, as
/// many as fit the rest of the budget at the largest entry seen so far,
/// one to begin with), and at most 256 in a call, so that one call reads
/// at most the budget and 8 entries more, whatever the entries weigh and
/// in whatever order: a client chooses how far back a resume reads
/// (`docs/security.md`).
const READ_MANY_LUA: &str = concat!(
    run_lua!(),
    epoch_lua!(),
    r#"
local run, mttl, most, budget, user = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
local used, largest, taken, MOST_TAKEN = 0, 0, 0, 256
local out = {}
-- Where the reader's run of excluded messages in the topic whose meta is
-- `meta` (epoch `e`) lets a read after `after` start instead, up to `last`.
local function passed(meta, e, after, last)
  local ok, value = pcall(redis.call, 'HGET', string.sub(meta, 1, -2) .. 'x', user)
  if ok and value then
    local re, rest = string.match(value, '^(%S+)(.*)$')
    if re == e then
      for first, final in string.gmatch(rest, ' (%d+) (%d+)') do
        if tonumber(first) <= after + 1 and tonumber(final) > after then
          return math.min(tonumber(final), last)
        end
      end
    end
  end
  return after
end
for i = 1, #KEYS / 2 do
  local meta, stream = KEYS[2 * i - 1], KEYS[2 * i]
  local b = 3 + 3 * i
  local want = ARGV[b]
  if want == '' then
    local m = redis.call('HMGET', meta, 'e', 'r')
    if m[1] and m[2] == run then
      want = m[1]
    end
  end
  if want == '' then
    out[i] = {'', '0', {}}
  else
    local e, adopted = epoch_of(meta, stream, run)
    if not adopted then
      redis.call('HSET', meta, 'a', '1')
    end
    redis.call('PEXPIRE', meta, mttl)
    local o = tonumber(redis.call('HGET', meta, 'o'))
    local after, last = tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2])
    if last == 0 or last > o then
      last = o
    end
    if user ~= '' and e == want and after < last then
      after = passed(meta, e, after, last)
    end
    local entries = {}
    if e == want and after < last and last - after <= most then
      local from = after
      while from < last and used < budget and taken < MOST_TAKEN do
        -- As many as fit the rest of the budget at the largest size seen,
        -- at most 8: small entries first cannot make one XRANGE take
        -- hundreds of big ones (review of 2026-12-01). And at most 256 in
        -- a call, however small: each costs Lua a table.
        local count = 1
        if largest > 0 then
          count = math.max(1, math.min(8, math.floor((budget - used) / largest)))
        end
        count = math.min(count, MOST_TAKEN - taken)
        local got = redis.call('XRANGE', stream, string.format('%d', from + 1) .. '-0',
          string.format('%d', last) .. '-1', 'COUNT', count)
        for _, entry in ipairs(got) do
          entries[#entries + 1] = entry
          local size = 0
          for _, field in ipairs(entry[2]) do
            size = size + #field
          end
          used = used + size
          largest = math.max(largest, size)
        end
        taken = taken + #got
        if #got < count then
          break
        end
        from = tonumber(string.match(got[#got][1], '^(%d+)-'))
      end
    end
    out[i] = {e, string.format('%d', o), entries, string.format('%d', after)}
  end
end
return out
"#
);

/// The subscriber's catch-up (`gaps.rs`): every tracked topic's entries
/// after the last offset delivered, in one atomic step. It makes an epoch
/// only for a topic the node asks it to (`make`: sockets hold positions
/// in it, yet it has no epoch of this Redis run: Redis restarted without
/// its data, or the meta expired), so that the node can tell those sockets
/// where the topic goes on from. With a bound (a `seq`), only the entries published before it:
/// each stream is scanned from its top down past the entries at or above
/// the bound (`s`, the entry's `seq`), which are few (those still on their
/// way to the node).
///
/// Every topic read that has an epoch, or is given one, is adopted (see
/// "Adoption" in the module docs).
///
/// KEYS: meta, stream per topic. ARGV: `[1]` run id, `[2]` the bound (0:
/// none), `[3]` the most entries in all, `[4]` the most bytes in all, `[5]`
/// the meta ttl ms; then
/// per topic the epoch known (`''`: none), the last offset delivered, the
/// most entries of the topic, and `make` (`1`: make the topic an epoch
/// when it has none of this Redis run). Returns per topic `[epoch, top,
/// from, reach, entries, whole, made]`: `epoch` `''` when the topic has no
/// epoch of this Redis run and none was made (then nothing else counts);
/// `made` 1 when this call made it (at offset 0, nothing to read); `from` the offset read after (the
/// one given, or 0 in another epoch); `reach` the last offset the answer
/// is for (the top, or the last below the bound); `entries` those from
/// `from + 1` to `reach` that are kept, and `whole` 0 when there were too
/// many to read (none are given). Entries are read 64 at a time, and the
/// scan for the bound 16 at a time: once the bytes read (both counted)
/// pass the most ([`MAX_CATCH_UP_BYTES`]), the topic being read and every
/// later one are too many (so one catch-up reads about that many bytes at
/// most, however big the messages clients sent; a topic whose scan was cut
/// short is a gap up to where the scan got).
const CATCH_UP_LUA: &str = concat!(
    run_lua!(),
    epoch_lua!(),
    r#"
local run, bound, budget, bytes, mttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
local used, CATCH_UP_STEP = 0, 64
local function offset_of(id)
  return tonumber(string.match(id, '^(%d+)-'))
end
local function seq_of(entry)
  local f = entry[2]
  for k = 1, #f - 1, 2 do
    if f[k] == 's' then
      return tonumber(f[k + 1])
    end
  end
  return nil
end
local out = {}
for i = 1, #KEYS / 2 do
  local meta, stream = KEYS[2 * i - 1], KEYS[2 * i]
  local a = 2 + 4 * i
  local most = tonumber(ARGV[a + 2])
  local m = redis.call('HMGET', meta, 'e', 'o', 'r', 'a')
  if (not m[1] or not m[2] or m[3] ~= run) and ARGV[a + 3] == '1' then
    local e = epoch_of(meta, stream, run)
    redis.call('HSET', meta, 'a', '1')
    redis.call('PEXPIRE', meta, mttl)
    out[i] = {e, '0', '0', '0', {}, 1, 1}
  elseif not m[1] or not m[2] or m[3] ~= run then
    out[i] = {'', '0', '0', '0', {}, 1, 0}
  else
    -- A topic the node tracks is adopted: its sockets may hold positions
    -- in it (its first messages may have come through a catch-up, never
    -- through a PUBLISH anyone heard).
    if not m[4] then
      redis.call('HSET', meta, 'a', '1')
      redis.call('PEXPIRE', meta, mttl)
    end
    local e, top = m[1], tonumber(m[2])
    local from = 0
    if e == ARGV[a] then
      from = math.min(tonumber(ARGV[a + 1]), top)
    end
    local reach = top
    if bound > 0 and most > 0 then
      local hi = top
      while hi > from and used <= bytes do
        local got = redis.call('XREVRANGE', stream, string.format('%d', hi) .. '-1',
          string.format('%d', from + 1) .. '-0', 'COUNT', 16)
        local below = false
        for _, entry in ipairs(got) do
          -- The scan reads whole entries too: counted (review of
          -- 2026-12-01).
          for _, field in ipairs(entry[2]) do
            used = used + #field
          end
          local s = seq_of(entry)
          if s and s >= bound then
            reach = offset_of(entry[1]) - 1
          else
            below = true
            break
          end
        end
        if below or #got < 16 then
          break
        end
        hi = offset_of(got[#got][1]) - 1
      end
    end
    local entries, whole = {}, 1
    local want = reach - from
    if want > 0 then
      if want > most or want > budget or used > bytes then
        whole = 0
      else
        local after = from
        while after < reach do
          local got = redis.call('XRANGE', stream, string.format('%d', after + 1) .. '-0',
            string.format('%d', reach) .. '-1', 'COUNT', CATCH_UP_STEP)
          for _, entry in ipairs(got) do
            entries[#entries + 1] = entry
            for _, field in ipairs(entry[2]) do
              used = used + #field
            end
          end
          if used > bytes then
            whole, entries = 0, {}
            break
          end
          if #got < CATCH_UP_STEP then
            break
          end
          after = offset_of(got[#got][1])
        end
        budget = budget - #entries
      end
    end
    out[i] = {e, string.format('%d', top), string.format('%d', from),
      string.format('%d', reach), entries, whole, 0}
  end
end
return out
"#
);

/// Starts a topic's history afresh (`gaps.rs`, "Rolling enable"): a new
/// epoch at offset 0, its stream deleted, so that no position from before
/// names the epoch any more. A topic without an epoch of this Redis run is
/// left alone (no position names one; nothing is created).
/// KEYS: meta, stream. ARGV: run id, meta ttl ms. Returns the new epoch,
/// or `''`.
const RENEW_LUA: &str = concat!(
    run_lua!(),
    epoch_lua!(),
    r#"
local m = redis.call('HMGET', KEYS[1], 'e', 'r')
if not (m[1] and m[2] == ARGV[1]) then
  return ''
end
local t = redis.call('TIME')
local e = b36(tonumber(t[1])) .. string.sub('000' .. b36(tonumber(t[2])), -4)
if e == m[1] then
  e = e .. 'z'
end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[1], 'e', e, 'o', 0, 'r', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return e
"#
);

/// Takes a drain handoff: every handoff stored under `KEYS[1]`, oldest
/// first, of which the last (the newest) is removed. The taker replays
/// from the earliest position among them ([`History::handoff_take`]);
/// taking the newest leaves the earliest for the tabs still to come. Sent
/// as `EVAL` (a handful of bytes, once per socket that takes a handoff),
/// so nothing needs loading.
const TAKE_LUA: &str = r"
local all = redis.call('LRANGE', KEYS[1], 0, -1)
if #all > 0 then
  redis.call('RPOP', KEYS[1])
end
return all
";

/// The Redis keys of history, under the channel prefix.
#[derive(Debug, Clone)]
pub(super) struct Keys {
    /// `P:`
    prefix: String,
    /// On a Cluster: a topic's keys are in its channel's slot
    /// (`history/sharded.rs`).
    sharded: bool,
}

impl Keys {
    pub(super) fn new(channel_prefix: &str, sharded: bool) -> Self {
        Self {
            prefix: format!("{channel_prefix}:"),
            sharded,
        }
    }

    /// What a topic's keys start with: `P:h:{K}` on one Redis, on a
    /// Cluster `P:h:{<the channel's hash tag>}:K`.
    fn topic(&self, topic: &Topic) -> String {
        let key = wire::topic_key(topic);
        if !self.sharded {
            return format!("{}h:{{{key}}}", self.prefix);
        }
        let channel = format!("{}{key}", self.prefix);
        format!("{}h:{{{}}}:{key}", self.prefix, sharded::slot_tag(&channel))
    }

    /// Writes the topic's meta hash ([`meta`](Self::meta)) as the next
    /// argument of `cmd` (one Redis only).
    fn write_meta(&self, cmd: &mut redis::Cmd, topic: &Topic) {
        self.write_single(cmd, topic, b":m");
    }

    /// Writes the topic's stream ([`stream`](Self::stream)) as the next
    /// argument of `cmd` (one Redis only).
    fn write_stream(&self, cmd: &mut redis::Cmd, topic: &Topic) {
        self.write_single(cmd, topic, b":s");
    }

    /// `P:h:{K}` and `suffix`, written into `cmd` as one argument: the
    /// publish script's keys, per message (issue 19: as strings they were
    /// four `format!`s a topic).
    fn write_single(&self, cmd: &mut redis::Cmd, topic: &Topic, suffix: &[u8]) {
        use redis::RedisWrite;
        use std::io::Write;
        debug_assert!(!self.sharded, "a Cluster's keys are named by slot");
        let (tag, name) = wire::key_parts(topic);
        let mut out = cmd.writer_for_next_arg();
        // Writing to a Vec cannot fail.
        let _ = out
            .write_all(self.prefix.as_bytes())
            .and_then(|()| out.write_all(b"h:{"))
            .and_then(|()| out.write_all(tag.as_bytes()))
            .and_then(|()| out.write_all(name.as_bytes()))
            .and_then(|()| out.write_all(b"}"))
            .and_then(|()| out.write_all(suffix));
    }

    /// The topic's meta hash.
    pub(super) fn meta(&self, topic: &Topic) -> String {
        format!("{}:m", self.topic(topic))
    }

    /// The topic's stream.
    pub(super) fn stream(&self, topic: &Topic) -> String {
        format!("{}:s", self.topic(topic))
    }

    fn seq(&self) -> String {
        format!("{}seq", self.prefix)
    }

    fn mark(&self, instance: &str) -> String {
        format!("{}pub:{instance}", self.prefix)
    }

    fn handoff(&self, who: &Identity) -> String {
        // A JSON array names the identity unambiguously, any characters.
        let name = serde_json::to_string(&(&*who.user, who.group.as_deref())).unwrap_or_default();
        format!("{}ho:{name}", self.prefix)
    }
}

/// Why a script could not be run: Redis's error, or the time ran out.
fn unavailable(e: impl std::fmt::Display) -> HistoryError {
    HistoryError::Unavailable(e.to_string())
}

/// `SCRIPT LOAD`: the hash `EVALSHA` names the script by.
async fn load<C: ConnectionLike>(conn: &mut C, script: &str) -> redis::RedisResult<String> {
    redis::cmd("SCRIPT")
        .arg("LOAD")
        .arg(script)
        .query_async(conn)
        .await
}

/// `EVALSHA`, and on `NOSCRIPT` (a `SCRIPT FLUSH`, a failover to a server
/// that never saw it) `SCRIPT LOAD` and the same call again. `capacity`:
/// about how many arguments and bytes `args` writes (see
/// [`redis::Cmd::with_capacity`]).
async fn evalsha<T: redis::FromRedisValue, C: ConnectionLike>(
    conn: &mut C,
    script: &str,
    sha: &str,
    capacity: (usize, usize),
    args: impl Fn(&mut redis::Cmd),
) -> redis::RedisResult<T> {
    let command = || {
        let mut cmd = redis::Cmd::with_capacity(capacity.0, capacity.1);
        cmd.arg("EVALSHA").arg(sha);
        args(&mut cmd);
        cmd
    };
    match command().query_async(conn).await {
        Err(e) if e.code() == Some("NOSCRIPT") => {
            load(conn, script).await?;
            command().query_async(conn).await
        }
        result => result,
    }
}

/// Writes a topic's key as a JSON string ([`wire::json_key`]) as the next
/// argument of `cmd`, without making a string of it first.
fn write_json_key(cmd: &mut redis::Cmd, topic: &Topic) {
    use redis::RedisWrite;
    let (tag, name) = wire::key_parts(topic);
    let mut json = serde_json::Serializer::new(cmd.writer_for_next_arg());
    // Writing to a Vec cannot fail.
    let _ = serde::Serializer::collect_str(&mut json, &format_args!("{tag}{name}"));
}

/// The `run_id` of the server behind `conn` (`INFO server`).
async fn run_id<C: ConnectionLike>(conn: &mut C) -> redis::RedisResult<Arc<str>> {
    let info: String = redis::cmd("INFO").arg("server").query_async(conn).await?;
    info.lines()
        .find_map(|line| line.strip_prefix("run_id:"))
        .map(|id| Arc::from(id.trim()))
        .ok_or_else(|| {
            redis::RedisError::from((
                redis::ErrorKind::UnexpectedReturnType,
                "INFO server has no run_id",
            ))
        })
}

/// What a publisher connection knows once it is ready for the script.
pub(super) struct Prepared {
    sha: String,
    run_id: Arc<str>,
}

/// Milliseconds of a duration, at least 1 (Redis refuses `PX 0`).
fn ms(d: Duration) -> u64 {
    (d.as_millis() as u64).max(1)
}

/// How long a topic's meta hash and the publisher's mark are kept: well
/// beyond the history itself, so that offsets are not reused while any
/// client may still hold a position in the epoch.
fn meta_ttl(history: &HistoryConfig) -> Duration {
    (history.ttl * 10).max(Duration::from_secs(24 * 3600))
}

/// What a topic's meta hash says, as the subscriber reads it (never making
/// an epoch): the subscriber's starting point for a topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Head {
    /// The topic's position in its current epoch.
    At(Position),
    /// It has no epoch of this Redis run yet: its next publish makes one.
    Fresh,
}

/// Most entries one catch-up reads in all (`gaps.rs`): a topic whose
/// entries would go beyond is reported as a gap. Each topic is also bounded
/// by what its stream can hold (about twice its `size_*`).
pub(super) const MAX_CATCH_UP: usize = 20_000;

/// Most bytes of entries one catch-up reads in all (as stored, every field
/// counted): a topic whose entries would go beyond is reported as a gap.
/// Entries were bounded by count only: 20,000 of up to
/// `limits.max_message_bytes` (1.3 GB at the defaults) in one script,
/// holding Redis for seconds right when a subscriber had just been cut
/// off, perhaps by that very traffic (review of 2026-12-01).
pub(super) const MAX_CATCH_UP_BYTES: usize = 16 * 1024 * 1024;

/// About how many bytes of entries one step of a resume's read takes from
/// Redis ([`RedisHistory::read_stepped`]; also at most 256 entries, and 8
/// entries more than this): a few milliseconds of Redis's time at most,
/// where one read of everything a client could ask for
/// (every entry of three topics, up to `size_*` of
/// `limits.max_message_bytes` each) once held it for a quarter of a second.
pub(super) const READ_STEP_BYTES: usize = 256 * 1024;

/// How many resume reads per node may go on past their first step at once
/// (the others wait their turn, within the resume's time limit).
pub(super) const LARGE_READS: usize = 4;

/// How many read steps (first or later, of any resume) one node has in
/// flight at once: a burst of resuming connects (a deploy's reconnect
/// storm, or an attacker's far-back resumes) then queues in the node, not
/// in Redis, where probes and publishes wait behind every queued script
/// (review of 2026-12-01: 200 concurrent first steps held Redis 0.5 s).
pub(super) const READS_AT_ONCE: usize = 4;

/// The budget of the next step of a read that has `bytes` of `max_bytes`:
/// a step's worth, and never much past the bound (a step reads at least
/// one entry).
fn step_budget(max_bytes: usize, bytes: usize) -> usize {
    READ_STEP_BYTES.min(max_bytes.saturating_sub(bytes).saturating_add(1))
}

/// One topic of a stepped read ([`RedisHistory::read_stepped`]).
#[derive(Debug)]
enum Step {
    /// Read to its end, or stopped.
    Done(Read),
    /// Read up to `after`; `top` is where the snapshot found it.
    Reading {
        after: Position,
        top: Position,
        messages: Vec<Arc<Envelope>>,
        /// Where the read started past the position asked for (the
        /// reader's excluded run), if it did.
        passed: Option<Position>,
    },
}

impl Step {
    /// Adds the `entries` a step read (the offsets right after `after`),
    /// counting their bytes into `bytes`; done when they reach the top,
    /// when they are not the next offsets or are too old (incomplete), or
    /// when `bytes` passes `max_bytes` (too large).
    fn extend(
        &mut self,
        topic: &Topic,
        entries: Vec<(String, Bytes)>,
        bytes: &mut usize,
        max_bytes: usize,
        max_age: u64,
    ) -> Result<(), HistoryError> {
        let Step::Reading {
            after,
            top,
            messages,
            passed,
        } = self
        else {
            return Ok(());
        };
        let wanted = top.offset - after.offset;
        if entries.len() as u64 > wanted {
            *self = Step::Done(Read::Incomplete { top: top.clone() });
            return Ok(());
        }
        *bytes = entries.iter().fold(*bytes, |sum, (_, payload)| {
            sum.saturating_add(payload.len())
        });
        if *bytes > max_bytes {
            *self = Step::Done(Read::TooLarge { top: top.clone() });
            return Ok(());
        }
        let count = entries.len() as u64;
        match contiguous(topic, after, count, entries, Some(max_age))? {
            Some(read) => messages.extend(read),
            None => {
                *self = Step::Done(Read::Incomplete { top: top.clone() });
                return Ok(());
            }
        }
        after.offset += count;
        if after.offset == top.offset {
            *self = Step::Done(Read::Complete {
                messages: std::mem::take(messages),
                top: top.clone(),
                passed: passed.take(),
            });
        }
        Ok(())
    }
}

/// One topic of a catch-up (`gaps.rs`): where its copies stand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Want {
    pub(super) topic: Topic,
    /// The epoch of the copies delivered (`None`: none known). In another
    /// epoch the topic is read from its start.
    pub(super) epoch: Option<Arc<str>>,
    /// The last offset delivered (or the soft start).
    pub(super) after: u64,
    /// Whether to read its entries at all (false: its head only).
    pub(super) read: bool,
    /// Whether to make the topic an epoch when it has none of this Redis
    /// run: the node's sockets hold positions in it ([`CATCH_UP_LUA`]).
    pub(super) make: bool,
}

/// What a catch-up found for one topic.
#[derive(Debug)]
pub(super) struct Caught {
    /// The topic's epoch and top, or `Fresh` when it has no epoch of this
    /// Redis run (nothing else counts then).
    pub(super) head: Head,
    /// The offset the messages follow: the one asked for, or 0 when the
    /// topic is in another epoch.
    pub(super) from: u64,
    /// The last offset the answer is for: the top, or with a bound the last
    /// offset published before it.
    pub(super) reach: u64,
    /// The messages from `from + 1` to `reach`, in order, when history
    /// still has every one of them and they were not too many to read.
    pub(super) messages: Option<Vec<Arc<Envelope>>>,
    /// The catch-up made the topic's epoch (asked to by [`Want::make`]):
    /// it had none of this Redis run, so whatever positions the node's
    /// sockets hold in it name an epoch that is gone.
    pub(super) made: bool,
}

/// One command connection, the server's `run_id` (`""` on a Cluster: each
/// script reads its shard's) and the scripts' hashes.
#[derive(Clone)]
struct Command {
    conn: PubConn,
    run_id: Arc<str>,
    tops_sha: Arc<str>,
    peek_sha: Arc<str>,
    read_many_sha: Arc<str>,
    catch_up_sha: Arc<str>,
    /// Which connection this is, so a failed call drops only its own.
    serial: u64,
    /// The subscriber epoch it was opened in ([`Epoch`]): it is replaced
    /// in a later one.
    epoch: u64,
}

/// History kept in Redis, and the stamping half of the publisher.
///
/// Reads and handoffs go over a multiplexed connection of their own (never
/// the publisher's, whose pipelines they must not wait behind, nor the
/// subscriber's, which is in pub/sub mode), opened on first use and again
/// after a failure; every call is bounded by `redis.command_timeout_ms`.
pub(crate) struct RedisHistory {
    link: Link,
    config: RedisConfig,
    history: HistoryConfig,
    keys: Keys,
    /// This bus instance (the node id and a random suffix, so that a node
    /// restarted under the same id never has its numbers taken for the
    /// previous run's) as the start of a JSON string (no closing quote):
    /// the script appends `-<number>"`.
    id_prefix: String,
    /// The publish script's first two keys, the sequence and the
    /// instance's mark (one Redis), and on a Cluster the mark's name in
    /// each topic's slot: made once, not per call (issue 19).
    seq_key: String,
    mark_key: String,
    shard_mark: String,
    current: std::sync::Mutex<Option<Command>>,
    /// Turns for resume reads that go on past their first step
    /// ([`LARGE_READS`]).
    large_reads: tokio::sync::Semaphore,
    /// Turns for each read step ([`READS_AT_ONCE`]).
    read_steps: tokio::sync::Semaphore,
    /// Held while connecting, so concurrent calls open one connection.
    connecting: tokio::sync::Mutex<()>,
    serials: AtomicU64,
    /// The subscriber's epoch: the command connection follows it.
    epoch: Arc<Epoch>,
}

impl RedisHistory {
    pub(super) fn new(
        node_id: &str,
        link: Link,
        config: RedisConfig,
        history: HistoryConfig,
        epoch: Arc<Epoch>,
    ) -> Self {
        let instance = format!("{node_id}.{:x}", rand::random::<u64>());
        let mut id_prefix = serde_json::to_string(&instance).unwrap_or_default();
        id_prefix.pop();
        let keys = Keys::new(&config.channel_prefix, config.sharded);
        Self {
            link,
            seq_key: keys.seq(),
            mark_key: keys.mark(&instance),
            shard_mark: format!("pub:{instance}"),
            keys,
            config,
            history,
            id_prefix,
            current: std::sync::Mutex::new(None),
            large_reads: tokio::sync::Semaphore::new(LARGE_READS),
            read_steps: tokio::sync::Semaphore::new(READS_AT_ONCE),
            connecting: tokio::sync::Mutex::new(()),
            serials: AtomicU64::new(0),
            epoch,
        }
    }

    /// The queue item for one message: the header (the whole route)
    /// without its stamp, the frame, and each of `kept`, the route's
    /// topics that are recorded (not its connections; a topic named twice
    /// is recorded once). Their keys are written when the batch is sent
    /// ([`publish`](Self::publish)).
    pub(super) fn record(
        &self,
        origin: &str,
        route: &Route,
        kept: &[&Topic],
        frame: &Frame,
        channels: &Channels,
    ) -> Outgoing {
        let mut topics: Vec<Topic> = Vec::with_capacity(kept.len());
        for &topic in kept {
            if !topics.contains(topic) {
                topics.push(topic.clone());
            }
        }
        let mut item = Outgoing::new(
            topics.iter().map(|t| channels.of(t)).collect(),
            wire::encode_unstamped(origin, route),
        );
        let excluded = route.excluded();
        item.history = Some(Box::new(Recorded {
            frame: Bytes::from(frame.clone()),
            topics,
            excluded: if excluded.len() <= RUN_USERS {
                excluded.to_vec()
            } else {
                Vec::new()
            },
            number: 0,
            published_ms: wire::now_ms(),
        }));
        item
    }

    /// Readies a new publisher connection: loads the publish script and
    /// reads the server's `run_id` (see "Epochs" in the module docs).
    pub(super) async fn prepare(&self, conn: &mut PubConn) -> redis::RedisResult<Prepared> {
        if let PubConn::Sharded(_) = conn {
            return sharded::prepare(conn).await;
        }
        let conn = single(conn)?;
        let sha = load(conn, PUBLISH_LUA).await?;
        let run_id = run_id(conn).await?;
        Ok(Prepared { sha, run_id })
    }

    /// Runs the publish script on one batch, whose messages all have their
    /// numbers; returns how many ran (the rest had run before).
    pub(super) async fn publish(
        &self,
        conn: &mut PubConn,
        prepared: &Prepared,
        batch: &[Outgoing],
    ) -> redis::RedisResult<Option<Lost>> {
        // The publisher sends unrecorded messages (to connections on a
        // Cluster) in a plain pipeline; one here would be skipped by the
        // script. On one Redis they come relayed (`Outgoing::relayed`).
        debug_assert!(batch.iter().all(|m| m.history.is_some()));
        let ttl = ms(self.history.ttl);
        let mttl = ms(meta_ttl(&self.history));
        if let PubConn::Sharded(_) = conn {
            let args = sharded::Batch {
                ttl,
                mttl,
                id_prefix: &self.id_prefix,
                mark: &self.shard_mark,
                keys: &self.keys,
                history: &self.history,
            };
            return sharded::publish(conn, prepared, &args, batch).await;
        }
        let conn = single(conn)?;
        let recorded = || {
            batch
                .iter()
                .filter_map(|m| Some((m, m.history.as_deref()?)))
        };
        let highest = recorded().map(|(_, r)| r.number).max().unwrap_or(0);
        let (seq, mark) = (&self.seq_key, &self.mark_key);
        // The call's size, so that its buffers are allocated once: the
        // arguments grew them a few times per call, and at low rates a
        // call carries one message (issue 19).
        let (mut args, mut bytes) = (12, 256 + seq.len() + mark.len() + prepared.sha.len());
        for (m, r) in recorded() {
            args += 6 + 5 * r.topics.len() + m.channels.len() + r.excluded.len();
            bytes += 40 + m.payload.len() + r.frame.len();
            bytes += r.excluded.iter().map(|u| u.len() + 16).sum::<usize>();
            bytes += m.channels.iter().map(|c| 4 * c.len() + 48).sum::<usize>();
        }
        evalsha(conn, PUBLISH_LUA, &prepared.sha, (args, bytes), |cmd| {
            let keys: usize = 2 + recorded().map(|(_, r)| 2 * r.topics.len()).sum::<usize>();
            cmd.arg(keys).arg(seq).arg(mark);
            for (_, r) in recorded() {
                for t in &r.topics {
                    self.keys.write_meta(cmd, t);
                    self.keys.write_stream(cmd, t);
                }
            }
            cmd.arg(&*prepared.run_id)
                .arg(ttl)
                .arg(mttl)
                .arg(&self.id_prefix)
                .arg(highest)
                .arg(recorded().count());
            for (m, r) in recorded() {
                cmd.arg(r.number)
                    .arg(&m.payload[..])
                    .arg(&r.frame[..])
                    .arg(r.topics.len());
                if r.topics.is_empty() {
                    // Relayed as it is (`Outgoing::relayed`).
                    cmd.arg(m.channels.len()).arg(&m.channels);
                } else {
                    cmd.arg(r.excluded.len());
                    for user in &r.excluded {
                        cmd.arg(&**user);
                    }
                }
                for (t, channel) in r.topics.iter().zip(&m.channels) {
                    write_json_key(cmd, t);
                    cmd.arg(channel).arg(self.history.size_of(t));
                }
            }
        })
        .await
        .map(|_: u64| None)
        .or_else(|e| match lost_of(&e) {
            Some((mut numbers, error)) => {
                numbers.sort_unstable();
                Ok(Some(Lost { numbers, error }))
            }
            None => Err(e),
        })
    }

    /// The command connection: the current one, or a new one.
    async fn command(&self) -> Result<Command, HistoryError> {
        let current = || {
            let epoch = self.epoch.current();
            self.lock().clone().filter(|c| c.epoch == epoch)
        };
        if let Some(c) = current() {
            return Ok(c);
        }
        let limit = self.config.command_timeout;
        let _connecting = timeout(limit, self.connecting.lock())
            .await
            .map_err(|_| unavailable("connecting to Redis timed out"))?;
        if let Some(c) = current() {
            return Ok(c);
        }
        let command = timeout(limit, self.connect())
            .await
            .map_err(|_| unavailable("connecting to Redis timed out"))?
            .map_err(unavailable)?;
        *self.lock() = Some(command.clone());
        Ok(command)
    }

    async fn connect(&self) -> redis::RedisResult<Command> {
        // Read before connecting: a reconnect of the subscriber meanwhile
        // makes this connection old at once.
        let epoch = self.epoch.current();
        let conn = connect_publisher(&self.link, &self.config).await?;
        let mut c = conn.clone();
        let tops_sha = load(&mut c, TOPS_LUA).await?;
        let peek_sha = load(&mut c, PEEK_LUA).await?;
        let read_many_sha = load(&mut c, READ_MANY_LUA).await?;
        let catch_up_sha = load(&mut c, CATCH_UP_LUA).await?;
        let run_id = match &mut c {
            PubConn::Single(single) => run_id(single).await?,
            PubConn::Sharded(_) => "".into(),
        };
        Ok(Command {
            conn,
            run_id,
            tops_sha: tops_sha.into(),
            peek_sha: peek_sha.into(),
            read_many_sha: read_many_sha.into(),
            catch_up_sha: catch_up_sha.into(),
            serial: self.serials.fetch_add(1, Ordering::Relaxed),
            epoch,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Command>> {
        // Only ever replaced whole: a poisoned lock holds a valid value.
        self.current.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `call` on the command connection within the command timeout.
    /// A connection that failed is dropped, and the call is made once more
    /// on a new one when it failed at once (a connection that went stale
    /// while idle, as every one does when Redis restarts or a proxy cuts
    /// it) rather than by running out of time.
    async fn call<T, F, Fut>(&self, call: F) -> Result<T, HistoryError>
    where
        F: Fn(Command) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let mut retried = false;
        loop {
            let command = self.command().await?;
            let serial = command.serial;
            let error = match timeout(self.config.command_timeout, call(command)).await {
                Ok(Ok(value)) => return Ok(value),
                Ok(Err(e)) if is_answer(&e) => e.to_string(),
                Ok(Err(e)) => {
                    self.drop_connection(serial);
                    if !retried && !e.is_timeout() {
                        retried = true;
                        continue;
                    }
                    e.to_string()
                }
                Err(_) => {
                    self.drop_connection(serial);
                    "Redis did not answer in time".to_owned()
                }
            };
            return Err(HistoryError::Unavailable(error));
        }
    }

    fn drop_connection(&self, serial: u64) {
        let mut current = self.lock();
        if current.as_ref().is_some_and(|c| c.serial == serial) {
            *current = None;
        }
    }

    /// What each topic's meta says now, without making epochs: the
    /// subscriber's starting points (see `gaps.rs`).
    pub(super) async fn heads(&self, topics: &[Topic]) -> Result<Vec<Head>, HistoryError> {
        if self.keys.sharded {
            // A pipeline of HMGETs would span slots: the catch-up script
            // per topic, reading no entries, says the same.
            let wants: Vec<Want> = topics
                .iter()
                .map(|topic| Want {
                    topic: topic.clone(),
                    epoch: None,
                    after: 0,
                    read: false,
                    make: false,
                })
                .collect();
            let caught = self.catch_up(&wants, None).await?;
            return Ok(caught.into_iter().map(|c| c.head).collect());
        }
        let metas: Vec<String> = topics.iter().map(|t| self.keys.meta(t)).collect();
        let metas = &metas;
        self.call(|mut c| async move {
            let mut pipe = redis::pipe();
            for meta in metas {
                pipe.cmd("HMGET").arg(meta).arg("e").arg("o").arg("r");
            }
            let rows: Vec<(Option<String>, Option<u64>, Option<String>)> =
                pipe.query_async(&mut c.conn).await?;
            Ok(rows
                .into_iter()
                .map(|row| match row {
                    (Some(epoch), Some(offset), Some(run)) if *run == *c.run_id => {
                        Head::At(Position {
                            epoch: epoch.into(),
                            offset,
                        })
                    }
                    _ => Head::Fresh,
                })
                .collect())
        })
        .await
    }

    /// Starts `topic`'s history afresh (see [`RENEW_LUA`]), bounded by the
    /// command timeout; `true` when it had an epoch to renew.
    pub(super) async fn renew(&self, topic: &Topic) -> Result<bool, HistoryError> {
        let (meta, stream) = (&self.keys.meta(topic), &self.keys.stream(topic));
        let mttl = ms(meta_ttl(&self.history));
        let epoch: String = self
            .call(|mut c| async move {
                // EVAL: a few hundred bytes, rarely (a mixed cluster only).
                redis::cmd("EVAL")
                    .arg(RENEW_LUA)
                    .arg(2)
                    .arg(meta)
                    .arg(stream)
                    .arg(&*c.run_id)
                    .arg(mttl)
                    .query_async(&mut c.conn)
                    .await
            })
            .await?;
        Ok(!epoch.is_empty())
    }

    /// About the most entries `topic`'s stream can hold (`XADD MAXLEN ~
    /// size` trims whole stream nodes, so it keeps a little more than its
    /// `size_*`): more than this after a position cannot all be kept.
    fn holds_at_most(&self, topic: &Topic) -> usize {
        self.history.size_of(topic) * 2 + 100
    }

    /// The tops of `topics`, adopting every one that has an epoch: made
    /// where there is none ([`TOPS_LUA`]) or not ([`PEEK_LUA`]).
    async fn positions(&self, topics: &[Topic], make: bool) -> Result<Vec<Position>, HistoryError> {
        if topics.is_empty() {
            return Ok(Vec::new());
        }
        let keys: &Vec<String> = &topics
            .iter()
            .flat_map(|t| [self.keys.meta(t), self.keys.stream(t)])
            .collect();
        let mttl = ms(meta_ttl(&self.history)).to_string();
        let per = &vec![Vec::new(); topics.len()];
        let flat = self
            .call(|c| {
                let mttl = mttl.clone();
                async move {
                    let head = [c.run_id.to_string(), mttl];
                    let script = if make {
                        (TOPS_LUA, &*c.tops_sha)
                    } else {
                        (PEEK_LUA, &*c.peek_sha)
                    };
                    sharded::per_topic(&c.conn, self.keys.sharded, script, keys, &head, per).await
                }
            })
            .await?;
        if flat.len() != topics.len() * 2 {
            return Err(HistoryError::Unreadable("tops: wrong length".into()));
        }
        let mut flat = flat.into_iter();
        let mut tops = Vec::with_capacity(topics.len());
        while let (Some(epoch), Some(offset)) = (flat.next(), flat.next()) {
            tops.push(Position {
                epoch: text(epoch, "tops")?.into(),
                offset: number(offset, "tops")?,
            });
        }
        Ok(tops)
    }

    /// [`History::read_many`] in bounded steps: one snapshot of every
    /// topic's top (and its first entries), then, for a topic with more
    /// to read, further calls from where the last one stopped up to that
    /// top, each reading about [`READ_STEP_BYTES`].
    ///
    /// The same messages as one read of everything: a stream's entries up
    /// to a top it had never change, they can only go (trimmed, expired, a
    /// new epoch's stream in their place). A step that finds the epoch
    /// changed, or does not find the very next offset, makes the topic
    /// [`Read::Incomplete`]. Reads that need more than their first step
    /// take turns, [`LARGE_READS`] at a time per node, so that a burst of
    /// far-back resumes neither holds many replays in memory at once nor
    /// keeps Redis busy for long (each step is one short call, and other
    /// commands run between them).
    async fn read_stepped(
        &self,
        from: &[(Topic, Position)],
        max: usize,
        max_bytes: usize,
        reader: Option<&str>,
    ) -> Result<Vec<Read>, HistoryError> {
        if from.is_empty() {
            return Ok(Vec::new());
        }
        // Never more than a stream holds (`max` may be unbounded: the
        // resume counts only what the socket accepts against
        // `history.max_replay`). A topic that holds less than this
        // answers what it has, and is then incomplete.
        let holds = from.iter().map(|(t, _)| self.holds_at_most(t));
        let max = max.min(holds.max().unwrap_or(0));
        let max_age = ms(self.history.ttl);
        let mut bytes = 0usize;
        let asked: Vec<(&Topic, Position, u64)> = from
            .iter()
            .map(|(topic, after)| (topic, after.clone(), 0))
            .collect();
        let parts = self
            .read_step(&asked, max, step_budget(max_bytes, 0), reader)
            .await?;
        let mut reads: Vec<Step> = Vec::with_capacity(from.len());
        for ((topic, after), part) in from.iter().zip(parts) {
            let ReadReply {
                top,
                entries,
                after: read_after,
            } = read_reply(part)?;
            // After an unborn position: the current epoch from its start
            // (or nothing, the top unborn too, while there is none).
            let mut after = if after.is_unborn() && !top.is_unborn() {
                Position {
                    epoch: top.epoch.clone(),
                    offset: 0,
                }
            } else {
                after.clone()
            };
            // Past the reader's excluded run: the entries follow its end.
            let mut passed = None;
            if let Some(offset) = read_after.filter(|&o| o > after.offset)
                && top.epoch == after.epoch
            {
                after.offset = offset;
                passed = Some(after.clone());
            }
            if top.epoch != after.epoch
                || top.offset < after.offset
                || top.offset - after.offset > max as u64
            {
                reads.push(Step::Done(Read::Incomplete { top }));
                continue;
            }
            let mut step = Step::Reading {
                after,
                top,
                messages: Vec::new(),
                passed,
            };
            step.extend(topic, entries, &mut bytes, max_bytes, max_age)?;
            reads.push(step);
        }
        if reads.iter().any(|r| matches!(r, Step::Reading { .. })) {
            let _turn = self
                .large_reads
                .acquire()
                .await
                .map_err(|_| unavailable("history is shutting down"))?;
            for (step, (topic, _)) in reads.iter_mut().zip(from) {
                if bytes > max_bytes {
                    // Too large already: the rest need not be read.
                    break;
                }
                while let Step::Reading { after, top, .. } = step {
                    let asked = [(topic, after.clone(), top.offset)];
                    let budget = step_budget(max_bytes, bytes);
                    // Only the first step may pass over a run: the
                    // later ones continue a read.
                    let part = self
                        .read_step(&asked, max, budget, None)
                        .await?
                        .into_iter()
                        .next();
                    let ReadReply {
                        top: now, entries, ..
                    } = read_reply(part.ok_or_else(|| bad("read", "no answer"))?)?;
                    if now.epoch != top.epoch || entries.is_empty() {
                        // Started afresh, or the next entry is gone.
                        *step = Step::Done(Read::Incomplete { top: now });
                        break;
                    }
                    step.extend(topic, entries, &mut bytes, max_bytes, max_age)?;
                }
            }
        }
        Ok(reads
            .into_iter()
            .map(|step| match step {
                Step::Done(read) => read,
                // Left unread once another topic passed the bound.
                Step::Reading { top, .. } => Read::TooLarge { top },
            })
            .collect())
    }

    /// One call of [`READ_MANY_LUA`]: per topic (`after`, and the last
    /// offset to read, `0` for the top), its answer. On a Cluster each
    /// topic is read in its own slot: a snapshot per topic
    /// (`history/sharded.rs`).
    async fn read_step(
        &self,
        asked: &[(&Topic, Position, u64)],
        max: usize,
        budget: usize,
        reader: Option<&str>,
    ) -> Result<Vec<redis::Value>, HistoryError> {
        let keys: &Vec<String> = &asked
            .iter()
            .flat_map(|(t, _, _)| [self.keys.meta(t), self.keys.stream(t)])
            .collect();
        let mttl = ms(meta_ttl(&self.history));
        let _turn = self
            .read_steps
            .acquire()
            .await
            .map_err(|_| unavailable("history is shutting down"))?;
        let per = &asked
            .iter()
            .map(|(_, after, last)| {
                vec![
                    after.epoch.to_string(),
                    after.offset.to_string(),
                    last.to_string(),
                ]
            })
            .collect::<Vec<_>>();
        let parts = self
            .call(|c| async move {
                let head = [
                    c.run_id.to_string(),
                    mttl.to_string(),
                    max.to_string(),
                    budget.to_string(),
                    reader.unwrap_or_default().to_owned(),
                ];
                let script = (READ_MANY_LUA, &*c.read_many_sha);
                sharded::per_topic(&c.conn, self.keys.sharded, script, keys, &head, per).await
            })
            .await?;
        if parts.len() != asked.len() {
            return Err(bad("read", "one answer per topic"));
        }
        Ok(parts)
    }

    /// Every topic of `wants` read in one atomic step (`gaps.rs`): its
    /// head, and its messages after the last delivered (with `bound`, only
    /// those published before that `seq`). At most [`MAX_CATCH_UP`]
    /// entries and [`MAX_CATCH_UP_BYTES`] in all, and per topic about what
    /// its stream can hold; a topic beyond has no messages. No age limit:
    /// whatever is still kept is right.
    pub(super) async fn catch_up(
        &self,
        wants: &[Want],
        bound: Option<u64>,
    ) -> Result<Vec<Caught>, HistoryError> {
        if wants.is_empty() {
            return Ok(Vec::new());
        }
        let keys: &Vec<String> = &wants
            .iter()
            .flat_map(|w| [self.keys.meta(&w.topic), self.keys.stream(&w.topic)])
            .collect();
        let most = |w: &Want| {
            if w.read {
                self.holds_at_most(&w.topic)
            } else {
                0
            }
        };
        // On a Cluster there is no `seq` to bound by: each topic is read in
        // its own slot, to its top (`history/sharded.rs`).
        let bound = bound.filter(|_| !self.keys.sharded);
        let mttl = ms(meta_ttl(&self.history));
        let per = &wants
            .iter()
            .map(|w| {
                let epoch = w.epoch.as_deref().unwrap_or("").to_owned();
                let make = if w.make { "1" } else { "0" };
                vec![epoch, w.after.to_string(), most(w).to_string(), make.into()]
            })
            .collect::<Vec<_>>();
        let parts = self
            .call(|c| async move {
                let head = [
                    c.run_id.to_string(),
                    bound.unwrap_or(0).to_string(),
                    MAX_CATCH_UP.to_string(),
                    MAX_CATCH_UP_BYTES.to_string(),
                    mttl.to_string(),
                ];
                let script = (CATCH_UP_LUA, &*c.catch_up_sha);
                sharded::per_topic(&c.conn, self.keys.sharded, script, keys, &head, per).await
            })
            .await?;
        if parts.len() != wants.len() {
            return Err(bad("catch-up", "one answer per topic"));
        }
        wants
            .iter()
            .zip(parts)
            .map(|(want, part)| caught(&want.topic, part, bound))
            .collect()
    }
}

/// Whether an error is Redis's answer (the connection is fine) rather than
/// a failed connection.
fn is_answer(e: &redis::RedisError) -> bool {
    !(e.is_io_error() || e.is_timeout() || e.is_connection_dropped()) && e.code().is_some()
}

/// The one server's connection, for the one-Redis publish script (a
/// Cluster publishes through `history/sharded.rs`, never through this).
fn single(conn: &mut PubConn) -> redis::RedisResult<&mut MultiplexedConnection> {
    match conn {
        PubConn::Single(c) => Ok(c),
        PubConn::Sharded(_) => Err(redis::RedisError::from((
            redis::ErrorKind::InvalidClientConfig,
            "the one-Redis publish script cannot run on a Redis Cluster",
        ))),
    }
}

/// A handoff as stored: the three positions, `null` where there is none.
fn handoff_json(positions: &Positions) -> String {
    let texts: Vec<Option<String>> = positions
        .iter()
        .map(|p| p.as_ref().map(Position::to_string))
        .collect();
    serde_json::to_string(&texts).unwrap_or_default()
}

fn handoff_from_json(text: &str) -> Result<Positions, HistoryError> {
    let bad = || HistoryError::Unreadable(format!("handoff {text:?}"));
    let texts: Vec<Option<String>> = serde_json::from_str(text).map_err(|_| bad())?;
    let mut positions: Positions = Default::default();
    if texts.len() != positions.len() {
        return Err(bad());
    }
    for (slot, text) in positions.iter_mut().zip(texts) {
        if let Some(text) = text {
            // An unborn position is stored as its text, ":0", which
            // `parse` (for what clients send) refuses. (A node of an
            // earlier version refuses the handoff: not recovered.)
            *slot = Some(if text == UNBORN {
                Position::unborn()
            } else {
                Position::parse(&text).ok_or_else(bad)?
            });
        }
    }
    Ok(positions)
}

/// How [`Position::unborn`] is written in a handoff.
const UNBORN: &str = ":0";

impl History for RedisHistory {
    fn peek<'a>(&'a self, topics: &'a [Topic]) -> HistoryFuture<'a, Vec<Position>> {
        // An unborn top reads as `''` and `0`: `Position::unborn()`.
        Box::pin(self.positions(topics, false))
    }

    fn tops<'a>(&'a self, topics: &'a [Topic]) -> HistoryFuture<'a, Vec<Position>> {
        Box::pin(self.positions(topics, true))
    }

    fn read_many<'a>(
        &'a self,
        from: &'a [(Topic, Position)],
        max: usize,
        max_bytes: usize,
        reader: Option<&'a str>,
    ) -> HistoryFuture<'a, Vec<Read>> {
        Box::pin(self.read_stepped(from, max, max_bytes, reader))
    }

    fn recent<'a>(
        &'a self,
        topic: &'a Topic,
        since: Option<&'a Position>,
        limit: usize,
    ) -> HistoryFuture<'a, Recent> {
        Box::pin(async move {
            // Read only (`tops` would make an epoch, and keep it 24 h, for
            // every topic an operator looks at): a topic without an epoch
            // of this Redis run has no history to list.
            let head = self.heads(std::slice::from_ref(topic)).await?;
            let top = match head.into_iter().next() {
                Some(Head::At(top)) => top,
                _ => {
                    return Ok(Recent {
                        top: None,
                        messages: Vec::new(),
                    });
                }
            };
            let from = match since {
                Some(p) if p.epoch == top.epoch => p.offset.min(top.offset),
                Some(_) => 0,
                None => top.offset.saturating_sub(limit as u64),
            };
            let after = Position {
                epoch: top.epoch.clone(),
                offset: from,
            };
            if limit == 0 || top.offset <= from {
                return Ok(Recent {
                    top: Some(top),
                    messages: Vec::new(),
                });
            }
            // A plain XRANGE after the top was read: an operator's view,
            // not a replay, so no snapshot is needed; entries of another
            // epoch (the topic started afresh in between) or above the top
            // (published since) are left out. The first `limit` entries
            // still kept after `from`, whatever their offsets: when the
            // oldest after it were trimmed, the next ones (review of
            // 2026-12-03: bounded by `from + limit` as offsets, a `since`
            // older than what is kept listed a few messages or none).
            let stream = &self.keys.stream(topic);
            let start = format!("{}-0", after.offset + 1);
            let reply: redis::Value = self
                .call(|mut c| {
                    let start = start.clone();
                    async move {
                        redis::cmd("XRANGE")
                            .arg(stream)
                            .arg(start)
                            .arg("+")
                            .arg("COUNT")
                            .arg(limit)
                            .query_async(&mut c.conn)
                            .await
                    }
                })
                .await?;
            let messages = entries(reply, "history")?
                .into_iter()
                .filter_map(|(_, payload)| wire::decode(payload).ok())
                .filter(|d| {
                    d.stamp
                        .as_ref()
                        .and_then(|s| s.position(topic))
                        .is_some_and(|p| p.epoch == top.epoch && p.offset <= top.offset)
                })
                .map(|d| Arc::new(Envelope::stamped(d.route, d.frame, d.stamp)))
                .collect();
            Ok(Recent {
                top: Some(top),
                messages,
            })
        })
    }

    fn handoff_put<'a>(
        &'a self,
        who: &'a Identity,
        positions: &'a Positions,
    ) -> HistoryFuture<'a, ()> {
        Box::pin(async move {
            let (key, value) = (&self.keys.handoff(who), &handoff_json(positions));
            let ttl = ms(self.history.ttl);
            self.call(|mut c| async move {
                redis::pipe()
                    .atomic()
                    .cmd("RPUSH")
                    .arg(key)
                    .arg(value)
                    .ignore()
                    .cmd("LTRIM")
                    .arg(key)
                    .arg(-(HANDOFFS_KEPT as i64))
                    .arg(-1)
                    .ignore()
                    .cmd("PEXPIRE")
                    .arg(key)
                    .arg(ttl)
                    .ignore()
                    .query_async::<()>(&mut c.conn)
                    .await
            })
            .await
        })
    }

    fn handoff_take<'a>(&'a self, who: &'a Identity) -> HistoryFuture<'a, Option<Positions>> {
        Box::pin(async move {
            let key = &self.keys.handoff(who);
            let mut stored: Vec<String> = self
                .call(|mut c| async move {
                    redis::cmd("EVAL")
                        .arg(TAKE_LUA)
                        .arg(1)
                        .arg(key)
                        .query_async(&mut c.conn)
                        .await
                })
                .await?;
            // The last one is the one taken.
            let Some(taken) = stored.pop() else {
                return Ok(None);
            };
            let taken = handoff_from_json(&taken)?;
            // One that cannot be read is no one's to replay from.
            let others: Vec<Positions> = stored
                .iter()
                .filter_map(|text| handoff_from_json(text).ok())
                .collect();
            Ok(Some(crate::history::earliest(taken, &others)))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_under_the_prefix_and_one_per_topic() {
        let keys = Keys::new("wshub", false);
        assert_eq!(keys.meta(&Topic::All), "wshub:h:{all}:m");
        assert_eq!(
            keys.stream(&Topic::Group(Some("a}b".into()))),
            "wshub:h:{g:a}b}:s"
        );
        assert_eq!(keys.meta(&Topic::Group(None)), "wshub:h:{n}:m");
        let ann = Identity {
            user: "ann".into(),
            group: None,
        };
        assert_eq!(keys.handoff(&ann), r#"wshub:ho:["ann",null]"#);
        let odd = Identity {
            user: "a\",".into(),
            group: Some("g".into()),
        };
        assert_eq!(keys.handoff(&odd), r#"wshub:ho:["a\",","g"]"#);
    }

    #[test]
    fn keys_written_into_the_script_call_are_the_keys() {
        let keys = Keys::new("ws:{x}", false);
        let topics = [
            Topic::All,
            Topic::Group(None),
            Topic::Group(Some("a}b\"c\\\n".into())),
            Topic::User("ünï cödé\u{1}".into()),
        ];
        let mut cmd = redis::Cmd::new();
        for t in &topics {
            keys.write_meta(&mut cmd, t);
            keys.write_stream(&mut cmd, t);
            write_json_key(&mut cmd, t);
        }
        let written: Vec<String> = cmd
            .args_iter()
            .map(|arg| match arg {
                redis::Arg::Simple(bytes) => String::from_utf8(bytes.to_vec()).unwrap(),
                _ => panic!("only plain arguments"),
            })
            .collect();
        let want: Vec<String> = topics
            .iter()
            .flat_map(|t| [keys.meta(t), keys.stream(t), wire::json_key(t)])
            .collect();
        assert_eq!(written, want);
    }

    #[test]
    fn handoffs_round_trip_and_bad_ones_are_errors() {
        let positions: Positions = [Position::parse("k3:41"), None, Position::parse("q2:5")];
        let text = handoff_json(&positions);
        assert_eq!(text, r#"["k3:41",null,"q2:5"]"#);
        assert_eq!(handoff_from_json(&text).unwrap(), positions);
        let unborn: Positions = [Position::parse("k3:41"), Some(Position::unborn()), None];
        let text = handoff_json(&unborn);
        assert_eq!(text, r#"["k3:41",":0",null]"#);
        assert_eq!(handoff_from_json(&text).unwrap(), unborn);
        for bad in [
            "",
            "[]",
            r#"["x"]"#,
            r#"["a:1",null,"bad"]"#,
            "{}",
            r#"[":1",null,null]"#,
        ] {
            assert!(handoff_from_json(bad).is_err(), "{bad:?}");
        }
    }
}
