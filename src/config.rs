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

/// The embedded defaults, layered first.
const DEFAULTS: &str = include_str!("defaults.toml");

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
    /// `database.password_file` or the `database-password` credential).
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

/// `[mews]`: where to send, the ClientToken (the public one for the demo
/// environment when none is given), the `Client` name, the timeout.
fn validate_mews(raw: RawMews, tokens: &TokenSources) -> Result<MewsSettings, ConfigError> {
    let base_url = validate_base_url(&raw.base_url)?;
    let client_token = tokens.client_token(
        raw.client_token,
        raw.client_token_file,
        is_demo_url(&base_url),
    )?;
    let client = raw
        .client
        .unwrap_or_else(|| format!("mews-outbox {}", env!("CARGO_PKG_VERSION")));
    if client.trim().is_empty() {
        return Err(invalid("mews.client", "must not be empty"));
    }
    if raw.request_timeout.is_zero() {
        return Err(invalid("mews.request_timeout", "must be greater than 0"));
    }
    Ok(MewsSettings {
        base_url,
        client_token,
        client,
        request_timeout: raw.request_timeout,
        allow_world_readable_token_files: raw.allow_world_readable_token_files,
    })
}

/// `mews.base_url`: an http(s) URL with a host, https unless the host is
/// this machine, without credentials. The value is never shown: it may be a
/// token pasted into the wrong key.
fn validate_base_url(text: &str) -> Result<Url, ConfigError> {
    let base_url = Url::parse(text.trim())
        .ok()
        .filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
        .ok_or_else(|| {
            invalid(
                "mews.base_url",
                format!(
                    "must be an http(s) URL such as {DEMO_BASE_URL} (the value given is not shown)"
                ),
            )
        })?;
    if base_url.scheme() == "http" && !is_loopback(&base_url) {
        return Err(invalid(
            "mews.base_url",
            "uses plain http:// to a host other than this machine: the tokens in every request would travel in clear; \
             use https:// (http:// is accepted only for a loopback address: 127.0.0.0/8, [::1], localhost, e.g. a local proxy)",
        ));
    }
    // reqwest would send them as Basic auth to whoever answers, and the
    // URL is shown in logs and by check-config.
    if !base_url.username().is_empty() || base_url.password().is_some() {
        return Err(invalid(
            "mews.base_url",
            "must not carry a user name or password (user:password@): Mews takes tokens in the request body, set them in mews.client_token and accounts.<name>.access_token",
        ));
    }
    Ok(base_url)
}

/// Whether the URL is the public demo environment's.
fn is_demo_url(url: &Url) -> bool {
    url.as_str().trim_end_matches('/') == DEMO_BASE_URL
}

/// `[accounts.<name>]`, each in turn; none is allowed only against the
/// demo environment, which then gets a `default` account with the public
/// AccessToken.
fn validate_accounts(
    raw: BTreeMap<String, RawAccount>,
    is_demo_url: bool,
    tokens: &TokenSources,
) -> Result<BTreeMap<String, Account>, ConfigError> {
    let mut accounts = BTreeMap::new();
    for (name, account) in raw {
        let account = validate_account(&name, account, tokens)?;
        accounts.insert(name, account);
    }
    if accounts.is_empty() {
        if !is_demo_url {
            return Err(invalid(
                "accounts",
                "needs at least one [accounts.<name>] with an access_token",
            ));
        }
        accounts.insert(
            "default".to_owned(),
            Account {
                access_token: SecretString::from(DEMO_ACCESS_TOKEN),
                rate_limit: DEFAULT_RATE_LIMIT,
            },
        );
    }
    Ok(accounts)
}

/// One `[accounts.<name>]`: its AccessToken (required) and rate limit.
fn validate_account(
    name: &str,
    raw: RawAccount,
    tokens: &TokenSources,
) -> Result<Account, ConfigError> {
    let access_token = tokens.access_token(name, raw.access_token, raw.access_token_file)?;
    let rate_limit = match raw.rate_limit {
        None => DEFAULT_RATE_LIMIT,
        // The parser quotes what it got: not a token pasted here.
        Some(text) => text.parse().map_err(|problem: String| {
            invalid(
                format!("accounts.{name}.rate_limit"),
                secrets::redact(&problem, &[&text]),
            )
        })?,
    };
    Ok(Account {
        access_token,
        rate_limit,
    })
}

/// `[delivery]`: sizes within Mews's and our bounds, intervals above 0.
fn validate_delivery(d: &DeliverySettings) -> Result<(), ConfigError> {
    if !(1..=MAX_BATCH_SIZE).contains(&d.batch_size) {
        return Err(invalid(
            "delivery.batch_size",
            format!(
                "must be between 1 and {MAX_BATCH_SIZE} (Mews's limit per request), got {}",
                d.batch_size
            ),
        ));
    }
    if !MAX_REQUEST_BYTES_RANGE.contains(&d.max_request_bytes) {
        return Err(invalid(
            "delivery.max_request_bytes",
            format!(
                "must be between {} and {}, got {}",
                MAX_REQUEST_BYTES_RANGE.start(),
                MAX_REQUEST_BYTES_RANGE.end(),
                d.max_request_bytes
            ),
        ));
    }
    if d.poll_interval.is_zero() {
        return Err(invalid("delivery.poll_interval", "must be greater than 0"));
    }
    if d.max_concurrent_requests == 0 {
        return Err(invalid(
            "delivery.max_concurrent_requests",
            "must be at least 1",
        ));
    }
    Ok(())
}

