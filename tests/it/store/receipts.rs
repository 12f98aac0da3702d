//! Receipts: delivery receipts applied to `sent` messages through the receipt keys their
//! outcomes wrote, multi-part messages, receipts that come before their key, keys recorded again
//! and keys a provider reuses.

use smsbatch::domain::receipt::{Receipt, ReceiptOutcome};
use smsbatch::store::{ReceiptTimeouts, ReceiptsApplied};

use super::*;

on_both_backends!(receipts_settle_single_part_messages
    => receipts_settle_single_part_messages_sqlite,
       receipts_settle_single_part_messages_postgres);
on_both_backends!(a_receipt_before_its_key_is_kept_and_applied_when_due
    => a_receipt_before_its_key_is_kept_and_applied_when_due_sqlite,
       a_receipt_before_its_key_is_kept_and_applied_when_due_postgres);
on_both_backends!(a_multi_part_message_waits_for_every_part
    => a_multi_part_message_waits_for_every_part_sqlite,
       a_multi_part_message_waits_for_every_part_postgres);
on_both_backends!(outcomes_recorded_again_keep_a_delivered_part
    => outcomes_recorded_again_keep_a_delivered_part_sqlite,
       outcomes_recorded_again_keep_a_delivered_part_postgres);
on_both_backends!(outcomes_recorded_again_in_a_mixed_slice_keep_a_delivered_part
    => outcomes_recorded_again_in_a_mixed_slice_keep_a_delivered_part_sqlite,
       outcomes_recorded_again_in_a_mixed_slice_keep_a_delivered_part_postgres);
on_both_backends!(a_reused_key_names_the_newer_message
    => a_reused_key_names_the_newer_message_sqlite,
       a_reused_key_names_the_newer_message_postgres);
on_both_backends!(a_slice_recorded_with_the_next_claim_gets_its_receipts
    => a_slice_recorded_with_the_next_claim_gets_its_receipts_sqlite,
       a_slice_recorded_with_the_next_claim_gets_its_receipts_postgres);
on_both_backends!(a_receipt_after_its_providers_timeout_leaves_the_message_sent
    => a_receipt_after_its_providers_timeout_leaves_the_message_sent_sqlite,
       a_receipt_after_its_providers_timeout_leaves_the_message_sent_postgres);
on_both_backends!(a_keyed_message_without_a_provider_id_gets_its_receipt
    => a_keyed_message_without_a_provider_id_gets_its_receipt_sqlite,
       a_keyed_message_without_a_provider_id_gets_its_receipt_postgres);

// Helpers
// ---------------------------------------------------------------------------------------------

const DELIVERED: MessageStatus = MessageStatus::Delivered;
const UNDELIVERED: &str = "undelivered: UNDELIV err 001";

fn delivered(key: &str) -> Receipt {
    Receipt {
        key: key.to_owned(),
        outcome: ReceiptOutcome::Delivered,
    }
}

fn failed(key: &str, error: &str) -> Receipt {
    Receipt {
        key: key.to_owned(),
        outcome: ReceiptOutcome::Failed(error.to_owned()),
    }
}

/// `n` messages `<prefix>0000`, `<prefix>0001`… in partition 0; their ids.
async fn seed_n(store: &Store, batch_id: i64, prefix: &str, n: usize) -> Vec<i64> {
    let phones: Vec<String> = (0..n).map(|i| format!("{prefix}{i:04}")).collect();
    let spec: Vec<(i32, &str)> = phones.iter().map(|p| (0, p.as_str())).collect();
    seed(store, batch_id, &spec).await
}

/// Claims `first..=last` of `partition` (every pending message of the range); how many.
async fn claim_range(store: &Store, batch_id: i64, partition: i32, first: i64, last: i64) -> usize {
    store
        .claim(batch_id, partition, first, last, i64::MAX, "test-instance")
        .await
        .expect("claim")
        .len()
}

/// Outcomes of messages sent with their parts' receipt keys: the provider id is the first
/// key's id.
fn sent_with_keys(parts: &[(i64, &[&str])]) -> Outcomes {
    Outcomes {
        sent: parts
            .iter()
            .map(|(id, keys)| (*id, keys.first().map(|k| format!("gw-{k}"))))
            .collect(),
        receipt_keys: parts
            .iter()
            .flat_map(|(id, keys)| keys.iter().map(move |k| (*id, (*k).to_owned())))
            .collect(),
        ..Outcomes::default()
    }
}

