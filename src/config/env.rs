//! Which `WSHUB_*` environment variables are configuration.
//!
//! The file is the user's own, so an unknown key there stops start-up. The
//! environment is shared with the platform: Kubernetes puts service-link
//! variables (`WSHUB_SERVICE_HOST`, `WSHUB_PORT=tcp://…`,
//! `WSHUB_REDIS_SERVICE_PORT`, …) into every pod of a namespace holding a
//! Service named `wshub` or `wshub-redis`, and harnesses set their own
//! `WSHUB_*` variables. Refusing every unknown variable made pods exit 2 at
//! once (issue 12; Centrifugo made the same fix in its issue 269). So:
//!
//! - a variable naming a known key is configuration;
//! - one naming a known section with an unknown key (`WSHUB_REDIS__URLL`) is
//!   a typo of a real key and still stops start-up, naming the variable;
//! - a service-link variable is ignored silently: its name has one of the
//!   shapes Kubernetes uses, and where Kubernetes puts a URL
//!   (`WSHUB_PORT=tcp://10.0.0.7:8080`) the value is one; `WSHUB_PORT=8080`
//!   is someone's guess at the port setting and gets a warning;
//! - anything else is ignored with one warning naming it, with the closest
//!   real variable when one is close ("did you mean WSHUB_REDIS__URL?").
//!
//! Values are never copied into a message: they may be secrets.
//!
//! Each value reaches its key as the exact string written: a string key
//! (`auth.jwt_secret`, `node_id`) keeps `123…` or `true` as text, a list key
//! is split at commas here, and numbers and booleans are converted when the
//! typed configuration is read. (The `config` crate's `try_parsing` guesses
//! a type from the value alone and turned an all-digit JWT secret into a
//! float, issue 12 item 3.)

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::{ConfigError, ENV_CONFIG_FILE, ENV_PREFIX, RawConfig};

/// The variables that are configuration, and warnings about the others.
pub(super) struct Sorted {
    /// Passed on to the loader as strings, by their original names.
    pub known: HashMap<String, String>,
    /// List keys (`broadcast.api_keys`), split at commas, by key path.
    pub lists: Vec<(String, Vec<String>)>,
    /// One line per ignored variable, for the log.
    pub warnings: Vec<String>,
}

/// Whether a list variable's `value` (split into `items`) was written as
/// a TOML or JSON array, or with its items quoted, rather than as `a,b`.
/// Brackets alone are no sign: an IPv6 sentinel (`[::1]:26379`) or
/// origin (`http://[::1]`) has them, and is taken (review of 2026-12-03).
fn looks_like_an_array(value: &str, items: &[String]) -> bool {
    let value = value.trim();
    let bracketed = value.len() >= 2
        && value.starts_with('[')
        && value.ends_with(']')
        && (serde_json::from_str::<Vec<serde_json::Value>>(value).is_ok()
            || value[1..].trim_start().starts_with(['"', '\'']));
    let quoted = items.iter().any(|item| {
        item.len() >= 2
            && ((item.starts_with('"') && item.ends_with('"'))
                || (item.starts_with('\'') && item.ends_with('\'')))
    });
    bracketed || quoted
}

/// The keys `RawConfig` has: top-level keys, and each section's keys.
struct Keys {
    top: BTreeSet<String>,
    sections: BTreeMap<String, BTreeSet<String>>,
    /// `section.key` whose value is a table of free names
    /// (`backend.headers`: `WSHUB_BACKEND__HEADERS__AUTHORIZATION`).
    maps: BTreeSet<String>,
    /// `section.key` (or `key`) whose value is a list.
    lists: BTreeSet<String>,
}

impl Keys {
    fn of_raw_config() -> Self {
        // The defaults serialize to every key, so this list cannot drift
        // from the structs.
        let value = serde_json::to_value(RawConfig::default())
            .expect("the default configuration serializes");
        let mut top = BTreeSet::new();
        let mut sections = BTreeMap::new();
        let mut maps = BTreeSet::new();
        let mut lists = BTreeSet::new();
        for (key, v) in value.as_object().expect("a table") {
            match v.as_object() {
                Some(section) => {
                    sections.insert(key.clone(), section.keys().cloned().collect());
                    maps.extend(
                        section
                            .iter()
                            .filter(|(_, v)| v.is_object())
                            .map(|(k, _)| format!("{key}.{k}")),
                    );
                    lists.extend(
                        section
                            .iter()
                            .filter(|(_, v)| v.is_array())
                            .map(|(k, _)| format!("{key}.{k}")),
                    );
                }
                None => {
                    if v.is_array() {
                        lists.insert(key.clone());
                    }
                    top.insert(key.clone());
                }
            }
        }
        Self {
            top,
            sections,
            maps,
            lists,
        }
    }

