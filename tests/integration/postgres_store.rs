//! The PostgreSQL store against a real PostgreSQL (a throwaway cluster per
//! test binary, or `MEWS_OUTBOX_TEST_POSTGRES_URL`; see
//! `support/postgres.rs`). Store level only: the daemon does not use
//! this store yet (docs/postgres.md).

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant, SystemTime};

use crate::support::postgres::{TestDb, database};
use mews_outbox::store::postgres::{PgOptions, PgStore};
use mews_outbox::store::{AccountPause, DaemonStore, Outbox, RowOutcome, StoreError, Upkeep};
use sqlx::{Connection, PgConnection, PgPool};

const T1: &str = "7f9325f6-ef44-4911-89a8-ae51010a5aa4";
const T2: &str = "0b8c8a58-1a60-4c5e-9f0e-3d6f2f2a9d11";

fn options(lease_ms: u64, settle_ms: u64) -> PgOptions {
    PgOptions {
        lease: Duration::from_millis(lease_ms),
        settle: Duration::from_millis(settle_ms),
        ..PgOptions::default()
    }
}

async fn daemon(db: &TestDb, lease_ms: u64, settle_ms: u64) -> PgStore {
    PgStore::connect(&db.url, options(lease_ms, settle_ms))
        .await
        .expect("connect the PostgreSQL store")
}

async fn insert(pool: &PgPool, thread: &str, text: &str, account: &str) -> i64 {
    sqlx::query_scalar(
        "INSERT INTO outbox (message_thread_id, text, account) VALUES ($1, $2, $3) RETURNING id",
    )
    .bind(thread)
    .bind(text)
    .bind(account)
    .fetch_one(pool)
    .await
    .unwrap()
}

fn delivered(id: i64) -> (i64, RowOutcome) {
    (
        id,
        RowOutcome::Delivered {
            mews_message_id: format!("m-{id}"),
            mews_created_utc: "2026-12-06T10:00:00Z".into(),
            mews_sender: "Guest".into(),
        },
    )
}

fn ids(rows: &[mews_outbox::store::ClaimedRow]) -> Vec<i64> {
    rows.iter().map(|r| r.id).collect()
}

/// Waits until the database's clock is past `account`'s lease (never a
/// fixed sleep: the hosts' clocks do not decide leases).
async fn wait_lease_expired(pool: &PgPool, account: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let expired: bool = sqlx::query_scalar(
            "SELECT lease_until <= clock_timestamp() FROM outbox_account_state WHERE account = $1",
        )
        .bind(account)
        .fetch_one(pool)
        .await
        .unwrap();
        if expired {
            return;
        }
        assert!(Instant::now() < deadline, "the lease never expired");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn row_state(pool: &PgPool, id: i64) -> (String, i32, Option<String>) {
    let row: (String, i32, Option<String>) =
        sqlx::query_as("SELECT status, needs_reconcile, mews_message_id FROM outbox WHERE id = $1")
            .bind(id)
            .fetch_one(pool)
            .await
            .unwrap();
    row
}

#[tokio::test]
async fn bad_inserts_are_refused_with_the_constraint_names_of_the_sqlite_store() {
    let db = database().await;
    let s = daemon(&db, 30_000, 0).await;
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
            "INSERT INTO outbox (message_thread_id, text) VALUES (E'7f9325f6-ef44-4911-89a8-ae51010a5aa4\\n', 'hi')",
            "message_thread_id_must_be_a_lowercase_uuid",
        ),
        (
            "INSERT INTO outbox (message_thread_id, text) VALUES ('7f9325f6-ef44-4911-89a8-ae51010a5aa4', '')",
            "text_must_be_non_blank_text",
        ),
        (
            "INSERT INTO outbox (message_thread_id, text) VALUES ('7f9325f6-ef44-4911-89a8-ae51010a5aa4', E' \\n\\t\\r\\f\\u000b ')",
            "text_must_be_non_blank_text",
        ),
        // Unicode White_Space beyond ASCII: NEL, NO-BREAK SPACE, OGHAM,
        // EN QUAD..HAIR SPACE, LINE/PARAGRAPH SEPARATOR, NNBSP, MMSP, IDEOGRAPHIC.
        (
            "INSERT INTO outbox (message_thread_id, text) VALUES ('7f9325f6-ef44-4911-89a8-ae51010a5aa4', E'\\u0085\\u00a0\\u1680\\u2000\\u2005\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000')",
            "text_must_be_non_blank_text",
        ),
        (
            "INSERT INTO outbox (message_thread_id, text) VALUES ('7f9325f6-ef44-4911-89a8-ae51010a5aa4', convert_from('\\xff00'::bytea, 'UTF8'))",
            "invalid byte sequence",
        ),
        (
            "INSERT INTO outbox (message_thread_id, text) VALUES ('7f9325f6-ef44-4911-89a8-ae51010a5aa4', NULL)",
            "not-null",
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
        (
            "INSERT INTO outbox (message_thread_id, text, attempts) VALUES ('7f9325f6-ef44-4911-89a8-ae51010a5aa4', 'hi', -1)",
            "attempts_must_not_be_negative",
        ),
        (
            "INSERT INTO outbox (message_thread_id, text, needs_reconcile) VALUES ('7f9325f6-ef44-4911-89a8-ae51010a5aa4', 'hi', 2)",
            "needs_reconcile_must_be_0_or_1",
        ),
        // Daemon columns: a producer may not write them.
        (
            "INSERT INTO outbox (message_thread_id, text, status) VALUES ('7f9325f6-ef44-4911-89a8-ae51010a5aa4', 'hi', 'sending')",
            "producer_may_not_set_status",
        ),
        (
            "INSERT INTO outbox (message_thread_id, text, status) VALUES ('7f9325f6-ef44-4911-89a8-ae51010a5aa4', 'hi', 'delivered')",
            "producer_may_not_set_status",
        ),
        (
            "INSERT INTO outbox (message_thread_id, text, attempts) VALUES ('7f9325f6-ef44-4911-89a8-ae51010a5aa4', 'hi', 3)",
            "producer_may_not_set_attempts",
        ),
        (
            "INSERT INTO outbox (message_thread_id, text, needs_reconcile) VALUES ('7f9325f6-ef44-4911-89a8-ae51010a5aa4', 'hi', 1)",
            "producer_may_not_set_needs_reconcile",
        ),
        (
            "INSERT INTO outbox (message_thread_id, text, last_error) VALUES ('7f9325f6-ef44-4911-89a8-ae51010a5aa4', 'hi', 'x')",
            "producer_may_not_set_last_error",
        ),
        (
            "INSERT INTO outbox (message_thread_id, text, created_at) VALUES ('7f9325f6-ef44-4911-89a8-ae51010a5aa4', 'hi', '2020-01-01T00:00:00Z')",
            "producer_may_not_set_created_at",
        ),
        (
            "INSERT INTO outbox (message_thread_id, text, mews_message_id) VALUES ('7f9325f6-ef44-4911-89a8-ae51010a5aa4', 'hi', 'x')",
            "producer_may_not_set_mews_message_id",
        ),
        (
            "INSERT INTO outbox (message_thread_id, text, delivered_at) VALUES ('7f9325f6-ef44-4911-89a8-ae51010a5aa4', 'hi', now())",
            "producer_may_not_set_delivered_at",
        ),
        (
            "INSERT INTO outbox (message_thread_id, text, lease_token) VALUES ('7f9325f6-ef44-4911-89a8-ae51010a5aa4', 'hi', 7)",
            "producer_may_not_set_lease_token",
        ),
    ];
    for (sql, expected) in cases {
        let e = sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(s.pool())
            .await
            .unwrap_err();
        let text = e.to_string();
        assert!(text.contains(expected), "{sql}\n=> {text}");
        if expected.contains('_')
            && let sqlx::Error::Database(db) = &e
        {
            assert_eq!(db.constraint(), Some(expected), "{sql}");
        }
    }
    // The producer's own columns are accepted, and nothing above got in.
    sqlx::query(
        "INSERT INTO outbox (message_thread_id, text, identifier, account, next_attempt_at)
         VALUES ($1, 'hi', 'k1', 'a', '2026-12-06T10:00:00.000Z')",
    )
    .bind(T1)
    .execute(s.pool())
    .await
    .unwrap();
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(s.pool())
        .await
        .unwrap();
    assert_eq!(n, 1);
    // An explicit id (allowed, as on SQLite) does not make a later
    // producer's default id collide with it.
    sqlx::query("INSERT INTO outbox (id, message_thread_id, text) VALUES (1000, $1, 'explicit')")
        .bind(T1)
        .execute(s.pool())
        .await
        .unwrap();
    let next = insert(s.pool(), T1, "after", "a").await;
    assert!(next > 1000, "{next}");
    // The store's enqueue says Refused with the constraint's name.
    let e = s
        .enqueue(
            &mews_outbox::store::NewMessage {
                thread: mews_outbox::store::ThreadRef::Id("nope".into()),
                text: "hi".into(),
                identifier: None,
                account: "a".into(),
            },
            None,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&e, StoreError::Refused(m) if m.contains("message_thread_id_must_be_a_lowercase_uuid")),
        "{e}"
    );
}

#[tokio::test]
async fn a_producer_insert_is_invisible_to_claims_until_its_commit() {
    let db = database().await;
    let s = daemon(&db, 30_000, 0).await;
    s.acquire_accounts(&["default"], 10).await.unwrap();
    let mut producer = PgConnection::connect(&db.url).await.unwrap();
    let mut tx = producer.begin().await.unwrap();
    sqlx::query("INSERT INTO outbox (message_thread_id, text) VALUES ($1, 'hello')")
        .bind(T1)
        .execute(&mut *tx)
        .await
        .unwrap();
    let far = SystemTime::now() + Duration::from_secs(3600);
    assert!(s.claim("default", far, 10).await.unwrap().is_empty());
    tx.commit().await.unwrap();
    let claimed = s.claim("default", far, 10).await.unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].text.as_deref().unwrap(), "hello");
}

#[tokio::test]
async fn two_daemons_starting_together_migrate_once_and_a_newer_schema_is_refused() {
    let db = database().await;
    let (a, b) = tokio::join!(
        PgStore::connect(&db.url, PgOptions::default()),
        PgStore::connect(&db.url, PgOptions::default()),
    );
    let a = a.unwrap();
    b.unwrap();
    let applied: Vec<i64> =
        sqlx::query_scalar("SELECT version FROM _mews_outbox_migrations ORDER BY version")
            .fetch_all(a.pool())
            .await
            .unwrap();
    // Every migration of the source tree, once.
    let mut known: Vec<i64> =
        std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations/postgres"))
            .unwrap()
            .filter_map(|e| {
                let name = e.unwrap().file_name().into_string().unwrap();
                name.split('_').next().and_then(|v| v.parse().ok())
            })
            .collect();
    known.sort();
    assert_eq!(applied, known);
    assert_eq!(applied[0], 20261206000001);
    // A migration from a newer binary.
    sqlx::query(
        "INSERT INTO _mews_outbox_migrations (version, description, success, checksum, execution_time)
         VALUES (29991231000001, 'from the future', true, '\\x00'::bytea, 0)",
    )
    .execute(a.pool())
    .await
    .unwrap();
    let e = PgStore::connect(&db.url, PgOptions::default())
        .await
        .unwrap_err();
    let text = e.to_string();
    assert!(
        text.contains("newer mews-outbox") && text.contains("29991231000001"),
        "{text}"
    );
}

#[tokio::test]
async fn no_password_in_errors_or_debug() {
    let url = "postgres://outbox:s3cret-pw@127.0.0.1:1/outbox?connect_timeout=1";
    let redacted = mews_outbox::store::postgres::redact_url(url);
    assert!(!redacted.contains("s3cret-pw"), "{redacted}");
    let quick = PgOptions {
        connect_timeout: Duration::from_secs(1),
        ..PgOptions::default()
    };
    let e = PgStore::connect(url, quick).await.unwrap_err();
    assert!(!format!("{e} {e:?}").contains("s3cret-pw"), "{e:?}");
    let db = database().await;
    let s = daemon(&db, 30_000, 0).await;
    assert!(!format!("{s:?}").contains("password"), "{s:?}");
}

