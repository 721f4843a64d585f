//! Running it as a service: the systemd notify protocol against a real
//! `NOTIFY_SOCKET`, SIGHUP reloads, the online token check, database file
//! modes under `STATE_DIRECTORY`, heartbeat and alert lines, and that no
//! token ever reaches any output, even at trace level.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support::daemon::{
    ACCESS_TOKEN, CLIENT_TOKEN, Daemon, Env, WAIT, count, insert_rows, rows, threads, threads_for,
    wait_for_status,
};
use crate::support::fake_mews::{FakeMews, FakeOptions, Fault};
use tokio::net::UnixDatagram;
use tokio::sync::watch;

/// A `NOTIFY_SOCKET` as systemd provides it: a Unix datagram socket the
/// test binds and reads every notification from.
struct NotifySocket {
    _dir: tempfile::TempDir,
    path: String,
    messages: Arc<Mutex<Vec<String>>>,
    seen: watch::Receiver<usize>,
}

impl NotifySocket {
    fn bind() -> NotifySocket {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        let messages = Arc::new(Mutex::new(Vec::new()));
        let (tx, seen) = watch::channel(0);
        let collected = messages.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = socket.recv(&mut buf).await {
                let mut all = collected.lock().unwrap();
                all.push(String::from_utf8_lossy(&buf[..n]).into_owned());
                let _ = tx.send(all.len());
            }
        });
        NotifySocket {
            _dir: dir,
            path: path.display().to_string(),
            messages,
            seen,
        }
    }

    fn all(&self) -> Vec<String> {
        self.messages.lock().unwrap().clone()
    }

    /// Waits for a message with a line `line` (or starting with it, when it
    /// ends with `=`) after the first `skip` messages; returns its index.
    async fn wait_for(&mut self, line: &str, skip: usize) -> usize {
        let matches = |m: &String| {
            m.lines().any(|l| {
                if line.ends_with('=') {
                    l.starts_with(line)
                } else {
                    l == line
                }
            })
        };
        let found = tokio::time::timeout(WAIT, async {
            loop {
                if let Some(i) = self.all().iter().skip(skip).position(matches) {
                    return skip + i;
                }
                self.seen.changed().await.unwrap();
            }
        })
        .await;
        found.unwrap_or_else(|_| panic!("no {line:?} within {WAIT:?}; got {:#?}", self.all()))
    }
}

#[tokio::test]
async fn systemd_sees_ready_status_watchdog_reloading_and_stopping() {
    let fake = FakeMews::start().await;
    let env = Env::new(&fake.base_url);
    let db = env.producer().await;
    insert_rows(&db, 3, &threads(&fake, 3), "notified").await;
    let mut socket = NotifySocket::bind();

    let mut daemon = env.start_with_env(&[
        ("NOTIFY_SOCKET", socket.path.as_str()),
        // Pings every 150 ms.
        ("WATCHDOG_USEC", "300000"),
    ]);
    let ready = socket.wait_for("READY=1", 0).await;
    let message = &socket.all()[ready];
    assert!(
        message.contains("STATUS=") && message.contains("pending"),
        "READY comes with a STATUS line: {message:?}"
    );
    daemon.wait_for_log("ready: delivering").await;
    wait_for_status(&db, "delivered", 3).await;
    // The watchdog is pinged repeatedly while the loops are alive.
    let first_ping = socket.wait_for("WATCHDOG=1", ready).await;
    socket.wait_for("WATCHDOG=1", first_ping + 1).await;

    daemon.signal("HUP");
    let reloading = socket.wait_for("RELOADING=1", ready + 1).await;
    assert!(
        socket.all()[reloading].contains("MONOTONIC_USEC="),
        "systemd >= 253 needs MONOTONIC_USEC with RELOADING=1"
    );
    socket.wait_for("READY=1", reloading).await;

    daemon.signal("TERM");
    let stopping = socket.wait_for("STOPPING=1", 0).await;
    assert!(stopping > reloading);
    assert!(daemon.wait_exit(WAIT).await.success());
    let status_lines = socket
        .all()
        .iter()
        .filter(|m| m.contains("STATUS="))
        .count();
    assert!(status_lines >= 3, "{:#?}", socket.all());
}

