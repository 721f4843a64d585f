use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use sqlx::Row;

use super::*;
use crate::store::{
    AccountPause, DaemonStore, Enqueued, NewMessage, OperatorStore, Outbox, Requeue, RowOutcome,
    ThreadRef, parse_timestamp, timestamp,
};

const T1: &str = "7f9325f6-ef44-4911-89a8-ae51010a5aa4";
const T2: &str = "0b8c8a58-1a60-4c5e-9f0e-3d6f2f2a9d11";

async fn store() -> (tempfile::TempDir, SqliteStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("o.db"), Duration::from_secs(5))
        .await
        .unwrap();
    (dir, store)
}

async fn insert(store: &SqliteStore, thread: &str, text: &str) -> i64 {
    sqlx::query_scalar("INSERT INTO outbox (message_thread_id, text) VALUES (?1, ?2) RETURNING id")
        .bind(thread)
        .bind(text)
        .fetch_one(store.pool())
        .await
        .unwrap()
}

async fn insert_error(store: &SqliteStore, sql: &'static str) -> String {
    sqlx::query(sql)
        .execute(store.pool())
        .await
        .unwrap_err()
        .to_string()
}

#[tokio::test]
async fn bad_inserts_are_refused_with_a_constraint_naming_the_problem() {
    let (_dir, s) = store().await;
    let cases = [
        (
            "INSERT INTO outbox (message_thread_id, text) VALUES ('not-a-uuid', 'hi')",
            "message_thread_id_must_be_a_lowercase_uuid",
        ),
        (
            "INSERT INTO outbox (message_thread_id, text) VALUES ('7F9325F6-EF44-4911-89A8-AE51010A5AA4', 'hi')",
            "message_thread_id_must_be_a_lowercase_uuid",
        ),
        (
            "INSERT INTO outbox (message_thread_id, text) VALUES ('7f9325f6-ef44-4911-89a8-ae51010a5aa4', '')",
            "text_must_be_non_blank_text",
        ),
        (
            "INSERT INTO outbox (message_thread_id, text) VALUES ('7f9325f6-ef44-4911-89a8-ae51010a5aa4', ' \n\t ')",
            "text_must_be_non_blank_text",
        ),
        (
            "INSERT INTO outbox (message_thread_id, text) VALUES ('7f9325f6-ef44-4911-89a8-ae51010a5aa4', x'ff00')",
            "text_must_be_non_blank_text",
        ),
        (
            "INSERT INTO outbox (message_thread_id, text) VALUES ('7f9325f6-ef44-4911-89a8-ae51010a5aa4', NULL)",
            "NOT NULL",
        ),
        (
            "INSERT INTO outbox (message_thread_id, text, status) VALUES ('7f9325f6-ef44-4911-89a8-ae51010a5aa4', 'hi', 'lost')",
            "status_must_be_pending_sending_delivered_or_dead",
        ),
        (
            "INSERT INTO outbox (message_thread_id, text, identifier) VALUES ('7f9325f6-ef44-4911-89a8-ae51010a5aa4', 'hi', '')",
            "identifier_must_be_null_or_non_empty_text",
        ),
        (
            "INSERT INTO outbox (message_thread_id, text, account) VALUES ('7f9325f6-ef44-4911-89a8-ae51010a5aa4', 'hi', '')",
            "account_must_be_non_empty_text",
        ),
    ];
    for (sql, expected) in cases {
        let e = insert_error(&s, sql).await;
        assert!(e.contains(expected), "{sql}\n=> {e}");
    }
}

#[tokio::test]
async fn identifiers_make_enqueueing_idempotent() {
    let (_dir, s) = store().await;
    let m = NewMessage {
        thread: ThreadRef::Id(T1.into()),
        text: "hello".into(),
        identifier: Some("order-1".into()),
        account: "default".into(),
    };
    let Enqueued::Inserted(id) = s.enqueue(&m, None).await.unwrap() else {
        panic!()
    };
    assert_eq!(
        s.enqueue(&m, None).await.unwrap(),
        Enqueued::AlreadyThere(id)
    );
}

