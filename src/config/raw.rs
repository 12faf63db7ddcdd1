//! What the user wrote: the keys of the configuration file and of the
//! `WSHUB_*` variables, with their defaults. Unknown keys are refused
//! (`deny_unknown_fields`); the field docs are the key docs, and
//! `wshub.example.toml` must list the same keys and defaults (a test
//! checks it).

use serde::{Deserialize, Serialize};

/// What the user wrote, before validation. Field docs are the key docs.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawConfig {
    /// Address and port to listen on.
    pub listen: String,
    /// Connections the kernel holds for the node before it accepts them
    /// (the listen backlog; the kernel caps it at `net.core.somaxconn`).
    pub listen_backlog: u32,
    /// Send every frame at once (`TCP_NODELAY` on each accepted
    /// connection); off: the kernel may hold a small frame back until the
    /// peer acknowledges the previous one (Nagle).
    pub tcp_nodelay: bool,
    /// This node's id in logs and on the bus; empty = generated.
    pub node_id: String,
    pub log: RawLog,
    pub limits: Limits,
    pub ws: RawWs,
    pub bus: RawBus,
    pub history: RawHistory,
    pub presence: RawPresence,
    pub redis: RawRedis,
    pub backend: RawBackend,
    pub broadcast: RawBroadcast,
    pub auth: RawAuth,
    pub shutdown: RawShutdown,
    pub http: RawHttp,
}

/// `[http]`: what the hub serves besides sockets and the broadcast endpoint.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawHttp {
    /// Serve the chat sample at `/` (off: `/` answers 404).
    pub sample_page: bool,
    /// Close a connection that has not sent a whole request head this
    /// long after it opened or after its last response (0: never).
    pub header_read_timeout_ms: u64,
}

