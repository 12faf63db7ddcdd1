//! The HTTP surface: the socket endpoint, the broadcast endpoint, the
//! server API (`/api/*`, in `api`), health, metrics and the embedded
//! browser files.
//!
//! Web Connection matches its two special paths case-insensitively (and the
//! broadcast path anywhere in the URL), which axum's router does not do, so
//! those two go through `dispatch`, the router's fallback.

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::Router;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tracing::{debug, warn};

use crate::auth::{self, TokenVerifier};
use crate::config::Config;
use crate::logging::Untrusted;
use crate::metrics::Metrics;
use crate::node::{ConnectError, ConnectOptions, Node, PublishError};
use crate::outcome::{BroadcastStatus, DropReason, RefusalReason};
use crate::refusal_log::{RefusalLog, Verdict};
use crate::route::Identity;

mod api;

/// The socket path of Web Connection (matched case-insensitively).
pub const SOCKET_PATH: &str = "/__initializewebsocket.wc";
/// wshub's short alias for the socket path.
pub const SOCKET_ALIAS: &str = "/ws";
/// Any path containing this (case-insensitively) is the broadcast endpoint.
pub const BROADCAST_MARKER: &str = "__broadcastwebsocket.wc";

const LIBRARY_JS: &str = include_str!("../static/webconnection-websocket.js");
const LIBRARY_DTS: &str = include_str!("../static/webconnection-websocket.d.ts");
const CHAT_HTML: &str = include_str!("../static/index.html");
const ADMIN_HTML: &str = include_str!("../static/admin.html");

/// The admin page's path (`static/admin.html`).
pub const ADMIN_PATH: &str = "/admin";

/// The names a page may load the browser library by: Web Connection's file
/// name, the one its samples import, and the one in its blog and changelog.
pub const LIBRARY_PATHS: [&str; 3] = [
    "/scripts/webconnection-websocket.js",
    "/scripts/web-connection-websocket.js",
    "/scripts/westwind-websocket.js",
];

/// What the HTTP layer works with: the node it admits sockets to and
/// publishes on, and the policies only HTTP applies (the token verifier,
/// origins, API keys, trusted networks and request limits, all in the
/// configuration).
///
/// Cloned several times per request (each `State` extractor and layer
/// takes its own), so it is one reference count, not one per field: five
/// atomic increments and decrements per clone, on counters both workers
/// touch, showed in the connect path's profile (issue 19).
#[derive(Clone)]
pub struct HttpState(Arc<HttpShared>);

/// The fields of [`HttpState`], shared by every clone.
pub struct HttpShared {
    node: Arc<Node>,
    /// The token verifier, in token mode.
    tokens: Option<Arc<TokenVerifier>>,
    config: Arc<Config>,
    metrics: Arc<Metrics>,
    /// Which refusals were logged recently (one line per peer and reason
    /// per minute).
    refusals: Arc<RefusalLog>,
    /// [`NODE_HEADER`]'s value, made once (`None` when the node id is not
    /// a valid header value).
    node_header: Option<HeaderValue>,
}

impl std::ops::Deref for HttpState {
    type Target = HttpShared;

    fn deref(&self) -> &HttpShared {
        &self.0
    }
}

impl HttpState {
    /// The HTTP layer's state for `node`.
    pub fn new(node: Arc<Node>) -> Self {
        Self(Arc::new(HttpShared {
            tokens: TokenVerifier::from_config(&node.config.auth),
            config: node.config.clone(),
            metrics: node.metrics.clone(),
            refusals: Arc::new(RefusalLog::default()),
            node_header: HeaderValue::from_str(&node.config.node_id).ok(),
            node,
        }))
    }

    /// The address a request came from: the TCP peer, or the client named
    /// by `X-Forwarded-For` when the peer is a trusted proxy.
    fn peer(&self, request: &Request) -> Option<IpAddr> {
        let peer = request.extensions().get::<ConnectInfo<SocketAddr>>()?.0;
        Some(auth::client_ip(
            peer,
            request.headers(),
            &self.config.auth.trusted_proxies,
        ))
    }
}

/// The application's routes.
pub fn router(node: Arc<Node>) -> Router {
    let http = HttpState::new(node);
    let mut scripts = Router::new().route(
        "/scripts/webconnection-websocket.d.ts",
        get(|| async { static_file("application/typescript; charset=utf-8", LIBRARY_DTS) }),
    );
    for path in LIBRARY_PATHS {
        scripts = scripts.route(path, get(library));
    }
    let scripts = scripts.layer(axum::middleware::map_response_with_state(
        http.clone(),
        allow_cross_origin,
    ));
    let mut router = Router::new();
    if http.config.http.sample_page {
        router = router.route(
            "/",
            get(|| async { static_file("text/html; charset=utf-8", CHAT_HTML) }),
        );
    }
    router
        .merge(scripts)
        .route(ADMIN_PATH, get(admin))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        // A reason with the 405 (axum's is empty; it keeps the `Allow`
        // header). Before the API's routes, which answer theirs in JSON.
        .method_not_allowed_fallback(|method: Method| async move {
            (
                StatusCode::METHOD_NOT_ALLOWED,
                format!("method not allowed: {method} (see the Allow header)\n"),
            )
        })
        .nest("/api", api::routes(http.clone()))
        .merge(api::root(http.clone()))
        .fallback(dispatch)
        .layer(axum::middleware::map_response_with_state(
            http.clone(),
            tag_node,
        ))
        .with_state(http)
}

