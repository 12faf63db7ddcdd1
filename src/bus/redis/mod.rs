//! The Redis bus: any number of nodes share one Redis (or one Redis Cluster,
//! with sharded pub/sub).
//!
//! Two tasks per node, each owning its connection, both tracked by the
//! bus's [`TaskTracker`] so shutdown can wait for them, each in its own
//! file; `conn.rs` (connections, cluster slots, Sentinel), `tls.rs` and
//! `queue.rs` serve them:
//!
//! - the **publisher** (`publisher.rs`) drains a bounded queue of encoded messages and sends
//!   them in pipelines bounded in bytes ([`MAX_BATCH_BYTES`]), each with its
//!   own timeout. A message that cannot be sent (Redis down) waits in the
//!   queue, and is retried until `redis.publish_retry_ms` after it was
//!   published; then it is dropped, counted and logged. A pipeline that
//!   fails mid-flight is dropped, not resent: Redis may already have
//!   delivered part of it, and delivering twice is worse than the loss
//!   pub/sub already allows. Only that batch is lost; the messages behind
//!   it wait for the reconnect. (With history on the batch is resent
//!   instead: the publish script skips what it already ran.) On shutdown the publisher first sends what
//!   is queued (bounded by the shutdown timeout), then ends.
//! - the **subscriber** (`subscriber.rs`) holds the one subscriber connection, subscribes and
//!   unsubscribes in batches, delivers what arrives to the hub, and sends the
//!   health probe on a connection of its own. When the connection drops it
//!   reconnects with capped backoff and resubscribes every topic the node
//!   holds; on a cluster it also resubscribes a channel whose shard gave it
//!   up (a slot migration).
//! - the **node registry** (`registry.rs`) renews this node's lease in
//!   Redis every `presence.heartbeat_ms` on a connection of its own, once
//!   the node has joined it, keeps the version gate `publish` consults, and
//!   removes the node's entry when the bus stops.
//! - the **ban mirror** (`bans.rs`): every ban published to every node,
//!   so that a connect's ban check asks no one (not on a Redis Cluster).
//! - **cluster presence** (`presence.rs`), on the registry's leases: one
//!   script for every write and read, a sweep of dead nodes' holdings, and
//!   a `BLPOP` per node on a connection of its own for join/leave frames
//!   and sockets to replace (only with presence or the per-user limit on).
//!
//! **A long outage is refused, a blip is not.** Once the subscriber has
//! lost Redis for longer than `redis.publish_retry_ms`, `publish` returns
//! [`BusError::Unavailable`]: a queued message could only wait out its
//! retry time and be dropped while its sender heard "sent". A shorter
//! outage is a blip and is queued as above; messages accepted just before
//! the outage crossed the window are still dropped and counted.
//!
//! The bus carries messages to the *other* nodes only: the node delivers to
//! its own sockets at publish time (so same-node delivery goes on during a
//! blip; a refused message goes to nobody), and the subscriber ignores this node's own messages
//! coming back from Redis (the origin node id in every payload), so each
//! socket gets a message exactly once.
//!
//! **With history** (`history.enabled`, `history.rs`) three things change.
//! Each batch is one call of a script that stamps every message with its
//! position in each topic, appends it to the topic's history and publishes
//! the stamped payload; a batch whose outcome is unknown is resent instead
//! of dropped. The subscriber delivers this node's **own** messages too,
//! from Redis's echo ([`Bus::history`] is `Some`; the node then does not
//! deliver at publish time): every socket, here or elsewhere, sees one
//! order per topic, with positions. And the subscriber checks those
//! positions, filling a gap (a dropped connection, a killed subscriber,
//! pushes it could not keep up with) from history before it delivers what
//! follows, or reporting it through [`Deliver::gap`] when history no longer
//! has it (`gaps.rs`). A copy without a stamp (from a node with history
//! off, during a rolling enable) is delivered as it is and starts its
//! topic's history afresh (`renewal.rs`). With history off none of this
//! exists: plain `PUBLISH` pipelines and nothing else in Redis.
//!
//! **Health** is end to end: every `redis.probe_interval_ms` the node
//! publishes a probe to its own probe channel (one per shard on a cluster,
//! so every shard's subscription is checked), on a connection used for
//! nothing else, and it is healthy only while the subscriber is connected
//! and every probe came back within `redis.probe_timeout_ms`. A node whose
//! subscriber is wedged therefore turns unready instead of silently missing
//! every message, and a backlog of published messages never delays a probe
//! (it once did, and a busy node tore down a healthy subscriber).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use axum::body::Bytes;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::warn;

