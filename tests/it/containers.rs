//! Clients against real containers: the image built from the Dockerfile and
//! the cluster docker-compose.yml brings up. `scripts/test-containers`
//! builds and starts them, then runs these tests one at a time (they are
//! ignored in a plain `cargo test`, which has no containers to talk to) with:
//!
//! - `CONTAINERS_PORT`: where the container (or compose's nginx) is published
//!   on 127.0.0.1;
//! - `CONTAINERS_PROJECT`: the compose project, whose containers the cluster
//!   test scales and stops with `CONTAINERS_COMPOSE` (the compose command
//!   line, run by `sh -c`) and `podman`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::{Client, Ended};
use serde_json::json;

fn var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set: run scripts/test-containers"))
}

fn published() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], var("CONTAINERS_PORT").parse().unwrap()))
}

/// Containers take seconds to start, resolve and drain: longer than the
/// harness's PATIENCE for in-process servers.
const STARTUP: Duration = Duration::from_secs(120);

async fn wait_ready(addr: SocketAddr) {
    let deadline = Instant::now() + STARTUP;
    loop {
        if let Ok(r) = reqwest::get(format!("http://{addr}/readyz")).await
            && r.status() == 200
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "http://{addr}/readyz never answered 200"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Connects `user` in group `g`; returns the client and the node behind it.
async fn connect(addr: SocketAddr, user: &str) -> (Client, String) {
    try_connect(addr, user)
        .await
        .unwrap_or_else(|e| panic!("connect {user} through {addr}: {e}"))
}

/// [`connect`], failing with the reason instead of panicking.
async fn try_connect(
    addr: SocketAddr,
    user: &str,
) -> Result<(Client, String), tokio_tungstenite::tungstenite::Error> {
    let url = format!("ws://{addr}/__initializeWebSocket.wc?userid={user}&groupid=g");
    let (ws, response) = tokio_tungstenite::connect_async(url).await?;
    let node = response.headers()[wshub::http::NODE_HEADER]
        .to_str()
        .unwrap()
        .to_owned();
    Ok((Client { ws }, node))
}

/// One message from `clients[0]` to group `g` reaches every client once.
async fn everyone_gets_it_once(clients: &mut [(Client, String)], action: &str) {
    clients[0]
        .0
        .send_json(json!({"action": action, "recipients": [{"type": "group", "value": "g"}]}))
        .await;
    let tag = clients[0].0.send_sentinel().await;
    for (i, (c, node)) in clients.iter_mut().enumerate() {
        let got = c.until_sentinel(&tag).await;
        assert_eq!(got.len(), 1, "client {i} on {node}: {got:?}");
        assert_eq!(got[0]["action"], action);
    }
}

fn sh(command: &str) -> String {
    let out = Command::new("sh").args(["-c", command]).output().unwrap();
    assert!(
        out.status.success(),
        "{command}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The project's wshub containers by node id (from each one's start-up line).
fn replicas() -> BTreeMap<String, String> {
    let project = var("CONTAINERS_PROJECT");
    let names = sh(&format!(
        "podman ps --filter label=com.docker.compose.project={project} \
         --filter label=com.docker.compose.service=wshub --format '{{{{.Names}}}}'"
    ));
    names
        .lines()
        .map(|name| {
            let logs = sh(&format!("podman logs {name} 2>&1"));
            let node = logs
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .find(|v| v["message"] == "wshub listening")
                .and_then(|v| v["node"].as_str().map(str::to_owned))
                .unwrap_or_else(|| panic!("{name} logged no start-up line: {logs}"));
            (node, name.to_owned())
        })
        .collect()
}

/// The image as users run it: its own non-root user, a read-only root
/// file system; two sockets chat through the published port.
#[tokio::test]
#[ignore = "run by scripts/test-containers"]
async fn one_container_serves_a_chat() {
    let addr = published();
    wait_ready(addr).await;
    let (mut ann, _) = connect(addr, "ann").await;
    let (mut bob, _) = connect(addr, "bob").await;
    ann.send_json(json!({"action": "chat", "message": "hi", "recipients": [{"type": "user", "value": "bob"}]}))
        .await;
    let got = bob.recv().await;
    assert_eq!(
        (got["action"].as_str(), got["message"].as_str()),
        (Some("chat"), Some("hi"))
    );
}

/// docker-compose.yml: 30 clients through nginx spread over the three
/// replicas and reach each other once; scaled to 5, new clients reach the
/// new replicas too; a stopped replica's clients are closed with 1001,
/// reconnect through nginx to the others, and everyone gets what is sent
/// after that (docs/deploying.md: messages sent while a client reconnects
/// may be lost; none after).
#[tokio::test]
#[ignore = "run by scripts/test-containers"]
async fn the_compose_cluster_spreads_scales_and_survives_a_stop() {
    let lb = published();
    wait_ready(lb).await;
    let deadline = Instant::now() + STARTUP;
    while replicas().len() < 3 {
        assert!(Instant::now() < deadline, "three replicas never started");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    let mut clients = Vec::new();
    let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..30 {
        let (client, node) = connect(lb, &format!("u{i}")).await;
        *per_node.entry(node.clone()).or_default() += 1;
        clients.push((client, node));
    }
    assert_eq!(
        per_node.len(),
        3,
        "30 clients over all three replicas: {per_node:?}"
    );
    everyone_gets_it_once(&mut clients, "hello").await;

    // Scale to five: nginx re-resolves the name, new sockets reach them.
    sh(&format!(
        "{} up -d --no-recreate --scale wshub=5",
        var("CONTAINERS_COMPOSE")
    ));
    let deadline = Instant::now() + STARTUP;
    while replicas().len() < 5 {
        assert!(Instant::now() < deadline, "five replicas never started");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let all: BTreeSet<String> = replicas().into_keys().collect();
    let mut seen = BTreeSet::new();
    let mut extra = 0;
    let deadline = Instant::now() + STARTUP;
    while seen != all {
        assert!(
            Instant::now() < deadline,
            "after scaling, new sockets reached only {seen:?} of {all:?}"
        );
        let (client, node) = connect(lb, &format!("x{extra}")).await;
        extra += 1;
        seen.insert(node.clone());
        clients.push((client, node));
        if seen != all {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    everyone_gets_it_once(&mut clients, "scaled").await;

    // Stop the replica holding the most clients (SIGTERM: it drains).
    let counts = clients.iter().fold(BTreeMap::new(), |mut m, (_, n)| {
        *m.entry(n.clone()).or_insert(0) += 1;
        m
    });
    let victim = counts.iter().max_by_key(|(_, n)| **n).unwrap().0.clone();
    let name = replicas()[&victim].clone();
    let stop = tokio::task::spawn_blocking(move || sh(&format!("podman stop -t 20 {name}")));
    let (mut doomed, mut others): (Vec<_>, Vec<_>) =
        clients.into_iter().partition(|(_, n)| *n == victim);
    for (c, _) in doomed.iter_mut() {
        // The drain window is 5 s; the harness's PATIENCE is 10.
        assert_eq!(
            c.ended().await,
            Ended::Closed(1001, "Server shutting down".into())
        );
    }
    let mut back = Vec::new();
    for i in 0..doomed.len() {
        let (client, node) = connect(lb, &format!("back{i}")).await;
        assert_ne!(node, victim, "a new socket reached the stopped replica");
        back.push((client, node));
    }
    stop.await.unwrap();
    back.append(&mut others);
    everyone_gets_it_once(&mut back, "after-stop").await;
}

/// `--profile backend`: the sample chat backend answers a newcomer with the
/// group's history (through its API key to the broadcast endpoint).
#[tokio::test]
#[ignore = "run by scripts/test-containers"]
async fn the_backend_profile_answers() {
    let lb = published();
    wait_ready(lb).await;
    let deadline = Instant::now() + STARTUP;
    loop {
        // `up --profile backend` recreates the replicas with the backend's
        // URL: until nginx resolves their new addresses (`valid=5s`) a
        // connect can time out at a removed one (504).
        let (mut c, node) = match try_connect(lb, "newcomer").await {
            Ok(connected) => connected,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "connect newcomer through {lb}: {e}"
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        // The backend may still be starting: its first pushes can fail.
        let got = tokio::time::timeout(Duration::from_secs(5), c.recv()).await;
        match got {
            Ok(v) if v["action"] == "initialmessages" => return,
            Ok(v) => panic!("expected initialmessages from the backend, got {v} (node {node})"),
            Err(_) => assert!(Instant::now() < deadline, "the chat backend never answered"),
        }
    }
}
