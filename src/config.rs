//! Typed settings: embedded defaults, then the TOML file, then
//! `MEWS_OUTBOX__SECTION__KEY` environment variables; validation; secrets.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use url::Url;

/// The embedded defaults, layered first.
const DEFAULTS: &str = include_str!("defaults.toml");

/// Prefix of environment overrides: `MEWS_OUTBOX__DELIVERY__BATCH_SIZE=500`.
pub const ENV_PREFIX: &str = "MEWS_OUTBOX";

/// The public demo environment; its tokens are published by Mews.
pub const DEMO_BASE_URL: &str = "https://api.mews-demo.com";
/// Public demo ClientToken (Mews Connector API documentation, "Environments").
pub const DEMO_CLIENT_TOKEN: &str =
    "E0D439EE522F44368DC78E1BFB03710C-D24FB11DBE31D4621C4817E028D9E1D";
/// Public demo AccessToken, used for the `default` account when none is configured.
pub const DEMO_ACCESS_TOKEN: &str =
    "C66EF7B239D24632943D115EDE9CB810-EA00F8FD8294692C940F6B5A8F9453D";

/// Largest batch the Connector API accepts in one `messages/add`.
pub const MAX_BATCH_SIZE: usize = 1000;

/// A setting that could not be loaded or is invalid. The message names the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Load(#[from] config::ConfigError),
    #[error("configuration: `{key}` {problem}")]
    Invalid { key: String, problem: String },
    #[error("configuration: cannot read `{key}` file {path}: {source}")]
    SecretFile {
        key: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
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
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSettings {
    /// SQLite file holding the `outbox` table; created when missing.
    pub path: PathBuf,
    /// How long a writer waits for a lock held by another connection.
    #[serde(with = "humantime_serde")]
    pub busy_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct MewsSettings {
    pub base_url: Url,
    pub client_token: SecretString,
    /// `Client` field of each request: name and version.
    pub client: String,
    pub request_timeout: Duration,
}

impl MewsSettings {
    /// True when talking to the public demo environment with its public tokens.
    pub fn is_public_demo(&self) -> bool {
        self.base_url.as_str().trim_end_matches('/') == DEMO_BASE_URL
            && self.client_token.expose_secret() == DEMO_CLIENT_TOKEN
    }
}

/// One connected property: its AccessToken.
#[derive(Debug, Clone)]
pub struct Account {
    pub access_token: SecretString,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliverySettings {
    /// Messages per request, 1..=1000.
    pub batch_size: usize,
    /// How often the daemon looks for rows committed by producers when it
    /// cannot watch the WAL file (otherwise writes to it wake the daemon).
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Requests in flight at once, across accounts.
    pub max_concurrent_requests: usize,
    /// On SIGTERM, how long to wait for requests in flight before exiting.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
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
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    /// tracing filter, e.g. `info` or `mews_outbox=debug`; `RUST_LOG` wins.
    pub level: String,
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Text on a terminal, JSON lines otherwise.
    Auto,
    Text,
    Json,
}

/// The shape of the layered sources before validation.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    database: DatabaseSettings,
    mews: RawMews,
    #[serde(default)]
    accounts: BTreeMap<String, RawAccount>,
    delivery: DeliverySettings,
    retry: RetrySettings,
    log: LogSettings,
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
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAccount {
    access_token: Option<SecretString>,
    access_token_file: Option<PathBuf>,
}

/// Where settings come from; tests pass their own environment.
#[derive(Debug, Default, Clone)]
pub struct Sources {
    pub file: Option<PathBuf>,
    /// `None` reads the process environment.
    pub env: Option<BTreeMap<String, String>>,
}

impl Settings {
    /// Loads defaults, the file and the environment, then validates.
    pub fn load(sources: &Sources) -> Result<Settings, ConfigError> {
        let mut builder = config::Config::builder()
            .add_source(config::File::from_str(DEFAULTS, config::FileFormat::Toml));
        if let Some(file) = &sources.file {
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
        let raw: Raw = builder.add_source(env).build()?.try_deserialize()?;
        Self::validate(raw)
    }

    fn validate(raw: Raw) -> Result<Settings, ConfigError> {
        let base_url = Url::parse(raw.mews.base_url.trim())
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
            .ok_or_else(|| {
                invalid(
                    "mews.base_url",
                    format!(
                        "must be an http(s) URL such as {DEMO_BASE_URL}, got {:?}",
                        raw.mews.base_url
                    ),
                )
            })?;
        let is_demo_url = base_url.as_str().trim_end_matches('/') == DEMO_BASE_URL;

        let client_token = secret(
            "mews.client_token",
            raw.mews.client_token,
            raw.mews.client_token_file,
        )?
        .or_else(|| is_demo_url.then(|| SecretString::from(DEMO_CLIENT_TOKEN)))
        .ok_or_else(|| {
            invalid(
                "mews.client_token",
                "is required when mews.base_url is not the public demo environment",
            )
        })?;

        let client = raw
            .mews
            .client
            .unwrap_or_else(|| format!("mews-outbox {}", env!("CARGO_PKG_VERSION")));
        if client.trim().is_empty() {
            return Err(invalid("mews.client", "must not be empty"));
        }
        if raw.mews.request_timeout.is_zero() {
            return Err(invalid("mews.request_timeout", "must be greater than 0"));
        }

        let mut accounts = BTreeMap::new();
        for (name, account) in raw.accounts {
            let key = format!("accounts.{name}.access_token");
            let token = secret(&key, account.access_token, account.access_token_file)?
                .ok_or_else(|| invalid(&key, "is required for each account"))?;
            accounts.insert(
                name,
                Account {
                    access_token: token,
                },
            );
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
                },
            );
        }

        let d = &raw.delivery;
        if !(1..=MAX_BATCH_SIZE).contains(&d.batch_size) {
            return Err(invalid(
                "delivery.batch_size",
                format!(
                    "must be between 1 and {MAX_BATCH_SIZE} (Mews's limit per request), got {}",
                    d.batch_size
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
        let r = &raw.retry;
        if r.max_attempts == 0 {
            return Err(invalid("retry.max_attempts", "must be at least 1"));
        }
        if r.base_delay.is_zero() || r.base_delay > r.max_delay {
            return Err(invalid(
                "retry.base_delay",
                "must be greater than 0 and at most retry.max_delay",
            ));
        }
        if r.pause_base.is_zero() || r.pause_base > r.pause_max {
            return Err(invalid(
                "retry.pause_base",
                "must be greater than 0 and at most retry.pause_max",
            ));
        }
        if raw.database.path.as_os_str().is_empty() {
            return Err(invalid("database.path", "must not be empty"));
        }

        Ok(Settings {
            database: raw.database,
            mews: MewsSettings {
                base_url,
                client_token,
                client,
                request_timeout: raw.mews.request_timeout,
            },
            accounts,
            delivery: raw.delivery,
            retry: raw.retry,
            log: raw.log,
        })
    }
}

/// The effective configuration as TOML, every token shown as `<redacted>`.
impl std::fmt::Display for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let d = |d: Duration| humantime::format_duration(d).to_string();
        writeln!(f, "[database]")?;
        writeln!(f, "path = {:?}", self.database.path.display().to_string())?;
        writeln!(f, "busy_timeout = {:?}", d(self.database.busy_timeout))?;
        writeln!(f, "\n[mews]")?;
        writeln!(f, "base_url = {:?}", self.mews.base_url.as_str())?;
        writeln!(f, "client_token = \"<redacted>\"")?;
        writeln!(f, "client = {:?}", self.mews.client)?;
        writeln!(f, "request_timeout = {:?}", d(self.mews.request_timeout))?;
        for name in self.accounts.keys() {
            writeln!(f, "\n[accounts.{name}]\naccess_token = \"<redacted>\"")?;
        }
        let x = &self.delivery;
        writeln!(f, "\n[delivery]\nbatch_size = {}", x.batch_size)?;
        writeln!(f, "poll_interval = {:?}", d(x.poll_interval))?;
        writeln!(f, "max_concurrent_requests = {}", x.max_concurrent_requests)?;
        writeln!(f, "drain_timeout = {:?}", d(x.drain_timeout))?;
        let r = &self.retry;
        writeln!(f, "\n[retry]\nbase_delay = {:?}", d(r.base_delay))?;
        writeln!(f, "max_delay = {:?}", d(r.max_delay))?;
        writeln!(f, "max_attempts = {}", r.max_attempts)?;
        writeln!(f, "pause_base = {:?}", d(r.pause_base))?;
        writeln!(f, "pause_max = {:?}", d(r.pause_max))?;
        writeln!(f, "\n[log]\nlevel = {:?}", self.log.level)?;
        write!(
            f,
            "format = {:?}",
            format!("{:?}", self.log.format).to_lowercase()
        )
    }
}

/// A token given inline or in a file (never both); empty is refused.
fn secret(
    key: &str,
    inline: Option<SecretString>,
    file: Option<PathBuf>,
) -> Result<Option<SecretString>, ConfigError> {
    let value = match (inline, file) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                key,
                format!("and `{key}_file` are both set: keep one"),
            ));
        }
        (Some(value), None) => value,
        (None, Some(path)) => read_secret_file(&format!("{key}_file"), &path)?,
        (None, None) => return Ok(None),
    };
    if value.expose_secret().trim().is_empty() {
        return Err(invalid(key, "must not be empty"));
    }
    Ok(Some(value))
}

fn read_secret_file(key: &str, path: &Path) -> Result<SecretString, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::SecretFile {
        key: key.to_owned(),
        path: path.to_owned(),
        source,
    })?;
    Ok(SecretString::from(text.trim().to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(file: Option<&str>, env: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        if let Some(text) = file {
            std::fs::write(&path, text).unwrap();
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
    fn an_empty_token_is_refused() {
        let e = error_of(Some("[accounts.hotel]\naccess_token = \"  \"\n"), &[]);
        assert!(e.contains("accounts.hotel.access_token"), "{e}");
        assert!(e.contains("empty"), "{e}");
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
    fn tokens_can_come_from_files() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "FROM-FILE\n").unwrap();
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
