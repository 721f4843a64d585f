//! Threads through the outbox on SQLite (migration `..07_threads`): the
//! migration of a database at migration 6, the producer contract of
//! `outbox_threads` and `thread_key`, and the thread statements.

use std::borrow::Cow;
use std::time::{Duration, SystemTime};

use sqlx::Row;

use super::*;
use crate::store::thread::{HELD_BY_THREAD_PREFIX, held_by_thread, no_such_thread, thread_purged};
use crate::store::{
    DaemonStore, Enqueued, NewMessage, NewThread, OperatorStore, Outbox, Requeue, RowOutcome,
    ThreadOutcome, ThreadRef, timestamp,
};

const T1: &str = "7f9325f6-ef44-4911-89a8-ae51010a5aa4";
const T2: &str = "0b8c8a58-1a60-4c5e-9f0e-3d6f2f2a9d11";
/// The Mews id the fake "creates" for a thread in these tests.
const M: &str = "5e1f7c1a-9b0d-4a55-8d3e-2f6a7b8c9d01";

async fn store() -> (tempfile::TempDir, SqliteStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("o.db"), Duration::from_secs(5))
        .await
        .unwrap();
    (dir, store)
}

fn later() -> SystemTime {
    SystemTime::now() + Duration::from_secs(1)
}

