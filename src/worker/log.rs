//! The log lines of each Mews request of the delivery loop: one per
//! `messages/add` and `messages/getAll`, and a warning when a 200 does not
//! match what was sent.

use crate::mews::{Outcome, ReadBack, Reply, ThreadReadBack, ThreadReply};
use crate::store::{ClaimedThread, RowOutcome};

use super::decide::Decision;

/// A 200 whose items do not match what was sent: say so once per request.
pub(super) fn warn_on_mismatch(
    account: &str,
    sent: usize,
    returned: usize,
    unlabelled: usize,
    decision: &Decision,
) {
    let delivered = decision
        .rows
        .iter()
        .filter(|(_, o)| matches!(o, RowOutcome::Delivered { .. }))
        .count();
    if delivered != sent || returned != delivered || unlabelled > 0 {
        tracing::warn!(
            account,
            sent,
            delivered,
            missing = sent.saturating_sub(delivered),
            never_sent = returned.saturating_sub(delivered),
            unlabelled,
            "Mews's 200 answer does not match the request: rows without an Id are retried, items for Identifiers never sent are ignored"
        );
    }
}

pub(super) fn log_reply(account: &str, batch: usize, reply: &Reply) {
    let duration_ms = u64::try_from(reply.elapsed.as_millis()).unwrap_or(u64::MAX);
    let request_id = reply.request_id.as_deref().unwrap_or("-");
    let status = reply.http_status;
    match &reply.outcome {
        Outcome::Accepted {
            by_identifier,
            unlabelled,
        } => tracing::info!(
            account,
            batch,
            outcome = "accepted",
            http_status = status,
            duration_ms,
            request_id,
            returned = by_identifier.len(),
            unlabelled,
            "messages/add"
        ),
        other => tracing::warn!(
            account, batch, outcome = other.name(), http_status = status, duration_ms,
            request_id, error = %other.error().unwrap_or_default(), "messages/add"
        ),
    }
}

pub(super) fn log_read_back(account: &str, threads: usize, back: &ReadBack) {
    let duration_ms = u64::try_from(back.elapsed.as_millis()).unwrap_or(u64::MAX);
    let request_id = back.request_id.as_deref().unwrap_or("-");
    let status = back.http_status.unwrap_or(0);
    match &back.page {
        Ok(page) => tracing::info!(
            account,
            threads,
            http_status = status,
            duration_ms,
            request_id,
            messages = page.messages.len(),
            "messages/getAll"
        ),
        Err(outcome) => tracing::warn!(
            account, threads, outcome = outcome.name(), http_status = status, duration_ms,
            request_id, error = %outcome.error().unwrap_or_default(), "messages/getAll"
        ),
    }
}

pub(super) fn log_thread_reply(account: &str, thread: &ClaimedThread, reply: &ThreadReply) {
    let duration_ms = u64::try_from(reply.elapsed.as_millis()).unwrap_or(u64::MAX);
    let request_id = reply.request_id.as_deref().unwrap_or("-");
    let status = reply.http_status;
    match &reply.outcome {
        Ok(created) => tracing::info!(
            account,
            thread = thread.id,
            outcome = "accepted",
            http_status = status,
            duration_ms,
            request_id,
            mews_thread_id = %created.id,
            "messageThreads/add"
        ),
        Err(other) => tracing::warn!(
            account, thread = thread.id, outcome = other.name(), http_status = status, duration_ms,
            request_id, error = %other.error().unwrap_or_default(), "messageThreads/add"
        ),
    }
}

pub(super) fn log_thread_read_back(account: &str, thread: &ClaimedThread, back: &ThreadReadBack) {
    let duration_ms = u64::try_from(back.elapsed.as_millis()).unwrap_or(u64::MAX);
    let request_id = back.request_id.as_deref().unwrap_or("-");
    let status = back.http_status.unwrap_or(0);
    match &back.page {
        Ok(page) => tracing::info!(
            account,
            thread = thread.id,
            http_status = status,
            duration_ms,
            request_id,
            threads = page.threads.len(),
            "messageThreads/getAll"
        ),
        Err(outcome) => tracing::warn!(
            account, thread = thread.id, outcome = outcome.name(), http_status = status, duration_ms,
            request_id, error = %outcome.error().unwrap_or_default(), "messageThreads/getAll"
        ),
    }
}
