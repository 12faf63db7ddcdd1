//! Messages waiting for the publisher.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::body::Bytes;
use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;

use crate::bus::BusError;
use crate::route::Topic;

pub(super) struct Outgoing {
    pub(super) at: Instant,
    pub(super) channels: Vec<String>,
    /// The whole payload; with history on, only its start
    /// ([`wire::encode_unstamped`](crate::bus::wire::encode_unstamped)),
    /// which the publish script completes.
    pub(super) payload: Bytes,
    /// With history on: what the publish script needs besides.
    pub(super) history: Option<Box<Recorded>>,
    /// One message queued as two items (history on, to connections and to
    /// other topics: `RedisBus::publish`): shared by both, set when either
    /// is lost, so the message is counted dropped once ([`lost`]).
    pub(super) twin: Option<Arc<AtomicBool>>,
    /// The batch of `POST /api/publish` it belongs to (none for any other
    /// message): told once all of the batch's items are settled.
    pub(super) ack: Option<Arc<Ack>>,
}

/// What a batch's sender waits on (`Bus::publish_all`'s receipt): every
/// item of the batch holds it, and when the last lets go (published, or
/// counted [`lost`]) it tells whether any was lost. An item dropped any
/// other way (none is: every loss is counted) would read as published.
pub(super) struct Ack {
    lost: AtomicBool,
    tell: Option<oneshot::Sender<bool>>,
}

impl Ack {
    /// The ack of one batch, and what resolves to `true` once all of it
    /// was published (`false`: some or all of it may not have been).
    pub(super) fn new() -> (Arc<Self>, oneshot::Receiver<bool>) {
        let (tell, told) = oneshot::channel();
        let ack = Self {
            lost: AtomicBool::new(false),
            tell: Some(tell),
        };
        (Arc::new(ack), told)
    }
}

impl Drop for Ack {
    fn drop(&mut self) {
        if let Some(tell) = self.tell.take() {
            let _ = tell.send(!*self.lost.get_mut());
        }
    }
}

impl Outgoing {
    /// Marks its batch, if any, as not published whole.
    fn mark_lost(&self) {
        if let Some(ack) = &self.ack {
            ack.lost.store(true, Ordering::Relaxed);
        }
    }
}

/// How many messages the lost `items` were: each item counts, except one
/// whose twin was counted already (this call or an earlier one). Each
/// one's batch, if any, is marked as not published whole ([`Ack`]).
pub(super) fn lost<'a>(items: impl IntoIterator<Item = &'a Outgoing>) -> u64 {
    let mut count = 0;
    for m in items {
        m.mark_lost();
        if m.twin
            .as_ref()
            .is_none_or(|t| !t.swap(true, Ordering::Relaxed))
        {
            count += 1;
        }
    }
    count
}

/// Marks the batches of `items` (if any) as not carried whole, without
/// counting them lost: what Redis recorded in history but did not
/// publish live (`UNHEARD`).
pub(super) fn unheard<'a>(items: impl IntoIterator<Item = &'a Outgoing>) {
    for m in items {
        m.mark_lost();
    }
}

/// What a send holds while it awaits Redis, for counting if the send is
/// cut short with them (the publisher's `flush`): a count, the twins'
/// shared marks and the batches' acks (few; usually none). Holding the
/// acks keeps them from telling "published" when the cut-short send
/// drops its items, before [`lost`](Self::lost) marks them.
#[derive(Default)]
pub(super) struct InFlight {
    alone: u64,
    twins: Vec<Arc<AtomicBool>>,
    acks: Vec<Arc<Ack>>,
}

impl InFlight {
    pub(super) fn of<'a>(items: impl IntoIterator<Item = &'a Outgoing>) -> Self {
        let mut held = Self::default();
        for m in items {
            match &m.twin {
                None => held.alone += 1,
                Some(twin) => held.twins.push(twin.clone()),
            }
            if let Some(ack) = &m.ack
                && !held.acks.last().is_some_and(|a| Arc::ptr_eq(a, ack))
            {
                held.acks.push(ack.clone());
            }
        }
        held
    }

    /// How many messages they were, counted as [`lost`] counts; their
    /// batches are marked as not published whole.
    pub(super) fn lost(self) -> u64 {
        for ack in &self.acks {
            ack.lost.store(true, Ordering::Relaxed);
        }
        self.alone
            + self
                .twins
                .iter()
                .filter(|t| !t.swap(true, Ordering::Relaxed))
                .count() as u64
    }
}

