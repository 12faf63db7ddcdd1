//! What the Redis bus puts on the wire: channel names and payloads.
//!
//! **Channels**, under a configurable prefix `P`:
//!
//! | topic | channel |
//! |---|---|
//! | everyone | `P:all` |
//! | the null group | `P:n` |
//! | group `G` | `P:g:G` |
//! | user `U` | `P:u:U` |
//! | node `N`'s health probe | `P:probe:N` |
//! | node instance `A`'s own channel (connections, control) | `P:node:A` |
//!
//! The name after the marker is taken verbatim (it may contain `:`), so every
//! topic channel name maps back to exactly one topic. A node instance's own
//! channel is the one exception: it carries the copies of every message
//! that names one of its connections (`{"type":"connection"}`, topic key
//! `c:<connection id>` in `t`), one copy per message however many of its
//! connections the message names, and its address `A` is the connection
//! ids' `<node id>-<instance>` ([`crate::route::node_address`]).
//!
//! **Control payloads** (`POST /api/disconnect`) travel on the target's own
//! channel (a user's, a group's, or a node instance's for one connection)
//! and start with another first line, so that no node ever takes one for a
//! message:
//!
//! ```text
//! wshub-control/1\n{"o":"n1","k":"disconnect","t":"u:ann","c":4005,"r":"bye"}
//! ```
//!
//! `k` is the kind (`disconnect` today), `t` the target's topic key, `c`
//! the close code, `r` the close frame's text (optional). A node of a build
//! before control payloads finds no `wshub/1` line: it does not decode the
//! payload, delivers nothing, and counts it in `wshub_bus_unreadable_total`
//! (logging the first once), so at worst an old node does not close its
//! sockets. A kind this build does not know is ignored and counted the
//! same way, so newer kinds need no version gate either.
//!
//! **Payload**: a version line, a JSON header, a newline, then the outbound
//! frame exactly as recipients receive it:
//!
//! ```text
//! wshub/1\n{"o":"<origin node>","t":["g:chat","u:ann"],"x":["bob"],"ts":1764331200000}\n{"userId":…}
//! ```
//!
//! `t` is the whole route (every copy carries it: receivers need it for the
//! exactly-once rule), `x` the excluded users, `ts` (optional) the
//! publish time in milliseconds since the Unix epoch. serde_json never writes a raw
//! newline inside the header, so the first newline after it ends it.
//!
//! **With history on** (`history.enabled`) the header has three more
//! fields, all optional, written by the publish script in Redis
//! (`src/bus/redis/history.rs`) rather than by the node:
//!
//! ```text
//! wshub/1\n{"o":"n1","t":["g:chat","u:ann"],"x":[],"ts":1764331200000,"i":"n1.k3x9-41","s":1207,"p":{"g:chat":"mq2k1f0b3c:17","u:ann":"mq2k1f0b3d:5"}}\n{"userId":…}
//! ```
//!
//! `i` is the message id (the publishing node instance and a counter; the
//! script skips a message it already ran, so a batch can be resent), `s` the
//! cluster-wide publish sequence, `p` the message's position
//! (`"<epoch>:<offset>"`) in every topic of its route, by the same keys as
//! `t`. Decoding gives them back as a [`Stamp`]. The version stays
//! `wshub/1`: older nodes ignore header fields they do not know (the header
//! is read without `deny_unknown_fields`), and payloads without them (from
//! older nodes, or with history off) still decode, unstamped.
//!
//! The node cannot write `i`, `s` and `p` itself: the offsets exist only
//! once Redis has run the script. So it sends the header *without its
//! closing brace* ([`encode_unstamped`]) and the frame as two script
//! arguments, and the script appends `,"i":…,"s":…,"p":{…}}`, a newline
//! and the frame ([`stamp`] is the same concatenation in Rust, for tests).
//! The topic keys inside `p` arrive already JSON-encoded from the node, so
//! the script only concatenates and never has to escape a string. The
//! frame is not re-escaped: a node slices it out and shares it with its
//! recipients. A payload with another version line is not decoded; the node
//! counts it and logs it once (a newer node in a rolling upgrade must bump
//! the version only with a change older nodes cannot read).
//!
//! **Versions in a rolling upgrade.** Every node's registry entry lists the
//! versions it reads ([`READS`]); a node writes the newest version of
//! [`WRITES`] that every live node reads, as the registry's version gate
//! (`VersionGate` in `src/bus/registry.rs`) says, and the baseline (the last
//! of [`WRITES`]) otherwise. So a build that adds version 2 lists it in both,
//! keeps writing 1 while any node that cannot read 2 is alive, and switches
//! by itself once the last old node has left. Today there is only 1.

