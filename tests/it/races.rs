//! Lifecycle storms: an operator's team and their scripts clicking pause, resume and, now and
//! then, cancel on the same batches at once, at random moments of preparation and delivery.
//!
//! Each scenario sends two 50,000-recipient batches (CSV upload: 0.5% invalid numbers, 1%
//! duplicates), each through its own HTTP sink (the `http` provider), and throws bursts of
//! random lifecycle actions at them from `CLIENTS` client threads, through every instance of
//! the scenario, with a random quiet spell after each burst (shorter while a batch prepares);
//! every burst ends with one more resume of each batch, as the team's last click would. The
//! second batch may be cancelled in one of the bursts. Once both batches are final, the audit proves what matters: the first
//! batch `completed`, the second `completed` or `cancelled`, API.md's counting rules exact, one
//! message per valid recipient, and every message the service calls `sent` accepted by its sink
//! exactly once, none of the others handed to it at all.
//!
//! On SQLite, on PostgreSQL, and on PostgreSQL + RabbitMQ with two instances (the batches
//! supervised by one, actions arriving through both). The bursts come from a seed printed
//! first; `SMSBATCH_FAULT_SEED=<seed>` replays the same plan of actions (the threads' timing,
//! and so the moments the actions land, still varies from run to run). Each scenario prints a
//! `RESULT` line with its figures (RELIABILITY.md collects them).
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::faults::{
    DEADLINE, Expect, PROVIDER, Recipients, Rng, audit, delivered, prepared, start_server, state,
};
use crate::common::sink::Sink;
use crate::common::{Backend, FINAL_STATES, TestDb, TestServer, num, text};

/// Recipients of each batch.
const ROWS: u64 = 50_000;
/// Client threads of a burst.
const CLIENTS: u64 = 16;
/// Actions each client sends in a burst, at most.
const ACTIONS_PER_CLIENT: u64 = 12;
/// Bursts at most; after them the batches run undisturbed to their end.
const MAX_BURSTS: u64 = 40;
/// A batch that is running (not paused) and shows no progress for this long is stuck.
const STUCK: Duration = Duration::from_secs(90);
/// The second batch's provider: a second sink, so that each sink sees one batch's messages.
const SECOND_PROVIDER: &str = "second";
const CONTENT: &str = "Hi {{name}}, your code is ready: {{url}}";
const URL: &str = "https://shop.example/f";

#[test]
fn storm_of_actions_sqlite() {
    storm("storm_of_actions_sqlite", Backend::Sqlite, 1);
}

#[test]
fn storm_of_actions_postgres() {
    storm("storm_of_actions_postgres", Backend::Postgres, 1);
}

#[test]
fn storm_of_actions_rabbitmq_two_instances() {
    storm(
        "storm_of_actions_rabbitmq_two_instances",
        Backend::PostgresRabbitmq,
        2,
    );
}

/// One client's action of a burst: which batch, what, through which instance, after how long.
#[derive(Debug, Clone, Copy)]
struct Planned {
    batch: usize,
    action: &'static str,
    server: usize,
    pause_before: Duration,
}

