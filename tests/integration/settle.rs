//! No avoidable duplicate when Mews is slower than the daemon's patience or
//! death, and no adoption of a copy the row never produced: rows recovered
//! from `sending` settle like a timed-out request, counted from when their
//! request started; the read-back adopts only messages created after the
//! row's first send could have reached Mews, by Mews's clock as measured
//! from its `Date` headers.

use std::collections::HashMap;
use std::time::Duration;

use crate::support::daemon::{
    ACCESS_TOKEN, Env, WAIT, count, insert_rows, rows, threads, wait_for_status,
};
use crate::support::fake_mews::{
    FakeMews, FakeOptions, Fault, GET_ALL_PATH, RequestRecord, StoredMessage,
};
use uuid::Uuid;

const ROWS: usize = 20;

/// Mews finishes storing 3 s after the request arrived, answers at 4 s
/// (to nobody); the daemon's request_timeout is 5 s.
fn slow_store() -> Fault {
    Fault::SlowStore {
        store_after: Duration::from_secs(3),
        answer_after: Some(Duration::from_secs(4)),
    }
}

/// Waits until the slow request has been answered (so it has stored), then
/// checks that Mews holds each row exactly once and that each row carries
/// the Id of the copy its first request created.
async fn assert_each_row_delivered_once_with_the_first_copy(
    fake: &FakeMews,
    db: &sqlx::SqlitePool,
) {
    wait_for_status(db, "delivered", ROWS as i64).await;
    let slow = slow_request(fake).await;
    assert_eq!(
        slow.stored_ids.len(),
        ROWS,
        "the slow request stored them all"
    );
    let accepted = fake.accepted();
    assert_eq!(
        accepted.len(),
        ROWS,
        "duplicates: {}",
        accepted.len() - ROWS
    );
    let by_id: HashMap<String, &StoredMessage> =
        accepted.iter().map(|m| (m.id.to_string(), m)).collect();
    for row in rows(db).await {
        let id = row.mews_message_id.as_deref().expect("a Mews id");
        let copy = by_id[id];
        assert_eq!(
            copy.identifier.as_deref(),
            Some(row.id.to_string().as_str())
        );
        assert!(slow.stored_ids.contains(&copy.id), "row {}", row.id);
    }
}

/// The `SlowStore` request, once the fake has answered it (to nobody).
async fn slow_request(fake: &FakeMews) -> RequestRecord {
    for n in 1.. {
        let requests = fake.wait_for_requests(n, WAIT).await;
        if let Some(slow) = requests
            .iter()
            .find(|r| matches!(r.fault, Some(Fault::SlowStore { .. })))
        {
            return slow.clone();
        }
    }
    unreachable!()
}

#[tokio::test]
async fn a_crash_while_mews_is_still_storing_duplicates_nothing_after_an_immediate_restart() {
    let fake = FakeMews::start().await;
    fake.script([slow_store()]);
    let env = Env::with(&fake.base_url, &[("request_timeout", "\"5s\"")], "");
    let db = env.producer().await;
    insert_rows(&db, ROWS, &threads(&fake, ROWS), "settle").await;

    let mut daemon = env.start();
    fake.wait_for_add_arrivals(1, WAIT).await;
    daemon.crash().await; // Mews has not stored anything yet
    assert_eq!(count(&db, "sending").await, ROWS as i64);
    assert!(fake.accepted().is_empty());

    let mut restarted = env.start();
    restarted
        .wait_for_log("rows left `sending` by a previous run")
        .await;
    assert_each_row_delivered_once_with_the_first_copy(&fake, &db).await;
    let line = restarted.wait_for_log("reconciliation:").await;
    assert!(line.contains("reconciled=20"), "{line}");
    assert_eq!(fake.add_requests().len(), 1, "nothing was sent again");
}

#[tokio::test]
async fn a_reload_that_abandons_a_request_mews_is_still_storing_duplicates_nothing() {
    let fake = FakeMews::start().await;
    fake.script([slow_store()]);
    let env = Env::with(
        &fake.base_url,
        &[
            ("request_timeout", "\"5s\""),
            ("drain_timeout", "\"100ms\""),
        ],
        "",
    );
    let db = env.producer().await;
    insert_rows(&db, ROWS, &threads(&fake, ROWS), "settle").await;

    let mut daemon = env.start();
    fake.wait_for_add_arrivals(1, WAIT).await;
    daemon.signal("HUP");
    daemon
        .wait_for_log("reload: requests still in flight after delivery.drain_timeout")
        .await;
    daemon.wait_for_log("configuration reloaded").await;
    assert_each_row_delivered_once_with_the_first_copy(&fake, &db).await;
    let line = daemon.wait_for_log("reconciliation:").await;
    assert!(line.contains("reconciled=20"), "{line}");
}

#[tokio::test]
async fn a_timed_out_request_that_mews_stored_later_is_found_by_the_read_back() {
    let fake = FakeMews::start().await;
    // The client gives up at 2 s; Mews stores at 3 s all the same.
    fake.script([Fault::DelayThenNormal(Duration::from_secs(3))]);
    let env = Env::new(&fake.base_url);
    let db = env.producer().await;
    insert_rows(&db, 1, &threads(&fake, 1), "slow").await;

    let mut daemon = env.start();
    wait_for_status(&db, "delivered", 1).await;
    let line = daemon.wait_for_log("reconciliation:").await;
    assert!(line.contains("reconciled=1"), "{line}");
    let first = &fake.wait_for_requests(1, WAIT).await[0];
    assert_eq!(first.stored_ids.len(), 1, "stored after the client gave up");
    assert_eq!(fake.accepted().len(), 1, "no duplicate");
    let row = &rows(&db).await[0];
    assert_eq!(
        row.mews_message_id.as_deref(),
        Some(first.stored_ids[0].to_string().as_str())
    );
    assert!(
        row.last_error
            .as_deref()
            .unwrap()
            .contains("no response within 2s")
    );
}

