//! `POST messages/getAll`: the read-back, newest first, paged by cursor and
//! filtered by thread, `CreatedUtc` and token.

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use axum::http::StatusCode;
use serde_json::{Value, json};
use uuid::Uuid;

use super::super::connections::ConnHandle;
use super::super::reply::Reply;
use super::super::state::{Shared, StoredEntry};
use super::super::{MAX_GET_ALL_INTERVAL, MAX_ITEMS, RequestRecord};
use super::{Route, limitation, message_json, newest_first_page, open, parse_uuid};

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
pub(super) struct TimeFilter {
    start: Option<SystemTime>,
    end: Option<SystemTime>,
}

impl TimeFilter {
    /// Parses the filter; an interval longer than `max` (`max_text` in the
    /// error) is refused.
    pub(super) fn parse(
        value: Option<&Value>,
        max: Duration,
        max_text: &str,
    ) -> Result<Option<TimeFilter>, Reply> {
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
                Ok(d) if d > max => {
                    return Err(Reply::bad_request(format!(
                        "Invalid CreatedUtc: the interval is longer than {max_text}"
                    )));
                }
                Ok(_) => {}
            }
        }
        Ok(Some(TimeFilter { start, end }))
    }

    pub(super) fn matches(&self, t: SystemTime) -> bool {
        match (self.start, self.end) {
            (Some(s), Some(e)) if s == e => t == s,
            (s, e) => s.is_none_or(|s| t >= s) && e.is_none_or(|e| t < e),
        }
    }
}

/// `POST messages/getAll`.
///
/// Faults other than those acting at arrival mean nothing here: they are
/// consumed and ignored.
pub(super) async fn get_all(
    shared: &Shared,
    conn: &ConnHandle,
    json: Option<&Value>,
    record: &mut RequestRecord,
) -> Reply {
    let env = match open(Route::GetAll, shared, conn, json, record).await {
        Ok((env, _ignored)) => env,
        Err(reply) => return reply,
    };
    let threads: HashSet<Uuid> = match env.map.get("MessageThreadIds") {
        Some(Value::Array(ids)) if (1..=MAX_ITEMS).contains(&ids.len()) => {
            match ids.iter().map(|v| parse_uuid(Some(v))).collect() {
                Some(threads) => threads,
                None => return Reply::bad_request("Invalid MessageThreadIds"),
            }
        }
        _ => return Reply::bad_request("Invalid MessageThreadIds"),
    };
    let filter =
        match TimeFilter::parse(env.map.get("CreatedUtc"), MAX_GET_ALL_INTERVAL, "one month") {
            Ok(filter) => filter,
            Err(reply) => return reply,
        };
    let page = match limitation(env.map) {
        Ok(page) => page,
        Err(reply) => return reply,
    };

    let st = shared.state();
    let keep = |e: &StoredEntry| {
        e.msg.access_token == env.access_token
            && threads.contains(&e.msg.message_thread_id)
            && filter.as_ref().is_none_or(|f| f.matches(e.created))
    };
    let (found, next_cursor) = match newest_first_page(
        &st.stored,
        |e| (e.created, e.msg.id),
        keep,
        page,
        st.opts.cursor_on_last_page,
    ) {
        Ok(found) => found,
        Err(reply) => return reply,
    };
    let messages: Vec<Value> = found
        .iter()
        .map(|&i| message_json(&st.stored[i].msg, st.opts.sender_as_string))
        .collect();
    Reply::Json(
        StatusCode::OK,
        json!({"Messages": messages, "Cursor": next_cursor}),
    )
}
