//! Every query of the service. Handlers and actors call these functions; none of them builds SQL.

use std::collections::{BTreeMap, HashSet};

use chrono::NaiveDateTime;
use diesel::prelude::*;
use diesel_async::RunQueryDsl;

use super::bulk::{BulkInsert, ChunkRecord};
use super::cached::Cached;
use super::models::*;
use super::schema::{
    batches, checkpoints, messages, opt_outs, partitions, preparation_chunks, recipients,
};
use super::{Pools, Store, StoreError, with_conn, with_tx};
use crate::domain::batch::MessageStatus;
use crate::domain::counts::{BatchTally, ByStatus, Prepared};
use crate::domain::lifecycle::Bookkeeping;
use crate::domain::state::BatchState;
use diesel::sql_types;

use super::types::{CANCELLED, FAILED, PENDING, SENDING, SENT};

/// Rows per multi-row INSERT: keeps every statement under SQLite's and PostgreSQL's bind limits.
const INSERT_CHUNK: usize = 1000;

/// The messages of a slice marked sent (with their provider ids): `$1` ids, `$2` provider ids,
/// `$3` batch, `$4` partition, `$5` now. Only messages still `sending` become `sent`; `done` has
/// a row for each.
fn record_sent_cte() -> String {
    format!(
        "WITH done AS ( \
            UPDATE messages m SET status = {SENT}, provider_message_id = v.pid, error = NULL, \
                   updated_at = $5 \
            FROM unnest($1::bigint[], $2::text[]) AS v(id, pid) \
            WHERE m.id = v.id AND m.batch_id = $3 AND m.partition = $4 AND m.status = {SENDING} \
            RETURNING 1) "
    )
}

/// Marks a slice's messages sent and counts them in the partition's counters, in one statement
/// (parameters as in `record_sent_cte`).
static RECORD_SENT_PG: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    record_sent_cte()
        + "UPDATE partitions SET sent = sent + (SELECT count(*) FROM done) \
           WHERE batch_id = $3 AND idx = $4"
});

/// The claim of up to `limit` due messages of a task's range on PostgreSQL (`Store::claim`),
/// with the placeholders of the batch, the partition, the time, the range's first and last id
/// and the claimer.
///
/// The limit is written into the text, not bound. PostgreSQL keeps running custom plans of a
/// prepared statement (planned anew at every run) while its generic plan is estimated costlier,
/// and with a bound limit the generic plan assumes a tenth of the range's estimated rows: at
/// 1,000,000 messages 125 for a slice of 64, so every claim was planned again (0.5–0.6 ms of
/// PostgreSQL's time per slice, server log). With the limit in the text the generic plan is
/// taken, as it already was for smaller batches. A worker's limit is its claim size, so each
/// connection prepares one or two such texts.
fn claim_pg(placeholders: [&str; 6], limit: i64) -> String {
    let [batch, partition, at, first, last, claimer] = placeholders;
    format!(
        "UPDATE messages SET status = {SENDING}, attempts = attempts + 1, claimed_by = {claimer}, \
                updated_at = {at} \
         WHERE id IN ( \
            SELECT id FROM messages \
            WHERE batch_id = {batch} AND partition = {partition} AND id BETWEEN {first} AND {last} \
              AND status = {PENDING} AND (next_attempt_at IS NULL OR next_attempt_at <= {at}) \
            ORDER BY id LIMIT {limit}) \
           AND status = {PENDING} \
         RETURNING id, phone, body, attempts"
    )
}

/// `RECORD_SENT_PG`, then the claim of the task's next slice (`claim_pg`) in the same
/// statement: `$6`..`$7` the task's remaining range, `$8` the claimer. The two updates touch
/// different rows (`sending` ones, then `pending` ones).
fn record_sent_and_claim_pg(limit: i64) -> String {
    record_sent_cte()
        + ", counted AS ( \
            UPDATE partitions SET sent = sent + (SELECT count(*) FROM done) \
            WHERE batch_id = $3 AND idx = $4) "
        + &claim_pg(["$3", "$4", "$5", "$6", "$7", "$8"], limit)
}

/// The error text of a message whose outcome was lost with its process.
pub const UNKNOWN_OUTCOME: &str = "unknown_outcome";

/// One chunk of prepared recipients, written in one transaction with its checkpoint.
#[derive(Debug, Default)]
pub struct PreparedChunk {
    /// Messages of the valid recipients, in recipient order.
    pub messages: Vec<NewMessage>,
    /// The last recipient id of the chunk: preparation continues after it.
    pub last_recipient_id: i64,
    /// Recipients looked at.
    pub processed: i64,
    /// Recipients with an invalid number or a template that could not be rendered.
    pub invalid: i64,
    /// The chunk's numbers that may repeat one the batch already has (the others certainly do
    /// not: preparation's `SeenNumbers` has seen every number written since the batch had none).
    /// `None` when that cannot be told, as in a run continued after a restart: every number may.
    pub repeats: Option<HashSet<String>>,
}

