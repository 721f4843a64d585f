-- Housekeeping: find delivered rows by delivery time without scanning the
-- table, for pruning after `retention.delivered` and for the heartbeat's
-- "delivered since the last heartbeat" count.
CREATE INDEX outbox_delivered_at ON outbox (delivered_at)
    WHERE status = 'delivered';
