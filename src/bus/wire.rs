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
//!
//! The name after the marker is taken verbatim (it may contain `:`), so every
//! channel name maps back to exactly one topic.
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
//! newline inside the header, so the first newline after it ends it. The
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

use std::sync::Arc;

/// The byte buffer payloads travel in (re-exported: it is in this module's API).
pub use axum::body::Bytes;
use serde::{Deserialize, Serialize};

use crate::message::Frame;
use crate::route::{Route, Topic};

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

/// Channel suffix of a topic (what follows `P:`), also used in the header.
pub fn topic_key(topic: &Topic) -> String {
    match topic {
        Topic::All => "all".to_owned(),
        Topic::Group(None) => "n".to_owned(),
        Topic::Group(Some(g)) => format!("g:{g}"),
        Topic::User(u) => format!("u:{u}"),
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

    /// The channel a topic is published on.
    pub fn of(&self, topic: &Topic) -> String {
        format!("{}{}", self.prefix, topic_key(topic))
    }

    /// The probe channel of `node_id` (its own, so only it hears its probes).
    pub fn probe(&self, node_id: &str) -> String {
        format!("{}probe:{node_id}", self.prefix)
    }

    /// The topic of a channel, or `None` for a channel that is not a topic.
    pub fn topic(&self, channel: &str) -> Option<Topic> {
        topic_from_key(channel.strip_prefix(&self.prefix)?)
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
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Encodes one message for every channel of its route.
pub fn encode(origin: &str, route: &Route, frame: &Frame) -> Bytes {
    let header = Header {
        origin: origin.into(),
        topics: route.topics().iter().map(topic_key).collect(),
        excluded: route.excluded().iter().map(|u| u.to_string()).collect(),
        published_ms: Some(now_ms()),
    };
    let mut out = Vec::with_capacity(VERSION_LINE.len() + 64 + frame.len());
    out.extend_from_slice(VERSION_LINE);
    // Serializing owned strings into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut out, &header);
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
    let excluded = header.excluded.into_iter().map(Arc::from).collect();
    let frame_start = VERSION_LINE.len() + end + 1;
    let frame = Frame::try_from(payload.slice(frame_start..)).map_err(|_| DecodeError::Frame)?;
    Ok(Decoded {
        published_ms: header.published_ms,
        origin: header.origin.into_owned(),
        route: Route::from_parts(topics, excluded),
        frame,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(ch.probe("n1"), "wshub:probe:n1");
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
