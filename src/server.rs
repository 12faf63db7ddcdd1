//! Binding the listener, serving, and shutting down in order.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::Config;
use crate::node::Node;

/// Why the server could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The listen address could not be bound (in use, no permission).
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// The bus could not be started (an invalid Redis URL).
    #[error("cannot start the bus: {0}")]
    Bus(#[from] crate::bus::BusError),
    /// The HTTP server failed while running.
    #[error("server failed: {0}")]
    Serve(#[from] std::io::Error),
}

/// A bound, not yet running server.
pub struct Server {
    listener: TcpListener,
    node: Arc<Node>,
}

impl Server {
    /// Binds `config.listen` (port 0 picks a free port) and builds the node.
    pub async fn bind(config: Config) -> Result<Self, ServerError> {
        let addr = config.listen;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ServerError::Bind { addr, source })?;
        Ok(Self {
            listener,
            node: Node::new(config)?,
        })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        // A bound TCP listener always has a local address.
        self.listener
            .local_addr()
            .expect("bound listener has an address")
    }

    /// The node this server runs.
    pub fn node(&self) -> &Arc<Node> {
        &self.node
    }

    /// Serves until `shutdown` resolves, then: report unready and refuse new
    /// sockets, close every socket with 1001 spread over
    /// `shutdown.drain_window`, wait for the sessions to end (at most
    /// `shutdown.grace_period` more), and only then stop accepting HTTP;
    /// finally send what the backend queue holds (at most
    /// `shutdown.grace_period` more).
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServerError> {
        let Self { listener, node } = self;
        // One line of effective settings, secrets redacted (config::Settings).
        let s = node.config.settings();
        info!(addr = %listener.local_addr()?, node = %node.config.node_id, version = s.version,
            bus = %s.bus, backend = %s.backend, broadcast = %s.broadcast, auth = %s.auth,
            "wshub listening");
        let stop_accepting = CancellationToken::new();
        let app =
            crate::http::router(node.clone()).into_make_service_with_connect_info::<SocketAddr>();
        let serve = axum::serve(listener, app)
            .with_graceful_shutdown(stop_accepting.clone().cancelled_owned());
        let mut serve = tokio::spawn(async move { serve.await });

        tokio::select! {
            () = shutdown => {}
            result = &mut serve => {
                // axum only returns early on a listener failure.
                node.drain();
                tokio::join!(
                    node.stop_backend(node.config.shutdown.grace_period),
                    node.stop_bus()
                );
                return Err(result.map_err(std::io::Error::other)?.err().unwrap_or_else(|| {
                    std::io::Error::other("server stopped unexpectedly")
                }).into());
            }
        }

        // Keep answering HTTP while draining, so load balancers see /readyz
        // turn 503 and new sockets are refused with 503, not reset.
        let window = node.config.shutdown.drain_window;
        info!(
            open_sockets = node.connections(),
            window_ms = window.as_millis() as u64,
            "shutting down: draining"
        );
        node.close_sockets(window).await;
        let grace = node.config.shutdown.grace_period;
        if tokio::time::timeout(grace, node.sessions.wait())
            .await
            .is_err()
        {
            warn!(
                open_sockets = node.connections(),
                grace_ms = grace.as_millis() as u64,
                "grace period over with sessions still open; exiting anyway"
            );
        }
        stop_accepting.cancel();
        // In-flight HTTP requests are short; do not let one hold the exit.
        if tokio::time::timeout(grace, serve).await.is_err() {
            warn!("HTTP requests still in flight after the grace period; exiting anyway");
        }
        // The sessions' disconnect events and the messages for other nodes
        // are queued now; send both (side by side, each within the grace
        // period) before returning, or the process exits with them (issue 11
        // item 8).
        tokio::join!(node.stop_backend(grace), node.stop_bus());
        info!("shutdown complete");
        Ok(())
    }
}

/// Whether the node configured by `config` answers `GET /healthz` with 200
/// within two seconds, on the loopback address when it listens on all.
pub async fn healthcheck(config: &Config) -> bool {
    let mut addr = config.listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let Ok(client) = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(2))
        .build()
    else {
        return false;
    };
    client
        .get(format!("http://{addr}/healthz"))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
}

/// Binds and runs a node until `shutdown` resolves.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    Server::bind(config).await?.run(shutdown).await
}
