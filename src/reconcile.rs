//! Ambiguous outcomes: which of our rows Mews already has.
//!
//! The Connector API has no idempotency key, and `Identifier` is not stored
//! by Mews, so a row whose last send may have reached Mews is looked for in
//! its thread (`messages/getAll`): an `Application` message with the same
//! text, created since the row was first sent, that no other row of ours
//! owns. The worker does the requests; this module decides, without I/O.

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use crate::mews::{AddedMessage, TimeInterval};
use crate::store::ClaimedRow;

/// Clocks differ: Mews's `CreatedUtc` may be this far from ours either way.
pub const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);
/// Longest `CreatedUtc` interval asked for: Mews allows "one month", and the
/// shortest month has 28 days.
pub const MAX_INTERVAL: Duration = Duration::from_secs(28 * 24 * 3600);
/// Messages per `messages/getAll` page (Mews's maximum `Limitation.Count`).
pub const PAGE_SIZE: u32 = 1000;
/// Pages read before giving up on a read-back (then the rows are re-sent).
pub const MAX_PAGES: usize = 10;

/// The `CreatedUtc` interval that holds every copy Mews may have of `rows`:
/// from the earliest first send to now, widened by [`CLOCK_SKEW`] on both
/// sides and cut to [`MAX_INTERVAL`].
pub fn window(rows: &[ClaimedRow], now: SystemTime) -> TimeInterval {
    let first = rows
        .iter()
        .filter_map(|r| r.first_sent_at)
        .min()
        .unwrap_or(now)
        .min(now);
    let end = now + CLOCK_SKEW + Duration::from_secs(1);
    let start = (first - CLOCK_SKEW).max(end - MAX_INTERVAL);
    TimeInterval {
        start_utc: humantime::format_rfc3339_seconds(start).to_string(),
        end_utc: humantime::format_rfc3339_seconds(end).to_string(),
    }
}

/// What the read-back found.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Matched {
    /// Rows Mews has, with the message that is theirs.
    pub found: Vec<(i64, AddedMessage)>,
    /// Rows Mews does not have: send them again.
    pub absent: Vec<i64>,
}

/// Whether `message` could be the copy of `row` that Mews stored.
fn could_be(row: &ClaimedRow, message: &AddedMessage) -> bool {
    let Ok(text) = &row.text else {
        return false;
    };
    message.sender.kind() == "Application"
        && message.text.as_deref() == Some(text.as_str())
        && message
            .message_thread_id
            .as_deref()
            .is_some_and(|t| t.eq_ignore_ascii_case(&row.message_thread_id))
}

/// Ids of the messages that could be a copy of one of `rows`: the ones to
/// ask the store about ([`crate::store::Outbox::owned_message_ids`]).
pub fn candidates<'a>(rows: &[ClaimedRow], messages: &'a [AddedMessage]) -> Vec<&'a str> {
    messages
        .iter()
        .filter(|m| rows.iter().any(|r| could_be(r, m)))
        .map(|m| m.id.as_str())
        .collect()
}

