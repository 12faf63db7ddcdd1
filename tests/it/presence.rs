//! Issue 15: cluster presence (`reference/presence.md`, `docs/presence.md`),
//! each guarantee of the contract over real nodes (in-process servers and
//! `wshub` processes) and a real `redis-server` (missing: the test fails,
//! see `common::redis`). Leases and delays are short so that expiry is
//! quick to watch.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::http::HeaderMap;
use futures_util::StreamExt;
use rand::Rng;
use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use crate::common::node::NodeProcess;
use crate::common::redis::{RedisServer, cli};
use crate::common::{Client, Ended, PATIENCE, TestServer};

const HEARTBEAT: Duration = Duration::from_millis(100);
const LEASE: Duration = Duration::from_millis(1500);
const LEAVE_DELAY: Duration = Duration::from_millis(300);

fn presence_on(config: &mut wshub::Config) {
    config.presence.enabled = true;
    config.presence.heartbeat = HEARTBEAT;
    config.presence.lease = LEASE;
    config.presence.leave_delay = LEAVE_DELAY;
}

use crate::common::within;

async fn get_json(addr: SocketAddr, path: &str) -> (u16, Value) {
    let response = reqwest::get(format!("http://{addr}{path}"))
        .await
        .expect("GET");
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}")),
    )
}

/// `GET /api/presence/groups/{G}` (or the null group) as user → connections.
async fn api_members(addr: SocketAddr, group: Option<&str>) -> BTreeMap<String, u64> {
    let path = match group {
        Some(g) => format!(
            "/api/presence/groups/{}",
            percent_encoding::utf8_percent_encode(g, percent_encoding::NON_ALPHANUMERIC)
        ),
        None => "/api/presence/nullgroup".into(),
    };
    let (status, body) = get_json(addr, &path).await;
    assert_eq!(status, 200, "{body}");
    members_of(&body)
}

