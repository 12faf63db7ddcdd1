//! Configuration: built-in defaults, then an optional TOML file, then
//! `WSHUB_*` environment variables (`__` between nested keys).
//!
//! Read in two steps: [`RawConfig`] is what the user wrote, with unknown keys
//! refused (a typo must not silently fall back to a default); [`Config`] is
//! the validated, typed result the rest of the crate uses. Every error names
//! the key it is about. `wshub.example.toml` lists every key with its default
//! and must be kept in step with [`RawConfig`].

mod env;
mod raw;
mod redact;
mod show;
mod trust;

pub use env::is_service_link;
pub use raw::*;
pub use redact::{redact_redis_urls, redact_url_and_query, redact_urls};
pub use show::to_toml;
pub use trust::{RedisAuth, RedisTls, Secret};

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

/// The environment variable prefix.
pub const ENV_PREFIX: &str = "WSHUB";
/// The variable naming the config file; read by the command line, not a key.
pub const ENV_CONFIG_FILE: &str = "WSHUB_CONFIG";

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read or parsed, a key is unknown, or a value has
    /// the wrong type. The text comes from the `config` crate and names the
    /// key and the source; the values of secret keys, quoted values it
    /// cannot tie to a key, and passwords in URLs are shown as `***`
    /// (see `redact.rs`).
    #[error("configuration: {}", redact::config_error(.0))]
    Load(#[from] config::ConfigError),
    /// A `WSHUB_<SECTION>__<KEY>` variable names a known section but a key
    /// it does not have: a typo of a real key. Fix or remove the variable.
    #[error("configuration: the environment variable {name} names no key of its section{hint}")]
    UnknownVariable { name: String, hint: String },
    /// Two environment variables name one key: their names differ only in
    /// case (names are read in any case). Keep one.
    #[error(
        "configuration: the environment variables {first} and {second} set the same key \
         (names are read in any case): keep one"
    )]
    DuplicateVariable { first: String, second: String },
    /// A list variable holds an array (`["a","b"]`) or quoted items where a
    /// comma-separated list is read: its items would keep the brackets and
    /// quotes. Its value is not shown: it may hold secrets.
    #[error(
        "configuration: the environment variable {name} is a comma-separated list (a,b), not an array ([\"a\",\"b\"]) nor quoted items: the brackets and quotes would be kept in the items (the value is not shown: it may hold secrets)"
    )]
    ArrayInVariable { name: String },
    /// A value has the right type but is not acceptable.
    #[error("configuration: `{key}` {problem}")]
    Invalid { key: &'static str, problem: String },
    /// A `WSHUB_*` variable's name or value is not Unicode (a Latin-1
    /// byte). Its value is not shown: it may be a secret.
    #[error(
        "configuration: the environment variable {name} is not valid UTF-8 (its value is not shown: it may be a secret)"
    )]
    NotUnicode { name: String },
    /// The configuration file named (`--config`, `WSHUB_CONFIG`) cannot be
    /// read. Its path is shown: it is no secret, and the operator needs it.
    #[error("configuration: cannot read the configuration file {}: {error}", .path.display())]
    File {
        path: std::path::PathBuf,
        error: std::io::Error,
    },
}

/// Refuses a number where a boolean key is (`tcp_nodelay = 2`), which
/// the `config` crate would take as true (0 as false), a floating
/// point number where an integer key is (`max_message_bytes = 70000.9`,
/// `1e2`), which it would round (the same text in the environment is
/// refused: review of 2026-12-02), a boolean (or `yes`, `on`, …)
/// where an integer key is, which it would take as 1 or 0, and a `*_ms`
/// key over [`MAX_MS`]. What it does take for a boolean, and
/// so what a boolean key accepts: `true`/`false`, and as text (every
/// environment value is text) `true`/`false`, `1`/`0`, `yes`/`no`,
/// `on`/`off` in any case; it refuses other words itself, naming the key
/// and the source, as this does for numbers.
///
/// `origin(key)` names where `key` was set (a `config::Value` read back
/// by key has lost its origin).
fn refuse_mistyped_numbers(
    built: &config::Config,
    origin: impl Fn(&str) -> Option<String>,
) -> Result<(), ConfigError> {
    use config::ValueKind as K;
    let keys = typed_keys();
    let checks = keys
        .booleans
        .iter()
        .map(|key| (key, true))
        .chain(keys.integers.iter().map(|key| (key, false)));
    for (key, boolean) in checks {
        let Ok(value) = built.get::<config::Value>(key) else {
            continue;
        };
        if !boolean && key.ends_with("_ms") {
            let ms = match &value.kind {
                K::I64(n) => Some(i128::from(*n)),
                K::U64(n) => Some(i128::from(*n)),
                K::I128(n) => Some(*n),
                K::U128(n) => i128::try_from(*n).ok().or(Some(i128::MAX)),
                K::String(text) => text.trim().parse::<i128>().ok(),
                _ => None,
            };
            if ms.is_some_and(|ms| ms > i128::from(MAX_MS)) {
                return Err(ConfigError::Load(config::ConfigError::At {
                    error: Box::new(config::ConfigError::Message(format!(
                        "must be at most {MAX_MS} (30 days)"
                    ))),
                    origin: origin(key),
                    key: Some(key.to_owned()),
                }));
            }
        }
        let (found, expected) = match (&value.kind, boolean) {
            (K::I64(_) | K::I128(_) | K::U64(_) | K::U128(_), true) => {
                ("an integer", "true or false")
            }
            (K::Float(_), true) => ("a floating point number", "true or false"),
            (K::Float(_), false) => ("a floating point number", "an integer"),
            // The crate reads a boolean, and the words it takes for one,
            // as 1 or 0 where a number is wanted (`max_connections_per_ip
            // = true` held a node to one socket per address: review of
            // 2026-12-03).
            (K::Boolean(_), false) => ("a boolean", "an integer"),
            (K::String(text), false) if is_boolean_word(text) => ("a boolean word", "an integer"),
            // Every integer key is unsigned: the crate's "invalid type:
            // string \"-1\", expected an integer" said -1 was no integer
            // (review of 2026-12-03).
            (K::I64(n), false) if *n < 0 => ("a negative number", "a whole number of at least 0"),
            (K::I128(n), false) if *n < 0 => ("a negative number", "a whole number of at least 0"),
            (K::String(text), false) if text.trim().parse::<i128>().is_ok_and(|n| n < 0) => {
                ("a negative number", "a whole number of at least 0")
            }
            _ => continue,
        };
        return Err(ConfigError::Load(config::ConfigError::At {
            error: Box::new(config::ConfigError::Message(format!(
                "invalid type: {found}, expected {expected}"
            ))),
            origin: origin(key),
            key: Some(key.to_owned()),
        }));
    }
    Ok(())
}

