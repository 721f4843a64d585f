//! No token ever reaches any output: the daemon at `RUST_LOG=trace` (so
//! reqwest, hyper and sqlx log everything they would) through success and
//! failure paths, and every CLI command, including a broken configuration.

use std::os::unix::fs::PermissionsExt;

use crate::support::daemon::{
    ACCESS_TOKEN, CLIENT_TOKEN, Env, WAIT, insert_rows, threads, threads_for, wait_for_status,
};
use crate::support::fake_mews::{FakeMews, FakeOptions, Fault};

const BAD_TOKEN: &str = "bad-access-token-SECRET-b2";
const FILE_TOKEN: &str = "file-access-token-SECRET-f3";
const CREDENTIAL_TOKEN: &str = "credential-access-token-SECRET-k4";

const TOKENS: [&str; 5] = [
    CLIENT_TOKEN,
    ACCESS_TOKEN,
    BAD_TOKEN,
    FILE_TOKEN,
    CREDENTIAL_TOKEN,
];

fn assert_no_token(what: &str, output: &str) {
    for token in TOKENS {
        assert!(
            !output.contains(token),
            "{what} shows the token {token}:\n{}",
            output
                .lines()
                .filter(|l| l.contains(token))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

#[tokio::test]
async fn no_token_appears_in_any_output_even_at_trace_level() {
    let fake = FakeMews::start_with(FakeOptions {
        valid_tokens: Some(vec![
            (CLIENT_TOKEN.into(), ACCESS_TOKEN.into()),
            (CLIENT_TOKEN.into(), FILE_TOKEN.into()),
            (CLIENT_TOKEN.into(), CREDENTIAL_TOKEN.into()),
        ]),
        ..FakeOptions::default()
    })
    .await;
    // A token in a file, one as a systemd credential, one Mews refuses (401).
    let tmp = tempfile::tempdir().unwrap();
    let token_file = tmp.path().join("filed.token");
    std::fs::write(&token_file, format!("{FILE_TOKEN}\n")).unwrap();
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let credentials = tmp.path().join("credentials");
    std::fs::create_dir(&credentials).unwrap();
    std::fs::write(
        credentials.join("mews-outbox.access_token.credited"),
        CREDENTIAL_TOKEN,
    )
    .unwrap();
    std::fs::set_permissions(
        credentials.join("mews-outbox.access_token.credited"),
        std::fs::Permissions::from_mode(0o400),
    )
    .unwrap();
    let env = Env::with(
        &fake.base_url,
        &[],
        &format!(
            "\n[accounts.refused]\naccess_token = \"{BAD_TOKEN}\"\n\
             [accounts.filed]\naccess_token_file = {:?}\n\
             [accounts.credited]\n",
            token_file.display().to_string()
        ),
    );
    let credentials_var = credentials.display().to_string();
    let vars = [
        ("RUST_LOG", "trace"),
        ("CREDENTIALS_DIRECTORY", credentials_var.as_str()),
    ];
    let db = env.producer_with_env(&vars).await;

    // 200, 500, a dropped connection, a 401, all at trace level.
    fake.script([Fault::status(500), Fault::DropBeforeStore]);
    insert_rows(&db, 3, &threads(&fake, 3), "traced").await;
    for (account, token) in [
        ("refused", BAD_TOKEN),
        ("filed", FILE_TOKEN),
        ("credited", CREDENTIAL_TOKEN),
    ] {
        sqlx::query("INSERT INTO outbox (message_thread_id, text, account) VALUES (?1, 'hi', ?2)")
            .bind(&threads_for(&fake, token, 1)[0])
            .bind(account)
            .execute(&db)
            .await
            .unwrap();
    }
    // Thread creation: a 500, then a 403, both echoing the AccessToken
    // (the first thread is created on its retry; the second is dead and
    // holds its message).
    let echo = |code| Fault::Status {
        code,
        retry_after: None,
        message: format!("no such token {ACCESS_TOKEN}"),
    };
    fake.script_threads_add([echo(500), echo(403)]);
    // The read-back of the rows the 500 may have stored fails too, echoing
    // the ClientToken (whichever account's read-back it is, it sent that).
    fake.script_get_all([Fault::Status {
        code: 500,
        retry_after: None,
        message: format!("no such client {CLIENT_TOKEN}"),
    }]);
    for key in ["created-after-a-500", "dead-after-a-403"] {
        sqlx::query(
            "INSERT INTO outbox_threads (thread_key, subject, original_sender) VALUES (?1, 'S', 'O')",
        )
        .bind(key)
        .execute(&db)
        .await
        .unwrap();
        sqlx::query("INSERT INTO outbox (thread_key, text) VALUES (?1, 'keyed')")
            .bind(key)
            .execute(&db)
            .await
            .unwrap();
    }
    let mut daemon = env.start_with_env(&vars);
    daemon.wait_for_log("ready: delivering").await;
    wait_for_status(&db, "delivered", 6).await;
    daemon.wait_for_log("thread is dead").await;
    daemon
        .wait_for_log("Mews refused this account's requests")
        .await;
    assert!(
        fake.add_requests().iter().any(|r| r.status == 500)
            && fake.add_requests().iter().any(|r| r.status == 0),
        "the 500 and the dropped connection happened"
    );
    assert!(
        fake.all_requests()
            .iter()
            .any(|r| r.path.ends_with("/messages/getAll") && r.status == 500),
        "the read-back's 500 happened"
    );
    daemon.signal("HUP");
    daemon.wait_for_log("configuration reloaded").await;
    daemon.signal("TERM");
    assert!(daemon.wait_exit(WAIT).await.success());
    let log = daemon.log();
    assert!(
        log.contains("TRACE") && log.contains("hyper"),
        "the daemon really logged at trace level"
    );
    assert_no_token("the daemon's log", &log);

    // The stored errors (`last_error`, pause reasons) are output too.
    let stored: Vec<String> = sqlx::query_scalar(
        "SELECT coalesce(last_error, '') FROM outbox
         UNION ALL SELECT coalesce(last_error, '') FROM outbox_threads
         UNION ALL SELECT coalesce(pause_reason, '') FROM outbox_account_state",
    )
    .fetch_all(&db)
    .await
    .unwrap();
    assert!(
        stored.iter().any(|e| e.starts_with("held: thread")),
        "a message is held behind the dead thread: {stored:?}"
    );
    assert_no_token("the database", &stored.join("\n"));

    for args in [
        &["check-config"][..],
        &["check-config", "--online"],
        &["status"],
        &["status", "--json"],
        &["dead", "list"],
        &["dead", "list", "--json"],
    ] {
        let (_, stdout, stderr) = env.cli_with_env(args, &vars).await;
        assert!(!stdout.is_empty(), "{args:?} printed nothing: {stderr}");
        assert_no_token(&format!("{args:?}"), &format!("{stdout}\n{stderr}"));
    }

    // Broken configurations: a syntax error on the token's own line, a
    // token both inline and as a file, a world-readable file.
    let original = env.config_text();
    let broken = [
        original.replace(
            &format!("client_token = \"{CLIENT_TOKEN}\""),
            &format!("client_token = \"{CLIENT_TOKEN}"),
        ),
        original.replace(
            &format!("access_token = \"{BAD_TOKEN}\""),
            &format!("access_token = {BAD_TOKEN}"),
        ),
        format!(
            "{original}\n[accounts.both]\naccess_token = \"{ACCESS_TOKEN}\"\naccess_token_file = {:?}\n",
            token_file.display().to_string()
        ),
    ];
    for text in &broken {
        env.rewrite_config(text);
        let (status, stdout, stderr) = env.cli_with_env(&["check-config"], &vars).await;
        assert_eq!(status.code(), Some(2), "{stdout}\n{stderr}");
        assert!(stderr.contains("configuration"), "{stderr}");
        assert_no_token("a configuration error", &format!("{stdout}\n{stderr}"));
    }
    env.rewrite_config(&original);
    std::fs::set_permissions(&env.config, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (status, _, stderr) = env.cli_with_env(&["status"], &vars).await;
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("readable by every user") && stderr.contains("chmod"),
        "{stderr}"
    );
    assert_no_token("a world-readable configuration file", &stderr);
}