fn members_of(view: &Value) -> BTreeMap<String, u64> {
    let members = view["members"].as_array().expect("members");
    let users: Vec<&str> = members
        .iter()
        .map(|m| m["userId"].as_str().unwrap())
        .collect();
    let mut sorted = users.clone();
    sorted.sort();
    assert_eq!(users, sorted, "members are sorted by userId: {view}");
    members
        .iter()
        .map(|m| {
            (
                m["userId"].as_str().unwrap().to_owned(),
                m["connections"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn socket_path(user: &str, group: Option<&str>, presence: bool) -> String {
    let enc = |s: &str| {
        percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
    };
    let mut path = format!("/ws?userid={}", enc(user));
    if let Some(g) = group {
        path.push_str(&format!("&groupid={}", enc(g)));
    }
    if presence {
        path.push_str("&presence=1");
    }
    path
}

/// One frame's `message` JSON.
fn inner(frame: &Value) -> Value {
    serde_json::from_str(frame["message"].as_str().expect("a message")).expect("JSON message")
}

/// What an opted-in client knows: the list it keeps from its snapshot and
/// the join/leave frames after it (by `v`), and every frame it saw. A task
/// reads its socket, so a test can look at any time.
#[derive(Default, Debug)]
struct Seen {
    snapshot_v: Option<u64>,
    members: BTreeSet<String>,
    /// The `v` of every snapshot, in arrival order.
    snapshots: Vec<u64>,
    /// Every join/leave frame: (joined, user, v).
    events: Vec<(bool, String, u64)>,
    others: Vec<Value>,
}

impl Seen {
    fn apply(&mut self, joined: bool, user: &str) {
        if joined {
            self.members.insert(user.to_owned());
        } else {
            self.members.remove(user);
        }
    }
}

struct Observer {
    seen: Arc<Mutex<Seen>>,
    send: tokio::sync::mpsc::UnboundedSender<String>,
    task: tokio::task::JoinHandle<()>,
}

impl Observer {
    /// Opens an opted-in socket and asks for its snapshot.
    async fn open(addr: SocketAddr, user: &str, group: Option<&str>) -> Self {
        let client = Client::connect(addr, &socket_path(user, group, true)).await;
        let (mut sink, mut stream) = client.ws.split();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let (send, mut outgoing) = tokio::sync::mpsc::unbounded_channel::<String>();
        let state = seen.clone();
        let task = tokio::spawn(async move {
            use futures_util::SinkExt;
            loop {
                tokio::select! {
                    out = outgoing.recv() => match out {
                        Some(text) => { let _ = sink.send(Message::text(text)).await; }
                        None => { let _ = sink.close().await; return; }
                    },
                    msg = stream.next() => {
                        let Some(Ok(Message::Text(text))) = msg else {
                            if matches!(msg, Some(Ok(_))) { continue; }
                            return;
                        };
                        let frame: Value = serde_json::from_str(&text).unwrap();
                        let mut seen = state.lock().unwrap();
                        match frame["action"].as_str() {
                            Some("wshub.presence") => {
                                // The client's rule: the snapshot, then
                                // every event with a greater v, whenever
                                // it arrived.
                                let view = inner(&frame);
                                let v = view["v"].as_u64().unwrap();
                                seen.members = members_of(&view).into_keys().collect();
                                seen.snapshot_v = Some(v);
                                seen.snapshots.push(v);
                                for (joined, user, ev) in seen.events.clone() {
                                    if ev > v { seen.apply(joined, &user); }
                                }
                            }
                            Some(a @ ("wshub.join" | "wshub.leave")) => {
                                let m = inner(&frame);
                                let (user, v) = (m["userId"].as_str().unwrap().to_owned(), m["v"].as_u64().unwrap());
                                let joined = a == "wshub.join";
                                seen.events.push((joined, user.clone(), v));
                                if seen.snapshot_v.is_some_and(|sv| v > sv) {
                                    seen.apply(joined, &user);
                                }
                            }
                            _ => seen.others.push(frame),
                        }
                    }
                }
            }
        });
        let observer = Self { seen, send, task };
        observer.ask();
        observer
    }

    fn ask(&self) {
        let _ = self
            .send
            .send(json!({"action": "wshub.presence"}).to_string());
    }

    fn members(&self) -> BTreeSet<String> {
        self.seen.lock().unwrap().members.clone()
    }

    fn has_snapshot(&self) -> bool {
        self.seen.lock().unwrap().snapshot_v.is_some()
    }

    fn events(&self) -> Vec<(bool, String, u64)> {
        self.seen.lock().unwrap().events.clone()
    }

    async fn close(self) {
        drop(self.send);
        let _ = tokio::time::timeout(PATIENCE, self.task).await;
    }
}

/// One presence event the backend received: (action, user, group).
type Event = (String, String, Option<String>);

/// A backend that records presence events.
struct Events {
    url: String,
    seen: Arc<Mutex<Vec<Event>>>,
}

impl Events {
    async fn start() -> Self {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        let app = Router::new().fallback(move |headers: HeaderMap, body: Bytes| {
            let record = record.clone();
            async move {
                let v: Value = serde_json::from_slice(&body).unwrap_or_default();
                let action = v["action"].as_str().unwrap_or_default().to_owned();
                if ["wshub.online", "wshub.offline", "wshub.join", "wshub.leave"]
                    .contains(&action.as_str())
                {
                    assert!(
                        headers.get("x-wshub-connection-id").is_none(),
                        "presence events name no connection"
                    );
                    record.lock().unwrap().push((
                        action,
                        v["userId"].as_str().unwrap_or_default().to_owned(),
                        v["groupId"].as_str().map(str::to_owned),
                    ));
                }
                axum::http::StatusCode::NO_CONTENT
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "http://{}/app/__websocket.wwd",
            listener.local_addr().unwrap()
        );
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { url, seen }
    }

    fn all(&self) -> Vec<Event> {
        self.seen.lock().unwrap().clone()
    }

    fn count(&self, action: &str) -> usize {
        self.all().iter().filter(|e| e.0 == action).count()
    }

    fn configure(&self, config: &mut wshub::Config) {
        config.backend = wshub::Config::load_from(
            None,
            [
                ("WSHUB_BACKEND__URL".to_owned(), self.url.clone()),
                ("WSHUB_BACKEND__EVENTS".to_owned(), "true".to_owned()),
            ],
        )
        .unwrap()
        .backend;
    }
}

async fn presence_node(redis: &RedisServer, tweak: impl FnOnce(&mut wshub::Config)) -> TestServer {
    TestServer::on_redis(&redis.url(), |c| {
        presence_on(c);
        tweak(c);
    })
    .await
}

/// The contract's shapes, the opt-in, and the API: a snapshot to the
/// asker only, join and leave frames to opted-in sockets of the group, the
/// null group, users, 404 with presence off, and nothing new for sockets
/// that did not opt in.
#[tokio::test]
async fn the_wire_and_the_api_follow_the_contract() {
    let redis = RedisServer::start();
    let events = Events::start().await;
    let a = presence_node(&redis, |c| events.configure(c)).await;
    let b = presence_node(&redis, |c| events.configure(c)).await;

    let mut plain = Client::connect(a.addr, &socket_path("pat", Some("chat"), false)).await;
    within("pat is listed", PATIENCE, || async {
        api_members(b.addr, Some("chat")).await.contains_key("pat")
    })
    .await;
    let mut ann = Client::connect(a.addr, &socket_path("ann", Some("chat"), true)).await;
    // Her own first socket is a join too, sent to the group's opted-in
    // sockets, hers included.
    let own = ann.recv().await;
    assert_eq!(own["action"], "wshub.join", "{own}");
    assert_eq!(inner(&own)["userId"], "ann");
    ann.send_json(json!({"action": "wshub.presence", "ignored": 1}))
        .await;
    let snapshot = ann.recv().await;
    assert_eq!(snapshot["action"], "wshub.presence", "{snapshot}");
    assert_eq!(snapshot["userId"], Value::Null);
    assert_eq!(snapshot["groupId"], "chat");
    assert_eq!(snapshot["recipients"], json!([]));
    let view = inner(&snapshot);
    let keys: Vec<&String> = view.as_object().unwrap().keys().collect();
    assert_eq!(keys, ["group", "members", "v"], "{view}");
    assert_eq!(view["group"], "chat");
    assert_eq!(
        members_of(&view),
        BTreeMap::from([("ann".into(), 1), ("pat".into(), 1)])
    );
    let v0 = view["v"].as_u64().unwrap();
    assert!(
        v0 >= inner(&own)["v"].as_u64().unwrap(),
        "the snapshot includes her join"
    );

    // Bob's first socket, on the other node: a join with a greater v.
    let bob = Client::connect(b.addr, &socket_path("bob", Some("chat"), false)).await;
    let join = ann.recv().await;
    assert_eq!(join["action"], "wshub.join", "{join}");
    assert_eq!(join["groupId"], "chat");
    let m = inner(&join);
    assert_eq!(m["userId"], "bob");
    let v1 = m["v"].as_u64().unwrap();
    assert!(v1 > v0, "{v1} > {v0}");
    // His second socket (another node) is no join; counts show it.
    let bob2 = Client::connect(a.addr, &socket_path("bob", Some("chat"), false)).await;
    within("bob's two sockets are counted", PATIENCE, || async {
        api_members(b.addr, Some("chat")).await.get("bob") == Some(&2)
    })
    .await;
    bob.close().await;
    bob2.close().await;
    // Listed with 0 until the delay passes, then a leave.
    let leave = ann.recv().await;
    assert_eq!(leave["action"], "wshub.leave", "{leave}");
    assert_eq!(inner(&leave)["userId"], "bob");
    assert!(inner(&leave)["v"].as_u64().unwrap() > v1);
    assert!(!api_members(a.addr, Some("chat")).await.contains_key("bob"));

    // The socket that did not opt in saw none of it, and its
    // wshub.presence is refused, saying how to opt in.
    plain.send_json(json!({"action": "wshub.presence"})).await;
    let tag = plain.send_sentinel().await;
    let got = plain.until_sentinel(&tag).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["action"], "wshub.error");
    assert_eq!(
        got[0]["message"],
        "`wshub.presence` is answered only on a socket opened with presence=1"
    );
    // Ann saw nothing but the sentinel since (no snapshot for pat).
    assert!(ann.until_sentinel(&tag).await.is_empty());

    // The null group and users.
    let _nobody = Client::connect(b.addr, &socket_path("nil", None, false)).await;
    within("the null group lists nil", PATIENCE, || async {
        api_members(a.addr, None).await == BTreeMap::from([("nil".into(), 1)])
    })
    .await;
    let (status, body) = get_json(a.addr, "/api/presence/nullgroup").await;
    assert_eq!(status, 200);
    assert_eq!(body["group"], Value::Null);
    let (status, body) = get_json(b.addr, "/api/presence/users?ids=ann,nobody,nil").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        json!({"users": {
            "ann": {"online": true, "connections": 1},
            "nil": {"online": true, "connections": 1},
            "nobody": {"online": false, "connections": 0},
        }})
    );
    let (status, body) = get_json(a.addr, "/api/presence/groups/empty%20room").await;
    assert_eq!(
        (status, body),
        (200, json!({"group": "empty room", "members": [], "v": 0}))
    );
    let (status, body) = get_json(a.addr, "/api/presence/users").await;
    assert_eq!(status, 400, "{body}");

    // Backend events, once each: pat, ann, bob, nil online; bob offline.
    within("the backend heard every transition", PATIENCE, || async {
        events.count("wshub.offline") == 1 && events.count("wshub.online") == 4
    })
    .await;
    let mut seen = events.all();
    seen.sort();
    let e = |a: &str, u: &str, g: Option<&str>| (a.to_owned(), u.to_owned(), g.map(str::to_owned));
    assert_eq!(
        seen,
        [
            e("wshub.join", "ann", Some("chat")),
            e("wshub.join", "bob", Some("chat")),
            e("wshub.join", "nil", None),
            e("wshub.join", "pat", Some("chat")),
            e("wshub.leave", "bob", Some("chat")),
            e("wshub.offline", "bob", None),
            e("wshub.online", "ann", None),
            e("wshub.online", "bob", None),
            e("wshub.online", "nil", None),
            e("wshub.online", "pat", None),
        ]
    );

    // Each transition was counted once, by the node that reported it.
    let counted = |kind: &str| -> f64 {
        [&a, &b]
            .iter()
            .map(|n| n.metric(&format!("wshub_presence_events_total{{kind=\"{kind}\"}}")))
            .sum()
    };
    assert_eq!(
        (
            counted("join"),
            counted("leave"),
            counted("online"),
            counted("offline")
        ),
        (4.0, 1.0, 4.0, 1.0)
    );

    // Presence off: 404 in the API's error format.
    let off = TestServer::on_redis(&redis.url(), |_| {}).await;
    let (status, body) = get_json(off.addr, "/api/presence/groups/chat").await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], "presence_off", "{body}");
}

/// Malformed group paths and user ids are refused in the API's error
/// format (400 `bad_request`), never decoded lossily. An empty id in the
/// list was dropped without a word (`ann,,bob` answered two users).
#[tokio::test]
async fn malformed_group_paths_and_user_ids_are_refused_in_the_api_format() {
    let redis = RedisServer::start();
    let node = presence_node(&redis, |_| {}).await;
    let addr = node.addr;
    for path in [
        "/api/presence/groups/%FF",
        "/api/presence/groups/%E2%82",
        "/api/presence/groups/a%FFb",
        "/api/presence/users?ids=a&ids=b",
        "/api/presence/users?ids=%FF",
        "/api/presence/users?ids=ann,%C3",
        "/api/presence/users?%FF=ann",
        "/api/presence/users?ids=",
        "/api/presence/users?ids=ann,,bob",
        "/api/presence/users?ids=ann,",
        "/api/presence/users?ids=%2Cann",
    ] {
        let response = reqwest::get(format!("http://{addr}{path}")).await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        assert_eq!(status, 400, "{path}: {text}");
        let body: Value =
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("{path}: not JSON: {text}"));
        assert_eq!(body["error"]["code"], "bad_request", "{path}: {body}");
    }
    let (status, body) = get_json(addr, "/api/presence/users?ids=caf%C3%A9").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        json!({"users": {"caf\u{e9}": {"online": false, "connections": 0}}})
    );
}

/// A group whose name holds `/` is read as `/api/history/` reads such a
/// topic: everything after `/api/presence/groups/` is the name (it could
/// not be asked for at all: its `/` ended the path segment, its encoded
/// form is refused).
#[tokio::test]
async fn a_group_with_a_slash_in_its_name_has_its_path() {
    let redis = RedisServer::start();
    let node = presence_node(&redis, |_| {}).await;
    let _ann = Client::connect(node.addr, &socket_path("ann", Some("team/red"), false)).await;
    let _bob = Client::connect(node.addr, &socket_path("bob", Some("a//b/"), false)).await;
    // Each segment encoded, the slashes kept.
    let members = |group: &'static str| async move {
        let path: Vec<String> = group
            .split('/')
            .map(|s| {
                percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC)
                    .to_string()
            })
            .collect();
        let (status, body) = get_json(
            node.addr,
            &format!("/api/presence/groups/{}", path.join("/")),
        )
        .await;
        assert_eq!(status, 200, "{group}: {body}");
        assert_eq!(body["group"], group, "{body}");
        members_of(&body)
    };
    within("ann is listed in team/red", PATIENCE, || async {
        members("team/red").await.contains_key("ann")
    })
    .await;
    assert_eq!(
        members("a//b/").await,
        BTreeMap::from([("bob".to_owned(), 1)])
    );
    // Not the group `team`, which nobody is in.
    assert!(members("team").await.is_empty());
}

