//! A fake Mews Connector API server over real HTTP, for integration tests and
//! for running by hand (`cargo run --example fake_mews`).
//!
//! The module is self-contained: it depends only on external crates (axum,
//! tokio, serde_json, uuid, humantime, httpdate, fastrand), never on `mews_outbox`, so
//! tests exercise the daemon's HTTP client exactly as it talks to Mews.
//!
//! What it implements (see `/work/shared/docs/MEWS-API.md`):
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
//! `messages/getAll` request), with a per-`AccessToken` sliding-window rate
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

use std::collections::{HashSet, VecDeque};
use std::fmt;
use std::io;
use std::net::{Shutdown, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::connect_info::{ConnectInfo, Connected};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::serve::{IncomingStream, Listener};
use serde_json::{Map, Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use uuid::Uuid;

/// Path of the operation the daemon calls.
pub const ADD_PATH: &str = "/api/connector/v1/messages/add";
/// Path of the read-back operation.
pub const GET_ALL_PATH: &str = "/api/connector/v1/messages/getAll";
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

/// Predicate on a message `Text`: `true` poisons the whole request.
pub type PoisonFn = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// Behaviour knobs of the fake. All of them can also be changed while the
/// server runs ([`FakeMews::update_options`], [`FakeMews::set_poison`], ...).
#[derive(Clone)]
pub struct FakeOptions {
    /// `None`: accept any non-empty tokens. `Some(pairs)`: only these
    /// `(ClientToken, AccessToken)` pairs are valid, anything else gets `401`.
    pub valid_tokens: Option<Vec<(String, String)>>,
    /// Render `Sender` as the plain string `"Application"` (older
    /// documentation) instead of `{"Discriminator":"Application","Value":null}`.
    pub sender_as_string: bool,
    /// Return the `Messages` array of a `messages/add` response in a random
    /// order. Default `true`: the order is not documented by Mews.
    pub shuffle_responses: bool,
    /// Sliding window per `AccessToken`: when `N` requests (`messages/add`
    /// and `messages/getAll`) were admitted within the window, the next one
    /// gets `429` with `Retry-After: <delta-seconds>` (ceiling of the time
    /// until the oldest admitted request leaves the window, at least 1), or
    /// the same time as an HTTP-date with [`FakeOptions::retry_after_as_date`].
    /// Every request on every endpoint counts, whatever it is answered
    /// (scripted faults, `401`, `400`); only the limiter's own `429`s do not
    /// enter the window.
    pub rate_limit: Option<(usize, Duration)>,
    /// The limiter's `Retry-After` as an HTTP-date (made when the response
    /// is) instead of delta-seconds.
    pub retry_after_as_date: bool,
    /// If any message `Text` of a `messages/add` request matches, the whole
    /// request gets `403 {"Message":"poisoned: <text prefix>", ..}` and
    /// nothing is stored.
    pub poison: Option<PoisonFn>,
    /// Print one line per request and per stored message to stdout.
    pub verbose: bool,
    /// `messages/getAll` answers the last page's `Cursor` too (the Id of its
    /// oldest message, as for every other page) instead of `null`, so a
    /// client must stop on a page that is not full, not on a null cursor.
    pub cursor_on_last_page: bool,
    /// How far the fake's clock is from the real one, in milliseconds
    /// (positive: ahead), as for a Mews whose clock differs from ours. It
    /// shifts `CreatedUtc`, the `getAll` filter and the `Date` header alike.
    pub clock_offset_ms: i64,
}

impl Default for FakeOptions {
    fn default() -> Self {
        FakeOptions {
            valid_tokens: None,
            sender_as_string: false,
            shuffle_responses: true,
            rate_limit: None,
            retry_after_as_date: false,
            poison: None,
            verbose: false,
            cursor_on_last_page: false,
            clock_offset_ms: 0,
        }
    }
}

impl fmt::Debug for FakeOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeOptions")
            .field("valid_tokens", &self.valid_tokens)
            .field("sender_as_string", &self.sender_as_string)
            .field("shuffle_responses", &self.shuffle_responses)
            .field("rate_limit", &self.rate_limit)
            .field("retry_after_as_date", &self.retry_after_as_date)
            .field("poison", &self.poison.as_ref().map(|_| "<fn>"))
            .field("verbose", &self.verbose)
            .field("cursor_on_last_page", &self.cursor_on_last_page)
            .field("clock_offset_ms", &self.clock_offset_ms)
            .finish()
    }
}

/// One scripted misbehaviour, consumed by exactly one `messages/add` request
/// (see [`FakeMews::script`]).
///
/// `Status`, `StatusRetryAt`, `Raw`, `Redirect` and `DropBeforeStore` apply
/// as soon as the request arrives, whatever its body (no validation, nothing
/// stored; the request still counts in its token's rate window, and a
/// request the window refuses gets the limiter's `429` and leaves the fault
/// queued).
/// `DelayThenNormal` sleeps first and then behaves normally. The remaining
/// faults need a request that passes validation: they apply after the
/// messages are stored; an invalid request consumes the fault and gets its
/// normal error.
///
/// Status codes outside `100..=999` are answered as `500`.
#[derive(Clone, PartialEq, Eq)]
pub enum Fault {
    /// Respond with this status and an error body carrying `message`; store
    /// nothing. `retry_after` sets the `Retry-After` header verbatim.
    Status {
        code: u16,
        retry_after: Option<String>,
        message: String,
    },
    /// Close the connection without a response; nothing is stored.
    DropBeforeStore,
    /// Store the messages, then close the connection without a response.
    DropAfterStore,
    /// Sleep (server side) and then behave normally (store + `200`).
    DelayThenNormal(Duration),
    /// Store the messages but answer with this status (an ambiguous outcome).
    StoreThenStatus(u16),
    /// Store the messages, then sleep (server side) before answering
    /// normally: a client that gives up or dies meanwhile never learns of it.
    StoreThenDelay(Duration),
    /// Validate, store the messages `store_after` after the request arrived,
    /// then answer normally `answer_after` after it arrived (`None`: never;
    /// the connection stays open until the client goes). A Mews still
    /// working on a request that the client has given up on, or died during.
    SlowStore {
        store_after: Duration,
        answer_after: Option<Duration>,
    },
    /// Store all messages but leave the last `N` (in request order) out of
    /// the `200` response.
    OmitIdentifiers(usize),
    /// Store all messages and add one response item whose `Identifier` was
    /// never sent.
    ExtraIdentifier,
    /// Store nothing and send exactly this status, `Content-Type` and body
    /// (plus the `Request-Id` header).
    Raw {
        status: u16,
        content_type: String,
        body: Vec<u8>,
    },
    /// Store nothing and answer `code` (a 3xx) with this `Location` header,
    /// as a misconfigured proxy or a moved address would. Also on
    /// `messages/getAll` and `configuration/get`.
    Redirect { code: u16, location: String },
    /// Store the messages, send the `200` status line, headers (with the
    /// full `Content-Length`) and the first half of the body, then send
    /// nothing more for this long before closing the connection: a body
    /// that stalls mid-way. The request is recorded (status `200`) when the
    /// stall ends; [`FakeMews::accepted`] shows the messages at once.
    StoreThenStallBody(Duration),
    /// Like `Status`, with a `Retry-After` written when the response is
    /// made (an HTTP-date made when the daemon is started is long past by
    /// the time it is sent).
    StatusRetryAt { code: u16, retry_after: RetryAfter },
}

