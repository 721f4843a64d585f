//! The PostgreSQL outbox: several daemons, on several hosts, over one shared
//! database, behaving as one daemon (issue 12). `mews-outbox run` uses it
//! when `database.url` is set; tested at store level
//! (`tests/integration/postgres_store.rs`) and with several daemon
//! processes (`tests/integration/fleet.rs`).
//!
//! Accounts are leased, not rows: each account is owned by one daemon at a
//! time ([`PgStore::acquire_accounts`]), so per-thread order, the rate limit
//! and the pauses of an account stay with one owner, and a dead daemon's
//! accounts move on when its lease expires. Every acquisition increments
//! the account's fencing token; every write of the delivery path is
//! conditioned, in the same statement, on this handle still holding the
//! account under the token the rows were claimed with, and reports
//! [`StoreError::LeaseLost`] instead of succeeding silently. Lease times are
//! the database's clock (`clock_timestamp()`), never a host's.
//! docs/postgres.md has the reasoning.

mod commands;
mod sql;
mod threads;
mod upkeep;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::json;
use sqlx::migrate::MigrateError;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use sqlx::{PgPool, Row};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::schema::{SchemaProblem, schema_verdict};
use super::{
    AccountPause, Acquired, ClaimedRow, ClaimedThread, Enqueued, Fleet, FleetMember, NewMessage,
    NewThread, Outbox, RowOutcome, StoreError, ThreadOutcome, ThreadRef, timestamp,
};

/// The daemon's migration bookkeeping table, as in the SQLite store.
pub const MIGRATIONS_TABLE: &str = super::sqlite::MIGRATIONS_TABLE;

/// The LISTEN/NOTIFY channel the insert trigger notifies (payload: account).
pub const CHANNEL: &str = "mews_outbox";

/// What a claim counts for each message besides its text, as the SQLite
/// store's `sql::MESSAGE_ENVELOPE_BYTES`.
pub const MESSAGE_ENVELOPE_BYTES: usize = 128;

/// How long an account lease lasts unless renewed.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);

/// How often the change watcher wakes the loops without a notification
/// (as the SQLite store's safety poll beside its WAL watch).
pub const SAFETY_POLL: Duration = Duration::from_secs(1);

/// Connections per handle: a claim, a record and a read side by side, plus
/// the listener.
const CONNECTIONS: u32 = 6;

/// How one daemon uses the shared database.
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// How long an acquired or renewed account lease lasts. The daemon
    /// renews well within it (a third); a daemon silent for longer loses
    /// its accounts to the others.
    pub lease: Duration,
    /// At a takeover, rows the previous owner left `sending` wait at least
    /// this long after their claim before they are read back (the request
    /// carrying them may still be on its way: the request timeout).
    pub settle: Duration,
    /// How long connecting (and waiting for a pooled connection) may take.
    pub connect_timeout: Duration,
}

impl Default for PgOptions {
    fn default() -> PgOptions {
        PgOptions {
            lease: DEFAULT_LEASE,
            settle: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// One daemon's handle on the shared outbox: its owner id, its lease length
/// and the accounts it holds (with their tokens). Cheap to clone; clones
/// share the held accounts.
#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
    owner: uuid::Uuid,
    options: PgOptions,
    /// account -> fencing token, for the accounts this handle believes it
    /// holds. The database decides: every write checks it there. Only
    /// acquiring, renewing and releasing change this map: a write refused
    /// for a lost lease reports it, and the next renewal forgets the account.
    held: Arc<Mutex<HashMap<String, i64>>>,
    /// The URL with its password replaced, for messages.
    target: String,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the pool's options: they hold the password.
        f.debug_struct("PgStore")
            .field("target", &self.target)
            .field("owner", &self.owner)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// `url` with any password replaced by `***`, for logs and errors.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) => {
            if parsed.password().is_some() {
                let _ = parsed.set_password(Some("***"));
            }
            // A password may also hide in the query (`?password=`).
            let pairs: Vec<(String, String)> = parsed
                .query_pairs()
                .map(|(k, v)| {
                    let v = if k.eq_ignore_ascii_case("password") {
                        "***".to_owned()
                    } else {
                        v.into_owned()
                    };
                    (k.into_owned(), v)
                })
                .collect();
            if !pairs.is_empty() {
                parsed.query_pairs_mut().clear().extend_pairs(pairs);
            }
            parsed.to_string()
        }
        Err(_) => "<unparsable database URL>".to_owned(),
    }
}

