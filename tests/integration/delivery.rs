//! The daemon end to end: the real binary, a real SQLite file, a fake Mews
//! over HTTP on 127.0.0.1.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use crate::support::daemon::{
    ACCESS_TOKEN, CLIENT_TOKEN, Env, WAIT, count, insert_rows, rows, threads, wait_for_status,
};
use crate::support::fake_mews::{FakeMews, FakeOptions, Fault, RetryAfter};

#[tokio::test]
async fn a_full_batch_of_1000_goes_out_in_one_documented_request_and_ids_come_back() {
    let fake = FakeMews::start().await; // answers in a shuffled order
    let env = Env::new(&fake.base_url);
    let db = env.producer().await;
    let ids = insert_rows(&db, 1000, &threads(&fake, 1000), "hello").await;

    let _daemon = env.start();
    wait_for_status(&db, "delivered", 1000).await;

    let requests = fake.add_requests();
    assert_eq!(requests.len(), 1, "one request for 1000 messages");
    let body = &requests[0].body;
    assert_eq!(body["ClientToken"], CLIENT_TOKEN);
    assert_eq!(body["AccessToken"], ACCESS_TOKEN);
    assert_eq!(
        body["Client"],
        format!("mews-outbox {}", env!("CARGO_PKG_VERSION"))
    );
    let messages = body["Messages"].as_array().unwrap();
    assert_eq!(messages.len(), 1000);
    let keys: HashSet<&str> = messages[0]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        HashSet::from(["MessageThreadId", "Text", "Identifier"])
    );
    assert_eq!(
        body.as_object().unwrap().len(),
        4,
        "only the documented fields: {body:#}"
    );

    let stored: HashMap<String, _> = fake
        .accepted()
        .into_iter()
        .map(|m| (m.identifier.clone().unwrap(), m))
        .collect();
    for row in rows(&db).await {
        let sent = &stored[&row.id.to_string()];
        assert_eq!(row.status, "delivered");
        assert_eq!(
            row.mews_message_id.as_deref(),
            Some(sent.id.to_string().as_str())
        );
        assert_eq!(
            row.mews_created_utc.as_deref(),
            Some(sent.created_utc.as_str())
        );
        assert_eq!(row.mews_sender.as_deref(), Some("Application"));
        assert_eq!(sent.text.as_bytes(), row.text);
        assert_eq!(sent.message_thread_id.to_string(), row.message_thread_id);
    }
    assert_eq!(ids.len(), stored.len());
}

#[tokio::test]
async fn the_plain_string_sender_form_is_accepted() {
    let fake = FakeMews::start_with(FakeOptions {
        sender_as_string: true,
        ..FakeOptions::default()
    })
    .await;
    let env = Env::new(&fake.base_url);
    let db = env.producer().await;
    insert_rows(&db, 3, &threads(&fake, 3), "plain").await;
    let _daemon = env.start();
    wait_for_status(&db, "delivered", 3).await;
    assert!(
        rows(&db)
            .await
            .iter()
            .all(|r| r.mews_sender.as_deref() == Some("Application"))
    );
}

#[tokio::test]
async fn one_rejected_message_is_isolated_and_only_it_is_dead() {
    let fake = FakeMews::start().await;
    fake.set_poison(|text| text == "m 17");
    let env = Env::new(&fake.base_url);
    let db = env.producer().await;
    let ids = insert_rows(&db, 64, &threads(&fake, 64), "m").await;

    let _daemon = env.start();
    wait_for_status(&db, "delivered", 63).await;
    wait_for_status(&db, "dead", 1).await;

    let rows = rows(&db).await;
    let dead: Vec<_> = rows.iter().filter(|r| r.status == "dead").collect();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].id, ids[17]);
    let error = dead[0].last_error.as_deref().unwrap();
    assert!(
        error.contains("HTTP 403") && error.contains("poisoned") && error.contains("RequestId"),
        "{error}"
    );
    // Bisection: at most 1 + 2·log2(64) requests.
    let requests = fake.add_requests().len();
    assert!(requests <= 13, "{requests} requests");
    assert_eq!(fake.accepted().len(), 63);
}

