//! How a node reaches Redis: a single server (PUBLISH/SUBSCRIBE) or a Redis
//! Cluster with sharded pub/sub (SPUBLISH/SSUBSCRIBE), behind one interface
//! for the publisher and one for the subscriber.

use std::time::Duration;

use axum::body::Bytes;
use futures_util::StreamExt;
use tokio::sync::mpsc;

use super::MIN_BACKOFF;
use super::queue::Outgoing;
use crate::bus::BusError;
use crate::config::RedisConfig;

/// How this node reaches Redis: a single server (PUBLISH/SUBSCRIBE) or a
/// Redis Cluster with sharded pub/sub (SPUBLISH/SSUBSCRIBE).
#[derive(Clone)]
pub(super) enum Link {
    Single(redis::Client),
    Sharded(Vec<String>),
}

impl Link {
    pub(super) fn new(config: &RedisConfig) -> Result<Self, BusError> {
        let bad = |e: redis::RedisError| BusError::Unavailable(format!("invalid redis.url: {e}"));
        if config.sharded {
            Ok(Link::Sharded(config.urls()))
        } else {
            Ok(Link::Single(
                redis::Client::open(config.url.as_str()).map_err(bad)?,
            ))
        }
    }
}

/// The publisher's connection.
pub(super) enum PubConn {
    Single(redis::aio::MultiplexedConnection),
    Sharded(redis::cluster_async::ClusterConnection),
}

pub(super) async fn connect_publisher(
    link: &Link,
    config: &RedisConfig,
) -> redis::RedisResult<PubConn> {
    match link {
        Link::Single(client) => {
            let cfg = redis::AsyncConnectionConfig::new()
                .set_connection_timeout(Some(config.command_timeout))
                .set_response_timeout(Some(config.command_timeout));
            Ok(PubConn::Single(
                client
                    .get_multiplexed_async_connection_with_config(&cfg)
                    .await?,
            ))
        }
        Link::Sharded(nodes) => Ok(PubConn::Sharded(
            redis::cluster::ClusterClientBuilder::new(nodes.clone())
                .connection_timeout(config.command_timeout)
                .response_timeout(config.command_timeout)
                .build()?
                .get_async_connection()
                .await?,
        )),
    }
}

impl PubConn {
    pub(super) async fn send(&mut self, batch: &[Outgoing]) -> redis::RedisResult<()> {
        match self {
            PubConn::Single(conn) => {
                let mut pipe = redis::pipe();
                for m in batch {
                    for channel in &m.channels {
                        pipe.cmd("PUBLISH")
                            .arg(channel)
                            .arg(&m.payload[..])
                            .ignore();
                    }
                }
                pipe.query_async(conn).await
            }
            PubConn::Sharded(conn) => {
                // A cluster pipeline must stay on one slot, so each SPUBLISH
                // is its own request. They are issued in order before any is
                // awaited, so each shard connection sends them in order.
                let sends = batch.iter().flat_map(|m| {
                    m.channels.iter().map(|channel| {
                        let mut conn = conn.clone();
                        let mut cmd = redis::cmd("SPUBLISH");
                        cmd.arg(channel).arg(&m.payload[..]);
                        async move { cmd.query_async::<()>(&mut conn).await }
                    })
                });
                let results = futures_util::future::join_all(sends).await;
                results.into_iter().collect()
            }
        }
    }
}

/// Capped exponential backoff.
pub(super) struct Backoff {
    pub(super) next: Duration,
    max: Duration,
}

impl Backoff {
    pub(super) fn new(max: Duration) -> Self {
        Self {
            next: MIN_BACKOFF.min(max),
            max,
        }
    }

    pub(super) fn step(&mut self) -> Duration {
        let now = self.next;
        self.next = (self.next * 2).min(self.max);
        now
    }

    pub(super) fn reset(&mut self) {
        self.next = MIN_BACKOFF.min(self.max);
    }
}

/// The subscriber's connection: a pub/sub connection on a single server, a
/// RESP3 cluster connection whose pushes arrive on `pushes` when sharded.
pub(super) enum SubConn {
    Single {
        sink: redis::aio::PubSubSink,
        stream: redis::aio::PubSubStream,
    },
    Sharded {
        conn: redis::cluster_async::ClusterConnection,
        pushes: mpsc::UnboundedReceiver<redis::PushInfo>,
    },
}

pub(super) async fn connect_subscriber(
    link: &Link,
    config: &RedisConfig,
) -> redis::RedisResult<SubConn> {
    match link {
        Link::Single(client) => {
            let (sink, stream) = client.get_async_pubsub().await?.split();
            Ok(SubConn::Single { sink, stream })
        }
        Link::Sharded(nodes) => {
            let (tx, pushes) = mpsc::unbounded_channel();
            let conn = redis::cluster::ClusterClientBuilder::new(nodes.clone())
                .use_protocol(redis::ProtocolVersion::RESP3)
                .push_sender(tx)
                .connection_timeout(config.command_timeout)
                .response_timeout(config.command_timeout)
                .build()?
                .get_async_connection()
                .await?;
            Ok(SubConn::Sharded { conn, pushes })
        }
    }
}

/// What the subscriber connection produced.
pub(super) enum Incoming {
    Message(String, Bytes),
    Other,
    Closed,
}

impl SubConn {
    pub(super) async fn subscribe(&mut self, channels: &[String]) -> redis::RedisResult<()> {
        match self {
            SubConn::Single { sink, .. } => sink.subscribe(channels).await,
            SubConn::Sharded { conn, .. } => {
                // SSUBSCRIBE takes channels of one slot only: one at a time.
                for channel in channels {
                    conn.ssubscribe(channel).await?;
                }
                Ok(())
            }
        }
    }

    pub(super) async fn unsubscribe(&mut self, channels: &[String]) -> redis::RedisResult<()> {
        match self {
            SubConn::Single { sink, .. } => sink.unsubscribe(channels).await,
            SubConn::Sharded { conn, .. } => {
                for channel in channels {
                    conn.sunsubscribe(channel).await?;
                }
                Ok(())
            }
        }
    }

    pub(super) async fn next(&mut self) -> Incoming {
        match self {
            SubConn::Single { stream, .. } => match stream.next().await {
                // The one copy of the payload: out of the redis message.
                Some(msg) => Incoming::Message(
                    msg.get_channel_name().to_owned(),
                    Bytes::copy_from_slice(msg.get_payload_bytes()),
                ),
                None => Incoming::Closed,
            },
            SubConn::Sharded { pushes, .. } => match pushes.recv().await {
                Some(push) if push.kind == redis::PushKind::SMessage => {
                    let mut data = push.data.into_iter();
                    match (data.next(), data.next()) {
                        (
                            Some(redis::Value::BulkString(ch)),
                            Some(redis::Value::BulkString(payload)),
                        ) => Incoming::Message(
                            String::from_utf8_lossy(&ch).into_owned(),
                            Bytes::from(payload),
                        ),
                        _ => Incoming::Other,
                    }
                }
                Some(push) if push.kind == redis::PushKind::Disconnection => Incoming::Closed,
                Some(_) => Incoming::Other,
                None => Incoming::Closed,
            },
        }
    }
}
