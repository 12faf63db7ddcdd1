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
//! a stamped message is offered with its [`Mark`], which whoever writes
//! it checks against the socket's floors (de-duplication after a replay,
//! [`crate::wire`]). A gap the bus cannot repair ([`Deliver::gap`]) becomes a
//! `wshub.gap` notice to the sockets of that topic that speak resume.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::{Arc, RwLock};

use crate::bus::Deliver;
use crate::bus::wire::Order;
use crate::conn::{Conn, ConnId, LaneOffer, Offered, SlowCause};
use crate::envelope::Envelope;
use crate::lane::{HAND_EVERY, Lanes};
use crate::metrics::Metrics;
use crate::outcome::CloseReason;
use crate::position::Position;
use crate::resume::{Mark, gap_frame};
use crate::route::{Identity, Topic, connection_number};

/// The sockets of one group or one user.
///
/// Most users have one socket, and an idle node holds one entry per user:
/// a lone socket is held inline, a map is made for the second (issue 19: a
/// map per user was an allocation per idle socket, and its 48 bytes were
/// in every entry of the user index). Two words, so an entry of the user
/// index is four.
enum Members {
    /// One socket, the common case.
    One(Arc<Conn>),
    /// Two or more. Boxed: a map is six words, which would be in every
    /// entry, and the box's allocation is only made for a second socket.
    #[allow(
        clippy::box_collection,
        reason = "the box keeps the common entry small (see above)"
    )]
    Many(Box<HashMap<ConnId, Arc<Conn>>>),
}

impl Members {
    /// Adds `conn` to the members in `entry`, creating them for the first.
    fn insert<K>(entry: Entry<'_, K, Members>, conn: Arc<Conn>) {
        match entry {
            Entry::Vacant(vacant) => {
                vacant.insert(Members::One(conn));
            }
            Entry::Occupied(mut occupied) => {
                let members = occupied.get_mut();
                match members {
                    Members::One(one) if one.id == conn.id => *one = conn,
                    Members::One(one) => {
                        let map = HashMap::from([(one.id, one.clone()), (conn.id, conn)]);
                        *members = Members::Many(Box::new(map));
                    }
                    Members::Many(map) => {
                        map.insert(conn.id, conn);
                    }
                }
            }
        }
    }

    /// Removes the socket `id` from the members of `key` in `index`, and
    /// the entry once no member is left.
    fn remove<K, Q>(index: &mut HashMap<K, Members>, key: &Q, id: ConnId)
    where
        K: std::borrow::Borrow<Q> + std::hash::Hash + Eq,
        Q: std::hash::Hash + Eq + ?Sized,
    {
        let Some(members) = index.get_mut(key) else {
            return;
        };
        match members {
            Members::One(one) => {
                if one.id == id {
                    index.remove(key);
                }
            }
            Members::Many(map) => {
                map.remove(&id);
                // Back to one: the map goes (a user who had two tabs open
                // for a moment keeps no map for good).
                if map.len() <= 1 {
                    let last = map.drain().next();
                    match last {
                        Some((_, last)) => *members = Members::One(last),
                        None => {
                            index.remove(key);
                        }
                    }
                }
            }
        }
    }

    /// How many members.
    fn len(&self) -> usize {
        match self {
            Members::One(_) => 1,
            Members::Many(map) => map.len(),
        }
    }

    /// Every member.
    fn iter(&self) -> impl Iterator<Item = &Arc<Conn>> {
        let (one, many) = match self {
            Members::One(one) => (Some(one), None),
            Members::Many(map) => (None, Some(map.values())),
        };
        one.into_iter().chain(many.into_iter().flatten())
    }
}

#[derive(Default)]
struct Index {
    all: HashMap<ConnId, Arc<Conn>>,
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

/// Deliveries to at most this many of this node's sockets may be written
/// to idle sockets by the delivering task ([`crate::wire`]); larger ones
/// are queued and handed to the delivery lanes ([`crate::lane`]), one per
/// worker, which write them (docs/architecture.md, "The delivery path":
/// one task writing thousands of sockets one frame per system call fell
/// behind).
const DIRECT_MAX: usize = 64;

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
    lanes: Lanes,
}

