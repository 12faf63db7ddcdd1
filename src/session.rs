//! One socket's session: read client messages, write queued frames, ping,
//! and close with exactly one [`CloseReason`].
//!
//! A session is one task. It waits on four things at once: the close signal
//! (set by anyone through the connection's [`Closer`](crate::conn::Closer)),
//! the client's next frame, the outbound queue (and bytes owed to the
//! socket), and the ping timer. Queued frames are written in batches, one
//! vectored write per batch, so a busy socket costs one write system call
//! for many frames. A delivery to an idle socket does not wait for the
//! session: the delivering task writes it ([`crate::wire`]), and leaves
//! the session only what the socket did not take.
//!
//! **Every write races the close signal and `ws.write_timeout_ms`.** A peer
//! that does not read blocks a write for as long as it likes; a session
//! waiting in that write would see no close reason (the slow-consumer
//! close, the drain's 1001) and pin the socket's buffers until the grace
//! period ran out. (It happened: the ping write once awaited without the
//! race, and a client that flooded pings and never read held its socket
//! through a drain.) A write that runs out of time closes the socket as a
//! slow consumer.
//!
//! **What a client receives before the close is a prefix** of what was
//! queued for it: a frame leaves the queue only under the socket's lock,
//! in the call that writes it, and what the socket did not take of it is
//! owed and written first by the closing handshake, before the rest of the
//! queue. (Dropping a frame being written, as an earlier version did, left
//! a gap mid-stream: later frames were still sent.)
//!
//! **With history on, a session starts with its resume decision**
//! ([`crate::resume`]): the welcome and the replay are written before
//! anything queued, while the outbox holds the live copies that arrive
//! meanwhile; every queued copy then passes the session's [`Floors`], which
//! drop the ones the replay already wrote. The backend hears of the
//! connect once the decision is made. On a drain (1001), a socket that
//! does not speak resume stores its floors as a drain handoff *before* its
//! close frame is sent, so the page's next socket, wherever it lands, is
//! replayed what it missed.

use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::time::{Interval, MissedTickBehavior, interval_at};
use tokio_tungstenite::WebSocketStream;
use tokio_util::task::task_tracker::TaskTrackerToken;
use tracing::debug;
use tungstenite::Message as WsMessage;
use tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};

use crate::conn::{Closer, Conn, OutboxReceiver, SlowCause};
use crate::history::Positions;
use crate::logging::{Untrusted, UntrustedOpt};
use crate::message::{Frame, MessageError, error_frame};
use crate::node::{ClientError, Node, PublishError, Registration};
use crate::outbox::Queued;
use crate::outcome::CloseReason;
use crate::outcome::DropReason;
use crate::rate_limit::{RateLimit, Verdict};
use crate::resume::Resumer;
use crate::route::Identity;
use crate::wire::{Io, MAX_BATCH, WireIo};

/// The socket as the session reads it: tungstenite over the connection's
/// [`Wire`](crate::wire::Wire), which frames are written through.
pub(crate) type Socket = WebSocketStream<WireIo<Arc<Conn>>>;

/// The reason tungstenite puts in place of a client's close frame whose
/// code the protocol does not allow (its code then reads 1002).
const TUNGSTENITE_REFUSED_CLOSE: &str = "Protocol violation";

/// Most batch writes in a row before the client's side is read again
/// (see [`Session::serve`]): a queue that never empties cannot starve the
/// reads (the client's pongs and messages).
const WRITES_BEFORE_READ: u8 = 4;
/// How long the closing handshake may take before the socket is dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Runs a session until the socket closes; `tracked` (the node's count of
/// running sessions) is released once it has.
///
/// This future is what every socket's task holds for the socket's whole
/// life, idle or not, so it is kept small (issue 19): the session is
/// built before it starts (the future holds the [`Session`] only, not
/// also the socket and registration it was built from), and the awaits
/// that run rarely (the resume decision and the closing handshake, which
/// await Redis calls, and the ping) or briefly (a batch write) are boxed
/// while they run instead of being laid out in it. The caller passes it
/// to the upgrade as its callback as it is, not wrapped in a future of
/// its own: a wrapper would hold the socket and the registration as well
/// (a future keeps room for what it captured for its whole life).
///
/// `io`, the upgraded connection, goes into the connection's
/// [`Wire`](crate::wire::Wire); the session reads it through tungstenite
/// (configured by `config`), and writes frames through the wire.
pub(crate) fn run(
    io: Io,
    config: WebSocketConfig,
    mut registration: Registration,
    tracked: TaskTrackerToken,
) -> impl Future<Output = ()> + Send + 'static {
    let conn = registration.conn.clone();
    conn.wire().install(io, config.write_buffer_size);
    // Without a handshake, the stream is made in its first poll.
    let socket = WebSocketStream::from_raw_socket(WireIo::new(conn), Role::Server, Some(config))
        .now_or_never();
    let mut session = match (socket, registration.take_outbound()) {
        (Some(socket), Some(outbound)) => Some(Session::new(socket, registration, outbound)),
        _ => None,
    };
    async move {
        // Used in place, not moved into a local: the future then holds
        // one `Session`, not two.
        let Some(live) = session.as_mut() else {
            drop(tracked);
            return;
        };
        let reason = live.serve().await;
        // Boxed in a closure: a `Session` bound to a local here would be
        // held in this future next to the captured one (it was: the future
        // held two).
        if let Some(finish) = session.take().map(|s| Box::pin(s.finish(reason))) {
            finish.await;
        }
        drop(tracked);
    }
}

