//! Sending one `messages/add` request: waiting for the account's rate limit
//! and the shared bound on requests in flight, recording the request's
//! start, and what the response's `Date` says about Mews's clock.

use std::time::SystemTime;

use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

use super::log::log_reply;
use super::{AccountWorker, REQUEST_SLACK, START_STAMP_LEAD, STORE_STEP_BUDGET};
use crate::mews::{OutgoingMessage, Reply};
use crate::reconcile::{self, ClockOffset};
use crate::store::{ClaimedRow, Outbox};

/// What became of one `messages/add` request.
pub(super) enum Sent {
    /// It went, and this came back.
    Reply(Reply),
    /// Stopping, paused or the lease lost before it went.
    Stopped,
    /// Its start could not be recorded (this database error), so it did
    /// not go.
    NotStarted(String),
}

/// Whether a request's start is recorded ([`AccountWorker::stamp_request_start`]).
pub(super) enum Stamp {
    Recorded,
    /// Not recorded, and no reason to store: stopping (the lease lost).
    Stopped,
    /// The database refused the write, or kept taking seconds over it: why.
    Failed(String),
}

impl<S: Outbox> AccountWorker<S> {
    /// Waits until this account's rate limit lets one more request go;
    /// `false` when stopping meanwhile.
    pub(super) async fn wait_for_room(&self) -> bool {
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
    pub(super) async fn admit(&mut self) -> Option<OwnedSemaphorePermit> {
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
    pub(super) async fn request_ended(&mut self) {
        let Some(limiter) = &mut self.limiter else {
            return;
        };
        let now = Instant::now();
        limiter.finish(now);
        let wall = SystemTime::now();
        let ends: Vec<SystemTime> = limiter.ends().map(|end| wall - (now - end)).collect();
        if let Err(e) = self.store.save_recent_requests(&self.account, &ends).await
            && !self.lost_lease(&e)
        {
            tracing::warn!(account = %self.account, error = %e, "cannot remember the account's recent requests; after a restart the rate limit starts afresh");
        }
    }

    pub(super) async fn restore_request_log(&mut self) {
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

    /// Sends one batch to messages/add, unless stopping before it went or
    /// its start could not be recorded.
    pub(super) async fn send(&mut self, batch: &[ClaimedRow]) -> Sent {
        let messages: Vec<OutgoingMessage<'_>> = batch
            .iter()
            .map(|row| OutgoingMessage {
                message_thread_id: &row.message_thread_id,
                text: row.text.as_deref().unwrap_or_default(),
                identifier: row.id.to_string(),
            })
            .collect();
        self.waiting();
        let Some(permit) = self.admit().await else {
            return Sent::Stopped;
        };
        let stamp = self.stamp_request_start().await;
        if !matches!(stamp, Stamp::Recorded) {
            drop(permit);
            self.request_ended().await;
            return match stamp {
                Stamp::Failed(error) => Sent::NotStarted(error),
                Stamp::Recorded | Stamp::Stopped => Sent::Stopped,
            };
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
        Sent::Reply(reply)
    }

    /// Keeps what a response's `Date` said about Mews's clock.
    pub(super) fn measured(&mut self, clock: Option<ClockOffset>) {
        if let Some(new) = clock {
            self.clock = Some(reconcile::keep_measurement(
                self.clock,
                new,
                std::time::Instant::now(),
            ));
        }
    }

    /// Records, just before a `messages/add` request goes, a time no earlier
    /// than its start (see [`Outbox::request_starting`]). When it could not,
    /// the request is not sent (a crash during it would
    /// leave rows that settle from an older time).
    pub(super) async fn stamp_request_start(&mut self) -> Stamp {
        if self
            .started_by
            .is_some_and(|by| SystemTime::now() + START_STAMP_LEAD / 2 <= by)
        {
            return Stamp::Recorded;
        }
        self.busy("recording a request's start", STORE_STEP_BUDGET);
        let mut lead = START_STAMP_LEAD;
        for _ in 0..4 {
            let by = SystemTime::now() + lead;
            if let Err(e) = self.store.request_starting(&self.account, by).await {
                if self.lost_lease(&e) {
                    return Stamp::Stopped;
                }
                tracing::error!(account = %self.account, error = %e, "cannot record that a request is starting, so it is not sent; its rows wait and are tried again");
                return Stamp::Failed(e.to_string());
            }
            // Half the lead is left for building the request.
            if SystemTime::now() + lead / 2 <= by {
                self.started_by = Some(by);
                return Stamp::Recorded;
            }
            lead *= 4;
        }
        tracing::error!(account = %self.account, "recording that a request is starting keeps taking seconds, so it is not sent; its rows wait and are tried again; check the database's disk");
        Stamp::Failed(
            "the write kept taking seconds (4 tries); check the database's disk".to_owned(),
        )
    }
}