async fn record(store: &Store, batch_id: i64, partition: i32, outcomes: &Outcomes) {
    store
        .record_outcomes(batch_id, partition, outcomes)
        .await
        .expect("record_outcomes");
}

async fn receipts(store: &Store, lot: Vec<Receipt>) -> ReceiptsApplied {
    store
        .record_receipts(lot, &ReceiptTimeouts::default())
        .await
        .expect("record_receipts")
}

/// The counts of `applied`, its latencies left out (checked apart).
fn counts(applied: &ReceiptsApplied) -> ReceiptsApplied {
    ReceiptsApplied {
        latencies: Vec::new(),
        ..applied.clone()
    }
}

async fn pending(store: &Store) -> i64 {
    store.pending_receipts().await.expect("pending_receipts")
}

// Scenarios
// ---------------------------------------------------------------------------------------------

/// Delivered and failed receipts settle their messages and move their partitions' counters; the
/// same receipts again are repeats and change nothing.
async fn receipts_settle_single_part_messages(store: Store) {
    let batch = create(&store, "receipts", 2).await;
    let m = seed(
        &store,
        batch.id,
        &[
            (0, "+8613400000000"),
            (0, "+8613400000001"),
            (0, "+8613400000002"),
            (1, "+8613400000003"),
        ],
    )
    .await;
    assert_eq!(claim_range(&store, batch.id, 0, m[0], m[2]).await, 3);
    assert_eq!(claim_range(&store, batch.id, 1, m[3], m[3]).await, 1);
    record(
        &store,
        batch.id,
        0,
        &sent_with_keys(&[
            (m[0], &["acme/1"]),
            (m[1], &["acme/2"]),
            (m[2], &["acme/3"]),
        ]),
    )
    .await;
    record(&store, batch.id, 1, &sent_with_keys(&[(m[3], &["acme/4"])])).await;
    assert_eq!(
        counters(&store, batch.id).await,
        vec![(3, 3, 0, 0, 0), (1, 1, 0, 0, 0)]
    );

    assert_eq!(
        receipts(&store, Vec::new()).await,
        ReceiptsApplied::default(),
        "an empty lot does nothing"
    );

    let lot = vec![
        delivered("acme/1"),
        failed("acme/2", UNDELIVERED),
        delivered("acme/4"),
    ];
    let applied = receipts(&store, lot.clone()).await;
    assert_eq!(
        counts(&applied),
        ReceiptsApplied {
            delivered: 2,
            failed: 1,
            ..ReceiptsApplied::default()
        }
    );
    assert_eq!(
        applied.latencies.len(),
        3,
        "one latency per settled message"
    );
    assert!(applied.latencies.iter().all(|&s| (0.0..60.0).contains(&s)));

    let r0 = message_by_id(&store, batch.id, m[0]).await;
    assert_eq!((r0.status, r0.error.as_deref()), (DELIVERED, None));
    let delivered_at = r0
        .delivered_at
        .expect("a delivered message has delivered_at");
    let r1 = message_by_id(&store, batch.id, m[1]).await;
    assert_eq!(
        (r1.status, r1.error.as_deref()),
        (FAILED, Some(UNDELIVERED))
    );
    assert_eq!(r1.delivered_at, None);
    let r2 = message_by_id(&store, batch.id, m[2]).await;
    assert_eq!(
        (r2.status, r2.error.as_deref(), r2.delivered_at),
        (SENT, None, None),
        "a message without a receipt stays sent"
    );
    assert_eq!(
        message_by_id(&store, batch.id, m[3]).await.status,
        DELIVERED
    );
    assert_eq!(
        counters(&store, batch.id).await,
        vec![(3, 1, 1, 1, 0), (1, 0, 1, 0, 0)],
        "sent −2, delivered +1, failed +1 in partition 0; sent −1, delivered +1 in partition 1"
    );
    assert_eq!(pending(&store).await, 0);

    // The SMSC sends the same receipts again: repeats, nothing changes.
    let before = statuses(&store, batch.id).await;
    let again = receipts(&store, lot).await;
    assert_eq!(statuses(&store, batch.id).await, before);
    assert_eq!(
        counters(&store, batch.id).await,
        vec![(3, 1, 1, 1, 0), (1, 0, 1, 0, 0)]
    );
    let r0 = message_by_id(&store, batch.id, m[0]).await;
    assert_eq!(r0.delivered_at, Some(delivered_at));
    assert_eq!(
        message_by_id(&store, batch.id, m[1]).await.error.as_deref(),
        Some(UNDELIVERED)
    );
    assert_eq!(
        counts(&again),
        ReceiptsApplied {
            repeated: 3,
            ..ReceiptsApplied::default()
        },
        "receipts of settled messages are repeats"
    );
    assert!(again.latencies.is_empty());
    assert_eq!(
        pending(&store).await,
        0,
        "a repeat is not kept to be tried again"
    );
}