#[tokio::test]
async fn bad_tokens_pause_the_account_dead_letter_nothing_and_it_resumes() {
    let fake = FakeMews::start_with(FakeOptions {
        valid_tokens: Some(vec![("other".into(), "other".into())]),
        ..FakeOptions::default()
    })
    .await;
    let env = Env::new(&fake.base_url);
    let db = env.producer().await;
    insert_rows(&db, 5, &threads(&fake, 5), "wait for me").await;

    let mut daemon = env.start();
    let line = daemon
        .wait_for_log("Mews refused this account's requests")
        .await;
    assert!(line.contains("HTTP 401"), "{line}");
    fake.wait_for_requests(2, WAIT).await; // paused, then tried again on its own
    assert_eq!(count(&db, "dead").await, 0);
    assert!(
        rows(&db).await.iter().all(|r| r.attempts == 0),
        "a 401 is not a delivery attempt"
    );

    fake.update_options(|o| o.valid_tokens = None); // the operator fixed the tokens
    wait_for_status(&db, "delivered", 5).await;
}

#[tokio::test]
async fn retryable_failures_are_retried_until_delivered() {
    let fake = FakeMews::start().await;
    fake.script([
        Fault::status(408),
        Fault::status(500),
        Fault::status(503),
        Fault::DropBeforeStore,
        Fault::raw(200, "text/html", "<html>proxy error</html>"),
    ]);
    let env = Env::with(&fake.base_url, &[("max_attempts", "10")], "");
    let db = env.producer().await;
    insert_rows(&db, 1, &threads(&fake, 1), "persistent").await;

    let _daemon = env.start();
    wait_for_status(&db, "delivered", 1).await;
    let row = &rows(&db).await[0];
    assert_eq!(row.attempts, 5, "each failure was one attempt");
    assert!(
        row.last_error
            .as_deref()
            .unwrap()
            .contains("HTTP 200 with an unreadable body")
    );
    assert_eq!(fake.accepted().len(), 1);
}

#[tokio::test]
async fn after_max_attempts_a_row_is_dead_with_the_reason() {
    let fake = FakeMews::start().await;
    fake.script((0..5).map(|_| Fault::status(500)));
    let env = Env::new(&fake.base_url);
    let db = env.producer().await;
    insert_rows(&db, 1, &threads(&fake, 1), "doomed").await;

    let _daemon = env.start();
    wait_for_status(&db, "dead", 1).await;
    let row = &rows(&db).await[0];
    assert_eq!(row.attempts, 5);
    let error = row.last_error.as_deref().unwrap();
    assert!(
        error.contains("HTTP 500") && error.contains("gave up after 5 attempts"),
        "{error}"
    );
    assert!(fake.accepted().is_empty());
}

#[tokio::test]
async fn a_429_retry_after_in_seconds_holds_the_account_and_costs_no_attempt() {
    let fake = FakeMews::start().await;
    fake.script([Fault::status_retry_after(429, "1")]);
    let env = Env::new(&fake.base_url);
    let db = env.producer().await;
    insert_rows(&db, 2, &threads(&fake, 2), "later").await;

    let _daemon = env.start();
    wait_for_status(&db, "delivered", 2).await;
    let requests = fake.add_requests();
    assert_eq!(requests.len(), 2);
    let gap = requests[1].arrived - requests[0].arrived;
    assert!(gap >= Duration::from_secs(1), "next request after {gap:?}");
    assert!(rows(&db).await.iter().all(|r| r.attempts == 0));
}

#[tokio::test]
async fn a_429_retry_after_as_an_http_date_is_honoured() {
    let fake = FakeMews::start().await;
    // The date is made when the 429 is sent (2 s ahead, rounded up to the
    // next second), so no amount of setup time can use it up before then:
    // no wall-clock guess about how long starting the daemon takes.
    fake.script([Fault::status_retry_at(
        429,
        RetryAfter::DateIn(Duration::from_secs(2)),
    )]);
    let env = Env::new(&fake.base_url);
    let db = env.producer().await;
    insert_rows(&db, 1, &threads(&fake, 1), "dated").await;

    let _daemon = env.start();
    wait_for_status(&db, "delivered", 1).await;
    let requests = fake.add_requests();
    assert_eq!(requests.len(), 2, "one 429, then the delivery");
    assert_eq!(requests[0].status, 429);
    let date = requests[0].retry_after.clone().unwrap();
    assert!(httpdate::parse_http_date(&date).is_ok(), "{date}");
    // `early`: the fake's own check, from the moment it sent the date.
    assert!(!requests[1].early, "the next request came before {date}");
    let gap = requests[1].arrived - requests[0].arrived;
    assert!(gap >= Duration::from_secs(2), "next request after {gap:?}");
    assert_eq!(fake.retry_after_violations(), 0);
}

