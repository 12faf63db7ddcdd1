//! Log output: human-readable text by default, JSON lines when configured.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::{Config, LogFormat};

/// `RUST_LOG`, when set and not empty, checked as `log.level` is (a
/// misspelt level, `warning`, was a filter that let nothing through:
/// review of 2026-12-02); the problem otherwise, for the node's start and
/// `config check` alike.
pub fn rust_log() -> Result<Option<String>, String> {
    match std::env::var("RUST_LOG") {
        Ok(directives) if !directives.is_empty() => {
            crate::config::check_log_level(&directives)
                .map_err(|problem| format!("RUST_LOG {problem}"))?;
            // And as the filter the node builds from it (`wshub=warning`
            // passed the check above and stopped the node: review of
            // 2026-12-03).
            EnvFilter::try_new(&directives).map_err(|e| format!("RUST_LOG: {e}"))?;
            Ok(Some(directives))
        }
        Ok(_) | Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => Err("RUST_LOG is not valid UTF-8".into()),
    }
}

/// Installs the global subscriber. `RUST_LOG`, when set, overrides
/// `log.level`. Fails if a subscriber is already installed.
///
/// Text logs are coloured only when stderr is a terminal: piped into
/// journald, `docker logs` or a file, escape codes are noise that makes
/// lines hard to grep.
pub fn init(config: &Config) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let filter = match rust_log()? {
        Some(directives) => EnvFilter::try_new(directives)?,
        None => EnvFilter::try_new(level_filter(&config.log_level))?,
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match config.log_format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => {
            QUOTE_UNTRUSTED.store(false, std::sync::atomic::Ordering::Relaxed);
            builder.json().flatten_event(true).try_init()
        }
    }
}

/// Whether [`Untrusted`] quotes a value that could pass for several
/// fields: in text logs, where fields are only spaces and `=` apart. A
/// JSON log's values are delimited by the format itself; quoted there too,
/// `"user":"\"ann lee\""` matched no query for `ann lee` (review of
/// 2026-12-03).
static QUOTE_UNTRUSTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// The filter `log.level` stands for: as written, with the Redis client
/// library held to errors unless `redis` is named in it. The library logs
/// each failed retry of its own (about 30 lines a second per node while a
/// cluster shard was down: review of 2026-12-03), where the node's own
/// lines say once per outage what happened and what it does about it.
/// `RUST_LOG` is taken as written.
pub fn level_filter(level: &str) -> String {
    let directives = || level.split(',').map(str::trim);
    let names_redis = directives().any(|d| d.split(['=', '[', ':']).next() == Some("redis"));
    // `off` (or `0`) means nothing at all: `off,redis=error` would let the
    // library's errors through (review of 2026-12-03).
    let off = directives().any(|d| d.eq_ignore_ascii_case("off") || d == "0");
    if names_redis || off {
        level.to_owned()
    } else {
        format!("{level},redis=error")
    }
}

/// A string chosen by a client (a user or group id, an action), made safe
/// for a log line: control characters (newlines, terminal escapes),
/// Unicode line separators and direction overrides, and the backslash are
/// written as Rust escapes (`\n`, `\u{1b}`, `\\`), so a client can
/// neither start a line of its own nor restyle or reorder what the
/// operator reads. A value that could pass for more than one field (it is
/// empty, or holds whitespace, `=` or `"`: `mallory conn=n1-1 user=admin`)
/// is also put in double quotes with its quotes escaped, so it reads as one
/// value; ordinary ids read as themselves, unquoted. In JSON logs no
/// quotes are added (the format delimits each value: `"user":"ann lee"`),
/// and the escapes are the same. Every client-chosen string is logged
/// through this, whatever the format: JSON would escape control
/// characters anyway, but a value must not change meaning when an
/// operator switches formats.
pub struct Untrusted<'a>(pub &'a str);

impl std::fmt::Display for Untrusted<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use std::fmt::Write;
        let quoted = QUOTE_UNTRUSTED.load(std::sync::atomic::Ordering::Relaxed)
            && (self.0.is_empty()
                || self
                    .0
                    .chars()
                    .any(|c| c.is_whitespace() || c == '=' || c == '"'));
        if quoted {
            f.write_char('"')?;
        }
        for c in self.0.chars() {
            let unsafe_char = c.is_control()
                || c == '\\'
                || matches!(
                    c,
                    '\u{2028}' | '\u{2029}' | '\u{200e}' | '\u{200f}' | '\u{061c}'
                )
                || ('\u{202a}'..='\u{202e}').contains(&c)
                || ('\u{2066}'..='\u{2069}').contains(&c);
            if unsafe_char {
                write!(f, "{}", c.escape_default())?;
            } else if quoted && c == '"' {
                f.write_str("\\\"")?;
            } else {
                f.write_char(c)?;
            }
        }
        if quoted {
            f.write_char('"')?;
        }
        Ok(())
    }
}

/// [`Untrusted`] for an optional id: `null` when absent (the null group).
pub struct UntrustedOpt<'a>(pub Option<&'a str>);

impl std::fmt::Display for UntrustedOpt<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(s) => Untrusted(s).fmt(f),
            None => f.write_str("null"),
        }
    }
}

/// `error` and its sources, joined by `: `.
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(s) = source {
        let more = s.to_string();
        // Wrappers often repeat their source's text.
        if !text.ends_with(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_redis_library_is_held_to_errors_unless_named() {
        for (level, filter) in [
            ("info", "info,redis=error"),
            ("warn,wshub=debug", "warn,wshub=debug,redis=error"),
            ("info,redis=warn", "info,redis=warn"),
            (
                "debug,redis::cluster_async=info",
                "debug,redis::cluster_async=info",
            ),
            ("info,redis_other=warn", "info,redis_other=warn,redis=error"),
            ("off", "off"),
            ("0", "0"),
        ] {
            assert_eq!(level_filter(level), filter, "{level}");
            assert!(EnvFilter::try_new(level_filter(level)).is_ok(), "{level}");
        }
    }

    /// Issue 11 item 9 variant: `user=mallory conn=n1-1 user=admin`.
    #[test]
    fn untrusted_strings_cannot_forge_fields() {
        assert_eq!(
            Untrusted("mallory conn=n1-1 user=admin").to_string(),
            r#""mallory conn=n1-1 user=admin""#
        );
        assert_eq!(Untrusted("a=b").to_string(), r#""a=b""#);
        assert_eq!(Untrusted("").to_string(), r#""""#);
        assert_eq!(Untrusted(r#"x" y"#).to_string(), r#""x\" y""#);
        assert_eq!(
            Untrusted("alice@example.com").to_string(),
            "alice@example.com"
        );
    }

    #[test]
    fn untrusted_strings_cannot_break_a_line_or_escape_the_terminal() {
        let s = "ann\n2026 INFO forged\u{1b}[31m\r\\";
        assert_eq!(
            Untrusted(s).to_string(),
            r#""ann\n2026 INFO forged\u{1b}[31m\r\\""#
        );
        assert_eq!(Untrusted("o'brien \"é\"").to_string(), r#""o'brien \"é\"""#);
        assert_eq!(Untrusted("o'brien-é").to_string(), "o'brien-é");
        assert_eq!(Untrusted("a\u{202e}b").to_string(), r"a\u{202e}b");
        // The Arabic letter mark is a direction mark too.
        assert_eq!(Untrusted("a\u{61c}b").to_string(), r"a\u{61c}b");
        assert_eq!(UntrustedOpt(None).to_string(), "null");
        assert_eq!(UntrustedOpt(Some("a\tb")).to_string(), r#""a\tb""#);
    }
}
