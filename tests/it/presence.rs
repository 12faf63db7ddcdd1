//! Issue 15: cluster presence (`reference/presence.md`, `docs/presence.md`),
//! each guarantee of the contract over real nodes (in-process servers and
//! `wshub` processes) and a real `redis-server` (missing: the test fails,
//! see `common::redis`). Leases and delays are short so that expiry is
//! quick to watch.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
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

/// Polls `check` every 20 ms until it holds; fails after `within`. Returns
/// how long it took.
async fn within<F, Fut>(what: &str, within: Duration, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if check().await {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "not within {} ms: {what}",
            within.as_millis()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

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
    /// Join/leave frames that arrived before the snapshot.
    early: Vec<(bool, String, u64)>,
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
                                let view = inner(&frame);
                                let v = view["v"].as_u64().unwrap();
                                seen.members = members_of(&view).into_keys().collect();
                                seen.snapshot_v = Some(v);
                                for (joined, user, ev) in std::mem::take(&mut seen.early) {
                                    if ev > v { seen.apply(joined, &user); }
                                }
                            }
                            Some(a @ ("wshub.join" | "wshub.leave")) => {
                                let m = inner(&frame);
                                let (user, v) = (m["userId"].as_str().unwrap().to_owned(), m["v"].as_u64().unwrap());
                                let joined = a == "wshub.join";
                                seen.events.push((joined, user.clone(), v));
                                match seen.snapshot_v {
                                    None => seen.early.push((joined, user, v)),
                                    Some(sv) if v > sv => seen.apply(joined, &user),
                                    Some(_) => {}
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

/// A backend that records presence events: (action, user, group).
struct Events {
    url: String,
    seen: Arc<Mutex<Vec<(String, String, Option<String>)>>>,
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

    fn all(&self) -> Vec<(String, String, Option<String>)> {
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
    // wshub.presence is refused as any reserved action.
    plain.send_json(json!({"action": "wshub.presence"})).await;
    let tag = plain.send_sentinel().await;
    let got = plain.until_sentinel(&tag).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["action"], "wshub.error");
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

    // Presence off: 404 in the API's error format.
    let off = TestServer::on_redis(&redis.url(), |_| {}).await;
    let (status, body) = get_json(off.addr, "/api/presence/groups/chat").await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], "presence_off", "{body}");
}

/// Groups over `max_members_events` get no join/leave frames (the backend
/// still hears of them).
#[tokio::test]
async fn big_groups_send_no_member_frames() {
    let redis = RedisServer::start();
    let a = presence_node(&redis, |c| c.presence.max_members_events = 2).await;
    let mut ann = Client::connect(a.addr, &socket_path("ann", Some("big"), true)).await;
    assert_eq!(inner(&ann.recv().await)["userId"], "ann", "her own join");
    let _bob = Client::connect(a.addr, &socket_path("bob", Some("big"), false)).await;
    let join = ann.recv().await;
    assert_eq!(inner(&join)["userId"], "bob", "two members: still framed");
    let _cid = Client::connect(a.addr, &socket_path("cid", Some("big"), false)).await;
    within("cid is listed", PATIENCE, || async {
        api_members(a.addr, Some("big")).await.len() == 3
    })
    .await;
    let tag = ann.send_sentinel().await;
    assert!(
        ann.until_sentinel(&tag).await.is_empty(),
        "no frame for a third member"
    );
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
    const GROUPS: usize = 50;
    const USERS: usize = 40;
    const WORKERS: usize = 10;
    const OPS_PER_WORKER: usize = 300;
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
            for _ in 0..OPS_PER_WORKER {
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
                    let client = Client::connect(addrs[node], &socket_path(&u, Some(&g), false)).await;
                    *truth.lock().unwrap().entry((Some(g.clone()), u.clone())).or_default() += 1;
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
            wrong.push(format!("observer of {}: {listed:?} != {want_users:?}", group(i)));
        }
    }
    assert!(wrong.is_empty(), "one second after the churn:\n{}", wrong.join("\n"));
    let writes: f64 = nodes
        .iter()
        .map(|n| n.metric("wshub_presence_writes_total"))
        .sum();
    eprintln!(
        "churn: {} connects and disconnects in {churn:?}, {writes} presence scripts, {} sockets open",
        WORKERS * OPS_PER_WORKER,
        still_open.len() + GROUPS
    );
    for observer in observers {
        observer.close().await;
    }
}
