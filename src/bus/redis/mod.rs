//! The Redis bus: any number of nodes share one Redis (or one Redis Cluster,
//! with sharded pub/sub).
//!
//! Two tasks per node, each owning its connection, both tracked by the
//! bus's [`TaskTracker`] so shutdown can wait for them:
//!
//! - the **publisher** drains a bounded queue of encoded messages and sends
//!   them in pipelines bounded in bytes ([`MAX_BATCH_BYTES`]), each with its
//!   own timeout. A message that cannot be sent (Redis down) waits in the
//!   queue, and is retried until `redis.publish_retry_ms` after it was
//!   published; then it is dropped, counted and logged. A pipeline that
//!   fails mid-flight is dropped, not resent: Redis may already have
//!   delivered part of it, and delivering twice is worse than the loss
//!   pub/sub already allows. Only that batch is lost; the messages behind
//!   it wait for the reconnect. On shutdown the publisher first sends what
//!   is queued (bounded by the shutdown timeout), then ends.
//! - the **subscriber** holds the one subscriber connection, subscribes and
//!   unsubscribes in batches, delivers what arrives to the hub, and sends the
//!   health probe on a connection of its own. When the connection drops it
//!   reconnects with capped backoff and resubscribes every topic the node
//!   holds; on a cluster it also resubscribes a channel whose shard gave it
//!   up (a slot migration).
//!
//! The bus carries messages to the *other* nodes only: the node delivers to
//! its own sockets at publish time (so same-node delivery goes on while
//! Redis is away), and the subscriber ignores this node's own messages
//! coming back from Redis (the origin node id in every payload), so each
//! socket gets a message exactly once.
//!
//! **Health** is end to end: every `redis.probe_interval_ms` the node
//! publishes a probe to its own probe channel (one per shard on a cluster,
//! so every shard's subscription is checked), on a connection used for
//! nothing else, and it is healthy only while the subscriber is connected
//! and every probe came back within `redis.probe_timeout_ms`. A node whose
//! subscriber is wedged therefore turns unready instead of silently missing
//! every message, and a backlog of published messages never delays a probe
//! (it once did, and a busy node tore down a healthy subscriber).

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use axum::body::Bytes;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, timeout, timeout_at};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

mod conn;
mod queue;
mod tls;

use conn::{
    Backoff, Incoming, Link, PubConn, SubConn, connect_prober, connect_publisher,
    connect_subscriber, slot_of,
};
use queue::PublishQueue;

use super::wire::{self, Channels};
use super::{Bus, BusError, Deliver, Interest, Subscribed};
use crate::config::RedisConfig;
use crate::envelope::Envelope;
use crate::metrics::Metrics;
use crate::outcome::DropReason;
use crate::route::Topic;
use crate::shutdown::Shutdown;

/// Most messages sent in one pipeline.
const MAX_BATCH: usize = 512;
/// Most bytes (payload × channels) sent in one pipeline, unless a single
/// message is larger; a message of a quarter of this or more goes alone.
/// Small batches: a pipeline that times out or breaks is dropped whole, and
/// it must not take unrelated messages with it (a 9 MB pipeline once cost
/// an innocent sender 17 of 40 messages).
const MAX_BATCH_BYTES: usize = 1024 * 1024;
/// Most channels in one SUBSCRIBE.
const MAX_SUBSCRIBE_BATCH: usize = 1000;
/// Subscription requests waiting for the subscriber task. Full means the
/// node is connecting sockets faster than Redis confirms them: the socket
/// is refused with 503 and may retry.
const SUBSCRIBE_QUEUE: usize = 8192;
/// The first reconnect delay; doubled per failure up to `reconnect_max`.
const MIN_BACKOFF: Duration = Duration::from_millis(50);
/// How often, at most, dropped pushes are logged (they are all counted).
const LAG_LOG_EVERY: Duration = Duration::from_secs(10);
/// Most candidate names tried to find a probe channel in a shard's slot
/// range. A range of one slot needs about 16,384 tries on average; ranges
/// that are not found are not probed (logged), never an endless search.
const PROBE_SEARCH: u32 = 400_000;