mod bans;
mod conn;
mod control;
mod gaps;
mod history;
mod presence;
mod publisher;
mod queue;
mod registry;
mod renewal;
mod subscriber;
mod tls;

use conn::Link;
use history::RedisHistory;
use publisher::Publisher;
use queue::PublishQueue;
use subscriber::Subscriber;

use super::registry::{Registry, VersionGate};
use super::wire::{self, Channels};
use super::{Bus, BusError, Deliver, Interest, Receipt, Subscribed};
use crate::config::{HistoryConfig, PresenceConfig, RedisConfig};
use crate::envelope::Envelope;
use crate::history::History;
use crate::metrics::Metrics;
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
    /// For the node registry's own connection (`registry.rs`).
    link: Link,
}

struct SubscribeRequest {
    topic: Topic,
    ack: oneshot::Sender<Result<(), BusError>>,
}

struct Shared {
    node_id: Arc<str>,
    /// This bus instance's address, `<node id>-<instance>` (the start of
    /// its node's connection ids), and its own channel.
    address: Arc<str>,
    node_channel: String,
    config: RedisConfig,
    channels: Channels,
    probe_channel: String,
    sink: Arc<dyn Deliver>,
    interest: Interest,
    queue: PublishQueue,
    metrics: Arc<Metrics>,
    started: Instant,
    subscriber_up: AtomicBool,
    /// Milliseconds since `started` when the subscriber lost Redis (a
    /// dropped connection or a failed connect), plus one; 0 = connected, or
    /// not failed yet. Once this is older than `redis.publish_retry_ms`,
    /// `publish` refuses: anything it queued would wait out its whole retry
    /// time and be dropped, so the sender is told now instead of getting a
    /// success that delivers nothing (it once did: a 204 for a message no
    /// other node ever saw).
    down_since: AtomicU64,
    /// Why the subscriber is not connected, for `/readyz` (a wrong
    /// password or CA must be visible there, not only in the log).
    down_because: std::sync::Mutex<String>,
    /// Milliseconds since `started` when Redis began refusing the
    /// publisher's sends (`OOM` of a full Redis under `noeviction`, `BUSY`,
    /// `LOADING`: answered, not carried), plus one; 0 = it takes them.
    /// Timed and answered like an outage: a full Redis with history on
    /// took the probes' plain `PUBLISH` but not the publish script, and
    /// the node stayed ready, answered every message 204 and dropped it
    /// (review of 2026-12-03).
    refused_since: AtomicU64,
    /// What Redis answered, for the refusals and `/readyz`.
    refused_because: std::sync::Mutex<String>,
    /// Bumped on every subscriber (re)connect. A Redis the subscriber lost
    /// is one the publisher lost too, perhaps without noticing yet (it may
    /// have sent nothing during a short restart): the publisher reconnects
    /// before it sends on a connection from an older epoch, instead of
    /// finding out by losing a batch.
    epoch: Arc<conn::Epoch>,
    /// Milliseconds since `started` when the *oldest* of the probe channels
    /// last came back, plus one; 0 = not every probe channel came back yet.
    last_probe: AtomicU64,
    /// Why the last probe could not be published (an ACL without the
    /// probe channels, say), said with the silence it causes; `None` once
    /// one is published again.
    probe_failed: std::sync::Mutex<Option<String>>,
    /// Unreadable payloads are logged once per node.
    unreadable_logged: AtomicBool,
    /// How long the publisher may spend sending what is queued once the
    /// bus is stopping (set by `shutdown`, in milliseconds).
    flush_within_ms: AtomicU64,
    /// Which payload versions every live node reads (kept by the node
    /// registry, `registry.rs`); `publish` writes what it allows.
    gate: VersionGate,
    /// With `history.enabled`: the history, its script and its command
    /// connection.
    history: Option<Arc<RedisHistory>>,
    /// This node's copy of the bans, and their channel (`bans.rs`; unused
    /// on a Redis Cluster).
    bans: bans::BanMirror,
    bans_channel: String,
}

