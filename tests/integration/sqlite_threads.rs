//! Threads through the outbox on SQLite, without the daemon: producers in
//! other processes and languages (the README's `sqlite3` and Python
//! examples), and producers racing with the daemon's record of a thread
//! created (migration `..07_threads`).

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use mews_outbox::store::{Outbox, RowOutcome, SqliteStore, ThreadOutcome};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};
use tokio::sync::Barrier;

use crate::support::daemon::Env;

const MEWS_THREAD: &str = "5e1f7c1a-9b0d-4a55-8d3e-2f6a7b8c9d01";

fn later() -> SystemTime {
    SystemTime::now() + Duration::from_secs(1)
}

/// Creates the due thread of `account` as `MEWS_THREAD` (what the
/// delivery loop does after `messageThreads/add`); returns its key.
async fn create_thread(store: &SqliteStore, account: &str) -> String {
    let claimed = store
        .claim_thread(account, later())
        .await
        .unwrap()
        .expect("a thread is due");
    let created = ThreadOutcome::Created {
        mews_thread_id: MEWS_THREAD.into(),
        mews_created_utc: "2026-12-07T00:00:00Z".into(),
    };
    store
        .record_thread(claimed.id, &created, SystemTime::now())
        .await
        .unwrap();
    claimed.thread_key
}

/// Claims and delivers one row at a time: (id, thread) in the order sent.
async fn drain(store: &SqliteStore, account: &str) -> Vec<(i64, String)> {
    let mut sent = Vec::new();
    while let Some(row) = store.claim(account, later(), 1).await.unwrap().pop() {
        sent.push((row.id, row.message_thread_id));
        let delivered = RowOutcome::Delivered {
            mews_message_id: format!("m{}", row.id),
            mews_created_utc: "2026-12-07T00:00:00Z".into(),
            mews_sender: "Application".into(),
        };
        store
            .record(&[(row.id, delivered)], SystemTime::now())
            .await
            .unwrap();
    }
    sent
}

/// The README's shell example, as written there.
fn readme_sqlite3_example() -> String {
    let readme = include_str!("../../README.md");
    let start = readme
        .find("sqlite3 -cmd '.timeout 10000' outbox.db <<'SQL'\n")
        .expect("the README's sqlite3 example for outbox_threads");
    let body = &readme[start..];
    let body = &body[body.find('\n').unwrap() + 1..];
    body[..body.find("\nSQL\n").expect("end of the example")].to_owned()
}

#[tokio::test]
async fn the_readmes_sqlite3_example_inserts_a_thread_and_its_first_message_in_one_transaction() {
    let env = Env::new("http://127.0.0.1:9");
    let db = env.producer().await;
    let sql = readme_sqlite3_example();
    for round in 0..2 {
        let out = Command::new("sqlite3")
            .arg(&env.db)
            .arg(&sql)
            .output()
            .expect("sqlite3");
        assert!(
            out.status.success(),
            "round {round}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Run twice: one thread (ON CONFLICT DO NOTHING), two messages.
    let threads: Vec<(String, String, String, String)> =
        sqlx::query_as("SELECT account, thread_key, subject, status FROM outbox_threads")
            .fetch_all(&db)
            .await
            .unwrap();
    assert_eq!(
        threads,
        [(
            "hotel-prague".to_owned(),
            "booking-4711".to_owned(),
            "Your stay at Hotel Prague".to_owned(),
            "pending".to_owned()
        )]
    );
    let store = SqliteStore::open(&env.db, Duration::from_secs(5))
        .await
        .unwrap();
    assert!(drain(&store, "hotel-prague").await.is_empty(), "waiting");
    assert_eq!(create_thread(&store, "hotel-prague").await, "booking-4711");
    let sent = drain(&store, "hotel-prague").await;
    assert_eq!(
        sent.iter().map(|(_, t)| t.as_str()).collect::<Vec<_>>(),
        [MEWS_THREAD, MEWS_THREAD]
    );
}

/// Python's `sqlite3` module links whatever SQLite the system has: the
/// triggers of migration 7 must run there too.
#[tokio::test]
async fn a_python_producer_inserts_a_thread_and_its_messages_in_one_transaction() {
    let env = Env::new("http://127.0.0.1:9");
    let _db = env.producer().await;
    let script = r#"
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], timeout=10)
with db:
    db.execute("INSERT INTO outbox_threads (thread_key, subject, original_sender) VALUES (?, ?, ?)"
               " ON CONFLICT (account, thread_key) DO NOTHING", ("order-1", "Your order", "Shop"))
    db.execute("INSERT INTO outbox (thread_key, text) VALUES (?, ?)", ("order-1", "first"))
    db.execute("INSERT INTO outbox (thread_key, text) VALUES (?, ?)", ("order-1", "second"))
for sql in ["INSERT INTO outbox (thread_key, text, keyed_thread_id) VALUES ('order-1', 'x', 'y')",
            "INSERT INTO outbox (text) VALUES ('no thread')",
            "INSERT INTO outbox_threads (thread_key, subject, original_sender) VALUES ('order-1', 's', 'o')"]:
    try:
        with db:
            db.execute(sql)
        print("accepted")
    except sqlite3.IntegrityError as e:
        print(e)
"#;
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(&env.db)
        .output()
        .expect("python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    assert!(
        lines[0].starts_with("producer_may_not_set_keyed_thread_id"),
        "{stdout}"
    );
    assert!(
        lines[1].contains("exactly_one_of_message_thread_id_and_thread_key"),
        "{stdout}"
    );
    assert!(
        lines[2].contains(
            "UNIQUE constraint failed: outbox_threads.account, outbox_threads.thread_key"
        ),
        "{stdout}"
    );
    let store = SqliteStore::open(&env.db, Duration::from_secs(5))
        .await
        .unwrap();
    create_thread(&store, "default").await;
    assert_eq!(drain(&store, "default").await.len(), 2);
}