/// The header naming the node that answered (every response carries it).
pub const NODE_HEADER: &str = "x-wshub-node-id";

/// Adds [`NODE_HEADER`]: behind a load balancer it tells operators (and
/// tests) which node served a request or holds a socket.
async fn tag_node(State(http): State<HttpState>, mut response: Response) -> Response {
    if let Some(value) = &http.node_header {
        response.headers_mut().insert(NODE_HEADER, value.clone());
    }
    response
}

/// CORS for `/scripts/*`: a page on another origin imports the library as
/// an ES module, and browsers load cross-origin modules only with
/// `Access-Control-Allow-Origin`. The origins are those that may open a
/// socket (`auth.allowed_origins`): any when the list is empty, so `*`;
/// otherwise the request's origin echoed when listed, nothing when not
/// (the file is public anyway; the header only lets a page use it).
async fn allow_cross_origin(
    State(http): State<HttpState>,
    request_headers: axum::http::HeaderMap,
    mut response: Response,
) -> Response {
    let allowed = &http.config.auth.allowed_origins;
    let headers = response.headers_mut();
    if allowed.is_empty() {
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            HeaderValue::from_static("*"),
        );
        return response;
    }
    // The answer depends on the Origin: caches must keep one per origin.
    headers.insert(header::VARY, HeaderValue::from_static("Origin"));
    if let Some(origin) = request_headers.get(header::ORIGIN)
        && let Ok(text) = origin.to_str()
        && auth::origin_allowed(allowed, Some(text))
    {
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
    }
    response
}

/// `GET /admin`: the admin page. The page is public (it holds nothing);
/// what it shows comes from the server API, with the key the operator
/// types in. It loads nothing from elsewhere and may not be framed.
async fn admin() -> Response {
    let mut response = static_file("text/html; charset=utf-8", ADMIN_HTML);
    response.headers_mut().insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
             frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
        ),
    );
    response
}

async fn library() -> Response {
    static_file("text/javascript; charset=utf-8", LIBRARY_JS)
}

fn static_file(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        body,
    )
        .into_response()
}

async fn readyz(State(http): State<HttpState>) -> Response {
    match http.node.readiness() {
        Ok(()) => (StatusCode::OK, "ready\n").into_response(),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        )
            .into_response(),
    }
}

async fn metrics(State(http): State<HttpState>) -> Response {
    http.metrics.set_ready(http.node.readiness().is_ok());
    // The text is OpenMetrics (`prometheus-client`: a counter's family
    // without `_total`, `# EOF`), so it says so; labelled 0.0.4, a strict
    // parser of that format took the counters as untyped (review of
    // 2026-12-03). Prometheus reads either by the content type.
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
        )],
        http.metrics.render(),
    )
        .into_response()
}

/// Routes the case-insensitive Web Connection paths; everything else is 404.
async fn dispatch(State(http): State<HttpState>, request: Request) -> Response {
    if let Some(reason) = ambiguous_path(request.uri().path()) {
        let peer = http.peer(&request);
        // Under /api/ every answer but a success is JSON (docs/api.md).
        // (The API's own fallback sends its ambiguous paths here, with
        // `/api` stripped from the URI by the nesting.)
        let raw = request
            .extensions()
            .get::<axum::extract::OriginalUri>()
            .map_or(request.uri().path(), |original| original.path());
        let api = (raw == "/api" || raw.starts_with("/api/"))
            && !raw.to_ascii_lowercase().contains(BROADCAST_MARKER);
        return http.refuse(peer, Refused::Path(reason, api));
    }
    let path = request.uri().path().to_ascii_lowercase();
    if path == SOCKET_PATH || path == SOCKET_ALIAS {
        socket(http, request).await
    } else if path.contains(BROADCAST_MARKER) {
        broadcast(http, request).await
    } else {
        (StatusCode::NOT_FOUND, "not found\n").into_response()
    }
}

/// Why a raw request path is refused before routing, if it is: a `.` or
/// `..` segment, or an encoded `.` or `/`. A proxy in front normalizes such
/// a path before matching its rules but forwards it as sent, so the two
/// would disagree on what was asked for: `POST /__broadcastWebSocket.wc/..`
/// passed nginx's block on the broadcast path as `/` (issue 11). No Web
/// Connection path has them.
pub fn ambiguous_path(path: &str) -> Option<&'static str> {
    if path
        .split('/')
        .any(|segment| segment == "." || segment == "..")
    {
        return Some("bad request: the path has a dot-segment (. or ..)");
    }
    let lower = path.to_ascii_lowercase();
    if lower.contains("%2e") || lower.contains("%2f") {
        return Some("bad request: the path has an encoded . or /");
    }
    None
}

/// A request the HTTP layer turns away, with what it is counted as and the
/// one-line reason the client reads. [`HttpState::refuse`] is the one place
/// it becomes a response (status, text, `WWW-Authenticate` on 401, `Allow`
/// on 405), is counted, once, and is logged (rate-limited, see
/// [`crate::refusal_log`]).
///
/// The text is what the client reads and what the log shows, so it never
/// holds a token, key or secret; it may quote what the client sent (an
/// origin, a parse error), which the log writes through [`Untrusted`].
#[derive(Debug)]
enum Refused {
    /// A socket upgrade (`wshub_connections_refused_total`).
    Socket(RefusalReason, String),
    /// A broadcast (`wshub_http_broadcast_requests_total`).
    Broadcast(BroadcastStatus, String),
    /// A path with a dot-segment or an encoded `.` or `/`, refused before
    /// routing ([`ambiguous_path`]); logged, not counted. `true`: under
    /// `/api/`, answered as the API answers (JSON).
    Path(&'static str, bool),
}

impl Refused {
    fn status(&self) -> StatusCode {
        let code = match self {
            Self::Socket(reason, _) => reason.status(),
            Self::Broadcast(status, _) => status.code(),
            Self::Path(..) => 400,
        };
        // Every code in the outcome enums is a valid status.
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    /// What was refused, for the log.
    fn what(&self) -> &'static str {
        match self {
            Self::Socket(..) => "socket",
            Self::Broadcast(..) => "broadcast",
            Self::Path(..) => "path",
        }
    }

