//! A fake Mews Connector API server over real HTTP, for integration tests and
//! for running by hand (`cargo run --example fake_mews`).
//!
//! The module is self-contained: it depends only on external crates (axum,
//! tokio, serde_json, uuid, humantime, httpdate, fastrand), never on `mews_outbox`, so
//! tests exercise the daemon's HTTP client exactly as it talks to Mews.
//!
//! What it implements (the Mews facts it relies on: `docs/mews-api.md`):
//!
//! * `POST /api/connector/v1/messages/add`, validated like Mews does (`400`
//!   with `Invalid {Parameter}`, `401` on unknown tokens, at most 1000
//!   messages, duplicate `Identifier`s rejected), answering `200` with the
//!   added messages matched by `Identifier` and, by default, in a shuffled
//!   order (Mews does not document the order).
//! * `POST /api/connector/v1/messages/getAll`: newest first, paged by
//!   `Limitation.Cursor`, filtered by thread, `CreatedUtc` interval and the
//!   request's `AccessToken`.
//! * `POST /api/connector/v1/configuration/get`: a token check.
//! * `POST /api/connector/v1/messageThreads/add` and `messageThreads/getAll`:
//!   threads are kept per `AccessToken`, and (like Mews, by default,
//!   [`FakeOptions::enforce_thread_ownership`]) `messages/add` refuses the
//!   whole request with `403` when one of its messages goes to a thread that
//!   was not created with that token (through `messageThreads/add` or
//!   [`FakeMews::register_threads`]).
//! * Any other path: `404`; a known path with a method other than `POST`:
//!   `405`.
//!
//! Every response, whatever its status, carries a fresh `Request-Id` header
//! and a `Date` header from the fake's clock ([`FakeOptions::clock_offset`]),
//! and every error body is `{"Message": .., "RequestId": <same id>,
//! "Details": null}`.
//!
//! Misbehaviour is scripted with [`FakeMews::script`] (one [`Fault`] per
//! `messages/add` request), [`FakeMews::script_get_all`] (one per
//! `messages/getAll` request), [`FakeMews::script_configuration`],
//! [`FakeMews::script_threads_add`] and [`FakeMews::script_threads_get_all`]
//! (one per request of those routes), with a per-`AccessToken` sliding-window rate
//! limit ([`FakeOptions::rate_limit`]), with a stretch of `429`s on every
//! endpoint ([`FakeMews::throttle_until`]) and with a "poison" predicate on
//! message texts ([`FakeOptions::poison`]).
//!
//! Every request on every endpoint with an `AccessToken` enters that
//! token's rate window (scripted faults and `401`s included; only a `429`
//! of the fake's own limiter does not), and the fake checks each one against
//! the latest `Retry-After` it sent for that token
//! ([`FakeMews::retry_after_violations`]).
//!
//! Dropping a connection without a response ([`Fault::DropBeforeStore`],
//! [`Fault::DropAfterStore`]) is done by keeping a duplicate handle of every
//! accepted socket and calling `shutdown(Both)` on it from the request
//! handler: the client sees the connection closed before any response byte
//! (reqwest: "connection closed before message completed"), never a hang.
//!
//! Each request is handled in a task of its own, which a client that gives
//! up or dies cannot cancel: like Mews, the fake finishes (and stores) what
//! it started even when nobody waits for the answer any more.
//!
//! The tests reach it as `crate::support::fake_mews`; `examples/fake_mews.rs`
//! includes this same directory with `#[path]` (one module tree, compiled
//! into each of the two targets, no extra crate to build).

mod connections;
mod faults;
mod options;
mod records;
mod reply;
mod routes;
mod server;
mod state;

use std::time::Duration;

pub use faults::{Fault, RetryAfter};
pub use options::FakeOptions;
pub use records::{RequestRecord, StoredMessage, StoredThread};
pub use server::FakeMews;

/// Path of the operation the daemon calls.
pub const ADD_PATH: &str = "/api/connector/v1/messages/add";
/// Path of the read-back operation.
pub const GET_ALL_PATH: &str = "/api/connector/v1/messages/getAll";
/// Path of the thread creation.
pub const THREADS_ADD_PATH: &str = "/api/connector/v1/messageThreads/add";
/// Path of the thread read-back.
pub const THREADS_GET_ALL_PATH: &str = "/api/connector/v1/messageThreads/getAll";
/// Longest `CreatedUtc` interval `messageThreads/getAll` accepts ("three
/// months", `x-max-interval-in-months: 3`).
pub const MAX_THREADS_GET_ALL_INTERVAL: Duration = Duration::from_secs(92 * 24 * 3600);
/// Path of the harmless token check.
pub const CONFIGURATION_PATH: &str = "/api/connector/v1/configuration/get";
/// Maximum number of items in `Messages` (add) and `MessageThreadIds` /
/// `Limitation.Count` (getAll).
pub const MAX_ITEMS: usize = 1000;
/// `Enterprise.Id` returned by `configuration/get`.
pub const FAKE_ENTERPRISE_ID: &str = "3fa85f64-5717-4562-b3fc-2c963f66afa6";
/// Longest `CreatedUtc` interval `messages/getAll` accepts ("one month").
pub const MAX_GET_ALL_INTERVAL: Duration = Duration::from_secs(31 * 24 * 3600);
/// Largest request body the fake reads (bigger ones get `413`).
pub const MAX_REQUEST_BODY: usize = 64 * 1024 * 1024;