/// Matches `rows` against the messages read back. A message counts for at
/// most one row, and never when `owned` (another row of ours has its Id).
/// Among several copies the oldest is taken: the first send made it.
pub fn match_rows(
    rows: &[ClaimedRow],
    messages: &[AddedMessage],
    owned: &HashSet<String>,
) -> Matched {
    let mut taken: HashSet<&str> = HashSet::new();
    let mut matched = Matched::default();
    let mut rows: Vec<&ClaimedRow> = rows.iter().collect();
    rows.sort_by_key(|r| r.id);
    for row in rows {
        // Newest first from Mews: the last candidate is the oldest.
        let copy = messages
            .iter()
            .rev()
            .find(|m| could_be(row, m) && !owned.contains(&m.id) && !taken.contains(m.id.as_str()));
        match copy {
            Some(message) => {
                taken.insert(&message.id);
                matched.found.push((row.id, message.clone()));
            }
            None => matched.absent.push(row.id),
        }
    }
    matched
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mews::Sender;

    const T1: &str = "7f9325f6-ef44-4911-89a8-ae51010a5aa4";
    const T2: &str = "0b8c8a58-1a60-4c5e-9f0e-3d6f2f2a9d11";

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + secs)
    }

    fn row(id: i64, thread: &str, text: &str) -> ClaimedRow {
        ClaimedRow {
            id,
            message_thread_id: thread.into(),
            text: Ok(text.into()),
            attempts: 1,
            needs_reconcile: true,
            first_sent_at: Some(at(100)),
        }
    }

    fn message(id: &str, thread: &str, text: &str, sender: &str) -> AddedMessage {
        AddedMessage {
            id: id.into(),
            message_thread_id: Some(thread.to_uppercase()),
            text: Some(text.into()),
            sender: Sender::Tagged {
                discriminator: sender.into(),
                value: None,
            },
            created_utc: "2027-01-15T08:00:00Z".into(),
        }
    }

    #[test]
    fn the_window_runs_from_the_first_send_to_now_with_room_for_skew() {
        let mut rows = vec![row(1, T1, "a"), row(2, T1, "b")];
        rows[1].first_sent_at = Some(at(40));
        let w = window(&rows, at(1000));
        assert_eq!(
            w.start_utc,
            humantime::format_rfc3339_seconds(at(40) - CLOCK_SKEW).to_string()
        );
        assert_eq!(
            w.end_utc,
            humantime::format_rfc3339_seconds(at(1001) + CLOCK_SKEW).to_string()
        );
    }

    #[test]
    fn the_window_never_exceeds_what_mews_accepts() {
        let mut rows = vec![row(1, T1, "a")];
        rows[0].first_sent_at = Some(at(0));
        let now = at(0) + Duration::from_secs(90 * 24 * 3600);
        let w = window(&rows, now);
        let start = humantime::parse_rfc3339(&w.start_utc).unwrap();
        let end = humantime::parse_rfc3339(&w.end_utc).unwrap();
        assert!(end.duration_since(start).unwrap() <= MAX_INTERVAL);
    }

    #[test]
    fn a_row_matches_an_application_message_with_its_text_in_its_thread() {
        let rows = [row(1, T1, "hello"), row(2, T2, "bye")];
        let messages = [
            message("m-staff", T1, "hello", "Enterprise"),
            message("m-other-thread", T2, "hello", "Application"),
            message("m-1", T1, "hello", "Application"),
        ];
        let m = match_rows(&rows, &messages, &HashSet::new());
        assert_eq!(m.found.len(), 1);
        assert_eq!((m.found[0].0, m.found[0].1.id.as_str()), (1, "m-1"));
        assert_eq!(m.absent, [2]);
        assert_eq!(candidates(&rows, &messages), ["m-1"]);
    }

    #[test]
    fn a_message_owned_by_another_row_or_taken_once_is_not_taken_again() {
        // Two rows of ours with the same text in one thread (a guest is
        // told "thank you" twice): two copies at Mews, one owned already.
        let rows = [row(5, T1, "thank you"), row(6, T1, "thank you")];
        let messages = [
            message("newest", T1, "thank you", "Application"),
            message("middle", T1, "thank you", "Application"),
            message("oldest", T1, "thank you", "Application"),
        ];
        let owned = HashSet::from(["oldest".to_owned()]);
        let m = match_rows(&rows, &messages, &owned);
        let found: Vec<(i64, &str)> = m.found.iter().map(|(id, m)| (*id, m.id.as_str())).collect();
        assert_eq!(found, [(5, "middle"), (6, "newest")]);
        assert!(m.absent.is_empty());

        let m = match_rows(&rows, &messages[..1], &HashSet::new());
        assert_eq!(m.found.len(), 1);
        assert_eq!(m.absent, [6]);
    }
}
