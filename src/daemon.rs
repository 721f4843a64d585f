//! `mews-outbox run`: takes the database, starts one delivery loop per
//! account, and stops them cleanly when told to.

use std::sync::Arc;
use std::time::Duration;

use secrecy::ExposeSecret;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::mews::{ClientError, MewsClient};
use crate::store::{Outbox, SqliteStore, StoreError};
use crate::worker::AccountWorker;

/// How often the daemon looks for rows of accounts it does not know.
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Client(#[from] ClientError),
}

/// Runs the daemon until `shutdown` is cancelled, then lets requests in
/// flight finish (up to `delivery.drain_timeout`) and returns.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> Result<(), DaemonError> {
    let store = SqliteStore::open(&settings.database.path, settings.database.busy_timeout).await?;
    let _lock = store.lock_for_daemon()?;
    let recovered = store.recover_abandoned().await?;
    let client = MewsClient::new(&settings.mews)?;
    log_start(&settings, recovered);

    let names: Vec<&str> = settings.accounts.keys().map(String::as_str).collect();

    let workers = shutdown.child_token();
    let changes = store
        .watch_changes(settings.delivery.poll_interval, workers.clone())
        .await?;
    let requests = Arc::new(Semaphore::new(settings.delivery.max_concurrent_requests));
    let pauses = store.pauses().await?;
    let mut tasks = JoinSet::new();
    for (name, account) in &settings.accounts {
        let worker = AccountWorker::new(
            store.clone(),
            client.clone(),
            name.clone(),
            account.access_token.clone(),
            settings.delivery.clone(),
            settings.retry.clone(),
            requests.clone(),
            changes.clone(),
            workers.clone(),
            pauses.iter().find(|p| &p.account == name).cloned(),
        );
        tasks.spawn(worker.run());
    }
    tracing::info!(accounts = settings.accounts.len(), "ready: delivering");

    // The first tick is immediate: rows of unknown accounts are reported
    // right after start-up, without delaying it (counting them reads every
    // pending row of a large backlog).
    let mut housekeeping = tokio::time::interval(HOUSEKEEPING_INTERVAL);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = housekeeping.tick() => warn_unknown_accounts(&store, &names).await,
        }
    }

    tracing::info!(
        drain_timeout = %humantime::format_duration(settings.delivery.drain_timeout),
        "stopping: no new claims; waiting for requests in flight"
    );
    workers.cancel();
    let drained = tokio::time::timeout(settings.delivery.drain_timeout, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            "requests still in flight after the drain timeout; their rows stay `sending` and are taken up again at the next start"
        );
    }
    store.close().await;
    tracing::info!("stopped");
    Ok(())
}

fn log_start(settings: &Settings, recovered: u64) {
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        database = %settings.database.path.display(),
        base_url = %settings.mews.base_url,
        client = %settings.mews.client,
        accounts = ?settings.accounts.keys().collect::<Vec<_>>(),
        batch_size = settings.delivery.batch_size,
        poll_interval = %humantime::format_duration(settings.delivery.poll_interval),
        request_timeout = %humantime::format_duration(settings.mews.request_timeout),
        max_concurrent_requests = settings.delivery.max_concurrent_requests,
        retry_base_delay = %humantime::format_duration(settings.retry.base_delay),
        retry_max_delay = %humantime::format_duration(settings.retry.max_delay),
        retry_max_attempts = settings.retry.max_attempts,
        "mews-outbox starting (tokens redacted)"
    );
    if settings.mews.is_public_demo()
        || settings
            .accounts
            .values()
            .any(|a| a.access_token.expose_secret() == crate::config::DEMO_ACCESS_TOKEN)
    {
        tracing::warn!(
            "USING THE PUBLIC MEWS DEMO ENVIRONMENT AND ITS PUBLIC DEMO TOKENS: messages go to a shared test hotel, not to real guests. Set mews.base_url, mews.client_token and [accounts.<name>] for production."
        );
    }
    if recovered > 0 {
        tracing::warn!(
            rows = recovered,
            "rows left `sending` by a previous run are pending again; Mews may already have some of them (possible duplicates)"
        );
    }
}

async fn warn_unknown_accounts(store: &SqliteStore, configured: &[&str]) {
    match store.flag_unknown_accounts(configured).await {
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
