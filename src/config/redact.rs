//! Keeping secrets out of what the hub prints: passwords in URLs, the
//! backend URL's query, and the values that the `config` crate quotes in
//! its errors (issue 12 items 1 and 2).
//!
//! A configuration error must name the key and the problem, but never the
//! value of a secret key: `auth.jwt_secret`, `broadcast.api_keys`,
//! `redis.url` and `redis.password*`, `backend.url`, `backend.signing_key`,
//! `backend.headers`. When an error cannot be tied to a key (a TOML syntax
//! error, a message without a key), its quoted values and source excerpt
//! are dropped too: it may be about any of them.

/// `s` with the password of every URL in it replaced by `***`
/// (`redis://:secret@host` → `redis://:***@host`). For log lines and error
/// messages that show a configured URL.
///
/// Passwords are often random strings, and people paste them unencoded, so
/// the user information is taken to run up to the *last* `@` before the
/// next URL, whatever it holds (`/`, spaces, `@`): `redis://u:p@ss/w d@h`
/// → `redis://u:***@h`. The scheme may be missing or mistyped
/// (`:pw@h`, `redis//:pw@h`, `user:pw@app/x`): text before the first `//`
/// is read word by word, and a word holding `@` is treated as a URL without
/// a scheme. The user name before the first `:` is kept; without a `:` the
/// whole user information is hidden (`redis://secret@h` → `redis://***@h`,
/// some write passwords there). Hiding too much is the safe mistake.
pub fn redact_urls(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let (head, mut rest) = match s.find("//") {
        Some(i) => s.split_at(i),
        None => (s, ""),
    };
    // Before the first `//`: word by word.
    let mut word_start = 0;
    for (i, c) in head.char_indices().chain([(head.len(), ' ')]) {
        if c.is_whitespace() || matches!(c, '"' | '\'' | '(' | '=' | ',') {
            out.push_str(&redact_userinfo(&head[word_start..i]));
            if i < head.len() {
                out.push(c);
            }
            word_start = i + c.len_utf8();
        }
    }
    // From each `//` to the next one.
    while let Some(tail) = rest.strip_prefix("//") {
        out.push_str("//");
        let end = tail.find("//").unwrap_or(tail.len());
        out.push_str(&redact_userinfo(&tail[..end]));
        rest = &tail[end..];
    }
    redact_password_params(&out)
}

/// `s` with the value of every `pass=` or `password=` query parameter
/// (after `?` or `&`) replaced by `***`, up to the next `&`, white space,
/// quote or comma: a Unix socket's Redis URL carries its password there
/// (`redis+unix:///run/redis.sock?pass=secret`), which was printed as it
/// is (review of 2026-12-02).
fn redact_password_params(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(at) = rest.find(['?', '&']) {
        out.push_str(&rest[..=at]);
        rest = &rest[at + 1..];
        let Some(name) = ["password=", "pass="]
            .into_iter()
            .find(|name| rest.starts_with(name))
        else {
            continue;
        };
        out.push_str(name);
        out.push_str("***");
        let value_end = rest[name.len()..]
            .find(|c: char| c == '&' || c.is_whitespace() || matches!(c, '"' | '\'' | ','))
            .map_or(rest.len(), |i| name.len() + i);
        rest = &rest[value_end..];
    }
    out.push_str(rest);
    out
}

/// `user:***@rest` for `user:password@rest` (`***@rest` without a `:`),
/// split at the last `@`; `s` itself when it has no `@`.
fn redact_userinfo(s: &str) -> String {
    match s.rfind('@') {
        Some(at) => {
            let userinfo = &s[..at];
            let user = userinfo.find(':').map_or("", |colon| &userinfo[..=colon]);
            format!("{user}***{}", &s[at..])
        }
        None => s.to_owned(),
    }
}

/// `url` without its query (`?apikey=…` → `?***`) or fragment (`#…` →
/// `#***`) and with its password hidden ([`redact_urls`]): the backend URL
/// as logs show it, since a query may carry a key (and a fragment, never
/// sent, may hold what an operator pasted there). The password is hidden
/// first, and the query looked for only after it: a password holding `?`
/// or `#` (`user:se#cret@h`) was cut there and its start shown.
///
/// An `@` in the query (`?next=ann@example.com&apikey=…`) is taken for the
/// end of a password too, and the `?` with it: what follows it is hidden
/// whole when it reads as parameters (holds `=` or `&`), since the query
/// can no longer be told from the host there (review of 2026-12-03: the
/// `apikey` was shown).
pub fn redact_url_and_query(url: &str) -> String {
    let redacted = redact_urls(url);
    let from = redacted
        .rfind("***@")
        .map(|i| i + "***@".len())
        .or_else(|| redacted.find("//").map(|i| i + 2))
        .unwrap_or(0);
    match redacted[from..].find(['?', '#']) {
        Some(at) => {
            let at = from + at;
            format!("{}{}***", &redacted[..at], &redacted[at..=at])
        }
        None if redacted[from..].contains(['=', '&']) && redacted[..from].ends_with("***@") => {
            format!("{}***", &redacted[..from])
        }
        None => redacted,
    }
}

