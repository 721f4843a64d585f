//! Housekeeping, in its own task so it never holds up delivery: flags rows of
//! accounts that are not configured and rows whose `thread_key` names no
//! thread, deletes delivered rows older than
//! `retention.delivered` in small batches (producers' inserts get the write
//! lock between two batches), and gives the freed pages back so the file does
//! not grow without bound. Dead rows are never deleted here.

use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use crate::notify::Pulse;
use crate::store::{StoreError, Upkeep};

/// How often housekeeping runs (the first run is right at start).
pub const INTERVAL: Duration = Duration::from_secs(60);
/// Rows deleted per transaction: a few milliseconds of write lock.
pub const PRUNE_BATCH: usize = 500;
/// Pages given back per transaction (2 MB of 4 KiB pages).
pub const VACUUM_PAGES: u32 = 512;
/// Pause between two batches, so producers are never blocked for long.
const BATCH_PAUSE: Duration = Duration::from_millis(10);
/// The longest one batch may take before the watchdog counts the task as stuck.
const BATCH_BUDGET: Duration = Duration::from_secs(30);

/// What one housekeeping pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pass {
    /// Delivered rows deleted.
    pub pruned: u64,
    /// Free pages given back to the file system.
    pub pages_freed: i64,
}

/// Deletes rows delivered more than `retention` before `now` (none when
/// `retention` is 0), then gives free pages back. Stops early, between two
/// batches, when `stop` is cancelled.
pub async fn prune_and_vacuum<U: Upkeep>(
    store: &U,
    retention: Duration,
    now: SystemTime,
    pulse: Option<&Pulse>,
    stop: &CancellationToken,
) -> Result<Pass, StoreError> {
    let busy = || {
        if let Some(pulse) = pulse {
            pulse.busy("housekeeping", BATCH_BUDGET);
        }
    };
    let mut pass = Pass::default();
    if let Some(before) = (!retention.is_zero())
        .then(|| now.checked_sub(retention))
        .flatten()
    {
        loop {
            busy();
            let deleted = store.prune_delivered(before, PRUNE_BATCH).await?;
            pass.pruned += deleted;
            if deleted < PRUNE_BATCH as u64 || stop.is_cancelled() {
                break;
            }
            tokio::time::sleep(BATCH_PAUSE).await;
        }
    }
    loop {
        busy();
        let freed = store.give_back_free_pages(VACUUM_PAGES).await?;
        pass.pages_freed += freed;
        if freed == 0 || stop.is_cancelled() {
            break;
        }
        tokio::time::sleep(BATCH_PAUSE).await;
    }
    Ok(pass)
}

/// Runs housekeeping every [`INTERVAL`] until `stop` is cancelled;
/// `database` names the store in its log lines.
pub async fn run<U: Upkeep>(
    store: U,
    database: String,
    accounts: Vec<String>,
    retention: Duration,
    pulse: Pulse,
    stop: CancellationToken,
) {
    if let Some(warning) = store.storage_warning().await {
        tracing::warn!(%database, "{warning}");
    }
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        pulse.waiting();
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        pulse.busy("housekeeping", BATCH_BUDGET);
        warn_unknown_accounts(&store, &accounts).await;
        warn_threadless_rows(&store).await;
        match prune_and_vacuum(&store, retention, SystemTime::now(), Some(&pulse), &stop).await {
            Ok(pass) if pass != Pass::default() => tracing::info!(
                pruned = pass.pruned,
                pages_freed = pass.pages_freed,
                retention = %humantime::format_duration(retention),
                "housekeeping: deleted delivered rows past retention.delivered and gave free space back"
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!(
                error = %e,
                "housekeeping failed (delivery is not affected); trying again in {}s",
                INTERVAL.as_secs()
            ),
        }
    }
}

/// Logs accounts that have pending rows but no configuration.
pub async fn warn_unknown_accounts<U: Upkeep>(store: &U, configured: &[String]) {
    let configured: Vec<&str> = configured.iter().map(String::as_str).collect();
    match store.flag_unknown_accounts(&configured).await {
        Ok(unknown) => {
            for (account, rows) in unknown {
                tracing::warn!(
                    %account, rows,
                    "rows name an account that is not configured; they wait: add [accounts.{account}] with its access_token"
                );
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot check for unconfigured accounts"),
    }
}

/// Flags and logs messages whose `thread_key` names no thread of their
/// account in `outbox_threads`: they wait until a producer inserts it.
pub async fn warn_threadless_rows<U: Upkeep>(store: &U) {
    match store.flag_threadless_rows().await {
        Ok(flagged) => {
            for (account, thread_key, rows) in flagged {
                tracing::warn!(
                    %account, %thread_key, rows,
                    "messages name a thread_key that no row of outbox_threads has for their account; they wait: insert the thread (account, thread_key, subject, original_sender) and they follow"
                );
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot check for messages whose thread does not exist")
        }
    }
}
