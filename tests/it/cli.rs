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
        // Every page of docs/ (a review found three missing).
        let docs = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/docs"))
            .unwrap()
            .map(|e| format!("docs/{}", e.unwrap().file_name().to_string_lossy()))
            .filter(|name| name.ends_with(".md"));
        let wants = ["healthcheck", "wshub.example.toml", "README.md"]
            .map(str::to_owned)
            .into_iter()
            .chain(docs);
        for want in wants {
            assert!(
                text.contains(&want),
                "{flag} does not mention {want}:\n{text}"
            );
        }
    }
}

/// A node logging text to a pipe: the child, its stderr, and what it
/// wrote up to the line saying where it listens (that line last).
fn text_logging_node() -> (
    std::process::Child,
    BufReader<std::process::ChildStderr>,
    String,
) {
    let mut child = wshub()
        .env_clear()
        .env("WSHUB_LISTEN", "127.0.0.1:0")
        .env("WSHUB_LOG__FORMAT", "text")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start wshub");
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let seen = read_until(&mut stderr, "wshub listening");
    (child, stderr, seen)
}

/// What `stderr` gives up to the first line containing `marker` (that
/// line last); fails if it ends first.
fn read_until(stderr: &mut impl BufRead, marker: &str) -> String {
    let mut line = String::new();
    let mut seen = String::new();
    while !line.contains(marker) {
        line.clear();
        let n = stderr.read_line(&mut line).expect("read stderr");
        assert!(n > 0, "wshub exited before {marker:?}:\n{seen}");
        seen.push_str(&line);
    }
    seen
}

/// Text logs to a pipe carry no ANSI colour codes: they end up in journald,
/// `docker logs` or a file, where `\x1b[2m` is noise.
#[test]
fn text_logs_to_a_pipe_have_no_colour_codes() {
    // The start-up lines end with the one saying where it listens.
    let (mut child, _, seen) = text_logging_node();
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        !seen.contains('\x1b'),
        "colour codes in piped logs:\n{seen:?}"
    );
}

/// In text logs the HTTP layer's refusal quotes hyper's words, as the
/// router's refusals quote their reason, so that a logfmt reader takes
/// them as one value (review of 2026-12-03: `error=invalid HTTP method
/// parsed` read as four fields).
#[test]
fn the_http_layer_refusal_quotes_its_error_in_text_logs() {
    use std::io::{Read, Write};
    let (mut child, mut stderr, seen) = text_logging_node();
    let addr = seen
        .lines()
        .last()
        .unwrap()
        .split_whitespace()
        .find_map(|field| field.strip_prefix("addr="))
        .expect("the listening line names its address")
        .to_owned();
    let mut stream = std::net::TcpStream::connect(&addr).unwrap();
    stream.write_all(b"HELLO\r\n\r\n").unwrap();
    let mut answer = String::new();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let _ = stream.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    let seen = read_until(&mut stderr, "request refused by the HTTP layer");
    child.kill().unwrap();
    child.wait().unwrap();
    let line = seen.lines().last().unwrap();
    assert!(
        line.contains("error=\"invalid HTTP method parsed\""),
        "{line}"
    );
    assert!(line.contains("peer=127.0.0.1 "), "{line}");
}

/// `healthcheck` exits 0 or 1, as `--help` says: Docker reserves 2, and a
/// configuration error is one more reason the node is not healthy.
#[test]
fn healthcheck_with_a_configuration_error_exits_1() {
    let out = wshub()
        .env_clear()
        .env("WSHUB_LISTEN", "not an address")
        .arg("healthcheck")
        .output()
        .expect("run wshub");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("listen"), "{err}");
}

/// Review of 2026-12-02: an empty `WSHUB_CONFIG` (a template that leaves
/// it blank) is no file, as unset; clap refused it, and `healthcheck`
/// exited 2, as it did for an unknown argument. Both promise 0 or 1.
#[test]
fn healthcheck_exits_0_or_1_whatever_its_arguments() {
    let (code, out, err) = run(&["config", "check"], &[("WSHUB_CONFIG", "")]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("listen = \"0.0.0.0:8080\""), "{out}");
    // Nothing listens on this port: unhealthy, 1, saying why (review of
    // 2026-12-03: nothing on stderr).
    let env = [("WSHUB_CONFIG", ""), ("WSHUB_LISTEN", "127.0.0.1:9")];
    let (code, _, err) = run(&["healthcheck"], &env);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.starts_with(
            "wshub healthcheck: unhealthy: no answer from http://127.0.0.1:9/healthz: "
        ) && err.contains("refused"),
        "{err}"
    );
    let (code, _, err) = run(&["healthcheck", "--bogus"], &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("--bogus"), "{err}");
    // A node with an unknown argument still refuses to start with 2.
    let (code, _, err) = run(&["--bogus"], &[]);
    assert_eq!(code, 2, "{err}");
    let (code, out, _) = run(&["--version"], &[]);
    assert_eq!(code, 0);
    assert!(out.starts_with("wshub "), "{out}");
}

