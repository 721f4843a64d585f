//! How one account adapts to what Mews answers over many requests: the
//! batch size ([`BatchLimit`]), the circuit breaker ([`Breaker`]), the
//! systemic-rejection watch within one batch ([`RejectionWatch`]) and across
//! batches and time ([`RejectionStreak`]). Pure state machines fed with
//! outcomes; the worker does the I/O and the logging.

use std::collections::{BTreeMap, HashSet};

use crate::mews::{Outcome, without_request_id};
use crate::store::{ClaimedRow, RowOutcome};

/// Successful requests in a row after which a shrunk batch limit doubles.
pub const GROW_AFTER_SUCCESSES: u32 = 8;

/// Single messages that must all be rejected alike, with nothing accepted,
/// before a rejection counts as systemic: the first single the bisection
/// reaches, plus `SYSTEMIC_SAMPLE - 1` singles taken from across the rest of
/// the batch.
pub const SYSTEMIC_SAMPLE: usize = 3;

/// The account's batch limit: halved on 408, 413 and timeouts (down to 1),
/// doubled back after [`GROW_AFTER_SUCCESSES`] successes in a row (up to
/// `delivery.batch_size`).
#[derive(Debug, Clone)]
pub struct BatchLimit {
    max: usize,
    current: usize,
    successes: u32,
}

impl BatchLimit {
    pub fn new(max: usize) -> BatchLimit {
        BatchLimit {
            max: max.max(1),
            current: max.max(1),
            successes: 0,
        }
    }

    pub fn current(&self) -> usize {
        self.current
    }

    /// A smaller batch is likely to fare better. Returns `(from, to)` when
    /// the limit changed.
    pub fn shrink(&mut self) -> Option<(usize, usize)> {
        self.successes = 0;
        let from = self.current;
        self.current = (from / 2).max(1);
        (self.current != from).then_some((from, self.current))
    }

    /// A request was accepted. Returns `(from, to)` when the limit grew.
    pub fn success(&mut self) -> Option<(usize, usize)> {
        if self.current >= self.max {
            return None;
        }
        self.successes += 1;
        if self.successes < GROW_AFTER_SUCCESSES {
            return None;
        }
        self.successes = 0;
        let from = self.current;
        self.current = (from * 2).min(self.max);
        Some((from, self.current))
    }
}

/// The circuit breaker: `threshold` failed requests in a row (5xx, 408,
/// timeouts, connection errors) open it, and the account pauses. After the
/// pause it is half-open: one more failure opens it again (the pause grows),
/// an answer that proves Mews works closes it.
#[derive(Debug, Clone)]
pub struct Breaker {
    threshold: u32,
    failures: u32,
}

impl Breaker {
    pub fn new(threshold: u32) -> Breaker {
        Breaker {
            threshold: threshold.max(1),
            failures: 0,
        }
    }

    /// Failed requests in a row so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Feeds one reply; `true` when the breaker opens (pause the account).
    pub fn observe(&mut self, outcome: &Outcome) -> bool {
        match outcome {
            Outcome::Transient { .. } | Outcome::Unreachable { .. } => {
                self.failures += 1;
                if self.failures >= self.threshold {
                    // Half-open after the pause: the next failure trips again.
                    self.failures = self.threshold - 1;
                    return true;
                }
                false
            }
            // Mews answered properly: it works.
            Outcome::Accepted { .. } | Outcome::Rejected { .. } | Outcome::TooLarge { .. } => {
                self.failures = 0;
                false
            }
            // Handled by their own pauses; they say nothing about Mews's health.
            Outcome::Throttled { .. }
            | Outcome::Unauthorized { .. }
            | Outcome::NotFound { .. }
            | Outcome::Redirected { .. } => false,
        }
    }
}

/// A rejection judged systemic: pause the account, release every row.
#[derive(Debug, Clone, PartialEq)]
pub struct Systemic {
    /// The shared error, without RequestId.
    pub error: String,
    /// Rows rejected alike (held, not recorded): back to `pending`.
    pub rows: Vec<i64>,
}

