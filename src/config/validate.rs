//! One validation per section of the configuration; each error names the
//! key and what was expected, never the value.

use super::*;

/// `[mews]`: where to send, the ClientToken (the public one for the demo
/// environment when none is given), the `Client` name, the timeout.
pub(super) fn validate_mews(
    raw: RawMews,
    tokens: &TokenSources,
) -> Result<MewsSettings, ConfigError> {
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
pub(super) fn validate_base_url(text: &str) -> Result<Url, ConfigError> {
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
pub(super) fn is_demo_url(url: &Url) -> bool {
    url.as_str().trim_end_matches('/') == DEMO_BASE_URL
}

/// `[accounts.<name>]`, each in turn; none is allowed only against the
/// demo environment, which then gets a `default` account with the public
/// AccessToken.
pub(super) fn validate_accounts(
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
pub(super) fn validate_account(
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
pub(super) fn validate_delivery(d: &DeliverySettings) -> Result<(), ConfigError> {
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
pub(super) fn validate_retry(r: &RetrySettings) -> Result<(), ConfigError> {
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
pub(super) fn validate_log(log: &LogSettings) -> Result<(), ConfigError> {
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
/// URL, `password_file` or the `mews-outbox.database_password` credential), else the
/// SQLite file at `path` (by default under systemd's state directory or the
/// working directory); not both.
pub(super) fn validate_database(
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
pub(super) fn validate_postgres(
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

/// Whether the URL's host is this machine: only then may tokens go over
/// plain http (to the fake Mews, or a local TLS-terminating proxy).
pub(super) fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(name)) => name.eq_ignore_ascii_case("localhost"),
        None => false,
    }
}
