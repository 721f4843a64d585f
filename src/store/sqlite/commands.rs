//! The operator's commands: `enqueue`, `status`, `dead list|requeue|purge`.

use std::time::SystemTime;

use sqlx::Row;

use super::SqliteStore;
use crate::store::report::{self, StatusReport};
use crate::store::{
    AccountStatus, DeadRow, DeadThread, Enqueued, NewMessage, NewThread, OperatorStore, Outbox,
    Requeue, StoreError, timestamp,
};

/// Most common dead-row errors shown per account by `status`.
const DEAD_ERRORS_SHOWN: i64 = 3;

impl OperatorStore for SqliteStore {
    /// Dead rows, oldest first, of one account or all.
    async fn dead_rows(&self, account: Option<&str>) -> Result<Vec<DeadRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, account, coalesce(message_thread_id, keyed_thread_id) AS message_thread_id,
                    thread_key, CAST(text AS BLOB) AS text, attempts, last_error, created_at,
                    dead_at
             FROM outbox WHERE status = 'dead' AND (?1 IS NULL OR account = ?1)
             ORDER BY id",
        )
        .bind(account)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|row| {
                Ok(DeadRow {
                    id: row.try_get("id")?,
                    account: row.try_get("account")?,
                    message_thread_id: row.try_get("message_thread_id")?,
                    thread_key: row.try_get("thread_key")?,
                    text: String::from_utf8_lossy(&row.try_get::<Vec<u8>, _>("text")?).into_owned(),
                    attempts: u32::try_from(row.try_get::<i64, _>("attempts")?).unwrap_or(0),
                    last_error: row.try_get("last_error")?,
                    created_at: row.try_get("created_at")?,
                    dead_at: row.try_get("dead_at")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::from)
    }

    /// Puts dead rows back to `pending`, due now, with their attempts reset
    /// and `last_error` saying so. A keyed row still without its thread's
    /// id (its thread was purged) takes it when that key's thread is
    /// created by now; else it waits for it. Named rows that are not all dead (or not
    /// of `account`) are refused as a whole. Returns the ids requeued.
    async fn requeue_dead(
        &self,
        which: &Requeue,
        account: Option<&str>,
        now: SystemTime,
    ) -> Result<Vec<i64>, StoreError> {
        let ids = match which {
            Requeue::Ids(ids) => Some(serde_json::to_string(ids).unwrap_or_else(|_| "[]".into())),
            Requeue::All => None,
        };
        let mut tx = self.writer.begin().await?;
        // The write comes first, so the transaction takes the write lock at
        // once (waiting up to busy_timeout) instead of failing to upgrade.
        let mut requeued: Vec<i64> = sqlx::query_scalar(
            "UPDATE outbox SET status = 'pending', attempts = 0, next_attempt_at = ?1,
                 dead_at = NULL,
                 keyed_thread_id = coalesce(keyed_thread_id,
                     (SELECT t.mews_thread_id FROM outbox_threads AS t
                      WHERE t.account = outbox.account AND t.thread_key = outbox.thread_key
                        AND t.status = 'created')),
                 last_error = 'requeued by an operator at ' || ?1 || coalesce('; was: ' || last_error, '')
             WHERE status = 'dead'
               AND (?2 IS NULL OR id IN (SELECT value FROM json_each(?2)))
               AND (?3 IS NULL OR account = ?3)
             RETURNING id",
        )
        .bind(timestamp(now))
        .bind(&ids)
        .bind(account)
        .fetch_all(&mut *tx)
        .await?;
        requeued.sort_unstable();
        if let Requeue::Ids(wanted) = which {
            let missing: Vec<i64> = wanted
                .iter()
                .copied()
                .filter(|id| requeued.binary_search(id).is_err())
                .collect();
            if !missing.is_empty() {
                let mut problems = Vec::with_capacity(missing.len());
                for id in missing {
                    let found = sqlx::query("SELECT status, account FROM outbox WHERE id = ?1")
                        .bind(id)
                        .fetch_optional(&mut *tx)
                        .await?;
                    let found = match found {
                        Some(row) => Some((row.try_get("status")?, row.try_get("account")?)),
                        None => None,
                    };
                    problems.push(report::not_requeued(id, found, account));
                }
                tx.rollback().await?;
                return Err(StoreError::NotDead(problems.join("; ")));
            }
        }
        tx.commit().await?;
        Ok(requeued)
    }

    /// Deletes dead rows that died before `cutoff` (of `account`, or all).
    /// Returns how many.
    async fn purge_dead(
        &self,
        cutoff: SystemTime,
        account: Option<&str>,
    ) -> Result<u64, StoreError> {
        let done = sqlx::query(
            "DELETE FROM outbox
             WHERE status = 'dead' AND coalesce(dead_at, created_at) < ?1
               AND (?2 IS NULL OR account = ?2)",
        )
        .bind(timestamp(cutoff))
        .bind(account)
        .execute(&self.writer)
        .await?;
        Ok(done.rows_affected())
    }

    /// Inserts one message the way a producer would.
    async fn enqueue(
        &self,
        message: &NewMessage,
        new_thread: Option<&NewThread>,
    ) -> Result<Enqueued, StoreError> {
        SqliteStore::enqueue_with_thread(self, message, new_thread).await
    }

    /// Counts, ages and pauses per account (every account with rows or a pause).
    async fn status(&self, now: SystemTime) -> Result<Vec<AccountStatus>, StoreError> {
        let mut report = StatusReport::default();
        let counts = sqlx::query(
            "SELECT account, status, count(*) AS n FROM outbox GROUP BY account, status",
        )
        .fetch_all(&self.pool)
        .await?;
        for row in counts {
            report.count(
                row.try_get("account")?,
                row.try_get("status")?,
                row.try_get("n")?,
            );
        }
        let pending = sqlx::query(
            "SELECT account,
                    min(created_at) AS oldest,
                    min(CASE WHEN next_attempt_at > ?1 THEN next_attempt_at END) AS next_retry
             FROM outbox WHERE status = 'pending' GROUP BY account",
        )
        .bind(timestamp(now))
        .fetch_all(&self.pool)
        .await?;
        for row in pending {
            report.pending(
                row.try_get("account")?,
                row.try_get("oldest")?,
                row.try_get("next_retry")?,
            );
        }
        let errors = sqlx::query(
            "SELECT account, last_error FROM (
                 SELECT account, last_error,
                        row_number() OVER (PARTITION BY account ORDER BY id DESC) AS newest
                 FROM outbox
                 WHERE status IN ('pending', 'dead') AND last_error IS NOT NULL)
             WHERE newest = 1",
        )
        .fetch_all(&self.pool)
        .await?;
        for row in errors {
            report.last_error(row.try_get("account")?, row.try_get("last_error")?);
        }
        // `error` is last_error without its " (RequestId …)" part, so that
        // equal errors group: the SQL twin of `mews::without_request_id`.
        let dead_errors = sqlx::query(
            "SELECT account, error, n FROM (
                 SELECT account, error, count(*) AS n,
                        row_number() OVER (PARTITION BY account ORDER BY count(*) DESC, error) AS rank
                 FROM (SELECT account,
                              CASE WHEN p = 0 THEN last_error
                                   ELSE substr(last_error, 1, p - 1)
                                        || substr(last_error, p + instr(substr(last_error, p), ')'))
                              END AS error
                       FROM (SELECT account, last_error, instr(last_error, ' (RequestId ') AS p
                             FROM outbox WHERE status = 'dead' AND last_error IS NOT NULL))
                 GROUP BY account, error)
             WHERE rank <= ?1
             ORDER BY account, n DESC, error",
        )
        .bind(DEAD_ERRORS_SHOWN)
        .fetch_all(&self.pool)
        .await?;
        for row in dead_errors {
            report.dead_error(
                row.try_get("account")?,
                row.try_get("error")?,
                row.try_get("n")?,
            );
        }
        let threads = sqlx::query(
            "SELECT account, status, count(*) AS n FROM outbox_threads GROUP BY account, status",
        )
        .fetch_all(&self.pool)
        .await?;
        for row in threads {
            report::thread_count(
                report.threads(row.try_get("account")?),
                row.try_get("status")?,
                row.try_get("n")?,
            );
        }
        for (account, n) in self.messages_waiting().await? {
            report.threads(account).messages_waiting = n;
        }
        report.pauses(self.pauses().await?, now);
        Ok(report.finish())
    }

    async fn dead_threads(&self, account: Option<&str>) -> Result<Vec<DeadThread>, StoreError> {
        SqliteStore::dead_threads(self, account).await
    }

    async fn requeue_dead_threads(
        &self,
        which: &Requeue,
        account: Option<&str>,
        now: SystemTime,
    ) -> Result<Vec<i64>, StoreError> {
        SqliteStore::requeue_dead_threads(self, which, account, now).await
    }

    async fn purge_dead_threads(
        &self,
        cutoff: SystemTime,
        account: Option<&str>,
    ) -> Result<u64, StoreError> {
        SqliteStore::purge_dead_threads(self, cutoff, account).await
    }
}

/// SQLITE_CONSTRAINT_TRIGGER: a trigger's RAISE(ABORT, ...), which is how
/// the producer contract (migration `..06_producer_contract`) refuses a row.
const SQLITE_CONSTRAINT_TRIGGER: &str = "1811";

/// A CHECK, UNIQUE, NOT NULL or producer-contract failure is the producer's
/// input being refused.
pub(super) fn refused(e: sqlx::Error) -> StoreError {
    match &e {
        sqlx::Error::Database(db)
            if matches!(
                db.kind(),
                sqlx::error::ErrorKind::CheckViolation
                    | sqlx::error::ErrorKind::NotNullViolation
                    | sqlx::error::ErrorKind::UniqueViolation
            ) || db.code().as_deref() == Some(SQLITE_CONSTRAINT_TRIGGER) =>
        {
            StoreError::Refused(db.message().to_owned())
        }
        _ => StoreError::Database(e),
    }
}
