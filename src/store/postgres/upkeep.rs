//! The store traits beyond [`Outbox`](crate::store::Outbox) on PostgreSQL:
//! what the daemon needs ([`DaemonStore`]: leases, wake-ups, the queue
//! summary), its housekeeping ([`Upkeep`]) and the operator's commands
//! ([`OperatorStore`]).

use std::time::{Duration, SystemTime};

use sqlx::Row;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{PgStore, micros_to_time};
use crate::store::report;
use crate::store::{
    AccountStatus, Acquired, DaemonStore, DeadRow, DeadThread, Enqueued, NewMessage, NewThread,
    OperatorStore, QueueSummary, Requeue, StoreError, Upkeep, timestamp,
};

/// Counts of unfinished and dead rows per account (through the status
/// index), with the oldest pending row's `created_at` in microseconds.
const QUEUE_COUNTS: &str = "
    SELECT account, status, count(*) AS n,
           (extract(epoch FROM min(created_at) FILTER (WHERE status = 'pending'))
               * 1000000)::bigint AS oldest_us
    FROM outbox WHERE status IN ('pending', 'sending', 'dead')
    GROUP BY account, status";

/// Deliveries after `$1` (the partial index `outbox_delivered_at`).
const DELIVERED_SINCE: &str = "
    SELECT count(*) FROM outbox WHERE status = 'delivered' AND delivered_at > $1::timestamptz";

/// Deletes up to `$2` rows delivered before `$1`, oldest first. Rows another
/// daemon is pruning right now are skipped, not waited for.
const PRUNE_DELIVERED: &str = "
    DELETE FROM outbox WHERE id IN (
        SELECT id FROM outbox
        WHERE status = 'delivered' AND delivered_at < $1::timestamptz
        ORDER BY delivered_at
        LIMIT $2
        FOR UPDATE SKIP LOCKED)";

/// The accounts the live daemons are configured for.
const FLEET_ACCOUNTS: &str = "
    SELECT DISTINCT unnest(accounts) FROM outbox_daemons WHERE seen_until > clock_timestamp()";

/// The accounts of unfinished rows: a loose index scan of `outbox_status
/// (status, account)`, one descent per (status, account) pair, so finding
/// that every account is configured costs nothing like a scan of the
/// backlog (which, every minute on every daemon, took 12–21 s mid-drain of
/// 200,000 rows).
const UNFINISHED_ACCOUNTS: &str = "
    WITH RECURSIVE seen AS (
        (SELECT status, account FROM outbox
         WHERE status IN ('pending', 'sending')
         ORDER BY status, account
         LIMIT 1)
        UNION ALL
        SELECT n.status, n.account FROM seen s CROSS JOIN LATERAL (
            SELECT o.status, o.account FROM outbox o
            WHERE o.status IN ('pending', 'sending')
              AND (o.status, o.account) > (s.status, s.account)
            ORDER BY o.status, o.account
            LIMIT 1) AS n)
    SELECT DISTINCT account FROM seen";

/// Pending rows per account in `$1` (the unconfigured ones).
const UNKNOWN_ACCOUNTS: &str = "
    SELECT account, count(*) AS n FROM outbox
    WHERE status = 'pending' AND account = ANY($1::text[])
    GROUP BY account ORDER BY account";

/// Says why the pending rows of accounts `$1` (the unconfigured ones) wait
/// (once: a reason already there is kept).
const FLAG_UNKNOWN: &str = "
    UPDATE outbox SET last_error = 'account ' || account || ' is not configured: add [accounts.'
        || account || '] to the configuration'
    WHERE status = 'pending' AND last_error IS NULL AND account = ANY($1::text[])";

