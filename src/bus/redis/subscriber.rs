//! The subscriber task: one pub/sub connection (per shard on a cluster)
//! holding exactly the topics this node's sockets need, the probes that
//! prove it delivers, and the reconnect that subscribes again exactly what
//! is held. With history on it also delivers this node's own messages and
//! repairs gaps in each topic's positions (`gaps.rs`).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use axum::body::Bytes;
use tracing::debug;

use super::bans;
use super::conn::slot_of;
use super::conn::{
    self, Backoff, Incoming, Link, PubConn, SubConn, connect_prober, connect_subscriber,
};
use super::control::glob_escape;
use super::gaps::{Step, Tracks};
use super::history::Want;
use super::renewal::Renewals;
use super::{LAG_LOG_EVERY, MAX_SUBSCRIBE_BATCH, PROBE_SEARCH, Shared, SubscribeRequest};
use crate::bus::BusError;
use crate::bus::wire;
use crate::envelope::Envelope;
use crate::history::Position;
use crate::metrics::GapKind;
use crate::outcome::DropReason;
use crate::route::Topic;

/// The probe channels of this node: one on a single server; on a cluster one
/// per slot range, so every shard's subscription is checked.
async fn probe_channels(shared: &Shared, prober: &mut PubConn) -> redis::RedisResult<Vec<String>> {
    let Some(ranges) = prober.shard_ranges().await? else {
        return Ok(vec![shared.probe_channel.clone()]);
    };
    let mut channels = Vec::new();
    for (start, end) in ranges {
        let found = (0..PROBE_SEARCH)
            .map(|i| format!("{}:{i}", shared.probe_channel))
            .find(|c| (start..=end).contains(&slot_of(c)));
        match found {
            Some(c) => channels.push(c),
            None => warn!(
                start,
                end, "no probe channel found for a slot range; it is not probed"
            ),
        }
    }
    if channels.is_empty() {
        channels.push(shared.probe_channel.clone());
    }
    channels.sort();
    channels.dedup();
    Ok(channels)
}

/// What a successful connect attempt produced: the connections, the probe
/// channels, and exactly the topics that were subscribed.
struct Connected {
    conn: SubConn,
    prober: PubConn,
    probes: Vec<String>,
    subscribed: HashSet<Topic>,
}

async fn connect(shared: &Shared, link: &Link) -> redis::RedisResult<Connected> {
    let config = &shared.config;
    let mut conn = connect_subscriber(link, config).await?;
    let mut prober = connect_prober(link, config).await?;
    if let Some(why) = prober.unfit().await {
        return Err(redis::RedisError::from((
            redis::ErrorKind::InvalidClientConfig,
            "unfit Redis server",
            why,
        )));
    }
    let probes = probe_channels(shared, &mut prober).await?;
    // One snapshot, used both to subscribe and to record what is
    // subscribed. A topic taken while this attempt is in flight is not in
    // it: its request waits in the queue and is served once connected.
    // (Two snapshots once made such a topic look subscribed when it was
    // not: acked, and silently deaf until it was released.)
    let held = shared.interest.held();
    let mut channels = probes.clone();
    // This node instance's own channel: messages to its connections and
    // control orders for them, for as long as it lives.
    channels.push(shared.node_channel.clone());
    if !config.sharded {
        channels.push(shared.bans_channel.clone());
    }
    channels.extend(held.iter().map(|t| shared.channels.of(t)));
    for chunk in channels.chunks(MAX_SUBSCRIBE_BATCH) {
        conn.subscribe(chunk).await?;
    }
    Ok(Connected {
        conn,
        prober,
        probes,
        subscribed: held.into_iter().collect(),
    })
}

/// The subscriber task's state across connections: its requests, its
/// backoff, and what it logged already.
pub(super) struct Subscriber {
    shared: Arc<Shared>,
    link: Link,
    requests: mpsc::Receiver<SubscribeRequest>,
    stop: CancellationToken,
    /// The bus's tracker, for the probes it sends off this task.
    tasks: TaskTracker,
    backoff: Backoff,
    connected_before: bool,
    /// Whether the current outage was logged already.
    outage_logged: bool,
    /// Sharded: why no shard could be reached, when the cluster client
    /// does not say (`conn::why_no_shard`), and when that was asked.
    why_no_shard: Option<(Instant, Option<String>)>,
    /// When dropped pushes were last logged.
    lag_logged: Option<Instant>,
    /// History on: each subscribed topic's last position (`gaps.rs`).
    tracks: Tracks,
    /// When an unrepairable gap was last logged.
    gap_logged: Option<Instant>,
    /// History on: topics being started afresh after a copy from a node
    /// without history (`renewal.rs`).
    renewals: Renewals,
    /// History on: the catch-up after the last resubscribe failed (a shard
    /// that just restarted answers `CLUSTERDOWN` for a while): when to try
    /// it again, and the pause after that.
    catch_up_retry: Option<(Instant, Duration)>,
}

