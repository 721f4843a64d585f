//! The delivery loop of one account: claim → send → record, until shutdown.
//!
//! What a reply means for each row and for the account is decided by
//! [`decide`], a pure function; [`AccountWorker`] only does the I/O around it.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use backon::{ExponentialBuilder, Retryable};
use secrecy::SecretString;
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;

use crate::config::{DeliverySettings, RetrySettings};
use crate::mews::{MewsClient, Outcome, OutgoingMessage, Reply};
use crate::notify::Pulse;
use crate::retry::{exponential, retry_delay};
use crate::store::{AccountPause, ClaimedRow, Outbox, RowOutcome, StoreError};

/// Successful requests in a row after which a shrunk batch limit doubles.
const GROW_AFTER_SUCCESSES: u32 = 8;
/// Wait before trying the database again after it failed.
const STORE_RETRY_DELAY: Duration = Duration::from_secs(1);
/// Longest a database step may take before the watchdog counts the loop as
/// stuck: a statement waits at most `database.busy_timeout` (5 s by default)
/// for a lock; recording a full batch can take seconds on its own.
const STORE_STEP_BUDGET: Duration = Duration::from_secs(60);
/// Added to `mews.request_timeout` for the watchdog's patience with a request.
const REQUEST_SLACK: Duration = Duration::from_secs(10);

/// Why an account stops sending for a while.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PauseKind {
    /// 429: wait for Retry-After or an exponential pause.
    Throttled,
    /// 401/404: configuration is wrong; retry slowly, exponentially.
    Refused,
    /// Mews named a time (Retry-After on a 408/5xx): a floor for the account.
    RetryAfter,
}

/// What a reply means for the account as a whole.
#[derive(Debug, Clone, PartialEq)]
pub enum AccountAction {
    Continue,
    /// Stop sending; `at_least` is Mews's Retry-After when it gave one.
    Pause {
        kind: PauseKind,
        reason: String,
        at_least: Option<Duration>,
    },
}

/// What one reply to a batch means.
#[derive(Debug, Clone)]
pub struct Decision {
    /// Outcomes to store now.
    pub rows: Vec<(i64, RowOutcome)>,
    /// Rows to send again right away in smaller requests (a 400/403/413 on
    /// a batch: isolate the offending message).
    pub split: Vec<Vec<ClaimedRow>>,
    pub account: AccountAction,
    /// A smaller batch is likely to fare better (408, 413, a timeout).
    pub shrink: bool,
}

