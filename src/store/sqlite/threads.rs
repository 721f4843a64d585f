//! Threads through the outbox (`outbox_threads`, see [`crate::store::thread`]):
//! this store's statements. The schema and the triggers that keep keyed
//! rows in their thread's order are in migration `..07_threads`.
//!
//! A keyed `outbox` row is *waiting* while it is `pending` with a
//! `thread_key` and no `keyed_thread_id`: it has no thread head, so it is
//! never claimed and blocks nothing. [`SqliteStore::record_thread`] with
//! `Created` gives every waiting row of the key the Mews id in the same
//! transaction; the `outbox_thread_head_resolved` trigger then places each
//! in its thread.

use std::collections::HashSet;
use std::time::SystemTime;

use sqlx::Row;

use super::commands::refused;
use super::{SqliteStore, sql};
use crate::store::report;
use crate::store::thread::{HELD_BY_THREAD_PREFIX, held_by_thread, no_such_thread, thread_purged};
use crate::store::{
    ClaimedThread, DeadThread, Enqueued, NewMessage, NewThread, Requeue, StoreError, ThreadOutcome,
    ThreadRef, parse_timestamp, timestamp,
};

/// The waiting rows of thread key `?2` of account `?1` (through
/// `outbox_waiting_for_thread`), as a condition on `outbox`.
const WAITING: &str = "outbox.account = ?1 AND outbox.thread_key = ?2
      AND outbox.thread_key IS NOT NULL AND outbox.keyed_thread_id IS NULL
      AND outbox.status = 'pending'";

fn decode_claimed(row: &sqlx::sqlite::SqliteRow) -> Result<ClaimedThread, sqlx::Error> {
    Ok(ClaimedThread {
        id: row.try_get("id")?,
        thread_key: row.try_get("thread_key")?,
        subject: row.try_get("subject")?,
        original_sender: row.try_get("original_sender")?,
        attempts: u32::try_from(row.try_get::<i64, _>("attempts")?).unwrap_or(0),
        needs_reconcile: row.try_get::<i64, _>("needs_reconcile")? != 0,
        first_sent_at: row
            .try_get::<Option<String>, _>("first_sent_at")?
            .as_deref()
            .and_then(parse_timestamp),
    })
}

/// Why `dead requeue --thread` refuses thread `id`: `found` is its status
/// and account when it exists; `account` the account the command was
/// limited to.
fn thread_not_requeued(id: i64, found: Option<(String, String)>, account: Option<&str>) -> String {
    match found {
        None => format!("thread {id} does not exist"),
        Some((status, owner)) => match account {
            Some(a) if status == "dead" && owner != a => {
                format!("thread {id} belongs to account {owner}, not {a}")
            }
            _ => format!("thread {id} is {status}, not dead"),
        },
    }
}

impl SqliteStore {
    pub async fn claim_thread(
        &self,
        account: &str,
        now: SystemTime,
    ) -> Result<Option<ClaimedThread>, StoreError> {
        let row = sqlx::query(sql::CLAIM_THREAD)
            .bind(account)
            .bind(timestamp(now))
            .fetch_optional(self.writer())
            .await?;
        Ok(row.as_ref().map(decode_claimed).transpose()?)
    }

    pub async fn next_thread_due(
        &self,
        account: &str,
        now: SystemTime,
    ) -> Result<Option<SystemTime>, StoreError> {
        let next: Option<String> = sqlx::query_scalar(sql::NEXT_THREAD_DUE)
            .bind(account)
            .bind(timestamp(now))
            .fetch_one(self.pool())
            .await?;
        Ok(next.as_deref().and_then(parse_timestamp))
    }

