//! One socket's session: read client messages, write queued frames, ping,
//! and close with exactly one [`CloseReason`].
//!
//! A session is one task. It waits on four things at once: the close signal
//! (set by anyone through the connection's [`Closer`](crate::conn::Closer)),
//! the client's next frame, the outbound queue, and the ping timer. Queued
//! frames are written in batches and flushed once per wake-up, so a busy
//! socket costs one write system call for many frames.
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
//! queued for it: the frame being written when a close reason arrives is
//! kept ([`InFlight`]) and written first by the closing handshake, before
//! the rest of the queue. (Dropping it, as an earlier version did, left a
//! gap mid-stream: later frames were still sent.)

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message as WsMessage, WebSocket};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::time::{Interval, MissedTickBehavior, interval_at};
use tracing::debug;

use crate::conn::{Closer, Conn, OutboxReceiver, SlowCause};
use crate::logging::{Untrusted, UntrustedOpt};
use crate::message::{Frame, MessageError, error_frame};
use crate::node::{ClientError, Node, PublishError, Registration};
use crate::outcome::CloseReason;
use crate::outcome::DropReason;
use crate::rate_limit::{RateLimit, Verdict};

/// Most frames written before one flush; bounds how long one wake-up takes.
const MAX_BATCH: usize = 64;
/// How long the closing handshake may take before the socket is dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Runs a session until the socket closes.
pub(crate) async fn run(socket: WebSocket, mut registration: Registration) {
    let Some(outbound) = registration.take_outbound() else {
        return;
    };
    let mut session = Session::new(socket, registration, outbound);
    let reason = loop {
        // Each arm is one call; the futures borrow disjoint fields and are
        // dropped before the chosen arm's call runs.
        let step = tokio::select! {
            biased;
            reason = session.conn.closer.closed() => Err(reason),
            frame = session.stream.next() => session.on_frame(frame),
            Some(first) = session.outbound.recv() => session.write(first).await,
            _ = session.ping.tick() => session.on_ping().await,
        };
        if let Err(reason) = step {
            break reason;
        }
    };
    session.finish(reason).await;
}

/// One socket's state while its session runs.
struct Session {
    registration: Registration,
    conn: Arc<Conn>,
    node: Arc<Node>,
    sink: SplitSink<WebSocket, WsMessage>,
    stream: SplitStream<WebSocket>,
    outbound: OutboxReceiver,
    ping: Interval,
    /// Whether the peer sent anything since the last ping.
    heard: bool,
    rate: RateLimit,
    /// The client sent a close frame (its echo is owed).
    client_closed: bool,
    write_timeout: Duration,
    in_flight: InFlight,
}

impl Session {
    fn new(socket: WebSocket, registration: Registration, outbound: OutboxReceiver) -> Self {
        let conn = registration.conn.clone();
        let node = registration.node().clone();
        debug!(
            conn = conn.id,
            user = %Untrusted(&conn.who.user),
            group = %UntrustedOpt(conn.who.group.as_deref()),
            "connection opened"
        );
        let (sink, stream) = socket.split();
        let ping_every = node.config.ws.ping_interval;
        let mut ping = interval_at(tokio::time::Instant::now() + ping_every, ping_every);
        ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let rate = RateLimit::new(&node.config.limits);
        let write_timeout = node.config.ws.write_timeout;
        Self {
            registration,
            conn,
            node,
            sink,
            stream,
            outbound,
            ping,
            heard: true,
            rate,
            client_closed: false,
            write_timeout,
            in_flight: InFlight::default(),
        }
    }

    /// Handles the client's next frame (or the end of its stream).
    fn on_frame(
        &mut self,
        frame: Option<Result<WsMessage, axum::Error>>,
    ) -> Result<(), CloseReason> {
        self.heard = true;
        let data = matches!(frame, Some(Ok(WsMessage::Text(_) | WsMessage::Binary(_))));
        // Control frames count too: tungstenite owes a pong for every ping
        // and buffers it even when the peer does not read, so an unlimited
        // ping flood grows memory.
        let control = matches!(frame, Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))));
        if data || control {
            match self.rate.check(tokio::time::Instant::now()) {
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
                        self.node.metrics.received();
                        self.node.metrics.dropped(DropReason::RateLimited, 1);
                    }
                    return Err(CloseReason::PolicyViolation);
                }
            }
        }
        match frame {
            Some(Ok(WsMessage::Text(text))) => on_text(&self.registration, &mut self.rate, &text)?,
            Some(Ok(WsMessage::Binary(bytes))) => match std::str::from_utf8(&bytes) {
                Ok(text) => on_text(&self.registration, &mut self.rate, text)?,
                Err(_) => {
                    // Refused before it is a message: this is its one count.
                    self.node.metrics.dropped(DropReason::Invalid, 1);
                    reply_error(
                        &self.registration,
                        &PublishError::from(MessageError::NotUtf8),
                    );
                }
            },
            // tungstenite answers pings itself.
            Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => {}
            Some(Ok(WsMessage::Close(_))) => {
                self.client_closed = true;
                return Err(CloseReason::Normal);
            }
            Some(Err(e)) => return Err(read_error_reason(e)),
            None => return Err(CloseReason::ConnectionLost),
        }
        Ok(())
    }

    /// Writes `first` and what else is queued, racing the close reason.
    async fn write(&mut self, first: Frame) -> Result<(), CloseReason> {
        self.in_flight.0 = Some(first);
        let write = write_batch(&mut self.sink, &mut self.outbound, &mut self.in_flight);
        guarded(&self.conn.closer, self.write_timeout, write).await
    }

    /// Pings the peer, or closes it when it was silent since the last ping.
    async fn on_ping(&mut self) -> Result<(), CloseReason> {
        if !self.heard {
            return Err(CloseReason::PingTimeout);
        }
        self.heard = false;
        let write = self.sink.send(WsMessage::Ping(Default::default()));
        guarded(&self.conn.closer, self.write_timeout, write).await
    }

    /// Records `reason` (unless someone else's came first), leaves the node,
    /// and runs the closing handshake.
    async fn finish(self, reason: CloseReason) {
        let conn = self.conn;
        if conn.closer.reason().is_none() && reason == CloseReason::SlowConsumer {
            conn.log_slow_consumer(SlowCause::WriteTimedOut);
        }
        // Record the reason (a no-op if someone else set it first), then
        // leave the hub before the closing handshake so nothing more is
        // queued.
        conn.closer.close(reason);
        let reason = conn.closer.reason().unwrap_or(reason);
        drop(self.registration);
        close(
            self.sink,
            self.stream,
            self.in_flight,
            self.outbound,
            reason,
            self.client_closed,
        )
        .await;
    }
}

