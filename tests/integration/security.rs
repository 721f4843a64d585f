//! Tokens go to `mews.base_url`'s origin and nowhere else, and a broken
//! configuration never echoes them: redirects are not followed, plain http
//! only to a loopback address, configuration errors name the key without
//! the value. Each test runs the real binary against real sockets.

use std::io::ErrorKind;
use std::net::TcpListener;

use crate::support::daemon::{Env, insert_rows, rows, threads, wait_for_status};
use crate::support::fake_mews::{ADD_PATH, FakeMews, Fault, GET_ALL_PATH};

/// A port where a redirect would lead: nothing should ever connect to it.
/// Non-blocking, so [`Trap::assert_untouched`] answers at once.
struct Trap {
    listener: TcpListener,
    origin: String,
}

impl Trap {
    fn new() -> Trap {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let origin = format!("http://{}", listener.local_addr().unwrap());
        Trap { listener, origin }
    }

    /// A Location that carries more than an origin; only the origin may be shown.
    fn location(&self) -> String {
        format!("{}/steal/SECRET-PATH?token=SECRET-QUERY", self.origin)
    }

    /// A completed TCP handshake waits in the backlog: `accept` would return it.
    fn assert_untouched(&self) {
        match self.listener.accept() {
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Ok((_, peer)) => panic!("{peer} connected to the redirect target"),
            Err(e) => panic!("accept on the trap: {e}"),
        }
    }
}

/// A port that was open a moment ago and is closed now.
fn closed_port_origin() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let origin = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    origin
}

const BASE_URL_WRONG: &str = "mews.base_url looks wrong";
/// The ERROR line of the account's pause (the WARN line of the request also
/// says [`BASE_URL_WRONG`]).
const PAUSED: &str = "the server there answered with a redirect, which is never followed";

fn redirect(code: u16, location: &str) -> Fault {
    Fault::Redirect {
        code,
        location: location.to_owned(),
    }
}

#[tokio::test]
async fn no_redirect_from_messages_add_is_followed_and_the_row_is_delivered_once_after() {
    let fake = FakeMews::start().await;
    let trap = Trap::new();
    let codes = [301, 302, 307, 308];
    fake.script(codes.map(|code| redirect(code, &trap.location())));
    let env = Env::new(&fake.base_url);
    let db = env.producer().await;
    let ids = insert_rows(&db, 1, &threads(&fake, 1), "redirected").await;
    let mut daemon = env.start();

    wait_for_status(&db, "delivered", 1).await;

    let adds = fake.add_requests();
    assert_eq!(
        adds.iter().map(|r| r.status).collect::<Vec<_>>(),
        [301, 302, 307, 308, 200],
        "one request per redirect, each a POST to the fake, then the delivery"
    );
    assert!(
        adds.iter()
            .all(|r| r.method == "POST" && r.path == ADD_PATH)
    );
    trap.assert_untouched();
    assert_eq!(fake.accepted().len(), 1, "delivered exactly once");
    let row = &rows(&db).await[0];
    assert_eq!(
        (row.id, row.attempts),
        (ids[0], 0),
        "a redirect is not an attempt"
    );
    daemon.wait_for_log_count(PAUSED, 4).await;
    let log = daemon.log();
    for code in codes {
        let wanted = format!("HTTP {code} redirect to {}", trap.origin);
        assert!(log.contains(&wanted), "no {wanted:?} in:\n{log}");
    }
    assert!(!log.contains("SECRET-PATH") && !log.contains("SECRET-QUERY"));
    assert!(!log.contains("cannot connect"), "{log}");
}

