//! `mews-outbox dead list`: the dead-lettered rows, for people and scripts.

use std::time::SystemTime;

use serde::Serialize;

use crate::store::{DeadRow, DeadThread, OperatorStore, StoreError};

/// Characters of a text shown by the text listing (JSON has it whole).
const TEXT_PREVIEW_CHARS: usize = 60;

/// What `dead list --json` prints.
#[derive(Debug, Serialize)]
pub struct DeadReport {
    pub generated_at: String,
    pub rows: Vec<DeadRow>,
    /// Dead threads (`outbox_threads`), with the messages held behind each.
    pub threads: Vec<DeadThread>,
}

impl DeadReport {
    /// Reads the dead rows (of `account`, or all) from any store.
    pub async fn read<O: OperatorStore>(
        store: &O,
        account: Option<&str>,
        now: SystemTime,
    ) -> Result<DeadReport, StoreError> {
        Ok(DeadReport {
            generated_at: crate::store::timestamp(now),
            rows: store.dead_rows(account).await?,
            threads: store.dead_threads(account).await?,
        })
    }

    /// One block per row: its identity, then its text and why it died;
    /// then one block per dead thread.
    pub fn render_text(&self) -> String {
        let mut out = String::new();
        if self.rows.is_empty() {
            out += "no dead rows";
        } else {
            out += &format!(
                "{:>8}  {:<16} {:>8}  {:<24}  {}\n",
                "ID", "ACCOUNT", "ATTEMPTS", "DEAD SINCE", "THREAD"
            );
            for row in &self.rows {
                let thread = match (&row.message_thread_id, &row.thread_key) {
                    (Some(id), Some(key)) => format!("{id} (key {key:?})"),
                    (Some(id), None) => id.clone(),
                    (None, Some(key)) => format!("key {key:?} (never created)"),
                    (None, None) => "-".to_owned(),
                };
                out += &format!(
                    "{:>8}  {:<16} {:>8}  {:<24}  {}\n",
                    row.id,
                    row.account,
                    row.attempts,
                    row.dead_at.as_deref().unwrap_or("-"),
                    thread,
                );
                out += &format!("          text:  {}\n", preview(&row.text));
                out += &format!(
                    "          error: {}\n",
                    row.last_error.as_deref().unwrap_or("-")
                );
            }
            out += &format!("{} dead rows", self.rows.len());
        }
        if self.threads.is_empty() {
            return out;
        }
        out += &format!(
            "\n\ndead threads (their messages are held, not sent; `mews-outbox dead requeue --thread N` once the cause is fixed):\n{:>8}  {:<16} {:>8}  {:<24}  {:>13}  {}\n",
            "THREAD", "ACCOUNT", "ATTEMPTS", "DEAD SINCE", "MESSAGES HELD", "THREAD KEY"
        );
        for t in &self.threads {
            out += &format!(
                "{:>8}  {:<16} {:>8}  {:<24}  {:>13}  {:?}\n",
                t.id,
                t.account,
                t.attempts,
                t.dead_at.as_deref().unwrap_or("-"),
                t.messages_held,
                t.thread_key,
            );
            out += &format!(
                "          subject: {}  original sender: {}\n",
                preview(&t.subject),
                preview(&t.original_sender)
            );
            out += &format!(
                "          error: {}\n",
                t.last_error.as_deref().unwrap_or("-")
            );
        }
        out += &format!("{} dead threads", self.threads.len());
        out
    }
}

/// The start of a text on one line, quoted.
fn preview(text: &str) -> String {
    let mut shown: String = text
        .chars()
        .take(TEXT_PREVIEW_CHARS)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if text.chars().count() > TEXT_PREVIEW_CHARS {
        shown.push('…');
    }
    format!("{shown:?}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_dead_row_shows_its_text_on_one_line_and_its_error() {
        let report = DeadReport {
            generated_at: "now".into(),
            rows: vec![DeadRow {
                id: 17,
                account: "default".into(),
                message_thread_id: Some("7f9325f6-ef44-4911-89a8-ae51010a5aa4".into()),
                thread_key: None,
                text: format!("line one\nline two {}", "x".repeat(100)),
                attempts: 1,
                last_error: Some("HTTP 403: poisoned (RequestId r)".into()),
                created_at: "2026-11-28T07:00:00.000Z".into(),
                dead_at: Some("2026-11-28T07:00:01.000Z".into()),
            }],
            threads: vec![],
        };
        let text = report.render_text();
        assert!(text.contains("      17  default"), "{text}");
        assert!(text.contains("\"line one line two xx"), "{text}");
        assert!(text.contains("…\""), "{text}");
        assert!(
            text.contains("error: HTTP 403: poisoned (RequestId r)"),
            "{text}"
        );
        assert!(text.ends_with("1 dead rows"), "{text}");
        assert_eq!(
            DeadReport {
                generated_at: "now".into(),
                rows: vec![],
                threads: vec![],
            }
            .render_text(),
            "no dead rows"
        );
    }

    #[test]
    fn dead_threads_follow_in_their_own_section() {
        let report = DeadReport {
            generated_at: "now".into(),
            rows: vec![],
            threads: vec![DeadThread {
                id: 4,
                account: "default".into(),
                thread_key: "booking-42".into(),
                subject: "Your stay".into(),
                original_sender: "Ada".into(),
                attempts: 1,
                last_error: Some("HTTP 403: Scripted failure 403".into()),
                created_at: "2026-11-28T07:00:00.000Z".into(),
                dead_at: Some("2026-11-28T07:00:01.000Z".into()),
                messages_held: 2,
            }],
        };
        let text = report.render_text();
        assert!(text.starts_with("no dead rows\n\ndead threads"), "{text}");
        assert!(text.contains("dead requeue --thread N"), "{text}");
        assert!(text.contains("\"booking-42\""), "{text}");
        assert!(
            text.contains("error: HTTP 403: Scripted failure 403"),
            "{text}"
        );
        assert!(text.ends_with("1 dead threads"), "{text}");
    }
}
