//! Pauses and rejections across requests and time: a 429 that asks for no
//! wait still pauses the account; rejections of every message of a quiet
//! account pause it instead of dead-lettering the queue one row at a time.
//! The real binary against a real SQLite file and the fake Mews.

use std::time::{Duration, Instant};

use crate::support::daemon::{
    Env, count, insert_rows, rows, threads, unregistered_threads, wait_for_rows, wait_for_status,
};
use crate::support::fake_mews::{FakeMews, Fault, GET_ALL_PATH, RetryAfter};

// --- A 429 always pauses -----------------------------------------------------

/// The floor of the 429 pause in these tests: `retry.base_delay`, doubling
/// per pause in a row up to `retry.pause_max`.
const FLOOR_BASE: Duration = Duration::from_millis(250);
const PAUSE_MAX: Duration = Duration::from_secs(4);
/// How long the fake answers every request with 429.
const STRETCH: Duration = Duration::from_secs(3);

/// Most requests that fit into `STRETCH` when each 429 pauses at least the
/// floor: the n-th request comes at least `sum of the first n-1 floors`
/// after the first one.
fn requests_bound_during_stretch() -> usize {
    let mut n = 1;
    let mut elapsed = Duration::ZERO;
    let mut floor = FLOOR_BASE;
    loop {
        elapsed += floor;
        if elapsed >= STRETCH {
            return n;
        }
        n += 1;
        floor = (floor * 2).min(PAUSE_MAX);
    }
}

/// Runs one row through a stretch of 429s carrying `retry_after`; returns
/// the requests (every endpoint) that arrived during the stretch.
async fn requests_during_a_stretch_of_429s(
    retry_after: Option<RetryAfter>,
    read_back_first: bool,
) -> Vec<crate::support::fake_mews::RequestRecord> {
    let fake = FakeMews::start().await;
    let env = Env::with(
        &fake.base_url,
        &[
            ("base_delay", "\"250ms\""),
            ("max_delay", "\"4s\""),
            ("pause_max", "\"4s\""),
            // Only the pause may hold requests back here, not our own limit.
            ("rate_limit", "\"off\""),
        ],
        "",
    );
    let db = env.producer().await;
    insert_rows(&db, 1, &threads(&fake, 1), "throttled").await;
    if read_back_first {
        // As if a previous request carrying it timed out: it is read back
        // (messages/getAll) before it is sent again.
        sqlx::query(
            "UPDATE outbox SET needs_reconcile = 1, first_sent_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')",
        )
        .execute(&db)
        .await
        .unwrap();
    }
    let retry_after_text = retry_after.as_ref().map(|r| format!("{r:?}"));
    let until = Instant::now() + STRETCH;
    fake.throttle_until(until, retry_after);
    let mut daemon = env.start();
    daemon
        .wait_for_log("Mews rate-limited this account (429)")
        .await;
    wait_for_status(&db, "delivered", 1).await;
    assert_eq!(
        fake.retry_after_violations(),
        0,
        "no request before a Retry-After ended"
    );
    let during: Vec<_> = fake
        .all_requests()
        .into_iter()
        .filter(|r| r.arrived < until)
        .collect();
    println!(
        "429 stretch: retry_after={retry_after_text:?} read_back={read_back_first} requests_during_{STRETCH:?}={}",
        during.len()
    );
    during
}

#[tokio::test]
async fn a_429_with_retry_after_0_still_pauses_for_the_growing_floor() {
    let during =
        requests_during_a_stretch_of_429s(Some(RetryAfter::Seconds(Duration::ZERO)), false).await;
    let bound = requests_bound_during_stretch();
    assert_eq!(
        bound, 4,
        "250ms, 500ms, 1s, 2s: the fourth pause ends after 3s"
    );
    // (one arriving at the very end may be answered after it: not all 429)
    assert_eq!(during.first().map(|r| r.status), Some(429));
    assert!(
        during.len() <= bound,
        "{} requests during {STRETCH:?} of 429s, at most {bound} allowed by the floor",
        during.len()
    );
}

#[tokio::test]
async fn a_429_with_a_retry_after_date_in_the_past_still_pauses_for_the_growing_floor() {
    let past = RetryAfter::DateAgo(Duration::from_secs(30));
    let during = requests_during_a_stretch_of_429s(Some(past), false).await;
    let bound = requests_bound_during_stretch();
    // (one arriving at the very end may be answered after it: not all 429)
    assert_eq!(during.first().map(|r| r.status), Some(429));
    assert!(
        during.len() <= bound,
        "{} requests during {STRETCH:?} of 429s, at most {bound}",
        during.len()
    );
}

