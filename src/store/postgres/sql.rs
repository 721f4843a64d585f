//! The statements of the PostgreSQL store. Every write of the delivery path
//! carries its lease condition in the same statement: a `held` CTE that
//! share-locks the account rows this owner holds (`FOR SHARE`), so an
//! acquisition (`FOR UPDATE SKIP LOCKED` on the same rows) passes the
//! account by while the write is in flight, and a write that meets a
//! takeover in progress waits for it, then re-reads the account row and
//! finds another owner (READ COMMITTED's re-check of locked rows).
//! Statements locking several account rows lock them in account order, so
//! they never deadlock with each other.

/// Takes up to `$3` of the accounts `$1` whose lease is free or expired for
/// owner `$2`, for `$4` ms of the database's clock, incrementing the token.
/// An account handed over to another daemon (`reserved_for`) is left to it
/// until the reservation ends.
pub const ACQUIRE: &str = "
    WITH free AS (
        SELECT account FROM outbox_account_state
        WHERE account = ANY($1::text[])
          AND (lease_owner IS NULL OR lease_until IS NULL OR lease_until <= clock_timestamp())
          AND (reserved_for IS NULL OR reserved_for = $2::uuid
               OR reserved_until <= clock_timestamp())
        ORDER BY account
        LIMIT $3
        FOR UPDATE SKIP LOCKED)
    UPDATE outbox_account_state s
    SET lease_owner = $2::uuid,
        lease_token = s.lease_token + 1,
        lease_until = clock_timestamp() + $4 * interval '1 millisecond',
        reserved_for = NULL, reserved_until = NULL
    FROM free
    WHERE s.account = free.account
    RETURNING s.account, s.lease_token";

/// In the acquisition's transaction: rows of the accounts `$1` left
/// `sending` (necessarily under an older token) go back to `pending`, to be
/// read back from Mews first, due no earlier than `$2` ms after the later of
/// their claim and the account's latest request start (`add_started_by`,
/// saved by `request_starting` before each `messages/add`).
pub const RECOVER: &str = "
    WITH recovered AS (
        UPDATE outbox o
        SET status = 'pending', needs_reconcile = 1,
            next_attempt_at = greatest(o.next_attempt_at,
                coalesce(greatest(s.add_started_by, o.claimed_at), clock_timestamp())
                    + $2 * interval '1 millisecond')
        FROM outbox_account_state s
        WHERE s.account = o.account
          AND o.account = ANY($1::text[]) AND o.status = 'sending'
        RETURNING o.account)
    SELECT account, count(*) AS n FROM recovered GROUP BY account";

/// Extends owner `$1`'s leases on accounts `$2` with tokens `$3` by `$4` ms.
/// Locks in account order, as every statement locking several account rows
/// does, so that a renewal and a record of the same owner never deadlock.
pub const RENEW: &str = "
    WITH mine AS (
        SELECT s.account FROM outbox_account_state s
        JOIN unnest($2::text[], $3::bigint[]) AS h(account, token)
          ON s.account = h.account AND s.lease_token = h.token
        WHERE s.lease_owner = $1::uuid
        ORDER BY s.account
        FOR UPDATE OF s)
    UPDATE outbox_account_state s
    SET lease_until = clock_timestamp() + $4 * interval '1 millisecond'
    FROM mine
    WHERE s.account = mine.account
    RETURNING s.account";

/// Gives up owner `$1`'s leases on accounts `$2` with tokens `$3`;
/// `$4`, when not NULL, is the daemon they are reserved for during `$5` ms.
pub const RELEASE_SOME: &str = "
    WITH mine AS (
        SELECT s.account FROM outbox_account_state s
        JOIN unnest($2::text[], $3::bigint[]) AS h(account, token)
          ON s.account = h.account AND s.lease_token = h.token
        WHERE s.lease_owner = $1::uuid
        ORDER BY s.account
        FOR UPDATE OF s)
    UPDATE outbox_account_state s
    SET lease_owner = NULL, lease_until = NULL, reserved_for = $4::uuid,
        reserved_until = CASE WHEN $4::uuid IS NULL THEN NULL
                              ELSE clock_timestamp() + $5 * interval '1 millisecond' END
    FROM mine
    WHERE s.account = mine.account
    RETURNING s.account";

