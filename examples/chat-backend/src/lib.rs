//! The server side of wshub's chat sample: what the FoxPro code of Web
//! Connection's chat sample does, as a small axum service.
//!
//! wshub forwards every client message whose action is not `broadcast` here
//! (`backend.url`), with the sender's verified identity in `X-Wshub-*`
//! headers, and with `backend.events` also `wshub.connect` /
//! `wshub.disconnect`. This service:
//!
//! - on `broadcastchatmessage`: renders the text from Markdown to HTML,
//!   sanitises it (only harmless tags and attributes survive), broadcasts
//!   the message to the group through the hub's broadcast endpoint, and,
//!   once the hub took it, keeps it among the group's last `keep`;
//! - on a client's `getinitialmessages`: sends that user `initialmessages`,
//!   a JSON array of the group's recent messages, as many of the newest as
//!   fit one request to the hub (`max_bytes`) (the chat page asks when it
//!   has nothing on screen yet, or when its resume was not recovered);
//! - on the hub's connect event (`X-Wshub-Event: connect`, action
//!   `wshub.connect`): the same, unless the hub resumed the socket
//!   (`X-Wshub-Resume: recovered` or `not_recovered`, lossless resume,
//!   docs/resume.md): a recovered socket was replayed what it missed, and a
//!   page that speaks resume asks for itself. So the history is sent on a
//!   connect only by a hub without history (no header) or for a socket that
//!   did not resume (`none`), as before.
//!
//! With a signing key ([`Verify`], `--signing-key`), every request must
//! carry a valid `X-Wshub-Signature` over its timestamp, nonce, method,
//! path, the hub's identity and event headers, and body (docs/backend.md,
//! "Signed requests"), signed within the last 5 minutes, its nonce never
//! seen before and no signed header given twice; anything else is
//! answered 401 and not processed.
//!
//! A chat message travels as action `broadcastchatmessage` whose `message`
//! is JSON text: `{"text": …, "html": …, "time": …}` ([`ChatEntry`]).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::net::TcpListener;

/// Settings of the service.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The hub's base URL, e.g. `http://127.0.0.1:8080`; pushes go to
    /// `<hub>/__broadcastWebSocket.wc`.
    pub hub: String,
    /// Messages kept per group.
    pub keep: usize,
    /// The largest request the hub's broadcast endpoint takes (its
    /// `limits.max_message_bytes`): `initialmessages` carries the newest
    /// messages that fit.
    pub max_bytes: usize,
    /// The hub's broadcast API key (`broadcast.api_keys`), sent as
    /// `Authorization: Bearer`; `None` where the hub trusts our address.
    pub hub_key: Option<String>,
}

/// One chat message as stored and as sent to browsers.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChatEntry {
    #[serde(rename = "userId")]
    pub user_id: String,
    /// The text as typed.
    pub text: String,
    /// The text rendered from Markdown and sanitised.
    pub html: String,
    /// Milliseconds since the Unix epoch.
    pub time: u64,
}

/// Renders Markdown to HTML that is safe to insert into a page: scripts,
/// event handlers, `javascript:` links and the like are removed.
pub fn render(markdown: &str) -> String {
    let mut html = String::new();
    let parser =
        pulldown_cmark::Parser::new_ext(markdown, pulldown_cmark::Options::ENABLE_STRIKETHROUGH);
    pulldown_cmark::html::push_html(&mut html, parser);
    ammonia::clean(&html)
}

#[derive(Default)]
struct History {
    // Key: the group, `None` for the null group.
    groups: HashMap<Option<String>, VecDeque<ChatEntry>>,
}

/// Signature checking: the hub's `backend.signing_key` and how old a
/// signed request may be.
#[derive(Clone)]
pub struct Verify {
    pub key: String,
    /// Requests signed longer ago (or this far in the future) are refused;
    /// signatures seen within it are refused as replays.
    pub window: std::time::Duration,
}

impl Verify {
    /// The documented window: 5 minutes.
    pub fn new(key: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            window: std::time::Duration::from_secs(300),
        }
    }
}

/// The nonces accepted within the window (to refuse a replay), with their
/// timestamps.
#[derive(Default)]
struct Seen(HashMap<String, u64>);

struct App {
    settings: Settings,
    verify: Option<Verify>,
    seen: Mutex<Seen>,
    http: reqwest::Client,
    history: Mutex<History>,
}

#[derive(Deserialize)]
struct Incoming {
    action: Option<String>,
    message: Option<String>,
}

fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    let raw = headers.get(name)?.to_str().ok()?;
    percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .ok()
        .map(|s| s.into_owned())
}

/// Whether the hub resumed the socket of a `wshub.connect` (it decided
/// `recovered` or `not_recovered`): its page then needs no history pushed.
fn resumed(headers: &HeaderMap) -> bool {
    matches!(
        header(headers, "x-wshub-resume").as_deref(),
        Some("recovered" | "not_recovered")
    )
}

