//! Delivery receipts applied to their messages: a lot of receipts in one transaction, matched
//! through `receipt_keys` (written with each part a provider took, and kept once the message
//! settles, so that a receipt sent again is known as a repeat), moving `sent` messages to
//! `delivered` or `failed` with their partitions' counters. A receipt that matches no key yet
//! (its message's id is not committed: the SMSC answered and reported within milliseconds) is
//! kept in `pending_receipts` and tried again with a doubling delay, a bounded number of times.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use chrono::NaiveDateTime;
use diesel::prelude::*;
use diesel_async::RunQueryDsl;

use super::records::{INSERT_CHUNK, now};
use super::schema::{messages, partitions, pending_receipts, receipt_keys};
use super::types::{DELIVERED, FAILED, SENT};
use super::{Store, StoreError, with_conn, with_tx};
use crate::domain::receipt::{Receipt, ReceiptOutcome};

/// A receipt that matches nothing is tried again this many times (after 1 s, 2 s, 4 s, …: about
/// an hour in all), then dropped.
pub const PENDING_RECEIPT_TRIES: i32 = 12;

/// What applying a lot of receipts did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReceiptsApplied {
    /// Messages now `delivered`.
    pub delivered: u64,
    /// Messages now `failed`.
    pub failed: u64,
    /// Receipts of parts whose message waits for its other parts' receipts.
    pub parts: u64,
    /// Receipts of messages already settled (an SMSC sending one again).
    pub repeated: u64,
    /// Receipts kept to be tried again.
    pub kept: u64,
    /// Receipts dropped after their last try.
    pub dropped: u64,
    /// Receipts of messages sent longer ago than their provider's `receipt_timeout`: the
    /// message stays `sent` for good.
    pub late: u64,
    /// Seconds from each settled message's submit to its receipt.
    pub latencies: Vec<f64>,
}

/// How long after its submit each provider's receipts still count (`receipt_timeout_ms`), by
/// provider name; a provider not named has no limit.
#[derive(Debug, Clone, Default)]
pub struct ReceiptTimeouts(pub BTreeMap<String, std::time::Duration>);

impl ReceiptTimeouts {
    /// True when the receipt `key` comes too late for a message sent at `sent_at`.
    fn expired(&self, key: &str, sent_at: NaiveDateTime, at: NaiveDateTime) -> bool {
        let provider = key.split_once('/').map_or(key, |(provider, _)| provider);
        self.0
            .get(provider)
            .is_some_and(|limit| (at - sent_at).to_std().is_ok_and(|since| since > *limit))
    }
}

/// Which receipts `Store::apply` applies.
enum Source {
    /// These, new.
    Lot(Vec<Entry>),
    /// Up to this many kept ones that are due.
    Due(i64),
    /// Up to this many kept ones whose key exists now.
    Keyed(i64),
}

/// One receipt of a lot: new, or kept earlier (its row and the tries so far).
struct Entry {
    receipt: Receipt,
    kept: Option<(i64, i32)>,
    received_at: NaiveDateTime,
}

#[derive(Queryable)]
struct PendingRow {
    id: i64,
    receipt_key: String,
    delivered: bool,
    error: Option<String>,
    received_at: NaiveDateTime,
    tries: i32,
}

/// Set first in a lot's transaction on PostgreSQL: its statements are planned at each run, with
/// the table sizes of the moment. `receipt_keys` and `pending_receipts` grow from empty while a
/// batch delivers, and a prepared statement's generic plan, made after a few runs on the small
/// table, kept reading the whole table for each lot (`seq_scan` of `receipt_keys` counted 506
/// scans and 18 million rows read in a 100k SMPP run): PostgreSQL's CPU went to it and the
/// batch's speed depended on when the plan happened to change (BENCHMARKS.md, SMPP).
const PLAN_EACH_RUN: &str = "SET LOCAL plan_cache_mode = force_custom_plan";

/// The delay before a kept receipt's try number `tries` (1 s, doubling).
fn retry_delay(tries: i32) -> chrono::Duration {
    chrono::Duration::seconds(1i64 << tries.clamp(0, 20))
}

