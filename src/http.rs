//! The HTTP surface: the socket endpoint, the broadcast endpoint, health,
//! metrics and the embedded browser files.
//!
//! Web Connection matches its two special paths case-insensitively (and the
//! broadcast path anywhere in the URL), which axum's router does not do, so
//! those two go through [`dispatch`], the router's fallback.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{ConnectInfo, FromRequestParts, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tracing::{debug, warn};

use crate::auth;
use crate::node::{ConnectError, Node, PublishError};
use crate::route::Identity;

/// The socket path of Web Connection (matched case-insensitively).
pub const SOCKET_PATH: &str = "/__initializewebsocket.wc";
/// wshub's short alias for the socket path.
pub const SOCKET_ALIAS: &str = "/ws";
/// Any path containing this (case-insensitively) is the broadcast endpoint.
pub const BROADCAST_MARKER: &str = "__broadcastwebsocket.wc";

const LIBRARY_JS: &str = include_str!("../static/webconnection-websocket.js");
const LIBRARY_DTS: &str = include_str!("../static/webconnection-websocket.d.ts");
const CHAT_HTML: &str = include_str!("../static/index.html");

/// The names a page may load the browser library by: Web Connection's file
/// name, the one its samples import, and the one in its blog and changelog.
pub const LIBRARY_PATHS: [&str; 3] = [
    "/scripts/webconnection-websocket.js",
    "/scripts/web-connection-websocket.js",
    "/scripts/westwind-websocket.js",
];

/// The application's routes.
pub fn router(node: Arc<Node>) -> Router {
    let mut scripts = Router::new().route(
        "/scripts/webconnection-websocket.d.ts",
        get(|| async { static_file("application/typescript; charset=utf-8", LIBRARY_DTS) }),
    );
    for path in LIBRARY_PATHS {
        scripts = scripts.route(path, get(library));
    }
    let scripts = scripts.layer(axum::middleware::map_response_with_state(
        node.clone(),
        allow_cross_origin,
    ));
    let mut router = Router::new();
    if node.config.http.sample_page {
        router = router.route(
            "/",
            get(|| async { static_file("text/html; charset=utf-8", CHAT_HTML) }),
        );
    }
    router
        .merge(scripts)
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(dispatch)
        .layer(axum::middleware::map_response_with_state(
            node.clone(),
            tag_node,
        ))
        .with_state(node)
}

/// The header naming the node that answered (every response carries it).
pub const NODE_HEADER: &str = "x-wshub-node-id";

/// Adds [`NODE_HEADER`]: behind a load balancer it tells operators (and
/// tests) which node served a request or holds a socket.
async fn tag_node(State(node): State<Arc<Node>>, mut response: Response) -> Response {
    if let Ok(value) = HeaderValue::from_str(&node.config.node_id) {
        response.headers_mut().insert(NODE_HEADER, value);
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
    State(node): State<Arc<Node>>,
    request_headers: axum::http::HeaderMap,
    mut response: Response,
) -> Response {
    let allowed = &node.config.auth.allowed_origins;
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

async fn readyz(State(node): State<Arc<Node>>) -> Response {
    match node.readiness() {
        Ok(()) => (StatusCode::OK, "ready\n").into_response(),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        )
            .into_response(),
    }
}

async fn metrics(State(node): State<Arc<Node>>) -> Response {
    node.metrics.set_ready(node.readiness().is_ok());
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        node.metrics.render(),
    )
        .into_response()
}

/// Routes the case-insensitive Web Connection paths; everything else is 404.
async fn dispatch(State(node): State<Arc<Node>>, request: Request) -> Response {
    if let Some(reason) = ambiguous_path(request.uri().path()) {
        return bad_request(reason);
    }
    let path = request.uri().path().to_ascii_lowercase();
    if path == SOCKET_PATH || path == SOCKET_ALIAS {
        socket(node, request).await
    } else if path.contains(BROADCAST_MARKER) {
        broadcast(node, request).await
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

fn bad_request(reason: impl Into<String>) -> Response {
    let mut text = reason.into();
    text.push('\n');
    (StatusCode::BAD_REQUEST, text).into_response()
}

fn refuse(node: &Node, status: StatusCode, reason: &'static str, text: String) -> Response {
    node.metrics.refused(reason);
    let mut text = text;
    text.push('\n');
    let mut response = (status, text).into_response();
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"wshub\""),
        );
    }
    response
}

