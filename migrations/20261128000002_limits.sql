-- Living within Mews's limits: ambiguous outcomes, dead-letter tools, the
-- client-side rate limiter's memory.

-- 1 while Mews may hold a copy of this row that no row of ours has matched
-- yet: the last request carrying it timed out, lost its connection after
-- sending, got a 5xx or a 200 without this row's Identifier, or the daemon
-- died while the row was `sending`. Before such a row is sent again, the
-- daemon reads its thread back (messages/getAll) and marks it delivered if
-- Mews has it. 0 otherwise.
ALTER TABLE outbox ADD COLUMN needs_reconcile INTEGER NOT NULL DEFAULT 0
    CONSTRAINT needs_reconcile_must_be_0_or_1 CHECK (needs_reconcile IN (0, 1));

-- When the row became `dead` (`dead purge --older-than` counts from here).
ALTER TABLE outbox ADD COLUMN dead_at TEXT;

-- Reconciliation asks "does a row of ours already own this Mews message?".
CREATE INDEX outbox_mews_message_id ON outbox (mews_message_id)
    WHERE mews_message_id IS NOT NULL;

-- End times of the account's latest requests (a JSON array of timestamps,
-- at most the configured request count), so that a restart does not start
-- with an empty rate-limit window and overrun Mews's.
ALTER TABLE outbox_account_state ADD COLUMN recent_requests TEXT;
