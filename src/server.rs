//! Binding the listener, serving, and shutting down in order.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tower::Service;
use tracing::{debug, info, trace, warn};

use crate::admission::{HttpConnections, HttpSlot};
use crate::config::Config;
use crate::logging::{Untrusted, error_chain};
use crate::metrics::Metrics;
use crate::node::{Node, StartError};
use crate::outcome::HeadError;
use crate::refusal_log::{RefusalLog, Verdict};

/// Why the server could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The listen address could not be bound (in use, no permission).
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// Why binding failed.
        source: std::io::Error,
    },
    /// The node could not start; the error says which part and why.
    #[error(transparent)]
    Start(#[from] StartError),
    /// The HTTP server failed while running.
    #[error("server failed: {0}")]
    Serve(#[from] std::io::Error),
}

/// A listener on `addr` whose accept queue holds `backlog` connections.
///
/// `TcpListener::bind` listens with the standard library's backlog of 128:
/// a burst of connects beyond that (a reconnect storm after a node restart,
/// a load balancer moving pages over) overflows the queue, and each
/// connection that overflowed waits for its SYN to be retransmitted, a
/// second and more later (docs/architecture.md, "The accept queue", has
/// the measurement). `SO_REUSEADDR` as `bind` sets it, so a restarted node
/// rebinds at once.
fn listen(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// A bound, not yet running server.
pub struct Server {
    listener: TcpListener,
    node: Arc<Node>,
}

impl Server {
    /// Raises the soft open-file limit to the hard one (logged), binds
    /// `config.listen` (port 0 picks a free port) with a backlog of
    /// `config.listen_backlog`, and builds the node.
    pub async fn bind(config: Config) -> Result<Self, ServerError> {
        raise_open_file_limit();
        let addr = config.listen;
        let listener = listen(addr, config.listen_backlog)
            .map_err(|source| ServerError::Bind { addr, source })?;
        Ok(Self {
            listener,
            node: Node::new(config)?,
        })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        // A bound TCP listener always has a local address.
        self.listener
            .local_addr()
            .expect("bound listener has an address")
    }

    /// The node this server runs.
    pub fn node(&self) -> &Arc<Node> {
        &self.node
    }

    /// Serves until `shutdown` resolves, then shuts the node down with
    /// [`Node::shutdown`]`(shutdown.drain_window, shutdown.grace_period)`
    /// (which stops this server's HTTP once the sockets are drained) and
    /// returns once every task the node started has ended.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServerError> {
        let Self { listener, node } = self;
        // One line of effective settings, secrets redacted (config::Settings).
        let s = node.config.settings();
        info!(addr = %listener.local_addr()?, node = %node.config.node_id, version = s.version,
            bus = %s.bus, backend = %s.backend, broadcast = %s.broadcast, auth = %s.auth,
            "wshub listening");
        let router = crate::http::router(node.clone());
        // The node stops HTTP (through this token) once its sockets are
        // drained, and waits for its tasks (this loop and every
        // connection's): HTTP keeps answering while the node drains, so
        // load balancers see /readyz turn 503 and new sockets are refused
        // with 503, not reset.
        let http = node.http_shutdown().clone();
        let mut acceptor = Acceptor::new(listener, node.config.tcp_nodelay);
        let http1 = Arc::new(http1_builder(node.config.http.header_read_timeout));
        let head_errors = Arc::new(HeadErrors {
            metrics: node.metrics.clone(),
            log: RefusalLog::default(),
        });
        let per_ip = HttpConnections::new(
            node.config.limits.max_http_connections_per_ip,
            node.config.limits.ipv6_prefix_len,
            node.config.auth.trusted_proxies.clone(),
            node.metrics.clone(),
        );
        let mut serve = http.clone().spawn(async move {
            let stop = http.token().clone();
            loop {
                let (io, peer) = tokio::select! {
                    accepted = acceptor.accept() => accepted,
                    () = stop.cancelled() => break,
                };
                let Ok(slot) = per_ip.admit(peer.ip()) else {
                    refuse_at_once(&io);
                    continue;
                };
                http.spawn(serve_connection(
                    io,
                    peer,
                    router.clone(),
                    http1.clone(),
                    head_errors.clone(),
                    stop.clone(),
                    slot,
                ));
            }
        });
        let config = &node.config.shutdown;

        tokio::select! {
            () = shutdown => {}
            result = &mut serve => {
                // The accept loop only ends early if it panicked: close
                // every socket at once and flush, as on shutdown.
                node.shutdown(Duration::ZERO, config.grace_period).await;
                let why = match result {
                    Err(e) => format!("the accept loop failed: {e}"),
                    Ok(()) => "the accept loop stopped unexpectedly".to_owned(),
                };
                return Err(std::io::Error::other(why).into());
            }
        }

        info!(
            open_sockets = node.connections(),
            window_ms = config.drain_window.as_millis() as u64,
            "shutting down: draining"
        );
        node.shutdown(config.drain_window, config.grace_period)
            .await;
        info!("shutdown complete");
        Ok(())
    }
}

/// How long the accept loop waits after a failed accept, at first and at
/// most (it doubles while accepts keep failing).
const ACCEPT_RETRY: (Duration, Duration) = (Duration::from_millis(10), Duration::from_millis(200));

/// The listener the accept loop takes connections from: tokio's, with
/// failed accepts handled here.
///
/// `axum::serve`'s loop, which served the node before, logged every
/// failed accept at error level and then slept a whole second. At the
/// open-file limit (`EMFILE`: a node full of sockets, plus requests that
/// are not) that made the node deaf for a second at a time, `/readyz`
/// included, long after a descriptor was free again. Here a failed
/// accept is retried after 10 ms, doubling up to 200 ms while it keeps
/// failing (never a busy loop), one warning is logged when the failures
/// start and one info line when accepting works again. A connection that
/// failed while being accepted (reset, aborted by the peer) is skipped at
/// once. Each accepted connection gets `TCP_NODELAY` unless `tcp_nodelay`
/// is off.
struct Acceptor {
    listener: TcpListener,
    /// Failed accepts since the last one that worked.
    failures: u64,
    /// `TCP_NODELAY` on each accepted connection (`tcp_nodelay`).
    nodelay: bool,
}

impl Acceptor {
    fn new(listener: TcpListener, nodelay: bool) -> Self {
        Self {
            listener,
            failures: 0,
            nodelay,
        }
    }
}

impl Acceptor {
    /// The next connection, waiting (and retrying, as above) until one
    /// is accepted.
    async fn accept(&mut self) -> (TcpStream, SocketAddr) {
        let mut pause = ACCEPT_RETRY.0;
        loop {
            match self.listener.accept().await {
                Ok(accepted) => {
                    // Frames leave when they are written, not when the peer
                    // has acknowledged the last one (`tcp_nodelay`;
                    // docs/architecture.md, "Nagle's algorithm").
                    if self.nodelay
                        && let Err(error) = accepted.0.set_nodelay(true)
                    {
                        debug!(%error, "cannot set TCP_NODELAY on an accepted connection");
                    }
                    if self.failures > 0 {
                        info!(failures = self.failures, "accepting connections again");
                        self.failures = 0;
                    }
                    return accepted;
                }
                Err(e) if is_connection_error(&e) => {}
                Err(error) => {
                    if self.failures == 0 {
                        warn!(%error, retry_ms = pause.as_millis() as u64,
                            "cannot accept connections (at the open-file limit?): retrying until a descriptor is free");
                    }
                    self.failures += 1;
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(ACCEPT_RETRY.1);
                }
            }
        }
    }
}

/// The HTTP/1 settings every connection is served with, made once for
/// all of them (made per connection, the timer's `Arc` cost an
/// allocation a connect).
///
/// A connection that has not sent a whole request head within
/// `header_timeout` of opening or of its last response is closed
/// (`http.header_read_timeout_ms`).
///
/// Responses keep hyper's vectored writes (its default for a
/// `TcpStream`), though a 101 then goes out with `writev` rather than
/// the cheaper `send`: with `writev(false)` hyper copies every body into
/// the connection's write buffer and never shrinks it, so each
/// keep-alive connection held as much memory as the largest response it
/// had been sent (the API's listings and history reach megabytes) until
/// it closed (docs/architecture.md, "The connect path").
///
/// A client that half-closes its side (shuts down writing) before the
/// answer has arrived gets none: hyper's default, which stops the work
/// of a request whose client has gone (`half_close(false)`, as
/// `axum::serve` had it).
///
/// A request head (request line and headers) over [`MAX_HEAD_BYTES`] is
/// answered 431 and the connection closed. hyper's own bound is its read
/// buffer's, about 400 KiB, which an unfinished head holds until the
/// header timeout: a review held 200 such heads from one address and the
/// node grew by 89 MB. The read buffer is bounded to the same (one byte
/// more, so that a head of exactly [`MAX_HEAD_BYTES`] still fits): hyper
/// grows it by doubling towards its own bound, and an unfinished head
/// just under 64 KiB held about 134 KiB a connection; bounded, about 79
/// (`bench/misc/head-memory.py`; review of 2026-12-03). The bound is also
/// how much of a response hyper queues before writing, which only makes
/// it write a large response in more pieces.
fn http1_builder(header_timeout: Option<Duration>) -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .max_header_size(MAX_HEAD_BYTES)
        .max_buf_size(MAX_HEAD_BYTES + 1);
    builder
}

