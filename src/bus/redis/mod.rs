//! The Redis bus: any number of nodes share one Redis (or one Redis Cluster,
//! with sharded pub/sub).
//!
//! Two tasks per node, each owning its connection:
//!
//! - the **publisher** drains a bounded queue of encoded messages and sends
//!   them as one pipeline per wake-up. A message that cannot be sent (Redis
//!   down) waits in the queue, and is retried until `redis.publish_retry_ms`
//!   after it was published; then it is dropped, counted and logged. A
//!   pipeline that fails mid-flight is dropped, not resent: Redis may already
//!   have delivered part of it, and delivering twice is worse than the loss
//!   pub/sub already allows.
//! - the **subscriber** holds the one subscriber connection, subscribes and
//!   unsubscribes in batches, delivers what arrives to the hub, and sends the
//!   health probe. When the connection drops it reconnects with capped
//!   backoff and resubscribes every topic the node holds.
//!
//! Messages are delivered to this node's own sockets directly at publish
//! time (so same-node delivery goes on while Redis is away) and the node
//! ignores its own messages coming back from Redis (the origin node id in
//! every payload).
//!
//! **Health** is end to end: every `redis.probe_interval_ms` the node
//! publishes a probe to its own probe channel through the publisher, and it
//! is healthy only while the subscriber is connected and a probe came back
//! within `redis.probe_timeout_ms`. A node whose subscriber is wedged while
//! publishing still works therefore turns unready instead of silently
//! missing every message.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use axum::body::Bytes;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

mod conn;
mod queue;

use conn::{Backoff, Incoming, Link, PubConn, connect_publisher, connect_subscriber};
use queue::PublishQueue;

use super::wire::{self, Channels};
use super::{Bus, BusError, Deliver, Envelope, Interest, Subscribed};
use crate::config::RedisConfig;
use crate::metrics::{DropReason, Metrics};
use crate::route::Topic;

/// Most messages sent in one pipeline.
const MAX_BATCH: usize = 512;
/// Most channels in one SUBSCRIBE.
const MAX_SUBSCRIBE_BATCH: usize = 1000;
/// Subscription requests waiting for the subscriber task. Full means the
/// node is connecting sockets faster than Redis confirms them: the socket
/// is refused with 503 and may retry.
const SUBSCRIBE_QUEUE: usize = 8192;
/// The first reconnect delay; doubled per failure up to `reconnect_max`.
const MIN_BACKOFF: Duration = Duration::from_millis(50);

