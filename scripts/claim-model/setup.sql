-- A scratch copy of `messages` (1,000,000 pending rows, one batch, one partition), its
-- indexes and fillfactor as in migrations/postgres, four partition counter rows, a claims table
-- for model B and the sequence that hands out slices of 64 ids.
DROP TABLE IF EXISTS messages, partitions, claims;
DROP SEQUENCE IF EXISTS slices;
CREATE TABLE messages (
    id BIGSERIAL PRIMARY KEY, batch_id BIGINT NOT NULL, partition INTEGER NOT NULL,
    recipient_id BIGINT NOT NULL, phone TEXT NOT NULL, body TEXT NOT NULL, encoding TEXT NOT NULL,
    segments INTEGER NOT NULL, status SMALLINT NOT NULL DEFAULT 0, attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at TIMESTAMP, provider_message_id TEXT, error TEXT, updated_at TIMESTAMP NOT NULL,
    claimed_by TEXT) WITH (fillfactor = 50);
CREATE UNIQUE INDEX messages_batch_phone ON messages (batch_id, phone);
CREATE INDEX messages_partition ON messages (batch_id, partition, id);
CREATE INDEX messages_retry ON messages (batch_id, next_attempt_at) WHERE next_attempt_at IS NOT NULL;
INSERT INTO messages (batch_id, partition, recipient_id, phone, body, encoding, segments, updated_at)
SELECT 1, 0, g, '+86138' || lpad(g::text, 8, '0'), 'Hi Customer ' || g || ', 30% off today: https://shop.example/bf', 'gsm7', 1, now()
FROM generate_series(1, 1000000) g;
CREATE TABLE partitions (batch_id BIGINT, idx INT, sent BIGINT NOT NULL DEFAULT 0, PRIMARY KEY (batch_id, idx));
INSERT INTO partitions VALUES (1, 0, 0), (1, 1, 0), (1, 2, 0), (1, 3, 0);
CREATE TABLE claims (batch_id BIGINT, first_id BIGINT, last_id BIGINT, claimer TEXT, claimed_at TIMESTAMP, PRIMARY KEY (batch_id, first_id));
CREATE SEQUENCE slices START 1;
VACUUM ANALYZE messages;
CHECKPOINT;
