//! The bus: how a message published on one node reaches the *other* nodes.
//!
//! The node delivers a message to its own sockets itself
//! (`Node::publish` hands it to the
//! `Hub` (`src/hub.rs`)) and then gives it to the [`Bus`], which carries
//! it to every other node and never back to this one (as in
//! Phoenix.PubSub: broadcast = local dispatch + the adapter). The path of a
//! message is therefore one straight line: socket → node → bus → (other)
//! node → hub → socket, with the same node code on one node and on many.
//!
//! There are two implementations: [`SingleNodeBus`] (one node: nobody to
//! carry anything to) and [`RedisBus`] (any number of nodes on one Redis or
//! Redis Cluster). A bus is built by a [`MakeBus`] factory that is given
//! the node's delivery sink, so a bus cannot be wired to another node's
//! hub. `tests/it/bus_conformance.rs` holds the test suite every
//! implementation must pass.
//!
//! # Contract
//!
//! * **Other nodes only** — unless the bus keeps history. [`Bus::publish`]
//!   carries a message to every other node, never back to this one: a bus
//!   that hears its own node's message (Redis echoes every publish to every
//!   subscriber) ignores it. A bus whose [`Bus::history`] is `Some` instead
//!   delivers every message, its own node's too, from the one stream it
//!   stamps them in, and the node does not deliver at publish time.
//! * **Topics.** A message is published once per topic of its
//!   [`Route`](crate::route::Route); a node receives one copy per topic it is
//!   subscribed to, handed to its [`Deliver`] sink together with that topic.
//!   Which sockets accept which copy is decided by
//!   [`Route::accepts`](crate::route::Route::accepts), not by the bus.
//! * **Subscriptions are reference counted.** [`Bus::subscribe`] adds one
//!   reference and [`Bus::unsubscribe`] removes one; the bus is subscribed
//!   while the count is above zero, and stops a short, configurable delay
//!   after it falls to zero (connect/disconnect churn then costs nothing).
//!   The reference is taken when `subscribe` is called, even if the future
//!   it returns is dropped; the future resolves once every message
//!   published *after* it resolved will be delivered (or fails, and the
//!   caller must then release the reference). Callers await it before they
//!   tell a client its socket is open.
//! * **Order.** Messages published by one caller, in sequence, are delivered
//!   in that order, per subscriber.
//! * **No blocking.** `publish`, `subscribe`, `unsubscribe` never block the
//!   caller; a bus that cannot take a message now says so with an error.
//! * **Delivery** is at most once: a bus never duplicates a copy, but one that
//!   is disconnected may lose copies, and says so in its health. A bus with
//!   history fills such losses from it before it delivers anything newer on
//!   the topic, and reports through [`Deliver::gap`] what it cannot fill.
//! * **Shutdown** ([`Bus::shutdown`]) first sends what was published and is
//!   still queued, within the time it is given, and resolves once the bus's
//!   background tasks have ended; the server awaits it before it returns.

pub mod control;
mod interest;
pub mod presence;
mod redis;
pub mod registry;
mod single_node;
pub mod wire;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

pub use interest::Interest;
pub use redis::RedisBus;
pub use single_node::SingleNodeBus;

use crate::config::{Config, PresenceConfig};
use crate::envelope::Envelope;
use crate::history::History;
use crate::metrics::Metrics;
use crate::position::Position;
use crate::route::Topic;
use crate::shutdown::Shutdown;

