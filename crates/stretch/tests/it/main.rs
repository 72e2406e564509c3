//! Integration tests: the real `stretch` binary against real git repos, the real Docker
//! engine and a real registry process. One test binary, so one build serves them all.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod agent;
mod app;
mod apply;
mod bad_input;
mod build;
mod build_speed;
mod common;
mod deploy;
mod dev;
mod edge;
mod registry;
mod release_store;
mod secrets;
mod serve;
mod snapshots;
mod terminal;
mod tls;
