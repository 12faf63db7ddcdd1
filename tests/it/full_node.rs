//! Issue 19, "a node at its file limit": the node raises its soft
//! open-file limit at start; a node holding its capacity is *full*
//! (`/readyz` 503 with the reason, one warning, a gauge, upgrades refused
//! with 503) until it is 1 % below it again (one info line); and an
//! accept that fails at the open-file limit neither spins nor stalls the
//! node for long. Over the real binary, reading its JSON log.

use std::time::Duration;

use crate::common::Client;
use crate::common::binary::Binary;

async fn get(binary: &Binary, path: &str) -> (u16, String) {
    let response = reqwest::get(binary.url(path)).await.unwrap();
    let status = response.status().as_u16();
    (status, response.text().await.unwrap())
}

/// The value of one series in the node's `/metrics`.
async fn metric(binary: &Binary, series: &str) -> f64 {
    let (_, text) = get(binary, "/metrics").await;
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
}

/// A socket upgrade's status and body, without keeping the socket.
async fn upgrade_status(binary: &Binary, user: &str) -> (u16, String) {
    let response = crate::common::upgrade_request(
        &reqwest::Client::new(),
        binary.url(&format!("/ws?userid={user}")),
    )
    .send()
    .await
    .unwrap();
    let status = response.status().as_u16();
    (status, response.text().await.unwrap())
}

fn full_lines(binary: &Binary) -> usize {
    binary
        .matching(|v| {
            v["message"]
                .as_str()
                .unwrap_or_default()
                .starts_with("node full")
        })
        .len()
}

fn room_lines(binary: &Binary) -> usize {
    binary
        .matching(|v| {
            v["message"]
                .as_str()
                .unwrap_or_default()
                .starts_with("node has room again")
        })
        .len()
}

#[tokio::test]
async fn a_full_node_is_unready_refuses_and_says_so_until_it_has_room() {
    let binary = Binary::start("info", &[("WSHUB_LIMITS__MAX_CONNECTIONS", "3")]);
    assert_eq!(get(&binary, "/readyz").await, (200, "ready\n".into()));
    assert_eq!(metric(&binary, "wshub_connections_full").await, 0.0);
    let mut clients = Vec::new();
    for user in ["a", "b", "c"] {
        clients.push(Client::connect(binary.addr, &format!("/ws?userid={user}")).await);
    }

    let (status, body) = get(&binary, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.starts_with("not ready: full: 3 of 3 sockets") && body.contains("ready again at 2"),
        "{body}"
    );
    assert_eq!(metric(&binary, "wshub_connections_full").await, 1.0);
    let line = binary.wait_for("the full warning", |v| {
        v["message"]
            .as_str()
            .unwrap_or_default()
            .starts_with("node full")
    });
    assert_eq!(line["level"], "WARN", "{line}");
    assert_eq!(
        (&line["open"], &line["capacity"]),
        (&3.into(), &3.into()),
        "{line}"
    );
    // The refusal every upgrade at capacity gets.
    for user in ["d", "e"] {
        let (status, body) = upgrade_status(&binary, user).await;
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("at capacity (3 sockets)"), "{body}");
    }
    assert_eq!(full_lines(&binary), 1, "one warning per transition");

    // One socket leaves: 2 is 1 % (at least one socket) below 3.
    clients.pop().unwrap().close().await;
    crate::common::within("ready again", crate::common::PATIENCE, || async {
        get(&binary, "/readyz").await.0 == 200
    })
    .await;
    let line = binary.wait_for("the room line", |v| {
        v["message"]
            .as_str()
            .unwrap_or_default()
            .starts_with("node has room again")
    });
    assert_eq!(line["level"], "INFO", "{line}");
    assert_eq!(metric(&binary, "wshub_connections_full").await, 0.0);

    // Full again: a second warning, for the second transition.
    clients.push(Client::connect(binary.addr, "/ws?userid=f").await);
    assert_eq!(get(&binary, "/readyz").await.0, 503);
    binary.wait_for("the second warning", |_| full_lines(&binary) == 2);
    assert_eq!((full_lines(&binary), room_lines(&binary)), (2, 1));
}

#[tokio::test]
async fn the_soft_open_file_limit_is_raised_to_the_hard_one() {
    let hard = rlimit_hard();
    let binary = Binary::start_with_ulimit("-Sn 256", "info", &[]);
    let line = binary.wait_for("the limit line", |v| {
        v["message"] == "open-file limit raised to the hard limit"
    });
    assert_eq!(line["was"], "256", "{line}");
    assert_eq!(line["soft"], hard.to_string(), "{line}");
    assert_eq!(line["hard"], hard.to_string(), "{line}");
    assert_eq!(metric(&binary, "process_max_fds").await, hard as f64);
    // The capacity leaves the reserve for everything else.
    assert_eq!(
        metric(&binary, "wshub_connections_max").await,
        (hard - 128) as f64
    );
}

/// At the open-file limit the listener cannot accept: the node says so
/// once, retries within a fraction of a second (axum's own loop logged an
/// error per attempt and slept a whole second each time), and answers
/// again as soon as descriptors are free.
#[tokio::test]
async fn an_accept_at_the_file_limit_neither_spins_nor_stalls() {
    // Hard and soft at 64: a few plain connections use up the node's files.
    let binary = Binary::start_with_ulimit("-n 64", "info", &[]);
    let mut held = Vec::new();
    for _ in 0..80 {
        held.push(tokio::net::TcpStream::connect(binary.addr).await.unwrap());
    }
    let line = binary.wait_for("the accept warning", |v| {
        v["message"]
            .as_str()
            .unwrap_or_default()
            .starts_with("cannot accept connections")
    });
    assert_eq!(line["level"], "WARN", "{line}");
    // Still failing a while later: still one line, not one per attempt.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let warnings = binary.matching(|v| {
        v["message"]
            .as_str()
            .unwrap_or_default()
            .starts_with("cannot accept connections")
    });
    assert_eq!(warnings.len(), 1, "{warnings:#?}");
    drop(held);
    let took = crate::common::within("answering again", crate::common::PATIENCE, || async {
        reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap()
            .get(binary.url("/healthz"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    binary.wait_for("the recovery line", |v| {
        v["message"] == "accepting connections again"
    });
    assert!(took < Duration::from_secs(2), "{took:?}");
}

/// This process's hard open-file limit (the node's is the same: it is
/// inherited).
fn rlimit_hard() -> u64 {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    line.split_whitespace().nth(4).unwrap().parse().unwrap()
}
