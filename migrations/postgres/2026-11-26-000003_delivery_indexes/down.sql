ALTER TABLE messages RESET (
    fillfactor,
    autovacuum_vacuum_scale_factor,
    autovacuum_vacuum_insert_scale_factor,
    autovacuum_analyze_scale_factor
);
DROP INDEX messages_retry;
DROP INDEX messages_partition;
CREATE INDEX messages_batch_status ON messages (batch_id, status, id);