impl RedisBus {
    /// Starts the bus's tasks. Does not wait for Redis: the bus reports
    /// itself unhealthy until the first probe comes back. With `history`
    /// (`history.enabled`), every message is stamped and kept, see the
    /// module docs.
    pub fn start(
        node_id: Arc<str>,
        config: RedisConfig,
        history: Option<HistoryConfig>,
        sink: Arc<dyn Deliver>,
        metrics: Arc<Metrics>,
        release_delay: Duration,
        shutdown: Shutdown,
    ) -> Result<Self, BusError> {
        let link = Link::new(&config)?;
        let epoch = Arc::new(conn::Epoch::default());
        let history = history.map(|h| {
            Arc::new(RedisHistory::new(
                &node_id,
                link.clone(),
                config.clone(),
                h,
                epoch.clone(),
            ))
        });
        let channels = Channels::new(&config.channel_prefix);
        let bans_channel = channels.bans();
        // A new instance per start: a connection id of an earlier run of
        // this node id never reaches a socket of this one.
        let address: Arc<str> = format!("{node_id}-{:08x}", rand::random::<u32>()).into();
        let shared = Arc::new(Shared {
            probe_channel: channels.probe(&node_id),
            node_channel: channels.node(&address),
            address,
            channels,
            node_id,
            queue: PublishQueue::new(config.publish_queue, config.publish_queue_bytes),
            config,
            sink,
            interest: Interest::new(release_delay),
            metrics,
            started: Instant::now(),
            subscriber_up: AtomicBool::new(false),
            down_since: AtomicU64::new(0),
            down_because: std::sync::Mutex::new("connecting".into()),
            refused_since: AtomicU64::new(0),
            refused_because: std::sync::Mutex::default(),
            epoch,
            last_probe: AtomicU64::new(0),
            probe_failed: std::sync::Mutex::new(None),
            unreadable_logged: AtomicBool::new(false),
            flush_within_ms: AtomicU64::new(0),
            gate: VersionGate::new(),
            history,
            bans: bans::BanMirror::default(),
            bans_channel,
        });
        let (commands, requests) = mpsc::channel(SUBSCRIBE_QUEUE);
        // The node's shutdown owns the tasks: `shutdown()` below cancels
        // this token, and the node waits for the tracker.
        let stop = shutdown.token().clone();
        let tasks = shutdown.tracker().clone();
        tasks.spawn(Publisher::new(shared.clone(), link.clone()).run(stop.clone()));
        tasks.spawn(
            Subscriber::new(
                shared.clone(),
                link.clone(),
                requests,
                stop.clone(),
                tasks.clone(),
            )
            .run(),
        );
        tasks.close();
        Ok(Self {
            shared,
            commands,
            stop,
            tasks,
            link,
        })
    }
}

