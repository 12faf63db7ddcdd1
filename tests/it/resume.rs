//! Lossless resume over real sockets, nodes and Redis (`src/resume.rs`;
//! contract `reference/resume.md`): the welcome, replays that are
//! recovered and the ones that honestly are not, exactly once through the
//! first-matching-topic rule, live copies during a replay, the drain
//! handoff of unmodified pages, the backend's view, and history off
//! changing nothing. Each test starts its own `redis-server` (missing: the
//! test fails).
//!
//! "Nothing else arrived" is a sentinel published after the messages under
//! test from the same node (one publish queue, one script order), never a
//! sleep; the only sleep waits out `history.ttl_ms` itself.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::http::HeaderMap;
use serde_json::{Map, Value, json};
use tokio::sync::mpsc;
use wshub::config::HistoryConfig;

use crate::common::redis::{GateProxy, RedisServer, cli};
use crate::common::{Client, Ended, PATIENCE, TestServer, eventually};

use crate::common::history_settings as settings;

/// A node on `redis` with `history` (None: history off).
pub async fn node(redis: &str, history: Option<HistoryConfig>) -> TestServer {
    TestServer::on_redis(redis, move |c| c.history = history).await
}

pub fn parse(text: &str) -> Value {
    serde_json::from_str(text).expect("JSON")
}

/// Publishes `body` through `server`'s broadcast endpoint.
pub async fn publish(server: &TestServer, body: Value) {
    let response = server
        .post("/__broadcastWebSocket.wc", body.to_string())
        .await;
    assert_eq!(response.status(), 204, "{body}");
}

pub fn say(text: &str, recipients: Value) -> Value {
    json!({"action": "say", "message": text, "recipients": recipients})
}

pub fn to_group(g: &str) -> Value {
    json!({"type": "group", "value": g})
}

pub fn to_user(u: &str) -> Value {
    json!({"type": "user", "value": u})
}

pub fn except(u: &str) -> Value {
    json!({"type": "excludeUser", "value": u})
}

static TAGS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Publishes a sentinel to everyone through `server`; returns its text.
pub async fn sentinel(server: &TestServer) -> String {
    let n = TAGS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tag = format!("resume-sentinel-{n}");
    publish(server, json!({"action": "broadcast", "message": tag})).await;
    tag
}

/// A socket that only watches: once it has seen a sentinel published
/// after some messages, Redis has run them (one script order), so their
/// history is written.
pub struct Watcher(Client);

impl Watcher {
    pub async fn on(server: &TestServer) -> Self {
        Self(server.connect("watcher", Some("watchers")).await)
    }

    pub async fn settle(&mut self, server: &TestServer) {
        let tag = sentinel(server).await;
        self.0.until_sentinel(&tag).await;
    }
}

/// A page, as the JS library's `resume: true` keeps it: its ids and the
/// last position seen per topic key.
pub struct Page {
    user: String,
    group: Option<String>,
    pub positions: Map<String, Value>,
}

impl Page {
    pub fn new(user: &str, group: Option<&str>) -> Self {
        Self {
            user: user.into(),
            group: group.map(Into::into),
            positions: Map::new(),
        }
    }

    pub fn keys(&self) -> [String; 3] {
        let group = match &self.group {
            Some(g) => format!("group:{g}"),
            None => "nullgroup".into(),
        };
        ["all".into(), group, format!("user:{}", self.user)]
    }

    /// The socket path with `resume` set to `resume` (None: no parameter).
    pub fn path(&self, resume: Option<&str>) -> String {
        let mut query = vec![("userid", self.user.clone())];
        if let Some(g) = &self.group {
            query.push(("groupid", g.clone()));
        }
        if let Some(r) = resume {
            query.push(("resume", r.to_owned()));
        }
        format!(
            "/__initializeWebSocket.wc?{}",
            serde_urlencoded::to_string(&query).unwrap()
        )
    }

    pub async fn open(&self, server: &TestServer, resume: Option<&str>) -> Client {
        Client::connect(server.addr, &self.path(resume)).await
    }

    /// Opens a socket that resumes from the positions kept, and reads its
    /// welcome.
    pub async fn resume(&mut self, server: &TestServer) -> (Client, Value) {
        let positions = Value::Object(self.positions.clone()).to_string();
        let mut client = self.open(server, Some(&positions)).await;
        let welcome = self.welcome(&mut client).await;
        (client, welcome)
    }

    /// Reads the first frame, which must be the welcome, and keeps its
    /// positions; returns its `message`.
    pub async fn welcome(&mut self, client: &mut Client) -> Value {
        let frame = client.recv().await;
        assert_eq!(frame["action"], "wshub.welcome", "the first frame: {frame}");
        let welcome = parse(frame["message"].as_str().unwrap());
        self.positions = welcome["positions"].as_object().unwrap().clone();
        welcome
    }

    /// Keeps the positions of a frame's `pos` for this page's keys.
    pub fn observe(&mut self, frame: &Value) {
        let keys = self.keys();
        if let Some(pos) = frame["pos"].as_object() {
            for (key, position) in pos {
                if keys.contains(key) {
                    self.positions.insert(key.clone(), position.clone());
                }
            }
        }
    }

    /// Every frame before the sentinel `tag` (observed), and the sentinel.
    pub async fn until(&mut self, client: &mut Client, tag: &str) -> (Vec<Value>, Value) {
        let mut seen = Vec::new();
        loop {
            let frame = client.recv().await;
            self.observe(&frame);
            if frame["message"] == tag {
                return (seen, frame);
            }
            seen.push(frame);
        }
    }
}

pub fn messages(frames: &[Value]) -> Vec<&str> {
    frames
        .iter()
        .map(|f| f["message"].as_str().unwrap())
        .collect()
}

/// The tops `page`'s identity would be welcomed with now (a fresh socket's
/// welcome), closed again.
pub async fn tops(server: &TestServer, page: &Page) -> Value {
    let mut fresh = Page::new(&page.user, page.group.as_deref());
    let mut client = fresh.open(server, Some("")).await;
    let welcome = fresh.welcome(&mut client).await;
    client.close().await;
    welcome["positions"].clone()
}

/// `welcome` says not recovered, from the current tops, and nothing is
/// replayed before a sentinel.
async fn assert_not_recovered(
    server: &TestServer,
    page: &mut Page,
    client: &mut Client,
    welcome: &Value,
    why: &str,
) {
    assert_eq!(welcome["recovered"], false, "{why}: {welcome}");
    assert_eq!(welcome["replayed"], 0, "{why}");
    assert_eq!(
        welcome["positions"],
        tops(server, page).await,
        "{why}: the tops"
    );
    let tag = sentinel(server).await;
    let (before, _) = page.until(client, &tag).await;
    assert!(before.is_empty(), "{why}: nothing replayed, got {before:?}");
}

// ---- Welcome and recovery ---------------------------------------------------

#[tokio::test]
async fn a_fresh_socket_is_welcomed_first_at_the_tops() {
    let redis = RedisServer::start();
    let server = node(&redis.url(), Some(settings())).await;
    let mut watcher = Watcher::on(&server).await;
    publish(&server, say("before", json!([]))).await;
    publish(&server, say("to chat", json!([to_group("chat")]))).await;
    watcher.settle(&server).await;

    let mut ann = Page::new("ann", Some("chat"));
    let mut client = ann.open(&server, Some("")).await;
    let frame = parse(&client.recv_text().await);
    let fields: Vec<&str> = frame
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.as_str())
        .collect();
    assert_eq!(
        fields,
        ["action", "groupId", "message", "recipients", "userId"],
        "the five usual fields: {frame}"
    );
    assert_eq!(frame["action"], "wshub.welcome");
    assert_eq!(frame["userId"], "ann");
    assert_eq!(frame["groupId"], "chat");
    assert_eq!(frame["recipients"], json!([]));
    let welcome = parse(frame["message"].as_str().unwrap());
    assert_eq!(welcome["recovered"], false);
    assert_eq!(welcome["replayed"], 0);
    assert_eq!(welcome["node"], server.node.config.node_id.as_str());
    let positions = welcome["positions"].as_object().unwrap();
    assert_eq!(
        positions.keys().collect::<Vec<_>>(),
        ["all", "group:chat", "user:ann"]
    );
    let offset = |key: &str| -> u64 {
        let p = positions[key].as_str().unwrap();
        p.rsplit_once(':').unwrap().1.parse().unwrap()
    };
    // The two messages and the watcher's sentinel went to `all`.
    assert_eq!(offset("all"), 2);
    assert_eq!(offset("group:chat"), 1);
    assert_eq!(offset("user:ann"), 0, "a topic never published to");
    ann.positions = positions.clone();

    // Nothing from before the tops; live messages carry `pos`.
    let tag = sentinel(&server).await;
    let (before, live) = ann.until(&mut client, &tag).await;
    assert!(before.is_empty(), "{before:?}");
    let all_epoch = positions["all"]
        .as_str()
        .unwrap()
        .rsplit_once(':')
        .unwrap()
        .0;
    assert_eq!(live["pos"], json!({"all": format!("{all_epoch}:3")}));
}

