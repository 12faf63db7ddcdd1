//! One connection as the node sees it: who it is, its outbound queue, and
//! the [`Closer`] that ends its session once, for one reason.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use futures_util::task::AtomicWaker;
use tracing::{debug, warn};

use crate::logging::{Untrusted, UntrustedOpt};
use crate::message::Frame;
use crate::outbox::{Full, Outbox, Queued, wait_on};
use crate::outcome::CloseReason;
use crate::position::Mark;
use crate::route::{Addressee, Identity, Relay};
use crate::wire::{Direct, Flushed, Wire};

/// A connection's id, unique on this node.
pub(crate) type ConnId = u64;

/// What the hub keeps of one connection.
#[derive(Debug)]
pub struct Conn {
    pub id: ConnId,
    /// The connection id, unique in the cluster: `<node id>-<instance>-<id>`
    /// (`X-Wshub-Connection-Id`, the `connection` recipient).
    pub cid: Arc<str>,
    pub who: Identity,
    /// What the client may address when the hub relays its messages.
    pub relay: Relay,
    /// The socket opted in to resume (`resume=` on its URL, history on):
    /// it gets the welcome, `pos` in every stamped message, and gap
    /// notices. Otherwise its frames are byte for byte today's.
    pub speaks_resume: bool,
    outbox: Outbox,
    /// The socket's write side, shared with the tasks that deliver to it.
    wire: Wire,
    /// A delivery lane has this connection on its list
    /// ([`crate::lane`]): at most once, so a lane's list is bounded by
    /// its connections.
    on_lane: AtomicBool,
    pub closer: Closer,
}

impl AsRef<Wire> for Conn {
    fn as_ref(&self) -> &Wire {
        &self.wire
    }
}

impl Conn {
    /// The socket's write side.
    pub(crate) fn wire(&self) -> &Wire {
        &self.wire
    }
}

impl Conn {
    /// Creates a connection and the receiving end of its outbound queue,
    /// which may hold up to `queue_bytes` of frames.
    pub fn new(
        id: ConnId,
        who: Identity,
        speaks_resume: bool,
        queue_bytes: usize,
    ) -> (Arc<Self>, OutboxReceiver) {
        Self::open(
            id,
            id.to_string().into(),
            who,
            Relay::All,
            speaks_resume,
            queue_bytes,
        )
    }

    /// [`new`](Self::new) with its cluster-wide id `cid` and its relay
    /// policy.
    pub(crate) fn open(
        id: ConnId,
        cid: Arc<str>,
        who: Identity,
        relay: Relay,
        speaks_resume: bool,
        queue_bytes: usize,
    ) -> (Arc<Self>, OutboxReceiver) {
        let conn = Arc::new(Conn {
            id,
            cid,
            who,
            relay,
            speaks_resume,
            outbox: Outbox::new(queue_bytes),
            wire: Wire::default(),
            on_lane: AtomicBool::new(false),
            closer: Closer::default(),
        });
        let rx = OutboxReceiver { conn: conn.clone() };
        (conn, rx)
    }

    /// Queues a frame for this connection without waiting. Returns false when
    /// the queue was full: the connection is then closed as a slow consumer
    /// (and that is logged).
    pub fn offer(&self, frame: Frame) -> bool {
        match self.try_offer(&frame, None, true) {
            Offered::Queued => true,
            Offered::Full { closed_now } => {
                if closed_now {
                    self.log_slow_consumer(SlowCause::QueueFull);
                }
                false
            }
        }
    }

