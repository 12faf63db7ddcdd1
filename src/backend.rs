//! Server-side processing: client messages whose action is not `broadcast`
//! go to the application's backend over HTTP, as in Web Connection.
//!
//! Each forward is a `POST` of the client's JSON, unchanged, to
//! `backend.url`, with the sending connection's verified identity in
//! headers ([`HEADER_USER_ID`] and friends) so the backend never has to
//! trust ids in the body. The backend answers through the broadcast
//! endpoint; its HTTP response is ignored (a 2xx means success).
//!
//! Forwarding never blocks a socket: jobs go into a queue of at most
//! `backend.queue` entries, drained by `backend.concurrency` workers, each
//! request bounded by `backend.timeout_ms`. When the queue is full, the
//! backend is down, slow or answers an error, the sender receives a
//! `wshub.error` saying so, the failure is counted, and a burst of failures
//! is logged once (and its end once). Forwards are **not retried**: a
//! message is not known to be idempotent, and its sender has been told and
//! may send it again.
//!
//! **One connection, one request at a time, in order.** The queue is kept
//! per connection ([`Queues`]): a worker takes the oldest job of a
//! connection that has nothing in flight, and the connection waits for its
//! next turn until the backend answered. So the backend sees each socket's
//! messages and events in the order they happened (`wshub.connect` first,
//! `wshub.disconnect` last), while different connections proceed side by
//! side. (Forwards used to run concurrently from one queue: 90 messages of
//! one socket arrived with 1,064 pairs out of order, and a disconnect could
//! overtake its connect. Hashing connections onto sequential workers was
//! rejected: a slow connection would stall every other on its worker.)
//!
//! **Shutdown flushes.** The workers are owned by the backend's
//! `TaskTracker`; [`Backend::shutdown`] stops taking jobs, lets the workers
//! send what is queued (the drain's `wshub.disconnect` events above all),
//! and after the grace period abandons the rest, counted as `shutdown`. The
//! server awaits it before `run` returns.
//!
//! **Signing.** With `backend.signing_key`, every request carries
//! [`HEADER_TIMESTAMP`], [`HEADER_NONCE`] and [`HEADER_SIGNATURE`]:
//! HMAC-SHA256 over [`canonical`] (timestamp, nonce, method, path, the
//! hub's identity and event headers ([`SIGNED_HEADERS`]) and body), made
//! when the request is sent (not when it was queued, so a queued forward
//! is not stale on arrival). The headers are signed because they are what
//! the backend trusts: a review re-labelled a captured request's
//! `X-Wshub-User-Id` and `X-Wshub-Group-Id` while they were not, and the
//! sample backend took it. docs/backend.md has the exact string and
//! verification code. `backend.headers` adds static headers (an
//! `Authorization`) for backends that prefer those.
//!
//! With `backend.events`, the hub also posts `wshub.connect` and
//! `wshub.disconnect` messages (same shape, same headers) when sockets open
//! and close, so the backend learns who arrived — which Web Connection's hub
//! never tells it. With history on, the connect event is sent once the
//! socket's resume is decided, and says how it went: its `message` is
//! `{"recovered":bool,"replayed":n}` and [`HEADER_RESUME`] is
//! `recovered`, `not_recovered` or `none` (a chat backend sends its
//! `initialmessages` only when not recovered). With history off both are
//! as before (`message` null, no header).

use std::borrow::Cow;
use std::collections::hash_map::{Entry, HashMap};
use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use axum::body::Bytes;
use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::BackendConfig;
use crate::conn::{Conn, ConnId};
use crate::message::{Message, error_frame};
use crate::metrics::Metrics;
use crate::outcome::ForwardResult;
use crate::resume::Report;
use crate::route::Identity;
use crate::shutdown::Shutdown;

/// The sender's user id (percent-encoded UTF-8).
pub(crate) const HEADER_USER_ID: &str = "x-wshub-user-id";
/// The sender's group id (percent-encoded); absent for the null group.
pub(crate) const HEADER_GROUP_ID: &str = "x-wshub-group-id";
/// The node holding the sender's socket.
pub(crate) const HEADER_NODE_ID: &str = "x-wshub-node-id";
/// The sender's connection, unique in the cluster:
/// `<node id>-<instance>-<number>` (the `connection` recipient's value).
pub(crate) const HEADER_CONNECTION_ID: &str = "x-wshub-connection-id";

/// When the request was signed: Unix time in seconds, decimal.
pub(crate) const HEADER_TIMESTAMP: &str = "x-wshub-timestamp";
/// 32 random hex digits, new for every request. Two identical messages
/// from one socket within a second would otherwise carry the same
/// signature, and a backend refusing replays would refuse the second.
pub(crate) const HEADER_NONCE: &str = "x-wshub-nonce";
/// Lowercase hex HMAC-SHA256 of [`canonical`] under `backend.signing_key`.
pub(crate) const HEADER_SIGNATURE: &str = "x-wshub-signature";

/// How the socket's resume went, on the connect event (history on only):
/// `recovered`, `not_recovered` or `none` (a legacy socket with no drain
/// handoff to take over).
pub(crate) const HEADER_RESUME: &str = "x-wshub-resume";

/// On every event the hub posts (connect, disconnect, and presence's
/// online, offline, join, leave), never on a client's forwarded message:
/// the event's name (its action without `wshub.`). A backend that checks it
/// cannot be fooled by a client's action however it is spelled.
pub(crate) const HEADER_EVENT: &str = "x-wshub-event";

/// The event's name for [`HEADER_EVENT`]: its action without `wshub.`.
fn event_header(action: &'static str) -> HeaderValue {
    HeaderValue::from_static(
        action
            .strip_prefix(crate::message::RESERVED_PREFIX)
            .unwrap_or(action),
    )
}

/// The reserved action of the connect event.
pub(crate) const ACTION_CONNECT: &str = "wshub.connect";
/// The reserved action of the disconnect event.
pub(crate) const ACTION_DISCONNECT: &str = "wshub.disconnect";

