//! Lossless resume, proved from outside (issue 14, "The proof"): real
//! `wshub` processes on a private Redis, clients that speak nothing but the
//! wire contract of `reference/resume.md` (`resume=`, the `wshub.welcome`
//! first frame, each frame's `pos`, `wshub.gap`) and the routing table of
//! `reference/protocol.md`, and the faults a cluster lives through.
//!
//! - The chaos test,
//!   [`chaos_with_history_every_client_gets_its_set_once_in_order`], three
//!   nodes, 300 resume-speaking clients, 10,000 messages at about 1,000/s,
//!   and meanwhile a SIGKILLed node, a SIGTERMed node, every client dropping
//!   its socket once and five `CLIENT KILL TYPE pubsub` against a node's
//!   subscriber. Every client must receive exactly its set, once, in order,
//!   and every resume must say `recovered: true`.
//! - Its twin, [`chaos_without_history_reports_what_is_lost`], the same run
//!   with history off (today's at-most-once), for the README's chaos table.
//! - The faults history cannot survive, which must be said honestly: a
//!   Redis restarted without persistence, a Redis restored from an older
//!   snapshot.
//! - The drain handoff: an unmodified (legacy) client across a SIGTERM of
//!   its node receives what it missed on its next socket.
//!
//! Each chaos run prints one `CHAOS …` line per fault (`--nocapture`):
//! messages sent while the fault was in effect, deliveries at risk, lost,
//! duplicated, clients affected. `CHAOS_SEED=<n>` replays another plan.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_tungstenite::connect_async;
use tokio_tungstenite::tungstenite::Message;

use crate::common::node::NodeProcess;
use crate::common::redis::{RedisServer, cli};
use crate::common::{Client, Ended, PATIENCE, Ws};

const BROADCAST: &str = "/__broadcastWebSocket.wc";

// ---------------------------------------------------------------------
// Identities, positions and frames as the contract names them.
// ---------------------------------------------------------------------

/// A socket's identity: `userid` and `groupid` (`None`: no `groupid`
/// parameter, the null group).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Who {
    user: String,
    group: Option<String>,
}

impl Who {
    fn new(user: &str, group: Option<&str>) -> Self {
        Self {
            user: user.to_owned(),
            group: group.map(str::to_owned),
        }
    }

    /// The socket's three topic keys: `all`, its group's, its user's.
    fn keys(&self) -> [String; 3] {
        [
            "all".to_owned(),
            match &self.group {
                None => "nullgroup".to_owned(),
                Some(g) => format!("group:{g}"),
            },
            format!("user:{}", self.user),
        ]
    }

    /// The socket path; `resume` is the `resume` parameter's value
    /// (`Some("")`: "I speak resume, start fresh"), `None`: a legacy socket.
    fn path(&self, resume: Option<&str>) -> String {
        let mut query: Vec<(&str, &str)> = vec![("userid", &self.user)];
        if let Some(g) = &self.group {
            query.push(("groupid", g));
        }
        if let Some(r) = resume {
            query.push(("resume", r));
        }
        format!(
            "/__initializeWebSocket.wc?{}",
            serde_urlencoded::to_string(&query).unwrap()
        )
    }

    fn describe(&self) -> String {
        match &self.group {
            Some(g) => format!("user {:?} group {:?}", self.user, g),
            None => format!("user {:?} (null group)", self.user),
        }
    }
}

/// Topic key → `"<epoch>:<offset>"`.
type Positions = BTreeMap<String, String>;

fn split_position(p: &str) -> Option<(&str, u64)> {
    let (epoch, offset) = p.rsplit_once(':')?;
    Some((epoch, offset.parse().ok()?))
}

/// What every frame is read as (unknown fields ignored).
#[derive(Debug, Deserialize)]
struct Frame {
    action: Option<String>,
    message: Option<String>,
    pos: Option<Positions>,
}

/// The `message` of a `wshub.welcome` frame.
#[derive(Debug, Clone, Deserialize)]
struct Welcome {
    recovered: bool,
    replayed: u64,
    positions: Positions,
    node: String,
}

fn parse_welcome(frame: &Frame, raw: &str) -> Result<Welcome, String> {
    let text = frame
        .message
        .as_deref()
        .ok_or_else(|| format!("welcome without a string message: {raw}"))?;
    serde_json::from_str(text).map_err(|e| format!("unreadable welcome ({e}): {raw}"))
}

/// Moves `positions` forward with a frame's `pos`, for the keys the socket
/// tracks. Returns what broke the contract: an offset that does not grow
/// within an epoch, or an epoch that changed (`epoch_may_change` allows
/// that, after a Redis restart).
fn advance(
    positions: &mut Positions,
    keys: &[String; 3],
    pos: &Positions,
    epoch_may_change: bool,
) -> Vec<String> {
    let mut wrong = Vec::new();
    for key in keys {
        let Some(new) = pos.get(key) else { continue };
        let Some((new_epoch, new_offset)) = split_position(new) else {
            wrong.push(format!("unreadable position {key}={new:?}"));
            continue;
        };
        if let Some(old) = positions.get(key) {
            match split_position(old) {
                Some((old_epoch, old_offset))
                    if old_epoch == new_epoch && new_offset <= old_offset =>
                {
                    wrong.push(format!("{key}: offset went from {old} to {new}"));
                }
                Some((old_epoch, _)) if old_epoch == new_epoch => {}
                Some(_) if epoch_may_change => {}
                _ => wrong.push(format!("{key}: epoch changed from {old} to {new}")),
            }
        }
        positions.insert(key.clone(), new.clone());
    }
    wrong
}

// ---------------------------------------------------------------------
// Nodes.
// ---------------------------------------------------------------------

/// A node's environment: its Redis, a fixed `node_id` (a restarted node
/// keeps it, as a StatefulSet pod or a Compose service does), history on or
/// off, a short drain.
fn node_env(redis: &str, node_id: &str, history: bool) -> Vec<(String, String)> {
    [
        ("WSHUB_REDIS__URL", redis),
        ("WSHUB_NODE_ID", node_id),
        (
            "WSHUB_HISTORY__ENABLED",
            if history { "true" } else { "false" },
        ),
        ("WSHUB_SHUTDOWN__DRAIN_WINDOW_MS", "500"),
        ("WSHUB_SHUTDOWN__GRACE_PERIOD_MS", "5000"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

async fn spawn_node(env: &[(String, String)]) -> NodeProcess {
    let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    NodeProcess::spawn(&pairs).await
}

/// Log lines of the nodes worth showing when a chaos run fails: warnings,
/// errors, and (at debug) why a resume was not recovered and which gaps
/// were repaired. Diagnostics only: nothing is asserted on them.
type Notes = Arc<Mutex<Vec<String>>>;

/// [`spawn_node`], keeping the node's [`Notes`] under `label`.
async fn spawn_noting(env: &[(String, String)], label: String, notes: Notes) -> NodeProcess {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let mut child = crate::common::process::GroupChild::spawn(
        Command::new(env!("CARGO_BIN_EXE_wshub"))
            .env("WSHUB_LISTEN", "127.0.0.1:0")
            .env("WSHUB_LOG__FORMAT", "json")
            .env(
                "WSHUB_LOG__LEVEL",
                "info,wshub::resume=debug,wshub::bus=debug",
            )
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(Stdio::piped()),
    )
    .expect("spawn wshub");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let (addr, node_id) = loop {
        let line = lines
            .next()
            .expect("wshub exited before listening")
            .unwrap();
        let v: Value = serde_json::from_str(&line).unwrap_or_default();
        if v["message"] == "wshub listening" {
            break (
                v["addr"].as_str().unwrap().parse().unwrap(),
                v["node"].as_str().unwrap().to_owned(),
            );
        }
    };
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            let worth = line.contains("\"WARN\"")
                || line.contains("\"ERROR\"")
                || line.contains("not recovered")
                || line.contains("gap");
            let mut notes = notes.lock().unwrap();
            if worth && notes.len() < 5_000 {
                notes.push(format!("{label}: {line}"));
            }
        }
    });
    let node = NodeProcess {
        child,
        addr,
        node_id,
    };
    wait_ready(&reqwest::Client::new(), node.addr, "a chaos node").await;
    node
}

async fn is_ready(http: &reqwest::Client, addr: SocketAddr) -> bool {
    http.get(format!("http://{addr}/readyz"))
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .is_ok_and(|r| r.status() == 200)
}

