//! The PostgreSQL drain benchmark (issue 12): how fast 1, 2 and 3 real
//! daemons together empty one shared outbox, as a ratio to a PostgreSQL
//! floor, how soon a fresh row leaves, and what each daemon costs.
//!
//! `cargo bench --bench pg_drain -- [--messages N] [--daemons 1,2,3] [--quick]`
//! (`cargo test --all-targets` runs it too, as a smoke test on 1,200 rows)
//!
//! A throwaway cluster is started as the tests start theirs
//! (`tests/integration/support/postgres.rs`: `initdb` and `pg_ctl` as the
//! `postgres` user when root, a Unix socket only, `fsync=off`). Then:
//! 1. **floor**: N rows over 1,000 threads and 6 accounts in a database of
//!    their own, drained in process by one [`PgStore`] handle holding
//!    every account with the daemon's own statements (`claim_within` of
//!    1,000 rows, `record` as delivered), without HTTP;
//! 2. for each fleet size D: a fresh database, D `mews-outbox run`
//!    processes (lease 6 s) against a lean fake Mews on 127.0.0.1
//!    (`support::LeanMews`), waited for until they share the 6 accounts
//!    evenly (rebalancing included), then N rows committed in one
//!    statement: **drain** from the fake's first request to the last row
//!    `delivered`; **latency**: rows inserted one at a time 5–20 ms apart
//!    on one connection, commit → arrival at the fake (LISTEN/NOTIFY);
//!    **idle** CPU of each daemon over 10 s; **peak RSS** of each daemon.
//!
//! Figures are printed `name=value` on stdout; progress on stderr. There
//! are no timing assertions.

// A benchmark harness, like a test: a failed step should stop it loudly.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod support;

// The tests' throwaway cluster, used as it is.
#[allow(dead_code)]
#[path = "../tests/integration/support/postgres.rs"]
mod postgres;

use std::fmt::Write as _;
use std::time::{Duration, Instant, SystemTime};

use mews_outbox::store::postgres::{PgOptions, PgStore};
use mews_outbox::store::{Outbox, RowOutcome};
use sqlx::PgPool;
use support::{
    Daemon, LeanMews, WAIT, clock_ticks_per_second, cpu_ticks, now_ns, peak_rss_kib, percentile,
};

const THREADS: usize = 1000;
const ACCOUNTS: [&str; 6] = ["a0", "a1", "a2", "a3", "a4", "a5"];
/// The daemon's default `delivery.batch_size`, for the floor's claims.
const BATCH: usize = 1000;
/// The daemon's default `delivery.max_request_bytes` (4 MiB).
const MAX_BYTES: usize = 4 * 1024 * 1024;

