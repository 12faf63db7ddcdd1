//! Several nodes on one Redis (started by the test on a free port): the
//! routing table across nodes, exactly-once, order, subscriptions in effect
//! before a socket is accepted, and the faults that matter — Redis restarts,
//! a frozen Redis, a dying node, unreadable payloads.

mod common;

use std::time::Duration;

use common::node::NodeProcess;
use common::redis::{RedisCluster, RedisServer, command};
use common::{Client, TestServer, eventually, routing::routing_table};
use serde_json::json;

async fn three_nodes(url: &str) -> Vec<TestServer> {
    let mut nodes = Vec::new();
    for _ in 0..3 {
        nodes.push(TestServer::on_redis(url, |_| {}).await);
    }
    nodes
}

#[tokio::test]
async fn routing_table_across_three_nodes() {
    let redis = RedisServer::start();
    let nodes = three_nodes(&redis.url()).await;
    let addrs: Vec<_> = nodes.iter().map(|n| n.addr).collect();
    routing_table(&addrs).await;
}

#[tokio::test]
async fn one_copy_per_socket_when_a_user_is_on_every_node() {
    let redis = RedisServer::start();
    let nodes = three_nodes(&redis.url()).await;
    let mut sockets = Vec::new();
    for node in &nodes {
        // The same user on every node, twice, in groups the message also names.
        sockets.push(node.connect("u", Some("g")).await);
        sockets.push(node.connect("u", Some("h")).await);
    }
    let mut sender = nodes[1].connect("sender", None).await;
    sender
        .send_json(json!({"action": "x", "recipients": [
            {"type": "group", "value": "g"}, {"type": "user", "value": "u"}, {"type": "group", "value": "h"}]}))
        .await;
    let tag = sender.send_sentinel().await;
    for (i, s) in sockets.iter_mut().enumerate() {
        let got = s.until_sentinel(&tag).await;
        assert_eq!(got.len(), 1, "socket {i} got {got:?}");
    }
    assert!(sender.until_sentinel(&tag).await.is_empty());
}

#[tokio::test]
async fn order_is_kept_across_nodes() {
    let redis = RedisServer::start();
    let nodes = three_nodes(&redis.url()).await;
    let mut rx = nodes[2].connect("rx", Some("g")).await;
    let mut tx = nodes[0].connect("tx", None).await;
    for i in 0..300 {
        // Alternate the channel the message travels on.
        let to = if i % 2 == 0 {
            json!({"type": "user", "value": "rx"})
        } else {
            json!({"type": "group", "value": "g"})
        };
        tx.send_json(json!({"action": "n", "message": i.to_string(), "recipients": [to]}))
            .await;
    }
    for i in 0..300 {
        assert_eq!(rx.recv().await["message"], i.to_string());
    }
}

#[tokio::test]
async fn http_broadcast_on_one_node_reaches_the_others() {
    let redis = RedisServer::start();
    let nodes = three_nodes(&redis.url()).await;
    let mut a = nodes[1].connect("a", Some("g")).await;
    let mut b = nodes[2].connect("b", Some("g")).await;
    let resp = nodes[0]
        .post(
            "/__broadcastWebSocket.wc",
            r#"{"action":"push","recipients":[{"type":"group","value":"g"}]}"#,
        )
        .await;
    assert_eq!(resp.status(), 204);
    assert_eq!(a.recv().await["action"], "push");
    assert_eq!(b.recv().await["action"], "push");
}

/// The subscription must be in effect when the socket is accepted: a
/// message published elsewhere right after the 101 must arrive.
#[tokio::test]
async fn a_new_socket_misses_nothing_published_after_it_was_accepted() {
    let redis = RedisServer::start();
    let nodes = three_nodes(&redis.url()).await;
    let http = reqwest::Client::new();
    for i in 0..40 {
        let group = format!("fresh-{i}");
        let mut socket = nodes[1].connect(&format!("user-{i}"), Some(&group)).await;
        let body = json!({"action": "first", "message": group, "recipients": [{"type": "group", "value": group}]});
        let resp = http
            .post(nodes[0].url("/__broadcastWebSocket.wc"))
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 204);
        assert_eq!(socket.recv().await["message"], group.as_str(), "round {i}");
    }
}

#[tokio::test]
async fn redis_restart_unready_then_ready_and_delivery_resumes_without_duplicates() {
    let mut redis = RedisServer::start();
    let url = redis.url();
    let fast = |c: &mut wshub::Config| {
        let r = c.redis.as_mut().unwrap();
        r.publish_retry = Duration::from_millis(300);
    };
    let n0 = TestServer::on_redis(&url, fast).await;
    let n1 = TestServer::on_redis(&url, fast).await;
    let mut a0 = n0.connect("a0", Some("g")).await;
    let mut b0 = n0.connect("b0", Some("g")).await;
    let mut a1 = n1.connect("a1", Some("g")).await;

    redis.kill();
    for n in [&n0, &n1] {
        eventually("readyz turns 503 while Redis is down", || {
            n.node.readiness().is_err()
        })
        .await;
        assert_eq!(n.get("/readyz").await.status(), 503);
    }
    // Same-node delivery goes on.
    a0.send_json(json!({"action": "local", "recipients": [{"type": "group", "value": "g"}]}))
        .await;
    assert_eq!(b0.recv().await["action"], "local");
    assert_eq!(a0.recv().await["action"], "local");
    // Cross-node messages wait for Redis, then are dropped and counted.
    eventually("the outage message is dropped after publish_retry", || {
        n0.metric("wshub_messages_dropped_total{reason=\"bus_unavailable\"}") >= 1.0
    })
    .await;

    redis.restart();
    let back = tokio::time::Instant::now();
    for n in [&n0, &n1] {
        n.wait_ready().await;
    }
    assert!(
        back.elapsed() < Duration::from_secs(5),
        "ready again {:?} after Redis returned",
        back.elapsed()
    );
    // Cross-node delivery resumes, each socket once; the dropped message
    // never shows up late.
    let tag = a0.send_sentinel().await;
    let seen = a1.until_sentinel(&tag).await;
    assert!(seen.is_empty(), "a1 received {seen:?}");
    a1.send_json(json!({"action": "after", "recipients": [{"type": "group", "value": "g"}]}))
        .await;
    let tag = a1.send_sentinel().await;
    for c in [&mut a0, &mut b0] {
        let got = c.until_sentinel(&tag).await;
        let actions: Vec<_> = got
            .iter()
            .map(|m| m["action"].as_str().unwrap().to_owned())
            .collect();
        assert!(actions.ends_with(&["after".to_owned()]), "{actions:?}");
        assert_eq!(
            actions.iter().filter(|a| *a == "after").count(),
            1,
            "exactly once: {actions:?}"
        );
    }
}

