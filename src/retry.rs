//! When to try again: the persisted retry schedule and `Retry-After` parsing.
//! Pure functions of their inputs (jitter is passed in), so they are tested
//! without clocks or sleeps.

use std::time::{Duration, SystemTime};

/// A `Retry-After` longer than this is treated as this: a garbage header must
/// not park an account for days. Mews documents no maximum.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(60 * 60);

/// Exponential growth `base · 2^(n-1)` for the `n`-th consecutive failure
/// (1-based), capped at `max`.
pub fn exponential(n: u32, base: Duration, max: Duration) -> Duration {
    let doublings = n.saturating_sub(1).min(32);
    base.saturating_mul(1u32 << doublings.min(31)).min(max)
}

/// How long a 429 pauses the account, the `streak`-th pause in a row
/// (1-based). With a `Retry-After`: that, but never less than the floor
/// `base_delay · 2^(n-1)` (capped at `pause_max`), so that `Retry-After: 0`,
/// a date already past or a clock ahead of Mews's cannot make the daemon
/// hammer an account that keeps answering 429; the floor starts at the small
/// `base_delay`, so an honest `Retry-After` of a few seconds is what decides.
/// Without one (absent or unreadable): `pause_base · 2^(n-1)` up to
/// `pause_max`, as for the other pauses.
pub fn throttle_pause(
    retry_after: Option<Duration>,
    streak: u32,
    base_delay: Duration,
    pause_base: Duration,
    pause_max: Duration,
) -> Duration {
    match retry_after {
        Some(after) => after.max(exponential(streak, base_delay, pause_max)),
        None => exponential(streak, pause_base, pause_max),
    }
}

/// Delay before retrying a row whose `attempt`-th delivery attempt (1-based)
/// just failed: "equal jitter" over the capped exponential, i.e. a uniform
/// value in `[d/2, d]` where `d = exponential(attempt, base, max)`.
/// `jitter` is a number in `[0, 1)`; a `retry_after` given by Mews is a floor.
pub fn retry_delay(
    attempt: u32,
    base: Duration,
    max: Duration,
    jitter: f64,
    retry_after: Option<Duration>,
) -> Duration {
    let ceiling = exponential(attempt, base, max);
    let half = ceiling / 2;
    let jittered = half + half.mul_f64(jitter.clamp(0.0, 1.0));
    match retry_after {
        Some(floor) => jittered.max(floor),
        None => jittered,
    }
}

/// Parses a `Retry-After` header value (RFC 9110: delta-seconds or an
/// HTTP-date) into how long to wait from `now`, capped at [`MAX_RETRY_AFTER`].
/// A date in the past means "now" (zero); garbage gives `None`.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    let wait = if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // Too many digits for u64 is still a (huge) valid delay.
        Duration::from_secs(value.parse::<u64>().unwrap_or(u64::MAX))
    } else {
        let at = httpdate::parse_http_date(value).ok()?;
        at.duration_since(now).unwrap_or(Duration::ZERO)
    };
    Some(wait.min(MAX_RETRY_AFTER))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn delays_double_from_the_base_up_to_the_cap() {
        let max = Duration::from_secs(60);
        let ceilings: Vec<u64> = (1..=8).map(|n| exponential(n, S, max).as_secs()).collect();
        assert_eq!(ceilings, [1, 2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(exponential(u32::MAX, S, max), max);
    }

    #[test]
    fn retry_after_accepts_delta_seconds_and_http_dates() {
        let now = httpdate::parse_http_date("Sat, 28 Nov 2026 07:00:00 GMT").unwrap();
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        assert_eq!(
            parse_retry_after("Sat, 28 Nov 2026 07:00:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_retry_after("Sat, 28 Nov 2026 06:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-5", now), None);
        assert_eq!(parse_retry_after("", now), None);
        assert_eq!(
            parse_retry_after("99999999999999999999999", now),
            Some(MAX_RETRY_AFTER)
        );
    }

    #[test]
    fn a_429_pauses_at_least_the_growing_floor_whatever_its_retry_after_says() {
        let (base, pause_base, max) = (S, Duration::from_secs(30), Duration::from_secs(900));
        let zero: Vec<u64> = (1..=12)
            .map(|n| throttle_pause(Some(Duration::ZERO), n, base, pause_base, max).as_secs())
            .collect();
        assert_eq!(zero, [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 900, 900]);
        assert_eq!(
            throttle_pause(Some(Duration::from_secs(7)), 1, base, pause_base, max),
            Duration::from_secs(7),
            "an honest Retry-After of a few seconds decides"
        );
        assert_eq!(
            throttle_pause(Some(Duration::from_secs(7)), 4, base, pause_base, max),
            Duration::from_secs(8),
            "repeated 429s outgrow it"
        );
        assert_eq!(
            throttle_pause(Some(MAX_RETRY_AFTER), 1, base, pause_base, max),
            MAX_RETRY_AFTER,
            "a long Retry-After is not cut to pause_max"
        );
        assert_eq!(throttle_pause(None, 1, base, pause_base, max), pause_base);
        assert_eq!(
            throttle_pause(None, 3, base, pause_base, max),
            Duration::from_secs(120)
        );
    }

    proptest! {
        #[test]
        fn a_429_never_pauses_less_than_the_floor(after_s in proptest::option::of(0u64..4000), n in 1u32..64) {
            let max = Duration::from_secs(900);
            let d = throttle_pause(after_s.map(Duration::from_secs), n, S, Duration::from_secs(30), max);
            prop_assert!(d >= exponential(n, S, max));
            if let Some(a) = after_s {
                prop_assert!(d >= Duration::from_secs(a));
            }
        }

        #[test]
        fn the_ceiling_is_monotone_up_to_the_cap(n in 1u32..200, base_ms in 1u64..10_000, max_s in 1u64..100_000) {
            let base = Duration::from_millis(base_ms);
            let max = Duration::from_secs(max_s).max(base);
            prop_assert!(exponential(n, base, max) <= exponential(n + 1, base, max));
            prop_assert!(exponential(n, base, max) <= max);
        }

        #[test]
        fn jitter_stays_within_half_and_whole_ceiling(n in 1u32..64, jitter in 0.0f64..1.0) {
            let max = Duration::from_secs(900);
            let d = retry_delay(n, S, max, jitter, None);
            let ceiling = exponential(n, S, max);
            prop_assert!(d >= ceiling / 2 && d <= ceiling, "{d:?} vs {ceiling:?}");
        }

        #[test]
        fn retry_after_is_a_floor(n in 1u32..64, jitter in 0.0f64..1.0, after_s in 0u64..7200) {
            let after = Duration::from_secs(after_s);
            let d = retry_delay(n, S, Duration::from_secs(900), jitter, Some(after));
            prop_assert!(d >= after);
        }

        #[test]
        fn retry_after_never_panics_and_is_capped(value in ".*") {
            if let Some(d) = parse_retry_after(&value, SystemTime::UNIX_EPOCH) {
                prop_assert!(d <= MAX_RETRY_AFTER);
            }
        }
    }
}
