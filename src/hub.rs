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

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, OnceLock, RwLock};

use std::task::Poll;

use futures_util::task::AtomicWaker;
use tracing::warn;

use crate::bus::{Deliver, Envelope};
use crate::close::CloseReason;
use crate::logging::Untrusted;
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
        let conn = Arc::new(Conn {
            id,
            who,
            outbox: Outbox::new(queue_bytes),
            closer: Closer::default(),
        });
        let rx = OutboxReceiver { conn: conn.clone() };
        (conn, rx)
    }

    /// Queues a frame for this connection without waiting. Returns false when
    /// the queue was full: the connection is then closed as a slow consumer
    /// (and that is logged).
    pub fn offer(&self, frame: Frame) -> bool {
        match self.try_offer(frame) {
            Offered::Queued => true,
            Offered::Full { closed_now } => {
                if closed_now {
                    self.log_slow_consumer();
                }
                false
            }
        }
    }

    /// [`offer`](Self::offer) without the log line, for callers holding a
    /// lock: they log with [`log_slow_consumer`](Self::log_slow_consumer)
    /// after releasing it.
    fn try_offer(&self, frame: Frame) -> Offered {
        match self.outbox.push(frame) {
            Ok(()) => Offered::Queued,
            Err(Full) => Offered::Full {
                closed_now: self.closer.close(CloseReason::SlowConsumer),
            },
        }
    }

    fn log_slow_consumer(&self) {
        warn!(
            conn = self.id,
            user = %Untrusted(&self.who.user),
            "outbound queue full: closing slow consumer"
        );
    }
}

/// What [`Conn::try_offer`] did.
enum Offered {
    Queued,
    /// The queue was full; `closed_now` when this offer closed the
    /// connection (the first to find it full), which is logged once.
    Full {
        closed_now: bool,
    },
}

/// Bookkeeping cost of one queued frame beyond its bytes, so that a flood of
/// tiny frames is bounded too. (The configuration requires room for one
/// largest frame plus this.)
pub const FRAME_OVERHEAD: usize = 64;

/// A connection's outbound queue, bounded in bytes rather than frames.
///
/// Bytes are what a slow client costs and what "how far behind is it"
/// means: a burst of a thousand tiny messages is harmless, a few hundred
/// kilobytes unread is not. [`push`](Self::push) refuses a frame that would
/// take the queued total past the budget (frames are shared `Bytes`, so the
/// real memory is often less than the budget says).
///
/// A `std::sync::Mutex` around a `VecDeque` and an `AtomicWaker`, rather
/// than a channel: an idle socket's queue allocates nothing (a tokio channel
/// allocates its first block of slots up front, over a kilobyte per
/// socket), both ends hold the lock for a push or a pop only, and waking
/// the one reader is an atomic swap.
#[derive(Debug)]
struct Outbox {
    queue: std::sync::Mutex<Queue>,
    budget: usize,
    ready: AtomicWaker,
}

#[derive(Debug, Default)]
struct Queue {
    frames: VecDeque<Frame>,
    bytes: usize,
}

/// The queue was full.
#[derive(Debug)]
struct Full;

impl Outbox {
    fn new(budget: usize) -> Self {
        Self {
            queue: std::sync::Mutex::default(),
            budget,
            ready: AtomicWaker::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        // Every critical section is one push or pop: never inconsistent.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, frame: Frame) -> Result<(), Full> {
        let cost = frame.len() + FRAME_OVERHEAD;
        let mut queue = self.lock();
        if queue.bytes + cost > self.budget {
            return Err(Full);
        }
        queue.bytes += cost;
        queue.frames.push_back(frame);
        drop(queue);
        self.ready.wake();
        Ok(())
    }

    fn pop(&self) -> Option<Frame> {
        let mut queue = self.lock();
        let frame = queue.frames.pop_front()?;
        queue.bytes -= frame.len() + FRAME_OVERHEAD;
        if queue.frames.is_empty() && queue.frames.capacity() > 64 {
            // Give back what a burst grew.
            queue.frames = VecDeque::new();
        }
        Some(frame)
    }
}

/// The session's end of a connection's outbound queue.
#[derive(Debug)]
pub struct OutboxReceiver {
    conn: Arc<Conn>,
}

impl OutboxReceiver {
    /// The next frame, waiting for one. (The queue lives as long as the
    /// connection, so this never ends by itself: the session stops waiting
    /// when it closes.)
    pub async fn recv(&mut self) -> Option<Frame> {
        let outbox = &self.conn.outbox;
        std::future::poll_fn(|cx| {
            if let Some(frame) = outbox.pop() {
                return Poll::Ready(Some(frame));
            }
            outbox.ready.register(cx.waker());
            // A push between the pop and the registration woke nobody:
            // look again.
            match outbox.pop() {
                Some(frame) => Poll::Ready(Some(frame)),
                None => Poll::Pending,
            }
        })
        .await
    }

