//! Real `wshub` processes, for tests that kill or terminate a node.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use super::process::GroupChild;

/// A `wshub` process in its own process group, killed with it when dropped.
pub struct NodeProcess {
    pub child: GroupChild,
    pub addr: SocketAddr,
    pub node_id: String,
}

impl NodeProcess {
    /// Starts the binary on a free loopback port with `env` (WSHUB_*
    /// variables) and waits until it is ready.
    pub async fn spawn(env: &[(&str, &str)]) -> Self {
        use std::io::{BufRead, BufReader};
        let mut child = GroupChild::spawn(
            Command::new(env!("CARGO_BIN_EXE_wshub"))
                .env("WSHUB_LISTEN", "127.0.0.1:0")
                .env("WSHUB_LOG__FORMAT", "json")
                .envs(env.iter().copied())
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
            let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
            if v["message"] == "wshub listening" {
                break (
                    v["addr"].as_str().unwrap().parse().unwrap(),
                    v["node"].as_str().unwrap().to_owned(),
                );
            }
        };
        // Keep draining its log so it never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        let node = Self {
            child,
            addr,
            node_id,
        };
        let ready = format!("http://{addr}/readyz");
        let deadline = tokio::time::Instant::now() + super::PATIENCE;
        while reqwest::get(&ready)
            .await
            .map(|r| r.status() != 200)
            .unwrap_or(true)
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the node process never became ready"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        node
    }

    /// Sends SIGTERM (the node drains and exits).
    pub fn terminate(&self) {
        assert!(self.child.signal("-TERM"), "kill -TERM");
    }
}
