//! Who may connect and who may push: tokens, origins, API keys, client IPs.
//!
//! - **Token mode** (`auth.jwt_secret` or `auth.jwt_public_key_file`): a
//!   socket must present a JWT, in `?token=` or as a `Sec-WebSocket-Protocol`
//!   entry `wshub.jwt.<token>`. Its `sub` becomes the connection's user id
//!   and its `group` claim (a string; absent = the null group) its group id;
//!   ids in the query string are ignored. An optional `relay` claim
//!   (`all`, `group`, `none`) overrides `ws.client_relay` for that socket.
//!   Anything wrong is a 401 with a reason and nothing else happens. Without a key configured, the hub runs
//!   in Web Connection's open mode.
//! - **Origins** (`auth.allowed_origins`): a browser upgrade from another
//!   origin is refused with 403.
//! - **Broadcast keys** (`broadcast.api_keys`): compared in constant time.
//!   They, or else loopback and `broadcast.trusted_networks`, protect the
//!   broadcast endpoint and every `/api/*` path alike ([`backend_access`]).
//! - **Client IPs**: the peer address, or the last `X-Forwarded-For` entry
//!   when the peer is one of `auth.trusted_proxies`.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::http::HeaderMap;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{DecodingKey, Validation};
use serde::Deserialize;
use subtle::ConstantTimeEq;

use crate::config::{AuthConfig, Broadcast};
use crate::route::{Identity, Relay};

/// The `Sec-WebSocket-Protocol` entry prefix that carries a token.
pub(crate) const PROTOCOL_TOKEN_PREFIX: &str = "wshub.jwt.";
/// The subprotocol the hub selects when a client offered it (browsers fail
/// a handshake whose offered protocols are all ignored).
pub(crate) const PROTOCOL: &str = "wshub";

/// Why a socket's token was refused; the text is the 401's body.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum TokenError {
    #[error("a token is required: ?token=<JWT> or Sec-WebSocket-Protocol wshub.jwt.<JWT>")]
    Missing,
    #[error(
        "more than one token: give one, ?token=<JWT> or Sec-WebSocket-Protocol wshub.jwt.<JWT>"
    )]
    Several,
    #[error(
        "the token is offered as a subprotocol without `wshub` beside it: a WebSocket client fails a connection whose answer selects none of the subprotocols it offered, and the hub selects `wshub`; offer both: [\"wshub\", \"wshub.jwt.<JWT>\"]"
    )]
    ProtocolAlone,
    #[error("the token is malformed")]
    Malformed,
    #[error("the token's signature is invalid")]
    BadSignature,
    #[error("the token uses an algorithm this hub does not accept")]
    WrongAlgorithm,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet")]
    NotYetValid,
    #[error("the token is for another audience")]
    WrongAudience,
    #[error("the token is from another issuer")]
    WrongIssuer,
    #[error("the token lacks a required claim: {0}")]
    MissingClaim(String),
    #[error("the token's claims are invalid: {0}")]
    BadClaims(String),
}

#[derive(Deserialize)]
struct Claims {
    // Optional here so that a missing `sub` is reported as such, not as a
    // JSON error.
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    group: Option<String>,
    /// What the socket may address when the hub relays its messages.
    #[serde(default)]
    relay: Option<String>,
    /// Read only to refuse what is not one string: jsonwebtoken takes a
    /// list too, and accepts one that holds `auth.issuer` among others
    /// (RFC 7519 makes `iss` one string; a review).
    #[serde(default)]
    #[allow(dead_code)]
    iss: Option<String>,
}

/// What a verified token grants: an identity and, when it says, a client
/// relay policy overriding `ws.client_relay`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Verified {
    pub(crate) who: Identity,
    pub(crate) relay: Option<Relay>,
}

/// Verifies socket tokens.
pub(crate) struct TokenVerifier {
    key: DecodingKey,
    validation: Validation,
}

