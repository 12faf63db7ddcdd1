//! Gap detection (history on): what the subscriber knows of each subscribed
//! topic's positions, and what it must do with the next copy.
//!
//! Redis pub/sub loses whatever is published while a subscriber connection
//! is down, killed (`CLIENT KILL TYPE pubsub`, the output-buffer limit) or
//! too slow to read (`Incoming::Lagged`). With history on every copy
//! carries its position in its topic, and the offsets of one topic grow by
//! exactly one per message, so a loss shows as a jump. The subscriber
//! tracks, per subscribed topic, the last position it delivered and:
//!
//! - the next offset: delivers it;
//! - an offset at or below the last: skips it (a repair delivered it);
//! - a jump: reads the missing entries from history, delivers them in
//!   order, then the copy; what history no longer has is a gap it reports
//!   ([`Deliver::gap`](crate::bus::Deliver::gap));
//! - another epoch: the topic's history started afresh (a Redis restart):
//!   what followed the last position in the old epoch is unknown, reported
//!   as a gap, and the new epoch is filled from its start.
//!
//! A quiet topic shows no jump until its next message, so after every
//! resubscribe the subscriber also reads each tracked topic's top and fills
//! up to it at once ([`Tracks::on_top`]).
//!
//! **Where a topic starts.** Right after subscribing, the subscriber reads
//! the topic's head ([`Head`]) as a *soft* starting point: copies at or
//! below it may still arrive (published between the `SUBSCRIBE` taking
//! effect and the read) and are delivered, since nothing delivered them
//! yet; anything above it is tracked as above. Without that read a topic
//! whose first message was lost in an outage would lose it silently. When
//! the read fails, the first copy that arrives is the start.
//!
//! This file only decides; the subscriber task reads and delivers, in
//! order, before it takes the next push (so later copies wait in the
//! bounded push buffer meanwhile). Rejected: repairing off the task, which
//! would deliver the filled messages after later live ones.

use std::collections::HashMap;
use std::sync::Arc;

use super::history::Head;
use crate::history::Position;
use crate::route::Topic;

/// What the subscriber knows of one topic.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Track {
    /// `None`: the topic had no epoch of this Redis run when it was read.
    epoch: Option<Arc<str>>,
    /// The last offset delivered, or the head read at subscribe.
    offset: u64,
    /// Whether anything was delivered since the head was read (until then
    /// copies at or below `offset` are delivered, not skipped).
    delivered: bool,
}

/// What to do with a copy, or after reading a top.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Step {
    /// Deliver the copy (nothing is missing).
    Deliver,
    /// Drop the copy: it was delivered already, by a repair.
    Skip,
    /// Messages are missing before the copy (or, after a top was read,
    /// before the top).
    Repair {
        /// The topic's history started afresh: whatever followed the last
        /// position in the old epoch is lost to this node (report a gap).
        restarted: bool,
        /// Read and deliver the entries after this position up to `until`
        /// (inclusive) first, if any are missing.
        fill: Option<(Position, u64)>,
    },
}

/// The positions of the subscribed topics (with history on).
#[derive(Debug, Default)]
pub(super) struct Tracks {
    map: HashMap<Topic, Track>,
}

impl Tracks {
    /// Whether the topic has a starting point.
    #[cfg(test)]
    fn contains(&self, topic: &Topic) -> bool {
        self.map.contains_key(topic)
    }

    /// Forgets a released topic.
    pub(super) fn forget(&mut self, topic: &Topic) {
        self.map.remove(topic);
    }

    /// Forgets every topic not in `keep`.
    pub(super) fn retain(&mut self, keep: impl Fn(&Topic) -> bool) {
        self.map.retain(|t, _| keep(t));
    }

    /// Sets the soft starting point of a topic just subscribed (ignored if
    /// it has one already).
    pub(super) fn start(&mut self, topic: &Topic, head: Head) {
        self.map.entry(topic.clone()).or_insert_with(|| {
            let (epoch, offset) = match head {
                Head::At(p) => (Some(p.epoch), p.offset),
                Head::Fresh => (None, 0),
            };
            Track {
                epoch,
                offset,
                delivered: false,
            }
        });
    }