async fn wait_ready(http: &reqwest::Client, addr: SocketAddr, what: &str) {
    let deadline = Instant::now() + PATIENCE;
    while !is_ready(http, addr).await {
        assert!(Instant::now() < deadline, "{what} never became ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Pushes one message through a node's broadcast endpoint; 204 expected.
async fn push(http: &reqwest::Client, node: SocketAddr, body: &Value) {
    let resp = http
        .post(format!("http://{node}{BROADCAST}"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .timeout(PATIENCE)
        .send()
        .await
        .expect("broadcast POST");
    assert_eq!(resp.status(), 204, "push {body}");
}

fn to_group(group: &str, text: &str) -> Value {
    json!({"action": "t", "message": text, "recipients": [{"type": "group", "value": group}]})
}

fn to_user(user: &str, text: &str) -> Value {
    json!({"action": "t", "message": text, "recipients": [{"type": "user", "value": user}]})
}

fn to_all(text: &str) -> Value {
    json!({"action": "t", "message": text})
}

// ---------------------------------------------------------------------
// A resume-speaking client for the single-fault tests.
// ---------------------------------------------------------------------

struct ResumeClient {
    who: Who,
    ws: Ws,
    positions: Positions,
    /// `wshub.gap` notices seen.
    gaps: Vec<String>,
    /// A Redis restart happened while this client lived: epochs may change.
    epoch_may_change: bool,
}

impl ResumeClient {
    /// Opens a socket with `resume=` (fresh) or `resume=<positions>` and
    /// reads its welcome, which must be the first frame.
    async fn open(addr: SocketAddr, who: &Who, resume: Option<&Positions>) -> (Self, Welcome) {
        let value = resume.map_or_else(String::new, |p| serde_json::to_string(p).unwrap());
        let url = format!("ws://{addr}{}", who.path(Some(&value)));
        let (ws, response) = tokio::time::timeout(PATIENCE, connect_async(url))
            .await
            .expect("websocket connect timed out")
            .expect("websocket connect");
        assert_eq!(response.status(), 101);
        let mut client = Self {
            who: who.clone(),
            ws,
            positions: Positions::new(),
            gaps: Vec::new(),
            epoch_may_change: false,
        };
        let raw = client.recv_raw_for("wshub.welcome").await;
        let frame: Frame = serde_json::from_str(&raw).expect("frame is JSON");
        assert_eq!(
            frame.action.as_deref(),
            Some("wshub.welcome"),
            "the first frame of a resume-speaking socket must be the welcome: {raw}"
        );
        let welcome = parse_welcome(&frame, &raw).unwrap();
        let v: Value = serde_json::from_str(&raw).unwrap();
        assert_eq!(v["userId"], json!(who.user), "welcome userId: {raw}");
        assert_eq!(v["groupId"], json!(who.group), "welcome groupId: {raw}");
        for key in who.keys() {
            assert!(
                welcome.positions.contains_key(&key),
                "the welcome names no position for {key}: {raw}"
            );
        }
        if welcome.recovered {
            assert_eq!(
                Some(&welcome.positions),
                resume,
                "a recovered welcome's positions are the ones the client sent"
            );
        } else {
            assert_eq!(welcome.replayed, 0, "not recovered, yet replayed: {raw}");
        }
        client.positions = welcome.positions.clone();
        (client, welcome)
    }

    async fn recv_raw(&mut self) -> String {
        self.recv_raw_for("a frame").await
    }

    async fn recv_raw_for(&mut self, what: &str) -> String {
        loop {
            let msg = tokio::time::timeout(PATIENCE, self.ws.next())
                .await
                .unwrap_or_else(|_| {
                    panic!("{}: no {what} within {PATIENCE:?}", self.who.describe())
                })
                .expect("socket ended")
                .expect("socket error");
            match msg {
                Message::Text(t) => return t.to_string(),
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    }

    /// The `message` texts of the frames before the one whose message is
    /// `tag`; every one must carry `pos`, whose offsets grow. `wshub.gap`
    /// notices are kept aside.
    async fn until(&mut self, tag: &str) -> Vec<String> {
        let mut seen = Vec::new();
        loop {
            let raw = self.recv_raw().await;
            let frame: Frame = serde_json::from_str(&raw).expect("frame is JSON");
            match frame.action.as_deref() {
                Some("wshub.gap") => {
                    self.gap(raw);
                    continue;
                }
                Some("wshub.welcome") => panic!("a second welcome: {raw}"),
                _ => {}
            }
            let pos = frame.pos.as_ref().unwrap_or_else(|| {
                panic!("a frame to a resume-speaking socket without pos: {raw}")
            });
            let keys = self.who.keys();
            let wrong = advance(&mut self.positions, &keys, pos, self.epoch_may_change);
            assert!(
                wrong.is_empty(),
                "{}: {wrong:?} in {raw}",
                self.who.describe()
            );
            let text = frame.message.unwrap_or_default();
            if text == tag {
                return seen;
            }
            seen.push(text);
        }
    }

    /// A `wshub.gap` notice: kept, and its `positions` taken as the
    /// library takes them (a tracked topic's newer position: what the
    /// socket lost is behind it now).
    fn gap(&mut self, raw: String) {
        let frame: Frame = serde_json::from_str(&raw).expect("frame is JSON");
        let info: Value = serde_json::from_str(frame.message.as_deref().unwrap_or_default())
            .unwrap_or_else(|e| panic!("a gap notice's message is not JSON ({e}): {raw}"));
        if let Some(positions) = info.get("positions") {
            let positions: Positions = serde_json::from_value(positions.clone())
                .unwrap_or_else(|e| panic!("a gap notice's positions ({e}): {raw}"));
            for (key, new) in positions {
                let newer = match (
                    self.positions.get(&key).and_then(|p| split_position(p)),
                    split_position(&new),
                ) {
                    (Some((old_epoch, old_offset)), Some((epoch, offset))) => {
                        old_epoch != epoch || offset > old_offset
                    }
                    (None, Some(_)) => true,
                    (_, None) => panic!("an unreadable position in a gap notice: {raw}"),
                };
                if newer && self.who.keys().contains(&key) {
                    self.positions.insert(key, new);
                }
            }
        }
        self.gaps.push(raw);
    }

    /// Reads frames until `n` gap notices were seen in all; no message
    /// may come meanwhile.
    async fn until_gaps(&mut self, n: usize) {
        while self.gaps.len() < n {
            let raw = self
                .recv_raw_for(&format!("a gap notice (seen: {:?})", self.gaps))
                .await;
            let frame: Frame = serde_json::from_str(&raw).expect("frame is JSON");
            assert_eq!(frame.action.as_deref(), Some("wshub.gap"), "{raw}");
            self.gap(raw);
        }
    }

    /// Drops the TCP connection without a close frame (a lost network).
    fn vanish(self) -> Positions {
        self.positions
    }
}

// ---------------------------------------------------------------------
// The chaos plan: who, what, when. Deterministic from the seed.
// ---------------------------------------------------------------------

const CLIENTS: usize = 300;
const GROUPS: usize = 30;
const MESSAGES: usize = 10_000;
/// One message every this long: about 1,000 a second.
const INTERVAL: Duration = Duration::from_millis(1);
/// Faults and drops happen when the generator has sent so many messages
/// (not at fixed times: on a slower machine the run is slower, the
/// scenario the same).
const PUBSUB_KILLS: [usize; 5] = [1_000, 2_500, 4_000, 5_500, 7_000];
const SIGKILL_N2: usize = 3_000;
const RESTART_N2_AFTER: Duration = Duration::from_millis(500);
const SIGTERM_N3: usize = 6_000;
/// The generator stops using a node this many messages, and at least a
/// second, before it is killed or terminated: what a dead node had
/// accepted but not yet handed to Redis is a publisher's loss, not the
/// subject here.
const QUIET_BEFORE_FAULT: usize = 500;
/// Everything must be over by then (from `start`); the outer test timeout
/// is a little longer.
/// (A cap, not the expected time: a run takes about 15 s on an idle
/// machine, more when the machine is shared.)
const RUN_LIMIT: Duration = Duration::from_secs(120);
/// Messages sent within this margin of an offline window are counted to it.
const SLACK: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Kind {
    Group,
    User,
    GroupUser,
    Everyone,
    ExcludeOnly,
    ExcludeGroup,
}

/// A message's recipients, as the routing table reads them.
#[derive(Debug, Clone)]
struct Route {
    groups: Vec<Option<String>>,
    users: Vec<String>,
    excluded: Vec<String>,
}

impl Route {
    /// protocol.md, "Who receives a message": no group or user recipient is
    /// everyone; otherwise a matching group or user; an excluded user never,
    /// whatever the order. A socket gets at most one copy.
    fn reaches(&self, who: &Who) -> bool {
        if self.excluded.contains(&who.user) {
            return false;
        }
        if self.groups.is_empty() && self.users.is_empty() {
            return true;
        }
        self.groups.contains(&who.group) || self.users.contains(&who.user)
    }
}

struct Planned {
    body: String,
    route: Route,
    kind: Kind,
}

#[derive(Debug, Clone, Copy)]
struct DropPlan {
    /// When the generator has sent this many messages.
    at: usize,
    lasts: Duration,
    /// Close with a close frame (1000) rather than vanish.
    close_frame: bool,
}

struct Plan {
    clients: Vec<Who>,
    drops: Vec<DropPlan>,
    messages: Vec<Planned>,
}

fn group_name(i: usize) -> Option<String> {
    match i {
        0 => None,
        // Any characters: a colon (the position separator) and a space.
        i if i % 10 == 3 => Some(format!("g:{i} x")),
        i => Some(format!("g{i}")),
    }
}

fn user_name(i: usize) -> String {
    if i % 10 == 7 {
        format!("u:{i} ü")
    } else {
        format!("u{i}")
    }
}

fn recipient(kind: &str, value: &str) -> Value {
    json!({"type": kind, "value": value})
}

impl Plan {
    fn new(seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        // 120 users: 60 with three sockets, 60 with two.
        let mut clients = Vec::with_capacity(CLIENTS);
        for u in 0..120 {
            let sockets = if u < 60 { 3 } else { 2 };
            for _ in 0..sockets {
                let g = rng.random_range(0..GROUPS);
                clients.push(Who {
                    user: user_name(u),
                    group: group_name(g),
                });
            }
        }
        assert_eq!(clients.len(), CLIENTS);
        // Shuffle, so a user's sockets land on different nodes.
        for i in (1..clients.len()).rev() {
            let j = rng.random_range(0..=i);
            clients.swap(i, j);
        }
        let drops = (0..CLIENTS)
            .map(|_| DropPlan {
                at: rng.random_range(300..7_500),
                lasts: Duration::from_millis(rng.random_range(100..=5_000)),
                close_frame: rng.random_bool(0.3),
            })
            .collect();
        let group_value = |g: &Option<String>| g.clone().unwrap_or_default();
        let mut messages = Vec::with_capacity(MESSAGES);
        for id in 0..MESSAGES {
            let g = group_name(rng.random_range(0..GROUPS));
            let u = user_name(rng.random_range(0..120));
            let (kind, recipients, route) = match rng.random_range(0..100) {
                0..35 => (
                    Kind::Group,
                    Some(json!([recipient("group", &group_value(&g))])),
                    Route {
                        groups: vec![g],
                        users: vec![],
                        excluded: vec![],
                    },
                ),
                35..55 => (
                    Kind::User,
                    Some(json!([recipient("user", &u)])),
                    Route {
                        groups: vec![],
                        users: vec![u],
                        excluded: vec![],
                    },
                ),
                55..75 => (
                    Kind::GroupUser,
                    Some(json!([
                        recipient("group", &group_value(&g)),
                        recipient("user", &u)
                    ])),
                    Route {
                        groups: vec![g],
                        users: vec![u],
                        excluded: vec![],
                    },
                ),
                75..78 => (
                    Kind::Everyone,
                    // Absent and [] both mean everyone.
                    if id % 2 == 0 { None } else { Some(json!([])) },
                    Route {
                        groups: vec![],
                        users: vec![],
                        excluded: vec![],
                    },
                ),
                78..80 => (
                    Kind::ExcludeOnly,
                    Some(json!([recipient("excludeUser", &u)])),
                    Route {
                        groups: vec![],
                        users: vec![],
                        excluded: vec![u],
                    },
                ),
                _ => {
                    // A member of the group, excluded: the exclusion matters.
                    let member = &clients[rng.random_range(0..CLIENTS)];
                    let (g, u) = (member.group.clone(), member.user.clone());
                    let (ex, gr) = (
                        recipient("excludeUser", &u),
                        recipient("group", &group_value(&g)),
                    );
                    let list = if rng.random_bool(0.5) {
                        json!([ex, gr])
                    } else {
                        json!([gr, ex])
                    };
                    (
                        Kind::ExcludeGroup,
                        Some(list),
                        Route {
                            groups: vec![g],
                            users: vec![],
                            excluded: vec![u],
                        },
                    )
                }
            };
            let mut body = json!({"action": "c", "message": format!("m{id}")});
            if let Some(r) = recipients {
                body["recipients"] = r;
            }
            messages.push(Planned {
                body: body.to_string(),
                route,
                kind,
            });
        }
        Self {
            clients,
            drops,
            messages,
        }
    }
}

// ---------------------------------------------------------------------
// The cluster as the clients and the generator see it.
// ---------------------------------------------------------------------

/// Which nodes accept sockets and messages right now, and which
/// incarnation of each (a restarted node is a new sender).
struct Live {
    addrs: Mutex<[Option<(SocketAddr, usize)>; 3]>,
    /// The generator may send through it.
    send: [AtomicBool; 3],
}

impl Live {
    fn pick(&self, rng: &mut StdRng, for_send: bool) -> Option<(usize, usize, SocketAddr)> {
        let addrs = self.addrs.lock().unwrap();
        let up: Vec<(usize, usize, SocketAddr)> = (0..3)
            .filter(|&i| !for_send || self.send[i].load(Ordering::SeqCst))
            .filter_map(|i| addrs[i].map(|(a, inc)| (i, inc, a)))
            .collect();
        if up.is_empty() {
            None
        } else {
            Some(up[rng.random_range(0..up.len())])
        }
    }

    fn set(&self, node: usize, addr: Option<(SocketAddr, usize)>) {
        self.addrs.lock().unwrap()[node] = addr;
    }

    fn up(&self) -> Vec<(usize, SocketAddr)> {
        let addrs = self.addrs.lock().unwrap();
        (0..3)
            .filter_map(|i| addrs[i].map(|(a, _)| (i, a)))
            .collect()
    }
}

fn node_label(node: usize, inc: usize) -> String {
    format!("n{}#{}", node + 1, inc)
}

// ---------------------------------------------------------------------
// A chaos client.
// ---------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq)]
enum End {
    Open,
    /// The planned drop.
    SelfDrop,
    /// A close frame from the hub.
    Closed(u16),
    /// The TCP connection ended without a close frame (a killed node).
    Dropped,
    Finished,
    Deadline,
}

#[derive(Debug, Clone)]
struct Session {
    node: usize,
    inc: usize,
    /// From `start` (negative times, before the first message, are 0).
    opened: Duration,
    /// The welcome arrived (or, without history, the 101).
    live_at: Option<Duration>,
    /// The positions it resumed from (`None`: a fresh `resume=`, or no
    /// history).
    sent: Option<Positions>,
    welcome: Option<Welcome>,
    ended: Option<Duration>,
    end: End,
}

#[derive(Debug, Clone, Copy)]
struct Got {
    id: usize,
    at: Duration,
    session: usize,
}

#[derive(Debug, Default)]
struct ClientLog {
    sessions: Vec<Session>,
    got: Vec<Got>,
    sentinels: BTreeSet<String>,
    /// Broken promises of the wire contract (welcome first, `pos`, …).
    protocol: Vec<String>,
    gaps: Vec<String>,
    /// Frames that are none of ours.
    strange: Vec<String>,
    failed_connects: usize,
    /// Topic key → epoch → where this client first saw it.
    epochs: BTreeMap<String, BTreeMap<String, String>>,
    finished: bool,
    dropped_as_planned: bool,
}

struct ClientCtx {
    idx: usize,
    who: Who,
    history: bool,
    drop: DropPlan,
    live: Arc<Live>,
    start: watch::Receiver<Option<Instant>>,
    /// Messages the generator is done with.
    progress: watch::Receiver<usize>,
    rounds: watch::Receiver<Vec<Vec<String>>>,
    /// Counts clients whose first socket is up (and welcomed).
    ready: Arc<AtomicUsize>,
    /// Counts clients back on a socket after their planned drop.
    back: Arc<AtomicUsize>,
    deadline: Instant,
    rng: StdRng,
}

/// Remembers the epochs in `positions` not seen before, with `context`.
fn note_epochs(
    epochs: &mut BTreeMap<String, BTreeMap<String, String>>,
    positions: &Positions,
    context: impl Fn() -> String,
) {
    for (key, p) in positions {
        let Some((epoch, _)) = split_position(p) else {
            continue;
        };
        let known = epochs.entry(key.clone()).or_default();
        if !known.contains_key(epoch) {
            known.insert(epoch.to_owned(), context());
        }
    }
}

fn since(start: Option<Instant>, now: Instant) -> Duration {
    start.map_or(Duration::ZERO, |s| now.saturating_duration_since(s))
}

async fn run_client(mut c: ClientCtx) -> ClientLog {
    let mut log = ClientLog::default();
    let keys = c.who.keys();
    let mut positions: Option<Positions> = None;
    let mut drop_done = false;
    let mut report_back = false;
    let far = Instant::now() + Duration::from_secs(3600);
    'sessions: loop {
        if Instant::now() >= c.deadline {
            break;
        }
        let Some((node, inc, addr)) = c.live.pick(&mut c.rng, false) else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let resume = c.history.then(|| {
            positions
                .as_ref()
                .map_or_else(String::new, |p| serde_json::to_string(p).unwrap())
        });
        let url = format!("ws://{addr}{}", c.who.path(resume.as_deref()));
        let mut ws = match tokio::time::timeout(Duration::from_secs(3), connect_async(url)).await {
            Ok(Ok((ws, _))) => ws,
            _ => {
                log.failed_connects += 1;
                let pause = c.rng.random_range(20..80);
                tokio::time::sleep(Duration::from_millis(pause)).await;
                continue;
            }
        };
        let start = *c.start.borrow();
        let s = log.sessions.len();
        log.sessions.push(Session {
            node,
            inc,
            opened: since(start, Instant::now()),
            live_at: None,
            sent: positions.clone(),
            welcome: None,
            ended: None,
            end: End::Open,
        });
        if !c.history {
            log.sessions[s].live_at = Some(since(start, Instant::now()));
            if s == 0 {
                c.ready.fetch_add(1, Ordering::SeqCst);
            }
            if report_back {
                report_back = false;
                c.back.fetch_add(1, Ordering::SeqCst);
            }
        }
        let mut linger: Option<Instant> = None;
        let end = loop {
            let start = *c.start.borrow();
            let drop_at = c.drop.at;
            tokio::select! {
                biased;
                frame = ws.next() => match frame {
                    Some(Ok(Message::Text(t))) => {
                        let now = since(start, Instant::now());
                        let frame: Frame = match serde_json::from_str(&t) {
                            Ok(f) => f,
                            Err(_) => {
                                log.strange.push(t.to_string());
                                continue;
                            }
                        };
                        let first = log.sessions[s].live_at.is_none();
                        match frame.action.as_deref() {
                            Some("wshub.welcome") => {
                                if !c.history {
                                    log.protocol.push(format!("a welcome with history off: {t}"));
                                    continue;
                                }
                                if !first {
                                    log.protocol.push(format!("session {s}: a welcome that is not the first frame: {t}"));
                                    continue;
                                }
                                match parse_welcome(&frame, &t) {
                                    Ok(w) => {
                                        note_epochs(&mut log.epochs, &w.positions, || {
                                            format!("the welcome of session {s} on {} at {now:?}", node_label(node, inc))
                                        });
                                        for key in &keys {
                                            if !w.positions.contains_key(key) {
                                                log.protocol.push(format!("session {s}: the welcome names no {key}: {t}"));
                                            }
                                        }
                                        if w.recovered && Some(&w.positions) != positions.as_ref() {
                                            log.protocol.push(format!("session {s}: recovered, but the positions are not the ones sent ({positions:?}): {t}"));
                                        }
                                        if !w.recovered && w.replayed != 0 {
                                            log.protocol.push(format!("session {s}: not recovered yet replayed {}: {t}", w.replayed));
                                        }
                                        // Continue from what the hub says (the
                                        // tops when not recovered).
                                        let mut mine = Positions::new();
                                        for key in &keys {
                                            if let Some(p) = w.positions.get(key) {
                                                mine.insert(key.clone(), p.clone());
                                            }
                                        }
                                        positions = Some(mine);
                                        log.sessions[s].welcome = Some(w);
                                    }
                                    Err(e) => log.protocol.push(e),
                                }
                                log.sessions[s].live_at = Some(now);
                                if s == 0 {
                                    c.ready.fetch_add(1, Ordering::SeqCst);
                                }
                                if report_back {
                                    report_back = false;
                                    c.back.fetch_add(1, Ordering::SeqCst);
                                }
                                continue;
                            }
                            _ if c.history && first => {
                                log.protocol.push(format!("session {s}: the first frame is not a welcome: {t}"));
                                log.sessions[s].live_at = Some(now);
                            }
                            _ => {}
                        }
                        if c.history {
                            match &frame.pos {
                                Some(pos) => {
                                    note_epochs(&mut log.epochs, pos, || {
                                        format!("{:?} in session {s} on {} at {now:?}", frame.message, node_label(node, inc))
                                    });
                                    let p = positions.get_or_insert_with(Positions::new);
                                    for wrong in advance(p, &keys, pos, false) {
                                        log.protocol.push(format!("session {s}: {wrong} in {t}"));
                                    }
                                }
                                None if frame.action.as_deref() != Some("wshub.gap") => {
                                    log.protocol.push(format!("session {s}: a frame without pos: {t}"));
                                }
                                None => {}
                            }
                        } else if frame.pos.is_some() {
                            log.protocol.push(format!("pos with history off: {t}"));
                        }
                        let text = frame.message.unwrap_or_default();
                        match frame.action.as_deref() {
                            Some("c") => match text.strip_prefix('m').and_then(|n| n.parse().ok()) {
                                Some(id) => log.got.push(Got { id, at: now, session: s }),
                                None => log.strange.push(t.to_string()),
                            },
                            Some("end") => {
                                log.sentinels.insert(text);
                                let done = c.rounds.borrow().iter().any(|round| {
                                    !round.is_empty() && round.iter().all(|e| log.sentinels.contains(e))
                                });
                                if done && linger.is_none() {
                                    // Whatever is late still shows up (and is
                                    // reported as out of order, not lost).
                                    linger = Some(Instant::now() + Duration::from_millis(300));
                                }
                            }
                            Some("wshub.gap") => log.gaps.push(format!("{now:?} session {s}: {t}")),
                            _ => log.strange.push(t.to_string()),
                        }
                    }
                    Some(Ok(Message::Close(f))) => break End::Closed(f.map_or(1005, |f| u16::from(f.code))),
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => break End::Dropped,
                },
                () = async { let _ = c.progress.wait_for(|p| *p >= drop_at).await; }, if !drop_done => {
                    if c.drop.close_frame {
                        let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
                    }
                    break End::SelfDrop;
                }
                () = tokio::time::sleep_until(linger.unwrap_or(far)), if linger.is_some() => {
                    let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
                    break End::Finished;
                }
                () = tokio::time::sleep_until(c.deadline) => break End::Deadline,
            }
        };
        drop(ws);
        let start = *c.start.borrow();
        log.sessions[s].ended = Some(since(start, Instant::now()));
        log.sessions[s].end = end.clone();
        match end {
            End::Finished => {
                log.finished = true;
                break 'sessions;
            }
            End::Deadline => break 'sessions,
            End::SelfDrop => {
                drop_done = true;
                log.dropped_as_planned = true;
                report_back = true;
                let until = (Instant::now() + c.drop.lasts).min(c.deadline);
                tokio::time::sleep_until(until).await;
            }
            _ => {
                // A browser would back off a little; so does this client.
                let pause = c.rng.random_range(0..100);
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
        }
    }
    let _ = c.idx;
    log
}

// ---------------------------------------------------------------------
// The generator and the faults.
// ---------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq)]
enum Fate {
    /// 204: the hub took it.
    Accepted,
    /// The request failed after it may have reached the node: it may or
    /// may not have been published. Allowed, never required.
    Uncertain,
    /// Never taken by any node (every attempt refused).
    Refused,
}

#[derive(Debug, Clone, Copy)]
struct Sent {
    at: Duration,
    node: usize,
    inc: usize,
    /// The order in which the node accepted it (the sender's order).
    seq: u64,
    fate: Fate,
}

/// Sends the messages at their times, each through a node picked from the
/// live ones, about `1/INTERVAL` a second. One request at a time per node
/// (a lane per node, each node's lock held over its request), so what a
/// node accepted is in the order of `seq`: a node's broadcast endpoint is
/// one sender. A message whose node went away meanwhile, or refused it,
/// goes through another node.
async fn generate(
    messages: Arc<Vec<String>>,
    live: Arc<Live>,
    start: Instant,
    seed: u64,
    deadline: Instant,
    progress: Arc<watch::Sender<usize>>,
) -> (Vec<Sent>, usize) {
    let http = reqwest::Client::new();
    let locks: Arc<[tokio::sync::Mutex<u64>; 3]> = Arc::new(Default::default());
    let sent = Arc::new(Mutex::new(vec![
        Sent {
            at: Duration::ZERO,
            node: 0,
            inc: 0,
            seq: 0,
            fate: Fate::Refused,
        };
        messages.len()
    ]));
    let refusals = Arc::new(AtomicUsize::new(0));
    let mut lanes = Vec::new();
    let mut queues = Vec::new();
    for lane in 0..3 {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<usize>();
        queues.push(tx);
        let progress = progress.clone();
        let (http, live, locks, sent, refusals, messages) = (
            http.clone(),
            live.clone(),
            locks.clone(),
            sent.clone(),
            refusals.clone(),
            messages.clone(),
        );
        let mut rng = StdRng::seed_from_u64(seed ^ (0x6e6e + lane as u64));
        lanes.push(tokio::spawn(async move {
            while let Some(id) = rx.recv().await {
                let mut preferred = Some(lane);
                for _attempt in 0..200 {
                    if Instant::now() >= deadline {
                        break;
                    }
                    let target = match preferred.take() {
                        Some(n) if live.send[n].load(Ordering::SeqCst) => {
                            live.addrs.lock().unwrap()[n].map(|(a, inc)| (n, inc, a))
                        }
                        _ => None,
                    };
                    let Some((node, inc, addr)) = target.or_else(|| live.pick(&mut rng, true))
                    else {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        continue;
                    };
                    let mut counter = locks[node].lock().await;
                    let at = start.elapsed();
                    let result = http
                        .post(format!("http://{addr}{BROADCAST}"))
                        .header("content-type", "application/json")
                        .body(messages[id].clone())
                        .timeout(Duration::from_secs(3))
                        .send()
                        .await;
                    let fate = match result {
                        Ok(r) if r.status() == 204 => Fate::Accepted,
                        Ok(_) => {
                            refusals.fetch_add(1, Ordering::SeqCst);
                            drop(counter);
                            tokio::time::sleep(Duration::from_millis(5)).await;
                            continue;
                        }
                        Err(e) if e.is_connect() => {
                            drop(counter);
                            tokio::time::sleep(Duration::from_millis(5)).await;
                            continue;
                        }
                        Err(_) => Fate::Uncertain,
                    };
                    *counter += 1;
                    sent.lock().unwrap()[id] = Sent {
                        at,
                        node,
                        inc,
                        seq: *counter,
                        fate,
                    };
                    break;
                }
                progress.send_modify(|p| *p += 1);
            }
        }));
    }
    let mut rng = StdRng::seed_from_u64(seed ^ 0x6e6e);
    for id in 0..messages.len() {
        tokio::time::sleep_until(start + INTERVAL * id as u32).await;
        if Instant::now() >= deadline {
            break;
        }
        let lane = live.pick(&mut rng, true).map_or(0, |(n, _, _)| n);
        queues[lane].send(id).unwrap();
    }
    drop(queues);
    for lane in lanes {
        lane.await.unwrap();
    }
    let sent = std::mem::take(&mut *sent.lock().unwrap());
    (sent, refusals.load(Ordering::SeqCst))
}

// Printed (Debug) in the report: that is how its fields are read.
#[allow(dead_code)]
#[derive(Debug, Clone)]
enum Fault {
    PubsubKill {
        at: Duration,
        /// When the node's new subscriber connection was seen.
        back: Option<Duration>,
        killed: bool,
    },
    Sigkill {
        at: Duration,
        restarted: Duration,
    },
    Sigterm {
        at: Duration,
        exited: Option<Duration>,
        restarted: Duration,
    },
}

/// The local ports of `pid`'s TCP connections to `remote_port`.
fn ports_to(pid: u32, remote_port: u16) -> HashSet<u16> {
    let mut inodes = HashSet::new();
    if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for entry in dir.flatten() {
            if let Ok(target) = std::fs::read_link(entry.path()) {
                let target = target.to_string_lossy().into_owned();
                if let Some(n) = target
                    .strip_prefix("socket:[")
                    .and_then(|s| s.strip_suffix(']'))
                {
                    inodes.insert(n.to_owned());
                }
            }
        }
    }
    let port = |a: &str| {
        a.rsplit(':')
            .next()
            .and_then(|p| u16::from_str_radix(p, 16).ok())
    };
    let mut ports = HashSet::new();
    for table in ["tcp", "tcp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() > 9 && port(f[2]) == Some(remote_port) && inodes.contains(f[9]) {
                ports.extend(port(f[1]));
            }
        }
    }
    ports
}

/// The Redis client id of `pid`'s subscriber connection: among its
/// connections (`CLIENT LIST`, matched by port: the node names none), the
/// one in pub/sub mode with the most subscriptions.
fn subscriber_of(pid: u32, redis_port: u16) -> Option<String> {
    let mine = ports_to(pid, redis_port);
    let list = cli(redis_port, &["CLIENT", "LIST", "TYPE", "pubsub"]);
    list.lines()
        .filter_map(|line| {
            let fields: HashMap<&str, &str> = line
                .split_whitespace()
                .filter_map(|f| f.split_once('='))
                .collect();
            let port: u16 = fields.get("addr")?.rsplit(':').next()?.parse().ok()?;
            if !mine.contains(&port) {
                return None;
            }
            let subs: u64 = ["sub", "psub", "ssub"]
                .iter()
                .filter_map(|k| fields.get(k).and_then(|v| v.parse::<u64>().ok()))
                .sum();
            let id = fields.get("id")?.to_string();
            (subs > 0).then_some((subs, id))
        })
        .max()
        .map(|(_, id)| id)
}

/// When faults happen: a number of messages into the run.
#[derive(Clone)]
struct Moment {
    start: Instant,
    progress: watch::Receiver<usize>,
}

impl Moment {
    /// Waits until the generator is done with `messages` messages (or gave
    /// up); returns the time since `start`.
    async fn after(&mut self, messages: usize) -> Duration {
        let _ = self.progress.wait_for(|p| *p >= messages).await;
        self.start.elapsed()
    }
}

async fn pubsub_kills(pid: u32, redis_port: u16, mut at: Moment) -> Vec<Fault> {
    let mut faults = Vec::new();
    for messages in PUBSUB_KILLS {
        let when = at.after(messages).await;
        let outcome = tokio::task::spawn_blocking(move || {
            let Some(id) = subscriber_of(pid, redis_port) else {
                return (false, None);
            };
            let reply = cli(redis_port, &["CLIENT", "KILL", "TYPE", "pubsub", "ID", &id]);
            if reply != "1" {
                return (false, None);
            }
            // Bounded: wait for the node's next subscriber connection.
            let deadline = std::time::Instant::now() + PATIENCE;
            while std::time::Instant::now() < deadline {
                if subscriber_of(pid, redis_port).is_some_and(|new| new != id) {
                    return (true, Some(std::time::Instant::now()));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            (true, None)
        })
        .await
        .unwrap();
        let back = outcome
            .1
            .map(|t| Instant::from_std(t).saturating_duration_since(at.start));
        faults.push(Fault::PubsubKill {
            at: when,
            back,
            killed: outcome.0,
        });
    }
    faults
}

/// Stops sending through `node`, then waits for the fault's moment (and a
/// second at least, for what the node accepted to reach Redis).
async fn quiet_then(live: &Live, node: usize, at: &mut Moment, fault: usize) -> Duration {
    at.after(fault - QUIET_BEFORE_FAULT).await;
    live.send[node].store(false, Ordering::SeqCst);
    let quiet = Instant::now() + Duration::from_secs(1);
    at.after(fault).await;
    tokio::time::sleep_until(quiet).await;
    at.start.elapsed()
}

async fn sigkill_and_restart(
    mut node: NodeProcess,
    env: Vec<(String, String)>,
    live: Arc<Live>,
    mut at: Moment,
    notes: Notes,
) -> (NodeProcess, Fault) {
    const N: usize = 1;
    quiet_then(&live, N, &mut at, SIGKILL_N2).await;
    live.set(N, None);
    let when = at.start.elapsed();
    node.child.kill_group();
    drop(node);
    tokio::time::sleep(RESTART_N2_AFTER).await;
    let node = spawn_noting(&env, node_label(N, 2), notes).await;
    let restarted = at.start.elapsed();
    live.set(N, Some((node.addr, 2)));
    live.send[N].store(true, Ordering::SeqCst);
    (
        node,
        Fault::Sigkill {
            at: when,
            restarted,
        },
    )
}

async fn sigterm_and_restart(
    mut node: NodeProcess,
    env: Vec<(String, String)>,
    live: Arc<Live>,
    mut at: Moment,
    notes: Notes,
) -> (NodeProcess, Fault) {
    const N: usize = 2;
    quiet_then(&live, N, &mut at, SIGTERM_N3).await;
    // A draining node refuses new sockets: the clients' pick skips it.
    live.set(N, None);
    let when = at.start.elapsed();
    node.terminate();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut exited = None;
    while Instant::now() < deadline {
        if matches!(node.child.try_wait(), Ok(Some(_))) {
            exited = Some(at.start.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(node);
    let node = spawn_noting(&env, node_label(N, 2), notes).await;
    let restarted = at.start.elapsed();
    live.set(N, Some((node.addr, 2)));
    live.send[N].store(true, Ordering::SeqCst);
    (
        node,
        Fault::Sigterm {
            at: when,
            exited,
            restarted,
        },
    )
}

// ---------------------------------------------------------------------
// One run, and what it found.
// ---------------------------------------------------------------------

struct Run {
    history: bool,
    seed: u64,
    plan: Plan,
    sent: Vec<Sent>,
    refusals: usize,
    logs: Vec<ClientLog>,
    faults: Vec<Fault>,
    /// Nodes that were not up and ready at the end.
    down_at_end: Vec<String>,
    /// Clients whose first socket never came up.
    never_ready: usize,
    not_back: usize,
    took: Duration,
    notes: Vec<String>,
}

fn seed() -> u64 {
    std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(14)
}

async fn chaos_run(history: bool) -> Run {
    let seed = seed();
    let began = Instant::now();
    let plan = Plan::new(seed);
    let redis = RedisServer::start();
    let envs: Vec<Vec<(String, String)>> = (1..=3)
        .map(|i| node_env(&redis.url(), &format!("chaos-n{i}"), history))
        .collect();
    let notes: Notes = Arc::default();
    let n1 = spawn_noting(&envs[0], node_label(0, 1), notes.clone()).await;
    let n2 = spawn_noting(&envs[1], node_label(1, 1), notes.clone()).await;
    let n3 = spawn_noting(&envs[2], node_label(2, 1), notes.clone()).await;
    let live = Arc::new(Live {
        addrs: Mutex::new([Some((n1.addr, 1)), Some((n2.addr, 1)), Some((n3.addr, 1))]),
        send: [
            AtomicBool::new(true),
            AtomicBool::new(true),
            AtomicBool::new(true),
        ],
    });
    let (start_tx, start_rx) = watch::channel(None::<Instant>);
    let (progress_tx, progress_rx) = watch::channel(0usize);
    let progress_tx = Arc::new(progress_tx);
    let (rounds_tx, rounds_rx) = watch::channel(Vec::<Vec<String>>::new());
    let ready = Arc::new(AtomicUsize::new(0));
    let back = Arc::new(AtomicUsize::new(0));
    let deadline = Instant::now() + RUN_LIMIT;
    let mut clients = Vec::new();
    for (idx, who) in plan.clients.iter().enumerate() {
        clients.push(tokio::spawn(run_client(ClientCtx {
            idx,
            who: who.clone(),
            history,
            drop: plan.drops[idx],
            live: live.clone(),
            start: start_rx.clone(),
            progress: progress_rx.clone(),
            rounds: rounds_rx.clone(),
            ready: ready.clone(),
            back: back.clone(),
            deadline,
            rng: StdRng::seed_from_u64(seed.wrapping_mul(1_000_003).wrapping_add(idx as u64)),
        })));
    }
    // Every client is on (and welcomed) before the first message: from
    // then on each one is owed every message its identity matches.
    let patience = Instant::now() + Duration::from_secs(30);
    while ready.load(Ordering::SeqCst) < CLIENTS && Instant::now() < patience {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let never_ready = CLIENTS - ready.load(Ordering::SeqCst);
    let start = Instant::now() + Duration::from_millis(100);
    start_tx.send_replace(Some(start));

    let bodies: Arc<Vec<String>> = Arc::new(plan.messages.iter().map(|m| m.body.clone()).collect());
    let generator = tokio::spawn(generate(
        bodies,
        live.clone(),
        start,
        seed,
        deadline,
        progress_tx.clone(),
    ));
    let redis_port = redis.port;
    let n1_pid = n1.child.id();
    let at = Moment {
        start,
        progress: progress_rx.clone(),
    };
    let kills = tokio::spawn(pubsub_kills(n1_pid, redis_port, at.clone()));
    let killer = tokio::spawn(sigkill_and_restart(
        n2,
        envs[1].clone(),
        live.clone(),
        at.clone(),
        notes.clone(),
    ));
    let terminator = tokio::spawn(sigterm_and_restart(
        n3,
        envs[2].clone(),
        live.clone(),
        at,
        notes.clone(),
    ));

    let (sent, refusals) = generator.await.unwrap();
    // Releases whatever waits for a moment the generator never reached
    // (it gave up at the deadline).
    progress_tx.send_modify(|p| *p = (*p).max(MESSAGES));
    let mut faults = kills.await.unwrap();
    let (n2, f2) = killer.await.unwrap();
    let (n3, f3) = terminator.await.unwrap();
    faults.push(f2);
    faults.push(f3);

    // Everyone back from their drop, then rounds of sentinels (one through
    // each node: a node's messages keep their order, so a client that has
    // a round has everything sent before it).
    while back.load(Ordering::SeqCst) < CLIENTS && Instant::now() < deadline {
        if clients.iter().all(|c| c.is_finished()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let not_back = CLIENTS.saturating_sub(back.load(Ordering::SeqCst));
    let http = reqwest::Client::new();
    let mut round = 0;
    while !clients.iter().all(|c| c.is_finished()) && Instant::now() < deadline {
        let tags: Vec<(SocketAddr, String)> = live
            .up()
            .into_iter()
            .map(|(node, addr)| (addr, format!("e{round}-n{}", node + 1)))
            .collect();
        rounds_tx.send_modify(|r| r.push(tags.iter().map(|(_, t)| t.clone()).collect()));
        for (addr, tag) in &tags {
            let body = json!({"action": "end", "message": tag}).to_string();
            let _ = http
                .post(format!("http://{addr}{BROADCAST}"))
                .header("content-type", "application/json")
                .body(body)
                .timeout(Duration::from_secs(3))
                .send()
                .await;
        }
        round += 1;
        let next = Instant::now() + Duration::from_secs(2);
        while Instant::now() < next && !clients.iter().all(|c| c.is_finished()) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let mut logs = Vec::new();
    for c in clients {
        logs.push(c.await.unwrap());
    }

    let mut down_at_end = Vec::new();
    let mut nodes = [n1, n2, n3];
    for (i, node) in nodes.iter_mut().enumerate() {
        let exited = !matches!(node.child.try_wait(), Ok(None));
        if exited || !is_ready(&http, node.addr).await {
            down_at_end.push(format!(
                "n{} ({})",
                i + 1,
                if exited { "exited" } else { "not ready" }
            ));
        }
    }
    drop(nodes);
    drop(redis);
    Run {
        history,
        seed,
        plan,
        sent,
        refusals,
        logs,
        faults,
        down_at_end,
        never_ready,
        not_back,
        took: began.elapsed(),
        notes: std::mem::take(&mut *notes.lock().unwrap()),
    }
}

/// Where one client's deliveries stood, by the routing table.
struct Verdict {
    expected: Vec<usize>,
    missing: Vec<usize>,
    /// (id, copies) for ids received more than once.
    dup: Vec<(usize, usize)>,
    /// Received but not addressed to this client (or never accepted).
    misrouted: Vec<usize>,
    /// (earlier id, later id, sender) pairs from one sender received in
    /// the wrong order.
    disorder: Vec<(usize, usize, String)>,
    not_recovered: Vec<String>,
}

fn judge(run: &Run, client: usize) -> Verdict {
    let who = &run.plan.clients[client];
    let log = &run.logs[client];
    let mut expected = Vec::new();
    let mut allowed = HashSet::new();
    for (id, m) in run.plan.messages.iter().enumerate() {
        let Some(s) = run.sent.get(id) else { continue };
        if !m.route.reaches(who) {
            continue;
        }
        match s.fate {
            Fate::Accepted => expected.push(id),
            Fate::Uncertain => {
                allowed.insert(id);
            }
            Fate::Refused => {}
        }
    }
    let mut copies: BTreeMap<usize, usize> = BTreeMap::new();
    for g in &log.got {
        *copies.entry(g.id).or_default() += 1;
    }
    let expected_set: HashSet<usize> = expected.iter().copied().collect();
    let missing = expected
        .iter()
        .copied()
        .filter(|id| !copies.contains_key(id))
        .collect();
    let dup = copies
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(id, n)| (*id, *n))
        .collect();
    let misrouted = copies
        .keys()
        .copied()
        .filter(|id| !expected_set.contains(id) && !allowed.contains(id))
        .collect();
    // Order per sender: the generator through one node (in the order
    // that node accepted the messages).
    let mut last: HashMap<(usize, usize), (u64, usize)> = HashMap::new();
    let mut disorder = Vec::new();
    for g in &log.got {
        let Some(s) = run.sent.get(g.id) else {
            continue;
        };
        if s.fate != Fate::Accepted {
            continue;
        }
        let sender = (s.node, s.inc);
        if let Some((seq, prev)) = last.get(&sender)
            && s.seq <= *seq
        {
            disorder.push((*prev, g.id, node_label(s.node, s.inc)));
        }
        let e = last.entry(sender).or_insert((s.seq, g.id));
        if s.seq > e.0 {
            *e = (s.seq, g.id);
        }
    }
    let not_recovered = log
        .sessions
        .iter()
        .enumerate()
        .filter(|(_, s)| s.sent.is_some())
        .filter_map(|(i, s)| match &s.welcome {
            Some(w) if w.recovered => None,
            Some(w) => Some(format!(
                "session {i} on {} at {:?}: recovered false (replayed {}, node {}); sent {:?}, given {:?}",
                node_label(s.node, s.inc),
                s.opened,
                w.replayed,
                w.node,
                s.sent.as_ref().unwrap(),
                w.positions
            )),
            // Ended (by the client's own drop, a killed node) before the
            // welcome could come: no resume outcome, nothing to judge.
            None if s.ended.is_some_and(|e| e.saturating_sub(s.opened) < PATIENCE)
                && !matches!(s.end, End::Finished | End::Deadline) =>
            {
                None
            }
            None => Some(format!(
                "session {i} on {} at {:?}: no welcome ({:?})",
                node_label(s.node, s.inc),
                s.opened,
                s.end
            )),
        })
        .collect();
    Verdict {
        expected,
        missing,
        dup,
        misrouted,
        disorder,
        not_recovered,
    }
}

const FAULTS: [&str; 5] = [
    "client-drop",
    "node-sigkill",
    "node-sigterm",
    "pubsub-kill",
    "unattributed",
];

/// The windows during which `client` was exposed to each fault: offline
/// windows from its sessions (by how each ended), and the pub/sub kills of
/// node 1 while it was on node 1.
fn windows(run: &Run, client: usize) -> Vec<(&'static str, Duration, Duration)> {
    let log = &run.logs[client];
    let mut out = Vec::new();
    for (i, s) in log.sessions.iter().enumerate() {
        let Some(ended) = s.ended else { continue };
        let Some(next) = log.sessions.get(i + 1) else {
            continue;
        };
        let back = next.live_at.or(next.ended).unwrap_or(ended);
        let fault = match s.end {
            End::SelfDrop => "client-drop",
            End::Dropped => "node-sigkill",
            End::Closed(1001) => "node-sigterm",
            _ => "unattributed",
        };
        out.push((fault, ended.saturating_sub(SLACK), back + SLACK));
    }
    for f in &run.faults {
        if let Fault::PubsubKill { at, back, .. } = f {
            let until = back.unwrap_or(*at + PATIENCE) + SLACK;
            let on_n1 = log.sessions.iter().any(|s| {
                s.node == 0
                    && s.live_at.is_some_and(|l| l <= *at)
                    && s.ended.is_none_or(|e| e >= *at)
            });
            if on_n1 {
                out.push(("pubsub-kill", *at, until));
            }
        }
    }
    out
}

fn blame(windows: &[(&'static str, Duration, Duration)], at: Duration) -> &'static str {
    windows
        .iter()
        .find(|(_, from, to)| *from <= at && at <= *to)
        .map_or("unattributed", |(f, _, _)| f)
}

#[derive(Default, Clone)]
struct Row {
    sent: BTreeSet<usize>,
    at_risk: usize,
    lost: usize,
    dup: usize,
    clients: BTreeSet<usize>,
}

/// The chaos table and the failures (empty when the run kept every
/// promise that `strict` asks for).
fn report(run: &Run, strict: bool) -> (Vec<String>, Vec<String>) {
    let mode = if run.history { "on" } else { "off" };
    let mut rows: BTreeMap<&str, Row> = FAULTS.iter().map(|f| (*f, Row::default())).collect();
    let mut failures = Vec::new();
    let mut total = Row::default();
    let (mut resumes, mut recovered, mut replayed, mut gaps, mut sessions) = (0, 0, 0u64, 0, 0);
    // Resuming sockets that ended before their welcome (a drop, a kill).
    let mut unanswered = 0;
    for client in 0..CLIENTS {
        let v = judge(run, client);
        let w = windows(run, client);
        let log = &run.logs[client];
        sessions += log.sessions.len();
        gaps += log.gaps.len();
        for s in log.sessions.iter().filter(|s| s.sent.is_some()) {
            match &s.welcome {
                Some(wl) => {
                    resumes += 1;
                    if wl.recovered {
                        recovered += 1;
                        replayed += wl.replayed;
                    }
                }
                None => unanswered += 1,
            }
        }
        for &id in &v.expected {
            let at = run.sent[id].at;
            for (f, from, to) in &w {
                if *from <= at && at <= *to {
                    let row = rows.get_mut(f).unwrap();
                    row.sent.insert(id);
                    row.at_risk += 1;
                }
            }
        }
        for &id in &v.missing {
            let f = blame(&w, run.sent[id].at);
            let row = rows.get_mut(f).unwrap();
            row.lost += 1;
            row.clients.insert(client);
        }
        for &(id, n) in &v.dup {
            let f = blame(&w, run.sent[id].at);
            let row = rows.get_mut(f).unwrap();
            row.dup += n - 1;
            row.clients.insert(client);
        }
        total.at_risk += v.expected.len();
        total.lost += v.missing.len();
        total.dup += v.dup.iter().map(|(_, n)| n - 1).sum::<usize>();
        if !v.missing.is_empty() || !v.dup.is_empty() {
            total.clients.insert(client);
        }

        let mut problems = Vec::new();
        if !log.finished {
            problems.push(format!(
                "never received a whole round of end sentinels (has {:?})",
                log.sentinels
            ));
        }
        if !log.dropped_as_planned || log.sessions.len() < 2 {
            problems.push(format!(
                "did not drop and reconnect ({} sessions)",
                log.sessions.len()
            ));
        }
        if !v.misrouted.is_empty() {
            problems.push(format!(
                "received {} message(s) not addressed to it, first {:?}",
                v.misrouted.len(),
                describe_ids(run, &v.misrouted, &w)
            ));
        }
        if !log.strange.is_empty() {
            problems.push(format!("strange frames: {:?}", first(&log.strange, 3)));
        }
        if strict {
            if !v.missing.is_empty() {
                problems.push(format!(
                    "lost {} of {} (first: {})",
                    v.missing.len(),
                    v.expected.len(),
                    describe_ids(run, &v.missing, &w).join(", ")
                ));
            }
            if !v.dup.is_empty() {
                let copies: Vec<String> = v
                    .dup
                    .iter()
                    .take(5)
                    .map(|(id, _)| {
                        let when: Vec<String> = log
                            .got
                            .iter()
                            .filter(|g| g.id == *id)
                            .map(|g| {
                                let on = &log.sessions[g.session];
                                format!(
                                    "session {} on {} at {:?}",
                                    g.session,
                                    node_label(on.node, on.inc),
                                    g.at
                                )
                            })
                            .collect();
                        format!(
                            "{} received {}",
                            describe_ids(run, &[*id], &w)[0],
                            when.join(", ")
                        )
                    })
                    .collect();
                problems.push(format!("{} duplicated, first: {copies:?}", v.dup.len()));
            }
            if !v.disorder.is_empty() {
                let arrived = |id: usize| {
                    log.got
                        .iter()
                        .filter(|g| g.id == id)
                        .map(|g| {
                            let on = &log.sessions[g.session];
                            format!(
                                "session {} on {} at {:?}",
                                g.session,
                                node_label(on.node, on.inc),
                                g.at
                            )
                        })
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                let pairs: Vec<String> = v
                    .disorder
                    .iter()
                    .take(3)
                    .map(|(before, after, sender)| {
                        format!(
                            "from {sender}: {} (received {}) before {} (received {})",
                            describe_ids(run, &[*before], &w)[0],
                            arrived(*before),
                            describe_ids(run, &[*after], &w)[0],
                            arrived(*after)
                        )
                    })
                    .collect();
                problems.push(format!(
                    "{} out of order, first: {pairs:?}",
                    v.disorder.len()
                ));
            }
            if !v.not_recovered.is_empty() {
                problems.push(format!("resumes not recovered: {:?}", v.not_recovered));
            }
            if !log.gaps.is_empty() {
                problems.push(format!(
                    "gap notices while connected: {:?}",
                    first(&log.gaps, 3)
                ));
            }
        }
        if !log.protocol.is_empty() {
            problems.push(format!(
                "{} wire-contract breaches, first: {:?}",
                log.protocol.len(),
                first(&log.protocol, 3)
            ));
        }
        if !problems.is_empty() {
            let who = &run.plan.clients[client];
            let mut text = format!("client {client} ({}):", who.describe());
            for p in problems {
                let _ = write!(text, "\n    - {p}");
            }
            let _ = write!(text, "\n    sessions: {}", describe_sessions(log));
            failures.push(text);
        }
    }
    // Redis is never restarted here: every topic keeps one epoch for the
    // whole run, whoever hears of it.
    if run.history {
        let mut epochs: BTreeMap<&String, BTreeMap<&String, (usize, &String)>> = BTreeMap::new();
        for (client, log) in run.logs.iter().enumerate() {
            for (key, seen) in &log.epochs {
                for (epoch, context) in seen {
                    epochs
                        .entry(key)
                        .or_default()
                        .entry(epoch)
                        .or_insert((client, context));
                }
            }
        }
        for (key, seen) in epochs.iter().filter(|(_, seen)| seen.len() > 1) {
            let how: Vec<String> = seen
                .iter()
                .map(|(epoch, (client, context))| {
                    format!("{epoch:?} (first by client {client}: {context})")
                })
                .collect();
            failures.push(format!(
                "topic {key} had {} epochs in one run: {}",
                seen.len(),
                how.join("; ")
            ));
        }
    }
    let accepted: BTreeSet<usize> = (0..run.sent.len())
        .filter(|&i| run.sent[i].fate == Fate::Accepted)
        .collect();
    let uncertain = run
        .sent
        .iter()
        .filter(|s| s.fate == Fate::Uncertain)
        .count();
    let never = run.sent.iter().filter(|s| s.fate == Fate::Refused).count();
    let mut table = Vec::new();
    for (fault, row) in &rows {
        table.push(format!(
            "CHAOS history={mode} fault={fault} sent={} at_risk={} lost={} dup={} clients={}",
            row.sent.len(),
            row.at_risk,
            row.lost,
            row.dup,
            row.clients.len()
        ));
    }
    table.push(format!(
        "CHAOS history={mode} fault=total sent={} at_risk={} lost={} dup={} clients={}",
        accepted.len(),
        total.at_risk,
        total.lost,
        total.dup,
        total.clients.len()
    ));
    let mut kinds: BTreeMap<Kind, usize> = BTreeMap::new();
    for m in &run.plan.messages {
        *kinds.entry(m.kind).or_default() += 1;
    }
    let last_sent = run.sent.iter().map(|s| s.at).max().unwrap_or_default();
    table.push(format!(
        "CHAOS history={mode} seed={} clients={CLIENTS} messages={} (uncertain {uncertain}, never accepted {never}, refusals {}) sent in {last_sent:?}; kinds {kinds:?}; sessions={sessions} resumes={resumes} recovered={recovered} replayed={replayed} cut_before_welcome={unanswered} gap_notices={gaps}; run took {:?}",
        run.seed,
        run.sent.len(),
        run.refusals,
        run.took
    ));
    for f in &run.faults {
        table.push(format!("CHAOS history={mode} event {f:?}"));
    }
    if !run.down_at_end.is_empty() {
        failures.insert(0, format!("nodes not up at the end: {:?}", run.down_at_end));
    }
    if run.never_ready > 0 {
        failures.insert(
            0,
            format!(
                "{} clients never got their first socket up",
                run.never_ready
            ),
        );
    }
    if run.not_back > 0 {
        failures.insert(
            0,
            format!(
                "{} clients were not back from their planned drop",
                run.not_back
            ),
        );
    }
    for f in &run.faults {
        match f {
            Fault::PubsubKill {
                killed: false, at, ..
            } => {
                failures.insert(
                    0,
                    format!("the pub/sub kill at {at:?} found no subscriber of node 1"),
                );
            }
            Fault::Sigterm { exited: None, .. } => {
                failures.insert(0, "node 3 did not exit after SIGTERM".to_owned());
            }
            _ => {}
        }
    }
    if accepted.len() < MESSAGES * 99 / 100 {
        failures.insert(
            0,
            format!(
                "only {} of {MESSAGES} messages were accepted",
                accepted.len()
            ),
        );
    }
    (table, failures)
}

fn first<T: Clone>(items: &[T], n: usize) -> Vec<T> {
    items.iter().take(n).cloned().collect()
}

/// Each message: its kind, the node it went through, when, and the fault
/// the client was exposed to then.
fn describe_ids(
    run: &Run,
    ids: &[usize],
    windows: &[(&'static str, Duration, Duration)],
) -> Vec<String> {
    ids.iter()
        .take(8)
        .map(|&id| {
            let s = run.sent[id];
            format!(
                "m{id} ({:?}, via {} at {:?}, {})",
                run.plan.messages[id].kind,
                node_label(s.node, s.inc),
                s.at,
                blame(windows, s.at)
            )
        })
        .collect()
}

fn describe_sessions(log: &ClientLog) -> String {
    log.sessions
        .iter()
        .map(|s| {
            let welcome = s.welcome.as_ref().map_or(String::new(), |w| {
                format!(" recovered={} replayed={}", w.recovered, w.replayed)
            });
            format!(
                "[{} {:?}..{:?} {:?}{welcome}]",
                node_label(s.node, s.inc),
                s.opened,
                s.ended.unwrap_or_default(),
                s.end
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn print_and_check(run: &Run, strict: bool) {
    let (table, failures) = report(run, strict);
    for line in &table {
        eprintln!("{line}");
    }
    if !failures.is_empty() {
        // What the nodes said, the resume decisions first.
        let (why, other): (Vec<&String>, Vec<&String>) =
            run.notes.iter().partition(|n| n.contains("not recovered"));
        for note in why.iter().take(20).chain(other.iter().take(20)) {
            eprintln!("NODE {note}");
        }
        let shown: Vec<&String> = failures.iter().take(15).collect();
        panic!(
            "{} problem(s) (seed {}; showing {}):\n{}\n{}",
            failures.len(),
            run.seed,
            shown.len(),
            shown
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join("\n"),
            table.join("\n")
        );
    }
}

/// A whole run within a hard limit (every wait inside is bounded too).
async fn bounded_run(history: bool) -> Run {
    // One chaos run at a time, and none beside a timing test (common).
    let _turn = crate::common::TIMING_CRITICAL.lock().await;
    tokio::time::timeout(RUN_LIMIT + Duration::from_secs(60), chaos_run(history))
        .await
        .expect("the chaos run overran its hard limit")
}

/// Issue 14, "The proof": history on, resume-speaking clients, every fault
/// at once. Every client gets exactly the messages the routing table gives
/// its identity (sent while it was on or off), each once, in order per
/// sender, every resume recovered, no gap notice, and the wire contract
/// (welcome first, `pos` on every frame, growing offsets) kept throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_with_history_every_client_gets_its_set_once_in_order() {
    let run = bounded_run(true).await;
    print_and_check(&run, true);
}

/// The same run with history off and clients that do not speak resume
/// (today's behaviour): nothing is asserted about loss, it is counted for
/// the chaos table; the hub must stay up, every client must get back on
/// after each drop, nobody may receive a message not addressed to it, and
/// no frame may carry anything of the resume protocol.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_without_history_reports_what_is_lost() {
    let run = bounded_run(false).await;
    print_and_check(&run, false);
}

// ---------------------------------------------------------------------
// Faults that history cannot survive, said honestly; the drain handoff.
// ---------------------------------------------------------------------

async fn two_history_nodes(redis: &RedisServer, name: &str) -> (NodeProcess, NodeProcess) {
    let a = spawn_node(&node_env(&redis.url(), &format!("{name}-1"), true)).await;
    let b = spawn_node(&node_env(&redis.url(), &format!("{name}-2"), true)).await;
    (a, b)
}

/// Waits until everything pushed through `node` so far is in Redis: a
/// marker pushed after it through the same node (one sender: its order is
/// kept) has reached `observer`, a legacy socket in the group `sync`. A
/// 204 only means the node took a message; a socket that resumes must not
/// race the messages meant to be "before" it.
async fn settle(http: &reqwest::Client, node: SocketAddr, observer: &mut Client, tag: &str) {
    push(http, node, &to_group("sync", tag)).await;
    // What else it got (messages to everyone) does not matter here.
    frames_until(observer, tag).await;
}

/// Redis restarts empty (no persistence): the history a resume would need
/// is gone, so the resume says `recovered: false` (replaying 0) and the
/// messages it missed never show up, late or twice. A socket that stayed
/// open gets every message once; and resumes that need only history made
/// after the restart are recovered again.
#[tokio::test]
async fn redis_restarted_without_persistence_resumes_say_not_recovered() {
    let mut redis = RedisServer::start();
    let (n1, n2) = two_history_nodes(&redis, "nopersist").await;
    let http = reqwest::Client::new();
    let ann = Who::new("ann", Some("chat"));
    let bob = Who::new("bob", Some("chat"));
    let (mut a, _) = ResumeClient::open(n1.addr, &ann, None).await;
    let (mut b, _) = ResumeClient::open(n2.addr, &bob, None).await;
    let mut observer = Client::connect(n1.addr, &Who::new("obs", Some("sync")).path(None)).await;

    push(&http, n2.addr, &to_group("chat", "m1")).await;
    push(&http, n2.addr, &to_user("ann", "m2")).await;
    push(&http, n2.addr, &to_all("m3")).await;
    push(&http, n2.addr, &to_all("s1")).await;
    assert_eq!(a.until("s1").await, ["m1", "m2", "m3"]);
    assert_eq!(b.until("s1").await, ["m1", "m3"]);

    // Ann goes away and misses m4 and m5; then Redis loses everything.
    let ann_at = a.vanish();
    push(&http, n2.addr, &to_group("chat", "m4")).await;
    push(&http, n2.addr, &to_user("ann", "m5")).await;
    push(&http, n2.addr, &to_all("s2")).await;
    assert_eq!(b.until("s2").await, ["m4"]);
    redis.restart();
    b.epoch_may_change = true;
    wait_ready(&http, n1.addr, "node 1 after the Redis restart").await;
    wait_ready(&http, n2.addr, "node 2 after the Redis restart").await;

    push(&http, n1.addr, &to_group("chat", "m6")).await;
    settle(&http, n1.addr, &mut observer, "x1").await;
    let (mut a, welcome) = ResumeClient::open(n2.addr, &ann, Some(&ann_at)).await;
    assert!(
        !welcome.recovered,
        "the history ann's resume needs died with Redis, yet: {welcome:?}"
    );
    assert_eq!(welcome.replayed, 0);
    a.epoch_may_change = true;
    push(&http, n1.addr, &to_group("chat", "m7")).await;
    push(&http, n1.addr, &to_user("ann", "m8")).await;
    push(&http, n1.addr, &to_user("bob", "m9")).await;
    push(&http, n1.addr, &to_all("s3")).await;
    // Nothing from before her resume: not m4, m5 (lost, and said so), not
    // m6 (before the tops she was given), nothing twice.
    assert_eq!(a.until("s3").await, ["m7", "m8"]);
    // Bob stayed: every message once, nothing replayed again.
    assert_eq!(b.until("s3").await, ["m6", "m7", "m9"]);

    // Positions from after the restart recover again, for both.
    let ann_at = a.vanish();
    let bob_at = b.vanish();
    push(&http, n1.addr, &to_group("chat", "m10")).await;
    push(&http, n1.addr, &to_user("ann", "m11")).await;
    push(&http, n1.addr, &to_user("bob", "m12")).await;
    settle(&http, n1.addr, &mut observer, "x2").await;
    let (mut a, welcome) = ResumeClient::open(n1.addr, &ann, Some(&ann_at)).await;
    assert!(welcome.recovered, "ann, after the restart: {welcome:?}");
    assert_eq!(welcome.replayed, 2, "{welcome:?}");
    let (mut b, welcome) = ResumeClient::open(n2.addr, &bob, Some(&bob_at)).await;
    assert!(welcome.recovered, "bob, after the restart: {welcome:?}");
    assert_eq!(welcome.replayed, 2, "{welcome:?}");
    push(&http, n2.addr, &to_all("s4")).await;
    assert_eq!(a.until("s4").await, ["m10", "m11"]);
    assert_eq!(b.until("s4").await, ["m10", "m12"]);
    drop((n1, n2));
}

/// Redis restarts empty while a resume-speaking socket stays open on
/// topics nobody publishes to: each of its topics' history starts afresh
/// when its node catches up, and the gap notice names the new epoch's
/// position, so that the socket's next resume is recovered even though no
/// message came through those topics since (review of 2026-12-02: its old
/// positions named an epoch Redis no longer had, and every resume of a
/// quiet topic said `recovered: false` until a message reached it).
#[tokio::test]
async fn after_redis_restarts_empty_a_quiet_topics_gap_notice_lets_the_next_resume_recover() {
    let mut redis = RedisServer::start();
    let (n1, n2) = two_history_nodes(&redis, "quiet").await;
    let http = reqwest::Client::new();
    let ann = Who::new("ann", Some("chat"));
    let (mut a, _) = ResumeClient::open(n1.addr, &ann, None).await;
    let mut observer = Client::connect(n2.addr, &Who::new("obs", Some("sync")).path(None)).await;
    push(&http, n2.addr, &to_group("chat", "m1")).await;
    assert_eq!(a.until("m1").await, Vec::<String>::new());
    let before = a.positions.clone();

    redis.restart();
    a.epoch_may_change = true;
    wait_ready(&http, n1.addr, "node 1 after the Redis restart").await;
    wait_ready(&http, n2.addr, "node 2 after the Redis restart").await;
    // Nothing is published: every one of ann's topics is told, with where
    // it goes on from.
    a.until_gaps(3).await;
    for key in ann.keys() {
        let (old, new) = (&before[&key], &a.positions[&key]);
        assert_ne!(
            split_position(old).unwrap().0,
            split_position(new).unwrap().0,
            "{key}: the gap notice gave no new epoch's position: {:?}",
            a.gaps
        );
    }

    // Ann goes away; a message to her group meanwhile.
    let ann_at = a.vanish();
    push(&http, n2.addr, &to_group("chat", "m2")).await;
    settle(&http, n2.addr, &mut observer, "x1").await;
    let (mut a, welcome) = ResumeClient::open(n2.addr, &ann, Some(&ann_at)).await;
    assert!(
        welcome.recovered,
        "positions from the gap notices, yet: {welcome:?}"
    );
    assert_eq!(welcome.replayed, 1, "{welcome:?}");
    push(&http, n1.addr, &to_all("s1")).await;
    assert_eq!(a.until("s1").await, ["m2"]);
    drop((n1, n2));
}

/// Redis comes back from an older snapshot: the topics' offsets are
/// handed out again for different messages. A client whose position was
/// taken after the snapshot must hear `recovered: false`, never a replay of
/// the wrong messages or a "nothing missed" that skips the new ones.
#[tokio::test]
async fn history_restored_from_an_older_snapshot_is_not_recovered() {
    let mut redis = RedisServer::start();
    let (n1, n2) = two_history_nodes(&redis, "snapshot").await;
    let http = reqwest::Client::new();
    let ann = Who::new("ann", Some("chat"));
    let (mut a, _) = ResumeClient::open(n1.addr, &ann, None).await;
    let mut observer = Client::connect(n2.addr, &Who::new("obs", Some("sync")).path(None)).await;
    for i in 1..=3 {
        push(&http, n2.addr, &to_group("chat", &format!("m{i}"))).await;
    }
    push(&http, n2.addr, &to_all("s1")).await;
    assert_eq!(a.until("s1").await, ["m1", "m2", "m3"]);
    assert_eq!(cli(redis.port, &["SET", "snapshot-marker", "old"]), "OK");
    assert_eq!(cli(redis.port, &["SAVE"]), "OK");

    // Past the snapshot in every one of ann's topics.
    for i in 4..=6 {
        push(&http, n2.addr, &to_group("chat", &format!("m{i}"))).await;
    }
    push(&http, n2.addr, &to_user("ann", "m7")).await;
    push(&http, n2.addr, &to_all("s2")).await;
    assert_eq!(a.until("s2").await, ["m4", "m5", "m6", "m7"]);
    let ann_at = a.vanish();

    // SIGKILL (nothing saved on the way down), then back from the RDB.
    redis.restart();
    assert_eq!(
        cli(redis.port, &["GET", "snapshot-marker"]),
        "old",
        "Redis did not load the snapshot"
    );
    wait_ready(&http, n1.addr, "node 1 after the restore").await;
    wait_ready(&http, n2.addr, "node 2 after the restore").await;
    // As many messages again in each topic: every offset ann holds now
    // names a different message.
    for i in 8..=10 {
        push(&http, n2.addr, &to_group("chat", &format!("m{i}"))).await;
    }
    push(&http, n2.addr, &to_user("ann", "m11")).await;
    push(&http, n2.addr, &to_all("s3")).await;
    settle(&http, n2.addr, &mut observer, "x1").await;

    let (mut a, welcome) = ResumeClient::open(n1.addr, &ann, Some(&ann_at)).await;
    assert!(
        !welcome.recovered,
        "a position from after the snapshot was taken as recovered: {welcome:?}"
    );
    assert_eq!(welcome.replayed, 0);
    a.epoch_may_change = true;
    push(&http, n2.addr, &to_group("chat", "m12")).await;
    push(&http, n2.addr, &to_all("s4")).await;
    assert_eq!(
        a.until("s4").await,
        ["m12"],
        "nothing from before the resume"
    );
    drop((n1, n2));
}

/// A legacy client (no `resume` parameter, the unmodified Web Connection
/// library) on a node that is SIGTERMed during a stream of messages: its
/// next socket, on another node with the same identity, is replayed what
/// it missed (drain handoff). Across both sockets it receives every
/// message addressed to it once, in order, with nothing of the resume
/// protocol on the wire.
#[tokio::test]
async fn legacy_client_across_sigterm_gets_what_it_missed_on_its_next_socket() {
    const N: usize = 300;
    let redis = RedisServer::start();
    let (draining, other) = two_history_nodes(&redis, "handoff").await;
    let who = Who::new("leg", Some("lg"));
    let mut first = Client::connect(draining.addr, &who.path(None)).await;
    // A bystander in the same group, on the other node, sees the stream
    // whole: the check that every message really went out.
    let mut bystander = Client::connect(other.addr, &Who::new("by", Some("lg")).path(None)).await;

    let target = other.addr;
    let publisher = tokio::spawn(async move {
        let http = reqwest::Client::new();
        for i in 0..N {
            let text = format!("h{i}");
            let body = match i % 3 {
                0 => to_group("lg", &text),
                1 => to_user("leg", &text),
                _ => to_all(&text),
            };
            push(&http, target, &body).await;
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
        push(&http, target, &to_all("done")).await;
    });

    let texts = |frames: &[Value]| -> Vec<String> {
        frames
            .iter()
            .map(|f| f["message"].as_str().unwrap_or_default().to_owned())
            .collect()
    };
    let mut before = Vec::new();
    while before.len() < 50 {
        before.push(first.recv().await);
    }
    draining.terminate();
    let end = loop {
        match tokio::time::timeout(PATIENCE, first.ws.next())
            .await
            .expect("no close after SIGTERM")
        {
            Some(Ok(Message::Text(t))) => before.push(serde_json::from_str(&t).unwrap()),
            Some(Ok(Message::Close(f))) => {
                break Ended::Closed(f.map_or(1005, |f| u16::from(f.code)), String::new());
            }
            Some(Ok(_)) => {}
            Some(Err(_)) | None => break Ended::Dropped,
        }
    };
    assert_eq!(
        end,
        Ended::Closed(1001, String::new()),
        "a drain closes with 1001"
    );
    // Messages go on while the page is away.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut second = Client::connect(other.addr, &who.path(None)).await;
    publisher.await.unwrap();
    let after = frames_until(&mut second, "done").await;

    let all: Vec<Value> = before.iter().chain(after.iter()).cloned().collect();
    for f in &all {
        assert!(f.get("pos").is_none(), "pos on a legacy socket: {f}");
        assert_ne!(
            f["action"], "wshub.welcome",
            "a welcome on a legacy socket: {f}"
        );
    }
    let want: Vec<String> = (0..N).map(|i| format!("h{i}")).collect();
    if let Err(why) = same_stream(&texts(&all), &want) {
        panic!(
            "the legacy client across the SIGTERM ({} frames on its first socket, {} on its second): {why}",
            before.len(),
            after.len()
        );
    }
    let seen = texts(&frames_until(&mut bystander, "done").await);
    let theirs: Vec<String> = (0..N)
        .filter(|i| i % 3 != 1)
        .map(|i| format!("h{i}"))
        .collect();
    if let Err(why) = same_stream(&seen, &theirs) {
        panic!("the bystander on the other node: {why}");
    }
    drop((draining, other));
}

/// `Ok` when `got` is `want` exactly; otherwise what is missing,
/// duplicated or out of order, briefly.
fn same_stream(got: &[String], want: &[String]) -> Result<(), String> {
    if got == want {
        return Ok(());
    }
    let have: HashSet<&String> = got.iter().collect();
    let wanted: HashSet<&String> = want.iter().collect();
    let missing: Vec<&String> = want.iter().filter(|w| !have.contains(w)).collect();
    let extra: Vec<&String> = got.iter().filter(|g| !wanted.contains(g)).collect();
    let mut counts: HashMap<&String, usize> = HashMap::new();
    for g in got {
        *counts.entry(g).or_default() += 1;
    }
    let dup: Vec<&String> = want
        .iter()
        .filter(|w| counts.get(w).is_some_and(|n| *n > 1))
        .collect();
    // Order: each received message after the one received before it, by
    // its place in `want`.
    let place: HashMap<&String, usize> = want.iter().enumerate().map(|(i, w)| (w, i)).collect();
    let places: Vec<usize> = got.iter().filter_map(|g| place.get(g).copied()).collect();
    let disorder = places.windows(2).filter(|w| w[1] <= w[0]).count();
    Err(format!(
        "{} received, {} wanted; missing {} (first {:?}); duplicated {} (first {:?}); unexpected {:?}; {disorder} out of order",
        got.len(),
        want.len(),
        missing.len(),
        first_refs(&missing, 10),
        dup.len(),
        first_refs(&dup, 10),
        first_refs(&extra, 10),
    ))
}

/// Every frame before the one whose `message` is `tag`.
async fn frames_until(client: &mut Client, tag: &str) -> Vec<Value> {
    let mut seen = Vec::new();
    loop {
        let frame = client.recv().await;
        if frame["message"] == tag {
            return seen;
        }
        seen.push(frame);
    }
}

fn first_refs<'a>(items: &[&'a String], n: usize) -> Vec<&'a String> {
    items.iter().take(n).copied().collect()
}

#[test]
fn the_plan_is_deterministic_and_mixes_every_kind() {
    let a = Plan::new(14);
    let b = Plan::new(14);
    assert_eq!(a.clients, b.clients);
    let bodies = |p: &Plan| {
        p.messages
            .iter()
            .map(|m| m.body.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(bodies(&a), bodies(&b));
    let kinds: BTreeSet<Kind> = a.messages.iter().map(|m| m.kind).collect();
    assert_eq!(kinds.len(), 6, "{kinds:?}");
    let mut per_user: BTreeMap<&str, usize> = BTreeMap::new();
    for c in &a.clients {
        *per_user.entry(&c.user).or_default() += 1;
    }
    assert!(per_user.values().all(|n| (2..=3).contains(n)));
    let groups: BTreeSet<&Option<String>> = a.clients.iter().map(|c| &c.group).collect();
    assert!(
        groups.len() > 25 && groups.contains(&None),
        "{}",
        groups.len()
    );
    // The routing table's corners, as the expectation reads them.
    let ann = Who::new("ann", Some("g"));
    let nobody = Who::new("x", None);
    let r = |g: &[Option<&str>], u: &[&str], x: &[&str]| Route {
        groups: g.iter().map(|g| g.map(str::to_owned)).collect(),
        users: u.iter().map(|s| s.to_string()).collect(),
        excluded: x.iter().map(|s| s.to_string()).collect(),
    };
    assert!(r(&[], &[], &[]).reaches(&ann));
    assert!(!r(&[], &[], &["ann"]).reaches(&ann));
    assert!(r(&[Some("g")], &[], &[]).reaches(&ann));
    assert!(!r(&[Some("g")], &[], &["ann"]).reaches(&ann));
    assert!(r(&[Some("h")], &["ann"], &[]).reaches(&ann));
    assert!(r(&[None], &[], &[]).reaches(&nobody));
    assert!(!r(&[None], &[], &[]).reaches(&ann));
    assert!(!r(&[Some("")], &[], &[]).reaches(&nobody));
}