/// The Redis implementation of [`Bus`].
pub struct RedisBus {
    shared: Arc<Shared>,
    commands: mpsc::Sender<SubscribeRequest>,
    stop: CancellationToken,
    tasks: TaskTracker,
}

struct SubscribeRequest {
    topic: Topic,
    ack: oneshot::Sender<Result<(), BusError>>,
}

struct Shared {
    node_id: Arc<str>,
    config: RedisConfig,
    channels: Channels,
    probe_channel: String,
    sink: Arc<dyn Deliver>,
    interest: Interest,
    queue: PublishQueue,
    metrics: Arc<Metrics>,
    started: Instant,
    subscriber_up: AtomicBool,
    /// Why the subscriber is not connected, for `/readyz` (a wrong
    /// password or CA must be visible there, not only in the log).
    down_because: std::sync::Mutex<String>,
    /// Bumped on every subscriber (re)connect. A Redis the subscriber lost
    /// is one the publisher lost too, perhaps without noticing yet (it may
    /// have sent nothing during a short restart): the publisher reconnects
    /// before it sends on a connection from an older epoch, instead of
    /// finding out by losing a batch.
    epoch: AtomicU64,
    /// Milliseconds since `started` when the *oldest* of the probe channels
    /// last came back, plus one; 0 = not every probe channel came back yet.
    last_probe: AtomicU64,
    /// Unreadable payloads are logged once per node.
    unreadable_logged: AtomicBool,
    /// How long the publisher may spend sending what is queued once the
    /// bus is stopping (set by `shutdown`, in milliseconds).
    flush_within_ms: AtomicU64,
}

impl RedisBus {
    /// Starts the bus's tasks. Does not wait for Redis: the bus reports
    /// itself unhealthy until the first probe comes back.
    pub fn start(
        node_id: Arc<str>,
        config: RedisConfig,
        sink: Arc<dyn Deliver>,
        metrics: Arc<Metrics>,
        release_delay: Duration,
        shutdown: Shutdown,
    ) -> Result<Self, BusError> {
        let link = Link::new(&config)?;
        let channels = Channels::new(&config.channel_prefix);
        let shared = Arc::new(Shared {
            probe_channel: channels.probe(&node_id),
            channels,
            node_id,
            queue: PublishQueue::new(config.publish_queue, config.publish_queue_bytes),
            config,
            sink,
            interest: Interest::new(release_delay),
            metrics,
            started: Instant::now(),
            subscriber_up: AtomicBool::new(false),
            down_because: std::sync::Mutex::new("connecting".into()),
            epoch: AtomicU64::new(0),
            last_probe: AtomicU64::new(0),
            unreadable_logged: AtomicBool::new(false),
            flush_within_ms: AtomicU64::new(0),
        });
        let (commands, requests) = mpsc::channel(SUBSCRIBE_QUEUE);
        // The node's shutdown owns the tasks: `shutdown()` below cancels
        // this token, and the node waits for the tracker.
        let stop = shutdown.token().clone();
        let tasks = shutdown.tracker().clone();
        tasks.spawn(Publisher::new(shared.clone(), link.clone()).run(stop.clone()));
        tasks.spawn(
            Subscriber::new(shared.clone(), link, requests, stop.clone(), tasks.clone()).run(),
        );
        tasks.close();
        Ok(Self {
            shared,
            commands,
            stop,
            tasks,
        })
    }
}