    /// The refusal log's key: one per kind and reason.
    fn reason_label(&self) -> &'static str {
        match self {
            Self::Socket(reason, _) => reason.label(),
            Self::Broadcast(status, _) => match status {
                BroadcastStatus::Published => "published",
                BroadcastStatus::BadRequest => "broadcast_bad_request",
                BroadcastStatus::Unauthorized => "broadcast_unauthorized",
                BroadcastStatus::Forbidden => "broadcast_forbidden",
                BroadcastStatus::MethodNotAllowed => "broadcast_method",
                BroadcastStatus::TooLarge => "broadcast_too_large",
                BroadcastStatus::Timeout => "broadcast_timeout",
                BroadcastStatus::Unavailable => "broadcast_unavailable",
            },
            Self::Path(..) => "ambiguous_path",
        }
    }
}

impl HttpState {
    /// Counts and logs `refused` (from `peer`) and turns it into its
    /// response.
    fn refuse(&self, peer: Option<IpAddr>, refused: Refused) -> Response {
        let status = refused.status();
        let what = refused.what();
        let label = refused.reason_label();
        // Tokio's clock, so tests can pause it and step over the window.
        let now = tokio::time::Instant::now().into_std();
        let verdict = self.refusals.note(peer, label, now);
        let api = matches!(refused, Refused::Path(_, true));
        let mut text = match refused {
            Refused::Socket(reason, text) => {
                self.metrics.refused(reason);
                text
            }
            Refused::Broadcast(status, text) => {
                self.metrics.http_broadcast(status);
                text
            }
            Refused::Path(text, _) => text.to_owned(),
        };
        if let Verdict::Log {
            suppressed,
            overflow,
        } = verdict
        {
            let peer = peer.map_or_else(|| "unknown".to_owned(), |p| p.to_string());
            let status = status.as_u16();
            let reason = Untrusted(&text);
            if overflow {
                warn!(%peer, status, what, label, %reason, suppressed,
                    "request refused (the refusal log is full: new peers share one line per minute)");
            } else {
                warn!(%peer, status, what, label, %reason, suppressed, "request refused");
            }
        }
        if api {
            return api::bad_request(text);
        }
        text.push('\n');
        let mut response = (status, text).into_response();
        let headers = response.headers_mut();
        if status == StatusCode::UNAUTHORIZED {
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"wshub\""),
            );
        }
        if status == StatusCode::UPGRADE_REQUIRED {
            headers.insert(
                header::SEC_WEBSOCKET_VERSION,
                HeaderValue::from_static("13"),
            );
        }
        if label == RefusalReason::ConnectRate.label() {
            // Within one interval of the rate (at least 1 connect a second)
            // the client has a connect again.
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if status == StatusCode::METHOD_NOT_ALLOWED {
            headers.insert(header::ALLOW, HeaderValue::from_static("POST, PUT"));
        }
        response
    }
}

/// `GET /__initializeWebSocket.wc?groupid=G&userid=U` with Upgrade.
///
/// In order: a WebSocket upgrade (else 404, as Web Connection), the
/// client address's connect rate (429), the origin (403), the identity
/// from the token in token mode (401) or the query, then the node's
/// capacity (503 when full or draining, 429 per address).
async fn socket(http: HttpState, request: Request) -> Response {
    let peer = http.peer(&request);
    match accept(http.clone(), request).await {
        Ok(response) => response,
        Err(refused) => http.refuse(peer, refused),
    }
}

