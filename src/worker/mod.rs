//! The delivery loop of one account: claim → (read back) → send → record,
//! until shutdown.
//!
//! What a reply means for each row and for the account is decided by
//! [`decide`], a pure function; the account's longer memory (batch size,
//! circuit breaker, systemic rejection) lives in [`crate::adapt`], the rate
//! limit in [`crate::limiter`], the read-back matching in
//! [`crate::reconcile`]. [`AccountWorker`] only does the I/O around them.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use backon::{ExponentialBuilder, Retryable};
use secrecy::SecretString;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::adapt::{
    BatchLimit, Breaker, HELD_PREFIX, RejectionStreak, RejectionWatch, SYSTEMIC_SAMPLE,
    StreakVerdict,
};
use crate::config::{DeliverySettings, RetrySettings};
use crate::limiter::{RateLimit, SlidingWindow};
use crate::mews::{AddedMessage, MewsClient, Outcome, OutgoingMessage, ReadBack, Reply};
use crate::notify::Pulse;
use crate::reconcile::{self, ClockOffset};
use crate::request_size;
use crate::retry::{exponential, retry_delay, throttle_pause};
use crate::store::{AccountPause, ClaimedRow, Outbox, RowOutcome, StoreError};

/// Wait before trying the database again after it failed.
const STORE_RETRY_DELAY: Duration = Duration::from_secs(1);
/// Longest a database step may take before the watchdog counts the loop as
/// stuck: a statement waits at most `database.busy_timeout` (5 s by default)
/// for a lock; recording a full batch can take seconds on its own.
const STORE_STEP_BUDGET: Duration = Duration::from_secs(60);
/// Added to `mews.request_timeout` for the watchdog's patience with a request.
const REQUEST_SLACK: Duration = Duration::from_secs(10);
/// The start of a `messages/add` request is recorded this far ahead of the
/// clock, so that the request, sent right after the commit, starts before
/// the time recorded: rows it leaves `sending` then settle from no earlier
/// than its real start. While a stamp is still half its lead ahead, it
/// covers the next requests too: one write every few seconds per account,
/// not one per request (a drain sends hundreds a second), for at most this
/// much longer a settle after a crash. A slow commit makes the lead grow.
const START_STAMP_LEAD: Duration = Duration::from_secs(5);

/// Why an account stops sending for a while.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PauseKind {
    /// 429: wait for Retry-After or an exponential pause.
    Throttled,
    /// 401/404: configuration is wrong; retry slowly, exponentially.
    Refused,
    /// Mews named a time (Retry-After on a 408/5xx): a floor for the account.
    RetryAfter,
    /// The circuit breaker opened: repeated 5xx/timeouts/connection errors.
    Breaker,
    /// Every sampled message was rejected alike (see [`crate::adapt::RejectionWatch`]).
    Systemic,
    /// A 3xx: base_url does not lead to Mews; retry slowly, exponentially.
    Redirected,
}

