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
//! when it starts and when it ends, and only a send that proves it over
//! ends it: a plain `PUBLISH` that ran ends an outage of plain sends, but
//! not one of the script (an `OOM` refuses the script and lets plain
//! `PUBLISH` through). (Taken for a broken connection, an `OOM` once made
//! a node reconnect and log a warning about 20 times a second.)
//! `READONLY` and `MASTERDOWN` mean the server is not, or no longer, the
//! primary: those reconnect.
//!
//! **The ACL's refusal is not Redis refusing.** An ACL without some
//! channels refuses the `PUBLISH`es to those only, with `NOPERM`, and
//! waiting changes nothing: the publish script records the whole batch
//! and answers `UNHEARD` (`history.rs`); a plain pipeline's commands are
//! answered one by one and only the refused messages are dropped; a
//! script call refused for a history key the user may not touch is made
//! again at once in halves, halved again while refused, and only the
//! messages refused alone are dropped. None is paused for (a pause protected nothing and
//! held up every other channel's messages); each such send is counted
//! (`wshub_bus_publish_failures_total`) and logged at most every 10 s.
//! Without `PUBLISH` at all the node also stays unready, its probes
//! refused. Redis checks the ACL before it is busy, so a send the ACL
//! refused whole proves nothing about an outage.
//!
//! **A message the script cannot stamp is lost alone.** The script stamps
//! each message on each topic under Lua's `pcall`: one it cannot stamp
//! on a topic (a key of another type in wshub's namespace, an ACL without
//! a command the stamping calls) is published without that topic, and
//! the script answers `LOST` once the rest of the batch has run;
//! those messages are counted as dropped and logged as an error (at most
//! every 10 s), nothing is resent or paused for.
//!
//! **A script that fails part-way loses its batch, counted.** Any other
//! error raised inside the publish script after it raised its high-water
//! mark (an ACL without `PEXPIRE`) would make a resend skip the whole
//! batch: the batch is counted as dropped and logged as an error (at most
//! every 10 s), not resent or paused for. (It was taken for Redis
//! refusing, resent, skipped, and logged as Redis accepting again, with
//! nothing counted.)

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::{Instant, timeout, timeout_at};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::conn::{Backoff, Link, PubConn, Unheard, connect_publisher, is_denied, is_refusal};
use super::history::{Lost, Prepared, RedisHistory, UNHEARD};
use super::queue::{InFlight, Outgoing, lost, unheard};
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
    /// error, how many sends it refused in a row, and which kind of send
    /// must go through to end it ([`Proof`]).
    refused: Option<(String, u64, Proof)>,
    /// Set by a refused send: how long to wait before the next one.
    pause: Option<Duration>,
    /// When expired messages were last logged (they are all counted).
    expiry_logged: Option<Instant>,
    /// The messages a send holds while it awaits Redis (taken from the
    /// queue or `resend`, not yet settled): counted as dropped by `flush`
    /// when its deadline cuts the send short (the future is dropped with
    /// them).
    in_flight: InFlight,
    /// When a publish script that failed part-way, or could not stamp
    /// some messages, was last logged.
    broken_logged: Option<Instant>,
    /// Sends of which Redis refused some `PUBLISH`es while it ran the
    /// rest (module docs) since the last log line, and when that was.
    unheard: (u64, Option<Instant>),
}

/// What a send that went through proves. A plain `PUBLISH` goes through
/// an `OOM` that refuses the publish script (it writes nothing), so it
/// ends only an outage that plain sends were refused in; the script's
/// running ends any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proof {
    Plain,
    Script,
}

