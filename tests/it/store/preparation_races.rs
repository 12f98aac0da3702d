//! Preparation on PostgreSQL racing other writers: chunks written side by side, copies held up
//! on another writer's number, runs starting beside a recording chunk.

use super::*;

on_both_backends!(numbers_shared_by_chunks_written_side_by_side_are_kept_once
    => numbers_shared_by_chunks_written_side_by_side_are_kept_once_sqlite,
       numbers_shared_by_chunks_written_side_by_side_are_kept_once_postgres);

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
    let run = store
        .begin_preparation_run(batch.id)
        .await
        .expect("run")
        .number;
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

/// Rows a chunk carries besides its three numbers, so that it is large enough to go in by
/// `COPY` (smaller chunks are inserted), the write these tests hold up.
const FILL: i64 = COPY_FROM_ROWS as i64 - 3;

/// A chunk of a batch's first three recipients `r`, numbered `phone(1)`..`phone(3)`, in
/// partition 0 with `segments` each, and `FILL` rows of other numbers after them.
fn three_numbers(
    batch_id: i64,
    r: &[i64],
    phone: impl Fn(u32) -> String,
    segments: i32,
) -> PreparedChunk {
    let fill =
        (1..=FILL).map(|k| message(batch_id, 0, r[2] + k, &format!("+8613900{k:06}"), segments));
    PreparedChunk {
        messages: (0..3)
            .map(|i| message(batch_id, 0, r[i], &phone(i as u32 + 1), segments))
            .chain(fill)
            .collect(),
        last_recipient_id: r[2],
        processed: 3 + FILL,
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
    run_with_url(Backend::Postgres, |store, url| async move {
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
                inserted: 2 + FILL,
                duplicates: 1,
                opted_out: 0
            }
        );
        let b = store.batch(batch.id).await.expect("batch");
        assert_eq!(
            (b.processed, b.valid, b.duplicates),
            (3 + FILL, 2 + FILL, 1)
        );
        // The other writer's row (one segment) stays; the chunk's own rows have two.
        let numbers: Vec<String> = (1..=3).map(phone).collect();
        let stored = all_messages(&store, batch.id).await;
        assert_eq!(
            stored
                .iter()
                .filter(|m| numbers.contains(&m.phone))
                .map(|m| (m.phone.clone(), m.segments))
                .collect::<Vec<_>>(),
            vec![(phone(3), 1), (phone(1), 2), (phone(2), 2)]
        );
        assert_eq!(stored.len() as i64, 3 + FILL);
        assert_eq!(b.segments, 2 * (2 + FILL));
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
    run_with_url(Backend::Postgres, |store, url| async move {
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
    run_with_url(Backend::Postgres, |store, url| async move {
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
                let run = store.begin_preparation_run(batch.id).await.expect("run");
                let checkpoint = store.checkpoint(batch.id, "preparation").await.expect("cp");
                (run.processed, checkpoint)
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
        let (processed, checkpoint) = new_run.await.expect("the run task");
        let b = store.batch(batch.id).await.expect("batch");
        match written {
            Ok(_) => {
                assert_eq!(checkpoint, r[2], "the new run reads the chunk's checkpoint");
                assert_eq!((b.processed, b.valid), (3 + FILL, 3 + FILL));
                // Its start is told of the chunk, so it reads where to start instead of
                // starting from the top.
                assert_eq!(processed, 3 + FILL, "the new run's start counts the chunk");
            }
            Err(StoreError::Superseded(_)) => {
                assert_eq!((processed, checkpoint), (0, 0));
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
    run_with_url(Backend::Postgres, |store, url| async move {
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
                inserted: 3 + FILL,
                duplicates: 0,
                opted_out: 0
            }
        );
        let b = store.batch(batch.id).await.expect("batch");
        assert_eq!(
            (b.processed, b.valid, b.duplicates),
            (3 + FILL, 3 + FILL, 0)
        );
        drop((other, observer));
        driver.await.expect("driver").expect("connection");
        observer_driver.await.expect("driver").expect("connection");
    });
}
