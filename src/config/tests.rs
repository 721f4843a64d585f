use super::load_error::describe_toml_error;
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
    write_private(
        &creds.path().join("mews-outbox.database_password"),
        "PW-CRED-5",
    );
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
    let shipped = include_str!("../../config/mews-outbox.toml");
    let uncommented: String = shipped
        .lines()
        .filter_map(|l| match l.strip_prefix('#') {
            _ if l.starts_with('[') => Some(l),
            Some(setting) if setting.starts_with(|c: char| c.is_ascii_lowercase()) => Some(setting),
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