async fn exec(s: &SqliteStore, sql: &str) -> Result<(), String> {
    sqlx::query(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(s.pool())
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

async fn insert_thread(s: &SqliteStore, account: &str, key: &str) -> i64 {
    sqlx::query_scalar(
        "INSERT INTO outbox_threads (account, thread_key, subject, original_sender)
         VALUES (?1, ?2, 'Your stay', 'Front desk') RETURNING id",
    )
    .bind(account)
    .bind(key)
    .fetch_one(s.pool())
    .await
    .unwrap()
}

async fn insert_keyed(s: &SqliteStore, account: &str, key: &str, text: &str) -> i64 {
    sqlx::query_scalar(
        "INSERT INTO outbox (thread_key, text, account) VALUES (?1, ?2, ?3) RETURNING id",
    )
    .bind(key)
    .bind(text)
    .bind(account)
    .fetch_one(s.pool())
    .await
    .unwrap()
}

async fn insert_by_id(s: &SqliteStore, thread: &str, text: &str) -> i64 {
    sqlx::query_scalar("INSERT INTO outbox (message_thread_id, text) VALUES (?1, ?2) RETURNING id")
        .bind(thread)
        .bind(text)
        .fetch_one(s.pool())
        .await
        .unwrap()
}

/// (status, last_error, keyed_thread_id) of outbox row `id`.
async fn row(s: &SqliteStore, id: i64) -> (String, Option<String>, Option<String>) {
    sqlx::query_as("SELECT status, last_error, keyed_thread_id FROM outbox WHERE id = ?1")
        .bind(id)
        .fetch_one(s.pool())
        .await
        .unwrap()
}

/// (status, attempts, needs_reconcile, next_attempt_at, last_error) of thread `id`.
async fn thread(s: &SqliteStore, id: i64) -> (String, i64, i64, String, Option<String>) {
    sqlx::query_as(
        "SELECT status, attempts, needs_reconcile, next_attempt_at, last_error
         FROM outbox_threads WHERE id = ?1",
    )
    .bind(id)
    .fetch_one(s.pool())
    .await
    .unwrap()
}

/// Claims, one row at a time, and delivers every claimable row of
/// `account`: the ids in the order they were sent, with their thread.
async fn drain(s: &SqliteStore, account: &str) -> Vec<(i64, String)> {
    let mut sent = Vec::new();
    loop {
        let claimed = s.claim(account, later(), 1).await.unwrap();
        let Some(r) = claimed.first() else {
            return sent;
        };
        sent.push((r.id, r.message_thread_id.clone()));
        let delivered = RowOutcome::Delivered {
            mews_message_id: format!("m{}", r.id),
            mews_created_utc: "2026-12-07T00:00:00Z".into(),
            mews_sender: "Application".into(),
        };
        s.record(&[(r.id, delivered)], SystemTime::now())
            .await
            .unwrap();
    }
}

fn created() -> ThreadOutcome {
    ThreadOutcome::Created {
        mews_thread_id: M.into(),
        mews_created_utc: "2026-12-07T00:00:00Z".into(),
    }
}

/// Claims thread `id` of `account` (it must be the one due) and records `outcome`.
async fn claim_and_record(s: &SqliteStore, account: &str, id: i64, outcome: ThreadOutcome) {
    let claimed = s.claim_thread(account, later()).await.unwrap().unwrap();
    assert_eq!(claimed.id, id);
    s.record_thread(id, &outcome, SystemTime::now())
        .await
        .unwrap();
}

// ---------------------------------------------------------------------------
// The migration

/// Every row of `outbox` in the columns of migration 6, and the heads.
async fn snapshot(pool: &sqlx::SqlitePool) -> (Vec<String>, Vec<String>) {
    let rows = sqlx::query_scalar(
        "SELECT json_array(id, message_thread_id, text, identifier, account, status, attempts,
                next_attempt_at, last_error, created_at, first_sent_at, delivered_at,
                mews_message_id, mews_created_utc, mews_sender, needs_reconcile, dead_at)
         FROM outbox ORDER BY id",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let heads = sqlx::query_scalar(
        "SELECT json_array(message_thread_id, head_id, account, ready_at)
         FROM outbox_thread_head ORDER BY message_thread_id",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    (rows, heads)
}

async fn outbox_sequence(pool: &sqlx::SqlitePool) -> i64 {
    sqlx::query_scalar("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'")
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn migrating_from_migration_6_keeps_every_row_its_id_the_heads_and_the_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("o.db");
    maintenance::create_database_file(&path).unwrap();
    let options = sqlx::sqlite::SqliteConnectOptions::new().filename(&path);
    let old = sqlx::SqlitePool::connect_with(options).await.unwrap();
    let mut up_to_6 = sqlx::migrate!("./migrations");
    up_to_6.migrations = Cow::Owned(
        up_to_6
            .migrations
            .iter()
            .filter(|m| m.version < 20261207000000)
            .cloned()
            .collect(),
    );
    assert_eq!(up_to_6.migrations.len(), 6);
    up_to_6.dangerous_set_table_name(MIGRATIONS_TABLE);
    up_to_6.run(&old).await.unwrap();

    // A deep thread T1 (two delivered, one sending, three pending), a
    // thread T2 with a dead row then a pending one, rows of another account,
    // and ten delivered rows at the end that are pruned.
    let statuses = [
        (T1, "delivered"),
        (T2, "dead"),
        (T1, "delivered"),
        (T1, "sending"),
        (T2, "pending"),
        (T1, "pending"),
        (T1, "pending"),
        (T1, "pending"),
    ];
    for (i, (thread, status)) in statuses.iter().enumerate() {
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO outbox (message_thread_id, text, identifier) VALUES (?1, ?2, ?3) RETURNING id",
        )
        .bind(thread)
        .bind(format!("text {i}"))
        .bind(format!("ident-{i}"))
        .fetch_one(&old)
        .await
        .unwrap();
        // The daemon's own statements: a claim, then the outcome.
        if *status != "pending" {
            sqlx::query("UPDATE outbox SET status = 'sending', first_sent_at = '2026-12-06T10:00:00.000Z' WHERE id = ?1")
                .bind(id)
                .execute(&old)
                .await
                .unwrap();
        }
        match *status {
            "delivered" => {
                sqlx::query("UPDATE outbox SET status = 'delivered', delivered_at = '2026-12-06T10:00:01.000Z', mews_message_id = 'mm' || id WHERE id = ?1")
                    .bind(id).execute(&old).await.unwrap();
            }
            "dead" => {
                sqlx::query("UPDATE outbox SET status = 'dead', dead_at = '2026-12-06T10:00:01.000Z', last_error = 'HTTP 400: no', attempts = 1 WHERE id = ?1")
                    .bind(id).execute(&old).await.unwrap();
            }
            _ => {}
        }
    }
    let other = "11111111-2222-4333-8444-555555555555";
    sqlx::query("INSERT INTO outbox (message_thread_id, text, account) VALUES (?1, 'other', 'b')")
        .bind(other)
        .execute(&old)
        .await
        .map(|_| ())
        .unwrap_or_else(|_| panic!("insert into b"));
    for _ in 0..10 {
        sqlx::query("INSERT INTO outbox (message_thread_id, text) VALUES (?1, 'pruned')")
            .bind(other)
            .execute(&old)
            .await
            .unwrap();
    }
    sqlx::query("UPDATE outbox SET status = 'sending' WHERE text = 'pruned'")
        .execute(&old)
        .await
        .unwrap();
    sqlx::query("UPDATE outbox SET status = 'delivered', delivered_at = '2026-12-06T10:00:01.000Z' WHERE text = 'pruned'")
        .execute(&old)
        .await
        .unwrap();
    sqlx::query("DELETE FROM outbox WHERE text = 'pruned'")
        .execute(&old)
        .await
        .unwrap();
    let max_id: i64 = sqlx::query_scalar("SELECT max(id) FROM outbox")
        .fetch_one(&old)
        .await
        .unwrap();
    let sequence = outbox_sequence(&old).await;
    assert_eq!(sequence, max_id + 10, "the pruned rows raised the sequence");
    // The application's own schema around the outbox (it may live in the
    // application's database): a view of it, and a trigger that enqueues.
    sqlx::raw_sql(
        "CREATE VIEW app_waiting AS SELECT id, text FROM outbox WHERE status = 'pending';
         CREATE TABLE app_checkins (thread TEXT NOT NULL);
         CREATE TRIGGER app_checkin_enqueues AFTER INSERT ON app_checkins BEGIN
             INSERT INTO outbox (message_thread_id, text) VALUES (new.thread, 'Welcome');
         END;",
    )
    .execute(&old)
    .await
    .unwrap();
    let before = snapshot(&old).await;
    assert_eq!(before.0.len(), 9);
    assert_eq!(before.1.len(), 3, "heads of T1, T2 and the other thread");
    old.close().await;

    let s = SqliteStore::open(&path, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(snapshot(s.pool()).await, before, "every row and head kept");
    assert_eq!(outbox_sequence(s.pool()).await, sequence);
    let new = insert_by_id(&s, T2, "after the migration").await;
    assert_eq!(
        new,
        sequence + 1,
        "a new id is above the old sequence, not max(id) + 1"
    );

    // The migrated table still enforces the producer contract and keeps the heads.
    let e = exec(
        &s,
        &format!(
            "INSERT INTO outbox (message_thread_id, text, status) VALUES ('{T1}', 'x', 'sending')"
        ),
    )
    .await;
    assert!(e.unwrap_err().contains("producer_may_not_set_status"));
    let e = exec(
        &s,
        &format!("INSERT INTO outbox (message_thread_id, text) VALUES ('{T1}', '\u{3000}')"),
    )
    .await;
    assert!(e.unwrap_err().contains("text_must_be_non_blank_text"));
    let e = exec(&s, "INSERT INTO outbox (message_thread_id, text, identifier) VALUES ('7f9325f6-ef44-4911-89a8-ae51010a5aa4', 'x', 'ident-0')").await;
    assert!(e.unwrap_err().contains("UNIQUE"), "identifier still unique");
    // The row left sending (id 4) comes back first; T1 then follows in order.
    assert_eq!(
        s.recover_abandoned(Duration::ZERO, SystemTime::now())
            .await
            .unwrap(),
        1
    );
    let sent = drain(&s, "default").await;
    let of = |thread: &str| -> Vec<i64> {
        sent.iter()
            .filter(|(_, t)| t == thread)
            .map(|(id, _)| *id)
            .collect()
    };
    assert_eq!((of(T1), of(T2)), (vec![4, 6, 7, 8], vec![5, new]));
    // The application's view and trigger still work on the rebuilt table.
    let waiting: Vec<i64> = sqlx::query_scalar("SELECT id FROM app_waiting ORDER BY id")
        .fetch_all(s.pool())
        .await
        .unwrap();
    assert_eq!(waiting, [9], "only account b's row is still pending");
    sqlx::query("INSERT INTO app_checkins (thread) VALUES (?1)")
        .bind(T1)
        .execute(s.pool())
        .await
        .unwrap();
    assert_eq!(drain(&s, "default").await.len(), 1);
    // The schema is the binary's: a read-only open accepts it.
    SqliteStore::open_read_only(&path, Duration::from_secs(5))
        .await
        .unwrap();
}

// ---------------------------------------------------------------------------
// The producer contract

#[tokio::test]
async fn the_producer_contract_covers_thread_keys_and_outbox_threads() {
    let (_dir, s) = store().await;
    let outbox = [
        (
            format!("(message_thread_id, thread_key, text) VALUES ('{T1}', 'k', 'hi')"),
            "exactly_one_of_message_thread_id_and_thread_key",
        ),
        (
            "(text) VALUES ('hi')".to_owned(),
            "exactly_one_of_message_thread_id_and_thread_key",
        ),
        (
            "(thread_key, text) VALUES ('', 'hi')".to_owned(),
            "thread_key_must_be_null_or_non_empty_text",
        ),
        (
            "(thread_key, text) VALUES (x'6b', 'hi')".to_owned(),
            "thread_key_must_be_null_or_non_empty_text",
        ),
        (
            "(thread_key, text) VALUES ('k', '')".to_owned(),
            "text_must_be_non_blank_text",
        ),
        (
            format!("(thread_key, text, keyed_thread_id) VALUES ('k', 'hi', '{M}')"),
            "producer_may_not_set_keyed_thread_id",
        ),
        (
            format!("(message_thread_id, text, keyed_thread_id) VALUES ('{T1}', 'hi', '{M}')"),
            "producer_may_not_set_keyed_thread_id",
        ),
        (
            "(thread_key, text, status) VALUES ('k', 'hi', 'sending')".to_owned(),
            "producer_may_not_set_status",
        ),
        (
            "(message_thread_id, text) VALUES ('nope', 'hi')".to_owned(),
            "message_thread_id_must_be_a_lowercase_uuid",
        ),
    ];
    for (values, expected) in outbox {
        let sql = format!("INSERT INTO outbox {values}");
        let e = exec(&s, &sql).await.expect_err(&sql);
        assert!(e.contains(expected), "{sql}\n=> {e}");
    }
    let threads = [
        (
            "(thread_key, subject, original_sender) VALUES ('', 's', 'o')",
            "thread_key_must_be_non_empty_text",
        ),
        ("(subject, original_sender) VALUES ('s', 'o')", "NOT NULL"),
        (
            "(thread_key, subject, original_sender) VALUES ('k', ' \u{3000}\u{a0}', 'o')",
            "subject_must_be_non_blank_text",
        ),
        (
            "(thread_key, subject, original_sender) VALUES ('k', x'73', 'o')",
            "subject_must_be_non_blank_text",
        ),
        (
            "(thread_key, subject, original_sender) VALUES ('k', 's', '\u{2028}')",
            "original_sender_must_be_non_blank_text",
        ),
        (
            "(thread_key, subject, original_sender, account) VALUES ('k', 's', 'o', '')",
            "account_must_be_non_empty_text",
        ),
        (
            "(thread_key, subject, original_sender, status) VALUES ('k', 's', 'o', 'lost')",
            "status_must_be_pending_creating_created_or_dead",
        ),
        (
            "(thread_key, subject, original_sender, next_attempt_at) VALUES ('k', 's', 'o', 'tomorrow')",
            "next_attempt_at_must_be_a_utc_timestamp",
        ),
    ];
    for (values, expected) in threads {
        let sql = format!("INSERT INTO outbox_threads {values}");
        let e = exec(&s, &sql).await.expect_err(&sql);
        assert!(e.contains(expected), "{sql}\n=> {e}");
    }
    let daemon_columns = [
        ("status", "'creating'"),
        ("status", "'created'"),
        ("status", "'dead'"),
        ("attempts", "1"),
        ("needs_reconcile", "1"),
        ("last_error", "'x'"),
        ("created_at", "'2020-01-01T00:00:00.000Z'"),
        ("first_sent_at", "'2020-01-01T00:00:00.000Z'"),
        ("mews_thread_id", "'m'"),
        ("mews_created_utc", "'c'"),
        ("thread_created_at", "'2020-01-01T00:00:00.000Z'"),
        ("dead_at", "'2020-01-01T00:00:00.000Z'"),
    ];
    for (column, value) in daemon_columns {
        let sql = format!(
            "INSERT INTO outbox_threads (thread_key, subject, original_sender, {column}) VALUES ('k', 's', 'o', {value})"
        );
        let e = exec(&s, &sql).await.expect_err(&sql);
        assert!(
            e.contains(&format!("producer_may_not_set_{column}")),
            "{sql}\n=> {e}"
        );
    }
    // What a producer may give: the key per account, a schedule, an id.
    exec(&s, "INSERT INTO outbox_threads (thread_key, subject, original_sender, next_attempt_at, id) VALUES ('k', 's', 'o', '2026-12-07T10:00:00.000Z', 40)").await.unwrap();
    exec(&s, "INSERT INTO outbox_threads (thread_key, subject, original_sender, account) VALUES ('k', 's', 'o', 'b')").await.unwrap();
    let e = exec(&s, "INSERT INTO outbox_threads (thread_key, subject, original_sender) VALUES ('k', 's2', 'o2')").await.unwrap_err();
    assert!(
        e.contains("UNIQUE constraint failed: outbox_threads.account, outbox_threads.thread_key"),
        "{e}"
    );
    exec(&s, "INSERT INTO outbox_threads (thread_key, subject, original_sender) VALUES ('k', 's2', 'o2') ON CONFLICT (account, thread_key) DO NOTHING").await.unwrap();
    exec(
        &s,
        "INSERT INTO outbox (thread_key, text) VALUES ('k', 'hi')",
    )
    .await
    .unwrap();
    exec(
        &s,
        "INSERT INTO outbox (thread_key, text) VALUES ('no thread yet', 'hi')",
    )
    .await
    .unwrap();
}

// ---------------------------------------------------------------------------
// Threads and their messages

#[tokio::test]
async fn keyed_messages_wait_for_their_thread_then_go_in_order_with_the_threads_other_messages() {
    let (_dir, s) = store().await;
    // The producer's transaction: the thread and its first two messages.
    let mut tx = s.pool().begin().await.unwrap();
    let tid: i64 = sqlx::query_scalar(
        "INSERT INTO outbox_threads (thread_key, subject, original_sender)
         VALUES ('booking-1', 'Your stay', 'Front desk') RETURNING id",
    )
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    let mut first = Vec::new();
    for text in ["first", "second"] {
        first.push(
            sqlx::query_scalar::<_, i64>(
                "INSERT INTO outbox (thread_key, text) VALUES ('booking-1', ?1) RETURNING id",
            )
            .bind(text)
            .fetch_one(&mut *tx)
            .await
            .unwrap(),
        );
    }
    tx.commit().await.unwrap();
    let unrelated = insert_by_id(&s, T1, "unrelated").await;

    // Before the thread exists its messages are never claimed and block nothing.
    assert_eq!(drain(&s, "default").await, [(unrelated, T1.to_owned())]);
    assert_eq!(
        s.next_due("default", SystemTime::now()).await.unwrap(),
        None
    );
    assert_eq!(
        s.next_thread_due("default", SystemTime::now())
            .await
            .unwrap(),
        None
    );

    let before = SystemTime::now();
    let claimed = s.claim_thread("default", later()).await.unwrap().unwrap();
    assert_eq!(
        (
            claimed.id,
            claimed.thread_key.as_str(),
            claimed.subject.as_str()
        ),
        (tid, "booking-1", "Your stay")
    );
    assert_eq!(claimed.original_sender, "Front desk");
    assert_eq!((claimed.attempts, claimed.needs_reconcile), (0, false));
    assert!(claimed.first_sent_at.unwrap() >= before - Duration::from_secs(1));
    assert_eq!(thread(&s, tid).await.0, "creating");
    assert!(
        s.claim_thread("default", later()).await.unwrap().is_none(),
        "one claim"
    );
    assert!(drain(&s, "default").await.is_empty(), "still not created");

    s.record_thread(tid, &created(), SystemTime::now())
        .await
        .unwrap();
    assert_eq!(row(&s, first[0]).await.2.as_deref(), Some(M));
    // Later messages into the same Mews thread: by its id, and by key (resolved at insert).
    let by_id = insert_by_id(&s, M, "third, by id").await;
    let by_key = insert_keyed(&s, "default", "booking-1", "fourth, by key").await;
    assert_eq!(
        row(&s, by_key).await.2.as_deref(),
        Some(M),
        "resolved at insert"
    );
    let by_id_again = insert_by_id(&s, M, "fifth, by id").await;

    let m = M.to_owned();
    assert_eq!(
        drain(&s, "default").await,
        [
            (first[0], m.clone()),
            (first[1], m.clone()),
            (by_id, m.clone()),
            (by_key, m.clone()),
            (by_id_again, m)
        ],
        "one thread, in insertion order, sent with the thread's Mews id"
    );
    assert_eq!(
        s.owned_thread_ids(&[M, T1]).await.unwrap(),
        [M.to_owned()].into_iter().collect()
    );
    let stored: (String, Option<String>, Option<String>) = sqlx::query_as(
        "SELECT mews_thread_id, mews_created_utc, thread_created_at FROM outbox_threads WHERE id = ?1",
    )
    .bind(tid)
    .fetch_one(s.pool())
    .await
    .unwrap();
    assert_eq!(stored.0, M);
    assert!(stored.2.is_some());
}

#[tokio::test]
async fn a_keyed_row_waits_behind_the_earlier_rows_of_its_thread_once_resolved() {
    let (_dir, s) = store().await;
    let tid = insert_thread(&s, "default", "k").await;
    let keyed = insert_keyed(&s, "default", "k", "keyed").await;
    // A producer that learnt the id elsewhere already sends into the
    // thread's Mews id (a newer row): the keyed row, older, goes first.
    s.claim_thread("default", later()).await.unwrap().unwrap();
    s.record_thread(tid, &created(), SystemTime::now())
        .await
        .unwrap();
    let newer = insert_by_id(&s, M, "newer").await;
    let claimed = s.claim("default", later(), 10).await.unwrap();
    assert_eq!(
        claimed.iter().map(|r| r.id).collect::<Vec<_>>(),
        [keyed],
        "one head per thread"
    );
    s.record(&[(keyed, RowOutcome::Release)], SystemTime::now())
        .await
        .unwrap();
    let order: Vec<i64> = drain(&s, "default")
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(order, [keyed, newer]);
}

#[tokio::test]
async fn a_dead_thread_holds_its_messages_until_requeued_and_created_and_purge_makes_them_dead() {
    let (_dir, s) = store().await;
    let tid = insert_thread(&s, "default", "k").await;
    let a = insert_keyed(&s, "default", "k", "a").await;
    let b = insert_keyed(&s, "default", "k", "b").await;
    let error = "HTTP 403: not allowed (RequestId r1)";
    claim_and_record(
        &s,
        "default",
        tid,
        ThreadOutcome::Dead {
            error: error.into(),
        },
    )
    .await;
    let held = held_by_thread("k", tid, error);
    assert!(held.starts_with(HELD_BY_THREAD_PREFIX));
    for id in [a, b] {
        assert_eq!(
            row(&s, id).await,
            ("pending".into(), Some(held.clone()), None)
        );
    }
    let (status, attempts, _, _, last_error) = thread(&s, tid).await;
    assert_eq!(
        (status.as_str(), attempts, last_error.as_deref()),
        ("dead", 1, Some(error))
    );
    assert!(drain(&s, "default").await.is_empty(), "held");
    let dead = s.dead_threads(None).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(
        (
            dead[0].id,
            dead[0].messages_held,
            dead[0].thread_key.as_str()
        ),
        (tid, 2, "k")
    );
    assert!(s.dead_threads(Some("other")).await.unwrap().is_empty());
    let status = s.status(SystemTime::now()).await.unwrap();
    assert_eq!(
        (status[0].threads.dead, status[0].threads.messages_waiting),
        (1, 2)
    );

    // Requeue: named threads must all be dead (and of the account).
    let e = s
        .requeue_dead_threads(&Requeue::Ids(vec![tid, 99]), None, SystemTime::now())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("thread 99 does not exist"), "{e}");
    let e = s
        .requeue_dead_threads(&Requeue::Ids(vec![tid]), Some("other"), SystemTime::now())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("belongs to account default"), "{e}");
    assert_eq!(thread(&s, tid).await.0, "dead", "refused as a whole");
    let requeued = s
        .requeue_dead_threads(&Requeue::Ids(vec![tid]), None, SystemTime::now())
        .await
        .unwrap();
    assert_eq!(requeued, [tid]);
    let (status, attempts, reconcile, _, last_error) = thread(&s, tid).await;
    assert_eq!(
        (status.as_str(), attempts, reconcile, last_error.as_deref()),
        ("pending", 0, 0, Some("requeued by an operator"))
    );
    assert_eq!(row(&s, a).await.1, Some(held.clone()), "held until created");
    claim_and_record(&s, "default", tid, created()).await;
    for id in [a, b] {
        assert_eq!(row(&s, id).await, ("pending".into(), None, Some(M.into())));
    }
    assert_eq!(drain(&s, "default").await.len(), 2);

    // Purge: the held messages become dead, naming the purged thread.
    let t2 = insert_thread(&s, "default", "k2").await;
    let c = insert_keyed(&s, "default", "k2", "c").await;
    claim_and_record(
        &s,
        "default",
        t2,
        ThreadOutcome::Dead {
            error: "HTTP 400: bad".into(),
        },
    )
    .await;
    let past = SystemTime::now() - Duration::from_secs(3600);
    assert_eq!(
        s.purge_dead_threads(past, None).await.unwrap(),
        0,
        "too young"
    );
    assert_eq!(
        s.purge_dead_threads(later(), Some("other")).await.unwrap(),
        0
    );
    assert_eq!(s.purge_dead_threads(later(), None).await.unwrap(), 1);
    assert_eq!(
        row(&s, c).await,
        ("dead".into(), Some(thread_purged("k2", t2)), None)
    );
    let gone: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox_threads WHERE id = ?1")
        .bind(t2)
        .fetch_one(s.pool())
        .await
        .unwrap();
    assert_eq!(gone, 0);
    let dead = s.dead_rows(None).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(
        (
            dead[0].thread_key.as_deref(),
            dead[0].message_thread_id.as_deref()
        ),
        (Some("k2"), None)
    );
    assert!(dead[0].dead_at.is_some());
    assert_eq!(tid, 1, "the first thread survived the purge");
    // A new thread of the same key is created: the purged message, dead,
    // stays so; requeued, it joins that thread.
    let t3 = insert_thread(&s, "default", "k2").await;
    claim_and_record(&s, "default", t3, created()).await;
    assert_eq!(row(&s, c).await.0, "dead");
    s.requeue_dead(&Requeue::Ids(vec![c]), None, SystemTime::now())
        .await
        .unwrap();
    assert_eq!(row(&s, c).await.2.as_deref(), Some(M));
    assert_eq!(drain(&s, "default").await, [(c, M.to_owned())]);
    assert_eq!(thread(&s, tid).await.0, "created");
}

