//! Fault injection against real processes: the `smsbatch` binary as a child process, real
//! PostgreSQL and RabbitMQ, and the test's HTTP sink as the SMS gateway (the `http` provider).
//! Every scenario sends a 100,000-recipient batch (CSV upload: 98,500 distinct valid numbers, 500
//! invalid, 1,000 duplicates) through one fault and proves, with the audit of
//! `tests/it/common/faults.rs`, that it ends `completed` with API.md's counting rules exact, that no
//! message is lost, and that under `at_most_once` the sink accepted none twice:
//!
//! - SIGKILL of the service at five random points of preparation and delivery, restarting each
//!   time (at-most-once on PostgreSQL, and on PostgreSQL + RabbitMQ with two instances sharing
//!   the batch; at-least-once on PostgreSQL): what a kill leaves uncertain is bounded by the
//!   claims in flight, and it does not trip the failure threshold;
//! - PostgreSQL restarted mid-delivery and mid-preparation, RabbitMQ restarted mid-delivery
//!   (private instances, so the shared ones are never touched): `/readyz` reports it, the batch
//!   waits and completes;
//! - the gateway answering 5xx then 429 for a while (retried) and 4xx to some numbers (failed),
//!   on PostgreSQL and SQLite; the gateway hanging past the provider's timeout;
//! - SIGTERM mid-delivery: a clean exit 0, and the restart finishes with no unknown outcome.
//!
//! Random choices (kill points, fault points) come from a seed printed first;
//! `SMSBATCH_FAULT_SEED=<seed>` replays them. Each scenario prints a `RESULT` line with its
//! figures (RELIABILITY.md collects them).
#![allow(clippy::unwrap_used)]

use std::cell::Cell;
use std::thread;
use std::time::Duration;

use serde_json::Value;

use crate::common::faults::DEADLINE;
use crate::common::faults::{
    CLAIM_SIZE, Expect, GATEWAY_RETRIES, Instances, PrivatePostgres, PrivateRabbit, ROWS,
    Recipients, Redelivery, Rng, SEND_CONCURRENCY, WORKERS, audit, delivered, lease_owner,
    prepared, start_batch, start_server, state, wait_completed, wait_for, wait_ready_status,
};
use crate::common::sink::{Answer, Sink};
use crate::common::{Backend, TestDb, TestServer, eventually, text};

/// Server kills per SIGKILL scenario.
const KILLS: u64 = 5;
/// How long a stopped dependency stays down: long enough for every step restart, outcome
/// write and publish of the service to fail meanwhile.
const OUTAGE: Duration = Duration::from_secs(5);
/// Suffixes of the numbers the gateway refuses (about 1% of them).
const REFUSED: &[&str] = &["13"];
/// The 4xx the gateway refuses them with.
const REFUSED_STATUS: u16 = 422;

/// Where in the batch's life a fault strikes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Preparation,
    Delivery,
}

/// True once the batch's `step` has done `at` units of work (recipients prepared, messages
/// delivered); a preparation point also counts as reached once preparation is over.
fn reached(batch: &Value, step: Step, at: u64) -> bool {
    match step {
        Step::Preparation => prepared(batch) >= at || state(batch) != "preparing",
        Step::Delivery => delivered(batch) >= at,
    }
}

/// Requests the sink answered with `answer`.
fn answered(sink: &Sink, answer: Answer) -> usize {
    sink.received()
        .iter()
        .filter(|r| r.answer == answer)
        .count()
}

// ---------------------------------------------------------------------------------------------
// 1. SIGKILL at five random points
// ---------------------------------------------------------------------------------------------

#[test]
fn sigkill_five_times_at_most_once_postgres() {
    sigkill_five_times(
        "sigkill_five_times_at_most_once_postgres",
        Backend::Postgres,
        Redelivery::AtMostOnce,
        1,
    );
}

/// The production stack: two instances share the batch through RabbitMQ, and each kill picks
/// one of them — the supervisor (the other takes the batch over when its lease expires) or the
/// other one, whose workers held claims while the supervisor delivers on.
#[test]
fn sigkill_five_times_at_most_once_rabbitmq_two_instances() {
    sigkill_five_times(
        "sigkill_five_times_at_most_once_rabbitmq_two_instances",
        Backend::PostgresRabbitmq,
        Redelivery::AtMostOnce,
        2,
    );
}

