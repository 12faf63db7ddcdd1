//! The configuration as text for the operator (`wshub config check`,
//! `wshub config defaults`): TOML in the shape of `wshub.example.toml`,
//! with every secret replaced (`***`, or for URLs their password and, for
//! the backend's, the query).

use serde_json::Value;

use super::raw::RawConfig;
use super::redact::{is_secret_key, redact_redis_urls, redact_url_and_query};

/// `raw` as TOML, secrets redacted.
pub fn to_toml(raw: &RawConfig) -> String {
    // RawConfig is plain data: it always serializes.
    let value = serde_json::to_value(raw).unwrap_or(Value::Null);
    let mut out = String::new();
    table(&mut out, "", &value);
    out
}

/// Writes the scalars and arrays of `value` (a table at `path`), then its
/// tables, each under its `[path]` header.
fn table(out: &mut String, path: &str, value: &Value) {
    let Value::Object(map) = value else { return };
    if !path.is_empty() {
        if !out.is_empty() {
            out.push('\n');
        }
        out.push_str(&format!("[{path}]\n"));
    }
    for (key, item) in map {
        if item.is_object() {
            continue;
        }
        let full = join(path, key);
        out.push_str(&format!("{} = {}\n", bare(key), literal(&full, item)));
    }
    for (key, item) in map {
        if item.is_object() {
            table(out, &join(path, key), item);
        }
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{}", bare(key))
    }
}

/// A key as TOML writes it: bare when it can be, quoted otherwise.
fn bare(key: &str) -> String {
    let plain = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if plain { key.to_owned() } else { quote(key) }
}

fn quote(text: &str) -> String {
    // A JSON string is a valid TOML basic string.
    serde_json::to_string(text).unwrap_or_default()
}

/// A value at key path `key` as TOML, redacted when the key is secret.
fn literal(key: &str, value: &Value) -> String {
    match value {
        Value::String(s) => quote(&redact(key, s)),
        Value::Array(items) => {
            let items: Vec<String> = items.iter().map(|i| literal(key, i)).collect();
            format!("[{}]", items.join(", "))
        }
        Value::Null => "\"\"".to_owned(),
        other => other.to_string(),
    }
}

fn redact(key: &str, value: &str) -> String {
    if value.is_empty() || !is_secret_key(key) {
        return value.to_owned();
    }
    match key {
        "redis.url" => redact_redis_urls(value),
        "backend.url" => redact_url_and_query(value),
        _ => "***".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_redacted_and_the_rest_is_kept() {
        let mut raw = RawConfig::default();
        raw.auth.jwt_secret = "s3cret-s3cret-s3cret-s3cret-s3cret".into();
        raw.broadcast.api_keys = vec!["k1-abc".into(), "k2-def".into()];
        raw.redis.url = "redis://user:pa55@redis:6379".into();
        raw.backend.url = "https://app/x?apikey=abc".into();
        raw.node_id = "web-1".into();
        let text = to_toml(&raw);
        for secret in ["s3cret", "k1-abc", "k2-def", "pa55", "apikey=abc"] {
            assert!(!text.contains(secret), "{secret} in:\n{text}");
        }
        assert!(text.contains("node_id = \"web-1\""), "{text}");
        assert!(text.contains("api_keys = [\"***\", \"***\"]"), "{text}");
        assert!(text.contains("redis://user:***@redis:6379"), "{text}");
        assert!(text.contains("[ws]\n"), "{text}");
        assert!(text.contains("client_relay = \"all\""), "{text}");
    }
}
