//! Several instances on one database: heartbeats, batch leases, and settling the claims of
//! instances that died.

use std::time::Duration;

use chrono::NaiveDateTime;
use diesel::prelude::*;
use diesel::upsert::excluded;
use diesel_async::RunQueryDsl;

use super::cached::Cached;
use super::models::Batch;
use super::records::{UNKNOWN_OUTCOME, now};
use super::schema::{batches, instances, leases, messages, partitions};
use super::types::{FAILED, PENDING, SENDING};
use super::{Store, StoreError, with_conn, with_tx};
use crate::domain::state::BatchState;

fn after(d: Duration) -> NaiveDateTime {
    now() + chrono::Duration::from_std(d).unwrap_or_else(|_| chrono::Duration::seconds(15))
}

/// The time `d` ago, by the clock the store writes its timestamps with.
pub fn before(d: Duration) -> NaiveDateTime {
    now() - chrono::Duration::from_std(d).unwrap_or_else(|_| chrono::Duration::seconds(15))
}

impl Store {
    /// Records that this instance is alive.
    pub async fn heartbeat(&self, instance: &str) -> Result<(), StoreError> {
        with_conn!(self, |conn| {
            // Read the clock once the connection is in hand: a wait for it must not age the
            // heartbeat (nor, below, shorten a lease).
            let at = now();
            diesel::insert_into(instances::table)
                .values((instances::id.eq(instance), instances::heartbeat_at.eq(at)))
                .on_conflict(instances::id)
                .do_update()
                .set(instances::heartbeat_at.eq(excluded(instances::heartbeat_at)))
                .execute(conn)
                .await?;
            Ok(())
        })
    }

    /// Removes this instance and its leases (graceful shutdown): its batches can be taken over at
    /// once instead of after the lease period.
    pub async fn forget_instance(&self, instance: &str) -> Result<(), StoreError> {
        with_tx!(self, |conn| {
            diesel::delete(leases::table.filter(leases::owner.eq(instance)))
                .execute(conn)
                .await?;
            diesel::delete(instances::table.filter(instances::id.eq(instance)))
                .execute(conn)
                .await?;
            Ok(())
        })
    }

    /// Takes (or keeps) the lease of a batch if it is free, expired or already ours.
    pub async fn acquire_lease(
        &self,
        batch_id: i64,
        instance: &str,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        with_conn!(self, |conn| {
            let (at, until) = (now(), after(lease));
            // None yet: the insert takes it. Expired or ours: the update takes it over. One
            // conditional statement, so two instances racing for it cannot both win.
            let upsert = diesel::insert_into(leases::table)
                .values((
                    leases::batch_id.eq(batch_id),
                    leases::owner.eq(instance),
                    leases::expires_at.eq(until),
                ))
                .on_conflict(leases::batch_id)
                .do_update()
                .set((leases::owner.eq(instance), leases::expires_at.eq(until)));
            // `DO UPDATE … WHERE`: diesel's `FilterDsl` on an upsert, not `QueryDsl::filter`.
            // Its text is fixed: prepared once per connection, not planned at every start.
            let taken = Cached(diesel::query_dsl::methods::FilterDsl::filter(
                upsert,
                leases::expires_at.lt(at).or(leases::owner.eq(instance)),
            ))
            .execute(conn)
            .await?;
            Ok(taken == 1)
        })
    }

    /// Extends every lease this instance holds; returns the batches it still holds.
    pub async fn renew_leases(
        &self,
        instance: &str,
        lease: Duration,
    ) -> Result<Vec<i64>, StoreError> {
        with_conn!(self, |conn| {
            let until = after(lease);
            Ok(
                diesel::update(leases::table.filter(leases::owner.eq(instance)))
                    .set(leases::expires_at.eq(until))
                    .returning(leases::batch_id)
                    .get_results(conn)
                    .await?,
            )
        })
    }

    /// Gives up the leases of these batches that this instance holds (their supervisors
    /// stopped), in one statement whatever their number: the registry gathers the stops that
    /// came while its last release ran.
    pub async fn release_leases(
        &self,
        batch_ids: &[i64],
        instance: &str,
    ) -> Result<(), StoreError> {
        with_conn!(self, |conn| {
            diesel::delete(
                leases::table
                    .filter(leases::owner.eq(instance))
                    .filter(leases::batch_id.eq_any(batch_ids)),
            )
            .execute(conn)
            .await?;
            Ok(())
        })
    }

    /// The live holder of a batch's lease, if any.
    pub async fn lease_owner(&self, batch_id: i64) -> Result<Option<String>, StoreError> {
        let at = now();
        with_conn!(self, |conn| {
            Ok(leases::table
                .filter(leases::batch_id.eq(batch_id))
                .filter(leases::expires_at.ge(at))
                .select(leases::owner)
                .first(conn)
                .await
                .optional()?)
        })
    }

