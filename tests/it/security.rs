//! Who gets in and what nobody can do: tokens, identity stamping, origins,
//! broadcast keys, connection caps, rate limits, flood isolation. Over real
//! sockets and HTTP.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::common::{Client, Ended, TestServer, test_config};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use wshub::Config;

const SECRET: &str = "a-test-secret-that-is-long-enough-32+";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name),
    )
    .unwrap()
}

fn hs256(claims: Value, secret: &str) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()).unwrap(),
    )
    .unwrap()
}

/// `[[[…]]]`, `depth` deep.
fn deep_json(depth: usize) -> Value {
    (0..depth).fold(json!([]), |inner, _| json!([inner]))
}

/// A token whose header names `alg` as given (not one jsonwebtoken
/// knows), with an empty signature.
fn unsigned(claims: &Value, alg: &str) -> String {
    use base64::Engine;
    let b64 = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    format!(
        "{}.{}.",
        b64(&json!({"alg": alg, "typ": "JWT"})),
        b64(claims)
    )
}

fn config_with(env: &[(&str, &str)]) -> Config {
    let loaded = Config::load_from(
        None,
        env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
    )
    .unwrap();
    let mut config = test_config();
    config.auth = loaded.auth;
    config.broadcast = loaded.broadcast;
    config.limits = loaded.limits;
    config
}

async fn token_server(extra: &[(&str, &str)]) -> TestServer {
    let mut env = vec![("WSHUB_AUTH__JWT_SECRET", SECRET)];
    env.extend_from_slice(extra);
    TestServer::with(config_with(&env)).await
}

/// Tries an upgrade; `Ok(client)` or `Err((status, body))`.
async fn upgrade(
    server: &TestServer,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<
    (
        Client,
        tokio_tungstenite::tungstenite::handshake::client::Response,
    ),
    (u16, String),
> {
    let mut request = format!("ws://{}{}", server.addr, path)
        .into_client_request()
        .unwrap();
    for (k, v) in headers {
        let name =
            tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(k.as_bytes()).unwrap();
        request.headers_mut().insert(name, v.parse().unwrap());
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok((ws, response)) => Ok((Client { ws }, response)),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let body = resp
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned());
            Err((resp.status().as_u16(), body.unwrap_or_default()))
        }
        Err(e) => panic!("unexpected error {e}"),
    }
}

async fn refused(server: &TestServer, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    match upgrade(server, path, headers).await {
        Ok(_) => panic!("{path} was accepted"),
        Err(e) => e,
    }
}