    /// Changes only a thread still `creating` (an operator may have acted
    /// meanwhile; then nothing changes). `Created` and `Dead` change the
    /// thread's waiting messages in the same transaction.
    pub async fn record_thread(
        &self,
        id: i64,
        outcome: &ThreadOutcome,
        now: SystemTime,
    ) -> Result<(), StoreError> {
        let now = timestamp(now);
        let mut tx = self.writer().begin().await?;
        match outcome {
            ThreadOutcome::Created {
                mews_thread_id,
                mews_created_utc,
            } => {
                let key = sqlx::query(
                    "UPDATE outbox_threads SET status = 'created', mews_thread_id = ?2,
                         mews_created_utc = ?3, thread_created_at = ?4, needs_reconcile = 0
                     WHERE id = ?1 AND status = 'creating'
                     RETURNING account, thread_key",
                )
                .bind(id)
                .bind(mews_thread_id)
                .bind(mews_created_utc)
                .bind(&now)
                .fetch_optional(&mut *tx)
                .await?;
                if let Some(key) = key {
                    let account: String = key.try_get("account")?;
                    let thread_key: String = key.try_get("thread_key")?;
                    sqlx::query(sql::RESOLVE_WAITING)
                        .bind(&account)
                        .bind(&thread_key)
                        .bind(mews_thread_id)
                        .bind(HELD_BY_THREAD_PREFIX)
                        .bind(no_such_thread(&account, &thread_key))
                        .execute(&mut *tx)
                        .await?;
                }
            }
            ThreadOutcome::Retry {
                at,
                error,
                attempt,
                maybe_stored,
            } => {
                sqlx::query(
                    "UPDATE outbox_threads SET status = 'pending', attempts = attempts + ?2,
                         needs_reconcile = max(needs_reconcile, ?3), next_attempt_at = ?4,
                         last_error = ?5
                     WHERE id = ?1 AND status = 'creating'",
                )
                .bind(id)
                .bind(i64::from(*attempt))
                .bind(i64::from(*maybe_stored))
                .bind(timestamp(*at))
                .bind(error)
                .execute(&mut *tx)
                .await?;
            }
            ThreadOutcome::Dead { error } => {
                let key = sqlx::query(
                    "UPDATE outbox_threads SET status = 'dead', attempts = attempts + 1,
                         dead_at = ?2, last_error = ?3
                     WHERE id = ?1 AND status = 'creating'
                     RETURNING account, thread_key",
                )
                .bind(id)
                .bind(&now)
                .bind(error)
                .fetch_optional(&mut *tx)
                .await?;
                if let Some(key) = key {
                    let account: String = key.try_get("account")?;
                    let thread_key: String = key.try_get("thread_key")?;
                    sqlx::query(sqlx::AssertSqlSafe(format!(
                        "UPDATE outbox SET last_error = ?3 WHERE {WAITING}"
                    )))
                    .bind(&account)
                    .bind(&thread_key)
                    .bind(held_by_thread(&thread_key, id, error))
                    .execute(&mut *tx)
                    .await?;
                }
            }
            ThreadOutcome::Release => {
                sqlx::query(
                    "UPDATE outbox_threads SET status = 'pending', next_attempt_at = ?2
                     WHERE id = ?1 AND status = 'creating'",
                )
                .bind(id)
                .bind(&now)
                .execute(&mut *tx)
                .await?;
            }
        }
        tx.commit().await?;
        Ok(())
    }

    /// Per account, the waiting keyed rows (`ThreadCounts::messages_waiting`).
    pub(super) async fn messages_waiting(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let rows = sqlx::query(
            "SELECT account, count(*) AS n FROM outbox INDEXED BY outbox_waiting_for_thread
             WHERE thread_key IS NOT NULL AND keyed_thread_id IS NULL AND status = 'pending'
             GROUP BY account",
        )
        .fetch_all(self.pool())
        .await?;
        report::account_counts(rows)
    }

    pub async fn owned_thread_ids(&self, ids: &[&str]) -> Result<HashSet<String>, StoreError> {
        if ids.is_empty() {
            return Ok(HashSet::new());
        }
        let owned: Vec<String> = sqlx::query_scalar(
            "SELECT mews_thread_id FROM outbox_threads
             WHERE mews_thread_id IN (SELECT value FROM json_each(?1))",
        )
        .bind(serde_json::to_string(ids).unwrap_or_else(|_| "[]".into()))
        .fetch_all(self.pool())
        .await?;
        Ok(owned.into_iter().collect())
    }