#[tokio::test]
async fn a_request_timeout_is_retried() {
    let fake = FakeMews::start().await;
    fake.script([Fault::DelayThenNormal(Duration::from_secs(3))]);
    let env = Env::new(&fake.base_url);
    let db = env.producer().await;
    insert_rows(&db, 1, &threads(&fake, 1), "slow").await;

    let _daemon = env.start(); // request_timeout is 2s
    wait_for_status(&db, "delivered", 1).await;
    let row = &rows(&db).await[0];
    assert_eq!(row.attempts, 1);
    assert!(
        row.last_error
            .as_deref()
            .unwrap()
            .contains("no response within 2s")
    );
}

#[tokio::test]
async fn rows_left_sending_by_a_crash_are_delivered_after_restart() {
    let fake = FakeMews::start().await;
    fake.script([Fault::DelayThenNormal(Duration::from_secs(60))]);
    let env = Env::new(&fake.base_url);
    let db = env.producer().await;
    insert_rows(&db, 10, &threads(&fake, 10), "in flight").await;

    let mut daemon = env.start();
    daemon.wait_for_log("messages/add: sending").await;
    assert_eq!(count(&db, "sending").await, 10);
    daemon.crash().await;
    fake.clear_faults();

    let mut restarted = env.start();
    restarted
        .wait_for_log("rows left `sending` by a previous run")
        .await;
    wait_for_status(&db, "delivered", 10).await;
}

#[tokio::test]
async fn sigterm_lets_the_request_in_flight_finish_and_exits_zero() {
    let fake = FakeMews::start().await;
    // Long enough that TERM, sent when the request goes, lands before the
    // answer (checked below), well within drain_timeout (5s).
    fake.script([Fault::DelayThenNormal(Duration::from_millis(1500))]);
    let env = Env::new(&fake.base_url);
    let db = env.producer().await;
    insert_rows(&db, 3, &threads(&fake, 3), "finish me").await;

    let mut daemon = env.start();
    daemon.wait_for_log("messages/add: sending").await;
    daemon.signal("TERM");
    let status = daemon.wait_exit(Duration::from_secs(5)).await;
    assert!(status.success(), "{status}");
    // Proof that TERM landed while the request was in flight: the daemon
    // said it was stopping before it logged Mews's answer.
    let log = daemon.log();
    let stopping = log.find("stopping: no new claims").expect("stopping line");
    let answered = log.find("outcome=\"accepted\"").expect("answer line");
    assert!(stopping < answered, "TERM came after the answer:\n{log}");
    assert_eq!(
        count(&db, "delivered").await,
        3,
        "the answer in flight was recorded"
    );
    assert_eq!(fake.add_requests().len(), 1, "nothing sent after TERM");
}

#[tokio::test]
async fn a_second_daemon_on_the_same_database_refuses_to_start() {
    let fake = FakeMews::start().await;
    let env = Env::new(&fake.base_url);
    let _first = env.start().ready().await;
    let mut second = env.start();
    let status = second.wait_exit(WAIT).await;
    assert!(!status.success());
    assert!(
        second
            .log()
            .contains("another mews-outbox daemon is already running"),
        "{}",
        second.log()
    );
}

#[tokio::test]
async fn an_idle_daemon_sends_a_new_row_and_unreadable_text_is_dead_lettered() {
    let fake = FakeMews::start().await;
    let env = Env::new(&fake.base_url);
    let db = env.producer().await;
    let _daemon = env.start().ready().await;

    let thread = threads(&fake, 1).remove(0);
    sqlx::query("INSERT INTO outbox (message_thread_id, text) VALUES (?1, CAST(x'c328' AS TEXT))")
        .bind(&thread)
        .execute(&db)
        .await
        .unwrap();
    sqlx::query("INSERT INTO outbox (message_thread_id, text) VALUES (?1, 'fine')")
        .bind(&thread)
        .execute(&db)
        .await
        .unwrap();
    wait_for_status(&db, "delivered", 1).await;
    let rows = rows(&db).await;
    assert_eq!(rows[0].status, "dead");
    assert!(
        rows[0]
            .last_error
            .as_deref()
            .unwrap()
            .contains("not valid UTF-8")
    );
    assert_eq!(fake.accepted()[0].text, "fine");
}