use std::borrow::Cow;
use std::sync::Arc;

/// The byte buffer payloads travel in (re-exported: it is in this module's API).
pub use axum::body::Bytes;
use serde::{Deserialize, Serialize};

use crate::history::{Position, Stamp};
use crate::message::Frame;
use crate::route::{Route, Topic, node_address};

/// The payload format version this build writes and reads.
pub const VERSION_LINE: &[u8] = b"wshub/1\n";

/// A payload format version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// `wshub/1`: the version line, the JSON header, the frame.
    V1,
}

impl Version {
    /// The version's number, as in its version line and in registry entries.
    pub const fn number(self) -> u32 {
        match self {
            Version::V1 => 1,
        }
    }
}

/// The payload versions this build reads (its registry entry says so).
pub const READS: &[Version] = &[Version::V1];

/// The payload versions this build writes, newest first. The last one is
/// the baseline, written whenever the version gate does not allow a newer
/// one: every node a cluster may hold during an upgrade to this build must
/// read it.
pub const WRITES: &[Version] = &[Version::V1];

/// The key of a topic in the header (and, but for connections, its
/// channel suffix: what follows `P:`).
pub fn topic_key(topic: &Topic) -> String {
    let (tag, name) = key_parts(topic);
    [tag, name].concat()
}

/// A topic's key as its tag and its name (empty for `all` and `n`), so a
/// channel name is built with one allocation and no formatting machinery:
/// every subscribe, release and publish names its channels through
/// [`Channels::of`] (issue 19: its two `format!`s showed in the profiles
/// of connects and disconnects).
pub(crate) fn key_parts(topic: &Topic) -> (&'static str, &str) {
    match topic {
        Topic::All => ("all", ""),
        Topic::Group(None) => ("n", ""),
        Topic::Group(Some(g)) => ("g:", g),
        Topic::User(u) => ("u:", u),
        Topic::Connection(c) => ("c:", c),
    }
}

/// The topic a channel suffix names.
pub fn topic_from_key(key: &str) -> Option<Topic> {
    match key {
        "all" => Some(Topic::All),
        "n" => Some(Topic::Group(None)),
        _ => {
            if let Some(g) = key.strip_prefix("g:") {
                Some(Topic::Group(Some(Arc::from(g))))
            } else if let Some(c) = key.strip_prefix("c:") {
                Some(Topic::Connection(Arc::from(c)))
            } else {
                key.strip_prefix("u:").map(|u| Topic::User(Arc::from(u)))
            }
        }
    }
}

/// Channel names under one prefix.
#[derive(Debug, Clone)]
pub struct Channels {
    prefix: String,
}

impl Channels {
    /// The channel names under `redis.channel_prefix`.
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: format!("{prefix}:"),
        }
    }

    /// The channel a topic is published on: a connection's is its node
    /// instance's own channel.
    pub fn of(&self, topic: &Topic) -> String {
        match topic {
            Topic::Connection(c) => self.node(node_address(c).unwrap_or(c)),
            _ => {
                let (tag, name) = key_parts(topic);
                [self.prefix.as_str(), tag, name].concat()
            }
        }
    }

    /// The own channel of the node instance `address` (`<node id>-<instance>`).
    pub fn node(&self, address: &str) -> String {
        format!("{}node:{address}", self.prefix)
    }

    /// Every topic channel's name starts with this (for `PUBSUB CHANNELS`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The channel every ban is published on, for the nodes' copies of
    /// the bans (`src/bus/redis/bans.rs`); not a topic.
    pub fn bans(&self) -> String {
        format!("{}bans", self.prefix)
    }

    /// The probe channel of `node_id` (its own, so only it hears its probes).
    pub fn probe(&self, node_id: &str) -> String {
        format!("{}probe:{node_id}", self.prefix)
    }

    /// The topic of a channel, or `None` for a channel that is not a topic
    /// (a probe's, a node instance's own).
    pub fn topic(&self, channel: &str) -> Option<Topic> {
        match topic_from_key(channel.strip_prefix(&self.prefix)?)? {
            Topic::Connection(_) => None,
            topic => Some(topic),
        }
    }
}

