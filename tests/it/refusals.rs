//! Issue 17, "Refusals are visible" and "Identity leaves the hub only where
//! it must": refused pushes and upgrades are logged at warn, one line per
//! peer and reason per minute, with no token or key in it; client ids are
//! logged at debug only; and no configured secret reaches the log. Over the
//! real binary, reading its stderr.

use std::net::{IpAddr, SocketAddr};

use serde_json::{Value, json};

use crate::common::binary::Binary;
use crate::common::{Captured, Client};

fn refused_lines(binary: &Binary, label: &str) -> Vec<Value> {
    binary.matching(|v| v["message"] == "request refused" && v["label"] == label)
}

/// This host's address on a non-loopback interface: pushes from loopback
/// are always allowed, so a 403 needs another source address.
fn non_loopback_ip() -> IpAddr {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
    // A UDP "connect" sends nothing; it only picks the source address.
    socket
        .connect("192.0.2.200:9")
        .expect("a route off loopback");
    let ip = socket.local_addr().unwrap().ip();
    assert!(
        !ip.is_loopback(),
        "this test needs a non-loopback interface"
    );
    ip
}

#[tokio::test]
async fn a_forbidden_push_is_logged_once_per_peer_and_reason() {
    let ip = non_loopback_ip();
    let binary = Binary::start("info", &[("WSHUB_LISTEN", "0.0.0.0:0")]);
    let url = format!(
        "http://{}/__broadcastWebSocket.wc",
        SocketAddr::new(ip, binary.addr.port())
    );
    let client = reqwest::Client::new();
    let push = || {
        client
            .post(&url)
            .body(r#"{"action":"x","message":"y"}"#)
            .send()
    };
    let response = push().await.unwrap();
    assert_eq!(response.status(), 403);
    let line = binary.wait_for("the 403", |v| v["message"] == "request refused");
    assert_eq!(line["level"], "WARN", "{line}");
    assert_eq!(line["peer"], ip.to_string(), "{line}");
    assert_eq!(line["status"], 403, "{line}");
    assert_eq!(line["what"], "broadcast", "{line}");
    assert!(
        line["reason"]
            .as_str()
            .unwrap()
            .contains("only accepts requests from loopback"),
        "{line}"
    );
    // A burst: 99 more are counted, not logged.
    for _ in 0..99 {
        assert_eq!(push().await.unwrap().status(), 403);
    }
    // Another reason from the same peer is another pair, logged at once:
    // once its line is there, every line the burst gave is there too (each
    // is written before its response).
    let get = client.get(&url).send().await.unwrap();
    assert_eq!(get.status(), 405);
    binary.wait_for("the 405", |v| v["label"] == "broadcast_method");
    let lines = refused_lines(&binary, "broadcast_forbidden");
    assert_eq!(lines.len(), 1, "100 refused pushes: {lines:#?}");
}

#[tokio::test]
async fn the_key_or_token_of_a_refused_request_is_not_logged() {
    const KEY: &str = "configured-api-key-5f1e";
    const WRONG_KEY: &str = "presented-wrong-key-9b2c";
    const JWT_SECRET: &str = "jwt-secret-0a7d-long-enough-for-hs256";
    let binary = Binary::start(
        "debug",
        &[
            ("WSHUB_BROADCAST__API_KEYS", KEY),
            ("WSHUB_AUTH__JWT_SECRET", JWT_SECRET),
        ],
    );
    let client = reqwest::Client::new();
    let url = binary.url("/__broadcastWebSocket.wc");
    for (name, value) in [
        ("authorization", format!("Bearer {WRONG_KEY}")),
        ("x-api-key", WRONG_KEY.to_owned()),
    ] {
        let response = client
            .post(&url)
            .header(name, value)
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 401);
    }
    // A token signed with another secret, in the query.
    let forged = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"sub": "ann", "exp": 4_000_000_000u64}),
        &jsonwebtoken::EncodingKey::from_secret(b"not-the-secret").unwrap(),
    )
    .unwrap();
    let upgrade =
        crate::common::upgrade_request(&client, binary.url(&format!("/ws?token={forged}")))
            .send()
            .await
            .unwrap();
    assert_eq!(upgrade.status(), 401);
    let line = binary.wait_for("the 401 upgrade", |v| v["label"] == "token");
    assert_eq!(line["peer"], "127.0.0.1", "{line}");
    binary.wait_for("the 401 push", |v| v["label"] == "broadcast_unauthorized");
    let signature = forged.rsplit('.').next().unwrap();
    for line in binary.stderr() {
        for secret in [KEY, WRONG_KEY, JWT_SECRET, &forged, signature] {
            assert!(!line.contains(secret), "{secret:?} is in the log: {line}");
        }
    }
}