/// `?ids=` is split at its commas once decoded: a client that URL-encodes
/// the whole list, as `curl --data-urlencode` and most HTTP libraries do,
/// asks for each user (a review asked for `%2C` to stand for a comma
/// inside an id; that would have made docs/api.md's own example ask for
/// one user named "ann,bob").
#[tokio::test]
async fn an_encoded_list_of_ids_names_each_user() {
    let redis = RedisServer::start();
    let node = presence_node(&redis, |_| {}).await;
    let _ann = Client::connect(node.addr, &socket_path("ann", Some("g"), false)).await;
    within("ann is online", PATIENCE, || async {
        get_json(node.addr, "/api/presence/users?ids=ann%2Cbob")
            .await
            .1
            == json!({"users": {
                "ann": {"online": true, "connections": 1},
                "bob": {"online": false, "connections": 0},
            }})
    })
    .await;
}

/// The group `""` (`groupid=`, not the null group) has its path,
/// `/api/presence/groups/`.
#[tokio::test]
async fn the_empty_group_has_its_path() {
    let redis = RedisServer::start();
    let node = presence_node(&redis, |_| {}).await;
    let addr = node.addr;
    let _eve = Client::connect(addr, &socket_path("eve", Some(""), false)).await;
    let _nil = Client::connect(addr, &socket_path("nil", None, false)).await;
    within("eve is listed in the group \"\"", PATIENCE, || async {
        api_members(addr, Some("")).await == BTreeMap::from([("eve".into(), 1)])
    })
    .await;
    within("nil is listed in the null group", PATIENCE, || async {
        api_members(addr, None).await == BTreeMap::from([("nil".into(), 1)])
    })
    .await;
    let (status, body) = get_json(addr, "/api/presence/groups/").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["group"], "");
}

/// Waits until the API lists `n` members in the group `big` (`what`).
async fn big_has(addr: SocketAddr, n: usize, what: &str) {
    within(what, PATIENCE, || async {
        api_members(addr, Some("big")).await.len() == n
    })
    .await;
}

/// A node whose `max_members_events` is 2, and the group `big` at that
/// limit: `ann`, opted in (her own join and bob's read), and `bob`; the
/// `v` of bob's join.
async fn big_group_of_two() -> (RedisServer, TestServer, Client, Client, u64) {
    let redis = RedisServer::start();
    let a = presence_node(&redis, |c| c.presence.max_members_events = 2).await;
    let mut ann = Client::connect(a.addr, &socket_path("ann", Some("big"), true)).await;
    assert_eq!(inner(&ann.recv().await)["userId"], "ann", "her own join");
    let bob = Client::connect(a.addr, &socket_path("bob", Some("big"), false)).await;
    let join = inner(&ann.recv().await);
    assert_eq!(join["userId"], "bob", "two members: still framed");
    let v = join["v"].as_u64().expect("a v");
    (redis, a, ann, bob, v)
}

/// Groups over `max_members_events` get no join/leave frames (the backend
/// still hears of them).
#[tokio::test]
async fn big_groups_send_no_member_frames() {
    let (_redis, a, mut ann, _bob, _) = big_group_of_two().await;
    let _cid = Client::connect(a.addr, &socket_path("cid", Some("big"), false)).await;
    big_has(a.addr, 3, "cid is listed").await;
    let tag = ann.send_sentinel().await;
    assert!(
        ann.until_sentinel(&tag).await.is_empty(),
        "no frame for a third member"
    );
}

/// A group back at `max_members_events` members after being over it sends
/// its whole list to its opted-in sockets, so that a list kept from
/// events is right again. (It sent the leave that brought it back, to
/// lists that had missed the changes made while it was over: a review saw
/// a client keep a member list that was wrong for good.)
#[tokio::test]
async fn a_big_group_back_at_the_limit_sends_its_whole_list() {
    let (_redis, a, mut ann, bob, joined) = big_group_of_two().await;
    let cid = Client::connect(a.addr, &socket_path("cid", Some("big"), false)).await;
    let dan = Client::connect(a.addr, &socket_path("dan", Some("big"), false)).await;
    big_has(a.addr, 4, "four members").await;
    // Over the limit: bob's leave is not framed, nor were the two joins.
    bob.close().await;
    big_has(a.addr, 3, "bob is gone").await;
    // Back at the limit: the list, not cid's leave.
    cid.close().await;
    let frame = ann.recv().await;
    assert_eq!(frame["action"], "wshub.presence", "{frame}");
    let list = inner(&frame);
    assert_eq!(list["group"], "big");
    assert_eq!(
        list["members"],
        json!([{"userId": "ann", "connections": 1}, {"userId": "dan", "connections": 1}])
    );
    assert!(list["v"].as_u64().unwrap() > joined, "{list}");
    assert_eq!(api_members(a.addr, Some("big")).await.len(), 2);
    // Under the limit, frames again.
    dan.close().await;
    let frame = ann.recv().await;
    assert_eq!(frame["action"], "wshub.leave", "{frame}");
    assert_eq!(inner(&frame)["userId"], "dan");
}

/// A user who takes a group over `max_members_events` and leaves again
/// sends nothing: the members are the ones the lists kept from events
/// hold. (Each such return sent the whole list to every opted-in socket: a
/// review measured 63 times the bytes of the leave frames with 200
/// members and one user coming and going.)
#[tokio::test]
async fn a_user_coming_and_going_at_the_limit_sends_no_list() {
    let (_redis, a, mut ann, bob, _) = big_group_of_two().await;
    for _ in 0..3 {
        let eve = Client::connect(a.addr, &socket_path("eve", Some("big"), false)).await;
        big_has(a.addr, 3, "eve is listed").await;
        eve.close().await;
        big_has(a.addr, 2, "eve is gone").await;
    }
    // The next frame is bob's leave: no list came before it.
    bob.close().await;
    let frame = ann.recv().await;
    assert_eq!(frame["action"], "wshub.leave", "{frame}");
    assert_eq!(inner(&frame)["userId"], "bob");
    // A list read while the group is over holds its users then: at the
    // return the list is sent, even to the same users as before. (A
    // socket that asked meanwhile kept eve for good: a review.)
    let _cid = Client::connect(a.addr, &socket_path("cid", Some("big"), false)).await;
    assert_eq!(inner(&ann.recv().await)["userId"], "cid");
    let eve = Client::connect(a.addr, &socket_path("eve", Some("big"), false)).await;
    big_has(a.addr, 3, "eve is listed").await;
    let mut late = Client::connect(a.addr, &socket_path("dan", Some("big"), true)).await;
    late.send_json(json!({"action": "wshub.presence"})).await;
    let asked = loop {
        let frame = late.recv().await;
        if frame["action"] == "wshub.presence" {
            break inner(&frame);
        }
    };
    assert!(asked["members"].to_string().contains("eve"), "{asked}");
    drop(late);
    eve.close().await;
    let frame = ann.recv().await;
    assert_eq!(frame["action"], "wshub.presence", "{frame}");
}

/// What is open, as the test knows it: (group, user) → sockets.
type Truth = BTreeMap<(Option<String>, String), u64>;

fn truth_of(truth: &Truth, group: Option<&str>) -> BTreeMap<String, u64> {
    truth
        .iter()
        .filter(|((g, _), n)| g.as_deref() == group && **n > 0)
        .map(|((_, u), n)| (u.clone(), *n))
        .collect()
}

