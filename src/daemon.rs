//! `mews-outbox run`: on a store already opened (and, for SQLite, locked),
//! takes the accounts to deliver for, runs one delivery loop per account
//! plus housekeeping, reports to systemd (ready, status, watchdog), reloads
//! the configuration on request and stops cleanly when told to.
//!
//! The loops of one configuration form a `Generation`. A reload builds the
//! new configuration first (a bad one is refused and the running one kept),
//! then lets the old generation finish its requests in flight, and starts a
//! new one: no request is cut off and no row is left `sending`.
//!
//! On a shared store (PostgreSQL) accounts are leased: every
//! `renew_every` an ownership round (`Generation::own`) renews them,
//! stops the loops of those another daemon took over, and takes a share of
//! the free ones. A loop whose write is refused for a lost lease stops
//! itself. SQLite takes every account at start and never runs a round.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use secrecy::ExposeSecret;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::{ConfigError, Settings, Sources};
use crate::error_chain::ErrorChain;
use crate::heartbeat::{Heartbeat, paused_accounts, status_line};
use crate::mews::{ClientError, MewsClient};
use crate::notify::{Liveness, Notifier, watchdog_interval};
use crate::store::{DaemonStore, StorageLost, StoreError, Upkeep};
use crate::worker::{AccountWorker, WorkerContext};

/// How often `STATUS=` is refreshed for `systemctl status` (under systemd only).
const STATUS_INTERVAL: Duration = Duration::from_secs(5);

/// How often the daemon checks that its storage is still the one it opened
/// ([`DaemonStore::storage_lost`]; SQLite: two `stat` calls, cheap enough to
/// notice the file deleted or replaced within a second).
const FILE_CHECK_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    StorageLost(#[from] StorageLost),
}

/// Runs the daemon on `store` (opened for the daemon, e.g.
/// [`crate::store::SqliteStore::open_for_daemon`]) until `shutdown` is
/// cancelled, then lets requests in flight finish (up to
/// `delivery.drain_timeout`), gives the accounts back, closes the store and
/// returns. Each message on `reloads` reloads the configuration from `sources`.
pub async fn run<S: DaemonStore + Upkeep>(
    store: S,
    settings: Settings,
    sources: Sources,
    shutdown: CancellationToken,
    mut reloads: mpsc::Receiver<()>,
) -> Result<(), DaemonError> {
    let notifier = Notifier::from_env();
    // The previous run may have died during a request that Mews is still
    // storing: those rows settle as after a timeout (from the request's start).
    let recovered = store
        .recover_abandoned(settings.mews.request_timeout, SystemTime::now())
        .await?;
    let client = MewsClient::new(&settings.mews)?;
    // The accounts this daemon delivers for (SQLite: every configured one).
    let mut held = BTreeSet::new();
    log_start(&store, &settings, recovered);

    let liveness = Liveness::default();
    let mut heartbeat = Heartbeat::start(&store, SystemTime::now()).await;
    let mut generation = Generation::start(&store, &settings, client, &liveness, &mut held).await?;
    let mut settings = settings;

    let pinger = CancellationToken::new();
    if let Some(every) = watchdog_interval() {
        tokio::spawn(ping_watchdog(
            liveness.clone(),
            notifier.clone(),
            every,
            pinger.clone(),
        ));
    }
    notify_ready(&notifier, &store, &liveness).await;
    tracing::info!(accounts = settings.accounts.len(), "ready: delivering");

    let mut beats = heartbeat_interval(&settings);
    let mut ownership = ownership_interval(&settings);
    let mut status_tick = tokio::time::interval(STATUS_INTERVAL);
    status_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut file_check = tokio::time::interval(FILE_CHECK_INTERVAL);
    file_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut storage_lost = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = file_check.tick() => {
                if let Some(lost) = store.storage_lost() {
                    tracing::error!(
                        database = %store.describe(),
                        "{}; stopping with an error so that systemd restarts the daemon {}",
                        lost.reason, lost.on_restart
                    );
                    storage_lost = Some(lost);
                    break;
                }
            }
            Some(()) = reloads.recv() => {
                notifier.reloading();
                (settings, generation) =
                    reload(&store, settings, &sources, generation, &liveness, &mut held).await?;
                beats = heartbeat_interval(&settings);
                notify_ready(&notifier, &store, &liveness).await;
            }
            _ = tick(&mut ownership) => {
                generation.own(&store, &settings, &mut held).await;
            }
            _ = tick(&mut beats) => {
                if let Err(e) = heartbeat.beat(&store, settings.alert.max_pending_age, SystemTime::now()).await {
                    tracing::warn!(error = %e, "cannot read the queue for the heartbeat");
                }
            }
            _ = status_tick.tick(), if notifier.is_enabled() => {
                notifier.status(&current_status(&store, &liveness).await);
            }
        }
    }

    notifier.stopping();
    tracing::info!(
        drain_timeout = %humantime::format_duration(settings.delivery.drain_timeout),
        "stopping: no new claims; waiting for requests in flight"
    );
    if !generation.stop(settings.delivery.drain_timeout).await {
        tracing::warn!(
            "requests still in flight after the drain timeout; their rows stay `sending` and are taken up again at the next start"
        );
    }
    if let Err(e) = store.release_accounts().await {
        tracing::warn!(error = %e, "cannot give the accounts back; another daemon takes them once they expire");
    }
    pinger.cancel();
    store.close().await;
    // Last handle: a SQLite store's lock descriptor is closed after
    // SQLite's (see `DaemonLock`).
    drop(store);
    if let Some(lost) = storage_lost {
        return Err(lost.into());
    }
    tracing::info!("stopped");
    Ok(())
}

