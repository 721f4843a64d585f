//! What one reply to `messages/add` means for each row and for the account
//! ([`decide`]), and how long an account pauses ([`pause_length`]): pure
//! functions of the reply, the rows and the retry settings, tested without
//! I/O or sleeping.

use std::time::{Duration, SystemTime};

use crate::config::RetrySettings;
use crate::mews::{AddedMessage, MessageThread, Outcome};
use crate::retry::{exponential, retry_delay, throttle_pause};
use crate::store::{ClaimedRow, ClaimedThread, RowOutcome, ThreadOutcome};

/// Why an account stops sending for a while.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PauseKind {
    /// 429: wait for Retry-After or an exponential pause.
    Throttled,
    /// 401/404: configuration is wrong; retry slowly, exponentially.
    Refused,
    /// Mews named a time (Retry-After on a 408/5xx): a floor for the account.
    RetryAfter,
    /// The circuit breaker opened: repeated 5xx/timeouts/connection errors.
    Breaker,
    /// Every sampled message was rejected alike (see [`crate::adapt::RejectionWatch`]).
    Systemic,
    /// A 3xx: base_url does not lead to Mews; retry slowly, exponentially.
    Redirected,
}

impl PauseKind {
    /// Starts the pause reason shown by `status`.
    pub fn label(self) -> &'static str {
        match self {
            PauseKind::Throttled => "rate-limited by Mews (429)",
            PauseKind::Refused => "refused by Mews",
            PauseKind::RetryAfter => "Mews asked to retry later",
            PauseKind::Breaker => "circuit breaker open",
            PauseKind::Systemic => "systemic rejection",
            PauseKind::Redirected => "redirected away from mews.base_url",
        }
    }
}

/// What a reply means for the account as a whole.
#[derive(Debug, Clone, PartialEq)]
pub enum AccountAction {
    Continue,
    /// Stop sending; `at_least` is Mews's Retry-After when it gave one.
    Pause {
        kind: PauseKind,
        reason: String,
        at_least: Option<Duration>,
    },
}

/// What one reply to a batch means.
#[derive(Debug, Clone)]
pub struct Decision {
    /// Outcomes to store now.
    pub rows: Vec<(i64, RowOutcome)>,
    /// Rows to send again right away in smaller requests (a 400/403/413 on
    /// a batch: isolate the offending message).
    pub split: Vec<Vec<ClaimedRow>>,
    pub account: AccountAction,
    /// A smaller batch is likely to fare better (408, 413, a timeout).
    pub shrink: bool,
}

/// `rows` were not sent, for `error`: each waits its backoff (as after an
/// unreachable Mews), and it is not an attempt. `jitter` is in `[0, 1)`.
pub fn not_sent(
    rows: &[ClaimedRow],
    error: &str,
    retry: &RetrySettings,
    now: SystemTime,
    jitter: f64,
) -> Vec<(i64, RowOutcome)> {
    rows.iter()
        .map(|row| {
            let attempt = row.attempts.saturating_add(1);
            let delay = retry_delay(attempt, retry.base_delay, retry.max_delay, jitter, None);
            (
                row.id,
                RowOutcome::Retry {
                    at: now + delay,
                    error: error.to_owned(),
                    attempt: false,
                    maybe_stored: false,
                },
            )
        })
        .collect()
}