/// Decides what to store for `rows` after `outcome`. `jitter` is in `[0, 1)`.
pub fn decide(
    rows: &[ClaimedRow],
    outcome: &Outcome,
    retry: &RetrySettings,
    now: SystemTime,
    jitter: f64,
) -> Decision {
    let mut decision = Decision {
        rows: Vec::with_capacity(rows.len()),
        split: Vec::new(),
        account: AccountAction::Continue,
        shrink: false,
    };
    let retry_or_dead = |row: &ClaimedRow, error: &str, retry_after: Option<Duration>| {
        let attempt = row.attempts.saturating_add(1);
        if attempt >= retry.max_attempts {
            RowOutcome::Dead {
                error: format!("{error} (gave up after {attempt} attempts)"),
            }
        } else {
            let delay = retry_delay(
                attempt,
                retry.base_delay,
                retry.max_delay,
                jitter,
                retry_after,
            );
            RowOutcome::Retry {
                at: now + delay,
                error: error.to_owned(),
                attempt: true,
            }
        }
    };
    let release_all = |decision: &mut Decision| {
        decision
            .rows
            .extend(rows.iter().map(|r| (r.id, RowOutcome::Release)))
    };

    match outcome {
        Outcome::Accepted { by_identifier, .. } => {
            for row in rows {
                let outcome = match by_identifier.get(&row.id.to_string()) {
                    Some(message) => RowOutcome::Delivered {
                        mews_message_id: message.id.clone(),
                        mews_created_utc: message.created_utc.clone(),
                        mews_sender: message.sender.kind().to_owned(),
                    },
                    None => retry_or_dead(
                        row,
                        "Mews answered 200 without this message's Identifier (it may have been stored)",
                        None,
                    ),
                };
                decision.rows.push((row.id, outcome));
            }
        }
        Outcome::Rejected { error } | Outcome::TooLarge { error } => {
            decision.shrink = matches!(outcome, Outcome::TooLarge { .. });
            if let [row] = rows {
                decision.rows.push((
                    row.id,
                    RowOutcome::Dead {
                        error: error.clone(),
                    },
                ));
            } else {
                let (left, right) = rows.split_at(rows.len() / 2);
                decision.split = vec![left.to_vec(), right.to_vec()];
            }
        }
        Outcome::Unauthorized { error } | Outcome::NotFound { error } => {
            release_all(&mut decision);
            decision.account = AccountAction::Pause {
                kind: PauseKind::Refused,
                reason: error.clone(),
                at_least: None,
            };
        }
        Outcome::Throttled { error, retry_after } => {
            release_all(&mut decision);
            decision.account = AccountAction::Pause {
                kind: PauseKind::Throttled,
                reason: error.clone(),
                at_least: *retry_after,
            };
        }
        Outcome::Transient {
            error,
            retry_after,
            smaller,
            ..
        } => {
            decision.shrink = *smaller;
            for row in rows {
                decision
                    .rows
                    .push((row.id, retry_or_dead(row, error, *retry_after)));
            }
            if let Some(after) = retry_after {
                decision.account = AccountAction::Pause {
                    kind: PauseKind::RetryAfter,
                    reason: error.clone(),
                    at_least: Some(*after),
                };
            }
        }
    }
    decision
}

/// How long an account pauses, given the pause before (if any).
pub fn pause_length(
    kind: PauseKind,
    at_least: Option<Duration>,
    streak: u32,
    retry: &RetrySettings,
) -> Duration {
    let grown = exponential(streak, retry.pause_base, retry.pause_max);
    match (kind, at_least) {
        (PauseKind::RetryAfter, Some(after)) => after,
        (PauseKind::Throttled, Some(after)) => after,
        (_, Some(after)) => grown.max(after),
        (_, None) => grown,
    }
}

/// What a call to [`AccountWorker::step`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Sent at least one request.
    Worked,
    /// Nothing due; the next row is due at that time, if any is scheduled.
    Idle { next_due: Option<SystemTime> },
    /// The account is paused until then.
    Paused { until: SystemTime },
    /// The database failed; try again shortly.
    StoreFailed,
}

/// Delivers the rows of one account. Owned by one task.
pub struct AccountWorker<S: Outbox> {
    /// Where the rows are.
    store: S,
    /// The shared Mews client.
    client: MewsClient,
    /// This account's name, as in the `account` column.
    account: String,
    /// This account's AccessToken.
    access_token: SecretString,
    delivery: DeliverySettings,
    retry: RetrySettings,
    /// Bounds requests in flight across all accounts.
    requests: Arc<Semaphore>,
    /// Changes whenever another connection commits (new rows).
    changes: watch::Receiver<u64>,
    /// Cancelled when the daemon stops: finish the request in flight, then return.
    shutdown: CancellationToken,
    /// The account's pause, mirrored in the database.
    pause: Option<AccountPause>,
    /// Current batch limit: `delivery.batch_size`, halved on 408/413/timeouts.
    batch_limit: usize,
    /// Successful requests since the last shrink.
    successes: u32,
    /// Tells the watchdog this loop is alive (see [`crate::notify::Liveness`]).
    pulse: Option<Pulse>,
}

