//! A real PostgreSQL for the store tests.
//!
//! With `MEWS_OUTBOX_TEST_POSTGRES_URL` set (a role that may CREATE
//! DATABASE), each test gets a fresh database on that server. Otherwise the
//! first test of a test binary starts one throwaway cluster for the whole
//! binary: `initdb` and `pg_ctl` from `/usr/lib/postgresql/*/bin` (the
//! newest), in a temporary folder, listening only on a Unix socket in that
//! folder (about 1 s). `initdb` refuses to run as root, so as root (CI) the
//! folder is given to the `postgres` user and the server runs as that user
//! through `runuser`.
//!
//! No server outlives the test run: statics are never dropped, so a
//! watchdog is started beside the cluster, in its own session (`setsid -f`,
//! so a Ctrl-C to the test's process group does not skip it): it waits for
//! the test process to end (`/proc/<pid>` gone, however it ended, even
//! SIGKILL), then runs `pg_ctl stop -m immediate` and removes the folder.
//!
//! A machine without PostgreSQL fails these tests with a line saying what
//! to install; they are never skipped.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Instant;

pub const URL_VAR: &str = "MEWS_OUTBOX_TEST_POSTGRES_URL";

const MISSING: &str = "PostgreSQL server binaries not found: apt-get install postgresql (or set MEWS_OUTBOX_TEST_POSTGRES_URL)";

struct Cluster {
    /// Admin URL (database `postgres`).
    admin_url: String,
    pub started_in: std::time::Duration,
    /// `pg_ctl` and the data folder, for [`OwnCluster::restart`].
    pg_ctl: PathBuf,
    data: PathBuf,
}

static CLUSTER: OnceLock<Cluster> = OnceLock::new();

/// A fresh, empty database of its own for one test.
pub struct TestDb {
    pub url: String,
    pub name: String,
}

fn bin_dir() -> PathBuf {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            (bin.join("initdb").is_file() && bin.join("pg_ctl").is_file()).then_some((version, bin))
        })
        .collect();
    found.sort();
    match found.pop() {
        Some((_, bin)) => bin,
        None => panic!("{MISSING}"),
    }
}

fn is_root() -> bool {
    // The effective uid, without a libc dependency.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// `program args…`, as the `postgres` user when we are root.
fn as_server_user(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn run(mut command: Command, what: &str) {
    let out = command
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn start_cluster() -> Cluster {
    let started = Instant::now();
    let bin = bin_dir();
    let dir = std::env::temp_dir().join(format!(
        "mews-outbox-pg-{}-{:08x}",
        std::process::id(),
        fastrand::u32(..)
    ));
    std::fs::create_dir(&dir).expect("create the cluster folder");
    if is_root() {
        let mut chown = Command::new("chown");
        chown.arg("postgres:postgres").arg(&dir);
        run(
            chown,
            "chown the cluster folder to postgres (is there a postgres user?)",
        );
    }
    let data = dir.join("data");
    let mut initdb = as_server_user(&bin.join("initdb"));
    initdb.arg("-D").arg(&data).args([
        "--auth=trust",
        "-U",
        "postgres",
        "-E",
        "UTF8",
        "--locale=C",
        "--no-sync",
    ]);
    run(initdb, "initdb");
    let mut pg_ctl = as_server_user(&bin.join("pg_ctl"));
    pg_ctl
        .arg("-D")
        .arg(&data)
        .arg("-o")
        .arg(format!(
            "-k {} -c listen_addresses='' -c fsync=off -c synchronous_commit=off -c max_connections=200",
            dir.display()
        ))
        .arg("-l")
        .arg(dir.join("server.log"))
        .arg("-w")
        .arg("start");
    run(pg_ctl, "pg_ctl start");
    // The watchdog: stops the cluster once this process is gone.
    let stop = format!(
        "while [ -d /proc/{pid} ]; do sleep 0.2; done; {runas}'{pg_ctl}' -D '{data}' -m immediate stop >/dev/null 2>&1; rm -rf '{dir}'",
        pid = std::process::id(),
        runas = if is_root() {
            "runuser -u postgres -- "
        } else {
            ""
        },
        pg_ctl = bin.join("pg_ctl").display(),
        data = data.display(),
        dir = dir.display(),
    );
    // `setsid -f` forks the watchdog off and returns at once.
    let mut watchdog = Command::new("setsid");
    watchdog
        .args(["-f", "sh", "-c", &stop])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    run(watchdog, "start the cluster's watchdog (setsid, sh)");
    let socket =
        url::form_urlencoded::byte_serialize(dir.to_string_lossy().as_bytes()).collect::<String>();
    Cluster {
        admin_url: format!("postgres://postgres@localhost/postgres?host={socket}"),
        started_in: started.elapsed(),
        pg_ctl: bin.join("pg_ctl"),
        data,
    }
}

/// A throwaway cluster of one test's own (never the binary's shared one,
/// nor `MEWS_OUTBOX_TEST_POSTGRES_URL`'s server): a test that restarts
/// its server must not cut the other tests' connections. Started like the
/// shared one (as `postgres` through `runuser` when root, its own
/// watchdog); stopped when dropped.
pub struct OwnCluster {
    cluster: Cluster,
}

impl OwnCluster {
    pub fn start() -> OwnCluster {
        OwnCluster {
            cluster: start_cluster(),
        }
    }

    /// A fresh database on this cluster.
    pub async fn database(&self) -> TestDb {
        database_on(&self.cluster.admin_url).await
    }

    /// Drops `db` (its connections too), so that its autovacuum does not
    /// run beside what comes next on the same cores. Used by
    /// `benches/pg_drain.rs`, which includes this file; no test needs it.
    #[allow(dead_code)]
    pub async fn drop_database(&self, db: TestDb) {
        let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&self.cluster.admin_url)
            .await
            .expect("connect to the cluster");
        // The name is ours (`t_` and hex digits, made by `database_on`).
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE {} WITH (FORCE)",
            db.name
        )))
        .execute(&mut conn)
        .await
        .expect("drop the database");
    }

    /// `pg_ctl restart -m fast` (as the server user): every connection is
    /// cut, the server comes back with the options it was started with
    /// (`postmaster.opts`). Blocking; returns once it accepts connections.
    pub fn restart(&self) {
        let mut pg_ctl = as_server_user(&self.cluster.pg_ctl);
        pg_ctl
            .arg("-D")
            .arg(&self.cluster.data)
            .args(["-m", "fast", "-w"])
            // Not remembered by pg_ctl: without it the new server would
            // write to (and keep open) the pipe `run` reads to its end.
            .arg("-l")
            .arg(self.cluster.data.with_file_name("server.log"))
            .arg("restart");
        run(pg_ctl, "pg_ctl restart");
    }
}

