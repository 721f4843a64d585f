//! Runs the real `mews-outbox` binary against a temporary SQLite file and a
//! fake Mews, and reads both back. Waits are on events with a timeout: a log
//! line, a process exit, or a database condition checked as it changes.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;

use crate::support::fake_mews::FakeMews;

pub const CLIENT_TOKEN: &str = "test-client-token-SECRET-c1";
pub const ACCESS_TOKEN: &str = "test-access-token-SECRET-a1";
pub const WAIT: Duration = Duration::from_secs(30);

/// A temporary directory with a config file pointing at a fake Mews.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub db: PathBuf,
    pub config: PathBuf,
}

impl Env {
    /// Fast retries and pauses, so tests finish quickly.
    pub fn new(base_url: &str) -> Env {
        Env::with(base_url, &[], "")
    }

    /// Like [`Env::new`], with `key = value` lines of the template replaced
    /// (`("max_attempts", "10")`) and `extra` appended (further sections).
    pub fn with(base_url: &str, overrides: &[(&str, &str)], extra: &str) -> Env {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("outbox.db");
        let config = dir.path().join("mews-outbox.toml");
        let text = format!(
            r#"[database]
path = {db:?}
busy_timeout = "5s"

[mews]
base_url = "{base_url}"
client_token = "{CLIENT_TOKEN}"
request_timeout = "2s"

[accounts.default]
access_token = "{ACCESS_TOKEN}"
rate_limit = "200/30s"

[delivery]
batch_size = 1000
poll_interval = "5ms"
max_concurrent_requests = 4
drain_timeout = "5s"
reconcile = true

[retry]
base_delay = "20ms"
max_delay = "200ms"
max_attempts = 5
pause_base = "100ms"
pause_max = "1s"
breaker_failures = 5
{extra}
"#,
            db = db.display().to_string()
        );
        let text: String = text
            .lines()
            .map(|line| {
                let key = line.split(" = ").next().unwrap_or_default();
                match overrides.iter().find(|(k, _)| *k == key) {
                    Some((k, v)) => format!("{k} = {v}\n"),
                    None => format!("{line}\n"),
                }
            })
            .collect();
        for (key, _) in overrides {
            assert!(
                text.contains(&format!("\n{key} = ")),
                "no key {key} in the template"
            );
        }
        std::fs::write(&config, text).expect("write config");
        // It holds tokens: the daemon refuses it when every user can read it.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600))
            .expect("chmod config");
        Env { dir, db, config }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Starts `mews-outbox run` with this config.
    pub fn start(&self) -> Daemon {
        Daemon::start(&self.config, &["run"])
    }

    /// Starts `mews-outbox run` with extra environment variables.
    pub fn start_with_env(&self, vars: &[(&str, &str)]) -> Daemon {
        Daemon::start_with_env(&self.config, &["run"], vars)
    }

    /// Replaces the config file (kept private: it holds tokens).
    pub fn rewrite_config(&self, text: &str) {
        std::fs::write(&self.config, text).expect("write config");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&self.config, std::fs::Permissions::from_mode(0o600))
            .expect("chmod config");
    }

    pub fn config_text(&self) -> String {
        std::fs::read_to_string(&self.config).expect("read config")
    }

    /// Runs a CLI command to completion: (exit status, stdout, stderr).
    pub async fn cli(&self, args: &[&str]) -> (ExitStatus, String, String) {
        self.cli_with_env(args, &[]).await
    }

    /// Like [`Env::cli`], with extra environment variables.
    pub async fn cli_with_env(
        &self,
        args: &[&str],
        vars: &[(&str, &str)],
    ) -> (ExitStatus, String, String) {
        let out = mews_outbox_command()
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .envs(vars.iter().copied())
            .output()
            .await
            .expect("run mews-outbox");
        (
            out.status,
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// A pool on the outbox file, as a producer would open it. Creates the
    /// schema first (through the CLI, the supported way).
    pub async fn producer(&self) -> SqlitePool {
        self.producer_with_env(&[]).await
    }

    /// Like [`Env::producer`], migrating with extra environment variables.
    pub async fn producer_with_env(&self, vars: &[(&str, &str)]) -> SqlitePool {
        let (status, _, err) = self.cli_with_env(&["migrate"], vars).await;
        assert!(status.success(), "migrate failed: {err}");
        SqlitePoolOptions::new()
            .max_connections(2)
            .connect_with(
                SqliteConnectOptions::new()
                    .filename(&self.db)
                    .journal_mode(SqliteJournalMode::Wal)
                    .busy_timeout(Duration::from_secs(10)),
            )
            .await
            .expect("open outbox")
    }
}

/// The binary, with none of the runner's environment that would change what
/// it does: its own settings (`MEWS_OUTBOX__*`), a systemd it is not under
/// (`NOTIFY_SOCKET`, `WATCHDOG_*`, `CREDENTIALS_DIRECTORY`, `JOURNAL_STREAM`)
/// and log settings (`RUST_LOG`). A test sets what it means to test.
pub fn mews_outbox_command() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_mews-outbox"));
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        if key.starts_with("MEWS_OUTBOX")
            || matches!(
                key,
                "NOTIFY_SOCKET"
                    | "WATCHDOG_USEC"
                    | "WATCHDOG_PID"
                    | "CREDENTIALS_DIRECTORY"
                    | "JOURNAL_STREAM"
                    | "RUST_LOG"
                    | "LISTEN_FDS"
                    | "LISTEN_PID"
            )
        {
            command.env_remove(key);
        }
    }
    command
}

