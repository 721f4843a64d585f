//! The state behind the fake, shared by the handle and the request tasks:
//! options, fault queues, stored messages, request records, rate windows.

use std::collections::{HashMap, VecDeque};
use std::net::Shutdown;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::http::StatusCode;
use tokio::sync::watch;
use uuid::Uuid;

use super::faults::ceil_secs;
use super::records::NewMessage;
use super::reply::Reply;
use super::routes::Envelope;
use super::{FakeOptions, Fault, RequestRecord, RetryAfter, StoredMessage, StoredThread};

pub(super) struct Shared {
    pub(super) state: Mutex<ServerState>,
    /// Arrival sequence numbers, so records are kept in arrival order even
    /// though they are inserted when answered.
    pub(super) next_seq: AtomicU64,
    /// Bumped after every stored message batch and every recorded request.
    pub(super) changed: watch::Sender<u64>,
    /// Duplicate handles of the accepted sockets, for dropping connections.
    pub(super) connections: Mutex<Vec<Arc<std::net::TcpStream>>>,
}

pub(super) struct ServerState {
    pub(super) opts: FakeOptions,
    pub(super) faults: VecDeque<Fault>,
    pub(super) get_all_faults: VecDeque<Fault>,
    pub(super) configuration_faults: VecDeque<Fault>,
    pub(super) threads_add_faults: VecDeque<Fault>,
    pub(super) threads_get_all_faults: VecDeque<Fault>,
    pub(super) stored: Vec<StoredEntry>,
    /// Every thread known, in creation order (each with its `AccessToken`).
    pub(super) threads: Vec<ThreadEntry>,
    pub(super) requests: Vec<(u64, RequestRecord)>,
    /// `messages/add` requests that have arrived, answered or not.
    pub(super) add_arrivals: usize,
    /// Admission times per `AccessToken`, oldest first.
    pub(super) windows: HashMap<String, VecDeque<Instant>>,
    /// Per `AccessToken`: when the latest `Retry-After` sent to it ends.
    pub(super) retry_after_ends: HashMap<String, Instant>,
    /// Until then every request gets `429` with this `Retry-After`.
    pub(super) throttle: Option<(Instant, Option<RetryAfter>)>,
}

pub(super) struct StoredEntry {
    pub(super) msg: StoredMessage,
    pub(super) created: SystemTime,
}

pub(super) struct ThreadEntry {
    pub(super) thread: StoredThread,
    pub(super) created: SystemTime,
}

