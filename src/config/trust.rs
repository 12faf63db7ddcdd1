//! The keys that carry secrets or certificates: Redis credentials, TLS
//! files and Sentinel addresses, and the backend's signing key and static
//! headers. Files are read here, at start, so that a missing or unreadable
//! one is a configuration error naming its key, not a connection failure
//! later; a secret's value never appears in a `Debug` or an error.

use std::fmt;

use super::{ConfigError, RawBackend, RawRedis, RedisConfig, invalid};

/// A secret value (a password, a key, a header value): its `Debug` and
/// `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Redis credentials given apart from the URL (they win over the URL's).
#[derive(Clone, Debug, Default)]
pub struct RedisAuth {
    pub username: Option<String>,
    pub password: Option<Secret>,
}

/// Certificates for `rediss://`, read from their files at start.
#[derive(Clone, Default)]
pub struct RedisTls {
    /// PEM CA certificates; `None`: the built-in Mozilla roots.
    pub ca: Option<Vec<u8>>,
    /// PEM client certificate chain and key (mutual TLS).
    pub client: Option<(Vec<u8>, Secret)>,
    /// Accept any server certificate (`redis.tls_insecure_skip_verify`).
    pub insecure_skip_verify: bool,
}

impl fmt::Debug for RedisTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisTls")
            .field("ca", &self.ca.as_ref().map(Vec::len))
            .field("client", &self.client.is_some())
            .field("insecure_skip_verify", &self.insecure_skip_verify)
            .finish()
    }
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &super::redact_urls(&self.url))
            .field("channel_prefix", &self.channel_prefix)
            .field("sharded", &self.sharded)
            .field("publish_queue", &self.publish_queue)
            .field("publish_queue_bytes", &self.publish_queue_bytes)
            .field("publish_retry", &self.publish_retry)
            .field("probe_interval", &self.probe_interval)
            .field("probe_timeout", &self.probe_timeout)
            .field("reconnect_max", &self.reconnect_max)
            .field("command_timeout", &self.command_timeout)
            .field("auth", &self.auth)
            .field("tls", &self.tls)
            .field("sentinels", &self.sentinels)
            .field("sentinel_master", &self.sentinel_master)
            .field("sentinel_tls", &self.sentinel_tls)
            .finish()
    }
}

fn read(key: &'static str, path: &str) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|e| invalid(key, format!("cannot read {path:?}: {e}")))
}

pub(super) fn redis_auth(raw: &RawRedis) -> Result<RedisAuth, ConfigError> {
    let username = Some(raw.username.trim().to_owned()).filter(|u| !u.is_empty());
    let password = match (raw.password.as_str(), raw.password_file.trim()) {
        ("", "") => None,
        (p, "") => Some(Secret::new(p)),
        ("", path) => {
            let bytes = read("redis.password_file", path)?;
            let text = String::from_utf8(bytes)
                .map_err(|_| invalid("redis.password_file", "does not hold UTF-8 text"))?;
            // A Secret mounted from `kubectl create secret --from-file`
            // often ends with the editor's newline; the password does not.
            let text = text
                .strip_suffix("\r\n")
                .or_else(|| text.strip_suffix('\n'))
                .unwrap_or(&text);
            if text.is_empty() {
                return Err(invalid("redis.password_file", format!("{path:?} is empty")));
            }
            Some(Secret::new(text))
        }
        _ => {
            return Err(invalid(
                "redis.password",
                "and redis.password_file cannot both be set",
            ));
        }
    };
    Ok(RedisAuth { username, password })
}

/// Refuses a file that holds no PEM block of the kinds `tags` (`key` is
/// named; a key file's text is not shown). Read only at connect time, a
/// CA file of something else read "invalid peer certificate:
/// UnknownIssuer" in `/readyz`, and a client certificate file of
/// something else "peer sent no certificates", both about the other side
/// (review of 2026-12-03).
fn check_pem(
    key: &'static str,
    path: &str,
    bytes: &[u8],
    tags: &[&str],
    what: &str,
) -> Result<(), ConfigError> {
    let found = pem::parse_many(bytes)
        .map_err(|e| invalid(key, format!("{path:?} is not a PEM file: {e}")))?;
    if found.iter().any(|block| tags.contains(&block.tag())) {
        Ok(())
    } else {
        Err(invalid(
            key,
            format!(
                "{path:?} holds no {what} (a PEM block \"-----BEGIN {}-----\")",
                tags[0]
            ),
        ))
    }
}