/// Sharded: what the last checks of the subscriptions Redis holds found
/// ([`SubConn::shard_subscriptions`](super::conn::SubConn::shard_subscriptions)).
#[derive(Default)]
struct HeldCheck {
    /// How many checks in a row found fewer than were subscribed.
    short: u32,
    /// What the last short one found: held, and subscribed.
    held: usize,
    want: usize,
}

/// Checks in a row that must find subscriptions missing before the
/// connection is given up: one may race a slot migration's resubscribe or
/// an unsubscribe.
const SHORT_CHECKS: u32 = 2;

/// One live subscriber connection: the connections, the probe channels and
/// when each last came back, and exactly the topics subscribed on it.
struct Live {
    conn: SubConn,
    prober: PubConn,
    probes: Vec<String>,
    probe_set: HashSet<String>,
    probe_seen: HashMap<String, Duration>,
    subscribed: HashSet<Topic>,
    connected_at: Duration,
    /// With Sentinel: the primary this connection is on, checked against
    /// the sentinels at every probe.
    sentinel_server: Option<redis::ConnectionAddr>,
    /// Set by a probe task when the sentinels name another primary.
    moved: Arc<AtomicBool>,
    /// Single server: set by a probe task when the server is no longer
    /// fit ([`PubConn::unfit`]): a primary demoted to a replica keeps its
    /// clients connected, so the check at connect alone never saw it
    /// (review of 2026-12-03: the node stayed ready while its messages
    /// reached no other node).
    unfit: Arc<std::sync::Mutex<Option<String>>>,
    /// Sharded: set by the check tasks that count what Redis holds.
    held: Arc<std::sync::Mutex<HeldCheck>>,
    /// Bumped whenever `subscribed` changes: a count that raced a change
    /// (an unsubscribe taking effect while it ran) says nothing and is
    /// dropped, so churn of topics never looks like lost subscriptions.
    changes: Arc<AtomicU64>,
}

/// The longest pause between tries of a failed catch-up after a
/// resubscribe.
const MAX_CATCH_UP_PAUSE: Duration = Duration::from_secs(5);

/// What ended a live connection: why, to log it.
type Lost = String;

impl Subscriber {
    pub(super) fn new(
        shared: Arc<Shared>,
        link: Link,
        requests: mpsc::Receiver<SubscribeRequest>,
        stop: CancellationToken,
        tasks: TaskTracker,
    ) -> Self {
        let backoff = Backoff::new(shared.config.reconnect_max);
        Self {
            shared,
            link,
            requests,
            stop,
            tasks,
            backoff,
            connected_before: false,
            outage_logged: false,
            why_no_shard: None,
            lag_logged: None,
            tracks: Tracks::default(),
            gap_logged: None,
            renewals: Renewals::default(),
            catch_up_retry: None,
        }
    }

    /// Connects, serves the connection until it is lost, and again, until
    /// the bus stops.
    pub(super) async fn run(mut self) {
        loop {
            let Some(mut live) = self.connect().await else {
                return;
            };
            // Only now: every ban from here on arrives as a push.
            self.load_bans(&live);
            if self.shared.history.is_some() {
                self.after_resubscribe(&live).await;
            }
            let Some(lost) = self.serve(&mut live).await else {
                return;
            };
            self.set_down_because(&lost);
            // New references wait for the resubscribe from here on, and
            // bans published meanwhile reach no mirror.
            self.shared.interest.clear_live();
            self.shared.bans.stale();
            self.shared.subscriber_up.store(false, Ordering::Release);
            self.shared.mark_down();
            self.shared.metrics.bus_subscriber_lost();
            warn!(reason = %lost, "lost the Redis subscriber connection; reconnecting");
        }
    }