/// Runs one write unless the session is closed first or the write takes
/// longer than `limit`. A write that fails means the connection is gone; one
/// that runs out of time means the peer does not read: a slow consumer.
async fn guarded(
    closer: &Closer,
    limit: Duration,
    write: impl Future<Output = Result<(), axum::Error>>,
) -> Result<(), CloseReason> {
    tokio::select! {
        biased;
        reason = closer.closed() => Err(reason),
        result = tokio::time::timeout(limit, write) => match result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(CloseReason::ConnectionLost),
            Err(_) => Err(CloseReason::SlowConsumer),
        },
    }
}

/// The frame a batch write has taken from the queue but not yet handed to
/// the socket. A write abandoned for a close reason leaves it here, and the
/// closing handshake writes it before the rest of the queue, so the client
/// never sees a gap. (A frame handed over is in tungstenite's buffer and is
/// flushed by whatever is written next, the close frame included.)
#[derive(Default)]
struct InFlight(Option<Frame>);

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

fn read_error_reason(error: axum::Error) -> CloseReason {
    use tungstenite::error::{CapacityError, Error};
    match error.into_inner().downcast::<Error>().map(|e| *e) {
        Ok(Error::Capacity(CapacityError::MessageTooLong { .. })) => CloseReason::MessageTooBig,
        Ok(Error::Protocol(_) | Error::Utf8(_)) => CloseReason::ProtocolError,
        _ => CloseReason::ConnectionLost,
    }
}

/// Writes the frame in flight and up to [`MAX_BATCH`] frames in all from
/// the queue, then flushes. Each frame stays in `in_flight` until the
/// socket has taken it (`feed` hands a frame over in the same poll that
/// completes it, so a cancelled `feed` never took its frame).
async fn write_batch(
    sink: &mut SplitSink<WebSocket, WsMessage>,
    outbound: &mut OutboxReceiver,
    in_flight: &mut InFlight,
) -> Result<(), axum::Error> {
    for _ in 0..MAX_BATCH {
        if in_flight.0.is_none() {
            in_flight.0 = outbound.try_recv();
        }
        // A clone is a reference-count increment.
        let Some(frame) = in_flight.0.clone() else {
            break;
        };
        sink.feed(WsMessage::Text(frame)).await?;
        in_flight.0 = None;
    }
    sink.flush().await
}

/// The closing handshake, bounded by [`CLOSE_TIMEOUT`]. Frames still
/// queued for the client (the one in flight, error replies, messages that
/// arrived before the close) are written first and in order, except for a
/// slow consumer, whose queue is the problem. If the time runs out, the
/// client has received a prefix of its frames and the connection ends.
async fn close(
    mut sink: SplitSink<WebSocket, WsMessage>,
    mut stream: SplitStream<WebSocket>,
    mut in_flight: InFlight,
    mut outbound: OutboxReceiver,
    reason: CloseReason,
    client_closed: bool,
) {
    if reason == CloseReason::ConnectionLost {
        return;
    }
    let handshake = async {
        if reason != CloseReason::SlowConsumer && !client_closed {
            while let Some(frame) = in_flight.0.take().or_else(|| outbound.try_recv()) {
                if sink.feed(WsMessage::Text(frame)).await.is_err() {
                    return;
                }
            }
        }
        if client_closed {
            // tungstenite queued the echo of the client's close; send it.
            let _ = sink.flush().await;
        } else {
            let frame = CloseFrame {
                code: reason.code(),
                reason: reason.reason().into(),
            };
            if sink.send(WsMessage::Close(Some(frame))).await.is_err() {
                return;
            }
            // Wait for the client's close reply (or the end of the stream).
            while let Some(Ok(msg)) = stream.next().await {
                if matches!(msg, WsMessage::Close(_)) {
                    break;
                }
            }
        }
    };
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, handshake).await;
}
