//! `mews-outbox dead list`: the dead-lettered rows, for people and scripts.

use std::time::SystemTime;

use serde::Serialize;

use crate::store::{DeadRow, OperatorStore, StoreError};

/// Characters of a text shown by the text listing (JSON has it whole).
const TEXT_PREVIEW_CHARS: usize = 60;

/// What `dead list --json` prints.
#[derive(Debug, Serialize)]
pub struct DeadReport {
    pub generated_at: String,
    pub rows: Vec<DeadRow>,
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
        })
    }

    /// One block per row: its identity, then its text and why it died.
    pub fn render_text(&self) -> String {
        if self.rows.is_empty() {
            return "no dead rows".into();
        }
        let mut out = format!(
            "{:>8}  {:<16} {:>8}  {:<24}  {}\n",
            "ID", "ACCOUNT", "ATTEMPTS", "DEAD SINCE", "THREAD"
        );
        for row in &self.rows {
            out += &format!(
                "{:>8}  {:<16} {:>8}  {:<24}  {}\n",
                row.id,
                row.account,
                row.attempts,
                row.dead_at.as_deref().unwrap_or("-"),
                row.message_thread_id.as_deref().unwrap_or("-"),
            );
            out += &format!("          text:  {}\n", preview(&row.text));
            out += &format!(
                "          error: {}\n",
                row.last_error.as_deref().unwrap_or("-")
            );
        }
        out += &format!("{} dead rows", self.rows.len());
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
                rows: vec![]
            }
            .render_text(),
            "no dead rows"
        );
    }
}