/// Pushes 60 KB messages to everyone until `binary` logs a slow consumer
/// (a client that never reads: its socket buffers fill, then its queue).
async fn push_until_slow(binary: &Binary, headers: &[(&str, &str)]) -> Value {
    let client = reqwest::Client::new();
    let body = json!({"action": "load", "message": "z".repeat(60_000)}).to_string();
    for _ in 0..2_000 {
        let mut request = client
            .post(binary.url("/__broadcastWebSocket.wc"))
            .body(body.clone());
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        assert_eq!(request.send().await.unwrap().status(), 204);
        if let Some(line) = binary
            .matching(|v| {
                v["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("slow consumer"))
            })
            .pop()
        {
            return line;
        }
    }
    panic!("the client that never reads was never closed as slow");
}

const SLOW_QUEUE: (&str, &str) = ("WSHUB_LIMITS__OUTBOUND_QUEUE_BYTES", "131072");

/// The policy (docs/security.md, "What is logged"): client ids only at
/// debug. The slow-consumer warning names the connection and the close
/// reason; the ids are in the debug lines around it.
#[tokio::test]
async fn the_slow_consumer_warning_names_the_connection_not_the_user() {
    const USER: &str = "slow-user-7c3e";
    const GROUP: &str = "slow-group-41d0";
    let binary = Binary::start("info", &[SLOW_QUEUE]);
    let _slow = Client::connect(binary.addr, &format!("/ws?userid={USER}&groupid={GROUP}")).await;
    let line = push_until_slow(&binary, &[]).await;
    assert_eq!(line["level"], "WARN", "{line}");
    // The connection id, as backends and /api/disconnect know it
    // (`<node>-<start>-<n>`), not the node's own number.
    let conn = line["conn"].as_str().unwrap_or_default();
    assert_eq!(conn.split('-').count(), 3, "{line}");
    assert_eq!(line["reason"], "slow_consumer", "{line}");
    for line in binary.stderr() {
        assert!(
            !line.contains(USER) && !line.contains(GROUP),
            "a client id above debug: {line}"
        );
    }
}

/// Issue 17: no secret the operator configured reaches the log, at debug,
/// through a representative run: token connects, refused pushes and
/// upgrades, a backend that cannot be reached, and a slow consumer.
#[tokio::test]
async fn no_configured_secret_appears_in_a_debug_log() {
    const JWT_SECRET: &str = "jwt-secret-3c9a-long-enough-for-hs256";
    const API_KEY: &str = "broadcast-api-key-77e1";
    const REDIS_PASSWORD: &str = "redis-password-d40f";
    const SIGNING_KEY: &str = "backend-signing-key-a2b8-at-least-32-chars";
    const BACKEND_PASSWORD: &str = "backend-url-password-61c5";
    const HEADER_SECRET: &str = "backend-header-secret-0e94";

    let redis = crate::common::redis::RedisServer::start();
    let port = redis.url().rsplit(':').next().unwrap().to_owned();
    let set = crate::common::redis::command(
        port.parse().unwrap(),
        &format!("CONFIG SET requirepass {REDIS_PASSWORD}"),
    )
    .unwrap();
    assert_eq!(set, "+OK");
    // Nothing listens on a port just freed: the backend is unreachable.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let redis_url = format!("redis://:{REDIS_PASSWORD}@127.0.0.1:{port}");
    let backend_url = format!("http://hub:{BACKEND_PASSWORD}@{closed}/wc.wc");
    let header = format!("Bearer {HEADER_SECRET}");
    let binary = Binary::start(
        "debug",
        &[
            ("WSHUB_AUTH__JWT_SECRET", JWT_SECRET),
            ("WSHUB_BROADCAST__API_KEYS", API_KEY),
            ("WSHUB_REDIS__URL", &redis_url),
            ("WSHUB_BACKEND__URL", &backend_url),
            ("WSHUB_BACKEND__EVENTS", "true"),
            ("WSHUB_BACKEND__SIGNING_KEY", SIGNING_KEY),
            ("WSHUB_BACKEND__HEADERS__AUTHORIZATION", &header),
            SLOW_QUEUE,
        ],
    );
    let http = reqwest::Client::new();
    let deadline = std::time::Instant::now() + crate::common::PATIENCE;
    while http
        .get(binary.url("/readyz"))
        .send()
        .await
        .unwrap()
        .status()
        != 200
    {
        assert!(std::time::Instant::now() < deadline, "never ready");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let token = |user: &str| {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &json!({"sub": user, "group": "g", "exp": 4_000_000_000u64}),
            &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()).unwrap(),
        )
        .unwrap()
    };
    let (ann_token, slow_token) = (token("ann"), token("slow"));
    // Connects (each an event the backend does not take), and a client
    // message forwarded to the unreachable backend.
    let mut ann = Client::connect(binary.addr, &format!("/ws?token={ann_token}")).await;
    let _slow = Client::connect(binary.addr, &format!("/ws?token={slow_token}")).await;
    ann.send_json(json!({"action": "hello", "message": "to the backend"}))
        .await;
    binary.wait_for("the backend failure", |v| {
        v["message"]
            .as_str()
            .is_some_and(|m| m.contains("backend forwards failing"))
    });
    // Refusals: a wrong key, a forged token.
    let wrong = http
        .post(binary.url("/__broadcastWebSocket.wc"))
        .header("x-api-key", "wrong")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let upgrade = crate::common::upgrade_request(&http, binary.url("/ws?token=not.a.token"))
        .send()
        .await
        .unwrap();
    assert_eq!(upgrade.status(), 401);
    // A slow consumer, fed with authorized pushes.
    let bearer = format!("Bearer {API_KEY}");
    push_until_slow(&binary, &[("authorization", &bearer)]).await;
    // The run's last line, then everything it wrote.
    let mut binary = binary;
    binary.stop();
    let stderr = binary.stderr();
    assert!(
        stderr.iter().any(|l| l.contains("shutdown complete")),
        "the log ended early:\n{}",
        stderr.join("\n")
    );
    let secrets = [
        JWT_SECRET,
        API_KEY,
        REDIS_PASSWORD,
        SIGNING_KEY,
        BACKEND_PASSWORD,
        HEADER_SECRET,
        &ann_token,
        &slow_token,
    ];
    let leaks: Vec<String> = stderr
        .iter()
        .flat_map(|line| {
            secrets
                .iter()
                .filter(|s| line.contains(**s))
                .map(move |s| format!("{s:?} in: {line}"))
        })
        .collect();
    assert!(
        leaks.is_empty(),
        "secrets in the log:\n{}",
        leaks.join("\n")
    );
}