/// A `Retry-After` header the fake writes at response time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RetryAfter {
    /// delta-seconds: the duration rounded up to whole seconds.
    Seconds(Duration),
    /// An HTTP-date this far ahead of the moment of the response (rounded
    /// up to the next whole second, the format's resolution).
    DateIn(Duration),
    /// An HTTP-date this far before the moment of the response.
    DateAgo(Duration),
    /// Exactly this text (garbage, say).
    Verbatim(String),
}

impl RetryAfter {
    /// The header value, made now.
    pub fn render(&self) -> String {
        let now = SystemTime::now();
        match self {
            RetryAfter::Seconds(d) => ceil_secs(*d).to_string(),
            RetryAfter::DateIn(d) => {
                let at = now + *d;
                let secs = at.duration_since(UNIX_EPOCH).map_or(0, ceil_secs);
                httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs(secs))
            }
            RetryAfter::DateAgo(d) => httpdate::fmt_http_date(now - *d),
            RetryAfter::Verbatim(v) => v.clone(),
        }
    }
}

/// When a `Retry-After` value sent at `sent` (with the wall clock at
/// `sent_wall`) ends; `None` for a value that is neither form.
fn retry_after_end(value: &str, sent: Instant, sent_wall: SystemTime) -> Option<Instant> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // Longer than a year is as good as forever here (and cannot overflow).
        let secs = value
            .parse::<u64>()
            .unwrap_or(u64::MAX)
            .min(365 * 24 * 3600);
        return Some(sent + Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(sent + at.duration_since(sent_wall).unwrap_or_default())
}

impl Fault {
    /// `Fault::Status` with an error body and no `Retry-After`.
    pub fn status(code: u16) -> Fault {
        Fault::Status {
            code,
            retry_after: None,
            message: format!("Scripted failure {code}"),
        }
    }

    /// `Fault::Status` with a `Retry-After` header (sent verbatim).
    pub fn status_retry_after(code: u16, retry_after: impl Into<String>) -> Fault {
        Fault::Status {
            code,
            retry_after: Some(retry_after.into()),
            message: format!("Scripted failure {code}"),
        }
    }

    /// `Fault::StatusRetryAt`: `code` with a `Retry-After` made at response time.
    pub fn status_retry_at(code: u16, retry_after: RetryAfter) -> Fault {
        Fault::StatusRetryAt { code, retry_after }
    }

    /// `Fault::Raw` with a string body.
    pub fn raw(status: u16, content_type: impl Into<String>, body: impl Into<Vec<u8>>) -> Fault {
        Fault::Raw {
            status,
            content_type: content_type.into(),
            body: body.into(),
        }
    }
}

/// Hand-written so that a 10 MB `Raw` body prints as a short preview.
impl fmt::Debug for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::Status {
                code,
                retry_after,
                message,
            } => f
                .debug_struct("Status")
                .field("code", code)
                .field("retry_after", retry_after)
                .field("message", message)
                .finish(),
            Fault::StatusRetryAt { code, retry_after } => f
                .debug_struct("StatusRetryAt")
                .field("code", code)
                .field("retry_after", retry_after)
                .finish(),
            Fault::DropBeforeStore => f.write_str("DropBeforeStore"),
            Fault::DropAfterStore => f.write_str("DropAfterStore"),
            Fault::DelayThenNormal(d) => f.debug_tuple("DelayThenNormal").field(d).finish(),
            Fault::StoreThenStatus(code) => f.debug_tuple("StoreThenStatus").field(code).finish(),
            Fault::StoreThenDelay(d) => f.debug_tuple("StoreThenDelay").field(d).finish(),
            Fault::SlowStore {
                store_after,
                answer_after,
            } => f
                .debug_struct("SlowStore")
                .field("store_after", store_after)
                .field("answer_after", answer_after)
                .finish(),
            Fault::OmitIdentifiers(n) => f.debug_tuple("OmitIdentifiers").field(n).finish(),
            Fault::ExtraIdentifier => f.write_str("ExtraIdentifier"),
            Fault::Redirect { code, location } => f
                .debug_struct("Redirect")
                .field("code", code)
                .field("location", location)
                .finish(),
            Fault::StoreThenStallBody(d) => f.debug_tuple("StoreThenStallBody").field(d).finish(),
            Fault::Raw {
                status,
                content_type,
                body,
            } => {
                const PREVIEW: usize = 64;
                let head = String::from_utf8_lossy(&body[..body.len().min(PREVIEW)]);
                let ellipsis = if body.len() > PREVIEW { "..." } else { "" };
                f.debug_struct("Raw")
                    .field("status", status)
                    .field("content_type", content_type)
                    .field(
                        "body",
                        &format_args!("<{} bytes: {head:?}{ellipsis}>", body.len()),
                    )
                    .finish()
            }
        }
    }
}

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
}

/// A running fake Mews server. The server task is aborted and all its
/// connections are closed on drop (use [`FakeMews::stop`] to also wait until
/// the port is free again).
pub struct FakeMews {
    /// `http://127.0.0.1:PORT`, no trailing slash.
    pub base_url: String,
    /// Address the server listens on.
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: Option<JoinHandle<()>>,
}

impl fmt::Debug for FakeMews {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeMews")
            .field("base_url", &self.base_url)
            .finish_non_exhaustive()
    }
}

impl FakeMews {
    /// Starts a fake with default options on `127.0.0.1:0`.
    pub async fn start() -> FakeMews {
        Self::start_with(FakeOptions::default()).await
    }

    /// Starts a fake with `opts` on `127.0.0.1:0`. Panics if it cannot bind.
    pub async fn start_with(opts: FakeOptions) -> FakeMews {
        let addr = SocketAddr::from(([127, 0, 0, 1], 0));
        match Self::start_on(addr, opts).await {
            Ok(fake) => fake,
            Err(e) => panic!("FakeMews: cannot bind {addr}: {e}"),
        }
    }

