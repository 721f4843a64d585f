//! The outbox store: the only place with SQL, behind four traits:
//! [`Outbox`] (the delivery loop), [`DaemonStore`] (the daemon: accounts,
//! recovery, waking, the queue's summary), [`Upkeep`] (housekeeping) and
//! [`OperatorStore`] (the operator's commands). [`sqlite::SqliteStore`]
//! implements them all, and so does the PostgreSQL store ([`postgres`]:
//! several daemons over one database, account leases with fencing tokens
//! instead of a file lock and start-up recovery).

pub mod fleet;
#[cfg(test)]
pub mod memory;
pub mod postgres;
mod report;
pub mod schema;
pub mod sqlite;
pub mod thread;

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::time::SystemTime;

use serde::Serialize;

pub use fleet::{Fleet, FleetMember};
pub use sqlite::SqliteStore;
pub use thread::{
    ClaimedThread, DeadThread, NewThread, ThreadCounts, ThreadOutcome, ThreadRef, ThreadStatus,
};

/// Where a row stands. Backed in SQL by a CHECK on `outbox.status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Waiting to be claimed (new, or scheduled for a retry).
    Pending,
    /// Claimed by the daemon; a request carrying it may be in flight.
    Sending,
    /// Mews returned an Id for it.
    Delivered,
    /// Given up on; `last_error` says why. Only an operator revives it.
    Dead,
}

impl Status {
    pub const ALL: [Status; 4] = [
        Status::Pending,
        Status::Sending,
        Status::Delivered,
        Status::Dead,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Sending => "sending",
            Status::Delivered => "delivered",
            Status::Dead => "dead",
        }
    }

    pub fn parse(s: &str) -> Option<Status> {
        Status::ALL.into_iter().find(|status| status.as_str() == s)
    }
}

/// A row leased to the delivery loop.
#[derive(Debug, Clone)]
pub struct ClaimedRow {
    pub id: i64,
    pub message_thread_id: String,
    /// `Err` when a producer stored bytes that are not UTF-8 (through a cast).
    pub text: Result<String, std::string::FromUtf8Error>,
    /// Attempts before this one.
    pub attempts: u32,
    /// Mews may already hold this row (see the `needs_reconcile` column).
    pub needs_reconcile: bool,
    /// When a request carrying this row was first sent (set by the claim).
    pub first_sent_at: Option<SystemTime>,
}

/// What to store for one claimed row.
#[derive(Debug, Clone, PartialEq)]
pub enum RowOutcome {
    Delivered {
        mews_message_id: String,
        mews_created_utc: String,
        mews_sender: String,
    },
    /// Back to `pending` until `at`. `attempt` when this counts as an
    /// attempt; `maybe_stored` when Mews may have stored it anyway (the row
    /// is then read back before it is sent again).
    Retry {
        at: SystemTime,
        error: String,
        attempt: bool,
        maybe_stored: bool,
    },
    Dead {
        error: String,
    },
    /// Back to `pending`, due now, untouched (shutdown, account paused).
    Release,
}

/// A new message, as `enqueue` inserts it.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub thread: ThreadRef,
    pub text: String,
    pub identifier: Option<String>,
    pub account: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueued {
    Inserted(i64),
    /// A row with the same `identifier` already existed: nothing was inserted.
    AlreadyThere(i64),
}

/// An account's remembered pause: no request before `until`.
#[derive(Debug, Clone, PartialEq)]
pub struct AccountPause {
    pub account: String,
    pub until: SystemTime,
    pub reason: String,
    /// Consecutive pauses, for exponential growth.
    pub streak: u32,
}

/// Counts and ages per account, for `status` and the logs.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AccountStatus {
    pub account: String,
    pub pending: u64,
    pub sending: u64,
    pub delivered: u64,
    pub dead: u64,
    pub oldest_pending_created_at: Option<String>,
    pub next_retry_at: Option<String>,
    pub last_error: Option<String>,
    pub paused_until: Option<String>,
    pub pause_reason: Option<String>,
    /// The most common reasons among this account's dead rows, most common
    /// first (RequestIds left out so that equal errors group).
    pub dead_errors: Vec<ErrorCount>,
    /// This account's threads (`outbox_threads`) by status, and the
    /// messages waiting for one.
    pub threads: ThreadCounts,
}