impl Drop for RedisBus {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl RedisBus {
    /// The queue items of one message, at most two (none when its route
    /// names no topic): see [`Bus::publish`]. An array, not a `Vec`: no
    /// allocation per message for it.
    fn items(&self, envelope: &Envelope) -> [Option<queue::Outgoing>; 2] {
        let shared = &self.shared;
        let topics = envelope.route.topics();
        if topics.is_empty() {
            return [None, None];
        }
        // The newest payload version every live node reads (the node
        // registry's version gate); the baseline while it is unsure. (The
        // history script writes version 1, the only one there is; a
        // version 2 must gate it too.)
        let plain = |topics: &[&Topic]| {
            let version = shared.gate.choose(wire::WRITES, wire::Version::number);
            let payload =
                wire::encode_as(version, &shared.node_id, &envelope.route, &envelope.frame);
            // Connections of one node share its channel: one copy.
            let mut channels: Vec<String> = Vec::with_capacity(topics.len());
            for topic in topics {
                let channel = shared.channels.of(topic);
                if !channels.contains(&channel) {
                    channels.push(channel);
                }
            }
            queue::Outgoing::new(channels, payload)
        };
        let all: Vec<&Topic> = topics.iter().collect();
        let Some(history) = &shared.history else {
            // This node's own sockets were served by the node; the copy
            // Redis echoes back to this node is ignored on arrival
            // (`Shared::receive`).
            return [Some(plain(&all)), None];
        };
        // History on: delivered here too, from Redis's echo (module docs).
        // A connection has no topic to replay from, so its copy is not
        // kept: it goes unstamped on its node's channel as with history
        // off, and is delivered from the echo like the rest. On one Redis
        // it goes through the publish script with the recorded messages,
        // in their order (a plain pipeline beside the script let it
        // overtake them, or, sent in turn, cost a round trip per change of
        // kind); on a Cluster, where order across channels is not
        // promised, in a plain pipeline. The route's other topics are
        // recorded and stamped as usual. Both copies carry the whole
        // route, so each socket still takes exactly one of them
        // (`Route::accepts`: the first topic of the route it matches).
        let (connections, kept): (Vec<&Topic>, Vec<&Topic>) = all
            .into_iter()
            .partition(|t| matches!(t, Topic::Connection(_)));
        let mut items = [None, None];
        if !connections.is_empty() {
            let item = plain(&connections);
            items[0] = Some(if shared.config.sharded {
                item
            } else {
                queue::Outgoing::relayed(item.channels, item.payload)
            });
        }
        if !kept.is_empty() {
            items[1] = Some(history.record(
                &shared.node_id,
                &envelope.route,
                &kept,
                &envelope.frame,
                &shared.channels,
            ));
        }
        // Two items, one message: dropped, it counts once.
        if let [Some(a), Some(b)] = &mut items {
            let twin = Arc::new(std::sync::atomic::AtomicBool::new(false));
            a.twin = Some(twin.clone());
            b.twin = Some(twin);
        }
        items
    }
}

impl Bus for RedisBus {
    fn publish(&self, envelope: Arc<Envelope>) -> Result<(), BusError> {
        let items = self.items(&envelope);
        if items.iter().all(Option::is_none) {
            return Ok(());
        }
        self.shared.refuse_if_long_down()?;
        // All or nothing: a message is never half queued.
        self.shared.queue.push_all(items.into_iter().flatten())
    }

    fn publish_all(&self, envelopes: &[Arc<Envelope>]) -> Result<Receipt, BusError> {
        let (ack, told) = queue::Ack::new();
        let items: Vec<queue::Outgoing> = envelopes
            .iter()
            .flat_map(|e| self.items(e).into_iter().flatten())
            .map(|mut item| {
                item.ack = Some(ack.clone());
                item
            })
            .collect();
        // The items hold it now: the last of them to settle tells.
        drop(ack);
        if items.is_empty() {
            return Ok(Receipt::carried());
        }
        self.shared.refuse_if_long_down()?;
        self.shared.queue.push_all(items)?;
        Ok(Receipt::pending(told))
    }

