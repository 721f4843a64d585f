//! An in-memory [`Outbox`], for unit tests of the delivery loop without a
//! database: the same claim rules (due `pending` thread heads of the
//! account, oldest due first, one per thread, at least one row whatever its
//! size) and the same outcome rules (only rows still `sending` change).
//! Threads follow the contract of [`crate::store::thread`]: a row named by
//! `thread_key` takes its thread's Mews id when the thread is created, and
//! is never claimed (nor blocks its thread) before.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::SystemTime;

use super::thread::{HELD_BY_THREAD_PREFIX, held_by_thread, no_such_thread};
use super::{
    AccountPause, ClaimedRow, ClaimedThread, Outbox, RowOutcome, Status, StoreError, ThreadOutcome,
    ThreadStatus,
};

/// One row of the in-memory outbox.
#[derive(Debug, Clone)]
pub struct MemoryRow {
    pub id: i64,
    pub account: String,
    /// The row's Mews thread as the producer named it, if it did.
    pub message_thread_id: Option<String>,
    /// The row's `thread_key`, if it named its thread by key.
    pub thread_key: Option<String>,
    /// The Mews id of its `thread_key`'s thread, once created.
    pub keyed_thread_id: Option<String>,
    pub text: String,
    pub status: Status,
    pub attempts: u32,
    pub next_attempt_at: SystemTime,
    pub needs_reconcile: bool,
    pub first_sent_at: Option<SystemTime>,
    pub last_error: Option<String>,
    pub mews_message_id: Option<String>,
}

/// One row of the in-memory `outbox_threads`.
#[derive(Debug, Clone)]
pub struct MemoryThread {
    pub id: i64,
    pub account: String,
    pub thread_key: String,
    pub subject: String,
    pub original_sender: String,
    pub status: ThreadStatus,
    pub attempts: u32,
    pub next_attempt_at: SystemTime,
    pub needs_reconcile: bool,
    pub first_sent_at: Option<SystemTime>,
    pub last_error: Option<String>,
    pub mews_thread_id: Option<String>,
}

impl MemoryRow {
    /// `coalesce(message_thread_id, keyed_thread_id)`.
    pub fn effective_thread(&self) -> Option<&str> {
        self.message_thread_id
            .as_deref()
            .or(self.keyed_thread_id.as_deref())
    }
}

#[derive(Debug, Default)]
struct State {
    rows: Vec<MemoryRow>,
    threads: Vec<MemoryThread>,
    pauses: HashMap<String, AccountPause>,
    recent: HashMap<String, Vec<SystemTime>>,
    started_by: HashMap<String, SystemTime>,
}

/// Handle to an in-memory outbox. Cheap to clone; clones share the rows.
#[derive(Debug, Clone, Default)]
pub struct MemoryStore {
    state: Arc<Mutex<State>>,
}

impl MemoryStore {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Inserts a `pending` row due at once; returns its id.
    pub fn insert(&self, account: &str, thread: &str, text: &str) -> i64 {
        self.insert_row(account, Some(thread), None, text)
    }

    /// Inserts a `pending` row due at once that names its thread by key
    /// (taking the thread's Mews id at once when it is created already).
    pub fn insert_keyed(&self, account: &str, thread_key: &str, text: &str) -> i64 {
        self.insert_row(account, None, Some(thread_key), text)
    }

    /// Inserts a `pending` thread due at once; returns its id.
    pub fn insert_thread(
        &self,
        account: &str,
        thread_key: &str,
        subject: &str,
        original_sender: &str,
    ) -> i64 {
        let mut state = self.state();
        let id = state.threads.last().map_or(1, |t| t.id + 1);
        state.threads.push(MemoryThread {
            id,
            account: account.to_owned(),
            thread_key: thread_key.to_owned(),
            subject: subject.to_owned(),
            original_sender: original_sender.to_owned(),
            status: ThreadStatus::Pending,
            attempts: 0,
            next_attempt_at: SystemTime::UNIX_EPOCH,
            needs_reconcile: false,
            first_sent_at: None,
            last_error: None,
            mews_thread_id: None,
        });
        id
    }

