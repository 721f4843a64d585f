//! Typed settings: embedded defaults, then the TOML file, then
//! `MEWS_OUTBOX__SECTION__KEY` environment variables; validation, one
//! function per section; value-free error messages. Where each token comes
//! from is decided in [`crate::secrets`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};

use crate::secrets::{self, SecretError, TokenSources};
use serde::Deserialize;
use url::Url;

use crate::limiter::{DEFAULT_RATE_LIMIT, RateLimit};

mod load_error;
mod validate;

use load_error::describe_load_error;
use validate::*;

/// The embedded defaults, layered first.
const DEFAULTS: &str = include_str!("../defaults.toml");

/// Prefix of environment overrides: `MEWS_OUTBOX__DELIVERY__BATCH_SIZE=500`.
pub const ENV_PREFIX: &str = "MEWS_OUTBOX";

/// The public demo environment; its tokens are published by Mews.
pub const DEMO_BASE_URL: &str = "https://api.mews-demo.com";
/// The demo environment's public tokens (kept with the other token code).
pub use crate::secrets::{DEMO_ACCESS_TOKEN, DEMO_CLIENT_TOKEN};

/// Largest batch the Connector API accepts in one `messages/add`.
pub const MAX_BATCH_SIZE: usize = 1000;

/// Bounds of `delivery.max_request_bytes`: at least room for the request's
/// envelope and a message; at most what keeps memory modest (the response
/// buffer is sized from it, see `MewsClient::with_max_request_bytes`).
pub const MAX_REQUEST_BYTES_RANGE: std::ops::RangeInclusive<usize> = 16 * 1024..=64 * 1024 * 1024;

/// A setting that could not be loaded or is invalid. The message names the
/// key, never a value. There is deliberately no variant wrapping
/// `config::ConfigError`: its messages quote values; a loading error is
/// described in words first (`Unparsable`).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: `{key}` {problem}")]
    Invalid { key: String, problem: String },
    /// A token file or credential that is missing, unreadable or too open.
    #[error(transparent)]
    Secret(#[from] SecretError),
    /// The file could not be parsed; the message has every token redacted
    /// (a parse error quotes the offending line).
    #[error("configuration: {0}")]
    Unparsable(String),
}

fn invalid(key: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        problem: problem.into(),
    }
}

/// Everything the daemon and the CLI need, validated.
#[derive(Debug, Clone)]
pub struct Settings {
    pub database: DatabaseSettings,
    pub mews: MewsSettings,
    /// Accounts by name; a row's `account` column picks one.
    pub accounts: BTreeMap<String, Account>,
    pub delivery: DeliverySettings,
    pub retry: RetrySettings,
    pub log: LogSettings,
    pub alert: AlertSettings,
    pub retention: RetentionSettings,
}

/// The configuration the CLI reads when given none (`--config`,
/// `MEWS_OUTBOX_CONFIG`) and this file exists: the package's, which the unit
/// passes to the daemon.
pub const SYSTEM_CONFIG_FILE: &str = "/etc/mews-outbox/mews-outbox.toml";

/// The database file name under systemd's `StateDirectory=`.
pub const STATE_DIRECTORY_DATABASE: &str = "outbox.db";

#[derive(Debug, Clone)]
pub struct DatabaseSettings {
    /// SQLite file holding the `outbox` table; created when missing. When
    /// not configured: `$STATE_DIRECTORY/outbox.db` under systemd, else
    /// `outbox.db` in the working directory. Not used when
    /// [`DatabaseSettings::postgres`] is set.
    pub path: PathBuf,
    /// How long a writer waits for a lock held by another connection (SQLite).
    pub busy_timeout: Duration,
    /// Set when `database.url` names a PostgreSQL database: the daemon
    /// uses it (shared with other daemons) instead of the SQLite `path`.
    pub postgres: Option<PostgresSettings>,
}

/// Where the outbox is, as the daemon opens it.
#[derive(Debug, Clone, Copy)]
pub enum DatabaseTarget<'a> {
    Sqlite {
        path: &'a Path,
        busy_timeout: Duration,
    },
    Postgres(&'a PostgresSettings),
}

impl DatabaseSettings {
    /// Which store the settings select: PostgreSQL when `database.url` is
    /// set, else the SQLite file.
    pub fn target(&self) -> DatabaseTarget<'_> {
        match &self.postgres {
            Some(postgres) => DatabaseTarget::Postgres(postgres),
            None => DatabaseTarget::Sqlite {
                path: &self.path,
                busy_timeout: self.busy_timeout,
            },
        }
    }
}

/// Shortest `database.lease`: renewed every third of it, a lease shorter
/// than this would be renewed more than once a second by every daemon.
pub const MIN_LEASE: Duration = Duration::from_secs(3);

