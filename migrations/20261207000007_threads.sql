-- Threads through the outbox (issue 13): a producer names a new
-- conversation by a `thread_key` of its choice instead of a Mews thread id.
--
-- `outbox_threads` holds one row per thread to create with
-- `messageThreads/add`; an `outbox` row names either `message_thread_id`
-- (a thread Mews already has) or `thread_key` (a thread of
-- `outbox_threads` of its account). A keyed row gets its thread's Mews id
-- in `keyed_thread_id` when the daemon records the thread created (or at
-- insert, when it already is); its *effective thread*,
-- `coalesce(message_thread_id, keyed_thread_id)`, is what the thread heads,
-- the claim and per-thread order use. A keyed row without one is never
-- claimed and blocks nothing: it has no head.
--
-- SQLite cannot drop NOT NULL nor change a CHECK, so `outbox` is rebuilt
-- (create under a new name, copy every row with its id, drop, rename),
-- keeping its AUTOINCREMENT sequence: ids are the `Identifier` sent to
-- Mews, and after pruning the sequence may be above max(id). sqlx runs
-- this file in one transaction.

-- The threads ---------------------------------------------------------------

CREATE TABLE outbox_threads (
    -- Increasing thread id (`dead requeue --thread N`).
    id                INTEGER PRIMARY KEY AUTOINCREMENT,

    -- Producer columns ------------------------------------------------------
    -- Which configured account (Mews AccessToken) creates this thread.
    account           TEXT NOT NULL DEFAULT 'default'
        CONSTRAINT account_must_be_non_empty_text CHECK (
            typeof(account) = 'text' AND length(account) > 0
        ),
    -- The producer's name for the conversation; unique per account
    -- (`thread_key_must_be_unique_per_account` below).
    thread_key        TEXT NOT NULL
        CONSTRAINT thread_key_must_be_non_empty_text CHECK (
            typeof(thread_key) = 'text' AND length(thread_key) > 0
        ),
    -- `Subject` and `OriginalSender` of `messageThreads/add`: text, not
    -- only Unicode White_Space (the 25 code points of the outbox's text rule).
    subject           TEXT NOT NULL
        CONSTRAINT subject_must_be_non_blank_text CHECK (
            typeof(subject) = 'text'
            AND length(trim(subject, char(9, 10, 11, 12, 13, 32, 133, 160, 5760, 8192, 8193,
                                          8194, 8195, 8196, 8197, 8198, 8199, 8200, 8201, 8202,
                                          8232, 8233, 8239, 8287, 12288))) > 0
        ),
    original_sender   TEXT NOT NULL
        CONSTRAINT original_sender_must_be_non_blank_text CHECK (
            typeof(original_sender) = 'text'
            AND length(trim(original_sender, char(9, 10, 11, 12, 13, 32, 133, 160, 5760, 8192,
                                                  8193, 8194, 8195, 8196, 8197, 8198, 8199, 8200,
                                                  8201, 8202, 8232, 8233, 8239, 8287, 12288))) > 0
        ),
    -- Not created before this time.
    next_attempt_at   TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),

    -- Daemon columns (read them, do not write them) -------------------------
    status            TEXT NOT NULL DEFAULT 'pending'
        CONSTRAINT status_must_be_pending_creating_created_or_dead CHECK (
            status IN ('pending', 'creating', 'created', 'dead')
        ),
    -- Creation attempts that reached Mews and failed retryably.
    attempts          INTEGER NOT NULL DEFAULT 0
        CONSTRAINT attempts_must_not_be_negative CHECK (attempts >= 0),
    -- Why the last attempt failed (pending threads) or why it is dead.
    last_error        TEXT,
    created_at        TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    -- When a `messageThreads/add` for it was first sent (read-back window).
    first_sent_at     TEXT,
    -- 1 while Mews may hold this thread unseen by us (as outbox's column).
    needs_reconcile   INTEGER NOT NULL DEFAULT 0
        CONSTRAINT needs_reconcile_must_be_0_or_1 CHECK (needs_reconcile IN (0, 1)),
    -- What Mews returned: the thread's Id and CreatedUtc.
    mews_thread_id    TEXT,
    mews_created_utc  TEXT,
    -- When the daemon recorded it created.
    thread_created_at TEXT,
    -- When it became `dead` (`dead purge --older-than` counts from here).
    dead_at           TEXT
);

-- SQLite's error for a duplicate names the columns:
-- "UNIQUE constraint failed: outbox_threads.account, outbox_threads.thread_key".
-- Producers insert with ON CONFLICT (account, thread_key) DO NOTHING.
CREATE UNIQUE INDEX thread_key_must_be_unique_per_account
    ON outbox_threads (account, thread_key);

-- Claim order: due pending threads of one account, oldest due first.
CREATE INDEX outbox_threads_pending_due ON outbox_threads (account, next_attempt_at, id)
    WHERE status = 'pending';

-- Read-back asks "does a thread of ours already own this Mews thread?".
CREATE INDEX outbox_threads_mews_thread_id ON outbox_threads (mews_thread_id)
    WHERE mews_thread_id IS NOT NULL;

-- Status counts, dead lists and recovery by status.
CREATE INDEX outbox_threads_status ON outbox_threads (status, account);

-- The producer contract of `..06_producer_contract`, for threads: only the
-- producer columns (and `id`) may be given.
CREATE TRIGGER outbox_threads_producer_columns_only BEFORE INSERT ON outbox_threads
BEGIN
    SELECT CASE
        -- Other values are refused by status_must_be_pending_creating_created_or_dead.
        WHEN new.status IN ('creating', 'created', 'dead')
            THEN RAISE(ABORT, 'producer_may_not_set_status: a new thread is pending')
        WHEN new.attempts IS NOT 0
            THEN RAISE(ABORT, 'producer_may_not_set_attempts')
        WHEN new.needs_reconcile IS NOT 0
            THEN RAISE(ABORT, 'producer_may_not_set_needs_reconcile')
        WHEN new.last_error IS NOT NULL
            THEN RAISE(ABORT, 'producer_may_not_set_last_error')
        -- The default is evaluated once per statement: any other value was given.
        WHEN new.created_at IS NOT strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
            THEN RAISE(ABORT, 'producer_may_not_set_created_at')
        WHEN new.first_sent_at IS NOT NULL
            THEN RAISE(ABORT, 'producer_may_not_set_first_sent_at')
        WHEN new.mews_thread_id IS NOT NULL
            THEN RAISE(ABORT, 'producer_may_not_set_mews_thread_id')
        WHEN new.mews_created_utc IS NOT NULL
            THEN RAISE(ABORT, 'producer_may_not_set_mews_created_utc')
        WHEN new.thread_created_at IS NOT NULL
            THEN RAISE(ABORT, 'producer_may_not_set_thread_created_at')
        WHEN new.dead_at IS NOT NULL
            THEN RAISE(ABORT, 'producer_may_not_set_dead_at')
        WHEN typeof(new.next_attempt_at) IS NOT 'text'
             OR length(new.next_attempt_at) != 24
             OR new.next_attempt_at NOT GLOB '[0-9][0-9][0-9][0-9]-[0-1][0-9]-[0-3][0-9]T[0-2][0-9]:[0-5][0-9]:[0-6][0-9].[0-9][0-9][0-9]Z'
            THEN RAISE(ABORT, 'next_attempt_at_must_be_a_utc_timestamp like 2026-12-06T10:00:00.000Z')
    END;
END;

-- The outbox, rebuilt -------------------------------------------------------

-- Every column, CHECK and default of the outbox of migrations 1 and 2, plus
-- `thread_key` (producer) and `keyed_thread_id` (daemon).
CREATE TABLE outbox_rebuilt (
    -- Increasing row id; also the `Identifier` sent to Mews for this row.
    id                INTEGER PRIMARY KEY AUTOINCREMENT,

    -- Producer columns ------------------------------------------------------
    -- Mews message thread, as a canonical lower-case UUID; NULL when the
    -- row names its thread by `thread_key`.
    message_thread_id TEXT
        CONSTRAINT message_thread_id_must_be_a_lowercase_uuid CHECK (
            message_thread_id IS NULL OR (
            typeof(message_thread_id) = 'text'
            AND length(message_thread_id) = 36
            AND message_thread_id GLOB '[0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f]-[0-9a-f][0-9a-f][0-9a-f][0-9a-f]-[0-9a-f][0-9a-f][0-9a-f][0-9a-f]-[0-9a-f][0-9a-f][0-9a-f][0-9a-f]-[0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f]')
        ),
    -- The `outbox_threads.thread_key` (of this row's account) of the
    -- thread to send into, when it is not created yet or the producer
    -- does not know its Mews id.
    thread_key        TEXT
        CONSTRAINT thread_key_must_be_null_or_non_empty_text CHECK (
            thread_key IS NULL OR (typeof(thread_key) = 'text' AND length(thread_key) > 0)
        ),
    -- Message text shown to the guest: text, not blank.
    text              TEXT NOT NULL
        CONSTRAINT text_must_be_non_blank_text CHECK (
            typeof(text) = 'text'
            AND length(trim(text, ' ' || char(9, 10, 11, 12, 13))) > 0
        ),
    -- Optional producer idempotency key: INSERT ... ON CONFLICT(identifier) DO NOTHING.
    identifier        TEXT UNIQUE
        CONSTRAINT identifier_must_be_null_or_non_empty_text CHECK (
            identifier IS NULL OR (typeof(identifier) = 'text' AND length(identifier) > 0)
        ),
    -- Which configured account (Mews AccessToken) sends this row.
    account           TEXT NOT NULL DEFAULT 'default'
        CONSTRAINT account_must_be_non_empty_text CHECK (
            typeof(account) = 'text' AND length(account) > 0
        ),

    -- Daemon columns (read them, do not write them) -------------------------
    status            TEXT NOT NULL DEFAULT 'pending'
        CONSTRAINT status_must_be_pending_sending_delivered_or_dead CHECK (
            status IN ('pending', 'sending', 'delivered', 'dead')
        ),
    -- Delivery attempts that reached Mews and failed retryably (throttling
    -- and account-wide pauses do not count).
    attempts          INTEGER NOT NULL DEFAULT 0
        CONSTRAINT attempts_must_not_be_negative CHECK (attempts >= 0),
    -- Not claimed before this time.
    next_attempt_at   TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    -- Why the last attempt failed (pending rows) or why the row is dead.
    last_error        TEXT,
    created_at        TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    -- When a request carrying this row was first sent (reconciliation window).
    first_sent_at     TEXT,
    delivered_at      TEXT,
    -- What Mews returned for this row.
    mews_message_id   TEXT,
    mews_created_utc  TEXT,
    mews_sender       TEXT,
    -- See `..02_limits`.
    needs_reconcile   INTEGER NOT NULL DEFAULT 0
        CONSTRAINT needs_reconcile_must_be_0_or_1 CHECK (needs_reconcile IN (0, 1)),
    dead_at           TEXT,
    -- The Mews id of this row's `thread_key`'s thread once it is created
    -- (set by the daemon, or at insert when it already was).
    keyed_thread_id   TEXT,

    CONSTRAINT exactly_one_of_message_thread_id_and_thread_key CHECK (
        (message_thread_id IS NULL) <> (thread_key IS NULL)
    )
);

INSERT INTO outbox_rebuilt (
    id, message_thread_id, text, identifier, account, status, attempts, next_attempt_at,
    last_error, created_at, first_sent_at, delivered_at, mews_message_id, mews_created_utc,
    mews_sender, needs_reconcile, dead_at)
SELECT
    id, message_thread_id, text, identifier, account, status, attempts, next_attempt_at,
    last_error, created_at, first_sent_at, delivered_at, mews_message_id, mews_created_utc,
    mews_sender, needs_reconcile, dead_at
FROM outbox ORDER BY id;

-- The copy set the new table's sequence to max(id); the old one may be
-- higher (the newest rows were pruned). The rename below carries this row
-- of sqlite_sequence over to `outbox`; dropping `outbox` deletes its own.
DELETE FROM sqlite_sequence WHERE name = 'outbox_rebuilt';
INSERT INTO sqlite_sequence (name, seq)
SELECT 'outbox_rebuilt', max(
    coalesce((SELECT max(seq) FROM sqlite_sequence WHERE name = 'outbox'), 0),
    coalesce((SELECT max(id) FROM outbox_rebuilt), 0));

DROP TRIGGER outbox_thread_head_after_insert;
DROP TRIGGER outbox_thread_head_mirror;
DROP TRIGGER outbox_thread_head_finished;
DROP TRIGGER outbox_thread_head_revived;
DROP TRIGGER outbox_thread_head_moved;
DROP TRIGGER outbox_thread_head_after_delete;
DROP TRIGGER outbox_producer_columns_only;
DROP TRIGGER outbox_text_non_blank_on_insert;
DROP TRIGGER outbox_text_non_blank_on_update;
DROP TABLE outbox;
-- Legacy renaming: the outbox may live in the application's own database,
-- and a view of the application that reads `outbox` must neither stop the
-- rename ("error in view ...: no such table: main.outbox", modern renaming
-- checks the whole schema) nor be rewritten to `outbox_rebuilt`: it reads
-- the rebuilt `outbox` by name. (The application's own triggers and
-- indexes on `outbox`, if any, went with the old table: recreate them.)
PRAGMA legacy_alter_table = ON;
ALTER TABLE outbox_rebuilt RENAME TO outbox;
PRAGMA legacy_alter_table = OFF;

-- The indexes of migrations 1 to 4, on the rebuilt table.
CREATE INDEX outbox_status ON outbox (status, account);
CREATE INDEX outbox_mews_message_id ON outbox (mews_message_id)
    WHERE mews_message_id IS NOT NULL;
CREATE INDEX outbox_delivered_at ON outbox (delivered_at)
    WHERE status = 'delivered';

-- The rows of an effective thread in order, whatever their status
-- (`outbox_thread_rows` of `..04_thread_heads`, on the effective thread):
-- finding the next head reads it. A statement uses it only when it spells
-- the expression exactly so.
CREATE INDEX outbox_thread_rows ON outbox (coalesce(message_thread_id, keyed_thread_id), id);

-- Rows waiting for their keyed thread: resolved (or held, flagged, counted)
-- by (account, thread_key).
CREATE INDEX outbox_waiting_for_thread ON outbox (account, thread_key)
    WHERE thread_key IS NOT NULL AND keyed_thread_id IS NULL;

-- The thread heads (`..04_thread_heads`) --------------------------------------
--
-- `outbox_thread_head` is kept as it is: its rows name the same ids and
-- threads. Its key column keeps its name, `message_thread_id`, and holds
-- the effective thread. The triggers are those of migration 4 on the
-- effective thread, and a row without one (a keyed row whose thread is
-- not created) is skipped by their WHEN.

CREATE TRIGGER outbox_thread_head_after_insert AFTER INSERT ON outbox
WHEN new.status IN ('pending', 'sending')
 AND coalesce(new.message_thread_id, new.keyed_thread_id) IS NOT NULL
BEGIN
    INSERT INTO outbox_thread_head (message_thread_id, head_id, account, ready_at)
    VALUES (coalesce(new.message_thread_id, new.keyed_thread_id), new.id, new.account,
            CASE WHEN new.status = 'pending' THEN new.next_attempt_at END)
    ON CONFLICT (message_thread_id) DO UPDATE SET
        head_id = excluded.head_id, account = excluded.account, ready_at = excluded.ready_at
    WHERE excluded.head_id < outbox_thread_head.head_id;
END;

CREATE TRIGGER outbox_thread_head_mirror
AFTER UPDATE OF status, next_attempt_at, account ON outbox
WHEN new.status IN ('pending', 'sending')
 AND coalesce(new.message_thread_id, new.keyed_thread_id) IS NOT NULL
BEGIN
    UPDATE outbox_thread_head
    SET account = new.account,
        ready_at = CASE WHEN new.status = 'pending' THEN new.next_attempt_at END
    WHERE message_thread_id = coalesce(new.message_thread_id, new.keyed_thread_id)
      AND head_id = new.id;
END;

CREATE TRIGGER outbox_thread_head_finished
AFTER UPDATE OF status ON outbox
WHEN old.status IN ('pending', 'sending') AND new.status NOT IN ('pending', 'sending')
 AND coalesce(old.message_thread_id, old.keyed_thread_id) IS NOT NULL
BEGIN
    DELETE FROM outbox_thread_head
    WHERE message_thread_id = coalesce(old.message_thread_id, old.keyed_thread_id)
      AND head_id = old.id;
    INSERT INTO outbox_thread_head (message_thread_id, head_id, account, ready_at)
    SELECT coalesce(o.message_thread_id, o.keyed_thread_id), o.id, o.account,
           CASE WHEN o.status = 'pending' THEN o.next_attempt_at END
    FROM outbox AS o
    WHERE coalesce(o.message_thread_id, o.keyed_thread_id)
              = coalesce(old.message_thread_id, old.keyed_thread_id)
      AND o.id > old.id
      AND o.status IN ('pending', 'sending')
      AND NOT EXISTS (SELECT 1 FROM outbox_thread_head AS h
                      WHERE h.message_thread_id = coalesce(old.message_thread_id, old.keyed_thread_id))
    ORDER BY o.id LIMIT 1;
END;

CREATE TRIGGER outbox_thread_head_revived
AFTER UPDATE OF status ON outbox
WHEN old.status NOT IN ('pending', 'sending') AND new.status IN ('pending', 'sending')
 AND coalesce(new.message_thread_id, new.keyed_thread_id) IS NOT NULL
BEGIN
    INSERT INTO outbox_thread_head (message_thread_id, head_id, account, ready_at)
    VALUES (coalesce(new.message_thread_id, new.keyed_thread_id), new.id, new.account,
            CASE WHEN new.status = 'pending' THEN new.next_attempt_at END)
    ON CONFLICT (message_thread_id) DO UPDATE SET
        head_id = excluded.head_id, account = excluded.account, ready_at = excluded.ready_at
    WHERE excluded.head_id < outbox_thread_head.head_id;
END;

-- A waiting keyed row got its thread (the daemon recorded the thread
-- created, or it already was at insert): it joins that thread, as its
-- head if the thread has none or only newer ones.
CREATE TRIGGER outbox_thread_head_resolved
AFTER UPDATE OF keyed_thread_id ON outbox
WHEN old.message_thread_id IS NULL AND old.keyed_thread_id IS NULL
 AND new.message_thread_id IS NULL AND new.keyed_thread_id IS NOT NULL
 AND new.status IN ('pending', 'sending')
BEGIN
    INSERT INTO outbox_thread_head (message_thread_id, head_id, account, ready_at)
    VALUES (new.keyed_thread_id, new.id, new.account,
            CASE WHEN new.status = 'pending' THEN new.next_attempt_at END)
    ON CONFLICT (message_thread_id) DO UPDATE SET
        head_id = excluded.head_id, account = excluded.account, ready_at = excluded.ready_at
    WHERE excluded.head_id < outbox_thread_head.head_id;
END;

-- Any other change of a row's effective thread (an operator's correction):
-- both threads' heads are worked out again from their rows.
CREATE TRIGGER outbox_thread_head_moved
AFTER UPDATE OF message_thread_id, keyed_thread_id ON outbox
WHEN coalesce(old.message_thread_id, old.keyed_thread_id)
         IS NOT coalesce(new.message_thread_id, new.keyed_thread_id)
 AND coalesce(old.message_thread_id, old.keyed_thread_id) IS NOT NULL
BEGIN
    DELETE FROM outbox_thread_head
    WHERE message_thread_id IN (coalesce(old.message_thread_id, old.keyed_thread_id),
                                coalesce(new.message_thread_id, new.keyed_thread_id));
    INSERT INTO outbox_thread_head (message_thread_id, head_id, account, ready_at)
    SELECT coalesce(o.message_thread_id, o.keyed_thread_id), o.id, o.account,
           CASE WHEN o.status = 'pending' THEN o.next_attempt_at END
    FROM outbox AS o
    WHERE o.id IN (
        SELECT min(id) FROM outbox
        WHERE coalesce(message_thread_id, keyed_thread_id)
                  IN (coalesce(old.message_thread_id, old.keyed_thread_id),
                      coalesce(new.message_thread_id, new.keyed_thread_id))
          AND status IN ('pending', 'sending')
        GROUP BY coalesce(message_thread_id, keyed_thread_id));
END;

CREATE TRIGGER outbox_thread_head_after_delete AFTER DELETE ON outbox
WHEN old.status IN ('pending', 'sending')
 AND coalesce(old.message_thread_id, old.keyed_thread_id) IS NOT NULL
BEGIN
    DELETE FROM outbox_thread_head
    WHERE message_thread_id = coalesce(old.message_thread_id, old.keyed_thread_id)
      AND head_id = old.id;
    INSERT INTO outbox_thread_head (message_thread_id, head_id, account, ready_at)
    SELECT coalesce(o.message_thread_id, o.keyed_thread_id), o.id, o.account,
           CASE WHEN o.status = 'pending' THEN o.next_attempt_at END
    FROM outbox AS o
    WHERE coalesce(o.message_thread_id, o.keyed_thread_id)
              = coalesce(old.message_thread_id, old.keyed_thread_id)
      AND o.id > old.id
      AND o.status IN ('pending', 'sending')
      AND NOT EXISTS (SELECT 1 FROM outbox_thread_head AS h
                      WHERE h.message_thread_id = coalesce(old.message_thread_id, old.keyed_thread_id))
    ORDER BY o.id LIMIT 1;
END;

-- A keyed row inserted after its thread was created takes the thread's id
-- at once (and so its place in the thread: the resolved trigger above).
CREATE TRIGGER outbox_keyed_thread_on_insert AFTER INSERT ON outbox
WHEN new.thread_key IS NOT NULL AND new.keyed_thread_id IS NULL
BEGIN
    UPDATE outbox SET keyed_thread_id = (
        SELECT t.mews_thread_id FROM outbox_threads AS t
        WHERE t.account = new.account AND t.thread_key = new.thread_key
          AND t.status = 'created')
    WHERE id = new.id
      AND EXISTS (SELECT 1 FROM outbox_threads AS t
                  WHERE t.account = new.account AND t.thread_key = new.thread_key
                    AND t.status = 'created');
END;

-- The producer contract (`..06_producer_contract`) -------------------------

CREATE TRIGGER outbox_producer_columns_only BEFORE INSERT ON outbox
BEGIN
    SELECT CASE
        -- Other values are refused by status_must_be_pending_sending_delivered_or_dead.
        WHEN new.status IN ('sending', 'delivered', 'dead')
            THEN RAISE(ABORT, 'producer_may_not_set_status: a new row is pending')
        WHEN new.attempts IS NOT 0
            THEN RAISE(ABORT, 'producer_may_not_set_attempts')
        WHEN new.needs_reconcile IS NOT 0
            THEN RAISE(ABORT, 'producer_may_not_set_needs_reconcile')
        WHEN new.last_error IS NOT NULL
            THEN RAISE(ABORT, 'producer_may_not_set_last_error')
        -- The default is evaluated once per statement: any other value was given.
        WHEN new.created_at IS NOT strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
            THEN RAISE(ABORT, 'producer_may_not_set_created_at')
        WHEN new.first_sent_at IS NOT NULL
            THEN RAISE(ABORT, 'producer_may_not_set_first_sent_at')
        WHEN new.delivered_at IS NOT NULL
            THEN RAISE(ABORT, 'producer_may_not_set_delivered_at')
        WHEN new.dead_at IS NOT NULL
            THEN RAISE(ABORT, 'producer_may_not_set_dead_at')
        WHEN new.mews_message_id IS NOT NULL
            THEN RAISE(ABORT, 'producer_may_not_set_mews_message_id')
        WHEN new.mews_created_utc IS NOT NULL
            THEN RAISE(ABORT, 'producer_may_not_set_mews_created_utc')
        WHEN new.mews_sender IS NOT NULL
            THEN RAISE(ABORT, 'producer_may_not_set_mews_sender')
        WHEN new.keyed_thread_id IS NOT NULL
            THEN RAISE(ABORT, 'producer_may_not_set_keyed_thread_id')
        WHEN typeof(new.next_attempt_at) IS NOT 'text'
             OR length(new.next_attempt_at) != 24
             OR new.next_attempt_at NOT GLOB '[0-9][0-9][0-9][0-9]-[0-1][0-9]-[0-3][0-9]T[0-2][0-9]:[0-5][0-9]:[0-6][0-9].[0-9][0-9][0-9]Z'
            THEN RAISE(ABORT, 'next_attempt_at_must_be_a_utc_timestamp like 2026-12-06T10:00:00.000Z')
    END;
END;

CREATE TRIGGER outbox_text_non_blank_on_insert BEFORE INSERT ON outbox
WHEN typeof(new.text) = 'text'
 AND length(trim(new.text, char(9, 10, 11, 12, 13, 32, 133, 160, 5760, 8192, 8193, 8194,
                                 8195, 8196, 8197, 8198, 8199, 8200, 8201, 8202, 8232, 8233,
                                 8239, 8287, 12288))) = 0
BEGIN
    SELECT RAISE(ABORT, 'text_must_be_non_blank_text: empty or only Unicode White_Space');
END;

CREATE TRIGGER outbox_text_non_blank_on_update BEFORE UPDATE OF text ON outbox
WHEN typeof(new.text) = 'text'
 AND length(trim(new.text, char(9, 10, 11, 12, 13, 32, 133, 160, 5760, 8192, 8193, 8194,
                                 8195, 8196, 8197, 8198, 8199, 8200, 8201, 8202, 8232, 8233,
                                 8239, 8287, 12288))) = 0
BEGIN
    SELECT RAISE(ABORT, 'text_must_be_non_blank_text: empty or only Unicode White_Space');
END;
