//! The publisher task: drains the publish queue into Redis in pipelines
//! bounded in messages and bytes, reconnecting with backoff and following
//! the subscriber's connection epoch; flushes what is queued on shutdown.
//!
//! With history on, each batch is one call of the publish script
//! (`history.rs`), and a batch whose outcome is unknown (a timeout, a
//! broken connection, an error) is kept and sent again, first, on the next
//! connection, for as long as its messages are younger than
//! `redis.publish_retry_ms`: the script skips the messages it already ran,
//! so a resend never publishes twice. Without history a failed pipeline
//! is dropped as before (plain `PUBLISH` cannot tell what already ran).
//!
//! **An error reply is not a lost connection.** When Redis *answers* with
//! an error (`OOM` under `maxmemory` with `noeviction`, `BUSY`, `LOADING`;
//! `NOSCRIPT` is handled where the script is called), the connection is
//! fine and in step: it is kept, and the batch is tried again after a
//! pause that doubles up to `redis.reconnect_max_ms`, for as long as its
//! messages are younger than `redis.publish_retry_ms`. Each refusal is
//! counted (`wshub_bus_publish_failures_total`); the outage is logged
//! when it starts and when it ends. (Taken for a broken connection, an
//! `OOM` once made a node reconnect and log a warning about 20 times a
//! second.) `READONLY` and `MASTERDOWN` mean the server is not, or no
//! longer, the primary: those reconnect.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::{Instant, timeout, timeout_at};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::conn::{Backoff, Link, PubConn, connect_publisher};
use super::history::Prepared;
use super::queue::Outgoing;
use super::{LAG_LOG_EVERY, MAX_BATCH, MAX_BATCH_BYTES, MIN_BACKOFF, Shared};
use crate::outcome::DropReason;

/// The publisher task's state: its connection and the subscriber epoch it
/// was opened in, its backoff, and whether an outage is in progress (to
/// log its start and end once).
pub(super) struct Publisher {
    shared: Arc<Shared>,
    link: Link,
    /// The connection, the subscriber epoch it was opened in, and (history
    /// on) its script hash and the server's run id.
    conn: Option<(PubConn, u64, Option<Prepared>)>,
    backoff: Backoff,
    outage: bool,
    /// History on: the batch whose outcome is unknown, sent again before
    /// anything else.
    resend: Option<Vec<Outgoing>>,
    /// History on: the number given to the last message taken from the
    /// queue. Given here, in queue order, by this one task (never in
    /// `publish`, where two callers could push in the other order than
    /// they drew): the script relies on it (see `history.rs`).
    numbered: u64,
    /// Redis answered the last send with an error (module docs): the
    /// error, and how many sends it refused in a row.
    refused: Option<(String, u64)>,
    /// Set by a refused send: how long to wait before the next one.
    pause: Option<Duration>,
    /// When expired messages were last logged (they are all counted).
    expiry_logged: Option<Instant>,
}

