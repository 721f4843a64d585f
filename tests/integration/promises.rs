//! README promises that had no test of their own (issue 11), each against
//! the real binary, a real SQLite file and the fake Mews on 127.0.0.1.

use std::collections::HashMap;
use std::time::Duration;

use crate::support::daemon::{
    ACCESS_TOKEN, CLIENT_TOKEN, Env, WAIT, count, hold_write_lock, insert_rows, insert_rows_for,
    rows, threads, threads_for, wait_for_rows, wait_for_status,
};
use crate::support::fake_mews::{
    ADD_PATH, FakeMews, FakeOptions, Fault, GET_ALL_PATH, RequestRecord,
};
use serde_json::json;
use sqlx::SqlitePool;

/// Texts stored by the fake, each with how many copies.
fn copies(fake: &FakeMews) -> HashMap<String, usize> {
    let mut copies = HashMap::new();
    for m in fake.accepted() {
        *copies.entry(m.text).or_default() += 1;
    }
    copies
}

/// (path, status) of every messages/add and messages/getAll request.
fn sequence(requests: &[RequestRecord]) -> Vec<(&'static str, u16)> {
    requests
        .iter()
        .map(|r| {
            let path = if r.path == ADD_PATH { "add" } else { "getAll" };
            (path, r.status)
        })
        .collect()
}

/// Only the requests the daemon made (not the test's own filler).
fn daemon_requests(fake: &FakeMews) -> Vec<RequestRecord> {
    fake.requests()
        .into_iter()
        .filter(|r| r.client.starts_with("mews-outbox"))
        .collect()
}

async fn needs_reconcile(db: &SqlitePool) -> Vec<i64> {
    sqlx::query_scalar("SELECT needs_reconcile FROM outbox ORDER BY id")
        .fetch_all(db)
        .await
        .unwrap()
}

/// Stores `n` other messages in `thread` at the fake, as another program
/// with the same AccessToken would, 1000 per request.
async fn fill_thread(fake: &FakeMews, thread: &str, n: usize) {
    let http = reqwest::Client::new();
    for chunk in 0..n.div_ceil(1000) {
        let messages: Vec<_> = (chunk * 1000..n.min((chunk + 1) * 1000))
            .map(|i| json!({"MessageThreadId": thread, "Text": format!("filler {i}")}))
            .collect();
        let status = http
            .post(fake.url(ADD_PATH))
            .json(&json!({
                "ClientToken": CLIENT_TOKEN,
                "AccessToken": ACCESS_TOKEN,
                "Client": "filler",
                "Messages": messages,
            }))
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, 200);
    }
}

// --- Pauses -------------------------------------------------------------------

/// README: "A 429 on `getAll` pauses the account like one on `messages/add`
/// and sends nothing", and rows claimed for a read-back are released when a
/// pause starts.
#[tokio::test]
async fn a_429_on_the_read_back_pauses_the_account_and_releases_the_rows_unsent() {
    let fake = FakeMews::start().await;
    fake.script([Fault::DropBeforeStore]);
    fake.script_get_all([Fault::status_retry_after(429, "3")]);
    let env = Env::new(&fake.base_url);
    let db = env.producer().await;
    insert_rows(&db, 3, &threads(&fake, 3), "read back").await;

    let mut daemon = env.start();
    let line = daemon
        .wait_for_log("Mews rate-limited this account (429)")
        .await;
    assert!(line.contains("pause=3s"), "{line}");
    // Released: pending, still marked, no attempt for the 429.
    wait_for_rows(
        &db,
        "status = 'pending' AND needs_reconcile = 1 AND attempts = 1",
        3,
    )
    .await;
    let (_, status, _) = env.cli(&["status"]).await;
    assert!(
        status.contains("default: PAUSED until") && status.contains("rate-limited by Mews (429)"),
        "{status}"
    );

    wait_for_status(&db, "delivered", 3).await;
    let requests = fake.requests();
    assert_eq!(
        sequence(&requests),
        [("add", 0), ("getAll", 429), ("getAll", 200), ("add", 200)],
        "nothing was sent during the pause, and the rows were read back after it"
    );
    let gap = requests[2].arrived - requests[1].arrived;
    assert!(
        gap >= Duration::from_secs(3),
        "Retry-After 3, next after {gap:?}"
    );
    assert!(rows(&db).await.iter().all(|r| r.attempts == 1));
    assert!(copies(&fake).values().all(|&n| n == 1));
}