#[tokio::test]
async fn a_429_with_retry_after_0_on_a_read_back_still_pauses_for_the_growing_floor() {
    let during =
        requests_during_a_stretch_of_429s(Some(RetryAfter::Seconds(Duration::ZERO)), true).await;
    let bound = requests_bound_during_stretch();
    assert!(
        during.first().is_some_and(|r| r.status == 429)
            && during
                .iter()
                .filter(|r| r.status == 429)
                .all(|r| r.path == GET_ALL_PATH),
        "read-backs refused, nothing sent meanwhile: {:?}",
        during
            .iter()
            .map(|r| (&r.path, r.status))
            .collect::<Vec<_>>()
    );
    assert!(
        during.len() <= bound,
        "{} read-backs during {STRETCH:?} of 429s, at most {bound}",
        during.len()
    );
}

#[tokio::test]
async fn a_429_with_a_garbage_retry_after_pauses_like_one_without() {
    let garbage = RetryAfter::Verbatim("soon, maybe".into());
    let during = requests_during_a_stretch_of_429s(Some(garbage), false).await;
    // Without a usable Retry-After the pause is pause_base (100ms in the
    // test configuration) doubling: 100, 200, 400, 800, 1600 ms fit 5
    // requests into 3 s (the sixth pause ends after 3.1 s).
    assert!(
        during.len() <= 5,
        "{} requests during {STRETCH:?} of 429s",
        during.len()
    );
}

// --- Rejections across requests and time ------------------------------------

/// Slow row retries (a held row is not sent again while the test enqueues
/// the next one), quick account pauses.
fn quiet_account(base_url: &str) -> Env {
    Env::with(
        base_url,
        &[
            ("base_delay", "\"1s\""),
            ("max_delay", "\"2s\""),
            ("max_attempts", "50"),
            ("pause_base", "\"300ms\""),
            ("pause_max", "\"1s\""),
        ],
        "",
    )
}

async fn enqueue_one(fake: &FakeMews, db: &sqlx::SqlitePool, text: &str) -> i64 {
    insert_rows(db, 1, &threads(fake, 1), text).await[0]
}