/// Guarantee 1: after thousands of random connects and disconnects over 3
/// nodes and 50 groups, one second after the churn stops, every
/// `GET /api/presence/groups/G` and every opted-in client's list equals
/// the ground truth.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_ends_in_the_ground_truth_a_second_later() {
    let _turn = crate::common::TIMING_CRITICAL.lock().await;
    const GROUPS: usize = 50;
    const USERS: usize = 40;
    const WORKERS: usize = 10;
    // 3,000 operations by default (seconds); the contract's 20,000 with
    // WSHUB_PRESENCE_CHURN_OPS=20000.
    let ops_per_worker: usize = std::env::var("WSHUB_PRESENCE_CHURN_OPS")
        .ok()
        .and_then(|n| n.parse::<usize>().ok())
        .map_or(300, |n| n / WORKERS);
    let redis = RedisServer::start();
    let mut nodes = Vec::new();
    for _ in 0..3 {
        nodes.push(presence_node(&redis, |_| {}).await);
    }
    let addrs: Vec<SocketAddr> = nodes.iter().map(|n| n.addr).collect();
    let group = |i: usize| format!("g{i}");
    let truth: Arc<Mutex<Truth>> = Arc::default();
    // One opted-in observer per group (a member itself).
    let mut observers = Vec::new();
    for i in 0..GROUPS {
        let observer = Observer::open(addrs[i % 3], &format!("obs{i}"), Some(&group(i))).await;
        *truth
            .lock()
            .unwrap()
            .entry((Some(group(i)), format!("obs{i}")))
            .or_default() += 1;
        observers.push(observer);
    }
    within("every observer has its snapshot", PATIENCE, || async {
        observers.iter().all(Observer::has_snapshot)
    })
    .await;
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..WORKERS {
        let (addrs, truth) = (addrs.clone(), truth.clone());
        workers.push(tokio::spawn(async move {
            let mut held: Vec<(Client, String, String)> = Vec::new();
            for _ in 0..ops_per_worker {
                let (connect, node, g, u, pick) = {
                    let mut rng = rand::rng();
                    (
                        held.is_empty() || rng.random_bool(0.55),
                        rng.random_range(0..3),
                        rng.random_range(0..GROUPS),
                        rng.random_range(0..USERS),
                        rng.random_range(0..held.len().max(1)),
                    )
                };
                if connect {
                    let (g, u) = (group(g), format!("u{u}"));
                    let client =
                        Client::connect(addrs[node], &socket_path(&u, Some(&g), false)).await;
                    *truth
                        .lock()
                        .unwrap()
                        .entry((Some(g.clone()), u.clone()))
                        .or_default() += 1;
                    held.push((client, g, u));
                } else {
                    let (client, g, u) = held.swap_remove(pick);
                    *truth.lock().unwrap().get_mut(&(Some(g), u)).unwrap() -= 1;
                    client.close().await;
                }
            }
            held
        }));
    }
    let mut still_open = Vec::new();
    for worker in workers {
        still_open.extend(worker.await.unwrap());
    }
    let churn = started.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let truth = truth.lock().unwrap().clone();
    let mut wrong = Vec::new();
    for (i, observer) in observers.iter().enumerate() {
        let want = truth_of(&truth, Some(&group(i)));
        let api = api_members(addrs[(i + 1) % 3], Some(&group(i))).await;
        if api != want {
            wrong.push(format!("API {}: {api:?} != {want:?}", group(i)));
        }
        let listed = observer.members();
        let want_users: BTreeSet<String> = want.into_keys().collect();
        if listed != want_users {
            if wrong.is_empty() {
                eprintln!("events of {}: {:?}", group(i), observer.events());
                for key in cli(redis.port, &["KEYS", "*pc:*"]).lines() {
                    eprintln!("control list {key}: {}", cli(redis.port, &["LLEN", key]));
                }
            }
            wrong.push(format!(
                "observer of {}: {listed:?} != {want_users:?}",
                group(i)
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "one second after the churn:\n{}",
        wrong.join("\n")
    );
    let writes: f64 = nodes
        .iter()
        .map(|n| n.metric("wshub_presence_writes_total"))
        .sum();
    eprintln!(
        "churn: {} connects and disconnects in {churn:?}, {writes} presence scripts, {} sockets open",
        WORKERS * ops_per_worker,
        still_open.len() + GROUPS
    );
    for observer in observers {
        observer.close().await;
    }
}

/// A `wshub` process with presence on `redis` (short leases), reporting
/// to `events`.
async fn presence_process(
    redis: &RedisServer,
    events: &Events,
    extra: &[(&str, &str)],
) -> NodeProcess {
    let url = redis.url();
    let heartbeat = HEARTBEAT.as_millis().to_string();
    let lease = LEASE.as_millis().to_string();
    let delay = LEAVE_DELAY.as_millis().to_string();
    let mut env = vec![
        ("WSHUB_REDIS__URL", url.as_str()),
        ("WSHUB_PRESENCE__ENABLED", "true"),
        ("WSHUB_PRESENCE__HEARTBEAT_MS", heartbeat.as_str()),
        ("WSHUB_PRESENCE__LEASE_MS", lease.as_str()),
        ("WSHUB_PRESENCE__LEAVE_DELAY_MS", delay.as_str()),
        ("WSHUB_BACKEND__URL", events.url.as_str()),
        ("WSHUB_BACKEND__EVENTS", "true"),
        ("WSHUB_LIMITS__MESSAGES_PER_SECOND", "0"),
    ];
    env.extend_from_slice(extra);
    NodeProcess::spawn(&env).await
}

/// Opens `paths` on `addr`, a few at a time.
async fn open_all(addr: SocketAddr, paths: Vec<String>) -> Vec<Client> {
    let mut clients = Vec::new();
    for chunk in paths.chunks(25) {
        let opened =
            futures_util::future::join_all(chunk.iter().map(|p| Client::connect(addr, p))).await;
        clients.extend(opened);
    }
    clients
}

/// Guarantee 2: SIGKILL a node holding 500 sockets: users only on it
/// vanish from the API within `lease_ms` + 1 s, each with exactly one
/// leave (per group) and one offline; users who also held a socket
/// elsewhere, or reconnected elsewhere within the lease, cause none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_nodes_users_vanish_within_the_lease_with_one_leave_each() {
    let _turn = crate::common::TIMING_CRITICAL.lock().await;
    const GROUPS: usize = 10;
    let redis = RedisServer::start();
    let events = Events::start().await;
    let survivor = presence_node(&redis, |c| events.configure(c)).await;
    let mut doomed = presence_process(&redis, &events, &[]).await;
    // 240 users with two sockets each (two groups) only on the doomed
    // node; 10 with one there and one on the survivor; 10 that reconnect
    // to the survivor after the kill: 500 sockets.
    let mut paths = Vec::new();
    for i in 0..240 {
        for g in [i % GROUPS, (i + 1) % GROUPS] {
            paths.push(socket_path(&format!("k{i}"), Some(&format!("r{g}")), false));
        }
    }
    for i in 0..10 {
        paths.push(socket_path(
            &format!("both{i}"),
            Some(&format!("r{i}")),
            false,
        ));
        paths.push(socket_path(
            &format!("moved{i}"),
            Some(&format!("r{i}")),
            false,
        ));
    }
    let doomed_sockets = open_all(doomed.addr, paths).await;
    assert_eq!(doomed_sockets.len(), 500);
    let mut kept = Vec::new();
    for i in 0..10 {
        kept.push(
            Client::connect(
                survivor.addr,
                &socket_path(&format!("both{i}"), Some(&format!("r{i}")), false),
            )
            .await,
        );
    }
    let observer = Observer::open(survivor.addr, "watcher", Some("r0")).await;
    within("every socket is listed", PATIENCE, || async {
        let mut n = 0;
        for g in 0..GROUPS {
            n += api_members(survivor.addr, Some(&format!("r{g}")))
                .await
                .values()
                .sum::<u64>();
        }
        n == 500 + 10 + 1
    })
    .await;
    within("the observer has its snapshot", PATIENCE, || async {
        observer.has_snapshot()
    })
    .await;
    within("every online was reported", PATIENCE, || async {
        events.count("wshub.online") == 240 + 20 + 1
    })
    .await;
    let before = events.all().len();
    let frames_before = observer.events().len();

    doomed.child.kill_group();
    let killed = Instant::now();
    for i in 0..10 {
        kept.push(
            Client::connect(
                survivor.addr,
                &socket_path(&format!("moved{i}"), Some(&format!("r{i}")), false),
            )
            .await,
        );
    }
    drop(doomed_sockets);
    let want = |g: usize| -> BTreeMap<String, u64> {
        let mut m = BTreeMap::from([(format!("both{g}"), 1), (format!("moved{g}"), 1)]);
        if g == 0 {
            m.insert("watcher".into(), 1);
        }
        m
    };
    let took = within(
        "the killed node's users vanish",
        LEASE + Duration::from_secs(1),
        || async {
            for g in 0..GROUPS {
                if api_members(survivor.addr, Some(&format!("r{g}"))).await != want(g) {
                    return false;
                }
            }
            true
        },
    )
    .await;
    eprintln!(
        "vanished {:?} after the kill (lease {:?})",
        killed.elapsed(),
        LEASE
    );
    assert!(took <= LEASE + Duration::from_secs(1));
    within(
        "a leave and an offline for each",
        LEASE + Duration::from_secs(1),
        || async {
            let after = &events.all()[before..];
            after.iter().filter(|e| e.0 == "wshub.leave").count() >= 480
                && after.iter().filter(|e| e.0 == "wshub.offline").count() >= 240
        },
    )
    .await;
    // Nothing more comes: a second look a heartbeat later, and a sentinel
    // for the observer.
    tokio::time::sleep(HEARTBEAT * 5).await;
    let after: Vec<_> = events.all()[before..].to_vec();
    let mut leaves = BTreeMap::<(String, String), usize>::new();
    let mut offlines = BTreeMap::<String, usize>::new();
    for (action, user, group) in &after {
        match action.as_str() {
            "wshub.leave" => {
                *leaves
                    .entry((group.clone().unwrap(), user.clone()))
                    .or_default() += 1
            }
            "wshub.offline" => *offlines.entry(user.clone()).or_default() += 1,
            other => panic!("unexpected {other} for {user} after the kill"),
        }
    }
    assert_eq!(
        offlines.len(),
        240,
        "an offline for every user only on the killed node"
    );
    assert!(
        offlines.iter().all(|(u, n)| u.starts_with('k') && *n == 1),
        "{offlines:?}"
    );
    assert_eq!(leaves.len(), 480);
    assert!(
        leaves
            .iter()
            .all(|((_, u), n)| u.starts_with('k') && *n == 1),
        "{leaves:?}"
    );
    // The observer of r0 saw one leave per k-user of r0, nothing else.
    let frames: Vec<_> = observer.events()[frames_before..].to_vec();
    let want_r0: BTreeSet<String> = (0..240)
        .filter(|i| i % GROUPS == 0 || (i + 1) % GROUPS == 0)
        .map(|i| format!("k{i}"))
        .collect();
    assert_eq!(frames.len(), want_r0.len(), "{frames:?}");
    assert!(
        frames
            .iter()
            .all(|(joined, u, _)| !joined && want_r0.contains(u))
    );
    assert_eq!(
        observer.members(),
        want(0).into_keys().collect::<BTreeSet<_>>()
    );
    assert!(survivor.metric("wshub_presence_sweeps_total") >= 1.0);
    observer.close().await;
}

/// A Redis, a backend recording presence events, a node with presence on
/// whose heartbeat (`heartbeat`) decides when it sweeps, and a node process
/// with presence on, to kill.
async fn survivor_and_doomed(
    heartbeat: Duration,
) -> (RedisServer, Events, TestServer, NodeProcess) {
    let redis = RedisServer::start();
    let events = Events::start().await;
    let survivor = presence_node(&redis, |c| {
        events.configure(c);
        c.presence.heartbeat = heartbeat;
    })
    .await;
    let doomed = presence_process(&redis, &events, &[]).await;
    (redis, events, survivor, doomed)
}

/// A node with presence off (presence enabled node by node) leaves a dead
/// node's sweep to a node with presence on, which posts its users' leave
/// and offline events. (The node without presence won the sweep, having
/// the faster heartbeat here, and the backend heard nothing: review of
/// 2026-12-02.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_presence_leaves_the_sweep_to_one_that_reports() {
    the_sweep_is_left_to_the_survivor(|c, events| {
        c.presence.enabled = false;
        events.configure(c);
    })
    .await;
}

