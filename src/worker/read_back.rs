//! The read-back: before rows whose last send may have reached Mews are sent
//! again, their threads are read back with `messages/getAll` and the copies
//! found are adopted (matching in [`crate::reconcile`]).

use std::collections::HashSet;
use std::time::SystemTime;

use super::decide::{PauseKind, delivered};
use super::log::log_read_back;
use super::{AccountWorker, released};
use crate::mews::{AddedMessage, Outcome};
use crate::reconcile::{self, ClockOffset};
use crate::store::{ClaimedRow, Outbox};

/// What reading back ambiguous rows came to.
enum ReadBackResult {
    /// Every page of the window, newest first.
    Messages(Vec<AddedMessage>),
    /// getAll did not answer usefully: send the rows again unchecked.
    Failed(String),
    /// The account paused (429) or the daemon is stopping: send nothing.
    Stop,
}

impl<S: Outbox> AccountWorker<S> {
    /// Rows whose last send may have reached Mews are looked for there
    /// first; the ones found are delivered, the rest are returned to be sent
    /// with the others. `None` when nothing is to be sent now (the account
    /// paused, the daemon is stopping, the database failed): the rows were
    /// released.
    pub(super) async fn reconcile(&mut self, rows: Vec<ClaimedRow>) -> Option<Vec<ClaimedRow>> {
        if !self.delivery.reconcile || !rows.iter().any(|r| r.needs_reconcile) {
            return Some(rows);
        }
        let (doubtful, mut send): (Vec<_>, Vec<_>) =
            rows.into_iter().partition(|r| r.needs_reconcile);
        let release = |rows: &[ClaimedRow], more: &[ClaimedRow]| {
            released(rows.iter().chain(more).map(|r| r.id))
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
            Err(e) if self.lost_lease(&e) => return None,
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
            if self.lost_lease(&e) {
                // Another daemon owns these rows now: none is sent from here.
                return None;
            }
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
}
