//! The `wshub` binary as an operator meets it: its help text and what it
//! writes to stderr when that is a pipe or a file (a service manager, a
//! container runtime, a log shipper), not a terminal.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

fn wshub() -> Command {
    Command::new(env!("CARGO_BIN_EXE_wshub"))
}

#[test]
fn help_names_the_subcommands_and_the_docs() {
    for flag in ["--help", "-h"] {
        let out = wshub().arg(flag).output().expect("run wshub");
        assert!(out.status.success());
        let text = String::from_utf8(out.stdout).unwrap();
        for want in [
            "healthcheck",
            "wshub.example.toml",
            "README.md",
            "docs/migrating.md",
        ] {
            assert!(
                text.contains(want),
                "{flag} does not mention {want}:\n{text}"
            );
        }
    }
}

/// Text logs to a pipe carry no ANSI colour codes: they end up in journald,
/// `docker logs` or a file, where `\x1b[2m` is noise.
#[test]
fn text_logs_to_a_pipe_have_no_colour_codes() {
    let mut child = wshub()
        .env_clear()
        .env("WSHUB_LISTEN", "127.0.0.1:0")
        .env("WSHUB_LOG__FORMAT", "text")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start wshub");
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    let mut seen = String::new();
    // The start-up lines end with the one saying where it listens.
    while !seen.contains("wshub listening") {
        line.clear();
        let n = stderr.read_line(&mut line).expect("read stderr");
        assert!(n > 0, "wshub exited before listening:\n{seen}");
        seen.push_str(&line);
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        !seen.contains('\x1b'),
        "colour codes in piped logs:\n{seen:?}"
    );
}