/// Refuses a client certificate and key that do not belong together, or
/// a key TLS cannot use, as rustls would at every connect ("KeyMismatch"
/// in `/readyz`, the node never ready: review of 2026-12-03). What a key
/// holds is never shown.
fn check_key_pair(cert_pem: &[u8], key_pem: &[u8]) -> Result<(), ConfigError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    const KEY: &str = "redis.tls_client_key_file";
    let certs = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid("redis.tls_client_cert_file", format!("cannot be read: {e}")))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| invalid(KEY, format!("cannot be read as a private key: {e}")))?;
    let key = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| invalid(KEY, format!("is not a key TLS can sign with: {e}")))?;
    match rustls::sign::CertifiedKey::new(certs, key).keys_match() {
        // A key whose public half rustls cannot tell: left to the server.
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => Ok(()),
        Err(e) => Err(invalid(
            KEY,
            format!(
                "does not belong to the certificate in redis.tls_client_cert_file (the first \
                 certificate must be the one the key signs for): {e}"
            ),
        )),
    }
}

pub(super) fn redis_tls(raw: &RawRedis) -> Result<RedisTls, ConfigError> {
    const CERTIFICATE: &[&str] = &["CERTIFICATE"];
    let ca = match raw.tls_ca_file.trim() {
        "" => None,
        path => {
            let ca = read("redis.tls_ca_file", path)?;
            check_pem("redis.tls_ca_file", path, &ca, CERTIFICATE, "certificate")?;
            Some(ca)
        }
    };
    let client = match (
        raw.tls_client_cert_file.trim(),
        raw.tls_client_key_file.trim(),
    ) {
        ("", "") => None,
        (cert_path, key_path) if !cert_path.is_empty() && !key_path.is_empty() => {
            let key = read("redis.tls_client_key_file", key_path)?;
            check_pem(
                "redis.tls_client_key_file",
                key_path,
                &key,
                &["PRIVATE KEY", "RSA PRIVATE KEY", "EC PRIVATE KEY"],
                "private key",
            )?;
            let key = String::from_utf8(key)
                .map_err(|_| invalid("redis.tls_client_key_file", "is not a PEM file"))?;
            let cert = read("redis.tls_client_cert_file", cert_path)?;
            check_pem(
                "redis.tls_client_cert_file",
                cert_path,
                &cert,
                CERTIFICATE,
                "certificate",
            )?;
            check_key_pair(&cert, key.as_bytes())?;
            Some((cert, Secret::new(key)))
        }
        _ => {
            return Err(invalid(
                "redis.tls_client_cert_file",
                "and redis.tls_client_key_file must be set together",
            ));
        }
    };
    let tls = RedisTls {
        ca,
        client,
        insecure_skip_verify: raw.tls_insecure_skip_verify,
    };
    let wants_tls = tls.ca.is_some() || tls.client.is_some() || tls.insecure_skip_verify;
    let plain = raw
        .url
        .split(',')
        .map(str::trim)
        .any(|u| u.starts_with("redis://"));
    if wants_tls && plain {
        return Err(invalid(
            "redis.url",
            "must use rediss:// when a redis.tls_* key is set",
        ));
    }
    Ok(tls)
}

