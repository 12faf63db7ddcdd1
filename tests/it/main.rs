//! The integration tests, as one binary: the shared helpers in [`common`]
//! compile once, not once per test file, and one link step serves every
//! test. Each module is what used to be its own `tests/*.rs` file; run one
//! with `cargo test --test it hub::` (a module path filter).

// Test code: its items are `pub` for the sibling modules, not an API.
#![allow(unreachable_pub, missing_docs)]

mod common;

mod api;
mod backend;
mod backend_signing;
mod bus_conformance;
mod chaos;
mod chat_backend;
mod cli;
mod cluster;
mod containers;
mod deploy;
mod doc_paths;
mod full_node;
mod fuzz_corpus;
mod history_bus;
mod history_cluster;
mod hub;
mod listener;
mod manifests;
mod module_cycles;
mod pages;
mod presence;
mod redis_acl;
mod redis_sentinel;
mod redis_tls;
mod refusals;
mod registry;
mod resume;
mod routing_props;
mod security;
