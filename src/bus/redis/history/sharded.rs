//! History on a Redis Cluster with sharded pub/sub (`redis.sharded`): the
//! same guarantees as on one Redis, **per topic**.
//!
//! A message to a group and a user is published on two channels, which a
//! Cluster keeps in two slots, usually on two shards: no one script can
//! stamp both copies atomically, and there is no cluster-wide sequence.
//! So each topic is its own history:
//!
//! - **Keys in the channel's slot.** A script may only touch keys of one
//!   slot, and its `SPUBLISH` must name a channel of that slot too. The
//!   channel names are the ones the live path already uses (nodes without
//!   history, during a rolling enable, subscribe to the same), so the keys
//!   follow the channel: `P:h:{<tag>}:<K>:m` and `…:s`, where `<tag>` is
//!   what Redis hashes of the channel's name ([`slot_tag`]).
//! - **One script per topic copy** ([`PUBLISH_TOPIC_LUA`]): a batch is
//!   grouped by topic, and each topic's messages of the batch go in one
//!   call, in the topic's slot: dedupe (the bus instance's high-water mark
//!   for *this topic*, a key of its own in the topic's slot, expiring like
//!   the meta hash: [`mark_key`]), offset, `XADD`,
//!   `SPUBLISH` of a payload that carries this topic's position only. The
//!   calls of one batch run concurrently, one per topic; a batch whose
//!   outcome is unknown is resent whole, and each topic skips what it ran.
//! - **Epochs per shard.** The scripts read the `run_id` of the shard they
//!   run on themselves (`INFO server` inside the script: the node does not
//!   know which shard holds a slot), so a restarted shard starts the
//!   history of its own topics afresh, and no other's.
//! - **Reads per topic.** The reads (a resume's three topics, a catch-up, a
//!   topic's tops) run the one-Redis scripts once per topic, in its slot
//!   ([`per_topic`]): atomic per topic, not across topics.
//! - **No order across topics.** The `seq` of a sharded stamp is not a
//!   cluster-wide counter but the publishing node's clock and its message
//!   number (`ms × 4096 + number mod 4096`): replays from several topics
//!   are merged by it (each topic in its own order), which promises
//!   nothing across topics (a review saw a node's messages inverted across
//!   topics, live and replayed) — as live delivery in sharded mode does
//!   not either (two topics are two shards, two subscriber connections).
//!
//! A copy's `pos` holds its own topic's position only (the other copies
//! are stamped by other shards, maybe later).

use std::collections::{BTreeSet, HashMap};
use std::sync::OnceLock;

use super::super::conn::{PubConn, slot_of};
use super::super::queue::{Outgoing, Recorded};
use super::{Lost, Prepared, evalsha, load, lost_of};
use redis::cluster_routing::SingleNodeRoutingInfo;

/// Stamps, records and publishes one batch's messages to one topic.
///
/// KEYS: `[1]` the topic's meta hash, `[2]` its stream, `[3]` this bus
/// instance's mark for the topic (one slot, the channel's: [`mark_key`]).
/// ARGV: `[1]` run id (`''`: this server's), `[2]` stream ttl
/// ms, `[3]` meta ttl ms, `[4]` the id prefix (a JSON string without its
/// closing quote), `[5]` unused (was the mark's field), `[6]` the highest
/// number among these messages, `[7]` the channel, `[8]` the topic's JSON
/// key, `[9]` the stream's size, `[10]` message count; then per message its
/// number, `seq`, header prefix and frame, and the count of users whose
/// excluded runs it extends and their names (`runs_lua` in `history.rs`).
/// Returns how many ran, or, when a message could not be stamped or an `SPUBLISH` was refused, an error
/// once all have run (`heard_lua` in `history.rs`).
pub(super) const PUBLISH_TOPIC_LUA: &str = concat!(
    run_lua!(),
    epoch_lua!(),
    heard_lua!(),
    runs_lua!(),
    r#"
local run, ttl, mttl, idp = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local meta, stream, mark = KEYS[1], KEYS[2], KEYS[3]
local hw = tonumber(redis.call('GET', mark) or '0')
if tonumber(ARGV[6]) > hw then
  redis.call('SET', mark, ARGV[6], 'PX', mttl)
else
  redis.call('PEXPIRE', mark, mttl)
end
local channel, jkey, size = ARGV[7], ARGV[8], ARGV[9]
-- A message's stamp: the topic's epoch and its offset (run with `pcall`:
-- `went` in `heard_lua`).
local function stamp()
  local e = epoch_of(meta, stream, run)
  return e, string.format('%d', redis.call('HINCRBY', meta, 'o', 1))
end
-- A meta of another type is left as it is (its messages are unstamped).
local readable, adopted = pcall(redis.call, 'HGET', meta, 'a')
if not readable then
  adopted = nil
end
local a, sent = 11, 0
for _ = 1, tonumber(ARGV[10]) do
  local number, seq, prefix, frame, nx = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], tonumber(ARGV[a + 4])
  local excluded = {}
  for j = 1, nx do
    excluded[j] = ARGV[a + 4 + j]
  end
  a = a + 5 + nx
  local ok, e, o = false, nil, nil
  if tonumber(number) > hw then
    ok, e, o = pcall(stamp)
    ok = went(number, ok, e)
  end
  if ok then
    local payload = prefix .. ',"i":' .. idp .. '-' .. number .. '","s":' .. seq
      .. ',"p":{' .. jkey .. ':"' .. e .. ':' .. o .. '"}}\n' .. frame
    redis.pcall('XADD', stream, 'MAXLEN', '~', size, o .. '-1', 'd', payload, 's', seq)
    if nx > 0 then
      pcall(exclude, meta, e, o, excluded, size, ttl)
    end
    -- Adopted by a subscriber, as on one Redis (`history.rs`).
    if heard(redis.pcall('SPUBLISH', channel, payload)) and not adopted then
      redis.call('HSET', meta, 'a', '1')
      adopted = '1'
    end
    sent = sent + 1
  end
