//! The sample backend (examples/chat-backend) end to end: two hub nodes on
//! one Redis forward chat messages to it; it renders Markdown, keeps
//! history, and answers through the broadcast endpoint.

use crate::common::TestServer;
use crate::common::redis::RedisServer;
use serde_json::{Value, json};
use wshub_chat_backend::{ChatEntry, Settings, serve};

fn entry(msg: &Value) -> ChatEntry {
    serde_json::from_str(msg["message"].as_str().expect("message is JSON text"))
        .expect("a chat entry")
}

/// Serves the sample backend on `listener` (bound first, so that its URL
/// can go into the hub's configuration), pushing to the hub at `hub`.
fn serve_sample(
    listener: tokio::net::TcpListener,
    hub: std::net::SocketAddr,
    keep: usize,
    max_bytes: usize,
) {
    let settings = Settings {
        hub: format!("http://{hub}"),
        keep,
        max_bytes,
        hub_key: None,
    };
    tokio::spawn(serve(listener, settings));
}

#[tokio::test]
async fn markdown_chat_with_history_across_two_nodes() {
    let redis = RedisServer::start();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend_url = format!(
        "http://{}/app/__websocket.wwd",
        listener.local_addr().unwrap()
    );
    let with_backend = |c: &mut wshub::Config| {
        c.backend = wshub::Config::load_from(
            None,
            [
                ("WSHUB_BACKEND__URL".to_owned(), backend_url.clone()),
                ("WSHUB_BACKEND__EVENTS".to_owned(), "true".to_owned()),
            ],
        )
        .unwrap()
        .backend;
    };
    let n0 = TestServer::on_redis(&redis.url(), with_backend).await;
    let n1 = TestServer::on_redis(&redis.url(), with_backend).await;
    // The backend pushes through node 0; its messages reach node 1 via Redis.
    serve_sample(listener, n0.addr, 10, 65536);

    let mut ann = n0.connect("ann", Some("room")).await;
    let mut bob = n1.connect("bob", Some("room")).await;
    let mut eve = n1.connect("eve", Some("elsewhere")).await;
    // Each newcomer is sent the (empty) history.
    for c in [&mut ann, &mut bob, &mut eve] {
        let first = c.recv().await;
        assert_eq!(first["action"], "initialmessages");
        assert_eq!(first["message"], "[]");
    }

    ann.send_json(json!({
        "action": "broadcastchatmessage",
        "userId": "someone-else",
        "message": "**bold** and <script>alert(1)</script><img src=x onerror=alert(2)>",
        "recipients": [{"type": "group", "value": "room"}],
    }))
    .await;
    for c in [&mut ann, &mut bob] {
        let msg = c.recv().await;
        assert_eq!(msg["action"], "broadcastchatmessage");
        assert_eq!(
            msg["userId"], "ann",
            "the verified sender, not what the body claimed"
        );
        let e = entry(&msg);
        assert!(e.html.contains("<strong>bold</strong>"), "{}", e.html);
        assert!(
            !e.html.contains("<script") && !e.html.contains("onerror"),
            "{}",
            e.html
        );
    }

    // A latecomer on the other node receives the history, addressed to them.
    let mut carol = n1.connect("carol", Some("room")).await;
    let initial = carol.recv().await;
    assert_eq!(initial["action"], "initialmessages");
    assert_eq!(
        initial["recipients"],
        json!([{"type": "user", "value": "carol"}])
    );
    let earlier: Vec<ChatEntry> =
        serde_json::from_str(initial["message"].as_str().unwrap()).unwrap();
    assert_eq!(earlier.len(), 1);
    assert_eq!(earlier[0].user_id, "ann");
    assert!(earlier[0].html.contains("<strong>bold</strong>"));

    // Nobody else got carol's history, and the other group saw nothing.
    let tag = carol.send_sentinel().await;
    for c in [&mut ann, &mut bob, &mut eve] {
        assert!(c.until_sentinel(&tag).await.is_empty());
    }
}

