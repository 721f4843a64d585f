//! The database file itself: the one-daemon-per-database lock (on the file,
//! whichever path, symlink or hard link reaches it), the refusal of file
//! systems where SQLite's locks and WAL shared memory do not work, noticing
//! that the file was deleted or replaced under a running daemon.

use std::fs::{File, TryLockError};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Why the daemon refuses or gives up a database file.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error(
        "another mews-outbox daemon is already running on {database} (it holds the lock on this database file, whatever path or link it was given); stop it first"
    )]
    AlreadyRunning { database: String },
    #[error("cannot create the database file {path}")]
    Create {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot open the database file {path} to lock it")]
    Lock {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "the database {path} is on a {filesystem} file system, where SQLite's locks, its WAL shared memory and the one-daemon lock do not work reliably (two daemons could send the same messages, the database could be corrupted); move the database to a local disk of this machine (ext4, xfs, btrfs, ...) and point database.path at it"
    )]
    UnsupportedFilesystem {
        path: String,
        filesystem: &'static str,
    },
    #[error("cannot find out the file system of {path}")]
    Statfs {
        path: String,
        #[source]
        source: io::Error,
    },
}

/// What happened to the database file under a running daemon.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FileChange {
    #[error(
        "the database file {path} was deleted while the daemon was running (rows inserted at that path from now on would reach nobody)"
    )]
    Deleted { path: String },
    #[error(
        "the database path {path} now leads to another file than the one the daemon opened (it was replaced, e.g. a copy or restore renamed over it)"
    )]
    Replaced { path: String },
}

/// Whether SQLite may be trusted with a file system, by its `statfs` type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilesystemVerdict {
    Local,
    /// A network, cluster or FUSE file system, by name.
    Refused(&'static str),
}

/// The decision behind [`check_local_filesystem`]: `f_type` is `statfs`'s
/// magic number (linux/magic.h). Refused are the file systems whose byte
/// range locks are emulated or lost between hosts and that cannot share
/// the WAL index through `mmap` (SQLite: "WAL does not work over a network
/// filesystem"); there, `flock` may also be emulated with the very POSIX
/// locks SQLite uses (NFS since Linux 2.6.12), so the daemon lock would
/// collide with them. FUSE is refused as a whole: its type does not say
/// whether sshfs or a local overlay is behind it, and sshfs is the common
/// case.
pub fn filesystem_verdict(f_type: u32) -> FilesystemVerdict {
    use FilesystemVerdict::{Local, Refused};
    match f_type {
        0x6969 => Refused("NFS"),
        0x517b => Refused("SMB"),
        0xff53_4d42 => Refused("CIFS"),
        0xfe53_4d42 => Refused("SMB2"),
        0x0102_1997 => Refused("9p (v9fs)"),
        0x6573_5546 => Refused("FUSE (sshfs, ...)"),
        0x5346_414f | 0x6b41_4653 => Refused("AFS"),
        0x00c3_6400 => Refused("Ceph"),
        0x0bd0_0bd0 => Refused("Lustre"),
        0x4750_4653 => Refused("GPFS"),
        0x7375_7245 => Refused("Coda"),
        0x564c => Refused("NCP"),
        0x786f_4256 => Refused("VirtualBox shared folder (vboxsf)"),
        0x0116_1970 => Refused("GFS2"),
        0x7461_636f => Refused("OCFS2"),
        _ => Local,
    }
}

/// Refuses a database (or, if it does not exist yet, its directory) on a
/// file system that [`filesystem_verdict`] refuses.
pub fn check_local_filesystem(database: &Path) -> Result<(), FileError> {
    let probe = if database.exists() {
        database
    } else {
        match database.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        }
    };
    let stat = rustix::fs::statfs(probe).map_err(|e| FileError::Statfs {
        path: probe.display().to_string(),
        source: e.into(),
    })?;
    // The magic numbers are 32 bits; `f_type` is a signed long on most
    // targets, where the low 32 bits are the number.
    #[allow(clippy::unnecessary_cast)]
    let f_type = stat.f_type as u32;
    match filesystem_verdict(f_type) {
        FilesystemVerdict::Local => Ok(()),
        FilesystemVerdict::Refused(filesystem) => Err(FileError::UnsupportedFilesystem {
            path: database.display().to_string(),
            filesystem,
        }),
    }
}

/// Proof that this process is the one daemon working on a database file;
/// released when dropped (or when the process dies).
///
/// The lock is an exclusive `flock` on the database file itself, so it is
/// the same lock through a symlink, a hard link or `dir/../dir/outbox.db`
/// (a lock file named after the path would not be). On Linux, `flock`
/// locks and the POSIX (`fcntl`) byte-range locks SQLite takes on the same
/// file are independent on a local file system, so producers and the
/// read-only commands are not blocked (tests/integration/database_file.rs checks it);
/// network file systems, where they are not, are refused before this.
///
/// Caveat: closing any descriptor of a file drops the POSIX locks the
/// process holds on it, so this descriptor is closed only when the daemon
/// is done, after the store; and the file is checked with `stat` on the
/// path and `fstat` on this descriptor, never by opening it again.
#[derive(Debug)]
pub struct DaemonLock {
    file: File,
    path: PathBuf,
    /// Device and inode of the locked file, to notice a replacement.
    dev: u64,
    ino: u64,
}

