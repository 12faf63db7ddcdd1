//! The shipped deployment files against the binary (issue 12): every
//! variable a Kubernetes pod or a compose container gets is accepted, the
//! rendered ConfigMap loads, probes and ports match the configuration, and
//! a typo in a real key still stops start-up. Kubernetes is rendered with
//! `kubectl kustomize`; YAML is read with Python's PyYAML (`scripts/test`
//! installs both; a missing one fails the test).

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::redis::RedisServer;
use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// YAML documents (`---`-separated) as JSON values, through PyYAML.
fn yaml_documents(yaml: &str) -> Vec<Value> {
    use std::io::Write;
    let mut child = Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml; json.dump([d for d in yaml.safe_load_all(sys.stdin) if d], sys.stdout)",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 (scripts/test installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(yaml.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "PyYAML is needed (pip install pyyaml; scripts/test does): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `kubectl kustomize deploy/kubernetes`, parsed.
fn rendered_kustomization() -> Vec<Value> {
    let out = Command::new("kubectl")
        .args(["kustomize"])
        .arg(repo().join("deploy/kubernetes"))
        .output()
        .expect("kubectl is needed to render the kustomization (scripts/test installs it)");
    assert!(
        out.status.success(),
        "kubectl kustomize: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    yaml_documents(&String::from_utf8(out.stdout).unwrap())
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in the rendered manifests"))
}

/// A started `wshub`: its log up to "wshub listening", or how it exited.
enum Started {
    Listening {
        child: Child,
        before: Vec<String>,
        line: Value,
    },
    Exited {
        code: Option<i32>,
        stderr: String,
    },
}

impl Drop for Started {
    fn drop(&mut self) {
        if let Started::Listening { child, .. } = self {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs the binary with exactly `env` (and PATH), JSON logs on stderr.
fn start(args: &[&str], env: &BTreeMap<String, String>) -> Started {
    let mut child = Command::new(env!("CARGO_BIN_EXE_wshub"))
        .args(args)
        .env_clear()
        .envs(env)
        .env("WSHUB_LOG__FORMAT", "json")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn wshub");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut before = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        let v: Value = serde_json::from_str(&line).unwrap_or_default();
        if v["message"] == "wshub listening" {
            std::thread::spawn(move || for _ in lines {});
            return Started::Listening {
                child,
                before,
                line: v,
            };
        }
        before.push(line);
    }
    let status = child.wait().unwrap();
    Started::Exited {
        code: status.code(),
        stderr: before.join("\n"),
    }
}

fn assert_listening_without_warnings(started: &Started, what: &str) {
    match started {
        Started::Listening { before, .. } => {
            let warnings: Vec<&String> = before.iter().filter(|l| l.contains("WARN")).collect();
            assert!(warnings.is_empty(), "{what}: warnings {warnings:#?}");
        }
        Started::Exited { code, stderr } => {
            panic!("{what}: wshub exited with {code:?} instead of starting: {stderr}")
        }
    }
}

/// The variables Kubernetes gives a container for each Service in its
/// namespace when service links are on (the default, and what a user who
/// removes `enableServiceLinks: false` gets).
fn service_links(docs: &[Value]) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for (i, svc) in docs.iter().filter(|d| d["kind"] == "Service").enumerate() {
        let name = svc["metadata"]["name"]
            .as_str()
            .unwrap()
            .to_ascii_uppercase()
            .replace('-', "_");
        let ip = format!("10.96.0.{}", i + 10);
        let ports = svc["spec"]["ports"].as_array().unwrap();
        for (j, port) in ports.iter().enumerate() {
            let number = port["port"].as_u64().unwrap();
            let proto = port["protocol"].as_str().unwrap_or("TCP");
            if j == 0 {
                env.insert(format!("{name}_SERVICE_HOST"), ip.clone());
                env.insert(format!("{name}_SERVICE_PORT"), number.to_string());
                env.insert(
                    format!("{name}_PORT"),
                    format!("{}://{ip}:{number}", proto.to_ascii_lowercase()),
                );
            }
            if let Some(port_name) = port["name"].as_str() {
                env.insert(
                    format!(
                        "{name}_SERVICE_PORT_{}",
                        port_name.to_ascii_uppercase().replace('-', "_")
                    ),
                    number.to_string(),
                );
            }
            let base = format!("{name}_PORT_{number}_{proto}");
            env.insert(
                base.clone(),
                format!("{}://{ip}:{number}", proto.to_ascii_lowercase()),
            );
            env.insert(format!("{base}_PROTO"), proto.to_ascii_lowercase());
            env.insert(format!("{base}_PORT"), number.to_string());
            env.insert(format!("{base}_ADDR"), ip.clone());
        }
    }
    env
}

fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "wshub-{name}-{}-{}",
        std::process::id(),
        rand_suffix()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(0u8)
}

/// The pod's container as rendered: the ConfigMap loads with `--config`,
/// every variable it sees (its own, the optional Secret's, and service links
/// had they been on) is accepted without a warning, and the probes and ports
/// are the ones the configuration serves.
#[test]
fn the_kubernetes_pod_starts_with_everything_it_is_given() {
    let docs = rendered_kustomization();
    let deployment = find(&docs, "Deployment", "wshub");
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(
        pod["enableServiceLinks"], false,
        "service links are noise in the pod's environment"
    );
    let container = &pod["containers"][0];

    // The ConfigMap, mounted where --config points.
    let args: Vec<&str> = container["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let config_path = Path::new(args[args.iter().position(|a| *a == "--config").unwrap() + 1]);
    let mount = container["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| config_path.starts_with(m["mountPath"].as_str().unwrap()))
        .expect("--config points into a mounted volume");
    let volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap();
    let map_name = volume["configMap"]["name"].as_str().unwrap();
    let config_map = find(&docs, "ConfigMap", map_name);
    let file_name = config_path.file_name().unwrap().to_str().unwrap();
    let toml = config_map["data"][file_name]
        .as_str()
        .unwrap_or_else(|| panic!("ConfigMap {map_name} has no key {file_name}"));
    let dir = scratch_dir("k8s");
    let file = dir.join(file_name);
    std::fs::write(&file, toml).unwrap();

    // Ports and probes against the configuration's listen port.
    let listen_port: u16 = toml
        .lines()
        .find_map(|l| l.trim().strip_prefix("listen = "))
        .map(|v| {
            v.trim_matches('"')
                .rsplit(':')
                .next()
                .unwrap()
                .parse()
                .unwrap()
        })
        .unwrap_or(8080);
    let http_port = &container["ports"][0];
    assert_eq!(http_port["containerPort"], listen_port);
    let port_name = http_port["name"].as_str().unwrap();
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        assert_eq!(container[probe]["httpGet"]["path"], path, "{probe}");
        assert_eq!(container[probe]["httpGet"]["port"], port_name, "{probe}");
    }
    let annotations = &deployment["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/port"], listen_port.to_string());
    assert_eq!(annotations["prometheus.io/path"], "/metrics");
    let service = find(&docs, "Service", "wshub");
    assert_eq!(service["spec"]["ports"][0]["targetPort"], port_name);

    // Every variable the container would see.
    let redis = RedisServer::start();
    let mut env = service_links(&docs);
    assert!(env.contains_key("WSHUB_SERVICE_HOST"), "{env:?}");
    assert!(
        env.contains_key("WSHUB_REDIS_PORT_6379_TCP_ADDR"),
        "{env:?}"
    );
    for var in container["env"].as_array().unwrap() {
        let name = var["name"].as_str().unwrap().to_owned();
        let value = if let Some(v) = var["value"].as_str() {
            v.to_owned()
        } else if var["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name" {
            "wshub-7d9f8b6c5-x2x4q".to_owned()
        } else if let Some(key) = var["valueFrom"]["secretKeyRef"]["key"].as_str() {
            assert_eq!(
                var["valueFrom"]["secretKeyRef"]["optional"], true,
                "{name}: pods must start without the Secret"
            );
            // Values of the shape the Secret's docs ask for.
            format!("{key}-0123456789abcdef0123456789abcdef")
        } else {
            panic!("{name}: a source this test does not know: {var}");
        };
        env.insert(name, value);
    }
    assert!(
        env.contains_key("WSHUB_BROADCAST__API_KEYS"),
        "the optional Secret's API keys reach the pod"
    );
    // Only where it listens and which Redis differ from a real pod.
    env.insert("WSHUB_LISTEN".into(), "127.0.0.1:0".into());
    env.insert("WSHUB_REDIS__URL".into(), redis.url());
    let started = start(&["--config", file.to_str().unwrap()], &env);
    assert_listening_without_warnings(&started, "the Kubernetes pod's environment");
    if let Started::Listening { line, .. } = &started {
        assert_eq!(line["node"], "wshub-7d9f8b6c5-x2x4q");
        assert_eq!(line["broadcast"], "API key required (1 configured)");
    }
    drop(started);
    let _ = std::fs::remove_dir_all(dir);
}

/// The optional monitoring manifests name the Service's port and metrics
/// that exist.
#[test]
fn the_monitoring_manifests_match_the_service() {
    let docs = rendered_kustomization();
    let service = find(&docs, "Service", "wshub");
    let port_name = service["spec"]["ports"][0]["name"].as_str().unwrap();
    let text = std::fs::read_to_string(repo().join("deploy/kubernetes/monitoring/monitoring.yaml"))
        .unwrap();
    let monitoring = yaml_documents(&text);
    let monitor = monitoring
        .iter()
        .find(|d| d["kind"] == "ServiceMonitor")
        .expect("a ServiceMonitor");
    assert_eq!(monitor["spec"]["endpoints"][0]["port"], port_name);
    assert_eq!(monitor["spec"]["endpoints"][0]["path"], "/metrics");
    for (k, v) in monitor["spec"]["selector"]["matchLabels"]
        .as_object()
        .unwrap()
    {
        assert_eq!(&service["metadata"]["labels"][k], v, "selector {k}");
    }
    let rules = monitoring
        .iter()
        .find(|d| d["kind"] == "PrometheusRule")
        .expect("a PrometheusRule");
    let alerts: Vec<&str> = rules["spec"]["groups"][0]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["alert"].as_str().unwrap())
        .collect();
    for alert in [
        "WshubNodeNotReady",
        "WshubRedisUnreachable",
        "WshubSlowConsumers",
        "WshubBackendFailing",
    ] {
        assert!(alerts.contains(&alert), "{alert} in {alerts:?}");
    }
}

/// `docker-compose.yml`'s wshub service environment, with `${VAR:-default}`
/// taken at its default: accepted without a warning; and none of the
/// compose file's own variables is a `WSHUB_` one.
#[test]
fn the_compose_environment_is_accepted() {
    let text = std::fs::read_to_string(repo().join("docker-compose.yml")).unwrap();
    let mut rest = text.as_str();
    while let Some(at) = rest.find("${") {
        let name = &rest[at + 2..];
        assert!(
            !name.starts_with("WSHUB_"),
            "compose variable {}: WSHUB_ is wshub's own prefix",
            &name[..name.find([':', '}', '-']).unwrap_or(name.len())]
        );
        rest = &rest[at + 2..];
    }
    let compose = &yaml_documents(&text)[0];
    let redis = RedisServer::start();
    let mut env = BTreeMap::new();
    for (k, v) in compose["services"]["wshub"]["environment"]
        .as_object()
        .unwrap()
    {
        let v = v.as_str().unwrap();
        // `${NAME:-default}` unset: the default.
        let v = match v.strip_prefix("${") {
            Some(inner) => inner
                .trim_end_matches('}')
                .split_once(":-")
                .map(|(_, d)| d)
                .unwrap_or("")
                .to_owned(),
            None => v.to_owned(),
        };
        env.insert(k.clone(), v);
    }
    assert!(env.contains_key("WSHUB_BROADCAST__API_KEYS"), "{env:?}");
    assert!(
        !env.contains_key("WSHUB_BROADCAST__TRUSTED_NETWORKS"),
        "the compose example uses API keys, not a trusted network"
    );
    env.insert("WSHUB_LISTEN".into(), "127.0.0.1:0".into());
    env.insert("WSHUB_REDIS__URL".into(), redis.url());
    // What a shell around compose may also have set.
    env.insert("CHAT_BACKEND_URL".into(), String::new());
    let started = start(&[], &env);
    assert_listening_without_warnings(&started, "the compose environment");
}

/// A variable that is not configuration is ignored with one warning
/// suggesting the real one; a typo of a key inside a known section stops
/// start-up with exit 2, naming the variable.
#[test]
fn unknown_variables_warn_and_typos_in_a_section_stop_start_up() {
    let mut env = BTreeMap::new();
    env.insert("WSHUB_LISTEN".to_owned(), "127.0.0.1:0".to_owned());
    env.insert("WSHUB_REDIS_URL".to_owned(), "redis://x".to_owned());
    let started = start(&[], &env);
    let Started::Listening { before, .. } = &started else {
        panic!("wshub did not start with an unknown variable");
    };
    let warnings: Vec<&String> = before.iter().filter(|l| l.contains("WARN")).collect();
    assert_eq!(warnings.len(), 1, "{warnings:#?}");
    assert!(
        warnings[0].contains("WSHUB_REDIS_URL")
            && warnings[0].contains("did you mean WSHUB_REDIS__URL?"),
        "{}",
        warnings[0]
    );
    drop(started);

    env.remove("WSHUB_REDIS_URL");
    env.insert("WSHUB_REDIS__URLL".to_owned(), "redis://x".to_owned());
    match &start(&[], &env) {
        Started::Exited { code, stderr } => {
            assert_eq!(*code, Some(2), "{stderr}");
            assert!(stderr.contains("WSHUB_REDIS__URLL"), "{stderr}");
        }
        Started::Listening { .. } => panic!("a typo inside [redis] must stop start-up"),
    }
}

/// The start-up line gives the effective settings, passwords redacted.
#[test]
fn the_start_up_line_shows_settings_without_secrets() {
    let mut env = BTreeMap::new();
    env.insert("WSHUB_LISTEN".to_owned(), "127.0.0.1:0".to_owned());
    // Nothing listens there; the node starts unready, which is enough.
    env.insert(
        "WSHUB_REDIS__URL".to_owned(),
        "redis://default:hunter2@127.0.0.1:1".to_owned(),
    );
    env.insert(
        "WSHUB_AUTH__JWT_SECRET".to_owned(),
        "s3cret-s3cret-s3cret-s3cret-s3cret".to_owned(),
    );
    let started = start(&[], &env);
    let Started::Listening { line, before, .. } = &started else {
        panic!("wshub did not start");
    };
    let all = format!("{before:?}{line}");
    assert!(!all.contains("hunter2") && !all.contains("s3cret"), "{all}");
    assert_eq!(line["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(line["bus"], "redis redis://default:***@127.0.0.1:1");
    assert_eq!(line["auth"], "token (HS256)");
    assert_eq!(line["broadcast"], "loopback only");
    assert!(line["backend"].as_str().unwrap().starts_with("none"));
}