#[tokio::test]
async fn two_daemons_never_hold_the_same_account() {
    let db = database().await;
    let a = daemon(&db, 30_000, 0).await;
    let b = daemon(&db, 30_000, 0).await;
    let accounts: Vec<String> = (0..20).map(|i| format!("acct{i:02}")).collect();
    let names: Vec<&str> = accounts.iter().map(String::as_str).collect();
    let (ga, gb) = tokio::join!(
        a.acquire_accounts(&names, 20),
        b.acquire_accounts(&names, 20)
    );
    let ga: HashSet<String> = ga.unwrap().into_iter().map(|x| x.account).collect();
    let gb: HashSet<String> = gb.unwrap().into_iter().map(|x| x.account).collect();
    assert!(ga.is_disjoint(&gb), "{ga:?} / {gb:?}");
    assert_eq!(ga.len() + gb.len(), 20);
    // Nothing more to take while the leases run; renewing keeps them.
    assert!(a.acquire_accounts(&names, 20).await.unwrap().is_empty());
    assert!(b.acquire_accounts(&names, 20).await.unwrap().is_empty());
    a.renew().await.unwrap();
    b.renew().await.unwrap();
    // `at_most` spreads accounts: a third daemon takes what is released.
    a.release_accounts().await.unwrap();
    let c = daemon(&db, 30_000, 0).await;
    let gc = c.acquire_accounts(&names, 5).await.unwrap();
    assert_eq!(gc.len(), 5.min(ga.len()));
    for x in &gc {
        assert!(ga.contains(&x.account));
        assert!(x.token >= 2, "a second acquisition bumps the token: {x:?}");
    }
}

#[tokio::test]
async fn thread_order_holds_across_two_daemons() {
    let db = database().await;
    let a = daemon(&db, 30_000, 0).await;
    let b = daemon(&db, 30_000, 0).await;
    a.acquire_accounts(&["a1"], 1).await.unwrap();
    b.acquire_accounts(&["a2"], 1).await.unwrap();
    // One Mews thread written to through two accounts, interleaved.
    let r1 = insert(a.pool(), T1, "1", "a1").await;
    let r2 = insert(a.pool(), T1, "2", "a2").await;
    let r3 = insert(a.pool(), T1, "3", "a1").await;
    let r4 = insert(a.pool(), T2, "other thread", "a2").await;
    let far = SystemTime::now() + Duration::from_secs(3600);
    assert_eq!(ids(&b.claim("a2", far, 10).await.unwrap()), vec![r4]);
    assert_eq!(ids(&a.claim("a1", far, 10).await.unwrap()), vec![r1]);
    assert!(b.claim("a2", far, 10).await.unwrap().is_empty());
    a.record(&[delivered(r1)], far).await.unwrap();
    assert!(a.claim("a1", far, 10).await.unwrap().is_empty());
    assert_eq!(ids(&b.claim("a2", far, 10).await.unwrap()), vec![r2]);
    assert!(a.claim("a1", far, 10).await.unwrap().is_empty());
    b.record(&[delivered(r2)], far).await.unwrap();
    assert_eq!(ids(&a.claim("a1", far, 10).await.unwrap()), vec![r3]);
    // A daemon claims only for the accounts it holds.
    assert!(a.claim("a2", far, 10).await.unwrap().is_empty());
}

/// The fencing test: a daemon frozen past its lease (SIGSTOP) wakes up after
/// another took its account over; it must neither record over the rows nor
/// claim them again.
#[tokio::test]
async fn a_daemon_frozen_past_its_lease_cannot_record_or_claim() {
    let db = database().await;
    let a = daemon(&db, 300, 0).await;
    let b = daemon(&db, 30_000, 0).await;
    let got = a.acquire_accounts(&["acct"], 1).await.unwrap();
    assert_eq!(got.len(), 1);
    let rows = [
        insert(a.pool(), T1, "1", "acct").await,
        insert(a.pool(), T2, "2", "acct").await,
    ];
    let now = SystemTime::now() + Duration::from_secs(1);
    let claimed = a.claim("acct", now, 10).await.unwrap();
    assert_eq!(ids(&claimed), rows.to_vec());
    // B cannot take the account while A's lease runs.
    assert!(b.acquire_accounts(&["acct"], 1).await.unwrap().is_empty());
    // A freezes; its lease expires by the database's clock; B takes over.
    wait_lease_expired(b.pool(), "acct").await;
    let took = b.acquire_accounts(&["acct"], 1).await.unwrap();
    assert_eq!(took.len(), 1);
    assert_eq!(took[0].recovered, 2, "{took:?}");
    assert!(took[0].token > got[0].token);
    for id in rows {
        assert_eq!(row_state(b.pool(), id).await, ("pending".into(), 1, None));
    }
    // A wakes up: its claim (the handle still believes it holds the
    // account: the database's condition decides) takes nothing.
    assert_eq!(a.held().len(), 1);
    assert!(a.claim("acct", now, 10).await.unwrap().is_empty());
    // Its outcomes change nothing and say the lease was lost.
    let e = a
        .record(&[delivered(rows[0]), delivered(rows[1])], now)
        .await
        .unwrap_err();
    assert!(
        matches!(&e, StoreError::LeaseLost { account } if account == "acct"),
        "{e}"
    );
    for id in rows {
        assert_eq!(row_state(b.pool(), id).await, ("pending".into(), 1, None));
    }
    assert!(a.claim("acct", now, 10).await.unwrap().is_empty());
    // B re-owns the rows (read back first: needs_reconcile).
    let reclaimed = b.claim("acct", now, 10).await.unwrap();
    assert_eq!(ids(&reclaimed), rows.to_vec());
    assert!(reclaimed.iter().all(|r| r.needs_reconcile));
    // A's stale writes still change nothing while B has them in flight.
    assert!(matches!(
        a.record(&[(rows[0], RowOutcome::Release)], now).await,
        Err(StoreError::LeaseLost { .. })
    ));
    assert!(matches!(
        a.clear_reconcile(&[rows[1]]).await,
        Err(StoreError::LeaseLost { .. })
    ));
    // A's next heartbeat learns it too, and forgets the account.
    assert!(matches!(a.renew().await, Err(StoreError::LeaseLost { .. })));
    assert!(a.held().is_empty());
    a.renew().await.unwrap();
    for id in rows {
        assert_eq!(row_state(b.pool(), id).await, ("sending".into(), 1, None));
    }
    // The owner's writes go through.
    b.clear_reconcile(&[rows[1]]).await.unwrap();
    b.record(&[delivered(rows[0]), delivered(rows[1])], now)
        .await
        .unwrap();
    assert_eq!(
        row_state(b.pool(), rows[0]).await,
        ("delivered".into(), 0, Some(format!("m-{}", rows[0])))
    );
}

#[tokio::test]
async fn rows_recovered_at_takeover_wait_the_settle_time_from_their_claim() {
    let db = database().await;
    let a = daemon(&db, 300, 0).await;
    let b = daemon(&db, 30_000, 60_000).await;
    a.acquire_accounts(&["acct"], 1).await.unwrap();
    let id = insert(a.pool(), T1, "1", "acct").await;
    let now = SystemTime::now() + Duration::from_secs(1);
    assert_eq!(a.claim("acct", now, 10).await.unwrap().len(), 1);
    wait_lease_expired(b.pool(), "acct").await;
    b.acquire_accounts(&["acct"], 1).await.unwrap();
    let wait: f64 = sqlx::query_scalar(
        "SELECT extract(epoch FROM next_attempt_at - claimed_at)::float8 FROM outbox WHERE id = $1",
    )
    .bind(id)
    .fetch_one(b.pool())
    .await
    .unwrap();
    assert!((59.9..60.1).contains(&wait), "{wait}");
    assert!(b.claim("acct", now, 10).await.unwrap().is_empty());
    let due = b.next_due("acct", now).await.unwrap().unwrap();
    assert!(due > now + Duration::from_secs(55));
}

#[tokio::test]
async fn pauses_and_the_limiter_memory_pass_to_the_next_owner() {
    let db = database().await;
    let a = daemon(&db, 300, 0).await;
    let b = daemon(&db, 30_000, 0).await;
    a.acquire_accounts(&["acct"], 1).await.unwrap();
    let until = SystemTime::UNIX_EPOCH + Duration::from_millis(1_900_000_000_123);
    let pause = AccountPause {
        account: "acct".into(),
        until,
        reason: "401 Unauthorized".into(),
        streak: 2,
    };
    a.save_pause(&pause).await.unwrap();
    let ends = vec![
        SystemTime::UNIX_EPOCH + Duration::from_millis(1_800_000_000_001),
        SystemTime::UNIX_EPOCH + Duration::from_millis(1_800_000_000_002),
    ];
    a.save_recent_requests("acct", &ends).await.unwrap();
    // B may not write an account it does not hold.
    assert!(matches!(
        b.clear_pause("acct").await,
        Err(StoreError::LeaseLost { .. })
    ));
    wait_lease_expired(b.pool(), "acct").await;
    b.acquire_accounts(&["acct"], 1).await.unwrap();
    assert_eq!(b.pauses().await.unwrap(), vec![pause.clone()]);
    assert_eq!(b.recent_requests("acct").await.unwrap(), ends);
    // The frozen A's writes change nothing now.
    let later = AccountPause {
        until: until + Duration::from_secs(1),
        ..pause.clone()
    };
    assert!(matches!(
        a.save_pause(&later).await,
        Err(StoreError::LeaseLost { .. })
    ));
    assert!(matches!(
        a.clear_pause("acct").await,
        Err(StoreError::LeaseLost { .. })
    ));
    assert!(matches!(
        a.save_recent_requests("acct", &[]).await,
        Err(StoreError::LeaseLost { .. })
    ));
    let e = a.renew().await.unwrap_err();
    assert!(
        matches!(&e, StoreError::LeaseLost { account } if account == "acct"),
        "{e}"
    );
    assert_eq!(b.pauses().await.unwrap(), vec![pause]);
    assert_eq!(a.recent_requests("acct").await.unwrap(), ends);
    b.clear_pause("acct").await.unwrap();
    assert!(b.pauses().await.unwrap().is_empty());
}

#[tokio::test]
async fn notify_wakes_a_watcher_at_the_producers_commit_and_not_before() {
    let db = database().await;
    let s = daemon(&db, 30_000, 0).await;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let mut rx = s
        .watch_changes(Duration::from_secs(3600), shutdown.clone())
        .await
        .unwrap();
    rx.borrow_and_update();
    let mut producer = PgConnection::connect(&db.url).await.unwrap();
    let mut tx = producer.begin().await.unwrap();
    sqlx::query("INSERT INTO outbox (message_thread_id, text) VALUES ($1, 'hello')")
        .bind(T1)
        .execute(&mut *tx)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!rx.has_changed().unwrap(), "woken before the commit");
    let committed = Instant::now();
    tx.commit().await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), rx.changed())
        .await
        .expect("no wake-up within 5 s of the commit")
        .unwrap();
    eprintln!("NOTIFY wake-up {:?} after the commit", committed.elapsed());
    shutdown.cancel();
}

#[tokio::test]
async fn four_producers_inserting_while_a_daemon_claims_every_row_claimed_once() {
    const PER_PRODUCER: usize = 250;
    let db = database().await;
    let s = daemon(&db, 30_000, 0).await;
    s.acquire_accounts(&["default"], 1).await.unwrap();
    let mut producers = Vec::new();
    for p in 0..4u32 {
        let url = db.url.clone();
        producers.push(tokio::spawn(async move {
            let mut conn = PgConnection::connect(&url).await.unwrap();
            for i in 0..PER_PRODUCER {
                // Each producer writes its own 5 threads, in order.
                let thread = format!("{p:08x}-0000-4000-8000-{:012x}", i % 5);
                sqlx::query("INSERT INTO outbox (message_thread_id, text) VALUES ($1, $2)")
                    .bind(thread)
                    .bind(format!("p{p} m{i}"))
                    .execute(&mut conn)
                    .await
                    .unwrap();
            }
        }));
    }
    let total = 4 * PER_PRODUCER;
    claim_all_once_in_thread_order(&s, total, 7).await;
    for p in producers {
        p.await.unwrap();
    }
    let delivered: i64 =
        sqlx::query_scalar("SELECT count(*) FROM outbox WHERE status = 'delivered'")
            .fetch_one(s.pool())
            .await
            .unwrap();
    assert_eq!(delivered, i64::try_from(total).unwrap());
}