#[tokio::test]
async fn without_notify_socket_nothing_is_sent_and_the_daemon_runs() {
    let fake = FakeMews::start().await;
    let env = Env::new(&fake.base_url);
    let db = env.producer().await;
    insert_rows(&db, 1, &threads(&fake, 1), "plain").await;
    let mut daemon = env.start().ready().await;
    wait_for_status(&db, "delivered", 1).await;
    daemon.signal("TERM");
    assert!(daemon.wait_exit(WAIT).await.success());
}

fn with_account(config: &str, name: &str, token: &str) -> String {
    format!("{config}\n[accounts.{name}]\naccess_token = \"{token}\"\n")
}

#[tokio::test]
async fn sighup_adds_an_account_without_dropping_the_request_in_flight_and_refuses_a_broken_file() {
    let fake = FakeMews::start().await;
    let env = Env::new(&fake.base_url);
    let db = env.producer().await;
    let original = env.config_text();

    // A request in flight during the reload: Mews takes a while to answer.
    fake.script([Fault::DelayThenNormal(Duration::from_millis(1500))]);
    insert_rows(&db, 1, &threads(&fake, 1), "in flight").await;
    let mut daemon = env.start().ready().await;
    daemon.wait_for_log("messages/add: sending").await;

    // Rows of an account the running configuration does not know wait.
    let thread = threads_for(&fake, "spa-token-SECRET-s1", 1);
    sqlx::query(
        "INSERT INTO outbox (message_thread_id, text, account) VALUES (?1, 'for spa', 'spa')",
    )
    .bind(&thread[0])
    .execute(&db)
    .await
    .unwrap();
    env.rewrite_config(&with_account(&original, "spa", "spa-token-SECRET-s1"));
    daemon.signal("HUP");
    daemon.wait_for_log("configuration reloaded").await;
    wait_for_status(&db, "delivered", 2).await;

    // The reload waited for the request that was in flight (Mews took 1.5 s).
    let log = daemon.log();
    let line_of = |needle: &str| log.lines().position(|l| l.contains(needle)).unwrap();
    assert!(
        line_of("reload requested") < line_of("outcome=\"accepted\"")
            && line_of("outcome=\"accepted\"") < line_of("configuration reloaded"),
        "{log}"
    );

    // The request in flight finished and was recorded once: no duplicate, no lost row.
    assert_eq!(fake.accepted().len(), 2, "{:#?}", fake.accepted());
    assert!(rows(&db).await.iter().all(|r| r.attempts == 0));
    let spa_requests: Vec<_> = fake
        .add_requests()
        .into_iter()
        .filter(|r| r.access_token == "spa-token-SECRET-s1")
        .collect();
    assert_eq!(spa_requests.len(), 1);

    // A broken file is refused and the running configuration keeps delivering.
    env.rewrite_config(&original.replace("max_attempts = 5", "max_attempts = 0"));
    daemon.signal("HUP");
    let refused = daemon.wait_for_log("configuration reload REFUSED").await;
    assert!(refused.contains("retry.max_attempts"), "{refused}");
    sqlx::query(
        "INSERT INTO outbox (message_thread_id, text, account) VALUES (?1, 'spa again', 'spa')",
    )
    .bind(&thread[0])
    .execute(&db)
    .await
    .unwrap();
    insert_rows(&db, 2, &threads(&fake, 2), "after the refused reload").await;
    wait_for_status(&db, "delivered", 5).await;
    assert_eq!(daemon.count_log("configuration reloaded"), 1);

    daemon.signal("TERM");
    assert!(daemon.wait_exit(WAIT).await.success());
}

