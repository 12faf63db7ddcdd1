//! The resume decision (see the parent module for floors and frames).
//!
//! A socket that gives positions for its three topics ([`topics_of`]) is
//! *recovered* when every message it missed is still in history: each
//! topic is read after the socket's position, every message read is kept
//! only when the socket accepts it through the topic it was read from
//! ([`Route::accepts`](crate::route::Route::accepts): the live rule, so a
//! message to a group and a user is replayed once), and the rest are merged
//! in publish order (`stamp.seq`). Anything short of that — a topic trimmed
//! or expired, a new epoch, more than `history.max_replay`, positions that
//! cannot be read or are missing, history failing or slow — is *not
//! recovered*: nothing is replayed (all or nothing) and the socket
//! continues from the topics' tops. Legacy sockets (no `resume`) take over a
//! drain handoff the same way, without the welcome and without `pos`.
//!
//! **One snapshot of the three topics.** The socket is subscribed and in
//! the hub before history is read, and its three topics are then read as
//! one atomic snapshot ([`History::read_many`]: one script in Redis reads
//! every top, and the entries up to them, which never change, in bounded
//! steps after it). A message
//! published after that step has a `seq` above every replayed one and, in
//! each topic of its route, an offset above the top the step read: it
//! reaches the socket live, after the replay, and the floors (which start
//! at those tops) let it through, while the live copies of replayed
//! messages are at or below the floors and are dropped. So the replay and
//! the live copies after it are one sequence in publish order, however
//! busy the topics are, and the decision is made once.
//!
//! Rejected:
//!
//! - **Reading the topics one after another, again and again until a round
//!   of reads finds nothing new** (the first design). Three reads are not
//!   one snapshot: a message published to `all` after `all` was read but
//!   before the group was would be missing from the replay while a later
//!   message of the group is in it, and its live copy would arrive after
//!   that later message. Repeating the rounds until one found nothing new
//!   fixed the order, but a topic that never stops growing (a steady
//!   stream, which a busy `all` always is) never gives a quiet round: after
//!   4 rounds the resume gave up, and about one resume in three said
//!   `recovered: false` under the chaos test's 1,000 messages/s.
//! - **Writing the live copies as they come, merged with the replay by
//!   `seq`**: a live copy still in flight to this node cannot be waited
//!   for without knowing it exists; waiting until the node has delivered
//!   the highest replayed `seq` stalls whenever that message never reaches
//!   this node.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tracing::{debug, warn};

use super::{Floors, Outcome, Report, Request, welcome_frame};
use crate::envelope::Envelope;
use crate::history::{History, HistoryError, Position, Positions, Read, client_key, topics_of};
use crate::logging::Untrusted;
use crate::message::Frame;
use crate::metrics::Metrics;
use crate::outcome::{HandoffResult, ResumeResult};
use crate::route::{Identity, Topic};

/// One topic's history as read so far: the messages after the socket's
/// position, oldest first, and the position they reach.
#[derive(Debug)]
struct Reach {
    messages: Vec<Arc<Envelope>>,
    top: Position,
}