/// The Redis implementation of [`Bus`].
pub struct RedisBus {
    shared: Arc<Shared>,
    commands: mpsc::Sender<SubscribeRequest>,
    stop: CancellationToken,
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
    /// Bumped on every subscriber (re)connect. A Redis the subscriber lost
    /// is one the publisher lost too, perhaps without noticing yet (it may
    /// have sent nothing during a short restart): the publisher reconnects
    /// before it sends on a connection from an older epoch, instead of
    /// finding out by losing a batch.
    epoch: AtomicU64,
    /// Milliseconds since `started` when the last probe came back, plus one;
    /// 0 = never.
    last_probe: AtomicU64,
    /// Unreadable payloads are logged once per node.
    unreadable_logged: AtomicBool,
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
    ) -> Result<Self, BusError> {
        let link = Link::new(&config)?;
        let channels = Channels::new(&config.channel_prefix);
        let shared = Arc::new(Shared {
            probe_channel: channels.probe(&node_id),
            channels,
            node_id,
            queue: PublishQueue::new(config.publish_queue),
            config,
            sink,
            interest: Interest::new(release_delay),
            metrics,
            started: Instant::now(),
            subscriber_up: AtomicBool::new(false),
            epoch: AtomicU64::new(0),
            last_probe: AtomicU64::new(0),
            unreadable_logged: AtomicBool::new(false),
        });
        let (commands, requests) = mpsc::channel(SUBSCRIBE_QUEUE);
        let stop = CancellationToken::new();
        tokio::spawn(publisher(shared.clone(), link.clone(), stop.clone()));
        tokio::spawn(subscriber(shared.clone(), link, requests, stop.clone()));
        Ok(Self {
            shared,
            commands,
            stop,
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
        for topic in topics {
            if shared.interest.contains(topic) {
                shared.sink.deliver(topic, &envelope);
            }
        }
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
            return Err(BusError::Unavailable("not subscribed to Redis".into()));
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

    fn shutdown(&self) {
        self.stop.cancel();
    }
}

impl Shared {
    fn since_start(&self) -> Duration {
        self.started.elapsed()
    }

    /// Handles one message from the subscriber connection.
    fn receive(&self, channel: &str, payload: Bytes) {
        if channel == self.probe_channel {
            let now = self.since_start().as_millis() as u64 + 1;
            self.last_probe.store(now, Ordering::Release);
            return;
        }
        let Some(topic) = self.channels.topic(channel) else {
            return self.unreadable(channel, "not a topic channel");
        };
        match wire::decode(payload) {
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

async fn publisher(shared: Arc<Shared>, link: Link, stop: CancellationToken) {
    let config = &shared.config;
    // The connection and the subscriber epoch it was opened in.
    let mut conn: Option<(PubConn, u64)> = None;
    let mut backoff = Backoff::new(config.reconnect_max);
    // Whether we are in an outage (to log its start and end once).
    let mut outage = false;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = shared.queue.wait() => {}
        }
        let expired = shared.queue.expire(config.publish_retry);
        if expired > 0 {
            shared
                .metrics
                .dropped(DropReason::BusUnavailable, expired as u64);
            warn!(
                dropped = expired,
                retry_ms = config.publish_retry.as_millis() as u64,
                "Redis unreachable: dropped messages that waited longer than redis.publish_retry_ms"
            );
        }
        let epoch = shared.epoch.load(Ordering::Acquire);
        if conn.as_ref().is_some_and(|(_, opened)| *opened != epoch) {
            conn = None;
        }
        let Some((active, _)) = conn.as_mut() else {
            match timeout(config.command_timeout, connect_publisher(&link, config)).await {
                Ok(Ok(c)) => {
                    conn = Some((c, epoch));
                    backoff.reset();
                    if outage {
                        info!("publisher reconnected to Redis");
                        outage = false;
                    }
                }
                failed => {
                    if !outage {
                        let error = match failed {
                            Ok(Err(e)) => e.to_string(),
                            _ => "connect timed out".to_owned(),
                        };
                        warn!(%error, "publisher cannot reach Redis; retrying");
                        outage = true;
                    }
                    shared.metrics.bus_reconnect_attempt();
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(backoff.step()) => {}
                    }
                }
            }
            continue;
        };
        let batch = shared.queue.take(MAX_BATCH);
        if batch.is_empty() {
            continue;
        }
        if let Err(e) = active.send(&batch).await {
            // Part of the pipeline may have been delivered: drop it rather
            // than risk delivering twice.
            shared
                .metrics
                .dropped(DropReason::BusUnavailable, batch.len() as u64);
            shared.metrics.bus_publish_failure();
            warn!(error = %e, dropped = batch.len(), "publishing to Redis failed; reconnecting");
            conn = None;
            outage = true;
        }
    }
}

// ---- The subscriber task -------------------------------------------------

async fn subscriber(
    shared: Arc<Shared>,
    link: Link,
    mut requests: mpsc::Receiver<SubscribeRequest>,
    stop: CancellationToken,
) {
    let config = shared.config.clone();
    let mut backoff = Backoff::new(config.reconnect_max);
    let mut connected_before = false;
    // Whether the current outage was logged already.
    let mut outage_logged = false;
    loop {
        // Connect, and subscribe to everything this node holds.
        let attempt = async {
            let mut conn = connect_subscriber(&link, &config).await?;
            let mut channels = vec![shared.probe_channel.clone()];
            channels.extend(shared.interest.held().iter().map(|t| shared.channels.of(t)));
            for chunk in channels.chunks(MAX_SUBSCRIBE_BATCH) {
                conn.subscribe(chunk).await?;
            }
            redis::RedisResult::Ok(conn)
        };
        let mut conn = tokio::select! {
            () = stop.cancelled() => return,
            result = timeout(config.command_timeout * 4, attempt) => match result {
                Ok(Ok(conn)) => conn,
                failed => {
                    let error = match failed { Ok(Err(e)) => e.to_string(), _ => "timed out".to_owned() };
                    if !outage_logged {
                        warn!(%error, "subscriber cannot reach Redis; retrying");
                        outage_logged = true;
                    }
                    shared.metrics.bus_reconnect_attempt();
                    let pause = tokio::time::sleep(backoff.step());
                    tokio::pin!(pause);
                    // Refuse subscriptions while disconnected rather than
                    // keep sockets waiting.
                    loop {
                        tokio::select! {
                            () = stop.cancelled() => return,
                            () = &mut pause => break,
                            Some(request) = requests.recv() => {
                                let _ = request.ack.send(Err(BusError::Unavailable(error.clone())));
                            }
                        }
                    }
                    continue;
                }
            },
        };
        backoff.reset();
        outage_logged = false;
        // Ready again only once a probe has made the whole trip on the new
        // connection (and the publisher has followed to the new epoch).
        shared.last_probe.store(0, Ordering::Release);
        shared.epoch.fetch_add(1, Ordering::AcqRel);
        let connected_at = shared.since_start();
        let mut subscribed: std::collections::HashSet<Topic> =
            shared.interest.held().into_iter().collect();
        shared.metrics.bus_channels(subscribed.len());
        shared.subscriber_up.store(true, Ordering::Release);
        info!(node = %shared.node_id, channels = subscribed.len(), reconnect = connected_before, "subscribed to Redis");
        connected_before = true;

        let release_every = (shared.interest.release_delay() / 2).max(Duration::from_millis(50));
        let mut release = tokio::time::interval(release_every);
        let mut probe = tokio::time::interval(config.probe_interval);
        let lost: String = loop {
            tokio::select! {
                () = stop.cancelled() => return,
                incoming = conn.next() => match incoming {
                    Incoming::Message(channel, payload) => shared.receive(&channel, payload),
                    Incoming::Other => {}
                    Incoming::Closed => break "connection closed".into(),
                },
                Some(first) = requests.recv() => {
                    let mut batch = vec![first];
                    while batch.len() < MAX_SUBSCRIBE_BATCH {
                        match requests.try_recv() {
                            Ok(r) => batch.push(r),
                            Err(_) => break,
                        }
                    }
                    let mut new: Vec<Topic> = batch.iter().map(|r| r.topic.clone())
                        .filter(|t| !subscribed.contains(t)).collect();
                    new.sort();
                    new.dedup();
                    let names: Vec<String> = new.iter().map(|t| shared.channels.of(t)).collect();
                    let result = if names.is_empty() { Ok(Ok(())) }
                        else { timeout(config.command_timeout, conn.subscribe(&names)).await };
                    match result {
                        Ok(Ok(())) => {
                            subscribed.extend(new);
                            shared.metrics.bus_channels(subscribed.len());
                            for r in batch { let _ = r.ack.send(Ok(())); }
                        }
                        failed => {
                            let error = match failed { Ok(Err(e)) => e.to_string(), _ => "SUBSCRIBE timed out".to_owned() };
                            for r in batch { let _ = r.ack.send(Err(BusError::Unavailable(error.clone()))); }
                            break error;
                        }
                    }
                }
                _ = release.tick() => {
                    let released: Vec<Topic> = shared.interest.expire(Instant::now())
                        .into_iter().filter(|t| subscribed.contains(t)).collect();
                    if !released.is_empty() {
                        let names: Vec<String> = released.iter().map(|t| shared.channels.of(t)).collect();
                        for t in &released { subscribed.remove(t); }
                        shared.metrics.bus_channels(subscribed.len());
                        match timeout(config.command_timeout, conn.unsubscribe(&names)).await {
                            Ok(Ok(())) => {}
                            Ok(Err(e)) => break e.to_string(),
                            Err(_) => break "UNSUBSCRIBE timed out".into(),
                        }
                    }
                }
                _ = probe.tick() => {
                    // A connection that delivers nothing, not even our own
                    // probes, is wedged: start over on a new one.
                    let last = Duration::from_millis(shared.last_probe.load(Ordering::Acquire).saturating_sub(1));
                    let silent = shared.since_start().saturating_sub(last.max(connected_at));
                    if silent > config.probe_timeout * 2 {
                        break format!("no probe came back for {} ms", silent.as_millis());
                    }
                    // Through the publisher, so the probe tests the whole path.
                    let _ = shared.queue.push(vec![shared.probe_channel.clone()], Bytes::from_static(b"probe"));
                }
            }
        };
        shared.subscriber_up.store(false, Ordering::Release);
        warn!(reason = %lost, "lost the Redis subscriber connection; reconnecting");
    }
}