#[test]
fn sigkill_five_times_at_least_once_postgres() {
    sigkill_five_times(
        "sigkill_five_times_at_least_once_postgres",
        Backend::Postgres,
        Redelivery::AtLeastOnce,
        1,
    );
}

/// Which instance a kill hits, when there are several.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Victim {
    /// The one holding the batch's lease: another takes the batch over when it expires.
    Supervisor,
    /// Another one, whose workers hold claims while the supervisor delivers on: its claims are
    /// settled by the running delivery.
    Other,
}

/// Kills one of `instances` servers with SIGKILL at `KILLS` random points — one or two while
/// preparing, the rest while delivering — and starts it again each time; each kill comes after
/// the batch made progress since the previous one. With several instances each kill hits the
/// supervisor or another one at random, the supervisor at least once, and the last one another
/// one, so the supervisor delivers on past claims a dead instance left. Messages a kill leaves
/// with an unknown outcome say nothing about the gateway: they must not pause the batch, however
/// short the failure window.
fn sigkill_five_times(test: &str, backend: Backend, redelivery: Redelivery, instances: usize) {
    let mut rng = Rng::for_test(test);
    let recipients = Recipients::generate(ROWS);
    let sink = Sink::start();
    let db = TestDb::new(backend);
    let mode = match redelivery {
        Redelivery::AtMostOnce => "at_most_once",
        Redelivery::AtLeastOnce => "at_least_once",
    };
    let env = [
        ("SMSBATCH__SMSBATCH__REDELIVERY", mode),
        // The failure threshold keeps its default share (10%) over a short window, so that the
        // claims one kill leaves would pause the batch if they counted as failures.
        ("SMSBATCH__SMSBATCH__FAILURE_WINDOW", "100"),
    ];
    let mut known = Instances::new();
    let mut servers: Vec<TestServer> = Vec::new();
    let mut instance_ids: Vec<String> = Vec::new();
    for _ in 0..instances {
        servers.push(start_server(&db, &sink, &env));
        instance_ids.push(known.newest(&db));
    }
    let id = start_batch(&servers[0], test, &recipients);

    let in_preparation = rng.between(1, 3);
    let mut preparation: Vec<u64> = (0..in_preparation)
        .map(|_| rng.share(recipients.rows, 5, 95))
        .collect();
    // With several instances a kill may have to wait for a take-over (the lease's expiry)
    // before it can tell the supervisor from the others: leave the batch work to do meanwhile.
    let latest = if instances == 1 { 95 } else { 75 };
    let mut delivery: Vec<u64> = (in_preparation..KILLS)
        .map(|_| rng.share(recipients.valid(), 2, latest))
        .collect();
    preparation.sort_unstable();
    delivery.sort_unstable();
    let mut victims: Vec<Victim> = (0..KILLS)
        .map(|_| {
            if rng.between(0, 2) == 0 {
                Victim::Supervisor
            } else {
                Victim::Other
            }
        })
        .collect();
    let last = victims.len() - 1;
    if !victims[..last].contains(&Victim::Supervisor) {
        victims[rng.between(0, last as u64) as usize] = Victim::Supervisor;
    }
    victims[last] = Victim::Other;
    if instances == 1 {
        victims.fill(Victim::Supervisor);
    }
    let points: Vec<(Step, u64, Victim)> = (preparation.into_iter())
        .map(|at| (Step::Preparation, at))
        .chain(delivery.into_iter().map(|at| (Step::Delivery, at)))
        .zip(victims)
        .map(|((step, at), victim)| (step, at, victim))
        .collect();
    eprintln!("{test}: kill points {points:?}");

    // Kills at which messages may have been `sending`: any once preparation may have ended.
    let mut delivering_kills = 0;
    let mut last = (0, 0);
    for (n, &(step, at, victim)) in points.iter().enumerate() {
        let what = format!("kill point {} ({step:?} at {at}) after progress", n + 1);
        let supervisor = Cell::new(None);
        let batch = wait_for(&servers[0], &id, &what, |b| {
            let moved = prepared(b) > last.0 || delivered(b) > last.1;
            if !(moved && reached(b, step, at)) {
                return false;
            }
            if instances == 1 {
                return true;
            }
            // Several instances: wait until a live one holds the lease (after a supervisor's
            // death, until its lease expired and another took the batch over).
            let owner = lease_owner(&db, &id);
            supervisor.set(instance_ids.iter().position(|i| Some(i) == owner.as_ref()));
            supervisor.get().is_some()
        });
        let index = match (supervisor.get(), victim) {
            (None, _) => 0,
            (Some(s), Victim::Supervisor) => s,
            (Some(s), Victim::Other) => (s + 1) % instances,
        };
        servers[index].kill();
        last = (prepared(&batch), delivered(&batch));
        // Preparation's last chunks may have been committed after this poll.
        if state(&batch) != "preparing" || last.0 + 2_000 >= recipients.rows {
            delivering_kills += 1;
        }
        eprintln!(
            "{test}: SIGKILL {} of instance {index} ({victim:?}) in state {} (prepared {}, \
             delivered {})",
            n + 1,
            state(&batch),
            last.0,
            last.1
        );
        servers[index].restart();
        instance_ids[index] = known.newest(&db);
    }

    wait_completed(&servers[0], &id);
    let expect = Expect {
        redelivery,
        stops: KILLS,
        in_flight_bound: delivering_kills * WORKERS * CLAIM_SIZE,
        ..Expect::clean()
    };
    audit(test, &servers[0], &id, &recipients, &sink, &expect);
}