/// Decides what to store for `rows` after `outcome`. `jitter` is in `[0, 1)`.
pub fn decide(
    rows: &[ClaimedRow],
    outcome: &Outcome,
    retry: &RetrySettings,
    now: SystemTime,
    jitter: f64,
) -> Decision {
    let mut decision = Decision {
        rows: Vec::with_capacity(rows.len()),
        split: Vec::new(),
        account: AccountAction::Continue,
        shrink: false,
    };
    let delay = |row: &ClaimedRow, floor: Option<Duration>| {
        let attempt = row.attempts.saturating_add(1);
        retry_delay(attempt, retry.base_delay, retry.max_delay, jitter, floor)
    };
    let retry_or_dead =
        |row: &ClaimedRow, error: &str, floor: Option<Duration>, maybe_stored: bool| {
            let attempt = row.attempts.saturating_add(1);
            if attempt >= retry.max_attempts {
                RowOutcome::Dead {
                    error: format!("{error} (gave up after {attempt} attempts)"),
                }
            } else {
                RowOutcome::Retry {
                    at: now + delay(row, floor),
                    error: error.to_owned(),
                    attempt: true,
                    maybe_stored,
                }
            }
        };
    let release_all = |decision: &mut Decision| {
        decision
            .rows
            .extend(rows.iter().map(|r| (r.id, RowOutcome::Release)))
    };

    match outcome {
        Outcome::Accepted { by_identifier, .. } => {
            for row in rows {
                let outcome = match by_identifier.get(&row.id.to_string()) {
                    Some(message) => delivered(message),
                    None => retry_or_dead(
                        row,
                        "Mews answered 200 without this message's Identifier (it may have been stored)",
                        None,
                        true,
                    ),
                };
                decision.rows.push((row.id, outcome));
            }
        }
        Outcome::Rejected { error } | Outcome::TooLarge { error } => {
            decision.shrink = matches!(outcome, Outcome::TooLarge { .. });
            if let [row] = rows {
                decision.rows.push((
                    row.id,
                    RowOutcome::Dead {
                        error: error.clone(),
                    },
                ));
            } else {
                let (left, right) = rows.split_at(rows.len() / 2);
                decision.split = vec![left.to_vec(), right.to_vec()];
            }
        }
        Outcome::Unauthorized { error } | Outcome::NotFound { error } => {
            release_all(&mut decision);
            decision.account = AccountAction::Pause {
                kind: PauseKind::Refused,
                reason: error.clone(),
                at_least: None,
            };
        }
        Outcome::Redirected { error } => {
            // Nothing reached Mews: no attempt, not ambiguous.
            release_all(&mut decision);
            decision.account = AccountAction::Pause {
                kind: PauseKind::Redirected,
                reason: error.clone(),
                at_least: None,
            };
        }
        Outcome::Throttled { error, retry_after } => {
            release_all(&mut decision);
            decision.account = AccountAction::Pause {
                kind: PauseKind::Throttled,
                reason: error.clone(),
                at_least: *retry_after,
            };
        }
        Outcome::Unreachable { error } => {
            // Mews never saw the request: wait, but it is not an attempt.
            decision.rows = not_sent(rows, error, retry, now, jitter);
        }
        Outcome::Transient {
            error,
            retry_after,
            maybe_stored,
            smaller,
            settle,
        } => {
            decision.shrink = *smaller;
            // A request Mews may still be working on is neither read back
            // nor sent again before it has had time to finish.
            let floor = match (retry_after, settle) {
                (Some(a), Some(b)) => Some((*a).max(*b)),
                (a, b) => a.or(*b),
            };
            for row in rows {
                decision
                    .rows
                    .push((row.id, retry_or_dead(row, error, floor, *maybe_stored)));
            }
            if let Some(after) = retry_after {
                decision.account = AccountAction::Pause {
                    kind: PauseKind::RetryAfter,
                    reason: error.clone(),
                    at_least: Some(*after),
                };
            }
        }
    }
    decision
}

/// What one reply to `messageThreads/add` means for the thread and the
/// account.
#[derive(Debug, Clone, PartialEq)]
pub struct ThreadDecision {
    pub thread: ThreadOutcome,
    pub account: AccountAction,
}