/// Whether `e` is Redis's answer on a connection that is fine (module
/// docs) rather than a failed connection or a server that is not the
/// primary.
fn is_refusal(e: &redis::RedisError) -> bool {
    !(e.is_io_error() || e.is_timeout() || e.is_connection_dropped())
        && e.code()
            .is_some_and(|code| !matches!(code, "READONLY" | "MASTERDOWN"))
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
            resend: None,
            numbered: 0,
            refused: None,
            pause: None,
            expiry_logged: None,
        }
    }

    fn idle(&self) -> bool {
        self.resend.is_none() && self.shared.queue.is_empty()
    }

    pub(super) async fn run(mut self, stop: CancellationToken) {
        loop {
            if self.resend.is_none() {
                tokio::select! {
                    biased;
                    () = stop.cancelled() => break,
                    () = self.shared.queue.wait() => {}
                }
            } else if stop.is_cancelled() {
                break;
            }
            self.expire();
            if self.connected().await {
                self.send_batch().await;
                if let Some(pause) = self.pause.take() {
                    tokio::select! {
                        biased;
                        () = stop.cancelled() => break,
                        () = tokio::time::sleep(pause) => {}
                    }
                }
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
        while !self.idle() && Instant::now() < deadline {
            match timeout_at(deadline, self.connected()).await {
                Ok(true) => {
                    let _ = timeout_at(deadline, self.send_batch()).await;
                    if let Some(pause) = self.pause.take() {
                        let _ = timeout_at(deadline, tokio::time::sleep(pause)).await;
                    }
                }
                Ok(false) => {
                    let _ = timeout_at(deadline, tokio::time::sleep(self.backoff.step())).await;
                }
                Err(_) => break,
            }
        }
        let left = self.shared.queue.take(usize::MAX, usize::MAX).len()
            + self.resend.take().map_or(0, |batch| batch.len());
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

    fn expire(&mut self) {
        let shared = &self.shared;
        let mut expired = shared.queue.expire(shared.config.publish_retry);
        if let Some(batch) = &mut self.resend {
            let before = batch.len();
            batch.retain(|m| m.at.elapsed() <= shared.config.publish_retry);
            expired += before - batch.len();
            if batch.is_empty() {
                self.resend = None;
            }
        }
        if expired > 0 {
            shared
                .metrics
                .dropped(DropReason::BusUnavailable, expired as u64);
            // Once per outage rather than at every retry (all are counted).
            if self
                .expiry_logged
                .is_none_or(|at: Instant| at.elapsed() > LAG_LOG_EVERY)
            {
                warn!(
                    dropped = expired,
                    retry_ms = shared.config.publish_retry.as_millis() as u64,
                    "Redis unreachable or refusing: dropped messages that waited longer than redis.publish_retry_ms (logged at most every 10 s; see wshub_messages_dropped_total{{reason=\"bus_unavailable\"}})"
                );
                self.expiry_logged = Some(Instant::now());
            }
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
            .is_some_and(|(_, opened, _)| *opened != epoch)
        {
            self.conn = None;
        }
        if self.conn.is_some() {
            return true;
        }
        let connect = async {
            let mut conn = connect_publisher(&self.link, config).await?;
            // With history: the script is loaded on every connection (a
            // restarted or failed-over Redis has not seen it), and the
            // server's run id decides whether epochs start afresh.
            let prepared = match &shared.history {
                Some(history) => Some(history.prepare(&mut conn).await?),
                None => None,
            };
            Ok::<_, redis::RedisError>((conn, prepared))
        };
        match timeout(config.command_timeout, connect).await {
            Ok(Ok((c, prepared))) => {
                self.conn = Some((c, epoch, prepared));
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
        if self.shared.history.is_some() {
            return self.send_recorded().await;
        }
        let Some((active, _, _)) = self.conn.as_mut() else {
            return;
        };
        let shared = &self.shared;
        let batch = shared.queue.take(MAX_BATCH, MAX_BATCH_BYTES);
        if batch.is_empty() {
            return;
        }
        let error = match timeout(shared.config.command_timeout, active.send(&batch)).await {
            Ok(Ok(())) => return self.accepted(),
            Ok(Err(e)) if is_refusal(&e) => Err(e.to_string()),
            Ok(Err(e)) => Ok(e.to_string()),
            Err(_) => Ok("the pipeline timed out".to_owned()),
        };
        // Part of the pipeline may have been delivered: drop it rather
        // than risk delivering twice. Only this batch: the messages behind
        // it wait for the reconnect (or the pause).
        shared
            .metrics
            .dropped(DropReason::BusUnavailable, batch.len() as u64);
        match error {
            Err(refusal) => self.refused_by_redis(refusal),
            Ok(error) => {
                shared.metrics.bus_publish_failure();
                warn!(%error, dropped = batch.len(), "publishing to Redis failed; reconnecting");
                self.conn = None;
                self.outage = true;
            }
        }
    }

    /// Redis answered a send with an error (module docs): counted, logged
    /// once per outage; the connection is kept and the next send waits a
    /// pause that doubles up to `redis.reconnect_max_ms`.
    fn refused_by_redis(&mut self, error: String) {
        self.shared.metrics.bus_publish_failure();
        self.pause = Some(self.backoff.step());
        match &mut self.refused {
            Some((_, refusals)) => *refusals += 1,
            None => {
                warn!(
                    %error,
                    retry_ms = self.shared.config.publish_retry.as_millis() as u64,
                    "Redis refuses to publish; trying again with a growing pause (logged once until it accepts again; messages older than redis.publish_retry_ms are dropped; see wshub_bus_publish_failures_total)"
                );
                self.refused = Some((error, 1));
            }
        }
    }

    /// A send went through: an outage of refusals, if any, is over.
    fn accepted(&mut self) {
        if let Some((error, refusals)) = self.refused.take() {
            self.backoff.reset();
            info!(refusals, %error, "Redis accepts publishes again");
        }
    }

    /// History on: sends the batch to resend, or the next one, as one call
    /// of the publish script. A call that fails keeps its batch for the
    /// next connection (see the module docs).
    async fn send_recorded(&mut self) {
        let shared = self.shared.clone();
        let Some(history) = &shared.history else {
            return;
        };
        let Some((active, _, Some(prepared))) = self.conn.as_mut() else {
            return;
        };
        let resent = self.resend.is_some();
        let mut batch = match self.resend.take() {
            Some(batch) => batch,
            None => {
                // A message to a connection is queued unrecorded (it has no
                // history: `RedisBus::publish`): it goes in a plain
                // pipeline, as with history off, never into the script
                // (which would skip it: it once lost every such message).
                let (recorded, plain): (Vec<Outgoing>, Vec<Outgoing>) = shared
                    .queue
                    .take(MAX_BATCH, MAX_BATCH_BYTES)
                    .into_iter()
                    .partition(|m| m.history.is_some());
                if !plain.is_empty() {
                    let sent = timeout(shared.config.command_timeout, active.send(&plain)).await;
                    let error = match sent {
                        Ok(Ok(())) => None,
                        Ok(Err(e)) => Some(e.to_string()),
                        Err(_) => Some("the pipeline timed out".to_owned()),
                    };
                    if let Some(error) = error {
                        // As with history off: dropped, not resent (plain
                        // `PUBLISH` cannot tell what already ran). The
                        // recorded ones wait for the reconnect.
                        shared
                            .metrics
                            .dropped(DropReason::BusUnavailable, plain.len() as u64);
                        shared.metrics.bus_publish_failure();
                        warn!(%error, dropped = plain.len(), "publishing to Redis failed; reconnecting");
                        if !recorded.is_empty() {
                            self.resend = Some(recorded);
                        }
                        self.conn = None;
                        self.outage = true;
                        return;
                    }
                }
                recorded
            }
        };
        if batch.is_empty() {
            return;
        }
        for recorded in batch.iter_mut().filter_map(|m| m.history.as_mut()) {
            if recorded.number == 0 {
                self.numbered += 1;
                recorded.number = self.numbered;
            }
        }
        let started = Instant::now();
        let sent = timeout(
            shared.config.command_timeout,
            history.publish(active, prepared, &batch),
        )
        .await;
        shared.metrics.history_publish(started.elapsed());
        let error = match sent {
            // A resend that ran nothing had run whole before: after a
            // refused PUBLISH (the script records the whole batch, then
            // answers the refusal) it says nothing of whether Redis now
            // accepts; the next batch will. Taken for an acceptance, it
            // logged "accepts again" and reset the pause after every
            // refused batch.
            Ok(Ok(0)) if resent && self.refused.is_some() => return,
            Ok(Ok(_)) => return self.accepted(),
            Ok(Err(e)) if is_refusal(&e) => {
                // Answered: the connection is fine. The script raises the
                // high-water mark first, so what it ran is skipped when the
                // batch comes again (an OOM refuses its first write, before
                // anything ran; a refused PUBLISH comes after the whole
                // batch was recorded).
                self.resend = Some(batch);
                return self.refused_by_redis(e.to_string());
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => "the publish script timed out".to_owned(),
        };
        // Redis may have run it: it is sent again on the next connection,
        // and the script skips it if it did.
        shared.metrics.bus_publish_failure();
        warn!(%error, messages = batch.len(), "publishing to Redis failed; reconnecting to send the batch again");
        self.resend = Some(batch);
        self.conn = None;
        self.outage = true;
        // Not at once: a connection that fails as soon as it is made must
        // not make a busy loop.
        self.pause = Some(MIN_BACKOFF);
    }
}
