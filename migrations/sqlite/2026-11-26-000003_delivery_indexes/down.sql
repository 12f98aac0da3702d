DROP INDEX messages_retry;
DROP INDEX messages_partition;
CREATE INDEX messages_batch_status ON messages (batch_id, status, id);