    /// The next frame if one is queued.
    pub fn try_recv(&mut self) -> Option<Frame> {
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
    reason: OnceLock<CloseReason>,
    waker: AtomicWaker,
}

impl Closer {
    /// Asks the session to close with `reason`. Returns false when a reason
    /// was already set (which then stands).
    pub fn close(&self, reason: CloseReason) -> bool {
        let first = self.reason.set(reason).is_ok();
        if first {
            self.waker.wake();
        }
        first
    }

    /// The reason set so far, if any.
    pub fn reason(&self) -> Option<CloseReason> {
        self.reason.get().copied()
    }

    /// Resolves with the reason once one is set. Only the session may wait.
    pub async fn closed(&self) -> CloseReason {
        std::future::poll_fn(|cx| {
            if let Some(reason) = self.reason() {
                return Poll::Ready(reason);
            }
            self.waker.register(cx.waker());
            match self.reason() {
                Some(reason) => Poll::Ready(reason),
                None => Poll::Pending,
            }
        })
        .await
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
/// it exclusively for a few map operations. Nothing is logged while it is
/// held: a log write can block (a full stderr pipe), and a blocked reader
/// would block every connect and disconnect behind it.
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
        // Connections this delivery closed, logged once the lock is released.
        let mut closed = Vec::new();
        for conn in members.values() {
            if envelope.route.accepts(via, &conn.who) {
                match conn.try_offer(envelope.frame.clone()) {
                    Offered::Queued => delivered += 1,
                    Offered::Full { closed_now } => {
                        dropped += 1;
                        if closed_now {
                            closed.push(conn.clone());
                        }
                    }
                }
            }
        }
        drop(index);
        for conn in closed {
            conn.log_slow_consumer();
        }
        self.metrics.delivered(delivered);
        self.metrics.dropped_slow(dropped);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::Route;
    use std::sync::mpsc;
    use std::time::Duration;

    /// A log destination that blocks like a stderr pipe nobody reads, until
    /// `release` is dropped (or 30 s pass, so a failing test still ends).
    #[derive(Clone)]
    struct StuckWriter {
        entered: mpsc::SyncSender<()>,
        release: Arc<std::sync::Mutex<mpsc::Receiver<()>>>,
    }

    impl std::io::Write for StuckWriter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let _ = self.entered.try_send(());
            let release = self.release.lock().unwrap_or_else(|e| e.into_inner());
            let _ = release.recv_timeout(Duration::from_secs(30));
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Issue 11, item 14: the slow-consumer warning is written with the
    /// index lock released, so a blocked log destination cannot block
    /// connects and disconnects.
    #[test]
    fn a_blocked_log_write_does_not_hold_the_index() {
        let hub = Arc::new(Hub::new(Arc::new(Metrics::new())));
        let who = |user: &str| Identity {
            user: user.into(),
            group: None,
        };
        // A budget of one byte: the first offer overflows it.
        let (slow, _rx) = Conn::new(1, who("slow"), 1);
        hub.insert(slow);
        let envelope = Arc::new(Envelope {
            route: Route::everyone(),
            frame: Frame::from("x"),
        });
        let (entered_tx, entered) = mpsc::sync_channel(1);
        let (release, release_rx) = mpsc::channel::<()>();
        let writer = StuckWriter {
            entered: entered_tx,
            release: Arc::new(std::sync::Mutex::new(release_rx)),
        };
        let deliverer = std::thread::spawn({
            let hub = hub.clone();
            move || {
                let subscriber = tracing_subscriber::fmt()
                    .with_writer(move || writer.clone())
                    .finish();
                tracing::subscriber::with_default(subscriber, || {
                    hub.deliver(&Topic::All, &envelope)
                });
            }
        });
        entered
            .recv_timeout(Duration::from_secs(10))
            .expect("the slow consumer was logged");
        // The log write is stuck now. A connect must still get in.
        let (done_tx, done) = mpsc::channel();
        std::thread::spawn({
            let hub = hub.clone();
            move || {
                let (conn, _rx) = Conn::new(2, who("newcomer"), 1024);
                hub.insert(conn);
                let _ = done_tx.send(());
            }
        });
        let connected = done.recv_timeout(Duration::from_secs(5)).is_ok();
        drop(release);
        deliverer.join().unwrap();
        assert!(
            connected,
            "a connect waited for a log write made under the hub's index lock"
        );
        assert_eq!(hub.len(), 2);
    }
}
