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
use std::sync::atomic::{AtomicU64, Ordering};
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

    /// Claims idempotency key `key`, pending, for `pending` at most: the
    /// publish it guards must then be confirmed ([`confirm`](Self::confirm))
    /// or the claim given back ([`release`](Self::release)). A pending
    /// claim whose node died expires, and the key is free again.
    fn claim<'a>(
        &'a self,
        key: &'a str,
        answer: u64,
        pending: Duration,
    ) -> ControlFuture<'a, Claim>;

    /// Records that what `ticket` claimed `key` for happened: the key
    /// answers [`Claim::Done`] for `ttl` from now. `false` when the claim
    /// was no longer there (it expired; another request may hold the key).
    fn confirm<'a>(
        &'a self,
        key: &'a str,
        ticket: &'a Ticket,
        ttl: Duration,
    ) -> ControlFuture<'a, bool>;

    /// Gives a claim back (what it was made for did not happen); a claim
    /// that is no longer `ticket`'s is left alone.
    fn release<'a>(&'a self, key: &'a str, ticket: &'a Ticket) -> ControlFuture<'a, ()>;

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

/// What [`ControlPlane::claim`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// This call claimed the key, pending: confirm it or give it back
    /// with the ticket.
    Ours(Ticket),
    /// A request with the key was published: the number of messages it
    /// published.
    Done(u64),
    /// Another request holds the key and has not settled yet.
    Pending,
}

/// A pending claim, as its maker holds it: what tells it from a claim of
/// the same key made by anyone else.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticket(pub(crate) String);

/// Most idempotency keys (and, apart, bans) a [`Local`] control plane
/// keeps at once; beyond it, new ones are refused with
/// [`BusError::Overloaded`] until old ones expire.
pub const LOCAL_MAX_ENTRIES: usize = 100_000;

/// The control plane of a node that is alone: its own hub, and keys and
/// bans in memory (gone when it restarts).
pub struct Local {
    sink: Arc<dyn Deliver>,
    /// `std::sync::Mutex`: a few map operations, never held across an await.
    claims: Mutex<Expiring<Kept>>,
    /// The number of the next claim's ticket.
    tickets: AtomicU64,
    bans: Mutex<Expiring<()>>,
}

/// An idempotency key in a [`Local`] control plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kept {
    /// Claimed by the ticket of number `ticket`, for `answer`, not yet
    /// settled.
    Pending { ticket: u64, answer: u64 },
    /// Published: its answer.
    Done(u64),
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
            tickets: AtomicU64::new(0),
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
        pending: Duration,
    ) -> ControlFuture<'a, Claim> {
        let now = Instant::now();
        let mut claims = self.claims.lock().unwrap_or_else(|e| e.into_inner());
        let result = match claims.get(key, now) {
            Some(Kept::Done(answer)) => Ok(Claim::Done(answer)),
            Some(Kept::Pending { .. }) => Ok(Claim::Pending),
            None => {
                let ticket = self.tickets.fetch_add(1, Ordering::Relaxed);
                claims
                    .put(key, Kept::Pending { ticket, answer }, now + pending, now)
                    .map(|()| Claim::Ours(Ticket(ticket.to_string())))
            }
        };
        ready(result)
    }

    fn confirm<'a>(
        &'a self,
        key: &'a str,
        ticket: &'a Ticket,
        ttl: Duration,
    ) -> ControlFuture<'a, bool> {
        let now = Instant::now();
        let mut claims = self.claims.lock().unwrap_or_else(|e| e.into_inner());
        let result = match claims.get(key, now) {
            Some(Kept::Pending { ticket: t, answer }) if ticket.0 == t.to_string() => claims
                .put(key, Kept::Done(answer), now + ttl, now)
                .map(|()| true),
            _ => Ok(false),
        };
        ready(result)
    }

    fn release<'a>(&'a self, key: &'a str, ticket: &'a Ticket) -> ControlFuture<'a, ()> {
        let now = Instant::now();
        let mut claims = self.claims.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(Kept::Pending { ticket: t, .. }) = claims.get(key, now)
            && ticket.0 == t.to_string()
        {
            claims.entries.remove(key);
        }
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

    fn ours(claim: Claim) -> Ticket {
        match claim {
            Claim::Ours(ticket) => ticket,
            other => panic!("not claimed: {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn keys_and_bans_expire() {
        let local = Local::new(Arc::new(Nothing));
        let (pending, ttl) = (Duration::from_secs(10), Duration::from_secs(300));
        let first = ours(local.claim("k", 3, pending).await.unwrap());
        assert_eq!(local.claim("k", 9, pending).await.unwrap(), Claim::Pending);
        assert!(local.confirm("k", &first, ttl).await.unwrap());
        assert_eq!(local.claim("k", 9, pending).await.unwrap(), Claim::Done(3));
        // A confirmed key is not given back by its old ticket.
        local.release("k", &first).await.unwrap();
        assert_eq!(local.claim("k", 9, pending).await.unwrap(), Claim::Done(3));
        tokio::time::advance(ttl).await;
        let second = ours(local.claim("k", 4, pending).await.unwrap());
        local.release("k", &second).await.unwrap();
        let third = ours(local.claim("k", 5, pending).await.unwrap());
        // Pending, never confirmed (its node died): free again after it.
        tokio::time::advance(pending).await;
        let fourth = ours(local.claim("k", 6, pending).await.unwrap());
        assert!(
            !local.confirm("k", &third, ttl).await.unwrap(),
            "an expired claim is not confirmed over a later one"
        );
        local.release("k", &third).await.unwrap();
        assert_eq!(local.claim("k", 7, pending).await.unwrap(), Claim::Pending);
        assert!(local.confirm("k", &fourth, ttl).await.unwrap());
        assert_eq!(local.claim("k", 7, pending).await.unwrap(), Claim::Done(6));

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
        ours(local.claim("one more", 1, ttl).await.unwrap());
    }
}