/// README: "rows already claimed for a bisection ... are released if a pause
/// starts".
#[tokio::test]
async fn rows_claimed_for_a_bisection_are_released_when_a_429_pauses_the_account() {
    let fake = FakeMews::start().await;
    // The batch of 4 is refused, its first half is throttled: the second
    // half, claimed but not sent, must not stay `sending` through the pause.
    fake.script([Fault::status(400), Fault::status_retry_after(429, "3")]);
    let env = Env::new(&fake.base_url);
    let db = env.producer().await;
    insert_rows(&db, 4, &threads(&fake, 4), "halves").await;

    let mut daemon = env.start();
    daemon
        .wait_for_log("Mews rate-limited this account (429)")
        .await;
    wait_for_rows(
        &db,
        "status = 'pending' AND attempts = 0 AND needs_reconcile = 0",
        4,
    )
    .await;
    assert_eq!(
        fake.add_requests().len(),
        2,
        "nothing sent during the pause"
    );

    wait_for_status(&db, "delivered", 4).await;
    let sizes: Vec<(usize, u16)> = fake
        .add_requests()
        .iter()
        .map(|r| (r.message_count, r.status))
        .collect();
    assert_eq!(sizes, [(4, 400), (2, 429), (4, 200)]);
    assert!(rows(&db).await.iter().all(|r| r.attempts == 0));
}

// --- Rate limit ---------------------------------------------------------------

/// README: "the end times of the last N requests are stored per account ...
/// and loaded at start, so a restart ... does not begin with an empty
/// window and overrun Mews's".
#[tokio::test]
async fn the_rate_window_survives_a_restart_of_the_daemon() {
    let window = Duration::from_secs(4);
    let fake = FakeMews::start_with(FakeOptions {
        rate_limit: Some((3, window)),
        ..FakeOptions::default()
    })
    .await;
    let env = Env::with(
        &fake.base_url,
        &[("rate_limit", "\"3/4s\""), ("batch_size", "1")],
        "",
    );
    let db = env.producer().await;
    insert_rows(&db, 3, &threads(&fake, 3), "before").await;
    let mut daemon = env.start();
    wait_for_status(&db, "delivered", 3).await;
    daemon.signal("TERM");
    assert!(daemon.wait_exit(WAIT).await.success());

    // The window is full: a daemon starting afresh would send at once.
    insert_rows(&db, 3, &threads(&fake, 3), "after").await;
    let _restarted = env.start();
    wait_for_status(&db, "delivered", 6).await;

    let requests = fake.add_requests();
    assert_eq!(
        requests.iter().map(|r| r.status).collect::<Vec<_>>(),
        [200; 6],
        "no 429 after the restart"
    );
    let gap = requests[3].arrived - requests[0].arrived;
    assert!(gap >= window, "request 4 came {gap:?} after request 1");
}

/// README: "`rate_limit = \"off\"` disables the log (and its per-request
/// write)". The default account, with its limit, is the control.
#[tokio::test]
async fn with_the_rate_limit_off_no_request_log_is_kept() {
    let fake = FakeMews::start().await;
    let env = Env::with(
        &fake.base_url,
        &[("batch_size", "1")],
        "[accounts.free]\naccess_token = \"free-token\"\nrate_limit = \"off\"\n",
    );
    let db = env.producer().await;
    insert_rows(&db, 3, &threads(&fake, 3), "counted").await;
    insert_rows_for(&db, "free", 3, &threads_for(&fake, "free-token", 3), "free").await;

    let mut daemon = env.start();
    wait_for_status(&db, "delivered", 6).await;
    daemon.signal("TERM");
    assert!(daemon.wait_exit(WAIT).await.success());

    let logs: HashMap<String, Option<String>> =
        sqlx::query_as("SELECT account, recent_requests FROM outbox_account_state")
            .fetch_all(&db)
            .await
            .unwrap()
            .into_iter()
            .collect();
    let limited: Vec<String> = serde_json::from_str(
        logs.get("default")
            .cloned()
            .flatten()
            .as_deref()
            .unwrap_or_else(|| panic!("no log for the control: {logs:?}")),
    )
    .unwrap();
    assert_eq!(limited.len(), 3, "one entry per request of the control");
    let off = logs.get("free").cloned().flatten();
    assert!(
        off.as_deref().is_none_or(|l| l == "[]"),
        "the account with the limit off kept a log: {off:?}"
    );
    assert_eq!(fake.add_requests().len(), 6);
    let (_, settings, _) = env.cli(&["check-config"]).await;
    assert!(settings.contains("rate_limit = \"off\""), "{settings}");
}

