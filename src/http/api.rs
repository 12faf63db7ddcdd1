//! The server API, `/api/*`: what a backend or an operator may ask of the
//! whole cluster, from any node (`docs/api.md`): `POST /api/publish`,
//! `POST /api/disconnect`, `GET /api/nodes`, `GET /api/topics`,
//! `GET /api/history/{topic}`, and with presence on
//! `GET /api/presence/groups/{G}`, `/api/presence/nullgroup` and
//! `/api/presence/users?ids=` (404 `presence_off` with it off). The rules
//! live in the node (`src/node/cluster.rs`, `src/presence.rs`); here
//! requests are read and answers written.
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
//!   and the error format come with the router. Path parameters and
//!   queries are read with [`ApiPath`] and [`ApiQuery`], bodies with
//!   [`json_body`], never with axum's `Path`, `Query` or `Json`, whose
//!   rejections are plain text.
//!
//! Web Connection's broadcast endpoint is any path containing
//! `__broadcastWebSocket.wc`, under `/api/` too: such paths (and paths
//! `dispatch` refuses as ambiguous) are handed back to it untouched.

use axum::Router;
use axum::extract::{FromRequestParts, Path, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use tracing::warn;

use super::{BROADCAST_MARKER, HttpState, ambiguous_path};
use crate::auth::{self, Denied};
use crate::bus::BusError;
use crate::bus::presence::{GroupView, UserView};
use crate::bus::registry::NodeEntry;
use crate::history::{Position, client_key, topic_of_client_key};
use crate::logging::Untrusted;
use crate::node::{Disconnect, PublishError, ServerApiError, position_in};
use crate::outcome::{DISCONNECT_CODE, DropReason};
use crate::refusal_log::Verdict;
use crate::route::{MAX_CONNECTION_ID_LEN, Topic, connection_number};

/// Most messages in one `POST /api/publish`.
const MAX_PUBLISH_MESSAGES: usize = 1000;
/// Longest idempotency key, in bytes.
const MAX_KEY_BYTES: usize = 200;
/// Longest ban, in milliseconds: 30 days (Redis refuses expiries past
/// `i64` milliseconds; a node alone must refuse what a cluster would).
const MAX_BAN_MS: u64 = 30 * 24 * 3600 * 1000;
/// Longest close reason: what fits a close frame (125 bytes less the code).
const MAX_REASON_BYTES: usize = 123;
/// `GET /api/history/*`: messages when `limit` is not given, and at most.
const HISTORY_LIMIT: (usize, usize) = (100, 1000);

/// The `/api` routes (nested under `/api` by the HTTP router).
pub(super) fn routes(http: HttpState) -> Router<HttpState> {
    Router::new()
        .route("/nodes", get(nodes))
        .route("/presence/groups/{*group}", get(presence_group))
        .route("/presence/groups/", get(presence_empty_group))
        .route("/presence/nullgroup", get(presence_nullgroup))
        .route("/presence/users", get(presence_users))
        .route("/publish", post(publish))
        .route("/disconnect", post(disconnect))
        .route("/topics", get(topics))
        .route("/history/{*topic}", get(history))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(http, protect))
}

/// `/api/`, which the nested [`routes`] do not match: protected and
/// answered like any unknown API path.
pub(super) fn root(http: HttpState) -> Router<HttpState> {
    Router::new()
        .route("/api/", axum::routing::any(not_found))
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

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    /// An extractor's rejection, with its status and text: 413
    /// `too_large`, any other 4xx `bad_request` (a 5xx is a bug here).
    fn rejected(status: StatusCode, text: String) -> Self {
        let code = match status {
            StatusCode::PAYLOAD_TOO_LARGE => "too_large",
            s if s.is_client_error() => "bad_request",
            _ => "internal",
        };
        Self::new(status, code, text)
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
            Denied::CrossSite => Self::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "the server API does not take requests from web pages of other sites \
                 (without broadcast.api_keys it trusts addresses, which a browser would lend them): \
                 the request's Sec-Fetch-Site, or its Origin against its Host, says another site \
                 (behind a proxy, pass the browser's Host as sent)",
            ),
        }
    }

    /// The refusal log's label: one line per client and label a minute.
    fn label(&self) -> &'static str {
        match self.code {
            "unauthorized" => "api_unauthorized",
            "forbidden" => "api_forbidden",
            "bad_request" => "api_bad_request",
            "too_large" => "api_too_large",
            "timeout" => "api_timeout",
            "not_found" => "api_not_found",
            "method_not_allowed" => "api_method_not_allowed",
            "presence_off" => "api_presence_off",
            "history_off" => "api_history_off",
            "in_progress" => "api_in_progress",
            _ => "api_refused",
        }
    }
}

