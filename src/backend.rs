//! Server-side processing: client messages whose action is not `broadcast`
//! go to the application's backend over HTTP, as in Web Connection.
//!
//! Each forward is a `POST` of the client's JSON, unchanged, to
//! `backend.url`, with the sending connection's verified identity in
//! headers ([`HEADER_USER_ID`] and friends) so the backend never has to
//! trust ids in the body. The backend answers through the broadcast
//! endpoint; its HTTP response is ignored (a 2xx means success).
//!
//! Forwarding never blocks a socket: jobs go into a bounded queue that a
//! dispatcher drains with at most `backend.concurrency` requests in flight,
//! each bounded by `backend.timeout_ms`. When the queue is full, the backend
//! is down, slow or answers an error, the sender receives a `wshub.error`
//! saying so, the failure is counted, and a burst of failures is logged once
//! (and its end once). Forwards are **not retried**: a message is not known
//! to be idempotent, and its sender has been told and may send it again.
//!
//! With `backend.events`, the hub also posts `wshub.connect` and
//! `wshub.disconnect` messages (same shape, same headers) when sockets open
//! and close, so the backend learns who arrived — which Web Connection's hub
//! never tells it.

use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};

use axum::body::Bytes;
use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use tokio::sync::{Semaphore, mpsc};
use tracing::{info, warn};

use crate::config::BackendConfig;
use crate::hub::Conn;
use crate::message::{Message, error_frame};
use crate::metrics::Metrics;
use crate::route::Identity;

/// The sender's user id (percent-encoded UTF-8).
pub const HEADER_USER_ID: &str = "x-wshub-user-id";
/// The sender's group id (percent-encoded); absent for the null group.
pub const HEADER_GROUP_ID: &str = "x-wshub-group-id";
/// The node holding the sender's socket.
pub const HEADER_NODE_ID: &str = "x-wshub-node-id";
/// The sender's connection, unique in the cluster: `<node id>-<number>`.
pub const HEADER_CONNECTION_ID: &str = "x-wshub-connection-id";

/// The reserved action of the connect event.
pub const ACTION_CONNECT: &str = "wshub.connect";
/// The reserved action of the disconnect event.
pub const ACTION_DISCONNECT: &str = "wshub.disconnect";

/// Bytes escaped in identity headers: controls, space (HTTP trims it at
/// the ends of a value), non-ASCII (by
/// `utf8_percent_encode` itself), and `%` so that decoding is unambiguous.
const HEADER_ESCAPES: &AsciiSet = &CONTROLS.add(b' ').add(b'%').add(b'\x7f');

/// What happened to a forward (the `result` label of
/// `wshub_backend_forwards_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardResult {
    Ok,
    /// The backend answered with a non-2xx status.
    Status,
    /// No answer within `backend.timeout_ms`.
    Timeout,
    /// Could not connect or the connection failed.
    Unreachable,
    /// The queue was full; never sent.
    QueueFull,
}

impl ForwardResult {
    /// Every result, for initialising metrics.
    pub const ALL: [ForwardResult; 5] = [
        Self::Ok,
        Self::Status,
        Self::Timeout,
        Self::Unreachable,
        Self::QueueFull,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Status => "status",
            Self::Timeout => "timeout",
            Self::Unreachable => "unreachable",
            Self::QueueFull => "queue_full",
        }
    }
}

struct Job {
    body: Bytes,
    headers: HeaderMap,
    /// What to call the job in the sender's error message.
    action: String,
    /// The sender, told when the forward fails; `None` for events.
    sender: Option<Weak<Conn>>,
}

/// The connection to the application's backend.
pub struct Backend {
    jobs: mpsc::Sender<Job>,
    node_id: Arc<str>,
    pub events: bool,
    metrics: Arc<Metrics>,
}