/// Bytes escaped in identity headers: controls, space (HTTP trims it at
/// the ends of a value), non-ASCII (by
/// `utf8_percent_encode` itself), `%` so that decoding is unambiguous, and
/// `+`, which form decoders (`UrlDecode()` in FoxPro, .NET's
/// `HttpUtility.UrlDecode`, PHP's `urldecode`) read as a space: the user
/// `ann+bob` arrived as `ann bob` (review of 2026-12-02).
const HEADER_ESCAPES: &AsciiSet = &CONTROLS.add(b' ').add(b'%').add(b'+').add(b'\x7f');

struct Job {
    kind: Kind,
    body: Bytes,
    headers: HeaderMap,
    /// What to call the job in the sender's error message.
    action: String,
    /// The sender, told when the forward fails; `None` for events.
    sender: Option<Weak<Conn>>,
}

/// What a job is, for the room it may take in [`Queues`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A client's message: within `backend.queue_per_connection` and
    /// `backend.queue`.
    Forward,
    /// `wshub.connect`: within `backend.queue`.
    Connect,
    /// `wshub.disconnect` of an announced connection: always taken (see
    /// [`Queues`]).
    Disconnect,
}

/// Why a job was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refused {
    /// Shutting down.
    Closed,
    /// `backend.queue` is full.
    Full,
    /// The sender has `backend.queue_per_connection` forwards waiting.
    ConnectionFull,
    /// The room kept for disconnect events is full: cannot happen while it
    /// is at least the node's socket capacity (see [`Queues`]).
    ReserveFull,
}

impl Refused {
    fn result(self) -> ForwardResult {
        match self {
            Self::Closed => ForwardResult::Shutdown,
            Self::Full | Self::ConnectionFull | Self::ReserveFull => ForwardResult::QueueFull,
        }
    }
}

/// The connection to the application's backend.
pub(crate) struct Backend {
    queues: Arc<Queues>,
    node_id: Arc<str>,
    pub events: bool,
    metrics: Arc<Metrics>,
    /// The workers, awaited by [`shutdown`](Self::shutdown).
    workers: TaskTracker,
    /// Cancelled when the grace period is over: workers drop their
    /// requests and stop.
    abandon: CancellationToken,
}

impl Backend {
    /// Starts `backend.concurrency` workers on `shutdown` (the node's child
    /// for the backend: its token abandons the queue, its tracker is what
    /// [`shutdown`](Self::shutdown) and the node wait for). `sockets` is the
    /// node's socket capacity: the room kept for disconnect events.
    /// Requires a Tokio runtime.
    pub(crate) fn start(
        config: &BackendConfig,
        sockets: usize,
        node_id: Arc<str>,
        metrics: Arc<Metrics>,
        shutdown: Shutdown,
    ) -> Result<Self, reqwest::Error> {
        // Redirects are not followed: a 301 or 302 would turn the POST into
        // a GET without its body (answered 2xx, the message was lost with
        // nobody told), and a 307 would hand the body, the identity and
        // the static headers to whatever host it names. A 3xx is a failure
        // like any other non-2xx (review of 2026-12-02).
        // Nor is a proxy from the environment (`HTTP_PROXY`, `ALL_PROXY`
        // …) used: the backend is the application's own server, and
        // containers inherit those variables from the machine that started
        // them; through one, the identity and static headers went to the
        // proxy, a loopback backend included (review of 2026-12-02).
        let client = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .build()?;
        let queues = Arc::new(Queues::new(
            config.queue,
            config.queue_per_connection,
            sockets,
        ));
        let mut fixed = HeaderMap::new();
        for (name, value) in &config.headers {
            // Checked when the configuration was loaded.
            if let (Ok(name), Ok(mut value)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_str(value.expose()),
            ) {
                value.set_sensitive(true);
                fixed.insert(name, value);
            }
        }
        let dispatcher = Arc::new(Dispatcher {
            client,
            path: reqwest::Url::parse(&config.url)
                .map(|u| match u.query() {
                    Some(q) => format!("{}?{q}", u.path()),
                    None => u.path().to_owned(),
                })
                .unwrap_or_default(),
            signing_key: config.signing_key.clone(),
            fixed,
            url: config.url.clone(),
            metrics: metrics.clone(),
            failing: AtomicBool::new(false),
            redirect_logged: AtomicBool::new(false),
        });
        let workers = shutdown.tracker().clone();
        let abandon = shutdown.token().clone();
        for _ in 0..config.concurrency {
            workers.spawn(worker(dispatcher.clone(), queues.clone(), abandon.clone()));
        }
        workers.close();
        Ok(Self {
            queues,
            node_id,
            events: config.events,
            metrics,
            workers,
            abandon,
        })
    }