#[tokio::test]
async fn every_token_failure_is_a_401_with_its_reason() {
    let server = token_server(&[
        ("WSHUB_AUTH__AUDIENCE", "wshub"),
        ("WSHUB_AUTH__ISSUER", "https://app"),
    ])
    .await;
    let good = json!({"sub": "ann", "aud": "wshub", "iss": "https://app", "exp": now() + 600});
    let with = |patch: Value| {
        let mut c = good.clone();
        for (k, v) in patch.as_object().unwrap() {
            if v.is_null() {
                c.as_object_mut().unwrap().remove(k);
            } else {
                c[k] = v.clone();
            }
        }
        c
    };
    let rs256 = jsonwebtoken::encode(
        &Header::new(Algorithm::RS256),
        &good,
        &EncodingKey::from_rsa_pem(&fixture("rsa_private.pem")).unwrap(),
    )
    .unwrap();
    let cases: Vec<(String, &str)> = vec![
        (String::new(), "a token is required"),
        ("not-a-jwt".into(), "malformed"),
        (
            hs256(good.clone(), "another-secret-another-secret-xx"),
            "signature is invalid",
        ),
        (hs256(with(json!({"exp": now() - 3600})), SECRET), "expired"),
        (
            hs256(with(json!({"nbf": now() + 3600})), SECRET),
            "not valid yet",
        ),
        (
            hs256(with(json!({"aud": "someone-else"})), SECRET),
            "another audience",
        ),
        (
            hs256(with(json!({"iss": "https://evil"})), SECRET),
            "another issuer",
        ),
        (
            hs256(with(json!({"exp": null})), SECRET),
            "required claim: exp",
        ),
        // A configured audience or issuer must be there, not only right
        // when it is (a token without them was let in).
        (
            hs256(with(json!({"aud": null})), SECRET),
            "required claim: aud",
        ),
        // One issuer, not a list that holds it among others.
        (
            hs256(
                with(json!({"iss": ["https://other", "https://app"]})),
                SECRET,
            ),
            "claims are invalid",
        ),
        (
            hs256(with(json!({"iss": null})), SECRET),
            "required claim: iss",
        ),
        {
            let mut claims = good.clone();
            claims["aud"] = Value::Null;
            (hs256(claims, SECRET), "required claim: aud")
        },
        {
            let mut claims = good.clone();
            claims["iss"] = Value::Null;
            (hs256(claims, SECRET), "required claim: iss")
        },
        (
            hs256(with(json!({"sub": null})), SECRET),
            "required claim: sub",
        ),
        (
            hs256(with(json!({"group": 5})), SECRET),
            "claims are invalid",
        ),
        (rs256, "algorithm"),
        // A time claim that is there but not a number of seconds is
        // invalid, not missing; an algorithm the hub does not know is the
        // wrong one, not invalid claims.
        (
            hs256(with(json!({"exp": -1})), SECRET),
            "`exp` must be a whole number of seconds",
        ),
        (
            hs256(with(json!({"exp": "soon"})), SECRET),
            "`exp` must be a whole number of seconds",
        ),
        (
            hs256(with(json!({"sub": 5})), SECRET),
            "claims are invalid: invalid type: integer",
        ),
        // null is no value: missing, not invalid.
        {
            let mut claims = good.clone();
            claims["sub"] = Value::Null;
            (hs256(claims, SECRET), "required claim: sub")
        },
        (
            hs256(with(json!({"nbf": "soon"})), SECRET),
            "`nbf` must be a whole number of seconds",
        ),
        (
            hs256(with(json!({"exp": "soon", "deep": deep_json(200)})), SECRET),
            "`exp` must be a whole number of seconds",
        ),
        (unsigned(&good, "none"), "algorithm"),
        (unsigned(&good, "hs256"), "algorithm"),
    ];
    for (token, want) in cases {
        let path = if token.is_empty() {
            "/ws?userid=ann".to_owned()
        } else {
            format!("/ws?token={token}")
        };
        let (status, body) = refused(&server, &path, &[]).await;
        assert_eq!(status, 401, "{want}");
        assert!(body.contains(want), "{body:?} should say {want:?}");
    }
    assert_eq!(server.node.connections(), 0, "nothing else happened");
    assert!(server.metric("wshub_connections_refused_total{reason=\"token\"}") >= 11.0);
    // And the good token works.
    assert!(
        upgrade(&server, &format!("/ws?token={}", hs256(good, SECRET)), &[])
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn the_token_decides_identity_and_every_message_is_stamped_with_it() {
    let server = token_server(&[]).await;
    let ann = hs256(
        json!({"sub": "ann", "group": "room", "exp": now() + 600}),
        SECRET,
    );
    let bob = hs256(
        json!({"sub": "bob", "group": "room", "exp": now() + 600}),
        SECRET,
    );
    // Query ids are ignored in token mode.
    let (mut a, _) = upgrade(
        &server,
        &format!("/ws?token={ann}&userid=mallory&groupid=admins"),
        &[],
    )
    .await
    .unwrap();
    // The token can also travel in Sec-WebSocket-Protocol; the hub then
    // selects the "wshub" subprotocol.
    let protocols = format!("wshub, wshub.jwt.{bob}");
    let (mut b, response) = upgrade(&server, "/ws", &[("sec-websocket-protocol", &protocols)])
        .await
        .unwrap();
    assert_eq!(response.headers()["sec-websocket-protocol"], "wshub");
    // Two tokens (query and protocol, or twice in the query): refused,
    // none picked (the query's used to win, a bad one beside it ignored).
    let bad = format!("wshub, wshub.jwt.{bob}x");
    for (path, headers) in [
        (
            format!("/ws?token={ann}"),
            vec![("sec-websocket-protocol", bad.as_str())],
        ),
        (format!("/ws?token={ann}&token={bob}"), vec![]),
    ] {
        let (status, body) = refused(&server, &path, &headers).await;
        assert_eq!(status, 401, "{path}");
        assert!(body.contains("more than one token"), "{body}");
    }
    // The token alone as a subprotocol: the 101 would select none of the
    // client's, which fails it (and the backend heard of a socket that
    // never opened); refused with the way to offer it instead.
    let alone = format!("wshub.jwt.{bob}");
    let (status, body) = refused(&server, "/ws", &[("sec-websocket-protocol", &alone)]).await;
    assert_eq!(status, 401);
    assert!(body.contains("without `wshub` beside it"), "{body}");
    // Ann claims to be someone else in a group she is not in.
    a.send_json(json!({"userId": "bob", "groupId": "admins", "action": "x",
        "recipients": [{"type": "group", "value": "room"}]}))
        .await;
    for c in [&mut a, &mut b] {
        let m = c.recv().await;
        assert_eq!(
            (m["userId"].as_str(), m["groupId"].as_str()),
            (Some("ann"), Some("room"))
        );
    }
    // A user recipient reaches the token's user.
    b.send_json(json!({"action": "dm", "recipients": [{"type": "user", "value": "ann"}]}))
        .await;
    let m = a.recv().await;
    assert_eq!(
        (m["action"].as_str(), m["userId"].as_str()),
        (Some("dm"), Some("bob"))
    );
}

#[tokio::test]
async fn rs256_and_es256_public_keys() {
    let dir = std::env::temp_dir();
    for (alg, private, public) in [
        (Algorithm::RS256, "rsa_private.pem", "rsa_public.pem"),
        (Algorithm::ES256, "ec_private.pem", "ec_public.pem"),
    ] {
        let key_file = dir.join(format!("wshub-{}-{public}", std::process::id()));
        std::fs::write(&key_file, fixture(public)).unwrap();
        let name = format!("{alg:?}");
        let server = TestServer::with(config_with(&[
            (
                "WSHUB_AUTH__JWT_PUBLIC_KEY_FILE",
                key_file.to_str().unwrap(),
            ),
            ("WSHUB_AUTH__JWT_ALGORITHM", name.as_str()),
        ]))
        .await;
        let claims = json!({"sub": "kim", "exp": now() + 600});
        let signing = match alg {
            Algorithm::RS256 => EncodingKey::from_rsa_pem(&fixture(private)).unwrap(),
            _ => EncodingKey::from_ec_pem(&fixture(private)).unwrap(),
        };
        let token = jsonwebtoken::encode(&Header::new(alg), &claims, &signing).unwrap();
        let (mut c, _) = upgrade(&server, &format!("/ws?token={token}"), &[])
            .await
            .unwrap();
        c.send_json(json!({"action": "hi"})).await;
        assert_eq!(c.recv().await["userId"], "kim", "{name}");
        // An HS256 token signed with the public key as a secret (the classic
        // algorithm confusion) is refused.
        let confused = hs256(claims, &String::from_utf8(fixture(public)).unwrap());
        let (status, body) = refused(&server, &format!("/ws?token={confused}"), &[]).await;
        assert_eq!(status, 401, "{name}: {body}");
        let _ = std::fs::remove_file(key_file);
    }
}

#[tokio::test]
async fn sockets_from_other_origins_are_refused() {
    let server = TestServer::with(config_with(&[(
        "WSHUB_AUTH__ALLOWED_ORIGINS",
        "https://app.example,http://localhost:8080",
    )]))
    .await;
    let (status, body) = refused(
        &server,
        "/ws?userid=x",
        &[("origin", "https://evil.example")],
    )
    .await;
    assert_eq!(status, 403);
    assert!(
        body.contains("origin https://evil.example is not allowed"),
        "{body}"
    );
    assert!(
        upgrade(
            &server,
            "/ws?userid=a",
            &[("origin", "https://app.example")]
        )
        .await
        .is_ok()
    );
    assert!(
        upgrade(
            &server,
            "/ws?userid=b",
            &[("origin", "http://localhost:8080")]
        )
        .await
        .is_ok()
    );
    // Not a browser: no Origin header.
    assert!(upgrade(&server, "/ws?userid=c", &[]).await.is_ok());
    // An Origin that is not text (a byte over 0x7f) is not in the list
    // either: it was read as no Origin and let in.
    let mut request = format!("ws://{}/ws?userid=d", server.addr)
        .into_client_request()
        .unwrap();
    request.headers_mut().insert(
        "origin",
        tokio_tungstenite::tungstenite::http::HeaderValue::from_bytes(b"https://app.example\xe9")
            .unwrap(),
    );
    match tokio_tungstenite::connect_async(request).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status().as_u16(), 403);
            let body = String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default());
            assert!(body.contains("origin (not text) is not allowed"), "{body}");
        }
        other => panic!("not refused: {:?}", other.map(|(_, r)| r.status())),
    }
    // Two Origin headers: neither decides (the first did).
    let mut request = format!("ws://{}/ws?userid=e", server.addr)
        .into_client_request()
        .unwrap();
    let headers = request.headers_mut();
    headers.append("origin", "https://app.example".parse().unwrap());
    headers.append("origin", "https://evil.example".parse().unwrap());
    match tokio_tungstenite::connect_async(request).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status().as_u16(), 403)
        }
        other => panic!("not refused: {:?}", other.map(|(_, r)| r.status())),
    }
}