/// Why a resume is not recovered (logged at debug).
#[derive(Debug, thiserror::Error)]
pub enum NotRecovered {
    /// The `resume` value could not be read.
    #[error("the positions cannot be read")]
    Unreadable,
    /// Positions were given for some of the socket's topics only.
    #[error("no position for {0}")]
    Missing(&'static str),
    /// History no longer holds everything after a position (trimmed,
    /// expired, a new epoch), or more than the budget follows it.
    #[error("history of {0} is incomplete")]
    Incomplete(String),
    /// Reading what the socket missed went beyond
    /// `history.max_replay_bytes`.
    #[error("more than history.max_replay_bytes to read, reached at {0}")]
    TooLarge(String),
    /// More than `history.max_replay` messages to replay.
    #[error("{count} messages to replay, more than history.max_replay ({max})")]
    TooMany {
        /// Messages the socket would be replayed.
        count: usize,
        /// `history.max_replay`.
        max: usize,
    },
    /// History answered something that does not follow the position
    /// (offsets not contiguous, a message without its stamp, a position
    /// ahead of the topic): never replayed.
    #[error("history of {0} does not follow the position given")]
    Inconsistent(String),
    /// History failed.
    #[error(transparent)]
    History(#[from] HistoryError),
    /// History did not answer in time.
    #[error("history did not answer within {0:?}")]
    TimedOut(Duration),
    /// The replay did not fit in `history.replay_budget_bytes` (the
    /// replays the node holds at once) within the call limit.
    #[error("no room for {0} bytes of replay in history.replay_budget_bytes")]
    OverBudget(usize),
}

impl Reach {
    fn at(position: Position) -> Self {
        Self {
            messages: Vec::new(),
            top: position,
        }
    }

    /// Adds the read of `topic` after `self.top`. Refuses a read that is
    /// incomplete or is not the exact continuation: same epoch, one message
    /// per offset from `top + 1` to its top, each stamped with that
    /// position.
    fn extend(&mut self, topic: &Topic, read: Read) -> Result<(), NotRecovered> {
        let (messages, top, passed) = match read {
            Read::Complete {
                messages,
                top,
                passed,
            } => (messages, top, passed),
            Read::Incomplete { .. } => return Err(NotRecovered::Incomplete(client_key(topic))),
            Read::TooLarge { .. } => return Err(NotRecovered::TooLarge(client_key(topic))),
        };
        let inconsistent = || NotRecovered::Inconsistent(client_key(topic));
        if self.top.is_unborn() && !top.is_unborn() {
            // The topic had no epoch when the handoff's socket read it:
            // every epoch it has now came later, and is read from its
            // start (see `Resumer::start`).
            self.top = Position {
                epoch: top.epoch.clone(),
                offset: 0,
            };
        }
        if top.epoch != self.top.epoch {
            return Err(inconsistent());
        }
        if let Some(passed) = passed {
            // Every message up to `passed` excluded the socket's user
            // (history's excluded runs): the read follows it. Never
            // backwards, never into another epoch.
            if passed.epoch != top.epoch || passed.offset < self.top.offset {
                return Err(inconsistent());
            }
            self.top = passed;
        }
        let expected = top
            .offset
            .checked_sub(self.top.offset)
            .ok_or_else(inconsistent)?;
        if messages.len() as u64 != expected {
            return Err(inconsistent());
        }
        for (n, message) in (1..).zip(&messages) {
            let position = message
                .stamp
                .as_ref()
                .and_then(|s| s.position(topic))
                .ok_or_else(inconsistent)?;
            if position.epoch != top.epoch || position.offset != self.top.offset + n {
                return Err(inconsistent());
            }
        }
        self.messages.extend(messages);
        self.top = top;
        Ok(())
    }
}

/// The replay of what was read: every message the socket `who` accepts
/// through the topic it was read from, in publish order, at most
/// `max_replay`.
fn merge(
    reaches: &[Reach; 3],
    who: &Identity,
    max_replay: usize,
) -> Result<Vec<Arc<Envelope>>, NotRecovered> {
    let topics = topics_of(who);
    let lists: Vec<Vec<Arc<Envelope>>> = reaches
        .iter()
        .zip(&topics)
        .map(|(reach, topic)| {
            reach
                .messages
                .iter()
                .filter(|message| message.route.accepts(topic, who))
                .cloned()
                .collect()
        })
        .collect();
    // Stamped: `extend` checked. Each topic in its own order (on a Cluster
    // `seq` is only a hint: `history::merge_ordered`).
    let mut replay =
        crate::history::merge_ordered(lists, |m| m.stamp.as_ref().map_or(0, |s| s.seq));
    // One message is accepted through one topic only; the same stamp seen
    // twice would be history's mistake, and one copy is what the socket is
    // owed. (Not the same `seq` alone: on a Cluster two messages can share
    // one.)
    replay.dedup_by(|a, b| a.stamp == b.stamp);
    if replay.len() > max_replay {
        return Err(NotRecovered::TooMany {
            count: replay.len(),
            max: max_replay,
        });
    }
    Ok(replay)
}

/// The resume decision, as a pure function: given the positions a socket
/// gave (`from`, per [`topics_of`]`(who)`) and what one snapshot of
/// history answered for each topic after them, the messages to replay in
/// order and the positions reached. Err: not recovered.
pub fn decide(
    from: &[Position; 3],
    reads: [Read; 3],
    who: &Identity,
    max_replay: usize,
) -> Result<(Vec<Arc<Envelope>>, [Position; 3]), NotRecovered> {
    let topics = topics_of(who);
    let mut reaches = from.clone().map(Reach::at);
    for ((reach, topic), read) in reaches.iter_mut().zip(&topics).zip(reads) {
        reach.extend(topic, read)?;
    }
    let replay = merge(&reaches, who, max_replay)?;
    Ok((replay, reaches.map(|r| r.top)))
}

/// The bounds of a node's resumes: `history.max_replay`,
/// `history.max_replay_bytes` and `history.replay_budget_bytes` (0: no
/// bound, for both byte settings).
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// More messages to replay: not recovered.
    pub max_replay: usize,
    /// More bytes to read for one resume: not recovered.
    pub max_replay_bytes: usize,
    /// The bytes of replays the node holds at once.
    pub replay_budget_bytes: usize,
}

/// `history.replay_budget_bytes`: the bytes of replays a node holds at
/// once, in KiB. A recovered resume takes its replay's size once it has
/// read it and gives it back once the replay is written (or the socket
/// ended): a client that resumes far back and then does not read holds its
/// replay until its write times out, and without this bound any number of
/// such clients made a node hold any amount. A resume that finds no room
/// within the call limit is not recovered ([`NotRecovered::OverBudget`]),
/// like one whose history did not answer in time; one bigger than the whole
/// budget is not recovered at once. What a read holds while it runs is
/// bounded apart, by the reads in flight (`bus/redis/history.rs`).
struct Budget {
    room: Arc<Room>,
    /// Every KiB: a replay needing more can never fit.
    total: u32,
}

/// The budget's free KiB and the replays waiting for room, first fit.
///
/// Not a `tokio::sync::Semaphore`: a fair semaphore hands what is free to
/// the first replay waiting, so one that does not fit would hold up every
/// later one that does (each up to the call limit). Here a replay takes
/// room whenever there is enough for it; what is given back goes to the
/// waiting replays it fits, in the order they came, each woken only when
/// its share is granted (not all of them at every give-back). A big one
/// passed over by smaller ones waits at most the call limit, like any
/// other.
struct Room(std::sync::Mutex<RoomState>);

struct RoomState {
    free: u32,
    waiting: std::collections::VecDeque<Waiting>,
    /// When the queue holds this many, the ones that stopped waiting (their
    /// resume timed out or its socket ended) are swept out.
    sweep_at: usize,
}

struct Waiting {
    kib: u32,
    grant: tokio::sync::oneshot::Sender<BudgetShare>,
}

/// A replay's share of the node's [`Budget`], given back when dropped.
pub struct BudgetShare {
    room: Arc<Room>,
    kib: u32,
}

impl Drop for BudgetShare {
    fn drop(&mut self) {
        if self.kib > 0 {
            self.room.give_back(self.kib);
        }
    }
}

impl std::fmt::Debug for BudgetShare {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BudgetShare({} KiB)", self.kib)
    }
}

