//! The request handler: what every request goes through (record, rate
//! window, throttle, path and method), the opening every route shares, and
//! the JSON shapes the routes have in common.

mod add;
mod configuration;
mod get_all;
mod threads;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Instant, SystemTime};

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::connect_info::ConnectInfo;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};
use uuid::Uuid;

use super::connections::ConnHandle;
use super::faults::retry_after_end;
use super::reply::{Reply, status_or_500};
use super::state::Shared;
use super::{
    ADD_PATH, CONFIGURATION_PATH, Fault, GET_ALL_PATH, RequestRecord, RetryAfter, StoredMessage,
    THREADS_ADD_PATH, THREADS_GET_ALL_PATH,
};

/// The single entry point: hands the request to a task of its own, so that
/// a client that disconnects (hyper then drops this future) cannot stop the
/// fake half-way, before it stores what it would have stored.
pub(super) async fn handle(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(conn): ConnectInfo<ConnHandle>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let arrived = Instant::now();
    let task = tokio::spawn(handle_detached(
        shared, conn, method, uri, headers, body, arrived,
    ));
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
    headers: HeaderMap,
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
        headers,
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

    let known = [
        ADD_PATH,
        GET_ALL_PATH,
        CONFIGURATION_PATH,
        THREADS_ADD_PATH,
        THREADS_GET_ALL_PATH,
    ]
    .contains(&path.as_str());
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
        add::add(
            &shared,
            &conn,
            json.as_ref(),
            &mut record,
            &mut stored,
            arrived,
        )
        .await
    } else if path == GET_ALL_PATH {
        get_all::get_all(&shared, &conn, json.as_ref(), &mut record).await
    } else if path == THREADS_ADD_PATH {
        threads::add(&shared, &conn, json.as_ref(), &mut record, arrived).await
    } else if path == THREADS_GET_ALL_PATH {
        threads::get_all(&shared, &conn, json.as_ref(), &mut record).await
    } else {
        configuration::configuration(&shared, &conn, json.as_ref(), &mut record).await
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
    if path == ADD_PATH {
        // messageThreads/add sets its own (the thread it created).
        record.stored_ids = stored.iter().map(|m| m.id).collect();
    }
    shared.record(seq, record);
    reply.into_response(&request_id, shared.now())
}

/// The routes, each with its own queue of scripted faults.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Route {
    Add,
    GetAll,
    Configuration,
    ThreadsAdd,
    ThreadsGetAll,
}

impl Route {
    /// Pops the next fault scripted for this route, if any.
    fn pop_fault(self, shared: &Shared) -> Option<Fault> {
        let mut st = shared.state();
        let queue = match self {
            Route::Add => &mut st.faults,
            Route::GetAll => &mut st.get_all_faults,
            Route::Configuration => &mut st.configuration_faults,
            Route::ThreadsAdd => &mut st.threads_add_faults,
            Route::ThreadsGetAll => &mut st.threads_get_all_faults,
        };
        queue.pop_front()
    }

    /// Applies a fault that acts as soon as the request arrives, whatever
    /// its body: `Err` with the reply, or `Ok` with the fault left for the
    /// route (`None` once a `DelayThenNormal` has slept).
    ///
    /// `configuration/get` honours only `Status` and `Redirect`; every other
    /// fault is left to it (and it ignores them).
    async fn at_arrival(self, fault: Fault, conn: &ConnHandle) -> Result<Option<Fault>, Reply> {
        match fault {
            Fault::Status {
                code,
                retry_after,
                message,
            } => Err(Reply::Error {
                status: status_or_500(code),
                message,
                retry_after,
            }),
            Fault::Redirect { code, location } => Err(Reply::Redirect {
                status: status_or_500(code),
                location,
            }),
            other if self == Route::Configuration => Ok(Some(other)),
            Fault::Raw {
                status,
                content_type,
                body,
            } => Err(Reply::Raw {
                status: status_or_500(status),
                content_type,
                body,
            }),
            Fault::StatusRetryAt { code, retry_after } => Err(Reply::Error {
                status: status_or_500(code),
                message: format!("Scripted failure {code}"),
                retry_after: Some(retry_after.render()),
            }),
            Fault::DropBeforeStore => {
                conn.drop_connection();
                Err(Reply::Dropped)
            }
            Fault::DelayThenNormal(delay) => {
                tokio::time::sleep(delay).await;
                Ok(None)
            }
            other => Ok(Some(other)),
        }
    }
}