impl TokenVerifier {
    /// `None` in open mode (no key configured).
    pub(crate) fn from_config(config: &AuthConfig) -> Option<Arc<Self>> {
        let key = config.jwt_key.clone()?.0;
        let mut validation = Validation::new(config.jwt_algorithm);
        validation.leeway = config.leeway_secs;
        validation.validate_nbf = true;
        validation.required_spec_claims = ["exp", "sub"].iter().map(|s| s.to_string()).collect();
        // A configured audience or issuer is required, not only checked
        // when there: jsonwebtoken checks `aud` and `iss` only in tokens
        // that carry them, so a token made for something else without
        // them opened sockets (review of 2026-12-02).
        match &config.audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                validation.required_spec_claims.insert("aud".to_owned());
            }
            None => validation.validate_aud = false,
        }
        if let Some(iss) = &config.issuer {
            validation.set_issuer(&[iss]);
            validation.required_spec_claims.insert("iss".to_owned());
        }
        Some(Arc::new(Self { key, validation }))
    }

    /// Checks a token and returns the identity (and relay policy) it grants.
    pub(crate) fn verify(&self, token: &str) -> Result<Verified, TokenError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map_err(
            |e| match e.into_kind() {
                ErrorKind::InvalidSignature => TokenError::BadSignature,
                ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
                    TokenError::WrongAlgorithm
                }
                ErrorKind::ExpiredSignature => TokenError::Expired,
                ErrorKind::ImmatureSignature => TokenError::NotYetValid,
                ErrorKind::InvalidAudience => TokenError::WrongAudience,
                ErrorKind::InvalidIssuer => TokenError::WrongIssuer,
                ErrorKind::MissingRequiredClaim(c) => self.missing_or_invalid(token, c),
                ErrorKind::InvalidClaimFormat(c) => invalid_claim(&c),
                ErrorKind::Json(e) => match jsonwebtoken::decode_header(token) {
                    // The header is read first: an algorithm it does not
                    // know (`none`, `hs256`) fails there, as JSON.
                    Err(h) if h.to_string().contains("unknown variant") => {
                        TokenError::WrongAlgorithm
                    }
                    Err(_) => TokenError::Malformed,
                    Ok(_) => TokenError::BadClaims(crate::message::json_error_text(&e)),
                },
                _ => TokenError::Malformed,
            },
        )?;
        let sub = data.claims.sub.filter(|s| !s.is_empty());
        let Some(sub) = sub else {
            return Err(TokenError::MissingClaim("sub".into()));
        };
        let relay = match data.claims.relay.as_deref() {
            None => None,
            Some(text) => Some(Relay::parse(text).ok_or_else(|| {
                TokenError::BadClaims("`relay` must be \"all\", \"group\" or \"none\"".into())
            })?),
        };
        Ok(Verified {
            who: Identity {
                user: sub.into(),
                group: data.claims.group.map(Into::into),
            },
            relay,
        })
    }
}

impl TokenVerifier {
    /// jsonwebtoken reports a required claim that is there but cannot be
    /// read (`"exp": -1`, `1e30`, `"soon"`) as missing. The signature was
    /// checked before the claims: read them again, each as raw JSON (no
    /// depth limit, no checks), to tell a missing claim from an invalid
    /// one.
    fn missing_or_invalid(&self, token: &str, claim: String) -> TokenError {
        use serde_json::value::RawValue;
        let mut lenient = Validation::new(self.validation.algorithms[0]);
        lenient.required_spec_claims.clear();
        lenient.validate_exp = false;
        lenient.validate_aud = false;
        let claims = jsonwebtoken::decode::<std::collections::HashMap<String, Box<RawValue>>>(
            token, &self.key, &lenient,
        );
        match claims {
            Ok(data) if data.claims.get(&claim).is_some_and(|v| v.get() != "null") => {
                invalid_claim(&claim)
            }
            _ => TokenError::MissingClaim(claim),
        }
    }
}

/// A registered claim that is there in the wrong form.
fn invalid_claim(claim: &str) -> TokenError {
    let want = match claim {
        "exp" | "nbf" => "a whole number of seconds since 1970",
        "aud" => "a string or a list of strings",
        _ => "a string",
    };
    TokenError::BadClaims(format!("`{claim}` must be {want}"))
}