#[tokio::test]
async fn a_claim_takes_one_row_per_thread_in_order_and_skips_blocked_threads() {
    let (_dir, s) = store().await;
    let a1 = insert(&s, T1, "a1").await;
    let b1 = insert(&s, T2, "b1").await;
    let a2 = insert(&s, T1, "a2").await;
    let now = SystemTime::now() + Duration::from_secs(1);

    let first: Vec<i64> = s
        .claim("default", now, 10)
        .await
        .unwrap()
        .iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(first, [a1, b1], "a2 waits for a1");
    assert!(
        s.claim("default", now, 10).await.unwrap().is_empty(),
        "a1 in flight blocks a2"
    );

    // a1 fails and is retried later: a2 still waits; b1 delivered.
    let later = now + Duration::from_secs(60);
    s.record(
        &[
            (
                a1,
                RowOutcome::Retry {
                    at: later,
                    error: "HTTP 500".into(),
                    attempt: true,
                    maybe_stored: false,
                },
            ),
            (
                b1,
                RowOutcome::Delivered {
                    mews_message_id: "m".into(),
                    mews_created_utc: "c".into(),
                    mews_sender: "Application".into(),
                },
            ),
        ],
        now,
    )
    .await
    .unwrap();
    assert!(s.claim("default", now, 10).await.unwrap().is_empty());
    let due = s.next_due("default", now).await.unwrap().unwrap();
    assert_eq!(
        timestamp(due),
        timestamp(later),
        "a2 is blocked, so a1's retry is next"
    );

    let again = s.claim("default", later, 10).await.unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!((again[0].id, again[0].attempts), (a1, 1));
    s.record(
        &[(
            a1,
            RowOutcome::Dead {
                error: "gone".into(),
            },
        )],
        later,
    )
    .await
    .unwrap();
    let released: Vec<i64> = s
        .claim("default", later, 10)
        .await
        .unwrap()
        .iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(released, [a2], "a dead row releases its thread");
}

#[tokio::test]
async fn abandoned_sending_rows_are_recovered_to_be_read_back_first() {
    let (_dir, s) = store().await;
    insert(&s, T1, "x").await;
    let now = SystemTime::now() + Duration::from_secs(1);
    let first = s.claim("default", now, 10).await.unwrap();
    assert!(!first[0].needs_reconcile);
    assert_eq!(
        first[0].first_sent_at.map(timestamp),
        Some(timestamp(now)),
        "the claim stamps the first send"
    );
    assert_eq!(
        s.recover_abandoned(Duration::from_secs(2), now)
            .await
            .unwrap(),
        1
    );
    let later = now + Duration::from_secs(5);
    let again = s.claim("default", later, 10).await.unwrap();
    assert_eq!(again.len(), 1);
    assert!(
        again[0].needs_reconcile,
        "the crashed request may have reached Mews"
    );
    assert_eq!(
        again[0].first_sent_at.map(timestamp),
        Some(timestamp(now)),
        "the first send stays the first"
    );
}

async fn next_attempt_at(s: &SqliteStore, id: i64) -> String {
    sqlx::query_scalar("SELECT next_attempt_at FROM outbox WHERE id = ?1")
        .bind(id)
        .fetch_one(s.pool())
        .await
        .unwrap()
}

