//! Ambiguous outcomes: which of our rows Mews already has.
//!
//! The Connector API has no idempotency key, and `Identifier` is not stored
//! by Mews, so a row whose last send may have reached Mews is looked for in
//! its thread (`messages/getAll`): an `Application` message with the same
//! text, created since the row was first sent, that no other row of ours
//! owns. "Since" is by Mews's clock: the offset between its clock and ours
//! is measured from the `Date` header of its responses ([`ClockOffset`]).
//! An identical text created by someone else before our first send could
//! have reached Mews is never adopted (that would lose the message); one
//! created after it cannot be told from ours. The worker does the requests;
//! this module decides, without I/O.

use std::collections::HashSet;
use std::time::{Duration, Instant, SystemTime};

use crate::mews::{AddedMessage, MessageThread, TimeInterval};
use crate::store::{ClaimedRow, ClaimedThread};

/// Before any measurement of Mews's clock, the read-back window reaches
/// this far past the first send on either side, so that a copy stored by a
/// Mews whose clock differs from ours is in the answer; the answer's own
/// `Date` then decides what is adopted.
pub const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);
/// `Date` and `CreatedUtc` are whole seconds (cut, not rounded).
const WHOLE_SECOND: Duration = Duration::from_secs(1);
/// Without any `Date` from Mews (none has come with a response), the clocks
/// are assumed to agree within this. A Mews clock further behind ours then
/// means a copy of ours is not adopted and the row is sent again (a
/// possible duplicate), never that another message is adopted.
pub const UNMEASURED_UNCERTAINTY: Duration = Duration::from_secs(2);

/// How far Mews's clock is from ours, measured from a response's `Date`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockOffset {
    /// Mews's clock minus ours, in milliseconds (positive: Mews is ahead).
    pub offset_ms: i64,
    /// The true offset lies within `offset_ms` ± this.
    pub uncertainty: Duration,
}

impl ClockOffset {
    /// What a reply says: Mews wrote `date` (whole seconds) at some moment
    /// of a request sent at `sent_at` (our clock) whose headers came back
    /// `elapsed` later. Offset = `date` − our clock at the midpoint; the
    /// uncertainty is the `Date`'s resolution plus half the round trip.
    pub fn measure(date: SystemTime, sent_at: SystemTime, elapsed: Duration) -> ClockOffset {
        let midpoint = sent_at + elapsed / 2;
        ClockOffset {
            offset_ms: signed_ms(date, midpoint),
            uncertainty: WHOLE_SECOND + elapsed / 2,
        }
    }

    /// Assumed when Mews never sent a `Date` (see [`UNMEASURED_UNCERTAINTY`]).
    pub const UNMEASURED: ClockOffset = ClockOffset {
        offset_ms: 0,
        uncertainty: UNMEASURED_UNCERTAINTY,
    };

    /// The earliest Mews's clock can have read when ours read `t`.
    fn earliest_at_mews(&self, t: SystemTime) -> SystemTime {
        shift(t, self.offset_ms) - self.uncertainty
    }

    /// The latest Mews's clock can have read when ours read `t`.
    fn latest_at_mews(&self, t: SystemTime) -> SystemTime {
        shift(t, self.offset_ms) + self.uncertainty
    }
}

/// A kept measurement is replaced by a less precise one only once it is
/// this old (Mews's clock may have been corrected meanwhile).
pub const MEASUREMENT_MAX_AGE: Duration = Duration::from_secs(10 * 60);

/// The measurement to keep after `new`, taken at `now`: the newer one,
/// unless a measurement younger than [`MEASUREMENT_MAX_AGE`] is more
/// precise (a slow answer measures with a wider uncertainty).
pub fn keep_measurement(
    kept: Option<(ClockOffset, Instant)>,
    new: ClockOffset,
    now: Instant,
) -> (ClockOffset, Instant) {
    match kept {
        Some((old, at))
            if old.uncertainty < new.uncertainty
                && now.saturating_duration_since(at) < MEASUREMENT_MAX_AGE =>
        {
            (old, at)
        }
        _ => (new, now),
    }
}