#[tokio::test]
async fn a_quiet_account_whose_every_request_is_refused_pauses_instead_of_dead_lettering() {
    let fake = FakeMews::start().await;
    let forbidden = Fault::Status {
        code: 403,
        retry_after: None,
        message: "The integration is not permitted to add messages".into(),
    };
    fake.script(std::iter::repeat_n(forbidden, 10_000));
    let env = quiet_account(&fake.base_url);
    let db = env.producer().await;
    let mut daemon = env.start();

    // One message at a time, each after the previous one was answered: no
    // batch ever holds three, so only a memory across requests can tell.
    for i in 0..2 {
        let id = enqueue_one(&fake, &db, &format!("quiet {i}")).await;
        wait_for_rows(&db, &format!("id = {id} AND last_error IS NOT NULL"), 1).await;
        let error = rows(&db)
            .await
            .into_iter()
            .find(|r| r.id == id)
            .unwrap()
            .last_error
            .unwrap();
        assert!(
            error.starts_with("held pending a systemic-rejection verdict")
                && error.contains("HTTP 403: The integration is not permitted to add messages"),
            "{error}"
        );
    }
    enqueue_one(&fake, &db, "quiet 2").await;
    let alert = daemon.wait_for_log("ALERT").await;
    assert!(
        alert.contains("HTTP 403: The integration is not permitted"),
        "{alert}"
    );
    daemon
        .wait_for_log("account paused after a systemic rejection")
        .await;
    let reason: String = sqlx::query_scalar(
        "SELECT pause_reason FROM outbox_account_state WHERE account = 'default' AND paused_until IS NOT NULL",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert!(reason.starts_with("systemic rejection: "), "{reason}");

    // Two more arrive while it is paused; the probes after the pauses are
    // refused alike, so it pauses again.
    enqueue_one(&fake, &db, "quiet 3").await;
    enqueue_one(&fake, &db, "quiet 4").await;
    daemon
        .wait_for_log("the probe after the pause was rejected again")
        .await;
    assert_eq!(
        count(&db, "dead").await,
        0,
        "nothing dead-lettered while refused"
    );

    fake.clear_faults();
    wait_for_status(&db, "delivered", 5).await;
    assert_eq!(count(&db, "dead").await, 0);
    assert_eq!(fake.accepted().len(), 5, "each delivered once");
}

#[tokio::test]
async fn one_bad_message_on_a_quiet_account_is_dead_with_mews_reason_once_a_good_one_is_accepted() {
    let fake = FakeMews::start().await;
    fake.set_poison(|text| text.starts_with("bad"));
    let env = quiet_account(&fake.base_url);
    let db = env.producer().await;
    let daemon = env.start();

    let bad = enqueue_one(&fake, &db, "bad").await;
    wait_for_rows(&db, &format!("id = {bad} AND last_error IS NOT NULL"), 1).await;
    assert_eq!(
        count(&db, "dead").await,
        0,
        "held until the account is judged"
    );
    enqueue_one(&fake, &db, "good").await;
    wait_for_status(&db, "delivered", 1).await;
    wait_for_status(&db, "dead", 1).await;

    let row = rows(&db).await.into_iter().find(|r| r.id == bad).unwrap();
    let error = row.last_error.unwrap();
    assert!(
        error.starts_with("HTTP 403: poisoned: bad 0") && error.contains("RequestId"),
        "Mews's own reason: {error}"
    );
    assert!(!daemon.log().contains("ALERT"), "{}", daemon.log());
    assert_eq!(fake.accepted().len(), 1);
}

// --- Every request counts -----------------------------------------------------

#[tokio::test]
async fn failed_requests_count_in_our_rate_limit_as_they_do_at_mews() {
    // The fake counts every request, failed or not, like Mews's window.
    let fake = FakeMews::start_with(crate::support::fake_mews::FakeOptions {
        rate_limit: Some((4, Duration::from_secs(2))),
        ..Default::default()
    })
    .await;
    fake.script(std::iter::repeat_n(Fault::status(503), 8));
    let env = Env::with(
        &fake.base_url,
        &[
            ("rate_limit", "\"4/2s\""),
            ("batch_size", "1"),
            ("max_attempts", "50"),
            ("breaker_failures", "100"),
        ],
        "",
    );
    let db = env.producer().await;
    insert_rows(&db, 8, &threads(&fake, 8), "counted").await;
    let _daemon = env.start();
    wait_for_status(&db, "delivered", 8).await;

    let requests = fake.requests();
    let failed = requests.iter().filter(|r| r.status == 503).count();
    let refused = requests.iter().filter(|r| r.status == 429).count();
    println!(
        "every request counts: requests={} failed={failed} refused_by_the_window={refused}",
        requests.len()
    );
    assert_eq!(failed, 8, "the scripted failures were sent");
    assert_eq!(refused, 0, "our window counted the failed requests too");
    assert_eq!(fake.retry_after_violations(), 0);
}

/// Mews adds messages only to threads this client created, and judges a
/// request as a whole: a row for a thread the client did not create gets
/// Mews's 403 and is dead with Mews's reason, while the account's rows for
/// its own threads, sent in the same first request, are delivered.
#[tokio::test]
async fn a_row_for_a_thread_this_client_did_not_create_is_dead_and_the_rest_delivered() {
    let fake = FakeMews::start().await;
    let env = Env::new(&fake.base_url);
    let db = env.producer().await;
    let own = threads(&fake, 4);
    let foreign = unregistered_threads(1).remove(0);
    insert_rows(&db, 2, &own[..2], "before").await;
    let bad = insert_rows(&db, 1, std::slice::from_ref(&foreign), "foreign").await[0];
    insert_rows(&db, 2, &own[2..], "after").await;

    let _daemon = env.start();
    wait_for_status(&db, "delivered", 4).await;
    wait_for_status(&db, "dead", 1).await;

    let rows = rows(&db).await;
    let dead = rows.iter().find(|r| r.id == bad).unwrap();
    assert_eq!(dead.status, "dead");
    let reason = dead.last_error.as_deref().unwrap();
    let mews_says = format!("Message thread {foreign} was not created by this client");
    assert!(
        reason.contains("HTTP 403") && reason.contains(&mews_says),
        "{reason}"
    );
    assert!(
        rows.iter()
            .filter(|r| r.id != bad)
            .all(|r| r.status == "delivered"),
        "{rows:?}"
    );
    let accepted = fake.accepted();
    assert_eq!(
        accepted.len(),
        4,
        "each own row once, the foreign one never"
    );
    assert!(
        accepted
            .iter()
            .all(|m| m.message_thread_id.to_string() != foreign)
    );
    // The first request carried all five and was refused whole.
    let first = &fake.add_requests()[0];
    assert_eq!((first.status, first.message_count), (403, 5));
}