    /// Starts a fake on `addr` (e.g. a fixed port for the example, or the
    /// port of a previously [stopped](FakeMews::stop) fake).
    pub async fn start_on(addr: SocketAddr, opts: FakeOptions) -> io::Result<FakeMews> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let (changed, _) = watch::channel(0u64);
        let shared = Arc::new(Shared {
            state: Mutex::new(ServerState {
                opts,
                faults: VecDeque::new(),
                get_all_faults: VecDeque::new(),
                configuration_faults: VecDeque::new(),
                stored: Vec::new(),
                requests: Vec::new(),
                add_arrivals: 0,
                windows: Default::default(),
                retry_after_ends: Default::default(),
                throttle: None,
            }),
            next_seq: AtomicU64::new(0),
            changed,
            connections: Mutex::new(Vec::new()),
        });
        let router = Router::new()
            .fallback(handle)
            .layer(DefaultBodyLimit::max(MAX_REQUEST_BODY))
            .with_state(Arc::clone(&shared));
        let listener = FakeListener {
            inner: listener,
            shared: Arc::clone(&shared),
        };
        let task = tokio::spawn(async move {
            let service = router.into_make_service_with_connect_info::<ConnHandle>();
            // Only returns on a fatal error; there is nobody to report it to.
            let _ = axum::serve(listener, service).await;
        });
        Ok(FakeMews {
            base_url: format!("http://{addr}"),
            addr,
            shared,
            task: Some(task),
        })
    }

    /// Stops the server, closes every connection and waits until the
    /// listening socket is closed, so the port can be bound again.
    pub async fn stop(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
        self.shared.close_connections();
    }

    /// Full URL of `path` (which starts with `/`).
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    /// Queues faults; each `messages/add` request pops one (if any) and
    /// applies it. When the queue is empty requests behave normally.
    pub fn script(&self, faults: impl IntoIterator<Item = Fault>) {
        self.shared.state().faults.extend(faults);
    }

    /// Queues faults for `messages/getAll` requests, one per request. Only
    /// `Status`, `Raw`, `DropBeforeStore` and `DelayThenNormal` mean
    /// something there; any other fault is consumed and ignored.
    pub fn script_get_all(&self, faults: impl IntoIterator<Item = Fault>) {
        self.shared.state().get_all_faults.extend(faults);
    }

    /// Queues faults for `configuration/get` requests, one per request. Only
    /// `Status` and `Redirect` mean something there.
    pub fn script_configuration(&self, faults: impl IntoIterator<Item = Fault>) {
        self.shared.state().configuration_faults.extend(faults);
    }

    /// Number of scripted faults not consumed yet.
    pub fn pending_faults(&self) -> usize {
        self.shared.state().faults.len()
    }

    /// Drops every scripted fault not consumed yet.
    pub fn clear_faults(&self) {
        self.shared.state().faults.clear();
    }

    /// Sets the poison predicate (see [`FakeOptions::poison`]).
    pub fn set_poison(&self, poison: impl Fn(&str) -> bool + Send + Sync + 'static) {
        self.shared.state().opts.poison = Some(Arc::new(poison));
    }

    /// Removes the poison predicate.
    pub fn clear_poison(&self) {
        self.shared.state().opts.poison = None;
    }

    /// Changes the rate limit (see [`FakeOptions::rate_limit`]); the request
    /// history of each token is kept.
    pub fn set_rate_limit(&self, rate_limit: Option<(usize, Duration)>) {
        self.shared.state().opts.rate_limit = rate_limit;
    }

    /// Changes any option while the server runs.
    pub fn update_options(&self, f: impl FnOnce(&mut FakeOptions)) {
        f(&mut self.shared.state().opts);
    }

    /// Until `until`, every request on every endpoint is answered `429`,
    /// with `retry_after` (made at response time) if given. Such requests
    /// count in the rate window like any other.
    pub fn throttle_until(&self, until: Instant, retry_after: Option<RetryAfter>) {
        self.shared.state().throttle = Some((until, retry_after));
    }

    /// Requests (any endpoint) that arrived before the end of the latest
    /// `Retry-After` the fake had sent for their `AccessToken`.
    pub fn retry_after_violations(&self) -> usize {
        self.shared
            .records(|_| true)
            .iter()
            .filter(|r| r.early)
            .count()
    }

    /// Stores a message as if someone (another program, a person in Mews)
    /// had added it `age` ago by the fake's clock, with this `AccessToken`;
    /// it is listed by `getAll` like any other. Returns it.
    pub fn seed_message(
        &self,
        access_token: &str,
        thread: Uuid,
        text: &str,
        age: Duration,
    ) -> StoredMessage {
        let created = whole_seconds(self.shared.now() - age);
        let msg = StoredMessage {
            id: Uuid::new_v4(),
            message_thread_id: thread,
            text: text.to_owned(),
            created_utc: humantime::format_rfc3339_seconds(created).to_string(),
            access_token: access_token.to_owned(),
            identifier: None,
        };
        self.shared.state().stored.push(StoredEntry {
            msg: msg.clone(),
            created,
        });
        self.shared.notify();
        msg
    }

    /// Every message stored, in storage order.
    pub fn accepted(&self) -> Vec<StoredMessage> {
        self.shared
            .state()
            .stored
            .iter()
            .map(|e| e.msg.clone())
            .collect()
    }

    /// Every `messages/add` and `messages/getAll` request, in arrival order
    /// (a request appears once it has been answered).
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.shared.records(is_messages_path)
    }

    /// Only the `messages/add` requests, in arrival order.
    pub fn add_requests(&self) -> Vec<RequestRecord> {
        self.shared.records(|p| p == ADD_PATH)
    }

    /// Every request of any path (including `configuration/get` and `404`s).
    pub fn all_requests(&self) -> Vec<RequestRecord> {
        self.shared.records(|_| true)
    }

    /// Waits until at least `n` messages are stored and returns all of them.
    /// Panics after `timeout` with how many arrived.
    pub async fn wait_for_accepted(&self, n: usize, timeout: Duration) -> Vec<StoredMessage> {
        if self
            .wait_until(timeout, |st| st.stored.len() >= n)
            .await
            .is_err()
        {
            let got = self.accepted();
            let texts: Vec<&str> = got.iter().take(20).map(|m| m.text.as_str()).collect();
            panic!(
                "FakeMews::wait_for_accepted: timed out after {timeout:?} waiting for {n} \
                 accepted messages; {} arrived (first texts: {texts:?}); {} messages/add \
                 requests seen",
                got.len(),
                self.add_requests().len(),
            );
        }
        self.accepted()
    }

    /// Waits until at least `n` entries are in [`FakeMews::requests`] and
    /// returns them. Panics after `timeout` with how many arrived.
    pub async fn wait_for_requests(&self, n: usize, timeout: Duration) -> Vec<RequestRecord> {
        let count = |st: &ServerState| {
            st.requests
                .iter()
                .filter(|(_, r)| is_messages_path(&r.path))
                .count()
        };
        if self.wait_until(timeout, |st| count(st) >= n).await.is_err() {
            let got = self.requests();
            let summary: Vec<(String, u16)> = got
                .iter()
                .take(20)
                .map(|r| (r.path.clone(), r.status))
                .collect();
            panic!(
                "FakeMews::wait_for_requests: timed out after {timeout:?} waiting for {n} \
                 requests; {} arrived (path, status): {summary:?}",
                got.len(),
            );
        }
        self.requests()
    }

    /// Waits until `n` `messages/add` requests have arrived, answered or not
    /// (a request shows in [`FakeMews::requests`] only once answered).
    /// Panics after `timeout`.
    pub async fn wait_for_add_arrivals(&self, n: usize, timeout: Duration) {
        if self
            .wait_until(timeout, |st| st.add_arrivals >= n)
            .await
            .is_err()
        {
            panic!(
                "FakeMews::wait_for_add_arrivals: {} of {n} messages/add requests arrived within {timeout:?}",
                self.shared.state().add_arrivals
            );
        }
    }

    /// Waits (on the change notification, no polling) until `cond` holds.
    async fn wait_until(
        &self,
        timeout: Duration,
        cond: impl Fn(&ServerState) -> bool,
    ) -> Result<(), ()> {
        let mut rx = self.shared.changed.subscribe();
        let wait = rx.wait_for(|_| cond(&self.shared.state()));
        match tokio::time::timeout(timeout, wait).await {
            Ok(Ok(_)) => Ok(()),
            // The sender lives in `self.shared`, so it cannot be closed here.
            Ok(Err(_)) | Err(_) => Err(()),
        }
    }
}