// --- Reconciliation paging ----------------------------------------------------

/// Leaves one row `sending` that Mews has stored (the answer never came),
/// then another program fills its thread with `fillers` newer messages.
async fn stored_row_behind(fillers: usize) -> (FakeMews, Env, SqlitePool) {
    let fake = FakeMews::start_with(FakeOptions {
        cursor_on_last_page: true,
        ..FakeOptions::default()
    })
    .await;
    fake.script([Fault::StoreThenDelay(Duration::from_secs(120))]);
    let env = Env::new(&fake.base_url);
    let db = env.producer().await;
    let thread = threads(&fake, 1);
    insert_rows(&db, 1, &thread, "the guest's message").await;
    let mut daemon = env.start();
    fake.wait_for_accepted(1, WAIT).await;
    daemon.crash().await;
    assert_eq!(count(&db, "sending").await, 1);
    fill_thread(&fake, &thread[0], fillers).await;
    (fake, env, db)
}

/// README: "paged with `Limitation {Count: 1000, Cursor}` until a page is not
/// full". The row's copy is the oldest of 2501 messages, on the third page;
/// the fake gives the last page a cursor too, so only "not full" stops it.
#[tokio::test]
async fn a_read_back_follows_the_cursor_to_the_third_page_and_stops_on_the_short_one() {
    let (fake, env, db) = stored_row_behind(2500).await;

    let mut restarted = env.start();
    wait_for_status(&db, "delivered", 1).await;
    let line = restarted.wait_for_log("reconciliation:").await;
    assert!(
        line.contains("reconciled=1") && line.contains("resent=0"),
        "{line}"
    );
    let ours = &fake.accepted()[0];
    assert_eq!(ours.text, "the guest's message 0");
    assert_eq!(
        rows(&db).await[0].mews_message_id.as_deref(),
        Some(ours.id.to_string().as_str())
    );
    let reads: Vec<RequestRecord> = daemon_requests(&fake);
    assert!(
        reads.iter().all(|r| r.path == GET_ALL_PATH),
        "nothing re-sent"
    );
    let cursors: Vec<&serde_json::Value> = reads
        .iter()
        .map(|r| &r.body["Limitation"]["Cursor"])
        .collect();
    assert_eq!(reads.len(), 3, "pages of 1000, 1000, 501: {cursors:?}");
    assert!(cursors[0].is_null(), "{cursors:?}");
    assert!(
        cursors[1].is_string() && cursors[2].is_string() && cursors[1] != cursors[2],
        "{cursors:?}"
    );
}

/// README: "at most 10 pages"; "more than 10 pages" is a failed read-back:
/// the rows are re-sent without checking and the log says so.
#[tokio::test]
async fn more_than_ten_full_pages_give_up_the_read_back_and_the_log_says_so() {
    let (fake, env, db) = stored_row_behind(10_000).await;

    let mut restarted = env.start();
    wait_for_status(&db, "delivered", 1).await;
    let line = restarted.wait_for_log("reconciliation failed").await;
    assert!(
        line.contains("more than 10000 messages in the window") && line.contains("resent=1"),
        "{line}"
    );
    let reads = daemon_requests(&fake);
    assert_eq!(
        sequence(&reads),
        [vec![("getAll", 200); 10], vec![("add", 200)]].concat()
    );
    assert_eq!(
        copies(&fake)["the guest's message 0"],
        2,
        "the duplicate the fallback warns about"
    );
}

// --- Shutdown -----------------------------------------------------------------