/// Refuses a section written as a list (`broadcast = [[…], "…"]`), which
/// serde would read field by field in order, and whose errors named a key
/// like `broadcast[1]` that the redaction did not know as a secret one
/// (review of 2026-12-03: an API key was shown). Only the file can: the
/// environment sets keys, not sections.
fn refuse_sections_as_lists(
    built: &config::Config,
    file: Option<&std::path::Path>,
) -> Result<(), ConfigError> {
    static SECTIONS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    let sections = SECTIONS.get_or_init(|| {
        let defaults = serde_json::to_value(RawConfig::default())
            .expect("the default configuration serializes");
        defaults
            .as_object()
            .map(|top| {
                top.iter()
                    .filter(|(_, v)| v.is_object())
                    .map(|(k, _)| k.clone())
                    .collect()
            })
            .unwrap_or_default()
    });
    for section in sections {
        if let Ok(value) = built.get::<config::Value>(section)
            && !matches!(value.kind, config::ValueKind::Table(_))
        {
            return Err(ConfigError::Load(config::ConfigError::At {
                error: Box::new(config::ConfigError::Message(format!(
                    "a section was given a value: write [{section}] and its keys under it (the value is not shown)"
                ))),
                origin: file.map(|f| f.display().to_string()),
                key: Some(section.clone()),
            }));
        }
    }
    Ok(())
}

/// The most any `*_ms` key takes: 30 days. Longer is a typo, and near
/// the top of the type it overflowed where it was added to a time or
/// sent to Redis as an expiry (`history.ttl_ms` = 2^63 − 1 failed every
/// publish while the node said it was ready: review of 2026-12-03).
pub const MAX_MS: u64 = 30 * 24 * 3600 * 1000;

/// Whether the `config` crate would read `text` as a boolean.
fn is_boolean_word(text: &str) -> bool {
    ["true", "false", "yes", "no", "on", "off"]
        .iter()
        .any(|word| text.trim().eq_ignore_ascii_case(word))
}

/// The dotted paths of [`RawConfig`]'s boolean and integer keys.
struct TypedKeys {
    booleans: Vec<String>,
    integers: Vec<String>,
}

/// The keys of each type, from [`RawConfig`]'s defaults (which serialize
/// every key), so the lists cannot drift.
fn typed_keys() -> &'static TypedKeys {
    static KEYS: std::sync::OnceLock<TypedKeys> = std::sync::OnceLock::new();
    KEYS.get_or_init(|| {
        let defaults = serde_json::to_value(RawConfig::default())
            .expect("the default configuration serializes");
        let mut keys = TypedKeys {
            booleans: Vec::new(),
            integers: Vec::new(),
        };
        let mut sort = |path: String, value: &serde_json::Value| match value {
            serde_json::Value::Bool(_) => keys.booleans.push(path),
            serde_json::Value::Number(n) if n.is_u64() || n.is_i64() => keys.integers.push(path),
            _ => {}
        };
        if let serde_json::Value::Object(top) = defaults {
            for (name, value) in top {
                match value {
                    serde_json::Value::Object(section) => {
                        for (key, value) in &section {
                            sort(format!("{name}.{key}"), value);
                        }
                    }
                    value => sort(name, &value),
                }
            }
        }
        keys
    })
}

/// A key file holds a public key (or a certificate) of the algorithm's kind: jsonwebtoken
/// reads a private key's PEM and a P-384 key without a word, and then no
/// token ever verifies (review of 2026-12-02). `algorithm` is RS256 or
/// ES256.
fn check_public_key(text: &[u8], algorithm: jsonwebtoken::Algorithm) -> Result<(), String> {
    /// The DER of the OID of the P-256 curve (`prime256v1`), as a
    /// `SubjectPublicKeyInfo` names it.
    const P256: [u8; 10] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
    let pem = pem::parse(text).map_err(|e| format!("is not a PEM file: {e}"))?;
    let tag = pem.tag();
    // jsonwebtoken reads the public key out of a certificate too.
    let public = tag == "PUBLIC KEY" || tag == "CERTIFICATE";
    if tag.contains("PRIVATE") {
        return Err(format!(
            "holds a private key ({tag}); give its public key (`openssl pkey -in KEY -pubout`): \
             the hub only verifies"
        ));
    }
    match algorithm {
        jsonwebtoken::Algorithm::ES256 => {
            if !public {
                return Err(format!("holds a {tag}, not a PUBLIC KEY or a CERTIFICATE"));
            }
            if !pem.contents().windows(P256.len()).any(|w| w == P256) {
                return Err("is not a P-256 key, which ES256 needs".into());
            }
        }
        _ => {
            if !public && tag != "RSA PUBLIC KEY" {
                return Err(format!("holds a {tag}, not a PUBLIC KEY or a CERTIFICATE"));
            }
        }
    }
    Ok(())
}

/// An `auth.allowed_origins` entry: `*`, `null`, or an origin as a browser
/// sends it, `scheme://host[:port]` (a trailing `/` is allowed), kept as a
/// browser would send it: an http(s) origin in its serialized form (lower
/// case, an international name in punycode, the scheme's default port left
/// out: `https://a.example:443` is `https://a.example`), any other scheme
/// (`chrome-extension://…`, `capacitor://localhost`) as written. An entry
/// with a path, a query, a wildcard or no scheme could never match an
/// `Origin`, and was kept without a word (review of 2026-12-02).
fn origin_entry(entry: &str) -> Result<String, ConfigError> {
    if entry == "*" || entry == "null" {
        return Ok(entry.to_owned());
    }
    let refused = |why: &str| {
        invalid(
            "auth.allowed_origins",
            format!(
                "{entry:?} is not an origin like https://app.example.com (a scheme, a host and \
                 an optional port; no path){why}; `*` allows any"
            ),
        )
    };
    if entry.contains('*') {
        return Err(refused(": wildcards are not supported, list each origin"));
    }
    let trimmed = entry.strip_suffix('/').unwrap_or(entry);
    let url = reqwest::Url::parse(trimmed)
        .ok()
        .filter(|u| {
            u.has_host()
                && (u.path().is_empty() || u.path() == "/")
                && u.query().is_none()
                && u.fragment().is_none()
                && u.username().is_empty()
                && u.password().is_none()
                && !trimmed.ends_with(['?', '#'])
        })
        .filter(|_| {
            trimmed
                .split_once("://")
                .is_some_and(|(_, rest)| !rest.is_empty() && !rest.starts_with(['/', '\\']))
        })
        .ok_or_else(|| refused(""))?;
    let origin = url.origin();
    Ok(if origin.is_tuple() {
        origin.ascii_serialization()
    } else {
        trimmed.to_owned()
    })
}

