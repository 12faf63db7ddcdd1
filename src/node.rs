//! The node: this process's hub, its bus, and the rules that join them.
//!
//! Sessions and HTTP handlers talk to the [`Node`] only; it owns the hub
//! (this node's sockets), the [`Bus`] (every other node), the backend, and
//! the node's lifecycle (ready, draining, [`Node::shutdown`]). A message
//! goes one way: the node delivers it to its own sockets through the hub
//! and hands it to the bus, which brings it to the other nodes' hubs.
//!
//! With history on (a bus whose [`Bus::history`] is `Some`) the node does
//! not deliver at publish time: the bus stamps every message in Redis and
//! delivers the node's own messages from Redis's echo, like everyone
//! else's, so every socket sees one order per topic, with positions.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tracing::{debug, warn};

use std::borrow::Cow;
use std::net::IpAddr;

use crate::admission::{Admission, PerAddress, Refusal, Slot};
use crate::backend::{ACTION_CONNECT, ACTION_DISCONNECT, Backend};
use crate::bus::control::{ControlPlane, Local};
use crate::bus::registry::{NodeEntry, Registry, Vitals};
use crate::bus::{Bus, BusError, Deliver, MakeBus, Receipt};
use crate::config::Config;
use crate::conn::{Conn, ConnId, OutboxReceiver};
use crate::envelope::Envelope;
use crate::hub::Hub;
use crate::logging::{Untrusted, UntrustedOpt};
use crate::message::{Message, MessageError, RecipientKind};
use crate::metrics::Metrics;
use crate::outcome::CloseReason;
use crate::outcome::DropReason;
use crate::presence::{ACTION_PRESENCE, AdmitError, Announce, Presence};
use crate::rate_limit::{RateLimit, Verdict};
use crate::resume::{Bounds, Report, Request, Resumer};
use crate::route::{Identity, Relay, Route, Topic, connection_number};
use crate::shutdown::Shutdown;

mod cluster;
pub use cluster::{
    Disconnect, IDEMPOTENCY_TTL, Published, ServerApiError, TopicEntry, position_in,
};

/// What a socket asks for at connect, besides who it is and where it
/// comes from ([`Node::connect_with`]).
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Its `resume` request ([`Node::resume_request`]).
    pub resume: Request,
    /// Its client relay policy: a token's `relay` claim, or
    /// `ws.client_relay`.
    pub relay: Relay,
    /// Whether it opted in to presence frames (`presence=1`; ignored with
    /// presence off).
    pub presence: bool,
}

/// Why a socket could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The node is shutting down.
    #[error("the node is shutting down")]
    Draining,
    /// No place for it: the node's capacity or the client address's share
    /// is used up.
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// The bus could not subscribe to the connection's topics (or, with
    /// the per-user limit, Redis could not be asked).
    #[error(transparent)]
    Bus(#[from] BusError),
    /// The user already holds `limits.max_connections_per_user` sockets
    /// in the cluster and the policy is `refuse` (429).
    #[error(
        "too many connections for this user: at most {0} across the cluster (limits.max_connections_per_user)"
    )]
    UserLimit(usize),
    /// The user is banned (`POST /api/disconnect` with `ban_ms`).
    #[error("this user is banned for now")]
    Banned,
}

/// Why a message was not published.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error(transparent)]
    /// Not a valid message (or the sender may not send it).
    Invalid(#[from] MessageError),
    /// The message's size times its targets is over
    /// `limits.max_fanout_bytes`: on Redis every target is one publish
    /// carrying the whole message, so one message could cost megabytes.
    /// The sender should send it smaller or to fewer targets (a group).
    #[error(
        "message not sent: {size} bytes to {targets} targets would put {bytes} bytes on the bus, over limits.max_fanout_bytes ({max}); send it smaller or to fewer targets"
    )]
    FanOutTooLarge {
        /// The encoded message's size.
        size: usize,
        /// Its number of targets.
        targets: usize,
        /// Size times targets.
        bytes: usize,
        /// `limits.max_fanout_bytes`.
        max: usize,
    },
    #[error(transparent)]
    /// The bus refused it: sent to nobody.
    Bus(#[from] BusError),
}

impl PublishError {
    /// How the dropped message is counted.
    pub fn drop_reason(&self) -> DropReason {
        match self {
            Self::Invalid(_) => DropReason::Invalid,
            Self::FanOutTooLarge { .. } => DropReason::TooBig,
            Self::Bus(_) => DropReason::BusUnavailable,
        }
    }
}