    /// Connects and subscribes to everything this node holds, backing off
    /// between attempts; `None` once the bus stops.
    async fn connect(&mut self) -> Option<Live> {
        let shared = self.shared.clone();
        let config = &shared.config;
        let connected = loop {
            let attempt = timeout(config.command_timeout * 4, connect(&shared, &self.link));
            let error = tokio::select! {
                () = self.stop.cancelled() => return None,
                result = attempt => match result {
                    Ok(Ok(connected)) => break connected,
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => "timed out".to_owned(),
                },
            };
            // Asked at the first such failure of an outage (which may
            // follow others: a node started before its cluster), again
            // when the answer is older than `ASK_SHARDS_EVERY` (the fault
            // may have changed), and said only with such a failure (not
            // with a seed refusing the connection meanwhile).
            let error = if says_nothing_of_the_shards(&error) {
                if self
                    .why_no_shard
                    .as_ref()
                    .is_none_or(|(at, _)| at.elapsed() >= ASK_SHARDS_EVERY)
                {
                    let asked = timeout(
                        config.command_timeout * 4,
                        conn::why_no_shard(&self.link, config),
                    );
                    let found = tokio::select! {
                        () = self.stop.cancelled() => return None,
                        found = asked => found.ok().flatten(),
                    };
                    self.why_no_shard = Some((Instant::now(), found));
                }
                match self.why_no_shard.as_ref().and_then(|(_, why)| why.as_ref()) {
                    Some(why) => format!("{error}: {why}"),
                    None => error,
                }
            } else {
                error
            };
            self.set_down_because(&error);
            shared.mark_down();
            if !self.outage_logged {
                warn!(%error, "subscriber cannot reach Redis; retrying");
                self.outage_logged = true;
            }
            shared.metrics.bus_reconnect_attempt();
            let pause = self.backoff.step();
            if !self.refuse_requests_for(pause, &error).await {
                return None;
            }
        };
        self.backoff.reset();
        self.outage_logged = false;
        self.why_no_shard = None;
        // Ready again only once a probe has made the whole trip on the new
        // connection (and the publisher has followed to the new epoch).
        shared.last_probe.store(0, Ordering::Release);
        shared.epoch.bump();
        let Connected {
            conn,
            prober,
            probes,
            subscribed,
        } = connected;
        let live_server = conn.server.clone();
        shared.interest.set_live(&subscribed);
        shared.metrics.bus_channels(subscribed.len());
        shared.subscriber_up.store(true, Ordering::Release);
        // (Up for publishing only once a probe comes back: `on_incoming`.)
        info!(node = %shared.node_id, channels = subscribed.len(), probes = probes.len(), reconnect = self.connected_before, "subscribed to Redis");
        self.connected_before = true;
        Some(Live {
            conn,
            prober,
            probe_set: probes.iter().cloned().collect(),
            probes,
            probe_seen: HashMap::new(),
            subscribed,
            connected_at: shared.since_start(),
            sentinel_server: live_server.filter(|_| !config.sentinels.is_empty()),
            moved: Arc::new(AtomicBool::new(false)),
            unfit: Arc::default(),
            held: Arc::default(),
            changes: Arc::default(),
        })
    }

    /// Loads this node's copy of the bans (`bans.rs`), off this task, on
    /// the probe's connection: when the gate says every node publishes its
    /// bans, and the copy is neither good for that nor being loaded. Call
    /// it only once `P:bans` is subscribed on `live`.
    fn load_bans(&self, live: &Live) {
        let shared = &self.shared;
        if shared.config.sharded || !shared.gate.bans_pushed() {
            return;
        }
        let epoch = shared.gate.bans_epoch();
        let drops = live.conn.dropped_ever();
        let Some(basis) = shared.bans.begin_load(epoch, drops, Instant::now()) else {
            return;
        };
        let (shared, mut conn, stop) = (shared.clone(), live.prober.clone(), self.stop.clone());
        self.tasks.spawn(async move {
            let prefix = [shared.channels.prefix(), "ban:"].concat();
            let pattern = format!("{}*", glob_escape(&prefix));
            let limit = shared.config.command_timeout;
            let wanted = || {
                !stop.is_cancelled()
                    && shared.bans.loading(basis)
                    && shared.gate.bans_epoch() == epoch
            };
            // Redis restarted: the bans of this node's copy go back first
            // (where missing), so that the load reads them.
            match bans::run_id(&mut conn, limit).await {
                Ok(run) => {
                    let held = shared.bans.on_run(run, Instant::now());
                    if !held.is_empty() {
                        let channel = &shared.bans_channel;
                        match bans::restore(&mut conn, &prefix, channel, &held, limit).await {
                            Ok(0) => {}
                            Ok(n) => warn!(bans = n, "Redis lost bans (restarted without its data?): set them again from this node's copy"),
                            Err(why) => warn!(%why, "Redis lost bans, and setting them again failed"),
                        }
                    }
                }
                Err(why) if shared.bans.run_id_unreadable() => warn!(
                    %why,
                    "cannot read Redis's run_id (INFO): bans a Redis restart loses are not set again (said once until it can)"
                ),
                Err(_) => {}
            }
            match bans::load(&mut conn, &prefix, &pattern, limit, wanted).await {
                Ok((list, complete)) => {
                    if !complete {
                        warn!(
                            most = bans::MAX_BANS,
                            "more bans than a node keeps: ban checks of users it does not hold ask Redis"
                        );
                    }
                    shared
                        .bans
                        .finish_load(basis, list, complete, Instant::now());
                }
                Err(why) => {
                    let given_up = !wanted();
                    // Given up or failed, the next load waits (later and
                    // later: each scans the whole keyspace, and a node that
                    // keeps lagging must not keep starting them); a failure
                    // is logged once per run of them.
                    let failures = shared.bans.fail_load(basis, Instant::now());
                    if given_up {
                        debug!(%why, "a load of the bans was given up");
                    } else if failures == 1 {
                        warn!(%why, "cannot load the bans: ban checks ask Redis until they are loaded");
                    }
                }
            }
        });
    }