/// `log.level` names a level, or a target's level (`wshub=debug`). A
/// `tracing` filter reads a bare word as a *target*, so a misspelt level
/// (`warning`, `inf`) or an empty value was a filter that let nothing
/// through: a node that logged nothing at all, errors included (review
/// of 2026-12-02). A target on its own (all its levels) is written
/// `target=trace`.
pub(crate) fn check_log_level(text: &str) -> Result<(), String> {
    // And `0` (off) to `5` (trace), as `tracing` reads them.
    const LEVELS: [&str; 12] = [
        "trace", "debug", "info", "warn", "error", "off", "0", "1", "2", "3", "4", "5",
    ];
    let directives: Vec<&str> = text
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .collect();
    if directives.is_empty() {
        return Err("must name a level: trace, debug, info, warn, error or off".into());
    }
    for directive in directives {
        let bare = !directive.contains(['=', '[', '{']);
        if bare && !LEVELS.iter().any(|l| l.eq_ignore_ascii_case(directive)) {
            return Err(format!(
                "{directive:?} is not a level (trace, debug, info, warn, error or off); \
                 a target's level is written target=level"
            ));
        }
    }
    Ok(())
}

fn cidrs(key: &'static str, list: &[String]) -> Result<Vec<ipnet::IpNet>, ConfigError> {
    list.iter()
        .map(|n| {
            n.trim()
                .parse::<ipnet::IpNet>()
                .map_err(|_| invalid(key, cidr_problem(n)))
        })
        .collect()
}

/// What is wrong with `text`, which is not a CIDR. ipnet's own "invalid
/// IP address syntax" was said of a bare address and of a bad prefix
/// alike (review of 2026-12-03), where the address was fine.
fn cidr_problem(text: &str) -> String {
    let trimmed = text.trim();
    let (address, prefix) = match trimmed.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (trimmed, None),
    };
    let Ok(ip) = address.parse::<std::net::IpAddr>() else {
        return format!("{text:?} is not a CIDR like 10.0.0.0/8: {address:?} is not an IP address");
    };
    let bits = if ip.is_ipv4() { 32 } else { 128 };
    match prefix {
        None => format!(
            "{text:?} is an address, not a network: write {ip}/{bits} for that one address, or a network like 10.0.0.0/8"
        ),
        Some(p) => format!(
            "{text:?} is not a CIDR like 10.0.0.0/8: the prefix length {p:?} is not a number from 0 to {bits}"
        ),
    }
}

/// The most clock skew `auth.leeway_secs` may tolerate: a day.
pub(crate) const MAX_LEEWAY_SECS: u64 = 86_400;

fn invalid(key: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        problem: problem.into(),
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// The most requests to the backend a node may have in flight at once.
pub const MAX_BACKEND_CONCURRENCY: usize = 10_000;

/// The least `redis.publish_retry_ms`: a message waits at least its round
/// trip to Redis, and one older than the retry is dropped.
pub const MIN_PUBLISH_RETRY: Duration = Duration::from_millis(100);

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    /// The listen backlog (`listen_backlog`, at least 1).
    pub listen_backlog: u32,
    /// `TCP_NODELAY` on each accepted connection (`tcp_nodelay`).
    pub tcp_nodelay: bool,
    /// This node's id: configured, or generated at start.
    pub node_id: String,
    pub log_format: LogFormat,
    pub log_level: String,
    pub limits: Limits,
    pub ws: Ws,
    pub bus: BusConfig,
    /// `None`: history is off (`history.enabled = false`).
    pub history: Option<HistoryConfig>,
    /// Node leases (used by the node registry whenever Redis is configured)
    /// and the presence settings.
    pub presence: PresenceConfig,
    /// `None`: the in-process bus.
    pub redis: Option<RedisConfig>,
    /// `None`: no backend; every action is relayed.
    pub backend: Option<BackendConfig>,
    pub broadcast: Broadcast,
    pub auth: AuthConfig,
    pub shutdown: Shutdown,
    pub http: Http,
    /// `WSHUB_*` variables that were ignored, one line each, for the log
    /// once logging has started (see `env.rs`).
    pub env_warnings: Vec<String>,
    /// Settings that are valid but do nothing in the company they are in,
    /// one line each: logged at info at start and printed by `config
    /// check` ([`Config::from_raw`]).
    pub notes: Vec<String>,
}

/// What the hub serves besides sockets and the broadcast endpoint.
#[derive(Debug, Clone)]
pub struct Http {
    /// Serve the chat sample at `/`. A production hub serving only an
    /// application's pages turns it off, so that its address does not
    /// offer an open chat room to whoever finds it.
    pub sample_page: bool,
    /// How long a connection may take to send a whole request head, from
    /// when it opened or from its last response (an idle keep-alive
    /// connection is closed after it too, so it is longer than the idle
    /// timeouts of common balancers and client pools); `None`: no limit.
    /// Without one, a client that connects and sends nothing, or half a
    /// head, holds a task and a descriptor for as long as the node runs.
    pub header_read_timeout: Option<Duration>,
}

/// What [`Config::settings`] reports: one value per field of the start-up
/// log line, none of them secret.
#[derive(Debug, Clone)]
pub struct Settings {
    pub version: &'static str,
    /// `in-process`, or `redis <url>` with the password redacted.
    pub bus: String,
    pub backend: String,
    /// Who may use the broadcast endpoint.
    pub broadcast: String,
    /// Token or open mode.
    pub auth: String,
}

/// Where non-`broadcast` client messages go (see `src/backend.rs`).
#[derive(Debug, Clone)]
pub struct BackendConfig {
    pub url: String,
    /// Post `wshub.connect` / `wshub.disconnect` events.
    pub events: bool,
    /// Limit for one request, connecting included.
    pub timeout: Duration,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// Forwards waiting for a free request slot.
    pub queue: usize,
    /// Forwards one connection may have waiting (within `queue`).
    pub queue_per_connection: usize,
    /// `Some`: every request is signed (see `src/backend.rs`).
    pub signing_key: Option<Secret>,
    /// Static headers added to every request.
    pub headers: Vec<(String, Secret)>,
}

/// The Redis bus's settings (see `wshub.example.toml`). Its `Debug`
/// hides the password in `url`.
#[derive(Clone)]
pub struct RedisConfig {
    /// Empty with Sentinel when no scheme or credentials are needed.
    pub url: String,
    pub channel_prefix: String,
    /// Sharded pub/sub on a Redis Cluster.
    pub sharded: bool,
    /// Messages waiting to be published before publishing fails.
    pub publish_queue: usize,
    /// Bytes waiting to be published before publishing fails.
    pub publish_queue_bytes: usize,
    /// How long a message waits for Redis before it is dropped.
    pub publish_retry: Duration,
    pub probe_interval: Duration,
    /// No probe back for this long: the node is unready.
    pub probe_timeout: Duration,
    /// Cap on the reconnect backoff.
    pub reconnect_max: Duration,
    /// Limit on connecting and on each Redis command.
    pub command_timeout: Duration,
    /// Username and password beyond (overriding) the URL's.
    pub auth: RedisAuth,
    /// Certificates for `rediss://`.
    pub tls: RedisTls,
    /// Sentinel addresses (`host:port`); empty: no Sentinel.
    pub sentinels: Vec<String>,
    pub sentinel_master: String,
    /// TLS to the sentinels and the primary they name (with `tls`).
    pub sentinel_tls: bool,
}