/// README: "SIGTERM | request in flight finishes and is recorded; rows not
/// yet sent released". The rows not yet sent are the second half of a
/// bisection.
#[tokio::test]
async fn sigterm_during_a_bisection_releases_the_half_not_yet_sent() {
    let fake = FakeMews::start().await;
    fake.script([
        Fault::status(400),
        Fault::DelayThenNormal(Duration::from_millis(1500)),
    ]);
    let env = Env::new(&fake.base_url);
    let db = env.producer().await;
    let ids = insert_rows(&db, 4, &threads(&fake, 4), "split").await;

    let mut daemon = env.start();
    daemon.wait_for_log_count("messages/add: sending", 2).await;
    daemon.signal("TERM");
    assert!(daemon.wait_exit(WAIT).await.success());

    let log = daemon.log();
    let stopping = log.find("stopping: no new claims").expect("stopping line");
    let answered = log.find("outcome=\"accepted\"").expect("answer line");
    assert!(stopping < answered, "TERM came after the answer:\n{log}");
    let after: Vec<(i64, String, i64)> = rows(&db)
        .await
        .into_iter()
        .map(|r| (r.id, r.status, r.attempts))
        .collect();
    assert_eq!(
        after,
        [
            (ids[0], "delivered".to_owned(), 0),
            (ids[1], "delivered".to_owned(), 0),
            (ids[2], "pending".to_owned(), 0),
            (ids[3], "pending".to_owned(), 0),
        ]
    );
    assert_eq!(needs_reconcile(&db).await, [0, 0, 0, 0], "untouched");
    assert_eq!(fake.add_requests().len(), 2, "nothing sent after TERM");
}

/// README: "database fails while recording | ... at shutdown rows stay
/// `sending` (as after a crash)", and after a restart they are read back.
#[tokio::test]
async fn rows_stay_sending_when_the_database_fails_at_shutdown_and_are_read_back_after() {
    let fake = FakeMews::start().await;
    fake.script([Fault::DelayThenNormal(Duration::from_millis(1500))]);
    let env = Env::with(&fake.base_url, &[("busy_timeout", "\"100ms\"")], "");
    let db = env.producer().await;
    insert_rows(&db, 2, &threads(&fake, 2), "unrecorded").await;

    let mut daemon = env.start();
    daemon.wait_for_log("messages/add: sending").await;
    // A producer holds the write lock past the busy timeout, then TERM.
    let mut locker = hold_write_lock(&db).await;
    daemon.signal("TERM");
    assert!(daemon.wait_exit(WAIT).await.success());
    let log = daemon.log();
    assert!(
        log.contains("stopping before the outcomes could be recorded"),
        "{log}"
    );
    sqlx::query("ROLLBACK").execute(&mut *locker).await.unwrap();
    drop(locker);
    assert_eq!(count(&db, "sending").await, 2, "left as after a crash");
    assert_eq!(fake.accepted().len(), 2, "Mews has them");

    let mut restarted = env.start();
    restarted
        .wait_for_log("rows left `sending` by a previous run")
        .await;
    wait_for_status(&db, "delivered", 2).await;
    let line = restarted.wait_for_log("reconciliation:").await;
    assert!(line.contains("reconciled=2"), "{line}");
    assert_eq!(fake.accepted().len(), 2, "no duplicate");
    assert_eq!(fake.add_requests().len(), 1);
}

// --- Unexpected statuses and the breaker --------------------------------------

/// README: "other status (409, other 4xx, other 2xx) | retry (other 2xx:
/// marked) | yes | breaker counts".
#[tokio::test]
async fn a_409_is_an_attempt_a_202_is_read_back_and_both_count_toward_the_breaker() {
    let fake = FakeMews::start().await;
    fake.script([Fault::status(409), Fault::status(202)]);
    let env = Env::with(&fake.base_url, &[("breaker_failures", "2")], "");
    let db = env.producer().await;
    insert_rows(&db, 1, &threads(&fake, 1), "conflicted").await;

    let mut daemon = env.start();
    wait_for_status(&db, "delivered", 1).await;
    let line = daemon.wait_for_log("circuit breaker open").await;
    assert!(
        line.contains("2 failed requests in a row") && line.contains("HTTP 202"),
        "{line}"
    );
    assert_eq!(daemon.count_log("outcome=\"transient\""), 2);
    assert_eq!(
        sequence(&fake.requests()),
        [("add", 409), ("add", 202), ("getAll", 200), ("add", 200)],
        "a 409 is retried as is; a 202 may have been stored: read back first"
    );
    assert_eq!(rows(&db).await[0].attempts, 2);
    assert_eq!(fake.accepted().len(), 1);
}

