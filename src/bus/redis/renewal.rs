//! A rolling enable of history: a node with history off next to nodes
//! with it on (history on).
//!
//! A node without history publishes plain copies: no stamp, nothing in
//! history. A topic's history then has a hole that no offset shows, and a
//! resume from a position before it would be replayed everything *but*
//! that message and told `recovered: true`. So a node with history on that
//! receives an unstamped copy on topic T starts T's history afresh (a new
//! epoch: [`RedisHistory::renew`]); any resume from an older position of T
//! then says `recovered: false`, honestly.
//!
//! The renewal runs off the subscriber task (which delivers the copy at
//! once and goes on), each call bounded by `redis.command_timeout_ms`,
//! and at most once per [`RENEW_EVERY`] per topic: copies that arrive
//! while a topic is being renewed ask for one more renewal after the pause,
//! so every unstamped copy is followed by a renewal that began after it
//! arrived. Until then (a few milliseconds, at most about [`RENEW_EVERY`]
//! under a stream of such copies) a resume can still miss it; and a topic
//! that no node with history holds when the copy is published is never
//! renewed (docs/resume.md, "Rolling enable").
//!
//! The subscriber also expects the new epoch (`gaps.rs`): its own sockets
//! got the unstamped copy, so the epoch change is no gap to them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::history::RedisHistory;
use crate::route::Topic;

/// The least time between two renewals of one topic by one node.
pub(super) const RENEW_EVERY: Duration = Duration::from_millis(500);

/// Attempts at one renewal before it is given up (Redis failing).
const ATTEMPTS: usize = 3;

/// The topics this node is renewing (see the module docs).
#[derive(Clone, Default)]
pub(super) struct Renewals {
    /// Per topic being renewed: whether another unstamped copy arrived
    /// since the current renewal began.
    running: Arc<Mutex<HashMap<Topic, bool>>>,
    /// The first unstamped copy is logged (once per node), and so is the
    /// first renewal that failed.
    seen_logged: Arc<AtomicBool>,
    failure_logged: Arc<AtomicBool>,
}

impl Renewals {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Topic, bool>> {
        // Only whole inserts and removals: a poisoned map is still valid.
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An unstamped copy arrived through `topic`: renews it now, or once
    /// more after the current renewal's pause.
    pub(super) fn on_unstamped(
        &self,
        topic: &Topic,
        history: &Arc<RedisHistory>,
        tasks: &TaskTracker,
        stop: &CancellationToken,
    ) {
        if !self.seen_logged.swap(true, Ordering::Relaxed) {
            info!(
                "a node without history publishes here (a rolling enable of history?): each topic it writes to starts its history afresh, and resumes from before that are not recovered (logged once)"
            );
        }
        {
            let mut running = self.lock();
            if let Some(again) = running.get_mut(topic) {
                *again = true;
                return;
            }
            running.insert(topic.clone(), false);
        }
        let this = self.clone();
        let (topic, history, stop) = (topic.clone(), history.clone(), stop.clone());
        tasks.spawn(async move { this.run(topic, history, stop).await });
    }

    /// Renews `topic`, then again after each pause in which another
    /// unstamped copy arrived.
    async fn run(self, topic: Topic, history: Arc<RedisHistory>, stop: CancellationToken) {
        loop {
            self.renew(&topic, &history).await;
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(RENEW_EVERY) => {}
            }
            let mut running = self.lock();
            match running.get_mut(&topic) {
                Some(again) if *again => *again = false,
                _ => break,
            }
        }
        self.lock().remove(&topic);
    }

    async fn renew(&self, topic: &Topic, history: &RedisHistory) {
        let mut error = String::new();
        for _ in 0..ATTEMPTS {
            match history.renew(topic).await {
                Ok(renewed) => {
                    debug!(topic = ?topic, renewed, "a copy without history: the topic starts afresh");
                    return;
                }
                Err(e) => error = e.to_string(),
            }
        }
        if !self.failure_logged.swap(true, Ordering::Relaxed) {
            warn!(%error, "cannot start a topic's history afresh after a copy from a node without history: a resume from before it may be told recovered without it (logged once)");
        } else {
            debug!(%error, topic = ?topic, "cannot start a topic's history afresh");
        }
    }
}
