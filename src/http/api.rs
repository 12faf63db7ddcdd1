//! The server API, `/api/*`: what a backend or an operator may ask of the
//! whole cluster, from any node (`docs/api.md`): `GET /api/nodes`, and with
//! presence on `GET /api/presence/groups/{G}`, `/api/presence/nullgroup`
//! and `/api/presence/users?ids=` (404 `presence_off` with it off).
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
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use serde::{Deserialize, Serialize};
use tracing::warn;

use super::{BROADCAST_MARKER, HttpState, ambiguous_path};
use crate::auth::{self, Denied};
use crate::bus::BusError;
use crate::bus::presence::{GroupView, UserView};
use crate::bus::registry::NodeEntry;
use crate::logging::Untrusted;
use crate::refusal_log::Verdict;

/// The `/api` routes (nested under `/api` by the HTTP router).
pub(super) fn routes(http: HttpState) -> Router<HttpState> {
    Router::new()
        .route("/nodes", get(nodes))
        .route("/presence/groups/{group}", get(presence_group))
        .route("/presence/nullgroup", get(presence_nullgroup))
        .route("/presence/users", get(presence_users))
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

/// Most ids in one `GET /api/presence/users` (each is one hash read in
/// one script).
const MAX_USER_IDS: usize = 1000;

/// The node's presence, or 404 when presence is off (with the per-user
/// limit alone too: nothing is kept per group).
fn presence(http: &HttpState) -> Result<&std::sync::Arc<crate::presence::Presence>, ApiError> {
    http.node.presence().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "presence_off",
            "cluster presence is off on this node (presence.enabled = false; see docs/presence.md)",
        )
    })
}

fn no_store(view: impl Serialize) -> Response {
    (
        [(header::CACHE_CONTROL, HeaderValue::from_static("no-store"))],
        Json(view),
    )
        .into_response()
}

/// `GET /api/presence/groups/{G}`: the group's members (the path segment
/// is URL-decoded).
async fn presence_group(
    State(http): State<HttpState>,
    Path(group): Path<String>,
) -> Result<Response, ApiError> {
    let view: GroupView = presence(&http)?.group(Some(&group)).await?;
    Ok(no_store(view))
}

/// `GET /api/presence/nullgroup`: the null group's members.
async fn presence_nullgroup(State(http): State<HttpState>) -> Result<Response, ApiError> {
    let view: GroupView = presence(&http)?.group(None).await?;
    Ok(no_store(view))
}

#[derive(Deserialize)]
struct UsersQuery {
    ids: Option<String>,
}

/// `GET /api/presence/users?ids=a,b`: each user's state, keyed by id.
async fn presence_users(
    State(http): State<HttpState>,
    Query(query): Query<UsersQuery>,
) -> Result<Response, ApiError> {
    #[derive(Serialize)]
    struct Users {
        users: std::collections::BTreeMap<String, UserView>,
    }
    let presence = presence(&http)?;
    let mut ids: Vec<String> = query
        .ids
        .as_deref()
        .unwrap_or("")
        .split(',')
        .filter(|id| !id.is_empty())
        .map(str::to_owned)
        .collect();
    ids.sort();
    ids.dedup();
    if ids.is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "name the users: ?ids=a,b (comma-separated, URL-encoded)",
        ));
    }
    if ids.len() > MAX_USER_IDS {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("at most {MAX_USER_IDS} ids per request"),
        ));
    }
    let views = presence.users(&ids).await?;
    Ok(no_store(Users {
        users: ids.into_iter().zip(views).collect(),
    }))
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