    fn headers(&self, conn: &Conn) -> HeaderMap {
        let mut headers = HeaderMap::with_capacity(5);
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        let mut put = |name: &'static str, value: &str| {
            let encoded = utf8_percent_encode(value, HEADER_ESCAPES).to_string();
            // Percent-encoded text is always a valid header value.
            if let Ok(v) = HeaderValue::from_str(&encoded) {
                headers.insert(HeaderName::from_static(name), v);
            }
        };
        put(HEADER_USER_ID, &conn.who.user);
        if let Some(group) = conn.who.group.as_deref() {
            put(HEADER_GROUP_ID, group);
        }
        put(HEADER_NODE_ID, &self.node_id);
        put(HEADER_CONNECTION_ID, &conn.cid);
        headers
    }

    /// Forwards a client message (its JSON as received), after the
    /// connection's earlier forwards and events. On any failure the sender
    /// gets a `wshub.error`.
    pub(crate) fn forward(&self, conn: &Arc<Conn>, text: &str, action: &str) {
        let job = Job {
            kind: Kind::Forward,
            body: Bytes::copy_from_slice(text.as_bytes()),
            headers: self.headers(conn),
            action: action.to_owned(),
            sender: Some(Arc::downgrade(conn)),
        };
        let Err(refused) = self.queues.push(conn.id, job) else {
            return;
        };
        self.metrics.backend_forward(refused.result());
        let message = match refused {
            Refused::Closed => format!(
                "the node is shutting down: `{action}` was not delivered to the application, try again"
            ),
            Refused::ConnectionFull => format!(
                "backend busy: `{action}` was not delivered to the application: {} of this connection's messages are still waiting for the backend; try again",
                self.queues.per_connection
            ),
            Refused::Full | Refused::ReserveFull => {
                format!("backend busy: `{action}` was not delivered to the application, try again")
            }
        };
        conn.offer(error_frame(&message));
    }

    /// Queues a `wshub.connect` or `wshub.disconnect` event, if enabled,
    /// behind the connection's earlier forwards. Returns whether it was
    /// queued: a connection whose connect event was refused gets no
    /// disconnect event either, so the backend never hears of a departure
    /// without the arrival. `resume`: how the socket's resume went (a
    /// connect event with history on).
    pub(crate) fn event(&self, conn: &Conn, action: &'static str, resume: Option<&Report>) -> bool {
        if !self.events {
            return false;
        }
        let message = resume.map(Report::message);
        let body = event_body(&conn.who, action, message.as_deref());
        let mut headers = self.headers(conn);
        headers.insert(HeaderName::from_static(HEADER_EVENT), event_header(action));
        if let Some(resume) = resume {
            headers.insert(
                HeaderName::from_static(HEADER_RESUME),
                HeaderValue::from_static(resume.header()),
            );
        }
        let job = Job {
            kind: if action == ACTION_DISCONNECT {
                Kind::Disconnect
            } else {
                Kind::Connect
            },
            body: Bytes::from(body),
            headers,
            action: action.to_owned(),
            sender: None,
        };
        match self.queues.push(conn.id, job) {
            Ok(()) => true,
            Err(refused) => {
                self.metrics.backend_forward(refused.result());
                if refused == Refused::ReserveFull {
                    warn!(
                        conn = %conn.cid,
                        "disconnect event dropped: more disconnect events waiting than this node holds sockets"
                    );
                }
                false
            }
        }
    }

    /// `conn` closed: its forwards still waiting are sent after every open
    /// socket's, in room of their own ([`Queues`]). Call it after its
    /// disconnect event is queued.
    pub(crate) fn left(&self, conn: &Conn) {
        let dropped = self.queues.left(conn.id);
        if dropped > 0 {
            for _ in 0..dropped {
                self.metrics.backend_forward(ForwardResult::QueueFull);
            }
            warn!(
                conn = %conn.cid,
                dropped,
                "forwards of a closed socket dropped: backend.queue forwards of closed sockets are waiting already"
            );
        }
    }

    /// Queues a cluster presence event (`wshub.online`, `wshub.offline`,
    /// `wshub.join`, `wshub.leave`; `src/presence.rs`), if events are
    /// enabled: the message shape with the user's (and for join and leave
    /// the group's) ids and no connection id. Events of one user go in
    /// order (they share a queue slot derived from the user id); returns
    /// whether it was queued.
    pub(crate) fn presence_event(&self, who: &Identity, action: &'static str) -> bool {
        if !self.events {
            return false;
        }
        let mut headers = HeaderMap::new();
        let mut put = |name: &'static str, value: &str| {
            let encoded = utf8_percent_encode(value, HEADER_ESCAPES).to_string();
            if let Ok(v) = HeaderValue::from_str(&encoded) {
                headers.insert(HeaderName::from_static(name), v);
            }
        };
        put(HEADER_USER_ID, &who.user);
        if let Some(group) = who.group.as_deref() {
            put(HEADER_GROUP_ID, group);
        }
        put(HEADER_NODE_ID, &self.node_id);
        headers.insert(HeaderName::from_static(HEADER_EVENT), event_header(action));
        let job = Job {
            kind: Kind::Connect,
            body: Bytes::from(event_body(who, action, None)),
            headers,
            action: action.to_owned(),
            sender: None,
        };
        // Socket ids count up from 1; these keys have the top bit set, so
        // they never share a socket's place in the queues.
        let key = {
            use std::hash::{Hash, Hasher};
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            who.user.hash(&mut hasher);
            hasher.finish() | (1 << 63)
        };
        match self.queues.push(key, job) {
            Ok(()) => true,
            Err(refused) => {
                self.metrics.backend_forward(refused.result());
                false
            }
        }
    }

    /// Stops taking jobs and waits until the workers have sent everything
    /// queued, for at most `grace`. Then abandons what is left (requests in
    /// flight and jobs never sent), counting each as `shutdown`. Call it
    /// after the sessions ended, so their disconnect events are queued.
    pub(crate) async fn shutdown(&self, grace: Duration) {
        let queued = self.queues.close();
        if tokio::time::timeout(grace, self.workers.wait())
            .await
            .is_ok()
        {
            if queued > 0 {
                info!(flushed = queued, "backend queue flushed");
            }
            return;
        }
        self.abandon.cancel();
        let never_sent = self.queues.clear();
        for _ in 0..never_sent {
            self.metrics.backend_forward(ForwardResult::Shutdown);
        }
        // Quick: every worker returns as soon as it sees the cancellation.
        self.workers.wait().await;
        // Both: with a grace period of 0 the requests in flight are most of
        // what is lost, and the line said `never_sent=0` (review of
        // 2026-12-03: 19 of 20 disconnect events lost so).
        let in_flight = self.queues.cut_off.load(Ordering::Relaxed);
        warn!(
            never_sent,
            in_flight,
            grace_ms = grace.as_millis() as u64,
            "backend queue not flushed within the grace period; the requests in flight are cut off and the rest is dropped (both counted as result=\"shutdown\")"
        );
    }
}

impl Drop for Backend {
    /// Without [`shutdown`](Backend::shutdown) (a node dropped in a test),
    /// the workers still send what is queued and then end, instead of
    /// waiting for jobs forever.
    fn drop(&mut self) {
        self.queues.close();
    }
}

