//! Positions: where a message stands in each topic's history, and the
//! stamp the bus gives a message when history is on (`docs/resume.md`).
//!
//! Its own module, below both [`crate::envelope`] (which carries a stamp)
//! and [`crate::history`] (which reads stamped messages back), so neither
//! imports the other's dependents.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::route::Topic;

/// Where a message stands in one topic's history: `"<epoch>:<offset>"`.
///
/// The epoch changes whenever the topic's history starts afresh (first
/// use, a Redis restart, expiry); offsets count messages published to the
/// topic in that epoch, from 1. A topic never published to is at offset 0.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Position {
    /// The history's epoch: short, without `:`.
    pub epoch: Arc<str>,
    /// Messages published to the topic in this epoch, up to this one.
    pub offset: u64,
}

impl Position {
    /// Reads `"<epoch>:<offset>"`; `None` when it is not one.
    pub fn parse(text: &str) -> Option<Self> {
        let (epoch, offset) = text.rsplit_once(':')?;
        if epoch.is_empty() || epoch.contains(':') {
            return None;
        }
        // Digits only: `u64::from_str` would also take a leading `+`.
        if offset.is_empty() || !offset.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        Some(Self {
            epoch: epoch.into(),
            offset: offset.parse().ok()?,
        })
    }
}

impl Position {
    /// Where a socket stands in a topic that had no history yet when its
    /// tops were read without making any (a socket that does not speak
    /// resume, `src/resume/decision.rs`): before every message of whatever
    /// epoch the topic gets later. Its epoch is empty, which no real epoch
    /// is, so [`parse`](Self::parse) never gives it and no client can send
    /// it; it is only ever stored in a drain handoff (as `":0"`).
    pub fn unborn() -> Self {
        Self {
            epoch: "".into(),
            offset: 0,
        }
    }

    /// Whether this is [`unborn`](Self::unborn).
    pub fn is_unborn(&self) -> bool {
        self.epoch.is_empty()
    }
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.epoch, self.offset)
    }
}

/// What the bus stamped on a message when history is on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stamp {
    /// Cluster-wide publish order (one counter in Redis): replays from
    /// several topics are merged by it.
    pub seq: u64,
    /// The message's position in every topic of its route, in route order.
    pub positions: Vec<(Topic, Position)>,
}

impl Stamp {
    /// The message's position in `topic`, if it is one of its route's.
    pub fn position(&self, topic: &Topic) -> Option<&Position> {
        self.positions
            .iter()
            .find_map(|(t, p)| (t == topic).then_some(p))
    }
}

/// The key a client uses for a topic: `all`, `nullgroup`, `group:<G>`,
/// `user:<U>` (G and U verbatim, any characters).
pub fn client_key(topic: &Topic) -> String {
    match topic {
        Topic::All => "all".to_owned(),
        Topic::Group(None) => "nullgroup".to_owned(),
        Topic::Group(Some(g)) => format!("group:{g}"),
        Topic::User(u) => format!("user:{u}"),
        Topic::Connection(c) => format!("connection:{c}"),
    }
}

/// The topic a client key names (`all`, `nullgroup`, `group:<G>`,
/// `user:<U>`), the inverse of [`client_key`]; `None` for anything else.
pub fn topic_of_client_key(key: &str) -> Option<Topic> {
    match key {
        "all" => Some(Topic::All),
        "nullgroup" => Some(Topic::Group(None)),
        _ => {
            if let Some(g) = key.strip_prefix("group:") {
                Some(Topic::Group(Some(g.into())))
            } else {
                key.strip_prefix("user:").map(|u| Topic::User(u.into()))
            }
        }
    }
}

/// The JSON object of the per-message `pos` field: every topic of the
/// message's route, by client key.
pub fn pos_json(stamp: &Stamp) -> String {
    let map: BTreeMap<String, String> = stamp
        .positions
        .iter()
        .map(|(t, p)| (client_key(t), p.to_string()))
        .collect();
    // A map of strings always serializes.
    serde_json::to_string(&map).unwrap_or_else(|_| "{}".to_owned())
}

/// Where a queued copy of a stamped message stands in the topic it came
/// through: the topic's index in a socket's three topics (everyone, its
/// group, its user: `history::topics_of`) and the message's position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mark {
    slot: usize,
    position: Position,
}

impl Mark {
    /// The mark of a copy through `via` of a message stamped `stamp`, when
    /// it has one.
    pub fn of(via: &Topic, stamp: Option<&Stamp>) -> Option<Self> {
        Self::at(via, stamp?.position(via)?.clone())
    }

    /// The mark of `position` in `via` (`None` for a connection's topic,
    /// which has no history).
    pub fn at(via: &Topic, position: Position) -> Option<Self> {
        let slot = match via {
            Topic::All => 0,
            Topic::Group(_) => 1,
            Topic::User(_) => 2,
            // Never stamped: messages to a connection skip history.
            Topic::Connection(_) => return None,
        };
        Some(Self { slot, position })
    }

    /// A mark for the topic at index `slot` (0 everyone, 1 group, 2 user).
    pub fn new(slot: usize, position: Position) -> Self {
        Self { slot, position }
    }

    /// The topic's index in the socket's three topics.
    pub fn slot(&self) -> usize {
        self.slot
    }

    /// The message's position in that topic.
    pub fn position(&self) -> &Position {
        &self.position
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_round_trip_and_bad_ones_are_refused() {
        let p = Position::parse("k3:41").unwrap();
        assert_eq!(p.epoch.as_ref(), "k3");
        assert_eq!(p.offset, 41);
        assert_eq!(p.to_string(), "k3:41");
        for bad in ["", ":1", "k3:", "k3:+1", "k3:-1", "a:b:1", "k3:1x", "k3"] {
            assert_eq!(Position::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn client_keys_are_the_contracts() {
        assert_eq!(client_key(&Topic::All), "all");
        assert_eq!(client_key(&Topic::Group(None)), "nullgroup");
        assert_eq!(client_key(&Topic::Group(Some("a:b".into()))), "group:a:b");
        assert_eq!(client_key(&Topic::User("ann".into())), "user:ann");
        for topic in [
            Topic::All,
            Topic::Group(None),
            Topic::Group(Some("".into())),
            Topic::Group(Some("a:b".into())),
            Topic::User("ann".into()),
        ] {
            assert_eq!(topic_of_client_key(&client_key(&topic)), Some(topic));
        }
        assert_eq!(topic_of_client_key("u:ann"), None);
    }

    #[test]
    fn pos_names_every_topic_of_the_route() {
        let stamp = Stamp {
            seq: 7,
            positions: vec![
                (
                    Topic::Group(Some("chat".into())),
                    Position::parse("p7:17").unwrap(),
                ),
                (Topic::User("ann".into()), Position::parse("q2:5").unwrap()),
            ],
        };
        assert_eq!(
            pos_json(&stamp),
            r#"{"group:chat":"p7:17","user:ann":"q2:5"}"#
        );
    }
}
