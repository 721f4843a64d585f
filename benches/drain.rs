//! The drain benchmark: how fast the real daemon empties a backlog, how
//! close that is to what SQLite alone can do, how soon a fresh row leaves,
//! what the daemon costs while idle and how fast it starts.
//!
//! `cargo bench --bench drain -- [--messages N] [--quick]`
//! (`cargo test --all-targets` runs it too, as a smoke test on 2,000 rows)
//!
//! Phases, in one run, on one database file:
//! 1. prefill N rows over 1,000 threads and 4 accounts (one transaction);
//! 2. **floor**: the daemon's claim/record statements on a copy of that
//!    file, in process, without HTTP ([`floor`]);
//! 3. **drain**: the real `mews-outbox` binary against a lean fake Mews on
//!    127.0.0.1 ([`LeanMews`]), from its first request to the last row
//!    `delivered`; peak RSS from `/proc/<pid>/status`;
//! 4. **latency**: a producer process (this binary, `--producer`) inserts
//!    rows one at a time, 5–20 ms apart; commit → arrival at the fake;
//!    then **thread latency**: the same for a new conversation, a thread of
//!    `outbox_threads` and its first message in one transaction; commit →
//!    arrival of the message (after `messageThreads/add`) at the fake;
//! 5. **idle**: the daemon's CPU time over 10 s with an empty queue;
//! 6. **startup**: spawn → "ready" on the database now holding N delivered rows.
//!
//! Figures are printed one per line, `name=value`, on stdout; progress on stderr.
//!
//! `cargo bench --bench drain -- --large-rows N` instead drains N rows of
//! 1 MB each (the memory bound of `delivery.max_request_bytes`) and prints
//! the daemon's peak RSS, `large_rows_peak_rss_mb`. Set
//! `MEWS_OUTBOX__DELIVERY__MAX_REQUEST_BYTES` to try another bound.

// A benchmark harness, like a test: a failed step should stop it loudly.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod support;

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use mews_outbox::store::sqlite::sql;
use support::{
    DAEMON, Daemon, LeanMews, WAIT, clock_ticks_per_second, cpu_ticks, now_ns, peak_rss_kib,
    percentile,
};

const THREADS: usize = 1000;
const ACCOUNTS: [&str; 4] = ["a0", "a1", "a2", "a3"];
/// Extra `key = value` lines for every `[accounts.<name>]` section. The
/// client-side rate limiter is off: against the fake, 200 requests / 30 s
/// would bound the drain.
const PER_ACCOUNT_SETTINGS: &[&str] = &["rate_limit = \"off\""];

#[derive(Debug, Clone)]
struct Options {
    messages: usize,
    quick: bool,
    /// Stop after the floor (for profiling the SQL alone).
    floor_only: bool,
    /// Instead of the phases, drain this many rows of 1 MB (peak RSS).
    large_rows: Option<usize>,
}

