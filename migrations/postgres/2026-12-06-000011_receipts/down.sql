ALTER TABLE messages DROP COLUMN delivered_at;
DROP TABLE pending_receipts;
DROP TABLE receipt_keys;
