//! Threads through the outbox (`outbox_threads`, see [`crate::store::thread`]):
//! this store's statements. The delivery path's writes (`claim_thread`,
//! `record_thread`) are fenced by the account's lease token as the rows'
//! are; the operator's (`dead_threads`, `requeue_dead_threads`,
//! `purge_dead_threads`) touch only dead threads, as `dead requeue|purge`
//! touch only dead rows. The producer's side (the keyed row resolved at
//! insert, under a share lock of its thread row) is in the migration
//! `20261207000002_threads.sql`.

use std::collections::{BTreeMap, HashSet};
use std::time::SystemTime;

use sqlx::Row;

use super::{PgStore, micros_to_time, millis, refused, sql};
use crate::store::thread::{HELD_BY_THREAD_PREFIX, held_by_thread, no_such_thread, thread_purged};
use crate::store::{
    AccountStatus, ClaimedThread, DeadThread, Enqueued, NewMessage, NewThread, QueueSummary,
    Requeue, StoreError, ThreadCounts, ThreadOutcome, ThreadRef, ThreadStatus, timestamp,
};

/// A time column as `status` shows it (as in `commands.rs`).
macro_rules! ts {
    ($col:literal) => {
        concat!(
            "to_char(",
            $col,
            " AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')"
        )
    };
}

/// Threads per account and status.
const THREAD_COUNTS: &str =
    "SELECT account, status, count(*) AS n FROM outbox_threads GROUP BY account, status";

/// Pending messages per account that wait for their thread.
const MESSAGES_WAITING: &str = "
    SELECT account, count(*) AS n FROM outbox
    WHERE status = 'pending' AND thread_key IS NOT NULL AND keyed_thread_id IS NULL
    GROUP BY account";

/// Pending keyed rows whose (account, thread_key) has no thread, per key.
const THREADLESS: &str = "
    SELECT o.account, o.thread_key, count(*) AS n FROM outbox o
    WHERE o.status = 'pending' AND o.thread_key IS NOT NULL AND o.keyed_thread_id IS NULL
      AND NOT EXISTS (
          SELECT 1 FROM outbox_threads t
          WHERE t.account = o.account AND t.thread_key = o.thread_key)
    GROUP BY o.account, o.thread_key
    ORDER BY o.account, o.thread_key";

/// Gives the threadless rows of each (`$1`, `$2`) the error `$3`, unless
/// they carry another one (or their thread appeared meanwhile).
const FLAG_THREADLESS: &str = "
    UPDATE outbox o SET last_error = f.error
    FROM unnest($1::text[], $2::text[], $3::text[]) AS f(account, thread_key, error)
    WHERE o.account = f.account AND o.thread_key = f.thread_key
      AND o.status = 'pending' AND o.keyed_thread_id IS NULL
      AND o.last_error IS NULL
      AND NOT EXISTS (
          SELECT 1 FROM outbox_threads t
          WHERE t.account = o.account AND t.thread_key = o.thread_key)";

