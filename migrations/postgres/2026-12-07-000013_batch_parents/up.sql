-- The batch a batch was resent from (`POST /v1/batches/{id}/resend`): the original's public id,
-- shown as `parent_id`. Batches are never deleted, so it always names one.
ALTER TABLE batches ADD COLUMN parent_id TEXT;