#[tokio::test]
async fn record_thread_changes_only_a_creating_thread_and_counts_attempts_and_doubt() {
    let (_dir, s) = store().await;
    let tid = insert_thread(&s, "default", "k").await;
    let waiting = insert_keyed(&s, "default", "k", "w").await;
    // Not claimed: nothing changes.
    for outcome in [
        created(),
        ThreadOutcome::Dead { error: "x".into() },
        ThreadOutcome::Release,
    ] {
        s.record_thread(tid, &outcome, SystemTime::now())
            .await
            .unwrap();
        assert_eq!(thread(&s, tid).await.0, "pending");
    }
    assert_eq!(row(&s, waiting).await, ("pending".into(), None, None));

    let first = s.claim_thread("default", later()).await.unwrap().unwrap();
    let retry_at = SystemTime::now() + Duration::from_secs(60);
    let retry = |attempt, maybe_stored| ThreadOutcome::Retry {
        at: retry_at,
        error: "HTTP 503".into(),
        attempt,
        maybe_stored,
    };
    s.record_thread(tid, &retry(true, true), SystemTime::now())
        .await
        .unwrap();
    let (status, attempts, reconcile, next, error) = thread(&s, tid).await;
    assert_eq!(
        (status.as_str(), attempts, reconcile, next, error.as_deref()),
        ("pending", 1, 1, timestamp(retry_at), Some("HTTP 503"))
    );
    assert!(
        s.claim_thread("default", later()).await.unwrap().is_none(),
        "not due yet"
    );
    let due = s
        .next_thread_due("default", SystemTime::now())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(timestamp(due), timestamp(retry_at));

    let again = s.claim_thread("default", retry_at).await.unwrap().unwrap();
    assert_eq!((again.attempts, again.needs_reconcile), (1, true));
    assert_eq!(again.first_sent_at, first.first_sent_at, "first sent once");
    // Neither an attempt nor doubt: both stay as they were.
    s.record_thread(tid, &retry(false, false), SystemTime::now())
        .await
        .unwrap();
    let (_, attempts, reconcile, _, _) = thread(&s, tid).await;
    assert_eq!((attempts, reconcile), (1, 1));

    s.claim_thread("default", retry_at).await.unwrap().unwrap();
    let released_at = SystemTime::now();
    s.record_thread(tid, &ThreadOutcome::Release, released_at)
        .await
        .unwrap();
    let (status, attempts, reconcile, next, _) = thread(&s, tid).await;
    assert_eq!((status.as_str(), attempts, reconcile), ("pending", 1, 1));
    assert_eq!(next, timestamp(released_at), "due now");

    s.claim_thread("default", later()).await.unwrap().unwrap();
    s.record_thread(tid, &created(), SystemTime::now())
        .await
        .unwrap();
    let (status, _, reconcile, _, _) = thread(&s, tid).await;
    assert_eq!((status.as_str(), reconcile), ("created", 0));
    // Created is final: a late outcome changes nothing.
    s.record_thread(
        tid,
        &ThreadOutcome::Dead {
            error: "late".into(),
        },
        SystemTime::now(),
    )
    .await
    .unwrap();
    assert_eq!(thread(&s, tid).await.0, "created");
    assert_eq!(row(&s, waiting).await.1, None);
}