impl DaemonLock {
    /// Creates the database file when missing (as an empty 0660 file, see
    /// [`super::maintenance::create_database_file`]) and locks it, refusing
    /// when another daemon holds the lock.
    pub fn acquire(database: &Path) -> Result<DaemonLock, FileError> {
        let lock_error = |source| FileError::Lock {
            path: database.display().to_string(),
            source,
        };
        super::maintenance::create_database_file(database).map_err(|source| FileError::Create {
            path: database.display().to_string(),
            source,
        })?;
        let file = File::open(database).map_err(lock_error)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(FileError::AlreadyRunning {
                    database: database.display().to_string(),
                });
            }
            Err(TryLockError::Error(source)) => return Err(lock_error(source)),
        }
        let meta = file.metadata().map_err(lock_error)?;
        Ok(DaemonLock {
            file,
            path: database.to_owned(),
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }

    /// Whether the path still leads to the locked file. `None`: it does (or
    /// it cannot be told, e.g. a transient `stat` error other than "not found").
    pub fn change(&self) -> Option<FileChange> {
        let path = self.path.display().to_string();
        match std::fs::metadata(&self.path) {
            Ok(now) if (now.dev(), now.ino()) != (self.dev, self.ino) => {
                Some(FileChange::Replaced { path })
            }
            Ok(_) => match self.file.metadata() {
                // Same inode yet no link left: cannot happen on a sane file
                // system, but "no link" is what deletion means.
                Ok(open) if open.nlink() == 0 => Some(FileChange::Deleted { path }),
                _ => None,
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => Some(FileChange::Deleted { path }),
            Err(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_and_fuse_file_systems_are_refused_and_local_ones_accepted() {
        for (f_type, name) in [
            (0x6969, "NFS"),
            (0xff53_4d42, "CIFS"),
            (0xfe53_4d42, "SMB2"),
            (0x517b, "SMB"),
            (0x0102_1997, "9p (v9fs)"),
            (0x6573_5546, "FUSE (sshfs, ...)"),
            (0x6b41_4653, "AFS"),
            (0x00c3_6400, "Ceph"),
            (0x0bd0_0bd0, "Lustre"),
        ] {
            assert_eq!(
                filesystem_verdict(f_type),
                FilesystemVerdict::Refused(name),
                "{f_type:#x}"
            );
        }
        // ext4, xfs, btrfs, tmpfs, overlayfs, zfs.
        for f_type in [
            0xef53,
            0x5846_5342,
            0x9123_683e,
            0x0102_1994,
            0x794c_7630,
            0x2fc1_2fc1,
        ] {
            assert_eq!(
                filesystem_verdict(f_type),
                FilesystemVerdict::Local,
                "{f_type:#x}"
            );
        }
    }

    #[test]
    fn the_refusal_names_the_file_system_and_what_to_do() {
        let e = FileError::UnsupportedFilesystem {
            path: "/mnt/share/outbox.db".into(),
            filesystem: "NFS",
        }
        .to_string();
        assert!(
            e.contains("/mnt/share/outbox.db is on a NFS file system"),
            "{e}"
        );
        assert!(e.contains("move the database to a local disk"), "{e}");
    }

    #[tokio::test]
    async fn a_store_reconnecting_to_a_deleted_file_does_not_create_a_new_one() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("outbox.db");
        use crate::store::DaemonStore;
        let store = crate::store::SqliteStore::open(&db, std::time::Duration::from_secs(1))
            .await
            .unwrap();
        std::fs::remove_file(&db).unwrap();
        let watch = store
            .watch_changes(
                std::time::Duration::from_millis(5),
                tokio_util::sync::CancellationToken::new(),
            )
            .await;
        assert!(watch.is_err(), "connected to a missing file");
        assert!(!db.exists(), "an empty database was created in its place");
    }

    #[test]
    fn a_database_in_a_missing_directory_names_the_cause_once() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("missing").join("outbox.db");
        let statfs = check_local_filesystem(&db).unwrap_err();
        let lock = DaemonLock::acquire(&db).unwrap_err();
        for e in [statfs, lock] {
            let chain = crate::error_chain::ErrorChain(&e).to_string();
            assert_eq!(
                chain.matches("No such file or directory").count(),
                1,
                "{chain}"
            );
            assert_eq!(chain.matches("missing").count(), 1, "{chain}");
        }
    }

    #[test]
    fn a_second_lock_on_the_same_file_through_a_hard_link_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("outbox.db");
        let first = DaemonLock::acquire(&db).unwrap();
        let link = dir.path().join("link.db");
        std::fs::hard_link(&db, &link).unwrap();
        let second = DaemonLock::acquire(&link).unwrap_err();
        assert!(
            matches!(second, FileError::AlreadyRunning { .. }),
            "{second}"
        );
        assert_eq!(first.change(), None);
        std::fs::remove_file(&db).unwrap();
        assert_eq!(
            first.change(),
            Some(FileChange::Deleted {
                path: db.display().to_string()
            })
        );
        std::fs::rename(&link, &db).unwrap();
        assert_eq!(first.change(), None, "the same file back at the path");
        std::fs::write(dir.path().join("other.db"), b"").unwrap();
        std::fs::rename(dir.path().join("other.db"), &db).unwrap();
        assert_eq!(
            first.change(),
            Some(FileChange::Replaced {
                path: db.display().to_string()
            })
        );
    }
}
