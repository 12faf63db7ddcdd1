//! A socket's write side, shared by its session and the tasks that deliver
//! to it (issue 19: the delivering task writes the frame itself).
//!
//! The socket (the upgraded connection) lives behind a `std::sync::Mutex`
//! with the bytes **owed** to it: bytes that were accepted for the socket
//! but that it has not taken yet, always the next to go, before any other
//! frame. Four kinds of writer share it:
//!
//! - a **delivering task** ([`Wire::try_deliver`]) writes a frame to an
//!   idle socket itself, only when the lock is free (`try_lock`, never a
//!   wait on the delivery path), nothing is owed, the socket's outbox is
//!   empty (checked under this lock, which the session holds while it
//!   takes frames from the outbox: no frame can overtake one taken
//!   earlier) and the session allows it ([`Wire::set_direct`]: serving,
//!   after the resume decision with history on). What the socket does
//!   not take at once becomes owed, and the caller wakes the session;
//! - the **session** ([`Wire::poll_frames`]) writes what is owed, then
//!   batches of queued frames, waiting for the socket with its own waker
//!   (so the write timeout and the close race apply to what the
//!   delivering task could not write);
//! - a **delivery lane** ([`Wire::try_flush`], [`crate::lane`]) writes a
//!   socket's queued frames for a big delivery, as the session would, but
//!   only when the lock is free, nothing is owed (the session is then
//!   waiting for the socket) and deliveries may write, and never waiting:
//!   what is left, it leaves to the session, which it wakes;
//! - **tungstenite** (pings, pongs, close frames) writes through
//!   [`Wire::poll_write`], which accepts every byte at once (what the
//!   socket does not take is owed): tungstenite's own buffer is then
//!   always empty, so its bytes cannot be overtaken by a frame written
//!   here.
//!
//! With history on, every writer checks each copy of a stamped message
//! against the socket's floors (kept here, under the same lock) and
//! raises them as it takes the copy ([`Floors::admit`]).
//!
//! Frames are written without tungstenite: a frame from the server is not
//! masked, so it is a 2 to 10 byte header and the payload. A batch of up
//! to [`COPY_MAX`] bytes is copied into one per-thread buffer and written
//! with one plain write (`send` on Linux); a larger one with one vectored
//! write of its headers and payloads (`writev`, no copy of a payload
//! unless the socket leaves part of it owed).
//!
//! Reads take the lock too (the upgraded connection is one object), for
//! the time of one `poll_read`; a delivery that finds the lock taken
//! queues its frame.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::{Mutex, MutexGuard, TryLockError};
use std::task::{Context, Poll, Waker, ready};

use hyper::body::Bytes;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::fragments::Fragments;
use crate::message::Frame;
use crate::outbox::Queued;
use crate::position::Mark;
use crate::resume::Floors;

/// The upgraded connection: the TCP stream itself, with what the client
/// sent after its upgrade request (read before the stream), as the
/// node's HTTP/1 server (`src/server.rs`) hands every upgrade back; or
/// hyper's `Upgraded` as it is, should an upgrade come over anything else.
///
/// The stream itself spares each read and write a virtual call through
/// hyper's boxed connection, and each socket that box (about 25 bytes;
/// no difference in CPU per delivery was measurable at 2,000 sockets,
/// docs/architecture.md).
pub(crate) enum Io {
    Tcp {
        stream: TcpStream,
        /// Bytes the client sent after the upgrade request, read with it;
        /// empty (and then holding no buffer) once they are read.
        early: Bytes,
    },
    Upgraded(TokioIo<Upgraded>),
}

impl Io {
    pub(crate) fn new(upgraded: Upgraded) -> Self {
        match upgraded.downcast::<TokioIo<TcpStream>>() {
            Ok(parts) => Io::Tcp {
                stream: parts.io.into_inner(),
                // An empty rest may still hold hyper's read buffer.
                early: if parts.read_buf.is_empty() {
                    Bytes::new()
                } else {
                    parts.read_buf
                },
            },
            Err(upgraded) => Io::Upgraded(TokioIo::new(upgraded)),
        }
    }
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Tcp { stream, early } if early.is_empty() => Pin::new(stream).poll_read(cx, buf),
            Io::Tcp { early, .. } => {
                let n = early.len().min(buf.remaining());
                buf.put_slice(&early.split_to(n));
                if early.is_empty() {
                    *early = Bytes::new();
                }
                Poll::Ready(Ok(()))
            }
            Io::Upgraded(io) => Pin::new(io).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Tcp { stream, .. } => Pin::new(stream).poll_write(cx, buf),
            Io::Upgraded(io) => Pin::new(io).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Tcp { stream, .. } => Pin::new(stream).poll_write_vectored(cx, bufs),
            Io::Upgraded(io) => Pin::new(io).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Io::Tcp { stream, .. } => stream.is_write_vectored(),
            Io::Upgraded(io) => io.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Tcp { stream, .. } => Pin::new(stream).poll_flush(cx),
            Io::Upgraded(io) => Pin::new(io).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Tcp { stream, .. } => Pin::new(stream).poll_shutdown(cx),
            Io::Upgraded(io) => Pin::new(io).poll_shutdown(cx),
        }
    }
}