impl Room {
    fn state(&self) -> std::sync::MutexGuard<'_, RoomState> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds `kib` to the free room and grants the waiting replays it now
    /// fits, first come first.
    fn give_back(self: &Arc<Self>, kib: u32) {
        let mut state = self.state();
        state.free += kib;
        let mut at = 0;
        while at < state.waiting.len() && state.free > 0 {
            let waiting = &state.waiting[at];
            if waiting.grant.is_closed() {
                state.waiting.remove(at);
            } else if waiting.kib <= state.free {
                let Some(waiting) = state.waiting.remove(at) else {
                    break;
                };
                state.free -= waiting.kib;
                let share = BudgetShare {
                    room: self.clone(),
                    kib: waiting.kib,
                };
                // Stopped waiting just now: the room stays free (and the
                // share, defused, does not give it back under this lock).
                if let Err(mut share) = waiting.grant.send(share) {
                    state.free += share.kib;
                    share.kib = 0;
                }
            } else {
                at += 1;
            }
        }
    }
}

impl Budget {
    /// `None` for 0 (no bound).
    fn new(bytes: usize) -> Option<Self> {
        let total = u32::try_from(bytes.div_ceil(1024)).unwrap_or(u32::MAX);
        (total > 0).then(|| Self {
            room: Arc::new(Room(std::sync::Mutex::new(RoomState {
                free: total,
                waiting: std::collections::VecDeque::new(),
                sweep_at: 64,
            }))),
            total,
        })
    }