// ---------------------------------------------------------------------------------------------
// 2. PostgreSQL restarted
// ---------------------------------------------------------------------------------------------

#[test]
fn postgres_restart_mid_delivery() {
    postgres_restart("postgres_restart_mid_delivery", Step::Delivery);
}

#[test]
fn postgres_restart_mid_preparation() {
    postgres_restart("postgres_restart_mid_preparation", Step::Preparation);
}

/// Stops the test's private PostgreSQL at a random point of `during` for `OUTAGE`, then starts
/// it again: `/readyz` and the API answer 503 meanwhile, the batch waits instead of failing and
/// completes with exact counts, and nothing has an unknown outcome (no process died).
fn postgres_restart(test: &str, during: Step) {
    let mut rng = Rng::for_test(test);
    let recipients = Recipients::generate(ROWS);
    let pg = PrivatePostgres::start();
    let sink = Sink::start();
    let db = TestDb::on_postgres_server(Backend::Postgres, &pg.admin_url());
    let server = start_server(&db, &sink, &[]);
    let id = start_batch(&server, test, &recipients);

    let at = match during {
        Step::Preparation => rng.share(recipients.rows, 10, 70),
        Step::Delivery => rng.share(recipients.valid(), 10, 70),
    };
    let batch = wait_for(&server, &id, &format!("{during:?} at {at}"), |b| {
        reached(b, during, at)
    });
    let aimed_at = match during {
        Step::Preparation => "preparing",
        Step::Delivery => "delivering",
    };
    assert_eq!(
        state(&batch),
        aimed_at,
        "the fault strikes {during:?}: {batch:#}"
    );
    pg.stop();
    eprintln!(
        "{test}: PostgreSQL stopped in state {} (prepared {}, delivered {})",
        state(&batch),
        prepared(&batch),
        delivered(&batch)
    );
    assert_unready(&server, "database");
    thread::sleep(OUTAGE);
    let (status, body) = server.get_json("/readyz");
    assert_eq!(
        status, 503,
        "still unready while the database is down: {body:#}"
    );
    let (status, body) = server.get_json(&format!("/v1/batches/{id}"));
    assert_eq!(
        (status, body.pointer("/error/code").and_then(Value::as_str)),
        (503, Some("unavailable")),
        "the API answers 503 while the database is down: {body:#}"
    );

    pg.start_again();
    wait_ready_status(&server, 200);
    wait_completed(&server, &id);
    audit(test, &server, &id, &recipients, &sink, &Expect::clean());
}