#[derive(Debug, Clone)]
struct Options {
    messages: usize,
    quick: bool,
    fleets: Vec<usize>,
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let options = match parse_args(&args) {
        Ok(options) => options,
        Err(e) => {
            eprintln!(
                "pg_drain: {e}\nusage: cargo bench --bench pg_drain -- [--messages N] [--daemons 1,2,3] [--quick]"
            );
            std::process::exit(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(run(options));
}

fn parse_args(args: &[String]) -> Result<Options, String> {
    let mut options = Options {
        messages: 200_000,
        quick: false,
        fleets: vec![1, 2, 3],
    };
    // Without --bench (`cargo test --all-targets`): a quick smoke test.
    if !args.iter().any(|a| a == "--bench") {
        options.messages = 1_200;
        options.quick = true;
    }
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--bench" => {}
            "--quick" => options.quick = true,
            "--messages" => {
                let n = args.next().ok_or("--messages needs a number")?;
                options.messages = n
                    .replace('_', "")
                    .parse()
                    .map_err(|_| format!("--messages: not a number: {n}"))?;
            }
            "--daemons" => {
                let list = args.next().ok_or("--daemons needs a list such as 1,2,3")?;
                options.fleets = list
                    .split(',')
                    .map(|d| d.trim().parse().map_err(|_| format!("--daemons: {list}")))
                    .collect::<Result<_, _>>()?;
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if options.messages == 0 || options.fleets.contains(&0) {
        return Err("--messages and --daemons must be at least 1".into());
    }
    Ok(options)
}

async fn run(options: Options) {
    let started = Instant::now();
    let cluster = tokio::task::spawn_blocking(postgres::OwnCluster::start)
        .await
        .expect("start the cluster");
    eprintln!(
        "pg_drain: {} messages, cluster started in {:.1} s",
        options.messages,
        started.elapsed().as_secs_f64()
    );
    let threads = thread_ids();

    let db = cluster.database().await;
    // A lease longer than the floor takes (it does not renew).
    let floor_options = PgOptions {
        lease: Duration::from_secs(3600),
        ..PgOptions::default()
    };
    let store = PgStore::connect(&db.url, floor_options)
        .await
        .expect("migrate the floor's database");
    let filled = Instant::now();
    prefill(store.pool(), options.messages, &threads).await;
    eprintln!(
        "prefill: {} rows in {:.1} s",
        options.messages,
        filled.elapsed().as_secs_f64()
    );
    let floor_rate = floor(&store, options.messages).await;
    store.close().await;
    // Each phase on a cluster of its own making: the previous phase's
    // churned database, left in place, is vacuumed beside the next drain
    // and made the fleet figures swing threefold between runs.
    cluster.drop_database(db).await;
    println!("floor_msgs_per_s={floor_rate:.0}");

    for &daemons in &options.fleets {
        fleet(&cluster, &options, daemons, &threads, floor_rate).await;
    }
}

/// One fleet size: see the module's documentation.
async fn fleet(
    cluster: &postgres::OwnCluster,
    options: &Options,
    daemons: usize,
    threads: &[String],
    floor_rate: f64,
) {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = cluster.database().await;
    let store = PgStore::connect(&db.url, PgOptions::default())
        .await
        .expect("migrate");
    let pool = store.pool().clone();
    let fake = LeanMews::start().await;
    let config = dir.path().join("mews-outbox.toml");
    std::fs::write(&config, daemon_config(&db.url, &fake.base_url())).expect("write config");
    std::fs::set_permissions(&config, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod config");
    let mut fleet: Vec<Daemon> = (0..daemons).map(|_| Daemon::start(&config)).collect();
    for daemon in &mut fleet {
        daemon.wait_ready();
    }
    let balancing = Instant::now();
    wait_balanced(&pool, daemons).await;
    eprintln!(
        "{daemons} daemons: the accounts are shared evenly {:.1} s after the last was ready",
        balancing.elapsed().as_secs_f64()
    );

    prefill(&pool, options.messages, threads).await;
    fake.wait_for_messages(options.messages as u64).await;
    wait_delivered(&pool, options.messages as u64).await;
    let drain_secs = fake
        .first_request()
        .expect("a first request")
        .elapsed()
        .as_secs_f64();
    let rate = options.messages as f64 / drain_secs;
    eprintln!(
        "{daemons} daemons: {} messages in {} requests, last row delivered {drain_secs:.2} s after the first request",
        options.messages,
        fake.requests()
    );
    println!("daemons_{daemons}_drain_msgs_per_s={rate:.0}");
    println!(
        "daemons_{daemons}_drain_to_floor_ratio={:.2}",
        rate / floor_rate
    );

    let latencies = latency(&fake, &pool, &threads[0], options).await;
    println!(
        "daemons_{daemons}_latency_p50_ms={:.2}",
        percentile(&latencies, 0.50)
    );
    println!(
        "daemons_{daemons}_latency_p99_ms={:.2}",
        percentile(&latencies, 0.99)
    );

    let window = Duration::from_secs(if options.quick { 2 } else { 10 });
    let before: Vec<u64> = fleet.iter().map(|d| cpu_ticks(d.pid())).collect();
    tokio::time::sleep(window).await;
    let idle: Vec<f64> = fleet
        .iter()
        .zip(before)
        .map(|(d, before)| {
            (cpu_ticks(d.pid()) - before) as f64 / clock_ticks_per_second() / window.as_secs_f64()
                * 100.0
        })
        .collect();
    println!(
        "daemons_{daemons}_idle_cpu_percent_max={:.2}",
        idle.iter().copied().fold(0.0, f64::max)
    );
    let rss = fleet
        .iter()
        .map(|d| peak_rss_kib(d.pid()))
        .max()
        .unwrap_or(0);
    println!(
        "daemons_{daemons}_peak_rss_mb_max={:.1}",
        rss as f64 / 1024.0
    );
    for daemon in fleet {
        daemon.stop();
    }
    store.close().await;
    cluster.drop_database(db).await;
}

/// The daemons' configuration: the shared database, the fake, six
/// accounts without a client-side rate limit (200 requests / 30 s would
/// bound the drain against the fake).
fn daemon_config(url: &str, base_url: &str) -> String {
    let mut text = format!(
        "[database]\nurl = {url:?}\nlease = \"6s\"\n\n[mews]\nbase_url = \"{base_url}\"\nclient_token = \"bench-client-token\"\n\n[log]\nlevel = \"info\"\nformat = \"json\"\n"
    );
    for account in ACCOUNTS {
        let _ = write!(
            text,
            "\n[accounts.{account}]\naccess_token = \"bench-access-token-{account}\"\nrate_limit = \"off\"\n"
        );
    }
    text
}

/// 1,000 fixed thread ids; thread `t` belongs to account `t % 6`.
fn thread_ids() -> Vec<String> {
    (0..THREADS)
        .map(|t| format!("{t:08x}-0000-4000-8000-{:012x}", t * 7919))
        .collect()
}

/// Row `i` goes to thread `i % 1000`, in one statement (one commit: the
/// daemons wake at once).
async fn prefill(pool: &PgPool, n: usize, threads: &[String]) {
    let accounts: Vec<&str> = (0..threads.len())
        .map(|t| ACCOUNTS[t % ACCOUNTS.len()])
        .collect();
    sqlx::query(
        "INSERT INTO outbox (message_thread_id, text, account)
         SELECT ($1::text[])[i % $3 + 1],
                'Benchmark message ' || i || ': your room is ready.',
                ($2::text[])[i % $3 + 1]
         FROM generate_series(0, $4 - 1) AS i",
    )
    .bind(threads)
    .bind(&accounts)
    .bind(i64::try_from(threads.len()).expect("threads"))
    .bind(i64::try_from(n).expect("n"))
    .execute(pool)
    .await
    .expect("prefill");
}

/// The floor: one handle holding every account, the daemon's own claim and
/// record statements, per account in turn, without HTTP.
async fn floor(store: &PgStore, n: usize) -> f64 {
    let acquired = store
        .acquire_accounts(&ACCOUNTS, ACCOUNTS.len())
        .await
        .expect("acquire");
    assert_eq!(acquired.len(), ACCOUNTS.len());
    let started = Instant::now();
    let (mut claiming, mut recording) = (Duration::ZERO, Duration::ZERO);
    let mut done = 0usize;
    let mut serial = 0u64;
    loop {
        let mut claimed_any = false;
        for account in ACCOUNTS {
            let claim_started = Instant::now();
            let rows = store
                .claim_within(account, SystemTime::now(), BATCH, MAX_BYTES)
                .await
                .expect("claim");
            claiming += claim_started.elapsed();
            if rows.is_empty() {
                continue;
            }
            claimed_any = true;
            let created = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
            let outcomes: Vec<(i64, RowOutcome)> = rows
                .iter()
                .map(|row| {
                    serial += 1;
                    (
                        row.id,
                        RowOutcome::Delivered {
                            mews_message_id: format!("{serial:08x}-0000-4000-8000-000000000000"),
                            mews_created_utc: created.clone(),
                            mews_sender: "Application".into(),
                        },
                    )
                })
                .collect();
            let record_started = Instant::now();
            store
                .record(&outcomes, SystemTime::now())
                .await
                .expect("record");
            recording += record_started.elapsed();
            done += rows.len();
        }
        if !claimed_any {
            break;
        }
    }
    assert_eq!(done, n, "the floor delivered every row");
    eprintln!("floor: claims {claiming:.2?}, records {recording:.2?}");
    n as f64 / started.elapsed().as_secs_f64()
}

/// Waits until `daemons` owners hold the six accounts, at most one apart.
async fn wait_balanced(pool: &PgPool, daemons: usize) {
    let deadline = Instant::now() + WAIT;
    loop {
        let held: Vec<i64> = sqlx::query_scalar(
            "SELECT count(*) FROM outbox_account_state
             WHERE lease_owner IS NOT NULL AND lease_until > clock_timestamp()
             GROUP BY lease_owner",
        )
        .fetch_all(pool)
        .await
        .expect("owners");
        let total: i64 = held.iter().sum();
        let (min, max) = (
            held.iter().copied().min().unwrap_or(0),
            held.iter().copied().max().unwrap_or(0),
        );
        if held.len() == daemons.min(ACCOUNTS.len())
            && total == ACCOUNTS.len() as i64
            && max - min <= 1
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the daemons never shared the accounts: {held:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `n` rows are `delivered` (checked every 10 ms).
async fn wait_delivered(pool: &PgPool, n: u64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let delivered: i64 =
            sqlx::query_scalar("SELECT count(*) FROM outbox WHERE status = 'delivered'")
                .fetch_one(pool)
                .await
                .expect("count");
        if delivered as u64 >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "rows not delivered within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Inserts rows one at a time, 5–20 ms apart (autocommit), and matches
/// each commit to its arrival at the fake. Returns the latencies in ms,
/// sorted.
async fn latency(fake: &LeanMews, pool: &PgPool, thread: &str, options: &Options) -> Vec<f64> {
    let rows = if options.quick { 50 } else { 200 };
    fake.record_arrivals(true);
    let answered_before = fake.messages();
    let mut committed = Vec::with_capacity(rows);
    for i in 0..rows {
        tokio::time::sleep(Duration::from_millis(fastrand::u64(5..=20))).await;
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO outbox (message_thread_id, text, account) VALUES ($1, $2, 'a0') RETURNING id",
        )
        .bind(thread)
        .bind(format!("latency probe {i}"))
        .fetch_one(pool)
        .await
        .expect("insert");
        committed.push((id, now_ns()));
    }
    fake.wait_for_messages(answered_before + rows as u64).await;
    fake.record_arrivals(false);
    let arrivals = fake.take_arrivals();
    let mut latencies: Vec<f64> = committed
        .iter()
        .map(|(id, at)| {
            let arrived = arrivals
                .iter()
                .find(|(a, _)| a == id)
                .map(|(_, t)| *t)
                .expect("every probe reached the fake");
            arrived.saturating_sub(*at) as f64 / 1e6
        })
        .collect();
    latencies.sort_by(f64::total_cmp);
    latencies
}
