//! Backend request signing (issue 17): with `backend.signing_key` every
//! request to the backend carries a timestamp, a nonce and an HMAC-SHA256
//! signature over the documented canonical string, plus the static
//! `backend.headers`; the sample backend verifies them and refuses a
//! tampered, a stale, an unsigned and a replayed request.

use crate::common::TestServer;
use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode, Uri};
use hmac::{KeyInit, Mac};
use serde_json::json;
use tokio::sync::mpsc;
use wshub::Config;
use wshub_chat_backend::{Settings, Verify, app_verifying};

const KEY: &str = "a-signing-key-of-at-least-32-chars!";

/// A node whose backend is `url`, signing with [`KEY`] and adding an
/// `Authorization` header.
async fn signing_node(url: &str) -> TestServer {
    let mut config = crate::common::test_config();
    config.backend = Config::load_from(
        None,
        [
            ("WSHUB_BACKEND__URL", url),
            ("WSHUB_BACKEND__SIGNING_KEY", KEY),
            (
                "WSHUB_BACKEND__HEADERS__AUTHORIZATION",
                "Bearer static-token",
            ),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned())),
    )
    .unwrap()
    .backend;
    TestServer::with(config).await
}

/// A backend that records each request (path and query, headers, body)
/// and answers 204.
async fn recording_backend() -> (String, mpsc::UnboundedReceiver<(Uri, HeaderMap, Bytes)>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let app = axum::Router::new().fallback(move |uri: Uri, headers: HeaderMap, body: Bytes| {
        let tx = tx.clone();
        async move {
            let _ = tx.send((uri, headers, body));
            StatusCode::NO_CONTENT
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "http://{}/app/__websocket.wwd?x=1",
        listener.local_addr().unwrap()
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, rx)
}

fn hmac_hex(text: &[u8]) -> String {
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(KEY.as_bytes()).unwrap();
    mac.update(text);
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn text<'a>(headers: &'a HeaderMap, name: &str) -> &'a str {
    headers
        .get(name)
        .unwrap_or_else(|| panic!("no {name}"))
        .to_str()
        .unwrap()
}

#[tokio::test]
async fn every_request_is_signed_over_the_documented_string() {
    let (url, mut requests) = recording_backend().await;
    let node = signing_node(&url).await;
    let mut ann = node.connect("ann", Some("room")).await;
    // Twice the same message: the nonce keeps the signatures apart.
    for _ in 0..2 {
        ann.send_json(json!({"action": "chat", "message": "hi"}))
            .await;
    }
    let mut nonces = Vec::new();
    for _ in 0..2 {
        let (uri, headers, body) = requests.recv().await.unwrap();
        assert_eq!(
            uri.path_and_query().unwrap().as_str(),
            "/app/__websocket.wwd?x=1"
        );
        let timestamp = text(&headers, "x-wshub-timestamp");
        let nonce = text(&headers, "x-wshub-nonce");
        assert!(now().abs_diff(timestamp.parse().unwrap()) < 60);
        assert_eq!(nonce.len(), 32);
        // The identity headers, in the documented order, then an empty
        // line and the body.
        let canonical = format!(
            "{timestamp}\n{nonce}\nPOST\n/app/__websocket.wwd?x=1\n\
             x-wshub-user-id:ann\nx-wshub-group-id:room\nx-wshub-node-id:{}\n\
             x-wshub-connection-id:{}\n\n{}",
            text(&headers, "x-wshub-node-id"),
            text(&headers, "x-wshub-connection-id"),
            std::str::from_utf8(&body).unwrap()
        );
        assert_eq!(
            text(&headers, "x-wshub-signature"),
            hmac_hex(canonical.as_bytes())
        );
        assert_eq!(text(&headers, "authorization"), "Bearer static-token");
        assert_eq!(text(&headers, "x-wshub-user-id"), "ann");
        nonces.push(nonce.to_owned());
    }
    assert_ne!(nonces[0], nonces[1]);
}

#[tokio::test]
async fn the_sample_backend_accepts_the_hub_and_refuses_tampered_stale_and_replayed_requests() {
    // The hub and the sample backend, verifying.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = listener.local_addr().unwrap();
    let url = format!("http://{backend}/app/__websocket.wwd");
    let node = signing_node(&url).await;
    let settings = Settings {
        hub: format!("http://{}", node.addr),
        keep: 10,
        max_bytes: 65536,
        hub_key: None,
    };
    let app = app_verifying(settings, Some(Verify::new(KEY)));
    tokio::spawn(async move { axum::serve(listener, app).await });
    let mut ann = node.connect("ann", Some("room")).await;
    ann.send_json(json!({"action": "broadcastchatmessage", "message": "signed"}))
        .await;
    let echo = ann.recv().await;
    assert_eq!(echo["action"], "broadcastchatmessage", "{echo}");
    assert_eq!(
        node.metric("wshub_backend_forwards_total{result=\"status\"}"),
        0.0
    );

    // Requests made by hand, as a forger (or a replaying eavesdropper)
    // would send them.
    let http = reqwest::Client::new();
    // Signed for ann in room; `sent` are the identity headers sent (in
    // this order, repeats kept).
    let signed_for_ann = |timestamp: u64, nonce: &str, signed_body: &str| {
        hmac_hex(
            format!(
                "{timestamp}\n{nonce}\nPOST\n/app/__websocket.wwd\n\
                 x-wshub-user-id:ann\nx-wshub-group-id:room\n\n{signed_body}"
            )
            .as_bytes(),
        )
    };
    let send_as =
        |sent: &[(&str, &str)], timestamp: u64, nonce: &str, signed_body: &str, sent_body: &str| {
            let mut request = http.post(&url);
            for (name, value) in sent {
                request = request.header(*name, *value);
            }
            request
                .header("x-wshub-timestamp", timestamp.to_string())
                .header("x-wshub-nonce", nonce)
                .header(
                    "x-wshub-signature",
                    signed_for_ann(timestamp, nonce, signed_body),
                )
                .body(sent_body.to_owned())
                .send()
        };
    const ANN: &[(&str, &str)] = &[("x-wshub-user-id", "ann"), ("x-wshub-group-id", "room")];
    let send = |timestamp: u64, nonce: &str, signed_body: &str, sent_body: &str| {
        send_as(ANN, timestamp, nonce, signed_body, sent_body)
    };
    let body = r#"{"action":"getinitialmessages","message":null}"#;
    let status = |r: reqwest::Result<reqwest::Response>| r.unwrap().status();

    // Correctly signed: accepted (the key is the hub's).
    assert_eq!(status(send(now(), "n-1", body, body).await), 204);
    assert_eq!(ann.recv().await["action"], "initialmessages");
    // The same request again: a replay.
    let replay = send(now(), "n-1", body, body).await.unwrap();
    assert_eq!(replay.status(), 401);
    assert_eq!(replay.text().await.unwrap(), "replayed request\n");
    // The body changed after signing.
    let tampered = body.replace("getinitialmessages", "broadcastchatmessage");
    let r = send(now(), "n-2", body, &tampered).await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.text().await.unwrap(), "signature mismatch\n");
    // The identity re-labelled after signing (the body untouched): a
    // review had the sample backend take this as boss's in admins.
    let forged: &[(&str, &str)] = &[("x-wshub-user-id", "boss"), ("x-wshub-group-id", "admins")];
    let r = send_as(forged, now(), "n-4", body, body).await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.text().await.unwrap(), "signature mismatch\n");
    // A hub event's header added, or the group dropped: not the string
    // signed either.
    let with_event: &[(&str, &str)] = &[ANN[0], ANN[1], ("x-wshub-event", "connect")];
    let r = send_as(with_event, now(), "n-5", body, body).await.unwrap();
    assert_eq!(r.text().await.unwrap(), "signature mismatch\n");
    let r = send_as(&ANN[..1], now(), "n-6", body, body).await.unwrap();
    assert_eq!(r.text().await.unwrap(), "signature mismatch\n");
    // A second user id after the signed one: refused, whichever a reader
    // would take.
    let twice: &[(&str, &str)] = &[ANN[0], ANN[1], ("x-wshub-user-id", "boss")];
    let r = send_as(twice, now(), "n-7", body, body).await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.text().await.unwrap(), "a signed header given twice\n");
    // Signed six minutes ago: outside the 5-minute window.
    let r = send(now() - 360, "n-3", body, body).await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        r.text().await.unwrap(),
        "signed outside the replay window\n"
    );
    // Unsigned.
    let r = http
        .post(&url)
        .header("x-wshub-user-id", "ann")
        .body(body)
        .send()
        .await;
    assert_eq!(status(r), 401);
    // None of these reached the socket: the next thing it gets is this.
    let tag = ann.send_sentinel().await;
    assert!(ann.until_sentinel(&tag).await.is_empty());
}

