//! The store conformance suite: every scenario runs the public `Store` API against a fresh
//! SQLite file and a fresh PostgreSQL database, and asserts the exact rows and counters a user of
//! the store relies on — both backends must answer alike ("both stores pass one shared
//! conformance suite").

mod store_support;

use std::collections::BTreeSet;
use std::time::Duration;

use chrono::{Duration as ChronoDuration, NaiveDateTime, Timelike, Utc};
use smsbatch::domain::batch::{MessageStatus, MessageType};
use smsbatch::domain::lifecycle::{Condition, Conditions, Steps};
use smsbatch::domain::state::{BatchState, StepStatus};
use smsbatch::store::models::{
    Batch, LifecycleUpdate, MessageRow, NewBatch, NewMessage, Partition,
};
use smsbatch::store::{
    Backend as StoreBackend, BatchRecord, ChunkWritten, ImportError, Outcomes, PreparedChunk,
    Store, StoreError, UNKNOWN_OUTCOME, UploadChunk,
};
use uuid::Uuid;

use store_support::{Backend, run};

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

on_both_backends!(create_find_and_list_batches
    => create_find_and_list_batches_sqlite, create_find_and_list_batches_postgres);
on_both_backends!(save_lifecycle_checks_the_version
    => save_lifecycle_checks_the_version_sqlite, save_lifecycle_checks_the_version_postgres);
on_both_backends!(import_commits_and_accumulates
    => import_commits_and_accumulates_sqlite, import_commits_and_accumulates_postgres);
on_both_backends!(import_bad_input_rolls_back
    => import_bad_input_rolls_back_sqlite, import_bad_input_rolls_back_postgres);
on_both_backends!(import_cut_short_stores_nothing
    => import_cut_short_stores_nothing_sqlite, import_cut_short_stores_nothing_postgres);
on_both_backends!(import_into_started_batch_stores_nothing
    => import_into_started_batch_stores_nothing_sqlite,
       import_into_started_batch_stores_nothing_postgres);
on_both_backends!(abandoned_import_stores_nothing
    => abandoned_import_stores_nothing_sqlite, abandoned_import_stores_nothing_postgres);
on_both_backends!(import_racing_a_transition_has_one_winner
    => import_racing_a_transition_has_one_winner_sqlite,
       import_racing_a_transition_has_one_winner_postgres);
on_both_backends!(recipients_page_in_id_order
    => recipients_page_in_id_order_sqlite, recipients_page_in_id_order_postgres);
on_both_backends!(prepared_chunks_drop_duplicates_and_opt_outs
    => prepared_chunks_drop_duplicates_and_opt_outs_sqlite,
       prepared_chunks_drop_duplicates_and_opt_outs_postgres);
on_both_backends!(chunks_written_side_by_side_keep_the_checkpoint_exact
    => chunks_written_side_by_side_keep_the_checkpoint_exact_sqlite,
       chunks_written_side_by_side_keep_the_checkpoint_exact_postgres);
on_both_backends!(only_the_newest_preparation_run_records_chunks
    => only_the_newest_preparation_run_records_chunks_sqlite,
       only_the_newest_preparation_run_records_chunks_postgres);
on_both_backends!(batch_tally_counts_rows_and_counters
    => batch_tally_counts_rows_and_counters_sqlite,
       batch_tally_counts_rows_and_counters_postgres);
on_both_backends!(numbers_shared_by_chunks_written_side_by_side_are_kept_once
    => numbers_shared_by_chunks_written_side_by_side_are_kept_once_sqlite,
       numbers_shared_by_chunks_written_side_by_side_are_kept_once_postgres);
on_both_backends!(a_chunk_told_which_numbers_may_repeat_keeps_each_once
    => a_chunk_told_which_numbers_may_repeat_keeps_each_once_sqlite,
       a_chunk_told_which_numbers_may_repeat_keeps_each_once_postgres);
on_both_backends!(large_prepared_chunk_is_written
    => large_prepared_chunk_is_written_sqlite, large_prepared_chunk_is_written_postgres);
on_both_backends!(claim_moves_pending_to_sending_once
    => claim_moves_pending_to_sending_once_sqlite, claim_moves_pending_to_sending_once_postgres);
on_both_backends!(claims_slice_a_range_in_id_order
    => claims_slice_a_range_in_id_order_sqlite, claims_slice_a_range_in_id_order_postgres);
on_both_backends!(concurrent_claims_hand_out_each_message_once
    => concurrent_claims_hand_out_each_message_once_sqlite,
       concurrent_claims_hand_out_each_message_once_postgres);
on_both_backends!(record_outcomes_moves_messages_and_counters
    => record_outcomes_moves_messages_and_counters_sqlite,
       record_outcomes_moves_messages_and_counters_postgres);
on_both_backends!(a_slice_sent_whole_is_recorded_exactly
    => a_slice_sent_whole_is_recorded_exactly_sqlite,
       a_slice_sent_whole_is_recorded_exactly_postgres);
on_both_backends!(a_slice_is_recorded_with_the_next_claim
    => a_slice_is_recorded_with_the_next_claim_sqlite,
       a_slice_is_recorded_with_the_next_claim_postgres);
on_both_backends!(retries_wait_until_due
    => retries_wait_until_due_sqlite, retries_wait_until_due_postgres);
on_both_backends!(cancel_pending_and_recover_sending
    => cancel_pending_and_recover_sending_sqlite, cancel_pending_and_recover_sending_postgres);
on_both_backends!(recover_sending_for_resend
    => recover_sending_for_resend_sqlite, recover_sending_for_resend_postgres);
on_both_backends!(list_messages_pages_and_filters
    => list_messages_pages_and_filters_sqlite, list_messages_pages_and_filters_postgres);
on_both_backends!(leases_go_to_one_instance_at_a_time
    => leases_go_to_one_instance_at_a_time_sqlite, leases_go_to_one_instance_at_a_time_postgres);
on_both_backends!(only_dead_instances_claims_are_settled
    => only_dead_instances_claims_are_settled_sqlite,
       only_dead_instances_claims_are_settled_postgres);
on_both_backends!(count_by_state_and_ping
    => count_by_state_and_ping_sqlite, count_by_state_and_ping_postgres);

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

// ---------------------------------------------------------------------------------------------
// 1. create, find, list
// ---------------------------------------------------------------------------------------------

