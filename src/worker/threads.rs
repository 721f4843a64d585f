//! Creating the threads of `outbox_threads` (`messageThreads/add`), one
//! per request, through the same admission as `messages/add` (the
//! account's pause and rate limit, the shared bound on requests in flight,
//! the start stamp, the breaker, the watchdog), and reading a thread back
//! (`messageThreads/getAll`) before creating it again when an earlier
//! request may have created it.

use std::time::SystemTime;

use super::decide::{PauseKind, decide_thread};
use super::log::{log_thread_read_back, log_thread_reply};
use super::send::Stamp;
use super::{AccountWorker, REQUEST_SLACK, Step, Turn};
use crate::mews::{MessageThread, Outcome};
use crate::reconcile::{self, ClockOffset};
use crate::retry::retry_delay;
use crate::store::{ClaimedThread, Outbox, ThreadOutcome};

/// What reading a thread back came to.
enum ThreadBack {
    /// Mews has it (created by an earlier request of ours).
    Found(MessageThread),
    /// Mews does not have it: create it.
    Absent,
    /// The read-back failed (this error): try again later, never blindly
    /// create (a duplicate thread is seen by the guest).
    Failed(String),
    /// The account paused or the daemon is stopping.
    Stop,
}

impl<S: Outbox> AccountWorker<S> {
    /// Claims the oldest due thread and creates it (or adopts it).
    pub(super) async fn thread_turn(&mut self, now: SystemTime) -> Turn {
        let thread = match self.store.claim_thread(&self.account, now).await {
            Ok(Some(thread)) => thread,
            Ok(None) => return Turn::Nothing,
            Err(e) if self.lost_lease(&e) => return Turn::Stop(Step::Stopping),
            Err(e) => {
                self.store_failed("claim a thread", &e);
                return Turn::Stop(Step::StoreFailed);
            }
        };
        self.create_thread(thread).await;
        Turn::Worked
    }

    async fn create_thread(&mut self, thread: ClaimedThread) {
        if self.delivery.reconcile && thread.needs_reconcile {
            match self.read_back_thread(&thread).await {
                ThreadBack::Found(found) => {
                    tracing::info!(
                        account = %self.account, thread_key = %thread.thread_key,
                        thread = thread.id, mews_thread_id = %found.id,
                        "thread adopted: Mews had created it for an earlier request whose answer was lost; not created twice"
                    );
                    let outcome = ThreadOutcome::Created {
                        mews_thread_id: found.id,
                        mews_created_utc: found.created_utc,
                    };
                    self.record_thread(&thread, &outcome).await;
                    return;
                }
                ThreadBack::Absent => {
                    tracing::info!(
                        account = %self.account, thread_key = %thread.thread_key, thread = thread.id,
                        "thread read back: Mews does not have it, creating it"
                    );
                }
                ThreadBack::Failed(error) => {
                    let attempt = thread.attempts.saturating_add(1);
                    let delay = retry_delay(
                        attempt,
                        self.retry.base_delay,
                        self.retry.max_delay,
                        fastrand::f64(),
                        None,
                    );
                    tracing::warn!(
                        account = %self.account, thread_key = %thread.thread_key, thread = thread.id, error = %error,
                        "cannot read the thread back, so it is not created again yet (Mews may have it): trying later"
                    );
                    let outcome = ThreadOutcome::Retry {
                        at: SystemTime::now() + delay,
                        error: format!("not created again: the read-back failed: {error}"),
                        attempt: false,
                        maybe_stored: true,
                    };
                    self.record_thread(&thread, &outcome).await;
                    return;
                }
                ThreadBack::Stop => {
                    self.record_thread(&thread, &ThreadOutcome::Release).await;
                    return;
                }
            }
        }
        if self.shutdown.is_cancelled() || self.is_paused() {
            self.record_thread(&thread, &ThreadOutcome::Release).await;
            return;
        }
        self.waiting();
        let Some(permit) = self.admit().await else {
            self.record_thread(&thread, &ThreadOutcome::Release).await;
            return;
        };
        let stamp = self.stamp_request_start().await;
        if !matches!(stamp, Stamp::Recorded) {
            drop(permit);
            self.request_ended().await;
            let outcome = match stamp {
                Stamp::Failed(error) => {
                    let attempt = thread.attempts.saturating_add(1);
                    ThreadOutcome::Retry {
                        at: SystemTime::now()
                            + retry_delay(
                                attempt,
                                self.retry.base_delay,
                                self.retry.max_delay,
                                fastrand::f64(),
                                None,
                            ),
                        error: format!(
                            "not sent: cannot record that a request is starting: {error}"
                        ),
                        attempt: false,
                        maybe_stored: false,
                    }
                }
                Stamp::Recorded | Stamp::Stopped => ThreadOutcome::Release,
            };
            self.record_thread(&thread, &outcome).await;
            return;
        }
        self.busy(
            "waiting for Mews",
            self.client.request_timeout() + REQUEST_SLACK,
        );
        tracing::debug!(account = %self.account, thread = thread.id, "messageThreads/add: sending");
        let reply = self
            .client
            .add_thread(&self.access_token, &thread.subject, &thread.original_sender)
            .await;
        drop(permit);
        self.request_ended().await;
        self.measured(reply.clock);
        log_thread_reply(&self.account, &thread, &reply);
        if let Some(pulse) = &self.pulse {
            let name = match &reply.outcome {
                Ok(_) => "accepted",
                Err(outcome) => outcome.name(),
            };
            pulse.outcome(&self.account, name, reply.http_status);
        }
        let decision = decide_thread(
            &thread,
            &reply.outcome,
            &self.retry,
            SystemTime::now(),
            fastrand::f64(),
        );
        match &decision.thread {
            ThreadOutcome::Created { mews_thread_id, .. } => tracing::info!(
                account = %self.account, thread_key = %thread.thread_key,
                thread = thread.id, mews_thread_id = %mews_thread_id,
                "thread created; its waiting messages follow in order"
            ),
            ThreadOutcome::Dead { error } => tracing::warn!(
                account = %self.account, thread_key = %thread.thread_key,
                thread = thread.id, error = %error,
                "thread is dead: Mews refused to create it; its messages are held, not sent; fix the cause, then `mews-outbox dead requeue --thread {}` (see `mews-outbox dead list`)",
                thread.id
            ),
            ThreadOutcome::Retry { .. } | ThreadOutcome::Release => {}
        }
        self.record_thread(&thread, &decision.thread).await;
        let outcome = match reply.outcome {
            // The breaker and the pause see a created thread as an
            // accepted request.
            Ok(_) => Outcome::Accepted {
                by_identifier: Default::default(),
                unlabelled: 0,
            },
            Err(outcome) => outcome,
        };
        self.account_after(&outcome, &decision.account).await;
    }

