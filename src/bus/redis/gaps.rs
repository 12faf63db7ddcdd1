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
//! - an offset at or below the last: skips it (a catch-up delivered it);
//! - a jump, or another epoch (the topic's history started afresh, a Redis
//!   restart): **catches up** before the copy, then delivers it.
//!
//! **A catch-up reads every tracked topic at once**: one atomic read
//! ([`RedisHistory::catch_up`](super::history::RedisHistory::catch_up), one
//! script, one round trip however many topics) of each topic's entries
//! after its last position, merged in publish order (`seq`) and delivered
//! before anything newer. After a resubscribe it reads up to each topic's
//! top (a quiet topic shows no jump until its next message); at a jump on
//! a copy `m`, only what was published before `m` (its `seq` is the
//! bound). Why every topic and not only the one that jumped: the copies of
//! one connection arrive in publish order, so whatever any topic lost
//! before `m` was lost with it; repaired topic by topic, the losses of one
//! topic were delivered after newer copies of another (a sender's messages
//! to a group and to a user out of order). And why at once: after the
//! read every entry delivered is older than every copy still to come
//! (those published after the read are above each topic's new last
//! position, those before it are at or below and are skipped).
//!
//! What history no longer has (trimmed, expired, more than a catch-up
//! reads), or a history that started afresh, is a gap, reported per topic
//! ([`Deliver::gap`](crate::bus::Deliver::gap)) with the position the
//! loss is at or before, and never delivered in part; the topic goes on
//! from the last position the read was for. A catch-up that fails (Redis
//! down) is a gap of the topic that jumped; the other topics find their
//! own at their next copy.
//!
//! **Quiet topics after Redis lost its data.** A topic nobody published to
//! since has no epoch of the new Redis run, yet the node's sockets that
//! speak resume hold positions in the old one, which no resume can start
//! from any more. So the catch-up makes such a topic an epoch when the
//! node's sink says resume sockets hold it ([`Want::make`]; never for
//! topics only legacy sockets hold, which must create no history keys),
//! and the gap is reported at its start: the sockets are told where the
//! topic goes on from, and their next resume is recovered.
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
//! would deliver the filled messages after later live ones; and repairing
//! each topic on its own (the first design), which broke the order across
//! topics as above and cost one round trip per topic.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::history::{Caught, Head, Want};
use crate::envelope::Envelope;
use crate::history::{Position, Stamp};
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

/// What to do with a copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Step {
    /// Deliver the copy (nothing is missing).
    Deliver,
    /// Drop the copy: it was delivered already, by a catch-up.
    Skip,
    /// Messages are missing before the copy (or its topic started afresh):
    /// catch up every tracked topic up to it first, then ask again.
    CatchUp,
}

/// What a catch-up found, for the subscriber to deliver and report.
#[derive(Debug, Default)]
pub(super) struct CaughtUp {
    /// The missing copies, in publish order (and a message's copies in the
    /// order of its route, as they are published), each with its topic.
    pub(super) deliver: Vec<(Topic, Arc<Envelope>)>,
    /// Topics whose missing messages cannot be delivered: a gap each,
    /// with the position in the topic's current epoch that everything
    /// lost is at or before ([`Deliver::gap`](crate::bus::Deliver::gap));
    /// `None` only when the topic has no epoch now.
    pub(super) gaps: Vec<(Topic, Option<Position>)>,
    /// Topics whose missing messages are delivered.
    pub(super) repaired: usize,
    /// Topics the node's resume-speaking sockets hold but whose track
    /// knew no epoch, found in one now: a notice at its start, which only
    /// sockets whose positions name another epoch take (their floors drop
    /// it otherwise), so not counted as a gap. Those positions were handed
    /// out (a welcome's `tops`) in an epoch the node never saw a copy of,
    /// and Redis may have lost it since, with messages the node missed.
    pub(super) notices: Vec<(Topic, Position)>,
}