/// Decides what to store for `thread` after a `messageThreads/add` came to
/// `outcome`, with the rules of [`decide`] for a single message: 200 →
/// created; 400/403/413 → dead with Mews's error (its messages are held);
/// 401/404/3xx/429 → released, the account pauses, no attempt; unreachable
/// → retried, no attempt; 408/5xx/timeouts → retried as an attempt that
/// may have created it (read back first), after Mews had time to finish;
/// dead after `max_attempts`. `jitter` is in `[0, 1)`.
pub fn decide_thread(
    thread: &ClaimedThread,
    outcome: &Result<MessageThread, Outcome>,
    retry: &RetrySettings,
    now: SystemTime,
    jitter: f64,
) -> ThreadDecision {
    let attempt = thread.attempts.saturating_add(1);
    let delay = |floor: Option<Duration>| {
        retry_delay(attempt, retry.base_delay, retry.max_delay, jitter, floor)
    };
    let pause = |kind: PauseKind, error: &str, at_least: Option<Duration>| ThreadDecision {
        thread: ThreadOutcome::Release,
        account: AccountAction::Pause {
            kind,
            reason: error.to_owned(),
            at_least,
        },
    };
    let alone = |thread: ThreadOutcome| ThreadDecision {
        thread,
        account: AccountAction::Continue,
    };
    let failure = match outcome {
        Ok(created) => {
            return alone(ThreadOutcome::Created {
                mews_thread_id: created.id.clone(),
                mews_created_utc: created.created_utc.clone(),
            });
        }
        Err(failure) => failure,
    };
    match failure {
        Outcome::Rejected { error } | Outcome::TooLarge { error } => alone(ThreadOutcome::Dead {
            error: error.clone(),
        }),
        Outcome::Unauthorized { error } | Outcome::NotFound { error } => {
            pause(PauseKind::Refused, error, None)
        }
        Outcome::Redirected { error } => pause(PauseKind::Redirected, error, None),
        Outcome::Throttled { error, retry_after } => {
            pause(PauseKind::Throttled, error, *retry_after)
        }
        Outcome::Unreachable { error } => alone(ThreadOutcome::Retry {
            at: now + delay(None),
            error: error.clone(),
            attempt: false,
            maybe_stored: false,
        }),
        Outcome::Transient {
            error,
            retry_after,
            maybe_stored,
            settle,
            ..
        } => {
            let floor = match (retry_after, settle) {
                (Some(a), Some(b)) => Some((*a).max(*b)),
                (a, b) => a.or(*b),
            };
            let thread = if attempt >= retry.max_attempts {
                ThreadOutcome::Dead {
                    error: format!("{error} (gave up after {attempt} attempts)"),
                }
            } else {
                ThreadOutcome::Retry {
                    at: now + delay(floor),
                    error: error.clone(),
                    attempt: true,
                    maybe_stored: *maybe_stored,
                }
            };
            let account = match retry_after {
                Some(after) => AccountAction::Pause {
                    kind: PauseKind::RetryAfter,
                    reason: error.clone(),
                    at_least: Some(*after),
                },
                None => AccountAction::Continue,
            };
            ThreadDecision { thread, account }
        }
        // Never made by the client for a thread; as a 200 without an Id.
        Outcome::Accepted { .. } => alone(ThreadOutcome::Retry {
            at: now + delay(None),
            error: "Mews answered 200 without a thread Id (it may have created it)".to_owned(),
            attempt: true,
            maybe_stored: true,
        }),
    }
}

/// A row Mews has, as this message.
pub(super) fn delivered(message: &AddedMessage) -> RowOutcome {
    RowOutcome::Delivered {
        mews_message_id: message.id.clone(),
        mews_created_utc: message.created_utc.clone(),
        mews_sender: message.sender.kind().to_owned(),
    }
}