/// Measures a claim on a deep backlog: 100,000 pending rows of one account
/// over 1,000 threads, and the worst case for the per-thread check: one
/// thread holding most of the backlog ahead of the others.
#[tokio::test]
async fn claim_on_a_deep_backlog() {
    let db = database().await;
    let s = daemon(&db, 30_000, 0).await;
    if let Some(t) = crate::support::postgres::cluster_start_time() {
        eprintln!("throwaway cluster started in {t:?}");
    }
    s.acquire_accounts(&["default"], 1).await.unwrap();
    let filled = Instant::now();
    sqlx::query(
        "INSERT INTO outbox (message_thread_id, text)
         SELECT lpad(to_hex(i % 1000), 8, '0') || '-0000-4000-8000-000000000000', 'm' || i
         FROM generate_series(1, 100000) AS i",
    )
    .execute(s.pool())
    .await
    .unwrap();
    sqlx::query("ANALYZE outbox")
        .execute(s.pool())
        .await
        .unwrap();
    eprintln!("100k rows inserted in {:?}", filled.elapsed());
    let now = SystemTime::now() + Duration::from_secs(3600);
    let mut worst = Duration::ZERO;
    for _ in 0..4 {
        let t = Instant::now();
        let claimed = s.claim("default", now, 250).await.unwrap();
        let took = t.elapsed();
        worst = worst.max(took);
        assert_eq!(claimed.len(), 250);
        let outcomes: Vec<_> = claimed.iter().map(|r| delivered(r.id)).collect();
        let t = Instant::now();
        s.record(&outcomes, now).await.unwrap();
        eprintln!(
            "claim of 250 over 1000 threads: {took:?}, record: {:?}",
            t.elapsed()
        );
    }
    // One thread with 50,000 rows older than every other pending row.
    sqlx::query("UPDATE outbox SET status = 'delivered' WHERE status IN ('pending', 'sending')")
        .execute(s.pool())
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO outbox (message_thread_id, text)
         SELECT CASE WHEN i <= 50000 THEN '99999999-0000-4000-8000-000000000000'
                     ELSE lpad(to_hex(i % 1000), 8, '0') || '-0000-4000-8000-000000000001' END,
                'm' || i
         FROM generate_series(1, 100000) AS i",
    )
    .execute(s.pool())
    .await
    .unwrap();
    sqlx::query("ANALYZE outbox")
        .execute(s.pool())
        .await
        .unwrap();
    let t = Instant::now();
    let claimed = s.claim("default", now, 250).await.unwrap();
    let deep = t.elapsed();
    eprintln!("claim of 250 behind one 50k-row thread: {deep:?}");
    assert_eq!(claimed.len(), 250);
    assert_eq!(
        claimed
            .iter()
            .filter(|r| r.message_thread_id.starts_with("99999999"))
            .count(),
        1,
        "one row of the deep thread, its head"
    );
    eprintln!("slowest claim over 1000 threads: {worst:?}");
}

/// Two daemons with 40 ms leases fight over one account for 3 s: each
/// acquires when it can, claims, and records deliveries or releases. A row
/// claimed while another daemon's claim on it is still unrecorded must come
/// marked `needs_reconcile` (read back, never blindly resent), and at the
/// end no row is left `sending` under a token that is not the account's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takeovers_racing_claims_and_records_never_resend_blindly() {
    use std::sync::{Arc, Mutex};
    let db = database().await;
    let handles = [daemon(&db, 40, 0).await, daemon(&db, 40, 0).await];
    for i in 0..200u32 {
        let thread = format!("{:08x}-0000-4000-8000-000000000000", i % 50);
        insert(handles[0].pool(), &thread, &format!("m{i}"), "acct").await;
    }
    // row id -> the handle whose claim on it is not recorded yet.
    let open: Arc<Mutex<HashMap<i64, usize>>> = Arc::default();
    let stop = Instant::now() + Duration::from_secs(3);
    let mut tasks = Vec::new();
    for (me, s) in handles.iter().cloned().enumerate() {
        let open = open.clone();
        tasks.push(tokio::spawn(async move {
            let (mut claims, mut lost) = (0u32, 0u32);
            let far = SystemTime::now() + Duration::from_secs(3600);
            let mut round = 0u64;
            while Instant::now() < stop {
                round += 1;
                let _ = s.acquire_accounts(&["acct"], 1).await.unwrap();
                let rows = s.claim("acct", far, 5).await.unwrap();
                {
                    let mut open = open.lock().unwrap();
                    for r in &rows {
                        if let Some(&other) = open.get(&r.id)
                            && other != me
                        {
                            assert!(
                                r.needs_reconcile,
                                "row {} claimed by {me} while {other}'s claim is unrecorded, not marked for read-back",
                                r.id
                            );
                        }
                        open.insert(r.id, me);
                    }
                }
                claims += u32::try_from(rows.len()).unwrap();
                // Sometimes a "request" outlives the lease.
                tokio::time::sleep(Duration::from_millis(fastrand::u64(0..60))).await;
                let outcomes: Vec<_> = rows
                    .iter()
                    .map(|r| {
                        if (r.id + i64::try_from(round).unwrap()) % 3 == 0 {
                            (r.id, RowOutcome::Release)
                        } else {
                            delivered(r.id)
                        }
                    })
                    .collect();
                match s.record(&outcomes, far).await {
                    Ok(()) => {
                        let mut open = open.lock().unwrap();
                        for r in &rows {
                            if open.get(&r.id) == Some(&me) {
                                open.remove(&r.id);
                            }
                        }
                    }
                    Err(StoreError::LeaseLost { .. }) => lost += 1,
                    Err(e) => panic!("{e}"),
                }
                // The heartbeat runs beside the claims: a daemon may claim
                // with a token it has not yet learnt is stale.
                if round.is_multiple_of(3) {
                    let _ = s.renew().await;
                }
            }
            (claims, lost)
        }));
    }
    let mut stats = Vec::new();
    for t in tasks {
        stats.push(t.await.unwrap());
    }
    eprintln!("(claims, records refused for a lost lease) per daemon: {stats:?}");
    assert!(
        stats.iter().all(|(_, lost)| *lost > 0),
        "no takeover mid-request happened: {stats:?}"
    );
    let stranded: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM outbox o JOIN outbox_account_state s USING (account)
         WHERE o.status = 'sending' AND o.lease_token <> s.lease_token",
    )
    .fetch_one(handles[0].pool())
    .await
    .unwrap();
    assert_eq!(stranded, 0);
}

/// A takeover committed while the old owner's claim is in flight: the claim
/// waits for the account row (its lease check share-locks it), re-reads it
/// after the commit, finds another owner and claims nothing, instead of
/// leasing rows under a token that no longer exists. The takeover is done
/// by hand in an open transaction to hold it at that point.
#[tokio::test]
async fn a_claim_racing_a_takeover_waits_for_it_and_claims_nothing() {
    let db = database().await;
    let a = daemon(&db, 30_000, 0).await;
    a.acquire_accounts(&["acct"], 1).await.unwrap();
    let r1 = insert(a.pool(), T1, "in flight", "acct").await;
    let far = SystemTime::now() + Duration::from_secs(3600);
    assert_eq!(ids(&a.claim("acct", far, 1).await.unwrap()), vec![r1]);
    let r2 = insert(a.pool(), T2, "waiting", "acct").await;
    let mut b = PgConnection::connect(&db.url).await.unwrap();
    let mut takeover = b.begin().await.unwrap();
    sqlx::query(
        "UPDATE outbox_account_state
         SET lease_owner = gen_random_uuid(), lease_token = lease_token + 1,
             lease_until = clock_timestamp() + interval '1 minute'
         WHERE account = 'acct'",
    )
    .execute(&mut *takeover)
    .await
    .unwrap();
    sqlx::query(
        "UPDATE outbox SET status = 'pending', needs_reconcile = 1
         WHERE account = 'acct' AND status = 'sending'",
    )
    .execute(&mut *takeover)
    .await
    .unwrap();
    let claim = tokio::spawn({
        let a = a.clone();
        async move { a.claim("acct", far, 10).await.unwrap() }
    });
    // The event, not a pause: the claim's backend is seen waiting for the
    // takeover's lock (without its lease check it would finish instead).
    let waiting_since = Instant::now();
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(a.pool())
        .await
        .unwrap();
        if waiting > 0 {
            break;
        }
        assert!(
            !claim.is_finished(),
            "the claim did not wait for the takeover"
        );
        assert!(
            waiting_since.elapsed() < Duration::from_secs(30),
            "the claim neither finished nor waited for a lock within 30 s"
        );
        tokio::task::yield_now().await;
    }
    assert!(
        !claim.is_finished(),
        "the claim did not wait for the takeover"
    );
    takeover.commit().await.unwrap();
    assert!(claim.await.unwrap().is_empty());
    assert_eq!(row_state(a.pool(), r2).await, ("pending".into(), 0, None));
    assert_eq!(row_state(a.pool(), r1).await, ("pending".into(), 1, None));
    // Its outcome for the row in flight is refused too.
    assert!(matches!(
        a.record(&[delivered(r1)], far).await,
        Err(StoreError::LeaseLost { .. })
    ));
    assert_eq!(row_state(a.pool(), r1).await, ("pending".into(), 1, None));
}

#[tokio::test]
async fn status_dead_list_requeue_and_purge_work_as_on_sqlite() {
    let db = database().await;
    let s = daemon(&db, 30_000, 0).await;
    s.acquire_accounts(&["a"], 1).await.unwrap();
    let dead1 = insert(s.pool(), T1, "1", "a").await;
    let dead2 = insert(s.pool(), T2, "2", "a").await;
    let far = SystemTime::now() + Duration::from_secs(3600);
    assert_eq!(s.claim("a", far, 10).await.unwrap().len(), 2);
    let died = |id, req| {
        (
            id,
            RowOutcome::Dead {
                error: format!("Mews refused it (RequestId {req})"),
            },
        )
    };
    s.record(&[died(dead1, "r1"), died(dead2, "r2")], far)
        .await
        .unwrap();
    let waiting = insert(s.pool(), T1, "3", "a").await;
    let status = s.status(SystemTime::now()).await.unwrap();
    assert_eq!(status.len(), 1);
    assert_eq!((status[0].pending, status[0].dead), (1, 2));
    assert_eq!(
        status[0].dead_errors,
        vec![mews_outbox::store::ErrorCount {
            error: "Mews refused it".into(),
            rows: 2
        }]
    );
    assert!(
        status[0]
            .oldest_pending_created_at
            .as_deref()
            .unwrap()
            .ends_with('Z')
    );
    let dead = s.dead_rows(Some("a")).await.unwrap();
    assert_eq!(
        dead.iter().map(|d| d.id).collect::<Vec<_>>(),
        vec![dead1, dead2]
    );
    assert!(dead[0].dead_at.is_some());
    use mews_outbox::store::Requeue;
    let e = s
        .requeue_dead(&Requeue::Ids(vec![dead1, waiting, 999]), None, far)
        .await
        .unwrap_err();
    assert!(
        matches!(&e, StoreError::NotDead(m) if m.contains(&format!("row {waiting} is pending")) && m.contains("row 999 does not exist")),
        "{e}"
    );
    assert_eq!(
        s.dead_rows(None).await.unwrap().len(),
        2,
        "refused as a whole"
    );
    assert_eq!(
        s.requeue_dead(&Requeue::Ids(vec![dead1]), Some("a"), far)
            .await
            .unwrap(),
        vec![dead1]
    );
    assert_eq!(row_state(s.pool(), dead1).await.0, "pending");
    assert_eq!(
        s.purge_dead(SystemTime::now() - Duration::from_secs(60), None)
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        s.purge_dead(far + Duration::from_secs(1), Some("a"))
            .await
            .unwrap(),
        1
    );
    assert!(s.dead_rows(None).await.unwrap().is_empty());
}

