//! History and positions: what lossless resume (`docs/resume.md`, contract
//! in `reference/resume.md`) is made of, independent of where it is kept.
//!
//! With `history.enabled`, every message is stamped by the bus as it is
//! published: a cluster-wide sequence number (publish order) and, for every
//! topic of its route, a [`Position`] — the topic's epoch and the message's
//! offset in it. The [`History`] a bus offers reads those messages back, so
//! a socket that reconnects can be replayed what it missed, and a node can
//! fill the gap a dropped subscriber connection left.
//!
//! This module holds the vocabulary (positions, stamps, the client-facing
//! topic keys, the `pos` field) and the [`History`] interface; the Redis
//! implementation lives with the Redis bus (`src/bus/redis/history.rs`).

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::envelope::Envelope;
pub use crate::position::{Position, Stamp, client_key, pos_json, topic_of_client_key};
use crate::route::{Identity, Topic};

/// The three topics a socket can be reached through, in a fixed order:
/// everyone, its group (or the null group), its user.
pub fn topics_of(who: &Identity) -> [Topic; 3] {
    let [group, user] = who.topics();
    [Topic::All, group, user]
}

/// Merges lists that are each in their own order (a topic's messages, by
/// offset) into one, taking at each step the head with the lowest `key`
/// (ties: the earlier list). No list's order is ever changed: on one Redis,
/// where every list is in `seq` order, this is the publish order; on a
/// Redis Cluster, where `seq` is only a hint (`history/sharded.rs`), each
/// topic still comes out in its own order.
pub fn merge_ordered<T, K: Ord>(lists: Vec<Vec<T>>, key: impl Fn(&T) -> K) -> Vec<T> {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    let total = lists.iter().map(Vec::len).sum();
    let mut lists: Vec<std::vec::IntoIter<T>> = lists.into_iter().map(Vec::into_iter).collect();
    let mut heads: Vec<Option<T>> = lists.iter_mut().map(Iterator::next).collect();
    let mut heap: BinaryHeap<Reverse<(K, usize)>> = heads
        .iter()
        .enumerate()
        .filter_map(|(i, head)| Some(Reverse((key(head.as_ref()?), i))))
        .collect();
    let mut out = Vec::with_capacity(total);
    while let Some(Reverse((_, i))) = heap.pop() {
        if let Some(item) = heads[i].take() {
            out.push(item);
        }
        heads[i] = lists[i].next();
        if let Some(next) = &heads[i] {
            heap.push(Reverse((key(next), i)));
        }
    }
    out
}

/// A socket's positions in its three topics (indexed as [`topics_of`]);
/// `None` where it has none.
pub type Positions = [Option<Position>; 3];

/// Reads the `resume` query parameter's value (already URL-decoded): the
/// JSON object `{"<client key>":"<position>",…}`. Keys that are not one of
/// the socket's topics are ignored. `Err` when the value cannot be read at
/// all (the resume is then not recovered).
pub fn parse_resume(value: &str, who: &Identity) -> Result<Positions, ResumeParseError> {
    // Values are read only for the socket's own keys: a foreign key may
    // hold anything (a number, an object) without spoiling the resume.
    let map: BTreeMap<String, serde_json::Value> =
        serde_json::from_str(value).map_err(|_| ResumeParseError)?;
    let topics = topics_of(who);
    let mut positions: Positions = Default::default();
    for (slot, topic) in positions.iter_mut().zip(topics.iter()) {
        if let Some(value) = map.get(&client_key(topic)) {
            let text = value.as_str().ok_or(ResumeParseError)?;
            *slot = Some(Position::parse(text).ok_or(ResumeParseError)?);
        }
    }
    Ok(positions)
}

/// The `resume` parameter could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the resume positions cannot be read")]
pub struct ResumeParseError;

/// What [`History::read_many`] found after one position.
#[derive(Debug)]
pub enum Read {
    /// Every message published to the topic after the position, in offset
    /// order (each with its stamp), and the topic's current top.
    Complete {
        /// The messages, oldest first; each envelope has its stamp.
        messages: Vec<Arc<Envelope>>,
        /// The topic's position now (the last message's, or the one asked
        /// for when nothing followed it).
        top: Position,
        /// Where history passed over messages that all excluded the reader
        /// (`reader` of [`History::read_many`]): the messages follow this
        /// position of the same epoch, later than the one asked for, not
        /// that one. `None`: they follow the one asked for.
        passed: Option<Position>,
    },
    /// The messages cannot all be given: the epoch changed, entries were
    /// trimmed or expired, or there are more than asked for. `top` is the
    /// topic's current position, from which a socket continues.
    Incomplete {
        /// The topic's position now.
        top: Position,
    },
    /// Reading the messages went beyond the bytes allowed (`max_bytes` of
    /// [`History::read_many`]); the read stopped there.
    TooLarge {
        /// The topic's position now.
        top: Position,
    },
}

