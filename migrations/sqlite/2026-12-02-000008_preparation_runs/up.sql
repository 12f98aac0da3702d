-- Which run of a batch's preparation may write its chunks: each run takes the next number when
-- it starts, and a chunk is recorded only under the run that is still the batch's newest, so a
-- run that was stopped, aborted or taken over elsewhere cannot commit a chunk after its
-- successor read the checkpoint.
ALTER TABLE batches ADD COLUMN preparation_run BIGINT NOT NULL DEFAULT 0;