/// README: "Read-backs do not feed the breaker." With a threshold of 2, a
/// failed send then a failed read-back would open it if they did.
#[tokio::test]
async fn a_failed_read_back_does_not_count_toward_the_breaker() {
    let fake = FakeMews::start().await;
    fake.script([Fault::DropBeforeStore]);
    fake.script_get_all([Fault::status(500), Fault::status(500)]);
    let env = Env::with(&fake.base_url, &[("breaker_failures", "2")], "");
    let db = env.producer().await;
    insert_rows(&db, 1, &threads(&fake, 1), "checked").await;

    let mut daemon = env.start();
    wait_for_status(&db, "delivered", 1).await;
    daemon.signal("TERM");
    assert!(daemon.wait_exit(WAIT).await.success());
    let log = daemon.log();
    assert!(log.contains("reconciliation failed"), "{log}");
    assert_eq!(daemon.count_log("circuit breaker open"), 0, "{log}");
    assert_eq!(daemon.count_log("paused_until="), 0, "{log}");
    assert_eq!(
        sequence(&fake.requests()),
        [("add", 0), ("getAll", 500), ("add", 200)]
    );
}

// --- Batch size -------------------------------------------------------------

/// README: "A batch limit halved by a 408, 413 or timeout doubles back after
/// 8 accepted requests in a row", logged once.
#[tokio::test]
async fn the_batch_limit_grows_back_after_eight_accepted_requests() {
    let fake = FakeMews::start().await;
    fake.script([Fault::status(413)]);
    let env = Env::with(&fake.base_url, &[("batch_size", "8")], "");
    let db = env.producer().await;
    insert_rows(&db, 48, &threads(&fake, 48), "regrow").await;

    let mut daemon = env.start();
    wait_for_status(&db, "delivered", 48).await;
    let line = daemon
        .wait_for_log("batch limit raised after sustained success")
        .await;
    assert!(line.contains("from=4") && line.contains("to=8"), "{line}");
    let sizes: Vec<usize> = fake
        .add_requests()
        .iter()
        .map(|r| r.message_count)
        .collect();
    // 8 refused as too large, split into 4 + 4, then 4s until the 8th
    // accepted request in a row, then 8s again.
    assert_eq!(sizes, [8, 4, 4, 4, 4, 4, 4, 4, 4, 8, 8]);
    assert_eq!(daemon.count_log("batch limit raised"), 1);
}

// --- Housekeeping -------------------------------------------------------------

/// README: housekeeping "runs at start"; it deletes rows delivered longer ago
/// than `retention.delivered`, never dead, pending or recent rows.
#[tokio::test]
async fn housekeeping_at_start_deletes_only_rows_delivered_before_the_retention() {
    let fake = FakeMews::start().await;
    let env = Env::with(&fake.base_url, &[], "[retention]\ndelivered = \"1day\"\n");
    let db = env.producer().await;
    let ids = insert_rows(&db, 4, &threads(&fake, 4), "kept or not").await;
    // Rows as earlier runs left them (the daemon's columns, for the test).
    let two_days_ago = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-2 days')";
    let an_hour_ago = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-1 hour')";
    for (id, set) in [
        (
            ids[0],
            format!("status = 'delivered', delivered_at = {two_days_ago}"),
        ),
        (
            ids[1],
            format!("status = 'delivered', delivered_at = {an_hour_ago}"),
        ),
        (
            ids[2],
            format!("status = 'dead', dead_at = {two_days_ago}, last_error = 'refused'"),
        ),
    ] {
        let sql = format!("UPDATE outbox SET {set} WHERE id = {id}");
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&db)
            .await
            .unwrap();
    }

    let mut daemon = env.start();
    let line = daemon
        .wait_for_log("housekeeping: deleted delivered rows past retention.delivered")
        .await;
    assert!(line.contains("pruned=1"), "{line}");
    wait_for_status(&db, "delivered", 2).await;
    let left: Vec<(i64, String)> = rows(&db)
        .await
        .into_iter()
        .map(|r| (r.id, r.status))
        .collect();
    assert_eq!(
        left,
        [
            (ids[1], "delivered".to_owned()),
            (ids[2], "dead".to_owned()),
            (ids[3], "delivered".to_owned()),
        ]
    );
}
