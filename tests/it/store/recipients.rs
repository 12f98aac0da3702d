//! Recipients: uploads and reading them back in id order.

use super::*;

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
