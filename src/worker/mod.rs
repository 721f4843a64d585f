//! The delivery loop of one account: claim → (read back) → send → record,
//! until shutdown.
//!
//! What a reply means for each row and for the account is decided by
//! [`decide()`], a pure function; the account's longer memory (batch size,
//! circuit breaker, systemic rejection) lives in [`crate::adapt`], the rate
//! limit in [`crate::limiter`], the read-back matching in
//! [`crate::reconcile`]. [`AccountWorker`] only does the I/O around them:
//!
//! - this file: the loop ([`AccountWorker::run`], [`AccountWorker::step`]),
//!   one claim's delivery, the account's pause, recording outcomes
//! - `decide`: the pure decision table and the length of a pause
//! - `send`: admitting one `messages/add` request (rate limit, the shared
//!   bound on requests in flight, the start stamp) and sending it
//! - `read_back`: looking for ambiguous rows at Mews before sending them again
//! - `threads`: creating the threads of `outbox_threads` (one
//!   `messageThreads/add` per step, taking turns with message batches) and
//!   reading a thread back before creating it again
//! - `log`: the log lines of each request

mod decide;
mod log;
mod read_back;
mod send;
mod threads;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use backon::{ExponentialBuilder, Retryable};
use secrecy::SecretString;
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;

use crate::adapt::{
    BatchLimit, Breaker, HELD_PREFIX, RejectionStreak, RejectionWatch, SYSTEMIC_SAMPLE,
    StreakVerdict,
};
use crate::config::{Account, DeliverySettings, RetrySettings};
use crate::limiter::SlidingWindow;
use crate::mews::{MewsClient, Outcome, Reply};
use crate::notify::Pulse;
use crate::reconcile::ClockOffset;
use crate::request_size;
use crate::retry::retry_delay;
use crate::store::{AccountPause, ClaimedRow, Outbox, RowOutcome, StoreError};

pub use decide::{
    AccountAction, Decision, PauseKind, ThreadDecision, decide, decide_thread, not_sent,
    pause_length,
};
use log::warn_on_mismatch;
use send::Sent;

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

/// What the account workers of one configuration share; each worker takes
/// a clone.
#[derive(Clone)]
pub struct WorkerContext<S> {
    /// Where the rows are.
    pub store: S,
    /// The shared Mews client.
    pub client: MewsClient,
    pub delivery: DeliverySettings,
    pub retry: RetrySettings,
    /// Bounds requests in flight across all accounts.
    pub requests: Arc<Semaphore>,
    /// Changes whenever another connection commits (new rows).
    pub changes: watch::Receiver<u64>,
    /// Cancelled when the daemon stops: finish the request in flight, then return.
    pub shutdown: CancellationToken,
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
    /// Set once a write was refused with [`StoreError::LeaseLost`]: another
    /// daemon owns the account now, this loop stops (logged once).
    lease_lost: std::sync::atomic::AtomicBool,
    /// Whose turn it is when both a thread and messages are due: one
    /// `messageThreads/add`, then one `messages/add` batch, and so on.
    threads_first: bool,
}

/// What one kind of work (threads or messages) did in a step.
enum Turn {
    /// Sent (or settled) something.
    Worked,
    /// Nothing of this kind is due.
    Nothing,
    /// Stop this step with that.
    Stop(Step),
}

