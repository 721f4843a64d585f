//! Client-side rate limiting per account: the `rate_limit` setting and a
//! sliding-window log that keeps an account under Mews's request limit.
//!
//! Mews allows 200 requests per AccessToken within 30 seconds, as a sliding
//! window. The log remembers when each of the account's last `requests`
//! requests *ended* and lets a new one *start* only when fewer than
//! `requests` of them ended within the last `per` + [`margin`]. Mews admits
//! a request somewhere between the moment we start sending it and the
//! moment its answer is back, so measuring from our end to our next start
//! keeps every pair of Mews-side admissions at least `per` apart, whatever
//! the latency. Requests in flight count as not yet ended.
//!
//! Pure: every method takes the current instant, so it is tested without
//! clocks.

use std::collections::VecDeque;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use tokio::time::Instant;

/// Mews's documented limit: 200 requests per AccessToken in 30 seconds.
pub const DEFAULT_RATE_LIMIT: RateLimit = RateLimit::Window {
    requests: 200,
    per: Duration::from_secs(30),
};

/// How many requests an account may send within a sliding window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateLimit {
    /// No client-side limit (benchmarks against a fake; Mews still answers 429).
    Off,
    /// At most `requests` within any `per`.
    Window { requests: u32, per: Duration },
}

/// Extra time added to the window: timer granularity, and a server that
/// rounds its timestamps. 1% of `per` (300 ms of 30 s).
pub fn margin(per: Duration) -> Duration {
    per / 100
}

impl FromStr for RateLimit {
    type Err = String;

    /// `"off"` or `"<requests>/<duration>"`, e.g. `"200/30s"`.
    fn from_str(s: &str) -> Result<RateLimit, String> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("off") {
            return Ok(RateLimit::Off);
        }
        let expected = || {
            format!("must be \"off\" or \"<requests>/<duration>\" such as \"200/30s\", got {s:?}")
        };
        let (requests, per) = s.split_once('/').ok_or_else(expected)?;
        let requests: u32 = requests.trim().parse().map_err(|_| expected())?;
        let per = humantime::parse_duration(per.trim()).map_err(|_| expected())?;
        if requests == 0 || per.is_zero() {
            return Err(format!(
                "must allow at least one request in a window longer than 0, got {s:?} (use \"off\" to disable)"
            ));
        }
        Ok(RateLimit::Window { requests, per })
    }
}

impl fmt::Display for RateLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RateLimit::Off => f.write_str("off"),
            RateLimit::Window { requests, per } => {
                write!(f, "{requests}/{}", humantime::format_duration(*per))
            }
        }
    }
}

/// The sliding-window log of one account.
#[derive(Debug, Clone)]
pub struct SlidingWindow {
    /// Requests allowed per window.
    requests: usize,
    /// `per` plus the margin.
    window: Duration,
    /// End instants of the latest `requests` finished requests, oldest first.
    ends: VecDeque<Instant>,
    /// Requests started and not finished.
    in_flight: usize,
}

impl SlidingWindow {
    /// `None` when the limit is off.
    pub fn new(limit: RateLimit) -> Option<SlidingWindow> {
        match limit {
            RateLimit::Off => None,
            RateLimit::Window { requests, per } => {
                let requests = usize::try_from(requests).unwrap_or(usize::MAX).max(1);
                Some(SlidingWindow {
                    requests,
                    window: per + margin(per),
                    ends: VecDeque::with_capacity(requests.min(1024)),
                    in_flight: 0,
                })
            }
        }
    }

    /// When the next request may start: `now` or later. `None` while only
    /// the end of a request in flight can make room (not with one request
    /// at a time per account).
    pub fn ready_at(&self, now: Instant) -> Option<Instant> {
        // The new request needs `ends` to hold at most `requests - 1 -
        // in_flight` ends within the window: the oldest `excess` must leave.
        let used = self.ends.len() + self.in_flight + 1;
        let Some(excess) = used.checked_sub(self.requests).filter(|&e| e > 0) else {
            return Some(now);
        };
        let leaving = self.ends.get(excess - 1)?;
        Some((*leaving + self.window).max(now))
    }

    /// A request starts now.
    pub fn start(&mut self) {
        self.in_flight += 1;
    }

    /// A request started with [`SlidingWindow::start`] ended (answered,
    /// failed or timed out) at `end`.
    pub fn finish(&mut self, end: Instant) {
        self.in_flight = self.in_flight.saturating_sub(1);
        self.remember(end);
    }

