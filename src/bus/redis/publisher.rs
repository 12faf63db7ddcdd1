//! The publisher task: drains the publish queue into Redis in pipelines
//! bounded in messages and bytes, reconnecting with backoff and following
//! the subscriber's connection epoch; flushes what is queued on shutdown.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::{Instant, timeout, timeout_at};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::conn::{Backoff, Link, PubConn, connect_publisher};
use super::{MAX_BATCH, MAX_BATCH_BYTES, Shared};
use crate::outcome::DropReason;

/// The publisher task's state: its connection and the subscriber epoch it
/// was opened in, its backoff, and whether an outage is in progress (to
/// log its start and end once).
pub(super) struct Publisher {
    shared: Arc<Shared>,
    link: Link,
    conn: Option<(PubConn, u64)>,
    backoff: Backoff,
    outage: bool,
}

impl Publisher {
    pub(super) fn new(shared: Arc<Shared>, link: Link) -> Self {
        let backoff = Backoff::new(shared.config.reconnect_max);
        Self {
            shared,
            link,
            conn: None,
            backoff,
            outage: false,
        }
    }

    pub(super) async fn run(mut self, stop: CancellationToken) {
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