impl OwnCluster {
    /// `pg_ctl stop -m fast` (as the server user): every connection is cut
    /// and the server stays down until [`OwnCluster::start_again`].
    /// Blocking.
    pub fn stop(&self) {
        let mut pg_ctl = as_server_user(&self.cluster.pg_ctl);
        pg_ctl
            .arg("-D")
            .arg(&self.cluster.data)
            .args(["-m", "fast", "-w", "stop"]);
        run(pg_ctl, "pg_ctl stop");
    }

    /// Starts the stopped server again with the options it was first
    /// started with (`postmaster.opts`, as `pg_ctl restart` does). Blocking;
    /// returns once it accepts connections.
    pub fn start_again(&self) {
        let opts = std::fs::read_to_string(self.cluster.data.join("postmaster.opts"))
            .expect("postmaster.opts");
        // `postmaster.opts` is the command line: `/path/postgres "-D" "…" "-k" …`.
        let options: String = opts
            .trim()
            .split_once(' ')
            .map(|(_, rest)| rest.to_owned())
            .unwrap_or_default();
        let mut pg_ctl = as_server_user(&self.cluster.pg_ctl);
        pg_ctl
            .arg("-D")
            .arg(&self.cluster.data)
            .arg("-o")
            .arg(options)
            .arg("-l")
            .arg(self.cluster.data.with_file_name("server.log"))
            .args(["-w", "start"]);
        run(pg_ctl, "pg_ctl start (again)");
    }
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        // The watchdog removes the folder once the test process is gone.
        let mut pg_ctl = as_server_user(&self.cluster.pg_ctl);
        pg_ctl
            .arg("-D")
            .arg(&self.cluster.data)
            .args(["-m", "immediate", "stop"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let _ = pg_ctl.status();
    }
}

fn admin_url() -> String {
    if let Ok(url) = std::env::var(URL_VAR) {
        return url;
    }
    CLUSTER.get_or_init(start_cluster).admin_url.clone()
}

/// How long the throwaway cluster took to start (None with a given URL).
pub fn cluster_start_time() -> Option<std::time::Duration> {
    CLUSTER.get().map(|c| c.started_in)
}

/// A fresh database `t_<random>` on the test server.
pub async fn database() -> TestDb {
    database_on(&admin_url()).await
}

async fn database_on(admin: &str) -> TestDb {
    let admin = admin.to_owned();
    let name = format!("t_{:016x}", fastrand::u64(..));
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&admin)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "cannot connect to the test PostgreSQL {}: {e}",
                mews_outbox::store::postgres::redact_url(&admin)
            )
        });
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await
        .expect("CREATE DATABASE");
    let _ = sqlx::Connection::close(conn).await;
    let mut url = url::Url::parse(&admin).expect("the test PostgreSQL URL");
    url.set_path(&format!("/{name}"));
    TestDb {
        url: url.to_string(),
        name,
    }
}