/// How many dead rows share one `last_error`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ErrorCount {
    pub error: String,
    pub rows: u64,
}

/// A dead row, for `dead list`.
#[derive(Debug, Clone, Serialize)]
pub struct DeadRow {
    pub id: i64,
    pub account: String,
    /// The Mews thread: the row's `message_thread_id`, or its thread's id
    /// once its `thread_key`'s thread was created.
    pub message_thread_id: Option<String>,
    /// The row's `thread_key`, when it names its thread by key.
    pub thread_key: Option<String>,
    /// The text, lossily decoded if a producer stored bytes that are not UTF-8.
    pub text: String,
    pub attempts: u32,
    pub last_error: Option<String>,
    pub created_at: String,
    pub dead_at: Option<String>,
}

/// Which dead rows `dead requeue` revives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requeue {
    /// Exactly these rows; refused unless every one is dead (and of the
    /// account, when one is given).
    Ids(Vec<i64>),
    /// Every dead row (of the account, when one is given).
    All,
}

/// Why a store operation failed. Each cause appears once in the printed
/// chain (see [`crate::error_chain`]).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sqlx's message already ends with its own cause (`error returned from
    /// database: (code: 14) unable to open database file`) and sqlx returns
    /// that cause again as its `source()`: shown here in the message and not
    /// exposed as a source, so a chain names SQLite's error once, not three
    /// times. The `Display` of this variant, which the daemon's log lines
    /// print, keeps the whole cause.
    #[error("database error: {0}")]
    Database(sqlx::Error),
    /// As for `Database`: sqlx's migration errors embed their cause too.
    #[error("cannot apply the outbox migrations: {0}")]
    Migrate(sqlx::migrate::MigrateError),
    /// A producer-facing constraint refused the row.
    #[error("refused by the outbox table: {0}")]
    Refused(String),
    /// `dead requeue` named rows that are not dead: nothing was changed.
    #[error("nothing requeued: {0}")]
    NotDead(String),
    #[error("cannot create the database file {path}")]
    Create {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// A read-only command found a schema it must not migrate.
    #[error("the database {path} {problem}")]
    Schema {
        path: String,
        problem: schema::SchemaProblem,
    },
    /// PostgreSQL store: this daemon no longer holds the account's lease
    /// (another daemon took it over); nothing was changed for it.
    #[error("lost the lease on account {account}: another daemon owns it now")]
    LeaseLost { account: String },
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> StoreError {
        StoreError::Database(e)
    }
}

impl From<sqlx::migrate::MigrateError> for StoreError {
    fn from(e: sqlx::migrate::MigrateError) -> StoreError {
        StoreError::Migrate(e)
    }
}