/// The (partition, segments) of a chunk's inserted messages, tallied for its record: messages
/// per partition, in partition order (`ChunkRecord::per_partition`), and segments in all.
pub(super) fn tally_inserted(
    inserted: impl IntoIterator<Item = (i32, i32)>,
) -> (Vec<(i32, i64)>, i64) {
    let mut per_partition: BTreeMap<i32, i64> = BTreeMap::new();
    let mut segments = 0i64;
    for (partition, segs) in inserted {
        *per_partition.entry(partition).or_default() += 1;
        segments += i64::from(segs);
    }
    (per_partition.into_iter().collect(), segments)
}

/// What writing a prepared chunk did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ChunkWritten {
    /// Messages inserted.
    pub inserted: i64,
    /// Recipients dropped as duplicates of an earlier one.
    pub duplicates: i64,
    /// Recipients dropped because their number opted out.
    pub opted_out: i64,
}

/// A delivery task's outcomes, recorded together.
#[derive(Debug, Default)]
pub struct Outcomes {
    /// Sent, with the provider's message id.
    pub sent: Vec<(i64, Option<String>)>,
    /// Failed for good, with the error.
    pub failed: Vec<(i64, String)>,
    /// Transient failure: back to `pending`, not before the given time.
    pub retry: Vec<(i64, NaiveDateTime, String)>,
    /// Not sent because the batch paused: back to `pending` at once.
    pub released: Vec<i64>,
    /// Not sent because the batch was cancelled.
    pub cancelled: Vec<i64>,
}

impl Outcomes {
    /// Messages covered.
    pub fn len(&self) -> usize {
        self.sent.len()
            + self.failed.len()
            + self.retry.len()
            + self.released.len()
            + self.cancelled.len()
    }
    /// True when no message is covered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Recipient rows as uploaded: (phone, vars as a JSON object).
pub type RecipientRows = Vec<(String, Option<String>)>;

/// One message of an upload's feed: rows, the end of the upload (`None`), or why it is bad.
pub type UploadChunk<E> = Result<Option<RecipientRows>, E>;

/// Why an upload stored nothing.
#[derive(Debug, thiserror::Error)]
pub enum ImportError<E> {
    /// The input was bad.
    #[error("bad input")]
    Input(E),
    /// The upload ended without its closing marker (the client went away).
    #[error("the upload was cut short")]
    Incomplete,
    /// The batch left state `initial` meanwhile.
    #[error("the batch is no longer in state initial")]
    NotInitial,
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl<E> From<diesel::result::Error> for ImportError<E> {
    fn from(e: diesel::result::Error) -> Self {
        ImportError::Store(e.into())
    }
}

impl<E> From<diesel_async::pooled_connection::deadpool::PoolError> for ImportError<E> {
    fn from(e: diesel_async::pooled_connection::deadpool::PoolError) -> Self {
        ImportError::Store(e.into())
    }
}

/// A batch with its partition counters.
#[derive(Debug, Clone)]
pub struct BatchRecord {
    /// The row.
    pub batch: Batch,
    /// Its partitions, by index.
    pub partitions: Vec<Partition>,
}

pub(super) fn now() -> NaiveDateTime {
    chrono::Utc::now().naive_utc()
}

impl Store {
    /// Creates a batch in state `initial` with its partitions and inline recipients, atomically.
    pub async fn create_batch(
        &self,
        new: NewBatch,
        inline: Vec<(String, Option<String>)>,
    ) -> Result<BatchRecord, StoreError> {
        with_tx!(self, |conn| {
            let batch: Batch = diesel::insert_into(batches::table)
                .values(&new)
                .returning(Batch::as_returning())
                .get_result(conn)
                .await?;
            conn.insert_partitions(batch.id, batch.partition_count)
                .await?;
            let count = inline.len() as i64;
            for chunk in inline.chunks(INSERT_CHUNK) {
                let rows: Vec<NewRecipient> = chunk
                    .iter()
                    .map(|(phone, vars)| NewRecipient {
                        batch_id: batch.id,
                        phone: phone.clone(),
                        vars: vars.clone(),
                    })
                    .collect();
                conn.insert_recipients(rows).await?;
            }
            let batch: Batch = diesel::update(batches::table.find(batch.id))
                .set(batches::recipients.eq(count))
                .returning(Batch::as_returning())
                .get_result(conn)
                .await?;
            let partitions = partitions::table
                .filter(partitions::batch_id.eq(batch.id))
                .order(partitions::idx)
                .select(Partition::as_select())
                .load(conn)
                .await?;
            Ok(BatchRecord { batch, partitions })
        })
    }

