//! The SQLite outbox: WAL mode so producers in other processes insert while
//! the daemon works; set-based claims and updates (one statement per batch).

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use serde_json::json;
use sqlx::sqlite::{
    SqliteAutoVacuum, SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{ConnectOptions, Connection, Row, SqliteConnection, SqlitePool};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::wal_watch::WalWatch;
use super::{
    AccountPause, AccountStatus, ClaimedRow, DeadRow, Enqueued, ErrorCount, NewMessage, Outbox,
    Requeue, RowOutcome, Status, StoreError, parse_timestamp, timestamp,
};

/// The daemon's migration bookkeeping lives in its own table, so an
/// application's own sqlx migrations (`_sqlx_migrations`) in the same
/// database file never collide with ours.
pub const MIGRATIONS_TABLE: &str = "_mews_outbox_migrations";

/// Most common dead-row errors shown per account by `status`.
const DEAD_ERRORS_SHOWN: i64 = 3;

/// After a burst of WAL writes, how long to wait for quiet before checking
/// that no commit went unseen (see [`SqliteStore::watch_changes`]).
pub const WAL_RECHECK: Duration = Duration::from_millis(5);

/// While the WAL is watched, how often `PRAGMA data_version` is checked
/// anyway, in case a write was missed (inotify queue overflow).
pub const SAFETY_POLL: Duration = Duration::from_secs(1);

/// Reader pool size: `next_due` and `status` read beside a write.
const READ_CONNECTIONS: u32 = 4;

/// Handle to an outbox database. Cheap to clone.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    /// Reads: `next_due`, `status`, pauses.
    pool: SqlitePool,
    /// Every write of this process goes through this one connection, so the
    /// daemon's own writes queue in memory instead of meeting SQLite's busy
    /// handler (which sleeps at least 1 ms per collision).
    writer: SqlitePool,
    options: SqliteConnectOptions,
    path: PathBuf,
}

impl SqliteStore {
    /// Opens (creating if missing) the database and applies pending migrations.
    pub async fn open(path: &Path, busy_timeout: Duration) -> Result<SqliteStore, StoreError> {
        super::maintenance::create_database_file(path).map_err(|source| StoreError::Create {
            path: path.display().to_string(),
            source,
        })?;
        SqliteStore::open_existing(path, busy_timeout).await
    }