#[derive(Serialize, Deserialize)]
struct Header<'a> {
    #[serde(rename = "o", borrow)]
    origin: std::borrow::Cow<'a, str>,
    #[serde(rename = "t")]
    topics: Vec<String>,
    #[serde(rename = "x", default)]
    excluded: Vec<String>,
    /// When the origin published it, in milliseconds since the Unix epoch
    /// (optional: for the delivery latency metric).
    #[serde(rename = "ts", default, skip_serializing_if = "Option::is_none")]
    published_ms: Option<u64>,
    /// The message id (history on; written by the publish script). Read
    /// but not kept: nothing but the script's dedupe uses it (its number),
    /// so it is borrowed from the payload, not copied.
    #[serde(rename = "i", default, skip_serializing_if = "Option::is_none", borrow)]
    id: Option<Text<'a>>,
    /// The publish sequence (history on; written by the publish script).
    #[serde(rename = "s", default, skip_serializing_if = "Option::is_none")]
    seq: Option<u64>,
    /// Position per topic key of `t` (history on; written by the script).
    #[serde(rename = "p", default, skip_serializing_if = "Option::is_none", borrow)]
    positions: Option<Pairs<'a>>,
}

/// A JSON object of strings as its pairs, in order, each string borrowed
/// from the payload when it has no escapes: the `p` of a stamp. (A
/// `HashMap<String, String>` made a table and two strings per topic of
/// every copy received; issue 19.)
#[derive(Debug, Default)]
struct Pairs<'a>(Vec<(Text<'a>, Text<'a>)>);

/// A string of the header, borrowed from the payload unless it had to be
/// unescaped (serde's `borrow` on a `Cow`).
#[derive(Debug, Deserialize)]
struct Text<'a>(#[serde(borrow)] Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Pairs<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Pairs<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object of strings")
            }
            fn visit_map<M: serde::de::MapAccess<'de>>(
                self,
                mut map: M,
            ) -> Result<Self::Value, M::Error> {
                let mut pairs = Vec::with_capacity(map.size_hint().unwrap_or(2));
                while let Some(pair) = map.next_entry::<Text<'de>, Text<'de>>()? {
                    pairs.push(pair);
                }
                Ok(Pairs(pairs))
            }
        }
        d.deserialize_map(Visit)
    }
}

impl Serialize for Text<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl Serialize for Pairs<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter().map(|(k, v)| (&*k.0, &*v.0)))
    }
}

impl Pairs<'_> {
    /// The value of `key` (the last one, as a map would keep it).
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find_map(|(k, v)| (k.0 == key).then_some(&*v.0))
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn header<'a>(origin: &'a str, route: &Route) -> Header<'a> {
    Header {
        origin: origin.into(),
        topics: route.topics().iter().map(topic_key).collect(),
        excluded: route.excluded().iter().map(|u| u.to_string()).collect(),
        published_ms: Some(now_ms()),
        id: None,
        seq: None,
        positions: None,
    }
}

/// Encodes one message for every channel of its route.
pub fn encode(origin: &str, route: &Route, frame: &Frame) -> Bytes {
    let mut out = Vec::with_capacity(VERSION_LINE.len() + 64 + frame.len());
    out.extend_from_slice(VERSION_LINE);
    // Serializing owned strings into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut out, &header(origin, route));
    out.push(b'\n');
    out.extend_from_slice(frame.as_bytes());
    Bytes::from(out)
}