/// A running daemon process whose stderr is collected line by line.
pub struct Daemon {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    seen: watch::Receiver<usize>,
}

impl Daemon {
    pub fn start(config: &Path, args: &[&str]) -> Daemon {
        Daemon::start_with_env(config, args, &[])
    }

    /// Like [`Daemon::start`], with extra environment variables (they win
    /// over the default `RUST_LOG`).
    pub fn start_with_env(config: &Path, args: &[&str], vars: &[(&str, &str)]) -> Daemon {
        let mut child = mews_outbox_command()
            .arg("--config")
            .arg(config)
            .args(args)
            .env("RUST_LOG", "mews_outbox=debug,info")
            .envs(vars.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn mews-outbox");
        let stderr = child.stderr.take().expect("stderr piped");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, seen) = watch::channel(0);
        let collected = lines.clone();
        tokio::spawn(async move {
            // Bytes, not `lines()`: a line that is not UTF-8 must not end the log.
            let mut reader = BufReader::new(stderr);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                let line = match reader.read_until(b'\n', &mut buf).await {
                    Ok(0) => break,
                    Ok(_) => String::from_utf8_lossy(&buf).trim_end().to_owned(),
                    Err(e) => format!("<cannot read the daemon's stderr: {e}>"),
                };
                let mut all = collected.lock().expect("log lock");
                all.push(line);
                let _ = tx.send(all.len());
            }
        });
        Daemon { child, lines, seen }
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("daemon still running")
    }

    /// Lines logged so far that contain `needle`.
    pub fn count_log(&self, needle: &str) -> usize {
        self.lines
            .lock()
            .expect("log lock")
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// Waits until `n` logged lines contain `needle`.
    pub async fn wait_for_log_count(&mut self, needle: &str, n: usize) {
        let found = tokio::time::timeout(WAIT, async {
            while self.count_log(needle) < n {
                if self.seen.changed().await.is_err() {
                    panic!(
                        "daemon output ended without {n}× {needle:?}:\n{}",
                        self.log()
                    );
                }
            }
        })
        .await;
        if found.is_err() {
            panic!(
                "fewer than {n} lines with {needle:?} within {WAIT:?}:\n{}",
                self.log()
            );
        }
    }

    /// Everything logged so far.
    pub fn log(&self) -> String {
        self.lines.lock().expect("log lock").join("\n")
    }

    /// Waits until a logged line contains `needle`; returns that line.
    pub async fn wait_for_log(&mut self, needle: &str) -> String {
        let found = tokio::time::timeout(WAIT, async {
            loop {
                if let Some(line) = self
                    .lines
                    .lock()
                    .expect("log lock")
                    .iter()
                    .find(|l| l.contains(needle))
                {
                    return line.clone();
                }
                if self.seen.changed().await.is_err() {
                    let exit = self.child.wait().await;
                    panic!(
                        "daemon output ended ({exit:?}) without {needle:?}:\n{}",
                        self.log()
                    );
                }
            }
        })
        .await;
        found.unwrap_or_else(|_| {
            panic!(
                "no log line with {needle:?} within {WAIT:?}:\n{}",
                self.log()
            )
        })
    }

    pub async fn ready(mut self) -> Daemon {
        self.wait_for_log("ready: delivering").await;
        self
    }

    pub fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// SIGKILL, as a crash would.
    pub async fn crash(&mut self) {
        self.child.kill().await.expect("SIGKILL");
    }

    /// Waits for the process to exit and for its last log line to be
    /// collected (the reader sees the end of stderr after the exit).
    pub async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let status = match tokio::time::timeout(within, self.child.wait()).await {
            Ok(status) => status.expect("wait"),
            Err(_) => panic!("daemon still running after {within:?}:\n{}", self.log()),
        };
        let drained = tokio::time::timeout(within, async {
            // Err: the reader dropped its sender at the end of stderr.
            while self.seen.changed().await.is_ok() {}
        })
        .await;
        assert!(drained.is_ok(), "stderr still open after the exit");
        status
    }
}

/// Inserts `n` rows spread round-robin over `threads` thread ids, in one
/// transaction; returns their ids in insertion order.
pub async fn insert_rows(
    pool: &SqlitePool,
    n: usize,
    threads: &[String],
    prefix: &str,
) -> Vec<i64> {
    insert_rows_for(pool, "default", n, threads, prefix).await
}