impl Default for RawHttp {
    fn default() -> Self {
        Self {
            sample_page: true,
            header_read_timeout_ms: 120_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawBackend {
    /// Empty: every action is relayed by the hub.
    pub url: String,
    pub events: bool,
    pub timeout_ms: u64,
    pub concurrency: usize,
    pub queue: usize,
    /// Forwards one connection may have waiting (part of `queue`).
    pub queue_per_connection: usize,
    /// HMAC-SHA256 key: every request carries `X-Wshub-Timestamp` and
    /// `X-Wshub-Signature` (docs/backend.md). Empty: unsigned.
    pub signing_key: String,
    /// Static headers added to every request (e.g. `Authorization`).
    pub headers: std::collections::BTreeMap<String, String>,
}

impl Default for RawBackend {
    fn default() -> Self {
        Self {
            url: String::new(),
            events: false,
            timeout_ms: 5_000,
            concurrency: 64,
            queue: 1024,
            queue_per_connection: 32,
            signing_key: String::new(),
            headers: std::collections::BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawRedis {
    /// Empty: the in-process bus (one node). Otherwise `redis://host:port`;
    /// with `sharded`, one or more cluster nodes separated by commas.
    pub url: String,
    pub channel_prefix: String,
    pub sharded: bool,
    pub publish_queue: usize,
    /// Bytes of messages waiting to be published (payload and channel
    /// names); beyond it senders are refused as overloaded.
    pub publish_queue_bytes: usize,
    pub publish_retry_ms: u64,
    pub probe_interval_ms: u64,
    pub probe_timeout_ms: u64,
    pub reconnect_max_ms: u64,
    pub command_timeout_ms: u64,
    /// ACL user (Redis 6+); empty: the URL's, or `default`.
    pub username: String,
    /// Password; overrides one in the URL. Prefer `password_file`.
    pub password: String,
    /// A file holding the password (a mounted Kubernetes Secret); one
    /// trailing newline is trimmed.
    pub password_file: String,
    /// PEM file of the CA(s) that signed Redis's certificate (`rediss://`);
    /// empty: the Mozilla roots built in (webpki-roots).
    pub tls_ca_file: String,
    /// PEM certificate (chain) and key for mutual TLS; both or neither.
    pub tls_client_cert_file: String,
    pub tls_client_key_file: String,
    /// Accept any certificate from Redis. For tests only; warned at start.
    pub tls_insecure_skip_verify: bool,
    /// Sentinel addresses (`host:port`); set: the primary is found through
    /// them, and `url` is empty or gives only the scheme and credentials.
    pub sentinels: Vec<String>,
    /// The master name the sentinels monitor.
    pub sentinel_master: String,
    /// TLS to the sentinels and to the servers they name, with the
    /// `tls_*` keys above.
    pub sentinel_tls: bool,
}

impl Default for RawRedis {
    fn default() -> Self {
        Self {
            url: String::new(),
            channel_prefix: "wshub".into(),
            sharded: false,
            publish_queue: 65_536,
            publish_queue_bytes: 64 * 1024 * 1024,
            publish_retry_ms: 5_000,
            probe_interval_ms: 500,
            probe_timeout_ms: 2_000,
            reconnect_max_ms: 1_000,
            command_timeout_ms: 2_000,
            username: String::new(),
            password: String::new(),
            password_file: String::new(),
            tls_ca_file: String::new(),
            tls_client_cert_file: String::new(),
            tls_client_key_file: String::new(),
            tls_insecure_skip_verify: false,
            sentinels: Vec::new(),
            sentinel_master: String::new(),
            sentinel_tls: false,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawLog {
    /// `text` or `json`.
    pub format: String,
    /// A `tracing` filter directive, e.g. `info` or `wshub=debug,info`.
    pub level: String,
}

/// `[limits]`: as written and, once validated, as used (every value is
/// used as it is).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest message a client or the broadcast endpoint may send.
    pub max_message_bytes: usize,
    /// Longest id (`userId`, `groupId`, `action`, recipient values, query ids).
    pub max_id_bytes: usize,
    /// Most recipients in one message.
    pub max_recipients: usize,
    /// Most bytes one message may put on the bus: its encoded size times
    /// the topics of its route (on Redis each topic is one PUBLISH carrying
    /// the whole payload).
    pub max_fanout_bytes: usize,
    /// Bytes queued per connection before it is closed as a slow consumer.
    pub outbound_queue_bytes: usize,
    /// Sockets this node accepts (0: what the open-file limit allows,
    /// computed at start).
    pub max_connections: usize,
    /// Sockets from one client address (0: no limit).
    pub max_connections_per_ip: usize,
    /// Open HTTP connections that are not sockets (a request being read
    /// or answered, an idle keep-alive, an upgrade not yet answered) from
    /// one peer address, not counting `auth.trusted_proxies` (0: no
    /// limit). Over it a new TCP connection is closed at once.
    pub max_http_connections_per_ip: usize,
    /// IPv6 clients are counted per network of this many bits (an IPv4
    /// client per address).
    pub ipv6_prefix_len: u8,
    /// Sustained socket connects (upgrade requests) per second from one
    /// client address, on this node (0: no limit).
    pub connects_per_second_per_ip: u32,
    /// Connects one client address may make at once above that rate.
    pub connect_burst_per_ip: u32,
    /// Sustained messages per second a socket may send (0: no limit).
    pub messages_per_second: u32,
    /// Messages a socket may send at once above the sustained rate.
    pub message_burst: u32,
    /// Rate-limited messages (net of allowed ones) before the socket is
    /// closed with 1008.
    pub rate_violations_before_close: u32,
    /// Sustained fan-out bytes (encoded size × targets) per second one
    /// socket may publish (0: no limit).
    pub fanout_bytes_per_second: u64,
    /// Fan-out bytes a socket may publish at once above the sustained rate;
    /// at least `max_fanout_bytes`.
    pub fanout_bytes_burst: u64,
    /// Sockets one user may hold across the cluster (0: no limit; needs
    /// Redis).
    pub max_connections_per_user: usize,
    /// What the socket over `max_connections_per_user` does.
    pub per_user_policy: PerUserPolicy,
}

/// `limits.per_user_policy`: what happens to the socket that would put a
/// user over `limits.max_connections_per_user`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case", try_from = "String")]
pub enum PerUserPolicy {
    /// The user's oldest socket anywhere in the cluster is closed with
    /// 4003 `Session replaced`; the new one is accepted.
    #[default]
    ReplaceOldest,
    /// The new socket is refused with HTTP 429.
    Refuse,
}

impl TryFrom<String> for PerUserPolicy {
    type Error = String;

    /// `replace_oldest` or `refuse`, in any letter case; anything else is
    /// refused with the values that are accepted (serde's own message
    /// named the Rust enum).
    fn try_from(text: String) -> Result<Self, String> {
        match text.trim().to_ascii_lowercase().as_str() {
            "replace_oldest" => Ok(Self::ReplaceOldest),
            "refuse" => Ok(Self::Refuse),
            _ => Err("must be replace_oldest or refuse".into()),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawWs {
    pub ping_interval_ms: u64,
    /// Longest one write (a batch of frames, a ping) may take before the
    /// socket is closed as a slow consumer.
    pub write_timeout_ms: u64,
    pub read_buffer_bytes: usize,
    pub write_buffer_bytes: usize,
    /// What a client may address when the hub relays its message: `all`,
    /// `group` or `none` (a token's `relay` claim overrides it).
    pub client_relay: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawBus {
    pub unsubscribe_delay_ms: u64,
}

/// `[history]`: per-topic message history in Redis, for lossless resume
/// (`docs/resume.md`). Off by default; needs Redis.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawHistory {
    pub enabled: bool,
    pub ttl_ms: u64,
    pub size_all: usize,
    pub size_group: usize,
    pub size_user: usize,
    pub max_replay: usize,
    pub max_replay_bytes: usize,
    pub replay_budget_bytes: usize,
    pub drain_handoff: bool,
}

/// `[presence]`: node leases (the node registry, on whenever Redis is
/// configured) and cluster presence (off by default; needs Redis).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawPresence {
    /// Cluster presence (`docs/presence.md`).
    pub enabled: bool,
    /// A node whose heartbeats stopped this long is dead.
    pub lease_ms: u64,
    /// How often a node renews its lease.
    pub heartbeat_ms: u64,
    /// A user must be gone this long before `leave`.
    pub leave_delay_ms: u64,
    /// Bigger groups get no per-user join/leave frames.
    pub max_members_events: usize,
}

impl Default for RawPresence {
    fn default() -> Self {
        Self {
            enabled: false,
            lease_ms: 10_000,
            heartbeat_ms: 2_000,
            leave_delay_ms: 5_000,
            max_members_events: 200,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawShutdown {
    pub drain_window_ms: u64,
    pub grace_period_ms: u64,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawBroadcast {
    /// CIDRs (besides loopback) allowed to use the broadcast endpoint.
    pub trusted_networks: Vec<String>,
    /// With any key here, the endpoint requires one (from any network).
    pub api_keys: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawAuth {
    /// HS256 shared secret; turns token mode on.
    pub jwt_secret: String,
    /// PEM public key file (RS256/ES256); turns token mode on.
    pub jwt_public_key_file: String,
    /// Empty: HS256 with a secret, RS256 with a key file.
    pub jwt_algorithm: String,
    pub audience: String,
    pub issuer: String,
    pub leeway_secs: u64,
    pub allowed_origins: Vec<String>,
    pub trusted_proxies: Vec<String>,
}

impl Default for RawAuth {
    fn default() -> Self {
        Self {
            jwt_secret: String::new(),
            jwt_public_key_file: String::new(),
            jwt_algorithm: String::new(),
            audience: String::new(),
            issuer: String::new(),
            leeway_secs: 30,
            allowed_origins: Vec::new(),
            trusted_proxies: Vec::new(),
        }
    }
}

impl RawConfig {
    /// The values that are taken as another where they are written: a
    /// burst of 0 is 1, and so are 0 rate violations before a close (the
    /// first closes); a per-connection backend queue above the whole
    /// queue is the whole queue. Validation and `wshub config check` both
    /// start from this, so what check prints is what the node runs with.
    pub fn in_effect(mut self) -> Self {
        self.limits.message_burst = self.limits.message_burst.max(1);
        self.limits.connect_burst_per_ip = self.limits.connect_burst_per_ip.max(1);
        self.limits.rate_violations_before_close = self.limits.rate_violations_before_close.max(1);
        self.backend.queue_per_connection =
            self.backend.queue_per_connection.min(self.backend.queue);
        self
    }
}

impl Default for RawConfig {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:8080".into(),
            listen_backlog: 4096,
            tcp_nodelay: true,
            node_id: String::new(),
            log: RawLog::default(),
            limits: Limits::default(),
            ws: RawWs::default(),
            bus: RawBus::default(),
            history: RawHistory::default(),
            presence: RawPresence::default(),
            redis: RawRedis::default(),
            backend: RawBackend::default(),
            broadcast: RawBroadcast::default(),
            auth: RawAuth::default(),
            shutdown: RawShutdown::default(),
            http: RawHttp::default(),
        }
    }
}

impl Default for RawLog {
    fn default() -> Self {
        Self {
            format: "text".into(),
            level: "info".into(),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_bytes: 64 * 1024,
            max_id_bytes: 256,
            max_recipients: 100,
            max_fanout_bytes: 1024 * 1024,
            outbound_queue_bytes: 1024 * 1024,
            max_connections: 0,
            max_connections_per_ip: 0,
            max_http_connections_per_ip: 0,
            ipv6_prefix_len: 64,
            connects_per_second_per_ip: 0,
            connect_burst_per_ip: 20,
            messages_per_second: 50,
            message_burst: 100,
            rate_violations_before_close: 100,
            // 1 MiB/s, 4 MiB at once: see docs/security.md#rate-limits.
            fanout_bytes_per_second: 1024 * 1024,
            fanout_bytes_burst: 4 * 1024 * 1024,
            max_connections_per_user: 0,
            per_user_policy: PerUserPolicy::ReplaceOldest,
        }
    }
}

impl Default for RawWs {
    fn default() -> Self {
        Self {
            ping_interval_ms: 30_000,
            write_timeout_ms: 30_000,
            // 256 B keeps an idle socket under 4 KiB of memory; a frame
            // larger than this costs one more read call, nothing else.
            read_buffer_bytes: 256,
            write_buffer_bytes: 16 * 1024,
            client_relay: "all".into(),
        }
    }
}

impl Default for RawBus {
    fn default() -> Self {
        Self {
            unsubscribe_delay_ms: 2_000,
        }
    }
}

impl Default for RawHistory {
    fn default() -> Self {
        Self {
            enabled: false,
            ttl_ms: 120_000,
            size_all: 1000,
            size_group: 300,
            size_user: 100,
            max_replay: 1000,
            max_replay_bytes: 0,
            replay_budget_bytes: 256 * 1024 * 1024,
            drain_handoff: true,
        }
    }
}

impl Default for RawShutdown {
    fn default() -> Self {
        Self {
            drain_window_ms: 5_000,
            grace_period_ms: 10_000,
        }
    }
}