/// What an [`ApiError`] answer carries for [`protect`] to log: every
/// refusal of a client's request (4xx) is logged, not only the key's (a
/// review sent bad bodies and queries with a valid key and found no
/// line).
#[derive(Clone)]
struct Refusal {
    label: &'static str,
    message: String,
}

impl From<BusError> for ApiError {
    fn from(e: BusError) -> Self {
        let code = match e {
            BusError::Unavailable(_) => "unavailable",
            BusError::Overloaded => "overloaded",
            BusError::BatchTooLarge(_) => "too_large",
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
        if self.status.is_client_error() {
            response.extensions_mut().insert(Refusal {
                label: self.label(),
                message: self.message.clone(),
            });
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"wshub\""),
            );
        }
        if self.code == "in_progress" {
            // The other request settles within moments.
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

/// A path parameter, percent-decoded: axum's `Path`, its rejections
/// (a segment that is not UTF-8 once decoded) answered as [`ApiError`]s.
struct ApiPath<T>(T);

impl<T, S> FromRequestParts<S> for ApiPath<T>
where
    T: serde::de::DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(value)) => Ok(Self(value)),
            Err(rejection) => Err(ApiError::rejected(
                rejection.status(),
                rejection.body_text(),
            )),
        }
    }
}

/// The query, read strictly as `T`: a query that is not UTF-8 once
/// percent-decoded is refused (not decoded lossily into U+FFFD), and so is
/// a parameter given twice (`?ids=a&ids=b`); both 400 `bad_request`.
struct ApiQuery<T>(T);

impl<T, S> FromRequestParts<S> for ApiQuery<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        read_query(parts.uri.query().unwrap_or("")).map(Self)
    }
}

/// [`ApiQuery`]'s reading. `&` and `=` are ASCII, so the whole query is
/// UTF-8 once decoded exactly when every name and value is.
fn read_query<T: serde::de::DeserializeOwned>(query: &str) -> Result<T, ApiError> {
    if percent_encoding::percent_decode_str(query)
        .decode_utf8()
        .is_err()
    {
        return Err(ApiError::bad_request(
            "invalid query: it is not UTF-8 once percent-decoded",
        ));
    }
    serde_urlencoded::from_str(query)
        .map_err(|e| ApiError::bad_request(format!("invalid query: {e}")))
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
        // Web Connection's rule: a path with the marker is the broadcast
        // endpoint wherever it appears. Sent there before the API's routes
        // are matched: a review found `/api/history/group:x__broadcast…`
        // and `/api/presence/groups/x__broadcast…` served without a key,
        // since the API's routes took the names and nothing checked them.
        return super::dispatch(State(http), request).await;
    }
    if ambiguous_path(request.uri().path()).is_some() {
        // A dot-segment or an encoded `.` or `/` is refused before any
        // route takes it as a name (`/api/presence/groups/..` was read as
        // the group `..`), as outside the API (400, here as JSON).
        return super::dispatch(State(http), request).await;
    }
    let peer = request
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0);
    let client = http.peer(&request);
    // The whole path: the nested router sees it without `/api`.
    let path = request
        .extensions()
        .get::<axum::extract::OriginalUri>()
        .map_or_else(|| request.uri().clone(), |o| o.0.clone());
    let mut response = match auth::backend_access(&http.config.broadcast, request.headers(), peer) {
        Ok(()) => next.run(request).await,
        Err(denied) => ApiError::denied(denied).into_response(),
    };
    if let Some(refusal) = response.extensions_mut().remove::<Refusal>() {
        log_refusal(&http, client, response.status(), path.path(), refusal);
    }
    response
}

