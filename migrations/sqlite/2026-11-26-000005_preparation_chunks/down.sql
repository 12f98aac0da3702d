DROP TABLE preparation_chunks;