/// Why a client's message was not sent.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ClientError {
    /// Refused as any publisher's would be.
    #[error(transparent)]
    Publish(#[from] PublishError),
    /// The sender's fan-out bytes (size × targets, summed over its
    /// messages) are over `limits.fanout_bytes_per_second` and its burst:
    /// the message is sent to nobody. The sender should slow down or send
    /// to fewer targets; one that keeps on is closed with 1008.
    #[error(
        "rate limit: at most {per_second} bytes per second of fan-out (message size × targets; bursts of {burst}, limits.fanout_bytes_per_second); this message would put {bytes} bytes on the bus; message not sent"
    )]
    FanOutRate {
        /// This message's size times its targets.
        bytes: usize,
        /// `limits.fanout_bytes_per_second`.
        per_second: u64,
        /// `limits.fanout_bytes_burst`.
        burst: u64,
        /// The sender kept on: close it with 1008.
        close: bool,
    },
    /// The socket's client relay policy (`ws.client_relay`, a token's
    /// `relay` claim) does not let it address these recipients.
    #[error("{0}")]
    Relay(&'static str),
}

impl ClientError {
    fn drop_reason(&self) -> DropReason {
        match self {
            Self::Publish(e) => e.drop_reason(),
            Self::FanOutRate { .. } => DropReason::RateLimited,
            Self::Relay(_) => DropReason::RelayPolicy,
        }
    }
}

impl From<MessageError> for ClientError {
    fn from(e: MessageError) -> Self {
        Self::Publish(e.into())
    }
}

