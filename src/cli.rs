//! The command line: clap definitions, and one library call per subcommand.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::config::{DatabaseTarget, PostgresSettings, Settings, Sources};
use crate::dead::DeadReport;
use crate::status::StatusReport;
use crate::store::postgres::{PgOptions, PgStore};
use crate::store::{
    DaemonStore, Enqueued, NewMessage, NewThread, OperatorStore, Requeue, SqliteStore, ThreadRef,
};
use secrecy::ExposeSecret;

#[derive(Debug, Parser)]
#[command(
    name = "mews-outbox",
    version,
    about = "Delivers outbox rows to the Mews Connector API"
)]
pub struct Cli {
    /// TOML configuration file, layered over the embedded defaults.
    #[arg(long, global = true, env = "MEWS_OUTBOX_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the delivery daemon until SIGTERM or SIGINT.
    Run,
    /// Insert one message into the outbox and print its row id.
    Enqueue {
        /// Mews message thread (a UUID) that this client created.
        #[arg(
            long,
            required_unless_present = "thread_key",
            conflicts_with = "thread_key"
        )]
        thread: Option<uuid::Uuid>,
        /// Instead of --thread: the `thread_key` of a thread of
        /// `outbox_threads` (created by the daemon before the message goes).
        #[arg(long, value_name = "KEY")]
        thread_key: Option<String>,
        /// With --thread-key: insert that thread (in the same transaction)
        /// unless its key exists already for the account.
        #[arg(long, requires_all = ["thread_key", "original_sender"], conflicts_with = "thread")]
        subject: Option<String>,
        /// With --thread-key and --subject: the thread's original sender.
        #[arg(long, requires_all = ["thread_key", "subject"], conflicts_with = "thread")]
        original_sender: Option<String>,
        /// Message text.
        #[arg(long)]
        text: String,
        /// Idempotency key: enqueueing the same key twice inserts one row.
        #[arg(long)]
        identifier: Option<String>,
        /// Account (configured under [accounts.NAME]).
        #[arg(long, default_value = "default")]
        account: String,
    },
    /// Show counts per status and account, ages, the next retry and the last error.
    Status {
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Dead-lettered rows: list them, send them again, or delete old ones.
    Dead {
        #[command(subcommand)]
        command: DeadCommand,
    },
    /// Create the database if needed and apply pending migrations.
    Migrate,
    /// Validate the configuration and print it with tokens redacted.
    CheckConfig {
        /// Also call Mews `configuration/get` with each account's tokens;
        /// exits non-zero when any account fails.
        #[arg(long)]
        online: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum DeadCommand {
    /// List dead rows, oldest first, with their text and why they died.
    List {
        /// Only this account's rows.
        #[arg(long)]
        account: Option<String>,
        /// Print JSON for scripts (full texts).
        #[arg(long)]
        json: bool,
    },
    /// Put dead rows (or dead threads) back to `pending` (attempts reset,
    /// due now). Refuses, changing nothing, if any named row or thread is
    /// not dead.
    Requeue {
        /// Row ids to requeue (`--id 3 --id 4` or `--id 3 4`).
        #[arg(long = "id", value_name = "N", num_args = 1.., required_unless_present_any = ["all", "threads", "all_threads"], conflicts_with = "all")]
        ids: Vec<i64>,
        /// Every dead row (of --account, if given).
        #[arg(long)]
        all: bool,
        /// Dead thread ids (`outbox_threads.id`) to requeue: the messages
        /// they hold follow once each is created.
        #[arg(long = "thread", value_name = "N", num_args = 1.., conflicts_with = "all_threads")]
        threads: Vec<i64>,
        /// Every dead thread (of --account, if given).
        #[arg(long)]
        all_threads: bool,
        /// Only this account's rows.
        #[arg(long)]
        account: Option<String>,
    },
    /// Delete dead rows, and dead threads, that have been dead for longer
    /// than the given age (the messages a purged thread held become dead).
    Purge {
        /// Age such as "30d" or "12h".
        #[arg(long, value_parser = humantime::parse_duration)]
        older_than: Duration,
        /// Only this account's rows.
        #[arg(long)]
        account: Option<String>,
    },
}

impl Cli {
    pub fn sources(&self) -> Sources {
        Sources {
            file: config_file(
                self.config.clone(),
                Path::new(crate::config::SYSTEM_CONFIG_FILE),
            ),
            env: None,
        }
    }
}

/// The configuration file: `--config` (or `MEWS_OUTBOX_CONFIG`), else the
/// packaged `/etc/mews-outbox/mews-outbox.toml` when it is there, so that
/// `mews-outbox status` typed on an installed server reads what the unit
/// reads; else none (the embedded defaults, e.g. in a fresh clone). A system
/// file that cannot even be looked at (no permission on /etc/mews-outbox)
/// counts as there: reading it then fails with a message naming it, instead
/// of silently looking for `outbox.db` in the current directory.
fn config_file(explicit: Option<PathBuf>, system: &Path) -> Option<PathBuf> {
    explicit.or_else(|| match system.try_exists() {
        Ok(false) => None,
        Ok(true) | Err(_) => Some(system.to_owned()),
    })
}

/// Runs one subcommand with settings loaded from `sources` (`run` loads
/// them again on SIGHUP).
pub async fn execute(command: Command, settings: Settings, sources: Sources) -> anyhow::Result<()> {
    match command {
        Command::Run => {
            let shutdown = CancellationToken::new();
            let (reload_requests, reloads) = tokio::sync::mpsc::channel(1);
            let signals =
                crate::signals::Signals::install().context("cannot install signal handlers")?;
            tokio::spawn(signals.forward(shutdown.clone(), reload_requests));
            run_daemon(settings, sources, shutdown, reloads).await?;
        }
        Command::Enqueue {
            thread,
            thread_key,
            subject,
            original_sender,
            text,
            identifier,
            account,
        } => {
            if !settings.accounts.contains_key(&account) {
                bail!(
                    "account {account:?} is not configured (configured: {}); add [accounts.{account}] with its access_token",
                    settings
                        .accounts
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            let (thread, new_thread) =
                enqueue_target(thread, thread_key, subject, original_sender)?;
            let message = NewMessage {
                thread,
                text,
                identifier,
                account,
            };
            let new_thread = new_thread.as_ref();
            match open_postgres(&settings).await? {
                Some(store) => enqueue(&store, &message, new_thread).await?,
                None => enqueue(&open(&settings).await?, &message, new_thread).await?,
            }
        }
        Command::Status { json } => match open_postgres_read_only(&settings).await? {
            Some(store) => status(&store, json).await?,
            None => status(&open_read_only(&settings).await?, json).await?,
        },
        Command::Dead { command } => match settings.database.target() {
            DatabaseTarget::Postgres(postgres) => {
                let store = match &command {
                    DeadCommand::List { .. } => {
                        connect_postgres_read_only(postgres, &settings).await?
                    }
                    _ => connect_postgres(postgres, &settings).await?,
                };
                dead(&store, command).await?;
            }
            DatabaseTarget::Sqlite { .. } => {
                let store = match &command {
                    DeadCommand::List { .. } => open_read_only(&settings).await?,
                    _ => open(&settings).await?,
                };
                dead(&store, command).await?;
            }
        },
        Command::Migrate => match open_postgres(&settings).await? {
            Some(store) => out(&format!("migrations applied to {}", store.describe()))?,
            None => {
                crate::store::sqlite::file::check_local_filesystem(&settings.database.path)?;
                let store = create_or_open(&settings).await?;
                out(&format!("migrations applied to {}", store.path().display()))?;
            }
        },
        Command::CheckConfig { online } => {
            out(&format!(
                "# configuration is valid; effective settings (tokens redacted):\n{settings}"
            ))?;
            if online {
                let checks = crate::online_check::check_accounts(&settings).await?;
                out(&format!(
                    "\n# online check against {}:\n{}",
                    settings.mews.base_url,
                    crate::online_check::render(&checks)
                ))?;
                let failed = checks.iter().filter(|c| !c.passed).count();
                if failed > 0 {
                    bail!(
                        "{failed} of {} accounts failed the online check",
                        checks.len()
                    );
                }
            }
        }
    }
    Ok(())
}

/// `run`: opens the store the configuration names (the SQLite file, locked
/// for this daemon; or the shared PostgreSQL outbox), then runs the same
/// [`crate::daemon::run`] on it.
async fn run_daemon(
    settings: Settings,
    sources: Sources,
    shutdown: CancellationToken,
    reloads: tokio::sync::mpsc::Receiver<()>,
) -> anyhow::Result<()> {
    match settings.database.target() {
        DatabaseTarget::Sqlite { path, busy_timeout } => {
            let store = SqliteStore::open_for_daemon(path, busy_timeout).await?;
            crate::daemon::run(store, settings, sources, shutdown, reloads).await?;
        }
        DatabaseTarget::Postgres(postgres) => {
            let store = connect_postgres(postgres, &settings).await?;
            crate::daemon::run(store, settings, sources, shutdown, reloads).await?;
        }
    }
    Ok(())
}

/// Connects to (and migrates) the PostgreSQL outbox. The error names the
/// URL with its password redacted (the store's errors never carry it).
async fn connect_postgres(
    postgres: &PostgresSettings,
    settings: &Settings,
) -> anyhow::Result<PgStore> {
    PgStore::connect(postgres.url.expose_secret(), pg_options(postgres, settings))
        .await
        .with_context(|| {
            format!(
                "cannot open the PostgreSQL outbox {}",
                postgres.redacted_url()
            )
        })
}

/// The options of a PostgreSQL handle from the settings.
fn pg_options(postgres: &PostgresSettings, settings: &Settings) -> PgOptions {
    PgOptions {
        lease: postgres.lease,
        settle: settings.mews.request_timeout,
        connect_timeout: postgres.connect_timeout,
    }
}

/// Connects to the PostgreSQL outbox for reading only (`status`, `dead
/// list`): no migration, every transaction read-only, a schema of another
/// version (or none) refused with the SQLite store's lines. Works for a
/// role that may only SELECT.
async fn connect_postgres_read_only(
    postgres: &PostgresSettings,
    settings: &Settings,
) -> anyhow::Result<PgStore> {
    match PgStore::connect_read_only(postgres.url.expose_secret(), pg_options(postgres, settings))
        .await
    {
        Ok(store) => Ok(store),
        // The schema problems name the database and say what to do.
        Err(e @ crate::store::StoreError::Schema { .. }) => Err(e.into()),
        Err(e) => Err(e).with_context(|| {
            format!(
                "cannot open the PostgreSQL outbox {} read-only",
                postgres.redacted_url()
            )
        }),
    }
}

/// [`connect_postgres_read_only`] when `database.url` is set, else `None`.
async fn open_postgres_read_only(settings: &Settings) -> anyhow::Result<Option<PgStore>> {
    match settings.database.target() {
        DatabaseTarget::Postgres(postgres) => {
            Ok(Some(connect_postgres_read_only(postgres, settings).await?))
        }
        DatabaseTarget::Sqlite { .. } => Ok(None),
    }
}

/// The PostgreSQL outbox when `database.url` is set (connected and
/// migrated: the commands that write), else `None`: the SQLite file.
async fn open_postgres(settings: &Settings) -> anyhow::Result<Option<PgStore>> {
    match settings.database.target() {
        DatabaseTarget::Postgres(postgres) => Ok(Some(connect_postgres(postgres, settings).await?)),
        DatabaseTarget::Sqlite { .. } => Ok(None),
    }
}

/// Where `enqueue` puts the message: `--thread` or `--thread-key`, and the
/// thread to insert with it (`--subject` and `--original-sender`). clap
/// already refuses the other combinations; this says what is wrong when a
/// value is blank.
fn enqueue_target(
    thread: Option<uuid::Uuid>,
    thread_key: Option<String>,
    subject: Option<String>,
    original_sender: Option<String>,
) -> anyhow::Result<(ThreadRef, Option<NewThread>)> {
    let key = match (thread, thread_key) {
        (Some(id), None) => return Ok((ThreadRef::Id(id.hyphenated().to_string()), None)),
        (None, Some(key)) => key,
        _ => bail!("give exactly one of --thread and --thread-key"),
    };
    if key.is_empty() {
        bail!("--thread-key must not be empty");
    }
    let new_thread = match (subject, original_sender) {
        (None, None) => None,
        (Some(subject), Some(original_sender)) => {
            if subject.trim().is_empty() {
                bail!("--subject must not be blank: Mews shows it as the conversation's subject");
            }
            if original_sender.trim().is_empty() {
                bail!(
                    "--original-sender must not be blank: Mews shows it as the conversation's guest"
                );
            }
            Some(NewThread {
                thread_key: key.clone(),
                subject,
                original_sender,
            })
        }
        _ => bail!("--subject and --original-sender go together (with --thread-key)"),
    };
    Ok((ThreadRef::Key(key), new_thread))
}

async fn enqueue<S: OperatorStore>(
    store: &S,
    message: &NewMessage,
    new_thread: Option<&NewThread>,
) -> anyhow::Result<()> {
    match store.enqueue(message, new_thread).await? {
        Enqueued::Inserted(id) => out(&id.to_string())?,
        Enqueued::AlreadyThere(id) => {
            eprintln!("a row with this identifier exists already; nothing inserted");
            out(&id.to_string())?;
        }
    }
    Ok(())
}

async fn status<S: OperatorStore>(store: &S, json: bool) -> anyhow::Result<()> {
    let now = SystemTime::now();
    let report = StatusReport::read(store, now).await?;
    if json {
        out(&serde_json::to_string_pretty(&report)?)?;
    } else {
        out(&report.render_text(now))?;
    }
    Ok(())
}

async fn dead<S: OperatorStore>(store: &S, command: DeadCommand) -> anyhow::Result<()> {
    let now = SystemTime::now();
    match command {
        DeadCommand::List { account, json } => {
            let report = DeadReport::read(store, account.as_deref(), now).await?;
            if json {
                out(&serde_json::to_string_pretty(&report)?)?;
            } else {
                out(&report.render_text())?;
            }
        }
        DeadCommand::Requeue {
            ids,
            all,
            threads,
            all_threads,
            account,
        } => {
            if all_threads || !threads.is_empty() {
                let which = if all_threads {
                    Requeue::All
                } else {
                    Requeue::Ids(threads)
                };
                let requeued = store
                    .requeue_dead_threads(&which, account.as_deref(), now)
                    .await?;
                if requeued.is_empty() {
                    out("no dead threads to requeue")?;
                } else {
                    tracing::warn!(
                        target: "mews_outbox::audit",
                        action = "dead requeue threads",
                        threads = requeued.len(),
                        ids = ?requeued,
                        account = account.as_deref().unwrap_or("*"),
                        user = std::env::var("USER").unwrap_or_default(),
                        "an operator requeued dead threads: back to pending, attempts reset; their messages follow once each is created"
                    );
                    out(&format!(
                        "requeued {} dead threads: {} (their held messages follow once each is created)",
                        requeued.len(),
                        ids_list(&requeued)
                    ))?;
                }
                if !all && ids.is_empty() {
                    return Ok(());
                }
            }
            let which = if all { Requeue::All } else { Requeue::Ids(ids) };
            let requeued = store.requeue_dead(&which, account.as_deref(), now).await?;
            if requeued.is_empty() {
                out("no dead rows to requeue")?;
            } else {
                tracing::warn!(
                    target: "mews_outbox::audit",
                    action = "dead requeue",
                    rows = requeued.len(),
                    ids = ?requeued,
                    account = account.as_deref().unwrap_or("*"),
                    user = std::env::var("USER").unwrap_or_default(),
                    "an operator requeued dead rows: back to pending, attempts reset"
                );
                out(&format!(
                    "requeued {} dead rows: {}",
                    requeued.len(),
                    ids_list(&requeued)
                ))?;
            }
        }
        DeadCommand::Purge {
            older_than,
            account,
        } => {
            let cutoff = now
                .checked_sub(older_than)
                .unwrap_or(SystemTime::UNIX_EPOCH);
            let age = humantime::format_duration(older_than);
            // The messages held by the threads about to go become dead with
            // them (and are purged by a later purge, once old enough).
            let held: u64 = store
                .dead_threads(account.as_deref())
                .await?
                .iter()
                .filter(|t| {
                    t.dead_at
                        .as_deref()
                        .and_then(crate::store::parse_timestamp)
                        .is_some_and(|at| at < cutoff)
                })
                .map(|t| t.messages_held)
                .sum();
            let threads = store.purge_dead_threads(cutoff, account.as_deref()).await?;
            if threads > 0 {
                tracing::warn!(
                    target: "mews_outbox::audit",
                    action = "dead purge threads",
                    threads,
                    messages_dead = held,
                    older_than = %age,
                    account = account.as_deref().unwrap_or("*"),
                    user = std::env::var("USER").unwrap_or_default(),
                    "an operator deleted dead threads; the messages they held are dead now"
                );
                out(&format!(
                    "purged {threads} dead threads dead for more than {age}; {held} messages they held are dead now (never sent; see `mews-outbox dead list`)"
                ))?;
            }
            let purged = store.purge_dead(cutoff, account.as_deref()).await?;
            if purged > 0 {
                tracing::warn!(
                    target: "mews_outbox::audit",
                    action = "dead purge",
                    rows = purged,
                    older_than = %age,
                    account = account.as_deref().unwrap_or("*"),
                    user = std::env::var("USER").unwrap_or_default(),
                    "an operator deleted dead rows"
                );
            }
            out(&format!(
                "purged {purged} dead rows dead for more than {age}"
            ))?;
        }
    }
    Ok(())
}

/// `1, 2, 3` (at most 20 ids, then how many more).
fn ids_list(ids: &[i64]) -> String {
    const SHOWN: usize = 20;
    let mut text = ids
        .iter()
        .take(SHOWN)
        .map(i64::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    if ids.len() > SHOWN {
        text += &format!(" and {} more", ids.len() - SHOWN);
    }
    text
}

/// Prints a line of command output; a closed pipe (`| head`) is not an error.
fn out(text: &str) -> std::io::Result<()> {
    use std::io::Write;
    match writeln!(std::io::stdout().lock(), "{text}") {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

/// Opens an existing outbox for writing (migrating it, as the daemon
/// would). A missing file is an error, not a new empty outbox: a command
/// run where the daemon does not look (another directory, `database.path`
/// unset outside systemd) must not queue messages nobody sends. The file is
/// never created, not even when it vanishes between the check and the open.
async fn open(settings: &Settings) -> anyhow::Result<SqliteStore> {
    let path = existing_database(settings)?;
    SqliteStore::open_existing(path, settings.database.busy_timeout)
        .await
        .with_context(|| format!("cannot open {}", path.display()))
}

/// Opens an existing outbox read-only, for the commands that only look:
/// they work for a user who may only read the database, and never write
/// to it (no migration; a schema of another version is reported).
async fn open_read_only(settings: &Settings) -> anyhow::Result<SqliteStore> {
    let path = existing_database(settings)?;
    match SqliteStore::open_read_only(path, settings.database.busy_timeout).await {
        Ok(store) => Ok(store),
        // The schema problems say what to do; SQLite's "unable to open" and
        // "attempt to write a readonly database" do not.
        Err(e @ crate::store::StoreError::Database(_)) => Err(e).with_context(|| {
            format!(
                "cannot open {0} read-only (reading needs read access to {0}, {0}-wal and {0}-shm and to their directory; when the daemon is stopped and -wal/-shm are gone, SQLite must create them, which needs write access to the directory)",
                path.display()
            )
        }),
        Err(e) => Err(e.into()),
    }
}

fn existing_database(settings: &Settings) -> anyhow::Result<&Path> {
    let path = settings.database.path.as_path();
    if !path.exists() {
        bail!(
            "there is no outbox database at {}: set database.path (or --config) to the daemon's database, or create it with `mews-outbox migrate`",
            path.display()
        );
    }
    Ok(path)
}

async fn create_or_open(settings: &Settings) -> anyhow::Result<SqliteStore> {
    SqliteStore::open(&settings.database.path, settings.database.busy_timeout)
        .await
        .with_context(|| format!("cannot open {}", settings.database.path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(["mews-outbox"].iter().chain(args))
    }

    #[test]
    fn enqueue_takes_exactly_one_thread_and_a_new_thread_only_by_key() {
        let uuid = "7f9325f6-ef44-4911-89a8-ae51010a5aa4";
        assert!(parse(&["enqueue", "--thread", uuid, "--text", "t"]).is_ok());
        assert!(parse(&["enqueue", "--thread-key", "k", "--text", "t"]).is_ok());
        let full = [
            "enqueue",
            "--thread-key",
            "k",
            "--subject",
            "S",
            "--original-sender",
            "O",
            "--text",
            "t",
        ];
        assert!(parse(&full).is_ok());
        for wrong in [
            &["enqueue", "--text", "t"][..],
            &[
                "enqueue",
                "--thread",
                uuid,
                "--thread-key",
                "k",
                "--text",
                "t",
            ],
            &[
                "enqueue",
                "--thread-key",
                "k",
                "--subject",
                "S",
                "--text",
                "t",
            ],
            &[
                "enqueue",
                "--thread-key",
                "k",
                "--original-sender",
                "O",
                "--text",
                "t",
            ],
            &[
                "enqueue",
                "--thread",
                uuid,
                "--subject",
                "S",
                "--original-sender",
                "O",
                "--text",
                "t",
            ],
        ] {
            assert!(parse(wrong).is_err(), "{wrong:?}");
        }
        assert!(
            enqueue_target(None, Some("k".into()), Some(" ".into()), Some("O".into())).is_err()
        );
        assert!(enqueue_target(None, Some(String::new()), None, None).is_err());
        let (to, new) =
            enqueue_target(None, Some("k".into()), Some("S".into()), Some("O".into())).unwrap();
        assert_eq!(to, ThreadRef::Key("k".into()));
        assert_eq!(new.unwrap().thread_key, "k");
    }

    #[test]
    fn dead_requeue_takes_rows_or_threads() {
        assert!(parse(&["dead", "requeue", "--thread", "3", "4"]).is_ok());
        assert!(parse(&["dead", "requeue", "--all-threads", "--account", "spa"]).is_ok());
        assert!(parse(&["dead", "requeue", "--id", "1", "--thread", "3"]).is_ok());
        assert!(parse(&["dead", "requeue"]).is_err());
        assert!(parse(&["dead", "requeue", "--thread", "3", "--all-threads"]).is_err());
    }

    #[test]
    fn the_cli_reads_the_packaged_configuration_only_when_none_is_given_and_it_exists() {
        let dir = tempfile::tempdir().unwrap();
        let system = dir.path().join("mews-outbox.toml");
        let explicit = PathBuf::from("/srv/my.toml");
        assert_eq!(config_file(None, &system), None, "a fresh clone: defaults");
        std::fs::write(&system, "").unwrap();
        assert_eq!(config_file(None, &system), Some(system.clone()));
        assert_eq!(
            config_file(Some(explicit.clone()), &system),
            Some(explicit),
            "--config wins"
        );
    }
}
