//! Unix signals of `mews-outbox run`: SIGTERM and SIGINT stop the daemon,
//! SIGHUP asks it to reload its configuration.

use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// The installed handlers. Installing them first thing matters: SIGHUP's
/// default action would otherwise end the process.
pub struct Signals {
    terminate: Signal,
    interrupt: Signal,
    hangup: Signal,
}

impl Signals {
    pub fn install() -> std::io::Result<Signals> {
        Ok(Signals {
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
            hangup: signal(SignalKind::hangup())?,
        })
    }

    /// Cancels `shutdown` on the first SIGTERM or SIGINT; sends a reload
    /// request on each SIGHUP (several before the daemon gets to them
    /// count as one).
    pub async fn forward(mut self, shutdown: CancellationToken, reloads: mpsc::Sender<()>) {
        loop {
            let name = tokio::select! {
                _ = self.terminate.recv() => "SIGTERM",
                _ = self.interrupt.recv() => "SIGINT",
                _ = self.hangup.recv() => {
                    tracing::info!(signal = "SIGHUP", "configuration reload requested");
                    let _ = reloads.try_send(());
                    continue;
                }
            };
            tracing::info!(signal = name, "shutdown requested");
            shutdown.cancel();
            return;
        }
    }
}
