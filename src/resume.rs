//! Lossless resume, the socket's side (contract: `reference/resume.md`):
//! what a socket asks for with its `resume` query parameter, the decision
//! made when it connects (replay what it missed, or say it cannot), the
//! frames only resume-speaking sockets see (`wshub.welcome`, `wshub.gap`),
//! and the per-topic *floors* a session keeps to drop duplicates and to
//! hand its place over on shutdown.
//!
//! # The decision
//!
//! In `decision.rs` ([`Resumer`], [`decide`]): why a socket is recovered
//! or not, and why a socket's topics are read in one snapshot.
//!
//! # De-duplication: floors and marks
//!
//! The socket is subscribed (and in the hub) before history is read, so
//! the live copies of messages published meanwhile are both in the replay
//! and in the outbox, which holds them while the session writes the
//! welcome and the replay directly. Each queued copy of a stamped message
//! carries a [`Mark`]: the topic it came through and its position there.
//! The session keeps [`Floors`], the last position written per topic, and
//! drops a copy whose mark is at or below its topic's floor in the same
//! epoch. Floors start at the positions the replay reached (or the tops);
//! a socket that did not opt in and took over no handoff never drops
//! anything (today's behaviour), but its floors are still kept, from the
//! tops, for the drain handoff. Those tops are read without making an
//! epoch ([`History::peek`](crate::history::History::peek)): sockets that
//! do not speak resume create no history keys. A topic without one is
//! [`Position::unborn`](crate::history::Position::unborn) — every epoch it
//! gets later came after the socket connected, so a handoff replays it
//! from its start — and a socket whose user id the hub made up
//! ([`Request::Anonymous`]) reads and stores nothing.
//!
//! Every History call is bounded (`redis.command_timeout_ms`); a failure or
//! a timeout is "not recovered", never a refused socket, a panic or a hang.

use serde::Serialize;
use serde::ser::SerializeMap;

use crate::history::{Positions, client_key, parse_resume, topics_of};
use crate::message::{Frame, Message};
use crate::outcome::ResumeResult;
pub use crate::position::Mark;
use crate::route::{Identity, Topic};

mod decision;

pub use decision::{Bounds, BudgetShare, NotRecovered, Resumer, decide};

/// The action of the first frame on a socket that speaks resume.
pub const ACTION_WELCOME: &str = "wshub.welcome";
/// The action of the notice that messages were lost and cannot be replayed.
pub const ACTION_GAP: &str = "wshub.gap";
/// The name of the socket URL's query parameter.
pub const QUERY_PARAMETER: &str = "resume";

/// What a socket asked for with its `resume` query parameter. With history
/// off every socket is [`Request::Legacy`], whatever its URL says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// No `resume` parameter: a socket as today (unmodified Web Connection
    /// pages). It takes over a drain handoff for its identity, if there is
    /// one, and never sees a welcome or `pos`.
    Legacy,
    /// No `resume` parameter and no user id: the hub made one up, which no
    /// later socket will have, so this socket can neither take a drain
    /// handoff nor leave one to anybody. A socket as today that reads and
    /// writes nothing in history.
    Anonymous,
    /// `resume=`: speaks resume and starts afresh.
    Fresh,
    /// `resume=<positions>`: the positions it last saw (its own topics'
    /// only; other keys were ignored).
    Positions(Positions),
    /// `resume=<something that is not positions>`: speaks resume; not
    /// recovered.
    Unreadable,
}

impl Request {
    /// The request for the `resume` parameter's (URL-decoded) value.
    pub fn from_parameter(value: Option<&str>, who: &Identity) -> Self {
        match value {
            None => Self::Legacy,
            Some("") => Self::Fresh,
            Some(value) => match parse_resume(value, who) {
                Ok(positions) => Self::Positions(positions),
                Err(_) => Self::Unreadable,
            },
        }
    }

    /// Whether the socket opted in: it gets the welcome, `pos` and gaps.
    pub fn speaks_resume(&self) -> bool {
        !matches!(self, Self::Legacy | Self::Anonymous)
    }

    /// The request of a socket whose user id the hub generated (none was
    /// given): [`Request::Anonymous`] instead of [`Request::Legacy`].
    pub fn with_generated_user_id(self) -> Self {
        match self {
            Self::Legacy => Self::Anonymous,
            other => other,
        }
    }
}

/// The last position written to a socket, per topic (see the module docs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Floors {
    positions: Positions,
    /// Drop copies at or below the floor (sockets that speak resume, and
    /// legacy sockets replayed a handoff).
    dedupe: bool,
}

impl Floors {
    /// Floors at `positions`; `dedupe` drops copies already covered.
    pub fn new(positions: Positions, dedupe: bool) -> Self {
        Self { positions, dedupe }
    }