/// A fresh random (version 4) owner id.
fn new_owner() -> uuid::Uuid {
    let mut bytes = [0u8; 16];
    for b in &mut bytes {
        *b = fastrand::u8(..);
    }
    uuid::Builder::from_random_bytes(bytes).into_uuid()
}

fn micros_to_time(us: i64) -> SystemTime {
    match u64::try_from(us) {
        Ok(us) => UNIX_EPOCH + Duration::from_micros(us),
        Err(_) => UNIX_EPOCH,
    }
}

/// A count or size as the `bigint` a statement takes.
fn to_i64(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The rows a claim statement returned, and how many candidates it looked
/// at (a row without an `id` only carries that count).
fn decode_claimed(
    rows: Vec<sqlx::postgres::PgRow>,
) -> Result<(Vec<ClaimedRow>, usize), StoreError> {
    let mut looked_at = 0;
    let mut claimed = Vec::with_capacity(rows.len());
    for row in rows {
        looked_at = usize::try_from(row.try_get::<i64, _>("candidates")?).unwrap_or(0);
        let Some(id) = row.try_get::<Option<i64>, _>("id")? else {
            continue;
        };
        claimed.push(ClaimedRow {
            id,
            message_thread_id: row.try_get("message_thread_id")?,
            text: Ok(row.try_get("text")?),
            attempts: u32::try_from(row.try_get::<i32, _>("attempts")?).unwrap_or(0),
            needs_reconcile: row.try_get::<i32, _>("needs_reconcile")? != 0,
            first_sent_at: row
                .try_get::<Option<i64>, _>("first_sent_us")?
                .map(micros_to_time),
        });
    }
    Ok((claimed, looked_at))
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// A CHECK, UNIQUE or NOT NULL failure is the producer's input being refused.
fn refused(e: sqlx::Error) -> StoreError {
    match &e {
        sqlx::Error::Database(db)
            if matches!(
                db.kind(),
                sqlx::error::ErrorKind::CheckViolation
                    | sqlx::error::ErrorKind::NotNullViolation
                    | sqlx::error::ErrorKind::UniqueViolation
            ) =>
        {
            let message = db.message().to_owned();
            StoreError::Refused(match db.constraint() {
                Some(name) if !message.contains(name) => format!("{message} ({name})"),
                _ => message,
            })
        }
        _ => StoreError::Database(e),
    }
}

/// The versions of `migrations/postgres` this binary applies.
fn known_migrations() -> Vec<i64> {
    sqlx::migrate!("./migrations/postgres")
        .iter()
        .filter(|m| !m.migration_type.is_down_migration())
        .map(|m| m.version)
        .collect()
}

fn lease_lost(accounts: Vec<String>) -> Result<(), StoreError> {
    if accounts.is_empty() {
        Ok(())
    } else {
        Err(StoreError::LeaseLost {
            account: accounts.join(", "),
        })
    }
}

impl PgStore {
    /// Connects to `url`, applies pending migrations (under sqlx's advisory
    /// lock: two daemons starting together do not both migrate) and returns
    /// a handle with a fresh owner id that holds no account yet.
    pub async fn connect(url: &str, options: PgOptions) -> Result<PgStore, StoreError> {
        let connect: PgConnectOptions = url.parse()?;
        let pool = PgPoolOptions::new()
            .max_connections(CONNECTIONS)
            .acquire_timeout(options.connect_timeout)
            .connect_with(connect)
            .await?;
        let store = PgStore {
            pool,
            owner: new_owner(),
            options,
            held: Arc::new(Mutex::new(HashMap::new())),
            target: redact_url(url),
        };
        store.check_encoding().await?;
        store.migrate().await?;
        Ok(store)
    }

    /// Connects to `url` for the commands that only look (`status`, `dead
    /// list`): never migrates (no advisory lock, no DDL: every transaction
    /// of the session is read-only, `default_transaction_read_only`), and
    /// refuses a schema that is missing, older or newer than this binary's
    /// migrations with the SQLite store's lines
    /// ([`StoreError::Schema`]). Works for a role that may only SELECT.
    pub async fn connect_read_only(url: &str, options: PgOptions) -> Result<PgStore, StoreError> {
        let connect: PgConnectOptions = url.parse()?;
        let connect = connect.options([("default_transaction_read_only", "on")]);
        let pool = PgPoolOptions::new()
            .max_connections(2)
            .acquire_timeout(options.connect_timeout)
            .connect_with(connect)
            .await?;
        let store = PgStore {
            pool,
            owner: new_owner(),
            options,
            held: Arc::new(Mutex::new(HashMap::new())),
            target: redact_url(url),
        };
        store.check_schema().await?;
        Ok(store)
    }

    /// Compares the applied migrations with the binary's, changing nothing.
    async fn check_schema(&self) -> Result<(), StoreError> {
        let table: Option<String> = sqlx::query_scalar("SELECT to_regclass($1)::text")
            .bind(MIGRATIONS_TABLE)
            .fetch_one(&self.pool)
            .await?;
        let applied: Vec<i64> = match table {
            None => Vec::new(),
            Some(_) => {
                sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                    "SELECT version FROM {MIGRATIONS_TABLE} WHERE success ORDER BY version"
                )))
                .fetch_all(&self.pool)
                .await?
            }
        };
        schema_verdict(&applied, &known_migrations()).map_err(|problem| StoreError::Schema {
            path: self.target.clone(),
            problem,
        })
    }

    /// Another handle (another "daemon") on the same database and pool,
    /// with its own owner id and no account: for tests and tools.
    pub fn new_handle(&self, options: PgOptions) -> PgStore {
        PgStore {
            pool: self.pool.clone(),
            owner: new_owner(),
            options,
            held: Arc::new(Mutex::new(HashMap::new())),
            target: self.target.clone(),
        }
    }

    /// The producer contract's checks (Unicode White_Space) need a UTF8
    /// database; another encoding is refused before anything is created.
    async fn check_encoding(&self) -> Result<(), StoreError> {
        let encoding: String = sqlx::query_scalar("SELECT current_setting('server_encoding')")
            .fetch_one(&self.pool)
            .await?;
        if encoding == "UTF8" {
            return Ok(());
        }
        Err(StoreError::Database(sqlx::Error::Configuration(
            format!(
                "the database {} has encoding {encoding}; the outbox needs UTF8 \
                 (CREATE DATABASE ... ENCODING 'UTF8' TEMPLATE template0)",
                self.target
            )
            .into(),
        )))
    }

    /// Applies the migrations of `migrations/postgres`. sqlx's PostgreSQL
    /// migrator holds `pg_advisory_lock` (keyed on the database name) from
    /// before it creates its table until after the last migration. A schema
    /// with migrations this binary does not know is refused.
    async fn migrate(&self) -> Result<(), StoreError> {
        let mut migrator = sqlx::migrate!("./migrations/postgres");
        migrator.dangerous_set_table_name(MIGRATIONS_TABLE);
        match migrator.run(&self.pool).await {
            Ok(()) => Ok(()),
            Err(MigrateError::VersionMissing(_)) => {
                let applied: Vec<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                    "SELECT version FROM {MIGRATIONS_TABLE} WHERE success ORDER BY version"
                )))
                .fetch_all(&self.pool)
                .await?;
                let problem = schema_verdict(&applied, &known_migrations())
                    .err()
                    .unwrap_or(SchemaProblem::Newer { unknown: applied });
                Err(StoreError::Schema {
                    path: self.target.clone(),
                    problem,
                })
            }
            Err(e) => Err(e.into()),
        }
    }

    /// This handle's owner id (`outbox_account_state.lease_owner`).
    pub fn owner(&self) -> uuid::Uuid {
        self.owner
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    fn held_lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, i64>> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The accounts this handle believes it holds, with their tokens.
    pub fn held(&self) -> HashMap<String, i64> {
        self.held_lock().clone()
    }

    fn token(&self, account: &str) -> Option<i64> {
        self.held_lock().get(account).copied()
    }

    fn forget(&self, accounts: &[String]) {
        let mut held = self.held_lock();
        for account in accounts {
            held.remove(account);
        }
    }

    /// Takes up to `at_most` of `accounts` whose lease is free or expired
    /// (skipping those another handle is taking right now), increments each
    /// one's fencing token, and in the same transaction turns the rows a
    /// previous owner left `sending` into `pending` with `needs_reconcile`,
    /// due no earlier than their claim plus `settle`: they are read back
    /// before any resend. Threads left `creating` likewise (read back with
    /// `messageThreads/getAll` before they are created again); `recovered`
    /// counts both. An account this handle held and let expire is
    /// taken again under a new token (its own rows in flight are recovered
    /// the same way).
    pub async fn acquire_accounts(
        &self,
        accounts: &[&str],
        at_most: usize,
    ) -> Result<Vec<Acquired>, StoreError> {
        if accounts.is_empty() || at_most == 0 {
            return Ok(Vec::new());
        }
        let names: Vec<String> = accounts.iter().map(|a| (*a).to_owned()).collect();
        sqlx::query(
            "INSERT INTO outbox_account_state (account) SELECT unnest($1::text[])
             ON CONFLICT (account) DO NOTHING",
        )
        .bind(&names)
        .execute(&self.pool)
        .await?;
        let mut tx = self.pool.begin().await?;
        let taken = sqlx::query(sql::ACQUIRE)
            .bind(&names)
            .bind(self.owner.to_string())
            .bind(i64::try_from(at_most).unwrap_or(i64::MAX))
            .bind(millis(self.options.lease))
            .fetch_all(&mut *tx)
            .await?;
        let mut acquired = Vec::with_capacity(taken.len());
        for row in taken {
            acquired.push(Acquired {
                account: row.try_get("account")?,
                token: row.try_get("lease_token")?,
                recovered: 0,
            });
        }
        if !acquired.is_empty() {
            let taken_names: Vec<&str> = acquired.iter().map(|a| a.account.as_str()).collect();
            let recovered = sqlx::query(sql::RECOVER)
                .bind(&taken_names)
                .bind(millis(self.options.settle))
                .fetch_all(&mut *tx)
                .await?;
            let recovered_threads = sqlx::query(sql::RECOVER_THREADS)
                .bind(&taken_names)
                .bind(millis(self.options.settle))
                .fetch_all(&mut *tx)
                .await?;
            for row in recovered.into_iter().chain(recovered_threads) {
                let account: String = row.try_get("account")?;
                let n = u64::try_from(row.try_get::<i64, _>("n")?).unwrap_or(0);
                if let Some(a) = acquired.iter_mut().find(|a| a.account == account) {
                    a.recovered += n;
                }
            }
        }
        tx.commit().await?;
        let mut held = self.held_lock();
        for a in &acquired {
            held.insert(a.account.clone(), a.token);
        }
        Ok(acquired)
    }

    /// Extends the leases this handle holds, each only while its owner and
    /// token still match. Accounts lost meanwhile are forgotten and reported
    /// as [`StoreError::LeaseLost`] (the others were renewed all the same).
    /// [`DaemonStore::renew_accounts`](super::DaemonStore::renew_accounts)
    /// returns their names instead.
    pub async fn renew(&self) -> Result<(), StoreError> {
        lease_lost(self.renew_lost().await?)
    }

    /// Extends the leases this handle holds; returns (and forgets) the
    /// accounts lost meanwhile.
    async fn renew_lost(&self) -> Result<Vec<String>, StoreError> {
        let (names, tokens): (Vec<String>, Vec<i64>) = self.held().into_iter().unzip();
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let renewed: Vec<String> = sqlx::query_scalar(sql::RENEW)
            .bind(self.owner.to_string())
            .bind(&names)
            .bind(&tokens)
            .bind(millis(self.options.lease))
            .fetch_all(&self.pool)
            .await?;
        let mut lost: Vec<String> = names.into_iter().filter(|n| !renewed.contains(n)).collect();
        lost.sort();
        self.forget(&lost);
        Ok(lost)
    }

    /// Gives up every lease this handle holds (at shutdown, after releasing
    /// its rows): another daemon may take the accounts at once.
    pub async fn release_accounts(&self) -> Result<(), StoreError> {
        let (names, tokens): (Vec<String>, Vec<i64>) = self.held().into_iter().unzip();
        if !names.is_empty() {
            sqlx::query(sql::RELEASE)
                .bind(self.owner.to_string())
                .bind(&names)
                .bind(&tokens)
                .execute(&self.pool)
                .await?;
            self.forget(&names);
        }
        // No longer one of the live daemons: the others' shares grow now
        // (also when this one held nothing).
        sqlx::query("DELETE FROM outbox_daemons WHERE owner = $1::uuid")
            .bind(self.owner.to_string())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Gives up the leases on `accounts` this handle holds (the others are
    /// ignored); with `to`, reserves them for that owner for one lease (a
    /// hand-over: nobody else, this handle included, takes them meanwhile).
    /// Returns (and forgets) those of `accounts` it held: given up, or
    /// lost already.
    pub async fn release_some(
        &self,
        accounts: &[String],
        to: Option<&str>,
    ) -> Result<Vec<String>, StoreError> {
        let held = self.held();
        let (names, tokens): (Vec<String>, Vec<i64>) = accounts
            .iter()
            .filter_map(|a| held.get(a).map(|t| (a.clone(), *t)))
            .unzip();
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let to = match to {
            Some(id) => Some(uuid::Uuid::parse_str(id).map_err(|e| {
                StoreError::Database(sqlx::Error::Protocol(format!(
                    "not a daemon id: {id:?}: {e}"
                )))
            })?),
            None => None,
        };
        let released: Vec<String> = sqlx::query_scalar(sql::RELEASE_SOME)
            .bind(self.owner.to_string())
            .bind(&names)
            .bind(&tokens)
            .bind(to.map(|u| u.to_string()))
            .bind(millis(self.options.lease))
            .fetch_all(&self.pool)
            .await?;
        if released.len() < names.len() {
            tracing::debug!(given_up = ?released, of = ?names, "some accounts were lost already");
        }
        // Given up or lost already: either way no longer this handle's.
        self.forget(&names);
        Ok(names)
    }

    /// Registers this handle as a live daemon for one lease, configured for
    /// `configured`, forgets daemons whose registration ran out, and
    /// returns the live ones with the number of accounts each holds.
    pub async fn fleet(&self, configured: &[String]) -> Result<Fleet, StoreError> {
        let lease = millis(self.options.lease);
        sqlx::query(sql::REGISTER)
            .bind(self.owner.to_string())
            .bind(configured)
            .bind(lease)
            .execute(&self.pool)
            .await?;
        sqlx::query("DELETE FROM outbox_daemons WHERE seen_until <= clock_timestamp()")
            .execute(&self.pool)
            .await?;
        let rows = sqlx::query(sql::FLEET).fetch_all(&self.pool).await?;
        let mut members = Vec::with_capacity(rows.len());
        for row in rows {
            members.push(FleetMember {
                id: row.try_get("owner")?,
                accounts: row
                    .try_get::<Vec<String>, _>("accounts")?
                    .into_iter()
                    .collect(),
                held: usize::try_from(row.try_get::<i64, _>("held")?).unwrap_or(0),
            });
        }
        Ok(Fleet {
            me: self.owner.to_string(),
            members,
        })
    }

    /// Leases due rows of `account` as the SQLite store's `claim_within`
    /// does (at most `limit`, stopping once their texts plus
    /// [`MESSAGE_ENVELOPE_BYTES`] each would pass `max_bytes`, always at
    /// least one), one per thread in thread order. Claims only for an
    /// account this handle holds under an unexpired lease (checked and
    /// share-locked in the same statement: a takeover cannot commit while
    /// the claim runs, and a claim meeting a takeover in progress waits for
    /// it and then finds the lease gone); otherwise claims nothing. Rows are
    /// marked with the account's token.
    ///
    /// The heads are looked for among the first `limit` due rows of the
    /// account (`sql::CLAIM`); when that window was full but gave fewer
    /// than half of `limit` (the backlog is mostly rows waiting behind their
    /// heads), the rest come from a walk over the account's threads
    /// (`sql::CLAIM_WALK`), within the bytes left. Both
    /// take the earliest due heads they see, so together they take what one
    /// scan of the whole backlog would (short of a full `limit` only when
    /// the window gave at least half), at a cost bounded by the window plus
    /// one index descent per thread with unfinished rows.
    /// [`Outbox::claim_within`] delegates here.
    pub async fn claim_within(
        &self,
        account: &str,
        now: SystemTime,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<ClaimedRow>, StoreError> {
        let Some(token) = self.token(account) else {
            return Ok(Vec::new());
        };
        let claim = |sql: &'static str, limit: usize, max_bytes: usize, at_least_one: bool| {
            sqlx::query(sql)
                .bind(account)
                .bind(timestamp(now))
                .bind(to_i64(limit))
                .bind(self.owner.to_string())
                .bind(token)
                .bind(to_i64(max_bytes))
                .bind(to_i64(MESSAGE_ENVELOPE_BYTES))
                .bind(at_least_one)
        };
        let (mut claimed, looked_at) = decode_claimed(
            claim(sql::CLAIM, limit, max_bytes, true)
                .fetch_all(&self.pool)
                .await?,
        )?;
        let used: usize = claimed
            .iter()
            .map(|row| row.text.as_ref().map_or(0, String::len) + MESSAGE_ENVELOPE_BYTES)
            .sum();
        let bytes_left = max_bytes.saturating_sub(used);
        // The window is the first `limit` due rows: full when it saw as many.
        if looked_at >= limit
            && claimed.len() < limit.div_ceil(2)
            && (claimed.is_empty() || bytes_left > MESSAGE_ENVELOPE_BYTES)
        {
            let walked = claim(
                sql::CLAIM_WALK,
                limit - claimed.len(),
                bytes_left,
                claimed.is_empty(),
            )
            .fetch_all(&self.pool)
            .await
            .map_err(StoreError::from)
            .and_then(decode_claimed);
            match walked {
                Ok((more, _)) => claimed.extend(more),
                // The window's rows are `sending` already: an error here
                // must not lose them (they would wait for a takeover).
                Err(e) if !claimed.is_empty() => tracing::warn!(
                    account,
                    error = %e,
                    "the claim's walk over the threads failed; sending what the window found"
                ),
                Err(e) => return Err(e),
            }
        }
        claimed.sort_by_key(|row| row.id);
        Ok(claimed)
    }

    /// Remembers, before a `messages/add` request of `account` is sent, a
    /// time no earlier than its start (as the SQLite store's
    /// `request_starting`): rows it leaves `sending` settle from there at a
    /// takeover. Only the account's owner writes it: [`StoreError::LeaseLost`]
    /// otherwise, and the request must then not be sent.
    pub async fn request_starting(
        &self,
        account: &str,
        started_by: SystemTime,
    ) -> Result<(), StoreError> {
        self.write_account_state(
            account,
            sqlx::query(
                "UPDATE outbox_account_state SET add_started_by = $4::timestamptz
                 WHERE account = $1 AND lease_owner = $2::uuid AND lease_token = $3",
            ),
            |q| q.bind(timestamp(started_by)),
        )
        .await
    }

    /// Inserts one message the way a producer would.
    pub async fn enqueue(
        &self,
        message: &NewMessage,
        new_thread: Option<&NewThread>,
    ) -> Result<Enqueued, StoreError> {
        let (ThreadRef::Id(message_thread_id), None) = (&message.thread, new_thread) else {
            return PgStore::enqueue_with_thread(self, message, new_thread).await;
        };
        let inserted = sqlx::query_scalar::<_, i64>(
            "INSERT INTO outbox (message_thread_id, text, identifier, account)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (identifier) DO NOTHING
             RETURNING id",
        )
        .bind(message_thread_id)
        .bind(&message.text)
        .bind(&message.identifier)
        .bind(&message.account)
        .fetch_optional(&self.pool)
        .await
        .map_err(refused)?;
        if let Some(id) = inserted {
            return Ok(Enqueued::Inserted(id));
        }
        let existing = sqlx::query_scalar::<_, i64>("SELECT id FROM outbox WHERE identifier = $1")
            .bind(&message.identifier)
            .fetch_one(&self.pool)
            .await?;
        Ok(Enqueued::AlreadyThere(existing))
    }

    /// Watches for new rows: LISTEN on [`CHANNEL`], which the insert trigger
    /// notifies at the producer's commit (never before); the receiver
    /// changes on each notification, and every [`SAFETY_POLL`] (or
    /// `poll_interval` if longer) all the same: the safety net for a
    /// notification lost while the listener reconnected. Not every
    /// `poll_interval` (10 ms by default, SQLite's fallback when its WAL
    /// cannot be watched): each change wakes every account loop for a
    /// claim, which kept an idle daemon busy.
    pub async fn watch_changes(
        &self,
        poll_interval: Duration,
        shutdown: CancellationToken,
    ) -> Result<watch::Receiver<u64>, StoreError> {
        let mut listener = PgListener::connect_with(&self.pool).await?;
        listener.listen(CHANNEL).await?;
        let (tx, rx) = watch::channel(0u64);
        let safety = SAFETY_POLL.max(poll_interval);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + safety, safety);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tick.tick() => {}
                    got = listener.recv() => {
                        if let Err(e) = got {
                            tracing::warn!(error = %e, "lost the LISTEN connection; reconnecting");
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                    }
                }
                tx.send_modify(|n| *n = n.wrapping_add(1));
            }
        });
        Ok(rx)
    }

    /// Closes every connection.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

