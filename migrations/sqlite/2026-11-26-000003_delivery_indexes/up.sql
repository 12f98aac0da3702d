-- Delivery plans and claims one partition at a time in id order, so its index leads with the
-- partition; the status stays out of the index so that the pending → sending → sent updates
-- do not rewrite index entries.
DROP INDEX messages_batch_status;
CREATE INDEX messages_partition ON messages (batch_id, partition, id);
-- Messages waiting for a retry: few, found without walking the batch.
CREATE INDEX messages_retry ON messages (batch_id, next_attempt_at)
    WHERE next_attempt_at IS NOT NULL;