/// The loops running for one configuration.
struct Generation<S> {
    /// Cancelled to stop these loops: each finishes its request in flight.
    stop: CancellationToken,
    /// The change watcher's users and housekeeping.
    tasks: JoinSet<()>,
    /// One delivery loop per account this daemon holds, each with its own
    /// token (a child of `stop`): a lost account's loop stops alone.
    workers: BTreeMap<String, Worker>,
    /// What a new account loop is started with.
    context: WorkerContext<S>,
    liveness: Liveness,
    /// An account being handed over to another daemon while rebalancing
    /// (account, that daemon's id): its loop was told to stop; once it has
    /// ended, the account is released, reserved for that daemon.
    handing_over: Option<(String, String)>,
}

/// One account's delivery loop.
struct Worker {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

/// How many accounts one ownership round may take. SQLite: all (the file
/// lock made this daemon the only one). PostgreSQL: half the configured
/// accounts (at least one), so that daemons starting together share them;
/// the rest are taken at the next rounds if nobody else took them (see
/// docs/postgres.md, "Which daemon takes which account").
fn accounts_per_round(settings: &Settings) -> usize {
    let configured = settings.accounts.len();
    if settings.database.postgres.is_some() {
        (configured / 2).max(1)
    } else {
        configured
    }
}

/// How often the daemon renews its accounts and takes free ones: a third of
/// the PostgreSQL lease; never on SQLite (it cannot lose an account).
fn ownership_interval(settings: &Settings) -> Option<tokio::time::Interval> {
    let every = settings.database.postgres.as_ref()?.renew_every();
    let mut interval = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    Some(interval)
}

impl<S: DaemonStore + Upkeep> Generation<S> {
    /// Starts housekeeping, then takes accounts and starts their loops
    /// ([`Generation::own`]).
    async fn start(
        store: &S,
        settings: &Settings,
        client: MewsClient,
        liveness: &Liveness,
        held: &mut BTreeSet<String>,
    ) -> Result<Generation<S>, DaemonError> {
        let stop = CancellationToken::new();
        let changes = store
            .watch_changes(settings.delivery.poll_interval, stop.clone())
            .await?;
        let requests = Arc::new(Semaphore::new(settings.delivery.max_concurrent_requests));
        // Registered among the live daemons (shared stores) before
        // housekeeping first looks for accounts nobody configured.
        let configured: Vec<String> = settings.accounts.keys().cloned().collect();
        if let Err(e) = store.fleet(&configured).await {
            tracing::warn!(error = %e, "cannot register among the daemons sharing the outbox; trying again at the next round");
        }
        let mut tasks = JoinSet::new();
        let context = WorkerContext {
            store: store.clone(),
            client,
            delivery: settings.delivery.clone(),
            retry: settings.retry.clone(),
            requests,
            changes,
            shutdown: stop.clone(),
        };
        tasks.spawn(crate::housekeeping::run(
            store.clone(),
            store.describe(),
            settings.accounts.keys().cloned().collect(),
            settings.retention.delivered,
            liveness.register("housekeeping"),
            stop.clone(),
        ));
        let mut generation = Generation {
            stop,
            tasks,
            workers: BTreeMap::new(),
            context,
            liveness: liveness.clone(),
            handing_over: None,
        };
        generation.take_accounts(store, settings, held).await?;
        Ok(generation)
    }

