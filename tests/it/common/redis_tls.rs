//! Redis over TLS, with ACL users, and under Sentinel, for the tests of
//! `redis.tls_*`, `redis.username`/`password` and `redis.sentinels`.
//!
//! Certificates are made per test with the `openssl` command line (a CA, a
//! server certificate for 127.0.0.1, a client certificate, and an unrelated
//! CA); every process is a [`GroupChild`] on a free loopback port, killed
//! with the test. A missing `openssl`, `redis-server` or `redis-cli` fails
//! the test (`scripts/test` installs them).

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::free_port;
use super::process::GroupChild;
use super::redis::{RedisCluster, RedisServer, cli};

/// A test configuration with these `WSHUB_REDIS__*` settings (read through
/// the real environment loader, as an operator would set them).
pub fn redis_config(settings: &[(&str, &str)]) -> wshub::Config {
    let mut config = super::test_config();
    config.redis = wshub::Config::load_from(None, redis_env(settings))
        .expect("redis config")
        .redis;
    config
}

/// The error that loading these `WSHUB_REDIS__*` settings stops at.
pub fn redis_config_error(settings: &[(&str, &str)]) -> String {
    wshub::Config::load_from(None, redis_env(settings))
        .unwrap_err()
        .to_string()
}

fn redis_env<'a>(settings: &'a [(&str, &str)]) -> impl Iterator<Item = (String, String)> + 'a {
    settings.iter().map(|(k, v)| {
        (
            format!("WSHUB_REDIS__{}", k.to_ascii_uppercase()),
            v.to_string(),
        )
    })
}

/// A node on these `WSHUB_REDIS__*` settings, once ready.
pub async fn ready_node(settings: &[(&str, &str)]) -> super::TestServer {
    let server = super::TestServer::with(redis_config(settings)).await;
    server.wait_ready().await;
    server
}