/// One daemon's heartbeat renewing its 10 accounts while its workers record
/// and claim on them: no deadlock (every statement locks account rows in
/// account order), no error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewals_beside_records_never_deadlock() {
    let db = database().await;
    let s = daemon(&db, 30_000, 0).await;
    let accounts: Vec<String> = (0..10).map(|i| format!("acct{i}")).collect();
    let names: Vec<&str> = accounts.iter().map(String::as_str).collect();
    assert_eq!(s.acquire_accounts(&names, 10).await.unwrap().len(), 10);
    for (i, a) in accounts.iter().enumerate() {
        for j in 0..5 {
            let thread = format!("{i:08x}-0000-4000-8000-{j:012x}");
            insert(s.pool(), &thread, "m", a).await;
        }
    }
    let stop = Instant::now() + Duration::from_secs(2);
    let heartbeat = tokio::spawn({
        let s = s.clone();
        async move {
            let mut n = 0u32;
            while Instant::now() < stop {
                s.renew().await.unwrap();
                n += 1;
            }
            n
        }
    });
    let mut workers = Vec::new();
    for w in 0..3 {
        let s = s.clone();
        let accounts = accounts.clone();
        workers.push(tokio::spawn(async move {
            let far = SystemTime::now() + Duration::from_secs(3600);
            let mut n = 0u32;
            while Instant::now() < stop {
                let account = &accounts[(n as usize * 3 + w) % accounts.len()];
                let rows = s.claim(account, far, 5).await.unwrap();
                let outcomes: Vec<_> = rows.iter().map(|r| (r.id, RowOutcome::Release)).collect();
                s.record(&outcomes, far).await.unwrap();
                n += 1;
            }
            n
        }));
    }
    let renewals = heartbeat.await.unwrap();
    let mut rounds = 0;
    for w in workers {
        rounds += w.await.unwrap();
    }
    eprintln!("{renewals} renewals beside {rounds} claim+record rounds");
    assert!(renewals > 10 && rounds > 10);
}

#[tokio::test]
async fn claims_are_bounded_by_bytes_and_always_take_one() {
    let db = database().await;
    let s = daemon(&db, 30_000, 0).await;
    s.acquire_accounts(&["a"], 1).await.unwrap();
    let big = "x".repeat(1000);
    let threads: Vec<String> = (0..5)
        .map(|i| format!("{i:08x}-0000-4000-8000-000000000000"))
        .collect();
    let mut rows = Vec::new();
    for t in &threads {
        rows.push(insert(s.pool(), t, &big, "a").await);
    }
    let far = SystemTime::now() + Duration::from_secs(3600);
    // 1000 + 128 bytes each: 2 fit in 2300, the third would not.
    let claimed = s.claim_within("a", far, 10, 2300).await.unwrap();
    assert_eq!(ids(&claimed), rows[..2].to_vec());
    // A row larger than the bound is still claimed alone.
    let claimed = s.claim_within("a", far, 10, 10).await.unwrap();
    assert_eq!(ids(&claimed), vec![rows[2]]);
    assert_eq!(
        ids(&s.claim("a", far, 10).await.unwrap()),
        rows[3..].to_vec()
    );
}

/// Three threads of 40 rows each, inserted one thread after the other: a
/// claim of 10 looks at the first 10 due rows (all of the first thread) and
/// must still find the other two threads' heads beyond them (the walk over
/// the account's threads), in due order, within the bytes left, taking one
/// row alone only when nothing came before it.
#[tokio::test]
async fn a_claim_behind_deep_threads_finds_every_threads_head_within_its_bytes() {
    let db = database().await;
    let s = daemon(&db, 30_000, 0).await;
    s.acquire_accounts(&["a"], 1).await.unwrap();
    let big = "x".repeat(1000);
    let mut rows: Vec<Vec<i64>> = Vec::new();
    for t in 0..3 {
        let thread = format!("{t:08x}-0000-4000-8000-000000000000");
        let mut ids = Vec::new();
        for _ in 0..40 {
            ids.push(insert(s.pool(), &thread, &big, "a").await);
        }
        rows.push(ids);
    }
    let far = SystemTime::now() + Duration::from_secs(3600);
    // 1000 + 128 bytes each: two heads fit in 2300, the third would not.
    let claimed = s.claim_within("a", far, 10, 2300).await.unwrap();
    assert_eq!(ids(&claimed), vec![rows[0][0], rows[1][0]]);
    // The first thread's head in flight, the rest of it blocked: the window
    // holds no head at all, and the walk takes the third thread's head
    // alone although it passes the bound.
    let claimed = s.claim_within("a", far, 10, 10).await.unwrap();
    assert_eq!(ids(&claimed), vec![rows[2][0]]);
    // Each thread's next row once its head is delivered, and only then.
    s.record(&[delivered(rows[0][0]), delivered(rows[2][0])], far)
        .await
        .unwrap();
    let claimed = s.claim("a", far, 10).await.unwrap();
    assert_eq!(ids(&claimed), vec![rows[0][1], rows[2][1]]);
    assert!(s.claim("a", far, 10).await.unwrap().is_empty());
}

#[tokio::test]
async fn rows_recovered_at_takeover_settle_from_the_latest_request_start() {
    let db = database().await;
    let a = daemon(&db, 300, 0).await;
    let b = daemon(&db, 30_000, 60_000).await;
    a.acquire_accounts(&["acct"], 1).await.unwrap();
    let id = insert(a.pool(), T1, "1", "acct").await;
    let now = SystemTime::now() + Duration::from_secs(1);
    assert_eq!(a.claim("acct", now, 10).await.unwrap().len(), 1);
    // Written ahead of the clock, as the worker does before messages/add.
    let started_by = SystemTime::now() + Duration::from_secs(20);
    a.request_starting("acct", started_by).await.unwrap();
    wait_lease_expired(b.pool(), "acct").await;
    b.acquire_accounts(&["acct"], 1).await.unwrap();
    let wait: f64 = sqlx::query_scalar(
        "SELECT extract(epoch FROM o.next_attempt_at - s.add_started_by)::float8
         FROM outbox o JOIN outbox_account_state s USING (account) WHERE o.id = $1",
    )
    .bind(id)
    .fetch_one(b.pool())
    .await
    .unwrap();
    assert!((59.999..60.001).contains(&wait), "{wait}");
    // The frozen A may not move the settle point of B's requests.
    assert!(matches!(
        a.request_starting("acct", SystemTime::now()).await,
        Err(StoreError::LeaseLost { .. })
    ));
    b.request_starting("acct", SystemTime::now()).await.unwrap();
}

#[tokio::test]
async fn a_database_not_in_utf8_is_refused_before_anything_is_created() {
    let db = database().await;
    let mut conn = PgConnection::connect(&db.url).await.unwrap();
    let name = format!("{}_ascii", db.name);
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE DATABASE {name} ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0"
    )))
    .execute(&mut conn)
    .await
    .unwrap();
    let mut url = url::Url::parse(&db.url).unwrap();
    url.set_path(&format!("/{name}"));
    let e = PgStore::connect(url.as_str(), PgOptions::default())
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("has encoding SQL_ASCII; the outbox needs UTF8"),
        "{e}"
    );
    let mut ascii = PgConnection::connect(url.as_str()).await.unwrap();
    let tables: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'",
    )
    .fetch_one(&mut ascii)
    .await
    .unwrap();
    assert_eq!(tables, 0);
}

fn thread(i: u32) -> String {
    format!("{i:08x}-0000-4000-8000-000000000000")
}