/// [`insert_rows`] for another account.
pub async fn insert_rows_for(
    pool: &SqlitePool,
    account: &str,
    n: usize,
    threads: &[String],
    prefix: &str,
) -> Vec<i64> {
    let mut tx = pool.begin().await.expect("begin");
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO outbox (message_thread_id, text, account) VALUES (?1, ?2, ?3) RETURNING id",
        )
        .bind(&threads[i % threads.len()])
        .bind(format!("{prefix} {i}"))
        .bind(account)
        .fetch_one(&mut *tx)
        .await
        .expect("insert");
        ids.push(id);
    }
    tx.commit().await.expect("commit");
    ids
}

/// `n` fresh thread ids, registered with `fake` as threads this client
/// created earlier with the default account's `AccessToken`: Mews adds
/// messages only to those ([`FakeOptions::enforce_thread_ownership`]).
///
/// [`FakeOptions::enforce_thread_ownership`]: crate::support::fake_mews::FakeOptions
pub fn threads(fake: &FakeMews, n: usize) -> Vec<String> {
    threads_for(fake, ACCESS_TOKEN, n)
}

/// [`threads`] for another account's `AccessToken`.
pub fn threads_for(fake: &FakeMews, access_token: &str, n: usize) -> Vec<String> {
    let ids = unregistered_threads(n);
    fake.register_threads(access_token, &ids);
    ids
}

/// `n` fresh thread ids no fake knows: Mews refuses messages to them.
pub fn unregistered_threads(n: usize) -> Vec<String> {
    (0..n).map(|_| uuid::Uuid::new_v4().to_string()).collect()
}

/// Counts rows per status.
/// Takes the database's write lock as a producer holding a long write
/// transaction would, and keeps it until the connection is given back
/// (`ROLLBACK`/`COMMIT` on it first).
pub async fn hold_write_lock(pool: &SqlitePool) -> sqlx::pool::PoolConnection<sqlx::Sqlite> {
    let mut locker = pool.acquire().await.expect("connection");
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut *locker)
        .await
        .expect("take the write lock");
    locker
}

pub async fn count(pool: &SqlitePool, status: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM outbox WHERE status = ?1")
        .bind(status)
        .fetch_one(pool)
        .await
        .expect("count")
}

/// Waits until `SELECT count(*) ... WHERE status = ?` reaches `n`, checking
/// each time the database changes (PRAGMA data_version on one connection).
pub async fn wait_for_status(pool: &SqlitePool, status: &str, n: i64) {
    wait_for_rows(pool, &format!("status = '{status}'"), n).await;
}

/// [`wait_for_status`] with a longer limit, for the large scenarios.
pub async fn wait_for_status_within(pool: &SqlitePool, status: &str, n: i64, within: Duration) {
    wait_for_rows_within(pool, &format!("status = '{status}'"), n, within).await;
}

/// Waits until `SELECT count(*) FROM outbox WHERE <condition>` reaches `n`,
/// checking each time the database changes.
pub async fn wait_for_rows(pool: &SqlitePool, condition: &str, n: i64) {
    wait_for_rows_within(pool, condition, n, WAIT).await;
}

async fn wait_for_rows_within(pool: &SqlitePool, condition: &str, n: i64, within: Duration) {
    let query = format!("SELECT count(*) FROM outbox WHERE {condition}");
    let mut conn = pool.acquire().await.expect("connection");
    let result = tokio::time::timeout(within, async {
        let mut last_version = -1i64;
        loop {
            let version: i64 = sqlx::query_scalar("PRAGMA data_version")
                .fetch_one(&mut *conn)
                .await
                .expect("data_version");
            if version != last_version {
                last_version = version;
                let have: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(query.clone()))
                    .fetch_one(&mut *conn)
                    .await
                    .expect("count");
                if have >= n {
                    return;
                }
            }
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    if result.is_err() {
        let have: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(query.clone()))
            .fetch_one(pool)
            .await
            .expect("count");
        panic!("timed out after {within:?} waiting for {n} rows with {condition}; have {have}");
    }
}

#[derive(Debug, sqlx::FromRow)]
pub struct Row {
    pub id: i64,
    /// The row's effective thread: `message_thread_id`, or its
    /// `thread_key`'s Mews thread once created (empty before).
    pub message_thread_id: String,
    /// Bytes, since a hostile producer can store text that is not UTF-8.
    pub text: Vec<u8>,
    pub status: String,
    pub account: String,
    pub attempts: i64,
    pub last_error: Option<String>,
    pub mews_message_id: Option<String>,
    pub mews_created_utc: Option<String>,
    pub mews_sender: Option<String>,
}

/// Rows of one account.
pub async fn rows_of(pool: &SqlitePool, account: &str) -> Vec<Row> {
    rows(pool)
        .await
        .into_iter()
        .filter(|r| r.account == account)
        .collect()
}

pub async fn rows(pool: &SqlitePool) -> Vec<Row> {
    sqlx::query_as(
        "SELECT id, coalesce(message_thread_id, keyed_thread_id, '') AS message_thread_id, CAST(text AS BLOB) AS text, status, account, attempts, last_error,
                mews_message_id, mews_created_utc, mews_sender
         FROM outbox ORDER BY id",
    )
    .fetch_all(pool)
    .await
    .expect("rows")
}