/// `[retry]`: at least one attempt and one failure, each base delay
/// within its cap.
fn validate_retry(r: &RetrySettings) -> Result<(), ConfigError> {
    if r.max_attempts == 0 {
        return Err(invalid("retry.max_attempts", "must be at least 1"));
    }
    if r.base_delay.is_zero() || r.base_delay > r.max_delay {
        return Err(invalid(
            "retry.base_delay",
            "must be greater than 0 and at most retry.max_delay",
        ));
    }
    if r.breaker_failures == 0 {
        return Err(invalid("retry.breaker_failures", "must be at least 1"));
    }
    if r.pause_base.is_zero() || r.pause_base > r.pause_max {
        return Err(invalid(
            "retry.pause_base",
            "must be greater than 0 and at most retry.pause_max",
        ));
    }
    Ok(())
}

/// `[log]`: the level must be a tracing filter (the format is checked
/// when it is read).
fn validate_log(log: &LogSettings) -> Result<(), ConfigError> {
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&log.level) {
        return Err(invalid(
            "log.level",
            secrets::redact(
                &format!("is not a log filter such as \"info\" or \"mews_outbox=debug,warn\": {e}"),
                &[&log.level],
            ),
        ));
    }
    Ok(())
}

/// `[database]`: PostgreSQL when `url` is given (with its password from the
/// URL, `password_file` or the `database-password` credential), else the
/// SQLite file at `path` (by default under systemd's state directory or the
/// working directory); not both.
fn validate_database(
    raw: RawDatabase,
    sources: &Sources,
    tokens: &TokenSources,
) -> Result<DatabaseSettings, ConfigError> {
    let postgres = match raw.url {
        Some(url) => {
            if raw.path.is_some() {
                return Err(invalid(
                    "database.url",
                    "and `database.path` are both set: keep one (`url` selects a PostgreSQL \
                     database, `path` an SQLite file)",
                ));
            }
            Some(validate_postgres(
                url,
                raw.password_file,
                raw.lease,
                raw.connect_timeout,
                tokens,
            )?)
        }
        None => {
            if raw.password_file.is_some() {
                return Err(invalid(
                    "database.password_file",
                    "is set but `database.url` is not: a password is only for a PostgreSQL database",
                ));
            }
            None
        }
    };
    let path = match raw.path {
        Some(path) if path.as_os_str().is_empty() => {
            return Err(invalid("database.path", "must not be empty"));
        }
        Some(path) => path,
        None => default_database_path(sources.var("STATE_DIRECTORY").as_deref()),
    };
    Ok(DatabaseSettings {
        path,
        busy_timeout: raw.busy_timeout,
        postgres,
    })
}

/// `database.url` and its companions. No message quotes the URL.
fn validate_postgres(
    url: SecretString,
    password_file: Option<PathBuf>,
    lease: Duration,
    connect_timeout: Duration,
    tokens: &TokenSources,
) -> Result<PostgresSettings, ConfigError> {
    let text = url.expose_secret();
    if text.trim().is_empty() {
        return Err(invalid("database.url", "must not be empty"));
    }
    let not_postgres = || {
        invalid(
            "database.url",
            "is not a PostgreSQL URL (postgres://user@host/database or postgresql://...)",
        )
    };
    let mut parsed = Url::parse(text).map_err(|_| not_postgres())?;
    if !matches!(parsed.scheme(), "postgres" | "postgresql") {
        return Err(not_postgres());
    }
    let has_password = parsed.password().is_some()
        || parsed
            .query_pairs()
            .any(|(k, _)| k.eq_ignore_ascii_case("password"));
    if let Some(password) = tokens.database_password(has_password, password_file)? {
        // In the user info when the URL has a host, else as `?password=`
        // (a Unix socket URL: `postgres:///db?host=/run/postgresql&user=u`).
        if parsed.set_password(Some(password.expose_secret())).is_err()
            || parsed.password().is_none()
        {
            parsed
                .query_pairs_mut()
                .append_pair("password", password.expose_secret());
        }
    }
    if lease < MIN_LEASE {
        return Err(invalid(
            "database.lease",
            format!(
                "must be at least {} (a daemon renews its leases every third of it, \
                 and loses its accounts to the other daemons when it misses a lease)",
                humantime::format_duration(MIN_LEASE)
            ),
        ));
    }
    if connect_timeout.is_zero() {
        return Err(invalid("database.connect_timeout", "must be more than 0"));
    }
    Ok(PostgresSettings {
        url: SecretString::from(String::from(parsed)),
        lease,
        connect_timeout,
    })
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

/// Whether the URL's host is this machine: only then may tokens go over
/// plain http (to the fake Mews, or a local TLS-terminating proxy).
fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(name)) => name.eq_ignore_ascii_case("localhost"),
        None => false,
    }
}

