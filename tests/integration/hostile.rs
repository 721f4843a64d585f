//! Hostile inserts and hostile responses: each is refused at insert with a
//! clear error, or handled by the daemon with a clear log line and a defined
//! row state; the daemon never panics and keeps delivering the other rows.

use crate::support::daemon::{Env, count, rows, threads, wait_for_status};
use crate::support::fake_mews::{FakeMews, Fault};

/// (what, thread, text, identifier, account, the error expected or `None` when accepted)
type Case<'a> = (
    &'a str,
    Option<&'a str>,
    Option<&'a [u8]>,
    Option<&'a str>,
    Option<&'a str>,
    Option<&'a str>,
);

const THREAD: &str = "7f9325f6-ef44-4911-89a8-ae51010a5aa4";

#[tokio::test]
async fn hostile_inserts_are_refused_with_a_clear_error_or_delivered_verbatim() {
    let fake = FakeMews::start().await;
    fake.register_threads(crate::support::daemon::ACCESS_TOKEN, [THREAD]);
    let env = Env::new(&fake.base_url);
    let db = env.producer().await;
    let big = "x".repeat(1024 * 1024);
    let sql_looking = "'); DROP TABLE outbox; --";

    let cases: Vec<Case> = vec![
        (
            "malformed uuid",
            Some("not-a-uuid"),
            Some(b"hi"),
            None,
            None,
            Some("message_thread_id_must_be_a_lowercase_uuid"),
        ),
        (
            "upper-case uuid",
            Some("7F9325F6-EF44-4911-89A8-AE51010A5AA4"),
            Some(b"hi"),
            None,
            None,
            Some("message_thread_id_must_be_a_lowercase_uuid"),
        ),
        (
            "uuid with braces",
            Some("{7f9325f6-ef44-4911-89a8-ae51010a5aa4}"),
            Some(b"hi"),
            None,
            None,
            Some("message_thread_id_must_be_a_lowercase_uuid"),
        ),
        (
            "empty text",
            Some(THREAD),
            Some(b""),
            None,
            None,
            Some("text_must_be_non_blank_text"),
        ),
        (
            "whitespace-only text",
            Some(THREAD),
            Some(b" \t\r\n "),
            None,
            None,
            Some("text_must_be_non_blank_text"),
        ),
        (
            "NULL text",
            Some(THREAD),
            None,
            None,
            None,
            Some("NOT NULL constraint failed: outbox.text"),
        ),
        (
            "NULL thread",
            None,
            Some(b"hi"),
            None,
            None,
            Some("CHECK constraint failed: exactly_one_of_message_thread_id_and_thread_key"),
        ),
        (
            "empty identifier",
            Some(THREAD),
            Some(b"hi"),
            Some(""),
            None,
            Some("identifier_must_be_null_or_non_empty_text"),
        ),
        (
            "empty account",
            Some(THREAD),
            Some(b"hi"),
            None,
            Some(""),
            Some("account_must_be_non_empty_text"),
        ),
        (
            "duplicate identifier",
            Some(THREAD),
            Some(b"again"),
            Some("dup"),
            None,
            Some("UNIQUE constraint failed: outbox.identifier"),
        ),
        (
            "SQL-looking text",
            Some(THREAD),
            Some(sql_looking.as_bytes()),
            None,
            None,
            None,
        ),
        (
            "1 MB text",
            Some(THREAD),
            Some(big.as_bytes()),
            None,
            None,
            None,
        ),
    ];
    sqlx::query(
        "INSERT INTO outbox (message_thread_id, text, identifier) VALUES (?1, 'first', 'dup')",
    )
    .bind(THREAD)
    .execute(&db)
    .await
    .unwrap();
    for (what, thread, text, identifier, account, expected) in cases {
        let text = text.map(|t| String::from_utf8(t.to_vec()).unwrap());
        let result = sqlx::query(
            "INSERT INTO outbox (message_thread_id, text, identifier, account) VALUES (?1, ?2, ?3, coalesce(?4, 'default'))",
        )
        .bind(thread)
        .bind(text)
        .bind(identifier)
        .bind(account)
        .execute(&db)
        .await;
        match (expected, result) {
            (Some(expected), Err(e)) => assert!(e.to_string().contains(expected), "{what}: {e}"),
            (Some(expected), Ok(_)) => panic!("{what}: accepted, expected {expected}"),
            (None, Err(e)) => panic!("{what}: refused: {e}"),
            (None, Ok(_)) => {}
        }
    }
    // Bytes that are not text are refused too.
    let blob = sqlx::query("INSERT INTO outbox (message_thread_id, text) VALUES (?1, x'fffe')")
        .bind(THREAD)
        .execute(&db)
        .await
        .unwrap_err();
    assert!(
        blob.to_string().contains("text_must_be_non_blank_text"),
        "{blob}"
    );

    let _daemon = env.start();
    wait_for_status(&db, "delivered", 3).await;
    let texts: Vec<String> = fake.accepted().into_iter().map(|m| m.text).collect();
    assert_eq!(
        texts,
        ["first", sql_looking, big.as_str()],
        "in insertion order, verbatim"
    );
}