async fn last_error(pool: &PgPool, id: i64) -> Option<String> {
    sqlx::query_scalar("SELECT last_error FROM outbox WHERE id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// `n` due rows of `account` claimed and given `outcome`, recorded at `at`.
async fn settle_rows(
    s: &PgStore,
    account: &str,
    n: usize,
    at: SystemTime,
    outcome: impl Fn(i64) -> (i64, RowOutcome),
) -> Vec<i64> {
    let far = SystemTime::now() + Duration::from_secs(3600);
    let claimed = s.claim(account, far, n).await.unwrap();
    assert_eq!(claimed.len(), n);
    let outcomes: Vec<_> = claimed.iter().map(|r| outcome(r.id)).collect();
    s.record(&outcomes, at).await.unwrap();
    ids(&claimed)
}

#[tokio::test]
async fn queue_summary_counts_unfinished_and_dead_rows_per_account_and_recent_deliveries() {
    let db = database().await;
    let s = daemon(&db, 30_000, 0).await;
    let empty = s.queue_summary(SystemTime::UNIX_EPOCH).await.unwrap();
    assert!(
        empty.accounts.is_empty() && empty.delivered_since == 0,
        "{empty:?}"
    );
    s.acquire_accounts(&["a", "b"], 2).await.unwrap();
    let now = SystemTime::now();
    let long_ago = now - Duration::from_secs(7200);
    for i in 0..10 {
        insert(s.pool(), &thread(i), "x", "a").await;
    }
    for i in 10..13 {
        insert(s.pool(), &thread(i), "x", "b").await;
    }
    // a: 2 delivered long ago, 3 delivered now, 1 dead, 1 sending, 3 pending.
    settle_rows(&s, "a", 2, long_ago, delivered).await;
    settle_rows(&s, "a", 3, now, delivered).await;
    settle_rows(&s, "a", 1, now, |id| {
        (id, RowOutcome::Dead { error: "no".into() })
    })
    .await;
    assert_eq!(
        s.claim("a", now + Duration::from_secs(3600), 1)
            .await
            .unwrap()
            .len(),
        1
    );
    let oldest_b: i64 = sqlx::query_scalar(
        "SELECT (extract(epoch FROM min(created_at)) * 1000000)::bigint
         FROM outbox WHERE account = 'b'",
    )
    .fetch_one(s.pool())
    .await
    .unwrap();
    let oldest_b = SystemTime::UNIX_EPOCH + Duration::from_micros(oldest_b.try_into().unwrap());
    let summary = s
        .queue_summary(now - Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(summary.delivered_since, 3, "{summary:?}");
    let a = &summary.accounts["a"];
    assert_eq!((a.pending, a.sending, a.dead), (3, 1, 1), "{summary:?}");
    let b = &summary.accounts["b"];
    assert_eq!((b.pending, b.sending, b.dead), (3, 0, 0), "{summary:?}");
    assert_eq!(b.oldest_pending, Some(oldest_b));
    assert!(a.oldest_pending.is_some());
    assert_eq!(
        (summary.pending(), summary.sending(), summary.dead()),
        (6, 1, 1)
    );
    assert_eq!(
        s.queue_summary(long_ago - Duration::from_secs(1))
            .await
            .unwrap()
            .delivered_since,
        5
    );
}

#[tokio::test]
async fn prune_deletes_only_rows_delivered_before_the_cutoff_oldest_first() {
    let db = database().await;
    let s = daemon(&db, 30_000, 0).await;
    s.acquire_accounts(&["a"], 1).await.unwrap();
    let now = SystemTime::now();
    let hours_ago = |h: u64| now - Duration::from_secs(3600 * h);
    for i in 0..12 {
        insert(s.pool(), &thread(i), "x", "a").await;
    }
    let oldest = settle_rows(&s, "a", 2, hours_ago(5), delivered).await;
    let old = settle_rows(&s, "a", 3, hours_ago(3), delivered).await;
    let recent = settle_rows(&s, "a", 2, now, delivered).await;
    let dead = settle_rows(&s, "a", 2, hours_ago(5), |id| {
        (id, RowOutcome::Dead { error: "no".into() })
    })
    .await;
    let sending = ids(&s
        .claim("a", now + Duration::from_secs(3600), 1)
        .await
        .unwrap());
    let cutoff = hours_ago(1);
    // The oldest first: a limit of 2 takes the 5-hour-old deliveries.
    assert_eq!(s.prune_delivered(cutoff, 2).await.unwrap(), 2);
    let left: Vec<i64> = sqlx::query_scalar("SELECT id FROM outbox ORDER BY id")
        .fetch_all(s.pool())
        .await
        .unwrap();
    assert!(oldest.iter().all(|id| !left.contains(id)), "{left:?}");
    assert!(old.iter().all(|id| left.contains(id)), "{left:?}");
    assert_eq!(s.prune_delivered(cutoff, 100).await.unwrap(), 3);
    assert_eq!(s.prune_delivered(cutoff, 100).await.unwrap(), 0);
    let left: Vec<i64> = sqlx::query_scalar("SELECT id FROM outbox ORDER BY id")
        .fetch_all(s.pool())
        .await
        .unwrap();
    assert_eq!(left.len(), 12 - 5, "{left:?}");
    for id in recent.iter().chain(&dead).chain(&sending) {
        assert!(left.contains(id), "row {id} must stay: {left:?}");
    }
    assert_eq!(s.give_back_free_pages(1000).await.unwrap(), 0);
    assert_eq!(s.storage_warning().await, None);
}

#[tokio::test]
async fn unknown_accounts_are_flagged_and_rows_behind_them_say_what_they_wait_for() {
    let db = database().await;
    let s = daemon(&db, 30_000, 0).await;
    // T1: a row of the unconfigured "ghost", then two of "a" behind it.
    let ghost = insert(s.pool(), T1, "g", "ghost").await;
    let behind1 = insert(s.pool(), T1, "b1", "a").await;
    let behind2 = insert(s.pool(), T1, "b2", "a").await;
    // T2: a row of "a" alone, and two more ghost rows on other threads.
    let free = insert(s.pool(), T2, "f", "a").await;
    let ghost2 = insert(s.pool(), &thread(7), "g2", "ghost").await;
    let other = insert(s.pool(), &thread(8), "o", "other").await;
    let flagged = s.flag_unknown_accounts(&["a"]).await.unwrap();
    assert_eq!(
        flagged,
        vec![("ghost".to_owned(), 2), ("other".to_owned(), 1)]
    );
    let not_configured =
        "account ghost is not configured: add [accounts.ghost] to the configuration";
    assert_eq!(
        last_error(s.pool(), ghost).await.as_deref(),
        Some(not_configured)
    );
    assert_eq!(
        last_error(s.pool(), ghost2).await.as_deref(),
        Some(not_configured)
    );
    assert!(
        last_error(s.pool(), other)
            .await
            .unwrap()
            .starts_with("account other is not configured")
    );
    let waiting = format!(
        "waiting behind row {ghost} of its thread, whose account ghost is not configured: \
         add [accounts.ghost] to the configuration, or delete row {ghost}"
    );
    assert_eq!(last_error(s.pool(), behind1).await, Some(waiting.clone()));
    assert_eq!(last_error(s.pool(), behind2).await, Some(waiting.clone()));
    assert_eq!(last_error(s.pool(), free).await, None);
    // Again: the same counts, nothing said twice.
    assert_eq!(s.flag_unknown_accounts(&["a"]).await.unwrap(), flagged);
    assert_eq!(last_error(s.pool(), behind1).await, Some(waiting));
    // Another reason is kept; a blocking row that changed is named anew.
    sqlx::query("UPDATE outbox SET last_error = 'Mews said no' WHERE id = $1")
        .bind(behind2)
        .execute(s.pool())
        .await
        .unwrap();
    let t3 = thread(9);
    let ghost_a = insert(s.pool(), &t3, "ga", "ghost").await;
    let ghost_b = insert(s.pool(), &t3, "gb", "ghost").await;
    let behind3 = insert(s.pool(), &t3, "b3", "a").await;
    s.flag_unknown_accounts(&["a"]).await.unwrap();
    assert!(
        last_error(s.pool(), behind3)
            .await
            .unwrap()
            .starts_with(&format!("waiting behind row {ghost_a} of its thread")),
    );
    assert_eq!(
        last_error(s.pool(), behind2).await.as_deref(),
        Some("Mews said no")
    );
    for gone in [ghost, ghost_a] {
        sqlx::query("DELETE FROM outbox WHERE id = $1")
            .bind(gone)
            .execute(s.pool())
            .await
            .unwrap();
    }
    s.flag_unknown_accounts(&["a"]).await.unwrap();
    assert!(
        last_error(s.pool(), behind3)
            .await
            .unwrap()
            .starts_with(&format!("waiting behind row {ghost_b} of its thread")),
    );
    // With ghost configured too nothing is flagged.
    assert_eq!(
        s.flag_unknown_accounts(&["a", "ghost", "other"])
            .await
            .unwrap(),
        vec![]
    );
    // A thread whose head is a ghost row claimed by nobody: "a" claims nothing of it.
    s.acquire_accounts(&["a"], 1).await.unwrap();
    let far = SystemTime::now() + Duration::from_secs(60);
    let claimed = ids(&s.claim("a", far, 10).await.unwrap());
    assert_eq!(claimed, vec![behind1, free]);
}

#[tokio::test]
async fn renew_accounts_names_the_accounts_another_daemon_took_over() {
    let db = database().await;
    let a = daemon(&db, 300, 0).await;
    let b = daemon(&db, 30_000, 0).await;
    assert_eq!(
        DaemonStore::acquire_accounts(&a, &["x", "y"], 2)
            .await
            .unwrap()
            .len(),
        2
    );
    assert_eq!(a.renew_accounts().await.unwrap(), Vec::<String>::new());
    wait_lease_expired(b.pool(), "x").await;
    let took = DaemonStore::acquire_accounts(&b, &["x"], 1).await.unwrap();
    assert_eq!(took.len(), 1);
    assert_eq!(a.renew_accounts().await.unwrap(), vec!["x".to_owned()]);
    // Forgotten: reported once, and y is still a's.
    assert_eq!(a.renew_accounts().await.unwrap(), Vec::<String>::new());
    let held: Vec<String> = a.held().into_keys().collect();
    assert_eq!(held, vec!["y".to_owned()]);
    assert!(a.describe().starts_with("postgres"), "{}", a.describe());
    assert_eq!(
        a.recover_abandoned(Duration::from_secs(1), SystemTime::now())
            .await
            .unwrap(),
        0
    );
    DaemonStore::release_accounts(&a).await.unwrap();
    assert!(a.held().is_empty());
}

/// Producers writing several threads per transaction, in varying orders,
/// while a daemon claims and records: no producer ever fails (no lock the
/// store takes makes producers wait for each other or for the daemon: a
/// trigger-kept thread-head table, tried for deep threads, deadlocked them
/// here), and every row is claimed once, in thread order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_transactions_over_several_threads_beside_claims_never_deadlock() {
    const TRANSACTIONS: usize = 60;
    let db = database().await;
    let s = daemon(&db, 30_000, 0).await;
    s.acquire_accounts(&["default"], 1).await.unwrap();
    let mut producers = Vec::new();
    for p in 0..3u32 {
        let url = db.url.clone();
        producers.push(tokio::spawn(async move {
            let mut conn = PgConnection::connect(&url).await.unwrap();
            for i in 0..TRANSACTIONS {
                let mut tx = conn.begin().await.unwrap();
                // Four threads of this producer's, in varying order (one
                // producer per thread keeps its id order: docs/postgres.md).
                for k in 0..4u32 {
                    let t = p * 4 + (k + u32::try_from(i).unwrap()) % 4;
                    sqlx::query("INSERT INTO outbox (message_thread_id, text) VALUES ($1, $2)")
                        .bind(thread(t))
                        .bind(format!("p{p} tx{i} k{k}"))
                        .execute(&mut *tx)
                        .await
                        .unwrap();
                }
                tx.commit().await.unwrap();
            }
        }));
    }
    let total = 3 * TRANSACTIONS * 4;
    claim_all_once_in_thread_order(&s, total, 3).await;
    for p in producers {
        p.await.unwrap();
    }
}

/// Claims `per_claim` rows at a time, recording each delivered, until
/// `total` rows were claimed (within 60 s, while producers may still be
/// inserting): each row exactly once, and each thread's rows in id order.
async fn claim_all_once_in_thread_order(s: &PgStore, total: usize, per_claim: usize) {
    let mut seen = HashSet::new();
    let mut last_in_thread: HashMap<String, i64> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.len() < total {
        assert!(
            Instant::now() < deadline,
            "claimed {} of {total}",
            seen.len()
        );
        let now = SystemTime::now() + Duration::from_secs(3600);
        let claimed = s.claim("default", now, per_claim).await.unwrap();
        if claimed.is_empty() {
            // Polling a store with no change feed to wait on: nothing more
            // is due until a producer commits.
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        }
        for row in &claimed {
            assert!(seen.insert(row.id), "row {} claimed twice", row.id);
            let last = last_in_thread.insert(row.message_thread_id.clone(), row.id);
            assert!(last < Some(row.id), "thread order broken at row {}", row.id);
        }
        let outcomes: Vec<_> = claimed.iter().map(|r| delivered(r.id)).collect();
        s.record(&outcomes, now).await.unwrap();
    }
}

// Threads through the outbox (issue 13) --------------------------------------

use mews_outbox::store::thread::{held_by_thread, no_such_thread, thread_purged};
use mews_outbox::store::{NewMessage, NewThread, Requeue, ThreadOutcome, ThreadRef};

async fn insert_thread(pool: &PgPool, account: &str, key: &str) -> i64 {
    sqlx::query_scalar(
        "INSERT INTO outbox_threads (account, thread_key, subject, original_sender)
         VALUES ($1, $2, 'Your stay', 'Front desk') RETURNING id",
    )
    .bind(account)
    .bind(key)
    .fetch_one(pool)
    .await
    .unwrap()
}

async fn insert_keyed(pool: &PgPool, key: &str, text: &str, account: &str) -> i64 {
    sqlx::query_scalar(
        "INSERT INTO outbox (thread_key, text, account) VALUES ($1, $2, $3) RETURNING id",
    )
    .bind(key)
    .bind(text)
    .bind(account)
    .fetch_one(pool)
    .await
    .unwrap()
}

fn created(mews_thread_id: &str) -> ThreadOutcome {
    ThreadOutcome::Created {
        mews_thread_id: mews_thread_id.into(),
        mews_created_utc: "2026-12-07T02:00:00Z".into(),
    }
}

/// (status, needs_reconcile, mews_thread_id, attempts, last_error) of a thread.
async fn thread_state(
    pool: &PgPool,
    id: i64,
) -> (String, i32, Option<String>, i32, Option<String>) {
    sqlx::query_as(
        "SELECT status, needs_reconcile, mews_thread_id, attempts, last_error
         FROM outbox_threads WHERE id = $1",
    )
    .bind(id)
    .fetch_one(pool)
    .await
    .unwrap()
}

async fn keyed_thread_id(pool: &PgPool, id: i64) -> Option<String> {
    sqlx::query_scalar("SELECT keyed_thread_id FROM outbox WHERE id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Waits until a backend of this database waits for a lock, while `task`
/// has not finished (it is the one waiting): the event, never a pause.
async fn wait_for_a_lock_wait<T>(pool: &PgPool, task: &tokio::task::JoinHandle<T>, what: &str) {
    let since = Instant::now();
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(pool)
        .await
        .unwrap();
        if waiting > 0 {
            break;
        }
        assert!(!task.is_finished(), "{what} did not wait");
        assert!(
            since.elapsed() < Duration::from_secs(30),
            "{what} neither finished nor waited for a lock within 30 s"
        );
        tokio::task::yield_now().await;
    }
    assert!(!task.is_finished(), "{what} did not wait");
}

#[tokio::test]
async fn thread_inserts_are_refused_with_the_constraint_names_of_the_sqlite_store() {
    let db = database().await;
    let s = daemon(&db, 30_000, 0).await;
    insert_thread(s.pool(), "a", "taken").await;
    let thread = |cols: &str, vals: &str| {
        format!(
            "INSERT INTO outbox_threads (thread_key, subject, original_sender{cols})
             VALUES ('k', 'Your stay', 'Front desk'{vals})"
        )
    };
    let cases = [
        (
            "INSERT INTO outbox_threads (thread_key, subject, original_sender) VALUES ('', 's', 'o')".to_owned(),
            "thread_key_must_be_non_empty_text",
        ),
        (
            "INSERT INTO outbox_threads (thread_key, subject, original_sender) VALUES ('k', E' \\t\\u00a0\\u3000', 'o')".to_owned(),
            "subject_must_be_non_blank_text",
        ),
        (
            "INSERT INTO outbox_threads (thread_key, subject, original_sender) VALUES ('k', 's', E'\\u2028 ')".to_owned(),
            "original_sender_must_be_non_blank_text",
        ),
        (
            "INSERT INTO outbox_threads (thread_key, subject, original_sender) VALUES ('k', NULL, 'o')".to_owned(),
            "not-null",
        ),
        (
            "INSERT INTO outbox_threads (account, thread_key, subject, original_sender) VALUES ('a', 'taken', 's', 'o')".to_owned(),
            "thread_key_must_be_unique_per_account",
        ),
        (thread(", account", ", ''"), "account_must_be_non_empty_text"),
        (thread(", status", ", 'lost'"), "status_must_be_pending_creating_created_or_dead"),
        (thread(", attempts", ", -1"), "attempts_must_not_be_negative"),
        (thread(", needs_reconcile", ", 2"), "needs_reconcile_must_be_0_or_1"),
        // Daemon columns: a producer may not write them.
        (thread(", status", ", 'creating'"), "producer_may_not_set_status"),
        (thread(", status", ", 'created'"), "producer_may_not_set_status"),
        (thread(", status", ", 'dead'"), "producer_may_not_set_status"),
        (thread(", attempts", ", 1"), "producer_may_not_set_attempts"),
        (thread(", needs_reconcile", ", 1"), "producer_may_not_set_needs_reconcile"),
        (thread(", last_error", ", 'x'"), "producer_may_not_set_last_error"),
        (thread(", created_at", ", '2020-01-01T00:00:00Z'"), "producer_may_not_set_created_at"),
        (thread(", first_sent_at", ", now()"), "producer_may_not_set_first_sent_at"),
        (thread(", mews_thread_id", ", 'x'"), "producer_may_not_set_mews_thread_id"),
        (thread(", mews_created_utc", ", 'x'"), "producer_may_not_set_mews_created_utc"),
        (thread(", thread_created_at", ", now()"), "producer_may_not_set_thread_created_at"),
        (thread(", dead_at", ", now()"), "producer_may_not_set_dead_at"),
        (thread(", lease_token", ", 7"), "producer_may_not_set_lease_token"),
        (thread(", claimed_at", ", now()"), "producer_may_not_set_claimed_at"),
        // outbox: exactly one of the two ways to name a thread.
        (
            format!("INSERT INTO outbox (message_thread_id, thread_key, text) VALUES ('{T1}', 'k', 'hi')"),
            "exactly_one_of_message_thread_id_and_thread_key",
        ),
        (
            "INSERT INTO outbox (text) VALUES ('hi')".to_owned(),
            "exactly_one_of_message_thread_id_and_thread_key",
        ),
        (
            "INSERT INTO outbox (thread_key, text) VALUES ('', 'hi')".to_owned(),
            "thread_key_must_be_null_or_non_empty_text",
        ),
        (
            "INSERT INTO outbox (thread_key, text) VALUES ('k', ' ')".to_owned(),
            "text_must_be_non_blank_text",
        ),
        (
            format!("INSERT INTO outbox (thread_key, text, keyed_thread_id) VALUES ('k', 'hi', '{T1}')"),
            "producer_may_not_set_keyed_thread_id",
        ),
        (
            "INSERT INTO outbox (message_thread_id, thread_key, text) VALUES ('nope', NULL, 'hi')".to_owned(),
            "message_thread_id_must_be_a_lowercase_uuid",
        ),
    ];
    for (sql, expected) in cases {
        let e = sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
            .execute(s.pool())
            .await
            .unwrap_err();
        let text = e.to_string();
        assert!(text.contains(expected), "{sql}\n=> {text}");
        if expected.contains('_')
            && let sqlx::Error::Database(db) = &e
        {
            assert_eq!(db.constraint(), Some(expected), "{sql}");
        }
    }
    // Nothing above got in; the producer's own columns are accepted, on
    // both tables, a keyed row with a NULL message_thread_id included.
    let n: (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM outbox_threads), (SELECT count(*) FROM outbox)",
    )
    .fetch_one(s.pool())
    .await
    .unwrap();
    assert_eq!(n, (1, 0));
    sqlx::query(
        "INSERT INTO outbox_threads (account, thread_key, subject, original_sender, next_attempt_at)
         VALUES ('a', 'k', 'Your stay', 'Front desk', '2026-12-06T10:00:00.000Z')",
    )
    .execute(s.pool())
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO outbox (message_thread_id, thread_key, text, identifier, account)
         VALUES (NULL, 'k', 'hi', 'k1', 'a')",
    )
    .execute(s.pool())
    .await
    .unwrap();
    // An explicit thread id moves the sequence past it, as on outbox.
    sqlx::query(
        "INSERT INTO outbox_threads (id, thread_key, subject, original_sender)
         VALUES (1000, 'explicit', 's', 'o')",
    )
    .execute(s.pool())
    .await
    .unwrap();
    let next = insert_thread(s.pool(), "a", "after").await;
    assert!(next > 1000, "{next}");
}

#[tokio::test]
async fn a_thread_and_its_messages_from_one_producer_transaction_are_sent_once_created_in_order() {
    let db = database().await;
    let s = daemon(&db, 30_000, 0).await;
    s.acquire_accounts(&["acct"], 1).await.unwrap();
    let mut producer = PgConnection::connect(&db.url).await.unwrap();
    let mut tx = producer.begin().await.unwrap();
    let thread_id: i64 = sqlx::query_scalar(
        "INSERT INTO outbox_threads (account, thread_key, subject, original_sender)
         VALUES ('acct', 'booking-4711', 'Your stay', 'Front desk') RETURNING id",
    )
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    let mut first = Vec::new();
    for text in ["one", "two"] {
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO outbox (thread_key, text, account) VALUES ('booking-4711', $1, 'acct')
             RETURNING id",
        )
        .bind(text)
        .fetch_one(&mut *tx)
        .await
        .unwrap();
        first.push(id);
    }
    let far = SystemTime::now() + Duration::from_secs(3600);
    assert!(s.claim_thread("acct", far).await.unwrap().is_none());
    tx.commit().await.unwrap();

    // Not claimable, and nothing due, before the thread is created.
    assert!(s.claim("acct", far, 10).await.unwrap().is_empty());
    assert_eq!(
        s.next_due("acct", SystemTime::UNIX_EPOCH).await.unwrap(),
        None
    );
    let claimed = s.claim_thread("acct", far).await.unwrap().unwrap();
    assert_eq!(
        (
            claimed.id,
            claimed.thread_key.as_str(),
            claimed.subject.as_str()
        ),
        (thread_id, "booking-4711", "Your stay")
    );
    assert_eq!(claimed.original_sender, "Front desk");
    assert_eq!((claimed.attempts, claimed.needs_reconcile), (0, false));
    assert!(claimed.first_sent_at.is_some());
    assert!(s.claim_thread("acct", far).await.unwrap().is_none());
    assert!(s.claim("acct", far, 10).await.unwrap().is_empty());

    s.record_thread(thread_id, &created(T2), far).await.unwrap();
    assert_eq!(
        thread_state(s.pool(), thread_id).await,
        ("created".into(), 0, Some(T2.into()), 0, None)
    );
    for &id in &first {
        assert_eq!(keyed_thread_id(s.pool(), id).await.as_deref(), Some(T2));
    }
    // Later rows: one by the Mews id, one by key (resolved at its insert).
    let by_id = insert(s.pool(), T2, "three", "acct").await;
    let by_key = insert_keyed(s.pool(), "booking-4711", "four", "acct").await;
    assert_eq!(keyed_thread_id(s.pool(), by_key).await.as_deref(), Some(T2));
    // One at a time, in insertion order, all with the thread's Mews id.
    let mut order = Vec::new();
    for _ in 0..4 {
        let rows = s.claim("acct", far, 10).await.unwrap();
        assert_eq!(rows.len(), 1, "one row per thread at a time");
        assert_eq!(rows[0].message_thread_id, T2);
        order.push(rows[0].id);
        s.record(&[delivered(rows[0].id)], far).await.unwrap();
    }
    assert_eq!(order, vec![first[0], first[1], by_id, by_key]);
    // A second Created for the same claim changes nothing (no longer creating).
    s.record_thread(thread_id, &created(T1), far).await.unwrap();
    assert_eq!(
        thread_state(s.pool(), thread_id).await.2.as_deref(),
        Some(T2)
    );
}

