//! wshub: a horizontally scalable WebSocket hub, drop-in compatible with
//! West Wind Web Connection's WebSocket support.
//!
//! # Layout
//!
//! One concept per file, named by its noun. A message travels in one
//! straight line, and no module calls back up it:
//!
//! ```text
//! socket → session → node ─┬─→ hub → outbox → session → socket   (this node)
//!                          └─→ bus ══ Redis ══→ bus → hub → …     (every other node)
//! ```
//!
//! - `http` ([`http`]): the HTTP surface and its own state (token
//!   verifier, auth policy, limits). The socket endpoint admits and
//!   upgrades a request and starts a session; the broadcast endpoint takes
//!   a message from the application's backend; the server API (`/api/*`,
//!   `src/http/api.rs`: `GET /api/nodes`, protected like the broadcast
//!   endpoint, JSON errors); health, metrics and the embedded browser
//!   files. Refusals become responses, counted, in one place.
//! - `session` (`src/session.rs`, internal): one socket: reads client
//!   frames, writes queued frames, pings, and closes with one
//!   [`outcome::CloseReason`].
//! - [`message`]: the message JSON, parsed (borrowing) and encoded once.
//! - [`node`]: this process: admits sockets, delivers every message to its
//!   own sockets through the hub and hands it to the bus for the others,
//!   forwards to the backend, and owns shutdown ([`node::Node::shutdown`]);
//!   `src/node/cluster.rs`: what the server API asks of the cluster
//!   (publish with idempotency keys, disconnect and ban, topics, history).
//! - [`route`]: recipients resolved into topics, and the exactly-once rule.
//! - [`envelope`]: a message on its way: route plus encoded frame (and,
//!   with history on, its stamp: positions per topic).
//! - [`position`]: where a message stands in each topic's history, and
//!   its stamp; [`history`]: the [`history::History`] interface lossless
//!   resume reads from (kept by the Redis bus).
//! - [`resume`]: the socket's side of lossless resume: the `resume`
//!   request, the decision at connect (replay or not, the welcome), the
//!   floors a session de-duplicates by and hands over on shutdown, the
//!   gap notice.
//! - [`bus`]: carries envelopes to every *other* node
//!   ([`bus::SingleNodeBus`] when there are none, [`bus::RedisBus`]), and
//!   hands what arrives to this node's hub. [`bus::registry`]: the nodes
//!   sharing the bus, with leases (this node alone without Redis), and the
//!   version gate that decides which payload version the bus writes.
//!   [`bus::control`]: the control plane the server API uses (disconnect
//!   orders on the target's own channel, bans, idempotency keys, topics).
//! - [`presence`]: cluster presence, the node's side: what it writes about
//!   the sockets it holds (first and last per group and user, never while
//!   idle), the opt-in `presence=1` protocol (`wshub.presence`,
//!   `wshub.join`, `wshub.leave`), the backend's online/offline/join/leave
//!   events, and the per-user limit; [`bus::presence`] is the store's side
//!   (kept by the Redis bus, on the registry's leases).
//! - `hub` (internal): this node's sockets, indexed by group and user;
//!   `conn`: one socket's handle and the `Closer` that ends its session
//!   once; `outbox`: its outbound queue, bounded in bytes; `wire`: its
//!   socket's write side, which a delivering task writes an idle socket's
//!   frame to itself; `lane`: the delivery lanes, one task per worker,
//!   that write a big fanout's queued frames without waking the sessions.
//! - `backend` (internal): with `backend.url`, non-`broadcast` client
//!   messages (and connect/disconnect events) go to the application over
//!   HTTP, in order per socket.
//! - `auth`, `admission`, `rate_limit`, `fragments` (internal): tokens,
//!   origins and API keys; capacity and the per-address limit; each
//!   socket's message rate; the frames of a message being read.
//! - `refusal_log` (internal): which refusals `http` and `server` (what the
//!   HTTP library refused) log, one line per peer and reason per minute, in a
//!   bounded map.
//! - [`outcome`]: the vocabulary of outcomes (close, drop and refusal
//!   reasons, backend results), depending on nothing else here.
//! - [`shutdown`]: the owner of every task (token + tracker).
//! - [`server`]: binds the listener and runs the node until shutdown.
//! - [`config`], [`logging`], [`metrics`]: the operator's side;
//!   [`cli`]: the commands besides running a node (`config check`,
//!   `config defaults`, `token`).
//!
//! The modules form no import cycle: `outcome`, `message`, `shutdown`,
//! `rate_limit`, `fragments`, `refusal_log` and `admission` import nothing of the crate, and every
//! arrow of the path above points one way.
//!
//! `main.rs` only loads configuration, starts logging and calls [`run`], so
//! tests start real servers on port 0 through [`server::Server`].

#![forbid(unsafe_code)]

pub(crate) mod admission;
pub(crate) mod auth;
pub(crate) mod backend;
pub mod bus;
pub mod cli;
// The configuration's keys are documented once, in `wshub.example.toml`
// (which a test keeps equal to the defaults) and docs/deploying.md; its
// structs mirror them field by field. Doc comments on every field are a
// follow-up once the deployment branch's config changes are merged.
#[allow(missing_docs)]
pub mod config;
pub(crate) mod conn;
pub mod envelope;
pub(crate) mod fragments;
pub mod history;
pub mod http;
pub(crate) mod hub;
pub(crate) mod lane;
pub mod logging;
pub mod message;
pub mod metrics;
pub mod node;
pub(crate) mod outbox;
pub mod outcome;
pub mod position;
pub mod presence;
pub(crate) mod rate_limit;
pub(crate) mod refusal_log;
pub mod resume;
pub mod route;
pub mod server;
pub(crate) mod session;
pub mod shutdown;
pub(crate) mod wire;

pub use config::Config;
pub use server::{Server, run};
