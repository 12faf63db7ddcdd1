//! Issue 15, first bullet: the node registry and `GET /api/nodes`, over real
//! nodes (in-process servers and `wshub` processes) and a real
//! `redis-server` (missing: the test fails, see `common::redis`). Leases are
//! short here so that expiry is quick to watch.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::time::Instant;
use wshub::bus::wire;

use crate::common::binary::Binary;
use crate::common::node::NodeProcess;
use crate::common::redis::{RedisCluster, RedisServer, cli};
use crate::common::{Client, PATIENCE, TestServer, test_config};

const HEARTBEAT: Duration = Duration::from_millis(100);
const LEASE: Duration = Duration::from_millis(1500);

fn short_leases(config: &mut wshub::Config) {
    config.presence.heartbeat = HEARTBEAT;
    config.presence.lease = LEASE;
}

use crate::common::within;

/// `GET /api/nodes` at `addr`: the status and the body.
async fn api_nodes(addr: SocketAddr) -> (u16, Value) {
    let response = reqwest::get(format!("http://{addr}/api/nodes"))
        .await
        .expect("GET /api/nodes");
    let status = response.status().as_u16();
    let body = serde_json::from_str(&response.text().await.unwrap()).expect("a JSON body");
    (status, body)
}

/// The node list at `addr` as id → (connections, ready); panics unless 200.
async fn listed(addr: SocketAddr) -> BTreeMap<String, (u64, bool)> {
    let (status, body) = api_nodes(addr).await;
    assert_eq!(status, 200, "{body}");
    body["nodes"]
        .as_array()
        .expect("a nodes array")
        .iter()
        .map(|n| {
            (
                n["id"].as_str().unwrap().to_owned(),
                (
                    n["connections"].as_u64().unwrap(),
                    n["ready"].as_bool().unwrap(),
                ),
            )
        })
        .collect()
}

fn expect(entries: &[(&str, u64)]) -> BTreeMap<String, (u64, bool)> {
    entries
        .iter()
        .map(|(id, n)| (id.to_string(), (*n, true)))
        .collect()
}

#[tokio::test]
async fn three_nodes_list_each_other_with_their_connection_counts() {
    let redis = RedisServer::start();
    let mut nodes = Vec::new();
    for id in ["reg-a", "reg-b", "reg-c"] {
        nodes.push(
            TestServer::on_redis(&redis.url(), |c| {
                short_leases(c);
                c.node_id = id.into();
            })
            .await,
        );
    }
    let a1 = nodes[0].connect("ann", Some("g")).await;
    let _a2 = nodes[0].connect("bob", None).await;
    let _b1 = nodes[1].connect("cid", Some("g")).await;
    let want = expect(&[("reg-a", 2), ("reg-b", 1), ("reg-c", 0)]);
    for node in &nodes {
        within(
            "every node lists all three with their sockets",
            PATIENCE,
            || async { listed(node.addr).await == want },
        )
        .await;
    }
    // The answer's shape is the contract's, and nothing else.
    let (_, body) = api_nodes(nodes[2].addr).await;
    let first = &body["nodes"][0];
    let keys: Vec<&String> = first.as_object().unwrap().keys().collect();
    assert_eq!(keys, ["connections", "id", "ready", "started", "version"]);
    assert_eq!(first["id"], "reg-a", "sorted by id: {body}");
    assert_eq!(first["version"], env!("CARGO_PKG_VERSION"));
    let started = first["started"].as_u64().unwrap();
    assert!(started > 0 && started <= wire::now_ms(), "{body}");
    // A closed socket shows within a heartbeat or so.
    a1.close().await;
    let want = expect(&[("reg-a", 1), ("reg-b", 1), ("reg-c", 0)]);
    for node in &nodes {
        within("the closed socket is counted out", PATIENCE, || async {
            listed(node.addr).await == want
        })
        .await;
    }
    for node in &nodes {
        assert_eq!(node.metric("wshub_registry_nodes"), 3.0);
        assert_eq!(node.metric("wshub_registry_heartbeat_failures_total"), 0.0);
    }
}