/// What the worker does with one reply, as far as the watch is concerned.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Judgement {
    /// Record the decision's row outcomes now; `false` while they are held
    /// until the sample is judged.
    pub record: bool,
    /// Held outcomes to record now (the sample turned out not systemic).
    pub flush: Vec<(i64, RowOutcome)>,
    pub systemic: Option<Systemic>,
    /// Rows not sent yet to send next, one per request, before the rest of
    /// the batch (then sent as one request): the sample that tells a
    /// systemic rejection from a bad message. Empty: the order stands.
    pub sample: Vec<i64>,
}

#[derive(Debug, Clone, Default)]
enum Watch {
    /// Nothing accepted and no single rejected yet.
    #[default]
    Waiting,
    /// The first single was rejected with `error`; `probes` are singles
    /// from across the batch still to be judged.
    Sampling {
        error: String,
        held: Vec<(i64, RowOutcome)>,
        probes: HashSet<i64>,
    },
    /// Decided for this batch: every rejected single is its own fault.
    Done,
}

/// Watches one claimed batch for a systemic rejection: a 400/403 that every
/// message gets (a daemon bug, a proxy answering for Mews, a revoked
/// permission), as opposed to a few bad messages.
///
/// Rule: when the bisection reaches a single rejected message before any
/// request of the batch was accepted, [`SYSTEMIC_SAMPLE`]` - 1` single
/// messages evenly spread over the rest of the batch are sent next. If all
/// of them are rejected with the same status and Mews message (RequestId
/// aside), the rejection is systemic: nothing is dead-lettered and the
/// account pauses. If a sampled message is accepted or rejected for another
/// reason, the held rows are dead-lettered; if its answer proves nothing (a
/// 429, a 5xx, a timeout), they go back to `pending` untouched. Either way
/// the rest goes on as one batch. A batch too small to sample is judged
/// message by message.
#[derive(Debug, Clone, Default)]
pub struct RejectionWatch {
    state: Watch,
}

impl RejectionWatch {
    /// Feeds the reply to `batch`; `unsent` are the batch's rows not sent
    /// yet, in the order they would go. The judgement may ask for a sample of
    /// them to go first.
    pub fn observe(
        &mut self,
        batch: &[ClaimedRow],
        outcome: &Outcome,
        outcomes: &[(i64, RowOutcome)],
        unsent: impl Iterator<Item = i64>,
    ) -> Judgement {
        let record_now = Judgement {
            record: true,
            ..Judgement::default()
        };
        let single_rejection = match (batch, outcome) {
            ([row], Outcome::Rejected { error }) => Some((row.id, without_request_id(error))),
            _ => None,
        };
        match &mut self.state {
            Watch::Done => record_now,
            Watch::Waiting => {
                if matches!(outcome, Outcome::Accepted { .. }) {
                    self.state = Watch::Done;
                    return record_now;
                }
                let Some((_, error)) = single_rejection else {
                    return record_now;
                };
                let rest: Vec<i64> = unsent.collect();
                let wanted = SYSTEMIC_SAMPLE - 1;
                if rest.len() < wanted {
                    self.state = Watch::Done;
                    return record_now;
                }
                // Evenly spread: for two probes, the middle and the last row.
                let sample: Vec<i64> = (1..=wanted)
                    .map(|j| rest[j * rest.len() / wanted - 1])
                    .collect();
                self.state = Watch::Sampling {
                    error,
                    held: outcomes.to_vec(),
                    probes: sample.iter().copied().collect(),
                };
                Judgement {
                    sample,
                    ..Judgement::default()
                }
            }
            Watch::Sampling {
                error,
                held,
                probes,
            } => {
                let probe = match batch {
                    [row] if probes.contains(&row.id) => row.id,
                    _ => return record_now,
                };
                match single_rejection {
                    Some((_, e)) if e == *error => {
                        held.extend_from_slice(outcomes);
                        probes.remove(&probe);
                        if !probes.is_empty() {
                            return Judgement::default();
                        }
                        let systemic = Systemic {
                            error: std::mem::take(error),
                            rows: held.iter().map(|(id, _)| *id).collect(),
                        };
                        self.state = Watch::Done;
                        Judgement {
                            systemic: Some(systemic),
                            ..Judgement::default()
                        }
                    }
                    // Accepted, or rejected for another reason: the rows
                    // are at fault one by one; the held ones are dead.
                    Some(_) => self.conclude(|error| RowOutcome::Dead { error }),
                    None if matches!(outcome, Outcome::Accepted { .. }) => {
                        self.conclude(|error| RowOutcome::Dead { error })
                    }
                    // A 429, a 5xx, a timeout...: the sample proves nothing;
                    // the held rows go back untouched to be tried again.
                    None => self.conclude(|_| RowOutcome::Release),
                }
            }
        }
    }

