//! Wakes the daemon when another process writes the database's WAL file
//! (`<database>-wal`): every commit in WAL mode appends frames to it with
//! `write()`, which inotify reports. No polling, so nothing to pay while idle.
//!
//! WAL mode already needs every process on the same host (shared memory),
//! which is exactly where inotify sees their writes. Elsewhere (not Linux,
//! or inotify unavailable) [`WalWatch::new`] fails and the caller polls.

use std::io;
use std::path::Path;

#[cfg(target_os = "linux")]
pub use linux::WalWatch;
#[cfg(not(target_os = "linux"))]
pub use other::WalWatch;

#[cfg(target_os = "linux")]
mod linux {
    use super::*;
    use inotify::{Inotify, WatchMask};
    use tokio::io::Interest;
    use tokio::io::unix::AsyncFd;

    /// An inotify watch on one WAL file.
    pub struct WalWatch {
        /// The inotify instance (non-blocking), registered with tokio.
        fd: AsyncFd<Inotify>,
        /// Events are only counted, never kept; a few fit.
        buffer: [u8; 1024],
    }

    impl WalWatch {
        pub fn new(wal: &Path) -> io::Result<WalWatch> {
            let inotify = Inotify::init()?;
            inotify.watches().add(wal, WatchMask::MODIFY)?;
            // SAFETY: `Inotify` owns its descriptor (closed only when it is
            // dropped, which the `AsyncFd` does last) and always returns the
            // same one from `as_raw_fd`.
            let fd = unsafe { AsyncFd::register_with_interest(inotify, Interest::READABLE) }?;
            Ok(WalWatch {
                fd,
                buffer: [0; 1024],
            })
        }

        /// Waits until the WAL file was written (since the last call); takes
        /// every event queued so far, so a burst of writes wakes once.
        pub async fn written(&mut self) -> io::Result<()> {
            loop {
                let mut ready = self.fd.readable_mut().await?;
                let mut seen = false;
                loop {
                    match ready.get_inner_mut().read_events(&mut self.buffer) {
                        Ok(events) => seen |= events.count() > 0,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            ready.clear_ready();
                            break;
                        }
                        Err(e) => return Err(e),
                    }
                }
                if seen {
                    return Ok(());
                }
            }
        }
    }
}

#[cfg(not(target_os = "linux"))]
mod other {
    use super::*;

    pub struct WalWatch;

    impl WalWatch {
        pub fn new(_wal: &Path) -> io::Result<WalWatch> {
            Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "watching the WAL file needs Linux inotify",
            ))
        }

        pub async fn written(&mut self) -> io::Result<()> {
            std::future::pending().await
        }
    }
}