    /// Opens an existing database and applies pending migrations; never
    /// creates the file. A connection opened later (the pools reconnect,
    /// a reload watches again) fails on a missing file instead of creating
    /// an empty one that no daemon serves.
    pub async fn open_existing(
        path: &Path,
        busy_timeout: Duration,
    ) -> Result<SqliteStore, StoreError> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(false)
            // Only takes effect on a new file: lets housekeeping give pages back.
            .auto_vacuum(SqliteAutoVacuum::Incremental)
            .journal_mode(SqliteJournalMode::Wal)
            // In WAL mode NORMAL survives a process crash; a power loss may
            // roll back the last commits (a `delivered` mark may be redone:
            // a possible duplicate, never a lost row).
            .synchronous(SqliteSynchronous::Normal)
            // Statement journals (a claim or record fires triggers, which
            // need one) stay in memory instead of a temporary file.
            .pragma("temp_store", "memory")
            .busy_timeout(busy_timeout);
        let store = SqliteStore::connect(path, options).await?;
        store.migrate().await?;
        Ok(store)
    }

    /// Opens an existing database read-only (SQLite `mode=ro`) for the
    /// commands that only look: no migration, no journal-mode change, so it
    /// works for a user who may only read the file. Such a user needs read
    /// access to the database, its `-wal` and `-shm` files and their
    /// directory; SQLite (3.22+) then reads the WAL without writing the
    /// `-shm`. A schema other than the binary's is reported, not migrated.
    pub async fn open_read_only(
        path: &Path,
        busy_timeout: Duration,
    ) -> Result<SqliteStore, StoreError> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .read_only(true)
            .create_if_missing(false)
            .pragma("temp_store", "memory")
            .busy_timeout(busy_timeout);
        let store = SqliteStore::connect(path, options).await?;
        store.check_schema().await?;
        Ok(store)
    }

    async fn connect(
        path: &Path,
        options: SqliteConnectOptions,
    ) -> Result<SqliteStore, StoreError> {
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options.clone())
            .await?;
        let pool = SqlitePoolOptions::new()
            .max_connections(READ_CONNECTIONS)
            .connect_with(options.clone())
            .await?;
        Ok(SqliteStore {
            pool,
            writer,
            options,
            path: path.to_owned(),
        })
    }

    /// Refuses a database whose applied migrations differ from the binary's.
    async fn check_schema(&self) -> Result<(), StoreError> {
        let has_table: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?1",
        )
        .bind(MIGRATIONS_TABLE)
        .fetch_one(&self.pool)
        .await?;
        let applied: Vec<i64> = if has_table == 0 {
            Vec::new()
        } else {
            sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "SELECT version FROM {MIGRATIONS_TABLE} WHERE success ORDER BY version"
            )))
            .fetch_all(&self.pool)
            .await?
        };
        let known: Vec<i64> = sqlx::migrate!("./migrations")
            .iter()
            .filter(|m| !m.migration_type.is_down_migration())
            .map(|m| m.version)
            .collect();
        super::file::schema_verdict(&applied, &known).map_err(|problem| StoreError::Schema {
            path: self.path.display().to_string(),
            problem,
        })
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        let mut migrator = sqlx::migrate!("./migrations");
        migrator.dangerous_set_table_name(MIGRATIONS_TABLE);
        migrator.run(&self.writer).await?;
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Puts rows left `sending` by a previous daemon (or by an abandoned
    /// generation) back to `pending`, to be read back from Mews before they
    /// are sent again (the request carrying them may have reached Mews).
    /// Mews may still be storing that request, so, like a timed-out one,
    /// they are not due before its start plus `settle`: the account's
    /// `add_started_by` (see [`Outbox::request_starting`]), or `now` when it
    /// is unknown. Only safe while holding the [`DaemonLock`]. Returns how many.
    pub async fn recover_abandoned(
        &self,
        settle: Duration,
        now: SystemTime,
    ) -> Result<u64, StoreError> {
        let done = sqlx::query(
            "UPDATE outbox SET status = 'pending', needs_reconcile = 1,
                next_attempt_at = max(next_attempt_at, coalesce(
                    (SELECT strftime('%Y-%m-%dT%H:%M:%fZ', s.add_started_by, ?1)
                     FROM outbox_account_state AS s WHERE s.account = outbox.account),
                    ?2))
             WHERE status = 'sending'",
        )
        .bind(format!("+{:.3} seconds", settle.as_secs_f64()))
        .bind(timestamp(now + settle))
        .execute(&self.writer)
        .await?;
        Ok(done.rows_affected())
    }

    /// Dead rows, oldest first, of one account or all.
    pub async fn dead_rows(&self, account: Option<&str>) -> Result<Vec<DeadRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, account, message_thread_id, CAST(text AS BLOB) AS text, attempts,
                    last_error, created_at, dead_at
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
    /// and `last_error` saying so. Named rows that are not all dead (or not
    /// of `account`) are refused as a whole. Returns the ids requeued.
    pub async fn requeue_dead(
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
                    problems.push(match found {
                        None => format!("row {id} does not exist"),
                        Some(row) => {
                            let status: String = row.try_get("status")?;
                            let owner: String = row.try_get("account")?;
                            match account {
                                Some(a) if status == "dead" && owner != a => {
                                    format!("row {id} belongs to account {owner}, not {a}")
                                }
                                _ => format!("row {id} is {status}, not dead"),
                            }
                        }
                    });
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
    pub async fn purge_dead(
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
    pub async fn enqueue(&self, message: &NewMessage) -> Result<Enqueued, StoreError> {
        let inserted = sqlx::query_scalar::<_, i64>(
            "INSERT INTO outbox (message_thread_id, text, identifier, account)
             VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (identifier) DO NOTHING
             RETURNING id",
        )
        .bind(&message.message_thread_id)
        .bind(&message.text)
        .bind(&message.identifier)
        .bind(&message.account)
        .fetch_optional(&self.writer)
        .await
        .map_err(refused)?;
        if let Some(id) = inserted {
            return Ok(Enqueued::Inserted(id));
        }
        let existing = sqlx::query_scalar::<_, i64>("SELECT id FROM outbox WHERE identifier = ?1")
            .bind(&message.identifier)
            .fetch_one(&self.pool)
            .await?;
        Ok(Enqueued::AlreadyThere(existing))
    }

    /// Counts, ages and pauses per account (every account with rows or a pause).
    pub async fn status(&self, now: SystemTime) -> Result<Vec<AccountStatus>, StoreError> {
        let mut accounts = BTreeMap::<String, AccountStatus>::new();
        let counts = sqlx::query(
            "SELECT account, status, count(*) AS n FROM outbox GROUP BY account, status",
        )
        .fetch_all(&self.pool)
        .await?;
        for row in counts {
            let a = account_entry(&mut accounts, row.try_get("account")?);
            let n = u64::try_from(row.try_get::<i64, _>("n")?).unwrap_or(0);
            match Status::parse(row.try_get("status")?) {
                Some(Status::Pending) => a.pending = n,
                Some(Status::Sending) => a.sending = n,
                Some(Status::Delivered) => a.delivered = n,
                Some(Status::Dead) => a.dead = n,
                None => {}
            }
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
            let a = account_entry(&mut accounts, row.try_get("account")?);
            a.oldest_pending_created_at = row.try_get("oldest")?;
            a.next_retry_at = row.try_get("next_retry")?;
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
            account_entry(&mut accounts, row.try_get("account")?).last_error =
                row.try_get("last_error")?;
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
            account_entry(&mut accounts, row.try_get("account")?)
                .dead_errors
                .push(ErrorCount {
                    error: row.try_get("error")?,
                    rows: u64::try_from(row.try_get::<i64, _>("n")?).unwrap_or(0),
                });
        }
        for pause in self.pauses().await? {
            if pause.until > now {
                let a = account_entry(&mut accounts, pause.account);
                a.paused_until = Some(timestamp(pause.until));
                a.pause_reason = Some(pause.reason);
            }
        }
        Ok(accounts.into_values().collect())
    }

    /// Accounts that have `pending` rows but are not in `configured`, with
    /// their counts; their rows get a `last_error` saying so, and so do the
    /// rows of configured accounts that wait behind such a row in their
    /// thread (per-thread order holds them: without a reason of their own
    /// they would wait silently).
    pub async fn flag_unknown_accounts(
        &self,
        configured: &[&str],
    ) -> Result<Vec<(String, u64)>, StoreError> {
        let configured = serde_json::to_string(configured).unwrap_or_else(|_| "[]".into());
        let rows = sqlx::query(
            "SELECT account, count(*) AS n FROM outbox
             WHERE status = 'pending' AND account NOT IN (SELECT value FROM json_each(?1))
             GROUP BY account",
        )
        .bind(&configured)
        .fetch_all(&self.pool)
        .await?;
        sqlx::query(
            "UPDATE outbox SET last_error = 'account ' || account || ' is not configured: add [accounts.' || account || '] to the configuration'
             WHERE status = 'pending' AND last_error IS NULL
               AND account NOT IN (SELECT value FROM json_each(?1))",
        )
        .bind(&configured)
        .execute(&self.writer)
        .await?;
        // Only threads whose head is unconfigured are read (a few rows of
        // the heads table, then `outbox_thread_rows`); a message of ours is
        // replaced when the blocking row changed, another reason is kept.
        sqlx::query(
            "UPDATE outbox SET last_error = 'waiting behind row ' || h.head_id
                 || ' of its thread, whose account ' || h.account
                 || ' is not configured: add [accounts.' || h.account
                 || '] to the configuration, or delete row ' || h.head_id
             FROM outbox_thread_head AS h
             WHERE h.account NOT IN (SELECT value FROM json_each(?1))
               AND outbox.message_thread_id = h.message_thread_id
               AND outbox.id > h.head_id
               AND outbox.status = 'pending'
               AND outbox.account IN (SELECT value FROM json_each(?1))
               AND (outbox.last_error IS NULL OR outbox.last_error LIKE 'waiting behind row %')",
        )
        .bind(&configured)
        .execute(&self.writer)
        .await?;
        rows.into_iter()
            .map(|row| {
                Ok((
                    row.try_get("account")?,
                    u64::try_from(row.try_get::<i64, _>("n")?).unwrap_or(0),
                ))
            })
            .collect()
    }

    /// Watches for commits by other connections (producers in other
    /// processes, and this process's own writes); the returned receiver
    /// changes on each.
    ///
    /// Wakes on writes to the WAL file ([`WalWatch`]): no cost while idle,
    /// well under a millisecond from a producer's commit. A write can be seen
    /// a moment before the commit is (SQLite publishes it in the shared WAL
    /// index right after), so each burst of writes is followed, after
    /// [`WAL_RECHECK`] of quiet, by a check of `PRAGMA data_version`; and
    /// that check also runs every [`SAFETY_POLL`]. Where the WAL cannot be
    /// watched, `PRAGMA data_version` is polled every `poll_interval`.
    pub async fn watch_changes(
        &self,
        poll_interval: Duration,
        shutdown: CancellationToken,
    ) -> Result<watch::Receiver<u64>, StoreError> {
        self.watch_changes_polling(poll_interval, SAFETY_POLL, shutdown)
            .await
    }

    /// [`SqliteStore::watch_changes`] with the safety poll's period given,
    /// so a test can rule the poll out as what woke it.
    async fn watch_changes_polling(
        &self,
        poll_interval: Duration,
        safety_poll: Duration,
        shutdown: CancellationToken,
    ) -> Result<watch::Receiver<u64>, StoreError> {
        let mut conn = self.options.clone().connect().await?;
        let mut last = data_version(&mut conn).await?;
        let (tx, rx) = watch::channel(0u64);
        let mut wal_path = self.path.clone().into_os_string();
        wal_path.push("-wal");
        let mut wal = match WalWatch::new(Path::new(&wal_path)) {
            Ok(wal) => {
                tracing::debug!(wal = %Path::new(&wal_path).display(), "watching the WAL file for commits");
                Some(wal)
            }
            Err(e) => {
                tracing::warn!(
                    wal = %Path::new(&wal_path).display(), error = %e,
                    poll_interval = %humantime::format_duration(poll_interval),
                    "cannot watch the WAL file; polling the database for new rows instead"
                );
                None
            }
        };
        tokio::spawn(async move {
            // `last` was read just now: the first check is one period away.
            let period = if wal.is_some() {
                safety_poll
            } else {
                poll_interval
            };
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut recheck_at: Option<tokio::time::Instant> = None;
            loop {
                let recheck = async {
                    match recheck_at {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                };
                let written = async {
                    match wal.as_mut() {
                        Some(wal) => wal.written().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tick.tick() => {}
                    _ = recheck => recheck_at = None,
                    written = written => {
                        match written {
                            Ok(()) => {
                                tx.send_modify(|n| *n = n.wrapping_add(1));
                                recheck_at = Some(tokio::time::Instant::now() + WAL_RECHECK);
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "lost the watch on the WAL file; polling the database for new rows instead");
                                wal = None;
                                tick = tokio::time::interval(poll_interval);
                            }
                        }
                        continue;
                    }
                }
                match data_version(&mut conn).await {
                    Ok(version) if version != last => {
                        last = version;
                        tx.send_modify(|n| *n = n.wrapping_add(1));
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot poll the database for new rows; retrying");
                    }
                }
            }
            let _ = conn.close().await;
        });
        Ok(rx)
    }

    /// The reading pool (tests and tools query through it).
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// The one writing connection, for the store's other writers (housekeeping).
    pub(super) fn writer(&self) -> &SqlitePool {
        &self.writer
    }

    /// Closes every connection (at shutdown).
    pub async fn close(&self) {
        self.writer.close().await;
        self.pool.close().await;
    }
}

fn account_entry(
    accounts: &mut BTreeMap<String, AccountStatus>,
    name: String,
) -> &mut AccountStatus {
    accounts
        .entry(name.clone())
        .or_insert_with(|| AccountStatus {
            account: name,
            ..AccountStatus::default()
        })
}

async fn data_version(conn: &mut SqliteConnection) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("PRAGMA data_version")
        .fetch_one(conn)
        .await
}

/// SQLITE_CONSTRAINT_TRIGGER: a trigger's RAISE(ABORT, ...), which is how
/// the producer contract (migration `..06_producer_contract`) refuses a row.
const SQLITE_CONSTRAINT_TRIGGER: &str = "1811";

/// A CHECK, UNIQUE, NOT NULL or producer-contract failure is the producer's
/// input being refused.
fn refused(e: sqlx::Error) -> StoreError {
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

impl Outbox for SqliteStore {
    async fn claim(
        &self,
        account: &str,
        now: SystemTime,
        limit: usize,
    ) -> Result<Vec<ClaimedRow>, StoreError> {
        self.claim_within(account, now, limit, usize::MAX).await
    }

    async fn claim_within(
        &self,
        account: &str,
        now: SystemTime,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<ClaimedRow>, StoreError> {
        let rows = sqlx::query(sql::CLAIM)
            .bind(account)
            .bind(timestamp(now))
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .bind(i64::try_from(max_bytes).unwrap_or(i64::MAX))
            .fetch_all(&self.writer)
            .await?;
        let mut claimed = rows
            .into_iter()
            .map(|row| {
                Ok(ClaimedRow {
                    id: row.try_get("id")?,
                    message_thread_id: row.try_get("message_thread_id")?,
                    text: String::from_utf8(row.try_get::<Vec<u8>, _>("text")?),
                    attempts: u32::try_from(row.try_get::<i64, _>("attempts")?).unwrap_or(0),
                    needs_reconcile: row.try_get::<i64, _>("needs_reconcile")? != 0,
                    first_sent_at: row
                        .try_get::<Option<String>, _>("first_sent_at")?
                        .as_deref()
                        .and_then(parse_timestamp),
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()?;
        claimed.sort_by_key(|row| row.id);
        Ok(claimed)
    }

    async fn next_due(
        &self,
        account: &str,
        now: SystemTime,
    ) -> Result<Option<SystemTime>, StoreError> {
        let next: Option<String> = sqlx::query_scalar(sql::NEXT_DUE)
            .bind(account)
            .bind(timestamp(now))
            .fetch_one(&self.pool)
            .await?;
        Ok(next.as_deref().and_then(parse_timestamp))
    }

    async fn record(
        &self,
        outcomes: &[(i64, RowOutcome)],
        now: SystemTime,
    ) -> Result<(), StoreError> {
        if outcomes.is_empty() {
            return Ok(());
        }
        let now = timestamp(now);
        // Delivered rows, the bulk of any drain, go through a leaner
        // statement: positional JSON arrays, only the columns they change.
        let mut delivered = String::with_capacity(outcomes.len() * 96 + 2);
        delivered.push('[');
        let mut others = Vec::new();
        for (id, outcome) in outcomes {
            match outcome {
                RowOutcome::Delivered {
                    mews_message_id,
                    mews_created_utc,
                    mews_sender,
                } => {
                    if delivered.len() > 1 {
                        delivered.push(',');
                    }
                    delivered.push_str(
                        &json!([id, mews_message_id, mews_created_utc, mews_sender]).to_string(),
                    );
                }
                RowOutcome::Retry {
                    at,
                    error,
                    attempt,
                    maybe_stored,
                } => others.push(json!({
                    "id": id, "status": "pending", "attempt": i32::from(*attempt),
                    "next_attempt_at": timestamp(*at), "error": error,
                    "maybe_stored": i32::from(*maybe_stored),
                })),
                RowOutcome::Dead { error } => others.push(json!({
                    "id": id, "status": "dead", "attempt": 1, "error": error,
                })),
                RowOutcome::Release => others.push(json!({
                    "id": id, "status": "pending", "attempt": 0, "next_attempt_at": now,
                })),
            }
        }
        delivered.push(']');
        let delivered = (delivered.len() > 2).then(|| {
            sqlx::query(sql::RECORD_DELIVERED)
                .bind(delivered)
                .bind(&now)
        });
        let others = (!others.is_empty()).then(|| {
            sqlx::query(sql::RECORD)
                .bind(serde_json::Value::Array(others).to_string())
                .bind(&now)
        });
        match (delivered, others) {
            // One statement is its own transaction: no BEGIN/COMMIT round trips.
            (Some(only), None) | (None, Some(only)) => {
                only.execute(&self.writer).await?;
            }
            (Some(delivered), Some(others)) => {
                let mut tx = self.writer.begin().await?;
                delivered.execute(&mut *tx).await?;
                others.execute(&mut *tx).await?;
                tx.commit().await?;
            }
            (None, None) => {}
        }
        Ok(())
    }

    async fn pauses(&self) -> Result<Vec<AccountPause>, StoreError> {
        let rows = sqlx::query(
            "SELECT account, paused_until, pause_reason, pause_streak FROM outbox_account_state
             WHERE paused_until IS NOT NULL",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut pauses = Vec::with_capacity(rows.len());
        for row in rows {
            let until: String = row.try_get("paused_until")?;
            let Some(until) = parse_timestamp(&until) else {
                continue;
            };
            pauses.push(AccountPause {
                account: row.try_get("account")?,
                until,
                reason: row
                    .try_get::<Option<String>, _>("pause_reason")?
                    .unwrap_or_default(),
                streak: u32::try_from(row.try_get::<i64, _>("pause_streak")?).unwrap_or(0),
            });
        }
        Ok(pauses)
    }

    async fn save_pause(&self, pause: &AccountPause) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO outbox_account_state (account, paused_until, pause_reason, pause_streak)
             VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (account) DO UPDATE SET
                 paused_until = excluded.paused_until,
                 pause_reason = excluded.pause_reason,
                 pause_streak = excluded.pause_streak",
        )
        .bind(&pause.account)
        .bind(timestamp(pause.until))
        .bind(&pause.reason)
        .bind(i64::from(pause.streak))
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    async fn clear_pause(&self, account: &str) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE outbox_account_state
             SET paused_until = NULL, pause_reason = NULL, pause_streak = 0
             WHERE account = ?1",
        )
        .bind(account)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    async fn clear_reconcile(&self, ids: &[i64]) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        sqlx::query(
            "UPDATE outbox SET needs_reconcile = 0
             WHERE status = 'sending' AND id IN (SELECT value FROM json_each(?1))",
        )
        .bind(serde_json::to_string(ids).unwrap_or_else(|_| "[]".into()))
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    async fn dead_letter_held(
        &self,
        rows: &[(i64, String)],
        held_prefix: &str,
        now: SystemTime,
    ) -> Result<u64, StoreError> {
        if rows.is_empty() {
            return Ok(0);
        }
        let rows: Vec<_> = rows
            .iter()
            .map(|(id, error)| json!({"id": id, "error": error}))
            .collect();
        // substr, not LIKE: the prefix is text, not a pattern. The attempt
        // was counted when the row was held.
        let done = sqlx::query(
            "UPDATE outbox SET status = 'dead', dead_at = ?2, last_error = u.value ->> 'error'
             FROM json_each(?1) AS u
             WHERE outbox.id = u.value ->> 'id' AND +outbox.status = 'pending'
               AND substr(outbox.last_error, 1, length(?3)) = ?3",
        )
        .bind(serde_json::Value::Array(rows).to_string())
        .bind(timestamp(now))
        .bind(held_prefix)
        .execute(&self.writer)
        .await?;
        Ok(done.rows_affected())
    }

    async fn owned_message_ids(&self, ids: &[&str]) -> Result<HashSet<String>, StoreError> {
        if ids.is_empty() {
            return Ok(HashSet::new());
        }
        let owned: Vec<String> = sqlx::query_scalar(
            "SELECT mews_message_id FROM outbox
             WHERE mews_message_id IN (SELECT value FROM json_each(?1))",
        )
        .bind(serde_json::to_string(ids).unwrap_or_else(|_| "[]".into()))
        .fetch_all(&self.pool)
        .await?;
        Ok(owned.into_iter().collect())
    }

    async fn recent_requests(&self, account: &str) -> Result<Vec<SystemTime>, StoreError> {
        let stored: Option<Option<String>> = sqlx::query_scalar(
            "SELECT recent_requests FROM outbox_account_state WHERE account = ?1",
        )
        .bind(account)
        .fetch_optional(&self.pool)
        .await?;
        let Some(text) = stored.flatten() else {
            return Ok(Vec::new());
        };
        // Unreadable memory is no memory: the limiter starts empty.
        let ends: Vec<String> = serde_json::from_str(&text).unwrap_or_default();
        Ok(ends.iter().filter_map(|t| parse_timestamp(t)).collect())
    }

    async fn request_starting(
        &self,
        account: &str,
        started_by: SystemTime,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO outbox_account_state (account, add_started_by) VALUES (?1, ?2)
             ON CONFLICT (account) DO UPDATE SET add_started_by = excluded.add_started_by",
        )
        .bind(account)
        .bind(timestamp(started_by))
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    async fn save_recent_requests(
        &self,
        account: &str,
        ends: &[SystemTime],
    ) -> Result<(), StoreError> {
        let ends: Vec<String> = ends.iter().map(|t| timestamp(*t)).collect();
        sqlx::query(
            "INSERT INTO outbox_account_state (account, recent_requests) VALUES (?1, ?2)
             ON CONFLICT (account) DO UPDATE SET recent_requests = excluded.recent_requests",
        )
        .bind(account)
        .bind(serde_json::to_string(&ends).unwrap_or_else(|_| "[]".into()))
        .execute(&self.writer)
        .await?;
        Ok(())
    }
}

impl FromStr for Status {
    type Err = String;
    fn from_str(s: &str) -> Result<Status, String> {
        Status::parse(s).ok_or_else(|| format!("unknown status {s:?}"))
    }
}

/// The statements of the delivery path, public so that the benchmark's
/// floor (`benches/drain.rs`) runs exactly the same SQL without the daemon.
/// Each is one statement per batch; their query plans are checked by
/// `the_delivery_statements_use_their_indexes`.
pub mod sql {
    /// Leases up to `?3` due heads of account `?1` as `sending`, oldest due
    /// first: one range of `outbox_thread_head_ready`, then rowid lookups.
    /// Per-thread order holds by construction: only a thread's oldest
    /// unfinished row is its head (migration `..04_thread_heads`). The
    /// triggers then mark these heads as in flight.
    ///
    /// `?4` bounds the claim by bytes: the heads are taken, in claim order,
    /// while their texts plus [`MESSAGE_ENVELOPE_BYTES`] each add up to at
    /// most `?4`, and always at least one (a row too large for any request
    /// must still be claimed, to be dead-lettered rather than block its
    /// thread). `octet_length` of a column reads only the record header, not
    /// the text, so the claim never loads more than the bound (plus one
    /// row) whatever the rows hold.
    pub const CLAIM: &str = "
        UPDATE outbox
        SET status = 'sending', first_sent_at = coalesce(first_sent_at, ?2)
        WHERE id IN (
            SELECT head_id FROM (
                SELECT c.head_id,
                       row_number() OVER w AS n,
                       sum(octet_length(o.text) + 128) OVER w AS running_bytes
                FROM (SELECT head_id, ready_at FROM outbox_thread_head
                      WHERE account = ?1 AND ready_at <= ?2
                      ORDER BY ready_at, head_id
                      LIMIT ?3) AS c
                JOIN outbox AS o ON o.id = c.head_id
                WINDOW w AS (ORDER BY c.ready_at, c.head_id ROWS UNBOUNDED PRECEDING))
            WHERE n = 1 OR running_bytes <= ?4)
          AND +status = 'pending'
        RETURNING id, message_thread_id, CAST(text AS BLOB) AS text, attempts,
                  needs_reconcile, first_sent_at";

    /// What [`CLAIM`] counts for each message besides its text: the JSON
    /// around it, `{"MessageThreadId":"<36>","Text":"","Identifier":"<id>"},`
    /// (at most 104 bytes), rounded up. Escaping inside the text is not
    /// counted here: the worker measures the real size before sending.
    pub const MESSAGE_ENVELOPE_BYTES: usize = 128;

    /// When the next head of account `?1` becomes due after `?2`.
    pub const NEXT_DUE: &str = "
        SELECT min(ready_at) FROM outbox_thread_head
        WHERE account = ?1 AND ready_at > ?2";

    /// Stores deliveries: `?1` is a JSON array of `[id, mews_message_id,
    /// mews_created_utc, mews_sender]`, `?2` the time. Like [`RECORD`],
    /// touches only rows still `sending`, through the rowid.
    pub const RECORD_DELIVERED: &str = "
        UPDATE outbox SET
            status = 'delivered',
            needs_reconcile = 0,
            delivered_at = ?2,
            mews_message_id = u.value ->> 1,
            mews_created_utc = u.value ->> 2,
            mews_sender = u.value ->> 3
        FROM json_each(?1) AS u
        WHERE outbox.id = u.value ->> 0 AND +outbox.status = 'sending'";

    /// Stores the other outcomes (retry, dead, release): `?1` is a JSON
    /// array of `{id, status, attempt, next_attempt_at?, error?,
    /// maybe_stored?}`, `?2` the time. Only rows still `sending` are
    /// touched: an operator may have acted meanwhile. A row that may be at
    /// Mews stays marked until it is delivered or checked
    /// (`clear_reconcile`). The unary `+` keeps the planner on the rowid:
    /// through the `status` index it would read every `json_each` item for
    /// every row in flight.
    pub const RECORD: &str = "
        UPDATE outbox SET
            status = u.value ->> 'status',
            attempts = attempts + (u.value ->> 'attempt'),
            needs_reconcile = max(needs_reconcile, coalesce(u.value ->> 'maybe_stored', 0)),
            dead_at = CASE u.value ->> 'status' WHEN 'dead' THEN ?2 ELSE dead_at END,
            next_attempt_at = coalesce(u.value ->> 'next_attempt_at', next_attempt_at),
            last_error = coalesce(u.value ->> 'error', last_error)
        FROM json_each(?1) AS u
        WHERE outbox.id = u.value ->> 'id' AND +outbox.status = 'sending'";
}

#[cfg(test)]
mod tests {
    use super::*;

    const T1: &str = "7f9325f6-ef44-4911-89a8-ae51010a5aa4";
    const T2: &str = "0b8c8a58-1a60-4c5e-9f0e-3d6f2f2a9d11";

    async fn store() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("o.db"), Duration::from_secs(5))
            .await
            .unwrap();
        (dir, store)
    }

    async fn insert(store: &SqliteStore, thread: &str, text: &str) -> i64 {
        sqlx::query_scalar(
            "INSERT INTO outbox (message_thread_id, text) VALUES (?1, ?2) RETURNING id",
        )
        .bind(thread)
        .bind(text)
        .fetch_one(store.pool())
        .await
        .unwrap()
    }

    async fn insert_error(store: &SqliteStore, sql: &'static str) -> String {
        sqlx::query(sql)
            .execute(store.pool())
            .await
            .unwrap_err()
            .to_string()
    }

    #[tokio::test]
    async fn bad_inserts_are_refused_with_a_constraint_naming_the_problem() {
        let (_dir, s) = store().await;
        let cases = [
            (
                "INSERT INTO outbox (message_thread_id, text) VALUES ('not-a-uuid', 'hi')",
                "message_thread_id_must_be_a_lowercase_uuid",
            ),
            (
                "INSERT INTO outbox (message_thread_id, text) VALUES ('7F9325F6-EF44-4911-89A8-AE51010A5AA4', 'hi')",
                "message_thread_id_must_be_a_lowercase_uuid",
            ),
            (
                "INSERT INTO outbox (message_thread_id, text) VALUES ('7f9325f6-ef44-4911-89a8-ae51010a5aa4', '')",
                "text_must_be_non_blank_text",
            ),
            (
                "INSERT INTO outbox (message_thread_id, text) VALUES ('7f9325f6-ef44-4911-89a8-ae51010a5aa4', ' \n\t ')",
                "text_must_be_non_blank_text",
            ),
            (
                "INSERT INTO outbox (message_thread_id, text) VALUES ('7f9325f6-ef44-4911-89a8-ae51010a5aa4', x'ff00')",
                "text_must_be_non_blank_text",
            ),
            (
                "INSERT INTO outbox (message_thread_id, text) VALUES ('7f9325f6-ef44-4911-89a8-ae51010a5aa4', NULL)",
                "NOT NULL",
            ),
            (
                "INSERT INTO outbox (message_thread_id, text, status) VALUES ('7f9325f6-ef44-4911-89a8-ae51010a5aa4', 'hi', 'lost')",
                "status_must_be_pending_sending_delivered_or_dead",
            ),
            (
                "INSERT INTO outbox (message_thread_id, text, identifier) VALUES ('7f9325f6-ef44-4911-89a8-ae51010a5aa4', 'hi', '')",
                "identifier_must_be_null_or_non_empty_text",
            ),
            (
                "INSERT INTO outbox (message_thread_id, text, account) VALUES ('7f9325f6-ef44-4911-89a8-ae51010a5aa4', 'hi', '')",
                "account_must_be_non_empty_text",
            ),
        ];
        for (sql, expected) in cases {
            let e = insert_error(&s, sql).await;
            assert!(e.contains(expected), "{sql}\n=> {e}");
        }
    }

    #[tokio::test]
    async fn identifiers_make_enqueueing_idempotent() {
        let (_dir, s) = store().await;
        let m = NewMessage {
            message_thread_id: T1.into(),
            text: "hello".into(),
            identifier: Some("order-1".into()),
            account: "default".into(),
        };
        let Enqueued::Inserted(id) = s.enqueue(&m).await.unwrap() else {
            panic!()
        };
        assert_eq!(s.enqueue(&m).await.unwrap(), Enqueued::AlreadyThere(id));
    }

    #[tokio::test]
    async fn a_claim_takes_one_row_per_thread_in_order_and_skips_blocked_threads() {
        let (_dir, s) = store().await;
        let a1 = insert(&s, T1, "a1").await;
        let b1 = insert(&s, T2, "b1").await;
        let a2 = insert(&s, T1, "a2").await;
        let now = SystemTime::now() + Duration::from_secs(1);

        let first: Vec<i64> = s
            .claim("default", now, 10)
            .await
            .unwrap()
            .iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(first, [a1, b1], "a2 waits for a1");
        assert!(
            s.claim("default", now, 10).await.unwrap().is_empty(),
            "a1 in flight blocks a2"
        );

        // a1 fails and is retried later: a2 still waits; b1 delivered.
        let later = now + Duration::from_secs(60);
        s.record(
            &[
                (
                    a1,
                    RowOutcome::Retry {
                        at: later,
                        error: "HTTP 500".into(),
                        attempt: true,
                        maybe_stored: false,
                    },
                ),
                (
                    b1,
                    RowOutcome::Delivered {
                        mews_message_id: "m".into(),
                        mews_created_utc: "c".into(),
                        mews_sender: "Application".into(),
                    },
                ),
            ],
            now,
        )
        .await
        .unwrap();
        assert!(s.claim("default", now, 10).await.unwrap().is_empty());
        let due = s.next_due("default", now).await.unwrap().unwrap();
        assert_eq!(
            timestamp(due),
            timestamp(later),
            "a2 is blocked, so a1's retry is next"
        );

        let again = s.claim("default", later, 10).await.unwrap();
        assert_eq!(again.len(), 1);
        assert_eq!((again[0].id, again[0].attempts), (a1, 1));
        s.record(
            &[(
                a1,
                RowOutcome::Dead {
                    error: "gone".into(),
                },
            )],
            later,
        )
        .await
        .unwrap();
        let released: Vec<i64> = s
            .claim("default", later, 10)
            .await
            .unwrap()
            .iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(released, [a2], "a dead row releases its thread");
    }

    #[tokio::test]
    async fn abandoned_sending_rows_are_recovered_to_be_read_back_first() {
        let (_dir, s) = store().await;
        insert(&s, T1, "x").await;
        let now = SystemTime::now() + Duration::from_secs(1);
        let first = s.claim("default", now, 10).await.unwrap();
        assert!(!first[0].needs_reconcile);
        assert_eq!(
            first[0].first_sent_at.map(timestamp),
            Some(timestamp(now)),
            "the claim stamps the first send"
        );
        assert_eq!(
            s.recover_abandoned(Duration::from_secs(2), now)
                .await
                .unwrap(),
            1
        );
        let later = now + Duration::from_secs(5);
        let again = s.claim("default", later, 10).await.unwrap();
        assert_eq!(again.len(), 1);
        assert!(
            again[0].needs_reconcile,
            "the crashed request may have reached Mews"
        );
        assert_eq!(
            again[0].first_sent_at.map(timestamp),
            Some(timestamp(now)),
            "the first send stays the first"
        );
    }

    async fn next_attempt_at(s: &SqliteStore, id: i64) -> String {
        sqlx::query_scalar("SELECT next_attempt_at FROM outbox WHERE id = ?1")
            .bind(id)
            .fetch_one(s.pool())
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn recovered_rows_settle_from_their_requests_start_or_from_now_when_unknown() {
        let (_dir, s) = store().await;
        let a = insert(&s, T1, "x").await;
        let b: i64 = sqlx::query_scalar(
            "INSERT INTO outbox (message_thread_id, text, account) VALUES (?1, 'y', 'other') RETURNING id",
        )
        .bind(T2)
        .fetch_one(s.pool())
        .await
        .unwrap();
        let claimed_at = SystemTime::now();
        s.claim("default", claimed_at, 10).await.unwrap();
        s.claim("other", claimed_at, 10).await.unwrap();
        // The request of `default` started well after the claim (it waited
        // for the rate limit, a read-back, a permit); `other` never said.
        let started = claimed_at + Duration::from_secs(40);
        s.request_starting("default", started).await.unwrap();
        let now = claimed_at + Duration::from_secs(41);
        let settle = Duration::from_millis(30_500);
        assert_eq!(s.recover_abandoned(settle, now).await.unwrap(), 2);
        assert_eq!(next_attempt_at(&s, a).await, timestamp(started + settle));
        assert_eq!(next_attempt_at(&s, b).await, timestamp(now + settle));
        assert!(
            s.claim("default", started + settle - Duration::from_millis(1), 10)
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            s.claim("default", started + settle, 10)
                .await
                .unwrap()
                .len(),
            1
        );
    }

    async fn reconcile_flag(s: &SqliteStore, id: i64) -> i64 {
        sqlx::query_scalar("SELECT needs_reconcile FROM outbox WHERE id = ?1")
            .bind(id)
            .fetch_one(s.pool())
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn the_reconcile_mark_is_set_by_doubt_kept_until_checked_and_cleared_by_delivery() {
        let (_dir, s) = store().await;
        let id = insert(&s, T1, "x").await;
        let mut now = SystemTime::now() + Duration::from_secs(1);
        let mut round = async |outcome: RowOutcome| {
            assert_eq!(s.claim("default", now, 10).await.unwrap().len(), 1);
            s.record(&[(id, outcome)], now).await.unwrap();
            now += Duration::from_secs(1);
            reconcile_flag(&s, id).await
        };
        let retry = |maybe_stored| RowOutcome::Retry {
            at: SystemTime::now(),
            error: "e".into(),
            attempt: true,
            maybe_stored,
        };
        assert_eq!(round(retry(false)).await, 0);
        assert_eq!(round(retry(true)).await, 1, "a 5xx may have stored it");
        assert_eq!(round(RowOutcome::Release).await, 1, "a 429 proves nothing");
        assert_eq!(
            round(retry(false)).await,
            1,
            "nor does a failure to connect"
        );
        assert_eq!(
            round(RowOutcome::Delivered {
                mews_message_id: "m".into(),
                mews_created_utc: "c".into(),
                mews_sender: "Application".into()
            })
            .await,
            0
        );

        let other = insert(&s, T2, "y").await;
        s.claim("default", now, 10).await.unwrap();
        s.record(&[(other, retry(true))], now).await.unwrap();
        s.claim("default", now + Duration::from_secs(60), 10)
            .await
            .unwrap();
        s.clear_reconcile(&[other]).await.unwrap();
        assert_eq!(
            reconcile_flag(&s, other).await,
            0,
            "read back and not found"
        );
    }

    #[tokio::test]
    async fn owned_message_ids_are_the_ones_our_rows_hold() {
        let (_dir, s) = store().await;
        let id = insert(&s, T1, "x").await;
        let now = SystemTime::now() + Duration::from_secs(1);
        s.claim("default", now, 10).await.unwrap();
        let delivered = RowOutcome::Delivered {
            mews_message_id: "ours".into(),
            mews_created_utc: "c".into(),
            mews_sender: "Application".into(),
        };
        s.record(&[(id, delivered)], now).await.unwrap();
        let owned = s.owned_message_ids(&["ours", "theirs"]).await.unwrap();
        assert_eq!(owned, HashSet::from(["ours".to_owned()]));
        assert!(s.owned_message_ids(&[]).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn recent_requests_are_remembered_per_account() {
        let (_dir, s) = store().await;
        assert!(s.recent_requests("default").await.unwrap().is_empty());
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_000_000_123);
        let ends = [t, t + Duration::from_millis(250)];
        s.save_recent_requests("default", &ends).await.unwrap();
        s.save_pause(&AccountPause {
            account: "default".into(),
            until: t,
            reason: "r".into(),
            streak: 1,
        })
        .await
        .unwrap();
        assert_eq!(
            s.recent_requests("default").await.unwrap(),
            ends,
            "a pause does not erase them"
        );
        assert!(s.recent_requests("other").await.unwrap().is_empty());
    }

    /// Inserts rows and makes them dead, `error` each, dead since `at`.
    async fn dead(s: &SqliteStore, account: &str, errors: &[&str], at: SystemTime) -> Vec<i64> {
        let mut ids = Vec::new();
        for error in errors {
            let id: i64 = sqlx::query_scalar(
                "INSERT INTO outbox (message_thread_id, text, account) VALUES (?1, 'x', ?2) RETURNING id",
            )
            .bind(T1)
            .bind(account)
            .fetch_one(s.pool())
            .await
            .unwrap();
            sqlx::query("UPDATE outbox SET status = 'sending' WHERE id = ?1")
                .bind(id)
                .execute(s.pool())
                .await
                .unwrap();
            s.record(
                &[(
                    id,
                    RowOutcome::Dead {
                        error: (*error).into(),
                    },
                )],
                at,
            )
            .await
            .unwrap();
            ids.push(id);
        }
        ids
    }

    #[tokio::test]
    async fn requeue_revives_dead_rows_only_and_refuses_anything_else_as_a_whole() {
        let (_dir, s) = store().await;
        let now = SystemTime::now();
        let a = dead(
            &s,
            "default",
            &["HTTP 403: no (RequestId 1)", "HTTP 403: no (RequestId 2)"],
            now,
        )
        .await;
        let b = dead(&s, "other", &["HTTP 400: bad"], now).await;
        let pending = insert(&s, T2, "alive").await;

        let e = s
            .requeue_dead(&Requeue::Ids(vec![a[0], pending, 999]), None, now)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!("row {pending} is pending, not dead"))
                && e.contains("row 999 does not exist"),
            "{e}"
        );
        let e = s
            .requeue_dead(&Requeue::Ids(vec![b[0]]), Some("default"), now)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("belongs to account other, not default"), "{e}");
        assert_eq!(s.dead_rows(None).await.unwrap().len(), 3, "nothing changed");

        assert_eq!(
            s.requeue_dead(&Requeue::Ids(vec![a[1]]), None, now)
                .await
                .unwrap(),
            [a[1]]
        );
        let row =
            sqlx::query("SELECT status, attempts, last_error, dead_at FROM outbox WHERE id = ?1")
                .bind(a[1])
                .fetch_one(s.pool())
                .await
                .unwrap();
        assert_eq!(row.get::<String, _>("status"), "pending");
        assert_eq!(row.get::<i64, _>("attempts"), 0);
        assert!(row.get::<Option<String>, _>("dead_at").is_none());
        let error: String = row.get("last_error");
        assert!(
            error.starts_with("requeued by an operator at ")
                && error.ends_with("; was: HTTP 403: no (RequestId 2)"),
            "{error}"
        );

        assert_eq!(
            s.requeue_dead(&Requeue::All, Some("other"), now)
                .await
                .unwrap(),
            b
        );
        assert_eq!(
            s.requeue_dead(&Requeue::All, None, now).await.unwrap(),
            [a[0]]
        );
        assert!(
            s.requeue_dead(&Requeue::All, None, now)
                .await
                .unwrap()
                .is_empty()
        );
    }

    #[tokio::test]
    async fn purge_deletes_only_rows_dead_for_longer_than_the_age() {
        let (_dir, s) = store().await;
        let now = SystemTime::now();
        let day = Duration::from_secs(24 * 3600);
        let old = dead(&s, "default", &["old"], now - 40 * day).await;
        let old_other = dead(&s, "other", &["old"], now - 40 * day).await;
        let recent = dead(&s, "default", &["recent"], now - day).await;
        let pending = insert(&s, T2, "alive").await;
        sqlx::query("UPDATE outbox SET created_at = '2000-01-01T00:00:00.000Z' WHERE id = ?1")
            .bind(pending)
            .execute(s.pool())
            .await
            .unwrap();

        assert_eq!(
            s.purge_dead(now - 30 * day, Some("default")).await.unwrap(),
            1
        );
        let left: Vec<i64> = s
            .dead_rows(None)
            .await
            .unwrap()
            .iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(left, [old_other[0], recent[0]]);
        assert_eq!(s.purge_dead(now - 30 * day, None).await.unwrap(), 1);
        assert_eq!(s.dead_rows(None).await.unwrap()[0].id, recent[0]);
        assert_ne!(old[0], pending);
        let status: String = sqlx::query_scalar("SELECT status FROM outbox WHERE id = ?1")
            .bind(pending)
            .fetch_one(s.pool())
            .await
            .unwrap();
        assert_eq!(status, "pending", "an old pending row is never purged");
    }

    #[tokio::test]
    async fn status_groups_dead_errors_without_their_request_ids() {
        let (_dir, s) = store().await;
        let now = SystemTime::now();
        dead(
            &s,
            "default",
            &[
                "HTTP 403: no (RequestId 1)",
                "HTTP 403: no (RequestId 2)",
                "HTTP 403: no (RequestId 3) (gave up after 5 attempts)",
                "HTTP 400: bad (RequestId 4)",
                "HTTP 400: bad (RequestId 5)",
                "HTTP 413",
                "text is not valid UTF-8; Mews cannot take it",
            ],
            now,
        )
        .await;
        let status = s.status(now).await.unwrap();
        let errors: Vec<(&str, u64)> = status[0]
            .dead_errors
            .iter()
            .map(|e| (e.error.as_str(), e.rows))
            .collect();
        assert_eq!(
            errors,
            [
                ("HTTP 400: bad", 2),
                ("HTTP 403: no", 2),
                ("HTTP 403: no (gave up after 5 attempts)", 1)
            ]
        );
        assert_eq!(status[0].dead, 7);
    }

    /// `EXPLAIN QUERY PLAN` of a statement, one line per step.
    async fn plan(store: &SqliteStore, statement: &str) -> String {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "EXPLAIN QUERY PLAN {statement}"
        )))
        .fetch_all(store.pool())
        .await
        .unwrap();
        rows.iter()
            .map(|r| r.get::<String, _>("detail"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[tokio::test]
    async fn the_delivery_statements_use_their_indexes() {
        let (_dir, s) = store().await;
        let cases: [(&str, &str, &[&str]); 5] = [
            (
                "claim",
                sql::CLAIM,
                &[
                    "INTEGER PRIMARY KEY (rowid=?)",
                    "outbox_thread_head_ready (account=? AND ready_at<?)",
                ],
            ),
            ("record", sql::RECORD, &["INTEGER PRIMARY KEY (rowid=?)"]),
            (
                "record delivered",
                sql::RECORD_DELIVERED,
                &["INTEGER PRIMARY KEY (rowid=?)"],
            ),
            (
                "recover_abandoned",
                "UPDATE outbox SET status = 'pending' WHERE status = 'sending'",
                &["outbox_status (status=?)"],
            ),
            (
                "next_due",
                sql::NEXT_DUE,
                &["outbox_thread_head_ready (account=? AND ready_at>?)"],
            ),
        ];
        for (name, statement, expected) in cases {
            let plan = plan(&s, statement).await;
            for index in expected {
                assert!(plan.contains(index), "{name}: no {index} in\n{plan}");
            }
            for line in plan.lines() {
                assert!(
                    !(line.starts_with("SCAN") && line.contains("outbox")),
                    "{name}: full scan in\n{plan}"
                );
            }
        }
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_commit_by_another_process_wakes_the_watcher_without_polling() {
        let (dir, s) = store().await;
        let shutdown = CancellationToken::new();
        // An hour between polls, safety polls included: only the WAL watch
        // can see the insert within the test's patience.
        let hour = Duration::from_secs(3600);
        let mut changes = s
            .watch_changes_polling(hour, hour, shutdown.clone())
            .await
            .unwrap();
        let mut producer = SqliteConnectOptions::new()
            .filename(dir.path().join("o.db"))
            .connect()
            .await
            .unwrap();
        sqlx::query("INSERT INTO outbox (message_thread_id, text) VALUES (?1, 'hi')")
            .bind(T1)
            .execute(&mut producer)
            .await
            .unwrap();
        // Generous for a loaded machine, and still far short of any poll.
        tokio::time::timeout(Duration::from_secs(30), changes.changed())
            .await
            .expect("woken by the commit")
            .unwrap();
        shutdown.cancel();
    }

    #[tokio::test]
    async fn only_rows_still_held_pending_are_dead_lettered() {
        let (_dir, s) = store().await;
        let held = "held pending a systemic-rejection verdict";
        let now = SystemTime::now() + Duration::from_secs(1);
        let (a, b) = (insert(&s, T1, "a").await, insert(&s, T2, "b").await);
        assert_eq!(s.claim("default", now, 10).await.unwrap().len(), 2);
        let hold = RowOutcome::Retry {
            at: now + Duration::from_secs(60),
            error: format!("{held} (...): HTTP 403: no"),
            attempt: true,
            maybe_stored: false,
        };
        s.record(&[(a, hold.clone()), (b, hold)], now)
            .await
            .unwrap();
        // An operator requeued b meanwhile: not held any more.
        sqlx::query("UPDATE outbox SET last_error = 'requeued by an operator' WHERE id = ?1")
            .bind(b)
            .execute(s.pool())
            .await
            .unwrap();
        let judged = [(a, "HTTP 403: no (RequestId r1)".into()), (b, "x".into())];
        assert_eq!(s.dead_letter_held(&judged, held, now).await.unwrap(), 1);
        let rows: Vec<(i64, String, String, i64)> =
            sqlx::query_as("SELECT id, status, last_error, attempts FROM outbox ORDER BY id")
                .fetch_all(s.pool())
                .await
                .unwrap();
        assert_eq!(
            rows,
            [
                (a, "dead".into(), "HTTP 403: no (RequestId r1)".into(), 1),
                (b, "pending".into(), "requeued by an operator".into(), 1)
            ]
        );
    }

    #[test]
    fn timestamps_round_trip_through_text() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_000_000_123);
        let text = timestamp(t);
        assert_eq!(text.len(), 24);
        assert_eq!(parse_timestamp(&text), Some(t));
    }
}