/// What the publish script needs of one message besides its channels
/// (history on; see `history.rs`).
pub(super) struct Recorded {
    /// The frame, appended by the script after the stamped header.
    pub(super) frame: Bytes,
    /// The topics recorded, one per channel (same order). Their Redis keys,
    /// JSON keys and sizes are written straight into the script call when
    /// it is sent (`history.rs`), not kept here as strings: making them per
    /// message was a quarter of what history added to a node's work per
    /// message in groups (issue 19).
    pub(super) topics: Vec<Topic>,
    /// The users the message excludes, when they are few enough to keep a
    /// run for (`history.rs`, "Excluded runs"); else none.
    pub(super) excluded: Vec<Arc<str>>,
    /// The message's number in this bus instance's publish order, given by
    /// the publisher when it first takes the message (0: not yet). The
    /// script skips numbers it has run already (see `history.rs`).
    pub(super) number: u64,
    /// When it was published (ms since the Unix epoch): on a Cluster part
    /// of its `seq`, a merge hint (`history/sharded.rs`).
    pub(super) published_ms: u64,
}

/// About what one recorded topic costs in the script call besides its
/// channel: its meta and stream keys (each the channel's name and a few
/// bytes), its JSON key, its size.
fn topic_keys_len(channel: &str) -> usize {
    3 * channel.len() + 24
}

/// What one queued message costs besides its payload and channel names.
const ITEM_OVERHEAD: usize = 64;

impl Outgoing {
    /// A message for a plain `PUBLISH` on each channel (history off).
    pub(super) fn new(channels: Vec<String>, payload: Bytes) -> Self {
        Self {
            at: Instant::now(),
            channels,
            payload,
            history: None,
            twin: None,
            ack: None,
        }
    }

    /// History on, on one Redis: a message that is not recorded (to
    /// connections, which have no history) but goes through the publish
    /// script with the recorded ones, in their order, published as it is
    /// on each channel (no topics: see `history.rs`).
    pub(super) fn relayed(channels: Vec<String>, payload: Bytes) -> Self {
        let mut item = Self::new(channels, payload);
        item.history = Some(Box::new(Recorded {
            frame: Bytes::new(),
            topics: Vec::new(),
            excluded: Vec::new(),
            number: 0,
            published_ms: crate::bus::wire::now_ms(),
        }));
        item
    }

    /// The frame's length (history on: it travels apart from the header).
    fn frame_len(&self) -> usize {
        self.history
            .as_ref()
            .filter(|h| !h.topics.is_empty())
            .map_or(0, |h| {
                h.frame.len()
                    + h.excluded.iter().map(|u| u.len()).sum::<usize>()
                    + self
                        .channels
                        .iter()
                        .map(|c| topic_keys_len(c))
                        .sum::<usize>()
            })
    }

    /// Memory the message holds while queued: the payload once (shared by
    /// every channel) and the channel names (and with history, the frame
    /// and the topics' keys).
    pub(super) fn queued_bytes(&self) -> usize {
        ITEM_OVERHEAD
            + self.payload.len()
            + self.frame_len()
            + self.channels.iter().map(String::len).sum::<usize>()
    }

    /// Bytes it costs on the wire and in the pipeline buffer: the payload
    /// once per channel. With history the script receives it once but
    /// writes it once per channel (stream and publish): the same bound
    /// keeps a batch's work in Redis, and so its time, as small as today.
    pub(super) fn wire_bytes(&self) -> usize {
        let payload = self.payload.len() + self.history.as_ref().map_or(0, |h| h.frame.len());
        self.channels.iter().map(|c| c.len() + payload + 32).sum()
    }
}

/// What a refused batch had queued before the item of `size` that did
/// not fit: the queue's bytes now (`now`) less those before it (`before`),
/// plus that item.
fn bytes_of_batch(size: usize, now: usize, before: usize) -> usize {
    size + now.saturating_sub(before)
}

/// Messages waiting for the publisher, bounded by `redis.publish_queue`
/// messages and `redis.publish_queue_bytes` bytes; a message that does not
/// fit is refused with [`BusError::Overloaded`] (the sender is told).
///
/// A `std::sync::Mutex` around a `VecDeque` rather than a channel: the
/// publisher must be able to drop expired messages from the front while
/// Redis is away, which a channel does not allow, and the bound is in
/// bytes, which a channel does not offer.
pub(super) struct PublishQueue {
    inner: std::sync::Mutex<Inner>,
    capacity: usize,
    capacity_bytes: usize,
    ready: Notify,
}

#[derive(Default)]
struct Inner {
    items: VecDeque<Outgoing>,
    bytes: usize,
}