/// Lossless resume (docs/resume.md): the backend pushes the history on a
/// `wshub.connect` only when the hub did not resume the socket (no
/// `X-Wshub-Resume`, or `none`); a recovered socket was replayed what it
/// missed, and a page that speaks resume asks with `getinitialmessages`
/// (answered whatever the hub said). The connect events are posted here
/// directly, as the hub would, with each value of the header.
#[tokio::test]
async fn history_is_pushed_on_connect_only_when_the_hub_did_not_resume() {
    let hub = TestServer::start().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = format!(
        "http://{}/app/__websocket.wwd",
        listener.local_addr().unwrap()
    );
    serve_sample(listener, hub.addr, 10, 65536);
    let mut ann = hub.connect("ann", Some("room")).await;

    let http = reqwest::Client::new();
    let post = |action: &'static str, event: Option<&'static str>, resume: Option<&'static str>| {
        let mut request = http
            .post(&backend)
            .header("content-type", "application/json")
            .header("x-wshub-user-id", "ann")
            .header("x-wshub-group-id", "room");
        if let Some(value) = resume {
            request = request.header("x-wshub-resume", value);
        }
        // The hub's events carry X-Wshub-Event (a client message never).
        if let Some(event) = event {
            request = request.header("x-wshub-event", event);
        }
        let body = json!({"userId": "ann", "groupId": "room", "action": action,
            "message": r#"{"recovered":false,"replayed":0}"#, "recipients": []});
        request.body(body.to_string()).send()
    };
    // Each answered only after its push (if any) reached the hub: in order.
    let connect = Some("connect");
    for (action, event, resume, label) in [
        ("wshub.connect", connect, Some("recovered"), ""),
        ("wshub.connect", connect, Some("not_recovered"), ""),
        ("wshub.connect", connect, Some("none"), "none"),
        ("wshub.connect", connect, None, "no header"),
        ("getinitialmessages", None, Some("recovered"), "asked"),
        // The connect action without the event header is not the hub's
        // (which refuses it from clients anyway): nothing pushed.
        ("wshub.connect", None, None, "not an event"),
    ] {
        let response = post(action, event, resume)
            .await
            .expect("the backend answers");
        assert_eq!(response.status(), 204, "{action} {resume:?} {label}");
    }
    let tag = ann.send_sentinel().await;
    let got = ann.until_sentinel(&tag).await;
    let actions: Vec<_> = got.iter().map(|m| m["action"].clone()).collect();
    assert_eq!(
        actions,
        vec![json!("initialmessages"); 3],
        "pushed for `none`, without the header, and when asked; not for a resumed socket: {got:?}"
    );
    for m in &got {
        assert_eq!(m["groupId"], "room", "says which group's history it is");
        assert_eq!(m["recipients"], json!([{"type": "user", "value": "ann"}]));
    }
}

/// The history a newcomer is sent is one request to the hub, so no bigger
/// than its `limits.max_message_bytes`: the newest messages that fit. A
/// message the hub refused is not kept. (A review saw 50 messages of 700
/// characters make every newcomer's history a 413, and a refused message
/// kept.)
#[tokio::test]
async fn a_newcomer_gets_the_newest_history_that_fits_one_request() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend_url = format!("http://{}/ws", listener.local_addr().unwrap());
    let mut config = wshub::Config::load_from(
        None,
        [
            ("WSHUB_BACKEND__URL".to_owned(), backend_url),
            ("WSHUB_BACKEND__EVENTS".to_owned(), "true".to_owned()),
            (
                "WSHUB_LIMITS__MAX_MESSAGE_BYTES".to_owned(),
                "16384".to_owned(),
            ),
        ],
    )
    .unwrap();
    config.listen = "127.0.0.1:0".parse().unwrap();
    let hub = TestServer::with(config).await;
    serve_sample(listener, hub.addr, 50, 16384);
    let mut ann = hub.connect("ann", Some("room")).await;
    assert_eq!(ann.recv().await["message"], "[]");
    for i in 0..50 {
        let text = format!("{i:02} {}", "x".repeat(700));
        ann.send_json(json!({"action": "broadcastchatmessage", "message": text}))
            .await;
        assert_eq!(ann.recv().await["action"], "broadcastchatmessage");
    }
    // Too big for the hub once rendered: refused, told, not kept.
    ann.send_json(json!({"action": "broadcastchatmessage", "message": "y".repeat(15000)}))
        .await;
    let refused = ann.recv().await;
    assert_eq!(refused["action"], "wshub.error", "{refused}");
    assert!(
        refused["message"]
            .as_str()
            .unwrap()
            .ends_with("backend answered 413"),
        "{refused}"
    );

    let mut bob = hub.connect("bob", Some("room")).await;
    let initial = bob.recv().await;
    assert_eq!(initial["action"], "initialmessages", "{initial}");
    let earlier: Vec<ChatEntry> =
        serde_json::from_str(initial["message"].as_str().unwrap()).unwrap();
    let numbers: Vec<&str> = earlier.iter().map(|e| &e.text[..2]).collect();
    let want: Vec<String> = (50 - earlier.len()..50)
        .map(|i| format!("{i:02}"))
        .collect();
    assert!(
        // Each about 1.5 KB: its text and its HTML, escaped twice.
        (9..=11).contains(&earlier.len()),
        "as many as fit in 16 KiB: {}",
        earlier.len()
    );
    assert_eq!(
        numbers, want,
        "the newest, in order, without the refused one"
    );
}

/// `groupid=` is the group "", which no recipient can name (a `group`
/// recipient "" is the null group): the sample pushed such a room's chat
/// to the sockets without a group, and its own members never saw it
/// (review of 2026-12-03). It refuses it, and the sender is told.
#[tokio::test]
async fn chat_from_the_group_with_no_name_is_refused_not_sent_to_the_null_group() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend_url = format!(
        "http://{}/app/__websocket.wwd",
        listener.local_addr().unwrap()
    );
    let mut config = crate::common::test_config();
    config.backend =
        wshub::Config::load_from(None, [("WSHUB_BACKEND__URL".to_owned(), backend_url)])
            .unwrap()
            .backend;
    let hub = TestServer::with(config).await;
    serve_sample(listener, hub.addr, 10, 65536);
    let mut unnamed = hub.connect("ann", Some("")).await;
    let mut nogroup = hub.connect("bob", None).await;
    unnamed
        .send_json(json!({"action": "broadcastchatmessage", "message": "for the room"}))
        .await;
    let reply = unnamed.recv().await;
    assert_eq!(reply["action"], "wshub.error", "{reply}");
    assert!(
        reply["message"]
            .as_str()
            .unwrap()
            .contains("was not processed: backend answered 422"),
        "{reply}"
    );
    let tag = unnamed.send_sentinel().await;
    let seen = nogroup.until_sentinel(&tag).await;
    assert!(seen.is_empty(), "the null group got {seen:?}");
}