impl Drop for FakeMews {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        self.shared.close_connections();
    }
}

fn is_messages_path(path: &str) -> bool {
    path == ADD_PATH || path == GET_ALL_PATH
}

// ---------------------------------------------------------------------------
// Shared state

struct Shared {
    state: Mutex<ServerState>,
    /// Arrival sequence numbers, so records are kept in arrival order even
    /// though they are inserted when answered.
    next_seq: AtomicU64,
    /// Bumped after every stored message batch and every recorded request.
    changed: watch::Sender<u64>,
    /// Duplicate handles of the accepted sockets, for dropping connections.
    connections: Mutex<Vec<Arc<std::net::TcpStream>>>,
}

struct ServerState {
    opts: FakeOptions,
    faults: VecDeque<Fault>,
    get_all_faults: VecDeque<Fault>,
    configuration_faults: VecDeque<Fault>,
    stored: Vec<StoredEntry>,
    requests: Vec<(u64, RequestRecord)>,
    /// `messages/add` requests that have arrived, answered or not.
    add_arrivals: usize,
    /// Admission times per `AccessToken`, oldest first.
    windows: std::collections::HashMap<String, VecDeque<Instant>>,
    /// Per `AccessToken`: when the latest `Retry-After` sent to it ends.
    retry_after_ends: std::collections::HashMap<String, Instant>,
    /// Until then every request gets `429` with this `Retry-After`.
    throttle: Option<(Instant, Option<RetryAfter>)>,
}

struct StoredEntry {
    msg: StoredMessage,
    created: SystemTime,
}

