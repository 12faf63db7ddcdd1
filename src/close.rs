//! Every way a socket session can end, and the close code each one sends.
//!
//! A session ends exactly once, for exactly one [`CloseReason`]; whoever
//! decides first wins (see [`crate::conn::Closer`]). The codes are part of the
//! public contract and listed in the README: 1000–1011 are RFC 6455 codes,
//! 4000–4499 are wshub's "something went wrong on this connection, reconnect"
//! range.

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
}

impl CloseReason {
    /// Every reason, for initialising metrics.
    pub const ALL: [CloseReason; 9] = [
        Self::Normal,
        Self::GoingAway,
        Self::ProtocolError,
        Self::PolicyViolation,
        Self::MessageTooBig,
        Self::InternalError,
        Self::SlowConsumer,
        Self::PingTimeout,
        Self::ConnectionLost,
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
        }
    }
}
