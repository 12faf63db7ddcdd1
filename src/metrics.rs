//! What the node counts, exported in Prometheus text format at `GET /metrics`.
//!
//! Every node owns its own registry (no process-global recorder), so several
//! nodes in one test process count separately. Labels only ever take values
//! from fixed sets (close reasons, drop reasons, HTTP statuses): never a
//! user, group or connection id, so cardinality stays bounded.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::outcome::{
    BroadcastStatus, CloseReason, DropReason, ForwardResult, HandoffResult, HeadError,
    RefusalReason, ResumeResult,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CloseLabel {
    code: u16,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabel {
    version: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabel {
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AnsweredLabel {
    answered_by: &'static str,
}

/// What became of a gap the bus found in a topic's positions (history on).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GapKind {
    /// The missing messages were read from history and delivered, in order.
    Repaired,
    /// History no longer had them (trimmed, expired, or started afresh):
    /// sockets that speak resume were told.
    Unrepairable,
}

impl GapKind {
    /// Every kind, to seed the series.
    pub const ALL: [GapKind; 2] = [GapKind::Repaired, GapKind::Unrepairable];

    /// The `kind` label.
    pub fn label(self) -> &'static str {
        match self {
            GapKind::Repaired => "repaired",
            GapKind::Unrepairable => "unrepairable",
        }
    }
}

/// The node's counters. Cheap to update: atomics, and for labelled families
/// a read lock on a map with a handful of entries.
pub struct Metrics {
    registry: Registry,
    connections: Gauge,
    opened: Counter,
    closed: Family<CloseLabel, Counter>,
    received: Counter,
    delivered: Counter,
    dropped: Family<ReasonLabel, Counter>,
    http_broadcast: Family<StatusLabel, Counter>,
    bus_unreadable: Counter,
    bus_reconnect_attempts: Counter,
    bus_subscriber_lost: Counter,
    bus_publish_failures: Counter,
    bus_channels: Gauge,
    backend_forwards: Family<ResultLabel, Counter>,
    bus_latency: Histogram,
    bus_gaps: Family<KindLabel, Counter>,
    history_publish: Histogram,
    capacity: Gauge,
    full: Gauge,
    refused: Family<ReasonLabel, Counter>,
    head_errors: Family<KindLabel, Counter>,
    ready: Gauge,
    registry_nodes: Gauge,
    registry_heartbeat_failures: Counter,
    presence_writes: Counter,
    presence_sweeps: Counter,
    presence_events: Family<KindLabel, Counter>,
    control_received: Counter,
    ban_check_failures: Counter,
    /// `ban_checks` by who answered: this node's copy of the bans, or
    /// Redis (held apart: one is counted per connect).
    ban_checks_here: Counter,
    ban_checks_redis: Counter,
    resumes: Family<ResultLabel, Counter>,
    resume_replayed: Histogram,
    drain_handoffs: Family<ResultLabel, Counter>,
    /// `process_*`, without the `wshub_` prefix, as every Prometheus client
    /// names them (dashboards and alerts expect these names).
    process: Registry,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with every series registered and seeded at 0.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("wshub");
        let ban_checks = Family::<AnsweredLabel, Counter>::default();
        let answered = |answered_by| {
            ban_checks
                .get_or_create(&AnsweredLabel { answered_by })
                .clone()
        };
        let m = Metrics {
            connections: Gauge::default(),
            opened: Counter::default(),
            closed: Family::default(),
            received: Counter::default(),
            delivered: Counter::default(),
            dropped: Family::default(),
            http_broadcast: Family::default(),
            bus_unreadable: Counter::default(),
            bus_reconnect_attempts: Counter::default(),
            bus_subscriber_lost: Counter::default(),
            bus_publish_failures: Counter::default(),
            bus_channels: Gauge::default(),
            backend_forwards: Family::default(),
            // 0.5 ms … ~8 s
            bus_latency: Histogram::new(exponential_buckets(0.0005, 2.0, 15)),
            bus_gaps: Family::default(),
            // 0.1 ms … ~1.6 s
            history_publish: Histogram::new(exponential_buckets(0.0001, 2.0, 15)),
            capacity: Gauge::default(),
            full: Gauge::default(),
            refused: Family::default(),
            head_errors: Family::default(),
            ready: Gauge::default(),
            registry_nodes: Gauge::default(),
            registry_heartbeat_failures: Counter::default(),
            presence_writes: Counter::default(),
            presence_sweeps: Counter::default(),
            presence_events: Family::default(),
            control_received: Counter::default(),
            ban_check_failures: Counter::default(),
            ban_checks_here: answered("node"),
            ban_checks_redis: answered("redis"),
            resumes: Family::default(),
            // 1 … 4096 messages (max_replay is 1000 by default)
            resume_replayed: Histogram::new(exponential_buckets(1.0, 2.0, 13)),
            drain_handoffs: Family::default(),
            registry: Registry::default(),
            process: Registry::default(),
        };
        registry.register(
            "connections",
            "Open WebSocket connections",
            m.connections.clone(),
        );
        registry.register(
            "connections_opened",
            "WebSocket connections opened",
            m.opened.clone(),
        );
        registry.register(
            "connections_closed",
            "WebSocket connections closed, by close code",
            m.closed.clone(),
        );
        registry.register(
            "messages_received",
            "Messages received from clients",
            m.received.clone(),
        );
        registry.register(
            "messages_delivered",
            "Frames queued to local sockets",
            m.delivered.clone(),
        );
        registry.register(
            "messages_dropped",
            "Messages or deliveries dropped, by reason",
            m.dropped.clone(),
        );
        registry.register(
            "http_broadcast_requests",
            "Requests to the HTTP broadcast endpoint, by status",
            m.http_broadcast.clone(),
        );
        registry.register(
            "bus_unreadable",
            "Payloads from the bus this node could not read (ignored)",
            m.bus_unreadable.clone(),
        );
        registry.register(
            "bus_reconnect_attempts",
            "Failed attempts to (re)connect to Redis",
            m.bus_reconnect_attempts.clone(),
        );
        registry.register(
            "bus_subscriber_disconnects",
            "Times the Redis subscriber connection was lost (what Redis published until the resubscribe is missed, unless history repairs it)",
            m.bus_subscriber_lost.clone(),
        );
        registry.register(
            "bus_publish_failures",
            "Pipelines to Redis that failed (their messages are dropped)",
            m.bus_publish_failures.clone(),
        );
        registry.register(
            "bus_channels",
            "Group and user channels this node is subscribed to",
            m.bus_channels.clone(),
        );
        registry.register(
            "backend_forwards",
            "Requests to the application backend (messages and events), by result",
            m.backend_forwards.clone(),
        );
        registry.register(
            "bus_delivery_latency_seconds",
            "Time from publish on one node to receipt on another through Redis \
             (includes clock skew between hosts)",
            m.bus_latency.clone(),
        );
        registry.register(
            "bus_gaps",
            "Gaps in a topic's positions the bus found (history on), by what became of them",
            m.bus_gaps.clone(),
        );
        registry.register(
            "history_publish_seconds",
            "Time of one call of the publish script (one batch) in Redis, history on",
            m.history_publish.clone(),
        );
        registry.register(
            "connections_max",
            "Sockets this node accepts (limits.max_connections, or the open-file limit)",
            m.capacity.clone(),
        );
        registry.register(
            "connections_full",
            "1 while the node is full: it reached wshub_connections_max and has not yet \
             fallen 1 % below it (/readyz answers 503 meanwhile)",
            m.full.clone(),
        );
        registry.register(
            "connections_refused",
            "Socket upgrades refused, by reason",
            m.refused.clone(),
        );
        for reason in RefusalReason::ALL {
            drop(m.refused.get_or_create(&ReasonLabel {
                reason: reason.label(),
            }));
        }
        registry.register(
            "http_connection_errors",
            "HTTP connections the HTTP library ended on a request head that never reached wshub, by kind: \
             head_too_large (431), malformed (400), http2 (closed), head_timeout (closed)",
            m.head_errors.clone(),
        );
        for kind in HeadError::ALL {
            drop(
                m.head_errors
                    .get_or_create(&KindLabel { kind: kind.label() }),
            );
        }
        registry.register(
            "ready",
            "1 while /readyz answers 200, else 0 (as of the last scrape)",
            m.ready.clone(),
        );
        registry.register(
            "registry_nodes",
            "Live nodes in the node registry, this one included, as of this node's \
             last successful heartbeat (0 without Redis)",
            m.registry_nodes.clone(),
        );
        registry.register(
            "registry_heartbeat_failures",
            "Node registry heartbeats to Redis that failed (sockets are not affected)",
            m.registry_heartbeat_failures.clone(),
        );
        registry.register(
            "presence_writes",
            "Presence scripts this node ran in Redis to write (first or last local socket of a \
             group and user, count changes, the per-user limit); none while nobody comes or goes",
            m.presence_writes.clone(),
        );
        registry.register(
            "presence_sweeps",
            "Dead nodes whose presence this node swept",
            m.presence_sweeps.clone(),
        );
        registry.register(
            "presence_events",
            "Cluster-wide presence transitions this node was the one to report (join, leave, \
             online, offline)",
            m.presence_events.clone(),
        );
        registry.register(
            "control_received",
            "Control orders (POST /api/disconnect) this node received and carried out",
            m.control_received.clone(),
        );
        registry.register(
            "ban_check_failures",
            "Sockets let in without a ban check because Redis did not answer it",
            m.ban_check_failures.clone(),
        );
        registry.register(
            "ban_checks",
            "Ban checks of connecting sockets, by who answered: the node's own copy of the bans, or Redis",
            ban_checks,
        );
        registry.register(
            "resume",
            "Sockets that asked to resume (or took over a drain handoff), by result",
            m.resumes.clone(),
        );
        registry.register(
            "resume_replayed",
            "Messages replayed to one socket whose resume was recovered",
            m.resume_replayed.clone(),
        );
        registry.register(
            "drain_handoffs",
            "Sockets that stored their positions for the next socket with their identity on shutdown, by result",
            m.drain_handoffs.clone(),
        );
        let build: Family<VersionLabel, Gauge> = Family::default();
        build
            .get_or_create(&VersionLabel {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register("build_info", "Always 1; the version is a label", build);
        let mut process = Registry::default();
        process.register_collector(Box::new(process::Collector));
        // Every label value starts at 0, so each series exists from the
        // first scrape (rates and alerts work at once; dashboards are never
        // empty). The label sets are small and fixed.
        for reason in CloseReason::ALL {
            drop(m.closed.get_or_create(&CloseLabel {
                code: reason.code(),
                reason: reason.label(),
            }));
        }
        for reason in DropReason::ALL {
            drop(m.dropped.get_or_create(&ReasonLabel {
                reason: reason.label(),
            }));
        }
        for kind in GapKind::ALL {
            drop(m.bus_gaps.get_or_create(&KindLabel { kind: kind.label() }));
        }
        for result in ForwardResult::ALL {
            drop(m.backend_forwards.get_or_create(&ResultLabel {
                result: result.label(),
            }));
        }
        for result in ResumeResult::ALL {
            drop(m.resumes.get_or_create(&ResultLabel {
                result: result.label(),
            }));
        }
        for result in HandoffResult::ALL {
            drop(m.drain_handoffs.get_or_create(&ResultLabel {
                result: result.label(),
            }));
        }
        for kind in ["join", "leave", "online", "offline"] {
            drop(m.presence_events.get_or_create(&KindLabel { kind }));
        }
        for status in BroadcastStatus::ALL {
            drop(m.http_broadcast.get_or_create(&StatusLabel {
                status: status.code(),
            }));
        }
        Metrics {
            registry,
            process,
            ..m
        }
    }

    /// The registry in Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        use prometheus_client::encoding::text::{encode_eof, encode_registry};
        let _ = encode_registry(&mut out, &self.registry);
        let _ = encode_registry(&mut out, &self.process);
        let _ = encode_eof(&mut out);
        out
    }

    /// Sets `wshub_ready` (the `/metrics` handler calls it before rendering).
    pub fn set_ready(&self, ready: bool) {
        self.ready.set(i64::from(ready));
    }

    /// This node's last heartbeat saw `n` live nodes in the registry.
    pub fn registry_nodes(&self, n: usize) {
        self.registry_nodes
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// A node registry heartbeat failed.
    pub fn registry_heartbeat_failure(&self) {
        self.registry_heartbeat_failures.inc();
    }

    /// A presence script wrote to Redis.
    pub fn presence_write(&self) {
        self.presence_writes.inc();
    }

    /// This node swept a dead node's presence.
    pub fn presence_sweep(&self) {
        self.presence_sweeps.inc();
    }

    /// This node reported a cluster-wide presence transition (`join`,
    /// `leave`, `online`, `offline`).
    pub fn presence_event(&self, kind: &'static str) {
        self.presence_events
            .get_or_create(&KindLabel { kind })
            .inc();
    }

    /// This node carried out a control order.
    pub fn control_received(&self) {
        self.control_received.inc();
    }

    /// A ban check was answered by this node's copy of the bans (`here`)
    /// or by Redis.
    pub fn ban_checked(&self, here: bool) {
        if here {
            self.ban_checks_here.inc();
        } else {
            self.ban_checks_redis.inc();
        }
    }

    /// A ban check failed (the socket was let in).
    pub fn ban_check_failure(&self) {
        self.ban_check_failures.inc();
    }

    /// A socket was opened.
    pub fn connection_opened(&self) {
        self.opened.inc();
        self.connections.inc();
    }

    /// A socket closed for `reason`.
    pub fn connection_closed(&self, reason: CloseReason) {
        self.connections.dec();
        self.closed
            .get_or_create(&CloseLabel {
                code: reason.code(),
                reason: reason.label(),
            })
            .inc();
    }

    /// A message arrived from a client.
    pub fn received(&self) {
        self.received.inc();
    }

    /// `n` copies were queued for sockets.
    pub fn delivered(&self, n: u64) {
        if n > 0 {
            self.delivered.inc_by(n);
        }
    }

    /// `n` copies were dropped because a recipient's outbox was full.
    pub fn dropped_slow(&self, n: u64) {
        if n > 0 {
            self.dropped(DropReason::SlowConsumer, n);
        }
    }

    /// `n` messages were dropped for `reason`.
    pub fn dropped(&self, reason: DropReason, n: u64) {
        self.dropped
            .get_or_create(&ReasonLabel {
                reason: reason.label(),
            })
            .inc_by(n);
    }

    /// A payload from the bus could not be read.
    pub fn bus_unreadable(&self) {
        self.bus_unreadable.inc();
    }

    /// The bus tried to reconnect.
    pub fn bus_reconnect_attempt(&self) {
        self.bus_reconnect_attempts.inc();
    }

    /// The bus's subscriber connection was lost (Redis closed it, killed
    /// it for its output buffer, or went away): it reconnects, and what was
    /// published meanwhile is missed (review of 2026-12-03: counted
    /// nowhere, only logged).
    pub fn bus_subscriber_lost(&self) {
        self.bus_subscriber_lost.inc();
    }

    /// A pipeline to the bus failed.
    pub fn bus_publish_failure(&self) {
        self.bus_publish_failures.inc();
    }

    /// The bus holds `n` group and user channels.
    pub fn bus_channels(&self, n: usize) {
        self.bus_channels.set(n as i64);
    }

    /// The node accepts at most `n` sockets.
    pub fn set_capacity(&self, n: usize) {
        self.capacity.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// The node is full (or has room again).
    pub fn set_full(&self, full: bool) {
        self.full.set(i64::from(full));
    }

    /// A socket upgrade refused.
    pub fn refused(&self, reason: RefusalReason) {
        self.refused
            .get_or_create(&ReasonLabel {
                reason: reason.label(),
            })
            .inc();
    }

    /// A message took `latency` from publish to receipt through the bus.
    pub fn bus_latency(&self, latency: std::time::Duration) {
        self.bus_latency.observe(latency.as_secs_f64());
    }

    /// A connection the HTTP library ended before routing.
    pub fn head_error(&self, kind: HeadError) {
        self.head_errors
            .get_or_create(&KindLabel { kind: kind.label() })
            .inc();
    }

    /// The bus found a gap in a topic's positions and it became `kind`.
    pub fn bus_gap(&self, kind: GapKind) {
        self.bus_gaps
            .get_or_create(&KindLabel { kind: kind.label() })
            .inc();
    }

    /// One call of the publish script took `took`.
    pub fn history_publish(&self, took: std::time::Duration) {
        self.history_publish.observe(took.as_secs_f64());
    }

    /// A backend forward ended with `result`.
    pub fn backend_forward(&self, result: ForwardResult) {
        self.backend_forwards
            .get_or_create(&ResultLabel {
                result: result.label(),
            })
            .inc();
    }

    /// A resume (or a drain handoff taken over) ended with `result`, having
    /// replayed `replayed` messages (observed when recovered).
    pub fn resumed(&self, result: ResumeResult, replayed: usize) {
        self.resumes
            .get_or_create(&ResultLabel {
                result: result.label(),
            })
            .inc();
        if result == ResumeResult::Recovered {
            self.resume_replayed.observe(replayed as f64);
        }
    }

    /// A socket's drain handoff ended with `result`.
    pub fn drain_handoff(&self, result: HandoffResult) {
        self.drain_handoffs
            .get_or_create(&ResultLabel {
                result: result.label(),
            })
            .inc();
    }

    /// One answer of the broadcast endpoint.
    pub fn http_broadcast(&self, status: BroadcastStatus) {
        self.http_broadcast
            .get_or_create(&StatusLabel {
                status: status.code(),
            })
            .inc();
    }
}

/// The standard process metrics, read from `/proc/self` at each scrape:
/// CPU seconds, resident memory, open and maximum file descriptors, threads.
/// Elsewhere than Linux they are absent. (prometheus-client has no process
/// collector of its own.)
mod process {
    use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
    use prometheus_client::metrics::counter::ConstCounter;
    use prometheus_client::metrics::gauge::ConstGauge;

    /// Linux reports CPU time in clock ticks of 1/100 s (`USER_HZ`, fixed in
    /// the kernel's ABI on every architecture Rust targets).
    const TICKS_PER_SECOND: f64 = 100.0;

    #[derive(Debug)]
    pub(super) struct Collector;

    impl prometheus_client::collector::Collector for Collector {
        fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
            let Some(stat) = read_stat() else {
                return Ok(());
            };
            let cpu = ConstCounter::new(stat.cpu_ticks as f64 / TICKS_PER_SECOND);
            cpu.encode(encoder.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds",
                None,
                cpu.metric_type(),
            )?)?;
            let gauges = [
                (
                    "process_resident_memory_bytes",
                    "Resident memory size in bytes",
                    resident_bytes(),
                ),
                (
                    "process_threads",
                    "Number of OS threads in the process",
                    Some(stat.threads),
                ),
                (
                    "process_open_fds",
                    "Number of open file descriptors",
                    std::fs::read_dir("/proc/self/fd")
                        .ok()
                        .map(|d| d.count() as i64),
                ),
                (
                    "process_max_fds",
                    "Maximum number of open file descriptors",
                    max_fds(),
                ),
            ];
            for (name, help, value) in gauges {
                if let Some(value) = value {
                    let gauge = ConstGauge::new(value);
                    gauge.encode(encoder.encode_descriptor(
                        name,
                        help,
                        None,
                        gauge.metric_type(),
                    )?)?;
                }
            }
            Ok(())
        }
    }

    struct Stat {
        cpu_ticks: u64,
        threads: i64,
    }

    /// `/proc/self/stat`: utime and stime are fields 14 and 15, threads 20.
    /// The command name (field 2) may hold spaces, so count from
    /// its closing parenthesis.
    fn read_stat() -> Option<Stat> {
        let text = std::fs::read_to_string("/proc/self/stat").ok()?;
        let after_name = &text[text.rfind(')')? + 1..];
        // Field 3 (state) is the first after the name.
        let fields: Vec<&str> = after_name.split_whitespace().collect();
        let field = |n: usize| fields.get(n - 3)?.parse::<i64>().ok();
        Some(Stat {
            cpu_ticks: u64::try_from(field(14)? + field(15)?).ok()?,
            threads: field(20)?,
        })
    }

    /// VmRSS from `/proc/self/status` (in kB there; no page size needed).
    fn resident_bytes() -> Option<i64> {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let kb = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
        let kb: i64 = kb.trim().trim_end_matches("kB").trim().parse().ok()?;
        Some(kb * 1024)
    }

    /// The soft limit, from `/proc/self/limits`.
    fn max_fds() -> Option<i64> {
        let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
        let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
        line["Max open files".len()..]
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }
}
