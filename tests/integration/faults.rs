//! The promise under faults: no message lost, none sent twice unless the
//! network made it unavoidable, bad input answered without hurting the rest.
//! Each scenario runs the real binary against a real SQLite file and a fake
//! Mews that injects faults from a seeded schedule, and prints its figures.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use crate::support::daemon::{
    Env, WAIT, count, insert_rows, rows, threads, wait_for_status_within,
};

/// Limit for the large scenarios (debug build, a loaded 2-core machine).
const LONG: Duration = Duration::from_secs(300);
use crate::support::fake_mews::{FakeMews, Fault, RetryAfter, StoredMessage};

/// Messages stored more than once, by text.
fn duplicates(accepted: &[StoredMessage]) -> HashMap<String, usize> {
    let mut seen: HashMap<String, usize> = HashMap::new();
    for m in accepted {
        *seen.entry(m.text.clone()).or_default() += 1;
    }
    seen.retain(|_, n| *n > 1);
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_sigkill_at_random_points_loses_nothing() {
    crash_scenario(20_000, 20, 20261128).await;
}

/// The long variant: `cargo test --test integration faults:: -- --ignored`:
/// 200,000 rows and 100 kills (about 200 s here). CI runs it smaller, sized by
/// `LONG_CRASH_ROWS` and `LONG_CRASH_KILLS` (see `.ci/run`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: 200,000 rows and 100 kills unless LONG_CRASH_ROWS/LONG_CRASH_KILLS say otherwise"]
async fn crash_long_sigkill_100_times_loses_nothing() {
    let size = |name: &str, default: usize| match std::env::var(name) {
        Ok(value) => value
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value:?} is not a number")),
        Err(_) => default,
    };
    crash_scenario(
        size("LONG_CRASH_ROWS", 200_000),
        size("LONG_CRASH_KILLS", 100),
        1,
    )
    .await;
}