impl<S: Outbox> AccountWorker<S> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: S,
        client: MewsClient,
        account: String,
        access_token: SecretString,
        delivery: DeliverySettings,
        retry: RetrySettings,
        requests: Arc<Semaphore>,
        changes: watch::Receiver<u64>,
        shutdown: CancellationToken,
        pause: Option<AccountPause>,
    ) -> Self {
        let batch_limit = delivery.batch_size;
        AccountWorker {
            store,
            client,
            account,
            access_token,
            delivery,
            retry,
            requests,
            changes,
            shutdown,
            pause,
            batch_limit,
            successes: 0,
            pulse: None,
        }
    }

    /// Reports liveness to the watchdog through `pulse`.
    pub fn with_pulse(mut self, pulse: Pulse) -> Self {
        self.pulse = Some(pulse);
        self
    }

    fn busy(&self, doing: &'static str, within: Duration) {
        if let Some(pulse) = &self.pulse {
            pulse.busy(doing, within);
        }
    }

    fn waiting(&self) {
        if let Some(pulse) = &self.pulse {
            pulse.waiting();
        }
    }

    /// Runs until shutdown.
    pub async fn run(mut self) {
        if let Some(pause) = &self.pause
            && pause.until > SystemTime::now()
        {
            tracing::warn!(
                account = %self.account,
                paused_until = %crate::store::timestamp(pause.until),
                reason = %pause.reason,
                "account is paused (remembered from before the restart)"
            );
        }
        while !self.shutdown.is_cancelled() {
            self.busy("claiming rows", STORE_STEP_BUDGET);
            let wake_at = match self.step().await {
                Step::Worked => continue,
                Step::Idle { next_due } => next_due,
                Step::Paused { until } => Some(until),
                Step::StoreFailed => Some(SystemTime::now() + STORE_RETRY_DELAY),
            };
            let sleep = wake_at
                .map(|at| at.duration_since(SystemTime::now()).unwrap_or_default())
                .unwrap_or(Duration::from_secs(3600));
            self.waiting();
            tokio::select! {
                _ = self.shutdown.cancelled() => {}
                _ = tokio::time::sleep(sleep) => {}
                changed = self.changes.changed(), if !matches!(self.pause, Some(ref p) if p.until > SystemTime::now()) => {
                    if changed.is_err() {
                        // The watcher is gone (shutting down): poll instead.
                        tokio::time::sleep(self.delivery.poll_interval).await;
                    }
                }
            }
        }
    }

    /// One unit of work: claim a batch and deliver it, or say why not.
    pub async fn step(&mut self) -> Step {
        let now = SystemTime::now();
        if let Some(pause) = &self.pause
            && pause.until > now
        {
            return Step::Paused { until: pause.until };
        }
        let rows = match self.store.claim(&self.account, now, self.batch_limit).await {
            Ok(rows) => rows,
            Err(e) => {
                self.store_failed("claim rows", &e);
                return Step::StoreFailed;
            }
        };
        if rows.is_empty() {
            return match self.store.next_due(&self.account, now).await {
                Ok(next_due) => Step::Idle { next_due },
                Err(e) => {
                    self.store_failed("find the next due row", &e);
                    Step::StoreFailed
                }
            };
        }
        self.deliver(rows).await;
        Step::Worked
    }

    fn store_failed(&self, what: &str, e: &StoreError) {
        tracing::error!(account = %self.account, error = %e, "cannot {what}; retrying in {}s", STORE_RETRY_DELAY.as_secs());
    }

    /// Sends claimed rows, splitting on rejection, and records every outcome.
    async fn deliver(&mut self, rows: Vec<ClaimedRow>) {
        let (rows, unreadable): (Vec<_>, Vec<_>) = rows.into_iter().partition(|r| r.text.is_ok());
        let dead: Vec<_> = unreadable
            .iter()
            .map(|r| {
                (
                    r.id,
                    RowOutcome::Dead {
                        error: "text is not valid UTF-8; Mews cannot take it".into(),
                    },
                )
            })
            .collect();
        if !dead.is_empty() {
            tracing::warn!(account = %self.account, rows = dead.len(), "dead-lettered rows whose text is not UTF-8");
            self.record(&dead).await;
        }

        let mut queue = VecDeque::from([rows]);
        while let Some(batch) = queue.pop_front() {
            if batch.is_empty() {
                continue;
            }
            if self.shutdown.is_cancelled() || self.is_paused() {
                let released: Vec<_> = std::iter::once(batch)
                    .chain(queue.drain(..))
                    .flatten()
                    .map(|r| (r.id, RowOutcome::Release))
                    .collect();
                self.record(&released).await;
                return;
            }
            let reply = self.send(&batch).await;
            let decision = decide(
                &batch,
                &reply.outcome,
                &self.retry,
                SystemTime::now(),
                fastrand::f64(),
            );
            self.record(&decision.rows).await;
            self.adapt(&reply, &decision);
            for half in decision.split.into_iter().rev() {
                queue.push_front(half);
            }
        }
    }

    fn is_paused(&self) -> bool {
        matches!(&self.pause, Some(p) if p.until > SystemTime::now())
    }

    async fn send(&self, batch: &[ClaimedRow]) -> Reply {
        let messages: Vec<OutgoingMessage<'_>> = batch
            .iter()
            .map(|row| OutgoingMessage {
                message_thread_id: &row.message_thread_id,
                text: row.text.as_deref().unwrap_or_default(),
                identifier: row.id.to_string(),
            })
            .collect();
        // The semaphore is never closed, so acquiring only waits.
        self.waiting();
        let _permit = self.requests.acquire().await;
        self.busy(
            "waiting for Mews",
            self.client.request_timeout() + REQUEST_SLACK,
        );
        tracing::debug!(account = %self.account, batch = batch.len(), "messages/add: sending");
        let reply = self
            .client
            .add_messages(&self.access_token, &messages)
            .await;
        log_reply(&self.account, batch.len(), &reply);
        if let Some(pulse) = &self.pulse {
            pulse.outcome(&self.account, reply.outcome.name(), reply.http_status);
        }
        reply
    }

    /// Adjusts the batch limit and the account's pause after a reply.
    fn adapt(&mut self, reply: &Reply, decision: &Decision) {
        if decision.shrink && self.batch_limit > 1 {
            let old = self.batch_limit;
            self.batch_limit = (old / 2).max(1);
            self.successes = 0;
            tracing::warn!(account = %self.account, from = old, to = self.batch_limit, "batch limit lowered after {}", reply.outcome.name());
        } else if matches!(reply.outcome, Outcome::Accepted { .. }) {
            self.successes += 1;
            if self.batch_limit < self.delivery.batch_size && self.successes >= GROW_AFTER_SUCCESSES
            {
                let old = self.batch_limit;
                self.batch_limit = (old * 2).min(self.delivery.batch_size);
                self.successes = 0;
                tracing::info!(account = %self.account, from = old, to = self.batch_limit, "batch limit raised after sustained success");
            }
        }
        match &decision.account {
            AccountAction::Continue => {
                if matches!(reply.outcome, Outcome::Accepted { .. }) && self.pause.is_some() {
                    self.pause = None;
                    let store = self.store.clone();
                    let account = self.account.clone();
                    tokio::spawn(async move {
                        if let Err(e) = store.clear_pause(&account).await {
                            tracing::warn!(%account, error = %e, "cannot clear the account's remembered pause");
                        }
                    });
                }
            }
            AccountAction::Pause {
                kind,
                reason,
                at_least,
            } => {
                let streak = self.pause.as_ref().map_or(0, |p| p.streak) + 1;
                let length = pause_length(*kind, *at_least, streak, &self.retry);
                let pause = AccountPause {
                    account: self.account.clone(),
                    until: SystemTime::now() + length,
                    reason: reason.clone(),
                    streak,
                };
                let wait = humantime::format_duration(Duration::from_secs(length.as_secs().max(1)));
                match kind {
                    PauseKind::Refused => tracing::error!(
                        account = %self.account, pause = %wait, reason = %reason,
                        "Mews refused this account's requests: check mews.base_url, mews.client_token and accounts.{}.access_token; no message is dropped, retrying after the pause",
                        self.account
                    ),
                    PauseKind::Throttled => tracing::warn!(
                        account = %self.account, pause = %wait, reason = %reason,
                        "Mews rate-limited this account (429); pausing all its requests"
                    ),
                    PauseKind::RetryAfter => tracing::warn!(
                        account = %self.account, pause = %wait, reason = %reason,
                        "Mews asked to retry later; pausing this account"
                    ),
                }
                self.pause = Some(pause.clone());
                let store = self.store.clone();
                tokio::spawn(async move {
                    if let Err(e) = store.save_pause(&pause).await {
                        tracing::warn!(account = %pause.account, error = %e, "cannot remember the account's pause");
                    }
                });
            }
        }
    }

    /// Stores outcomes, retrying while the database fails (a full disk, a
    /// lock held too long): an outcome is never only logged. Gives up only
    /// when shutting down; the rows then stay `sending` and are taken up
    /// again at the next start.
    async fn record(&self, outcomes: &[(i64, RowOutcome)]) {
        if outcomes.is_empty() {
            return;
        }
        let attempt = || async {
            self.busy("recording outcomes", STORE_STEP_BUDGET);
            self.store.record(outcomes, SystemTime::now()).await
        };
        let result = attempt
            .retry(
                ExponentialBuilder::new()
                    .with_min_delay(Duration::from_millis(50))
                    .with_max_delay(Duration::from_secs(5))
                    .with_jitter()
                    .without_max_times(),
            )
            .sleep(tokio::time::sleep)
            .when(|_| !self.shutdown.is_cancelled())
            .notify(|e, wait| {
                tracing::error!(account = %self.account, rows = outcomes.len(), error = %e, retry_in = ?wait, "cannot record delivery outcomes; retrying");
            })
            .await;
        if let Err(e) = result {
            tracing::error!(account = %self.account, rows = outcomes.len(), error = %e, "stopping before the outcomes could be recorded; these rows stay `sending` and will be re-sent after restart");
        }
    }
}

