//! Talking to systemd (the `sd_notify` protocol: `READY=1`, `STATUS=`,
//! `RELOADING=1`, `STOPPING=1`, `WATCHDOG=1`) and deciding whether the
//! daemon deserves a watchdog ping: only while every loop that does work
//! has checked in by the deadline it promised ([`Liveness`]).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use sd_notify::NotifyState;

/// Sends notifications when systemd asked for them (`$NOTIFY_SOCKET`);
/// does nothing otherwise. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Notifier {
    /// Whether `$NOTIFY_SOCKET` was set at start.
    enabled: bool,
    /// A failed send is logged once, not at every status update.
    failed: Arc<AtomicBool>,
}

impl Notifier {
    pub fn from_env() -> Notifier {
        Notifier {
            enabled: std::env::var_os("NOTIFY_SOCKET").is_some(),
            failed: Arc::new(AtomicBool::new(false)),
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// Start-up (or a reload) is complete.
    pub fn ready(&self, status: &str) {
        self.send(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    pub fn status(&self, status: &str) {
        self.send(&[NotifyState::Status(status)]);
    }

    /// A reload starts; [`Notifier::ready`] ends it.
    pub fn reloading(&self) {
        // systemd >= 253 wants the monotonic time with RELOADING=1.
        match NotifyState::monotonic_usec_now() {
            Ok(now) => self.send(&[
                NotifyState::Reloading,
                now,
                NotifyState::Status("reloading the configuration"),
            ]),
            Err(_) => self.send(&[NotifyState::Reloading]),
        }
    }

    pub fn stopping(&self) {
        self.send(&[
            NotifyState::Stopping,
            NotifyState::Status("stopping: finishing requests in flight"),
        ]);
    }

    pub fn watchdog(&self) {
        self.send(&[NotifyState::Watchdog]);
    }

    fn send(&self, states: &[NotifyState<'_>]) {
        if !self.enabled {
            return;
        }
        if let Err(e) = sd_notify::notify(states)
            && !self.failed.swap(true, Ordering::Relaxed)
        {
            tracing::warn!(error = %e, "cannot notify systemd (NOTIFY_SOCKET); it may consider the service failed");
        }
    }
}

/// The watchdog interval systemd expects pings within (`$WATCHDOG_USEC`,
/// when `$WATCHDOG_PID` is unset or ours).
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().filter(|d| !d.is_zero())
}

/// What a loop said it is doing.
#[derive(Debug, Clone, Copy)]
enum LoopState {
    /// Waiting for work, a timer or a shared permit: not stuck.
    Waiting,
    /// Working; checks in again before `deadline` or is stuck.
    Busy {
        doing: &'static str,
        deadline: Instant,
    },
}

#[derive(Debug)]
struct Entry {
    name: String,
    state: LoopState,
}

#[derive(Debug, Default)]
struct Registry {
    next_id: u64,
    loops: BTreeMap<u64, Entry>,
    last_outcome: Option<LastOutcome>,
}

/// The last answer Mews gave, for `STATUS=`.
#[derive(Debug, Clone)]
pub struct LastOutcome {
    pub account: String,
    pub outcome: &'static str,
    pub http_status: Option<u16>,
    pub at: Instant,
}

/// Which loops are alive. Each loop holds a [`Pulse`]; the watchdog pinger
/// asks [`Liveness::overdue`]. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Liveness {
    registry: Arc<Mutex<Registry>>,
}

/// A loop that is past the deadline it promised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overdue {
    pub name: String,
    pub doing: &'static str,
    pub late_by: Duration,
}

impl Liveness {
    fn lock(&self) -> std::sync::MutexGuard<'_, Registry> {
        // A panic while holding this lock leaves plain data; keep going.
        self.registry.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a loop, initially waiting. It is forgotten when the pulse drops.
    pub fn register(&self, name: impl Into<String>) -> Pulse {
        let mut registry = self.lock();
        let id = registry.next_id;
        registry.next_id += 1;
        registry.loops.insert(
            id,
            Entry {
                name: name.into(),
                state: LoopState::Waiting,
            },
        );
        Pulse {
            liveness: self.clone(),
            id,
        }
    }

    /// Loops busy past their deadline at `now`; empty when the daemon may ping.
    pub fn overdue(&self, now: Instant) -> Vec<Overdue> {
        self.lock()
            .loops
            .values()
            .filter_map(|entry| match entry.state {
                LoopState::Busy { doing, deadline } if deadline < now => Some(Overdue {
                    name: entry.name.clone(),
                    doing,
                    late_by: now - deadline,
                }),
                _ => None,
            })
            .collect()
    }

    pub fn last_outcome(&self) -> Option<LastOutcome> {
        self.lock().last_outcome.clone()
    }
}

/// One loop's promise to check in. Dropping it unregisters the loop.
#[derive(Debug)]
pub struct Pulse {
    liveness: Liveness,
    id: u64,
}

impl Pulse {
    /// Starts work that finishes, or checks in again, within `within`.
    pub fn busy(&self, doing: &'static str, within: Duration) {
        self.set(LoopState::Busy {
            doing,
            deadline: Instant::now() + within,
        });
    }

    /// Waits for work (or a timer, or a permit held by another loop).
    pub fn waiting(&self) {
        self.set(LoopState::Waiting);
    }

    /// Remembers a reply from Mews for `STATUS=`.
    pub fn outcome(&self, account: &str, outcome: &'static str, http_status: Option<u16>) {
        self.liveness.lock().last_outcome = Some(LastOutcome {
            account: account.to_owned(),
            outcome,
            http_status,
            at: Instant::now(),
        });
    }

    fn set(&self, state: LoopState) {
        if let Some(entry) = self.liveness.lock().loops.get_mut(&self.id) {
            entry.state = state;
        }
    }
}

impl Drop for Pulse {
    fn drop(&mut self) {
        self.liveness.lock().loops.remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_loop_past_its_deadline_is_overdue_and_a_waiting_one_never_is() {
        let liveness = Liveness::default();
        let sender = liveness.register("account hotel");
        let idle = liveness.register("account quiet");
        sender.busy("sending", Duration::from_secs(40));
        idle.waiting();

        let now = Instant::now();
        assert!(liveness.overdue(now).is_empty());
        assert!(liveness.overdue(now + Duration::from_secs(39)).is_empty());

        let late = liveness.overdue(now + Duration::from_secs(3600));
        assert_eq!(late.len(), 1);
        assert_eq!(late[0].name, "account hotel");
        assert_eq!(late[0].doing, "sending");

        sender.waiting(); // it came back
        assert!(liveness.overdue(now + Duration::from_secs(3600)).is_empty());
    }

    #[test]
    fn a_dropped_pulse_no_longer_counts() {
        let liveness = Liveness::default();
        let pulse = liveness.register("old loop");
        pulse.busy("sending", Duration::ZERO);
        drop(pulse);
        assert!(
            liveness
                .overdue(Instant::now() + Duration::from_secs(1))
                .is_empty()
        );
    }

    #[test]
    fn the_last_outcome_is_remembered() {
        let liveness = Liveness::default();
        let pulse = liveness.register("a");
        assert!(liveness.last_outcome().is_none());
        pulse.outcome("hotel", "accepted", Some(200));
        let last = liveness.last_outcome().unwrap();
        assert_eq!(
            (last.account.as_str(), last.outcome, last.http_status),
            ("hotel", "accepted", Some(200))
        );
    }
}
