//! What every Redis connection of a node is opened with besides the
//! address: ACL credentials, TLS certificates, and — with Sentinel — which
//! server is the primary right now.
//!
//! TLS is rustls (as reqwest's), with the Mozilla roots compiled in
//! (webpki-roots) when `redis.tls_ca_file` is not set: the same roots on
//! every host and in the distroless-style container image, which has no
//! system store. A managed Redis with a public CA (Azure, ElastiCache,
//! Memorystore's server CA aside, Redis Cloud) works with no file; a
//! private CA is given with `redis.tls_ca_file`.
//!
//! Sentinel: the primary is looked up on every connect, never cached. A
//! failover kills the old primary's client connections (Sentinel demotes it
//! with `CLIENT KILL TYPE normal` and `pubsub`), the subscriber reconnects
//! and asks the sentinels again, and the publisher follows at the next
//! subscriber epoch (see `mod.rs`), so both end on the new primary.
//! `async_master_for` also checks that the server it names answers `ROLE`
//! as a master, so a node never settles on a demoted one.

use redis::{Client, ConnectionAddr, ConnectionInfo, IntoConnectionInfo, ProtocolVersion};

use crate::config::RedisConfig;

/// The client certificates for redis-rs, when any file was configured
/// (otherwise redis-rs uses the built-in roots).
fn certificates(config: &RedisConfig) -> Option<redis::TlsCertificates> {
    let tls = &config.tls;
    if tls.ca.is_none() && tls.client.is_none() {
        return None;
    }
    Some(redis::TlsCertificates {
        client_tls: tls
            .client
            .as_ref()
            .map(|(cert, key)| redis::ClientTlsConfig {
                client_cert: cert.clone(),
                client_key: key.expose().as_bytes().to_vec(),
            }),
        root_cert: tls.ca.clone(),
    })
}

/// A client for one server at `info`, speaking `protocol`, with the
/// configured credentials (they win over the URL's) and certificates.
pub(super) fn client(
    info: ConnectionInfo,
    config: &RedisConfig,
    protocol: ProtocolVersion,
) -> redis::RedisResult<Client> {
    let mut settings = info.redis_settings().clone().set_protocol(protocol);
    if let Some(user) = &config.auth.username {
        settings = settings.set_username(user);
    }
    if let Some(password) = &config.auth.password {
        settings = settings.set_password(password.expose());
    }
    let mut info = info.set_redis_settings(settings);
    let tls = matches!(info.addr(), ConnectionAddr::TcpTls { .. });
    if let ConnectionAddr::TcpTls { host, port, .. } = info.addr().clone()
        && config.tls.insecure_skip_verify
    {
        info = info.set_addr(ConnectionAddr::TcpTls {
            host,
            port,
            insecure: true,
            tls_params: None,
        });
    }
    match certificates(config) {
        Some(certs) if tls => Client::build_with_tls(info, certs),
        _ => Client::open(info),
    }
}

/// The cluster client builder for `nodes` with the configured credentials
/// and certificates.
pub(super) fn cluster_builder(
    nodes: &[String],
    config: &RedisConfig,
) -> redis::cluster::ClusterClientBuilder {
    let mut builder = redis::cluster::ClusterClientBuilder::new(nodes.to_vec());
    if let Some(user) = &config.auth.username {
        builder = builder.username(user);
    }
    if let Some(password) = &config.auth.password {
        builder = builder.password(password.expose());
    }
    if let Some(certs) = certificates(config) {
        builder = builder.certs(certs);
    }
    if config.tls.insecure_skip_verify {
        builder = builder.tls(redis::TlsMode::Insecure);
    }
    builder
}

/// The sentinels of `redis.sentinels`, shared by every connection of the
/// node. redis-rs keeps a connection to each sentinel it asked, so the
/// lookups at every probe (see `conn::primary_moved`) reuse them; a tokio
/// mutex, since a lookup awaits, and lookups are rare and short.
///
/// With `redis.sentinel_tls` the sentinels and the servers they name are
/// reached over TLS, with the same certificates as a `rediss://` URL (the
/// CA, the client certificate, or none checked with
/// `redis.tls_insecure_skip_verify`); the credentials are the primary's
/// only (sentinels are asked without them, as Sentinel's own `requirepass`
/// is rare and separate).
#[derive(Clone)]
pub(super) struct Sentinels(std::sync::Arc<tokio::sync::Mutex<redis::sentinel::SentinelClient>>);

impl Sentinels {
    pub(super) fn new(config: &RedisConfig) -> redis::RedisResult<Self> {
        use redis::sentinel::{SentinelClientBuilder, SentinelServerType};
        let tls = config.sentinel_tls;
        let addrs = config
            .sentinels
            .iter()
            .map(|s| {
                let addr = format!("redis://{s}")
                    .into_connection_info()?
                    .addr()
                    .clone();
                Ok(match addr {
                    ConnectionAddr::Tcp(host, port) if tls => ConnectionAddr::TcpTls {
                        host,
                        port,
                        insecure: config.tls.insecure_skip_verify,
                        tls_params: None,
                    },
                    addr => addr,
                })
            })
            .collect::<redis::RedisResult<Vec<_>>>()?;
        let mut builder =
            SentinelClientBuilder::new(addrs, &config.sentinel_master, SentinelServerType::Master)?;
        if let Some(user) = &config.auth.username {
            builder = builder.set_client_to_redis_username(user);
        }
        if let Some(password) = &config.auth.password {
            builder = builder.set_client_to_redis_password(password.expose());
        }
        if tls {
            let mode = if config.tls.insecure_skip_verify {
                redis::TlsMode::Insecure
            } else {
                redis::TlsMode::Secure
            };
            builder = builder
                .set_client_to_redis_tls_mode(mode)
                .set_client_to_sentinel_tls_mode(mode);
            if let Some(certs) = certificates(config) {
                builder = builder
                    .set_client_to_redis_certificates(certs.clone())
                    .set_client_to_sentinel_certificates(certs);
            }
        }
        Ok(Self(std::sync::Arc::new(tokio::sync::Mutex::new(
            builder.build()?,
        ))))
    }

    /// The current primary as the sentinels name it, checked to answer
    /// `ROLE` as a master (with the configured credentials, over TLS with
    /// `redis.sentinel_tls`).
    pub(super) async fn primary(&self) -> redis::RedisResult<ConnectionInfo> {
        let primary = self.0.lock().await.async_get_client().await?;
        Ok(primary.get_connection_info().clone())
    }
}