/// Says why pending rows of configured accounts (`$1`) wait behind the head
/// of their thread (its oldest unfinished row) when that head's account is
/// one of `$2` (the unconfigured ones). Only threads whose head is
/// unconfigured are read; a message of ours is replaced when the blocking
/// row changed, another reason is kept.
const FLAG_BEHIND_UNKNOWN: &str = "
    WITH heads AS (
        SELECT coalesce(h.message_thread_id, h.keyed_thread_id) AS thread, h.id AS head_id,
               h.account
        FROM outbox h
        WHERE h.status IN ('pending', 'sending') AND h.account = ANY($2::text[])
          AND coalesce(h.message_thread_id, h.keyed_thread_id) IS NOT NULL
          AND NOT EXISTS (
              SELECT 1 FROM outbox e
              WHERE coalesce(e.message_thread_id, e.keyed_thread_id)
                    = coalesce(h.message_thread_id, h.keyed_thread_id)
                AND e.status IN ('pending', 'sending') AND e.id < h.id))
    UPDATE outbox o SET last_error = 'waiting behind row ' || heads.head_id
        || ' of its thread, whose account ' || heads.account
        || ' is not configured: add [accounts.' || heads.account
        || '] to the configuration, or delete row ' || heads.head_id
    FROM heads
    WHERE coalesce(o.message_thread_id, o.keyed_thread_id) = heads.thread
      AND o.id > heads.head_id
      AND o.status = 'pending'
      AND o.account = ANY($1::text[])
      AND (o.last_error IS NULL OR o.last_error LIKE 'waiting behind row %')
      AND o.last_error IS DISTINCT FROM 'waiting behind row ' || heads.head_id
        || ' of its thread, whose account ' || heads.account
        || ' is not configured: add [accounts.' || heads.account
        || '] to the configuration, or delete row ' || heads.head_id";

fn names(accounts: &[&str]) -> Vec<String> {
    accounts.iter().map(|a| (*a).to_owned()).collect()
}

impl DaemonStore for PgStore {
    /// The URL with its password redacted.
    fn describe(&self) -> String {
        self.target.clone()
    }

    /// Nothing on this host can take the database away: a connection lost
    /// is retried, and a lease lost is [`DaemonStore::renew_accounts`]'s to report.
    fn storage_lost(&self) -> Option<crate::store::StorageLost> {
        None
    }

    /// Account leases: [`PgStore::acquire_accounts`].
    async fn acquire_accounts(
        &self,
        configured: &[&str],
        at_most: usize,
    ) -> Result<Vec<Acquired>, StoreError> {
        PgStore::acquire_accounts(self, configured, at_most).await
    }

    async fn renew_accounts(&self) -> Result<Vec<String>, StoreError> {
        self.renew_lost().await
    }

    async fn release_accounts(&self) -> Result<(), StoreError> {
        PgStore::release_accounts(self).await
    }

    async fn release_some(
        &self,
        accounts: &[String],
        to: Option<&str>,
    ) -> Result<Vec<String>, StoreError> {
        PgStore::release_some(self, accounts, to).await
    }

    async fn fleet(
        &self,
        configured: &[String],
    ) -> Result<Option<crate::store::Fleet>, StoreError> {
        PgStore::fleet(self, configured).await.map(Some)
    }

    /// Rows left `sending` and threads left `creating` by a previous owner
    /// are recovered at each takeover ([`PgStore::acquire_accounts`]);
    /// nothing to do at start-up.
    async fn recover_abandoned(
        &self,
        _settle: Duration,
        _now: SystemTime,
    ) -> Result<u64, StoreError> {
        Ok(0)
    }

    async fn watch_changes(
        &self,
        poll_interval: Duration,
        shutdown: CancellationToken,
    ) -> Result<watch::Receiver<u64>, StoreError> {
        PgStore::watch_changes(self, poll_interval, shutdown).await
    }

    /// Of the whole shared outbox, every daemon's accounts included.
    async fn queue_summary(&self, since: SystemTime) -> Result<QueueSummary, StoreError> {
        let mut summary = QueueSummary::default();
        let rows = sqlx::query(QUEUE_COUNTS).fetch_all(self.pool()).await?;
        for row in rows {
            let oldest = row
                .try_get::<Option<i64>, _>("oldest_us")?
                .map(micros_to_time);
            report::queue_count(
                &mut summary,
                row.try_get("account")?,
                row.try_get("status")?,
                row.try_get("n")?,
                oldest,
            );
        }
        let delivered: i64 = sqlx::query_scalar(DELIVERED_SINCE)
            .bind(timestamp(since))
            .fetch_one(self.pool())
            .await?;
        summary.delivered_since = u64::try_from(delivered).unwrap_or(0);
        self.add_thread_summary(&mut summary).await?;
        Ok(summary)
    }