#[tokio::test]
async fn broadcast_keys_required_accepted_and_wrong() {
    let key = "k-0123456789abcdef";
    let server = TestServer::with(config_with(&[(
        "WSHUB_BROADCAST__API_KEYS",
        &format!("{key},other-key-0123456789"),
    )]))
    .await;
    let mut a = server.connect("a", None).await;
    let url = server.url("/__broadcastWebSocket.wc");
    let http = reqwest::Client::new();
    let body = r#"{"action":"pushed"}"#;
    let resp = http.post(&url).body(body).send().await.unwrap();
    assert_eq!(resp.status(), 401, "loopback is not enough once keys exist");
    assert!(
        resp.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Bearer")
    );
    let resp = http
        .post(&url)
        .bearer_auth("k-0123456789abcdeX")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let resp = http
        .post(&url)
        .bearer_auth(key)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    assert_eq!(a.recv().await["action"], "pushed");
    let resp = http
        .post(&url)
        .header("x-api-key", "other-key-0123456789")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    assert_eq!(a.recv().await["action"], "pushed");
}

#[tokio::test]
async fn node_and_per_address_caps_answer_503_and_429() {
    let server = TestServer::with(config_with(&[("WSHUB_LIMITS__MAX_CONNECTIONS", "2")])).await;
    let _a = server.connect("a", None).await;
    let b = server.connect("b", None).await;
    let (status, body) = refused(&server, "/ws?userid=c", &[]).await;
    assert_eq!(
        (status, body.contains("at capacity (2 sockets)")),
        (503, true),
        "{body}"
    );
    b.close().await;
    crate::common::eventually("a place is free again", || server.node.connections() == 1).await;
    crate::common::eventually("the slot is given back", || {
        server.metric("wshub_connections") == 1.0
    })
    .await;
    assert!(upgrade(&server, "/ws?userid=c", &[]).await.is_ok());
    assert_eq!(server.metric("wshub_connections_max"), 2.0);

    let server = TestServer::with(config_with(&[(
        "WSHUB_LIMITS__MAX_CONNECTIONS_PER_IP",
        "2",
    )]))
    .await;
    let _a = server.connect("a", None).await;
    let _b = server.connect("b", None).await;
    let (status, body) = refused(&server, "/ws?userid=c", &[]).await;
    assert_eq!(
        (status, body.contains("too many sockets from this address")),
        (429, true),
        "{body}"
    );
}

