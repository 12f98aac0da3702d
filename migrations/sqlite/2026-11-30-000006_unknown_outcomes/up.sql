-- Messages failed as `unknown_outcome` (left `sending` by an instance that died, under
-- at_most_once), counted apart within `failed`: they say nothing about the provider, so the
-- failure threshold leaves them out.
ALTER TABLE partitions ADD COLUMN unknown BIGINT NOT NULL DEFAULT 0;
