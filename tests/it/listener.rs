//! The listener's accept queue (`listen_backlog`): a burst of connects
//! waits in the kernel's queue until the node accepts it, instead of
//! overflowing the standard library's backlog of 128 and waiting a second
//! or more for its SYN to be retransmitted (issue 19, connects per second).

use std::time::Duration;

use futures_util::future::join_all;
use tokio::net::TcpStream;
use wshub::server::Server;

use crate::common::test_config;

/// A burst of loopback connects to a node that is bound but not accepting
/// (the state of a busy node's queue); how many finished their handshake
/// within `within` (less than the kernel's first SYN retransmit, 1 s).
async fn handshakes_queued(backlog: u32, burst: usize, within: Duration) -> usize {
    let mut config = test_config();
    config.listen_backlog = backlog;
    // Bound and listening, never run: nothing accepts.
    let server = Server::bind(config).await.expect("bind");
    let addr = server.local_addr();
    let connects = (0..burst).map(|_| tokio::time::timeout(within, TcpStream::connect(addr)));
    let done = join_all(connects).await;
    let queued = done.iter().filter(|r| matches!(r, Ok(Ok(_)))).count();
    drop(done);
    drop(server);
    queued
}

/// The kernel's cap on any backlog (`net.core.somaxconn`).
fn somaxconn() -> usize {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .expect("/proc/sys/net/core/somaxconn")
        .trim()
        .parse()
        .expect("somaxconn is a number")
}

/// With the default backlog every connect of a burst well over 128 is
/// queued at once; with a small configured one the burst is cut near it,
/// so the key is what decides (before the fix, the node listened with 128
/// whatever it was told: 129 of 300 got through).
#[tokio::test]
async fn a_connect_burst_waits_in_the_accept_queue() {
    const BURST: usize = 300;
    assert!(
        somaxconn() > BURST,
        "this test needs net.core.somaxconn above {BURST} (it is {}): the kernel caps every backlog there",
        somaxconn()
    );
    let within = Duration::from_millis(700);
    let default = wshub::config::Config::default().listen_backlog;
    let queued = handshakes_queued(default, BURST, within).await;
    assert_eq!(
        queued, BURST,
        "with listen_backlog = {default}, only {queued} of {BURST} connects were queued"
    );
    let queued = handshakes_queued(32, BURST, within).await;
    assert!(
        queued <= 40,
        "with listen_backlog = 32, {queued} of {BURST} connects were queued"
    );
}