/// `GET /__initializeWebSocket.wc?groupid=G&userid=U` with Upgrade.
///
/// In order: a WebSocket upgrade (else 404, as Web Connection), the origin
/// (403), the identity from the token in token mode (401) or the query,
/// then the node's capacity (503 when full or draining, 429 per address).
async fn socket(node: Arc<Node>, request: Request) -> Response {
    let (mut parts, _body) = request.into_parts();
    let Ok(upgrade) = WebSocketUpgrade::from_request_parts(&mut parts, &()).await else {
        // Web Connection answers a plain GET of the socket path with 404.
        return (
            StatusCode::NOT_FOUND,
            "not found: this path only accepts WebSocket upgrades\n",
        )
            .into_response();
    };
    let origin = parts
        .headers
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok());
    if !auth::origin_allowed(&node.config.auth.allowed_origins, origin) {
        let text = format!("origin {} is not allowed", origin.unwrap_or_default());
        return refuse(&node, StatusCode::FORBIDDEN, "origin", text);
    }
    let pairs = match query_pairs(parts.uri.query()) {
        Ok(pairs) => pairs,
        Err(e) => return refuse(&node, StatusCode::BAD_REQUEST, "bad_request", e),
    };
    let who = match node.tokens() {
        Some(tokens) => match auth::token_from_request(&pairs, &parts.headers)
            .ok_or(auth::TokenError::Missing)
            .and_then(|t| tokens.verify(&t))
        {
            Ok(who) => who,
            Err(e) => return refuse(&node, StatusCode::UNAUTHORIZED, "token", e.to_string()),
        },
        None => identity_from_query(&pairs),
    };
    // One check for both modes: query ids and token claims alike.
    let max_id = node.config.limits.max_id_bytes;
    for (name, id) in [
        ("user id", Some(&*who.user)),
        ("group id", who.group.as_deref()),
    ] {
        if id.is_some_and(|id| id.len() > max_id) {
            let text = format!("the {name} is longer than {max_id} bytes");
            return refuse(&node, StatusCode::BAD_REQUEST, "bad_request", text);
        }
    }
    let peer = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0);
    let ip = peer.map(|p| auth::client_ip(p, &parts.headers, &node.config.auth.trusted_proxies));
    let registration = match node.connect(who, ip).await {
        Ok(r) => r,
        Err(e @ ConnectError::Draining) => {
            return refuse(
                &node,
                StatusCode::SERVICE_UNAVAILABLE,
                "draining",
                e.to_string(),
            );
        }
        Err(e @ ConnectError::AtCapacity(_)) => {
            return refuse(
                &node,
                StatusCode::SERVICE_UNAVAILABLE,
                "capacity",
                e.to_string(),
            );
        }
        Err(e @ ConnectError::TooManyFromIp(_)) => {
            return refuse(
                &node,
                StatusCode::TOO_MANY_REQUESTS,
                "per_ip",
                e.to_string(),
            );
        }
        Err(e @ ConnectError::Bus(_)) => {
            warn!(error = %e, "refusing a socket: bus subscription failed");
            return refuse(&node, StatusCode::SERVICE_UNAVAILABLE, "bus", e.to_string());
        }
    };
    let max = node.config.limits.max_message_bytes;
    let ws = &node.config.ws;
    // Held until the session ends, so shutdown waits for it.
    let tracked = node.sessions.token();
    upgrade
        // Chosen when the client offers it (with a token in the protocol
        // list, browsers require the server to choose one).
        .protocols([auth::PROTOCOL])
        .read_buffer_size(ws.read_buffer_bytes)
        .write_buffer_size(ws.write_buffer_bytes)
        .max_message_size(max)
        .max_frame_size(max)
        .on_failed_upgrade(|e| debug!(error = %e, "websocket upgrade failed"))
        .on_upgrade(move |socket| async move {
            crate::session::run(socket, registration).await;
            drop(tracked);
        })
}