/// One wshub node.
pub struct Node {
    /// The configuration the node runs with.
    pub config: Arc<Config>,
    /// The node's counters (`/metrics`).
    pub metrics: Arc<Metrics>,
    hub: Arc<Hub>,
    bus: Arc<dyn Bus>,
    /// The nodes sharing the bus, this one included (`GET /api/nodes`).
    registry: Arc<dyn Registry>,
    /// What the server API asks of the cluster (`src/bus/control.rs`).
    control: Arc<dyn ControlPlane>,
    /// This node instance's address, `<node id>-<instance>`: its
    /// connection ids are `<address>-<number>`.
    address: Arc<str>,
    /// The bus delivers this node's own messages (history on): `send`
    /// does not deliver them at publish time.
    echo: bool,
    /// Resume and drain handoff, with history on.
    resumer: Option<Arc<Resumer>>,
    /// Cluster presence and the per-user limit, when either is on.
    presence: Option<Arc<Presence>>,
    backend: Option<Backend>,
    /// Token mode: a client's messages carry its verified ids, stamped
    /// over whatever it wrote (the HTTP layer verifies the tokens).
    stamp_identity: bool,
    /// Who gets a socket: capacity and the per-address limit.
    admission: Arc<Admission>,
    draining: AtomicBool,
    /// Ban checks fail (logged once per outage).
    ban_check_failing: AtomicBool,
    next_conn_id: AtomicU64,
    /// The owner of every task this node started; see [`Node::shutdown`].
    shutdown: Shutdown,
    /// Every socket session, so shutdown can wait for them (an HTTP
    /// connection's task ends once it is upgraded).
    sessions: Shutdown,
    /// The HTTP server's tasks (the accept loop and one per open HTTP
    /// connection; `running_tasks` counts them), stopped after the
    /// sessions (see [`Node::http_shutdown`]).
    http: Shutdown,
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The bus could not be started (an invalid Redis URL). Fix `redis.*`.
    #[error("cannot start the bus: {0}")]
    Bus(#[from] BusError),
    /// The HTTP client for `backend.url` could not be built (no TLS
    /// backend could be initialised on this system).
    #[error("cannot build the backend's HTTP client: {0}")]
    BackendClient(#[source] reqwest::Error),
}

impl Node {
    /// A node on the bus the configuration asks for: Redis when
    /// `redis.url` is set, the single-node bus otherwise; with a backend when
    /// `backend.url` is set.
    pub fn new(config: Config) -> Result<Arc<Self>, StartError> {
        let metrics = Arc::new(Metrics::new());
        let make_bus = crate::bus::from_config(&config, metrics.clone());
        Self::with_bus(config, metrics, make_bus)
    }

    /// A node on the bus `make_bus` builds; the factory is handed this
    /// node's hub, so the bus delivers into no other, and a child of the
    /// node's [`Shutdown`] for its tasks.
    pub fn with_bus(
        config: Config,
        metrics: Arc<Metrics>,
        make_bus: MakeBus,
    ) -> Result<Arc<Self>, StartError> {
        let shutdown = Shutdown::new();
        let lanes = crate::lane::Lanes::per_worker(&shutdown.child());
        let hub = Arc::new(Hub::with_lanes(metrics.clone(), lanes));
        let bus = make_bus(hub.clone(), shutdown.child())?;
        // Every node hears messages for everyone, for as long as it lives.
        drop(bus.subscribe(&Topic::All));
        let history = bus.history();
        let echo = history.is_some();
        let resumer = match (history, &config.history) {
            (Some(history), Some(settings)) => {
                // Each History call is one Redis command or script.
                let limit = config
                    .redis
                    .as_ref()
                    .map_or(Duration::from_secs(2), |r| r.command_timeout);
                Some(Arc::new(Resumer::new(
                    history,
                    Bounds {
                        max_replay: settings.max_replay,
                        max_replay_bytes: settings.max_replay_bytes,
                        replay_budget_bytes: settings.replay_budget_bytes,
                    },
                    settings.drain_handoff,
                    limit,
                    config.node_id.as_str().into(),
                    metrics.clone(),
                )))
            }
            _ => None,
        };
        let stamp_identity = config.auth.jwt_key.is_some();
        let fd_limit = crate::admission::open_file_limit();
        // The backend's connections come out of the same open-file limit.
        let reserved = crate::admission::RESERVED_FDS
            + config.backend.as_ref().map_or(0, |b| b.concurrency as u64);
        let (capacity, by_fds) =
            crate::admission::capacity(config.limits.max_connections, fd_limit, reserved);
        if by_fds && fd_limit.is_some_and(|limit| reserved.saturating_mul(2) > limit) {
            tracing::warn!(
                max_connections = capacity,
                open_file_limit = fd_limit.unwrap_or_default(),
                reserved_fds = reserved,
                "backend.concurrency and the node's own descriptors take more than half the open-file limit, leaving fewer sockets: lower backend.concurrency or raise the limit (ulimit -Hn, LimitNOFILE)"
            );
        } else if by_fds {
            tracing::info!(
                max_connections = capacity,
                open_file_limit = fd_limit.unwrap_or_default(),
                reserved_fds = reserved,
                "the open-file limit caps this node's sockets; raise it (ulimit -Hn, LimitNOFILE) to hold more"
            );
        }
        let backend = match config.backend.as_ref() {
            None => None,
            Some(b) => Some(
                Backend::start(
                    b,
                    capacity,
                    config.node_id.as_str().into(),
                    metrics.clone(),
                    shutdown.child(),
                )
                .map_err(StartError::BackendClient)?,
            ),
        };
        let admission = Admission::new(
            capacity,
            PerAddress {
                max_sockets: config.limits.max_connections_per_ip,
                connects_per_second: config.limits.connects_per_second_per_ip,
                connect_burst: config.limits.connect_burst_per_ip,
                ipv6_prefix_len: config.limits.ipv6_prefix_len,
            },
            metrics.clone(),
        );
        let registry = bus.registry(&config.presence);
        let presence = Presence::start(
            registry.presence(),
            &config,
            hub.clone(),
            metrics.clone(),
            shutdown.child(),
        );
        let control = bus
            .control()
            .unwrap_or_else(|| Arc::new(Local::new(hub.clone())));
        let address = bus
            .address()
            .unwrap_or_else(|| format!("{}-{:08x}", config.node_id, rand::random::<u32>()).into());
        let node = Arc::new(Self {
            control,
            address,
            config: Arc::new(config),
            metrics,
            hub,
            bus,
            registry,
            echo,
            resumer,
            presence,
            backend,
            stamp_identity,
            admission,
            draining: AtomicBool::new(false),
            ban_check_failing: AtomicBool::new(false),
            next_conn_id: AtomicU64::new(1),
            sessions: shutdown.child(),
            http: shutdown.child(),
            shutdown,
        });
        // Held weakly: the registry never keeps the node alive.
        let vitals: std::sync::Weak<Self> = Arc::downgrade(&node);
        node.registry.join(vitals);
        if let Some(presence) = &node.presence {
            let announce: std::sync::Weak<Self> = Arc::downgrade(&node);
            presence.announce_to(announce);
        }
        Ok(node)
    }

    /// What a socket for `who` asks for with the `resume` query parameter
    /// `value`: always [`Request::Legacy`] with history off, so the
    /// parameter changes nothing then.
    pub fn resume_request(&self, value: Option<&str>, who: &Identity) -> Request {
        match self.resumer {
            Some(_) => Request::from_parameter(value, who),
            None => Request::Legacy,
        }
    }

    /// Registers a socket for `who`: it is in the hub and the bus is
    /// subscribed to its topics when this returns, so it receives every
    /// message published from then on. `resume` (see
    /// [`resume_request`](Self::resume_request)) is decided by the session,
    /// which then tells the backend of the connect (history on); with
    /// history off the backend is told here.
    pub async fn connect(
        self: &Arc<Self>,
        who: Identity,
        ip: Option<IpAddr>,
        resume: Request,
    ) -> Result<Registration, ConnectError> {
        let options = ConnectOptions {
            resume,
            relay: self.config.ws.client_relay,
            presence: false,
        };
        self.connect_with(who, ip, options).await
    }

    /// [`connect`](Self::connect) with everything a socket may ask for at
    /// connect ([`ConnectOptions`]): `resume`, its client relay policy, and
    /// presence frames.
    ///
    /// A banned user is refused ([`ConnectError::Banned`]); the ban is
    /// checked once the socket's topics are subscribed, so a disconnect
    /// order published before that reaches it and one published after
    /// finds the ban. Then, with the per-user limit on, the user's sockets
    /// in the cluster are counted: over the limit, the oldest is replaced
    /// or this one refused ([`ConnectError::UserLimit`]).
    pub async fn connect_with(
        self: &Arc<Self>,
        who: Identity,
        ip: Option<IpAddr>,
        options: ConnectOptions,
    ) -> Result<Registration, ConnectError> {
        let ConnectOptions {
            resume,
            relay,
            presence,
        } = options;
        if self.is_draining() {
            return Err(ConnectError::Draining);
        }
        let resume = match self.resumer {
            Some(_) => resume,
            None => Request::Legacy,
        };
        let slot = self.admission.reserve(ip)?;
        let id = self.next_conn_id.fetch_add(1, Ordering::Relaxed);
        let queue_bytes = self.config.limits.outbound_queue_bytes;
        let cid = connection_id(&self.address, id);
        let who = self.hub.shared(who);
        let (conn, rx) = Conn::open(id, cid, who, relay, resume.speaks_resume(), queue_bytes);
        self.hub.insert(conn.clone());
        self.metrics.connection_opened();
        // The registration undoes all of this when dropped, also on error.
        let mut registration = Registration {
            node: self.clone(),
            conn,
            rx: Some(rx),
            // Boxed, and only when it says more than `Legacy` (always with
            // history off): the registration lives as long as the socket.
            resume: (!matches!(resume, Request::Legacy)).then(|| Box::new(resume)),
            announced: false,
            present: false,
            _slot: slot,
        };
        let [group, user] = registration.conn.who.topics();
        let (g, u) = tokio::join!(self.bus.subscribe(&group), self.bus.subscribe(&user));
        g?;
        u?;
        // After the subscribes, never beside them: a ban that lands between
        // a check run early and the user's subscribe would publish its
        // disconnect order to no one, and the socket would be let in and
        // stay (docs/api.md, "Bans"; test
        // `api::a_ban_during_a_connect_refuses_the_socket`).
        if self.banned(&registration.conn.who.user).await {
            return Err(ConnectError::Banned);
        }
        if self.is_draining() {
            // Shutdown began while we subscribed and may have missed us.
            return Err(ConnectError::Draining);
        }
        if let Some(p) = &self.presence {
            match p.admit(&registration.conn).await {
                Ok(()) => {}
                Err(AdmitError::UserLimit(max)) => return Err(ConnectError::UserLimit(max)),
                Err(AdmitError::Bus(e)) => return Err(ConnectError::Bus(e)),
            }
            // From here the registration's drop removes what was recorded.
            p.connected(&registration.conn, presence);
            registration.present = true;
        }
        if self.resumer.is_none()
            && let Some(backend) = &self.backend
        {
            registration.announced = backend.event(&registration.conn, ACTION_CONNECT, None);
        }
        Ok(registration)
    }

    /// Whether `user` is banned. Fails open: while Redis cannot answer
    /// (within `redis.command_timeout_ms`), sockets are let in as they
    /// were before bans existed, counted in
    /// `wshub_ban_check_failures_total` and logged once per outage. A
    /// node whose topics are subscribed serves its sockets through a short
    /// Redis outage; a ban check must not end that.
    ///
    /// On Redis the node's copy of the bans answers when it can (every
    /// ban is published to every node, `src/bus/redis/bans.rs`), and
    /// Redis is asked otherwise.
    async fn banned(&self, user: &str) -> bool {
        let answer = match self.control.banned_here(user) {
            Some(banned) => {
                self.metrics.ban_checked(true);
                Ok(banned)
            }
            None => {
                self.metrics.ban_checked(false);
                self.control.banned(user).await
            }
        };
        match answer {
            Ok(banned) => {
                // A read first: every connect passes here, and a write
                // would move the flag's cache line between the cores.
                if self.ban_check_failing.load(Ordering::Relaxed)
                    && self.ban_check_failing.swap(false, Ordering::Relaxed)
                {
                    tracing::info!("ban checks work again");
                }
                banned
            }
            Err(error) => {
                self.metrics.ban_check_failure();
                if !self.ban_check_failing.swap(true, Ordering::Relaxed) {
                    warn!(%error, "cannot check bans: sockets are let in unchecked until Redis answers (logged once per outage, counted in wshub_ban_check_failures_total)");
                }
                false
            }
        }
    }

    fn parse<'t>(&self, text: &'t str) -> Result<Message<'t>, MessageError> {
        Message::parse(text, &self.config.message_limits())
    }