/// A loading error in words that name the key and what was expected, never
/// the value: a token pasted into the wrong key must reach neither a
/// terminal nor the journal. The config crate's own messages quote the value
/// (`invalid type: string "…"`), TOML's quote the offending line.
fn describe_load_error(e: &config::ConfigError, file: Option<&Path>) -> String {
    use config::ConfigError as E;
    let origin = |origin: &Option<String>| match origin {
        Some(origin) => format!(" (in {origin})"),
        None => String::new(),
    };
    match e {
        E::Type {
            origin: from,
            unexpected,
            expected,
            key,
        } => {
            // "string \"…\"", "64-bit integer `5`", "map": the kind only.
            let shown = unexpected.to_string();
            let kind = shown.split(['"', '`']).next().unwrap_or_default().trim();
            format!(
                "`{}` must be {}, not a {kind}{}",
                key.as_deref().unwrap_or("?"),
                expected_words(expected),
                origin(from)
            )
        }
        E::At {
            error,
            origin: from,
            key,
        } => {
            let inner = match &**error {
                E::Message(message) => without_values(message),
                other => describe_load_error(other, file),
            };
            match key {
                Some(key) => format!("`{key}`: {inner}{}", origin(from)),
                None => format!("{inner}{}", origin(from)),
            }
        }
        E::NotFound(key) => format!("`{key}` is missing"),
        E::FileParse { uri, cause } => {
            let place = uri
                .as_deref()
                .map(|u| format!(" in {u}"))
                .unwrap_or_default();
            format!("{}{place}", describe_toml_error(&cause.to_string(), file))
        }
        other => without_values(&other.to_string()),
    }
}

/// serde's name for a table is the Rust type (`struct RawAccount`).
fn expected_words(expected: &str) -> &str {
    if expected.starts_with("struct ") || expected == "a map" {
        "a table of settings"
    } else {
        expected
    }
}

