//! Outcomes: recording sent, failed, retried, released and cancelled messages, cancelling and
//! recovering.

use super::*;

on_both_backends!(a_slice_sent_whole_is_recorded_exactly
    => a_slice_sent_whole_is_recorded_exactly_sqlite,
       a_slice_sent_whole_is_recorded_exactly_postgres);
on_both_backends!(a_task_across_partitions_claims_and_counts_each_partition
    => a_task_across_partitions_claims_and_counts_each_partition_sqlite,
       a_task_across_partitions_claims_and_counts_each_partition_postgres);
on_both_backends!(a_slice_is_recorded_with_the_next_claim
    => a_slice_is_recorded_with_the_next_claim_sqlite,
       a_slice_is_recorded_with_the_next_claim_postgres);
on_both_backends!(record_outcomes_moves_messages_and_counters
    => record_outcomes_moves_messages_and_counters_sqlite,
       record_outcomes_moves_messages_and_counters_postgres);
on_both_backends!(retries_wait_until_due
    => retries_wait_until_due_sqlite, retries_wait_until_due_postgres);
on_both_backends!(cancel_pending_and_recover_sending
    => cancel_pending_and_recover_sending_sqlite, cancel_pending_and_recover_sending_postgres);
on_both_backends!(recover_sending_for_resend
    => recover_sending_for_resend_sqlite, recover_sending_for_resend_postgres);
on_both_backends!(a_number_that_opted_out_after_preparation_is_cancelled
    => a_number_that_opted_out_after_preparation_is_cancelled_sqlite,
       a_number_that_opted_out_after_preparation_is_cancelled_postgres);
on_both_backends!(a_deferred_message_waits_without_using_an_attempt
    => a_deferred_message_waits_without_using_an_attempt_sqlite,
       a_deferred_message_waits_without_using_an_attempt_postgres);