impl Drop for RedisBus {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Bus for RedisBus {
    fn publish(&self, envelope: Arc<Envelope>) -> Result<(), BusError> {
        let shared = &self.shared;
        let topics = envelope.route.topics();
        if !topics.is_empty() {
            let payload = wire::encode(&shared.node_id, &envelope.route, &envelope.frame);
            let channels = topics.iter().map(|t| shared.channels.of(t)).collect();
            shared.queue.push(channels, payload)?;
        }
        // This node's own sockets were served by the node; the copy Redis
        // echoes back to this node is ignored on arrival (`Shared::receive`).
        Ok(())
    }

    fn subscribe(&self, topic: &Topic) -> Subscribed {
        self.shared.interest.add(topic);
        let (ack, done) = oneshot::channel();
        let request = SubscribeRequest {
            topic: topic.clone(),
            ack,
        };
        if self.commands.try_send(request).is_err() {
            return Box::pin(std::future::ready(Err(BusError::Overloaded)));
        }
        Box::pin(async move {
            done.await
                .unwrap_or_else(|_| Err(BusError::Unavailable("the bus is stopping".into())))
        })
    }

    fn unsubscribe(&self, topic: &Topic) {
        // The subscriber task releases it after the delay.
        self.shared.interest.remove(topic);
    }

    fn health(&self) -> Result<(), BusError> {
        let shared = &self.shared;
        if !shared.subscriber_up.load(Ordering::Acquire) {
            let why = shared
                .down_because
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            return Err(BusError::Unavailable(format!(
                "not subscribed to Redis: {why}"
            )));
        }
        let last = shared.last_probe.load(Ordering::Acquire);
        if last == 0 {
            return Err(BusError::Unavailable(
                "no probe has come back through Redis yet".into(),
            ));
        }
        let age = shared
            .since_start()
            .saturating_sub(Duration::from_millis(last - 1));
        if age > shared.config.probe_timeout {
            return Err(BusError::Unavailable(format!(
                "no probe has come back through Redis for {} ms",
                age.as_millis()
            )));
        }
        Ok(())
    }

    fn shutdown(&self, within: Duration) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        self.shared
            .flush_within_ms
            .store(within.as_millis() as u64, Ordering::Release);
        self.stop.cancel();
        let tasks = self.tasks.clone();
        Box::pin(async move {
            // The publisher bounds its flush by `within`; the margin covers
            // the commands already in flight when it ran out of time.
            if timeout(within + Duration::from_secs(1), tasks.wait())
                .await
                .is_err()
            {
                warn!("the Redis bus's tasks did not end in time; exiting anyway");
            }
        })
    }
}

impl Shared {
    fn since_start(&self) -> Duration {
        self.started.elapsed()
    }

    /// Handles one message from the subscriber connection (probes are
    /// handled by the subscriber task).
    fn receive(&self, channel: &str, payload: Bytes) {
        let Some(topic) = self.channels.topic(channel) else {
            return self.unreadable(channel, "not a topic channel");
        };
        match wire::decode(payload) {
            // Our own publish, echoed by Redis: the node delivered it to its
            // sockets already (the bus carries to other nodes only).
            Ok(decoded) if *decoded.origin == *self.node_id => {}
            Ok(decoded) => {
                if let Some(at) = decoded.published_ms {
                    // Across hosts this includes clock skew; the metric's help says so.
                    let ms = wire::now_ms().saturating_sub(at);
                    self.metrics.bus_latency(Duration::from_millis(ms));
                }
                let envelope = Arc::new(Envelope {
                    route: decoded.route,
                    frame: decoded.frame,
                });
                self.sink.deliver(&topic, &envelope);
            }
            Err(e) => self.unreadable(channel, &e.to_string()),
        }
    }

    fn unreadable(&self, channel: &str, why: &str) {
        self.metrics.bus_unreadable();
        if !self.unreadable_logged.swap(true, Ordering::Relaxed) {
            warn!(
                channel,
                why,
                "ignoring unreadable payloads from Redis (logged once; see wshub_bus_unreadable_total)"
            );
        }
    }
}

// ---- The publisher task --------------------------------------------------