/// Logs a refused API request, at most once a minute per client and kind
/// of refusal (with a count of the rest).
fn log_refusal(
    http: &HttpState,
    client: Option<std::net::IpAddr>,
    status: StatusCode,
    path: &str,
    refusal: Refusal,
) {
    // Tokio's clock, as the other refusals (tests can pause it).
    let now = tokio::time::Instant::now().into_std();
    if let Verdict::Log {
        suppressed,
        overflow,
    } = http.refusals.note(client, refusal.label, now)
    {
        let peer = client.map_or_else(|| "unknown".to_owned(), |p| p.to_string());
        let status = status.as_u16();
        let path = Untrusted(path);
        let label = refusal.label;
        warn!(%peer, status, what = "api", label, %path, reason = %Untrusted(refusal.message.as_str()),
            suppressed, overflow, "request refused");
    }
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

/// `GET /api/presence/groups/{G}`: the group's members. Everything after
/// `groups/` is the name, URL-decoded segment by segment, as for
/// `/api/history/`: a group whose name holds `/` has its path (its `/`
/// ended the segment, and its encoded form `%2F` is refused).
async fn presence_group(
    State(http): State<HttpState>,
    ApiPath(group): ApiPath<String>,
) -> Result<Response, ApiError> {
    let view: GroupView = presence(&http)?.group(Some(&group)).await?;
    Ok(fresh(view))
}

/// `GET /api/presence/groups/`: the group `""` (sockets opened with
/// `groupid=`), which Web Connection tells from the null group.
async fn presence_empty_group(State(http): State<HttpState>) -> Result<Response, ApiError> {
    let view: GroupView = presence(&http)?.group(Some("")).await?;
    Ok(fresh(view))
}

/// `GET /api/presence/nullgroup`: the null group's members.
async fn presence_nullgroup(State(http): State<HttpState>) -> Result<Response, ApiError> {
    let view: GroupView = presence(&http)?.group(None).await?;
    Ok(fresh(view))
}

#[derive(Deserialize)]
struct UsersQuery {
    ids: Option<String>,
}

/// `GET /api/presence/users?ids=a,b`: each user's state, keyed by id.
///
/// `ids` is split at its commas once decoded, so that a client which
/// URL-encodes the whole list (`curl --data-urlencode "ids=ann,bob"` sends
/// `ids=ann%2Cbob`) asks for two users; a user id with a comma in it
/// cannot be asked for here (docs/api.md).
async fn presence_users(
    State(http): State<HttpState>,
    ApiQuery(query): ApiQuery<UsersQuery>,
) -> Result<Response, ApiError> {
    #[derive(Serialize)]
    struct Users {
        users: std::collections::BTreeMap<String, UserView>,
    }
    let presence = presence(&http)?;
    let list = query.ids.as_deref().unwrap_or("");
    if list.is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "name the users: ?ids=a,b (comma-separated, URL-encoded)",
        ));
    }
    // No user has an empty id (the hub gives one to a socket without):
    // `a,,b` or `a,b,` is a list built wrong, said so rather than
    // answered without the empty one.
    if list.split(',').any(str::is_empty) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "`ids` holds an empty id (two commas in a row, or one at an end): no user has an empty id",
        ));
    }
    let mut ids: Vec<String> = list.split(',').map(str::to_owned).collect();
    ids.sort();
    ids.dedup();
    if ids.len() > MAX_USER_IDS {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("at most {MAX_USER_IDS} ids per request"),
        ));
    }
    let views = presence.users(&ids).await?;
    Ok(fresh(Users {
        users: ids.into_iter().zip(views).collect(),
    }))
}

/// An answer nobody should cache.
fn fresh(body: impl Serialize) -> Response {
    (
        [(header::CACHE_CONTROL, HeaderValue::from_static("no-store"))],
        Json(body),
    )
        .into_response()
}