    /// Records why the subscriber is down, for `/readyz` (a wrong password
    /// or CA must be visible there, not only in the log).
    fn set_down_because(&self, why: &str) {
        why.clone_into(
            &mut self
                .shared
                .down_because
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        );
    }

    /// Answers subscription requests with `error` for `pause` (refused
    /// while disconnected rather than keeping sockets waiting); false once
    /// the bus stops.
    async fn refuse_requests_for(&mut self, pause: Duration, error: &str) -> bool {
        let pause = tokio::time::sleep(pause);
        tokio::pin!(pause);
        loop {
            tokio::select! {
                () = self.stop.cancelled() => return false,
                () = &mut pause => return true,
                Some(request) = self.requests.recv() => {
                    let _ = request.ack.send(Err(BusError::Unavailable(error.to_owned())));
                }
            }
        }
    }

    /// Serves one connection until it is lost (`Some(why)`) or the bus
    /// stops (`None`).
    async fn serve(&mut self, live: &mut Live) -> Option<Lost> {
        let config = &self.shared.config;
        let release_every =
            (self.shared.interest.release_delay() / 2).max(Duration::from_millis(50));
        let mut release = tokio::time::interval(release_every);
        let mut probe = tokio::time::interval(config.probe_interval);
        loop {
            let step = tokio::select! {
                () = self.stop.cancelled() => return None,
                incoming = live.conn.next() => self.on_incoming(live, incoming).await,
                Some(first) = self.requests.recv() => self.on_requests(live, first).await,
                _ = release.tick() => self.on_release(live).await,
                _ = probe.tick() => match self.on_probe(live) {
                    Ok(()) => {
                        self.retry_catch_up(live).await;
                        self.load_bans(live);
                        Ok(())
                    }
                    lost => lost,
                },
            };
            if let Err(lost) = step {
                return Some(lost);
            }
        }
    }