/// [`socket`] up to its refusals.
async fn accept(http: HttpState, request: Request) -> Result<Response, Refused> {
    let (mut parts, _body) = request.into_parts();
    let upgrade = match Upgrade::from_parts(&mut parts) {
        Ok(upgrade) => upgrade,
        // Web Connection answers a plain GET of the socket path with 404.
        Err(Handshake::NotUpgrade) => {
            return Ok((
                StatusCode::NOT_FOUND,
                "not found: this path only accepts WebSocket upgrades\n",
            )
                .into_response());
        }
        // RFC 6455 4.2.2: 426, with the versions this server speaks
        // (the header is added by `refuse`).
        Err(Handshake::Version) => {
            return Err(Refused::Socket(
                RefusalReason::Version,
                "upgrade required: this server speaks WebSocket version 13 (one Sec-WebSocket-Version: 13 header)".into(),
            ));
        }
        Err(Handshake::Key) => {
            return Err(Refused::Socket(
                RefusalReason::BadRequest,
                "bad request: Sec-WebSocket-Key must be one header, 16 bytes in base64".into(),
            ));
        }
    };
    let peer = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0);
    let ip = peer.map(|p| auth::client_ip(p, &parts.headers, &http.config.auth.trusted_proxies));
    // First: a client connecting in a loop is refused before its token is
    // checked or anything is subscribed or written for it.
    if let Err(refusal) = http.node.connect_attempt(ip) {
        return Err(Refused::Socket(refusal.reason(), refusal.to_string()));
    }
    // An Origin that is not text, or two, is no origin in the list (read
    // as none, a review's `https://evil.example\xe9` was let in; of two,
    // the first decided).
    let mut origins = parts.headers.get_all(header::ORIGIN).iter();
    let origin = match (origins.next(), origins.next()) {
        (None, _) => None,
        (Some(one), None) => Some(one.to_str().map_err(|_| "(not text)")),
        (Some(_), Some(_)) => Some(Err("(two Origin headers)")),
    };
    let allowed = &http.config.auth.allowed_origins;
    if !auth::origin_allowed(allowed, origin.map(|o| o.unwrap_or(""))) {
        let shown = origin.map_or("", |o| o.unwrap_or_else(|why| why));
        let text = format!("origin {shown} is not allowed");
        return Err(Refused::Socket(RefusalReason::Origin, text));
    }
    let pairs = match query_pairs(parts.uri.query()) {
        Ok(pairs) => pairs,
        Err(e) => return Err(Refused::Socket(RefusalReason::BadRequest, e)),
    };
    let (who, relay) = match http.tokens.as_deref() {
        Some(tokens) => {
            match auth::token_from_request(&pairs, &parts.headers).and_then(|t| tokens.verify(&t)) {
                Ok(verified) => (verified.who, verified.relay),
                Err(e) => return Err(Refused::Socket(RefusalReason::Token, e.to_string())),
            }
        }
        None => (identity_from_query(&pairs), None),
    };
    // One check for both modes: query ids and token claims alike.
    let max_id = http.config.limits.max_id_bytes;
    for (name, id) in [
        ("user id", Some(&*who.user)),
        ("group id", who.group.as_deref()),
    ] {
        if id.is_some_and(|id| id.len() > max_id) {
            let text = format!("the {name} is longer than {max_id} bytes");
            return Err(Refused::Socket(RefusalReason::BadRequest, text));
        }
    }
    // With history off the parameter is ignored (the node says Legacy).
    let mut resume = http.node.resume_request(resume_parameter(&pairs), &who);
    if http.tokens.is_none() && !user_id_given(&pairs) {
        // Its id is new with every socket: no drain handoff to take or leave.
        resume = resume.with_generated_user_id();
    }
    let options = ConnectOptions {
        resume,
        relay: relay.unwrap_or(http.config.ws.client_relay),
        presence: crate::presence::opts_in(parameter(&pairs, crate::presence::QUERY_PARAMETER)),
    };
    let registration = match http.node.connect_with(who, ip, options).await {
        Ok(r) => r,
        Err(e @ ConnectError::Banned) => {
            return Err(Refused::Socket(RefusalReason::Banned, e.to_string()));
        }
        Err(e @ ConnectError::Draining) => {
            return Err(Refused::Socket(RefusalReason::Draining, e.to_string()));
        }
        Err(ConnectError::Refused(refusal)) => {
            return Err(Refused::Socket(refusal.reason(), refusal.to_string()));
        }
        Err(e @ ConnectError::UserLimit(_)) => {
            return Err(Refused::Socket(RefusalReason::PerUser, e.to_string()));
        }
        Err(e @ ConnectError::Bus(_)) => {
            // Logged by `refuse`, rate-limited like every refusal: a line
            // per upgrade flooded the log while Redis was away.
            return Err(Refused::Socket(RefusalReason::Bus, e.to_string()));
        }
    };
    let max = http.config.limits.max_message_bytes;
    let ws = &http.config.ws;
    // Held until the session ends, so shutdown waits for it. Boxed with
    // the registration: the upgrade task (`Upgrade::accept`) keeps room
    // for its callback's captures for the socket's whole life, and a box
    // is one pointer, freed as the session starts (issue 19).
    let start = Box::new((registration, http.node.track_session()));
    let config = tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(ws.read_buffer_bytes)
        .write_buffer_size(ws.write_buffer_bytes)
        .max_message_size(Some(max))
        .max_frame_size(Some(max));
    Ok(upgrade.accept(move |io| {
        let (registration, tracked) = *start;
        crate::session::run(io, config, registration, tracked)
    }))
}

/// A WebSocket upgrade request, checked as axum's `WebSocketUpgrade`
/// checked it (HTTP/1.1 `GET`, `Connection: upgrade`, `Upgrade:
/// websocket`, a key, version 13, an upgradable connection): the socket
/// is served without axum's `WebSocket`, so that the delivering task can
/// write to it ([`crate::wire`]).
struct Upgrade {
    key: HeaderValue,
    /// The protocol chosen: [`auth::PROTOCOL`] when the client offers it
    /// (with a token in the protocol list, browsers require the server to
    /// choose one).
    protocol: Option<HeaderValue>,
    on_upgrade: hyper::upgrade::OnUpgrade,
}

/// Why a request to the socket path is not an upgrade wshub takes.
enum Handshake {
    /// Not a WebSocket upgrade at all (404, as Web Connection).
    NotUpgrade,
    /// An upgrade of another version than 13 (426, RFC 6455 4.2.2).
    Version,
    /// No `Sec-WebSocket-Key`, two, or one that is not 16 bytes in base64
    /// (400, RFC 6455 4.2.1; a review had an empty key upgraded).
    Key,
}

