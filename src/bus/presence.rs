//! Cluster presence, the store's side: what a node writes about the
//! sockets it holds, what it reads back for the whole cluster, and what the
//! store tells it (`docs/presence.md`; the node's side is
//! [`crate::presence`]).
//!
//! A node never writes per socket and never while idle. It writes a
//! [`Holding`] (a group and user, or a user) when its *first* local socket
//! for it opens, when its local count changes, and when its last one has
//! been gone `presence.leave_delay_ms` (then the holding is removed). The
//! store decides atomically whether a write was a cluster-wide transition
//! ([`Change`]: join, leave, online, offline), so exactly one node learns
//! of each and tells the backend. Join and leave frames for a group's
//! opted-in sockets come back to every node holding something in that
//! group as [`Control`] items, in the order of the group's `v`.
//!
//! Holdings are kept per node *incarnation* (the registry's member), so a
//! node that dies leaves behind holdings another node sweeps once its lease
//! has passed; reads keep only holdings of live nodes, so its users vanish
//! from answers at the lease's expiry, before the sweep.
//!
//! The one implementation is the Redis bus's (`src/bus/redis/presence.rs`);
//! presence needs Redis (the configuration refuses it without).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Weak};

use serde::Serialize;

use super::BusError;

/// What a node holds in the store: one per (group, user) and per user with
/// at least one local socket, or none left for less than
/// `presence.leave_delay_ms`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Holding {
    /// A user's sockets in a group (`None`: the null group).
    Group {
        /// The group.
        group: Option<Arc<str>>,
        /// The user.
        user: Arc<str>,
    },
    /// A user's sockets in any group.
    User(Arc<str>),
}

/// One write of a node to the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// This node's local socket count for a holding (0: the last one closed
    /// less than `leave_delay_ms` ago); `None` removes the holding.
    Set(Holding, Option<u32>),
    /// The per-user limit: a local socket is held (restored after a Redis
    /// restart; `admit` records new ones).
    SocketHeld {
        /// Its user.
        user: Arc<str>,
        /// Its id on this node.
        id: u64,
        /// When it opened (ms since the Unix epoch): the oldest is replaced.
        since_ms: u64,
        /// `limits.max_connections_per_user` (0: none). The restore of a
        /// node that missed its lease brings back sockets the cluster
        /// took for dead and may have admitted others in place of: past
        /// the limit, the user's oldest are replaced.
        max: usize,
    },
    /// The per-user limit: a local socket closed.
    SocketGone {
        /// Its user.
        user: Arc<str>,
        /// Its id on this node.
        id: u64,
    },
}

/// A cluster-wide transition, reported to the one node whose write (or
/// sweep) caused it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A user's first socket in a group appeared anywhere in the cluster.
    Join {
        /// The group.
        group: Option<Arc<str>>,
        /// The user.
        user: Arc<str>,
        /// The group's version after the change.
        v: u64,
    },
    /// A user's last socket in a group has been gone `leave_delay_ms`, or
    /// its node died.
    Leave {
        /// The group.
        group: Option<Arc<str>>,
        /// The user.
        user: Arc<str>,
        /// The group's version after the change.
        v: u64,
    },
    /// A user's first socket anywhere.
    Online(Arc<str>),
    /// A user's last socket anywhere is gone (after the delay, or with its
    /// node).
    Offline(Arc<str>),
}

/// What a write did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Written {
    /// Applied; the cluster-wide transitions it caused (none when silent).
    Applied(Vec<Change>),
    /// Nothing applied: the store was emptied since this node last looked
    /// (a Redis restart). The node writes everything it holds again,
    /// silently.
    Emptied,
}