    /// A batch by its public id, with its partitions.
    pub async fn find_batch(&self, public_id: &str) -> Result<Option<BatchRecord>, StoreError> {
        with_conn!(self, |conn| {
            let Some(batch) = batches::table
                .filter(batches::public_id.eq(public_id))
                .select(Batch::as_select())
                .first(conn)
                .await
                .optional()?
            else {
                return Ok(None);
            };
            let partitions = partitions::table
                .filter(partitions::batch_id.eq(batch.id))
                .order(partitions::idx)
                .select(Partition::as_select())
                .load(conn)
                .await?;
            Ok(Some(BatchRecord { batch, partitions }))
        })
    }

    /// A batch row by its internal id.
    pub async fn batch(&self, id: i64) -> Result<Batch, StoreError> {
        with_conn!(self, |conn| {
            Ok(batches::table
                .find(id)
                .select(Batch::as_select())
                .first(conn)
                .await?)
        })
    }

    /// Batches newest first, optionally in one state, after a cursor (a public id).
    pub async fn list_batches(
        &self,
        state: Option<&str>,
        after: Option<&str>,
        limit: i64,
    ) -> Result<Vec<BatchRecord>, StoreError> {
        with_conn!(self, |conn| {
            let mut query = batches::table.select(Batch::as_select()).into_boxed();
            if let Some(state) = state {
                query = query.filter(batches::state.eq(state.to_string()));
            }
            if let Some(after) = after {
                let cursor: Option<i64> = batches::table
                    .filter(batches::public_id.eq(after))
                    .select(batches::id)
                    .first(conn)
                    .await
                    .optional()?;
                query = query.filter(batches::id.lt(cursor.unwrap_or(0)));
            }
            let rows: Vec<Batch> = query
                .order(batches::id.desc())
                .limit(limit)
                .load(conn)
                .await?;
            let ids: Vec<i64> = rows.iter().map(|b| b.id).collect();
            let mut parts: BTreeMap<i64, Vec<Partition>> = BTreeMap::new();
            for p in partitions::table
                .filter(partitions::batch_id.eq_any(&ids))
                .order((partitions::batch_id, partitions::idx))
                .select(Partition::as_select())
                .load(conn)
                .await?
            {
                parts.entry(p.batch_id).or_default().push(p);
            }
            Ok(rows
                .into_iter()
                .map(|batch| BatchRecord {
                    partitions: parts.remove(&batch.id).unwrap_or_default(),
                    batch,
                })
                .collect())
        })
    }

    /// Batches in any of the given states, oldest first (rows that do not read back are left
    /// out, see `readable_batches`).
    pub async fn batches_in_states(&self, states: &[BatchState]) -> Result<Vec<Batch>, StoreError> {
        let states: Vec<&str> = states.iter().map(|s| s.as_str()).collect();
        let ids: Vec<i64> = with_conn!(self, |conn| {
            batches::table
                .filter(batches::state.eq_any(&states))
                .order(batches::id)
                .select(batches::id)
                .load(conn)
                .await
        })?;
        self.readable_batches(ids).await
    }

    /// The batches of `ids`, in that order, leaving out (with an error in the log) a row that
    /// does not read back: for the scans of recovery and take-over, which one corrupt batch
    /// must not stop for all the others.
    pub(super) async fn readable_batches(&self, ids: Vec<i64>) -> Result<Vec<Batch>, StoreError> {
        let mut batches = Vec::with_capacity(ids.len());
        for id in ids {
            match self.batch(id).await {
                Ok(batch) => batches.push(batch),
                Err(StoreError::Corrupt(e)) => {
                    tracing::error!(batch = id, error = %e, "Batch row does not read back; left alone.");
                }
                Err(e) => return Err(e),
            }
        }
        Ok(batches)
    }

    /// Counts of batches by state, for the metrics.
    pub async fn count_batches_by_state(&self) -> Result<Vec<(String, i64)>, StoreError> {
        with_conn!(self, |conn| {
            Ok(batches::table
                .group_by(batches::state)
                .select((batches::state, diesel::dsl::count_star()))
                .load(conn)
                .await?)
        })
    }