/// Whether `key` is 16 bytes in base64, as RFC 6455 4.1 has clients
/// send it: 22 characters of the alphabet, the last with its low four
/// bits clear (no bits beyond the 128), then `==`.
fn valid_key(key: &[u8]) -> bool {
    let digit = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    };
    key.len() == 24
        && key.ends_with(b"==")
        && key[..22].iter().all(|&c| digit(c).is_some())
        && digit(key[21]).is_some_and(|d| d & 0b1111 == 0)
}

impl Upgrade {
    fn from_parts(parts: &mut axum::http::request::Parts) -> Result<Self, Handshake> {
        let headers = &parts.headers;
        let has = |name: header::HeaderName, token: &str| {
            headers.get_all(name).iter().any(|value| {
                value
                    .to_str()
                    .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
            })
        };
        let upgrade = parts.version <= axum::http::Version::HTTP_11
            && parts.method == Method::GET
            && has(header::CONNECTION, "upgrade")
            && has(header::UPGRADE, "websocket");
        if !upgrade {
            return Err(Handshake::NotUpgrade);
        }
        let mut versions = headers.get_all(header::SEC_WEBSOCKET_VERSION).iter();
        if !(versions.next().is_some_and(|v| v.as_bytes() == b"13") && versions.next().is_none()) {
            return Err(Handshake::Version);
        }
        let mut keys = headers.get_all(header::SEC_WEBSOCKET_KEY).iter();
        let key = match (keys.next(), keys.next()) {
            (Some(key), None) if valid_key(key.as_bytes()) => key.clone(),
            _ => return Err(Handshake::Key),
        };
        let protocol = headers
            .get_all(header::SEC_WEBSOCKET_PROTOCOL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|p| p.trim() == auth::PROTOCOL)
            .then(|| HeaderValue::from_static(auth::PROTOCOL));
        let on_upgrade = parts
            .extensions
            .remove::<hyper::upgrade::OnUpgrade>()
            .ok_or(Handshake::NotUpgrade)?;
        Ok(Self {
            key,
            protocol,
            on_upgrade,
        })
    }

    /// The 101 response; once the connection is upgraded, `serve` runs
    /// with the socket on a task of its own.
    fn accept<F>(self, serve: impl FnOnce(crate::wire::Io) -> F + Send + 'static) -> Response
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let Self {
            key,
            protocol,
            on_upgrade,
        } = self;
        tokio::spawn(async move {
            let upgraded = match on_upgrade.await {
                Ok(upgraded) => upgraded,
                Err(e) => {
                    debug!(error = %e, "websocket upgrade failed");
                    return;
                }
            };
            serve(crate::wire::Io::new(upgraded)).await;
        });
        let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
        let mut response = Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header(header::CONNECTION, HeaderValue::from_static("upgrade"))
            .header(header::UPGRADE, HeaderValue::from_static("websocket"))
            .header(header::SEC_WEBSOCKET_ACCEPT, accept)
            .body(axum::body::Body::empty())
            .unwrap_or_default();
        if let Some(protocol) = protocol {
            response
                .headers_mut()
                .insert(header::SEC_WEBSOCKET_PROTOCOL, protocol);
        }
        response
    }
}

/// A query's key-value pairs, in order, decoded: each borrowed from the
/// URL when it needs no decoding (no `%` or `+`), as the ids of most
/// sockets. Owned strings cost four allocations a connect (issue 19).
pub type QueryPairs<'a> = [QueryPair<'a>];

/// One key and its value of [`QueryPairs`].
pub type QueryPair<'a> = (Cow<'a, str>, Cow<'a, str>);

fn query_pairs(query: Option<&str>) -> Result<Vec<QueryPair<'_>>, String> {
    let query = query.unwrap_or("");
    // serde_urlencoded decodes an escape that is not UTF-8 to U+FFFD, so
    // `userid=%FF` and `userid=%FE` would be one user: refuse it instead.
    if query.contains('%')
        && query.split('&').any(|part| {
            percent_encoding::percent_decode_str(part)
                .decode_utf8()
                .is_err()
        })
    {
        return Err("invalid query string: a percent-encoded key or value is not UTF-8".into());
    }
    let parts: Vec<(Part<'_>, Part<'_>)> =
        serde_urlencoded::from_str(query).map_err(|e| format!("invalid query string: {e}"))?;
    Ok(parts.into_iter().map(|(k, v)| (k.0, v.0)).collect())
}

/// One key or value of a query, borrowed when serde_urlencoded hands
/// out a borrowed string (serde's own `Cow` always copies).
struct Part<'a>(Cow<'a, str>);

impl<'de> serde::Deserialize<'de> for Part<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Text;
        impl<'de> serde::de::Visitor<'de> for Text {
            type Value = Part<'de>;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string")
            }

            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Part<'de>, E> {
                Ok(Part(Cow::Borrowed(v)))
            }

            fn visit_str<E>(self, v: &str) -> Result<Part<'de>, E> {
                Ok(Part(Cow::Owned(v.to_owned())))
            }

            fn visit_string<E>(self, v: String) -> Result<Part<'de>, E> {
                Ok(Part(Cow::Owned(v)))
            }
        }
        d.deserialize_str(Text)
    }
}

