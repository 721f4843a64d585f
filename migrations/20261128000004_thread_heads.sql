-- Thread heads: the claim reads one small table instead of searching a deep
-- backlog for the rows it may send.
--
-- A thread's head is its oldest unfinished (`pending` or `sending`) row:
-- per-thread order says only a head may be sent. Finding heads through a
-- partial index on unfinished rows costs one index page per thread on every
-- status change (a claim of 250 threads rewrote ~300 pages of that index,
-- a record as many again); here a claim is one range of
-- `outbox_thread_head_ready` and the heads of a batch share a few pages.
--
-- The table is kept by the triggers below, inside the same transaction as
-- the change to `outbox` (a producer's INSERT, the daemon's UPDATE, an
-- operator's UPDATE or DELETE), so it is never out of step. Invariant:
-- every row of a thread older than its head is finished, and a thread has a
-- row here exactly when it has an unfinished row.
CREATE TABLE outbox_thread_head (
    message_thread_id TEXT PRIMARY KEY NOT NULL,
    -- outbox.id of the thread's oldest unfinished row.
    head_id           INTEGER NOT NULL,
    -- That row's account.
    account           TEXT NOT NULL,
    -- That row's next_attempt_at while it is `pending`; NULL while `sending`.
    ready_at          TEXT
) WITHOUT ROWID;

-- Claim order: the due heads of one account, oldest due first.
CREATE INDEX outbox_thread_head_ready ON outbox_thread_head (account, ready_at, head_id)
    WHERE ready_at IS NOT NULL;

-- The rows of a thread in order, whatever their status: finding the next
-- head reads it, and no status change ever rewrites it.
CREATE INDEX outbox_thread_rows ON outbox (message_thread_id, id);

INSERT INTO outbox_thread_head (message_thread_id, head_id, account, ready_at)
SELECT o.message_thread_id, o.id, o.account,
       CASE WHEN o.status = 'pending' THEN o.next_attempt_at END
FROM outbox AS o
WHERE o.status IN ('pending', 'sending')
  AND NOT EXISTS (
      SELECT 1 FROM outbox AS earlier
      WHERE earlier.message_thread_id = o.message_thread_id
        AND earlier.status IN ('pending', 'sending')
        AND earlier.id < o.id);

-- Superseded by the heads: every status change rewrote their pages.
DROP INDEX outbox_thread_unfinished;
DROP INDEX outbox_pending_due;

-- A new unfinished row is the head of its thread when the thread has none
-- (or only newer ones: an explicit id). A producer's INSERT into a busy
-- thread reads one row here and writes nothing.
CREATE TRIGGER outbox_thread_head_after_insert AFTER INSERT ON outbox
WHEN new.status IN ('pending', 'sending')
BEGIN
    INSERT INTO outbox_thread_head (message_thread_id, head_id, account, ready_at)
    VALUES (new.message_thread_id, new.id, new.account,
            CASE WHEN new.status = 'pending' THEN new.next_attempt_at END)
    ON CONFLICT (message_thread_id) DO UPDATE SET
        head_id = excluded.head_id, account = excluded.account, ready_at = excluded.ready_at
    WHERE excluded.head_id < outbox_thread_head.head_id;
END;

-- Each UPDATE trigger has a WHEN, so a row pays only for what its change
-- means: a claim (pending -> sending) runs one statement, a delivery two.

-- An unfinished head changed its state: mirror it.
CREATE TRIGGER outbox_thread_head_mirror
AFTER UPDATE OF status, next_attempt_at, account ON outbox
WHEN new.status IN ('pending', 'sending')
BEGIN
    UPDATE outbox_thread_head
    SET account = new.account,
        ready_at = CASE WHEN new.status = 'pending' THEN new.next_attempt_at END
    WHERE message_thread_id = new.message_thread_id AND head_id = new.id;
END;

-- A row finished: if it was its thread's head, the next unfinished row of
-- the thread takes over (the rows before it are all finished).
CREATE TRIGGER outbox_thread_head_finished
AFTER UPDATE OF status ON outbox
WHEN old.status IN ('pending', 'sending') AND new.status NOT IN ('pending', 'sending')
BEGIN
    DELETE FROM outbox_thread_head
    WHERE message_thread_id = old.message_thread_id AND head_id = old.id;
    INSERT INTO outbox_thread_head (message_thread_id, head_id, account, ready_at)
    SELECT o.message_thread_id, o.id, o.account,
           CASE WHEN o.status = 'pending' THEN o.next_attempt_at END
    FROM outbox AS o
    WHERE o.message_thread_id = old.message_thread_id AND o.id > old.id
      AND o.status IN ('pending', 'sending')
      AND NOT EXISTS (SELECT 1 FROM outbox_thread_head AS h
                      WHERE h.message_thread_id = old.message_thread_id)
    ORDER BY o.id LIMIT 1;
END;

-- A finished row became unfinished again (an operator revived it): it is
-- its thread's head if the thread has none, or only newer ones.
CREATE TRIGGER outbox_thread_head_revived
AFTER UPDATE OF status ON outbox
WHEN old.status NOT IN ('pending', 'sending') AND new.status IN ('pending', 'sending')
BEGIN
    INSERT INTO outbox_thread_head (message_thread_id, head_id, account, ready_at)
    VALUES (new.message_thread_id, new.id, new.account,
            CASE WHEN new.status = 'pending' THEN new.next_attempt_at END)
    ON CONFLICT (message_thread_id) DO UPDATE SET
        head_id = excluded.head_id, account = excluded.account, ready_at = excluded.ready_at
    WHERE excluded.head_id < outbox_thread_head.head_id;
END;

-- A row moved to another thread (an operator's correction): both threads'
-- heads are worked out again from their rows.
CREATE TRIGGER outbox_thread_head_moved
AFTER UPDATE OF message_thread_id ON outbox
WHEN old.message_thread_id IS NOT new.message_thread_id
BEGIN
    DELETE FROM outbox_thread_head
    WHERE message_thread_id IN (old.message_thread_id, new.message_thread_id);
    INSERT INTO outbox_thread_head (message_thread_id, head_id, account, ready_at)
    SELECT o.message_thread_id, o.id, o.account,
           CASE WHEN o.status = 'pending' THEN o.next_attempt_at END
    FROM outbox AS o
    WHERE o.id IN (
        SELECT min(id) FROM outbox
        WHERE message_thread_id IN (old.message_thread_id, new.message_thread_id)
          AND status IN ('pending', 'sending')
        GROUP BY message_thread_id);
END;

-- A deleted head (an operator's DELETE) hands over to the next unfinished
-- row of its thread. Only an unfinished row can be a head: deleting finished
-- rows (pruning delivered ones) costs nothing here, instead of a search
-- through the rest of the thread for each row.
CREATE TRIGGER outbox_thread_head_after_delete AFTER DELETE ON outbox
WHEN old.status IN ('pending', 'sending')
BEGIN
    DELETE FROM outbox_thread_head
    WHERE message_thread_id = old.message_thread_id AND head_id = old.id;
    INSERT INTO outbox_thread_head (message_thread_id, head_id, account, ready_at)
    SELECT o.message_thread_id, o.id, o.account,
           CASE WHEN o.status = 'pending' THEN o.next_attempt_at END
    FROM outbox AS o
    WHERE o.message_thread_id = old.message_thread_id AND o.id > old.id
      AND o.status IN ('pending', 'sending')
      AND NOT EXISTS (SELECT 1 FROM outbox_thread_head AS h
                      WHERE h.message_thread_id = old.message_thread_id)
    ORDER BY o.id LIMIT 1;
END;