/// The race the share lock closes: a producer's keyed row inserted while
/// its thread is `creating`, with the transaction still open when the
/// daemon records the thread created. The record waits for the producer's
/// commit and then resolves that row too.
#[tokio::test]
async fn a_keyed_row_inserted_while_its_thread_is_recorded_created_is_resolved_at_the_commit() {
    let db = database().await;
    let s = daemon(&db, 30_000, 0).await;
    s.acquire_accounts(&["acct"], 1).await.unwrap();
    let thread_id = insert_thread(s.pool(), "acct", "k").await;
    let far = SystemTime::now() + Duration::from_secs(3600);
    assert_eq!(
        s.claim_thread("acct", far).await.unwrap().unwrap().id,
        thread_id
    );
    let mut producer = PgConnection::connect(&db.url).await.unwrap();
    let mut tx = producer.begin().await.unwrap();
    let row: i64 = sqlx::query_scalar(
        "INSERT INTO outbox (thread_key, text, account) VALUES ('k', 'hello', 'acct') RETURNING id",
    )
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    let record = tokio::spawn({
        let s = s.clone();
        async move { s.record_thread(thread_id, &created(T2), far).await }
    });
    wait_for_a_lock_wait(s.pool(), &record, "record_thread(Created)").await;
    tx.commit().await.unwrap();
    tokio::time::timeout(Duration::from_secs(30), record)
        .await
        .expect("the record finishes once the producer committed")
        .unwrap()
        .unwrap();
    assert_eq!(keyed_thread_id(s.pool(), row).await.as_deref(), Some(T2));
    let claimed = s.claim("acct", far, 10).await.unwrap();
    assert_eq!(ids(&claimed), vec![row]);
    assert_eq!(claimed[0].message_thread_id, T2);
}

#[tokio::test]
async fn a_stale_owner_cannot_record_a_thread_and_a_takeover_recovers_creating_threads() {
    let db = database().await;
    let settle = Duration::from_secs(5);
    let a = daemon(&db, 300, 5_000).await;
    a.acquire_accounts(&["acct"], 1).await.unwrap();
    let thread_id = insert_thread(a.pool(), "acct", "k").await;
    let row = insert_keyed(a.pool(), "k", "hello", "acct").await;
    let far = SystemTime::now() + Duration::from_secs(3600);
    assert_eq!(
        a.claim_thread("acct", far).await.unwrap().unwrap().id,
        thread_id
    );
    // The owner's latest request started later than the claim: recovery
    // settles from there.
    let started_by = SystemTime::now() + Duration::from_secs(60);
    a.request_starting("acct", started_by).await.unwrap();
    wait_lease_expired(a.pool(), "acct").await;
    let b = a.new_handle(options(30_000, 5_000));
    let taken = b.acquire_accounts(&["acct"], 1).await.unwrap();
    assert_eq!(taken.len(), 1);
    assert_eq!(taken[0].recovered, 1);
    assert_eq!(
        thread_state(a.pool(), thread_id).await,
        ("pending".into(), 1, None, 0, None)
    );
    let due_us: i64 = sqlx::query_scalar(
        "SELECT (extract(epoch FROM next_attempt_at) * 1000000)::bigint
         FROM outbox_threads WHERE id = $1",
    )
    .bind(thread_id)
    .fetch_one(a.pool())
    .await
    .unwrap();
    let expected = started_by + settle;
    let expected_us = i64::try_from(
        expected
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_micros(),
    )
    .unwrap();
    assert!(
        (due_us - expected_us).abs() <= 1_000,
        "due {due_us}, expected {expected_us}"
    );
    // The frozen owner wakes: its outcome is refused, nothing changes.
    for outcome in [
        created(T2),
        ThreadOutcome::Dead {
            error: "HTTP 403".into(),
        },
        ThreadOutcome::Release,
    ] {
        let e = a.record_thread(thread_id, &outcome, far).await.unwrap_err();
        assert!(
            matches!(&e, StoreError::LeaseLost { account } if account == "acct"),
            "{e}"
        );
    }
    assert_eq!(
        thread_state(a.pool(), thread_id).await,
        ("pending".into(), 1, None, 0, None)
    );
    assert_eq!(keyed_thread_id(a.pool(), row).await, None);
    assert_eq!(last_error(a.pool(), row).await, None);
    assert!(
        a.claim_thread("acct", far + settle * 100)
            .await
            .unwrap()
            .is_none()
    );
    // The new owner reads it back first (needs_reconcile), after the settle.
    assert!(b.claim_thread("acct", started_by).await.unwrap().is_none());
    assert_eq!(
        b.next_thread_due("acct", SystemTime::now()).await.unwrap(),
        Some(crate_time(due_us))
    );
    let again = b
        .claim_thread("acct", far + settle * 100)
        .await
        .unwrap()
        .unwrap();
    assert!(again.needs_reconcile);
    // Claimed again, now under the new owner's token: the stale owner's
    // late outcome is still refused and changes nothing.
    let e = a
        .record_thread(thread_id, &created(T1), far)
        .await
        .unwrap_err();
    assert!(matches!(&e, StoreError::LeaseLost { .. }), "{e}");
    assert_eq!(
        thread_state(a.pool(), thread_id).await,
        ("creating".into(), 1, None, 0, None)
    );
    assert_eq!(keyed_thread_id(a.pool(), row).await, None);
    b.record_thread(thread_id, &created(T2), far).await.unwrap();
    assert_eq!(keyed_thread_id(a.pool(), row).await.as_deref(), Some(T2));
}