/// The count of a flood comes with the pair's next line after the minute.
/// An in-process node whose log is captured, on a paused clock: a task
/// that sleeps a millisecond at a time keeps the runtime's automatic
/// advance (when every task waits) from jumping further, so the burst
/// takes well under the minute, and `advance` steps over it.
#[tokio::test(start_paused = true)]
async fn the_count_of_a_flood_follows_with_the_next_line_after_the_minute() {
    // The runtime is single-threaded: the server's tasks log on this thread.
    let (captured, _default) = Captured::warnings();
    let ticker = tokio::spawn(async {
        loop {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    });
    let mut config = crate::common::test_config();
    config.broadcast.api_keys = vec!["the-right-key-0123456789".to_owned()];
    let server = crate::common::TestServer::with(config).await;
    let push = || async {
        reqwest::Client::new()
            .post(server.url("/__broadcastWebSocket.wc"))
            .header("x-api-key", "a-wrong-key-0123456789")
            .body("{}")
            .send()
            .await
            .unwrap()
            .status()
    };
    let started = tokio::time::Instant::now();
    for _ in 0..100 {
        assert_eq!(push().await, 401);
    }
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
    let lines = captured.lines("request refused");
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert_eq!(lines[0]["suppressed"], 0);
    assert_eq!(lines[0]["peer"], "127.0.0.1");
    tokio::time::advance(std::time::Duration::from_secs(61)).await;
    assert_eq!(push().await, 401);
    let lines = captured.lines("request refused");
    assert_eq!(lines.len(), 2, "{lines:#?}");
    assert_eq!(lines[1]["suppressed"], 99, "{}", lines[1]);
    assert_eq!(lines[1]["status"], 401);
    ticker.abort();
    server.shutdown.cancel();
    let _ = server.handle.await;
}

#[tokio::test]
async fn a_refused_api_request_logs_its_whole_path() {
    // Review of issue 16: the line said path=/nodes for /api/nodes.
    let ip = non_loopback_ip();
    let binary = Binary::start("info", &[("WSHUB_LISTEN", "0.0.0.0:0")]);
    let url = format!(
        "http://{}/api/nodes",
        SocketAddr::new(ip, binary.addr.port())
    );
    let response = reqwest::get(&url).await.unwrap();
    assert_eq!(response.status(), 403);
    let line = binary.wait_for("the 403", |v| v["message"] == "request refused");
    assert_eq!(line["what"], "api", "{line}");
    assert_eq!(line["path"], "/api/nodes", "{line}");
}

/// Every refused API request is logged, not only those the key or address
/// turned away: a review sent a bad body, a repeated query key and a
/// malformed name with a valid key and found no line.
#[tokio::test]
async fn a_refused_api_request_with_a_valid_key_is_logged_too() {
    let key = "api-key-0123456789abcdef";
    let binary = Binary::start("info", &[("WSHUB_BROADCAST__API_KEYS", key)]);
    let base = format!("http://{}", binary.addr);
    let http = reqwest::Client::new();
    let response = http
        .post(format!("{base}/api/publish"))
        .header("x-api-key", key)
        .body(r#"{"messages":[{"action":7}]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let line = binary.wait_for("the 400", |v| {
        v["message"] == "request refused" && v["label"] == "api_bad_request"
    });
    assert_eq!(line["level"], "WARN", "{line}");
    assert_eq!(line["status"], 400, "{line}");
    assert_eq!(line["path"], "/api/publish", "{line}");
    assert!(
        line["reason"].as_str().is_some_and(|r| !r.is_empty()),
        "{line}"
    );
    assert!(!line.to_string().contains(key), "{line}");
    let response = http
        .get(format!("{base}/api/no-such-thing"))
        .header("x-api-key", key)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    binary.wait_for("the 404", |v| {
        v["message"] == "request refused" && v["label"] == "api_not_found"
    });
}
