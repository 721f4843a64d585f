//! `mews-outbox status`: the queue at a glance, for people and for scripts.

use std::time::SystemTime;

use serde::Serialize;

use crate::store::{AccountStatus, OperatorStore, StoreError, ThreadCounts, parse_timestamp};

/// What `status --json` prints.
#[derive(Debug, Serialize)]
pub struct StatusReport {
    pub generated_at: String,
    pub accounts: Vec<AccountStatus>,
    pub totals: Totals,
}

#[derive(Debug, Default, Serialize)]
pub struct Totals {
    pub pending: u64,
    pub sending: u64,
    pub delivered: u64,
    pub dead: u64,
    /// Threads (`outbox_threads`) of every account by status, and the
    /// messages waiting for one.
    pub threads: ThreadCounts,
}

impl StatusReport {
    /// Reads the report from any store.
    pub async fn read<O: OperatorStore>(
        store: &O,
        now: SystemTime,
    ) -> Result<StatusReport, StoreError> {
        Ok(StatusReport::new(store.status(now).await?, now))
    }

    pub fn new(accounts: Vec<AccountStatus>, now: SystemTime) -> StatusReport {
        let mut totals = Totals::default();
        for a in &accounts {
            totals.pending += a.pending;
            totals.sending += a.sending;
            totals.delivered += a.delivered;
            totals.dead += a.dead;
            let (t, a) = (&mut totals.threads, &a.threads);
            t.pending += a.pending;
            t.creating += a.creating;
            t.created += a.created;
            t.dead += a.dead;
            t.messages_waiting += a.messages_waiting;
        }
        StatusReport {
            generated_at: crate::store::timestamp(now),
            accounts,
            totals,
        }
    }

    /// A table per account, then each account's last error and pause.
    pub fn render_text(&self, now: SystemTime) -> String {
        let mut out = format!(
            "{:<16} {:>9} {:>8} {:>10} {:>6}  {:<14} {:<14}\n",
            "ACCOUNT", "PENDING", "SENDING", "DELIVERED", "DEAD", "OLDEST PENDING", "NEXT RETRY"
        );
        for a in &self.accounts {
            out += &format!(
                "{:<16} {:>9} {:>8} {:>10} {:>6}  {:<14} {:<14}\n",
                a.account,
                a.pending,
                a.sending,
                a.delivered,
                a.dead,
                age(a.oldest_pending_created_at.as_deref(), now, " ago"),
                age(a.next_retry_at.as_deref(), now, ""),
            );
        }
        let t = &self.totals;
        out += &format!(
            "{:<16} {:>9} {:>8} {:>10} {:>6}\n",
            "total", t.pending, t.sending, t.delivered, t.dead
        );
        if self.totals.threads != ThreadCounts::default() {
            out += &format!(
                "\n{:<16} {:>9} {:>8} {:>10} {:>6}  {}\n",
                "THREADS",
                "PENDING",
                "CREATING",
                "CREATED",
                "DEAD",
                "MESSAGES WAITING FOR THEIR THREAD"
            );
            let rows = self
                .accounts
                .iter()
                .map(|a| (a.account.as_str(), &a.threads))
                .filter(|(_, t)| **t != ThreadCounts::default())
                .chain([("total", &self.totals.threads)]);
            for (name, t) in rows {
                out += &format!(
                    "{:<16} {:>9} {:>8} {:>10} {:>6}  {}\n",
                    name, t.pending, t.creating, t.created, t.dead, t.messages_waiting
                );
            }
        }
        for a in &self.accounts {
            if a.threads.dead > 0 {
                out += &format!(
                    "\n{}: {} dead threads hold their messages: see `mews-outbox dead list`",
                    a.account, a.threads.dead
                );
            }
            if let (Some(until), Some(reason)) = (&a.paused_until, &a.pause_reason) {
                out += &format!("\n{}: PAUSED until {until}: {reason}", a.account);
            }
            if let Some(error) = &a.last_error {
                out += &format!("\n{}: last error: {error}", a.account);
            }
            for e in &a.dead_errors {
                out += &format!("\n{}: dead ×{}: {}", a.account, e.rows, e.error);
            }
        }
        out.lines()
            .map(str::trim_end)
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// "12s ago" / "in 3m 4s" style distance between a stored time and now.
fn age(stored: Option<&str>, now: SystemTime, suffix: &str) -> String {
    let Some(t) = stored.and_then(parse_timestamp) else {
        return "-".into();
    };
    let (d, prefix, suffix) = match now.duration_since(t) {
        Ok(d) => (d, "", suffix),
        Err(e) => (e.duration(), "in ", ""),
    };
    let d = std::time::Duration::from_secs(d.as_secs());
    format!("{prefix}{}{suffix}", humantime::format_duration(d))
}
