//! The database file itself: one daemon per file whatever path reaches it,
//! a file deleted or replaced under the daemon, commands that must not
//! create a database, and the read-only commands for a user who may only
//! read it.

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use crate::support::daemon::{
    Daemon, Env, WAIT, count, insert_rows, mews_outbox_command, threads, wait_for_status,
};
use crate::support::fake_mews::{FakeMews, Fault};

/// A copy of `env`'s configuration whose `database.path` is `database`.
fn config_for(env: &Env, database: &Path, name: &str) -> PathBuf {
    let text = env.config_text().replace(
        &format!("path = {:?}", env.db.display().to_string()),
        &format!("path = {:?}", database.display().to_string()),
    );
    assert!(text.contains(&database.display().to_string()));
    let config = env.path().join(name);
    std::fs::write(&config, text).unwrap();
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600)).unwrap();
    config
}

#[tokio::test]
async fn a_second_daemon_through_a_symlink_a_hard_link_or_dot_dot_is_refused_and_nothing_is_resent()
{
    let fake = FakeMews::start().await;
    // The first request stays in flight while the others try to start: its
    // rows are `sending`, which a second daemon would take for abandoned.
    fake.script([Fault::DelayThenNormal(Duration::from_secs(3))]);
    let env = Env::with(&fake.base_url, &[("request_timeout", "\"20s\"")], "");
    let db = env.producer().await;
    insert_rows(&db, 50, &threads(&fake, 50), "first").await;
    let mut first = env.start();
    first.wait_for_log("messages/add: sending").await;

    let symlink = env.path().join("symlink.db");
    std::os::unix::fs::symlink(&env.db, &symlink).unwrap();
    let hard_link = env.path().join("hard-link.db");
    std::fs::hard_link(&env.db, &hard_link).unwrap();
    let dir_name = env.path().file_name().unwrap();
    let dot_dot = env.path().join("..").join(dir_name).join("outbox.db");
    for (i, alias) in [symlink, hard_link, dot_dot].iter().enumerate() {
        let config = config_for(&env, alias, &format!("alias-{i}.toml"));
        let mut second = Daemon::start(&config, &["run"]);
        let status = second.wait_exit(WAIT).await;
        assert!(!status.success(), "{alias:?}: {status}");
        assert!(
            second
                .log()
                .contains("another mews-outbox daemon is already running on"),
            "{alias:?}:\n{}",
            second.log()
        );
        assert_eq!(second.count_log("rows left `sending`"), 0, "{alias:?}");
    }

    // The lock blocks neither producers nor the other commands.
    insert_rows(&db, 10, &threads(&fake, 10), "while locked").await;
    let cli_thread = "7f9325f6-ef44-4911-89a8-ae51010a5aa4";
    fake.register_threads(crate::support::daemon::ACCESS_TOKEN, [cli_thread]);
    let (status, id, err) = env
        .cli(&[
            "enqueue",
            "--thread",
            "7f9325f6-ef44-4911-89a8-ae51010a5aa4",
            "--text",
            "from the CLI",
        ])
        .await;
    assert!(status.success(), "{err}");
    assert_eq!(id.trim(), "61");
    let (status, _, err) = env.cli(&["status"]).await;
    assert!(status.success(), "{err}");

    wait_for_status(&db, "delivered", 61).await;
    let accepted = fake.accepted();
    let mut copies: BTreeMap<Option<String>, usize> = BTreeMap::new();
    for m in &accepted {
        *copies.entry(m.identifier.clone()).or_default() += 1;
    }
    assert_eq!(accepted.len(), 61, "each message stored once");
    assert_eq!(copies.len(), 61, "no identifier twice: {copies:?}");
    assert_eq!(
        fake.add_requests()[0].message_count,
        50,
        "the first request carried the 50 rows"
    );
    assert_eq!(first.count_log("rows left `sending`"), 0);
}

#[tokio::test]
async fn deleting_the_database_under_a_running_daemon_stops_it_with_an_error() {
    let fake = FakeMews::start().await;
    let env = Env::new(&fake.base_url);
    let db = env.producer().await;
    db.close().await;
    let mut daemon = env.start().ready().await;

    std::fs::remove_file(&env.db).unwrap();
    let status = daemon.wait_exit(WAIT).await;
    assert_eq!(status.code(), Some(1), "{}", daemon.log());
    assert_eq!(
        daemon.count_log("ERROR mews_outbox::daemon: the database file"),
        1,
        "{}",
        daemon.log()
    );
    assert!(
        daemon
            .log()
            .contains("was deleted while the daemon was running"),
        "{}",
        daemon.log()
    );
    assert!(!env.db.exists(), "nothing created in its place");
}

