//! What the daemon says about the queue while it runs: the periodic
//! heartbeat line, the warnings an operator can act on (rows waiting too
//! long, rows gone dead) and the one-line `STATUS=` shown by `systemctl status`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime};

use crate::notify::LastOutcome;
use crate::store::{AccountPause, DaemonStore, StoreError};
use crate::store::{QueueSummary, ThreadCounts};

/// Something in the queue an operator should look at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Alert {
    /// The account's oldest pending row waits longer than `alert.max_pending_age`.
    OldPending { account: String, age: Duration },
    /// Rows of the account became dead since the last look.
    NewDead {
        account: String,
        added: u64,
        total: u64,
    },
    /// Threads of the account became dead since the last look (their
    /// messages are held).
    NewDeadThreads {
        account: String,
        added: u64,
        total: u64,
        messages_waiting: u64,
    },
}

/// Compares a summary with the dead counts seen last time. Pure.
pub fn alerts(
    summary: &QueueSummary,
    dead_before: &BTreeMap<String, (u64, u64)>,
    max_pending_age: Duration,
    now: SystemTime,
) -> Vec<Alert> {
    let mut alerts = Vec::new();
    for (account, queue) in &summary.accounts {
        if let Some(oldest) = queue.oldest_pending {
            let age = now.duration_since(oldest).unwrap_or_default();
            if !max_pending_age.is_zero() && age > max_pending_age {
                alerts.push(Alert::OldPending {
                    account: account.clone(),
                    age,
                });
            }
        }
        let (before, threads_before) = dead_before.get(account).copied().unwrap_or((0, 0));
        if queue.dead > before {
            alerts.push(Alert::NewDead {
                account: account.clone(),
                added: queue.dead - before,
                total: queue.dead,
            });
        }
        if queue.threads.dead > threads_before {
            alerts.push(Alert::NewDeadThreads {
                account: account.clone(),
                added: queue.threads.dead - threads_before,
                total: queue.threads.dead,
                messages_waiting: queue.threads.messages_waiting,
            });
        }
    }
    alerts
}

/// The `STATUS=` line. Pure.
pub fn status_line(
    summary: &QueueSummary,
    paused: &[String],
    last: Option<&LastOutcome>,
    now: SystemTime,
    now_instant: Instant,
) -> String {
    let mut line = format!("{} pending", summary.pending());
    if let Some(oldest) = summary.oldest_pending() {
        let age = now.duration_since(oldest).unwrap_or_default();
        line += &format!(" (oldest {})", human(age));
    }
    line += &format!(", {} sending, {} dead", summary.sending(), summary.dead());
    let threads = thread_totals(summary);
    if threads != ThreadCounts::default() {
        line += &format!(
            "; threads: {} to create, {} dead, {} messages waiting for one",
            threads.pending + threads.creating,
            threads.dead,
            threads.messages_waiting
        );
    }
    if !paused.is_empty() {
        line += &format!("; paused: {}", paused.join(", "));
    }
    match last {
        Some(last) => {
            let status = last
                .http_status
                .map_or_else(|| "no response".to_owned(), |s| format!("HTTP {s}"));
            line += &format!(
                "; last request: {} {} ({status}) {} ago",
                last.account,
                last.outcome,
                human(now_instant.saturating_duration_since(last.at))
            );
        }
        None => line += "; no request yet",
    }
    line
}

/// The threads of every account together.
pub fn thread_totals(summary: &QueueSummary) -> ThreadCounts {
    let mut total = ThreadCounts::default();
    for queue in summary.accounts.values() {
        let t = &queue.threads;
        total.pending += t.pending;
        total.creating += t.creating;
        total.created += t.created;
        total.dead += t.dead;
        total.messages_waiting += t.messages_waiting;
    }
    total
}

fn human(d: Duration) -> String {
    humantime::format_duration(Duration::from_secs(d.as_secs())).to_string()
}

/// Remembers what the last heartbeat saw, to report what changed since.
#[derive(Debug)]
pub struct Heartbeat {
    /// When the last heartbeat (or the start) looked.
    last_at: SystemTime,
    /// Dead rows and dead threads per account at the last look.
    dead: BTreeMap<String, (u64, u64)>,
}