/// A node with presence on but no backend events (`backend.events`
/// turned on node by node) leaves a dead node's sweep to one that posts
/// them. (It won the sweep with a faster heartbeat, reported the leaves to
/// sockets, and the backend never heard of the users going offline:
/// review of 2026-12-03.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_backend_events_leaves_the_sweep_to_one_that_posts_them() {
    the_sweep_is_left_to_the_survivor(|_, _| {}).await;
}

/// A survivor that reports presence and posts backend events, a node to
/// kill, and a "quiet" node with a much faster heartbeat (so it would
/// win the sweep), presence on unless `quiet` says otherwise: the
/// backend hears the dead node's user leave once, from the survivor.
async fn the_sweep_is_left_to_the_survivor(quiet: impl FnOnce(&mut wshub::Config, &Events)) {
    let _turn = crate::common::TIMING_CRITICAL.lock().await;
    let (redis, events, survivor, mut doomed) =
        survivor_and_doomed(Duration::from_millis(600)).await;
    let quiet = TestServer::on_redis(&redis.url(), |c| {
        presence_on(c);
        c.presence.heartbeat = Duration::from_millis(20);
        quiet(c, &events);
    })
    .await;
    let watcher = quiet.connect("watcher", Some("sg")).await;
    let client = Client::connect(doomed.addr, &socket_path("gone", Some("sg"), false)).await;
    within("the online reported", PATIENCE, || async {
        events.count("wshub.online") == 1
    })
    .await;
    doomed.child.kill_group();
    drop(client);
    within(
        "a leave and an offline",
        LEASE * 2 + Duration::from_secs(2),
        || async { events.count("wshub.leave") == 1 && events.count("wshub.offline") == 1 },
    )
    .await;
    assert_eq!(survivor.metric("wshub_presence_sweeps_total"), 1.0);
    assert_eq!(quiet.metric("wshub_presence_sweeps_total"), 0.0);
    watcher.close().await;
}

/// `v` grows with every change of a group's list, the one a dead node's
/// lease makes too: its users leave the list at the lease's expiry, before
/// the sweep, and that list had the `v` of the one before (review of
/// 2026-12-02: two lists with one `v` for up to a heartbeat, and a client
/// keeping the stale one, "no newer").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_nodes_users_leaving_the_list_give_it_a_new_v() {
    let _turn = crate::common::TIMING_CRITICAL.lock().await;
    // A slow heartbeat: the sweep comes up to 700 ms after the lease.
    let (_redis, events, survivor, mut doomed) =
        survivor_and_doomed(Duration::from_millis(700)).await;
    let _stays = Client::connect(survivor.addr, &socket_path("stays", Some("dv"), false)).await;
    let gone = Client::connect(doomed.addr, &socket_path("gone", Some("dv"), false)).await;
    within("both listed", PATIENCE, || async {
        api_members(survivor.addr, Some("dv")).await.len() == 2
    })
    .await;
    doomed.child.kill_group();
    drop(gone);
    // Each list read until the sweep's leave is reported, with its `v`.
    let mut seen: Vec<(u64, BTreeMap<String, u64>)> = Vec::new();
    let deadline = Instant::now() + LEASE * 3;
    while Instant::now() < deadline {
        let swept = events.count("wshub.leave") > 0;
        let (status, view) = get_json(survivor.addr, "/api/presence/groups/dv").await;
        assert_eq!(status, 200, "{view}");
        if swept {
            break;
        }
        let v = view["v"].as_u64().unwrap();
        let members = members_of(&view);
        if seen.last().is_none_or(|(_, last)| *last != members) {
            seen.push((v, members));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(events.count("wshub.leave"), 1, "swept: {seen:?}");
    assert_eq!(
        seen.len(),
        2,
        "both lists seen before the sweep, the dead user's and without: {seen:?}"
    );
    assert!(
        seen[1].0 > seen[0].0,
        "the second with a higher v: {seen:?}"
    );
}

/// Guarantee 3: a socket that drops and reconnects 20 times in 10 s to
/// random nodes causes zero join and zero leave events (frames or backend
/// events) after its first join.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flapping_socket_causes_no_join_or_leave() {
    let _turn = crate::common::TIMING_CRITICAL.lock().await;
    let redis = RedisServer::start();
    let events = Events::start().await;
    let mut nodes = Vec::new();
    for _ in 0..3 {
        nodes.push(
            presence_node(&redis, |c| {
                events.configure(c);
                // Reconnects here take milliseconds; a loaded machine may
                // stretch one, not to a second.
                c.presence.leave_delay = Duration::from_millis(1000);
            })
            .await,
        );
    }
    let observer = Observer::open(nodes[0].addr, "watcher", Some("flap")).await;
    let mut socket = Client::connect(nodes[1].addr, &socket_path("fl", Some("flap"), false)).await;
    within(
        "fl's join reached the backend and the observer",
        PATIENCE,
        || async { events.count("wshub.join") == 2 && observer.members().contains("fl") },
    )
    .await;
    let before = events.all().len();
    let frames_before = observer.events().len();
    let start = Instant::now();
    for _ in 0..20 {
        socket.close().await;
        let node = rand::rng().random_range(0..3);
        socket = Client::connect(nodes[node].addr, &socket_path("fl", Some("flap"), false)).await;
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    assert!(start.elapsed() < Duration::from_secs(10) + Duration::from_secs(1));
    // Whatever the last drop left behind has settled: fl is listed once.
    within("fl is listed with one socket", PATIENCE, || async {
        api_members(nodes[2].addr, Some("flap")).await.get("fl") == Some(&1)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1000) + HEARTBEAT * 3).await;
    assert_eq!(
        events.all()[before..],
        [],
        "no backend events for a flapping socket"
    );
    assert_eq!(observer.events()[frames_before..], [], "no frames either");
    let writes: f64 = nodes
        .iter()
        .map(|n| n.metric("wshub_presence_writes_total"))
        .sum();
    eprintln!("20 reconnects to random nodes: {writes} presence scripts in all");
    observer.close().await;
}

/// Guarantee 4: Redis restarts empty; within `heartbeat_ms` + 1 s presence
/// equals the ground truth again, with no event (frames or backend).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_redis_restart_presence_is_back_within_a_heartbeat_and_silent() {
    let _turn = crate::common::TIMING_CRITICAL.lock().await;
    let mut redis = RedisServer::start();
    let events = Events::start().await;
    let heartbeat = Duration::from_millis(300);
    let tweak = |c: &mut wshub::Config| {
        presence_on(c);
        events.configure(c);
        c.presence.heartbeat = heartbeat;
        c.presence.lease = Duration::from_secs(10);
    };
    let a = TestServer::on_redis(&redis.url(), tweak).await;
    let b = TestServer::on_redis(&redis.url(), tweak).await;
    let mut sockets = Vec::new();
    let mut truth = Truth::new();
    for i in 0..30 {
        let (user, group) = (format!("u{}", i % 12), format!("room{}", i % 4));
        let node = if i % 2 == 0 { &a } else { &b };
        sockets.push(Client::connect(node.addr, &socket_path(&user, Some(&group), false)).await);
        *truth.entry((Some(group), user)).or_default() += 1;
    }
    sockets.push(Client::connect(a.addr, &socket_path("solo", None, false)).await);
    *truth.entry((None, "solo".into())).or_default() += 1;
    let observer = Observer::open(b.addr, "watcher", Some("room0")).await;
    *truth
        .entry((Some("room0".into()), "watcher".into()))
        .or_default() += 1;
    let groups: Vec<Option<String>> = (0..4)
        .map(|g| Some(format!("room{g}")))
        .chain([None])
        .collect();
    let matches = |truth: Truth| {
        let groups = groups.clone();
        async move {
            for g in &groups {
                let path = match g {
                    Some(g) => format!("/api/presence/groups/{g}"),
                    None => "/api/presence/nullgroup".into(),
                };
                let (status, body) = get_json(a.addr, &path).await;
                if status != 200 || members_of(&body) != truth_of(&truth, g.as_deref()) {
                    return false;
                }
            }
            true
        }
    };
    within("presence is complete", PATIENCE, || matches(truth.clone())).await;
    within("the observer has its snapshot", PATIENCE, || async {
        observer.has_snapshot()
    })
    .await;
    within("the events settled", PATIENCE, || async {
        events.count("wshub.online") == 14
    })
    .await;
    // Its own join frame travels through its node's frame list and may
    // come after the snapshot: wait for it, or it would count as a frame
    // the restart caused (it once did, in a full run on two busy cores).
    within("the observer has its own join", PATIENCE, || async {
        observer
            .events()
            .iter()
            .any(|(joined, user, _)| *joined && user == "watcher")
    })
    .await;
    let before = events.all();
    let frames_before = observer.events().len();

    redis.restart();
    let took = within(
        "presence equals the ground truth again",
        heartbeat + Duration::from_secs(1),
        || matches(truth.clone()),
    )
    .await;
    eprintln!("presence back {took:?} after Redis answered again");
    // Nothing was announced, and nothing comes late.
    tokio::time::sleep(heartbeat * 3).await;
    assert_eq!(events.all(), before, "no events after a Redis restart");
    assert_eq!(observer.events()[frames_before..], [], "no frames either");
    assert!(matches(truth.clone()).await);
    // And presence works on: a new user is a join again.
    let _late = Client::connect(b.addr, &socket_path("late", Some("room0"), false)).await;
    within("the late join is announced", PATIENCE, || async {
        observer.members().contains("late") && events.count("wshub.online") == 15
    })
    .await;
    observer.close().await;
}

