//! Messages waiting for the publisher.

use std::time::Duration;

use axum::body::Bytes;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::bus::BusError;

pub(super) struct Outgoing {
    pub(super) at: Instant,
    pub(super) channels: Vec<String>,
    pub(super) payload: Bytes,
}

/// Messages waiting for the publisher, bounded by `redis.publish_queue`.
///
/// A `std::sync::Mutex` around a `VecDeque` rather than a channel: the
/// publisher must be able to drop expired messages from the front while
/// Redis is away, which a channel does not allow.
pub(super) struct PublishQueue {
    items: std::sync::Mutex<std::collections::VecDeque<Outgoing>>,
    capacity: usize,
    ready: Notify,
}

impl PublishQueue {
    pub(super) fn new(capacity: usize) -> Self {
        Self {
            items: std::sync::Mutex::default(),
            capacity,
            ready: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::VecDeque<Outgoing>> {
        self.items.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn push(&self, channels: Vec<String>, payload: Bytes) -> Result<(), BusError> {
        let mut items = self.lock();
        if items.len() >= self.capacity {
            return Err(BusError::Overloaded);
        }
        items.push_back(Outgoing {
            at: Instant::now(),
            channels,
            payload,
        });
        drop(items);
        self.ready.notify_one();
        Ok(())
    }

    pub(super) async fn wait(&self) {
        loop {
            if !self.lock().is_empty() {
                return;
            }
            self.ready.notified().await;
        }
    }

    /// Drops messages older than `max_age`; returns how many.
    pub(super) fn expire(&self, max_age: Duration) -> usize {
        let mut items = self.lock();
        let before = items.len();
        while items.front().is_some_and(|m| m.at.elapsed() > max_age) {
            items.pop_front();
        }
        before - items.len()
    }

    pub(super) fn take(&self, max: usize) -> Vec<Outgoing> {
        let mut items = self.lock();
        let n = items.len().min(max);
        items.drain(..n).collect()
    }
}
