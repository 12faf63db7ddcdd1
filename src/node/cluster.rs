//! What the server API (`/api/*`) asks of the cluster through this node:
//! publishing a batch with an idempotency key, closing sockets on every
//! node that holds them, the topics the nodes hold, and a topic's recent
//! history. The HTTP side (`src/http/api.rs`) only reads requests and
//! writes answers; the rules are here.

use std::time::Duration;

use serde::Serialize;

use super::{Node, PublishError};
use crate::bus::BusError;
use crate::bus::wire::Order;
use crate::envelope::Envelope;
use crate::history::{HistoryError, Position, Recent, client_key};
use crate::route::Topic;

/// How long an idempotency key of `POST /api/publish` is remembered.
pub const IDEMPOTENCY_TTL: Duration = Duration::from_secs(300);

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
        /// `"; the idempotency key was released"`, or empty without one.
        released: &'static str,
        /// The refusal.
        source: BusError,
    },
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
    /// and answers as the first request did, with `duplicate`.
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
        if let Some(key) = key {
            let claim = self.control.claim(key, published, IDEMPOTENCY_TTL).await;
            match claim {
                Ok(None) => {}
                Ok(Some(first)) => {
                    return Ok(Published {
                        published: first,
                        duplicate: true,
                    });
                }
                Err(source) => return Err(ServerApiError::Claim { source }),
            }
        }
        // Every message or none: a retry with the same key (given back
        // below) must not send the first ones again (review of
        // 2026-12-03: one by one, a full queue part-way through published
        // the start of the batch on every try).
        if let Err(e) = self.send_all(&envelopes) {
            self.metrics
                .dropped(e.drop_reason(), envelopes.len() as u64);
            let mut released = "";
            if let Some(key) = key {
                // Best effort: if it fails too, the key expires.
                let _ = self.control.release(key).await;
                released = "; the idempotency key was released";
            }
            let source = match e {
                PublishError::Bus(source) => source,
                other => BusError::Unavailable(other.to_string()),
            };
            return Err(ServerApiError::Bus { released, source });
        }
        Ok(Published {
            published,
            duplicate: false,
        })
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