/// One row whose first request loses its connection (after Mews stored it
/// when `stored`), in a thread that already holds the same text from a
/// minute before, by the fake's clock: the older copy is never adopted.
async fn older_identical_text_case(clock_offset_ms: i64, stored: bool) {
    let fake = FakeMews::start_with(FakeOptions {
        clock_offset_ms,
        ..Default::default()
    })
    .await;
    let env = Env::new(&fake.base_url);
    let db = env.producer().await;
    let thread = threads(&fake, 1);
    let text = "Your room is ready";
    sqlx::query("INSERT INTO outbox (message_thread_id, text) VALUES (?1, ?2)")
        .bind(&thread[0])
        .bind(text)
        .execute(&db)
        .await
        .unwrap();
    let older = fake.seed_message(
        ACCESS_TOKEN,
        Uuid::parse_str(&thread[0]).unwrap(),
        text,
        Duration::from_secs(60),
    );
    fake.script([if stored {
        Fault::DropAfterStore
    } else {
        Fault::DropBeforeStore
    }]);

    let mut daemon = env.start();
    wait_for_status(&db, "delivered", 1).await;
    daemon.wait_for_log("reconciliation:").await;
    assert!(
        fake.requests().iter().any(|r| r.path == GET_ALL_PATH),
        "read back"
    );
    let accepted = fake.accepted();
    assert_eq!(
        accepted.len(),
        2,
        "the older text and exactly one copy of ours"
    );
    let ours = accepted.iter().find(|m| m.id != older.id).unwrap();
    let row = &rows(&db).await[0];
    assert_eq!(
        row.mews_message_id.as_deref(),
        Some(ours.id.to_string().as_str()),
        "offset {clock_offset_ms} ms, stored {stored}: the row carries its own copy"
    );
    let adds = fake.add_requests();
    assert_eq!(
        adds.len(),
        if stored { 1 } else { 2 },
        "sent again only when Mews had nothing"
    );
}

#[tokio::test]
async fn an_identical_text_from_before_the_first_send_is_not_adopted_and_the_row_is_sent() {
    older_identical_text_case(0, false).await;
}

#[tokio::test]
async fn with_mews_clock_three_minutes_ahead_the_stored_copy_is_adopted_and_the_older_text_not() {
    older_identical_text_case(180_000, true).await;
    older_identical_text_case(180_000, false).await;
}

#[tokio::test]
async fn with_mews_clock_three_minutes_behind_the_stored_copy_is_adopted_and_the_older_text_not() {
    older_identical_text_case(-180_000, true).await;
    older_identical_text_case(-180_000, false).await;
}

/// The fake itself: a Mews whose clock is 3 minutes behind dates its
/// answers and its `CreatedUtc` by that clock, not by hyper's; and a
/// client that gives up does not stop it from storing.
#[tokio::test]
async fn the_fake_keeps_its_own_clock_and_stores_what_a_departed_client_sent() {
    let fake = FakeMews::start_with(FakeOptions {
        clock_offset_ms: -180_000,
        ..Default::default()
    })
    .await;
    fake.script([Fault::SlowStore {
        store_after: Duration::from_millis(300),
        answer_after: None,
    }]);
    let thread = Uuid::new_v4();
    fake.register_threads("a", [thread.to_string()]);
    let body = serde_json::json!({
        "ClientToken": "c", "AccessToken": "a", "Client": "settle 1.0",
        "Messages": [{"MessageThreadId": thread, "Text": "x", "Identifier": "1"}],
    });
    let http = reqwest::Client::new();
    let url = fake.url(crate::support::fake_mews::ADD_PATH);
    let gave_up = http
        .post(&url)
        .timeout(Duration::from_millis(50))
        .json(&body)
        .send()
        .await;
    assert!(gave_up.unwrap_err().is_timeout());
    let stored = fake.wait_for_accepted(1, WAIT).await;
    assert_eq!(stored[0].identifier.as_deref(), Some("1"));

    let sent_at = std::time::SystemTime::now();
    let answer = http.post(&url).json(&body).send().await.unwrap();
    let date = answer.headers()["date"].to_str().unwrap().to_owned();
    let date = httpdate::parse_http_date(&date).unwrap();
    let behind = sent_at.duration_since(date).unwrap();
    // Whole seconds, and the answer took a moment: 180 s, give or take 2.
    assert!(
        (Duration::from_secs(178)..=Duration::from_secs(182)).contains(&behind),
        "{behind:?}"
    );
    let json: serde_json::Value = answer.json().await.unwrap();
    let created = json["Messages"][0]["Message"]["CreatedUtc"]
        .as_str()
        .unwrap();
    let created = humantime::parse_rfc3339(created).unwrap();
    let apart = date
        .duration_since(created)
        .unwrap_or_else(|e| e.duration());
    assert!(
        apart <= Duration::from_secs(1),
        "CreatedUtc and Date by one clock"
    );
}
