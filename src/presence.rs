//! Cluster presence, the node's side (contract: `reference/presence.md`,
//! `docs/presence.md`): who holds a socket here, what is written to the
//! store about it and when, the opt-in socket protocol (`presence=1`,
//! `wshub.presence`, `wshub.join` / `wshub.leave`), the backend's
//! `wshub.online` / `wshub.offline` / `wshub.join` / `wshub.leave`, and
//! the per-user limit (`limits.max_connections_per_user`). The store's side
//! is [`crate::bus::presence`].
//!
//! # What is written, and when
//!
//! The node counts its sockets per (group, user) and per user. A count
//! that changes marks its [`Holding`] dirty; one task, the writer, writes
//! what changed in one script call per batch (everything that changed
//! while the previous call ran goes in the next). A count that falls to 0
//! is written as 0 at once (the user is still listed, with no
//! connections) and removed `presence.leave_delay_ms` later unless a
//! socket came back meanwhile: a page that reloads, or a socket that drops
//! and reconnects to this node, costs nothing and causes no event, and
//! one that reconnects to another node causes none either (the holding
//! there appears before this one goes). Idle sockets cost nothing: the
//! writer sleeps until a count changes or a delay runs out.
//!
//! **Restores.** When the store says it lost what this node holds (a Redis
//! restart, or a sweep after this node missed its lease), the writer
//! writes every holding again: silently after a restart (nobody came or
//! went), with events after a sweep (the sweep announced leaves).
//! Transitions that happened while Redis was away are not announced.
//!
//! # The socket protocol
//!
//! A socket that opted in (`presence=1` on its URL, presence on) may send
//! `{"action":"wshub.presence"}`; it gets its group's members back, to
//! itself only ([`snapshot_frame`]), read from the store (one request at
//! a time per socket; more while one is out are answered by it). It also
//! receives `wshub.join` and `wshub.leave` frames for its group, pushed to
//! every node holding something in the group by the script that decided
//! the transition, in the order of the group's `v`: a client applies
//! events with a `v` above its snapshot's. Other sockets see nothing new:
//! `wshub.presence` from them is a reserved action, refused as before.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::bus::BusError;
use crate::bus::presence::{
    Change, Control, GroupView, Holding, Op, Sink, Store, UserView, Written,
};
use crate::config::{Config, PerUserPolicy};
use crate::conn::{Conn, ConnId};
use crate::hub::Hub;
use crate::message::{Frame, Message, error_frame};
use crate::metrics::Metrics;
use crate::outcome::CloseReason;
use crate::route::Identity;
use crate::shutdown::Shutdown;

/// The socket URL's query parameter that opts a socket in (`presence=1`).
pub const QUERY_PARAMETER: &str = "presence";
/// The action a socket sends to ask for its group's members, and the
/// action of the answer.
pub const ACTION_PRESENCE: &str = "wshub.presence";
/// A user's first socket in a group appeared (socket frame and backend
/// event).
pub const ACTION_JOIN: &str = "wshub.join";
/// A user's last socket in a group has been gone `leave_delay_ms`, or its
/// node died (socket frame and backend event).
pub const ACTION_LEAVE: &str = "wshub.leave";
/// A user's first socket anywhere (backend event).
pub const ACTION_ONLINE: &str = "wshub.online";
/// A user's last socket anywhere is gone (backend event).
pub const ACTION_OFFLINE: &str = "wshub.offline";

/// Most ops in one script call.
const MAX_OPS: usize = 256;

/// Whether the `presence` parameter's value opts a socket in.
pub fn opts_in(value: Option<&str>) -> bool {
    matches!(value, Some("1" | "true"))
}

/// Who reports transitions to the backend (the node).
pub(crate) trait Announce: Send + Sync + 'static {
    /// Posts the event `action` for `who` (user, and group for join and
    /// leave).
    fn announce(&self, who: &Identity, action: &'static str);

    /// Whether [`announce`](Self::announce) reaches a backend
    /// (`backend.events` on).
    fn posts_events(&self) -> bool;
}

