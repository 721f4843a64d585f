//! mews-outbox: a transactional outbox daemon for the Mews Connector API.
//!
//! Producers insert rows into a SQLite `outbox` table; the daemon claims
//! them in batches, posts them to `messages/add`, and records what Mews
//! returned (or when to try again, or why it gave up).
//!
//! - [`config`]: typed settings, layering, validation, secrets
//! - [`store`]: the only place with SQL (claim, record, status)
//! - [`mews`]: the API client and what each response means
//! - [`retry`]: the retry schedule and `Retry-After`, as pure functions
//! - [`worker`]: one account's delivery loop (claim → send → record)
//! - [`daemon`]: `run`: the database lock, the loops, shutdown
//! - [`status`]: the queue at a glance
//! - [`secrets`]: token files, systemd credentials, redaction
//! - [`telemetry`]: log formats and levels
//! - [`cli`]: the command line

pub mod cli;
pub mod config;
pub mod daemon;
pub mod mews;
pub mod retry;
pub mod secrets;
pub mod status;
pub mod store;
pub mod telemetry;
pub mod worker;