    /// Saves a transition if the row is still at `version`; returns the row as saved.
    pub async fn save_lifecycle(
        &self,
        id: i64,
        version: i64,
        update: &LifecycleUpdate,
    ) -> Result<Batch, StoreError> {
        with_conn!(self, |conn| {
            diesel::update(
                batches::table
                    .filter(batches::id.eq(id))
                    .filter(batches::version.eq(version)),
            )
            .set((update, batches::version.eq(version + 1)))
            .returning(Batch::as_returning())
            .get_result(conn)
            .await
            .optional()?
            .ok_or_else(|| StoreError::Conflict(id.to_string()))
        })
    }

    /// Saves the transition that `plan` makes of the batch as stored, under the optimistic
    /// version check: after a concurrent change the row is read again and planned anew, five
    /// times at most, then `StoreError::Conflict`. What the supervisor and the registry save.
    pub async fn save_transition<E: From<StoreError>>(
        &self,
        mut row: Batch,
        plan: impl Fn(&Batch) -> Result<Bookkeeping, E>,
    ) -> Result<Batch, E> {
        for _ in 0..5 {
            let next = plan(&row)?;
            match self
                .save_lifecycle(row.id, row.version, &LifecycleUpdate::from(&next))
                .await
            {
                Ok(saved) => return Ok(saved),
                Err(StoreError::Conflict(_)) => row = self.batch(row.id).await?,
                Err(e) => return Err(e.into()),
            }
        }
        Err(StoreError::Conflict(row.public_id).into())
    }

    /// Stores an upload's recipients in one transaction: chunks arrive on `rx` and `Ok(None)` ends
    /// the upload. An `Err` chunk (bad input), a channel closed early, or a batch no longer
    /// `initial` rolls the whole upload back. Returns (accepted, total).
    pub async fn import_recipients<E: Send>(
        &self,
        batch_id: i64,
        mut rx: tokio::sync::mpsc::Receiver<UploadChunk<E>>,
    ) -> Result<(i64, i64), ImportError<E>> {
        // PostgreSQL streams the rows in by COPY; SQLite inserts them in one write transaction.
        let pool = match &self.pools {
            Pools::Pg(_) => return super::copy::import_recipients(&self.url, batch_id, rx).await,
            Pools::Sqlite(pool) => pool,
        };
        let mut obj = pool.get().await?;
        let conn: &mut super::SqliteConn = &mut obj;
        conn.immediate_transaction::<_, ImportError<E>, _>(async |conn| {
            let mut accepted = 0i64;
            loop {
                match rx.recv().await {
                    Some(Ok(Some(chunk))) => {
                        accepted += chunk.len() as i64;
                        for rows in chunk.chunks(INSERT_CHUNK) {
                            let rows: Vec<NewRecipient> = rows
                                .iter()
                                .map(|(phone, vars)| NewRecipient {
                                    batch_id,
                                    phone: phone.clone(),
                                    vars: vars.clone(),
                                })
                                .collect();
                            conn.insert_recipients(rows).await?;
                        }
                    }
                    Some(Ok(None)) => break,
                    Some(Err(e)) => return Err(ImportError::Input(e)),
                    None => return Err(ImportError::Incomplete),
                }
            }
            let total: Option<i64> = diesel::update(
                batches::table
                    .filter(batches::id.eq(batch_id))
                    .filter(batches::state.eq(BatchState::Initial.as_str())),
            )
            .set((
                batches::recipients.eq(batches::recipients + accepted),
                batches::version.eq(batches::version + 1),
                batches::updated_at.eq(now()),
            ))
            .returning(batches::recipients)
            .get_result(conn)
            .await
            .optional()?;
            total
                .map(|total| (accepted, total))
                .ok_or(ImportError::NotInitial)
        })
        .await
    }

