//! This node's connections: indexed by group and by user, and delivered to.
//!
//! The hub is the bus's [`Deliver`] sink. A copy that arrives through a topic
//! is offered to the sockets indexed under that topic only, each of which
//! takes it if [`Route::accepts`](crate::route::Route::accepts) says so —
//! that is what makes delivery exactly-once per socket.
//!
//! Delivery never waits: each connection has a queue of encoded frames
//! bounded in bytes, and a connection whose queue is full is closed as a
//! slow consumer ([`CloseReason::SlowConsumer`]) instead of slowing anyone
//! else.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

use tokio::sync::{Notify, mpsc};
use tracing::warn;

use crate::bus::{Deliver, Envelope};
use crate::close::CloseReason;
use crate::message::Frame;
use crate::metrics::Metrics;
use crate::route::{Identity, Topic};

/// A connection's id, unique on this node.
pub type ConnId = u64;

/// What the hub keeps of one connection.
#[derive(Debug)]
pub struct Conn {
    pub id: ConnId,
    pub who: Identity,
    outbox: Outbox,
    pub closer: Closer,
}

impl Conn {
    /// Creates a connection and the receiving end of its outbound queue,
    /// which may hold up to `queue_bytes` of frames.
    pub fn new(id: ConnId, who: Identity, queue_bytes: usize) -> (Arc<Self>, OutboxReceiver) {
        let (outbox, rx) = Outbox::new(queue_bytes);
        let conn = Conn {
            id,
            who,
            outbox,
            closer: Closer::default(),
        };
        (Arc::new(conn), rx)
    }

    /// Queues a frame for this connection without waiting. Returns false when
    /// the queue was full: the connection is then closed as a slow consumer.
    pub fn offer(&self, frame: Frame) -> bool {
        match self.outbox.push(frame) {
            Ok(()) => true,
            Err(Full) => {
                if self.closer.close(CloseReason::SlowConsumer) {
                    warn!(conn = self.id, user = %self.who.user, "outbound queue full: closing slow consumer");
                }
                false
            }
        }
    }
}

/// Bookkeeping cost of one queued frame beyond its bytes, so that a flood of
/// tiny frames is bounded too.
const FRAME_OVERHEAD: usize = 64;

/// A connection's outbound queue, bounded in bytes rather than frames.
///
/// Bytes are what a slow client costs and what "how far behind is it"
/// means: a burst of a thousand tiny messages is harmless, a few hundred
/// kilobytes unread is not. The channel underneath is unbounded, and the
/// byte budget is what bounds it: [`push`](Self::push) refuses a frame that
/// would take the queued total past the budget (frames are shared
/// `Bytes`, so the real memory is often less than the budget says).
#[derive(Debug)]
struct Outbox {
    tx: mpsc::UnboundedSender<Frame>,
    queued: Arc<AtomicUsize>,
    budget: usize,
}

/// The queue was full.
#[derive(Debug)]
struct Full;

impl Outbox {
    fn new(budget: usize) -> (Self, OutboxReceiver) {
        let (tx, rx) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let rx = OutboxReceiver {
            rx,
            queued: queued.clone(),
        };
        (Self { tx, queued, budget }, rx)
    }

    fn push(&self, frame: Frame) -> Result<(), Full> {
        let cost = frame.len() + FRAME_OVERHEAD;
        let before = self.queued.fetch_add(cost, Ordering::AcqRel);
        if before + cost > self.budget {
            self.queued.fetch_sub(cost, Ordering::AcqRel);
            return Err(Full);
        }
        // A closed receiver means the session is ending: the frame is moot.
        let _ = self.tx.send(frame);
        Ok(())
    }
}

/// The session's end of a connection's outbound queue.
#[derive(Debug)]
pub struct OutboxReceiver {
    rx: mpsc::UnboundedReceiver<Frame>,
    queued: Arc<AtomicUsize>,
}

impl OutboxReceiver {
    fn took(&self, frame: &Frame) {
        self.queued
            .fetch_sub(frame.len() + FRAME_OVERHEAD, Ordering::AcqRel);
    }

    /// The next frame; `None` once the connection is gone.
    pub async fn recv(&mut self) -> Option<Frame> {
        let frame = self.rx.recv().await?;
        self.took(&frame);
        Some(frame)
    }

