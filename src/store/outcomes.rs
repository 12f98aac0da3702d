//! A task's outcomes recorded with their partition's counters.

use std::collections::{BTreeMap, HashSet};

use chrono::NaiveDateTime;
use diesel::prelude::*;
use diesel::sql_types;
use diesel_async::pooled_connection::deadpool::Pool;
use diesel_async::{AsyncPgConnection, RunQueryDsl};

use super::cached::Cached;
use super::messages::record_sent_cte;
use super::records::{INSERT_CHUNK, Outcomes, now};
use super::schema::{messages, partitions, receipt_keys};
use super::types::{CANCELLED, FAILED, PENDING, SENDING, SENT};
use super::{Backend, Pools, Store, StoreError, with_tx};
use crate::domain::state::BatchState;

/// The `error` of a message cancelled because its number opted out.
pub const OPTED_OUT_ERROR: &str = "opted_out";

/// Marks a slice's messages sent, stores their receipt keys and counts them in the partition's
/// counters, in one statement (parameters as in `record_sent_cte`, `$6`..`$7` the keys).
static RECORD_SENT_PG: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    record_sent_cte("$6", "$7", false)
        + "UPDATE partitions SET sent = sent + (SELECT count(*) FROM done), updated_at = $5 \
           WHERE batch_id = $3 AND idx = $4"
});

/// `RECORD_SENT_PG` for a slice across partitions (`DeliveryTask::across`): each partition's
/// counter moves by its own messages.
static RECORD_SENT_ACROSS_PG: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    record_sent_cte("$6", "$7", true)
        + "UPDATE partitions p SET sent = p.sent + d.n, updated_at = $5 \
           FROM (SELECT partition, count(*) AS n FROM done GROUP BY partition) AS d \
           WHERE p.batch_id = $3 AND p.idx = d.partition"
});

/// A batch's state, read in a recording transaction: under a share lock on PostgreSQL, so that
/// a transition's update of the row waits for the transaction's end (SQLite's write transaction
/// already excludes every other writer).
const STATE_FOR_SHARE_PG: &str = "SELECT state FROM batches WHERE id = $1 FOR SHARE";
const STATE_SQLITE: &str = "SELECT state FROM batches WHERE id = ?";

#[derive(QueryableByName)]
struct StateRow {
    #[diesel(sql_type = sql_types::Text)]
    state: BatchState,
}

/// The messages `ids` of a task's slice that are still `sending`: the only ones an outcome
/// changes.
macro_rules! still_sending {
    ($ids:expr, $batch_id:expr, $partition:expr) => {
        messages::table
            .filter(messages::id.eq_any($ids))
            .filter(messages::batch_id.eq($batch_id))
            .filter(messages::partition.eq($partition))
            .filter(messages::status.eq(SENDING))
    };
}

