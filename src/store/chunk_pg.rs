//! A prepared chunk written on PostgreSQL in one statement, when it does not go in by `COPY`
//! (a small batch's only chunk, a large batch's last, or a chunk whose copy met a number another
//! writer committed meanwhile).
//!
//! In a transaction, the same write took six round trips (`BEGIN`, `SET LOCAL`, the opt-out
//! lookup, the insert, the record, `COMMIT`); for a batch of ten, the round trips, not the
//! statements' work, were most of what preparing it cost the database (BENCHMARKS.md, "A small
//! batch in fewer round trips").

use diesel::sql_types;
use diesel_async::{AsyncPgConnection, RunQueryDsl};

use super::bulk::chunk_ranges_pg;
use super::cached::Cached;
use super::models::NewMessage;
use super::records::{ChunkWritten, in_number_order};

/// Writes a chunk as `write_prepared_chunk_beside` does, in one statement that commits by itself,
/// taking its locks in the order a chunk written by `COPY` takes them (the messages' numbers,
/// then the batch's row, then its partitions), so that the two kinds of writers side by side
/// cannot deadlock.
///
/// - `off` is `SET LOCAL synchronous_commit = off` for the statement's own transaction: its
///   commit does not wait for the disk. A chunk and its checkpoint commit together, so a crash
///   that loses the commit loses both, and preparation prepares the chunk again; a later commit
///   that does wait (the batch leaving `preparing`) flushes the WAL up to itself, these chunks
///   included.
/// - `cand` marks the numbers on the opt-out list; the others are inserted in the order given
///   (a number's first recipient wins, the later ones are duplicates skipped by the unique
///   index).
/// - `batch` adds the counters if `$14` is still the batch's newest preparation run. Its lock is
///   what a new run's `begin_preparation_run` waits for, so a run that starts either sees this
///   chunk committed or makes this statement find another run number (PostgreSQL re-checks an
///   updated row's condition on its newest version). Then the main query fails the statement
///   with `SUPERSEDED` in its message, and nothing of the chunk stays: a statement cannot
///   otherwise roll back what its own insert wrote.
/// - The partitions' totals, the kept range and the checkpoint move as in `RECORD_CHUNK_PG`.
const WRITE_CHUNK_PG: &str = concat!(
    "WITH off AS (SELECT set_config('synchronous_commit', 'off', true)), \
    cand AS ( \
        SELECT v.*, EXISTS (SELECT 1 FROM opt_outs o WHERE o.phone = v.phone) AS opted \
        FROM unnest($2::int[], $3::bigint[], $4::text[], $5::text[], $6::text[], $7::int[]) \
            WITH ORDINALITY AS v(partition, recipient_id, phone, body, encoding, segments, ord)), \
    ins AS ( \
        INSERT INTO messages \
            (batch_id, partition, recipient_id, phone, body, encoding, segments, updated_at) \
        SELECT $1, partition, recipient_id, phone, body, encoding, segments, $13 \
        FROM cand WHERE NOT opted ORDER BY ord \
        ON CONFLICT (batch_id, phone) DO NOTHING \
        RETURNING partition, segments), \
    tally AS ( \
        SELECT (SELECT count(*) FROM ins) AS inserted, \
            (SELECT coalesce(sum(segments), 0) FROM ins) AS segments, \
            (SELECT count(*) FROM cand WHERE opted) AS opted_out, \
            (SELECT count(*) FROM cand WHERE NOT opted) AS kept), \
    batch AS ( \
        UPDATE batches b SET processed = b.processed + $8, valid = b.valid + t.inserted, \
            invalid = b.invalid + $9, duplicates = b.duplicates + t.kept - t.inserted, \
            opted_out = b.opted_out + t.opted_out, segments = b.segments + t.segments \
        FROM tally t WHERE b.id = $1 AND b.preparation_run = $14 RETURNING 1), \
    counted AS ( \
        UPDATE partitions p SET total = p.total + c.n \
        FROM (SELECT partition, count(*) AS n FROM ins GROUP BY partition) c \
        WHERE p.batch_id = $1 AND p.idx = c.partition), ",
    chunk_ranges_pg!(),
    " SELECT t.inserted, t.opted_out, t.kept, \
        CASE WHEN EXISTS (SELECT 1 FROM batch) THEN 1 \
            ELSE CAST('SUPERSEDED ' || t.kept AS int) END AS recorded \
    FROM tally t, off"
);