impl Shared {
    /// Locks the state; a panic elsewhere while locked does not poison it for
    /// the rest of the test.
    pub(super) fn state(&self) -> MutexGuard<'_, ServerState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn opts(&self) -> FakeOptions {
        self.state().opts.clone()
    }

    /// The fake's clock: the real one shifted by `clock_offset_ms`.
    pub(super) fn now(&self) -> SystemTime {
        let offset = self.state().opts.clock_offset_ms;
        let delta = Duration::from_millis(offset.unsigned_abs());
        if offset >= 0 {
            SystemTime::now() + delta
        } else {
            SystemTime::now() - delta
        }
    }

    pub(super) fn notify(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    pub(super) fn records(&self, keep: impl Fn(&str) -> bool) -> Vec<RequestRecord> {
        self.state()
            .requests
            .iter()
            .filter(|(_, r)| keep(&r.path))
            .map(|(_, r)| r.clone())
            .collect()
    }

    pub(super) fn record(&self, seq: u64, record: RequestRecord) {
        {
            let mut st = self.state();
            let at = st.requests.partition_point(|(s, _)| *s < seq);
            st.requests.insert(at, (seq, record));
        }
        self.notify();
    }

    pub(super) fn register_connection(&self, socket: Arc<std::net::TcpStream>) {
        let mut conns = self
            .connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // Only our handle left: that connection has ended.
        conns.retain(|c| Arc::strong_count(c) > 1);
        conns.push(socket);
    }

    pub(super) fn close_connections(&self) {
        let conns = std::mem::take(
            &mut *self
                .connections
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        for c in conns {
            let _ = c.shutdown(Shutdown::Both);
        }
    }

    /// Checks the tokens against `valid_tokens`.
    pub(super) fn authorize(&self, env: &Envelope) -> Result<(), Reply> {
        match &self.state().opts.valid_tokens {
            Some(valid)
                if !valid
                    .iter()
                    .any(|(c, a)| *c == env.client_token && *a == env.access_token) =>
            {
                Err(Reply::error(
                    StatusCode::UNAUTHORIZED,
                    "Invalid access token",
                ))
            }
            _ => Ok(()),
        }
    }

    /// Sliding-window rate limit per `AccessToken`.
    pub(super) fn admit(&self, access_token: &str) -> Result<(), Reply> {
        let mut st = self.state();
        let Some((limit, window)) = st.opts.rate_limit else {
            return Ok(());
        };
        let now = Instant::now();
        let admitted = st.windows.entry(access_token.to_owned()).or_default();
        while admitted
            .front()
            .is_some_and(|&t| now.saturating_duration_since(t) >= window)
        {
            admitted.pop_front();
        }
        if admitted.len() >= limit {
            let wait = admitted
                .front()
                .map_or(window, |&t| (t + window).saturating_duration_since(now));
            let wait = Duration::from_secs(ceil_secs(wait).max(1));
            let retry_after = if st.opts.retry_after_as_date {
                RetryAfter::DateIn(wait)
            } else {
                RetryAfter::Seconds(wait)
            };
            return Err(Reply::Error {
                status: StatusCode::TOO_MANY_REQUESTS,
                message: format!("Too many requests: more than {limit} requests within {window:?}"),
                retry_after: Some(retry_after.render()),
            });
        }
        admitted.push_back(now);
        Ok(())
    }

    /// Adds a thread owned by `access_token`, created now (fake clock).
    pub(super) fn add_thread(
        &self,
        access_token: &str,
        id: Uuid,
        original_sender: &str,
        subject: &str,
    ) -> StoredThread {
        let created = whole_seconds(self.now());
        let thread = StoredThread {
            id,
            access_token: access_token.to_owned(),
            original_sender: original_sender.to_owned(),
            subject: subject.to_owned(),
            created_utc: humantime::format_rfc3339_seconds(created).to_string(),
        };
        self.state().threads.push(ThreadEntry {
            thread: thread.clone(),
            created,
        });
        self.notify();
        thread
    }

    /// The first of `threads` not created with `access_token`, if any.
    pub(super) fn foreign_thread(
        &self,
        access_token: &str,
        threads: impl IntoIterator<Item = Uuid>,
    ) -> Option<Uuid> {
        let st = self.state();
        threads.into_iter().find(|id| {
            !st.threads
                .iter()
                .any(|e| e.thread.id == *id && e.thread.access_token == access_token)
        })
    }

    /// Stores `messages` with fresh ids and the current second as
    /// `CreatedUtc`.
    pub(super) fn store(
        &self,
        access_token: &str,
        messages: Vec<NewMessage>,
    ) -> Vec<StoredMessage> {
        let created = whole_seconds(self.now());
        let created_utc = humantime::format_rfc3339_seconds(created).to_string();
        let stored: Vec<StoredMessage> = messages
            .into_iter()
            .map(|m| StoredMessage {
                id: Uuid::new_v4(),
                message_thread_id: m.thread,
                text: m.text,
                created_utc: created_utc.clone(),
                access_token: access_token.to_owned(),
                identifier: m.identifier,
            })
            .collect();
        self.state()
            .stored
            .extend(stored.iter().map(|msg| StoredEntry {
                msg: msg.clone(),
                created,
            }));
        self.notify();
        stored
    }
}

/// `t` cut to the second, like Mews's `CreatedUtc`.
pub(super) fn whole_seconds(t: SystemTime) -> SystemTime {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    UNIX_EPOCH + Duration::from_secs(secs)
}
