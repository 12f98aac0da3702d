//! Batches: creating, reading, listing and saving a batch's lifecycle, and the tally that
//! checks its counters.

use std::collections::BTreeMap;

use diesel::prelude::*;
use diesel_async::RunQueryDsl;

use super::bulk::BulkInsert;
use super::cached::Cached;
use super::models::*;
use super::records::{BatchRecord, INSERT_CHUNK};
use super::schema::{batches, partitions};
use super::{Store, StoreError, with_conn, with_tx};
use crate::domain::batch::MessageStatus;
use crate::domain::counts::{BatchTally, ByStatus, Prepared};
use crate::domain::lifecycle::Bookkeeping;
use crate::domain::state::BatchState;

/// `batch_tally`'s rows: message statuses by their codes, then, under keys no status has, the
/// partitions' counters, the last recipient (`-1`: none), the preparation checkpoint and the
/// batch's own counters.
const COUNTED_TOTAL: i32 = 100;
const COUNTED_SENT: i32 = 101;
const COUNTED_DELIVERED: i32 = 102;
const COUNTED_FAILED: i32 = 103;
const COUNTED_CANCELLED: i32 = 104;
const LAST_RECIPIENT: i32 = 105;
const CHECKPOINT: i32 = 106;
const RECIPIENTS: i32 = 110;
const PROCESSED: i32 = 111;
const VALID: i32 = 112;
const INVALID: i32 = 113;
const DUPLICATES: i32 = 114;
const OPTED_OUT: i32 = 115;
/// The whole tally in one statement, so from one snapshot (receipts move messages and counters,
/// sent → delivered, failed, while it runs) and in one round trip. The same parameter, `$1`, is
/// the batch throughout (SQLite reads `$1` as one named parameter too). The last recipient is
/// found with the batch bounded by a range and in the ordering, so that PostgreSQL walks
/// `recipients_batch`, not the primary key over newer batches (`messages::bounds_sql`).
const TALLY_SQL: &str = "\
    SELECT CAST(status AS INTEGER) AS k, count(*) AS n FROM messages WHERE batch_id = $1 \
    GROUP BY status \
    UNION ALL SELECT 100, CAST(COALESCE(sum(total), 0) AS BIGINT) FROM partitions WHERE batch_id = $1 \
    UNION ALL SELECT 101, CAST(COALESCE(sum(sent), 0) AS BIGINT) FROM partitions WHERE batch_id = $1 \
    UNION ALL SELECT 102, CAST(COALESCE(sum(delivered), 0) AS BIGINT) FROM partitions \
    WHERE batch_id = $1 \
    UNION ALL SELECT 103, CAST(COALESCE(sum(failed), 0) AS BIGINT) FROM partitions \
    WHERE batch_id = $1 \
    UNION ALL SELECT 104, CAST(COALESCE(sum(cancelled), 0) AS BIGINT) FROM partitions \
    WHERE batch_id = $1 \
    UNION ALL SELECT 105, COALESCE((SELECT id FROM recipients \
    WHERE batch_id >= $1 AND batch_id <= $1 ORDER BY batch_id DESC, id DESC LIMIT 1), -1) \
    UNION ALL SELECT 106, COALESCE((SELECT position FROM checkpoints \
    WHERE batch_id = $1 AND step = 'preparation'), 0) \
    UNION ALL SELECT 110, recipients FROM batches WHERE id = $1 \
    UNION ALL SELECT 111, processed FROM batches WHERE id = $1 \
    UNION ALL SELECT 112, valid FROM batches WHERE id = $1 \
    UNION ALL SELECT 113, invalid FROM batches WHERE id = $1 \
    UNION ALL SELECT 114, duplicates FROM batches WHERE id = $1 \
    UNION ALL SELECT 115, opted_out FROM batches WHERE id = $1";

#[derive(QueryableByName)]
struct TallyRow {
    #[diesel(sql_type = diesel::sql_types::Integer)]
    k: i32,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
}

impl Store {
    /// Creates a batch in state `initial` with its partitions and inline recipients, atomically.
    pub async fn create_batch(
        &self,
        new: NewBatch,
        inline: Vec<(String, Option<String>)>,
    ) -> Result<BatchRecord, StoreError> {
        let batch = match &self.pools {
            super::Pools::Pg(pool) => {
                let mut conn = pool.get().await?;
                create_batch_pg(&mut conn, new, inline).await?
            }
            super::Pools::Sqlite(_) => with_tx!(self, |conn| {
                let count = inline.len() as i64;
                let batch: Batch = diesel::insert_into(batches::table)
                    .values((&new, batches::recipients.eq(count)))
                    .returning(Batch::as_returning())
                    .get_result(conn)
                    .await?;
                conn.insert_partitions(batch.id, batch.partition_count)
                    .await?;
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
                Ok::<_, StoreError>(batch)
            })?,
        };
        // New: every counter is zero.
        let partitions = Partition::zeroed(batch.id, batch.partition_count);
        Ok(BatchRecord { batch, partitions })
    }

