//! The vocabulary of outcomes: every way a session ends, a message is
//! dropped, a socket or broadcast is refused, the HTTP library refuses a
//! request head, a backend forward ends, and a resume or a drain handoff
//! turns out.
//!
//! Each is an enum with `ALL` (metrics seed every label at 0 from it, so
//! every series exists from the first scrape) and `label()` (the one place
//! a label is spelled). This module depends on nothing else in the crate,
//! so every other module may use it without creating an import cycle (it
//! broke the old `metrics` ↔ `backend` one).

// ---- Close reasons --------------------------------------------------------
//
// A session ends exactly once, for exactly one [`CloseReason`]; whoever
// decides first wins (see [`crate::conn::Closer`]). The codes are part of
// the public contract and listed in the README: 1000–1011 are RFC 6455
// codes, 4000–4499 are wshub's "something went wrong on this connection,
// reconnect" range, and `POST /api/disconnect` may pick any code of
// 4000–4999 (4005 unless it says otherwise).

/// Why a session ended. Its [`code`](Self::code) and [`reason`](Self::reason)
/// go into the close frame the client receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The client closed the socket, or the session ended normally.
    Normal,
    /// The node is shutting down; reconnect (to another node).
    GoingAway,
    /// The client broke the WebSocket protocol (bad framing, unmasked frames).
    ProtocolError,
    /// The client kept sending over its message rate
    /// (`limits.rate_violations_before_close`).
    PolicyViolation,
    /// A single message exceeded `limits.max_message_bytes`.
    MessageTooBig,
    /// The hub failed in a way that is not the client's fault.
    InternalError,
    /// The client did not read its messages fast enough and its outbound
    /// queue filled up. Reconnecting is safe; messages queued for it are lost.
    SlowConsumer,
    /// The client did not answer a ping within one ping interval.
    PingTimeout,
    /// The TCP connection broke; no close frame can be sent.
    ConnectionLost,
    /// A newer socket of the same user took this one's place
    /// (`limits.max_connections_per_user` with `replace_oldest`). The
    /// client stays closed: coming back would push that one out in turn.
    SessionReplaced,
    /// Closed through the server API (`POST /api/disconnect`), with the
    /// code it asked for (4000–4999; [`DISCONNECT_CODE`] by default). The
    /// application decided: a client should not simply reconnect (with a
    /// ban, it is refused with 403 until the ban expires).
    Disconnected(u16),
}

/// The close code of `POST /api/disconnect` when the request names none.
pub const DISCONNECT_CODE: u16 = 4005;

impl CloseReason {
    /// Every reason, for initialising metrics.
    /// ([`Self::Disconnected`] with its default code; the metric takes
    /// the code an API request chose, at most the 1000 codes of 4000–4999.)
    pub const ALL: [CloseReason; 11] = [
        Self::Normal,
        Self::GoingAway,
        Self::ProtocolError,
        Self::PolicyViolation,
        Self::MessageTooBig,
        Self::InternalError,
        Self::SlowConsumer,
        Self::PingTimeout,
        Self::ConnectionLost,
        Self::SessionReplaced,
        Self::Disconnected(DISCONNECT_CODE),
    ];

    /// The close code sent to the client (1006 for [`Self::ConnectionLost`],
    /// which is never sent on the wire and only appears in logs and metrics).
    pub fn code(self) -> u16 {
        match self {
            Self::Normal => 1000,
            Self::GoingAway => 1001,
            Self::ProtocolError => 1002,
            Self::ConnectionLost => 1006,
            Self::PolicyViolation => 1008,
            Self::MessageTooBig => 1009,
            Self::InternalError => 1011,
            Self::SlowConsumer => 4000,
            Self::PingTimeout => 4001,
            Self::SessionReplaced => 4003,
            Self::Disconnected(code) => code,
        }
    }

    /// The reason text of the close frame. `Normal` keeps Web Connection's
    /// "Socket closed".
    pub fn reason(self) -> &'static str {
        match self {
            Self::Normal => "Socket closed",
            Self::GoingAway => "Server shutting down",
            Self::ProtocolError => "Protocol error",
            Self::ConnectionLost => "Connection lost",
            Self::PolicyViolation => "Rate limit exceeded",
            Self::MessageTooBig => "Message too big",
            Self::InternalError => "Internal error",
            Self::SlowConsumer => "Too slow: reconnect",
            Self::PingTimeout => "Ping timeout",
            Self::SessionReplaced => "Session replaced",
            Self::Disconnected(_) => "Disconnected by the server",
        }
    }

    /// A short stable label for logs and metrics.
    pub fn label(self) -> &'static str {
        match self {
            Self::Normal => "normal",
            Self::GoingAway => "going_away",
            Self::ProtocolError => "protocol_error",
            Self::ConnectionLost => "connection_lost",
            Self::PolicyViolation => "policy_violation",
            Self::MessageTooBig => "message_too_big",
            Self::InternalError => "internal_error",
            Self::SlowConsumer => "slow_consumer",
            Self::PingTimeout => "ping_timeout",
            Self::SessionReplaced => "session_replaced",
            Self::Disconnected(_) => "disconnected",
        }
    }
}

