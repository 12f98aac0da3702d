-- One watch per instance finds what changed since its last look, instead of every batch's
-- supervisor polling its own row: batches by `updated_at` (every transition sets it), and
-- partitions by the new `updated_at` that every change of their counters sets.
ALTER TABLE partitions ADD COLUMN updated_at TIMESTAMP NOT NULL DEFAULT '1970-01-01 00:00:00';
CREATE INDEX partitions_updated ON partitions (updated_at);
CREATE INDEX batches_updated ON batches (updated_at);