/// A receipt that comes before its message's key is kept; once the key is recorded, the receipt
/// is applied at its next try (1 s later), not before.
async fn a_receipt_before_its_key_is_kept_and_applied_when_due(store: Store) {
    let batch = create(&store, "early-receipt", 1).await;
    let m = seed_n(&store, batch.id, "+861340001", 1).await;
    assert_eq!(claim_range(&store, batch.id, 0, m[0], m[0]).await, 1);

    // The receipt, and one that no key will ever match.
    let applied = receipts(&store, vec![delivered("acme/5"), delivered("acme/77")]).await;
    assert_eq!(
        counts(&applied),
        ReceiptsApplied {
            kept: 2,
            ..ReceiptsApplied::default()
        }
    );
    assert_eq!(pending(&store).await, 2);
    assert_eq!(
        message_by_id(&store, batch.id, m[0]).await.status,
        SENDING,
        "a kept receipt changes no message"
    );

    record(&store, batch.id, 0, &sent_with_keys(&[(m[0], &["acme/5"])])).await;
    assert_eq!(message_by_id(&store, batch.id, m[0]).await.status, SENT);

    // Not due yet: nothing is tried.
    let early = store
        .match_pending_receipts(100, &ReceiptTimeouts::default())
        .await
        .expect("match_pending_receipts");
    assert_eq!(
        early,
        ReceiptsApplied::default(),
        "no kept receipt is due yet"
    );
    assert_eq!(pending(&store).await, 2);
    assert_eq!(message_by_id(&store, batch.id, m[0]).await.status, SENT);

    tokio::time::sleep(Duration::from_millis(1100)).await;
    let due = store
        .match_pending_receipts(100, &ReceiptTimeouts::default())
        .await
        .expect("match_pending_receipts");
    assert_eq!(
        counts(&due),
        ReceiptsApplied {
            delivered: 1,
            kept: 1,
            ..ReceiptsApplied::default()
        },
        "the matched receipt is applied, the other kept for its next try"
    );
    assert_eq!(due.latencies.len(), 1);
    let r0 = message_by_id(&store, batch.id, m[0]).await;
    assert_eq!(r0.status, DELIVERED);
    assert!(r0.delivered_at.is_some());
    assert_eq!(counters(&store, batch.id).await, vec![(1, 0, 1, 0, 0)]);
    assert_eq!(
        pending(&store).await,
        1,
        "only the unmatched receipt is left"
    );

    // The unmatched one's next try is 2 s later: not due now.
    assert_eq!(
        store
            .match_pending_receipts(100, &ReceiptTimeouts::default())
            .await
            .expect("match_pending_receipts"),
        ReceiptsApplied::default()
    );
    assert_eq!(pending(&store).await, 1);
}

