ALTER TABLE opt_outs DROP COLUMN source;
