//! Preparation: prepared chunks, the checkpoint, the fencing run.

use super::*;

on_both_backends!(chunks_written_side_by_side_keep_the_checkpoint_exact
    => chunks_written_side_by_side_keep_the_checkpoint_exact_sqlite,
       chunks_written_side_by_side_keep_the_checkpoint_exact_postgres);
on_both_backends!(only_the_newest_preparation_run_records_chunks
    => only_the_newest_preparation_run_records_chunks_sqlite,
       only_the_newest_preparation_run_records_chunks_postgres);
on_both_backends!(prepared_chunks_drop_duplicates_and_opt_outs
    => prepared_chunks_drop_duplicates_and_opt_outs_sqlite,
       prepared_chunks_drop_duplicates_and_opt_outs_postgres);
on_both_backends!(a_chunk_told_which_numbers_may_repeat_keeps_each_once
    => a_chunk_told_which_numbers_may_repeat_keeps_each_once_sqlite,
       a_chunk_told_which_numbers_may_repeat_keeps_each_once_postgres);
on_both_backends!(large_prepared_chunk_is_written
    => large_prepared_chunk_is_written_sqlite, large_prepared_chunk_is_written_postgres);

// ---------------------------------------------------------------------------------------------
// 5. write_prepared_chunk
// ---------------------------------------------------------------------------------------------

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
    assert_eq!(run.processed, 0, "the first run finds nothing prepared");
    let run = run.number;
    // The second chunk (recipients 4..=6) commits first, when nothing was known committed.
    store
        .write_prepared_chunk_beside(batch.id, chunk(&[3, 4, 5]), run, Some(r[3]), 0)
        .await
        .expect("second chunk");
    assert_eq!(checkpoint().await, 0);
    assert_eq!(
        store.preparation_start(batch.id).await.expect("after").1,
        vec![(r[3], r[5])]
    );
    // Then the first (1..=3).
    store
        .write_prepared_chunk_beside(batch.id, chunk(&[0, 1, 2]), run, Some(r[0]), 0)
        .await
        .expect("first chunk");
    assert_eq!(
        store.preparation_start(batch.id).await.expect("after").1,
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
        store.preparation_start(batch.id).await.expect("after"),
        (r[5], vec![(r[6], r[8])])
    );
    // A chunk that started earlier and commits last does not move the checkpoint back.
    store
        .write_prepared_chunk_beside(batch.id, PreparedChunk::default(), run, None, r[2])
        .await
        .expect("late chunk");
    assert_eq!(checkpoint().await, r[5]);
    let b = store.batch(batch.id).await.expect("batch");
    assert_eq!((b.processed, b.valid, b.duplicates), (9, 9, 0));
    // A run that starts now is told what was counted: it reads its start, not from the top.
    let next = store
        .begin_preparation_run(batch.id)
        .await
        .expect("next run");
    assert_eq!((next.number, next.processed), (run + 1, 9));
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
    let first = store
        .begin_preparation_run(batch.id)
        .await
        .expect("run")
        .number;
    let second = store
        .begin_preparation_run(batch.id)
        .await
        .expect("run")
        .number;
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
        store.preparation_start(batch.id).await.expect("ranges").1,
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
            .preparation_start(batch.id)
            .await
            .expect("ranges")
            .1
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

async fn prepared_chunks_drop_duplicates_and_opt_outs(store: Store) {
    let phone = |n: u32| format!("+8613800000{n:03}");
    let (batch, r) = batch_with_recipients(&store, "prep", 2, (1..=10).map(phone).collect()).await;
    assert_eq!(r.len(), 10);

    assert_eq!(
        store
            .add_opt_outs(&[phone(9), phone(8), phone(9)], "api")
            .await
            .expect("add_opt_outs"),
        2,
        "two new numbers"
    );
    assert_eq!(
        store
            .add_opt_outs(&[phone(9), phone(7)], "api")
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
            .next_task_ids(batch.id, 0, 0, 10)
            .await
            .expect("p0")
            .len(),
        2
    );
    assert_eq!(
        store
            .next_task_ids(batch.id, 1, 0, 10)
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
        .add_opt_outs(&[phones[7].clone(), phones[N - 1].clone()], "api")
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