/// Producers keep inserting keyed messages while the daemon records their
/// thread created: whichever commits first, every message ends up with the
/// thread's id (by the daemon's statement or at its own insert) and they
/// are sent in insertion order, none left waiting.
#[tokio::test]
async fn producers_racing_with_the_threads_creation_leave_no_message_behind_and_keep_order() {
    const PRODUCERS: usize = 4;
    const EACH: usize = 60;
    let env = Env::new("http://127.0.0.1:9");
    let db = env.producer().await;
    sqlx::query(
        "INSERT INTO outbox_threads (thread_key, subject, original_sender) VALUES ('k', 's', 'o')",
    )
    .execute(&db)
    .await
    .unwrap();
    let store = SqliteStore::open(&env.db, Duration::from_secs(5))
        .await
        .unwrap();
    // Everyone waits here once every producer has inserted a third of its rows.
    let barrier = Arc::new(Barrier::new(PRODUCERS + 1));
    let mut producers = Vec::new();
    for p in 0..PRODUCERS {
        let path = env.db.clone();
        let barrier = barrier.clone();
        producers.push(tokio::spawn(async move {
            let pool = SqlitePoolOptions::new()
                .max_connections(1)
                .connect_with(
                    SqliteConnectOptions::new()
                        .filename(&path)
                        .journal_mode(SqliteJournalMode::Wal)
                        .busy_timeout(Duration::from_secs(10)),
                )
                .await
                .unwrap();
            let mut ids = Vec::with_capacity(EACH);
            for i in 0..EACH {
                if i == EACH / 3 {
                    barrier.wait().await;
                }
                ids.push(
                    sqlx::query_scalar::<_, i64>(
                        "INSERT INTO outbox (thread_key, text) VALUES ('k', ?1) RETURNING id",
                    )
                    .bind(format!("p{p} m{i}"))
                    .fetch_one(&pool)
                    .await
                    .unwrap(),
                );
            }
            pool.close().await;
            ids
        }));
    }
    barrier.wait().await;
    create_thread(&store, "default").await;
    let mut all = Vec::new();
    for producer in producers {
        all.extend(producer.await.unwrap());
    }
    all.sort_unstable();
    let waiting: i64 =
        sqlx::query_scalar("SELECT count(*) FROM outbox WHERE keyed_thread_id IS NULL")
            .fetch_one(&db)
            .await
            .unwrap();
    assert_eq!(waiting, 0, "no message left waiting");
    let sent = drain(&store, "default").await;
    assert_eq!(
        sent.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
        all,
        "every message, in insertion order"
    );
    assert!(sent.iter().all(|(_, t)| t == MEWS_THREAD));
}
