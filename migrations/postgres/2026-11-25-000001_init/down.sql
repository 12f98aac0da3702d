DROP TABLE opt_outs;
DROP TABLE checkpoints;
DROP TABLE partitions;
DROP TABLE messages;
DROP TABLE recipients;
DROP TABLE batches;
