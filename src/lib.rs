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
//! - [`limiter`]: the per-account rate limit (a sliding-window log)
//! - [`adapt`]: per-account reactions over many requests: batch size,
//!   circuit breaker, systemic rejection
//! - [`reconcile`]: matching ambiguous rows against what Mews has
//! - [`request_size`]: request bytes, and packing rows under the byte bound
//! - [`worker`]: one account's delivery loop (claim → read back → send →
//!   record) and the pure table of what each reply means
//! - [`daemon`]: `run` on an opened store: the accounts, the loops,
//!   reload, shutdown
//! - [`error_chain`]: an error and its causes, each once, for logs
//! - [`signals`]: SIGTERM/SIGINT stop, SIGHUP reloads
//! - [`notify`]: systemd notifications and the watchdog's view of liveness
//! - [`heartbeat`]: the periodic queue line, alerts, `STATUS=`
//! - [`housekeeping`]: pruning delivered rows, giving space back
//! - [`online_check`]: `check-config --online` (tokens against Mews)
//! - [`status`]: the queue at a glance
//! - [`dead`]: the dead-letter report
//! - [`secrets`]: where each token comes from (inline, file, systemd
//!   credential, the demo's), keeping token files private, redaction
//! - [`telemetry`]: log formats and levels
//! - [`cli`]: the command line

pub mod adapt;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod dead;
pub mod error_chain;
pub mod heartbeat;
pub mod housekeeping;
pub mod limiter;
pub mod mews;
pub mod notify;
pub mod online_check;
pub mod reconcile;
pub mod request_size;
pub mod retry;
pub mod secrets;
pub mod signals;
pub mod status;
pub mod store;
pub mod telemetry;
pub mod worker;
