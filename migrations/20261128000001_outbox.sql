-- The outbox: one row per chat message a producer wants delivered to Mews.
--
-- Producers need only `INSERT INTO outbox (message_thread_id, text) VALUES (?, ?)`.
-- Every CHECK is named so that SQLite's error says what is wrong, e.g.
-- "CHECK constraint failed: message_thread_id_must_be_a_lowercase_uuid".
-- Timestamps are UTC text, 'YYYY-MM-DDTHH:MM:SS.sssZ', so they sort and
-- compare as strings and read well in `sqlite3`.
CREATE TABLE outbox (
    -- Increasing row id; also the `Identifier` sent to Mews for this row.
    id                INTEGER PRIMARY KEY AUTOINCREMENT,

    -- Producer columns ------------------------------------------------------
    -- Mews message thread, as a canonical lower-case UUID.
    message_thread_id TEXT NOT NULL
        CONSTRAINT message_thread_id_must_be_a_lowercase_uuid CHECK (
            typeof(message_thread_id) = 'text'
            AND length(message_thread_id) = 36
            AND message_thread_id GLOB '[0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f]-[0-9a-f][0-9a-f][0-9a-f][0-9a-f]-[0-9a-f][0-9a-f][0-9a-f][0-9a-f]-[0-9a-f][0-9a-f][0-9a-f][0-9a-f]-[0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f]'
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
    mews_sender       TEXT
);

-- Claim order: due pending rows of one account, oldest due first.
CREATE INDEX outbox_pending_due ON outbox (account, next_attempt_at, id)
    WHERE status = 'pending';

-- Per-thread order: "is an earlier row of this thread still unfinished?"
CREATE INDEX outbox_thread_unfinished ON outbox (message_thread_id, id)
    WHERE status IN ('pending', 'sending');

-- Status and pruning by status.
CREATE INDEX outbox_status ON outbox (status, account);

-- Per-account state the daemon must remember across restarts.
CREATE TABLE outbox_account_state (
    account      TEXT PRIMARY KEY NOT NULL,
    -- No request for this account before this time (429, 401, 404, breaker).
    paused_until TEXT,
    pause_reason TEXT,
    -- Pauses in a row (any kind) since the last accepted request, for
    -- exponential pause growth.
    pause_streak INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