pub(super) fn sentinels(raw: &RawRedis) -> Result<Vec<String>, ConfigError> {
    let sentinels: Vec<String> = raw
        .sentinels
        .iter()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect();
    if sentinels.is_empty() {
        if raw.sentinel_tls {
            return Err(invalid(
                "redis.sentinel_tls",
                "needs redis.sentinels (with redis.url, TLS is its rediss:// scheme)",
            ));
        }
        if !raw.sentinel_master.trim().is_empty() {
            return Err(invalid(
                "redis.sentinel_master",
                "needs redis.sentinels (host:port of each sentinel)",
            ));
        }
        return Ok(sentinels);
    }
    if raw.sentinel_master.trim().is_empty() {
        return Err(invalid(
            "redis.sentinel_master",
            "must name the master the sentinels monitor",
        ));
    }
    if !raw.url.trim().is_empty() || raw.sharded {
        return Err(invalid(
            "redis.sentinels",
            "cannot be combined with redis.url or redis.sharded (the sentinels name the primary)",
        ));
    }
    let tls = [
        &raw.tls_ca_file,
        &raw.tls_client_cert_file,
        &raw.tls_client_key_file,
    ];
    if (tls.iter().any(|f| !f.trim().is_empty()) || raw.tls_insecure_skip_verify)
        && !raw.sentinel_tls
    {
        return Err(invalid(
            "redis.sentinel_tls",
            "must be true when a redis.tls_* key is set with redis.sentinels \
             (TLS to the sentinels and the primary)",
        ));
    }
    if raw.tls_insecure_skip_verify && !raw.tls_client_cert_file.trim().is_empty() {
        // redis-rs checks that the primary the sentinels name is a master
        // (`ROLE`) without the client certificate when the server's is not
        // checked, so a server that asks for one refuses the check and the
        // node never finds its primary.
        return Err(invalid(
            "redis.tls_insecure_skip_verify",
            "cannot be combined with a client certificate (redis.tls_client_cert_file) \
             with redis.sentinels: give the CA of Redis's certificate in redis.tls_ca_file",
        ));
    }
    for s in &sentinels {
        // Credentials put in an entry by mistake (`user:pass@host:port`)
        // are refused without being echoed: accepted, the entry was
        // printed by `config check` and in the start line.
        if s.contains('@') {
            return Err(invalid(
                "redis.sentinels",
                "an entry with an `@` is not host:port (credentials go in redis.username and redis.password)",
            ));
        }
        // `rediss://host:port` passed the port check below, and the node
        // then stopped with "Invalid database number" (review of
        // 2026-12-03).
        if s.contains("://") {
            return Err(invalid(
                "redis.sentinels",
                format!(
                    "{s:?} is a URL, not host:port (TLS to the sentinels is redis.sentinel_tls = true)"
                ),
            ));
        }
        let port = s.rsplit_once(':').and_then(|(h, p)| {
            (!h.is_empty())
                .then_some(p)
                .and_then(|p| p.parse::<u16>().ok())
        });
        if port.is_none() {
            return Err(invalid(
                "redis.sentinels",
                format!("{s:?} is not host:port"),
            ));
        }
    }
    Ok(sentinels)
}

/// `backend.headers`, names lowercased, values secret.
type StaticHeaders = Vec<(String, Secret)>;

/// Headers the hub's HTTP client sets on every forward, its framing and
/// its connection's (a static `Content-Length` made the backend cut every
/// body short), besides the `X-Wshub-*` ones.
const HUB_HEADERS: [&str; 9] = [
    "content-type",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "upgrade",
    "te",
    "trailer",
    "host",
];

/// A `backend.headers` name as it is sent: lower case, `_` as `-` (see
/// [`backend_trust`]).
pub(super) fn header_name(name: &str) -> String {
    name.to_ascii_lowercase().replace('_', "-")
}

/// `backend.signing_key` and `backend.headers`, validated.
pub(super) fn backend_trust(
    raw: &RawBackend,
) -> Result<(Option<Secret>, StaticHeaders), ConfigError> {
    // Exactly as written, like every secret: the backend checks the
    // signature with the key it was given (review of 2026-12-02: a key
    // with a trailing space was trimmed here, and nothing verified).
    let key = match raw.signing_key.as_str() {
        "" => None,
        k if k.len() < 32 => {
            return Err(invalid(
                "backend.signing_key",
                "must be at least 32 characters",
            ));
        }
        k => Some(Secret::new(k)),
    };
    let mut headers = Vec::new();
    for (name, value) in &raw.headers {
        // `_` is sent as `-`: an environment variable's name cannot hold a
        // `-` (`WSHUB_BACKEND__HEADERS__X_API_KEY` is `X-Api-Key`), nginx
        // drops headers with `_` by default, and CGI-style servers read
        // both spellings as one variable, so `x_wshub_user_id` must not
        // get past the check below.
        let lower = header_name(name);
        if reqwest::header::HeaderName::from_bytes(lower.as_bytes()).is_err() {
            return Err(invalid(
                "backend.headers",
                format!("{name:?} is not a header name"),
            ));
        }
        if lower.starts_with("x-wshub-") || HUB_HEADERS.contains(&lower.as_str()) {
            return Err(invalid(
                "backend.headers",
                format!("{name:?} is set by the hub itself"),
            ));
        }
        if headers.iter().any(|(seen, _)| *seen == lower) {
            return Err(invalid(
                "backend.headers",
                format!("{name:?} is set twice (`_` and `-` are the same in a name)"),
            ));
        }
        if reqwest::header::HeaderValue::from_str(value).is_err() {
            // The value may be a credential: not repeated.
            return Err(invalid(
                "backend.headers",
                format!("the value of {name:?} is not a valid header value"),
            ));
        }
        headers.push((lower, Secret::new(value.clone())));
    }
    Ok((key, headers))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_do_not_print() {
        assert_eq!(format!("{:?}", Secret::new("hunter2")), "<redacted>");
    }
}
