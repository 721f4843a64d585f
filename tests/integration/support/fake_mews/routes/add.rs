//! `POST messages/add`: validation like Mews's, storing, and the faults that
//! apply after the messages are stored.

use std::collections::HashSet;
use std::time::Instant;

use axum::http::StatusCode;
use serde_json::{Map, Value, json};
use uuid::Uuid;

use super::super::connections::ConnHandle;
use super::super::records::NewMessage;
use super::super::reply::{Reply, status_or_500};
use super::super::state::Shared;
use super::super::{Fault, MAX_ITEMS, RequestRecord, StoredMessage};
use super::{Route, message_json, open, parse_uuid};

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

/// At most this many characters of the poisoned text go into the error.
const POISON_PREFIX_CHARS: usize = 40;

/// `POST messages/add`.
pub(super) async fn add(
    shared: &Shared,
    conn: &ConnHandle,
    json: Option<&Value>,
    record: &mut RequestRecord,
    stored_out: &mut Vec<StoredMessage>,
    arrived: Instant,
) -> Reply {
    let (env, after_store) = match open(Route::Add, shared, conn, json, record).await {
        Ok(opened) => opened,
        Err(reply) => return reply,
    };
    let messages = match parse_messages(env.map) {
        Ok(messages) => messages,
        Err(reply) => return reply,
    };
    let opts = shared.opts();
    // Mews adds only to threads this client created, and judges the
    // request as a whole: one foreign thread refuses every message.
    if opts.enforce_thread_ownership
        && let Some(foreign) =
            shared.foreign_thread(&env.access_token, messages.iter().map(|m| m.thread))
    {
        return Reply::error(
            StatusCode::FORBIDDEN,
            format!("Message thread {foreign} was not created by this client"),
        );
    }
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