/// Ann (user `ann`, group `chat`) opens a resume socket on `one`, takes one
/// live message and leaves; while she is away `two` publishes the route
/// mix the replay tests check: `m1`…`m6` are hers (everyone, her group, her
/// user, group+user both ways), the `--` ones are not (another group,
/// another user, `excludeUser` of her). Returns her page and a watcher on
/// `two` (the caller settles it its own way).
pub async fn ann_away_while_the_route_mix_is_sent(
    one: &TestServer,
    two: &TestServer,
) -> (Page, Watcher) {
    let watcher = Watcher::on(two).await;
    let mut ann = Page::new("ann", Some("chat"));
    let mut client = ann.open(one, Some("")).await;
    ann.welcome(&mut client).await;
    publish(one, say("live", json!([to_user("ann")]))).await;
    let frame = client.recv().await;
    ann.observe(&frame);
    assert_eq!(frame["message"], "live");
    client.close().await;

    // While ann is away, from the other node:
    for (text, recipients) in [
        ("m1 all", json!([])),
        ("m2 chat", json!([to_group("chat")])),
        ("m3 ann", json!([to_user("ann")])),
        ("m4 chat+ann", json!([to_group("chat"), to_user("ann")])),
        ("m5 ann+chat", json!([to_user("ann"), to_group("chat")])),
        ("-- other group", json!([to_group("other")])),
        ("-- bob", json!([to_user("bob")])),
        ("-- all but ann", json!([except("ann")])),
        ("-- chat but ann", json!([to_group("chat"), except("ann")])),
        ("m6 all", json!([])),
    ] {
        publish(two, say(text, recipients)).await;
    }
    (ann, watcher)
}

#[tokio::test]
async fn a_socket_that_reconnects_elsewhere_is_replayed_what_it_missed_once_in_order() {
    let redis = RedisServer::start();
    let (one, two) = (
        node(&redis.url(), Some(settings())).await,
        node(&redis.url(), Some(settings())).await,
    );
    let (mut ann, mut watcher) = ann_away_while_the_route_mix_is_sent(&one, &two).await;
    watcher.settle(&two).await;

    let (mut client, welcome) = ann.resume(&two).await;
    assert_eq!(welcome["recovered"], true, "{welcome}");
    let expected = ["m1 all", "m2 chat", "m3 ann", "m4 chat+ann", "m5 ann+chat"];
    // The watcher's sentinel went to everyone too.
    assert_eq!(welcome["replayed"], expected.len() + 2, "{welcome}");
    let tag = sentinel(&one).await;
    let (got, _) = ann.until(&mut client, &tag).await;
    let got_messages = messages(&got);
    let replayed: Vec<&str> = got_messages
        .iter()
        .copied()
        .filter(|m| !m.starts_with("resume-sentinel"))
        .collect();
    assert_eq!(
        replayed,
        [&expected[..], &["m6 all"]].concat(),
        "everything ann should have, each once (the group+user ones too), in order"
    );
    assert_eq!(got.len(), expected.len() + 2, "{got_messages:?}");
    for frame in &got {
        assert!(
            frame["pos"].is_object(),
            "every replayed frame has pos: {frame}"
        );
    }
    let both = got.iter().find(|f| f["message"] == "m4 chat+ann").unwrap();
    let pos = both["pos"].as_object().unwrap();
    assert!(
        pos.contains_key("group:chat") && pos.contains_key("user:ann"),
        "pos names every topic of the route: {both}"
    );
    client.close().await;

    // Straight back: nothing missed, recovered with nothing to replay.
    let (mut client, welcome) = ann.resume(&one).await;
    assert_eq!(welcome["recovered"], true, "{welcome}");
    assert_eq!(welcome["replayed"], 0);
    let tag = sentinel(&two).await;
    assert!(ann.until(&mut client, &tag).await.0.is_empty());
}

#[tokio::test]
async fn forged_keys_are_ignored() {
    let redis = RedisServer::start();
    let server = node(&redis.url(), Some(settings())).await;
    let mut watcher = Watcher::on(&server).await;
    let mut ann = Page::new("ann", Some("chat"));
    let mut client = ann.open(&server, Some("")).await;
    ann.welcome(&mut client).await;
    client.close().await;
    // Bob's and another group's topics, at 0 in their epochs.
    let mut bob = Page::new("bob", Some("secret"));
    let mut bobs = bob.open(&server, Some("")).await;
    let bob_at = bob.welcome(&mut bobs).await["positions"].clone();
    bobs.close().await;
    publish(&server, say("for bob", json!([to_user("bob")]))).await;
    publish(&server, say("for secret", json!([to_group("secret")]))).await;
    publish(&server, say("for ann", json!([to_user("ann")]))).await;
    watcher.settle(&server).await;

    ann.positions
        .insert("user:bob".into(), bob_at["user:bob"].clone());
    ann.positions
        .insert("group:secret".into(), bob_at["group:secret"].clone());
    let (mut client, welcome) = ann.resume(&server).await;
    assert_eq!(welcome["recovered"], true, "{welcome}");
    let keys: Vec<&String> = welcome["positions"].as_object().unwrap().keys().collect();
    assert_eq!(keys, ["all", "group:chat", "user:ann"], "only ann's topics");
    let tag = sentinel(&server).await;
    let (got, _) = ann.until(&mut client, &tag).await;
    let got = messages(&got);
    assert!(got.contains(&"for ann"), "{got:?}");
    assert!(
        !got.contains(&"for bob") && !got.contains(&"for secret"),
        "forged positions reveal nothing: {got:?}"
    );
}

// ---- Not recovered -----------------------------------------------------------

/// A node whose groups keep 3 messages, on a Redis with small stream nodes
/// (so that `MAXLEN ~` trims close to the size): the Redis, to keep, and
/// the node.
async fn trimming_group_node() -> (RedisServer, TestServer) {
    let redis = RedisServer::start_with(&["--stream-node-max-entries", "2"]);
    let server = node(
        &redis.url(),
        Some(HistoryConfig {
            size_group: 3,
            ..settings()
        }),
    )
    .await;
    (redis, server)
}

/// Opens ann on `server`, then publishes `missed` while she is away, then
/// resumes her: returns her page, socket and welcome.
async fn away_then_resume(
    server: &TestServer,
    missed: &[(&str, Value)],
    pause: Duration,
) -> (Page, Client, Value) {
    let mut watcher = Watcher::on(server).await;
    let mut ann = Page::new("ann", Some("chat"));
    let mut client = ann.open(server, Some("")).await;
    ann.welcome(&mut client).await;
    client.close().await;
    for (text, recipients) in missed {
        publish(server, say(text, recipients.clone())).await;
    }
    watcher.settle(server).await;
    tokio::time::sleep(pause).await;
    let (client, welcome) = ann.resume(server).await;
    (ann, client, welcome)
}

#[tokio::test]
async fn a_topic_that_overflowed_is_not_recovered() {
    let (_redis, server) = trimming_group_node().await;
    let missed: Vec<(String, Value)> = (0..20)
        .map(|i| (format!("m{i}"), json!([to_group("chat")])))
        .collect();
    let missed: Vec<(&str, Value)> = missed
        .iter()
        .map(|(t, r)| (t.as_str(), r.clone()))
        .collect();
    let (mut ann, mut client, welcome) = away_then_resume(&server, &missed, Duration::ZERO).await;
    assert_not_recovered(&server, &mut ann, &mut client, &welcome, "group trimmed").await;
}

#[tokio::test]
async fn more_than_max_replay_is_not_recovered_and_max_replay_is() {
    let redis = RedisServer::start();
    let server = node(
        &redis.url(),
        Some(HistoryConfig {
            max_replay: 4,
            ..settings()
        }),
    )
    .await;
    // Four messages for ann: the watcher's sentinel makes five.
    let missed = [
        ("a1", json!([to_user("ann")])),
        ("a2", json!([to_group("chat")])),
        ("a3", json!([to_user("ann")])),
        ("a4", json!([to_group("chat")])),
    ];
    let (mut ann, mut client, welcome) = away_then_resume(&server, &missed, Duration::ZERO).await;
    assert_not_recovered(&server, &mut ann, &mut client, &welcome, "over max_replay").await;
    client.close().await;
    // Three and the sentinel: exactly max_replay.
    let (_, _, welcome) = away_then_resume(&server, &missed[..3], Duration::ZERO).await;
    assert_eq!(welcome["recovered"], true, "{welcome}");
    assert_eq!(welcome["replayed"], 4);
}