fn crate_time(us: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_micros(u64::try_from(us).unwrap())
}

#[tokio::test]
async fn retries_keep_or_set_needs_reconcile_and_release_makes_a_thread_due_now() {
    let db = database().await;
    let s = daemon(&db, 30_000, 0).await;
    s.acquire_accounts(&["acct"], 1).await.unwrap();
    let thread_id = insert_thread(s.pool(), "acct", "k").await;
    // Whole milliseconds, as the store keeps them.
    let far = SystemTime::UNIX_EPOCH
        + Duration::from_millis(
            u64::try_from(
                (SystemTime::now() + Duration::from_secs(3600))
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap()
                    .as_millis(),
            )
            .unwrap(),
        );
    let later = far + Duration::from_secs(60);
    s.claim_thread("acct", far).await.unwrap().unwrap();
    s.record_thread(
        thread_id,
        &ThreadOutcome::Retry {
            at: later,
            error: "HTTP 503".into(),
            attempt: true,
            maybe_stored: true,
        },
        far,
    )
    .await
    .unwrap();
    assert_eq!(
        thread_state(s.pool(), thread_id).await,
        ("pending".into(), 1, None, 1, Some("HTTP 503".into()))
    );
    assert!(s.claim_thread("acct", far).await.unwrap().is_none());
    assert_eq!(s.next_thread_due("acct", far).await.unwrap(), Some(later));
    let c = s.claim_thread("acct", later).await.unwrap().unwrap();
    assert_eq!((c.attempts, c.needs_reconcile), (1, true));
    s.record_thread(
        thread_id,
        &ThreadOutcome::Retry {
            at: later,
            error: "HTTP 429".into(),
            attempt: false,
            maybe_stored: false,
        },
        later,
    )
    .await
    .unwrap();
    assert_eq!(
        thread_state(s.pool(), thread_id).await,
        ("pending".into(), 1, None, 1, Some("HTTP 429".into()))
    );
    s.claim_thread("acct", later).await.unwrap().unwrap();
    s.record_thread(thread_id, &ThreadOutcome::Release, far)
        .await
        .unwrap();
    assert_eq!(
        thread_state(s.pool(), thread_id).await,
        ("pending".into(), 1, None, 1, Some("HTTP 429".into()))
    );
    assert_eq!(
        s.claim_thread("acct", far).await.unwrap().unwrap().id,
        thread_id
    );
}

#[tokio::test]
async fn a_dead_thread_holds_its_messages_until_requeued_and_a_purge_makes_them_dead() {
    let db = database().await;
    let s = daemon(&db, 30_000, 0).await;
    s.acquire_accounts(&["a"], 1).await.unwrap();
    let far = SystemTime::now() + Duration::from_secs(3600);
    let k1 = insert_thread(s.pool(), "a", "k1").await;
    let held = [
        insert_keyed(s.pool(), "k1", "one", "a").await,
        insert_keyed(s.pool(), "k1", "two", "a").await,
    ];
    s.claim_thread("a", far).await.unwrap().unwrap();
    s.record_thread(
        k1,
        &ThreadOutcome::Dead {
            error: "HTTP 403: not allowed".into(),
        },
        far,
    )
    .await
    .unwrap();
    assert_eq!(
        thread_state(s.pool(), k1).await,
        (
            "dead".into(),
            0,
            None,
            1,
            Some("HTTP 403: not allowed".into())
        )
    );
    let held_error = held_by_thread("k1", k1, "HTTP 403: not allowed");
    for &id in &held {
        assert_eq!(row_state(s.pool(), id).await.0, "pending");
        assert_eq!(last_error(s.pool(), id).await, Some(held_error.clone()));
    }
    assert!(s.claim("a", far, 10).await.unwrap().is_empty());
    let dead = s.dead_threads(Some("a")).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!((dead[0].id, dead[0].messages_held), (k1, 2));
    assert_eq!(dead[0].thread_key, "k1");
    assert!(dead[0].dead_at.as_deref().unwrap().ends_with('Z'));
    assert!(s.dead_threads(Some("b")).await.unwrap().is_empty());
    let status = s.status(SystemTime::now()).await.unwrap();
    assert_eq!(status.len(), 1);
    assert_eq!(
        (status[0].threads.dead, status[0].threads.messages_waiting),
        (1, 2)
    );

    // Requeue: named threads that are not all dead are refused as a whole.
    let other = insert_thread(s.pool(), "b", "kb").await;
    let e = s
        .requeue_dead_threads(&Requeue::Ids(vec![k1, other, 999]), None, far)
        .await
        .unwrap_err();
    assert!(
        matches!(&e, StoreError::NotDead(m) if m.contains(&format!("thread {other} is pending")) && m.contains("thread 999 does not exist")),
        "{e}"
    );
    assert_eq!(thread_state(s.pool(), k1).await.0, "dead");
    let e = s
        .requeue_dead_threads(&Requeue::Ids(vec![k1]), Some("b"), far)
        .await
        .unwrap_err();
    assert!(
        matches!(&e, StoreError::NotDead(m) if m.contains("belongs to account a, not b")),
        "{e}"
    );
    let now = SystemTime::now();
    assert_eq!(
        s.requeue_dead_threads(&Requeue::Ids(vec![k1]), Some("a"), now)
            .await
            .unwrap(),
        vec![k1]
    );
    assert_eq!(
        thread_state(s.pool(), k1).await,
        (
            "pending".into(),
            0,
            None,
            0,
            Some("requeued by an operator".into())
        )
    );
    // The messages keep their held error until the thread is created.
    assert_eq!(
        last_error(s.pool(), held[0]).await,
        Some(held_error.clone())
    );
    let c = s.claim_thread("a", far).await.unwrap().unwrap();
    assert_eq!(c.id, k1);
    s.record_thread(k1, &created(T1), far).await.unwrap();
    for &id in &held {
        assert_eq!(last_error(s.pool(), id).await, None);
        assert_eq!(keyed_thread_id(s.pool(), id).await.as_deref(), Some(T1));
    }
    // A resolved row that dies shows its effective thread and its key.
    let rows = s.claim("a", far, 10).await.unwrap();
    assert_eq!(ids(&rows), vec![held[0]]);
    s.record(
        &[(
            held[0],
            RowOutcome::Dead {
                error: "HTTP 400".into(),
            },
        )],
        far,
    )
    .await
    .unwrap();

    // Purge: k2 dies with one message held; purging it kills the message.
    let other = insert_thread(s.pool(), "a", "k2").await;
    let k2_row = insert_keyed(s.pool(), "k2", "three", "a").await;
    assert_eq!(s.claim_thread("a", far).await.unwrap().unwrap().id, other);
    s.record_thread(
        other,
        &ThreadOutcome::Dead {
            error: "HTTP 400".into(),
        },
        far,
    )
    .await
    .unwrap();
    assert_eq!(
        s.purge_dead_threads(SystemTime::now() - Duration::from_secs(60), None)
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        s.purge_dead_threads(far + Duration::from_secs(1), Some("a"))
            .await
            .unwrap(),
        1
    );
    assert!(s.dead_threads(None).await.unwrap().is_empty());
    assert_eq!(row_state(s.pool(), k2_row).await.0, "dead");
    assert_eq!(
        last_error(s.pool(), k2_row).await,
        Some(thread_purged("k2", other))
    );
    assert_eq!(
        row_state(s.pool(), held[1]).await.0,
        "pending",
        "k1's rows stay"
    );
    let dead = s.dead_rows(Some("a")).await.unwrap();
    let shown: Vec<_> = dead
        .iter()
        .map(|d| (d.id, d.message_thread_id.clone(), d.thread_key.clone()))
        .collect();
    assert_eq!(
        shown,
        vec![
            (held[0], Some(T1.to_owned()), Some("k1".to_owned())),
            (k2_row, None, Some("k2".to_owned())),
        ]
    );
}

#[tokio::test]
async fn threadless_rows_are_flagged_until_their_thread_exists_and_is_created() {
    let db = database().await;
    let s = daemon(&db, 30_000, 0).await;
    s.acquire_accounts(&["a"], 1).await.unwrap();
    let far = SystemTime::now() + Duration::from_secs(3600);
    let ghost = [
        insert_keyed(s.pool(), "ghost", "one", "a").await,
        insert_keyed(s.pool(), "ghost", "two", "a").await,
    ];
    // Another reason already there is kept.
    let other_reason = insert_keyed(s.pool(), "ghost", "three", "a").await;
    sqlx::query("UPDATE outbox SET last_error = 'account a is not configured' WHERE id = $1")
        .bind(other_reason)
        .execute(s.pool())
        .await
        .unwrap();
    // A key of another account's thread is no thread of this account.
    insert_thread(s.pool(), "b", "elsewhere").await;
    let elsewhere = insert_keyed(s.pool(), "elsewhere", "four", "a").await;
    let found = s.flag_threadless_rows().await.unwrap();
    assert_eq!(
        found,
        vec![
            ("a".to_owned(), "elsewhere".to_owned(), 1),
            ("a".to_owned(), "ghost".to_owned(), 3),
        ]
    );
    let flagged = no_such_thread("a", "ghost");
    assert_eq!(last_error(s.pool(), ghost[0]).await, Some(flagged.clone()));
    assert_eq!(
        last_error(s.pool(), elsewhere).await,
        Some(no_such_thread("a", "elsewhere"))
    );
    assert_eq!(
        last_error(s.pool(), other_reason).await.as_deref(),
        Some("account a is not configured")
    );
    // Again: the same, no change.
    assert_eq!(s.flag_threadless_rows().await.unwrap(), found);
    assert_eq!(last_error(s.pool(), ghost[1]).await, Some(flagged.clone()));
    // The thread appears: no longer threadless; created: the error goes.
    let t = insert_thread(s.pool(), "a", "ghost").await;
    assert_eq!(
        s.flag_threadless_rows().await.unwrap(),
        vec![("a".to_owned(), "elsewhere".to_owned(), 1)]
    );
    s.claim_thread("a", far).await.unwrap().unwrap();
    s.record_thread(t, &created(T1), far).await.unwrap();
    for &id in &ghost {
        assert_eq!(last_error(s.pool(), id).await, None);
    }
    assert_eq!(
        last_error(s.pool(), other_reason).await.as_deref(),
        Some("account a is not configured")
    );
    assert_eq!(
        s.owned_thread_ids(&[T1, T2, "x"]).await.unwrap(),
        HashSet::from([T1.to_owned()])
    );
    assert!(s.owned_thread_ids(&[]).await.unwrap().is_empty());
}