/// The positions of the subscribed topics (with history on).
#[derive(Debug, Default)]
pub(super) struct Tracks {
    map: HashMap<Topic, Track>,
    /// Topics that delivered a copy from a node without history since the
    /// last resubscribe: their history is being started afresh
    /// (`renewal.rs`), so a new epoch is no gap to this node's sockets,
    /// which got that copy.
    renewing: HashSet<Topic>,
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
        self.renewing.remove(topic);
    }

    /// A copy without a stamp was delivered through `topic`: its next
    /// epoch is expected (see [`Tracks::renewing`]).
    pub(super) fn expect_renewal(&mut self, topic: &Topic) {
        self.renewing.insert(topic.clone());
    }

    /// Copies may have been lost (a resubscribe, pushes dropped): a new
    /// epoch is a gap again.
    pub(super) fn forget_renewals(&mut self) {
        self.renewing.clear();
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
    /// The topic's last position becomes `p` when it is delivered.
    pub(super) fn on_copy(&mut self, topic: &Topic, p: &Position) -> Step {
        let Some(track) = self.map.get_mut(topic) else {
            self.map.insert(topic.clone(), Track::at(p));
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
            if p.offset != track.offset + 1 {
                return Step::CatchUp;
            }
            // The track keeps its epoch's allocation (see `share_epoch`).
            track.offset = p.offset;
            track.delivered = true;
            return Step::Deliver;
        } else if track.epoch.is_some() || p.offset > 1 {
            // History started afresh (a gap), or the topic's first epoch
            // began before this copy: its messages before it can be read.
            return Step::CatchUp;
        }
        *track = Track::at(p);
        Step::Deliver
    }

    /// Makes `stamp`'s position in `topic` name the very epoch `topic`'s
    /// track holds, when it is the same text. Every copy's stamp is decoded
    /// with an epoch of its own; shared, one topic's copies name one
    /// allocation, which every recipient's floors adopt, so that
    /// [`Floors::admit`](crate::resume::Floors::admit) compares epochs by
    /// address, per delivery, instead of reading two strings from memory
    /// that is seldom in the cache any more (issue 19: it showed at 1 % of
    /// a node's CPU in groups with history on).
    pub(super) fn share_epoch(&self, topic: &Topic, stamp: &mut Stamp) {
        let Some(Track {
            epoch: Some(epoch), ..
        }) = self.map.get(topic)
        else {
            return;
        };
        for (t, p) in &mut stamp.positions {
            if t == topic && p.epoch == *epoch {
                p.epoch = epoch.clone();
            }
        }
    }

    /// The catch-up could not bring the copy at `p` through `topic` in
    /// line: the position in `p`'s epoch that everything lost is at or
    /// before, the one before `p` (when the topic started afresh in
    /// between, the old epoch's loss is before it too); `None` when
    /// nothing of `p`'s epoch can be missing (the track had no epoch and
    /// `p` is its first message) or the topic is not tracked.
    pub(super) fn lost_before(&self, topic: &Topic, p: &Position) -> Option<Position> {
        let track = self.map.get(topic)?;
        let other_epoch = track.epoch.as_deref().is_some_and(|e| *e != *p.epoch);
        (other_epoch || p.offset > 1).then(|| Position {
            epoch: p.epoch.clone(),
            offset: p.offset.saturating_sub(1),
        })
    }

    /// The catch-up could not bring the copy at `p` through `topic` in
    /// line: the topic goes on from it (the caller reports the gap).
    pub(super) fn skip_to(&mut self, topic: &Topic, p: &Position) {
        self.map.insert(topic.clone(), Track::at(p));
    }

    /// What a catch-up reads: each of `topics` after its last position;
    /// a topic not tracked yet is only given its start (its head). A
    /// tracked topic that `held` (sockets that speak resume hold positions
    /// in it) is given an epoch when it has none of this Redis run (see
    /// [`Want::make`]).
    pub(super) fn wants<'a>(
        &self,
        topics: impl IntoIterator<Item = &'a Topic>,
        held: impl Fn(&Topic) -> bool,
    ) -> Vec<Want> {
        topics
            .into_iter()
            .map(|topic| match self.map.get(topic) {
                Some(track) => Want {
                    topic: topic.clone(),
                    epoch: track.epoch.clone(),
                    after: track.offset,
                    read: true,
                    make: held(topic),
                },
                None => Want {
                    topic: topic.clone(),
                    epoch: None,
                    after: 0,
                    read: false,
                    make: false,
                },
            })
            .collect()
    }

    /// Every tracked topic, for the catch-up at a jump.
    pub(super) fn tracked(&self) -> Vec<Topic> {
        self.map.keys().cloned().collect()
    }

    /// Takes in what a catch-up found (`caught[i]` for `wants[i]`): every
    /// topic moves to the last position the read was for; what to deliver
    /// comes back merged in publish order, with the topics that have a
    /// gap.
    pub(super) fn caught_up(&mut self, wants: &[Want], caught: Vec<Caught>) -> CaughtUp {
        let mut out = CaughtUp::default();
        let mut lists = Vec::new();
        for (want, caught) in wants.iter().zip(caught) {
            let topic = &want.topic;
            if !want.read {
                self.start(topic, caught.head);
                continue;
            }
            let Some(track) = self.map.get_mut(topic) else {
                // Released meanwhile: nothing to deliver it to.
                continue;
            };
            let top = match caught.head {
                Head::Fresh => {
                    // Its history is gone (Redis restarted, nothing
                    // published since) and no socket here speaks resume
                    // in it (none asked for an epoch): what followed is
                    // unknown.
                    if track.epoch.is_some() {
                        out.gaps.push((topic.clone(), None));
                    }
                    *track = Track {
                        epoch: None,
                        offset: 0,
                        delivered: true,
                    };
                    continue;
                }
                Head::At(top) => top,
            };
            let same_epoch = track.epoch.as_deref() == Some(&*top.epoch);
            // Started afresh because of a copy this node delivered (from a
            // node without history): nothing lost.
            let renewed = self.renewing.contains(topic);
            // The topic's history started afresh: what the old epoch lost
            // is unknown. Made by this catch-up (the node's resume
            // sockets hold positions in it, yet Redis had no epoch of this
            // run), the same even when the track had none: those
            // positions name an epoch that is gone.
            let restarted = !same_epoch && (track.epoch.is_some() || caught.made) && !renewed;
            // Held by resume sockets, no epoch known, one found (not made
            // here): it may be the one their welcome made, or a later one
            // (review of 2026-12-03: Redis restarted while the node was
            // cut off, and a publish elsewhere made the new epoch; its
            // first message was caught up and the one lost before the
            // restart never told).
            let unknown = !same_epoch && want.make && track.epoch.is_none() && !renewed;
            let whole = caught.reach == caught.from || caught.messages.is_some();
            if restarted || unknown {
                // Told where the new epoch goes on from: its start when
                // what it holds up to `reach` follows, else `reach`.
                let offset = if whole { caught.from } else { caught.reach };
                let at = Position {
                    epoch: top.epoch.clone(),
                    offset,
                };
                if restarted {
                    out.gaps.push((topic.clone(), Some(at)));
                } else if whole {
                    // (Not whole: the loss is reported below, at `reach`.)
                    out.notices.push((topic.clone(), at));
                }
            }
            if caught.reach > caught.from {
                match caught.messages {
                    Some(messages) => {
                        out.repaired += 1;
                        lists.push(messages.into_iter().map(|m| (topic.clone(), m)).collect());
                    }
                    // Lost: `from + 1` to `reach` of the top's epoch.
                    None if !restarted => out.gaps.push((
                        topic.clone(),
                        Some(Position {
                            epoch: top.epoch.clone(),
                            offset: caught.reach,
                        }),
                    )),
                    None => {}
                }
            }
            if same_epoch {
                if caught.reach > track.offset {
                    track.offset = caught.reach;
                    track.delivered = true;
                }
            } else {
                *track = Track {
                    epoch: Some(top.epoch),
                    offset: caught.reach,
                    delivered: true,
                };
            }
        }
        // Publish order; one message's copies in its route's order.
        // Each topic in its own order (on a Cluster `seq` is only a hint).
        out.deliver = crate::history::merge_ordered(lists, |(topic, m)| {
            m.stamp.as_ref().map_or((0, 0), |s| {
                let index = s.positions.iter().position(|(t, _)| t == topic);
                (s.seq, index.unwrap_or(usize::MAX))
            })
        });
        out
    }
}

