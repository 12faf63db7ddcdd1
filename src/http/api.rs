//! The server API, `/api/*`: what a backend or an operator may ask of the
//! whole cluster, from any node (`docs/api.md`). Today `GET /api/nodes`.
//!
//! - **Protection**: every path here, unknown ones included, is protected
//!   like the broadcast endpoint, by the same check
//!   (`auth::backend_access`): with `broadcast.api_keys` set a valid key is
//!   required (401 without), otherwise only loopback and
//!   `broadcast.trusted_networks` may ask (403). Refusals are logged like
//!   the broadcast endpoint's, one line per peer and reason per minute.
//! - **Errors** are JSON, `{"error":{"code":"<word>","message":"<sentence>"}}`
//!   with the status ([`ApiError`]). An answer that needs Redis is 503
//!   `unavailable`, with the reason, while Redis cannot be reached.
//! - **Adding an endpoint**: a handler taking `State<HttpState>` and
//!   returning `Result<_, ApiError>`, routed in [`routes`]; the protection
//!   and the error format come with the router.
//!
//! Web Connection's broadcast endpoint is any path containing
//! `__broadcastWebSocket.wc`, under `/api/` too: such paths (and paths
//! `dispatch` refuses as ambiguous) are handed back to it untouched.

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use serde::Serialize;
use tracing::warn;

use super::{BROADCAST_MARKER, HttpState, ambiguous_path};
use crate::auth::{self, Denied};
use crate::bus::BusError;
use crate::bus::registry::NodeEntry;
use crate::logging::Untrusted;
use crate::refusal_log::Verdict;

/// The `/api` routes (nested under `/api` by the HTTP router).
pub(super) fn routes(http: HttpState) -> Router<HttpState> {
    Router::new()
        .route("/nodes", get(nodes))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(http, protect))
}

/// An answer of the server API that is not a success: its status, a
/// one-word code a program can act on, and a sentence for a person. The
/// message never holds a key or secret.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    fn denied(denied: Denied) -> Self {
        match denied {
            Denied::Unauthorized => Self::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "a valid API key is required (Authorization: Bearer <key> or X-Api-Key)",
            ),
            Denied::Forbidden => Self::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "the server API only accepts requests from loopback and broadcast.trusted_networks, \
                 or with a key once broadcast.api_keys is set",
            ),
        }
    }

    /// The refusal log's label.
    fn label(&self) -> &'static str {
        match self.status {
            StatusCode::UNAUTHORIZED => "api_unauthorized",
            _ => "api_forbidden",
        }
    }
}

impl From<BusError> for ApiError {
    fn from(e: BusError) -> Self {
        let code = match e {
            BusError::Unavailable(_) => "unavailable",
            BusError::Overloaded => "overloaded",
        };
        Self::new(StatusCode::SERVICE_UNAVAILABLE, code, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        #[derive(Serialize)]
        struct Body<'a> {
            error: Detail<'a>,
        }
        #[derive(Serialize)]
        struct Detail<'a> {
            code: &'a str,
            message: &'a str,
        }
        let body = Body {
            error: Detail {
                code: self.code,
                message: &self.message,
            },
        };
        let mut response = (self.status, Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"wshub\""),
            );
        }
        response
    }
}

/// Whether a path belongs to Web Connection's broadcast endpoint (which
/// protects itself) rather than to the API.
fn is_broadcast_path(path: &str) -> bool {
    path.to_ascii_lowercase().contains(BROADCAST_MARKER)
}

/// Lets a request through when the broadcast endpoint's policy allows its
/// sender; answers 401 or 403 otherwise.
async fn protect(State(http): State<HttpState>, request: Request, next: Next) -> Response {
    if is_broadcast_path(request.uri().path()) {
        return next.run(request).await;
    }
    let peer = request
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0);
    let Err(denied) = auth::backend_access(&http.config.broadcast, request.headers(), peer) else {
        return next.run(request).await;
    };
    let error = ApiError::denied(denied);
    let client = http.peer(&request);
    let label = error.label();
    // Tokio's clock, as the other refusals (tests can pause it).
    let now = tokio::time::Instant::now().into_std();
    if let Verdict::Log {
        suppressed,
        overflow,
    } = http.refusals.note(client, label, now)
    {
        let peer = client.map_or_else(|| "unknown".to_owned(), |p| p.to_string());
        let status = error.status.as_u16();
        let path = Untrusted(request.uri().path());
        warn!(%peer, status, what = "api", label, %path, reason = %error.message, suppressed, overflow,
            "request refused");
    }
    error.into_response()
}

/// `GET /api/nodes`: the node registry.
#[derive(Serialize)]
struct NodesAnswer {
    nodes: Vec<NodeEntry>,
}

async fn nodes(State(http): State<HttpState>) -> Result<Response, ApiError> {
    let nodes = http.node.nodes().await?;
    Ok((
        [(header::CACHE_CONTROL, HeaderValue::from_static("no-store"))],
        Json(NodesAnswer { nodes }),
    )
        .into_response())
}

async fn not_found(State(http): State<HttpState>, request: Request) -> Response {
    let path = request.uri().path();
    if is_broadcast_path(path) || ambiguous_path(path).is_some() {
        return super::dispatch(State(http), request).await;
    }
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such API endpoint (see docs/api.md)",
    )
    .into_response()
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this API endpoint does not accept that method (see the Allow header)",
    )
}