/// Review of 2026-12-01 (docs/security.md): `history.max_replay_bytes`
/// bounds what a resume reads from history. Four messages of 2 KiB (and
/// the watcher's sentinel) are more than 6,000 bytes as stored; two are
/// not.
#[tokio::test]
async fn more_than_max_replay_bytes_is_not_recovered_and_less_is() {
    let redis = RedisServer::start();
    let server = node(
        &redis.url(),
        Some(HistoryConfig {
            max_replay_bytes: 6000,
            ..settings()
        }),
    )
    .await;
    let texts: Vec<String> = (1..=4)
        .map(|i| format!("b{i}-{}", "x".repeat(2048)))
        .collect();
    let missed: Vec<(&str, Value)> = texts
        .iter()
        .map(|t| (t.as_str(), json!([to_group("chat")])))
        .collect();
    let (mut ann, mut client, welcome) = away_then_resume(&server, &missed, Duration::ZERO).await;
    assert_not_recovered(
        &server,
        &mut ann,
        &mut client,
        &welcome,
        "over max_replay_bytes",
    )
    .await;
    client.close().await;
    let (_, _, welcome) = away_then_resume(&server, &missed[..2], Duration::ZERO).await;
    assert_eq!(welcome["recovered"], true, "{welcome}");
    assert_eq!(welcome["replayed"], 3);
}

/// `history.replay_budget_bytes`: a client that resumes far back and does
/// not read holds its replay's share of the node's budget (here 15 of 20
/// MB: the kernel takes a few MB, the rest waits in the node until the
/// write times out). Another resume that finds no room within
/// `redis.command_timeout_ms` is not recovered, welcomed at the tops; once
/// the first socket is gone, the next one is recovered. Without the budget
/// any number of such clients made the node hold any amount.
#[tokio::test]
async fn a_replay_that_does_not_fit_the_nodes_budget_is_not_recovered() {
    let redis = RedisServer::start();
    let server = TestServer::on_redis(&redis.url(), |c| {
        c.history = Some(HistoryConfig {
            replay_budget_bytes: 20 << 20,
            ..settings()
        });
        c.ws.write_timeout = Duration::from_secs(60);
    })
    .await;
    let big = "x".repeat(60_000);
    let texts: Vec<String> = (0..250).map(|i| format!("m{i} {big}")).collect();
    let missed: Vec<(&str, Value)> = texts
        .iter()
        .map(|t| (t.as_str(), json!([to_group("chat")])))
        .collect();
    let (mut ann, first, welcome) = away_then_resume(&server, &missed, Duration::ZERO).await;
    assert_eq!(welcome["recovered"], true, "{welcome}");
    // And the watcher's sentinel, to everyone.
    assert_eq!(welcome["replayed"], 251);
    // `first` reads no further: its replay holds 15 MB of the budget.
    let from = ann.positions.clone();
    let (second, welcome) = ann.resume(&server).await;
    assert_eq!(welcome["recovered"], false, "no room: {welcome}");
    second.close().await;
    drop(first);
    ann.positions = from;
    let (mut third, welcome) = ann.resume(&server).await;
    assert_eq!(welcome["recovered"], true, "room again: {welcome}");
    assert_eq!(welcome["replayed"], 251);
    let last = third.recv().await;
    assert!(last["message"].as_str().unwrap().starts_with("m0 "));
}

/// Review of issue 14, item 6: `max_replay` counts the messages the socket
/// accepts, not its topics' entries: four to replay (and the watcher's
/// sentinel) and three that exclude ann, with `max_replay` 5.
#[tokio::test]
async fn max_replay_counts_only_the_messages_the_socket_accepts() {
    let redis = RedisServer::start();
    let server = node(
        &redis.url(),
        Some(HistoryConfig {
            max_replay: 5,
            ..settings()
        }),
    )
    .await;
    let missed = [
        ("g1", json!([to_group("chat")])),
        ("x1", json!([except("ann"), to_group("chat")])),
        ("g2", json!([to_group("chat")])),
        ("x2", json!([except("ann"), to_group("chat")])),
        ("g3", json!([to_group("chat")])),
        ("x3", json!([except("ann"), to_group("chat")])),
        ("g4", json!([to_group("chat")])),
    ];
    let (mut ann, mut client, welcome) = away_then_resume(&server, &missed, Duration::ZERO).await;
    assert_eq!(welcome["recovered"], true, "{welcome}");
    assert_eq!(welcome["replayed"], 5);
    let tag = sentinel(&server).await;
    let (got, _) = ann.until(&mut client, &tag).await;
    let got: Vec<&str> = messages(&got)
        .into_iter()
        .filter(|m| !m.starts_with("resume-sentinel"))
        .collect();
    assert_eq!(got, ["g1", "g2", "g3", "g4"]);
}

/// Review of 2026-12-02: more messages that exclude ann than her group's
/// history holds, while she stays connected and receives nothing through
/// the group, left her position behind: a short drop after them (one
/// message missed) said `recovered: false`. The publish script keeps
/// her run of excluded messages, and the resume starts after it.
#[tokio::test]
async fn messages_that_exclude_a_client_do_not_leave_its_position_behind() {
    let (_redis, server) = trimming_group_node().await;
    excluded_then_away(&server, 1).await;
}

/// Ann in `chat` on `server` while 20 messages to her group exclude her
/// (her group's history holding 3), then away while one message to the
/// group that she should have and one more that excludes her are sent;
/// `settles` rounds of the watcher's sentinel make sure they ran. Her
/// resume must be recovered, replaying that one message.
pub async fn excluded_then_away(server: &TestServer, settles: usize) {
    let mut watcher = Watcher::on(server).await;
    let mut ann = Page::new("ann", Some("chat"));
    let mut client = ann.open(server, Some("")).await;
    ann.welcome(&mut client).await;
    let at_welcome = ann.positions.clone();
    for i in 0..20 {
        let text = format!("typing {i}");
        publish(server, say(&text, json!([to_group("chat"), except("ann")]))).await;
    }
    for _ in 0..settles {
        watcher.settle(server).await;
    }
    let tag = sentinel(server).await;
    let (before, _) = ann.until(&mut client, &tag).await;
    assert!(
        before.iter().all(|f| f["message"]
            .as_str()
            .unwrap()
            .starts_with("resume-sentinel")),
        "she was excluded: {before:?}"
    );
    assert_eq!(
        ann.positions["group:chat"], at_welcome["group:chat"],
        "her group position stayed where it was"
    );
    client.close().await;
    publish(server, say("while away", json!([to_group("chat")]))).await;
    publish(
        server,
        say("typing 20", json!([to_group("chat"), except("ann")])),
    )
    .await;
    for _ in 0..settles {
        watcher.settle(server).await;
    }
    let (mut client, welcome) = ann.resume(server).await;
    assert_eq!(welcome["recovered"], true, "{welcome}");
    // And the watcher's sentinels, to everyone.
    assert_eq!(welcome["replayed"], 1 + settles, "{welcome}");
    let tag = sentinel(server).await;
    let (got, _) = ann.until(&mut client, &tag).await;
    let got: Vec<&str> = messages(&got)
        .into_iter()
        .filter(|m| !m.starts_with("resume-sentinel"))
        .collect();
    assert_eq!(got, ["while away"]);
}

/// The run ends at a message the client should have had: one missed
/// before the excluded ones, and trimmed by them, is never passed over.
#[tokio::test]
async fn a_missed_message_before_excluded_ones_is_not_passed_over() {
    let (_redis, server) = trimming_group_node().await;
    let mut missed = vec![("for ann".to_owned(), json!([to_group("chat")]))];
    for i in 0..20 {
        missed.push((
            format!("typing {i}"),
            json!([to_group("chat"), except("ann")]),
        ));
    }
    let missed: Vec<(&str, Value)> = missed
        .iter()
        .map(|(t, r)| (t.as_str(), r.clone()))
        .collect();
    let (mut ann, mut client, welcome) = away_then_resume(&server, &missed, Duration::ZERO).await;
    assert_not_recovered(&server, &mut ann, &mut client, &welcome, "for ann trimmed").await;
}

/// Ann in `chat` on `server`, on a socket that speaks resume and has had
/// its welcome: the page, the socket and its connection id.
async fn ann_resuming(server: &TestServer) -> (Page, Client, String) {
    let mut ann = Page::new("ann", Some("chat"));
    let mut client = ann.open(server, Some("")).await;
    ann.welcome(&mut client).await;
    let cid = server.node.connection_ids()[0].clone();
    (ann, client, cid)
}

