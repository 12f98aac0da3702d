//! Messages: task ranges and claims, and listing a batch's messages.

use super::*;

on_both_backends!(claims_slice_a_range_in_id_order
    => claims_slice_a_range_in_id_order_sqlite, claims_slice_a_range_in_id_order_postgres);
on_both_backends!(claim_moves_pending_to_sending_once
    => claim_moves_pending_to_sending_once_sqlite, claim_moves_pending_to_sending_once_postgres);
on_both_backends!(concurrent_claims_hand_out_each_message_once
    => concurrent_claims_hand_out_each_message_once_sqlite,
       concurrent_claims_hand_out_each_message_once_postgres);
on_both_backends!(list_messages_pages_and_filters
    => list_messages_pages_and_filters_sqlite, list_messages_pages_and_filters_postgres);

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
        .next_task_ids(batch.id, 0, 0, 4)
        .await
        .expect("task 1");
    assert_eq!(task1, p0[0..4]);
    let task2 = store
        .next_task_ids(batch.id, 0, task1[3], 4)
        .await
        .expect("task 2");
    assert_eq!(task2, p0[4..6]);
    assert!(
        store
            .next_task_ids(batch.id, 0, p0[5], 4)
            .await
            .expect("end")
            .is_empty()
    );
    assert_eq!(
        store.next_task_ids(batch.id, 1, 0, 10).await.expect("p1"),
        p1
    );
    let other = create(&store, "other", 2).await;
    assert!(
        store
            .next_task_ids(other.id, 0, 0, 10)
            .await
            .expect("other")
            .is_empty()
    );
    // A full delivery round hands out each partition's id range, from its first to its last id.
    assert_eq!(
        store.message_id_bounds(batch.id).await.expect("bounds"),
        vec![Some((p0[0], p0[5])), Some((p1[0], p1[2]))]
    );
    assert_eq!(
        store
            .message_id_bounds(other.id)
            .await
            .expect("other bounds"),
        vec![None, None],
        "a batch without messages has partitions without ranges"
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
        store.next_task_ids(batch.id, 0, 0, 10).await.expect("p0"),
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
    // Delivery's first look reads the counters and the ranges in one statement.
    let (looked, ranges) = store
        .partitions_and_bounds(batch.id)
        .await
        .expect("first look");
    assert_eq!(
        looked.iter().map(|p| (p.idx, p.total)).collect::<Vec<_>>(),
        vec![(0, 6), (1, 3)]
    );
    assert_eq!(
        looked,
        store.partitions(batch.id).await.expect("partitions"),
        "the same counters as their own read"
    );
    assert_eq!(ranges, vec![Some((p0[0], p0[5])), Some((p1[0], p1[2]))]);
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