/// `a − b` in milliseconds, negative when `a` is earlier.
fn signed_ms(a: SystemTime, b: SystemTime) -> i64 {
    match a.duration_since(b) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_millis()).unwrap_or(i64::MAX),
    }
}

fn shift(t: SystemTime, ms: i64) -> SystemTime {
    let d = Duration::from_millis(ms.unsigned_abs());
    if ms >= 0 { t + d } else { t - d }
}

/// The oldest `CreatedUtc` (Mews's clock, whole seconds) that a copy of a
/// row first sent at `first_sent` (our clock) can carry: Mews cannot have
/// stored it before the request started.
pub fn earliest_copy(first_sent: SystemTime, clock: &ClockOffset) -> SystemTime {
    clock.earliest_at_mews(first_sent) - WHOLE_SECOND
}
/// Longest `CreatedUtc` interval asked for: Mews allows "one month", and the
/// shortest month has 28 days.
pub const MAX_INTERVAL: Duration = Duration::from_secs(28 * 24 * 3600);
/// Messages per `messages/getAll` page (Mews's maximum `Limitation.Count`).
pub const PAGE_SIZE: u32 = 1000;
/// Pages read before giving up on a read-back (then the rows are re-sent).
pub const MAX_PAGES: usize = 10;

/// The `CreatedUtc` interval that holds every copy Mews may have of `rows`:
/// from the earliest first send to now, by Mews's clock as `clock` measured
/// it ([`earliest_copy`] to the latest Mews can read now, plus
/// [`CLOCK_SKEW`] for copies stored while we ask); without a measurement
/// widened by [`CLOCK_SKEW`] on both sides. Cut to [`MAX_INTERVAL`].
pub fn window(rows: &[ClaimedRow], now: SystemTime, clock: Option<&ClockOffset>) -> TimeInterval {
    window_since(
        rows.iter().filter_map(|r| r.first_sent_at).min(),
        now,
        clock,
    )
}

/// [`window`] for whatever was first sent at `first_sent` (a thread's
/// `messageThreads/add`; `None`: now).
pub fn window_since(
    first_sent: Option<SystemTime>,
    now: SystemTime,
    clock: Option<&ClockOffset>,
) -> TimeInterval {
    let first = first_sent.unwrap_or(now).min(now);
    let (start, end) = match clock {
        Some(clock) => (
            earliest_copy(first, clock),
            clock.latest_at_mews(now) + CLOCK_SKEW + WHOLE_SECOND,
        ),
        None => (first - CLOCK_SKEW, now + CLOCK_SKEW + WHOLE_SECOND),
    };
    let start = start.max(end - MAX_INTERVAL);
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

/// Whether `message` could be the copy of `row` that Mews stored: the same
/// text in its thread from an application, created no earlier than the
/// row's first request could have reached Mews. A row without a first send
/// or a message without a readable `CreatedUtc` is never matched (sending
/// again risks a duplicate; adopting risks a lost message).
fn could_be(row: &ClaimedRow, message: &AddedMessage, clock: &ClockOffset) -> bool {
    let Ok(text) = &row.text else {
        return false;
    };
    let Some(first_sent) = row.first_sent_at else {
        return false;
    };
    let recent_enough = humantime::parse_rfc3339_weak(message.created_utc.trim_end_matches('Z'))
        .is_ok_and(|created| created >= earliest_copy(first_sent, clock));
    recent_enough
        && message.sender.kind() == "Application"
        && message.text.as_deref() == Some(text.as_str())
        && message
            .message_thread_id
            .as_deref()
            .is_some_and(|t| t.eq_ignore_ascii_case(&row.message_thread_id))
}

/// Ids of the messages that could be a copy of one of `rows`: the ones to
/// ask the store about ([`crate::store::Outbox::owned_message_ids`]).
pub fn candidates<'a>(
    rows: &[ClaimedRow],
    messages: &'a [AddedMessage],
    clock: &ClockOffset,
) -> Vec<&'a str> {
    messages
        .iter()
        .filter(|m| rows.iter().any(|r| could_be(r, m, clock)))
        .map(|m| m.id.as_str())
        .collect()
}