/// After a Redis restart, a node that holds no sockets (so wrote nothing
/// back) answers its first presence request, and admits its first socket
/// under the per-user limit, on a new connection. (Its connection from
/// before the restart was kept until a call failed on it: a review saw
/// each idle node's first answer be a 503, "broken pipe", and a socket
/// refused with 503, Redis long back and `/readyz` 200.)
#[tokio::test]
async fn an_idle_node_answers_at_once_after_a_redis_restart() {
    let (captured, _guard) = crate::common::Captured::at(tracing::Level::INFO);
    let mut redis = RedisServer::start();
    let a = presence_node(&redis, limit(1, "refuse")).await;
    let (status, body) = get_json(a.addr, "/api/presence/groups/g").await;
    assert_eq!(status, 200, "{body}");
    redis.restart();
    within("the subscriber reconnected", PATIENCE, || async {
        captured
            .lines("subscribed to Redis")
            .iter()
            .any(|line| line["reconnect"] == true)
    })
    .await;
    a.wait_ready().await;
    let (status, body) = get_json(a.addr, "/api/presence/groups/g").await;
    assert_eq!(status, 200, "the first presence answer: {body}");
    let b = presence_node(&redis, limit(1, "refuse")).await;
    let _ann = Client::connect(b.addr, &socket_path("ann", Some("g"), false)).await;
    assert_eq!(
        try_connect(a.addr, &socket_path("ann", Some("g"), false))
            .await
            .err(),
        Some(429),
        "the per-user limit answered, not Redis's absence"
    );
}

/// Snapshot and events are ordered by `v`: events reach a socket in
/// increasing `v`, and a client that applies, on top of any snapshot, the
/// events with a greater `v` (whenever they arrived) ends with the group's
/// members, even when it asks for snapshots while members come and go on
/// three nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_and_events_are_ordered_by_v() {
    let redis = RedisServer::start();
    let mut nodes = Vec::new();
    for _ in 0..3 {
        nodes.push(presence_node(&redis, |_| {}).await);
    }
    let addrs: Vec<SocketAddr> = nodes.iter().map(|n| n.addr).collect();
    let observer = Observer::open(addrs[0], "watcher", Some("lobby")).await;
    let churn = {
        let addrs = addrs.clone();
        tokio::spawn(async move {
            let mut held = Vec::new();
            for i in 0..120 {
                let node = addrs[i % 3];
                held.push(
                    Client::connect(
                        node,
                        &socket_path(&format!("m{}", i % 20), Some("lobby"), false),
                    )
                    .await,
                );
                if i % 3 == 2 {
                    let pick = rand::rng().random_range(0..held.len());
                    held.swap_remove(pick).close().await;
                }
            }
            held
        })
    };
    for _ in 0..8 {
        observer.ask();
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    let held = churn.await.unwrap();
    observer.ask();
    let want: BTreeSet<String> = api_members_settled(addrs[1], "lobby").await;
    within("the observer's list is the group's", PATIENCE, || async {
        observer.members() == want
    })
    .await;
    let (snapshots, events) = {
        let seen = observer.seen.lock().unwrap();
        (seen.snapshots.clone(), seen.events.clone())
    };
    assert!(snapshots.len() >= 5, "{snapshots:?}");
    let vs: Vec<u64> = events.iter().map(|e| e.2).collect();
    assert!(
        vs.windows(2).all(|w| w[0] < w[1]),
        "events arrive in v order: {vs:?}"
    );
    // Joins and leaves of each user alternate.
    let mut last = BTreeMap::<&str, bool>::new();
    for (joined, user, _) in &events {
        if let Some(was) = last.insert(user, *joined) {
            assert_ne!(
                was,
                *joined,
                "{user}: two {} in a row",
                if *joined { "joins" } else { "leaves" }
            );
        }
    }
    drop(held);
    observer.close().await;
}

/// The group's members once nothing changes any more (after the leave
/// delay).
async fn api_members_settled(addr: SocketAddr, group: &str) -> BTreeSet<String> {
    let deadline = Instant::now() + PATIENCE;
    let mut last = BTreeMap::new();
    loop {
        let now = api_members(addr, Some(group)).await;
        if now == last && now.values().all(|n| *n > 0) {
            return now.into_keys().collect();
        }
        assert!(
            Instant::now() < deadline,
            "the group never settled: {now:?}"
        );
        last = now;
        tokio::time::sleep(LEAVE_DELAY).await;
    }
}

/// Tries to open a socket; the HTTP status when refused.
async fn try_connect(addr: SocketAddr, path: &str) -> Result<Client, u16> {
    match tokio_tungstenite::connect_async(format!("ws://{addr}{path}")).await {
        Ok((ws, _)) => Ok(Client { ws }),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            Err(response.status().as_u16())
        }
        Err(e) => panic!("connect failed: {e}"),
    }
}

fn limit(max: usize, policy: &str) -> impl Fn(&mut wshub::Config) {
    let policy = policy.to_owned();
    move |c: &mut wshub::Config| {
        c.presence.heartbeat = HEARTBEAT;
        c.presence.lease = LEASE;
        c.limits.max_connections_per_user = max;
        c.limits.per_user_policy = match policy.as_str() {
            "refuse" => wshub::config::PerUserPolicy::Refuse,
            _ => wshub::config::PerUserPolicy::ReplaceOldest,
        };
    }
}

