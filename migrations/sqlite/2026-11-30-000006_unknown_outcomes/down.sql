ALTER TABLE partitions DROP COLUMN unknown;
