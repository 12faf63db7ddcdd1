//! Test harness: real servers on port 0 and real WebSocket clients.
//!
//! "Nothing else arrived" is never checked with a sleep. Instead a test sends
//! a *sentinel* that reaches everyone after the message under test, from the
//! same sender: per-sender order is guaranteed, so whatever a client receives
//! before the sentinel is everything the message under test gave it.

#![allow(dead_code)]

/// Tests that measure time against a promise ("within the lease + 1 s",
/// "1 s after churn stops") or load the machine on purpose (the chaos
/// runs) take this lock, so no two of them overlap: the harness runs tests
/// in parallel on two cores, and a chaos run beside a lease test measured
/// the machine, not the hub.
pub static TIMING_CRITICAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Polls `check` every 20 ms until it holds; fails after `within`. Returns
/// how long it took.
pub async fn within<F, Fut>(what: &str, within: Duration, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = std::time::Instant::now();
    loop {
        if check().await {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "not within {} ms: {what}",
            within.as_millis()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A port free now, for a server a test starts (`redis-server`, a sentinel,
/// nginx) or for one nobody is to listen on, and never one this process
/// handed out before: the kernel may give a port it gave a moment ago to
/// the next `bind` to port 0, and two Redis servers started on one port by
/// tests running side by side looked like one server to both (the second
/// exits, but its harness's `PING` is answered by the first). Two tests
/// then shared a Redis, and one's `CLIENT UNPAUSE` ended the other's
/// pause (CI failure at stop 45).
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// A WebSocket upgrade request for `url` (plain HTTP, for tests that read
/// the refusal's status and body rather than open a socket).
pub fn upgrade_request(http: &reqwest::Client, url: String) -> reqwest::RequestBuilder {
    http.get(url)
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
}

/// The history settings the resume and history tests start from: the
/// defaults of `[history]`, on.
pub fn history_settings() -> wshub::config::HistoryConfig {
    wshub::config::HistoryConfig {
        ttl: Duration::from_secs(120),
        size_all: 1000,
        size_group: 300,
        size_user: 100,
        max_replay: 1000,
        max_replay_bytes: 0,
        replay_budget_bytes: 256 << 20,
        drain_handoff: true,
    }
}

pub mod binary;
pub mod node;
pub mod process;
pub mod redis;
pub mod redis_tls;
pub mod routing;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};
use tokio_util::sync::CancellationToken;
use wshub::node::Node;
use wshub::{Config, Server};

/// How long a test waits for something that should happen promptly.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// Logs to the test output when `RUST_LOG` is set (`RUST_LOG=wshub=debug
/// cargo test ...`); silent otherwise.
pub fn init_logging() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

pub fn test_config() -> Config {
    let mut config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..Config::default()
    };
    // Spreading closes over the window is tested in tests/it/deploy.rs; here
    // a short one keeps shutdown tests quick.
    config.shutdown.drain_window = Duration::from_millis(100);
    // Order and load tests send hundreds of messages at once; rate limits
    // are tested, with their own settings, in tests/it/security.rs.
    config.limits.messages_per_second = 0;
    config.limits.fanout_bytes_per_second = 0;
    config
}

pub struct TestServer {
    pub addr: SocketAddr,
    pub node: Arc<Node>,
    pub shutdown: CancellationToken,
    pub handle: JoinHandle<Result<(), wshub::server::ServerError>>,
}

impl TestServer {
    pub async fn start() -> Self {
        Self::with(test_config()).await
    }

    /// A node on the Redis at `url`, once it reports ready.
    pub async fn on_redis(url: &str, tweak: impl FnOnce(&mut Config)) -> Self {
        let mut config = test_config();
        let sharded = url.contains(',');
        let env = [
            ("WSHUB_REDIS__URL".to_owned(), url.to_owned()),
            ("WSHUB_REDIS__SHARDED".to_owned(), sharded.to_string()),
        ];
        config.redis = Config::load_from(None, env).expect("redis config").redis;
        tweak(&mut config);
        let server = Self::with(config).await;
        server.wait_ready().await;
        server
    }

    /// Waits until /readyz answers 200.
    pub async fn wait_ready(&self) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            if self.node.readiness().is_ok() {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "node never became ready: {:?}",
                self.node.readiness()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub async fn with(config: Config) -> Self {
        init_logging();
        let server = Server::bind(config).await.expect("bind");
        let addr = server.local_addr();
        let node = server.node().clone();
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(server.run(shutdown.clone().cancelled_owned()));
        Self {
            addr,
            node,
            shutdown,
            handle,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub async fn connect(&self, user: &str, group: Option<&str>) -> Client {
        let query = match group {
            Some(g) => format!("userid={user}&groupid={g}"),
            None => format!("userid={user}"),
        };
        Client::connect(self.addr, &format!("/__initializeWebSocket.wc?{query}")).await
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        reqwest::get(self.url(path)).await.expect("GET")
    }

    pub async fn post(&self, path: &str, body: impl Into<reqwest::Body>) -> reqwest::Response {
        reqwest::Client::new()
            .post(self.url(path))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("POST")
    }

    /// The value of one unlabelled series in /metrics (0 when absent).
    pub fn metric(&self, series: &str) -> f64 {
        self.node
            .metrics
            .render()
            .lines()
            .find_map(|l| {
                l.strip_prefix(series)
                    .and_then(|rest| rest.strip_prefix(' '))
            })
            .map(|v| v.trim().parse().unwrap())
            .unwrap_or(0.0)
    }
}

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

pub struct Client {
    pub ws: Ws,
}

/// Sentinel tags are unique in the process, so a client never mistakes
/// another client's sentinel (or its own earlier one) for the one awaited.
static SENTINELS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// What a client saw when its socket ended.
#[derive(Debug, PartialEq)]
pub enum Ended {
    Closed(u16, String),
    /// The TCP connection ended without a close frame.
    Dropped,
}

impl Client {
    pub async fn connect(addr: SocketAddr, path_and_query: &str) -> Self {
        let (ws, response) = connect_async(format!("ws://{addr}{path_and_query}"))
            .await
            .expect("websocket connect");
        assert_eq!(response.status(), 101);
        Self { ws }
    }

    pub async fn send_text(&mut self, text: impl Into<String>) {
        self.ws
            .send(Message::text(text.into()))
            .await
            .expect("send");
    }

    pub async fn send_json(&mut self, value: Value) {
        self.send_text(value.to_string()).await;
    }

    /// Next text frame, raw (pings and pongs skipped).
    pub async fn recv_text(&mut self) -> String {
        loop {
            let msg = tokio::time::timeout(PATIENCE, self.ws.next())
                .await
                .expect("timed out waiting for a message")
                .expect("socket ended")
                .expect("socket error");
            match msg {
                Message::Text(t) => return t.to_string(),
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    }

    pub async fn recv(&mut self) -> Value {
        serde_json::from_str(&self.recv_text().await).expect("frame is JSON")
    }

    /// Sends a message to everyone that every client collects up to with
    /// [`until_sentinel`](Self::until_sentinel). Its action is `broadcast`,
    /// which the hub relays even when it has a backend.
    pub async fn send_sentinel(&mut self) -> String {
        let n = SENTINELS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tag = format!("sentinel-{n}");
        self.send_json(json!({"action": "broadcast", "message": tag}))
            .await;
        tag
    }

    /// Every message received before the sentinel `tag`.
    pub async fn until_sentinel(&mut self, tag: &str) -> Vec<Value> {
        let mut seen = Vec::new();
        loop {
            let msg = self.recv().await;
            if msg["action"] == "broadcast" && msg["message"] == tag {
                return seen;
            }
            seen.push(msg);
        }
    }

    /// Waits for the socket to end, skipping data frames.
    pub async fn ended(&mut self) -> Ended {
        loop {
            match tokio::time::timeout(PATIENCE, self.ws.next())
                .await
                .expect("timed out waiting for the socket to close")
            {
                Some(Ok(Message::Close(Some(frame)))) => {
                    return Ended::Closed(u16::from(frame.code), frame.reason.to_string());
                }
                Some(Ok(Message::Close(None))) => return Ended::Closed(1005, String::new()),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return Ended::Dropped,
            }
        }
    }

    pub async fn close(mut self) {
        let _ = self
            .ws
            .close(Some(tokio_tungstenite::tungstenite::protocol::CloseFrame {
                code: CloseCode::Normal,
                reason: "bye".into(),
            }))
            .await;
    }
}

/// Waits until `condition` holds, checking every few milliseconds; fails the
/// test after [`PATIENCE`]. For state that changes without a message to
/// wait on (a counter, a connection count).
pub async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A log destination the test reads: every line written so far, as JSON.
#[derive(Clone, Default)]
pub struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    /// Captures what this thread logs at `WARN` and above while the guard
    /// lives (in-process nodes on a `current_thread` runtime log here).
    pub fn warnings() -> (Self, tracing::subscriber::DefaultGuard) {
        Self::at(tracing::Level::WARN)
    }

    /// Captures what this thread logs at `level` and above.
    ///
    /// `tracing` caches each callsite's interest process-wide, computed on
    /// the thread that first reaches it: a test on another thread with no
    /// subscriber made it `never`, and this thread's capture then missed
    /// the event (seen when tests ran in parallel). A global subscriber
    /// that is always asked per event ([`PerEvent`]) keeps every callsite
    /// asking the current thread's.
    pub fn at(level: tracing::Level) -> (Self, tracing::subscriber::DefaultGuard) {
        static GLOBAL: std::sync::Once = std::sync::Once::new();
        GLOBAL.call_once(|| {
            // Fails only when `init_logging` set one (RUST_LOG): fine.
            let _ = tracing::subscriber::set_global_default(PerEvent);
        });
        let captured = Self::default();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_max_level(level)
            .with_writer({
                let captured = captured.clone();
                move || captured.clone()
            })
            .finish();
        let guard = tracing::subscriber::set_default(subscriber);
        tracing::callsite::rebuild_interest_cache();
        (captured, guard)
    }

    /// The lines whose message starts with `message`.
    pub fn lines(&self, message: &str) -> Vec<serde_json::Value> {
        String::from_utf8_lossy(&self.0.lock().unwrap())
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| {
                v["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with(message))
            })
            .collect()
    }
}

/// A global subscriber that records nothing and tells every callsite to
/// ask per event (`Interest::sometimes`), so that no callsite's interest
/// is cached as `never` for the process ([`Captured::at`]).
struct PerEvent;

impl tracing::Subscriber for PerEvent {
    fn register_callsite(
        &self,
        _: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        tracing::subscriber::Interest::sometimes()
    }
    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        Some(tracing::level_filters::LevelFilter::TRACE)
    }
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        false
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, _: &tracing::Event<'_>) {}
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// A node configuration with history on (`redis.url` is only there to pass
/// validation: the test server's own Redis settings are kept).
pub fn with_history(c: &mut Config) {
    c.history = Config::load_from(
        None,
        [
            ("WSHUB_HISTORY__ENABLED".to_owned(), "true".to_owned()),
            (
                "WSHUB_REDIS__URL".to_owned(),
                "redis://127.0.0.1:1".to_owned(),
            ),
        ],
    )
    .unwrap()
    .history;
}