on_both_backends!(outcomes_after_a_cancel_cancel_what_would_wait
    => outcomes_after_a_cancel_cancel_what_would_wait_sqlite,
       outcomes_after_a_cancel_cancel_what_would_wait_postgres);

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
        opted_out: vec![],
        deferred: vec![],
        receipt_keys: vec![],
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
            .next_task_ids(batch.id, 0, 0, 100)
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
                opted_out: vec![m[0], m[5]],
                deferred: vec![(m[2], due, "late".into())],
                receipt_keys: vec![],
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
        store.next_task_ids(batch.id, 0, 0, 10).await.expect("due"),
        vec![m[2]]
    );
    assert_eq!(
        store.next_retries(batch.id, 0, 0, 10).await.expect("due"),
        vec![(m[2], past)],
        "a retry is listed with the time it was due"
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
            .next_task_ids(batch.id, 0, 0, 10)
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
        store.next_task_ids(batch.id, 0, 0, 10).await.expect("due"),
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
            .next_task_ids(batch.id, 0, 0, 10)
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

/// A small batch's task across its partitions (`DeliveryTask::across`): its claim takes the due
/// messages of every partition from the given one on, says each one's partition, and the slice's
/// outcomes, split by partition, land in each partition's counters.
async fn a_task_across_partitions_claims_and_counts_each_partition(store: Store) {
    let batch = create(&store, "across", 3).await;
    let m = seed(
        &store,
        batch.id,
        &[
            (0, "+8613710000001"),
            (1, "+8613710000002"),
            (2, "+8613710000003"),
            (0, "+8613710000004"),
            (2, "+8613710000005"),
        ],
    )
    .await;
    let (first, last) = (m[0], m[4]);
    let from_one = store
        .claim_in(batch.id, 1, true, first, last, i64::MAX, "test-instance")
        .await
        .expect("claim from partition 1");
    assert_eq!(
        from_one
            .iter()
            .map(|c| (c.id, c.partition))
            .collect::<Vec<_>>(),
        vec![(m[1], 1), (m[2], 2), (m[4], 2)]
    );
    let rest = store
        .claim_in(batch.id, 0, true, first, last, i64::MAX, "test-instance")
        .await
        .expect("claim from partition 0");
    assert_eq!(
        rest.iter().map(|c| (c.id, c.partition)).collect::<Vec<_>>(),
        vec![(m[0], 0), (m[3], 0)],
        "only what the first claim left"
    );
    let partition_of: std::collections::HashMap<i64, i32> = from_one
        .iter()
        .chain(&rest)
        .map(|c| (c.id, c.partition))
        .collect();
    let of = |id| partition_of[&id];
    // The first slice sent whole (one statement on PostgreSQL), the second with a failure
    // (each partition's outcomes in turn).
    let sent_whole = Outcomes {
        sent: vec![(m[1], Some("gw-1".into())), (m[2], None), (m[4], None)],
        ..Outcomes::default()
    };
    store
        .record_outcomes_across(batch.id, 1, &sent_whole, of)
        .await
        .expect("record the first slice");
    let mixed = Outcomes {
        sent: vec![(m[0], None)],
        failed: vec![(m[3], "rejected".into())],
        ..Outcomes::default()
    };
    store
        .record_outcomes_across(batch.id, 0, &mixed, of)
        .await
        .expect("record the second slice");
    assert_eq!(
        counters(&store, batch.id).await,
        vec![(2, 1, 0, 1, 0), (1, 1, 0, 0, 0), (2, 2, 0, 0, 0)]
    );
    let m1 = message_by_id(&store, batch.id, m[1]).await;
    assert_eq!(
        (m1.status, m1.provider_message_id.as_deref()),
        (SENT, Some("gw-1"))
    );
    assert_eq!(message_by_id(&store, batch.id, m[3]).await.status, FAILED);
    // Recorded again (a redelivered task), nothing counts twice.
    store
        .record_outcomes_across(batch.id, 1, &sent_whole, of)
        .await
        .expect("record again");
    assert_eq!(
        counters(&store, batch.id).await,
        vec![(2, 1, 0, 1, 0), (1, 1, 0, 0, 0), (2, 2, 0, 0, 0)]
    );
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
        store.next_task_ids(batch.id, 0, 0, 10).await.expect("p0"),
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

/// Claimed messages of a batch cancelled meanwhile, recorded after the cancel's sweep of pending
/// messages: a release or a retry would send them back to `pending`, where nothing would ever
/// move them again; they are cancelled instead, and counted. Sent and failed ones stay as they are.
async fn outcomes_after_a_cancel_cancel_what_would_wait(store: Store) {
    let batch = create(&store, "late-outcomes", 1).await;
    let m = seed(
        &store,
        batch.id,
        &[
            (0, "+8613500000000"),
            (0, "+8613500000001"),
            (0, "+8613500000002"),
            (0, "+8613500000003"),
            (0, "+8613500000004"),
        ],
    )
    .await;
    let claimed = store
        .claim(batch.id, 0, m[0], m[3], i64::MAX, "test-instance")
        .await
        .expect("claim");
    assert_eq!(claimed.len(), 4);
    let mut cancelled = LifecycleUpdate::from(&batch.bookkeeping());
    cancelled.state = "cancelled".into();
    store
        .save_lifecycle(batch.id, batch.version, &cancelled)
        .await
        .expect("cancel");
    assert_eq!(
        store.cancel_pending(batch.id, 1).await.expect("sweep"),
        1,
        "m4"
    );

    store
        .record_outcomes(
            batch.id,
            0,
            &Outcomes {
                sent: vec![(m[0], None)],
                failed: vec![(m[1], "refused".into())],
                retry: vec![(m[2], whole_second(ChronoDuration::hours(1)), "busy".into())],
                released: vec![m[3]],
                ..Outcomes::default()
            },
        )
        .await
        .expect("outcomes");
    assert_eq!(
        statuses(&store, batch.id).await,
        vec![
            (m[0], SENT),
            (m[1], FAILED),
            (m[2], CANCELLED),
            (m[3], CANCELLED),
            (m[4], CANCELLED),
        ]
    );
    assert_eq!(counters(&store, batch.id).await, vec![(5, 1, 0, 1, 3)]);
    let parts = store.partitions(batch.id).await.expect("partitions");
    assert!(parts.iter().all(|p| p.done() == p.total), "{parts:?}");
    assert_eq!(
        store.earliest_retry(batch.id).await.expect("earliest"),
        None
    );
}

/// A message its provider could not take (no session bound) goes back to `pending` until its
/// time, with the reason and its attempt undone; in a cancelled batch it is cancelled instead.
async fn a_deferred_message_waits_without_using_an_attempt(store: Store) {
    let batch = create(&store, "deferred", 1).await;
    let m = seed(
        &store,
        batch.id,
        &[
            (0, "+8613500000010"),
            (0, "+8613500000011"),
            (0, "+8613500000012"),
        ],
    )
    .await;
    let claimed = store
        .claim(batch.id, 0, m[0], m[1], i64::MAX, "test-instance")
        .await
        .expect("claim");
    assert_eq!(claimed.len(), 2);
    let due = whole_second(ChronoDuration::hours(1));
    let why = "no SMPP session of `acme` bound: bind refused: ESME_RBINDFAIL (0x0000000D)";
    store
        .record_outcomes(
            batch.id,
            0,
            &Outcomes {
                sent: vec![(m[1], None)],
                deferred: vec![(m[0], due, why.into())],
                ..Outcomes::default()
            },
        )
        .await
        .expect("outcomes");
    let r0 = message_by_id(&store, batch.id, m[0]).await;
    assert_eq!(
        (r0.status, r0.attempts),
        (PENDING, 0),
        "the attempt is undone"
    );
    assert_eq!(r0.error.as_deref(), Some(why));
    assert_eq!(counters(&store, batch.id).await, vec![(3, 1, 0, 0, 0)]);
    assert_eq!(
        store.earliest_retry(batch.id).await.expect("earliest"),
        Some(due),
        "it waits for its time like a retry"
    );
    assert_eq!(
        store
            .next_task_ids(batch.id, 0, 0, 100)
            .await
            .expect("next"),
        vec![m[2]]
    );

    // Cancelled meanwhile: a deferral recorded late cancels its message.
    let claimed = store
        .claim(batch.id, 0, m[2], m[2], i64::MAX, "test-instance")
        .await
        .expect("claim");
    assert_eq!(claimed.len(), 1);
    let mut cancelled = LifecycleUpdate::from(&batch.bookkeeping());
    cancelled.state = "cancelled".into();
    store
        .save_lifecycle(batch.id, batch.version, &cancelled)
        .await
        .expect("cancel");
    store
        .record_outcomes(
            batch.id,
            0,
            &Outcomes {
                deferred: vec![(m[2], due, why.into())],
                ..Outcomes::default()
            },
        )
        .await
        .expect("outcomes");
    assert_eq!(
        message_by_id(&store, batch.id, m[2]).await.status,
        CANCELLED
    );
}

/// A number listed after its message was written: the claim says so, and the message is
/// recorded `cancelled` with `error` `opted_out`, its attempt undone, in the cancelled counter;
/// the others of the slice are claimed as usual.
async fn a_number_that_opted_out_after_preparation_is_cancelled(store: Store) {
    let batch = create(&store, "opted-out-late", 2).await;
    let m = seed_last_apart(&store, batch.id, "+861370000", 4).await;
    let added = store
        .add_opt_outs(&["+8613700000001".to_owned()], "api")
        .await
        .expect("add_opt_outs");
    assert_eq!(added, 1);
    let claimed = store
        .claim(batch.id, 0, m[0], m[2], i64::MAX, "test-instance")
        .await
        .expect("claim");
    let flags: Vec<(i64, bool)> = claimed.iter().map(|c| (c.id, c.opted_out)).collect();
    assert_eq!(flags, vec![(m[0], false), (m[1], true), (m[2], false)]);
    store
        .record_outcomes(
            batch.id,
            0,
            &Outcomes {
                sent: vec![(m[0], None), (m[2], None)],
                opted_out: vec![m[1]],
                ..Outcomes::default()
            },
        )
        .await
        .expect("record_outcomes");
    let r1 = message_by_id(&store, batch.id, m[1]).await;
    assert_eq!((r1.status, r1.attempts), (CANCELLED, 0));
    assert_eq!(r1.error.as_deref(), Some("opted_out"));
    assert_eq!(message_by_id(&store, batch.id, m[0]).await.status, SENT);
    assert_eq!(
        counters(&store, batch.id).await,
        vec![(3, 2, 0, 0, 1), (1, 0, 0, 0, 0)]
    );
}