/// The mark of `WRITE_CHUNK_PG`'s failure when its run is no longer the newest.
const SUPERSEDED: &str = "SUPERSEDED";

/// What `WRITE_CHUNK_PG` answers.
#[derive(diesel::QueryableByName)]
struct Written {
    #[diesel(sql_type = sql_types::BigInt)]
    inserted: i64,
    #[diesel(sql_type = sql_types::BigInt)]
    opted_out: i64,
    #[diesel(sql_type = sql_types::BigInt)]
    kept: i64,
}

/// A chunk as `WRITE_CHUNK_PG` takes it.
pub(super) struct ChunkPg {
    pub batch_id: i64,
    pub messages: Vec<NewMessage>,
    pub processed: i64,
    pub invalid: i64,
    /// The chunk's recipient range, kept while the checkpoint is behind it (`ChunkRecord::ahead`).
    pub ahead: Option<(i64, i64)>,
    pub done_up_to: i64,
    pub run: i64,
    pub at: chrono::NaiveDateTime,
}

/// Writes the chunk (see `WRITE_CHUNK_PG`); `None` when `run` is no longer the batch's newest
/// preparation run, and nothing was written.
pub(super) async fn write_chunk(
    conn: &mut AsyncPgConnection,
    chunk: ChunkPg,
) -> diesel::QueryResult<Option<ChunkWritten>> {
    let c = MessageColumns::of(chunk.messages);
    let (first, last) = chunk.ahead.unzip();
    let write = diesel::sql_query(WRITE_CHUNK_PG)
        .bind::<sql_types::BigInt, _>(chunk.batch_id)
        .bind::<sql_types::Array<sql_types::Integer>, _>(c.partition)
        .bind::<sql_types::Array<sql_types::BigInt>, _>(c.recipient)
        .bind::<sql_types::Array<sql_types::Text>, _>(c.phone)
        .bind::<sql_types::Array<sql_types::Text>, _>(c.body)
        .bind::<sql_types::Array<sql_types::Text>, _>(c.encoding)
        .bind::<sql_types::Array<sql_types::Integer>, _>(c.segments)
        .bind::<sql_types::BigInt, _>(chunk.processed)
        .bind::<sql_types::BigInt, _>(chunk.invalid)
        .bind::<sql_types::Nullable<sql_types::BigInt>, _>(first)
        .bind::<sql_types::BigInt, _>(last.unwrap_or(chunk.done_up_to))
        .bind::<sql_types::BigInt, _>(chunk.done_up_to)
        .bind::<sql_types::Timestamp, _>(chunk.at)
        .bind::<sql_types::BigInt, _>(chunk.run);
    let written: Written = match Cached(write).get_result(conn).await {
        Err(diesel::result::Error::DatabaseError(_, info))
            if info.message().contains(SUPERSEDED) =>
        {
            return Ok(None);
        }
        answer => answer?,
    };
    Ok(Some(ChunkWritten {
        inserted: written.inserted,
        duplicates: written.kept - written.inserted,
        opted_out: written.opted_out,
    }))
}

/// Messages as PostgreSQL's inserts take them: one array per column.
struct MessageColumns {
    partition: Vec<i32>,
    recipient: Vec<i64>,
    phone: Vec<String>,
    body: Vec<String>,
    encoding: Vec<String>,
    segments: Vec<i32>,
}

impl MessageColumns {
    /// The rows' columns, in number order (`records::in_number_order`).
    fn of(mut rows: Vec<NewMessage>) -> Self {
        in_number_order(&mut rows);
        let n = rows.len();
        let mut c = MessageColumns {
            partition: Vec::with_capacity(n),
            recipient: Vec::with_capacity(n),
            phone: Vec::with_capacity(n),
            body: Vec::with_capacity(n),
            encoding: Vec::with_capacity(n),
            segments: Vec::with_capacity(n),
        };
        for row in rows {
            c.partition.push(row.partition);
            c.recipient.push(row.recipient_id);
            c.phone.push(row.phone);
            c.body.push(row.body);
            c.encoding.push(row.encoding);
            c.segments.push(row.segments);
        }
        c
    }
}