impl RedisConfig {
    /// The URLs in `url` (one, or several separated by commas).
    pub fn urls(&self) -> Vec<String> {
        self.url
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(str::to_owned)
            .collect()
    }
}

#[derive(Debug, Clone)]
pub struct Ws {
    /// How often the server pings; a peer silent for a whole interval after
    /// a ping is closed.
    pub ping_interval: Duration,
    /// Longest one write may take; then the peer is a slow consumer.
    pub write_timeout: Duration,
    pub read_buffer_bytes: usize,
    pub write_buffer_bytes: usize,
    /// What a client may address when the hub relays its message
    /// (`ws.client_relay`; a token's `relay` claim overrides it).
    pub client_relay: crate::route::Relay,
}

#[derive(Debug, Clone)]
pub struct BusConfig {
    /// How long a topic with no local socket stays subscribed.
    pub unsubscribe_delay: Duration,
}

/// `[history]` when enabled: what each topic keeps and how far a resume
/// may reach back (`docs/resume.md`).
#[derive(Debug, Clone)]
pub struct HistoryConfig {
    /// Replay window by age; also how long a topic's history and a drain
    /// handoff live in Redis.
    pub ttl: Duration,
    /// Entries kept for the everyone topic.
    pub size_all: usize,
    /// Entries kept per group, the null group included.
    pub size_group: usize,
    /// Entries kept per user.
    pub size_user: usize,
    /// More than this to replay on one resume: not recovered.
    pub max_replay: usize,
    /// More than this many bytes of history to read for one resume: not
    /// recovered (the bound on what a client can make a node read and
    /// hold); 0: no bound but the history's own.
    pub max_replay_bytes: usize,
    /// The most bytes of replays a node holds for its sockets at once
    /// (read, not yet written); a resume that finds no room within
    /// `redis.command_timeout_ms` is not recovered. 0: no bound.
    pub replay_budget_bytes: usize,
    /// On SIGTERM, store each legacy socket's position for the next socket
    /// with its identity.
    pub drain_handoff: bool,
}

impl HistoryConfig {
    /// Entries kept for `topic`.
    pub fn size_of(&self, topic: &crate::route::Topic) -> usize {
        use crate::route::Topic;
        match topic {
            Topic::All => self.size_all,
            Topic::Group(_) => self.size_group,
            Topic::User(_) | Topic::Connection(_) => self.size_user,
        }
    }
}

/// `[presence]`: node leases and cluster presence. The node registry
/// (`GET /api/nodes`) uses `lease` and `heartbeat` whenever Redis is
/// configured, presence on or off; presence itself (`enabled`,
/// `leave_delay`, `max_members_events`, `docs/presence.md`) needs Redis.
#[derive(Debug, Clone)]
pub struct PresenceConfig {
    pub enabled: bool,
    /// A node whose heartbeats stopped this long is dead: it drops out of
    /// every cluster-wide answer.
    pub lease: Duration,
    /// How often a node renews its lease; at most half the lease.
    pub heartbeat: Duration,
    /// A user must be gone this long before `leave`.
    pub leave_delay: Duration,
    /// Groups with more members get no per-user join/leave frames.
    pub max_members_events: usize,
}

#[derive(Debug, Clone)]
pub struct Shutdown {
    /// Sockets are closed evenly over this window.
    pub drain_window: Duration,
    /// How long shutdown then waits for sessions to close before giving up.
    pub grace_period: Duration,
}

#[derive(Debug, Clone)]
pub struct Broadcast {
    /// Networks (besides loopback) whose peers may use the broadcast endpoint.
    pub trusted_networks: Vec<ipnet::IpNet>,
    /// Keys, one of which is required when any is configured.
    pub api_keys: Vec<String>,
}

/// Socket authentication and origin policy (see `src/auth.rs`).
#[derive(Debug, Clone, Default)]
pub struct AuthConfig {
    /// `Some`: token mode.
    pub jwt_key: Option<JwtKey>,
    pub jwt_algorithm: jsonwebtoken::Algorithm,
    pub audience: Option<String>,
    pub issuer: Option<String>,
    /// Clock skew tolerated on `exp` and `nbf`.
    pub leeway_secs: u64,
    /// Browser origins allowed to open sockets; empty: any.
    pub allowed_origins: Vec<String>,
    /// Proxies whose `X-Forwarded-For` names the client.
    pub trusted_proxies: Vec<ipnet::IpNet>,
}

/// A token verification key; its `Debug` never shows the secret.
#[derive(Clone)]
pub struct JwtKey(pub jsonwebtoken::DecodingKey);

impl std::fmt::Debug for JwtKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JwtKey(<redacted>)")
    }
}

impl std::ops::Deref for JwtKey {
    type Target = jsonwebtoken::DecodingKey;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl Default for Config {
    /// The built-in defaults.
    fn default() -> Self {
        Self::from_raw(RawConfig::default()).expect("the built-in defaults are valid")
    }
}

/// The process environment as the configuration reads it: every variable
/// whose name and value are Unicode. A `WSHUB_*` one that is not is
/// refused, by name; any other is skipped (`std::env::vars` panicked on
/// one, any one, and printed its value: review of 2026-12-03).
pub fn environment() -> Result<Vec<(String, String)>, ConfigError> {
    environment_from(std::env::vars_os())
}

fn environment_from(
    vars: impl IntoIterator<Item = (std::ffi::OsString, std::ffi::OsString)>,
) -> Result<Vec<(String, String)>, ConfigError> {
    let mut out = Vec::new();
    for (name, value) in vars {
        match (name.into_string(), value.into_string()) {
            (Ok(name), Ok(value)) => out.push((name, value)),
            (name, _) => {
                let name = name.unwrap_or_else(|n| n.to_string_lossy().into_owned());
                let prefix = ENV_PREFIX.len() + 1;
                // `WSHUB_CONFIG` is a path, which need not be UTF-8 on
                // Linux: read apart, as an `OsString` (`main.rs`).
                let ours = name.len() >= prefix
                    && name.is_char_boundary(prefix)
                    && name[..prefix].eq_ignore_ascii_case(&format!("{ENV_PREFIX}_"))
                    && !name.eq_ignore_ascii_case(ENV_CONFIG_FILE);
                if ours {
                    return Err(ConfigError::NotUnicode { name });
                }
            }
        }
    }
    Ok(out)
}

impl Config {
    /// Loads defaults, then `file` (if any), then the process environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_from(file, environment()?)
    }