/// Matches `rows` against the messages read back. A message counts for at
/// most one row, and never when `owned` (another row of ours has its Id).
/// Among several copies the oldest is taken: the first send made it.
/// `clock` is Mews's clock against ours ([`ClockOffset::UNMEASURED`] when
/// Mews never sent a `Date`).
pub fn match_rows(
    rows: &[ClaimedRow],
    messages: &[AddedMessage],
    owned: &HashSet<String>,
    clock: &ClockOffset,
) -> Matched {
    let mut taken: HashSet<&str> = HashSet::new();
    let mut matched = Matched::default();
    let mut rows: Vec<&ClaimedRow> = rows.iter().collect();
    rows.sort_by_key(|r| r.id);
    for row in rows {
        // Newest first from Mews: the last candidate is the oldest.
        let copy = messages.iter().rev().find(|m| {
            could_be(row, m, clock) && !owned.contains(&m.id) && !taken.contains(m.id.as_str())
        });
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

/// Whether `found` could be the thread that a `messageThreads/add` of
/// `thread` created: the same `Subject` and `OriginalSender`, created no
/// earlier than its first request could have reached Mews. A thread never
/// sent, or a `CreatedUtc` that does not parse, is never matched.
fn could_be_thread(thread: &ClaimedThread, found: &MessageThread, clock: &ClockOffset) -> bool {
    let Some(first_sent) = thread.first_sent_at else {
        return false;
    };
    found.subject == thread.subject
        && found.original_sender == thread.original_sender
        && humantime::parse_rfc3339_weak(found.created_utc.trim_end_matches('Z'))
            .is_ok_and(|created| created >= earliest_copy(first_sent, clock))
}

/// Ids of the threads read back that could be `thread`'s: the ones to ask
/// the store about ([`crate::store::Outbox::owned_thread_ids`]).
pub fn thread_candidates<'a>(
    thread: &ClaimedThread,
    found: &'a [MessageThread],
    clock: &ClockOffset,
) -> Vec<&'a str> {
    found
        .iter()
        .filter(|t| could_be_thread(thread, t, clock))
        .map(|t| t.id.as_str())
        .collect()
}

/// The thread of `found` (newest first, as Mews lists them) that Mews
/// created for `thread`: among those that could be, and that no thread of
/// ours owns already, the earliest created (the first request made it).
pub fn match_thread<'a>(
    thread: &ClaimedThread,
    found: &'a [MessageThread],
    owned: &HashSet<String>,
    clock: &ClockOffset,
) -> Option<&'a MessageThread> {
    found
        .iter()
        .filter(|t| could_be_thread(thread, t, clock) && !owned.contains(&t.id))
        .min_by_key(|t| {
            humantime::parse_rfc3339_weak(t.created_utc.trim_end_matches('Z'))
                .unwrap_or(SystemTime::UNIX_EPOCH)
        })
}

