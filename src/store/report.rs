//! Folding the rows of the status and queue queries into what `status`, the
//! heartbeat and `STATUS=` show, and why `dead requeue` refuses a row. The same for every store: the queries
//! (per store, in its dialect) give the values, these functions fold them.

use std::collections::BTreeMap;
use std::time::SystemTime;

use super::{
    AccountPause, AccountStatus, ErrorCount, QueueSummary, Status, StoreError, ThreadCounts,
    ThreadStatus, timestamp,
};

/// A count column as the reports show it (a negative count, which no query
/// gives, as 0).
fn count(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

/// The `status` report, account by account (every account with rows or a
/// pause), filled from the queries' rows.
#[derive(Default)]
pub(crate) struct StatusReport {
    accounts: BTreeMap<String, AccountStatus>,
}

impl StatusReport {
    fn entry(&mut self, account: String) -> &mut AccountStatus {
        self.accounts
            .entry(account.clone())
            .or_insert_with(|| AccountStatus {
                account,
                ..AccountStatus::default()
            })
    }

    /// `n` rows of `account` are `status`.
    pub(crate) fn count(&mut self, account: String, status: &str, n: i64) {
        let a = self.entry(account);
        let n = count(n);
        match Status::parse(status) {
            Some(Status::Pending) => a.pending = n,
            Some(Status::Sending) => a.sending = n,
            Some(Status::Delivered) => a.delivered = n,
            Some(Status::Dead) => a.dead = n,
            None => {}
        }
    }

    /// The oldest pending row's `created_at` and the next retry after now.
    pub(crate) fn pending(
        &mut self,
        account: String,
        oldest: Option<String>,
        next_retry: Option<String>,
    ) {
        let a = self.entry(account);
        a.oldest_pending_created_at = oldest;
        a.next_retry_at = next_retry;
    }

    /// The newest `last_error` of a pending or dead row.
    pub(crate) fn last_error(&mut self, account: String, error: Option<String>) {
        self.entry(account).last_error = error;
    }

    /// One of the most common errors among the account's dead rows, given
    /// most common first.
    pub(crate) fn dead_error(&mut self, account: String, error: String, rows: i64) {
        self.entry(account).dead_errors.push(ErrorCount {
            error,
            rows: count(rows),
        });
    }

    /// The pauses still running at `now`.
    pub(crate) fn pauses(&mut self, pauses: Vec<AccountPause>, now: SystemTime) {
        for pause in pauses {
            if pause.until > now {
                let a = self.entry(pause.account);
                a.paused_until = Some(timestamp(pause.until));
                a.pause_reason = Some(pause.reason);
            }
        }
    }

    /// The thread counts of `account` (which then appears in the report).
    pub(crate) fn threads(&mut self, account: String) -> &mut ThreadCounts {
        &mut self.entry(account).threads
    }

    pub(crate) fn finish(self) -> Vec<AccountStatus> {
        self.accounts.into_values().collect()
    }
}

/// Adds to `summary` that `n` rows of `account` are `status`; `oldest` is the
/// oldest pending row's `created_at` (read for `pending` only).
pub(crate) fn queue_count(
    summary: &mut QueueSummary,
    account: String,
    status: &str,
    n: i64,
    oldest: Option<SystemTime>,
) {
    let entry = summary.accounts.entry(account).or_default();
    let n = count(n);
    match Status::parse(status) {
        Some(Status::Pending) => {
            entry.pending = n;
            entry.oldest_pending = oldest;
        }
        Some(Status::Sending) => entry.sending = n,
        Some(Status::Dead) => entry.dead = n,
        Some(Status::Delivered) | None => {}
    }
}

/// Sets in `counts` that `n` threads are `status` (status and queue summary).
pub(crate) fn thread_count(counts: &mut ThreadCounts, status: &str, n: i64) {
    let n = count(n);
    match ThreadStatus::parse(status) {
        Some(ThreadStatus::Pending) => counts.pending = n,
        Some(ThreadStatus::Creating) => counts.creating = n,
        Some(ThreadStatus::Created) => counts.created = n,
        Some(ThreadStatus::Dead) => counts.dead = n,
        None => {}
    }
}

/// Rows of `account` and `n` columns as (account, count) pairs.
pub(crate) fn account_counts<R>(rows: Vec<R>) -> Result<Vec<(String, u64)>, StoreError>
where
    R: sqlx::Row,
    &'static str: sqlx::ColumnIndex<R>,
    String: for<'r> sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    i64: for<'r> sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    rows.into_iter()
        .map(|row| Ok((row.try_get("account")?, count(row.try_get("n")?))))
        .collect()
}

/// Why `dead requeue` refuses row `id`: `found` is its status and account
/// when it exists; `account` the account the command was limited to.
pub(crate) fn not_requeued(
    id: i64,
    found: Option<(String, String)>,
    account: Option<&str>,
) -> String {
    match found {
        None => format!("row {id} does not exist"),
        Some((status, owner)) => match account {
            Some(a) if Status::parse(&status) == Some(Status::Dead) && owner != a => {
                format!("row {id} belongs to account {owner}, not {a}")
            }
            _ => format!("row {id} is {status}, not dead"),
        },
    }
}