#[tokio::test]
async fn recovered_rows_settle_from_their_requests_start_or_from_now_when_unknown() {
    let (_dir, s) = store().await;
    let a = insert(&s, T1, "x").await;
    let b: i64 = sqlx::query_scalar(
        "INSERT INTO outbox (message_thread_id, text, account) VALUES (?1, 'y', 'other') RETURNING id",
    )
    .bind(T2)
    .fetch_one(s.pool())
    .await
    .unwrap();
    let claimed_at = SystemTime::now();
    s.claim("default", claimed_at, 10).await.unwrap();
    s.claim("other", claimed_at, 10).await.unwrap();
    // The request of `default` started well after the claim (it waited
    // for the rate limit, a read-back, a permit); `other` never said.
    let started = claimed_at + Duration::from_secs(40);
    s.request_starting("default", started).await.unwrap();
    let now = claimed_at + Duration::from_secs(41);
    let settle = Duration::from_millis(30_500);
    assert_eq!(s.recover_abandoned(settle, now).await.unwrap(), 2);
    assert_eq!(next_attempt_at(&s, a).await, timestamp(started + settle));
    assert_eq!(next_attempt_at(&s, b).await, timestamp(now + settle));
    assert!(
        s.claim("default", started + settle - Duration::from_millis(1), 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        s.claim("default", started + settle, 10)
            .await
            .unwrap()
            .len(),
        1
    );
}

async fn reconcile_flag(s: &SqliteStore, id: i64) -> i64 {
    sqlx::query_scalar("SELECT needs_reconcile FROM outbox WHERE id = ?1")
        .bind(id)
        .fetch_one(s.pool())
        .await
        .unwrap()
}

#[tokio::test]
async fn the_reconcile_mark_is_set_by_doubt_kept_until_checked_and_cleared_by_delivery() {
    let (_dir, s) = store().await;
    let id = insert(&s, T1, "x").await;
    let mut now = SystemTime::now() + Duration::from_secs(1);
    let mut round = async |outcome: RowOutcome| {
        assert_eq!(s.claim("default", now, 10).await.unwrap().len(), 1);
        s.record(&[(id, outcome)], now).await.unwrap();
        now += Duration::from_secs(1);
        reconcile_flag(&s, id).await
    };
    let retry = |maybe_stored| RowOutcome::Retry {
        at: SystemTime::now(),
        error: "e".into(),
        attempt: true,
        maybe_stored,
    };
    assert_eq!(round(retry(false)).await, 0);
    assert_eq!(round(retry(true)).await, 1, "a 5xx may have stored it");
    assert_eq!(round(RowOutcome::Release).await, 1, "a 429 proves nothing");
    assert_eq!(
        round(retry(false)).await,
        1,
        "nor does a failure to connect"
    );
    assert_eq!(
        round(RowOutcome::Delivered {
            mews_message_id: "m".into(),
            mews_created_utc: "c".into(),
            mews_sender: "Application".into()
        })
        .await,
        0
    );

    let other = insert(&s, T2, "y").await;
    s.claim("default", now, 10).await.unwrap();
    s.record(&[(other, retry(true))], now).await.unwrap();
    s.claim("default", now + Duration::from_secs(60), 10)
        .await
        .unwrap();
    s.clear_reconcile(&[other]).await.unwrap();
    assert_eq!(
        reconcile_flag(&s, other).await,
        0,
        "read back and not found"
    );
}

#[tokio::test]
async fn owned_message_ids_are_the_ones_our_rows_hold() {
    let (_dir, s) = store().await;
    let id = insert(&s, T1, "x").await;
    let now = SystemTime::now() + Duration::from_secs(1);
    s.claim("default", now, 10).await.unwrap();
    let delivered = RowOutcome::Delivered {
        mews_message_id: "ours".into(),
        mews_created_utc: "c".into(),
        mews_sender: "Application".into(),
    };
    s.record(&[(id, delivered)], now).await.unwrap();
    let owned = s.owned_message_ids(&["ours", "theirs"]).await.unwrap();
    assert_eq!(owned, HashSet::from(["ours".to_owned()]));
    assert!(s.owned_message_ids(&[]).await.unwrap().is_empty());
}

#[tokio::test]
async fn recent_requests_are_remembered_per_account() {
    let (_dir, s) = store().await;
    assert!(s.recent_requests("default").await.unwrap().is_empty());
    let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_000_000_123);
    let ends = [t, t + Duration::from_millis(250)];
    s.save_recent_requests("default", &ends).await.unwrap();
    s.save_pause(&AccountPause {
        account: "default".into(),
        until: t,
        reason: "r".into(),
        streak: 1,
    })
    .await
    .unwrap();
    assert_eq!(
        s.recent_requests("default").await.unwrap(),
        ends,
        "a pause does not erase them"
    );
    assert!(s.recent_requests("other").await.unwrap().is_empty());
}

/// Inserts rows and makes them dead, `error` each, dead since `at`.
async fn dead(s: &SqliteStore, account: &str, errors: &[&str], at: SystemTime) -> Vec<i64> {
    let mut ids = Vec::new();
    for error in errors {
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO outbox (message_thread_id, text, account) VALUES (?1, 'x', ?2) RETURNING id",
        )
        .bind(T1)
        .bind(account)
        .fetch_one(s.pool())
        .await
        .unwrap();
        sqlx::query("UPDATE outbox SET status = 'sending' WHERE id = ?1")
            .bind(id)
            .execute(s.pool())
            .await
            .unwrap();
        s.record(
            &[(
                id,
                RowOutcome::Dead {
                    error: (*error).into(),
                },
            )],
            at,
        )
        .await
        .unwrap();
        ids.push(id);
    }
    ids
}

