//! Several instances: leases, heartbeats, claims of dead instances.

use super::*;

/// How far ahead a scheduled batch counts as needing a supervisor.
const HORIZON: std::time::Duration = std::time::Duration::from_secs(10);

on_both_backends!(leases_go_to_one_instance_at_a_time
    => leases_go_to_one_instance_at_a_time_sqlite, leases_go_to_one_instance_at_a_time_postgres);
on_both_backends!(only_dead_instances_claims_are_settled
    => only_dead_instances_claims_are_settled_sqlite,
       only_dead_instances_claims_are_settled_postgres);

// 11. Several instances: leases, heartbeats, claims of dead instances.

/// A lease goes to one instance at a time; its holder renews it; an expired one can be taken
/// over; a released one is free; unsupervised active batches are the ones without a live lease.
async fn leases_go_to_one_instance_at_a_time(store: Store) {
    let batch = create(&store, "leased", 1).await;
    let lease = Duration::from_secs(60);
    // Only active batches need a supervisor.
    assert!(
        store
            .unsupervised_batches(HORIZON)
            .await
            .expect("none")
            .is_empty()
    );
    let mut update = LifecycleUpdate::from(&batch.bookkeeping());
    update.state = "delivering".into();
    let batch = store
        .save_lifecycle(batch.id, batch.version, &update)
        .await
        .expect("delivering");
    let ids = |batches: Vec<Batch>| batches.iter().map(|b| b.id).collect::<Vec<_>>();
    assert_eq!(
        ids(store.unsupervised_batches(HORIZON).await.expect("one")),
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
    assert!(
        store
            .unsupervised_batches(HORIZON)
            .await
            .expect("held")
            .is_empty()
    );
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
        ids(store.unsupervised_batches(HORIZON).await.expect("expired")),
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

    // Released or forgotten, it is free again. A release takes only the releaser's own leases.
    let other = create(&store, "released", 1).await;
    assert!(
        store
            .acquire_lease(other.id, "a", lease)
            .await
            .expect("a takes another")
    );
    store
        .release_leases(&[batch.id, other.id], "a")
        .await
        .expect("a releases");
    assert_eq!(store.lease_owner(other.id).await.expect("released"), None);
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

on_both_backends!(the_watch_sees_rows_and_counters_that_changed
    => the_watch_sees_rows_and_counters_that_changed_sqlite,
       the_watch_sees_rows_and_counters_that_changed_postgres);
on_both_backends!(a_far_scheduled_batch_needs_no_supervisor_yet
    => a_far_scheduled_batch_needs_no_supervisor_yet_sqlite,
       a_far_scheduled_batch_needs_no_supervisor_yet_postgres);

/// The instance's watch (`changed_since`) lists a batch whose row changed with its new version,
/// and one whose partition counters moved (any outcome, a retry too) as progressed; a look after
/// the changes lists neither. `leased_versions` gives the versions of the batches an instance
/// leases.
async fn the_watch_sees_rows_and_counters_that_changed(store: Store) {
    let before = Utc::now().naive_utc() - ChronoDuration::milliseconds(5);
    let phone = |n: u32| format!("+8613930000{n:03}");
    let (batch, r) =
        batch_with_recipients(&store, "watched", 1, (1..=2).map(phone).collect()).await;
    let changes = store.changed_since(before).await.expect("watch");
    assert_eq!(
        changes.versions.get(&batch.id),
        Some(&batch.version),
        "{changes:?}"
    );

    let mut update = LifecycleUpdate::from(&batch.bookkeeping());
    update.state = "delivering".into();
    update.updated_at = Utc::now().naive_utc();
    let saved = store
        .save_lifecycle(batch.id, batch.version, &update)
        .await
        .expect("delivering");
    store
        .write_prepared_chunk(
            batch.id,
            PreparedChunk {
                messages: (0..2)
                    .map(|i| message(batch.id, 0, r[i], &phone(i as u32 + 1), 1))
                    .collect(),
                last_recipient_id: r[1],
                processed: 2,
                invalid: 0,
                repeats: None,
            },
        )
        .await
        .expect("chunk");
    tokio::time::sleep(Duration::from_millis(20)).await;
    let quiet = Utc::now().naive_utc();
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(
        store.changed_since(quiet).await.expect("watch"),
        smsbatch::store::Changes::default(),
        "nothing changed since"
    );

    let claimed = store
        .claim(batch.id, 0, 0, i64::MAX, 1, "instance-a")
        .await
        .expect("claim");
    // A retry alone moves no counter, but the partition's row says it moved.
    store
        .record_outcomes(
            batch.id,
            0,
            &Outcomes {
                retry: vec![(claimed[0].id, Utc::now().naive_utc(), "hiccup".into())],
                ..Outcomes::default()
            },
        )
        .await
        .expect("retry");
    let changes = store.changed_since(quiet).await.expect("watch");
    assert!(changes.progressed().contains(&batch.id), "{changes:?}");
    assert!(!changes.versions.contains_key(&batch.id), "{changes:?}");
    let changes = store.changed_since(before).await.expect("watch");
    assert_eq!(
        changes.versions.get(&batch.id),
        Some(&saved.version),
        "{changes:?}"
    );

    let lease = Duration::from_secs(60);
    assert!(
        store
            .acquire_lease(batch.id, "a", lease)
            .await
            .expect("lease")
    );
    assert_eq!(
        store.leased_versions("a").await.expect("versions"),
        std::collections::BTreeMap::from([(batch.id, saved.version)])
    );
    assert!(
        store
            .leased_versions("b")
            .await
            .expect("versions")
            .is_empty()
    );
}

/// A scheduled batch needs a supervisor only once it is due within the horizon.
async fn a_far_scheduled_batch_needs_no_supervisor_yet(store: Store) {
    let scheduled = |name: &str, ahead: ChronoDuration| {
        let mut new = new_batch(name, 1);
        new.schedule_at = Some(Utc::now().naive_utc() + ahead);
        new
    };
    let mut ids = Vec::new();
    for (name, ahead) in [
        ("in-an-hour", ChronoDuration::hours(1)),
        ("in-a-second", ChronoDuration::seconds(1)),
    ] {
        let batch = store
            .create_batch(scheduled(name, ahead), Vec::new())
            .await
            .expect("create")
            .batch;
        ids.push(set_state(&store, batch.id, "scheduled").await.id);
    }
    let unsupervised: Vec<i64> = store
        .unsupervised_batches(HORIZON)
        .await
        .expect("unsupervised")
        .iter()
        .map(|b| b.id)
        .collect();
    assert_eq!(
        unsupervised,
        vec![ids[1]],
        "only the batch due within {HORIZON:?}"
    );
}
