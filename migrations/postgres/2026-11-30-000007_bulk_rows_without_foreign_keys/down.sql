ALTER TABLE recipients ADD CONSTRAINT recipients_batch_id_fkey
    FOREIGN KEY (batch_id) REFERENCES batches (id) ON DELETE CASCADE;
ALTER TABLE messages ADD CONSTRAINT messages_batch_id_fkey
    FOREIGN KEY (batch_id) REFERENCES batches (id) ON DELETE CASCADE;