/// The opening every route shares, after the request has entered its
/// token's rate window ([`handle_detached`]): pop the route's scripted fault
/// (kept in `record`), apply it if it acts at arrival, then parse the
/// envelope and check the tokens. `Ok` carries the envelope and the fault
/// left for the route to apply.
async fn open<'a>(
    route: Route,
    shared: &Shared,
    conn: &ConnHandle,
    json: Option<&'a Value>,
    record: &mut RequestRecord,
) -> Result<(Envelope<'a>, Option<Fault>), Reply> {
    let fault = route.pop_fault(shared);
    record.fault.clone_from(&fault);
    let fault = match fault {
        Some(fault) => route.at_arrival(fault, conn).await?,
        None => None,
    };
    let env = envelope(json)?;
    shared.authorize(&env)?;
    Ok((env, fault))
}

/// `ClientToken`, `AccessToken` and `Client` of a request.
pub(super) struct Envelope<'a> {
    pub(super) client_token: String,
    pub(super) access_token: String,
    pub(super) map: &'a Map<String, Value>,
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

fn parse_uuid(value: Option<&Value>) -> Option<Uuid> {
    value
        .and_then(Value::as_str)
        .and_then(|s| Uuid::parse_str(s).ok())
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

/// `Limitation` of a getAll request: `Count` (1..=MAX_ITEMS) and the
/// optional `Cursor`, or the 400 Mews gives.
pub(super) fn limitation(map: &Map<String, Value>) -> Result<(usize, Option<Uuid>), Reply> {
    let Some(Value::Object(limitation)) = map.get("Limitation") else {
        return Err(Reply::bad_request("Invalid Limitation"));
    };
    let count = match limitation.get("Count").and_then(Value::as_u64) {
        Some(c) if (1..=super::MAX_ITEMS as u64).contains(&c) => c as usize,
        _ => return Err(Reply::bad_request("Invalid Limitation.Count")),
    };
    let cursor = match limitation.get("Cursor") {
        None | Some(Value::Null) => None,
        v => match parse_uuid(v) {
            Some(id) => Some(id),
            None => return Err(Reply::bad_request("Invalid Limitation.Cursor")),
        },
    };
    Ok((count, cursor))
}

/// One page of a getAll: the indexes of `items` that `keep` selects, newest
/// first (ties broken by reverse storage order, the key (created, index)
/// descending), after `cursor` and at most `count`; and the next page's
/// cursor (also on the last page when `cursor_on_last_page`). An unknown
/// cursor is Mews's 400.
pub(super) fn newest_first_page<T>(
    items: &[T],
    key: impl Fn(&T) -> (SystemTime, Uuid),
    keep: impl Fn(&T) -> bool,
    (count, cursor): (usize, Option<Uuid>),
    cursor_on_last_page: bool,
) -> Result<(Vec<usize>, Option<Uuid>), Reply> {
    let after = match cursor {
        None => None,
        Some(id) => match items.iter().position(|e| key(e).1 == id) {
            Some(i) => Some((key(&items[i]).0, i)),
            None => return Err(Reply::bad_request("Invalid Limitation.Cursor")),
        },
    };
    let mut found: Vec<(SystemTime, usize)> = items
        .iter()
        .enumerate()
        .filter(|(i, e)| keep(e) && after.is_none_or(|k| (key(e).0, *i) < k))
        .map(|(i, e)| (key(e).0, i))
        .collect();
    found.sort_unstable_by(|a, b| b.cmp(a));
    let more = found.len() > count;
    found.truncate(count);
    let next = if more || cursor_on_last_page {
        found.last().map(|&(_, i)| key(&items[i]).1)
    } else {
        None
    };
    Ok((found.into_iter().map(|(_, i)| i).collect(), next))
}
