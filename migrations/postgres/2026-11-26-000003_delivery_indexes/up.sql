-- Delivery plans and claims one partition at a time in id order, so its index leads with the
-- partition. The status is in no index: the pending → sending → sent updates then touch no
-- index at all and stay heap-only (HOT), and the free space left on each page (fillfactor)
-- gives them room. Vacuum and analyze follow a batch's churn instead of waiting for 20% of the
-- table to be dead.
DROP INDEX messages_batch_status;
CREATE INDEX messages_partition ON messages (batch_id, partition, id);
-- Messages waiting for a retry: few, found without walking the batch.
CREATE INDEX messages_retry ON messages (batch_id, next_attempt_at)
    WHERE next_attempt_at IS NOT NULL;
ALTER TABLE messages SET (
    fillfactor = 50,
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_vacuum_insert_scale_factor = 0.02,
    autovacuum_analyze_scale_factor = 0.02
);