end
if adopted then
  redis.call('PEXPIRE', meta, mttl)
elseif readable then
  redis.call('PEXPIRE', meta, ttl)
end
if sent > 0 then
  redis.call('PEXPIRE', stream, ttl)
end
return published(sent)
"#
);

/// The hash tag that puts a topic's keys in the slot of its channel: what
/// Redis hashes of the channel's name (its own `{tag}` if it has one, else
/// the whole name), or, for a name that cannot be put between braces (it
/// holds a `}` outside a tag), a short name found for that slot.
pub(super) fn slot_tag(channel: &str) -> String {
    let bytes = channel.as_bytes();
    let own = bytes.iter().position(|&b| b == b'{').and_then(|open| {
        let rest = &channel[open + 1..];
        let close = rest.find('}')?;
        (close > 0).then(|| &rest[..close])
    });
    match own {
        Some(tag) => tag.to_owned(),
        None if !channel.contains('}') => channel.to_owned(),
        None => tag_for_slot(slot_of(channel)),
    }
}

/// A short name per slot (`~<n>`, the first that hashes to it), made once:
/// about 170,000 hashes of a few bytes, bounded by [`SLOT_SEARCH`].
fn tag_for_slot(slot: u16) -> String {
    static TABLE: OnceLock<Vec<Option<u32>>> = OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut table = vec![None; 16384];
        let mut missing = table.len();
        for n in 0..SLOT_SEARCH {
            let at = &mut table[usize::from(slot_of(&format!("~{n}")))];
            if at.is_none() {
                *at = Some(n);
                missing -= 1;
                if missing == 0 {
                    break;
                }
            }
        }
        table
    });
    match table[usize::from(slot)] {
        Some(n) => format!("~{n}"),
        // Not found within the search (never seen): the whole name, which
        // is then in another slot, and the script is refused with a
        // CROSSSLOT error (a failed publish, never a wrong one).
        None => format!("~slot{slot}"),
    }
}

/// Most names tried to fill the slot table (every slot is found after
/// about 170,000).
const SLOT_SEARCH: u32 = 2_000_000;

/// Readies a cluster publisher connection: loads the topic script on every
/// primary (`SCRIPT LOAD` goes to all of them). The run id is each shard's
/// own, read by the script.
pub(super) async fn prepare(conn: &mut PubConn) -> redis::RedisResult<Prepared> {
    let sha = load(conn, PUBLISH_TOPIC_LUA).await?;
    Ok(Prepared {
        sha,
        run_id: "".into(),
    })
}

/// The key of one bus instance's high-water mark for one topic: the
/// topic's meta key (so its slot) and the mark's name (`pub:<instance>`).
/// A key of its own, with the meta hash's ttl, rather than a field of the
/// meta hash: an instance that stopped publishing (every node restart
/// makes a new one) is forgotten after the ttl, even on a topic that stays
/// busy (a field lived as long as the hash, which every publish renews).
fn mark_key(meta: &str, mark: &str) -> String {
    format!("{meta}:{mark}")
}

/// What one batch publishes: the arguments common to every topic's call.
pub(super) struct Batch<'a> {
    pub(super) ttl: u64,
    pub(super) mttl: u64,
    pub(super) id_prefix: &'a str,
    pub(super) mark: &'a str,
    /// For the topics' keys and sizes.
    pub(super) keys: &'a super::Keys,
    pub(super) history: &'a crate::config::HistoryConfig,
}