/// How long an account pauses, given how many pauses came in a row.
pub fn pause_length(
    kind: PauseKind,
    at_least: Option<Duration>,
    streak: u32,
    retry: &RetrySettings,
) -> Duration {
    let grown = exponential(streak, retry.pause_base, retry.pause_max);
    match (kind, at_least) {
        (PauseKind::RetryAfter, Some(after)) => after,
        // A 429 always pauses: `Retry-After: 0` or a past date is no licence
        // to hammer (see `throttle_pause`).
        (PauseKind::Throttled, at_least) => throttle_pause(
            at_least,
            streak,
            retry.base_delay,
            retry.pause_base,
            retry.pause_max,
        ),
        (_, Some(after)) => grown.max(after),
        (_, None) => grown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mews::{AddedMessage, Sender};
    use std::collections::HashMap;

    fn retry() -> RetrySettings {
        RetrySettings {
            base_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(60),
            max_attempts: 3,
            pause_base: Duration::from_secs(30),
            pause_max: Duration::from_secs(900),
            breaker_failures: 5,
        }
    }

    fn rows(n: i64) -> Vec<ClaimedRow> {
        crate::store::test_rows(1..=n)
    }

    fn now() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    fn thread(attempts: u32) -> ClaimedThread {
        ClaimedThread {
            id: 9,
            thread_key: "k".into(),
            subject: "S".into(),
            original_sender: "O".into(),
            attempts,
            needs_reconcile: false,
            first_sent_at: Some(now()),
        }
    }

    fn thread_after(outcome: Outcome, attempts: u32) -> ThreadDecision {
        decide_thread(&thread(attempts), &Err(outcome), &retry(), now(), 0.0)
    }

    #[test]
    fn a_thread_200_is_created_with_mews_id() {
        let created = MessageThread {
            id: "7f9325f6-ef44-4911-89a8-ae51010a5aa4".into(),
            original_sender: "O".into(),
            subject: "S".into(),
            created_utc: "2026-11-28T07:00:00Z".into(),
            updated_utc: None,
            is_resolved: None,
        };
        let d = decide_thread(&thread(0), &Ok(created), &retry(), now(), 0.0);
        assert_eq!(
            d.thread,
            ThreadOutcome::Created {
                mews_thread_id: "7f9325f6-ef44-4911-89a8-ae51010a5aa4".into(),
                mews_created_utc: "2026-11-28T07:00:00Z".into(),
            }
        );
        assert_eq!(d.account, AccountAction::Continue);
    }

    #[test]
    fn a_refused_thread_is_dead_with_mews_error() {
        for outcome in [
            Outcome::Rejected {
                error: "HTTP 403: nope".into(),
            },
            Outcome::TooLarge {
                error: "HTTP 403: nope".into(),
            },
        ] {
            let d = thread_after(outcome, 0);
            assert_eq!(
                d.thread,
                ThreadOutcome::Dead {
                    error: "HTTP 403: nope".into()
                }
            );
            assert_eq!(d.account, AccountAction::Continue);
        }
    }

    #[test]
    fn account_level_failures_release_the_thread_and_pause() {
        let cases = [
            (
                Outcome::Unauthorized { error: "e".into() },
                PauseKind::Refused,
                None,
            ),
            (
                Outcome::NotFound { error: "e".into() },
                PauseKind::Refused,
                None,
            ),
            (
                Outcome::Redirected { error: "e".into() },
                PauseKind::Redirected,
                None,
            ),
            (
                Outcome::Throttled {
                    error: "e".into(),
                    retry_after: Some(Duration::from_secs(7)),
                },
                PauseKind::Throttled,
                Some(Duration::from_secs(7)),
            ),
        ];
        for (outcome, kind, at_least) in cases {
            let d = thread_after(outcome, 1);
            assert_eq!(d.thread, ThreadOutcome::Release);
            assert_eq!(
                d.account,
                AccountAction::Pause {
                    kind,
                    reason: "e".into(),
                    at_least
                }
            );
        }
    }

    #[test]
    fn an_ambiguous_thread_failure_is_read_back_after_it_settled_and_dies_at_max_attempts() {
        let timeout = Outcome::Transient {
            error: "no response within 30s".into(),
            retry_after: None,
            maybe_stored: true,
            smaller: true,
            settle: Some(Duration::from_secs(30)),
        };
        let d = thread_after(timeout.clone(), 0);
        let ThreadOutcome::Retry {
            at,
            attempt: true,
            maybe_stored: true,
            ..
        } = d.thread
        else {
            panic!("{d:?}")
        };
        assert!(at >= now() + Duration::from_secs(30), "the settle delay");
        assert!(matches!(
            thread_after(timeout, 2).thread,
            ThreadOutcome::Dead { error } if error.ends_with("(gave up after 3 attempts)")
        ));
        let unreachable = thread_after(Outcome::Unreachable { error: "e".into() }, 2);
        assert!(
            matches!(
                unreachable.thread,
                ThreadOutcome::Retry {
                    attempt: false,
                    maybe_stored: false,
                    ..
                }
            ),
            "Mews never saw it: not an attempt, never dead for it"
        );
        let busy = thread_after(
            Outcome::Transient {
                error: "HTTP 503".into(),
                retry_after: Some(Duration::from_secs(20)),
                maybe_stored: true,
                smaller: false,
                settle: None,
            },
            0,
        );
        assert!(matches!(
            busy.account,
            AccountAction::Pause {
                kind: PauseKind::RetryAfter,
                ..
            }
        ));
    }

    #[test]
    fn a_200_delivers_the_rows_it_names_and_retries_the_rest() {
        let rows = rows(3);
        let mut by_identifier = HashMap::new();
        for id in ["3", "1"] {
            by_identifier.insert(
                id.to_owned(),
                AddedMessage {
                    id: format!("mews-{id}"),
                    message_thread_id: None,
                    text: None,
                    sender: Sender::Plain("Application".into()),
                    created_utc: "2026-11-28T07:00:00Z".into(),
                },
            );
        }
        let d = decide(
            &rows,
            &Outcome::Accepted {
                by_identifier,
                unlabelled: 0,
            },
            &retry(),
            now(),
            0.0,
        );
        assert!(
            matches!(&d.rows[0], (1, RowOutcome::Delivered { mews_message_id, .. }) if mews_message_id == "mews-1")
        );
        assert!(
            matches!(
                &d.rows[1],
                (
                    2,
                    RowOutcome::Retry {
                        attempt: true,
                        maybe_stored: true,
                        ..
                    }
                )
            ),
            "a missing Identifier is read back before it is sent again"
        );
        assert!(
            matches!(&d.rows[2], (3, RowOutcome::Delivered { mews_message_id, .. }) if mews_message_id == "mews-3")
        );
        assert_eq!(d.account, AccountAction::Continue);
    }

    #[test]
    fn a_rejected_batch_is_split_and_a_rejected_single_is_dead() {
        let rejected = Outcome::Rejected {
            error: "HTTP 403: no (RequestId r)".into(),
        };
        let d = decide(&rows(5), &rejected, &retry(), now(), 0.5);
        assert!(d.rows.is_empty());
        assert_eq!(d.split.iter().map(Vec::len).collect::<Vec<_>>(), [2, 3]);
        let d = decide(&rows(1), &rejected, &retry(), now(), 0.5);
        assert_eq!(
            d.rows,
            [(
                1,
                RowOutcome::Dead {
                    error: "HTTP 403: no (RequestId r)".into()
                }
            )]
        );
    }

    #[test]
    fn bad_tokens_pause_the_account_without_touching_the_rows() {
        let d = decide(
            &rows(2),
            &Outcome::Unauthorized {
                error: "HTTP 401".into(),
            },
            &retry(),
            now(),
            0.5,
        );
        assert_eq!(d.rows, [(1, RowOutcome::Release), (2, RowOutcome::Release)]);
        assert!(matches!(
            d.account,
            AccountAction::Pause {
                kind: PauseKind::Refused,
                ..
            }
        ));
    }

    #[test]
    fn throttling_pauses_for_retry_after_and_costs_no_attempt() {
        let outcome = Outcome::Throttled {
            error: "HTTP 429".into(),
            retry_after: Some(Duration::from_secs(7)),
        };
        let d = decide(&rows(2), &outcome, &retry(), now(), 0.5);
        assert_eq!(d.rows, [(1, RowOutcome::Release), (2, RowOutcome::Release)]);
        let AccountAction::Pause { kind, at_least, .. } = d.account else {
            panic!()
        };
        assert_eq!(
            pause_length(kind, at_least, 1, &retry()),
            Duration::from_secs(7)
        );
        assert_eq!(
            pause_length(kind, None, 1, &retry()),
            Duration::from_secs(30)
        );
        assert_eq!(
            pause_length(kind, None, 3, &retry()),
            Duration::from_secs(120)
        );
        assert_eq!(
            pause_length(kind, Some(Duration::ZERO), 1, &retry()),
            Duration::from_secs(1),
            "Retry-After: 0 still pauses for base_delay"
        );
        assert_eq!(
            pause_length(kind, Some(Duration::ZERO), 3, &retry()),
            Duration::from_secs(4),
            "and longer while 429s repeat"
        );
    }

    #[test]
    fn transient_failures_back_off_and_end_dead_after_max_attempts() {
        let outcome = Outcome::Transient {
            error: "HTTP 500".into(),
            retry_after: Some(Duration::from_secs(20)),
            maybe_stored: true,
            smaller: false,
            settle: None,
        };
        let mut rows = rows(2);
        rows[1].attempts = 2;
        let d = decide(&rows, &outcome, &retry(), now(), 0.0);
        assert_eq!(
            d.rows[0],
            (
                1,
                RowOutcome::Retry {
                    at: now() + Duration::from_secs(20),
                    error: "HTTP 500".into(),
                    attempt: true,
                    maybe_stored: true,
                }
            )
        );
        assert_eq!(
            d.rows[1],
            (
                2,
                RowOutcome::Dead {
                    error: "HTTP 500 (gave up after 3 attempts)".into()
                }
            )
        );
        assert!(matches!(
            d.account,
            AccountAction::Pause {
                kind: PauseKind::RetryAfter,
                ..
            }
        ));
    }

    #[test]
    fn a_failure_to_connect_waits_but_costs_no_attempt() {
        let d = decide(
            &rows(2),
            &Outcome::Unreachable {
                error: "cannot connect to Mews".into(),
            },
            &retry(),
            now(),
            0.0,
        );
        for (_, outcome) in &d.rows {
            assert!(
                matches!(outcome, RowOutcome::Retry { at, attempt: false, maybe_stored: false, .. } if *at > now()),
                "{outcome:?}"
            );
        }
        assert_eq!(d.account, AccountAction::Continue);
        assert!(!d.shrink);
    }

    #[test]
    fn a_timeout_shrinks_the_batch_and_waits_for_mews_to_finish_before_reading_back() {
        let outcome = Outcome::Transient {
            error: "no response within 30s".into(),
            retry_after: None,
            maybe_stored: true,
            smaller: true,
            settle: Some(Duration::from_secs(30)),
        };
        let d = decide(&rows(2), &outcome, &retry(), now(), 0.0);
        assert!(d.shrink);
        for (_, outcome) in &d.rows {
            let RowOutcome::Retry {
                at,
                attempt,
                maybe_stored,
                ..
            } = outcome
            else {
                panic!("{outcome:?}")
            };
            assert!(*attempt && *maybe_stored);
            assert!(
                *at >= now() + Duration::from_secs(30),
                "not before the request settled"
            );
        }
        assert_eq!(
            d.account,
            AccountAction::Continue,
            "no Retry-After, no pause"
        );
    }

    #[test]
    fn a_408_and_a_413_shrink_the_batch() {
        let timeout_408 = Outcome::Transient {
            error: "HTTP 408".into(),
            retry_after: None,
            maybe_stored: true,
            smaller: true,
            settle: None,
        };
        assert!(decide(&rows(4), &timeout_408, &retry(), now(), 0.5).shrink);
        let too_large = Outcome::TooLarge {
            error: "HTTP 413".into(),
        };
        let d = decide(&rows(4), &too_large, &retry(), now(), 0.5);
        assert!(d.shrink);
        assert_eq!(d.split.iter().map(Vec::len).collect::<Vec<_>>(), [2, 2]);
        let d = decide(&rows(1), &too_large, &retry(), now(), 0.5);
        assert!(matches!(d.rows[..], [(1, RowOutcome::Dead { .. })]));
    }

    #[test]
    fn a_redirect_pauses_the_account_and_touches_no_row() {
        let d = decide(
            &rows(3),
            &Outcome::Redirected {
                error: "HTTP 307 redirect".into(),
            },
            &retry(),
            now(),
            0.5,
        );
        assert_eq!(d.rows.len(), 3);
        assert!(d.rows.iter().all(|(_, o)| *o == RowOutcome::Release));
        assert!(matches!(
            d.account,
            AccountAction::Pause {
                kind: PauseKind::Redirected,
                at_least: None,
                ..
            }
        ));
    }

    #[test]
    fn a_404_pauses_like_a_401_and_touches_no_row() {
        let d = decide(
            &rows(3),
            &Outcome::NotFound {
                error: "HTTP 404".into(),
            },
            &retry(),
            now(),
            0.5,
        );
        assert!(d.rows.iter().all(|(_, o)| *o == RowOutcome::Release));
        assert!(matches!(
            d.account,
            AccountAction::Pause {
                kind: PauseKind::Refused,
                at_least: None,
                ..
            }
        ));
    }

    #[test]
    fn account_pauses_grow_exponentially_and_honour_mews_floors() {
        let r = retry();
        for kind in [PauseKind::Refused, PauseKind::Breaker, PauseKind::Systemic] {
            let lengths: Vec<u64> = (1..=7)
                .map(|n| pause_length(kind, None, n, &r).as_secs())
                .collect();
            assert_eq!(lengths, [30, 60, 120, 240, 480, 900, 900], "{kind:?}");
        }
        let floor = Some(Duration::from_secs(400));
        assert_eq!(
            pause_length(PauseKind::Breaker, floor, 1, &r).as_secs(),
            400
        );
        assert_eq!(
            pause_length(PauseKind::Breaker, floor, 5, &r).as_secs(),
            480
        );
        assert_eq!(
            pause_length(PauseKind::RetryAfter, floor, 5, &r).as_secs(),
            400
        );
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn any_outcome() -> impl Strategy<Value = Outcome> {
            let error = Just("e".to_owned());
            let after = proptest::option::of((0u64..100).prop_map(Duration::from_secs));
            prop_oneof![
                proptest::collection::hash_set(1i64..40, 0..40).prop_map(|ids| Outcome::Accepted {
                    by_identifier: ids
                        .into_iter()
                        .map(|id| {
                            (
                                id.to_string(),
                                AddedMessage {
                                    id: format!("m{id}"),
                                    message_thread_id: None,
                                    text: None,
                                    sender: Sender::Plain("Application".into()),
                                    created_utc: "c".into(),
                                },
                            )
                        })
                        .collect(),
                    unlabelled: 0,
                }),
                error.clone().prop_map(|error| Outcome::Rejected { error }),
                error.clone().prop_map(|error| Outcome::TooLarge { error }),
                error
                    .clone()
                    .prop_map(|error| Outcome::Unauthorized { error }),
                error.clone().prop_map(|error| Outcome::NotFound { error }),
                error
                    .clone()
                    .prop_map(|error| Outcome::Redirected { error }),
                error
                    .clone()
                    .prop_map(|error| Outcome::Unreachable { error }),
                (error.clone(), after.clone())
                    .prop_map(|(error, retry_after)| Outcome::Throttled { error, retry_after }),
                (
                    error,
                    after,
                    any::<bool>(),
                    any::<bool>(),
                    proptest::option::of(0u64..60)
                )
                    .prop_map(
                        |(error, retry_after, maybe_stored, smaller, settle)| {
                            Outcome::Transient {
                                error,
                                retry_after,
                                maybe_stored,
                                smaller,
                                settle: settle.map(Duration::from_secs),
                            }
                        }
                    ),
            ]
        }

        proptest! {
            /// Every row of a batch ends in exactly one place: an outcome to
            /// store now, or one of the halves to send again.
            #[test]
            fn every_row_gets_exactly_one_outcome(n in 1i64..40, attempts in 0u32..5, outcome in any_outcome(), jitter in 0.0f64..1.0) {
                let mut batch = rows(n);
                for row in &mut batch { row.attempts = attempts; }
                let d = decide(&batch, &outcome, &retry(), now(), jitter);
                let mut seen: Vec<i64> = d.rows.iter().map(|(id, _)| *id).collect();
                seen.extend(d.split.iter().flatten().map(|r| r.id));
                seen.sort_unstable();
                prop_assert_eq!(seen, (1..=n).collect::<Vec<_>>());
                prop_assert!(d.split.iter().all(|half| !half.is_empty()));
                for (_, o) in &d.rows {
                    if let RowOutcome::Retry { at, .. } = o {
                        prop_assert!(*at >= now());
                    }
                }
            }
        }
    }
}