/// Encodes one message in payload version `version` (chosen by the version
/// gate, see the module docs).
pub fn encode_as(version: Version, origin: &str, route: &Route, frame: &Frame) -> Bytes {
    match version {
        Version::V1 => encode(origin, route, frame),
    }
}

/// The start of a payload the publish script completes (history on): the
/// version line and the header without its closing brace. The script
/// appends the id, the stamp, `}`, a newline and the frame.
pub fn encode_unstamped(origin: &str, route: &Route) -> Bytes {
    let mut out = Vec::with_capacity(VERSION_LINE.len() + 64);
    out.extend_from_slice(VERSION_LINE);
    // Serializing owned strings into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut out, &header(origin, route));
    // A serialized struct always ends with its closing brace.
    if out.last() == Some(&b'}') {
        out.pop();
    }
    Bytes::from(out)
}

/// A topic's key as a JSON string (quotes and escapes included), as the
/// publish script puts it into `p` without escaping anything itself.
pub fn json_key(topic: &Topic) -> String {
    // A String always serializes.
    serde_json::to_string(&topic_key(topic)).unwrap_or_default()
}

/// What the publish script appends to an [`encode_unstamped`] prefix, in
/// Rust: the same concatenation, for tests and as its specification.
/// `positions` pairs each [`json_key`] with the message's position there.
pub fn stamp(
    prefix: &[u8],
    id: &str,
    seq: u64,
    positions: &[(String, Position)],
    frame: &Frame,
) -> Bytes {
    let mut out = prefix.to_vec();
    // The id is JSON-encoded here; the script gets it pre-encoded too.
    let id = serde_json::to_string(id).unwrap_or_default();
    out.extend_from_slice(format!(",\"i\":{id},\"s\":{seq},\"p\":{{").as_bytes());
    for (n, (key, position)) in positions.iter().enumerate() {
        if n > 0 {
            out.push(b',');
        }
        out.extend_from_slice(format!("{key}:\"{position}\"").as_bytes());
    }
    out.extend_from_slice(b"}}\n");
    out.extend_from_slice(frame.as_bytes());
    Bytes::from(out)
}

/// A decoded payload.
#[derive(Debug)]
pub struct Decoded {
    /// The node that published it (a node ignores its own).
    pub origin: String,
    /// When the origin published it (ms since the Unix epoch), if it said.
    pub published_ms: Option<u64>,
    /// Where it goes.
    pub route: Route,
    /// What the recipients receive, encoded.
    pub frame: Frame,
    /// Its sequence and positions, when the publish script stamped it.
    pub stamp: Option<Stamp>,
}

/// Why a payload could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("unknown payload version")]
    /// A payload of another wire version.
    Version,
    #[error("malformed header: {0}")]
    /// The header is malformed; the text says how.
    Header(String),
    #[error("frame is not UTF-8")]
    /// The frame is not UTF-8.
    Frame,
}

