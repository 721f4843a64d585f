//! The Mews Connector API client: sends `messages/add` and turns whatever
//! comes back (or does not) into one [`Outcome`]. This is the only place that
//! knows what an HTTP status means.

pub mod wire;

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

use secrecy::{ExposeSecret, SecretString};
use url::Url;

use crate::config::MewsSettings;
use crate::reconcile::ClockOffset;
use crate::retry::parse_retry_after;
pub use wire::{AddedMessage, MessageThread, OutgoingMessage, Sender, TimeInterval};

/// Largest response body read by a client without a request bound (see
/// [`MewsClient::with_max_request_bytes`]); a reply echoes every text.
const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;

/// What a `messages/add` request came to, for the whole batch.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// 200 with a readable body: the messages Mews created, by `Identifier`.
    /// `unlabelled` counts items without an Identifier or repeating one.
    Accepted {
        by_identifier: HashMap<String, AddedMessage>,
        unlabelled: usize,
    },
    /// 400 or 403: Mews refused something in the request; not retryable as is.
    Rejected { error: String },
    /// 413: the body is too large for Mews.
    TooLarge { error: String },
    /// 401: tokens invalid or lacking permission; nothing wrong with the messages.
    Unauthorized { error: String },
    /// 404: wrong address (base_url); nothing wrong with the messages.
    NotFound { error: String },
    /// A 3xx: whoever answers at base_url sent us elsewhere. Never followed
    /// (the tokens would go with the body), and not Mews storing anything:
    /// base_url is wrong, nothing is wrong with the messages.
    Redirected { error: String },
    /// 429: too many requests for this AccessToken.
    Throttled {
        error: String,
        retry_after: Option<Duration>,
    },
    /// No connection could be made: Mews never saw the request.
    Unreachable { error: String },
    /// 408, 5xx, an unexpected status, a transport failure after sending or
    /// an unreadable 200: worth retrying. `maybe_stored` when Mews may have
    /// created the messages anyway (the request reached it); `smaller` when
    /// a smaller batch may succeed (408, client timeout); `settle` when no
    /// answer came back, so Mews may still be working on the request: do not
    /// read back or send again before that long has passed.
    Transient {
        error: String,
        retry_after: Option<Duration>,
        maybe_stored: bool,
        smaller: bool,
        settle: Option<Duration>,
    },
}

impl Outcome {
    /// The error text of every outcome but `Accepted`.
    fn error_mut(&mut self) -> Option<&mut String> {
        match self {
            Outcome::Accepted { .. } => None,
            Outcome::Rejected { error }
            | Outcome::TooLarge { error }
            | Outcome::Unauthorized { error }
            | Outcome::NotFound { error }
            | Outcome::Redirected { error }
            | Outcome::Throttled { error, .. }
            | Outcome::Unreachable { error }
            | Outcome::Transient { error, .. } => Some(error),
        }
    }

    /// A short name for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Outcome::Accepted { .. } => "accepted",
            Outcome::Rejected { .. } => "rejected",
            Outcome::TooLarge { .. } => "too_large",
            Outcome::Unauthorized { .. } => "unauthorized",
            Outcome::NotFound { .. } => "not_found",
            Outcome::Redirected { .. } => "redirected",
            Outcome::Throttled { .. } => "throttled",
            Outcome::Unreachable { .. } => "unreachable",
            Outcome::Transient { .. } => "transient",
        }
    }

    /// What went wrong; `None` for a 200.
    pub fn error(&self) -> Option<&str> {
        match self {
            Outcome::Accepted { .. } => None,
            Outcome::Rejected { error }
            | Outcome::TooLarge { error }
            | Outcome::Unauthorized { error }
            | Outcome::NotFound { error }
            | Outcome::Redirected { error }
            | Outcome::Throttled { error, .. }
            | Outcome::Unreachable { error }
            | Outcome::Transient { error, .. } => Some(error),
        }
    }
}