/// A message of two parts is delivered once both parts' receipts are; one failed part fails it
/// at once, and its other part's receipt is then a repeat.
async fn a_multi_part_message_waits_for_every_part(store: Store) {
    let batch = create(&store, "multi-part", 1).await;
    let m = seed_n(&store, batch.id, "+861340002", 3).await;
    assert_eq!(claim_range(&store, batch.id, 0, m[0], m[2]).await, 3);
    record(
        &store,
        batch.id,
        0,
        &sent_with_keys(&[
            (m[0], &["acme/a1", "acme/a2"]),
            (m[1], &["acme/b1", "acme/b2"]),
            (m[2], &["acme/c1", "acme/c2"]),
        ]),
    )
    .await;
    assert_eq!(counters(&store, batch.id).await, vec![(3, 3, 0, 0, 0)]);

    // m0: its first part, then its second.
    let first = receipts(&store, vec![delivered("acme/a1")]).await;
    assert_eq!(
        counts(&first),
        ReceiptsApplied {
            parts: 1,
            ..ReceiptsApplied::default()
        }
    );
    let r0 = message_by_id(&store, batch.id, m[0]).await;
    assert_eq!(
        (r0.status, r0.delivered_at),
        (SENT, None),
        "one part of two delivered: still sent"
    );
    assert_eq!(counters(&store, batch.id).await, vec![(3, 3, 0, 0, 0)]);
    let second = receipts(&store, vec![delivered("acme/a2")]).await;
    assert_eq!(
        counts(&second),
        ReceiptsApplied {
            delivered: 1,
            ..ReceiptsApplied::default()
        }
    );
    let r0 = message_by_id(&store, batch.id, m[0]).await;
    assert_eq!(r0.status, DELIVERED);
    assert!(r0.delivered_at.is_some());
    assert_eq!(counters(&store, batch.id).await, vec![(3, 2, 1, 0, 0)]);

    // m2: both parts in one lot.
    let both = receipts(&store, vec![delivered("acme/c2"), delivered("acme/c1")]).await;
    assert_eq!(
        counts(&both),
        ReceiptsApplied {
            delivered: 1,
            ..ReceiptsApplied::default()
        },
        "both parts in one lot deliver the message once"
    );
    assert_eq!(
        message_by_id(&store, batch.id, m[2]).await.status,
        DELIVERED
    );
    assert_eq!(counters(&store, batch.id).await, vec![(3, 1, 2, 0, 0)]);

    // m1: a failed part fails the message at once.
    let failed_part = receipts(&store, vec![failed("acme/b2", UNDELIVERED)]).await;
    assert_eq!(
        counts(&failed_part),
        ReceiptsApplied {
            failed: 1,
            ..ReceiptsApplied::default()
        }
    );
    let r1 = message_by_id(&store, batch.id, m[1]).await;
    assert_eq!(
        (r1.status, r1.error.as_deref(), r1.delivered_at),
        (FAILED, Some(UNDELIVERED), None)
    );
    assert_eq!(counters(&store, batch.id).await, vec![(3, 0, 2, 1, 0)]);

    // Its other part's receipt, later: a repeat that changes nothing.
    let late = receipts(&store, vec![delivered("acme/b1")]).await;
    let r1 = message_by_id(&store, batch.id, m[1]).await;
    assert_eq!(
        (r1.status, r1.error.as_deref(), r1.delivered_at),
        (FAILED, Some(UNDELIVERED), None)
    );
    assert_eq!(counters(&store, batch.id).await, vec![(3, 0, 2, 1, 0)]);
    assert_eq!(
        counts(&late),
        ReceiptsApplied {
            repeated: 1,
            ..ReceiptsApplied::default()
        },
        "the other part of a failed message is a repeat"
    );
    assert_eq!(pending(&store).await, 0, "a repeat is not kept");
}

/// A task's outcomes recorded again (its answer was lost, the commit retried) after one part of
/// a message was delivered: the message is no longer `sending`, its keys are not written again,
/// and the delivered part stays delivered.
async fn lost_answer_recorded_again(store: Store, mixed: bool) {
    let batch = create(&store, "recorded-again", 1).await;
    let m = seed_n(&store, batch.id, "+861340003", 2).await;
    assert_eq!(claim_range(&store, batch.id, 0, m[0], m[1]).await, 2);
    let mut outcomes = sent_with_keys(&[(m[0], &["acme/p1", "acme/p2"])]);
    if mixed {
        // A slice with a failure too: the general path on PostgreSQL as well.
        outcomes.failed.push((m[1], "rejected".into()));
    } else {
        outcomes.sent.push((m[1], Some("gw-other".into())));
    }
    record(&store, batch.id, 0, &outcomes).await;
    let after_record = counters(&store, batch.id).await;
    assert_eq!(
        after_record,
        if mixed {
            vec![(2, 1, 0, 1, 0)]
        } else {
            vec![(2, 2, 0, 0, 0)]
        }
    );

    let part = receipts(&store, vec![delivered("acme/p1")]).await;
    assert_eq!(
        counts(&part),
        ReceiptsApplied {
            parts: 1,
            ..ReceiptsApplied::default()
        }
    );

    record(&store, batch.id, 0, &outcomes).await;
    assert_eq!(message_by_id(&store, batch.id, m[0]).await.status, SENT);
    assert_eq!(
        counters(&store, batch.id).await,
        after_record,
        "nothing counted twice"
    );

    let last = receipts(&store, vec![delivered("acme/p2")]).await;
    let r0 = message_by_id(&store, batch.id, m[0]).await;
    assert_eq!(
        r0.status, DELIVERED,
        "the part delivered before the outcomes were recorded again still counts"
    );
    assert!(r0.delivered_at.is_some());
    assert_eq!(
        counts(&last),
        ReceiptsApplied {
            delivered: 1,
            ..ReceiptsApplied::default()
        }
    );
    let (total, sent, delivered, failed, cancelled) = after_record[0];
    assert_eq!(
        counters(&store, batch.id).await,
        vec![(total, sent - 1, delivered + 1, failed, cancelled)]
    );
}