#[tokio::test]
async fn replacing_the_database_under_a_running_daemon_stops_it_with_an_error() {
    let fake = FakeMews::start().await;
    let env = Env::new(&fake.base_url);
    let db = env.producer().await;
    db.close().await;
    let mut daemon = env.start().ready().await;

    let other = env.path().join("restored.db");
    std::fs::copy(&env.db, &other).unwrap();
    let replacement_inode = std::fs::metadata(&other).unwrap().ino();
    std::fs::rename(&other, &env.db).unwrap();
    let status = daemon.wait_exit(WAIT).await;
    assert_eq!(status.code(), Some(1), "{}", daemon.log());
    assert_eq!(
        daemon.count_log("ERROR mews_outbox::daemon: the database path"),
        1,
        "{}",
        daemon.log()
    );
    assert!(daemon.log().contains("it was replaced"), "{}", daemon.log());
    assert_eq!(std::fs::metadata(&env.db).unwrap().ino(), replacement_inode);
}

/// How `enqueue` used to fill a file nobody serves: a reload reconnected to
/// the deleted path, SQLite created an empty file there, and `enqueue`
/// found a file, migrated it and queued the message into it.
#[tokio::test]
async fn a_reload_after_the_database_was_deleted_creates_nothing_for_enqueue_to_fill() {
    let fake = FakeMews::start().await;
    let env = Env::new(&fake.base_url);
    env.producer().await.close().await;
    let mut daemon = env.start().ready().await;

    std::fs::remove_file(&env.db).unwrap();
    daemon.signal("HUP");
    let status = daemon.wait_exit(WAIT).await;
    assert_eq!(status.code(), Some(1), "{}", daemon.log());
    let (status, _, err) = env
        .cli(&[
            "enqueue",
            "--thread",
            "7f9325f6-ef44-4911-89a8-ae51010a5aa4",
            "--text",
            "lost?",
        ])
        .await;
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("there is no outbox database at"), "{err}");
    assert!(!env.db.exists(), "a database nobody serves was created");
}

#[tokio::test]
async fn only_run_and_migrate_create_a_missing_database() {
    let fake = FakeMews::start().await;
    let env = Env::new(&fake.base_url);
    for args in [
        &[
            "enqueue",
            "--thread",
            "7f9325f6-ef44-4911-89a8-ae51010a5aa4",
            "--text",
            "hi",
        ][..],
        &["status"],
        &["status", "--json"],
        &["dead", "list"],
        &["dead", "requeue", "--all"],
        &["dead", "purge", "--older-than", "1d"],
    ] {
        let (status, _, err) = env.cli(args).await;
        assert_eq!(status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.contains("there is no outbox database at"),
            "{args:?}: {err}"
        );
        assert_eq!(files_in(env.path()), ["mews-outbox.toml"], "{args:?}");
    }
    let (status, _, err) = env.cli(&["check-config", "--online"]).await;
    assert!(status.success(), "{err}");
    assert_eq!(files_in(env.path()), ["mews-outbox.toml"]);

    let (status, out, err) = env.cli(&["migrate"]).await;
    assert!(status.success(), "{err}");
    assert!(out.starts_with("migrations applied to"), "{out}");
    assert!(env.db.exists());
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// The database file's bytes and modification time.
fn snapshot(path: &Path) -> (Vec<u8>, std::time::SystemTime) {
    (
        std::fs::read(path).unwrap(),
        std::fs::metadata(path).unwrap().modified().unwrap(),
    )
}

#[tokio::test]
async fn status_and_dead_list_read_without_writing_and_report_a_schema_they_would_have_to_migrate()
{
    let fake = FakeMews::start().await;
    let env = Env::new(&fake.base_url);

    // An empty file, as the package's tmpfiles.d creates it.
    std::fs::write(&env.db, b"").unwrap();
    let (status, _, err) = env.cli(&["status"]).await;
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("has no outbox tables yet"), "{err}");
    assert_eq!(std::fs::metadata(&env.db).unwrap().len(), 0, "not migrated");

    // A database at the binary's schema: read, and nothing written.
    let db = env.producer().await;
    insert_rows(&db, 2, &threads(&fake, 2), "queued").await;
    db.close().await;
    let before = snapshot(&env.db);
    let (status, out, err) = env.cli(&["status", "--json"]).await;
    assert!(status.success(), "{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["totals"]["pending"], 2, "{out}");
    let (status, out, err) = env.cli(&["dead", "list"]).await;
    assert!(status.success(), "{err}");
    assert_eq!(out.trim(), "no dead rows");
    assert!(snapshot(&env.db) == before, "the file was written");

    // One migration behind the binary: reported, not migrated.
    let db = env.producer().await;
    let last: i64 = sqlx::query_scalar("SELECT max(version) FROM _mews_outbox_migrations")
        .fetch_one(&db)
        .await
        .unwrap();
    sqlx::query("DELETE FROM _mews_outbox_migrations WHERE version = ?1")
        .bind(last)
        .execute(&db)
        .await
        .unwrap();
    db.close().await;
    let before = snapshot(&env.db);
    for args in [&["status"][..], &["dead", "list"]] {
        let (status, _, err) = env.cli(args).await;
        assert_eq!(status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.contains(&format!(
                "has an older outbox schema (migrations [{last}] not applied)"
            )),
            "{args:?}: {err}"
        );
        assert!(err.contains("run `mews-outbox migrate`"), "{err}");
    }
    assert!(snapshot(&env.db) == before, "the file was written");

    // Migrated by a newer binary: reported, not touched (newer wins over
    // the migration still missing).
    let db =
        sqlx::SqlitePool::connect_with(sqlx::sqlite::SqliteConnectOptions::new().filename(&env.db))
            .await
            .unwrap();
    sqlx::query(
        "INSERT INTO _mews_outbox_migrations (version, description, success, checksum, execution_time)
         VALUES (99990101000000, 'from the future', 1, x'00', 0)",
    )
    .execute(&db)
    .await
    .unwrap();
    db.close().await;
    let before = snapshot(&env.db);
    let (status, _, err) = env.cli(&["status"]).await;
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains("was migrated by a newer mews-outbox (unknown migrations [99990101000000]); use that version's binary"),
        "{err}"
    );
    assert!(snapshot(&env.db) == before, "the file was written");
}

