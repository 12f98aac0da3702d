//! Bulk inserts, the one place where the backends part. PostgreSQL takes one array per column
//! and unnests them (one statement of a fixed shape per chunk). diesel-async cannot send a
//! multi-row INSERT to SQLite, so on SQLite the rows go one by one inside a single blocking call
//! on the same connection (and transaction) — cheap in-process, with a cached prepared statement.

use chrono::NaiveDateTime;
use diesel::prelude::*;
use diesel::result::QueryResult;
use diesel::sql_types;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use futures_util::future::BoxFuture;

use super::SqliteConn;
use super::cached::Cached;
use super::models::{NewMessage, NewRecipient};
use super::schema::{batches, checkpoints, messages, partitions, preparation_chunks, recipients};

/// Bulk writes on a connection of either backend.
pub(crate) trait BulkInsert {
    /// Inserts recipients.
    fn insert_recipients(&mut self, rows: Vec<NewRecipient>) -> BoxFuture<'_, QueryResult<usize>>;
    /// Inserts the partition rows of a new batch.
    fn insert_partitions(&mut self, batch_id: i64, count: i32)
    -> BoxFuture<'_, QueryResult<usize>>;
    /// Adds a written chunk to its batch's counters and moves the preparation checkpoint, if
    /// the chunk's run is still the batch's newest; answers whether it was (when not, nothing
    /// is recorded and the caller rolls its transaction back).
    fn record_chunk(&mut self, record: ChunkRecord) -> BoxFuture<'_, QueryResult<bool>>;
}

/// What a prepared chunk adds to its batch, recorded in the chunk's transaction.
#[derive(Debug)]
pub(crate) struct ChunkRecord {
    pub batch_id: i64,
    /// Messages inserted per partition, in partition order: the order their rows are locked in,
    /// the same in every writer, so that two writers side by side cannot deadlock.
    pub per_partition: Vec<(i32, i64)>,
    pub processed: i64,
    pub valid: i64,
    pub invalid: i64,
    pub duplicates: i64,
    pub opted_out: i64,
    pub segments: i64,
    /// The chunk's recipient range (first, last), kept while the checkpoint is behind it, for a
    /// chunk that may commit ahead of an earlier one.
    pub ahead: Option<(i64, i64)>,
    /// Where the checkpoint moves, unless it is already further; the kept ranges it has passed
    /// are forgotten.
    pub done_up_to: i64,
    /// The preparation run writing the chunk (`Store::begin_preparation_run`).
    pub run: i64,
    pub at: NaiveDateTime,
}

/// The last sub-statements of a chunk's record on PostgreSQL (`RECORD_CHUNK_PG`,
/// `chunk_pg::WRITE_CHUNK_PG`): the chunk's range kept (`$10`, `$11`) while the checkpoint
/// (`$12`) is behind it, the ranges it passed forgotten, and the checkpoint moved forward only
/// (`$13` the time), for batch `$1`.
macro_rules! chunk_ranges_pg {
    () => {
        "ahead AS ( \
            INSERT INTO preparation_chunks (batch_id, first_recipient_id, last_recipient_id) \
            SELECT $1, $10, $11 WHERE $10::bigint IS NOT NULL AND $11 > $12), \
        passed AS ( \
            DELETE FROM preparation_chunks WHERE batch_id = $1 AND last_recipient_id <= $12), \
        moved AS ( \
            INSERT INTO checkpoints AS c (batch_id, step, position, updated_at) \
            VALUES ($1, 'preparation', $12, $13) \
            ON CONFLICT (batch_id, step) DO UPDATE \
                SET position = EXCLUDED.position, updated_at = EXCLUDED.updated_at \
                WHERE c.position < EXCLUDED.position)"
    };
}
pub(super) use chunk_ranges_pg;

