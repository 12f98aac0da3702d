ALTER TABLE batches DROP COLUMN failure_threshold;