/// Registers owner `$1` as alive for `$3` ms, configured for accounts `$2`.
pub const REGISTER: &str = "
    INSERT INTO outbox_daemons (owner, accounts, seen_until)
    VALUES ($1::uuid, $2::text[], clock_timestamp() + $3 * interval '1 millisecond')
    ON CONFLICT (owner) DO UPDATE
    SET accounts = excluded.accounts, seen_until = excluded.seen_until";

/// The live daemons, with how many accounts each holds (or has reserved).
pub const FLEET: &str = "
    SELECT d.owner::text AS owner, d.accounts,
           (SELECT count(*) FROM outbox_account_state s
            WHERE (s.lease_owner = d.owner AND s.lease_until > clock_timestamp())
               OR (s.reserved_for = d.owner AND s.reserved_until > clock_timestamp())) AS held
    FROM outbox_daemons d
    WHERE d.seen_until > clock_timestamp()
    ORDER BY d.owner";

/// Gives up owner `$1`'s leases on accounts `$2` with tokens `$3`.
pub const RELEASE: &str = "
    WITH mine AS (
        SELECT s.account FROM outbox_account_state s
        JOIN unnest($2::text[], $3::bigint[]) AS h(account, token)
          ON s.account = h.account AND s.lease_token = h.token
        WHERE s.lease_owner = $1::uuid
        ORDER BY s.account
        FOR UPDATE OF s)
    UPDATE outbox_account_state s
    SET lease_owner = NULL, lease_until = NULL
    FROM mine
    WHERE s.account = mine.account";

/// The claim's common head and tail: `lease` (the owner's lease on account
/// `$1` under token `$5`, share-locked) before the candidates, and after
/// `picked` (at most `$3` heads, locked) the byte window and the update.
/// The result is one row per claimed row, each with `candidates` (how many
/// rows were looked at), or a single row of `candidates` alone when none
/// was claimed: so the caller learns whether the window was full without
/// scanning it a second time.
/// `$6` bounds the claim by bytes as the SQLite store's claim does: rows are
/// taken, in claim order, while their texts plus `$7` (the message
/// envelope) each add up to at most `$6`, and always at least one when `$8`.
macro_rules! claim_lease {
    () => {
        "lease AS (
        SELECT account FROM outbox_account_state
        WHERE account = $1 AND lease_owner = $4::uuid AND lease_token = $5
          AND lease_until > clock_timestamp()
        FOR SHARE),"
    };
}
macro_rules! claim_picked_and_update {
    () => {
        "
    picked AS (
        SELECT p.id, p.next_attempt_at FROM outbox p
        WHERE p.id = ANY (ARRAY(SELECT id FROM candidates)) AND p.account = $1 AND p.status = 'pending' AND p.next_attempt_at <= $2::timestamptz
          AND EXISTS (SELECT 1 FROM lease)
          AND p.id = (
              SELECT e.id FROM outbox e
              WHERE coalesce(e.message_thread_id, e.keyed_thread_id)
                    = coalesce(p.message_thread_id, p.keyed_thread_id)
                AND e.status IN ('pending', 'sending')
              ORDER BY e.id
              LIMIT 1)
        ORDER BY p.next_attempt_at, p.id
        LIMIT $3
        FOR UPDATE OF p SKIP LOCKED),
    within AS (
        SELECT id FROM (
            SELECT picked.id,
                   row_number() OVER w AS n,
                   sum(octet_length(o.text) + $7) OVER w AS running_bytes
            FROM picked JOIN outbox o ON o.id = picked.id
            WINDOW w AS (ORDER BY picked.next_attempt_at, picked.id ROWS UNBOUNDED PRECEDING)
        ) AS c
        WHERE (n = 1 AND $8::boolean) OR running_bytes <= $6),
    claimed AS (
        UPDATE outbox o
        SET status = 'sending', lease_token = $5, claimed_at = clock_timestamp(),
            first_sent_at = coalesce(o.first_sent_at, $2::timestamptz)
        FROM within
        WHERE o.id = within.id AND o.status = 'pending'
        RETURNING o.id, coalesce(o.message_thread_id, o.keyed_thread_id) AS message_thread_id,
                  o.text, o.attempts, o.needs_reconcile,
                  (extract(epoch FROM o.first_sent_at) * 1000000)::bigint AS first_sent_us)
    SELECT s.candidates, c.* FROM (SELECT count(*) AS candidates FROM candidates) AS s
    LEFT JOIN claimed AS c ON true"
    };
}

