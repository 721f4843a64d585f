//! Scripted misbehaviour: the [`Fault`]s a request can consume and the
//! `Retry-After` values ([`RetryAfter`]) the fake writes and checks.

use std::fmt;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

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
pub(super) fn retry_after_end(
    value: &str,
    sent: Instant,
    sent_wall: SystemTime,
) -> Option<Instant> {
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

/// `d` in whole seconds, rounded up (`Retry-After` has a resolution of one
/// second).
pub(super) fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}
