//! The delivery loop's statements ([`Outbox`]), one statement or short
//! transaction each.

use std::collections::HashSet;
use std::time::SystemTime;

use serde_json::json;
use sqlx::Row;

use super::{SqliteStore, sql};
use crate::store::{
    AccountPause, ClaimedRow, ClaimedThread, Outbox, RowOutcome, Status, StoreError, ThreadOutcome,
    decode_recent_requests, encode_recent_requests, parse_timestamp, timestamp,
};

impl Outbox for SqliteStore {
    async fn claim_within(
        &self,
        account: &str,
        now: SystemTime,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<ClaimedRow>, StoreError> {
        let rows = sqlx::query(sql::CLAIM)
            .bind(account)
            .bind(timestamp(now))
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .bind(i64::try_from(max_bytes).unwrap_or(i64::MAX))
            .fetch_all(&self.writer)
            .await?;
        let mut claimed = rows
            .into_iter()
            .map(|row| {
                Ok(ClaimedRow {
                    id: row.try_get("id")?,
                    message_thread_id: row.try_get("message_thread_id")?,
                    text: String::from_utf8(row.try_get::<Vec<u8>, _>("text")?),
                    attempts: u32::try_from(row.try_get::<i64, _>("attempts")?).unwrap_or(0),
                    needs_reconcile: row.try_get::<i64, _>("needs_reconcile")? != 0,
                    first_sent_at: row
                        .try_get::<Option<String>, _>("first_sent_at")?
                        .as_deref()
                        .and_then(parse_timestamp),
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()?;
        claimed.sort_by_key(|row| row.id);
        Ok(claimed)
    }

    async fn next_due(
        &self,
        account: &str,
        now: SystemTime,
    ) -> Result<Option<SystemTime>, StoreError> {
        let next: Option<String> = sqlx::query_scalar(sql::NEXT_DUE)
            .bind(account)
            .bind(timestamp(now))
            .fetch_one(&self.pool)
            .await?;
        Ok(next.as_deref().and_then(parse_timestamp))
    }

    async fn record(
        &self,
        outcomes: &[(i64, RowOutcome)],
        now: SystemTime,
    ) -> Result<(), StoreError> {
        if outcomes.is_empty() {
            return Ok(());
        }
        let now = timestamp(now);
        // Delivered rows, the bulk of any drain, go through a leaner
        // statement: positional JSON arrays, only the columns they change.
        let mut delivered = String::with_capacity(outcomes.len() * 96 + 2);
        delivered.push('[');
        let mut others = Vec::new();
        for (id, outcome) in outcomes {
            match outcome {
                RowOutcome::Delivered {
                    mews_message_id,
                    mews_created_utc,
                    mews_sender,
                } => {
                    if delivered.len() > 1 {
                        delivered.push(',');
                    }
                    delivered.push_str(
                        &json!([id, mews_message_id, mews_created_utc, mews_sender]).to_string(),
                    );
                }
                RowOutcome::Retry {
                    at,
                    error,
                    attempt,
                    maybe_stored,
                } => others.push(json!({
                    "id": id, "status": Status::Pending.as_str(), "attempt": i32::from(*attempt),
                    "next_attempt_at": timestamp(*at), "error": error,
                    "maybe_stored": i32::from(*maybe_stored),
                })),
                RowOutcome::Dead { error } => others.push(json!({
                    "id": id, "status": Status::Dead.as_str(), "attempt": 1, "error": error,
                })),
                RowOutcome::Release => others.push(json!({
                    "id": id, "status": Status::Pending.as_str(), "attempt": 0, "next_attempt_at": now,
                })),
            }
        }
        delivered.push(']');
        let delivered = (delivered.len() > 2).then(|| {
            sqlx::query(sql::RECORD_DELIVERED)
                .bind(delivered)
                .bind(&now)
        });
        let others = (!others.is_empty()).then(|| {
            sqlx::query(sql::RECORD)
                .bind(serde_json::Value::Array(others).to_string())
                .bind(&now)
        });
        match (delivered, others) {
            // One statement is its own transaction: no BEGIN/COMMIT round trips.
            (Some(only), None) | (None, Some(only)) => {
                only.execute(&self.writer).await?;
            }
            (Some(delivered), Some(others)) => {
                let mut tx = self.writer.begin().await?;
                delivered.execute(&mut *tx).await?;
                others.execute(&mut *tx).await?;
                tx.commit().await?;
            }
            (None, None) => {}
        }
        Ok(())
    }

    async fn pauses(&self) -> Result<Vec<AccountPause>, StoreError> {
        let rows = sqlx::query(
            "SELECT account, paused_until, pause_reason, pause_streak FROM outbox_account_state
             WHERE paused_until IS NOT NULL",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut pauses = Vec::with_capacity(rows.len());
        for row in rows {
            let until: String = row.try_get("paused_until")?;
            let Some(until) = parse_timestamp(&until) else {
                continue;
            };
            pauses.push(AccountPause {
                account: row.try_get("account")?,
                until,
                reason: row
                    .try_get::<Option<String>, _>("pause_reason")?
                    .unwrap_or_default(),
                streak: u32::try_from(row.try_get::<i64, _>("pause_streak")?).unwrap_or(0),
            });
        }
        Ok(pauses)
    }

    async fn save_pause(&self, pause: &AccountPause) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO outbox_account_state (account, paused_until, pause_reason, pause_streak)
             VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (account) DO UPDATE SET
                 paused_until = excluded.paused_until,
                 pause_reason = excluded.pause_reason,
                 pause_streak = excluded.pause_streak",
        )
        .bind(&pause.account)
        .bind(timestamp(pause.until))
        .bind(&pause.reason)
        .bind(i64::from(pause.streak))
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    async fn clear_pause(&self, account: &str) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE outbox_account_state
             SET paused_until = NULL, pause_reason = NULL, pause_streak = 0
             WHERE account = ?1",
        )
        .bind(account)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    async fn clear_reconcile(&self, ids: &[i64]) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        sqlx::query(
            "UPDATE outbox SET needs_reconcile = 0
             WHERE status = 'sending' AND id IN (SELECT value FROM json_each(?1))",
        )
        .bind(serde_json::to_string(ids).unwrap_or_else(|_| "[]".into()))
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    async fn dead_letter_held(
        &self,
        rows: &[(i64, String)],
        held_prefix: &str,
        now: SystemTime,
    ) -> Result<u64, StoreError> {
        if rows.is_empty() {
            return Ok(0);
        }
        let rows: Vec<_> = rows
            .iter()
            .map(|(id, error)| json!({"id": id, "error": error}))
            .collect();
        // substr, not LIKE: the prefix is text, not a pattern. The attempt
        // was counted when the row was held.
        let done = sqlx::query(
            "UPDATE outbox SET status = 'dead', dead_at = ?2, last_error = u.value ->> 'error'
             FROM json_each(?1) AS u
             WHERE outbox.id = u.value ->> 'id' AND +outbox.status = 'pending'
               AND substr(outbox.last_error, 1, length(?3)) = ?3",
        )
        .bind(serde_json::Value::Array(rows).to_string())
        .bind(timestamp(now))
        .bind(held_prefix)
        .execute(&self.writer)
        .await?;
        Ok(done.rows_affected())
    }

    async fn owned_message_ids(&self, ids: &[&str]) -> Result<HashSet<String>, StoreError> {
        if ids.is_empty() {
            return Ok(HashSet::new());
        }
        let owned: Vec<String> = sqlx::query_scalar(
            "SELECT mews_message_id FROM outbox
             WHERE mews_message_id IN (SELECT value FROM json_each(?1))",
        )
        .bind(serde_json::to_string(ids).unwrap_or_else(|_| "[]".into()))
        .fetch_all(&self.pool)
        .await?;
        Ok(owned.into_iter().collect())
    }

    async fn recent_requests(&self, account: &str) -> Result<Vec<SystemTime>, StoreError> {
        let stored: Option<Option<String>> = sqlx::query_scalar(
            "SELECT recent_requests FROM outbox_account_state WHERE account = ?1",
        )
        .bind(account)
        .fetch_optional(&self.pool)
        .await?;
        Ok(stored
            .flatten()
            .map(|text| decode_recent_requests(&text))
            .unwrap_or_default())
    }

    async fn request_starting(
        &self,
        account: &str,
        started_by: SystemTime,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO outbox_account_state (account, add_started_by) VALUES (?1, ?2)
             ON CONFLICT (account) DO UPDATE SET add_started_by = excluded.add_started_by",
        )
        .bind(account)
        .bind(timestamp(started_by))
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    async fn save_recent_requests(
        &self,
        account: &str,
        ends: &[SystemTime],
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO outbox_account_state (account, recent_requests) VALUES (?1, ?2)
             ON CONFLICT (account) DO UPDATE SET recent_requests = excluded.recent_requests",
        )
        .bind(account)
        .bind(encode_recent_requests(ends))
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    async fn claim_thread(
        &self,
        account: &str,
        now: SystemTime,
    ) -> Result<Option<ClaimedThread>, StoreError> {
        SqliteStore::claim_thread(self, account, now).await
    }

    async fn next_thread_due(
        &self,
        account: &str,
        now: SystemTime,
    ) -> Result<Option<SystemTime>, StoreError> {
        SqliteStore::next_thread_due(self, account, now).await
    }

    async fn record_thread(
        &self,
        id: i64,
        outcome: &ThreadOutcome,
        now: SystemTime,
    ) -> Result<(), StoreError> {
        SqliteStore::record_thread(self, id, outcome, now).await
    }

    async fn owned_thread_ids(&self, ids: &[&str]) -> Result<HashSet<String>, StoreError> {
        SqliteStore::owned_thread_ids(self, ids).await
    }
}