impl Inner {
    fn pop_front(&mut self) -> Option<Outgoing> {
        let item = self.items.pop_front()?;
        self.bytes -= item.queued_bytes();
        Some(item)
    }
}

impl PublishQueue {
    pub(super) fn new(capacity: usize, capacity_bytes: usize) -> Self {
        Self {
            inner: std::sync::Mutex::default(),
            capacity,
            capacity_bytes,
            ready: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Every critical section leaves the queue consistent.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues every item or none (a message split into several items, or
    /// a request's batch of messages, is never half queued).
    /// (Any iterator, so that one message's one or two items need no
    /// `Vec` of their own: the per-message path allocates nothing here.)
    pub(super) fn push_all(
        &self,
        items: impl IntoIterator<Item = Outgoing>,
    ) -> Result<(), BusError> {
        let mut inner = self.lock();
        let (len, bytes) = (inner.items.len(), inner.bytes);
        let mut items = items.into_iter();
        while let Some(item) = items.next() {
            let size = item.queued_bytes();
            if inner.items.len() >= self.capacity || inner.bytes + size > self.capacity_bytes {
                // None of them, then: what this call queued goes again.
                let (mut count, mut total) = (1, bytes_of_batch(size, inner.bytes, bytes));
                for taken_back in inner.items.drain(len..) {
                    taken_back.mark_lost();
                    count += 1;
                }
                inner.bytes = bytes;
                drop(inner);
                for rest in items {
                    rest.mark_lost();
                    count += 1;
                    total += rest.queued_bytes();
                }
                // A batch the empty queue could not hold never goes through
                // (review of 2026-12-03: "overloaded" read as worth a retry).
                if count > self.capacity || total > self.capacity_bytes {
                    return Err(BusError::BatchTooLarge(format!(
                        "the batch is larger than the publish queue can ever hold (it needs {count} \
                         places and about {total} bytes; redis.publish_queue = {}, \
                         redis.publish_queue_bytes = {}): split it, or raise those keys",
                        self.capacity, self.capacity_bytes
                    )));
                }
                return Err(BusError::Overloaded);
            }
            inner.bytes += size;
            inner.items.push_back(item);
        }
        drop(inner);
        self.ready.notify_one();
        Ok(())
    }

    pub(super) async fn wait(&self) {
        loop {
            if !self.is_empty() {
                return;
            }
            self.ready.notified().await;
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.lock().items.is_empty()
    }

    /// Drops messages older than `max_age`; returns how many ([`lost`]).
    pub(super) fn expire(&self, max_age: Duration) -> u64 {
        let mut inner = self.lock();
        let mut dropped = 0;
        while inner
            .items
            .front()
            .is_some_and(|m| m.at.elapsed() > max_age)
        {
            if let Some(m) = inner.pop_front() {
                dropped += lost([&m]);
            }
        }
        dropped
    }

    /// Takes the next batch: at most `max` messages and, unless the first
    /// message alone is larger, at most `max_bytes` on the wire; a message
    /// of a quarter of `max_bytes` or more travels alone. Small batches keep
    /// one slow or failed pipeline from taking many unrelated messages with
    /// it, and the large fan-outs, the pipelines most likely to time out,
    /// take nobody else's.
    pub(super) fn take(&self, max: usize, max_bytes: usize) -> Vec<Outgoing> {
        self.take_run(max, max_bytes, |_| true)
    }

    /// As [`take`](Self::take), and only messages of the first one's
    /// `kind` (the next of another kind starts the next batch): batches
    /// sent by different means (history's script, a plain pipeline) in
    /// queue order keep one sender's order.
    pub(super) fn take_run(
        &self,
        max: usize,
        max_bytes: usize,
        kind: impl Fn(&Outgoing) -> bool,
    ) -> Vec<Outgoing> {
        let large = max_bytes / 4;
        let mut inner = self.lock();
        let mut batch = Vec::new();
        let mut bytes = 0;
        let mut first = None;
        while batch.len() < max {
            let Some(next) = inner.items.front() else {
                break;
            };
            if *first.get_or_insert_with(|| kind(next)) != kind(next) {
                break;
            }
            let size = next.wire_bytes();
            if !batch.is_empty() && (bytes + size > max_bytes || size >= large || bytes >= large) {
                break;
            }
            bytes += size;
            batch.extend(inner.pop_front());
        }
        batch
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn channels(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("wshub:u:{i}")).collect()
    }

    impl PublishQueue {
        fn push_plain(&self, channels: Vec<String>, payload: Bytes) -> Result<(), BusError> {
            self.push_all(vec![Outgoing::new(channels, payload)])
        }
    }

    #[test]
    fn bounded_in_bytes_as_well_as_messages() {
        let q = PublishQueue::new(1000, 10_000);
        q.push_plain(channels(1), Bytes::from(vec![0; 4000]))
            .unwrap();
        q.push_plain(channels(1), Bytes::from(vec![0; 4000]))
            .unwrap();
        assert!(matches!(
            q.push_plain(channels(1), Bytes::from(vec![0; 4000])),
            Err(BusError::Overloaded)
        ));
        // Small messages still fit.
        q.push_plain(channels(1), Bytes::from_static(b"x")).unwrap();
        assert_eq!(q.take(10, usize::MAX).len(), 3);
        // Taking gives the bytes back.
        q.push_plain(channels(1), Bytes::from(vec![0; 9000]))
            .unwrap();
    }

    /// A batch that does not fit whole is refused whole, and leaves the
    /// queue as it was (`POST /api/publish`: all or none).
    #[test]
    fn a_batch_that_does_not_fit_leaves_the_queue_as_it_was() {
        let q = PublishQueue::new(3, 10_000);
        q.push_plain(channels(1), Bytes::from(vec![0; 1000]))
            .unwrap();
        let batch = |n: usize, each: usize| {
            (0..n).map(move |_| Outgoing::new(channels(1), Bytes::from(vec![0; each])))
        };
        assert!(
            matches!(q.push_all(batch(3, 10)), Err(BusError::Overloaded)),
            "by count"
        );
        assert!(
            matches!(q.push_all(batch(2, 4500)), Err(BusError::Overloaded)),
            "by bytes"
        );
        // Larger than the empty queue: never, and said so.
        for (n, each, why) in [(4, 1, "by count"), (2, 5000, "by bytes")] {
            match q.push_all(batch(n, each)) {
                Err(BusError::BatchTooLarge(text)) => {
                    assert!(text.contains("can ever hold"), "{why}: {text}")
                }
                other => panic!("{why}: {other:?}"),
            }
        }
        // Nothing of them stayed: exactly the room there was is still there.
        q.push_all(batch(2, 4000)).unwrap();
        assert!(matches!(q.push_all(batch(1, 1)), Err(BusError::Overloaded)));
        assert_eq!(q.take(10, usize::MAX).len(), 3);
    }

    #[test]
    fn a_run_is_taken_in_order_and_of_one_kind() {
        let q = PublishQueue::new(1000, usize::MAX);
        for n in [1, 1, 2, 1, 2, 2, 2] {
            q.push_plain(channels(n), Bytes::from_static(b"x")).unwrap();
        }
        let two = |m: &Outgoing| m.channels.len() == 2;
        let runs: Vec<Vec<usize>> = std::iter::from_fn(|| {
            let run = q.take_run(2, usize::MAX, two);
            (!run.is_empty()).then(|| run.iter().map(|m| m.channels.len()).collect())
        })
        .collect();
        assert_eq!(runs, [vec![1, 1], vec![2], vec![1], vec![2, 2], vec![2]]);
    }

    #[test]
    fn batches_are_bounded_in_wire_bytes() {
        let q = PublishQueue::new(1000, usize::MAX);
        // 100 channels × 1 KB: 100 KB on the wire, 1 KB queued.
        for _ in 0..5 {
            q.push_plain(channels(100), Bytes::from(vec![0; 1000]))
                .unwrap();
        }
        let first = q.take(512, 250_000);
        assert_eq!(
            first.len(),
            1,
            "a fan-out of over a quarter of the budget goes alone"
        );
        assert_eq!(
            q.take(512, 500_000).len(),
            2,
            "two fan-outs of ~100 KB per 500 KB batch"
        );
        // A single message over the budget still goes, alone.
        assert_eq!(q.take(512, 10).len(), 1);
        assert_eq!(q.take(512, usize::MAX).len(), 1);
        assert!(q.is_empty());
        // Small messages do not join a large one, before or after it.
        q.push_plain(channels(1), Bytes::from_static(b"small"))
            .unwrap();
        q.push_plain(channels(100), Bytes::from(vec![0; 1000]))
            .unwrap();
        q.push_plain(channels(1), Bytes::from_static(b"small"))
            .unwrap();
        let sizes: Vec<usize> = (0..3).map(|_| q.take(512, 250_000).len()).collect();
        assert_eq!(sizes, [1, 1, 1]);
    }
}