    /// One ownership round: renews the accounts held and stops the loops
    /// of those lost, then takes free configured accounts and starts their
    /// loops. A store error is logged; the next round tries again.
    async fn own(&mut self, store: &S, settings: &Settings, held: &mut BTreeSet<String>) {
        match store.renew_accounts().await {
            Ok(lost) => {
                for account in lost {
                    tracing::warn!(
                        account = %account,
                        "lost the lease on this account: another daemon owns it now (this one did not renew it within database.lease); its delivery loop stops after its request in flight, whose outcome is refused"
                    );
                    held.remove(&account);
                    if let Some(worker) = self.workers.get(&account) {
                        worker.stop.cancel();
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot renew the accounts' leases; trying again at the next round");
                return;
            }
        }
        self.rebalance(store, settings, held).await;
        if let Err(e) = self.take_accounts(store, settings, held).await {
            tracing::warn!(error = %e, "cannot take free accounts; trying again at the next round");
        }
    }

    /// Rebalancing (shared stores only): registers this daemon among the
    /// live ones; finishes a hand-over whose loop has ended (the account is
    /// released, reserved for the daemon it goes to); otherwise, when this
    /// daemon holds more than its share and a live daemon configured for
    /// one of its accounts holds less ([`crate::store::Fleet::one_to_give`]),
    /// stops that account's loop (after its request in flight) to hand it
    /// over at the next round. One account at a time.
    async fn rebalance(&mut self, store: &S, settings: &Settings, held: &mut BTreeSet<String>) {
        let configured: Vec<String> = settings.accounts.keys().cloned().collect();
        let fleet = match store.fleet(&configured).await {
            Ok(Some(fleet)) => fleet,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the other daemons for rebalancing; trying again at the next round");
                return;
            }
        };
        if let Some((account, to)) = self.handing_over.clone() {
            let ended = self
                .workers
                .get(&account)
                .is_none_or(|worker| worker.task.is_finished());
            if !held.contains(&account) {
                self.handing_over = None;
            } else if ended {
                match store
                    .release_some(std::slice::from_ref(&account), Some(&to))
                    .await
                {
                    Ok(released) => {
                        if released.contains(&account) {
                            tracing::info!(
                                account = %account,
                                to = %to,
                                "handed this account over to a daemon holding fewer accounts (rebalancing); it takes it at its next round"
                            );
                            held.remove(&account);
                        }
                        self.workers.remove(&account);
                        self.handing_over = None;
                    }
                    Err(e) => {
                        tracing::warn!(account = %account, error = %e, "cannot hand this account over; trying again at the next round");
                    }
                }
            }
            return;
        }
        if let Some((account, to)) = fleet.one_to_give(held) {
            tracing::info!(
                account = %account,
                to = %to,
                held = held.len(),
                share = fleet.share(),
                daemons = fleet.members.len(),
                "this daemon holds more than its share of the accounts: handing this one over to a daemon holding fewer, after its request in flight"
            );
            if let Some(worker) = self.workers.get(&account) {
                worker.stop.cancel();
            }
            self.handing_over = Some((account, to));
        }
    }

    /// Takes configured accounts nobody holds (a share of them:
    /// [`accounts_per_round`]) into `held` and starts a loop for each held
    /// account that has none (newly taken, or whose loop ended).
    async fn take_accounts(
        &mut self,
        store: &S,
        settings: &Settings,
        held: &mut BTreeSet<String>,
    ) -> Result<(), StoreError> {
        // A loop that ended (its lease was lost, or it stopped for a lost
        // account) is gone; a lost account's loop still finishing keeps the
        // account from being taken again until it is done.
        self.workers.retain(|_, worker| !worker.task.is_finished());
        let free: Vec<&str> = settings
            .accounts
            .keys()
            .filter(|a| !held.contains(*a) && !self.workers.contains_key(*a))
            .map(String::as_str)
            .collect();
        let mut recovered = 0;
        for acquired in store
            .acquire_accounts(&free, accounts_per_round(settings))
            .await?
        {
            recovered += acquired.recovered;
            tracing::info!(account = %acquired.account, "delivering for this account");
            held.insert(acquired.account);
        }
        if recovered > 0 {
            tracing::warn!(
                rows = recovered,
                "rows left `sending` by the accounts' previous owner are pending again; they are read back before being sent again"
            );
        }
        let handing_over = self.handing_over.as_ref().map(|(account, _)| account);
        let to_start: Vec<&String> = settings
            .accounts
            .keys()
            .filter(|a| {
                held.contains(*a) && !self.workers.contains_key(*a) && Some(*a) != handing_over
            })
            .collect();
        if to_start.is_empty() {
            return Ok(());
        }
        // Read after the acquisition: the previous owner's pause holds here.
        let pauses = store.pauses().await?;
        for name in to_start {
            let Some(account) = settings.accounts.get(name) else {
                continue;
            };
            let stop = self.stop.child_token();
            let context = WorkerContext {
                shutdown: stop.clone(),
                ..self.context.clone()
            };
            let worker = AccountWorker::new(
                context,
                name.clone(),
                account,
                pauses.iter().find(|p| &p.account == name).cloned(),
            )
            .with_pulse(self.liveness.register(format!("account {name}")));
            let account = name.clone();
            let task = tokio::spawn(async move {
                worker.run().await;
                tracing::info!(account = %account, "the account's delivery loop has ended");
            });
            self.workers.insert(name.clone(), Worker { stop, task });
        }
        Ok(())
    }

    /// Stops the loops after their requests in flight, waiting at most
    /// `drain_timeout`; then aborts what is left. True when all finished.
    async fn stop(mut self, drain_timeout: Duration) -> bool {
        self.stop.cancel();
        let mut workers = std::mem::take(&mut self.workers);
        let drained = tokio::time::timeout(drain_timeout, async {
            for worker in workers.values_mut() {
                let _ = (&mut worker.task).await;
            }
            while self.tasks.join_next().await.is_some() {}
        })
        .await
        .is_ok();
        if !drained {
            for worker in workers.values() {
                worker.task.abort();
            }
            for worker in workers.into_values() {
                let _ = worker.task.await;
            }
            self.tasks.abort_all();
            while self.tasks.join_next().await.is_some() {}
        }
        drained
    }
}

/// Loads the configuration again and, when it is valid, swaps the loops.
/// A refused configuration keeps the running generation untouched. Fails
/// only when neither the new nor the old configuration can be started.
async fn reload<S: DaemonStore + Upkeep>(
    store: &S,
    current: Settings,
    sources: &Sources,
    generation: Generation<S>,
    liveness: &Liveness,
    held: &mut BTreeSet<String>,
) -> Result<(Settings, Generation<S>), DaemonError> {
    let prepared = Settings::load(sources)
        .map_err(ReloadError::Config)
        .and_then(|new| {
            let client = MewsClient::new(&new.mews).map_err(ReloadError::Client)?;
            Ok((new, client))
        });
    let (new, client) = match prepared {
        Ok(prepared) => prepared,
        Err(e) => {
            tracing::error!(
                error = %ErrorChain(&e),
                "configuration reload REFUSED: the new configuration is invalid; still running with the previous one (fix the file, then reload again)"
            );
            return Ok((current, generation));
        }
    };
    warn_restart_needed(&current, &new);
    if new.log.level != current.log.level {
        crate::telemetry::set_level(&new.log.level);
    }

    let drained = generation.stop(current.delivery.drain_timeout).await;
    release_removed(store, &new, held).await;
    // An aborted request may still be stored by Mews: its rows settle for the
    // timeout it was sent with before the new generation reads them back.
    let abandoned = store
        .recover_abandoned(current.mews.request_timeout, SystemTime::now())
        .await?;
    if !drained {
        tracing::warn!(
            rows = abandoned,
            settle = %humantime::format_duration(current.mews.request_timeout),
            "reload: requests still in flight after delivery.drain_timeout were abandoned; their rows are pending again and are read back from Mews (messages/getAll) once their request has had mews.request_timeout to finish"
        );
    }
    match Generation::start(store, &new, client, liveness, held).await {
        Ok(generation) => {
            tracing::info!(
                accounts = ?new.accounts.keys().collect::<Vec<_>>(),
                base_url = %new.mews.base_url,
                batch_size = new.delivery.batch_size,
                max_concurrent_requests = new.delivery.max_concurrent_requests,
                "configuration reloaded (tokens redacted)"
            );
            Ok((new, generation))
        }
        Err(e) => {
            tracing::error!(error = %ErrorChain(&e), "cannot start delivery with the reloaded configuration; going back to the previous one");
            let client = MewsClient::new(&current.mews)?;
            let generation = Generation::start(store, &current, client, liveness, held).await?;
            Ok((current, generation))
        }
    }
}

/// After a reload stopped the loops: gives up at once the accounts held
/// but no longer configured, so that a daemon configured for them takes
/// them at its next round instead of after the lease (SQLite gives up
/// none: nobody else could take them).
async fn release_removed<S: DaemonStore>(store: &S, new: &Settings, held: &mut BTreeSet<String>) {
    let removed: Vec<String> = held
        .iter()
        .filter(|account| !new.accounts.contains_key(*account))
        .cloned()
        .collect();
    if removed.is_empty() {
        return;
    }
    match store.release_some(&removed, None).await {
        Ok(released) => {
            for account in released {
                tracing::info!(
                    account = %account,
                    "this account is no longer configured: gave up its lease; a daemon configured for it takes it at its next round"
                );
                held.remove(&account);
            }
        }
        Err(e) => tracing::warn!(
            error = %e,
            accounts = ?removed,
            "cannot give up the accounts no longer configured; another daemon takes them once their lease expires"
        ),
    }
}

#[derive(Debug, thiserror::Error)]
enum ReloadError {
    #[error(transparent)]
    Config(ConfigError),
    #[error(transparent)]
    Client(ClientError),
}

/// Settings a running daemon cannot change.
fn warn_restart_needed(current: &Settings, new: &Settings) {
    let mut ignored = Vec::new();
    if new.database.path != current.database.path {
        ignored.push("database.path");
    }
    if new.database.busy_timeout != current.database.busy_timeout {
        ignored.push("database.busy_timeout");
    }
    let (old_pg, new_pg) = (&current.database.postgres, &new.database.postgres);
    // The URL is compared whole (password included) but never printed.
    if old_pg.as_ref().map(|p| p.url.expose_secret())
        != new_pg.as_ref().map(|p| p.url.expose_secret())
    {
        ignored.push("database.url");
    }
    if old_pg.as_ref().map(|p| p.lease) != new_pg.as_ref().map(|p| p.lease) {
        ignored.push("database.lease");
    }
    if old_pg.as_ref().map(|p| p.connect_timeout) != new_pg.as_ref().map(|p| p.connect_timeout) {
        ignored.push("database.connect_timeout");
    }
    if new.log.format != current.log.format {
        ignored.push("log.format");
    }
    if !ignored.is_empty() {
        tracing::warn!(
            settings = %ignored.join(", "),
            "these settings take effect only at the next restart; the running values are kept"
        );
    }
}

fn heartbeat_interval(settings: &Settings) -> Option<tokio::time::Interval> {
    let every = settings.log.heartbeat;
    (!every.is_zero()).then(|| {
        let mut interval = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        interval
    })
}

/// The next tick, or never when there is no interval.
async fn tick(interval: &mut Option<tokio::time::Interval>) {
    match interval {
        Some(interval) => {
            interval.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// `READY=1` with a first `STATUS=`; the queue is read only when systemd
/// listens, so start-up outside systemd skips those queries.
async fn notify_ready<S: DaemonStore>(notifier: &Notifier, store: &S, liveness: &Liveness) {
    if notifier.is_enabled() {
        notifier.ready(&current_status(store, liveness).await);
    }
}

async fn current_status<S: DaemonStore>(store: &S, liveness: &Liveness) -> String {
    let now = SystemTime::now();
    let read = async {
        let summary = store.queue_summary(now).await?;
        let paused = paused_accounts(&store.pauses().await?, now);
        Ok::<_, StoreError>((summary, paused))
    };
    match read.await {
        Ok((summary, paused)) => status_line(
            &summary,
            &paused,
            liveness.last_outcome().as_ref(),
            now,
            Instant::now(),
        ),
        Err(e) => format!("cannot read the queue: {e}"),
    }
}

/// Pings the systemd watchdog every half interval while no loop is stuck
/// past the deadline it promised; a stuck loop stops the pings, and systemd
/// restarts the service.
async fn ping_watchdog(
    liveness: Liveness,
    notifier: Notifier,
    every: Duration,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(every / 2);
    let mut complained = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let overdue = liveness.overdue(Instant::now());
        if overdue.is_empty() {
            notifier.watchdog();
            complained = false;
        } else if !complained {
            complained = true;
            for stuck in overdue {
                tracing::error!(
                    task = %stuck.name,
                    doing = stuck.doing,
                    late_by_s = stuck.late_by.as_secs(),
                    "a delivery task is stuck; no more watchdog pings, so systemd restarts the service (WatchdogSec=)"
                );
            }
        }
    }
}

fn log_start<S: DaemonStore>(store: &S, settings: &Settings, recovered: u64) {
    let rate_limits: Vec<String> = settings
        .accounts
        .iter()
        .map(|(name, a)| format!("{name}={}", a.rate_limit))
        .collect();
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        database = %store.describe(),
        base_url = %settings.mews.base_url,
        client = %settings.mews.client,
        accounts = ?settings.accounts.keys().collect::<Vec<_>>(),
        batch_size = settings.delivery.batch_size,
        poll_interval = %humantime::format_duration(settings.delivery.poll_interval),
        request_timeout = %humantime::format_duration(settings.mews.request_timeout),
        max_concurrent_requests = settings.delivery.max_concurrent_requests,
        rate_limits = ?rate_limits,
        reconcile = settings.delivery.reconcile,
        breaker_failures = settings.retry.breaker_failures,
        retry_base_delay = %humantime::format_duration(settings.retry.base_delay),
        retry_max_delay = %humantime::format_duration(settings.retry.max_delay),
        retry_max_attempts = settings.retry.max_attempts,
        retention_delivered = %humantime::format_duration(settings.retention.delivered),
        heartbeat = %humantime::format_duration(settings.log.heartbeat),
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
        if settings.delivery.reconcile {
            tracing::warn!(
                rows = recovered,
                "rows left `sending` by a previous run are pending again; Mews may already have some of them, so they are read back (messages/getAll) before being sent again"
            );
        } else {
            tracing::warn!(
                rows = recovered,
                "rows left `sending` by a previous run are pending again; Mews may already have some of them (possible duplicates: delivery.reconcile is off)"
            );
        }
    }
}
