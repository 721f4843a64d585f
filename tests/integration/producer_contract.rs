//! What a producer may write, and how much the daemon takes at once: the
//! producer contract enforced by the database (migration
//! `..06_producer_contract`), every waiting row telling why, and requests
//! bounded by bytes (`delivery.max_request_bytes`).

use std::process::Command;
use std::time::{Duration, SystemTime};

use crate::support::daemon::{
    Env, rows, threads, unregistered_threads, wait_for_rows, wait_for_status,
};
use crate::support::fake_mews::FakeMews;
use mews_outbox::store::{Outbox, SqliteStore};
use sqlx::SqlitePool;

const T: &str = "7f9325f6-ef44-4911-89a8-ae51010a5aa4";

/// The error a producer's INSERT of `text` with extra `columns` gets.
async fn insert_error(db: &SqlitePool, columns: &str, values: &str) -> String {
    let sql = format!(
        "INSERT INTO outbox (message_thread_id, text{columns}) VALUES ('{T}', 'hi'{values})"
    );
    sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
        .execute(db)
        .await
        .map(|_| panic!("{sql} was accepted"))
        .unwrap_err()
        .to_string()
}

async fn insert_text(db: &SqlitePool, text: &str) -> Result<i64, String> {
    sqlx::query_scalar("INSERT INTO outbox (message_thread_id, text) VALUES (?1, ?2) RETURNING id")
        .bind(T)
        .bind(text)
        .fetch_one(db)
        .await
        .map_err(|e| e.to_string())
}

#[tokio::test]
async fn every_daemon_column_is_refused_on_insert_naming_the_column() {
    let env = Env::new("http://127.0.0.1:9");
    let db = env.producer().await;
    let cases = [
        ("status", "'sending'"),
        ("status", "'delivered'"),
        ("status", "'dead'"),
        ("attempts", "1"),
        ("needs_reconcile", "1"),
        ("last_error", "'x'"),
        ("created_at", "'2020-01-01T00:00:00.000Z'"),
        ("first_sent_at", "'2020-01-01T00:00:00.000Z'"),
        ("delivered_at", "'2020-01-01T00:00:00.000Z'"),
        ("dead_at", "'2020-01-01T00:00:00.000Z'"),
        ("mews_message_id", "'m'"),
        ("mews_created_utc", "'c'"),
        ("mews_sender", "'Application'"),
        ("keyed_thread_id", "'5e1f7c1a-9b0d-4a55-8d3e-2f6a7b8c9d01'"),
    ];
    for (column, value) in cases {
        let e = insert_error(&db, &format!(", {column}"), &format!(", {value}")).await;
        assert!(
            e.contains(&format!("producer_may_not_set_{column}")),
            "{column} = {value}: {e}"
        );
    }
    let e = insert_error(&db, ", next_attempt_at", ", '2026-12-06 10:00:00'").await;
    assert!(e.contains("next_attempt_at_must_be_a_utc_timestamp"), "{e}");
    assert_eq!(
        rows(&db).await.len(),
        0,
        "nothing was inserted by the refused rows"
    );

    // Scheduling for later is a producer's right, and so are the producer columns.
    sqlx::query(
        "INSERT INTO outbox (message_thread_id, text, identifier, account, next_attempt_at)
         VALUES (?1, 'later', 'k1', 'default', '2030-01-01T00:00:00.000Z')",
    )
    .bind(T)
    .execute(&db)
    .await
    .unwrap();
    let (status, next): (String, String) =
        sqlx::query_as("SELECT status, next_attempt_at FROM outbox")
            .fetch_one(&db)
            .await
            .unwrap();
    assert_eq!(
        (status.as_str(), next.as_str()),
        ("pending", "2030-01-01T00:00:00.000Z")
    );
}

/// The same rules for a producer in another language and another SQLite
/// (Python's `sqlite3` module, whatever SQLite it links).
#[tokio::test]
async fn a_python_producer_is_refused_the_same_way() {
    let env = Env::new("http://127.0.0.1:9");
    let db = env.producer().await;
    let script = r#"
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
t = "7f9325f6-ef44-4911-89a8-ae51010a5aa4"
for sql, args in [
    ("INSERT INTO outbox (message_thread_id, text, status) VALUES (?, 'hi', 'sending')", (t,)),
    ("INSERT INTO outbox (message_thread_id, text) VALUES (?, ?)", (t, "\u3000\u00a0")),
]:
    try:
        db.execute(sql, args)
        print("accepted")
    except sqlite3.IntegrityError as e:
        print(e)
db.execute("INSERT INTO outbox (message_thread_id, text) VALUES (?, ?)", (t, "\u00a0ok"))
print("inserted")
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
        lines[0].starts_with("producer_may_not_set_status"),
        "{stdout}"
    );
    assert!(
        lines[1].starts_with("text_must_be_non_blank_text"),
        "{stdout}"
    );
    assert_eq!(lines[2], "inserted");
    assert_eq!(rows(&db).await.len(), 1);
}