    /// Every thread, in id order.
    pub fn threads(&self) -> Vec<MemoryThread> {
        self.state().threads.clone()
    }

    /// Marks a thread as possibly created at Mews (a crash mid-request).
    pub fn set_thread_needs_reconcile(&self, id: i64, first_sent_at: SystemTime) {
        if let Some(t) = self.state().threads.iter_mut().find(|t| t.id == id) {
            t.needs_reconcile = true;
            t.first_sent_at = Some(first_sent_at);
        }
    }

    /// `Upkeep::flag_threadless_rows` of this store.
    pub fn flag_threadless_rows(&self) -> Vec<(String, String, u64)> {
        let mut state = self.state();
        let State { rows, threads, .. } = &mut *state;
        let mut flagged: Vec<(String, String, u64)> = Vec::new();
        for row in rows.iter_mut() {
            let Some(key) = row.thread_key.clone() else {
                continue;
            };
            if row.status != Status::Pending
                || threads
                    .iter()
                    .any(|t| t.account == row.account && t.thread_key == key)
            {
                continue;
            }
            let error = no_such_thread(&row.account, &key);
            if row.last_error.as_ref().is_some_and(|e| *e != error) {
                continue;
            }
            row.last_error = Some(error);
            match flagged
                .iter_mut()
                .find(|(a, k, _)| *a == row.account && *k == key)
            {
                Some((_, _, n)) => *n += 1,
                None => flagged.push((row.account.clone(), key, 1)),
            }
        }
        flagged
    }

    fn insert_row(
        &self,
        account: &str,
        thread: Option<&str>,
        thread_key: Option<&str>,
        text: &str,
    ) -> i64 {
        let mut state = self.state();
        let id = state.rows.last().map_or(1, |r| r.id + 1);
        let keyed_thread_id = thread_key.and_then(|key| {
            state
                .threads
                .iter()
                .find(|t| {
                    t.account == account && t.thread_key == key && t.status == ThreadStatus::Created
                })
                .and_then(|t| t.mews_thread_id.clone())
        });
        state.rows.push(MemoryRow {
            id,
            account: account.to_owned(),
            message_thread_id: thread.map(str::to_owned),
            thread_key: thread_key.map(str::to_owned),
            keyed_thread_id,
            text: text.to_owned(),
            status: Status::Pending,
            attempts: 0,
            next_attempt_at: SystemTime::UNIX_EPOCH,
            needs_reconcile: false,
            first_sent_at: None,
            last_error: None,
            mews_message_id: None,
        });
        id
    }

    /// Every row, in id order.
    pub fn rows(&self) -> Vec<MemoryRow> {
        self.state().rows.clone()
    }

    /// The thread heads of `account`: each thread's oldest unfinished row,
    /// when it is `pending`.
    fn heads(state: &State, account: &str) -> Vec<usize> {
        let mut seen = HashSet::new();
        let mut heads = Vec::new();
        for (i, row) in state.rows.iter().enumerate() {
            if !matches!(row.status, Status::Pending | Status::Sending) {
                continue;
            }
            // A keyed row whose thread is not created yet blocks nothing.
            let Some(thread) = row.effective_thread() else {
                continue;
            };
            if seen.insert(thread.to_owned())
                && row.status == Status::Pending
                && row.account == account
            {
                heads.push(i);
            }
        }
        heads
    }
}

