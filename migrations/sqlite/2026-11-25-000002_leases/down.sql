ALTER TABLE messages DROP COLUMN claimed_by;
DROP TABLE leases;
DROP TABLE instances;