    /// Handles one push from the subscriber connection.
    async fn on_incoming(&mut self, live: &mut Live, incoming: Incoming) -> Result<(), Lost> {
        let shared = &self.shared;
        match incoming {
            Incoming::Message(channel, _) if live.probe_set.contains(&channel) => {
                live.probe_seen.insert(channel, shared.since_start());
                if live.probe_seen.len() == live.probe_set.len() {
                    let oldest = live.probe_seen.values().min().copied().unwrap_or_default();
                    shared
                        .last_probe
                        .store(oldest.as_millis() as u64 + 1, Ordering::Release);
                    shared.mark_up();
                }
            }
            Incoming::Message(channel, payload) if channel == shared.bans_channel => {
                match bans::parse_push(&payload) {
                    Ok((user, ttl)) => shared.bans.apply(user, ttl, Instant::now()),
                    Err(e) => {
                        shared.bans.stale();
                        shared.unreadable(&channel, &e.to_string());
                    }
                }
            }
            // Control payloads first: never messages, and never part of a
            // topic's positions.
            Incoming::Message(channel, payload) if wire::is_control(&payload) => {
                shared.control(&channel, &payload);
            }
            Incoming::Message(channel, payload) if channel == shared.node_channel => {
                shared.receive_direct(payload);
            }
            Incoming::Message(channel, payload) if shared.history.is_some() => {
                self.receive_tracked(&live.subscribed, &channel, payload)
                    .await;
            }
            Incoming::Message(channel, payload) => shared.receive(&channel, payload),
            Incoming::Unsubscribed(channels) => {
                // A shard gave these up (its slots moved): take back those
                // still wanted, at their new owner. The cluster client
                // refreshes its slot map on the MOVED reply the old owner
                // gives.
                let wanted: Vec<String> = channels
                    .into_iter()
                    .filter(|c| {
                        live.probe_set.contains(c)
                            || *c == shared.node_channel
                            || shared
                                .channels
                                .topic(c)
                                .is_some_and(|t| live.subscribed.contains(&t))
                    })
                    .collect();
                if !wanted.is_empty() {
                    info!(
                        channels = wanted.len(),
                        "Redis gave up subscriptions (slot migration); resubscribing"
                    );
                    // Not live until taken back: a socket connecting to one
                    // of these topics meanwhile waits for the resubscribe
                    // (its subscribe-before-101), as for a first subscribe.
                    let topics: Vec<Topic> = wanted
                        .iter()
                        .filter_map(|c| shared.channels.topic(c))
                        .collect();
                    shared.interest.unset_live(&topics);
                    let limit = shared.config.command_timeout * 2;
                    match timeout(limit, live.conn.subscribe(&wanted)).await {
                        Ok(Ok(())) => shared.interest.set_live(&topics),
                        Ok(Err(e)) => {
                            return Err(format!("resubscribing after a slot migration: {e}"));
                        }
                        Err(_) => {
                            return Err("resubscribing after a slot migration timed out".into());
                        }
                    }
                }
            }
            Incoming::Lagged(n) => {
                shared.metrics.dropped(DropReason::BusLagging, n);
                // A dropped push may be a ban.
                shared.bans.stale();
                // A dropped copy may be the one before a renewal.
                self.tracks.forget_renewals();
                // Once per episode, not per drop: a node that is behind must
                // not also flood its log.
                if self
                    .lag_logged
                    .is_none_or(|at: Instant| at.elapsed() > LAG_LOG_EVERY)
                {
                    warn!(
                        dropped = n,
                        "the subscriber fell behind Redis; messages were dropped (see wshub_messages_dropped_total{{reason=\"bus_lagging\"}})"
                    );
                    self.lag_logged = Some(Instant::now());
                }
            }
            Incoming::Other => {}
            Incoming::Closed => return Err("connection closed".into()),
        }
        Ok(())
    }

    /// Serves `first` and the requests queued behind it with one SUBSCRIBE.
    async fn on_requests(&mut self, live: &mut Live, first: SubscribeRequest) -> Result<(), Lost> {
        let shared = &self.shared;
        let mut batch = vec![first];
        while batch.len() < MAX_SUBSCRIBE_BATCH {
            match self.requests.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        let mut new: Vec<Topic> = batch
            .iter()
            .map(|r| r.topic.clone())
            .filter(|t| !live.subscribed.contains(t))
            .collect();
        new.sort();
        new.dedup();
        let names: Vec<String> = new.iter().map(|t| shared.channels.of(t)).collect();
        let result = if names.is_empty() {
            Ok(Ok(()))
        } else {
            timeout(shared.config.command_timeout, live.conn.subscribe(&names)).await
        };
        match result {
            Ok(Ok(())) => {
                if !names.is_empty() && !shared.config.sharded {
                    // What came before the SUBSCRIBE's reply first: a ban
                    // among it must be in the mirror before a connect
                    // waiting on this subscribe checks it (`bans.rs`).
                    for _ in 0..=live.conn.queued() {
                        let Some(incoming) = live.conn.try_next() else {
                            break;
                        };
                        if let Err(lost) = self.on_incoming(live, incoming).await {
                            for r in batch {
                                let _ = r.ack.send(Err(BusError::Unavailable(lost.clone())));
                            }
                            return Err(lost);
                        }
                    }
                }
                let shared = &self.shared;
                live.changes.fetch_add(1, Ordering::AcqRel);
                shared.interest.set_live(&new);
                live.subscribed.extend(new.iter().cloned());
                shared.metrics.bus_channels(live.subscribed.len());
                for r in batch {
                    let _ = r.ack.send(Ok(()));
                }
                if shared.history.is_some() {
                    self.start_tracking(&new).await;
                }
                Ok(())
            }
            failed => {
                let error = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => "SUBSCRIBE timed out".to_owned(),
                };
                for r in batch {
                    let _ = r.ack.send(Err(BusError::Unavailable(error.clone())));
                }
                Err(error)
            }
        }
    }

    /// Unsubscribes the topics whose release delay is over.
    async fn on_release(&mut self, live: &mut Live) -> Result<(), Lost> {
        let shared = &self.shared;
        let released: Vec<Topic> = shared
            .interest
            .expire(Instant::now())
            .into_iter()
            .filter(|t| live.subscribed.contains(t))
            .collect();
        if released.is_empty() {
            return Ok(());
        }
        let names: Vec<String> = released.iter().map(|t| shared.channels.of(t)).collect();
        live.changes.fetch_add(1, Ordering::AcqRel);
        for t in &released {
            live.subscribed.remove(t);
            self.tracks.forget(t);
        }
        shared.metrics.bus_channels(live.subscribed.len());
        match timeout(shared.config.command_timeout, live.conn.unsubscribe(&names)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("UNSUBSCRIBE timed out".into()),
        }
    }

