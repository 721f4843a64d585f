//! An in-memory [`Outbox`], for unit tests of the delivery loop without a
//! database: the same claim rules (due `pending` thread heads of the
//! account, oldest due first, one per thread, at least one row whatever its
//! size) and the same outcome rules (only rows still `sending` change).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::SystemTime;

use super::{
    AccountPause, ClaimedRow, ClaimedThread, Outbox, RowOutcome, Status, StoreError, ThreadOutcome,
};

/// One row of the in-memory outbox.
#[derive(Debug, Clone)]
pub struct MemoryRow {
    pub id: i64,
    pub account: String,
    pub message_thread_id: String,
    pub text: String,
    pub status: Status,
    pub attempts: u32,
    pub next_attempt_at: SystemTime,
    pub needs_reconcile: bool,
    pub first_sent_at: Option<SystemTime>,
    pub last_error: Option<String>,
    pub mews_message_id: Option<String>,
}

#[derive(Debug, Default)]
struct State {
    rows: Vec<MemoryRow>,
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
        let mut state = self.state();
        let id = state.rows.last().map_or(1, |r| r.id + 1);
        state.rows.push(MemoryRow {
            id,
            account: account.to_owned(),
            message_thread_id: thread.to_owned(),
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
            if seen.insert(row.message_thread_id.clone())
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
                message_thread_id: row.message_thread_id.clone(),
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

    // Threads: none in this store yet (the threads-base stub).
    async fn claim_thread(
        &self,
        _account: &str,
        _now: SystemTime,
    ) -> Result<Option<ClaimedThread>, StoreError> {
        Ok(None)
    }

    async fn next_thread_due(
        &self,
        _account: &str,
        _now: SystemTime,
    ) -> Result<Option<SystemTime>, StoreError> {
        Ok(None)
    }

    async fn record_thread(
        &self,
        id: i64,
        _outcome: &ThreadOutcome,
        _now: SystemTime,
    ) -> Result<(), StoreError> {
        Err(StoreError::Refused(format!("no thread {id}")))
    }

    async fn owned_thread_ids(&self, _ids: &[&str]) -> Result<HashSet<String>, StoreError> {
        Ok(HashSet::new())
    }
}