/// The per-user limit with `replace_oldest` (presence on): the socket
/// over the limit closes the user's oldest one anywhere with 4003
/// `Session replaced`; sockets of a dead node do not count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replace_oldest_closes_the_oldest_socket_and_ignores_dead_nodes() {
    let redis = RedisServer::start();
    let events = Events::start().await;
    let a = presence_node(&redis, limit(2, "replace_oldest")).await;
    let b = presence_node(&redis, limit(2, "replace_oldest")).await;
    let mut doomed = presence_process(
        &redis,
        &events,
        &[("WSHUB_LIMITS__MAX_CONNECTIONS_PER_USER", "2")],
    )
    .await;
    let path = socket_path("max", Some("g"), false);
    let mut oldest = Client::connect(a.addr, &path).await;
    let _on_doomed = Client::connect(doomed.addr, &path).await;
    // Two of two. The doomed node dies; its (newer) socket stops counting
    // once its lease has passed: counted, it would make the next socket
    // replace the oldest.
    doomed.child.kill_group();
    within(
        "the dead node is out of the registry",
        LEASE + Duration::from_secs(1),
        || async {
            let (_, body) = get_json(a.addr, "/api/nodes").await;
            body["nodes"].as_array().unwrap().len() == 2
        },
    )
    .await;
    let mut second = Client::connect(b.addr, &path).await;
    let tag = second.send_sentinel().await;
    assert!(
        oldest.until_sentinel(&tag).await.is_empty(),
        "the oldest is still open"
    );
    second.until_sentinel(&tag).await;
    // The third live socket replaces the oldest, on another node.
    let mut third = Client::connect(b.addr, &path).await;
    assert_eq!(
        oldest.ended().await,
        Ended::Closed(4003, "Session replaced".into())
    );
    let tag = third.send_sentinel().await;
    assert!(
        second.until_sentinel(&tag).await.is_empty(),
        "the second stays"
    );
    within("counted as session_replaced", PATIENCE, || async {
        a.node
            .metrics
            .render()
            .contains("wshub_connections_closed_total{code=\"4003\",reason=\"session_replaced\"} 1")
    })
    .await;
}

/// The per-user limit with `refuse`, presence off: the socket over the
/// limit is refused with 429 on any node; once one closes, a new one is
/// accepted.
#[tokio::test]
async fn refuse_answers_429_anywhere_in_the_cluster() {
    let redis = RedisServer::start();
    let a = TestServer::on_redis(&redis.url(), limit(1, "refuse")).await;
    let b = TestServer::on_redis(&redis.url(), limit(1, "refuse")).await;
    let path = socket_path("one", None, false);
    let first = Client::connect(a.addr, &path).await;
    for node in [&a, &b] {
        assert_eq!(try_connect(node.addr, &path).await.err(), Some(429));
    }
    assert_eq!(
        a.metric("wshub_connections_refused_total{reason=\"per_user\"}"),
        1.0
    );
    // Other users are not affected.
    let _other = Client::connect(b.addr, &socket_path("two", None, false)).await;
    first.close().await;
    within(
        "a new socket is accepted once the first closed",
        PATIENCE,
        || async { try_connect(b.addr, &path).await.is_ok() },
    )
    .await;
    // Presence is off: the API says so.
    let (status, body) = get_json(a.addr, "/api/presence/nullgroup").await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (404, &json!("presence_off"))
    );
}

/// A client that resets its connection while Redis records its socket
/// (the upgrade waits on the per-user limit's script) leaves no place
/// held: the handler's future is dropped at that await, and the record
/// it left counted against the user for as long as the node ran (review
/// of 2026-12-03: after three aborted upgrades the user was refused 429
/// on every node while online nowhere).
#[tokio::test]
async fn an_upgrade_abandoned_while_redis_records_it_holds_no_place() {
    use tokio::io::AsyncWriteExt;
    let redis = RedisServer::start();
    let node = TestServer::on_redis(&redis.url(), limit(1, "refuse")).await;
    let path = socket_path("gone", None, false);
    // Redis holds every write (the script) for a while, not SUBSCRIBE.
    assert_eq!(cli(redis.port, &["CLIENT", "PAUSE", "1000", "WRITE"]), "OK");
    let mut tcp = tokio::net::TcpStream::connect(node.addr).await.unwrap();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        node.addr
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Reset, not a graceful close.
    tcp.set_zero_linger().unwrap();
    drop(tcp);
    // Once Redis takes writes again, the script records the socket; the
    // node forgets it at its next flush.
    tokio::time::sleep(Duration::from_millis(800)).await;
    within(
        "the user may open a socket: the abandoned one holds no place",
        PATIENCE,
        || async { try_connect(node.addr, &path).await.is_ok() },
    )
    .await;
}

/// The per-user limit across a node that missed its lease: its sockets
/// were taken for dead and others admitted in their place. When it comes
/// back, the user's oldest sockets past the limit are replaced (4003);
/// they were kept (review of 2026-12-03: three sockets against a limit of
/// two, until the user's next connect).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_back_after_its_lease_keeps_the_per_user_limit() {
    let redis = RedisServer::start();
    let events = Events::start().await;
    let a = presence_node(&redis, limit(2, "replace_oldest")).await;
    let stalled = presence_process(
        &redis,
        &events,
        &[("WSHUB_LIMITS__MAX_CONNECTIONS_PER_USER", "2")],
    )
    .await;
    let path = socket_path("z", Some("g"), false);
    let mut old = [
        Client::connect(stalled.addr, &path).await,
        Client::connect(stalled.addr, &path).await,
    ];
    assert!(stalled.child.signal("-STOP"));
    within(
        "the stalled node is out of the registry",
        LEASE + Duration::from_secs(2),
        || async {
            let (_, body) = get_json(a.addr, "/api/nodes").await;
            body["nodes"].as_array().unwrap().len() == 1
        },
    )
    .await;
    let mut new = [
        Client::connect(a.addr, &path).await,
        Client::connect(a.addr, &path).await,
    ];
    assert!(stalled.child.signal("-CONT"));
    for socket in &mut old {
        assert_eq!(
            socket.ended().await,
            Ended::Closed(4003, "Session replaced".into())
        );
    }
    within("z holds two sockets", PATIENCE, || async {
        api_members(a.addr, Some("g")).await.get("z") == Some(&2)
    })
    .await;
    let tag = new[0].send_sentinel().await;
    assert!(new[0].until_sentinel(&tag).await.is_empty());
    assert!(
        new[1].until_sentinel(&tag).await.is_empty(),
        "the newer sockets stay"
    );
}

/// A node back after missing its lease writes its presence again with
/// events (a survivor may have swept it and announced its users' leaves),
/// but not for users whose sockets closed while it was stalled: they got
/// their leave from the sweep, and were announced online again, then
/// offline a second time (review of 2026-12-03).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_back_after_its_lease_does_not_bring_back_sockets_closed_meanwhile() {
    let redis = RedisServer::start();
    let events = Events::start().await;
    let _a = presence_node(&redis, |c| events.configure(c)).await;
    let stalled = presence_process(&redis, &events, &[]).await;
    let _stay = Client::connect(stalled.addr, &socket_path("stay", Some("g"), false)).await;
    let gone = Client::connect(stalled.addr, &socket_path("gone", Some("g"), false)).await;
    let of = |user: &str| -> Vec<String> {
        events
            .all()
            .into_iter()
            .filter(|e| e.1 == user)
            .map(|e| e.0)
            .collect()
    };
    within("both are online", PATIENCE, || async {
        events.count("wshub.online") == 2
    })
    .await;
    assert!(stalled.child.signal("-STOP"));
    within(
        "the stalled node's users are swept",
        LEASE + Duration::from_secs(3),
        || async { events.count("wshub.offline") == 2 },
    )
    .await;
    // `gone` resets its connection while the node is stopped.
    if let tokio_tungstenite::MaybeTlsStream::Plain(tcp) = gone.ws.get_ref() {
        tcp.set_zero_linger().unwrap();
    }
    drop(gone);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(stalled.child.signal("-CONT"));
    within("stay is announced again", PATIENCE, || async {
        of("stay").iter().filter(|a| *a == "wshub.online").count() == 2
    })
    .await;
    // Past the leave delay, `gone` has had nothing more.
    tokio::time::sleep(LEAVE_DELAY + Duration::from_millis(700)).await;
    let mut seen = of("gone");
    seen.sort();
    assert_eq!(
        seen,
        ["wshub.join", "wshub.leave", "wshub.offline", "wshub.online"],
        "gone: one of each"
    );
}

/// `INFO commandstats` as command → calls.
fn commandstats(port: u16) -> BTreeMap<String, u64> {
    cli(port, &["INFO", "commandstats"])
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("cmdstat_")?;
            let (name, stats) = rest.split_once(':')?;
            let calls = stats
                .strip_prefix("calls=")?
                .split(',')
                .next()?
                .parse()
                .ok()?;
            Some((name.to_owned(), calls))
        })
        .collect()
}

fn delta(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0)))
        .filter(|(k, v)| *v > 0 && k != "info")
        .collect()
}