#[tokio::test]
async fn check_config_online_reports_each_account_without_tokens() {
    let fake = FakeMews::start_with(FakeOptions {
        valid_tokens: Some(vec![(CLIENT_TOKEN.into(), ACCESS_TOKEN.into())]),
        ..FakeOptions::default()
    })
    .await;
    let env = Env::new(&fake.base_url);

    let (status, stdout, stderr) = env.cli(&["check-config", "--online"]).await;
    assert!(status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("ok     default"), "{stdout}");
    assert!(stdout.contains("HTTP 200"), "{stdout}");

    env.rewrite_config(&with_account(
        &env.config_text(),
        "wrong",
        "wrong-token-SECRET-w1",
    ));
    let (status, stdout, stderr) = env.cli(&["check-config", "--online"]).await;
    assert_eq!(status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(stdout.contains("ok     default"), "{stdout}");
    let wrong = stdout
        .lines()
        .find(|l| l.contains("wrong") && l.contains("configuration/get"))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(
        wrong.starts_with("FAILED") && wrong.contains("HTTP 401"),
        "{wrong}"
    );
    assert!(stderr.contains("1 of 2 accounts failed"), "{stderr}");
    for output in [&stdout, &stderr] {
        for token in [CLIENT_TOKEN, ACCESS_TOKEN, "wrong-token-SECRET-w1"] {
            assert!(!output.contains(token), "{output}");
        }
    }
    let calls = fake
        .all_requests()
        .iter()
        .filter(|r| r.path.ends_with("configuration/get"))
        .count();
    assert_eq!(calls, 3);
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

#[tokio::test]
async fn under_systemd_the_database_is_created_group_writable_in_the_state_directory() {
    let fake = FakeMews::start().await;
    let env = Env::new(&fake.base_url);
    // The unit's setup: no database.path, STATE_DIRECTORY set by systemd.
    let config: String = env
        .config_text()
        .lines()
        .filter(|l| !l.starts_with("path = "))
        .map(|l| format!("{l}\n"))
        .collect();
    env.rewrite_config(&config);
    let state = env.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let state_var = state.display().to_string();
    let vars = [("STATE_DIRECTORY", state_var.as_str())];

    let mut daemon = Daemon::start_with_env(&env.config, &["run"], &vars)
        .ready()
        .await;
    let db_path = state.join("outbox.db");
    assert!(
        db_path.exists(),
        "the database is $STATE_DIRECTORY/outbox.db"
    );
    assert!(!env.db.exists());
    let (status, stdout, _) = env
        .cli_with_env(
            &["enqueue", "--thread", &threads(&fake, 1)[0], "--text", "hi"],
            &vars,
        )
        .await;
    assert!(status.success());
    assert!(!stdout.trim().is_empty());
    daemon.wait_for_log("outcome=\"accepted\"").await;

    // Group members (producers) may write; others get nothing. The -wal and
    // -shm files take the database file's mode.
    for suffix in ["", "-wal", "-shm"] {
        let path = state.join(format!("outbox.db{suffix}"));
        assert_eq!(mode(&path), 0o660, "{}", path.display());
    }
    daemon.signal("TERM");
    assert!(daemon.wait_exit(WAIT).await.success());
}

#[tokio::test]
async fn the_heartbeat_reports_the_queue_and_warns_about_old_and_dead_rows() {
    let fake = FakeMews::start().await;
    fake.set_poison(|text| text.starts_with("poison"));
    let env = Env::with(
        &fake.base_url,
        &[("max_attempts", "5")],
        "\n[log]\nheartbeat = \"200ms\"\n\n[alert]\nmax_pending_age = \"1ms\"\n",
    );
    let db = env.producer().await;
    // An account nobody configured: its row stays pending and grows old.
    sqlx::query(
        "INSERT INTO outbox (message_thread_id, text, account) VALUES (?1, 'lost', 'nowhere')",
    )
    .bind(&threads(&fake, 1)[0])
    .execute(&db)
    .await
    .unwrap();
    let mut daemon = env.start().ready().await;
    insert_rows(&db, 1, &threads(&fake, 1), "poison").await;
    wait_for_status(&db, "dead", 1).await;

    let dead = daemon.wait_for_log("rows became dead").await;
    assert!(
        dead.contains("account=default") && dead.contains("dead list"),
        "{dead}"
    );
    // The poison row waits too while it is held (nothing accepted to judge
    // it by): the line for `nowhere` is the one to find.
    let old = daemon
        .wait_for_log("the account not configured?) account=nowhere")
        .await;
    assert!(old.contains("account=nowhere"), "{old}");
    let unknown = daemon.wait_for_log("not configured").await;
    assert!(unknown.contains("nowhere"), "{unknown}");
    daemon.wait_for_log_count("heartbeat", 2).await;
    let beat = daemon
        .log()
        .lines()
        .rfind(|l| l.contains(" heartbeat "))
        .unwrap()
        .to_owned();
    for field in [
        "pending=1",
        "sending=0",
        "dead=1",
        "oldest_pending_age_s=",
        "delivered_since_last=",
        "paused=",
    ] {
        assert!(beat.contains(field), "{field} in {beat}");
    }
    assert_eq!(count(&db, "pending").await, 1);
    daemon.signal("TERM");
    assert!(daemon.wait_exit(WAIT).await.success());
}
