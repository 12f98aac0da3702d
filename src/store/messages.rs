//! Messages: partitions and task ranges, claims (with the sent slice recorded before the next
//! claim), cancelling and listing. The general recording of outcomes is in `outcomes`.

use chrono::NaiveDateTime;
use diesel::prelude::*;
use diesel::sql_types;
use diesel_async::RunQueryDsl;

use super::cached::Cached;
use super::models::*;
use super::records::{Outcomes, now};
use super::schema::{messages, partitions};
use super::types::{CANCELLED, FAILED, PENDING, SENDING, SENT};
use super::{Backend, Pools, Store, StoreError, with_conn, with_tx};
use crate::domain::batch::MessageStatus;

/// The messages of a slice marked sent (with their provider ids): `$1` ids, `$2` provider ids,
/// `$3` batch, `$4` partition (with `across`, the first of the partitions from there on), `$5`
/// now. Only messages still `sending` become `sent`; `done` has a row (id, partition) for each.
pub(super) fn record_sent_cte(keys: &str, key_ids: &str, across: bool) -> String {
    let op = if across { ">=" } else { "=" };
    format!(
        "WITH done AS ( \
            UPDATE messages m SET status = {SENT}, provider_message_id = v.pid, error = NULL, \
                   updated_at = $5 \
            FROM unnest($1::bigint[], $2::text[]) AS v(id, pid) \
            WHERE m.id = v.id AND m.batch_id = $3 AND m.partition {op} $4 \
              AND m.status = {SENDING} \
            RETURNING m.id, m.partition), \
         keyed AS ( \
            INSERT INTO receipt_keys (receipt_key, message_id, done) \
            SELECT k.key, k.id, FALSE FROM unnest({keys}::text[], {key_ids}::bigint[]) AS k(key, id) \
            WHERE k.id IN (SELECT id FROM done) \
            ON CONFLICT (receipt_key) DO UPDATE SET message_id = excluded.message_id, done = FALSE) "
    )
}

/// The due pending messages of a batch's partition after an id, as `next_task_ids` and
/// `next_retries` page them.
macro_rules! due_in_partition {
    ($batch_id:expr, $partition:expr, $after:expr, $at:expr) => {
        messages::table
            .filter(messages::batch_id.eq($batch_id))
            .filter(messages::status.eq(PENDING))
            // A range, not an equality, for the reason given at `bounds_sql`.
            .filter(messages::partition.ge($partition))
            .filter(messages::partition.le($partition))
            .filter(messages::id.gt($after))
            .filter(
                messages::next_attempt_at
                    .is_null()
                    .or(messages::next_attempt_at.le($at)),
            )
    };
}

/// The claim of up to `limit` due messages of a task's range on PostgreSQL (`Store::claim`),
/// with the placeholders of the batch, the partition, the time, the range's first and last id
/// and the claimer.
///
/// The limit is written into the text, not bound. PostgreSQL keeps running custom plans of a
/// prepared statement (planned anew at every run) while its generic plan is estimated costlier,
/// and with a bound limit the generic plan assumes a tenth of the range's estimated rows: at a
/// million messages far more than a slice, so every claim was planned again (its cost is in
/// BENCHMARKS.md, "Figures behind the code's comments"). With the limit in the text the generic
/// plan is taken, as it already was for smaller batches. A worker's limit is its claim size, so each
/// connection prepares one or two such texts.
fn claim_pg(placeholders: [&str; 6], limit: i64) -> String {
    claim_sql(placeholders, limit, false)
}

/// The claim's statement on either database (PostgreSQL's `$n`, SQLite's `?n`). `across`: the
/// partitions from the given one on, for a task that carries a small batch's messages of every
/// partition (`DeliveryTask::across`); otherwise that partition only, the equality that keeps
/// the walk of `messages_partition` bounded by the task's ids.
fn claim_sql(placeholders: [&str; 6], limit: i64, across: bool) -> String {
    let [batch, partition, at, first, last, claimer] = placeholders;
    let op = if across { ">=" } else { "=" };
    format!(
        "UPDATE messages SET status = {SENDING}, attempts = attempts + 1, claimed_by = {claimer}, \
                updated_at = {at} \
         WHERE id IN ( \
            SELECT id FROM messages \
            WHERE batch_id = {batch} AND partition {op} {partition} AND id BETWEEN {first} AND {last} \
              AND status = {PENDING} AND (next_attempt_at IS NULL OR next_attempt_at <= {at}) \
            ORDER BY id LIMIT {limit}) \
           AND status = {PENDING} \
         RETURNING id, phone, body, attempts, partition, {OPTED_OUT} AS opted_out"
    )
}