#[tokio::test]
async fn thread_counts_in_status_and_the_queue_summary() {
    let db = database().await;
    let s = daemon(&db, 30_000, 0).await;
    s.acquire_accounts(&["a"], 1).await.unwrap();
    let far = SystemTime::now() + Duration::from_secs(3600);
    let created_thread = insert_thread(s.pool(), "a", "k1").await;
    s.claim_thread("a", far).await.unwrap().unwrap();
    s.record_thread(created_thread, &created(T1), far)
        .await
        .unwrap();
    insert_thread(s.pool(), "a", "k2").await;
    insert_thread(s.pool(), "a", "k3").await;
    s.claim_thread("a", far).await.unwrap().unwrap();
    insert_keyed(s.pool(), "k3", "waits", "a").await;
    insert_keyed(s.pool(), "k1", "resolved", "a").await;
    // An account with only threads, and one with only a created thread.
    insert_thread(s.pool(), "only-threads", "k").await;
    let status = s.status(SystemTime::now()).await.unwrap();
    let accounts: Vec<&str> = status.iter().map(|a| a.account.as_str()).collect();
    assert_eq!(accounts, vec!["a", "only-threads"]);
    let want = mews_outbox::store::ThreadCounts {
        pending: 1,
        creating: 1,
        created: 1,
        dead: 0,
        messages_waiting: 1,
    };
    assert_eq!(status[0].threads, want);
    assert_eq!(status[0].pending, 2);
    assert_eq!(status[1].threads.pending, 1);
    assert_eq!(status[1].pending, 0);
    let summary = s.queue_summary(SystemTime::UNIX_EPOCH).await.unwrap();
    assert_eq!(summary.accounts["a"].threads, want);
    assert_eq!(summary.accounts["only-threads"].threads.pending, 1);
}

#[tokio::test]
async fn enqueue_with_a_new_thread_inserts_both_in_one_transaction() {
    let db = database().await;
    let s = daemon(&db, 30_000, 0).await;
    let message = |key: &str, identifier: &str| NewMessage {
        thread: ThreadRef::Key(key.into()),
        text: "Your room is ready".into(),
        identifier: Some(identifier.into()),
        account: "a".into(),
    };
    let thread = |key: &str, subject: &str| NewThread {
        thread_key: key.into(),
        subject: subject.into(),
        original_sender: "Front desk".into(),
    };
    let first = s
        .enqueue(&message("k", "m1"), Some(&thread("k", "Your stay")))
        .await
        .unwrap();
    let mews_outbox::store::Enqueued::Inserted(first) = first else {
        panic!("{first:?}")
    };
    // The same again: the message is there, the thread is joined.
    assert!(matches!(
        s.enqueue(&message("k", "m1"), Some(&thread("k", "Other subject"))).await.unwrap(),
        mews_outbox::store::Enqueued::AlreadyThere(id) if id == first
    ));
    // An identifier already used inserts nothing, not even a new thread.
    assert!(matches!(
        s.enqueue(&message("k-new", "m1"), Some(&thread("k-new", "Your stay"))).await.unwrap(),
        mews_outbox::store::Enqueued::AlreadyThere(id) if id == first
    ));
    // A second message joins the key's thread, with or without new_thread.
    s.enqueue(&message("k", "m2"), Some(&thread("k", "Other subject")))
        .await
        .unwrap();
    s.enqueue(&message("k", "m3"), None).await.unwrap();
    let threads: Vec<(String, String, String)> =
        sqlx::query_as("SELECT account, thread_key, subject FROM outbox_threads")
            .fetch_all(s.pool())
            .await
            .unwrap();
    assert_eq!(threads, vec![("a".into(), "k".into(), "Your stay".into())]);
    let keyed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM outbox WHERE thread_key = 'k' AND message_thread_id IS NULL",
    )
    .fetch_one(s.pool())
    .await
    .unwrap();
    assert_eq!(keyed, 3);
    // A new thread of another key than the message's is refused.
    let e = s
        .enqueue(&message("k", "m4"), Some(&thread("other", "Your stay")))
        .await
        .unwrap_err();
    assert!(matches!(&e, StoreError::Refused(_)), "{e}");
    let e = s
        .enqueue(
            &NewMessage {
                thread: ThreadRef::Id(T1.into()),
                ..message("k", "m5")
            },
            Some(&thread("k", "Your stay")),
        )
        .await
        .unwrap_err();
    assert!(matches!(&e, StoreError::Refused(_)), "{e}");
    // A bad thread is refused by name, and its message not inserted.
    let e = s
        .enqueue(&message("k2", "m6"), Some(&thread("k2", " \u{3000}")))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, StoreError::Refused(m) if m.contains("subject_must_be_non_blank_text")),
        "{e}"
    );
    let e = s.enqueue(&message("", "m7"), None).await.unwrap_err();
    assert!(
        matches!(&e, StoreError::Refused(m) if m.contains("thread_key_must_be_null_or_non_empty_text")),
        "{e}"
    );
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(s.pool())
        .await
        .unwrap();
    assert_eq!(n, 3);
}

#[tokio::test]
async fn a_new_thread_wakes_a_watcher_at_the_producers_commit() {
    let db = database().await;
    let s = daemon(&db, 30_000, 0).await;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let mut rx = s
        .watch_changes(Duration::from_secs(3600), shutdown.clone())
        .await
        .unwrap();
    let seen = *rx.borrow_and_update();
    insert_thread(s.pool(), "a", "k").await;
    tokio::time::timeout(Duration::from_secs(10), rx.changed())
        .await
        .expect("woken by the thread's insert")
        .unwrap();
    assert_ne!(*rx.borrow(), seen);
    shutdown.cancel();
}

/// The same share lock under a purge: a producer's keyed row of a dead
/// thread, inserted in a transaction still open while an operator purges
/// the thread, is made dead too once the producer commits (it does not
/// wait for ever for a thread that no longer exists).
#[tokio::test]
async fn a_keyed_row_inserted_while_its_dead_thread_is_purged_dies_with_it() {
    let db = database().await;
    let s = daemon(&db, 30_000, 0).await;
    s.acquire_accounts(&["acct"], 1).await.unwrap();
    let thread_id = insert_thread(s.pool(), "acct", "k").await;
    let far = SystemTime::now() + Duration::from_secs(3600);
    s.claim_thread("acct", far).await.unwrap().unwrap();
    s.record_thread(
        thread_id,
        &ThreadOutcome::Dead {
            error: "HTTP 403".into(),
        },
        far,
    )
    .await
    .unwrap();
    let mut producer = PgConnection::connect(&db.url).await.unwrap();
    let mut tx = producer.begin().await.unwrap();
    let row: i64 = sqlx::query_scalar(
        "INSERT INTO outbox (thread_key, text, account) VALUES ('k', 'late', 'acct') RETURNING id",
    )
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    let purge = tokio::spawn({
        let s = s.clone();
        async move {
            s.purge_dead_threads(far + Duration::from_secs(1), None)
                .await
        }
    });
    wait_for_a_lock_wait(s.pool(), &purge, "purge_dead_threads").await;
    tx.commit().await.unwrap();
    let purged = tokio::time::timeout(Duration::from_secs(30), purge)
        .await
        .expect("the purge finishes once the producer committed")
        .unwrap()
        .unwrap();
    assert_eq!(purged, 1);
    assert_eq!(row_state(s.pool(), row).await.0, "dead");
    assert_eq!(
        last_error(s.pool(), row).await,
        Some(thread_purged("k", thread_id))
    );
}

/// A producer transaction left open on a keyed row holds a record of its
/// thread back at most a third of the lease: the record fails (lock
/// timeout, nothing changed), the renewal goes on, and once the producer
/// commits the record is retried and resolves its row.
#[tokio::test]
async fn a_producer_left_open_holds_a_thread_record_back_a_third_of_the_lease_at_most() {
    let db = database().await;
    let s = daemon(&db, 3_000, 0).await;
    s.acquire_accounts(&["acct"], 1).await.unwrap();
    let thread_id = insert_thread(s.pool(), "acct", "k").await;
    let far = SystemTime::now() + Duration::from_secs(3600);
    s.claim_thread("acct", far).await.unwrap().unwrap();
    let mut producer = PgConnection::connect(&db.url).await.unwrap();
    let mut tx = producer.begin().await.unwrap();
    let row: i64 = sqlx::query_scalar(
        "INSERT INTO outbox (thread_key, text, account) VALUES ('k', 'slow', 'acct') RETURNING id",
    )
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    let started = Instant::now();
    let e = tokio::time::timeout(
        Duration::from_secs(30),
        s.record_thread(thread_id, &created(T2), far),
    )
    .await
    .expect("the record gives up by itself")
    .unwrap_err();
    let waited = started.elapsed();
    assert!(matches!(&e, StoreError::Database(_)), "{e}");
    assert!(e.to_string().contains("lock timeout"), "{e}");
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(10),
        "{waited:?}"
    );
    assert_eq!(
        thread_state(s.pool(), thread_id).await,
        ("creating".into(), 0, None, 0, None)
    );
    s.renew().await.unwrap();
    tx.commit().await.unwrap();
    s.record_thread(thread_id, &created(T2), far).await.unwrap();
    assert_eq!(keyed_thread_id(s.pool(), row).await.as_deref(), Some(T2));
}

/// Four producers inserting keyed rows of one thread, two per transaction,
/// while the daemon records the thread created in the middle of it: no
/// row is left without its thread's id, and every row is then claimed once
/// in id order within each producer's commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producers_inserting_keyed_rows_while_their_thread_is_created_leave_none_unresolved() {
    let db = database().await;
    let s = daemon(&db, 30_000, 0).await;
    s.acquire_accounts(&["acct"], 1).await.unwrap();
    let thread_id = insert_thread(s.pool(), "acct", "k").await;
    let far = SystemTime::now() + Duration::from_secs(3600);
    s.claim_thread("acct", far).await.unwrap().unwrap();
    const PER_PRODUCER: usize = 60;
    let producers: Vec<_> = (0..4)
        .map(|p| {
            let url = db.url.clone();
            tokio::spawn(async move {
                let mut conn = PgConnection::connect(&url).await.unwrap();
                for i in (0..PER_PRODUCER).step_by(2) {
                    let mut tx = conn.begin().await.unwrap();
                    for j in 0..2 {
                        sqlx::query(
                            "INSERT INTO outbox (thread_key, text, account) VALUES ('k', $1, 'acct')",
                        )
                        .bind(format!("p{p} m{}", i + j))
                        .execute(&mut *tx)
                        .await
                        .unwrap();
                    }
                    tx.commit().await.unwrap();
                }
            })
        })
        .collect();
    // Record once about a quarter of the rows are in.
    let since = Instant::now();
    loop {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
            .fetch_one(s.pool())
            .await
            .unwrap();
        if n >= 60 {
            break;
        }
        assert!(since.elapsed() < Duration::from_secs(30), "only {n} rows");
        tokio::task::yield_now().await;
    }
    s.record_thread(thread_id, &created(T2), far).await.unwrap();
    for p in producers {
        p.await.unwrap();
    }
    let (total, unresolved): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE keyed_thread_id IS NULL) FROM outbox",
    )
    .fetch_one(s.pool())
    .await
    .unwrap();
    assert_eq!((total, unresolved), (4 * PER_PRODUCER as i64, 0));
    // Claimed one at a time, each once, each producer's rows in its order.
    let mut seen: HashMap<String, usize> = HashMap::new();
    for _ in 0..total {
        let rows = s.claim("acct", far, 10).await.unwrap();
        assert_eq!(rows.len(), 1);
        let text = rows[0].text.as_deref().unwrap().to_owned();
        let (p, m) = text.split_once(' ').unwrap();
        let m: usize = m.trim_start_matches('m').parse().unwrap();
        let next = seen.entry(p.to_owned()).or_default();
        assert_eq!(m, *next, "{text}");
        *next += 1;
        s.record(&[delivered(rows[0].id)], far).await.unwrap();
    }
    assert!(s.claim("acct", far, 10).await.unwrap().is_empty());
}
