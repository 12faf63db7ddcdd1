//! The control plane: what the server API (`/api/*`) asks of the whole
//! cluster besides messages — closing sockets wherever they are, bans,
//! idempotency keys, and which topics the nodes hold.
//!
//! Two implementations, like the buses: [`Local`] (one node, in memory,
//! acting on its own hub) and the Redis bus's (`src/bus/redis/control.rs`),
//! which a bus offers with [`Bus::control`](super::Bus::control).
//!
//! **Disconnects travel on the target's own channel**: a user's, a
//! group's, or, for one connection, its node instance's. Only the nodes
//! subscribed to it (those holding a socket of the target, or still within
//! `bus.unsubscribe_delay_ms` of the last one leaving) receive it, and the
//! answer is how many did (what `PUBLISH` returns). The payload is a
//! control payload (`wire::encode_control`), never delivered to a socket.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::wire::Order;
use super::{BusError, Deliver};
use crate::route::Topic;

/// The future type of the [`ControlPlane`] calls.
pub type ControlFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, BusError>> + Send + 'a>>;

/// A topic some node holds, and how many nodes hold it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    /// The topic.
    pub topic: Topic,
    /// Nodes subscribed to it.
    pub nodes: u64,
}

/// What the server API asks of the cluster; see the module docs. Every
/// call fails with [`BusError::Unavailable`] while Redis cannot be reached.
pub trait ControlPlane: Send + Sync + 'static {
    /// Sends `order` to the nodes that hold its target, on the target's
    /// own channel; resolves with how many nodes received it.
    fn disconnect<'a>(&'a self, order: &'a Order) -> ControlFuture<'a, u64>;

    /// Every topic at least one node is subscribed to, from the
    /// subscription state of the bus itself (Redis's `PUBSUB`).
    fn topics(&self) -> ControlFuture<'_, Vec<Held>>;

    /// Claims idempotency key `key` for `ttl`, recording `answer`: `None`
    /// when this call claimed it, `Some(answer)` of the call that had.
    fn claim<'a>(
        &'a self,
        key: &'a str,
        answer: u64,
        ttl: Duration,
    ) -> ControlFuture<'a, Option<u64>>;

    /// Gives a claimed key back (what it was claimed for did not happen).
    fn release<'a>(&'a self, key: &'a str) -> ControlFuture<'a, ()>;

    /// Bans `user` for `ttl`: its new sockets are refused on every node.
    fn ban<'a>(&'a self, user: &'a str, ttl: Duration) -> ControlFuture<'a, ()>;

    /// Whether `user` is banned now, if this node knows without asking
    /// anyone (the Redis bus's ban mirror, `src/bus/redis/bans.rs`);
    /// `None`: ask [`banned`](Self::banned).
    fn banned_here(&self, _user: &str) -> Option<bool> {
        None
    }

    /// Whether `user` is banned now.
    fn banned<'a>(&'a self, user: &'a str) -> ControlFuture<'a, bool>;
}

/// Most idempotency keys (and, apart, bans) a [`Local`] control plane
/// keeps at once; beyond it, new ones are refused with
/// [`BusError::Overloaded`] until old ones expire.
pub const LOCAL_MAX_ENTRIES: usize = 100_000;

/// The control plane of a node that is alone: its own hub, and keys and
/// bans in memory (gone when it restarts).
pub struct Local {
    sink: Arc<dyn Deliver>,
    /// `std::sync::Mutex`: a few map operations, never held across an await.
    claims: Mutex<Expiring<u64>>,
    bans: Mutex<Expiring<()>>,
}

/// A map whose entries expire, bounded by [`LOCAL_MAX_ENTRIES`].
struct Expiring<T> {
    entries: HashMap<String, (T, Instant)>,
}

impl<T: Copy> Expiring<T> {
    fn new() -> Self {
        Self {
            entries: HashMap::new(),
        }
    }

    fn get(&self, key: &str, now: Instant) -> Option<T> {
        self.entries
            .get(key)
            .filter(|(_, until)| *until > now)
            .map(|(value, _)| *value)
    }