    async fn close(&self) {
        PgStore::close(self).await;
    }
}

impl Upkeep for PgStore {
    /// As the SQLite store's: accounts with `pending` rows not in
    /// `configured` (their rows get a `last_error` saying so), and rows of
    /// configured accounts waiting behind such a row in their thread get
    /// "waiting behind row N of its thread, …".
    async fn flag_unknown_accounts(
        &self,
        configured: &[&str],
    ) -> Result<Vec<(String, u64)>, StoreError> {
        // The fleet's accounts: those of this daemon and of every live
        // daemon registered beside it (`outbox_daemons`), so that daemons
        // configured for different accounts do not flag each other's.
        let mut configured = names(configured);
        let fleet: Vec<String> = sqlx::query_scalar(FLEET_ACCOUNTS)
            .fetch_all(self.pool())
            .await?;
        for account in fleet {
            if !configured.contains(&account) {
                configured.push(account);
            }
        }
        let unknown: Vec<String> = sqlx::query_scalar::<_, String>(UNFINISHED_ACCOUNTS)
            .fetch_all(self.pool())
            .await?
            .into_iter()
            .filter(|account| !configured.contains(account))
            .collect();
        if unknown.is_empty() {
            return Ok(Vec::new());
        }
        let rows = sqlx::query(UNKNOWN_ACCOUNTS)
            .bind(&unknown)
            .fetch_all(self.pool())
            .await?;
        sqlx::query(FLAG_UNKNOWN)
            .bind(&unknown)
            .execute(self.pool())
            .await?;
        sqlx::query(FLAG_BEHIND_UNKNOWN)
            .bind(&configured)
            .bind(&unknown)
            .execute(self.pool())
            .await?;
        report::account_counts(rows)
    }

    async fn prune_delivered(&self, before: SystemTime, limit: usize) -> Result<u64, StoreError> {
        let done = sqlx::query(PRUNE_DELIVERED)
            .bind(timestamp(before))
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .execute(self.pool())
            .await?;
        Ok(done.rows_affected())
    }

    /// Autovacuum gives space back on PostgreSQL.
    async fn give_back_free_pages(&self, _pages: u32) -> Result<i64, StoreError> {
        Ok(0)
    }

    async fn storage_warning(&self) -> Option<String> {
        None
    }

    async fn flag_threadless_rows(&self) -> Result<Vec<(String, String, u64)>, StoreError> {
        PgStore::flag_threadless_rows(self).await
    }
}

impl OperatorStore for PgStore {
    async fn enqueue(
        &self,
        message: &NewMessage,
        new_thread: Option<&NewThread>,
    ) -> Result<Enqueued, StoreError> {
        PgStore::enqueue(self, message, new_thread).await
    }

    async fn status(&self, now: SystemTime) -> Result<Vec<AccountStatus>, StoreError> {
        PgStore::status(self, now).await
    }

    async fn dead_rows(&self, account: Option<&str>) -> Result<Vec<DeadRow>, StoreError> {
        PgStore::dead_rows(self, account).await
    }

    async fn requeue_dead(
        &self,
        which: &Requeue,
        account: Option<&str>,
        now: SystemTime,
    ) -> Result<Vec<i64>, StoreError> {
        PgStore::requeue_dead(self, which, account, now).await
    }

    async fn purge_dead(
        &self,
        cutoff: SystemTime,
        account: Option<&str>,
    ) -> Result<u64, StoreError> {
        PgStore::purge_dead(self, cutoff, account).await
    }

    async fn dead_threads(&self, account: Option<&str>) -> Result<Vec<DeadThread>, StoreError> {
        PgStore::dead_threads(self, account).await
    }

    async fn requeue_dead_threads(
        &self,
        which: &Requeue,
        account: Option<&str>,
        now: SystemTime,
    ) -> Result<Vec<i64>, StoreError> {
        PgStore::requeue_dead_threads(self, which, account, now).await
    }

    async fn purge_dead_threads(
        &self,
        cutoff: SystemTime,
        account: Option<&str>,
    ) -> Result<u64, StoreError> {
        PgStore::purge_dead_threads(self, cutoff, account).await
    }
}
