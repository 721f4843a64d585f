//! Threads through the outbox (issue 13), end to end: a producer inserts a
//! thread of `outbox_threads` and messages naming its `thread_key`; the
//! real daemon creates the thread at the fake Mews (`messageThreads/add`)
//! and sends the messages into it, in order, through every fault a thread
//! creation can meet.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use sqlx::SqlitePool;

use crate::support::daemon::{ACCESS_TOKEN, Env, WAIT, rows, threads, wait_for_rows};
use crate::support::fake_mews::{
    ADD_PATH, FakeMews, FakeOptions, Fault, StoredMessage, THREADS_ADD_PATH,
};

/// Inserts a thread and `texts` as its messages, in one producer
/// transaction, as the README shows; returns the thread's id.
async fn insert_thread_with_messages(
    db: &SqlitePool,
    key: &str,
    subject: &str,
    texts: &[&str],
) -> i64 {
    let mut tx = db.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO outbox_threads (thread_key, subject, original_sender) VALUES (?1, ?2, ?3)
         ON CONFLICT (account, thread_key) DO NOTHING",
    )
    .bind(key)
    .bind(subject)
    .bind("Ada Lovelace")
    .execute(&mut *tx)
    .await
    .unwrap();
    for text in texts {
        sqlx::query("INSERT INTO outbox (thread_key, text) VALUES (?1, ?2)")
            .bind(key)
            .bind(*text)
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    let id: i64 = sqlx::query_scalar("SELECT id FROM outbox_threads WHERE thread_key = ?1")
        .bind(key)
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    id
}

#[derive(Debug, sqlx::FromRow)]
struct ThreadRow {
    thread_key: String,
    status: String,
    last_error: Option<String>,
    mews_thread_id: Option<String>,
}

async fn thread_rows(db: &SqlitePool) -> Vec<ThreadRow> {
    sqlx::query_as(
        "SELECT thread_key, status, last_error, mews_thread_id
         FROM outbox_threads ORDER BY id",
    )
    .fetch_all(db)
    .await
    .unwrap()
}