#[tokio::test]
async fn a_flooding_socket_is_limited_then_closed_and_nobody_else_waits() {
    let server = TestServer::with(config_with(&[
        ("WSHUB_LIMITS__MESSAGES_PER_SECOND", "5"),
        ("WSHUB_LIMITS__MESSAGE_BURST", "3"),
        ("WSHUB_LIMITS__RATE_VIOLATIONS_BEFORE_CLOSE", "20"),
    ]))
    .await;
    let mut flood = server.connect("flood", Some("f")).await;
    let mut x = server.connect("x", Some("pair")).await;
    let mut y = server.connect("y", Some("pair")).await;
    // The flooder sends far past its rate, without reading.
    for i in 0..200 {
        flood
            .send_json(json!({"action": "spam", "message": i.to_string(), "recipients": [{"type": "group", "value": "f"}]}))
            .await;
    }
    // Meanwhile x and y talk; every one of their messages is delivered in
    // order (they stay under their own rate).
    for i in 0..3 {
        x.send_json(json!({"action": "talk", "message": i.to_string(), "recipients": [{"type": "user", "value": "y"}]}))
            .await;
        assert_eq!(y.recv().await["message"], i.to_string());
    }
    // The flooder got its burst through, then errors, then 1008.
    let mut delivered = 0;
    let mut limited = 0;
    let end = loop {
        match tokio::time::timeout(
            crate::common::PATIENCE,
            futures_util::StreamExt::next(&mut flood.ws),
        )
        .await
        .unwrap()
        {
            Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t))) => {
                let m: Value = serde_json::from_str(&t).unwrap();
                match m["action"].as_str() {
                    Some("spam") => delivered += 1,
                    Some("wshub.error") => {
                        assert!(m["message"].as_str().unwrap().contains("rate limit"), "{m}");
                        limited += 1;
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
            Some(Ok(tokio_tungstenite::tungstenite::Message::Close(Some(f)))) => {
                break Ended::Closed(f.code.into(), f.reason.to_string());
            }
            Some(Ok(_)) => {}
            _ => break Ended::Dropped,
        }
    };
    assert_eq!(end, Ended::Closed(1008, "Rate limit exceeded".into()));
    assert!(
        (3..10).contains(&delivered),
        "the burst (and little more) got through: {delivered}"
    );
    assert!(
        limited >= 19,
        "each refused message was answered: {limited}"
    );
    assert!(server.metric("wshub_messages_dropped_total{reason=\"rate_limited\"}") >= 20.0);
    crate::common::eventually("the 1008 close is counted", || {
        server.metric("wshub_connections_closed_total{code=\"1008\",reason=\"policy_violation\"}")
            == 1.0
    })
    .await;
    // The others are still connected and talking.
    y.send_json(json!({"action": "still", "recipients": [{"type": "user", "value": "x"}]}))
        .await;
    assert_eq!(x.recv().await["action"], "still");
}