/// The snapshot a socket receives for `{"action":"wshub.presence"}`.
pub fn snapshot_frame(view: &GroupView) -> Frame {
    let message = serde_json::to_string(view).unwrap_or_default();
    Message {
        group_id: view.group.as_deref().map(Cow::Borrowed),
        action: Some(Cow::Borrowed(ACTION_PRESENCE)),
        message: Some(Cow::Owned(message)),
        ..Message::default()
    }
    .encode()
}

/// A `wshub.join` or `wshub.leave` frame.
pub fn member_frame(joined: bool, group: Option<&str>, user: &str, v: u64) -> Frame {
    let message = serde_json::json!({ "userId": user, "v": v }).to_string();
    Message {
        group_id: group.map(Cow::Borrowed),
        action: Some(Cow::Borrowed(if joined {
            ACTION_JOIN
        } else {
            ACTION_LEAVE
        })),
        message: Some(Cow::Owned(message)),
        ..Message::default()
    }
    .encode()
}

/// Why a socket may not open.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AdmitError {
    /// The user holds `limits.max_connections_per_user` sockets and the
    /// policy is `refuse`.
    #[error(
        "too many connections for this user: at most {0} across the cluster (limits.max_connections_per_user)"
    )]
    UserLimit(usize),
    /// The limit could not be checked: Redis is unreachable.
    #[error(transparent)]
    Bus(#[from] BusError),
}

#[derive(Debug, Default)]
struct Count {
    n: u32,
    /// When `n` fell to 0.
    zero_since: Option<Instant>,
}

struct Opted {
    conn: Arc<Conn>,
    /// A snapshot request is out.
    asking: Arc<AtomicBool>,
}

#[derive(Default)]
struct State {
    counts: HashMap<Holding, Count>,
    dirty: HashSet<Holding>,
    /// Holdings whose count fell to 0, with when their delay runs out, in
    /// that order (the delay is the same for all).
    lingering: VecDeque<(Instant, Holding)>,
    /// The per-user limit: this node's sockets (user, opened at in ms
    /// since the Unix epoch), written again on a restore.
    sockets: HashMap<ConnId, (Arc<str>, u64)>,
    /// The per-user limit: sockets that closed, to remove.
    gone: Vec<(Arc<str>, ConnId)>,
    /// Sockets that opted in, by group.
    opted: HashMap<Option<Arc<str>>, HashMap<ConnId, Opted>>,
    /// A restore is due (`true`: silent).
    restore: Option<bool>,
}

/// What the writer sends next.
struct Plan {
    ops: Vec<Op>,
    silent: bool,
    restoring: bool,
}

/// A written count the writer cannot be sure of (the call failed or timed
/// out, perhaps after Redis ran it): whatever is wanted is written again.
const UNKNOWN: u32 = u32::MAX;

/// The node's presence; see the module docs. Exists when presence or the
/// per-user limit is on (both need Redis).
/// A socket [`Presence::admit`] asked Redis to record, until the answer
/// is read: dropped with the socket still in it, it is forgotten again.
struct Unanswered<'a> {
    presence: &'a Presence,
    socket: Option<(Arc<str>, ConnId)>,
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        if let Some((user, id)) = self.socket.take() {
            self.presence.forget_socket(user, id);
        }
    }
}

/// How long a node back from missing its lease waits before it writes its
/// presence again: long enough for the closes that arrived during a stall
/// to be read, short next to any lease.
const RESTORE_SETTLE: Duration = Duration::from_millis(250);

pub(crate) struct Presence {
    store: Arc<dyn Store>,
    /// `presence.enabled`: group and user holdings are kept (otherwise
    /// only the per-user limit's sockets).
    enabled: bool,
    limit: Option<(usize, PerUserPolicy)>,
    leave_delay: Duration,
    /// How long the writer waits after a failed write.
    retry: Duration,
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    announce: OnceLock<Weak<dyn Announce>>,
    /// `std::sync::Mutex`: a few map operations per connect, disconnect and
    /// batch; never held across an await, nothing logged or offered while
    /// held.
    state: Mutex<State>,
    wake: Notify,
    shutdown: Shutdown,
}