/// Waits for `/readyz` to answer 503 with `check` failing and the other check `ok`.
fn assert_unready(server: &TestServer, check: &str) {
    let body = wait_ready_status(server, 503);
    assert_eq!(body["status"], "unhealthy", "{body:#}");
    let other = if check == "database" {
        "queue"
    } else {
        "database"
    };
    assert_ne!(
        body["checks"][check], "ok",
        "the {check} check fails: {body:#}"
    );
    assert_eq!(
        body["checks"][other], "ok",
        "the {other} check holds: {body:#}"
    );
}

// ---------------------------------------------------------------------------------------------
// 3. RabbitMQ restarted
// ---------------------------------------------------------------------------------------------

/// Stops the test's private RabbitMQ node's broker at a random point of delivery for `OUTAGE`,
/// then starts it again: `/readyz` reports the queue, the batch stays `delivering`, then
/// completes with exact counts and nothing sent twice or left unknown.
#[test]
fn rabbitmq_restart_mid_delivery() {
    let test = "rabbitmq_restart_mid_delivery";
    let mut rng = Rng::for_test(test);
    let recipients = Recipients::generate(ROWS);
    let rabbit = PrivateRabbit::start();
    let sink = Sink::start();
    let db = TestDb::new(Backend::PostgresRabbitmq);
    let amqp = rabbit.amqp_url();
    let server = start_server(&db, &sink, &[("SMSBATCH__TRANSPORT__AMQP_URL", &amqp)]);
    let id = start_batch(&server, test, &recipients);

    let at = rng.share(recipients.valid(), 10, 60);
    wait_for(&server, &id, &format!("delivered {at}"), |b| {
        reached(b, Step::Delivery, at)
    });
    rabbit.stop_app();
    assert_unready(&server, "queue");
    thread::sleep(OUTAGE);
    let waiting = server.batch(&id);
    assert_eq!(
        text(&waiting, "/state"),
        "delivering",
        "the batch waits for the broker: {waiting:#}"
    );
    eprintln!(
        "{test}: broker down from {at} delivered to {}",
        delivered(&waiting)
    );

    rabbit.start_app();
    wait_ready_status(&server, 200);
    wait_completed(&server, &id);
    audit(test, &server, &id, &recipients, &sink, &Expect::clean());
}

// ---------------------------------------------------------------------------------------------
// 4. The gateway answers 5xx, 429 and 4xx
// ---------------------------------------------------------------------------------------------

#[test]
fn gateway_errors_postgres() {
    gateway_errors("gateway_errors_postgres", Backend::Postgres);
}

#[test]
fn gateway_errors_sqlite() {
    gateway_errors("gateway_errors_sqlite", Backend::Sqlite);
}

/// Requests the gateway answers 503, then 429, at random points of delivery.
const OUTAGE_503: u64 = 3_000;
const OUTAGE_429: u64 = 2_000;

/// The gateway refuses about 1% of the numbers with a 4xx throughout, answers the next
/// `OUTAGE_503` requests 503 at one random point of delivery and the next `OUTAGE_429` 429 at a
/// later one. Transient answers are retried with backoff until accepted, so every number is sent
/// exactly once except the refused ones, which fail; the failure threshold stays at its default
/// (transient answers are not failures).
fn gateway_errors(test: &str, backend: Backend) {
    let mut rng = Rng::for_test(test);
    let recipients = Recipients::generate(ROWS);
    let sink = Sink::start();
    sink.refuse_ending(REFUSED, REFUSED_STATUS);
    let db = TestDb::new(backend);
    let server = start_server(&db, &sink, GATEWAY_RETRIES);
    let id = start_batch(&server, test, &recipients);

    let first = rng.share(recipients.valid(), 5, 25);
    let second = rng.share(recipients.valid(), 40, 60);
    wait_for(&server, &id, &format!("delivered {first}"), |b| {
        reached(b, Step::Delivery, first)
    });
    let before = sink.total() as u64;
    sink.fail_next(OUTAGE_503, 503);
    wait_for(
        &server,
        &id,
        &format!("503s over, delivered {second}"),
        |b| sink.total() as u64 >= before + OUTAGE_503 && reached(b, Step::Delivery, second),
    );
    sink.fail_next(OUTAGE_429, 429);

    wait_completed(&server, &id);
    let expect = Expect {
        refused: REFUSED.to_vec(),
        refused_status: REFUSED_STATUS,
        transient: true,
        ..Expect::clean()
    };
    let tally = audit(test, &server, &id, &recipients, &sink, &expect);
    let refused = recipients.ending(REFUSED);
    assert_eq!(answered(&sink, Answer::Refused(503)), OUTAGE_503 as usize);
    assert_eq!(answered(&sink, Answer::Refused(429)), OUTAGE_429 as usize);
    assert_eq!(
        answered(&sink, Answer::Refused(REFUSED_STATUS)) as u64,
        refused,
        "one refusal per refused number: a 4xx is not retried"
    );
    assert_eq!(
        (tally.sent, tally.failed),
        (recipients.valid() - refused, refused)
    );
    assert_eq!(
        tally.requests,
        tally.sent + refused + OUTAGE_503 + OUTAGE_429,
        "every request was accepted once, refused once, or caught by an outage"
    );
}