    /// A batch by its public id, with its partitions.
    pub async fn find_batch(&self, public_id: &str) -> Result<Option<BatchRecord>, StoreError> {
        let Some(batch) = self.batch_by_public_id(public_id).await? else {
            return Ok(None);
        };
        let partitions = self.partitions(batch.id).await?;
        Ok(Some(BatchRecord { batch, partitions }))
    }

    /// A batch row by its public id, without its partitions.
    pub async fn batch_by_public_id(&self, public_id: &str) -> Result<Option<Batch>, StoreError> {
        with_conn!(self, |conn| {
            Ok(batches::table
                .filter(batches::public_id.eq(public_id))
                .select(Batch::as_select())
                .first(conn)
                .await
                .optional()?)
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
        for chunk in ids.chunks(INSERT_CHUNK) {
            let loaded: Result<Vec<Batch>, StoreError> = with_conn!(self, |conn| {
                Ok(batches::table
                    .filter(batches::id.eq_any(chunk))
                    .order(batches::id)
                    .select(Batch::as_select())
                    .load(conn)
                    .await?)
            });
            match loaded {
                Ok(rows) => batches.extend(rows),
                // One row of the chunk does not read back: read them one by one to leave out
                // only that one.
                Err(StoreError::Corrupt(_)) => {
                    for &id in chunk {
                        match self.batch(id).await {
                            Ok(batch) => batches.push(batch),
                            Err(StoreError::Corrupt(e)) => {
                                tracing::error!(batch = id, error = %e, "Batch row does not read back; left alone.");
                            }
                            Err(e) => return Err(e),
                        }
                    }
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
            // Three or four per batch (every transition): prepared once per connection, by
            // its text (which fields the update sets).
            let save = diesel::update(
                batches::table
                    .filter(batches::id.eq(id))
                    .filter(batches::version.eq(version)),
            )
            .set((update, batches::version.eq(version + 1)))
            .returning(Batch::as_returning());
            Cached(save)
                .get_result(conn)
                .await
                .optional()?
                .ok_or_else(|| StoreError::Conflict(id.to_string()))
        })
    }

    /// Saves the transition that `plan` makes of the batch as stored, under the optimistic
    /// version check: after a concurrent change the row is read again and planned anew, five
    /// times at most, then `StoreError::Conflict`. What the supervisor and the registry save.
    ///
    /// `row` may be behind the stored one (a supervisor's copy, before its instance's watch saw
    /// an action saved through another instance): a transition its state refuses is planned
    /// again on the stored row before the refusal stands, so that an operator's resume of a
    /// batch just paused elsewhere is not refused for a state the batch has left.
    pub async fn save_transition<E: From<StoreError>>(
        &self,
        mut row: Batch,
        plan: impl Fn(&Batch) -> Result<Bookkeeping, E>,
    ) -> Result<Batch, E> {
        let mut stored = false;
        for _ in 0..5 {
            let next = match plan(&row) {
                Ok(next) => next,
                Err(refused) if stored => return Err(refused),
                Err(refused) => {
                    let latest = self.batch(row.id).await?;
                    if latest.version == row.version {
                        return Err(refused);
                    }
                    row = latest;
                    plan(&row)?
                }
            };
            match self
                .save_lifecycle(row.id, row.version, &LifecycleUpdate::from(&next))
                .await
            {
                Ok(saved) => return Ok(saved),
                Err(StoreError::Conflict(_)) => {
                    row = self.batch(row.id).await?;
                    stored = true;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(StoreError::Conflict(row.public_id).into())
    }

    /// The figures the end of a batch's step is checked against (`domain::counts`): its
    /// counters, its last recipient, the preparation checkpoint, its message rows counted by
    /// status, and the partitions' counters of the same.
    pub async fn batch_tally(&self, batch_id: i64) -> Result<BatchTally, StoreError> {
        with_conn!(self, |conn| {
            let rows: Vec<TallyRow> =
                Cached(diesel::sql_query(TALLY_SQL).bind::<diesel::sql_types::BigInt, _>(batch_id))
                    .load(conn)
                    .await?;
            let mut by_status = ByStatus::default();
            let mut counted = ByStatus::default();
            let mut partition_total = 0;
            let mut last_recipient = 0;
            let mut checkpoint = 0;
            let mut counters = Prepared::default();
            let mut found = false;
            for TallyRow { k, n } in rows {
                let slot = match k {
                    COUNTED_TOTAL => &mut partition_total,
                    LAST_RECIPIENT => &mut last_recipient,
                    CHECKPOINT => &mut checkpoint,
                    RECIPIENTS => {
                        found = true;
                        &mut counters.recipients
                    }
                    PROCESSED => &mut counters.processed,
                    VALID => &mut counters.valid,
                    INVALID => &mut counters.invalid,
                    DUPLICATES => &mut counters.duplicates,
                    OPTED_OUT => &mut counters.opted_out,
                    COUNTED_SENT => &mut counted.sent,
                    COUNTED_DELIVERED => &mut counted.delivered,
                    COUNTED_FAILED => &mut counted.failed,
                    COUNTED_CANCELLED => &mut counted.cancelled,
                    code => {
                        let status = i16::try_from(code)
                            .ok()
                            .and_then(MessageStatus::from_i16)
                            .ok_or_else(|| {
                                StoreError::Corrupt(format!(
                                    "message status {code} of batch {batch_id}"
                                ))
                            })?;
                        match status {
                            MessageStatus::Pending => &mut by_status.pending,
                            MessageStatus::Sending => &mut by_status.sending,
                            MessageStatus::Sent => &mut by_status.sent,
                            MessageStatus::Delivered => &mut by_status.delivered,
                            MessageStatus::Failed => &mut by_status.failed,
                            MessageStatus::Cancelled => &mut by_status.cancelled,
                        }
                    }
                };
                *slot += n;
            }
            if !found {
                return Err(diesel::result::Error::NotFound.into());
            }
            Ok(BatchTally {
                counters,
                last_recipient_id: (last_recipient >= 0).then_some(last_recipient),
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
}

/// A new batch, its partitions and its inline recipients in one statement on PostgreSQL: one
/// round trip instead of five (`BEGIN`, three inserts, `COMMIT`), and atomic as any statement.
/// The recipients get their ids in the order given.
const CREATE_BATCH_PG: &str = "\
    WITH b AS ( \
        INSERT INTO batches (public_id, name, campaign_id, content, url, provider, message_type, \
            schedule_at, partition_count, state, created_at, updated_at, failure_threshold, \
            parent_id, recipients) \
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15) RETURNING *), \
    p AS ( \
        INSERT INTO partitions (batch_id, idx) \
        SELECT b.id, g FROM b, generate_series(0, b.partition_count - 1) AS g), \
    r AS ( \
        INSERT INTO recipients (batch_id, phone, vars) \
        SELECT b.id, v.phone, v.vars \
        FROM b, unnest($16::text[], $17::text[]) WITH ORDINALITY AS v(phone, vars, n) \
        ORDER BY v.n) \
    SELECT * FROM b";

async fn create_batch_pg(
    conn: &mut diesel_async::AsyncPgConnection,
    new: NewBatch,
    inline: Vec<(String, Option<String>)>,
) -> Result<Batch, StoreError> {
    use diesel::sql_types::{Array, BigInt, Double, Integer, Nullable, Text, Timestamp};
    let count = inline.len() as i64;
    let (phones, vars): (Vec<String>, Vec<Option<String>>) = inline.into_iter().unzip();
    let create = diesel::sql_query(CREATE_BATCH_PG)
        .bind::<Text, _>(new.public_id)
        .bind::<Text, _>(new.name)
        .bind::<Nullable<Text>, _>(new.campaign_id)
        .bind::<Text, _>(new.content)
        .bind::<Nullable<Text>, _>(new.url)
        .bind::<Text, _>(new.provider)
        .bind::<Text, _>(new.message_type)
        .bind::<Nullable<Timestamp>, _>(new.schedule_at)
        .bind::<Integer, _>(new.partition_count)
        .bind::<Text, _>(new.state)
        .bind::<Timestamp, _>(new.created_at)
        .bind::<Timestamp, _>(new.updated_at)
        .bind::<Double, _>(new.failure_threshold)
        .bind::<Nullable<Text>, _>(new.parent_id)
        .bind::<BigInt, _>(count)
        .bind::<Array<Text>, _>(phones)
        .bind::<Array<Nullable<Text>>, _>(vars);
    Ok(Cached(create).get_result(conn).await?)
}
