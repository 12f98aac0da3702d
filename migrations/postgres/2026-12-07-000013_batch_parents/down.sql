ALTER TABLE batches DROP COLUMN parent_id;