/// The publisher task's state: its connection and the subscriber epoch it
/// was opened in, its backoff, and whether an outage is in progress (to
/// log its start and end once).
struct Publisher {
    shared: Arc<Shared>,
    link: Link,
    conn: Option<(PubConn, u64)>,
    backoff: Backoff,
    outage: bool,
}

impl Publisher {
    fn new(shared: Arc<Shared>, link: Link) -> Self {
        let backoff = Backoff::new(shared.config.reconnect_max);
        Self {
            shared,
            link,
            conn: None,
            backoff,
            outage: false,
        }
    }

    async fn run(mut self, stop: CancellationToken) {
        loop {
            tokio::select! {
                biased;
                () = stop.cancelled() => break,
                () = self.shared.queue.wait() => {}
            }
            self.expire();
            if self.connected().await {
                self.send_batch().await;
            } else {
                tokio::select! {
                    biased;
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(self.backoff.step()) => {}
                }
            }
        }
        self.flush().await;
    }

    /// Sends what is still queued, until the queue is empty or the time
    /// `shutdown` allowed is up, and never longer than
    /// `redis.publish_retry_ms` (a message waits no longer than that
    /// anyway); what is left is dropped and counted.
    async fn flush(&mut self) {
        let within = Duration::from_millis(self.shared.flush_within_ms.load(Ordering::Acquire))
            .min(self.shared.config.publish_retry);
        let deadline = Instant::now() + within;
        while !self.shared.queue.is_empty() && Instant::now() < deadline {
            match timeout_at(deadline, self.connected()).await {
                Ok(true) => {
                    let _ = timeout_at(deadline, self.send_batch()).await;
                }
                Ok(false) => {
                    let _ = timeout_at(deadline, tokio::time::sleep(self.backoff.step())).await;
                }
                Err(_) => break,
            }
        }
        let left = self.shared.queue.take(usize::MAX, usize::MAX).len();
        if left > 0 {
            self.shared
                .metrics
                .dropped(DropReason::BusUnavailable, left as u64);
            warn!(
                dropped = left,
                "shutting down: messages still queued for Redis were dropped"
            );
        }
    }

    fn expire(&self) {
        let shared = &self.shared;
        let expired = shared.queue.expire(shared.config.publish_retry);
        if expired > 0 {
            shared
                .metrics
                .dropped(DropReason::BusUnavailable, expired as u64);
            warn!(
                dropped = expired,
                retry_ms = shared.config.publish_retry.as_millis() as u64,
                "Redis unreachable: dropped messages that waited longer than redis.publish_retry_ms"
            );
        }
    }

    /// Makes sure there is a connection of the current epoch; false when
    /// Redis cannot be reached (the caller backs off).
    async fn connected(&mut self) -> bool {
        let shared = &self.shared;
        let config = &shared.config;
        let epoch = shared.epoch.load(Ordering::Acquire);
        if self
            .conn
            .as_ref()
            .is_some_and(|(_, opened)| *opened != epoch)
        {
            self.conn = None;
        }
        if self.conn.is_some() {
            return true;
        }
        match timeout(
            config.command_timeout,
            connect_publisher(&self.link, config),
        )
        .await
        {
            Ok(Ok(c)) => {
                self.conn = Some((c, epoch));
                self.backoff.reset();
                if self.outage {
                    info!("publisher reconnected to Redis");
                    self.outage = false;
                }
                true
            }
            failed => {
                if !self.outage {
                    let error = match failed {
                        Ok(Err(e)) => e.to_string(),
                        _ => "connect timed out".to_owned(),
                    };
                    warn!(%error, "publisher cannot reach Redis; retrying");
                    self.outage = true;
                }
                shared.metrics.bus_reconnect_attempt();
                false
            }
        }
    }

