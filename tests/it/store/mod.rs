//! The store conformance suite: every scenario runs the public `Store` API against a fresh
//! SQLite file and a fresh PostgreSQL database, and asserts the exact rows and counters a user of
//! the store relies on — both backends must answer alike ("both stores pass one shared
//! conformance suite").
//!
//! Each test gets one fresh database (a SQLite file in a temporary folder, or a PostgreSQL
//! database, both named by a UUID), migrated, and a `Store` on it handed to the scenario inside a
//! multi-thread tokio runtime. The database is removed when the test ends, also when it fails.
//! A file per aggregate of the store holds its scenarios.

use std::collections::BTreeSet;
use std::future::Future;
use std::time::Duration;

use chrono::{Duration as ChronoDuration, NaiveDateTime, Timelike, Utc};
use smsbatch::domain::batch::{MessageStatus, MessageType};
use smsbatch::domain::lifecycle::{Condition, Conditions, Steps};
use smsbatch::domain::state::{BatchState, StepStatus};
use smsbatch::store::models::{
    Batch, LifecycleUpdate, MessageRow, NewBatch, NewMessage, Partition,
};
use smsbatch::store::{
    Backend as StoreBackend, BatchRecord, COPY_FROM_ROWS, ChunkWritten, ImportError, Outcomes,
    PreparedChunk, Store, StoreError, UNKNOWN_OUTCOME, UploadChunk,
};
use uuid::Uuid;

pub use crate::common::{Backend, TestDb};

/// Creates a fresh database of `backend`, migrates it, and runs `scenario` on a store connected
/// to it inside a multi-thread runtime. The database is dropped afterwards, also on panic.
pub fn run<F, Fut>(backend: Backend, scenario: F)
where
    F: FnOnce(Store) -> Fut,
    Fut: Future<Output = ()>,
{
    run_with_url(backend, |store, _| scenario(store));
}

/// `run`, for a scenario that also opens connections of its own to the database (its URL).
pub fn run_with_url<F, Fut>(backend: Backend, scenario: F)
where
    F: FnOnce(Store, String) -> Fut,
    Fut: Future<Output = ()>,
{
    // Declared first, dropped last: the runtime (and the pool in it) goes before the database.
    let db = TestDb::new(backend);
    // Synchronous, blocks on a runtime of its own: before ours exists.
    smsbatch::store::migrate(db.url()).expect("the migrations run on a fresh database");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    rt.block_on(async {
        let store = Store::connect(db.url(), 4, Duration::from_secs(10))
            .expect("a store on the fresh database");
        scenario(store, db.url().to_owned()).await;
    });
    drop(rt);
    drop(db);
}

/// Runs one scenario as two tests, one per backend.
macro_rules! on_both_backends {
    ($scenario:ident => $sqlite:ident, $postgres:ident) => {
        #[test]
        fn $sqlite() {
            run(Backend::Sqlite, $scenario);
        }

        #[test]
        fn $postgres() {
            run(Backend::Postgres, $scenario);
        }
    };
}

mod batches;
mod leases;
mod messages;
mod outcomes;
mod preparation;
mod preparation_races;
mod receipts;
mod recipients;
// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

const PENDING: MessageStatus = MessageStatus::Pending;
const SENDING: MessageStatus = MessageStatus::Sending;
const SENT: MessageStatus = MessageStatus::Sent;
const FAILED: MessageStatus = MessageStatus::Failed;
const CANCELLED: MessageStatus = MessageStatus::Cancelled;

fn now() -> NaiveDateTime {
    Utc::now().naive_utc()
}

/// `now() + offset`, to the whole second (so both backends store and return it exactly).
fn whole_second(offset: ChronoDuration) -> NaiveDateTime {
    (Utc::now() + offset)
        .naive_utc()
        .with_nanosecond(0)
        .expect("zero nanoseconds is valid")
}

fn new_batch(name: &str, partition_count: i32) -> NewBatch {
    let at = now();
    NewBatch {
        public_id: Uuid::now_v7().to_string(),
        name: name.to_owned(),
        campaign_id: Some(format!("campaign-{name}")),
        content: "Hi {{name}}".to_owned(),
        url: None,
        provider: "simulator".to_owned(),
        message_type: "marketing".to_owned(),
        schedule_at: None,
        partition_count,
        state: "initial".to_owned(),
        created_at: at,
        updated_at: at,
        failure_threshold: 0.1,
        parent_id: None,
    }
}

/// `n` inline recipients `+8613800000000 + start + i`, without vars.
fn recipients(start: u64, n: u64) -> Vec<(String, Option<String>)> {
    (0..n)
        .map(|i| (format!("+86138{:08}", start + i), None))
        .collect()
}

async fn create(store: &Store, name: &str, partition_count: i32) -> Batch {
    store
        .create_batch(new_batch(name, partition_count), Vec::new())
        .await
        .expect("create_batch")
        .batch
}