    /// Counts a message this node refused: the one place a drop of a
    /// parsed (or unparseable) message is counted. Drops are counted where
    /// they happen, once: here for what the node refuses, in the HTTP layer
    /// and the session for what never became a message (a body or frame
    /// too big, not UTF-8, over the rate), in the hub for a full outbox,
    /// and in the bus for what it loses after accepting it.
    fn refused(&self, error: PublishError) -> PublishError {
        self.metrics.dropped(error.drop_reason(), 1);
        error
    }

    /// [`refused`](Self::refused) for a client's message.
    fn client_refused(&self, error: ClientError) -> ClientError {
        self.metrics.dropped(error.drop_reason(), 1);
        error
    }

    /// Parses a message from the backend (the broadcast endpoint) and
    /// publishes it, whatever its action, the hub's own `wshub.*` included:
    /// the backend is the application, trusted by key or network, and may
    /// speak in the hub's name.
    pub fn publish_text(&self, text: &str) -> Result<(), PublishError> {
        let msg = self.parse(text).map_err(|e| self.refused(e.into()))?;
        self.publish(&msg).map_err(|e| self.refused(e))
    }

    /// Handles a message from a client: `broadcast` (and, without a
    /// backend, every action) is published; with a backend every other
    /// action is forwarded to it instead. Forwarding failures reach the
    /// sender later, as `wshub.error`.
    ///
    /// In token mode the message's `userId` and `groupId` are replaced by
    /// the connection's verified ones first, so nobody speaks as someone
    /// else (the backend then receives the stamped JSON).
    ///
    /// The hub's own actions (`wshub.*`) are refused, with or without a
    /// backend: a client could otherwise fake hub errors to other clients
    /// or connect/disconnect events to the backend.
    ///
    /// A published message's fan-out bytes are charged to the sender's
    /// `rate` (`ClientError::FanOutRate` when over it).
    pub(crate) fn client_text(
        &self,
        conn: &Arc<Conn>,
        text: &str,
        rate: &mut RateLimit,
    ) -> Result<(), ClientError> {
        self.client_message(conn, text, rate)
            .map_err(|e| self.client_refused(e))
    }

