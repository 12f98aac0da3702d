-- Model B, not built: a claim is a row holding the slice's id range; one statement records an
-- earlier slice (pending -> sent, with its counter), drops that claim row, adds this slice's
-- and reads its messages. Each message is updated once.
SELECT nextval('slices') AS s \gset
WITH done AS (
  UPDATE messages m SET status = 2, attempts = attempts + 1, provider_message_id = 'sim-' || m.id, error = NULL, updated_at = now()
  WHERE m.batch_id = 1 AND m.partition = 0 AND m.id BETWEEN (:s - 9) * 64 + 1 AND (:s - 8) * 64 AND m.status = 0
  RETURNING 1),
counted AS (UPDATE partitions SET sent = sent + (SELECT count(*) FROM done) WHERE batch_id = 1 AND idx = :client_id % 4),
released AS (DELETE FROM claims WHERE batch_id = 1 AND first_id = (:s - 9) * 64 + 1),
claimed AS (INSERT INTO claims VALUES (1, (:s - 1) * 64 + 1, :s * 64, 'inst', now()))
SELECT id, phone, body, attempts FROM messages
WHERE batch_id = 1 AND partition = 0 AND id BETWEEN (:s - 1) * 64 + 1 AND :s * 64 AND status = 0 ORDER BY id LIMIT 64;