#[tokio::test]
async fn hostile_responses_are_retried_with_a_clear_log_line_and_the_daemon_goes_on() {
    let fake = FakeMews::start().await;
    fake.script([
        Fault::raw(
            200,
            "application/json",
            r#"{"Messages":[{"Identifier":"1","Mess"#,
        ),
        Fault::raw(200, "application/json", r#"{"Messages":"none"}"#),
        Fault::raw(
            200,
            "application/json",
            r#"{"Messages":[{"Identifier":1,"Message":{"Id":7}}]}"#,
        ),
        Fault::raw(
            200,
            "text/html",
            "<html><body>502 Bad Gateway</body></html>",
        ),
        Fault::raw(200, "application/json", vec![b'['; 10 * 1024 * 1024]),
        Fault::raw(500, "text/plain", ""),
        Fault::OmitIdentifiers(1),
        Fault::ExtraIdentifier,
    ]);
    let env = Env::with(&fake.base_url, &[("max_attempts", "20")], "");
    let db = env.producer().await;
    crate::support::daemon::insert_rows(&db, 2, &threads(&fake, 2), "hostile").await;

    let mut daemon = env.start();
    wait_for_status(&db, "delivered", 2).await;
    assert_eq!(count(&db, "dead").await, 0);
    daemon
        .wait_for_log("HTTP 200 with an unreadable body")
        .await;
    daemon.wait_for_log("HTTP 500 with an empty body").await;
    let omitted = daemon.wait_for_log("missing=1").await;
    assert!(omitted.contains("does not match the request"), "{omitted}");
    // The row left out of the 200 was stored: reading back finds it.
    daemon.wait_for_log("reconciled=1").await;
    let stored = fake.accepted();
    for row in rows(&db).await {
        let text = String::from_utf8(row.text).unwrap();
        let id = stored
            .iter()
            .find(|m| m.text == text)
            .map(|m| m.id.to_string());
        assert_eq!(row.mews_message_id, id, "{text}: the Id Mews gave it");
        assert!(row.attempts >= 1);
    }

    // Still delivering after all that; an Identifier never sent is ignored.
    crate::support::daemon::insert_rows(&db, 1, &threads(&fake, 1), "after").await;
    let extra = daemon.wait_for_log("never_sent=1").await;
    assert!(extra.contains("does not match the request"), "{extra}");
    wait_for_status(&db, "delivered", 3).await;
    let log = daemon.log();
    assert!(!log.contains("panicked"), "{log}");
    assert_eq!(
        log.lines()
            .filter(|l| l.contains("outcome=\"transient\"") && l.contains("unreadable body"))
            .count(),
        5,
        "one line per unreadable answer"
    );
    assert_eq!(fake.accepted().len(), 3, "nothing sent twice");
}