/// The largest request head the node reads: 64 KiB, four times what
/// Node.js (16 KiB) and more than nginx (a line of 8 KiB, 32 in all) and
/// IIS (16 KiB of headers) take by default, so whatever a proxy passes
/// on fits, with a long `resume=` query or a token in the headers.
pub(crate) const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Serves one accepted connection with hyper's HTTP/1 (upgrades allowed)
/// and the router, until the peer closes it or it is upgraded (the
/// session then runs on a task of its own, [`crate::http`]); once `stop`
/// is cancelled, the request in flight is answered and the connection
/// closed.
///
/// HTTP/1 only, as wshub served before (axum's default features have no
/// HTTP/2), but without the version sniffing of hyper-util's automatic
/// builder: it read a connection's first 24 bytes on their own, so
/// every connect took two reads and a grown read buffer (8 KiB, then
/// more than 16, in fresh pages) where one read into one buffer does.
/// A connection that starts with HTTP/2's preface is closed, as it was
/// (hyper recognises the preface). Each request carries the peer's
/// address as axum's `ConnectInfo`, as `into_make_service_with_connect_info`
/// gave it.
async fn serve_connection(
    io: TcpStream,
    peer: SocketAddr,
    router: axum::Router,
    http1: Arc<http1::Builder>,
    head_errors: Arc<HeadErrors>,
    stop: CancellationToken,
    // Held until the connection ends or becomes a socket (the future below
    // ends at the upgrade).
    _slot: Option<HttpSlot>,
) {
    // Whether a whole request head has arrived on this connection yet
    // (see the shutdown below). Borrowed by the service: no allocation.
    let headed = AtomicBool::new(false);
    let noted = &headed;
    let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
        request.extensions_mut().insert(ConnectInfo(peer));
        noted.store(true, Ordering::Relaxed);
        // The router is always ready (axum's `Router::poll_ready`).
        router.clone().call(request)
    });
    let connection = http1
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    let mut connection = std::pin::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = stop.cancelled() => {
            // hyper closes an idle keep-alive connection at once (one
            // reading the next request's head too), and one answering a
            // request once the answer is written, within the node's grace
            // period. But it waits for the first head of a new connection:
            // half a head from any client held the exit for the whole grace
            // period (reviewer). Such a connection is given a moment, and
            // closed if its head has still not come. (Counting requests
            // being handled instead cut responses still being written to a
            // slow reader: the body is done before its bytes are sent.)
            connection.as_mut().graceful_shutdown();
            loop {
                match tokio::time::timeout(SHUTDOWN_LINGER, connection.as_mut()).await {
                    Ok(result) => break result,
                    Err(_) if headed.load(Ordering::Relaxed) => {}
                    Err(_) => break Ok(()),
                }
            }
        }
    };
    if let Err(error) = result {
        head_errors.note(peer, &error);
    }
}