#[tokio::test]
async fn threads_left_creating_are_recovered_to_be_read_back_after_settling() {
    let (_dir, s) = store().await;
    let a = insert_thread(&s, "a", "k").await;
    let b = insert_thread(&s, "b", "k").await;
    s.claim_thread("a", later()).await.unwrap().unwrap();
    s.claim_thread("b", later()).await.unwrap().unwrap();
    let started_by = SystemTime::now() + Duration::from_secs(5);
    s.request_starting("a", started_by).await.unwrap();

    let now = SystemTime::now();
    let settle = Duration::from_secs(30);
    let recovered = s.recover_abandoned(settle, now).await.unwrap();
    assert_eq!(recovered, 2);
    let (status, _, reconcile, next, _) = thread(&s, a).await;
    assert_eq!((status.as_str(), reconcile), ("pending", 1));
    assert_eq!(
        next,
        timestamp(started_by + settle),
        "from its request's start"
    );
    let (_, _, reconcile, next, _) = thread(&s, b).await;
    assert_eq!(reconcile, 1);
    assert_eq!(next, timestamp(now + settle), "from now when unknown");
    assert!(
        s.claim_thread("a", later()).await.unwrap().is_none(),
        "settling"
    );
    let claimed = s
        .claim_thread("a", started_by + settle)
        .await
        .unwrap()
        .unwrap();
    assert!(claimed.needs_reconcile);
}