/// The token a socket request carries: `?token=` (any key case) or a
/// `wshub.jwt.<token>` subprotocol entry. Exactly one: a request with
/// more (two parameters, two entries, or one of each) is refused rather
/// than one of them picked (a review found the query's first taken, and
/// a bad one beside it ignored). `query`: the request's decoded key-value
/// pairs (`http::QueryPairs`, spelled out here: `http` imports this
/// module, not the other way round).
pub(crate) fn token_from_request(
    query: &[(std::borrow::Cow<'_, str>, std::borrow::Cow<'_, str>)],
    headers: &HeaderMap,
) -> Result<String, TokenError> {
    let in_query = query
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case("token"))
        .map(|(_, t)| t.to_string());
    let offered = || {
        headers
            .get_all("sec-websocket-protocol")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
    };
    let in_protocol = offered()
        .filter_map(|p| p.strip_prefix(PROTOCOL_TOKEN_PREFIX))
        .map(str::to_owned);
    let from_protocol = offered().any(|p| p.starts_with(PROTOCOL_TOKEN_PREFIX));
    let mut tokens = in_query.chain(in_protocol);
    match (tokens.next(), tokens.next()) {
        // The 101 would select no subprotocol the client offered, which it
        // must fail: refused with the reason instead (review of 2026-12-02:
        // a socket opened and lost at once, and the backend told of both).
        (Some(_), None) if from_protocol && !offered().any(|p| p == PROTOCOL) => {
            Err(TokenError::ProtocolAlone)
        }
        (Some(token), None) => Ok(token),
        (None, _) => Err(TokenError::Missing),
        (Some(_), Some(_)) => Err(TokenError::Several),
    }
}

/// Whether a browser's `Origin` may open a socket. Requests without an
/// `Origin` header do not come from a browser page and are not subject to
/// the list (a non-browser client can send any header anyway).
pub(crate) fn origin_allowed(allowed: &[String], origin: Option<&str>) -> bool {
    match origin {
        _ if allowed.is_empty() => true,
        None => true,
        Some(origin) => allowed.iter().any(|a| {
            a == "*"
                || a.trim_end_matches('/')
                    .eq_ignore_ascii_case(origin.trim_end_matches('/'))
        }),
    }
}

/// The keys a broadcast or API request presents: `Authorization: Bearer
/// <key>` (the scheme in any letter case, as RFC 9110 reads schemes) and
/// every `X-Api-Key: <key>`. A valid key in either header is enough: a
/// gateway in front may add an `Authorization` of its own (a review had
/// `Bearer nope` outweigh a valid `X-Api-Key`).
pub(crate) fn presented_keys(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    let bearer = headers
        .get_all("authorization")
        .into_iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| {
            let (scheme, key) = v.trim_start().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| key.trim())
        });
    // Each header whole, and split at commas: a proxy may join repeated
    // headers into one (`nope, <key>`), and a key from the file may hold
    // a comma itself.
    let api_key = headers
        .get_all("x-api-key")
        .into_iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| {
            let parts = v.contains(',').then(|| v.split(',')).into_iter().flatten();
            std::iter::once(v).chain(parts)
        })
        .map(str::trim);
    bearer.chain(api_key)
}

/// Whether `presented` is one of `keys`, comparing in constant time (every
/// key is compared, whatever matched).
pub(crate) fn key_valid(keys: &[String], presented: Option<&str>) -> bool {
    let Some(presented) = presented else {
        return false;
    };
    keys.iter()
        .fold(subtle::Choice::from(0), |found, k| {
            found | k.as_bytes().ct_eq(presented.as_bytes())
        })
        .into()
}