// ---------------------------------------------------------------------------------------------
// 5. The gateway hangs
// ---------------------------------------------------------------------------------------------

/// Requests the gateway holds unanswered.
const HANGS: u64 = 200;

/// The gateway holds `HANGS` requests for 2 s, past the provider's 500 ms timeout, at a random
/// point of delivery: each timeout is transient, the message is sent again and accepted once.
#[test]
fn gateway_hangs_past_the_timeout() {
    let test = "gateway_hangs_past_the_timeout";
    let mut rng = Rng::for_test(test);
    let recipients = Recipients::generate(ROWS);
    let sink = Sink::start();
    let db = TestDb::new(Backend::Postgres);
    let mut env = GATEWAY_RETRIES.to_vec();
    env.push(("SMSBATCH__PROVIDERS__HTTP__SINK__TIMEOUT_MS", "500"));
    let server = start_server(&db, &sink, &env);
    let id = start_batch(&server, test, &recipients);

    let at = rng.share(recipients.valid(), 10, 60);
    wait_for(&server, &id, &format!("delivered {at}"), |b| {
        reached(b, Step::Delivery, at)
    });
    sink.hang_next(HANGS, Duration::from_secs(2));

    wait_completed(&server, &id);
    let expect = Expect {
        transient: true,
        ..Expect::clean()
    };
    let tally = audit(test, &server, &id, &recipients, &sink, &expect);
    assert_eq!(answered(&sink, Answer::Hung), HANGS as usize);
    assert_eq!((tally.sent, tally.failed), (recipients.valid(), 0));
    assert_eq!(tally.requests, tally.sent + HANGS);
}

// ---------------------------------------------------------------------------------------------
// 6. SIGTERM
// ---------------------------------------------------------------------------------------------

/// SIGTERM at a random point of delivery, with the gateway slowed so that calls are in flight:
/// the server finishes them, exits 0 without reaching its shutdown timeout, and the restarted
/// server completes the batch with exact counts and no unknown outcome.
#[test]
fn sigterm_mid_delivery_drains() {
    let test = "sigterm_mid_delivery_drains";
    let mut rng = Rng::for_test(test);
    let recipients = Recipients::generate(ROWS);
    let sink = Sink::start();
    let db = TestDb::new(Backend::Postgres);
    let mut server = start_server(&db, &sink, &[]);
    let id = start_batch(&server, test, &recipients);

    let at = rng.share(recipients.valid(), 10, 70);
    wait_for(&server, &id, &format!("delivered {at}"), |b| {
        reached(b, Step::Delivery, at)
    });
    // Every provider call of the next two rounds is held 300 ms: SIGTERM arrives while they are.
    sink.slow_next(WORKERS * SEND_CONCURRENCY * 2, Duration::from_millis(300));
    thread::sleep(Duration::from_millis(100));
    let (code, took) = server.terminate();
    let output = server.output_tail();
    assert_eq!(code, Some(0), "SIGTERM exits 0; output:\n{output}");
    assert!(
        !output.contains("Shutdown timeout reached"),
        "the drain finished within the shutdown timeout; output:\n{output}"
    );
    eprintln!(
        "{test}: SIGTERM at {at} delivered; exited 0 after {took:?}, {} requests so far",
        sink.total()
    );

    server.restart();
    wait_completed(&server, &id);
    let expect = Expect {
        stops: 1,
        ..Expect::clean()
    };
    audit(test, &server, &id, &recipients, &sink, &expect);
}