impl Shared {
    /// Locks the state; a panic elsewhere while locked does not poison it for
    /// the rest of the test.
    fn state(&self) -> MutexGuard<'_, ServerState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn opts(&self) -> FakeOptions {
        self.state().opts.clone()
    }

    /// The fake's clock: the real one shifted by `clock_offset_ms`.
    fn now(&self) -> SystemTime {
        let offset = self.state().opts.clock_offset_ms;
        let delta = Duration::from_millis(offset.unsigned_abs());
        if offset >= 0 {
            SystemTime::now() + delta
        } else {
            SystemTime::now() - delta
        }
    }

    fn notify(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    fn records(&self, keep: impl Fn(&str) -> bool) -> Vec<RequestRecord> {
        self.state()
            .requests
            .iter()
            .filter(|(_, r)| keep(&r.path))
            .map(|(_, r)| r.clone())
            .collect()
    }

    fn record(&self, seq: u64, record: RequestRecord) {
        {
            let mut st = self.state();
            let at = st.requests.partition_point(|(s, _)| *s < seq);
            st.requests.insert(at, (seq, record));
        }
        self.notify();
    }

    fn register_connection(&self, socket: Arc<std::net::TcpStream>) {
        let mut conns = self
            .connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // Only our handle left: that connection has ended.
        conns.retain(|c| Arc::strong_count(c) > 1);
        conns.push(socket);
    }

    fn close_connections(&self) {
        let conns = std::mem::take(
            &mut *self
                .connections
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        for c in conns {
            let _ = c.shutdown(Shutdown::Both);
        }
    }

    /// Checks the tokens against `valid_tokens`.
    fn authorize(&self, env: &Envelope) -> Result<(), Reply> {
        match &self.state().opts.valid_tokens {
            Some(valid)
                if !valid
                    .iter()
                    .any(|(c, a)| *c == env.client_token && *a == env.access_token) =>
            {
                Err(Reply::error(
                    StatusCode::UNAUTHORIZED,
                    "Invalid access token",
                ))
            }
            _ => Ok(()),
        }
    }

    /// Sliding-window rate limit per `AccessToken`.
    fn admit(&self, access_token: &str) -> Result<(), Reply> {
        let mut st = self.state();
        let Some((limit, window)) = st.opts.rate_limit else {
            return Ok(());
        };
        let now = Instant::now();
        let admitted = st.windows.entry(access_token.to_owned()).or_default();
        while admitted
            .front()
            .is_some_and(|&t| now.saturating_duration_since(t) >= window)
        {
            admitted.pop_front();
        }
        if admitted.len() >= limit {
            let wait = admitted
                .front()
                .map_or(window, |&t| (t + window).saturating_duration_since(now));
            let wait = Duration::from_secs(ceil_secs(wait).max(1));
            let retry_after = if st.opts.retry_after_as_date {
                RetryAfter::DateIn(wait)
            } else {
                RetryAfter::Seconds(wait)
            };
            return Err(Reply::Error {
                status: StatusCode::TOO_MANY_REQUESTS,
                message: format!("Too many requests: more than {limit} requests within {window:?}"),
                retry_after: Some(retry_after.render()),
            });
        }
        admitted.push_back(now);
        Ok(())
    }

    /// Stores `messages` with fresh ids and the current second as
    /// `CreatedUtc`.
    fn store(&self, access_token: &str, messages: Vec<NewMessage>) -> Vec<StoredMessage> {
        let created = whole_seconds(self.now());
        let created_utc = humantime::format_rfc3339_seconds(created).to_string();
        let stored: Vec<StoredMessage> = messages
            .into_iter()
            .map(|m| StoredMessage {
                id: Uuid::new_v4(),
                message_thread_id: m.thread,
                text: m.text,
                created_utc: created_utc.clone(),
                access_token: access_token.to_owned(),
                identifier: m.identifier,
            })
            .collect();
        self.state()
            .stored
            .extend(stored.iter().map(|msg| StoredEntry {
                msg: msg.clone(),
                created,
            }));
        self.notify();
        stored
    }
}

/// `t` cut to the second, like Mews's `CreatedUtc`.
fn whole_seconds(t: SystemTime) -> SystemTime {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    UNIX_EPOCH + Duration::from_secs(secs)
}

fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

// ---------------------------------------------------------------------------
// Listener that keeps a handle on every socket, to drop connections

struct FakeListener {
    inner: TcpListener,
    shared: Arc<Shared>,
}

/// Per-connection information handed to the handler: the peer address and a
/// duplicate of the socket, used to close the connection without a response.
#[derive(Clone, Debug)]
struct ConnHandle {
    remote: SocketAddr,
    socket: Option<Arc<std::net::TcpStream>>,
}

impl ConnHandle {
    /// Shuts the connection down in both directions: the client reads EOF
    /// before any response byte.
    fn drop_connection(&self) {
        if let Some(socket) = &self.socket {
            let _ = socket.shutdown(Shutdown::Both);
        }
    }

    /// Writes bytes straight to the socket, bypassing hyper (which writes
    /// nothing until the handler returns).
    fn write_raw(&self, bytes: &[u8]) {
        use std::io::Write;
        if let Some(socket) = &self.socket {
            // A few hundred bytes into an idle socket's buffer: not blocking.
            let _ = (&**socket).write_all(bytes);
        }
    }
}

/// Splits a stream into the stream served by hyper and a duplicate handle of
/// the same socket.
fn with_duplicate(stream: TcpStream) -> io::Result<(TcpStream, std::net::TcpStream)> {
    let std_stream = stream.into_std()?;
    let duplicate = std_stream.try_clone()?;
    Ok((TcpStream::from_std(std_stream)?, duplicate))
}

impl Listener for FakeListener {
    type Io = TcpStream;
    type Addr = ConnHandle;

    async fn accept(&mut self) -> (TcpStream, ConnHandle) {
        loop {
            match self.inner.accept().await {
                Ok((stream, remote)) => {
                    let _ = stream.set_nodelay(true);
                    if let Ok((stream, duplicate)) = with_duplicate(stream) {
                        let socket = Arc::new(duplicate);
                        self.shared.register_connection(Arc::clone(&socket));
                        return (
                            stream,
                            ConnHandle {
                                remote,
                                socket: Some(socket),
                            },
                        );
                    }
                    // Could not duplicate: the stream is gone, accept again.
                }
                // E.g. too many open files: back off briefly, like axum does.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<ConnHandle> {
        Ok(ConnHandle {
            remote: self.inner.local_addr()?,
            socket: None,
        })
    }
}

impl Connected<IncomingStream<'_, FakeListener>> for ConnHandle {
    fn connect_info(stream: IncomingStream<'_, FakeListener>) -> Self {
        stream.remote_addr().clone()
    }
}

// ---------------------------------------------------------------------------
// Replies

/// What the handler decided to answer.
enum Reply {
    Json(StatusCode, Value),
    Error {
        status: StatusCode,
        message: String,
        retry_after: Option<String>,
    },
    Raw {
        status: StatusCode,
        content_type: String,
        body: Vec<u8>,
    },
    /// A 3xx with a `Location` header.
    Redirect {
        status: StatusCode,
        location: String,
    },
    /// A `200` whose body stalled and whose connection was then shut down
    /// (by the handler, through [`ConnHandle::write_raw`]).
    Stalled,
    /// The connection was shut down; whatever is returned is never received.
    Dropped,
}

impl Reply {
    fn error(status: StatusCode, message: impl Into<String>) -> Reply {
        Reply::Error {
            status,
            message: message.into(),
            retry_after: None,
        }
    }

    fn bad_request(message: impl Into<String>) -> Reply {
        Reply::error(StatusCode::BAD_REQUEST, message)
    }

    /// The `Retry-After` header this reply carries.
    fn retry_after(&self) -> Option<&str> {
        match self {
            Reply::Error { retry_after, .. } => retry_after.as_deref(),
            _ => None,
        }
    }

    /// Status recorded in [`RequestRecord::status`].
    fn status_code(&self) -> u16 {
        match self {
            Reply::Json(s, _)
            | Reply::Error { status: s, .. }
            | Reply::Raw { status: s, .. }
            | Reply::Redirect { status: s, .. } => s.as_u16(),
            Reply::Stalled => 200,
            Reply::Dropped => 0,
        }
    }

    fn into_response(self, request_id: &str, date: SystemTime) -> Response {
        let mut response = match self {
            Reply::Json(status, body) => (status, axum::Json(body)).into_response(),
            Reply::Error {
                status,
                message,
                retry_after,
            } => {
                let body = json!({"Message": message, "RequestId": request_id, "Details": null});
                let mut response = (status, axum::Json(body)).into_response();
                if let Some(v) = retry_after.and_then(|v| HeaderValue::from_str(&v).ok()) {
                    response.headers_mut().insert(header::RETRY_AFTER, v);
                }
                response
            }
            Reply::Raw {
                status,
                content_type,
                body,
            } => {
                let mut response = (status, body).into_response();
                response.headers_mut().remove(header::CONTENT_TYPE);
                if let Ok(v) = HeaderValue::from_str(&content_type)
                    && !content_type.is_empty()
                {
                    response.headers_mut().insert(header::CONTENT_TYPE, v);
                }
                response
            }
            Reply::Redirect { status, location } => {
                let mut response = status.into_response();
                if let Ok(v) = HeaderValue::from_str(&location) {
                    response.headers_mut().insert(header::LOCATION, v);
                }
                response
            }
            Reply::Stalled | Reply::Dropped => {
                let mut response = StatusCode::INTERNAL_SERVER_ERROR.into_response();
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
                response
            }
        };
        if let Ok(v) = HeaderValue::from_str(request_id) {
            response
                .headers_mut()
                .insert(HeaderName::from_static("request-id"), v);
        }
        // Set explicitly: hyper's own `Date` follows the real clock.
        if let Ok(v) = HeaderValue::from_str(&httpdate::fmt_http_date(date)) {
            response.headers_mut().insert(header::DATE, v);
        }
        response
    }
}

fn status_or_500(code: u16) -> StatusCode {
    StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

// ---------------------------------------------------------------------------
// Handler

/// The single entry point: hands the request to a task of its own, so that
/// a client that disconnects (hyper then drops this future) cannot stop the
/// fake half-way, before it stores what it would have stored.
async fn handle(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(conn): ConnectInfo<ConnHandle>,
    method: Method,
    uri: Uri,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let arrived = Instant::now();
    let task = tokio::spawn(handle_detached(shared, conn, method, uri, body, arrived));
    match task.await {
        Ok(response) => response,
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// Records the request, routes it, answers with `Request-Id` and `Date`.
async fn handle_detached(
    shared: Arc<Shared>,
    conn: ConnHandle,
    method: Method,
    uri: Uri,
    body: Result<Bytes, BytesRejection>,
    arrived: Instant,
) -> Response {
    let seq = shared.next_seq.fetch_add(1, Ordering::Relaxed);
    let request_id = Uuid::new_v4().to_string();
    let path = uri.path().to_owned();
    if path == ADD_PATH {
        shared.state().add_arrivals += 1;
        shared.notify();
    }
    let (json, body_error) = match &body {
        Ok(bytes) => (serde_json::from_slice::<Value>(bytes).ok(), None),
        Err(rejection) => (None, Some(rejection.to_string())),
    };
    let mut record = RequestRecord {
        arrived,
        path: path.clone(),
        access_token: String::new(),
        client_token: String::new(),
        client: String::new(),
        message_count: 0,
        identifiers: Vec::new(),
        status: 0,
        fault: None,
        body: Value::Null,
        body_bytes: body.as_ref().map_or(0, Bytes::len),
        request_id: request_id.clone(),
        method: method.to_string(),
        stored_ids: Vec::new(),
        retry_after: None,
        early: false,
    };
    let mut stored = Vec::new();
    if let Some(Value::Object(map)) = &json {
        let text = |key: &str| {
            map.get(key)
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned()
        };
        record.access_token = text("AccessToken");
        record.client_token = text("ClientToken");
        record.client = text("Client");
        if let Some(Value::Array(items)) = map.get("Messages") {
            record.message_count = items.len();
            record.identifiers = items
                .iter()
                .map(|m| {
                    m.get("Identifier")
                        .and_then(Value::as_str)
                        .map(str::to_owned)
                })
                .collect();
        }
    }

    let known = [ADD_PATH, GET_ALL_PATH, CONFIGURATION_PATH].contains(&path.as_str());
    let token = record.access_token.clone();
    if !token.is_empty() {
        record.early = shared
            .state()
            .retry_after_ends
            .get(&token)
            .is_some_and(|&end| arrived < end);
    }
    // Before any fault: a request counts in the window however it is
    // answered, as at Mews; a limiter that forgot failed requests must fail.
    let limited = if known && method == Method::POST && !token.is_empty() {
        shared.admit(&token).err()
    } else {
        None
    };
    let throttled = || {
        let st = shared.state();
        match &st.throttle {
            Some((until, retry_after)) if Instant::now() < *until => Some(Reply::Error {
                status: StatusCode::TOO_MANY_REQUESTS,
                message: "Too many requests (scripted stretch)".to_owned(),
                retry_after: retry_after.as_ref().map(RetryAfter::render),
            }),
            _ => None,
        }
    };
    let reply = if let Some(reply) = limited {
        reply
    } else if let Some(reply) = known.then(throttled).flatten() {
        reply
    } else if !known {
        Reply::error(StatusCode::NOT_FOUND, format!("Not found: {path}"))
    } else if method != Method::POST {
        Reply::error(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("Method {method} not allowed"),
        )
    } else if let Some(e) = body_error {
        Reply::error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("Request body rejected: {e}"),
        )
    } else if path == ADD_PATH {
        add(
            &shared,
            &conn,
            json.as_ref(),
            &mut record,
            &mut stored,
            arrived,
        )
        .await
    } else if path == GET_ALL_PATH {
        let fault = shared.state().get_all_faults.pop_front();
        record.fault.clone_from(&fault);
        match fault {
            Some(Fault::Status {
                code,
                retry_after,
                message,
            }) => Reply::Error {
                status: status_or_500(code),
                message,
                retry_after,
            },
            Some(Fault::Raw {
                status,
                content_type,
                body,
            }) => Reply::Raw {
                status: status_or_500(status),
                content_type,
                body,
            },
            Some(Fault::StatusRetryAt { code, retry_after }) => Reply::Error {
                status: status_or_500(code),
                message: format!("Scripted failure {code}"),
                retry_after: Some(retry_after.render()),
            },
            Some(Fault::DropBeforeStore) => {
                conn.drop_connection();
                Reply::Dropped
            }
            Some(Fault::Redirect { code, location }) => Reply::Redirect {
                status: status_or_500(code),
                location,
            },
            Some(Fault::DelayThenNormal(delay)) => {
                tokio::time::sleep(delay).await;
                get_all(&shared, json.as_ref())
            }
            _ => get_all(&shared, json.as_ref()),
        }
    } else {
        let fault = shared.state().configuration_faults.pop_front();
        record.fault.clone_from(&fault);
        match fault {
            Some(Fault::Status {
                code,
                retry_after,
                message,
            }) => Reply::Error {
                status: status_or_500(code),
                message,
                retry_after,
            },
            Some(Fault::Redirect { code, location }) => Reply::Redirect {
                status: status_or_500(code),
                location,
            },
            _ => configuration(&shared, json.as_ref()),
        }
    };

    record.status = reply.status_code();
    record.retry_after = reply.retry_after().map(str::to_owned);
    if let Some(end) = record
        .retry_after
        .as_deref()
        .and_then(|v| retry_after_end(v, Instant::now(), SystemTime::now()))
        && !token.is_empty()
    {
        shared.state().retry_after_ends.insert(token, end);
    }
    record.body = json.unwrap_or(Value::Null);
    if shared.opts().verbose {
        println!(
            "[fake-mews] {method} {path} from {} client={:?} access_token={:?} messages={} \
             fault={:?} -> {} request-id={request_id}",
            conn.remote,
            record.client,
            record.access_token,
            record.message_count,
            record.fault,
            match record.status {
                0 => "connection dropped".to_owned(),
                s => s.to_string(),
            },
        );
        for m in &stored {
            println!(
                "[fake-mews]   stored Id={} thread={} identifier={:?} text={:?}",
                m.id, m.message_thread_id, m.identifier, m.text
            );
        }
    }
    record.stored_ids = stored.iter().map(|m| m.id).collect();
    shared.record(seq, record);
    reply.into_response(&request_id, shared.now())
}

/// `ClientToken`, `AccessToken` and `Client` of a request.
struct Envelope<'a> {
    client_token: String,
    access_token: String,
    map: &'a Map<String, Value>,
}

/// Parses the common part of every request: a JSON object with non-empty
/// token strings.
fn envelope(json: Option<&Value>) -> Result<Envelope<'_>, Reply> {
    let Some(Value::Object(map)) = json else {
        return Err(Reply::bad_request("Invalid JSON"));
    };
    let field = |key: &str| match map.get(key) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        _ => Err(Reply::bad_request(format!("Invalid {key}"))),
    };
    let client_token = field("ClientToken")?;
    let access_token = field("AccessToken")?;
    field("Client")?;
    Ok(Envelope {
        client_token,
        access_token,
        map,
    })
}

/// A validated `Messages` item.
struct NewMessage {
    thread: Uuid,
    text: String,
    identifier: Option<String>,
}

fn parse_uuid(value: Option<&Value>) -> Option<Uuid> {
    value
        .and_then(Value::as_str)
        .and_then(|s| Uuid::parse_str(s).ok())
}

fn parse_messages(map: &Map<String, Value>) -> Result<Vec<NewMessage>, Reply> {
    let Some(Value::Array(items)) = map.get("Messages") else {
        return Err(Reply::bad_request("Invalid Messages"));
    };
    if items.is_empty() || items.len() > MAX_ITEMS {
        return Err(Reply::bad_request(format!(
            "Invalid Messages: expected 1 to {MAX_ITEMS} items, got {}",
            items.len()
        )));
    }
    let mut seen = HashSet::new();
    let mut messages = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let Value::Object(m) = item else {
            return Err(Reply::bad_request(format!("Invalid Messages[{i}]")));
        };
        let Some(thread) = parse_uuid(m.get("MessageThreadId")) else {
            return Err(Reply::bad_request(format!(
                "Invalid MessageThreadId (Messages[{i}])"
            )));
        };
        let text = match m.get("Text") {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            _ => return Err(Reply::bad_request(format!("Invalid Text (Messages[{i}])"))),
        };
        let identifier = match m.get("Identifier") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => {
                return Err(Reply::bad_request(format!(
                    "Invalid Identifier (Messages[{i}])"
                )));
            }
        };
        if let Some(id) = &identifier
            && !seen.insert(id.clone())
        {
            return Err(Reply::bad_request(format!(
                "Invalid Identifier: duplicate {id:?} (Messages[{i}])"
            )));
        }
        messages.push(NewMessage {
            thread,
            text,
            identifier,
        });
    }
    Ok(messages)
}