impl PauseKind {
    /// Starts the pause reason shown by `status`.
    pub fn label(self) -> &'static str {
        match self {
            PauseKind::Throttled => "rate-limited by Mews (429)",
            PauseKind::Refused => "refused by Mews",
            PauseKind::RetryAfter => "Mews asked to retry later",
            PauseKind::Breaker => "circuit breaker open",
            PauseKind::Systemic => "systemic rejection",
            PauseKind::Redirected => "redirected away from mews.base_url",
        }
    }
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
    let delay = |row: &ClaimedRow, floor: Option<Duration>| {
        let attempt = row.attempts.saturating_add(1);
        retry_delay(attempt, retry.base_delay, retry.max_delay, jitter, floor)
    };
    let retry_or_dead =
        |row: &ClaimedRow, error: &str, floor: Option<Duration>, maybe_stored: bool| {
            let attempt = row.attempts.saturating_add(1);
            if attempt >= retry.max_attempts {
                RowOutcome::Dead {
                    error: format!("{error} (gave up after {attempt} attempts)"),
                }
            } else {
                RowOutcome::Retry {
                    at: now + delay(row, floor),
                    error: error.to_owned(),
                    attempt: true,
                    maybe_stored,
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
                    Some(message) => delivered(message),
                    None => retry_or_dead(
                        row,
                        "Mews answered 200 without this message's Identifier (it may have been stored)",
                        None,
                        true,
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
        Outcome::Redirected { error } => {
            // Nothing reached Mews: no attempt, not ambiguous.
            release_all(&mut decision);
            decision.account = AccountAction::Pause {
                kind: PauseKind::Redirected,
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
        Outcome::Unreachable { error } => {
            // Mews never saw the request: wait, but it is not an attempt.
            for row in rows {
                decision.rows.push((
                    row.id,
                    RowOutcome::Retry {
                        at: now + delay(row, None),
                        error: error.clone(),
                        attempt: false,
                        maybe_stored: false,
                    },
                ));
            }
        }
        Outcome::Transient {
            error,
            retry_after,
            maybe_stored,
            smaller,
            settle,
        } => {
            decision.shrink = *smaller;
            // A request Mews may still be working on is neither read back
            // nor sent again before it has had time to finish.
            let floor = match (retry_after, settle) {
                (Some(a), Some(b)) => Some((*a).max(*b)),
                (a, b) => a.or(*b),
            };
            for row in rows {
                decision
                    .rows
                    .push((row.id, retry_or_dead(row, error, floor, *maybe_stored)));
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

/// A row Mews has, as this message.
fn delivered(message: &AddedMessage) -> RowOutcome {
    RowOutcome::Delivered {
        mews_message_id: message.id.clone(),
        mews_created_utc: message.created_utc.clone(),
        mews_sender: message.sender.kind().to_owned(),
    }
}

/// How long an account pauses, given how many pauses came in a row.
pub fn pause_length(
    kind: PauseKind,
    at_least: Option<Duration>,
    streak: u32,
    retry: &RetrySettings,
) -> Duration {
    let grown = exponential(streak, retry.pause_base, retry.pause_max);
    match (kind, at_least) {
        (PauseKind::RetryAfter, Some(after)) => after,
        // A 429 always pauses: `Retry-After: 0` or a past date is no licence
        // to hammer (see `throttle_pause`).
        (PauseKind::Throttled, at_least) => throttle_pause(
            at_least,
            streak,
            retry.base_delay,
            retry.pause_base,
            retry.pause_max,
        ),
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
    /// The daemon is stopping.
    Stopping,
}

/// What reading back ambiguous rows came to.
enum ReadBackResult {
    /// Every page of the window, newest first.
    Messages(Vec<AddedMessage>),
    /// getAll did not answer usefully: send the rows again unchecked.
    Failed(String),
    /// The account paused (429) or the daemon is stopping: send nothing.
    Stop,
}

/// Delivers the rows of one account. Owned by one task, which sends one
/// request at a time.
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
    /// This account's request log; `None` when `rate_limit = "off"`.
    limiter: Option<SlidingWindow>,
    /// Current batch limit: `delivery.batch_size`, halved on 408/413/timeouts.
    batch: BatchLimit,
    /// Consecutive failed requests, for the circuit breaker.
    breaker: Breaker,
    /// Rejected single messages since the last accepted request, across
    /// batches (systemic rejection of a quiet account). Not stored: after a
    /// restart the held rows are sent again when due and judged afresh.
    rejections: RejectionStreak,
    /// Tells the watchdog this loop is alive (see [`crate::notify::Liveness`]).
    pulse: Option<Pulse>,
    /// Bytes of a `messages/add` body with no message in it (tokens
    /// included), for `delivery.max_request_bytes`.
    envelope_bytes: usize,
    /// Mews's clock against ours, from the `Date` of a recent response, and
    /// when it was measured ([`reconcile::keep_measurement`]); decides which
    /// copies a read-back may adopt.
    clock: Option<(ClockOffset, std::time::Instant)>,
    /// The latest start stamp committed ([`Outbox::request_starting`]).
    started_by: Option<SystemTime>,
}

impl<S: Outbox> AccountWorker<S> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: S,
        client: MewsClient,
        account: String,
        access_token: SecretString,
        rate_limit: RateLimit,
        delivery: DeliverySettings,
        retry: RetrySettings,
        requests: Arc<Semaphore>,
        changes: watch::Receiver<u64>,
        shutdown: CancellationToken,
        pause: Option<AccountPause>,
    ) -> Self {
        let batch = BatchLimit::new(delivery.batch_size);
        let breaker = Breaker::new(retry.breaker_failures);
        let client = client.with_max_request_bytes(delivery.max_request_bytes);
        let envelope_bytes = client.add_messages_envelope_bytes(&access_token);
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
            limiter: SlidingWindow::new(rate_limit),
            batch,
            breaker,
            rejections: RejectionStreak::default(),
            pulse: None,
            envelope_bytes,
            clock: None,
            started_by: None,
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
        self.restore_request_log().await;
        while !self.shutdown.is_cancelled() {
            self.busy("claiming rows", STORE_STEP_BUDGET);
            let wake_at = match self.step().await {
                Step::Worked => continue,
                Step::Idle { next_due } => next_due,
                Step::Paused { until } => Some(until),
                Step::StoreFailed => Some(SystemTime::now() + STORE_RETRY_DELAY),
                Step::Stopping => break,
            };
            let sleep = wake_at
                .map(|at| at.duration_since(SystemTime::now()).unwrap_or_default())
                .unwrap_or(Duration::from_secs(3600));
            self.waiting();
            tokio::select! {
                _ = self.shutdown.cancelled() => {}
                _ = tokio::time::sleep(sleep) => {}
                changed = self.changes.changed(), if !self.is_paused() => {
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
        // Rows stay `pending` (and rows inserted meanwhile can join the
        // batch) until a request may go.
        if !self.wait_for_room().await {
            return Step::Stopping;
        }
        let now = SystemTime::now();
        // After a systemic pause one message probes: a batch would only be
        // bisected down to a single rejection again.
        let limit = if self.rejections.probing() {
            1
        } else {
            self.batch.current()
        };
        // The claim loads at most one request's worth of text (plus one row).
        let text_budget = self
            .delivery
            .max_request_bytes
            .saturating_sub(self.envelope_bytes);
        let rows = match self
            .store
            .claim_within(&self.account, now, limit, text_budget)
            .await
        {
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

    /// Reads back, sends (splitting on rejection), and records every outcome.
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
        let Some(rows) = self.reconcile(rows).await else {
            return;
        };
        let packed = request_size::pack(rows, self.envelope_bytes, self.delivery.max_request_bytes);
        if !packed.oversize.is_empty() {
            tracing::warn!(
                account = %self.account, rows = packed.oversize.len(),
                max_request_bytes = self.delivery.max_request_bytes,
                "dead-lettered rows too large for one request: split their texts or raise delivery.max_request_bytes, then `mews-outbox dead requeue` them (see `mews-outbox dead list`)"
            );
            self.record(&packed.oversize).await;
        }

        let mut queue = VecDeque::from(packed.requests);
        let mut watch = RejectionWatch::default();
        // An accepted request of this batch proves the account works: a
        // single rejected after it is its own fault, at once.
        let mut accepted_in_batch = false;
        while let Some(batch) = queue.pop_front() {
            if batch.is_empty() {
                continue;
            }
            let reply = if self.shutdown.is_cancelled() || self.is_paused() {
                None
            } else {
                self.send(&batch).await
            };
            let Some(reply) = reply else {
                // Stopping or paused: the rows not sent go back untouched.
                let released: Vec<_> = watch
                    .held()
                    .into_iter()
                    .chain(
                        std::iter::once(batch)
                            .chain(queue.drain(..))
                            .flatten()
                            .map(|r| r.id),
                    )
                    .map(|id| (id, RowOutcome::Release))
                    .collect();
                self.record(&released).await;
                return;
            };
            let decision = decide(
                &batch,
                &reply.outcome,
                &self.retry,
                SystemTime::now(),
                fastrand::f64(),
            );
            if let Outcome::Accepted {
                by_identifier,
                unlabelled,
            } = &reply.outcome
            {
                warn_on_mismatch(
                    &self.account,
                    batch.len(),
                    by_identifier.len(),
                    *unlabelled,
                    &decision,
                );
            }
            let judged = watch.observe(&batch, &reply.outcome, &decision.rows, &mut queue);
            if matches!(reply.outcome, Outcome::Accepted { .. }) {
                accepted_in_batch = true;
                let sent: Vec<i64> = batch.iter().map(|r| r.id).collect();
                let dead = self.rejections.accepted(&sent);
                self.dead_letter_held(&dead).await;
            }
            let mut streak = None;
            if judged.record {
                match (batch.as_slice(), &reply.outcome) {
                    ([row], Outcome::Rejected { error }) if !accepted_in_batch => {
                        streak = self.hold_rejected(row, error).await;
                    }
                    _ => self.record(&decision.rows).await,
                }
            }
            self.record(&judged.flush).await;
            if let Some(systemic) = judged.systemic {
                let released: Vec<_> = systemic
                    .rows
                    .iter()
                    .copied()
                    .chain(queue.drain(..).flatten().map(|r| r.id))
                    .map(|id| (id, RowOutcome::Release))
                    .collect();
                tracing::error!(
                    account = %self.account, rows_released = released.len(), error = %systemic.error,
                    "ALERT: Mews rejected {SYSTEMIC_SAMPLE} single messages from across the batch with the same error and accepted none: this looks systemic (a daemon bug, a proxy answering for Mews, a revoked permission), not bad messages; nothing is dead-lettered, the account pauses"
                );
                self.record(&released).await;
                self.rejections.systemic(systemic.error.clone());
                self.pause(
                    PauseKind::Systemic,
                    format!(
                        "{SYSTEMIC_SAMPLE} of {SYSTEMIC_SAMPLE} sampled messages rejected with {}",
                        systemic.error
                    ),
                    None,
                )
                .await;
                return;
            }
            if let Some(reason) = streak {
                // The rejected row (still `sending`) and the rest of the
                // claim go back untouched; the streak's earlier rows already
                // wait `pending`.
                let released: Vec<_> = batch
                    .iter()
                    .map(|r| r.id)
                    .chain(queue.drain(..).flatten().map(|r| r.id))
                    .map(|id| (id, RowOutcome::Release))
                    .collect();
                self.record(&released).await;
                self.pause(PauseKind::Systemic, reason, None).await;
                return;
            }
            self.adapt(&reply, &decision).await;
            for half in decision.split.into_iter().rev() {
                queue.push_front(half);
            }
        }
        let held = watch.finish();
        self.record(&held).await;
    }

    /// A single message was rejected with nothing accepted since the
    /// streak began: hold it (or, once the streak is systemic, return the
    /// pause reason; the caller releases the row and pauses).
    async fn hold_rejected(&mut self, row: &ClaimedRow, error: &str) -> Option<String> {
        let probing = self.rejections.probing();
        let (alike, rows) = match self.rejections.rejected(row.id, error) {
            StreakVerdict::Systemic { error, rows } => (error, rows),
            StreakVerdict::Hold { dead } => {
                self.dead_letter_held(&dead).await;
                let attempt = row.attempts.saturating_add(1);
                let outcome = if attempt >= self.retry.max_attempts {
                    RowOutcome::Dead {
                        error: format!(
                            "{error} (gave up after {attempt} attempts, held pending a systemic-rejection verdict)"
                        ),
                    }
                } else {
                    // Its own retry schedule: if nothing else comes, it is
                    // sent again (a probe of its own) and judged by
                    // max_attempts at the latest.
                    let delay = retry_delay(
                        attempt,
                        self.retry.base_delay,
                        self.retry.max_delay,
                        fastrand::f64(),
                        None,
                    );
                    RowOutcome::Retry {
                        at: SystemTime::now() + delay,
                        error: format!(
                            "{HELD_PREFIX} (Mews accepted no request of this account since; dead with this error once one is accepted, systemic after {SYSTEMIC_SAMPLE} rejected alike): {error}"
                        ),
                        attempt: true,
                        maybe_stored: false,
                    }
                };
                tracing::warn!(
                    account = %self.account, row = row.id, error = %error,
                    "a message Mews rejected is held, not dead-lettered, until a request of this account is accepted (then it is dead) or {SYSTEMIC_SAMPLE} messages in a row are rejected alike (then the account pauses); nothing to do unless more follow"
                );
                self.record(&[(row.id, outcome)]).await;
                return None;
            }
        };
        if probing {
            return Some(format!(
                "the probe after the pause was rejected again with {alike}"
            ));
        }
        tracing::error!(
            account = %self.account, rows_held = rows.len(), error = %alike,
            "ALERT: Mews rejected {SYSTEMIC_SAMPLE} single messages in a row, across requests, with the same error and accepted none: this looks systemic (a daemon bug, a proxy answering for Mews, a revoked permission), not bad messages; nothing is dead-lettered, the account pauses"
        );
        Some(format!(
            "{} single messages in a row rejected with {alike}, none accepted",
            rows.len()
        ))
    }

    /// Held rows whose rejection turned out to be their own become dead.
    async fn dead_letter_held(&self, dead: &[(i64, String)]) {
        if dead.is_empty() {
            return;
        }
        let attempt = || async {
            self.busy("recording outcomes", STORE_STEP_BUDGET);
            self.store
                .dead_letter_held(dead, HELD_PREFIX, SystemTime::now())
                .await
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
                tracing::error!(account = %self.account, rows = dead.len(), error = %e, retry_in = ?wait, "cannot record delivery outcomes; retrying");
            })
            .await;
        match result {
            Ok(0) => {}
            Ok(rows) => tracing::warn!(
                account = %self.account, rows, error = %dead.first().map_or("", |(_, e)| e.as_str()),
                "held rejected messages are dead: Mews accepted a request of this account since, so the rejection was theirs; see `mews-outbox dead list`"
            ),
            // They stay pending, held: sent again when due and judged then.
            Err(e) => {
                tracing::error!(account = %self.account, rows = dead.len(), error = %e, "stopping before held rejected messages could be dead-lettered; they are sent again after restart")
            }
        }
    }

    fn is_paused(&self) -> bool {
        matches!(&self.pause, Some(p) if p.until > SystemTime::now())
    }

    /// Waits until this account's rate limit lets one more request go;
    /// `false` when stopping meanwhile.
    async fn wait_for_room(&self) -> bool {
        let Some(limiter) = &self.limiter else {
            return true;
        };
        let now = Instant::now();
        // One request at a time per account: none is in flight here, so the
        // limiter always names a time.
        let at = limiter.ready_at(now).unwrap_or(now);
        if at > now {
            tracing::debug!(account = %self.account, wait_ms = (at - now).as_millis() as u64, "rate limit: waiting for room in the window");
            tokio::select! {
                _ = self.shutdown.cancelled() => return false,
                _ = tokio::time::sleep_until(at) => {}
            }
        }
        true
    }

    /// Waits until this account's rate limit and the shared bound on
    /// requests in flight let one more go. `None` when stopping meanwhile.
    async fn admit(&mut self) -> Option<OwnedSemaphorePermit> {
        if !self.wait_for_room().await {
            return None;
        }
        let permit = tokio::select! {
            _ = self.shutdown.cancelled() => return None,
            // The semaphore is never closed.
            permit = self.requests.clone().acquire_owned() => permit.ok()?,
        };
        if let Some(limiter) = &mut self.limiter {
            limiter.start();
        }
        Some(permit)
    }

    /// A request admitted by [`AccountWorker::admit`] ended: it takes its
    /// place in the window, remembered across restarts.
    async fn request_ended(&mut self) {
        let Some(limiter) = &mut self.limiter else {
            return;
        };
        let now = Instant::now();
        limiter.finish(now);
        let wall = SystemTime::now();
        let ends: Vec<SystemTime> = limiter.ends().map(|end| wall - (now - end)).collect();
        if let Err(e) = self.store.save_recent_requests(&self.account, &ends).await {
            tracing::warn!(account = %self.account, error = %e, "cannot remember the account's recent requests; after a restart the rate limit starts afresh");
        }
    }

    async fn restore_request_log(&mut self) {
        let Some(limiter) = &mut self.limiter else {
            return;
        };
        match self.store.recent_requests(&self.account).await {
            Ok(ends) => {
                let (now, wall) = (Instant::now(), SystemTime::now());
                for end in ends {
                    // A time ahead of the clock (it was set back) counts as now.
                    let age = wall.duration_since(end).unwrap_or_default();
                    if let Some(at) = now.checked_sub(age) {
                        limiter.remember(at);
                    }
                }
            }
            Err(e) => {
                tracing::warn!(account = %self.account, error = %e, "cannot read the account's recent requests; the rate limit starts afresh")
            }
        }
    }

    /// Sends one batch to messages/add. `None` when stopping before it went,
    /// or when its start could not be recorded.
    async fn send(&mut self, batch: &[ClaimedRow]) -> Option<Reply> {
        let messages: Vec<OutgoingMessage<'_>> = batch
            .iter()
            .map(|row| OutgoingMessage {
                message_thread_id: &row.message_thread_id,
                text: row.text.as_deref().unwrap_or_default(),
                identifier: row.id.to_string(),
            })
            .collect();
        self.waiting();
        let permit = self.admit().await?;
        if !self.stamp_request_start().await {
            drop(permit);
            self.request_ended().await;
            return None;
        }
        self.busy(
            "waiting for Mews",
            self.client.request_timeout() + REQUEST_SLACK,
        );
        tracing::debug!(account = %self.account, batch = batch.len(), "messages/add: sending");
        let reply = self
            .client
            .add_messages(&self.access_token, &messages)
            .await;
        drop(permit);
        self.request_ended().await;
        self.measured(reply.clock);
        log_reply(&self.account, batch.len(), &reply);
        if let Some(pulse) = &self.pulse {
            pulse.outcome(&self.account, reply.outcome.name(), reply.http_status);
        }
        Some(reply)
    }

    /// Keeps what a response's `Date` said about Mews's clock.
    fn measured(&mut self, clock: Option<ClockOffset>) {
        if let Some(new) = clock {
            self.clock = Some(reconcile::keep_measurement(
                self.clock,
                new,
                std::time::Instant::now(),
            ));
        }
    }

    /// Records, just before a `messages/add` request goes, a time no earlier
    /// than its start (see [`Outbox::request_starting`]). `false` when it
    /// could not: then the request is not sent (a crash during it would
    /// leave rows that settle from an older time).
    async fn stamp_request_start(&mut self) -> bool {
        if self
            .started_by
            .is_some_and(|by| SystemTime::now() + START_STAMP_LEAD / 2 <= by)
        {
            return true;
        }
        self.busy("recording a request's start", STORE_STEP_BUDGET);
        let mut lead = START_STAMP_LEAD;
        for _ in 0..4 {
            let by = SystemTime::now() + lead;
            if let Err(e) = self.store.request_starting(&self.account, by).await {
                tracing::error!(account = %self.account, error = %e, "cannot record that a request is starting, so it is not sent; its rows wait and are tried again");
                return false;
            }
            // Half the lead is left for building the request.
            if SystemTime::now() + lead / 2 <= by {
                self.started_by = Some(by);
                return true;
            }
            lead *= 4;
        }
        tracing::error!(account = %self.account, "recording that a request is starting keeps taking seconds, so it is not sent; its rows wait and are tried again; check the database's disk");
        false
    }

    /// Rows whose last send may have reached Mews are looked for there
    /// first; the ones found are delivered, the rest are returned to be sent
    /// with the others. `None` when nothing is to be sent now (the account
    /// paused, the daemon is stopping, the database failed): the rows were
    /// released.
    async fn reconcile(&mut self, rows: Vec<ClaimedRow>) -> Option<Vec<ClaimedRow>> {
        if !self.delivery.reconcile || !rows.iter().any(|r| r.needs_reconcile) {
            return Some(rows);
        }
        let (doubtful, mut send): (Vec<_>, Vec<_>) =
            rows.into_iter().partition(|r| r.needs_reconcile);
        let release = |rows: &[ClaimedRow], more: &[ClaimedRow]| -> Vec<(i64, RowOutcome)> {
            rows.iter()
                .chain(more)
                .map(|r| (r.id, RowOutcome::Release))
                .collect()
        };
        let messages = match self.read_back(&doubtful).await {
            ReadBackResult::Messages(messages) => messages,
            ReadBackResult::Failed(error) => {
                tracing::warn!(
                    account = %self.account, rows = doubtful.len(), resent = doubtful.len(), error = %error,
                    "reconciliation failed: re-sending these rows without checking, Mews may show some of them twice"
                );
                send.extend(doubtful);
                send.sort_by_key(|r| r.id);
                return Some(send);
            }
            ReadBackResult::Stop => {
                self.record(&release(&doubtful, &send)).await;
                return None;
            }
        };
        // The read-back's own answer has measured the clock, if nothing had.
        let clock = self.clock.map_or(ClockOffset::UNMEASURED, |(c, _)| c);
        let candidates = reconcile::candidates(&doubtful, &messages, &clock);
        let owned = match self.store.owned_message_ids(&candidates).await {
            Ok(owned) => owned,
            Err(e) => {
                self.store_failed("look up which Mews messages are already ours", &e);
                self.record(&release(&doubtful, &send)).await;
                return None;
            }
        };
        let matched = reconcile::match_rows(&doubtful, &messages, &owned, &clock);
        let found: Vec<_> = matched
            .found
            .iter()
            .map(|(id, message)| (*id, delivered(message)))
            .collect();
        self.record(&found).await;
        if let Err(e) = self.store.clear_reconcile(&matched.absent).await {
            // They stay marked and are read back again next time: harmless.
            tracing::warn!(account = %self.account, error = %e, "cannot clear the reconciliation mark of rows Mews does not have");
        }
        tracing::info!(
            account = %self.account, reconciled = found.len(), resent = matched.absent.len(),
            "reconciliation: rows found at Mews are marked delivered, the others are sent again"
        );
        let absent: HashSet<i64> = matched.absent.iter().copied().collect();
        send.extend(doubtful.into_iter().filter(|r| absent.contains(&r.id)));
        send.sort_by_key(|r| r.id);
        Some(send)
    }

    /// Reads the threads of `rows` back from Mews, page by page.
    async fn read_back(&mut self, rows: &[ClaimedRow]) -> ReadBackResult {
        let mut threads: Vec<&str> = rows.iter().map(|r| r.message_thread_id.as_str()).collect();
        threads.sort_unstable();
        threads.dedup();
        let clock = self.clock.map(|(c, _)| c);
        let window = reconcile::window(rows, SystemTime::now(), clock.as_ref());
        let mut messages = Vec::new();
        let mut cursor: Option<String> = None;
        for _ in 0..reconcile::MAX_PAGES {
            if self.is_paused() {
                return ReadBackResult::Stop;
            }
            let Some(permit) = self.admit().await else {
                return ReadBackResult::Stop;
            };
            let back = self
                .client
                .get_messages(
                    &self.access_token,
                    &threads,
                    window.clone(),
                    reconcile::PAGE_SIZE,
                    cursor.as_deref(),
                )
                .await;
            drop(permit);
            self.request_ended().await;
            self.measured(back.clock);
            log_read_back(&self.account, threads.len(), &back);
            match back.page {
                Ok(page) => {
                    let full = page.messages.len() >= reconcile::PAGE_SIZE as usize;
                    messages.extend(page.messages);
                    match page.cursor {
                        Some(next) if full => cursor = Some(next),
                        _ => return ReadBackResult::Messages(messages),
                    }
                }
                Err(Outcome::Throttled { error, retry_after }) => {
                    self.pause(PauseKind::Throttled, error, retry_after).await;
                    return ReadBackResult::Stop;
                }
                // Re-sending unchecked would go to the same wrong base_url.
                Err(Outcome::Redirected { error }) => {
                    self.pause(PauseKind::Redirected, error, None).await;
                    return ReadBackResult::Stop;
                }
                Err(other) => {
                    return ReadBackResult::Failed(format!(
                        "messages/getAll: {}",
                        other.error().unwrap_or("failed")
                    ));
                }
            }
        }
        ReadBackResult::Failed(format!(
            "messages/getAll: more than {} messages in the window",
            reconcile::MAX_PAGES * reconcile::PAGE_SIZE as usize
        ))
    }

    /// Adjusts the batch limit, the circuit breaker and the account's pause
    /// after a reply.
    async fn adapt(&mut self, reply: &Reply, decision: &Decision) {
        let accepted = matches!(reply.outcome, Outcome::Accepted { .. });
        if decision.shrink {
            if let Some((from, to)) = self.batch.shrink() {
                tracing::warn!(account = %self.account, from, to, "batch limit lowered after {}", reply.outcome.name());
            }
        } else if accepted && let Some((from, to)) = self.batch.success() {
            tracing::info!(account = %self.account, from, to, "batch limit raised after sustained success");
        }
        let tripped = self.breaker.observe(&reply.outcome);
        let action = if tripped {
            // A Retry-After that came with the last failure still holds.
            let at_least = match &decision.account {
                AccountAction::Pause { at_least, .. } => *at_least,
                AccountAction::Continue => None,
            };
            AccountAction::Pause {
                kind: PauseKind::Breaker,
                reason: format!(
                    "{} failed requests in a row, the last: {}",
                    self.retry.breaker_failures,
                    reply.outcome.error().unwrap_or("failed")
                ),
                at_least,
            }
        } else {
            decision.account.clone()
        };
        match action {
            AccountAction::Continue => {
                if accepted && self.pause.is_some() {
                    self.pause = None;
                    if let Err(e) = self.store.clear_pause(&self.account).await {
                        tracing::warn!(account = %self.account, error = %e, "cannot clear the account's remembered pause");
                    }
                }
            }
            AccountAction::Pause {
                kind,
                reason,
                at_least,
            } => self.pause(kind, reason, at_least).await,
        }
    }

    /// Pauses the account: no request before the pause ends, also after a
    /// restart (stored before it is logged).
    async fn pause(&mut self, kind: PauseKind, reason: String, at_least: Option<Duration>) {
        let streak = self.pause.as_ref().map_or(0, |p| p.streak) + 1;
        let length = pause_length(kind, at_least, streak, &self.retry);
        let pause = AccountPause {
            account: self.account.clone(),
            until: SystemTime::now() + length,
            reason: format!("{}: {reason}", kind.label()),
            streak,
        };
        if let Err(e) = self.store.save_pause(&pause).await {
            tracing::warn!(account = %pause.account, error = %e, "cannot remember the account's pause; a restart would forget it");
        }
        let wait = humantime::format_duration(Duration::from_millis(
            u64::try_from(length.as_millis()).unwrap_or(u64::MAX),
        ));
        let until = crate::store::timestamp(pause.until);
        match kind {
            PauseKind::Refused => tracing::error!(
                account = %self.account, pause = %wait, paused_until = %until, reason = %reason,
                "Mews refused this account's requests: check mews.base_url, mews.client_token and accounts.{}.access_token; no message is dropped, retrying after the pause",
                self.account
            ),
            PauseKind::Throttled => tracing::warn!(
                account = %self.account, pause = %wait, paused_until = %until, reason = %reason,
                "Mews rate-limited this account (429); pausing all its requests"
            ),
            PauseKind::RetryAfter => tracing::warn!(
                account = %self.account, pause = %wait, paused_until = %until, reason = %reason,
                "Mews asked to retry later; pausing this account"
            ),
            PauseKind::Breaker => tracing::error!(
                account = %self.account, pause = %wait, paused_until = %until, reason = %reason,
                "circuit breaker open: Mews keeps failing for this account; pausing it, then one request will probe"
            ),
            PauseKind::Redirected => tracing::error!(
                account = %self.account, pause = %wait, paused_until = %until, reason = %reason,
                "mews.base_url looks wrong: the server there answered with a redirect, which is never followed (the tokens go to mews.base_url only); set mews.base_url to the address Mews gave you (https://api.mews.com in production) and reload; no message is dropped, retrying after the pause"
            ),
            PauseKind::Systemic => tracing::error!(
                account = %self.account, pause = %wait, paused_until = %until, reason = %reason,
                "account paused after a systemic rejection; no message was dropped; fix the cause, the account tries again by itself after the pause"
            ),
        }
        self.pause = Some(pause);
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
            tracing::error!(account = %self.account, rows = outcomes.len(), error = %e, "stopping before the outcomes could be recorded; these rows stay `sending` and are taken up after restart (read back from Mews first)");
        }
    }
}

/// A 200 whose items do not match what was sent: say so once per request.
fn warn_on_mismatch(
    account: &str,
    sent: usize,
    returned: usize,
    unlabelled: usize,
    decision: &Decision,
) {
    let delivered = decision
        .rows
        .iter()
        .filter(|(_, o)| matches!(o, RowOutcome::Delivered { .. }))
        .count();
    if delivered != sent || returned != delivered || unlabelled > 0 {
        tracing::warn!(
            account,
            sent,
            delivered,
            missing = sent.saturating_sub(delivered),
            never_sent = returned.saturating_sub(delivered),
            unlabelled,
            "Mews's 200 answer does not match the request: rows without an Id are retried, items for Identifiers never sent are ignored"
        );
    }
}

fn log_reply(account: &str, batch: usize, reply: &Reply) {
    let duration_ms = u64::try_from(reply.elapsed.as_millis()).unwrap_or(u64::MAX);
    let request_id = reply.request_id.as_deref().unwrap_or("-");
    let status = reply.http_status;
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
        other => tracing::warn!(
            account, batch, outcome = other.name(), http_status = status, duration_ms,
            request_id, error = %other.error().unwrap_or_default(), "messages/add"
        ),
    }
}

fn log_read_back(account: &str, threads: usize, back: &ReadBack) {
    let duration_ms = u64::try_from(back.elapsed.as_millis()).unwrap_or(u64::MAX);
    let request_id = back.request_id.as_deref().unwrap_or("-");
    let status = back.http_status.unwrap_or(0);
    match &back.page {
        Ok(page) => tracing::info!(
            account,
            threads,
            http_status = status,
            duration_ms,
            request_id,
            messages = page.messages.len(),
            "messages/getAll"
        ),
        Err(outcome) => tracing::warn!(
            account, threads, outcome = outcome.name(), http_status = status, duration_ms,
            request_id, error = %outcome.error().unwrap_or_default(), "messages/getAll"
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
            breaker_failures: 5,
        }
    }

    fn rows(n: i64) -> Vec<ClaimedRow> {
        crate::store::test_rows(1..=n)
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
        assert!(
            matches!(
                &d.rows[1],
                (
                    2,
                    RowOutcome::Retry {
                        attempt: true,
                        maybe_stored: true,
                        ..
                    }
                )
            ),
            "a missing Identifier is read back before it is sent again"
        );
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
        assert_eq!(
            pause_length(kind, Some(Duration::ZERO), 1, &retry()),
            Duration::from_secs(1),
            "Retry-After: 0 still pauses for base_delay"
        );
        assert_eq!(
            pause_length(kind, Some(Duration::ZERO), 3, &retry()),
            Duration::from_secs(4),
            "and longer while 429s repeat"
        );
    }

    #[test]
    fn transient_failures_back_off_and_end_dead_after_max_attempts() {
        let outcome = Outcome::Transient {
            error: "HTTP 500".into(),
            retry_after: Some(Duration::from_secs(20)),
            maybe_stored: true,
            smaller: false,
            settle: None,
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
                    attempt: true,
                    maybe_stored: true,
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

    #[test]
    fn a_failure_to_connect_waits_but_costs_no_attempt() {
        let d = decide(
            &rows(2),
            &Outcome::Unreachable {
                error: "cannot connect to Mews".into(),
            },
            &retry(),
            now(),
            0.0,
        );
        for (_, outcome) in &d.rows {
            assert!(
                matches!(outcome, RowOutcome::Retry { at, attempt: false, maybe_stored: false, .. } if *at > now()),
                "{outcome:?}"
            );
        }
        assert_eq!(d.account, AccountAction::Continue);
        assert!(!d.shrink);
    }

    #[test]
    fn a_timeout_shrinks_the_batch_and_waits_for_mews_to_finish_before_reading_back() {
        let outcome = Outcome::Transient {
            error: "no response within 30s".into(),
            retry_after: None,
            maybe_stored: true,
            smaller: true,
            settle: Some(Duration::from_secs(30)),
        };
        let d = decide(&rows(2), &outcome, &retry(), now(), 0.0);
        assert!(d.shrink);
        for (_, outcome) in &d.rows {
            let RowOutcome::Retry {
                at,
                attempt,
                maybe_stored,
                ..
            } = outcome
            else {
                panic!("{outcome:?}")
            };
            assert!(*attempt && *maybe_stored);
            assert!(
                *at >= now() + Duration::from_secs(30),
                "not before the request settled"
            );
        }
        assert_eq!(
            d.account,
            AccountAction::Continue,
            "no Retry-After, no pause"
        );
    }

    #[test]
    fn a_408_and_a_413_shrink_the_batch() {
        let timeout_408 = Outcome::Transient {
            error: "HTTP 408".into(),
            retry_after: None,
            maybe_stored: true,
            smaller: true,
            settle: None,
        };
        assert!(decide(&rows(4), &timeout_408, &retry(), now(), 0.5).shrink);
        let too_large = Outcome::TooLarge {
            error: "HTTP 413".into(),
        };
        let d = decide(&rows(4), &too_large, &retry(), now(), 0.5);
        assert!(d.shrink);
        assert_eq!(d.split.iter().map(Vec::len).collect::<Vec<_>>(), [2, 2]);
        let d = decide(&rows(1), &too_large, &retry(), now(), 0.5);
        assert!(matches!(d.rows[..], [(1, RowOutcome::Dead { .. })]));
    }

    #[test]
    fn a_redirect_pauses_the_account_and_touches_no_row() {
        let d = decide(
            &rows(3),
            &Outcome::Redirected {
                error: "HTTP 307 redirect".into(),
            },
            &retry(),
            now(),
            0.5,
        );
        assert_eq!(d.rows.len(), 3);
        assert!(d.rows.iter().all(|(_, o)| *o == RowOutcome::Release));
        assert!(matches!(
            d.account,
            AccountAction::Pause {
                kind: PauseKind::Redirected,
                at_least: None,
                ..
            }
        ));
    }

    #[test]
    fn a_404_pauses_like_a_401_and_touches_no_row() {
        let d = decide(
            &rows(3),
            &Outcome::NotFound {
                error: "HTTP 404".into(),
            },
            &retry(),
            now(),
            0.5,
        );
        assert!(d.rows.iter().all(|(_, o)| *o == RowOutcome::Release));
        assert!(matches!(
            d.account,
            AccountAction::Pause {
                kind: PauseKind::Refused,
                at_least: None,
                ..
            }
        ));
    }

    #[test]
    fn account_pauses_grow_exponentially_and_honour_mews_floors() {
        let r = retry();
        for kind in [PauseKind::Refused, PauseKind::Breaker, PauseKind::Systemic] {
            let lengths: Vec<u64> = (1..=7)
                .map(|n| pause_length(kind, None, n, &r).as_secs())
                .collect();
            assert_eq!(lengths, [30, 60, 120, 240, 480, 900, 900], "{kind:?}");
        }
        let floor = Some(Duration::from_secs(400));
        assert_eq!(
            pause_length(PauseKind::Breaker, floor, 1, &r).as_secs(),
            400
        );
        assert_eq!(
            pause_length(PauseKind::Breaker, floor, 5, &r).as_secs(),
            480
        );
        assert_eq!(
            pause_length(PauseKind::RetryAfter, floor, 5, &r).as_secs(),
            400
        );
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn any_outcome() -> impl Strategy<Value = Outcome> {
            let error = Just("e".to_owned());
            let after = proptest::option::of((0u64..100).prop_map(Duration::from_secs));
            prop_oneof![
                proptest::collection::hash_set(1i64..40, 0..40).prop_map(|ids| Outcome::Accepted {
                    by_identifier: ids
                        .into_iter()
                        .map(|id| {
                            (
                                id.to_string(),
                                AddedMessage {
                                    id: format!("m{id}"),
                                    message_thread_id: None,
                                    text: None,
                                    sender: Sender::Plain("Application".into()),
                                    created_utc: "c".into(),
                                },
                            )
                        })
                        .collect(),
                    unlabelled: 0,
                }),
                error.clone().prop_map(|error| Outcome::Rejected { error }),
                error.clone().prop_map(|error| Outcome::TooLarge { error }),
                error
                    .clone()
                    .prop_map(|error| Outcome::Unauthorized { error }),
                error.clone().prop_map(|error| Outcome::NotFound { error }),
                error
                    .clone()
                    .prop_map(|error| Outcome::Redirected { error }),
                error
                    .clone()
                    .prop_map(|error| Outcome::Unreachable { error }),
                (error.clone(), after.clone())
                    .prop_map(|(error, retry_after)| Outcome::Throttled { error, retry_after }),
                (
                    error,
                    after,
                    any::<bool>(),
                    any::<bool>(),
                    proptest::option::of(0u64..60)
                )
                    .prop_map(
                        |(error, retry_after, maybe_stored, smaller, settle)| {
                            Outcome::Transient {
                                error,
                                retry_after,
                                maybe_stored,
                                smaller,
                                settle: settle.map(Duration::from_secs),
                            }
                        }
                    ),
            ]
        }

        proptest! {
            /// Every row of a batch ends in exactly one place: an outcome to
            /// store now, or one of the halves to send again.
            #[test]
            fn every_row_gets_exactly_one_outcome(n in 1i64..40, attempts in 0u32..5, outcome in any_outcome(), jitter in 0.0f64..1.0) {
                let mut batch = rows(n);
                for row in &mut batch { row.attempts = attempts; }
                let d = decide(&batch, &outcome, &retry(), now(), jitter);
                let mut seen: Vec<i64> = d.rows.iter().map(|(id, _)| *id).collect();
                seen.extend(d.split.iter().flatten().map(|r| r.id));
                seen.sort_unstable();
                prop_assert_eq!(seen, (1..=n).collect::<Vec<_>>());
                prop_assert!(d.split.iter().all(|half| !half.is_empty()));
                for (_, o) in &d.rows {
                    if let RowOutcome::Retry { at, .. } = o {
                        prop_assert!(*at >= now());
                    }
                }
            }
        }
    }
}
