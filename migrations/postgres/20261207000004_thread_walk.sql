-- The claim's walk over an account's threads (issue 12: deep backlogs).
--
-- A claim chooses among the first rows due in the account; when those are
-- mostly rows waiting behind their thread's head (a backlog of a few deep
-- threads), it walks the account's threads instead: one descent of this
-- index per thread with unfinished rows, whose first entry is that thread's
-- oldest unfinished row of the account. The expression is spelled as the
-- statements spell it, or the planner does not use the index.
--
-- Building it locks `outbox` against writes while it runs, as any CREATE
-- INDEX in a transaction: about as long as reading the table's unfinished
-- rows (docs/postgres.md, "Migrations").
CREATE INDEX outbox_account_thread_unfinished
    ON outbox (account, (coalesce(message_thread_id, keyed_thread_id)), id)
    WHERE status IN ('pending', 'sending');