/// The service's routes: it accepts messages on any path.
pub fn app(settings: Settings) -> Router {
    app_verifying(settings, None)
}

/// [`app`], checking every request's signature when `verify` is given.
pub fn app_verifying(settings: Settings, verify: Option<Verify>) -> Router {
    let app = Arc::new(App {
        settings,
        verify,
        seen: Mutex::default(),
        // Bounded, so that a push to a hub replica that went away (its
        // address gone mid-connect) fails fast instead of hanging for the
        // kernel's minutes of SYN retries.
        // Straight to the hub: never through a proxy from the environment
        // (which would get the hub key; containers inherit HTTP_PROXY).
        http: reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(2))
            .timeout(std::time::Duration::from_secs(10))
            .no_proxy()
            .build()
            .expect("a reqwest client with timeouts"),
        history: Mutex::default(),
    });
    Router::new().fallback(handle).with_state(app)
}

/// Serves on `listener` until the process ends.
pub async fn serve(listener: TcpListener, settings: Settings) -> std::io::Result<()> {
    axum::serve(listener, app(settings)).await
}

/// [`serve`], checking signatures when `verify` is given.
pub async fn serve_verifying(
    listener: TcpListener,
    settings: Settings,
    verify: Option<Verify>,
) -> std::io::Result<()> {
    axum::serve(listener, app_verifying(settings, verify)).await
}

