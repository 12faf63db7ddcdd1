//! The real `wshub` binary, its stderr read line by line (JSON logs), for
//! tests of what the operator's log shows.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::PATIENCE;
use super::process::GroupChild;

/// A running `wshub` and every line it has written to stderr so far.
pub struct Binary {
    /// Where it listens (on loopback when it binds every address).
    pub addr: SocketAddr,
    child: GroupChild,
    lines: Arc<Mutex<Vec<String>>>,
    /// Its stderr closed: it exited (a configuration error, a crash).
    ended: Arc<AtomicBool>,
}

impl Binary {
    /// Starts the binary with JSON logs at `level` and the `WSHUB_*`
    /// variables in `env`, and waits for its "wshub listening" line.
    pub fn start(level: &str, env: &[(&str, &str)]) -> Self {
        Self::spawn(Command::new(env!("CARGO_BIN_EXE_wshub")), level, env)
    }

    /// [`start`](Self::start) under `ulimit <limit>` (`-Sn 256`: the soft
    /// open-file limit; `-n 64`: soft and hard), set by a shell that then
    /// execs the binary.
    pub fn start_with_ulimit(limit: &str, level: &str, env: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(format!("ulimit {limit} && exec \"$0\""))
            .arg(env!("CARGO_BIN_EXE_wshub"));
        Self::spawn(cmd, level, env)
    }

    fn spawn(mut cmd: Command, level: &str, env: &[(&str, &str)]) -> Self {
        cmd.env("WSHUB_LISTEN", "127.0.0.1:0")
            .env("WSHUB_LOG__FORMAT", "json")
            .env("WSHUB_LOG__LEVEL", level)
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = GroupChild::spawn(&mut cmd).expect("spawn wshub");
        let stderr = child.stderr.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let ended = Arc::new(AtomicBool::new(false));
        std::thread::spawn({
            let (lines, ended) = (lines.clone(), ended.clone());
            move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    lines.lock().unwrap().push(line);
                }
                ended.store(true, Ordering::SeqCst);
            }
        });
        let mut binary = Self {
            addr: "127.0.0.1:0".parse().unwrap(),
            child,
            lines,
            ended,
        };
        let listening =
            binary.wait_for("the listening line", |v| v["message"] == "wshub listening");
        let mut addr: SocketAddr = listening["addr"].as_str().unwrap().parse().unwrap();
        if addr.ip().is_unspecified() {
            addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        binary.addr = addr;
        binary
    }

    /// Every line so far.
    pub fn stderr(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Every JSON line so far that `matches`.
    pub fn matching(&self, matches: impl Fn(&Value) -> bool) -> Vec<Value> {
        self.stderr()
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| matches(v))
            .collect()
    }

    /// Waits for a JSON line that `matches` and returns it.
    pub fn wait_for(&self, what: &str, matches: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + PATIENCE;
        loop {
            // Read before looking, so a line written just before the end
            // is still found.
            let ended = self.ended.load(Ordering::SeqCst);
            if let Some(found) = self.matching(&matches).into_iter().next() {
                return found;
            }
            assert!(
                Instant::now() < deadline && !ended,
                "wshub never logged {what}; it logged:\n{}",
                self.stderr().join("\n")
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Sends it `signal` (`-TERM`, …) without waiting for it to exit.
    pub fn signal(&self, signal: &str) {
        assert!(self.child.signal(signal), "could not signal wshub");
    }

    /// Stops it (SIGTERM, then SIGKILL after a few seconds).
    pub fn stop(&mut self) {
        self.child.stop("-TERM", Duration::from_secs(5));
    }
}