#[tokio::test]
async fn a_frozen_redis_makes_nodes_unready_until_it_thaws() {
    let redis = RedisServer::start();
    let n0 = TestServer::on_redis(&redis.url(), |_| {}).await;
    let mut a = n0.connect("a", None).await;
    redis.pause();
    let frozen = tokio::time::Instant::now();
    eventually("unready while Redis is frozen", || {
        n0.node.readiness().is_err()
    })
    .await;
    assert!(
        frozen.elapsed() < Duration::from_secs(5),
        "took {:?}",
        frozen.elapsed()
    );
    let why = n0.get("/readyz").await.text().await.unwrap();
    assert!(why.contains("Redis"), "{why}");
    redis.resume();
    n0.wait_ready().await;
    a.send_json(json!({"action": "thawed"})).await;
    assert_eq!(a.recv().await["action"], "thawed");
}

#[tokio::test]
async fn unreadable_payloads_are_counted_and_ignored() {
    let redis = RedisServer::start();
    let n0 = TestServer::on_redis(&redis.url(), |_| {}).await;
    let mut a = n0.connect("a", Some("g")).await;
    for junk in [
        "PUBLISH wshub:all garbage",
        "PUBLISH wshub:g:g \"wshub/9\\n{}\\n{}\"",
        "PUBLISH wshub:u:a \"wshub/1\\n[]\\n{}\"",
    ] {
        assert!(
            command(redis.port, junk).unwrap().starts_with(':'),
            "{junk}"
        );
    }
    eventually("three unreadable payloads counted", || {
        n0.metric("wshub_bus_unreadable_total") == 3.0
    })
    .await;
    a.send_json(json!({"action": "fine"})).await;
    assert_eq!(a.recv().await["action"], "fine");
}

#[tokio::test]
async fn a_dying_node_takes_only_its_own_sockets() {
    let redis = RedisServer::start();
    let n0 = TestServer::on_redis(&redis.url(), |_| {}).await;
    let n1 = TestServer::on_redis(&redis.url(), |_| {}).await;
    let mut victim = NodeProcess::spawn(&[("WSHUB_REDIS__URL", &redis.url())]).await;
    let mut doomed = Client::connect(victim.addr, "/ws?userid=doomed&groupid=g").await;
    let mut a = n0.connect("a", Some("g")).await;
    let mut b = n1.connect("b", Some("g")).await;
    doomed
        .send_json(json!({"action": "before", "recipients": [{"type": "group", "value": "g"}]}))
        .await;
    assert_eq!(a.recv().await["action"], "before");
    assert_eq!(b.recv().await["action"], "before");

    victim.child.kill().unwrap();
    victim.child.wait().unwrap();
    assert_eq!(doomed.ended().await, common::Ended::Dropped);
    a.send_json(json!({"action": "after", "recipients": [{"type": "group", "value": "g"}]}))
        .await;
    assert_eq!(b.recv().await["action"], "after");
    assert_eq!(a.recv().await["action"], "after");
    assert!(n0.node.readiness().is_ok() && n1.node.readiness().is_ok());
}

#[tokio::test]
async fn sharded_pubsub_on_a_redis_cluster() {
    let cluster = RedisCluster::start(3);
    let urls = cluster.urls();
    let mut nodes = Vec::new();
    for _ in 0..3 {
        nodes.push(
            TestServer::on_redis(&urls, |c| {
                c.redis.as_mut().unwrap().sharded = true;
            })
            .await,
        );
    }
    let addrs: Vec<_> = nodes.iter().map(|n| n.addr).collect();
    routing_table(&addrs).await;
    // The channels really are spread over the shards.
    let mut shards_with_channels = 0;
    for node in &cluster.nodes {
        let reply = command(
            node.port,
            "PUBSUB SHARDNUMSUB wshub:all wshub:g:g1 wshub:g:g2 wshub:u:a wshub:u:b wshub:n",
        )
        .unwrap();
        assert!(reply.starts_with('*'), "{reply}");
        let channels = command(node.port, "PUBSUB SHARDCHANNELS wshub:*").unwrap();
        if channels != "*0" {
            shards_with_channels += 1;
        }
    }
    assert!(
        shards_with_channels >= 2,
        "channels on {shards_with_channels} shard(s)"
    );
}
