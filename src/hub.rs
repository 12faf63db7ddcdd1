//! This node's connections: indexed by group and by user, and delivered to.
//!
//! The hub is where every message for this node's sockets arrives: the
//! node's own messages ([`Node::publish`](crate::node::Node::publish)) and
//! other nodes' (the bus's [`Deliver`] sink). A copy that arrives through a
//! topic is offered to the sockets indexed under that topic only, each of
//! which takes it if [`Route::accepts`](crate::route::Route::accepts) says
//! so — that is what makes delivery exactly-once per socket.
//!
//! Delivery never waits: each connection has a queue of encoded frames
//! bounded in bytes ([`crate::outbox`]), and a connection whose queue is
//! full is closed as a slow consumer instead of slowing anyone else.
//!
//! With history on, a socket that speaks resume is offered the frame with
//! `pos` ([`Envelope::frame_for`], encoded once per message and shared),
//! every other socket the plain frame, byte for byte today's; each copy of
//! a stamped message is queued with its [`Mark`] for the session's
//! de-duplication. A gap the bus cannot repair ([`Deliver::gap`]) becomes a
//! `wshub.gap` notice to the sockets of that topic that speak resume.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use crate::bus::Deliver;
use crate::bus::wire::Order;
use crate::conn::{Conn, ConnId, Offered, SlowCause};
use crate::envelope::Envelope;
use crate::metrics::Metrics;
use crate::outcome::CloseReason;
use crate::resume::{Mark, gap_frame};
use crate::route::{Topic, connection_number};

type Members = HashMap<ConnId, Arc<Conn>>;

#[derive(Default)]
struct Index {
    all: Members,
    groups: HashMap<Option<Arc<str>>, Members>,
    users: HashMap<Arc<str>, Members>,
}

impl Index {
    /// The connection whose cluster-wide id is `cid`, if it is here (its
    /// number finds it, the whole id confirms it: an id of another node
    /// or of an earlier run of this one is not here).
    fn connection(&self, cid: &str) -> Option<&Arc<Conn>> {
        let conn = self.all.get(&connection_number(cid)?)?;
        (*conn.cid == *cid).then_some(conn)
    }
}

/// This node's connections.
///
/// One `std::sync::RwLock` over the three indexes: deliveries take it
/// shared and never await while holding it; connects and disconnects take
/// it exclusively for a few map operations. Nothing is logged while it is
/// held: a log write can block (a full stderr pipe), and a blocked reader
/// would block every connect and disconnect behind it.
pub(crate) struct Hub {
    index: RwLock<Index>,
    metrics: Arc<Metrics>,
}