/// A `wshub` process on `redis` with short heartbeats and the given lease,
/// holding one socket.
async fn process_on(redis: &RedisServer, id: &str, lease_ms: &str) -> NodeProcess {
    let url = redis.url();
    NodeProcess::spawn(&[
        ("WSHUB_REDIS__URL", url.as_str()),
        ("WSHUB_NODE_ID", id),
        ("WSHUB_PRESENCE__HEARTBEAT_MS", "100"),
        ("WSHUB_PRESENCE__LEASE_MS", lease_ms),
        ("WSHUB_SHUTDOWN__DRAIN_WINDOW_MS", "100"),
    ])
    .await
}

#[tokio::test]
async fn a_stopped_node_leaves_the_list_at_once() {
    let redis = RedisServer::start();
    let observer = TestServer::on_redis(&redis.url(), short_leases).await;
    // A lease far longer than the test waits: leaving must not be expiry.
    let mut node = process_on(&redis, "reg-term", "60000").await;
    let mut socket = crate::common::Client::connect(node.addr, "/ws?userid=u").await;
    within("the process is listed", PATIENCE, || async {
        listed(observer.addr).await.contains_key("reg-term")
    })
    .await;
    node.terminate();
    assert!(matches!(
        socket.ended().await,
        crate::common::Ended::Closed(1001, _)
    ));
    let deadline = Instant::now() + PATIENCE;
    while node.child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the node did not exit");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Exited: its entry went with it, one read later, not a lease later.
    let nodes = listed(observer.addr).await;
    assert!(!nodes.contains_key("reg-term"), "still listed: {nodes:?}");
    assert_eq!(nodes.len(), 1, "{nodes:?}");
}

#[tokio::test]
async fn a_killed_node_is_gone_within_its_lease_and_its_leftovers_removed() {
    let _turn = crate::common::TIMING_CRITICAL.lock().await;
    let redis = RedisServer::start();
    let observer = TestServer::on_redis(&redis.url(), short_leases).await;
    let lease_ms = LEASE.as_millis().to_string();
    let mut node = process_on(&redis, "reg-kill", &lease_ms).await;
    within("the process is listed", PATIENCE, || async {
        listed(observer.addr).await.contains_key("reg-kill")
    })
    .await;
    node.child.kill_group();
    let took = within(
        "the killed node drops out",
        LEASE + Duration::from_secs(1),
        || async { !listed(observer.addr).await.contains_key("reg-kill") },
    )
    .await;
    assert!(took <= LEASE + Duration::from_secs(1), "{took:?}");
    // Its member is removed by a live node's heartbeat, its hash expires.
    within("the leftovers are removed", PATIENCE, || async {
        let members = cli(redis.port, &["ZRANGE", "{wshub:registry}:nodes", "0", "-1"]);
        let hashes = cli(redis.port, &["KEYS", "{wshub:registry}:node:*"]);
        !members.contains("reg-kill") && !hashes.contains("reg-kill")
    })
    .await;
    // The set itself expires with the longest lease in it: once the last
    // node is gone, nothing is left.
    let ttl: u64 = cli(redis.port, &["PTTL", "{wshub:registry}:nodes"])
        .parse()
        .unwrap();
    assert!(ttl > 0 && ttl <= LEASE.as_millis() as u64, "{ttl}");
}

#[tokio::test]
async fn a_restarted_redis_is_filled_again_within_a_heartbeat() {
    let _turn = crate::common::TIMING_CRITICAL.lock().await;
    let mut redis = RedisServer::start();
    let heartbeat = Duration::from_millis(300);
    let tweak = |c: &mut wshub::Config| {
        c.presence.heartbeat = heartbeat;
        c.presence.lease = Duration::from_secs(10);
    };
    let a = TestServer::on_redis(&redis.url(), tweak).await;
    let b = TestServer::on_redis(&redis.url(), tweak).await;
    let both = [&a.node.config.node_id, &b.node.config.node_id];
    within("both listed", PATIENCE, || async {
        listed(a.addr).await.len() == 2
    })
    .await;
    // Restarted empty (no persistence); timed from when it answers again.
    redis.restart();
    let took = within(
        "both are back in the registry",
        heartbeat + Duration::from_secs(1),
        || async {
            let members = cli(redis.port, &["ZRANGE", "{wshub:registry}:nodes", "0", "-1"]);
            both.iter().all(|id| members.contains(id.as_str()))
        },
    )
    .await;
    assert!(took <= heartbeat + Duration::from_secs(1), "{took:?}");
    // And the API answers with both again (its connection is new too).
    within("the API answers with both", PATIENCE, || async {
        let (status, body) = api_nodes(b.addr).await;
        status == 200 && body["nodes"].as_array().unwrap().len() == 2
    })
    .await;
}

