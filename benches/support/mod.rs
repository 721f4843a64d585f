//! What the drain benchmarks share: the lean fake Mews, the daemon process,
//! and reading a process's CPU time and peak RSS from `/proc`.

// Each bench uses only part of it.
#![allow(dead_code)]

use std::borrow::Cow;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde::Deserialize;
use tokio::sync::watch;

pub const DAEMON: &str = env!("CARGO_BIN_EXE_mews-outbox");
const ADD_PATH: &str = "/api/connector/v1/messages/add";
const ADD_THREAD_PATH: &str = "/api/connector/v1/messageThreads/add";
/// Generous bound on every wait, so a broken daemon ends the run.
pub const WAIT: Duration = Duration::from_secs(600);

pub fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// utime + stime of a process, in clock ticks.
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read stat");
    // Fields after the command name (which may hold spaces) start at ") ".
    let after = &stat[stat.rfind(')').expect("stat format") + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 here.
    fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
}

pub fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

pub fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

/// The real daemon binary, its stderr read on a thread.
pub struct Daemon {
    child: Child,
    ready: std::sync::mpsc::Receiver<()>,
    tail: Arc<Mutex<Vec<String>>>,
}

impl Daemon {
    pub fn start(config: &Path) -> Daemon {
        let mut child = Command::new(DAEMON)
            .arg("--config")
            .arg(config)
            .arg("run")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn mews-outbox");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, ready) = std::sync::mpsc::channel();
        let tail = Arc::new(Mutex::new(Vec::new()));
        let kept = tail.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("ready: delivering") {
                    let _ = tx.send(());
                }
                if !line.contains("\"messages/add\"") {
                    let mut kept = kept.lock().expect("tail");
                    if kept.len() >= 100 {
                        kept.remove(0);
                    }
                    kept.push(line);
                }
            }
        });
        Daemon { child, ready, tail }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn wait_ready(&mut self) {
        if self.ready.recv_timeout(WAIT).is_err() {
            panic!(
                "the daemon did not become ready:\n{}",
                self.tail.lock().expect("tail").join("\n")
            );
        }
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn stop(mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .status();
        let status = self.child.wait().expect("wait for the daemon");
        // What the daemon warned about is part of the figures' story
        // (a lease lost under load, a takeover mid-drain).
        for line in self.tail.lock().expect("tail").iter() {
            if line.contains("WARN") || line.contains("ERROR") {
                eprintln!("daemon {}: {line}", self.child.id());
            }
        }
        assert!(
            status.success(),
            "the daemon exited with {status}:\n{}",
            self.tail.lock().expect("tail").join("\n")
        );
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A fake Mews that answers `messages/add` at once: parses the body, returns
/// one added message per item with its Identifier. Keeps only counters (and,
/// while asked to, arrival times per Identifier), so memory stays flat.
pub struct LeanMews {
    addr: SocketAddr,
    state: Arc<FakeState>,
}

#[derive(Default)]
pub struct FakeState {
    first_request: OnceLock<Instant>,
    requests: AtomicU64,
    messages: AtomicU64,
    threads: AtomicU64,
    serial: AtomicU64,
    recording: AtomicBool,
    arrivals: Mutex<Vec<(i64, u128)>>,
    answered: OnceLock<watch::Sender<u64>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct AddRequest<'a> {
    #[serde(borrow)]
    messages: Vec<AddItem<'a>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct AddItem<'a> {
    #[serde(borrow)]
    message_thread_id: Cow<'a, str>,
    #[serde(borrow)]
    text: Cow<'a, str>,
    #[serde(borrow)]
    identifier: Option<Cow<'a, str>>,
}

impl LeanMews {
    pub async fn start() -> LeanMews {
        let state = Arc::new(FakeState::default());
        let (tx, _) = watch::channel(0);
        let _ = state.answered.set(tx);
        let app = Router::new()
            .route(ADD_PATH, post(add))
            .route(ADD_THREAD_PATH, post(add_thread))
            .layer(DefaultBodyLimit::max(64 * 1024 * 1024))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        LeanMews { addr, state }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn first_request(&self) -> Option<Instant> {
        self.state.first_request.get().copied()
    }

    pub fn requests(&self) -> u64 {
        self.state.requests.load(Ordering::Relaxed)
    }

    pub fn messages(&self) -> u64 {
        self.state.messages.load(Ordering::SeqCst)
    }

    /// Threads created by `messageThreads/add`.
    pub fn threads(&self) -> u64 {
        self.state.threads.load(Ordering::Relaxed)
    }

    pub fn record_arrivals(&self, on: bool) {
        self.state.recording.store(on, Ordering::SeqCst);
    }

    pub fn take_arrivals(&self) -> Vec<(i64, u128)> {
        std::mem::take(&mut *self.state.arrivals.lock().expect("arrivals"))
    }

    /// Waits until the fake has answered `n` messages in all.
    pub async fn wait_for_messages(&self, n: u64) -> u64 {
        let mut answered = self.state.answered.get().expect("watch").subscribe();
        let reached = tokio::time::timeout(WAIT, answered.wait_for(|m| *m >= n)).await;
        match reached {
            Ok(Ok(m)) => *m,
            _ => panic!("the fake saw {} of {n} messages", self.messages()),
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct AddThreadRequest<'a> {
    #[serde(borrow)]
    original_sender: Cow<'a, str>,
    #[serde(borrow)]
    subject: Cow<'a, str>,
}

/// `messageThreads/add`: a new thread, numbered in its own uuid range.
async fn add_thread(State(state): State<Arc<FakeState>>, body: Bytes) -> Response {
    state.requests.fetch_add(1, Ordering::Relaxed);
    let request: AddThreadRequest<'_> = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) => {
            return (StatusCode::BAD_REQUEST, format!(r#"{{"Message":"{e}"}}"#)).into_response();
        }
    };
    let n = state.threads.fetch_add(1, Ordering::Relaxed);
    let created = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    let thread = serde_json::json!({
        "Id": format!("7f9325f6-0000-4000-8000-{n:012x}"),
        "OriginalSender": request.original_sender,
        "Subject": request.subject,
        "CreatedUtc": created,
        "UpdatedUtc": created,
        "IsResolved": false,
    });
    (
        StatusCode::OK,
        [
            ("content-type", "application/json"),
            ("request-id", "bench"),
        ],
        serde_json::json!({ "MessageThreads": [thread] }).to_string(),
    )
        .into_response()
}

async fn add(State(state): State<Arc<FakeState>>, body: Bytes) -> Response {
    let arrived = Instant::now();
    let arrived_ns = now_ns();
    let _ = state.first_request.set(arrived);
    state.requests.fetch_add(1, Ordering::Relaxed);
    let request: AddRequest<'_> = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) => {
            return (StatusCode::BAD_REQUEST, format!(r#"{{"Message":"{e}"}}"#)).into_response();
        }
    };
    let count = request.messages.len() as u64;
    let serial = state.serial.fetch_add(count, Ordering::Relaxed);
    let created = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    let mut out = String::with_capacity(64 + request.messages.len() * 256);
    out.push_str(r#"{"Messages":["#);
    for (k, item) in request.messages.iter().enumerate() {
        if k > 0 {
            out.push(',');
        }
        out.push_str(r#"{"Identifier":"#);
        match &item.identifier {
            Some(id) => {
                let _ = write!(out, "{:?}", id.as_ref());
            }
            None => out.push_str("null"),
        }
        let _ = write!(
            out,
            r#","Message":{{"Id":"{:08x}-0000-4000-8000-{:012x}","MessageThreadId":"{}","Text":{},"Sender":{{"Discriminator":"Application","Value":null}},"CreatedUtc":"{created}"}}}}"#,
            serial >> 32,
            (serial + k as u64) & 0xffff_ffff_ffff,
            item.message_thread_id,
            serde_json::to_string(item.text.as_ref()).unwrap_or_default(),
        );
    }
    out.push_str("]}");
    if state.recording.load(Ordering::SeqCst) {
        let mut arrivals = state.arrivals.lock().expect("arrivals");
        for item in &request.messages {
            if let Some(id) = item.identifier.as_deref().and_then(|i| i.parse().ok()) {
                arrivals.push((id, arrived_ns));
            }
        }
    }
    let total = state.messages.fetch_add(count, Ordering::SeqCst) + count;
    if let Some(answered) = state.answered.get() {
        answered.send_replace(total);
    }
    (
        StatusCode::OK,
        [
            ("content-type", "application/json"),
            ("request-id", "bench"),
        ],
        out,
    )
        .into_response()
}
