//! Batches: creating, finding and listing them, saving their lifecycle, their tally, counts by state.

use super::*;

on_both_backends!(create_find_and_list_batches
    => create_find_and_list_batches_sqlite, create_find_and_list_batches_postgres);
on_both_backends!(save_lifecycle_checks_the_version
    => save_lifecycle_checks_the_version_sqlite, save_lifecycle_checks_the_version_postgres);
on_both_backends!(a_refusal_is_judged_on_the_stored_row
    => a_refusal_is_judged_on_the_stored_row_sqlite,
       a_refusal_is_judged_on_the_stored_row_postgres);
on_both_backends!(batch_tally_counts_rows_and_counters
    => batch_tally_counts_rows_and_counters_sqlite,
       batch_tally_counts_rows_and_counters_postgres);
on_both_backends!(count_by_state_and_ping
    => count_by_state_and_ping_sqlite, count_by_state_and_ping_postgres);

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

/// `save_transition` with a copy of the batch that is behind the stored row: a transition the
/// copy's state refuses is planned again on the stored row (an action saved elsewhere moved
/// it), and saved if that allows it; a refusal by the stored row stands, without a save.
async fn a_refusal_is_judged_on_the_stored_row(store: Store) {
    let batch = store
        .create_batch(new_batch("stale-copy", 1), recipients(0, 1))
        .await
        .expect("create")
        .batch;
    let to = |from: BatchState, to: BatchState| {
        move |b: &Batch| {
            if b.state != from {
                return Err(StoreError::Conflict(format!("not {from}: {}", b.state)));
            }
            let mut next = b.bookkeeping();
            next.state = to;
            Ok(next)
        }
    };
    let copy = batch.clone();
    let mut elsewhere = LifecycleUpdate::from(&batch.bookkeeping());
    elsewhere.state = "paused".into();
    store
        .save_lifecycle(batch.id, batch.version, &elsewhere)
        .await
        .expect("saved elsewhere");

    // The copy says `initial`, the row `paused`: a resume from `paused` is saved.
    let saved = store
        .save_transition(copy.clone(), to(BatchState::Paused, BatchState::Delivering))
        .await
        .expect("planned on the stored row");
    assert_eq!((saved.state, saved.version), (BatchState::Delivering, 2));

    // Refused by the stored row too: the refusal stands and nothing is saved.
    let refused = store
        .save_transition(copy, to(BatchState::Paused, BatchState::Delivering))
        .await;
    assert!(
        matches!(&refused, Err(StoreError::Conflict(why)) if why == "not paused: delivering"),
        "{refused:?}"
    );
    let stored = store.batch(batch.id).await.expect("batch");
    assert_eq!((stored.state, stored.version), (BatchState::Delivering, 2));
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
