//! The SQLite outbox: WAL mode so producers in other processes insert while
//! the daemon works; set-based claims and updates (one statement per batch).
//!
//! [`SqliteStore`] opens the file and watches it for commits (here); the
//! delivery loop's statements are in `delivery.rs` (their SQL in [`sql`]),
//! the operator's commands in `commands.rs`, upkeep in [`maintenance`], the
//! file itself (the daemon's lock, file system checks) in [`file`](mod@file).

mod commands;
mod delivery;
pub mod file;
pub mod maintenance;
pub mod sql;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod thread_tests;
mod threads;
mod wal_watch;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use sqlx::sqlite::{
    SqliteAutoVacuum, SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{ConnectOptions, Connection, Row, SqliteConnection, SqlitePool};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::store::report;
use crate::store::{
    Acquired, DaemonStore, QueueSummary, StorageLost, StoreError, ThreadCounts, parse_timestamp,
    timestamp,
};
use file::{DaemonLock, FileError};
use wal_watch::WalWatch;

/// The daemon's migration bookkeeping lives in its own table, so an
/// application's own sqlx migrations (`_sqlx_migrations`) in the same
/// database file never collide with ours.
pub const MIGRATIONS_TABLE: &str = "_mews_outbox_migrations";

/// After a burst of WAL writes, how long to wait for quiet before checking
/// that no commit went unseen (see [`DaemonStore::watch_changes`]).
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
    /// Accounts [`DaemonStore::acquire_accounts`] returned already.
    acquired: Arc<Mutex<BTreeSet<String>>>,
    /// The daemon's lock on the file ([`SqliteStore::open_for_daemon`]).
    /// Its descriptor is closed when the last handle is dropped, after
    /// [`SqliteStore::close`] closed SQLite's (see [`DaemonLock`]).
    lock: Option<Arc<DaemonLock>>,
}