    fn client_message(
        &self,
        conn: &Arc<Conn>,
        text: &str,
        rate: &mut RateLimit,
    ) -> Result<(), ClientError> {
        let mut msg = self.parse(text)?;
        if msg.shadow_reserved {
            // Where a backend may read it (`Message::shadow_reserved`).
            return Err(MessageError::ReservedAction.into());
        }
        if let Some(field) = msg.duplicate {
            return Err(MessageError::DuplicateField { field }.into());
        }
        if msg.is_reserved() {
            // A socket that opted in to presence asks for its group's
            // members; from anyone else it is refused, saying why.
            if msg.action.as_deref() == Some(ACTION_PRESENCE) {
                return match &self.presence {
                    Some(presence) if presence.enabled() => {
                        if presence.request(conn) {
                            Ok(())
                        } else {
                            Err(MessageError::PresenceNotOptedIn.into())
                        }
                    }
                    _ => Err(MessageError::PresenceOff.into()),
                };
            }
            return Err(MessageError::ReservedAction.into());
        }
        if self.stamp_identity {
            msg.user_id = Some(Cow::Borrowed(&*conn.who.user));
            msg.group_id = conn.who.group.as_deref().map(Cow::Borrowed);
        }
        match &self.backend {
            Some(backend) if !msg.is_broadcast() => {
                // The backend receives the JSON as the client sent it, or
                // as stamped: encoded only on this path, never for a
                // broadcast (which `publish` encodes, once).
                let stamped;
                let mut text = text;
                if self.stamp_identity {
                    stamped = msg.encode();
                    text = stamped.as_str();
                }
                backend.forward(conn, text, msg.action.as_deref().unwrap_or("(no action)"));
                Ok(())
            }
            _ => {
                let envelope = self.prepare(&msg)?;
                if let Some(why) = conn.relay.refuses(&envelope.route, &conn.who) {
                    return Err(ClientError::Relay(why));
                }
                // Charged before the bus sees it: what the sender's budget
                // protects is the other nodes' Redis subscribers.
                let bytes = envelope
                    .frame
                    .len()
                    .saturating_mul(envelope.route.topics().len());
                let verdict = rate.check_bytes(tokio::time::Instant::now(), bytes);
                if verdict != Verdict::Allowed {
                    let limits = &self.config.limits;
                    return Err(ClientError::FanOutRate {
                        bytes,
                        per_second: limits.fanout_bytes_per_second,
                        burst: limits.fanout_bytes_burst,
                        close: verdict == Verdict::Abusive,
                    });
                }
                Ok(self.send(envelope)?)
            }
        }
    }

    /// Publishes a parsed message to its recipients (see
    /// [`prepare`](Self::prepare) and [`send`](Self::send)); the caller
    /// counts a refusal.
    fn publish(&self, msg: &Message<'_>) -> Result<(), PublishError> {
        self.send(self.prepare(msg)?)
    }

