-- Rebalancing (issue 12): the live daemons, and accounts handed over.

-- Each daemon registers at every ownership round, with the accounts it is
-- configured for; a row whose `seen_until` passed is a daemon gone.
CREATE TABLE outbox_daemons (
    owner      uuid PRIMARY KEY,
    accounts   text[] NOT NULL,
    seen_until timestamptz NOT NULL
);

-- A daemon above its share gives an account up reserved for one daemon
-- below it: until `reserved_until` only that daemon may take it (so the
-- giver does not take it back at its own next round).
ALTER TABLE outbox_account_state
    ADD COLUMN reserved_for   uuid,
    ADD COLUMN reserved_until timestamptz;