/// Whether a claimed message's number is on the opt-out list, as the claim's `RETURNING`
/// computes it: one probe of the list's primary key per claimed row, so that a number that says
/// stop while its batch runs gets nothing not yet handed to a provider.
const OPTED_OUT: &str = "EXISTS (SELECT 1 FROM opt_outs WHERE opt_outs.phone = messages.phone)";

/// `outcomes::RECORD_SENT_PG`, then the claim of the task's next slice (`claim_pg`) in the same
/// statement: `$6`..`$7` the task's remaining range, `$8` the claimer, `$9`..`$10` the receipt
/// keys and their messages. The two updates touch
/// different rows (`sending` ones, then `pending` ones).
fn record_sent_and_claim_pg(limit: i64) -> String {
    record_sent_cte("$9", "$10", false)
        + ", counted AS ( \
            UPDATE partitions SET sent = sent + (SELECT count(*) FROM done), updated_at = $5 \
            WHERE batch_id = $3 AND idx = $4) "
        + &claim_pg(["$3", "$4", "$5", "$6", "$7", "$8"], limit)
}

/// `Store::message_id_bounds`'s statement, with `param` for the batch.
///
/// Each probe must walk the `messages_partition` index (batch, partition, id) from one end of the
/// partition's entries. Given `min(id)` of one batch and partition, or an `ORDER BY` whose leading
/// columns an equality fixes (PostgreSQL drops those from the ordering, leaving `id`), the planner
/// may walk the primary key from the lowest id of every batch instead, filtering for this one:
/// with a parameter for the batch it takes the average batch's size for this one's and expects a
/// match soon. That took 2.9 s per probe for a new small batch behind two batches of a million
/// (BENCHMARKS.md, "Ten thousand batches at once"). The partition is therefore bounded by a
/// range, not an equality, and stays in the ordering, which no other index gives without a sort.
fn bounds_sql(param: &str) -> String {
    let probe = |dir: &str| {
        format!(
            "(SELECT m.id FROM messages m WHERE m.batch_id = p.batch_id \
                 AND m.partition >= p.idx AND m.partition <= p.idx \
              ORDER BY m.partition {dir}, m.id {dir} LIMIT 1)"
        )
    };
    format!(
        "SELECT p.batch_id, p.idx, p.total, p.sent, p.delivered, p.failed, p.cancelled, \
             p.unknown, {} AS low, {} AS high \
         FROM partitions p WHERE p.batch_id = {param} ORDER BY p.idx",
        probe("ASC"),
        probe("DESC")
    )
}
static BOUNDS_PG: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| bounds_sql("$1"));
static BOUNDS_SQLITE: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| bounds_sql("?1"));

/// A row of `bounds_sql`: a partition's counters and its id range.
#[derive(QueryableByName)]
struct BoundsRow {
    #[diesel(embed)]
    partition: Partition,
    #[diesel(sql_type = sql_types::Nullable<sql_types::BigInt>)]
    low: Option<i64>,
    #[diesel(sql_type = sql_types::Nullable<sql_types::BigInt>)]
    high: Option<i64>,
}

impl Store {
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

    /// The lowest and highest message id of each of a batch's partitions (by index; `None` for
    /// a partition without messages): the ranges a full delivery round hands out in spans.
    pub async fn message_id_bounds(
        &self,
        batch_id: i64,
    ) -> Result<Vec<Option<(i64, i64)>>, StoreError> {
        Ok(self.partitions_and_bounds(batch_id).await?.1)
    }

    /// The batch's partition counters (`partitions`) and their id ranges (`message_id_bounds`)
    /// in one statement, for delivery's first look: two probes of the partitions' index per
    /// partition.
    pub async fn partitions_and_bounds(
        &self,
        batch_id: i64,
    ) -> Result<(Vec<Partition>, Vec<Option<(i64, i64)>>), StoreError> {
        let sql = match self.backend() {
            Backend::Postgres => &*BOUNDS_PG,
            Backend::Sqlite => &*BOUNDS_SQLITE,
        };
        with_conn!(self, |conn| {
            // Prepared once per connection: its probes name the batch through the partition
            // row, never through the parameter, so a generic plan is the plan a custom one would
            // be, and planning it at every batch's first look cost 0.25 ms of PostgreSQL's time
            // (BENCHMARKS.md, "A small batch in fewer round trips").
            let bounds = diesel::sql_query(sql).bind::<sql_types::BigInt, _>(batch_id);
            let rows: Vec<BoundsRow> = Cached(bounds).load(conn).await?;
            let mut bounds = vec![None; rows.len()];
            let mut counters = Vec::with_capacity(rows.len());
            for row in rows {
                if let Some(slot) = usize::try_from(row.partition.idx)
                    .ok()
                    .and_then(|i| bounds.get_mut(i))
                {
                    *slot = row.low.zip(row.high);
                }
                counters.push(row.partition);
            }
            Ok((counters, bounds))
        })
    }

