DROP INDEX batches_updated;
DROP INDEX partitions_updated;
ALTER TABLE partitions DROP COLUMN updated_at;