/// A configured `redis.url` (one URL, or a Cluster's list separated by
/// commas) as the node prints it: each URL's password and whole query
/// hidden ([`redact_url_and_query`]). A query is where a Unix socket's URL
/// carries its password (`?pass=…`), under names the redis crate also
/// takes percent-encoded (`?p%61ss=`), with values that may hold spaces
/// or quotes: hiding the query whole is the safe mistake (a review saw
/// both forms printed).
pub fn redact_redis_urls(urls: &str) -> String {
    urls.split(',')
        .map(redact_url_and_query)
        .collect::<Vec<_>>()
        .join(",")
}

/// Keys whose values never appear in an error (prefixes of key paths:
/// `backend.headers` covers `backend.headers.authorization`).
const SECRET_KEYS: &[&str] = &[
    "auth.jwt_secret",
    "broadcast.api_keys",
    "redis.url",
    "redis.password",
    "redis.password_file",
    "redis.username",
    "backend.url",
    "backend.signing_key",
    "backend.headers",
];

pub(super) fn is_secret_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    SECRET_KEYS.iter().any(|k| {
        key.strip_prefix(k)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[']))
    })
}

/// An error of the `config` crate as text for the operator: the value is
/// shown as `***` when the error is about a secret key or about no key, a
/// TOML error loses its excerpt of the file, and URL passwords are hidden
/// everywhere.
pub(super) fn config_error(e: &config::ConfigError) -> String {
    sections_named(&redact_urls(&describe(e, None)))
}

/// serde names a section by its Rust type (`expected struct RawRedis`,
/// where the user wrote a value in place of `[redis]`): said as the file
/// says it.
fn sections_named(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("struct Raw") {
        out.push_str(&rest[..at]);
        let name_end = rest[at + 7..]
            .find(|c: char| !c.is_ascii_alphanumeric())
            .map_or(rest.len(), |end| at + 7 + end);
        out.push_str("a section (a table, `[name]`)");
        rest = &rest[name_end..];
    }
    out.push_str(rest);
    out
}

/// `secret`: whether the key an enclosing error named is a secret one
/// (`None`: no enclosing error named a key). A value is shown only when
/// the error, or one around it, ties it to a key that is not secret (a
/// list key given a string was shown as `***`: review of 2026-12-03).
fn describe(e: &config::ConfigError, secret: Option<bool>) -> String {
    use config::ConfigError as E;
    let suffix = |key: &Option<String>, origin: &Option<String>| {
        let mut s = String::new();
        if let Some(key) = key {
            s.push_str(&format!(" for key `{key}`"));
        }
        if let Some(origin) = origin {
            s.push_str(&format!(" in {origin}"));
        }
        s
    };
    match e {
        E::Type {
            origin,
            unexpected,
            expected,
            key,
        } => {
            let secret =
                secret == Some(true) || key.as_deref().map_or(secret.is_none(), is_secret_key);
            let unexpected = unexpected.to_string();
            let unexpected = if secret {
                mask_values(&unexpected)
            } else {
                unexpected
            };
            format!(
                "invalid type: {unexpected}, expected {expected}{}{}",
                suffix(key, origin),
                list_hint(expected)
            )
        }
        E::At { error, origin, key } => {
            let secret = match key {
                Some(key) => Some(secret == Some(true) || is_secret_key(key)),
                None => secret,
            };
            format!("{}{}", describe(error, secret), suffix(key, origin))
        }
        E::FileParse { uri, cause } => {
            // toml's message quotes the offending line under `N | `: it may
            // be `jwt_secret = "…`. The position is enough to find it.
            let cause = cause.to_string();
            let text: Vec<&str> = cause
                .lines()
                .filter(|l| {
                    let l = l
                        .trim_start()
                        .trim_start_matches(|c: char| c.is_ascii_digit());
                    !l.trim_start().starts_with('|') && !l.trim().is_empty()
                })
                .map(str::trim_end)
                .collect();
            let text = mask_values(&text.join("; "));
            match uri {
                Some(uri) => format!("{text} in {uri}"),
                None => text,
            }
        }
        E::NotFound(_) | E::Frozen | E::PathParse { .. } => e.to_string(),
        // A message tied to a key that is not secret is shown as it is;
        // with no key, it may be about any value.
        other => {
            let text = other.to_string();
            let hint = if text.contains("expected a sequence") {
                list_hint("a sequence")
            } else {
                ""
            };
            if secret == Some(false) {
                format!("{text}{hint}")
            } else {
                format!("{}{hint}", mask_values(&text))
            }
        }
    }
}

/// How to write a list, after an error that expected one.
fn list_hint(expected: &str) -> &'static str {
    if expected.contains("sequence") {
        " (a list: [\"a\", \"b\"] in the file, comma-separated in the environment)"
    } else {
        ""
    }
}

