//! What the server API (`/api/*`) asks of the cluster through this node:
//! publishing a batch with an idempotency key, closing sockets on every
//! node that holds them, the topics the nodes hold, and a topic's recent
//! history. The HTTP side (`src/http/api.rs`) only reads requests and
//! writes answers; the rules are here.

use std::time::Duration;

use serde::Serialize;

use super::{Node, PublishError};
use crate::bus::BusError;
use crate::bus::control::{Claim, ControlPlane, Ticket};
use crate::bus::wire::Order;
use crate::envelope::Envelope;
use crate::history::{HistoryError, Position, Recent, client_key};
use crate::route::Topic;

/// How long an idempotency key of `POST /api/publish` is remembered
/// after its batch was published.
pub const IDEMPOTENCY_TTL: Duration = Duration::from_secs(300);

/// What a pending claim's expiry allows beyond the longest a publish takes
/// to settle and be confirmed ([`Node::claim_pending`]).
const CLAIM_MARGIN: Duration = Duration::from_secs(1);

/// How often a request whose key another request holds, pending, asks
/// again.
const CLAIM_POLL: Duration = Duration::from_millis(50);

/// How often a claim that could not be confirmed or given back is tried
/// again (until it would have expired).
const SETTLE_RETRY: Duration = Duration::from_millis(250);

/// Confirms `ticket`'s claim of `key` when its batch was `carried`,
/// otherwise gives it back; a Redis that cannot be reached is asked again
/// until the claim would have expired anyway. A claim not confirmed
/// expires, and a retry then publishes again: at least once.
async fn settle_claim(control: &dyn ControlPlane, key: &str, ticket: &Ticket, carried: bool) {
    let give_up = tokio::time::Instant::now() + IDEMPOTENCY_TTL.min(Duration::from_secs(60));
    loop {
        let settled = if carried {
            match control.confirm(key, ticket, IDEMPOTENCY_TTL).await {
                Ok(true) => Ok(()),
                Ok(false) => {
                    tracing::warn!(
                        "a batch of POST /api/publish was published after its idempotency key's pending claim expired: a retry with the key may have published it again"
                    );
                    Ok(())
                }
                Err(e) => Err(e),
            }
        } else {
            control.release(key, ticket).await
        };
        match settled {
            Ok(()) => return,
            Err(e) if tokio::time::Instant::now() >= give_up => {
                tracing::warn!(
                    error = %e,
                    "an idempotency key's claim could not be settled: it expires by itself (a retry then publishes)"
                );
                return;
            }
            Err(_) => tokio::time::sleep(SETTLE_RETRY).await,
        }
    }
}

/// The answer of [`Node::publish_all`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Published {
    /// Messages published (by the first request with the key, for a
    /// duplicate).
    pub published: u64,
    /// The key was used within [`IDEMPOTENCY_TTL`]: nothing was published
    /// this time.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub duplicate: bool,
}

/// Why [`Node::publish_all`] published nothing (or not everything).
#[derive(Debug, thiserror::Error)]
pub enum ServerApiError {
    /// Message `index` (from 0) is refused; nothing was published.
    #[error("messages[{index}]: {source}")]
    Invalid {
        /// Its place in `messages`.
        index: usize,
        /// Why.
        source: PublishError,
    },
    /// The idempotency key could not be claimed: nothing was published.
    /// The text says what became of a claim whose outcome was unknown (it
    /// is withdrawn, so a retry publishes; see `src/bus/redis/control.rs`).
    #[error("{source} (nothing was published)")]
    Claim {
        /// Why.
        source: BusError,
    },
    /// The bus refused the batch: none of its messages was published
    /// (the bus takes a batch whole or not at all), and a key claimed for
    /// it was given back, so the request can be sent again.
    #[error("{source} (nothing was published{released})")]
    Bus {
        /// What became of the key (`"; the idempotency key was
        /// released"`), or empty without one.
        released: &'static str,
        /// The refusal.
        source: BusError,
    },
    /// The bus took the batch but could not carry all of it (Redis went
    /// away or refused it before its `PUBLISH`es ran, or their outcome is
    /// unknown): some or all of it may not have been published; a key is
    /// given back, so a retry publishes the whole batch (at least once).
    #[error(
        "the messages could not all be published to Redis (some or all may not have been; the node's log says why){released}"
    )]
    Unsent {
        /// What became of the key, or empty without one.
        released: &'static str,
    },
    /// The bus took the batch and had not settled it when the claim's
    /// pending time was up: its outcome is unknown.
    #[error(
        "the messages were not confirmed published in time: their outcome is unknown (the idempotency key, if any, is settled when they are)"
    )]
    Unsettled,
    /// Another request with the idempotency key is being published and
    /// had not settled within `redis.command_timeout_ms`.
    #[error(
        "another request with this idempotency key is still being published: retry in a moment (it answers duplicate once that one is published, or publishes if it failed)"
    )]
    InProgress,
}