fn sender_json(as_string: bool) -> Value {
    if as_string {
        json!("Application")
    } else {
        json!({"Discriminator": "Application", "Value": null})
    }
}

fn message_json(m: &StoredMessage, sender_as_string: bool) -> Value {
    json!({
        "Id": m.id,
        "MessageThreadId": m.message_thread_id,
        "Text": m.text,
        "Sender": sender_json(sender_as_string),
        "CreatedUtc": m.created_utc,
    })
}

/// At most this many characters of the poisoned text go into the error.
const POISON_PREFIX_CHARS: usize = 40;

/// `POST messages/add`.
async fn add(
    shared: &Shared,
    conn: &ConnHandle,
    json: Option<&Value>,
    record: &mut RequestRecord,
    stored_out: &mut Vec<StoredMessage>,
    arrived: Instant,
) -> Reply {
    let fault = shared.state().faults.pop_front();
    record.fault.clone_from(&fault);
    // Faults that apply whatever the request contains.
    let after_store = match fault {
        Some(Fault::Status {
            code,
            retry_after,
            message,
        }) => {
            return Reply::Error {
                status: status_or_500(code),
                message,
                retry_after,
            };
        }
        Some(Fault::Raw {
            status,
            content_type,
            body,
        }) => {
            return Reply::Raw {
                status: status_or_500(status),
                content_type,
                body,
            };
        }
        Some(Fault::StatusRetryAt { code, retry_after }) => {
            return Reply::Error {
                status: status_or_500(code),
                message: format!("Scripted failure {code}"),
                retry_after: Some(retry_after.render()),
            };
        }
        Some(Fault::DropBeforeStore) => {
            conn.drop_connection();
            return Reply::Dropped;
        }
        Some(Fault::Redirect { code, location }) => {
            return Reply::Redirect {
                status: status_or_500(code),
                location,
            };
        }
        Some(Fault::DelayThenNormal(delay)) => {
            tokio::time::sleep(delay).await;
            None
        }
        other => other,
    };

    let env = match envelope(json) {
        Ok(env) => env,
        Err(reply) => return reply,
    };
    if let Err(reply) = shared.authorize(&env) {
        return reply;
    }
    let messages = match parse_messages(env.map) {
        Ok(messages) => messages,
        Err(reply) => return reply,
    };
    let opts = shared.opts();
    if let Some(poison) = &opts.poison
        && let Some(bad) = messages.iter().find(|m| poison(&m.text))
    {
        let prefix: String = bad.text.chars().take(POISON_PREFIX_CHARS).collect();
        return Reply::error(StatusCode::FORBIDDEN, format!("poisoned: {prefix}"));
    }

    if let Some(Fault::SlowStore { store_after, .. }) = &after_store {
        tokio::time::sleep_until((arrived + *store_after).into()).await;
    }
    let stored = shared.store(&env.access_token, messages);
    stored_out.clone_from(&stored);
    let mut items: Vec<Value> = stored
        .iter()
        .map(|m| json!({"Identifier": m.identifier, "Message": message_json(m, opts.sender_as_string)}))
        .collect();
    match after_store {
        Some(Fault::DropAfterStore) => {
            conn.drop_connection();
            return Reply::Dropped;
        }
        Some(Fault::StoreThenStatus(code)) => {
            return Reply::error(
                status_or_500(code),
                "Unexpected error (scripted after storing the messages)",
            );
        }
        Some(Fault::StoreThenDelay(delay)) => tokio::time::sleep(delay).await,
        Some(Fault::SlowStore { answer_after, .. }) => match answer_after {
            Some(after) => tokio::time::sleep_until((arrived + after).into()).await,
            // Never answers: the connection stays open until the client goes.
            None => std::future::pending().await,
        },
        Some(Fault::OmitIdentifiers(n)) => items.truncate(items.len().saturating_sub(n)),
        Some(Fault::ExtraIdentifier) => {
            let thread = stored
                .first()
                .map_or_else(Uuid::new_v4, |m| m.message_thread_id);
            let extra = StoredMessage {
                id: Uuid::new_v4(),
                message_thread_id: thread,
                text: "This message was never sent".to_owned(),
                created_utc: humantime::format_rfc3339_seconds(shared.now()).to_string(),
                access_token: env.access_token.clone(),
                identifier: Some(format!("fake-mews-extra-{}", Uuid::new_v4())),
            };
            items.push(json!({
                "Identifier": extra.identifier,
                "Message": message_json(&extra, opts.sender_as_string),
            }));
        }
        _ => {}
    }
    if opts.shuffle_responses {
        fastrand::shuffle(&mut items);
    }
    if let Some(Fault::StoreThenStallBody(stall)) = after_store {
        let body = json!({ "Messages": items }).to_string();
        let mut head = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        head.extend_from_slice(&body.as_bytes()[..body.len() / 2]);
        conn.write_raw(&head);
        tokio::time::sleep(stall).await;
        conn.drop_connection();
        return Reply::Stalled;
    }
    Reply::Json(StatusCode::OK, json!({ "Messages": items }))
}