/// What the HTTP library refused on a connection: a request head that
/// never reached the router, where wshub's own refusals are counted and
/// logged ([`crate::http`]). A head too large (431), not HTTP (400),
/// HTTP/2's preface (closed) or too slow (closed).
///
/// Each is counted in `wshub_http_connection_errors_total{kind}`. The
/// first three are logged at warn, one line per peer address and kind a
/// minute like the router's refusals ([`crate::refusal_log`], a log of
/// its own): a browser whose cookies outgrew the head's bound gets 431
/// with an empty body, and before this nothing on the node said so.
/// A head timeout is logged at debug only: it also ends unused
/// preconnects and idle keep-alive connections, which are nobody's fault.
/// Any other error (a reset, a request cut off) is the client's doing
/// and logged at trace, as axum did.
struct HeadErrors {
    metrics: Arc<Metrics>,
    log: RefusalLog,
}

impl HeadErrors {
    fn note(&self, peer: SocketAddr, error: &hyper::Error) {
        let kind = if error.is_parse_too_large() {
            HeadError::TooLarge
        } else if error.is_parse_version_h2() {
            HeadError::Http2
        } else if error.is_parse() {
            HeadError::Malformed
        } else if error.is_timeout() {
            HeadError::Timeout
        } else {
            trace!(%error, %peer, "connection ended with an error");
            return;
        };
        self.metrics.head_error(kind);
        if kind == HeadError::Timeout {
            debug!(peer = %peer.ip(), "connection closed: no whole request head within http.header_read_timeout_ms");
            return;
        }
        let kind = kind.label();
        // Tokio's clock, as the router's refusals use.
        let now = tokio::time::Instant::now().into_std();
        if let Verdict::Log {
            suppressed,
            overflow,
        } = self.log.note(Some(peer.ip()), kind, now)
        {
            // hyper's own words (fixed texts, nothing the client sent),
            // quoted in text logs as the router's reasons are.
            let peer = peer.ip();
            let error = error.to_string();
            let error = Untrusted(&error);
            if overflow {
                warn!(%peer, kind, %error, suppressed,
                    "request refused by the HTTP layer (the refusal log is full: new peers share one line per minute)");
            } else {
                warn!(%peer, kind, %error, suppressed, "request refused by the HTTP layer");
            }
        }
    }
}