/// Waits until `SELECT count(*) FROM outbox_threads WHERE <condition>`
/// reaches `n`, checking on every commit (the outbox's `data_version`).
async fn wait_for_threads(db: &SqlitePool, condition: &str, n: i64) {
    let query = format!("SELECT count(*) FROM outbox_threads WHERE {condition}");
    let mut conn = db.acquire().await.unwrap();
    let waited = tokio::time::timeout(WAIT, async {
        let mut last = -1i64;
        loop {
            let version: i64 = sqlx::query_scalar("PRAGMA data_version")
                .fetch_one(&mut *conn)
                .await
                .unwrap();
            if version != last {
                last = version;
                let have: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(query.clone()))
                    .fetch_one(&mut *conn)
                    .await
                    .unwrap();
                if have >= n {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    if waited.is_err() {
        panic!(
            "timed out waiting for {n} threads with {condition}: {:#?}",
            thread_rows(db).await
        );
    }
}

/// The messages Mews has in `thread`, in the order it stored them.
fn texts_in(fake: &FakeMews, thread: &str) -> Vec<String> {
    fake.accepted()
        .into_iter()
        .filter(|m| m.message_thread_id.to_string() == thread)
        .map(|m| m.text)
        .collect()
}

/// Each message text stored exactly once.
fn assert_each_stored_once(accepted: &[StoredMessage]) {
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for m in accepted {
        *counts.entry(m.text.as_str()).or_default() += 1;
    }
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "stored more than once: {twice:?}");
}

#[tokio::test]
async fn a_thread_and_its_messages_in_one_producer_transaction_make_one_thread_then_the_messages_in_order()
 {
    let fake = FakeMews::start().await; // enforces "only into threads this client created"
    let env = Env::new(&fake.base_url);
    let db = env.producer().await;
    let thread = insert_thread_with_messages(
        &db,
        "booking-4711",
        "Your stay at the Grand",
        &["Welcome!", "Your room is 214."],
    )
    .await;

    let mut daemon = env.start();
    wait_for_rows(&db, "status = 'delivered'", 2).await;

    let adds = fake.thread_add_requests();
    assert_eq!(adds.len(), 1, "one messageThreads/add");
    let body = &adds[0].body;
    assert_eq!(body["Subject"], "Your stay at the Grand");
    assert_eq!(body["OriginalSender"], "Ada Lovelace");
    assert_eq!(body["AccessToken"], ACCESS_TOKEN);
    let created = fake.threads_of(ACCESS_TOKEN);
    assert_eq!(created.len(), 1);
    let mews_id = created[0].id.to_string();
    let stored = thread_rows(&db).await;
    assert_eq!(stored[0].status, "created");
    assert_eq!(stored[0].mews_thread_id.as_deref(), Some(mews_id.as_str()));
    assert_eq!(
        texts_in(&fake, &mews_id),
        ["Welcome!", "Your room is 214."],
        "in insertion order, into the created thread"
    );
    // One message per request: the second waited for the first (thread order).
    let message_adds: Vec<_> = fake
        .all_requests()
        .into_iter()
        .filter(|r| r.path == ADD_PATH)
        .collect();
    assert_eq!(message_adds.len(), 2);
    for row in rows(&db).await {
        assert_eq!(row.message_thread_id, mews_id, "effective thread");
    }
    daemon
        .wait_for_log("thread created; its waiting messages follow in order")
        .await;
    let log = daemon.log();
    assert!(log.contains("thread_key=booking-4711"), "{log}");
    assert!(log.contains(&format!("thread={thread}")), "{log}");
    assert!(!log.contains(ACCESS_TOKEN), "never a token in the log");

    // A message inserted after its thread exists takes the id at insert.
    insert_thread_with_messages(&db, "booking-4711", "ignored: key exists", &["Goodbye!"]).await;
    wait_for_rows(&db, "status = 'delivered'", 3).await;
    assert_eq!(fake.thread_add_requests().len(), 1, "the key existed");
    assert_eq!(
        texts_in(&fake, &mews_id),
        ["Welcome!", "Your room is 214.", "Goodbye!"]
    );
}

#[tokio::test]
async fn a_thread_whose_answer_was_lost_after_mews_created_it_is_read_back_and_adopted() {
    let fake = FakeMews::start().await;
    // request_timeout is 2 s: the first answer comes too late, the second
    // never (the connection drops after the thread is created), the third
    // is a 500 after creating it.
    fake.script_threads_add([
        Fault::StoreThenDelay(Duration::from_secs(4)),
        Fault::DropAfterStore,
        Fault::StoreThenStatus(500),
    ]);
    let env = Env::new(&fake.base_url);
    let db = env.producer().await;
    for (key, subject) in [("a", "Late answer"), ("b", "Dropped"), ("c", "Error 500")] {
        insert_thread_with_messages(
            &db,
            key,
            subject,
            &[&format!("{key} one"), &format!("{key} two")],
        )
        .await;
    }

    let mut daemon = env.start();
    wait_for_rows(&db, "status = 'delivered'", 6).await;

    let per_subject = fake.threads_per_subject();
    for subject in ["Late answer", "Dropped", "Error 500"] {
        assert_eq!(per_subject.get(subject), Some(&1), "{per_subject:?}");
    }
    assert!(
        fake.all_requests()
            .iter()
            .any(|r| r.path == crate::support::fake_mews::THREADS_GET_ALL_PATH),
        "read back before any resend"
    );
    assert_eq!(
        fake.thread_add_requests().len(),
        3,
        "each was sent once: the read-back found it"
    );
    let accepted = fake.accepted();
    assert_each_stored_once(&accepted);
    for t in thread_rows(&db).await {
        let id = t.mews_thread_id.clone().unwrap();
        assert_eq!(
            texts_in(&fake, &id),
            [
                format!("{} one", t.thread_key),
                format!("{} two", t.thread_key)
            ]
        );
    }
    daemon.wait_for_log_count("thread adopted", 3).await;
}

#[tokio::test]
async fn sigkill_during_thread_creation_never_makes_a_duplicate_thread_nor_loses_a_message() {
    const THREADS: usize = 24;
    const KILLS: usize = 5;
    let fake = FakeMews::start().await;
    // Every creation stores the thread 100 ms after it arrives and answers
    // 400 ms later: a kill right after the store leaves it `creating`.
    fake.script_threads_add((0..THREADS * 2).map(|_| Fault::SlowStore {
        store_after: Duration::from_millis(100),
        answer_after: Some(Duration::from_millis(500)),
    }));
    let env = Env::new(&fake.base_url);
    let db = env.producer().await;
    for n in 0..THREADS {
        insert_thread_with_messages(
            &db,
            &format!("k{n}"),
            &format!("Subject {n}"),
            &[&format!("m{n} first"), &format!("m{n} second")],
        )
        .await;
    }
    for kill in 0..KILLS {
        let mut daemon = env.start();
        let seen = fake.message_threads().len();
        // Killed as soon as the fake has created one more thread, before
        // its answer comes back.
        fake.wait_for_threads(seen + 1, WAIT).await;
        daemon.crash().await;
        daemon.wait_exit(WAIT).await;
        eprintln!("kill {kill}: {} threads at the fake", seen + 1);
    }
    let _daemon = env.start();
    wait_for_rows(&db, "status = 'delivered'", (THREADS * 2) as i64).await;

    let per_subject = fake.threads_per_subject();
    assert_eq!(per_subject.len(), THREADS, "{per_subject:?}");
    assert!(
        per_subject.values().all(|n| *n == 1),
        "no duplicate thread: {per_subject:?}"
    );
    assert_each_stored_once(&fake.accepted());
    let mine: BTreeMap<String, String> = thread_rows(&db)
        .await
        .into_iter()
        .map(|t| (t.thread_key, t.mews_thread_id.unwrap()))
        .collect();
    for n in 0..THREADS {
        assert_eq!(
            texts_in(&fake, &mine[&format!("k{n}")]),
            [format!("m{n} first"), format!("m{n} second")]
        );
    }
}

#[tokio::test]
async fn a_refused_thread_is_dead_its_messages_held_until_an_operator_requeues_it() {
    let fake = FakeMews::start().await;
    fake.script_threads_add([Fault::Status {
        code: 403,
        retry_after: None,
        message: "OriginalSender is not a guest of this property".into(),
    }]);
    let env = Env::new(&fake.base_url);
    let db = env.producer().await;
    let thread =
        insert_thread_with_messages(&db, "walk-in-9", "Your request", &["held one", "held two"])
            .await;

    let mut daemon = env.start();
    wait_for_threads(&db, "status = 'dead'", 1).await;
    daemon
        .wait_for_log(&format!("dead requeue --thread {thread}"))
        .await;
    let dead = &thread_rows(&db).await[0];
    let error = dead.last_error.as_deref().unwrap();
    assert!(
        error.contains("HTTP 403: OriginalSender is not a guest of this property"),
        "{error}"
    );
    wait_for_rows(&db, "last_error LIKE 'held: thread %'", 2).await;
    for row in rows(&db).await {
        assert_eq!(row.status, "pending", "held, not sent, not dropped");
        let held = row.last_error.unwrap();
        assert!(held.contains("\"walk-in-9\""), "{held}");
        assert!(
            held.contains(&format!("dead requeue --thread {thread}")),
            "{held}"
        );
    }
    assert!(fake.add_requests().is_empty(), "no message was sent");

    let (ok, listing, err) = env.cli(&["dead", "list"]).await;
    assert!(ok.success(), "{err}");
    assert!(listing.contains("dead threads"), "{listing}");
    assert!(listing.contains("\"walk-in-9\""), "{listing}");
    assert!(
        listing.contains("OriginalSender is not a guest"),
        "{listing}"
    );
    let (ok, json, _) = env.cli(&["dead", "list", "--json"]).await;
    assert!(ok.success());
    let json: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(json["threads"][0]["id"], thread);
    assert_eq!(json["threads"][0]["messages_held"], 2);
    let (ok, status, _) = env.cli(&["status"]).await;
    assert!(ok.success());
    assert!(status.contains("THREADS"), "{status}");
    assert!(
        status.contains("dead threads hold their messages"),
        "{status}"
    );
    let (ok, status, _) = env.cli(&["status", "--json"]).await;
    assert!(ok.success());
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["accounts"][0]["threads"]["dead"], 1);
    assert_eq!(status["accounts"][0]["threads"]["messages_waiting"], 2);

    // The fake takes it now (its one scripted refusal is spent).
    let (ok, out, err) = env
        .cli(&["dead", "requeue", "--thread", &thread.to_string()])
        .await;
    assert!(ok.success(), "{err}");
    assert!(out.contains("requeued 1 dead threads"), "{out}");
    wait_for_rows(&db, "status = 'delivered'", 2).await;
    let created = &thread_rows(&db).await[0];
    assert_eq!(created.status, "created");
    assert_eq!(
        texts_in(&fake, created.mews_thread_id.as_deref().unwrap()),
        ["held one", "held two"]
    );
    for row in rows(&db).await {
        assert_eq!(row.last_error, None, "the held error is cleared");
    }
}

#[tokio::test]
async fn threads_and_messages_share_the_rate_limit_without_a_429_and_take_turns() {
    const NEW_THREADS: usize = 50;
    const BACKLOG: usize = 20;
    let fake = FakeMews::start_with(FakeOptions {
        rate_limit: Some((20, Duration::from_secs(2))),
        ..FakeOptions::default()
    })
    .await;
    let env = Env::with(&fake.base_url, &[("rate_limit", "\"20/2s\"")], "");
    let db = env.producer().await;
    // A backlog to an existing thread: one message per request (order).
    let existing = threads(&fake, 1);
    crate::support::daemon::insert_rows(&db, BACKLOG, &existing, "backlog").await;
    for n in 0..NEW_THREADS {
        insert_thread_with_messages(&db, &format!("new-{n}"), &format!("New {n}"), &[]).await;
    }

    let _daemon = env.start();
    wait_for_threads(&db, "status = 'created'", NEW_THREADS as i64).await;
    wait_for_rows(&db, "status = 'delivered'", BACKLOG as i64).await;

    let requests = fake.all_requests();
    let throttled = requests.iter().filter(|r| r.status == 429).count();
    assert_eq!(throttled, 0, "threads count in the same window as messages");
    let kinds: String = requests
        .iter()
        .filter_map(|r| match r.path.as_str() {
            ADD_PATH => Some('M'),
            THREADS_ADD_PATH => Some('T'),
            _ => None,
        })
        .collect();
    assert_eq!(kinds.matches('T').count(), NEW_THREADS, "{kinds}");
    assert_eq!(kinds.matches('M').count(), BACKLOG, "{kinds}");
    // While both are due they alternate: the backlog is not left until
    // after the 50 creations, nor the creations until after the backlog.
    let first = &kinds[..2 * BACKLOG];
    assert!(
        first.matches('M').count() >= BACKLOG - 1 && first.matches('T').count() >= BACKLOG - 1,
        "request-level round robin: {kinds}"
    );
    assert!(
        !kinds.contains("MMM") && !kinds[..2 * BACKLOG].contains("TTT"),
        "{kinds}"
    );
}

#[tokio::test]
async fn enqueue_with_a_thread_key_subject_and_sender_creates_the_thread_and_delivers() {
    let fake = FakeMews::start().await;
    let env = Env::new(&fake.base_url);
    let _db = env.producer().await;
    let (ok, _, err) = env
        .cli(&[
            "enqueue",
            "--thread-key",
            "cli-1",
            "--subject",
            "From the CLI",
            "--original-sender",
            "Grace Hopper",
            "--text",
            "first",
        ])
        .await;
    assert!(ok.success(), "{err}");
    let (ok, _, err) = env
        .cli(&["enqueue", "--thread-key", "cli-1", "--text", "second"])
        .await;
    assert!(ok.success(), "the key exists: the message joins it: {err}");
    // Misuse is refused with a clear message, nothing inserted.
    let (ok, _, err) = env
        .cli(&[
            "enqueue",
            "--thread-key",
            "cli-1",
            "--subject",
            "S",
            "--text",
            "x",
        ])
        .await;
    assert!(!ok.success());
    assert!(err.contains("--original-sender"), "{err}");
    let (ok, _, err) = env
        .cli(&[
            "enqueue",
            "--thread",
            "7f9325f6-ef44-4911-89a8-ae51010a5aa4",
            "--thread-key",
            "k",
            "--text",
            "x",
        ])
        .await;
    assert!(!ok.success());
    assert!(err.contains("--thread-key"), "{err}");
    let (ok, _, err) = env
        .cli(&[
            "enqueue",
            "--thread-key",
            "cli-2",
            "--subject",
            "   ",
            "--original-sender",
            "O",
            "--text",
            "x",
        ])
        .await;
    assert!(!ok.success());
    assert!(err.contains("--subject must not be blank"), "{err}");

    let db = env.producer().await;
    let _daemon = env.start();
    wait_for_rows(&db, "status = 'delivered'", 2).await;
    let threads = fake.threads_of(ACCESS_TOKEN);
    assert_eq!(threads.len(), 1);
    assert_eq!(threads[0].subject, "From the CLI");
    assert_eq!(threads[0].original_sender, "Grace Hopper");
    assert_eq!(
        texts_in(&fake, &threads[0].id.to_string()),
        ["first", "second"]
    );
    assert_eq!(rows(&db).await.len(), 2, "the misuses inserted nothing");
}

#[tokio::test]
async fn a_message_whose_thread_key_names_no_thread_waits_flagged_and_blocks_nothing() {
    let fake = FakeMews::start().await;
    let env = Env::new(&fake.base_url);
    let db = env.producer().await;
    sqlx::query("INSERT INTO outbox (thread_key, text) VALUES ('nobody', 'orphan')")
        .execute(&db)
        .await
        .unwrap();
    let existing = threads(&fake, 1);
    crate::support::daemon::insert_rows(&db, 1, &existing, "unblocked").await;
    let mut daemon = env.start();
    wait_for_rows(&db, "status = 'delivered'", 1).await;
    wait_for_rows(&db, "last_error LIKE 'waiting for its thread: %'", 1).await;
    daemon.wait_for_log("thread_key=nobody").await;
    let orphan = rows(&db)
        .await
        .into_iter()
        .find(|r| r.text == b"orphan")
        .unwrap();
    assert_eq!(orphan.status, "pending");
}

#[tokio::test]
async fn a_failed_read_back_waits_instead_of_creating_the_thread_blindly() {
    let fake = FakeMews::start().await;
    fake.script_threads_add([Fault::StoreThenStatus(503)]);
    fake.script_threads_get_all([Fault::status(503), Fault::DropBeforeStore]);
    let env = Env::new(&fake.base_url);
    let db = env.producer().await;
    insert_thread_with_messages(&db, "k", "Read-back fails twice", &["only"]).await;
    let mut daemon = env.start();
    wait_for_rows(&db, "status = 'delivered'", 1).await;
    assert_eq!(
        fake.threads_per_subject().get("Read-back fails twice"),
        Some(&1),
        "no second thread while Mews could not be asked"
    );
    assert_eq!(fake.thread_add_requests().len(), 1);
    daemon
        .wait_for_log_count(
            "cannot read the thread back, so it is not created again yet",
            2,
        )
        .await;
    daemon.wait_for_log("thread adopted").await;
}

#[tokio::test]
async fn purging_a_dead_thread_makes_its_held_messages_dead_and_says_how_many() {
    let fake = FakeMews::start().await;
    fake.script_threads_add([Fault::status(400)]);
    let env = Env::new(&fake.base_url);
    let db = env.producer().await;
    let thread = insert_thread_with_messages(&db, "gone", "Never", &["one", "two"]).await;
    let mut daemon = env.start();
    wait_for_threads(&db, "status = 'dead'", 1).await;
    wait_for_rows(&db, "last_error LIKE 'held: thread %'", 2).await;
    daemon.signal("TERM");
    assert!(daemon.wait_exit(WAIT).await.success());

    let (ok, out, err) = env.cli(&["dead", "purge", "--older-than", "0s"]).await;
    assert!(ok.success(), "{err}");
    assert!(
        out.contains(
            "purged 1 dead threads dead for more than 0s; 2 messages they held are dead now"
        ),
        "{out}"
    );
    assert!(thread_rows(&db).await.is_empty());
    for row in rows(&db).await {
        assert_eq!(row.status, "dead", "none waits for ever unseen");
        let error = row.last_error.unwrap();
        assert!(
            error.contains(&format!("\"gone\" (outbox_threads id {thread})"))
                && error.contains("purged"),
            "{error}"
        );
    }
    let (ok, listing, _) = env.cli(&["dead", "list"]).await;
    assert!(ok.success());
    assert!(
        listing.contains("key \"gone\" (never created)"),
        "{listing}"
    );
    assert!(listing.contains("2 dead rows"), "{listing}");
}