    /// [`offer`](Self::offer) without the log line, for callers holding a
    /// lock: they log with [`log_slow_consumer`](Self::log_slow_consumer)
    /// after releasing it. `mark`: where a copy of a stamped message stands
    /// in the topic it came through.
    ///
    /// With `direct`, a copy for a socket whose queue is empty is written
    /// to the socket by the caller when it can be at once
    /// ([`Wire::try_deliver`], which checks its `mark` against the
    /// socket's floors with history on); what the socket does not take is
    /// left to the session, which is woken for it.
    pub(crate) fn try_offer(&self, frame: &Frame, mark: Option<&Mark>, direct: bool) -> Offered {
        if direct && self.closer.reason().is_none() {
            match self
                .wire
                .try_deliver(frame, mark, || self.outbox.is_empty())
            {
                Direct::Written => return Offered::Queued,
                Direct::Owed => {
                    self.outbox.wake();
                    return Offered::Queued;
                }
                Direct::No => {}
            }
        }
        match self.outbox.push(frame.clone(), mark.cloned()) {
            Ok(()) => Offered::Queued,
            Err(Full) => Offered::Full {
                closed_now: self.closer.close(CloseReason::SlowConsumer),
            },
        }
    }

    /// Queues a copy of a message (with its `mark`, history on) for a
    /// delivery lane to write, without waking the session. `Queued { visit: true }`
    /// when the lane must be handed this connection (it was not on the
    /// lane's list already); then the lane writes the frame, or wakes the
    /// session for it ([`visit`](Self::visit)).
    pub(crate) fn offer_to_lane(&self, frame: &Frame, mark: Option<&Mark>) -> LaneOffer {
        match self.outbox.push_quiet(frame.clone(), mark.cloned()) {
            // AcqRel: the lane that takes the flag back sees the frame.
            Ok(()) => LaneOffer::Queued {
                visit: !self.on_lane.swap(true, Ordering::AcqRel),
            },
            Err(Full) => LaneOffer::Full {
                closed_now: self.closer.close(CloseReason::SlowConsumer),
            },
        }
    }

    /// A lane's visit: writes what is queued when the socket takes it at
    /// once, and wakes the session for whatever is left. With
    /// `write: false` (the lane has stopped), only wakes the session.
    pub(crate) fn visit(&self, write: bool) {
        // Off the list first: a frame queued from now on hands the
        // connection to the lane again (at worst a visit that finds
        // nothing), never to no one.
        self.on_lane.swap(false, Ordering::AcqRel);
        let left = if write {
            // Frames are taken under the wire's lock, as the session takes
            // them, so the two never reorder a socket's frames.
            self.wire.try_flush(&mut || self.outbox.pop())
        } else {
            Flushed::Session
        };
        if left == Flushed::Session {
            self.outbox.wake();
        }
    }

    /// The slow-consumer warning. Client ids are logged at debug only
    /// (docs/security.md, "What is logged"): the warning names the
    /// connection and the close reason, and a debug line with the same
    /// `conn` ties it to the user and group when an operator needs them.
    pub(crate) fn log_slow_consumer(&self, cause: SlowCause) {
        let reason = CloseReason::SlowConsumer;
        let cause = match cause {
            SlowCause::QueueFull => "outbound queue full",
            SlowCause::WriteTimedOut => "write timed out",
        };
        warn!(
            conn = %self.cid,
            code = reason.code(),
            reason = reason.label(),
            "{cause}: closing slow consumer"
        );
        debug!(
            conn = %self.cid,
            user = %Untrusted(&self.who.user),
            group = %UntrustedOpt(self.who.group.as_deref()),
            "slow consumer's ids"
        );
    }
}

impl Addressee for Conn {
    fn identity(&self) -> &Identity {
        &self.who
    }

    fn connection(&self) -> Option<&str> {
        Some(&self.cid)
    }
}

/// Why a connection was found too slow, for its warning.
#[derive(Debug, Clone, Copy)]
pub(crate) enum SlowCause {
    /// Its outbound queue was full.
    QueueFull,
    /// One write waited `ws.write_timeout_ms`.
    WriteTimedOut,
}

/// What [`Conn::try_offer`] did.
pub(crate) enum Offered {
    Queued,
    /// The queue was full; `closed_now` when this offer closed the
    /// connection (the first to find it full), which is logged once.
    Full {
        closed_now: bool,
    },
}

/// What [`Conn::offer_to_lane`] did.
pub(crate) enum LaneOffer {
    /// Queued; `visit` when the lane must be handed the connection.
    Queued { visit: bool },
    /// As [`Offered::Full`].
    Full { closed_now: bool },
}