    fn put(&mut self, key: &str, value: T, until: Instant, now: Instant) -> Result<(), BusError> {
        if self.entries.len() >= LOCAL_MAX_ENTRIES && !self.entries.contains_key(key) {
            self.entries.retain(|_, (_, until)| *until > now);
            if self.entries.len() >= LOCAL_MAX_ENTRIES {
                return Err(BusError::Overloaded);
            }
        }
        self.entries.insert(key.to_owned(), (value, until));
        Ok(())
    }
}

impl Local {
    /// The control plane of the node whose hub is `sink`.
    pub fn new(sink: Arc<dyn Deliver>) -> Self {
        Self {
            sink,
            claims: Mutex::new(Expiring::new()),
            bans: Mutex::new(Expiring::new()),
        }
    }
}

fn ready<'a, T: Send + 'a>(value: Result<T, BusError>) -> ControlFuture<'a, T> {
    Box::pin(std::future::ready(value))
}

impl ControlPlane for Local {
    fn disconnect<'a>(&'a self, order: &'a Order) -> ControlFuture<'a, u64> {
        let closed = self.sink.order(order);
        ready(Ok(u64::from(closed > 0)))
    }

    fn topics(&self) -> ControlFuture<'_, Vec<Held>> {
        let held = self
            .sink
            .topics()
            .into_iter()
            .map(|topic| Held { topic, nodes: 1 })
            .collect();
        ready(Ok(held))
    }

    fn claim<'a>(
        &'a self,
        key: &'a str,
        answer: u64,
        ttl: Duration,
    ) -> ControlFuture<'a, Option<u64>> {
        let now = Instant::now();
        let mut claims = self.claims.lock().unwrap_or_else(|e| e.into_inner());
        let result = match claims.get(key, now) {
            Some(earlier) => Ok(Some(earlier)),
            None => claims.put(key, answer, now + ttl, now).map(|()| None),
        };
        ready(result)
    }

    fn release<'a>(&'a self, key: &'a str) -> ControlFuture<'a, ()> {
        let mut claims = self.claims.lock().unwrap_or_else(|e| e.into_inner());
        claims.entries.remove(key);
        ready(Ok(()))
    }

    fn ban<'a>(&'a self, user: &'a str, ttl: Duration) -> ControlFuture<'a, ()> {
        let now = Instant::now();
        let mut bans = self.bans.lock().unwrap_or_else(|e| e.into_inner());
        ready(bans.put(user, (), now + ttl, now))
    }

    fn banned_here(&self, user: &str) -> Option<bool> {
        let bans = self.bans.lock().unwrap_or_else(|e| e.into_inner());
        Some(bans.get(user, Instant::now()).is_some())
    }

    fn banned<'a>(&'a self, user: &'a str) -> ControlFuture<'a, bool> {
        ready(Ok(self.banned_here(user) == Some(true)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::Envelope;

    struct Nothing;
    impl Deliver for Nothing {
        fn deliver(&self, _: &Topic, _: &Arc<Envelope>) {}
    }

    #[tokio::test(start_paused = true)]
    async fn keys_and_bans_expire() {
        let local = Local::new(Arc::new(Nothing));
        let ttl = Duration::from_secs(300);
        assert_eq!(local.claim("k", 3, ttl).await.unwrap(), None);
        assert_eq!(local.claim("k", 9, ttl).await.unwrap(), Some(3));
        local.release("k").await.unwrap();
        assert_eq!(local.claim("k", 4, ttl).await.unwrap(), None);
        tokio::time::advance(ttl).await;
        assert_eq!(local.claim("k", 5, ttl).await.unwrap(), None, "expired");

        assert!(!local.banned("u").await.unwrap());
        local.ban("u", Duration::from_millis(500)).await.unwrap();
        assert!(local.banned("u").await.unwrap());
        tokio::time::advance(Duration::from_millis(500)).await;
        assert!(!local.banned("u").await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn the_maps_are_bounded() {
        let local = Local::new(Arc::new(Nothing));
        let ttl = Duration::from_secs(1);
        for i in 0..LOCAL_MAX_ENTRIES {
            local.claim(&i.to_string(), 1, ttl).await.unwrap();
        }
        assert!(matches!(
            local.claim("one more", 1, ttl).await,
            Err(BusError::Overloaded)
        ));
        tokio::time::advance(ttl).await;
        assert_eq!(local.claim("one more", 1, ttl).await.unwrap(), None);
    }
}