    /// Sends the next probe, or gives the connection up when the last ones
    /// did not come back.
    fn on_probe(&mut self, live: &mut Live) -> Result<(), Lost> {
        let shared = &self.shared;
        let config = &shared.config;
        if live.moved.load(Ordering::Acquire) {
            return Err("the sentinels name another primary".into());
        }
        if let Some(why) = live.unfit.lock().unwrap_or_else(|e| e.into_inner()).take() {
            // Reconnected, the check at connect keeps the node unready
            // for as long as the server stays unfit.
            return Err(why);
        }
        if !config.sharded {
            let (mut prober, unfit) = (live.prober.clone(), live.unfit.clone());
            let limit = config.command_timeout;
            self.tasks.spawn(async move {
                if let Ok(Some(why)) = timeout(limit, prober.unfit()).await {
                    *unfit.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
                }
            });
        }
        if let Some(current) = live.sentinel_server.clone() {
            let (link, moved) = (self.link.clone(), live.moved.clone());
            let limit = config.command_timeout;
            self.tasks.spawn(async move {
                if let Ok(true) = timeout(limit, conn::primary_moved(&link, &current)).await {
                    moved.store(true, Ordering::Release);
                }
            });
        }
        // Sharded: subscriptions lost with a shard's connection that the
        // cluster client replaced by itself, with no push to say so (a
        // shard restart): the probes cannot show it when the probe channel
        // of that shard was subscribed on the new connection. Start over.
        {
            let check = live.held.lock().unwrap_or_else(|e| e.into_inner());
            if check.short >= SHORT_CHECKS {
                return Err(format!(
                    "Redis holds {} of this node's {} shard channels: subscriptions were lost with a shard's connection",
                    check.held, check.want
                ));
            }
        }
        if let Some(count) = live.conn.shard_subscriptions() {
            // Every channel of this connection is held by exactly one shard.
            let want = live.probes.len() + 1 + live.subscribed.len();
            let (check, limit) = (live.held.clone(), config.command_timeout);
            let (changes, before) = (live.changes.clone(), live.changes.load(Ordering::Acquire));
            self.tasks.spawn(async move {
                // Unknown (an old Redis, a shard down): not counted either
                // way; a shard down shows in the probes. Nor is a count
                // that raced a change of the subscriptions.
                let counted = timeout(limit, count).await;
                if changes.load(Ordering::Acquire) != before {
                    return;
                }
                if let Ok(Ok(Some(held))) = counted {
                    let mut check = check.lock().unwrap_or_else(|e| e.into_inner());
                    if held < want {
                        *check = HeldCheck {
                            short: check.short + 1,
                            held,
                            want,
                        };
                    } else {
                        check.short = 0;
                    }
                }
            });
        }
        // A connection that delivers nothing, not even our own probes, is
        // wedged: start over on a new one.
        let last =
            Duration::from_millis(shared.last_probe.load(Ordering::Acquire).saturating_sub(1));
        let silent = shared
            .since_start()
            .saturating_sub(last.max(live.connected_at));
        if silent > config.probe_timeout * 2 {
            // The outage began when Redis last carried a probe (or this
            // connection came up without one), not now.
            shared.mark_down_since(last.max(live.connected_at));
            return Err(format!(
                "no probe came back for {} ms{}",
                silent.as_millis(),
                shared.probe_failure()
            ));
        }
        // On the probe's own connection, off this task: a slow Redis must
        // not stall deliveries, and a backlog in the publisher must not
        // delay the probe.
        let mut prober = live.prober.clone();
        let probes = live.probes.clone();
        let limit = config.command_timeout;
        let shared = shared.clone();
        self.tasks.spawn(async move {
            // Timing out says nothing the silence does not; a refusal (an
            // ACL without the probe channels) is kept to be said with it.
            match timeout(limit, prober.probe(&probes)).await {
                Ok(Ok(())) => shared.probe_published(Ok(())),
                Ok(Err(e)) => shared.probe_published(Err(e.to_string())),
                Err(_) => {}
            }
        });
        Ok(())
    }