async fn crash_scenario(rows_total: usize, kills_max: usize, seed: u64) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let fake = FakeMews::start().await;
    let env = Env::with(&fake.base_url, &[("batch_size", "200")], "");
    let db = env.producer().await;
    insert_rows(&db, rows_total, &threads(&fake, 2_000), "crash").await;

    // Kill after a random number of answered requests, restart, repeat.
    let mut in_flight_at_a_kill: HashSet<i64> = HashSet::new();
    let mut kills = 0;
    for _ in 0..kills_max {
        let mut daemon = env.start();
        let answered = fake.requests().len();
        let target = answered + rng.usize(1..=4);
        fake.wait_for_requests(target, WAIT).await;
        daemon.crash().await;
        kills += 1;
        let sending: Vec<i64> =
            sqlx::query_scalar("SELECT id FROM outbox WHERE status = 'sending'")
                .fetch_all(&db)
                .await
                .unwrap();
        in_flight_at_a_kill.extend(sending);
        if count(&db, "delivered").await as usize == rows_total {
            break;
        }
    }
    let _last = env.start();
    wait_for_status_within(&db, "delivered", rows_total as i64, LONG).await;

    let accepted = fake.accepted();
    let dups = duplicates(&accepted);
    let rows = rows(&db).await;
    let by_text: HashMap<String, i64> = rows
        .iter()
        .map(|r| (String::from_utf8_lossy(&r.text).into_owned(), r.id))
        .collect();
    for text in dups.keys() {
        assert!(
            in_flight_at_a_kill.contains(&by_text[text]),
            "{text} was sent twice but was not in flight at any kill"
        );
    }
    let unique: HashSet<&str> = accepted.iter().map(|m| m.text.as_str()).collect();
    assert_eq!(unique.len(), rows_total, "every row reached Mews");
    assert!(
        dups.is_empty(),
        "reconciliation (on by default) leaves no duplicate: {} texts",
        dups.len()
    );
    // No duplicates: each text has one Mews Id, and its row holds it.
    let ids: HashMap<&str, String> = accepted
        .iter()
        .map(|m| (m.text.as_str(), m.id.to_string()))
        .collect();
    for r in &rows {
        let text = String::from_utf8_lossy(&r.text);
        assert_eq!(r.status, "delivered", "{text}");
        assert_eq!(r.mews_message_id.as_ref(), ids.get(&*text), "{text}");
    }
    println!(
        "crash: rows={rows_total} delivered={} dead=0 kills={kills} in_flight_at_kills={} duplicates={}",
        rows.len(),
        in_flight_at_a_kill.len(),
        dups.values().map(|n| n - 1).sum::<usize>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_every_row_ends_delivered_or_dead_and_retry_after_is_honoured() {
    const ROWS: usize = 2_000;
    let mut rng = fastrand::Rng::with_seed(7);
    let fake = FakeMews::start().await;
    let mut faults = Vec::new();
    // Both forms of Retry-After, written when the fake answers (a date made
    // now would be past by the time it is sent, and prove nothing).
    let retry_after = |rng: &mut fastrand::Rng| {
        let ahead = Duration::from_secs(rng.u64(1..=4));
        if rng.bool() {
            RetryAfter::Seconds(ahead)
        } else {
            RetryAfter::DateIn(ahead)
        }
    };
    for _ in 0..60 {
        faults.push(match rng.u8(0..10) {
            0 => Fault::status(500),
            1 => Fault::status(503),
            2 => Fault::status(408),
            3 => Fault::status_retry_at(429, RetryAfter::Seconds(Duration::from_secs(1))),
            4 => Fault::status_retry_at(429, retry_after(&mut rng)),
            5 => Fault::status(429),
            6 => Fault::DropBeforeStore,
            7 => Fault::DropAfterStore,
            // Answered after the client gave up (request_timeout 1s), stored before
            // the read-back (no earlier than request_timeout after the timeout).
            8 => Fault::DelayThenNormal(Duration::from_millis(1_500)),
            _ => Fault::StoreThenStatus(502),
        });
        // Some normal answers between the faults.
        for _ in 0..rng.usize(0..2) {
            faults.push(Fault::DelayThenNormal(Duration::ZERO));
        }
    }
    // Read-backs are throttled too (other getAll failures would re-send
    // unchecked, and this scenario promises no duplicate).
    let mut get_all_faults = Vec::new();
    for _ in 0..12 {
        get_all_faults.push(match rng.u8(0..3) {
            0 => Fault::status_retry_at(429, retry_after(&mut rng)),
            1 => Fault::status(429),
            _ => Fault::DelayThenNormal(Duration::ZERO),
        });
    }
    let injected = faults.len() + get_all_faults.len();
    fake.script(faults);
    fake.script_get_all(get_all_faults);
    let env = Env::with(
        &fake.base_url,
        &[
            ("batch_size", "100"),
            ("max_attempts", "1000"),
            ("request_timeout", "\"1s\""),
        ],
        "",
    );
    let db = env.producer().await;
    insert_rows(&db, ROWS, &threads(&fake, 500), "chaos").await;

    let _daemon = env.start();
    wait_for_status_within(&db, "delivered", ROWS as i64, LONG).await;
    assert_eq!(count(&db, "dead").await, 0);

    let requests = fake.add_requests();
    // No request, on any endpoint, arrives before a Retry-After the fake
    // sent has ended (the fake checks each arrival against the latest one).
    let all = fake.all_requests();
    let with_header = all
        .iter()
        .filter(|r| r.status == 429 && r.retry_after.is_some())
        .count();
    assert!(
        with_header >= 10,
        "the schedule exercises Retry-After: {with_header}"
    );
    assert!(
        all.iter()
            .any(|r| r.path == crate::support::fake_mews::GET_ALL_PATH && r.status == 429),
        "and 429s on read-backs"
    );
    assert_eq!(
        fake.retry_after_violations(),
        0,
        "requests sent before Mews's Retry-After ended"
    );
    // A 429 without Retry-After pauses at least pause_base (100ms here): the
    // next request is no sooner.
    for (i, r) in all.iter().enumerate() {
        if r.status == 429
            && r.retry_after.is_none()
            && let Some(next) = all.get(i + 1)
        {
            assert!(
                next.arrived >= r.arrived + Duration::from_millis(100),
                "request {i}: a 429 without Retry-After was followed after {:?}",
                next.arrived - r.arrived
            );
        }
    }
    // Duplicates only where the fake stored and then did not answer 200.
    let ambiguous: HashSet<uuid::Uuid> = requests
        .iter()
        .filter(|r| r.status != 200)
        .flat_map(|r| r.stored_ids.iter().copied())
        .collect();
    let accepted = fake.accepted();
    let dups = duplicates(&accepted);
    for m in &accepted {
        if dups.contains_key(&m.text) {
            let copies: Vec<_> = accepted.iter().filter(|o| o.text == m.text).collect();
            let unanswered = copies.iter().filter(|c| ambiguous.contains(&c.id)).count();
            assert!(
                unanswered >= copies.len() - 1,
                "{} stored {} times, {unanswered} of them unanswered",
                m.text,
                copies.len()
            );
        }
    }
    let unique: HashSet<&str> = accepted.iter().map(|m| m.text.as_str()).collect();
    assert_eq!(unique.len(), ROWS);
    assert!(
        dups.is_empty(),
        "reconciliation (on by default) leaves no duplicate: {dups:?}"
    );
    println!(
        "chaos: rows={ROWS} delivered={ROWS} dead=0 requests={} read_backs={} faults_injected={injected} retry_after_429s={with_header} retry_after_violations=0 duplicates={}",
        requests.len(),
        all.len() - requests.len(),
        dups.values().map(|n| n - 1).sum::<usize>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_only_the_rejected_messages_end_dead() {
    const ROWS: usize = 5_000;
    let fake = FakeMews::start().await;
    // One message in every 500 is refused, with a 403 for its whole request.
    fake.set_poison(|text| {
        text.trim_start_matches("poison ")
            .parse::<usize>()
            .is_ok_and(|n| n % 500 == 250)
    });
    let env = Env::new(&fake.base_url);
    let db = env.producer().await;
    insert_rows(&db, ROWS, &threads(&fake, ROWS), "poison").await;

    let _daemon = env.start();
    // Each poisoned message costs up to ~20 bisection requests: on a loaded
    // two-core runner that can outlast the usual 30 s wait, so this is a
    // large scenario's limit (a hang still fails; the request-count bound
    // below is what measures the cost).
    wait_for_status_within(&db, "dead", 10, LONG).await;
    wait_for_status_within(&db, "delivered", (ROWS - 10) as i64, LONG).await;

    let mut dead: Vec<usize> = Vec::new();
    for row in rows(&db).await.iter().filter(|r| r.status == "dead") {
        let text = String::from_utf8_lossy(&row.text);
        let n: usize = text.trim_start_matches("poison ").parse().unwrap();
        dead.push(n);
        let error = row.last_error.as_deref().unwrap();
        assert!(
            error.contains("HTTP 403: poisoned") && error.contains("RequestId"),
            "{error}"
        );
    }
    dead.sort_unstable();
    let poisoned: Vec<usize> = (0..ROWS).filter(|n| n % 500 == 250).collect();
    assert_eq!(dead, poisoned, "exactly the poisoned rows are dead");
    let requests = fake.add_requests().len();
    let baseline = ROWS.div_ceil(1000);
    let bound = baseline + 10 * 2 * 10; // 2·log2(1000) ≈ 20 extra per poison message
    assert!(requests <= bound, "{requests} requests, bound {bound}");
    println!(
        "poison: rows={ROWS} delivered={} dead=10 requests={requests} bound={bound}",
        ROWS - 10
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contention_four_producer_processes_and_the_daemon_never_fail() {
    const PER_PRODUCER: usize = 25_000;
    let fake = FakeMews::start().await;
    let env = Env::new(&fake.base_url);
    let db = env.producer().await;
    let _daemon = env.start().ready().await;

    let script = r#"
import sqlite3, sys, uuid, random
seed, n = int(sys.argv[2]), int(sys.argv[3])
random.seed(seed)
db = sqlite3.connect(sys.argv[1], timeout=60, isolation_level=None)
threads = sys.argv[4].split(",")  # 1000, registered with the fake
i = 0
while i < n:
    size = min(random.randint(1, 200), n - i)
    db.execute("BEGIN IMMEDIATE")
    for _ in range(size):
        db.execute("INSERT INTO outbox (message_thread_id, text) VALUES (?, ?)",
                   (threads[i % len(threads)], "p%d-%d" % (seed, i)))
        i += 1
    db.execute("COMMIT")
"#;
    // All four run at once; each is awaited in turn.
    let producers: Vec<_> = (0..4)
        .map(|seed| {
            tokio::process::Command::new("python3")
                .arg("-c")
                .arg(script)
                .arg(&env.db)
                .arg(seed.to_string())
                .arg(PER_PRODUCER.to_string())
                .arg(threads(&fake, 1000).join(","))
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("python3")
        })
        .collect();
    for producer in producers {
        let output = producer.wait_with_output().await.expect("producer");
        assert!(
            output.status.success(),
            "producer failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let total = 4 * PER_PRODUCER;
    wait_for_status_within(&db, "delivered", total as i64, LONG).await;
    let accepted = fake.accepted();
    assert_eq!(accepted.len(), total, "each row delivered once");
    assert!(duplicates(&accepted).is_empty());
    println!(
        "contention: producers=4 rows={total} delivered={total} duplicates=0 producer_errors=0"
    );
}