/// One socket's state while its session runs.
///
/// It lives as long as the socket, so it holds nothing twice (the
/// connection and the node are the registration's) and nothing that only
/// history needs unless history is on ([`Replay`]).
struct Session {
    registration: Registration,
    /// The socket's read side (and tungstenite's writes: pings, pongs,
    /// the close frame); frames are written through the connection's
    /// [`Wire`](crate::wire::Wire).
    socket: Socket,
    outbound: OutboxReceiver,
    /// Batch writes in a row that the read side was not polled before
    /// (see [`Session::serve`]).
    writes_unread: u8,
    ping: Interval,
    /// Whether the peer sent anything since the last ping.
    heard: bool,
    /// Made at the client's first frame, so that an idle socket does not
    /// carry it: a bucket starts full and never holds more, so one made
    /// then says what one made at the connect would.
    rate: Option<Box<RateLimit>>,
    /// The client sent a close frame (its echo is owed).
    client_closed: bool,
    /// With history on: the replay. `None` with history off, where
    /// nothing is replayed. (The floors that drop the copies a replay
    /// wrote are the wire's: every writer checks them.)
    replay: Option<Box<Replay>>,
}

/// A session's state for resume (history on only), boxed so that a
/// session without history does not carry it (issue 19).
#[derive(Default)]
struct Replay {
    /// Written before anything queued: the welcome and the replay (what
    /// is left of them when a close interrupts the writing).
    backlog: std::collections::VecDeque<Frame>,
    /// The backlog's share of `history.replay_budget_bytes`, given back
    /// once it is written (or with the session).
    budget: Option<crate::resume::BudgetShare>,
}

impl Session {
    fn new(socket: Socket, registration: Registration, outbound: OutboxReceiver) -> Self {
        let conn = &registration.conn;
        let node = registration.node();
        debug!(
            conn = %conn.cid,
            user = %Untrusted(&conn.who.user),
            group = %UntrustedOpt(conn.who.group.as_deref()),
            "connection opened"
        );
        let ping_every = node.config.ws.ping_interval;
        let mut ping = interval_at(tokio::time::Instant::now() + ping_every, ping_every);
        ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let replay = node.resumer().map(|_| Box::default());
        Self {
            registration,
            socket,
            outbound,
            writes_unread: 0,
            ping,
            heard: true,
            rate: None,
            client_closed: false,
            replay,
        }
    }

    fn conn(&self) -> &Arc<Conn> {
        &self.registration.conn
    }

    fn node(&self) -> &Arc<Node> {
        self.registration.node()
    }

    /// How long one write may take (`ws.write_timeout_ms`).
    fn write_timeout(&self) -> Duration {
        self.node().config.ws.write_timeout
    }

    /// Serves the socket until a close reason: the resume decision (history
    /// on), then frames in, queued frames out and pings.
    async fn serve(&mut self) -> CloseReason {
        if self.node().resumer().is_some()
            && let Err(reason) = Box::pin(self.begin()).await
        {
            return reason;
        }
        // Deliveries may write to the socket themselves from now on (with
        // history, they check every copy against the wire's floors, as
        // the session does).
        self.outbound.wire().set_direct(true);
        loop {
            // Each arm is one call; the futures borrow disjoint fields and
            // are dropped before the chosen arm's call runs.
            //
            // The queue is looked at before the socket's read side (issue
            // 19): a wake-up for a delivery then polls the read side once,
            // when the session waits again after the write, not also
            // before it (polling it goes through tungstenite, the socket's
            // readiness lock and two wakers: about a tenth of a node's CPU
            // in a fanout profile, when it was polled twice). So that a
            // queue that never empties cannot starve the reads, the read
            // side comes first again after WRITES_BEFORE_READ writes in a
            // row that it was not polled before.
            let write_first = self.writes_unread < WRITES_BEFORE_READ;
            let mut read_polled = false;
            let step = tokio::select! {
                biased;
                reason = self.registration.conn.closer.closed() => Err(reason),
                // Boxed too: a write (its batch, flush and timer) is about
                // a kilobyte of future, one allocation per wake-up that
                // already makes a system call or more.
                () = std::future::poll_fn(|cx| self.outbound.poll_work(cx)), if write_first => {
                    // The read side was polled if this select waited.
                    self.writes_unread = if read_polled { 0 } else { self.writes_unread + 1 };
                    Box::pin(self.write()).await
                }
                frame = std::future::poll_fn(|cx| {
                    read_polled = true;
                    self.socket.poll_next_unpin(cx)
                }) => {
                    self.writes_unread = 0;
                    self.on_frame(frame)
                }
                () = std::future::poll_fn(|cx| self.outbound.poll_work(cx)), if !write_first => {
                    self.writes_unread = 0;
                    Box::pin(self.write()).await
                }
                _ = self.ping.tick() => {
                    self.writes_unread = 0;
                    Box::pin(self.on_ping()).await
                }
            };
            if let Err(reason) = step {
                return reason;
            }
        }
    }