#[tokio::test]
async fn text_made_only_of_unicode_white_space_is_refused() {
    let env = Env::new("http://127.0.0.1:9");
    let db = env.producer().await;
    for text in [
        "\u{a0}",
        "\u{3000}",
        "\u{2028}",
        " \u{a0}\t\u{3000}\n\u{85}",
    ] {
        let e = insert_text(&db, text).await.unwrap_err();
        assert!(e.contains("text_must_be_non_blank_text"), "{text:?}: {e}");
    }
    // Exactly Unicode White_Space: each of its code points alone is refused...
    for c in (0..=0x10FFFFu32).filter_map(char::from_u32) {
        if c.is_whitespace() {
            let e = insert_text(&db, &c.to_string()).await.unwrap_err();
            assert!(
                e.contains("text_must_be_non_blank_text"),
                "U+{:04X}: {e}",
                c as u32
            );
        }
    }
    // ...and its neighbours, which are not White_Space, are text.
    for c in ['\u{1c}', '\u{1f}', '\u{180e}', '\u{200b}', '\u{feff}'] {
        assert!(!c.is_whitespace());
        insert_text(&db, &c.to_string()).await.unwrap();
    }
    let id = insert_text(&db, "\u{a0}Hello").await.unwrap();
    let text: String = sqlx::query_scalar("SELECT text FROM outbox WHERE id = ?1")
        .bind(id)
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(text, "\u{a0}Hello", "stored as given");
    // An update to blank is refused too.
    let e = sqlx::query("UPDATE outbox SET text = char(12288) WHERE id = ?1")
        .bind(id)
        .execute(&db)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("text_must_be_non_blank_text"), "{e}");
}

#[tokio::test]
async fn enqueue_reports_a_contract_violation_as_a_refusal() {
    let env = Env::new("http://127.0.0.1:9");
    env.producer().await;
    let (status, out, err) = env
        .cli(&["enqueue", "--thread", T, "--text", "\u{3000}\u{a0}"])
        .await;
    assert!(!status.success(), "{out}");
    assert!(
        err.contains("refused by the outbox table: text_must_be_non_blank_text"),
        "{err}"
    );
}

#[tokio::test]
async fn rows_behind_a_head_of_an_unconfigured_account_say_which_row_holds_them() {
    let fake = FakeMews::start().await;
    let env = Env::new(&fake.base_url);
    let db = env.producer().await;
    let thread = threads(&fake, 1).remove(0);
    let mut ids = Vec::new();
    for account in ["nowhere", "default", "default"] {
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO outbox (message_thread_id, text, account) VALUES (?1, 'hi', ?2) RETURNING id",
        )
        .bind(&thread)
        .bind(account)
        .fetch_one(&db)
        .await
        .unwrap();
        ids.push(id);
    }
    let _daemon = env.start();
    wait_for_rows(&db, "last_error LIKE 'waiting behind row %'", 2).await;
    let rows = rows(&db).await;
    assert!(
        rows[0]
            .last_error
            .as_deref()
            .unwrap()
            .contains("account nowhere is not configured")
    );
    for row in &rows[1..] {
        assert_eq!(row.status, "pending");
        assert_eq!(
            row.last_error.as_deref().unwrap(),
            format!(
                "waiting behind row {} of its thread, whose account nowhere is not configured: add [accounts.nowhere] to the configuration, or delete row {}",
                ids[0], ids[0]
            )
        );
    }
    let (_, out, _) = env.cli(&["status", "--json"]).await;
    assert!(
        out.contains(&format!("waiting behind row {}", ids[0])),
        "status shows the reason: {out}"
    );
    assert_eq!(fake.add_requests().len(), 0, "per-thread order holds");
}