/// Moves a batch to `state` through `save_lifecycle` at its current version.
async fn set_state(store: &Store, id: i64, state: &str) -> Batch {
    let batch = store.batch(id).await.expect("batch");
    let mut update = LifecycleUpdate::from(&batch.bookkeeping());
    update.state = state.to_owned();
    update.updated_at = now();
    store
        .save_lifecycle(id, batch.version, &update)
        .await
        .expect("save_lifecycle at the current version")
}

fn message(
    batch_id: i64,
    partition: i32,
    recipient_id: i64,
    phone: &str,
    segments: i32,
) -> NewMessage {
    NewMessage {
        batch_id,
        partition,
        recipient_id,
        phone: phone.to_owned(),
        body: format!("Hello {phone}"),
        encoding: "gsm7".to_owned(),
        segments,
        updated_at: now(),
    }
}

/// Writes one message per `(partition, phone)` (one segment each) as one prepared chunk and
/// returns their ids in the same order.
async fn seed(store: &Store, batch_id: i64, spec: &[(i32, &str)]) -> Vec<i64> {
    let messages: Vec<NewMessage> = spec
        .iter()
        .enumerate()
        .map(|(i, (p, phone))| message(batch_id, *p, i as i64 + 1, phone, 1))
        .collect();
    let n = messages.len() as i64;
    let written = store
        .write_prepared_chunk(
            batch_id,
            PreparedChunk {
                messages,
                last_recipient_id: n,
                processed: n,
                invalid: 0,
                repeats: None,
            },
        )
        .await
        .expect("write_prepared_chunk");
    assert_eq!(written.inserted, n, "every seeded message is inserted");
    let rows = all_messages(store, batch_id).await;
    spec.iter()
        .map(|(_, phone)| {
            rows.iter()
                .find(|r| r.phone == *phone)
                .unwrap_or_else(|| panic!("seeded message {phone} is listed"))
                .id
        })
        .collect()
}

async fn all_messages(store: &Store, batch_id: i64) -> Vec<MessageRow> {
    store
        .list_messages(batch_id, None, 0, 10_000)
        .await
        .expect("list_messages")
}

async fn message_by_id(store: &Store, batch_id: i64, id: i64) -> MessageRow {
    all_messages(store, batch_id)
        .await
        .into_iter()
        .find(|m| m.id == id)
        .unwrap_or_else(|| panic!("message {id} exists"))
}

/// (id, status) of every message of a batch, in id order.
async fn statuses(store: &Store, batch_id: i64) -> Vec<(i64, MessageStatus)> {
    all_messages(store, batch_id)
        .await
        .iter()
        .map(|m| (m.id, m.status))
        .collect()
}

/// The partitions' (total, sent, delivered, failed, cancelled).
async fn counters(store: &Store, batch_id: i64) -> Vec<(i64, i64, i64, i64, i64)> {
    store
        .partitions(batch_id)
        .await
        .expect("partitions")
        .iter()
        .map(|p| (p.total, p.sent, p.delivered, p.failed, p.cancelled))
        .collect()
}

fn ids_of(rows: &[MessageRow]) -> Vec<i64> {
    rows.iter().map(|m| m.id).collect()
}

fn public_ids(records: &[BatchRecord]) -> Vec<String> {
    records.iter().map(|r| r.batch.public_id.clone()).collect()
}

/// Sends `chunks` into a channel that is then closed and imports it.
async fn import(
    store: &Store,
    batch_id: i64,
    chunks: Vec<UploadChunk<String>>,
) -> Result<(i64, i64), ImportError<String>> {
    let (tx, rx) = tokio::sync::mpsc::channel(chunks.len() + 1);
    for chunk in chunks {
        tx.send(chunk).await.expect("the channel has room");
    }
    drop(tx);
    store.import_recipients(batch_id, rx).await
}

/// Every recipient phone of a batch, in id order (paged by 2 to exercise the cursor).
async fn recipient_phones(store: &Store, batch_id: i64) -> Vec<String> {
    let mut phones = Vec::new();
    let mut after = 0;
    loop {
        let page = store
            .recipients_after(batch_id, after, 2)
            .await
            .expect("recipients_after");
        let Some(last) = page.last() else { break };
        after = last.id;
        phones.extend(page.into_iter().map(|r| r.phone));
    }
    phones
}

/// A batch with inline recipients (no vars), and their ids in order.
async fn batch_with_recipients(
    store: &Store,
    name: &str,
    partition_count: i32,
    phones: Vec<String>,
) -> (Batch, Vec<i64>) {
    let batch = store
        .create_batch(
            new_batch(name, partition_count),
            phones.into_iter().map(|p| (p, None)).collect(),
        )
        .await
        .expect("create")
        .batch;
    let ids = store
        .recipients_after(batch.id, 0, 10_000)
        .await
        .expect("recipients")
        .iter()
        .map(|r| r.id)
        .collect();
    (batch, ids)
}
