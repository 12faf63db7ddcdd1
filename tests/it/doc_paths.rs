//! Every repository path that the docs, comments, scripts and deployment
//! files mention exists.
//!
//! Docs rot quietly: four comments once pointed at a protocol document in
//! `docs/` that never existed. This test reads every text file of the repository, picks
//! out the words that look like a path into one of its top-level folders
//! (`docs/…`, `src/…`, `tests/…`, …), and fails listing each one that is not
//! there. A word preceded by `/` is a URL or a path inside a container
//! (`/scripts/webconnection-websocket.js`, `/etc/nginx/…`), not a file of
//! this repository, and is left alone, as are glob patterns (`…/*.rs`,
//! `latest.{json,md}`).

use std::path::{Path, PathBuf};

/// Top-level folders whose paths are checked.
const ROOTS: &[&str] = &[
    ".ci", "bench", "deploy", "docs", "examples", "fuzz", "scripts", "src", "static", "tests",
];

/// Folders never read: build output, installed packages, generated corpora.
const SKIP_DIRS: &[&str] = &[
    ".git",
    "target",
    "node_modules",
    "corpus",
    "artifacts",
    "test-artifacts",
    "results",
];

/// File endings read as text.
const TEXT: &[&str] = &[
    "md", "rs", "toml", "yml", "yaml", "js", "mjs", "ts", "py", "sh", "conf", "html", "json",
];

fn is_text(path: &Path) -> bool {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    if name == "Dockerfile" || name == "run" {
        return true;
    }
    match path.extension().and_then(|e| e.to_str()) {
        Some(ext) => TEXT.contains(&ext),
        // Extension-less scripts (scripts/test, scripts/check-deploy).
        None => path.parent().is_some_and(|p| p.ends_with("scripts")),
    }
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if path.is_dir() {
            if !SKIP_DIRS.contains(&name.as_ref()) {
                walk(&path, out);
            }
        } else if is_text(&path) {
            out.push(path);
        }
    }
}

fn path_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '/')
}

/// The repository paths mentioned in `text`.
fn mentioned(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    let bytes = text.as_bytes();
    for root in ROOTS {
        let needle = format!("{root}/");
        let mut from = 0;
        while let Some(at) = text[from..].find(&needle) {
            let start = from + at;
            from = start + needle.len();
            // A path starts a word: not inside a longer name or URL.
            if start > 0 {
                let before = bytes[start - 1] as char;
                let dot_slash = before == '/' && start >= 2 && bytes[start - 2] == b'.';
                let dotdot = dot_slash && start >= 3 && bytes[start - 3] == b'.';
                if dotdot || (!dot_slash && (path_char(before) || before == '$')) {
                    continue;
                }
            }
            let rest = &text[start..];
            let end = rest.find(|c: char| !path_char(c)).unwrap_or(rest.len());
            let next = rest[end..].chars().next();
            if matches!(next, Some('*' | '{' | '<' | '$')) {
                continue; // a pattern, not a path
            }
            let path = rest[..end].trim_end_matches('.');
            if !path.contains("node_modules") {
                // Installed by npm at test time, not part of the tree.
                found.push(path.to_owned());
            }
        }
    }
    found
}

#[test]
fn every_path_the_repository_mentions_exists() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    walk(root, &mut files);
    assert!(files.len() > 20, "read only {} files", files.len());
    let mut missing = Vec::new();
    let mut checked = 0;
    for file in &files {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        for path in mentioned(&text) {
            checked += 1;
            if !root.join(&path).exists() {
                let file = file.strip_prefix(root).unwrap_or(file);
                missing.push(format!("{} mentions {path}", file.display()));
            }
        }
    }
    assert!(checked > 50, "found only {checked} path mentions");
    missing.sort();
    missing.dedup();
    assert!(
        missing.is_empty(),
        "paths that do not exist:\n  {}",
        missing.join("\n  ")
    );
}

#[test]
fn the_scanner_finds_paths_and_ignores_urls_and_patterns() {
    let text = "see `docs/cluster.md`, src/bus/redis/ and ./scripts/test. \
                GET /scripts/webconnection-websocket.js; tests/*.rs; \
                bench/results/latest.{json,md}; ../shared/docs/x.md; mysrc/x";
    assert_eq!(
        mentioned(text),
        vec!["docs/cluster.md", "scripts/test", "src/bus/redis/"]
    );
}

/// Every Markdown table in `README.md` and `docs/` opens with a header and
/// its `|---|` row: a paragraph once split the Endpoints table, and the rows
/// after it rendered as plain text (review 12 item 7).
#[test]
fn every_markdown_table_row_follows_a_header() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = vec![root.join("README.md")];
    walk(&root.join("docs"), &mut files);
    let mut broken = Vec::new();
    for file in files
        .iter()
        .filter(|f| f.extension().is_some_and(|e| e == "md"))
    {
        let text = std::fs::read_to_string(file).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let mut in_code = false;
        for (i, line) in lines.iter().enumerate() {
            if line.trim_start().starts_with("```") {
                in_code = !in_code;
            }
            let row = |l: &str| l.trim_start().starts_with('|');
            let first_of_table = row(line) && (i == 0 || !row(lines[i - 1]));
            let separated = lines.get(i + 1).is_some_and(|next| {
                let next = next.trim_start();
                next.starts_with("|-") || next.starts_with("| -") || next.starts_with("|:")
            });
            if !in_code && first_of_table && !separated {
                broken.push(format!("{}:{}: {line}", file.display(), i + 1));
            }
        }
    }
    assert!(
        broken.is_empty(),
        "table rows without a header:\n{}",
        broken.join("\n")
    );
}