/// Reads `groupid` and `userid` from the query pairs, keys in any case
/// (open mode).
///
/// A missing or empty `userid` gets a random 12-hex-digit id. A missing
/// `groupid` is the null group; `groupid=` is the group `""`, which is not
/// the same (Web Connection behaves so).
pub fn identity_from_query(pairs: &QueryPairs<'_>) -> Identity {
    let mut user: Option<&str> = None;
    let mut group: Option<&str> = None;
    for (key, value) in pairs {
        if key.eq_ignore_ascii_case("userid") {
            user = Some(value);
        } else if key.eq_ignore_ascii_case("groupid") {
            group = Some(value);
        }
    }
    let user = match user.filter(|u| !u.is_empty()) {
        Some(u) => u.into(),
        None => format!(
            "{:0width$x}",
            rand::random::<u64>() & 0xffff_ffff_ffff,
            width = crate::route::GENERATED_ID_LEN
        )
        .into(),
    };
    Identity {
        user,
        group: group.map(Into::into),
    }
}

/// Whether the query gives a (non-empty) user id; without one
/// [`identity_from_query`] makes up a random one.
pub fn user_id_given(pairs: &QueryPairs<'_>) -> bool {
    pairs
        .iter()
        .rev()
        .find(|(key, _)| key.eq_ignore_ascii_case("userid"))
        .is_some_and(|(_, value)| !value.is_empty())
}

/// The value of the `resume` query parameter (key in any case, as the
/// ids' keys), if present; the last one when repeated, as the ids.
fn resume_parameter<'a>(pairs: &'a QueryPairs<'_>) -> Option<&'a str> {
    parameter(pairs, crate::resume::QUERY_PARAMETER)
}

/// The value of query parameter `name` (key in any case), the last one
/// when repeated.
fn parameter<'a>(pairs: &'a QueryPairs<'_>, name: &str) -> Option<&'a str> {
    pairs
        .iter()
        .rev()
        .find(|(key, _)| key.eq_ignore_ascii_case(name))
        .map(|(_, value)| &**value)
}

/// Why a request's body was not read.
pub(crate) enum BodyError {
    /// Over the size limit: declared so in `Content-Length`, or counted
    /// as it came.
    TooLarge,
    /// Not readable: the connection ended before the declared length, or
    /// the chunked framing was broken. The text says how.
    Broken(String),
    /// Not whole within this long (`http.header_read_timeout_ms`).
    Late(std::time::Duration),
}

/// A request's body, at most `max` bytes, within
/// `http.header_read_timeout_ms` (hyper's header timeout stops at the
/// head: a body that stalls held its connection for good, a review saw it
/// open after 90 s).
///
/// A `Content-Length` over `max` is refused before any byte is read: a
/// review declared a terabyte, sent one byte, and waited the whole
/// timeout for a 408. And a body that cannot be read is `Broken`, not
/// too large (a cut-short body of 2 bytes was answered 413 "larger than
/// 65536 bytes", and counted as a message too big). What a refused body
/// still sends is read and dropped for a while ([`linger`]).
pub(crate) async fn read_body(
    http: &HttpState,
    request: Request,
    max: usize,
) -> Result<axum::body::Bytes, BodyError> {
    use futures_util::StreamExt;
    let shutdown = http.node.http_shutdown();
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        // (A client waiting for `100 Continue` gets the 413 instead: once
        // the response has started, hyper sends no 100.)
        linger(shutdown, request.into_body().into_data_stream());
        return Err(BodyError::TooLarge);
    }
    let read = async {
        let mut chunks = request.into_body().into_data_stream();
        let mut body = axum::body::Bytes::new();
        let mut joined = Vec::new();
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk.map_err(|e| BodyError::Broken(crate::logging::error_chain(&e)))?;
            if body.len() + joined.len() + chunk.len() > max {
                linger(shutdown, chunks);
                return Err(BodyError::TooLarge);
            }
            // One chunk (the usual case) is kept as it is; more are joined.
            if body.is_empty() && joined.is_empty() {
                body = chunk;
            } else {
                if joined.is_empty() {
                    joined.extend_from_slice(&std::mem::take(&mut body));
                }
                joined.extend_from_slice(&chunk);
            }
        }
        Ok(if joined.is_empty() {
            body
        } else {
            joined.into()
        })
    };
    match http.config.http.header_read_timeout {
        Some(limit) => tokio::time::timeout(limit, read)
            .await
            .unwrap_or(Err(BodyError::Late(limit))),
        None => read.await,
    }
}

/// How long, and how many bytes, a refused body is still read ([`linger`]).
const LINGER_FOR: std::time::Duration = std::time::Duration::from_secs(2);
const LINGER_BYTES: usize = 8 << 20;

/// Reads and drops the rest of a refused body, for at most [`LINGER_FOR`]
/// and [`LINGER_BYTES`] (or until the node stops), so that a client still
/// sending it reads the 413 rather than a reset: closed with the body
/// unread, the connection made clients that stop at a failed send (curl,
/// Python's http.client) report a broken pipe instead (nginx's lingering
/// close does the same). The connection is then closed as before.
fn linger(shutdown: &crate::shutdown::Shutdown, mut chunks: axum::body::BodyDataStream) {
    use futures_util::StreamExt;
    let stop = shutdown.token().clone();
    shutdown.spawn(async move {
        let drain = async {
            let mut read = 0;
            while let Some(Ok(chunk)) = chunks.next().await {
                read += chunk.len();
                if read >= LINGER_BYTES {
                    break;
                }
            }
        };
        tokio::select! {
            () = stop.cancelled() => {}
            _ = tokio::time::timeout(LINGER_FOR, drain) => {}
        }
    });
}

/// Whether a peer may use the broadcast endpoint: loopback, or an address in
/// one of `broadcast.trusted_networks`.
pub fn broadcast_allowed(peer: SocketAddr, trusted: &[ipnet::IpNet]) -> bool {
    auth::peer_trusted(peer, trusted)
}