#[tokio::test]
async fn redis_down_answers_503_with_the_reason() {
    let mut redis = RedisServer::start();
    let node = TestServer::on_redis(&redis.url(), short_leases).await;
    within("listed", PATIENCE, || async {
        listed(node.addr).await.len() == 1
    })
    .await;
    redis.kill();
    let deadline = Instant::now() + PATIENCE;
    let last = loop {
        let (status, body) = api_nodes(node.addr).await;
        if status == 503 {
            break body;
        }
        assert!(Instant::now() < deadline, "never 503: {status} {body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(last["error"]["code"], "unavailable", "{last}");
    let message = last["error"]["message"].as_str().unwrap();
    assert!(message.contains("Redis unreachable"), "{message}");
    // The heartbeats fail meanwhile, and are counted.
    within("a failed heartbeat is counted", PATIENCE, || async {
        node.metric("wshub_registry_heartbeat_failures_total") >= 1.0
    })
    .await;
    redis.restart();
    within("200 again once Redis is back", PATIENCE, || async {
        api_nodes(node.addr).await.0 == 200
    })
    .await;
}

/// This host's address on a non-loopback interface (requests from loopback
/// are always allowed, so a 403 needs another source address).
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

/// The status and JSON body of `GET path` with `headers`, and the
/// broadcast endpoint's status for a push with the same headers.
async fn ask(base: &str, path: &str, headers: &[(&str, &str)]) -> (u16, Value, u16) {
    let http = reqwest::Client::new();
    let mut get = http.get(format!("{base}{path}"));
    let mut push = http
        .post(format!("{base}/__broadcastWebSocket.wc"))
        .body(r#"{"action":"x","message":"y"}"#);
    for (k, v) in headers {
        get = get.header(*k, *v);
        push = push.header(*k, *v);
    }
    let response = get.send().await.unwrap();
    let status = response.status().as_u16();
    if status == 401 {
        assert!(
            response.headers()["www-authenticate"]
                .to_str()
                .unwrap()
                .starts_with("Bearer")
        );
    }
    let body: Value = serde_json::from_str(&response.text().await.unwrap()).unwrap_or(Value::Null);
    (status, body, push.send().await.unwrap().status().as_u16())
}

#[tokio::test]
async fn the_api_is_protected_like_the_broadcast_endpoint() {
    // Keys: required from anywhere, loopback included.
    let key = "reg-key-0123456789";
    let mut config = test_config();
    config.broadcast.api_keys = vec![key.into()];
    let server = TestServer::with(config).await;
    let base = format!("http://{}", server.addr);
    let bearer = format!("Bearer {key}");
    for (headers, want, path) in [
        (&[][..], 401, "/api/nodes"),
        (
            &[("authorization", "Bearer reg-key-012345678X")][..],
            401,
            "/api/nodes",
        ),
        (&[("x-api-key", "nope")][..], 401, "/api/nodes"),
        (&[][..], 401, "/api/no-such-endpoint"),
    ] {
        let (status, body, push) = ask(&base, path, headers).await;
        assert_eq!((status, push), (want, 401), "{headers:?} {path}: {body}");
        assert_eq!(body["error"]["code"], "unauthorized", "{body}");
        assert!(body["error"]["message"].is_string(), "{body}");
    }
    let joined = format!("nope, {key}");
    let lower = format!("bearer {key}");
    let upper = format!("BEARER {key}");
    for headers in [
        &[("authorization", bearer.as_str())][..],
        &[("x-api-key", key)],
        // The scheme in any letter case (RFC 9110).
        &[("authorization", lower.as_str())],
        &[("authorization", upper.as_str())],
        // A valid key in either header is enough: a gateway's own
        // Authorization beside it does not outweigh it.
        &[("authorization", "Bearer nope"), ("x-api-key", key)],
        &[("authorization", "Basic Z3c6eA=="), ("x-api-key", key)],
        // Two X-Api-Key headers joined by a proxy.
        &[("x-api-key", joined.as_str())],
    ] {
        let (status, body, push) = ask(&base, "/api/nodes", headers).await;
        assert_eq!((status, push), (200, 204), "{body}");
        // Without Redis: this node alone, from memory.
        let nodes = body["nodes"].as_array().unwrap();
        assert_eq!(nodes.len(), 1, "{body}");
        assert_eq!(nodes[0]["id"], server.node.config.node_id.as_str());
    }
    let (status, body, _) = ask(&base, "/api/nope", &[("x-api-key", key)]).await;
    assert_eq!((status, &body["error"]["code"]), (404, &json!("not_found")));

    // No keys: loopback and trusted networks only.
    let ip = non_loopback_ip();
    let mut config = test_config();
    config.listen = "0.0.0.0:0".parse().unwrap();
    let open = TestServer::with(config).await;
    let from_outside = format!("http://{}", SocketAddr::new(ip, open.addr.port()));
    let (status, body, push) = ask(&from_outside, "/api/nodes", &[]).await;
    assert_eq!((status, push), (403, 403), "{body}");
    assert_eq!(body["error"]["code"], "forbidden", "{body}");
    let (status, _, push) = ask(&from_outside, "/api/nope", &[]).await;
    assert_eq!(
        (status, push),
        (403, 403),
        "unknown paths are protected too"
    );
    let loopback = format!("http://127.0.0.1:{}", open.addr.port());
    let (status, body, push) = ask(&loopback, "/api/nodes", &[]).await;
    assert_eq!((status, push), (200, 204), "{body}");

    // A trusted network is as good as loopback.
    let mut config = test_config();
    config.listen = "0.0.0.0:0".parse().unwrap();
    config.broadcast.trusted_networks = vec![ipnet::IpNet::from(ip)];
    let trusting = TestServer::with(config).await;
    let from_trusted = format!("http://{}", SocketAddr::new(ip, trusting.addr.port()));
    let (status, body, push) = ask(&from_trusted, "/api/nodes", &[]).await;
    assert_eq!((status, push), (200, 204), "{body}");
}

#[tokio::test]
async fn the_broadcast_endpoint_still_answers_under_api() {
    let server = TestServer::start().await;
    let mut client = server.connect("u", None).await;
    let response = server
        .post("/api/app/__broadcastWebSocket.wc", r#"{"action":"pushed"}"#)
        .await;
    assert_eq!(response.status(), 204);
    assert_eq!(client.recv().await["action"], "pushed");
    let response = reqwest::Client::new()
        .delete(server.url("/api/nodes"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 405);
    assert!(response.headers().contains_key("allow"));
    let body: Value = serde_json::from_str(&response.text().await.unwrap()).unwrap();
    assert_eq!(body["error"]["code"], "method_not_allowed");
}

/// Writes a registry entry for a node that is not running (a "ghost") with
/// the given `reads`, live for `ttl_ms` by Redis's clock.
fn ghost(redis: &RedisServer, name: &str, reads: &str, ttl_ms: u64) {
    let time = cli(redis.port, &["TIME"]);
    let mut parts = time.lines().map(|l| l.trim().parse::<u64>().unwrap());
    let now_ms = parts.next().unwrap() * 1000 + parts.next().unwrap() / 1000;
    let member = format!("{name}:1");
    let hash = format!("{{wshub:registry}}:node:{member}");
    let score = (now_ms + ttl_ms).to_string();
    cli(
        redis.port,
        &["ZADD", "{wshub:registry}:nodes", &score, &member],
    );
    cli(
        redis.port,
        &[
            "HSET",
            &hash,
            "id",
            name,
            "version",
            "9.9.9",
            "connections",
            "0",
            "started",
            "0",
            "ready",
            "1",
            "reads",
            reads,
        ],
    );
    cli(redis.port, &["PEXPIRE", &hash, &ttl_ms.to_string()]);
}

#[tokio::test]
async fn the_version_gate_opens_only_for_what_every_live_node_reads() {
    let redis = RedisServer::start();
    let a = TestServer::on_redis(&redis.url(), short_leases).await;
    let b = TestServer::on_redis(&redis.url(), short_leases).await;
    let gates = || [a.node.registry().gate(), b.node.registry().gate()];
    within("both gates allow version 1", PATIENCE, || async {
        gates().iter().all(|g| g.may_write(1))
    })
    .await;
    for gate in gates() {
        assert!(!gate.may_write(2), "no node reads 2");
    }
    // A live node that reads 1 and 2 changes nothing: a and b lack 2.
    ghost(&redis, "ghost-new", "1,2", 60_000);
    within("the newer node is listed", PATIENCE, || async {
        listed(a.addr).await.contains_key("ghost-new")
    })
    .await;
    tokio::time::sleep(HEARTBEAT * 3).await;
    for gate in gates() {
        assert!(gate.may_write(1) && !gate.may_write(2));
    }
    cli(
        redis.port,
        &["ZREM", "{wshub:registry}:nodes", "ghost-new:1"],
    );

    // A live node that cannot read 1 closes it on every node ...
    ghost(&redis, "ghost-v2", "2", 3_000);
    within("every gate closes version 1", PATIENCE, || async {
        gates().iter().all(|g| !g.may_write(1))
    })
    .await;
    assert_eq!(
        a.node
            .registry()
            .gate()
            .choose(wire::WRITES, wire::Version::number),
        wire::Version::V1,
        "a closed gate still writes the baseline"
    );
    // ... and the bus goes on with the baseline meanwhile.
    let mut on_b = b.connect("bea", Some("gate")).await;
    let mut on_a = a.connect("abe", Some("gate")).await;
    on_a.send_json(json!({"action":"x","message":"still delivered","recipients":[{"type":"group","value":"gate"}]}))
        .await;
    assert_eq!(on_b.recv().await["message"], "still delivered");
    // Once its lease has passed, the gate opens again.
    let took = within("every gate opens again", PATIENCE, || async {
        gates().iter().all(|g| g.may_write(1))
    })
    .await;
    assert!(
        took <= Duration::from_secs(3) + Duration::from_secs(1),
        "{took:?}"
    );
    assert!(!listed(a.addr).await.contains_key("ghost-v2"));
}

#[tokio::test]
async fn the_registry_works_on_a_redis_cluster() {
    let cluster = RedisCluster::start(3);
    let a = TestServer::on_redis(&cluster.urls(), short_leases).await;
    let b = TestServer::on_redis(&cluster.urls(), short_leases).await;
    let _s = b.connect("u", None).await;
    let want = [
        (a.node.config.node_id.clone(), (0, true)),
        (b.node.config.node_id.clone(), (1, true)),
    ]
    .into_iter()
    .collect::<BTreeMap<_, _>>();
    for node in [&a, &b] {
        within("both listed, through the cluster", PATIENCE, || async {
            listed(node.addr).await == want
        })
        .await;
        assert!(node.node.registry().gate().may_write(1));
    }
}

/// The value of an unlabelled series in the binary's `/metrics`.
async fn scrape(binary: &Binary, series: &str) -> f64 {
    let text = reqwest::get(binary.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

#[tokio::test]
async fn heartbeat_failures_are_logged_once_per_outage_and_spare_the_sockets() {
    let mut redis = RedisServer::start();
    let url = redis.url();
    let binary = Binary::start(
        "info",
        &[
            ("WSHUB_REDIS__URL", url.as_str()),
            ("WSHUB_PRESENCE__HEARTBEAT_MS", "50"),
            ("WSHUB_PRESENCE__LEASE_MS", "1000"),
        ],
    );
    let failed = |v: &Value| {
        v["message"]
            .as_str()
            .unwrap_or("")
            .starts_with("node registry heartbeat failed")
    };
    let back = |v: &Value| v["message"] == "node registry heartbeat to Redis works again";
    let mut socket = Client::connect(binary.addr, "/ws?userid=stays").await;
    for outage in 1..=2 {
        redis.kill();
        let before = scrape(&binary, "wshub_registry_heartbeat_failures_total").await;
        within("five more failed heartbeats", PATIENCE, || async {
            scrape(&binary, "wshub_registry_heartbeat_failures_total").await >= before + 5.0
        })
        .await;
        assert_eq!(binary.matching(failed).len(), outage, "one line per outage");
        // The socket is untouched: it still gets what is sent to it.
        socket
            .send_json(json!({"action":"x","message":"here","recipients":[{"type":"user","value":"stays"}]}))
            .await;
        assert_eq!(socket.recv().await["message"], "here");
        redis.restart();
        within(
            "one line says the heartbeat works again",
            PATIENCE,
            || async { binary.matching(back).len() == outage },
        )
        .await;
    }
    assert_eq!(binary.matching(failed).len(), 2);
}