fn count(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

fn add_count(counts: &mut ThreadCounts, status: &str, n: i64) {
    let n = count(n);
    match ThreadStatus::parse(status) {
        Some(ThreadStatus::Pending) => counts.pending = n,
        Some(ThreadStatus::Creating) => counts.creating = n,
        Some(ThreadStatus::Created) => counts.created = n,
        Some(ThreadStatus::Dead) => counts.dead = n,
        None => {}
    }
}

/// Why `dead requeue --thread` refuses thread `id`.
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

impl PgStore {
    /// Leases the oldest due pending thread of `account` as `creating`,
    /// marked with the account's token; only for an account this handle
    /// holds under an unexpired lease (checked and share-locked in the same
    /// statement, as [`PgStore::claim_within`]), otherwise `None`.
    pub async fn claim_thread(
        &self,
        account: &str,
        now: SystemTime,
    ) -> Result<Option<ClaimedThread>, StoreError> {
        let Some(token) = self.token(account) else {
            return Ok(None);
        };
        let row = sqlx::query(sql::CLAIM_THREAD)
            .bind(account)
            .bind(timestamp(now))
            .bind(self.owner.to_string())
            .bind(token)
            .fetch_optional(self.pool())
            .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        Ok(Some(ClaimedThread {
            id: row.try_get("id")?,
            thread_key: row.try_get("thread_key")?,
            subject: row.try_get("subject")?,
            original_sender: row.try_get("original_sender")?,
            attempts: u32::try_from(row.try_get::<i32, _>("attempts")?).unwrap_or(0),
            needs_reconcile: row.try_get::<i32, _>("needs_reconcile")? != 0,
            first_sent_at: row
                .try_get::<Option<i64>, _>("first_sent_us")?
                .map(micros_to_time),
        }))
    }

    pub async fn next_thread_due(
        &self,
        account: &str,
        now: SystemTime,
    ) -> Result<Option<SystemTime>, StoreError> {
        let next: Option<i64> = sqlx::query_scalar(sql::NEXT_THREAD_DUE)
            .bind(account)
            .bind(timestamp(now))
            .fetch_one(self.pool())
            .await?;
        Ok(next.map(micros_to_time))
    }

    /// Stores a claimed thread's outcome and what it means for its waiting
    /// rows, in one transaction: only while the thread is still `creating`
    /// under the token of an account this handle holds. A thread claimed
    /// under a lease since lost changes nothing and is reported as
    /// [`StoreError::LeaseLost`]; one an operator changed meanwhile (or
    /// that does not exist) is left alone silently, as rows are by `record`.
    /// It waits for producers inserting a message of the thread right now
    /// (they share-lock its row) at most a third of the lease; past that it
    /// fails with the database's lock timeout, changing nothing, to be
    /// retried.
    pub async fn record_thread(
        &self,
        id: i64,
        outcome: &ThreadOutcome,
        now: SystemTime,
    ) -> Result<(), StoreError> {
        let now_text = timestamp(now);
        // status, attempts to add, next_attempt_at, error, maybe_stored,
        // mews_thread_id, mews_created_utc
        type Values<'a> = (
            &'static str,
            i32,
            Option<String>,
            Option<&'a str>,
            i32,
            Option<&'a str>,
            Option<&'a str>,
        );
        let values: Values<'_> = match outcome {
            ThreadOutcome::Created {
                mews_thread_id,
                mews_created_utc,
            } => (
                "created",
                0,
                None,
                None,
                0,
                Some(mews_thread_id.as_str()),
                Some(mews_created_utc.as_str()),
            ),
            ThreadOutcome::Retry {
                at,
                error,
                attempt,
                maybe_stored,
            } => (
                "pending",
                i32::from(*attempt),
                Some(timestamp(*at)),
                Some(error.as_str()),
                i32::from(*maybe_stored),
                None,
                None,
            ),
            ThreadOutcome::Dead { error } => ("dead", 1, None, Some(error.as_str()), 0, None, None),
            ThreadOutcome::Release => ("pending", 0, Some(now_text.clone()), None, 0, None, None),
        };
        let (status, attempt, next_attempt_at, error, maybe_stored, mews_id, mews_created) = values;
        let mut tx = self.pool().begin().await?;
        // The UPDATE waits for producers holding the thread row
        // share-locked, while it holds this owner's account rows
        // share-locked, which a renewal needs to lock: bounded, so that a
        // producer's transaction left open cannot hold the renewal back
        // past a third of the lease (the record fails and is retried).
        sqlx::query("SELECT set_config('lock_timeout', $1, true)")
            .bind(format!("{}ms", millis(self.options.lease / 3).max(100)))
            .execute(&mut *tx)
            .await?;
        let row = sqlx::query(sql::RECORD_THREAD)
            .bind(id)
            .bind(self.owner.to_string())
            .bind(&now_text)
            .bind(status)
            .bind(attempt)
            .bind(next_attempt_at)
            .bind(error)
            .bind(maybe_stored)
            .bind(mews_id)
            .bind(mews_created)
            .fetch_one(&mut *tx)
            .await?;
        let account: Option<String> = row.try_get("account")?;
        let thread_key: Option<String> = row.try_get("thread_key")?;
        if row.try_get::<bool, _>("lost")? {
            tx.rollback().await?;
            let account: Option<String> = row.try_get("thread_account")?;
            return Err(StoreError::LeaseLost {
                account: account.unwrap_or_default(),
            });
        }
        let (Some(account), Some(thread_key)) = (account, thread_key) else {
            tx.rollback().await?;
            return Ok(());
        };
        match outcome {
            ThreadOutcome::Created { mews_thread_id, .. } => {
                sqlx::query(sql::RESOLVE_KEYED)
                    .bind(&account)
                    .bind(&thread_key)
                    .bind(mews_thread_id)
                    .bind(HELD_BY_THREAD_PREFIX)
                    .bind(no_such_thread(&account, &thread_key))
                    .execute(&mut *tx)
                    .await?;
            }
            ThreadOutcome::Dead { error } => {
                sqlx::query(sql::HOLD_KEYED)
                    .bind(&account)
                    .bind(&thread_key)
                    .bind(held_by_thread(&thread_key, id, error))
                    .execute(&mut *tx)
                    .await?;
            }
            ThreadOutcome::Retry { .. } | ThreadOutcome::Release => {}
        }
        tx.commit().await?;
        Ok(())
    }

    /// Which of these Mews thread Ids a thread of ours already owns.
    pub async fn owned_thread_ids(&self, ids: &[&str]) -> Result<HashSet<String>, StoreError> {
        if ids.is_empty() {
            return Ok(HashSet::new());
        }
        let owned: Vec<String> = sqlx::query_scalar(
            "SELECT mews_thread_id FROM outbox_threads WHERE mews_thread_id = ANY($1::text[])",
        )
        .bind(ids)
        .fetch_all(self.pool())
        .await?;
        Ok(owned.into_iter().collect())
    }

    /// Pending keyed rows whose key names no thread of their account: each
    /// such (account, key) with its count of rows; the rows without another
    /// error get [`no_such_thread`].
    pub async fn flag_threadless_rows(&self) -> Result<Vec<(String, String, u64)>, StoreError> {
        let rows = sqlx::query(THREADLESS).fetch_all(self.pool()).await?;
        let mut found = Vec::with_capacity(rows.len());
        for row in rows {
            found.push((
                row.try_get::<String, _>("account")?,
                row.try_get::<String, _>("thread_key")?,
                count(row.try_get("n")?),
            ));
        }
        if found.is_empty() {
            return Ok(found);
        }
        let accounts: Vec<&str> = found.iter().map(|f| f.0.as_str()).collect();
        let keys: Vec<&str> = found.iter().map(|f| f.1.as_str()).collect();
        let errors: Vec<String> = found
            .iter()
            .map(|(account, key, _)| no_such_thread(account, key))
            .collect();
        sqlx::query(FLAG_THREADLESS)
            .bind(&accounts)
            .bind(&keys)
            .bind(&errors)
            .execute(self.pool())
            .await?;
        Ok(found)
    }

    /// Inserts one message (and, with `new_thread`, its thread first) in one
    /// transaction. The thread is inserted `ON CONFLICT (account,
    /// thread_key) DO NOTHING`: a key that exists already is joined.
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
                "a new thread ({:?}) goes only with a message naming the same thread_key",
                thread.thread_key
            )));
        }
        let mut tx = self.pool().begin().await?;
        if let Some(thread) = new_thread {
            sqlx::query(
                "INSERT INTO outbox_threads (account, thread_key, subject, original_sender)
                 VALUES ($1, $2, $3, $4)
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
             VALUES ($1, $2, $3, $4, $5)
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
        let Some(id) = inserted else {
            // The message was enqueued before: nothing is inserted, not even
            // the new thread (as the SQLite store does), so that a repeated
            // `enqueue` never leaves an empty thread to create.
            let existing =
                sqlx::query_scalar::<_, i64>("SELECT id FROM outbox WHERE identifier = $1")
                    .bind(&message.identifier)
                    .fetch_one(&mut *tx)
                    .await?;
            tx.rollback().await?;
            return Ok(Enqueued::AlreadyThere(existing));
        };
        tx.commit().await?;
        Ok(Enqueued::Inserted(id))
    }

    /// Dead threads, oldest first, of one account or all, with the number
    /// of messages held behind each.
    pub async fn dead_threads(&self, account: Option<&str>) -> Result<Vec<DeadThread>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT t.id, t.account, t.thread_key, t.subject, t.original_sender, t.attempts,
                    t.last_error, ",
            ts!("t.created_at"),
            " AS created_at, ",
            ts!("t.dead_at"),
            " AS dead_at,
                    (SELECT count(*) FROM outbox o
                     WHERE o.account = t.account AND o.thread_key = t.thread_key
                       AND o.keyed_thread_id IS NULL AND o.status = 'pending') AS held
             FROM outbox_threads t
             WHERE t.status = 'dead' AND ($1::text IS NULL OR t.account = $1)
             ORDER BY t.id"
        ))
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
                    attempts: u32::try_from(row.try_get::<i32, _>("attempts")?).unwrap_or(0),
                    last_error: row.try_get("last_error")?,
                    created_at: row.try_get("created_at")?,
                    dead_at: row.try_get("dead_at")?,
                    messages_held: count(row.try_get("held")?),
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::from)
    }

    /// Puts dead threads back to `pending`, due now, attempts reset,
    /// `needs_reconcile` 0 and "requeued by an operator" as `last_error`.
    /// Named threads that are not all dead (or not of `account`) are
    /// refused as a whole. Their held messages keep their error until the
    /// thread is created. Returns the thread ids requeued.
    pub async fn requeue_dead_threads(
        &self,
        which: &Requeue,
        account: Option<&str>,
        now: SystemTime,
    ) -> Result<Vec<i64>, StoreError> {
        let ids: Option<Vec<i64>> = match which {
            Requeue::Ids(ids) => Some(ids.clone()),
            Requeue::All => None,
        };
        let mut tx = self.pool().begin().await?;
        let mut requeued: Vec<i64> = sqlx::query_scalar(
            "UPDATE outbox_threads SET status = 'pending', attempts = 0,
                 next_attempt_at = $1::timestamptz, dead_at = NULL, needs_reconcile = 0,
                 last_error = 'requeued by an operator'
             WHERE status = 'dead'
               AND ($2::bigint[] IS NULL OR id = ANY($2::bigint[]))
               AND ($3::text IS NULL OR account = $3)
             RETURNING id",
        )
        .bind(timestamp(now))
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
                let found = sqlx::query("SELECT status, account FROM outbox_threads WHERE id = $1")
                    .bind(id)
                    .fetch_optional(&mut *tx)
                    .await?;
                let found = match found {
                    Some(row) => Some((row.try_get("status")?, row.try_get("account")?)),
                    None => None,
                };
                problems.push(thread_not_requeued(id, found, account));
            }
            if !problems.is_empty() {
                tx.rollback().await?;
                return Err(StoreError::NotDead(problems.join("; ")));
            }
        }
        tx.commit().await?;
        Ok(requeued)
    }

    /// Deletes dead threads that died before `cutoff` (of `account`, or
    /// all); in the same transaction the messages held behind each become
    /// `dead` with [`thread_purged`]. Returns how many threads.
    pub async fn purge_dead_threads(
        &self,
        cutoff: SystemTime,
        account: Option<&str>,
    ) -> Result<u64, StoreError> {
        let mut tx = self.pool().begin().await?;
        let purged = sqlx::query(
            "DELETE FROM outbox_threads
             WHERE status = 'dead' AND coalesce(dead_at, created_at) < $1::timestamptz
               AND ($2::text IS NULL OR account = $2)
             RETURNING id, account, thread_key",
        )
        .bind(timestamp(cutoff))
        .bind(account)
        .fetch_all(&mut *tx)
        .await?;
        let mut accounts = Vec::with_capacity(purged.len());
        let mut keys = Vec::with_capacity(purged.len());
        let mut errors = Vec::with_capacity(purged.len());
        for row in &purged {
            let id: i64 = row.try_get("id")?;
            let key: String = row.try_get("thread_key")?;
            errors.push(thread_purged(&key, id));
            accounts.push(row.try_get::<String, _>("account")?);
            keys.push(key);
        }
        if !purged.is_empty() {
            // A later statement: it sees the rows of producers the DELETE
            // waited for (they share-locked the thread row).
            sqlx::query(
                "UPDATE outbox o SET status = 'dead', dead_at = now(), last_error = p.error
                 FROM unnest($1::text[], $2::text[], $3::text[]) AS p(account, thread_key, error)
                 WHERE o.account = p.account AND o.thread_key = p.thread_key
                   AND o.keyed_thread_id IS NULL AND o.status = 'pending'",
            )
            .bind(&accounts)
            .bind(&keys)
            .bind(&errors)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(u64::try_from(purged.len()).unwrap_or(u64::MAX))
    }

    /// The threads of every account by status, and the messages waiting
    /// for one.
    async fn thread_counts(&self) -> Result<BTreeMap<String, ThreadCounts>, StoreError> {
        let mut counts: BTreeMap<String, ThreadCounts> = BTreeMap::new();
        for row in sqlx::query(THREAD_COUNTS).fetch_all(self.pool()).await? {
            let status: String = row.try_get("status")?;
            add_count(
                counts.entry(row.try_get("account")?).or_default(),
                &status,
                row.try_get("n")?,
            );
        }
        for row in sqlx::query(MESSAGES_WAITING).fetch_all(self.pool()).await? {
            counts
                .entry(row.try_get("account")?)
                .or_default()
                .messages_waiting = count(row.try_get("n")?);
        }
        Ok(counts)
    }

    /// Adds the thread counts to `status`'s accounts (an account with only
    /// threads appears too), in account order.
    pub(super) async fn add_thread_status(
        &self,
        mut accounts: Vec<AccountStatus>,
    ) -> Result<Vec<AccountStatus>, StoreError> {
        for (account, threads) in self.thread_counts().await? {
            match accounts.iter_mut().find(|a| a.account == account) {
                Some(a) => a.threads = threads,
                None => accounts.push(AccountStatus {
                    account,
                    threads,
                    ..AccountStatus::default()
                }),
            }
        }
        accounts.sort_by(|a, b| a.account.cmp(&b.account));
        Ok(accounts)
    }

    /// Adds the thread counts to the queue summary's accounts.
    pub(super) async fn add_thread_summary(
        &self,
        summary: &mut QueueSummary,
    ) -> Result<(), StoreError> {
        for (account, threads) in self.thread_counts().await? {
            let unfinished =
                threads.pending + threads.creating + threads.dead + threads.messages_waiting;
            match summary.accounts.get_mut(&account) {
                Some(entry) => entry.threads = threads,
                // Only created threads: nothing to report for this account.
                None if unfinished == 0 => {}
                None => {
                    summary.accounts.entry(account).or_default().threads = threads;
                }
            }
        }
        Ok(())
    }
}