impl Store {
    /// Stores a lot of receipts: applied to their messages, or kept for later. Once this
    /// returns `Ok`, every receipt of the lot is durable (applied or kept): it may be
    /// acknowledged to its provider.
    pub async fn record_receipts(
        &self,
        receipts: Vec<Receipt>,
        timeouts: &ReceiptTimeouts,
    ) -> Result<ReceiptsApplied, StoreError> {
        if receipts.is_empty() {
            return Ok(ReceiptsApplied::default());
        }
        let at = now();
        let lot = receipts
            .into_iter()
            .map(|receipt| Entry {
                receipt,
                kept: None,
                received_at: at,
            })
            .collect();
        self.apply(Source::Lot(lot), at, timeouts).await
    }

    /// Tries again up to `limit` kept receipts that are due.
    pub async fn match_pending_receipts(
        &self,
        limit: i64,
        timeouts: &ReceiptTimeouts,
    ) -> Result<ReceiptsApplied, StoreError> {
        self.apply(Source::Due(limit), now(), timeouts).await
    }

    /// Applies up to `limit` kept receipts whose key has been written since, due or not: what a
    /// receipt that came before its message's id was committed waits for, usually for
    /// milliseconds (the worker records a slice's outcomes once the slice is sent).
    pub async fn match_keyed_receipts(
        &self,
        limit: i64,
        timeouts: &ReceiptTimeouts,
    ) -> Result<ReceiptsApplied, StoreError> {
        self.apply(Source::Keyed(limit), now(), timeouts).await
    }

    /// Receipts kept, due or not.
    pub async fn pending_receipts(&self) -> Result<i64, StoreError> {
        with_conn!(self, |conn| {
            Ok(pending_receipts::table.count().get_result(conn).await?)
        })
    }