#[tokio::test]
async fn requeue_revives_dead_rows_only_and_refuses_anything_else_as_a_whole() {
    let (_dir, s) = store().await;
    let now = SystemTime::now();
    let a = dead(
        &s,
        "default",
        &["HTTP 403: no (RequestId 1)", "HTTP 403: no (RequestId 2)"],
        now,
    )
    .await;
    let b = dead(&s, "other", &["HTTP 400: bad"], now).await;
    let pending = insert(&s, T2, "alive").await;

    let e = s
        .requeue_dead(&Requeue::Ids(vec![a[0], pending, 999]), None, now)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&format!("row {pending} is pending, not dead"))
            && e.contains("row 999 does not exist"),
        "{e}"
    );
    let e = s
        .requeue_dead(&Requeue::Ids(vec![b[0]]), Some("default"), now)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("belongs to account other, not default"), "{e}");
    assert_eq!(s.dead_rows(None).await.unwrap().len(), 3, "nothing changed");

    assert_eq!(
        s.requeue_dead(&Requeue::Ids(vec![a[1]]), None, now)
            .await
            .unwrap(),
        [a[1]]
    );
    let row = sqlx::query("SELECT status, attempts, last_error, dead_at FROM outbox WHERE id = ?1")
        .bind(a[1])
        .fetch_one(s.pool())
        .await
        .unwrap();
    assert_eq!(row.get::<String, _>("status"), "pending");
    assert_eq!(row.get::<i64, _>("attempts"), 0);
    assert!(row.get::<Option<String>, _>("dead_at").is_none());
    let error: String = row.get("last_error");
    assert!(
        error.starts_with("requeued by an operator at ")
            && error.ends_with("; was: HTTP 403: no (RequestId 2)"),
        "{error}"
    );

    assert_eq!(
        s.requeue_dead(&Requeue::All, Some("other"), now)
            .await
            .unwrap(),
        b
    );
    assert_eq!(
        s.requeue_dead(&Requeue::All, None, now).await.unwrap(),
        [a[0]]
    );
    assert!(
        s.requeue_dead(&Requeue::All, None, now)
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn purge_deletes_only_rows_dead_for_longer_than_the_age() {
    let (_dir, s) = store().await;
    let now = SystemTime::now();
    let day = Duration::from_secs(24 * 3600);
    let old = dead(&s, "default", &["old"], now - 40 * day).await;
    let old_other = dead(&s, "other", &["old"], now - 40 * day).await;
    let recent = dead(&s, "default", &["recent"], now - day).await;
    let pending = insert(&s, T2, "alive").await;
    sqlx::query("UPDATE outbox SET created_at = '2000-01-01T00:00:00.000Z' WHERE id = ?1")
        .bind(pending)
        .execute(s.pool())
        .await
        .unwrap();

    assert_eq!(
        s.purge_dead(now - 30 * day, Some("default")).await.unwrap(),
        1
    );
    let left: Vec<i64> = s
        .dead_rows(None)
        .await
        .unwrap()
        .iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(left, [old_other[0], recent[0]]);
    assert_eq!(s.purge_dead(now - 30 * day, None).await.unwrap(), 1);
    assert_eq!(s.dead_rows(None).await.unwrap()[0].id, recent[0]);
    assert_ne!(old[0], pending);
    let status: String = sqlx::query_scalar("SELECT status FROM outbox WHERE id = ?1")
        .bind(pending)
        .fetch_one(s.pool())
        .await
        .unwrap();
    assert_eq!(status, "pending", "an old pending row is never purged");
}

#[tokio::test]
async fn status_groups_dead_errors_without_their_request_ids() {
    let (_dir, s) = store().await;
    let now = SystemTime::now();
    dead(
        &s,
        "default",
        &[
            "HTTP 403: no (RequestId 1)",
            "HTTP 403: no (RequestId 2)",
            "HTTP 403: no (RequestId 3) (gave up after 5 attempts)",
            "HTTP 400: bad (RequestId 4)",
            "HTTP 400: bad (RequestId 5)",
            "HTTP 413",
            "text is not valid UTF-8; Mews cannot take it",
        ],
        now,
    )
    .await;
    let status = s.status(now).await.unwrap();
    let errors: Vec<(&str, u64)> = status[0]
        .dead_errors
        .iter()
        .map(|e| (e.error.as_str(), e.rows))
        .collect();
    assert_eq!(
        errors,
        [
            ("HTTP 400: bad", 2),
            ("HTTP 403: no", 2),
            ("HTTP 403: no (gave up after 5 attempts)", 1)
        ]
    );
    assert_eq!(status[0].dead, 7);
}

/// `EXPLAIN QUERY PLAN` of a statement, one line per step.
async fn plan(store: &SqliteStore, statement: &str) -> String {
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "EXPLAIN QUERY PLAN {statement}"
    )))
    .fetch_all(store.pool())
    .await
    .unwrap();
    rows.iter()
        .map(|r| r.get::<String, _>("detail"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test]
async fn the_delivery_statements_use_their_indexes() {
    let (_dir, s) = store().await;
    let cases: [(&str, &str, &[&str]); 5] = [
        (
            "claim",
            sql::CLAIM,
            &[
                "INTEGER PRIMARY KEY (rowid=?)",
                "outbox_thread_head_ready (account=? AND ready_at<?)",
            ],
        ),
        ("record", sql::RECORD, &["INTEGER PRIMARY KEY (rowid=?)"]),
        (
            "record delivered",
            sql::RECORD_DELIVERED,
            &["INTEGER PRIMARY KEY (rowid=?)"],
        ),
        (
            "recover_abandoned",
            "UPDATE outbox SET status = 'pending' WHERE status = 'sending'",
            &["outbox_status (status=?)"],
        ),
        (
            "next_due",
            sql::NEXT_DUE,
            &["outbox_thread_head_ready (account=? AND ready_at>?)"],
        ),
    ];
    for (name, statement, expected) in cases {
        let plan = plan(&s, statement).await;
        for index in expected {
            assert!(plan.contains(index), "{name}: no {index} in\n{plan}");
        }
        for line in plan.lines() {
            assert!(
                !(line.starts_with("SCAN") && line.contains("outbox")),
                "{name}: full scan in\n{plan}"
            );
        }
    }
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn a_commit_by_another_process_wakes_the_watcher_without_polling() {
    let (dir, s) = store().await;
    let shutdown = CancellationToken::new();
    // An hour between polls, safety polls included: only the WAL watch
    // can see the insert within the test's patience.
    let hour = Duration::from_secs(3600);
    let mut changes = s
        .watch_changes_polling(hour, hour, shutdown.clone())
        .await
        .unwrap();
    let mut producer = SqliteConnectOptions::new()
        .filename(dir.path().join("o.db"))
        .connect()
        .await
        .unwrap();
    sqlx::query("INSERT INTO outbox (message_thread_id, text) VALUES (?1, 'hi')")
        .bind(T1)
        .execute(&mut producer)
        .await
        .unwrap();
    // Generous for a loaded machine, and still far short of any poll.
    tokio::time::timeout(Duration::from_secs(30), changes.changed())
        .await
        .expect("woken by the commit")
        .unwrap();
    shutdown.cancel();
}

#[tokio::test]
async fn only_rows_still_held_pending_are_dead_lettered() {
    let (_dir, s) = store().await;
    let held = "held pending a systemic-rejection verdict";
    let now = SystemTime::now() + Duration::from_secs(1);
    let (a, b) = (insert(&s, T1, "a").await, insert(&s, T2, "b").await);
    assert_eq!(s.claim("default", now, 10).await.unwrap().len(), 2);
    let hold = RowOutcome::Retry {
        at: now + Duration::from_secs(60),
        error: format!("{held} (...): HTTP 403: no"),
        attempt: true,
        maybe_stored: false,
    };
    s.record(&[(a, hold.clone()), (b, hold)], now)
        .await
        .unwrap();
    // An operator requeued b meanwhile: not held any more.
    sqlx::query("UPDATE outbox SET last_error = 'requeued by an operator' WHERE id = ?1")
        .bind(b)
        .execute(s.pool())
        .await
        .unwrap();
    let judged = [(a, "HTTP 403: no (RequestId r1)".into()), (b, "x".into())];
    assert_eq!(s.dead_letter_held(&judged, held, now).await.unwrap(), 1);
    let rows: Vec<(i64, String, String, i64)> =
        sqlx::query_as("SELECT id, status, last_error, attempts FROM outbox ORDER BY id")
            .fetch_all(s.pool())
            .await
            .unwrap();
    assert_eq!(
        rows,
        [
            (a, "dead".into(), "HTTP 403: no (RequestId r1)".into(), 1),
            (b, "pending".into(), "requeued by an operator".into(), 1)
        ]
    );
}

#[test]
fn timestamps_round_trip_through_text() {
    let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_000_000_123);
    let text = timestamp(t);
    assert_eq!(text.len(), 24);
    assert_eq!(parse_timestamp(&text), Some(t));
}