/// What a bus hands messages from other nodes to: on a node, the
/// `Hub` (`src/hub.rs`) (which the node also hands its own messages to).
pub trait Deliver: Send + Sync + 'static {
    /// Called once per copy received through `via`. Must not block: it runs
    /// on the bus's receiving task (and on the publisher's task, when the
    /// node delivers its own messages).
    fn deliver(&self, via: &Topic, envelope: &Arc<Envelope>);

    /// Called when a bus with history found that messages on `topic` were
    /// lost to this node and cannot be replayed from history (they were
    /// trimmed, expired, or the topic's history started afresh): sockets
    /// that speak resume are told (`wshub.gap`). A gap the bus could fill
    /// is never reported: the missing messages are delivered, in order,
    /// before the next one.
    ///
    /// `at`: the position of the topic's current epoch that everything
    /// lost is at or before — the last position lost when the loss is a
    /// run of one epoch (history trimmed or expired); where the new epoch
    /// goes on from when the topic's history started afresh (what the old
    /// one lost is unknown, and behind it). The notice names it, so that
    /// a client's next resume starts there; and a socket whose floor in
    /// that epoch reaches it already has what it would be told of (a
    /// resume's replay read those messages, or started from that epoch)
    /// and is not told. `None` (the topic has no epoch now): every socket
    /// that speaks resume is told, with no position.
    fn gap(&self, topic: &Topic, at: Option<&Position>) {
        let _ = (topic, at);
    }

    /// Whether sockets here that speak resume hold `topic`: positions in
    /// it were handed out, so a catch-up that finds the topic without an
    /// epoch of this Redis run makes it one and reports a gap at its
    /// start (`src/bus/redis/gaps.rs`).
    fn resume_held(&self, topic: &Topic) -> bool {
        let _ = topic;
        false
    }

    /// Carries out a control order (`POST /api/disconnect`, see
    /// [`control`]): never a message, never delivered to a socket.
    /// Returns how many sockets it closed.
    fn order(&self, order: &wire::Order) -> usize {
        let _ = order;
        0
    }

    /// The topics this node's sockets are reached through, now (for the
    /// single-node control plane, which has no bus to ask).
    fn topics(&self) -> Vec<Topic> {
        Vec::new()
    }
}

/// Builds a node's bus, given the sink that node's received messages go to.
///
/// The node builds its hub first and then calls the factory with it, so a
/// bus can only ever deliver into the hub of the node that owns it.
/// The bus's tasks run on the [`Shutdown`] it is given (a child of the
/// node's), so the node's shutdown waits for them.
pub type MakeBus =
    Box<dyn FnOnce(Arc<dyn Deliver>, Shutdown) -> Result<Arc<dyn Bus>, BusError> + Send>;

/// The factory for the bus `config` asks for: [`RedisBus`] when
/// `redis.url` is set, [`SingleNodeBus`] otherwise.
pub fn from_config(config: &Config, metrics: Arc<Metrics>) -> MakeBus {
    let release_delay = config.bus.unsubscribe_delay;
    match &config.redis {
        None => Box::new(|_sink, _shutdown| Ok(Arc::new(SingleNodeBus::new()) as Arc<dyn Bus>)),
        Some(redis) => {
            let (node_id, redis) = (config.node_id.as_str().into(), redis.clone());
            let history = config.history.clone();
            Box::new(move |sink, shutdown| {
                let bus = RedisBus::start(
                    node_id,
                    redis,
                    history,
                    sink,
                    metrics,
                    release_delay,
                    shutdown,
                )?;
                Ok(Arc::new(bus) as Arc<dyn Bus>)
            })
        }
    }
}

/// What became of a batch [`Bus::publish_all`] took: see
/// [`published`](Self::published).
#[derive(Debug)]
#[must_use = "a batch's receipt says whether it was published"]
pub struct Receipt(Option<tokio::sync::oneshot::Receiver<bool>>);

impl Receipt {
    /// The receipt of a batch carried already (or with nobody to carry it
    /// to: one node alone).
    pub fn carried() -> Self {
        Self(None)
    }

    /// A receipt told through `told` (`true`: carried whole).
    pub fn pending(told: tokio::sync::oneshot::Receiver<bool>) -> Self {
        Self(Some(told))
    }

    /// Resolves once the batch is settled: `true` when every message of
    /// it was carried (on Redis: every `PUBLISH` ran), `false` when some
    /// or all of it may not have been (dropped after a failed or unknown
    /// send, counted in `wshub_messages_dropped_total`). A bus settles
    /// every batch within `redis.publish_retry_ms` and
    /// `redis.command_timeout_ms` of taking it.
    pub async fn published(self) -> bool {
        match self.0 {
            None => true,
            Some(told) => told.await.unwrap_or(false),
        }
    }
}

