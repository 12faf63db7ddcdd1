//! One node, over real sockets: routing, frames, bad input, limits, slow
//! consumers, pings, shutdown, and the HTTP endpoints.

use std::time::Duration;

use crate::common::{Client, Ended, TestServer, eventually, routing::routing_table, test_config};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;
use wshub::Config;

#[tokio::test]
async fn routing_table_on_one_node() {
    let server = TestServer::start().await;
    routing_table(&[server.addr]).await;
}

#[tokio::test]
async fn outbound_frame_has_the_protocol_shape() {
    let server = TestServer::start().await;
    let mut a = server.connect("a", Some("g")).await;
    a.send_text(r#"{"recipients":[{"type":2,"value":"a"}],"extra":1,"message":"hi \"you\"","action":"broadcastchatmessage","groupId":"g","userId":"a"}"#)
        .await;
    assert_eq!(
        a.recv_text().await,
        r#"{"userId":"a","groupId":"g","action":"broadcastchatmessage","message":"hi \"you\"","recipients":[{"type":"user","value":"a"}]}"#
    );
    a.send_text(r#"{"action":"broadcast"}"#).await;
    assert_eq!(
        a.recv_text().await,
        r#"{"userId":null,"groupId":null,"action":"broadcast","message":null,"recipients":[]}"#
    );
}

#[tokio::test]
async fn per_sender_order_is_kept() {
    let server = TestServer::start().await;
    let mut rx = server.connect("rx", Some("g")).await;
    let mut tx = server.connect("tx", None).await;
    for i in 0..500 {
        tx.send_json(json!({"action": "n", "message": i.to_string(), "recipients": [{"type": "group", "value": "g"}]}))
            .await;
    }
    for i in 0..500 {
        assert_eq!(rx.recv().await["message"], i.to_string());
    }
}

/// Every refused message: the sender gets `wshub.error` saying why, nobody
/// else gets anything, and the socket stays open.
#[tokio::test]
async fn bad_input_is_answered_and_harms_nobody() {
    let mut config = test_config();
    config.limits.max_id_bytes = 32;
    config.limits.max_recipients = 3;
    let server = TestServer::with(config).await;
    let mut bad = server.connect("bad", Some("g")).await;
    let mut other = server.connect("other", Some("g")).await;

    let long = "x".repeat(33);
    let cases: Vec<(Message, &str)> = vec![
        (Message::text("not json"), "invalid message"),
        (Message::text(r#"{"action":"x""#), "EOF"),
        (Message::text("[1,2]"), "message object"),
        (
            Message::text(r#"{"message":{"a":1}}"#),
            "`message` to be a string",
        ),
        (
            Message::text(r#"{"message":12}"#),
            "`message` to be a string",
        ),
        (
            Message::text(r#"{"recipients":{"type":"group"}}"#),
            "`recipients` to be an array",
        ),
        (
            Message::text(r#"{"recipients":[{"type":"room","value":"g"}]}"#),
            "recipient `type` must be",
        ),
        (
            Message::text(r#"{"recipients":[{"type":9,"value":"g"}]}"#),
            "recipient `type` must be",
        ),
        (
            Message::text(r#"{"recipients":["g"]}"#),
            "{type, value} object",
        ),
        (
            Message::text(format!(r#"{{"userId":"{long}"}}"#)),
            "`userId` is longer than 32 bytes",
        ),
        (
            Message::text(format!(r#"{{"recipients":[{{"value":"{long}"}}]}}"#)),
            "is longer than 32 bytes",
        ),
        (
            Message::text(r#"{"recipients":[{},{},{},{}]}"#),
            "4 recipients, at most 3",
        ),
        (
            Message::binary(vec![0xff, 0xfe, 0x00]),
            "binary frames must contain UTF-8",
        ),
    ];
    let count = cases.len();
    for (frame, want) in cases {
        bad.ws.send(frame.clone()).await.unwrap();
        let reply = bad.recv().await;
        assert_eq!(reply["action"], "wshub.error", "{frame:?}");
        let text = reply["message"].as_str().unwrap();
        assert!(
            text.contains(want),
            "{frame:?}: got {text:?}, want {want:?}"
        );
    }
    // Still open, and `other` saw only what came after.
    let tag = bad.send_sentinel().await;
    assert!(bad.until_sentinel(&tag).await.is_empty());
    assert!(other.until_sentinel(&tag).await.is_empty());
    assert_eq!(
        server.metric("wshub_messages_dropped_total{reason=\"invalid\"}"),
        count as f64
    );
}

#[tokio::test]
async fn binary_frame_with_json_is_accepted_like_text() {
    let server = TestServer::start().await;
    let mut a = server.connect("a", None).await;
    a.ws.send(Message::binary(
        br#"{"action":"bin","message":"ok"}"#.to_vec(),
    ))
    .await
    .unwrap();
    let got = a.recv().await;
    assert_eq!(
        (got["action"].as_str(), got["message"].as_str()),
        (Some("bin"), Some("ok"))
    );
}

#[tokio::test]
async fn oversized_message_closes_with_1009_and_others_carry_on() {
    let mut config = test_config();
    config.limits.max_message_bytes = 2048;
    let server = TestServer::with(config).await;
    let mut big = server.connect("big", None).await;
    let mut other = server.connect("other", None).await;
    let body = format!(r#"{{"action":"x","message":"{}"}}"#, "y".repeat(2048));
    big.send_text(body).await;
    assert_eq!(
        big.ended().await,
        Ended::Closed(1009, "Message too big".into())
    );
    let tag = other.send_sentinel().await;
    assert!(other.until_sentinel(&tag).await.is_empty());
    // Counted, as the broadcast endpoint's 413 is (review of 2026-12-03).
    assert_eq!(
        server.metric("wshub_messages_dropped_total{reason=\"too_big\"}"),
        1.0
    );
}

/// A message may come in pieces (a client other than a browser may stream
/// one), up to 1,024 frames; one in more frames is too big, whatever its
/// bytes. Before, a client that began a message and sent nothing but empty
/// continuation frames kept a core busy as long as it liked, counted
/// nowhere and never closed (review of 2026-12-03).
#[tokio::test]
async fn a_message_in_too_many_frames_closes_with_1009_and_others_carry_on() {
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    let server = TestServer::start().await;
    let mut other = server.connect("other", None).await;
    let mut streamer = server.connect("streamer", None).await;
    // The most pieces allowed: relayed whole.
    let body = r#"{"action":"pieces","message":"ok"}"#;
    let pieces = 1024;
    for i in 0..pieces {
        let (opcode, data) = match i {
            0 => (Data::Text, body.as_bytes()),
            _ => (Data::Continue, &b""[..]),
        };
        let frame = Frame::message(data.to_vec(), OpCode::Data(opcode), i + 1 == pieces);
        streamer.ws.feed(Message::Frame(frame)).await.unwrap();
    }
    streamer.ws.flush().await.unwrap();
    let got = other.recv().await;
    assert_eq!(
        (got["action"].as_str(), got["message"].as_str()),
        (Some("pieces"), Some("ok"))
    );
    // Empty pieces without end: closed once there are too many.
    let mut flooder = server.connect("flooder", None).await;
    let start = Frame::message(b"{".to_vec(), OpCode::Data(Data::Text), false);
    flooder.ws.feed(Message::Frame(start)).await.unwrap();
    for _ in 0..2000 {
        let piece = Frame::message(Vec::new(), OpCode::Data(Data::Continue), false);
        if flooder.ws.feed(Message::Frame(piece)).await.is_err() {
            break;
        }
    }
    let _ = flooder.ws.flush().await;
    assert_eq!(
        flooder.ended().await,
        Ended::Closed(1009, "Message too big".into())
    );
    let tag = other.send_sentinel().await;
    let seen = other.until_sentinel(&tag).await;
    assert!(
        seen.iter().all(|m| m["action"] == "pieces"),
        "nothing of the flood reached others: {seen:?}"
    );
    assert_eq!(
        server.metric("wshub_messages_dropped_total{reason=\"too_big\"}"),
        1.0
    );
}

/// A message over the byte limit, then pieces without end: the close reads
/// and discards what follows until the client closes, and counting its
/// frames must not end that early (the connection would be reset with the
/// 1009 unread, which a browser reports as 1006).
#[tokio::test]
async fn a_message_over_the_limit_then_endless_pieces_still_gets_its_1009() {
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    let mut config = test_config();
    config.limits.max_message_bytes = 2048;
    let server = TestServer::with(config).await;
    let mut big = server.connect("big", None).await;
    let start = Frame::message(vec![b'x'; 2000], OpCode::Data(Data::Text), false);
    let _ = big.ws.feed(Message::Frame(start)).await;
    let over = Frame::message(vec![b'x'; 100], OpCode::Data(Data::Continue), false);
    let _ = big.ws.feed(Message::Frame(over)).await;
    for _ in 0..50_000 {
        let piece = Frame::message(Vec::new(), OpCode::Data(Data::Continue), false);
        if big.ws.feed(Message::Frame(piece)).await.is_err() {
            break;
        }
    }
    let _ = big.ws.flush().await;
    assert_eq!(
        big.ended().await,
        Ended::Closed(1009, "Message too big".into())
    );
}

/// A message far over the limit: the hub refuses it from its header and
/// cannot read the rest as frames. It must still read (and discard) what
/// the client sends until the client closes: closing with it unread
/// resets the connection, and Chromium then drops the 1009 frame and
/// reports 1006 (reviewer, 66 KB to 1 MB against the default 64 KiB).
/// This client reads the close frame either way; the browser test
/// (tests/browser/library.test.mjs, "far over") is the one that failed.
#[tokio::test]
async fn a_message_far_over_the_limit_still_gets_its_1009() {
    let mut config = test_config();
    config.limits.max_message_bytes = 2048;
    let server = TestServer::with(config).await;
    for size in [100_000, 1_000_000] {
        let mut big = server.connect("big", None).await;
        let body = format!(r#"{{"action":"x","message":"{}"}}"#, "y".repeat(size));
        big.send_text(body).await;
        assert_eq!(
            big.ended().await,
            Ended::Closed(1009, "Message too big".into()),
            "{size} bytes"
        );
        // The hub closes its side after the close frame: the stream ends
        // at once, not when the close timeout (2 s) runs out (reviewer:
        // every such close took 2 s while the hub waited for the client's
        // end of the connection and the client for the hub's).
        let started = std::time::Instant::now();
        while let Ok(Some(Ok(_))) =
            tokio::time::timeout(crate::common::PATIENCE, big.ws.next()).await
        {}
        assert!(
            started.elapsed() < std::time::Duration::from_secs(1),
            "{size} bytes: the connection ended after {:?}",
            started.elapsed()
        );
    }
}

#[tokio::test]
async fn a_client_that_never_reads_is_dropped_while_others_keep_receiving() {
    let mut config = test_config();
    config.limits.outbound_queue_bytes = 256 * 1024;
    let server = TestServer::with(config).await;
    let mut slow = server.connect("slow", None).await;
    let mut fast = server.connect("fast", None).await;
    let mut sender = server.connect("sender", Some("s")).await;
    // 60 KB frames: the slow client's socket buffers fill after a few MB,
    // then its queue, and it is closed. `fast` reads every message in step,
    // so its queue never holds more than one.
    let payload = "z".repeat(60_000);
    let mut sent = 0;
    while server.metric("wshub_connections_closed_total{code=\"4000\",reason=\"slow_consumer\"}")
        == 0.0
    {
        assert!(sent < 2_000, "the slow client was never dropped");
        sender
            .send_json(json!({"action": "load", "message": payload, "recipients": [{"type": "group", "value": ""}]}))
            .await;
        assert_eq!(fast.recv().await["action"], "load", "message {sent}");
        sent += 1;
        if server.node.connections() == 2 {
            break;
        }
    }
    eventually("the slow client leaves the hub", || {
        server.node.connections() == 2
    })
    .await;
    // The slow client sees the close code (after its buffered frames), or
    // the connection simply ends if the close frame could not be written.
    match slow.ended().await {
        Ended::Closed(code, _) => assert_eq!(code, 4000),
        Ended::Dropped => {}
    }
    // The others are unaffected.
    let tag = sender.send_sentinel().await;
    assert!(fast.until_sentinel(&tag).await.is_empty());
    assert_eq!(
        server.metric("wshub_connections_closed_total{code=\"4000\",reason=\"slow_consumer\"}"),
        1.0
    );
}

#[tokio::test(start_paused = true)]
async fn a_peer_that_stops_answering_pings_is_closed() {
    let mut config = test_config();
    config.ws.ping_interval = Duration::from_secs(30);
    let server = TestServer::with(config).await;
    // Not reading means not answering pings. The server pings at 30 s and
    // gives up at 60 s; virtual time advances only through our sleeps.
    let mut silent = server.connect("silent", None).await;
    tokio::time::sleep(Duration::from_secs(59)).await;
    assert_eq!(
        server.node.connections(),
        1,
        "still connected before two intervals"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        server.node.connections(),
        0,
        "dropped after two silent intervals"
    );
    let mut saw_ping = false;
    let end = loop {
        match silent.ws.next().await {
            Some(Ok(Message::Ping(_))) => saw_ping = true,
            Some(Ok(Message::Close(Some(frame)))) => break Some(u16::from(frame.code)),
            Some(Ok(_)) => {}
            _ => break None,
        }
    };
    assert!(saw_ping, "the server pinged");
    assert_eq!(end, Some(4001));
}

#[tokio::test]
async fn a_peer_that_answers_pings_stays_connected() {
    let mut config = test_config();
    config.ws.ping_interval = Duration::from_millis(20);
    let server = TestServer::with(config).await;
    let mut a = server.connect("a", None).await;
    // Reading answers pings (tungstenite replies on the next read or write).
    let mut pings = 0;
    while pings < 10 {
        match tokio::time::timeout(crate::common::PATIENCE, a.ws.next())
            .await
            .unwrap()
        {
            Some(Ok(Message::Ping(_))) => pings += 1,
            other => panic!("expected pings, got {other:?}"),
        }
    }
    a.send_json(json!({"action": "still", "message": "here"}))
        .await;
    assert_eq!(a.recv().await["action"], "still");
}

#[tokio::test]
async fn shutdown_closes_every_socket_with_1001_and_returns() {
    let server = TestServer::start().await;
    let mut clients = Vec::new();
    for i in 0..5 {
        clients.push(server.connect(&format!("u{i}"), Some("g")).await);
    }
    // One client does not answer the close handshake, which holds the node
    // in its draining state long enough to observe it.
    let stubborn = server.connect("stubborn", None).await;
    server.shutdown.cancel();
    for c in &mut clients {
        assert_eq!(
            c.ended().await,
            Ended::Closed(1001, "Server shutting down".into())
        );
    }
    let ready = server.get("/readyz").await;
    assert_eq!(ready.status(), 503);
    assert!(ready.text().await.unwrap().contains("draining"));
    let handle = server.handle;
    tokio::time::timeout(crate::common::PATIENCE, handle)
        .await
        .expect("run returns within the grace period")
        .unwrap()
        .expect("run returns Ok");
    drop(stubborn);
    assert!(
        tokio_tungstenite::connect_async(format!("ws://{}/ws", server.addr))
            .await
            .is_err(),
        "no longer accepting"
    );
}

#[tokio::test]
async fn draining_node_refuses_new_sockets() {
    let server = TestServer::start().await;
    server.node.drain_sockets_now();
    let err = tokio_tungstenite::connect_async(format!("ws://{}/ws", server.addr))
        .await
        .unwrap_err();
    match err {
        tokio_tungstenite::tungstenite::Error::Http(resp) => assert_eq!(resp.status(), 503),
        other => panic!("expected HTTP 503, got {other:?}"),
    }
}

#[tokio::test]
async fn socket_paths_and_query_keys_are_case_insensitive() {
    let server = TestServer::start().await;
    let mut a = Client::connect(
        server.addr,
        "/__INITIALIZEwebsocket.WC?GroupID=g&UserId=ann",
    )
    .await;
    let mut b = Client::connect(server.addr, "/ws?groupid=g").await;
    b.send_json(json!({"action": "hi", "recipients": [{"type": "user", "value": "ann"}]}))
        .await;
    assert_eq!(a.recv().await["action"], "hi");
    b.send_json(json!({"action": "grp", "recipients": [{"type": "group", "value": "g"}]}))
        .await;
    assert_eq!(a.recv().await["action"], "grp");
    assert_eq!(b.recv().await["action"], "grp");
}

#[tokio::test]
async fn missing_userid_gets_a_random_id_and_missing_groupid_is_the_null_group() {
    let server = TestServer::start().await;
    let mut anon = Client::connect(server.addr, "/ws").await;
    let mut sender = server.connect("s", Some("x")).await;
    sender
        .send_json(json!({"action": "null-group", "recipients": [{"type": "group", "value": ""}]}))
        .await;
    assert_eq!(anon.recv().await["action"], "null-group");
}

#[tokio::test]
async fn plain_get_of_the_socket_path_is_404() {
    let server = TestServer::start().await;
    assert_eq!(
        server
            .get("/__initializeWebSocket.wc?userid=a")
            .await
            .status(),
        404
    );
    assert_eq!(server.get("/ws").await.status(), 404);
    assert_eq!(server.get("/nothing-here").await.status(), 404);
}

#[tokio::test]
async fn overlong_ids_in_the_query_are_refused() {
    let mut config = test_config();
    config.limits.max_id_bytes = 12;
    let server = TestServer::with(config).await;
    let err =
        tokio_tungstenite::connect_async(format!("ws://{}/ws?userid=1234567890123", server.addr))
            .await
            .unwrap_err();
    match err {
        tokio_tungstenite::tungstenite::Error::Http(resp) => {
            assert_eq!(resp.status(), 400);
            let body =
                String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default()).into_owned();
            assert!(
                body.contains("the user id is longer than 12 bytes"),
                "{body}"
            );
        }
        other => panic!("expected HTTP 400, got {other:?}"),
    }
}

#[tokio::test]
async fn http_broadcast_delivers_and_answers_204() {
    let server = TestServer::start().await;
    let mut a = server.connect("a", Some("g")).await;
    let mut b = server.connect("b", Some("h")).await;
    let resp = server
        .post(
            "/app/__broadcastWebSocket.wc",
            r#"{"action":"fromserver","message":"m","recipients":[{"type":"group","value":"g"}]}"#,
        )
        .await;
    assert_eq!(resp.status(), 204);
    assert!(resp.bytes().await.unwrap().is_empty());
    assert_eq!(a.recv().await["action"], "fromserver");
    // PUT works too, and any path containing the marker in any case.
    let resp = reqwest::Client::new()
        .put(server.url("/x/y/__BROADCASTWEBSOCKET.WC?z=1"))
        .body(r#"{"action":"put","recipients":[{"type":"user","value":"b"}]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    assert_eq!(b.recv().await["action"], "put");
    // A UTF-8 byte-order mark in front of the JSON (review of 2026-12-03:
    // 400 "not JSON") is read past.
    let resp = server
        .post(
            "/__broadcastWebSocket.wc",
            "\u{feff}{\"action\":\"bom\",\"recipients\":[{\"type\":\"user\",\"value\":\"b\"}]}",
        )
        .await;
    assert_eq!(resp.status(), 204);
    assert_eq!(b.recv().await["action"], "bom");
    assert_eq!(
        server.metric("wshub_http_broadcast_requests_total{status=\"204\"}"),
        3.0
    );
}

#[tokio::test]
async fn http_broadcast_rejects_bad_requests_with_a_reason() {
    let mut config = test_config();
    config.limits.max_message_bytes = 1024;
    let server = TestServer::with(config).await;
    let mut a = server.connect("a", None).await;

    let resp = server.post("/__broadcastWebSocket.wc", "{oops").await;
    assert_eq!(resp.status(), 400);
    assert!(resp.text().await.unwrap().contains("invalid message"));

    let resp = server
        .post("/__broadcastWebSocket.wc", r#"{"message":1}"#)
        .await;
    assert_eq!(resp.status(), 400);
    assert!(
        resp.text()
            .await
            .unwrap()
            .contains("`message` to be a string")
    );

    let resp = server
        .post("/__broadcastWebSocket.wc", "x".repeat(2000))
        .await;
    assert_eq!(resp.status(), 413);
    // A byte-order mark does not count against the limit; the message
    // does, to the byte (over it by 1 to 3 bytes: the room the mark has).
    let exactly = |n: usize| {
        let head = r#"{"action":"bom","message":""#;
        let tail = r#""}"#;
        format!("{head}{}{tail}", "y".repeat(n - head.len() - tail.len()))
    };
    let resp = server
        .post(
            "/__broadcastWebSocket.wc",
            format!("\u{feff}{}", exactly(1024)),
        )
        .await;
    assert_eq!(resp.status(), 204, "{}", resp.text().await.unwrap());
    assert_eq!(a.recv().await["action"], "bom");
    for over in [1025, 1027] {
        let resp = server.post("/__broadcastWebSocket.wc", exactly(over)).await;
        assert_eq!(resp.status(), 413, "{over}");
    }

    let resp = server.get("/__broadcastWebSocket.wc").await;
    assert_eq!(resp.status(), 405);

    // Any route's 405 says why, and which methods it takes.
    let resp = server.post("/healthz", "x".to_owned()).await;
    assert_eq!(resp.status(), 405);
    assert_eq!(resp.headers()["allow"], "GET,HEAD");
    assert_eq!(
        resp.text().await.unwrap(),
        "method not allowed: POST (see the Allow header)\n"
    );

    // None of it reached the socket.
    let tag = a.send_sentinel().await;
    assert!(a.until_sentinel(&tag).await.is_empty());
}

#[tokio::test]
async fn static_files_and_health() {
    let server = TestServer::start().await;
    for path in [
        "/scripts/webconnection-websocket.js",
        "/scripts/web-connection-websocket.js",
    ] {
        let resp = server.get(path).await;
        assert_eq!(resp.status(), 200, "{path}");
        assert!(
            resp.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/javascript")
        );
        assert!(
            resp.text()
                .await
                .unwrap()
                .contains("export class WebConnectionWebSocket")
        );
    }
    let resp = server.get("/scripts/webconnection-websocket.d.ts").await;
    assert_eq!(resp.status(), 200);
    assert!(
        resp.text()
            .await
            .unwrap()
            .contains("declare class WebConnectionWebSocket")
    );
    let resp = server.get("/").await;
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let page = resp.text().await.unwrap();
    assert!(
        page.contains("/scripts/webconnection-websocket.js")
            && page.contains("broadcastchatmessage")
    );
    assert_eq!(server.get("/healthz").await.status(), 200);
    assert_eq!(server.get("/readyz").await.status(), 200);
}

#[tokio::test]
async fn metrics_count_connections_and_messages() {
    let server = TestServer::start().await;
    let mut a = server.connect("a", None).await;
    let mut b = server.connect("b", None).await;
    a.send_json(json!({"action": "x"})).await;
    a.recv().await;
    b.recv().await;
    let resp = server.get("/metrics").await;
    // OpenMetrics, as the text is (review of 2026-12-03: it said 0.0.4).
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text; version=1.0.0")
    );
    let text = resp.text().await.unwrap();
    for line in [
        "# TYPE wshub_connections_opened counter",
        "# TYPE wshub_connections_closed counter",
        "# TYPE wshub_messages_received counter",
        "# TYPE wshub_messages_delivered counter",
        "# TYPE wshub_messages_dropped counter",
        "# TYPE wshub_http_broadcast_requests counter",
        "# TYPE wshub_backend_forwards counter",
        "# TYPE wshub_bus_channels gauge",
        "# TYPE wshub_bus_delivery_latency_seconds histogram",
        // Every label value exists from the start, at 0.
        "wshub_messages_dropped_total{reason=\"slow_consumer\"} 0",
        "wshub_connections_closed_total{code=\"4000\",reason=\"slow_consumer\"} 0",
        "# TYPE wshub_connections gauge",
        "wshub_connections 2",
        "wshub_connections_opened_total 2",
        "wshub_messages_received_total 1",
        "wshub_messages_delivered_total 2",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }
    a.close().await;
    eventually("a's close is counted", || {
        server.metric("wshub_connections_closed_total{code=\"1000\",reason=\"normal\"}") == 1.0
    })
    .await;
    assert_eq!(server.metric("wshub_connections"), 1.0);
}

/// The client's own close is answered with 1000 `Socket closed`, whatever
/// code it sent (Web Connection's answer; README's close codes), and a
/// close code the protocol does not allow with 1002 `Protocol error`. A
/// review found the client's frame echoed instead (an empty close answered
/// with an empty one, which a browser reports as 1005).
#[tokio::test]
async fn client_close_is_answered_with_socket_closed() {
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;
    let server = TestServer::start().await;
    let sent = [
        (None, (1000, "Socket closed")),
        (Some((1000, "bye")), (1000, "Socket closed")),
        (Some((4321, "")), (1000, "Socket closed")),
        (Some((3000, "x")), (1000, "Socket closed")),
        // A client's own 1002 is a close like any other.
        (Some((1002, "you erred")), (1000, "Socket closed")),
        (Some((999, "")), (1002, "Protocol error")),
    ];
    for (close, want) in sent {
        let mut a = server.connect("a", None).await;
        let frame = close.map(|(code, reason): (u16, &str)| CloseFrame {
            code: code.into(),
            reason: reason.into(),
        });
        a.ws.close(frame).await.unwrap();
        // The server completes the handshake: the stream ends after its
        // close frame.
        let mut answer = None;
        while let Some(Ok(msg)) = a.ws.next().await {
            if let Message::Close(frame) = msg {
                answer = frame.map(|f| (u16::from(f.code), f.reason.to_string()));
            }
        }
        let answer = answer.unwrap_or_else(|| panic!("{close:?}: no close frame with a code"));
        assert_eq!((answer.0, answer.1.as_str()), want, "{close:?}");
    }
    eventually("the sockets left the hub", || {
        server.node.connections() == 0
    })
    .await;
    assert_eq!(
        server.metric("wshub_connections_closed_total{code=\"1002\",reason=\"protocol_error\"}"),
        1.0
    );
}

/// A client that ends its TCP connection (FIN) without a close frame is
/// counted and logged as a lost connection, 1006, as README's close codes
/// say of a dropped connection; not as a protocol error (review of issue
/// 19: tungstenite reports the missing handshake as a protocol error, and
/// the hub counted it as 1002).
#[tokio::test]
async fn a_tcp_close_without_a_close_frame_counts_as_1006() {
    use tokio::io::AsyncWriteExt;
    let server = TestServer::start().await;
    let mut a = server.connect("a", None).await;
    match a.ws.get_mut() {
        tokio_tungstenite::MaybeTlsStream::Plain(stream) => stream.shutdown().await.unwrap(),
        _ => unreachable!("a plain loopback socket"),
    }
    eventually("the socket left the hub", || server.node.connections() == 0).await;
    assert_eq!(
        server.metric("wshub_connections_closed_total{code=\"1006\",reason=\"connection_lost\"}"),
        1.0
    );
}

/// Connects `user` and floods the server with pings without ever reading,
/// so that the pongs tungstenite owes fill the socket's buffers (about
/// 7.5 MB of pongs, more than loopback's send buffer and the unread
/// receive buffer hold). Then lets virtual time pass, so that the next
/// server ping is written into the full socket and blocks.
///
/// Runs on paused time: virtual time advances only when every task is idle,
/// so the sleep at the end is reached with the session already blocked.
async fn block_a_session_in_its_ping_write(server: &crate::common::TestServer) -> Client {
    let mut flooder = server.connect("flooder", None).await;
    let payload = vec![7u8; 125];
    for _ in 0..60_000 {
        let send = flooder.ws.send(Message::Ping(payload.clone().into()));
        // A session blocked in a write stops reading, and then our sends
        // block too: the socket is as full as it gets.
        if tokio::time::timeout(crate::common::PATIENCE, send)
            .await
            .is_err()
        {
            break;
        }
    }
    tokio::time::sleep(server.node.config.ws.ping_interval * 3).await;
    flooder
}

/// Waits, on paused time, until the node holds no socket.
async fn until_no_socket_within(server: &crate::common::TestServer, limit: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while server.node.connections() > 0 {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    true
}

/// Issue 11, item 4: a session blocked writing a ping to a peer that never
/// reads still closes, at once, when the node drains.
#[tokio::test(start_paused = true)]
async fn a_session_blocked_in_a_ping_write_still_sees_the_drain() {
    let mut config = test_config();
    config.ws.ping_interval = Duration::from_millis(100);
    let server = TestServer::with(config).await;
    let _flooder = block_a_session_in_its_ping_write(&server).await;
    server.node.drain_sockets_now();
    assert!(
        until_no_socket_within(&server, Duration::from_secs(1)).await,
        "the drain's 1001 was ignored by a session blocked in its ping write"
    );
    // Counted closed once its closing handshake is over (a drained socket
    // still publishes what its client sends until then), which the peer
    // that does not read holds for the close's time limit.
    let closed = "wshub_connections_closed_total{code=\"1001\",reason=\"going_away\"}";
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while server.metric(closed) == 0.0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(server.metric(closed), 1.0);
}

/// Issue 11, item 4: a write the peer never takes ends at the write
/// deadline (`ws.write_timeout_ms`), closing the socket as a slow consumer,
/// even with nothing else going on.
#[tokio::test(start_paused = true)]
async fn a_write_the_peer_never_takes_ends_at_the_write_deadline() {
    let mut config = test_config();
    config.ws.ping_interval = Duration::from_millis(100);
    let server = TestServer::with(config).await;
    let _flooder = block_a_session_in_its_ping_write(&server).await;
    assert!(
        until_no_socket_within(&server, Duration::from_secs(120)).await,
        "a session blocked in a write was never closed"
    );
    assert_eq!(
        server.metric("wshub_connections_closed_total{code=\"4000\",reason=\"slow_consumer\"}"),
        1.0
    );
}

/// A client of `user` whose socket has a fixed 64 KB receive buffer:
/// without it, Linux may grow the buffer of a socket that is not read to
/// tens of megabytes, and a test that stops reading would never block the
/// node's writes.
async fn small_buffer_client(server: &TestServer, user: &str) -> Client {
    small_buffer_client_at(server, &format!("userid={user}")).await
}

/// [`small_buffer_client`] with the socket URL's `query`.
async fn small_buffer_client_at(server: &TestServer, query: &str) -> Client {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(64 * 1024).unwrap();
    let stream = socket.connect(server.addr).await.unwrap();
    let (ws, _) = tokio_tungstenite::client_async(
        format!("ws://{}/ws?{query}", server.addr),
        tokio_tungstenite::MaybeTlsStream::Plain(stream),
    )
    .await
    .unwrap();
    Client { ws }
}

/// Issue 11, item 7: what a client receives before the drain's close is a
/// prefix of what was queued for it: the frame being written when the 1001
/// arrived is neither dropped nor overtaken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_mid_write_delivers_a_prefix_without_gaps() {
    const N: usize = 2_000;
    let mut config = test_config();
    config.limits.outbound_queue_bytes = 64 * 1024 * 1024;
    let server = TestServer::with(config).await;
    let mut slow = small_buffer_client(&server, "slow").await;
    let mut watch = server.connect("watch", None).await;
    let mut tx = server.connect("tx", None).await;
    // 2,000 × 8 KB: far more than the socket buffers hold while `slow`
    // does not read (loopback's send buffer grows to 4 MB at most), so its
    // session is blocked mid-batch.
    let pad = "p".repeat(8_000);
    for i in 0..N {
        tx.send_json(json!({"action": "seq", "message": format!("{i:06}{pad}"),
            "recipients": [{"type": "user", "value": "slow"}]}))
            .await;
    }
    // Per-sender order: once `watch` has this, every frame above is queued
    // for `slow` (or already written).
    tx.send_json(json!({"action": "marker", "recipients": [{"type": "user", "value": "watch"}]}))
        .await;
    assert_eq!(watch.recv().await["action"], "marker");
    // `slow`'s session is blocked flushing a batch of one frame (it wrote
    // each frame as it arrived), which loses nothing when abandoned.
    // Reading half of the frames wakes it (Linux wakes a writer only once
    // a third of the send buffer is free); it then writes batches of 64
    // from its full queue, on the other worker thread, until the socket is
    // full again and it blocks in the middle of a batch.
    let seq = |text: &str| -> usize {
        let at = text.find(r#""message":""#).expect("a message field") + 11;
        text[at..at + 6].parse().expect("a sequence number")
    };
    for i in 0..N / 2 {
        assert_eq!(seq(&slow.recv_text().await), i);
    }
    // Close while the session is in a batch write (`slow` reads nothing
    // more until the 1001 is set), as SIGTERM does to a congested socket.
    server.node.drain_sockets_now();
    let mut next = N / 2;
    let end = loop {
        match tokio::time::timeout(crate::common::PATIENCE, slow.ws.next())
            .await
            .expect("the socket neither delivered nor ended")
        {
            Some(Ok(Message::Text(text))) => {
                assert_eq!(
                    seq(&text),
                    next,
                    "a gap in what was delivered before the close"
                );
                next += 1;
                assert!(next <= N, "more frames than were sent");
            }
            Some(Ok(Message::Close(frame))) => break frame.map(|f| u16::from(f.code)),
            Some(Ok(_)) => {}
            Some(Err(_)) | None => break None,
        }
    };
    // Either everything and the 1001, or (when the closing handshake ran
    // out of time) a prefix and the end of the connection.
    assert!(end == Some(1001) || end.is_none(), "closed with {end:?}");
    assert!(end.is_none() || next == N, "1001 after only {next} of {N}");
}

/// Issue 19: a client that reads in step, then stops reading while far
/// more than its socket holds is queued (its session blocked mid-write),
/// then reads again, gets every frame once and in order, before, during
/// and after. (The guard for any change to who writes a socket's frames:
/// an experiment that let deliveries write to idle sockets themselves
/// passed it too; docs/architecture.md, "The delivery path".)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_pauses_gets_every_frame_once_and_in_order() {
    const N: usize = 1_500;
    let mut config = test_config();
    config.limits.outbound_queue_bytes = 64 * 1024 * 1024;
    let server = TestServer::with(config).await;
    // The socket fills after a few hundred frames of 8 KB.
    let mut paused = small_buffer_client(&server, "paused").await;
    let mut watch = server.connect("watch", None).await;
    let mut tx = server.connect("tx", None).await;
    let seq = |text: &str| -> usize {
        let at = text.find(r#""message":""#).expect("a message field") + 11;
        text[at..at + 6].parse().expect("a sequence number")
    };
    let pad = "p".repeat(8_000);
    let send = |i: usize| {
        json!({"action": "seq", "message": format!("{i:06}{pad}"),
            "recipients": [{"type": "user", "value": "paused"}]})
    };
    // Read in step first: every frame is written as it arrives.
    for i in 0..10 {
        tx.send_json(send(i)).await;
        assert_eq!(seq(&paused.recv_text().await), i);
    }
    // Then stop reading while far more than the socket holds is sent.
    for i in 10..N {
        tx.send_json(send(i)).await;
    }
    tx.send_json(json!({"action": "marker", "recipients": [{"type": "user", "value": "watch"}]}))
        .await;
    assert_eq!(watch.recv().await["action"], "marker");
    // Read again: everything, once, in order; then in step again.
    for i in 10..N {
        assert_eq!(seq(&paused.recv_text().await), i, "a gap or a repeat");
    }
    for i in N..N + 10 {
        tx.send_json(send(i)).await;
        assert_eq!(seq(&paused.recv_text().await), i);
    }
    let tag = tx.send_sentinel().await;
    assert!(
        paused.until_sentinel(&tag).await.is_empty(),
        "more than was sent"
    );
}

/// Issue 19, delivery lanes: a group of more sockets than a delivering
/// task writes itself (its messages queued and written by the lanes, one
/// per worker), with messages to a user of the group and to a reader that
/// pauses in between (small deliveries, written directly when the socket
/// is idle): every socket gets its messages once and in the order sent,
/// across the two paths, while one of them stops reading and resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_big_fanout_and_small_deliveries_keep_each_sockets_order() {
    const MEMBERS: usize = 100; // more than DIRECT_MAX (64)
    const N: usize = 600;
    let mut config = test_config();
    config.limits.outbound_queue_bytes = 64 * 1024 * 1024;
    let server = TestServer::with(config).await;
    let mut members = Vec::new();
    for i in 0..MEMBERS {
        members.push(server.connect(&format!("m{i}"), Some("big")).await);
    }
    let mut paused = small_buffer_client_at(&server, "userid=paused&groupid=big").await;
    let mut tx = server.connect("tx", None).await;
    let pad = "p".repeat(2_000);
    // Even messages to the group, odd ones to `m7` and `paused` only.
    let expected = |user: &str| -> Vec<usize> {
        (0..N)
            .filter(|i| i % 2 == 0 || user == "m7" || user == "paused")
            .collect()
    };
    for i in 0..N {
        let to = if i % 2 == 0 {
            json!([{"type": "group", "value": "big"}])
        } else {
            json!([{"type": "user", "value": "m7"}, {"type": "user", "value": "paused"}])
        };
        tx.send_json(json!({"action": "seq", "message": format!("{i:06}{pad}"), "recipients": to}))
            .await;
    }
    let seq = |text: &str| -> usize {
        let at = text.find(r#""message":""#).expect("a message field") + 11;
        text[at..at + 6].parse().expect("a sequence number")
    };
    // `paused` has not read yet: far more than its socket holds is owed
    // to it now. Everyone else reads in turn.
    for (i, member) in members.iter_mut().enumerate() {
        let user = format!("m{i}");
        let mut got = Vec::new();
        for _ in 0..expected(&user).len() {
            got.push(seq(&member.recv_text().await));
        }
        assert_eq!(got, expected(&user), "{user}: a gap, a repeat or a swap");
    }
    let mut got = Vec::new();
    for _ in 0..expected("paused").len() {
        got.push(seq(&paused.recv_text().await));
    }
    assert_eq!(got, expected("paused"), "paused: a gap, a repeat or a swap");
    // Nothing more than was sent.
    let tag = tx.send_sentinel().await;
    for member in members.iter_mut().chain([&mut paused]) {
        assert!(
            member.until_sentinel(&tag).await.is_empty(),
            "more than was sent"
        );
    }
}

/// Issue 11, item 10: the smallest `limits.outbound_queue_bytes` the
/// configuration accepts holds one maximal message as it is sent out
/// (re-encoded with every field and recipient type written, plus the
/// queue's per-frame overhead), so such a message closes nobody.
#[tokio::test]
async fn the_smallest_accepted_queue_holds_one_maximal_message() {
    let accepts = |queue: usize| {
        let mut raw = wshub::config::RawConfig::default();
        raw.limits.max_message_bytes = 1024;
        raw.limits.outbound_queue_bytes = queue;
        Config::from_raw(raw).ok()
    };
    // Binary search for the smallest accepted value (at most 31 steps).
    let (mut lo, mut hi) = (1usize, 1usize << 30);
    assert!(accepts(hi).is_some());
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if accepts(mid).is_some() {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    let mut config = test_config();
    config.limits = accepts(hi).unwrap().limits;
    let server = TestServer::with(config).await;
    let mut a = server.connect("a", None).await;
    let mut b = server.connect("b", None).await;
    // 100 recipients `{}` become `{"type":"group","value":null}` each: the
    // 1,024-byte message goes out at several times its size.
    let recipients = vec!["{}"; 100].join(",");
    let head = r#"{"action":"max","recipients":["#.to_owned() + &recipients + r#"],"message":""#;
    let text = format!("{head}{}\"}}", "m".repeat(1024 - head.len() - 2));
    assert_eq!(text.len(), 1024);
    a.send_text(text).await;
    for c in [&mut a, &mut b] {
        assert_eq!(c.recv().await["action"], "max", "queue of {hi} bytes");
    }
    let tag = a.send_sentinel().await;
    assert!(b.until_sentinel(&tag).await.is_empty());
}

/// Issue 13 item 4: every label of every labelled family is on /metrics
/// from the start, at 0, so rates and alerts work before the first event
/// (the broadcast endpoint's 401 once was missing).
#[tokio::test]
async fn metrics_list_every_label_of_every_family_at_start() {
    use wshub::outcome::{
        BroadcastStatus, CloseReason, DropReason, ForwardResult, HeadError, RefusalReason,
    };
    let server = TestServer::start().await;
    let text = reqwest::get(server.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let mut want = Vec::new();
    for r in CloseReason::ALL {
        want.push(format!(
            "wshub_connections_closed_total{{code=\"{}\",reason=\"{}\"}} 0",
            r.code(),
            r.label()
        ));
    }
    for r in DropReason::ALL {
        want.push(format!(
            "wshub_messages_dropped_total{{reason=\"{}\"}} 0",
            r.label()
        ));
    }
    for r in RefusalReason::ALL {
        want.push(format!(
            "wshub_connections_refused_total{{reason=\"{}\"}} 0",
            r.label()
        ));
    }
    for s in BroadcastStatus::ALL {
        want.push(format!(
            "wshub_http_broadcast_requests_total{{status=\"{}\"}} 0",
            s.code()
        ));
    }
    for r in ForwardResult::ALL {
        want.push(format!(
            "wshub_backend_forwards_total{{result=\"{}\"}} 0",
            r.label()
        ));
    }
    for k in HeadError::ALL {
        want.push(format!(
            "wshub_http_connection_errors_total{{kind=\"{}\"}} 0",
            k.label()
        ));
    }
    for line in want {
        assert!(
            text.lines().any(|l| l == line),
            "missing from /metrics at start: {line}"
        );
    }
}