    /// Room for `bytes` within `limit`, or `None`.
    async fn take(&self, bytes: usize, limit: Duration) -> Option<BudgetShare> {
        let kib = u32::try_from(bytes.div_ceil(1024)).ok()?.max(1);
        if kib > self.total {
            return None;
        }
        let granted = {
            let mut state = self.room.state();
            if state.free >= kib {
                state.free -= kib;
                return Some(BudgetShare {
                    room: self.room.clone(),
                    kib,
                });
            }
            if state.waiting.len() >= state.sweep_at {
                state.waiting.retain(|w| !w.grant.is_closed());
                state.sweep_at = (2 * state.waiting.len()).max(64);
            }
            let (grant, granted) = tokio::sync::oneshot::channel();
            state.waiting.push_back(Waiting { kib, grant });
            granted
        };
        // A share granted as the wait times out is dropped with the
        // receiver, and so given back.
        tokio::time::timeout(limit, granted).await.ok()?.ok()
    }
}

/// History as a node's sockets use it: the resume decision at connect and
/// the drain handoff at shutdown, every call bounded in time.
pub struct Resumer {
    history: Arc<dyn History>,
    max_replay: usize,
    /// `history.max_replay_bytes`: the most one resume reads
    /// (`usize::MAX` for the setting's 0, no bound).
    max_replay_bytes: usize,
    /// `history.replay_budget_bytes`; `None`: no bound.
    budget: Option<Budget>,
    drain_handoff: bool,
    /// The bound on each History call (`redis.command_timeout_ms`).
    limit: Duration,
    node_id: Arc<str>,
    metrics: Arc<Metrics>,
    /// A failed handoff is logged at warn once per node, then at debug
    /// (a drain with Redis gone would otherwise log one line per socket);
    /// every one is counted.
    handoff_failure_logged: AtomicBool,
}