    /// Ends the sampling: the held rows get `held` (their recorded error
    /// passed in) and every later reply is recorded as it comes.
    fn conclude(&mut self, held: impl Fn(String) -> RowOutcome) -> Judgement {
        let flush = match std::mem::take(&mut self.state) {
            Watch::Sampling { held: rows, .. } => rows
                .into_iter()
                .map(|(id, outcome)| match outcome {
                    RowOutcome::Dead { error } => (id, held(error)),
                    other => (id, other),
                })
                .collect(),
            _ => Vec::new(),
        };
        self.state = Watch::Done;
        Judgement {
            record: true,
            flush,
            ..Judgement::default()
        }
    }

    /// Rows held (claimed, not recorded) while the sample is judged.
    pub fn held(&self) -> Vec<i64> {
        match &self.state {
            Watch::Sampling { held, .. } => held.iter().map(|(id, _)| *id).collect(),
            _ => Vec::new(),
        }
    }

    /// The batch ended (or stops) before the sample was judged: the held
    /// outcomes stand.
    pub fn finish(self) -> Vec<(i64, RowOutcome)> {
        match self.state {
            Watch::Sampling { held, .. } => held,
            _ => Vec::new(),
        }
    }
}

/// Starts the `last_error` of a row held by a [`RejectionStreak`]: it waits
/// `pending`, neither dead nor delivered, until the account is judged.
pub const HELD_PREFIX: &str = "held pending a systemic-rejection verdict";

/// Rejected single messages of one account across batches and time (the
/// account's memory, where [`RejectionWatch`] sees one batch only).
///
/// Rule: a single message rejected (400/403) while no accepted request
/// proves the account works is **held**, not dead: it goes back to
/// `pending` (last error starting with [`HELD_PREFIX`]). When
/// [`SYSTEMIC_SAMPLE`] different messages in a row are rejected with the
/// same status and Mews message (RequestId aside), with no request accepted
/// in between, however many batches and however much time that takes, the
/// rejection is systemic: the account pauses and the held rows are released
/// (they were not at fault). While systemic, one single message probes after
/// each pause; rejected alike, the account pauses again (longer). The next
/// accepted request ends it all: rows still held were rejected while the
/// account worked, so their rejection was theirs and they are dead. A
/// rejection for another reason also proves the messages are judged one by
/// one: the rows held so far are dead, the new one starts a new streak.
/// Other replies (429, 5xx, timeouts, 401) prove nothing and change nothing.
#[derive(Debug, Clone, Default)]
pub struct RejectionStreak {
    state: Streak,
}

#[derive(Debug, Clone, Default)]
enum Streak {
    /// No rejection since the last accepted request.
    #[default]
    Clear,
    /// Rows rejected alike with `error` (without RequestId), by id, with
    /// Mews's whole error each.
    Open {
        error: String,
        held: BTreeMap<i64, String>,
    },
    /// Judged systemic with `error`; the account probes with one message.
    Systemic { error: String },
}

/// What to do with a rejected single message, as far as the streak goes.
#[derive(Debug, Clone, PartialEq)]
pub enum StreakVerdict {
    /// Hold the row (pending, [`HELD_PREFIX`]). `dead`: rows held before
    /// whose rejection turned out to be their own (row id, Mews's error).
    Hold { dead: Vec<(i64, String)> },
    /// Systemic: release the row, pause the account. `rows`: every row of
    /// the streak, this one included (the earlier ones wait `pending`).
    Systemic { error: String, rows: Vec<i64> },
}