impl Hub {
    pub(crate) fn new(metrics: Arc<Metrics>) -> Self {
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
    pub(crate) fn insert(&self, conn: Arc<Conn>) {
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
    pub(crate) fn remove(&self, conn: &Conn) {
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

    /// The connection with id `id`, if it is open here.
    pub(crate) fn get(&self, id: ConnId) -> Option<Arc<Conn>> {
        self.read().all.get(&id).cloned()
    }

    /// Number of connections.
    pub(crate) fn len(&self) -> usize {
        self.read().all.len()
    }

    /// Every connection, at this moment.
    pub(crate) fn snapshot(&self) -> Vec<Arc<Conn>> {
        self.read().all.values().cloned().collect()
    }

    /// Closes every socket reached through `target` with `reason` (and the
    /// close frame's `text`, when given); returns how many it closed.
    /// (`POST /api/disconnect`; never delivered as a message.)
    pub(crate) fn close_all(
        &self,
        target: &Topic,
        reason: CloseReason,
        text: Option<&str>,
    ) -> usize {
        let index = self.read();
        let mut n = 0;
        let mut close = |conn: &Arc<Conn>| {
            conn.closer.close_with(reason, text);
            n += 1;
        };
        match target {
            Topic::All => index.all.values().for_each(&mut close),
            Topic::Group(g) => index
                .groups
                .get(g)
                .into_iter()
                .flat_map(|m| m.values())
                .for_each(&mut close),
            Topic::User(u) => index
                .users
                .get(u)
                .into_iter()
                .flat_map(|m| m.values())
                .for_each(&mut close),
            Topic::Connection(c) => index.connection(c).into_iter().for_each(&mut close),
        }
        n
    }

    /// The topics this node's sockets are reached through (everyone, each
    /// group, each user), at this moment.
    pub(crate) fn topics(&self) -> Vec<Topic> {
        let index = self.read();
        let mut topics = Vec::with_capacity(1 + index.groups.len() + index.users.len());
        topics.push(Topic::All);
        topics.extend(index.groups.keys().map(|g| Topic::Group(g.clone())));
        topics.extend(index.users.keys().map(|u| Topic::User(u.clone())));
        topics
    }

    /// Offers `frame(conn)` (and `mark`) to the members of `via` for which
    /// `wanted(conn)`, counting what was queued and dropped; slow
    /// consumers are logged once the lock is released.
    fn offer_each<'e>(
        &self,
        via: &Topic,
        mark: Option<&Mark>,
        wanted: impl Fn(&Conn) -> bool,
        frame: impl Fn(&Conn) -> &'e crate::message::Frame,
    ) {
        let index = self.read();
        let (mut delivered, mut dropped) = (0u64, 0u64);
        // Connections this delivery closed, logged once the lock is released.
        let mut closed = Vec::new();
        let mut offer = |conn: &Arc<Conn>| {
            if wanted(conn) {
                match conn.try_offer(frame(conn).clone(), mark.cloned()) {
                    Offered::Queued => delivered += 1,
                    Offered::Full { closed_now } => {
                        dropped += 1;
                        if closed_now {
                            closed.push(conn.clone());
                        }
                    }
                }
            }
        };
        match via {
            Topic::All => index.all.values().for_each(&mut offer),
            Topic::Group(g) => index
                .groups
                .get(g)
                .into_iter()
                .flat_map(|m| m.values())
                .for_each(&mut offer),
            Topic::User(u) => index
                .users
                .get(u)
                .into_iter()
                .flat_map(|m| m.values())
                .for_each(&mut offer),
            Topic::Connection(c) => index.connection(c).into_iter().for_each(&mut offer),
        }
        drop(index);
        for conn in closed {
            conn.log_slow_consumer(SlowCause::QueueFull);
        }
        self.metrics.delivered(delivered);
        self.metrics.dropped_slow(dropped);
    }
}

impl Deliver for Hub {
    fn deliver(&self, via: &Topic, envelope: &Arc<Envelope>) {
        let mark = Mark::of(via, envelope.stamp.as_ref());
        self.offer_each(
            via,
            mark.as_ref(),
            |conn| envelope.route.accepts(via, conn),
            |conn| envelope.frame_for(conn.speaks_resume),
        );
    }

    fn gap(&self, topic: &Topic) {
        let notice = gap_frame(topic);
        self.offer_each(topic, None, |conn| conn.speaks_resume, |_| &notice);
    }

    fn order(&self, order: &Order) -> usize {
        let Order::Disconnect {
            target,
            code,
            reason,
        } = order;
        // `All` is no disconnect target (the API refuses it; a control
        // payload naming it is ignored).
        if *target == Topic::All {
            return 0;
        }
        let closed = self.close_all(target, CloseReason::Disconnected(*code), reason.as_deref());
        self.metrics.control_received();
        closed
    }

    fn topics(&self) -> Vec<Topic> {
        Hub::topics(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Frame;
    use crate::route::{Identity, Route};
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
        let (slow, _rx) = Conn::new(1, who("slow"), false, 1);
        hub.insert(slow);
        let envelope = Arc::new(Envelope::new(Route::everyone(), Frame::from("x")));
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
                let (conn, _rx) = Conn::new(2, who("newcomer"), false, 1024);
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