/// `lost_answer_recorded_again` with a slice sent whole (PostgreSQL's one-statement path).
async fn outcomes_recorded_again_keep_a_delivered_part(store: Store) {
    lost_answer_recorded_again(store, false).await;
}

/// `lost_answer_recorded_again` with a slice that also has a failure (the general path).
async fn outcomes_recorded_again_in_a_mixed_slice_keep_a_delivered_part(store: Store) {
    lost_answer_recorded_again(store, true).await;
}

/// A provider's ids wrap: a key that named an older message names the newer one sent under it
/// later, whether the older one was settled or still waits for its receipt.
async fn a_reused_key_names_the_newer_message(store: Store) {
    let batch = create(&store, "reused-key", 1).await;
    let m = seed_n(&store, batch.id, "+861340004", 4).await;

    // m0 is sent as acme/9 and delivered: its keys go.
    assert_eq!(claim_range(&store, batch.id, 0, m[0], m[0]).await, 1);
    record(&store, batch.id, 0, &sent_with_keys(&[(m[0], &["acme/9"])])).await;
    assert_eq!(
        receipts(&store, vec![delivered("acme/9")]).await.delivered,
        1
    );
    let old = message_by_id(&store, batch.id, m[0]).await;
    assert_eq!(old.status, DELIVERED);

    // m1, sent later as acme/9 too, gets the next receipt for it.
    assert_eq!(claim_range(&store, batch.id, 0, m[1], m[1]).await, 1);
    record(&store, batch.id, 0, &sent_with_keys(&[(m[1], &["acme/9"])])).await;
    let next = receipts(&store, vec![failed("acme/9", UNDELIVERED)]).await;
    assert_eq!(
        counts(&next),
        ReceiptsApplied {
            failed: 1,
            ..ReceiptsApplied::default()
        }
    );
    let r1 = message_by_id(&store, batch.id, m[1]).await;
    assert_eq!(
        (r1.status, r1.error.as_deref()),
        (FAILED, Some(UNDELIVERED))
    );
    let r0 = message_by_id(&store, batch.id, m[0]).await;
    assert_eq!(
        (r0.status, r0.error, r0.delivered_at),
        (DELIVERED, None, old.delivered_at),
        "the older message is left alone"
    );

    // m2 is sent as acme/10 and never gets its receipt; m3, sent later as acme/10, does.
    assert_eq!(claim_range(&store, batch.id, 0, m[2], m[2]).await, 1);
    record(
        &store,
        batch.id,
        0,
        &sent_with_keys(&[(m[2], &["acme/10"])]),
    )
    .await;
    assert_eq!(claim_range(&store, batch.id, 0, m[3], m[3]).await, 1);
    record(
        &store,
        batch.id,
        0,
        &sent_with_keys(&[(m[3], &["acme/10"])]),
    )
    .await;
    let wrapped = receipts(&store, vec![delivered("acme/10")]).await;
    assert_eq!(
        counts(&wrapped),
        ReceiptsApplied {
            delivered: 1,
            ..ReceiptsApplied::default()
        }
    );
    assert_eq!(
        message_by_id(&store, batch.id, m[3]).await.status,
        DELIVERED
    );
    assert_eq!(message_by_id(&store, batch.id, m[2]).await.status, SENT);
    assert_eq!(counters(&store, batch.id).await, vec![(4, 1, 2, 1, 0)]);
    assert_eq!(pending(&store).await, 0);
}