/// One request's result and what to log about it.
#[derive(Debug)]
pub struct Reply {
    pub http_status: Option<u16>,
    /// Mews's `Request-Id` header, when a response arrived.
    pub request_id: Option<String>,
    pub elapsed: Duration,
    pub outcome: Outcome,
    /// Mews's clock against ours, from the response's `Date` header.
    pub clock: Option<ClockOffset>,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot build the HTTP client")]
    Build(#[source] reqwest::Error),
    #[error("mews.base_url cannot be joined with an API path")]
    Url(#[source] url::ParseError),
}

/// A Connector API client for one base URL and ClientToken.
#[derive(Debug, Clone)]
pub struct MewsClient {
    http: reqwest::Client,
    add_url: Url,
    get_all_url: Url,
    threads_add_url: Url,
    threads_get_all_url: Url,
    configuration_url: Url,
    client_token: SecretString,
    client: String,
    request_timeout: Duration,
    /// Largest response body read, in bytes.
    max_response_bytes: usize,
}

impl MewsClient {
    pub fn new(settings: &MewsSettings) -> Result<MewsClient, ClientError> {
        let http = reqwest::Client::builder()
            .user_agent(settings.client.clone())
            .connect_timeout(settings.request_timeout.min(Duration::from_secs(10)))
            // Tokens travel in every request body: a redirect must never
            // carry them to another server (a 307/308 would re-POST them,
            // a 301/302 would turn the call into a GET). A 3xx is answered
            // as [`Outcome::Redirected`] instead.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(ClientError::Build)?;
        let base = settings.base_url.as_str().trim_end_matches('/').to_owned() + "/";
        let base = Url::parse(&base).map_err(ClientError::Url)?;
        let join = |path: &str| base.join(path).map_err(ClientError::Url);
        Ok(MewsClient {
            http,
            add_url: join("api/connector/v1/messages/add")?,
            get_all_url: join("api/connector/v1/messages/getAll")?,
            threads_add_url: join("api/connector/v1/messageThreads/add")?,
            threads_get_all_url: join("api/connector/v1/messageThreads/getAll")?,
            configuration_url: join("api/connector/v1/configuration/get")?,
            client_token: settings.client_token.clone(),
            client: settings.client.clone(),
            request_timeout: settings.request_timeout,
            max_response_bytes: MAX_RESPONSE_BYTES,
        })
    }

    /// How long a request may take before it counts as failed.
    pub fn request_timeout(&self) -> Duration {
        self.request_timeout
    }

    /// Sizes the response buffer for requests of at most `max_request_bytes`:
    /// Mews echoes each text, and a JSON writer may escape every character
    /// of it as `\u00XX` (6 bytes for 1), plus its own ~1 KiB per message.
    pub fn with_max_request_bytes(mut self, max_request_bytes: usize) -> MewsClient {
        self.max_response_bytes = max_request_bytes
            .saturating_mul(6)
            .saturating_add(crate::config::MAX_BATCH_SIZE * 1024);
        self
    }

    /// Bytes of a `messages/add` body for `access_token` with no message in
    /// it (`"Messages":[]`): what a request costs besides its messages.
    pub fn add_messages_envelope_bytes(&self, access_token: &SecretString) -> usize {
        let body = wire::AddMessagesRequest {
            client_token: self.client_token.expose_secret(),
            access_token: access_token.expose_secret(),
            client: &self.client,
            messages: &[],
        };
        // Serialising plain strings into a Vec cannot fail; 0 would only
        // make the bound looser by the envelope.
        serde_json::to_vec(&body).map(|v| v.len()).unwrap_or(0)
    }

    /// Posts one batch to `messages/add`. Never fails: every failure is an [`Outcome`].
    pub async fn add_messages(
        &self,
        access_token: &SecretString,
        messages: &[OutgoingMessage<'_>],
    ) -> Reply {
        let body = wire::AddMessagesRequest {
            client_token: self.client_token.expose_secret(),
            access_token: access_token.expose_secret(),
            client: &self.client,
            messages,
        };
        let reply = self.post(&self.add_url, &body, Stores::Messages).await;
        self.redact(reply, access_token)
    }

    /// Calls `configuration/get`: a harmless request that proves the tokens work.
    pub async fn check_tokens(&self, access_token: &SecretString) -> Reply {
        let body = serde_json::json!({
            "ClientToken": self.client_token.expose_secret(),
            "AccessToken": access_token.expose_secret(),
            "Client": self.client,
        });
        let reply = self
            .post(&self.configuration_url, &body, Stores::Nothing)
            .await;
        self.redact(reply, access_token)
    }

    /// Error texts quote Mews's answer, which is not ours to trust: should it
    /// ever echo a token, the token must not reach the logs or `last_error`.
    fn redact(&self, mut reply: Reply, access_token: &SecretString) -> Reply {
        self.redact_outcome(&mut reply.outcome, access_token);
        reply
    }

    fn redact_outcome(&self, outcome: &mut Outcome, access_token: &SecretString) {
        if let Some(error) = outcome.error_mut() {
            *error = crate::secrets::redact(
                error,
                &[
                    self.client_token.expose_secret(),
                    access_token.expose_secret(),
                ],
            );
        }
    }

    /// Creates one thread with `messageThreads/add`. Never fails: every
    /// failure is an [`Outcome`] (never `Accepted`), mapped as for
    /// `messages/add` ([`classify`]); a 200 without a usable thread `Id`
    /// is a [`Outcome::Transient`] that may have created it.
    pub async fn add_thread(
        &self,
        access_token: &SecretString,
        subject: &str,
        original_sender: &str,
    ) -> ThreadReply {
        let body = wire::AddThreadRequest {
            client_token: self.client_token.expose_secret(),
            access_token: access_token.expose_secret(),
            client: &self.client,
            original_sender,
            subject,
        };
        let (response, elapsed) = self.exchange(&self.threads_add_url, &body).await;
        let clock = response.as_ref().ok().and_then(|r| r.clock);
        let (http_status, request_id, mut outcome) = match response {
            Err(outcome) => (None, None, Err(outcome)),
            Ok(r) => {
                let outcome = match r.body {
                    _ if is_redirect(r.status) => Err(redirected(
                        r.status,
                        r.location.as_deref(),
                        &self.threads_add_url,
                    )),
                    Ok(body) if r.status == 200 => created_thread(&body),
                    Ok(body) => Err(classify(
                        r.status,
                        r.retry_after.as_deref(),
                        &body,
                        SystemTime::now(),
                    )),
                    Err(e) => Err(unreadable_body(
                        r.status,
                        &e,
                        self.request_timeout,
                        Stores::Thread,
                    )),
                };
                (Some(r.status), r.request_id, outcome)
            }
        };
        if let Err(failure) = &mut outcome {
            self.redact_outcome(failure, access_token);
        }
        ThreadReply {
            http_status,
            request_id,
            elapsed,
            clock,
            outcome,
        }
    }

    /// Reads one page of `messageThreads/getAll`: the threads this client
    /// created within `created`, newest first, older than `cursor`.
    pub async fn get_threads(
        &self,
        access_token: &SecretString,
        created: TimeInterval,
        count: u32,
        cursor: Option<&str>,
    ) -> ThreadReadBack {
        let body = wire::GetThreadsRequest {
            client_token: self.client_token.expose_secret(),
            access_token: access_token.expose_secret(),
            client: &self.client,
            created_utc: created,
            limitation: wire::Limitation { count, cursor },
        };
        self.read_page(&self.threads_get_all_url, &body, access_token)
            .await
            .map_page(|p: wire::MessageThreadsResponse| ThreadPage {
                threads: p.message_threads,
                cursor: p.cursor,
            })
    }

    /// Reads one page of `messages/getAll`: messages of `threads` created
    /// within `created`, newest first, older than `cursor`.
    pub async fn get_messages(
        &self,
        access_token: &SecretString,
        threads: &[&str],
        created: TimeInterval,
        count: u32,
        cursor: Option<&str>,
    ) -> ReadBack {
        let body = wire::GetMessagesRequest {
            client_token: self.client_token.expose_secret(),
            access_token: access_token.expose_secret(),
            client: &self.client,
            message_thread_ids: threads,
            created_utc: created,
            limitation: wire::Limitation { count, cursor },
        };
        self.read_page(&self.get_all_url, &body, access_token)
            .await
            .map_page(|p: wire::GetMessagesResponse| MessagePage {
                messages: p.messages,
                cursor: p.cursor,
            })
    }

    /// One page of a `getAll`: the 200's body read as `P`, or the outcome
    /// that says why not (as for `messages/add`, with the tokens redacted;
    /// a read creates nothing at Mews, so nothing here may have been stored).
    async fn read_page<P: serde::de::DeserializeOwned>(
        &self,
        url: &Url,
        body: &impl serde::Serialize,
        access_token: &SecretString,
    ) -> ReadBack<P> {
        let (response, elapsed) = self.exchange(url, body).await;
        let clock = response.as_ref().ok().and_then(|r| r.clock);
        let (http_status, request_id, mut page) = match response {
            Err(outcome) => (None, None, Err(outcome)),
            Ok(r) => {
                let page = match r.body {
                    _ if is_redirect(r.status) => {
                        Err(redirected(r.status, r.location.as_deref(), url))
                    }
                    Ok(body) if r.status == 200 => {
                        serde_json::from_slice::<P>(&body).map_err(|e| Outcome::Transient {
                            error: format!(
                                "HTTP 200 with an unreadable body ({e}): {}",
                                snippet(&body)
                            ),
                            retry_after: None,
                            maybe_stored: false,
                            smaller: false,
                            settle: None,
                        })
                    }
                    Ok(body) => Err(classify(
                        r.status,
                        r.retry_after.as_deref(),
                        &body,
                        SystemTime::now(),
                    )),
                    Err(e) => Err(unreadable_body(
                        r.status,
                        &e,
                        self.request_timeout,
                        Stores::Nothing,
                    )),
                };
                (Some(r.status), r.request_id, page)
            }
        };
        if let Err(failure) = &mut page {
            self.redact_outcome(failure, access_token);
        }
        ReadBack {
            http_status,
            request_id,
            elapsed,
            clock,
            page,
        }
    }

    async fn post(&self, url: &Url, body: &impl serde::Serialize, stores: Stores) -> Reply {
        let (response, elapsed) = self.exchange(url, body).await;
        match response {
            Err(outcome) => Reply {
                http_status: None,
                request_id: None,
                elapsed,
                outcome,
                clock: None,
            },
            Ok(r) => {
                let outcome = match r.body {
                    _ if is_redirect(r.status) => redirected(r.status, r.location.as_deref(), url),
                    Ok(body) => {
                        classify(r.status, r.retry_after.as_deref(), &body, SystemTime::now())
                    }
                    Err(e) => unreadable_body(r.status, &e, self.request_timeout, stores),
                };
                Reply {
                    http_status: Some(r.status),
                    request_id: r.request_id,
                    elapsed,
                    outcome,
                    clock: r.clock,
                }
            }
        }
    }

    /// Sends one request and reads the response; `Err` when none came back.
    async fn exchange(
        &self,
        url: &Url,
        body: &impl serde::Serialize,
    ) -> (Result<RawResponse, Outcome>, Duration) {
        let started = Instant::now();
        let sent_at = SystemTime::now();
        let sent = self
            .http
            .post(url.clone())
            .timeout(self.request_timeout)
            .json(body)
            .send()
            .await;
        let response = match sent {
            Ok(response) => response,
            Err(e) => {
                return (
                    Err(transport_failure(&e, self.request_timeout)),
                    started.elapsed(),
                );
            }
        };
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        // Mews wrote `Date` about when its headers left: measured against
        // the middle of the time until they arrived here.
        let clock = header("date")
            .and_then(|d| httpdate::parse_http_date(&d).ok())
            .map(|date| ClockOffset::measure(date, sent_at, started.elapsed()));
        let status = response.status().as_u16();
        let request_id = header("request-id");
        let retry_after = header("retry-after");
        let location = header("location");
        let body = read_capped(response, self.max_response_bytes).await;
        (
            Ok(RawResponse {
                status,
                request_id,
                retry_after,
                location,
                body,
                clock,
            }),
            started.elapsed(),
        )
    }
}

/// Whether a call creates something at Mews, so that an answer cut short
/// leaves it unknown whether it did.
#[derive(Debug, Clone, Copy)]
enum Stores {
    /// `messages/add`.
    Messages,
    /// `messageThreads/add`.
    Thread,
    /// Read-only calls: `messages/getAll`, `configuration/get`.
    Nothing,
}

/// A response as it came, before anyone says what it means.
struct RawResponse {
    status: u16,
    request_id: Option<String>,
    retry_after: Option<String>,
    /// The `Location` header of a redirect; never followed.
    location: Option<String>,
    body: Result<Vec<u8>, BodyError>,
    clock: Option<ClockOffset>,
}

/// A status line arrived but not the whole body: Mews has finished with the
/// request, so there is nothing to let settle. The request's timeout covers
/// the body too; reqwest reports it running out there as "error decoding
/// response body", which would send the operator after a parsing bug.
fn unreadable_body(status: u16, e: &BodyError, timeout: Duration, stores: Stores) -> Outcome {
    let error = if e.is_timeout() {
        format!(
            "HTTP {status} but timed out reading the response body after {} (mews.request_timeout){}",
            humantime::format_duration(timeout),
            match stores {
                Stores::Messages => "; Mews may have stored the messages",
                Stores::Thread => "; Mews may have created the thread",
                Stores::Nothing => "",
            }
        )
    } else {
        format!("HTTP {status} but the response body could not be read: {e}")
    };
    Outcome::Transient {
        error,
        retry_after: None,
        maybe_stored: true,
        smaller: e.is_timeout(),
        settle: None,
    }
}

/// What a 200 of `messageThreads/add` says: the thread with its Id, or a
/// [`Outcome::Transient`] that may have created it (unreadable, or no
/// thread with a UUID `Id` in it).
fn created_thread(body: &[u8]) -> Result<MessageThread, Outcome> {
    let unusable = |why: String| Outcome::Transient {
        error: format!("HTTP 200 {why}: {}", snippet(body)),
        retry_after: None,
        maybe_stored: true,
        smaller: false,
        settle: None,
    };
    let response = serde_json::from_slice::<wire::MessageThreadsResponse>(body)
        .map_err(|e| unusable(format!("with an unreadable body ({e})")))?;
    response
        .message_threads
        .into_iter()
        .find(|t| uuid::Uuid::parse_str(&t.id).is_ok())
        .ok_or_else(|| unusable("without a thread Id".to_owned()))
}

/// A `messageThreads/add` request's result and what to log about it.
#[derive(Debug)]
pub struct ThreadReply {
    pub http_status: Option<u16>,
    pub request_id: Option<String>,
    pub elapsed: Duration,
    /// Mews's clock against ours, from the response's `Date` header.
    pub clock: Option<ClockOffset>,
    /// The thread Mews created, or what went wrong (never `Accepted`).
    pub outcome: Result<MessageThread, Outcome>,
}

/// One page of `messageThreads/getAll`.
#[derive(Debug, Clone)]
pub struct ThreadPage {
    /// Newest first.
    pub threads: Vec<MessageThread>,
    /// Id of the oldest thread returned, to ask for older ones.
    pub cursor: Option<String>,
}

/// A `messageThreads/getAll` request's result.
pub type ThreadReadBack = ReadBack<ThreadPage>;

/// One page of `messages/getAll`.
#[derive(Debug, Clone)]
pub struct MessagePage {
    /// Newest first.
    pub messages: Vec<AddedMessage>,
    /// Id of the oldest message returned, to ask for older ones.
    pub cursor: Option<String>,
}

/// A `getAll` request's result (a page of `messages/getAll` unless said
/// otherwise) and what to log about it.
#[derive(Debug)]
pub struct ReadBack<P = MessagePage> {
    pub http_status: Option<u16>,
    pub request_id: Option<String>,
    pub elapsed: Duration,
    /// Mews's clock against ours, from the response's `Date` header.
    pub clock: Option<ClockOffset>,
    /// The page, or what went wrong (as for `messages/add`).
    pub page: Result<P, Outcome>,
}

impl<P> ReadBack<P> {
    fn map_page<Q>(self, f: impl FnOnce(P) -> Q) -> ReadBack<Q> {
        ReadBack {
            http_status: self.http_status,
            request_id: self.request_id,
            elapsed: self.elapsed,
            clock: self.clock,
            page: self.page.map(f),
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum BodyError {
    #[error(transparent)]
    Http(#[from] reqwest::Error),
    #[error("larger than {0} bytes")]
    TooLarge(usize),
}

impl BodyError {
    fn is_timeout(&self) -> bool {
        matches!(self, BodyError::Http(e) if e.is_timeout())
    }
}

async fn read_capped(mut response: reqwest::Response, cap: usize) -> Result<Vec<u8>, BodyError> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        if body.len() + chunk.len() > cap {
            return Err(BodyError::TooLarge(cap));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// A request that got no response. Only a failure to connect proves that Mews
/// never saw it; otherwise Mews may still be working on it, for as long as
/// we waited (a heavy request takes "tens of seconds").
fn transport_failure(e: &reqwest::Error, timeout: Duration) -> Outcome {
    // reqwest's own message is generic ("client error (Connect)"); the
    // causes say what happened ("Connection refused", a DNS failure).
    let mut cause = String::new();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        cause.push_str(": ");
        cause.push_str(&s.to_string());
        source = s.source();
    }
    if e.is_timeout() {
        Outcome::Transient {
            error: format!("no response within {}", humantime::format_duration(timeout)),
            retry_after: None,
            maybe_stored: true,
            smaller: true,
            settle: Some(timeout),
        }
    } else if e.is_connect() {
        Outcome::Unreachable {
            error: format!("cannot connect to Mews{cause}"),
        }
    } else {
        Outcome::Transient {
            error: format!("connection failed after the request was sent{cause}"),
            retry_after: None,
            maybe_stored: true,
            smaller: false,
            settle: Some(timeout),
        }
    }
}

fn is_redirect(status: u16) -> bool {
    (300..400).contains(&status)
}

/// A 3xx, named with the origin (`scheme://host:port`) it pointed to and
/// nothing more of the `Location`, which could carry anything (a path with a
/// token in it, credentials, a very long text).
pub fn redirected(status: u16, location: Option<&str>, request: &Url) -> Outcome {
    let target = match location.map(|l| request.join(l)) {
        None => "without a Location".to_owned(),
        Some(Ok(url)) if url.origin().is_tuple() => {
            format!("to {}", url.origin().ascii_serialization())
        }
        Some(_) => "to an unusable Location".to_owned(),
    };
    Outcome::Redirected {
        error: format!(
            "HTTP {status} redirect {target}, not followed (tokens go to mews.base_url only): mews.base_url looks wrong"
        ),
    }
}

/// Maps a response to an [`Outcome`]. Pure: the status, the `Retry-After`
/// header, the body and the current time are all it looks at.
pub fn classify(status: u16, retry_after: Option<&str>, body: &[u8], now: SystemTime) -> Outcome {
    let retry_after = retry_after.and_then(|v| parse_retry_after(v, now));
    if status == 200 {
        return match serde_json::from_slice::<wire::AddMessagesResponse>(body) {
            Ok(response) => {
                let mut by_identifier = HashMap::with_capacity(response.messages.len());
                let mut unlabelled = 0;
                for item in response.messages {
                    match item.identifier {
                        Some(id) if !by_identifier.contains_key(&id) => {
                            by_identifier.insert(id, item.message);
                        }
                        _ => unlabelled += 1,
                    }
                }
                Outcome::Accepted {
                    by_identifier,
                    unlabelled,
                }
            }
            Err(e) => Outcome::Transient {
                error: format!("HTTP 200 with an unreadable body ({e}): {}", snippet(body)),
                retry_after,
                maybe_stored: true,
                smaller: false,
                settle: None,
            },
        };
    }
    if is_redirect(status) {
        // The client names the Location; this pure mapping has no headers.
        return Outcome::Redirected {
            error: format!(
                "HTTP {status} redirect, not followed (tokens go to mews.base_url only): mews.base_url looks wrong"
            ),
        };
    }
    let error = describe_error(status, body);
    match status {
        400 | 403 => Outcome::Rejected { error },
        401 => Outcome::Unauthorized { error },
        404 => Outcome::NotFound { error },
        413 => Outcome::TooLarge { error },
        429 => Outcome::Throttled { error, retry_after },
        408 => Outcome::Transient {
            error,
            retry_after,
            maybe_stored: true,
            smaller: true,
            settle: None,
        },
        _ => Outcome::Transient {
            error,
            retry_after,
            maybe_stored: status >= 500 || (200..300).contains(&status),
            smaller: false,
            settle: None,
        },
    }
}

/// "HTTP 403: <Mews's Message> (RequestId <id>)", or a snippet of a body
/// that is not Mews's error shape.
fn describe_error(status: u16, body: &[u8]) -> String {
    match serde_json::from_slice::<wire::ApiError>(body) {
        Ok(wire::ApiError {
            message: Some(message),
            request_id,
        }) => match request_id {
            Some(id) => format!("HTTP {status}: {message} (RequestId {id})"),
            None => format!("HTTP {status}: {message}"),
        },
        _ if body.is_empty() => format!("HTTP {status} with an empty body"),
        _ => format!("HTTP {status}: {}", snippet(body)),
    }
}

/// An error text without its ` (RequestId …)` part: two rejections for the
/// same reason differ only there.
pub fn without_request_id(error: &str) -> String {
    const MARK: &str = " (RequestId ";
    match error.find(MARK) {
        None => error.to_owned(),
        Some(start) => {
            let rest = &error[start..];
            let end = rest
                .find(')')
                .map_or(error.len(), |close| start + close + 1);
            format!("{}{}", &error[..start], &error[end..])
        }
    }
}

/// The start of a body, printable and short, for an error message.
fn snippet(body: &[u8]) -> String {
    const MAX: usize = 200;
    let text = String::from_utf8_lossy(&body[..body.len().min(MAX)]);
    let mut s: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if body.len() > MAX {
        s.push('…');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_error_names_its_cause_once() {
        let e = ClientError::Url(url::ParseError::EmptyHost);
        let chain = crate::error_chain::ErrorChain(&e).to_string();
        assert_eq!(chain.matches("empty host").count(), 1, "{chain}");
        assert!(
            chain.starts_with("mews.base_url cannot be joined"),
            "{chain}"
        );
    }

    fn at(status: u16, retry_after: Option<&str>, body: &str) -> Outcome {
        classify(status, retry_after, body.as_bytes(), SystemTime::UNIX_EPOCH)
    }

    #[test]
    fn a_200_is_mapped_by_identifier_not_position() {
        let body = r#"{"Messages":[
            {"Identifier":"2","Message":{"Id":"b","Sender":"Application","CreatedUtc":"2026-01-01T00:00:01Z"}},
            {"Identifier":"1","Message":{"Id":"a","Sender":{"Discriminator":"Application","Value":null},"CreatedUtc":"2026-01-01T00:00:00Z"}},
            {"Identifier":"999","Message":{"Id":"x","Sender":"Application","CreatedUtc":"2026-01-01T00:00:00Z"}}]}"#;
        let Outcome::Accepted {
            by_identifier,
            unlabelled,
        } = at(200, None, body)
        else {
            panic!("not accepted")
        };
        assert_eq!(by_identifier["1"].id, "a");
        assert_eq!(by_identifier["2"].id, "b");
        assert_eq!(
            by_identifier["999"].id, "x",
            "the caller knows it never sent 999"
        );
        assert_eq!(unlabelled, 0);
    }

    #[test]
    fn a_thread_200_needs_a_thread_id() {
        let ok = br#"{"MessageThreads":[{"Id":"7f9325f6-ef44-4911-89a8-ae51010a5aa4","OriginalSender":"John Doe","Subject":"S","CreatedUtc":"2022-03-08T12:06:50Z","UpdatedUtc":"2022-03-08T12:06:50Z","IsResolved":false}]}"#;
        assert_eq!(
            created_thread(ok).unwrap().id,
            "7f9325f6-ef44-4911-89a8-ae51010a5aa4"
        );
        for body in [
            &br#"{"MessageThreads":[]}"#[..],
            br#"{"MessageThreads":[{"Id":"","OriginalSender":"a","Subject":"b","CreatedUtc":"c"}]}"#,
            b"<html>",
            b"",
        ] {
            assert!(
                matches!(
                    created_thread(body),
                    Err(Outcome::Transient {
                        maybe_stored: true,
                        ..
                    })
                ),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn an_unreadable_200_may_have_been_stored() {
        for body in [
            "<html>oops</html>",
            "{\"Messages\":[{",
            "{\"Messages\":42}",
            "",
        ] {
            assert!(
                matches!(
                    at(200, None, body),
                    Outcome::Transient {
                        maybe_stored: true,
                        ..
                    }
                ),
                "{body}"
            );
        }
    }

    #[test]
    fn errors_carry_mews_message_and_request_id() {
        let body = r#"{"Message":"Invalid MessageThreadId","RequestId":"r-1","Details":null}"#;
        assert_eq!(
            at(400, None, body),
            Outcome::Rejected {
                error: "HTTP 400: Invalid MessageThreadId (RequestId r-1)".into()
            }
        );
        assert!(matches!(at(403, None, body), Outcome::Rejected { .. }));
        assert!(matches!(at(401, None, body), Outcome::Unauthorized { .. }));
        assert!(matches!(at(404, None, ""), Outcome::NotFound { .. }));
        assert!(matches!(at(413, None, ""), Outcome::TooLarge { .. }));
    }

    #[test]
    fn request_ids_are_left_out_to_compare_errors() {
        assert_eq!(
            without_request_id("HTTP 403: Nope (RequestId r-1) (gave up after 3 attempts)"),
            "HTTP 403: Nope (gave up after 3 attempts)"
        );
        assert_eq!(without_request_id("HTTP 500"), "HTTP 500");
        assert_eq!(
            without_request_id("HTTP 400: x (RequestId r"),
            "HTTP 400: x"
        );
    }

    #[test]
    fn throttling_and_server_errors_keep_retry_after() {
        assert_eq!(
            at(429, Some("12"), ""),
            Outcome::Throttled {
                error: "HTTP 429 with an empty body".into(),
                retry_after: Some(Duration::from_secs(12))
            }
        );
        assert!(matches!(
            at(503, Some("3"), "busy"),
            Outcome::Transient { retry_after: Some(d), maybe_stored: true, smaller: false, .. } if d == Duration::from_secs(3)
        ));
        assert!(matches!(
            at(408, None, ""),
            Outcome::Transient { smaller: true, .. }
        ));
    }

    #[test]
    fn a_redirect_names_only_the_origin_of_its_location() {
        let request = Url::parse("https://proxy.example/api/connector/v1/messages/add").unwrap();
        let error = |location| match redirected(307, location, &request) {
            Outcome::Redirected { error } => error,
            other => panic!("{other:?}"),
        };
        let absolute = error(Some(
            "http://user:SECRET-PW@evil.example:8443/x?token=SECRET-Q",
        ));
        assert!(
            absolute.starts_with("HTTP 307 redirect to http://evil.example:8443, not followed"),
            "{absolute}"
        );
        assert!(!absolute.contains("SECRET"), "{absolute}");
        assert!(
            error(Some("/elsewhere")).contains("to https://proxy.example,"),
            "a relative Location is resolved against the request"
        );
        assert!(error(None).contains("without a Location"));
        assert!(error(Some("data:text/plain,SECRET")).contains("unusable Location"));
        assert!(error(None).ends_with("mews.base_url looks wrong"));
    }

    #[test]
    fn every_3xx_is_a_redirect_not_a_retry() {
        for status in [300, 301, 302, 303, 304, 307, 308, 399] {
            assert!(
                matches!(at(status, None, ""), Outcome::Redirected { .. }),
                "{status}"
            );
        }
    }

    use proptest::prelude::*;

    proptest! {
        /// Any status and any body map to exactly one outcome, without panicking.
        #[test]
        fn classify_never_panics(status in 100u16..600, body in proptest::collection::vec(proptest::num::u8::ANY, 0..300), header in proptest::option::of(".{0,30}")) {
            let outcome = classify(status, header.as_deref(), &body, SystemTime::UNIX_EPOCH);
            let accepted = matches!(outcome, Outcome::Accepted { .. });
            prop_assert!(status == 200 || !accepted);
        }

        /// Whatever order the items come in, each Identifier maps to its own message.
        #[test]
        fn identifiers_map_regardless_of_order(set in proptest::collection::hash_set(0u32..10_000, 1..50), seed in 0u64..1000) {
            let mut ids: Vec<u32> = set.into_iter().collect();
            fastrand::Rng::with_seed(seed).shuffle(&mut ids);
            let items: Vec<String> = ids.iter().map(|id| format!(
                r#"{{"Identifier":"{id}","Message":{{"Id":"m{id}","Sender":"Application","CreatedUtc":"c"}}}}"#
            )).collect();
            let body = format!(r#"{{"Messages":[{}]}}"#, items.join(","));
            let Outcome::Accepted { by_identifier, unlabelled } = classify(200, None, body.as_bytes(), SystemTime::UNIX_EPOCH) else {
                return Err(TestCaseError::fail("not accepted"));
            };
            prop_assert_eq!(unlabelled, 0);
            for id in ids {
                prop_assert_eq!(&by_identifier[&id.to_string()].id, &format!("m{id}"));
            }
        }
    }
}