async fn create_find_and_list_batches(store: Store) {
    let mut new = new_batch("first", 3);
    new.url = Some("https://shop.example/x".into());
    let inline = vec![
        (
            "+8613800000001".to_owned(),
            Some(r#"{"name":"Ann"}"#.to_owned()),
        ),
        ("+8613800000002".to_owned(), None),
        (
            "138 0000 0003".to_owned(),
            Some(r#"{"name":"Bo"}"#.to_owned()),
        ),
        ("garbage".to_owned(), None),
    ];
    let created = store
        .create_batch(new.clone(), inline.clone())
        .await
        .expect("create_batch");
    let b = &created.batch;
    assert_eq!(b.public_id, new.public_id);
    assert_eq!(b.name, "first");
    assert_eq!(b.campaign_id.as_deref(), Some("campaign-first"));
    assert_eq!(b.content, "Hi {{name}}");
    assert_eq!(b.url.as_deref(), Some("https://shop.example/x"));
    assert_eq!(b.provider, "simulator");
    assert_eq!(b.message_type, MessageType::Marketing);
    assert_eq!(b.schedule_at, None);
    assert_eq!(b.partition_count, 3);
    assert_eq!(b.state, BatchState::Initial);
    assert_eq!(b.resume_to, None);
    assert_eq!(b.version, 0);
    assert_eq!(b.recipients, 4);
    assert_eq!(
        (
            b.processed,
            b.valid,
            b.invalid,
            b.duplicates,
            b.opted_out,
            b.segments,
            b.restarts
        ),
        (0, 0, 0, 0, 0, 0, 0)
    );
    assert_eq!(b.error, None);
    assert_eq!((b.started_at, b.finished_at), (None, None));
    assert_eq!(b.steps, Steps::default());
    let zero = |idx| Partition {
        batch_id: b.id,
        idx,
        total: 0,
        sent: 0,
        delivered: 0,
        failed: 0,
        cancelled: 0,
        unknown: 0,
    };
    assert_eq!(created.partitions, vec![zero(0), zero(1), zero(2)]);

    // find_batch by public id.
    let found = store
        .find_batch(&new.public_id)
        .await
        .expect("find_batch")
        .expect("the batch is found by its public id");
    assert_eq!(found.batch.id, b.id);
    assert_eq!(found.batch.recipients, 4);
    assert_eq!(found.batch.state, BatchState::Initial);
    assert_eq!(found.partitions, created.partitions);
    assert!(
        store
            .find_batch(&Uuid::now_v7().to_string())
            .await
            .expect("find_batch")
            .is_none(),
        "an unknown public id finds nothing"
    );

    // batch by internal id.
    let by_id = store.batch(b.id).await.expect("batch by id");
    assert_eq!(by_id.public_id, new.public_id);
    assert_eq!(by_id.recipients, 4);
    assert!(
        matches!(
            store.batch(b.id + 1000).await,
            Err(StoreError::Query(diesel::result::Error::NotFound))
        ),
        "an unknown internal id is NotFound"
    );

    // The inline recipients were stored as given, in order.
    let rows = store
        .recipients_after(b.id, 0, 100)
        .await
        .expect("recipients_after");
    let stored: Vec<(String, Option<String>)> = rows
        .iter()
        .map(|r| (r.phone.clone(), r.vars.clone()))
        .collect();
    assert_eq!(stored, inline);
    assert!(rows.iter().all(|r| r.batch_id == b.id));

    // Four more batches, with 1..=4 partitions: five in all.
    let mut all = vec![created.batch.public_id.clone()];
    for i in 1..=4 {
        let r = store
            .create_batch(
                new_batch(&format!("b{i}"), i),
                recipients(100 * i as u64, 2),
            )
            .await
            .expect("create_batch");
        all.push(r.batch.public_id.clone());
    }
    let newest_first: Vec<String> = all.iter().rev().cloned().collect();

    let everything = store.list_batches(None, None, 100).await.expect("list");
    assert_eq!(public_ids(&everything), newest_first);
    for r in &everything {
        assert_eq!(
            r.partitions.len() as i32,
            r.batch.partition_count,
            "each listed batch carries its own partitions"
        );
        assert!(r.partitions.iter().all(|p| p.batch_id == r.batch.id));
        let idx: Vec<i32> = r.partitions.iter().map(|p| p.idx).collect();
        assert_eq!(idx, (0..r.batch.partition_count).collect::<Vec<_>>());
    }

    // Paging by two with the cursor.
    let page1 = store.list_batches(None, None, 2).await.expect("page 1");
    assert_eq!(public_ids(&page1), newest_first[0..2]);
    let page2 = store
        .list_batches(None, Some(&newest_first[1]), 2)
        .await
        .expect("page 2");
    assert_eq!(public_ids(&page2), newest_first[2..4]);
    let page3 = store
        .list_batches(None, Some(&newest_first[3]), 2)
        .await
        .expect("page 3");
    assert_eq!(public_ids(&page3), newest_first[4..5]);
    let page4 = store
        .list_batches(None, Some(&newest_first[4]), 2)
        .await
        .expect("page 4");
    assert!(page4.is_empty(), "nothing after the oldest batch");

    // The state filter, alone and with the cursor: b1 and b3 are scheduled.
    for name in [&all[1], &all[3]] {
        let rec = store.find_batch(name).await.expect("find").expect("exists");
        set_state(&store, rec.batch.id, "scheduled").await;
    }
    let scheduled = store
        .list_batches(Some("scheduled"), None, 10)
        .await
        .expect("scheduled");
    assert_eq!(public_ids(&scheduled), vec![all[3].clone(), all[1].clone()]);
    assert!(
        scheduled
            .iter()
            .all(|r| r.batch.state == BatchState::Scheduled)
    );
    let first = store
        .list_batches(Some("scheduled"), None, 1)
        .await
        .expect("scheduled, limit 1");
    assert_eq!(public_ids(&first), vec![all[3].clone()]);
    let second = store
        .list_batches(Some("scheduled"), Some(&all[3]), 1)
        .await
        .expect("scheduled after b3");
    assert_eq!(public_ids(&second), vec![all[1].clone()]);
    let initial = store
        .list_batches(Some("initial"), None, 10)
        .await
        .expect("initial");
    assert_eq!(
        public_ids(&initial),
        vec![all[4].clone(), all[2].clone(), all[0].clone()]
    );
    let initial_after = store
        .list_batches(Some("initial"), Some(&all[3]), 10)
        .await
        .expect("initial after b3 (a scheduled cursor)");
    assert_eq!(
        public_ids(&initial_after),
        vec![all[2].clone(), all[0].clone()]
    );
    assert!(
        store
            .list_batches(Some("completed"), None, 10)
            .await
            .expect("completed")
            .is_empty()
    );
    assert_eq!(
        store
            .batches_in_states(&[BatchState::Scheduled, BatchState::Initial])
            .await
            .expect("batches_in_states")
            .iter()
            .map(|b| b.public_id.clone())
            .collect::<Vec<_>>(),
        all,
        "batches_in_states lists oldest first"
    );
}

// ---------------------------------------------------------------------------------------------
// 2. save_lifecycle
// ---------------------------------------------------------------------------------------------

async fn save_lifecycle_checks_the_version(store: Store) {
    let batch = store
        .create_batch(new_batch("life", 2), recipients(0, 3))
        .await
        .expect("create")
        .batch;
    assert_eq!(batch.version, 0);

    let mut steps = Steps::default();
    steps.preparation.status = StepStatus::Ready;
    let started = whole_second(ChronoDuration::zero());
    let mut update = LifecycleUpdate::from(&batch.bookkeeping());
    update.state = "scheduled".into();
    update.steps = serde_json::to_string(&steps).expect("steps as JSON");
    let conditions = Conditions(vec![Condition {
        kind: "Scheduled".into(),
        status: "True".into(),
        reason: "Requested".into(),
        message: "waits for its time".into(),
        last_transition_time: started.and_utc(),
    }]);
    update.conditions = serde_json::to_string(&conditions).expect("conditions as JSON");
    update.error = Some("transient hiccup".into());
    update.started_at = Some(started);
    let saved = store
        .save_lifecycle(batch.id, 0, &update)
        .await
        .expect("save at the current version");
    assert_eq!(saved.version, 1);
    assert_eq!(saved.state, BatchState::Scheduled);
    assert_eq!(saved.steps, steps);
    assert_eq!(saved.conditions, conditions);
    assert_eq!(saved.error.as_deref(), Some("transient hiccup"));
    assert_eq!(saved.started_at, Some(started));
    assert_eq!(saved.recipients, 3, "the recipients count is kept");

    // The same version again is stale now.
    let mut stale = update.clone();
    stale.state = "cancelled".into();
    match store.save_lifecycle(batch.id, 0, &stale).await {
        Err(StoreError::Conflict(_)) => {}
        other => panic!("a stale version must conflict, got {other:?}"),
    }
    let after = store.batch(batch.id).await.expect("batch");
    assert_eq!(
        (after.state.as_str(), after.version),
        ("scheduled", 1),
        "a conflicting save changes nothing"
    );

    // Counters written meanwhile survive a lifecycle save built from an older read.
    let written = store
        .write_prepared_chunk(
            batch.id,
            PreparedChunk {
                messages: vec![
                    message(batch.id, 0, 1, "+8613800000000", 2),
                    message(batch.id, 1, 2, "+8613800000001", 1),
                ],
                last_recipient_id: 3,
                processed: 3,
                invalid: 1,
                repeats: None,
            },
        )
        .await
        .expect("write_prepared_chunk");
    assert_eq!(written.inserted, 2);
    let mut next = LifecycleUpdate::from(&saved.bookkeeping()); // read before the counters moved
    next.state = "preparing".into();
    next.error = None; // None clears the column
    next.updated_at = now();
    let saved2 = store
        .save_lifecycle(batch.id, saved.version, &next)
        .await
        .expect("save at version 1");
    assert_eq!(saved2.version, 2);
    assert_eq!(saved2.state, BatchState::Preparing);
    assert_eq!(saved2.error, None, "a None error clears the stored one");
    assert_eq!(
        (
            saved2.recipients,
            saved2.processed,
            saved2.valid,
            saved2.invalid,
            saved2.segments
        ),
        (3, 3, 2, 1, 3),
        "a lifecycle save does not overwrite the counters"
    );
    assert_eq!(
        counters(&store, batch.id).await,
        vec![(1, 0, 0, 0, 0), (1, 0, 0, 0, 0)]
    );

    // A batch that does not exist conflicts too (nothing to update).
    assert!(matches!(
        store.save_lifecycle(batch.id + 1000, 0, &next).await,
        Err(StoreError::Conflict(_))
    ));
}

// ---------------------------------------------------------------------------------------------
// 3. import_recipients
// ---------------------------------------------------------------------------------------------

async fn import_commits_and_accumulates(store: Store) {
    let batch = store
        .create_batch(new_batch("upload", 2), recipients(0, 2))
        .await
        .expect("create")
        .batch;

    // First upload: three chunks (one larger than the store's insert chunk) through a small
    // channel fed by another task, then the end marker.
    let (tx, rx) = tokio::sync::mpsc::channel::<UploadChunk<String>>(1);
    let producer = tokio::spawn(async move {
        for (start, n) in [(10u64, 3u64), (20, 1200), (5000, 2)] {
            let rows: Vec<(String, Option<String>)> = recipients(start, n)
                .into_iter()
                .map(|(p, _)| {
                    let vars = format!(r#"{{"n":"{p}"}}"#);
                    (p, Some(vars))
                })
                .collect();
            tx.send(Ok(Some(rows))).await.expect("the importer listens");
        }
        tx.send(Ok(None)).await.expect("the importer listens");
    });
    let (accepted, total) = store
        .import_recipients(batch.id, rx)
        .await
        .expect("the upload commits");
    producer.await.expect("producer");
    assert_eq!((accepted, total), (1205, 1207));
    let after1 = store.batch(batch.id).await.expect("batch");
    assert_eq!(after1.recipients, 1207);
    assert_eq!(
        after1.version,
        batch.version + 1,
        "an import bumps the version"
    );
    assert_eq!(after1.state, BatchState::Initial);

    let phones = recipient_phones(&store, batch.id).await;
    let mut expected: Vec<String> = recipients(0, 2).into_iter().map(|r| r.0).collect();
    for (start, n) in [(10u64, 3u64), (20, 1200), (5000, 2)] {
        expected.extend(recipients(start, n).into_iter().map(|r| r.0));
    }
    assert_eq!(
        phones, expected,
        "recipients are stored once each, in upload order"
    );
    let first_uploaded = store
        .recipients_after(batch.id, 0, 3)
        .await
        .expect("recipients_after");
    assert_eq!(
        first_uploaded[2].vars.as_deref(),
        Some(r#"{"n":"+8613800000010"}"#),
        "vars are stored as given"
    );

    // Second upload: the total accumulates.
    let (accepted, total) = import(
        &store,
        batch.id,
        vec![
            Ok(Some(recipients(9000, 4))),
            Ok(Some(Vec::new())),
            Ok(None),
        ],
    )
    .await
    .expect("second upload");
    assert_eq!((accepted, total), (4, 1211));
    assert_eq!(store.batch(batch.id).await.expect("batch").recipients, 1211);
    assert_eq!(recipient_phones(&store, batch.id).await.len(), 1211);

    // An upload with no rows commits too.
    assert_eq!(
        import(&store, batch.id, vec![Ok(None)])
            .await
            .expect("empty upload"),
        (0, 1211)
    );
    // Rows after the end marker are not read.
    assert_eq!(
        import(
            &store,
            batch.id,
            vec![
                Ok(Some(recipients(9100, 1))),
                Ok(None),
                Ok(Some(recipients(9200, 5)))
            ]
        )
        .await
        .expect("upload with trailing rows"),
        (1, 1212)
    );
    assert_eq!(recipient_phones(&store, batch.id).await.len(), 1212);
}

async fn import_bad_input_rolls_back(store: Store) {
    let batch = store
        .create_batch(new_batch("bad", 1), recipients(0, 2))
        .await
        .expect("create")
        .batch;
    let before = recipient_phones(&store, batch.id).await;

    let result = import(
        &store,
        batch.id,
        vec![
            Ok(Some(recipients(100, 3))),
            Ok(Some(recipients(200, 1500))),
            Err("line 1504: bad column count".to_owned()),
            Ok(Some(recipients(300, 2))),
            Ok(None),
        ],
    )
    .await;
    match result {
        Err(ImportError::Input(e)) => assert_eq!(e, "line 1504: bad column count"),
        other => panic!("bad input must fail the upload, got {other:?}"),
    }
    let after = store.batch(batch.id).await.expect("batch");
    assert_eq!(after.recipients, 2, "the recipients count is unchanged");
    assert_eq!(
        after.version, batch.version,
        "a failed upload does not bump the version"
    );
    assert_eq!(
        recipient_phones(&store, batch.id).await,
        before,
        "none of the rows before the bad chunk is stored"
    );

    // The store is usable afterwards (the transaction was really rolled back).
    assert_eq!(
        import(
            &store,
            batch.id,
            vec![Ok(Some(recipients(400, 2))), Ok(None)]
        )
        .await
        .expect("a later upload"),
        (2, 4)
    );
    assert_eq!(recipient_phones(&store, batch.id).await.len(), 4);
}

async fn import_cut_short_stores_nothing(store: Store) {
    let batch = store
        .create_batch(new_batch("cut", 1), recipients(0, 1))
        .await
        .expect("create")
        .batch;

    // The sender goes away after some rows, without the end marker.
    let result = import(
        &store,
        batch.id,
        vec![Ok(Some(recipients(100, 5))), Ok(Some(recipients(200, 5)))],
    )
    .await;
    assert!(
        matches!(result, Err(ImportError::Incomplete)),
        "an upload cut short is Incomplete, got {result:?}"
    );
    // Same, the sender dropped by a task mid-stream while the import waits.
    let (tx, rx) = tokio::sync::mpsc::channel::<UploadChunk<String>>(1);
    let producer = tokio::spawn(async move {
        tx.send(Ok(Some(recipients(300, 3)))).await.expect("send");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        drop(tx);
    });
    let result = store.import_recipients(batch.id, rx).await;
    producer.await.expect("producer");
    assert!(
        matches!(result, Err(ImportError::Incomplete)),
        "an upload whose sender vanished is Incomplete, got {result:?}"
    );

    let after = store.batch(batch.id).await.expect("batch");
    assert_eq!(after.recipients, 1);
    assert_eq!(after.version, batch.version);
    assert_eq!(
        recipient_phones(&store, batch.id).await,
        vec!["+8613800000000".to_owned()]
    );
    assert_eq!(
        import(
            &store,
            batch.id,
            vec![Ok(Some(recipients(400, 1))), Ok(None)]
        )
        .await
        .expect("a later upload"),
        (1, 2)
    );
}

async fn import_into_started_batch_stores_nothing(store: Store) {
    let batch = store
        .create_batch(new_batch("started", 1), recipients(0, 2))
        .await
        .expect("create")
        .batch;
    let scheduled = set_state(&store, batch.id, "scheduled").await;

    let result = import(
        &store,
        batch.id,
        vec![Ok(Some(recipients(100, 3))), Ok(None)],
    )
    .await;
    assert!(
        matches!(result, Err(ImportError::NotInitial)),
        "an upload into a batch no longer initial is refused, got {result:?}"
    );
    let after = store.batch(batch.id).await.expect("batch");
    assert_eq!(after.recipients, 2);
    assert_eq!(
        after.version, scheduled.version,
        "nothing was written to the batch"
    );
    assert_eq!(after.state, BatchState::Scheduled);
    assert_eq!(
        recipient_phones(&store, batch.id).await,
        vec!["+8613800000000".to_owned(), "+8613800000001".to_owned()],
        "none of the uploaded rows is stored"
    );
}

async fn abandoned_import_stores_nothing(store: Store) {
    let batch = store
        .create_batch(new_batch("abandoned", 1), recipients(0, 1))
        .await
        .expect("create")
        .batch;
    let (tx, rx) = tokio::sync::mpsc::channel::<UploadChunk<String>>(4);
    tx.send(Ok(Some(recipients(100, 1500))))
        .await
        .expect("send");
    tx.send(Ok(Some(recipients(2000, 3)))).await.expect("send");
    // The importing future is dropped (its caller went away) while it waits for more input,
    // with its transaction open and rows written in it.
    let abandoned = tokio::time::timeout(
        std::time::Duration::from_millis(500),
        store.import_recipients(batch.id, rx),
    )
    .await;
    assert!(
        abandoned.is_err(),
        "the import still waits for the end marker"
    );
    drop(tx);

    // The store takes writes at once, on every pooled connection, and nothing was kept.
    let later = tokio::time::timeout(std::time::Duration::from_secs(20), async {
        let mut results = Vec::new();
        for i in 0..6 {
            results.push(
                import(
                    &store,
                    batch.id,
                    vec![Ok(Some(recipients(3000 + i, 1))), Ok(None)],
                )
                .await
                .expect("a later upload"),
            );
        }
        results
    })
    .await
    .expect("later uploads are not blocked by the abandoned one");
    assert_eq!(
        later,
        (2..=7).map(|total| (1, total)).collect::<Vec<_>>(),
        "the abandoned rows do not count"
    );
    let mut expected = vec!["+8613800000000".to_owned()];
    expected.extend(recipients(3000, 6).into_iter().map(|r| r.0));
    assert_eq!(recipient_phones(&store, batch.id).await, expected);
    assert_eq!(store.batch(batch.id).await.expect("batch").recipients, 7);
}

async fn import_racing_a_transition_has_one_winner(store: Store) {
    let batch = store
        .create_batch(new_batch("race", 1), recipients(0, 2))
        .await
        .expect("create")
        .batch;
    let (tx, rx) = tokio::sync::mpsc::channel::<UploadChunk<String>>(4);
    tx.send(Ok(Some(recipients(100, 5)))).await.expect("send");
    let importer = {
        let store = store.clone();
        tokio::spawn(async move { store.import_recipients(batch.id, rx).await })
    };
    tokio::time::sleep(std::time::Duration::from_millis(150)).await;
    // A transition read before the upload ends (the operator starts the batch meanwhile).
    let saver = {
        let store = store.clone();
        let batch = batch.clone();
        tokio::spawn(async move {
            let mut update = LifecycleUpdate::from(&batch.bookkeeping());
            update.state = "scheduled".into();
            store.save_lifecycle(batch.id, batch.version, &update).await
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    tx.send(Ok(None)).await.expect("the importer listens");
    let imported = importer.await.expect("importer");
    let saved = saver.await.expect("saver");
    let after = store.batch(batch.id).await.expect("batch");
    let phones = recipient_phones(&store, batch.id).await;
    match (&imported, &saved) {
        (Ok(counts), Err(StoreError::Conflict(_))) => {
            assert_eq!(*counts, (5, 7));
            assert_eq!((after.state.as_str(), after.recipients), ("initial", 7));
            assert_eq!(phones.len(), 7);
        }
        (Err(ImportError::NotInitial), Ok(saved)) => {
            assert_eq!(saved.state, BatchState::Scheduled);
            assert_eq!((after.state.as_str(), after.recipients), ("scheduled", 2));
            assert_eq!(phones.len(), 2, "the refused upload stored nothing");
        }
        _ => panic!(
            "exactly one of the upload and the transition must win: \
             import {imported:?}, save {saved:?}"
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// 4. recipients_after, checkpoint
// ---------------------------------------------------------------------------------------------

async fn recipients_page_in_id_order(store: Store) {
    let a = store
        .create_batch(new_batch("a", 1), recipients(0, 4))
        .await
        .expect("create a")
        .batch;
    // b's recipients get ids between a's inline ones and a's uploaded ones.
    let b = store
        .create_batch(new_batch("b", 1), recipients(500, 3))
        .await
        .expect("create b")
        .batch;
    import(&store, a.id, vec![Ok(Some(recipients(4, 3))), Ok(None)])
        .await
        .expect("upload into a");

    assert_eq!(store.checkpoint(a.id, "preparation").await.expect("cp"), 0);
    assert_eq!(store.checkpoint(a.id, "delivery").await.expect("cp"), 0);
    assert_eq!(
        store
            .checkpoint(a.id + 1000, "preparation")
            .await
            .expect("cp"),
        0
    );

    let mut pages = Vec::new();
    let mut after = 0;
    loop {
        let page = store
            .recipients_after(a.id, after, 3)
            .await
            .expect("recipients_after");
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 3, "a page holds at most `limit` rows");
        assert!(page.iter().all(|r| r.batch_id == a.id && r.id > after));
        after = page.last().map(|r| r.id).unwrap_or(after);
        pages.push(page.iter().map(|r| r.phone.clone()).collect::<Vec<_>>());
    }
    let expected: Vec<String> = recipients(0, 7).into_iter().map(|r| r.0).collect();
    assert_eq!(
        pages,
        vec![
            expected[0..3].to_vec(),
            expected[3..6].to_vec(),
            expected[6..7].to_vec()
        ]
    );
    let all = store
        .recipients_after(a.id, 0, 100)
        .await
        .expect("all of a");
    let ids: Vec<i64> = all.iter().map(|r| r.id).collect();
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "strictly increasing ids"
    );

    // A cursor in the middle of b's ids skips nothing of a.
    let b_rows = store
        .recipients_after(b.id, 0, 100)
        .await
        .expect("all of b");
    assert_eq!(b_rows.len(), 3);
    let mid = store
        .recipients_after(a.id, b_rows[1].id, 100)
        .await
        .expect("after a b id");
    assert_eq!(
        mid.iter().map(|r| r.phone.clone()).collect::<Vec<_>>(),
        expected[4..7].to_vec()
    );
    assert!(
        store
            .recipients_after(a.id, ids[6], 100)
            .await
            .expect("after the last")
            .is_empty()
    );
}

// ---------------------------------------------------------------------------------------------
// 5. write_prepared_chunk
// ---------------------------------------------------------------------------------------------

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

/// Writers side by side commit chunks out of order: the checkpoint only covers chunks with every
/// earlier one committed and never moves back, and the chunks committed beyond it are listed
/// (for a restart to skip) until the checkpoint passes them.
async fn chunks_written_side_by_side_keep_the_checkpoint_exact(store: Store) {
    let phone = |n: u32| format!("+8613900000{n:03}");
    let (batch, r) =
        batch_with_recipients(&store, "side-by-side", 1, (1..=9).map(phone).collect()).await;
    let chunk = |ids: &[usize]| PreparedChunk {
        messages: ids
            .iter()
            .map(|&i| message(batch.id, 0, r[i], &phone(i as u32 + 1), 1))
            .collect(),
        last_recipient_id: r[*ids.last().expect("ids")],
        processed: ids.len() as i64,
        invalid: 0,
        repeats: None,
    };
    let checkpoint = || {
        let store = store.clone();
        async move { store.checkpoint(batch.id, "preparation").await.expect("cp") }
    };
    let run = store.begin_preparation_run(batch.id).await.expect("run");
    // The second chunk (recipients 4..=6) commits first, when nothing was known committed.
    store
        .write_prepared_chunk_beside(batch.id, chunk(&[3, 4, 5]), run, Some(r[3]), 0)
        .await
        .expect("second chunk");
    assert_eq!(checkpoint().await, 0);
    assert_eq!(
        store
            .chunks_written_after(batch.id, 0)
            .await
            .expect("after"),
        vec![(r[3], r[5])]
    );
    // Then the first (1..=3).
    store
        .write_prepared_chunk_beside(batch.id, chunk(&[0, 1, 2]), run, Some(r[0]), 0)
        .await
        .expect("first chunk");
    assert_eq!(
        store
            .chunks_written_after(batch.id, 0)
            .await
            .expect("after"),
        vec![(r[0], r[2]), (r[3], r[5])]
    );
    // The third (7..=9) starts knowing both committed: the checkpoint moves past them, and
    // their ranges are forgotten.
    store
        .write_prepared_chunk_beside(batch.id, chunk(&[6, 7, 8]), run, Some(r[6]), r[5])
        .await
        .expect("third chunk");
    assert_eq!(checkpoint().await, r[5]);
    assert_eq!(
        store
            .chunks_written_after(batch.id, r[5])
            .await
            .expect("after"),
        vec![(r[6], r[8])]
    );
    // A chunk that started earlier and commits last does not move the checkpoint back.
    store
        .write_prepared_chunk_beside(batch.id, PreparedChunk::default(), run, None, r[2])
        .await
        .expect("late chunk");
    assert_eq!(checkpoint().await, r[5]);
    let b = store.batch(batch.id).await.expect("batch");
    assert_eq!((b.processed, b.valid, b.duplicates), (9, 9, 0));
}

/// Only the newest run of a batch's preparation records chunks: a chunk of an earlier run (one
/// stopped, aborted or running on an instance that lost the batch) is refused whole — no
/// message, counter, range or checkpoint of it stays — and so is its checkpoint's advance.
async fn only_the_newest_preparation_run_records_chunks(store: Store) {
    let phone = |n: u32| format!("+8613910000{n:03}");
    let (batch, r) = batch_with_recipients(&store, "runs", 2, (1..=6).map(phone).collect()).await;
    let chunk = |ids: &[usize]| PreparedChunk {
        messages: ids
            .iter()
            .map(|&i| message(batch.id, (i % 2) as i32, r[i], &phone(i as u32 + 1), 1))
            .collect(),
        last_recipient_id: r[*ids.last().expect("ids")],
        processed: ids.len() as i64,
        invalid: 0,
        repeats: None,
    };
    let first = store.begin_preparation_run(batch.id).await.expect("run");
    let second = store.begin_preparation_run(batch.id).await.expect("run");
    assert_eq!(second, first + 1, "each run takes the next number");
    store
        .write_prepared_chunk_beside(batch.id, chunk(&[0, 1, 2]), second, Some(r[0]), 0)
        .await
        .expect("the newest run writes");
    let refused = store
        .write_prepared_chunk_beside(batch.id, chunk(&[3, 4, 5]), first, Some(r[3]), r[2])
        .await;
    assert!(
        matches!(refused, Err(StoreError::Superseded(id)) if id == batch.id),
        "{refused:?}"
    );
    let b = store.batch(batch.id).await.expect("batch");
    assert_eq!((b.processed, b.valid, b.segments), (3, 3, 3));
    let tally = store.batch_tally(batch.id).await.expect("tally");
    assert_eq!((tally.messages.pending, tally.partition_total), (3, 3));
    assert_eq!(
        store
            .chunks_written_after(batch.id, 0)
            .await
            .expect("ranges"),
        vec![(r[0], r[2])],
        "the refused chunk left no range"
    );
    assert!(matches!(
        store.advance_checkpoint(batch.id, first, r[2]).await,
        Err(StoreError::Superseded(_))
    ));
    assert_eq!(
        store.checkpoint(batch.id, "preparation").await.expect("cp"),
        0
    );

    // The newest run moves its checkpoint past its committed chunk, forward only.
    store
        .advance_checkpoint(batch.id, second, r[2])
        .await
        .expect("advance");
    store
        .advance_checkpoint(batch.id, second, r[1])
        .await
        .expect("advance behind");
    assert_eq!(
        store.checkpoint(batch.id, "preparation").await.expect("cp"),
        r[2]
    );
    assert!(
        store
            .chunks_written_after(batch.id, 0)
            .await
            .expect("ranges")
            .is_empty(),
        "the passed range is forgotten"
    );
    // The plain write takes the newest run.
    store
        .write_prepared_chunk(batch.id, chunk(&[3, 4, 5]))
        .await
        .expect("write as the newest run");
    let tally = store.batch_tally(batch.id).await.expect("tally");
    assert_eq!(tally.last_recipient_id, Some(r[5]));
    assert_eq!(tally.checkpoint, r[5]);
    assert_eq!((tally.counters.processed, tally.counters.valid), (6, 6));
    assert_eq!((tally.messages.total(), tally.partition_total), (6, 6));
    assert_eq!(
        tally.preparation_verdict(),
        smsbatch::domain::counts::Verdict::Holds,
        "{tally:?}"
    );
}

/// A batch's tally counts the message rows themselves by status, beside the partitions'
/// counters.
async fn batch_tally_counts_rows_and_counters(store: Store) {
    use smsbatch::domain::counts::{ByStatus, Verdict};
    let phone = |n: u32| format!("+8613920000{n:03}");
    let (batch, r) = batch_with_recipients(&store, "tally", 1, (1..=4).map(phone).collect()).await;
    store
        .write_prepared_chunk(
            batch.id,
            PreparedChunk {
                messages: (0..4)
                    .map(|i| message(batch.id, 0, r[i], &phone(i as u32 + 1), 1))
                    .collect(),
                last_recipient_id: r[3],
                processed: 4,
                invalid: 0,
                repeats: None,
            },
        )
        .await
        .expect("chunk");
    let claimed = store
        .claim(batch.id, 0, 0, i64::MAX, 3, "instance-a")
        .await
        .expect("claim");
    assert_eq!(claimed.len(), 3);
    let tally = store.batch_tally(batch.id).await.expect("tally");
    assert_eq!(
        tally.messages,
        ByStatus {
            pending: 1,
            sending: 3,
            ..ByStatus::default()
        }
    );
    assert!(
        matches!(tally.delivery_verdict(), Verdict::Broken(ref why) if why.contains("1 messages are still pending and 3 sending")),
        "{:?}",
        tally.delivery_verdict()
    );
    store
        .record_outcomes(
            batch.id,
            0,
            &Outcomes {
                sent: vec![(claimed[0].id, Some("p-1".into())), (claimed[1].id, None)],
                failed: vec![(claimed[2].id, "refused".into())],
                ..Outcomes::default()
            },
        )
        .await
        .expect("outcomes");
    store.cancel_pending(batch.id, 1).await.expect("cancel");
    let tally = store.batch_tally(batch.id).await.expect("tally");
    let done = ByStatus {
        sent: 2,
        failed: 1,
        cancelled: 1,
        ..ByStatus::default()
    };
    assert_eq!((tally.messages, tally.partitions), (done, done));
    assert_eq!(tally.partition_total, 4);
    assert_eq!(tally.delivery_verdict(), Verdict::Holds, "{tally:?}");
}

async fn prepared_chunks_drop_duplicates_and_opt_outs(store: Store) {
    let phone = |n: u32| format!("+8613800000{n:03}");
    let (batch, r) = batch_with_recipients(&store, "prep", 2, (1..=10).map(phone).collect()).await;
    assert_eq!(r.len(), 10);

    assert_eq!(
        store
            .add_opt_outs(&[phone(9), phone(8), phone(9)])
            .await
            .expect("add_opt_outs"),
        2,
        "two new numbers"
    );
    assert_eq!(
        store
            .add_opt_outs(&[phone(9), phone(7)])
            .await
            .expect("add_opt_outs"),
        1,
        "one new number"
    );

    // Chunk 1: recipients 1..=6; 3 repeats 1's phone, 4 is opted out, 6 invalid.
    let written = store
        .write_prepared_chunk(
            batch.id,
            PreparedChunk {
                messages: vec![
                    message(batch.id, 0, r[0], &phone(1), 1),
                    message(batch.id, 1, r[1], &phone(2), 2),
                    message(batch.id, 1, r[2], &phone(1), 1),
                    message(batch.id, 0, r[3], &phone(9), 1),
                    message(batch.id, 0, r[4], &phone(3), 3),
                ],
                last_recipient_id: r[5],
                processed: 6,
                invalid: 1,
                repeats: None,
            },
        )
        .await
        .expect("chunk 1");
    assert_eq!(
        written,
        ChunkWritten {
            inserted: 3,
            duplicates: 1,
            opted_out: 1
        }
    );
    assert_eq!(
        store.checkpoint(batch.id, "preparation").await.expect("cp"),
        r[5]
    );

    // Chunk 2: recipients 7..=10; 7 repeats 2's phone (from chunk 1), 9 is opted out, 10
    // invalid.
    let written = store
        .write_prepared_chunk(
            batch.id,
            PreparedChunk {
                messages: vec![
                    message(batch.id, 0, r[6], &phone(2), 1),
                    message(batch.id, 1, r[7], &phone(4), 2),
                    message(batch.id, 1, r[8], &phone(7), 1),
                ],
                last_recipient_id: r[9],
                processed: 4,
                invalid: 1,
                repeats: None,
            },
        )
        .await
        .expect("chunk 2");
    assert_eq!(
        written,
        ChunkWritten {
            inserted: 1,
            duplicates: 1,
            opted_out: 1
        }
    );

    let b = store.batch(batch.id).await.expect("batch");
    assert_eq!(
        (
            b.processed,
            b.valid,
            b.invalid,
            b.duplicates,
            b.opted_out,
            b.segments
        ),
        (10, 4, 2, 2, 2, 8)
    );
    assert_eq!(b.recipients, 10);
    assert_eq!(
        store.checkpoint(batch.id, "preparation").await.expect("cp"),
        r[9]
    );
    // The first occurrence wins: phone 1 in partition 0, phone 2 in partition 1.
    assert_eq!(
        counters(&store, batch.id).await,
        vec![(2, 0, 0, 0, 0), (2, 0, 0, 0, 0)]
    );
    let rows = all_messages(&store, batch.id).await;
    assert_eq!(
        rows.iter()
            .map(|m| (m.phone.clone(), m.status, m.segments, m.attempts))
            .collect::<Vec<_>>(),
        vec![
            (phone(1), PENDING, 1, 0),
            (phone(2), PENDING, 2, 0),
            (phone(3), PENDING, 3, 0),
            (phone(4), PENDING, 2, 0),
        ]
    );
    assert!(
        rows.iter()
            .all(|m| m.provider_message_id.is_none() && m.error.is_none())
    );
    assert_eq!(
        store
            .next_task_ids(batch.id, 0, 0, 10, false)
            .await
            .expect("p0")
            .len(),
        2
    );
    assert_eq!(
        store
            .next_task_ids(batch.id, 1, 0, 10, false)
            .await
            .expect("p1")
            .len(),
        2
    );

    // A chunk of only invalid recipients moves the counters and the checkpoint.
    let written = store
        .write_prepared_chunk(
            batch.id,
            PreparedChunk {
                messages: Vec::new(),
                last_recipient_id: r[9] + 50,
                processed: 2,
                invalid: 2,
                repeats: None,
            },
        )
        .await
        .expect("empty chunk");
    assert_eq!(written, ChunkWritten::default());
    let b = store.batch(batch.id).await.expect("batch");
    assert_eq!((b.processed, b.valid, b.invalid), (12, 4, 4));
    assert_eq!(
        store.checkpoint(batch.id, "preparation").await.expect("cp"),
        r[9] + 50
    );

    // Duplicates are per batch: another batch may message the same number.
    let other = create(&store, "other", 1).await;
    let written = store
        .write_prepared_chunk(
            other.id,
            PreparedChunk {
                messages: vec![message(other.id, 0, 1, &phone(1), 1)],
                last_recipient_id: 1,
                processed: 1,
                invalid: 0,
                repeats: None,
            },
        )
        .await
        .expect("other batch");
    assert_eq!(written.inserted, 1);
    assert_eq!(written.duplicates, 0);
    assert_eq!(
        store.checkpoint(other.id, "preparation").await.expect("cp"),
        1
    );
    assert_eq!(
        store.checkpoint(batch.id, "preparation").await.expect("cp"),
        r[9] + 50,
        "checkpoints are per batch"
    );
}

/// Two writers side by side whose chunks share every number: whichever commits first keeps a
/// number, the other counts it as a duplicate (its insert waits for the first to commit), and
/// nothing fails, deadlocks or is stored twice. Within a chunk, a number's first recipient is
/// the one kept.
async fn numbers_shared_by_chunks_written_side_by_side_are_kept_once(store: Store) {
    const ROUNDS: usize = 6;
    const SHARED: usize = 150;
    let phone = |round: usize, i: usize| format!("+86137{round:02}{i:06}");
    // Each round: chunk A (the shared numbers, then its first number again), chunk B (the
    // shared numbers in reverse order).
    let phones: Vec<String> = (0..ROUNDS)
        .flat_map(|round| {
            let a = (0..SHARED).chain([0]).map(move |i| phone(round, i));
            let b = (0..SHARED).rev().map(move |i| phone(round, i));
            a.chain(b)
        })
        .collect();
    let (batch, r) = batch_with_recipients(&store, "shared", 2, phones.clone()).await;
    let per_round = 2 * SHARED + 1;
    let chunk = |from: usize, to: usize| PreparedChunk {
        messages: (from..to)
            .map(|k| {
                // The repeated number's second row would be stored with 2 segments.
                let segments = if k % per_round == SHARED { 2 } else { 1 };
                message(batch.id, (k % 2) as i32, r[k], &phones[k], segments)
            })
            .collect(),
        last_recipient_id: r[to - 1],
        processed: (to - from) as i64,
        invalid: 0,
        repeats: None,
    };
    let run = store.begin_preparation_run(batch.id).await.expect("run");
    let mut done_up_to = 0;
    for round in 0..ROUNDS {
        let start = round * per_round;
        let (a_end, b_end) = (start + SHARED + 1, start + per_round);
        let (a, b) = tokio::join!(
            store.write_prepared_chunk_beside(
                batch.id,
                chunk(start, a_end),
                run,
                Some(r[start]),
                done_up_to
            ),
            store.write_prepared_chunk_beside(
                batch.id,
                chunk(a_end, b_end),
                run,
                Some(r[a_end]),
                done_up_to
            ),
        );
        let (a, b) = (a.expect("chunk A"), b.expect("chunk B"));
        assert_eq!(
            a.inserted + b.inserted,
            SHARED as i64,
            "round {round}: {a:?} {b:?}"
        );
        assert_eq!(
            a.duplicates + b.duplicates,
            SHARED as i64 + 1,
            "round {round}"
        );
        done_up_to = r[b_end - 1];
    }
    let b = store.batch(batch.id).await.expect("batch");
    let kept = (ROUNDS * SHARED) as i64;
    assert_eq!(
        (b.processed, b.valid, b.duplicates, b.segments),
        (phones.len() as i64, kept, phones.len() as i64 - kept, kept)
    );
    let stored = store
        .list_messages(batch.id, None, 0, 10_000)
        .await
        .expect("messages");
    let numbers: std::collections::BTreeSet<&str> =
        stored.iter().map(|m| m.phone.as_str()).collect();
    assert_eq!(
        (stored.len(), numbers.len()),
        (kept as usize, kept as usize)
    );
    assert!(
        stored.iter().all(|m| m.segments == 1),
        "a repeated number kept its first row"
    );
    let totals: i64 = store
        .partitions(batch.id)
        .await
        .expect("partitions")
        .iter()
        .map(|p| p.total)
        .sum();
    assert_eq!(totals, kept);
}

/// A connection of the test's own to the database at `url`, and the task that drives it.
async fn own_connection(
    url: &str,
) -> (
    tokio_postgres::Client,
    tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
) {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("a connection of the test's own");
    (client, tokio::spawn(connection))
}

/// How many other sessions of the database match `condition`. The observer stays outside any
/// transaction: inside one, `pg_stat_activity` would answer the same snapshot every time.
async fn sessions(observer: &tokio_postgres::Client, condition: &str) -> i64 {
    observer
        .query_one(
            &format!(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                 AND pid <> pg_backend_pid() AND ({condition})"
            ),
            &[],
        )
        .await
        .expect("pg_stat_activity")
        .get(0)
}

/// Polls until `sessions(condition)` says `done`, failing with `what` after ten seconds.
async fn wait_for_sessions(
    observer: &tokio_postgres::Client,
    condition: &str,
    done: impl Fn(i64) -> bool,
    what: &str,
) {
    for _ in 0..500 {
        if done(sessions(observer, condition).await) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{what}");
}

/// Starts writing `chunk` and waits until the write waits on another transaction's lock.
async fn write_held_up(
    store: &Store,
    observer: &tokio_postgres::Client,
    batch_id: i64,
    chunk: PreparedChunk,
) -> tokio::task::JoinHandle<Result<ChunkWritten, StoreError>> {
    let write = tokio::spawn({
        let store = store.clone();
        async move { store.write_prepared_chunk(batch_id, chunk).await }
    });
    wait_for_sessions(
        observer,
        "wait_event_type = 'Lock'",
        |n| n > 0,
        "the chunk's write never waited on the other writer",
    )
    .await;
    write
}

/// A chunk of a batch's first three recipients `r`, numbered `phone(1)`..`phone(3)`, in
/// partition 0 with `segments` each.
fn three_numbers(
    batch_id: i64,
    r: &[i64],
    phone: impl Fn(u32) -> String,
    segments: i32,
) -> PreparedChunk {
    PreparedChunk {
        messages: (0..3)
            .map(|i| message(batch_id, 0, r[i], &phone(i as u32 + 1), segments))
            .collect(),
        last_recipient_id: r[2],
        processed: 3,
        invalid: 0,
        repeats: None,
    }
}

/// Another writer's uncommitted row for `phone` (one segment), in a transaction left open on
/// `other`.
async fn hold_number(
    other: &tokio_postgres::Client,
    batch_id: i64,
    recipient_id: i64,
    phone: &str,
) {
    other.batch_execute("BEGIN").await.expect("begin");
    other
        .execute(
            "INSERT INTO messages (batch_id, partition, recipient_id, phone, body, encoding, \
             segments, updated_at) VALUES ($1, 0, $2, $3, 'other', 'gsm7', 1, now())",
            &[&batch_id, &recipient_id, &phone],
        )
        .await
        .expect("the other writer's row");
}

/// On PostgreSQL a chunk's numbers are looked up and its rows copied in, without `ON CONFLICT`.
/// A number that another writer inserts before the copy and commits while the copy waits on it
/// is still kept once: the chunk counts it as a duplicate, and nothing fails or is stored twice.
#[test]
fn a_number_committed_while_a_chunk_is_copied_is_kept_once_postgres() {
    store_support::run_with_url(Backend::Postgres, |store, url| async move {
        let phone = |n: u32| format!("+8613600000{n:03}");
        let (batch, r) =
            batch_with_recipients(&store, "copy-race", 1, (1..=3).map(phone).collect()).await;
        let (other, driver) = own_connection(&url).await;
        let (observer, observer_driver) = own_connection(&url).await;
        hold_number(&other, batch.id, r[2], &phone(3)).await;
        let chunk = three_numbers(batch.id, &r, phone, 2);
        // The chunk's write waits on the other writer's uncommitted number.
        let write = write_held_up(&store, &observer, batch.id, chunk).await;
        other.batch_execute("COMMIT").await.expect("commit");
        let written = write.await.expect("the write task").expect("the chunk");
        assert_eq!(
            written,
            ChunkWritten {
                inserted: 2,
                duplicates: 1,
                opted_out: 0
            }
        );
        let b = store.batch(batch.id).await.expect("batch");
        assert_eq!((b.processed, b.valid, b.duplicates), (3, 2, 1));
        // The other writer's row (one segment) stays; the chunk's own rows have two.
        let stored = all_messages(&store, batch.id).await;
        assert_eq!(
            stored
                .iter()
                .map(|m| (m.phone.clone(), m.segments))
                .collect::<Vec<_>>(),
            vec![(phone(3), 1), (phone(1), 2), (phone(2), 2)]
        );
        assert_eq!(b.segments, 4);
        assert_eq!(
            store.checkpoint(batch.id, "preparation").await.expect("cp"),
            r[2]
        );
        drop((other, observer));
        driver.await.expect("driver").expect("connection");
        observer_driver.await.expect("driver").expect("connection");
    });
}

/// A run that starts while a chunk of the run before it is being written on PostgreSQL: the
/// chunk, held up on another writer's number, finds a newer run when it comes to record itself,
/// and rolls back whole. The new run, reading the checkpoint, has nothing behind its back.
#[test]
fn a_chunk_of_an_earlier_run_is_rolled_back_postgres() {
    store_support::run_with_url(Backend::Postgres, |store, url| async move {
        let phone = |n: u32| format!("+8613400000{n:03}");
        let (batch, r) =
            batch_with_recipients(&store, "stale-run", 1, (1..=3).map(phone).collect()).await;
        let (other, driver) = own_connection(&url).await;
        let (observer, observer_driver) = own_connection(&url).await;
        hold_number(&other, batch.id, r[2], &phone(3)).await;
        let chunk = three_numbers(batch.id, &r, phone, 1);
        let stale = write_held_up(&store, &observer, batch.id, chunk).await;
        store
            .begin_preparation_run(batch.id)
            .await
            .expect("a new run starts while the chunk waits");
        other.batch_execute("ROLLBACK").await.expect("rollback");
        let refused = stale.await.expect("the write task");
        assert!(
            matches!(refused, Err(StoreError::Superseded(_))),
            "{refused:?}"
        );
        assert!(all_messages(&store, batch.id).await.is_empty());
        let b = store.batch(batch.id).await.expect("batch");
        assert_eq!((b.processed, b.valid, b.segments), (0, 0, 0));
        assert_eq!(
            store.checkpoint(batch.id, "preparation").await.expect("cp"),
            0
        );
        drop((other, observer));
        driver.await.expect("driver").expect("connection");
        observer_driver.await.expect("driver").expect("connection");
    });
}

/// A run that starts while a chunk of the run before it is recording itself on PostgreSQL
/// (both wait on the batch's row): whichever goes first, the new run never reads a checkpoint
/// that the old chunk moves afterwards. Either the chunk commits first and the checkpoint read
/// after the new run's start includes it, or it finds the newer run and stores nothing.
#[test]
fn a_run_starting_beside_a_recording_chunk_sees_it_or_stops_it_postgres() {
    store_support::run_with_url(Backend::Postgres, |store, url| async move {
        let phone = |n: u32| format!("+8613300000{n:03}");
        let (batch, r) =
            batch_with_recipients(&store, "recording", 1, (1..=3).map(phone).collect()).await;
        let (other, driver) = own_connection(&url).await;
        let (observer, observer_driver) = own_connection(&url).await;
        // Another session holds the batch's row: the chunk's record waits for it.
        other.batch_execute("BEGIN").await.expect("begin");
        other
            .execute(
                "SELECT 1 FROM batches WHERE id = $1 FOR UPDATE",
                &[&batch.id],
            )
            .await
            .expect("lock the batch row");
        let chunk = three_numbers(batch.id, &r, phone, 1);
        let old = write_held_up(&store, &observer, batch.id, chunk).await;
        let new_run = tokio::spawn({
            let store = store.clone();
            async move {
                store.begin_preparation_run(batch.id).await.expect("run");
                store.checkpoint(batch.id, "preparation").await.expect("cp")
            }
        });
        wait_for_sessions(
            &observer,
            "wait_event_type = 'Lock'",
            |n| n >= 2,
            "the new run never waited on the batch's row",
        )
        .await;
        other.batch_execute("COMMIT").await.expect("commit");
        let written = old.await.expect("the write task");
        let checkpoint = new_run.await.expect("the run task");
        let b = store.batch(batch.id).await.expect("batch");
        match written {
            Ok(_) => {
                assert_eq!(checkpoint, r[2], "the new run reads the chunk's checkpoint");
                assert_eq!((b.processed, b.valid), (3, 3));
            }
            Err(StoreError::Superseded(_)) => {
                assert_eq!(checkpoint, 0);
                assert_eq!((b.processed, b.valid), (0, 0));
                assert!(all_messages(&store, batch.id).await.is_empty());
            }
            Err(e) => panic!("the chunk's write failed: {e}"),
        }
        drop((other, observer));
        driver.await.expect("driver").expect("connection");
        observer_driver.await.expect("driver").expect("connection");
    });
}

/// A chunk's write on PostgreSQL dropped half-way (its writer stopped, as a pause stops
/// preparation) ends its transaction there and then: no session is left holding what it had
/// written, and the chunk written again is stored whole.
#[test]
fn a_chunk_write_dropped_half_way_leaves_no_transaction_behind_postgres() {
    store_support::run_with_url(Backend::Postgres, |store, url| async move {
        let phone = |n: u32| format!("+8613500000{n:03}");
        let (batch, r) =
            batch_with_recipients(&store, "copy-dropped", 1, (1..=3).map(phone).collect()).await;
        let chunk = || three_numbers(batch.id, &r, phone, 1);
        let (other, driver) = own_connection(&url).await;
        let (observer, observer_driver) = own_connection(&url).await;
        // Holds the third number, so that the chunk's write stops half-way and waits.
        hold_number(&other, batch.id, r[2], &phone(3)).await;
        let write = write_held_up(&store, &observer, batch.id, chunk()).await;
        write.abort();
        assert!(write.await.expect_err("aborted").is_cancelled());
        other.batch_execute("ROLLBACK").await.expect("rollback");
        // Only idle sessions are left: the pool's, and none in a transaction.
        wait_for_sessions(
            &observer,
            "state <> 'idle'",
            |n| n == 0,
            "the dropped write's transaction stayed open",
        )
        .await;
        assert!(all_messages(&store, batch.id).await.is_empty());
        let written = store
            .write_prepared_chunk(batch.id, chunk())
            .await
            .expect("the chunk, again");
        assert_eq!(
            written,
            ChunkWritten {
                inserted: 3,
                duplicates: 0,
                opted_out: 0
            }
        );
        let b = store.batch(batch.id).await.expect("batch");
        assert_eq!((b.processed, b.valid, b.duplicates), (3, 3, 0));
        drop((other, observer));
        driver.await.expect("driver").expect("connection");
        observer_driver.await.expect("driver").expect("connection");
    });
}

/// Preparation tells a chunk which of its numbers may repeat one the batch already has
/// (`repeats`). Told right, the repeats are dropped; told wrong (a repeat left out), the repeat
/// is still dropped, not stored twice and not an error.
async fn a_chunk_told_which_numbers_may_repeat_keeps_each_once(store: Store) {
    let phone = |n: u32| format!("+8613400000{n:03}");
    let phones = [1, 2, 2, 3, 1, 4].map(phone).to_vec();
    let (batch, r) = batch_with_recipients(&store, "repeats", 1, phones.clone()).await;
    let chunk = |from: usize, to: usize, repeats: &[u32]| PreparedChunk {
        messages: (from..to)
            .map(|i| message(batch.id, 0, r[i], &phones[i], 1))
            .collect(),
        last_recipient_id: r[to - 1],
        processed: (to - from) as i64,
        invalid: 0,
        repeats: Some(repeats.iter().map(|&n| phone(n)).collect()),
    };
    let written = |inserted, duplicates| ChunkWritten {
        inserted,
        duplicates,
        opted_out: 0,
    };
    // Numbers 1 and 2 (2 twice): nothing may repeat an earlier chunk's.
    let first = store
        .write_prepared_chunk(batch.id, chunk(0, 3, &[]))
        .await
        .expect("first chunk");
    assert_eq!(first, written(2, 1));
    // Number 3, and 1 again: told right.
    let second = store
        .write_prepared_chunk(batch.id, chunk(3, 5, &[1]))
        .await
        .expect("second chunk");
    assert_eq!(second, written(1, 1));
    // Number 4, and 1 again: told wrong.
    let mut third = chunk(5, 6, &[]);
    third
        .messages
        .push(message(batch.id, 0, r[5], &phone(1), 1));
    let third = store
        .write_prepared_chunk(batch.id, third)
        .await
        .expect("third chunk");
    assert_eq!(third, written(1, 1));
    let stored: BTreeSet<String> = all_messages(&store, batch.id)
        .await
        .into_iter()
        .map(|m| m.phone)
        .collect();
    assert_eq!(stored, [1, 2, 3, 4].map(phone).into_iter().collect());
    let b = store.batch(batch.id).await.expect("batch");
    assert_eq!((b.processed, b.valid, b.duplicates), (6, 4, 3));
}

/// A chunk larger than SQLite's bind-variable limit (32766) is written like any other: the
/// preparation's `batch_size` is configurable and only has to be positive.
async fn large_prepared_chunk_is_written(store: Store) {
    const N: usize = 40_000;
    let batch = create(&store, "large", 4).await;
    let phones: Vec<String> = (0..N).map(|i| format!("+86131{i:08}")).collect();
    store
        .add_opt_outs(&[phones[7].clone(), phones[N - 1].clone()])
        .await
        .expect("add_opt_outs");
    let messages: Vec<NewMessage> = phones
        .iter()
        .enumerate()
        .map(|(i, p)| message(batch.id, (i % 4) as i32, i as i64 + 1, p, 1))
        .collect();
    let written = store
        .write_prepared_chunk(
            batch.id,
            PreparedChunk {
                messages,
                last_recipient_id: N as i64,
                processed: N as i64,
                invalid: 0,
                repeats: None,
            },
        )
        .await
        .expect("a chunk of 40,000 messages is written");
    assert_eq!(
        written,
        ChunkWritten {
            inserted: N as i64 - 2,
            duplicates: 0,
            opted_out: 2
        }
    );
    let b = store.batch(batch.id).await.expect("batch");
    assert_eq!(
        (b.valid, b.opted_out, b.segments),
        (N as i64 - 2, 2, N as i64 - 2)
    );
    assert_eq!(
        counters(&store, batch.id)
            .await
            .iter()
            .map(|c| c.0)
            .collect::<Vec<_>>(),
        vec![10_000, 10_000, 10_000, 9_998]
    );
}

// ---------------------------------------------------------------------------------------------
// 6. next_task_ids / claim
// ---------------------------------------------------------------------------------------------

/// A worker claims a task's range a slice at a time: each claim takes the next `limit` pending
/// messages in id order, and nothing twice.
async fn claims_slice_a_range_in_id_order(store: Store) {
    let batch = create(&store, "slices", 1).await;
    let spec: Vec<(i32, String)> = (0..7).map(|i| (0, format!("+861390001{i:04}"))).collect();
    let spec_ref: Vec<(i32, &str)> = spec.iter().map(|(p, s)| (*p, s.as_str())).collect();
    let ids = seed(&store, batch.id, &spec_ref).await;
    let (first, last) = (ids[0], ids[6]);
    let mut slices = Vec::new();
    let mut from = first;
    loop {
        let claimed = store
            .claim(batch.id, 0, from, last, 3, "test-instance")
            .await
            .expect("claim slice");
        let Some(end) = claimed.last().map(|m| m.id) else {
            break;
        };
        slices.push(claimed.iter().map(|m| m.id).collect::<Vec<_>>());
        from = end + 1;
    }
    assert_eq!(
        slices,
        vec![ids[0..3].to_vec(), ids[3..6].to_vec(), ids[6..7].to_vec()]
    );
    assert!(
        store
            .claim(batch.id, 0, first, last, 3, "test-instance")
            .await
            .expect("again")
            .is_empty(),
        "every message is sending: nothing left to claim"
    );
}

async fn claim_moves_pending_to_sending_once(store: Store) {
    let batch = create(&store, "claim", 2).await;
    // Partitions interleave in id order: p0 p1 p0 p0 p1 p0 p0 p1 p0.
    let spec: Vec<(i32, String)> = [0, 1, 0, 0, 1, 0, 0, 1, 0]
        .iter()
        .enumerate()
        .map(|(i, p)| (*p, format!("+861390000{i:04}")))
        .collect();
    let spec_ref: Vec<(i32, &str)> = spec.iter().map(|(p, s)| (*p, s.as_str())).collect();
    let ids = seed(&store, batch.id, &spec_ref).await;
    let p0: Vec<i64> = ids
        .iter()
        .zip(&spec)
        .filter(|(_, s)| s.0 == 0)
        .map(|(i, _)| *i)
        .collect();
    let p1: Vec<i64> = ids
        .iter()
        .zip(&spec)
        .filter(|(_, s)| s.0 == 1)
        .map(|(i, _)| *i)
        .collect();
    assert_eq!((p0.len(), p1.len()), (6, 3));

    // next_task_ids pages each partition in id order.
    let task1 = store
        .next_task_ids(batch.id, 0, 0, 4, false)
        .await
        .expect("task 1");
    assert_eq!(task1, p0[0..4]);
    let task2 = store
        .next_task_ids(batch.id, 0, task1[3], 4, false)
        .await
        .expect("task 2");
    assert_eq!(task2, p0[4..6]);
    assert!(
        store
            .next_task_ids(batch.id, 0, p0[5], 4, false)
            .await
            .expect("end")
            .is_empty()
    );
    assert_eq!(
        store
            .next_task_ids(batch.id, 1, 0, 10, false)
            .await
            .expect("p1"),
        p1
    );
    let other = create(&store, "other", 2).await;
    assert!(
        store
            .next_task_ids(other.id, 0, 0, 10, false)
            .await
            .expect("other")
            .is_empty()
    );
    // A full delivery round hands out each partition's id range, from its first to its last id.
    assert_eq!(
        store
            .message_id_bounds(batch.id, 0)
            .await
            .expect("p0 bounds"),
        Some((p0[0], p0[5]))
    );
    assert_eq!(
        store
            .message_id_bounds(batch.id, 1)
            .await
            .expect("p1 bounds"),
        Some((p1[0], p1[2]))
    );
    assert_eq!(
        store
            .message_id_bounds(other.id, 0)
            .await
            .expect("other bounds"),
        None
    );

    // Claim task 1: its range also covers p1 ids, which stay untouched.
    let mut claimed = store
        .claim(batch.id, 0, task1[0], task1[3], i64::MAX, "test-instance")
        .await
        .expect("claim");
    claimed.sort_by_key(|m| m.id);
    assert_eq!(claimed.iter().map(|m| m.id).collect::<Vec<_>>(), task1);
    for m in &claimed {
        let (_, phone) = spec[ids.iter().position(|i| *i == m.id).expect("known id")].clone();
        assert_eq!(m.phone, phone);
        assert_eq!(m.body, format!("Hello {phone}"));
        assert_eq!(m.attempts, 1, "the claim counts the attempt");
    }
    let sending = store
        .list_messages(batch.id, Some(MessageStatus::Sending), 0, 100)
        .await
        .expect("sending");
    assert_eq!(ids_of(&sending), task1);
    assert!(sending.iter().all(|m| m.attempts == 1));
    let pending = store
        .list_messages(batch.id, Some(MessageStatus::Pending), 0, 100)
        .await
        .expect("pending");
    assert!(pending.iter().all(|m| m.attempts == 0));
    assert_eq!(pending.len(), 5);

    // The same task delivered again claims nothing.
    assert!(
        store
            .claim(batch.id, 0, task1[0], task1[3], i64::MAX, "test-instance")
            .await
            .expect("claim again")
            .is_empty(),
        "a task delivered twice sends nothing twice"
    );
    // Claimed messages are no longer offered to new tasks.
    assert_eq!(
        store
            .next_task_ids(batch.id, 0, 0, 10, false)
            .await
            .expect("p0"),
        p0[4..6]
    );

    // The id range bounds the claim (inclusive on both ends).
    let one = store
        .claim(batch.id, 0, p0[4], p0[4], i64::MAX, "test-instance")
        .await
        .expect("claim one");
    assert_eq!(one.iter().map(|m| m.id).collect::<Vec<_>>(), vec![p0[4]]);
    // Another batch or another partition claims nothing of these.
    assert!(
        store
            .claim(other.id, 0, 0, i64::MAX, i64::MAX, "test-instance")
            .await
            .expect("other")
            .is_empty()
    );
    assert!(
        store
            .claim(batch.id, 1, p0[5], p0[5], i64::MAX, "test-instance")
            .await
            .expect("wrong partition")
            .is_empty()
    );
    let mut rest1 = store
        .claim(batch.id, 1, 0, i64::MAX, i64::MAX, "test-instance")
        .await
        .expect("p1");
    rest1.sort_by_key(|m| m.id);
    assert_eq!(rest1.iter().map(|m| m.id).collect::<Vec<_>>(), p1);

    let expected: Vec<(i64, MessageStatus)> = ids
        .iter()
        .map(|id| (*id, if *id == p0[5] { PENDING } else { SENDING }))
        .collect();
    assert_eq!(statuses(&store, batch.id).await, expected);
    assert_eq!(
        counters(&store, batch.id).await,
        vec![(6, 0, 0, 0, 0), (3, 0, 0, 0, 0)],
        "claims do not touch the counters"
    );
}

async fn concurrent_claims_hand_out_each_message_once(store: Store) {
    let batch = create(&store, "race", 1).await;
    let phones: Vec<String> = (0..60).map(|i| format!("+861370000{i:04}")).collect();
    let spec: Vec<(i32, &str)> = phones.iter().map(|p| (0, p.as_str())).collect();
    let ids = seed(&store, batch.id, &spec).await;
    let (first, last) = (ids[0], ids[59]);

    // Eight workers receive overlapping tasks at once.
    let mut handles = Vec::new();
    for w in 0..8i64 {
        let store = store.clone();
        let (lo, hi) = if w % 2 == 0 {
            (first, last)
        } else {
            (first + w, last - w)
        };
        handles.push(tokio::spawn(async move {
            store
                .claim(batch.id, 0, lo, hi, i64::MAX, "test-instance")
                .await
                .expect("claim")
        }));
    }
    let mut seen = Vec::new();
    for h in handles {
        seen.extend(h.await.expect("claim task").into_iter().map(|m| {
            assert_eq!(m.attempts, 1, "no message is claimed twice");
            m.id
        }));
    }
    seen.sort_unstable();
    assert_eq!(seen, ids, "every message is claimed exactly once");
    assert!(
        statuses(&store, batch.id)
            .await
            .iter()
            .all(|(_, s)| *s == SENDING)
    );
}

// ---------------------------------------------------------------------------------------------
// 7. record_outcomes
// ---------------------------------------------------------------------------------------------

/// `n` messages numbered `<prefix>0000`, `<prefix>0001`…, all in partition 0 but the last, which
/// is in partition 1; their ids.
async fn seed_last_apart(store: &Store, batch_id: i64, prefix: &str, n: usize) -> Vec<i64> {
    let phones: Vec<String> = (0..n).map(|i| format!("{prefix}{i:04}")).collect();
    let spec: Vec<(i32, &str)> = phones
        .iter()
        .enumerate()
        .map(|(i, p)| (i32::from(i + 1 == n), p.as_str()))
        .collect();
    seed(store, batch_id, &spec).await
}

/// A slice whose every message was sent: PostgreSQL records it (messages and counter) in one
/// statement; the outcome must be the same as through the general path on either backend.
async fn a_slice_sent_whole_is_recorded_exactly(store: Store) {
    let batch = create(&store, "sent-whole", 2).await;
    // m0..m4 in partition 0, m5 in partition 1.
    let m = seed_last_apart(&store, batch.id, "+861370000", 6).await;
    let claimed = store
        .claim(batch.id, 0, m[0], m[2], i64::MAX, "test-instance")
        .await
        .expect("claim");
    assert_eq!(claimed.len(), 3);
    store
        .claim(batch.id, 1, m[5], m[5], i64::MAX, "test-instance")
        .await
        .expect("claim in partition 1");
    let outcomes = Outcomes {
        sent: vec![
            (m[0], Some("gw-0".into())),
            (m[1], None),
            (m[2], Some("gw-2".into())),
            // Not sending: stays pending and is not counted.
            (m[3], Some("x".into())),
            // Sending, but in partition 1: recorded under partition 0, it changes nothing.
            (m[5], None),
        ],
        ..Outcomes::default()
    };
    store
        .record_outcomes(batch.id, 0, &outcomes)
        .await
        .expect("record_outcomes");
    let row = |id| {
        let store = store.clone();
        async move { message_by_id(&store, batch.id, id).await }
    };
    let r0 = row(m[0]).await;
    assert_eq!(
        (r0.status, r0.provider_message_id.as_deref()),
        (SENT, Some("gw-0"))
    );
    let r1 = row(m[1]).await;
    assert_eq!((r1.status, r1.provider_message_id.as_deref()), (SENT, None));
    let r2 = row(m[2]).await;
    assert_eq!(
        (r2.status, r2.provider_message_id.as_deref()),
        (SENT, Some("gw-2"))
    );
    let r3 = row(m[3]).await;
    assert_eq!((r3.status, r3.provider_message_id), (PENDING, None));
    assert_eq!(row(m[5]).await.status, SENDING);
    assert_eq!(
        counters(&store, batch.id).await,
        vec![(5, 3, 0, 0, 0), (1, 0, 0, 0, 0)]
    );
    // Recording the same slice again (a redelivered task) counts nothing twice.
    store
        .record_outcomes(batch.id, 0, &outcomes)
        .await
        .expect("record_outcomes again");
    assert_eq!(
        counters(&store, batch.id).await,
        vec![(5, 3, 0, 0, 0), (1, 0, 0, 0, 0)]
    );
}

/// On PostgreSQL a slice sent whole is recorded in the statement that claims the next slice; on
/// SQLite, and for a slice with other outcomes, the store declines and changes nothing (the
/// worker then records and claims apart).
async fn a_slice_is_recorded_with_the_next_claim(store: Store) {
    let batch = create(&store, "record-and-claim", 2).await;
    // m0..m4 in partition 0, m5 in partition 1.
    let m = seed_last_apart(&store, batch.id, "+861350000", 6).await;
    let first = store
        .claim(batch.id, 0, m[0], m[4], 2, "test-instance")
        .await
        .expect("claim");
    assert_eq!(first.iter().map(|c| c.id).collect::<Vec<_>>(), [m[0], m[1]]);

    // A slice with a failure is not for this path, on either backend.
    let mixed = Outcomes {
        sent: vec![(m[0], None)],
        failed: vec![(m[1], "rejected".into())],
        ..Outcomes::default()
    };
    let declined = store
        .record_sent_and_claim(batch.id, 0, &mixed, m[2], m[4], 2, "test-instance")
        .await
        .expect("record_sent_and_claim");
    assert!(declined.is_none());
    let before = statuses(&store, batch.id).await;
    assert_eq!(
        before.iter().map(|&(_, s)| s).collect::<Vec<_>>(),
        [SENDING, SENDING, PENDING, PENDING, PENDING, PENDING]
    );

    let whole = Outcomes {
        sent: vec![(m[0], Some("gw-0".into())), (m[1], None)],
        ..Outcomes::default()
    };
    let next = store
        .record_sent_and_claim(batch.id, 0, &whole, m[2], m[4], 2, "test-instance")
        .await
        .expect("record_sent_and_claim");
    match store.backend() {
        StoreBackend::Sqlite => {
            assert!(next.is_none());
            assert_eq!(statuses(&store, batch.id).await, before);
            assert_eq!(counters(&store, batch.id).await[0].1, 0);
        }
        StoreBackend::Postgres => {
            let next = next.expect("PostgreSQL records and claims together");
            assert_eq!(next.iter().map(|c| c.id).collect::<Vec<_>>(), [m[2], m[3]]);
            assert!(
                next.iter()
                    .all(|c| c.attempts == 1 && c.phone.starts_with("+86135"))
            );
            assert_eq!(
                statuses(&store, batch.id).await,
                vec![
                    (m[0], SENT),
                    (m[1], SENT),
                    (m[2], SENDING),
                    (m[3], SENDING),
                    (m[4], PENDING),
                    (m[5], PENDING),
                ]
            );
            let r0 = message_by_id(&store, batch.id, m[0]).await;
            assert_eq!(r0.provider_message_id.as_deref(), Some("gw-0"));
            assert_eq!(counters(&store, batch.id).await[0].1, 2);
            // The same slice again (a redelivered task): nothing counted twice, and the claim
            // finds only what is still pending.
            let again = store
                .record_sent_and_claim(batch.id, 0, &whole, m[2], m[4], 2, "test-instance")
                .await
                .expect("record_sent_and_claim again")
                .expect("PostgreSQL records and claims together");
            assert_eq!(again.iter().map(|c| c.id).collect::<Vec<_>>(), [m[4]]);
            assert_eq!(counters(&store, batch.id).await[0].1, 2);
        }
    }
}

async fn record_outcomes_moves_messages_and_counters(store: Store) {
    let batch = create(&store, "outcomes", 2).await;
    // m0..m6 in partition 0, m7 in partition 1.
    let m = seed_last_apart(&store, batch.id, "+861360000", 8).await;
    // Claim m0..m5; m6 stays pending.
    let claimed = store
        .claim(batch.id, 0, m[0], m[5], i64::MAX, "test-instance")
        .await
        .expect("claim");
    assert_eq!(claimed.len(), 6);

    let due = whole_second(ChronoDuration::hours(1));
    let outcomes = Outcomes {
        sent: vec![
            (m[0], Some("prov-0".into())),
            (m[1], None),
            (m[6], Some("x".into())),
        ],
        failed: vec![(m[2], "rejected: blocked number".into())],
        retry: vec![(m[3], due, "throttled".into())],
        released: vec![m[4]],
        cancelled: vec![m[5]],
    };
    assert_eq!(outcomes.len(), 7);
    store
        .record_outcomes(batch.id, 0, &outcomes)
        .await
        .expect("record_outcomes");

    let row = |id| {
        let store = store.clone();
        async move { message_by_id(&store, batch.id, id).await }
    };
    let r0 = row(m[0]).await;
    assert_eq!((r0.status, r0.attempts), (SENT, 1));
    assert_eq!(r0.provider_message_id.as_deref(), Some("prov-0"));
    assert_eq!(r0.error, None);
    let r1 = row(m[1]).await;
    assert_eq!(
        (r1.status, r1.attempts, r1.provider_message_id),
        (SENT, 1, None)
    );
    let r2 = row(m[2]).await;
    assert_eq!((r2.status, r2.attempts), (FAILED, 1));
    assert_eq!(r2.error.as_deref(), Some("rejected: blocked number"));
    let r3 = row(m[3]).await;
    assert_eq!(
        (r3.status, r3.attempts),
        (PENDING, 1),
        "a retry keeps its attempt"
    );
    assert_eq!(r3.error.as_deref(), Some("throttled"));
    let r4 = row(m[4]).await;
    assert_eq!(
        (r4.status, r4.attempts),
        (PENDING, 0),
        "a release undoes the attempt"
    );
    let r5 = row(m[5]).await;
    assert_eq!((r5.status, r5.attempts), (CANCELLED, 1));
    let r6 = row(m[6]).await;
    assert_eq!(
        (r6.status, r6.attempts, r6.provider_message_id),
        (PENDING, 0, None),
        "an outcome for a message that is not sending changes nothing"
    );
    assert_eq!(
        counters(&store, batch.id).await,
        vec![(7, 2, 0, 1, 1), (1, 0, 0, 0, 0)]
    );

    // The retry waits: not offered, not claimable, and reported by earliest_retry.
    assert_eq!(
        store
            .next_task_ids(batch.id, 0, 0, 100, false)
            .await
            .expect("next"),
        vec![m[4], m[6]]
    );
    assert_eq!(
        store.earliest_retry(batch.id).await.expect("earliest"),
        Some(due)
    );
    let mut again = store
        .claim(batch.id, 0, m[0], m[6], i64::MAX, "test-instance")
        .await
        .expect("claim");
    again.sort_by_key(|c| c.id);
    assert_eq!(
        again.iter().map(|c| (c.id, c.attempts)).collect::<Vec<_>>(),
        vec![(m[4], 1), (m[6], 1)],
        "only due pending messages are claimed"
    );
    assert_eq!(row(m[3]).await.status, PENDING);

    // The same outcomes recorded again (a retried commit) change nothing.
    let before = statuses(&store, batch.id).await;
    store
        .record_outcomes(
            batch.id,
            0,
            &Outcomes {
                sent: vec![
                    (m[0], Some("prov-0-bis".into())),
                    (m[2], None),
                    (m[3], None),
                ],
                failed: vec![(m[1], "late".into()), (m[5], "late".into())],
                retry: vec![(m[0], due, "late".into())],
                released: vec![m[2], m[3]],
                cancelled: vec![m[0], m[1], m[3]],
            },
        )
        .await
        .expect("record final messages again");
    assert_eq!(statuses(&store, batch.id).await, before);
    assert_eq!(
        row(m[0]).await.provider_message_id.as_deref(),
        Some("prov-0")
    );
    assert_eq!(row(m[1]).await.error, None);
    assert_eq!(row(m[3]).await.attempts, 1);
    assert_eq!(
        counters(&store, batch.id).await,
        vec![(7, 2, 0, 1, 1), (1, 0, 0, 0, 0)],
        "counters move only for messages that were sending"
    );

    // Empty outcomes are a no-op.
    store
        .record_outcomes(batch.id, 0, &Outcomes::default())
        .await
        .expect("empty outcomes");

    // The partition argument picks the counters: partition 1's message m7.
    let c7 = store
        .claim(batch.id, 1, m[7], m[7], i64::MAX, "test-instance")
        .await
        .expect("claim m7");
    assert_eq!(c7.len(), 1);
    store
        .record_outcomes(
            batch.id,
            1,
            &Outcomes {
                failed: vec![(m[7], "unreachable".into())],
                ..Outcomes::default()
            },
        )
        .await
        .expect("m7 failed");
    // m4 and m6, claimed above, are sent: two more for partition 0.
    store
        .record_outcomes(
            batch.id,
            0,
            &Outcomes {
                sent: vec![(m[4], Some("prov-4".into())), (m[6], None)],
                ..Outcomes::default()
            },
        )
        .await
        .expect("m4, m6 sent");
    assert_eq!(
        counters(&store, batch.id).await,
        vec![(7, 4, 0, 1, 1), (1, 0, 0, 1, 0)]
    );
    assert_eq!(
        statuses(&store, batch.id).await,
        vec![
            (m[0], SENT),
            (m[1], SENT),
            (m[2], FAILED),
            (m[3], PENDING),
            (m[4], SENT),
            (m[5], CANCELLED),
            (m[6], SENT),
            (m[7], FAILED),
        ]
    );
}

async fn retries_wait_until_due(store: Store) {
    let batch = create(&store, "retries", 1).await;
    let phones: Vec<String> = (0..4).map(|i| format!("+861350000{i:04}")).collect();
    let spec: Vec<(i32, &str)> = phones.iter().map(|p| (0, p.as_str())).collect();
    let m = seed(&store, batch.id, &spec).await;
    assert_eq!(
        store.earliest_retry(batch.id).await.expect("none yet"),
        None
    );

    let claimed = store
        .claim(batch.id, 0, m[0], m[3], i64::MAX, "test-instance")
        .await
        .expect("claim");
    assert_eq!(claimed.len(), 4);
    let later = whole_second(ChronoDuration::hours(2));
    let sooner = whole_second(ChronoDuration::minutes(30));
    let past = whole_second(ChronoDuration::seconds(-5));
    store
        .record_outcomes(
            batch.id,
            0,
            &Outcomes {
                retry: vec![
                    (m[0], later, "busy".into()),
                    (m[1], sooner, "busy".into()),
                    (m[2], past, "busy".into()),
                ],
                sent: vec![(m[3], None)],
                ..Outcomes::default()
            },
        )
        .await
        .expect("retries");
    assert_eq!(
        store.earliest_retry(batch.id).await.expect("earliest"),
        Some(past),
        "the earliest pending retry, due or not"
    );
    // Only the retry whose time has come is offered and claimable.
    assert_eq!(
        store
            .next_task_ids(batch.id, 0, 0, 10, false)
            .await
            .expect("due"),
        vec![m[2]]
    );
    let c = store
        .claim(batch.id, 0, m[0], m[3], i64::MAX, "test-instance")
        .await
        .expect("claim due");
    assert_eq!(
        c.iter().map(|c| (c.id, c.attempts)).collect::<Vec<_>>(),
        vec![(m[2], 2)],
        "the second attempt"
    );
    store
        .record_outcomes(
            batch.id,
            0,
            &Outcomes {
                sent: vec![(m[2], Some("p2".into()))],
                ..Outcomes::default()
            },
        )
        .await
        .expect("sent on retry");
    let r2 = message_by_id(&store, batch.id, m[2]).await;
    assert_eq!(
        (r2.status, r2.attempts, r2.error),
        (SENT, 2, None),
        "sent clears the error"
    );
    assert_eq!(
        store.earliest_retry(batch.id).await.expect("earliest"),
        Some(sooner),
        "sent messages no longer count"
    );
    assert!(
        store
            .next_task_ids(batch.id, 0, 0, 10, false)
            .await
            .expect("none due")
            .is_empty()
    );
    assert_eq!(counters(&store, batch.id).await, vec![(4, 2, 0, 0, 0)]);

    // Sub-second due times compare correctly on both backends (SQLite stores them as text).
    let extra = seed(
        &store,
        batch.id,
        &[(0, "+8613500009998"), (0, "+8613500009999")],
    )
    .await;
    store
        .claim(batch.id, 0, extra[0], extra[1], i64::MAX, "test-instance")
        .await
        .expect("claim extra");
    let micros = |t: NaiveDateTime| {
        t.with_nanosecond(t.nanosecond() / 1000 * 1000)
            .expect("valid nanoseconds")
    };
    let just_passed = micros(now() - ChronoDuration::milliseconds(300));
    let soon = micros(now() + ChronoDuration::milliseconds(3000));
    store
        .record_outcomes(
            batch.id,
            0,
            &Outcomes {
                retry: vec![
                    (extra[0], just_passed, "busy".into()),
                    (extra[1], soon, "busy".into()),
                ],
                ..Outcomes::default()
            },
        )
        .await
        .expect("sub-second retries");
    assert_eq!(
        store.earliest_retry(batch.id).await.expect("earliest"),
        Some(just_passed),
        "microseconds survive the round trip"
    );
    assert_eq!(
        store
            .next_task_ids(batch.id, 0, 0, 10, false)
            .await
            .expect("due"),
        vec![extra[0]]
    );
    assert!(
        store
            .claim(batch.id, 0, extra[1], extra[1], i64::MAX, "test-instance")
            .await
            .expect("not yet")
            .is_empty()
    );
    let wait = (soon - now()).to_std().unwrap_or_default() + std::time::Duration::from_millis(100);
    tokio::time::sleep(wait).await;
    assert_eq!(
        store
            .next_task_ids(batch.id, 0, 0, 10, false)
            .await
            .expect("both due"),
        vec![extra[0], extra[1]]
    );
    let c = store
        .claim(batch.id, 0, extra[0], extra[1], i64::MAX, "test-instance")
        .await
        .expect("claim");
    assert_eq!(c.len(), 2);
}

// ---------------------------------------------------------------------------------------------
// 8. cancel_pending, recover_sending
// ---------------------------------------------------------------------------------------------

async fn cancel_pending_and_recover_sending(store: Store) {
    let batch = create(&store, "cancel", 2).await;
    let phones: Vec<String> = (0..8).map(|i| format!("+861340000{i:04}")).collect();
    // p0: m0..m4, p1: m5..m7.
    let spec: Vec<(i32, &str)> = phones
        .iter()
        .enumerate()
        .map(|(i, p)| (if i < 5 { 0 } else { 1 }, p.as_str()))
        .collect();
    let m = seed(&store, batch.id, &spec).await;
    let other = create(&store, "bystander", 2).await;
    let om = seed(
        &store,
        other.id,
        &[(0, "+8613400000000"), (1, "+8613400000001")],
    )
    .await;

    // p0: m0, m1 sending; m2 sent; m3 waiting for a retry; m4 pending. p1: m5 sending.
    assert_eq!(
        store
            .claim(batch.id, 0, m[0], m[3], i64::MAX, "test-instance")
            .await
            .expect("claim")
            .len(),
        4
    );
    assert_eq!(
        store
            .claim(batch.id, 1, m[5], m[5], i64::MAX, "test-instance")
            .await
            .expect("claim")
            .len(),
        1
    );
    store
        .record_outcomes(
            batch.id,
            0,
            &Outcomes {
                sent: vec![(m[2], None)],
                retry: vec![(m[3], whole_second(ChronoDuration::hours(1)), "busy".into())],
                ..Outcomes::default()
            },
        )
        .await
        .expect("outcomes");

    let cancelled = store
        .cancel_pending(batch.id, 2)
        .await
        .expect("cancel_pending");
    assert_eq!(cancelled, 4, "m3, m4, m6, m7");
    assert_eq!(
        statuses(&store, batch.id).await,
        vec![
            (m[0], SENDING),
            (m[1], SENDING),
            (m[2], SENT),
            (m[3], CANCELLED),
            (m[4], CANCELLED),
            (m[5], SENDING),
            (m[6], CANCELLED),
            (m[7], CANCELLED),
        ]
    );
    assert_eq!(
        counters(&store, batch.id).await,
        vec![(5, 1, 0, 0, 2), (3, 0, 0, 0, 2)]
    );
    assert_eq!(
        store.earliest_retry(batch.id).await.expect("earliest"),
        None
    );
    assert_eq!(
        store.cancel_pending(batch.id, 2).await.expect("again"),
        0,
        "nothing pending is left"
    );
    assert_eq!(
        counters(&store, batch.id).await,
        vec![(5, 1, 0, 0, 2), (3, 0, 0, 0, 2)]
    );

    // At most once: sending messages fail with unknown_outcome.
    let recovered = store
        .settle_orphaned_claims(batch.id, 2, false, &[], None)
        .await
        .expect("recover_sending");
    assert_eq!(recovered, 3);
    for id in [m[0], m[1], m[5]] {
        let row = message_by_id(&store, batch.id, id).await;
        assert_eq!(row.status, FAILED);
        assert_eq!(row.error.as_deref(), Some(UNKNOWN_OUTCOME));
        assert_eq!(row.attempts, 1);
    }
    assert_eq!(
        counters(&store, batch.id).await,
        vec![(5, 1, 0, 2, 2), (3, 0, 0, 1, 2)]
    );
    assert_eq!(
        store
            .settle_orphaned_claims(batch.id, 2, false, &[], None)
            .await
            .expect("again"),
        0
    );
    assert_eq!(
        store
            .settle_orphaned_claims(batch.id, 2, true, &[], None)
            .await
            .expect("again"),
        0
    );
    assert_eq!(
        counters(&store, batch.id).await,
        vec![(5, 1, 0, 2, 2), (3, 0, 0, 1, 2)]
    );
    // Every partition is done.
    let parts = store.partitions(batch.id).await.expect("partitions");
    assert!(parts.iter().all(|p| p.done() == p.total));
    // The unknown outcomes are counted apart within `failed`, once.
    assert_eq!(
        parts
            .iter()
            .map(|p| (p.failed, p.unknown))
            .collect::<Vec<_>>(),
        vec![(2, 2), (1, 1)]
    );

    // The other batch was not touched.
    assert_eq!(
        statuses(&store, other.id).await,
        vec![(om[0], PENDING), (om[1], PENDING)]
    );
    assert_eq!(
        counters(&store, other.id).await,
        vec![(1, 0, 0, 0, 0), (1, 0, 0, 0, 0)]
    );
}

async fn recover_sending_for_resend(store: Store) {
    let batch = create(&store, "resend", 2).await;
    let m = seed(
        &store,
        batch.id,
        &[
            (0, "+8613300000000"),
            (0, "+8613300000001"),
            (1, "+8613300000002"),
            (1, "+8613300000003"),
        ],
    )
    .await;
    assert_eq!(
        store
            .claim(batch.id, 0, m[0], m[1], i64::MAX, "test-instance")
            .await
            .expect("claim")
            .len(),
        2
    );
    assert_eq!(
        store
            .claim(batch.id, 1, m[2], m[2], i64::MAX, "test-instance")
            .await
            .expect("claim")
            .len(),
        1
    );

    let recovered = store
        .settle_orphaned_claims(batch.id, 2, true, &[], None)
        .await
        .expect("recover_sending");
    assert_eq!(recovered, 3);
    assert_eq!(
        statuses(&store, batch.id).await,
        vec![
            (m[0], PENDING),
            (m[1], PENDING),
            (m[2], PENDING),
            (m[3], PENDING)
        ]
    );
    assert_eq!(
        counters(&store, batch.id).await,
        vec![(2, 0, 0, 0, 0), (2, 0, 0, 0, 0)],
        "resending moves no counter"
    );
    // They are offered and claimed again; the attempt count keeps the lost attempt.
    assert_eq!(
        store
            .next_task_ids(batch.id, 0, 0, 10, false)
            .await
            .expect("p0"),
        vec![m[0], m[1]]
    );
    let mut c = store
        .claim(batch.id, 0, m[0], m[1], i64::MAX, "test-instance")
        .await
        .expect("claim again");
    c.sort_by_key(|c| c.id);
    assert_eq!(
        c.iter().map(|c| (c.id, c.attempts)).collect::<Vec<_>>(),
        vec![(m[0], 2), (m[1], 2)]
    );
    let r2 = message_by_id(&store, batch.id, m[2]).await;
    assert_eq!((r2.attempts, r2.error), (1, None));
}

// ---------------------------------------------------------------------------------------------
// 9. list_messages
// ---------------------------------------------------------------------------------------------

async fn list_messages_pages_and_filters(store: Store) {
    let batch = create(&store, "list", 1).await;
    let phones: Vec<String> = (0..7).map(|i| format!("+861320000{i:04}")).collect();
    let spec: Vec<(i32, &str)> = phones.iter().map(|p| (0, p.as_str())).collect();
    let m = seed(&store, batch.id, &spec).await;
    let other = create(&store, "other", 1).await;
    seed(
        &store,
        other.id,
        &[(0, "+8613200000000"), (0, "+8613200009999")],
    )
    .await;

    // m0, m2, m4 sent; m5 failed; m6 sending; m1, m3 pending.
    store
        .claim(batch.id, 0, m[0], m[6], i64::MAX, "test-instance")
        .await
        .expect("claim");
    store
        .record_outcomes(
            batch.id,
            0,
            &Outcomes {
                sent: vec![(m[0], None), (m[2], Some("p2".into())), (m[4], None)],
                failed: vec![(m[5], "nope".into())],
                released: vec![m[1], m[3]],
                ..Outcomes::default()
            },
        )
        .await
        .expect("outcomes");

    // Paging by 3 with the cursor.
    let page1 = store
        .list_messages(batch.id, None, 0, 3)
        .await
        .expect("page 1");
    assert_eq!(ids_of(&page1), m[0..3]);
    let page2 = store
        .list_messages(batch.id, None, page1[2].id, 3)
        .await
        .expect("page 2");
    assert_eq!(ids_of(&page2), m[3..6]);
    let page3 = store
        .list_messages(batch.id, None, page2[2].id, 3)
        .await
        .expect("page 3");
    assert_eq!(ids_of(&page3), m[6..7]);
    assert!(
        store
            .list_messages(batch.id, None, m[6], 3)
            .await
            .expect("page 4")
            .is_empty()
    );
    assert_eq!(
        page1.iter().map(|r| r.phone.clone()).collect::<Vec<_>>(),
        phones[0..3]
    );
    assert!(page1.iter().all(|r| r.segments == 1));

    // Status filters, with and without the cursor.
    let sent = store
        .list_messages(batch.id, Some(MessageStatus::Sent), 0, 10)
        .await
        .expect("sent");
    assert_eq!(ids_of(&sent), vec![m[0], m[2], m[4]]);
    assert_eq!(sent[1].provider_message_id.as_deref(), Some("p2"));
    let sent_after = store
        .list_messages(batch.id, Some(MessageStatus::Sent), m[0], 1)
        .await
        .expect("sent after m0");
    assert_eq!(ids_of(&sent_after), vec![m[2]]);
    let pending = store
        .list_messages(batch.id, Some(MessageStatus::Pending), 0, 10)
        .await
        .expect("pending");
    assert_eq!(ids_of(&pending), vec![m[1], m[3]]);
    assert!(pending.iter().all(|r| r.attempts == 0));
    let failed = store
        .list_messages(batch.id, Some(MessageStatus::Failed), 0, 10)
        .await
        .expect("failed");
    assert_eq!(ids_of(&failed), vec![m[5]]);
    assert_eq!(failed[0].error.as_deref(), Some("nope"));
    let sending = store
        .list_messages(batch.id, Some(MessageStatus::Sending), 0, 10)
        .await
        .expect("sending");
    assert_eq!(ids_of(&sending), vec![m[6]]);
    assert!(
        store
            .list_messages(batch.id, Some(MessageStatus::Delivered), 0, 10)
            .await
            .expect("delivered")
            .is_empty()
    );
    assert!(
        store
            .list_messages(batch.id, Some(MessageStatus::Cancelled), 0, 10)
            .await
            .expect("cancelled")
            .is_empty()
    );
    assert_eq!(all_messages(&store, other.id).await.len(), 2);
}

// ---------------------------------------------------------------------------------------------
// 10. count_batches_by_state, ping
// ---------------------------------------------------------------------------------------------

async fn count_by_state_and_ping(store: Store) {
    store.ping().await.expect("ping");
    assert!(
        store
            .count_batches_by_state()
            .await
            .expect("count on an empty store")
            .is_empty()
    );
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(create(&store, &format!("c{i}"), 1).await.id);
    }
    set_state(&store, ids[1], "scheduled").await;
    set_state(&store, ids[2], "scheduled").await;
    set_state(&store, ids[3], "cancelled").await;
    let mut counts = store.count_batches_by_state().await.expect("count");
    counts.sort();
    assert_eq!(
        counts,
        vec![
            ("cancelled".to_owned(), 1),
            ("initial".to_owned(), 2),
            ("scheduled".to_owned(), 2),
        ]
    );
    let states: BTreeSet<String> = counts.into_iter().map(|(s, _)| s).collect();
    assert_eq!(states.len(), 3, "one row per state");
    store.ping().await.expect("ping");
}

// 11. Several instances: leases, heartbeats, claims of dead instances.

/// A lease goes to one instance at a time; its holder renews it; an expired one can be taken
/// over; a released one is free; unsupervised active batches are the ones without a live lease.
async fn leases_go_to_one_instance_at_a_time(store: Store) {
    let batch = create(&store, "leased", 1).await;
    let lease = Duration::from_secs(60);
    // Only active batches need a supervisor.
    assert!(store.unsupervised_batches().await.expect("none").is_empty());
    let mut update = LifecycleUpdate::from(&batch.bookkeeping());
    update.state = "delivering".into();
    let batch = store
        .save_lifecycle(batch.id, batch.version, &update)
        .await
        .expect("delivering");
    let ids = |batches: Vec<Batch>| batches.iter().map(|b| b.id).collect::<Vec<_>>();
    assert_eq!(
        ids(store.unsupervised_batches().await.expect("one")),
        vec![batch.id]
    );

    assert!(
        store
            .acquire_lease(batch.id, "a", lease)
            .await
            .expect("a takes it")
    );
    assert!(
        !store
            .acquire_lease(batch.id, "b", lease)
            .await
            .expect("b cannot")
    );
    assert!(
        store
            .acquire_lease(batch.id, "a", lease)
            .await
            .expect("a keeps it")
    );
    assert_eq!(
        store.lease_owner(batch.id).await.expect("owner").as_deref(),
        Some("a")
    );
    assert!(store.unsupervised_batches().await.expect("held").is_empty());
    assert_eq!(
        store.renew_leases("a", lease).await.expect("renew"),
        vec![batch.id]
    );
    assert!(
        store
            .renew_leases("b", lease)
            .await
            .expect("renew")
            .is_empty()
    );

    // A lease that ran out is free for the taking.
    assert!(
        store
            .acquire_lease(batch.id, "a", Duration::ZERO)
            .await
            .expect("shorten")
    );
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(store.lease_owner(batch.id).await.expect("expired"), None);
    assert_eq!(
        ids(store.unsupervised_batches().await.expect("expired")),
        vec![batch.id]
    );
    assert!(
        store
            .acquire_lease(batch.id, "b", lease)
            .await
            .expect("b takes over")
    );
    assert!(
        store
            .renew_leases("a", lease)
            .await
            .expect("a renews")
            .is_empty(),
        "a learns it lost the batch"
    );

    // Released or forgotten, it is free again.
    store
        .release_lease(batch.id, "a")
        .await
        .expect("not a's: no-op");
    assert_eq!(
        store
            .lease_owner(batch.id)
            .await
            .expect("still b")
            .as_deref(),
        Some("b")
    );
    store.heartbeat("b").await.expect("heartbeat");
    store.forget_instance("b").await.expect("forget");
    assert_eq!(store.lease_owner(batch.id).await.expect("free"), None);
    assert!(store.live_instances(lease).await.expect("live").is_empty());
}

/// Only the claims of instances without a recent heartbeat are settled; a live instance's claims
/// are its own to finish.
async fn only_dead_instances_claims_are_settled(store: Store) {
    let batch = create(&store, "orphans", 1).await;
    let phones: Vec<String> = (0..4).map(|i| format!("+861350000{i:04}")).collect();
    let spec: Vec<(i32, &str)> = phones.iter().map(|p| (0, p.as_str())).collect();
    let m = seed(&store, batch.id, &spec).await;
    store.heartbeat("alive").await.expect("heartbeat");
    store
        .claim(batch.id, 0, m[0], m[1], i64::MAX, "alive")
        .await
        .expect("claim");
    store
        .claim(batch.id, 0, m[2], m[3], i64::MAX, "dead")
        .await
        .expect("claim");
    let live = store
        .live_instances(Duration::from_secs(60))
        .await
        .expect("live");
    assert_eq!(live, vec!["alive".to_string()]);
    let settled = store
        .settle_orphaned_claims(batch.id, 1, false, &live, None)
        .await
        .expect("settle");
    assert_eq!(settled, 2);
    assert_eq!(
        statuses(&store, batch.id).await,
        vec![
            (m[0], SENDING),
            (m[1], SENDING),
            (m[2], FAILED),
            (m[3], FAILED)
        ]
    );
    let failed = store
        .list_messages(batch.id, Some(MessageStatus::Failed), 0, 10)
        .await
        .expect("failed");
    assert!(
        failed
            .iter()
            .all(|f| f.error.as_deref() == Some(UNKNOWN_OUTCOME))
    );
    assert_eq!(counters(&store, batch.id).await[0].3, 2, "failed counter");

    // A live instance that knows none of its workers holds a slice settles its own claims made
    // before it looked, and only those.
    let claimed_at = message_by_id(&store, batch.id, m[0]).await.updated_at;
    let second = ChronoDuration::seconds(1);
    let settle = async |own, before| {
        store
            .settle_orphaned_claims(batch.id, 1, true, &live, Some((own, before)))
            .await
            .expect("settle stranded claims")
    };
    assert_eq!(
        settle("alive", claimed_at - second).await,
        0,
        "claims made after the look are left alone"
    );
    assert_eq!(
        settle("other", claimed_at + second).await,
        0,
        "another live instance's claims are left alone"
    );
    let settled = settle("alive", claimed_at + second).await;
    assert_eq!(settled, 2);
    assert_eq!(
        statuses(&store, batch.id).await,
        vec![
            (m[0], PENDING),
            (m[1], PENDING),
            (m[2], FAILED),
            (m[3], FAILED)
        ]
    );
}
