-- The producer contract, enforced by the database: a producer's INSERT may
-- set only the producer columns, and "non-blank" means Unicode White_Space.
--
-- SQLite cannot change a CHECK without rebuilding the table, so both rules
-- are BEFORE triggers whose RAISE names the rule, the way the CHECKs of
-- `..01_outbox` do: "producer_may_not_set_status" says what is wrong. They
-- fire only on INSERT (and on UPDATE OF text): the daemon's own statements
-- are UPDATEs of daemon columns and never meet them.
--
-- Producer columns: message_thread_id, text, identifier, account, and
-- next_attempt_at (scheduling a message for later is legitimate; it must be
-- a timestamp in the table's format, or it would sort wrongly against the
-- daemon's). `id` may be given too: it is only the row's place in the queue.
-- Every other column belongs to the daemon and must be left to its default:
-- a row inserted `sending` was never claimed and waited for a restart, a row
-- inserted `delivered` or with a `mews_message_id` claims a delivery that
-- never happened.
--
-- Rows already in the table are not touched: a row inserted with daemon
-- columns before this migration keeps them (a `sending` row is recovered at
-- start-up as before), and a text made only of Unicode spaces that is
-- already queued is sent as before (Mews decides about it).

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
        WHEN typeof(new.next_attempt_at) IS NOT 'text'
             OR length(new.next_attempt_at) != 24
             OR new.next_attempt_at NOT GLOB '[0-9][0-9][0-9][0-9]-[0-1][0-9]-[0-3][0-9]T[0-2][0-9]:[0-5][0-9]:[0-6][0-9].[0-9][0-9][0-9]Z'
            THEN RAISE(ABORT, 'next_attempt_at_must_be_a_utc_timestamp like 2026-12-06T10:00:00.000Z')
    END;
END;

-- Unicode White_Space, all 25 code points: U+0009..U+000D, U+0020, U+0085,
-- U+00A0, U+1680, U+2000..U+200A, U+2028, U+2029, U+202F, U+205F, U+3000.
-- A text made only of them shows the guest an empty bubble. The message
-- keeps the CHECK's name so that producers see one name for one rule; the
-- CHECK itself still refuses non-text values.
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