impl Resumer {
    /// The resumer of a node whose bus keeps `history`, with its
    /// [`Bounds`] and `history.drain_handoff`. (Not the whole
    /// `HistoryConfig`: `config` depends on the outbox, which depends on
    /// this module's [`Mark`](super::Mark).)
    pub fn new(
        history: Arc<dyn History>,
        bounds: Bounds,
        drain_handoff: bool,
        limit: Duration,
        node_id: Arc<str>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            history,
            max_replay: bounds.max_replay,
            max_replay_bytes: match bounds.max_replay_bytes {
                0 => usize::MAX,
                bytes => bytes,
            },
            budget: Budget::new(bounds.replay_budget_bytes),
            drain_handoff,
            limit,
            node_id,
            metrics,
            handoff_failure_logged: AtomicBool::new(false),
        }
    }

    /// Whether legacy sockets store their positions on shutdown.
    pub fn drain_handoff(&self) -> bool {
        self.drain_handoff
    }

    /// Decides how a socket for `who` starts (see the module docs), and
    /// counts it. Never fails: history failing is "not recovered".
    pub async fn start(&self, who: &Identity, request: &Request) -> Outcome {
        let speaks = request.speaks_resume();
        let attempt = match request {
            // No handoff to give or take: a legacy socket needs no floors.
            // (A hub-made user id is never seen again: nothing to take,
            // and a handoff stored under it would never be taken.)
            Request::Anonymous => return self.outcome(None, Vec::new(), Floors::default(), 0),
            Request::Legacy if !self.drain_handoff => {
                return self.outcome(None, Vec::new(), Floors::default(), 0);
            }
            Request::Legacy => {
                let (taken, tops) = tokio::join!(self.take_handoff(who), self.peek(who));
                match taken {
                    Some(from) => Attempt::From(from, Some(tops)),
                    None => return self.outcome(None, Vec::new(), Floors::new(tops, false), 0),
                }
            }
            Request::Fresh => Attempt::Fresh,
            Request::Unreadable => Attempt::Not(NotRecovered::Unreadable),
            Request::Positions(positions) => match complete(positions) {
                Ok(from) => Attempt::From(from, None),
                Err(why) => Attempt::Not(why),
            },
        };
        let (why, tops) = match attempt {
            Attempt::From(from, tops) => match self.recover(who, &from).await {
                Ok((replay, reached)) => match self.share(&replay, speaks).await {
                    Ok(share) => {
                        let mut frames = Vec::with_capacity(replay.len() + 1);
                        if speaks {
                            // The positions the client sent; `pos` moves them on.
                            let given = from.map(Some);
                            let welcome =
                                welcome_frame(who, true, replay.len(), &given, &self.node_id);
                            frames.push(welcome);
                        }
                        frames.extend(replay.iter().map(|m| m.frame_for(speaks).clone()));
                        let floors = Floors::new(reached.map(Some), true);
                        let result = Some(ResumeResult::Recovered);
                        let mut outcome = self.outcome(result, frames, floors, replay.len());
                        outcome.budget = share;
                        return outcome;
                    }
                    Err(why) => (Some(why), tops),
                },
                Err(why) => (Some(why), tops),
            },
            Attempt::Fresh => (None, None),
            Attempt::Not(why) => (Some(why), None),
        };
        if let Some(why) = &why {
            debug!(user = %Untrusted(&who.user), %why, "resume not recovered");
        }
        let tops = match tops {
            Some(tops) if !speaks || tops.iter().all(Option::is_some) => tops,
            _ => self.tops(who).await,
        };
        if speaks && tops.iter().any(Option::is_none) {
            // The contract's not-recovered welcome names the current tops;
            // with history unreadable (a shard down, a slot in flux) there
            // are none to name: the socket is closed (1011) before any
            // frame, and the client reconnects with the positions it had.
            debug!(user = %Untrusted(&who.user), "history unreadable: closing the socket (1011)");
            let mut outcome = self.outcome(
                Some(ResumeResult::NotRecovered),
                Vec::new(),
                Floors::default(),
                0,
            );
            outcome.unreadable = true;
            return outcome;
        }
        let frames = if speaks {
            vec![welcome_frame(who, false, 0, &tops, &self.node_id)]
        } else {
            Vec::new()
        };
        let result = match why {
            None => ResumeResult::Fresh,
            Some(_) => ResumeResult::NotRecovered,
        };
        // A legacy socket whose handoff could not be replayed is today's
        // socket: it drops nothing.
        self.outcome(Some(result), frames, Floors::new(tops, speaks), 0)
    }

    /// The replay's share of the node's budget, when there is one and the
    /// replay is not empty.
    async fn share(
        &self,
        replay: &[Arc<Envelope>],
        speaks: bool,
    ) -> Result<Option<BudgetShare>, NotRecovered> {
        let Some(budget) = &self.budget else {
            return Ok(None);
        };
        if replay.is_empty() {
            return Ok(None);
        }
        let bytes = replay.iter().map(|m| m.frame_for(speaks).len()).sum();
        match budget.take(bytes, self.limit).await {
            Some(share) => Ok(Some(share)),
            None => Err(NotRecovered::OverBudget(bytes)),
        }
    }

    /// Counts a decision and makes its outcome.
    fn outcome(
        &self,
        result: Option<ResumeResult>,
        frames: Vec<Frame>,
        floors: Floors,
        replayed: usize,
    ) -> Outcome {
        if let Some(result) = result {
            self.metrics.resumed(result, replayed);
        }
        Outcome {
            frames,
            floors,
            report: Report { result, replayed },
            unreadable: false,
            budget: None,
        }
    }

    /// Reads every topic after `from` in one snapshot (module docs) and
    /// decides. Bounded by the call limit.
    async fn recover(
        &self,
        who: &Identity,
        from: &[Position; 3],
    ) -> Result<(Vec<Arc<Envelope>>, [Position; 3]), NotRecovered> {
        let asked: Vec<(Topic, Position)> = topics_of(who).into_iter().zip(from.clone()).collect();
        // As far as history keeps each topic (its `size_*` bound the read),
        // not `max_replay`: a topic's entries are not all the socket's (one
        // that excludes it, one it takes through another topic), and
        // `merge` counts only those it accepts against `max_replay`. (A
        // read bounded by `max_replay` once said "not recovered" for 4 to
        // replay and 3 that excluded the socket, with `max_replay` 5.)
        // Bounded by bytes instead: the client chooses how far back.
        let read =
            self.history
                .read_many(&asked, usize::MAX, self.max_replay_bytes, Some(&who.user));
        let reads = match tokio::time::timeout(self.limit, read).await {
            Ok(reads) => reads?,
            Err(_) => return Err(NotRecovered::TimedOut(self.limit)),
        };
        let reads: [Read; 3] = reads.try_into().map_err(|reads: Vec<Read>| {
            HistoryError::Unreadable(format!("{} reads for 3 topics", reads.len()))
        })?;
        decide(from, reads, who, self.max_replay)
    }

    /// The tops of `who`'s topics (making their epochs: for sockets that
    /// speak resume); `None` for each when history fails.
    /// Tried again briefly (a cluster's shard failing over, a slot being
    /// moved): [`TOPS_TRIES`] tries, [`TOPS_PAUSE`] times the try apart.
    /// All of it within the call limit.
    async fn tops(&self, who: &Identity) -> Positions {
        let topics = topics_of(who);
        let deadline = tokio::time::Instant::now() + self.limit;
        let read = || tokio::time::timeout_at(deadline, self.positions(self.history.tops(&topics)));
        let mut tops = read().await.unwrap_or_default();
        for tries in 1..TOPS_TRIES {
            let pause = TOPS_PAUSE * tries;
            if tops.iter().all(Option::is_some) || tokio::time::Instant::now() + pause >= deadline {
                break;
            }
            tokio::time::sleep(pause).await;
            tops = read().await.unwrap_or_default();
        }
        tops
    }

    /// The tops of `who`'s topics without making an epoch (unborn where
    /// there is none): a legacy socket's floors, for its drain handoff.
    /// Sockets that do not speak resume create no history keys.
    async fn peek(&self, who: &Identity) -> Positions {
        self.positions(self.history.peek(&topics_of(who))).await
    }

    /// What a tops read answered, one per topic; `None` for each when
    /// history fails.
    async fn positions(&self, read: crate::history::HistoryFuture<'_, Vec<Position>>) -> Positions {
        match tokio::time::timeout(self.limit, read).await {
            // One per topic of `topics_of`.
            Ok(Ok(tops)) if tops.len() == 3 => {
                let mut positions: Positions = Default::default();
                for (slot, top) in positions.iter_mut().zip(tops) {
                    *slot = Some(top);
                }
                positions
            }
            Ok(Ok(tops)) => {
                debug!(
                    got = tops.len(),
                    "history answered the wrong number of tops"
                );
                Default::default()
            }
            Ok(Err(e)) => {
                debug!(error = %e, "cannot read the topics' tops");
                Default::default()
            }
            Err(_) => {
                debug!(
                    limit_ms = self.limit.as_millis() as u64,
                    "the topics' tops were not read in time"
                );
                Default::default()
            }
        }
    }

    /// Takes a drain handoff for `who`; `None` when there is none, or it
    /// cannot be taken (then there is nothing to recover from).
    async fn take_handoff(&self, who: &Identity) -> Option<[Position; 3]> {
        match tokio::time::timeout(self.limit, self.history.handoff_take(who)).await {
            Ok(Ok(Some(positions))) => complete(&positions).ok(),
            Ok(Ok(None)) => None,
            Ok(Err(e)) => {
                debug!(error = %e, "cannot take a drain handoff");
                None
            }
            Err(_) => {
                debug!(
                    limit_ms = self.limit.as_millis() as u64,
                    "no drain handoff taken in time"
                );
                None
            }
        }
    }

    /// Stores a legacy socket's floors under its identity on shutdown, for
    /// the next socket with that identity (called before its close frame).
    /// Bounded by the call limit; a failure is counted and logged.
    pub async fn hand_off(&self, who: &Identity, floors: &Positions) {
        if !self.drain_handoff || floors.iter().any(Option::is_none) {
            // Without a position in every topic there is nothing to replay.
            return;
        }
        let error =
            match tokio::time::timeout(self.limit, self.history.handoff_put(who, floors)).await {
                Ok(Ok(())) => {
                    self.metrics.drain_handoff(HandoffResult::Stored);
                    return;
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no answer within {} ms", self.limit.as_millis()),
            };
        self.metrics.drain_handoff(HandoffResult::Failed);
        if !self.handoff_failure_logged.swap(true, Ordering::Relaxed) {
            warn!(%error, "drain handoff failed: the socket's next connection will not be replayed what it missed (logged once; see wshub_drain_handoffs_total)");
        } else {
            debug!(%error, "drain handoff failed");
        }
    }
}