/// A `POST /api/disconnect`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disconnect {
    /// A user's, a group's or a connection's topic.
    pub target: Topic,
    /// The close code, 4000–4999.
    pub code: u16,
    /// The close frame's text.
    pub reason: Option<String>,
    /// With a user target: refuse its new sockets for this long.
    pub ban: Option<Duration>,
}

/// One topic of `GET /api/topics`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TopicEntry {
    /// Its client key: `all`, `nullgroup`, `group:<G>`, `user:<U>`.
    pub topic: String,
    /// Nodes subscribed to it.
    pub nodes: u64,
}

impl Node {
    /// Publishes every message of `texts` (each one message JSON) as the
    /// broadcast endpoint would, or none when one is invalid. With `key`,
    /// a key used within [`IDEMPOTENCY_TTL`] on any node publishes nothing
    /// and answers as the first request did, with `duplicate`. Run it to
    /// its end (the HTTP handler spawns it): dropped while its claim is in
    /// flight, the claim may stay pending, for nobody, until it expires.
    pub async fn publish_all(
        &self,
        texts: &[String],
        key: Option<&str>,
    ) -> Result<Published, ServerApiError> {
        let mut envelopes = Vec::with_capacity(texts.len());
        for (index, text) in texts.iter().enumerate() {
            let prepared = self
                .parse(text)
                .map_err(PublishError::from)
                .and_then(|msg| self.prepare(&msg));
            match prepared {
                Ok(envelope) => envelopes.push(envelope),
                Err(source) => {
                    return Err(ServerApiError::Invalid {
                        index,
                        source: self.refused(source),
                    });
                }
            }
        }
        let published = envelopes.len() as u64;
        let ticket = match key {
            Some(key) => match self.claim(key, published).await? {
                Ok(ticket) => Some((key.to_owned(), ticket)),
                Err(first) => return Ok(first),
            },
            None => None,
        };
        // Every message or none: a retry with the same key (given back
        // below) must not send the first ones again (review of
        // 2026-12-03: one by one, a full queue part-way through published
        // the start of the batch on every try).
        let receipt = match self.send_all(&envelopes) {
            Ok(receipt) => receipt,
            Err(e) => {
                self.metrics
                    .dropped(e.drop_reason(), envelopes.len() as u64);
                let mut released = "";
                if let Some((key, ticket)) = &ticket {
                    // If it fails too, the claim expires (a retry answers
                    // 409 until then): said so, not "released".
                    released = match self.control.release(key, ticket).await {
                        Ok(()) => "; the idempotency key was released",
                        Err(_) => {
                            "; the idempotency key could not be released (Redis did not answer): \
                             it frees itself within seconds, a retry meanwhile answers 409"
                        }
                    };
                }
                let source = match e {
                    PublishError::Bus(source) => source,
                    other => BusError::Unavailable(other.to_string()),
                };
                return Err(ServerApiError::Bus { released, source });
            }
        };
        // The answer waits for Redis to have run every `PUBLISH` (a node
        // that died with the batch still queued answered 200 and kept the
        // key: the retry said `duplicate` and nothing was sent). The claim
        // is settled by a task of its own, so that it is settled even when
        // the answer stopped waiting (`Unsettled`).
        let control = self.control.clone();
        let (tell, told) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let carried = receipt.published().await;
            if let Some((key, ticket)) = ticket {
                settle_claim(&*control, &key, &ticket, carried).await;
            }
            let _ = tell.send(carried);
        });
        match tokio::time::timeout(self.claim_pending(), told).await {
            Ok(Ok(true)) => Ok(Published {
                published,
                duplicate: false,
            }),
            Ok(Ok(false) | Err(_)) => Err(ServerApiError::Unsent {
                released: if key.is_some() {
                    "; the idempotency key was released: a retry publishes the whole batch"
                } else {
                    ""
                },
            }),
            Err(_) => Err(ServerApiError::Unsettled),
        }
    }

    /// How long a claim of an idempotency key stays pending at most: past
    /// the longest a publish takes to settle (`Receipt::published`: a
    /// message waits `redis.publish_retry_ms` at most, then the
    /// publisher's turn ends within a connect or a send and a backoff),
    /// with room for the confirmation. 13 s by default.
    fn claim_pending(&self) -> Duration {
        self.config.redis.as_ref().map_or(CLAIM_MARGIN, |redis| {
            redis.publish_retry + redis.reconnect_max + redis.command_timeout * 3 + CLAIM_MARGIN
        })
    }

    /// Claims `key` for a batch of `published` messages: its ticket, or
    /// the answer when a request with it was published already. A claim
    /// another request holds, unsettled, is waited for (polled) for up to
    /// `redis.command_timeout_ms`, then answered 409.
    async fn claim(
        &self,
        key: &str,
        published: u64,
    ) -> Result<Result<Ticket, Published>, ServerApiError> {
        let patience = self
            .config
            .redis
            .as_ref()
            .map_or(Duration::from_secs(2), |r| r.command_timeout);
        let until = tokio::time::Instant::now() + patience;
        loop {
            let claim = self.control.claim(key, published, self.claim_pending());
            match claim.await {
                Ok(Claim::Ours(ticket)) => return Ok(Ok(ticket)),
                Ok(Claim::Done(first)) => {
                    return Ok(Err(Published {
                        published: first,
                        duplicate: true,
                    }));
                }
                Ok(Claim::Pending) if tokio::time::Instant::now() < until => {
                    tokio::time::sleep(CLAIM_POLL).await;
                }
                Ok(Claim::Pending) => return Err(ServerApiError::InProgress),
                Err(source) => return Err(ServerApiError::Claim { source }),
            }
        }
    }

    /// Closes every socket of `order`'s target on every node that holds
    /// one (bans the user first, when asked); answers how many nodes the
    /// order reached.
    pub async fn disconnect(&self, order: &Disconnect) -> Result<u64, BusError> {
        if let (Some(ban), Topic::User(user)) = (order.ban, &order.target) {
            // Before the order: a socket that subscribes after the order
            // went out finds the ban when it checks (`Node::connect_with`).
            self.control.ban(user, ban).await?;
        }
        let wire = Order::Disconnect {
            target: order.target.clone(),
            code: order.code,
            reason: order.reason.clone(),
        };
        self.control.disconnect(&wire).await
    }

    /// The topics some node is subscribed to, with how many nodes, whose
    /// client key starts with `prefix`; sorted by key.
    pub async fn topics(&self, prefix: &str) -> Result<Vec<TopicEntry>, BusError> {
        let mut topics: Vec<TopicEntry> = self
            .control
            .topics()
            .await?
            .into_iter()
            .map(|held| TopicEntry {
                topic: client_key(&held.topic),
                nodes: held.nodes,
            })
            .filter(|entry| entry.topic.starts_with(prefix))
            .collect();
        topics.sort_by(|a, b| a.topic.cmp(&b.topic));
        Ok(topics)
    }

    /// Whether history is on (so `GET /api/history/*` answers).
    pub fn history_enabled(&self) -> bool {
        self.bus.history().is_some()
    }

    /// Up to `limit` messages of `topic`'s history (see
    /// [`History::recent`](crate::history::History::recent)); `None` with
    /// history off.
    pub async fn recent(
        &self,
        topic: &Topic,
        since: Option<&Position>,
        limit: usize,
    ) -> Option<Result<Recent, HistoryError>> {
        let history = self.bus.history()?;
        Some(history.recent(topic, since, limit).await)
    }
}

/// A message of a topic's history as `GET /api/history/*` shows it: its
/// position there and the frame.
pub fn position_in(envelope: &Envelope, topic: &Topic) -> Option<String> {
    envelope
        .stamp
        .as_ref()
        .and_then(|s| s.position(topic))
        .map(ToString::to_string)
}