    fn subscribe(&self, topic: &Topic) -> Subscribed {
        if self.shared.interest.add_live(topic) {
            // Subscribed on the current connection already: the
            // subscriber task would only answer so.
            return Box::pin(std::future::ready(Ok(())));
        }
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

    fn history(&self) -> Option<Arc<dyn History>> {
        self.shared.history.clone().map(|h| h as Arc<dyn History>)
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
        let Some(age) = shared.probe_age() else {
            return Err(BusError::Unavailable(format!(
                "no probe has come back through Redis yet{}",
                shared.probe_failure()
            )));
        };
        if age > shared.config.probe_timeout {
            return Err(BusError::Unavailable(format!(
                "no probe has come back through Redis for {} ms{}",
                age.as_millis(),
                shared.probe_failure()
            )));
        }
        // The probes' plain PUBLISH may go through where the publisher's
        // sends do not (the publish script on a full Redis).
        shared.refuse_if_long_refusing()
    }

    fn registry(&self, presence: &PresenceConfig) -> Arc<dyn Registry> {
        Arc::new(registry::RedisRegistry::new(
            self.shared.clone(),
            self.link.clone(),
            presence,
            self.stop.clone(),
            self.tasks.clone(),
        ))
    }

    fn address(&self) -> Option<Arc<str>> {
        Some(self.shared.address.clone())
    }

    fn control(&self) -> Option<Arc<dyn crate::bus::control::ControlPlane>> {
        Some(Arc::new(control::RedisControl::new(
            self.shared.clone(),
            self.link.clone(),
        )))
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

    /// How long ago the oldest probe channel's probe last came back on
    /// the current subscriber connection; `None` before one has.
    fn probe_age(&self) -> Option<Duration> {
        let last = self.last_probe.load(Ordering::Acquire);
        (last > 0).then(|| {
            self.since_start()
                .saturating_sub(Duration::from_millis(last - 1))
        })
    }

    /// `": the last probe could not be published: <error>"` when it could
    /// not, else empty.
    fn probe_failure(&self) -> String {
        self.probe_failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|e| format!(": the last probe could not be published: {e}"))
            .unwrap_or_default()
    }

    /// Records the outcome of publishing a probe (see `probe_failed`).
    fn probe_published(&self, outcome: Result<(), String>) {
        *self.probe_failed.lock().unwrap_or_else(|e| e.into_inner()) = outcome.err();
    }

    /// Records that the subscriber lost Redis now, unless it already had
    /// (the outage is timed from its start, not from the latest failed
    /// reconnect).
    fn mark_down(&self) {
        self.mark_down_since(self.since_start());
    }

    /// Records that Redis has carried nothing since `at` (time since
    /// start), unless an outage is already being timed.
    fn mark_down_since(&self, at: Duration) {
        let at = at.as_millis() as u64 + 1;
        let _ = self
            .down_since
            .compare_exchange(0, at, Ordering::AcqRel, Ordering::Acquire);
    }

    /// Records that Redis carries this node's messages again: a probe made
    /// the round trip on the subscriber's connection. Not the connect
    /// itself: a Redis that takes connections and subscriptions but no
    /// `PUBLISH` (`CLIENT PAUSE … WRITE`, a Redis too busy to answer) made
    /// the subscriber reconnect every few seconds, each connect restarted
    /// the outage's clock, and the node accepted every message (204) and
    /// dropped it 5 s later (review of 2026-12-03: 220 messages per
    /// receiver in a 25 s pause, none refused).
    fn mark_up(&self) {
        self.down_since.store(0, Ordering::Release);
    }

    /// `Unavailable` once Redis has been unreachable for longer than
    /// `redis.publish_retry_ms`. A shorter outage is a blip: the message is
    /// queued and sent on reconnect. The subscriber's view decides, since it
    /// notices an outage at once (its connection drops) while the publisher
    /// only notices when it next sends.
    fn refuse_if_long_down(&self) -> Result<(), BusError> {
        self.refuse_if_long_refusing()?;
        self.refuse_if_longer_than_retry(&self.down_since, "unreachable", &self.down_because)?;
        self.refuse_if_long_silent()
    }

    /// `Unavailable` while the subscriber is still connected but no probe
    /// came back for longer than both `redis.probe_timeout_ms` (a probe is
    /// lost, not late) and `redis.publish_retry_ms`. The subscriber gives
    /// up on a silent connection only at twice the probe timeout, and
    /// starts the outage's clock then: with `publish_retry_ms` below that
    /// (4 s by default), a Redis taking connections but no `PUBLISH` had
    /// messages answered 204 and dropped for the difference (review of
    /// 2026-12-03).
    /// A lost connection is timed by `down_since`, from when it was lost.
    fn refuse_if_long_silent(&self) -> Result<(), BusError> {
        if !self.subscriber_up.load(Ordering::Acquire) {
            return Ok(());
        }
        let Some(silent) = self.probe_age() else {
            return Ok(());
        };
        if silent <= self.config.probe_timeout || silent <= self.config.publish_retry {
            return Ok(());
        }
        Err(BusError::Unavailable(format!(
            "Redis carried no probe for {} ms, longer than redis.probe_timeout_ms ({} ms) and redis.publish_retry_ms ({} ms){}",
            silent.as_millis(),
            self.config.probe_timeout.as_millis(),
            self.config.publish_retry.as_millis(),
            self.probe_failure()
        )))
    }

    /// `Unavailable` when `since` (milliseconds since `started`, plus one;
    /// 0: not timing) is longer ago than `redis.publish_retry_ms`, saying
    /// Redis is `what` for that long and `why`.
    fn refuse_if_longer_than_retry(
        &self,
        since: &AtomicU64,
        what: &str,
        why: &std::sync::Mutex<String>,
    ) -> Result<(), BusError> {
        let since = since.load(Ordering::Acquire);
        if since == 0 {
            return Ok(());
        }
        let lasted = self
            .since_start()
            .saturating_sub(Duration::from_millis(since - 1));
        if lasted <= self.config.publish_retry {
            return Ok(());
        }
        let why = why.lock().unwrap_or_else(|e| e.into_inner()).clone();
        Err(BusError::Unavailable(format!(
            "Redis {what} for {} ms, longer than redis.publish_retry_ms ({} ms): {why}",
            lasted.as_millis(),
            self.config.publish_retry.as_millis()
        )))
    }

    /// Records that Redis refuses the publisher's sends, unless it already
    /// did (timed from the first refusal).
    fn mark_refused(&self, why: &str) {
        let now = self.since_start().as_millis() as u64 + 1;
        if self
            .refused_since
            .compare_exchange(0, now, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            *self
                .refused_because
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = why.to_owned();
        }
    }

    /// Records that Redis takes the publisher's sends again.
    fn mark_accepted(&self) {
        self.refused_since.store(0, Ordering::Release);
    }

    /// `Unavailable` once Redis has refused the publisher's sends for
    /// longer than `redis.publish_retry_ms` (see `refused_since`).
    fn refuse_if_long_refusing(&self) -> Result<(), BusError> {
        self.refuse_if_longer_than_retry(
            &self.refused_since,
            "refuses to publish",
            &self.refused_because,
        )
    }

    /// Handles one message from the subscriber connection, history off
    /// (probes are handled by the subscriber task; with history, `gaps.rs`).
    fn receive(&self, channel: &str, payload: Bytes) {
        if channel == self.node_channel {
            return self.receive_direct(payload);
        }
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
                let envelope = Arc::new(Envelope::new(decoded.route, decoded.frame));
                self.sink.deliver(&topic, &envelope);
            }
            Err(e) => self.unreadable(channel, &e.to_string()),
        }
    }