/// A worker-thread count tokio would refuse (with a panic when the
/// runtime starts), or one above 1,024 (a capacity overflow or an aborted
/// allocation in tokio), is answered with a line naming it and exit code
/// 2, like any configuration error; `config check` refuses it too, and
/// accepts 1,024; a good one passes the start's check.
#[test]
fn a_bad_worker_thread_count_is_refused_with_a_reason() {
    for bad in ["0", "two", "-1", "", "1025", "18446744073709551615"] {
        let out = wshub()
            .env_clear()
            .env("WSHUB_LISTEN", "127.0.0.1:0")
            .env("TOKIO_WORKER_THREADS", bad)
            .output()
            .expect("run wshub");
        assert_eq!(out.status.code(), Some(2), "TOKIO_WORKER_THREADS={bad:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("TOKIO_WORKER_THREADS must be a whole number from 1 to 1024")
                && !err.contains("panicked"),
            "TOKIO_WORKER_THREADS={bad:?}: {err}"
        );
    }
    // The check says what the start would.
    let (code, _, err) = run(&["config", "check"], &[("TOKIO_WORKER_THREADS", "1025")]);
    assert_eq!(code, 1);
    assert!(
        err.contains("TOKIO_WORKER_THREADS must be a whole number from 1 to 1024"),
        "{err}"
    );
    let (code, _, err) = run(&["config", "check"], &[("TOKIO_WORKER_THREADS", "1024")]);
    assert_eq!(code, 0, "{err}");
    // `healthcheck` keeps its promise of 0 or 1.
    let out = wshub()
        .env_clear()
        .env("TOKIO_WORKER_THREADS", "0")
        .arg("healthcheck")
        .output()
        .expect("run wshub");
    assert_eq!(out.status.code(), Some(1));
    let out = wshub()
        .env_clear()
        .env("TOKIO_WORKER_THREADS", "1")
        .env("WSHUB_LISTEN", "not an address")
        .arg("healthcheck")
        .output()
        .expect("run wshub");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !err.contains("TOKIO_WORKER_THREADS"),
        "a good value was refused: {err}"
    );
}

/// When the system refuses a worker thread (here every one: each asks
/// for a 1 TiB stack), the node says so and exits 1 at once. tokio
/// panics on the starting thread, and unwinding waited for the workers
/// already started: the node hung without listening, or aborted. (An
/// address-space limit, tried first, also makes allocations fail, which
/// abort before any panic: not this path, and flaky.)
#[test]
fn a_runtime_that_cannot_start_is_one_line_and_exit_1() {
    let mut node = wshub()
        .env_clear()
        .env("WSHUB_LISTEN", "127.0.0.1:0")
        .env("TOKIO_WORKER_THREADS", "8")
        .env("RUST_MIN_STACK", "1099511627776")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run wshub");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let status = loop {
        if let Some(status) = node.try_wait().expect("wait for wshub") {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = node.kill();
            let _ = node.wait();
            panic!("wshub neither started nor exited within 20 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut node.stderr.take().expect("stderr"), &mut err)
        .expect("read stderr");
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains("wshub: cannot start the runtime: OS can't spawn worker thread")
            && !err.contains("panicked"),
        "{err}"
    );
}

/// The sample backend, like wshub, writes no colour codes into a pipe
/// (it logs to stderr; whatever it writes to stdout is checked too).
#[test]
fn chat_backend_logs_to_a_pipe_have_no_colour_codes() {
    // Not a binary of this package, so Cargo does not build it for this
    // test: build it next to wshub, with the profile wshub was built with
    // (its folder: `debug` is the `dev` profile), so that `cargo test
    // --release` finds it too.
    let wshub = std::path::Path::new(env!("CARGO_BIN_EXE_wshub"));
    let profile_dir = wshub.parent().expect("wshub's folder");
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => "dev",
        Some(name) => name,
    };
    let status = Command::new(env!("CARGO"))
        .args(["build", "--quiet", "-p", "wshub-chat-backend", "--bin"])
        .arg("wshub-chat-backend")
        .args(["--profile", profile])
        .status()
        .expect("run cargo");
    assert!(status.success());
    let exe = wshub.with_file_name("wshub-chat-backend");
    let mut child = Command::new(exe)
        .env_clear()
        .args(["--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start wshub-chat-backend");
    // A bound on the wait, should the line never come to stderr.
    let pid = child.id().to_string();
    let (done, watchdog) = std::sync::mpsc::channel::<()>();
    let guard = std::thread::spawn(move || {
        if watchdog
            .recv_timeout(std::time::Duration::from_secs(10))
            .is_err()
        {
            let _ = Command::new("kill").arg(&pid).status();
        }
    });
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).expect("read stderr");
    let _ = done.send(());
    guard.join().unwrap();
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    let all = format!("{line}{}", String::from_utf8_lossy(&out.stdout));
    assert!(!all.contains('\x1b'), "colour codes in piped logs: {all:?}");
    assert!(line.contains("chat backend listening"), "{all:?}");
}

