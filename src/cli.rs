//! The command line: clap definitions, and one library call per subcommand.

use std::path::PathBuf;
use std::time::SystemTime;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::config::{Settings, Sources};
use crate::status::StatusReport;
use crate::store::{Enqueued, NewMessage, SqliteStore};

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
        /// Mews message thread (a UUID).
        #[arg(long)]
        thread: uuid::Uuid,
        /// Message text.
        #[arg(long)]
        text: String,
        /// Idempotency key: enqueueing the same key twice inserts one row.
        #[arg(long)]
        identifier: Option<String>,
        /// Account (configured under [accounts.<name>]).
        #[arg(long, default_value = "default")]
        account: String,
    },
    /// Show counts per status and account, ages, the next retry and the last error.
    Status {
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
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

impl Cli {
    pub fn sources(&self) -> Sources {
        Sources {
            file: self.config.clone(),
            env: None,
        }
    }
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
            crate::daemon::run(settings, sources, shutdown, reloads).await?;
        }
        Command::Enqueue {
            thread,
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
            let store = open(&settings).await?;
            let message = NewMessage {
                message_thread_id: thread.hyphenated().to_string(),
                text,
                identifier,
                account,
            };
            match store.enqueue(&message).await? {
                Enqueued::Inserted(id) => out(&id.to_string())?,
                Enqueued::AlreadyThere(id) => {
                    eprintln!("a row with this identifier exists already; nothing inserted");
                    out(&id.to_string())?;
                }
            }
        }
        Command::Status { json } => {
            let store = open(&settings).await?;
            let now = SystemTime::now();
            let report = StatusReport::new(store.status(now).await?, now);
            if json {
                out(&serde_json::to_string_pretty(&report)?)?;
            } else {
                out(&report.render_text(now))?;
            }
        }
        Command::Migrate => {
            let store = open(&settings).await?;
            out(&format!("migrations applied to {}", store.path().display()))?;
        }
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

/// Prints a line of command output; a closed pipe (`| head`) is not an error.
fn out(text: &str) -> std::io::Result<()> {
    use std::io::Write;
    match writeln!(std::io::stdout().lock(), "{text}") {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

async fn open(settings: &Settings) -> anyhow::Result<SqliteStore> {
    SqliteStore::open(&settings.database.path, settings.database.busy_timeout)
        .await
        .with_context(|| format!("cannot open {}", settings.database.path.display()))
}
