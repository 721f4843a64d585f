//! The integration tests, one binary: the real `mews-outbox` binary or
//! library against a real SQLite file and the fake Mews over HTTP on
//! 127.0.0.1. One module per area; `support` holds what they share (the
//! daemon harness and the fake Mews).
//!
//! Run one area with `cargo test --test integration <module>::`, e.g.
//! `cargo test --test integration faults::`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly

mod support;

mod database_file;
mod delivery;
mod error_chains;
mod fake_mews_selftest;
mod faults;
mod fleet;
mod hostile;
mod housekeeping;
mod limits;
mod operations;
mod postgres_store;
mod producer_contract;
mod promises;
mod rejections;
mod secrets;
mod security;
mod settle;
mod sqlite_threads;
mod storage_faults;
mod thread_heads;
mod threads;