    /// A message on this node instance's own channel: delivered through
    /// each topic of its route that names one of this node's connections
    /// (the hub finds the socket, if it is still here). This node's own
    /// messages come back only with history on (module docs).
    fn receive_direct(&self, payload: Bytes) {
        let decoded = match wire::decode(payload) {
            Ok(decoded) => decoded,
            Err(e) => return self.unreadable(&self.node_channel, &e.to_string()),
        };
        if self.history.is_none() && *decoded.origin == *self.node_id {
            return;
        }
        let envelope = Arc::new(Envelope::new(decoded.route, decoded.frame));
        for topic in envelope.route.topics() {
            if let Topic::Connection(c) = topic
                && crate::route::node_address(c) == Some(&*self.address)
            {
                self.sink.deliver(topic, &envelope);
            }
        }
    }

    /// A control payload on `channel`: carried out when it is meant for
    /// this channel (a target's own channel, or this node's for one of its
    /// connections), ignored and counted otherwise.
    fn control(&self, channel: &str, payload: &[u8]) {
        let control = match wire::decode_control(payload) {
            Ok(control) => control,
            Err(e) => return self.unreadable(channel, &e.to_string()),
        };
        let wire::Order::Disconnect { target, .. } = &control.order;
        if self.channels.of(target) != channel {
            return self.unreadable(channel, "a control payload for another channel");
        }
        let closed = self.sink.order(&control.order);
        tracing::debug!(channel, origin = %control.origin, closed, "control order carried out");
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
