//! Server-side processing: what goes to the application backend, with which
//! headers, and what the sender hears when the backend fails. The backend is
//! a recording HTTP server on port 0.

mod common;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use common::{TestServer, test_config};
use serde_json::json;
use tokio::sync::{Mutex, mpsc};
use wshub::Config;

/// One request the test backend received.
#[derive(Debug)]
struct Seen {
    headers: HeaderMap,
    body: String,
}

/// A backend that records requests and answers `status` after `delay`.
struct TestBackend {
    url: String,
    seen: Mutex<mpsc::UnboundedReceiver<Seen>>,
}

impl TestBackend {
    async fn start(status: StatusCode, delay: Duration) -> Arc<Self> {
        let (tx, rx) = mpsc::unbounded_channel();
        let app = Router::new().fallback(move |headers: HeaderMap, body: Bytes| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(Seen {
                    headers,
                    body: String::from_utf8_lossy(&body).into_owned(),
                });
                tokio::time::sleep(delay).await;
                status
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "http://{}/app/__websocket.wwd",
            listener.local_addr().unwrap()
        );
        tokio::spawn(async move { axum::serve(listener, app).await });
        Arc::new(Self {
            url,
            seen: Mutex::new(rx),
        })
    }

    async fn next(&self) -> Seen {
        tokio::time::timeout(common::PATIENCE, self.seen.lock().await.recv())
            .await
            .expect("the backend received nothing")
            .unwrap()
    }
}

fn with_backend(url: &str, tweak: impl FnOnce(&mut Config)) -> Config {
    let mut config = test_config();
    config.backend = Config::load_from(None, [("WSHUB_BACKEND__URL".to_owned(), url.to_owned())])
        .unwrap()
        .backend;
    tweak(&mut config);
    config
}

fn header<'h>(seen: &'h Seen, name: &str) -> Option<&'h str> {
    seen.headers.get(name).map(|v| v.to_str().unwrap())
}

#[tokio::test]
async fn non_broadcast_actions_go_to_the_backend_with_the_senders_identity() {
    let backend = TestBackend::start(StatusCode::NO_CONTENT, Duration::ZERO).await;
    let server = TestServer::with(with_backend(&backend.url, |_| {})).await;
    let mut ann = server.connect("ann%20é", Some("room")).await;
    let mut other = server.connect("bob", Some("room")).await;

    // The body claims to be someone else: the headers tell the truth.
    let raw = r#"{"userId":"mallory","groupId":"room","action":"chat","message":"hi","recipients":[{"type":"group","value":"room"}]}"#;
    ann.send_text(raw).await;
    let seen = backend.next().await;
    assert_eq!(seen.body, raw, "the client's JSON, unchanged");
    assert_eq!(header(&seen, "content-type"), Some("application/json"));
    assert_eq!(
        header(&seen, "x-wshub-user-id"),
        Some("ann%20%C3%A9"),
        "percent-encoded UTF-8 of 'ann é'"
    );
    assert_eq!(header(&seen, "x-wshub-group-id"), Some("room"));
    let node = server.node.config.node_id.clone();
    assert_eq!(header(&seen, "x-wshub-node-id"), Some(node.as_str()));
    assert!(
        header(&seen, "x-wshub-connection-id")
            .unwrap()
            .starts_with(&format!("{node}-"))
    );

    // Not relayed by the hub: nobody received it.
    let tag = ann.send_sentinel().await;
    assert!(other.until_sentinel(&tag).await.is_empty());
    assert!(ann.until_sentinel(&tag).await.is_empty());
    assert_eq!(
        server.metric("wshub_backend_forwards_total{result=\"ok\"}"),
        1.0
    );
}

#[tokio::test]
async fn broadcast_in_any_case_is_relayed_and_not_forwarded() {
    let backend = TestBackend::start(StatusCode::NO_CONTENT, Duration::ZERO).await;
    let server = TestServer::with(with_backend(&backend.url, |_| {})).await;
    let mut ann = server.connect("ann", None).await;
    let mut bob = server.connect("bob", None).await;
    for action in ["broadcast", "BroadCast", "BROADCAST"] {
        ann.send_json(json!({"action": action, "message": action}))
            .await;
        assert_eq!(bob.recv().await["message"], action);
    }
    // The first thing the backend ever sees is the next forwarded message.
    ann.send_json(json!({"action": "marker"})).await;
    assert!(backend.next().await.body.contains("marker"));
}

