//! Fair scheduling as an operator sees it: a small transactional batch started beside a large
//! marketing one completes while the large one is still at work, whether the large one is
//! preparing (steps take turns: `smsbatch.active_steps`) or delivering (the workers and the
//! broker take transactional tasks first).

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::{Backend, TestDb, TestServer, mobile, num, text};

on_both_backends!(a_small_batch_takes_turns_with_a_large_ones_preparation
    => a_small_batch_takes_turns_with_a_large_ones_preparation_sqlite,
       a_small_batch_takes_turns_with_a_large_ones_preparation_postgres);
on_both_backends!(a_transactional_batch_overtakes_a_large_marketing_ones_tasks
    => a_transactional_batch_overtakes_a_large_marketing_ones_tasks_sqlite,
       a_transactional_batch_overtakes_a_large_marketing_ones_tasks_postgres,
       a_transactional_batch_overtakes_a_large_marketing_ones_tasks_rabbitmq);

const DEADLINE: Duration = Duration::from_secs(120);

/// A batch of `n` distinct valid numbers from `first` on (all ending in 5: the simulator fails
/// numbers ending 0001 and 0002).
fn batch(name: &str, message_type: &str, first: u64, n: u64) -> Value {
    let recipients: Vec<Value> = (0..n)
        .map(|i| json!({"phone": mobile(first + i * 10 + 5)}))
        .collect();
    json!({"name": name, "content": "Your code is 1234", "message_type": message_type,
           "recipients": recipients})
}

/// Starts a small transactional batch once `large` is in `large_state`, and checks that the
/// small one completes, exactly, while the large one is still in that state.
fn small_completes_while_large_is(server: &TestServer, large: &str, large_state: &str) {
    server.wait_for_state(large, &[large_state], DEADLINE);
    let small = server.create_batch(&batch("small", "transactional", 80_000_000, 10));
    server.action_ok(&small, "start", "preparing");
    let started = Instant::now();
    let small = server.wait_for_state(&small, &["completed"], DEADLINE);
    let took = started.elapsed();
    let large_now = server.batch(large);
    assert_eq!(
        (num(&small, "/results/valid"), num(&small, "/results/sent")),
        (10, 10),
        "{small:#}"
    );
    assert_eq!(
        text(&large_now, "/state"),
        large_state,
        "the small batch took {took:?} and completed only after the large one left \
         {large_state}: {large_now:#}\n{}",
        server.output_tail()
    );
    // Not merely before the end: the small batch's tasks did not wait behind most of the
    // large one's (in a broker queue without priorities they would wait behind all of them).
    assert!(
        num(&large_now, "/results/sent") < num(&large_now, "/results/valid") / 2,
        "the small batch completed only after half of the large one was sent: {large_now:#}"
    );
    eprintln!(
        "small batch completed {took:?} after its start, the large one still {large_state} \
         (sent {})",
        num(&large_now, "/results/sent")
    );
    let large = server.wait_for_state(large, &["completed"], DEADLINE);
    assert_eq!(
        num(&large, "/results/sent"),
        num(&large, "/results/valid"),
        "{large:#}"
    );
}

/// One step at a time, and a large batch prepared in many small chunks: its preparation gives
/// its turn up between chunks while the small batch waits, so the small batch is prepared and
/// delivered before the large one's preparation is done.
fn a_small_batch_takes_turns_with_a_large_ones_preparation(backend: Backend) {
    let db = TestDb::new(backend);
    let server = TestServer::start(
        &db,
        &[
            ("SMSBATCH__SMSBATCH__ACTIVE_STEPS", "1"),
            ("SMSBATCH__SMSBATCH__BATCH_SIZE", "20"),
        ],
    );
    let large = server.create_batch(&batch("large", "marketing", 0, 50_000));
    server.action_ok(&large, "start", "preparing");
    small_completes_while_large_is(&server, &large, "preparing");
}

/// A large marketing batch keeps every worker busy (5 ms a message); a small transactional one
/// started meanwhile has its tasks taken before the large one's waiting tasks.
fn a_transactional_batch_overtakes_a_large_marketing_ones_tasks(backend: Backend) {
    let db = TestDb::new(backend);
    let server = TestServer::start(&db, &[("SMSBATCH__PROVIDERS__SIMULATOR__LATENCY_MS", "5")]);
    let large = server.create_batch(&batch("large", "marketing", 0, 50_000));
    server.action_ok(&large, "start", "preparing");
    server.wait_until(&large, "sending", DEADLINE, |b| {
        b.pointer("/results/sent")
            .and_then(Value::as_u64)
            .is_some_and(|sent| sent > 0)
    });
    small_completes_while_large_is(&server, &large, "delivering");
}
