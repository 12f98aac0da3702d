//! What an instance watches, once for all its batches: the batches whose row or whose
//! partitions' counters changed since its last look, and the versions of the batches it leases.

use std::collections::{BTreeMap, BTreeSet};

use chrono::NaiveDateTime;
use diesel::dsl::sql;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Integer};
use diesel_async::RunQueryDsl;

use super::schema::{batches, leases, partitions};
use super::{Store, StoreError, with_conn};

/// What changed since a look: per batch, its version if its row changed (actions,
/// transitions), and the partition rows whose counters moved (outcomes recorded by any
/// instance).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Changes {
    /// Batches whose row changed, with their version now.
    pub versions: BTreeMap<i64, i64>,
    /// Each partition row that changed, by batch and index, with its stamp: what tells the
    /// rows of a later look, which overlaps this one, from those this one saw already.
    pub counters: BTreeSet<(i64, i32, NaiveDateTime)>,
}

impl Changes {
    /// Batches whose partitions' counters changed.
    pub fn progressed(&self) -> BTreeSet<i64> {
        self.counters.iter().map(|(id, _, _)| *id).collect()
    }

    /// What this look found that `previous` (the look before, which this one overlaps by its
    /// margin) had not: a version it did not list, a partition row with a stamp it did not see.
    ///
    /// Each look reaches a second back over the last, so a batch that moved once was listed
    /// again by the next four or five looks, and each time its Delivery step woke and read its
    /// counters for nothing. A row's stamp changes with every update that commits, so a stamp
    /// seen before is a change seen before. (Two updates of one row stamped the same microsecond
    /// would look like one: the second's nudge is then missed, and the step still looks at the
    /// end of its quiet spell; the workers of this process nudge their batch themselves.)
    pub fn news(&self, previous: &Changes) -> Changes {
        Changes {
            versions: self
                .versions
                .iter()
                .filter(|(id, v)| previous.versions.get(id) != Some(v))
                .map(|(id, v)| (*id, *v))
                .collect(),
            counters: self
                .counters
                .difference(&previous.counters)
                .copied()
                .collect(),
        }
    }
}

/// The `version` column of a progress row in the union below (no batch has a negative
/// version), and the `idx` column of a batch's row (no partition has a negative index).
const PROGRESS: i64 = -1;
const ROW: i32 = -1;

impl Store {
    /// The batches whose row or partitions changed at or after `since`, in one statement over
    /// the `updated_at` indexes: its cost follows the changes, not the number of batches.
    pub async fn changed_since(&self, since: NaiveDateTime) -> Result<Changes, StoreError> {
        let rows: Vec<(i64, i64, i32, NaiveDateTime)> = with_conn!(self, |conn| {
            batches::table
                .filter(batches::updated_at.ge(since))
                .select((
                    batches::id,
                    batches::version,
                    sql::<Integer>(&ROW.to_string()),
                    batches::updated_at,
                ))
                .union_all(
                    partitions::table
                        .filter(partitions::updated_at.ge(since))
                        .select((
                            partitions::batch_id,
                            sql::<BigInt>(&PROGRESS.to_string()),
                            partitions::idx,
                            partitions::updated_at,
                        )),
                )
                .load(conn)
                .await
        })?;
        let mut changes = Changes::default();
        for (id, version, idx, stamp) in rows {
            if version == PROGRESS {
                changes.counters.insert((id, idx, stamp));
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

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: i64) -> NaiveDateTime {
        chrono::DateTime::from_timestamp_millis(1_800_000_000_000 + ms)
            .map(|t| t.naive_utc())
            .unwrap_or_default()
    }

    fn look(versions: &[(i64, i64)], counters: &[(i64, i32, i64)]) -> Changes {
        Changes {
            versions: versions.iter().copied().collect(),
            counters: counters.iter().map(|&(b, p, ms)| (b, p, at(ms))).collect(),
        }
    }

    #[test]
    fn a_look_tells_only_what_the_look_before_did_not_see() {
        let first = look(&[(1, 3), (2, 7)], &[(1, 0, 10), (1, 1, 12), (5, 0, 11)]);
        assert_eq!(
            first.news(&Changes::default()),
            first,
            "the first look is all news"
        );
        // Batch 1 moved again in partition 1, batch 2's row changed, batch 5 did not move.
        let second = look(&[(1, 3), (2, 8)], &[(1, 0, 10), (1, 1, 40), (5, 0, 11)]);
        let news = second.news(&first);
        assert_eq!(news.versions, [(2, 8)].into_iter().collect());
        assert_eq!(news.progressed(), [1].into_iter().collect());
        assert_eq!(news.counters, [(1, 1, at(40))].into_iter().collect());
        // An update that commits with an earlier stamp than the one seen is still news.
        let third = look(&[], &[(1, 1, 39)]);
        assert_eq!(third.news(&second).progressed(), [1].into_iter().collect());
        assert_eq!(look(&[], &[]).news(&third), Changes::default());
    }
}