// ---------------------------------------------------------------------------------------------
// 7. SIGTERM with a step stuck
// ---------------------------------------------------------------------------------------------

/// The shutdown timeout of the stuck-step scenarios (`smsbatch.shutdown_timeout_ms`).
const STUCK_SHUTDOWN: Duration = Duration::from_secs(4);
/// What a stop may take beyond its timeout: the lease release's second, and the process's own
/// start and end.
const STOP_MARGIN: Duration = Duration::from_secs(5);

#[test]
fn sigterm_with_preparation_stuck_exits_in_time_postgres() {
    sigterm_with_preparation_stuck(
        "sigterm_with_preparation_stuck_exits_in_time_postgres",
        Backend::Postgres,
    );
}

#[test]
fn sigterm_with_preparation_stuck_exits_in_time_sqlite() {
    sigterm_with_preparation_stuck(
        "sigterm_with_preparation_stuck_exits_in_time_sqlite",
        Backend::Sqlite,
    );
}

/// SIGTERM while preparation is stuck: at a random point of it, the test takes a lock that
/// every write of the step waits on (the messages table on PostgreSQL, the database's write lock
/// on SQLite) and sends SIGTERM once the step has stopped moving. The server cannot drain the
/// step, says so, and still exits 0 within its shutdown timeout (the contract of
/// `smsbatch.shutdown_timeout_ms`). Once the lock is gone, the restarted server continues the
/// step from its checkpoint and the batch completes with exact counts.
fn sigterm_with_preparation_stuck(test: &str, backend: Backend) {
    let mut rng = Rng::for_test(test);
    let recipients = Recipients::generate(ROWS);
    let sink = Sink::start();
    let db = TestDb::new(backend);
    let timeout = STUCK_SHUTDOWN.as_millis().to_string();
    let mut server = start_server(
        &db,
        &sink,
        &[("SMSBATCH__SMSBATCH__SHUTDOWN_TIMEOUT_MS", timeout.as_str())],
    );
    let id = start_batch(&server, test, &recipients);

    let at = rng.share(recipients.rows, 5, 60);
    let batch = wait_for(&server, &id, &format!("prepared {at}"), |b| {
        reached(b, Step::Preparation, at)
    });
    assert_eq!(state(&batch), "preparing", "{batch:#}");
    let lock = db.hold_write_lock();
    // Stuck: preparation stops moving (its chunk's write waits on the lock).
    let mut last = prepared(&server.batch(&id));
    eventually("preparation stuck on the lock", DEADLINE, || {
        thread::sleep(Duration::from_millis(1500));
        let now = prepared(&server.batch(&id));
        let moved = now != last;
        last = now;
        if moved {
            Err(format!("still moving: {now} prepared"))
        } else {
            Ok(())
        }
    });
    let (code, took) = server.terminate();
    let output = server.output_tail();
    assert_eq!(code, Some(0), "SIGTERM exits 0; output:\n{output}");
    assert!(
        took <= STUCK_SHUTDOWN + STOP_MARGIN,
        "SIGTERM took {took:?}, past the shutdown timeout of {STUCK_SHUTDOWN:?}; output:\n{output}"
    );
    assert!(
        output.contains("Shutdown timeout reached with work still in flight"),
        "the step could not be drained, and the server says so; output:\n{output}"
    );
    eprintln!(
        "{test}: preparation stuck at {last} of {} prepared; SIGTERM exited 0 after {took:?}",
        recipients.rows
    );
    // SQLite's write lock goes to whoever asks when the writer lets go, and the server's chunks
    // follow each other closely: the test may have it only once preparation is done. Delivery
    // is then the step stuck, and a stop past its timeout leaves what its workers had claimed
    // with an unknown outcome (at most once), as a crash would.
    let delivery_stuck = last >= recipients.rows;

    lock.release();
    server.restart();
    wait_completed(&server, &id);
    let expect = Expect {
        stops: 1,
        in_flight_bound: if delivery_stuck {
            WORKERS * CLAIM_SIZE
        } else {
            0
        },
        ..Expect::clean()
    };
    audit(test, &server, &id, &recipients, &sink, &expect);
}