impl Outbox for PgStore {
    async fn claim_within(
        &self,
        account: &str,
        now: SystemTime,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<ClaimedRow>, StoreError> {
        PgStore::claim_within(self, account, now, limit, max_bytes).await
    }

    async fn request_starting(
        &self,
        account: &str,
        started_by: SystemTime,
    ) -> Result<(), StoreError> {
        PgStore::request_starting(self, account, started_by).await
    }

    async fn next_due(
        &self,
        account: &str,
        now: SystemTime,
    ) -> Result<Option<SystemTime>, StoreError> {
        let next: Option<i64> = sqlx::query_scalar(sql::NEXT_DUE)
            .bind(account)
            .bind(timestamp(now))
            .fetch_one(&self.pool)
            .await?;
        Ok(next.map(micros_to_time))
    }

    /// Stores outcomes only for rows still `sending` under the token of an
    /// account this handle holds; outcomes of rows claimed under a lease
    /// since lost change nothing and are reported as
    /// [`StoreError::LeaseLost`] (those of accounts still held are stored).
    async fn record(
        &self,
        outcomes: &[(i64, RowOutcome)],
        now: SystemTime,
    ) -> Result<(), StoreError> {
        if outcomes.is_empty() {
            return Ok(());
        }
        let now = timestamp(now);
        let items: Vec<serde_json::Value> = outcomes
            .iter()
            .map(|(id, outcome)| match outcome {
                RowOutcome::Delivered {
                    mews_message_id,
                    mews_created_utc,
                    mews_sender,
                } => json!({
                    "id": id, "status": "delivered", "attempt": 0,
                    "mews_message_id": mews_message_id,
                    "mews_created_utc": mews_created_utc,
                    "mews_sender": mews_sender,
                }),
                RowOutcome::Retry {
                    at,
                    error,
                    attempt,
                    maybe_stored,
                } => json!({
                    "id": id, "status": "pending", "attempt": i32::from(*attempt),
                    "next_attempt_at": timestamp(*at), "error": error,
                    "maybe_stored": i32::from(*maybe_stored),
                }),
                RowOutcome::Dead { error } => json!({
                    "id": id, "status": "dead", "attempt": 1, "error": error,
                }),
                RowOutcome::Release => json!({
                    "id": id, "status": "pending", "attempt": 0, "next_attempt_at": now,
                }),
            })
            .collect();
        let lost: Vec<String> = sqlx::query_scalar(sql::RECORD)
            .bind(serde_json::Value::Array(items))
            .bind(&now)
            .bind(self.owner.to_string())
            .fetch_all(&self.pool)
            .await?;
        lease_lost(lost)
    }

    async fn pauses(&self) -> Result<Vec<AccountPause>, StoreError> {
        let rows = sqlx::query(
            "SELECT account, (extract(epoch FROM paused_until) * 1000000)::bigint AS until_us,
                    pause_reason, pause_streak
             FROM outbox_account_state WHERE paused_until IS NOT NULL",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut pauses = Vec::with_capacity(rows.len());
        for row in rows {
            pauses.push(AccountPause {
                account: row.try_get("account")?,
                until: micros_to_time(row.try_get("until_us")?),
                reason: row
                    .try_get::<Option<String>, _>("pause_reason")?
                    .unwrap_or_default(),
                streak: u32::try_from(row.try_get::<i32, _>("pause_streak")?).unwrap_or(0),
            });
        }
        Ok(pauses)
    }

    /// Only the account's owner pauses it: changes nothing and reports
    /// [`StoreError::LeaseLost`] unless this handle holds it.
    async fn save_pause(&self, pause: &AccountPause) -> Result<(), StoreError> {
        let streak = i32::try_from(pause.streak).unwrap_or(i32::MAX);
        self.write_account_state(
            &pause.account,
            sqlx::query(
                "UPDATE outbox_account_state
                 SET paused_until = $4::timestamptz, pause_reason = $5, pause_streak = $6
                 WHERE account = $1 AND lease_owner = $2::uuid AND lease_token = $3",
            ),
            |q| {
                q.bind(timestamp(pause.until))
                    .bind(pause.reason.clone())
                    .bind(streak)
            },
        )
        .await
    }

    async fn clear_pause(&self, account: &str) -> Result<(), StoreError> {
        self.write_account_state(
            account,
            sqlx::query(
                "UPDATE outbox_account_state
                 SET paused_until = NULL, pause_reason = NULL, pause_streak = 0
                 WHERE account = $1 AND lease_owner = $2::uuid AND lease_token = $3",
            ),
            |q| q,
        )
        .await
    }

    async fn clear_reconcile(&self, ids: &[i64]) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        let lost: Vec<String> = sqlx::query_scalar(sql::CLEAR_RECONCILE)
            .bind(ids)
            .bind(self.owner.to_string())
            .fetch_all(&self.pool)
            .await?;
        lease_lost(lost)
    }

    /// Touches only rows of accounts this handle holds.
    async fn dead_letter_held(
        &self,
        rows: &[(i64, String)],
        held_prefix: &str,
        now: SystemTime,
    ) -> Result<u64, StoreError> {
        if rows.is_empty() {
            return Ok(0);
        }
        let (ids, errors): (Vec<i64>, Vec<String>) = rows.iter().cloned().unzip();
        let done = sqlx::query(
            "WITH held AS (
                 SELECT account FROM outbox_account_state
                 WHERE lease_owner = $5::uuid ORDER BY account FOR SHARE)
             UPDATE outbox o SET status = 'dead', dead_at = $3::timestamptz, last_error = u.error
             FROM unnest($1::bigint[], $2::text[]) AS u(id, error)
             WHERE o.id = u.id AND o.status = 'pending'
               AND left(o.last_error, length($4)) = $4
               AND o.account IN (SELECT account FROM held)",
        )
        .bind(&ids)
        .bind(&errors)
        .bind(timestamp(now))
        .bind(held_prefix)
        .bind(self.owner.to_string())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    async fn owned_message_ids(&self, ids: &[&str]) -> Result<HashSet<String>, StoreError> {
        if ids.is_empty() {
            return Ok(HashSet::new());
        }
        let owned: Vec<String> = sqlx::query_scalar(
            "SELECT mews_message_id FROM outbox WHERE mews_message_id = ANY($1::text[])",
        )
        .bind(ids)
        .fetch_all(&self.pool)
        .await?;
        Ok(owned.into_iter().collect())
    }

    async fn recent_requests(&self, account: &str) -> Result<Vec<SystemTime>, StoreError> {
        let stored: Option<Option<String>> = sqlx::query_scalar(
            "SELECT recent_requests FROM outbox_account_state WHERE account = $1",
        )
        .bind(account)
        .fetch_optional(&self.pool)
        .await?;
        Ok(stored
            .flatten()
            .map(|text| super::decode_recent_requests(&text))
            .unwrap_or_default())
    }

    /// Only the account's owner writes its limiter memory.
    async fn save_recent_requests(
        &self,
        account: &str,
        ends: &[SystemTime],
    ) -> Result<(), StoreError> {
        let ends = super::encode_recent_requests(ends);
        self.write_account_state(
            account,
            sqlx::query(
                "UPDATE outbox_account_state SET recent_requests = $4
                 WHERE account = $1 AND lease_owner = $2::uuid AND lease_token = $3",
            ),
            |q| q.bind(ends.clone()),
        )
        .await
    }

    async fn claim_thread(
        &self,
        account: &str,
        now: SystemTime,
    ) -> Result<Option<ClaimedThread>, StoreError> {
        PgStore::claim_thread(self, account, now).await
    }

    async fn next_thread_due(
        &self,
        account: &str,
        now: SystemTime,
    ) -> Result<Option<SystemTime>, StoreError> {
        PgStore::next_thread_due(self, account, now).await
    }

    async fn record_thread(
        &self,
        id: i64,
        outcome: &ThreadOutcome,
        now: SystemTime,
    ) -> Result<(), StoreError> {
        PgStore::record_thread(self, id, outcome, now).await
    }

    async fn owned_thread_ids(&self, ids: &[&str]) -> Result<HashSet<String>, StoreError> {
        PgStore::owned_thread_ids(self, ids).await
    }
}

type PgQuery<'q> = sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>;

impl PgStore {
    /// Runs an UPDATE of `outbox_account_state` whose first three
    /// parameters are account, owner and token; no row changed means the
    /// lease is lost.
    async fn write_account_state<'q>(
        &self,
        account: &str,
        query: PgQuery<'q>,
        more: impl FnOnce(PgQuery<'q>) -> PgQuery<'q>,
    ) -> Result<(), StoreError> {
        let lost = || StoreError::LeaseLost {
            account: account.to_owned(),
        };
        let Some(token) = self.token(account) else {
            return Err(lost());
        };
        let query = query
            .bind(account.to_owned())
            .bind(self.owner.to_string())
            .bind(token);
        let done = more(query).execute(&self.pool).await?;
        if done.rows_affected() == 0 {
            return Err(lost());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_redacted_wherever_the_password_hides() {
        assert_eq!(
            redact_url("postgres://outbox:pa%40ss@db.example:5432/outbox"),
            "postgres://outbox:***@db.example:5432/outbox"
        );
        let q = redact_url("postgres://outbox@db/outbox?password=hunter2&sslmode=require");
        assert!(
            !q.contains("hunter2") && q.contains("sslmode=require"),
            "{q}"
        );
        assert_eq!(redact_url("postgres://db/outbox"), "postgres://db/outbox");
        assert_eq!(redact_url("not a url"), "<unparsable database URL>");
    }

    #[test]
    fn owner_ids_are_random_version_4_uuids() {
        let (a, b) = (new_owner(), new_owner());
        assert_ne!(a, b);
        assert_eq!(a.get_version_num(), 4);
    }
}