/// Parses an RFC 3339 timestamp with `Z` or a `±HH:MM` offset.
fn parse_timestamp(s: &str) -> Option<SystemTime> {
    if let Ok(t) = humantime::parse_rfc3339(s) {
        return Some(t);
    }
    let (base, offset) = s.split_at_checked(s.len().checked_sub(6)?)?;
    let b = offset.as_bytes();
    let digits = |r: std::ops::Range<usize>| -> Option<u64> {
        let part = offset.get(r)?;
        if part.bytes().all(|c| c.is_ascii_digit()) {
            part.parse().ok()
        } else {
            None
        }
    };
    if b.get(3) != Some(&b':') {
        return None;
    }
    let (hours, minutes) = (digits(1..3)?, digits(4..6)?);
    if hours > 23 || minutes > 59 {
        return None;
    }
    let local = humantime::parse_rfc3339(&format!("{base}Z")).ok()?;
    let delta = Duration::from_secs(hours * 3600 + minutes * 60);
    match b.first() {
        Some(b'+') => local.checked_sub(delta),
        Some(b'-') => local.checked_add(delta),
        _ => None,
    }
}

/// `CreatedUtc` filter of `messages/getAll`, following Mews'
/// `TimeFilterInterval` rules: `Start == End` means equality, otherwise
/// `Start <= CreatedUtc < End`; either bound may be absent.
struct TimeFilter {
    start: Option<SystemTime>,
    end: Option<SystemTime>,
}