/// A shared PostgreSQL outbox (`database.url`).
#[derive(Clone)]
pub struct PostgresSettings {
    /// The connection URL, with the password when one was given (in the URL,
    /// `database.password_file` or the `mews-outbox.database_password` credential).
    /// Never shown: [`PostgresSettings::redacted_url`] is.
    pub url: SecretString,
    /// How long an account lease lasts unless renewed.
    pub lease: Duration,
    /// How long connecting (and waiting for a pooled connection) may take.
    pub connect_timeout: Duration,
}

impl PostgresSettings {
    /// The URL with its password replaced, for logs and `check-config`.
    pub fn redacted_url(&self) -> String {
        crate::store::postgres::redact_url(self.url.expose_secret())
    }

    /// How often a daemon renews its leases: a third of the lease, so two
    /// renewals may fail before the lease runs out.
    pub fn renew_every(&self) -> Duration {
        self.lease / 3
    }
}

impl std::fmt::Debug for PostgresSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresSettings")
            .field("url", &self.redacted_url())
            .field("lease", &self.lease)
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDatabase {
    path: Option<PathBuf>,
    /// How long a writer waits for a lock held by another connection.
    #[serde(with = "humantime_serde")]
    pub busy_timeout: Duration,
    /// `postgres://user@host/db`: a shared PostgreSQL outbox instead of `path`.
    url: Option<SecretString>,
    password_file: Option<PathBuf>,
    #[serde(with = "humantime_serde")]
    lease: Duration,
    #[serde(with = "humantime_serde")]
    connect_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct MewsSettings {
    pub base_url: Url,
    pub client_token: SecretString,
    /// `Client` field of each request: name and version.
    pub client: String,
    pub request_timeout: Duration,
    /// Accept token files (and a configuration file holding a token) that
    /// every user can read.
    pub allow_world_readable_token_files: bool,
}

impl MewsSettings {
    /// True when talking to the public demo environment with its public tokens.
    pub fn is_public_demo(&self) -> bool {
        is_demo_url(&self.base_url) && self.client_token.expose_secret() == DEMO_CLIENT_TOKEN
    }
}

/// One connected property: its AccessToken and how fast it may send.
#[derive(Debug, Clone)]
pub struct Account {
    pub access_token: SecretString,
    /// Client-side limit on this account's requests (`messages/add` and
    /// `messages/getAll` alike).
    pub rate_limit: RateLimit,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliverySettings {
    /// Messages per request, 1..=1000.
    pub batch_size: usize,
    /// Largest `messages/add` body, in bytes (JSON as sent): bounds the
    /// rows a claim loads and the memory a batch takes.
    pub max_request_bytes: usize,
    /// How often the daemon looks for rows committed by producers when it
    /// cannot watch the WAL file (otherwise writes to it wake the daemon).
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Requests in flight at once, across accounts.
    pub max_concurrent_requests: usize,
    /// On SIGTERM, how long to wait for requests in flight before exiting.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Read back (messages/getAll) rows whose last send had an ambiguous
    /// outcome before sending them again.
    pub reconcile: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrySettings {
    /// Delay before the first retry of a row; doubles with each attempt.
    #[serde(with = "humantime_serde")]
    pub base_delay: Duration,
    /// Cap on the delay between two attempts of a row.
    #[serde(with = "humantime_serde")]
    pub max_delay: Duration,
    /// Attempts after which a row becomes `dead`.
    pub max_attempts: u32,
    /// First pause of an account after a 429 without Retry-After, 401 or 404.
    #[serde(with = "humantime_serde")]
    pub pause_base: Duration,
    /// Cap on an account's pause.
    #[serde(with = "humantime_serde")]
    pub pause_max: Duration,
    /// Failed requests in a row (5xx, 408, timeouts, connection errors) after
    /// which the account pauses as a whole (circuit breaker).
    pub breaker_failures: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    /// tracing filter, e.g. `info` or `mews_outbox=debug`; `RUST_LOG` wins.
    pub level: String,
    pub format: LogFormat,
    /// Interval of the heartbeat line (queue counts and ages); 0 turns it off.
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// journald when stderr is connected to the journal, else text.
    Auto,
    /// Human text; colour only on a terminal.
    Text,
    /// One JSON object a line.
    Json,
    /// Native journald entries with structured fields.
    Journald,
}

/// Conditions worth a warning in the log.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertSettings {
    /// Warn when the oldest pending row is older than this; 0 turns it off.
    #[serde(with = "humantime_serde")]
    pub max_pending_age: Duration,
}

/// How long rows are kept.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionSettings {
    /// Delivered rows are deleted this long after delivery; 0 keeps them forever.
    #[serde(with = "humantime_serde")]
    pub delivered: Duration,
}

/// The shape of the layered sources before validation.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    database: RawDatabase,
    mews: RawMews,
    #[serde(default)]
    accounts: BTreeMap<String, RawAccount>,
    delivery: DeliverySettings,
    retry: RetrySettings,
    log: LogSettings,
    alert: AlertSettings,
    retention: RetentionSettings,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMews {
    base_url: String,
    client_token: Option<SecretString>,
    client_token_file: Option<PathBuf>,
    client: Option<String>,
    #[serde(with = "humantime_serde")]
    request_timeout: Duration,
    allow_world_readable_token_files: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAccount {
    access_token: Option<SecretString>,
    access_token_file: Option<PathBuf>,
    rate_limit: Option<String>,
}

/// Where settings come from; tests pass their own environment.
#[derive(Debug, Default, Clone)]
pub struct Sources {
    pub file: Option<PathBuf>,
    /// `None` reads the process environment.
    pub env: Option<BTreeMap<String, String>>,
}

impl Sources {
    /// A variable of the environment the settings are loaded from.
    fn var(&self, name: &str) -> Option<String> {
        match &self.env {
            Some(env) => env.get(name).cloned(),
            None => std::env::var(name).ok(),
        }
        .filter(|v| !v.is_empty())
    }

    /// Values given in the file or the environment, for redacting error
    /// messages that might quote them: of every key, not only the token
    /// keys, since a token may be pasted into any of them. Longest first,
    /// so a value is replaced before a part of it.
    fn values(&self) -> Vec<String> {
        let mut values = self
            .file
            .as_ref()
            .and_then(|f| std::fs::read_to_string(f).ok())
            .map(|text| secrets::all_values_in_toml(&text))
            .unwrap_or_default();
        let env: Vec<(String, String)> = match &self.env {
            Some(env) => env.clone().into_iter().collect(),
            None => std::env::vars().collect(),
        };
        values.extend(
            env.into_iter()
                // The overrides, not MEWS_OUTBOX_CONFIG (a path worth showing).
                .filter(|(k, _)| k.starts_with(&format!("{ENV_PREFIX}__")))
                .map(|(_, v)| v),
        );
        values.sort_by_key(|v| std::cmp::Reverse(v.len()));
        values
    }
}

impl Settings {
    /// Loads defaults, the file and the environment, then validates.
    pub fn load(sources: &Sources) -> Result<Settings, ConfigError> {
        let mut builder = config::Config::builder()
            .add_source(config::File::from_str(DEFAULTS, config::FileFormat::Toml));
        if let Some(file) = &sources.file {
            // The config crate reports any unreadable file as "not found".
            if let Err(e) = std::fs::File::open(file) {
                return Err(ConfigError::Unparsable(format!(
                    "cannot read the configuration file {}: {e}",
                    file.display()
                )));
            }
            builder = builder.add_source(
                config::File::from(file.as_path())
                    .format(config::FileFormat::Toml)
                    .required(true),
            );
        }
        let env = config::Environment::with_prefix(ENV_PREFIX)
            .prefix_separator("__")
            .separator("__")
            .try_parsing(true)
            .source(sources.env.clone().map(|m| m.into_iter().collect()));
        let raw: Raw = builder
            .add_source(env)
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| {
                // Beyond what the description leaves out, any value that a
                // message quotes in a way not foreseen here.
                let values = sources.values();
                let values: Vec<&str> = values.iter().map(String::as_str).collect();
                let described = describe_load_error(&e, sources.file.as_deref());
                ConfigError::Unparsable(secrets::redact(&described, &values))
            })?;
        let allow_world_readable = raw.mews.allow_world_readable_token_files;
        if let Some(file) = &sources.file
            && file_holds_a_token(file)
        {
            secrets::check_config_file(file, allow_world_readable)?;
        }
        Self::validate(raw, sources)
    }

    /// Checks the sections one after the other and builds the settings;
    /// the first problem found is the one reported. `[alert]` and
    /// `[retention]` take any duration (0 turns each off): nothing to
    /// check there.
    fn validate(raw: Raw, sources: &Sources) -> Result<Settings, ConfigError> {
        let credentials = sources.var("CREDENTIALS_DIRECTORY");
        let tokens = TokenSources {
            credentials_directory: credentials.as_deref(),
            allow_world_readable: raw.mews.allow_world_readable_token_files,
        };
        let mews = validate_mews(raw.mews, &tokens)?;
        let accounts = validate_accounts(raw.accounts, is_demo_url(&mews.base_url), &tokens)?;
        validate_delivery(&raw.delivery)?;
        validate_retry(&raw.retry)?;
        validate_log(&raw.log)?;
        let database = validate_database(raw.database, sources, &tokens)?;
        Ok(Settings {
            database,
            mews,
            accounts,
            delivery: raw.delivery,
            retry: raw.retry,
            log: raw.log,
            alert: raw.alert,
            retention: raw.retention,
        })
    }
}

/// The effective configuration as TOML, every token shown as `<redacted>`.
impl std::fmt::Display for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let d = |d: Duration| humantime::format_duration(d).to_string();
        writeln!(f, "[database]")?;
        match &self.database.postgres {
            Some(pg) => {
                writeln!(f, "url = {:?}", pg.redacted_url())?;
                writeln!(f, "lease = {:?}", d(pg.lease))?;
                writeln!(f, "connect_timeout = {:?}", d(pg.connect_timeout))?;
            }
            None => {
                writeln!(f, "path = {:?}", self.database.path.display().to_string())?;
            }
        }
        writeln!(f, "busy_timeout = {:?}", d(self.database.busy_timeout))?;
        writeln!(f, "\n[mews]")?;
        writeln!(f, "base_url = {:?}", self.mews.base_url.as_str())?;
        writeln!(f, "client_token = \"<redacted>\"")?;
        writeln!(f, "client = {:?}", self.mews.client)?;
        writeln!(f, "request_timeout = {:?}", d(self.mews.request_timeout))?;
        writeln!(
            f,
            "allow_world_readable_token_files = {}",
            self.mews.allow_world_readable_token_files
        )?;
        for (name, account) in &self.accounts {
            writeln!(f, "\n[accounts.{name}]\naccess_token = \"<redacted>\"")?;
            writeln!(f, "rate_limit = \"{}\"", account.rate_limit)?;
        }
        let x = &self.delivery;
        writeln!(f, "\n[delivery]\nbatch_size = {}", x.batch_size)?;
        writeln!(f, "max_request_bytes = {}", x.max_request_bytes)?;
        writeln!(f, "poll_interval = {:?}", d(x.poll_interval))?;
        writeln!(f, "max_concurrent_requests = {}", x.max_concurrent_requests)?;
        writeln!(f, "drain_timeout = {:?}", d(x.drain_timeout))?;
        writeln!(f, "reconcile = {}", x.reconcile)?;
        let r = &self.retry;
        writeln!(f, "\n[retry]\nbase_delay = {:?}", d(r.base_delay))?;
        writeln!(f, "max_delay = {:?}", d(r.max_delay))?;
        writeln!(f, "max_attempts = {}", r.max_attempts)?;
        writeln!(f, "pause_base = {:?}", d(r.pause_base))?;
        writeln!(f, "pause_max = {:?}", d(r.pause_max))?;
        writeln!(f, "breaker_failures = {}", r.breaker_failures)?;
        writeln!(f, "\n[log]\nlevel = {:?}", self.log.level)?;
        writeln!(
            f,
            "format = {:?}",
            format!("{:?}", self.log.format).to_lowercase()
        )?;
        writeln!(f, "heartbeat = {:?}", d(self.log.heartbeat))?;
        writeln!(
            f,
            "\n[alert]\nmax_pending_age = {:?}",
            d(self.alert.max_pending_age)
        )?;
        write!(
            f,
            "\n[retention]\ndelivered = {:?}",
            d(self.retention.delivered)
        )
    }
}