/// `ChunkRecord` on PostgreSQL, in one statement: the batch's counters (`$4`..`$9`) if `$14` is
/// still its newest preparation run, the partitions' totals (`$2` indexes, `$3` counts), the
/// chunk's range kept (`$10`, `$11`) while the checkpoint (`$12`) is behind it, the passed ranges
/// forgotten, and the checkpoint moved forward only. Answers 1 when the run was the newest, else
/// 0, and the caller rolls the whole transaction back.
///
/// The batch's row is updated first (the main query reads it; the other sub-statements run
/// after): its lock is what a new run's `BEGIN_RUN_PG` waits for, so a run that starts either
/// sees this chunk committed or makes this statement find another run number (PostgreSQL
/// re-checks an updated row's condition on its newest version). The counter rows are shared by
/// the writers side by side: locked from this statement to the commit, not across a dozen round
/// trips, and in the same order by every writer.
pub(super) const RECORD_CHUNK_PG: &str = concat!(
    "WITH batch AS ( \
        UPDATE batches SET processed = processed + $4, valid = valid + $5, \
            invalid = invalid + $6, duplicates = duplicates + $7, opted_out = opted_out + $8, \
            segments = segments + $9 \
        WHERE id = $1 AND preparation_run = $14 RETURNING 1), \
    counted AS ( \
        UPDATE partitions p SET total = p.total + v.n \
        FROM unnest($2::int[], $3::bigint[]) AS v(idx, n) \
        WHERE p.batch_id = $1 AND p.idx = v.idx), ",
    chunk_ranges_pg!(),
    " SELECT count(*) AS recorded FROM batch"
);

/// What `RECORD_CHUNK_PG` answers.
#[derive(QueryableByName)]
struct Recorded {
    #[diesel(sql_type = sql_types::BigInt)]
    recorded: i64,
}

/// Recipients go to PostgreSQL as one array per column, unnested by the server: one statement
/// of a fixed shape (prepared once per connection) whatever the number of rows, instead of a
/// multi-row VALUES list with a bind per field that is parsed and planned anew each time.
const INSERT_RECIPIENTS_PG: &str = "\
    INSERT INTO recipients (batch_id, phone, vars) \
    SELECT $1, v.phone, v.vars FROM unnest($2::text[], $3::text[]) AS v(phone, vars)";

impl BulkInsert for AsyncPgConnection {
    fn insert_recipients(&mut self, rows: Vec<NewRecipient>) -> BoxFuture<'_, QueryResult<usize>> {
        Box::pin(async move {
            let Some(batch_id) = <[_]>::first(&rows).map(|r| r.batch_id) else {
                return Ok(0);
            };
            let (phones, vars): (Vec<String>, Vec<Option<String>>) =
                rows.into_iter().map(|r| (r.phone, r.vars)).unzip();
            let insert = diesel::sql_query(INSERT_RECIPIENTS_PG)
                .bind::<sql_types::BigInt, _>(batch_id)
                .bind::<sql_types::Array<sql_types::Text>, _>(phones)
                .bind::<sql_types::Array<sql_types::Nullable<sql_types::Text>>, _>(vars);
            Cached(insert).execute(self).await
        })
    }

    fn insert_partitions(
        &mut self,
        batch_id: i64,
        count: i32,
    ) -> BoxFuture<'_, QueryResult<usize>> {
        let rows: Vec<_> = (0..count)
            .map(|i| (partitions::batch_id.eq(batch_id), partitions::idx.eq(i)))
            .collect();
        Box::pin(async move {
            diesel::insert_into(partitions::table)
                .values(rows)
                .execute(self)
                .await
        })
    }

    fn record_chunk(&mut self, r: ChunkRecord) -> BoxFuture<'_, QueryResult<bool>> {
        Box::pin(async move {
            let (idx, n): (Vec<i32>, Vec<i64>) = r.per_partition.into_iter().unzip();
            let (first, last) = r.ahead.unzip();
            let record = diesel::sql_query(RECORD_CHUNK_PG)
                .bind::<sql_types::BigInt, _>(r.batch_id)
                .bind::<sql_types::Array<sql_types::Integer>, _>(idx)
                .bind::<sql_types::Array<sql_types::BigInt>, _>(n)
                .bind::<sql_types::BigInt, _>(r.processed)
                .bind::<sql_types::BigInt, _>(r.valid)
                .bind::<sql_types::BigInt, _>(r.invalid)
                .bind::<sql_types::BigInt, _>(r.duplicates)
                .bind::<sql_types::BigInt, _>(r.opted_out)
                .bind::<sql_types::BigInt, _>(r.segments)
                .bind::<sql_types::Nullable<sql_types::BigInt>, _>(first)
                .bind::<sql_types::BigInt, _>(last.unwrap_or(r.done_up_to))
                .bind::<sql_types::BigInt, _>(r.done_up_to)
                .bind::<sql_types::Timestamp, _>(r.at)
                .bind::<sql_types::BigInt, _>(r.run);
            let answer: Recorded = Cached(record).get_result(self).await?;
            Ok(answer.recorded == 1)
        })
    }
}

