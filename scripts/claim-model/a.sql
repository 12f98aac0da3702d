-- Model A, as delivery works today: one statement per slice records an earlier slice
-- (sending -> sent, with its partition counter) and claims this one (pending -> sending).
SELECT nextval('slices') AS s \gset
WITH done AS (
  UPDATE messages m SET status = 2, provider_message_id = 'sim-' || m.id, error = NULL, updated_at = now()
  WHERE m.batch_id = 1 AND m.partition = 0 AND m.id BETWEEN (:s - 9) * 64 + 1 AND (:s - 8) * 64 AND m.status = 1
  RETURNING 1),
counted AS (UPDATE partitions SET sent = sent + (SELECT count(*) FROM done) WHERE batch_id = 1 AND idx = :client_id % 4)
UPDATE messages SET status = 1, attempts = attempts + 1, claimed_by = 'inst', updated_at = now()
WHERE id IN (SELECT id FROM messages WHERE batch_id = 1 AND partition = 0 AND id BETWEEN (:s - 1) * 64 + 1 AND :s * 64 AND status = 0 ORDER BY id LIMIT 64)
  AND status = 0
RETURNING id, phone, body, attempts;