impl Heartbeat {
    /// Takes the first look at start; warns about dead rows already there.
    /// Never fails: without a first reading (the database busy or failing
    /// at start), dead rows already there count as new at the first beat.
    pub async fn start<S: DaemonStore>(store: &S, now: SystemTime) -> Heartbeat {
        let summary = match store.queue_summary(now).await {
            Ok(summary) => summary,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the queue at start; the heartbeat starts without it");
                return Heartbeat {
                    last_at: now,
                    dead: Default::default(),
                };
            }
        };
        let dead = dead_counts(&summary);
        let total: u64 = dead.values().map(|(rows, _)| rows).sum();
        if total > 0 {
            tracing::warn!(
                dead = total,
                "dead rows wait for an operator: see `mews-outbox dead list`, then `mews-outbox dead requeue` or `mews-outbox dead purge`"
            );
        }
        let threads = thread_totals(&summary);
        if threads.dead > 0 {
            tracing::warn!(
                dead_threads = threads.dead,
                messages_waiting = threads.messages_waiting,
                "dead threads hold their messages until an operator acts: see `mews-outbox dead list`, then `mews-outbox dead requeue --thread N` or `mews-outbox dead purge`"
            );
        }
        Heartbeat { last_at: now, dead }
    }

    /// Logs the heartbeat line and the alerts; returns the summary it read.
    pub async fn beat<S: DaemonStore>(
        &mut self,
        store: &S,
        max_pending_age: Duration,
        now: SystemTime,
    ) -> Result<QueueSummary, StoreError> {
        let summary = store.queue_summary(self.last_at).await?;
        let paused = paused_accounts(&store.pauses().await?, now);
        let oldest_pending_age_s = summary
            .oldest_pending()
            .map(|t| now.duration_since(t).unwrap_or_default().as_secs());
        let threads = thread_totals(&summary);
        tracing::info!(
            pending = summary.pending(),
            sending = summary.sending(),
            dead = summary.dead(),
            threads_pending = threads.pending + threads.creating,
            threads_dead = threads.dead,
            messages_waiting_for_thread = threads.messages_waiting,
            oldest_pending_age_s,
            delivered_since_last = summary.delivered_since,
            paused = %paused.join(","),
            "heartbeat"
        );
        for alert in alerts(&summary, &self.dead, max_pending_age, now) {
            log_alert(&alert, max_pending_age);
        }
        self.dead = dead_counts(&summary);
        self.last_at = now;
        Ok(summary)
    }
}

fn log_alert(alert: &Alert, max_pending_age: Duration) {
    match alert {
        Alert::OldPending { account, age } => tracing::warn!(
            %account,
            oldest_pending_age_s = age.as_secs(),
            max_pending_age = %humantime::format_duration(max_pending_age),
            "rows wait longer than alert.max_pending_age: run `mews-outbox status` (is the account paused, Mews failing, the account not configured?)"
        ),
        Alert::NewDead {
            account,
            added,
            total,
        } => tracing::warn!(
            %account,
            added,
            dead = total,
            "rows became dead (Mews refused them or retries ran out): see `mews-outbox dead list`; fix the cause, then `mews-outbox dead requeue`"
        ),
        Alert::NewDeadThreads {
            account,
            added,
            total,
            messages_waiting,
        } => tracing::warn!(
            %account,
            added,
            dead_threads = total,
            messages_waiting,
            "threads became dead (Mews refused to create them or retries ran out); their messages are held, not sent: see `mews-outbox dead list`; fix the cause, then `mews-outbox dead requeue --thread N`"
        ),
    }
}

fn dead_counts(summary: &QueueSummary) -> BTreeMap<String, (u64, u64)> {
    summary
        .accounts
        .iter()
        .map(|(name, queue)| (name.clone(), (queue.dead, queue.threads.dead)))
        .collect()
}