#[tokio::test]
async fn rows_of_an_unconfigured_account_wait_with_a_clear_error() {
    let fake = FakeMews::start().await;
    let env = Env::new(&fake.base_url);
    let db = env.producer().await;
    sqlx::query(
        "INSERT INTO outbox (message_thread_id, text, account) VALUES (?1, 'hi', 'nowhere')",
    )
    .bind(threads(&fake, 1).remove(0))
    .execute(&db)
    .await
    .unwrap();
    let mut daemon = env.start();
    let line = daemon.wait_for_log("not configured").await;
    assert!(line.contains("nowhere"), "{line}");
    let row = &rows(&db).await[0];
    assert_eq!(row.status, "pending");
    assert!(
        row.last_error
            .as_deref()
            .unwrap()
            .contains("account nowhere is not configured")
    );
}

/// The issue's acceptance run: another process (Python's sqlite3) inserts
/// 3000 rows while the daemon runs; each is delivered exactly once, in
/// insertion order per thread; SIGTERM stops the idle daemon within a second.
#[tokio::test]
async fn rows_from_a_python_producer_arrive_once_each_in_thread_order() {
    let fake = FakeMews::start().await;
    let env = Env::new(&fake.base_url);
    env.producer().await;
    let mut daemon = env.start().ready().await;

    let script = r#"
import sqlite3, sys, uuid, random
db = sqlite3.connect(sys.argv[1], timeout=30, isolation_level=None)
threads = sys.argv[2].split(",")  # 50, registered with the fake
random.seed(7)
n = 0
while n < 3000:
    size = min(random.randint(1, 40), 3000 - n)
    db.execute("BEGIN")
    for _ in range(size):
        db.execute("INSERT INTO outbox (message_thread_id, text) VALUES (?, ?)",
                   (threads[n % 50], "py %d" % n))
        n += 1
    db.execute("COMMIT")
"#;
    let out = tokio::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(&env.db)
        .arg(threads(&fake, 50).join(","))
        .output()
        .await
        .expect("python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let accepted = fake.wait_for_accepted(3000, WAIT).await;
    let db = env.producer().await;
    wait_for_status(&db, "delivered", 3000).await;

    let texts: HashSet<&str> = accepted.iter().map(|m| m.text.as_str()).collect();
    assert_eq!(texts.len(), 3000, "no duplicates");
    assert_eq!(accepted.len(), 3000);
    // Per thread, Mews stored them in insertion order (py N increases).
    let mut last: HashMap<uuid::Uuid, u32> = HashMap::new();
    for m in &accepted {
        let n: u32 = m.text.trim_start_matches("py ").parse().unwrap();
        if let Some(previous) = last.insert(m.message_thread_id, n) {
            assert!(
                previous < n,
                "thread {} got {n} after {previous}",
                m.message_thread_id
            );
        }
    }
    // Each row holds the Id Mews gave its text.
    let ids: HashMap<&str, String> = accepted
        .iter()
        .map(|m| (m.text.as_str(), m.id.to_string()))
        .collect();
    for row in rows(&db).await {
        let text = String::from_utf8(row.text).unwrap();
        assert_eq!(
            row.mews_message_id.as_ref(),
            ids.get(text.as_str()),
            "{text}"
        );
    }

    // Idle, nothing in flight: the promise is an exit within a second (it
    // takes ~30 ms here; the deadline leaves room for a loaded machine).
    let asked = Instant::now();
    daemon.signal("TERM");
    let status = daemon.wait_exit(Duration::from_secs(1)).await;
    let took = asked.elapsed();
    assert!(status.success(), "{status}");
    println!("sigterm_to_exit_ms={}", took.as_millis());
}

#[tokio::test]
async fn the_command_line_enqueues_reports_status_and_checks_config_without_tokens() {
    let fake = FakeMews::start().await;
    let env = Env::new(&fake.base_url);
    let thread = threads(&fake, 1).remove(0);

    // Commands other than `migrate` and `run` never create an empty outbox.
    for command in [
        &["status"][..],
        &["enqueue", "--thread", &thread, "--text", "x"],
    ] {
        let (failed, _, err) = env.cli(command).await;
        assert!(!failed.success());
        assert!(err.contains("there is no outbox database at"), "{err}");
    }
    assert!(!env.db.exists());
    assert!(env.cli(&["migrate"]).await.0.success());

    let (ok, id, _) = env
        .cli(&[
            "enqueue",
            "--thread",
            &thread.to_uppercase(),
            "--text",
            "hi",
            "--identifier",
            "k1",
        ])
        .await;
    assert!(ok.success());
    assert_eq!(id.trim(), "1");
    let (ok, again, note) = env
        .cli(&[
            "enqueue",
            "--thread",
            &thread,
            "--text",
            "hi",
            "--identifier",
            "k1",
        ])
        .await;
    assert!(ok.success());
    assert_eq!(again.trim(), "1", "the same identifier enqueues once");
    assert!(note.contains("exists already"), "{note}");
    let (failed, _, err) = env
        .cli(&[
            "enqueue",
            "--thread",
            &thread,
            "--text",
            "hi",
            "--account",
            "nowhere",
        ])
        .await;
    assert!(!failed.success());
    assert!(
        err.contains("account \"nowhere\" is not configured"),
        "{err}"
    );

    let (ok, json, _) = env.cli(&["status", "--json"]).await;
    assert!(ok.success());
    let report: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(report["totals"]["pending"], 1);
    assert_eq!(report["accounts"][0]["account"], "default");
    let (ok, text, _) = env.cli(&["status"]).await;
    assert!(ok.success() && text.contains("default"), "{text}");

    let (ok, shown, _) = env.cli(&["check-config"]).await;
    assert!(ok.success());
    assert!(shown.contains("client_token = \"<redacted>\""), "{shown}");
    assert!(!shown.contains(crate::support::daemon::CLIENT_TOKEN) && !shown.contains(ACCESS_TOKEN));

    std::fs::write(&env.config, "[delivery]\nbatch_size = 5000\n").unwrap();
    let (bad, _, err) = env.cli(&["check-config"]).await;
    assert_eq!(bad.code(), Some(2));
    assert!(
        err.contains("delivery.batch_size") && err.lines().count() == 1,
        "{err}"
    );
}

/// Every endpoint the daemon calls gets `Content-Type: application/json`
/// (Mews's documented request format) and the `Client` of the body as the
/// `User-Agent`: `messages/add`, the read-back `messages/getAll` after a
/// lost answer, and `configuration/get` of `check-config --online`.
#[tokio::test]
async fn every_request_to_mews_is_json_whatever_the_endpoint() {
    use crate::support::fake_mews::{ADD_PATH, CONFIGURATION_PATH, GET_ALL_PATH};
    let fake = FakeMews::start().await;
    // The answer is lost after storing: the daemon reads back with getAll.
    fake.script([Fault::DropAfterStore]);
    let env = Env::new(&fake.base_url);
    let db = env.producer().await;
    insert_rows(&db, 2, &threads(&fake, 2), "typed").await;
    let mut daemon = env.start();
    wait_for_status(&db, "delivered", 2).await;
    daemon.wait_for_log("reconciled=2").await;
    let (status, out, err) = env.cli(&["check-config", "--online"]).await;
    assert!(status.success(), "{out}{err}");

    let requests = fake.all_requests();
    for path in [ADD_PATH, GET_ALL_PATH, CONFIGURATION_PATH] {
        assert!(
            requests.iter().any(|r| r.path == path),
            "no request to {path}: {:?}",
            requests.iter().map(|r| &r.path).collect::<Vec<_>>()
        );
    }
    for r in &requests {
        assert_eq!(
            r.header("content-type"),
            Some("application/json"),
            "{} {}",
            r.method,
            r.path
        );
        assert!(!r.client.is_empty(), "{}: no Client in the body", r.path);
        assert_eq!(
            r.header("user-agent"),
            Some(r.client.as_str()),
            "{}",
            r.path
        );
    }
}