    /// Encodes a message, once, for its route, unless its fan-out
    /// (size × targets) is over `limits.max_fanout_bytes`.
    fn prepare(&self, msg: &Message<'_>) -> Result<Arc<Envelope>, PublishError> {
        // A `connection` recipient that names no possible socket (no value,
        // `null`, not of the form, a number past any) would reach nobody,
        // silently (review of 2026-12-03); `POST /api/disconnect` refuses
        // the same id.
        if msg.recipients.iter().any(|r| {
            r.kind == RecipientKind::Connection
                && r.value
                    .as_deref()
                    .is_none_or(|v| connection_number(v).is_none())
        }) {
            return Err(MessageError::NotAConnectionId.into());
        }
        // A `user` recipient without a user id reaches nobody (every socket
        // has one): beside other targets it adds none, as an unknown user
        // would (Web Connection delivers the union, and a backend's
        // `AddRecipient(lcUserId, "user")` with an empty id still reached
        // the group it also named: review of 2026-12-03); as the only
        // target, the message would reach nobody, so it is refused.
        let mut targets = msg
            .recipients
            .iter()
            .filter(|r| r.kind != RecipientKind::ExcludeUser)
            .peekable();
        if targets.peek().is_some()
            && targets.all(|r| {
                r.kind == RecipientKind::User && r.value.as_deref().is_none_or(str::is_empty)
            })
        {
            return Err(MessageError::NoUserId.into());
        }
        let route = Route::from_recipients(&msg.recipients);
        let frame = msg.encode();
        let (size, targets) = (frame.len(), route.topics().len());
        let max = self.config.limits.max_fanout_bytes;
        if size.saturating_mul(targets) > max {
            return Err(PublishError::FanOutTooLarge {
                size,
                targets,
                bytes: size.saturating_mul(targets),
                max,
            });
        }
        Ok(Arc::new(Envelope::new(route, frame)))
    }

    /// Hands an encoded message to the bus and this node's sockets (or,
    /// with history on, to the bus only: it delivers the echo).
    fn send(&self, envelope: Arc<Envelope>) -> Result<(), PublishError> {
        // The bus first: a message the bus refuses (its queue is full, or
        // Redis has been unreachable for longer than it would hold a
        // message) is sent nowhere, so the sender's error means "not sent",
        // as before local delivery moved out of the bus.
        self.bus.publish(envelope.clone())?;
        if self.echo {
            // History on: the bus stamps the message and delivers it here
            // from Redis's echo, in the one order every node sees, with
            // positions. Delivering it now as well would deliver it twice,
            // and without its stamp.
            return Ok(());
        }
        // Then this node's own sockets, on the publisher's task: no round
        // trip through the bus, and it goes on during a short outage of the
        // bus's service (a longer one is refused above). The bus never
        // brings a message back to the node that published it, so every
        // socket gets it once.
        for topic in envelope.route.topics() {
            self.hub.deliver(topic, &envelope);
        }
        Ok(())
    }

    /// [`send`](Self::send) of every one of `envelopes`, or of none: the
    /// bus takes them all or refuses them all (`POST /api/publish`), and
    /// its receipt says when it has carried them.
    pub(crate) fn send_all(&self, envelopes: &[Arc<Envelope>]) -> Result<Receipt, PublishError> {
        let receipt = self.bus.publish_all(envelopes)?;
        if !self.echo {
            for envelope in envelopes {
                for topic in envelope.route.topics() {
                    self.hub.deliver(topic, envelope);
                }
            }
        }
        Ok(receipt)
    }

    /// `Ok` when the node can deliver; otherwise why not (for `/readyz`).
    pub fn readiness(&self) -> Result<(), String> {
        if self.is_draining() {
            return Err("draining".into());
        }
        if let Some(full) = self.admission.full_reason() {
            return Err(full);
        }
        self.bus.health().map_err(|e| e.to_string())
    }

    /// Counts an upgrade from client address `ip` against
    /// `limits.connects_per_second_per_ip`; over it, the refusal. Asked
    /// for every upgrade of the socket path, before the rest of its checks.
    pub(crate) fn connect_attempt(&self, ip: Option<IpAddr>) -> Result<(), Refusal> {
        self.admission.connect(ip, tokio::time::Instant::now())
    }