/// How many times the tops are read for a welcome before the socket is
/// closed instead ([`Resumer::tops`]).
const TOPS_TRIES: u32 = 3;

/// The pause between two reads of the tops, times the try.
const TOPS_PAUSE: std::time::Duration = std::time::Duration::from_millis(100);

/// The positions as one per topic, or why not.
fn complete(positions: &Positions) -> Result<[Position; 3], NotRecovered> {
    match positions {
        [Some(all), Some(group), Some(user)] => Ok([all.clone(), group.clone(), user.clone()]),
        [None, ..] => Err(NotRecovered::Missing("everyone")),
        [_, None, _] => Err(NotRecovered::Missing("the group")),
        [.., None] => Err(NotRecovered::Missing("the user")),
    }
}

/// What a socket's request leads to, before history is read.
enum Attempt {
    /// Recover from these positions (with the tops, when already read).
    From([Position; 3], Option<Positions>),
    /// `resume=`: nothing to recover.
    Fresh,
    /// Not recovered before anything is read.
    Not(NotRecovered),
}

#[cfg(test)]
mod budget_tests {
    use super::*;

    const LIMIT: Duration = Duration::from_secs(2);

    fn waiting(budget: &Budget) -> usize {
        budget.room.state().waiting.len()
    }

    fn free(budget: &Budget) -> u32 {
        budget.room.state().free
    }