    /// Stores a thread's outcome, retrying while the database fails (as
    /// rows' outcomes are).
    async fn record_thread(&self, thread: &ClaimedThread, outcome: &ThreadOutcome) {
        let result = self
            .until_stored(1, || {
                self.store
                    .record_thread(thread.id, outcome, SystemTime::now())
            })
            .await;
        if let Err(e) = result
            && !self.lost_lease(&e)
        {
            tracing::error!(account = %self.account, thread = thread.id, error = %e, "stopping before a thread's outcome could be recorded; it stays `creating` and is read back from Mews after restart");
        }
    }

    /// Looks for `thread` at Mews: every page of `messageThreads/getAll`
    /// over the time since it was first sent.
    async fn read_back_thread(&mut self, thread: &ClaimedThread) -> ThreadBack {
        let clock = self.clock.map(|(c, _)| c);
        let window =
            reconcile::window_since(thread.first_sent_at, SystemTime::now(), clock.as_ref());
        let mut found = Vec::new();
        let mut cursor: Option<String> = None;
        let mut complete = false;
        for _ in 0..reconcile::MAX_PAGES {
            if self.is_paused() {
                return ThreadBack::Stop;
            }
            self.waiting();
            let Some(permit) = self.admit().await else {
                return ThreadBack::Stop;
            };
            self.busy(
                "reading a thread back from Mews",
                self.client.request_timeout() + REQUEST_SLACK,
            );
            let back = self
                .client
                .get_threads(
                    &self.access_token,
                    window.clone(),
                    reconcile::PAGE_SIZE,
                    cursor.as_deref(),
                )
                .await;
            drop(permit);
            self.request_ended().await;
            self.measured(back.clock);
            log_thread_read_back(&self.account, thread, &back);
            match back.page {
                Ok(page) => {
                    let full = page.threads.len() >= reconcile::PAGE_SIZE as usize;
                    found.extend(page.threads);
                    match page.cursor {
                        Some(next) if full => cursor = Some(next),
                        _ => {
                            complete = true;
                            break;
                        }
                    }
                }
                Err(Outcome::Throttled { error, retry_after }) => {
                    self.pause(PauseKind::Throttled, error, retry_after).await;
                    return ThreadBack::Stop;
                }
                Err(Outcome::Redirected { error }) => {
                    self.pause(PauseKind::Redirected, error, None).await;
                    return ThreadBack::Stop;
                }
                Err(Outcome::Unauthorized { error } | Outcome::NotFound { error }) => {
                    self.pause(PauseKind::Refused, error, None).await;
                    return ThreadBack::Stop;
                }
                Err(other) => {
                    return ThreadBack::Failed(format!(
                        "messageThreads/getAll: {}",
                        other.error().unwrap_or("failed")
                    ));
                }
            }
        }
        if !complete {
            return ThreadBack::Failed(format!(
                "messageThreads/getAll: more than {} threads in the window",
                reconcile::MAX_PAGES * reconcile::PAGE_SIZE as usize
            ));
        }
        let clock = self.clock.map_or(ClockOffset::UNMEASURED, |(c, _)| c);
        let candidates = reconcile::thread_candidates(thread, &found, &clock);
        if candidates.is_empty() {
            return ThreadBack::Absent;
        }
        let owned = match self.store.owned_thread_ids(&candidates).await {
            Ok(owned) => owned,
            Err(e) if self.lost_lease(&e) => return ThreadBack::Stop,
            Err(e) => {
                self.store_failed("look up which Mews threads are already ours", &e);
                return ThreadBack::Stop;
            }
        };
        match reconcile::match_thread(thread, &found, &owned, &clock) {
            Some(ours) => ThreadBack::Found(ours.clone()),
            None => ThreadBack::Absent,
        }
    }
}