    /// History on: one message from the subscriber connection, this node's
    /// own included, checked against its topic's last position (`subscribed`:
    /// the topics subscribed on this connection, the only ones tracked).
    async fn receive_tracked(
        &mut self,
        subscribed: &HashSet<Topic>,
        channel: &str,
        payload: Bytes,
    ) {
        let shared = self.shared.clone();
        let Some(topic) = shared.channels.topic(channel) else {
            return shared.unreadable(channel, "not a topic channel");
        };
        let decoded = match wire::decode(payload) {
            Ok(decoded) => decoded,
            Err(e) => return shared.unreadable(channel, &e.to_string()),
        };
        if let Some(at) = decoded.published_ms {
            let ms = wire::now_ms().saturating_sub(at);
            shared.metrics.bus_latency(Duration::from_millis(ms));
        }
        let mut stamp = decoded.stamp;
        let Some((seq, position)) = stamp
            .as_ref()
            .and_then(|s| Some((s.seq, s.position(&topic)?.clone())))
        else {
            // From a node without history (a rolling enable): as it is,
            // and the topic's history starts afresh (`renewal.rs`).
            let envelope = Arc::new(Envelope::stamped(decoded.route, decoded.frame, stamp));
            shared.sink.deliver(&topic, &envelope);
            if let Some(history) = &shared.history {
                // Only for a topic subscribed (and so tracked): a released
                // one's entry would outlive it and hide a real new epoch
                // after its next subscribe.
                if subscribed.contains(&topic) {
                    self.tracks.expect_renewal(&topic);
                }
                self.renewals
                    .on_unstamped(&topic, history, &self.tasks, &self.stop);
            }
            return;
        };
        if !subscribed.contains(&topic) {
            // Released: its track is forgotten and its UNSUBSCRIBE sent, but
            // copies published before that took effect still arrive. No
            // socket holds the topic; delivered as they are, not tracked. A
            // track made of one would outlive the release, and the topic's
            // next subscribe would keep it as its start instead of the head
            // it reads then (`Tracks::start`): its first copy would look
            // like a jump over everything published while the topic was not
            // held, caught up again or, once history had trimmed it, a
            // `wshub.gap` to sockets that missed nothing (review of
            // 2026-12-02). So tracks are only ever of subscribed topics.
            let envelope = Arc::new(Envelope::stamped(decoded.route, decoded.frame, stamp));
            shared.sink.deliver(&topic, &envelope);
            return;
        }
        let mut step = self.tracks.on_copy(&topic, &position);
        if step == Step::CatchUp {
            // Everything published before this copy first, in order. On a
            // Cluster only this topic, to its top: there is no order
            // across topics (each is its own shard's), and no `seq` to
            // bound by; the copy itself then comes from history, and is
            // skipped here (`history/sharded.rs`).
            let (wants, bound) = if shared.config.sharded {
                (
                    self.tracks.wants([&topic], |t| shared.sink.resume_held(t)),
                    None,
                )
            } else {
                let held = |t: &Topic| shared.sink.resume_held(t);
                (self.tracks.wants(&self.tracks.tracked(), held), Some(seq))
            };
            let failed = self.catch_up(&wants, bound).await.err();
            step = self.tracks.on_copy(&topic, &position);
            if step == Step::CatchUp {
                // Still not in line (the read failed, or history moved on
                // meanwhile): what it lacks is a gap.
                let why = failed.unwrap_or_else(|| "history moved on meanwhile".into());
                let at = self.tracks.lost_before(&topic, &position);
                self.unrepairable(&topic, at.as_ref(), &why);
                self.tracks.skip_to(&topic, &position);
                step = Step::Deliver;
            }
        }
        if step == Step::Deliver {
            if let Some(stamp) = &mut stamp {
                self.tracks.share_epoch(&topic, stamp);
            }
            let envelope = Arc::new(Envelope::stamped(decoded.route, decoded.frame, stamp));
            shared.sink.deliver(&topic, &envelope);
        }
    }

    /// Catches up the topics of `wants` in one read (`gaps.rs`), up to
    /// `bound` (a `seq`) or to their tops: delivers what they missed in
    /// publish order and reports what history no longer has. Err: the read
    /// failed (nothing changed).
    async fn catch_up(&mut self, wants: &[Want], bound: Option<u64>) -> Result<(), String> {
        let shared = self.shared.clone();
        let Some(history) = &shared.history else {
            return Ok(());
        };
        let caught = history
            .catch_up(wants, bound)
            .await
            .map_err(|e| e.to_string())?;
        let caught = self.tracks.caught_up(wants, caught);
        for (topic, at) in &caught.notices {
            // Not counted: most sockets already hold this epoch (gaps.rs).
            shared.sink.gap(topic, Some(at));
        }
        for (topic, at) in &caught.gaps {
            self.unrepairable(
                topic,
                at.as_ref(),
                "history no longer has them (trimmed, expired, too many, or Redis restarted)",
            );
        }
        if caught.repaired > 0 {
            debug!(
                topics = caught.repaired,
                messages = caught.deliver.len(),
                "caught up from history"
            );
            for _ in 0..caught.repaired {
                shared.metrics.bus_gap(GapKind::Repaired);
            }
        }
        for (topic, message) in &caught.deliver {
            shared.sink.deliver(topic, message);
        }
        Ok(())
    }