/// The body of a request, at most `limit` bytes, as JSON of type `T`.
async fn json_body<T: serde::de::DeserializeOwned>(
    http: &HttpState,
    request: Request,
    limit: usize,
) -> Result<T, ApiError> {
    let body = super::read_body(http, request, limit)
        .await
        .map_err(|e| match e {
            super::BodyError::TooLarge => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("the request body is larger than {limit} bytes"),
            ),
            super::BodyError::Broken(why) => {
                ApiError::bad_request(format!("the request body could not be read: {why}"))
            }
            super::BodyError::Late(after) => ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "timeout",
                format!(
                    "the request body did not arrive within {} ms",
                    after.as_millis()
                ),
            ),
        })?;
    // A UTF-8 byte-order mark in front is read past, as the broadcast
    // endpoint does (text from a Windows or .NET API may carry one).
    let body = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&body);
    // Every body of the API is an object. serde reads a struct from an
    // array too, field by field (`[[{…}],"key"]` published: review of
    // 2026-12-03).
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ApiError::bad_request(
            "the body is not the JSON this endpoint takes: it must be a JSON object ({…})",
        ));
    }
    serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!(
            "the body is not the JSON this endpoint takes: {}",
            crate::message::json_error_text(&e)
        ))
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishRequest {
    /// Each message's text as sent: read as the broadcast endpoint reads
    /// its body (a `Value` would be held to serde_json's recursion limit,
    /// which the broadcast endpoint's reading is not).
    messages: Vec<Box<serde_json::value::RawValue>>,
    #[serde(default)]
    idempotency_key: Option<String>,
}

/// `POST /api/publish`: `{"messages":[…],"idempotency_key":"k"}`.
async fn publish(State(http): State<HttpState>, request: Request) -> Result<Response, ApiError> {
    let max = http.config.limits.max_message_bytes;
    let limit = max.saturating_mul(16).max(1 << 20);
    let body: PublishRequest = json_body(&http, request, limit).await?;
    if body.messages.len() > MAX_PUBLISH_MESSAGES {
        return Err(ApiError::bad_request(format!(
            "at most {MAX_PUBLISH_MESSAGES} messages per request"
        )));
    }
    if let Some(key) = &body.idempotency_key
        && (key.is_empty() || key.len() > MAX_KEY_BYTES)
    {
        return Err(ApiError::bad_request(format!(
            "idempotency_key must be 1 to {MAX_KEY_BYTES} bytes"
        )));
    }
    let mut texts = Vec::with_capacity(body.messages.len());
    for (index, message) in body.messages.iter().enumerate() {
        let text = message.get().to_owned();
        if text.len() > max {
            http.metrics.dropped(DropReason::TooBig, 1);
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("messages[{index}]: larger than {max} bytes"),
            ));
        }
        texts.push(text);
    }
    // On a task of its own: hyper drops this handler when the client hangs
    // up, which cancelled a claim in flight before its withdrawal could
    // run, or a release after a refused batch, and left the key pending
    // for nobody (409 for every retry until it expired: review of
    // 2026-12-03).
    let node = http.node.clone();
    let key = body.idempotency_key;
    let published = tokio::spawn(async move { node.publish_all(&texts, key.as_deref()).await })
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!("the publish failed: {e}"),
            )
        })?;
    match published {
        Ok(answer) => Ok(fresh(answer)),
        Err(e @ ServerApiError::Invalid { .. }) => {
            let too_large = matches!(
                e,
                ServerApiError::Invalid {
                    source: PublishError::FanOutTooLarge { .. },
                    ..
                }
            );
            if too_large {
                Err(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "too_large",
                    e.to_string(),
                ))
            } else {
                Err(ApiError::bad_request(e.to_string()))
            }
        }
        Err(
            e @ ServerApiError::Bus {
                source: BusError::BatchTooLarge(_),
                ..
            },
        ) => Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            e.to_string(),
        )),
        Err(
            e @ (ServerApiError::Bus { .. }
            | ServerApiError::Claim { .. }
            | ServerApiError::Unsent { .. }
            | ServerApiError::Unsettled),
        ) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            e.to_string(),
        )),
        Err(e @ ServerApiError::InProgress) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "in_progress",
            e.to_string(),
        )),
    }
}