/// Issue 11, item 4: control frames count against the sender's rate, so a
/// client that floods pings (each owed a pong) is closed with 1008 like one
/// that floods messages.
#[tokio::test]
async fn a_ping_flood_is_rate_limited_and_closed() {
    let server = TestServer::with(config_with(&[
        ("WSHUB_LIMITS__MESSAGES_PER_SECOND", "5"),
        ("WSHUB_LIMITS__MESSAGE_BURST", "3"),
        ("WSHUB_LIMITS__RATE_VIOLATIONS_BEFORE_CLOSE", "20"),
    ]))
    .await;
    let mut flood = server.connect("flood", None).await;
    for _ in 0..500 {
        let ping = tokio_tungstenite::tungstenite::Message::Ping(vec![1u8; 125].into());
        if futures_util::SinkExt::send(&mut flood.ws, ping)
            .await
            .is_err()
        {
            break;
        }
    }
    crate::common::eventually("the ping flooder is closed with 1008", || {
        server.metric("wshub_connections_closed_total{code=\"1008\",reason=\"policy_violation\"}")
            == 1.0
    })
    .await;
    assert_eq!(
        flood.ended().await,
        Ended::Closed(1008, "Rate limit exceeded".into())
    );
}

/// A backend on port 0 that records the body of every request.
async fn recording_backend() -> (String, tokio::sync::mpsc::Receiver<String>) {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let app = axum::Router::new().fallback(move |body: String| {
        let tx = tx.clone();
        async move {
            let _ = tx.send(body).await;
            axum::http::StatusCode::NO_CONTENT
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/__websocket.wwd", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, rx)
}

/// Issue 11, item 12: a client cannot send the hub's reserved `wshub.*`
/// actions, in any letter case: not to other clients (a fake
/// `wshub.error`) when there is no backend, and not to the backend (a fake
/// `wshub.disconnect`) when there is one. The sender is told why.
#[tokio::test]
async fn clients_cannot_send_reserved_actions() {
    let server = TestServer::start().await;
    let mut mallory = server.connect("mallory", None).await;
    let mut victim = server.connect("victim", None).await;
    for action in ["wshub.error", "WSHUB.Connect", "wshub.anything"] {
        mallory
            .send_json(json!({"action": action, "message": "your session expired, log in at evil.example"}))
            .await;
        let reply = mallory.recv().await;
        assert_eq!(reply["action"], "wshub.error", "{action}: {reply}");
        let why = reply["message"].as_str().unwrap();
        assert!(why.contains("reserved"), "{action}: {why}");
    }
    let tag = mallory.send_sentinel().await;
    assert!(
        victim.until_sentinel(&tag).await.is_empty(),
        "nothing reached the victim"
    );

    let (url, mut seen) = recording_backend().await;
    let mut config = test_config();
    config.backend = Config::load_from(None, [("WSHUB_BACKEND__URL".to_owned(), url)])
        .unwrap()
        .backend;
    let server = TestServer::with(config).await;
    let mut mallory = server.connect("mallory", None).await;
    mallory
        .send_json(json!({"action": "wshub.disconnect", "userId": "victim"}))
        .await;
    let reply = mallory.recv().await;
    assert_eq!(reply["action"], "wshub.error", "{reply}");
    assert!(
        reply["message"].as_str().unwrap().contains("reserved"),
        "{reply}"
    );
    // Where the hub reads another action than a backend may: a second
    // `action` (a backend may take the first) or one in another letter
    // case (a backend may ignore case). The raw text goes to the backend
    // in open mode, so these are refused too (a review reached a
    // case-insensitive backend with a fake disconnect event so).
    for (text, why) in [
        (
            r#"{"action":"chat","Action":"wshub.disconnect","message":"case"}"#,
            "reserved",
        ),
        (
            r#"{"ACTION":"wshub.connect","message":"alone"}"#,
            "reserved",
        ),
        (
            r#"{"action":"wshub.disconnect","action":"chat","message":"dup"}"#,
            "duplicate field `action`",
        ),
        // Relayed before, unseen by a backend that takes the first.
        (
            r#"{"action":"chat","action":"broadcast","message":"dup"}"#,
            "duplicate field `action`",
        ),
        (
            "{\"action\":\"chat\",\"act\u{131}on\":\"wshub.disconnect\"}",
            "reserved",
        ),
    ] {
        mallory.send_text(text).await;
        let reply = mallory.recv().await;
        assert_eq!(reply["action"], "wshub.error", "{text}: {reply}");
        assert!(
            reply["message"].as_str().unwrap().contains(why),
            "{text}: {reply}"
        );
    }
    // The refusal is synchronous: the first thing the backend hears from
    // mallory is what it sent next.
    mallory.send_json(json!({"action": "legit"})).await;
    let first = tokio::time::timeout(crate::common::PATIENCE, seen.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(first.contains(r#""action":"legit""#), "{first}");
}

/// Issue 11, item 12, decided: the broadcast endpoint (the application's
/// backend, trusted by key or network) may still send `wshub.*` actions.
#[tokio::test]
async fn the_broadcast_endpoint_may_send_reserved_actions() {
    let server = TestServer::start().await;
    let mut a = server.connect("a", None).await;
    let resp = server
        .post(
            "/__broadcastWebSocket.wc",
            r#"{"action":"wshub.notice","message":"maintenance at 18:00"}"#,
        )
        .await;
    assert_eq!(resp.status(), 204);
    assert_eq!(a.recv().await["action"], "wshub.notice");
    // Whatever else its keys hold: the backend is the application (a
    // review found the check for clients' shadow actions refusing these).
    let resp = server
        .post(
            "/__broadcastWebSocket.wc",
            r#"{"action":"wshub.disconnect","Action":"wshub.connect","action":"chat"}"#,
        )
        .await;
    assert_eq!(resp.status(), 204);
    assert_eq!(a.recv().await["action"], "chat");
}

/// `limits.connects_per_second_per_ip`: an address past its burst is
/// answered 429 with `Retry-After` and the reason, refused upgrades count
/// towards it, other addresses are not touched, and the address connects
/// again once an interval has passed.
#[tokio::test]
async fn connects_from_one_address_past_the_rate_answer_429_with_retry_after() {
    let server = TestServer::with(config_with(&[
        ("WSHUB_LIMITS__CONNECTS_PER_SECOND_PER_IP", "2"),
        ("WSHUB_LIMITS__CONNECT_BURST_PER_IP", "3"),
        ("WSHUB_AUTH__TRUSTED_PROXIES", "127.0.0.0/8"),
    ]))
    .await;
    let from = |addr: &'static str| [("x-forwarded-for", addr)];
    let http = reqwest::Client::new();
    let attempt = |addr: &'static str| {
        crate::common::upgrade_request(&http, server.url("/ws?userid=u"))
            .header("x-forwarded-for", addr)
            .send()
    };
    let mut open = Vec::new();
    for i in 0..3 {
        let socket = upgrade(&server, "/ws", &from("192.0.2.1")).await;
        open.push(socket.unwrap_or_else(|e| panic!("connect {i}: {e:?}")));
    }
    let over = attempt("192.0.2.1").await.unwrap();
    assert_eq!(over.status(), 429);
    assert_eq!(over.headers()["retry-after"], "1");
    let body = over.text().await.unwrap();
    assert!(
        body.contains(
            "too many connects from this address (at most 2 a second, after a burst of 3)"
        ),
        "{body}"
    );
    // Refused upgrades count: three 400s (an id over limits.max_id_bytes)
    // use up another address's burst.
    let long = format!("/ws?userid={}", "x".repeat(300));
    for _ in 0..3 {
        assert_eq!(refused(&server, &long, &from("192.0.2.2")).await.0, 400);
    }
    assert_eq!(attempt("192.0.2.2").await.unwrap().status(), 429);
    // Another address is not touched, and the open sockets still work.
    open.push(
        upgrade(&server, "/ws", &from("192.0.2.3"))
            .await
            .expect("another address"),
    );
    let (first, _) = &mut open[0];
    let tag = first.send_sentinel().await;
    assert_eq!(first.until_sentinel(&tag).await, Vec::<Value>::new());
    assert_eq!(
        server.metric("wshub_connections_refused_total{reason=\"connect_rate\"}"),
        2.0
    );
    // An interval (500 ms) later the address connects once more.
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    open.push(
        upgrade(&server, "/ws", &from("192.0.2.1"))
            .await
            .expect("after the interval"),
    );
    assert_eq!(attempt("192.0.2.1").await.unwrap().status(), 429);
}

/// Issue 11, item 13: the per-address limit counts an IPv6 client by its
/// /64 (one host usually holds a whole /64), and an IPv4-mapped IPv6
/// address as the IPv4 address it is.
#[tokio::test]
async fn the_per_address_limit_counts_ipv6_per_64_and_mapped_ipv4_as_ipv4() {
    let server = TestServer::with(config_with(&[
        ("WSHUB_LIMITS__MAX_CONNECTIONS_PER_IP", "2"),
        ("WSHUB_AUTH__TRUSTED_PROXIES", "127.0.0.0/8"),
    ]))
    .await;
    let from = |addr: &'static str| [("x-forwarded-for", addr)];
    let mut open = Vec::new();
    for addr in ["2001:db8:1:2::a", "2001:db8:1:2:ffff:ffff:ffff:ffff"] {
        open.push(upgrade(&server, "/ws", &from(addr)).await.expect(addr));
    }
    let (status, body) = refused(&server, "/ws", &from("2001:db8:1:2:abcd::1")).await;
    assert_eq!(status, 429, "a third socket from the same /64: {body}");
    open.push(
        upgrade(&server, "/ws", &from("2001:db8:1:3::a"))
            .await
            .expect("another /64 is another client"),
    );
    for addr in ["192.0.2.7", "::ffff:192.0.2.7"] {
        open.push(upgrade(&server, "/ws", &from(addr)).await.expect(addr));
    }
    let (status, _) = refused(&server, "/ws", &from("192.0.2.7")).await;
    assert_eq!(status, 429, "the mapped address counted as the IPv4 one");
}

/// Issue 11, item 9: an id chosen by a client cannot forge a line of the
/// default (text) log: control characters in it are escaped. Runs the real
/// binary and reads its stderr.
#[tokio::test]
async fn client_ids_cannot_forge_log_lines() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = Kill(
        Command::new(env!("CARGO_BIN_EXE_wshub"))
            .env("WSHUB_LISTEN", "127.0.0.1:0")
            .env("WSHUB_LOG__FORMAT", "text")
            .env("WSHUB_LOG__LEVEL", "info,wshub=debug")
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn wshub"),
    );
    let stderr = child.0.stderr.take().unwrap();
    let (lines_tx, lines) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    // The text log colours its output: strip ANSI styling to read fields.
    let plain = |line: &str| {
        let mut out = String::new();
        let mut chars = line.chars();
        while let Some(c) = chars.next() {
            if c == '\u{1b}' && chars.clone().next() == Some('[') {
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            } else {
                out.push(c);
            }
        }
        out
    };
    let mut seen = Vec::new();
    let next_line = |seen: &mut Vec<String>| {
        let line = lines
            .recv_timeout(crate::common::PATIENCE)
            .expect("wshub logged nothing more");
        seen.push(line.clone());
        line
    };
    let addr: std::net::SocketAddr = loop {
        let line = plain(&next_line(&mut seen));
        if let Some(rest) = line.split("addr=").nth(1) {
            break rest.split_whitespace().next().unwrap().parse().unwrap();
        }
    };
    // A newline, a forged line after it, and a terminal escape (OSC: set
    // the window title), percent-encoded in the query.
    let forged = "2026-01-01T00:00:00.000000Z  INFO wshub: forged admin login";
    let userid = format!("mallory\n{forged}\u{1b}]0;owned\u{7}");
    let query: String = serde_urlencoded::to_string([("userid", userid.as_str())]).unwrap();
    let client = Client::connect(addr, &format!("/ws?{query}")).await;
    client.close().await;
    while !plain(&next_line(&mut seen)).contains("connection closed") {}
    for line in &seen {
        assert!(
            !line.contains("forged admin login") || line.contains("connection"),
            "a client id started a log line of its own:\n{}",
            seen.join("\n")
        );
        assert!(
            !line.contains("\u{1b}]0;"),
            "a client id put a raw terminal escape in the log: {line:?}"
        );
    }
    assert!(
        seen.iter().any(|l| l.contains("forged admin login")),
        "the connection was logged with its (escaped) user id"
    );
}
