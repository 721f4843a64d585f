//! Housekeeping on a real SQLite file: delivered rows past retention are
//! deleted, dead rows are kept, and under a steady flow of
//! insert → deliver → prune the file stops growing (and shrinks back after a
//! burst, through incremental vacuum).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::{Duration, SystemTime};

use mews_outbox::housekeeping::prune_and_vacuum;
use mews_outbox::store::{SqliteStore, timestamp};
use tokio_util::sync::CancellationToken;

const DAY: Duration = Duration::from_secs(24 * 3600);

async fn store(dir: &Path) -> SqliteStore {
    SqliteStore::open(&dir.join("outbox.db"), Duration::from_secs(5))
        .await
        .unwrap()
}

/// Inserts `n` rows (1 KB of text each) as a producer would, delivered at
/// `at`; returns their ids. (Delivery itself is tested
/// elsewhere; here only the rows' life after it matters.)
async fn deliver(store: &SqliteStore, n: usize, at: SystemTime) -> Vec<i64> {
    // Inserted pending, then marked delivered: a producer may not insert
    // daemon columns (migration ..06_producer_contract).
    let ids: Vec<i64> = sqlx::query_scalar(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?1)
         INSERT INTO outbox (message_thread_id, text)
         SELECT '7f9325f6-ef44-4911-89a8-ae51010a5aa4', hex(randomblob(500))
         FROM n
         RETURNING id",
    )
    .bind(i64::try_from(n).unwrap())
    .fetch_all(store.pool())
    .await
    .unwrap();
    sqlx::query(
        "UPDATE outbox SET status = 'delivered', delivered_at = ?1,
             mews_message_id = lower(hex(randomblob(16)))
         WHERE id IN (SELECT value FROM json_each(?2))",
    )
    .bind(timestamp(at))
    .bind(serde_json::to_string(&ids).unwrap())
    .execute(store.pool())
    .await
    .unwrap();
    // The update rewrote every page of the burst: have them in the file, as
    // the single insert of delivered rows used to (the WAL would hide them).
    sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
        .execute(store.pool())
        .await
        .unwrap();
    ids
}

fn file_size(dir: &Path) -> u64 {
    std::fs::metadata(dir.join("outbox.db")).unwrap().len()
}

async fn rows_with_status(store: &SqliteStore, status: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM outbox WHERE status = ?1")
        .bind(status)
        .fetch_one(store.pool())
        .await
        .unwrap()
}

#[tokio::test]
async fn delivered_rows_past_retention_are_deleted_and_dead_rows_kept() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path()).await;
    let start = SystemTime::now();
    let old = deliver(&store, 1200, start - 8 * DAY).await;
    let recent = deliver(&store, 10, start - DAY).await;
    // A dead row, delivered-looking in age but dead: kept until an operator acts.
    let dead = deliver(&store, 1, start - 30 * DAY).await;
    sqlx::query("UPDATE outbox SET status = 'dead', last_error = 'refused' WHERE id = ?1")
        .bind(dead[0])
        .execute(store.pool())
        .await
        .unwrap();

    let pass = prune_and_vacuum(&store, 7 * DAY, start, None, &CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(
        pass.pruned,
        old.len() as u64,
        "in batches of 500: 500 + 500 + 200"
    );
    assert_eq!(
        rows_with_status(&store, "delivered").await,
        recent.len() as i64
    );
    assert_eq!(rows_with_status(&store, "dead").await, 1);

    // retention.delivered = 0 keeps everything.
    let pass = prune_and_vacuum(
        &store,
        Duration::ZERO,
        start + 365 * DAY,
        None,
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_eq!(pass.pruned, 0);
    assert_eq!(
        rows_with_status(&store, "delivered").await,
        recent.len() as i64
    );
}

#[tokio::test]
async fn under_a_steady_flow_the_file_stays_bounded_and_shrinks_after_a_burst() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path()).await;
    assert_eq!(store.auto_vacuum_mode().await.unwrap(), 2, "INCREMENTAL");
    let stop = CancellationToken::new();
    let mut day = SystemTime::now();

    // Steady flow: each "day" 2000 rows are delivered and those older than
    // a day are pruned.
    let mut sizes = Vec::new();
    for _ in 0..6 {
        deliver(&store, 2000, day).await;
        day += DAY + Duration::from_secs(1);
        prune_and_vacuum(&store, DAY, day, None, &stop)
            .await
            .unwrap();
        sizes.push(file_size(dir.path()));
    }
    let first = sizes[0];
    let max = *sizes.iter().max().unwrap();
    assert!(
        max <= first + first / 5,
        "the file keeps growing under a steady flow: {sizes:?}"
    );

    // A burst ten times the usual flow, then back to normal: once the burst
    // is past retention the space goes back to the file system.
    deliver(&store, 20_000, day).await;
    let peak = file_size(dir.path());
    day += DAY + Duration::from_secs(1);
    let pass = prune_and_vacuum(&store, DAY, day, None, &stop)
        .await
        .unwrap();
    assert_eq!(pass.pruned, 20_000);
    assert!(pass.pages_freed > 0);
    // The vacuum's last pages may still be in the WAL: the file shrinks at
    // the next checkpoint (the daemon's are automatic).
    sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
        .execute(store.pool())
        .await
        .unwrap();
    let after = file_size(dir.path());
    assert!(
        after < peak / 4,
        "incremental vacuum gave the burst's space back: peak {peak} B, after {after} B"
    );
    assert!(store.free_pages().await.unwrap() < 1024);
    println!("steady sizes {sizes:?} B; burst peak {peak} B, after prune {after} B");
}