    /// Waiting keyed rows whose (account, thread_key) has no thread: each
    /// group gets [`no_such_thread`] as `last_error` (unless it has another
    /// reason already), one short transaction for all.
    pub async fn flag_threadless_rows(&self) -> Result<Vec<(String, String, u64)>, StoreError> {
        let groups = sqlx::query(
            "SELECT o.account, o.thread_key, count(*) AS n
             FROM outbox AS o INDEXED BY outbox_waiting_for_thread
             WHERE o.thread_key IS NOT NULL AND o.keyed_thread_id IS NULL
               AND o.status = 'pending'
               AND NOT EXISTS (SELECT 1 FROM outbox_threads AS t
                               WHERE t.account = o.account AND t.thread_key = o.thread_key)
             GROUP BY o.account, o.thread_key
             ORDER BY o.account, o.thread_key",
        )
        .fetch_all(self.pool())
        .await?;
        let mut flagged = Vec::with_capacity(groups.len());
        for row in groups {
            let account: String = row.try_get("account")?;
            let thread_key: String = row.try_get("thread_key")?;
            let n: i64 = row.try_get("n")?;
            flagged.push((account, thread_key, u64::try_from(n).unwrap_or(0)));
        }
        if flagged.is_empty() {
            return Ok(flagged);
        }
        let mut tx = self.writer().begin().await?;
        for (account, thread_key, _) in &flagged {
            // A thread inserted meanwhile: its rows are left alone.
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "UPDATE outbox SET last_error = ?3
                 WHERE {WAITING} AND (last_error IS NULL OR last_error = ?3)
                   AND NOT EXISTS (SELECT 1 FROM outbox_threads AS t
                                   WHERE t.account = ?1 AND t.thread_key = ?2)"
            )))
            .bind(account)
            .bind(thread_key)
            .bind(no_such_thread(account, thread_key))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(flagged)
    }

    /// Inserts one message (and, with `new_thread`, its thread first) in
    /// one transaction, as a producer would. A message whose `identifier`
    /// exists already inserts nothing (not its thread either).
    pub async fn enqueue_with_thread(
        &self,
        message: &NewMessage,
        new_thread: Option<&NewThread>,
    ) -> Result<Enqueued, StoreError> {
        let (message_thread_id, thread_key) = match &message.thread {
            ThreadRef::Id(id) => (Some(id.as_str()), None),
            ThreadRef::Key(key) => (None, Some(key.as_str())),
        };
        if let Some(thread) = new_thread
            && thread_key != Some(thread.thread_key.as_str())
        {
            return Err(StoreError::Refused(format!(
                "a new thread (thread_key {:?}) needs a message naming the same thread_key, not {:?}",
                thread.thread_key, message.thread
            )));
        }
        let mut tx = self.writer().begin().await?;
        if let Some(thread) = new_thread {
            sqlx::query(
                "INSERT INTO outbox_threads (account, thread_key, subject, original_sender)
                 VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (account, thread_key) DO NOTHING",
            )
            .bind(&message.account)
            .bind(&thread.thread_key)
            .bind(&thread.subject)
            .bind(&thread.original_sender)
            .execute(&mut *tx)
            .await
            .map_err(refused)?;
        }
        let inserted = sqlx::query_scalar::<_, i64>(
            "INSERT INTO outbox (message_thread_id, thread_key, text, identifier, account)
             VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (identifier) DO NOTHING
             RETURNING id",
        )
        .bind(message_thread_id)
        .bind(thread_key)
        .bind(&message.text)
        .bind(&message.identifier)
        .bind(&message.account)
        .fetch_optional(&mut *tx)
        .await
        .map_err(refused)?;
        if let Some(id) = inserted {
            tx.commit().await?;
            return Ok(Enqueued::Inserted(id));
        }
        let existing = sqlx::query_scalar::<_, i64>("SELECT id FROM outbox WHERE identifier = ?1")
            .bind(&message.identifier)
            .fetch_one(&mut *tx)
            .await?;
        tx.rollback().await?;
        Ok(Enqueued::AlreadyThere(existing))
    }

    pub async fn dead_threads(&self, account: Option<&str>) -> Result<Vec<DeadThread>, StoreError> {
        let rows = sqlx::query(
            "SELECT t.id, t.account, t.thread_key, t.subject, t.original_sender, t.attempts,
                    t.last_error, t.created_at, t.dead_at,
                    (SELECT count(*) FROM outbox AS o INDEXED BY outbox_waiting_for_thread
                     WHERE o.account = t.account AND o.thread_key = t.thread_key
                       AND o.thread_key IS NOT NULL AND o.keyed_thread_id IS NULL
                       AND o.status = 'pending') AS held
             FROM outbox_threads AS t
             WHERE t.status = 'dead' AND (?1 IS NULL OR t.account = ?1)
             ORDER BY t.id",
        )
        .bind(account)
        .fetch_all(self.pool())
        .await?;
        rows.into_iter()
            .map(|row| {
                Ok(DeadThread {
                    id: row.try_get("id")?,
                    account: row.try_get("account")?,
                    thread_key: row.try_get("thread_key")?,
                    subject: row.try_get("subject")?,
                    original_sender: row.try_get("original_sender")?,
                    attempts: u32::try_from(row.try_get::<i64, _>("attempts")?).unwrap_or(0),
                    last_error: row.try_get("last_error")?,
                    created_at: row.try_get("created_at")?,
                    dead_at: row.try_get("dead_at")?,
                    messages_held: u64::try_from(row.try_get::<i64, _>("held")?).unwrap_or(0),
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::from)
    }

    /// Puts dead threads back to `pending`, due now, attempts reset,
    /// `needs_reconcile` 0 (Mews refused them). Their messages keep their
    /// held error until the thread is created. Named threads that are not
    /// all dead (or not of `account`) are refused as a whole.
    pub async fn requeue_dead_threads(
        &self,
        which: &Requeue,
        account: Option<&str>,
        now: SystemTime,
    ) -> Result<Vec<i64>, StoreError> {
        let ids = match which {
            Requeue::Ids(ids) => Some(serde_json::to_string(ids).unwrap_or_else(|_| "[]".into())),
            Requeue::All => None,
        };
        let mut tx = self.writer().begin().await?;
        let mut requeued: Vec<i64> = sqlx::query_scalar(
            "UPDATE outbox_threads SET status = 'pending', attempts = 0, next_attempt_at = ?1,
                 dead_at = NULL, needs_reconcile = 0, last_error = 'requeued by an operator'
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
                    let found =
                        sqlx::query("SELECT status, account FROM outbox_threads WHERE id = ?1")
                            .bind(id)
                            .fetch_optional(&mut *tx)
                            .await?;
                    let found = match found {
                        Some(row) => Some((row.try_get("status")?, row.try_get("account")?)),
                        None => None,
                    };
                    problems.push(thread_not_requeued(id, found, account));
                }
                tx.rollback().await?;
                return Err(StoreError::NotDead(problems.join("; ")));
            }
        }
        tx.commit().await?;
        Ok(requeued)
    }

    /// Deletes dead threads that died before `cutoff`; their waiting
    /// messages become `dead` with [`thread_purged`], in the same
    /// transaction. Returns how many threads.
    pub async fn purge_dead_threads(
        &self,
        cutoff: SystemTime,
        account: Option<&str>,
    ) -> Result<u64, StoreError> {
        let mut tx = self.writer().begin().await?;
        let purged = sqlx::query(
            "DELETE FROM outbox_threads
             WHERE status = 'dead' AND coalesce(dead_at, created_at) < ?1
               AND (?2 IS NULL OR account = ?2)
             RETURNING id, account, thread_key",
        )
        .bind(timestamp(cutoff))
        .bind(account)
        .fetch_all(&mut *tx)
        .await?;
        for row in &purged {
            let id: i64 = row.try_get("id")?;
            let account: String = row.try_get("account")?;
            let thread_key: String = row.try_get("thread_key")?;
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "UPDATE outbox SET status = 'dead', last_error = ?3,
                     dead_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
                 WHERE {WAITING}"
            )))
            .bind(&account)
            .bind(&thread_key)
            .bind(thread_purged(&thread_key, id))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(u64::try_from(purged.len()).unwrap_or(u64::MAX))
    }
}
