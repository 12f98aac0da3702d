-- The failure rate above which delivery pauses the batch itself (0-1; 1 never pauses).
ALTER TABLE batches ADD COLUMN failure_threshold DOUBLE NOT NULL DEFAULT 0.1;
