//! What the binary prints when it fails: one error chain, each cause in it
//! once (not repeated by a message that also returns it as its source).

use std::path::Path;
use std::process::ExitStatus;

use crate::support::daemon::{WAIT, mews_outbox_command};

/// Runs the binary with `config` and returns its exit status and stderr.
async fn fail(config: &Path, args: &[&str]) -> (ExitStatus, String) {
    let out = tokio::time::timeout(
        WAIT,
        mews_outbox_command()
            .arg("--config")
            .arg(config)
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the binary gave up in time")
    .expect("run mews-outbox");
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn write_private(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// How often `fragment` appears in `text`.
fn times(text: &str, fragment: &str) -> usize {
    text.matches(fragment).count()
}

#[tokio::test]
async fn a_database_in_a_missing_directory_is_reported_with_its_cause_once() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.toml");
    let database = dir.path().join("no-such-dir").join("outbox.db");
    write_private(
        &config,
        &format!("[database]\npath = {:?}\n", database.display().to_string()),
    );
    for command in ["run", "migrate"] {
        let (status, stderr) = fail(&config, &[command]).await;
        assert_eq!(status.code(), Some(1), "{command}: {stderr}");
        assert_eq!(
            times(&stderr, "No such file or directory"),
            1,
            "{command}: {stderr}"
        );
        assert_eq!(
            times(&stderr, "cannot find out the file system of"),
            1,
            "{command}: {stderr}"
        );
    }
}

#[tokio::test]
async fn a_file_that_is_not_a_database_is_reported_with_sqlites_error_once() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.toml");
    let database = dir.path().join("outbox.db");
    std::fs::write(
        &database,
        "not a database, but long enough to be read as one\n".repeat(20),
    )
    .unwrap();
    write_private(
        &config,
        &format!("[database]\npath = {:?}\n", database.display().to_string()),
    );
    for args in [
        &["status"][..],
        &[
            "enqueue",
            "--thread",
            "3fa85f64-5717-4562-b3fc-2c963f66afa6",
            "--text",
            "hi",
        ],
    ] {
        let (status, stderr) = fail(&config, args).await;
        assert_eq!(status.code(), Some(1), "{args:?}: {stderr}");
        assert_eq!(
            times(&stderr, "file is not a database"),
            1,
            "{args:?}: {stderr}"
        );
        assert_eq!(times(&stderr, "database error"), 1, "{args:?}: {stderr}");
    }
}

#[tokio::test]
async fn a_malformed_configuration_file_is_reported_once() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.toml");
    write_private(&config, "[delivery\nbatch_size = 3\n");
    let (status, stderr) = fail(&config, &["check-config"]).await;
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert_eq!(times(&stderr, "unclosed table"), 1, "{stderr}");
    assert_eq!(times(&stderr, "configuration"), 1, "{stderr}");
}

#[tokio::test]
async fn an_unreadable_token_file_is_reported_with_its_cause_once() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.toml");
    let token = dir.path().join("no-such-token");
    write_private(
        &config,
        &format!(
            "[accounts.a]\naccess_token_file = {:?}\n",
            token.display().to_string()
        ),
    );
    let (status, stderr) = fail(&config, &["check-config"]).await;
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert_eq!(times(&stderr, "No such file or directory"), 1, "{stderr}");
    assert_eq!(
        times(&stderr, "accounts.a.access_token_file"),
        1,
        "{stderr}"
    );
    assert!(
        !stderr.contains("no-such-token"),
        "the path may be a token: {stderr}"
    );
}