/// `POST`/`PUT` of one message JSON to any path containing
/// `__broadcastwebsocket.wc`: delivered like `broadcast`, answered 204.
async fn broadcast(http: HttpState, request: Request) -> Response {
    let peer = http.peer(&request);
    match publish(&http, request).await {
        Ok(()) => {
            http.metrics.http_broadcast(BroadcastStatus::Published);
            StatusCode::NO_CONTENT.into_response()
        }
        Err(refused) => http.refuse(peer, refused),
    }
}

/// [`broadcast`] up to its refusals.
async fn publish(http: &HttpState, request: Request) -> Result<(), Refused> {
    let refused = |status, text: &str| Err(Refused::Broadcast(status, text.to_owned()));
    if request.method() != Method::POST && request.method() != Method::PUT {
        return refused(
            BroadcastStatus::MethodNotAllowed,
            "the broadcast endpoint accepts POST or PUT",
        );
    }
    // With keys configured, a valid key is required from anywhere; without,
    // only loopback and trusted networks may push (the server API's check too).
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0);
    match auth::backend_access(&http.config.broadcast, request.headers(), peer) {
        Ok(()) => {}
        Err(auth::Denied::Unauthorized) => {
            return refused(
                BroadcastStatus::Unauthorized,
                "unauthorized: a valid API key is required (Authorization: Bearer <key> or X-Api-Key)",
            );
        }
        Err(auth::Denied::Forbidden) => {
            return refused(
                BroadcastStatus::Forbidden,
                "forbidden: the broadcast endpoint only accepts requests from loopback and broadcast.trusted_networks",
            );
        }
        Err(auth::Denied::CrossSite) => {
            return refused(
                BroadcastStatus::Forbidden,
                "forbidden: the broadcast endpoint does not take requests from web pages of other sites (without broadcast.api_keys it trusts addresses, which a browser would lend them)",
            );
        }
    }
    let max = http.config.limits.max_message_bytes;
    // Room for a byte-order mark, which is not part of the message (below).
    const BOM: &str = "\u{feff}";
    let body = match read_body(http, request, max + BOM.len()).await {
        Ok(body) => body,
        Err(BodyError::Late(after)) => {
            http.metrics.dropped(DropReason::Invalid, 1);
            return refused(
                BroadcastStatus::Timeout,
                &format!(
                    "the request body did not arrive within {} ms",
                    after.as_millis()
                ),
            );
        }
        Err(BodyError::TooLarge) => {
            // The message never reaches the node: this is its one count.
            http.metrics.dropped(DropReason::TooBig, 1);
            return refused(
                BroadcastStatus::TooLarge,
                &format!("message larger than {max} bytes"),
            );
        }
        Err(BodyError::Broken(why)) => {
            http.metrics.dropped(DropReason::Invalid, 1);
            return refused(
                BroadcastStatus::BadRequest,
                &format!("the request body could not be read: {why}"),
            );
        }
    };
    let Ok(text) = std::str::from_utf8(&body) else {
        // Refused before it is a message: this is its one count.
        http.metrics.dropped(DropReason::Invalid, 1);
        return refused(
            BroadcastStatus::BadRequest,
            "invalid message: the body must be UTF-8 JSON",
        );
    };
    // A UTF-8 byte-order mark in front (text written through a Windows or
    // .NET text API may carry one) is not part of the JSON: read past it,
    // as .NET's own readers do.
    // Nor does it count against the limit (it did: a message of exactly
    // `max_message_bytes` behind one was 413).
    let text = text.strip_prefix(BOM).unwrap_or(text);
    if text.len() > max {
        http.metrics.dropped(DropReason::TooBig, 1);
        return refused(
            BroadcastStatus::TooLarge,
            &format!("message larger than {max} bytes"),
        );
    }
    match http.node.publish_text(text) {
        Ok(()) => Ok(()),
        Err(PublishError::Invalid(e)) => refused(BroadcastStatus::BadRequest, &e.to_string()),
        Err(e @ PublishError::FanOutTooLarge { .. }) => {
            refused(BroadcastStatus::TooLarge, &e.to_string())
        }
        Err(PublishError::Bus(e)) => refused(BroadcastStatus::Unavailable, &e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether a request with these headers (and a key, version 13) is an
    /// upgrade; `on_upgrade` stands in for hyper's.
    fn upgrades(method: Method, headers: &[(&str, &str)]) -> bool {
        let mut request = axum::http::Request::builder()
            .method(method)
            .uri("/ws")
            .header(header::SEC_WEBSOCKET_KEY, "dGhlIHNhbXBsZSBub25jZQ==")
            .header(header::SEC_WEBSOCKET_VERSION, "13");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let mut request = request.body(()).unwrap();
        let on_upgrade = hyper::upgrade::on(&mut request);
        let (mut parts, ()) = request.into_parts();
        parts.extensions.insert(on_upgrade);
        Upgrade::from_parts(&mut parts).is_ok()
    }

    /// The upgrade's `Connection` and `Upgrade` headers are token lists
    /// (RFC 9110), read over every line and in any letter case; README's
    /// endpoint table says so.
    #[test]
    fn an_upgrade_is_read_from_token_lists() {
        for ok in [
            &[("connection", "Upgrade"), ("upgrade", "websocket")][..],
            &[
                ("connection", "keep-alive, upgrade"),
                ("upgrade", "WebSocket"),
            ],
            &[
                ("connection", "keep-alive"),
                ("connection", "Upgrade"),
                ("upgrade", "websocket"),
            ],
            &[("connection", "upgrade"), ("upgrade", "h2c, websocket")],
        ] {
            assert!(upgrades(Method::GET, ok), "{ok:?}");
        }
        for no in [
            &[("upgrade", "websocket")][..],
            &[("connection", "upgraded"), ("upgrade", "websocket")],
            &[("connection", "upgrade"), ("upgrade", "websockets")],
            &[("connection", "upgrade")],
        ] {
            assert!(!upgrades(Method::GET, no), "{no:?}");
        }
        let good = [("connection", "upgrade"), ("upgrade", "websocket")];
        assert!(!upgrades(Method::POST, &good), "not a GET");
    }

    /// RFC 6455 4.1: a client's key is 16 random bytes in base64.
    #[test]
    fn a_key_is_16_bytes_in_base64() {
        for ok in [
            "dGhlIHNhbXBsZSBub25jZQ==",
            "AAAAAAAAAAAAAAAAAAAAAA==",
            "/+9zZ3w0AbCdEfGhIjKlMA==",
        ] {
            assert!(valid_key(ok.as_bytes()), "{ok}");
        }
        for no in [
            "",
            "abc",
            "dGhlIHNhbXBsZSBub25jZQ=",
            "dGhlIHNhbXBsZSBub25jZQ==x",
            "dGhlIHNhbXBsZSBub25jZQ=A",
            "dGhlIHNhbXBsZSBub25j!Q==",
            // Bits beyond the 128 in the last character.
            "dGhlIHNhbXBsZSBub25jZR==",
        ] {
            assert!(!valid_key(no.as_bytes()), "{no}");
        }
    }

    #[test]
    fn only_loopback_and_trusted_networks_may_broadcast() {
        for ok in [
            "127.0.0.1:1",
            "127.8.9.10:1",
            "[::1]:1",
            "[::ffff:127.0.0.1]:1",
        ] {
            assert!(broadcast_allowed(ok.parse().unwrap(), &[]), "{ok}");
        }
        for no in [
            "10.0.0.1:1",
            "192.168.1.2:1",
            "[2001:db8::1]:1",
            "[::ffff:10.0.0.1]:1",
            "0.0.0.0:1",
        ] {
            assert!(!broadcast_allowed(no.parse().unwrap(), &[]), "{no}");
        }
        let trusted = ["10.1.0.0/16".parse().unwrap(), "fd00::/8".parse().unwrap()];
        for ok in [
            "10.1.2.3:1",
            "[::ffff:10.1.0.9]:1",
            "[fd00::5]:1",
            "127.0.0.1:1",
        ] {
            assert!(broadcast_allowed(ok.parse().unwrap(), &trusted), "{ok}");
        }
        for no in ["10.2.0.1:1", "[2001:db8::1]:1"] {
            assert!(!broadcast_allowed(no.parse().unwrap(), &trusted), "{no}");
        }
    }

    #[test]
    fn identity_rules() {
        fn q(s: &str) -> Vec<QueryPair<'_>> {
            query_pairs(Some(s)).unwrap()
        }
        let who = identity_from_query(&q("GroupId=chat&USERID=ann"));
        assert_eq!((&*who.user, who.group.as_deref()), ("ann", Some("chat")));
        let who = identity_from_query(&[]);
        assert_eq!(who.group, None);
        assert_eq!(who.user.len(), 12);
        assert!(who.user.bytes().all(|b| b.is_ascii_hexdigit()));
        let who = identity_from_query(&q("groupid=&userid="));
        assert_eq!(
            who.group.as_deref(),
            Some(""),
            "groupid= is the empty group, not null"
        );
        assert_eq!(who.user.len(), 12, "an empty userid gets a random one");
        assert!(user_id_given(&q("GroupId=chat&USERID=ann")));
        assert!(!user_id_given(&[]));
        assert!(!user_id_given(&q("groupid=&userid=")), "made up");
        assert!(
            !user_id_given(&q("userid=ann&userid=")),
            "the last one counts"
        );
        let who = identity_from_query(&q("userid=a%20b&groupid=x%2By"));
        assert_eq!((&*who.user, who.group.as_deref()), ("a b", Some("x+y")));
        let who = identity_from_query(&q("userid=a+b&groupid=%C3%A9"));
        assert_eq!((&*who.user, who.group.as_deref()), ("a b", Some("é")));
    }

    #[test]
    fn query_parts_are_borrowed_unless_decoded() {
        let pairs = query_pairs(Some("groupId=chat&userid=a%20b")).unwrap();
        assert!(matches!(
            pairs[0],
            (Cow::Borrowed("groupId"), Cow::Borrowed("chat"))
        ));
        assert!(matches!(&pairs[1], (Cow::Borrowed("userid"), Cow::Owned(v)) if v == "a b"));
        assert!(query_pairs(None).unwrap().is_empty());
    }

    /// Two ids that differ only in bytes that are not UTF-8 must not
    /// become one user (both decoded to U+FFFD): refused with a reason.
    #[test]
    fn escapes_that_are_not_utf8_are_refused() {
        for bad in ["userid=%FF", "groupid=x&userid=a%FEb", "%C3=v"] {
            let e = query_pairs(Some(bad)).unwrap_err();
            assert!(e.contains("not UTF-8"), "{bad}: {e}");
        }
        for good in [
            "userid=%C3%A9",
            "userid=%25FF",
            "userid=a%ZZ",
            "userid=\u{FFFD}",
        ] {
            assert!(query_pairs(Some(good)).is_ok(), "{good}");
        }
    }
}
