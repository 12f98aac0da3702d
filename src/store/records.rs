//! The types the store's aggregates share: what a chunk, an upload or a task hands to the store
//! and what it answers, and small helpers (the clock, the insert size).

use std::collections::{BTreeMap, HashSet};

use chrono::NaiveDateTime;

use super::StoreError;
use super::models::{Batch, NewMessage, Partition};

/// Rows per multi-row INSERT: keeps every statement under SQLite's and PostgreSQL's bind limits.
pub(super) const INSERT_CHUNK: usize = 1000;

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

/// A run of a batch's preparation, as `Store::begin_preparation_run` started it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PreparationRun {
    /// Its number: from now on only this run's chunks are recorded.
    pub number: i64,
    /// The batch's recipients counted by chunks committed before the run began. A chunk counts
    /// its recipients in the transaction that moves the checkpoint and keeps its range, so at 0
    /// no chunk was ever committed: there is no checkpoint and no range to read.
    pub processed: i64,
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
    /// Not sent because the provider could take nothing (no session bound): back to `pending`,
    /// not before the given time, with the reason as `error` and the claim's attempt undone.
    pub deferred: Vec<(i64, NaiveDateTime, String)>,
    /// Not sent because the batch was cancelled.
    pub cancelled: Vec<i64>,
    /// Not sent because the number is on the opt-out list: `cancelled`, with `error`
    /// `opted_out`, and the claim's attempt undone.
    pub opted_out: Vec<i64>,
    /// The receipt keys (`domain::receipt::receipt_key`) of sent messages, one per part that a
    /// receipt will name: (message id, key).
    pub receipt_keys: Vec<(i64, String)>,
}

impl Outcomes {
    /// `receipt_keys` as two columns: the messages and their keys.
    pub(super) fn receipt_key_columns(&self) -> (Vec<i64>, Vec<String>) {
        self.receipt_keys.iter().cloned().unzip()
    }

    /// The outcomes split by the partition `partition_of` tells for each message, for a task
    /// across partitions (each partition's are recorded with its counters).
    pub fn by_partition(&self, partition_of: impl Fn(i64) -> i32) -> BTreeMap<i32, Outcomes> {
        let mut split: BTreeMap<i32, Outcomes> = BTreeMap::new();
        fn at(split: &mut BTreeMap<i32, Outcomes>, partition: i32) -> &mut Outcomes {
            split.entry(partition).or_default()
        }
        for m in &self.sent {
            at(&mut split, partition_of(m.0)).sent.push(m.clone());
        }
        for m in &self.failed {
            at(&mut split, partition_of(m.0)).failed.push(m.clone());
        }
        for m in &self.retry {
            at(&mut split, partition_of(m.0)).retry.push(m.clone());
        }
        for &id in &self.released {
            at(&mut split, partition_of(id)).released.push(id);
        }
        for m in &self.deferred {
            at(&mut split, partition_of(m.0)).deferred.push(m.clone());
        }
        for &id in &self.cancelled {
            at(&mut split, partition_of(id)).cancelled.push(id);
        }
        for &id in &self.opted_out {
            at(&mut split, partition_of(id)).opted_out.push(id);
        }
        for k in &self.receipt_keys {
            at(&mut split, partition_of(k.0))
                .receipt_keys
                .push(k.clone());
        }
        split
    }

    /// Messages covered.
    pub fn len(&self) -> usize {
        self.sent.len()
            + self.failed.len()
            + self.retry.len()
            + self.released.len()
            + self.deferred.len()
            + self.cancelled.len()
            + self.opted_out.len()
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

/// Puts a chunk's messages in the order every writer of messages inserts them: by number, so
/// that two chunks written side by side that share numbers wait for each other's numbers in the
/// same order, which cannot deadlock; a number's rows by recipient, so that its first recipient
/// is the one inserted and the later ones are the duplicates dropped.
pub(super) fn in_number_order(messages: &mut [NewMessage]) {
    messages.sort_unstable_by(|a, b| (&a.phone, a.recipient_id).cmp(&(&b.phone, b.recipient_id)));
}

pub(super) fn now() -> NaiveDateTime {
    chrono::Utc::now().naive_utc()
}
