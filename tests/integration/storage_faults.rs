//! Database faults mid-drain: the disk fills up, or another process holds
//! the database locked for longer than the busy timeout. The daemon logs the
//! cause, keeps retrying, loses nothing, and recovers when the fault clears.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::support::daemon::{
    Env, count, hold_write_lock, insert_rows, threads, wait_for_rows, wait_for_status,
};
use crate::support::fake_mews::{FakeMews, Fault};

/// A small tmpfs mounted for one test, unmounted (lazily) when dropped.
struct SmallDisk {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> SmallDisk {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        std::fs::create_dir(&path).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "this test mounts a small tmpfs to fill it up, which needs root (CAP_SYS_ADMIN): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        SmallDisk { path, _dir: dir }
    }

    /// Writes a ballast file until the disk is full; returns its path.
    fn fill(&self) -> PathBuf {
        use std::io::Write;
        let ballast = self.path.join("ballast");
        let mut file = std::fs::File::create(&ballast).unwrap();
        let chunk = vec![0u8; 4096];
        while file.write_all(&chunk).is_ok() {}
        let _ = file.sync_all();
        ballast
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// An environment whose database lives in `dir`.
fn env_in(dir: &Path, base_url: &str) -> Env {
    let env = Env::new(base_url);
    let text = std::fs::read_to_string(&env.config).unwrap();
    let db = dir.join("outbox.db");
    let text = text.replace(
        &format!("path = {:?}", env.db.display().to_string()),
        &format!("path = {:?}", db.display().to_string()),
    );
    std::fs::write(&env.config, text).unwrap();
    Env { db, ..env }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_mid_drain_is_retried_until_space_returns() {
    let disk = SmallDisk::mount("4m");
    let fake = FakeMews::start().await;
    // The first answer comes late, so the disk fills while it is in flight.
    fake.script([Fault::DelayThenNormal(Duration::from_millis(500))]);
    let env = env_in(&disk.path, &fake.base_url);
    let db = env.producer().await;
    insert_rows(&db, 500, &threads(&fake, 500), "disk").await;
    // An empty WAL: the daemon's next writes need fresh space.
    sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
        .execute(&db)
        .await
        .unwrap();

    let mut daemon = env.start();
    daemon.wait_for_log("messages/add: sending").await;
    let ballast = disk.fill();
    let line = daemon.wait_for_log("cannot record delivery outcomes").await;
    assert!(line.contains("full"), "the log says why: {line}");
    assert_eq!(count(&db, "delivered").await, 0);

    std::fs::remove_file(ballast).unwrap();
    wait_for_status(&db, "delivered", 500).await;
    assert_eq!(
        fake.accepted().len(),
        500,
        "recorded once space returned, nothing re-sent"
    );
    println!("disk_full: rows=500 delivered=500 lost=0 duplicates=0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_locked_for_long_is_waited_out() {
    let fake = FakeMews::start().await;
    fake.script([Fault::DelayThenNormal(Duration::from_millis(300))]);
    let env = Env::with(&fake.base_url, &[("busy_timeout", "\"100ms\"")], "");
    let db = env.producer().await;
    insert_rows(&db, 50, &threads(&fake, 50), "locked").await;

    let mut daemon = env.start();
    daemon.wait_for_log("messages/add: sending").await;
    // Another process takes the write lock and keeps it.
    let mut locker = hold_write_lock(&db).await;
    let line = daemon.wait_for_log("cannot record delivery outcomes").await;
    assert!(line.contains("locked") || line.contains("busy"), "{line}");

    sqlx::query("COMMIT").execute(&mut *locker).await.unwrap();
    drop(locker);
    wait_for_status(&db, "delivered", 50).await;
    assert_eq!(fake.accepted().len(), 50);
}

/// The account-state table refuses every write (as a full or broken table
/// would), so no request's start can be recorded: nothing is sent, and the
/// rows wait `pending` with the reason instead of going back untouched.
/// Once the writes work again they are delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_start_that_cannot_be_recorded_leaves_a_reason() {
    let fake = FakeMews::start().await;
    let env = Env::new(&fake.base_url);
    let db = env.producer().await;
    // request_starting is an INSERT ... ON CONFLICT DO UPDATE: refuse both.
    sqlx::query(
        "CREATE TRIGGER test_state_no_insert BEFORE INSERT ON outbox_account_state
         BEGIN SELECT RAISE(ABORT, 'account state refused by the test'); END",
    )
    .execute(&db)
    .await
    .unwrap();
    sqlx::query(
        "CREATE TRIGGER test_state_no_update BEFORE UPDATE ON outbox_account_state
         BEGIN SELECT RAISE(ABORT, 'account state refused by the test'); END",
    )
    .execute(&db)
    .await
    .unwrap();
    insert_rows(&db, 5, &threads(&fake, 5), "stamp").await;

    let mut daemon = env.start();
    daemon
        .wait_for_log("cannot record that a request is starting")
        .await;
    wait_for_rows(
        &db,
        "status = 'pending' AND attempts = 0 AND last_error LIKE
         'not sent: cannot record that a request is starting: %account state refused by the test%'",
        5,
    )
    .await;
    assert!(fake.accepted().is_empty(), "nothing was sent");

    sqlx::query("DROP TRIGGER test_state_no_insert")
        .execute(&db)
        .await
        .unwrap();
    sqlx::query("DROP TRIGGER test_state_no_update")
        .execute(&db)
        .await
        .unwrap();
    wait_for_status(&db, "delivered", 5).await;
    assert_eq!(fake.accepted().len(), 5);
}