    /// Like [`load`](Self::load), with the environment given explicitly.
    pub fn load_from(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let (raw, warnings) = Self::raw_from(file, env)?;
        let mut config = Self::from_raw(raw)?;
        config.env_warnings = warnings;
        Ok(config)
    }

    /// What the user wrote, merged (defaults, `file`, then `env`) but not
    /// validated yet, and the warnings about the environment.
    pub fn raw_from(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(RawConfig, Vec<String>), ConfigError> {
        let env = env::sort(env)?;
        // Where each key was set, for `refuse_mistyped_numbers`.
        let from_env: std::collections::HashSet<String> = env
            .known
            .keys()
            .map(|name| name.to_ascii_uppercase())
            .collect();
        let mut builder = config::Config::builder();
        if let Some(path) = file {
            // Checked here: the `config` crate's own error quotes the path,
            // which the redaction of quoted values then hides.
            let readable = std::fs::File::open(path).and_then(|file| {
                if file.metadata()?.is_dir() {
                    Err(std::io::Error::other("it is a directory"))
                } else {
                    Ok(())
                }
            });
            // TOML is UTF-8, and the `config` crate would replace what is
            // not with U+FFFD, silently: a secret written in Windows-1252
            // became another secret than the application signs with
            // (review of 2026-12-03).
            let text = readable.and_then(|()| std::fs::read(path)).and_then(|bytes| {
                std::str::from_utf8(&bytes).map(|_| ()).map_err(|e| {
                    std::io::Error::other(format!(
                        "it is not UTF-8 text, as TOML must be (the first byte that is not is at offset {}): save it as UTF-8",
                        e.valid_up_to()
                    ))
                })
            });
            if let Err(error) = text {
                return Err(ConfigError::File {
                    path: path.to_owned(),
                    error,
                });
            }
            builder = builder.add_source(config::File::from(path).format(config::FileFormat::Toml));
        }
        // No `try_parsing`: every value stays the string written, and
        // numbers and booleans are converted by their keys' types (see
        // `env.rs`). Lists were split by `env::sort`.
        builder = builder.add_source(
            config::Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("_")
                .separator("__")
                .source(Some(env.known)),
        );
        for (key, items) in env.lists {
            builder = builder.set_override(key, items)?;
        }
        let built = builder.build()?;
        refuse_mistyped_numbers(&built, |key| {
            let var = format!("{ENV_PREFIX}_{}", key.replace('.', "__")).to_ascii_uppercase();
            if from_env.contains(&var) {
                Some("the environment".to_owned())
            } else {
                file.map(|f| f.display().to_string())
            }
        })?;
        refuse_sections_as_lists(&built, file)?;
        let mut raw: RawConfig = built.try_deserialize()?;
        // A backend header set in the environment replaces the file's of
        // the same name, however the file spells it: the `config` crate
        // keeps a file's key as written (`Authorization`) and an
        // environment variable's in lower case, so both reached the
        // headers, and the node refused to start with one "set twice"
        // (review of 2026-12-02).
        // The crate's key for a variable is in lower case: a name with a
        // capital came from the file.
        let in_env = |name: &str| {
            let var = format!("{ENV_PREFIX}_BACKEND__HEADERS__{name}").to_ascii_uppercase();
            !name.bytes().any(|b| b.is_ascii_uppercase()) && from_env.contains(&var)
        };
        let replaced: Vec<String> = raw
            .backend
            .headers
            .keys()
            .filter(|name| in_env(name))
            .map(|name| trust::header_name(name))
            .collect();
        raw.backend
            .headers
            .retain(|name, _| in_env(name) || !replaced.contains(&trust::header_name(name)));
        Ok((raw, env.warnings))
    }

    /// Validates what the user wrote.
    pub fn from_raw(raw: RawConfig) -> Result<Self, ConfigError> {
        let raw = raw.in_effect();
        let notes = Self::notes_of(&raw);
        let listen = raw.listen.parse().map_err(|e| {
            invalid(
                "listen",
                format!("is not an address like 0.0.0.0:8080: {e}"),
            )
        })?;
        if raw.listen_backlog == 0 {
            return Err(invalid("listen_backlog", "must be at least 1"));
        }
        let log_format = match raw.log.format.to_ascii_lowercase().as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                return Err(invalid(
                    "log.format",
                    format!("must be text or json, not {other:?}"),
                ));
            }
        };
        check_log_level(&raw.log.level).map_err(|problem| invalid("log.level", problem))?;
        tracing_subscriber::EnvFilter::try_new(&raw.log.level)
            .map_err(|e| invalid("log.level", format!("is not a valid filter: {e}")))?;