/// A message to a socket's connection and its user reaches it once, with
/// the user's position, so a resume from the positions it saw replays
/// nothing. (It took the connection's copy, which has no position: the
/// resume replayed the message a second time.)
#[tokio::test]
async fn a_message_to_a_connection_and_its_user_is_not_replayed() {
    let redis = RedisServer::start();
    let server = node(&redis.url(), Some(settings())).await;
    let (mut ann, mut client, cid) = ann_resuming(&server).await;
    let to_both = json!([{"type": "connection", "value": cid}, to_user("ann")]);
    publish(&server, say("once", to_both)).await;
    let tag = sentinel(&server).await;
    let (seen, _) = ann.until(&mut client, &tag).await;
    assert_eq!(messages(&seen), ["once"]);
    assert!(seen[0]["pos"]["user:ann"].is_string(), "{}", seen[0]);
    client.close().await;
    let (mut client, welcome) = ann.resume(&server).await;
    assert_eq!(welcome["recovered"], true, "{welcome}");
    assert_eq!(welcome["replayed"], 0, "{welcome}");
    let tag = sentinel(&server).await;
    let (seen, _) = ann.until(&mut client, &tag).await;
    assert!(seen.is_empty(), "{seen:?}");
}

/// Every message to a socket that speaks resume carries `pos`, one to its
/// connection (which has no history) an empty one: the client library
/// takes a frame without `pos` for the hub's own, so a backend's
/// `wshub.welcome` or `wshub.gap` to a connection, without it, reset the
/// page's positions and fired its handlers (review of 2026-12-02).
#[tokio::test]
async fn a_message_to_a_connection_carries_an_empty_pos() {
    let redis = RedisServer::start();
    let server = node(&redis.url(), Some(settings())).await;
    let (_ann, mut client, cid) = ann_resuming(&server).await;
    let to_conn = json!([{"type": "connection", "value": cid}]);
    let mut forged = say("{\"recovered\":true}", to_conn);
    forged["action"] = json!("wshub.welcome");
    publish(&server, forged).await;
    let frame = client.recv().await;
    assert_eq!(frame["action"], "wshub.welcome", "{frame}");
    assert_eq!(frame["pos"], json!({}), "relayed, so with pos: {frame}");
}

/// One sender's messages to a socket's connection and to its group reach
/// it in the order sent, history on. (The messages to connections of a
/// publish batch went in a plain pipeline ahead of the batch's script: a
/// review saw them overtake earlier group messages.)
#[tokio::test]
async fn messages_to_a_connection_and_to_its_group_keep_their_order() {
    let redis = RedisServer::start();
    let server = node(&redis.url(), Some(settings())).await;
    let mut client = server.connect("ann", Some("chat")).await;
    let cid = server.node.connection_ids()[0].clone();
    // One request: queued together, so sent in the same batches.
    let sent: Vec<Value> = (0..40)
        .map(|i| {
            let to = if i % 2 == 0 {
                json!([{"type": "connection", "value": cid}])
            } else {
                json!([to_group("chat")])
            };
            json!({"action": "m", "message": format!("m{i}"), "recipients": to})
        })
        .collect();
    let response = server
        .post("/api/publish", json!({"messages": sent}).to_string())
        .await;
    assert_eq!(response.status(), 200);
    let mut got = Vec::new();
    while got.len() < 40 {
        got.push(client.recv().await["message"].as_str().unwrap().to_owned());
    }
    let want: Vec<String> = (0..40).map(|i| format!("m{i}")).collect();
    assert_eq!(got, want);
}

#[tokio::test]
async fn history_older_than_its_ttl_is_not_recovered() {
    let redis = RedisServer::start();
    let server = node(
        &redis.url(),
        Some(HistoryConfig {
            ttl: Duration::from_millis(300),
            ..settings()
        }),
    )
    .await;
    let missed = [("old", json!([to_user("ann")]))];
    // Waiting out the ttl is what this test is about.
    let (mut ann, mut client, welcome) =
        away_then_resume(&server, &missed, Duration::from_millis(600)).await;
    assert_not_recovered(&server, &mut ann, &mut client, &welcome, "expired").await;
}

#[tokio::test]
async fn unknown_epochs_and_unreadable_or_missing_positions_are_not_recovered() {
    let redis = RedisServer::start();
    let server = node(&redis.url(), Some(settings())).await;
    let mut ann = Page::new("ann", Some("chat"));
    let mut client = ann.open(&server, Some("")).await;
    ann.welcome(&mut client).await;
    client.close().await;
    let good = ann.positions.clone();

    let mut epoch = good.clone();
    epoch.insert("all".into(), json!("gone:1"));
    let mut missing = good.clone();
    missing.remove("user:ann");
    let mut garbage = good.clone();
    garbage.insert("group:chat".into(), json!("not a position"));
    let epoch = Value::Object(epoch).to_string();
    let missing = Value::Object(missing).to_string();
    let garbage = Value::Object(garbage).to_string();
    for (why, value) in [
        ("an unknown epoch", epoch.as_str()),
        ("a missing topic", missing.as_str()),
        ("an unreadable position", garbage.as_str()),
        ("not JSON", "{\"all\":"),
    ] {
        let mut client = ann.open(&server, Some(value)).await;
        let welcome = ann.welcome(&mut client).await;
        assert_not_recovered(&server, &mut ann, &mut client, &welcome, why).await;
        client.close().await;
    }
    // The honest positions still recover (the sentinels since).
    ann.positions = good;
    let (_, welcome) = ann.resume(&server).await;
    assert_eq!(welcome["recovered"], true, "{welcome}");
}

/// Redis stops answering while a socket resumes: once the calls time out
/// (the tops tried again within the limit) there are no positions to
/// welcome it with, so the socket is closed with 1011 and no frame (never a
/// welcome with `positions: {}`); back once Redis answers, it is recovered.
#[tokio::test]
async fn history_that_does_not_answer_closes_the_socket_for_a_reconnect() {
    let redis = RedisServer::start();
    let server = TestServer::on_redis(&redis.url(), |c| {
        c.history = Some(settings());
        c.redis.as_mut().unwrap().command_timeout = Duration::from_millis(300);
    })
    .await;
    let mut ann = Page::new("ann", Some("chat"));
    // Keeps the node subscribed to ann's topics, so the next socket needs
    // no Redis to be admitted.
    let _anchor = ann.open(&server, None).await;
    let mut client = ann.open(&server, Some("")).await;
    ann.welcome(&mut client).await;
    client.close().await;

    redis.pause();
    let positions = Value::Object(ann.positions.clone()).to_string();
    let mut client = ann.open(&server, Some(&positions)).await;
    let ended = client.ended().await;
    redis.resume();
    // (No frame before it: the resume unit tests, `src/resume/tests.rs`.)
    assert_eq!(ended, Ended::Closed(1011, "Internal error".into()));
    server.wait_ready().await;
    let (_, welcome) = ann.resume(&server).await;
    assert_eq!(welcome["recovered"], true, "{welcome}");
}

// ---- Live copies during a replay -----------------------------------------------

/// The reading node's history reply is held (a gate proxy in front of
/// Redis) while more messages are published: their live copies reach the
/// socket's outbox while the snapshot of its topics is on its way, and
/// follow the replay, above its tops. Each is delivered once, in order.
#[tokio::test]
async fn live_copies_that_arrive_during_the_replay_are_not_duplicated() {
    let redis = RedisServer::start();
    let proxy = GateProxy::start(redis.port).await;
    // History calls wait for the held replies: give them time.
    let reader = TestServer::on_redis(&proxy.url(), |c| {
        c.history = Some(settings());
        c.redis.as_mut().unwrap().command_timeout = Duration::from_secs(20);
    })
    .await;
    let publisher = node(&redis.url(), Some(settings())).await;
    let mut watcher = Watcher::on(&publisher).await;
    let mut ann = Page::new("ann", Some("chat"));
    let mut client = ann.open(&reader, Some("")).await;
    ann.welcome(&mut client).await;
    client.close().await;
    publish(&publisher, say("before 1", json!([]))).await;
    publish(&publisher, say("before 2", json!([to_user("ann")]))).await;
    watcher.settle(&publisher).await;

    // Hold the replies of the reader's history connection from ann's first
    // read on.
    proxy.arm_on(b"h:{u:ann}:s");
    let positions = Value::Object(ann.positions.clone()).to_string();
    let path = ann.path(Some(&positions));
    let addr = reader.addr;
    let connecting = tokio::spawn(async move { Client::connect(addr, &path).await });
    proxy.held().await;
    let delivered = reader.metric("wshub_messages_delivered_total");
    for (text, recipients) in [
        ("during 1", json!([])),
        ("during 2", json!([to_group("chat"), to_user("ann")])),
        ("during 3", json!([to_user("ann")])),
    ] {
        publish(&publisher, say(text, recipients)).await;
    }
    // Their live copies are in ann's outbox (and the watcher's).
    eventually("the live copies were queued on the reader", || {
        reader.metric("wshub_messages_delivered_total") >= delivered + 3.0
    })
    .await;
    proxy.release();
    let mut client = connecting.await.unwrap();
    let welcome = ann.welcome(&mut client).await;
    assert_eq!(welcome["recovered"], true, "{welcome}");
    let tag = sentinel(&publisher).await;
    let (got, _) = ann.until(&mut client, &tag).await;
    let got: Vec<&str> = messages(&got)
        .into_iter()
        .filter(|m| !m.starts_with("resume-sentinel"))
        .collect();
    assert_eq!(
        got,
        ["before 1", "before 2", "during 1", "during 2", "during 3"],
        "each once, in order"
    );
}

