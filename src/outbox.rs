//! A connection's outbound queue: encoded frames waiting for the session
//! to write them, bounded in bytes.
//!
//! With history on, a queued copy of a stamped message also carries its
//! [`Mark`] (the topic it came through and its position there), so the
//! session can drop copies a replay already wrote (`crate::resume`).

use std::collections::VecDeque;
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;

use crate::message::{Frame, MessageLimits, max_frame_bytes};
use crate::position::Mark;

/// Bookkeeping cost of one queued frame beyond its bytes, so that a flood of
/// tiny frames is bounded too. (The configuration requires room for one
/// largest frame plus this.)
pub(crate) const FRAME_OVERHEAD: usize = 64;

/// The smallest budget an outbox may have (the floor of
/// `limits.outbound_queue_bytes`): room for the largest frame one message
/// of `max_message_bytes` can become, plus [`FRAME_OVERHEAD`], so that a
/// single largest message never closes a healthy client as slow.
pub(crate) fn min_budget(max_message_bytes: usize, limits: &MessageLimits) -> usize {
    max_frame_bytes(max_message_bytes, limits).saturating_add(FRAME_OVERHEAD)
}

/// A connection's outbound queue, bounded in bytes rather than frames.
///
/// Bytes are what a slow client costs and what "how far behind is it"
/// means: a burst of a thousand tiny messages is harmless, a few hundred
/// kilobytes unread is not. [`push`](Self::push) refuses a frame that would
/// take the queued total past the budget (frames are shared `Bytes`, so the
/// real memory is often less than the budget says).
///
/// A `std::sync::Mutex` around a `VecDeque` and an `AtomicWaker`, rather
/// than a channel: an idle socket's queue allocates nothing (a tokio channel
/// allocates its first block of slots up front, over a kilobyte per
/// socket), both ends hold the lock for a push or a pop only, and waking
/// the one reader is an atomic swap.
#[derive(Debug)]
pub(crate) struct Outbox {
    queue: std::sync::Mutex<Queue>,
    budget: usize,
    ready: AtomicWaker,
}

#[derive(Debug, Default)]
struct Queue {
    frames: VecDeque<Queued>,
    bytes: usize,
}

/// One queued frame and, for a copy of a stamped message, its mark.
#[derive(Debug)]
pub(crate) struct Queued {
    pub(crate) frame: Frame,
    pub(crate) mark: Option<Mark>,
}

/// The queue was full.
#[derive(Debug)]
pub(crate) struct Full;

