//! Processes the tests start (redis-server, nginx, wshub), each in a process
//! group of its own, so that stopping one stops everything it forked.
//!
//! Killing only the process a test spawned is not enough: nginx's workers
//! outlive a SIGKILLed master, and a run of the suite once left four of them
//! behind (issue 11 item 15). `scripts/test` fails when anything is left.

use std::ops::{Deref, DerefMut};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// A child process leading its own process group. Dropping it kills the
/// whole group and reaps the child.
pub struct GroupChild {
    child: Child,
    /// The group was killed and the leader reaped: its pid (the group's
    /// id) may belong to someone else now, so it is never signalled again.
    done: bool,
}

impl GroupChild {
    /// Spawns `cmd` as the leader of a new process group (its pid is the
    /// group's id; what it forks stays in the group).
    pub fn spawn(cmd: &mut Command) -> std::io::Result<Self> {
        cmd.process_group(0)
            .spawn()
            .map(|child| Self { child, done: false })
    }

    /// Sends `signal` (as `kill` spells it: `-TERM`, `-STOP`) to the leader
    /// only; returns whether it was delivered.
    pub fn signal(&self, signal: &str) -> bool {
        !self.done && kill(signal, &self.child.id().to_string())
    }

    /// Sends `signal` to every process of the group.
    pub fn signal_group(&self, signal: &str) -> bool {
        !self.done && kill(signal, &format!("-{}", self.child.id()))
    }

    /// Asks the leader to stop with `signal` and waits for it at most
    /// `patience` (a graceful stop: nginx's master stops its workers on
    /// SIGTERM); then kills whatever is left of the group and reaps the
    /// leader. Idempotent.
    pub fn stop(&mut self, signal: &str, patience: Duration) {
        if matches!(self.child.try_wait(), Ok(None)) && self.signal(signal) {
            let deadline = Instant::now() + patience;
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        self.kill_group();
    }

    /// SIGKILLs every process of the group (also when the leader is already
    /// gone: its forks may not be) and reaps the leader.
    pub fn kill_group(&mut self) {
        if self.done {
            return;
        }
        // Before reaping: until then the leader's pid cannot be reused. A
        // stopped (SIGSTOPped) process dies of SIGKILL too.
        self.signal_group("-KILL");
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.done = true;
    }
}

/// Runs `kill SIGNAL -- TARGET` (a negative target is a process group).
fn kill(signal: &str, target: &str) -> bool {
    Command::new("kill")
        .args([signal, "--", target])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl Deref for GroupChild {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.child
    }
}

impl DerefMut for GroupChild {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.child
    }
}

impl Drop for GroupChild {
    fn drop(&mut self) {
        self.kill_group();
    }
}