/// A slice recorded in the statement that claims the next one (PostgreSQL) writes its receipt
/// keys too; on SQLite the store declines and the slice is recorded apart, with the same result.
async fn a_slice_recorded_with_the_next_claim_gets_its_receipts(store: Store) {
    let batch = create(&store, "record-and-claim-keys", 1).await;
    let m = seed_n(&store, batch.id, "+861340005", 4).await;
    let first = store
        .claim(batch.id, 0, m[0], m[3], 2, "test-instance")
        .await
        .expect("claim");
    assert_eq!(first.iter().map(|c| c.id).collect::<Vec<_>>(), [m[0], m[1]]);
    let outcomes = sent_with_keys(&[(m[0], &["acme/20"]), (m[1], &["acme/21", "acme/22"])]);
    let next = store
        .record_sent_and_claim(batch.id, 0, &outcomes, m[2], m[3], 2, "test-instance")
        .await
        .expect("record_sent_and_claim");
    match store.backend() {
        StoreBackend::Postgres => {
            let next = next.expect("PostgreSQL records and claims together");
            assert_eq!(next.iter().map(|c| c.id).collect::<Vec<_>>(), [m[2], m[3]]);
        }
        StoreBackend::Sqlite => {
            assert!(next.is_none());
            record(&store, batch.id, 0, &outcomes).await;
        }
    }
    assert_eq!(counters(&store, batch.id).await[0].1, 2);

    let applied = receipts(
        &store,
        vec![
            delivered("acme/20"),
            delivered("acme/21"),
            delivered("acme/22"),
        ],
    )
    .await;
    assert_eq!(
        counts(&applied),
        ReceiptsApplied {
            delivered: 2,
            ..ReceiptsApplied::default()
        }
    );
    assert_eq!(
        message_by_id(&store, batch.id, m[0]).await.status,
        DELIVERED
    );
    assert_eq!(
        message_by_id(&store, batch.id, m[1]).await.status,
        DELIVERED
    );
    assert_eq!(counters(&store, batch.id).await, vec![(4, 0, 2, 0, 0)]);
    assert_eq!(pending(&store).await, 0);
}

/// A message a provider took without giving an id for it (an SMPP message whose first part's
/// id was empty) still has the keys of the parts it gave ids for: its receipt settles it.
async fn a_keyed_message_without_a_provider_id_gets_its_receipt(store: Store) {
    let batch = create(&store, "no-provider-id", 1).await;
    let m = seed_n(&store, batch.id, "+861340006", 1).await;
    assert_eq!(claim_range(&store, batch.id, 0, m[0], m[0]).await, 1);
    record(
        &store,
        batch.id,
        0,
        &Outcomes {
            sent: vec![(m[0], None)],
            receipt_keys: vec![(m[0], "acme/30".to_owned())],
            ..Outcomes::default()
        },
    )
    .await;
    assert_eq!(message_by_id(&store, batch.id, m[0]).await.status, SENT);
    let applied = receipts(&store, vec![delivered("acme/30")]).await;
    assert_eq!(
        message_by_id(&store, batch.id, m[0]).await.status,
        DELIVERED
    );
    assert_eq!(
        counts(&applied),
        ReceiptsApplied {
            delivered: 1,
            ..ReceiptsApplied::default()
        }
    );
    assert_eq!(pending(&store).await, 0);
}

/// A receipt that comes longer after its message's submit than its provider's
/// `receipt_timeout` is late: the message stays `sent` for good. Another provider's has no limit.
async fn a_receipt_after_its_providers_timeout_leaves_the_message_sent(store: Store) {
    let batch = create(&store, "late-receipt", 1).await;
    let m = seed_n(&store, batch.id, "+861340007", 2).await;
    assert_eq!(claim_range(&store, batch.id, 0, m[0], m[1]).await, 2);
    record(
        &store,
        batch.id,
        0,
        &sent_with_keys(&[(m[0], &["acme/40"]), (m[1], &["other/41"])]),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let timeouts = ReceiptTimeouts(
        [("acme".to_owned(), Duration::from_millis(10))]
            .into_iter()
            .collect(),
    );
    let applied = store
        .record_receipts(vec![delivered("acme/40"), delivered("other/41")], &timeouts)
        .await
        .expect("record_receipts");
    assert_eq!(
        counts(&applied),
        ReceiptsApplied {
            delivered: 1,
            late: 1,
            ..ReceiptsApplied::default()
        }
    );
    assert_eq!(message_by_id(&store, batch.id, m[0]).await.status, SENT);
    assert_eq!(
        message_by_id(&store, batch.id, m[1]).await.status,
        DELIVERED
    );
    assert_eq!(counters(&store, batch.id).await, vec![(2, 1, 1, 0, 0)]);
    assert_eq!(pending(&store).await, 0, "a late receipt is not kept");
}
