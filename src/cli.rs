//! The operator's commands besides running a node (`wshub config check`,
//! `wshub config defaults`, `wshub token`): each takes what `main.rs`
//! parsed and returns the text to print, or the error to show, so that
//! `main.rs` stays a dispatcher and tests call the same code.

use std::path::Path;
use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;

use crate::config::{Config, RawConfig, to_toml};
use crate::route::Relay;

/// Why a command failed; the text is what the operator reads.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The configuration is invalid (the text names the key, never a secret).
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    /// The command's arguments are wrong.
    #[error("{0}")]
    Usage(String),
    /// The environment holds something the node would refuse to start
    /// with, outside its configuration (`TOKIO_WORKER_THREADS`).
    #[error("{0}")]
    Environment(String),
    /// `wshub token` needs `auth.jwt_secret`.
    #[error(
        "no auth.jwt_secret is configured: wshub token signs HS256 tokens with it (set it in the file or WSHUB_AUTH__JWT_SECRET)"
    )]
    NoSecret,
}

/// `wshub config check`: validates the configuration from `file` and the
/// environment `env`, and returns it in effect, secrets redacted.
pub fn config_check(
    file: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<String, CliError> {
    let (raw, warnings) = Config::raw_from(file, env)?;
    let raw = raw.in_effect();
    let config = Config::from_raw(raw.clone())?;
    let mut out = String::from("# The configuration is valid. In effect (secrets redacted):\n");
    for warning in warnings {
        out.push_str(&format!("# warning: {warning}\n"));
    }
    for note in &config.notes {
        out.push_str(&format!("# note: {note}\n"));
    }
    out.push('\n');
    out.push_str(&to_toml(&raw));
    Ok(out)
}

/// `wshub config defaults`: every key with its built-in default.
pub fn config_defaults() -> String {
    to_toml(&RawConfig::default())
}

/// Reads a lifetime: `90s`, `15m`, `1h`, `7d`, or seconds alone.
pub fn parse_ttl(text: &str) -> Result<Duration, CliError> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let n: u64 = number.parse().map_err(|_| {
        CliError::Usage(format!(
            "--ttl {text:?}: expected a number with s, m, h or d (1h)"
        ))
    })?;
    let seconds = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => {
            return Err(CliError::Usage(format!(
                "--ttl {text:?}: the unit must be s, m, h or d"
            )));
        }
    };
    match n.checked_mul(seconds) {
        Some(0) | None => Err(CliError::Usage(format!(
            "--ttl {text:?}: must be more than 0"
        ))),
        Some(s) => Ok(Duration::from_secs(s)),
    }
}

/// What `wshub token` signs.
#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    group: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    relay: Option<&'static str>,
    iat: u64,
    exp: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    aud: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<&'a str>,
}

/// `wshub token`: a token for `sub` (and `group`, and a `relay` claim),
/// valid for `ttl`, signed HS256 with the configured `auth.jwt_secret`,
/// with the `aud` and `iss` the hub checks when configured: exactly what
/// the hub accepts (`src/auth.rs`).
pub fn token(
    file: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
    sub: &str,
    group: Option<&str>,
    ttl: Duration,
    relay: Option<&str>,
) -> Result<String, CliError> {
    let (raw, _) = Config::raw_from(file, env)?;
    // The whole configuration must be valid, or the hub would not start.
    let config = Config::from_raw(raw.clone())?;
    // As the hub reads it: exactly as written.
    let secret = raw.auth.jwt_secret.as_str();
    if secret.is_empty() {
        return Err(CliError::NoSecret);
    }
    if sub.is_empty() {
        return Err(CliError::Usage("--sub must not be empty".into()));
    }
    // The hub refuses longer ids with a 400 (`src/http.rs`): a token it
    // would refuse is not minted (review of 2026-12-02).
    let max_id = config.limits.max_id_bytes;
    for (flag, id) in [("--sub", Some(sub)), ("--group", group)] {
        if id.is_some_and(|id| id.len() > max_id) {
            return Err(CliError::Usage(format!(
                "{flag} is longer than limits.max_id_bytes ({max_id} bytes): the hub would refuse the token"
            )));
        }
    }
    let relay = match relay {
        None => None,
        Some(text) => Some(
            Relay::parse(text)
                .ok_or_else(|| CliError::Usage("--relay must be all, group or none".into()))?
                .as_str(),
        ),
    };
    let now = crate::bus::wire::now_ms() / 1000;
    let exp = now
        .checked_add(ttl.as_secs())
        .filter(|exp| i64::try_from(*exp).is_ok())
        .ok_or_else(|| CliError::Usage("--ttl is too long: the expiry overflows".into()))?;
    let claims = Claims {
        sub,
        group,
        relay,
        iat: now,
        exp,
        aud: Some(raw.auth.audience.trim()).filter(|a| !a.is_empty()),
        iss: Some(raw.auth.issuer.trim()).filter(|i| !i.is_empty()),
    };
    let key = EncodingKey::from_secret(secret.as_bytes())
        .map_err(|e| CliError::Usage(format!("auth.jwt_secret is not usable: {e}")))?;
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key)
        .map_err(|e| CliError::Usage(format!("cannot sign the token: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifetimes() {
        assert_eq!(parse_ttl("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_ttl("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_ttl("15m").unwrap(), Duration::from_secs(900));
        assert_eq!(parse_ttl("2d").unwrap(), Duration::from_secs(172_800));
        for bad in ["", "h", "1y", "0s", "-1h", "1.5h"] {
            assert!(parse_ttl(bad).is_err(), "{bad}");
        }
    }
}