/// Takes jobs until the queue is closed and empty (or shutdown abandons
/// them), one connection at a time.
async fn worker(dispatcher: Arc<Dispatcher>, queues: Arc<Queues>, abandon: CancellationToken) {
    loop {
        let turn = tokio::select! {
            biased;
            () = abandon.cancelled() => return,
            turn = queues.ready.acquire() => turn,
        };
        // Closed: nothing queued, nothing in flight, nothing more to come.
        let Ok(turn) = turn else { return };
        turn.forget();
        let Some((conn, job)) = queues.take() else {
            continue;
        };
        tokio::select! {
            biased;
            () = abandon.cancelled() => {
                dispatcher.metrics.backend_forward(ForwardResult::Shutdown);
                queues.cut_off.fetch_add(1, Ordering::Relaxed);
                return;
            }
            () = dispatcher.send(job) => {}
        }
        queues.done(conn);
    }
}

/// The jobs waiting to be sent, in one FIFO per connection.
///
/// A `Mutex<HashMap<_, VecDeque>>` rather than a channel per connection:
/// a channel per socket would cost memory on every idle socket, and the
/// bound that matters (`backend.queue`) is on the total. The semaphore
/// counts the connections in `ready`, so a worker that holds a permit is
/// sure to find one; closing it stops the workers.
///
/// **Three bounds.** Forwards and connect events share `backend.queue`.
/// One connection's forwards wait at most `backend.queue_per_connection`
/// at once: its requests go one at a time, so a socket sending faster than
/// the backend answers used to fill the node's whole queue, and every other
/// user got "backend busy" (issue 11 review). Over either, the sender is
/// told "backend busy" and the forward is dropped. Disconnect events of
/// announced connections are never refused for a full queue: the backend
/// heard the connect and must hear the disconnect (one was once dropped
/// for a queue full of another socket's messages). They wait in room of
/// their own, `reserve` events, the node's socket capacity: one per
/// connection, and a connection's disconnect is queued as it leaves, so
/// more can wait only when sockets keep coming and going faster than the
/// backend answers; past it (counted as `queue_full` and logged) the event
/// is dropped. Memory: a few hundred bytes per waiting event.
///
/// **A socket that closes** with forwards still waiting leaves them to be
/// sent (a page that sends and then navigates away expects its message to
/// arrive), but they stop counting against `backend.queue` and its
/// share: they move to room of their own, `backend.queue` forwards of
/// departed sockets in all (past it the departing socket's newest are
/// dropped, counted `queue_full`), and a departed socket's jobs go only
/// when no open socket's job is waiting. Before, they kept their place:
/// one address that opened a socket, sent its share and closed, again and
/// again, filled the whole queue within the per-address socket limit,
/// and every other user got "backend busy" (review of 2026-12-03).
struct Queues {
    state: Mutex<QueueState>,
    /// One permit per connection in [`QueueState::ready`].
    ready: Semaphore,
    /// At most this many forwards and connect events wait (`backend.queue`).
    capacity: usize,
    /// At most this many forwards of one connection wait
    /// (`backend.queue_per_connection`).
    per_connection: usize,
    /// At most this many disconnect events wait.
    reserve: usize,
    /// Requests in flight that shutdown cut off (for its log line: the
    /// queued ones are counted by `clear`).
    cut_off: AtomicUsize,
}

#[derive(Default)]
struct QueueState {
    /// Every connection with a job waiting or in flight; its waiting jobs,
    /// oldest first.
    by_conn: HashMap<ConnId, VecDeque<Job>>,
    /// Connections with a job waiting and none in flight, in the order they
    /// became so (round robin between connections).
    ready: VecDeque<ConnId>,
    /// The same for departed connections, whose turn comes when `ready`
    /// is empty.
    ready_left: VecDeque<ConnId>,
    /// Departed connections that still have a job waiting or in flight.
    left: HashSet<ConnId>,
    /// Forwards and connect events waiting (not in flight), over all
    /// connections.
    waiting: usize,
    /// Disconnect events waiting (not in flight).
    disconnects: usize,
    /// Forwards and connect events of departed connections waiting.
    orphans: usize,
    /// No more jobs are taken (shutdown).
    closed: bool,
}