async fn insert_sized(db: &SqlitePool, thread: &str, text: &str) -> i64 {
    sqlx::query_scalar("INSERT INTO outbox (message_thread_id, text) VALUES (?1, ?2) RETURNING id")
        .bind(thread)
        .bind(text)
        .fetch_one(db)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_claim_stops_at_the_byte_bound_but_always_takes_one_row() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("o.db"), Duration::from_secs(5))
        .await
        .unwrap();
    let db = store.pool();
    let threads = unregistered_threads(4); // no Mews here: a claim only
    let mut ids = Vec::new();
    for (thread, n) in threads.iter().zip([1000, 1000, 1000, 5000]) {
        ids.push(insert_sized(db, thread, &"x".repeat(n)).await);
    }
    let now = SystemTime::now() + Duration::from_secs(1);
    let per_row = 1000 + mews_outbox::store::sqlite::sql::MESSAGE_ENVELOPE_BYTES;
    let claimed: Vec<i64> = store
        .claim_within("default", now, 10, 2 * per_row)
        .await
        .unwrap()
        .iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(claimed, ids[..2], "two rows fit");
    let claimed: Vec<i64> = store
        .claim_within("default", now, 10, 10)
        .await
        .unwrap()
        .iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(claimed, [ids[2]], "one row even when it alone is over");
    let claimed: Vec<i64> = store
        .claim_within("default", now, 10, 2 * per_row)
        .await
        .unwrap()
        .iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(claimed, [ids[3]]);
}

const BOUND: usize = 2_500_000;

#[tokio::test]
async fn large_rows_go_in_several_requests_within_the_bound_and_an_oversize_row_is_dead() {
    let fake = FakeMews::start().await;
    let env = Env::new(&fake.base_url);
    let db = env.producer().await;
    let threads = threads(&fake, 10);
    // 1 MB of letters, and 700 KB of quotes that JSON doubles to 1.4 MB:
    // the claim counts raw bytes, the worker the bytes as sent.
    let plain = "a".repeat(1_000_000);
    let quotes = "\"".repeat(700_000);
    for (thread, quoted) in threads[..8]
        .iter()
        .zip([false, false, true, true, true, true, false, false])
    {
        insert_sized(&db, thread, if quoted { &quotes } else { &plain }).await;
    }
    // Too large raw, and too large only once escaped; each blocks nothing.
    let raw_oversize = insert_sized(&db, &threads[8], &"b".repeat(2_600_000)).await;
    let escaped_oversize = insert_sized(&db, &threads[9], &"\"".repeat(1_300_000)).await;
    let behind = insert_sized(&db, &threads[8], "after the big one").await;

    let bound = BOUND.to_string();
    let _daemon = env.start_with_env(&[("MEWS_OUTBOX__DELIVERY__MAX_REQUEST_BYTES", &bound)]);
    wait_for_status(&db, "delivered", 9).await;
    wait_for_status(&db, "dead", 2).await;

    let requests = fake.add_requests();
    for r in &requests {
        assert!(
            r.body_bytes <= BOUND,
            "a request of {} bytes, over the bound {BOUND}",
            r.body_bytes
        );
    }
    // Claims follow insertion order, each under 2.5 MB raw: [a a], [q q q]
    // (2.1 MB raw but 4.2 MB as sent: three requests), [q a], [a], [B]
    // (dead), [Q (dead), the row behind B].
    let counts: Vec<usize> = requests.iter().map(|r| r.message_count).collect();
    assert_eq!(counts, [2, 1, 1, 1, 2, 1, 1]);
    let rows = rows(&db).await;
    for id in [raw_oversize, escaped_oversize] {
        let row = rows.iter().find(|r| r.id == id).unwrap();
        assert_eq!(row.status, "dead");
        let error = row.last_error.as_deref().unwrap();
        assert!(
            error.starts_with("message too large: ")
                && error.contains(&format!("over delivery.max_request_bytes = {BOUND}")),
            "{error}"
        );
    }
    let raw_error = rows.iter().find(|r| r.id == raw_oversize).unwrap();
    let as_json = r#"{"MessageThreadId":,"Text":,"Identifier":}"#.len()
        + 38
        + 2_600_002
        + raw_oversize.to_string().len()
        + 2;
    let error = raw_error.last_error.as_deref().unwrap();
    assert!(
        error.contains(&format!("{as_json} bytes as JSON")),
        "{error}"
    );
    assert_eq!(
        rows.iter().find(|r| r.id == behind).unwrap().status,
        "delivered",
        "the row behind the oversize one went"
    );
}