    /// Whether a queued copy with `mark` is written; the floor of its topic
    /// rises to it when it is. A copy without a mark (not stamped, or a
    /// hub frame) is always written. A legacy socket's copies are always
    /// written, and its floor never goes down for one that arrives late.
    pub fn admit(&mut self, mark: Option<&Mark>) -> bool {
        let Some(mark) = mark else { return true };
        let Some(floor) = self.positions.get_mut(mark.slot()) else {
            return true;
        };
        match floor {
            // By address first (`Arc`'s `==` does): the subscriber gives
            // one topic's copies one epoch allocation, adopted here.
            Some(f) if f.epoch == mark.position().epoch => {
                if mark.position().offset <= f.offset {
                    return !self.dedupe;
                }
                f.offset = mark.position().offset;
                if !std::sync::Arc::ptr_eq(&f.epoch, &mark.position().epoch) {
                    f.epoch = mark.position().epoch.clone();
                }
            }
            // A new epoch (or none known): the topic starts again here.
            _ => *floor = Some(mark.position().clone()),
        }
        true
    }

    /// The floors, per topic.
    pub fn positions(&self) -> &Positions {
        &self.positions
    }
}

/// What the backend is told of a resume (history on only): the
/// `X-Wshub-Resume` header and the `wshub.connect` event's `message`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    /// `None`: a legacy socket that took over no handoff.
    pub result: Option<ResumeResult>,
    /// Messages replayed.
    pub replayed: usize,
}

impl Report {
    /// The `X-Wshub-Resume` header: `recovered`, `not_recovered` (also for
    /// a fresh start) or `none`.
    pub fn header(&self) -> &'static str {
        match self.result {
            Some(ResumeResult::Recovered) => "recovered",
            Some(ResumeResult::NotRecovered | ResumeResult::Fresh) => "not_recovered",
            None => "none",
        }
    }

    /// The `wshub.connect` event's `message`: `{"recovered":…,"replayed":…}`.
    pub fn message(&self) -> String {
        format!(
            r#"{{"recovered":{},"replayed":{}}}"#,
            self.result == Some(ResumeResult::Recovered),
            self.replayed
        )
    }
}

/// How a socket starts with history on.
#[derive(Debug)]
pub struct Outcome {
    /// Written first, in order, before anything queued: the welcome (for
    /// sockets that speak resume) and the replayed frames.
    pub frames: Vec<Frame>,
    /// The floors the session starts from.
    pub floors: Floors,
    /// What the backend and the metrics are told.
    pub report: Report,
    /// History could not be read for the welcome's positions: the socket
    /// is closed (1011, no frame written) so that the client comes back.
    pub unreadable: bool,
    /// The replay's share of `history.replay_budget_bytes`: held until the
    /// replay is written, or the socket ends.
    pub budget: Option<BudgetShare>,
}

/// The welcome frame: the socket's ids, and in `message` (a JSON string)
/// whether it was recovered, how many messages follow, its positions by
/// client key, and this node's id.
pub fn welcome_frame(
    who: &Identity,
    recovered: bool,
    replayed: usize,
    positions: &Positions,
    node: &str,
) -> Frame {
    #[derive(Serialize)]
    struct Welcome<'a> {
        recovered: bool,
        replayed: usize,
        positions: Keyed<'a>,
        node: &'a str,
    }
    /// The positions by client key, in [`topics_of`] order.
    struct Keyed<'a>(&'a Identity, &'a Positions);
    impl Serialize for Keyed<'_> {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let mut map = s.serialize_map(None)?;
            for (topic, position) in topics_of(self.0).iter().zip(self.1) {
                if let Some(position) = position {
                    map.serialize_entry(&client_key(topic), &position.to_string())?;
                }
            }
            map.end()
        }
    }
    let body = Welcome {
        recovered,
        replayed,
        positions: Keyed(who, positions),
        node,
    };
    // Strings and numbers always serialize.
    let message = serde_json::to_string(&body).unwrap_or_default();
    Message {
        user_id: Some((&*who.user).into()),
        group_id: who.group.as_deref().map(Into::into),
        action: Some(ACTION_WELCOME.into()),
        message: Some(message.into()),
        ..Message::default()
    }
    .encode()
}

/// The gap notice for `topic`: `message` is `{"topics":["<client key>"]}`,
/// with `"positions":{"<client key>":"<position>"}` when the position
/// everything lost is at or before is known ([`Deliver::gap`]): a client
/// keeps it as the topic's position (when newer than its own), so that
/// its next resume asks only for what follows the loss.
///
/// [`Deliver::gap`]: crate::bus::Deliver::gap
pub fn gap_frame(topic: &Topic, at: Option<&crate::history::Position>) -> Frame {
    #[derive(Serialize)]
    struct Notice<'a> {
        topics: [&'a str; 1],
        #[serde(skip_serializing_if = "Option::is_none")]
        positions: Option<std::collections::BTreeMap<&'a str, String>>,
    }
    let key = client_key(topic);
    let notice = Notice {
        topics: [&key],
        positions: at.map(|at| [(&*key, at.to_string())].into()),
    };
    // Strings only: always serializes.
    let message = serde_json::to_string(&notice).unwrap_or_default();
    Message {
        action: Some(ACTION_GAP.into()),
        message: Some(message.into()),
        ..Message::default()
    }
    .encode()
}

#[cfg(test)]
mod tests;