impl Outbox {
    pub(crate) fn new(budget: usize) -> Self {
        Self {
            queue: std::sync::Mutex::default(),
            budget,
            ready: AtomicWaker::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        // Every critical section is one push or pop: never inconsistent.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `frame` (with its `mark`) and wakes the reader, or refuses it
    /// when it would take the queue past its budget. The mark is not
    /// counted apart: [`FRAME_OVERHEAD`] covers it (its epoch is shared).
    pub(crate) fn push(&self, frame: Frame, mark: Option<Mark>) -> Result<(), Full> {
        self.push_quiet(frame, mark)?;
        self.ready.wake();
        Ok(())
    }

    /// [`push`](Self::push) without waking the reader: for a frame that a
    /// delivery lane ([`crate::lane`]) will write, or wake the reader for.
    pub(crate) fn push_quiet(&self, frame: Frame, mark: Option<Mark>) -> Result<(), Full> {
        let cost = frame.len() + FRAME_OVERHEAD;
        let mut queue = self.lock();
        if queue.bytes + cost > self.budget {
            return Err(Full);
        }
        queue.bytes += cost;
        queue.frames.push_back(Queued { frame, mark });
        Ok(())
    }

    /// The oldest queued frame, if any.
    pub(crate) fn pop(&self) -> Option<Queued> {
        let mut queue = self.lock();
        let queued = queue.frames.pop_front()?;
        queue.bytes -= queued.frame.len() + FRAME_OVERHEAD;
        if queue.frames.is_empty() && queue.frames.capacity() > 64 {
            // Give back what a burst grew.
            queue.frames = VecDeque::new();
        }
        Some(queued)
    }

    /// Whether no frame is queued.
    pub(crate) fn is_empty(&self) -> bool {
        self.lock().frames.is_empty()
    }

    /// Wakes the reader without a frame: a delivering task left bytes
    /// owed on the socket ([`crate::wire`]) for the session to write.
    pub(crate) fn wake(&self) {
        self.ready.wake();
    }

    /// `Ready` once a frame is queued or `more()` (the session has work),
    /// else `Pending` and `cx` woken by the next push or
    /// [`wake`](Self::wake). Only the session may wait.
    pub(crate) fn poll_work(&self, cx: &mut Context<'_>, more: impl Fn() -> bool) -> Poll<()> {
        poll_on(&self.ready, cx, || {
            (!self.is_empty() || more()).then_some(())
        })
    }

    /// The next frame, or `Pending` and `cx` woken by the next push. Only
    /// one task (the session) may wait: the waker slot holds one waker. A
    /// poll function rather than a future, so that the session's `select!`
    /// holds a reference, not a future's state, for it.
    #[cfg(test)]
    pub(crate) fn poll_recv(&self, cx: &mut Context<'_>) -> Poll<Queued> {
        poll_on(&self.ready, cx, || self.pop())
    }
}

/// Waits until `ready` returns a value, woken through `waker`: the one
/// waiting task's side of a single-waiter [`AtomicWaker`] (the
/// [`Closer`](crate::conn::Closer)'s).
pub(crate) async fn wait_on<T>(waker: &AtomicWaker, mut ready: impl FnMut() -> Option<T>) -> T {
    std::future::poll_fn(|cx| poll_on(waker, cx, &mut ready)).await
}

/// One poll of [`wait_on`] (and of the outbox's
/// [`poll_recv`](Outbox::poll_recv)). The check runs again after
/// registering, because a wake between the first check and the
/// registration woke nobody.
fn poll_on<T>(
    waker: &AtomicWaker,
    cx: &mut Context<'_>,
    mut ready: impl FnMut() -> Option<T>,
) -> Poll<T> {
    if let Some(value) = ready() {
        return Poll::Ready(value);
    }
    waker.register(cx.waker());
    match ready() {
        Some(value) => Poll::Ready(value),
        None => Poll::Pending,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Context, Wake, Waker};

    /// A waker that counts its wake-ups, for the unit tests of the two
    /// hand-written wakers ([`wait_on`]'s users).
    #[derive(Default)]
    pub(crate) struct CountingWaker(pub(crate) AtomicUsize);

    impl Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Polls `future` once with `waker`.
    pub(crate) fn poll_once<F: Future>(future: F, waker: &Arc<CountingWaker>) -> Poll<F::Output> {
        let waker = Waker::from(waker.clone());
        let mut cx = Context::from_waker(&waker);
        std::pin::pin!(future).poll(&mut cx)
    }

    fn poll_recv(outbox: &Outbox, waker: &Arc<CountingWaker>) -> Poll<Queued> {
        poll_once(std::future::poll_fn(|cx| outbox.poll_recv(cx)), waker)
    }

    use std::future::Future;

    /// The hand-written waker: a reader that found the queue empty is woken
    /// by the next push, exactly once, and then gets that frame.
    #[test]
    fn a_push_wakes_the_waiting_reader() {
        let outbox = Outbox::new(1024);
        let waker = Arc::new(CountingWaker::default());
        assert!(poll_recv(&outbox, &waker).is_pending());
        assert_eq!(waker.0.load(Ordering::SeqCst), 0);
        outbox.push(Frame::from("one"), None).unwrap();
        assert_eq!(
            waker.0.load(Ordering::SeqCst),
            1,
            "the push woke the reader"
        );
        match poll_recv(&outbox, &waker) {
            Poll::Ready(queued) => assert_eq!(&*queued.frame, "one"),
            Poll::Pending => panic!("woken but nothing to read"),
        }
    }

    /// A frame queued before the reader waits is returned at once, without
    /// registering (no lost wake-up either way).
    #[test]
    fn a_queued_frame_is_ready_without_waiting() {
        let outbox = Outbox::new(1024);
        outbox.push(Frame::from("early"), None).unwrap();
        let waker = Arc::new(CountingWaker::default());
        assert!(poll_recv(&outbox, &waker).is_ready());
        assert!(poll_recv(&outbox, &waker).is_pending());
    }

    /// The budget counts bytes plus the per-frame overhead, and popping
    /// gives the room back.
    #[test]
    fn the_budget_is_in_bytes_and_given_back() {
        let outbox = Outbox::new(2 * (3 + FRAME_OVERHEAD));
        outbox.push(Frame::from("abc"), None).unwrap();
        outbox.push(Frame::from("def"), None).unwrap();
        assert!(outbox.push(Frame::from("g"), None).is_err());
        assert!(outbox.pop().is_some());
        outbox.push(Frame::from("ghi"), None).unwrap();
    }
}
