//! The Redis bus over TLS (`rediss://`, issue 17): the routing table and
//! per-sender order across three nodes on a TLS-only `redis-server`,
//! mutual TLS, and the certificate failures an operator must be able to
//! read from `/readyz`: a server certificate from a CA the node does not
//! trust (its own `redis.tls_ca_file`, or the built-in roots), a client
//! without a certificate where one is required, and a Redis Cluster whose
//! certificates do not name the addresses it announces.

use crate::common::redis_tls::{
    Pki, TlsCluster, TlsRedis, ready_node, redis_config, redis_config_error,
};
use crate::common::routing::routing_table;
use crate::common::{PATIENCE, TestServer};
use serde_json::json;

/// Waits until the node's `/readyz` answers 503 with the reason its first
/// connection attempt failed (before that the reason is "connecting"),
/// and returns it.
pub async fn refusal(server: &TestServer) -> String {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let resp = server.get("/readyz").await;
        let status = resp.status();
        let body = resp.text().await.unwrap();
        assert_eq!(status, 503, "the node became ready: {body}");
        if !body.trim_end().ends_with("connecting") {
            return body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the first connection attempt never failed: {body}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Waits until `/readyz` names `needle`.
async fn naming(server: &TestServer, needle: &str) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let body = server.get("/readyz").await.text().await.unwrap();
        if body.contains(needle) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "/readyz never named {needle:?}: {body}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn routing_table_and_order_across_three_nodes_over_tls() {
    let pki = Pki::make();
    let redis = TlsRedis::start(&pki, false);
    let ca = pki.path("ca.crt");
    let settings = [("url", redis.url()), ("tls_ca_file", ca)];
    let settings: Vec<(&str, &str)> = settings.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut nodes = Vec::new();
    for _ in 0..3 {
        nodes.push(ready_node(&settings).await);
    }
    let addrs: Vec<_> = nodes.iter().map(|n| n.addr).collect();
    routing_table(&addrs).await;

    // Per-sender order and exactly one copy, across nodes.
    let mut rx = nodes[2].connect("rx", Some("g")).await;
    let mut tx = nodes[0].connect("tx", None).await;
    for i in 0..200 {
        tx.send_json(json!({"action": "n", "message": i.to_string(),
            "recipients": [{"type": "group", "value": "g"}, {"type": "user", "value": "rx"}]}))
            .await;
    }
    let tag = tx.send_sentinel().await;
    let got: Vec<String> = rx
        .until_sentinel(&tag)
        .await
        .iter()
        .map(|m| m["message"].as_str().unwrap().to_owned())
        .collect();
    let want: Vec<String> = (0..200).map(|i| i.to_string()).collect();
    assert_eq!(got, want);
}

#[tokio::test]
async fn mutual_tls_is_accepted_with_a_client_certificate_and_refused_without() {
    let pki = Pki::make();
    let redis = TlsRedis::start(&pki, true);
    let (url, ca) = (redis.url(), pki.path("ca.crt"));
    let (cert, key) = (pki.path("client.crt"), pki.path("client.key"));

    let without = TestServer::with(redis_config(&[("url", &url), ("tls_ca_file", &ca)])).await;
    // Redis ends the handshake; rustls reports the alert or the closed
    // connection, depending on the TLS version's timing.
    let why = refusal(&without).await;
    assert!(why.contains("not subscribed to Redis"), "{why}");
    // TLS 1.3 reports the refusal after the handshake: the first attempt
    // may see only the closed connection, a later one reads the alert.
    naming(&without, "CertificateRequired").await;

    let with = ready_node(&[
        ("url", &url),
        ("tls_ca_file", &ca),
        ("tls_client_cert_file", &cert),
        ("tls_client_key_file", &key),
    ])
    .await;
    let mut a = with.connect("a", None).await;
    a.send_json(json!({"action": "x", "message": "over mTLS"}))
        .await;
    assert_eq!(a.recv().await["message"], "over mTLS");
    assert!(without.node.readiness().is_err(), "still refused");
}

#[tokio::test]
async fn a_certificate_from_an_untrusted_ca_is_refused_with_an_error_naming_it() {
    let pki = Pki::make();
    let redis = TlsRedis::start(&pki, false);
    let url = redis.url();

    // Another CA than the one that signed Redis's certificate.
    let wrong = TestServer::with(redis_config(&[
        ("url", &url),
        ("tls_ca_file", &pki.path("other-ca.crt")),
    ]))
    .await;
    let why = refusal(&wrong).await;
    eprintln!("untrusted CA: {why}");
    assert!(
        why.contains("invalid peer certificate: UnknownIssuer"),
        "{why}"
    );

    // No CA file: the built-in (Mozilla) roots, which do not hold the
    // test CA either.
    let builtin = TestServer::with(redis_config(&[("url", &url)])).await;
    let why = refusal(&builtin).await;
    assert!(
        why.contains("invalid peer certificate: UnknownIssuer"),
        "{why}"
    );

    // Skipping verification connects (and is warned about at start).
    ready_node(&[("url", &url), ("tls_insecure_skip_verify", "true")]).await;
}

#[tokio::test]
async fn tls_keys_need_a_rediss_url_and_both_client_files() {
    let err = redis_config_error;
    let msg = err(&[
        ("url", "redis://127.0.0.1:1"),
        ("tls_insecure_skip_verify", "true"),
    ]);
    assert!(msg.contains("rediss://"), "{msg}");
    let msg = err(&[
        ("url", "rediss://127.0.0.1:1"),
        ("tls_client_cert_file", "/x.crt"),
    ]);
    assert!(msg.contains("redis.tls_client_key_file"), "{msg}");
    let msg = err(&[
        ("url", "rediss://127.0.0.1:1"),
        ("tls_ca_file", "/nonexistent/ca.crt"),
    ]);
    assert!(
        msg.contains("redis.tls_ca_file") && msg.contains("/nonexistent/ca.crt"),
        "{msg}"
    );
}

/// Sharded pub/sub on a Redis Cluster over TLS: the routing table across
/// three nodes.
#[tokio::test]
async fn routing_table_on_a_cluster_over_tls() {
    let pki = Pki::make();
    let cluster = TlsCluster::start(&pki, "server");
    let (url, ca) = (cluster.url("127.0.0.1"), pki.path("ca.crt"));
    let settings = [
        ("url", url.as_str()),
        ("sharded", "true"),
        ("tls_ca_file", &ca),
    ];
    let mut nodes = Vec::new();
    for _ in 0..3 {
        nodes.push(ready_node(&settings).await);
    }
    let addrs: Vec<_> = nodes.iter().map(|n| n.addr).collect();
    routing_table(&addrs).await;
}

/// A Redis Cluster over TLS whose certificates name the host of
/// `redis.url` (`localhost`) but not the addresses its nodes announce
/// (127.0.0.1): the cluster client reached the seed and then no shard,
/// and the node stayed unready saying only "No connections found -
/// ClusterConnectionNotFound" (review of 2026-12-03). It names the shard,
/// the certificate's error and what to do; also when its first failure
/// was another (the seed down as the node starts), and never with another
/// failure later (the seed down again).
#[tokio::test]
async fn a_cluster_whose_certificates_do_not_name_its_announced_addresses_says_so() {
    let pki = Pki::make();
    let mut cluster = TlsCluster::start(&pki, "localhost");
    let (url, ca) = (cluster.url("localhost"), pki.path("ca.crt"));
    cluster.cluster.nodes[0].kill();
    let node = TestServer::with(redis_config(&[
        ("url", &url),
        ("sharded", "true"),
        ("tls_ca_file", &ca),
    ]))
    .await;
    naming(&node, "Connection refused").await;
    cluster.cluster.nodes[0].restart();
    naming(&node, "the cluster announces a shard at 127.0.0.1:").await;
    let why = refusal(&node).await;
    assert!(why.contains("not valid for name"), "{why}");
    assert!(
        why.contains("the certificate does not name 127.0.0.1")
            && why.contains("cluster-announce-hostname"),
        "{why}"
    );
    cluster.cluster.nodes[0].kill();
    naming(&node, "Connection refused").await;
    let why = refusal(&node).await;
    assert!(!why.contains("announces a shard"), "{why}");
}