#[test]
fn the_backend_keys_are_validated() {
    let err = |pairs: &[(&str, &str)]| {
        let env = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        Config::load_from(None, env).unwrap_err().to_string()
    };
    let url = ("WSHUB_BACKEND__URL", "http://127.0.0.1:1/");
    let msg = err(&[url, ("WSHUB_BACKEND__SIGNING_KEY", "short")]);
    assert!(msg.contains("backend.signing_key"), "{msg}");
    let msg = err(&[url, ("WSHUB_BACKEND__HEADERS__X-WSHUB-USER-ID", "forged")]);
    assert!(msg.contains("backend.headers"), "{msg}");
    // The spelling an environment variable can hold is the same header;
    // the framing and connection headers are the hub's too.
    for name in [
        "X_WSHUB_USER_ID",
        "CONTENT_LENGTH",
        "TRANSFER_ENCODING",
        "CONNECTION",
    ] {
        let var = format!("WSHUB_BACKEND__HEADERS__{name}");
        let msg = err(&[url, (&var, "5")]);
        assert!(msg.contains("set by the hub itself"), "{name}: {msg}");
    }
    // One header in two spellings is refused, not merged.
    let msg = err(&[
        url,
        ("WSHUB_BACKEND__HEADERS__X-API-KEY", "a"),
        ("WSHUB_BACKEND__HEADERS__X_API_KEY", "b"),
    ]);
    assert!(msg.contains("set twice"), "{msg}");
    let headers = |pairs: &[(&str, &str)]| {
        let env = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        let backend = Config::load_from(None, env).unwrap().backend.unwrap();
        backend
            .headers
            .iter()
            .map(|(name, _)| name.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        headers(&[url, ("WSHUB_BACKEND__HEADERS__X_API_KEY", "k")]),
        ["x-api-key"],
        "`_` in a header's name is sent as `-`"
    );
    let secret_value = "Bearer secret\nvalue";
    let msg = err(&[url, ("WSHUB_BACKEND__HEADERS__AUTHORIZATION", secret_value)]);
    assert!(
        msg.contains("backend.headers") && !msg.contains("secret"),
        "{msg}"
    );
    // The configuration's Debug hides the key and the header values.
    let c = Config::load_from(
        None,
        [
            url,
            ("WSHUB_BACKEND__SIGNING_KEY", KEY),
            (
                "WSHUB_BACKEND__HEADERS__AUTHORIZATION",
                "Bearer static-token",
            ),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned())),
    )
    .unwrap();
    let debug = format!("{c:?}");
    assert!(
        !debug.contains(KEY) && !debug.contains("static-token"),
        "{debug}"
    );
}
