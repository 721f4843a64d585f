//! Threads through the outbox (`outbox_threads`, see [`crate::store::thread`]):
//! this store's statements. STUB on the threads-base branch: replaced by the
//! real implementation before it merges.

use std::collections::HashSet;
use std::time::SystemTime;

use super::PgStore;
use crate::store::{
    ClaimedThread, DeadThread, Enqueued, NewMessage, NewThread, Requeue, StoreError, ThreadOutcome,
};

fn not_built() -> StoreError {
    StoreError::Refused("threads are not built in this store yet".into())
}

impl PgStore {
    pub async fn claim_thread(
        &self,
        _account: &str,
        _now: SystemTime,
    ) -> Result<Option<ClaimedThread>, StoreError> {
        Err(not_built())
    }

    pub async fn next_thread_due(
        &self,
        _account: &str,
        _now: SystemTime,
    ) -> Result<Option<SystemTime>, StoreError> {
        Err(not_built())
    }

    pub async fn record_thread(
        &self,
        _id: i64,
        _outcome: &ThreadOutcome,
        _now: SystemTime,
    ) -> Result<(), StoreError> {
        Err(not_built())
    }

    pub async fn owned_thread_ids(&self, _ids: &[&str]) -> Result<HashSet<String>, StoreError> {
        Err(not_built())
    }

    pub async fn flag_threadless_rows(&self) -> Result<Vec<(String, String, u64)>, StoreError> {
        Err(not_built())
    }

    /// Inserts one message (and, with `new_thread`, its thread first) in one transaction.
    pub async fn enqueue_with_thread(
        &self,
        _message: &NewMessage,
        _new_thread: Option<&NewThread>,
    ) -> Result<Enqueued, StoreError> {
        Err(not_built())
    }

    pub async fn dead_threads(
        &self,
        _account: Option<&str>,
    ) -> Result<Vec<DeadThread>, StoreError> {
        Err(not_built())
    }

    pub async fn requeue_dead_threads(
        &self,
        _which: &Requeue,
        _account: Option<&str>,
        _now: SystemTime,
    ) -> Result<Vec<i64>, StoreError> {
        Err(not_built())
    }

    pub async fn purge_dead_threads(
        &self,
        _cutoff: SystemTime,
        _account: Option<&str>,
    ) -> Result<u64, StoreError> {
        Err(not_built())
    }
}
