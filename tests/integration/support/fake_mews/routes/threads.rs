//! `POST messageThreads/add` and `POST messageThreads/getAll`: the threads
//! a client created, kept per `AccessToken` (only those may get messages).

use std::collections::HashSet;

use axum::http::StatusCode;
use serde_json::{Map, Value, json};
use uuid::Uuid;

use super::super::connections::ConnHandle;
use super::super::reply::Reply;
use super::super::state::{Shared, ThreadEntry};
use super::super::{
    FAKE_ENTERPRISE_ID, MAX_ITEMS, MAX_THREADS_GET_ALL_INTERVAL, RequestRecord, StoredThread,
};
use super::get_all::TimeFilter;
use super::{Route, limitation, newest_first_page, open, parse_uuid};

fn thread_json(t: &StoredThread) -> Value {
    json!({
        "Id": t.id,
        "OriginalSender": t.original_sender,
        "Subject": t.subject,
        "CreatedUtc": t.created_utc,
        // The fake never changes a thread.
        "UpdatedUtc": t.created_utc,
        "IsResolved": false,
    })
}

/// A required string of at least one character (`minLength: 1`).
fn required_text(map: &Map<String, Value>, key: &str) -> Result<String, Reply> {
    match map.get(key) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        _ => Err(Reply::bad_request(format!("Invalid {key}"))),
    }
}

/// An optional array of 1 to [`MAX_ITEMS`] uuids (`None` when absent or
/// null).
fn uuid_list(map: &Map<String, Value>, key: &str) -> Result<Option<HashSet<Uuid>>, Reply> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(ids)) if (1..=MAX_ITEMS).contains(&ids.len()) => ids
            .iter()
            .map(|v| parse_uuid(Some(v)))
            .collect::<Option<HashSet<Uuid>>>()
            .map(Some)
            .ok_or_else(|| Reply::bad_request(format!("Invalid {key}"))),
        Some(_) => Err(Reply::bad_request(format!("Invalid {key}"))),
    }
}

/// `POST messageThreads/add`: `OriginalSender` and `Subject` (both
/// required, non-empty) make a thread owned by the request's `AccessToken`.
///
/// Faults other than those acting at arrival are consumed and ignored.
pub(super) async fn add(
    shared: &Shared,
    conn: &ConnHandle,
    json: Option<&Value>,
    record: &mut RequestRecord,
) -> Reply {
    let env = match open(Route::ThreadsAdd, shared, conn, json, record).await {
        Ok((env, _ignored)) => env,
        Err(reply) => return reply,
    };
    let sender = match required_text(env.map, "OriginalSender") {
        Ok(s) => s,
        Err(reply) => return reply,
    };
    let subject = match required_text(env.map, "Subject") {
        Ok(s) => s,
        Err(reply) => return reply,
    };
    let thread = shared.add_thread(&env.access_token, Uuid::new_v4(), &sender, &subject);
    record.stored_ids = vec![thread.id];
    Reply::Json(
        StatusCode::OK,
        json!({"MessageThreads": [thread_json(&thread)]}),
    )
}

/// `POST messageThreads/getAll`: the threads created with the request's
/// `AccessToken`, newest first, paged by `Limitation.Cursor`, filtered by
/// `MessageThreadIds`, `CreatedUtc`, `UpdatedUtc` (at least one of them)
/// and `EnterpriseIds`.
///
/// Faults other than those acting at arrival are consumed and ignored.
pub(super) async fn get_all(
    shared: &Shared,
    conn: &ConnHandle,
    json: Option<&Value>,
    record: &mut RequestRecord,
) -> Reply {
    let env = match open(Route::ThreadsGetAll, shared, conn, json, record).await {
        Ok((env, _ignored)) => env,
        Err(reply) => return reply,
    };
    let ids = match uuid_list(env.map, "MessageThreadIds") {
        Ok(ids) => ids,
        Err(reply) => return reply,
    };
    let enterprises = match uuid_list(env.map, "EnterpriseIds") {
        Ok(e) => e,
        Err(reply) => return reply,
    };
    let interval = |key: &str| {
        TimeFilter::parse(
            env.map.get(key),
            MAX_THREADS_GET_ALL_INTERVAL,
            "three months",
        )
    };
    let created = match interval("CreatedUtc") {
        Ok(f) => f,
        Err(reply) => return reply,
    };
    let updated = match interval("UpdatedUtc") {
        Ok(f) => f,
        Err(reply) => return reply,
    };
    if ids.is_none() && created.is_none() && updated.is_none() {
        return Reply::bad_request(
            "Invalid filter: one of MessageThreadIds, CreatedUtc, UpdatedUtc is required",
        );
    }
    let page = match limitation(env.map) {
        Ok(page) => page,
        Err(reply) => return reply,
    };
    // The fake is one enterprise: a filter without it matches nothing.
    let ours = enterprises.is_none_or(|e| {
        e.iter()
            .any(|id| id.to_string().eq_ignore_ascii_case(FAKE_ENTERPRISE_ID))
    });

    let st = shared.state();
    let keep = |e: &ThreadEntry| {
        ours && e.thread.access_token == env.access_token
            && ids.as_ref().is_none_or(|ids| ids.contains(&e.thread.id))
            && created.as_ref().is_none_or(|f| f.matches(e.created))
            && updated.as_ref().is_none_or(|f| f.matches(e.created))
    };
    let (found, next_cursor) = match newest_first_page(
        &st.threads,
        |e| (e.created, e.thread.id),
        keep,
        page,
        st.opts.cursor_on_last_page,
    ) {
        Ok(found) => found,
        Err(reply) => return reply,
    };
    let threads: Vec<Value> = found
        .iter()
        .map(|&i| thread_json(&st.threads[i].thread))
        .collect();
    Reply::Json(
        StatusCode::OK,
        json!({"MessageThreads": threads, "Cursor": next_cursor}),
    )
}
