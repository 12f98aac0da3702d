-- Preparation writes chunks side by side, so a chunk may commit before an earlier one: each
-- chunk beyond the checkpoint records its recipient range, so that a restart skips it.
CREATE TABLE preparation_chunks (
    batch_id           BIGINT NOT NULL REFERENCES batches (id) ON DELETE CASCADE,
    first_recipient_id BIGINT NOT NULL,
    last_recipient_id  BIGINT NOT NULL,
    PRIMARY KEY (batch_id, last_recipient_id)
);