    /// A copy arrived through `topic` at position `p`: what to do with it.
    /// The topic's last position becomes `p` unless the copy is skipped.
    pub(super) fn on_copy(&mut self, topic: &Topic, p: &Position) -> Step {
        let Some(track) = self.map.get_mut(topic) else {
            self.map.insert(
                topic.clone(),
                Track {
                    epoch: Some(p.epoch.clone()),
                    offset: p.offset,
                    delivered: true,
                },
            );
            return Step::Deliver;
        };
        if track.epoch.as_deref() == Some(&*p.epoch) {
            if p.offset <= track.offset {
                // Before anything was delivered: a copy published around
                // the subscribe, which nothing delivered yet.
                return if track.delivered {
                    Step::Skip
                } else {
                    Step::Deliver
                };
            }
            let after = Position {
                epoch: p.epoch.clone(),
                offset: track.offset,
            };
            track.offset = p.offset;
            track.delivered = true;
            return if p.offset == after.offset + 1 {
                Step::Deliver
            } else {
                Step::Repair {
                    restarted: false,
                    fill: Some((after, p.offset - 1)),
                }
            };
        }
        // Another epoch: history started afresh. Its messages before this
        // one were published after the restart and can be filled.
        let restarted = track.epoch.is_some();
        *track = Track {
            epoch: Some(p.epoch.clone()),
            offset: p.offset,
            delivered: true,
        };
        let fill = (p.offset > 1).then(|| {
            let start = Position {
                epoch: p.epoch.clone(),
                offset: 0,
            };
            (start, p.offset - 1)
        });
        if !restarted && fill.is_none() {
            return Step::Deliver;
        }
        Step::Repair { restarted, fill }
    }

