ALTER TABLE batches DROP COLUMN preparation_run;