#[tokio::test]
async fn threadless_rows_are_flagged_and_cleared_once_their_thread_is_created() {
    let (_dir, s) = store().await;
    let lonely = insert_keyed(&s, "default", "nobody", "x").await;
    let other_account = insert_keyed(&s, "b", "nobody", "y").await;
    let with_thread = insert_keyed(&s, "default", "k", "z").await;
    insert_thread(&s, "default", "k").await;
    // A row with a reason of its own keeps it.
    let own_reason = insert_keyed(&s, "default", "nobody", "w").await;
    sqlx::query("UPDATE outbox SET last_error = 'its own' WHERE id = ?1")
        .bind(own_reason)
        .execute(s.pool())
        .await
        .unwrap();

    let flagged = s.flag_threadless_rows().await.unwrap();
    assert_eq!(
        flagged,
        [
            ("b".to_owned(), "nobody".to_owned(), 1),
            ("default".to_owned(), "nobody".to_owned(), 2)
        ]
    );
    assert_eq!(
        row(&s, lonely).await.1,
        Some(no_such_thread("default", "nobody"))
    );
    assert_eq!(
        row(&s, other_account).await.1,
        Some(no_such_thread("b", "nobody"))
    );
    assert_eq!(row(&s, own_reason).await.1.as_deref(), Some("its own"));
    assert_eq!(row(&s, with_thread).await.1, None);
    assert_eq!(
        s.flag_threadless_rows().await.unwrap().len(),
        2,
        "again: same groups"
    );

    // The thread arrives and is created: the flag goes, the other reason stays.
    let tid = insert_thread(&s, "default", "nobody").await;
    assert!(
        s.flag_threadless_rows()
            .await
            .unwrap()
            .iter()
            .all(|(a, _, _)| a == "b")
    );
    let claimed = s.claim_thread("default", later()).await.unwrap().unwrap();
    assert_ne!(claimed.id, tid, "the older thread first");
    s.record_thread(claimed.id, &created(), SystemTime::now())
        .await
        .unwrap();
    claim_and_record(
        &s,
        "default",
        tid,
        ThreadOutcome::Created {
            mews_thread_id: T1.into(),
            mews_created_utc: "c".into(),
        },
    )
    .await;
    assert_eq!(
        row(&s, lonely).await,
        ("pending".into(), None, Some(T1.into()))
    );
    assert_eq!(row(&s, own_reason).await.1.as_deref(), Some("its own"));
}

