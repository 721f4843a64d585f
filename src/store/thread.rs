//! Threads through the outbox (`outbox_threads`): the types the stores, the
//! delivery loop and the operator's commands share.
//!
//! A producer inserts a row into `outbox_threads` with a `thread_key` of its
//! choice (unique per account), a `subject` and an `original_sender`, and
//! messages into `outbox` that name that `thread_key` instead of a
//! `message_thread_id`. The daemon creates the thread with
//! `messageThreads/add` and, in the same transaction that records the
//! thread's Mews id, gives every waiting message of that key the id
//! (`outbox.keyed_thread_id`): from then on they are ordinary rows of that
//! Mews thread, sent in insertion order with its other messages. A message
//! inserted after its thread exists takes the id at insert time.

use std::time::SystemTime;

use serde::Serialize;

/// Where a thread row stands. Backed in SQL by a CHECK on
/// `outbox_threads.status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ThreadStatus {
    /// Waiting to be created (new, or scheduled for a retry).
    Pending,
    /// Claimed by the daemon; a `messageThreads/add` for it may be in flight.
    Creating,
    /// Mews returned its Id (or a read-back found it): `mews_thread_id` is set.
    Created,
    /// Given up on; `last_error` says why. Its messages are held (pending,
    /// with a `last_error` naming the thread) until an operator requeues it.
    Dead,
}

impl ThreadStatus {
    pub const ALL: [ThreadStatus; 4] = [
        ThreadStatus::Pending,
        ThreadStatus::Creating,
        ThreadStatus::Created,
        ThreadStatus::Dead,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ThreadStatus::Pending => "pending",
            ThreadStatus::Creating => "creating",
            ThreadStatus::Created => "created",
            ThreadStatus::Dead => "dead",
        }
    }

    pub fn parse(s: &str) -> Option<ThreadStatus> {
        ThreadStatus::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

/// A thread leased to the delivery loop (`pending` → `creating`).
#[derive(Debug, Clone, PartialEq)]
pub struct ClaimedThread {
    /// `outbox_threads.id`.
    pub id: i64,
    pub thread_key: String,
    pub subject: String,
    pub original_sender: String,
    /// Creation attempts before this one.
    pub attempts: u32,
    /// Mews may already hold this thread: read back (`messageThreads/getAll`)
    /// before creating it again.
    pub needs_reconcile: bool,
    /// When a `messageThreads/add` for it was first sent (set by the claim).
    pub first_sent_at: Option<SystemTime>,
}

/// What to store for one claimed thread.
#[derive(Debug, Clone, PartialEq)]
pub enum ThreadOutcome {
    /// The thread exists at Mews. In the same transaction every waiting
    /// `outbox` row of its key takes `mews_thread_id` (and loses a held
    /// error), so that they are claimed in their thread's order.
    Created {
        mews_thread_id: String,
        /// Mews's `CreatedUtc`, as returned.
        mews_created_utc: String,
    },
    /// Back to `pending` until `at`; as [`super::RowOutcome::Retry`].
    Retry {
        at: SystemTime,
        error: String,
        attempt: bool,
        maybe_stored: bool,
    },
    /// `dead` with this error; in the same transaction its waiting `outbox`
    /// rows get a `last_error` that starts with [`HELD_BY_THREAD_PREFIX`]
    /// and names the thread (they stay `pending`, never claimed).
    Dead { error: String },
    /// Back to `pending`, due now, untouched (shutdown, account paused).
    Release,
}

/// The start of the `last_error` of a message held because its thread is
/// dead: `held: thread 'KEY' (outbox_threads id N) is dead: ERROR; requeue
/// it with mews-outbox dead requeue --thread N`.
pub const HELD_BY_THREAD_PREFIX: &str = "held: thread ";

/// The `last_error` of a message held behind a dead thread.
pub fn held_by_thread(thread_key: &str, thread_id: i64, error: &str) -> String {
    format!(
        "{HELD_BY_THREAD_PREFIX}{thread_key:?} (outbox_threads id {thread_id}) is dead: {error}; requeue it with `mews-outbox dead requeue --thread {thread_id}`"
    )
}

/// The `last_error` of a message whose `thread_key` names no row of
/// `outbox_threads` (of its account), set by housekeeping.
pub fn no_such_thread(account: &str, thread_key: &str) -> String {
    format!(
        "waiting for its thread: no row of outbox_threads has thread_key {thread_key:?} for account {account:?}; insert it (subject, original_sender) and this message follows"
    )
}

/// A new thread, as `enqueue --thread-key --subject --original-sender`
/// inserts it (its account is the message's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewThread {
    pub thread_key: String,
    pub subject: String,
    pub original_sender: String,
}

/// Which thread a new message goes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ThreadRef {
    /// A thread Mews already has (`outbox.message_thread_id`).
    Id(String),
    /// The thread of `outbox_threads` with this key (`outbox.thread_key`).
    Key(String),
}

/// Threads of one account by status, for `status` and the heartbeat.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ThreadCounts {
    pub pending: u64,
    pub creating: u64,
    pub created: u64,
    pub dead: u64,
    /// `pending` messages that wait for their thread (no `keyed_thread_id`
    /// yet): their thread is not created yet, is dead, or does not exist.
    pub messages_waiting: u64,
}

/// A dead thread, for `dead list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeadThread {
    /// `outbox_threads.id`.
    pub id: i64,
    pub account: String,
    pub thread_key: String,
    pub subject: String,
    pub original_sender: String,
    pub attempts: u32,
    pub last_error: Option<String>,
    pub created_at: String,
    pub dead_at: Option<String>,
    /// Messages held behind it.
    pub messages_held: u64,
}

/// The `last_error` of a message whose dead thread an operator purged
/// (`dead purge`): it becomes dead too, so that it does not wait for ever.
pub fn thread_purged(thread_key: &str, thread_id: i64) -> String {
    format!(
        "its thread {thread_key:?} (outbox_threads id {thread_id}) was dead and purged by an operator; the message was never sent"
    )
}