impl Presence {
    /// Starts presence on `store` (writer task on `shutdown`), or `None`
    /// when neither presence nor the per-user limit is on.
    pub(crate) fn start(
        store: Option<Arc<dyn Store>>,
        config: &Config,
        hub: Arc<Hub>,
        metrics: Arc<Metrics>,
        shutdown: Shutdown,
    ) -> Option<Arc<Self>> {
        let limits = &config.limits;
        let limit = (limits.max_connections_per_user > 0)
            .then_some((limits.max_connections_per_user, limits.per_user_policy));
        if !config.presence.enabled && limit.is_none() {
            return None;
        }
        let store = store?;
        let presence = Arc::new(Self {
            store,
            enabled: config.presence.enabled,
            limit,
            leave_delay: config.presence.leave_delay,
            retry: config.presence.heartbeat.min(Duration::from_millis(500)),
            hub,
            metrics,
            announce: OnceLock::new(),
            state: Mutex::default(),
            wake: Notify::new(),
            shutdown,
        });
        let sink: Weak<dyn Sink> = Arc::downgrade(&presence) as Weak<dyn Sink>;
        presence.store.start(sink);
        presence.shutdown.spawn(presence.clone().write_loop());
        Some(presence)
    }

    /// Who reports transitions to the backend; set once.
    pub(crate) fn announce_to(&self, to: Weak<dyn Announce>) {
        let _ = self.announce.set(to);
    }