// ---- Drop reasons ---------------------------------------------------------

/// Why a message was not delivered (the `reason` label of
/// `wshub_messages_dropped_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// A recipient's outbound queue was full (it is closed as slow).
    SlowConsumer,
    /// The message was invalid (bad JSON, wrong types, limits).
    Invalid,
    /// The message was over `limits.max_message_bytes`.
    TooBig,
    /// The bus refused it (overloaded or unavailable).
    BusUnavailable,
    /// The sender was over its message rate.
    RateLimited,
    /// Received from Redis while this node's subscriber task was too far
    /// behind (its byte-bounded push buffer was full).
    BusLagging,
    /// A client's message its client relay policy does not allow
    /// (`ws.client_relay`, a token's `relay` claim).
    RelayPolicy,
}

impl DropReason {
    /// Every reason, for seeding metrics.
    pub const ALL: [DropReason; 7] = [
        Self::SlowConsumer,
        Self::Invalid,
        Self::TooBig,
        Self::BusUnavailable,
        Self::RateLimited,
        Self::BusLagging,
        Self::RelayPolicy,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::SlowConsumer => "slow_consumer",
            Self::Invalid => "invalid",
            Self::TooBig => "too_big",
            Self::BusUnavailable => "bus_unavailable",
            Self::RateLimited => "rate_limited",
            Self::BusLagging => "bus_lagging",
            Self::RelayPolicy => "relay_policy",
        }
    }
}

// ---- Refusals -------------------------------------------------------------

/// Why a socket upgrade was refused (the `reason` label of
/// `wshub_connections_refused_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalReason {
    /// The node holds as many sockets as it may (503).
    Capacity,
    /// The client address holds `limits.max_connections_per_ip` (429).
    PerIp,
    /// The peer address holds `limits.max_http_connections_per_ip` HTTP
    /// connections: the new TCP connection is closed before any request
    /// (no status).
    HttpPerIp,
    /// The client address connects faster than
    /// `limits.connects_per_second_per_ip` allows (429, `Retry-After`).
    ConnectRate,
    /// Token mode, and the token is missing or invalid (401).
    Token,
    /// The `Origin` is not in `auth.allowed_origins` (403).
    Origin,
    /// The node is shutting down (503).
    Draining,
    /// The bus could not subscribe the socket's topics (503).
    Bus,
    /// The query or the ids are malformed or too long (400).
    BadRequest,
    /// The user holds `limits.max_connections_per_user` sockets in the
    /// cluster and the policy is `refuse` (429).
    PerUser,
    /// The user is banned (`POST /api/disconnect` with `ban_ms`) until the
    /// ban expires (403).
    Banned,
    /// An upgrade of another WebSocket version than 13, or none (426, with
    /// `Sec-WebSocket-Version: 13`).
    Version,
}

impl RefusalReason {
    /// Every reason, for seeding metrics.
    pub const ALL: [RefusalReason; 12] = [
        Self::Capacity,
        Self::PerIp,
        Self::HttpPerIp,
        Self::ConnectRate,
        Self::Token,
        Self::Origin,
        Self::Draining,
        Self::Bus,
        Self::BadRequest,
        Self::PerUser,
        Self::Banned,
        Self::Version,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Capacity => "capacity",
            Self::PerIp => "per_ip",
            Self::HttpPerIp => "http_per_ip",
            Self::ConnectRate => "connect_rate",
            Self::Token => "token",
            Self::Origin => "origin",
            Self::Draining => "draining",
            Self::Bus => "bus",
            Self::BadRequest => "bad_request",
            Self::PerUser => "per_user",
            Self::Banned => "banned",
            Self::Version => "version",
        }
    }

    /// The HTTP status the client receives.
    pub fn status(self) -> u16 {
        match self {
            Self::Capacity | Self::Draining | Self::Bus => 503,
            Self::PerIp | Self::ConnectRate | Self::PerUser | Self::HttpPerIp => 429,
            Self::Token => 401,
            Self::Origin | Self::Banned => 403,
            Self::BadRequest => 400,
            Self::Version => 426,
        }
    }
}

/// Why the HTTP library (hyper) ended a connection on a request head that
/// never reached the router: the connection's first or, on a keep-alive
/// connection, a later one (the `kind` label of
/// `wshub_http_connection_errors_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadError {
    /// A request head over the node's bound (64 KiB, 100 fields): 431.
    /// (hyper's 414 for a request target over 65,534 bytes is never
    /// reached: such a head is over 64 KiB first.)
    TooLarge,
    /// A head that is not HTTP/1: a bad method, target, version or header
    /// (400).
    Malformed,
    /// HTTP/2's connection preface on the HTTP/1 port (closed, no answer).
    Http2,
    /// No whole head within `http.header_read_timeout_ms` of the
    /// connection's start or its last response (closed, no answer): a
    /// slow or stalled client, an unused preconnect, an idle keep-alive.
    Timeout,
}