/// The session's end of a connection's outbound queue.
#[derive(Debug)]
pub struct OutboxReceiver {
    conn: Arc<Conn>,
}

impl OutboxReceiver {
    /// `Ready` once the session has a write to do: a frame queued or
    /// bytes owed to the socket; `Pending` until then. (The queue lives
    /// as long as the connection, so this never ends by itself: the
    /// session stops waiting when it closes.)
    pub(crate) fn poll_work(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        self.conn.outbox.poll_work(cx, || self.conn.wire.owes())
    }

    /// The connection's write side.
    pub(crate) fn wire(&self) -> &Wire {
        &self.conn.wire
    }

    /// The next frame if one is queued.
    pub(crate) fn try_recv(&self) -> Option<Queued> {
        self.conn.outbox.pop()
    }
}

/// Ends a session once, for one reason, from anywhere.
///
/// The first [`close`](Self::close) wins; the session waits on
/// [`closed`](Self::closed) alongside its socket and sends that reason's
/// close frame. Only the session ever waits, so an `AtomicWaker` (one
/// atomic swap per wait, no lock) is enough; the reason is checked again
/// after registering, so a close never goes unnoticed.
#[derive(Debug, Default)]
pub struct Closer {
    /// The reason, and the close frame's text when it is not the
    /// reason's own (`POST /api/disconnect` with a `reason`).
    reason: OnceLock<(CloseReason, Option<Box<str>>)>,
    waker: AtomicWaker,
}

impl Closer {
    /// Asks the session to close with `reason`. Returns false when a reason
    /// was already set (which then stands).
    pub fn close(&self, reason: CloseReason) -> bool {
        self.close_with(reason, None)
    }

    /// [`close`](Self::close) with the close frame's text, when given.
    pub fn close_with(&self, reason: CloseReason, text: Option<&str>) -> bool {
        let first = self.reason.set((reason, text.map(Into::into))).is_ok();
        if first {
            self.waker.wake();
        }
        first
    }

    /// The reason set so far, if any.
    pub fn reason(&self) -> Option<CloseReason> {
        self.reason.get().map(|(reason, _)| *reason)
    }

    /// The close frame's text: the one given with the reason, or the
    /// reason's own.
    pub fn text(&self) -> Option<&str> {
        let (reason, text) = self.reason.get()?;
        Some(text.as_deref().unwrap_or(reason.reason()))
    }

    /// Resolves with the reason once one is set. Only the session may wait.
    pub async fn closed(&self) -> CloseReason {
        wait_on(&self.waker, || self.reason()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::tests::{CountingWaker, poll_once};
    use std::sync::atomic::Ordering;
    use std::task::Poll;

    fn poll_closed(closer: &Closer, waker: &Arc<CountingWaker>) -> Poll<CloseReason> {
        poll_once(closer.closed(), waker)
    }

    /// The hand-written waker: the waiting session is woken by the first
    /// close only, and sees the first reason.
    #[test]
    fn the_first_close_wakes_the_session_and_wins() {
        let closer = Closer::default();
        let waker = Arc::new(CountingWaker::default());
        assert!(poll_closed(&closer, &waker).is_pending());
        assert!(closer.close(CloseReason::GoingAway));
        assert_eq!(
            waker.0.load(Ordering::SeqCst),
            1,
            "the close woke the session"
        );
        assert!(
            !closer.close(CloseReason::SlowConsumer),
            "the second close loses"
        );
        assert_eq!(
            waker.0.load(Ordering::SeqCst),
            1,
            "a losing close wakes nobody"
        );
        assert_eq!(
            poll_closed(&closer, &waker),
            Poll::Ready(CloseReason::GoingAway)
        );
    }

    /// A reason set before the session waits is seen at once.
    #[test]
    fn a_close_before_waiting_is_not_missed() {
        let closer = Closer::default();
        closer.close(CloseReason::PingTimeout);
        let waker = Arc::new(CountingWaker::default());
        assert_eq!(
            poll_closed(&closer, &waker),
            Poll::Ready(CloseReason::PingTimeout)
        );
    }
}