    /// Whether shutdown has begun.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Shuts the node down, the one entry point for it. Starts at once
    /// (from the call, not the first poll): `/readyz` answers 503 and new
    /// sockets are refused with 503. The future then, in order:
    ///
    /// 1. closes every socket with 1001, spread evenly over `window` so that
    ///    clients do not all reconnect in the same instant (the browser
    ///    library adds its own jitter on top; a zero window closes all at
    ///    once);
    /// 2. waits for the sessions, at most `grace`;
    /// 3. stops the HTTP server started on [`http_shutdown`](Self::http_shutdown)
    ///    and waits for requests in flight, at most `grace` (HTTP answered
    ///    503s until now, so load balancers saw the drain);
    /// 4. side by side, each within `grace`: the backend sends what is
    ///    queued (the sessions' disconnect events), and the bus sends what
    ///    is queued for other nodes;
    /// 5. resolves once every task the node started has ended (or at once,
    ///    with a warning already logged, when sessions or requests overran
    ///    their grace period).
    ///
    /// So the worst case is `window + 3 × grace` (plus the bus's margin of a
    /// second); a node whose peers behave takes `window` and a round trip.
    pub fn shutdown(
        self: &Arc<Self>,
        window: Duration,
        grace: Duration,
    ) -> impl Future<Output = ()> + Send + 'static {
        self.draining.store(true, Ordering::Release);
        self.sessions.close();
        let node = self.clone();
        async move {
            node.close_sockets(window).await;
            // Sessions or HTTP requests that outlived their grace period:
            // the node exits without them, as it always did.
            let mut stragglers = false;
            if tokio::time::timeout(grace, node.sessions.wait())
                .await
                .is_err()
            {
                stragglers = true;
                // The sessions' tasks, not the registered sockets: a
                // session still closing or flushing has left the registry
                // (the line said `open_sockets=0`, review of 2026-12-03).
                warn!(
                    sessions = node.sessions.tracker().len(),
                    grace_ms = grace.as_millis() as u64,
                    "grace period over with sessions still running; exiting anyway"
                );
            }
            node.http.cancel();
            node.http.close();
            // In-flight HTTP requests are short; do not let one hold the exit.
            if tokio::time::timeout(grace, node.http.wait()).await.is_err() {
                stragglers = true;
                warn!("HTTP requests still in flight after the grace period; exiting anyway");
            }
            // The sessions' disconnect events and the messages for other
            // nodes are queued now; send both before returning, or the
            // process exits with them (issue 11 item 8).
            let backend = async {
                if let Some(backend) = &node.backend {
                    backend.shutdown(grace).await;
                }
            };
            tokio::join!(backend, node.bus.shutdown(grace));
            // Whatever is left is told to stop. The backend's and the bus's
            // tasks have ended (their shutdowns wait for them); unless a
            // session or request overran its grace period, so has
            // everything else, and this returns at once: no task outlives
            // it. With stragglers the node exits anyway, not waiting longer.
            node.shutdown.cancel();
            node.shutdown.close();
            if !stragglers {
                node.shutdown.wait().await;
            }
        }
    }

    /// Closes every open socket with 1001, spread evenly over `window`.
    async fn close_sockets(&self, window: Duration) {
        let conns = self.hub.snapshot();
        let start = tokio::time::Instant::now();
        let n = conns.len().max(1) as u32;
        for (i, conn) in conns.iter().enumerate() {
            let due = start + window * i as u32 / n;
            if due > tokio::time::Instant::now() {
                tokio::time::sleep_until(due).await;
            }
            conn.closer.close(CloseReason::GoingAway);
        }
    }

    /// Test hook: starts draining and closes every socket with 1001 at
    /// once, and nothing else (HTTP keeps answering, nothing is flushed),
    /// so a test can watch the sockets' side of a drain. Not for the
    /// server: [`shutdown`](Self::shutdown) is the way to stop a node.
    #[doc(hidden)]
    pub fn drain_sockets_now(&self) {
        self.draining.store(true, Ordering::Release);
        self.sessions.close();
        for conn in self.hub.snapshot() {
            conn.closer.close(CloseReason::GoingAway);
        }
    }

    /// Where the HTTP server runs its task: [`shutdown`](Self::shutdown)
    /// cancels its token once the sessions are gone and waits for it.
    pub fn http_shutdown(&self) -> &Shutdown {
        &self.http
    }

    /// Keeps a session counted until the returned token is dropped, so
    /// [`shutdown`](Self::shutdown) waits for it (sessions are upgraded by
    /// axum, not spawned by the node).
    pub fn track_session(&self) -> tokio_util::task::task_tracker::TaskTrackerToken {
        self.sessions.tracker().token()
    }

    /// Test hook: tasks the node started that are still running (bus,
    /// backend workers, sessions, HTTP). Zero once `shutdown` resolved.
    #[doc(hidden)]
    pub fn running_tasks(&self) -> usize {
        self.shutdown.running()
    }

    /// Test hook: the connection ids of this node's open sockets (a
    /// backend learns them from `X-Wshub-Connection-Id`).
    #[doc(hidden)]
    pub fn connection_ids(&self) -> Vec<String> {
        self.hub
            .snapshot()
            .iter()
            .map(|c| c.cid.to_string())
            .collect()
    }

    /// Number of open sockets on this node.
    pub fn connections(&self) -> usize {
        self.hub.len()
    }

    /// Resume and drain handoff, when history is on.
    pub(crate) fn resumer(&self) -> Option<&Arc<Resumer>> {
        self.resumer.as_ref()
    }

    /// Cluster presence, when `presence.enabled` (`None` also when only
    /// the per-user limit is on).
    pub(crate) fn presence(&self) -> Option<&Arc<Presence>> {
        self.presence.as_ref().filter(|p| p.enabled())
    }

    /// Every live node of the cluster, this one included (the node
    /// registry; this node alone without Redis). Fails when Redis cannot be
    /// reached.
    pub async fn nodes(&self) -> Result<Vec<NodeEntry>, BusError> {
        self.registry.nodes().await
    }

    /// The node registry and its version gate (the bus holds the same
    /// gate; tests ask it here).
    pub fn registry(&self) -> &Arc<dyn Registry> {
        &self.registry
    }
}