    /// Every configuration variable's name.
    fn variables(&self) -> Vec<String> {
        let mut names: Vec<String> = self.top.iter().map(|k| variable(&[k])).collect();
        for (section, keys) in &self.sections {
            names.extend(keys.iter().map(|k| variable(&[section, k])));
        }
        names
    }
}

fn variable(path: &[&str]) -> String {
    format!("{ENV_PREFIX}_{}", path.join("__")).to_ascii_uppercase()
}

/// Sorts the process environment (see the module docs).
pub(super) fn sort(env: impl IntoIterator<Item = (String, String)>) -> Result<Sorted, ConfigError> {
    let keys = Keys::of_raw_config();
    let prefix = format!("{ENV_PREFIX}_");
    let mut sorted = Sorted {
        known: HashMap::new(),
        lists: Vec::new(),
        warnings: Vec::new(),
    };
    // Names are read in any case, the prefix too (`wshub_listen` was
    // ignored without a word: review of 2026-12-02).
    let mut env: Vec<(String, String)> = env
        .into_iter()
        .filter(|(name, _)| {
            name.get(..prefix.len())
                .is_some_and(|p| p.eq_ignore_ascii_case(&prefix))
        })
        .collect();
    // Warnings in a stable order.
    env.sort();
    // So two variables that differ only in case set one key: which one
    // won was up to a hash map's order (review of 2026-12-02). Refused,
    // naming both.
    let mut seen: HashMap<String, &str> = HashMap::new();
    for (name, _) in &env {
        if let Some(first) = seen.insert(name.to_ascii_uppercase(), name) {
            return Err(ConfigError::DuplicateVariable {
                first: first.to_owned(),
                second: name.clone(),
            });
        }
    }
    for (name, value) in env {
        if name.eq_ignore_ascii_case(ENV_CONFIG_FILE) {
            // The file itself (`main.rs`), not a key.
            continue;
        }
        // The prefix as the `config` crate matches it.
        let name = format!("{prefix}{}", &name[prefix.len()..]);
        let rest = name[prefix.len()..].to_ascii_lowercase();
        let known = match rest.split_once("__") {
            Some((section, key)) => match keys.sections.get(section) {
                Some(section_keys) if section_keys.contains(key) => true,
                Some(_)
                    if key.split_once("__").is_some_and(|(map, _)| {
                        keys.maps.contains(&format!("{section}.{map}"))
                    }) =>
                {
                    // `WSHUB_BACKEND__HEADERS__=x` named no header: the
                    // crate's "unknown field `backend.headers.`" listed
                    // the top-level keys (review of 2026-12-03).
                    if key
                        .split_once("__")
                        .is_some_and(|(_, entry)| entry.is_empty() || entry.contains("__"))
                    {
                        return Err(ConfigError::UnknownVariable {
                            hint: " (the entry's name after the map's __ is empty or holds __: one name, e.g. WSHUB_BACKEND__HEADERS__AUTHORIZATION)".to_owned(),
                            name,
                        });
                    }
                    true
                }
                Some(_) => {
                    return Err(ConfigError::UnknownVariable {
                        hint: did_you_mean(&name, &keys),
                        name,
                    });
                }
                None => false,
            },
            None => keys.top.contains(&rest),
        };
        let path = rest.replace("__", ".");
        if known && keys.lists.contains(&path) {
            let items: Vec<String> = value
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect();
            // A TOML or JSON array written in a variable (`["k1","k2"]`)
            // was split on its commas, brackets and quotes kept in the
            // items: every API key refused, no word said (review of
            // 2026-12-03).
            if looks_like_an_array(&value, &items) {
                return Err(ConfigError::ArrayInVariable { name });
            }
            sorted.lists.push((path, items));
        } else if known {
            sorted.known.insert(name, value);
        } else if !is_service_link(&name, &value) {
            let mut hint = did_you_mean(&name, &keys);
            if hint.is_empty() && name.ends_with("_PORT") {
                hint = format!(" (did you mean {ENV_PREFIX}_LISTEN=0.0.0.0:<port>?)");
            }
            sorted.warnings.push(format!(
                "ignoring the environment variable {name}: it is not a configuration variable{hint}"
            ));
        }
    }
    Ok(sorted)
}