/// Runs the topic script once per topic of the batch, each with that
/// topic's messages in batch order; the calls are issued together and run
/// concurrently on their shards. Ok only when every one ran: otherwise
/// the batch is resent whole and each topic skips what it ran.
pub(super) async fn publish(
    conn: &PubConn,
    prepared: &Prepared,
    args: &Batch<'_>,
    batch: &[Outgoing],
) -> redis::RedisResult<Option<Lost>> {
    struct Copies<'b> {
        meta: String,
        stream: String,
        channel: &'b str,
        json: String,
        size: usize,
        /// Each message's `seq`, its queue item and its record.
        messages: Vec<(u64, &'b Outgoing, &'b Recorded)>,
    }
    let mut topics: Vec<Copies<'_>> = Vec::new();
    let mut index: HashMap<&str, usize> = HashMap::new();
    for m in batch {
        let Some(r) = m.history.as_deref() else {
            continue;
        };
        // Relayed messages (`Outgoing::relayed`) are made on one Redis only.
        debug_assert!(!r.topics.is_empty());
        // Merge hint only (module docs): the clock and the number.
        let seq = (r.published_ms << 12) | (r.number & 0xfff);
        for (t, channel) in r.topics.iter().zip(&m.channels) {
            // A topic's channel names it, and its keys follow the channel.
            let at = *index.entry(channel.as_str()).or_insert_with(|| {
                topics.push(Copies {
                    meta: args.keys.meta(t),
                    stream: args.keys.stream(t),
                    channel: channel.as_str(),
                    json: crate::bus::wire::json_key(t),
                    size: args.history.size_of(t),
                    messages: Vec::new(),
                });
                topics.len() - 1
            });
            topics[at].messages.push((seq, m, r));
        }
    }
    let calls = topics.iter().map(|copies| {
        let mut conn = conn.clone();
        async move {
            let highest = copies
                .messages
                .iter()
                .map(|m| m.2.number)
                .max()
                .unwrap_or(0);
            routed::<u64>(&mut conn, PUBLISH_TOPIC_LUA, &prepared.sha, |cmd| {
                cmd.arg(3)
                    .arg(&copies.meta)
                    .arg(&copies.stream)
                    .arg(mark_key(&copies.meta, args.mark))
                    .arg(&*prepared.run_id)
                    .arg(args.ttl)
                    .arg(args.mttl)
                    .arg(args.id_prefix)
                    .arg(args.mark)
                    .arg(highest)
                    .arg(copies.channel)
                    .arg(&copies.json)
                    .arg(copies.size)
                    .arg(copies.messages.len());
                for (seq, m, r) in &copies.messages {
                    cmd.arg(r.number)
                        .arg(*seq)
                        .arg(&m.payload[..])
                        .arg(&r.frame[..]);
                    cmd.arg(r.excluded.len());
                    for user in &r.excluded {
                        cmd.arg(&**user);
                    }
                }
            })
            .await
        }
    });
    // A broken connection outranks an answer (the publisher reconnects on
    // it), and an answer that a topic's call did not run outranks one that
    // it ran whole with some messages unstamped (counted here, over every
    // topic: a message lost on two topics is one) or with some SPUBLISH
    // refused (the batch is sent again; the unstamped messages are then
    // skipped by their topic's mark, and not counted).
    let rank = |e: &redis::RedisError| match e.code() {
        None => 2,
        Some(super::UNHEARD) => 0,
        Some(_) => 1,
    };
    let mut failed: Option<redis::RedisError> = None;
    let mut lost: Option<(BTreeSet<u64>, String)> = None;
    for result in futures_util::future::join_all(calls).await {
        match result {
            Ok(_) => {}
            Err(e) => match lost_of(&e) {
                Some((numbers, error)) => {
                    let (all, _) = lost.get_or_insert_with(|| (BTreeSet::new(), error));
                    all.extend(numbers);
                }
                None if failed.as_ref().is_none_or(|f| rank(&e) > rank(f)) => failed = Some(e),
                None => {}
            },
        }
    }
    match (failed, lost) {
        (Some(e), _) if rank(&e) > 0 => Err(e),
        (_, Some((numbers, error))) => Ok(Some(Lost {
            numbers: numbers.into_iter().collect(),
            error,
        })),
        (Some(unheard), None) => Err(unheard),
        (None, None) => Ok(None),
    }
}