/// A sender keeps sending, alternating between everyone and ann's group,
/// while ann leaves and resumes again and again, on one node and the
/// other: her topics grow while they are read, and there is never a quiet
/// moment. Each resume is recovered all the same (her topics are read in
/// one snapshot), and across her sockets ann receives every message once,
/// in the order sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumes_under_steady_traffic_are_recovered_once_in_order() {
    resumes_under_steady_traffic(0).await;
}

/// The same with 70 more sockets in ann's group on each node: every
/// message then reaches more sockets than a delivering task writes
/// itself, and ann's copies are written by the delivery lanes, which
/// check each against her floors as the session does (issue 19).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumes_under_steady_traffic_in_a_big_group_are_recovered_once_in_order() {
    resumes_under_steady_traffic(70).await;
}

async fn resumes_under_steady_traffic(fillers: usize) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let redis = RedisServer::start();
    // Ann reads more slowly than the sender sends: room for all she falls
    // behind by, so that no resume needs a trimmed entry.
    let roomy = HistoryConfig {
        size_all: 100_000,
        size_group: 100_000,
        max_replay: 100_000,
        ..settings()
    };
    let (one, two) = (
        node(&redis.url(), Some(roomy.clone())).await,
        node(&redis.url(), Some(roomy)).await,
    );
    // Members that never read (their copies wait in their sockets'
    // buffers and queues; none is closed within this test's traffic).
    let mut members = Vec::new();
    for i in 0..fillers {
        members.push(one.connect(&format!("m{i}"), Some("chat")).await);
        members.push(two.connect(&format!("n{i}"), Some("chat")).await);
    }
    let mut ann = Page::new("ann", Some("chat"));
    let mut client = ann.open(&two, Some("")).await;
    ann.welcome(&mut client).await;
    // The sender is in no topic it sends to.
    let mut sender = one.connect("sender", Some("senders")).await;
    let stop = Arc::new(AtomicBool::new(false));
    let stopping = stop.clone();
    let sending = tokio::spawn(async move {
        let mut n = 0usize;
        while !stopping.load(Ordering::Relaxed) {
            let recipients = if n.is_multiple_of(2) {
                json!([except("sender")])
            } else {
                json!([to_group("chat")])
            };
            sender.send_json(say(&format!("c{n}"), recipients)).await;
            n += 1;
            // Steady, not a flood: a sender far faster than ann reads
            // fills her outbound queue during a replay, and she is
            // rightly closed as a slow consumer (4000) instead.
            if n.is_multiple_of(5) {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        sender
            .send_json(say("end", json!([except("sender")])))
            .await;
        n
    });
    let mut seen: Vec<String> = Vec::new();
    for round in 0..12 {
        for _ in 0..100 {
            let frame = client.recv().await;
            ann.observe(&frame);
            seen.push(frame["message"].as_str().unwrap().to_owned());
        }
        client.close().await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        let server = if round % 2 == 0 { &one } else { &two };
        let (resumed, welcome) = ann.resume(server).await;
        assert_eq!(welcome["recovered"], true, "resume {round}: {welcome}");
        client = resumed;
    }
    stop.store(true, Ordering::Relaxed);
    let sent = sending.await.unwrap();
    let (rest, _) = ann.until(&mut client, "end").await;
    seen.extend(messages(&rest).into_iter().map(str::to_owned));
    let want: Vec<String> = (0..sent).map(|i| format!("c{i}")).collect();
    if let Some(i) = (0..seen.len().min(want.len())).find(|&i| seen[i] != want[i]) {
        let end = |v: &[String]| (i + 4).min(v.len());
        panic!(
            "not every message once in the order sent: from {i}, got {:?} where {:?} was due",
            &seen[i..end(&seen)],
            &want[i..end(&want)]
        );
    }
    assert_eq!(seen.len(), want.len(), "every message once");
    drop(members);
}

// ---- Drain handoff ---------------------------------------------------------

/// An unmodified page (no `resume`) on a node that shuts down: its
/// positions are stored before its 1001 close frame, and its next socket
/// (same identity, another node) is replayed what it missed, without a
/// welcome or `pos`.
#[tokio::test]
async fn a_legacy_page_is_handed_over_across_a_node_shutdown() {
    let redis = RedisServer::start();
    let (one, two) = (
        node(&redis.url(), Some(settings())).await,
        node(&redis.url(), Some(settings())).await,
    );
    let mut watcher = Watcher::on(&two).await;
    let page = Page::new("ann", Some("chat"));
    let mut client = page.open(&one, None).await;
    publish(&two, say("seen", json!([to_group("chat")]))).await;
    let seen = client.recv().await;
    assert_eq!(seen["message"], "seen");
    assert!(seen.get("pos").is_none(), "a legacy page never sees pos");

    let shutdown = tokio::spawn(one.node.shutdown(Duration::ZERO, Duration::from_secs(5)));
    match client.ended().await {
        Ended::Closed(code, _) => assert_eq!(code, 1001),
        other => panic!("expected 1001, got {other:?}"),
    }
    // Stored before the close frame was sent.
    let key = r#"wshub:ho:["ann","chat"]"#;
    assert_eq!(
        cli(redis.port, &["LLEN", key]).trim(),
        "1",
        "the handoff is in place"
    );
    shutdown.await.unwrap();

    publish(&two, say("missed 1", json!([to_user("ann")]))).await;
    publish(
        &two,
        say("missed 2", json!([to_group("chat"), to_user("ann")])),
    )
    .await;
    watcher.settle(&two).await;
    let mut client = page.open(&two, None).await;
    let tag = sentinel(&two).await;
    let mut got = Vec::new();
    loop {
        let text = client.recv_text().await;
        let frame = parse(&text);
        if frame["message"] == tag {
            break;
        }
        assert_ne!(
            frame["action"], "wshub.welcome",
            "no welcome for a legacy page"
        );
        assert!(frame.get("pos").is_none(), "no pos: {text}");
        got.push(frame);
    }
    let got: Vec<&str> = messages(&got)
        .into_iter()
        .filter(|m| !m.starts_with("resume-sentinel"))
        .collect();
    assert_eq!(
        got,
        ["missed 1", "missed 2"],
        "what it missed, once; not what it saw"
    );
    assert_eq!(two.metric("wshub_resume_total{result=\"recovered\"}"), 1.0);
    // Taken: another page with the identity starts as today.
    let mut again = page.open(&two, None).await;
    let tag = sentinel(&two).await;
    assert!(again.until_sentinel(&tag).await.is_empty());
}

/// Everything a legacy socket receives before a sentinel published now
/// through `server`, sentinels left out: no welcome, no `pos`.
async fn legacy_until_sentinel(server: &TestServer, client: &mut Client) -> Vec<String> {
    let tag = sentinel(server).await;
    let mut got = Vec::new();
    loop {
        let text = client.recv_text().await;
        let frame = parse(&text);
        if frame["message"] == tag {
            return got;
        }
        assert_ne!(frame["action"], "wshub.welcome", "no welcome: {text}");
        assert!(frame.get("pos").is_none(), "no pos: {text}");
        let message = frame["message"].as_str().unwrap();
        if !message.starts_with("resume-sentinel") {
            got.push(message.to_owned());
        }
    }
}

/// Review of 2026-12-03: a drained page goes on sending until it reads
/// its 1001, which waits for the drain handoff to be stored (as long as
/// `redis.command_timeout_ms` with Redis slow). What it sent meanwhile was
/// read and dropped, silently (up to two seconds of a page's messages on
/// every drain); it is published.
#[tokio::test]
async fn what_a_drained_page_sends_before_its_close_frame_is_published() {
    let redis = RedisServer::start();
    let proxy = GateProxy::start(redis.port).await;
    let draining = TestServer::on_redis(&proxy.url(), |c| {
        c.history = Some(settings());
        c.redis.as_mut().unwrap().command_timeout = Duration::from_secs(20);
    })
    .await;
    let other = node(&redis.url(), Some(settings())).await;
    let mut sender = Page::new("snd", Some("room")).open(&draining, None).await;
    let mut leaver = Page::new("lvr", Some("room")).open(&draining, None).await;
    let mut refused = Page::new("bad", Some("room")).open(&draining, None).await;
    let mut receiver = Page::new("rcv", Some("room")).open(&other, None).await;
    let say_to_room = |text: &str| json!({"action": "broadcast", "message": text, "recipients": [to_group("room")]});
    sender.send_json(say_to_room("warm")).await;
    assert_eq!(receiver.recv().await["message"], "warm");

    // The handoff's store is held: the 1001 waits for it.
    proxy.arm_on(b"RPUSH");
    let shutdown = tokio::spawn(
        draining
            .node
            .shutdown(Duration::ZERO, Duration::from_secs(30)),
    );
    proxy.held().await;
    for i in 0..5 {
        sender.send_json(say_to_room(&format!("during {i}"))).await;
    }
    // A page that closes meanwhile, before it read the 1001, is answered
    // as a client's close is: 1000 (it was the drain's 1001).
    use futures_util::SinkExt;
    leaver
        .ws
        .send(tokio_tungstenite::tungstenite::Message::Close(Some(
            tokio_tungstenite::tungstenite::protocol::CloseFrame {
                code: tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode::Normal,
                reason: "bye".into(),
            },
        )))
        .await
        .unwrap();
    // One with a code the protocol does not allow: 1002, as outside a drain.
    refused
        .ws
        .send(tokio_tungstenite::tungstenite::Message::Close(Some(
            tokio_tungstenite::tungstenite::protocol::CloseFrame {
                code: tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode::from(999),
                reason: "bad".into(),
            },
        )))
        .await
        .unwrap();
    proxy.release();
    match refused.ended().await {
        Ended::Closed(code, reason) => assert_eq!((code, &*reason), (1002, "Protocol error")),
        other => panic!("expected 1002, got {other:?}"),
    }
    match sender.ended().await {
        Ended::Closed(code, _) => assert_eq!(code, 1001),
        other => panic!("expected 1001, got {other:?}"),
    }
    match leaver.ended().await {
        Ended::Closed(code, reason) => assert_eq!((code, &*reason), (1000, "Socket closed")),
        other => panic!("expected 1000, got {other:?}"),
    }
    shutdown.await.unwrap();
    let mut got = Vec::new();
    for _ in 0..5 {
        got.push(receiver.recv().await["message"].clone());
    }
    assert_eq!(
        got,
        (0..5)
            .map(|i| json!(format!("during {i}")))
            .collect::<Vec<_>>(),
        "every message the page sent before its close, once, in order"
    );
}

/// Drains `server` and waits for `client`'s 1001.
async fn drained(server: TestServer, client: &mut Client) {
    let shutdown = tokio::spawn(server.node.shutdown(Duration::ZERO, Duration::from_secs(5)));
    match client.ended().await {
        Ended::Closed(code, _) => assert_eq!(code, 1001),
        other => panic!("expected 1001, got {other:?}"),
    }
    shutdown.await.unwrap();
}

/// Review of issue 14, item 3: two tabs of one identity closed at
/// different moments (two handoffs at different positions) and reconnecting
/// in the other order. Each takes one handoff but replays from the earliest
/// position stored for the identity: neither loses a message; the tab that
/// closed later sees what was published in between twice.
#[tokio::test]
async fn two_tabs_handed_over_at_different_moments_lose_nothing_in_any_order() {
    let redis = RedisServer::start();
    let (one, two, three) = (
        node(&redis.url(), Some(settings())).await,
        node(&redis.url(), Some(settings())).await,
        node(&redis.url(), Some(settings())).await,
    );
    let mut watcher = Watcher::on(&three).await;
    let page = Page::new("ann", Some("chat"));
    let mut early = page.open(&one, None).await;
    let mut late = page.open(&two, None).await;
    publish(&three, say("seen", json!([to_group("chat")]))).await;
    for tab in [&mut early, &mut late] {
        assert_eq!(tab.recv().await["message"], "seen");
    }
    drained(one, &mut early).await;
    publish(&three, say("between 1", json!([to_user("ann")]))).await;
    publish(&three, say("between 2", json!([to_group("chat")]))).await;
    for text in ["between 1", "between 2"] {
        assert_eq!(late.recv().await["message"], text, "the later tab saw it");
    }
    drained(two, &mut late).await;
    let key = r#"wshub:ho:["ann","chat"]"#;
    assert_eq!(cli(redis.port, &["LLEN", key]), "2", "two handoffs");
    publish(&three, say("after", json!([to_user("ann")]))).await;
    watcher.settle(&three).await;

    // The tab that closed later comes back first, then the other.
    let mut late = page.open(&three, None).await;
    assert_eq!(
        legacy_until_sentinel(&three, &mut late).await,
        ["between 1", "between 2", "after"],
        "from the earliest position: what it saw in between, again"
    );
    let mut early = page.open(&three, None).await;
    assert_eq!(
        legacy_until_sentinel(&three, &mut early).await,
        ["between 1", "between 2", "after"],
        "the tab that closed first loses nothing"
    );
    assert_eq!(cli(redis.port, &["EXISTS", key]), "0", "both taken");
    assert_eq!(
        three.metric("wshub_resume_total{result=\"recovered\"}"),
        2.0
    );
}

/// The history keys in the Redis at `port` (`P:h:{K}:m`, `P:h:{K}:s`).
fn history_keys(port: u16) -> Vec<String> {
    let mut keys: Vec<String> = cli(port, &["--scan", "--pattern", "wshub:h:*"])
        .lines()
        .map(str::to_owned)
        .collect();
    keys.sort();
    keys
}

/// Review of issue 14, item 5: sockets that do not speak resume create no
/// history keys. One whose user id the hub generated can never take a
/// handoff (its next socket gets another id): it reads nothing at all.
/// One with a user id reads its topics' tops without making an epoch.
#[tokio::test]
async fn legacy_sockets_make_no_history_keys() {
    let redis = RedisServer::start();
    let server = node(&redis.url(), Some(settings())).await;
    for n in 0..20 {
        let path = if n % 4 == 0 {
            format!("/__initializeWebSocket.wc?userid=known{n}&groupid=kgrp")
        } else {
            "/__initializeWebSocket.wc?groupid=kgrp".to_owned()
        };
        let mut client = Client::connect(server.addr, &path).await;
        // Its decision is made before anything else is written to it.
        let tag = sentinel(&server).await;
        client.until_sentinel(&tag).await;
        client.close().await;
    }
    assert_eq!(
        history_keys(redis.port),
        ["wshub:h:{all}:m", "wshub:h:{all}:s"],
        "only the sentinels' topic"
    );
}

/// The other half of item 5: a legacy page whose topics had no history yet
/// when it connected (so its tops made none) is still handed over soundly:
/// the messages of an epoch made after it connected are replayed from
/// that epoch's start.
#[tokio::test]
async fn a_legacy_page_whose_topics_had_no_history_is_handed_over() {
    let redis = RedisServer::start();
    let (one, two) = (
        node(&redis.url(), Some(settings())).await,
        node(&redis.url(), Some(settings())).await,
    );
    let page = Page::new("ann", Some("chat"));
    let mut client = page.open(&one, None).await;
    // Its decision is made (with no keys at all) before this is written.
    publish(&two, say("seen", json!([to_group("chat")]))).await;
    assert_eq!(client.recv().await["message"], "seen");
    assert_eq!(
        history_keys(redis.port),
        ["wshub:h:{g:chat}:m", "wshub:h:{g:chat}:s"],
        "the page made no epoch of its own"
    );
    drained(one, &mut client).await;
    let mut watcher = Watcher::on(&two).await;
    publish(&two, say("first to ann", json!([to_user("ann")]))).await;
    publish(&two, say("to chat", json!([to_group("chat")]))).await;
    watcher.settle(&two).await;
    let mut client = page.open(&two, None).await;
    let got = legacy_until_sentinel(&two, &mut client).await;
    assert_eq!(
        got,
        ["first to ann", "to chat"],
        "the user topic's first epoch from its start, the group after what it saw"
    );
    assert_eq!(two.metric("wshub_resume_total{result=\"recovered\"}"), 1.0);
}

/// A legacy page whose node starts draining while the page's socket takes
/// over a handoff (the history replies held by a gate proxy): the socket
/// still gets what it missed before its 1001, and hands the handoff on.
#[tokio::test]
async fn a_legacy_page_drained_while_taking_over_a_handoff_hands_it_on() {
    let redis = RedisServer::start();
    let proxy = GateProxy::start(redis.port).await;
    let publisher = node(&redis.url(), Some(settings())).await;
    let draining = TestServer::on_redis(&proxy.url(), |c| {
        c.history = Some(settings());
        c.redis.as_mut().unwrap().command_timeout = Duration::from_secs(20);
    })
    .await;
    let mut watcher = Watcher::on(&publisher).await;
    // A handoff as a drained node stores it, at the current tops.
    let page = Page::new("ann", Some("chat"));
    let at = tops(&publisher, &page).await;
    let stored = json!([at["all"], at["group:chat"], at["user:ann"]]).to_string();
    let key = r#"wshub:ho:["ann","chat"]"#;
    cli(redis.port, &["RPUSH", key, &stored]);
    publish(&publisher, say("missed", json!([to_user("ann")]))).await;
    watcher.settle(&publisher).await;

    proxy.arm_on(b"LRANGE");
    let (addr, path) = (draining.addr, page.path(None));
    let connecting = tokio::spawn(async move { Client::connect(addr, &path).await });
    proxy.held().await;
    draining.node.drain_sockets_now();
    proxy.release();
    let mut client = connecting.await.unwrap();
    let mut got = Vec::new();
    let code = loop {
        match tokio::time::timeout(PATIENCE, futures_util::StreamExt::next(&mut client.ws))
            .await
            .expect("the socket ended")
        {
            Some(Ok(tokio_tungstenite::tungstenite::Message::Text(text))) => {
                got.push(parse(&text)["message"].as_str().unwrap().to_owned());
            }
            Some(Ok(tokio_tungstenite::tungstenite::Message::Close(Some(frame)))) => {
                break u16::from(frame.code);
            }
            Some(Ok(_)) => {}
            other => panic!("expected frames and a close, got {other:?}"),
        }
    };
    assert_eq!(code, 1001);
    let got: Vec<&str> = got
        .iter()
        .map(String::as_str)
        .filter(|m| !m.starts_with("resume-sentinel"))
        .collect();
    assert_eq!(got, ["missed"], "replayed before the 1001");
    assert_eq!(
        cli(redis.port, &["LLEN", key]).trim(),
        "1",
        "handed on before the close frame"
    );
}

// ---- The backend ----------------------------------------------------------

/// What a recording backend received: headers and body per request.
struct Backend {
    url: String,
    seen: tokio::sync::Mutex<mpsc::UnboundedReceiver<(HeaderMap, Value)>>,
}

impl Backend {
    async fn start() -> Arc<Self> {
        let (tx, rx) = mpsc::unbounded_channel();
        let app = Router::new().fallback(move |headers: HeaderMap, body: Bytes| {
            let tx = tx.clone();
            async move {
                let _ = tx.send((headers, serde_json::from_slice(&body).unwrap()));
                axum::http::StatusCode::NO_CONTENT
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
            seen: tokio::sync::Mutex::new(rx),
        })
    }

    /// The next event for `user` (others' are skipped).
    async fn next_for(&self, user: &str) -> (HeaderMap, Value) {
        let mut seen = self.seen.lock().await;
        loop {
            let (headers, body) = tokio::time::timeout(PATIENCE, seen.recv())
                .await
                .expect("the backend received nothing")
                .unwrap();
            if body["userId"] == user {
                return (headers, body);
            }
        }
    }
}

async fn node_with_backend(
    redis: &str,
    history: Option<HistoryConfig>,
    backend: &Backend,
) -> TestServer {
    let url = backend.url.clone();
    TestServer::on_redis(redis, move |c| {
        c.history = history;
        c.backend = wshub::Config::load_from(None, [("WSHUB_BACKEND__URL".to_owned(), url)])
            .unwrap()
            .backend;
        c.backend.as_mut().unwrap().events = true;
    })
    .await
}

fn resume_header(headers: &HeaderMap) -> Option<&str> {
    headers.get("x-wshub-resume").map(|v| v.to_str().unwrap())
}

#[tokio::test]
async fn the_backend_hears_how_each_socket_resumed() {
    let redis = RedisServer::start();
    let backend = Backend::start().await;
    let server = node_with_backend(&redis.url(), Some(settings()), &backend).await;
    let mut watcher = Watcher::on(&server).await;

    // A legacy page without a handoff.
    let legacy = Page::new("leg", None);
    let client = legacy.open(&server, None).await;
    let (headers, body) = backend.next_for("leg").await;
    assert_eq!(body["action"], "wshub.connect");
    assert_eq!(resume_header(&headers), Some("none"));
    assert_eq!(body["message"], r#"{"recovered":false,"replayed":0}"#);
    client.close().await;
    let (_, body) = backend.next_for("leg").await;
    assert_eq!(body["action"], "wshub.disconnect", "after the connect");

    // Fresh, then recovered with two messages, then not recovered.
    let mut ann = Page::new("ann", Some("chat"));
    let mut client = ann.open(&server, Some("")).await;
    ann.welcome(&mut client).await;
    let (headers, body) = backend.next_for("ann").await;
    assert_eq!(resume_header(&headers), Some("not_recovered"));
    assert_eq!(body["message"], r#"{"recovered":false,"replayed":0}"#);
    client.close().await;
    assert_eq!(
        backend.next_for("ann").await.1["action"],
        "wshub.disconnect"
    );
    publish(&server, say("one", json!([to_user("ann")]))).await;
    publish(&server, say("two", json!([to_group("chat")]))).await;
    watcher.settle(&server).await;
    let (client, welcome) = ann.resume(&server).await;
    assert_eq!(welcome["recovered"], true);
    let (headers, body) = backend.next_for("ann").await;
    assert_eq!(body["action"], "wshub.connect");
    assert_eq!(resume_header(&headers), Some("recovered"));
    // Two, and the watcher's sentinel.
    assert_eq!(body["message"], r#"{"recovered":true,"replayed":3}"#);
    client.close().await;
    assert_eq!(
        backend.next_for("ann").await.1["action"],
        "wshub.disconnect"
    );
    let mut client = ann.open(&server, Some("{}")).await;
    assert_eq!(ann.welcome(&mut client).await["recovered"], false);
    let (headers, body) = backend.next_for("ann").await;
    assert_eq!(resume_header(&headers), Some("not_recovered"));
    assert_eq!(body["message"], r#"{"recovered":false,"replayed":0}"#);
    drop(watcher);

    // History off: as before.
    let plain = node_with_backend(&redis.url(), None, &backend).await;
    let _client = Page::new("off", None).open(&plain, Some("")).await;
    let (headers, body) = backend.next_for("off").await;
    assert_eq!(body["action"], "wshub.connect");
    assert_eq!(resume_header(&headers), None);
    assert_eq!(body["message"], Value::Null);
}

// ---- History off, and legacy sockets with it on ------------------------------------

/// With history off the `resume` parameter changes nothing: no welcome and
/// the very bytes of today's frames. With history on, a socket that did not
/// opt in gets those same bytes too.
#[tokio::test]
async fn frames_are_todays_bytes_unless_a_socket_opts_in() {
    let (redis, kept) = (RedisServer::start(), RedisServer::start());
    let off = node(&redis.url(), None).await;
    let other = node(&redis.url(), None).await;
    let on = node(&kept.url(), Some(settings())).await;
    let page = Page::new("ann", Some("chat"));
    let mut resuming_off = page.open(&off, Some("")).await;
    let mut positions_off = page.open(&off, Some(r#"{"all":"x:1"}"#)).await;
    let mut plain_off = page.open(&off, None).await;
    let mut plain_on = page.open(&on, None).await;
    let body = json!({
        "userId": "bob", "action": "say", "message": "héllo \"you\"",
        "recipients": [{"type": 2, "value": "ann"}, {"type": "group", "value": "chat"}]
    });
    let expected = r#"{"userId":"bob","groupId":null,"action":"say","message":"héllo \"you\"","recipients":[{"type":"user","value":"ann"},{"type":"group","value":"chat"}]}"#;
    publish(&other, body.clone()).await;
    for client in [&mut resuming_off, &mut positions_off, &mut plain_off] {
        assert_eq!(
            client.recv_text().await,
            expected,
            "history off: the first frame, byte for byte"
        );
    }
    // History on keeps its own stream: publish there for the legacy socket.
    publish(&on, body).await;
    assert_eq!(
        plain_on.recv_text().await,
        expected,
        "history on, not opted in"
    );
    let tag = sentinel(&off).await;
    for client in [&mut resuming_off, &mut positions_off, &mut plain_off] {
        assert!(client.until_sentinel(&tag).await.is_empty());
    }
    assert_eq!(
        off.metric("wshub_resume_total{result=\"fresh\"}"),
        0.0,
        "history off: no resume at all"
    );
}

// ---- Rolling enable: a node without history next to nodes with it ------------

/// Review of issue 14, item 4: messages published through a node with
/// history off are plain copies, not in history. A node with history on
/// that receives one on a topic starts that topic's history afresh, so a
/// resume from a position before it says not recovered instead of
/// replaying around the hole; the sockets that stayed see no gap notice.
#[tokio::test]
async fn a_message_from_a_node_without_history_starts_its_topic_afresh() {
    let redis = RedisServer::start();
    let on = node(&redis.url(), Some(settings())).await;
    let off = node(&redis.url(), None).await;
    let mut stay = Page::new("stay", Some("mg"));
    let mut stays = stay.open(&on, Some("")).await;
    stay.welcome(&mut stays).await;
    let mut away = Page::new("away", Some("mg"));
    let mut client = away.open(&on, Some("")).await;
    away.welcome(&mut client).await;
    publish(&on, say("on-1", json!([to_group("mg")]))).await;
    for (page, socket) in [(&mut stay, &mut stays), (&mut away, &mut client)] {
        let frame = socket.recv().await;
        page.observe(&frame);
        assert_eq!(frame["message"], "on-1");
    }
    client.close().await;
    let before = away.positions["group:mg"].as_str().unwrap().to_owned();
    // One after the other: a 204 only means a node took the message.
    for (server, text) in [(&off, "off-1"), (&on, "on-2")] {
        publish(server, say(text, json!([to_group("mg")]))).await;
        let frame = stays.recv().await;
        stay.observe(&frame);
        assert_eq!(frame["message"], text);
    }
    let epoch = |position: &str| position.rsplit_once(':').unwrap().0.to_owned();
    let meta = || cli(redis.port, &["HGET", "wshub:h:{g:mg}:m", "e"]);
    eventually("the group's history started afresh", || {
        meta() != epoch(&before)
    })
    .await;

    let (mut client, welcome) = away.resume(&on).await;
    assert_not_recovered(
        &on,
        &mut away,
        &mut client,
        &welcome,
        "a plain copy in between",
    )
    .await;
    // The sockets that stayed got every copy and hear of no gap.
    publish(&on, say("on-3", json!([to_group("mg")]))).await;
    let (before, frame) = stay.until(&mut stays, "on-3").await;
    assert!(
        before.iter().all(|f| f["action"] == "broadcast"),
        "nothing but the sentinel, no gap notice: {before:?}"
    );
    assert_eq!(epoch(frame["pos"]["group:mg"].as_str().unwrap()), meta());
    assert_eq!(
        on.metric("wshub_bus_gaps_total{kind=\"unrepairable\"}"),
        0.0
    );
}

// ---- Gap notices -------------------------------------------------------------

/// Review of 2026-12-03: a resume socket's group had no message yet when
/// its node was cut off from Redis; a message was published to it, Redis
/// restarted without its data, and another node's publish made the
/// group's new epoch before the node was back. The node had never seen an
/// epoch of the group (its track knew none), so its catch-up took the new
/// one for the first: the socket got the new message, took its position,
/// and was never told of the one lost; its next resume said `recovered:
/// true`. It is told now, before the new message.
#[tokio::test]
async fn a_loss_across_a_redis_restart_on_a_topic_the_node_never_saw_is_told() {
    let mut redis = RedisServer::start();
    let proxy = GateProxy::start(redis.port).await;
    let reader = node(&proxy.url(), Some(settings())).await;
    let publisher = node(&redis.url(), Some(settings())).await;
    let mut ann = Page::new("ann", Some("fresh-group"));
    let mut socket = ann.open(&reader, Some("")).await;
    let welcome = ann.welcome(&mut socket).await;
    let before = welcome["positions"]["group:fresh-group"].clone();

    // The reader is cut off (its resubscribe held) and misses m1.
    proxy.arm_commands_on(b"SUBSCRIBE");
    proxy.sever();
    proxy.held().await;
    publish(&publisher, say("m1", json!([to_group("fresh-group")]))).await;
    eventually("m1 is in Redis", || {
        cli(redis.port, &["HGET", "wshub:h:{g:fresh-group}:m", "o"]) == "1"
    })
    .await;
    // Redis loses everything; the reader's next resubscribe is held again
    // until another node's publish has made the group's new epoch.
    proxy.arm_commands_on(b"SUBSCRIBE");
    redis.restart();
    eventually("the publisher is ready again", || {
        publisher.node.readiness().is_ok()
    })
    .await;
    publish(&publisher, say("m2", json!([to_group("fresh-group")]))).await;
    eventually("m2 made the new epoch", || {
        cli(redis.port, &["HGET", "wshub:h:{g:fresh-group}:m", "o"]) == "1"
    })
    .await;
    proxy.held().await;
    proxy.release();

    let mut told = None;
    loop {
        let frame = socket.recv().await;
        if frame["action"] == "wshub.gap" {
            let notice = parse(frame["message"].as_str().unwrap());
            if notice["topics"] == json!(["group:fresh-group"]) {
                told = Some(notice);
            }
            continue;
        }
        assert_eq!(frame["message"], "m2", "{frame}");
        break;
    }
    let told = told.expect("the group's loss was told before m2");
    let at = told["positions"]["group:fresh-group"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_ne!(
        at.split(':').next(),
        before.as_str().unwrap().split(':').next(),
        "{told}: the new epoch's position"
    );
}

/// The reader's subscriber is cut while `all` overflows its history: the
/// node cannot repair the gap, and tells the sockets that speak resume
/// (only them) with `wshub.gap`.
#[tokio::test]
async fn an_unrepairable_gap_is_told_to_resume_speakers_only() {
    let redis = RedisServer::start_with(&["--stream-node-max-entries", "2"]);
    let proxy = GateProxy::start(redis.port).await;
    let small = HistoryConfig {
        size_all: 2,
        ..settings()
    };
    let reader = node(&proxy.url(), Some(small.clone())).await;
    let publisher = node(&redis.url(), Some(small)).await;
    let mut ann = Page::new("ann", Some("chat"));
    let mut resuming = ann.open(&reader, Some("")).await;
    ann.welcome(&mut resuming).await;
    let mut legacy = Page::new("leg", Some("chat")).open(&reader, None).await;
    publish(&publisher, say("first", json!([]))).await;
    assert_eq!(resuming.recv().await["message"], "first");
    assert_eq!(legacy.recv().await["message"], "first");

    // Cut the reader's connections and hold its resubscribe (the command
    // itself: the reader hears nothing meanwhile) while `all` moves on by
    // more than it keeps.
    proxy.arm_commands_on(b"SUBSCRIBE");
    proxy.sever();
    proxy.held().await;
    for i in 0..10 {
        publish(&publisher, say(&format!("lost {i}"), json!([]))).await;
    }
    let mut watcher = Watcher::on(&publisher).await;
    watcher.settle(&publisher).await;
    proxy.release();
    eventually("the reader is ready again", || {
        reader.node.readiness().is_ok()
    })
    .await;
    // The gap shows at the next message at the latest.
    publish(&publisher, say("after", json!([]))).await;

    let frame = loop {
        let frame = resuming.recv().await;
        if frame["action"] == "wshub.gap" {
            break frame;
        }
    };
    let notice = parse(frame["message"].as_str().unwrap());
    assert_eq!(notice["topics"], json!(["all"]), "{notice}");
    // With where `all` goes on from: at or after the last message lost
    // ("lost 9", the 11th), in the epoch of the messages before.
    let welcomed = ann.positions["all"].as_str().unwrap_or_default();
    let at = notice["positions"]["all"].as_str().unwrap_or_default();
    let (epoch, offset) = at.split_once(':').unwrap_or_default();
    assert_eq!(
        Some(epoch),
        welcomed.split_once(':').map(|(e, _)| e),
        "{notice}"
    );
    assert!(offset.parse::<u64>().is_ok_and(|o| o >= 11), "{notice}");
    assert_eq!(notice.as_object().map(|o| o.len()), Some(2), "{notice}");
    let tag = sentinel(&publisher).await;
    let frames = legacy.until_sentinel(&tag).await;
    assert!(
        frames.iter().all(|f| f["action"] != "wshub.gap"),
        "a legacy socket is never told: {frames:?}"
    );
}
