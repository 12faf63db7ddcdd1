//! wshub: a horizontally scalable WebSocket hub, drop-in compatible with
//! West Wind Web Connection's WebSocket support.
//!
//! # Layout
//!
//! Follow a message from a browser to its recipients:
//!
//! - [`http`]: the HTTP surface. The socket endpoint upgrades a request and
//!   starts a [`session`]; the broadcast endpoint takes a message from the
//!   application's backend; health, metrics and the embedded browser files.
//! - [`session`]: one socket: reads client frames, writes queued frames,
//!   pings, and closes with one [`outcome::CloseReason`].
//! - [`message`]: the message JSON, parsed (borrowing) and encoded once.
//! - [`backend`]: with `backend.url`, non-`broadcast` client messages (and
//!   connect/disconnect events) go to the application over HTTP.
//! - [`route`]: recipients resolved into topics, and the exactly-once rule.
//! - [`node`]: this process: ties the hub to the bus, connects sockets,
//!   publishes messages, drains on shutdown.
//! - [`bus`]: the interface between this node and every other one, with an
//!   single-node implementation ([`bus::SingleNodeBus`]) and Redis.
//! - [`hub`]: this node's sockets, indexed by group and user; the node and
//!   the bus deliver into it. [`conn`]: one socket's handle and its
//!   [`conn::Closer`]; [`outbox`]: its outbound queue, bounded in bytes.
//! - [`envelope`]: a message on its way: route plus encoded frame.
//! - [`server`]: binds the listener and runs the node until shutdown.
//! - [`auth`]: tokens, origins, API keys; [`admission`]: capacity and the
//!   per-address limit; [`rate_limit`]: each socket's message rate.
//! - [`config`], [`logging`], [`metrics`]: the operator's side.
//!
//! `main.rs` only loads configuration, starts logging and calls [`run`], so
//! tests start real servers on port 0 through [`server::Server`].

#![forbid(unsafe_code)]

pub(crate) mod admission;
pub(crate) mod auth;
pub(crate) mod backend;
pub mod bus;
// The configuration's keys are documented once, in `wshub.example.toml`
// (which a test keeps equal to the defaults) and docs/deploying.md; its
// structs mirror them field by field. Doc comments on every field are a
// follow-up once the deployment branch's config changes are merged.
#[allow(missing_docs)]
pub mod config;
pub(crate) mod conn;
pub mod envelope;
pub mod http;
pub(crate) mod hub;
pub mod logging;
pub mod message;
pub mod metrics;
pub mod node;
pub(crate) mod outbox;
pub mod outcome;
pub(crate) mod rate_limit;
pub mod route;
pub mod server;
pub(crate) mod session;
pub mod shutdown;

pub use config::Config;
pub use server::{Server, run};
