//! The daemon's upkeep of its own database ([`Upkeep`]): flagging rows of
//! accounts nobody configured, pruning delivered rows in small batches,
//! and giving freed pages back to the file system; and the 0660 file.

use std::io::ErrorKind;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::time::SystemTime;

use super::SqliteStore;
use crate::store::report;
use crate::store::{StoreError, Upkeep, timestamp};

/// Mode of a database file the daemon creates: producers in the group write to it.
pub const DATABASE_FILE_MODE: u32 = 0o660;

/// Creates `path` as an empty file with mode 0660 when it does not exist.
/// SQLite treats an empty file as a new database and gives `-wal`/`-shm`
/// the database file's mode; left to itself it would create 0644 & ~umask,
/// which the producers' group cannot write. Returns whether it created it.
pub fn create_database_file(path: &Path) -> std::io::Result<bool> {
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(DATABASE_FILE_MODE)
        .open(path)
    {
        Ok(file) => {
            // The umask may have taken the group's write bit away.
            file.set_permissions(std::fs::Permissions::from_mode(DATABASE_FILE_MODE))?;
            Ok(true)
        }
        Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e),
    }
}

/// Freed pages at which housekeeping gives space back (about 4 MB of 4 KiB
/// pages): below that, new rows reuse them anyway.
const VACUUM_THRESHOLD_PAGES: i64 = 1024;

impl SqliteStore {
    /// Pages on the free list (space a prune left inside the file).
    pub async fn free_pages(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar("PRAGMA freelist_count")
            .fetch_one(self.pool())
            .await?)
    }

    /// `PRAGMA auto_vacuum`: 0 none, 1 full, 2 incremental.
    pub async fn auto_vacuum_mode(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar("PRAGMA auto_vacuum")
            .fetch_one(self.pool())
            .await?)
    }
}

impl Upkeep for SqliteStore {
    /// Accounts that have `pending` rows but are not in `configured`, with
    /// their counts; their rows get a `last_error` saying so, and so do the
    /// rows of configured accounts that wait behind such a row in their
    /// thread (per-thread order holds them: without a reason of their own
    /// they would wait silently).
    async fn flag_unknown_accounts(
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
               AND coalesce(outbox.message_thread_id, outbox.keyed_thread_id) = h.message_thread_id
               AND outbox.id > h.head_id
               AND outbox.status = 'pending'
               AND outbox.account IN (SELECT value FROM json_each(?1))
               AND (outbox.last_error IS NULL OR outbox.last_error LIKE 'waiting behind row %')",
        )
        .bind(&configured)
        .execute(&self.writer)
        .await?;
        report::account_counts(rows)
    }

    /// Deletes up to `limit` rows delivered before `before`, oldest first, in
    /// one short transaction. Returns how many. Dead rows are never touched.
    async fn prune_delivered(&self, before: SystemTime, limit: usize) -> Result<u64, StoreError> {
        let done = sqlx::query(
            // The oldest first straight from the partial index: no walk of
            // every delivered row and no sort (the status index would do both).
            "DELETE FROM outbox WHERE id IN (
                 SELECT id FROM outbox INDEXED BY outbox_delivered_at
                 WHERE status = 'delivered' AND delivered_at < ?1
                 ORDER BY delivered_at LIMIT ?2)",
        )
        .bind(timestamp(before))
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .execute(self.writer())
        .await?;
        Ok(done.rows_affected())
    }

    /// Gives up to `pages` free pages back to the file system (the file
    /// shrinks), when the free list is large enough to be worth it. Needs
    /// `auto_vacuum = INCREMENTAL`, which every database the daemon created
    /// has. Returns the pages given back.
    async fn give_back_free_pages(&self, pages: u32) -> Result<i64, StoreError> {
        let before = self.free_pages().await?;
        if before < VACUUM_THRESHOLD_PAGES {
            return Ok(0);
        }
        let mut conn = self.writer().acquire().await?;
        // A PRAGMA takes no bound parameters; `pages` is a number.
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "PRAGMA incremental_vacuum({pages})"
        )))
        .execute(&mut *conn)
        .await?;
        let after: i64 = sqlx::query_scalar("PRAGMA freelist_count")
            .fetch_one(&mut *conn)
            .await?;
        Ok(before - after)
    }

    /// A file without incremental auto-vacuum (not created by the daemon)
    /// never shrinks.
    async fn storage_warning(&self) -> Option<String> {
        match self.auto_vacuum_mode().await {
            Ok(2) | Err(_) => None,
            Ok(_) => Some("this database file was not created with auto_vacuum=INCREMENTAL, so pruned space is reused but never given back; to fix, stop the daemon and run `sqlite3 FILE 'PRAGMA auto_vacuum=INCREMENTAL; VACUUM;'`".into()),
        }
    }

    async fn flag_threadless_rows(&self) -> Result<Vec<(String, String, u64)>, StoreError> {
        SqliteStore::flag_threadless_rows(self).await
    }
}