        let l = &raw.limits;
        if l.max_message_bytes < 1024 {
            return Err(invalid("limits.max_message_bytes", "must be at least 1024"));
        }
        // The user ids the hub makes up for sockets that give none
        // (`http::identity_from_query`) must pass its own check.
        if !(crate::route::GENERATED_ID_LEN..=l.max_message_bytes).contains(&l.max_id_bytes) {
            return Err(invalid(
                "limits.max_id_bytes",
                format!(
                    "must be between {} (the length of the user ids the hub makes up for \
                     sockets that give none) and limits.max_message_bytes",
                    crate::route::GENERATED_ID_LEN
                ),
            ));
        }
        if l.max_recipients == 0 {
            return Err(invalid("limits.max_recipients", "must be at least 1"));
        }
        let message = crate::message::MessageLimits {
            max_id_bytes: l.max_id_bytes,
            max_recipients: l.max_recipients,
        };
        let min_queue = crate::outbox::min_budget(l.max_message_bytes, &message);
        if l.outbound_queue_bytes < min_queue {
            return Err(invalid(
                "limits.outbound_queue_bytes",
                format!(
                    "must be at least {min_queue}: room for one largest message as sent out \
                     (limits.max_message_bytes re-encoded with every field and recipient type \
                     written out, ids stamped in token mode, plus 64 bytes of bookkeeping)"
                ),
            ));
        }
        if l.connects_per_second_per_ip > 1_000_000 {
            return Err(invalid(
                "limits.connects_per_second_per_ip",
                "must be at most 1000000 (0: no limit)",
            ));
        }
        if !(1..=128).contains(&l.ipv6_prefix_len) {
            return Err(invalid(
                "limits.ipv6_prefix_len",
                "must be between 1 and 128",
            ));
        }
        if raw.ws.ping_interval_ms < 10 {
            return Err(invalid("ws.ping_interval_ms", "must be at least 10"));
        }
        if raw.ws.write_timeout_ms == 0 {
            return Err(invalid("ws.write_timeout_ms", "must be at least 1"));
        }
        if raw.ws.read_buffer_bytes < 256 {
            return Err(invalid("ws.read_buffer_bytes", "must be at least 256"));
        }
        let Some(client_relay) = crate::route::Relay::parse(raw.ws.client_relay.trim()) else {
            return Err(invalid("ws.client_relay", "must be all, group or none"));
        };
        let node_id = match raw.node_id.trim() {
            "" => format!("{:08x}", rand::random::<u32>()),
            // It is sent in the `X-Wshub-Node-Id` header, where a control
            // character made the header vanish from every response and
            // non-ASCII went out raw (review of 2026-12-02).
            id if id.len() > 64 || !id.bytes().all(|b| b.is_ascii_graphic()) => {
                return Err(invalid(
                    "node_id",
                    "must be at most 64 printable ASCII characters, without spaces",
                ));
            }
            id => id.to_owned(),
        };
        if l.max_fanout_bytes < l.max_message_bytes {
            return Err(invalid(
                "limits.max_fanout_bytes",
                "must be at least limits.max_message_bytes (one message to one target must fit)",
            ));
        }
        if l.fanout_bytes_per_second > 0 && l.fanout_bytes_burst < l.max_fanout_bytes as u64 {
            return Err(invalid(
                "limits.fanout_bytes_burst",
                "must be at least limits.max_fanout_bytes (the largest message must fit)",
            ));
        }
        let redis = Self::redis_from_raw(&raw.redis)?;
        // Only with Redis: the in-process bus has no such queue, and a
        // node without Redis that raised limits.max_fanout_bytes above it
        // was refused (review of 2026-12-03).
        if redis
            .as_ref()
            .is_some_and(|r| r.publish_queue_bytes < l.max_fanout_bytes)
        {
            return Err(invalid(
                "redis.publish_queue_bytes",
                "must be at least limits.max_fanout_bytes (the largest message must fit)",
            ));
        }
        let backend = Self::backend_from_raw(&raw.backend)?;
        let trusted_networks = cidrs(
            "broadcast.trusted_networks",
            &raw.broadcast.trusted_networks,
        )?;
        let api_keys: Vec<String> = raw
            .broadcast
            .api_keys
            .iter()
            .map(|k| k.trim().to_owned())
            .collect();
        if api_keys.iter().any(|k| k.len() < 16) {
            return Err(invalid(
                "broadcast.api_keys",
                "each key must be at least 16 characters",
            ));
        }
        // A key travels in a header, which holds visible ASCII: any other
        // character could never match (a review's `ключ-…` passed the
        // check and locked its operator out).
        if api_keys
            .iter()
            .any(|k| !k.bytes().all(|b| b.is_ascii_graphic()))
        {
            return Err(invalid(
                "broadcast.api_keys",
                "a key may hold only visible ASCII characters (no spaces or letters outside ASCII): it is sent in a header",
            ));
        }
        let auth = Self::auth_from_raw(&raw.auth)?;
        let history = Self::history_from_raw(&raw.history, redis.as_ref())?;
        let presence = Self::presence_from_raw(&raw.presence)?;
        // Presence and the per-user limit are cluster-wide state kept in
        // Redis; a single node without Redis refuses them at start rather
        // than counting only its own sockets while claiming the cluster's.
        if redis.is_none() {
            if presence.enabled {
                return Err(invalid(
                    "presence.enabled",
                    "presence is kept in Redis: set redis.url (or redis.sentinels), or turn presence off",
                ));
            }
            if l.max_connections_per_user > 0 {
                return Err(invalid(
                    "limits.max_connections_per_user",
                    "the per-user limit is counted in Redis: set redis.url (or redis.sentinels), or set it to 0",
                ));
            }
        }
        Ok(Config {
            history,
            presence,
            broadcast: Broadcast {
                trusted_networks,
                api_keys,
            },
            auth,
            listen,
            listen_backlog: raw.listen_backlog,
            tcp_nodelay: raw.tcp_nodelay,
            node_id,
            redis,
            backend,
            log_format,
            log_level: raw.log.level,
            limits: l.clone(),
            ws: Ws {
                ping_interval: Duration::from_millis(raw.ws.ping_interval_ms),
                write_timeout: Duration::from_millis(raw.ws.write_timeout_ms),
                read_buffer_bytes: raw.ws.read_buffer_bytes,
                write_buffer_bytes: raw.ws.write_buffer_bytes,
                client_relay,
            },
            bus: BusConfig {
                unsubscribe_delay: Duration::from_millis(raw.bus.unsubscribe_delay_ms),
            },
            shutdown: Shutdown {
                drain_window: Duration::from_millis(raw.shutdown.drain_window_ms),
                grace_period: Duration::from_millis(raw.shutdown.grace_period_ms),
            },
            http: Http {
                sample_page: raw.http.sample_page,
                header_read_timeout: (raw.http.header_read_timeout_ms > 0)
                    .then(|| Duration::from_millis(raw.http.header_read_timeout_ms)),
            },
            env_warnings: Vec::new(),
            notes,
        })
    }

    /// Keys that are valid but do nothing as combined, one line each.
    fn notes_of(raw: &RawConfig) -> Vec<String> {
        let mut notes = Vec::new();
        // Events asked for and posted nowhere went without a word (review
        // of 2026-12-03). Neither refused nor a warning: the shipped
        // compose file turns them on and takes the URL from the
        // environment, empty when there is no backend.
        if raw.backend.events && raw.backend.url.trim().is_empty() {
            notes.push(
                "backend.events is on but backend.url is empty: no events are posted until a backend URL is set".to_owned(),
            );
        }
        notes
    }

    fn history_from_raw(
        raw: &RawHistory,
        redis: Option<&RedisConfig>,
    ) -> Result<Option<HistoryConfig>, ConfigError> {
        // The bounds hold with history off too (as redis.*'s).
        if raw.ttl_ms == 0 {
            return Err(invalid("history.ttl_ms", "must be at least 1"));
        }
        for (key, size) in [
            ("history.size_all", raw.size_all),
            ("history.size_group", raw.size_group),
            ("history.size_user", raw.size_user),
        ] {
            if size == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        if raw.replay_budget_bytes != 0
            && raw.max_replay_bytes != 0
            && raw.replay_budget_bytes < raw.max_replay_bytes
        {
            return Err(invalid(
                "history.replay_budget_bytes",
                "must be 0 or at least history.max_replay_bytes (a replay of that size could never fit)",
            ));
        }
        if !raw.enabled {
            return Ok(None);
        }
        if redis.is_none() {
            return Err(invalid(
                "history.enabled",
                "history is kept in Redis: set redis.url (or redis.sentinels), or turn history off",
            ));
        }
        Ok(Some(HistoryConfig {
            ttl: Duration::from_millis(raw.ttl_ms),
            size_all: raw.size_all,
            size_group: raw.size_group,
            size_user: raw.size_user,
            max_replay: raw.max_replay,
            max_replay_bytes: raw.max_replay_bytes,
            replay_budget_bytes: raw.replay_budget_bytes,
            drain_handoff: raw.drain_handoff,
        }))
    }

    fn presence_from_raw(raw: &RawPresence) -> Result<PresenceConfig, ConfigError> {
        if raw.heartbeat_ms < 10 {
            return Err(invalid("presence.heartbeat_ms", "must be at least 10"));
        }
        // One late or lost heartbeat must not make a live node look dead.
        if raw.lease_ms < raw.heartbeat_ms.saturating_mul(2) {
            return Err(invalid(
                "presence.lease_ms",
                "must be at least twice presence.heartbeat_ms (one late heartbeat must not make a live node look dead)",
            ));
        }
        Ok(PresenceConfig {
            enabled: raw.enabled,
            lease: Duration::from_millis(raw.lease_ms),
            heartbeat: Duration::from_millis(raw.heartbeat_ms),
            leave_delay: Duration::from_millis(raw.leave_delay_ms),
            max_members_events: raw.max_members_events,
        })
    }

    fn redis_from_raw(raw: &RawRedis) -> Result<Option<RedisConfig>, ConfigError> {
        // The bounds hold with or without a URL, as backend.*'s: a
        // template that leaves the URL to its environment passed `config
        // check` with a bad value, and the node refused to start once the
        // URL came (review of 2026-12-03).
        if raw.channel_prefix.is_empty() || raw.channel_prefix.contains(['{', '}']) {
            return Err(invalid(
                "redis.channel_prefix",
                "must be non-empty and without braces (they would pin every channel to one cluster slot)",
            ));
        }
        if raw.publish_queue == 0 {
            return Err(invalid("redis.publish_queue", "must be at least 1"));
        }
        if Duration::from_millis(raw.publish_retry_ms) < MIN_PUBLISH_RETRY {
            // 0 dropped every message before it was sent, Redis healthy
            // (review of 2026-12-03): a message waits at least its round
            // trip.
            return Err(invalid(
                "redis.publish_retry_ms",
                format!(
                    "must be at least {} (a message waits for its round trip to Redis; below it, messages are dropped while Redis is healthy)",
                    MIN_PUBLISH_RETRY.as_millis()
                ),
            ));
        }
        if raw.probe_interval_ms == 0 {
            return Err(invalid("redis.probe_interval_ms", "must be at least 1"));
        }
        if raw.probe_timeout_ms <= raw.probe_interval_ms {
            return Err(invalid(
                "redis.probe_timeout_ms",
                "must be longer than redis.probe_interval_ms",
            ));
        }
        if raw.reconnect_max_ms == 0 || raw.command_timeout_ms == 0 {
            return Err(invalid(
                "redis.reconnect_max_ms",
                "and redis.command_timeout_ms must be at least 1",
            ));
        }
        if raw.url.trim().is_empty() && raw.sentinels.is_empty() {
            // Refuses redis.sentinel_tls or sentinel_master without
            // sentinels (a blank list included).
            trust::sentinels(raw)?;
            return Ok(None);
        }
        let config = RedisConfig {
            url: raw.url.trim().to_owned(),
            channel_prefix: raw.channel_prefix.clone(),
            sharded: raw.sharded,
            publish_queue: raw.publish_queue,
            publish_queue_bytes: raw.publish_queue_bytes,
            publish_retry: Duration::from_millis(raw.publish_retry_ms),
            probe_interval: Duration::from_millis(raw.probe_interval_ms),
            probe_timeout: Duration::from_millis(raw.probe_timeout_ms),
            reconnect_max: Duration::from_millis(raw.reconnect_max_ms),
            command_timeout: Duration::from_millis(raw.command_timeout_ms),
            auth: trust::redis_auth(raw)?,
            tls: trust::redis_tls(raw)?,
            sentinels: trust::sentinels(raw)?,
            sentinel_master: raw.sentinel_master.trim().to_owned(),
            sentinel_tls: raw.sentinel_tls,
        };
        let urls = config.urls();
        if config.sentinels.is_empty() && urls.is_empty() {
            // Only blanks (`","`, `sentinels = [" "]`): a sharded node
            // would start with no node to reach and never be ready.
            return Err(invalid(
                "redis.url",
                "holds no URL (and redis.sentinels no sentinel): give one, or neither for the in-process bus",
            ));
        }
        if config.sentinels.is_empty() && !config.sharded && urls.len() != 1 {
            return Err(invalid(
                "redis.url",
                "must be one URL unless redis.sharded is set",
            ));
        }
        for url in &urls {
            // The Redis client reads `rediss://…#insecure` as "skip the
            // certificate checks", silently, and redacted logs show it as
            // `#***` (review of 2026-12-03): the one way to skip them is
            // the key that says so and warns.
            if url.contains('#') {
                return Err(invalid(
                    "redis.url",
                    "must not have a fragment (`#…`): `#insecure` would turn off the TLS certificate checks unannounced; \
                     set redis.tls_insecure_skip_verify (a test setup only; warned at start). A `#` in a password is written %23, \
                     or the password goes in redis.password",
                ));
            }
            let client = redis::Client::open(url.as_str()).map_err(|e| {
                invalid(
                    "redis.url",
                    format!(
                        "{:?} is not a Redis URL: {}",
                        redact_redis_urls(url),
                        redact_urls(&e.to_string())
                    ),
                )
            })?;
            // Passed here and failed every connect (review of 2026-12-03).
            if config.sharded && client.get_connection_info().redis_settings().db() != 0 {
                return Err(invalid(
                    "redis.url",
                    "names a database other than 0, which a Redis Cluster does not have (leave the /db out with redis.sharded)",
                ));
            }
        }
        Ok(Some(config))
    }

    fn auth_from_raw(raw: &RawAuth) -> Result<AuthConfig, ConfigError> {
        use jsonwebtoken::{Algorithm, DecodingKey};
        // Exactly as written: tokens are signed with the secret as the
        // issuer has it (review of 2026-12-02: a trailing space was
        // trimmed here, and every token was refused).
        let secret = raw.jwt_secret.as_str();
        let key_file = raw.jwt_public_key_file.trim();
        let algorithm = match (raw.jwt_algorithm.trim(), secret.is_empty()) {
            ("", false) => Algorithm::HS256,
            ("", true) => Algorithm::RS256,
            (name, _) => match name.to_ascii_uppercase().as_str() {
                "HS256" => Algorithm::HS256,
                "RS256" => Algorithm::RS256,
                "ES256" => Algorithm::ES256,
                _ => {
                    return Err(invalid(
                        "auth.jwt_algorithm",
                        "must be HS256, RS256 or ES256",
                    ));
                }
            },
        };
        let jwt_key = match (secret, key_file) {
            ("", "") => None,
            (s, "") => {
                if algorithm != Algorithm::HS256 {
                    return Err(invalid(
                        "auth.jwt_algorithm",
                        "must be HS256 with auth.jwt_secret",
                    ));
                }
                if s.len() < 32 {
                    return Err(invalid("auth.jwt_secret", "must be at least 32 characters"));
                }
                let key = DecodingKey::from_secret(s.as_bytes())
                    .map_err(|e| invalid("auth.jwt_secret", format!("is not usable: {e}")))?;
                Some(JwtKey(key))
            }
            ("", path) => {
                let pem = std::fs::read(path).map_err(|e| {
                    invalid(
                        "auth.jwt_public_key_file",
                        format!("cannot read {path:?}: {e}"),
                    )
                })?;
                check_public_key(&pem, algorithm).map_err(|problem| {
                    invalid("auth.jwt_public_key_file", format!("{path:?} {problem}"))
                })?;
                let key = match algorithm {
                    Algorithm::RS256 => DecodingKey::from_rsa_pem(&pem),
                    Algorithm::ES256 => DecodingKey::from_ec_pem(&pem),
                    _ => {
                        return Err(invalid(
                            "auth.jwt_algorithm",
                            "must be RS256 or ES256 with a public key file",
                        ));
                    }
                }
                .map_err(|e| {
                    invalid(
                        "auth.jwt_public_key_file",
                        format!("{path:?} is not a {algorithm:?} public key: {e}"),
                    )
                })?;
                Some(JwtKey(key))
            }
            _ => {
                return Err(invalid(
                    "auth.jwt_secret",
                    "and auth.jwt_public_key_file cannot both be set",
                ));
            }
        };
        if raw.leeway_secs > MAX_LEEWAY_SECS {
            // jsonwebtoken subtracts the leeway from the clock unchecked: a
            // leeway past the epoch's age wrapped around and refused every
            // token as expired.
            return Err(invalid(
                "auth.leeway_secs",
                format!(
                    "must be at most {MAX_LEEWAY_SECS} (a day of clock skew), not {}",
                    raw.leeway_secs
                ),
            ));
        }
        let non_empty = |s: &str| Some(s.trim().to_owned()).filter(|s| !s.is_empty());
        Ok(AuthConfig {
            jwt_key,
            jwt_algorithm: algorithm,
            audience: non_empty(&raw.audience),
            issuer: non_empty(&raw.issuer),
            leeway_secs: raw.leeway_secs,
            allowed_origins: raw
                .allowed_origins
                .iter()
                .map(|o| origin_entry(o.trim()))
                .collect::<Result<_, _>>()?,
            trusted_proxies: cidrs("auth.trusted_proxies", &raw.trusted_proxies)?,
        })
    }

    fn backend_from_raw(raw: &RawBackend) -> Result<Option<BackendConfig>, ConfigError> {
        // The bounds hold with or without a URL: a file whose backend keys
        // were wrong passed `config check` while the URL was empty, and
        // the node refused to start only once the URL came (from the
        // environment of another deployment, say; review of 2026-12-03).
        if raw.timeout_ms == 0 {
            return Err(invalid("backend.timeout_ms", "must be at least 1"));
        }
        // Each unit is a worker task and, at once, a descriptor: a value
        // beyond any real backend's capacity only exhausts memory or files
        // (100,000,000 aborted the node on start).
        if !(1..=MAX_BACKEND_CONCURRENCY).contains(&raw.concurrency) {
            return Err(invalid(
                "backend.concurrency",
                format!("must be between 1 and {MAX_BACKEND_CONCURRENCY}"),
            ));
        }
        if raw.queue == 0 {
            return Err(invalid("backend.queue", "must be at least 1"));
        }
        if raw.queue_per_connection == 0 {
            return Err(invalid(
                "backend.queue_per_connection",
                "must be at least 1",
            ));
        }
        let (signing_key, headers) = trust::backend_trust(raw)?;
        let url = raw.url.trim();
        if url.is_empty() {
            return Ok(None);
        }
        // `http:///x` parses with `x` as its host (the URL standard skips
        // the empty authority): refused, as it names no host.
        // Likewise `http:/x`, `http:x` and `http:\\x`: a host follows `//`.
        let empty_authority = match url.split_once("://") {
            None => true,
            Some((_, rest)) => rest.is_empty() || rest.starts_with(['/', '?', '#', '\\']),
        };
        match reqwest::Url::parse(url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.has_host() && !empty_authority => {
            }
            _ => {
                return Err(invalid(
                    "backend.url",
                    format!(
                        "{} is not an http(s) URL",
                        redact_url_and_query(&format!("{url:?}"))
                    ),
                ));
            }
        }
        Ok(Some(BackendConfig {
            url: url.to_owned(),
            events: raw.events,
            timeout: Duration::from_millis(raw.timeout_ms),
            concurrency: raw.concurrency,
            queue: raw.queue,
            queue_per_connection: raw.queue_per_connection,
            signing_key,
            headers,
        }))
    }

    /// The effective settings an operator checks first, for the one start-up
    /// log line. Secrets never appear: API keys and the JWT secret only as
    /// counts or modes, URLs with their passwords as `***`.
    pub fn settings(&self) -> Settings {
        let bus = match &self.redis {
            None => "in-process".to_owned(),
            Some(r) if !r.sentinels.is_empty() => format!(
                "redis via sentinels {} (master {:?})",
                r.sentinels.join(","),
                r.sentinel_master
            ),
            Some(r) => format!(
                "redis{} {}",
                if r.sharded { " (sharded)" } else { "" },
                redact_redis_urls(&r.url)
            ),
        };
        let backend = match &self.backend {
            None => "none (actions are relayed)".to_owned(),
            Some(b) => format!(
                "{}{}{}",
                redact_url_and_query(&b.url),
                if b.events { " with events" } else { "" },
                if b.signing_key.is_some() {
                    ", signed"
                } else {
                    ""
                }
            ),
        };
        let b = &self.broadcast;
        let broadcast = if b.api_keys.is_empty() {
            let nets: Vec<String> = b.trusted_networks.iter().map(|n| n.to_string()).collect();
            if nets.is_empty() {
                "loopback only".to_owned()
            } else {
                format!("loopback and {}", nets.join(", "))
            }
        } else {
            format!("API key required ({} configured)", b.api_keys.len())
        };
        let auth = match &self.auth.jwt_key {
            None => "open (no token required)".to_owned(),
            Some(_) => format!("token ({:?})", self.auth.jwt_algorithm),
        };
        Settings {
            version: env!("CARGO_PKG_VERSION"),
            bus,
            backend,
            broadcast,
            auth,
        }
    }

    /// The limits a parsed message must respect.
    pub fn message_limits(&self) -> crate::message::MessageLimits {
        crate::message::MessageLimits {
            max_id_bytes: self.limits.max_id_bytes,
            max_recipients: self.limits.max_recipients,
        }
    }
}

#[cfg(test)]
mod tests;