/// Reads a `POST /api/disconnect` body.
fn disconnect_order(
    body: &serde_json::Map<String, serde_json::Value>,
    max_id_bytes: usize,
) -> Result<Disconnect, ApiError> {
    use serde_json::Value;
    const FIELDS: [&str; 6] = [
        "userId",
        "groupId",
        "connectionId",
        "code",
        "reason",
        "ban_ms",
    ];
    if let Some(unknown) = body.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(ApiError::bad_request(format!(
            "unknown field `{unknown}` (expected one of userId, groupId, connectionId, and code, reason, ban_ms)"
        )));
    }
    let text = |name: &str| -> Result<Option<&str>, ApiError> {
        match body.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(ApiError::bad_request(format!("`{name}` must be a string"))),
        }
    };
    // An id no socket can have (the upgrade and `/api/publish` refuse
    // it) is a mistake, not an order that reaches nobody.
    // (`groupId`'s null is the null group, below: review of 2026-12-03,
    // it was refused here as "must be a string".)
    for name in ["userId", "groupId"] {
        let id = match body.get(name) {
            Some(Value::Null) if name == "groupId" => None,
            _ => text(name)?,
        };
        if id.is_some_and(|id| id.len() > max_id_bytes) {
            return Err(ApiError::bad_request(format!(
                "`{name}` is longer than {max_id_bytes} bytes (limits.max_id_bytes): no socket has it"
            )));
        }
    }
    let targets = ["userId", "groupId", "connectionId"]
        .iter()
        .filter(|k| body.contains_key(**k))
        .count();
    if targets != 1 {
        return Err(ApiError::bad_request(
            "exactly one of userId, groupId or connectionId is required",
        ));
    }
    let target = if let Some(user) = text("userId")? {
        if user.is_empty() {
            return Err(ApiError::bad_request("userId must not be empty"));
        }
        Topic::User(user.into())
    } else if body.contains_key("groupId") {
        // "" and null are the null group, as in recipients.
        match body.get("groupId") {
            Some(Value::Null) => Topic::Group(None),
            _ => Topic::Group(text("groupId")?.filter(|g| !g.is_empty()).map(Into::into)),
        }
    } else {
        let connection = text("connectionId")?.unwrap_or_default();
        if connection.len() > MAX_CONNECTION_ID_LEN || connection_number(connection).is_none() {
            return Err(ApiError::bad_request(
                "connectionId is not a connection id (<node id>-<instance>-<number>, as in X-Wshub-Connection-Id)",
            ));
        }
        Topic::Connection(connection.into())
    };
    // The options' null is their absence (as `ban_ms`'s always was).
    let code = match body.get("code") {
        None | Some(Value::Null) => DISCONNECT_CODE,
        Some(value) => match value.as_u64() {
            Some(code @ 4000..=4999) => code as u16,
            _ => {
                return Err(ApiError::bad_request(
                    "code must be an integer from 4000 to 4999",
                ));
            }
        },
    };
    let reason = match body.get("reason") {
        Some(Value::Null) => None,
        _ => text("reason")?.map(str::to_owned),
    };
    if reason.as_ref().is_some_and(|r| r.len() > MAX_REASON_BYTES) {
        return Err(ApiError::bad_request(format!(
            "reason must be at most {MAX_REASON_BYTES} bytes (it travels in the close frame)"
        )));
    }
    let ban = match body.get("ban_ms") {
        None | Some(Value::Null) => None,
        Some(value) => match value.as_u64() {
            Some(ms @ 1..=MAX_BAN_MS) => Some(std::time::Duration::from_millis(ms)),
            _ => {
                return Err(ApiError::bad_request(format!(
                    "ban_ms must be an integer from 1 to {MAX_BAN_MS} (30 days)"
                )));
            }
        },
    };
    if ban.is_some() && !matches!(target, Topic::User(_)) {
        return Err(ApiError::bad_request(
            "ban_ms needs userId: bans are per user",
        ));
    }
    Ok(Disconnect {
        target,
        code,
        reason,
        ban,
    })
}

#[derive(Serialize)]
struct DisconnectAnswer {
    nodes_reached: u64,
}

/// A JSON object read with every key once: a repeated key is an error.
/// (`serde_json::Map` keeps the last: `{"userId":"a","userId":"b"}` banned
/// `b` without a word, where `/api/publish`'s typed body refuses it.)
struct UniqueKeys(serde_json::Map<String, serde_json::Value>);

impl<'de> Deserialize<'de> for UniqueKeys {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Keys;
        impl<'de> serde::de::Visitor<'de> for Keys {
            type Value = UniqueKeys;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<UniqueKeys, A::Error> {
                let mut out = serde_json::Map::new();
                while let Some(key) = map.next_key::<String>()? {
                    if out.contains_key(&key) {
                        return Err(serde::de::Error::custom(format_args!(
                            "duplicate field `{key}`"
                        )));
                    }
                    let value = map.next_value()?;
                    out.insert(key, value);
                }
                Ok(UniqueKeys(out))
            }
        }
        deserializer.deserialize_map(Keys)
    }
}