/// `text` with every double-quoted string (`"…"`, Rust/serde Debug style)
/// and every back-quoted number or boolean (serde's ``integer `5` ``)
/// replaced by `***`. Back-quoted names (``unknown field `urll` ``) stay.
fn mask_values(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => {
                // To the closing quote, skipping escaped ones.
                let mut escaped = false;
                for (_, c) in chars.by_ref() {
                    match c {
                        '\\' if !escaped => escaped = true,
                        '"' if !escaped => break,
                        _ => escaped = false,
                    }
                }
                out.push_str("***");
            }
            '`' if ["integer ", "point ", "boolean ", "char "]
                .iter()
                .any(|w| text[..i].ends_with(w)) =>
            {
                for (_, c) in chars.by_ref() {
                    if c == '`' {
                        break;
                    }
                }
                out.push_str("***");
            }
            '`' => {
                // A name or a token (``expected `"` ``): kept as it is.
                out.push('`');
                for (_, c) in chars.by_ref() {
                    out.push(c);
                    if c == '`' {
                        break;
                    }
                }
            }
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction() {
        assert_eq!(
            redact_urls("redis://:s3cret@redis:6379/0, redis://u:p@h"),
            "redis://:***@redis:6379/0, redis://u:***@h"
        );
        assert_eq!(redact_urls("\"redis://pw@h\""), "\"redis://***@h\"");
        assert_eq!(redact_urls("redis://redis:6379"), "redis://redis:6379");
        assert_eq!(redact_urls("no url"), "no url");
        // A Unix socket's URL carries its password in the query.
        assert_eq!(
            redact_urls("redis+unix:///run/r.sock?db=1&pass=s3cr&t x, unix:///s?password=p"),
            "redis+unix:///run/r.sock?db=1&pass=***&t x, unix:///s?password=***"
        );
        assert_eq!(
            redact_urls("redis+unix:///run/r.sock?user=u&pass=p"),
            "redis+unix:///run/r.sock?user=u&pass=***"
        );
        assert_eq!(redact_urls("x?bypass=1&passes=2"), "x?bypass=1&passes=2");
        // The configured URL: its query whole, whatever names or values.
        assert_eq!(
            redact_redis_urls("redis+unix:///r.sock?p%61ss=Top'Secret Tail&db=1"),
            "redis+unix:///r.sock?***"
        );
        assert_eq!(
            redact_redis_urls("redis://:pw@a:1/0,redis://b:2?password=x"),
            "redis://:***@a:1/0,redis://b:2?***"
        );
        // Shapes from issue 12 item 2: unencoded `/`, `@` or space in the
        // password, no scheme, a mistyped scheme.
        for (url, want) in [
            (
                "redis://default:p@ss/w:rd@127.0.0.1:1",
                "redis://default:***@127.0.0.1:1",
            ),
            ("redis://:pa/ss@127.0.0.1:1", "redis://:***@127.0.0.1:1"),
            ("redis://:hun ter2@h:1", "redis://:***@h:1"),
            (":hunter2@127.0.0.1:1", ":***@127.0.0.1:1"),
            ("redis//:hunter2@127.0.0.1:1", "redis//:***@127.0.0.1:1"),
            ("\"user:hunter2@app/x\" is not", "\"user:***@app/x\" is not"),
        ] {
            assert_eq!(redact_urls(url), want, "{url}");
        }
        assert_eq!(
            redact_url_and_query("http://fox:hunter2@h:1/__websocket.wwd?apikey=SECRETQ"),
            "http://fox:***@h:1/__websocket.wwd?***"
        );
        // A fragment without a query is hidden too.
        assert_eq!(redact_url_and_query("http://h/x#SEKRIT6"), "http://h/x#***");
        // A password holding `#` or `?` is hidden whole, then the query;
        // quoted as in an error message too.
        for (url, want) in [
            (
                "http://user:se#cret@127.0.0.1:1/p",
                "http://user:***@127.0.0.1:1/p",
            ),
            (
                "http://user:se?cret@h/p?apikey=X",
                "http://user:***@h/p?***",
            ),
            ("http://user:a#b?c@h/p#f", "http://user:***@h/p#***"),
            ("\"http://user:se#cret@h/p\"", "\"http://user:***@h/p\""),
            // An `@` in the query: the parameters after it are hidden.
            (
                "https://new.example/cb?next=ann@example.com&apikey=SECRET1",
                "https://***@***",
            ),
            (
                "https://new.example/p?a=1#x@y&token=SECRET2",
                "https://***@***",
            ),
        ] {
            assert_eq!(redact_url_and_query(url), want, "{url}");
        }
    }

    #[test]
    fn values_are_masked_but_names_stay() {
        assert_eq!(
            mask_values(r#"invalid type: string "top\"secret", expected a sequence"#),
            "invalid type: string ***, expected a sequence"
        );
        assert_eq!(
            mask_values("invalid value: integer `5`, unknown field `urll`"),
            "invalid value: integer ***, unknown field `urll`"
        );
        assert_eq!(
            mask_values("invalid basic string, expected `\"`"),
            "invalid basic string, expected `\"`"
        );
        assert!(is_secret_key("broadcast.api_keys"));
        assert!(is_secret_key("broadcast.api_keys[0]"));
        assert!(is_secret_key("backend.headers.authorization"));
        assert!(!is_secret_key("backend.url_x"));
        assert!(!is_secret_key("listen"));
    }
}