/// A database of the schema before threads (migration 6), as the previous
/// version left it, its newest rows pruned: the read-only commands refuse
/// it naming the missing migration; `migrate` rebuilds `outbox` keeping
/// every row, and the next id is above every id ever given (the
/// `Identifier` Mews matches on read-back).
#[tokio::test]
async fn a_database_from_before_threads_is_reported_by_status_then_upgraded_by_migrate() {
    let env = Env::new("http://127.0.0.1:9");
    mews_outbox::store::sqlite::maintenance::create_database_file(&env.db).unwrap();
    let db = sqlx::SqlitePool::connect_with(
        sqlx::sqlite::SqliteConnectOptions::new()
            .filename(&env.db)
            .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal),
    )
    .await
    .unwrap();
    let mut before_threads = sqlx::migrate!("./migrations");
    let threads_migration = 20261207000007;
    before_threads.migrations = before_threads
        .migrations
        .iter()
        .filter(|m| m.version < threads_migration)
        .cloned()
        .collect::<Vec<_>>()
        .into();
    before_threads.dangerous_set_table_name(mews_outbox::store::sqlite::MIGRATIONS_TABLE);
    before_threads.run(&db).await.unwrap();
    let thread = "7f9325f6-ef44-4911-89a8-ae51010a5aa4";
    for i in 0..5 {
        sqlx::query("INSERT INTO outbox (message_thread_id, text) VALUES (?1, ?2)")
            .bind(thread)
            .bind(format!("m{i}"))
            .execute(&db)
            .await
            .unwrap();
    }
    sqlx::query("DELETE FROM outbox WHERE id > 3")
        .execute(&db)
        .await
        .unwrap();
    db.close().await;

    let before = snapshot(&env.db);
    let (status, _, err) = env.cli(&["status"]).await;
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "has an older outbox schema (migrations [{threads_migration}] not applied)"
        )),
        "{err}"
    );
    assert!(snapshot(&env.db) == before, "the file was written");

    let (status, _, err) = env.cli(&["migrate"]).await;
    assert!(status.success(), "{err}");
    let (status, out, err) = env.cli(&["status", "--json"]).await;
    assert!(status.success(), "{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["totals"]["pending"], 3, "{out}");
    let db = env.producer().await;
    let texts: Vec<(i64, String)> = sqlx::query_as("SELECT id, text FROM outbox ORDER BY id")
        .fetch_all(&db)
        .await
        .unwrap();
    assert_eq!(
        texts,
        [
            (1, "m0".to_owned()),
            (2, "m1".to_owned()),
            (3, "m2".to_owned())
        ]
    );
    let next: i64 = sqlx::query_scalar(
        "INSERT INTO outbox (thread_key, text) VALUES ('booking-1', 'keyed') RETURNING id",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(next, 6, "above the pruned ids 4 and 5");
}

/// Runs the binary as user `nobody` (uid and gid 65534, no other groups).
async fn as_nobody(config: &Path, args: &[&str]) -> (ExitStatus, String, String) {
    let bin = env!("CARGO_BIN_EXE_mews-outbox");
    let inner = mews_outbox_command();
    let mut command = tokio::process::Command::new("setpriv");
    command
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            bin,
            "--config",
        ])
        .arg(config)
        .args(args);
    // The same environment scrubbing as for every test run of the binary.
    for (key, value) in inner.as_std().get_envs() {
        match value {
            Some(v) => command.env(key, v),
            None => command.env_remove(key),
        };
    }
    let out = command.output().await.expect("run setpriv");
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn a_user_who_can_only_read_the_files_runs_status_dead_list_and_check_config_while_the_daemon_runs()
 {
    let fake = FakeMews::start().await;
    let env = Env::new(&fake.base_url);
    let db = env.producer().await;
    insert_rows(&db, 3, &threads(&fake, 3), "read me").await;
    let mut daemon = env.start().ready().await;
    wait_for_status(&db, "delivered", 3).await;

    // Readable by everyone, writable by root only: the directory too, so
    // nobody can create or write any file of the database.
    let mode = |path: &Path, mode: u32| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap()
    };
    mode(env.path(), 0o755);
    for suffix in ["", "-wal", "-shm"] {
        let file = PathBuf::from(format!("{}{suffix}", env.db.display()));
        assert!(file.exists(), "{file:?}: the daemon runs in WAL mode");
        mode(&file, 0o644);
    }
    // Tokens: the configuration stays private, to its reader.
    std::os::unix::fs::chown(&env.config, Some(65534), Some(65534)).unwrap();

    let (status, out, err) = as_nobody(&env.config, &["status", "--json"]).await;
    assert!(status.success(), "{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["totals"]["delivered"], 3, "{out}");
    let (status, out, err) = as_nobody(&env.config, &["dead", "list"]).await;
    assert!(status.success(), "{err}");
    assert_eq!(out.trim(), "no dead rows");
    let (status, out, err) = as_nobody(&env.config, &["check-config"]).await;
    assert!(status.success(), "{err}");
    assert!(out.starts_with("# configuration is valid"), "{out}");
    // A writing command is refused by the file modes, not half done.
    let (status, _, err) = as_nobody(
        &env.config,
        &[
            "enqueue",
            "--thread",
            "7f9325f6-ef44-4911-89a8-ae51010a5aa4",
            "--text",
            "x",
        ],
    )
    .await;
    assert_eq!(status.code(), Some(1), "{err}");
    assert_eq!(count(&db, "pending").await, 0);

    // Stopped, the last connection gone: SQLite removed -wal and -shm, and
    // reading would need to create them. Said so, with the permission needed.
    db.close().await;
    daemon.signal("TERM");
    assert!(daemon.wait_exit(WAIT).await.success());
    assert!(!Path::new(&format!("{}-wal", env.db.display())).exists());
    let (status, _, err) = as_nobody(&env.config, &["status"]).await;
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains("SQLite must create them, which needs write access to the directory"),
        "{err}"
    );
}

/// What `mews-outbox status` typed on a server with the package reads: the
/// packaged configuration names the database the unit serves.
#[tokio::test]
async fn the_packaged_configuration_names_the_services_database() {
    let packaged = concat!(env!("CARGO_MANIFEST_DIR"), "/config/mews-outbox.toml");
    let out = mews_outbox_command()
        .args(["--config", packaged, "check-config"])
        .output()
        .await
        .unwrap();
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        printed.contains("path = \"/var/lib/mews-outbox/outbox.db\""),
        "{printed}"
    );
    let tmpfiles = include_str!("../../systemd/mews-outbox.tmpfiles");
    assert!(
        tmpfiles.contains("\nf /var/lib/mews-outbox/outbox.db 0660 "),
        "the database tmpfiles.d creates"
    );
}