/// Accounts whose remembered pause is still running at `now`.
pub fn paused_accounts(pauses: &[AccountPause], now: SystemTime) -> Vec<String> {
    pauses
        .iter()
        .filter(|p| p.until > now)
        .map(|p| p.account.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::AccountQueue;

    fn t(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + s)
    }

    fn summary(accounts: &[(&str, u64, u64, Option<SystemTime>)]) -> QueueSummary {
        QueueSummary {
            accounts: accounts
                .iter()
                .map(|(name, pending, dead, oldest)| {
                    (
                        name.to_string(),
                        AccountQueue {
                            pending: *pending,
                            sending: 0,
                            dead: *dead,
                            oldest_pending: *oldest,
                            threads: Default::default(),
                        },
                    )
                })
                .collect(),
            delivered_since: 0,
        }
    }

    #[test]
    fn old_pending_rows_and_new_dead_rows_raise_alerts() {
        let s = summary(&[("hotel", 3, 2, Some(t(0))), ("spa", 1, 0, Some(t(590)))]);
        let before = BTreeMap::from([("hotel".to_owned(), (1, 0))]);
        let found = alerts(&s, &before, Duration::from_secs(300), t(600));
        assert_eq!(
            found,
            [
                Alert::OldPending {
                    account: "hotel".into(),
                    age: Duration::from_secs(600)
                },
                Alert::NewDead {
                    account: "hotel".into(),
                    added: 1,
                    total: 2
                },
            ]
        );
    }

    #[test]
    fn a_new_dead_thread_raises_an_alert_and_threads_show_in_the_status_line() {
        let mut s = summary(&[("hotel", 2, 0, None)]);
        if let Some(q) = s.accounts.get_mut("hotel") {
            q.threads = ThreadCounts {
                pending: 3,
                creating: 1,
                created: 5,
                dead: 2,
                messages_waiting: 7,
            };
        }
        let before = BTreeMap::from([("hotel".to_owned(), (0, 1))]);
        assert_eq!(
            alerts(&s, &before, Duration::ZERO, t(10)),
            [Alert::NewDeadThreads {
                account: "hotel".into(),
                added: 1,
                total: 2,
                messages_waiting: 7
            }]
        );
        let before = BTreeMap::from([("hotel".to_owned(), (0, 2))]);
        assert!(alerts(&s, &before, Duration::ZERO, t(10)).is_empty());
        let line = status_line(&s, &[], None, t(10), Instant::now());
        assert!(
            line.contains("threads: 4 to create, 2 dead, 7 messages waiting for one"),
            "{line}"
        );
        let plain = summary(&[("hotel", 2, 0, None)]);
        assert!(!status_line(&plain, &[], None, t(10), Instant::now()).contains("threads"));
    }

    #[test]
    fn no_alert_when_nothing_changed_or_the_age_alert_is_off() {
        let s = summary(&[("hotel", 3, 2, Some(t(0)))]);
        let before = BTreeMap::from([("hotel".to_owned(), (2, 0))]);
        assert!(alerts(&s, &before, Duration::ZERO, t(10_000)).is_empty());
        // Fewer dead rows (an operator requeued some) is not an alert either.
        let before = BTreeMap::from([("hotel".to_owned(), (5, 0))]);
        assert!(alerts(&s, &before, Duration::from_secs(60_000), t(10)).is_empty());
    }

    #[test]
    fn the_status_line_says_depth_age_pauses_and_the_last_reply() {
        let s = summary(&[("hotel", 3, 1, Some(t(0)))]);
        let now = Instant::now();
        let last = LastOutcome {
            account: "hotel".into(),
            outcome: "accepted",
            http_status: Some(200),
            at: now,
        };
        let line = status_line(&s, &["spa".into()], Some(&last), t(65), now);
        assert_eq!(
            line,
            "3 pending (oldest 1m 5s), 0 sending, 1 dead; paused: spa; last request: hotel accepted (HTTP 200) 0s ago"
        );
        assert_eq!(
            status_line(&QueueSummary::default(), &[], None, t(0), now),
            "0 pending, 0 sending, 0 dead; no request yet"
        );
    }
}
