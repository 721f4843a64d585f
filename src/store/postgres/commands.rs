//! The operator's commands on the PostgreSQL store, with the signatures of
//! the SQLite store's: `status`, `dead list`, `dead requeue`, `dead purge`.
//! They are not conditioned on leases: they touch only `dead` rows (and
//! read), never a row in flight; a requeued row is claimed by its
//! account's owner like a new one.

use std::time::SystemTime;

use sqlx::Row;

use super::PgStore;
use crate::store::report::{self, StatusReport};
use crate::store::{AccountStatus, DeadRow, Outbox, Requeue, StoreError, timestamp};

/// A time column as the SQLite store shows it: `2026-11-28T07:21:07.123Z`.
macro_rules! ts {
    ($col:literal) => {
        concat!(
            "to_char(",
            $col,
            " AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')"
        )
    };
}

/// Most common dead-row errors shown per account by `status`.
const DEAD_ERRORS_SHOWN: i64 = 3;

impl PgStore {
    /// Dead rows, oldest first, of one account or all.
    pub async fn dead_rows(&self, account: Option<&str>) -> Result<Vec<DeadRow>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT id, account, coalesce(message_thread_id, keyed_thread_id) AS message_thread_id,
                    thread_key, text, attempts, last_error, ",
            ts!("created_at"),
            " AS created_at, ",
            ts!("dead_at"),
            " AS dead_at
             FROM outbox WHERE status = 'dead' AND ($1::text IS NULL OR account = $1)
             ORDER BY id"
        ))
        .bind(account)
        .fetch_all(self.pool())
        .await?;
        rows.into_iter()
            .map(|row| {
                Ok(DeadRow {
                    id: row.try_get("id")?,
                    account: row.try_get("account")?,
                    message_thread_id: row.try_get("message_thread_id")?,
                    thread_key: row.try_get("thread_key")?,
                    text: row.try_get("text")?,
                    attempts: u32::try_from(row.try_get::<i32, _>("attempts")?).unwrap_or(0),
                    last_error: row.try_get("last_error")?,
                    created_at: row.try_get("created_at")?,
                    dead_at: row.try_get("dead_at")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::from)
    }

    /// Puts dead rows back to `pending`, due now, attempts reset and
    /// `last_error` saying so. Named rows that are not all dead (or not of
    /// `account`) are refused as a whole. Returns the ids requeued.
    pub async fn requeue_dead(
        &self,
        which: &Requeue,
        account: Option<&str>,
        now: SystemTime,
    ) -> Result<Vec<i64>, StoreError> {
        let ids: Option<Vec<i64>> = match which {
            Requeue::Ids(ids) => Some(ids.clone()),
            Requeue::All => None,
        };
        let now = timestamp(now);
        let mut tx = self.pool().begin().await?;
        let mut requeued: Vec<i64> = sqlx::query_scalar(
            "UPDATE outbox SET status = 'pending', attempts = 0, next_attempt_at = $1::timestamptz,
                 dead_at = NULL,
                 last_error = 'requeued by an operator at ' || $1 || coalesce('; was: ' || last_error, '')
             WHERE status = 'dead'
               AND ($2::bigint[] IS NULL OR id = ANY($2::bigint[]))
               AND ($3::text IS NULL OR account = $3)
             RETURNING id",
        )
        .bind(&now)
        .bind(&ids)
        .bind(account)
        .fetch_all(&mut *tx)
        .await?;
        requeued.sort_unstable();
        if let Requeue::Ids(wanted) = which {
            let mut problems = Vec::new();
            for &id in wanted {
                if requeued.binary_search(&id).is_ok() {
                    continue;
                }
                let found = sqlx::query("SELECT status, account FROM outbox WHERE id = $1")
                    .bind(id)
                    .fetch_optional(&mut *tx)
                    .await?;
                let found = match found {
                    Some(row) => Some((row.try_get("status")?, row.try_get("account")?)),
                    None => None,
                };
                problems.push(report::not_requeued(id, found, account));
            }
            if !problems.is_empty() {
                tx.rollback().await?;
                return Err(StoreError::NotDead(problems.join("; ")));
            }
        }
        tx.commit().await?;
        Ok(requeued)
    }

    /// Deletes dead rows that died before `cutoff` (of `account`, or all).
    pub async fn purge_dead(
        &self,
        cutoff: SystemTime,
        account: Option<&str>,
    ) -> Result<u64, StoreError> {
        let done = sqlx::query(
            "DELETE FROM outbox
             WHERE status = 'dead' AND coalesce(dead_at, created_at) < $1::timestamptz
               AND ($2::text IS NULL OR account = $2)",
        )
        .bind(timestamp(cutoff))
        .bind(account)
        .execute(self.pool())
        .await?;
        Ok(done.rows_affected())
    }

    /// Counts, ages and pauses per account (every account with rows, threads
    /// or a pause), with its threads by status.
    pub async fn status(&self, now: SystemTime) -> Result<Vec<AccountStatus>, StoreError> {
        let mut report = StatusReport::default();
        let counts = sqlx::query(
            "SELECT account, status, count(*) AS n FROM outbox GROUP BY account, status",
        )
        .fetch_all(self.pool())
        .await?;
        for row in counts {
            report.count(
                row.try_get("account")?,
                row.try_get("status")?,
                row.try_get("n")?,
            );
        }
        let pending = sqlx::query(concat!(
            "SELECT account, ",
            ts!("min(created_at)"),
            " AS oldest, ",
            ts!("min(CASE WHEN next_attempt_at > $1::timestamptz THEN next_attempt_at END)"),
            " AS next_retry
             FROM outbox WHERE status = 'pending' GROUP BY account"
        ))
        .bind(timestamp(now))
        .fetch_all(self.pool())
        .await?;
        for row in pending {
            report.pending(
                row.try_get("account")?,
                row.try_get("oldest")?,
                row.try_get("next_retry")?,
            );
        }
        let errors = sqlx::query(
            "SELECT DISTINCT ON (account) account, last_error FROM outbox
             WHERE status IN ('pending', 'dead') AND last_error IS NOT NULL
             ORDER BY account, id DESC",
        )
        .fetch_all(self.pool())
        .await?;
        for row in errors {
            report.last_error(row.try_get("account")?, row.try_get("last_error")?);
        }
        // `error` is last_error without its " (RequestId …)" part, so that
        // equal errors group (the SQL twin of `mews::without_request_id`).
        let dead_errors = sqlx::query(
            "SELECT account, error, n FROM (
                 SELECT account, error, count(*) AS n,
                        row_number() OVER (PARTITION BY account ORDER BY count(*) DESC, error) AS rank
                 FROM (SELECT account,
                              CASE WHEN p = 0 THEN last_error
                                   ELSE substr(last_error, 1, p - 1)
                                        || substr(last_error, p + strpos(substr(last_error, p), ')'))
                              END AS error
                       FROM (SELECT account, last_error, strpos(last_error, ' (RequestId ') AS p
                             FROM outbox WHERE status = 'dead' AND last_error IS NOT NULL) AS d) AS e
                 GROUP BY account, error) AS r
             WHERE rank <= $1
             ORDER BY account, n DESC, error",
        )
        .bind(DEAD_ERRORS_SHOWN)
        .fetch_all(self.pool())
        .await?;
        for row in dead_errors {
            report.dead_error(
                row.try_get("account")?,
                row.try_get("error")?,
                row.try_get("n")?,
            );
        }
        report.pauses(self.pauses().await?, now);
        self.add_thread_status(report.finish()).await
    }
}
