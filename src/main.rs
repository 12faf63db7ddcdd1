//! The `wshub` binary: configuration, logging, signals; everything else is
//! in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// A horizontally scalable WebSocket hub, drop-in compatible with West Wind
/// Web Connection.
///
/// Configuration comes from built-in defaults, then the TOML file given with
/// --config (or WSHUB_CONFIG), then environment variables WSHUB_<KEY> with
/// `__` between nested keys (WSHUB_LISTEN, WSHUB_LIMITS__MAX_MESSAGE_BYTES).
/// wshub.example.toml lists every key with its default.
#[derive(Parser)]
#[command(version, about, long_about, after_help = AFTER_HELP)]
struct Args {
    /// TOML configuration file.
    #[arg(long, env = "WSHUB_CONFIG", value_name = "PATH", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

/// Where to read on: the help text is often all an operator has at hand.
const AFTER_HELP: &str = "\
Without a command, wshub runs a node. Commands: healthcheck (is the node on
this machine alive?), help.

Documentation, in the source repository:
  README.md               configuration keys, endpoints, messages, close codes
  docs/migrating.md       moving a Web Connection application onto wshub
  docs/backend.md         forwarding client messages to the application
  docs/cluster.md         several nodes on one Redis
  docs/deploying.md       Docker, Kubernetes, load balancers, metrics
  docs/security.md        tokens, origins, the broadcast endpoint, limits
  wshub.example.toml      every key with its default";

#[derive(clap::Subcommand)]
enum Command {
    /// Asks the node on this machine (at the configured port) whether it is
    /// alive: exit 0 if /healthz answers 200 within 2 s, 1 otherwise (a
    /// configuration error included, its message on stderr). For
    /// container health checks, where there is no shell or curl.
    Healthcheck,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let config = match wshub::Config::load(args.config.as_deref()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("wshub: {e}");
            // `healthcheck` promises 0 or 1, and Docker reserves 2.
            return match args.command {
                Some(Command::Healthcheck) => ExitCode::FAILURE,
                None => ExitCode::from(2),
            };
        }
    };
    if let Some(Command::Healthcheck) = args.command {
        let alive = tokio::runtime::Runtime::new()
            .map(|rt| rt.block_on(wshub::server::healthcheck(&config)))
            .unwrap_or(false);
        return if alive {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        };
    }
    if let Err(e) = wshub::logging::init(&config) {
        eprintln!("wshub: cannot start logging: {e}");
        return ExitCode::from(2);
    }
    for warning in &config.env_warnings {
        tracing::warn!("{warning}");
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("wshub: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(wshub::run(config, shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "wshub stopped");
            ExitCode::FAILURE
        }
    }
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