impl Track {
    /// Delivered up to `p`.
    fn at(p: &Position) -> Self {
        Self {
            epoch: Some(p.epoch.clone()),
            offset: p.offset,
            delivered: true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::Stamp;
    use crate::message::Frame;
    use crate::route::Route;

    fn at(text: &str) -> Position {
        Position::parse(text).unwrap()
    }

    /// A message `name` with `seq`, at `positions` (its route, in order).
    fn message(name: &str, seq: u64, positions: &[(&Topic, &str)]) -> Arc<Envelope> {
        let positions: Vec<(Topic, Position)> = positions
            .iter()
            .map(|(t, p)| ((*t).clone(), at(p)))
            .collect();
        let route = Route::from_parts(positions.iter().map(|(t, _)| t.clone()).collect(), vec![]);
        Arc::new(Envelope::stamped(
            route,
            Frame::from(name.to_owned()),
            Some(Stamp { seq, positions }),
        ))
    }

    fn caught(head: &str, from: u64, reach: u64, messages: Option<Vec<Arc<Envelope>>>) -> Caught {
        Caught {
            head: Head::At(at(head)),
            from,
            reach,
            messages,
            made: false,
        }
    }

    /// What a catch-up finds of a topic without an epoch of this run.
    fn fresh() -> Caught {
        Caught {
            head: Head::Fresh,
            from: 0,
            reach: 0,
            messages: Some(Vec::new()),
            made: false,
        }
    }

    fn names(caught: &CaughtUp) -> Vec<(Topic, String)> {
        caught
            .deliver
            .iter()
            .map(|(t, m)| (t.clone(), m.frame.to_string()))
            .collect()
    }

    #[test]
    fn copies_of_one_epoch_share_the_tracks_allocation() {
        let mut tracks = Tracks::default();
        let (t, other) = (Topic::Group(Some("g".into())), Topic::User("u".into()));
        assert_eq!(tracks.on_copy(&t, &at("e:1")), Step::Deliver);
        let first = tracks.map[&t].epoch.clone().unwrap();
        let second = at("e:2");
        assert_eq!(tracks.on_copy(&t, &second), Step::Deliver);
        assert!(
            Arc::ptr_eq(tracks.map[&t].epoch.as_ref().unwrap(), &first),
            "the track keeps its epoch"
        );
        let mut stamp = Stamp {
            seq: 2,
            positions: vec![(t.clone(), second), (other.clone(), at("e:9"))],
        };
        tracks.share_epoch(&t, &mut stamp);
        assert!(Arc::ptr_eq(&stamp.positions[0].1.epoch, &first));
        assert_eq!(stamp.positions[0].1, at("e:2"), "the same position");
        assert!(
            !Arc::ptr_eq(&stamp.positions[1].1.epoch, &first),
            "another topic's position is left alone"
        );
        // Another epoch is not shared, and the track moves to it.
        let mut fresh = Stamp {
            seq: 3,
            positions: vec![(t.clone(), at("f:1"))],
        };
        tracks.share_epoch(&t, &mut fresh);
        assert!(!Arc::ptr_eq(&fresh.positions[0].1.epoch, &first));
        assert_eq!(tracks.on_copy(&t, &at("f:1")), Step::CatchUp);
    }

    #[test]
    fn the_next_offset_is_delivered_a_jump_caught_up_an_old_one_skipped() {
        let mut tracks = Tracks::default();
        let t = Topic::All;
        assert_eq!(tracks.on_copy(&t, &at("e:5")), Step::Deliver, "first seen");
        assert_eq!(tracks.on_copy(&t, &at("e:6")), Step::Deliver);
        assert_eq!(tracks.on_copy(&t, &at("e:9")), Step::CatchUp);
        let wants = tracks.wants(&tracks.tracked(), |_| false);
        assert_eq!(
            wants,
            [Want {
                topic: t.clone(),
                epoch: Some("e".into()),
                after: 6,
                read: true,
                make: false
            }]
        );
        let m7 = message("m7", 17, &[(&t, "e:7")]);
        let m8 = message("m8", 18, &[(&t, "e:8")]);
        let up = tracks.caught_up(&wants, vec![caught("e:12", 6, 8, Some(vec![m7, m8]))]);
        assert_eq!(
            names(&up),
            [(t.clone(), "m7".into()), (t.clone(), "m8".into())]
        );
        assert_eq!((up.repaired, up.gaps.len()), (1, 0));
        assert_eq!(tracks.on_copy(&t, &at("e:9")), Step::Deliver, "now in line");
        assert_eq!(
            tracks.on_copy(&t, &at("e:8")),
            Step::Skip,
            "caught up already"
        );
        assert_eq!(tracks.on_copy(&t, &at("e:9")), Step::Skip);
        assert_eq!(tracks.on_copy(&t, &at("e:10")), Step::Deliver);
    }

    /// Every topic's missing copies come back as one sequence in publish
    /// order; a message routed to two topics has its copies in its route's
    /// order, as they are published.
    #[test]
    fn a_catch_up_merges_every_topic_in_publish_order() {
        let mut tracks = Tracks::default();
        let (a, u) = (Topic::Group(Some("a".into())), Topic::User("u".into()));
        tracks.on_copy(&a, &at("ga:1"));
        tracks.on_copy(&u, &at("gu:1"));
        let wants = tracks.wants([&a, &u], |_| false);
        let on_a = vec![
            message("m2", 2, &[(&a, "ga:2")]),
            message("m4", 4, &[(&u, "gu:3"), (&a, "ga:3")]),
            message("m5", 5, &[(&a, "ga:4")]),
        ];
        let on_u = vec![
            message("m3", 3, &[(&u, "gu:2")]),
            message("m4", 4, &[(&u, "gu:3"), (&a, "ga:3")]),
        ];
        let up = tracks.caught_up(
            &wants,
            vec![
                caught("ga:4", 1, 4, Some(on_a)),
                caught("gu:3", 1, 3, Some(on_u)),
            ],
        );
        assert_eq!(
            names(&up),
            [
                (a.clone(), "m2".into()),
                (u.clone(), "m3".into()),
                (u.clone(), "m4".into()),
                (a.clone(), "m4".into()),
                (a.clone(), "m5".into()),
            ]
        );
        assert_eq!(up.repaired, 2);
        assert_eq!(tracks.on_copy(&a, &at("ga:4")), Step::Skip);
        assert_eq!(tracks.on_copy(&u, &at("gu:4")), Step::Deliver);
    }

    /// What history cannot give is a gap, and nothing of it is delivered;
    /// the topic goes on from the last position the read was for.
    #[test]
    fn what_history_cannot_give_is_a_gap_and_the_topic_goes_on() {
        let mut tracks = Tracks::default();
        let (a, b) = (
            Topic::Group(Some("a".into())),
            Topic::Group(Some("b".into())),
        );
        tracks.on_copy(&a, &at("e:1"));
        tracks.on_copy(&b, &at("f:1"));
        let wants = tracks.wants([&a, &b], |_| false);
        let up = tracks.caught_up(
            &wants,
            vec![
                caught("e:9", 1, 7, None),
                caught(
                    "f:3",
                    1,
                    3,
                    Some(vec![
                        message("b2", 5, &[(&b, "f:2")]),
                        message("b3", 6, &[(&b, "f:3")]),
                    ]),
                ),
            ],
        );
        // Lost: e:2 to e:7, the read's reach; a socket whose replay got
        // that far is not told (`Deliver::gap`).
        assert_eq!(up.gaps, [(a.clone(), Some(at("e:7")))]);
        assert_eq!(
            names(&up),
            [(b.clone(), "b2".into()), (b.clone(), "b3".into())]
        );
        assert_eq!(tracks.on_copy(&a, &at("e:8")), Step::Deliver);
        // A catch-up that fails leaves the copy to be delivered after a gap.
        assert_eq!(tracks.on_copy(&b, &at("f:6")), Step::CatchUp);
        assert_eq!(tracks.lost_before(&b, &at("f:6")), Some(at("f:5")));
        tracks.skip_to(&b, &at("f:6"));
        assert_eq!(tracks.on_copy(&b, &at("f:7")), Step::Deliver);
    }

    /// A topic started afresh after a copy from a node without history
    /// (review of issue 14, item 4): this node delivered that copy, so the
    /// new epoch is no gap; after a resubscribe it is again.
    #[test]
    fn an_expected_renewal_is_no_gap() {
        let mut tracks = Tracks::default();
        let t = Topic::Group(Some("mg".into()));
        tracks.on_copy(&t, &at("old:7"));
        tracks.expect_renewal(&t);
        assert_eq!(tracks.on_copy(&t, &at("new:1")), Step::CatchUp);
        let wants = tracks.wants(&tracks.tracked(), |_| false);
        let up = tracks.caught_up(&wants, vec![caught("new:1", 0, 0, Some(vec![]))]);
        assert!(up.gaps.is_empty(), "{up:?}");
        assert_eq!(tracks.on_copy(&t, &at("new:1")), Step::Deliver);
        tracks.forget_renewals();
        assert_eq!(tracks.on_copy(&t, &at("newer:1")), Step::CatchUp);
        let wants = tracks.wants(&tracks.tracked(), |_| false);
        let up = tracks.caught_up(&wants, vec![caught("newer:1", 0, 0, Some(vec![]))]);
        assert_eq!(up.gaps, [(t, Some(at("newer:0")))]);
    }

    #[test]
    fn another_epoch_is_a_gap_and_the_new_one_is_caught_up_from_its_start() {
        let mut tracks = Tracks::default();
        let t = Topic::Group(None);
        tracks.on_copy(&t, &at("old:7"));
        assert_eq!(tracks.on_copy(&t, &at("new:3")), Step::CatchUp);
        let wants = tracks.wants(&tracks.tracked(), |_| false);
        let fill = vec![
            message("n1", 1, &[(&t, "new:1")]),
            message("n2", 2, &[(&t, "new:2")]),
        ];
        let up = tracks.caught_up(&wants, vec![caught("new:5", 0, 2, Some(fill))]);
        assert_eq!(
            up.gaps,
            [(t.clone(), Some(at("new:0")))],
            "the old epoch's end is lost, how much of it unknown; the new one follows from its start"
        );
        assert_eq!(up.deliver.len(), 2);
        assert_eq!(tracks.on_copy(&t, &at("new:3")), Step::Deliver);
        assert_eq!(tracks.on_copy(&t, &at("new:4")), Step::Deliver);
        // History gone and nothing published since: a gap, no epoch.
        let wants = tracks.wants(&tracks.tracked(), |_| false);
        let up = tracks.caught_up(&wants, vec![fresh()]);
        assert_eq!(up.gaps, [(t.clone(), None)]);
        assert_eq!(tracks.on_copy(&t, &at("newer:1")), Step::Deliver);
        assert_eq!(tracks.on_copy(&t, &at("newer:2")), Step::Deliver);
    }

    /// What a copy that could not be brought in line lost before it: a
    /// run of its own epoch when the track is in it (or had none yet),
    /// unknown across a new epoch.
    #[test]
    fn the_loss_before_a_copy_is_known_within_its_epoch() {
        let mut tracks = Tracks::default();
        let t = Topic::Group(Some("l".into()));
        assert_eq!(tracks.lost_before(&t, &at("e:5")), None, "not tracked");
        tracks.on_copy(&t, &at("e:2"));
        assert_eq!(tracks.lost_before(&t, &at("e:9")), Some(at("e:8")));
        assert_eq!(
            tracks.lost_before(&t, &at("other:9")),
            Some(at("other:8")),
            "the old epoch's loss is before it too"
        );
        assert_eq!(tracks.lost_before(&t, &at("other:1")), Some(at("other:0")));
        let f = Topic::Group(Some("f".into()));
        tracks.start(&f, Head::Fresh);
        assert_eq!(tracks.lost_before(&f, &at("n:4")), Some(at("n:3")));
        assert_eq!(tracks.lost_before(&f, &at("n:1")), None);
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
        // A fresh topic: its first epoch is no gap, caught up from offset 0.
        let f = Topic::User("f".into());
        tracks.start(&f, Head::Fresh);
        assert_eq!(tracks.on_copy(&f, &at("e:1")), Step::Deliver);
        let g = Topic::User("g".into());
        tracks.start(&g, Head::Fresh);
        assert_eq!(tracks.on_copy(&g, &at("e:3")), Step::CatchUp);
        // A catch-up that finds nothing new keeps a start soft.
        let s = Topic::User("s".into());
        tracks.start(&s, Head::At(at("e:10")));
        let wants = tracks.wants([&s], |_| false);
        let up = tracks.caught_up(&wants, vec![caught("e:10", 10, 10, Some(Vec::new()))]);
        assert!(up.deliver.is_empty() && up.gaps.is_empty());
        assert_eq!(tracks.on_copy(&s, &at("e:9")), Step::Deliver);
    }

    /// A new epoch whose messages cannot all be read: the gap is told at
    /// the last of them, where the topic goes on from.
    #[test]
    fn a_new_epoch_too_long_to_read_is_a_gap_up_to_its_reach() {
        let mut tracks = Tracks::default();
        let t = Topic::User("u".into());
        tracks.on_copy(&t, &at("old:3"));
        let wants = tracks.wants(&tracks.tracked(), |_| false);
        let up = tracks.caught_up(&wants, vec![caught("new:40", 0, 40, None)]);
        assert_eq!(up.gaps, [(t.clone(), Some(at("new:40")))]);
        assert!(up.deliver.is_empty());
        assert_eq!(tracks.on_copy(&t, &at("new:41")), Step::Deliver);
    }

    /// Review of 2026-12-02: a quiet topic held by sockets that speak
    /// resume, after Redis lost its data. The catch-up is asked to make it
    /// an epoch (and only for such topics); made, it is a gap at the new
    /// epoch's start, even when the node had never seen an epoch of the
    /// topic (its sockets' welcome made the one now gone).
    #[test]
    fn an_epoch_made_for_resume_sockets_is_a_gap_at_its_start() {
        let mut tracks = Tracks::default();
        let (held, other) = (Topic::User("ann".into()), Topic::User("bob".into()));
        tracks.start(&held, Head::Fresh);
        tracks.start(&other, Head::Fresh);
        let wants = tracks.wants([&held, &other], |t| *t == held);
        assert_eq!(
            wants.iter().map(|w| w.make).collect::<Vec<_>>(),
            [true, false],
            "an epoch only where resume sockets hold positions"
        );
        let made = Caught {
            made: true,
            ..caught("e2:0", 0, 0, Some(Vec::new()))
        };
        let up = tracks.caught_up(&wants, vec![made, fresh()]);
        assert_eq!(up.gaps, [(held.clone(), Some(at("e2:0")))]);
        assert_eq!(tracks.on_copy(&held, &at("e2:1")), Step::Deliver);
        // Found made by someone else: a welcome's tops (the sockets'
        // floors are in it, and drop the notice), or a publish after a
        // restart (their floors are in the old epoch: told). A notice, not
        // a gap; and not when no resume socket holds it.
        let third = Topic::User("cy".into());
        tracks.start(&third, Head::Fresh);
        let wants = tracks.wants([&third], |_| true);
        let up = tracks.caught_up(&wants, vec![caught("e3:0", 0, 0, Some(Vec::new()))]);
        assert!(up.gaps.is_empty(), "{up:?}");
        assert_eq!(up.notices, [(third.clone(), at("e3:0"))]);
        let fourth = Topic::User("dee".into());
        tracks.start(&fourth, Head::Fresh);
        let wants = tracks.wants([&fourth], |_| false);
        let up = tracks.caught_up(&wants, vec![caught("e4:0", 0, 0, Some(Vec::new()))]);
        assert!(up.gaps.is_empty() && up.notices.is_empty(), "{up:?}");
        // Once known, the epoch is the track's: no notice at the next one.
        let wants = tracks.wants([&third], |_| true);
        let up = tracks.caught_up(&wants, vec![caught("e3:0", 0, 0, Some(Vec::new()))]);
        assert!(up.gaps.is_empty() && up.notices.is_empty(), "{up:?}");
    }

    /// After a resubscribe a quiet topic is caught up at once; a topic not
    /// tracked yet gets its start from the same read.
    #[test]
    fn a_topic_not_tracked_yet_gets_its_start() {
        let mut tracks = Tracks::default();
        let u = Topic::User("u".into());
        let wants = tracks.wants([&u], |_| false);
        assert!(!wants[0].read, "its head only");
        let up = tracks.caught_up(&wants, vec![caught("e:3", 0, 3, None)]);
        assert!(up.gaps.is_empty() && up.deliver.is_empty());
        assert!(tracks.contains(&u));
        assert_eq!(
            tracks.on_copy(&u, &at("e:3")),
            Step::Deliver,
            "a soft start"
        );
        tracks.forget(&u);
        assert!(!tracks.contains(&u));
    }
}