    /// Counts and reports a gap that cannot be filled (logged at most once
    /// per [`LAG_LOG_EVERY`]; every one is counted).
    fn unrepairable(&mut self, topic: &Topic, at: Option<&Position>, why: &str) {
        let shared = &self.shared;
        shared.metrics.bus_gap(GapKind::Unrepairable);
        shared.sink.gap(topic, at);
        if self
            .gap_logged
            .is_none_or(|at: Instant| at.elapsed() > LAG_LOG_EVERY)
        {
            warn!(
                why,
                "messages were lost to this node and cannot be replayed from history; sockets that speak resume are told (see wshub_bus_gaps_total)"
            );
            self.gap_logged = Some(Instant::now());
        }
    }

    /// History on: reads the heads of topics just subscribed, their soft
    /// starting points (`gaps.rs`). A failed read leaves them to their
    /// first copy.
    async fn start_tracking(&mut self, topics: &[Topic]) {
        let Some(history) = self.shared.history.clone() else {
            return;
        };
        for chunk in topics.chunks(MAX_SUBSCRIBE_BATCH) {
            match history.heads(chunk).await {
                Ok(heads) => {
                    for (topic, head) in chunk.iter().zip(heads) {
                        self.tracks.start(topic, head);
                    }
                }
                Err(e) => debug!(error = %e, "cannot read where new topics start"),
            }
        }
    }

    /// History on, after every (re)subscribe: every subscribed topic is
    /// caught up to its top in one read, before any newer copy (a quiet
    /// topic shows no jump until its next message); topics not tracked yet
    /// get their start.
    async fn after_resubscribe(&mut self, live: &Live) {
        if self.shared.history.is_none() {
            return;
        }
        self.tracks.retain(|t| live.subscribed.contains(t));
        // Copies were lost meanwhile: a new epoch is a gap again.
        self.tracks.forget_renewals();
        let sink = &self.shared.sink;
        let wants = self.tracks.wants(&live.subscribed, |t| sink.resume_held(t));
        self.catch_up_retry = None;
        if let Err(e) = self.catch_up(&wants, None).await {
            // Tried again at the probes (a quiet topic shows no jump), and
            // the next copy of each topic shows any jump meanwhile.
            warn!(error = %e, "cannot catch up from history after resubscribing; trying again, and gaps are repaired at the next message");
            let pause = self.shared.config.probe_interval;
            self.catch_up_retry = Some((Instant::now() + pause, pause));
        }
    }

    /// History on: tries again the catch-up after a resubscribe that
    /// failed, when it is due; the pause doubles up to
    /// [`MAX_CATCH_UP_PAUSE`] (each try is bounded by the command timeout,
    /// and deliveries wait for it), until it succeeds or the connection is
    /// replaced.
    async fn retry_catch_up(&mut self, live: &Live) {
        let Some((due, pause)) = self.catch_up_retry else {
            return;
        };
        if Instant::now() < due {
            return;
        }
        self.tracks.retain(|t| live.subscribed.contains(t));
        let sink = &self.shared.sink;
        let wants = self.tracks.wants(&live.subscribed, |t| sink.resume_held(t));
        match self.catch_up(&wants, None).await {
            Ok(()) => {
                info!(
                    topics = wants.len(),
                    "caught up from history after resubscribing, on a retry"
                );
                self.catch_up_retry = None;
            }
            Err(e) => {
                debug!(error = %e, "the catch-up after resubscribing failed again");
                let pause = (pause * 2).min(MAX_CATCH_UP_PAUSE);
                self.catch_up_retry = Some((Instant::now() + pause, pause));
            }
        }
    }
}

/// How often a sharded subscriber that cannot reach its shards asks them
/// why itself (`conn::why_no_shard`): a connection to a seed and one to
/// each shard, so not at every reconnect attempt.
const ASK_SHARDS_EVERY: Duration = Duration::from_secs(10);

/// Whether a failed sharded connect's error leaves out why: the cluster
/// client's "no connection found" (it reached the seeds but no shard) and
/// a connect that timed out.
fn says_nothing_of_the_shards(error: &str) -> bool {
    error == "timed out" || error.contains("ClusterConnectionNotFound")
}