/// Leases up to `$3` due pending rows of account `$1` (due at `$2`) as
/// `sending` under token `$5`, for owner `$4`, only while that lease is
/// held and unexpired, choosing among the account's first `$3` due pending
/// rows (the window). Only a thread's oldest unfinished row qualifies
/// (one `LIMIT 1` descent of `outbox_thread_unfinished` per candidate: an
/// anti-join there was planned as a bitmap scan of the thread's every
/// unfinished and not yet vacuumed entry), so at most one per thread and in
/// thread order. A row's thread is its
/// effective thread, `coalesce(message_thread_id, keyed_thread_id)`; a keyed
/// row whose thread is not created yet is never claimed and blocks nothing.
///
/// The window keeps the claim's cost bounded by `$3` probes however deep
/// the backlog: rows behind their thread's head are passed over one probe
/// each, and a backlog of a few deep threads would otherwise be scanned
/// whole at every claim. When the window was full and gave fewer than half
/// of `$3` heads, [`CLAIM_WALK`] finds the heads beyond it
/// (`PgStore::claim_within`). The candidates are looked up by id
/// (`= ANY (ARRAY(…))`), so the plan cannot turn into a scan of every
/// pending row of the account, dead versions included, to join them.
pub const CLAIM: &str = concat!(
    "
    WITH ",
    claim_lease!(),
    "
    candidates AS (
        SELECT b.id FROM outbox b
        WHERE b.account = $1 AND b.status = 'pending' AND b.next_attempt_at <= $2::timestamptz
          AND coalesce(b.message_thread_id, b.keyed_thread_id) IS NOT NULL
        ORDER BY b.next_attempt_at, b.id
        LIMIT $3),",
    claim_picked_and_update!()
);

/// [`CLAIM`] over every thread of the account instead of a window of rows:
/// a loose index scan (`outbox_account_thread_unfinished`) walks the
/// account's threads with unfinished rows, one index descent each, and takes
/// each one's oldest unfinished row as its candidate. It costs per active
/// thread, not per row, so it is the claim behind a few deep threads; the
/// window is the claim over many shallow ones. The same parameters.
pub const CLAIM_WALK: &str = concat!(
    "
    WITH RECURSIVE ",
    claim_lease!(),
    "
    walk AS (
        (SELECT coalesce(o.message_thread_id, o.keyed_thread_id) AS thread, o.id
         FROM outbox o
         WHERE o.account = $1 AND o.status IN ('pending', 'sending')
           AND coalesce(o.message_thread_id, o.keyed_thread_id) IS NOT NULL
         ORDER BY coalesce(o.message_thread_id, o.keyed_thread_id), o.id
         LIMIT 1)
        UNION ALL
        SELECT n.thread, n.id FROM walk w CROSS JOIN LATERAL (
            SELECT coalesce(o.message_thread_id, o.keyed_thread_id) AS thread, o.id
            FROM outbox o
            WHERE o.account = $1 AND o.status IN ('pending', 'sending')
              AND coalesce(o.message_thread_id, o.keyed_thread_id) > w.thread
            ORDER BY coalesce(o.message_thread_id, o.keyed_thread_id), o.id
            LIMIT 1) AS n),
    candidates AS (SELECT id FROM walk),",
    claim_picked_and_update!()
);

/// When the next row of account `$1` not blocked by its thread (nor waiting
/// for it to be created) becomes due after `$2`, in microseconds since the epoch.
pub const NEXT_DUE: &str = "
    SELECT (extract(epoch FROM min(p.next_attempt_at)) * 1000000)::bigint
    FROM outbox p
    WHERE p.account = $1 AND p.status = 'pending' AND p.next_attempt_at > $2::timestamptz
      AND coalesce(p.message_thread_id, p.keyed_thread_id) IS NOT NULL
      AND NOT EXISTS (
          SELECT 1 FROM outbox e
          WHERE coalesce(e.message_thread_id, e.keyed_thread_id)
                = coalesce(p.message_thread_id, p.keyed_thread_id)
            AND e.status IN ('pending', 'sending') AND e.id < p.id)";

