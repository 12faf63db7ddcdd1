//! The bus: how a message published on one node reaches the sockets of every
//! node.
//!
//! The [`Bus`] trait is the whole contract between this node's connections
//! (the [`Hub`](crate::hub::Hub)) and everyone else. There are two
//! implementations: [`LocalBus`] (in-process, one node) and [`RedisBus`]
//! (any number of nodes on one Redis or Redis Cluster). Every publish goes through the bus, also on a single node, so one
//! node and many behave the same. `tests/bus_conformance.rs` holds the test
//! suite every implementation must pass.
//!
//! # Contract
//!
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
//!   is disconnected may lose copies, and says so in its health.
//! * **Shutdown** ([`Bus::shutdown`]) first sends what was published and is
//!   still queued, within the time it is given, and resolves once the bus's
//!   background tasks have ended; the server awaits it before it returns.

mod interest;
mod local;
mod redis;
pub mod wire;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

pub use interest::Interest;
pub use local::LocalBus;
pub use redis::RedisBus;

use crate::message::Frame;
use crate::route::{Route, Topic};

/// One message on its way through the bus: where it goes and the frame the
/// recipients receive, already encoded.
#[derive(Debug)]
pub struct Envelope {
    pub route: Route,
    pub frame: Frame,
}

/// What a bus hands received messages to: on a node, the
/// [`Hub`](crate::hub::Hub).
pub trait Deliver: Send + Sync + 'static {
    /// Called once per copy received through `via`. Must not block: it runs
    /// on the bus's receiving task (or the publisher's, for the local bus).
    fn deliver(&self, via: &Topic, envelope: &Arc<Envelope>);
}

/// Resolves when a subscription has taken effect, see [`Bus::subscribe`].
pub type Subscribed = Pin<Box<dyn Future<Output = Result<(), BusError>> + Send>>;

/// The bus contract; see the module docs.
pub trait Bus: Send + Sync + 'static {
    /// Publishes `envelope` to every topic of its route.
    fn publish(&self, envelope: Arc<Envelope>) -> Result<(), BusError>;

    /// Adds a reference to `topic`; the future resolves once the subscription
    /// is in effect.
    fn subscribe(&self, topic: &Topic) -> Subscribed;

    /// Removes a reference to `topic`.
    fn unsubscribe(&self, topic: &Topic);

    /// `Ok` while the bus can deliver messages published anywhere to this
    /// node; otherwise why not.
    fn health(&self) -> Result<(), BusError>;

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
    /// The bus's backing service cannot be reached; the text says why.
    /// Same-node delivery may still work; cross-node delivery does not.
    #[error("message bus unavailable: {0}")]
    Unavailable(String),
}