/// How long a connection that has not sent a whole request head is given
/// at shutdown ([`serve_connection`]).
const SHUTDOWN_LINGER: Duration = Duration::from_millis(500);

/// The answer to a connection over `limits.max_http_connections_per_ip`,
/// written before any of its request is read (the socket's send buffer is
/// empty: the write does not wait), then the connection is closed.
fn refuse_at_once(io: &TcpStream) {
    const ANSWER: &[u8] = b"HTTP/1.1 429 Too Many Requests\r\nConnection: close\r\nContent-Type: text/plain\r\nContent-Length: 50\r\n\r\ntoo many open connections from this client address";
    let _ = io.try_write(ANSWER);
}

/// A failed accept that concerns that one connection only.
fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    )
}

/// Raises this process's soft open-file limit to its hard limit
/// ([`crate::admission::raise_open_file_limit`]) and logs both, before the
/// node computes its capacity from it. Failing to raise it is logged and
/// the node runs with the limit it has.
fn raise_open_file_limit() {
    let limit = |l: Option<u64>| l.map_or_else(|| "unlimited".to_owned(), |n| n.to_string());
    match crate::admission::raise_open_file_limit() {
        Ok((before, after)) if before.soft != after.soft => info!(
            soft = %limit(after.soft),
            hard = %limit(after.hard),
            was = %limit(before.soft),
            "open-file limit raised to the hard limit"
        ),
        Ok((_, after)) => info!(
            soft = %limit(after.soft),
            hard = %limit(after.hard),
            "open-file limit already at the hard limit"
        ),
        Err(error) => {
            warn!(%error, "cannot raise the open-file limit; the node keeps the one it has")
        }
    }
}

/// Whether the node configured by `config` answers `GET /healthz` with 200
/// within two seconds, on the loopback address when it listens on all;
/// if not, why, in one line (printed by `wshub healthcheck`, which a
/// container's health log keeps: an exit code alone did not tell a refused
/// connection from a timeout or a 503, review of 2026-12-03).
pub async fn healthcheck(config: &Config) -> Result<(), String> {
    let mut addr = config.listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let url = format!("http://{addr}/healthz");
    // The node is on this machine: never through a proxy from the
    // environment (a container inherits `HTTP_PROXY` from the machine that
    // started it, and a live node was reported unhealthy).
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(2))
        .no_proxy()
        .build()
        .map_err(|e| format!("cannot make an HTTP client: {}", error_chain(&e)))?;
    match client.get(&url).send().await {
        Ok(r) if r.status().is_success() => Ok(()),
        Ok(r) => Err(format!("{url} answered {}", r.status())),
        Err(e) if e.is_timeout() => Err(format!("{url} did not answer within 2 s")),
        // reqwest's own text repeats the URL: its causes say why.
        Err(e) => Err(match std::error::Error::source(&e) {
            Some(cause) => format!("no answer from {url}: {}", error_chain(cause)),
            None => format!("no answer from {url}: {e}"),
        }),
    }
}

/// Binds and runs a node until `shutdown` resolves.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    Server::bind(config).await?.run(shutdown).await
}
