//! Preparation: checkpoints, the fencing run, and prepared chunks written with their
//! counters (on PostgreSQL by `COPY`, see `copy.rs`).

use diesel::prelude::*;
use diesel_async::RunQueryDsl;

use super::bulk::{BulkInsert, ChunkRecord, insert_messages_sqlite};
use super::cached::Cached;
use super::chunk_pg::{self, ChunkPg};
use super::models::*;
use super::records::{
    ChunkWritten, INSERT_CHUNK, PreparationRun, PreparedChunk, now, tally_inserted,
};
use super::schema::{batches, checkpoints, opt_outs};
use super::{Pools, Store, StoreError, with_conn, with_tx};

/// Chunks of at least this many messages go in by `COPY`; smaller ones (a small batch's only
/// chunk, a large batch's last) by one `INSERT` of arrays. A `COPY` of ten rows spent 1.4–1.6 ms
/// in PostgreSQL against 0.18 ms for the `INSERT` (BENCHMARKS.md, "A small batch at 30
/// statements").
pub const COPY_FROM_ROWS: usize = 100;

/// `Store::preparation_start`: the checkpoint, with each chunk range beyond it (one row with
/// no range when there is none). `?` is the batch's id, in each backend's notation.
const PREPARATION_START: &str = "\
    SELECT c.position, pc.first_recipient_id AS first, pc.last_recipient_id AS last \
    FROM (SELECT coalesce((SELECT position FROM checkpoints \
            WHERE batch_id = ? AND step = 'preparation'), 0) AS position) c \
        LEFT JOIN preparation_chunks pc \
            ON pc.batch_id = ? AND pc.last_recipient_id > c.position \
    ORDER BY pc.last_recipient_id";
static PREPARATION_START_PG: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| PREPARATION_START.replace('?', "$1"));
static PREPARATION_START_SQLITE: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| PREPARATION_START.replace('?', "?1"));

/// A row of `PREPARATION_START`.
#[derive(QueryableByName)]
struct StartRow {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    position: i64,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::BigInt>)]
    first: Option<i64>,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::BigInt>)]
    last: Option<i64>,
}

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

    /// Starts a new run of a batch's preparation and answers its number, with the recipients
    /// counted so far. From then on only this run's chunks are recorded
    /// (`write_prepared_chunk_beside`): a chunk of an earlier run still being written (a run
    /// stopped half-way, aborted, or running on an instance that lost the batch) is rolled back.
    /// On PostgreSQL this waits for such a chunk that is already being recorded, so the
    /// checkpoint read after it, and the count answered (the row's newest version), include
    /// that chunk.
    pub async fn begin_preparation_run(&self, batch_id: i64) -> Result<PreparationRun, StoreError> {
        with_conn!(self, |conn| {
            let begin = diesel::update(batches::table.find(batch_id))
                .set(batches::preparation_run.eq(batches::preparation_run + 1))
                .returning((batches::preparation_run, batches::processed));
            let (number, processed) = Cached(begin).get_result(conn).await?;
            Ok(PreparationRun { number, processed })
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
    /// behind it (`preparation_start`). The checkpoint moves to `done_up_to` — the end of the
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
        let pool = match &self.pools {
            Pools::Pg(pool) => {
                let mut conn = pool.get().await?;
                let chunk = ChunkPg {
                    batch_id,
                    messages: chunk.messages,
                    processed: chunk.processed,
                    invalid: chunk.invalid,
                    ahead,
                    done_up_to,
                    run,
                    at: now(),
                };
                return chunk_pg::write_chunk(&mut conn, chunk)
                    .await?
                    .ok_or(StoreError::Superseded(batch_id));
            }
            Pools::Sqlite(pool) => pool,
        };
        // SQLite: one transaction (its commits do not wait for the disk in WAL mode with
        // `synchronous=NORMAL`).
        let mut conn = pool.get().await?;
        conn.immediate_transaction::<_, StoreError, _>(async |conn| {
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
            // One row per statement, in one blocking call: no bind limit to respect.
            let (per_partition, segments) =
                tally_inserted(insert_messages_sqlite(conn, keep).await?);
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
        .await
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

    /// Where a run of a batch's preparation starts: the checkpoint (0 when there is none), and
    /// the recipient ranges (first, last) of the chunks that writers side by side committed
    /// beyond it, in order, whose recipients a restart skips. One statement, so that both are
    /// read at one moment.
    pub async fn preparation_start(
        &self,
        batch_id: i64,
    ) -> Result<(i64, Vec<(i64, i64)>), StoreError> {
        let sql = match self.backend() {
            super::Backend::Postgres => &*PREPARATION_START_PG,
            super::Backend::Sqlite => &*PREPARATION_START_SQLITE,
        };
        let rows: Vec<StartRow> = with_conn!(self, |conn| {
            let query = diesel::sql_query(sql).bind::<diesel::sql_types::BigInt, _>(batch_id);
            Cached(query).load(conn).await
        })?;
        let position = <[StartRow]>::first(&rows).map_or(0, |r| r.position);
        let ahead = rows.iter().filter_map(|r| r.first.zip(r.last)).collect();
        Ok((position, ahead))
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