/// The outcome of one call of the publish script.
enum Call {
    /// Ran whole.
    Ran,
    /// Ran whole; some of its `PUBLISH`es were refused (`UNHEARD`).
    Unheard(redis::RedisError),
    /// Ran whole; some of its messages could not be stamped on some of
    /// their topics, and were published without them (`LOST`).
    Lost(Lost),
    /// Refused by the ACL before it ran (`NOPERM`: a history key the user
    /// may not touch); waiting changes nothing.
    Denied(redis::RedisError),
    /// Refused before it ran (`OOM`, `BUSY`, `LOADING`): try again later.
    Refused(redis::RedisError),
    /// Failed inside the script (an ACL without a command it calls beyond
    /// the stamping), after it raised the
    /// high-water mark: a resend would skip the batch, and waiting changes
    /// nothing.
    Broken(redis::RedisError),
    /// No answer, or the connection failed: it may have run.
    Failed(String),
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
            unheard: (0, None),
            in_flight: InFlight::default(),
            broken_logged: None,
        }
    }

    fn idle(&self) -> bool {
        self.resend.is_none() && self.shared.queue.is_empty()
    }

    pub(super) async fn run(mut self, stop: CancellationToken) {
        loop {
            if self.resend.is_none() {
                if self.refused.is_some() {
                    // While Redis refuses, nothing queued may come to show
                    // that it takes sends again (the node refuses messages
                    // once the refusals outlast `redis.publish_retry_ms`):
                    // a canary asks, after each pause.
                    let pause = self.backoff.step();
                    tokio::select! {
                        biased;
                        () = stop.cancelled() => break,
                        () = self.shared.queue.wait() => {}
                        () = tokio::time::sleep(pause) => {
                            self.canary().await;
                            continue;
                        }
                    }
                } else {
                    tokio::select! {
                        biased;
                        () = stop.cancelled() => break,
                        () = self.shared.queue.wait() => {}
                    }
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
        let left = lost(&self.shared.queue.take(usize::MAX, usize::MAX))
            + self.resend.take().map_or(0, |batch| lost(&batch))
            + std::mem::take(&mut self.in_flight).lost();
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
        let retry = shared.config.publish_retry;
        if let Some(batch) = self
            .resend
            .as_mut()
            .filter(|b| b.iter().any(|m| m.at.elapsed() > retry))
        {
            let (kept, old): (Vec<_>, Vec<_>) = std::mem::take(batch)
                .into_iter()
                .partition(|m| m.at.elapsed() <= retry);
            *batch = kept;
            expired += lost(&old);
            if batch.is_empty() {
                self.resend = None;
            }
        }
        if expired > 0 {
            shared.metrics.dropped(DropReason::BusUnavailable, expired);
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
        let epoch = shared.epoch.current();
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

    /// Asks whether Redis takes sends again, with nothing queued to send:
    /// with history on a write of a key of this node's (the publish
    /// script's writes are what a full Redis refuses; its `PUBLISH` is
    /// not), else a probe's `PUBLISH`. Taken: the refusals are over. An
    /// ACL that refuses the canary itself cannot tell, and is taken as
    /// over too (the next send says otherwise if it is not).
    async fn canary(&mut self) {
        if !self.connected().await {
            return;
        }
        let Some((conn, _, _)) = self.conn.as_mut() else {
            return;
        };
        let shared = &self.shared;
        let asked = async {
            if shared.history.is_some() {
                let mut cmd = redis::cmd("SET");
                cmd.arg(format!(
                    "{}:canary:{}",
                    shared.config.channel_prefix, shared.node_id
                ))
                .arg(1)
                .arg("PX")
                .arg(shared.config.publish_retry.as_millis() as u64);
                conn.query::<()>(&cmd).await
            } else {
                conn.probe(std::slice::from_ref(&shared.probe_channel))
                    .await
            }
        };
        match timeout(shared.config.command_timeout, asked).await {
            Ok(Ok(())) => self.accepted(Proof::Script),
            // (By its code: redis-rs writes `NOPERM` as `NoPerm` in the
            // text, which a review found never matched, and the node then
            // refused messages for good once Redis had room again.)
            Ok(Err(e)) if is_denied(&e) => self.accepted(Proof::Script),
            // Still refusing (not counted: no message was refused).
            Ok(Err(e)) if is_refusal(&e) => {}
            Ok(Err(_)) | Err(_) => {
                // Unreachable: the next send reconnects (the subscriber
                // times the outage).
                self.conn = None;
            }
        }
    }

    /// Sends one batch (bounded in messages and bytes) with its own timeout.
    async fn send_batch(&mut self) {
        self.send_taken().await;
        // Not reached when `flush`'s deadline drops this future: what the
        // send held is then counted there.
        self.in_flight = InFlight::default();
    }

    async fn send_taken(&mut self) {
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
        self.in_flight = InFlight::of(&batch);
        let error = match timeout(shared.config.command_timeout, active.send(&batch)).await {
            Ok(Ok(unheard)) => {
                self.answered(&batch, unheard);
                return;
            }
            Ok(Err(e)) if is_refusal(&e) => Err(e.to_string()),
            Ok(Err(e)) => Ok(e.to_string()),
            Err(_) => Ok("the pipeline timed out".to_owned()),
        };
        // Part of the pipeline may have been delivered: drop it rather
        // than risk delivering twice. Only this batch: the messages behind
        // it wait for the reconnect (or the pause).
        let dropped = lost(&batch);
        shared.metrics.dropped(DropReason::BusUnavailable, dropped);
        match error {
            Err(refusal) => self.refused_by_redis(refusal, Proof::Plain),
            Ok(error) => {
                shared.metrics.bus_publish_failure();
                warn!(%error, dropped, "publishing to Redis failed; reconnecting");
                self.conn = None;
                self.outage = true;
            }
        }
    }

    /// Redis answered every command of a plain batch (history off, or
    /// messages to connections): the messages it refused are dropped and
    /// counted. A refusal of the command itself (`BUSY`, `LOADING`) means
    /// Redis is refusing: the next send waits a pause (and true is
    /// returned). An ACL's (`NOPERM`) refuses those channels only, whatever
    /// the wait: no pause, and a line at most every 10 s. Only a `PUBLISH`
    /// that ran ends an outage (Redis checks the ACL before it is busy: a
    /// batch the ACL refused whole proves nothing).
    fn answered(&mut self, batch: &[Outgoing], unheard: Unheard) -> bool {
        let refused = unheard.refused.iter().filter_map(|&i| batch.get(i));
        self.shared
            .metrics
            .dropped(DropReason::BusUnavailable, lost(refused));
        if let Some(refusing) = unheard.refusing {
            self.refused_by_redis(refusing.to_string(), Proof::Plain);
            return true;
        }
        if unheard.heard > 0 {
            self.accepted(Proof::Plain);
        }
        if let Some(denied) = unheard.denied {
            self.denied(&denied, Fate::Dropped);
        }
        false
    }

    /// Counts a send of which Redis's ACL refused some messages (`NOPERM`:
    /// their channels, or their history keys) while it took the rest
    /// (module docs: no pause), and logs it at most every 10 s.
    fn denied(&mut self, error: &dyn std::fmt::Display, fate: Fate) {
        self.shared.metrics.bus_publish_failure();
        let (sends, logged) = &mut self.unheard;
        *sends += 1;
        if logged.is_none_or(|at: Instant| at.elapsed() > LAG_LOG_EVERY) {
            let fate = match fate {
                Fate::Recorded => {
                    "recorded in history but not heard live (subscribers read them from history when a later message on the channel reaches them)"
                }
                Fate::Dropped => {
                    "dropped (counted in wshub_messages_dropped_total{reason=\"bus_unavailable\"})"
                }
            };
            warn!(
                %error,
                sends = *sends,
                "Redis's ACL refuses some messages (NOPERM: their channels or history keys) and Redis takes the rest: the refused ones are {fate}; not waited out (no pause); logged at most every 10 s; see wshub_bus_publish_failures_total"
            );
            *sends = 0;
            *logged = Some(Instant::now());
        }
    }

    /// Redis answered a send with an error (module docs): counted, logged
    /// once per outage; the connection is kept and the next send waits a
    /// pause that doubles up to `redis.reconnect_max_ms`. `proof`: the
    /// kind of send that was refused, and so must go through to end it.
    fn refused_by_redis(&mut self, error: String, proof: Proof) {
        self.shared.metrics.bus_publish_failure();
        self.pause = Some(self.backoff.step());
        match &mut self.refused {
            Some((_, refusals, needs)) => {
                *refusals += 1;
                if proof == Proof::Script {
                    *needs = Proof::Script;
                }
            }
            None => {
                self.shared.mark_refused(&error);
                warn!(
                    %error,
                    retry_ms = self.shared.config.publish_retry.as_millis() as u64,
                    "Redis refuses to publish; trying again with a growing pause (logged once until it accepts again; messages older than redis.publish_retry_ms are dropped; see wshub_bus_publish_failures_total)"
                );
                self.refused = Some((error, 1, proof));
            }
        }
    }

    /// A send of kind `proof` went through: an outage of refusals it
    /// proves over, if any, is over.
    fn accepted(&mut self, proof: Proof) {
        if let Some((error, refusals, needs)) = self.refused.take() {
            if needs == Proof::Script && proof == Proof::Plain {
                self.refused = Some((error, refusals, needs));
                return;
            }
            self.backoff.reset();
            self.shared.mark_accepted();
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
        if self.conn.as_ref().is_none_or(|(_, _, p)| p.is_none()) {
            return;
        }
        let batch = match self.resend.take() {
            Some(batch) => batch,
            None => {
                // A message to a connection has no history. On one Redis
                // it goes through the script with the rest, relayed as it
                // is (`Outgoing::relayed`), in its place. On a Cluster it
                // is queued unrecorded (`RedisBus::publish`) and goes in a
                // plain pipeline, as with history off, never into the
                // topic scripts (which would skip it: it once lost every
                // such message). A batch is a run of one kind, in queue
                // order, so one sender's messages keep their order (a
                // review saw messages to a connection overtake earlier
                // ones to a group: the plain pipeline of a mixed batch
                // went first).
                let batch = shared
                    .queue
                    .take_run(MAX_BATCH, MAX_BATCH_BYTES, |m| m.history.is_some());
                if batch.first().is_some_and(|m| m.history.is_none()) {
                    self.send_plain_unrecorded(batch).await;
                    return;
                }
                batch
            }
        };
        self.send_script(history, batch).await;
    }

    /// History on, on a Cluster: sends a batch of unrecorded messages (to
    /// connections) in a plain pipeline. On an error it is dropped and
    /// counted, as with history off (plain `PUBLISH` cannot tell what
    /// already ran).
    async fn send_plain_unrecorded(&mut self, plain: Vec<Outgoing>) {
        let shared = self.shared.clone();
        self.in_flight = InFlight::of(&plain);
        let Some((active, _, _)) = self.conn.as_mut() else {
            return;
        };
        let error = match timeout(shared.config.command_timeout, active.send(&plain)).await {
            Ok(Ok(unheard)) => {
                self.answered(&plain, unheard);
                return;
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => "the pipeline timed out".to_owned(),
        };
        let dropped = lost(&plain);
        shared.metrics.dropped(DropReason::BusUnavailable, dropped);
        shared.metrics.bus_publish_failure();
        warn!(%error, dropped, "publishing to Redis failed; reconnecting");
        self.conn = None;
        self.outage = true;
    }

    /// Sends `batch` (recorded messages, new or to send again) as one call
    /// of the publish script.
    async fn send_script(&mut self, history: &RedisHistory, mut batch: Vec<Outgoing>) {
        if batch.is_empty() {
            return;
        }
        for recorded in batch.iter_mut().filter_map(|m| m.history.as_mut()) {
            if recorded.number == 0 {
                self.numbered += 1;
                recorded.number = self.numbered;
            }
        }
        self.in_flight = InFlight::of(&batch);
        match self.call_script(history, &batch).await {
            Call::Denied(_) if batch.len() > 1 => self.halves(history, batch).await,
            call => {
                if let Some(rest) = self.settle(call, batch, 0) {
                    self.resend = Some(rest);
                }
            }
        }
    }

    /// The ACL refused a batch's call (`NOPERM`, a history key): it is
    /// sent again at once in halves, in order, each half the ACL refuses
    /// halved again, until the messages it refuses are alone, and dropped:
    /// about 2 log2(n) calls per refused message of n, not one call per
    /// message (a review saw 8,000 messages take 15 s, the allowed ones
    /// expiring behind the refused). Order is kept, which the high-water
    /// mark needs (each call's messages are numbered above the last's).
    /// What a call that does not answer, or Redis refusing, leaves (that
    /// part and the rest) is sent again later, as one batch.
    async fn halves(&mut self, history: &RedisHistory, batch: Vec<Outgoing>) {
        let mut pending = std::collections::VecDeque::new();
        let mut batch = batch;
        let back = batch.split_off(batch.len() / 2);
        pending.push_back(batch);
        pending.push_back(back);
        let mut held: usize = pending.iter().map(Vec::len).sum();
        while let Some(mut part) = pending.pop_front() {
            self.in_flight = InFlight::of(pending.iter().flatten().chain(&part));
            let call = self.call_script(history, &part).await;
            if matches!(call, Call::Denied(_)) && part.len() > 1 {
                let back = part.split_off(part.len() / 2);
                pending.push_front(back);
                pending.push_front(part);
                continue;
            }
            held -= part.len();
            if let Some(mut left) = self.settle(call, part, held) {
                left.extend(pending.into_iter().flatten());
                self.resend = Some(left);
                return;
            }
        }
    }

    /// Acts on a call's outcome; returns the batch when it is to be sent
    /// again (with the `behind` messages still pending after it, which
    /// the caller adds).
    fn settle(&mut self, call: Call, batch: Vec<Outgoing>, behind: usize) -> Option<Vec<Outgoing>> {
        match call {
            Call::Ran => self.accepted(Proof::Script),
            // Recorded whole, some PUBLISHes refused (`heard_lua` in
            // `history.rs`): nothing to send again, nothing to wait for (a
            // pause protected nothing and held up the other channels'
            // messages, up to `redis.reconnect_max_ms` a batch).
            Call::Unheard(e) => {
                self.accepted(Proof::Script);
                self.denied(&e, Fate::Recorded);
                // Recorded, not carried live: a batch that waits on its
                // receipt (`POST /api/publish`) is not told "carried"
                // (review of 2026-12-03: 200 and a `duplicate` for the
                // retry, while no subscriber had it).
                unheard(&batch);
            }
            // Waiting changes nothing: dropped and counted.
            Call::Denied(e) => {
                self.shared
                    .metrics
                    .dropped(DropReason::BusUnavailable, lost(&batch));
                self.denied(&e, Fate::Dropped);
            }
            // The rest of the batch ran: nothing to send again. The ACL
            // refusing a connection's channel is told as the ACL's other
            // refusals are.
            Call::Lost(Lost { numbers, error }) => {
                self.accepted(Proof::Script);
                let lost = lost(batch.iter().filter(|m| {
                    m.history
                        .as_ref()
                        .is_some_and(|h| numbers.binary_search(&h.number).is_ok())
                }));
                self.shared
                    .metrics
                    .dropped(DropReason::BusUnavailable, lost);
                if is_acl_refusal(&error) {
                    self.denied(&error, Fate::Dropped);
                    return None;
                }
                self.shared.metrics.bus_publish_failure();
                if self.broken_logged() {
                    tracing::error!(
                        %error,
                        lost,
                        items = batch.len(),
                        "Redis could not stamp some messages for history (a key of another type in wshub's namespace, or a Redis user without a command history needs): they were not published on those topics, counted as dropped; the rest of the batch was published; waiting would not help: give the Redis user every command history needs (docs/cluster.md, ACL users) and keep other keys out of wshub's namespace (logged at most every 10 s)"
                    );
                }
            }
            Call::Broken(e) => {
                let dropped = lost(&batch);
                self.shared
                    .metrics
                    .dropped(DropReason::BusUnavailable, dropped);
                self.shared.metrics.bus_publish_failure();
                if self.broken_logged() {
                    tracing::error!(
                        error = %e,
                        messages = dropped,
                        "the publish script failed part-way: its batch is lost (the messages it had run were published, the others not), counted as dropped; waiting would not help: give the Redis user every command history needs (docs/cluster.md, ACL users) and keep other keys out of wshub's namespace (logged at most every 10 s)"
                    );
                }
            }
            // Answered: the connection is fine, and nothing ran (an OOM
            // refuses the script's first write). The script raises the
            // high-water mark first, so were anything run, it would be
            // skipped when the batch comes again.
            Call::Refused(e) => {
                self.refused_by_redis(e.to_string(), Proof::Script);
                return Some(batch);
            }
            Call::Failed(error) => {
                // Redis may have run it: it is sent again on the next
                // connection, and the script skips it if it did.
                self.shared.metrics.bus_publish_failure();
                warn!(%error, items = batch.len() + behind, "publishing to Redis failed; reconnecting to send the batch again");
                self.conn = None;
                self.outage = true;
                // Not at once: a connection that fails as soon as it is
                // made must not make a busy loop.
                self.pause = Some(MIN_BACKOFF);
                return Some(batch);
            }
        }
        None
    }

    /// Whether a publish script's failure is to be logged now (at most
    /// every [`LAG_LOG_EVERY`]); if so, the time is noted.
    fn broken_logged(&mut self) -> bool {
        let due = self
            .broken_logged
            .is_none_or(|at: Instant| at.elapsed() > LAG_LOG_EVERY);
        if due {
            self.broken_logged = Some(Instant::now());
        }
        due
    }

    /// One call of the publish script with `batch` (numbered).
    async fn call_script(&mut self, history: &RedisHistory, batch: &[Outgoing]) -> Call {
        let shared = self.shared.clone();
        let Some((active, _, Some(prepared))) = self.conn.as_mut() else {
            return Call::Failed("not connected".to_owned());
        };
        let started = Instant::now();
        let sent = timeout(
            shared.config.command_timeout,
            history.publish(active, prepared, batch),
        )
        .await;
        shared.metrics.history_publish(started.elapsed());
        match sent {
            Ok(Ok(None)) => Call::Ran,
            Ok(Ok(Some(unstamped))) => Call::Lost(unstamped),
            Ok(Err(e)) if e.code() == Some(UNHEARD) => Call::Unheard(e),
            Ok(Err(e)) if is_denied(&e) && !in_script(&e) => Call::Denied(e),
            Ok(Err(e)) if in_script(&e) && !ran_nothing(&e) => Call::Broken(e),
            Ok(Err(e)) if is_refusal(&e) => Call::Refused(e),
            Ok(Err(e)) => Call::Failed(e.to_string()),
            Err(_) => Call::Failed("the publish script timed out".to_owned()),
        }
    }
}

/// Whether an error a script caught is the ACL refusing a channel:
/// `NOPERM …` (Redis 7.2 and later), or, from Redis 7.0 inside a script,
/// `ERR The user executing the script can't publish to the channel …`.
/// (Its refusal of a command, `… can't run this command`, is not: that one
/// is told as a stamping error, whose advice names the commands.)
fn is_acl_refusal(error: &str) -> bool {
    error.starts_with("NOPERM") || error.contains("executing the script can't publish")
}

/// Whether `e` was raised inside a script (Redis adds where: `script:
/// <sha>, on @user_script:<line>`), not answered for the command.
fn in_script(e: &redis::RedisError) -> bool {
    e.to_string().contains("@user_script")
}

/// Whether an error raised inside the script says it ran nothing: an
/// `OOM` refuses the script's first write (Redis never stops a script for
/// memory once it has written), and `SCRIPT KILL` is allowed only before
/// a write. By the text too: Redis 6 wraps a script's errors in `ERR
/// Error running script … -OOM …`.
fn ran_nothing(e: &redis::RedisError) -> bool {
    let text = e.to_string();
    e.code() == Some("OOM")
        || text.contains("OOM command not allowed")
        || text.contains("Script killed")
}

/// What became of messages Redis's ACL refused ([`Publisher::denied`]).
#[derive(Debug, Clone, Copy)]
enum Fate {
    Recorded,
    Dropped,
}