/// Something the store tells one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    /// A join (`joined`) or leave in a group this node holds something in:
    /// a frame for its opted-in sockets of that group.
    Member {
        /// Join (true) or leave.
        joined: bool,
        /// The group.
        group: Option<Arc<str>>,
        /// The user.
        user: Arc<str>,
        /// The group's version after the change.
        v: u64,
    },
    /// Close this node's socket `id`: a newer socket of its user took its
    /// place (the per-user limit).
    Replace(u64),
    /// A group that had more than `max_members_events` members (and sent
    /// no join or leave frames) is back at that size: its whole list, a
    /// `wshub.presence` snapshot for this node's opted-in sockets of it.
    Snapshot(GroupView),
}

/// What the node gives the store to report to.
pub trait Sink: Send + Sync + 'static {
    /// A [`Control`] item for this node, in the order the store made them.
    fn control(&self, item: Control);
    /// The store lost what this node holds (`silent`: Redis restarted
    /// empty, nothing it had is an event) or swept it (this node missed
    /// its lease and came back): write everything again.
    fn restore(&self, silent: bool);
    /// This node swept a dead node's holdings; these transitions are its
    /// to report.
    fn swept(&self, changes: Vec<Change>);
    /// Whether this node reports what it sweeps (presence is on here). One
    /// that does not (the per-user limit alone, while presence is enabled
    /// node by node) sweeps a dead node only once the nodes that do had
    /// time to, or its users' leave and offline events would be lost.
    fn reports(&self) -> bool {
        true
    }
    /// Whether this node also posts what it reports to a backend
    /// (`backend.events`). One that does not sweeps a dead node only once
    /// a live node that does had time to, when there is one.
    fn posts_events(&self) -> bool {
        true
    }
}

/// One member of a group, as the API and the snapshot show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Member {
    /// The user.
    #[serde(rename = "userId")]
    pub user_id: String,
    /// Its open sockets in the group across the cluster (0: gone less
    /// than `leave_delay_ms` ago).
    pub connections: u64,
}

/// A group's members, as `GET /api/presence/groups/{G}` and the
/// `wshub.presence` snapshot show them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GroupView {
    /// The group (`null`: the null group).
    pub group: Option<String>,
    /// Sorted by user id.
    pub members: Vec<Member>,
    /// Grows with every change of the group's set.
    pub v: u64,
}

/// A user, as `GET /api/presence/users` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct UserView {
    /// Held by a live node (its last socket may have closed less than
    /// `leave_delay_ms` ago).
    pub online: bool,
    /// Its open sockets across the cluster.
    pub connections: u64,
}

/// The answer of a store call.
pub type Answer<'a, T> = Pin<Box<dyn Future<Output = Result<T, BusError>> + Send + 'a>>;

/// A presence store; see the module docs. Every call is bounded by
/// `redis.command_timeout_ms` and fails with [`BusError::Unavailable`]
/// when Redis cannot be reached.
pub trait Store: Send + Sync + 'static {
    /// Starts reporting to `sink` (control items, restores, sweeps). Once.
    fn start(&self, sink: Weak<dyn Sink>);

    /// Applies `ops` for this node, atomically per op; `silent` reports no
    /// transitions and sends no frames (a restore).
    fn write<'a>(&'a self, ops: &'a [Op], silent: bool) -> Answer<'a, Written>;

    /// The per-user limit: records socket `id` of `user` unless the user
    /// already holds `max` sockets on live nodes; then, with `refuse`,
    /// records nothing and answers false; otherwise the oldest are
    /// replaced ([`Control::Replace`] to their nodes) and it answers true.
    fn admit<'a>(&'a self, user: &'a str, id: u64, max: usize, refuse: bool) -> Answer<'a, bool>;

    /// A group's members on live nodes.
    ///
    /// `for_socket`: a socket's `wshub.presence` asks (it keeps a list from
    /// frames from then on), not the API.
    fn group<'a>(&'a self, group: Option<&'a str>, for_socket: bool) -> Answer<'a, GroupView>;

    /// Users, in the order asked.
    fn users<'a>(&'a self, ids: &'a [String]) -> Answer<'a, Vec<UserView>>;
}