/// `$STATE_DIRECTORY/outbox.db` under systemd (the first directory when
/// several are listed), else `outbox.db` in the working directory.
fn default_database_path(state_directory: Option<&str>) -> PathBuf {
    match state_directory.and_then(|dirs| dirs.split(':').next()) {
        Some(dir) if !dir.is_empty() => Path::new(dir).join(STATE_DIRECTORY_DATABASE),
        _ => PathBuf::from(STATE_DIRECTORY_DATABASE),
    }
}

/// Whether the file sets a token inline (not through `*_file`); such a file
/// must be as private as a token file.
fn file_holds_a_token(file: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(file) else {
        return false;
    };
    let Ok(parsed) = config::Config::builder()
        .add_source(config::File::from_str(&text, config::FileFormat::Toml))
        .build()
    else {
        return false;
    };
    if parsed.get_string("mews.client_token").is_ok() {
        return true;
    }
    if let Ok(url) = parsed.get_string("database.url")
        && Url::parse(&url).is_ok_and(|u| {
            u.password().is_some()
                || u.query_pairs()
                    .any(|(k, _)| k.eq_ignore_ascii_case("password"))
        })
    {
        return true;
    }
    parsed
        .get_table("accounts")
        .map(|accounts| {
            accounts.keys().any(|name| {
                parsed
                    .get_string(&format!("accounts.{name}.access_token"))
                    .is_ok()
            })
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests;