/// A scratch directory under target/ (see `RedisServer::start_with`).
pub fn scratch(what: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "wshub-{what}-{}-{}",
        std::process::id(),
        free_port()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run openssl ({e}): install Debian's openssl"));
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The PEM files of a test PKI, in `dir`.
pub struct Pki {
    pub dir: PathBuf,
}

impl Pki {
    /// A CA, a server certificate for 127.0.0.1 and localhost, one for
    /// localhost only, a client certificate, all signed by the CA, and an
    /// unrelated CA.
    pub fn make() -> Self {
        let dir = scratch("pki");
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        for ca in ["ca", "other-ca"] {
            let mut args = vec!["req", "-x509"];
            args.extend(ec);
            let (key, crt, subj) = (
                format!("{ca}.key"),
                format!("{ca}.crt"),
                format!("/CN=wshub test {ca}"),
            );
            args.extend([
                "-keyout",
                &key,
                "-out",
                &crt,
                "-days",
                "2",
                "-subj",
                &subj,
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ]);
            openssl(&dir, &args);
        }
        for (leaf, ext) in [
            (
                "server",
                "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
            ),
            ("client", "extendedKeyUsage=clientAuth\n"),
            // A name only, not the address: what a cluster's nodes
            // announce (127.0.0.1) is not in it.
            (
                "localhost",
                "subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\n",
            ),
        ] {
            std::fs::write(dir.join(format!("{leaf}.ext")), ext).unwrap();
            let (key, csr, crt, extfile) = (
                format!("{leaf}.key"),
                format!("{leaf}.csr"),
                format!("{leaf}.crt"),
                format!("{leaf}.ext"),
            );
            let subj = format!("/CN=wshub test {leaf}");
            let mut args = vec!["req"];
            args.extend(ec);
            args.extend(["-keyout", &key, "-out", &csr, "-subj", &subj]);
            openssl(&dir, &args);
            openssl(
                &dir,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &csr,
                    "-CA",
                    "ca.crt",
                    "-CAkey",
                    "ca.key",
                    "-CAcreateserial",
                    "-out",
                    &crt,
                    "-days",
                    "2",
                    "-extfile",
                    &extfile,
                ],
            );
        }
        Self { dir }
    }

    pub fn path(&self, file: &str) -> String {
        self.dir.join(file).to_string_lossy().into_owned()
    }

    /// `redis-server` arguments for TLS on `port` with the certificate
    /// `cert` (`server`, `localhost`), trusting the CA, asking clients for
    /// no certificate, and `more`.
    pub fn server_args(&self, port: u16, cert: &str, more: &[&str]) -> Vec<String> {
        let mut args = vec![
            "--tls-port".to_owned(),
            port.to_string(),
            "--tls-cert-file".to_owned(),
            self.path(&format!("{cert}.crt")),
            "--tls-key-file".to_owned(),
            self.path(&format!("{cert}.key")),
            "--tls-ca-cert-file".to_owned(),
            self.path("ca.crt"),
            "--tls-auth-clients".to_owned(),
            "no".to_owned(),
        ];
        args.extend(more.iter().map(|s| s.to_string()));
        args
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Redis Cluster of three primaries whose clients may speak TLS, with
/// the certificate `cert` (`server` or `localhost`, of [`Pki`]): each node
/// has a plain port (for the harness) and a TLS port, and the cluster bus
/// is TLS too (`tls-cluster`, the nodes presenting the client
/// certificate), so a TLS client's `CLUSTER SLOTS` names the TLS ports.
pub struct TlsCluster {
    pub cluster: RedisCluster,
    pub tls_ports: Vec<u16>,
}

impl TlsCluster {
    pub fn start(pki: &Pki, cert: &str) -> Self {
        let ports = std::sync::Mutex::new(Vec::new());
        let cluster = RedisCluster::start_each(3, || {
            let port = free_port();
            ports.lock().unwrap().push(port);
            // The cluster bus asks the connecting node for a client
            // certificate whatever `tls-auth-clients` says.
            pki.server_args(
                port,
                cert,
                &[
                    "--tls-cluster",
                    "yes",
                    "--tls-client-cert-file",
                    &pki.path("client.crt"),
                    "--tls-client-key-file",
                    &pki.path("client.key"),
                ],
            )
        });
        // The ports of the servers that made the cluster: the last three
        // given (a failed attempt starts three new ones).
        let ports = ports.into_inner().unwrap();
        let tls_ports = ports[ports.len() - 3..].to_vec();
        Self { cluster, tls_ports }
    }

    /// `redis.url` naming the first node by `host`.
    pub fn url(&self, host: &str) -> String {
        format!("rediss://{host}:{}", self.tls_ports[0])
    }
}

/// A `redis-server` that speaks only TLS, on a free port.
pub struct TlsRedis {
    pub port: u16,
    _child: GroupChild,
    dir: PathBuf,
}

impl TlsRedis {
    /// `client_certs`: require a client certificate signed by the CA.
    pub fn start(pki: &Pki, client_certs: bool) -> Self {
        let port = free_port();
        let dir = scratch("redis-tls");
        let child = GroupChild::spawn(
            Command::new("redis-server")
                .args(["--port", "0", "--tls-port", &port.to_string()])
                .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .args(["--tls-cert-file", &pki.path("server.crt")])
                .args(["--tls-key-file", &pki.path("server.key")])
                .args(["--tls-ca-cert-file", &pki.path("ca.crt")])
                .args([
                    "--tls-auth-clients",
                    if client_certs { "yes" } else { "no" },
                ])
                .arg("--dir")
                .arg(&dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )
        .unwrap_or_else(|e| {
            panic!("cannot start redis-server ({e}): install Debian's redis-server")
        });
        // Listening is enough: the TLS handshake is what the tests test.
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "redis-server (TLS) did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Self {
            port,
            _child: child,
            dir,
        }
    }

    pub fn url(&self) -> String {
        format!("rediss://127.0.0.1:{}", self.port)
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A plain `redis-server` with an ACL user `user` whose password is
/// `password` (the `default` user stays, for the harness's PING).
pub fn redis_with_user(user: &str, password: &str) -> RedisServer {
    let password = format!(">{password}");
    RedisServer::start_with(&["--user", user, "on", &password, "~*", "&*", "+@all"])
}

/// A primary, a replica and three sentinels monitoring them as
/// `mymaster`, on free ports; over TLS with [`start_tls`](Self::start_tls).
pub struct SentinelSetup {
    pub primary: RedisServer,
    pub replica: RedisServer,
    pub sentinels: Vec<(u16, GroupChild)>,
    /// The ports the sentinels name the primary and the replica by (their
    /// TLS ports over TLS).
    pub named: [u16; 2],
    /// The CA file, over TLS (for redis-cli).
    ca: Option<String>,
    dir: PathBuf,
}

pub const MASTER: &str = "mymaster";

impl SentinelSetup {
    pub fn start() -> Self {
        Self::launch(None)
    }

    /// Everything over TLS, with `pki`'s server certificate and CA: the
    /// primary and the replica (replicating over TLS) each keep a plain
    /// port for the harness's own checks, but the sentinels monitor, name
    /// and are reached on TLS ports only.
    pub fn start_tls(pki: &Pki) -> Self {
        Self::launch(Some(pki))
    }

    fn launch(pki: Option<&Pki>) -> Self {
        let tls_args = |port: u16| -> Vec<String> {
            pki.map(|pki| pki.server_args(port, "server", &["--tls-replication", "yes"]))
                .unwrap_or_default()
        };
        let server = |extra: Vec<String>| {
            let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
            RedisServer::start_with(&extra)
        };
        let tls_ports = pki.map(|_| [free_port(), free_port()]);
        let primary = server(tls_args(tls_ports.map_or(0, |p| p[0])));
        let named_primary = tls_ports.map_or(primary.port, |p| p[0]);
        let mut replica_args = vec![
            "--replicaof".to_owned(),
            "127.0.0.1".to_owned(),
            named_primary.to_string(),
        ];
        replica_args.extend(tls_args(tls_ports.map_or(0, |p| p[1])));
        let replica = server(replica_args);
        let named = [named_primary, tls_ports.map_or(replica.port, |p| p[1])];
        let dir = scratch("sentinel");
        let sentinels = (0..3)
            .map(|i| {
                let port = free_port();
                let conf = dir.join(format!("sentinel-{i}.conf"));
                let listen = match pki {
                    None => format!("port {port}\n"),
                    Some(pki) => format!(
                        "port 0\ntls-port {port}\ntls-cert-file {}\ntls-key-file {}\n\
                         tls-ca-cert-file {}\ntls-auth-clients no\ntls-replication yes\n",
                        pki.path("server.crt"),
                        pki.path("server.key"),
                        pki.path("ca.crt"),
                    ),
                };
                // Sentinel rewrites its configuration file: one each.
                std::fs::write(
                    &conf,
                    format!(
                        "{listen}bind 127.0.0.1\ndir {}\n\
                         sentinel monitor {MASTER} 127.0.0.1 {named_primary} 2\n\
                         sentinel down-after-milliseconds {MASTER} 1000\n\
                         sentinel failover-timeout {MASTER} 5000\n",
                        dir.display(),
                    ),
                )
                .unwrap();
                let child = GroupChild::spawn(
                    Command::new("redis-server")
                        .arg(&conf)
                        .arg("--sentinel")
                        .current_dir(&dir)
                        .stdout(Stdio::null())
                        .stderr(Stdio::null()),
                )
                .unwrap_or_else(|e| {
                    panic!("cannot start redis-server --sentinel ({e}): install Debian's redis-server / redis-sentinel")
                });
                (port, child)
            })
            .collect();
        let setup = Self {
            primary,
            replica,
            sentinels,
            named,
            ca: pki.map(|p| p.path("ca.crt")),
            dir,
        };
        setup.wait_until_settled();
        setup
    }

    /// `host:port` of each sentinel, as `redis.sentinels` takes them.
    pub fn addrs(&self) -> Vec<String> {
        self.sentinels
            .iter()
            .map(|(port, _)| format!("127.0.0.1:{port}"))
            .collect()
    }

    /// redis-cli against sentinel `i`, over TLS when the setup is.
    fn sentinel_cli(&self, i: usize, args: &[&str]) -> String {
        let port = self.sentinels[i].0;
        match &self.ca {
            None => cli(port, args),
            Some(ca) => {
                let mut all = vec!["--tls", "--cacert", ca];
                all.extend(args);
                cli(port, &all)
            }
        }
    }

    /// The primary's port as the first sentinel names it.
    pub fn primary_port(&self) -> Option<u16> {
        let out = self.sentinel_cli(0, &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER]);
        out.lines().nth(1).and_then(|p| p.trim().parse().ok())
    }

    /// Waits until every sentinel knows the replica (in sync) and the two
    /// other sentinels, so that a failover can happen.
    pub fn wait_until_settled(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        for (i, (port, _)) in self.sentinels.iter().enumerate() {
            loop {
                let master = self.sentinel_cli(i, &["SENTINEL", "MASTER", MASTER]);
                let field = |name: &str| {
                    let mut lines = master.lines();
                    lines.find(|l| l.trim() == name)?;
                    lines.next().map(|v| v.trim().to_owned())
                };
                let replicas = self.sentinel_cli(i, &["SENTINEL", "REPLICAS", MASTER]);
                if field("num-slaves").as_deref() == Some("1")
                    && field("num-other-sentinels").as_deref() == Some("2")
                    && replicas.contains("master-link-status\nok")
                {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "sentinel {port} never saw the replica and the other sentinels: {master}\n{replicas}"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    /// `SENTINEL FAILOVER`: the replica becomes the primary.
    pub fn failover(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let reply = self.sentinel_cli(0, &["SENTINEL", "FAILOVER", MASTER]);
            if reply == "OK" {
                return;
            }
            // NOGOODSLAVE while the sentinel still checks the replica.
            assert!(Instant::now() < deadline, "SENTINEL FAILOVER: {reply}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for SentinelSetup {
    fn drop(&mut self) {
        for (_, child) in &mut self.sentinels {
            child.kill_group();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