/// The future type of the [`History`] calls.
pub type HistoryFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, HistoryError>> + Send + 'a>>;

/// Where history is kept (offered by a bus that keeps it; see
/// [`Bus::history`](crate::bus::Bus::history)).
pub trait History: Send + Sync + 'static {
    /// The current position of each topic, creating a topic's epoch when it
    /// has none (so every position handed out names a real epoch).
    fn tops<'a>(&'a self, topics: &'a [Topic]) -> HistoryFuture<'a, Vec<Position>>;

    /// The current position of each topic like [`tops`](Self::tops), but
    /// never making an epoch: [`Position::unborn`] for a topic that has
    /// none yet. For sockets that do not speak resume, which must not
    /// create history keys (one per user topic, kept a day, for every
    /// page that ever connected).
    fn peek<'a>(&'a self, topics: &'a [Topic]) -> HistoryFuture<'a, Vec<Position>>;

    /// For each `(topic, after)`, in order, the messages published to the
    /// topic after the position, if all of them are still kept, no older
    /// than `history.ttl_ms`, and at most `max` (per topic; `usize::MAX`:
    /// as many as history keeps, which its `size_*` bound). The messages
    /// are read as **one atomic snapshot**: a message published while they
    /// are read is in every read of its topics or in none, and is later in
    /// publish order than every message read (what the resume decision
    /// relies on; see `src/resume/decision.rs`). After
    /// [`Position::unborn`]: every message of the topic's current epoch,
    /// or none (and the top unborn) when it still has no epoch, which is
    /// then not made.
    ///
    /// `max_bytes` bounds what is read in all, as history stores it (a
    /// message kept in two of the topics counts twice): reading stops
    /// once it is passed, and the topic it was passed on (and every topic
    /// not read to its end yet) is [`Read::TooLarge`]. A client chooses
    /// how far back a resume reads, so this, not the history's size, must
    /// bound the cost of one (`docs/security.md`).
    ///
    /// `reader`, the user of the socket the read is for: a history that
    /// knows every message after a position up to a later one excluded
    /// that user (`excludeUser`) may start after the later one instead
    /// ([`Read::Complete::passed`]), so that a client whose position was
    /// left behind by messages it was never to get is still recovered.
    fn read_many<'a>(
        &'a self,
        from: &'a [(Topic, Position)],
        max: usize,
        max_bytes: usize,
        reader: Option<&'a str>,
    ) -> HistoryFuture<'a, Vec<Read>>;

    /// [`read_many`](Self::read_many) of one topic, without a byte bound.
    fn read<'a>(
        &'a self,
        topic: &'a Topic,
        after: &'a Position,
        max: usize,
    ) -> HistoryFuture<'a, Read> {
        Box::pin(async move {
            let from = [(topic.clone(), after.clone())];
            let mut reads = self.read_many(&from, max, usize::MAX, None).await?;
            match (reads.pop(), reads.is_empty()) {
                (Some(read), true) => Ok(read),
                _ => Err(HistoryError::Unreadable(
                    "history answered the wrong number of reads".into(),
                )),
            }
        })
    }

    /// Stores a legacy socket's positions under its identity, for the next
    /// socket with that identity (drain handoff); kept for `history.ttl_ms`.
    fn handoff_put<'a>(
        &'a self,
        who: &'a Identity,
        positions: &'a Positions,
    ) -> HistoryFuture<'a, ()>;

    /// Takes one stored handoff for `who`, if there is one, and answers
    /// with the [`earliest`] positions among every handoff stored for `who`
    /// at that moment (the taken one included): two tabs of one identity
    /// store two handoffs, closed at different moments, and cannot tell
    /// which is theirs; each replays from the earliest, so neither loses a
    /// message (the one that closed later may see some twice).
    fn handoff_take<'a>(&'a self, who: &'a Identity) -> HistoryFuture<'a, Option<Positions>>;

    /// What `GET /api/history/{topic}` shows: the topic's top and at most
    /// `limit` of the messages it still keeps, oldest first: those after
    /// `since` when it is a position of the current epoch (from the
    /// epoch's start when it names another), else the latest. Unlike
    /// [`read`](Self::read) it gives what is there, holes and all.
    fn recent<'a>(
        &'a self,
        topic: &'a Topic,
        since: Option<&'a Position>,
        limit: usize,
    ) -> HistoryFuture<'a, Recent> {
        let _ = (topic, since, limit);
        Box::pin(std::future::ready(Err(HistoryError::Unavailable(
            "this history cannot list messages".into(),
        ))))
    }
}