impl Queues {
    fn new(capacity: usize, per_connection: usize, reserve: usize) -> Self {
        Self {
            state: Mutex::default(),
            ready: Semaphore::new(0),
            capacity,
            per_connection,
            reserve: reserve.max(1),
            cut_off: AtomicUsize::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        // The state is consistent after every statement; a panic elsewhere
        // does not corrupt it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `job` behind `conn`'s earlier ones, or says why not.
    fn push(&self, conn: ConnId, job: Job) -> Result<(), Refused> {
        let mut state = self.lock();
        if state.closed {
            return Err(Refused::Closed);
        }
        match job.kind {
            Kind::Disconnect if state.disconnects >= self.reserve => {
                return Err(Refused::ReserveFull);
            }
            Kind::Disconnect => state.disconnects += 1,
            Kind::Forward | Kind::Connect if state.waiting >= self.capacity => {
                return Err(Refused::Full);
            }
            Kind::Forward
                if state
                    .by_conn
                    .get(&conn)
                    .is_some_and(|jobs| jobs.len() >= self.per_connection) =>
            {
                return Err(Refused::ConnectionFull);
            }
            // A departed connection queues nothing but its disconnect
            // event; counted where `take` looks, whatever comes.
            Kind::Forward | Kind::Connect if state.left.contains(&conn) => state.orphans += 1,
            Kind::Forward | Kind::Connect => state.waiting += 1,
        }
        match state.by_conn.entry(conn) {
            // Already ready, or in flight (and made ready again by `done`).
            Entry::Occupied(mut jobs) => jobs.get_mut().push_back(job),
            Entry::Vacant(slot) => {
                slot.insert(VecDeque::from([job]));
                state.ready.push_back(conn);
                self.ready.add_permits(1);
            }
        }
        Ok(())
    }

    /// The oldest job of the next ready connection, which is then in
    /// flight until [`done`](Self::done).
    fn take(&self) -> Option<(ConnId, Job)> {
        let mut state = self.lock();
        let conn = match state.ready.pop_front() {
            Some(conn) => conn,
            None => state.ready_left.pop_front()?,
        };
        let job = state.by_conn.get_mut(&conn)?.pop_front()?;
        match job.kind {
            Kind::Disconnect => state.disconnects -= 1,
            Kind::Forward | Kind::Connect if state.left.contains(&conn) => state.orphans -= 1,
            Kind::Forward | Kind::Connect => state.waiting -= 1,
        }
        Some((conn, job))
    }

    /// `conn`'s job in flight is finished: its next job may go.
    fn done(&self, conn: ConnId) {
        let mut state = self.lock();
        if let Entry::Occupied(jobs) = state.by_conn.entry(conn) {
            if jobs.get().is_empty() {
                jobs.remove();
                state.left.remove(&conn);
            } else if state.left.contains(&conn) {
                state.ready_left.push_back(conn);
                self.ready.add_permits(1);
            } else {
                state.ready.push_back(conn);
                self.ready.add_permits(1);
            }
        }
        self.close_if_finished(&state);
    }

    /// `conn` closed: its waiting forwards (and connect event) leave
    /// `backend.queue` for the departed connections' room, the oldest
    /// first; returns how many did not fit and were dropped.
    fn left(&self, conn: ConnId) -> usize {
        let mut guard = self.lock();
        let state = &mut *guard;
        let Some(jobs) = state.by_conn.get_mut(&conn) else {
            return 0;
        };
        state.left.insert(conn);
        let room = self.capacity.saturating_sub(state.orphans);
        let (mut kept, mut dropped) = (0, 0);
        jobs.retain(|job| match job.kind {
            Kind::Disconnect => true,
            // Its disconnect event follows it: the backend never hears of
            // a departure without the arrival. One per connection.
            Kind::Connect => {
                kept += 1;
                true
            }
            Kind::Forward if kept < room => {
                kept += 1;
                true
            }
            Kind::Forward => {
                dropped += 1;
                false
            }
        });
        let empty = jobs.is_empty();
        state.waiting -= kept + dropped;
        state.orphans += kept;
        if let Some(at) = state.ready.iter().position(|&c| c == conn) {
            // Waiting for its turn, none in flight.
            state.ready.remove(at);
            if empty {
                // Nothing left to send: forgotten (the permit it held finds
                // no connection, which a worker takes as a spurious turn).
                state.by_conn.remove(&conn);
                state.left.remove(&conn);
            } else {
                state.ready_left.push_back(conn);
            }
        }
        // In flight: `done` puts it in its line, or forgets it.
        self.close_if_finished(state);
        dropped
    }

    /// Refuses new jobs from now on; returns how many are waiting.
    fn close(&self) -> usize {
        let mut state = self.lock();
        state.closed = true;
        self.close_if_finished(&state);
        state.waiting + state.disconnects + state.orphans
    }

    /// Drops every waiting job (the grace period is over); returns how
    /// many there were.
    fn clear(&self) -> usize {
        let mut state = self.lock();
        state.closed = true;
        let dropped = state.waiting + state.disconnects + state.orphans;
        state.by_conn.clear();
        state.ready.clear();
        state.ready_left.clear();
        state.left.clear();
        state.waiting = 0;
        state.disconnects = 0;
        state.orphans = 0;
        self.ready.close();
        dropped
    }

    /// Once closed with nothing waiting or in flight, nothing can make a
    /// connection ready again: closing the semaphore ends the workers.
    fn close_if_finished(&self, state: &QueueState) {
        if state.closed && state.by_conn.is_empty() {
            self.ready.close();
        }
    }
}

/// The JSON of an event: the message shape with the connection's ids (and
/// `message`, when given).
pub(crate) fn event_body(who: &Identity, action: &str, message: Option<&str>) -> String {
    Message {
        user_id: Some(Cow::Borrowed(&who.user)),
        group_id: who.group.as_deref().map(Cow::Borrowed),
        action: Some(Cow::Borrowed(action)),
        message: message.map(Cow::Borrowed),
        ..Message::default()
    }
    .encode()
    .to_string()
}

/// What every worker shares: the HTTP client and the failure-burst state.
struct Dispatcher {
    client: reqwest::Client,
    url: String,
    /// The path (and query) of `url`, as signed.
    path: String,
    signing_key: Option<crate::config::Secret>,
    /// `backend.headers`.
    fixed: HeaderMap,
    metrics: Arc<Metrics>,
    /// Whether the last forward failed (to log a burst once).
    failing: AtomicBool,
    /// Whether this burst's first redirect was logged: a redirect is
    /// logged even inside a burst another failure began, since what to do
    /// about it (the address it names) is in its line only.
    redirect_logged: AtomicBool,
}

impl Dispatcher {
    async fn send(&self, job: Job) {
        let mut headers = self.fixed.clone();
        headers.extend(job.headers);
        if let Some(key) = &self.signing_key {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let nonce = format!("{:032x}", rand::random::<u128>());
            let signature = sign(
                key.expose().as_bytes(),
                now,
                &nonce,
                "POST",
                &self.path,
                &headers,
                &job.body,
            );
            for (name, value) in [
                (HEADER_TIMESTAMP, now.to_string()),
                (HEADER_NONCE, nonce),
                (HEADER_SIGNATURE, signature),
            ] {
                if let Ok(v) = HeaderValue::from_str(&value) {
                    headers.insert(HeaderName::from_static(name), v);
                }
            }
        }
        let outcome = self
            .client
            .post(&self.url)
            .headers(headers)
            .body(job.body)
            .send()
            .await;
        // `reason` goes to the client, `problem` to the log. Neither shows
        // the URL: reqwest's errors carry it, with its password and query
        // (which may hold a key), so they are logged `without_url` and the
        // client only learns what kind of failure it was (issue 12 item 1).
        let server_error = matches!(&outcome, Ok(resp) if resp.status().is_server_error());
        let redirect = matches!(&outcome, Ok(resp) if resp.status().is_redirection());
        let (result, reason, problem) = match outcome {
            Ok(resp) if resp.status().is_success() => {
                (ForwardResult::Ok, String::new(), String::new())
            }
            Ok(resp) if resp.status().is_redirection() => {
                let reason = format!("backend answered {}", resp.status().as_u16());
                let to = resp
                    .headers()
                    .get(reqwest::header::LOCATION)
                    .map(|l| format!(" ({})", redirect_target(&self.url, l.as_bytes())))
                    .unwrap_or_default();
                let problem = format!(
                    "{reason}, a redirect, which is not followed: set backend.url to the address it redirects to{to}"
                );
                (ForwardResult::Status, reason, problem)
            }
            Ok(resp) => {
                let reason = format!("backend answered {}", resp.status().as_u16());
                (ForwardResult::Status, reason.clone(), reason)
            }
            // The backend may have the message: said so, since a client
            // told "unreachable" would send it again (forwards are not
            // retried for that reason).
            Err(e) if e.is_timeout() => (
                ForwardResult::Timeout,
                "backend timed out".into(),
                "the backend did not answer in time".into(),
            ),
            Err(e) if e.is_connect() => (
                ForwardResult::Unreachable,
                "backend unreachable".into(),
                format!("the backend is unreachable ({})", error_chain(e)),
            ),
            Err(e) => (
                ForwardResult::NoAnswer,
                "backend gave no answer".into(),
                format!(
                    "the backend took the request but gave no HTTP answer ({})",
                    error_chain(e)
                ),
            ),
        };
        self.metrics.backend_forward(result);
        if result == ForwardResult::Ok {
            self.redirect_logged.store(false, Ordering::Relaxed);
            if self.failing.swap(false, Ordering::Relaxed) {
                info!("backend forwards succeed again");
            }
            return;
        }
        let first_redirect = redirect && !self.redirect_logged.swap(true, Ordering::Relaxed);
        if !self.failing.swap(true, Ordering::Relaxed) || first_redirect {
            warn!(url = %crate::config::redact_url_and_query(&self.url), result = result.label(), %problem,
                "backend forwards failing (logged once per burst; see wshub_backend_forwards_total)");
        }
        if let Some(conn) = job.sender.and_then(|w| w.upgrade()) {
            // After a timeout or a lost answer the backend may have it.
            // A 5xx (an application error, or a gateway's 502/504 in front
            // of it) may come after the work was done, too.
            let fate = match result {
                ForwardResult::Timeout | ForwardResult::NoAnswer => "may not have been processed",
                ForwardResult::Status if server_error => "may not have been processed",
                _ => "was not processed",
            };
            conn.offer(error_frame(&format!(
                "backend error: `{}` {fate}: {reason}",
                job.action
            )));
        }
    }
}

/// Where a redirect's `Location` points, for the log: resolved against
/// `backend.url` (a relative one names a path of it), read as a URL parser
/// reads it (an `@` in the query is not the end of a password), without
/// user information, its query and fragment hidden; bytes that are not
/// UTF-8 shown as U+FFFD. What no parser reads is shown redacted as any
/// logged URL is.
fn redirect_target(backend_url: &str, location: &[u8]) -> String {
    let location = String::from_utf8_lossy(location);
    let parsed = match reqwest::Url::parse(backend_url) {
        Ok(base) => base.join(&location),
        Err(_) => reqwest::Url::parse(&location),
    };
    let Ok(mut url) = parsed else {
        return crate::config::redact_url_and_query(&location);
    };
    let _ = url.set_username("");
    let _ = url.set_password(None);
    if url.query().is_some() {
        url.set_query(Some("***"));
    }
    if url.fragment().is_some() {
        url.set_fragment(Some("***"));
    }
    url.to_string()
}

/// `e` and its sources, without the request's URL.
fn error_chain(e: reqwest::Error) -> String {
    crate::logging::error_chain(&e.without_url())
}

/// The hub's headers a signature covers, in the order of the canonical
/// string: who sent the request and, on a hub event, which event.
pub(crate) const SIGNED_HEADERS: [&str; 6] = [
    HEADER_USER_ID,
    HEADER_GROUP_ID,
    HEADER_NODE_ID,
    HEADER_CONNECTION_ID,
    HEADER_EVENT,
    HEADER_RESUME,
];

/// The string a request's signature covers: the timestamp (decimal Unix
/// seconds), the nonce, the method, the path with its query as in
/// `backend.url`, each line ending in `\n`; then a line `name:value` for
/// each of [`SIGNED_HEADERS`] the request carries (lower-case name, the
/// value as sent, percent-encoded), in that order; an empty line; and
/// the body, raw bytes (the client's JSON, UTF-8). No value holds a line
/// feed, so the empty line ends the headers whatever the body holds, and
/// a header added, dropped or changed changes the string.
pub(crate) fn canonical(
    timestamp: u64,
    nonce: &str,
    method: &str,
    path: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Vec<u8> {
    let mut text = format!("{timestamp}\n{nonce}\n{method}\n{path}\n").into_bytes();
    for name in SIGNED_HEADERS {
        if let Some(value) = headers.get(name) {
            text.extend_from_slice(name.as_bytes());
            text.push(b':');
            text.extend_from_slice(value.as_bytes());
            text.push(b'\n');
        }
    }
    text.push(b'\n');
    text.extend_from_slice(body);
    text
}

/// Lowercase hex HMAC-SHA256 of [`canonical`] under `key`.
pub(crate) fn sign(
    key: &[u8],
    timestamp: u64,
    nonce: &str,
    method: &str,
    path: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> String {
    use hmac::{KeyInit, Mac};
    let mut mac =
        hmac::Hmac::<sha2::Sha256>::new_from_slice(key).expect("HMAC takes a key of any length");
    mac.update(&canonical(timestamp, nonce, method, path, headers, body));
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_hmac_sha256_over_the_documented_string() {
        // The example of docs/backend.md, checked there with openssl
        // ("Signed requests": each part given to printf '%s').
        let nonce = "00112233445566778899aabbccddeeff";
        let path = "/app/__websocket.wwd";
        let body = br#"{"action":"x"}"#;
        let mut headers = HeaderMap::new();
        // Inserted out of order, with one header the string does not
        // cover: the string has the documented order and only those.
        for (name, value) in [
            (HEADER_CONNECTION_ID, "web-1-5f3a9c1e-42"),
            ("content-type", "application/json"),
            (HEADER_NODE_ID, "web-1"),
            (HEADER_GROUP_ID, "room"),
            (HEADER_USER_ID, "ann"),
        ] {
            headers.insert(name, HeaderValue::from_static(value));
        }
        assert_eq!(
            String::from_utf8(canonical(
                1_700_000_000,
                nonce,
                "POST",
                path,
                &headers,
                body
            ))
            .unwrap(),
            format!(
                "1700000000\n{nonce}\nPOST\n{path}\nx-wshub-user-id:ann\nx-wshub-group-id:room\n\
                 x-wshub-node-id:web-1\nx-wshub-connection-id:web-1-5f3a9c1e-42\n\n{{\"action\":\"x\"}}"
            )
        );
        let key = b"0123456789abcdef0123456789abcdef";
        assert_eq!(
            sign(key, 1_700_000_000, nonce, "POST", path, &headers, body),
            "ccad0413f3f0a0dc883218c1136836f4dc11a1f5a2f31702b3abf8521bcdeb38"
        );
        // Each identity or event header, changed, added or dropped,
        // changes the signature; an empty group is not the null group.
        let signed =
            |headers: &HeaderMap| sign(key, 1_700_000_000, nonce, "POST", path, headers, body);
        let base = signed(&headers);
        for name in SIGNED_HEADERS {
            let mut changed = headers.clone();
            changed.insert(name, HeaderValue::from_static("other"));
            assert_ne!(signed(&changed), base, "{name} changed");
            let mut dropped = headers.clone();
            if dropped.remove(name).is_some() {
                assert_ne!(signed(&dropped), base, "{name} dropped");
            }
        }
        let mut empty_group = headers.clone();
        empty_group.insert(HEADER_GROUP_ID, HeaderValue::from_static(""));
        let mut null_group = headers.clone();
        null_group.remove(HEADER_GROUP_ID);
        assert_ne!(signed(&empty_group), signed(&null_group));
    }

    #[test]
    fn a_redirect_target_is_resolved_and_shown_without_secrets() {
        let base = "http://fox:pw@app.example:8080/app/__websocket.wwd?key=K";
        for (location, want) in [
            (
                &b"https://new.example/cb?next=ann@example.com&apikey=SECRET"[..],
                "https://new.example/cb?***",
            ),
            (
                b"https://new.example/p?a=1#x@y&token=SECRET",
                "https://new.example/p?***#***",
            ),
            (b"https://u:SECRET@new.example/x", "https://new.example/x"),
            (
                b"/relative/path?key=SECRET",
                "http://app.example:8080/relative/path?***",
            ),
            (
                "https://new.example/café/x?k=SECRET".as_bytes(),
                "https://new.example/caf%C3%A9/x?***",
            ),
            (b"https://new.example/\xff", "https://new.example/%EF%BF%BD"),
        ] {
            assert_eq!(redirect_target(base, location), want, "{location:?}");
        }
    }

    #[test]
    fn identity_headers_are_percent_encoded_and_reversible() {
        let encoded = utf8_percent_encode("ann é%\n/x y", HEADER_ESCAPES).to_string();
        assert_eq!(encoded, "ann%20%C3%A9%25%0A/x%20y");
        assert!(HeaderValue::from_str(&encoded).is_ok());
        let back = percent_encoding::percent_decode_str(&encoded)
            .decode_utf8()
            .unwrap();
        assert_eq!(back, "ann é%\n/x y");
    }

    fn job(action: &str) -> Job {
        Job {
            kind: match action {
                ACTION_CONNECT => Kind::Connect,
                ACTION_DISCONNECT => Kind::Disconnect,
                _ => Kind::Forward,
            },
            body: Bytes::new(),
            headers: HeaderMap::new(),
            action: action.to_owned(),
            sender: None,
        }
    }

    fn take(queues: &Queues) -> (ConnId, String) {
        let (conn, job) = queues.take().expect("a ready connection");
        (conn, job.action)
    }

    /// Takes and finishes every job, one at a time, as a lone worker would;
    /// answers their actions in the order sent.
    fn drain(queues: &Queues) -> Vec<String> {
        let mut sent = Vec::new();
        while let Some((conn, job)) = queues.take() {
            sent.push(job.action);
            queues.done(conn);
        }
        sent
    }

    #[test]
    fn one_connection_is_in_flight_once_and_in_order_and_connections_take_turns() {
        let queues = Queues::new(10, 10, 10);
        for action in ["a1", "a2"] {
            queues.push(1, job(action)).unwrap();
        }
        queues.push(2, job("b1")).unwrap();
        assert_eq!(queues.ready.available_permits(), 2);
        assert_eq!(take(&queues), (1, "a1".into()));
        assert_eq!(take(&queues), (2, "b1".into()));
        // a2 waits until a1 is done, even with a worker free.
        assert!(queues.take().is_none());
        queues.push(2, job("b2")).unwrap();
        queues.done(2);
        queues.done(1);
        assert_eq!(take(&queues), (2, "b2".into()));
        assert_eq!(take(&queues), (1, "a2".into()));
        queues.done(2);
        queues.done(1);
        assert!(
            queues.lock().by_conn.is_empty(),
            "nothing kept per idle connection"
        );
    }

    #[test]
    fn the_queue_bound_is_over_all_connections() {
        let queues = Queues::new(2, 2, 2);
        queues.push(1, job("a")).unwrap();
        queues.push(2, job("b")).unwrap();
        assert_eq!(queues.push(3, job("c")).err(), Some(Refused::Full));
        // A job in flight no longer waits: its place is free.
        take(&queues);
        queues.push(3, job("c")).unwrap();
    }

    /// Issue 11 review: one socket's forwards filled the node's queue.
    #[test]
    fn one_connection_waits_at_most_its_share_and_others_still_queue() {
        let queues = Queues::new(10, 2, 10);
        queues.push(1, job("a1")).unwrap();
        queues.push(1, job("a2")).unwrap();
        assert_eq!(
            queues.push(1, job("a3")).err(),
            Some(Refused::ConnectionFull)
        );
        queues.push(2, job("b1")).unwrap();
        // In flight, a1 no longer waits: a share is free again.
        take(&queues);
        queues.push(1, job("a3")).unwrap();
        // And its disconnect is taken whatever waits.
        queues.push(1, job(ACTION_DISCONNECT)).unwrap();
    }

    /// Issue 11 review: a disconnect was dropped for a queue full of
    /// another socket's messages, although its connect had been sent.
    #[test]
    fn disconnect_events_are_taken_when_the_queue_is_full_within_the_reserve() {
        let queues = Queues::new(2, 2, 2);
        queues.push(1, job("a1")).unwrap();
        queues.push(1, job("a2")).unwrap();
        assert_eq!(
            queues.push(2, job(ACTION_CONNECT)).err(),
            Some(Refused::Full)
        );
        queues.push(3, job(ACTION_DISCONNECT)).unwrap();
        queues.push(4, job(ACTION_DISCONNECT)).unwrap();
        assert_eq!(
            queues.push(5, job(ACTION_DISCONNECT)).err(),
            Some(Refused::ReserveFull)
        );
        assert_eq!(queues.close(), 4);
        let sent = drain(&queues);
        assert_eq!(sent, ["a1", ACTION_DISCONNECT, ACTION_DISCONNECT, "a2"]);
    }

    /// Review of 2026-12-03: a closed socket's forwards kept their places
    /// in `backend.queue`, so a client that opened, sent and closed, again
    /// and again, filled it for everyone.
    #[test]
    fn a_departed_connections_forwards_leave_the_queue_and_go_last() {
        let queues = Queues::new(2, 2, 10);
        queues.push(1, job("a1")).unwrap();
        queues.push(1, job("a2")).unwrap();
        assert_eq!(queues.push(2, job("b1")).err(), Some(Refused::Full));
        assert_eq!(queues.left(1), 0);
        queues.push(2, job("b1")).unwrap();
        queues.push(3, job("c1")).unwrap();
        // Open connections first, then the departed one, in order.
        assert_eq!(take(&queues), (2, "b1".into()));
        assert_eq!(take(&queues), (3, "c1".into()));
        assert_eq!(take(&queues), (1, "a1".into()));
        queues.done(1);
        assert_eq!(take(&queues), (1, "a2".into()));
        queues.done(1);
        queues.done(2);
        queues.done(3);
        let state = queues.lock();
        assert!(state.by_conn.is_empty() && state.left.is_empty());
        assert_eq!((state.waiting, state.orphans), (0, 0));
    }

    #[test]
    fn the_departed_connections_room_is_bounded_and_their_disconnects_kept() {
        let queues = Queues::new(2, 2, 10);
        queues.push(1, job("a1")).unwrap();
        queues.push(1, job("a2")).unwrap();
        queues.push(1, job(ACTION_DISCONNECT)).unwrap();
        assert_eq!(queues.left(1), 0);
        queues.push(2, job("b1")).unwrap();
        queues.push(2, job("b2")).unwrap();
        // No room left for 2's: dropped, its place forgotten.
        assert_eq!(queues.left(2), 2);
        assert!(!queues.lock().by_conn.contains_key(&2));
        queues.push(3, job("c1")).unwrap();
        queues.push(3, job(ACTION_DISCONNECT)).unwrap();
        assert_eq!(queues.left(3), 1);
        assert_eq!(queues.close(), 4);
        let sent = drain(&queues);
        assert_eq!(sent, ["a1", ACTION_DISCONNECT, "a2", ACTION_DISCONNECT]);
        assert!(queues.ready.is_closed());
    }

    /// A connect event still waiting when its socket closes is never
    /// dropped for want of room: its disconnect event will be sent.
    #[test]
    fn a_departed_connections_connect_event_is_kept_with_its_disconnect() {
        let queues = Queues::new(1, 1, 10);
        queues.push(1, job("a1")).unwrap();
        assert_eq!(queues.left(1), 0);
        queues.push(2, job(ACTION_CONNECT)).unwrap();
        queues.push(2, job(ACTION_DISCONNECT)).unwrap();
        assert_eq!(queues.left(2), 0);
        let sent = drain(&queues);
        assert_eq!(sent, ["a1", ACTION_CONNECT, ACTION_DISCONNECT]);
    }

    #[test]
    fn a_connection_that_departs_with_a_job_in_flight_keeps_its_order() {
        let queues = Queues::new(4, 4, 4);
        queues.push(1, job("a1")).unwrap();
        assert_eq!(take(&queues), (1, "a1".into()));
        queues.push(1, job("a2")).unwrap();
        assert_eq!(queues.left(1), 0);
        queues.push(2, job("b1")).unwrap();
        assert!(queues.take().is_some_and(|(conn, _)| conn == 2));
        // a2 waits for a1, then goes.
        assert!(queues.take().is_none());
        queues.done(1);
        assert_eq!(take(&queues), (1, "a2".into()));
        queues.done(1);
        queues.done(2);
        assert!(queues.lock().left.is_empty());
    }

    #[test]
    fn closing_refuses_new_jobs_and_ends_the_workers_once_flushed() {
        let queues = Queues::new(4, 4, 4);
        queues.push(1, job("a")).unwrap();
        assert_eq!(queues.close(), 1);
        assert_eq!(queues.push(1, job("b")).err(), Some(Refused::Closed));
        assert!(!queues.ready.is_closed(), "the queued job is still sent");
        take(&queues);
        assert!(!queues.ready.is_closed(), "in flight");
        queues.done(1);
        assert!(queues.ready.is_closed());
    }

    #[test]
    fn event_body_has_the_message_shape() {
        let who = Identity {
            user: "ann".into(),
            group: None,
        };
        assert_eq!(
            event_body(&who, ACTION_CONNECT, None),
            r#"{"userId":"ann","groupId":null,"action":"wshub.connect","message":null,"recipients":[]}"#
        );
        let resumed = Report {
            result: Some(crate::outcome::ResumeResult::Recovered),
            replayed: 3,
        };
        assert_eq!(
            event_body(&who, ACTION_CONNECT, Some(&resumed.message())),
            r#"{"userId":"ann","groupId":null,"action":"wshub.connect","message":"{\"recovered\":true,\"replayed\":3}","recipients":[]}"#
        );
    }
}