impl Hub {
    /// A hub without delivery lanes: every delivery to more than
    /// [`DIRECT_MAX`] sockets wakes their sessions.
    #[cfg(test)]
    pub(crate) fn new(metrics: Arc<Metrics>) -> Self {
        Self::with_lanes(metrics, Lanes::default())
    }

    /// A hub whose big deliveries are written by `lanes`.
    pub(crate) fn with_lanes(metrics: Arc<Metrics>, lanes: Lanes) -> Self {
        Self {
            index: RwLock::default(),
            metrics,
            lanes,
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
        Members::insert(index.groups.entry(conn.who.group.clone()), conn.clone());
        Members::insert(index.users.entry(conn.who.user.clone()), conn.clone());
        index.all.insert(conn.id, conn);
    }

    /// Removes a connection; empty index entries are dropped, so the maps
    /// only ever hold groups and users that have a socket here.
    pub(crate) fn remove(&self, conn: &Conn) {
        let mut index = self.write();
        index.all.remove(&conn.id);
        Members::remove(&mut index.groups, &conn.who.group, conn.id);
        Members::remove(&mut index.users, &*conn.who.user, conn.id);
    }

    /// `who`, with its group's and its user's names taken from the index
    /// when a socket here already has them: the sockets of a group then
    /// share one string instead of holding a copy each (issue 19).
    pub(crate) fn shared(&self, mut who: Identity) -> Identity {
        let index = self.read();
        if let Some((group, _)) = index.groups.get_key_value(&who.group) {
            who.group = group.clone();
        }
        if let Some((user, _)) = index.users.get_key_value(&who.user) {
            who.user = user.clone();
        }
        who
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
                .flat_map(Members::iter)
                .for_each(&mut close),
            Topic::User(u) => index
                .users
                .get(u)
                .into_iter()
                .flat_map(Members::iter)
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
        let members = match via {
            Topic::All => index.all.len(),
            Topic::Group(g) => index.groups.get(g).map_or(0, Members::len),
            Topic::User(u) => index.users.get(u).map_or(0, Members::len),
            Topic::Connection(_) => 1,
        };
        let direct = members <= DIRECT_MAX;
        // A big delivery goes to the lanes: the sockets each lane is
        // handed, collected here per lane.
        let lanes = !direct && self.lanes.len() > 0;
        let mut handed: Vec<Vec<Arc<Conn>>> = if lanes {
            (0..self.lanes.len()).map(|_| Vec::new()).collect()
        } else {
            Vec::new()
        };
        let mut offer = |conn: &Arc<Conn>| {
            if !wanted(conn) {
                return;
            }
            let full = if lanes {
                match conn.offer_to_lane(frame(conn), mark) {
                    LaneOffer::Queued { visit } => {
                        if visit {
                            let lane = self.lanes.of(conn.id);
                            let list = &mut handed[lane];
                            list.push(conn.clone());
                            if list.len() == HAND_EVERY {
                                self.lanes.hand(lane, list);
                            }
                        }
                        None
                    }
                    LaneOffer::Full { closed_now } => Some(closed_now),
                }
            } else {
                match conn.try_offer(frame(conn), mark, direct) {
                    Offered::Queued => None,
                    Offered::Full { closed_now } => Some(closed_now),
                }
            };
            match full {
                None => delivered += 1,
                Some(closed_now) => {
                    dropped += 1;
                    if closed_now {
                        closed.push(conn.clone());
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
                .flat_map(Members::iter)
                .for_each(&mut offer),
            Topic::User(u) => index
                .users
                .get(u)
                .into_iter()
                .flat_map(Members::iter)
                .for_each(&mut offer),
            Topic::Connection(c) => index.connection(c).into_iter().for_each(&mut offer),
        }
        drop(index);
        for (lane, list) in handed.iter_mut().enumerate() {
            self.lanes.hand(lane, list);
        }
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

    fn gap(&self, topic: &Topic, at: Option<&Position>) {
        let notice = gap_frame(topic, at);
        // Marked with the position everything lost is at or before: a
        // socket's floors drop the notice where a replay already wrote
        // that far (or started in that epoch), and raise to it where it
        // is written (what it lost is behind it now).
        let mark = at.and_then(|p| Mark::at(topic, p.clone()));
        self.offer_each(topic, mark.as_ref(), |conn| conn.speaks_resume, |_| &notice);
    }

    fn resume_held(&self, topic: &Topic) -> bool {
        let index = self.read();
        let speaks = |members: &Members| members.iter().any(|c| c.speaks_resume);
        match topic {
            Topic::All => index.all.values().any(|c| c.speaks_resume),
            Topic::Group(g) => index.groups.get(g).is_some_and(speaks),
            Topic::User(u) => index.users.get(u).is_some_and(speaks),
            Topic::Connection(_) => false,
        }
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

    /// Issue 19: a user with one socket costs its index entry only (the
    /// socket inline, no map of its own); a map is made for a second
    /// socket and goes again when one is left, and the entry goes with the
    /// last.
    #[test]
    fn a_lone_socket_is_indexed_without_a_map() {
        assert!(std::mem::size_of::<Members>() <= 16, "two words at most");
        let hub = Hub::new(Arc::new(Metrics::new()));
        let ann = Identity {
            user: "ann".into(),
            group: Some("chat".into()),
        };
        let users = |hub: &Hub| {
            let index = hub.read();
            index.users.get("ann").map(|m| match m {
                Members::One(one) => vec![one.id],
                Members::Many(map) => {
                    let mut ids: Vec<_> = map.keys().copied().collect();
                    ids.sort_unstable();
                    assert!(ids.len() > 1, "a map holds two or more");
                    ids
                }
            })
        };
        let (first, _rx1) = Conn::new(1, ann.clone(), false, 1024);
        let (second, _rx2) = Conn::new(2, ann.clone(), false, 1024);
        hub.insert(first.clone());
        assert!(matches!(hub.read().users["ann"], Members::One(_)));
        assert_eq!(users(&hub), Some(vec![1]));
        hub.insert(second.clone());
        assert_eq!(users(&hub), Some(vec![1, 2]));
        hub.remove(&first);
        assert!(
            matches!(hub.read().users["ann"], Members::One(_)),
            "back to one: no map kept"
        );
        assert_eq!(users(&hub), Some(vec![2]));
        // Every index reaches the one left.
        let reached = hub.close_all(
            &Topic::Group(Some("chat".into())),
            CloseReason::Normal,
            None,
        );
        assert_eq!(reached, 1);
        hub.remove(&second);
        assert_eq!(users(&hub), None, "the entry goes with the last socket");
        assert!(hub.read().groups.is_empty());
        assert_eq!(hub.topics(), [Topic::All]);
    }

    /// Issue 19: a new socket's group (and user) name is the string the
    /// index already holds, not a copy per socket.
    #[test]
    fn the_sockets_of_a_group_share_its_name() {
        let hub = Hub::new(Arc::new(Metrics::new()));
        let who = |user: &str| Identity {
            user: user.into(),
            group: Some("chat".into()),
        };
        let (ann, _rx) = Conn::new(1, hub.shared(who("ann")), false, 1024);
        hub.insert(ann.clone());
        let bob = hub.shared(who("bob"));
        assert!(Arc::ptr_eq(
            bob.group.as_ref().unwrap(),
            ann.who.group.as_ref().unwrap()
        ));
        assert_eq!(bob, who("bob"), "the same names");
        let again = hub.shared(who("ann"));
        assert!(Arc::ptr_eq(&again.user, &ann.who.user));
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