    /// Whether presence itself is on (not only the per-user limit).
    pub(crate) fn enabled(&self) -> bool {
        self.enabled
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Counts and maps stay consistent if a holder panicked.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn holdings(&self, who: &Identity) -> Vec<Holding> {
        if !self.enabled {
            return Vec::new();
        }
        vec![
            Holding::Group {
                group: who.group.clone(),
                user: who.user.clone(),
            },
            Holding::User(who.user.clone()),
        ]
    }

    /// The per-user limit, checked before a socket opens: records the
    /// socket cluster-wide, replacing the user's oldest ones or refusing
    /// it per the policy.
    pub(crate) async fn admit(&self, conn: &Conn) -> Result<(), AdmitError> {
        let Some((max, policy)) = self.limit else {
            return Ok(());
        };
        let refuse = policy == PerUserPolicy::Refuse;
        // Until Redis answers, the socket may be recorded: forgotten
        // again if the answer is an error or never read. A client that
        // resets its connection mid-upgrade drops this future at the
        // await; the record it left held one of the user's places for
        // as long as the node ran (review of 2026-12-03: three aborted
        // handshakes, the user refused with 429 everywhere while online
        // nowhere).
        let mut pending = Unanswered {
            presence: self,
            socket: Some((conn.who.user.clone(), conn.id)),
        };
        let answer = self.store.admit(&conn.who.user, conn.id, max, refuse).await;
        match answer {
            Ok(true) => {
                pending.socket = None;
                Ok(())
            }
            Ok(false) => {
                // Refused: nothing was recorded.
                pending.socket = None;
                Err(AdmitError::UserLimit(max))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Records that a socket's place in its user's count may be held in
    /// Redis by mistake: the next flush removes it.
    fn forget_socket(&self, user: Arc<str>, id: ConnId) {
        self.lock().gone.push((user, id));
        self.wake.notify_one();
    }

    /// A socket opened (after [`admit`](Self::admit)); `opted_in`: it
    /// asked for presence frames.
    pub(crate) fn connected(&self, conn: &Arc<Conn>, opted_in: bool) {
        let holdings = self.holdings(&conn.who);
        {
            let mut state = self.lock();
            for holding in holdings {
                let count = state.counts.entry(holding.clone()).or_default();
                count.n += 1;
                count.zero_since = None;
                state.dirty.insert(holding);
            }
            if self.limit.is_some() {
                state
                    .sockets
                    .insert(conn.id, (conn.who.user.clone(), crate::bus::wire::now_ms()));
            }
            if opted_in && self.enabled {
                state
                    .opted
                    .entry(conn.who.group.clone())
                    .or_default()
                    .insert(
                        conn.id,
                        Opted {
                            conn: conn.clone(),
                            asking: Arc::default(),
                        },
                    );
            }
        }
        self.wake.notify_one();
    }

    /// A socket that [`connected`](Self::connected) closed.
    pub(crate) fn disconnected(&self, conn: &Conn) {
        let holdings = self.holdings(&conn.who);
        let now = Instant::now();
        {
            let mut state = self.lock();
            for holding in holdings {
                let Some(count) = state.counts.get_mut(&holding) else {
                    continue;
                };
                count.n = count.n.saturating_sub(1);
                if count.n == 0 {
                    count.zero_since = Some(now);
                    state
                        .lingering
                        .push_back((now + self.leave_delay, holding.clone()));
                }
                state.dirty.insert(holding);
            }
            if let Some((user, _)) = state.sockets.remove(&conn.id) {
                state.gone.push((user, conn.id));
            }
            if let Some(members) = state.opted.get_mut(&conn.who.group) {
                members.remove(&conn.id);
                if members.is_empty() {
                    state.opted.remove(&conn.who.group);
                }
            }
        }
        self.wake.notify_one();
    }

    /// A socket sent `{"action":"wshub.presence"}`: answers it with its
    /// group's snapshot, later, if it opted in. Returns false when it did
    /// not (the message is then refused as any reserved action).
    pub(crate) fn request(self: &Arc<Self>, conn: &Arc<Conn>) -> bool {
        let asking = {
            let state = self.lock();
            state
                .opted
                .get(&conn.who.group)
                .and_then(|members| members.get(&conn.id))
                .map(|o| o.asking.clone())
        };
        let Some(asking) = asking else {
            return false;
        };
        if asking.swap(true, Ordering::AcqRel) {
            // The answer on its way is read after this request arrived.
            return true;
        }
        let (me, conn) = (self.clone(), conn.clone());
        self.shutdown.spawn(async move {
            let answer = me.store.group(conn.who.group.as_deref(), true).await;
            asking.store(false, Ordering::Release);
            match answer {
                Ok(view) => conn.offer(snapshot_frame(&view)),
                Err(e) => conn.offer(error_frame(&format!("presence not available: {e}"))),
            };
        });
        true
    }

    /// `GET /api/presence/groups/{G}`.
    pub(crate) async fn group(&self, group: Option<&str>) -> Result<GroupView, BusError> {
        self.store.group(group, false).await
    }

    /// `GET /api/presence/users`.
    pub(crate) async fn users(&self, ids: &[String]) -> Result<Vec<UserView>, BusError> {
        self.store.users(ids).await
    }

    /// Counts and posts transitions this node is the one to report.
    fn report(&self, changes: Vec<Change>) {
        let announce = self.announce.get().and_then(Weak::upgrade);
        for change in changes {
            let (kind, action, who) = match change {
                Change::Join { group, user, .. } => ("join", ACTION_JOIN, Identity { user, group }),
                Change::Leave { group, user, .. } => {
                    ("leave", ACTION_LEAVE, Identity { user, group })
                }
                Change::Online(user) => ("online", ACTION_ONLINE, Identity { user, group: None }),
                Change::Offline(user) => {
                    ("offline", ACTION_OFFLINE, Identity { user, group: None })
                }
            };
            self.metrics.presence_event(kind);
            if let Some(announce) = &announce {
                announce.announce(&who, action);
            }
        }
    }

    /// The writer: writes what changed until the node stops.
    async fn write_loop(self: Arc<Self>) {
        let stop = self.shutdown.token().clone();
        let mut written: HashMap<Holding, u32> = HashMap::new();
        let mut failing = false;
        loop {
            let next_due = self.lock().lingering.front().map(|(due, _)| *due);
            let lingering = async {
                match next_due {
                    Some(due) => tokio::time::sleep_until(due).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                () = stop.cancelled() => return,
                () = self.wake.notified() => {}
                () = lingering => {}
            }
            if self.lock().restore == Some(false) {
                // Back from a stall (the process stopped, its machine
                // frozen): the closes that arrived meanwhile are read in
                // the first moments after it. The restore writes what is
                // held after them, not sockets already gone (review of
                // 2026-12-03: a SIGSTOPped node announced users whose
                // sockets had closed during the stop).
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(RESTORE_SETTLE) => {}
                }
            }
            loop {
                let plan = self.plan(&mut written);
                if plan.ops.is_empty() {
                    break;
                }
                match self.send(plan, &mut written).await {
                    Ok(()) => {
                        if std::mem::take(&mut failing) {
                            info!("presence writes to Redis work again");
                        }
                    }
                    Err(error) => {
                        if !std::mem::replace(&mut failing, true) {
                            warn!(%error, "presence write to Redis failed; retrying (logged once per outage)");
                        }
                        tokio::select! {
                            () = stop.cancelled() => return,
                            () = tokio::time::sleep(self.retry) => {}
                        }
                    }
                }
            }
        }
    }

    /// What to write now: due delays, a restore, and every dirty holding
    /// whose wanted value differs from what was written.
    fn plan(&self, written: &mut HashMap<Holding, u32>) -> Plan {
        let now = Instant::now();
        let mut state = self.lock();
        while state.lingering.front().is_some_and(|(due, _)| *due <= now) {
            if let Some((_, holding)) = state.lingering.pop_front() {
                state.dirty.insert(holding);
            }
        }
        let mut ops = Vec::new();
        let restore = state.restore.take();
        if restore.is_some() {
            // Everything is written again; what was written and is no
            // longer wanted is removed.
            for (holding, _) in written.iter_mut() {
                state.dirty.insert(holding.clone());
            }
            for value in written.values_mut() {
                *value = UNKNOWN;
            }
            let held: Vec<Holding> = state.counts.keys().cloned().collect();
            state.dirty.extend(held);
            ops.extend(
                state
                    .sockets
                    .iter()
                    .map(|(id, (user, since_ms))| Op::SocketHeld {
                        user: user.clone(),
                        id: *id,
                        since_ms: *since_ms,
                        max: self.limit.map_or(0, |(max, _)| max),
                    }),
            );
        }
        let dirty = std::mem::take(&mut state.dirty);
        let mut sets = Vec::new();
        for holding in dirty {
            let wanted = match state.counts.get(&holding) {
                Some(count) if count.n > 0 => Some(count.n),
                Some(count)
                    if count
                        .zero_since
                        .is_some_and(|since| since + self.leave_delay > now) =>
                {
                    Some(0)
                }
                Some(_) => {
                    state.counts.remove(&holding);
                    None
                }
                None => None,
            };
            if wanted != written.get(&holding).copied() {
                sets.push((holding, wanted));
            }
        }
        // A user's events in the order they happen: `online` before its
        // `join`s, `leave`s before its `offline`. The holdings come out of
        // a set in any order, and so did the events (review of
        // 2026-12-02: one user's `offline` before its `leave`, another's
        // after).
        sets.sort_by_key(|(holding, wanted)| match (holding, wanted) {
            (Holding::User(_), Some(_)) => 0,
            (Holding::Group { .. }, _) => 1,
            (Holding::User(_), None) => 2,
        });
        ops.extend(
            sets.into_iter()
                .map(|(holding, wanted)| Op::Set(holding, wanted)),
        );
        ops.extend(
            state
                .gone
                .drain(..)
                .map(|(user, id)| Op::SocketGone { user, id }),
        );
        Plan {
            ops,
            silent: restore == Some(true),
            restoring: restore.is_some(),
        }
    }

    /// Sends a plan in batches; on failure what was not confirmed is
    /// written again later.
    async fn send(&self, plan: Plan, written: &mut HashMap<Holding, u32>) -> Result<(), BusError> {
        let mut batches = plan.ops.chunks(MAX_OPS);
        while let Some(batch) = batches.next() {
            match self.store.write(batch, plan.silent).await {
                Ok(Written::Applied(changes)) => {
                    for op in batch {
                        if let Op::Set(holding, wanted) = op {
                            match wanted {
                                Some(n) => written.insert(holding.clone(), *n),
                                None => written.remove(holding),
                            };
                        }
                    }
                    if !changes.is_empty() {
                        debug!(transitions = changes.len(), "presence transitions");
                    }
                    self.report(changes);
                }
                Ok(Written::Emptied) => {
                    // Redis restarted: write everything again, silently.
                    self.lock().restore = Some(true);
                    return Ok(());
                }
                Err(error) => {
                    let mut state = self.lock();
                    for op in batch.iter().chain(batches.flatten()) {
                        match op {
                            Op::Set(holding, _) => {
                                written.insert(holding.clone(), UNKNOWN);
                                state.dirty.insert(holding.clone());
                            }
                            Op::SocketGone { user, id } => state.gone.push((user.clone(), *id)),
                            Op::SocketHeld { .. } => {}
                        }
                    }
                    if plan.restoring {
                        let silent = state.restore.unwrap_or(plan.silent) || plan.silent;
                        state.restore = Some(silent);
                    }
                    return Err(error);
                }
            }
        }
        Ok(())
    }

    /// Offers the frame `make` builds (once) to this node's opted-in
    /// sockets of `group`.
    fn offer_opted(&self, group: &Option<Arc<str>>, make: impl FnOnce() -> Frame) {
        let conns: Vec<Arc<Conn>> = {
            let state = self.lock();
            state
                .opted
                .get(group)
                .map(|members| members.values().map(|o| o.conn.clone()).collect())
                .unwrap_or_default()
        };
        if conns.is_empty() {
            return;
        }
        let frame = make();
        for conn in conns {
            conn.offer(frame.clone());
        }
    }
}

impl Sink for Presence {
    fn control(&self, item: Control) {
        match item {
            Control::Member {
                joined,
                group,
                user,
                v,
            } => {
                self.offer_opted(&group, || member_frame(joined, group.as_deref(), &user, v));
            }
            Control::Replace(id) => {
                if let Some(conn) = self.hub.get(id) {
                    conn.closer.close(CloseReason::SessionReplaced);
                }
            }
            Control::Snapshot(view) => {
                let group: Option<Arc<str>> = view.group.as_deref().map(Into::into);
                self.offer_opted(&group, || snapshot_frame(&view));
            }
        }
    }

    fn restore(&self, silent: bool) {
        {
            let mut state = self.lock();
            let before = state.restore.unwrap_or(false);
            state.restore = Some(before || silent);
        }
        self.wake.notify_one();
    }

    fn swept(&self, changes: Vec<Change>) {
        self.report(changes);
    }

    fn reports(&self) -> bool {
        self.enabled
    }

    fn posts_events(&self) -> bool {
        self.enabled
            && self
                .announce
                .get()
                .and_then(Weak::upgrade)
                .is_some_and(|a| a.posts_events())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::presence::Member;

    #[test]
    fn frames_have_the_contract_shape() {
        let view = GroupView {
            group: Some("chat".into()),
            members: vec![Member {
                user_id: "ann".into(),
                connections: 2,
            }],
            v: 12,
        };
        assert_eq!(
            snapshot_frame(&view).as_str(),
            r#"{"userId":null,"groupId":"chat","action":"wshub.presence","message":"{\"group\":\"chat\",\"members\":[{\"userId\":\"ann\",\"connections\":2}],\"v\":12}","recipients":[]}"#
        );
        let null = GroupView {
            group: None,
            members: vec![],
            v: 0,
        };
        assert_eq!(
            snapshot_frame(&null).as_str(),
            r#"{"userId":null,"groupId":null,"action":"wshub.presence","message":"{\"group\":null,\"members\":[],\"v\":0}","recipients":[]}"#
        );
        assert_eq!(
            member_frame(true, Some("chat"), "ann", 13).as_str(),
            r#"{"userId":null,"groupId":"chat","action":"wshub.join","message":"{\"userId\":\"ann\",\"v\":13}","recipients":[]}"#
        );
        assert!(
            member_frame(false, None, "bob", 14)
                .as_str()
                .contains(r#""action":"wshub.leave""#)
        );
    }

    #[test]
    fn only_one_and_true_opt_in() {
        assert!(opts_in(Some("1")) && opts_in(Some("true")));
        assert!(!opts_in(None) && !opts_in(Some("0")) && !opts_in(Some("")));
    }
}