impl RejectionStreak {
    /// Feeds a single message `id` that Mews rejected with `error`.
    pub fn rejected(&mut self, id: i64, error: &str) -> StreakVerdict {
        let alike = without_request_id(error);
        let hold = |dead| StreakVerdict::Hold { dead };
        match &mut self.state {
            Streak::Systemic { error: e } if *e == alike => StreakVerdict::Systemic {
                error: alike,
                rows: vec![id],
            },
            Streak::Open { error: e, held } if *e == alike => {
                held.insert(id, error.to_owned());
                if held.len() < SYSTEMIC_SAMPLE {
                    return hold(Vec::new());
                }
                let rows = held.keys().copied().collect();
                self.state = Streak::Systemic {
                    error: alike.clone(),
                };
                StreakVerdict::Systemic { error: alike, rows }
            }
            _ => {
                let dead = match std::mem::take(&mut self.state) {
                    Streak::Open { held, .. } => held.into_iter().collect(),
                    _ => Vec::new(),
                };
                self.state = Streak::Open {
                    error: alike,
                    held: BTreeMap::from([(id, error.to_owned())]),
                };
                hold(dead)
            }
        }
    }

    /// A request was accepted: the account works. Returns the rows still
    /// held, now dead with their own error; `except` (the request's own
    /// rows) are not among them.
    pub fn accepted(&mut self, except: &[i64]) -> Vec<(i64, String)> {
        match std::mem::take(&mut self.state) {
            Streak::Open { held, .. } => held
                .into_iter()
                .filter(|(id, _)| !except.contains(id))
                .collect(),
            _ => Vec::new(),
        }
    }

    /// [`RejectionWatch`] judged a batch systemic with `error`.
    pub fn systemic(&mut self, error: String) {
        self.state = Streak::Systemic { error };
    }

