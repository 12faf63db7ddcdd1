//! The `wshub` binary: configuration, logging, signals; everything else is
//! in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// jemalloc, not the system's malloc: about 0.7 KiB less memory per idle
/// socket than glibc and less CPU per delivery (docs/architecture.md,
/// "Memory per socket").
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read before `main` (`_RJEM_MALLOC_CONF` in the
/// environment overrides them): a background thread gives free pages back
/// to the system within about a second (`dirty_decay_ms`), so a burst of
/// connects does not leave its handshakes' buffers resident; by default
/// freed pages wait 10 s and are only returned when the node allocates.
#[cfg(not(target_env = "msvc"))]
// SAFETY: jemalloc reads this symbol as a `const char *`: a reference to
// a NUL-terminated array has that representation, and it is never written.
#[unsafe(export_name = "_rjem_malloc_conf")]
static JEMALLOC_CONF: &[u8; 43] = b"background_thread:true,dirty_decay_ms:1000\0";

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
this machine alive?), config check (validate and print the configuration,
secrets redacted), config defaults, token (mint a token with auth.jwt_secret),
help.

Documentation, in the source repository:
  README.md               configuration keys, endpoints, messages, close codes
  docs/migrating.md       moving a Web Connection application onto wshub
  docs/backend.md         forwarding client messages to the application
  docs/cluster.md         several nodes on one Redis
  docs/deploying.md       Docker, Kubernetes, load balancers, metrics
  docs/security.md        tokens, origins, the broadcast endpoint, limits
  docs/api.md             the server API (/api/*) and the admin page (/admin)
  wshub.example.toml      every key with its default";

#[derive(clap::Subcommand)]
enum Command {
    /// Asks the node on this machine (at the configured port) whether it is
    /// alive: exit 0 if /healthz answers 200 within 2 s, 1 otherwise (a
    /// configuration error included, its message on stderr). For
    /// container health checks, where there is no shell or curl.
    Healthcheck,
    /// The configuration: `check` validates it (exit 1 if invalid) and
    /// prints it as in effect, secrets redacted; `defaults` prints every
    /// key with its default.
    Config {
        #[command(subcommand)]
        what: ConfigCommand,
    },
    /// Prints a token for the sockets of a user, signed HS256 with the
    /// configured auth.jwt_secret (for tests, and for backends that cannot
    /// sign JWTs).
    Token {
        /// The user id (`sub`).
        #[arg(long)]
        sub: String,
        /// The group id (`group`); none: the null group.
        #[arg(long)]
        group: Option<String>,
        /// How long it is valid: 90s, 15m, 1h, 7d.
        #[arg(long, default_value = "1h")]
        ttl: String,
        /// A `relay` claim: all, group or none (overrides ws.client_relay).
        #[arg(long)]
        relay: Option<String>,
    },
}

#[derive(clap::Subcommand)]
enum ConfigCommand {
    /// Validates the configuration and prints it, secrets redacted.
    Check,
    /// Prints every key with its built-in default.
    Defaults,
}

/// Runs a command that prints text: stdout and 0, or stderr and 1.
fn print(result: Result<String, wshub::cli::CliError>) -> ExitCode {
    match result {
        Ok(text) => {
            use std::io::Write;
            // A closed pipe (`| head`) is not an error worth a panic.
            let _ = writeln!(std::io::stdout(), "{}", text.trim_end());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("wshub: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let file = args.config.as_deref();
    match &args.command {
        Some(Command::Config { what }) => {
            return print(match what {
                ConfigCommand::Check => wshub::cli::config_check(file, std::env::vars()),
                ConfigCommand::Defaults => Ok(wshub::cli::config_defaults()),
            });
        }
        Some(Command::Token {
            sub,
            group,
            ttl,
            relay,
        }) => {
            return print(wshub::cli::parse_ttl(ttl).and_then(|ttl| {
                let (group, relay) = (group.as_deref(), relay.as_deref());
                wshub::cli::token(file, std::env::vars(), sub, group, ttl, relay)
            }));
        }
        _ => {}
    }
    // tokio reads this variable when the runtime starts and panics on a
    // value that is not a whole number above 0: answer it here instead.
    if let Some(bad) = bad_worker_threads() {
        eprintln!("wshub: TOKIO_WORKER_THREADS must be a whole number above 0, got {bad:?}");
        // As for a configuration error: `healthcheck` promises 0 or 1.
        return match args.command {
            None => ExitCode::from(2),
            Some(_) => ExitCode::FAILURE,
        };
    }
    let config = match wshub::Config::load(args.config.as_deref()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("wshub: {e}");
            // `healthcheck` promises 0 or 1, and Docker reserves 2.
            return match args.command {
                None => ExitCode::from(2),
                Some(_) => ExitCode::FAILURE,
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

/// `TOKIO_WORKER_THREADS` when it is set to something tokio refuses (its
/// worker-thread count: README, "Operating a node").
fn bad_worker_threads() -> Option<String> {
    let value = std::env::var_os("TOKIO_WORKER_THREADS")?;
    match value.to_str().map(str::parse::<usize>) {
        Some(Ok(n)) if n > 0 => None,
        _ => Some(value.to_string_lossy().into_owned()),
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