/// Runs a history script over some topics (`keys`: meta and stream per
/// topic; `head`: the arguments before the per-topic ones). On one Redis
/// one call; on a Cluster one call per topic, in its slot, issued together.
/// The answers (an array per call) come back concatenated in topic order.
pub(super) async fn per_topic(
    conn: &PubConn,
    sharded: bool,
    (script, sha): (&str, &str),
    keys: &[String],
    head: &[String],
    per: &[Vec<String>],
) -> redis::RedisResult<Vec<redis::Value>> {
    let call = |keys: &[String], per: &[Vec<String>]| {
        let mut conn = conn.clone();
        let (keys, per) = (keys.to_vec(), per.to_vec());
        async move {
            let value: redis::Value = routed(&mut conn, script, sha, |cmd| {
                cmd.arg(keys.len()).arg(&keys).arg(head);
                for args in &per {
                    cmd.arg(args);
                }
            })
            .await?;
            match value {
                redis::Value::Array(items) => Ok(items),
                _ => Err(redis::RedisError::from((
                    redis::ErrorKind::UnexpectedReturnType,
                    "a history script did not answer an array",
                ))),
            }
        }
    };
    if !sharded {
        return call(keys, per).await;
    }
    let calls = keys
        .chunks(2)
        .zip(per)
        .map(|(keys, per)| call(keys, std::slice::from_ref(per)));
    let mut out = Vec::new();
    for answer in futures_util::future::join_all(calls).await {
        out.extend(answer?);
    }
    Ok(out)
}

/// `EVALSHA` of a history script, following the cluster's redirections
/// (the cluster connection is built without retries, so the client does
/// not follow them itself, `conn.rs`): on `ASK` (the slot is being
/// migrated and the topic's keys are already on the importing shard)
/// `ASKING` and the call go to the named node together, in one pipeline,
/// so that nothing else on that connection comes between them; on `MOVED`
/// (the client refreshes its slot map on that reply) and `TRYAGAIN` (the
/// topic's keys are split across the two shards for a moment) the call is
/// made again after a short pause. A redirected call did not run, so
/// following it never runs a script twice; and the publish script skips
/// what it ran anyway. At most [`REDIRECTS`] of them per call.
async fn routed<T: redis::FromRedisValue>(
    conn: &mut PubConn,
    script: &str,
    sha: &str,
    args: impl Fn(&mut redis::Cmd),
) -> redis::RedisResult<T> {
    let mut result = evalsha::<redis::Value, _>(conn, script, sha, (0, 0), &args).await;
    for tries in 1..=REDIRECTS {
        let Err(e) = &result else { break };
        match e.code() {
            Some("ASK") => {
                let Some((node, _)) = e.redirect_node() else {
                    break;
                };
                let Some((host, port)) = node
                    .rsplit_once(':')
                    .and_then(|(h, p)| Some((h.to_owned(), p.parse::<u16>().ok()?)))
                else {
                    break;
                };
                let PubConn::Sharded(cluster) = conn else {
                    break;
                };
                let mut call = redis::cmd("EVALSHA");
                call.arg(sha);
                args(&mut call);
                let mut pipe = redis::pipe();
                pipe.cmd("ASKING").add_command(call);
                let route = SingleNodeRoutingInfo::ByAddress { host, port };
                result = match cluster.route_pipeline(pipe, 1, 1, route).await {
                    Ok(mut values) => match values.pop() {
                        Some(value) => value.extract_error(),
                        None => Err(redis::RedisError::from((
                            redis::ErrorKind::UnexpectedReturnType,
                            "no answer to a redirected history script",
                        ))),
                    },
                    Err(e) => Err(e),
                };
                if matches!(&result, Err(e) if e.code() == Some("NOSCRIPT")) {
                    // A primary that was not there when the scripts were
                    // loaded: load them everywhere, and ask again.
                    load(conn, script).await?;
                    result = evalsha::<redis::Value, _>(conn, script, sha, (0, 0), &args).await;
                }
            }
            Some("MOVED") | Some("TRYAGAIN") => {
                tokio::time::sleep(REDIRECT_PAUSE * tries).await;
                result = evalsha::<redis::Value, _>(conn, script, sha, (0, 0), &args).await;
            }
            _ => break,
        }
    }
    let value = result?;
    T::from_redis_value(value).map_err(redis::RedisError::from)
}

/// Most redirections followed per history script call.
const REDIRECTS: u32 = 5;

/// The pause before a call after `MOVED` or `TRYAGAIN`, times the try.
const REDIRECT_PAUSE: std::time::Duration = std::time::Duration::from_millis(20);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_topics_keys_share_its_channels_slot() {
        for channel in [
            "wshub:g:chat",
            "wshub:u:ann",
            "wshub:all",
            "wshub:g:a{b}c",
            "wshub:g:a{b",
            "wshub:g:{}x",
            "wshub:g:a}b",
            "wshub:u:}{",
        ] {
            let key = format!("wshub:h:{{{}}}:g:x:m", slot_tag(channel));
            assert_eq!(slot_of(&key), slot_of(channel), "{channel} -> {key}");
        }
    }
}