    /// With history on: decides the resume, tells the backend, and writes
    /// the welcome and the replay before anything queued.
    ///
    /// The decision is not raced with the close signal (each History call
    /// is bounded, `redis.command_timeout_ms`): a drain that arrives
    /// meanwhile then closes a socket whose floors are known, so the close
    /// writes the rest of the replay and a legacy socket hands over where
    /// it really is. (Raced, a legacy socket drained while it took over a
    /// handoff lost it: taken from Redis, never handed on.)
    async fn begin(&mut self) -> Result<(), CloseReason> {
        let Some(resumer) = self.node().resumer().cloned() else {
            return Ok(());
        };
        let request = self.registration.take_resume();
        let outcome = resumer.start(&self.conn().who, &request).await;
        self.registration.announce(&outcome.report);
        if outcome.unreadable {
            return Err(CloseReason::InternalError);
        }
        // The floors first: the backlog has no marks, and the copies
        // queued meanwhile are checked against them when they are taken.
        self.outbound.wire().set_floors(outcome.floors);
        let replay = self.replay.get_or_insert_default();
        replay.backlog = outcome.frames.into();
        replay.budget = outcome.budget;
        let limit = self.write_timeout();
        let wire = self.outbound.wire();
        if let Some(replay) = self.replay.as_mut() {
            let backlog = &mut replay.backlog;
            let mut next = || backlog.pop_front();
            let write = std::future::poll_fn(|cx| wire.poll_frames(cx, &mut next));
            guarded(&self.registration.conn.closer, limit, write).await?;
            // Written (taken by the socket, or owed to it: what is owed is
            // no longer the replay's).
            replay.budget = None;
            replay.backlog = std::collections::VecDeque::new();
        }
        Ok(())
    }