impl Options {
    fn latency_rows(&self) -> usize {
        if self.quick { 50 } else { 200 }
    }
    fn idle_window(&self) -> Duration {
        Duration::from_secs(if self.quick { 2 } else { 10 })
    }
    fn startup_runs(&self) -> usize {
        if self.quick { 1 } else { 3 }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--producer") {
        producer(&args[1..]);
        return;
    }
    let options = match parse_args(&args) {
        Ok(options) => options,
        Err(e) => {
            eprintln!("drain: {e}\nusage: cargo bench --bench drain -- [--messages N] [--quick]");
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
        messages: 1_000_000,
        quick: false,
        floor_only: false,
        large_rows: None,
    };
    // `cargo bench` passes --bench; `cargo test --all-targets` runs this
    // binary without it: then it is a quick smoke test of every phase.
    if !args.iter().any(|a| a == "--bench") {
        options.messages = 2_000;
        options.quick = true;
    }
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--bench" => {}
            "--quick" => options.quick = true,
            "--floor-only" => options.floor_only = true,
            "--large-rows" => {
                let n = args.next().ok_or("--large-rows needs a number")?;
                options.large_rows = Some(
                    n.replace('_', "")
                        .parse()
                        .map_err(|_| format!("--large-rows: not a number: {n}"))?,
                );
            }
            "--messages" => {
                let n = args.next().ok_or("--messages needs a number")?;
                options.messages = n
                    .replace('_', "")
                    .parse()
                    .map_err(|_| format!("--messages: not a number: {n}"))?;
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if options.messages == 0 {
        return Err("--messages must be at least 1".into());
    }
    Ok(options)
}

async fn run(options: Options) {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("outbox.db");
    let fake = LeanMews::start().await;
    let config = dir.path().join("mews-outbox.toml");
    std::fs::write(&config, daemon_config(&db, &fake.base_url())).expect("write config");
    // It holds tokens: the daemon refuses a world-readable one.
    std::fs::set_permissions(&config, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod config");

    if let Some(n) = options.large_rows {
        migrate(&config);
        large_rows(&config, &db, &fake, n).await;
        return;
    }
    eprintln!("drain: {} messages, daemon {DAEMON}", options.messages);
    migrate(&config);
    let started = Instant::now();
    let threads = thread_ids();
    prefill(&db, options.messages, &threads);
    eprintln!(
        "prefill: {} rows in {:.1} s",
        options.messages,
        started.elapsed().as_secs_f64()
    );

    let floor_db = dir.path().join("floor.db");
    std::fs::copy(&db, &floor_db).expect("copy for the floor");
    let floor_rate = tokio::task::spawn_blocking({
        let n = options.messages;
        move || floor(&floor_db, n)
    })
    .await
    .expect("floor");
    println!("floor_msgs_per_s={floor_rate:.0}");
    if options.floor_only {
        return;
    }

    // Drain.
    let mut daemon = Daemon::start(&config);
    daemon.wait_ready();
    let drained = fake.wait_for_messages(options.messages as u64).await;
    wait_delivered(&db, options.messages as u64);
    let drain_end = Instant::now();
    let first = fake.first_request().expect("a first request");
    let drain_secs = drain_end.duration_since(first).as_secs_f64();
    let drain_rate = options.messages as f64 / drain_secs;
    eprintln!(
        "drain: {drained} messages answered by the fake in {} requests, last row delivered {drain_secs:.2} s after the first request",
        fake.requests()
    );
    println!("drain_msgs_per_s={drain_rate:.0}");
    println!("drain_to_floor_ratio={:.2}", drain_rate / floor_rate);

    // Latency: the daemon is caught up and idle.
    let rows = options.latency_rows();
    let latencies = latency(&fake, &db, &threads[0], rows, options.messages).await;
    print_latencies("latency", &latencies);
    // A new conversation: one messageThreads/add, then the message.
    let latencies = latency(&fake, &db, NEW_THREADS, rows, options.messages + rows).await;
    print_latencies("thread_latency", &latencies);
    eprintln!("threads created by the fake: {}", fake.threads());

    // Idle.
    let window = options.idle_window();
    let before = cpu_ticks(daemon.pid());
    tokio::time::sleep(window).await;
    let after = cpu_ticks(daemon.pid());
    let idle = (after - before) as f64 / clock_ticks_per_second() / window.as_secs_f64() * 100.0;
    println!("idle_cpu_percent={idle:.2}");

    println!(
        "peak_rss_mb={:.1}",
        peak_rss_kib(daemon.pid()) as f64 / 1024.0
    );
    daemon.stop();

    // Start-up on the drained database.
    let mut startups: Vec<f64> = (0..options.startup_runs())
        .map(|_| {
            let spawned = Instant::now();
            let mut daemon = Daemon::start(&config);
            daemon.wait_ready();
            let ms = spawned.elapsed().as_secs_f64() * 1000.0;
            daemon.stop();
            ms
        })
        .collect();
    startups.sort_by(f64::total_cmp);
    eprintln!("startup runs (ms): {startups:.1?}");
    println!("startup_ms={:.1}", startups[startups.len() / 2]);
}

/// Drains `n` rows of 1 MB (1,000,000 letters) over 1,000 threads and
/// prints the daemon's peak RSS: it must follow `delivery.max_request_bytes`,
/// not the backlog.
async fn large_rows(config: &Path, db: &Path, fake: &LeanMews, n: usize) {
    let threads = thread_ids();
    {
        let mut conn = open(db);
        let tx = conn.transaction().expect("begin");
        {
            let mut insert = tx
                .prepare(
                    "INSERT INTO outbox (message_thread_id, text, account) VALUES (?1, ?2, ?3)",
                )
                .expect("prepare insert");
            let letters = "a".repeat(1_000_000);
            for i in 0..n {
                let t = i % threads.len();
                insert
                    .execute((
                        &threads[t],
                        format!("{i}:{letters}"),
                        ACCOUNTS[t % ACCOUNTS.len()],
                    ))
                    .expect("insert");
            }
        }
        tx.commit().expect("commit");
        conn.pragma_update(None, "wal_checkpoint", "TRUNCATE")
            .expect("checkpoint");
    }
    eprintln!("large rows: {n} rows of 1 MB inserted; draining");
    let mut daemon = Daemon::start(config);
    daemon.wait_ready();
    fake.wait_for_messages(n as u64).await;
    wait_delivered(db, n as u64);
    eprintln!("large rows: delivered in {} requests", fake.requests());
    println!("large_rows={n}");
    println!("large_rows_requests={}", fake.requests());
    println!(
        "large_rows_peak_rss_mb={:.1}",
        peak_rss_kib(daemon.pid()) as f64 / 1024.0
    );
    daemon.stop();
}

/// The daemon's configuration. Add per-account keys to [`PER_ACCOUNT_SETTINGS`].
fn daemon_config(db: &Path, base_url: &str) -> String {
    let mut text = format!(
        "[database]\npath = {:?}\n\n[mews]\nbase_url = \"{base_url}\"\nclient_token = \"bench-client-token\"\n\n[log]\nlevel = \"info\"\nformat = \"json\"\n",
        db.display().to_string()
    );
    for account in ACCOUNTS {
        let _ = write!(
            text,
            "\n[accounts.{account}]\naccess_token = \"bench-access-token-{account}\"\n"
        );
        for line in PER_ACCOUNT_SETTINGS {
            let _ = writeln!(text, "{line}");
        }
    }
    text
}

fn migrate(config: &Path) {
    let status = Command::new(DAEMON)
        .arg("--config")
        .arg(config)
        .arg("migrate")
        .stdout(Stdio::null())
        .status()
        .expect("run mews-outbox migrate");
    assert!(status.success(), "mews-outbox migrate failed");
}

/// 1,000 fixed thread ids; thread `t` belongs to account `t % 4`.
fn thread_ids() -> Vec<String> {
    (0..THREADS)
        .map(|t| format!("{t:08x}-0000-4000-8000-{:012x}", t * 7919))
        .collect()
}

fn open(db: &Path) -> rusqlite::Connection {
    let conn = rusqlite::Connection::open(db).expect("open outbox");
    conn.busy_timeout(Duration::from_secs(10))
        .expect("busy_timeout");
    conn.pragma_update(None, "journal_mode", "wal")
        .expect("wal");
    conn.pragma_update(None, "synchronous", "normal")
        .expect("synchronous");
    conn.pragma_update(None, "temp_store", "memory")
        .expect("temp_store");
    conn
}

/// Row `i` goes to thread `i % 1000`, so every thread is 1/1000 of the backlog.
fn prefill(db: &Path, n: usize, threads: &[String]) {
    let mut conn = open(db);
    let tx = conn.transaction().expect("begin");
    {
        let mut insert = tx
            .prepare("INSERT INTO outbox (message_thread_id, text, account) VALUES (?1, ?2, ?3)")
            .expect("prepare insert");
        let mut text = String::new();
        for i in 0..n {
            let t = i % threads.len();
            text.clear();
            let _ = write!(text, "Benchmark message {i}: your room is ready.");
            insert
                .execute((&threads[t], &text, ACCOUNTS[t % ACCOUNTS.len()]))
                .expect("insert");
        }
    }
    tx.commit().expect("commit");
    conn.pragma_update(None, "wal_checkpoint", "TRUNCATE")
        .expect("checkpoint");
}

/// The floor: the same database work as the daemon, without HTTP and with
/// the leanest code: one connection, cached prepared statements, the
/// daemon's own statements ([`sql`]); per account in turn, lease a batch,
/// write the same result columns, one transaction each.
fn floor(db: &Path, n: usize) -> f64 {
    let conn = open(db);
    if let Ok(sql) = std::env::var("BENCH_FLOOR_SQL") {
        conn.execute_batch(&sql).expect("BENCH_FLOOR_SQL");
    }
    let started = Instant::now();
    let mut done = 0usize;
    let mut serial = 0u64;
    let mut json = String::new();
    let (mut claiming, mut recording) = (Duration::ZERO, Duration::ZERO);
    loop {
        let mut claimed_any = false;
        for account in ACCOUNTS {
            let now = timestamp(SystemTime::now());
            let claim_started = Instant::now();
            let rows: Vec<(i64, String, Vec<u8>, i64)> = conn
                .prepare_cached(sql::CLAIM)
                .expect("prepare claim")
                .query_map((account, &now, 1000, 4_194_304i64), |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                })
                .expect("claim")
                .collect::<Result<_, _>>()
                .expect("claimed rows");
            claiming += claim_started.elapsed();
            if rows.is_empty() {
                continue;
            }
            claimed_any = true;
            let now = timestamp(SystemTime::now());
            json.clear();
            json.push('[');
            for (k, (id, _, _, _)) in rows.iter().enumerate() {
                serial += 1;
                if k > 0 {
                    json.push(',');
                }
                let _ = write!(
                    json,
                    r#"[{id},"{serial:08x}-0000-4000-8000-000000000000","{now}","Application"]"#
                );
            }
            json.push(']');
            let record_started = Instant::now();
            conn.prepare_cached(sql::RECORD_DELIVERED)
                .expect("prepare record")
                .execute([&json, &now])
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

fn timestamp(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// Waits until `n` rows are `delivered`, checking whenever the file changes.
fn wait_delivered(db: &Path, n: u64) {
    let conn = open(db);
    let deadline = Instant::now() + WAIT;
    let mut seen_version = -1i64;
    loop {
        let version: i64 = conn
            .query_row("PRAGMA data_version", [], |r| r.get(0))
            .expect("data_version");
        if version != seen_version {
            seen_version = version;
            let delivered: i64 = conn
                .query_row(
                    "SELECT count(*) FROM outbox WHERE status = 'delivered'",
                    [],
                    |r| r.get(0),
                )
                .expect("count");
            if delivered as u64 >= n {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "rows not delivered within {WAIT:?}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn print_latencies(name: &str, sorted: &[f64]) {
    println!("{name}_p50_ms={:.2}", percentile(sorted, 0.50));
    println!("{name}_p99_ms={:.2}", percentile(sorted, 0.99));
    println!("{name}_max_ms={:.2}", sorted.last().copied().unwrap_or(0.0));
}

/// The producer's THREAD argument for "each row in a new thread of its own".
const NEW_THREADS: &str = "new";

/// Runs the producer process (rows into `thread`, or each into a new thread
/// when it is [`NEW_THREADS`]) and matches its commits to the fake's
/// arrivals. Returns the latencies in ms, sorted.
async fn latency(
    fake: &LeanMews,
    db: &Path,
    thread: &str,
    rows: usize,
    delivered_before: usize,
) -> Vec<f64> {
    fake.record_arrivals(true);
    let answered_before = fake.messages();
    let output = tokio::process::Command::new(std::env::current_exe().expect("own path"))
        .arg("--producer")
        .arg(db)
        .arg(rows.to_string())
        .arg(thread)
        .output()
        .await
        .expect("run the producer");
    assert!(output.status.success(), "producer failed: {output:?}");
    fake.wait_for_messages(answered_before + rows as u64).await;
    wait_delivered(db, (delivered_before + rows) as u64);
    fake.record_arrivals(false);
    let arrivals = fake.take_arrivals();
    let mut latencies = Vec::with_capacity(rows);
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let mut parts = line.split_whitespace();
        let (Some(id), Some(committed)) = (parts.next(), parts.next()) else {
            continue;
        };
        let id: i64 = id.parse().expect("producer id");
        let committed: u128 = committed.parse().expect("producer time");
        let arrived = arrivals
            .iter()
            .find(|(a, _)| *a == id)
            .map(|(_, t)| *t)
            .expect("every produced row reached the fake");
        latencies.push(arrived.saturating_sub(committed) as f64 / 1e6);
    }
    assert_eq!(latencies.len(), rows, "one latency per produced row");
    latencies.sort_by(f64::total_cmp);
    latencies
}

/// `--producer DB ROWS THREAD`: inserts ROWS rows one at a time, 5–20 ms
/// apart, printing `id commit_time_ns` (CLOCK_REALTIME) after each commit.
/// With THREAD `new`, each row starts a conversation: a thread of
/// `outbox_threads` and the row naming its `thread_key`, in one transaction.
fn producer(args: &[String]) {
    let [db, rows, thread] = args else {
        eprintln!("usage: drain --producer DB ROWS THREAD|new");
        std::process::exit(2);
    };
    let rows: usize = rows.parse().expect("rows");
    let mut conn = open(Path::new(db));
    let mut out = std::io::stdout().lock();
    for i in 0..rows {
        std::thread::sleep(Duration::from_millis(fastrand::u64(5..=20)));
        let text = format!("latency probe {i}");
        let id: i64 = if thread == NEW_THREADS {
            let key = format!("bench-conversation-{i}");
            let tx = conn.transaction().expect("begin");
            tx.execute(
                "INSERT INTO outbox_threads (thread_key, subject, original_sender, account)
                 VALUES (?1, 'Your stay', 'Front desk', 'a0')",
                [&key],
            )
            .expect("insert the thread");
            let id = tx
                .query_row(
                    "INSERT INTO outbox (thread_key, text, account) VALUES (?1, ?2, 'a0') RETURNING id",
                    (&key, &text),
                    |r| r.get(0),
                )
                .expect("insert the message");
            tx.commit().expect("commit");
            id
        } else {
            conn.prepare_cached(
                "INSERT INTO outbox (message_thread_id, text, account) VALUES (?1, ?2, 'a0') RETURNING id",
            )
            .expect("prepare")
            .query_row((thread, &text), |r| r.get(0))
            .expect("insert")
        };
        let committed = now_ns();
        writeln!(out, "{id} {committed}").expect("stdout");
    }
}
