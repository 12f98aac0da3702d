//! Preparation: checkpoints, the fencing run, and prepared chunks written with their
//! counters (on PostgreSQL by `COPY`, see `copy.rs`).

use diesel::prelude::*;
use diesel_async::RunQueryDsl;

use super::bulk::{BulkInsert, ChunkRecord};
use super::cached::Cached;
use super::models::*;
use super::records::{ChunkWritten, INSERT_CHUNK, PreparedChunk, now, tally_inserted};
use super::schema::{batches, checkpoints, opt_outs, preparation_chunks};
use super::{Store, StoreError, with_conn, with_tx};

/// Chunks of at least this many messages go in by `COPY`; smaller ones (a small batch's only
/// chunk, a large batch's last) by one `INSERT` of arrays. A `COPY` of ten rows spent 1.4–1.6 ms
/// in PostgreSQL against 0.18 ms for the `INSERT` (BENCHMARKS.md, "A small batch at 30
/// statements").
pub const COPY_FROM_ROWS: usize = 100;

impl Store {
    /// A step's checkpoint (0 when it has none).
    pub async fn checkpoint(&self, batch_id: i64, step: &str) -> Result<i64, StoreError> {
        with_conn!(self, |conn| {
            Ok(checkpoints::table
                .filter(checkpoints::batch_id.eq(batch_id))
                .filter(checkpoints::step.eq(step))
                .select(checkpoints::position)
                .first(conn)
                .await
                .optional()?
                .unwrap_or(0))
        })
    }

    /// Starts a new run of a batch's preparation and answers its number. From then on only
    /// this run's chunks are recorded (`write_prepared_chunk_beside`): a chunk of an earlier run
    /// still being written (a run stopped half-way, aborted, or running on an instance that lost
    /// the batch) is rolled back. On PostgreSQL this waits for such a chunk that is already
    /// being recorded, so the checkpoint read after it includes that chunk.
    pub async fn begin_preparation_run(&self, batch_id: i64) -> Result<i64, StoreError> {
        with_conn!(self, |conn| {
            let begin = diesel::update(batches::table.find(batch_id))
                .set(batches::preparation_run.eq(batches::preparation_run + 1))
                .returning(batches::preparation_run);
            Ok(Cached(begin).get_result(conn).await?)
        })
    }

    /// Writes one prepared chunk as the batch's newest preparation run: drops opted-out numbers,
    /// inserts the messages (a number already in the batch is a duplicate and is skipped by the
    /// unique index), adds the counters and moves the checkpoint — all in one transaction, so a
    /// restart inserts nothing twice.
    pub async fn write_prepared_chunk(
        &self,
        batch_id: i64,
        chunk: PreparedChunk,
    ) -> Result<ChunkWritten, StoreError> {
        let run = with_conn!(self, |conn| {
            batches::table
                .find(batch_id)
                .select(batches::preparation_run)
                .first::<i64>(conn)
                .await
        })?;
        let done_up_to = chunk.last_recipient_id;
        self.write_prepared_chunk_beside(batch_id, chunk, run, None, done_up_to)
            .await
    }