/// Decodes a payload received on a topic channel. The frame is a slice of
/// `payload`, not a copy.
pub fn decode(payload: Bytes) -> Result<Decoded, DecodeError> {
    let rest = payload
        .strip_prefix(VERSION_LINE)
        .ok_or(DecodeError::Version)?;
    let end = rest
        .iter()
        .position(|&b| b == b'\n')
        .ok_or_else(|| DecodeError::Header("no end of header".into()))?;
    let header: Header<'_> =
        serde_json::from_slice(&rest[..end]).map_err(|e| DecodeError::Header(e.to_string()))?;
    let topics = header
        .topics
        .iter()
        .map(|k| {
            topic_from_key(k).ok_or_else(|| DecodeError::Header(format!("unknown topic {k:?}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let stamp = match (header.seq, &header.positions) {
        (None, None) => None,
        (Some(seq), Some(positions)) => Some(read_stamp(seq, positions, &header.topics, &topics)?),
        _ => return Err(DecodeError::Header("a stamp needs both s and p".into())),
    };
    let excluded = header.excluded.into_iter().map(Arc::from).collect();
    let frame_start = VERSION_LINE.len() + end + 1;
    let frame = Frame::try_from(payload.slice(frame_start..)).map_err(|_| DecodeError::Frame)?;
    Ok(Decoded {
        published_ms: header.published_ms,
        origin: header.origin.into_owned(),
        route: Route::from_parts(topics, excluded),
        frame,
        stamp,
    })
}

/// The stamp of a header: a position for the topics of the route it names,
/// in route order. On one Redis that is every topic but its connections
/// (never recorded: a message naming a connection and a group is stamped
/// in the group only); on a Redis Cluster a copy names its own topic only
/// (each topic is stamped by its own shard, `history/sharded.rs`). A stamp
/// that names none of the route's topics, or one outside it, is refused.
fn read_stamp(
    seq: u64,
    positions: &Pairs<'_>,
    keys: &[String],
    topics: &[Topic],
) -> Result<Stamp, DecodeError> {
    let recorded = |key: &str| {
        keys.iter()
            .zip(topics)
            .any(|(k, t)| k == key && !matches!(t, Topic::Connection(_)))
    };
    if positions.0.is_empty() || !positions.0.iter().all(|(k, _)| recorded(&k.0)) {
        return Err(DecodeError::Header(
            "a stamp must name topics of its route only, at least one".into(),
        ));
    }
    let positions = keys
        .iter()
        .zip(topics)
        .filter(|(_, topic)| !matches!(topic, Topic::Connection(_)))
        .filter_map(|(key, topic)| Some((positions.get(key)?, topic)))
        .map(|(text, topic)| {
            let position = Position::parse(text)
                .ok_or_else(|| DecodeError::Header(format!("bad position {text:?}")))?;
            Ok((topic.clone(), position))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Stamp { seq, positions })
}

/// The first line of a control payload.
pub const CONTROL_LINE: &[u8] = b"wshub-control/1\n";

/// What a control payload asks of the nodes that receive it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Order {
    /// Close every socket reached through `target` with `code` and, when
    /// given, `reason` as the close frame's text.
    Disconnect {
        /// The user's, group's or connection's topic.
        target: Topic,
        /// The close code (4000–4999).
        code: u16,
        /// The close frame's text.
        reason: Option<String>,
    },
}

/// A control payload, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Control {
    /// The node that sent it.
    pub origin: String,
    /// What it asks.
    pub order: Order,
}

#[derive(Serialize, Deserialize)]
struct ControlHeader<'a> {
    #[serde(rename = "o", borrow)]
    origin: std::borrow::Cow<'a, str>,
    #[serde(rename = "k", borrow)]
    kind: std::borrow::Cow<'a, str>,
    #[serde(rename = "t")]
    target: String,
    #[serde(rename = "c", default)]
    code: u16,
    #[serde(rename = "r", default, skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
}

/// Encodes a control payload.
pub fn encode_control(control: &Control) -> Bytes {
    let Order::Disconnect {
        target,
        code,
        reason,
    } = &control.order;
    let header = ControlHeader {
        origin: control.origin.as_str().into(),
        kind: "disconnect".into(),
        target: topic_key(target),
        code: *code,
        reason: reason.clone(),
    };
    let mut out = CONTROL_LINE.to_vec();
    // Serializing owned strings into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut out, &header);
    Bytes::from(out)
}

/// Whether a payload is a control payload (whatever its content).
pub fn is_control(payload: &[u8]) -> bool {
    payload.starts_with(CONTROL_LINE)
}

/// Decodes a control payload (see [`is_control`]).
pub fn decode_control(payload: &[u8]) -> Result<Control, DecodeError> {
    let rest = payload
        .strip_prefix(CONTROL_LINE)
        .ok_or(DecodeError::Version)?;
    let header: ControlHeader<'_> =
        serde_json::from_slice(rest).map_err(|e| DecodeError::Header(e.to_string()))?;
    if header.kind != "disconnect" {
        return Err(DecodeError::Header(format!(
            "unknown control kind {:?}",
            header.kind
        )));
    }
    let target = topic_from_key(&header.target)
        .ok_or_else(|| DecodeError::Header(format!("unknown topic {:?}", header.target)))?;
    Ok(Control {
        origin: header.origin.into_owned(),
        order: Order::Disconnect {
            target,
            code: header.code,
            reason: header.reason,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The message id of a stamped payload (`i`), unescaped.
    fn id_of(payload: &[u8]) -> Option<String> {
        let rest = payload.strip_prefix(VERSION_LINE)?;
        let end = rest.iter().position(|&b| b == b'\n')?;
        let header: Header<'_> = serde_json::from_slice(&rest[..end]).ok()?;
        header.id.map(|id| id.0.into_owned())
    }

    #[test]
    fn channel_names_round_trip() {
        let ch = Channels::new("wshub");
        for topic in [
            Topic::All,
            Topic::Group(None),
            Topic::Group(Some("".into())),
            Topic::Group(Some("a:b:c".into())),
            Topic::User("u:1".into()),
            Topic::User("ünï cödé".into()),
        ] {
            let name = ch.of(&topic);
            assert_eq!(ch.topic(&name), Some(topic), "{name}");
        }
        assert_eq!(ch.of(&Topic::Group(Some("chat".into()))), "wshub:g:chat");
        assert_eq!(ch.topic("other:g:chat"), None);
        assert_eq!(ch.topic("wshub:probe:n1"), None);
        let conn = Topic::Connection("web-1-0a1b-42".into());
        assert_eq!(ch.of(&conn), "wshub:node:web-1-0a1b");
        assert_eq!(ch.topic(&ch.of(&conn)), None, "a node's own channel");
        assert_eq!(topic_from_key(&topic_key(&conn)), Some(conn));
        assert_eq!(ch.probe("n1"), "wshub:probe:n1");
        assert_eq!(ch.bans(), "wshub:bans");
        assert_eq!(ch.topic(&ch.bans()), None, "the bans' channel");
    }

    #[test]
    fn payload_round_trips_with_the_frame_untouched() {
        let route = Route::from_parts(
            vec![
                Topic::Group(Some("g\n1".into())),
                Topic::User("u".into()),
                Topic::Group(None),
            ],
            vec!["x\"y".into()],
        );
        let frame = Frame::from(r#"{"userId":null,"message":"line\nbreak é"}"#.to_owned());
        let bytes = encode("node-1", &route, &frame);
        let d = decode(bytes).unwrap();
        assert_eq!(d.origin, "node-1");
        assert_eq!(d.route, route);
        assert_eq!(d.frame, frame);
    }

    #[test]
    fn payloads_without_a_stamp_decode_unstamped() {
        let route = Route::from_parts(vec![Topic::All], Vec::new());
        let frame = Frame::from("{}");
        let d = decode(encode("n", &route, &frame)).unwrap();
        assert_eq!(d.stamp, None);
        // A payload of a build before history (no ts either) still decodes.
        let old = Bytes::from_static(b"wshub/1\n{\"o\":\"n\",\"t\":[\"all\"],\"x\":[]}\n{}");
        let d = decode(old).unwrap();
        assert_eq!((d.route, d.stamp), (route, None));
    }

    #[test]
    fn stamped_payloads_round_trip_with_the_frame_untouched() {
        let route = Route::from_parts(
            vec![
                Topic::Group(Some("a\"b:}{".into())),
                Topic::User("ünï".into()),
                Topic::Group(None),
            ],
            vec!["x".into()],
        );
        let frame = Frame::from(r#"{"userId":"u","message":"hi\n"}"#.to_owned());
        let prefix = encode_unstamped("node\"1", &route);
        assert!(!prefix.ends_with(b"}"), "the script closes the header");
        let positions: Vec<(String, Position)> = route
            .topics()
            .iter()
            .enumerate()
            .map(|(n, t)| {
                let p = Position {
                    epoch: format!("e{n}").into(),
                    offset: 40 + n as u64,
                };
                (json_key(t), p)
            })
            .collect();
        let bytes = stamp(&prefix, "node\"1.x-7", 99, &positions, &frame);
        assert_eq!(id_of(&bytes), Some("node\"1.x-7".to_owned()));
        let d = decode(bytes).unwrap();
        assert_eq!(d.origin, "node\"1");
        assert_eq!(d.route, route);
        assert_eq!(d.frame, frame);
        let stamp = d.stamp.unwrap();
        assert_eq!(stamp.seq, 99);
        let want: Vec<(Topic, Position)> = route
            .topics()
            .iter()
            .cloned()
            .zip(positions.into_iter().map(|(_, p)| p))
            .collect();
        assert_eq!(stamp.positions, want, "in route order");
        assert_eq!(
            stamp.position(&Topic::Group(None)).unwrap().to_string(),
            "e2:42"
        );
    }

    #[test]
    fn half_stamps_and_bad_positions_are_errors() {
        for bad in [
            &b"wshub/1\n{\"o\":\"n\",\"t\":[\"all\"],\"s\":1}\n{}"[..],
            b"wshub/1\n{\"o\":\"n\",\"t\":[\"all\"],\"p\":{\"all\":\"e:1\"}}\n{}",
            b"wshub/1\n{\"o\":\"n\",\"t\":[\"all\"],\"s\":1,\"p\":{}}\n{}",
            b"wshub/1\n{\"o\":\"n\",\"t\":[\"all\"],\"s\":1,\"p\":{\"all\":\"e:x\"}}\n{}",
            b"wshub/1\n{\"o\":\"n\",\"t\":[\"all\"],\"s\":1,\"p\":{\"n\":\"e:1\"}}\n{}",
        ] {
            assert!(decode(Bytes::from_static(bad)).is_err(), "{bad:?}");
        }
        // A copy stamped by a Cluster shard names its own topic only.
        let copy =
            b"wshub/1\n{\"o\":\"n\",\"t\":[\"n\",\"u:a\"],\"s\":1,\"p\":{\"u:a\":\"e:3\"}}\n{}";
        let stamp = decode(Bytes::from_static(copy)).unwrap().stamp.unwrap();
        assert_eq!(stamp.positions.len(), 1);
        assert_eq!(
            stamp
                .position(&Topic::User("a".into()))
                .unwrap()
                .to_string(),
            "e:3"
        );
    }

    #[test]
    fn control_payloads_round_trip_and_old_decoders_refuse_them() {
        for target in [
            Topic::User("ann\n:x".into()),
            Topic::Group(None),
            Topic::Group(Some("g".into())),
            Topic::Connection("n-1a-7".into()),
        ] {
            let control = Control {
                origin: "n1".into(),
                order: Order::Disconnect {
                    target,
                    code: 4321,
                    reason: Some("bye \"now\"".into()),
                },
            };
            let bytes = encode_control(&control);
            assert!(is_control(&bytes));
            assert_eq!(decode_control(&bytes).unwrap(), control);
            // What a node before control payloads does with one.
            assert!(matches!(decode(bytes), Err(DecodeError::Version)));
        }
        let other = b"wshub-control/1\n{\"o\":\"n\",\"k\":\"reboot\",\"t\":\"all\"}";
        assert!(decode_control(other).is_err(), "unknown kinds are refused");
        let message = encode("n", &Route::everyone(), &Frame::from("{}"));
        assert!(!is_control(&message));
    }

    #[test]
    fn unreadable_payloads_are_errors_not_panics() {
        for bad in [
            &b""[..],
            b"wshub/2\n{}\n{}",
            b"wshub/1\n",
            b"wshub/1\n{\"o\":1}\n{}",
            b"wshub/1\n{\"o\":\"n\",\"t\":[\"zz\"]}\n{}",
            b"wshub/1\n{\"o\":\"n\",\"t\":[]}\n\xff\xfe",
        ] {
            assert!(decode(Bytes::from_static(bad)).is_err(), "{bad:?}");
        }
    }
}