/// Most frames one [`Wire::poll_frames`] call takes from its source
/// before it writes them.
pub(crate) const MAX_BATCH: usize = 64;

/// Owed bytes' buffer capacity kept once it is empty: more is given back,
/// so that a socket that once fell behind does not keep its burst's
/// buffer while idle.
const OWED_KEPT: usize = 4096;

/// Batches up to this many bytes (headers and payloads) are copied into
/// one buffer and written with one `send`, larger ones with `writev` of
/// the pieces. On Linux a socket's `writev` costs more than `send` of one
/// buffer (`vfs_writev`, the file position lock, the iovec copied in):
/// in a profile of the fanout to 2,000 the difference was about 0.5 us of
/// each delivery's ~7 us (and `bench/misc/syscall-cost.c` measured
/// `send` at 0.93 of `writev` on the same machine), and copying a few
/// hundred bytes costs far less. Above this size the copy
/// would cost more than the system call saves.
const COPY_MAX: usize = 16 * 1024;

thread_local! {
    /// The buffer [`State::write_frames`] copies a small batch into: one
    /// per thread, so no socket keeps one ([`COPY_MAX`] bounds it).
    static SCRATCH: std::cell::RefCell<Vec<u8>> =
        std::cell::RefCell::new(Vec::with_capacity(COPY_MAX));
    /// The frames of the batch `State::poll_batches` is writing (at most
    /// [`MAX_BATCH`]; empty between batches).
    static BATCH: std::cell::RefCell<Vec<Frame>> =
        std::cell::RefCell::new(Vec::with_capacity(MAX_BATCH));
}

/// A socket's write side (and, for tungstenite, its read side). Generic
/// over the connection only so that its tests can use a TCP stream.
pub(crate) struct Wire<T = Io> {
    state: Mutex<State<T>>,
}

impl<T> Default for Wire<T> {
    fn default() -> Self {
        Self {
            state: Mutex::new(State {
                io: None,
                owed: Vec::new(),
                sent: 0,
                direct: false,
                gather: usize::MAX,
                floors: None,
            }),
        }
    }
}

impl<T> std::fmt::Debug for Wire<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wire").finish_non_exhaustive()
    }
}

struct State<T> {
    /// `None` until the upgrade is done.
    io: Option<T>,
    /// Bytes owed to the socket, from `sent` on.
    owed: Vec<u8>,
    sent: usize,
    /// Whether a delivering task may write (see [`Wire::set_direct`]).
    direct: bool,
    /// The session's batch ends once it holds this many bytes
    /// (`ws.write_buffer_bytes`), or [`MAX_BATCH`] frames: what one write
    /// gathers, and about the most a batch can leave owed beyond the
    /// outbox's bound.
    gather: usize,
    /// With history on: the last position written per topic
    /// ([`Floors`]). Every writer checks a copy of a stamped message
    /// against them, and raises them, when it takes the copy, so that a
    /// copy the replay already wrote is dropped whoever would write it,
    /// and the floors a drain hands over count every copy written.
    floors: Option<Box<Floors>>,
}

/// A frame on its way to the socket: a frame (no mark), or a queued copy
/// with the mark the floors check.
pub(crate) trait Outgoing {
    fn mark(&self) -> Option<&Mark>;
    fn into_frame(self) -> Frame;
}

impl Outgoing for Frame {
    fn mark(&self) -> Option<&Mark> {
        None
    }
    fn into_frame(self) -> Frame {
        self
    }
}

impl Outgoing for Queued {
    fn mark(&self) -> Option<&Mark> {
        self.mark.as_ref()
    }
    fn into_frame(self) -> Frame {
        self.frame
    }
}

/// What [`Wire::try_flush`] left.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Flushed {
    /// Everything was written: nothing owed, `next` had no more.
    Done,
    /// Something is left for the session, which must be woken.
    Session,
}

/// What [`Wire::try_deliver`] did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Direct {
    /// Not written: queue the frame.
    No,
    /// Written, all of it.
    Written,
    /// Written in part: the rest is owed, and the session must be woken
    /// to write it.
    Owed,
}

fn not_connected() -> io::Error {
    io::Error::new(
        io::ErrorKind::NotConnected,
        "the socket is not upgraded yet",
    )
}

/// The length of [`text_header`]'s header for a payload of `len` bytes.
fn text_header_len(len: usize) -> usize {
    if len < 126 {
        2
    } else if len <= usize::from(u16::MAX) {
        4
    } else {
        10
    }
}