impl Announce for Node {
    fn announce(&self, who: &Identity, action: &'static str) {
        if let Some(backend) = &self.backend {
            backend.presence_event(who, action);
        }
    }

    fn posts_events(&self) -> bool {
        self.backend.as_ref().is_some_and(|b| b.events)
    }
}

impl Vitals for Node {
    fn id(&self) -> &str {
        &self.config.node_id
    }

    fn connections(&self) -> usize {
        Node::connections(self)
    }

    fn ready(&self) -> bool {
        self.readiness().is_ok()
    }

    fn posts_presence_events(&self) -> bool {
        self.presence().is_some() && self.backend.as_ref().is_some_and(|b| b.events)
    }
}

/// A socket's place in the node. Dropping it removes the socket from the hub
/// and releases its bus topics.
pub struct Registration {
    node: Arc<Node>,
    /// The socket's connection in the hub.
    pub conn: Arc<Conn>,
    rx: Option<OutboxReceiver>,
    /// What the socket asked for with `resume`, until the session takes it
    /// (`None` for [`Request::Legacy`]).
    resume: Option<Box<Request>>,
    /// Whether the backend was told of the connect (and must hear of the
    /// disconnect).
    announced: bool,
    /// Whether presence (or the per-user limit) counted the socket (and
    /// must hear it closed).
    present: bool,
    /// The socket's place in the node's capacity (given back on drop).
    _slot: Slot,
}

impl Registration {
    /// The node the socket belongs to.
    pub fn node(&self) -> &Arc<Node> {
        &self.node
    }

    /// Takes the socket out of the hub (nothing more is delivered to it)
    /// ahead of the rest of what dropping the registration does: a
    /// drained socket's session still publishes what the client sends
    /// while its close runs (`src/session.rs`), and the backend and
    /// presence hear of the disconnect after it.
    pub fn leave_hub(&self) {
        self.node.hub.remove(&self.conn);
    }

    /// Takes the connection's outbound queue (once).
    pub fn take_outbound(&mut self) -> Option<OutboxReceiver> {
        self.rx.take()
    }

    /// Takes what the socket asked for with `resume` (once).
    pub(crate) fn take_resume(&mut self) -> Request {
        self.resume.take().map_or(Request::Legacy, |r| *r)
    }

    /// Tells the backend of the connect once the resume is decided
    /// (history on): after this the disconnect is owed too.
    pub(crate) fn announce(&mut self, report: &Report) {
        if let Some(backend) = &self.node.backend
            && !self.announced
        {
            self.announced = backend.event(&self.conn, ACTION_CONNECT, Some(report));
        }
    }
}

/// The cluster-wide id of this node's connection `id`: `<address>-<id>`,
/// written into one buffer of the right size (issue 19: the `format!`
/// that made it showed in every connect's profile).
fn connection_id(address: &str, id: ConnId) -> Arc<str> {
    use std::fmt::Write;
    let mut cid = String::with_capacity(address.len() + 21);
    cid.push_str(address);
    cid.push('-');
    // Writing to a `String` cannot fail.
    let _ = write!(cid, "{id}");
    Arc::from(cid)
}

impl Drop for Registration {
    fn drop(&mut self) {
        let node = &self.node;
        node.hub.remove(&self.conn);
        if self.present
            && let Some(presence) = &node.presence
        {
            presence.disconnected(&self.conn);
        }
        for topic in self.conn.who.topics() {
            node.bus.unsubscribe(&topic);
        }
        if let Some(backend) = &node.backend {
            if self.announced {
                backend.event(&self.conn, ACTION_DISCONNECT, None);
            }
            backend.left(&self.conn);
        }
        if self.rx.is_none() {
            // The session ran and set its close reason.
            let reason = self.conn.closer.reason().unwrap_or(CloseReason::Normal);
            node.metrics.connection_closed(reason);
            debug!(
                conn = %self.conn.cid,
                user = %Untrusted(&self.conn.who.user),
                group = %UntrustedOpt(self.conn.who.group.as_deref()),
                code = reason.code(),
                reason = reason.label(),
                "connection closed"
            );
        } else {
            // Refused while subscribing, or the upgrade never completed.
            node.metrics.connection_closed(CloseReason::ConnectionLost);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_ids_are_the_address_and_the_number() {
        for id in [0, 7, 10, 1234, u64::MAX] {
            assert_eq!(&*connection_id("n1-ab12", id), format!("n1-ab12-{id}"));
        }
    }
}