/// What [`History::recent`] found.
#[derive(Debug)]
pub struct Recent {
    /// The topic's position now; `None` when it has no history (no
    /// message since its history was last started, or it expired). Found
    /// without writing anything: a read makes no epoch.
    pub top: Option<Position>,
    /// The messages, oldest first, each with its stamp.
    pub messages: Vec<Arc<Envelope>>,
}

/// Why history could not be read or written.
#[derive(Debug, Clone, thiserror::Error)]
pub enum HistoryError {
    /// Redis could not be reached or did not answer in time; the text says
    /// why. A resume is then not recovered (and says so).
    #[error("history unavailable: {0}")]
    Unavailable(String),
    /// Redis answered with something this build cannot read.
    #[error("unreadable history: {0}")]
    Unreadable(String),
}

/// The earliest of some handoffs' positions, per topic: `taken`'s position
/// lowered to the lowest offset any of `others` holds in the same epoch,
/// or to [`Position::unborn`] when one of them is (that socket saw no
/// epoch of the topic, so every epoch it has now came later). A position
/// in another epoch cannot be compared and is left out (a handoff from
/// before the topic's history started afresh; replaying from it could not
/// be recovered anyway).
pub fn earliest(taken: Positions, others: &[Positions]) -> Positions {
    let mut out = taken;
    for (slot, mine) in out.iter_mut().enumerate() {
        let Some(mine) = mine else { continue };
        for other in others.iter().filter_map(|o| o[slot].as_ref()) {
            if other.is_unborn() {
                *mine = Position::unborn();
            } else if other.epoch == mine.epoch && other.offset < mine.offset {
                mine.offset = other.offset;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_earliest_handoff_is_per_topic_in_the_same_epoch() {
        let p = Position::parse;
        let taken: Positions = [p("a:9"), p("g:5"), p("u:3")];
        let others: [Positions; 2] = [[p("a:4"), p("g:7"), p("old:1")], [p("a:6"), p("g:2"), None]];
        assert_eq!(
            earliest(taken.clone(), &others),
            [p("a:4"), p("g:2"), p("u:3")]
        );
        assert_eq!(earliest(taken.clone(), &[]), taken);
        assert_eq!(
            earliest([None, p("g:5"), None], &others),
            [None, p("g:2"), None]
        );
        let unborn = [Some(Position::unborn()), p("g:1"), Some(Position::unborn())];
        assert_eq!(
            earliest(taken.clone(), std::slice::from_ref(&unborn)),
            unborn
        );
        assert_eq!(
            earliest(unborn.clone(), &others),
            unborn,
            "nothing is earlier"
        );
    }

    fn who(user: &str, group: Option<&str>) -> Identity {
        Identity {
            user: user.into(),
            group: group.map(Into::into),
        }
    }

    #[test]
    fn resume_keeps_only_the_sockets_own_topics() {
        let ann = who("ann", Some("chat"));
        let got = parse_resume(
            r#"{"all":"e:1","group:chat":"g:2","user:ann":"u:3","user:bob":"x:9","group:x":"y:1"}"#,
            &ann,
        )
        .unwrap();
        assert_eq!(got[0], Position::parse("e:1"));
        assert_eq!(got[1], Position::parse("g:2"));
        assert_eq!(got[2], Position::parse("u:3"));
        let nobody = who("bob", None);
        let got = parse_resume(r#"{"nullgroup":"n:4","group:chat":"g:2"}"#, &nobody).unwrap();
        assert_eq!(got, [None, Position::parse("n:4"), None]);
        assert!(parse_resume("not json", &ann).is_err());
        assert!(parse_resume(r#"{"all":"garbage"}"#, &ann).is_err());
        assert!(parse_resume(r#"{"all":5}"#, &ann).is_err());
        // Review of issue 14, item 7: a foreign key's value is not read.
        let got = parse_resume(r#"{"all":"e:1","user:bob":5,"x":{},"y":[null]}"#, &ann).unwrap();
        assert_eq!(got, [Position::parse("e:1"), None, None]);
    }
}