/// What the delivery loop needs from a store. Every method is one short
/// statement or transaction; none is held across an HTTP request.
pub trait Outbox: Clone + Send + Sync + 'static {
    /// Leases up to `limit` due `pending` rows of `account` as `sending`: the
    /// oldest due first, at most one per thread, and only rows with no earlier
    /// unfinished (`pending`/`sending`) row in their thread. No byte bound:
    /// [`Outbox::claim_within`] with `usize::MAX`.
    fn claim(
        &self,
        account: &str,
        now: SystemTime,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<ClaimedRow>, StoreError>> + Send {
        self.claim_within(account, now, limit, usize::MAX)
    }

    /// Like [`Outbox::claim`], but stops once the claimed texts (plus
    /// `sql::MESSAGE_ENVELOPE_BYTES` each) would pass `max_bytes`; always
    /// claims at least one row when one is due.
    fn claim_within(
        &self,
        account: &str,
        now: SystemTime,
        limit: usize,
        max_bytes: usize,
    ) -> impl Future<Output = Result<Vec<ClaimedRow>, StoreError>> + Send;

    /// When the next row of `account` that is not blocked by its thread
    /// becomes due, if any is scheduled after `now`.
    fn next_due(
        &self,
        account: &str,
        now: SystemTime,
    ) -> impl Future<Output = Result<Option<SystemTime>, StoreError>> + Send;

    /// Stores the outcomes of claimed rows in one transaction.
    fn record(
        &self,
        outcomes: &[(i64, RowOutcome)],
        now: SystemTime,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Remembered pauses of all accounts.
    fn pauses(&self) -> impl Future<Output = Result<Vec<AccountPause>, StoreError>> + Send;

    fn save_pause(
        &self,
        pause: &AccountPause,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    fn clear_pause(&self, account: &str) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Marks `sending` rows as checked against Mews and not found there:
    /// they are sent again as new.
    fn clear_reconcile(&self, ids: &[i64]) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Makes `dead` (with these errors) rows that still wait `pending`
    /// with a last error starting with `held_prefix`: held rejections that
    /// turned out to be the rows' own. A row changed meanwhile (claimed,
    /// delivered, requeued by an operator) is left alone. Returns how many
    /// became dead.
    fn dead_letter_held(
        &self,
        rows: &[(i64, String)],
        held_prefix: &str,
        now: SystemTime,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Which of these Mews message Ids a row of ours already owns.
    fn owned_message_ids(
        &self,
        ids: &[&str],
    ) -> impl Future<Output = Result<HashSet<String>, StoreError>> + Send;

    /// Remembers, before a `messages/add` request of `account` is sent, a
    /// time no earlier than its start: rows it leaves `sending` (a crash, a
    /// request abandoned) settle from there ([`DaemonStore::recover_abandoned`]).
    fn request_starting(
        &self,
        account: &str,
        started_by: SystemTime,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// End times of the account's latest requests (for the rate limiter).
    fn recent_requests(
        &self,
        account: &str,
    ) -> impl Future<Output = Result<Vec<SystemTime>, StoreError>> + Send;

    fn save_recent_requests(
        &self,
        account: &str,
        ends: &[SystemTime],
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Leases the oldest due `pending` thread of `account` as `creating`
    /// (setting `first_sent_at` when unset), or `None` when none is due.
    fn claim_thread(
        &self,
        account: &str,
        now: SystemTime,
    ) -> impl Future<Output = Result<Option<ClaimedThread>, StoreError>> + Send;

    /// When the next `pending` thread of `account` becomes due, if one is
    /// scheduled after `now`.
    fn next_thread_due(
        &self,
        account: &str,
        now: SystemTime,
    ) -> impl Future<Output = Result<Option<SystemTime>, StoreError>> + Send;

    /// Stores a claimed thread's outcome, with what it means for the
    /// thread's waiting messages ([`ThreadOutcome`]), in one transaction.
    fn record_thread(
        &self,
        id: i64,
        outcome: &ThreadOutcome,
        now: SystemTime,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Which of these Mews thread Ids a thread of ours already owns.
    fn owned_thread_ids(
        &self,
        ids: &[&str],
    ) -> impl Future<Output = Result<HashSet<String>, StoreError>> + Send;
}

/// One account's share of the queue.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccountQueue {
    pub pending: u64,
    pub sending: u64,
    pub dead: u64,
    /// `created_at` of the oldest pending row.
    pub oldest_pending: Option<SystemTime>,
    /// The account's threads by status, and the messages waiting for one.
    pub threads: ThreadCounts,
}

/// The queue at one moment, for the heartbeat and `STATUS=`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueSummary {
    /// Accounts with pending, sending or dead rows.
    pub accounts: BTreeMap<String, AccountQueue>,
    /// Rows delivered after the given time.
    pub delivered_since: u64,
}

impl QueueSummary {
    pub fn pending(&self) -> u64 {
        self.accounts.values().map(|a| a.pending).sum()
    }
    pub fn sending(&self) -> u64 {
        self.accounts.values().map(|a| a.sending).sum()
    }
    pub fn dead(&self) -> u64 {
        self.accounts.values().map(|a| a.dead).sum()
    }
    pub fn oldest_pending(&self) -> Option<SystemTime> {
        self.accounts
            .values()
            .filter_map(|a| a.oldest_pending)
            .min()
    }
}

/// An account this daemon took to deliver for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acquired {
    pub account: String,
    /// The account's fencing token for this ownership (PostgreSQL; 0 for
    /// SQLite, whose file lock makes the daemon the only owner).
    pub token: i64,
    /// Rows a previous owner left `sending` and threads it left `creating`,
    /// now `pending` to be read back (as `DaemonStore::recover_abandoned` counts).
    pub recovered: u64,
}

/// What the daemon itself needs beyond the delivery loop's [`Outbox`]:
/// which accounts it delivers for, waking on new rows, recovery, and its
/// view of the queue for the heartbeat and `STATUS=`. A store is opened by
/// its own constructor (a file path, a URL); everything after is this trait.
pub trait DaemonStore: Outbox {
    /// How the store names itself in log lines and errors (a path, or a URL
    /// with its password redacted).
    fn describe(&self) -> String;

    /// Takes up to `at_most` of `configured` to deliver for, that no other
    /// daemon holds; returns those newly taken (an account already held is
    /// not returned again). SQLite: every configured account (the file lock
    /// already made this daemon the only one). PostgreSQL: account leases.
    fn acquire_accounts(
        &self,
        configured: &[&str],
        at_most: usize,
    ) -> impl Future<Output = Result<Vec<Acquired>, StoreError>> + Send;

    /// Extends this daemon's hold on its accounts; returns the accounts it
    /// lost meanwhile (their loops must stop: another daemon owns them).
    /// SQLite: never loses any.
    fn renew_accounts(&self) -> impl Future<Output = Result<Vec<String>, StoreError>> + Send;

    /// Gives up every account (at shutdown, after the loops stopped).
    fn release_accounts(&self) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Puts rows this store's previous owner left `sending` back to
    /// `pending`, to be read back before they are sent again, not due before
    /// their request's start plus `settle`; threads left `creating` likewise
    /// (read back with `messageThreads/getAll` before they are created
    /// again). Returns how many rows and threads. (PostgreSQL does this at
    /// each takeover instead and returns 0.)
    fn recover_abandoned(
        &self,
        settle: std::time::Duration,
        now: SystemTime,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// A receiver that changes whenever rows may have been added or changed
    /// (a producer's commit), and at least every `poll_interval`.
    fn watch_changes(
        &self,
        poll_interval: std::time::Duration,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> impl Future<Output = Result<tokio::sync::watch::Receiver<u64>, StoreError>> + Send;

    /// Counts of unfinished and dead rows per account and deliveries since `since`.
    fn queue_summary(
        &self,
        since: SystemTime,
    ) -> impl Future<Output = Result<QueueSummary, StoreError>> + Send;

    /// Closes every connection (at shutdown).
    fn close(&self) -> impl Future<Output = ()> + Send;

    /// Whether the daemon must stop because its storage is no longer the
    /// one it opened (checked every second; cheap, no query). SQLite: the
    /// database file was deleted or replaced under a daemon that holds its
    /// lock. PostgreSQL: never (`None`).
    fn storage_lost(&self) -> Option<StorageLost>;

    /// Gives up `accounts` at once (their loops have stopped), so that
    /// another daemon takes them at its next round instead of after the
    /// lease; `to` (a [`FleetMember::id`]) reserves them for that daemon
    /// for one lease (a hand-over when rebalancing). Returns the accounts
    /// this daemon no longer holds (given up, or lost already). SQLite:
    /// none (one daemon holds everything, and keeps it).
    fn release_some(
        &self,
        _accounts: &[String],
        _to: Option<&str>,
    ) -> impl Future<Output = Result<Vec<String>, StoreError>> + Send {
        async { Ok(Vec::new()) }
    }

    /// Registers this daemon as alive, configured for `configured`, and
    /// returns the live daemons sharing the store, for rebalancing. None:
    /// the store is not shared (SQLite).
    fn fleet(
        &self,
        _configured: &[String],
    ) -> impl Future<Output = Result<Option<Fleet>, StoreError>> + Send {
        async { Ok(None) }
    }
}

/// Why a daemon stops: its storage is gone from under it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct StorageLost {
    /// What happened (also the daemon's error at exit).
    pub reason: String,
    /// How the restart that follows goes on and what an operator should
    /// check, continuing the log line "…; stopping with an error so that
    /// systemd restarts the daemon".
    pub on_restart: String,
}

/// The daemon's housekeeping task: flags rows of accounts nobody
/// configured, prunes delivered rows, and gives space back.
pub trait Upkeep: Clone + Send + Sync + 'static {
    /// Accounts that have `pending` rows but are not in `configured`, with
    /// their counts; those rows (and rows waiting behind them in their
    /// thread) get a `last_error` saying why they wait.
    fn flag_unknown_accounts(
        &self,
        configured: &[&str],
    ) -> impl Future<Output = Result<Vec<(String, u64)>, StoreError>> + Send;

    /// Messages (`pending`, by `thread_key`) whose key names no thread of
    /// their account in `outbox_threads`, per (account, thread_key) with
    /// their counts; they get [`thread::no_such_thread`] as `last_error`.
    fn flag_threadless_rows(
        &self,
    ) -> impl Future<Output = Result<Vec<(String, String, u64)>, StoreError>> + Send;

    /// Deletes up to `limit` rows delivered before `before`, oldest first,
    /// in one short transaction. Returns how many; dead rows are never touched.
    fn prune_delivered(
        &self,
        before: SystemTime,
        limit: usize,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Gives up to `pages` free pages back to the file system; returns how
    /// many. (PostgreSQL: autovacuum does this; 0.)
    fn give_back_free_pages(
        &self,
        pages: u32,
    ) -> impl Future<Output = Result<i64, StoreError>> + Send;

    /// A one-time warning about how the storage is set up, if any (SQLite:
    /// a file without incremental auto-vacuum never shrinks).
    fn storage_warning(&self) -> impl Future<Output = Option<String>> + Send;
}

/// The operator's commands (`enqueue`, `status`, `dead ...`).
pub trait OperatorStore: Send + Sync {
    /// Inserts one message the way a producer would; with `new_thread`
    /// (only for a message whose thread is [`ThreadRef::Key`] of the same
    /// key), inserts that thread first in the same transaction unless its
    /// key already exists for the account (then the message joins it).
    /// A message whose `identifier` is already there inserts nothing, the
    /// thread included ([`Enqueued::AlreadyThere`]).
    fn enqueue(
        &self,
        message: &NewMessage,
        new_thread: Option<&NewThread>,
    ) -> impl Future<Output = Result<Enqueued, StoreError>> + Send;

    /// Counts, ages and pauses per account (every account with rows or a pause).
    fn status(
        &self,
        now: SystemTime,
    ) -> impl Future<Output = Result<Vec<AccountStatus>, StoreError>> + Send;

    /// Dead rows, oldest first, of one account or all.
    fn dead_rows(
        &self,
        account: Option<&str>,
    ) -> impl Future<Output = Result<Vec<DeadRow>, StoreError>> + Send;

    /// Puts dead rows back to `pending`, due now, attempts reset. Named rows
    /// that are not all dead (or not of `account`) are refused as a whole
    /// ([`StoreError::NotDead`]). Returns the ids requeued.
    fn requeue_dead(
        &self,
        which: &Requeue,
        account: Option<&str>,
        now: SystemTime,
    ) -> impl Future<Output = Result<Vec<i64>, StoreError>> + Send;

    /// Deletes dead rows that died before `cutoff` (of `account`, or all).
    fn purge_dead(
        &self,
        cutoff: SystemTime,
        account: Option<&str>,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Dead threads, oldest first, of one account or all.
    fn dead_threads(
        &self,
        account: Option<&str>,
    ) -> impl Future<Output = Result<Vec<DeadThread>, StoreError>> + Send;

    /// Puts dead threads back to `pending`, due now, attempts reset, as
    /// [`OperatorStore::requeue_dead`] does for rows. Their held messages
    /// follow once the thread is created. Returns the thread ids requeued.
    fn requeue_dead_threads(
        &self,
        which: &Requeue,
        account: Option<&str>,
        now: SystemTime,
    ) -> impl Future<Output = Result<Vec<i64>, StoreError>> + Send;

    /// Deletes dead threads that died before `cutoff` (of `account`, or
    /// all). The messages held behind each become `dead` in the same
    /// transaction, with an error naming the purged thread, so that none
    /// waits for ever unseen. Returns how many threads.
    fn purge_dead_threads(
        &self,
        cutoff: SystemTime,
        account: Option<&str>,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;
}

/// `2026-11-28T07:21:07.123Z`: the timestamp format of every time column.
pub fn timestamp(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// Reads a time column back; `None` for anything that is not one.
pub fn parse_timestamp(s: &str) -> Option<SystemTime> {
    humantime::parse_rfc3339_weak(s.trim_end_matches('Z')).ok()
}

/// The limiter memory as `outbox_account_state.recent_requests` holds it:
/// a JSON array of [`timestamp`]s.
pub(crate) fn encode_recent_requests(ends: &[SystemTime]) -> String {
    let ends: Vec<String> = ends.iter().map(|t| timestamp(*t)).collect();
    serde_json::to_string(&ends).unwrap_or_else(|_| "[]".into())
}

/// Reads [`encode_recent_requests`]'s text back. Unreadable memory is no
/// memory: the limiter starts empty.
pub(crate) fn decode_recent_requests(text: &str) -> Vec<SystemTime> {
    let ends: Vec<String> = serde_json::from_str(text).unwrap_or_default();
    ends.iter().filter_map(|t| parse_timestamp(t)).collect()
}

/// Claimed rows `ids`, one thread each, as unit tests of the delivery logic need them.
#[cfg(test)]
pub(crate) fn test_rows(ids: std::ops::RangeInclusive<i64>) -> Vec<ClaimedRow> {
    ids.map(|id| ClaimedRow {
        id,
        message_thread_id: format!("{id:08}-0000-4000-8000-000000000000"),
        text: Ok(format!("m{id}")),
        attempts: 0,
        needs_reconcile: false,
        first_sent_at: None,
    })
    .collect()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::error_chain::ErrorChain;

    #[tokio::test]
    async fn sqlites_error_appears_once_in_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("not-a-database");
        std::fs::write(
            &db,
            "just some text, long enough to be read as a header\n".repeat(20),
        )
        .unwrap();
        let e = SqliteStore::open_existing(&db, Duration::from_secs(1))
            .await
            .err()
            .unwrap();
        assert!(matches!(e, StoreError::Database(_)), "{e:?}");
        let chain = ErrorChain(&e).to_string();
        assert_eq!(
            chain.matches("file is not a database").count(),
            1,
            "{chain}"
        );
        assert_eq!(
            chain,
            e.to_string(),
            "a log line printing the error alone shows the cause too"
        );
    }

    #[tokio::test]
    async fn a_database_file_that_cannot_be_created_names_the_cause_once() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("missing").join("outbox.db");
        let e = SqliteStore::open(&db, Duration::from_secs(1))
            .await
            .err()
            .unwrap();
        let chain = ErrorChain(&e).to_string();
        assert_eq!(
            chain.matches("No such file or directory").count(),
            1,
            "{chain}"
        );
        assert!(
            chain.starts_with("cannot create the database file"),
            "{chain}"
        );
    }
}