    /// The top of `topic`, read after a resubscribe: what is missing up to
    /// it (`None`: nothing, or the topic is not tracked: then `head`
    /// becomes its start).
    pub(super) fn on_top(&mut self, topic: &Topic, head: Head) -> Option<Step> {
        let Some(track) = self.map.get_mut(topic) else {
            self.start(topic, head);
            return None;
        };
        match head {
            Head::Fresh => {
                // Its history is gone (Redis restarted, nothing published
                // since): what followed the last position is unknown.
                let restarted = track.epoch.is_some();
                *track = Track {
                    epoch: None,
                    offset: 0,
                    delivered: true,
                };
                restarted.then_some(Step::Repair {
                    restarted,
                    fill: None,
                })
            }
            Head::At(top) if track.epoch.as_deref() == Some(&*top.epoch) => {
                if top.offset <= track.offset {
                    return None;
                }
                let after = Position {
                    epoch: top.epoch.clone(),
                    offset: track.offset,
                };
                track.offset = top.offset;
                track.delivered = true;
                Some(Step::Repair {
                    restarted: false,
                    fill: Some((after, top.offset)),
                })
            }
            Head::At(top) => {
                let restarted = track.epoch.is_some();
                *track = Track {
                    epoch: Some(top.epoch.clone()),
                    offset: top.offset,
                    delivered: true,
                };
                let fill = (top.offset > 0).then(|| {
                    let start = Position {
                        epoch: top.epoch.clone(),
                        offset: 0,
                    };
                    (start, top.offset)
                });
                (restarted || fill.is_some()).then_some(Step::Repair { restarted, fill })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> Position {
        Position::parse(text).unwrap()
    }

    fn fill(after: &str, until: u64) -> Step {
        Step::Repair {
            restarted: false,
            fill: Some((at(after), until)),
        }
    }

    #[test]
    fn the_next_offset_is_delivered_a_jump_filled_an_old_one_skipped() {
        let mut tracks = Tracks::default();
        let t = Topic::All;
        assert_eq!(tracks.on_copy(&t, &at("e:5")), Step::Deliver, "first seen");
        assert_eq!(tracks.on_copy(&t, &at("e:6")), Step::Deliver);
        assert_eq!(tracks.on_copy(&t, &at("e:9")), fill("e:6", 8));
        assert_eq!(tracks.on_copy(&t, &at("e:8")), Step::Skip, "filled already");
        assert_eq!(tracks.on_copy(&t, &at("e:9")), Step::Skip);
        assert_eq!(tracks.on_copy(&t, &at("e:10")), Step::Deliver);
    }

    #[test]
    fn another_epoch_is_a_gap_and_the_new_one_is_filled_from_its_start() {
        let mut tracks = Tracks::default();
        let t = Topic::Group(None);
        tracks.on_copy(&t, &at("old:7"));
        assert_eq!(
            tracks.on_copy(&t, &at("new:3")),
            Step::Repair {
                restarted: true,
                fill: Some((at("new:0"), 2))
            }
        );
        assert_eq!(tracks.on_copy(&t, &at("new:4")), Step::Deliver);
        tracks.on_copy(&t, &at("newer:1"));
        assert_eq!(tracks.on_copy(&t, &at("newer:2")), Step::Deliver);
    }

    #[test]
    fn a_soft_start_delivers_what_arrives_at_or_below_it() {
        let mut tracks = Tracks::default();
        let t = Topic::User("u".into());
        tracks.start(&t, Head::At(at("e:10")));
        assert_eq!(tracks.on_copy(&t, &at("e:9")), Step::Deliver);
        assert_eq!(tracks.on_copy(&t, &at("e:10")), Step::Deliver);
        assert_eq!(tracks.on_copy(&t, &at("e:11")), Step::Deliver);
        assert_eq!(tracks.on_copy(&t, &at("e:11")), Step::Skip);
        // A start never overrides what is known.
        tracks.start(&t, Head::At(at("e:2")));
        assert_eq!(tracks.on_copy(&t, &at("e:12")), Step::Deliver);
        // A fresh topic: its first epoch is no gap, filled from offset 0.
        let f = Topic::User("f".into());
        tracks.start(&f, Head::Fresh);
        assert_eq!(tracks.on_copy(&f, &at("e:1")), Step::Deliver);
        let g = Topic::User("g".into());
        tracks.start(&g, Head::Fresh);
        assert_eq!(
            tracks.on_copy(&g, &at("e:3")),
            Step::Repair {
                restarted: false,
                fill: Some((at("e:0"), 2))
            }
        );
    }

    #[test]
    fn a_top_after_a_resubscribe_fills_a_quiet_topic() {
        let mut tracks = Tracks::default();
        let t = Topic::All;
        tracks.on_copy(&t, &at("e:4"));
        assert_eq!(tracks.on_top(&t, Head::At(at("e:4"))), None);
        assert_eq!(tracks.on_top(&t, Head::At(at("e:7"))), Some(fill("e:4", 7)));
        assert_eq!(tracks.on_copy(&t, &at("e:7")), Step::Skip);
        assert_eq!(tracks.on_copy(&t, &at("e:8")), Step::Deliver);
        // History gone, then a new epoch.
        assert_eq!(
            tracks.on_top(&t, Head::Fresh),
            Some(Step::Repair {
                restarted: true,
                fill: None
            })
        );
        assert_eq!(tracks.on_copy(&t, &at("n:1")), Step::Deliver);
        assert_eq!(
            tracks.on_top(&t, Head::At(at("m:2"))),
            Some(Step::Repair {
                restarted: true,
                fill: Some((at("m:0"), 2))
            })
        );
        // An untracked topic gets its start.
        let u = Topic::User("u".into());
        assert_eq!(tracks.on_top(&u, Head::At(at("e:3"))), None);
        assert!(tracks.contains(&u));
        tracks.forget(&u);
        assert!(!tracks.contains(&u));
    }
}