/// Why the daemon cannot open its database.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl SqliteStore {
    /// Opens the daemon's database: refuses a network file system before
    /// SQLite touches the file, and locks the file before it is opened, so
    /// a second daemon neither migrates nor recovers anything. The store
    /// keeps the lock, and [`DaemonStore::storage_lost`] reports the file
    /// deleted or replaced under it.
    pub async fn open_for_daemon(
        path: &Path,
        busy_timeout: Duration,
    ) -> Result<SqliteStore, OpenError> {
        file::check_local_filesystem(path)?;
        let lock = DaemonLock::acquire(path)?;
        let mut store = SqliteStore::open(path, busy_timeout).await?;
        store.lock = Some(Arc::new(lock));
        Ok(store)
    }

    /// Opens (creating if missing) the database and applies pending migrations.
    pub async fn open(path: &Path, busy_timeout: Duration) -> Result<SqliteStore, StoreError> {
        maintenance::create_database_file(path).map_err(|source| StoreError::Create {
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
            acquired: Arc::default(),
            lock: None,
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
        super::schema::schema_verdict(&applied, &known).map_err(|problem| StoreError::Schema {
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

    /// [`DaemonStore::watch_changes`] with the safety poll's period given,
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

impl DaemonStore for SqliteStore {
    fn describe(&self) -> String {
        self.path.display().to_string()
    }

    /// Every configured account not returned yet (up to `at_most`): the
    /// file lock already made this daemon the only one on the database.
    async fn acquire_accounts(
        &self,
        configured: &[&str],
        at_most: usize,
    ) -> Result<Vec<Acquired>, StoreError> {
        let mut acquired = self.acquired.lock().unwrap_or_else(PoisonError::into_inner);
        let mut taken = Vec::new();
        for &account in configured {
            if taken.len() >= at_most {
                break;
            }
            if acquired.insert(account.to_owned()) {
                taken.push(Acquired {
                    account: account.to_owned(),
                    token: 0,
                    recovered: 0,
                });
            }
        }
        Ok(taken)
    }

    async fn renew_accounts(&self) -> Result<Vec<String>, StoreError> {
        Ok(Vec::new())
    }

    async fn release_accounts(&self) -> Result<(), StoreError> {
        self.acquired
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        Ok(())
    }

    /// Puts rows left `sending` by a previous daemon (or by an abandoned
    /// generation) back to `pending`, to be read back from Mews before they
    /// are sent again (the request carrying them may have reached Mews).
    /// Mews may still be storing that request, so, like a timed-out one,
    /// they are not due before its start plus `settle`: the account's
    /// `add_started_by` (see [`crate::store::Outbox::request_starting`]), or `now` when it
    /// is unknown. Threads left `creating` likewise (read back with
    /// `messageThreads/getAll` before they are created again). Only safe while holding the [`DaemonLock`] (as [`SqliteStore::open_for_daemon`] does). Returns how many.
    async fn recover_abandoned(
        &self,
        settle: Duration,
        now: SystemTime,
    ) -> Result<u64, StoreError> {
        let settle_modifier = format!("+{:.3} seconds", settle.as_secs_f64());
        let unknown = timestamp(now + settle);
        let mut tx = self.writer.begin().await?;
        let rows = sqlx::query(
            "UPDATE outbox SET status = 'pending', needs_reconcile = 1,
                next_attempt_at = max(next_attempt_at, coalesce(
                    (SELECT strftime('%Y-%m-%dT%H:%M:%fZ', s.add_started_by, ?1)
                     FROM outbox_account_state AS s WHERE s.account = outbox.account),
                    ?2))
             WHERE status = 'sending'",
        )
        .bind(&settle_modifier)
        .bind(&unknown)
        .execute(&mut *tx)
        .await?;
        // Threads left `creating`: their `messageThreads/add` may have
        // reached Mews; read back (after the same settling) before again.
        let threads = sqlx::query(
            "UPDATE outbox_threads SET status = 'pending', needs_reconcile = 1,
                next_attempt_at = max(next_attempt_at, coalesce(
                    (SELECT strftime('%Y-%m-%dT%H:%M:%fZ', s.add_started_by, ?1)
                     FROM outbox_account_state AS s WHERE s.account = outbox_threads.account),
                    ?2))
             WHERE status = 'creating'",
        )
        .bind(&settle_modifier)
        .bind(&unknown)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(rows.rows_affected() + threads.rows_affected())
    }

    /// Watches for commits by other connections (producers in other
    /// processes, and this process's own writes); the returned receiver
    /// changes on each.
    ///
    /// Wakes on writes to the WAL file (`wal_watch::WalWatch`): no cost while idle,
    /// well under a millisecond from a producer's commit. A write can be seen
    /// a moment before the commit is (SQLite publishes it in the shared WAL
    /// index right after), so each burst of writes is followed, after
    /// [`WAL_RECHECK`] of quiet, by a check of `PRAGMA data_version`; and
    /// that check also runs every [`SAFETY_POLL`]. Where the WAL cannot be
    /// watched, `PRAGMA data_version` is polled every `poll_interval`.
    async fn watch_changes(
        &self,
        poll_interval: Duration,
        shutdown: CancellationToken,
    ) -> Result<watch::Receiver<u64>, StoreError> {
        self.watch_changes_polling(poll_interval, SAFETY_POLL, shutdown)
            .await
    }

    /// Counts of unfinished and dead rows per account (through the status
    /// index; delivered rows are not counted) and deliveries since `since`.
    async fn queue_summary(&self, since: SystemTime) -> Result<QueueSummary, StoreError> {
        let mut summary = QueueSummary::default();
        let rows = sqlx::query(
            "SELECT account, status, count(*) AS n,
                    min(CASE WHEN status = 'pending' THEN created_at END) AS oldest
             FROM outbox WHERE status IN ('pending', 'sending', 'dead')
             GROUP BY account, status",
        )
        .fetch_all(self.pool())
        .await?;
        for row in rows {
            let oldest = row
                .try_get::<Option<String>, _>("oldest")?
                .as_deref()
                .and_then(parse_timestamp);
            report::queue_count(
                &mut summary,
                row.try_get("account")?,
                row.try_get("status")?,
                row.try_get("n")?,
                oldest,
            );
        }
        let delivered: i64 = sqlx::query_scalar(
            // Without statistics SQLite would walk every delivered row
            // through the status index; the partial index reads only the new ones.
            "SELECT count(*) FROM outbox INDEXED BY outbox_delivered_at
             WHERE status = 'delivered' AND delivered_at > ?1",
        )
        .bind(timestamp(since))
        .fetch_one(self.pool())
        .await?;
        summary.delivered_since = u64::try_from(delivered).unwrap_or(0);
        let rows = sqlx::query(
            "SELECT account, status, count(*) AS n FROM outbox_threads GROUP BY account, status",
        )
        .fetch_all(self.pool())
        .await?;
        let mut threads: BTreeMap<String, ThreadCounts> = BTreeMap::new();
        for row in rows {
            let counts = threads.entry(row.try_get("account")?).or_default();
            report::thread_count(counts, row.try_get("status")?, row.try_get("n")?);
        }
        for (account, n) in self.messages_waiting().await? {
            threads.entry(account).or_default().messages_waiting = n;
        }
        // An account with only created threads has nothing to report (as
        // one with only delivered rows), as on PostgreSQL.
        for (account, counts) in threads {
            let unfinished =
                counts.pending + counts.creating + counts.dead + counts.messages_waiting;
            match summary.accounts.get_mut(&account) {
                Some(entry) => entry.threads = counts,
                None if unfinished == 0 => {}
                None => summary.accounts.entry(account).or_default().threads = counts,
            }
        }
        Ok(summary)
    }

    async fn close(&self) {
        SqliteStore::close(self).await;
    }

    /// The database path no longer leads to the locked file (a store not
    /// opened by [`SqliteStore::open_for_daemon`] holds no lock: `None`).
    fn storage_lost(&self) -> Option<StorageLost> {
        let change = self.lock.as_ref()?.change()?;
        Some(StorageLost {
            reason: change.to_string(),
            on_restart: "on the file now at that path (a missing one is created empty). If this was a mistake, stop the service and put the right database file back first".into(),
        })
    }
}

async fn data_version(conn: &mut SqliteConnection) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("PRAGMA data_version")
        .fetch_one(conn)
        .await
}