/// A serde message without the values it quotes: `string "…"` (Debug
/// quoting) and the variant in "unknown variant `…`". Field names, which are
/// keys, stay.
fn without_values(message: &str) -> String {
    const UNKNOWN_VARIANT: &str = "unknown variant `";
    // The config crate's own wording, the value unquoted up to the end.
    const NO_VARIANT: &str = "does not have variant constructor ";
    let mut message = message.to_owned();
    if let Some(start) = message.find(NO_VARIANT) {
        // "enum LogFormat does not have variant constructor <value>"
        let start = message[..start].rfind("enum ").unwrap_or(start);
        message.truncate(start);
        message.push_str("not one of the accepted values (README, Configuration)");
    }
    let mut message = message.replace("expected a map", "expected a table of settings");
    // serde names a table by its Rust type: "expected struct RawAccount".
    const STRUCT: &str = "expected struct ";
    if let Some(start) = message.find(STRUCT) {
        let name = start + STRUCT.len();
        let end = message[name..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(message.len(), |e| name + e);
        message.replace_range(start..end, "expected a table of settings");
    }
    if let Some(start) = message.find(UNKNOWN_VARIANT) {
        let value = start + UNKNOWN_VARIANT.len();
        let end = message[value..]
            .find('`')
            .map_or(message.len(), |e| value + e + 1);
        message.replace_range(start..end, "unknown value (not shown)");
    }
    let mut out = String::with_capacity(message.len());
    let mut chars = message.chars();
    while let Some(c) = chars.next() {
        if c != '"' {
            out.push(c);
            continue;
        }
        // Skip to the closing quote, over escapes.
        while let Some(c) = chars.next() {
            match c {
                '\\' => {
                    chars.next();
                }
                '"' => break,
                _ => {}
            }
        }
        out.push_str("(not shown)");
    }
    out
}

/// A TOML parse error without its snippet of the offending line (which may
/// hold a token, e.g. an unquoted one), naming the key of that line instead.
fn describe_toml_error(text: &str, file: Option<&Path>) -> String {
    let mut lines = text.lines();
    let head = lines.next().unwrap_or_default().trim().to_owned();
    // The snippet: "  |", "2 | key = value", "  |   ^^^".
    let message: Vec<&str> = lines
        .map(str::trim)
        .filter(|l| {
            !l.is_empty()
                && !l
                    .trim_start_matches(|c: char| c.is_ascii_digit())
                    .trim_start()
                    .starts_with('|')
        })
        .collect();
    let line_number = head
        .split("line ")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse::<usize>().ok());
    let text = file.and_then(|f| std::fs::read_to_string(f).ok());
    let mut key = None;
    let mut line_value = None;
    if let (Some(n), Some(text)) = (line_number, &text) {
        let mut section = String::new();
        for (i, line) in text.lines().enumerate() {
            let trimmed = line.trim();
            if trimmed.starts_with('[') && !trimmed.contains('=') {
                section = trimmed.trim_matches(['[', ']', ' ']).to_owned();
            }
            if i + 1 == n {
                if let Some((k, v)) = trimmed.split_once('=') {
                    let k = k.trim().trim_matches(['"', '\'']);
                    key = Some(if section.is_empty() {
                        k.to_owned()
                    } else {
                        format!("{section}.{k}")
                    });
                    line_value = Some(v.trim().to_owned());
                }
                break;
            }
        }
    }
    let message = message.join("; ");
    // Should the message itself quote the line's value, that goes too.
    let message = match &line_value {
        Some(v) => secrets::redact(&message, &[v, v.trim_matches(['"', '\''])]),
        None => message,
    };
    match key {
        Some(key) => format!("{head} (key `{key}`): {message}"),
        None => format!("{head}: {message}"),
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
mod tests {
    use super::*;

    fn load(file: Option<&str>, env: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        if let Some(text) = file {
            std::fs::write(&path, text).unwrap();
            // A file with a token must not be world-readable.
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        Settings::load(&Sources {
            file: file.map(|_| path.clone()),
            env: Some(
                env.iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
        })
    }

    fn error_of(file: Option<&str>, env: &[(&str, &str)]) -> String {
        load(file, env).unwrap_err().to_string()
    }

    #[test]
    fn embedded_defaults_run_against_the_public_demo() {
        let s = load(None, &[]).unwrap();
        assert!(s.mews.is_public_demo());
        assert_eq!(s.delivery.batch_size, 1000);
        assert_eq!(s.database.path, PathBuf::from("outbox.db"));
        assert_eq!(
            s.mews.client,
            format!("mews-outbox {}", env!("CARGO_PKG_VERSION"))
        );
        assert_eq!(
            s.accounts["default"].access_token.expose_secret(),
            DEMO_ACCESS_TOKEN
        );
    }

    #[test]
    fn environment_overrides_the_file() {
        let s = load(
            Some("[delivery]\nbatch_size = 10\npoll_interval = \"250ms\"\n"),
            &[("MEWS_OUTBOX__DELIVERY__BATCH_SIZE", "20")],
        )
        .unwrap();
        assert_eq!(s.delivery.batch_size, 20);
        assert_eq!(s.delivery.poll_interval, Duration::from_millis(250));
    }

    #[test]
    fn a_batch_size_out_of_range_is_refused_naming_the_key() {
        for size in ["0", "5000"] {
            let e = error_of(None, &[("MEWS_OUTBOX__DELIVERY__BATCH_SIZE", size)]);
            assert!(e.contains("delivery.batch_size"), "{e}");
            assert!(e.contains(size), "{e}");
        }
    }

    #[test]
    fn a_base_url_that_is_not_a_url_is_refused() {
        let e = error_of(Some("[mews]\nbase_url = \"not a url\"\n"), &[]);
        assert!(e.contains("mews.base_url"), "{e}");
    }

    #[test]
    fn plain_http_is_refused_unless_the_host_is_this_machine() {
        let with = |url: &str| {
            load(
                Some(&format!(
                    "[mews]\nbase_url = \"{url}\"\nclient_token = \"c-1\"\n[accounts.a]\naccess_token = \"a-1\"\n"
                )),
                &[],
            )
            .map(|s| s.mews.base_url.to_string())
            .map_err(|e| e.to_string())
        };
        for url in [
            "http://127.0.0.1:8088",
            "http://127.1.2.3",
            "http://[::1]:8088",
            "http://localhost:8088",
            "http://LOCALHOST",
            "https://api.mews.com",
            "https://10.0.0.1",
        ] {
            assert!(with(url).is_ok(), "{url}: {:?}", with(url));
        }
        for url in [
            "http://api.mews.com",
            "http://10.0.0.1:8088",
            "http://[::ffff:127.0.0.1]",
            "http://localhost.example.com",
            "http://0.0.0.0:8088",
        ] {
            let e = with(url).unwrap_err();
            assert!(
                e.contains("mews.base_url") && e.contains("in clear") && e.contains("https://"),
                "{url}: {e}"
            );
        }
        for url in ["ftp://api.mews.com", "file:///etc/passwd", "api.mews.com"] {
            let e = with(url).unwrap_err();
            assert!(
                e.contains("mews.base_url") && e.contains("http(s) URL"),
                "{url}: {e}"
            );
        }
        let e = with("https://user:SECRET-PW@api.mews.com").unwrap_err();
        assert!(
            e.contains("mews.base_url") && !e.contains("SECRET-PW"),
            "{e}"
        );
    }

    #[test]
    fn errors_about_any_key_name_it_and_not_the_value() {
        const T: &str = "SECRET-4B2D-TOKEN";
        for (file, key) in [
            (
                format!("[accounts]\ndefault = \"{T}\"\n"),
                "accounts.default",
            ),
            (
                format!("[accounts.a]\naccess_token = \"x1\"\nrate_limit = \"{T}\"\n"),
                "accounts.a.rate_limit",
            ),
            (
                format!("[delivery]\nbatch_size = \"{T}\"\n"),
                "delivery.batch_size",
            ),
            (format!("[log]\nformat = \"{T}\"\n"), "log.format"),
            (
                format!("[retry]\nbase_delay = \"{T}\"\n"),
                "retry.base_delay",
            ),
            (format!("[mews]\nbase_url = \"{T}\"\n"), "mews.base_url"),
            (
                format!("[mews]\nclient_token_file = \"{T}\"\n"),
                "mews.client_token_file",
            ),
            (
                format!("[delivery]\nreconcile = {T}\n"),
                "delivery.reconcile",
            ),
            (format!("[database]\nurl = \"{T}\"\n"), "database.url"),
            (
                format!("[database]\nurl = \"mysql://u:{T}@h/d\"\n"),
                "database.url",
            ),
            (
                format!("[database]\npassword_file = \"{T}\"\n"),
                "database.password_file",
            ),
            (
                format!(
                    "[database]\nurl = \"postgres://u@h/d\"\npassword_file = \"/nonexistent/{T}\"\n"
                ),
                "database.password_file",
            ),
            (format!("[database]\nlease = \"{T}\"\n"), "database.lease"),
            (
                format!("[database]\nconnect_timeout = \"{T}\"\n"),
                "database.connect_timeout",
            ),
        ] {
            let e = load(Some(&file), &[]).unwrap_err();
            for shown in [e.to_string(), format!("{e:?}")] {
                assert!(shown.contains(key), "{file:?}: {shown}");
                assert!(!shown.contains("4B2D"), "{file:?}: {shown}");
            }
        }
        let e = error_of(None, &[("MEWS_OUTBOX__ALERT__MAX_PENDING_AGE", T)]);
        assert!(
            e.contains("alert.max_pending_age") && !e.contains("4B2D"),
            "{e}"
        );
    }

    #[test]
    fn a_toml_error_names_the_key_of_its_line_not_the_line() {
        let text = "TOML parse error at line 3, column 14\n  |\n3 | rate_limit = SECRET-9\n  |              ^\nstring values must be quoted, expected literal string\n";
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            "[accounts.a]\naccess_token = \"x\"\nrate_limit = SECRET-9\n",
        )
        .unwrap();
        assert_eq!(
            describe_toml_error(text, Some(&file)),
            "TOML parse error at line 3, column 14 (key `accounts.a.rate_limit`): string values must be quoted, expected literal string"
        );
    }

    #[test]
    fn an_empty_token_is_refused() {
        let e = error_of(Some("[accounts.hotel]\naccess_token = \"  \"\n"), &[]);
        assert!(e.contains("accounts.hotel.access_token"), "{e}");
        assert!(e.contains("empty"), "{e}");
    }

    #[test]
    fn a_log_level_that_is_not_a_filter_is_refused() {
        let e = error_of(Some("[log]\nlevel = \"loud[\"\n"), &[]);
        assert!(e.contains("log.level"), "{e}");
    }

    #[test]
    fn an_unknown_key_is_refused_naming_it() {
        let e = error_of(Some("[delivery]\nbatch_sise = 10\n"), &[]);
        assert!(e.contains("batch_sise"), "{e}");
        let e = error_of(Some("[deliveryy]\nbatch_size = 10\n"), &[]);
        assert!(e.contains("deliveryy"), "{e}");
    }

    #[test]
    fn production_needs_its_own_client_token_and_accounts() {
        let e = error_of(Some("[mews]\nbase_url = \"https://api.mews.com\"\n"), &[]);
        assert!(e.contains("mews.client_token"), "{e}");
        let e = error_of(
            Some("[mews]\nbase_url = \"https://api.mews.com\"\nclient_token = \"c\"\n"),
            &[],
        );
        assert!(e.contains("accounts"), "{e}");
    }

    #[test]
    fn tokens_are_redacted_in_debug_output() {
        let s = load(
            Some("[mews]\nclient_token = \"CLIENT-SECRET-1\"\n[accounts.a]\naccess_token = \"ACCESS-SECRET-2\"\n"),
            &[],
        )
        .unwrap();
        for shown in [format!("{s:?}"), s.to_string()] {
            assert!(!shown.contains("CLIENT-SECRET-1"), "{shown}");
            assert!(!shown.contains("ACCESS-SECRET-2"), "{shown}");
        }
        assert!(!s.mews.is_public_demo());
    }

    #[test]
    fn an_account_rate_limit_is_read_defaulted_or_refused_naming_the_key() {
        let s = load(
            Some("[accounts.a]\naccess_token = \"x\"\nrate_limit = \"20/3s\"\n[accounts.b]\naccess_token = \"y\"\n[accounts.c]\naccess_token = \"z\"\nrate_limit = \"off\"\n"),
            &[],
        )
        .unwrap();
        assert_eq!(
            s.accounts["a"].rate_limit,
            RateLimit::Window {
                requests: 20,
                per: Duration::from_secs(3)
            }
        );
        assert_eq!(s.accounts["b"].rate_limit, DEFAULT_RATE_LIMIT);
        assert_eq!(s.accounts["c"].rate_limit, RateLimit::Off);
        let e = error_of(
            Some("[accounts.a]\naccess_token = \"x\"\nrate_limit = \"fast\"\n"),
            &[],
        );
        assert!(
            e.contains("accounts.a.rate_limit") && e.contains("200/30s"),
            "{e}"
        );
        let e = error_of(None, &[("MEWS_OUTBOX__RETRY__BREAKER_FAILURES", "0")]);
        assert!(e.contains("retry.breaker_failures"), "{e}");
    }

    #[test]
    fn tokens_can_come_from_files() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "FROM-FILE\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o640)).unwrap();
        let s = load(
            Some(&format!(
                "[accounts.a]\naccess_token_file = {:?}\n",
                token.display().to_string()
            )),
            &[],
        )
        .unwrap();
        assert_eq!(s.accounts["a"].access_token.expose_secret(), "FROM-FILE");
    }

    #[test]
    fn a_missing_token_file_is_one_chain_naming_its_cause_once() {
        let e = load(
            Some("[accounts.a]\naccess_token_file = \"/nonexistent/mews-outbox-token\"\n"),
            &[],
        )
        .unwrap_err();
        let chain = format!("{:#}", anyhow::Error::new(e));
        assert_eq!(
            chain.matches("No such file or directory").count(),
            1,
            "{chain}"
        );
        assert_eq!(chain.matches("configuration").count(), 1, "{chain}");
        assert!(chain.contains("accounts.a.access_token_file"), "{chain}");
    }

    #[test]
    fn under_systemd_the_database_defaults_to_the_state_directory() {
        let s = load(None, &[("STATE_DIRECTORY", "/var/lib/mews-outbox")]).unwrap();
        assert_eq!(
            s.database.path,
            PathBuf::from("/var/lib/mews-outbox/outbox.db")
        );
        let s = load(
            Some("[database]\npath = \"/srv/o.db\"\n"),
            &[("STATE_DIRECTORY", "/var/lib/mews-outbox")],
        )
        .unwrap();
        assert_eq!(s.database.path, PathBuf::from("/srv/o.db"), "explicit wins");
    }

    fn write_private(path: &Path, text: &str) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(path, text).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o400)).unwrap();
    }

    #[test]
    fn a_database_url_selects_postgresql_with_its_lease() {
        let s = load(None, &[]).unwrap();
        assert!(s.database.postgres.is_none());
        assert!(matches!(s.database.target(), DatabaseTarget::Sqlite { .. }));
        let from_file = load(
            Some("[database]\nurl = \"postgres://outbox:PW-SECRET-1@db.example/outbox\"\n"),
            &[],
        )
        .unwrap();
        let from_env = load(
            None,
            &[(
                "MEWS_OUTBOX__DATABASE__URL",
                "postgres://outbox:PW-SECRET-1@db.example/outbox",
            )],
        )
        .unwrap();
        for s in [&from_file, &from_env] {
            let DatabaseTarget::Postgres(pg) = s.database.target() else {
                panic!("{s:?}");
            };
            assert_eq!(
                pg.url.expose_secret(),
                "postgres://outbox:PW-SECRET-1@db.example/outbox"
            );
            assert_eq!(pg.lease, Duration::from_secs(30));
            assert_eq!(pg.renew_every(), Duration::from_secs(10));
            assert_eq!(pg.connect_timeout, Duration::from_secs(10));
            for shown in [format!("{s:?}"), s.to_string(), format!("{pg:?}")] {
                assert!(!shown.contains("PW-SECRET-1"), "{shown}");
                assert!(shown.contains("db.example/outbox"), "{shown}");
            }
        }
        // What check-config prints loads back (the password aside).
        let shown = from_file.to_string();
        assert!(shown.contains("lease = \"30s\""), "{shown}");
        let reloaded = load(Some(&shown), &[]).unwrap();
        assert_eq!(reloaded.to_string(), shown);
        let s = load(
            Some("[database]\nurl = \"postgresql:///outbox?host=/run/postgresql&user=u\"\nlease = \"1m\"\nconnect_timeout = \"3s\"\n"),
            &[],
        )
        .unwrap();
        let pg = s.database.postgres.unwrap();
        assert_eq!(
            (pg.lease, pg.connect_timeout),
            (Duration::from_secs(60), Duration::from_secs(3))
        );
    }

    #[test]
    fn a_database_url_and_path_together_are_refused_naming_both_keys() {
        let e = error_of(
            Some("[database]\npath = \"/srv/o.db\"\nurl = \"postgres://u:PW-2@h/d\"\n"),
            &[],
        );
        assert!(
            e.contains("`database.url`") && e.contains("`database.path`") && e.contains("keep one"),
            "{e}"
        );
        assert!(!e.contains("PW-2"), "{e}");
        let e = error_of(
            Some("[database]\npath = \"/srv/o.db\"\n"),
            &[("MEWS_OUTBOX__DATABASE__URL", "postgres://u@h/d")],
        );
        assert!(
            e.contains("`database.url`") && e.contains("`database.path`"),
            "{e}"
        );
    }

    #[test]
    fn a_database_url_must_be_a_postgresql_url() {
        for url in [
            "",
            "not a url",
            "mysql://u:PW-3@h/d",
            "https://h/d",
            "/var/lib/o.db",
        ] {
            let e = error_of(Some(&format!("[database]\nurl = {url:?}\n")), &[]);
            assert!(e.contains("database.url"), "{url}: {e}");
            assert!(!e.contains("PW-3"), "{url}: {e}");
        }
    }

    #[test]
    fn the_database_password_comes_from_the_url_a_file_or_a_credential_but_one_only() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        write_private(&file, "PW-FILE-4\n");
        let creds = tempfile::tempdir().unwrap();
        write_private(&creds.path().join("database-password"), "PW-CRED-5");
        let creds = creds.path().to_str().unwrap();
        let url_of = |s: Settings| s.database.postgres.unwrap().url.expose_secret().to_owned();

        let with_file = format!(
            "[database]\nurl = \"postgres://outbox@db/outbox\"\npassword_file = {:?}\n",
            file.display().to_string()
        );
        assert_eq!(
            url_of(load(Some(&with_file), &[]).unwrap()),
            "postgres://outbox:PW-FILE-4@db/outbox"
        );
        let plain = "[database]\nurl = \"postgres://outbox@db/outbox\"\n";
        assert_eq!(
            url_of(load(Some(plain), &[("CREDENTIALS_DIRECTORY", creds)]).unwrap()),
            "postgres://outbox:PW-CRED-5@db/outbox"
        );
        // A socket URL takes it as `?password=`.
        let socket = "[database]\nurl = \"postgres:///outbox?host=/run/postgresql\"\n";
        let url = url_of(load(Some(socket), &[("CREDENTIALS_DIRECTORY", creds)]).unwrap());
        assert!(url.ends_with("password=PW-CRED-5"), "{url}");
        // No password at all (peer authentication) is fine.
        assert_eq!(
            url_of(load(Some(plain), &[]).unwrap()),
            "postgres://outbox@db/outbox"
        );

        let refused = [
            error_of(Some(&with_file), &[("CREDENTIALS_DIRECTORY", creds)]),
            error_of(
                Some(&with_file.replace("outbox@db", "outbox:PW-URL-6@db")),
                &[],
            ),
            error_of(
                Some("[database]\nurl = \"postgres://outbox:PW-URL-6@db/outbox\"\n"),
                &[("CREDENTIALS_DIRECTORY", creds)],
            ),
            error_of(
                Some("[database]\nurl = \"postgres://outbox@db/outbox?password=PW-URL-6\"\n"),
                &[("CREDENTIALS_DIRECTORY", creds)],
            ),
        ];
        for e in &refused {
            assert!(e.contains("keep one") && e.contains("database"), "{e}");
            for secret in ["PW-FILE-4", "PW-CRED-5", "PW-URL-6"] {
                assert!(!e.contains(secret), "{e}");
            }
        }
        let e = error_of(
            Some(&format!(
                "[database]\npassword_file = {:?}\n",
                file.display().to_string()
            )),
            &[],
        );
        assert!(
            e.contains("`database.password_file`") && e.contains("`database.url`"),
            "{e}"
        );
        write_private(&file, "  \n");
        let e = error_of(Some(&with_file), &[]);
        assert!(
            e.contains("database.password") && e.contains("empty"),
            "{e}"
        );
    }

    #[test]
    fn a_lease_under_three_seconds_or_no_connect_timeout_is_refused() {
        let url = "postgres://u@h/d";
        let with = |key: &str, value: &str| {
            load(
                None,
                &[
                    ("MEWS_OUTBOX__DATABASE__URL", url),
                    (&format!("MEWS_OUTBOX__DATABASE__{key}"), value),
                ],
            )
            .map_err(|e| e.to_string())
        };
        let e = with("LEASE", "2s").unwrap_err();
        assert!(
            e.contains("`database.lease`") && e.contains("at least 3s"),
            "{e}"
        );
        assert!(with("LEASE", "2999ms").is_err());
        assert_eq!(
            with("LEASE", "3s")
                .unwrap()
                .database
                .postgres
                .unwrap()
                .lease,
            Duration::from_secs(3)
        );
        let e = with("CONNECT_TIMEOUT", "0s").unwrap_err();
        assert!(e.contains("`database.connect_timeout`"), "{e}");
        // Without a URL they are not used, and not checked.
        assert!(load(None, &[("MEWS_OUTBOX__DATABASE__LEASE", "1s")]).is_ok());
    }

    #[test]
    fn a_world_readable_configuration_file_with_a_database_password_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[database]\nurl = \"postgres://u:PW-7@h/d\"\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Settings::load(&Sources {
            file: Some(path.clone()),
            env: Some(BTreeMap::new()),
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("chmod") && !e.contains("PW-7"), "{e}");
    }

    #[test]
    fn tokens_can_come_from_systemd_credentials() {
        let creds = tempfile::tempdir().unwrap();
        for (name, token) in [
            ("mews-outbox.client_token", "CRED-C\n"),
            ("mews-outbox.access_token.hotel", "CRED-A"),
        ] {
            // As systemd passes them: private to the service.
            use std::os::unix::fs::PermissionsExt;
            let path = creds.path().join(name);
            std::fs::write(&path, token).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)).unwrap();
        }
        let dir = creds.path().to_str().unwrap();
        let s = load(
            Some("[mews]\nbase_url = \"https://api.mews.com\"\n[accounts.hotel]\n"),
            &[("CREDENTIALS_DIRECTORY", dir)],
        )
        .unwrap();
        assert_eq!(s.mews.client_token.expose_secret(), "CRED-C");
        assert_eq!(s.accounts["hotel"].access_token.expose_secret(), "CRED-A");

        let e = error_of(
            Some(
                "[mews]\nbase_url = \"https://api.mews.com\"\nclient_token = \"INLINE-1\"\n[accounts.hotel]\n",
            ),
            &[("CREDENTIALS_DIRECTORY", dir)],
        );
        assert!(
            e.contains("mews.client_token") && e.contains("keep one"),
            "{e}"
        );
        assert!(!e.contains("INLINE-1") && !e.contains("CRED-C"), "{e}");
    }

    #[test]
    fn a_world_readable_configuration_file_with_a_token_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        let load_mode = |text: &str, mode: u32| {
            std::fs::write(&path, text).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            Settings::load(&Sources {
                file: Some(path.clone()),
                env: Some(BTreeMap::new()),
            })
        };
        let with_token = "[mews]\nclient_token = \"SECRET-9\"\n";
        let e = load_mode(with_token, 0o644).unwrap_err().to_string();
        assert!(
            e.contains(&path.display().to_string()) && e.contains("chmod"),
            "{e}"
        );
        assert!(!e.contains("SECRET-9"), "{e}");
        load_mode(with_token, 0o640).unwrap();
        load_mode("[delivery]\nbatch_size = 5\n", 0o644).unwrap();
        load_mode(
            &format!("{with_token}allow_world_readable_token_files = true\n"),
            0o644,
        )
        .unwrap();
    }

    #[test]
    fn a_parse_error_does_not_quote_the_token() {
        for text in [
            "[mews]\nclient_token = \"SECRET-UNTERMINATED\n",
            "[mews]\nclient_token = SECRET-BARE\n",
            "[accounts.a]\naccess_token = \"SECRET-OK\"\nbogus key\n",
        ] {
            let e = error_of(Some(text), &[]);
            for secret in ["SECRET-UNTERMINATED", "SECRET-BARE", "SECRET-OK"] {
                assert!(!e.contains(secret), "{text:?} => {e}");
            }
        }
        let e = error_of(
            None,
            &[
                ("MEWS_OUTBOX__ACCOUNTS__A__ACCESS_TOKEN", "ENV-SECRET-1"),
                ("MEWS_OUTBOX__DELIVERY__BATCH_SIZE", "x"),
            ],
        );
        assert!(!e.contains("ENV-SECRET-1"), "{e}");
    }

    /// config/mews-outbox.toml documents every key with its default,
    /// commented out; uncommented it must load to exactly the defaults.
    #[test]
    fn the_shipped_config_documents_the_defaults() {
        let shipped = include_str!("../config/mews-outbox.toml");
        let uncommented: String = shipped
            .lines()
            .filter_map(|l| match l.strip_prefix('#') {
                _ if l.starts_with('[') => Some(l),
                Some(setting) if setting.starts_with(|c: char| c.is_ascii_lowercase()) => {
                    Some(setting)
                }
                _ => None,
            })
            .map(|l| format!("{l}\n"))
            .collect();
        let from_file = load(Some(&uncommented), &[]).unwrap();
        let defaults = load(None, &[]).unwrap();
        assert_eq!(format!("{from_file:?}"), format!("{defaults:?}"));
        // The effective configuration printed by check-config loads back to itself.
        let shown = defaults.to_string().replace("\"<redacted>\"", "\"x\"");
        let reloaded = load(Some(&shown), &[]).unwrap();
        assert_eq!(reloaded.to_string(), defaults.to_string());
    }
}