/// Why a request to the broadcast endpoint or to an `/api/*` path was
/// turned away by [`backend_access`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Denied {
    /// `broadcast.api_keys` is set and the request presented no valid key
    /// (401): send one as `Authorization: Bearer <key>` or `X-Api-Key`.
    Unauthorized,
    /// No keys are configured and the peer is neither loopback nor in
    /// `broadcast.trusted_networks` (403).
    Forbidden,
    /// No keys are configured, the peer is trusted, but the request comes
    /// from a web page of another site (403): a browser on a trusted
    /// machine must not lend a page its address.
    CrossSite,
}

/// Who may use the broadcast endpoint and the server API (`/api/*`): with
/// keys configured, a valid key is required from anywhere; without, only
/// loopback and trusted networks. The peer is the TCP peer, never a
/// forwarded address: a proxy in front must block these paths itself.
pub(crate) fn backend_access(
    policy: &Broadcast,
    headers: &HeaderMap,
    peer: Option<SocketAddr>,
) -> Result<(), Denied> {
    if !policy.api_keys.is_empty() {
        // Every key presented is compared (no early exit on the first).
        let valid = presented_keys(headers).fold(false, |found, key| {
            key_valid(&policy.api_keys, Some(key)) | found
        });
        if valid {
            return Ok(());
        }
        return Err(Denied::Unauthorized);
    }
    if !peer.is_some_and(|p| peer_trusted(p, &policy.trusted_networks)) {
        return Err(Denied::Forbidden);
    }
    if from_another_site(headers) {
        return Err(Denied::CrossSite);
    }
    Ok(())
}

/// Whether a browser sent this request for a page of another site: its
/// `Sec-Fetch-Site` says so, or its `Origin` is not the host asked. Trust
/// by address would otherwise let any page a browser on a trusted machine
/// opens publish, disconnect and ban (a form or `fetch` with
/// `mode: "no-cors"` needs no permission, and bodies are read as JSON
/// whatever their type). Backends send neither header; `/admin` is
/// same-origin.
fn from_another_site(headers: &HeaderMap) -> bool {
    let text = |name: &str| headers.get(name).map(|v| v.to_str().unwrap_or(""));
    if let Some(site) = text("sec-fetch-site") {
        return !matches!(
            site.trim().to_ascii_lowercase().as_str(),
            "same-origin" | "none"
        );
    }
    match text("origin") {
        None => false,
        Some(origin) => {
            // `scheme://host[:port]`, or `null`: compared with `Host`.
            let authority = origin.split_once("://").map(|(_, rest)| rest);
            let host = text("host").unwrap_or("");
            authority.is_none_or(|a| !a.trim_end_matches('/').eq_ignore_ascii_case(host.trim()))
        }
    }
}

/// Whether `peer` is loopback or in one of `trusted`.
pub(crate) fn peer_trusted(peer: SocketAddr, trusted: &[ipnet::IpNet]) -> bool {
    let ip = peer.ip().to_canonical();
    ip.is_loopback() || trusted.iter().any(|net| net.contains(&ip))
}

/// The client's address: the peer, or, when the peer is a trusted proxy,
/// the last address it appended to `X-Forwarded-For` (with or without a
/// port: some proxies, Azure Application Gateway among them, write
/// `203.0.113.7:5123` or `[2001:db8::1]:443`). A last entry that is no
/// address leaves the proxy's own, logged once: every client behind it
/// then shares the per-address limits.
pub(crate) fn client_ip(
    peer: SocketAddr,
    headers: &HeaderMap,
    trusted_proxies: &[ipnet::IpNet],
) -> IpAddr {
    let ip = peer.ip().to_canonical();
    if !trusted_proxies.iter().any(|n| n.contains(&ip)) {
        return ip;
    }
    // Only the last entry was written by the trusted proxy; earlier ones
    // come from the client. If the last one is unreadable, do not fall back
    // to an earlier (forgeable) one.
    let Some(last) = headers.get_all("x-forwarded-for").iter().next_back() else {
        return ip;
    };
    let entry = last.to_str().ok().and_then(|v| v.rsplit(',').next());
    match entry.and_then(|e| forwarded_address(e.trim())) {
        Some(client) => client.to_canonical(),
        None => {
            static WARNED: std::sync::atomic::AtomicBool =
                std::sync::atomic::AtomicBool::new(false);
            if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
                tracing::warn!(
                    proxy = %ip,
                    entry = %crate::logging::Untrusted(entry.unwrap_or("(not text)")),
                    "a trusted proxy's last X-Forwarded-For entry is no address: its clients \
                     count as the proxy's address for the per-address limits (logged once)"
                );
            }
            ip
        }
    }
}