/// Stores outcomes `$1` (a JSON array of `{id, status, attempt,
/// next_attempt_at?, error?, maybe_stored?, mews_*?}`) at time `$2` for
/// owner `$3`: only rows still `sending` under the token of an account the
/// owner holds. Returns the accounts of the rows whose lease is lost
/// (claimed under a token that is no longer the owner's). A row an operator
/// changed meanwhile is left alone silently, as in the SQLite store.
pub const RECORD: &str = "
    WITH held AS (
        SELECT account, lease_token FROM outbox_account_state
        WHERE lease_owner = $3::uuid
        ORDER BY account
        FOR SHARE),
    u AS (
        SELECT * FROM jsonb_to_recordset($1::jsonb) AS u(
            id bigint, status text, attempt integer, next_attempt_at timestamptz,
            error text, maybe_stored integer,
            mews_message_id text, mews_created_utc text, mews_sender text)),
    done AS (
        UPDATE outbox o SET
            status = u.status,
            attempts = o.attempts + u.attempt,
            needs_reconcile = CASE WHEN u.status = 'delivered' THEN 0
                                   ELSE greatest(o.needs_reconcile, coalesce(u.maybe_stored, 0)) END,
            delivered_at = CASE WHEN u.status = 'delivered' THEN $2::timestamptz ELSE o.delivered_at END,
            dead_at = CASE WHEN u.status = 'dead' THEN $2::timestamptz ELSE o.dead_at END,
            next_attempt_at = coalesce(u.next_attempt_at, o.next_attempt_at),
            last_error = coalesce(u.error, o.last_error),
            mews_message_id = coalesce(u.mews_message_id, o.mews_message_id),
            mews_created_utc = coalesce(u.mews_created_utc, o.mews_created_utc),
            mews_sender = coalesce(u.mews_sender, o.mews_sender)
        FROM u, held h
        WHERE o.id = u.id AND o.status = 'sending'
          AND o.account = h.account AND o.lease_token = h.lease_token
        RETURNING o.id)
    SELECT DISTINCT o.account FROM outbox o JOIN u ON o.id = u.id
    WHERE NOT EXISTS (
        SELECT 1 FROM held h WHERE h.account = o.account AND h.lease_token = o.lease_token)";

/// Marks rows `$1` checked against Mews and not found there, for owner
/// `$2`, under the same condition as [`RECORD`]; returns the lost accounts.
pub const CLEAR_RECONCILE: &str = "
    WITH held AS (
        SELECT account, lease_token FROM outbox_account_state
        WHERE lease_owner = $2::uuid
        ORDER BY account
        FOR SHARE),
    done AS (
        UPDATE outbox o SET needs_reconcile = 0
        FROM held h
        WHERE o.id = ANY($1::bigint[]) AND o.status = 'sending'
          AND o.account = h.account AND o.lease_token = h.lease_token
        RETURNING o.id)
    SELECT DISTINCT o.account FROM outbox o
    WHERE o.id = ANY($1::bigint[])
      AND NOT EXISTS (
          SELECT 1 FROM held h WHERE h.account = o.account AND h.lease_token = o.lease_token)";

/// In the acquisition's transaction, beside [`RECOVER`]: threads of the
/// accounts `$1` left `creating` go back to `pending`, to be read back
/// (`messageThreads/getAll`) before they are created again, due no earlier
/// than `$2` ms after the later of their claim and the account's latest
/// request start, as rows left `sending` are.
pub const RECOVER_THREADS: &str = "
    WITH recovered AS (
        UPDATE outbox_threads t
        SET status = 'pending', needs_reconcile = 1,
            next_attempt_at = greatest(t.next_attempt_at,
                coalesce(greatest(s.add_started_by, t.claimed_at), clock_timestamp())
                    + $2 * interval '1 millisecond')
        FROM outbox_account_state s
        WHERE s.account = t.account
          AND t.account = ANY($1::text[]) AND t.status = 'creating'
        RETURNING t.account)
    SELECT account, count(*) AS n FROM recovered GROUP BY account";

/// Leases the oldest due pending thread of account `$1` (due at `$2`) as
/// `creating` under token `$4`, for owner `$3`, only while that lease is
/// held and unexpired (share-locked, as [`CLAIM`]). A thread a producer
/// holds share-locked right now (inserting a message of it) is skipped
/// until its commit.
pub const CLAIM_THREAD: &str = "
    WITH lease AS (
        SELECT account FROM outbox_account_state
        WHERE account = $1 AND lease_owner = $3::uuid AND lease_token = $4
          AND lease_until > clock_timestamp()
        FOR SHARE),
    picked AS (
        SELECT t.id FROM outbox_threads t
        WHERE t.account = $1 AND t.status = 'pending' AND t.next_attempt_at <= $2::timestamptz
          AND EXISTS (SELECT 1 FROM lease)
        ORDER BY t.next_attempt_at, t.id
        LIMIT 1
        FOR UPDATE SKIP LOCKED)
    UPDATE outbox_threads t
    SET status = 'creating', lease_token = $4, claimed_at = clock_timestamp(),
        first_sent_at = coalesce(t.first_sent_at, $2::timestamptz)
    FROM picked
    WHERE t.id = picked.id AND t.status = 'pending'
    RETURNING t.id, t.thread_key, t.subject, t.original_sender, t.attempts, t.needs_reconcile,
              (extract(epoch FROM t.first_sent_at) * 1000000)::bigint AS first_sent_us";