fn query_pairs(query: Option<&str>) -> Result<Vec<(String, String)>, String> {
    serde_urlencoded::from_str(query.unwrap_or(""))
        .map_err(|e| format!("invalid query string: {e}"))
}

/// Reads `groupid` and `userid` from the query pairs, keys in any case
/// (open mode).
///
/// A missing or empty `userid` gets a random 12-hex-digit id. A missing
/// `groupid` is the null group; `groupid=` is the group `""`, which is not
/// the same (Web Connection behaves so).
pub fn identity_from_query(pairs: &[(String, String)]) -> Identity {
    let mut user = None;
    let mut group = None;
    for (key, value) in pairs {
        if key.eq_ignore_ascii_case("userid") {
            user = Some(value.clone());
        } else if key.eq_ignore_ascii_case("groupid") {
            group = Some(value.clone());
        }
    }
    let user = user
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| format!("{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff));
    Identity {
        user: user.into(),
        group: group.map(Into::into),
    }
}

/// Whether a peer may use the broadcast endpoint: loopback, or an address in
/// one of `broadcast.trusted_networks`.
pub fn broadcast_allowed(peer: SocketAddr, trusted: &[ipnet::IpNet]) -> bool {
    let ip = peer.ip().to_canonical();
    ip.is_loopback() || trusted.iter().any(|net| net.contains(&ip))
}

/// `POST`/`PUT` of one message JSON to any path containing
/// `__broadcastwebsocket.wc`: delivered like `broadcast`, answered 204.
async fn broadcast(node: Arc<Node>, request: Request) -> Response {
    let response = broadcast_inner(&node, request).await;
    node.metrics.http_broadcast(response.status().as_u16());
    response
}

async fn broadcast_inner(node: &Node, request: Request) -> Response {
    if request.method() != Method::POST && request.method() != Method::PUT {
        return (
            StatusCode::METHOD_NOT_ALLOWED,
            [(header::ALLOW, "POST, PUT")],
            "the broadcast endpoint accepts POST or PUT\n",
        )
            .into_response();
    }
    // With keys configured, a valid key is required from anywhere; without,
    // only loopback and trusted networks may push.
    let keys = &node.config.broadcast.api_keys;
    if !keys.is_empty() {
        if !auth::key_valid(keys, auth::presented_key(request.headers())) {
            return (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer realm=\"wshub\"")],
                "unauthorized: a valid API key is required (Authorization: Bearer <key> or X-Api-Key)\n",
            )
                .into_response();
        }
    } else if !request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .is_some_and(|c| broadcast_allowed(c.0, &node.config.broadcast.trusted_networks))
    {
        return (
            StatusCode::FORBIDDEN,
            "forbidden: the broadcast endpoint only accepts requests from loopback and broadcast.trusted_networks\n",
        )
            .into_response();
    }
    let max = node.config.limits.max_message_bytes;
    let body = match axum::body::to_bytes(request.into_body(), max).await {
        Ok(body) => body,
        Err(_) => {
            node.metrics.dropped(crate::metrics::DropReason::TooBig, 1);
            return (
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("message larger than {max} bytes\n"),
            )
                .into_response();
        }
    };
    let Ok(text) = std::str::from_utf8(&body) else {
        return bad_request("invalid message: the body must be UTF-8 JSON");
    };
    match node.publish_text(text) {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(PublishError::Invalid(e)) => bad_request(e.to_string()),
        Err(e @ PublishError::FanOutTooLarge { .. }) => {
            (StatusCode::PAYLOAD_TOO_LARGE, format!("{e}\n")).into_response()
        }
        Err(PublishError::Bus(e)) => {
            (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")).into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let q = |s: &str| query_pairs(Some(s)).unwrap();
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
        let who = identity_from_query(&q("userid=a%20b&groupid=x%2By"));
        assert_eq!((&*who.user, who.group.as_deref()), ("a b", Some("x+y")));
    }
}