    /// The ids of the next due pending messages of a partition after `after`, at most `limit`:
    /// one delivery task's worth.
    pub async fn next_task_ids(
        &self,
        batch_id: i64,
        partition: i32,
        after: i64,
        limit: i64,
    ) -> Result<Vec<i64>, StoreError> {
        let at = now();
        with_conn!(self, |conn| {
            Ok(due_in_partition!(batch_id, partition, after, at)
                .select(messages::id)
                .order((messages::partition.asc(), messages::id.asc()))
                .limit(limit)
                .load(conn)
                .await?)
        })
    }

    /// `next_task_ids` of the messages waiting for a retry only, with the time each was due: a
    /// message retried again is due at another time, and is known by it as a new retry.
    pub async fn next_retries(
        &self,
        batch_id: i64,
        partition: i32,
        after: i64,
        limit: i64,
    ) -> Result<Vec<(i64, NaiveDateTime)>, StoreError> {
        let at = now();
        with_conn!(self, |conn| {
            let rows: Vec<(i64, Option<NaiveDateTime>)> =
                due_in_partition!(batch_id, partition, after, at)
                    .filter(messages::next_attempt_at.is_not_null())
                    .select((messages::id, messages::next_attempt_at))
                    .order((messages::partition.asc(), messages::id.asc()))
                    .limit(limit)
                    .load(conn)
                    .await?;
            Ok(rows
                .into_iter()
                .filter_map(|(id, due)| Some((id, due?)))
                .collect())
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
        self.claim_in(
            batch_id, partition, false, first_id, last_id, limit, claimer,
        )
        .await
    }

    /// `claim` of the given partition, or with `across` of the partitions from it on (a task
    /// across partitions, `DeliveryTask::across`).
    #[allow(clippy::too_many_arguments)]
    pub async fn claim_in(
        &self,
        batch_id: i64,
        partition: i32,
        across: bool,
        first_id: i64,
        last_id: i64,
        limit: i64,
        claimer: &str,
    ) -> Result<Vec<ClaimedMessage>, StoreError> {
        let at = now();
        // One statement, so one round trip and no explicit transaction: the sub-select picks the
        // slice, and the outer condition re-checks each row as it is locked.
        let placeholders = match self.backend() {
            Backend::Postgres => ["$1", "$2", "$3", "$4", "$5", "$6"],
            Backend::Sqlite => ["?1", "?2", "?3", "?4", "?5", "?6"],
        };
        let statement = diesel::sql_query(claim_sql(placeholders, limit, across))
            .bind::<sql_types::BigInt, _>(batch_id)
            .bind::<sql_types::Integer, _>(partition)
            .bind::<sql_types::Timestamp, _>(at)
            .bind::<sql_types::BigInt, _>(first_id)
            .bind::<sql_types::BigInt, _>(last_id)
            .bind::<sql_types::Text, _>(claimer);
        let mut claimed: Vec<ClaimedMessage> =
            with_conn!(self, |conn| Cached(statement).load(conn).await?);
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
        let (key_ids, keys) = outcomes.receipt_key_columns();
        let statement = diesel::sql_query(record_sent_and_claim_pg(limit))
            .bind::<sql_types::Array<sql_types::BigInt>, _>(ids)
            .bind::<sql_types::Array<sql_types::Nullable<sql_types::Text>>, _>(provider_ids)
            .bind::<sql_types::BigInt, _>(batch_id)
            .bind::<sql_types::Integer, _>(partition)
            .bind::<sql_types::Timestamp, _>(now())
            .bind::<sql_types::BigInt, _>(first_id)
            .bind::<sql_types::BigInt, _>(last_id)
            .bind::<sql_types::Text, _>(claimer)
            .bind::<sql_types::Array<sql_types::Text>, _>(keys)
            .bind::<sql_types::Array<sql_types::BigInt>, _>(key_ids);
        let mut claimed: Vec<ClaimedMessage> = Cached(statement).load(&mut conn).await?;
        claimed.sort_unstable_by_key(|m| m.id);
        Ok(Some(claimed))
    }

    /// Marks every message of a batch still `pending` as `cancelled`; returns how many. Runs
    /// after the batch's state became `cancelled`: outcomes recorded later cancel their messages
    /// themselves (`record_outcomes`).
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
                            .set((
                                partitions::failed.eq(partitions::failed + moved),
                                partitions::updated_at.eq(at),
                            ))
                            .execute(conn)
                            .await?;
                    }
                    CANCELLED => {
                        diesel::update(row)
                            .set((
                                partitions::cancelled.eq(partitions::cancelled + moved),
                                partitions::updated_at.eq(at),
                            ))
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