impl Backend {
    /// Starts the dispatcher. Requires a Tokio runtime.
    pub fn start(
        config: &BackendConfig,
        node_id: Arc<str>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.timeout)
            .build()?;
        let (jobs, queue) = mpsc::channel(config.queue);
        let dispatcher = Dispatcher {
            client,
            url: config.url.clone(),
            limit: Arc::new(Semaphore::new(config.concurrency)),
            metrics: metrics.clone(),
            failing: Arc::new(AtomicBool::new(false)),
        };
        tokio::spawn(dispatcher.run(queue));
        Ok(Self {
            jobs,
            node_id,
            events: config.events,
            metrics,
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
        put(
            HEADER_CONNECTION_ID,
            &format!("{}-{}", self.node_id, conn.id),
        );
        headers
    }

    /// Forwards a client message (its JSON as received). On any failure the
    /// sender gets a `wshub.error`.
    pub fn forward(&self, conn: &Arc<Conn>, text: &str, action: &str) {
        let job = Job {
            body: Bytes::copy_from_slice(text.as_bytes()),
            headers: self.headers(conn),
            action: action.to_owned(),
            sender: Some(Arc::downgrade(conn)),
        };
        if self.jobs.try_send(job).is_err() {
            self.metrics.backend_forward(ForwardResult::QueueFull);
            conn.offer(error_frame(&format!(
                "backend busy: `{action}` was not delivered to the application, try again"
            )));
        }
    }

    /// Posts a `wshub.connect` or `wshub.disconnect` event, if enabled.
    pub fn event(&self, conn: &Conn, action: &'static str) {
        if !self.events {
            return;
        }
        let body = event_body(&conn.who, action);
        let job = Job {
            body: Bytes::from(body),
            headers: self.headers(conn),
            action: action.to_owned(),
            sender: None,
        };
        if self.jobs.try_send(job).is_err() {
            self.metrics.backend_forward(ForwardResult::QueueFull);
        }
    }
}

/// The JSON of an event: the message shape with the connection's ids.
pub fn event_body(who: &Identity, action: &str) -> String {
    Message {
        user_id: Some(Cow::Borrowed(&who.user)),
        group_id: who.group.as_deref().map(Cow::Borrowed),
        action: Some(Cow::Borrowed(action)),
        ..Message::default()
    }
    .encode()
    .to_string()
}

struct Dispatcher {
    client: reqwest::Client,
    url: String,
    limit: Arc<Semaphore>,
    metrics: Arc<Metrics>,
    /// Whether the last forward failed (to log a burst once).
    failing: Arc<AtomicBool>,
}

impl Dispatcher {
    async fn run(self, mut queue: mpsc::Receiver<Job>) {
        let this = Arc::new(self);
        while let Some(job) = queue.recv().await {
            // Waiting here, with the queue filling behind us, is how a slow
            // backend turns into "backend busy" for new senders.
            let Ok(permit) = this.limit.clone().acquire_owned().await else {
                return;
            };
            let this = this.clone();
            tokio::spawn(async move {
                this.send(job).await;
                drop(permit);
            });
        }
    }

    async fn send(&self, job: Job) {
        let outcome = self
            .client
            .post(&self.url)
            .headers(job.headers)
            .body(job.body)
            .send()
            .await;
        let (result, problem) = match outcome {
            Ok(resp) if resp.status().is_success() => (ForwardResult::Ok, String::new()),
            Ok(resp) => (
                ForwardResult::Status,
                format!("the backend answered {}", resp.status()),
            ),
            Err(e) if e.is_timeout() => (
                ForwardResult::Timeout,
                "the backend did not answer in time".into(),
            ),
            Err(e) => (
                ForwardResult::Unreachable,
                format!("the backend is unreachable ({e})"),
            ),
        };
        self.metrics.backend_forward(result);
        if result == ForwardResult::Ok {
            if self.failing.swap(false, Ordering::Relaxed) {
                info!("backend forwards succeed again");
            }
            return;
        }
        if !self.failing.swap(true, Ordering::Relaxed) {
            warn!(url = %self.url, result = result.label(), %problem,
                "backend forwards failing (logged once per burst; see wshub_backend_forwards_total)");
        }
        if let Some(conn) = job.sender.and_then(|w| w.upgrade()) {
            conn.offer(error_frame(&format!(
                "backend error: `{}` was not processed: {problem}",
                job.action
            )));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn event_body_has_the_message_shape() {
        let who = Identity {
            user: "ann".into(),
            group: None,
        };
        assert_eq!(
            event_body(&who, ACTION_CONNECT),
            r#"{"userId":"ann","groupId":null,"action":"wshub.connect","message":null,"recipients":[]}"#
        );
    }
}