#[tokio::test]
async fn enqueue_inserts_a_thread_with_its_message_or_joins_an_existing_one() {
    let (_dir, s) = store().await;
    let message = |key: &str, identifier: Option<&str>| NewMessage {
        thread: ThreadRef::Key(key.into()),
        text: "hello".into(),
        identifier: identifier.map(str::to_owned),
        account: "default".into(),
    };
    let new_thread = |key: &str, subject: &str| NewThread {
        thread_key: key.into(),
        subject: subject.into(),
        original_sender: "Front desk".into(),
    };
    let Enqueued::Inserted(first) = s
        .enqueue(&message("k", Some("i1")), Some(&new_thread("k", "Stay")))
        .await
        .unwrap()
    else {
        panic!("not inserted")
    };
    let Enqueued::Inserted(second) = s
        .enqueue(
            &message("k", None),
            Some(&new_thread("k", "Another subject")),
        )
        .await
        .unwrap()
    else {
        panic!("not inserted")
    };
    assert!(second > first);
    let threads: Vec<(String, String)> =
        sqlx::query_as("SELECT thread_key, subject FROM outbox_threads")
            .fetch_all(s.pool())
            .await
            .unwrap();
    assert_eq!(
        threads,
        [("k".to_owned(), "Stay".to_owned())],
        "the existing key is reused"
    );
    assert_eq!(
        s.enqueue(&message("k", Some("i1")), Some(&new_thread("k2", "x"))).await.unwrap_err().to_string(),
        StoreError::Refused(
            "a new thread (thread_key \"k2\") needs a message naming the same thread_key, not Key(\"k\")".into()
        )
        .to_string(),
        "a mismatched key is refused"
    );
    let by_id = NewMessage {
        thread: ThreadRef::Id(T1.into()),
        ..message("k", None)
    };
    assert!(matches!(
        s.enqueue(&by_id, Some(&new_thread("k", "x"))).await,
        Err(StoreError::Refused(_))
    ));
    assert_eq!(
        s.enqueue(&message("k", Some("i1")), Some(&new_thread("k", "Stay")))
            .await
            .unwrap(),
        Enqueued::AlreadyThere(first)
    );
    // An identifier already used inserts nothing, not even a new thread.
    assert_eq!(
        s.enqueue(&message("k3", Some("i1")), Some(&new_thread("k3", "x")))
            .await
            .unwrap(),
        Enqueued::AlreadyThere(first)
    );
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox_threads")
        .fetch_one(s.pool())
        .await
        .unwrap();
    assert_eq!(n, 1);
    let e = s
        .enqueue(&message("k4", None), Some(&new_thread("k4", "\u{3000}")))
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("subject_must_be_non_blank_text"),
        "{e}"
    );
    let e = s.enqueue(&message("", None), None).await.unwrap_err();
    assert!(
        e.to_string()
            .contains("thread_key_must_be_null_or_non_empty_text"),
        "{e}"
    );
    // Without a new thread a keyed message waits for one.
    let Enqueued::Inserted(waiting) = s.enqueue(&message("later", None), None).await.unwrap()
    else {
        panic!()
    };
    assert_eq!(row(&s, waiting).await, ("pending".into(), None, None));
}