#[tokio::test]
async fn a_redirect_to_a_closed_port_pauses_the_account_and_leaves_the_rows_untouched() {
    let fake = FakeMews::start().await;
    let closed = closed_port_origin();
    fake.script([redirect(
        307,
        &format!("{closed}/api/connector/v1/messages/add"),
    )]);
    // A long pause, so the state after the redirect can be read at leisure.
    let env = Env::with(
        &fake.base_url,
        &[("pause_base", "\"10m\""), ("pause_max", "\"1h\"")],
        "",
    );
    let db = env.producer().await;
    insert_rows(&db, 3, &threads(&fake, 3), "closed").await;
    let mut daemon = env.start();

    let line = daemon.wait_for_log(PAUSED).await;

    assert!(
        line.contains(&format!("HTTP 307 redirect to {closed}")),
        "{line}"
    );
    assert!(line.contains("ERROR"), "{line}");
    let (status, attempts, reconcile): (String, i64, i64) = sqlx::query_as(
        "SELECT group_concat(DISTINCT status), sum(attempts), sum(needs_reconcile) FROM outbox",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(
        (status.as_str(), attempts, reconcile),
        ("pending", 0, 0),
        "released untouched: not sent, not an attempt, not ambiguous"
    );
    let reason: String = sqlx::query_scalar(
        "SELECT pause_reason FROM outbox_account_state WHERE account = 'default'",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert!(
        reason.contains("mews.base_url") && reason.contains(&closed),
        "{reason}"
    );
    assert_eq!(fake.add_requests().len(), 1, "paused after the redirect");
    assert!(!daemon.log().contains("cannot connect"), "{}", daemon.log());
}

#[tokio::test]
async fn a_redirect_from_the_read_back_pauses_instead_of_sending_again() {
    let fake = FakeMews::start().await;
    let trap = Trap::new();
    // Stored, but the answer is lost: the row must be read back first.
    fake.script([Fault::DropAfterStore]);
    fake.script_get_all([redirect(308, &trap.location())]);
    let env = Env::new(&fake.base_url);
    let db = env.producer().await;
    insert_rows(&db, 1, &threads(&fake, 1), "read back").await;
    let mut daemon = env.start();

    wait_for_status(&db, "delivered", 1).await;

    let get_alls: Vec<u16> = fake
        .all_requests()
        .iter()
        .filter(|r| r.path == GET_ALL_PATH)
        .map(|r| r.status)
        .collect();
    assert_eq!(get_alls, [308, 200]);
    assert_eq!(
        fake.add_requests().len(),
        1,
        "not sent again after the redirect"
    );
    assert_eq!(fake.accepted().len(), 1, "Mews shows the message once");
    trap.assert_untouched();
    let line = daemon.wait_for_log(PAUSED).await;
    assert!(
        line.contains(&format!("HTTP 308 redirect to {}", trap.origin)),
        "{line}"
    );
}

#[tokio::test]
async fn check_config_online_reports_a_redirect_as_a_wrong_base_url() {
    let fake = FakeMews::start().await;
    let trap = Trap::new();
    fake.script_configuration([redirect(302, &trap.location())]);
    let env = Env::new(&fake.base_url);

    let (status, out, err) = env.cli(&["check-config", "--online"]).await;

    assert!(!status.success(), "{out}\n{err}");
    let line = out
        .lines()
        .find(|l| l.contains("configuration/get"))
        .unwrap_or_else(|| panic!("no report line:\n{out}"));
    assert!(line.starts_with("FAILED"), "{line}");
    assert!(
        line.contains(&format!("HTTP 302 redirect to {}", trap.origin))
            && line.contains(BASE_URL_WRONG),
        "{line}"
    );
    assert!(!out.contains("SECRET-") && !err.contains("SECRET-"));
    trap.assert_untouched();
}

#[tokio::test]
async fn a_body_that_stalls_is_reported_as_a_body_read_timeout_and_read_back() {
    let fake = FakeMews::start().await;
    // Much longer than the request timeout (2 s in the test template).
    fake.script([Fault::StoreThenStallBody(std::time::Duration::from_secs(
        60,
    ))]);
    let env = Env::new(&fake.base_url);
    let db = env.producer().await;
    insert_rows(&db, 1, &threads(&fake, 1), "stalled").await;
    let mut daemon = env.start();

    let line = daemon
        .wait_for_log("timed out reading the response body after 2s")
        .await;
    wait_for_status(&db, "delivered", 1).await;

    assert!(line.contains("Mews may have stored the messages"), "{line}");
    assert!(!daemon.log().contains("error decoding response body"));
    // The stalled request is recorded only when its handler ends; what
    // Mews stored is the promise: once, found by the read-back.
    assert_eq!(fake.accepted().len(), 1, "read back, not sent again");
    let read_backs = fake.all_requests();
    let read_backs: Vec<u16> = read_backs
        .iter()
        .filter(|r| r.path == GET_ALL_PATH)
        .map(|r| r.status)
        .collect();
    assert_eq!(read_backs, [200]);
}

/// A token pasted where it does not belong.
const PASTED: &str = "SECRET-7A1C9E5B3D-TOKEN";
/// Its middle: no part of it may show either.
const PASTED_CORE: &str = "7A1C9E5B3D";

/// Keys whose value is free text: a token there is accepted (and is then the
/// operator's client name, log filter or database path).
const FREE_TEXT: [&str; 5] = [
    "database.path",
    "mews.client",
    "mews.client_token",
    "accounts.default.access_token",
    "log.level",
];

/// A valid configuration as (section, key, value) lines.
fn base_entries() -> Vec<(String, String, String)> {
    [
        ("mews", "base_url", "\"http://127.0.0.1:9\""),
        ("mews", "client_token", "\"test-client-c0\""),
        ("accounts.default", "access_token", "\"test-access-a0\""),
    ]
    .map(|(s, k, v)| (s.to_owned(), k.to_owned(), v.to_owned()))
    .to_vec()
}

/// The base configuration with `key` (dotted, maybe a whole section) set to
/// `value` (TOML text), replacing what was there.
fn config_with(key: &str, value: &str) -> String {
    let (section, name) = key.rsplit_once('.').unwrap_or(("", key));
    let mut entries: Vec<_> = base_entries()
        .into_iter()
        // A section given as a value replaces the table of that name.
        .filter(|(s, k, _)| {
            !(format!("{s}.").starts_with(&format!("{key}.")) || (s == section && k == name))
        })
        .collect();
    entries.push((section.to_owned(), name.to_owned(), value.to_owned()));
    let mut sections: Vec<&str> = entries.iter().map(|(s, _, _)| s.as_str()).collect();
    sections.sort_unstable();
    sections.dedup();
    let mut text = String::new();
    for section in sections {
        if !section.is_empty() {
            text.push_str(&format!("[{section}]\n"));
        }
        for (_, k, v) in entries.iter().filter(|(s, _, _)| s == section) {
            text.push_str(&format!("{k} = {v}\n"));
        }
    }
    text
}

/// Every key of the effective configuration, as `check-config` prints it,
/// plus the token-file keys and every table.
async fn every_key(env: &Env) -> Vec<String> {
    env.rewrite_config(&config_with("mews.client", "\"x\""));
    let (status, out, err) = env.cli(&["check-config"]).await;
    assert!(status.success(), "{err}");
    let mut keys = vec![
        "mews.client_token_file".to_owned(),
        "accounts.default.access_token_file".to_owned(),
        "accounts".to_owned(),
    ];
    let mut section = String::new();
    for line in out.lines().filter(|l| !l.starts_with('#')) {
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_owned();
            keys.push(section.clone());
        } else if let Some((key, _)) = line.split_once(" = ") {
            keys.push(format!("{section}.{key}"));
        }
    }
    assert!(keys.len() > 30, "{keys:?}");
    keys
}

fn env_var(key: &str) -> String {
    format!(
        "MEWS_OUTBOX__{}",
        key.replace('.', "__").to_ascii_uppercase()
    )
}

#[tokio::test]
async fn no_configuration_error_echoes_a_token_pasted_into_any_key() {
    let env = Env::new("http://127.0.0.1:9");
    let keys = every_key(&env).await;
    let mut refused = 0;
    let mut failures = Vec::new();
    for key in &keys {
        let quoted = format!("\"{PASTED}\"");
        for (how, text, vars) in [
            ("quoted in the file", config_with(key, &quoted), vec![]),
            ("bare in the file", config_with(key, PASTED), vec![]),
            (
                "in the environment",
                config_with("mews.client", "\"x\""),
                vec![(env_var(key), PASTED.to_owned())],
            ),
        ] {
            env.rewrite_config(&text);
            let vars: Vec<(&str, &str)> =
                vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            let (status, out, err) = env.cli_with_env(&["check-config"], &vars).await;
            let what = format!("{key} {how}");
            if err.contains(PASTED_CORE) {
                failures.push(format!("{what}: stderr shows the value: {err}"));
            }
            if status.success() {
                if !(FREE_TEXT.contains(&key.as_str()) && how != "bare in the file") {
                    failures.push(format!("{what} was accepted:\n{out}"));
                }
                continue;
            }
            refused += 1;
            if status.code() != Some(2) {
                failures.push(format!("{what}: exit {status}: {err}"));
            }
            if !err.contains(key.as_str()) {
                failures.push(format!("{what}: the error does not name {key}: {err}"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
    println!(
        "configuration: {} keys, {refused} refusals, none echoing the value",
        keys.len()
    );
}

#[tokio::test]
async fn plain_http_to_another_host_is_refused_by_check_config_run_and_reload() {
    let fake = FakeMews::start().await;
    let env = Env::new(&fake.base_url);
    let good = env.config_text();
    let remote = good.replace(&fake.base_url, "http://api.mews.com");
    assert_ne!(good, remote);
    env.rewrite_config(&remote);
    for command in ["check-config", "run"] {
        let (status, _, err) = env.cli(&[command]).await;
        assert_eq!(status.code(), Some(2), "{command}: {err}");
        assert!(
            err.contains("`mews.base_url`") && err.contains("in clear") && err.contains("https://"),
            "{command}: {err}"
        );
    }

    env.rewrite_config(&good);
    let db = env.producer().await;
    let mut daemon = env.start().ready().await;
    env.rewrite_config(&remote);
    daemon.signal("HUP");
    let refused = daemon.wait_for_log("configuration reload REFUSED").await;
    assert!(refused.contains("in clear"), "{refused}");
    // Still delivering, to the loopback fake of the previous configuration.
    insert_rows(&db, 1, &threads(&fake, 1), "after the refusal").await;
    wait_for_status(&db, "delivered", 1).await;
}