/// Whether `name` is one of the variables Kubernetes injects for a Service
/// (`enableServiceLinks`, on by default): `<SVC>_SERVICE_HOST`,
/// `<SVC>_SERVICE_PORT`, `<SVC>_SERVICE_PORT_<PORT_NAME>`, `<SVC>_PORT`,
/// `<SVC>_PORT_<N>_<PROTO>` and that followed by `_PROTO`, `_PORT` or
/// `_ADDR`. Service names become upper case with `-` as `_`, so they never
/// contain the `__` of a section variable.
///
/// `<SVC>_PORT` and `<SVC>_PORT_<N>_<PROTO>` hold a URL
/// (`tcp://10.0.0.7:8080`); with any other `value` the variable is not a
/// link (`WSHUB_PORT=8080` is a guess at the port setting).
pub fn is_service_link(name: &str, value: &str) -> bool {
    let is_url = ["tcp://", "udp://", "sctp://"]
        .iter()
        .any(|scheme| value.starts_with(scheme));
    let words: Vec<&str> = name.split('_').collect();
    if name.contains("__") || words.len() < 2 {
        return false;
    }
    // words[0] is the service name's first word; try every split point
    // after it.
    (1..words.len()).any(|i| {
        let tail = &words[i..];
        match tail {
            ["SERVICE", "HOST"] | ["SERVICE", "PORT"] => true,
            ["PORT"] => is_url,
            ["SERVICE", "PORT", port_name @ ..] => !port_name.is_empty(),
            ["PORT", number, proto, rest @ ..] => {
                !number.is_empty()
                    && number.bytes().all(|b| b.is_ascii_digit())
                    && matches!(*proto, "TCP" | "UDP" | "SCTP")
                    && match rest {
                        [] => is_url,
                        ["PROTO"] | ["PORT"] | ["ADDR"] => true,
                        _ => false,
                    }
            }
            _ => false,
        }
    })
}

/// `" (did you mean WSHUB_X?)"` for the closest configuration variable
/// within a few edits, else `""`.
fn did_you_mean(name: &str, keys: &Keys) -> String {
    let upper = name.to_ascii_uppercase();
    keys.variables()
        .into_iter()
        .map(|candidate| (edit_distance(&upper, &candidate), candidate))
        .filter(|(d, _)| *d <= 3)
        .min()
        .map(|(_, c)| format!(" (did you mean {c}?)"))
        .unwrap_or_default()
}

/// Levenshtein distance over bytes (the names are ASCII).
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, &ca) in a.iter().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let substitute = diagonal + usize::from(ca != cb);
            diagonal = row[j + 1];
            row[j + 1] = substitute.min(row[j] + 1).min(row[j + 1] + 1);
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_links() {
        for name in [
            "WSHUB_SERVICE_HOST",
            "WSHUB_SERVICE_PORT",
            "WSHUB_SERVICE_PORT_HTTP",
            "WSHUB_PORT",
            "WSHUB_PORT_80_TCP",
            "WSHUB_PORT_80_TCP_PROTO",
            "WSHUB_PORT_80_TCP_PORT",
            "WSHUB_PORT_80_TCP_ADDR",
            "WSHUB_REDIS_SERVICE_HOST",
            "WSHUB_REDIS_SERVICE_PORT_REDIS",
            "WSHUB_REDIS_PORT_6379_TCP_ADDR",
        ] {
            let value = if name.ends_with("_PORT") || name.ends_with("_TCP") {
                "tcp://10.0.0.7:8080"
            } else {
                "8080"
            };
            assert!(is_service_link(name, value), "{name}");
        }
        for name in [
            "WSHUB_REDIS_URL",
            "WSHUB_REDIS__URL",
            "WSHUB_PORT_X_TCP",
            "WSHUB_PORT_80_HTTP",
            "WSHUB_SERVICE",
            "WSHUB_LISTEN",
        ] {
            assert!(!is_service_link(name, "tcp://10.0.0.7:8080"), "{name}");
        }
        // Kubernetes puts a URL in these; a number is a guess at the port.
        for name in ["WSHUB_PORT", "WSHUB_LISTEN_PORT", "WSHUB_PORT_80_TCP"] {
            assert!(!is_service_link(name, "18122"), "{name}");
        }
    }

    #[test]
    fn distance() {
        assert_eq!(edit_distance("WSHUB_REDIS_URL", "WSHUB_REDIS__URL"), 1);
        assert_eq!(edit_distance("abc", "abc"), 0);
        assert_eq!(edit_distance("", "ab"), 2);
    }
}