impl TimeFilter {
    fn parse(value: Option<&Value>) -> Result<Option<TimeFilter>, Reply> {
        let map = match value {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::Object(map)) => map,
            Some(_) => return Err(Reply::bad_request("Invalid CreatedUtc")),
        };
        let bound = |key: &str| match map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => parse_timestamp(s)
                .map(Some)
                .ok_or_else(|| Reply::bad_request(format!("Invalid CreatedUtc.{key}"))),
            Some(_) => Err(Reply::bad_request(format!("Invalid CreatedUtc.{key}"))),
        };
        let (start, end) = (bound("StartUtc")?, bound("EndUtc")?);
        if let (Some(s), Some(e)) = (start, end) {
            match e.duration_since(s) {
                Err(_) => {
                    return Err(Reply::bad_request(
                        "Invalid CreatedUtc: EndUtc is before StartUtc",
                    ));
                }
                Ok(d) if d > MAX_GET_ALL_INTERVAL => {
                    return Err(Reply::bad_request(
                        "Invalid CreatedUtc: the interval is longer than one month",
                    ));
                }
                Ok(_) => {}
            }
        }
        Ok(Some(TimeFilter { start, end }))
    }

    fn matches(&self, t: SystemTime) -> bool {
        match (self.start, self.end) {
            (Some(s), Some(e)) if s == e => t == s,
            (s, e) => s.is_none_or(|s| t >= s) && e.is_none_or(|e| t < e),
        }
    }
}

/// `POST messages/getAll`.
fn get_all(shared: &Shared, json: Option<&Value>) -> Reply {
    let env = match envelope(json) {
        Ok(env) => env,
        Err(reply) => return reply,
    };
    if let Err(reply) = shared.authorize(&env) {
        return reply;
    }
    let threads: HashSet<Uuid> = match env.map.get("MessageThreadIds") {
        Some(Value::Array(ids)) if (1..=MAX_ITEMS).contains(&ids.len()) => {
            match ids.iter().map(|v| parse_uuid(Some(v))).collect() {
                Some(threads) => threads,
                None => return Reply::bad_request("Invalid MessageThreadIds"),
            }
        }
        _ => return Reply::bad_request("Invalid MessageThreadIds"),
    };
    let filter = match TimeFilter::parse(env.map.get("CreatedUtc")) {
        Ok(filter) => filter,
        Err(reply) => return reply,
    };
    let Some(Value::Object(limitation)) = env.map.get("Limitation") else {
        return Reply::bad_request("Invalid Limitation");
    };
    let count = match limitation.get("Count").and_then(Value::as_u64) {
        Some(c) if (1..=MAX_ITEMS as u64).contains(&c) => c as usize,
        _ => return Reply::bad_request("Invalid Limitation.Count"),
    };
    let cursor = match limitation.get("Cursor") {
        None | Some(Value::Null) => None,
        v => match parse_uuid(v) {
            Some(id) => Some(id),
            None => return Reply::bad_request("Invalid Limitation.Cursor"),
        },
    };

    let st = shared.state();
    // Newest first, ties broken by reverse storage order: the key
    // (created, storage index) sorted descending.
    let after = match cursor {
        None => None,
        Some(id) => match st.stored.iter().position(|e| e.msg.id == id) {
            Some(i) => Some((st.stored[i].created, i)),
            None => return Reply::bad_request("Invalid Limitation.Cursor"),
        },
    };
    let mut found: Vec<(SystemTime, usize)> = st
        .stored
        .iter()
        .enumerate()
        .filter(|(i, e)| {
            e.msg.access_token == env.access_token
                && threads.contains(&e.msg.message_thread_id)
                && filter.as_ref().is_none_or(|f| f.matches(e.created))
                && after.is_none_or(|key| (e.created, *i) < key)
        })
        .map(|(i, e)| (e.created, i))
        .collect();
    found.sort_unstable_by(|a, b| b.cmp(a));
    let more = found.len() > count;
    found.truncate(count);
    let messages: Vec<Value> = found
        .iter()
        .map(|&(_, i)| message_json(&st.stored[i].msg, st.opts.sender_as_string))
        .collect();
    let next_cursor = if more || st.opts.cursor_on_last_page {
        found.last().map(|&(_, i)| st.stored[i].msg.id)
    } else {
        None
    };
    Reply::Json(
        StatusCode::OK,
        json!({"Messages": messages, "Cursor": next_cursor}),
    )
}

/// `POST configuration/get`: `200` with a fake enterprise when the tokens are
/// valid.
fn configuration(shared: &Shared, json: Option<&Value>) -> Reply {
    let env = match envelope(json) {
        Ok(env) => env,
        Err(reply) => return reply,
    };
    if let Err(reply) = shared.authorize(&env) {
        return reply;
    }
    Reply::Json(
        StatusCode::OK,
        json!({
            "NowUtc": humantime::format_rfc3339_seconds(shared.now()).to_string(),
            "Enterprise": {"Id": FAKE_ENTERPRISE_ID, "Name": "Fake Hotel"},
        }),
    )
}
