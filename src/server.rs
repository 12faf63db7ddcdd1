//! Binding the listener, serving, and shutting down in order.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tracing::info;

use crate::config::Config;
use crate::node::{Node, StartError};

/// Why the server could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The listen address could not be bound (in use, no permission).
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// Why binding failed.
        source: std::io::Error,
    },
    /// The node could not start; the error says which part and why.
    #[error(transparent)]
    Start(#[from] StartError),
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

    /// Serves until `shutdown` resolves, then shuts the node down with
    /// [`Node::shutdown`]`(shutdown.drain_window, shutdown.grace_period)`
    /// (which stops this server's HTTP once the sockets are drained) and
    /// returns once every task the node started has ended.
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
        let app =
            crate::http::router(node.clone()).into_make_service_with_connect_info::<SocketAddr>();
        // The node stops HTTP (through this token) once its sockets are
        // drained, and waits for this task: HTTP keeps answering while the
        // node drains, so load balancers see /readyz turn 503 and new
        // sockets are refused with 503, not reset.
        let http = node.http_shutdown();
        let serve = axum::serve(listener, app)
            .with_graceful_shutdown(http.token().clone().cancelled_owned());
        let mut serve = http.spawn(async move { serve.await });
        let config = &node.config.shutdown;

        tokio::select! {
            () = shutdown => {}
            result = &mut serve => {
                // axum only returns early on a listener failure: close every
                // socket at once and flush, as on shutdown.
                node.shutdown(Duration::ZERO, config.grace_period).await;
                return Err(result.map_err(std::io::Error::other)?.err().unwrap_or_else(|| {
                    std::io::Error::other("server stopped unexpectedly")
                }).into());
            }
        }

        info!(
            open_sockets = node.connections(),
            window_ms = config.drain_window.as_millis() as u64,
            "shutting down: draining"
        );
        node.shutdown(config.drain_window, config.grace_period)
            .await;
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