fn hex_decode(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The hub's headers its signature covers, in the canonical string's
/// order (docs/backend.md, "Signed requests").
const SIGNED_HEADERS: [&str; 6] = [
    "x-wshub-user-id",
    "x-wshub-group-id",
    "x-wshub-node-id",
    "x-wshub-connection-id",
    "x-wshub-event",
    "x-wshub-resume",
];

impl App {
    /// Checks the request's signature; `Err` says why it is refused.
    fn check_signature(
        &self,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Result<(), &'static str> {
        use hmac::{KeyInit, Mac};
        let Some(verify) = &self.verify else {
            return Ok(());
        };
        let text = |name| headers.get(name).and_then(|v| v.to_str().ok());
        let (Some(timestamp), Some(nonce), Some(signature)) = (
            text("x-wshub-timestamp"),
            text("x-wshub-nonce"),
            text("x-wshub-signature"),
        ) else {
            return Err("unsigned request");
        };
        let Ok(signed_at) = timestamp.parse::<u64>() else {
            return Err("bad timestamp");
        };
        let signature = hex_decode(signature).ok_or("bad signature")?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let window = verify.window.as_secs();
        if now.abs_diff(signed_at) > window {
            return Err("signed outside the replay window");
        }
        // The canonical string of docs/backend.md: timestamp, nonce,
        // method, path with query, a line for each of the hub's signed
        // headers present, an empty line, the body.
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(verify.key.as_bytes())
            .expect("HMAC takes a key of any length");
        mac.update(format!("{timestamp}\n{nonce}\n{method}\n{path}\n").as_bytes());
        for name in SIGNED_HEADERS {
            let mut values = headers.get_all(name).iter();
            let Some(value) = values.next() else {
                continue;
            };
            if values.next().is_some() {
                // Which of two would a reader take? Neither.
                return Err("a signed header given twice");
            }
            mac.update(name.as_bytes());
            mac.update(b":");
            mac.update(value.as_bytes());
            mac.update(b"\n");
        }
        mac.update(b"\n");
        mac.update(body);
        // Compared in constant time.
        mac.verify_slice(&signature)
            .map_err(|_| "signature mismatch")?;
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.0.retain(|_, at| now.abs_diff(*at) <= window);
        if seen.0.insert(nonce.to_owned(), signed_at).is_some() {
            return Err("replayed request");
        }
        Ok(())
    }
}

async fn handle(
    State(app): State<Arc<App>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, String) {
    if let Err(why) = app.check_signature(&method, &uri, &headers, &body) {
        tracing::warn!(why, "refused a request to the backend");
        return (StatusCode::UNAUTHORIZED, format!("{why}\n"));
    }
    // The hub's headers say who sent it; ids in the body are not trusted.
    let Some(user) = header(&headers, "x-wshub-user-id") else {
        return (StatusCode::BAD_REQUEST, "missing X-Wshub-User-Id\n".into());
    };
    let group = header(&headers, "x-wshub-group-id");
    let Ok(msg) = serde_json::from_slice::<Incoming>(&body) else {
        return (StatusCode::BAD_REQUEST, "invalid message JSON\n".into());
    };
    // A hub event is known by its X-Wshub-Event header, which no client
    // message carries, not by its action (docs/backend.md).
    let event = header(&headers, "x-wshub-event");
    let result = match (event.as_deref(), msg.action.as_deref()) {
        (Some("connect"), _) if !resumed(&headers) => app.initial(user, group).await,
        // Disconnects and other events: nothing to do.
        (Some(_), _) => Ok(()),
        // `groupid=` is the group "", which no recipient can name: a
        // `group` recipient "" is the null group (docs/backend.md), so the
        // room's chat would reach the sockets without a group, not the
        // room. Refused: the sender reads "was not processed: backend
        // answered 422".
        (None, Some("broadcastchatmessage")) if group.as_deref() == Some("") => {
            return (
                StatusCode::UNPROCESSABLE_ENTITY,
                "the group \"\" (groupid= with no name) cannot be addressed; connect with a group name, or without groupid\n".into(),
            );
        }
        (None, Some("broadcastchatmessage")) => {
            app.chat(user, group, msg.message.unwrap_or_default()).await
        }
        (None, Some("getinitialmessages")) => app.initial(user, group).await,
        _ => Ok(()),
    };
    match result {
        Ok(()) => (StatusCode::NO_CONTENT, String::new()),
        // Too big for the hub once rendered (the HTML is about as long as
        // the text again): said as such, so the sender reads "backend
        // answered 413" rather than a gateway error.
        Err(e) if e.status() == Some(reqwest::StatusCode::PAYLOAD_TOO_LARGE) => (
            StatusCode::PAYLOAD_TOO_LARGE,
            "the message is too large once rendered\n".into(),
        ),
        Err(e) => (
            StatusCode::BAD_GATEWAY,
            format!("pushing to the hub failed: {e}\n"),
        ),
    }
}

impl App {
    async fn chat(
        &self,
        user: String,
        group: Option<String>,
        text: String,
    ) -> Result<(), reqwest::Error> {
        let entry = ChatEntry {
            user_id: user.clone(),
            html: render(&text),
            text,
            time: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
        };
        let message = serde_json::to_string(&entry).unwrap_or_default();
        self.push(json!({
            "userId": user,
            "groupId": group,
            "action": "broadcastchatmessage",
            "message": message,
            // "" is the null group (sockets that connected without groupid).
            "recipients": [{"type": "group", "value": group.as_deref().unwrap_or("")}],
        }))
        .await?;
        // Kept only once the hub took it: one it refused (too big) would
        // otherwise reach newcomers that its room never saw.
        let mut history = self.history.lock().unwrap_or_else(|e| e.into_inner());
        let log = history.groups.entry(group).or_default();
        log.push_back(entry);
        while log.len() > self.settings.keep {
            log.pop_front();
        }
        Ok(())
    }

    async fn initial(&self, user: String, group: Option<String>) -> Result<(), reqwest::Error> {
        let earlier: Vec<ChatEntry> = {
            let history = self.history.lock().unwrap_or_else(|e| e.into_inner());
            history
                .groups
                .get(&group)
                .map(|log| log.iter().cloned().collect())
                .unwrap_or_default()
        };
        // The newest that fit one request: older ones are left out first.
        // Each entry costs its JSON text as escaped again inside the
        // request's `message` string, and a comma.
        let cost = |e: &ChatEntry| {
            let text = serde_json::to_string(e).unwrap_or_default();
            serde_json::to_string(&text).map_or(0, |t| t.len() - 2) + 1
        };
        let mut from = earlier.len();
        let mut total = 0;
        while from > 0 {
            total += cost(&earlier[from - 1]);
            if total > self.settings.max_bytes {
                break;
            }
            from -= 1;
        }
        // The rest of the request is not counted above: leave out more
        // while it does not fit.
        loop {
            let request = json!({
                "userId": null,
                "groupId": group,
                "action": "initialmessages",
                "message": serde_json::to_string(&earlier[from..]).unwrap_or_default(),
                "recipients": [{"type": "user", "value": user}],
            });
            if from == earlier.len() || request.to_string().len() <= self.settings.max_bytes {
                return self.push(request).await;
            }
            from += 1;
        }
    }

    async fn push(&self, message: serde_json::Value) -> Result<(), reqwest::Error> {
        let url = format!(
            "{}/__broadcastWebSocket.wc",
            self.settings.hub.trim_end_matches('/')
        );
        let mut request = self
            .http
            .post(url)
            .header("content-type", "application/json");
        if let Some(key) = &self.settings.hub_key {
            request = request.bearer_auth(key);
        }
        request
            .body(message.to_string())
            .send()
            .await?
            .error_for_status()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::render;

    #[test]
    fn markdown_is_rendered_and_sanitised() {
        assert_eq!(
            render("**hi** _there_"),
            "<p><strong>hi</strong> <em>there</em></p>\n"
        );
        let evil = render("<script>alert(1)</script><img src=x onerror=alert(2)>");
        assert!(
            !evil.contains("<script") && !evil.contains("onerror"),
            "{evil}"
        );
        let link = render("[x](javascript:alert(3)) [y](https://example.com)");
        assert!(!link.contains("href=\"javascript:"), "{link}");
        assert!(link.contains("href=\"https://example.com\""), "{link}");
    }
}