    /// Applies the receipts of `source` in one transaction.
    async fn apply(
        &self,
        source: Source,
        at: NaiveDateTime,
        timeouts: &ReceiptTimeouts,
    ) -> Result<ReceiptsApplied, StoreError> {
        with_tx!(self, |conn| {
            if matches!(self.backend(), super::Backend::Postgres) {
                use diesel_async::SimpleAsyncConnection as _;
                conn.batch_execute(PLAN_EACH_RUN).await?;
            }
            let kept = match source {
                Source::Lot(_) => None,
                Source::Due(limit) => Some(
                    pending_receipts::table
                        .filter(pending_receipts::next_at.le(at))
                        .order(pending_receipts::next_at)
                        .limit(limit)
                        .into_boxed(),
                ),
                Source::Keyed(limit) => Some(
                    pending_receipts::table
                        .filter(diesel::dsl::exists(receipt_keys::table.filter(
                            receipt_keys::receipt_key.eq(pending_receipts::receipt_key),
                        )))
                        .order(pending_receipts::id)
                        .limit(limit)
                        .into_boxed(),
                ),
            };
            let lot: Vec<Entry> = match (source, kept) {
                (Source::Lot(lot), _) => lot,
                (_, None) => Vec::new(),
                (_, Some(kept)) => kept
                    .select((
                        pending_receipts::id,
                        pending_receipts::receipt_key,
                        pending_receipts::delivered,
                        pending_receipts::error,
                        pending_receipts::received_at,
                        pending_receipts::tries,
                    ))
                    .load::<PendingRow>(conn)
                    .await?
                    .into_iter()
                    .map(|row| Entry {
                        receipt: Receipt {
                            key: row.receipt_key,
                            outcome: if row.delivered {
                                ReceiptOutcome::Delivered
                            } else {
                                ReceiptOutcome::Failed(row.error.unwrap_or_default())
                            },
                        },
                        kept: Some((row.id, row.tries)),
                        received_at: row.received_at,
                    })
                    .collect(),
            };
            let mut applied = ReceiptsApplied::default();
            if lot.is_empty() {
                return Ok(applied);
            }
            // The keys' messages.
            let keys: Vec<&str> = lot
                .iter()
                .map(|e| e.receipt.key.as_str())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            let mut message_of: HashMap<String, i64> = HashMap::with_capacity(keys.len());
            for chunk in keys.chunks(INSERT_CHUNK) {
                let found: Vec<(String, i64)> = receipt_keys::table
                    .filter(receipt_keys::receipt_key.eq_any(chunk))
                    .select((receipt_keys::receipt_key, receipt_keys::message_id))
                    .load(conn)
                    .await?;
                message_of.extend(found);
            }
            // Receipts that match nothing are kept (or dropped after their last try); kept
            // ones that match leave the list.
            let mut matched: Vec<(&Entry, i64)> = Vec::new();
            for entry in &lot {
                match (message_of.get(&entry.receipt.key), entry.kept) {
                    (Some(&message), kept) => {
                        if let Some((row, _)) = kept {
                            diesel::delete(pending_receipts::table.find(row))
                                .execute(conn)
                                .await?;
                        }
                        matched.push((entry, message));
                    }
                    (None, None) => {
                        let (delivered, error) = match &entry.receipt.outcome {
                            ReceiptOutcome::Delivered => (true, None),
                            ReceiptOutcome::Failed(e) => (false, Some(e.as_str())),
                        };
                        diesel::insert_into(pending_receipts::table)
                            .values((
                                pending_receipts::receipt_key.eq(&entry.receipt.key),
                                pending_receipts::delivered.eq(delivered),
                                pending_receipts::error.eq(error),
                                pending_receipts::received_at.eq(entry.received_at),
                                pending_receipts::tries.eq(0),
                                pending_receipts::next_at.eq(at + retry_delay(0)),
                            ))
                            .execute(conn)
                            .await?;
                        applied.kept += 1;
                    }
                    (None, Some((row, tries))) if tries + 1 >= PENDING_RECEIPT_TRIES => {
                        diesel::delete(pending_receipts::table.find(row))
                            .execute(conn)
                            .await?;
                        applied.dropped += 1;
                    }
                    (None, Some((row, tries))) => {
                        diesel::update(pending_receipts::table.find(row))
                            .set((
                                pending_receipts::tries.eq(tries + 1),
                                pending_receipts::next_at.eq(at + retry_delay(tries + 1)),
                            ))
                            .execute(conn)
                            .await?;
                        applied.kept += 1;
                    }
                }
            }
            if matched.is_empty() {
                return Ok(applied);
            }
            let ids: Vec<i64> = matched
                .iter()
                .map(|(_, m)| *m)
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            // The messages are locked first (on PostgreSQL; SQLite's write transaction excludes
            // every other writer): two parts' receipts applied at once by two instances must
            // not both see the other part as not yet delivered.
            for chunk in ids.chunks(INSERT_CHUNK) {
                diesel::update(messages::table.filter(messages::id.eq_any(chunk)))
                    .set(messages::status.eq(messages::status))
                    .execute(conn)
                    .await?;
            }
            let delivered_keys: Vec<&str> = matched
                .iter()
                .filter(|(e, _)| e.receipt.outcome == ReceiptOutcome::Delivered)
                .map(|(e, _)| e.receipt.key.as_str())
                .collect();
            for chunk in delivered_keys.chunks(INSERT_CHUNK) {
                diesel::update(receipt_keys::table.filter(receipt_keys::receipt_key.eq_any(chunk)))
                    .set(receipt_keys::done.eq(true))
                    .execute(conn)
                    .await?;
            }
            // Each message's status, and whether every one of its parts is delivered.
            let mut sent: HashMap<i64, (i64, i32, NaiveDateTime)> = HashMap::new();
            let mut undone: HashSet<i64> = HashSet::new();
            for chunk in ids.chunks(INSERT_CHUNK) {
                let rows: Vec<(i64, i64, i32, NaiveDateTime)> = messages::table
                    .filter(messages::id.eq_any(chunk))
                    .filter(messages::status.eq(SENT))
                    .select((
                        messages::id,
                        messages::batch_id,
                        messages::partition,
                        messages::updated_at,
                    ))
                    .load(conn)
                    .await?;
                sent.extend(rows.into_iter().map(|(id, b, p, t)| (id, (b, p, t))));
                let open: Vec<i64> = receipt_keys::table
                    .filter(receipt_keys::message_id.eq_any(chunk))
                    .filter(receipt_keys::done.eq(false))
                    .select(receipt_keys::message_id)
                    .load(conn)
                    .await?;
                undone.extend(open);
            }
            // A failed part fails its message at once; otherwise it is delivered once no part
            // is left undone.
            let mut failed: BTreeMap<i64, &str> = BTreeMap::new();
            let mut delivered: BTreeSet<i64> = BTreeSet::new();
            for (entry, message) in &matched {
                let Some(&(_, _, sent_at)) = sent.get(message) else {
                    applied.repeated += 1;
                    continue;
                };
                if timeouts.expired(&entry.receipt.key, sent_at, entry.received_at) {
                    applied.late += 1;
                    continue;
                }
                match &entry.receipt.outcome {
                    ReceiptOutcome::Failed(error) => {
                        failed.entry(*message).or_insert(error.as_str());
                    }
                    ReceiptOutcome::Delivered if undone.contains(message) => applied.parts += 1,
                    ReceiptOutcome::Delivered => {
                        delivered.insert(*message);
                    }
                }
            }
            delivered.retain(|m| !failed.contains_key(m));
            let mut by_error: BTreeMap<&str, Vec<i64>> = BTreeMap::new();
            for (message, error) in &failed {
                by_error.entry(error).or_default().push(*message);
            }
            for (error, ids) in by_error {
                for chunk in ids.chunks(INSERT_CHUNK) {
                    diesel::update(
                        messages::table
                            .filter(messages::id.eq_any(chunk))
                            .filter(messages::status.eq(SENT)),
                    )
                    .set((
                        messages::status.eq(FAILED),
                        messages::error.eq(error),
                        messages::updated_at.eq(at),
                    ))
                    .execute(conn)
                    .await?;
                }
            }
            let delivered: Vec<i64> = delivered.into_iter().collect();
            for chunk in delivered.chunks(INSERT_CHUNK) {
                diesel::update(
                    messages::table
                        .filter(messages::id.eq_any(chunk))
                        .filter(messages::status.eq(SENT)),
                )
                .set((
                    messages::status.eq(DELIVERED),
                    messages::delivered_at.eq(Some(at)),
                    messages::updated_at.eq(at),
                ))
                .execute(conn)
                .await?;
            }
            // The partitions' counters, in key order (the order every writer locks them in).
            let mut counters: BTreeMap<(i64, i32), (i64, i64)> = BTreeMap::new();
            for (message, is_delivered) in failed
                .keys()
                .map(|m| (*m, false))
                .chain(delivered.iter().map(|m| (*m, true)))
            {
                let Some(&(batch, partition, sent_at)) = sent.get(&message) else {
                    continue;
                };
                let counter = counters.entry((batch, partition)).or_default();
                if is_delivered {
                    counter.0 += 1;
                    applied.delivered += 1;
                } else {
                    counter.1 += 1;
                    applied.failed += 1;
                }
                applied
                    .latencies
                    .push((at - sent_at).num_milliseconds().max(0) as f64 / 1000.0);
            }
            for ((batch, partition), (d, f)) in counters {
                diesel::update(partitions::table.find((batch, partition)))
                    .set((
                        partitions::sent.eq(partitions::sent - (d + f)),
                        partitions::delivered.eq(partitions::delivered + d),
                        partitions::failed.eq(partitions::failed + f),
                        partitions::updated_at.eq(at),
                    ))
                    .execute(conn)
                    .await?;
            }
            // A settled message keeps its keys: an SMSC that sends a receipt again (its
            // `deliver_sm_resp` was lost) finds a settled message, a repeat, instead of leaving
            // a receipt to be tried again for an hour. A provider that reuses an id takes the
            // key over for its newer message (`record_outcomes`).
            Ok(applied)
        })
    }
}