    /// Recipients of a batch after `after`, in id order.
    pub async fn recipients_after(
        &self,
        batch_id: i64,
        after: i64,
        limit: i64,
    ) -> Result<Vec<Recipient>, StoreError> {
        with_conn!(self, |conn| {
            Ok(recipients::table
                .filter(recipients::batch_id.eq(batch_id))
                .filter(recipients::id.gt(after))
                .order(recipients::id)
                .limit(limit)
                .select(Recipient::as_select())
                .load(conn)
                .await?)
        })
    }

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
            Ok(diesel::update(batches::table.find(batch_id))
                .set(batches::preparation_run.eq(batches::preparation_run + 1))
                .returning(batches::preparation_run)
                .get_result(conn)
                .await?)
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
        if let Some(pool) = &self.copy {
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

    /// Adds numbers to the opt-out list (E.164); returns how many were new.
    pub async fn add_opt_outs(&self, phones: &[String]) -> Result<usize, StoreError> {
        let at = now();
        with_tx!(self, |conn| {
            let mut added = 0;
            for phone in phones {
                added += diesel::insert_into(opt_outs::table)
                    .values((opt_outs::phone.eq(phone), opt_outs::created_at.eq(at)))
                    .on_conflict_do_nothing()
                    .execute(conn)
                    .await?;
            }
            Ok(added)
        })
    }

    /// The figures the end of a batch's step is checked against (`domain::counts`): its
    /// counters, its last recipient, the preparation checkpoint, its message rows counted by
    /// status, and the partitions' counters of the same.
    pub async fn batch_tally(&self, batch_id: i64) -> Result<BatchTally, StoreError> {
        with_conn!(self, |conn| {
            let batch: Batch = batches::table
                .find(batch_id)
                .select(Batch::as_select())
                .first(conn)
                .await?;
            let last_recipient_id: Option<i64> = recipients::table
                .filter(recipients::batch_id.eq(batch_id))
                .select(diesel::dsl::max(recipients::id))
                .first(conn)
                .await?;
            let checkpoint: i64 = checkpoints::table
                .filter(checkpoints::batch_id.eq(batch_id))
                .filter(checkpoints::step.eq("preparation"))
                .select(checkpoints::position)
                .first(conn)
                .await
                .optional()?
                .unwrap_or(0);
            let rows: Vec<(i16, i64)> = messages::table
                .filter(messages::batch_id.eq(batch_id))
                .group_by(messages::status)
                .select((messages::status, diesel::dsl::count_star()))
                .load(conn)
                .await?;
            let mut by_status = ByStatus::default();
            for (code, n) in rows {
                let status = MessageStatus::from_i16(code).ok_or_else(|| {
                    StoreError::Corrupt(format!("message status {code} of batch {batch_id}"))
                })?;
                *match status {
                    MessageStatus::Pending => &mut by_status.pending,
                    MessageStatus::Sending => &mut by_status.sending,
                    MessageStatus::Sent => &mut by_status.sent,
                    MessageStatus::Delivered => &mut by_status.delivered,
                    MessageStatus::Failed => &mut by_status.failed,
                    MessageStatus::Cancelled => &mut by_status.cancelled,
                } += n;
            }
            let parts: Vec<Partition> = partitions::table
                .filter(partitions::batch_id.eq(batch_id))
                .select(Partition::as_select())
                .load(conn)
                .await?;
            let sum = |f: fn(&Partition) -> i64| parts.iter().map(f).sum::<i64>();
            let partition_total = sum(|p| p.total);
            let counted = ByStatus {
                pending: 0,
                sending: 0,
                sent: sum(|p| p.sent),
                delivered: sum(|p| p.delivered),
                failed: sum(|p| p.failed),
                cancelled: sum(|p| p.cancelled),
            };
            Ok(BatchTally {
                counters: Prepared {
                    recipients: batch.recipients,
                    processed: batch.processed,
                    valid: batch.valid,
                    invalid: batch.invalid,
                    duplicates: batch.duplicates,
                    opted_out: batch.opted_out,
                },
                last_recipient_id,
                checkpoint,
                messages: by_status,
                partitions: ByStatus {
                    pending: partition_total - counted.done(),
                    ..counted
                },
                partition_total,
            })
        })
    }

    /// Partition counters of a batch.
    pub async fn partitions(&self, batch_id: i64) -> Result<Vec<Partition>, StoreError> {
        with_conn!(self, |conn| {
            Ok(partitions::table
                .filter(partitions::batch_id.eq(batch_id))
                .order(partitions::idx)
                .select(Partition::as_select())
                .load(conn)
                .await?)
        })
    }

    /// The lowest and highest message id of a batch's partition, if it has any messages: the
    /// range a full delivery round hands out in spans (two probes of the partition's index).
    pub async fn message_id_bounds(
        &self,
        batch_id: i64,
        partition: i32,
    ) -> Result<Option<(i64, i64)>, StoreError> {
        with_conn!(self, |conn| {
            let (low, high): (Option<i64>, Option<i64>) = messages::table
                .filter(messages::batch_id.eq(batch_id))
                .filter(messages::partition.eq(partition))
                .select((
                    diesel::dsl::min(messages::id),
                    diesel::dsl::max(messages::id),
                ))
                .first(conn)
                .await?;
            Ok(low.zip(high))
        })
    }

    /// The ids of the next due pending messages of a partition after `after`, at most `limit`:
    /// one delivery task's worth. With `retries_only`, only messages waiting for a retry.
    pub async fn next_task_ids(
        &self,
        batch_id: i64,
        partition: i32,
        after: i64,
        limit: i64,
        retries_only: bool,
    ) -> Result<Vec<i64>, StoreError> {
        let at = now();
        with_conn!(self, |conn| {
            let mut query = messages::table
                .filter(messages::batch_id.eq(batch_id))
                .filter(messages::status.eq(PENDING))
                .filter(messages::partition.eq(partition))
                .filter(messages::id.gt(after))
                .filter(
                    messages::next_attempt_at
                        .is_null()
                        .or(messages::next_attempt_at.le(at)),
                )
                .select(messages::id)
                .into_boxed();
            if retries_only {
                query = query.filter(messages::next_attempt_at.is_not_null());
            }
            Ok(query.order(messages::id).limit(limit).load(conn).await?)
        })
    }

    /// When the earliest pending retry of a batch falls due, if any message waits for one.
    pub async fn earliest_retry(&self, batch_id: i64) -> Result<Option<NaiveDateTime>, StoreError> {
        with_conn!(self, |conn| {
            Ok(messages::table
                .filter(messages::batch_id.eq(batch_id))
                .filter(messages::status.eq(PENDING))
                .filter(messages::next_attempt_at.is_not_null())
                .select(diesel::dsl::min(messages::next_attempt_at))
                .first::<Option<NaiveDateTime>>(conn)
                .await?)
        })
    }

    /// Claims up to `limit` due messages of a task's range, in id order, with one conditional
    /// update (`pending → sending`), so a task handed out twice sends nothing twice. The status
    /// is checked again on the row itself, so two claimers racing for a row cannot both win.
    pub async fn claim(
        &self,
        batch_id: i64,
        partition: i32,
        first_id: i64,
        last_id: i64,
        limit: i64,
        claimer: &str,
    ) -> Result<Vec<ClaimedMessage>, StoreError> {
        let at = now();
        // One statement, so one round trip and no explicit transaction: the sub-select picks the
        // slice, and the outer condition re-checks each row as it is locked.
        let mut claimed: Vec<ClaimedMessage> = match &self.pools {
            Pools::Pg(pool) => {
                let mut conn = pool.get().await?;
                let claim = claim_pg(["$1", "$2", "$3", "$4", "$5", "$6"], limit);
                let statement = diesel::sql_query(claim)
                    .bind::<sql_types::BigInt, _>(batch_id)
                    .bind::<sql_types::Integer, _>(partition)
                    .bind::<sql_types::Timestamp, _>(at)
                    .bind::<sql_types::BigInt, _>(first_id)
                    .bind::<sql_types::BigInt, _>(last_id)
                    .bind::<sql_types::Text, _>(claimer);
                Cached(statement).load(&mut conn).await?
            }
            Pools::Sqlite(pool) => {
                let mut conn = pool.get().await?;
                let conn: &mut super::SqliteConn = &mut conn;
                let slice = diesel::alias!(messages as slice);
                let due = slice
                    .filter(slice.field(messages::batch_id).eq(batch_id))
                    .filter(slice.field(messages::partition).eq(partition))
                    .filter(slice.field(messages::id).between(first_id, last_id))
                    .filter(slice.field(messages::status).eq(PENDING))
                    .filter(
                        slice
                            .field(messages::next_attempt_at)
                            .is_null()
                            .or(slice.field(messages::next_attempt_at).le(at)),
                    )
                    .order(slice.field(messages::id))
                    .limit(limit)
                    .select(slice.field(messages::id));
                let claim = diesel::update(
                    messages::table
                        .filter(messages::id.eq_any(due))
                        .filter(messages::status.eq(PENDING)),
                )
                .set((
                    messages::status.eq(SENDING),
                    messages::attempts.eq(messages::attempts + 1),
                    messages::claimed_by.eq(claimer),
                    messages::updated_at.eq(at),
                ))
                .returning((
                    messages::id,
                    messages::phone,
                    messages::body,
                    messages::attempts,
                ));
                Cached(claim).get_results(conn).await?
            }
        };
        claimed.sort_unstable_by_key(|m| m.id);
        Ok(claimed)
    }

    /// Records a slice that was sent whole and claims the task's next slice, in one statement
    /// on PostgreSQL: one commit, so one wait for the disk, per slice instead of two, and the
    /// claim is durable before any of its messages reaches a provider, as with `claim`. `None`
    /// where this does not apply (SQLite, or a slice with other outcomes): record, then claim.
    #[allow(clippy::too_many_arguments)]
    pub async fn record_sent_and_claim(
        &self,
        batch_id: i64,
        partition: i32,
        outcomes: &Outcomes,
        first_id: i64,
        last_id: i64,
        limit: i64,
        claimer: &str,
    ) -> Result<Option<Vec<ClaimedMessage>>, StoreError> {
        let Pools::Pg(pool) = &self.pools else {
            return Ok(None);
        };
        if outcomes.is_empty() || outcomes.len() != outcomes.sent.len() {
            return Ok(None);
        }
        let mut conn = pool.get().await?;
        let (ids, provider_ids): (Vec<i64>, Vec<Option<String>>) =
            outcomes.sent.iter().cloned().unzip();
        let statement = diesel::sql_query(record_sent_and_claim_pg(limit))
            .bind::<sql_types::Array<sql_types::BigInt>, _>(ids)
            .bind::<sql_types::Array<sql_types::Nullable<sql_types::Text>>, _>(provider_ids)
            .bind::<sql_types::BigInt, _>(batch_id)
            .bind::<sql_types::Integer, _>(partition)
            .bind::<sql_types::Timestamp, _>(now())
            .bind::<sql_types::BigInt, _>(first_id)
            .bind::<sql_types::BigInt, _>(last_id)
            .bind::<sql_types::Text, _>(claimer);
        let mut claimed: Vec<ClaimedMessage> = Cached(statement).load(&mut conn).await?;
        claimed.sort_unstable_by_key(|m| m.id);
        Ok(Some(claimed))
    }

    /// Records a task's outcomes and the partition's counters in one transaction. Only messages
    /// still `sending` change.
    pub async fn record_outcomes(
        &self,
        batch_id: i64,
        partition: i32,
        outcomes: &Outcomes,
    ) -> Result<(), StoreError> {
        if outcomes.is_empty() {
            return Ok(());
        }
        let at = now();
        if let (Pools::Pg(pool), true) = (&self.pools, outcomes.len() == outcomes.sent.len()) {
            // The common case — every message of the slice sent — in one statement.
            let mut conn = pool.get().await?;
            let (ids, provider_ids): (Vec<i64>, Vec<Option<String>>) =
                outcomes.sent.iter().cloned().unzip();
            let record = diesel::sql_query(RECORD_SENT_PG.as_str())
                .bind::<sql_types::Array<sql_types::BigInt>, _>(ids)
                .bind::<sql_types::Array<sql_types::Nullable<sql_types::Text>>, _>(provider_ids)
                .bind::<sql_types::BigInt, _>(batch_id)
                .bind::<sql_types::Integer, _>(partition)
                .bind::<sql_types::Timestamp, _>(at);
            Cached(record).execute(&mut conn).await?;
            return Ok(());
        }
        with_tx!(self, |conn| {
            let mut sent = 0i64;
            let mut failed = 0i64;
            let mut cancelled = 0i64;
            // Sent messages without a provider id share one statement; the rest carry their own.
            let (plain, with_id): (Vec<_>, Vec<_>) =
                outcomes.sent.iter().partition(|(_, pid)| pid.is_none());
            let plain: Vec<i64> = plain.iter().map(|(id, _)| *id).collect();
            for ids in plain.chunks(INSERT_CHUNK) {
                sent += diesel::update(
                    messages::table
                        .filter(messages::id.eq_any(ids))
                        .filter(messages::batch_id.eq(batch_id))
                        .filter(messages::partition.eq(partition))
                        .filter(messages::status.eq(SENDING)),
                )
                .set((
                    messages::status.eq(SENT),
                    messages::error.eq(None::<String>),
                    messages::updated_at.eq(at),
                ))
                .execute(conn)
                .await? as i64;
            }
            for (id, pid) in with_id {
                sent += diesel::update(
                    messages::table
                        .filter(messages::id.eq(*id))
                        .filter(messages::batch_id.eq(batch_id))
                        .filter(messages::partition.eq(partition))
                        .filter(messages::status.eq(SENDING)),
                )
                .set((
                    messages::status.eq(SENT),
                    messages::provider_message_id.eq(pid),
                    messages::error.eq(None::<String>),
                    messages::updated_at.eq(at),
                ))
                .execute(conn)
                .await? as i64;
            }
            let mut by_error: BTreeMap<&str, Vec<i64>> = BTreeMap::new();
            for (id, err) in &outcomes.failed {
                by_error.entry(err.as_str()).or_default().push(*id);
            }
            for (err, ids) in by_error {
                for ids in ids.chunks(INSERT_CHUNK) {
                    failed += diesel::update(
                        messages::table
                            .filter(messages::id.eq_any(ids))
                            .filter(messages::batch_id.eq(batch_id))
                            .filter(messages::partition.eq(partition))
                            .filter(messages::status.eq(SENDING)),
                    )
                    .set((
                        messages::status.eq(FAILED),
                        messages::error.eq(err),
                        messages::updated_at.eq(at),
                    ))
                    .execute(conn)
                    .await? as i64;
                }
            }
            let mut by_retry: BTreeMap<(NaiveDateTime, &str), Vec<i64>> = BTreeMap::new();
            for (id, due, err) in &outcomes.retry {
                by_retry.entry((*due, err.as_str())).or_default().push(*id);
            }
            for ((due, err), ids) in by_retry {
                for ids in ids.chunks(INSERT_CHUNK) {
                    diesel::update(
                        messages::table
                            .filter(messages::id.eq_any(ids))
                            .filter(messages::batch_id.eq(batch_id))
                            .filter(messages::partition.eq(partition))
                            .filter(messages::status.eq(SENDING)),
                    )
                    .set((
                        messages::status.eq(PENDING),
                        messages::next_attempt_at.eq(Some(due)),
                        messages::error.eq(err),
                        messages::updated_at.eq(at),
                    ))
                    .execute(conn)
                    .await?;
                }
            }
            for ids in outcomes.released.chunks(INSERT_CHUNK) {
                // Released messages did not reach the provider: the claim's attempt is undone.
                diesel::update(
                    messages::table
                        .filter(messages::id.eq_any(ids))
                        .filter(messages::batch_id.eq(batch_id))
                        .filter(messages::partition.eq(partition))
                        .filter(messages::status.eq(SENDING)),
                )
                .set((
                    messages::status.eq(PENDING),
                    messages::attempts.eq(messages::attempts - 1),
                    messages::updated_at.eq(at),
                ))
                .execute(conn)
                .await?;
            }
            for ids in outcomes.cancelled.chunks(INSERT_CHUNK) {
                cancelled += diesel::update(
                    messages::table
                        .filter(messages::id.eq_any(ids))
                        .filter(messages::batch_id.eq(batch_id))
                        .filter(messages::partition.eq(partition))
                        .filter(messages::status.eq(SENDING)),
                )
                .set((messages::status.eq(CANCELLED), messages::updated_at.eq(at)))
                .execute(conn)
                .await? as i64;
            }
            if sent + failed + cancelled > 0 {
                diesel::update(partitions::table.find((batch_id, partition)))
                    .set((
                        partitions::sent.eq(partitions::sent + sent),
                        partitions::failed.eq(partitions::failed + failed),
                        partitions::cancelled.eq(partitions::cancelled + cancelled),
                    ))
                    .execute(conn)
                    .await?;
            }
            Ok(())
        })
    }

    /// Marks every message of a batch still `pending` as `cancelled`; returns how many.
    pub async fn cancel_pending(
        &self,
        batch_id: i64,
        partition_count: i32,
    ) -> Result<i64, StoreError> {
        let mut total = 0;
        for partition in 0..partition_count {
            total += self
                .move_partition(batch_id, partition, PENDING, CANCELLED)
                .await?;
        }
        Ok(total)
    }

    /// Moves every message of one partition from one status to another, with its counters.
    async fn move_partition(
        &self,
        batch_id: i64,
        partition: i32,
        from: i16,
        to: i16,
    ) -> Result<i64, StoreError> {
        let at = now();
        with_tx!(self, |conn| {
            let target = messages::table
                .filter(messages::batch_id.eq(batch_id))
                .filter(messages::partition.eq(partition))
                .filter(messages::status.eq(from));
            let moved = diesel::update(target)
                .set((messages::status.eq(to), messages::updated_at.eq(at)))
                .execute(conn)
                .await? as i64;
            if moved > 0 {
                let row = partitions::table.find((batch_id, partition));
                match to {
                    FAILED => {
                        diesel::update(row)
                            .set(partitions::failed.eq(partitions::failed + moved))
                            .execute(conn)
                            .await?;
                    }
                    CANCELLED => {
                        diesel::update(row)
                            .set(partitions::cancelled.eq(partitions::cancelled + moved))
                            .execute(conn)
                            .await?;
                    }
                    _ => {}
                }
            }
            Ok(moved)
        })
    }

    /// A page of a batch's messages in id order, optionally of one status.
    pub async fn list_messages(
        &self,
        batch_id: i64,
        status: Option<MessageStatus>,
        after: i64,
        limit: i64,
    ) -> Result<Vec<MessageRow>, StoreError> {
        with_conn!(self, |conn| {
            let mut query = messages::table
                .filter(messages::batch_id.eq(batch_id))
                .filter(messages::id.gt(after))
                .select(MessageRow::as_select())
                .into_boxed();
            if let Some(status) = status {
                query = query.filter(messages::status.eq(status.as_i16()));
            }
            Ok(query.order(messages::id).limit(limit).load(conn).await?)
        })
    }
}