#[tokio::test]
async fn the_null_group_sends_no_group_header() {
    let backend = TestBackend::start(StatusCode::NO_CONTENT, Duration::ZERO).await;
    let server = TestServer::with(with_backend(&backend.url, |_| {})).await;
    let mut ann = server.connect("ann", None).await;
    ann.send_json(json!({"action": "x"})).await;
    let seen = backend.next().await;
    assert_eq!(header(&seen, "x-wshub-group-id"), None);
    let mut empty = common::Client::connect(server.addr, "/ws?userid=e&groupid=").await;
    empty.send_json(json!({"action": "x"})).await;
    assert_eq!(header(&backend.next().await, "x-wshub-group-id"), Some(""));
}

/// Backend failures reach the sender as `wshub.error`; nobody else notices.
async fn failing_backend_case(backend_url: &str, timeout_ms: u64, want: &str) {
    let server = TestServer::with(with_backend(backend_url, |c| {
        c.backend.as_mut().unwrap().timeout = Duration::from_millis(timeout_ms);
    }))
    .await;
    let mut ann = server.connect("ann", Some("g")).await;
    let mut bob = server.connect("bob", Some("g")).await;
    ann.send_json(json!({"action": "doomed"})).await;
    let reply = ann.recv().await;
    assert_eq!(reply["action"], "wshub.error");
    let text = reply["message"].as_str().unwrap();
    assert!(
        text.contains("`doomed`") && text.contains(want),
        "{text:?} should mention {want:?}"
    );
    // Others are unaffected, and the sender's socket still works.
    let tag = ann.send_sentinel().await;
    assert!(bob.until_sentinel(&tag).await.is_empty());
    assert!(ann.until_sentinel(&tag).await.is_empty());
}

#[tokio::test]
async fn backend_answering_500_is_reported_to_the_sender() {
    let backend = TestBackend::start(StatusCode::INTERNAL_SERVER_ERROR, Duration::ZERO).await;
    failing_backend_case(&backend.url, 5_000, "answered 500").await;
}

#[tokio::test]
async fn backend_timing_out_is_reported_to_the_sender() {
    let backend = TestBackend::start(StatusCode::NO_CONTENT, Duration::from_secs(30)).await;
    failing_backend_case(&backend.url, 200, "did not answer in time").await;
}

#[tokio::test]
async fn backend_down_is_reported_to_the_sender() {
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    failing_backend_case(&format!("http://127.0.0.1:{port}/x"), 2_000, "unreachable").await;
}

#[tokio::test]
async fn a_slow_backend_never_blocks_the_read_loop() {
    let backend = TestBackend::start(StatusCode::NO_CONTENT, Duration::from_secs(30)).await;
    let server = TestServer::with(with_backend(&backend.url, |c| {
        let b = c.backend.as_mut().unwrap();
        b.timeout = Duration::from_secs(20);
        b.concurrency = 1;
        b.queue = 2;
    }))
    .await;
    let mut ann = server.connect("ann", None).await;
    // One request in flight (and stuck), two queued, the rest refused.
    for i in 0..5 {
        ann.send_json(json!({"action": format!("slow-{i}")})).await;
    }
    backend.next().await;
    let mut busy = 0;
    let tag = ann.send_sentinel().await;
    for m in ann.until_sentinel(&tag).await {
        assert_eq!(m["action"], "wshub.error");
        assert!(
            m["message"].as_str().unwrap().contains("backend busy"),
            "{m}"
        );
        busy += 1;
    }
    assert_eq!(busy, 2, "5 sent, 1 in flight, 2 queued");
    // And the socket answered the sentinel at once, with the backend stuck.
    assert_eq!(
        server.metric("wshub_backend_forwards_total{result=\"queue_full\"}"),
        2.0
    );
}

#[tokio::test]
async fn connect_and_disconnect_events_when_enabled() {
    let backend = TestBackend::start(StatusCode::NO_CONTENT, Duration::ZERO).await;
    let server = TestServer::with(with_backend(&backend.url, |c| {
        c.backend.as_mut().unwrap().events = true;
    }))
    .await;
    let ann = server.connect("ann", Some("room")).await;
    let seen = backend.next().await;
    assert_eq!(
        seen.body,
        r#"{"userId":"ann","groupId":"room","action":"wshub.connect","message":null,"recipients":[]}"#
    );
    assert_eq!(header(&seen, "x-wshub-user-id"), Some("ann"));
    let conn_id = header(&seen, "x-wshub-connection-id").unwrap().to_owned();
    ann.close().await;
    let seen = backend.next().await;
    assert!(
        seen.body.contains(r#""action":"wshub.disconnect""#),
        "{}",
        seen.body
    );
    assert_eq!(
        header(&seen, "x-wshub-connection-id"),
        Some(conn_id.as_str())
    );
}

#[tokio::test]
async fn without_a_backend_every_action_is_relayed() {
    let server = TestServer::start().await;
    let mut ann = server.connect("ann", None).await;
    ann.send_json(json!({"action": "anything"})).await;
    assert_eq!(ann.recv().await["action"], "anything");
}