impl HeadError {
    /// Every kind, to seed the series.
    pub const ALL: [HeadError; 4] = [
        HeadError::TooLarge,
        HeadError::Malformed,
        HeadError::Http2,
        HeadError::Timeout,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::TooLarge => "head_too_large",
            Self::Malformed => "malformed",
            Self::Http2 => "http2",
            Self::Timeout => "head_timeout",
        }
    }
}

/// Every answer of the broadcast endpoint (the `status` label of
/// `wshub_http_broadcast_requests_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BroadcastStatus {
    /// Published (204).
    Published,
    /// Not a valid message (400).
    BadRequest,
    /// API keys are configured and none was valid (401).
    Unauthorized,
    /// No API keys, and the caller is not on a trusted network (403).
    Forbidden,
    /// Not `POST` or `PUT` (405).
    MethodNotAllowed,
    /// Over `limits.max_message_bytes` or `limits.max_fanout_bytes` (413).
    TooLarge,
    /// The body did not arrive within `http.header_read_timeout_ms` (408).
    Timeout,
    /// The bus refused it (503).
    Unavailable,
}

impl BroadcastStatus {
    /// Every answer, for seeding metrics.
    pub const ALL: [BroadcastStatus; 8] = [
        Self::Published,
        Self::BadRequest,
        Self::Unauthorized,
        Self::Forbidden,
        Self::MethodNotAllowed,
        Self::TooLarge,
        Self::Timeout,
        Self::Unavailable,
    ];

    /// The HTTP status code (also the metric label).
    pub fn code(self) -> u16 {
        match self {
            Self::Published => 204,
            Self::BadRequest => 400,
            Self::Unauthorized => 401,
            Self::Forbidden => 403,
            Self::MethodNotAllowed => 405,
            Self::TooLarge => 413,
            Self::Timeout => 408,
            Self::Unavailable => 503,
        }
    }
}

// ---- Backend results ------------------------------------------------------

/// What happened to a forward (the `result` label of
/// `wshub_backend_forwards_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardResult {
    /// The backend answered 2xx.
    Ok,
    /// The backend answered with a non-2xx status.
    Status,
    /// No answer within `backend.timeout_ms`.
    Timeout,
    /// Could not connect: the backend never saw the request.
    Unreachable,
    /// Connected and sent, but no HTTP answer came: the connection closed
    /// first, or what came was not HTTP. The backend may have processed it.
    NoAnswer,
    /// The queue was full; never sent.
    QueueFull,
    /// Not sent, or abandoned unanswered, because the node shut down:
    /// queued when the grace period ended, or arriving after the queue
    /// closed.
    Shutdown,
}

impl ForwardResult {
    /// Every result, for initialising metrics.
    pub const ALL: [ForwardResult; 7] = [
        Self::Ok,
        Self::Status,
        Self::Timeout,
        Self::Unreachable,
        Self::NoAnswer,
        Self::QueueFull,
        Self::Shutdown,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Status => "status",
            Self::Timeout => "timeout",
            Self::Unreachable => "unreachable",
            Self::NoAnswer => "no_answer",
            Self::QueueFull => "queue_full",
            Self::Shutdown => "shutdown",
        }
    }
}

// ---- Resume results -------------------------------------------------------

/// How a socket's resume turned out (the `result` label of
/// `wshub_resume_total`, and what the backend's `X-Wshub-Resume` says).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResumeResult {
    /// Everything the socket missed since its positions (or its drain
    /// handoff's) was replayed, exactly once, in order.
    Recovered,
    /// Positions were given (or a handoff was found) but what was missed
    /// cannot all be replayed: nothing was, the socket continues from the
    /// tops.
    NotRecovered,
    /// `resume=` without positions: a socket that speaks resume, starting
    /// afresh.
    Fresh,
}

impl ResumeResult {
    /// Every result, for initialising metrics.
    pub const ALL: [ResumeResult; 3] = [Self::Recovered, Self::NotRecovered, Self::Fresh];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Recovered => "recovered",
            Self::NotRecovered => "not_recovered",
            Self::Fresh => "fresh",
        }
    }
}

/// What became of a socket's drain handoff on shutdown (the `result` label
/// of `wshub_drain_handoffs_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandoffResult {
    /// Its positions were stored for the next socket with its identity.
    Stored,
    /// History could not be written in time: the next socket with its
    /// identity is not replayed what it missed.
    Failed,
}

impl HandoffResult {
    /// Every result, for initialising metrics.
    pub const ALL: [HandoffResult; 2] = [Self::Stored, Self::Failed];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Stored => "stored",
            Self::Failed => "failed",
        }
    }
}