    /// Handles the client's next frame (or the end of its stream).
    fn on_frame(
        &mut self,
        frame: Option<Result<WsMessage, tungstenite::Error>>,
    ) -> Result<(), CloseReason> {
        self.heard = true;
        let data = matches!(frame, Some(Ok(WsMessage::Text(_) | WsMessage::Binary(_))));
        // Control frames count too: tungstenite owes a pong for every ping
        // and buffers it even when the peer does not read, so an unlimited
        // ping flood grows memory.
        let control = matches!(frame, Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))));
        let limits = &self.registration.node().config.limits;
        let rate = self
            .rate
            .get_or_insert_with(|| Box::new(RateLimit::new(limits)));
        if data || control {
            match rate.check(tokio::time::Instant::now()) {
                Verdict::Allowed => {}
                // A control frame carries no message to refuse or reply to:
                // it only adds a violation.
                Verdict::Limited if control => return Ok(()),
                Verdict::Limited => {
                    rate_limited(&self.registration);
                    return Ok(());
                }
                Verdict::Abusive => {
                    if data {
                        let metrics = &self.registration.node().metrics;
                        metrics.received();
                        metrics.dropped(DropReason::RateLimited, 1);
                    }
                    return Err(CloseReason::PolicyViolation);
                }
            }
        }
        match frame {
            Some(Ok(WsMessage::Text(text))) => on_text(&self.registration, rate, &text)?,
            Some(Ok(WsMessage::Binary(bytes))) => match std::str::from_utf8(&bytes) {
                Ok(text) => on_text(&self.registration, rate, text)?,
                Err(_) => binary_not_utf8(&self.registration),
            },
            // tungstenite answers pings itself.
            Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_) | WsMessage::Frame(_))) => {}
            Some(Ok(WsMessage::Close(frame))) => {
                self.client_closed = true;
                return Err(answer_to_close(frame.as_ref()));
            }
            Some(Err(e)) => return Err(read_failed(&self.registration, e)),
            None => return Err(CloseReason::ConnectionLost),
        }
        Ok(())
    }

    /// Writes what is owed to the socket and up to [`MAX_BATCH`] queued
    /// frames (those the floors admit), racing the close reason.
    async fn write(&mut self) -> Result<(), CloseReason> {
        let limit = self.write_timeout();
        let outbound = &self.outbound;
        let mut taken = 0;
        let mut next = || {
            if taken == MAX_BATCH {
                return None;
            }
            taken += 1;
            outbound.try_recv()
        };
        let write = std::future::poll_fn(|cx| outbound.wire().poll_frames(cx, &mut next));
        guarded(&self.registration.conn.closer, limit, write).await
    }

    /// Pings the peer, or closes it when it was silent since the last ping.
    async fn on_ping(&mut self) -> Result<(), CloseReason> {
        if !self.heard {
            return Err(CloseReason::PingTimeout);
        }
        self.heard = false;
        let limit = self.write_timeout();
        let write = self.socket.send(WsMessage::Ping(Default::default()));
        guarded(&self.registration.conn.closer, limit, write).await
    }

    /// Records `reason` (unless someone else's came first), leaves the node,
    /// and runs the closing handshake.
    async fn finish(self, reason: CloseReason) {
        let conn = self.registration.conn.clone();
        let node = self.registration.node().clone();
        if conn.closer.reason().is_none() && reason == CloseReason::SlowConsumer {
            conn.log_slow_consumer(SlowCause::WriteTimedOut);
        }
        // Record the reason (a no-op if someone else set it first), then
        // leave the hub before the closing handshake so nothing more is
        // queued.
        conn.closer.close(reason);
        // No delivery writes to the socket after this: what is still owed
        // goes before the close frame, and nothing after it.
        self.outbound.wire().set_direct(false);
        let reason = conn.closer.reason().unwrap_or(reason);
        // A drain hands a legacy socket's place over (resume speakers
        // resume from their own positions).
        let handoff = match node.resumer() {
            Some(resumer)
                if reason == CloseReason::GoingAway
                    && resumer.drain_handoff()
                    && !conn.speaks_resume =>
            {
                Some(Handoff {
                    resumer: resumer.clone(),
                    who: conn.who.clone(),
                })
            }
            _ => None,
        };
        // A drain: the client did nothing wrong and goes on sending until
        // it reads the 1001, which comes after what it is owed and, for a
        // legacy socket with history, after its handoff is stored (up to
        // `redis.command_timeout_ms` when Redis is slow). What it sends
        // meanwhile is published, not dropped (review of 2026-12-03: up to
        // two seconds of a page's messages were lost on every drain with
        // Redis slow, a few milliseconds' with it healthy). The socket
        // leaves the hub now all the same, so nothing more is queued to it.
        let inbound = if reason == CloseReason::GoingAway && !self.client_closed {
            self.registration.leave_hub();
            let limits = &self.registration.node().config.limits;
            let rate = self
                .rate
                .unwrap_or_else(|| Box::new(RateLimit::new(limits)));
            Some(Inbound {
                registration: self.registration,
                rate,
            })
        } else {
            drop(self.registration);
            None
        };
        let pending = Pending {
            outbound: self.outbound,
            replay: self.replay,
        };
        let text = conn.closer.text().unwrap_or(reason.reason()).to_owned();
        close(
            self.socket,
            pending,
            (reason, text),
            self.client_closed,
            handoff,
            inbound,
        )
        .await;
        // The socket closes now, not when the last handle on the
        // connection goes.
        conn.wire().release();
    }
}