/// Guarantee 5, and the benchmark line: with sockets open and nobody
/// coming or going, Redis receives only the nodes' heartbeats (and the
/// bus's health probes, which predate presence), whatever the number of
/// sockets; then what one connect and one disconnect cost.
/// `WSHUB_PRESENCE_BENCH_SOCKETS` sets the number of idle sockets (1,000
/// by default; the figures in docs/presence.md are with 10,000).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sockets_cost_redis_nothing_but_heartbeats() {
    let sockets: usize = std::env::var("WSHUB_PRESENCE_BENCH_SOCKETS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1000);
    let redis = RedisServer::start();
    let mut nodes = Vec::new();
    for _ in 0..3 {
        nodes.push(presence_node(&redis, |c| c.limits.max_connections_per_user = 50).await);
    }
    let mut open = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let paths = (0..sockets / 3 + usize::from(i < sockets % 3))
            .map(|j| {
                let n = j * 3 + i;
                socket_path(
                    &format!("idle{}", n % (sockets / 2).max(1)),
                    Some(&format!("room{}", n % 50)),
                    n % 2 == 0,
                )
            })
            .collect();
        open.extend(open_all(node.addr, paths).await);
    }
    let writes = || -> f64 {
        nodes
            .iter()
            .map(|n| n.metric("wshub_presence_writes_total"))
            .sum()
    };
    within("every socket is written", PATIENCE * 6, || async {
        let mut n = 0;
        for g in 0..50 {
            n += api_members(nodes[0].addr, Some(&format!("room{g}")))
                .await
                .values()
                .sum::<u64>();
        }
        n == sockets as u64
    })
    .await;
    let before_writes = writes();
    let before = commandstats(redis.port);
    let window = Duration::from_secs(3);
    tokio::time::sleep(window).await;
    let idle = delta(&before, &commandstats(redis.port));
    assert_eq!(writes(), before_writes, "no presence write while idle");
    // Redis counts the commands a script runs too: the heartbeat's are
    // these, and nothing else may appear (no presence script, no BLPOP
    // or LPOP answered, nothing per socket).
    const HEARTBEAT_INNER: &[&str] = &[
        "time",
        "zremrangebyscore",
        "zadd",
        "zrange",
        "pexpireat",
        "hset",
        "pexpire",
        "zrangebyscore",
        "hget",
        "get",
        "set",
        "zcount",
    ];
    let unexpected: Vec<_> = idle
        .keys()
        .filter(|k| {
            !["eval", "publish"].contains(&k.as_str()) && !HEARTBEAT_INNER.contains(&k.as_str())
        })
        .collect();
    assert!(
        unexpected.is_empty(),
        "only heartbeats (eval) and probes (publish) while idle: {idle:?}"
    );
    let total = idle.get("eval").copied().unwrap_or(0) + idle.get("publish").copied().unwrap_or(0);
    let beats = window.as_millis() as u64 / HEARTBEAT.as_millis() as u64 * nodes.len() as u64;
    let eval = idle.get("eval").copied().unwrap_or(0);
    assert!(
        eval <= beats + nodes.len() as u64 * 2,
        "{eval} heartbeats, expected about {beats}"
    );
    eprintln!(
        "BENCH idle: {sockets} sockets on 3 nodes: {:.1} Redis commands/s ({:.1} heartbeat scripts per second at heartbeat_ms={}, {:.1} bus probes per second): {idle:?}",
        total as f64 / window.as_secs_f64(),
        eval as f64 / window.as_secs_f64(),
        HEARTBEAT.as_millis(),
        idle.get("publish").copied().unwrap_or(0) as f64 / window.as_secs_f64(),
    );

    // What connects and disconnects cost: new users in existing groups,
    // one at a time (no coalescing), then each closed.
    let rounds = 50;
    // Top-level commands besides heartbeats and probes: the bus's
    // (un)subscriptions and the presence script.
    let quiet = |stats: &BTreeMap<String, u64>| -> u64 {
        stats
            .iter()
            .filter(|(k, _)| {
                [
                    "evalsha",
                    "subscribe",
                    "unsubscribe",
                    "blpop",
                    "lpop",
                    "script",
                ]
                .contains(&k.as_str())
            })
            .map(|(_, v)| v)
            .sum()
    };
    let before = commandstats(redis.port);
    let mut fresh = Vec::new();
    for i in 0..rounds {
        let node = &nodes[i % 3];
        fresh.push(
            Client::connect(
                node.addr,
                &socket_path(&format!("new{i}"), Some(&format!("room{}", i % 50)), false),
            )
            .await,
        );
        let want = before_writes;
        within("the connect is written", PATIENCE, || async {
            writes() > want
        })
        .await;
    }
    tokio::time::sleep(HEARTBEAT).await;
    let connects = delta(&before, &commandstats(redis.port));
    let before = commandstats(redis.port);
    for client in fresh {
        client.close().await;
    }
    tokio::time::sleep(LEAVE_DELAY + HEARTBEAT * 3).await;
    let disconnects = delta(&before, &commandstats(redis.port));
    eprintln!(
        "BENCH per connect: {:.2} commands besides heartbeats and probes ({:.2} presence scripts) {connects:?}",
        quiet(&connects) as f64 / rounds as f64,
        connects.get("evalsha").copied().unwrap_or(0) as f64 / rounds as f64,
    );
    eprintln!(
        "BENCH per disconnect: {:.2} commands besides heartbeats and probes ({:.2} presence scripts) {disconnects:?}",
        quiet(&disconnects) as f64 / rounds as f64,
        disconnects.get("evalsha").copied().unwrap_or(0) as f64 / rounds as f64,
    );
    drop(open);
}

/// While Redis cannot be reached the presence API answers 503 with the
/// reason, in the API's error format, and a snapshot request gets a
/// `wshub.error`; sockets stay open.
#[tokio::test]
async fn without_redis_the_api_answers_503_and_sockets_stay() {
    let mut redis = RedisServer::start();
    let a = presence_node(&redis, |_| {}).await;
    let mut ann = Client::connect(a.addr, &socket_path("ann", Some("g"), true)).await;
    assert_eq!(inner(&ann.recv().await)["userId"], "ann", "her own join");
    redis.kill();
    for path in [
        "/api/presence/groups/g",
        "/api/presence/nullgroup",
        "/api/presence/users?ids=ann",
    ] {
        let (status, body) = get_json(a.addr, path).await;
        assert_eq!(status, 503, "{path}: {body}");
        assert_eq!(body["error"]["code"], "unavailable", "{body}");
    }
    ann.send_json(json!({"action": "wshub.presence"})).await;
    let reply = ann.recv().await;
    assert_eq!(reply["action"], "wshub.error", "{reply}");
    assert!(
        reply["message"]
            .as_str()
            .unwrap()
            .starts_with("presence not available"),
        "{reply}"
    );
}

/// Review of 2026-12-02: one node's events of a user reached the backend
/// in either order (`offline` before `leave` for one user, after it for
/// another): the holdings were written in a hash set's order. Now each
/// user's `online` comes before its `join`, and its `leave` before its
/// `offline`.
#[tokio::test]
async fn a_users_events_reach_the_backend_in_the_order_they_happen() {
    let redis = RedisServer::start();
    let events = Events::start().await;
    let node = presence_node(&redis, |c| events.configure(c)).await;
    let users: Vec<String> = (0..8).map(|i| format!("user{i}")).collect();
    let mut sockets = Vec::new();
    for user in &users {
        sockets.push(Client::connect(node.addr, &socket_path(user, Some("room"), false)).await);
    }
    within("every user online and in the room", PATIENCE, || async {
        events.count("wshub.online") == users.len() && events.count("wshub.join") == users.len()
    })
    .await;
    for socket in sockets {
        socket.close().await;
    }
    within("every user gone", PATIENCE, || async {
        events.count("wshub.offline") == users.len() && events.count("wshub.leave") == users.len()
    })
    .await;
    let seen = events.all();
    let at = |action: &str, user: &str| {
        seen.iter()
            .position(|e| e.0 == action && e.1 == user)
            .unwrap_or_else(|| panic!("no {action} for {user}: {seen:?}"))
    };
    for user in &users {
        assert!(
            at("wshub.online", user) < at("wshub.join", user),
            "{user}: join before online: {seen:?}"
        );
        assert!(
            at("wshub.leave", user) < at("wshub.offline", user),
            "{user}: offline before leave: {seen:?}"
        );
    }
}

/// A page asking for its group's members on a hub with presence off is
/// told that presence is off, not that the action is reserved (review of
/// 2026-12-03: the library's request got "reserved for the hub", and a
/// page could only tell by matching that text), whether or not its
/// socket asked for presence=1.
#[tokio::test]
async fn a_hub_with_presence_off_says_so() {
    let server = crate::common::TestServer::start().await;
    for query in ["userid=ann&groupid=chat&presence=1", "userid=bob"] {
        let mut socket = Client::connect(server.addr, &format!("/ws?{query}")).await;
        socket.send_json(json!({"action": "wshub.presence"})).await;
        let reply = socket.recv().await;
        assert_eq!(reply["action"], "wshub.error", "{query}: {reply}");
        assert_eq!(
            reply["message"],
            "presence is off on this hub (presence.enabled = false): `wshub.presence` is not answered",
            "{query}"
        );
        socket.close().await;
    }
}