/// An `X-Forwarded-For` entry: an address, or an address and port
/// (`1.2.3.4:5`, `[v6]:5`), or a bracketed IPv6 address.
fn forwarded_address(entry: &str) -> Option<IpAddr> {
    entry
        .parse::<IpAddr>()
        .ok()
        .or_else(|| entry.parse::<SocketAddr>().ok().map(|s| s.ip()))
        .or_else(|| {
            entry
                .strip_prefix('[')
                .and_then(|e| e.strip_suffix(']'))
                .and_then(|e| e.parse::<std::net::Ipv6Addr>().ok())
                .map(IpAddr::V6)
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn origins() {
        let allowed = vec!["https://app.example.com".to_owned()];
        assert!(origin_allowed(&[], Some("https://evil.example")));
        assert!(origin_allowed(&allowed, Some("https://APP.example.com")));
        assert!(origin_allowed(&allowed, None), "no Origin: not a browser");
        assert!(!origin_allowed(&allowed, Some("https://evil.example")));
        assert!(
            !origin_allowed(&allowed, Some("http://app.example.com")),
            "scheme matters"
        );
        assert!(origin_allowed(&["*".to_owned()], Some("https://x")));
    }

    #[test]
    fn pages_of_other_sites_are_told_apart() {
        let headers = |pairs: &[(&str, &str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.insert(
                    axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    HeaderValue::from_str(v).unwrap(),
                );
            }
            h
        };
        // Backends (curl, wwHttp) send neither header.
        assert!(!from_another_site(&headers(&[("host", "hub:8080")])));
        for cross in [
            &[("sec-fetch-site", "cross-site")][..],
            &[("sec-fetch-site", "same-site")],
            &[("host", "hub:8080"), ("origin", "https://evil.example")],
            &[("host", "hub:8080"), ("origin", "null")],
            &[("host", "hub:8080"), ("origin", "http://hub:8081")],
        ] {
            assert!(from_another_site(&headers(cross)), "{cross:?}");
        }
        for same in [
            &[("sec-fetch-site", "same-origin")][..],
            &[("sec-fetch-site", "none")],
            &[("host", "hub:8080"), ("origin", "http://HUB:8080")],
        ] {
            assert!(!from_another_site(&headers(same)), "{same:?}");
        }
    }

    #[test]
    fn keys_compare_exactly() {
        let keys = vec!["k1-secret".to_owned(), "k2-other".to_owned()];
        assert!(key_valid(&keys, Some("k2-other")));
        assert!(!key_valid(&keys, Some("k2-othe")));
        assert!(!key_valid(&keys, Some("k2-otherx")));
        assert!(!key_valid(&keys, Some("")));
        assert!(!key_valid(&keys, None));
        let presented = |pairs: &[(&'static str, &'static str)]| {
            let mut h = HeaderMap::new();
            for (name, value) in pairs {
                h.append(*name, HeaderValue::from_static(value));
            }
            presented_keys(&h).map(str::to_owned).collect::<Vec<_>>()
        };
        assert_eq!(
            presented(&[("authorization", "Bearer k1-secret")]),
            ["k1-secret"]
        );
        assert_eq!(presented(&[("x-api-key", "k2-other")]), ["k2-other"]);
        // The scheme in any case; another scheme is no key.
        assert_eq!(presented(&[("authorization", "BEARER k1")]), ["k1"]);
        assert!(presented(&[("authorization", "Basic azE6eA==")]).is_empty());
        // Both headers, and repeated ones: every key, for any to be valid.
        assert_eq!(
            presented(&[
                ("authorization", "Bearer nope"),
                ("x-api-key", "k2-other"),
                ("x-api-key", "k3"),
            ]),
            ["nope", "k2-other", "k3"]
        );
        // Joined by a proxy: the whole value and each part.
        assert_eq!(
            presented(&[("x-api-key", "nope, k2-other")]),
            ["nope, k2-other", "nope", "k2-other"]
        );
    }

    #[test]
    fn client_ip_trusts_forwarded_for_only_from_trusted_proxies() {
        let mut h = HeaderMap::new();
        h.insert(
            "x-forwarded-for",
            HeaderValue::from_static("1.1.1.1, 203.0.113.7"),
        );
        let proxy: SocketAddr = "10.0.0.2:5000".parse().unwrap();
        let trusted = ["10.0.0.0/24".parse().unwrap()];
        assert_eq!(
            client_ip(proxy, &h, &trusted),
            "203.0.113.7".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            client_ip(proxy, &h, &[]),
            "10.0.0.2".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            client_ip(proxy, &HeaderMap::new(), &trusted),
            "10.0.0.2".parse::<IpAddr>().unwrap()
        );
        // With a port, bracketed, mapped: the address.
        for (entry, want) in [
            ("203.0.113.7:5123", "203.0.113.7"),
            ("[2001:db8::1]:443", "2001:db8::1"),
            ("[2001:db8::1]", "2001:db8::1"),
            ("::ffff:192.0.2.9", "192.0.2.9"),
            ("[::ffff:192.0.2.9]:80", "192.0.2.9"),
        ] {
            let mut h = HeaderMap::new();
            h.insert("x-forwarded-for", HeaderValue::from_str(entry).unwrap());
            assert_eq!(
                client_ip(proxy, &h, &trusted),
                want.parse::<IpAddr>().unwrap(),
                "{entry}"
            );
        }
        // A forged earlier entry never wins over an unreadable last one.
        let mut h = HeaderMap::new();
        h.insert(
            "x-forwarded-for",
            HeaderValue::from_static("6.6.6.6, garbage"),
        );
        assert_eq!(
            client_ip(proxy, &h, &trusted),
            "10.0.0.2".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn token_sources() {
        let q = vec![("Token".into(), "abc".into())];
        assert_eq!(
            token_from_request(&q, &HeaderMap::new()).as_deref(),
            Ok("abc")
        );
        let mut h = HeaderMap::new();
        h.insert(
            "sec-websocket-protocol",
            HeaderValue::from_static("wshub, wshub.jwt.x.y.z"),
        );
        assert_eq!(token_from_request(&[], &h).as_deref(), Ok("x.y.z"));
        assert_eq!(
            token_from_request(&[], &HeaderMap::new()),
            Err(TokenError::Missing)
        );
        // More than one, wherever they are: refused, none picked.
        let two = vec![("token".into(), "a".into()), ("TOKEN".into(), "b".into())];
        assert_eq!(
            token_from_request(&two, &HeaderMap::new()),
            Err(TokenError::Several)
        );
        assert_eq!(token_from_request(&q, &h), Err(TokenError::Several));
        let mut both = HeaderMap::new();
        both.insert(
            "sec-websocket-protocol",
            HeaderValue::from_static("wshub, wshub.jwt.a, wshub.jwt.b"),
        );
        assert_eq!(token_from_request(&[], &both), Err(TokenError::Several));
        // Alone, the 101 could select none of the client's subprotocols.
        let mut alone = HeaderMap::new();
        alone.insert(
            "sec-websocket-protocol",
            HeaderValue::from_static("wshub.jwt.x.y.z"),
        );
        assert_eq!(
            token_from_request(&[], &alone),
            Err(TokenError::ProtocolAlone)
        );
        alone.append("sec-websocket-protocol", HeaderValue::from_static("wshub"));
        assert_eq!(token_from_request(&[], &alone).as_deref(), Ok("x.y.z"));
    }
}