    /// Adds a past request's end (at start-up, from the database).
    pub fn remember(&mut self, end: Instant) {
        let at = self.ends.partition_point(|&e| e <= end);
        self.ends.insert(at, end);
        while self.ends.len() > self.requests {
            self.ends.pop_front();
        }
    }

    /// End instants of the requests that still matter, oldest first.
    pub fn ends(&self) -> impl Iterator<Item = Instant> + '_ {
        self.ends.iter().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MS: Duration = Duration::from_millis(1);

    fn window(requests: u32, per_ms: u64) -> SlidingWindow {
        SlidingWindow::new(RateLimit::Window {
            requests,
            per: MS * per_ms as u32,
        })
        .unwrap()
    }

    #[test]
    fn the_setting_reads_and_prints_both_forms() {
        assert_eq!("200/30s".parse(), Ok(DEFAULT_RATE_LIMIT));
        assert_eq!(
            " 20 / 3s ".parse(),
            Ok(RateLimit::Window {
                requests: 20,
                per: Duration::from_secs(3)
            })
        );
        assert_eq!("off".parse(), Ok(RateLimit::Off));
        assert_eq!("OFF".parse(), Ok(RateLimit::Off));
        assert_eq!(DEFAULT_RATE_LIMIT.to_string(), "200/30s");
        assert_eq!(RateLimit::Off.to_string(), "off");
        for bad in [
            "", "200", "200/", "/30s", "0/30s", "200/0s", "x/30s", "200/soon",
        ] {
            assert!(bad.parse::<RateLimit>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_burst_fills_the_window_then_waits_for_the_oldest_end_plus_the_window() {
        let mut w = window(3, 1000);
        let t0 = Instant::now();
        for i in 0..3 {
            let now = t0 + MS * (i * 10);
            assert_eq!(w.ready_at(now), Some(now), "request {i} goes at once");
            w.start();
            w.finish(now + MS * 5);
        }
        // Ends at 5, 15, 25 ms: the 4th may start 1000 + 10 (margin) after 5.
        let now = t0 + MS * 30;
        assert_eq!(w.ready_at(now), Some(t0 + MS * 1015));
        assert_eq!(w.ready_at(t0 + MS * 2000), Some(t0 + MS * 2000));
    }

    #[test]
    fn a_request_in_flight_takes_a_place() {
        let mut w = window(2, 1000);
        let t0 = Instant::now();
        w.start();
        w.finish(t0);
        w.start(); // in flight
        assert_eq!(w.ready_at(t0), Some(t0 + MS * 1010));
        let mut one = window(1, 1000);
        one.start();
        assert_eq!(
            one.ready_at(t0),
            None,
            "only the end of the request in flight makes room"
        );
    }

    #[test]
    fn only_the_latest_ends_are_kept() {
        let mut w = window(2, 1000);
        let t0 = Instant::now();
        for i in 0..10 {
            w.remember(t0 + MS * i);
        }
        assert_eq!(w.ends().collect::<Vec<_>>(), [t0 + MS * 8, t0 + MS * 9]);
        w.remember(t0); // an old one arriving late changes nothing
        assert_eq!(w.ends().count(), 2);
        assert_eq!(w.ends().next(), Some(t0 + MS * 8));
    }

    #[test]
    fn off_means_no_window() {
        assert!(SlidingWindow::new(RateLimit::Off).is_none());
    }

    proptest! {
        /// One request at a time, each admitted by the server at any moment
        /// between its start and its end: no window of `per` ever holds more
        /// than `requests` admissions, and a backlog keeps the rate near the limit.
        #[test]
        fn server_side_admissions_never_exceed_the_limit(
            requests in 1u32..30,
            latencies in prop::collection::vec((0u64..400, 0.0f64..=1.0), 1..300),
        ) {
            let per = Duration::from_millis(1000);
            let mut w = SlidingWindow::new(RateLimit::Window { requests, per }).unwrap();
            let mut now = Instant::now();
            let mut admitted = Vec::new();
            for (latency_ms, at) in latencies {
                let start = w.ready_at(now).unwrap();
                w.start();
                let end = start + MS * latency_ms as u32;
                admitted.push(start + (end - start).mul_f64(at));
                w.finish(end);
                now = end;
            }
            admitted.sort();
            let n = requests as usize;
            for pair in admitted.windows(n + 1) {
                prop_assert!(pair[n] - pair[0] >= per, "{} requests within {:?}", n + 1, pair[n] - pair[0]);
            }
        }
    }
}