/// When the next pending thread of account `$1` becomes due after `$2`, in
/// microseconds since the epoch.
pub const NEXT_THREAD_DUE: &str = "
    SELECT (extract(epoch FROM min(next_attempt_at)) * 1000000)::bigint
    FROM outbox_threads
    WHERE account = $1 AND status = 'pending' AND next_attempt_at > $2::timestamptz";

/// Stores the outcome of thread `$1` for owner `$2` at `$3`: only while it
/// is still `creating` under the token of an account the owner holds
/// (share-locked, as [`RECORD`]). `$4` status, `$5` attempts to add, `$6`
/// next_attempt_at, `$7` error, `$8` maybe_stored, `$9`/`$10` the Mews id
/// and CreatedUtc. Returns one row: the thread's account and key when it
/// was changed (`done`), and whether its lease is lost (claimed under a
/// token that is no longer the owner's). The UPDATE waits for a producer
/// holding the thread row share-locked (see the migration's trigger).
pub const RECORD_THREAD: &str = "
    WITH held AS (
        SELECT account, lease_token FROM outbox_account_state
        WHERE lease_owner = $2::uuid
        ORDER BY account
        FOR SHARE),
    done AS (
        UPDATE outbox_threads t SET
            status = $4::text,
            attempts = t.attempts + $5::integer,
            needs_reconcile = CASE WHEN $4::text = 'created' THEN 0
                                   ELSE greatest(t.needs_reconcile, $8::integer) END,
            next_attempt_at = coalesce($6::timestamptz, t.next_attempt_at),
            last_error = coalesce($7::text, t.last_error),
            mews_thread_id = coalesce($9::text, t.mews_thread_id),
            mews_created_utc = coalesce($10::text, t.mews_created_utc),
            thread_created_at = CASE WHEN $4::text = 'created' THEN $3::timestamptz
                                     ELSE t.thread_created_at END,
            dead_at = CASE WHEN $4::text = 'dead' THEN $3::timestamptz ELSE t.dead_at END
        FROM held h
        WHERE t.id = $1 AND t.status = 'creating'
          AND t.account = h.account AND t.lease_token = h.lease_token
        RETURNING t.account, t.thread_key)
    SELECT (SELECT account FROM done) AS account,
           (SELECT thread_key FROM done) AS thread_key,
           EXISTS (
               SELECT 1 FROM outbox_threads t
               WHERE t.id = $1 AND NOT EXISTS (
                   SELECT 1 FROM held h
                   WHERE h.account = t.account AND h.lease_token = t.lease_token)
           ) AND NOT EXISTS (SELECT 1 FROM done) AS lost,
           (SELECT account FROM outbox_threads WHERE id = $1) AS thread_account";

/// After [`RECORD_THREAD`] stored `created` (a later statement of the same
/// transaction, so that it sees the rows of producers it waited for): every
/// row of (`$1`, `$2`) without its thread's id takes `$3`; a pending one
/// loses a held error (starting with `$4`) or the threadless one (`$5`).
pub const RESOLVE_KEYED: &str = "
    UPDATE outbox SET keyed_thread_id = $3::text,
        last_error = CASE
            WHEN status = 'pending'
             AND (left(last_error, length($4::text)) = $4::text OR last_error = $5::text) THEN NULL
            ELSE last_error END
    WHERE account = $1 AND thread_key = $2 AND keyed_thread_id IS NULL";

/// After [`RECORD_THREAD`] stored `dead`: the pending rows waiting for
/// (`$1`, `$2`) are held with `$3`.
pub const HOLD_KEYED: &str = "
    UPDATE outbox SET last_error = $3
    WHERE account = $1 AND thread_key = $2 AND keyed_thread_id IS NULL
      AND status = 'pending'";