/// `POST /api/disconnect`: `{"userId"|"groupId"|"connectionId":…, "code", "reason", "ban_ms"}`.
async fn disconnect(State(http): State<HttpState>, request: Request) -> Result<Response, ApiError> {
    let UniqueKeys(body) = json_body(&http, request, 16 * 1024).await?;
    let order = disconnect_order(&body, http.config.limits.max_id_bytes)?;
    let nodes_reached = http.node.disconnect(&order).await?;
    Ok(fresh(DisconnectAnswer { nodes_reached }))
}

#[derive(Deserialize)]
struct TopicsQuery {
    #[serde(default)]
    prefix: String,
}

#[derive(Serialize)]
struct TopicsAnswer {
    topics: Vec<crate::node::TopicEntry>,
}

/// `GET /api/topics?prefix=group:`.
async fn topics(
    State(http): State<HttpState>,
    ApiQuery(query): ApiQuery<TopicsQuery>,
) -> Result<Response, ApiError> {
    let topics = http.node.topics(&query.prefix).await?;
    Ok(fresh(TopicsAnswer { topics }))
}

#[derive(Deserialize)]
struct HistoryQuery {
    #[serde(default)]
    since: Option<String>,
    /// Read as text and parsed here, so that its error names it (serde's
    /// said "invalid digit found in string").
    #[serde(default)]
    limit: Option<String>,
}

#[derive(Serialize)]
struct HistoryAnswer {
    topic: String,
    /// `null` for a topic without history (nothing was ever sent to it).
    epoch: Option<String>,
    top: u64,
    messages: Vec<HistoryEntry>,
}

#[derive(Serialize)]
struct HistoryEntry {
    position: String,
    message: serde_json::Value,
}

/// `GET /api/history/{topic}?since=<position>&limit=n` (history on).
async fn history(
    State(http): State<HttpState>,
    ApiPath(key): ApiPath<String>,
    ApiQuery(query): ApiQuery<HistoryQuery>,
) -> Result<Response, ApiError> {
    if !http.node.history_enabled() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "history_off",
            "history is off on this cluster (history.enabled)",
        ));
    }
    let topic = topic_of_client_key(&key).ok_or_else(|| {
        ApiError::bad_request(format!(
            "{key:?} is not a topic: all, nullgroup, group:<G> or user:<U>"
        ))
    })?;
    let since =
        match query.since.as_deref().filter(|s| !s.is_empty()) {
            None => None,
            Some(text) => Some(Position::parse(text).ok_or_else(|| {
                ApiError::bad_request("since must be a position, <epoch>:<offset>")
            })?),
        };
    let limit = match query.limit.as_deref().filter(|s| !s.is_empty()) {
        None => HISTORY_LIMIT.0,
        Some(text) => text.parse::<usize>().map_err(|_| {
            ApiError::bad_request(format!(
                "limit must be a whole number from 0 to {}",
                HISTORY_LIMIT.1
            ))
        })?,
    };
    if limit > HISTORY_LIMIT.1 {
        return Err(ApiError::bad_request(format!(
            "limit must be at most {}",
            HISTORY_LIMIT.1
        )));
    }
    let recent = match http.node.recent(&topic, since.as_ref(), limit).await {
        Some(Ok(recent)) => recent,
        Some(Err(e)) => {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                e.to_string(),
            ));
        }
        None => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "history_off",
                "history is off",
            ));
        }
    };
    let messages = recent
        .messages
        .iter()
        .filter_map(|envelope| {
            Some(HistoryEntry {
                position: position_in(envelope, &topic)?,
                message: serde_json::from_str(envelope.frame.as_str()).ok()?,
            })
        })
        .collect();
    Ok(fresh(HistoryAnswer {
        topic: client_key(&topic),
        epoch: recent.top.as_ref().map(|top| top.epoch.to_string()),
        top: recent.top.as_ref().map_or(0, |top| top.offset),
        messages,
    }))
}

/// A 400 `bad_request` as the API answers it, for a request refused
/// before it reached the API's routes (an ambiguous path).
pub(super) fn bad_request(message: String) -> Response {
    ApiError::bad_request(message).into_response()
}

/// (A broadcast path or an ambiguous one never gets here: `protect` sent
/// it on.)
async fn not_found() -> Response {
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