    /// `write_prepared_chunk` for preparation run `run`, whose writers run side by side and
    /// whose chunks may commit out of order. With `first_recipient_id`, the chunk's recipient
    /// range is recorded with it, so that a restart skips the chunk although the checkpoint is
    /// behind it (`chunks_written_after`). The checkpoint moves to `done_up_to` — the end of the
    /// chunks known committed, every earlier one included — unless it is already further, and
    /// the ranges it has passed are forgotten. `StoreError::Superseded`, with nothing written,
    /// when a newer run has started.
    pub async fn write_prepared_chunk_beside(
        &self,
        batch_id: i64,
        mut chunk: PreparedChunk,
        run: i64,
        first_recipient_id: Option<i64>,
        done_up_to: i64,
    ) -> Result<ChunkWritten, StoreError> {
        let ahead = first_recipient_id.map(|first| (first, chunk.last_recipient_id));
        // PostgreSQL copies the rows in; when another writer committed one of the chunk's numbers
        // after the copy looked it up, the chunk is written again below, with `ON CONFLICT`.
        if let Some(pool) = self
            .copy
            .as_ref()
            .filter(|_| chunk.messages.len() >= COPY_FROM_ROWS)
        {
            let copied =
                super::copy::write_chunk(pool, batch_id, &mut chunk, run, ahead, done_up_to)
                    .await?;
            if let Some(written) = copied {
                return Ok(written);
            }
        }
        with_tx!(self, |conn| {
            // A chunk and its checkpoint commit together, so a crash that loses the commit loses
            // both, and preparation prepares the chunk again: its commit need not wait for the
            // disk. A later commit that does wait (the batch leaving `preparing`) flushes the WAL
            // up to itself, these chunks included.
            conn.commit_unflushed().await?;
            let phones: Vec<&str> = chunk.messages.iter().map(|m| m.phone.as_str()).collect();
            let mut opted = std::collections::HashSet::new();
            for phones in phones.chunks(INSERT_CHUNK) {
                opted.extend(
                    opt_outs::table
                        .filter(opt_outs::phone.eq_any(phones))
                        .select(opt_outs::phone)
                        .load::<String>(conn)
                        .await?,
                );
            }
            let candidates = chunk.messages.len() as i64;
            let keep: Vec<NewMessage> = chunk
                .messages
                .into_iter()
                .filter(|m| !opted.contains(&m.phone))
                .collect();
            let kept = keep.len() as i64;
            let opted_out = candidates - kept;
            // Bulk inserts have no bind limit to respect (arrays on PostgreSQL, one row per
            // statement on SQLite): the chunk goes in one call.
            let (per_partition, segments) = tally_inserted(conn.insert_messages(keep).await?);
            let inserted: i64 = per_partition.iter().map(|&(_, n)| n).sum();
            let duplicates = kept - inserted;
            conn.record_chunk(ChunkRecord {
                batch_id,
                per_partition,
                processed: chunk.processed,
                valid: inserted,
                invalid: chunk.invalid,
                duplicates,
                opted_out,
                segments,
                ahead,
                done_up_to,
                run,
                at: now(),
            })
            .await?
            .then_some(())
            .ok_or(StoreError::Superseded(batch_id))?;
            Ok(ChunkWritten {
                inserted,
                duplicates,
                opted_out,
            })
        })
    }

    /// Moves the preparation checkpoint of run `run` forward to `position` (every chunk up to it
    /// is committed) and forgets the chunk ranges it passes; `StoreError::Superseded` when a
    /// newer run has started.
    pub async fn advance_checkpoint(
        &self,
        batch_id: i64,
        run: i64,
        position: i64,
    ) -> Result<(), StoreError> {
        with_tx!(self, |conn| {
            // A chunk of no rows: the run's check, the passed ranges and the checkpoint only.
            conn.record_chunk(ChunkRecord {
                batch_id,
                per_partition: Vec::new(),
                processed: 0,
                valid: 0,
                invalid: 0,
                duplicates: 0,
                opted_out: 0,
                segments: 0,
                ahead: None,
                done_up_to: position,
                run,
                at: now(),
            })
            .await?
            .then_some(())
            .ok_or(StoreError::Superseded(batch_id))
        })
    }

    /// The recipient ranges (first, last) of the chunks written beyond `position` by writers
    /// side by side, in order: a restart from `position` skips their recipients.
    pub async fn chunks_written_after(
        &self,
        batch_id: i64,
        position: i64,
    ) -> Result<Vec<(i64, i64)>, StoreError> {
        with_conn!(self, |conn| {
            Ok(preparation_chunks::table
                .filter(preparation_chunks::batch_id.eq(batch_id))
                .filter(preparation_chunks::last_recipient_id.gt(position))
                .order(preparation_chunks::last_recipient_id)
                .select((
                    preparation_chunks::first_recipient_id,
                    preparation_chunks::last_recipient_id,
                ))
                .load(conn)
                .await?)
        })
    }

    /// Refreshes the planner's statistics of the messages table. Preparation calls it when it has
    /// added a batch's messages: planned against the empty table's statistics, delivery's
    /// statements would walk a whole partition to find a slice's rows by id.
    pub async fn analyze_messages(&self) -> Result<(), StoreError> {
        with_conn!(self, |conn| {
            use diesel_async::SimpleAsyncConnection as _;
            let sql = match self.backend() {
                super::Backend::Postgres => "ANALYZE messages",
                // Bounded: SQLite's ANALYZE would otherwise read every index entry.
                super::Backend::Sqlite => "PRAGMA analysis_limit=1000; ANALYZE messages",
            };
            conn.batch_execute(sql).await?;
            Ok(())
        })
    }
}