    /// The next frame if one is queued.
    pub fn try_recv(&mut self) -> Option<Frame> {
        let frame = self.rx.try_recv().ok()?;
        self.took(&frame);
        Some(frame)
    }
}

/// Ends a session once, for one reason, from anywhere.
///
/// The first [`close`](Self::close) wins; the session waits on
/// [`closed`](Self::closed) alongside its socket and sends that reason's
/// close frame.
#[derive(Debug, Default)]
pub struct Closer {
    reason: OnceLock<CloseReason>,
    // `notify_one` stores a permit, so a close that happens while the
    // session is busy elsewhere is seen on its next wait.
    notify: Notify,
}

impl Closer {
    /// Asks the session to close with `reason`. Returns false when a reason
    /// was already set (which then stands).
    pub fn close(&self, reason: CloseReason) -> bool {
        let first = self.reason.set(reason).is_ok();
        if first {
            self.notify.notify_one();
        }
        first
    }

    /// The reason set so far, if any.
    pub fn reason(&self) -> Option<CloseReason> {
        self.reason.get().copied()
    }

    /// Resolves with the reason once one is set.
    pub async fn closed(&self) -> CloseReason {
        loop {
            if let Some(reason) = self.reason() {
                return reason;
            }
            self.notify.notified().await;
        }
    }
}

type Members = HashMap<ConnId, Arc<Conn>>;

#[derive(Default)]
struct Index {
    all: Members,
    groups: HashMap<Option<Arc<str>>, Members>,
    users: HashMap<Arc<str>, Members>,
}

/// This node's connections.
///
/// One `std::sync::RwLock` over the three indexes: deliveries take it
/// shared and never await while holding it; connects and disconnects take
/// it exclusively for a few map operations.
pub struct Hub {
    index: RwLock<Index>,
    metrics: Arc<Metrics>,
}

impl Hub {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            index: RwLock::default(),
            metrics,
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Index> {
        // The index stays consistent if a holder panicked: ignore poisoning.
        self.index.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Index> {
        self.index.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a connection to the indexes.
    pub fn insert(&self, conn: Arc<Conn>) {
        let mut index = self.write();
        let id = conn.id;
        index
            .groups
            .entry(conn.who.group.clone())
            .or_default()
            .insert(id, conn.clone());
        index
            .users
            .entry(conn.who.user.clone())
            .or_default()
            .insert(id, conn.clone());
        index.all.insert(id, conn);
    }

    /// Removes a connection; empty index entries are dropped, so the maps
    /// only ever hold groups and users that have a socket here.
    pub fn remove(&self, conn: &Conn) {
        let mut index = self.write();
        index.all.remove(&conn.id);
        if let Some(members) = index.groups.get_mut(&conn.who.group) {
            members.remove(&conn.id);
            if members.is_empty() {
                index.groups.remove(&conn.who.group);
            }
        }
        if let Some(members) = index.users.get_mut(&conn.who.user) {
            members.remove(&conn.id);
            if members.is_empty() {
                index.users.remove(&conn.who.user);
            }
        }
    }

    /// Number of connections.
    pub fn len(&self) -> usize {
        self.read().all.len()
    }

    /// Whether there are no connections.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every connection, at this moment.
    pub fn snapshot(&self) -> Vec<Arc<Conn>> {
        self.read().all.values().cloned().collect()
    }
}

impl Deliver for Hub {
    fn deliver(&self, via: &Topic, envelope: &Arc<Envelope>) {
        let index = self.read();
        let members = match via {
            Topic::All => Some(&index.all),
            Topic::Group(g) => index.groups.get(g),
            Topic::User(u) => index.users.get(u),
        };
        let Some(members) = members else { return };
        let (mut delivered, mut dropped) = (0u64, 0u64);
        for conn in members.values() {
            if envelope.route.accepts(via, &conn.who) {
                if conn.offer(envelope.frame.clone()) {
                    delivered += 1;
                } else {
                    dropped += 1;
                }
            }
        }
        drop(index);
        self.metrics.delivered(delivered);
        self.metrics.dropped_slow(dropped);
    }
}