#[cfg(test)]
mod thread_tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + secs)
    }

    fn found(id: &str, subject: &str, sender: &str, created: SystemTime) -> MessageThread {
        MessageThread {
            id: id.into(),
            original_sender: sender.into(),
            subject: subject.into(),
            created_utc: humantime::format_rfc3339_seconds(created).to_string(),
            updated_utc: None,
            is_resolved: None,
        }
    }

    fn ours() -> ClaimedThread {
        ClaimedThread {
            id: 7,
            thread_key: "booking-1".into(),
            subject: "Your stay".into(),
            original_sender: "Ada".into(),
            attempts: 1,
            needs_reconcile: true,
            first_sent_at: Some(at(100)),
        }
    }

    #[test]
    fn the_earliest_unowned_thread_with_the_same_subject_and_sender_is_adopted() {
        let clock = ClockOffset::UNMEASURED;
        let threads = [
            found("newest", "Your stay", "Ada", at(130)),
            found("other-subject", "Your visit", "Ada", at(120)),
            found("other-sender", "Your stay", "Bob", at(115)),
            found("owned", "Your stay", "Ada", at(105)),
            found("earliest", "Your stay", "Ada", at(110)),
            found("before-our-first-send", "Your stay", "Ada", at(10)),
        ];
        let owned: HashSet<String> = ["owned".to_owned()].into();
        assert_eq!(
            thread_candidates(&ours(), &threads, &clock),
            ["newest", "owned", "earliest"]
        );
        assert_eq!(
            match_thread(&ours(), &threads, &owned, &clock).map(|t| t.id.as_str()),
            Some("earliest")
        );
        assert_eq!(
            match_thread(&ours(), &threads[1..4], &owned, &clock),
            None,
            "nothing of ours: create it"
        );
        let never_sent = ClaimedThread {
            first_sent_at: None,
            ..ours()
        };
        assert_eq!(match_thread(&never_sent, &threads, &owned, &clock), None);
    }
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
            // 100 s after the rows' first send (`at(100)`).
            created_utc: humantime::format_rfc3339_seconds(at(200)).to_string(),
        }
    }

    fn created_at(mut m: AddedMessage, t: SystemTime) -> AddedMessage {
        m.created_utc = humantime::format_rfc3339_seconds(t).to_string();
        m
    }

    /// Measured on a 200 ms round trip: ± 1.1 s.
    fn mews_clock(offset_ms: i64) -> ClockOffset {
        let sent_at = at(50);
        let elapsed = Duration::from_millis(200);
        let date = shift(sent_at + elapsed / 2, offset_ms);
        ClockOffset::measure(date, sent_at, elapsed)
    }

    const SAME: ClockOffset = ClockOffset {
        offset_ms: 0,
        uncertainty: Duration::from_millis(1100),
    };

    #[test]
    fn the_window_runs_from_the_first_send_to_now_with_room_for_skew() {
        let mut rows = vec![row(1, T1, "a"), row(2, T1, "b")];
        rows[1].first_sent_at = Some(at(40));
        let w = window(&rows, at(1000), None);
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
        let w = window(&rows, now, None);
        let start = humantime::parse_rfc3339(&w.start_utc).unwrap();
        let end = humantime::parse_rfc3339(&w.end_utc).unwrap();
        assert!(end.duration_since(start).unwrap() <= MAX_INTERVAL);
        let w = window(&rows, now, Some(&mews_clock(-3_600_000)));
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
        let m = match_rows(&rows, &messages, &HashSet::new(), &SAME);
        assert_eq!(m.found.len(), 1);
        assert_eq!((m.found[0].0, m.found[0].1.id.as_str()), (1, "m-1"));
        assert_eq!(m.absent, [2]);
        assert_eq!(candidates(&rows, &messages, &SAME), ["m-1"]);
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
        let m = match_rows(&rows, &messages, &owned, &SAME);
        let found: Vec<(i64, &str)> = m.found.iter().map(|(id, m)| (*id, m.id.as_str())).collect();
        assert_eq!(found, [(5, "middle"), (6, "newest")]);
        assert!(m.absent.is_empty());

        let m = match_rows(&rows, &messages[..1], &HashSet::new(), &SAME);
        assert_eq!(m.found.len(), 1);
        assert_eq!(m.absent, [6]);
    }

    #[test]
    fn the_offset_is_the_date_against_the_middle_of_the_round_trip() {
        let sent_at = at(10);
        // Mews 3 minutes ahead wrote 12:03:10 (whole seconds) 400 ms in.
        let date = at(10) + Duration::from_secs(180);
        let c = ClockOffset::measure(date, sent_at, Duration::from_millis(800));
        assert_eq!(c.offset_ms, 180_000 - 400);
        assert_eq!(c.uncertainty, Duration::from_millis(1400));
        let behind =
            ClockOffset::measure(at(10) - Duration::from_secs(180), sent_at, Duration::ZERO);
        assert_eq!(behind.offset_ms, -180_000);
        assert_eq!(behind.uncertainty, Duration::from_secs(1));
    }

    #[test]
    fn an_identical_text_created_before_the_first_send_could_reach_mews_is_never_adopted() {
        let rows = [row(1, T1, "hello")]; // first sent at(100), our clock
        for offset_ms in [0, 180_000, -180_000] {
            let clock = mews_clock(offset_ms);
            let mews = |t: SystemTime| shift(t, offset_ms);
            let older = created_at(message("older", T1, "hello", "Application"), mews(at(40)));
            // Created in the same second as the first send, by Mews's clock
            // (cut to the second): could be ours, so adopted.
            let ours = created_at(message("ours", T1, "hello", "Application"), mews(at(100)));
            let m = match_rows(
                &rows,
                &[ours.clone(), older.clone()],
                &HashSet::new(),
                &clock,
            );
            assert_eq!(m.found.len(), 1, "offset {offset_ms}");
            assert_eq!(m.found[0].1.id, "ours", "offset {offset_ms}");
            let m = match_rows(&rows, std::slice::from_ref(&older), &HashSet::new(), &clock);
            assert_eq!(
                m.absent,
                [1],
                "offset {offset_ms}: the older text is not ours"
            );
            assert!(candidates(&rows, &[older], &clock).is_empty());
        }
    }

    #[test]
    fn the_bound_allows_for_the_uncertainty_and_the_whole_seconds_and_no_more() {
        let rows = [row(1, T1, "hello")];
        let clock = mews_clock(0); // ± 1.1 s
        let bound = earliest_copy(at(100), &clock);
        assert_eq!(bound, at(100) - Duration::from_millis(2100));
        let just_in = created_at(message("in", T1, "hello", "Application"), at(98));
        let just_out = created_at(message("out", T1, "hello", "Application"), at(97));
        assert_eq!(
            match_rows(&rows, &[just_in], &HashSet::new(), &clock)
                .found
                .len(),
            1
        );
        assert_eq!(
            match_rows(&rows, &[just_out], &HashSet::new(), &clock).absent,
            [1]
        );
    }

    #[test]
    fn without_a_first_send_or_a_readable_created_utc_nothing_is_adopted() {
        let mut rows = [row(1, T1, "hello")];
        let mut unreadable = message("m", T1, "hello", "Application");
        unreadable.created_utc = "yesterday".into();
        assert_eq!(
            match_rows(&rows, &[unreadable], &HashSet::new(), &SAME).absent,
            [1]
        );
        rows[0].first_sent_at = None;
        let fine = message("m", T1, "hello", "Application");
        assert_eq!(
            match_rows(&rows, &[fine], &HashSet::new(), &SAME).absent,
            [1]
        );
    }

    #[test]
    fn a_slow_answer_does_not_replace_a_recent_precise_measurement() {
        let t0 = Instant::now();
        let precise = mews_clock(1000);
        let sloppy = ClockOffset::measure(at(60), at(50), Duration::from_secs(8));
        assert_eq!(keep_measurement(None, sloppy, t0), (sloppy, t0));
        let kept = Some((precise, t0));
        let soon = t0 + Duration::from_secs(5);
        assert_eq!(keep_measurement(kept, sloppy, soon), (precise, t0));
        let later = t0 + MEASUREMENT_MAX_AGE;
        assert_eq!(keep_measurement(kept, sloppy, later), (sloppy, later));
        let newer = mews_clock(-500);
        assert_eq!(
            keep_measurement(kept, newer, soon),
            (newer, soon),
            "as precise: the newer"
        );
    }

    #[test]
    fn a_measured_window_starts_at_the_earliest_copy_by_mews_clock() {
        let rows = [row(1, T1, "a")];
        let clock = mews_clock(-180_000);
        let w = window(&rows, at(1000), Some(&clock));
        assert_eq!(
            w.start_utc,
            humantime::format_rfc3339_seconds(earliest_copy(at(100), &clock)).to_string()
        );
        let end = humantime::parse_rfc3339(&w.end_utc).unwrap();
        assert!(
            end >= clock.latest_at_mews(at(1000)),
            "copies stored until now are inside"
        );
    }
}
