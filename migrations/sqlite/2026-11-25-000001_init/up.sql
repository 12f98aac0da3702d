-- Batches: the campaign, its lifecycle and its preparation counters.
CREATE TABLE batches (
    id                   INTEGER PRIMARY KEY AUTOINCREMENT,
    public_id            TEXT NOT NULL UNIQUE,
    name                 TEXT NOT NULL,
    campaign_id          TEXT,
    content              TEXT NOT NULL,
    url                  TEXT,
    provider             TEXT NOT NULL,
    message_type         TEXT NOT NULL,
    schedule_at          TIMESTAMP,
    partition_count      INTEGER NOT NULL,
    state                TEXT NOT NULL,
    resume_to            TEXT,
    version              BIGINT NOT NULL DEFAULT 0,
    steps                TEXT NOT NULL DEFAULT '{}',
    recipients           BIGINT NOT NULL DEFAULT 0,
    processed            BIGINT NOT NULL DEFAULT 0,
    valid                BIGINT NOT NULL DEFAULT 0,
    invalid              BIGINT NOT NULL DEFAULT 0,
    duplicates           BIGINT NOT NULL DEFAULT 0,
    opted_out            BIGINT NOT NULL DEFAULT 0,
    segments             BIGINT NOT NULL DEFAULT 0,
    restarts             INTEGER NOT NULL DEFAULT 0,
    conditions           TEXT NOT NULL DEFAULT '[]',
    error                TEXT,
    created_at           TIMESTAMP NOT NULL,
    updated_at           TIMESTAMP NOT NULL,
    started_at           TIMESTAMP,
    finished_at          TIMESTAMP
);
CREATE INDEX batches_state ON batches (state);

-- Recipients as uploaded, unvalidated; vars is a JSON object.
CREATE TABLE recipients (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    batch_id BIGINT NOT NULL REFERENCES batches (id) ON DELETE CASCADE,
    phone    TEXT NOT NULL,
    vars     TEXT
);
CREATE INDEX recipients_batch ON recipients (batch_id, id);

-- One row per valid recipient; status: 0 pending, 1 sending, 2 sent, 3 delivered, 4 failed, 5 cancelled.
CREATE TABLE messages (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    batch_id            BIGINT NOT NULL REFERENCES batches (id) ON DELETE CASCADE,
    partition           INTEGER NOT NULL,
    recipient_id        BIGINT NOT NULL,
    phone               TEXT NOT NULL,
    body                TEXT NOT NULL,
    encoding            TEXT NOT NULL,
    segments            INTEGER NOT NULL,
    status              SMALLINT NOT NULL DEFAULT 0,
    attempts            INTEGER NOT NULL DEFAULT 0,
    next_attempt_at     TIMESTAMP,
    provider_message_id TEXT,
    error               TEXT,
    updated_at          TIMESTAMP NOT NULL
);
-- A phone is messaged once per batch: duplicates are dropped by this index.
CREATE UNIQUE INDEX messages_batch_phone ON messages (batch_id, phone);
CREATE INDEX messages_batch_status ON messages (batch_id, status, id);

-- Delivery counters per partition, updated in the same transaction as the messages they count.
CREATE TABLE partitions (
    batch_id  BIGINT NOT NULL REFERENCES batches (id) ON DELETE CASCADE,
    idx       INTEGER NOT NULL,
    total     BIGINT NOT NULL DEFAULT 0,
    sent      BIGINT NOT NULL DEFAULT 0,
    delivered BIGINT NOT NULL DEFAULT 0,
    failed    BIGINT NOT NULL DEFAULT 0,
    cancelled BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (batch_id, idx)
);

-- Where a step continues after a restart (preparation: the last recipient id processed).
CREATE TABLE checkpoints (
    batch_id   BIGINT NOT NULL REFERENCES batches (id) ON DELETE CASCADE,
    step       TEXT NOT NULL,
    position   BIGINT NOT NULL,
    updated_at TIMESTAMP NOT NULL,
    PRIMARY KEY (batch_id, step)
);

-- Numbers that asked not to be messaged (E.164).
CREATE TABLE opt_outs (
    phone      TEXT PRIMARY KEY,
    created_at TIMESTAMP NOT NULL
);