impl<S: Outbox> AccountWorker<S> {
    /// A worker for `account` (as in the `account` column), sending with
    /// `settings`; `pause` is the account's pause remembered in the database.
    pub fn new(
        context: WorkerContext<S>,
        account: String,
        settings: &Account,
        pause: Option<AccountPause>,
    ) -> Self {
        let WorkerContext {
            store,
            client,
            delivery,
            retry,
            requests,
            changes,
            shutdown,
        } = context;
        let access_token = settings.access_token.clone();
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
            limiter: SlidingWindow::new(settings.rate_limit),
            batch,
            breaker,
            rejections: RejectionStreak::default(),
            pulse: None,
            envelope_bytes,
            clock: None,
            started_by: None,
            lease_lost: std::sync::atomic::AtomicBool::new(false),
            threads_first: false,
        }
    }

    /// Whether `e` says another daemon owns the account now. The first time,
    /// logs it and stops this loop (its `shutdown` is this account's own
    /// token): it finishes what it is doing without retrying, since every
    /// later write for the account is refused anyway. The daemon's next
    /// renewal forgets the account.
    fn lost_lease(&self, e: &StoreError) -> bool {
        if !matches!(e, StoreError::LeaseLost { .. }) {
            return false;
        }
        if !self
            .lease_lost
            .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            tracing::warn!(
                account = %self.account,
                error = %e,
                "this daemon no longer owns the account: its delivery loop stops; the rows it had claimed are the new owner's, read back from Mews before any resend"
            );
            self.shutdown.cancel();
        }
        true
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
        // Request-level round robin: the kind that did not go last goes
        // first; when it has nothing due, the other goes alone.
        for threads in [self.threads_first, !self.threads_first] {
            let turn = if threads {
                self.thread_turn(now).await
            } else {
                self.message_turn(now).await
            };
            match turn {
                Turn::Worked => {
                    self.threads_first = !threads;
                    return Step::Worked;
                }
                Turn::Nothing => {}
                Turn::Stop(step) => return step,
            }
        }
        let next = match self.store.next_due(&self.account, now).await {
            Ok(rows) => self
                .store
                .next_thread_due(&self.account, now)
                .await
                .map(|threads| match (rows, threads) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                }),
            Err(e) => Err(e),
        };
        match next {
            Ok(next_due) => Step::Idle { next_due },
            Err(e) if self.lost_lease(&e) => Step::Stopping,
            Err(e) => {
                self.store_failed("find the next due row or thread", &e);
                Step::StoreFailed
            }
        }
    }

    /// Claims a batch of due rows and delivers it.
    async fn message_turn(&mut self, now: SystemTime) -> Turn {
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
            Err(e) if self.lost_lease(&e) => return Turn::Stop(Step::Stopping),
            Err(e) => {
                self.store_failed("claim rows", &e);
                return Turn::Stop(Step::StoreFailed);
            }
        };
        if rows.is_empty() {
            return Turn::Nothing;
        }
        self.deliver(rows).await;
        Turn::Worked
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
            let sent = if self.shutdown.is_cancelled() || self.is_paused() {
                Sent::Stopped
            } else {
                self.send(&batch).await
            };
            let reply = match sent {
                Sent::Reply(reply) => reply,
                Sent::Stopped => {
                    // Stopping or paused: the rows not sent go back untouched.
                    let unsent = watch.held().into_iter().chain(batch.iter().map(|r| r.id));
                    self.halt(Vec::new(), unsent, queue, Halt::Stopping).await;
                    return;
                }
                Sent::NotStarted(error) => {
                    // A failure: the batch waits its backoff, with the reason.
                    let error =
                        format!("not sent: cannot record that a request is starting: {error}");
                    let outcomes = not_sent(
                        &batch,
                        &error,
                        &self.retry,
                        SystemTime::now(),
                        fastrand::f64(),
                    );
                    let unsent = watch.held().into_iter();
                    self.halt(outcomes, unsent, queue, Halt::Stopping).await;
                    return;
                }
            };
            let mut decision = decide(
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
            let unsent = queue.iter().flatten().map(|r| r.id);
            let judged = watch.observe(&batch, &reply.outcome, &decision.rows, unsent);
            send_sample_first(&mut queue, &judged.sample);
            if matches!(reply.outcome, Outcome::Accepted { .. }) {
                accepted_in_batch = true;
                let sent: Vec<i64> = batch.iter().map(|r| r.id).collect();
                let dead = self.rejections.accepted(&sent);
                self.dead_letter_held(&dead).await;
            }
            // What this reply settles, recorded together below.
            let mut outcomes = Vec::new();
            let mut streak = None;
            if judged.record {
                match (batch.as_slice(), &reply.outcome) {
                    ([row], Outcome::Rejected { error }) if !accepted_in_batch => {
                        match self.hold_rejected(row, error).await {
                            HeldRejection::Hold(outcome) => outcomes.push((row.id, outcome)),
                            HeldRejection::Systemic(reason) => streak = Some(reason),
                        }
                    }
                    _ => outcomes = std::mem::take(&mut decision.rows),
                }
            }
            outcomes.extend(judged.flush);
            if let Some(systemic) = judged.systemic {
                let unsent = systemic.rows.into_iter();
                let halt = Halt::Systemic(systemic.error);
                self.halt(outcomes, unsent, queue, halt).await;
                return;
            }
            if let Some(reason) = streak {
                // The rejected row (still `sending`) and the rest of the
                // claim go back untouched; the streak's earlier rows already
                // wait `pending`.
                let unsent = batch.iter().map(|r| r.id);
                self.halt(outcomes, unsent, queue, Halt::Streak(reason))
                    .await;
                return;
            }
            self.record(&outcomes).await;
            self.adapt(&reply, &decision).await;
            for half in decision.split.into_iter().rev() {
                queue.push_front(half);
            }
        }
        // The batch ended before the sample was judged: the held outcomes stand.
        self.record(&watch.finish()).await;
    }

    /// Ends a claim before all of it was sent: records `outcomes` together
    /// with the rows not sent (`unsent`, then the rest of `queue`), which go
    /// back untouched; then the account pauses when `halt` says so.
    async fn halt(
        &mut self,
        mut outcomes: Vec<(i64, RowOutcome)>,
        unsent: impl Iterator<Item = i64>,
        queue: VecDeque<Vec<ClaimedRow>>,
        halt: Halt,
    ) {
        let settled = outcomes.len();
        outcomes.extend(released(
            unsent.chain(queue.into_iter().flatten().map(|r| r.id)),
        ));
        if let Halt::Systemic(error) = &halt {
            tracing::error!(
                account = %self.account, rows_released = outcomes.len() - settled, error = %error,
                "ALERT: Mews rejected {SYSTEMIC_SAMPLE} single messages from across the batch with the same error and accepted none: this looks systemic (a daemon bug, a proxy answering for Mews, a revoked permission), not bad messages; nothing is dead-lettered, the account pauses"
            );
        }
        self.record(&outcomes).await;
        match halt {
            Halt::Stopping => {}
            Halt::Systemic(error) => {
                self.rejections.systemic(error.clone());
                self.pause(
                    PauseKind::Systemic,
                    format!(
                        "{SYSTEMIC_SAMPLE} of {SYSTEMIC_SAMPLE} sampled messages rejected with {error}"
                    ),
                    None,
                )
                .await;
            }
            Halt::Streak(reason) => self.pause(PauseKind::Systemic, reason, None).await,
        }
    }

    /// A single message was rejected with nothing accepted since the
    /// streak began: hold it (or, once the streak is systemic, say why the
    /// account pauses; the caller releases the row and pauses).
    async fn hold_rejected(&mut self, row: &ClaimedRow, error: &str) -> HeldRejection {
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
                return HeldRejection::Hold(outcome);
            }
        };
        if probing {
            return HeldRejection::Systemic(format!(
                "the probe after the pause was rejected again with {alike}"
            ));
        }
        tracing::error!(
            account = %self.account, rows_held = rows.len(), error = %alike,
            "ALERT: Mews rejected {SYSTEMIC_SAMPLE} single messages in a row, across requests, with the same error and accepted none: this looks systemic (a daemon bug, a proxy answering for Mews, a revoked permission), not bad messages; nothing is dead-lettered, the account pauses"
        );
        HeldRejection::Systemic(format!(
            "{} single messages in a row rejected with {alike}, none accepted",
            rows.len()
        ))
    }

    /// Held rows whose rejection turned out to be their own become dead.
    async fn dead_letter_held(&self, dead: &[(i64, String)]) {
        if dead.is_empty() {
            return;
        }
        let result = self
            .until_stored(dead.len(), || {
                self.store
                    .dead_letter_held(dead, HELD_PREFIX, SystemTime::now())
            })
            .await;
        match result {
            Ok(0) => {}
            Ok(rows) => tracing::warn!(
                account = %self.account, rows, error = %dead.first().map_or("", |(_, e)| e.as_str()),
                "held rejected messages are dead: Mews accepted a request of this account since, so the rejection was theirs; see `mews-outbox dead list`"
            ),
            Err(e) if self.lost_lease(&e) => {}
            // They stay pending, held: sent again when due and judged then.
            Err(e) => {
                tracing::error!(account = %self.account, rows = dead.len(), error = %e, "stopping before held rejected messages could be dead-lettered; they are sent again after restart")
            }
        }
    }

    fn is_paused(&self) -> bool {
        matches!(&self.pause, Some(p) if p.until > SystemTime::now())
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
        self.account_after(&reply.outcome, &decision.account).await;
    }

    /// The circuit breaker and the account's pause after a reply to any
    /// request (`messages/add` or `messageThreads/add`).
    async fn account_after(&mut self, outcome: &Outcome, account: &AccountAction) {
        let accepted = matches!(outcome, Outcome::Accepted { .. });
        let tripped = self.breaker.observe(outcome);
        let action = if tripped {
            // A Retry-After that came with the last failure still holds.
            let at_least = match account {
                AccountAction::Pause { at_least, .. } => *at_least,
                AccountAction::Continue => None,
            };
            AccountAction::Pause {
                kind: PauseKind::Breaker,
                reason: format!(
                    "{} failed requests in a row, the last: {}",
                    self.retry.breaker_failures,
                    outcome.error().unwrap_or("failed")
                ),
                at_least,
            }
        } else {
            account.clone()
        };
        self.act(accepted, action).await;
    }

    /// Continues (clearing a remembered pause after an accepted request) or
    /// pauses the account.
    async fn act(&mut self, accepted: bool, action: AccountAction) {
        match action {
            AccountAction::Continue => {
                if accepted && self.pause.is_some() {
                    self.pause = None;
                    if let Err(e) = self.store.clear_pause(&self.account).await
                        && !self.lost_lease(&e)
                    {
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
        if let Err(e) = self.store.save_pause(&pause).await
            && !self.lost_lease(&e)
        {
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
        let result = self
            .until_stored(outcomes.len(), || {
                self.store.record(outcomes, SystemTime::now())
            })
            .await;
        if let Err(e) = result
            && !self.lost_lease(&e)
        {
            tracing::error!(account = %self.account, rows = outcomes.len(), error = %e, "stopping before the outcomes could be recorded; these rows stay `sending` and are taken up after restart (read back from Mews first)");
        }
    }

    /// Runs a write of outcomes for `rows` rows until it succeeds, backing
    /// off while the database fails; gives up when shutting down, and at
    /// once on [`StoreError::LeaseLost`] (no retry can succeed: another
    /// daemon owns the account).
    async fn until_stored<T, Write, Fut>(
        &self,
        rows: usize,
        mut write: Write,
    ) -> Result<T, StoreError>
    where
        Write: FnMut() -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        let attempt = || {
            self.busy("recording outcomes", STORE_STEP_BUDGET);
            write()
        };
        attempt
            .retry(
                ExponentialBuilder::new()
                    .with_min_delay(Duration::from_millis(50))
                    .with_max_delay(Duration::from_secs(5))
                    .with_jitter()
                    .without_max_times(),
            )
            .sleep(tokio::time::sleep)
            .when(|e| {
                !self.shutdown.is_cancelled() && !matches!(e, StoreError::LeaseLost { .. })
            })
            .notify(|e, wait| {
                tracing::error!(account = %self.account, rows, error = %e, retry_in = ?wait, "cannot record delivery outcomes; retrying");
            })
            .await
    }
}

/// Why a claim ends before all of it was sent.
enum Halt {
    /// The daemon is stopping or the account paused.
    Stopping,
    /// The sample of this claim was rejected alike (the shared error).
    Systemic(String),
    /// The account's rejection streak turned systemic (the pause reason).
    Streak(String),
}

/// What becomes of a single message rejected before the account proved it
/// works.
enum HeldRejection {
    /// Record this for the row: held, or dead after max_attempts.
    Hold(RowOutcome),
    /// The rejection is systemic: release the row, pause for this reason.
    Systemic(String),
}

/// Rows that go back `pending` untouched: not sent, or not judged.
fn released(ids: impl Iterator<Item = i64>) -> Vec<(i64, RowOutcome)> {
    ids.map(|id| (id, RowOutcome::Release)).collect()
}

/// Puts the rows of `sample` first in `queue`, one per request, and the
/// rest of the queue after them as one request (see [`RejectionWatch`]).
fn send_sample_first(queue: &mut VecDeque<Vec<ClaimedRow>>, sample: &[i64]) {
    if sample.is_empty() {
        return;
    }
    let mut rest: Vec<ClaimedRow> = queue.drain(..).flatten().collect();
    for id in sample {
        if let Some(i) = rest.iter().position(|r| r.id == *id) {
            queue.push_back(vec![rest.remove(i)]);
        }
    }
    queue.push_back(rest);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sample_goes_first_one_by_one_and_the_rest_as_one_request() {
        let mut queue = VecDeque::from([
            crate::store::test_rows(2..=2),
            crate::store::test_rows(3..=4),
            crate::store::test_rows(5..=8),
        ]);
        send_sample_first(&mut queue, &[4, 8]);
        let ids: Vec<Vec<i64>> = queue
            .iter()
            .map(|b| b.iter().map(|r| r.id).collect())
            .collect();
        assert_eq!(ids, [vec![4], vec![8], vec![2, 3, 5, 6, 7]]);
    }

    /// A tiny `messages/add` that stores every message it is given, as Mews
    /// would: `m<Identifier>` as the message's Id.
    async fn accepting_mews() -> std::net::SocketAddr {
        async fn add(body: String) -> axum::Json<serde_json::Value> {
            let body: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            let added: Vec<serde_json::Value> = body["Messages"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|m| {
                    let identifier = m["Identifier"].as_str().unwrap_or_default();
                    serde_json::json!({
                        "Identifier": identifier,
                        "Message": {
                            "Id": format!("m{identifier}"),
                            "Sender": "Application",
                            "CreatedUtc": "2026-01-01T00:00:00Z",
                        },
                    })
                })
                .collect();
            axum::Json(serde_json::json!({ "Messages": added }))
        }
        async fn add_thread(body: String) -> axum::Json<serde_json::Value> {
            let body: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            axum::Json(serde_json::json!({ "MessageThreads": [{
                "Id": uuid::Uuid::new_v4(),
                "OriginalSender": body["OriginalSender"],
                "Subject": body["Subject"],
                "CreatedUtc": "2026-01-01T00:00:00Z",
                "UpdatedUtc": "2026-01-01T00:00:00Z",
                "IsResolved": false,
            }]}))
        }
        let app = axum::Router::new()
            .route("/api/connector/v1/messages/add", axum::routing::post(add))
            .route(
                "/api/connector/v1/messageThreads/add",
                axum::routing::post(add_thread),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        addr
    }

    async fn worker_on(
        store: crate::store::memory::MemoryStore,
    ) -> AccountWorker<crate::store::memory::MemoryStore> {
        let addr = accepting_mews().await;
        let mut settings = crate::config::Settings::load(&crate::config::Sources {
            file: None,
            env: Some(Default::default()),
        })
        .unwrap();
        settings.mews.base_url = format!("http://{addr}/").parse().unwrap();
        let (_changed, changes) = watch::channel(0);
        let context = WorkerContext {
            store,
            client: MewsClient::new(&settings.mews).unwrap(),
            delivery: settings.delivery.clone(),
            retry: settings.retry.clone(),
            requests: Arc::new(Semaphore::new(1)),
            changes,
            shutdown: CancellationToken::new(),
        };
        AccountWorker::new(
            context,
            "default".into(),
            &settings.accounts["default"],
            None,
        )
    }

    #[tokio::test]
    async fn thread_creations_and_message_batches_take_turns() {
        use crate::store::memory::MemoryStore;
        use crate::store::{Status, ThreadStatus};

        let store = MemoryStore::default();
        let existing = "7f9325f6-ef44-4911-89a8-ae51010a5aa4";
        for n in 0..3 {
            store.insert_thread("default", &format!("k{n}"), &format!("S{n}"), "Guest");
            store.insert_keyed("default", &format!("k{n}"), &format!("keyed {n}"));
        }
        // Three messages in one thread: one batch each (thread order).
        for n in 0..3 {
            store.insert("default", existing, &format!("plain {n}"));
        }
        let mut worker = worker_on(store.clone()).await;
        let created = |store: &MemoryStore| {
            store
                .threads()
                .iter()
                .filter(|t| t.status == ThreadStatus::Created)
                .count()
        };
        let delivered = |store: &MemoryStore, prefix: &str| {
            store
                .rows()
                .iter()
                .filter(|r| r.status == Status::Delivered && r.text.starts_with(prefix))
                .count()
        };
        // Messages first, then a thread, then messages (a keyed row whose
        // thread exists now joins the claim), and so on.
        let mut trace = Vec::new();
        for _ in 0..6 {
            assert_eq!(worker.step().await, Step::Worked);
            trace.push((created(&store), delivered(&store, "plain")));
        }
        assert_eq!(
            trace,
            [(0, 1), (1, 1), (1, 2), (2, 2), (2, 3), (3, 3)],
            "request-level round robin"
        );
        assert_eq!(worker.step().await, Step::Worked, "the last keyed row");
        assert_eq!(delivered(&store, "keyed"), 3);
        assert_eq!(worker.step().await, Step::Idle { next_due: None });
        let ids: std::collections::HashSet<_> = store
            .threads()
            .into_iter()
            .map(|t| t.mews_thread_id)
            .collect();
        assert_eq!(ids.len(), 3, "one Mews thread each");
    }

    #[tokio::test]
    async fn a_thread_that_may_exist_is_read_back_and_adopted_not_created_again() {
        use crate::store::ThreadStatus;
        use crate::store::memory::MemoryStore;
        use std::sync::atomic::{AtomicUsize, Ordering};

        static ADDS: AtomicUsize = AtomicUsize::new(0);
        let first_sent = SystemTime::now() - Duration::from_secs(60);
        let created = humantime::format_rfc3339_seconds(first_sent + Duration::from_secs(1));
        let listed = serde_json::json!({ "MessageThreads": [
            // Newest first: ours is the older of the two with its subject.
            {"Id": "0b8c8a58-1a60-4c5e-9f0e-3d6f2f2a9d11", "OriginalSender": "Ada", "Subject": "Stay",
             "CreatedUtc": humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
             "UpdatedUtc": "2026-01-01T00:00:00Z"},
            {"Id": "7f9325f6-ef44-4911-89a8-ae51010a5aa4", "OriginalSender": "Ada", "Subject": "Stay",
             "CreatedUtc": created.to_string(), "UpdatedUtc": "2026-01-01T00:00:00Z"},
            {"Id": "3f0b1d0e-8a0e-4c1c-9e58-2b7d0c3c1a11", "OriginalSender": "Bob", "Subject": "Stay",
             "CreatedUtc": created.to_string(), "UpdatedUtc": "2026-01-01T00:00:00Z"},
        ]});
        let app = axum::Router::new()
            .route(
                "/api/connector/v1/messageThreads/getAll",
                axum::routing::post(move || {
                    let listed = listed.clone();
                    async move { axum::Json(listed) }
                }),
            )
            .route(
                "/api/connector/v1/messageThreads/add",
                axum::routing::post(|| async {
                    ADDS.fetch_add(1, Ordering::Relaxed);
                    axum::http::StatusCode::INTERNAL_SERVER_ERROR
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

        let store = MemoryStore::default();
        let id = store.insert_thread("default", "k", "Stay", "Ada");
        store.set_thread_needs_reconcile(id, first_sent);
        let keyed = store.insert_keyed("default", "k", "hello");
        let mut settings = crate::config::Settings::load(&crate::config::Sources {
            file: None,
            env: Some(Default::default()),
        })
        .unwrap();
        settings.mews.base_url = format!("http://{addr}/").parse().unwrap();
        let (_changed, changes) = watch::channel(0);
        let context = WorkerContext {
            store: store.clone(),
            client: MewsClient::new(&settings.mews).unwrap(),
            delivery: settings.delivery.clone(),
            retry: settings.retry.clone(),
            requests: Arc::new(Semaphore::new(1)),
            changes,
            shutdown: CancellationToken::new(),
        };
        let mut worker = AccountWorker::new(
            context,
            "default".into(),
            &settings.accounts["default"],
            None,
        );
        worker.threads_first = true;
        assert_eq!(worker.step().await, Step::Worked);
        let thread = &store.threads()[0];
        assert_eq!(thread.status, ThreadStatus::Created);
        assert_eq!(
            thread.mews_thread_id.as_deref(),
            Some("7f9325f6-ef44-4911-89a8-ae51010a5aa4"),
            "the earliest with its subject and sender"
        );
        assert_eq!(ADDS.load(Ordering::Relaxed), 0, "not created again");
        let row = store.rows().into_iter().find(|r| r.id == keyed).unwrap();
        assert_eq!(
            row.keyed_thread_id.as_deref(),
            Some("7f9325f6-ef44-4911-89a8-ae51010a5aa4")
        );
    }

    #[tokio::test]
    async fn a_step_claims_due_thread_heads_posts_them_and_records_what_mews_returned() {
        use crate::store::Status;
        use crate::store::memory::MemoryStore;

        let addr = accepting_mews().await;
        let mut settings = crate::config::Settings::load(&crate::config::Sources {
            file: None,
            env: Some(Default::default()),
        })
        .unwrap();
        settings.mews.base_url = format!("http://{addr}/").parse().unwrap();
        let store = MemoryStore::default();
        let t1 = "7f9325f6-ef44-4911-89a8-ae51010a5aa4";
        let t2 = "0b8c8a58-1a60-4c5e-9f0e-3d6f2f2a9d11";
        let first = store.insert("default", t1, "one");
        let second = store.insert("default", t1, "two, after one");
        let other = store.insert("default", t2, "other thread");
        let elsewhere = store.insert("spa", t2, "another account");
        let (_changed, changes) = watch::channel(0);
        let context = WorkerContext {
            store: store.clone(),
            client: MewsClient::new(&settings.mews).unwrap(),
            delivery: settings.delivery.clone(),
            retry: settings.retry.clone(),
            requests: Arc::new(Semaphore::new(1)),
            changes,
            shutdown: CancellationToken::new(),
        };
        let mut worker = AccountWorker::new(
            context,
            "default".into(),
            &settings.accounts["default"],
            None,
        );

        assert_eq!(worker.step().await, Step::Worked);
        let status = |id: i64| {
            let row = store.rows().into_iter().find(|r| r.id == id).unwrap();
            (row.status, row.mews_message_id)
        };
        assert_eq!(
            status(first),
            (Status::Delivered, Some(format!("m{first}")))
        );
        assert_eq!(
            status(other),
            (Status::Delivered, Some(format!("m{other}")))
        );
        assert_eq!(
            status(second),
            (Status::Pending, None),
            "waits behind its thread's head"
        );
        assert_eq!(
            status(elsewhere),
            (Status::Pending, None),
            "another account's row"
        );

        assert_eq!(worker.step().await, Step::Worked);
        assert_eq!(
            status(second),
            (Status::Delivered, Some(format!("m{second}")))
        );
        assert_eq!(worker.step().await, Step::Idle { next_due: None });
        assert_eq!(status(elsewhere), (Status::Pending, None));
    }
}
