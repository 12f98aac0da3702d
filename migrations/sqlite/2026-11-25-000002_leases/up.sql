-- Several instances share one database: each active batch is supervised by the instance that
-- holds its lease; instances prove they are alive by their heartbeat, and every claimed message
-- names its claimer, so that the claims of a dead instance can be settled.
CREATE TABLE instances (
    id           TEXT PRIMARY KEY,
    heartbeat_at TIMESTAMP NOT NULL
);

CREATE TABLE leases (
    batch_id   BIGINT PRIMARY KEY REFERENCES batches (id) ON DELETE CASCADE,
    owner      TEXT NOT NULL,
    expires_at TIMESTAMP NOT NULL
);
CREATE INDEX leases_owner ON leases (owner);

ALTER TABLE messages ADD COLUMN claimed_by TEXT;
