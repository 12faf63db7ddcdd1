//! Redis ACL credentials (issue 17): from the URL, from `redis.username`
//! with `redis.password_file` (a Kubernetes Secret's file, newline and
//! all), and a wrong password: the node stays unready with the reason on
//! `/readyz`, and the password appears in no log line and no error.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use crate::common::PATIENCE;
use crate::common::process::GroupChild;
use crate::common::redis_tls::{
    ready_node, redis_config, redis_config_error, redis_with_user, scratch,
};
use serde_json::json;

const PASSWORD: &str = "s3cret-Acl-pw";

#[tokio::test]
async fn credentials_from_the_url_or_from_keys_and_a_password_file() {
    let redis = redis_with_user("wshub", PASSWORD);
    let from_url = ready_node(&[(
        "url",
        &format!("redis://wshub:{PASSWORD}@127.0.0.1:{}", redis.port),
    )])
    .await;
    let dir = scratch("acl");
    let file = dir.join("password");
    // As `kubectl create secret generic --from-file` mounts it.
    std::fs::write(&file, format!("{PASSWORD}\n")).unwrap();
    let from_keys = ready_node(&[
        ("url", &redis.url()),
        ("username", "wshub"),
        ("password_file", file.to_str().unwrap()),
    ])
    .await;
    // Both nodes' connections (subscriber, probe and node registry each;
    // the publisher connects on the first message) are the ACL user's; only
    // redis-cli's own is `default`.
    let clients = crate::common::redis::cli(redis.port, &["CLIENT", "LIST"]);
    let users: Vec<&str> = clients
        .lines()
        .filter(|l| !l.contains("cmd=client|list"))
        .map(|l| l.split(" user=").nth(1).unwrap().split(' ').next().unwrap())
        .collect();
    assert_eq!(users, ["wshub"; 6], "{clients}");
    let mut rx = from_keys.connect("rx", None).await;
    let mut tx = from_url.connect("tx", None).await;
    tx.send_json(json!({"action": "x", "message": "via ACL"}))
        .await;
    assert_eq!(rx.recv().await["message"], "via ACL");
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn the_password_keys_are_validated() {
    let err = redis_config_error;
    let msg = err(&[
        ("url", "redis://127.0.0.1:1"),
        ("password", PASSWORD),
        ("password_file", "/x"),
    ]);
    assert!(msg.contains("redis.password_file"), "{msg}");
    let msg = err(&[
        ("url", "redis://127.0.0.1:1"),
        ("password_file", "/nonexistent/pw"),
    ]);
    assert!(
        msg.contains("redis.password_file") && msg.contains("/nonexistent/pw"),
        "{msg}"
    );
    // A bad URL is quoted without its password.
    let msg = err(&[("url", &format!("redis://u:{PASSWORD}@[::1"))]);
    assert!(
        msg.contains("redis.url") && !msg.contains(PASSWORD),
        "{msg}"
    );
    // The configuration's Debug hides both.
    let c = redis_config(&[
        ("url", &format!("redis://u:{PASSWORD}@127.0.0.1:1")),
        ("password", PASSWORD),
    ]);
    let debug = format!("{c:?}");
    assert!(!debug.contains(PASSWORD), "{debug}");
}

/// The binary with a wrong password, in the URL and in the key: `/readyz`
/// says why, and nothing it logs (at debug level) or answers holds either
/// password.
#[tokio::test]
async fn a_wrong_password_is_reported_and_never_logged() {
    let redis = redis_with_user("wshub", PASSWORD);
    let wrong_in_url = "Wrong-url-pw-1234";
    let wrong_in_key = "Wrong-key-pw-5678";
    for (url, key) in [
        (
            format!("redis://wshub:{wrong_in_url}@127.0.0.1:{}", redis.port),
            None,
        ),
        (redis.url(), Some(wrong_in_key)),
    ] {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_wshub"));
        cmd.env("WSHUB_LISTEN", "127.0.0.1:0")
            .env("WSHUB_LOG__FORMAT", "json")
            .env("WSHUB_LOG__LEVEL", "debug")
            .env("WSHUB_REDIS__URL", &url)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(pw) = key {
            cmd.env("WSHUB_REDIS__USERNAME", "wshub")
                .env("WSHUB_REDIS__PASSWORD", pw);
        }
        let mut child = GroupChild::spawn(&mut cmd).expect("spawn wshub");
        let log = Arc::new(Mutex::new(Vec::<String>::new()));
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let lines = log.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
                if v["message"] == "wshub listening" {
                    let _ = addr_tx.send(v["addr"].as_str().unwrap().to_owned());
                }
                lines.lock().unwrap().push(line);
            }
        });
        let addr = addr_rx.recv_timeout(PATIENCE).expect("wshub listening");
        let ready = format!("http://{addr}/readyz");
        let deadline = tokio::time::Instant::now() + PATIENCE;
        let body = loop {
            let resp = reqwest::get(&ready).await.unwrap();
            assert_eq!(resp.status(), 503);
            let body = resp.text().await.unwrap();
            if !body.trim_end().ends_with("connecting") {
                break body;
            }
            assert!(tokio::time::Instant::now() < deadline, "{body}");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        };
        assert!(body.contains("WRONGPASS"), "{body}");
        child.stop("-TERM", PATIENCE);
        reader.join().unwrap();
        let log = log.lock().unwrap().join("\n");
        assert!(log.contains("WRONGPASS"), "the refusal is logged: {log}");
        for secret in [wrong_in_url, wrong_in_key, PASSWORD] {
            assert!(!body.contains(secret), "/readyz shows a password: {body}");
            assert!(!log.contains(secret), "a password in the log: {log}");
        }
    }
}

/// The narrowest user docs/cluster.md describes for history off, presence
/// off: pub/sub on the node's channels and the node registry's commands on
/// its keys. Messages flow and `GET /api/nodes` lists the node. (A review
/// found the documented list lacking the `GET`, `SET` and `ZCOUNT` the
/// heartbeat calls: every heartbeat failed, and the API answered 503.)
#[tokio::test]
async fn the_documented_narrow_user_runs_the_registry() {
    let rule = "+@pubsub &wshub:* ~{wshub:registry}:* +eval +time +zadd +zrem \
                +zremrangebyscore +zrangebyscore +zrange +zcount +pexpire +pexpireat \
                +hset +hget +hgetall +get +set +del";
    let docs = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/cluster.md"))
        .unwrap()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    for grant in rule
        .split_whitespace()
        .filter(|g| g.starts_with('+') && *g != "+@pubsub")
    {
        assert!(
            docs.contains(&format!("{grant} ")),
            "docs/cluster.md lacks {grant}"
        );
    }
    let mut args = vec!["--user", "narrow", "on", ">narrow-pw"];
    args.extend(rule.split_whitespace());
    let redis = crate::common::redis::RedisServer::start_with(&args);
    let url = format!("redis://narrow:narrow-pw@127.0.0.1:{}", redis.port);
    let a = ready_node(&[("url", &url)]).await;
    let b = ready_node(&[("url", &url)]).await;
    let mut rx = b.connect("rx", None).await;
    let mut tx = a.connect("tx", None).await;
    tx.send_json(json!({"action": "x", "message": "narrow"}))
        .await;
    assert_eq!(rx.recv().await["message"], "narrow");
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let response = a.get("/api/nodes").await;
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        let listed: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        if status == 200 && listed["nodes"].as_array().is_some_and(|n| n.len() == 2) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "GET /api/nodes: {status} {body}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