    /// Sends one batch (bounded in messages and bytes) with its own timeout.
    async fn send_batch(&mut self) {
        let Some((active, _)) = self.conn.as_mut() else {
            return;
        };
        let shared = &self.shared;
        let batch = shared.queue.take(MAX_BATCH, MAX_BATCH_BYTES);
        if batch.is_empty() {
            return;
        }
        let error = match timeout(shared.config.command_timeout, active.send(&batch)).await {
            Ok(Ok(())) => return,
            Ok(Err(e)) => e.to_string(),
            Err(_) => "the pipeline timed out".to_owned(),
        };
        // Part of the pipeline may have been delivered: drop it rather
        // than risk delivering twice. Only this batch: the messages behind
        // it wait for the reconnect.
        shared
            .metrics
            .dropped(DropReason::BusUnavailable, batch.len() as u64);
        shared.metrics.bus_publish_failure();
        warn!(%error, dropped = batch.len(), "publishing to Redis failed; reconnecting");
        self.conn = None;
        self.outage = true;
    }
}

// ---- The subscriber task -------------------------------------------------

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
    let probes = probe_channels(shared, &mut prober).await?;
    // One snapshot, used both to subscribe and to record what is
    // subscribed. A topic taken while this attempt is in flight is not in
    // it: its request waits in the queue and is served once connected.
    // (Two snapshots once made such a topic look subscribed when it was
    // not: acked, and silently deaf until it was released.)
    let held = shared.interest.held();
    let mut channels = probes.clone();
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
struct Subscriber {
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
    /// When dropped pushes were last logged.
    lag_logged: Option<Instant>,
}

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
}

/// What ended a live connection: why, to log it.
type Lost = String;

impl Subscriber {
    fn new(
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
            lag_logged: None,
        }
    }

    /// Connects, serves the connection until it is lost, and again, until
    /// the bus stops.
    async fn run(mut self) {
        loop {
            let Some(mut live) = self.connect().await else {
                return;
            };
            let Some(lost) = self.serve(&mut live).await else {
                return;
            };
            self.set_down_because(&lost);
            self.shared.subscriber_up.store(false, Ordering::Release);
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
            self.set_down_because(&error);
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
        // Ready again only once a probe has made the whole trip on the new
        // connection (and the publisher has followed to the new epoch).
        shared.last_probe.store(0, Ordering::Release);
        shared.epoch.fetch_add(1, Ordering::AcqRel);
        let Connected {
            conn,
            prober,
            probes,
            subscribed,
        } = connected;
        let live_server = conn.server.clone();
        shared.metrics.bus_channels(subscribed.len());
        shared.subscriber_up.store(true, Ordering::Release);
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
        })
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
                _ = probe.tick() => self.on_probe(live),
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
                }
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
                    let limit = shared.config.command_timeout * 2;
                    match timeout(limit, live.conn.subscribe(&wanted)).await {
                        Ok(Ok(())) => {}
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
                live.subscribed.extend(new);
                shared.metrics.bus_channels(live.subscribed.len());
                for r in batch {
                    let _ = r.ack.send(Ok(()));
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
        for t in &released {
            live.subscribed.remove(t);
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
        if let Some(current) = live.sentinel_server.clone() {
            let (shared, link, moved) = (shared.clone(), self.link.clone(), live.moved.clone());
            let limit = config.command_timeout;
            self.tasks.spawn(async move {
                if let Ok(true) =
                    timeout(limit, conn::primary_moved(&link, &shared.config, &current)).await
                {
                    moved.store(true, Ordering::Release);
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
            return Err(format!("no probe came back for {} ms", silent.as_millis()));
        }
        // On the probe's own connection, off this task: a slow Redis must
        // not stall deliveries, and a backlog in the publisher must not
        // delay the probe.
        let mut prober = live.prober.clone();
        let probes = live.probes.clone();
        let limit = config.command_timeout;
        self.tasks.spawn(async move {
            let _ = timeout(limit, prober.probe(&probes)).await;
        });
        Ok(())
    }
}