    /// Judged systemic: the next request is one single message (a probe),
    /// not a batch that would be bisected again.
    pub fn probing(&self) -> bool {
        matches!(self.state, Streak::Systemic { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::time::Duration;

    use crate::store::test_rows as rows;

    fn rejected(request_id: &str) -> Outcome {
        Outcome::Rejected {
            error: format!("HTTP 403: Forbidden thread (RequestId {request_id})"),
        }
    }

    fn dead(id: i64) -> Vec<(i64, RowOutcome)> {
        vec![(
            id,
            RowOutcome::Dead {
                error: "HTTP 403".into(),
            },
        )]
    }

    fn accepted() -> Outcome {
        Outcome::Accepted {
            by_identifier: HashMap::new(),
            unlabelled: 0,
        }
    }

    fn transient() -> Outcome {
        Outcome::Transient {
            error: "HTTP 503".into(),
            retry_after: None,
            maybe_stored: true,
            smaller: false,
            settle: None,
        }
    }

    /// The ids of rows not sent yet.
    fn unsent(ids: std::ops::RangeInclusive<i64>) -> impl Iterator<Item = i64> {
        ids
    }

    #[test]
    fn the_batch_limit_halves_down_to_one_and_grows_back_after_sustained_success() {
        let mut limit = BatchLimit::new(1000);
        assert_eq!(limit.success(), None, "already at the maximum");
        assert_eq!(limit.shrink(), Some((1000, 500)));
        assert_eq!(limit.shrink(), Some((500, 250)));
        for _ in 1..GROW_AFTER_SUCCESSES {
            assert_eq!(limit.success(), None);
        }
        assert_eq!(limit.success(), Some((250, 500)));
        assert_eq!(
            limit.shrink(),
            Some((500, 250)),
            "a shrink restarts the count"
        );
        for _ in 0..20 {
            limit.shrink();
        }
        assert_eq!(limit.current(), 1);
        assert_eq!(limit.shrink(), None, "never below 1");
        let mut grown = Vec::new();
        for _ in 0..GROW_AFTER_SUCCESSES * 12 {
            grown.extend(limit.success());
        }
        assert_eq!(grown.last(), Some(&(512, 1000)), "capped at the maximum");
        assert_eq!(limit.current(), 1000);
    }

    #[test]
    fn the_breaker_opens_after_consecutive_failures_and_reopens_on_the_next_one() {
        let mut breaker = Breaker::new(3);
        let unreachable = Outcome::Unreachable {
            error: "cannot connect".into(),
        };
        assert!(!breaker.observe(&transient()));
        assert!(!breaker.observe(&unreachable));
        assert!(breaker.observe(&transient()), "third failure in a row");
        assert!(
            breaker.observe(&transient()),
            "half-open: one failure reopens"
        );
        assert!(!breaker.observe(&accepted()));
        assert_eq!(breaker.failures(), 0);
        assert!(!breaker.observe(&transient()));
        assert!(
            !breaker.observe(&rejected("r")),
            "a 403 proves Mews answers"
        );
        assert!(!breaker.observe(&transient()));
        let throttled = Outcome::Throttled {
            error: "HTTP 429".into(),
            retry_after: Some(Duration::from_secs(1)),
        };
        assert!(!breaker.observe(&throttled));
        assert_eq!(breaker.failures(), 1, "a 429 neither counts nor resets");
    }

    #[test]
    fn the_same_rejection_for_the_first_single_and_a_spread_sample_is_systemic() {
        let mut watch = RejectionWatch::default();
        // Bisection reached row 1 alone; rows 2 to 8 are untried.
        let j = watch.observe(&rows(1..=1), &rejected("a"), &dead(1), unsent(2..=8));
        assert_eq!(
            j,
            Judgement {
                sample: vec![4, 8],
                ..Judgement::default()
            },
            "row 1 is held, not dead yet; rows 4 and 8 go next"
        );
        assert_eq!(watch.held(), [1]);

        let j = watch.observe(
            &rows(4..=4),
            &rejected("b"),
            &dead(4),
            [8, 2, 3].into_iter(),
        );
        assert_eq!(j, Judgement::default());
        let j = watch.observe(&rows(8..=8), &rejected("c"), &dead(8), [2, 3].into_iter());
        assert_eq!(
            j.systemic,
            Some(Systemic {
                error: "HTTP 403: Forbidden thread".into(),
                rows: vec![1, 4, 8]
            })
        );
        assert!(!j.record && j.flush.is_empty() && j.sample.is_empty());
    }

    #[test]
    fn a_sample_that_is_accepted_or_rejected_differently_dead_letters_only_the_held_rows() {
        for probe_outcome in [
            accepted(),
            Outcome::Rejected {
                error: "HTTP 400: Invalid Text (RequestId x)".into(),
            },
        ] {
            let mut watch = RejectionWatch::default();
            let j = watch.observe(&rows(1..=1), &rejected("a"), &dead(1), unsent(2..=4));
            assert_eq!(j.sample, [2, 4]);
            let j = watch.observe(&rows(2..=2), &probe_outcome, &[], [4, 3].into_iter());
            assert!(j.record && j.systemic.is_none(), "{probe_outcome:?}");
            assert_eq!(j.flush, dead(1));
            let j = watch.observe(&rows(4..=4), &rejected("b"), &dead(4), unsent(3..=3));
            assert!(
                j.record && j.flush.is_empty() && j.sample.is_empty(),
                "decided for this batch"
            );
        }
    }

    #[test]
    fn a_sample_that_proves_nothing_releases_the_held_rows() {
        let throttled = Outcome::Throttled {
            error: "HTTP 429".into(),
            retry_after: None,
        };
        for probe_outcome in [transient(), throttled] {
            let mut watch = RejectionWatch::default();
            watch.observe(&rows(1..=1), &rejected("a"), &dead(1), unsent(2..=4));
            let j = watch.observe(&rows(2..=2), &probe_outcome, &[], [4, 3].into_iter());
            assert!(j.record && j.systemic.is_none(), "{probe_outcome:?}");
            assert_eq!(j.flush, [(1, RowOutcome::Release)]);
        }
    }

    #[test]
    fn after_an_accepted_request_every_single_is_judged_alone() {
        let mut watch = RejectionWatch::default();
        assert!(
            watch
                .observe(&rows(5..=6), &accepted(), &[], unsent(1..=4))
                .record
        );
        let j = watch.observe(&rows(1..=1), &rejected("a"), &dead(1), unsent(3..=4));
        assert!(j.record);
        assert!(j.sample.is_empty(), "no sample taken");
    }

    #[test]
    fn a_batch_too_small_to_sample_is_judged_message_by_message() {
        let mut watch = RejectionWatch::default();
        let j = watch.observe(&rows(1..=1), &rejected("a"), &dead(1), unsent(2..=2));
        assert!(j.record && j.systemic.is_none());
        assert!(j.sample.is_empty());
        assert!(watch.finish().is_empty());
    }

    #[test]
    fn held_rows_stand_when_the_batch_stops_before_the_sample_is_judged() {
        let mut watch = RejectionWatch::default();
        watch.observe(&rows(1..=1), &rejected("a"), &dead(1), unsent(2..=3));
        assert_eq!(watch.finish(), dead(1));
    }

    const FORBIDDEN: &str = "HTTP 403: Forbidden thread";

    fn forbidden(request_id: &str) -> String {
        format!("{FORBIDDEN} (RequestId {request_id})")
    }

    #[test]
    fn three_messages_rejected_alike_in_a_row_across_requests_are_systemic() {
        let mut streak = RejectionStreak::default();
        let hold = StreakVerdict::Hold { dead: Vec::new() };
        assert_eq!(streak.rejected(1, &forbidden("a")), hold);
        assert_eq!(
            streak.rejected(1, &forbidden("b")),
            hold,
            "the same row again is no new evidence"
        );
        assert_eq!(streak.rejected(2, &forbidden("c")), hold);
        assert!(!streak.probing());
        assert_eq!(
            streak.rejected(3, &forbidden("d")),
            StreakVerdict::Systemic {
                error: FORBIDDEN.into(),
                rows: vec![1, 2, 3]
            }
        );
        assert!(streak.probing(), "after the pause one message probes");
        assert_eq!(
            streak.rejected(4, &forbidden("e")),
            StreakVerdict::Systemic {
                error: FORBIDDEN.into(),
                rows: vec![4]
            },
            "a probe rejected alike pauses again"
        );
        assert_eq!(
            streak.accepted(&[5]),
            [],
            "released rows are not dead when it works again"
        );
        assert!(!streak.probing());
    }

    #[test]
    fn an_accepted_request_makes_the_held_rejections_dead_with_mews_reason() {
        let mut streak = RejectionStreak::default();
        streak.rejected(1, &forbidden("a"));
        streak.rejected(2, &forbidden("b"));
        assert_eq!(
            streak.accepted(&[2]),
            [(1, forbidden("a"))],
            "row 2 was in the accepted request itself"
        );
        assert_eq!(
            streak.rejected(3, &forbidden("c")),
            StreakVerdict::Hold { dead: Vec::new() },
            "the streak starts again"
        );
        streak.rejected(4, &forbidden("d"));
        assert_eq!(
            streak.accepted(&[]),
            [(3, forbidden("c")), (4, forbidden("d"))]
        );
    }

    #[test]
    fn a_rejection_for_another_reason_makes_the_held_ones_dead_and_starts_a_new_streak() {
        let mut streak = RejectionStreak::default();
        streak.rejected(1, &forbidden("a"));
        streak.rejected(2, &forbidden("b"));
        let invalid = "HTTP 400: Invalid Text (RequestId x)";
        assert_eq!(
            streak.rejected(3, invalid),
            StreakVerdict::Hold {
                dead: vec![(1, forbidden("a")), (2, forbidden("b"))]
            }
        );
        assert_eq!(streak.accepted(&[]), [(3, invalid.to_owned())]);
    }

    #[test]
    fn a_batch_judged_systemic_makes_the_next_request_a_single_probe() {
        let mut streak = RejectionStreak::default();
        streak.systemic(FORBIDDEN.into());
        assert!(streak.probing());
        assert!(matches!(
            streak.rejected(9, &forbidden("z")),
            StreakVerdict::Systemic { .. }
        ));
        let other = streak.rejected(10, "HTTP 400: Invalid Text (RequestId y)");
        assert_eq!(other, StreakVerdict::Hold { dead: Vec::new() });
        assert!(
            !streak.probing(),
            "another error: judged message by message"
        );
    }
}
