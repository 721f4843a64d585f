//! The statements of the delivery path, public so that the benchmark's
//! floor (`benches/drain.rs`) runs exactly the same SQL without the daemon.
//! Each is one statement per batch; their query plans are checked by
//! `the_delivery_statements_use_their_indexes`.

/// Leases up to `?3` due heads of account `?1` as `sending`, oldest due
/// first: one range of `outbox_thread_head_ready`, then rowid lookups.
/// Per-thread order holds by construction: only a thread's oldest
/// unfinished row is its head (migration `..04_thread_heads`). The
/// triggers then mark these heads as in flight. A row's thread is its
/// effective thread, `coalesce(message_thread_id, keyed_thread_id)`
/// (migration `..07_threads`): a head always has one.
///
/// `?4` bounds the claim by bytes: the heads are taken, in claim order,
/// while their texts plus [`MESSAGE_ENVELOPE_BYTES`] each add up to at
/// most `?4`, and always at least one (a row too large for any request
/// must still be claimed, to be dead-lettered rather than block its
/// thread). `octet_length` of a column reads only the record header, not
/// the text, so the claim never loads more than the bound (plus one
/// row) whatever the rows hold.
pub const CLAIM: &str = "
    UPDATE outbox
    SET status = 'sending', first_sent_at = coalesce(first_sent_at, ?2)
    WHERE id IN (
        SELECT head_id FROM (
            SELECT c.head_id,
                   row_number() OVER w AS n,
                   sum(octet_length(o.text) + 128) OVER w AS running_bytes
            FROM (SELECT head_id, ready_at FROM outbox_thread_head
                  WHERE account = ?1 AND ready_at <= ?2
                  ORDER BY ready_at, head_id
                  LIMIT ?3) AS c
            JOIN outbox AS o ON o.id = c.head_id
            WINDOW w AS (ORDER BY c.ready_at, c.head_id ROWS UNBOUNDED PRECEDING))
        WHERE n = 1 OR running_bytes <= ?4)
      AND +status = 'pending'
    RETURNING id, coalesce(message_thread_id, keyed_thread_id) AS message_thread_id,
              CAST(text AS BLOB) AS text, attempts,
              needs_reconcile, first_sent_at";

/// What [`CLAIM`] counts for each message besides its text: the JSON
/// around it, `{"MessageThreadId":"<36>","Text":"","Identifier":"<id>"},`
/// (at most 104 bytes), rounded up. Escaping inside the text is not
/// counted here: the worker measures the real size before sending.
pub const MESSAGE_ENVELOPE_BYTES: usize = 128;

/// When the next head of account `?1` becomes due after `?2`.
pub const NEXT_DUE: &str = "
    SELECT min(ready_at) FROM outbox_thread_head
    WHERE account = ?1 AND ready_at > ?2";

/// Stores deliveries: `?1` is a JSON array of `[id, mews_message_id,
/// mews_created_utc, mews_sender]`, `?2` the time. Like [`RECORD`],
/// touches only rows still `sending`, through the rowid.
pub const RECORD_DELIVERED: &str = "
    UPDATE outbox SET
        status = 'delivered',
        needs_reconcile = 0,
        delivered_at = ?2,
        mews_message_id = u.value ->> 1,
        mews_created_utc = u.value ->> 2,
        mews_sender = u.value ->> 3
    FROM json_each(?1) AS u
    WHERE outbox.id = u.value ->> 0 AND +outbox.status = 'sending'";

/// Stores the other outcomes (retry, dead, release): `?1` is a JSON
/// array of `{id, status, attempt, next_attempt_at?, error?,
/// maybe_stored?}`, `?2` the time. Only rows still `sending` are
/// touched: an operator may have acted meanwhile. A row that may be at
/// Mews stays marked until it is delivered or checked
/// (`clear_reconcile`). The unary `+` keeps the planner on the rowid:
/// through the `status` index it would read every `json_each` item for
/// every row in flight.
pub const RECORD: &str = "
    UPDATE outbox SET
        status = u.value ->> 'status',
        attempts = attempts + (u.value ->> 'attempt'),
        needs_reconcile = max(needs_reconcile, coalesce(u.value ->> 'maybe_stored', 0)),
        dead_at = CASE u.value ->> 'status' WHEN 'dead' THEN ?2 ELSE dead_at END,
        next_attempt_at = coalesce(u.value ->> 'next_attempt_at', next_attempt_at),
        last_error = coalesce(u.value ->> 'error', last_error)
    FROM json_each(?1) AS u
    WHERE outbox.id = u.value ->> 'id' AND +outbox.status = 'sending'";

/// Leases the oldest due `pending` thread of account `?1` as `creating`
/// (through `outbox_threads_pending_due`), `?2` the time.
pub const CLAIM_THREAD: &str = "
    UPDATE outbox_threads
    SET status = 'creating', first_sent_at = coalesce(first_sent_at, ?2)
    WHERE id = (SELECT id FROM outbox_threads
                WHERE account = ?1 AND status = 'pending' AND next_attempt_at <= ?2
                ORDER BY next_attempt_at, id LIMIT 1)
      AND status = 'pending'
    RETURNING id, thread_key, subject, original_sender, attempts, needs_reconcile,
              first_sent_at";

/// When the next `pending` thread of account `?1` becomes due after `?2`.
pub const NEXT_THREAD_DUE: &str = "
    SELECT min(next_attempt_at) FROM outbox_threads
    WHERE account = ?1 AND status = 'pending' AND next_attempt_at > ?2";

/// Gives the waiting rows (`pending`, keyed, no `keyed_thread_id` yet) of
/// thread key `?2` of account `?1` the Mews thread `?3`, through
/// `outbox_waiting_for_thread`, clearing a `last_error` that held them
/// behind the thread (starting with `?4`,
/// [`crate::store::thread::HELD_BY_THREAD_PREFIX`]) or said it did not
/// exist (`?5`, [`crate::store::thread::no_such_thread`]). The
/// `outbox_thread_head_resolved` trigger then places each in its thread.
pub const RESOLVE_WAITING: &str = "
    UPDATE outbox SET keyed_thread_id = ?3,
        last_error = CASE WHEN substr(last_error, 1, length(?4)) = ?4 OR last_error = ?5
                          THEN NULL ELSE last_error END
    WHERE outbox.account = ?1 AND outbox.thread_key = ?2
      AND outbox.thread_key IS NOT NULL AND outbox.keyed_thread_id IS NULL
      AND outbox.status = 'pending'";