/// Runs one write unless the session is closed first or the write takes
/// longer than `limit`. A write that fails means the connection is gone; one
/// that runs out of time means the peer does not read: a slow consumer.
///
/// The close reason is read (one atomic load) before each poll of the
/// write; the closer's waker and the timer are only registered once the
/// write waits. Most writes finish in their first poll (the socket takes
/// the batch), and then neither is touched (issue 19: arming a timer cost
/// a clock read and the runtime handle's shared reference count per
/// wake-up). The time limit counts from that first wait.
async fn guarded<E>(
    closer: &Closer,
    limit: Duration,
    write: impl Future<Output = Result<(), E>>,
) -> Result<(), CloseReason> {
    let mut write = std::pin::pin!(write);
    let mut closed = std::pin::pin!(closer.closed());
    let mut timer: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
    std::future::poll_fn(|cx| {
        if let Some(reason) = closer.reason() {
            return Poll::Ready(Err(reason));
        }
        if let Poll::Ready(result) = write.as_mut().poll(cx) {
            return Poll::Ready(result.map_err(|_| CloseReason::ConnectionLost));
        }
        if let Poll::Ready(reason) = closed.as_mut().poll(cx) {
            return Poll::Ready(Err(reason));
        }
        let timer = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(CloseReason::SlowConsumer)),
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

/// Publishes or forwards a client's message; a refusal is told to the
/// sender, and persistent abuse of the fan-out byte rate closes it (1008,
/// after the reply).
fn on_text(
    registration: &Registration,
    rate: &mut RateLimit,
    text: &str,
) -> Result<(), CloseReason> {
    let node = registration.node();
    node.metrics.received();
    match node.client_text(&registration.conn, text, rate) {
        Ok(()) => Ok(()),
        Err(e) => {
            reply_error(registration, &e);
            match e {
                ClientError::FanOutRate { close: true, .. } => Err(CloseReason::PolicyViolation),
                _ => Ok(()),
            }
        }
    }
}

/// How a client's close frame is answered. tungstenite hands a close code
/// it does not allow (999, 1005, …) over as 1002 "Protocol violation":
/// answered as a protocol error. Any other close, a client's own 1002
/// included, is a normal one.
fn answer_to_close(frame: Option<&CloseFrame>) -> CloseReason {
    let refused = frame.is_some_and(|f| {
        f.code == tungstenite::protocol::frame::coding::CloseCode::Protocol
            && f.reason.as_str() == TUNGSTENITE_REFUSED_CLOSE
    });
    if refused {
        CloseReason::ProtocolError
    } else {
        CloseReason::Normal
    }
}

/// Refuses a binary frame that is not UTF-8 text, and says so. Refused
/// before it is a message: this is its one count.
fn binary_not_utf8(registration: &Registration) {
    let metrics = &registration.node().metrics;
    metrics.dropped(DropReason::Invalid, 1);
    reply_error(registration, &PublishError::from(MessageError::NotUtf8));
}

/// Tells the sender why its message went nowhere. Goes through the normal
/// outbound queue, so a client that floods bad messages and never reads is
/// closed as a slow consumer like any other.
fn reply_error(registration: &Registration, error: &dyn std::fmt::Display) {
    registration.conn.offer(error_frame(&error.to_string()));
}

/// Refuses a message over the sender's rate, and says so.
fn rate_limited(registration: &Registration) {
    let node = registration.node();
    node.metrics.received();
    node.metrics.dropped(DropReason::RateLimited, 1);
    let limits = &node.config.limits;
    registration.conn.offer(error_frame(&format!(
        "rate limit: at most {} messages per second (bursts of {}); message not sent",
        limits.messages_per_second, limits.message_burst
    )));
}

/// Why reading failed, as the close reason; a message over the limit
/// (1009) is counted as received and dropped `too_big`, as one the
/// broadcast endpoint refuses is (review of 2026-12-03: it was counted
/// nowhere).
fn read_failed(registration: &Registration, error: tungstenite::Error) -> CloseReason {
    let reason = read_error_reason(error);
    if reason == CloseReason::MessageTooBig {
        let metrics = &registration.node().metrics;
        metrics.received();
        metrics.dropped(DropReason::TooBig, 1);
    }
    reason
}

fn read_error_reason(error: tungstenite::Error) -> CloseReason {
    use tungstenite::error::{CapacityError, Error, ProtocolError};
    match error {
        Error::Capacity(CapacityError::MessageTooLong { .. }) => CloseReason::MessageTooBig,
        // Too many frames is too big too (`crate::fragments`).
        Error::Io(e) if crate::fragments::is_too_many(&e) => CloseReason::MessageTooBig,
        // The peer ended the TCP connection without a close frame: a
        // dropped connection (1006), not a malformed frame.
        Error::Protocol(ProtocolError::ResetWithoutClosingHandshake) => CloseReason::ConnectionLost,
        Error::Protocol(_) | Error::Utf8(_) => CloseReason::ProtocolError,
        _ => CloseReason::ConnectionLost,
    }
}

/// What a closing session still owes its client, in the order owed.
struct Pending {
    outbound: OutboxReceiver,
    /// The rest of the replay comes before what is queued.
    replay: Option<Box<Replay>>,
}

impl Pending {
    /// The rest of the replay, then the queue (whose copies the wire
    /// checks against the floors).
    fn next(&mut self) -> Option<Queued> {
        let backlog = self.replay.as_mut().and_then(|r| r.backlog.pop_front());
        match backlog {
            Some(frame) => Some(Queued { frame, mark: None }),
            None => self.outbound.try_recv(),
        }
    }

    /// The floors, per topic (none known without history).
    fn positions(&self) -> Positions {
        self.outbound
            .wire()
            .floors()
            .map(|f| f.positions().clone())
            .unwrap_or_default()
    }
}

/// A drained socket's inbound side while its close runs: what the client
/// sends until its close reply is published as usual (its rate limit
/// still applies; a refusal's reply is queued, and written if the close
/// still writes what is owed). Dropped after the close, with the
/// registration: the backend and presence then hear of the disconnect.
struct Inbound {
    registration: Registration,
    rate: Box<RateLimit>,
}

/// What a frame read while closing means for the closing handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Heard {
    /// A message (handled) or a control frame: the client goes on.
    More,
    /// The client closed: its close frame (answered 1000, or 1002 for a
    /// code the protocol does not allow), or a frame the protocol does not
    /// allow (answered 1002; one too big, 1009), as the session answers
    /// them outside a drain.
    Closed(CloseReason),
    /// The stream failed or ended: nothing more can be read or written.
    Ended,
}

impl Inbound {
    fn on_frame(&mut self, frame: Option<Result<WsMessage, tungstenite::Error>>) -> Heard {
        let text = match frame {
            Some(Ok(WsMessage::Text(text))) => text,
            Some(Ok(WsMessage::Binary(bytes))) => match tungstenite::Utf8Bytes::try_from(bytes) {
                Ok(text) => text,
                Err(_) => {
                    binary_not_utf8(&self.registration);
                    return Heard::More;
                }
            },
            // As `Session::on_frame` answers it (review of 2026-12-03: a
            // refused code was answered 1000 during a drain).
            Some(Ok(WsMessage::Close(frame))) => {
                return Heard::Closed(answer_to_close(frame.as_ref()));
            }
            Some(Ok(_)) => return Heard::More,
            Some(Err(e)) => {
                return match read_failed(&self.registration, e) {
                    CloseReason::ConnectionLost => Heard::Ended,
                    // A close frame whose reason is not UTF-8, say: 1002,
                    // not a connection dropped without a frame.
                    reason => Heard::Closed(reason),
                };
            }
            None => return Heard::Ended,
        };
        match self.rate.check(tokio::time::Instant::now()) {
            Verdict::Allowed => {
                // Closing already: a policy close it would call for has
                // nothing left to close.
                let _ = on_text(&self.registration, &mut self.rate, &text);
            }
            Verdict::Limited => rate_limited(&self.registration),
            Verdict::Abusive => {
                let metrics = &self.registration.node().metrics;
                metrics.received();
                metrics.dropped(DropReason::RateLimited, 1);
            }
        }
        Heard::More
    }
}

/// Runs `work` while reading what the client sends, when there is an
/// `inbound` to hand it to and the client's side is still open
/// (`heard == More`); `heard` then says how the reading ended.
async fn reading<F: std::future::Future>(
    socket: &mut Socket,
    inbound: &mut Option<Inbound>,
    heard: &mut Heard,
    work: F,
) -> F::Output {
    let mut work = std::pin::pin!(work);
    loop {
        let Some(inbound) = inbound.as_mut().filter(|_| *heard == Heard::More) else {
            return work.await;
        };
        tokio::select! {
            biased;
            out = &mut work => return out,
            frame = socket.next() => *heard = inbound.on_frame(frame),
        }
    }
}

/// A legacy socket's drain handoff, stored before its close frame.
struct Handoff {
    resumer: Arc<Resumer>,
    who: Identity,
}

/// The closing handshake, bounded by [`CLOSE_TIMEOUT`] (plus the time a
/// drain handoff may take). Frames still owed to the client (the one in
/// flight, the rest of a replay, error replies, messages that arrived
/// before the close) are written first and in order, except for a slow
/// consumer, whose queue is the problem. If the time runs out, the client
/// has received a prefix of its frames and the connection ends.
///
/// A drain handoff is stored after those frames (so its floors count
/// them) and before the close frame: a page that reconnects on the close
/// frame finds it in place. It is bounded by History's own limit, not the
/// handshake's time: a client slow to read must not cost its next socket
/// the replay.
///
/// With `inbound` (a drain), what the client sends until its close reply
/// is published meanwhile ([`Inbound`]).
async fn close(
    mut socket: Socket,
    mut pending: Pending,
    (reason, text): (CloseReason, String),
    mut client_closed: bool,
    handoff: Option<Handoff>,
    mut inbound: Option<Inbound>,
) {
    if reason == CloseReason::ConnectionLost {
        return;
    }
    let deadline = tokio::time::Instant::now() + CLOSE_TIMEOUT;
    let conn = socket.get_ref().conn.clone();
    let owed = async {
        if reason != CloseReason::SlowConsumer && !client_closed {
            let mut next = || pending.next();
            std::future::poll_fn(|cx| conn.wire().poll_frames(cx, &mut next)).await?;
        }
        Ok::<(), std::io::Error>(())
    };
    let mut heard = Heard::More;
    let owed = tokio::time::timeout_at(deadline, owed);
    let written = matches!(
        reading(&mut socket, &mut inbound, &mut heard, owed).await,
        Ok(Ok(()))
    );
    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    if let Some(Handoff { resumer, who }) = &handoff {
        let positions = pending.positions();
        let store = resumer.hand_off(who, &positions);
        reading(&mut socket, &mut inbound, &mut heard, store).await;
    }
    if !written || heard == Heard::Ended {
        // The connection failed or the time ran out.
        return;
    }
    // The client closed while it was owed frames (a drain): answered as
    // any client's close, with 1000 `Socket closed`, or 1002 for a close
    // the protocol does not allow (review of 2026-12-03: answered with the
    // drain's 1001, then every close with 1000).
    let (code, text) = if let Heard::Closed(answer) = heard {
        client_closed = true;
        (answer.code(), answer.reason().to_owned())
    } else {
        (reason.code(), text)
    };
    let frame = CloseFrame {
        code: code.into(),
        reason: text.into(),
    };
    let handshake = async {
        if client_closed {
            // The client's close is answered with the hub's own close
            // frame: 1000 `Socket closed` (Web Connection's answer,
            // README's close codes), or 1002 `Protocol error`. tungstenite
            // queued an echo of the client's frame instead; it is never
            // sent: these bytes go to the connection under it, and the
            // socket is dropped after them.
            let mut bytes = Vec::new();
            if tungstenite::protocol::frame::Frame::close(Some(frame))
                .format(&mut bytes)
                .is_ok()
            {
                use tokio::io::AsyncWriteExt;
                let io = socket.get_mut();
                if io.write_all(&bytes).await.is_ok() {
                    let _ = io.flush().await;
                }
            }
        } else {
            if socket.send(WsMessage::Close(Some(frame))).await.is_err() {
                return;
            }
            if matches!(
                reason,
                CloseReason::MessageTooBig | CloseReason::ProtocolError
            ) {
                // What the client sends next (the rest of a message too
                // big, refused from its header) cannot be read as frames.
                // It is read and discarded until the client closes: closed
                // with it unread, the connection is reset, and a browser
                // drops the close frame with it (1006 for 1009; reviewer).
                // The hub's side is shut first (FIN after the close frame,
                // as RFC 6455 has the server close first): the client
                // then closes at once rather than waiting for the hub,
                // which cannot read its close reply among the discarded
                // bytes (each such close took the whole close timeout).
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let io = socket.get_mut();
                let _ = io.shutdown().await;
                let mut scratch = vec![0u8; 16 * 1024];
                loop {
                    match io.read(&mut scratch).await {
                        Ok(0) => break,
                        Ok(_) => {}
                        // Counting frames is moot now (and says so once).
                        Err(e) if crate::fragments::is_too_many(&e) => {}
                        Err(_) => break,
                    }
                }
                return;
            }
            // Wait for the client's close reply (or the end of the stream);
            // on a drain, what it sent before it is published.
            while let Some(Ok(msg)) = socket.next().await {
                if matches!(msg, WsMessage::Close(_)) {
                    break;
                }
                if let Some(inbound) = &mut inbound {
                    inbound.on_frame(Some(Ok(msg)));
                }
            }
        }
    };
    let _ = tokio::time::timeout(left, handshake).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::Deliver;
    use crate::envelope::Envelope;
    use crate::history::{Position, Stamp};
    use crate::hub::Hub;
    use crate::metrics::Metrics;
    use crate::resume::Floors;
    use crate::route::{Route, Topic};

    /// The size of the future `f` returns, without calling it.
    fn size_of_output<A, B, C, D, F>(_: impl FnOnce(A, B, C, D) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// A session's task holds its future for as long as the socket is
    /// open, idle or not: the resume decision's and the closing
    /// handshake's futures (Redis calls) are boxed when they run, not
    /// part of it (issue 19: they made up most of an idle socket's task),
    /// and the session holds nothing twice and no history state without
    /// history.
    #[test]
    fn an_idle_session_task_is_small() {
        // Debug build: 3,208 bytes at first, 1,072 with the boxed awaits,
        // 536 with the session slimmed (the `Session` from 528 to 232),
        // 784 (the `Session` 536) with the socket (368 bytes) held in the
        // session, not split: the split kept it in a 400-byte `BiLock`
        // allocation of its own instead, so the socket costs less in all.
        let size = size_of_output(run);
        assert!(size <= 832, "the session future is {size} bytes");
        let session = std::mem::size_of::<Session>();
        assert!(session <= 576, "the session is {session} bytes");
    }

    fn pos(text: &str) -> Position {
        Position::parse(text).unwrap()
    }

    fn stamped(name: &str, seq: u64, route: Route, positions: &[&str]) -> Arc<Envelope> {
        let frame = Frame::from(format!(r#"{{"action":"say","message":"{name}"}}"#));
        let positions = route
            .topics()
            .iter()
            .cloned()
            .zip(positions.iter().map(|p| pos(p)))
            .collect();
        let stamp = Stamp { seq, positions };
        Arc::new(Envelope::stamped(route, frame, Some(stamp)))
    }

    /// What the wire writes of `rx`'s queue: the copies `floors` admit
    /// (the check every writer makes, `wire::State::admits`).
    fn drain(rx: &mut OutboxReceiver, floors: &mut Floors) -> Vec<serde_json::Value> {
        std::iter::from_fn(|| rx.try_recv())
            .filter(|queued| floors.admit(queued.mark.as_ref()))
            .map(|queued| serde_json::from_str(queued.frame.as_str()).unwrap())
            .collect()
    }

    /// A gap notice is marked with the last position lost: a socket whose
    /// replay already wrote that far (it resumed while history still held
    /// the messages this node's subscriber missed) is not told, one short
    /// of it is, and its floor rises to it; a gap of unknown extent (the
    /// history started afresh) tells every socket that speaks resume.
    #[test]
    fn a_gap_notice_skips_sockets_whose_replay_covered_it() {
        let hub = Hub::new(Arc::new(Metrics::new()));
        let who = |user: &str| Identity {
            user: user.into(),
            group: Some("chat".into()),
        };
        let (covered, mut covered_rx) = Conn::new(1, who("ann"), true, 1 << 20);
        let (short, mut short_rx) = Conn::new(2, who("bob"), true, 1 << 20);
        hub.insert(covered);
        hub.insert(short);
        let chat = Topic::Group(Some("chat".into()));
        hub.gap(&chat, Some(&pos("g:7")));
        hub.gap(&chat, None);
        let notice = serde_json::json!(r#"{"topics":["group:chat"]}"#);
        let mut floors = Floors::new([None, Some(pos("g:7")), None], true);
        let written = drain(&mut covered_rx, &mut floors);
        assert_eq!(
            written.len(),
            1,
            "only the gap of unknown extent: {written:?}"
        );
        assert_eq!(written[0]["message"], notice);
        let mut floors = Floors::new([None, Some(pos("g:6")), None], true);
        let written = drain(&mut short_rx, &mut floors);
        assert_eq!(written.len(), 2, "both gaps: {written:?}");
        assert!(written.iter().all(|v| v["action"] == "wshub.gap"));
        assert_eq!(floors.positions()[1], Some(pos("g:7")));
    }

    /// The session's half of exactly-once on resume: the live copies the
    /// hub queued while the replay was decided carry their marks, and the
    /// ones the replay reached are dropped; the others are written, with
    /// `pos` for the socket that speaks resume only.
    #[test]
    fn live_copies_the_replay_wrote_are_dropped_by_their_mark() {
        let hub = Hub::new(Arc::new(Metrics::new()));
        let ann = Identity {
            user: "ann".into(),
            group: Some("chat".into()),
        };
        let (resumer, mut rx) = Conn::new(1, ann.clone(), true, 1 << 20);
        let (legacy, mut legacy_rx) = Conn::new(2, ann.clone(), false, 1 << 20);
        hub.insert(resumer);
        hub.insert(legacy);
        let chat = Topic::Group(Some("chat".into()));
        let user = Topic::User("ann".into());
        let both = Route::from_parts(vec![chat.clone(), user.clone()], Vec::new());
        let live = [
            (Topic::All, stamped("a1", 1, Route::everyone(), &["a:1"])),
            (
                chat.clone(),
                stamped("g5", 2, both.clone(), &["g:5", "u:7"]),
            ),
            (
                user.clone(),
                stamped("g5", 2, both.clone(), &["g:5", "u:7"]),
            ),
            (Topic::All, stamped("a2", 3, Route::everyone(), &["a:2"])),
            (
                chat.clone(),
                stamped("g6", 4, both.clone(), &["g:6", "u:8"]),
            ),
            (user.clone(), stamped("g6", 4, both, &["g:6", "u:8"])),
            (Topic::All, stamped("a3", 5, Route::everyone(), &["a:3"])),
        ];
        for (via, envelope) in &live {
            hub.deliver(via, envelope);
        }
        hub.gap(&chat, None);
        // The replay reached a:2 and g:5 (and u:7).
        let reached = [Some(pos("a:2")), Some(pos("g:5")), Some(pos("u:7"))];
        let mut floors = Floors::new(reached.clone(), true);
        let written = drain(&mut rx, &mut floors);
        let names: Vec<_> = written.iter().map(|v| v["message"].clone()).collect();
        assert_eq!(
            names,
            [
                serde_json::json!("g6"),
                serde_json::json!("a3"),
                serde_json::json!(r#"{"topics":["group:chat"]}"#)
            ],
            "each message once, those replayed dropped"
        );
        assert_eq!(written[0]["pos"]["user:ann"], "u:8");
        assert_eq!(written[2]["action"], "wshub.gap");
        assert_eq!(
            floors.positions(),
            &[Some(pos("a:3")), Some(pos("g:6")), Some(pos("u:7"))]
        );
        // A legacy socket without a handoff drops nothing and sees no pos
        // and no gap notice; its floors are still kept.
        let mut floors = Floors::new(reached, false);
        let written = drain(&mut legacy_rx, &mut floors);
        let names: Vec<_> = written.iter().map(|v| v["message"].clone()).collect();
        assert_eq!(names, ["a1", "g5", "a2", "g6", "a3"]);
        assert!(written.iter().all(|v| v.get("pos").is_none()));
        assert_eq!(floors.positions()[0], Some(pos("a:3")));
    }
}
