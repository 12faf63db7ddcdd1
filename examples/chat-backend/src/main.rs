//! `wshub-chat-backend`: the sample application backend for the chat page.
//!
//! ```sh
//! cargo run -p wshub-chat-backend -- --listen 127.0.0.1:9000 --hub http://127.0.0.1:8080
//! WSHUB_BACKEND__URL=http://127.0.0.1:9000/__websocket.wwd WSHUB_BACKEND__EVENTS=true cargo run -p wshub
//! ```

use clap::Parser;
use wshub_chat_backend::{Settings, Verify, serve_verifying};

/// Sample wshub backend: renders chat messages from Markdown and keeps
/// recent ones for newcomers.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// Address to listen on (point wshub's backend.url here).
    #[arg(long, env = "CHAT_LISTEN", default_value = "127.0.0.1:9000")]
    listen: String,
    /// The hub's base URL (its broadcast endpoint must accept us).
    #[arg(long, env = "CHAT_HUB", default_value = "http://127.0.0.1:8080")]
    hub: String,
    /// The hub's broadcast API key, when it requires one.
    #[arg(long, env = "CHAT_HUB_KEY", hide_env_values = true)]
    hub_key: Option<String>,
    /// Messages kept per group.
    #[arg(long, env = "CHAT_KEEP", default_value_t = 50)]
    keep: usize,
    /// The hub's limits.max_message_bytes: the history sent to a newcomer
    /// is the newest messages that fit one request of this size.
    #[arg(long, env = "CHAT_MAX_BYTES", default_value_t = 65536)]
    max_bytes: usize,
    /// The hub's backend.signing_key: refuse requests not signed with it
    /// (or signed more than 5 minutes ago, or replayed).
    #[arg(long, env = "CHAT_SIGNING_KEY", hide_env_values = true)]
    signing_key: Option<String>,
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    // As wshub's logs: to stderr, coloured only on a terminal (piped into
    // `docker logs` or a file, escape codes are noise).
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    let listener = tokio::net::TcpListener::bind(&args.listen).await?;
    tracing::info!(addr = %listener.local_addr()?, hub = %args.hub, "chat backend listening");
    let settings = Settings {
        hub: args.hub,
        keep: args.keep,
        max_bytes: args.max_bytes,
        hub_key: args.hub_key.filter(|k| !k.is_empty()),
    };
    let verify = args.signing_key.filter(|k| !k.is_empty()).map(Verify::new);
    // In a container this is PID 1: without handling SIGTERM it would only
    // stop when killed.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        result = serve_verifying(listener, settings, verify) => result,
        _ = tokio::signal::ctrl_c() => Ok(()),
        _ = term.recv() => Ok(()),
    }
}