/// Resolves when a subscription has taken effect, see [`Bus::subscribe`].
pub type Subscribed = Pin<Box<dyn Future<Output = Result<(), BusError>> + Send>>;

/// The bus contract; see the module docs.
pub trait Bus: Send + Sync + 'static {
    /// Carries `envelope` to every topic of its route on every *other*
    /// node, never back to this one (the node delivers it to its own
    /// sockets once the bus has taken it). An error means no other node
    /// will receive it, and the node delivers it to nobody.
    fn publish(&self, envelope: Arc<Envelope>) -> Result<(), BusError>;

    /// [`publish`](Self::publish) of every one of `envelopes`, in order,
    /// **or of none**: an error means no message of them will reach any
    /// node (`POST /api/publish`, whose retry must not send the first of
    /// them again). Taken, the batch comes with a [`Receipt`] that says
    /// when the bus has carried all of it (Redis ran every `PUBLISH`), or
    /// that some of it may be lost.
    fn publish_all(&self, envelopes: &[Arc<Envelope>]) -> Result<Receipt, BusError>;

    /// Adds a reference to `topic`; the future resolves once the subscription
    /// is in effect.
    fn subscribe(&self, topic: &Topic) -> Subscribed;

    /// Removes a reference to `topic`.
    fn unsubscribe(&self, topic: &Topic);

    /// The history this bus keeps, when `history.enabled`. A bus with
    /// history stamps every message ([`Envelope::stamp`]) and delivers the
    /// node's **own** messages to it too, from the same stream as everyone
    /// else's, so every socket sees one order per topic with positions; the
    /// node then does not deliver locally at publish time.
    fn history(&self) -> Option<Arc<dyn History>> {
        None
    }

    /// `Ok` while the bus can deliver messages published anywhere to this
    /// node; otherwise why not.
    fn health(&self) -> Result<(), BusError>;

    /// The node registry of the nodes sharing this bus (see [`registry`]),
    /// with leases per `presence`; the node [joins](registry::Registry::join)
    /// it. Called once. The default is [`registry::Alone`]: this node only.
    fn registry(&self, presence: &PresenceConfig) -> Arc<dyn registry::Registry> {
        let _ = presence;
        Arc::new(registry::Alone::new())
    }

    /// This node instance's address on the bus (`<node id>-<instance>`),
    /// the start of its connection ids: the bus brings it what is sent to
    /// them (see [`crate::route::node_address`]). `None`: the node picks
    /// one (nothing reaches it from elsewhere).
    fn address(&self) -> Option<Arc<str>> {
        None
    }

    /// The control plane of the cluster this bus joins (see [`control`]),
    /// or `None` for a node alone, whose node then acts on its own hub
    /// ([`control::Local`]).
    fn control(&self) -> Option<Arc<dyn control::ControlPlane>> {
        None
    }

    /// Stops the bus's background work (the node is exiting): messages
    /// already published are still sent, for at most `within`; resolves
    /// when the bus's tasks have ended. Publishing afterwards may fail.
    fn shutdown(&self, within: Duration) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        let _ = within;
        Box::pin(std::future::ready(()))
    }
}

/// Why the bus could not do what was asked.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BusError {
    /// The bus cannot take more messages right now (its publish queue is
    /// full). The message was not published; the sender is told.
    #[error("the hub is overloaded, message not sent")]
    Overloaded,
    /// A batch ([`Bus::publish_all`]) larger than the publish queue can
    /// ever hold: no retry goes through. The text names the limits.
    #[error("{0}")]
    BatchTooLarge(String),
    /// The bus's backing service cannot be reached; the text says why.
    /// From `subscribe`: the socket is refused and may retry. From
    /// `publish`: the service has been unreachable for longer than the bus
    /// would hold a message (`redis.publish_retry_ms`), so the message was
    /// not published, the node delivers it to nobody, and the sender is
    /// told; publishing works again once the service is back.
    #[error("message bus unavailable: {0}")]
    Unavailable(String),
}