#[tokio::test]
async fn status_and_queue_summary_count_threads_and_waiting_messages() {
    let (_dir, s) = store().await;
    // Account "t" has only threads (and their waiting messages).
    for key in ["p1", "p2", "c", "created", "dead"] {
        insert_thread(&s, "t", key).await;
    }
    insert_keyed(&s, "t", "p1", "w").await;
    insert_keyed(&s, "t", "dead", "w").await;
    insert_keyed(&s, "t", "created", "resolved, not waiting").await;
    // Claimed oldest first: p1, p2, c, created, dead.
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(s.claim_thread("t", later()).await.unwrap().unwrap().id);
    }
    let outcomes = [
        ThreadOutcome::Release,
        ThreadOutcome::Release,
        // c stays creating
        ThreadOutcome::Release,
        created(),
        ThreadOutcome::Dead { error: "e".into() },
    ];
    for (i, (id, outcome)) in ids.iter().zip(outcomes).enumerate() {
        if i != 2 {
            s.record_thread(*id, &outcome, SystemTime::now())
                .await
                .unwrap();
        }
    }
    let expected = crate::store::ThreadCounts {
        pending: 2,
        creating: 1,
        created: 1,
        dead: 1,
        messages_waiting: 2,
    };
    let status = s.status(SystemTime::now()).await.unwrap();
    assert_eq!(status.len(), 1, "an account with only threads appears");
    assert_eq!(
        (status[0].account.as_str(), &status[0].threads),
        ("t", &expected)
    );
    let summary = s.queue_summary(SystemTime::now()).await.unwrap();
    assert_eq!(summary.accounts["t"].threads, expected);
    // An account with only created threads (and resolved messages, sent)
    // has nothing to report in the summary; `status` still lists it.
    insert_thread(&s, "only-created", "k").await;
    claim_and_record(&s, "only-created", 6, created()).await;
    let summary = s.queue_summary(SystemTime::now()).await.unwrap();
    assert!(
        !summary.accounts.contains_key("only-created"),
        "{summary:?}"
    );
    let status = s.status(SystemTime::now()).await.unwrap();
    assert_eq!(status[0].account, "only-created");
    assert_eq!(status[0].threads.created, 1);
}

