-- Delivery receipts. Every part a provider took under an id that a receipt will name gets a row
-- in `receipt_keys` (`<provider>/<canonical id>`), written in the statement that marks its
-- message `sent`; a receipt finds its message there. The rows stay once the message settles, so
-- that a receipt sent again is known as a repeat; a provider that reuses an id takes its key over.
-- A message is `delivered` when every one of its keys is `done`.
CREATE TABLE receipt_keys (
    receipt_key TEXT PRIMARY KEY,
    message_id  BIGINT NOT NULL,
    done        BOOLEAN NOT NULL DEFAULT FALSE
);
CREATE INDEX receipt_keys_message ON receipt_keys (message_id);

-- Receipts that matched no key yet (they came before their message's id was stored), tried
-- again at `next_at` with a doubling delay, a bounded number of times.
CREATE TABLE pending_receipts (
    id          BIGSERIAL PRIMARY KEY,
    receipt_key TEXT NOT NULL,
    delivered   BOOLEAN NOT NULL,
    error       TEXT,
    received_at TIMESTAMP NOT NULL,
    tries       INTEGER NOT NULL DEFAULT 0,
    next_at     TIMESTAMP NOT NULL
);
CREATE INDEX pending_receipts_due ON pending_receipts (next_at);
-- A kept receipt is applied as soon as its key is written (`Store::match_keyed_receipts`).
CREATE INDEX pending_receipts_key ON pending_receipts (receipt_key);

ALTER TABLE messages ADD COLUMN delivered_at TIMESTAMP;
