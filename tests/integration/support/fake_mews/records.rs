//! What the fake keeps for assertions: the messages it stored
//! ([`StoredMessage`]) and the requests it answered ([`RequestRecord`]).

use std::time::Instant;

use axum::http::HeaderMap;
use serde_json::Value;
use uuid::Uuid;

use super::Fault;

/// A message the fake stored (what Mews would have created).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredMessage {
    /// `Id` assigned by the fake (v4).
    pub id: Uuid,
    pub message_thread_id: Uuid,
    pub text: String,
    /// `YYYY-MM-DDTHH:MM:SSZ`, second precision like Mews.
    pub created_utc: String,
    /// `AccessToken` of the request that created it.
    pub access_token: String,
    /// `Identifier` sent with it (Mews does not store it; the fake keeps it
    /// for assertions only and never returns it from `getAll`).
    pub identifier: Option<String>,
}

/// A message thread the fake knows (created by `messageThreads/add` or
/// registered with [`FakeMews::register_threads`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredThread {
    pub id: Uuid,
    /// `AccessToken` it was created with: only that token may add to it.
    pub access_token: String,
    pub original_sender: String,
    pub subject: String,
    /// `YYYY-MM-DDTHH:MM:SSZ`, second precision like Mews.
    pub created_utc: String,
}

/// One request received by the fake.
#[derive(Clone, Debug)]
pub struct RequestRecord {
    pub arrived: Instant,
    /// URI path, e.g. [`ADD_PATH`] or [`GET_ALL_PATH`].
    pub path: String,
    /// Empty when absent or not a string (same for the other token fields).
    pub access_token: String,
    pub client_token: String,
    pub client: String,
    /// Length of `Messages` if it is an array, else 0.
    pub message_count: usize,
    /// `Identifier` of each `Messages` item (`None` when absent, null or not
    /// a string).
    pub identifiers: Vec<Option<String>>,
    /// HTTP status answered; `0` when the connection was dropped without a
    /// response.
    pub status: u16,
    /// The scripted fault this request consumed, if any.
    pub fault: Option<Fault>,
    /// The raw request JSON, or `Null` if unparsable.
    pub body: Value,
    /// Size of the request body as received, in bytes (0 when rejected).
    pub body_bytes: usize,
    /// Value of the `Request-Id` header sent back (also for dropped ones).
    pub request_id: String,
    /// HTTP method.
    pub method: String,
    /// Ids of the messages this request stored, in request order (empty when
    /// nothing was stored).
    pub stored_ids: Vec<Uuid>,
    /// The `Retry-After` header answered, if any.
    pub retry_after: Option<String>,
    /// It arrived before the end of the latest `Retry-After` the fake had
    /// sent for its `AccessToken` (on any endpoint).
    pub early: bool,
    /// The request's headers as received (`Content-Type`, `User-Agent`, ...).
    /// The fake reads tokens and everything else from the body, never from
    /// a header.
    pub headers: HeaderMap,
}

impl RequestRecord {
    /// The value of header `name` (case-insensitive), if present and text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// A validated `Messages` item.
pub(super) struct NewMessage {
    pub(super) thread: Uuid,
    pub(super) text: String,
    pub(super) identifier: Option<String>,
}