    /// What is given back goes to the waiting replays it fits, in the
    /// order they came, and only to them.
    #[tokio::test(start_paused = true)]
    async fn room_given_back_goes_to_the_waiting_replays_it_fits() {
        let budget = Arc::new(Budget::new(10 * 1024).unwrap());
        let all = budget.take(10 * 1024, LIMIT).await.unwrap();
        let wait = |kib: usize| {
            let budget = budget.clone();
            tokio::spawn(async move { budget.take(kib * 1024, LIMIT).await })
        };
        let (big, small, second) = (wait(8), wait(2), wait(2));
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(waiting(&budget), 3);
        // 10 KiB back: the big one first (it came first and fits), then
        // the first small one; the second does not fit what is left.
        drop(all);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(big.is_finished() && small.is_finished());
        assert!(!second.is_finished());
        assert_eq!(free(&budget), 0);
        let big = big.await.unwrap().unwrap();
        drop(small.await.unwrap().unwrap());
        let second = second.await.unwrap().unwrap();
        assert_eq!(second.kib, 2);
        assert_eq!(free(&budget), 0);
        drop((big, second));
        assert_eq!(free(&budget), 10);
    }

    /// A replay that stopped waiting (timed out) takes nothing and leaves
    /// nothing behind: its place is swept, and all the room comes back.
    #[tokio::test(start_paused = true)]
    async fn a_replay_that_stops_waiting_leaks_nothing() {
        let budget = Budget::new(4 * 1024).unwrap();
        let held = budget.take(4 * 1024, LIMIT).await.unwrap();
        for _ in 0..200 {
            assert!(budget.take(1024, Duration::from_millis(1)).await.is_none());
        }
        assert!(waiting(&budget) <= 128, "swept: {}", waiting(&budget));
        drop(held);
        assert_eq!(waiting(&budget), 0);
        assert_eq!(free(&budget), 4);
        let again = budget.take(4 * 1024, LIMIT).await.unwrap();
        assert_eq!(again.kib, 4);
    }
}
