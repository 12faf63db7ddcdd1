//! Delivery lanes: the tasks that write a big fanout's frames to the
//! sockets, one lane per runtime worker (issue 19).
//!
//! A delivery to more of this node's sockets than the delivering task
//! writes itself ([`crate::hub`]) queues the frame on each socket without
//! waking its session, and hands the socket to its lane (chosen by the
//! connection's id). The lane writes what the socket's queue holds when
//! the socket takes it at once, and wakes the session only for what is
//! left: a socket that is busy (its session holds the write side), slow
//! (bytes owed) or not the lane's to write (before the resume decision,
//! or closing). With history on, the lane checks each copy against the
//! socket's floors as the session would ([`crate::wire`]).
//! Waking thousands of sessions for one message each was most of a big
//! fanout's cost beyond the writes themselves; lanes turn that into one
//! wake-up per lane and a loop of writes, and with one lane per worker a
//! message's recipients are written on every core.
//!
//! Order: a socket's frames are taken from its queue, in the order they
//! were queued, under its write side's lock, by whichever of the lane, the
//! session or a small delivery's direct write ([`crate::wire`]) holds it;
//! a direct write happens only when the queue is empty. So lanes reorder
//! nothing, within a topic or across topics.
//!
//! Bounds: a lane's list holds each connection at most once (the
//! connection's `on_lane` flag), so it is bounded by the node's
//! connections; the frames themselves wait in each socket's byte-bounded
//! queue, whose overflow closes the socket as a slow consumer as before.
//! A lane yields to the runtime every [`YIELD_EVERY`] sockets, so sessions
//! on its worker (reads, pings, slow sockets' writes) are not starved by a
//! long list. Once the node's shutdown stops the lanes, a handed socket's
//! session is woken instead, so nothing is left unwritten.

use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::conn::Conn;
use crate::shutdown::Shutdown;

/// Sockets a lane visits before it yields to the runtime.
const YIELD_EVERY: usize = 128;

/// Sockets a delivering task collects for one lane before it hands them
/// over, so that the lane starts writing while the delivery goes on.
pub(crate) const HAND_EVERY: usize = 256;

/// The node's delivery lanes (none: every delivery wakes the sessions).
#[derive(Default)]
pub(crate) struct Lanes {
    lanes: Box<[Arc<Lane>]>,
}

#[derive(Default)]
struct Lane {
    todo: Mutex<Todo>,
    ready: Notify,
}

#[derive(Default)]
struct Todo {
    conns: Vec<Arc<Conn>>,
    /// The lane's task has ended: hand-overs wake the sessions.
    stopped: bool,
}

impl Lane {
    fn lock(&self) -> MutexGuard<'_, Todo> {
        // A list of handles: never inconsistent, ignore poisoning.
        self.todo.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Lanes {
    /// `n` lanes, each a task of `shutdown`'s, which stops them.
    pub(crate) fn start(n: usize, shutdown: &Shutdown) -> Self {
        let lanes: Box<[Arc<Lane>]> = (0..n).map(|_| Arc::new(Lane::default())).collect();
        for lane in &lanes {
            shutdown.spawn(run(lane.clone(), shutdown.token().clone()));
        }
        Self { lanes }
    }

    /// One lane per worker of the current runtime (none outside one).
    pub(crate) fn per_worker(shutdown: &Shutdown) -> Self {
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => Self::start(runtime.metrics().num_workers(), shutdown),
            Err(_) => Self::default(),
        }
    }

    /// How many lanes.
    pub(crate) fn len(&self) -> usize {
        self.lanes.len()
    }

    /// The lane of connection `id` (there must be lanes).
    pub(crate) fn of(&self, id: u64) -> usize {
        (id % self.lanes.len() as u64) as usize
    }

    /// Hands `conns` (emptied) to lane `lane`.
    pub(crate) fn hand(&self, lane: usize, conns: &mut Vec<Arc<Conn>>) {
        if conns.is_empty() {
            return;
        }
        let lane = &self.lanes[lane];
        let mut todo = lane.lock();
        if todo.stopped {
            drop(todo);
            conns.drain(..).for_each(|conn| conn.visit(false));
            return;
        }
        todo.conns.append(conns);
        drop(todo);
        // A permit is kept when the lane is not waiting: no lost wake-up.
        lane.ready.notify_one();
    }
}

/// A lane's task: visits the sockets it is handed until `stop`.
async fn run(lane: Arc<Lane>, stop: CancellationToken) {
    let mut work = Vec::new();
    loop {
        std::mem::swap(&mut lane.lock().conns, &mut work);
        if work.is_empty() {
            tokio::select! {
                () = lane.ready.notified() => continue,
                () = stop.cancelled() => break,
            }
        }
        for (i, conn) in work.drain(..).enumerate() {
            conn.visit(true);
            if (i + 1) % YIELD_EVERY == 0 {
                tokio::task::yield_now().await;
            }
        }
        if work.capacity() > 4 * HAND_EVERY {
            // Give back what a burst grew.
            work = Vec::new();
        }
    }
    // Stopped: the sockets still listed, and any handed from now on, are
    // left to their sessions.
    let left = {
        let mut todo = lane.lock();
        todo.stopped = true;
        std::mem::take(&mut todo.conns)
    };
    left.into_iter().for_each(|conn| conn.visit(false));
}