impl Store {
    /// `record_outcomes` for a slice of a task across partitions (`DeliveryTask::across`), from
    /// `partition` on: each message's outcome counts in its partition, `partition_of`. A slice
    /// sent whole takes one statement on PostgreSQL; otherwise each partition's outcomes are
    /// recorded in turn.
    pub async fn record_outcomes_across(
        &self,
        batch_id: i64,
        partition: i32,
        outcomes: &Outcomes,
        partition_of: impl Fn(i64) -> i32,
    ) -> Result<(), StoreError> {
        if outcomes.is_empty() {
            return Ok(());
        }
        if let (Pools::Pg(pool), true) = (&self.pools, outcomes.len() == outcomes.sent.len()) {
            return record_sent_pg(pool, &RECORD_SENT_ACROSS_PG, batch_id, partition, outcomes)
                .await;
        }
        for (partition, outcomes) in outcomes.by_partition(partition_of) {
            self.record_outcomes(batch_id, partition, &outcomes).await?;
        }
        Ok(())
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
            return record_sent_pg(pool, &RECORD_SENT_PG, batch_id, partition, outcomes).await;
        }
        let state_sql = match self.backend() {
            Backend::Postgres => STATE_FOR_SHARE_PG,
            Backend::Sqlite => STATE_SQLITE,
        };
        with_tx!(self, |conn| {
            let mut sent = 0i64;
            let mut failed = 0i64;
            let mut cancelled = 0i64;
            // Messages that go back to `pending` (a retry, a release) after their batch was
            // cancelled would stay there for good: the cancel's sweep of pending messages may
            // already have run. The batch's row, read first under a share lock, says which way they
            // go: a cancel's state change waits for this transaction, or this one sees it.
            let back_to_pending = !outcomes.retry.is_empty()
                || !outcomes.released.is_empty()
                || !outcomes.deferred.is_empty();
            let cancelled_batch = back_to_pending && {
                let row: StateRow = diesel::sql_query(state_sql)
                    .bind::<sql_types::BigInt, _>(batch_id)
                    .get_result(conn)
                    .await?;
                row.state == BatchState::Cancelled
            };
            // With the batch cancelled, its retries, releases and deferrals are cancelled
            // instead.
            let (retry, released, deferred): (&[_], &[i64], &[_]) = if cancelled_batch {
                (&[], &[], &[])
            } else {
                (&outcomes.retry, &outcomes.released, &outcomes.deferred)
            };
            let mut to_cancel = outcomes.cancelled.clone();
            if cancelled_batch {
                to_cancel.extend(outcomes.retry.iter().map(|(id, _, _)| *id));
                to_cancel.extend(outcomes.released.iter().copied());
                to_cancel.extend(outcomes.deferred.iter().map(|(id, _, _)| *id));
            }
            // Sent messages without a provider id or receipt keys share one statement; the rest
            // go one by one, to learn which of them this record moved.
            let has_keys: HashSet<i64> = outcomes.receipt_keys.iter().map(|(id, _)| *id).collect();
            let (plain, with_id): (Vec<_>, Vec<_>) = outcomes
                .sent
                .iter()
                .partition(|(id, pid)| pid.is_none() && !has_keys.contains(id));
            let plain: Vec<i64> = plain.iter().map(|(id, _)| *id).collect();
            for ids in plain.chunks(INSERT_CHUNK) {
                sent += diesel::update(still_sending!(ids, batch_id, partition))
                    .set((
                        messages::status.eq(SENT),
                        messages::error.eq(None::<String>),
                        messages::updated_at.eq(at),
                    ))
                    .execute(conn)
                    .await? as i64;
            }
            let mut keyed: Vec<i64> = Vec::new();
            for (id, pid) in with_id {
                let moved = diesel::update(still_sending!(
                    std::slice::from_ref(id),
                    batch_id,
                    partition
                ))
                .set((
                    messages::status.eq(SENT),
                    messages::provider_message_id.eq(pid),
                    messages::error.eq(None::<String>),
                    messages::updated_at.eq(at),
                ))
                .execute(conn)
                .await? as i64;
                if moved > 0 {
                    keyed.push(*id);
                }
                sent += moved;
            }
            // Receipt keys only for the messages this record moved to `sent`: one recorded
            // again (its answer was lost) may have been settled by its receipts meanwhile.
            let keyed: HashSet<i64> = keyed.into_iter().collect();
            for (id, key) in outcomes
                .receipt_keys
                .iter()
                .filter(|(id, _)| keyed.contains(id))
            {
                diesel::insert_into(receipt_keys::table)
                    .values((
                        receipt_keys::receipt_key.eq(key),
                        receipt_keys::message_id.eq(id),
                        receipt_keys::done.eq(false),
                    ))
                    .on_conflict(receipt_keys::receipt_key)
                    .do_update()
                    .set((
                        receipt_keys::message_id.eq(id),
                        receipt_keys::done.eq(false),
                    ))
                    .execute(conn)
                    .await?;
            }
            let mut by_error: BTreeMap<&str, Vec<i64>> = BTreeMap::new();
            for (id, err) in &outcomes.failed {
                by_error.entry(err.as_str()).or_default().push(*id);
            }
            for (err, ids) in by_error {
                for ids in ids.chunks(INSERT_CHUNK) {
                    failed += diesel::update(still_sending!(ids, batch_id, partition))
                        .set((
                            messages::status.eq(FAILED),
                            messages::error.eq(err),
                            messages::updated_at.eq(at),
                        ))
                        .execute(conn)
                        .await? as i64;
                }
            }
            // Retries keep the claim's attempt; deferrals (the provider took nothing) undo it.
            let mut waiting: BTreeMap<(NaiveDateTime, &str, i32), Vec<i64>> = BTreeMap::new();
            for (undone, list) in [(0, retry), (1, deferred)] {
                for (id, due, err) in list {
                    waiting
                        .entry((*due, err.as_str(), undone))
                        .or_default()
                        .push(*id);
                }
            }
            for ((due, err, undone), ids) in waiting {
                for ids in ids.chunks(INSERT_CHUNK) {
                    diesel::update(still_sending!(ids, batch_id, partition))
                        .set((
                            messages::status.eq(PENDING),
                            messages::next_attempt_at.eq(Some(due)),
                            messages::error.eq(err),
                            messages::attempts.eq(messages::attempts - undone),
                            messages::updated_at.eq(at),
                        ))
                        .execute(conn)
                        .await?;
                }
            }
            for ids in released.chunks(INSERT_CHUNK) {
                // Released messages did not reach the provider: the claim's attempt is undone.
                diesel::update(still_sending!(ids, batch_id, partition))
                    .set((
                        messages::status.eq(PENDING),
                        messages::attempts.eq(messages::attempts - 1),
                        messages::updated_at.eq(at),
                    ))
                    .execute(conn)
                    .await?;
            }
            for ids in to_cancel.chunks(INSERT_CHUNK) {
                cancelled += diesel::update(still_sending!(ids, batch_id, partition))
                    .set((messages::status.eq(CANCELLED), messages::updated_at.eq(at)))
                    .execute(conn)
                    .await? as i64;
            }
            for ids in outcomes.opted_out.chunks(INSERT_CHUNK) {
                cancelled += diesel::update(still_sending!(ids, batch_id, partition))
                    .set((
                        messages::status.eq(CANCELLED),
                        messages::error.eq(OPTED_OUT_ERROR),
                        messages::attempts.eq(messages::attempts - 1),
                        messages::updated_at.eq(at),
                    ))
                    .execute(conn)
                    .await? as i64;
            }
            // Every outcome touches the partition's row, retries and releases too: the
            // instance watch (`Store::changed_since`) sees the batch move by its `updated_at`.
            {
                diesel::update(partitions::table.find((batch_id, partition)))
                    .set((
                        partitions::sent.eq(partitions::sent + sent),
                        partitions::failed.eq(partitions::failed + failed),
                        partitions::cancelled.eq(partitions::cancelled + cancelled),
                        partitions::updated_at.eq(at),
                    ))
                    .execute(conn)
                    .await?;
            }
            Ok(())
        })
    }
}

/// A slice sent whole, by `RECORD_SENT_PG` or `RECORD_SENT_ACROSS_PG`.
async fn record_sent_pg(
    pool: &Pool<AsyncPgConnection>,
    statement: &str,
    batch_id: i64,
    partition: i32,
    outcomes: &Outcomes,
) -> Result<(), StoreError> {
    let mut conn = pool.get().await?;
    let (ids, provider_ids): (Vec<i64>, Vec<Option<String>>) =
        outcomes.sent.iter().cloned().unzip();
    let (key_ids, keys) = outcomes.receipt_key_columns();
    let record = diesel::sql_query(statement)
        .bind::<sql_types::Array<sql_types::BigInt>, _>(ids)
        .bind::<sql_types::Array<sql_types::Nullable<sql_types::Text>>, _>(provider_ids)
        .bind::<sql_types::BigInt, _>(batch_id)
        .bind::<sql_types::Integer, _>(partition)
        .bind::<sql_types::Timestamp, _>(now())
        .bind::<sql_types::Array<sql_types::Text>, _>(keys)
        .bind::<sql_types::Array<sql_types::BigInt>, _>(key_ids);
    Cached(record).execute(&mut conn).await?;
    Ok(())
}
