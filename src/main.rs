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
    /// TOML configuration file [env: WSHUB_CONFIG, where empty means none].
    #[arg(long, value_name = "PATH", global = true)]
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
  docs/resume.md          lossless resume: history, positions, replay
  docs/presence.md        who is online, across the cluster
  docs/architecture.md    how it works inside, and why
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
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(e) => {
            let _ = e.print();
            // `--help` and `--version` are answers; a usage error is a
            // configuration error, and `healthcheck` promises 0 or 1
            // (Docker reserves 2).
            return if !e.use_stderr() {
                ExitCode::SUCCESS
            } else if std::env::args().skip(1).any(|a| a == "healthcheck") {
                ExitCode::FAILURE
            } else {
                ExitCode::from(2)
            };
        }
    };
    // `WSHUB_CONFIG` when `--config` is not given; set but empty means no
    // file, as unset (clap's own `env` refused an empty value, and so
    // `healthcheck` exited 2: review of 2026-12-02).
    // Its name in any case, as every variable's (`src/config/env.rs`).
    let config_file = args.config.clone().or_else(|| {
        std::env::vars_os()
            .find(|(name, _)| {
                name.to_str()
                    .is_some_and(|n| n.eq_ignore_ascii_case(wshub::config::ENV_CONFIG_FILE))
            })
            .map(|(_, value)| value)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    });
    let file = config_file.as_deref();
    match &args.command {
        Some(Command::Config { what }) => {
            return print(match what {
                // The node would refuse to start with a bad count: so does
                // the check.
                ConfigCommand::Check => {
                    match worker_threads_problem().or_else(|| wshub::logging::rust_log().err()) {
                        Some(problem) => Err(wshub::cli::CliError::Environment(problem)),
                        None => wshub::config::environment()
                            .map_err(Into::into)
                            .and_then(|env| wshub::cli::config_check(file, env)),
                    }
                }
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
                let env = wshub::config::environment()?;
                wshub::cli::token(file, env, sub, group, ttl, relay)
            }));
        }
        _ => {}
    }
    // tokio reads this variable when the runtime starts and panics on a
    // value that is not a whole number above 0 (and fails on huge ones):
    // answer it here instead.
    if let Some(problem) = worker_threads_problem() {
        eprintln!("wshub: {problem}");
        // As for a configuration error: `healthcheck` promises 0 or 1.
        return match args.command {
            None => ExitCode::from(2),
            Some(_) => ExitCode::FAILURE,
        };
    }
    let config = match wshub::Config::load(file) {
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
        let health = match start_runtime() {
            Ok(rt) => rt.block_on(wshub::server::healthcheck(&config)),
            Err(e) => Err(format!("cannot start the runtime: {e}")),
        };
        return match health {
            Ok(()) => ExitCode::SUCCESS,
            Err(why) => {
                eprintln!("wshub healthcheck: unhealthy: {why}");
                ExitCode::FAILURE
            }
        };
    }
    if let Err(e) = wshub::logging::init(&config) {
        eprintln!("wshub: cannot start logging: {e}");
        return ExitCode::from(2);
    }
    for warning in &config.env_warnings {
        tracing::warn!("{warning}");
    }
    for note in &config.notes {
        tracing::info!("{note}");
    }
    let runtime = match start_runtime() {
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

/// The most worker threads `TOKIO_WORKER_THREADS` may ask for. tokio sets
/// no bound: a huge count failed with a capacity overflow or an aborted
/// allocation before any thread ran. More workers than any machine wshub
/// runs on has cores only cost memory and wake-ups.
const MAX_WORKER_THREADS: usize = 1024;

/// Why `TOKIO_WORKER_THREADS` (the worker-thread count: README,
/// "Operating a node") cannot be used, when it is set to something tokio
/// refuses or to more than [`MAX_WORKER_THREADS`].
fn worker_threads_problem() -> Option<String> {
    let value = std::env::var_os("TOKIO_WORKER_THREADS")?;
    match value.to_str().map(str::parse::<usize>) {
        Some(Ok(n)) if (1..=MAX_WORKER_THREADS).contains(&n) => None,
        _ => Some(format!(
            "TOKIO_WORKER_THREADS must be a whole number from 1 to {MAX_WORKER_THREADS}, got {:?}",
            value.to_string_lossy()
        )),
    }
}

/// The multi-threaded runtime. tokio panics on the calling thread when
/// the system refuses a worker thread (a thread or memory limit), and
/// unwinding then waits for the workers already started, forever: the
/// node hung without listening. For as long as the runtime starts, a
/// panic ends the process at once with a line saying why, and exit code 1
/// (as for the runtime's other start errors).
fn start_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(|info| {
        let why = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("a panic");
        eprintln!("wshub: cannot start the runtime: {why}");
        std::process::exit(1);
    }));
    let runtime = tokio::runtime::Runtime::new();
    std::panic::set_hook(previous);
    runtime
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
