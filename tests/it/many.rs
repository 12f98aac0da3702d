//! Many batches at once: hundreds of small batches created and started concurrently all
//! complete with exact counts, and with hundreds of them paused the instance holds no
//! supervisor for any (it watches the database once for all, not once per batch).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::Duration;

use serde_json::{Value, json};

use crate::common::{Backend, TestDb, TestServer, mobile, num, rfc3339_in, text};

on_both_backends!(five_hundred_batches_at_once_complete_exactly
    => five_hundred_batches_at_once_complete_exactly_sqlite,
       five_hundred_batches_at_once_complete_exactly_postgres,
       five_hundred_batches_at_once_complete_exactly_rabbitmq);
on_both_backends!(paused_and_far_scheduled_batches_hold_no_supervisor
    => paused_and_far_scheduled_batches_hold_no_supervisor_sqlite,
       paused_and_far_scheduled_batches_hold_no_supervisor_postgres);

const BATCHES: usize = 500;
const PER_BATCH: u64 = 10;
const CLIENTS: usize = 16;
const DEADLINE: Duration = Duration::from_secs(300);

/// A small batch whose numbers no other batch of the test has (all ending in 5: the simulator
/// fails numbers ending 0001 and 0002).
fn small(k: usize, extra: Value) -> Value {
    let recipients: Vec<Value> = (0..PER_BATCH)
        .map(|i| json!({"phone": mobile(70_000_000 + k as u64 * 100 + i * 10 + 5)}))
        .collect();
    let mut body = json!({"name": format!("small-{k}"), "content": "Your code is 1234",
                          "recipients": recipients});
    if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
        body.extend(extra.clone());
    }
    body
}

/// Creates `n` batches from `CLIENTS` threads and applies `then` to each; returns their ids.
fn create_all(server: &TestServer, n: usize, extra: &Value, then: &[(&str, &str)]) -> Vec<String> {
    let next = AtomicUsize::new(0);
    let ids = std::sync::Mutex::new(Vec::with_capacity(n));
    thread::scope(|s| {
        for _ in 0..CLIENTS {
            s.spawn(|| {
                loop {
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    if k >= n {
                        break;
                    }
                    let id = server.create_batch(&small(k, extra.clone()));
                    for (action, state) in then {
                        server.action_ok(&id, action, state);
                    }
                    ids.lock().expect("ids").push(id);
                }
            });
        }
    });
    ids.into_inner().expect("ids")
}

/// Every batch of the server, by id, through the list endpoint's pages.
fn all_batches(server: &TestServer) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    let mut after: Option<String> = None;
    loop {
        let path = match &after {
            Some(cursor) => format!("/v1/batches?limit=500&after={cursor}"),
            None => "/v1/batches?limit=500".to_owned(),
        };
        let (status, page) = server.get_json(&path);
        assert_eq!(status, 200, "{page:#}");
        for b in page["items"].as_array().cloned().unwrap_or_default() {
            out.insert(text(&b, "/id").to_owned(), b);
        }
        match page["next"].as_str() {
            Some(next) => after = Some(next.to_owned()),
            None => return out,
        }
    }
}

fn count_states(batches: &BTreeMap<String, Value>) -> BTreeMap<String, usize> {
    let mut states = BTreeMap::new();
    for b in batches.values() {
        *states.entry(text(b, "/state").to_owned()).or_insert(0) += 1;
    }
    states
}

/// 500 batches of 10, created and started by 16 clients at once, all complete, each with
/// exactly its 10 messages sent.
fn five_hundred_batches_at_once_complete_exactly(backend: Backend) {
    let db = TestDb::new(backend);
    let server = TestServer::start(&db, &[]);
    let ids = create_all(&server, BATCHES, &json!({}), &[("start", "preparing")]);
    assert_eq!(ids.len(), BATCHES);

    let started = std::time::Instant::now();
    let batches = loop {
        let batches = all_batches(&server);
        let states = count_states(&batches);
        if states.get("completed") == Some(&BATCHES) {
            break batches;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "not all completed after {DEADLINE:?}: {states:?}\n{}",
            server.output_tail()
        );
        thread::sleep(Duration::from_millis(500));
    };
    let inexact: Vec<&Value> = batches
        .values()
        .filter(|b| {
            num(b, "/results/valid") != PER_BATCH
                || num(b, "/results/sent") != PER_BATCH
                || num(b, "/results/failed") != 0
        })
        .collect();
    assert!(
        inexact.is_empty(),
        "batches with other counts: {inexact:#?}"
    );
    no_lease_left(&db, "after every batch completed");
}

/// On PostgreSQL, that every lease went back: the supervisors that stopped gave theirs up (the
/// registry releases them together, a few statements for hundreds of stops).
fn no_lease_left(db: &TestDb, when: &str) {
    if db.backend() == Backend::Sqlite {
        return;
    }
    let what = format!("every lease given back {when}");
    crate::common::eventually(&what, Duration::from_secs(10), || {
        let held = db.query_column("SELECT count(*)::text FROM leases");
        match held.first().cloned().flatten().as_deref() {
            Some("0") => Ok(()),
            other => Err(format!("{other:?} leases still held")),
        }
    });
}

/// A paused batch and one scheduled beyond the next rounds of upkeep hold no supervisor: the
/// server's count of supervised batches drops to zero, and the batches still resume (or start
/// when due) and complete.
fn paused_and_far_scheduled_batches_hold_no_supervisor(backend: Backend) {
    const N: usize = 100;
    let db = TestDb::new(backend);
    // A slow provider, so that every batch is caught delivering by its pause.
    let server = TestServer::start(
        &db,
        &[("SMSBATCH__PROVIDERS__SIMULATOR__LATENCY_MS", "500")],
    );
    let paused = create_all(
        &server,
        N,
        &json!({}),
        &[("start", "preparing"), ("pause", "paused")],
    );
    let far = create_all(
        &server,
        1,
        &json!({"schedule_at": rfc3339_in(Duration::from_secs(3600))}),
        &[("start", "scheduled")],
    );
    let supervised = || {
        let metrics = server.get("/metrics").body;
        metrics
            .lines()
            .find(|l| l.starts_with("smsbatch_supervised_batches "))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            .expect("smsbatch_supervised_batches in /metrics")
    };
    crate::common::eventually("without a supervisor", DEADLINE, || {
        let n = supervised();
        if n == 0.0 {
            Ok(())
        } else {
            Err(format!("{n} batches supervised"))
        }
    });
    no_lease_left(&db, "with every batch paused or far ahead");

    for id in &paused {
        let (status, body) = server.action(id, "resume");
        // A batch paused while preparing resumes into preparing, one paused delivering into
        // delivering: either way it completes.
        assert_eq!(status, 202, "{body:#}");
    }
    for id in &paused {
        let batch = server.wait_for_state(id, &["completed"], DEADLINE);
        assert_eq!(num(&batch, "/results/sent"), PER_BATCH, "{batch:#}");
    }
    let far = server.batch(&far[0]);
    assert_eq!(text(&far, "/state"), "scheduled", "{far:#}");
}