fn log_reply(account: &str, batch: usize, reply: &Reply) {
    let duration_ms = u64::try_from(reply.elapsed.as_millis()).unwrap_or(u64::MAX);
    let request_id = reply.request_id.as_deref().unwrap_or("-");
    let status = reply.http_status.unwrap_or(0);
    match &reply.outcome {
        Outcome::Accepted {
            by_identifier,
            unlabelled,
        } => tracing::info!(
            account,
            batch,
            outcome = "accepted",
            http_status = status,
            duration_ms,
            request_id,
            returned = by_identifier.len(),
            unlabelled,
            "messages/add"
        ),
        Outcome::Rejected { error }
        | Outcome::TooLarge { error }
        | Outcome::Unauthorized { error }
        | Outcome::NotFound { error }
        | Outcome::Throttled { error, .. }
        | Outcome::Transient { error, .. } => tracing::warn!(
            account, batch, outcome = reply.outcome.name(), http_status = status, duration_ms,
            request_id, error = %error, "messages/add"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mews::{AddedMessage, Sender};
    use std::collections::HashMap;

    fn retry() -> RetrySettings {
        RetrySettings {
            base_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(60),
            max_attempts: 3,
            pause_base: Duration::from_secs(30),
            pause_max: Duration::from_secs(900),
        }
    }

    fn rows(n: i64) -> Vec<ClaimedRow> {
        (1..=n)
            .map(|id| ClaimedRow {
                id,
                message_thread_id: format!("{id:08}-0000-4000-8000-000000000000"),
                text: Ok(format!("m{id}")),
                attempts: 0,
            })
            .collect()
    }

    fn now() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    #[test]
    fn a_200_delivers_the_rows_it_names_and_retries_the_rest() {
        let rows = rows(3);
        let mut by_identifier = HashMap::new();
        for id in ["3", "1"] {
            by_identifier.insert(
                id.to_owned(),
                AddedMessage {
                    id: format!("mews-{id}"),
                    message_thread_id: None,
                    text: None,
                    sender: Sender::Plain("Application".into()),
                    created_utc: "2026-11-28T07:00:00Z".into(),
                },
            );
        }
        let d = decide(
            &rows,
            &Outcome::Accepted {
                by_identifier,
                unlabelled: 0,
            },
            &retry(),
            now(),
            0.0,
        );
        assert!(
            matches!(&d.rows[0], (1, RowOutcome::Delivered { mews_message_id, .. }) if mews_message_id == "mews-1")
        );
        assert!(matches!(
            &d.rows[1],
            (2, RowOutcome::Retry { attempt: true, .. })
        ));
        assert!(
            matches!(&d.rows[2], (3, RowOutcome::Delivered { mews_message_id, .. }) if mews_message_id == "mews-3")
        );
        assert_eq!(d.account, AccountAction::Continue);
    }

    #[test]
    fn a_rejected_batch_is_split_and_a_rejected_single_is_dead() {
        let rejected = Outcome::Rejected {
            error: "HTTP 403: no (RequestId r)".into(),
        };
        let d = decide(&rows(5), &rejected, &retry(), now(), 0.5);
        assert!(d.rows.is_empty());
        assert_eq!(d.split.iter().map(Vec::len).collect::<Vec<_>>(), [2, 3]);
        let d = decide(&rows(1), &rejected, &retry(), now(), 0.5);
        assert_eq!(
            d.rows,
            [(
                1,
                RowOutcome::Dead {
                    error: "HTTP 403: no (RequestId r)".into()
                }
            )]
        );
    }

    #[test]
    fn bad_tokens_pause_the_account_without_touching_the_rows() {
        let d = decide(
            &rows(2),
            &Outcome::Unauthorized {
                error: "HTTP 401".into(),
            },
            &retry(),
            now(),
            0.5,
        );
        assert_eq!(d.rows, [(1, RowOutcome::Release), (2, RowOutcome::Release)]);
        assert!(matches!(
            d.account,
            AccountAction::Pause {
                kind: PauseKind::Refused,
                ..
            }
        ));
    }

    #[test]
    fn throttling_pauses_for_retry_after_and_costs_no_attempt() {
        let outcome = Outcome::Throttled {
            error: "HTTP 429".into(),
            retry_after: Some(Duration::from_secs(7)),
        };
        let d = decide(&rows(2), &outcome, &retry(), now(), 0.5);
        assert_eq!(d.rows, [(1, RowOutcome::Release), (2, RowOutcome::Release)]);
        let AccountAction::Pause { kind, at_least, .. } = d.account else {
            panic!()
        };
        assert_eq!(
            pause_length(kind, at_least, 1, &retry()),
            Duration::from_secs(7)
        );
        assert_eq!(
            pause_length(kind, None, 1, &retry()),
            Duration::from_secs(30)
        );
        assert_eq!(
            pause_length(kind, None, 3, &retry()),
            Duration::from_secs(120)
        );
    }

    #[test]
    fn transient_failures_back_off_and_end_dead_after_max_attempts() {
        let outcome = Outcome::Transient {
            error: "HTTP 500".into(),
            retry_after: Some(Duration::from_secs(20)),
            maybe_stored: true,
            smaller: false,
        };
        let mut rows = rows(2);
        rows[1].attempts = 2;
        let d = decide(&rows, &outcome, &retry(), now(), 0.0);
        assert_eq!(
            d.rows[0],
            (
                1,
                RowOutcome::Retry {
                    at: now() + Duration::from_secs(20),
                    error: "HTTP 500".into(),
                    attempt: true
                }
            )
        );
        assert_eq!(
            d.rows[1],
            (
                2,
                RowOutcome::Dead {
                    error: "HTTP 500 (gave up after 3 attempts)".into()
                }
            )
        );
        assert!(matches!(
            d.account,
            AccountAction::Pause {
                kind: PauseKind::RetryAfter,
                ..
            }
        ));
    }
}