impl BulkInsert for SqliteConn {
    fn insert_recipients(&mut self, rows: Vec<NewRecipient>) -> BoxFuture<'_, QueryResult<usize>> {
        self.spawn_blocking(move |conn| {
            let mut n = 0;
            for row in &rows {
                n += diesel::RunQueryDsl::execute(
                    diesel::insert_into(recipients::table).values(row),
                    conn,
                )?;
            }
            Ok(n)
        })
    }

    fn insert_partitions(
        &mut self,
        batch_id: i64,
        count: i32,
    ) -> BoxFuture<'_, QueryResult<usize>> {
        self.spawn_blocking(move |conn| {
            let mut n = 0;
            for i in 0..count {
                n += diesel::RunQueryDsl::execute(
                    diesel::insert_into(partitions::table)
                        .values((partitions::batch_id.eq(batch_id), partitions::idx.eq(i))),
                    conn,
                )?;
            }
            Ok(n)
        })
    }

    fn record_chunk(&mut self, r: ChunkRecord) -> BoxFuture<'_, QueryResult<bool>> {
        let batch_id = r.batch_id;
        Box::pin(async move {
            // The batch's counters first, under the run check: SQLite has one writer at a
            // time, so a run that started meanwhile has its number stored already.
            let counted = Cached(
                diesel::update(
                    batches::table
                        .find(batch_id)
                        .filter(batches::preparation_run.eq(r.run)),
                )
                .set((
                    batches::processed.eq(batches::processed + r.processed),
                    batches::valid.eq(batches::valid + r.valid),
                    batches::invalid.eq(batches::invalid + r.invalid),
                    batches::duplicates.eq(batches::duplicates + r.duplicates),
                    batches::opted_out.eq(batches::opted_out + r.opted_out),
                    batches::segments.eq(batches::segments + r.segments),
                )),
            )
            .execute(self)
            .await?;
            if counted == 0 {
                return Ok(false);
            }
            for (idx, n) in r.per_partition {
                Cached(
                    diesel::update(partitions::table.find((batch_id, idx)))
                        .set(partitions::total.eq(partitions::total + n)),
                )
                .execute(self)
                .await?;
            }
            if let Some((first, last)) = r.ahead.filter(|&(_, last)| last > r.done_up_to) {
                diesel::insert_into(preparation_chunks::table)
                    .values((
                        preparation_chunks::batch_id.eq(batch_id),
                        preparation_chunks::first_recipient_id.eq(first),
                        preparation_chunks::last_recipient_id.eq(last),
                    ))
                    .execute(self)
                    .await?;
            }
            diesel::delete(
                preparation_chunks::table
                    .filter(preparation_chunks::batch_id.eq(batch_id))
                    .filter(preparation_chunks::last_recipient_id.le(r.done_up_to)),
            )
            .execute(self)
            .await?;
            // Never backwards: a chunk started before another may commit after it.
            let upsert = diesel::insert_into(checkpoints::table)
                .values((
                    checkpoints::batch_id.eq(batch_id),
                    checkpoints::step.eq("preparation"),
                    checkpoints::position.eq(r.done_up_to),
                    checkpoints::updated_at.eq(r.at),
                ))
                .on_conflict((checkpoints::batch_id, checkpoints::step))
                .do_update()
                .set((
                    checkpoints::position.eq(r.done_up_to),
                    checkpoints::updated_at.eq(r.at),
                ));
            Cached(diesel::query_dsl::methods::FilterDsl::filter(
                upsert,
                checkpoints::position.lt(r.done_up_to),
            ))
            .execute(self)
            .await?;
            Ok(true)
        })
    }
}

/// Inserts messages on SQLite, skipping numbers the batch already has; returns (partition,
/// segments) of each inserted row.
pub(super) fn insert_messages_sqlite(
    conn: &mut SqliteConn,
    rows: Vec<NewMessage>,
) -> BoxFuture<'_, QueryResult<Vec<(i32, i32)>>> {
    conn.spawn_blocking(move |conn| {
        let mut inserted = Vec::with_capacity(rows.len());
        for row in &rows {
            let n = diesel::RunQueryDsl::execute(
                diesel::insert_into(messages::table)
                    .values(row)
                    .on_conflict((messages::batch_id, messages::phone))
                    .do_nothing(),
                conn,
            )?;
            if n > 0 {
                inserted.push((row.partition, row.segments));
            }
        }
        Ok(inserted)
    })
}