/// Review 12 item 1: neither the failure warning nor the start-up line
/// shows the backend URL's password or query (which may hold a key).
#[tokio::test]
async fn backend_failures_log_no_url_password_or_query() {
    let port = crate::common::free_port();
    let mut child = wshub()
        .env_clear()
        .env("WSHUB_LISTEN", "127.0.0.1:0")
        .env(
            "WSHUB_BACKEND__URL",
            format!("http://fox:hunter2@127.0.0.1:{port}/__websocket.wwd?apikey=SECRETQ"),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start wshub");
    let mut lines = stderr_lines(&mut child);
    let mut seen = String::new();
    let addr = loop {
        let line = lines.recv().await.expect("wshub exited before listening");
        seen.push_str(&line);
        seen.push('\n');
        if let Some(rest) = line
            .split(" addr=")
            .nth(1)
            .filter(|_| line.contains("wshub listening"))
        {
            break rest.split(' ').next().unwrap().parse().unwrap();
        }
    };
    let mut ann =
        crate::common::Client::connect(addr, "/__initializeWebSocket.wc?userid=ann").await;
    ann.send_json(serde_json::json!({"action": "doit"})).await;
    assert_eq!(ann.recv().await["action"], "wshub.error");
    while !seen.contains("backend forwards failing") {
        let line = lines.recv().await.expect("wshub exited");
        seen.push_str(&line);
        seen.push('\n');
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        !seen.contains("hunter2") && !seen.contains("SECRETQ"),
        "{seen}"
    );
}

/// JSON logs hold a client's strings as the values they are: a review
/// found `"user":"\"ann lee\""` and a refusal's `"reason"` in quotes of
/// its own, which no query for `ann lee` or the reason's text matched.
/// Control characters are still escaped as in text logs.
#[tokio::test]
async fn json_logs_hold_client_strings_without_extra_quotes() {
    let mut child = wshub()
        .env_clear()
        .env("WSHUB_LISTEN", "127.0.0.1:0")
        .env("WSHUB_LOG__FORMAT", "json")
        .env("WSHUB_LOG__LEVEL", "debug")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start wshub");
    let mut lines = stderr_lines(&mut child);
    let mut next = async || -> serde_json::Value {
        let line = lines.recv().await.expect("wshub exited");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"))
    };
    let addr: std::net::SocketAddr = loop {
        let line = next().await;
        if line["message"] == "wshub listening" {
            break line["addr"].as_str().unwrap().parse().unwrap();
        }
    };
    let ann = crate::common::Client::connect(addr, "/ws?userid=ann%20lee%0A%22x").await;
    ann.close().await;
    let long = "u".repeat(300);
    let refused = reqwest::Client::new()
        .get(format!("http://{addr}/ws?userid={long}"))
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 400);
    let told = refused.text().await.unwrap();
    let (mut user, mut reason) = (None, None);
    let deadline = tokio::time::Instant::now() + crate::common::PATIENCE;
    while user.is_none() || reason.is_none() {
        let line = tokio::time::timeout_at(deadline, next())
            .await
            .expect("no such log lines");
        if line["message"] == "connection closed" {
            user = line["user"].as_str().map(str::to_owned);
        }
        if let Some(r) = line["reason"]
            .as_str()
            .filter(|r| r.contains("longer than"))
        {
            reason = Some(r.to_owned());
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(user.as_deref(), Some("ann lee\\n\"x"));
    assert_eq!(reason.as_deref(), Some(told.trim()));
}

/// The child's stderr, line by line as it comes, read on a thread of its
/// own.
fn stderr_lines(child: &mut std::process::Child) -> tokio::sync::mpsc::UnboundedReceiver<String> {
    let stderr = child.stderr.take().expect("stderr piped");
    let (tx, lines) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    lines
}

/// Runs `wshub args` with only `env` in its environment: exit code,
/// stdout, stderr.
fn run(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let out = wshub()
        .env_clear()
        .envs(env.iter().copied())
        .args(args)
        .output()
        .expect("run wshub");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn config_defaults_is_a_valid_file_that_changes_nothing() {
    let (code, defaults, _) = run(&["config", "defaults"], &[]);
    assert_eq!(code, 0);
    let dir = std::env::temp_dir().join(format!("wshub-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("defaults.toml");
    std::fs::write(&file, &defaults).unwrap();
    let (code, checked, stderr) = run(
        &["config", "check", "--config", file.to_str().unwrap()],
        &[],
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(
        checked.starts_with("# The configuration is valid"),
        "{checked}"
    );
    assert!(
        checked.ends_with(&defaults),
        "check prints the defaults back:\n{checked}"
    );
    assert!(defaults.contains("client_relay = \"all\""));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn config_check_redacts_secrets_and_names_what_is_wrong() {
    let secrets = [
        (
            "WSHUB_AUTH__JWT_SECRET",
            "jwt-secret-0123456789-0123456789-01",
        ),
        (
            "WSHUB_BROADCAST__API_KEYS",
            "key-one-abc-0123456,key-two-def-0123456",
        ),
        (
            "WSHUB_REDIS__URL",
            "redis://user:hunter2@redis.internal:6379",
        ),
        ("WSHUB_BACKEND__URL", "https://app.internal/ws?apikey=zzz"),
        (
            "WSHUB_BACKEND__SIGNING_KEY",
            "signing-key-0123456789-0123456789",
        ),
        ("WSHUB_WS__CLIENT_RELAY", "group"),
    ];
    let (code, text, stderr) = run(&["config", "check"], &secrets);
    assert_eq!(code, 0, "{stderr}");
    for secret in [
        "jwt-secret",
        "key-one",
        "key-two",
        "hunter2",
        "apikey=zzz",
        "signing-key",
    ] {
        assert!(!text.contains(secret), "{secret} shown:\n{text}");
    }
    for shown in [
        "jwt_secret = \"***\"",
        "api_keys = [\"***\", \"***\"]",
        "url = \"redis://user:***@redis.internal:6379\"",
        "client_relay = \"group\"",
    ] {
        assert!(text.contains(shown), "{shown} missing:\n{text}");
    }
    let (code, text, stderr) = run(&["config", "check"], &[("WSHUB_WS__CLIENT_RELAY", "some")]);
    assert_eq!((code, text.as_str()), (1, ""));
    assert!(stderr.contains("ws.client_relay"), "{stderr}");
}

#[test]
fn config_check_prints_the_values_the_node_runs_with() {
    // A burst of 0 is taken as 1 (and 0 rate violations before a close),
    // a per-connection backend queue above the whole queue as the whole
    // queue: check prints those, not what was written.
    let (code, text, stderr) = run(
        &["config", "check"],
        &[
            ("WSHUB_LIMITS__MESSAGE_BURST", "0"),
            ("WSHUB_LIMITS__CONNECT_BURST_PER_IP", "0"),
            // Review of 2026-12-03: printed 0, run as 1.
            ("WSHUB_LIMITS__RATE_VIOLATIONS_BEFORE_CLOSE", "0"),
            ("WSHUB_BACKEND__URL", "http://127.0.0.1:9/ws"),
            ("WSHUB_BACKEND__QUEUE", "10"),
            ("WSHUB_BACKEND__QUEUE_PER_CONNECTION", "50"),
        ],
    );
    assert_eq!(code, 0, "{stderr}");
    for shown in [
        "message_burst = 1\n",
        "connect_burst_per_ip = 1\n",
        "rate_violations_before_close = 1\n",
        "queue = 10\n",
        "queue_per_connection = 10\n",
    ] {
        assert!(text.contains(shown), "{shown:?} missing:\n{text}");
    }
}

/// Events turned on without a backend URL are posted nowhere: check says
/// so (a note, not an error: the compose file leaves the URL to its
/// environment).
#[test]
fn config_check_notes_backend_events_without_a_url() {
    let (code, text, stderr) = run(&["config", "check"], &[("WSHUB_BACKEND__EVENTS", "true")]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        text.contains("# note: backend.events is on but backend.url is empty"),
        "{text}"
    );
    let (code, text, stderr) = run(
        &["config", "check"],
        &[
            ("WSHUB_BACKEND__EVENTS", "true"),
            ("WSHUB_BACKEND__URL", "http://127.0.0.1:9/ws"),
        ],
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(!text.contains("# note"), "{text}");
}

#[tokio::test]
async fn a_minted_token_opens_a_socket_as_its_user() {
    const SECRET: &str = "cli-token-secret-0123456789abcdefghij";
    let env = [
        ("WSHUB_AUTH__JWT_SECRET", SECRET),
        ("WSHUB_AUTH__AUDIENCE", "app"),
    ];
    let (code, token, stderr) = run(
        &[
            "token", "--sub", "ann", "--group", "room", "--ttl", "10m", "--relay", "group",
        ],
        &env,
    );
    assert_eq!(code, 0, "{stderr}");
    let token = token.trim();
    let mut config = crate::common::test_config();
    config.auth = wshub::Config::load_from(
        None,
        env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
    )
    .unwrap()
    .auth;
    let server = crate::common::TestServer::with(config).await;
    let mut ann = crate::common::Client::connect(server.addr, &format!("/ws?token={token}")).await;
    // Its ids come from the token, and its relay claim holds: its own
    // group only.
    ann.send_json(serde_json::json!({"action": "broadcast", "message": "hi",
        "recipients": [{"type": "group", "value": "room"}]}))
        .await;
    let got = ann.recv().await;
    assert_eq!(
        (&got["userId"], &got["groupId"]),
        (&"ann".into(), &"room".into())
    );
    ann.send_json(serde_json::json!({"action": "broadcast", "message": "all"}))
        .await;
    assert_eq!(ann.recv().await["action"], "wshub.error");

    for (args, wants) in [
        (&["token", "--sub", "ann", "--ttl", "1y"][..], "--ttl"),
        (&["token", "--sub", "ann", "--relay", "most"][..], "--relay"),
        // Review of issue 16: it panicked adding this to the time now.
        (
            &["token", "--sub", "ann", "--ttl", "18446744073709551615s"][..],
            "--ttl",
        ),
        (
            &["token", "--sub", "ann", "--ttl", "18446744073709551d"][..],
            "--ttl",
        ),
    ] {
        let (code, _, stderr) = run(args, &env);
        assert_eq!(code, 1);
        assert!(stderr.contains(wants), "{stderr}");
    }
    let (code, out, stderr) = run(&["token", "--sub", "ann"], &[]);
    assert_eq!((code, out.as_str()), (1, ""));
    assert!(stderr.contains("auth.jwt_secret"), "{stderr}");
    // Review of 2026-12-02: ids the hub refuses (longer than
    // limits.max_id_bytes) are not minted into a token.
    let long = "u".repeat(257);
    for args in [
        &["token", "--sub", long.as_str()][..],
        &["token", "--sub", "ann", "--group", long.as_str()][..],
    ] {
        let (code, out, stderr) = run(args, &env);
        assert_eq!((code, out.as_str()), (1, ""), "{stderr}");
        assert!(stderr.contains("limits.max_id_bytes"), "{stderr}");
    }
}

/// Review of 2026-12-02: `RUST_LOG=warning` (which overrides `log.level`)
/// was a filter that let nothing through, errors included; it gets the
/// same check as `log.level`, and the node does not start.
#[test]
fn a_misspelt_rust_log_stops_the_start() {
    let mut child = wshub()
        .env_clear()
        .env("RUST_LOG", "warning")
        .env("WSHUB_LISTEN", "127.0.0.1:0")
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("run wshub");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the node started with RUST_LOG=warning");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.contains("RUST_LOG") && err.contains("warning"), "{err}");
}

/// Review of 2026-12-03: `config check` said a `RUST_LOG` was fine that
/// the node then refused (`wshub=warning`: a target's level, which the
/// level check passed and the filter did not), and a `WSHUB_CONFIG` path
/// that is not UTF-8 (a Linux path may be anything) was refused as a
/// secret-like variable.
#[test]
fn config_check_refuses_every_rust_log_the_node_refuses() {
    for directives in ["warning", "wshub=warning", "info,wshub=verbose"] {
        let (code, _, stderr) = run(&["config", "check"], &[("RUST_LOG", directives)]);
        assert_eq!(code, 1, "{directives}: {stderr}");
        assert!(stderr.contains("RUST_LOG"), "{directives}: {stderr}");
    }
    let (code, _, stderr) = run(&["config", "check"], &[("RUST_LOG", "info,wshub=debug")]);
    assert_eq!(code, 0, "{stderr}");
    // A config path that is not UTF-8: read as a path (here: none there).
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::OsStr::from_bytes(b"/nonexistent/caf\xe9.toml");
    let out = wshub()
        .env_clear()
        .env("WSHUB_CONFIG", path)
        .args(["config", "check"])
        .output()
        .expect("run wshub");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("cannot read the configuration file"),
        "{stderr}"
    );
}