impl Outbox for MemoryStore {
    async fn claim_within(
        &self,
        account: &str,
        now: SystemTime,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<ClaimedRow>, StoreError> {
        let mut state = self.state();
        let mut due: Vec<usize> = MemoryStore::heads(&state, account)
            .into_iter()
            .filter(|&i| state.rows[i].next_attempt_at <= now)
            .collect();
        due.sort_by_key(|&i| (state.rows[i].next_attempt_at, state.rows[i].id));
        let mut claimed = Vec::new();
        let mut bytes = 0usize;
        for i in due.into_iter().take(limit) {
            let row = &mut state.rows[i];
            bytes =
                bytes.saturating_add(row.text.len() + super::sqlite::sql::MESSAGE_ENVELOPE_BYTES);
            if !claimed.is_empty() && bytes > max_bytes {
                break;
            }
            row.status = Status::Sending;
            row.first_sent_at.get_or_insert(now);
            claimed.push(ClaimedRow {
                id: row.id,
                message_thread_id: row.effective_thread().unwrap_or_default().to_owned(),
                text: Ok(row.text.clone()),
                attempts: row.attempts,
                needs_reconcile: row.needs_reconcile,
                first_sent_at: row.first_sent_at,
            });
        }
        claimed.sort_by_key(|row| row.id);
        Ok(claimed)
    }

    async fn next_due(
        &self,
        account: &str,
        now: SystemTime,
    ) -> Result<Option<SystemTime>, StoreError> {
        let state = self.state();
        Ok(MemoryStore::heads(&state, account)
            .into_iter()
            .map(|i| state.rows[i].next_attempt_at)
            .filter(|&at| at > now)
            .min())
    }

    async fn record(
        &self,
        outcomes: &[(i64, RowOutcome)],
        now: SystemTime,
    ) -> Result<(), StoreError> {
        let mut state = self.state();
        for (id, outcome) in outcomes {
            let Some(row) = state
                .rows
                .iter_mut()
                .find(|r| r.id == *id && r.status == Status::Sending)
            else {
                continue;
            };
            match outcome {
                RowOutcome::Delivered {
                    mews_message_id, ..
                } => {
                    row.status = Status::Delivered;
                    row.needs_reconcile = false;
                    row.mews_message_id = Some(mews_message_id.clone());
                }
                RowOutcome::Retry {
                    at,
                    error,
                    attempt,
                    maybe_stored,
                } => {
                    row.status = Status::Pending;
                    row.attempts += u32::from(*attempt);
                    row.needs_reconcile |= *maybe_stored;
                    row.next_attempt_at = *at;
                    row.last_error = Some(error.clone());
                }
                RowOutcome::Dead { error } => {
                    row.status = Status::Dead;
                    row.attempts += 1;
                    row.last_error = Some(error.clone());
                }
                RowOutcome::Release => {
                    row.status = Status::Pending;
                    row.next_attempt_at = now;
                }
            }
        }
        Ok(())
    }

    async fn pauses(&self) -> Result<Vec<AccountPause>, StoreError> {
        Ok(self.state().pauses.values().cloned().collect())
    }

    async fn save_pause(&self, pause: &AccountPause) -> Result<(), StoreError> {
        self.state()
            .pauses
            .insert(pause.account.clone(), pause.clone());
        Ok(())
    }

    async fn clear_pause(&self, account: &str) -> Result<(), StoreError> {
        self.state().pauses.remove(account);
        Ok(())
    }

    async fn clear_reconcile(&self, ids: &[i64]) -> Result<(), StoreError> {
        for row in self.state().rows.iter_mut() {
            if row.status == Status::Sending && ids.contains(&row.id) {
                row.needs_reconcile = false;
            }
        }
        Ok(())
    }

    async fn dead_letter_held(
        &self,
        rows: &[(i64, String)],
        held_prefix: &str,
        _now: SystemTime,
    ) -> Result<u64, StoreError> {
        let mut state = self.state();
        let mut dead = 0;
        for (id, error) in rows {
            if let Some(row) = state.rows.iter_mut().find(|r| {
                r.id == *id
                    && r.status == Status::Pending
                    && r.last_error
                        .as_deref()
                        .is_some_and(|e| e.starts_with(held_prefix))
            }) {
                row.status = Status::Dead;
                row.last_error = Some(error.clone());
                dead += 1;
            }
        }
        Ok(dead)
    }

    async fn owned_message_ids(&self, ids: &[&str]) -> Result<HashSet<String>, StoreError> {
        Ok(self
            .state()
            .rows
            .iter()
            .filter_map(|r| r.mews_message_id.clone())
            .filter(|id| ids.contains(&id.as_str()))
            .collect())
    }

    async fn request_starting(
        &self,
        account: &str,
        started_by: SystemTime,
    ) -> Result<(), StoreError> {
        self.state()
            .started_by
            .insert(account.to_owned(), started_by);
        Ok(())
    }

    async fn recent_requests(&self, account: &str) -> Result<Vec<SystemTime>, StoreError> {
        Ok(self
            .state()
            .recent
            .get(account)
            .cloned()
            .unwrap_or_default())
    }

    async fn save_recent_requests(
        &self,
        account: &str,
        ends: &[SystemTime],
    ) -> Result<(), StoreError> {
        self.state()
            .recent
            .insert(account.to_owned(), ends.to_vec());
        Ok(())
    }

    async fn claim_thread(
        &self,
        account: &str,
        now: SystemTime,
    ) -> Result<Option<ClaimedThread>, StoreError> {
        let mut state = self.state();
        let Some(thread) = state
            .threads
            .iter_mut()
            .filter(|t| {
                t.account == account
                    && t.status == ThreadStatus::Pending
                    && t.next_attempt_at <= now
            })
            .min_by_key(|t| (t.next_attempt_at, t.id))
        else {
            return Ok(None);
        };
        thread.status = ThreadStatus::Creating;
        thread.first_sent_at.get_or_insert(now);
        Ok(Some(ClaimedThread {
            id: thread.id,
            thread_key: thread.thread_key.clone(),
            subject: thread.subject.clone(),
            original_sender: thread.original_sender.clone(),
            attempts: thread.attempts,
            needs_reconcile: thread.needs_reconcile,
            first_sent_at: thread.first_sent_at,
        }))
    }

    async fn next_thread_due(
        &self,
        account: &str,
        now: SystemTime,
    ) -> Result<Option<SystemTime>, StoreError> {
        Ok(self
            .state()
            .threads
            .iter()
            .filter(|t| t.account == account && t.status == ThreadStatus::Pending)
            .map(|t| t.next_attempt_at)
            .filter(|&at| at > now)
            .min())
    }

    async fn record_thread(
        &self,
        id: i64,
        outcome: &ThreadOutcome,
        now: SystemTime,
    ) -> Result<(), StoreError> {
        let mut state = self.state();
        let State { rows, threads, .. } = &mut *state;
        let Some(thread) = threads
            .iter_mut()
            .find(|t| t.id == id && t.status == ThreadStatus::Creating)
        else {
            return Ok(());
        };
        let waiting = rows.iter_mut().filter(|r| {
            r.status == Status::Pending
                && r.account == thread.account
                && r.thread_key.as_deref() == Some(thread.thread_key.as_str())
                && r.keyed_thread_id.is_none()
        });
        match outcome {
            ThreadOutcome::Created { mews_thread_id, .. } => {
                thread.status = ThreadStatus::Created;
                thread.needs_reconcile = false;
                thread.mews_thread_id = Some(mews_thread_id.clone());
                let unknown = no_such_thread(&thread.account, &thread.thread_key);
                for row in waiting {
                    row.keyed_thread_id = Some(mews_thread_id.clone());
                    if row
                        .last_error
                        .as_ref()
                        .is_some_and(|e| e.starts_with(HELD_BY_THREAD_PREFIX) || *e == unknown)
                    {
                        row.last_error = None;
                    }
                }
            }
            ThreadOutcome::Retry {
                at,
                error,
                attempt,
                maybe_stored,
            } => {
                thread.status = ThreadStatus::Pending;
                thread.attempts += u32::from(*attempt);
                thread.needs_reconcile |= *maybe_stored;
                thread.next_attempt_at = *at;
                thread.last_error = Some(error.clone());
            }
            ThreadOutcome::Dead { error } => {
                thread.status = ThreadStatus::Dead;
                thread.attempts += 1;
                thread.last_error = Some(error.clone());
                let held = held_by_thread(&thread.thread_key, thread.id, error);
                for row in waiting {
                    row.last_error = Some(held.clone());
                }
            }
            ThreadOutcome::Release => {
                thread.status = ThreadStatus::Pending;
                thread.next_attempt_at = now;
            }
        }
        Ok(())
    }

    async fn owned_thread_ids(&self, ids: &[&str]) -> Result<HashSet<String>, StoreError> {
        Ok(self
            .state()
            .threads
            .iter()
            .filter_map(|t| t.mews_thread_id.clone())
            .filter(|id| ids.contains(&id.as_str()))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> SystemTime {
        SystemTime::now()
    }

    #[tokio::test]
    async fn keyed_rows_wait_for_their_thread_and_then_follow_it_in_order() {
        let store = MemoryStore::default();
        let thread = store.insert_thread("default", "k1", "Subject", "Guest");
        let first = store.insert_keyed("default", "k1", "one");
        let second = store.insert_keyed("default", "k1", "two");
        let other = store.insert("default", "7f9325f6-ef44-4911-89a8-ae51010a5aa4", "x");
        let claimed = store
            .claim_within("default", now(), 10, usize::MAX)
            .await
            .unwrap();
        assert_eq!(
            claimed.iter().map(|r| r.id).collect::<Vec<_>>(),
            [other],
            "a keyed row whose thread does not exist yet is never claimed"
        );
        let t = store.claim_thread("default", now()).await.unwrap().unwrap();
        assert_eq!((t.id, t.subject.as_str()), (thread, "Subject"));
        assert!(t.first_sent_at.is_some());
        assert_eq!(store.claim_thread("default", now()).await.unwrap(), None);
        let created = ThreadOutcome::Created {
            mews_thread_id: "0b8c8a58-1a60-4c5e-9f0e-3d6f2f2a9d11".into(),
            mews_created_utc: "2026-01-01T00:00:00Z".into(),
        };
        store.record_thread(thread, &created, now()).await.unwrap();
        let claimed = store
            .claim_within("default", now(), 10, usize::MAX)
            .await
            .unwrap();
        assert_eq!(claimed.iter().map(|r| r.id).collect::<Vec<_>>(), [first]);
        assert_eq!(
            claimed[0].message_thread_id,
            "0b8c8a58-1a60-4c5e-9f0e-3d6f2f2a9d11"
        );
        let late = store.insert_keyed("default", "k1", "three");
        assert_eq!(
            store
                .rows()
                .iter()
                .find(|r| r.id == late)
                .unwrap()
                .keyed_thread_id
                .as_deref(),
            Some("0b8c8a58-1a60-4c5e-9f0e-3d6f2f2a9d11"),
            "a message inserted after its thread exists takes the id at once"
        );
        assert!(store.rows().iter().any(|r| r.id == second));
    }

    #[tokio::test]
    async fn a_dead_thread_holds_its_messages_and_unknown_keys_are_flagged() {
        let store = MemoryStore::default();
        let thread = store.insert_thread("default", "k1", "Subject", "Guest");
        let held = store.insert_keyed("default", "k1", "one");
        let orphan = store.insert_keyed("default", "nope", "two");
        store.claim_thread("default", now()).await.unwrap().unwrap();
        let dead = ThreadOutcome::Dead {
            error: "HTTP 403: no".into(),
        };
        store.record_thread(thread, &dead, now()).await.unwrap();
        let row = |id| store.rows().into_iter().find(|r| r.id == id).unwrap();
        let error = row(held).last_error.unwrap();
        assert!(error.starts_with(HELD_BY_THREAD_PREFIX), "{error}");
        assert!(error.contains("--thread 1"), "{error}");
        assert_eq!(row(held).status, Status::Pending);
        assert_eq!(
            store.flag_threadless_rows(),
            [("default".to_owned(), "nope".to_owned(), 1)]
        );
        assert_eq!(
            row(orphan).last_error,
            Some(no_such_thread("default", "nope"))
        );
        assert_eq!(
            store.threads()[0].status,
            ThreadStatus::Dead,
            "record_thread changes only a thread still creating"
        );
        store
            .record_thread(thread, &ThreadOutcome::Release, now())
            .await
            .unwrap();
        assert_eq!(store.threads()[0].status, ThreadStatus::Dead);
    }
}