/// Writes a text frame's header for a payload of `len` bytes into `out`
/// (FIN set, opcode 1, not masked) and returns its length.
fn text_header(len: usize, out: &mut [u8; 10]) -> usize {
    out[0] = 0x81;
    if len < 126 {
        out[1] = len as u8;
        2
    } else if let Ok(len) = u16::try_from(len) {
        out[1] = 126;
        out[2..4].copy_from_slice(&len.to_be_bytes());
        4
    } else {
        out[1] = 127;
        out[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    }
}

impl<T> State<T> {
    /// Whether a copy with `mark` is written (see [`Floors::admit`]);
    /// always without history.
    fn admits(&mut self, mark: Option<&Mark>) -> bool {
        self.floors.as_deref_mut().is_none_or(|f| f.admit(mark))
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> State<T> {
    fn owes(&self) -> bool {
        self.sent < self.owed.len()
    }

    fn owe(&mut self, bytes: &[u8]) {
        self.owed.extend_from_slice(bytes);
    }

    fn io(&mut self) -> io::Result<Pin<&mut T>> {
        self.io.as_mut().map(Pin::new).ok_or_else(not_connected)
    }

    /// Writes the owed bytes; `Ready(Ok)` once none are left, `Pending`
    /// (with `cx` registered by the socket) while it takes no more.
    fn poll_owed(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.owes() {
            let io = self.io.as_mut().ok_or_else(not_connected)?;
            match ready!(Pin::new(io).poll_write(cx, &self.owed[self.sent..]))? {
                0 => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                n => self.sent += n,
            }
        }
        self.owed.clear();
        self.sent = 0;
        if self.owed.capacity() > OWED_KEPT {
            self.owed = Vec::new();
        }
        Poll::Ready(Ok(()))
    }

    /// Writes `frames` (their payloads; nothing owed) with one write;
    /// what the socket does not take becomes owed. Up to [`COPY_MAX`]
    /// bytes in all, headers and payloads are copied into one buffer and
    /// written with `send`; larger batches with one vectored write
    /// (`writev`), without copying the payloads (see [`COPY_MAX`]).
    ///
    /// No array is filled for the copy (the usual case, often one frame):
    /// the vectored path's header and slice arrays, zeroed on every call,
    /// were 7 % of a node's user-space instructions in a fanout
    /// (`bench/instructions.py`).
    fn write_frames<F: std::ops::Deref<Target = str>>(
        &mut self,
        cx: &mut Context<'_>,
        frames: &[F],
    ) -> io::Result<()> {
        debug_assert!(!self.owes() && frames.len() <= MAX_BATCH);
        let total: usize = frames
            .iter()
            .map(|f| text_header_len(f.len()) + f.len())
            .sum();
        if total <= COPY_MAX {
            return SCRATCH.with_borrow_mut(|buf| {
                buf.clear();
                for frame in frames {
                    let frame = frame.as_bytes();
                    let mut header = [0u8; 10];
                    let len = text_header(frame.len(), &mut header);
                    buf.extend_from_slice(&header[..len]);
                    buf.extend_from_slice(frame);
                }
                let written = match self.io()?.poll_write(cx, buf) {
                    Poll::Ready(Ok(n)) => n,
                    Poll::Ready(Err(e)) => return Err(e),
                    Poll::Pending => 0,
                };
                // What the socket left is owed, from where it stopped.
                self.owed.extend_from_slice(&buf[written..]);
                Ok(())
            });
        }
        let mut headers = [[0u8; 10]; MAX_BATCH];
        let mut lens = [0usize; MAX_BATCH];
        for (i, frame) in frames.iter().enumerate() {
            lens[i] = text_header(frame.len(), &mut headers[i]);
        }
        let mut slices = [IoSlice::new(&[]); 2 * MAX_BATCH];
        for (i, frame) in frames.iter().enumerate() {
            slices[2 * i] = IoSlice::new(&headers[i][..lens[i]]);
            slices[2 * i + 1] = IoSlice::new(frame.as_bytes());
        }
        let slices = &slices[..2 * frames.len()];
        let written = match self.io()?.poll_write_vectored(cx, slices) {
            Poll::Ready(Ok(n)) => n,
            Poll::Ready(Err(e)) => return Err(e),
            Poll::Pending => 0,
        };
        if written < total {
            // What the socket left is owed, from where it stopped.
            let mut skip = written;
            for slice in slices {
                if skip >= slice.len() {
                    skip -= slice.len();
                    continue;
                }
                let rest = &slice[skip..];
                skip = 0;
                self.owed.extend_from_slice(rest);
            }
        }
        Ok(())
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> State<T> {
    /// What is owed, then up to [`MAX_BATCH`] frames (or `gather` bytes)
    /// at a time from `next`, each batch in one vectored write, until
    /// `next` has none; `Pending` while the socket takes no more.
    fn poll_batches<Q: Outgoing>(
        &mut self,
        cx: &mut Context<'_>,
        next: &mut impl FnMut() -> Option<Q>,
    ) -> Poll<io::Result<()>> {
        loop {
            ready!(self.poll_owed(cx))?;
            // The batch in a per-thread list: arrays of `MAX_BATCH` frames
            // and slices were filled on every call, for one frame as often
            // as not (see `write_frames`).
            let wrote = BATCH.with_borrow_mut(|batch| {
                batch.clear();
                let mut bytes = 0;
                // At least one frame, whatever `gather` (a review set
                // `ws.write_buffer_bytes = 0`: nothing queued was ever
                // written, and the session spun on a core).
                while batch.len() < MAX_BATCH
                    && (batch.is_empty() || bytes < self.gather)
                    && let Some(item) = next()
                {
                    if !self.admits(item.mark()) {
                        continue;
                    }
                    let frame = item.into_frame();
                    bytes += frame.len();
                    batch.push(frame);
                }
                if batch.is_empty() {
                    return Ok(false);
                }
                let written = self.write_frames(cx, batch);
                // The frames go now, as they did (their buffers are shared).
                batch.clear();
                written.map(|()| true)
            })?;
            if !wrote {
                return Poll::Ready(Ok(()));
            }
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> Wire<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // Every critical section leaves the state whole: ignore poisoning.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Hands the upgraded connection over; the session's batches gather
    /// up to `gather` bytes (at least one frame each).
    pub(crate) fn install(&self, io: T, gather: usize) {
        let mut state = self.lock();
        state.io = Some(io);
        state.gather = gather;
    }

    /// Drops the upgraded connection (which closes it), once the session
    /// has ended.
    pub(crate) fn release(&self) {
        let mut state = self.lock();
        state.direct = false;
        state.io = None;
        state.owed = Vec::new();
        state.sent = 0;
        state.floors = None;
    }

    /// With history on: the socket's floors, from the resume decision on
    /// (before deliveries may write, [`set_direct`](Self::set_direct)).
    pub(crate) fn set_floors(&self, floors: Floors) {
        self.lock().floors = Some(Box::new(floors));
    }

    /// The floors as they stand (`None` without history).
    pub(crate) fn floors(&self) -> Option<Floors> {
        self.lock().floors.as_deref().cloned()
    }

    /// Allows (or stops) writes by delivering tasks and lanes. The
    /// session allows them while it serves (with history on, once the
    /// floors are set: every writer checks copies against them) and
    /// stops them before its closing handshake.
    pub(crate) fn set_direct(&self, on: bool) {
        self.lock().direct = on;
    }

    /// Whether bytes are owed (the session then has a write to do).
    pub(crate) fn owes(&self) -> bool {
        self.lock().owes()
    }

    /// A delivering task's write of `frame` (see the module docs): only
    /// when the lock is free, nothing is owed, writes are allowed and
    /// `queue_empty()` (the socket's outbox, checked under the lock). A
    /// copy with a `mark` the floors do not admit is dropped
    /// ([`Direct::Written`]: it was, by the replay).
    pub(crate) fn try_deliver(
        &self,
        frame: &Frame,
        mark: Option<&Mark>,
        queue_empty: impl FnOnce() -> bool,
    ) -> Direct {
        let mut state = match self.state.try_lock() {
            Ok(state) => state,
            Err(TryLockError::WouldBlock | TryLockError::Poisoned(_)) => return Direct::No,
        };
        if !state.direct || state.owes() || state.io.is_none() || !queue_empty() {
            return Direct::No;
        }
        if !state.admits(mark) {
            return Direct::Written;
        }
        // A no-op waker: the session is woken for what is left. Outside
        // tokio's cooperative budget, which counts a task's operations:
        // a delivery to thousands of sockets would otherwise find every
        // socket "not ready" once the delivering task's budget ran out.
        let mut cx = Context::from_waker(Waker::noop());
        let write = tokio::task::coop::unconstrained(std::future::poll_fn(|cx| {
            Poll::Ready(state.write_frames(cx, &[frame.as_str()]))
        }));
        let written = std::pin::pin!(write).poll(&mut cx);
        match written {
            Poll::Ready(Ok(())) if state.owes() => Direct::Owed,
            Poll::Ready(Ok(())) => Direct::Written,
            // The connection failed: the session finds out on its side
            // and ends without writing anything more (the floors count
            // this copy, so it is not queued again).
            Poll::Ready(Err(_)) | Poll::Pending => {
                state.direct = false;
                Direct::Written
            }
        }
    }

    /// The session's write: what is owed, then up to [`MAX_BATCH`] frames
    /// at a time from `next` (called under the lock, so that a delivering
    /// task cannot write between the frames it takes), until `next` has
    /// none. `Pending` while the socket takes no more.
    pub(crate) fn poll_frames<Q: Outgoing>(
        &self,
        cx: &mut Context<'_>,
        next: &mut impl FnMut() -> Option<Q>,
    ) -> Poll<io::Result<()>> {
        self.lock().poll_batches(cx, next)
    }

    /// A delivery lane's write ([`crate::lane`]): the frames `next`
    /// gives, as [`poll_frames`](Self::poll_frames) writes them, but only
    /// when the lock is free, nothing is owed and deliveries may write
    /// ([`set_direct`](Self::set_direct)), and never waiting for the
    /// socket. [`Flushed::Session`] when anything is left for the session
    /// (frames not taken, bytes owed, or the socket not the lane's to
    /// write): the caller wakes it.
    pub(crate) fn try_flush<Q: Outgoing>(&self, next: &mut impl FnMut() -> Option<Q>) -> Flushed {
        let mut state = match self.state.try_lock() {
            Ok(state) => state,
            Err(TryLockError::WouldBlock | TryLockError::Poisoned(_)) => return Flushed::Session,
        };
        // Bytes owed: the session is waiting for the socket (or about to),
        // with its waker registered there. The socket keeps one waker for
        // writes, so a poll here would replace the session's with the
        // no-op one and leave the session asleep until its write timeout
        // (an adversarial review found healthy readers closed as slow
        // consumers that way): the session writes what follows.
        if !state.direct || state.io.is_none() || state.owes() {
            return Flushed::Session;
        }
        // As in `try_deliver`: a no-op waker (the session waits for the
        // socket, not the lane), outside tokio's cooperative budget.
        let mut cx = Context::from_waker(Waker::noop());
        let write = tokio::task::coop::unconstrained(std::future::poll_fn(|cx| {
            state.poll_batches(cx, next)
        }));
        match std::pin::pin!(write).poll(&mut cx) {
            Poll::Ready(Ok(())) => Flushed::Done,
            Poll::Ready(Err(_)) => {
                // The session finds the failure on its own write or read.
                state.direct = false;
                Flushed::Session
            }
            Poll::Pending => Flushed::Session,
        }
    }

    /// tungstenite's read.
    pub(crate) fn poll_read(
        &self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut state = self.lock();
        match state.io() {
            Ok(io) => io.poll_read(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    /// tungstenite's write: every byte is accepted (what the socket does
    /// not take is owed), so tungstenite never holds bytes of its own.
    pub(crate) fn poll_write(&self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let mut state = self.lock();
        if state.owes() {
            state.owe(buf);
            // Progress if the socket takes some; `cx` is woken otherwise.
            if let Poll::Ready(Err(e)) = state.poll_owed(cx) {
                return Poll::Ready(Err(e));
            }
        } else {
            match state.io()?.poll_write(cx, buf) {
                Poll::Ready(Ok(n)) => state.owe(&buf[n..]),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => state.owe(buf),
            }
        }
        Poll::Ready(Ok(buf.len()))
    }

    /// tungstenite's flush: done once nothing is owed.
    pub(crate) fn poll_flush(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut state = self.lock();
        ready!(state.poll_owed(cx))?;
        state.io()?.poll_flush(cx)
    }

    /// tungstenite's shutdown, after what is owed.
    pub(crate) fn poll_shutdown(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut state = self.lock();
        ready!(state.poll_owed(cx))?;
        state.io()?.poll_shutdown(cx)
    }
}

/// The socket as tungstenite sees it: reads and writes through the
/// [`Wire`] of `W`, its reads' frames counted ([`Fragments`]).
pub(crate) struct WireIo<W> {
    pub(crate) conn: W,
    fragments: Fragments,
}

impl<W> WireIo<W> {
    pub(crate) fn new(conn: W) -> Self {
        Self {
            conn,
            fragments: Fragments::default(),
        }
    }
}

impl<W> AsyncRead for WireIo<W>
where
    W: std::ops::Deref + Unpin,
    W::Target: AsRef<Wire>,
{
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        ready!((*this.conn).as_ref().poll_read(cx, buf))?;
        this.fragments
            .scan(&buf.filled()[before..])
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        Poll::Ready(Ok(()))
    }
}

impl<W> AsyncWrite for WireIo<W>
where
    W: std::ops::Deref + Unpin,
    W::Target: AsRef<Wire>,
{
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        (*self.conn).as_ref().poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        (*self.conn).as_ref().poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        (*self.conn).as_ref().poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::{TcpListener, TcpStream};

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (server, client)
    }

    /// Reads `n` text frames as the server writes them (not masked).
    async fn read_frames(client: &mut TcpStream, n: usize) -> Vec<String> {
        let mut frames = Vec::new();
        for _ in 0..n {
            let mut head = [0u8; 2];
            client.read_exact(&mut head).await.unwrap();
            assert_eq!(head[0], 0x81, "a final text frame");
            let len = match head[1] {
                126 => {
                    let mut len = [0u8; 2];
                    client.read_exact(&mut len).await.unwrap();
                    u16::from_be_bytes(len) as usize
                }
                127 => {
                    let mut len = [0u8; 8];
                    client.read_exact(&mut len).await.unwrap();
                    u64::from_be_bytes(len) as usize
                }
                len => len as usize,
            };
            let mut payload = vec![0; len];
            client.read_exact(&mut payload).await.unwrap();
            frames.push(String::from_utf8(payload).unwrap());
        }
        frames
    }

    #[test]
    fn text_headers_use_the_shortest_length() {
        let mut out = [0u8; 10];
        assert_eq!(text_header(5, &mut out), 2);
        assert_eq!(out[..2], [0x81, 5]);
        assert_eq!(text_header(126, &mut out), 4);
        assert_eq!(out[..4], [0x81, 126, 0, 126]);
        assert_eq!(text_header(70_000, &mut out), 10);
        assert_eq!(out[..10], [0x81, 127, 0, 0, 0, 0, 0, 1, 0x11, 0x70]);
        // The copy path sizes its batch with text_header_len: the same.
        for len in [0, 125, 126, 65_535, 65_536, 70_000] {
            assert_eq!(text_header_len(len), text_header(len, &mut out), "{len}");
        }
    }

    /// A delivery writes to an idle socket itself, once the session
    /// allows it, and only when nothing is queued before it.
    #[tokio::test]
    async fn a_frame_for_an_idle_socket_is_written_by_its_deliverer() {
        let (server, mut client) = pair().await;
        let wire = Wire::default();
        let frame = Frame::from("hello");
        assert_eq!(
            wire.try_deliver(&frame, None, || true),
            Direct::No,
            "no socket"
        );
        wire.install(server, usize::MAX);
        assert_eq!(
            wire.try_deliver(&frame, None, || true),
            Direct::No,
            "not allowed"
        );
        wire.set_direct(true);
        assert_eq!(
            wire.try_deliver(&frame, None, || false),
            Direct::No,
            "queued"
        );
        let held = wire.lock();
        assert_eq!(
            wire.try_deliver(&frame, None, || true),
            Direct::No,
            "locked"
        );
        drop(held);
        assert_eq!(wire.try_deliver(&frame, None, || true), Direct::Written);
        assert_eq!(read_frames(&mut client, 1).await, ["hello"]);
    }

    /// A socket that takes every write whole and records each one's size,
    /// and whether it was a vectored write.
    type Writes = std::sync::Arc<std::sync::Mutex<Vec<(usize, bool)>>>;
    struct Recorder(Writes);

    impl AsyncRead for Recorder {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Pending
        }
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.0.lock().unwrap().push((buf.len(), false));
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_write_vectored(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let n = bufs.iter().map(|b| b.len()).sum();
            self.0.lock().unwrap().push((n, true));
            Poll::Ready(Ok(n))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// A session's write gathers queued frames up to `ws.write_buffer_bytes`
    /// per write (at least one frame), not only up to [`MAX_BATCH`]
    /// frames: what a batch can leave owed stays about that size.
    #[test]
    fn a_batch_gathers_up_to_the_write_buffer_size() {
        let writes = Writes::default();
        let sizes = || {
            writes
                .lock()
                .unwrap()
                .iter()
                .map(|w| w.0)
                .collect::<Vec<_>>()
        };
        let wire = Wire::default();
        wire.install(Recorder(writes.clone()), 100);
        let mut queued = (0..10).map(|_| Frame::from("x".repeat(40)));
        let mut cx = Context::from_waker(Waker::noop());
        let done = wire.poll_frames(&mut cx, &mut || queued.next());
        assert!(matches!(done, Poll::Ready(Ok(()))));
        // 42 bytes a frame (2 of header): three frames reach 100 bytes.
        assert_eq!(sizes(), [126, 126, 126, 42]);

        // One frame larger than the size is written on its own.
        writes.lock().unwrap().clear();
        let mut queued = [Frame::from("y".repeat(300)), Frame::from("z")].into_iter();
        let done = wire.poll_frames(&mut cx, &mut || queued.next());
        assert!(matches!(done, Poll::Ready(Ok(()))));
        assert_eq!(sizes(), [304, 3]);
    }

    /// A batch of up to `COPY_MAX` bytes is copied into one buffer and
    /// written with a plain write (`send` on a TCP stream), a larger one
    /// with a vectored write of its pieces; both carry the same bytes.
    #[test]
    fn small_batches_are_one_plain_write_large_ones_vectored() {
        let writes = Writes::default();
        let wire = Wire::default();
        wire.install(Recorder(writes.clone()), usize::MAX);
        let mut cx = Context::from_waker(Waker::noop());
        let small = "s".repeat(1000);
        let mut queued = (0..3).map(|_| Frame::from(small.as_str()));
        let done = wire.poll_frames(&mut cx, &mut || queued.next());
        assert!(matches!(done, Poll::Ready(Ok(()))));
        // 1,000 bytes need a 4-byte header.
        assert_eq!(*writes.lock().unwrap(), [(3 * 1004, false)]);

        writes.lock().unwrap().clear();
        let big = "b".repeat(COPY_MAX);
        let mut queued = [Frame::from(big.as_str())].into_iter();
        let done = wire.poll_frames(&mut cx, &mut || queued.next());
        assert!(matches!(done, Poll::Ready(Ok(()))));
        assert_eq!(*writes.lock().unwrap(), [(COPY_MAX + 4, true)]);
    }

    /// A batch takes at least one frame, whatever its byte bound: with
    /// `ws.write_buffer_bytes = 0` it took none, and a queued frame was
    /// never written.
    #[test]
    fn a_batch_takes_one_frame_even_with_no_byte_room() {
        let writes = Writes::default();
        let wire = Wire::default();
        wire.install(Recorder(writes.clone()), 0);
        let mut cx = Context::from_waker(Waker::noop());
        let mut queued = (0..3).map(|_| Frame::from("abc"));
        let done = wire.poll_frames(&mut cx, &mut || queued.next());
        assert!(matches!(done, Poll::Ready(Ok(()))));
        assert_eq!(
            *writes.lock().unwrap(),
            [(5, false); 3],
            "one frame a write"
        );
    }

    /// Delivers the frames `text(0)`, `text(1)`, … directly until the
    /// socket leaves one owed (a delivery then finds it owed and queues),
    /// then has the session write one more frame: the client must read
    /// every frame whole, once and in order, and nothing stays owed.
    async fn fill_the_socket_then_flush(text: impl Fn(usize) -> String) {
        let (server, mut client) = pair().await;
        let wire = Wire::default();
        wire.install(server, usize::MAX);
        wire.set_direct(true);
        let mut sent = Vec::new();
        for i in 0..100_000 {
            let text = text(i);
            let direct = wire.try_deliver(&Frame::from(text.clone()), None, || true);
            assert_ne!(direct, Direct::No, "frame {i}");
            sent.push(text);
            if direct == Direct::Owed {
                break;
            }
        }
        assert!(wire.owes(), "the socket filled up");
        let late = Frame::from("late");
        assert_eq!(wire.try_deliver(&late, None, || true), Direct::No);
        sent.push("next".into());
        let n = sent.len();
        let reader = tokio::spawn(async move { read_frames(&mut client, n).await });
        let mut queued = vec![Frame::from("next")].into_iter();
        std::future::poll_fn(|cx| wire.poll_frames(cx, &mut || queued.next()))
            .await
            .unwrap();
        assert_eq!(reader.await.unwrap(), sent);
        assert!(!wire.owes());
    }

    /// The copied write's rest is owed as the vectored write's is: small
    /// frames (odd sizes, so that the socket stops in the middle of one),
    /// each written by a copy into one buffer.
    #[tokio::test]
    async fn what_a_copied_write_leaves_is_written_first() {
        fill_the_socket_then_flush(|i| format!("{i}{}", "y".repeat(1000 + i % 7))).await;
    }

    /// What a socket does not take is owed: deliveries stop writing, and
    /// the session's write sends it before the frames it takes (frames
    /// above `COPY_MAX`, each a vectored write).
    #[tokio::test]
    async fn what_the_socket_does_not_take_is_written_first() {
        let big = "x".repeat(100_000);
        fill_the_socket_then_flush(|i| format!("{i}{big}")).await;
    }

    /// A lane writes a socket's queued frames only when the session
    /// allows deliveries to write and the lock is free, and leaves the
    /// rest to the session (`Flushed::Session`) when the socket stops
    /// taking them: the frames it took are owed, none is lost or
    /// reordered.
    #[tokio::test]
    async fn a_lane_writes_what_the_socket_takes_and_leaves_the_rest() {
        let (server, mut client) = pair().await;
        let wire = Wire::default();
        let mut queued: std::collections::VecDeque<Frame> =
            ["a", "b"].into_iter().map(Frame::from).collect();
        let mut next = || queued.pop_front();
        assert_eq!(wire.try_flush(&mut next), Flushed::Session, "no socket");
        wire.install(server, usize::MAX);
        assert_eq!(wire.try_flush(&mut next), Flushed::Session, "not allowed");
        wire.set_direct(true);
        let held = wire.lock();
        assert_eq!(wire.try_flush(&mut next), Flushed::Session, "locked");
        drop(held);
        assert_eq!(queued.len(), 2, "nothing taken while it was not the lane's");
        let mut next = || queued.pop_front();
        assert_eq!(wire.try_flush(&mut next), Flushed::Done);
        assert_eq!(read_frames(&mut client, 2).await, ["a", "b"]);

        // A backlog the socket does not take at once.
        let big = "x".repeat(100_000);
        let mut sent: Vec<String> = (0..200).map(|i| format!("{i}{big}")).collect();
        let mut queued: std::collections::VecDeque<Frame> =
            sent.iter().cloned().map(Frame::from).collect();
        assert_eq!(wire.try_flush(&mut || queued.pop_front()), Flushed::Session);
        assert!(wire.owes(), "the socket filled up");
        assert!(!queued.is_empty(), "the lane stopped taking frames");
        sent.push("last".into());
        queued.push_back(Frame::from("last"));
        let n = sent.len();
        let reader = tokio::spawn(async move { read_frames(&mut client, n).await });
        // The session writes the rest, what is owed first.
        std::future::poll_fn(|cx| wire.poll_frames(cx, &mut || queued.pop_front()))
            .await
            .unwrap();
        assert_eq!(reader.await.unwrap(), sent);
    }

    /// A session waiting for a full socket is woken when the socket takes
    /// bytes again, even if a lane visited the socket meanwhile: the lane
    /// leaves an owing socket alone rather than polling it with its no-op
    /// waker, which replaced the session's (the socket keeps one write
    /// waker) and left the session asleep until its write timeout.
    #[tokio::test]
    async fn a_lane_does_not_take_the_waiting_sessions_wake_up() {
        use crate::outbox::tests::CountingWaker;
        use std::sync::atomic::Ordering;
        let (server, mut client) = pair().await;
        let wire = Wire::default();
        wire.install(server, usize::MAX);
        wire.set_direct(true);
        // The session writes until the socket is full and waits.
        let session = std::sync::Arc::new(CountingWaker::default());
        let waker = Waker::from(session.clone());
        let mut cx = Context::from_waker(&waker);
        let big = Frame::from("x".repeat(100_000));
        let mut sent = 0;
        loop {
            let mut one = Some(big.clone());
            match wire.poll_frames(&mut cx, &mut || one.take()) {
                Poll::Ready(Ok(())) => sent += 1,
                Poll::Ready(Err(e)) => panic!("{e}"),
                Poll::Pending => break,
            }
            assert!(sent < 1_000, "the socket never filled");
        }
        assert!(wire.owes());
        // A lane visits the socket: it takes nothing and touches nothing.
        let mut queued = Some(Frame::from("after"));
        assert_eq!(wire.try_flush(&mut || queued.take()), Flushed::Session);
        assert!(
            queued.is_some(),
            "the lane took a frame from an owing socket"
        );
        // The client reads: the session is woken for the rest. The count
        // is looked at between reads and while a read waits (the wake-up
        // comes from the runtime's driver, which may run only once the
        // client has read everything and waits: the test was flaky).
        let mut buf = vec![0u8; 1 << 20];
        let woken = tokio::time::timeout(std::time::Duration::from_secs(10), async {
            while session.0.load(Ordering::SeqCst) == 0 {
                tokio::select! {
                    read = client.read(&mut buf) => {
                        read.unwrap();
                    }
                    () = tokio::time::sleep(std::time::Duration::from_millis(10)) => {}
                }
            }
        })
        .await;
        assert!(woken.is_ok(), "the session was never woken for the socket");
    }

    /// With history on, every writer (a small delivery's direct write, a
    /// lane, the session) drops a copy the socket's floors say was
    /// already written (by the replay) and raises the floors with what it
    /// writes, so the floors a drain hands over count every copy.
    #[tokio::test]
    async fn every_writer_drops_what_the_floors_say_was_written() {
        use crate::position::{Position, Stamp};
        use crate::route::Topic;
        let pos = |text: &str| Position::parse(text).unwrap();
        let mark = |text: &str| {
            let stamp = Stamp {
                seq: 1,
                positions: vec![(Topic::All, pos(text))],
            };
            Mark::of(&Topic::All, Some(&stamp)).unwrap()
        };
        let queued = |text: &str, at: Option<&str>| Queued {
            frame: Frame::from(text),
            mark: at.map(mark),
        };
        let (server, mut client) = pair().await;
        let wire = Wire::default();
        wire.install(server, usize::MAX);
        // The replay wrote up to a:2.
        wire.set_floors(Floors::new([Some(pos("a:2")), None, None], true));
        wire.set_direct(true);
        let direct =
            |text: &str, at: &str| wire.try_deliver(&Frame::from(text), Some(&mark(at)), || true);
        assert_eq!(direct("replayed", "a:2"), Direct::Written, "dropped");
        assert_eq!(direct("three", "a:3"), Direct::Written);
        let mut lane = std::collections::VecDeque::from([
            queued("three again", Some("a:3")),
            queued("four", Some("a:4")),
            queued("gap notice", None),
        ]);
        assert_eq!(wire.try_flush(&mut || lane.pop_front()), Flushed::Done);
        let mut session = std::collections::VecDeque::from([
            queued("four again", Some("a:4")),
            queued("five", Some("a:5")),
        ]);
        std::future::poll_fn(|cx| wire.poll_frames(cx, &mut || session.pop_front()))
            .await
            .unwrap();
        assert_eq!(
            read_frames(&mut client, 4).await,
            ["three", "four", "gap notice", "five"]
        );
        let floors = wire.floors().expect("history on");
        assert_eq!(floors.positions()[0], Some(pos("a:5")));
    }
}
