//! `POST messageThreads/add` and `POST messageThreads/getAll`: the threads
//! a client created, kept per `AccessToken` (only those may get messages).

use std::collections::HashSet;
use std::time::Instant;

use axum::http::StatusCode;
use serde_json::{Map, Value, json};
use uuid::Uuid;

use super::super::connections::ConnHandle;
use super::super::reply::{Reply, status_or_500};
use super::super::state::{Shared, ThreadEntry};
use super::super::{
    FAKE_ENTERPRISE_ID, Fault, MAX_ITEMS, MAX_THREADS_GET_ALL_INTERVAL, RequestRecord, StoredThread,
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
/// Faults act as on `messages/add`: those acting at arrival before anything
/// is created; `DropAfterStore`, `StoreThenStatus`, `StoreThenDelay`,
/// `SlowStore` and `StoreThenStallBody` after the thread is created (a
/// client that gives up meanwhile never learns its Id; a read-back finds
/// it). `OmitIdentifiers` answers `200` without the thread (an empty
/// `MessageThreads`); `ExtraIdentifier` is ignored.
pub(super) async fn add(
    shared: &Shared,
    conn: &ConnHandle,
    json: Option<&Value>,
    record: &mut RequestRecord,
    arrived: Instant,
) -> Reply {
    let (env, after_store) = match open(Route::ThreadsAdd, shared, conn, json, record).await {
        Ok(opened) => opened,
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
    // MessageThreadAddParameters: additionalProperties: false.
    const KNOWN: [&str; 5] = [
        "ClientToken",
        "AccessToken",
        "Client",
        "OriginalSender",
        "Subject",
    ];
    if let Some(unknown) = env.map.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return Reply::bad_request(format!(
            "Invalid {unknown}: not a parameter of messageThreads/add"
        ));
    }
    if let Some(Fault::SlowStore { store_after, .. }) = &after_store {
        tokio::time::sleep_until((arrived + *store_after).into()).await;
    }
    let thread = shared.add_thread(&env.access_token, Uuid::new_v4(), &sender, &subject);
    record.stored_ids = vec![thread.id];
    let mut threads = vec![thread_json(&thread)];
    match after_store {
        Some(Fault::DropAfterStore) => {
            conn.drop_connection();
            return Reply::Dropped;
        }
        Some(Fault::StoreThenStatus(code)) => {
            return Reply::error(
                status_or_500(code),
                "Unexpected error (scripted after creating the thread)",
            );
        }
        Some(Fault::StoreThenDelay(delay)) => tokio::time::sleep(delay).await,
        Some(Fault::SlowStore { answer_after, .. }) => match answer_after {
            Some(after) => tokio::time::sleep_until((arrived + after).into()).await,
            None => std::future::pending().await,
        },
        Some(Fault::OmitIdentifiers(_)) => threads.clear(),
        _ => {}
    }
    let body = json!({"MessageThreads": threads});
    if let Some(Fault::StoreThenStallBody(stall)) = after_store {
        let body = body.to_string();
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
    Reply::Json(StatusCode::OK, body)
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
