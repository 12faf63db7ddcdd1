//! The sample backend (examples/chat-backend) end to end: two hub nodes on
//! one Redis forward chat messages to it; it renders Markdown, keeps
//! history, and answers through the broadcast endpoint.

mod common;

use common::TestServer;
use common::redis::RedisServer;
use serde_json::{Value, json};
use wshub_chat_backend::{ChatEntry, Settings, serve};

fn entry(msg: &Value) -> ChatEntry {
    serde_json::from_str(msg["message"].as_str().expect("message is JSON text"))
        .expect("a chat entry")
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
    let settings = Settings {
        hub: format!("http://{}", n0.addr),
        keep: 10,
        hub_key: None,
    };
    tokio::spawn(serve(listener, settings));

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