// ---------------------------------------------------------------------------
// Plans

#[tokio::test]
async fn the_thread_statements_use_their_indexes() {
    let (_dir, s) = store().await;
    let waiting = format!(
        "SELECT 1 FROM outbox WHERE {}",
        "account = ?1 AND thread_key = ?2 AND thread_key IS NOT NULL AND keyed_thread_id IS NULL AND status = 'pending'"
    );
    let cases: [(&str, &str, &[&str]); 5] = [
        (
            "claim_thread",
            sql::CLAIM_THREAD,
            &["outbox_threads_pending_due (account=? AND next_attempt_at<?)"],
        ),
        (
            "next_thread_due",
            sql::NEXT_THREAD_DUE,
            &["outbox_threads_pending_due (account=? AND next_attempt_at>?)"],
        ),
        (
            "waiting rows",
            &waiting,
            &["outbox_waiting_for_thread (account=? AND thread_key=?)"],
        ),
        // The head triggers' search for the next unfinished row of a thread.
        (
            "next head",
            "SELECT o.id FROM outbox AS o
             WHERE coalesce(o.message_thread_id, o.keyed_thread_id) = ?1 AND o.id > ?2
               AND o.status IN ('pending', 'sending') ORDER BY o.id LIMIT 1",
            &["outbox_thread_rows (<expr>=? AND id>?)"],
        ),
        (
            "resolve at insert",
            "SELECT t.mews_thread_id FROM outbox_threads AS t
             WHERE t.account = ?1 AND t.thread_key = ?2 AND t.status = 'created'",
            &["thread_key_must_be_unique_per_account (account=? AND thread_key=?)"],
        ),
    ];
    for (name, statement, expected) in cases {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "EXPLAIN QUERY PLAN {statement}"
        )))
        .fetch_all(s.pool())
        .await
        .unwrap();
        let plan = rows
            .iter()
            .map(|r| r.get::<String, _>("detail"))
            .collect::<Vec<_>>()
            .join("\n");
        for index in expected {
            assert!(plan.contains(index), "{name}: no {index} in\n{plan}");
        }
        assert!(
            !plan.lines().any(|l| l.starts_with("SCAN")),
            "{name}: full scan in\n{plan}"
        );
    }
}
