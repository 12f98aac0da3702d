//! What an instance watches, once for all its batches: the batches whose row or whose
//! partitions' counters changed since its last look, and the versions of the batches it leases.

use std::collections::{BTreeMap, BTreeSet};

use chrono::NaiveDateTime;
use diesel::dsl::sql;
use diesel::prelude::*;
use diesel::sql_types::BigInt;
use diesel_async::RunQueryDsl;

use super::schema::{batches, leases, partitions};
use super::{Store, StoreError, with_conn};

/// What changed since a look: per batch, its version if its row changed (actions,
/// transitions), and whether its counters moved (outcomes recorded by any instance).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Changes {
    /// Batches whose row changed, with their version now.
    pub versions: BTreeMap<i64, i64>,
    /// Batches whose partitions' counters changed.
    pub progressed: BTreeSet<i64>,
}

/// The `version` column of a progress row in the union below (no batch has a negative
/// version).
const PROGRESS: i64 = -1;

impl Store {
    /// The batches whose row or partitions changed at or after `since`, in one statement over
    /// the `updated_at` indexes: its cost follows the changes, not the number of batches.
    pub async fn changed_since(&self, since: NaiveDateTime) -> Result<Changes, StoreError> {
        let rows: Vec<(i64, i64)> = with_conn!(self, |conn| {
            batches::table
                .filter(batches::updated_at.ge(since))
                .select((batches::id, batches::version))
                .union_all(
                    partitions::table
                        .filter(partitions::updated_at.ge(since))
                        .select((partitions::batch_id, sql::<BigInt>(&PROGRESS.to_string()))),
                )
                .load(conn)
                .await
        })?;
        let mut changes = Changes::default();
        for (id, version) in rows {
            if version == PROGRESS {
                changes.progressed.insert(id);
            } else {
                changes.versions.insert(id, version);
            }
        }
        Ok(changes)
    }

    /// The version of every batch whose lease `instance` holds (the watch's check against a
    /// change it missed, say to a clock that runs behind another instance's).
    pub async fn leased_versions(&self, instance: &str) -> Result<BTreeMap<i64, i64>, StoreError> {
        let rows: Vec<(i64, i64)> = with_conn!(self, |conn| {
            leases::table
                .inner_join(batches::table)
                .filter(leases::owner.eq(instance))
                .select((batches::id, batches::version))
                .load(conn)
                .await
        })?;
        Ok(rows.into_iter().collect())
    }
}