/// How the service answered the storm's actions, by action and status.
#[derive(Debug, Default)]
struct Answers(BTreeMap<(&'static str, u16), u64>);

impl Answers {
    fn count(&self, status: u16) -> u64 {
        self.0
            .iter()
            .filter(|((_, s), _)| *s == status)
            .map(|(_, n)| n)
            .sum()
    }
}

/// Creates a marketing batch through `provider`, uploads `recipients` and starts it.
fn start_batch_via(
    server: &TestServer,
    name: &str,
    provider: &str,
    recipients: &Recipients,
) -> String {
    let id = server.create_batch(&json!({
        "name": name, "content": CONTENT, "url": URL, "provider": provider,
        "message_type": "marketing",
    }));
    let (status, answer) = server.upload_csv(&id, recipients.csv.as_str());
    assert_eq!(status, 200, "upload answered {status}: {answer:#}");
    assert_eq!(num(&answer, "/total"), recipients.rows, "{answer:#}");
    server.action_ok(&id, "start", "preparing");
    id
}

fn storm(test: &str, backend: Backend, instances: usize) {
    let mut rng = Rng::for_test_in("races", test);
    let recipients = Recipients::generate(ROWS);
    let sinks = [Sink::start(), Sink::start()];
    let db = TestDb::new(backend);
    let second_url = sinks[1].url();
    let env = [
        (
            "SMSBATCH__PROVIDERS__HTTP__SECOND__URL",
            second_url.as_str(),
        ),
        ("SMSBATCH__PROVIDERS__HTTP__SECOND__TIMEOUT_MS", "5000"),
    ];
    let servers: Vec<TestServer> = (0..instances)
        .map(|_| start_server(&db, &sinks[0], &env))
        .collect();
    let ids = [
        start_batch_via(&servers[0], &format!("{test}-1"), PROVIDER, &recipients),
        start_batch_via(
            &servers[0],
            &format!("{test}-2"),
            SECOND_PROVIDER,
            &recipients,
        ),
    ];
    // The second batch is cancelled in one of the first bursts, three runs out of four.
    let cancel_in = (rng.between(0, 4) > 0).then(|| rng.between(0, 8));
    eprintln!("{test}: the second batch is cancelled in burst {cancel_in:?}");

    let answers = Mutex::new(Answers::default());
    let mut bursts_in: BTreeMap<String, u64> = BTreeMap::new();
    let mut burst = 0;
    while burst < MAX_BURSTS {
        let now: Vec<Value> = ids.iter().map(|id| servers[0].batch(id)).collect();
        if now.iter().all(|b| FINAL_STATES.contains(&state(b))) {
            break;
        }
        for b in &now {
            *bursts_in.entry(state(b).to_owned()).or_default() += 1;
        }
        // The plan comes from the seed, on this thread, before the clients start.
        let plans: Vec<Vec<Planned>> = (0..CLIENTS)
            .map(|_| {
                (0..rng.between(1, ACTIONS_PER_CLIENT + 1))
                    .map(|_| Planned {
                        batch: rng.between(0, 2) as usize,
                        action: if rng.between(0, 2) == 0 {
                            "pause"
                        } else {
                            "resume"
                        },
                        server: rng.between(0, instances as u64) as usize,
                        pause_before: Duration::from_millis(rng.between(0, 30)),
                    })
                    .collect()
            })
            .collect();
        let cancel = (cancel_in == Some(burst)).then(|| Planned {
            batch: 1,
            action: "cancel",
            server: rng.between(0, instances as u64) as usize,
            pause_before: Duration::from_millis(rng.between(0, 200)),
        });
        thread::scope(|scope| {
            for plan in plans
                .iter()
                .map(Vec::as_slice)
                .chain(cancel.as_slice().chunks(1))
            {
                let (servers, ids, answers) = (&servers, &ids, &answers);
                scope.spawn(move || {
                    for step in plan {
                        thread::sleep(step.pause_before);
                        let id = &ids[step.batch];
                        let (status, body) = servers[step.server].action(id, step.action);
                        assert!(
                            status == 202 || status == 409,
                            "{} of {id} through instance {} answered {status}: {body:#}",
                            step.action,
                            step.server
                        );
                        *answers
                            .lock()
                            .unwrap()
                            .0
                            .entry((step.action, status))
                            .or_default() += 1;
                    }
                });
            }
        });
        // The last click: every paused batch is resumed.
        for id in &ids {
            let (status, body) = servers[0].action(id, "resume");
            assert!(
                status == 202 || status == 409,
                "the closing resume of {id} answered {status}: {body:#}"
            );
        }
        burst += 1;
        // Short spells while a batch prepares (its most fragile moments, and its shortest
        // step), longer ones while they deliver.
        let preparing = now.iter().any(|b| state(b) == "preparing");
        let quiet = if preparing { 300 } else { 1500 };
        thread::sleep(Duration::from_millis(rng.between(0, quiet)));
    }
    eprintln!("{test}: {burst} bursts; batch states before them {bursts_in:?}");

    let ended: Vec<Value> = ids.iter().map(|id| wait_final(&servers[0], id)).collect();
    for (i, batch) in ended.iter().enumerate() {
        eprintln!(
            "{test}: batch {} ended {}: {}",
            i + 1,
            state(batch),
            batch["results"]
        );
    }
    assert_eq!(state(&ended[0]), "completed", "{:#}", ended[0]);
    audit(
        &format!("{test} (first batch)"),
        &servers[0],
        &ids[0],
        &recipients,
        &sinks[0],
        &Expect::clean(),
    );
    match state(&ended[1]) {
        "completed" => {
            audit(
                &format!("{test} (second batch)"),
                &servers[0],
                &ids[1],
                &recipients,
                &sinks[1],
                &Expect::clean(),
            );
        }
        "cancelled" => audit_cancelled(test, &servers[0], &ids[1], &recipients, &sinks[1]),
        other => panic!("the second batch ended {other}: {:#}", ended[1]),
    }
    let answers = answers.into_inner().unwrap();
    eprintln!(
        "RESULT {test}: bursts={burst} actions={} accepted={} refused={} by_action={:?} \
         first={} second={}",
        answers.0.values().sum::<u64>(),
        answers.count(202),
        answers.count(409),
        answers.0,
        state(&ended[0]),
        state(&ended[1]),
    );
}

/// Waits for the batch to reach a final state; fails with the last body if it is running and
/// makes no progress for `STUCK` (no pause is left once the storm is over).
fn wait_final(server: &TestServer, id: &str) -> Value {
    let give_up = Instant::now() + DEADLINE;
    let mut last = (String::new(), 0, 0);
    let mut since = Instant::now();
    loop {
        let batch = server.batch(id);
        if FINAL_STATES.contains(&state(&batch)) {
            return batch;
        }
        let now = (
            state(&batch).to_owned(),
            prepared(&batch),
            delivered(&batch),
        );
        if now != last {
            last = now;
            since = Instant::now();
        }
        assert!(
            since.elapsed() < STUCK,
            "batch {id} made no progress for {STUCK:?} in state {}: {batch:#}",
            state(&batch)
        );
        assert!(
            Instant::now() < give_up,
            "batch {id} not final after {DEADLINE:?}: {batch:#}"
        );
        thread::sleep(Duration::from_millis(200));
    }
}

/// Ends the scenario of a cancelled batch: the counting rules hold for what was prepared, every
/// prepared message is `sent` or `cancelled`, each `sent` one was accepted by the sink exactly
/// once, and no `cancelled` one reached it.
fn audit_cancelled(
    test: &str,
    server: &TestServer,
    id: &str,
    recipients: &Recipients,
    sink: &Sink,
) {
    let batch = server.batch(id);
    let r = |k: &str| num(&batch, &format!("/results/{k}"));
    let results = &batch["results"];
    assert_eq!(r("recipients"), recipients.rows, "{results:#}");
    let prepared_all = text(&batch, "/steps/preparation/status") == "completed";
    let counted = r("valid") + r("invalid") + r("duplicates") + r("opted_out");
    if prepared_all {
        assert_eq!(
            (r("valid"), r("invalid"), r("duplicates"), r("opted_out")),
            (
                recipients.valid(),
                recipients.invalid,
                recipients.duplicates,
                0
            ),
            "{results:#}"
        );
        assert_eq!(
            counted,
            r("recipients"),
            "recipients = valid + invalid + duplicates + opted_out: {results:#}"
        );
    } else {
        // Cancelled while preparing: what was prepared adds up, and no more than the list.
        assert_eq!(
            counted,
            prepared(&batch),
            "processed = valid + invalid + duplicates + opted_out: {batch:#}"
        );
        assert!(counted <= r("recipients"), "{results:#}");
    }
    assert_eq!(
        r("valid"),
        r("sent") + r("delivered") + r("failed") + r("cancelled"),
        "valid = sent + delivered + failed + cancelled: {results:#}"
    );
    assert_eq!(r("failed"), 0, "the sink refuses nothing: {results:#}");

    let received = sink.received();
    let mut by_id: HashMap<i64, Vec<&crate::common::sink::Received>> = HashMap::new();
    for request in &received {
        by_id.entry(request.id).or_default().push(request);
    }
    let mut phones = HashSet::new();
    let mut statuses: BTreeMap<String, u64> = BTreeMap::new();
    server.for_each_message(id, None, |m| {
        let message_id: i64 = text(m, "/id").parse().unwrap();
        let phone = text(m, "/phone").to_owned();
        let expected_text = recipients
            .texts
            .get(&phone)
            .unwrap_or_else(|| panic!("a message for {phone}, no valid recipient: {m:#}"));
        assert!(phones.insert(phone.clone()), "two messages for {phone}");
        let status = text(m, "/status").to_owned();
        let requests = by_id.remove(&message_id).unwrap_or_default();
        match status.as_str() {
            "sent" => {
                assert_eq!(requests.len(), 1, "{phone} sent once: {requests:?}");
                assert!(requests[0].answer.is_accepted(), "{requests:?}");
                assert_eq!(&requests[0].body, expected_text, "{requests:?}");
                assert_eq!(
                    m["provider_message_id"].as_str(),
                    Some(format!("sink-{}", requests[0].seq).as_str()),
                    "{m:#}"
                );
            }
            "cancelled" => assert!(
                requests.is_empty(),
                "{phone} is cancelled but reached the sink: {requests:?}"
            ),
            other => panic!("{phone} ended {other} in a cancelled batch: {m:#}"),
        }
        *statuses.entry(status).or_default() += 1;
    });
    assert!(
        by_id.is_empty(),
        "the sink received {} ids that are no message of the batch",
        by_id.len()
    );
    assert_eq!(
        phones.len() as u64,
        r("valid"),
        "one message per valid recipient"
    );
    assert_eq!(
        statuses.get("sent").copied().unwrap_or(0),
        r("sent"),
        "{statuses:?} against {results:#}"
    );
    assert_eq!(
        statuses.get("cancelled").copied().unwrap_or(0),
        r("cancelled"),
        "{statuses:?} against {results:#}"
    );
    eprintln!(
        "RESULT {test} (second batch, cancelled): prepared_all={prepared_all} valid={} sent={} \
         cancelled={} requests={}",
        r("valid"),
        r("sent"),
        r("cancelled"),
        received.len()
    );
}

/// An action saved through one instance, then the opposite action through the instance that
/// supervises the batch before its watch has seen the first (`smsbatch.poll_ms` is long here):
/// the supervisor's copy of the batch is behind, and the second action is judged against the
/// stored batch, not refused for a state the batch has left. Then the batch completes, each
/// message sent once.
#[test]
fn an_action_through_the_supervisor_sees_one_saved_elsewhere() {
    let test = "an_action_through_the_supervisor_sees_one_saved_elsewhere";
    let recipients = Recipients::generate(2_000);
    let sink = Sink::start();
    // 32 calls in flight at 100 ms each: the batch delivers for several seconds.
    sink.slow_for(Duration::from_secs(120), Duration::from_millis(100));
    let db = TestDb::new(Backend::PostgresRabbitmq);
    let env = [("SMSBATCH__SMSBATCH__POLL_MS", "5000")];
    let servers: Vec<TestServer> = (0..2).map(|_| start_server(&db, &sink, &env)).collect();
    let (supervising, other) = (&servers[0], &servers[1]);
    let id = crate::common::faults::start_batch(supervising, test, &recipients);
    crate::common::faults::wait_for(supervising, &id, "delivery under way", |b| {
        state(b) == "delivering" && delivered(b) > 0
    });

    other.action_ok(&id, "pause", "paused");
    supervising.action_ok(&id, "resume", "delivering");
    // The other way round: a pause saved elsewhere makes a second pause a conflict.
    other.action_ok(&id, "pause", "paused");
    let (status, body) = supervising.action(&id, "pause");
    assert_eq!(status, 409, "a second pause answered {status}: {body:#}");
    supervising.action_ok(&id, "resume", "delivering");

    crate::common::faults::wait_completed(supervising, &id);
    audit(test, supervising, &id, &recipients, &sink, &Expect::clean());
}