    /// Batches that need a supervisor and whose lease is missing or expired: nobody supervises
    /// them. A scheduled batch needs one only once it is due within `horizon`: until then it
    /// holds nothing but its row.
    pub async fn unsupervised_batches(&self, horizon: Duration) -> Result<Vec<Batch>, StoreError> {
        let at = now();
        let due_by = after(horizon);
        let ids: Vec<i64> = with_conn!(self, |conn| {
            batches::table
                .left_join(leases::table)
                .filter(
                    batches::state
                        .eq_any(
                            [BatchState::Preparing, BatchState::Delivering].map(BatchState::as_str),
                        )
                        .or(batches::state.eq(BatchState::Scheduled.as_str()).and(
                            batches::schedule_at
                                .is_null()
                                .or(batches::schedule_at.le(due_by)),
                        )),
                )
                .filter(leases::expires_at.is_null().or(leases::expires_at.lt(at)))
                .order(batches::id)
                .select(batches::id)
                .load(conn)
                .await
        })?;
        self.readable_batches(ids).await
    }

    /// Instances whose heartbeat is younger than `lease`.
    pub async fn live_instances(&self, lease: Duration) -> Result<Vec<String>, StoreError> {
        let since = before(lease);
        with_conn!(self, |conn| {
            Ok(instances::table
                .filter(instances::heartbeat_at.ge(since))
                .select(instances::id)
                .load(conn)
                .await?)
        })
    }

    /// Settles the messages of a batch left `sending` by instances that are no longer alive:
    /// `failed` with `unknown_outcome` (at most once) or back to `pending` (at least once).
    /// Claims of live instances are left to them, except, with `stranded = Some((own, before))`,
    /// the claims of the live instance `own` last touched before `before`: claims that instance
    /// knows none of its workers holds. Returns how many were settled.
    pub async fn settle_orphaned_claims(
        &self,
        batch_id: i64,
        partition_count: i32,
        resend: bool,
        live: &[String],
        stranded: Option<(&str, NaiveDateTime)>,
    ) -> Result<i64, StoreError> {
        // No instance id is empty: without `stranded` the third condition matches nothing.
        let (own, before) = stranded.unwrap_or(("", now()));
        let mut total = 0;
        for partition in 0..partition_count {
            let at = now();
            total += with_tx!(self, |conn| {
                let orphans = messages::table
                    .filter(messages::batch_id.eq(batch_id))
                    .filter(messages::partition.eq(partition))
                    .filter(messages::status.eq(SENDING))
                    .filter(
                        messages::claimed_by
                            .is_null()
                            .or(messages::claimed_by.ne_all(live))
                            .or(messages::claimed_by
                                .eq(own)
                                .and(messages::updated_at.lt(before))),
                    );
                let moved = if resend {
                    diesel::update(orphans)
                        .set((
                            messages::status.eq(PENDING),
                            messages::claimed_by.eq(None::<String>),
                            messages::updated_at.eq(at),
                        ))
                        .execute(conn)
                        .await? as i64
                } else {
                    diesel::update(orphans)
                        .set((
                            messages::status.eq(FAILED),
                            messages::error.eq(UNKNOWN_OUTCOME),
                            messages::updated_at.eq(at),
                        ))
                        .execute(conn)
                        .await? as i64
                };
                if moved > 0 && !resend {
                    diesel::update(partitions::table.find((batch_id, partition)))
                        .set((
                            partitions::failed.eq(partitions::failed + moved),
                            partitions::unknown.eq(partitions::unknown + moved),
                            partitions::updated_at.eq(at),
                        ))
                        .execute(conn)
                        .await?;
                }
                Ok(moved)
            })?;
        }
        Ok(total)
    }

    /// Settles the messages of a batch that dead instances left `sending`.
    ///
    /// `instance` (the caller's) always counts as live, whatever its heartbeat row says: instance ids
    /// are new in every process, so the claims under this one belong to this process's workers, which
    /// record or release them. A heartbeat row can read stale while the process is alive (its upkeep
    /// waited on a busy database longer than the lease), and settling then would fail calls that are
    /// still in flight and lose their outcomes.
    ///
    /// With `stranded_before`, the caller knows that none of its workers carries out a task of the
    /// batch: its own claims last touched before that time are stranded (a claim whose answer was
    /// lost) and are settled too. A task started after the caller looked claims with a later time.
    pub async fn settle_orphans(
        &self,
        batch: &Batch,
        instance: &str,
        lease: Duration,
        resend: bool,
        stranded_before: Option<chrono::NaiveDateTime>,
    ) -> Result<(), StoreError> {
        let mut live = self.live_instances(lease).await?;
        if !live.iter().any(|i| i == instance) {
            live.push(instance.to_owned());
        }
        let stranded = stranded_before.map(|before| (instance, before));
        let settled = self
            .settle_orphaned_claims(batch.id, batch.partition_count, resend, &live, stranded)
            .await?;
        if settled > 0 {
            tracing::warn!(batch_id = %batch.public_id, messages = settled, resend, "Settled messages left sending by an instance that died, or stranded by a lost claim.");
        }
        Ok(())
    }
}
